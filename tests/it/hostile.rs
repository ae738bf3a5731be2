//! Input written by a stranger, against the real daemon: each test pins a way it once wedged,
//! forged, leaked or stalled something (issue #11), and fails on the build that had the bug.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::harness::*;
use crate::recorder::{Answer, Recorder};

/// Source `cl`, the given sinks and routes (TOML), rate limits as given.
fn with(dir: &Path, server: &str, sinks_and_routes: &str) -> String {
    config(
        dir,
        server,
        &format!("[sources.cl]\nsecret = \"{CL_SECRET}\"\n\n{sinks_and_routes}"),
    )
}

/// A route named `all` taking every event to `sinks`.
fn route_all(sinks: &[&str]) -> String {
    format!(
        "[[routes]]\nname = \"all\"\nevents = [\"*\"]\nsinks = {}\n",
        serde_json::to_string(sinks).unwrap()
    )
}

/// Waits until the jobs table has `n` jobs with `status`; returns the counts by status.
async fn wait_status(daemon: &Daemon, status: &str, n: i64) -> HashMap<String, i64> {
    eventually(|| {
        let counts: HashMap<String, i64> = daemon
            .rows("SELECT status, count(*) FROM jobs GROUP BY status", |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .into_iter()
            .collect();
        if counts.get(status).copied().unwrap_or(0) >= n {
            Ok(counts)
        } else {
            Err(format!("waiting for {n} {status} jobs: {counts:?}"))
        }
    })
    .await
}

/// Runs the CLI on the daemon's configuration.
fn cli(daemon: &Daemon, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .arg("--config")
        .arg(&daemon.config_path)
        .output()
        .unwrap()
}

/// Every byte of the database files (main, WAL) as text, for grepping.
fn database_bytes(dir: &Path) -> String {
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
    wait_status(&daemon, "dead", names.len() as i64).await;

    let mut seen = vec![("log".to_owned(), daemon.log())];
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
    let errors: Vec<String> =
        daemon.rows("SELECT sink || ': ' || last_error FROM jobs", |r| r.get(0));
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
        .accept_cl(br#"{"id": "a\nb\u0000c", "type": "scan.completed"}"#)
        .await;
    // Pretty-printed, with a line that is a JSON object of its own: once a forged record.
    let pretty = b"{\n  \"id\": \"pretty\",\n  \"type\": \"scan.completed\",\n  \"data\":\n{\"forged\": true, \"text\": \"x\\ny\"}\n}\n";
    daemon.accept_cl(pretty).await;
    wait_status(&daemon, "succeeded", 4).await;

    let ids: Vec<String> = next_hop
        .requests()
        .iter()
        .map(|r| r.headers["webhook-id"].to_str().unwrap().to_owned())
        .collect();
    assert!(ids.contains(&"cl:a%0Ab%00c".to_owned()), "{ids:?}");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
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
    wait_status(&daemon, "succeeded", 1).await;
    let route: String = daemon.value("SELECT route FROM jobs");
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
    wait_status(&daemon, "succeeded", 22).await;
    let notes: Vec<String> = daemon.rows(
        "SELECT a.response FROM attempts a JOIN jobs j ON j.id = a.job_id JOIN events e ON e.id = j.event_id WHERE e.delivery_id LIKE 'loop-%'",
        |r| r.get(0),
    );
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
    wait_status(&daemon, "succeeded", 1).await;
    assert!(started.elapsed() < Duration::from_secs(8), "cat deadlocked");

    // A NUL in the type cannot be an environment value, and an id past the kernel's limit on
    // one argument cannot be passed: trying again cannot help, so one attempt, then dead.
    daemon
        .accept_cl(br#"{"id": "nul", "type": "scan\u0000completed"}"#)
        .await;
    let long_id = "i".repeat(200 * 1024);
    daemon
        .accept_cl(format!(r#"{{"id": "{long_id}", "type": "scan.completed"}}"#).as_bytes())
        .await;
    wait_status(&daemon, "dead", 2).await;
    let dead: Vec<(i64, String)> = daemon.rows(
        "SELECT attempts, last_error FROM jobs WHERE status = 'dead'",
        |r| Ok((r.get(0)?, r.get(1)?)),
    );
    for (attempts, error) in dead {
        assert_eq!(attempts, 1, "{error}");
        assert!(error.starts_with("cannot start /bin/cat"), "{error}");
    }
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
    wait_status(&daemon, "succeeded", 1).await;
    let response: String = daemon.value("SELECT response FROM jobs");
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
    wait_status(&daemon, "succeeded", 1).await;
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
async fn a_malformed_forwarded_for_from_the_proxy_is_400_and_charges_no_one() {
    let dir = tempdir();
    let server = "trusted_proxies = [\"127.0.0.1\"]\nrate_limit = { per_second = 100, burst = 100, failed_per_minute = 1, failed_burst = 2 }";
    let daemon = Daemon::start(dir.path(), &with(dir.path(), server, ""));
    let bad_signature = ("x-compliancelayer-signature", "0".repeat(64));
    // Through the proxy, an attacker sends a header with a byte that is not ASCII.
    for _ in 0..5 {
        let reply = daemon
            .client
            .post(daemon.url("/hooks/cl"))
            .header("content-type", "application/json")
            .header(bad_signature.0, &bad_signature.1)
            .header(
                "x-forwarded-for",
                reqwest::header::HeaderValue::from_bytes(b"198.51.100.1\xff").unwrap(),
            )
            .body(scan_body("xff"))
            .send()
            .await
            .unwrap();
        let reply = Reply::read(reply).await;
        assert_eq!((reply.status, reply.error()), (400, "bad_request"));
    }
    let garbage = daemon
        .post(
            "/hooks/cl",
            &scan_body("xff"),
            &[
                bad_signature.clone(),
                ("x-forwarded-for", "nonsense, 127.0.0.1".into()),
            ],
        )
        .await;
    assert_eq!(garbage.status, 400);
    // Nobody was charged: the next clients behind the proxy get their own budgets.
    for client in ["198.51.100.7", "198.51.100.8"] {
        let reply = daemon
            .post(
                "/hooks/cl",
                &scan_body("xff"),
                &[bad_signature.clone(), ("x-forwarded-for", client.into())],
            )
            .await;
        assert_eq!(reply.status, 401, "{client} was refused for someone else");
    }
    assert_eq!(daemon.count("events"), 0);
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
    // were held; with the budget, 64 MiB (64 bodies of the default limit) and not a byte more.
    let chunk = vec![b' '; 1024 * 1024 - 100];
    let mut stalled = Vec::new();
    for _ in 0..150 {
        let mut stream = tokio::net::TcpStream::connect(daemon.addr).await.unwrap();
        let head = format!(
            "POST /hooks/cl HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nx-compliancelayer-signature: {}\r\ncontent-length: {}\r\n\r\n",
            "0".repeat(64),
            1024 * 1024
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        let _ = stream.write_all(&chunk).await;
        stalled.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let grown = rss_kib(daemon.pid()).saturating_sub(before);
    let mut refused = 0;
    for stream in &mut stalled {
        let mut answer = [0u8; 64];
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(20), stream.read(&mut answer)).await
            && answer[..n].starts_with(b"HTTP/1.1 503")
        {
            refused += 1;
        }
    }
    assert!(refused >= 50, "only {refused} of 150 uploads were refused");
    assert!(grown < 100 * 1024, "the daemon grew by {grown} KiB");
    // While the budget is spent, a delivery is told to come back later.
    let reply = daemon.post_cl(&scan_body("squeezed")).await;
    assert_eq!((reply.status, reply.error()), (503, "overloaded"));
    assert!(reply.headers.contains_key("retry-after"));
    // Once the stalled clients are gone, their share is back.
    drop(stalled);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = daemon.post_cl(&scan_body("afterwards")).await;
        if reply.status == 202 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "budget never returned: {}",
            reply.status
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(daemon.count("events"), 1);
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
