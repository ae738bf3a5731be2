//! The second hostile round (issue #23), against the real daemon: what a sender, a sink, a
//! receiver or a careless operator once used to wedge, forge, leak or freeze it. Each test
//! names the defect it pins and fails on the build that had it.

use std::path::Path;
use std::time::Duration;

use crate::harness::*;
use crate::hostile::{cli, database_bytes, route_all, with};
use crate::recorder::{Answer, Recorder};

/// An http sink `name` posting to `url`, one try.
fn http_sink(name: &str, url: &str) -> String {
    format!(
        "[sinks.{name}]\ntype = \"http\"\nurl = \"{url}\"\ndelivery = {{ retry = {{ max_attempts = 1 }} }}\n\n"
    )
}

/// An exec sink `name` running a shell script at `path` (the operator's program).
fn exec_sink(name: &str, path: &Path, delivery: &str) -> String {
    format!(
        "[sinks.{name}]\ntype = \"exec\"\ncommand = [\"{}\"]\ndelivery = {{ {delivery} }}\n\n",
        path.display()
    )
}

on_both_backends!(a_nul_or_invalid_utf8_in_a_sinks_answer_is_recorded_once);
/// #23.1: a receiver answering `200 ok\0tail`, or a hook printing a NUL and bytes that are not
/// UTF-8, wedged the job on PostgreSQL (its record failed, so it stayed leased and was called
/// again at every restart). Each answer is recorded once, the job finishes once.
async fn a_nul_or_invalid_utf8_in_a_sinks_answer_is_recorded_once() {
    let dir = tempdir();
    let receiver = Recorder::start().await;
    receiver.script([Answer {
        body: "ok\0tail".into(),
        ..Answer::status(200)
    }]);
    let hook = dir.path().join("hook.sh");
    script(&hook, "cat >/dev/null; printf 'done\\000binary\\377\\376'");
    let rest = format!(
        "{}{}{}",
        http_sink("forward", &receiver.url("/in")),
        exec_sink("hook", &hook, ""),
        route_all(&["forward", "hook"])
    );
    let text = with(dir.path(), NO_LIMITS, &rest);
    let daemon = Daemon::start(dir.path(), &text);
    daemon.accept_cl(&scan_body("nul-answer")).await;
    wait_jobs(&daemon, "succeeded", 2).await;
    let responses: Vec<(String, String)> = daemon
        .all_jobs()
        .into_iter()
        .flat_map(|(_, job)| {
            let sink = job.sink;
            job.history
                .into_iter()
                .map(move |a| (sink.clone(), a.response.unwrap_or_default()))
        })
        .collect();
    assert_eq!(responses.len(), 2, "{responses:?}");
    assert_eq!(responses[0].0, "forward");
    assert!(responses[0].1.contains("ok\u{FFFD}tail"), "{responses:?}");
    assert!(
        responses[1]
            .1
            .contains("done\u{FFFD}binary\u{FFFD}\u{FFFD}"),
        "{responses:?}"
    );
    // Restarted, nothing is due again: the receiver saw the event once.
    assert!(daemon.terminate().success());
    let daemon = Daemon::start(dir.path(), &text);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(receiver.requests().len(), 1);
    assert_eq!(
        jobs(&daemon).get("succeeded"),
        Some(&2),
        "{:?}",
        jobs(&daemon)
    );
}

/// #23.1: a NUL a sink answered, kept by an older SQLite daemon, made `migrate-storage` fail
/// on every run (`unsupported Unicode escape sequence`) with nothing after it copied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_storage_copies_an_answer_holding_a_nul() {
    let dir = tempdir();
    let old = Daemon::start(
        dir.path(),
        &config(dir.path(), NO_LIMITS, &standard_rest(dir.path())),
    );
    old.accept_cl(&scan_body("nul-before-the-move")).await;
    wait_jobs(&old, "succeeded", 1).await;
    assert!(old.terminate().success());
    // As a daemon before the fix kept it.
    open_db(dir.path())
        .execute_batch(
            "UPDATE attempts SET response = 'ok' || char(0) || 'tail';
             UPDATE jobs SET response = 'ok' || char(0) || 'tail';",
        )
        .unwrap();

    let cluster = crate::postgres::shared();
    let url = cluster.database();
    let moved = std::process::Command::new(BIN)
        .args(["migrate-storage", "--from"])
        .arg(dir.path().join("hookroute.db"))
        .args(["--to", &url, "--password-file"])
        .arg(&cluster.password_file)
        .output()
        .unwrap();
    assert!(
        moved.status.success(),
        "{}",
        String::from_utf8_lossy(&moved.stderr)
    );
    let db = crate::postgres::database_name(&url);
    assert_eq!(
        cluster.psql(db, "SELECT response FROM attempts"),
        "ok\u{FFFD}tail\n"
    );
    assert_eq!(cluster.psql(db, "SELECT count(*) FROM jobs"), "1\n");
}

