//! Input written by a stranger, against the real daemon: each test pins a way it once wedged,
//! forged, leaked or stalled something (issue #11), and fails on the build that had the bug.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::harness::*;
use crate::recorder::{Answer, Recorder};

/// Source `cl`, the given sinks and routes (TOML), rate limits as given.
pub fn with(dir: &Path, server: &str, sinks_and_routes: &str) -> String {
    config(
        dir,
        server,
        &format!("[sources.cl]\nsecret = \"{CL_SECRET}\"\n\n{sinks_and_routes}"),
    )
}

/// A route named `all` taking every event to `sinks`.
pub fn route_all(sinks: &[&str]) -> String {
    format!(
        "[[routes]]\nname = \"all\"\nevents = [\"*\"]\nsinks = {}\n",
        serde_json::to_string(sinks).unwrap()
    )
}

/// Runs the CLI on the daemon's configuration.
pub fn cli(daemon: &Daemon, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .arg("--config")
        .arg(&daemon.config_path)
        .output()
        .unwrap()
}

/// Every byte of the database files (main, WAL) as text, for grepping.
pub fn database_bytes(dir: &Path) -> String {
    let mut all = Vec::new();
    for name in ["hookroute.db", "hookroute.db-wal"] {
        all.extend(std::fs::read(dir.join(name)).unwrap_or_default());
    }
    String::from_utf8_lossy(&all).into_owned()
}

