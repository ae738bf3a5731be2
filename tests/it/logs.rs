//! Log lines an operator can search: in both formats every line about an event names the
//! event, and every line about a job names the job, its event, sink and route.

use crate::harness::*;

/// A daemon with a file sink that works and an http sink that cannot connect, on `format`.
async fn run(format: &str) -> (tempfile::TempDir, Vec<String>) {
    let dir = tempdir();
    let rest = format!(
        "[log]\nformat = \"{format}\"\n\n[sources.cl]\nsecret = \"{CL_SECRET}\"\n\n[sinks.archive]\ntype = \"file\"\npath = \"{}\"\n\n[sinks.gone]\ntype = \"http\"\nurl = \"http://127.0.0.1:1/in\"\ndelivery = {{ retry = {{ max_attempts = 1 }} }}\n\n[[routes]]\nname = \"scans\"\nevents = [\"scan.*\"]\nsinks = [\"archive\", \"gone\"]\n\n[[routes]]\nname = \"versions\"\nevents = [\"policy.*\"]\nwhen = \"data.version > 2\"\nsinks = [\"archive\"]\n",
        dir.path().join("events.jsonl").display()
    );
    // No RUST_LOG: the default filter.
    let path = write_config(dir.path(), &config(dir.path(), NO_LIMITS, &rest));
    let daemon = Daemon::start_with(dir.path(), &path, &[("RUST_LOG", "")]);
    daemon.accept_cl(&scan_body("logged")).await;
    daemon
        .accept_cl(br#"{"id": "nowhere", "type": "policy.created"}"#)
        .await;
    wait_jobs(&daemon, "dead", 1).await;
    // Lines are written by a thread of their own: wait for them, not only for the database.
    let log = eventually(|| {
        let log = daemon.log();
        let all = [
            "delivery accepted",
            "no route matched",
            "route condition could not be evaluated",
            "dead letter",
        ]
        .iter()
        .all(|line| log.contains(line));
        if all { Ok(log) } else { Err(log) }
    })
    .await;
    drop(daemon);
    (dir, log.lines().map(str::to_owned).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lines_carry_the_ids_of_events_and_jobs() {
    let (_dir, lines) = run("json").await;
    let parsed: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let find = |message: &str| {
        parsed
            .iter()
            .find(|l| l["message"] == message)
            .unwrap_or_else(|| panic!("no {message:?} line in {lines:#?}"))
    };
    let accepted = find("delivery accepted");
    assert_eq!(accepted["level"], "INFO");
    assert_eq!(accepted["delivery_id"], "logged");
    assert_eq!(accepted["source"], "cl");
    assert!(accepted["event_id"].is_number(), "{accepted}");
    let unrouted = find("no route matched");
    assert_eq!(unrouted["delivery_id"], "nowhere");
    assert!(unrouted["event_id"].is_number());
    // The policy event has no `data`: the route's condition cannot be evaluated, and says so.
    let unevaluated = find("route condition could not be evaluated");
    assert_eq!(unevaluated["level"], "INFO");
    assert_eq!(unevaluated["route"], "versions");
    assert_eq!(unevaluated["event_id"], unrouted["event_id"]);
    assert!(
        unevaluated["reason"]
            .as_str()
            .is_some_and(|r| !r.is_empty()),
        "{unevaluated}"
    );
    let dead = find("delivery failed for good (dead letter)");
    for key in ["job_id", "event_id"] {
        assert!(dead[key].is_number(), "{key}: {dead}");
    }
    assert_eq!(
        (&dead["sink"], &dead["route"]),
        (&"gone".into(), &"scans".into())
    );
    // The default filter keeps the libraries' chatter out.
    assert!(
        parsed
            .iter()
            .all(|l| l["level"] != "DEBUG" && l["level"] != "TRACE"),
        "{lines:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_lines_carry_the_same_fields() {
    let (_dir, lines) = run("text").await;
    let accepted = lines
        .iter()
        .find(|l| l.contains("delivery accepted"))
        .expect("an accepted line");
    for field in ["event_id=", "delivery_id=logged", "source=cl"] {
        assert!(accepted.contains(field), "{field} missing: {accepted}");
    }
    let dead = lines
        .iter()
        .find(|l| l.contains("dead letter"))
        .expect("a dead-letter line");
    for field in ["job_id=", "event_id=", "sink=gone", "route=scans"] {
        assert!(dead.contains(field), "{field} missing: {dead}");
    }
}

#[tokio::test]
async fn the_format_can_come_from_the_environment() {
    let dir = tempdir();
    let path = write_config(
        dir.path(),
        &config(dir.path(), NO_LIMITS, &standard_rest(dir.path())),
    );
    let daemon = Daemon::start_with(dir.path(), &path, &[("HOOKROUTE_LOG__FORMAT", "json")]);
    daemon.accept_cl(&scan_body("env")).await;
    let log = wait_log(&daemon, "delivery accepted").await;
    assert!(log.lines().count() >= 2, "{log}");
    for line in log.lines() {
        let line: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            line["timestamp"].is_string() && line["message"].is_string(),
            "{line}"
        );
    }
}

/// #24.6: a `[log]` change on SIGHUP was accepted and silently ignored; it is said to wait
/// for the restart, as `[server]` changes are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_format_change_on_reload_is_said_to_wait_for_a_restart() {
    let dir = tempdir();
    let text = config(dir.path(), NO_LIMITS, &standard_rest(dir.path()));
    let daemon = Daemon::start(dir.path(), &format!("[log]\nformat = \"text\"\n{text}"));
    std::fs::write(
        &daemon.config_path,
        format!("[log]\nformat = \"json\"\n{text}"),
    )
    .unwrap();
    signal(daemon.pid(), "HUP");
    let log = wait_log(&daemon, "configuration reloaded").await;
    assert!(
        log.contains("[log] changes take effect at the next restart"),
        "{log}"
    );
}