on_both_backends!(an_overlong_id_or_type_is_refused_and_stores_nothing);
/// #23.9: ids and types of a megabyte were accepted and logged in full, twice per event.
/// Past the documented limits they are a 400 `invalid_event` that stores nothing.
async fn an_overlong_id_or_type_is_refused_and_stores_nothing() {
    let dir = tempdir();
    let daemon = Daemon::start(
        dir.path(),
        &config(dir.path(), NO_LIMITS, &standard_rest(dir.path())),
    );
    let long_type = "t".repeat(129);
    let long_id = "i".repeat(257);
    for (id, kind, field) in [
        ("fine-id", long_type.as_str(), "type"),
        (long_id.as_str(), "scan.completed", "id"),
    ] {
        let body = serde_json::json!({"id": id, "type": kind}).to_string();
        let reply = daemon.post_cl(body.as_bytes()).await;
        assert_eq!(reply.status, 400, "{field}: {}", reply.json);
        assert_eq!(reply.error(), "invalid_event");
        assert!(
            reply.message().contains(&format!("\"{field}\"")),
            "{}",
            reply.message()
        );
    }
    // The delivery header is logged too.
    let body = scan_body("long-header");
    let reply = daemon
        .post(
            "/hooks/cl",
            &body,
            &[
                ("x-compliancelayer-signature", hmac_hex(CL_SECRET, &[&body])),
                ("x-compliancelayer-delivery", "d".repeat(300)),
            ],
        )
        .await;
    assert_eq!((reply.status, reply.error()), (400, "invalid_event"));
    assert_eq!(daemon.event_count(), 0);
    // At the limits, accepted.
    let body = serde_json::json!({"id": "i".repeat(256), "type": "t".repeat(128)}).to_string();
    daemon.accept_cl(body.as_bytes()).await;
    assert!(!daemon.log().contains(&long_id));
}

on_both_backends!(the_operators_tools_print_no_strangers_control_characters);
/// #23.3: an event type holding `\x1b[2K\r` and a fake row erased a real row of `deliveries
/// list` and drew a forged one; a receiver's `\x1b[2J\x1b]0;title\x07` cleared the screen and
/// set the window title on `deliveries show`; a newline split rows; U+202E reversed them.
async fn the_operators_tools_print_no_strangers_control_characters() {
    let dir = tempdir();
    let receiver = Recorder::start().await;
    receiver.script([Answer {
        body: "\x1b[2J\x1b]0;pwned\x07 down".into(),
        ..Answer::status(500)
    }]);
    let rest = format!(
        "{}{}",
        http_sink("forward", &receiver.url("/in")),
        route_all(&["forward"])
    );
    let daemon = Daemon::start(dir.path(), &with(dir.path(), NO_LIMITS, &rest));
    let forged = "scan.completed\x1b[2K\r     9      9  2026-01-01 forged\nrow\u{202E}desrever";
    let body =
        serde_json::json!({"id": "tty-1", "type": forged, "data": {"note": "\u{202E}x\x1b[31m"}})
            .to_string();
    daemon.accept_cl(body.as_bytes()).await;
    wait_jobs(&daemon, "dead", 1).await;
    let hazards = |c: char| c.is_control() && c != '\n' || ('\u{202A}'..='\u{202E}').contains(&c);
    for args in [
        &["deliveries", "list"][..],
        &["deliveries", "show", "1"],
        &["deliveries", "list", "--status", "dead"],
    ] {
        let out = cli(&daemon, args);
        assert!(out.status.success(), "{args:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(
            !text.contains(hazards),
            "{args:?} printed a control character:\n{text:?}"
        );
        assert!(
            text.contains("\\u{1b}"),
            "{args:?}: the escape is shown escaped:\n{text}"
        );
        if args[1] == "list" {
            // A header and one row per job: the newline in the type split nothing.
            assert_eq!(text.lines().count(), 2, "{text}");
        }
    }
    let shown = String::from_utf8(cli(&daemon, &["deliveries", "show", "1"]).stdout).unwrap();
    assert!(shown.contains("\\u{1b}]0;pwned\\u{7}"), "{shown}");
    assert!(shown.contains("\\u{202e}"), "{shown}");
    // --json stays exact.
    let json = cli(&daemon, &["deliveries", "show", "1", "--json"]);
    let shown: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(shown["event"]["type"], forged);
}