/// A loopback port nothing listens on.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// The daemon's resident memory in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_secrets_never_reach_the_log_the_database_or_the_tools() {
    let dir = tempdir();
    // A receiver that redirects, one that is too slow, and one that answers TLS with plain
    // HTTP: every way a request can fail, each with a secret in its configuration.
    let slow = Recorder::start().await;
    slow.set_delay(Duration::from_secs(5));
    let redirect = Recorder::start().await;
    redirect.script((0..10).map(|_| Answer {
        headers: vec![("location", "http://127.0.0.1:1/elsewhere".into())],
        ..Answer::status(302)
    }));
    let refused = closed_port();
    let secrets = [
        "T0REFUSEDxSECRET",
        "T0DNSxSECRET",
        "T0SLOWxSECRET",
        "T0REDIRECTxSECRET",
        "T0TLSxSECRET",
        "Bearer-HEADERxSECRET",
        "SMTPxPASSWORDxSECRET",
        "whsec_c2lnbmluZ3NlY3JldHNpZ25pbmdzZWNyZXQ=",
    ];
    let slack = |name: &str, url: String| {
        format!(
            "[sinks.{name}]\ntype = \"slack\"\nwebhook_url = {{ value = \"{url}\" }}\ndelivery = {{ timeout = \"1s\", retry = {{ max_attempts = 1 }} }}\n\n"
        )
    };
    let mut sinks = String::new();
    sinks += &slack(
        "refused",
        format!("http://127.0.0.1:{refused}/services/{}", secrets[0]),
    );
    sinks += &slack(
        "dns",
        format!("http://hookroute-test.invalid/services/{}", secrets[1]),
    );
    sinks += &slack("slow", slow.url(&format!("/services/{}", secrets[2])));
    sinks += &slack(
        "redirect",
        redirect.url(&format!("/services/{}", secrets[3])),
    );
    sinks += &slack(
        "tls",
        format!("https://{}/services/{}", slow.addr, secrets[4]),
    );
    sinks += &format!(
        "[sinks.forward]\ntype = \"http\"\nurl = \"http://127.0.0.1:{refused}/in\"\nheaders = {{ authorization = \"{}\" }}\nsign = {{ value = \"{}\" }}\ndelivery = {{ timeout = \"1s\", retry = {{ max_attempts = 1 }} }}\n\n",
        secrets[5], secrets[7]
    );
    sinks += &format!(
        "[sinks.mail]\ntype = \"email\"\nurl = \"smtp://127.0.0.1:{refused}\"\nstarttls = \"never\"\nusername = \"hookroute\"\npassword = {{ value = \"{}\" }}\nfrom = \"h@example.com\"\nto = [\"a@example.com\"]\ndelivery = {{ timeout = \"1s\", retry = {{ max_attempts = 1 }} }}\n\n",
        secrets[6]
    );
    let names = [
        "refused", "dns", "slow", "redirect", "tls", "forward", "mail",
    ];
    let text = with(dir.path(), NO_LIMITS, &(sinks + &route_all(&names)));
    let daemon = Daemon::start_with(
        dir.path(),
        &write_config(dir.path(), &text),
        &[("RUST_LOG", "trace")],
    );
    let reply = daemon.accept_cl(&scan_body("leak-1")).await;
    let event = reply.json["id"].to_string();
    wait_jobs(&daemon, "dead", names.len() as i64).await;

    let log = wait_log_n(&daemon, "dead letter", names.len()).await;
    let mut seen = vec![("log".to_owned(), log)];
    seen.push(("database".into(), database_bytes(dir.path())));
    for args in [
        vec!["deliveries", "list"],
        vec!["deliveries", "list", "--json"],
        vec!["deliveries", "show", &event],
        vec!["deliveries", "show", &event, "--json"],
    ] {
        let out = cli(&daemon, &args);
        assert!(out.status.success(), "{args:?}: {out:?}");
        seen.push((
            args.join(" "),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        ));
    }
    // The failures were recorded, with something useful in them.
    let errors: Vec<String> = daemon
        .all_jobs()
        .into_iter()
        .map(|(_, job)| format!("{}: {}", job.sink, job.last_error.unwrap_or_default()))
        .collect();
    assert_eq!(errors.len(), names.len(), "{errors:?}");
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("refused: ") && e.contains("connect")),
        "{errors:?}"
    );
    assert!(errors.iter().any(|e| e.contains("HTTP 302")), "{errors:?}");
    for (place, text) in &seen {
        for secret in secrets {
            assert!(
                !text.contains(secret),
                "{secret} appeared in the {place}:\n{text}"
            );
        }
        assert!(
            !text.contains(CL_SECRET),
            "the source secret in the {place}"
        );
    }
    // The redirect was not followed.
    assert_eq!(redirect.requests().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_forward_takes_any_id_and_the_file_archive_one_line_per_delivery() {
    let dir = tempdir();
    let next_hop = Recorder::start().await;
    let archive = dir.path().join("events.jsonl");
    let sinks = format!(
        "[sinks.forward]\ntype = \"http\"\nurl = \"{}\"\nsign = {{ value = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\" }}\n\n[sinks.archive]\ntype = \"file\"\npath = \"{}\"\n\n",
        next_hop.url("/in"),
        archive.display()
    );
    let daemon = Daemon::start(
        dir.path(),
        &with(
            dir.path(),
            NO_LIMITS,
            &(sinks + &route_all(&["forward", "archive"])),
        ),
    );
    // A control character in the id once panicked the signer and left the job pending forever.
    daemon
        .accept_cl(br#"{"id": "a\nb\u0001c", "type": "scan.completed"}"#)
        .await;
    // Pretty-printed, with a line that is a JSON object of its own: once a forged record.
    let pretty = b"{\n  \"id\": \"pretty\",\n  \"type\": \"scan.completed\",\n  \"data\":\n{\"forged\": true, \"text\": \"x\\ny\"}\n}\n";
    daemon.accept_cl(pretty).await;
    wait_jobs(&daemon, "succeeded", 4).await;

    let ids: Vec<String> = next_hop
        .requests()
        .iter()
        .map(|r| r.headers["webhook-id"].to_str().unwrap().to_owned())
        .collect();
    assert!(ids.contains(&"cl:a%0Ab%01c".to_owned()), "{ids:?}");
    let verifier =
        standardwebhooks::Webhook::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
    for request in next_hop.requests() {
        verifier
            .verify(&request.body, &request.headers)
            .expect("the next hop verifies the re-signed request");
    }

    let text = std::fs::read_to_string(&archive).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "one line per delivery:\n{text}");
    let pretty_line: serde_json::Value = lines
        .iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("every line parses"))
        .find(|l| l["delivery_id"] == "pretty")
        .unwrap();
    let sent: serde_json::Value = serde_json::from_slice(pretty).unwrap();
    assert_eq!(pretty_line["payload"], sent, "the payload round-trips");
}