/// #23.6: an event type holding `\n<date> ERROR hookroute: database corrupted…` wrote a
/// separate, convincing ERROR line to the text log, twice per event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_cannot_write_a_line_of_its_own_into_the_text_log() {
    let dir = tempdir();
    let daemon = Daemon::start(
        dir.path(),
        &config(dir.path(), NO_LIMITS, &standard_rest(dir.path())),
    );
    let forged = "scan.completed\n2026-12-06T10:00:00.000000Z ERROR hookroute: database corrupted, restore from backup now\r";
    let body = serde_json::json!({"id": "log-forgery", "type": forged}).to_string();
    daemon.accept_cl(body.as_bytes()).await;
    let log = wait_log(&daemon, "database corrupted").await;
    for line in log.lines().filter(|l| l.contains("database corrupted")) {
        assert!(
            line.contains("scan.completed\\n2026-12-06"),
            "the type stays on its line, escaped: {line}"
        );
        assert!(!line.starts_with("2026-12-06T10:00:00"), "{line}");
    }
}

/// #23.4: a hook that exits 0 but leaves a child behind holding its output open was a
/// timeout, tried again and dead-lettered. Its exit status is the verdict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exec_hook_that_leaves_a_child_behind_succeeds_on_its_exit() {
    let dir = tempdir();
    let hook = dir.path().join("hook.sh");
    let left = dir.path().join("left-behind");
    script(
        &hook,
        &format!(
            "cat >/dev/null; echo started; (sleep 30; touch {}) & exit 0",
            left.display()
        ),
    );
    let rest = format!(
        "{}{}",
        exec_sink(
            "hook",
            &hook,
            "timeout = \"5s\", retry = { max_attempts = 1 }"
        ),
        route_all(&["hook"])
    );
    let daemon = Daemon::start(dir.path(), &with(dir.path(), NO_LIMITS, &rest));
    let sent = std::time::Instant::now();
    daemon.accept_cl(&scan_body("background-child")).await;
    wait_jobs(&daemon, "succeeded", 1).await;
    assert!(
        sent.elapsed() < Duration::from_secs(4),
        "{:?}",
        sent.elapsed()
    );
    let history = daemon.only_job().history;
    assert_eq!(history.len(), 1, "one attempt");
    let response = history[0].response.clone().unwrap_or_default();
    assert!(response.contains("started"), "{response}");
}

on_both_backends!(secrets_a_receiver_echoes_back_are_neither_logged_kept_nor_printed);
/// #23.5: a forwarding URL's token and key came back in an Express-style 404 page (`Cannot
/// POST <path>`), and an SMTP relay echoed the `AUTH PLAIN` line in its 535: both were kept in
/// the attempt record, logged and printed. Every configured secret is redacted first.
async fn secrets_a_receiver_echoes_back_are_neither_logged_kept_nor_printed() {
    use base64::Engine as _;
    let dir = tempdir();
    let (token, key, password) = ("tok3nS3cretPath42", "K3ySecretQuery99", "wr0ng-Passw0rd!");
    let receiver = Recorder::start().await;
    receiver.script([Answer {
        body: format!(
            "<pre>Cannot POST /hooks/ingest/{token}</pre> (query api_key={key}, or %2F{token})"
        ),
        ..Answer::status(404)
    }]);
    let smtp = crate::email::Smtp::start(
        dir.path(),
        "echo",
        "echo",
        None,
        Some("hookroute:the-right-password"),
    );
    let mut sinks = http_sink(
        "forward",
        &receiver.url(&format!("/hooks/ingest/{token}?api_key={key}")),
    );
    sinks += &format!(
        "[sinks.mail]\ntype = \"email\"\nurl = \"smtp://127.0.0.1:{}\"\nstarttls = \"never\"\nusername = \"hookroute\"\npassword = {{ value = \"{password}\" }}\nfrom = \"h@example.com\"\nto = [\"a@example.com\"]\ndelivery = {{ retry = {{ max_attempts = 1 }} }}\n\n",
        smtp.port
    );
    let text = with(
        dir.path(),
        NO_LIMITS,
        &(sinks + &route_all(&["forward", "mail"])),
    );
    let daemon = Daemon::start_with(
        dir.path(),
        &write_config(dir.path(), &text),
        &[("RUST_LOG", "trace")],
    );
    daemon.accept_cl(&scan_body("echoed")).await;
    wait_jobs(&daemon, "dead", 2).await;
    let log = wait_log_n(&daemon, "dead letter", 2).await;
    let plain =
        base64::engine::general_purpose::STANDARD.encode(format!("\0hookroute\0{password}"));
    let errors: Vec<String> = daemon
        .all_jobs()
        .into_iter()
        .map(|(_, job)| {
            let (error, response) = (
                job.last_error.unwrap_or_default(),
                job.response.unwrap_or_default(),
            );
            format!("{}: {error} {response}", job.sink)
        })
        .collect();
    assert!(errors[0].contains("Cannot POST ***"), "{errors:?}");
    assert!(
        errors[1].contains("535") && errors[1].contains("AUTH PLAIN ***"),
        "{errors:?}"
    );
    // Every text column the store keeps of the attempts (and, on SQLite, every byte of its
    // files).
    let kept: Vec<String> = daemon.rows(
        "SELECT coalesce(error, '') || ' ' || coalesce(response, '') FROM attempts",
        |r| r.get(0),
    );
    let mut seen = vec![("log", log), ("database", kept.join("\n"))];
    if backend() == Backend::Sqlite {
        seen.push(("database files", database_bytes(dir.path())));
    }
    for args in [
        &["deliveries", "list"][..],
        &["deliveries", "show", "1"],
        &["deliveries", "show", "1", "--json"],
    ] {
        let out = cli(&daemon, args);
        seen.push(("tools", String::from_utf8_lossy(&out.stdout).into_owned()));
    }
    for (place, text) in &seen {
        for secret in [token, key, password, plain.as_str()] {
            assert!(!text.contains(secret), "{secret} in the {place}:\n{text}");
        }
    }
}

/// Runs `hookroute check-config` on `path`; its output and how long it took.
fn check_config(path: &Path) -> (std::process::Output, Duration) {
    let started = std::time::Instant::now();
    let out = std::process::Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(path)
        .output()
        .unwrap();
    (out, started.elapsed())
}