on_both_backends!(an_odd_number_or_deep_nesting_leaves_routing_and_the_tools_working);

async fn an_odd_number_or_deep_nesting_leaves_routing_and_the_tools_working() {
    let dir = tempdir();
    let archive = |name: &str| dir.path().join(format!("{name}.jsonl"));
    let rest = format!(
        r#"[sinks.failing]
type = "file"
path = "{}"

[sinks.other]
type = "file"
path = "{}"

[[routes]]
name = "failing scans"
events = ["scan.completed"]
when = "data.score < 70"
sinks = ["failing"]

[[routes]]
name = "the rest"
events = ["*"]
sinks = ["other"]
"#,
        archive("failing").display(),
        archive("other").display()
    );
    let daemon = Daemon::start(dir.path(), &with(dir.path(), NO_LIMITS, &rest));
    let deep = format!("{}0{}", "[".repeat(300), "]".repeat(300));
    let body = format!(
        r#"{{"id": "odd", "type": "scan.completed", "data": {{"score": 10, "domain": "a.com", "ratio": 1e999, "nested": {deep}}}}}"#
    );
    let reply = daemon.accept_cl(body.as_bytes()).await;
    let id = reply.json["id"].to_string();
    wait_jobs(&daemon, "succeeded", 1).await;
    let route = daemon.only_job().route;
    assert_eq!(route, "failing scans", "score 10 is a failing scan");

    for json in [false, true] {
        let mut args = vec!["deliveries", "show", id.as_str()];
        if json {
            args.push("--json");
        }
        let out = cli(&daemon, &args);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{args:?}: {out:?}");
        assert!(stdout.contains("1e999"), "{stdout}");
        if json {
            // Valid JSON (a raw value is checked for syntax only: 1e999 is valid JSON that
            // serde_json's numbers cannot hold).
            serde_json::from_str::<Box<serde_json::value::RawValue>>(&stdout).expect("valid JSON");
            assert!(stdout.contains(r#""score": 10"#), "{stdout}");
        }
    }
    let out = Command::new(BIN)
        .args(["route-test", "--config"])
        .arg(&daemon.config_path)
        .arg({
            let file = dir.path().join("odd.json");
            std::fs::write(&file, &body).unwrap();
            file
        })
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("failing scans"));
}

on_both_backends!(a_nul_in_an_events_type_or_id_is_refused_and_stores_nothing);

/// JSON may spell a NUL (`\u0000`); no database keeps one as text, so a type or id holding
/// one is a 400 before anything is stored, on either backend (PostgreSQL refused the insert:
/// a 503 the sender retried for ever).
async fn a_nul_in_an_events_type_or_id_is_refused_and_stores_nothing() {
    let dir = tempdir();
    let daemon = Daemon::start(dir.path(), &with(dir.path(), NO_LIMITS, ""));
    for body in [
        r#"{"id": "nul-1", "type": "scan\u0000.completed", "data": {}}"#,
        r#"{"id": "nul-2", "event": "policy.published\u0000", "data": {}}"#,
        r#"{"id": "nul\u00003", "type": "scan.completed", "data": {}}"#,
    ] {
        let reply = daemon.post_cl(body.as_bytes()).await;
        assert_eq!(
            (reply.status, reply.error()),
            (400, "invalid_event"),
            "{body}"
        );
        assert!(
            reply.json["message"]
                .as_str()
                .is_some_and(|m| m.contains("NUL")),
            "{}",
            reply.json
        );
    }
    assert_eq!(daemon.event_count(), 0);
    daemon.accept_cl(&scan_body("nul-free")).await;
    assert_eq!(daemon.event_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runaway_template_falls_back_and_never_stalls_the_daemon() {
    let dir = tempdir();
    let rest = format!(
        r#"[sinks.console]
type = "log"
template = {{ text = "{{% for a in data.items %}}{{% for b in data.items %}}{{% for c in data.items %}}{{{{ a }}}}{{% endfor %}}{{% endfor %}}{{% endfor %}}" }}

{}"#,
        route_all(&["console"])
    );
    let daemon = Daemon::start(dir.path(), &with(dir.path(), NO_LIMITS, &rest));
    let items: Vec<String> = (0..3000).map(|i| format!("item{i:05}")).collect();
    for id in ["loop-1", "loop-2"] {
        let body = serde_json::json!({"id": id, "type": "x.big", "data": {"items": items}});
        daemon.accept_cl(body.to_string().as_bytes()).await;
    }
    // While those render, the daemon answers at once.
    let started = Instant::now();
    for i in 0..20 {
        let health = daemon
            .client
            .get(daemon.url("/healthz"))
            .send()
            .await
            .unwrap();
        assert_eq!(health.status(), 200);
        daemon
            .accept_cl(&scan_body(&format!("meanwhile-{i}")))
            .await;
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "ingest stalled: {:?}",
        started.elapsed()
    );
    wait_jobs(&daemon, "succeeded", 22).await;
    let notes: Vec<String> = daemon
        .all_jobs()
        .into_iter()
        .filter(|(id, _)| id.starts_with("loop-"))
        .flat_map(|(_, job)| job.history)
        .map(|attempt| attempt.response.unwrap_or_default())
        .collect();
    assert_eq!(notes.len(), 2);
    for note in notes {
        assert!(
            note.starts_with("note: template") && note.contains("sent the generic default"),
            "{note}"
        );
    }
}

/// An exec sink running `command`, one attempt unless it is told otherwise.
fn exec_sink(command: &[&str], delivery: &str) -> String {
    format!(
        "[sinks.hook]\ntype = \"exec\"\ncommand = {}\ndelivery = {{ {delivery} }}\n\n{}",
        serde_json::to_string(command).unwrap(),
        route_all(&["hook"])
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exec_hook_that_streams_gets_a_large_event_and_hopeless_ones_die_at_once() {
    let dir = tempdir();
    let daemon = Daemon::start(
        dir.path(),
        &with(
            dir.path(),
            NO_LIMITS,
            &exec_sink(
                &["/bin/cat"],
                "timeout = \"10s\", retry = { base = \"60s\" }",
            ),
        ),
    );
    let big = "x".repeat(400 * 1024);
    let body = serde_json::json!({"id": "big", "type": "scan.completed", "data": {"blob": big}});
    let started = Instant::now();
    daemon.accept_cl(body.to_string().as_bytes()).await;
    wait_jobs(&daemon, "succeeded", 1).await;
    assert!(started.elapsed() < Duration::from_secs(8), "cat deadlocked");

    // An id past the kernel's limit on one argument could not be passed to the hook (one
    // attempt, then dead); since #23.9 an id that long is refused at ingest, storing nothing.
    let long_id = "i".repeat(200 * 1024);
    let reply = daemon
        .post_cl(format!(r#"{{"id": "{long_id}", "type": "scan.completed"}}"#).as_bytes())
        .await;
    assert_eq!((reply.status, reply.error()), (400, "invalid_event"));
    assert_eq!(daemon.event_count(), 1);
}

/// A receiver that answers every request with a body of `len` bytes, streamed until the
/// client hangs up; returns its address and the count of body bytes it managed to send.
async fn endless_receiver(len: u64) -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    use std::sync::atomic::{AtomicU64, Ordering};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sent = std::sync::Arc::new(AtomicU64::new(0));
    let counter = std::sync::Arc::clone(&sent);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let counter = std::sync::Arc::clone(&counter);
            tokio::spawn(async move {
                let mut request = vec![0u8; 64 * 1024];
                let _ = stream.read(&mut request).await;
                let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {len}\r\n\r\n");
                if stream.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let chunk = vec![b'z'; 64 * 1024];
                let mut left = len;
                while left > 0 {
                    let n = left.min(chunk.len() as u64) as usize;
                    if stream.write_all(&chunk[..n]).await.is_err() {
                        return;
                    }
                    counter.fetch_add(n as u64, Ordering::Relaxed);
                    left -= n as u64;
                }
            });
        }
    });
    (addr, sent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_response_is_not_buffered() {
    let dir = tempdir();
    let (addr, sent) = endless_receiver(300 * 1024 * 1024).await;
    let rest = format!(
        "[sinks.forward]\ntype = \"http\"\nurl = \"http://{addr}/in\"\n\n{}",
        route_all(&["forward"])
    );
    let daemon = Daemon::start(dir.path(), &with(dir.path(), NO_LIMITS, &rest));
    let before = rss_kib(daemon.pid());
    daemon.accept_cl(&scan_body("huge-answer")).await;
    wait_jobs(&daemon, "succeeded", 1).await;
    let response = daemon.only_job().response.unwrap_or_default();
    assert!(
        response.starts_with("HTTP 200: zzz") && response.len() < 2100,
        "{}",
        response.len()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sent = sent.load(std::sync::atomic::Ordering::Relaxed);
    let grown = rss_kib(daemon.pid()).saturating_sub(before);
    assert!(
        sent < 64 * 1024 * 1024,
        "the daemon read {sent} bytes of the answer"
    );
    assert!(grown < 32 * 1024, "the daemon grew by {grown} KiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slack_escapes_payload_markup_in_the_fallback_text_and_the_blocks() {
    let dir = tempdir();
    let slack = Recorder::start().await;
    let rest = format!(
        "[sinks.slack]\ntype = \"slack\"\nwebhook_url = {{ value = \"{}\" }}\n\n{}",
        slack.url("/services/T/B/X"),
        route_all(&["slack"])
    );
    let daemon = Daemon::start(dir.path(), &with(dir.path(), NO_LIMITS, &rest));
    daemon
        .accept_cl(
            serde_json::json!({
                "id": "markup", "type": "alert.triggered",
                "data": {"domain": "<!channel>", "message": "<https://evil.example|click here> & more",
                         "alert_type": "<@U123>"}
            })
            .to_string()
            .as_bytes(),
        )
        .await;
    wait_jobs(&daemon, "succeeded", 1).await;
    let request = &slack.requests()[0];
    let body = String::from_utf8_lossy(&request.body);
    assert!(!body.contains('<') && !body.contains('>'), "{body}");
    let json = request.json();
    let text = json["text"].as_str().unwrap();
    assert!(text.contains("&lt;!channel&gt;"), "{text}");
    assert!(
        text.contains("&lt;https://evil.example|click here&gt; &amp; more"),
        "{text}"
    );
    let header = json["blocks"][0]["text"]["text"].as_str().unwrap();
    assert!(header.contains("&lt;!channel&gt;"), "{header}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_are_private_whatever_the_umask() {
    let dir = tempdir();
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o022));
    let data = dir.path().join("data");
    let archive = dir.path().join("archive/events.jsonl");
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nrate_limit = {{ enabled = false }}\n\n[storage]\npath = \"{}\"\n\n[sources.cl]\nsecret = \"{CL_SECRET}\"\n\n[sinks.archive]\ntype = \"file\"\npath = \"{}\"\n\n{}",
        data.join("hookroute.db").display(),
        archive.display(),
        route_all(&["archive"])
    );
    let daemon = Daemon::start(dir.path(), &text);
    daemon.accept_cl(&scan_body("private")).await;
    wait_lines(&archive, 1).await;
    let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700, "data directory");
    assert_eq!(mode(archive.parent().unwrap()), 0o700, "archive directory");
    for name in [
        "hookroute.db",
        "hookroute.db-wal",
        "hookroute.db-shm",
        "hookroute.db.lock",
    ] {
        assert_eq!(mode(&data.join(name)), 0o600, "{name}");
    }
    assert_eq!(mode(&archive), 0o600, "archive");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_uploads_share_one_memory_budget() {
    let dir = tempdir();
    let daemon = Daemon::start(
        dir.path(),
        &with(
            dir.path(),
            &format!("{NO_LIMITS}\nbody_read_timeout = \"30s\""),
            "",
        ),
    );
    let before = rss_kib(daemon.pid());
    // 150 uploads of all but the last 100 bytes of a 1 MiB body, then silence: 150 MiB if each
    // were held. Each holds exactly 1 MiB of the budget, and the budget is 64 of them.
    let stalled = stall_uploads(daemon.addr, 150).await;
    let (open, answers) = answered(stalled).await;
    let grown = rss_kib(daemon.pid()).saturating_sub(before);
    assert!(open.len() <= 64, "{} uploads held at once", open.len());
    assert!(answers.len() >= 86, "only {} refused", answers.len());
    for answer in &answers {
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(
            answer.contains("retry-after: 5") && answer.contains("overloaded"),
            "{answer}"
        );
    }
    // 64 MiB of bodies, hyper's buffers and the allocator's slack: well under the 150 MiB the
    // uploads would take unbounded (measured 85 to 105 MiB on a debug build).
    assert!(grown < 120 * 1024, "the daemon grew by {grown} KiB");
    // Once the stalled clients are gone, their share is back: the whole budget again.
    drop(open);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (open, answers) = answered(stall_uploads(daemon.addr, 64).await).await;
    assert_eq!((open.len(), answers.len()), (64, 0), "{answers:?}");
    assert_eq!(daemon.event_count(), 0);
}

/// `n` uploads that declare 1 MiB, send all but 100 bytes of it, and stall.
async fn stall_uploads(addr: SocketAddr, n: usize) -> Vec<tokio::net::TcpStream> {
    let chunk = vec![b' '; 1024 * 1024 - 100];
    let head = format!(
        "POST /hooks/cl HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nx-compliancelayer-signature: {}\r\ncontent-length: {}\r\n\r\n",
        "0".repeat(64),
        1024 * 1024
    );
    let mut stalled = Vec::new();
    for _ in 0..n {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.write_all(head.as_bytes()).await.unwrap();
        let _ = stream.write_all(&chunk).await;
        stalled.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stalled
}

/// Splits `streams` into those still waiting and the answers the others got.
async fn answered(
    streams: Vec<tokio::net::TcpStream>,
) -> (Vec<tokio::net::TcpStream>, Vec<String>) {
    let (mut open, mut answers) = (Vec::new(), Vec::new());
    for mut stream in streams {
        let mut answer = vec![0u8; 4096];
        match tokio::time::timeout(Duration::from_millis(20), stream.read(&mut answer)).await {
            Ok(Ok(n)) if n > 0 => answers.push(
                String::from_utf8_lossy(&answer[..n])
                    .to_lowercase()
                    .replace("http/1.1", "HTTP/1.1"),
            ),
            _ => open.push(stream),
        }
    }
    (open, answers)
}

#[test]
fn a_password_in_clear_off_loopback_is_a_configuration_error() {
    let dir = tempdir();
    let check = |url: &str, extra: &str| {
        let text = with(
            dir.path(),
            "",
            &format!(
                "[sinks.mail]\ntype = \"email\"\nurl = \"{url}\"\nstarttls = \"never\"\nusername = \"u\"\npassword = {{ value = \"p\" }}\nfrom = \"h@example.com\"\nto = [\"a@example.com\"]\n{extra}\n\n{}",
                route_all(&["mail"])
            ),
        );
        let path = write_config(dir.path(), &text);
        Command::new(BIN)
            .args(["check-config", "--config"])
            .arg(path)
            .output()
            .unwrap()
    };
    let refused = check("smtp://mail.example.com:25", "");
    assert_eq!(refused.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("sinks.mail") && stderr.contains("allow_plaintext_auth"),
        "{stderr}"
    );
    assert!(
        check("smtp://mail.example.com:25", "allow_plaintext_auth = true")
            .status
            .success()
    );
    assert!(check("smtp://127.0.0.1:25", "").status.success());
    assert!(check("smtp://[::1]:25", "").status.success());
}

/// Writes `request` as raw bytes (in `parts`, with `pause` between them) and returns the
/// status of every response read before the server closed the connection; fails if the
/// server neither answers nor closes within seconds.
fn exchange(addr: SocketAddr, parts: &[&[u8]], pause: Duration) -> Vec<u16> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(4)))
        .unwrap();
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            std::thread::sleep(pause);
        }
        if stream.write_all(part).is_err() {
            break; // the server already answered and closed
        }
    }
    let mut answer = Vec::new();
    if let Err(err) = stream.read_to_end(&mut answer) {
        // A reset after the answer is a close too; a timeout is a server that hung.
        assert_ne!(
            err.kind(),
            std::io::ErrorKind::WouldBlock,
            "the connection was left open: {}",
            String::from_utf8_lossy(&answer)
        );
    }
    String::from_utf8_lossy(&answer)
        .split("HTTP/1.")
        .skip(1)
        .filter_map(|r| r.get(2..5)?.parse().ok())
        .filter(|&status| status != 100)
        .collect()
}

/// A POST with `Connection: close`, its length declared, `headers` (each `Name: value`).
fn request(path: &str, headers: &[String], body: &[u8]) -> Vec<u8> {
    let mut text = format!(
        "POST {path} HTTP/1.1\r\nHost: hooks.example\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for header in headers {
        text += header;
        text += "\r\n";
    }
    text += "\r\n";
    let mut bytes = text.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

#[test]
fn bad_input_gets_its_exact_status_and_changes_nothing() {
    let dir = tempdir();
    let archive = dir.path().join("events.jsonl");
    let text = config(
        dir.path(),
        &format!(
            "{NO_LIMITS}\nmax_body_bytes = 4096\nheader_read_timeout = \"1s\"\nbody_read_timeout = \"1s\"\ntrusted_proxies = [\"127.0.0.1\"]"
        ),
        &standard_rest(dir.path()),
    );
    let daemon = Daemon::start(dir.path(), &text);
    let json = "Content-Type: application/json".to_owned();
    let signed = |body: &[u8]| {
        vec![
            json.clone(),
            format!(
                "X-ComplianceLayer-Signature: {}",
                hmac_hex(CL_SECRET, &[body])
            ),
        ]
    };
    let wrong = vec![
        json.clone(),
        format!("X-ComplianceLayer-Signature: SHA256={}", "ab".repeat(32)),
    ];
    let body = scan_body("table");
    let big = vec![b' '; 5000];
    let mut many_headers = wrong.clone();
    many_headers.extend((0..10_000).map(|i| format!("X-Filler-{i}: {i}")));
    let chunked_over = {
        let mut bytes = b"POST /hooks/cl HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for _ in 0..5 {
            bytes.extend_from_slice(b"400\r\n");
            bytes.extend_from_slice(&[b' '; 0x400]);
            bytes.extend_from_slice(b"\r\n");
        }
        bytes.extend_from_slice(b"0\r\n\r\n");
        bytes
    };
    let mut pipelined = request("/hooks/cl", &wrong, &body);
    pipelined.splice(
        0..0,
        String::from_utf8(request("/hooks/cl", &wrong, &body))
            .unwrap()
            .replace("Connection: close", "Connection: keep-alive")
            .into_bytes(),
    );
    let http10 = String::from_utf8(request("/hooks/cl", &wrong, &body))
        .unwrap()
        .replace("HTTP/1.1", "HTTP/1.0")
        .into_bytes();
    let mut non_ascii_xff = request("/hooks/cl", &signed(&body), &body);
    let at = non_ascii_xff
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap();
    non_ascii_xff.splice(
        at..at,
        b"\r\nX-Forwarded-For: 198.51.100.1\xff".iter().copied(),
    );
    let mut expect_continue = wrong.clone();
    expect_continue.push("Expect: 100-continue".into());
    let headers_only = request("/hooks/cl", &wrong, &body);
    let head_end = headers_only.len() - body.len();

    /// A name, the request in parts, and the statuses it must get.
    type Row = (&'static str, Vec<Vec<u8>>, Vec<u16>);
    let rows: Vec<Row> = vec![
        ("unknown path", vec![request("/hooks/nope", &signed(&body), &body)], vec![404]),
        ("path with NUL", vec![request("/hooks/cl%00", &signed(&body), &body)], vec![404]),
        (
            "GET",
            vec![b"GET /hooks/cl HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec()],
            vec![405],
        ),
        (
            "made-up method",
            vec![b"BREW /hooks/cl HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec()],
            vec![405],
        ),
        (
            "not JSON",
            vec![request("/hooks/cl", &["Content-Type: text/plain".into()], &body)],
            vec![415],
        ),
        ("declared too large", vec![request("/hooks/cl", &signed(&big), &big)], vec![413]),
        (
            "Content-Length overflow",
            vec![b"POST /hooks/cl HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 99999999999999999999999\r\n\r\n{}".to_vec()],
            vec![400],
        ),
        ("chunked past the limit", vec![chunked_over], vec![413]),
        ("no signature", vec![request("/hooks/cl", std::slice::from_ref(&json), &body)], vec![401]),
        ("wrong signature", vec![request("/hooks/cl", &wrong, &body)], vec![401]),
        (
            "signature not ASCII",
            vec![{
                let mut r = request("/hooks/cl", std::slice::from_ref(&json), &body);
                let at = r.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
                r.splice(at..at, b"\r\nX-ComplianceLayer-Signature: \xe9\xe9".iter().copied());
                r
            }],
            vec![401],
        ),
        ("signed, not JSON", vec![request("/hooks/cl", &signed(b"{nope"), b"{nope")], vec![400]),
        ("signed, not UTF-8", vec![request("/hooks/cl", &signed(b"\"\xff\""), b"\"\xff\"")], vec![400]),
        ("signed array", vec![request("/hooks/cl", &signed(b"[1]"), b"[1]")], vec![400]),
        (
            "signed, no type",
            vec![request("/hooks/cl", &signed(br#"{"data": {}}"#), br#"{"data": {}}"#)],
            vec![400],
        ),
        ("malformed X-Forwarded-For from the proxy", vec![non_ascii_xff], vec![400]),
        ("10,000 headers", vec![request("/hooks/cl", &many_headers, &body)], vec![431]),
        ("HTTP/1.0", vec![http10], vec![401]),
        ("two pipelined", vec![pipelined], vec![401, 401]),
        ("100-continue", vec![request("/hooks/cl", &expect_continue, &body)], vec![401]),
        (
            "slowloris headers",
            vec![b"POST /hooks/cl HTTP/1.1\r\n".to_vec(), b"Host: x\r\n".to_vec()],
            vec![],
        ),
        (
            "body never finished",
            vec![headers_only[..head_end + 10].to_vec(), Vec::new()],
            vec![408],
        ),
    ];
    for (name, parts, expected) in rows {
        let parts: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
        let statuses = exchange(daemon.addr, &parts, Duration::from_millis(700));
        assert_eq!(statuses, expected, "{name}");
        assert_eq!(daemon.event_count(), 0, "{name} stored something");
    }
    assert!(!archive.exists(), "something was delivered");
    // The daemon is still well: a good delivery goes through.
    let ok = exchange(
        daemon.addr,
        &[&request("/hooks/cl", &signed(&body), &body)],
        Duration::ZERO,
    );
    assert_eq!(ok, [202]);
}