/// #23.7: a `rules_file` replaced by a FIFO and a SIGHUP froze the daemon (`/healthz`,
/// `/metrics` and deliveries hung, SIGTERM was ignored); `rules_file = "/dev/zero"` made
/// `check-config` read until memory ran out. Only a regular file of bounded size is read, off
/// the runtime's workers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifo_or_a_device_as_rules_file_freezes_nothing() {
    let dir = tempdir();
    let rules = dir.path().join("rules.toml");
    std::fs::write(&rules, CATCH_ALL).unwrap();
    let rest = format!(
        "[sources.cl]\nsecret = \"{CL_SECRET}\"\n[sinks.archive]\ntype = \"file\"\npath = \"{}\"\n",
        dir.path().join("events.jsonl").display()
    );
    // `rules_file` is a top-level key: before the first table.
    let text = format!(
        "rules_file = \"rules.toml\"\n{}",
        config(dir.path(), NO_LIMITS, &rest)
    );
    let daemon = Daemon::start(dir.path(), &text);
    daemon.accept_cl(&scan_body("before-the-fifo")).await;

    std::fs::remove_file(&rules).unwrap();
    let _fifo = fifo(dir.path(), "rules.toml");
    signal(daemon.pid(), "HUP");
    wait_log(&daemon, "reload failed").await;
    assert!(
        daemon.log().contains("not a regular file"),
        "{}",
        daemon.log()
    );
    let started = std::time::Instant::now();
    assert_eq!(daemon.get_status("/healthz").await, 200);
    daemon.accept_cl(&scan_body("after-the-fifo")).await;
    assert!(started.elapsed() < Duration::from_secs(2));
    wait_lines(&dir.path().join("events.jsonl"), 2).await;
    assert!(daemon.terminate().success(), "SIGTERM stops it");

    // check-config: the FIFO and /dev/zero are refused at once, by name.
    for target in [rules.clone(), "/dev/zero".into()] {
        let text = text.replace(
            "rules_file = \"rules.toml\"",
            &format!("rules_file = \"{}\"", target.display()),
        );
        let path = write_config(dir.path(), &text);
        let (out, took) = check_config(&path);
        let said = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{said}");
        assert!(said.contains("not a regular file"), "{said}");
        assert!(took < Duration::from_secs(5), "{took:?}");
    }
}

/// #23.11: `check-config` was quadratic in the number of problems (2k/4k/8k broken routes:
/// 0.36/1.14/4.78 s). Four times the problems now take about four times as long, and the
/// report lists the first hundred and counts the rest.
#[test]
fn check_config_is_linear_in_its_problems_and_caps_its_report() {
    let dir = tempdir();
    let run = |routes: usize| {
        let mut text = format!(
            "[storage]\npath = \"{}\"\n[sources.cl]\nsecret = \"s\"\n[sinks.a]\ntype = \"log\"\n",
            dir.path().join("x.db").display()
        );
        for i in 0..routes {
            text +=
                &format!("[[routes]]\nname = \"r{i}\"\nevents = [\"*\"]\nsinks = [\"nope{i}\"]\n");
        }
        let path = dir.path().join(format!("c{routes}.toml"));
        std::fs::write(&path, text).unwrap();
        check_config(&path)
    };
    let (small, took_small) = run(2_000);
    let (large, took_large) = run(8_000);
    let said = String::from_utf8_lossy(&large.stderr);
    assert_eq!(large.status.code(), Some(2));
    assert!(said.contains("8000 problem(s)"), "{}", &said[..200]);
    assert!(said.contains("… and 7900 more"), "{said}");
    assert_eq!(
        said.lines().filter(|l| l.contains("unknown sink")).count(),
        100
    );
    assert!(String::from_utf8_lossy(&small.stderr).contains("… and 1900 more"));
    // Quadratic would be 16 times; linear 4, with room for a noisy machine.
    let ratio = took_large.as_secs_f64() / took_small.as_secs_f64();
    assert!(ratio < 8.0, "{took_small:?} → {took_large:?}: {ratio:.1}x");
}

/// #23.2: with `events` locked for 40 s, a delivery was answered 202 after 39 s (its sender,
/// with a 30 s timeout, had given up, and the event was stored behind its back) and `/readyz`
/// stayed 200. Now a request that cannot commit within `storage.busy_timeout` gets 503 with
/// `Retry-After`, nothing is stored, `/readyz` says so, and all is well once the lock goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_postgres_table_answers_503_within_the_bound_and_stores_nothing() {
    let cluster = crate::postgres::shared();
    let url = cluster.database();
    let db = crate::postgres::database_name(&url);
    let dir = tempdir();
    std::fs::write(dir.path().join(PG_MARKER), db).unwrap();
    let text = BACKEND
        .scope(Backend::Postgres, async {
            config(dir.path(), NO_LIMITS, &standard_rest(dir.path()))
        })
        .await
        .replace("lease = \"2s\"", "lease = \"2s\"\nbusy_timeout = \"1s\"");
    let daemon = Daemon::start(dir.path(), &text);
    daemon.accept_cl(&scan_body("before-the-lock")).await;

    let mut lock = cluster.psql_in_background(
        db,
        "BEGIN; LOCK TABLE events IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(3); COMMIT;",
    );
    // The lock taken before the sends, however slow psql is to start.
    eventually(|| {
        let held = cluster.psql(
            db,
            "SELECT count(*) FROM pg_locks WHERE relation = 'events'::regclass
             AND mode = 'AccessExclusiveLock' AND granted",
        );
        (held == "1\n").then_some(()).ok_or(held)
    })
    .await;
    let sends = (0..3).map(|i| {
        let daemon = &daemon;
        async move {
            let asked = std::time::Instant::now();
            let reply = daemon.post_cl(&scan_body(&format!("during-{i}"))).await;
            (reply, asked.elapsed())
        }
    });
    for (reply, took) in futures_util::future::join_all(sends).await {
        assert_eq!((reply.status, reply.error()), (503, "storage_unavailable"));
        assert!(reply.headers.contains_key("retry-after"));
        assert!(took < Duration::from_millis(2500), "{took:?}");
    }
    assert_eq!(daemon.get_status("/readyz").await, 503);
    assert!(lock.wait().unwrap().success());

    // Nothing of the refused requests was stored; their retries are.
    assert_eq!(cluster.psql(db, "SELECT count(*) FROM events"), "1\n");
    daemon.accept_cl(&scan_body("during-0")).await;
    assert_eq!(daemon.get_status("/readyz").await, 200);
    assert_eq!(
        cluster.psql(
            db,
            "SELECT string_agg(delivery_id, ' ' ORDER BY id) FROM events"
        ),
        "before-the-lock during-0\n"
    );
}

on_both_backends!(a_sink_forwarding_into_its_own_daemon_stops_after_four_hops);
/// #23.8: an http sink signing into its own daemon's source turned one event into 571 in 8 s.
/// Forwards carry their hop count; past `MAX_HOPS` (4) the forward is a dead letter saying
/// why, and a delivery whose header claims more is refused.
async fn a_sink_forwarding_into_its_own_daemon_stops_after_four_hops() {
    let dir = tempdir();
    let whsec = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    // The sink's URL is only known once the daemon listens: a fixed free port instead.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let rest = format!(
        "[sources.cl]\nsecret = \"{CL_SECRET}\"\n\n[sources.fwd]\nscheme = \"standard-webhooks\"\nsecret = \"{whsec}\"\n\n\
         [sinks.loop]\ntype = \"http\"\nurl = \"http://127.0.0.1:{port}/hooks/fwd\"\nsign = {{ value = \"{whsec}\" }}\n\n{}",
        route_all(&["loop"])
    );
    let text =
        config(dir.path(), NO_LIMITS, &rest).replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
    let daemon = Daemon::start(dir.path(), &text);
    daemon.accept_cl(&scan_body("goes-round")).await;
    wait_jobs(&daemon, "dead", 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(daemon.event_count(), 5, "the original and four forwards");
    assert_eq!(
        jobs(&daemon).get("succeeded"),
        Some(&4),
        "{:?}",
        jobs(&daemon)
    );
    let reason = daemon
        .deliveries()
        .into_iter()
        .find(|row| row.status == hookroute::store::admin::RowStatus::Dead)
        .and_then(|row| row.detail)
        .unwrap_or_default();
    assert!(reason.contains("forwarding loop"), "{reason}");

    // A delivery claiming too many hops, or a malformed count, is refused and stores nothing.
    for (hops, code) in [
        ("5", "forwarding_loop"),
        ("x", "invalid_hops"),
        ("04", "invalid_hops"),
    ] {
        let body = scan_body(&format!("claims-{hops}"));
        let reply = daemon
            .post(
                "/hooks/cl",
                &body,
                &[
                    ("x-compliancelayer-signature", hmac_hex(CL_SECRET, &[&body])),
                    ("x-hookroute-hops", hops.to_owned()),
                ],
            )
            .await;
        assert_eq!((reply.status, reply.error()), (400, code), "{hops}");
    }
    assert_eq!(daemon.event_count(), 5);
}
