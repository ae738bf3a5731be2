//! Routing through the running daemon: globs, CEL conditions on both payload shapes, missing
//! fields, continue and first match, throttles, unrouted events, templates, route-test, and
//! reload on SIGHUP.

use std::path::Path;
use std::process::Command;

use crate::harness::*;

const SCORECARD_TOKEN: &str = "scorecard-token";

/// Sources `cl` and `scorecard`, four file sinks `a`..`d` and a `console` log sink.
fn sinks_and_sources(dir: &Path) -> String {
    let mut text = format!(
        "[sources.cl]\nsecret = \"{CL_SECRET}\"\n\n[sources.scorecard]\nscheme = \"token\"\nsecret = \"{SCORECARD_TOKEN}\"\n\n[sinks.console]\ntype = \"log\"\n"
    );
    for name in ["a", "b", "c", "d"] {
        text += &format!(
            "\n[sinks.{name}]\ntype = \"file\"\npath = \"{}\"\n",
            dir.join(format!("{name}.jsonl")).display()
        );
    }
    text
}

/// The delivery ids a file sink received, sorted (sinks deliver concurrently).
fn ids_in(dir: &Path, sink: &str) -> Vec<String> {
    let text = std::fs::read_to_string(dir.join(format!("{sink}.jsonl"))).unwrap_or_default();
    let mut ids: Vec<String> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["delivery_id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    ids.sort();
    ids
}

/// Waits until `events` events are stored (routed in the same transaction) and no delivery
/// is outstanding.
async fn wait_dispatched(daemon: &Daemon, events: i64) {
    let (routed, _) = eventually(|| {
        let open = jobs(daemon)
            .iter()
            .filter(|(status, _)| !["succeeded", "dead"].contains(&status.as_str()))
            .map(|(_, n)| n)
            .sum::<i64>();
        let counts = (daemon.event_count() as i64, open);
        match counts {
            (routed, 0) if routed >= events => Ok(counts),
            _ => Err(format!(
                "(routed, open jobs) = {counts:?}\n{}",
                daemon.log()
            )),
        }
    })
    .await;
    assert_eq!(routed, events, "{}", daemon.log());
}

async fn post_scorecard(daemon: &Daemon, body: &[u8]) -> Reply {
    daemon
        .post(
            "/hooks/scorecard",
            body,
            &[("x-webhook-token", SCORECARD_TOKEN.to_owned())],
        )
        .await
}

/// Every routing outcome as `deliveries list` shows it: delivery id, route, sink, status.
fn statuses(daemon: &Daemon) -> Vec<(String, Option<String>, Option<String>, String)> {
    daemon
        .deliveries()
        .into_iter()
        .map(|row| {
            (
                row.delivery_id,
                row.route,
                row.sink,
                row.status.as_str().to_owned(),
            )
        })
        .collect()
}

/// The throttle key of the one suppressed routing outcome.
fn suppressed_key(daemon: &Daemon) -> String {
    let rows = daemon.deliveries();
    let mut suppressed = rows
        .iter()
        .filter(|row| row.status.as_str() == "suppressed");
    let key = suppressed.next().and_then(|row| row.detail.clone());
    assert!(suppressed.next().is_none(), "one suppressed: {rows:?}");
    key.expect("a suppressed outcome with its key")
}

on_both_backends!(globs_conditions_continue_and_first_match);

async fn globs_conditions_continue_and_first_match() {
    let dir = tempdir();
    let routes = r#"
[[routes]]
name = "failing scans"
events = ["scan.completed"]
sources = ["cl"]
when = "data.score < 70 || data.grade in ['D', 'F']"
sinks = ["a"]
continue = true

[[routes]]
name = "scans"
events = ["scan.*"]
sinks = ["b"]

[[routes]]
name = "client456 policies"
events = ["policy.*"]
sources = ["scorecard"]
when = "data.client_id == 'client456' && type != 'policy.rejected'"
sinks = ["c"]

[[routes]]
name = "the rest"
events = ["*"]
sinks = ["d"]
"#;
    let daemon = Daemon::start(
        dir.path(),
        &config(
            dir.path(),
            NO_LIMITS,
            &(sinks_and_sources(dir.path()) + routes),
        ),
    );
    let scan = |id: &str, data: &str| {
        format!(r#"{{"id": "{id}", "type": "scan.completed", "created_at": "2026-03-08T12:00:00Z", "data": {data}}}"#).into_bytes()
    };
    for body in [
        scan(
            "failing",
            r#"{"domain": "a.com", "score": 61, "grade": "D"}"#,
        ),
        scan(
            "graded-f",
            r#"{"domain": "b.com", "score": 75, "grade": "F"}"#,
        ),
        scan(
            "passing",
            r#"{"domain": "c.com", "score": 92, "grade": "A"}"#,
        ),
        scan("no-data", "null"),
        scan("no-score", r#"{"domain": "d.com"}"#),
        br#"{"id": "alert", "type": "alert.triggered", "data": {"severity": "high"}}"#.to_vec(),
        br#"{"id": "future", "type": "certificate.expiring"}"#.to_vec(),
    ] {
        daemon.accept_cl(&body).await;
    }
    let policy = sample("scorecard-policy.published.json");
    assert_eq!(post_scorecard(&daemon, &policy).await.status, 202);
    let other_client = br#"{"event": "policy.approved", "timestamp": "2025-02-21T00:00:00Z", "data": {"client_id": "client999"}}"#;
    assert_eq!(post_scorecard(&daemon, other_client).await.status, 202);
    let rejected = br#"{"event": "policy.rejected", "data": {"client_id": "client456"}}"#;
    assert_eq!(post_scorecard(&daemon, rejected).await.status, 202);
    // The same failing scan from another source is not the `cl`-only route's business.
    let from_scorecard = scan("scorecard-scan", r#"{"score": 10}"#);
    assert_eq!(post_scorecard(&daemon, &from_scorecard).await.status, 202);
    wait_dispatched(&daemon, 11).await;

    let dir = dir.path();
    assert_eq!(ids_in(dir, "a"), ["failing", "graded-f"]);
    assert_eq!(
        ids_in(dir, "b"),
        [
            "failing",
            "graded-f",
            "no-data",
            "no-score",
            "passing",
            "scorecard-scan"
        ]
    );
    assert_eq!(ids_in(dir, "c").len(), 1, "only the client456 policy");
    let rest = ids_in(dir, "d");
    assert_eq!(rest.len(), 4, "{rest:?}");
    assert!(rest.contains(&"alert".to_owned()) && rest.contains(&"future".to_owned()));
    // Every file line names the route that sent it.
    let line = std::fs::read_to_string(dir.join("a.jsonl")).unwrap();
    assert!(line.contains(r#""route":"failing scans""#), "{line}");
    let delivered = statuses(&daemon)
        .iter()
        .filter(|s| s.3 == "succeeded")
        .count();
    assert_eq!(delivered, 2 + 6 + 1 + 4);
}

on_both_backends!(unrouted_events_are_stored_and_recorded);

async fn unrouted_events_are_stored_and_recorded() {
    let dir = tempdir();
    let routes =
        "[[routes]]\nname = \"scans only\"\nevents = [\"scan.completed\"]\nsinks = [\"a\"]\n";
    let daemon = Daemon::start(
        dir.path(),
        &config(
            dir.path(),
            NO_LIMITS,
            &(sinks_and_sources(dir.path()) + routes),
        ),
    );
    let alert = sample("compliancelayer-alert.triggered.json");
    daemon.accept_cl(&alert).await;
    wait_dispatched(&daemon, 1).await;
    let recorded = statuses(&daemon);
    assert_eq!(
        recorded,
        [(
            "550e8400-e29b-41d4-a716-446655440001".to_owned(),
            None,
            None,
            "unrouted".to_owned()
        )]
    );
    assert_eq!(daemon.event_count(), 1);
    assert!(ids_in(dir.path(), "a").is_empty());
    // The operator sees it too.
    let out = Command::new(BIN)
        .args(["deliveries", "list", "--status", "unrouted", "--config"])
        .arg(&daemon.config_path)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.lines()
            .any(|l| l.contains("alert.triggered") && l.contains("unrouted")),
        "{out}"
    );
    // Unrouted families are pointed out at start-up.
    assert!(
        daemon.log().contains("no route matches alert.triggered"),
        "{}",
        daemon.log()
    );
}

on_both_backends!(throttle_windows_follow_the_events_clock_and_survive_restarts);

/// A configuration routing scans to sink `a`, throttled per `data.domain` for an hour.
fn throttled_per_domain(dir: &Path) -> String {
    let routes = r#"
[[routes]]
name = "per domain"
events = ["scan.completed"]
sinks = ["a"]
throttle = { window = "1h", key = "data.domain" }
"#;
    config(dir, NO_LIMITS, &(sinks_and_sources(dir) + routes))
}

/// A scan of `domain` (raw JSON string content) at `at`, the events' clock: tests of windows
/// need no sleeping.
fn scan(id: &str, domain: &str, at: &str) -> Vec<u8> {
    format!(r#"{{"id": "{id}", "type": "scan.completed", "created_at": "{at}", "data": {{"domain": "{domain}"}}}}"#)
        .into_bytes()
}

async fn throttle_windows_follow_the_events_clock_and_survive_restarts() {
    let dir = tempdir();
    let text = throttled_per_domain(dir.path());
    let daemon = Daemon::start(dir.path(), &text);
    for body in [
        scan("first", "a.com", "2026-03-08T12:00:00Z"),
        scan("same-window", "a.com", "2026-03-08T12:10:00Z"),
        scan("other-key", "b.com", "2026-03-08T12:10:00Z"),
        scan("next-window", "a.com", "2026-03-08T13:00:00Z"),
    ] {
        daemon.accept_cl(&body).await;
    }
    wait_dispatched(&daemon, 4).await;
    assert_eq!(
        ids_in(dir.path(), "a"),
        ["first", "next-window", "other-key"]
    );
    let suppressed: Vec<_> = statuses(&daemon)
        .into_iter()
        .filter(|s| s.3 == "suppressed")
        .collect();
    assert_eq!(
        suppressed,
        [(
            "same-window".to_owned(),
            Some("per domain".to_owned()),
            None,
            "suppressed".to_owned()
        )]
    );
    assert_eq!(suppressed_key(&daemon), "a.com");
    assert_eq!(daemon.terminate().code(), Some(0));

    // The window opened at 13:00 is still open after a restart.
    let daemon = Daemon::start(dir.path(), &text);
    daemon
        .accept_cl(&scan("after-restart", "a.com", "2026-03-08T13:30:00Z"))
        .await;
    wait_dispatched(&daemon, 5).await;
    assert_eq!(ids_in(dir.path(), "a").len(), 3);
    // Regression: the start-up prune once aged windows by the wall clock, deleting these
    // (on the events' clock, March) before the dispatcher could load them.
    assert_eq!(daemon.count("throttles"), 2);
}

on_both_backends!(a_throttle_key_holding_a_nul_throttles_like_any_other);

/// A throttle key comes from the payload, where JSON may spell a NUL; PostgreSQL keeps none in
/// text (every such event was a 503 there), so the key keeps it as U+FFFD on both backends.
async fn a_throttle_key_holding_a_nul_throttles_like_any_other() {
    let dir = tempdir();
    let daemon = Daemon::start(dir.path(), &throttled_per_domain(dir.path()));
    for id in ["nul-first", "nul-again"] {
        daemon
            .accept_cl(&scan(id, "a\\u0000.com", "2026-03-08T12:00:00Z"))
            .await;
    }
    wait_dispatched(&daemon, 2).await;
    assert_eq!(ids_in(dir.path(), "a"), ["nul-first"]);
    assert_eq!(suppressed_key(&daemon), "a\u{FFFD}.com");
}

#[tokio::test]
async fn templates_render_into_the_log_sink() {
    let dir = tempdir();
    let routes = r#"
[[routes]]
name = "alerts"
events = ["alert.triggered"]
sinks = ["console"]

[[routes]]
name = "scans"
events = ["scan.completed"]
sinks = ["console"]
templates = { log = "scan-line" }

[templates.scan-line]
text = "SCAN {{ data.domain | upper }} {{ data.grade }} {{ data.nothing.deeper }}|"
"#;
    let daemon = Daemon::start(
        dir.path(),
        &config(
            dir.path(),
            NO_LIMITS,
            &(sinks_and_sources(dir.path()) + routes),
        ),
    );
    daemon
        .accept_cl(&sample("compliancelayer-alert.triggered.json"))
        .await;
    daemon
        .accept_cl(&sample("compliancelayer-scan.completed.json"))
        .await;
    wait_log(
        &daemon,
        "Alert [HIGH] example.com: Security score dropped from 85 to 61",
    )
    .await;
    // Missing fields render as nothing rather than failing the template.
    wait_log(&daemon, "SCAN EXAMPLE.COM B |").await;
}

#[test]
fn route_test_explains_and_sets_the_exit_code() {
    let dir = tempdir();
    let routes = r#"
[[routes]]
name = "failing scans"
events = ["scan.completed"]
when = "data.score < 70"
sinks = ["console"]
throttle = { window = "1h", key = "data.domain" }

[[routes]]
name = "policies"
events = ["policy.*"]
sinks = ["console", "a"]
"#;
    let path = write_config(
        dir.path(),
        &config(
            dir.path(),
            NO_LIMITS,
            &(sinks_and_sources(dir.path()) + routes),
        ),
    );
    let event = dir.path().join("event.json");
    let run = |body: &str, source: &[&str]| {
        std::fs::write(&event, body).unwrap();
        let out = Command::new(BIN)
            .arg("route-test")
            .arg("--config")
            .arg(&path)
            .args(source)
            .arg(&event)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };

    let (code, out) = run(
        r#"{"type": "scan.completed", "data": {"domain": "x.com", "score": 40, "grade": "F"}}"#,
        &[],
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("1. \"failing scans\": MATCHED (when `data.score < 70` is true)"),
        "{out}"
    );
    assert!(
        out.contains("throttle: first event per key \"x.com\""),
        "{out}"
    );
    assert!(
        out.contains("| Scan completed: x.com graded F (40/100, high risk)"),
        "{out}"
    );
    assert!(out.contains("2. \"policies\": not reached"), "{out}");
    assert!(
        !out.contains("issues:"),
        "no issue counts, no issues line: {out}"
    );

    let (code, out) = run(
        r#"{"type": "scan.completed", "data": {"domain": "x.com"}}"#,
        &[],
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("no match: when `data.score < 70` cannot evaluate: No such key: score"),
        "{out}"
    );
    assert!(out.contains("no route matched"), "{out}");

    let (code, out) = run(
        &String::from_utf8(sample("scorecard-policy.published.json")).unwrap(),
        &["--source", "scorecard"],
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("-> console (log):\n      | Policy published: Updated Security Policy (v2.1)"),
        "{out}"
    );
    assert!(out.contains("-> a (file):"), "{out}");
    // Nothing was sent: the sinks' files do not exist.
    assert!(!dir.path().join("a.jsonl").exists());

    let (code, out) = run("[1, 2]", &[]);
    assert_eq!(code, Some(2), "{out}");
    let (code, out) = run("{\"type\": \"x\"}", &["--source", "nope"]);
    assert_eq!(code, Some(2), "{out}");
}

#[test]
fn check_config_reports_route_problems_with_positions() {
    let dir = tempdir();
    let routes = r#"
[[routes]]
name = "typos"
events = ["scan.["]
sinks = ["ops-slak"]
sources = ["nowhere"]
when = "data.score <"
templates = { slack = "missing" }

[[routes]]
name = "typos"
events = ["*"]
sinks = ["console"]
templates = { log = "missing" }
throttle = { window = "1h", key = "data." }

[templates.broken]
text = "{% if %}"
"#;
    let path = write_config(
        dir.path(),
        &config(
            dir.path(),
            NO_LIMITS,
            &(sinks_and_sources(dir.path()) + routes),
        ),
    );
    let out = Command::new(BIN)
        .arg("check-config")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{text}");
    for needle in [
        "routes[0] (\"typos\").sinks[0]: unknown sink \"ops-slak\"",
        "routes[0] (\"typos\").sources[0]: unknown source \"nowhere\"",
        "routes[0] (\"typos\").events[0]",
        "routes[0] (\"typos\").when: line 1, column",
        "routes[0] (\"typos\").templates.slack: none of this route's sinks is of type \"slack\"",
        "routes[1] (\"typos\"): another route has the same name",
        "routes[1] (\"typos\").templates.log: no template named \"missing\"",
        "routes[1] (\"typos\").throttle.key",
        "templates.broken",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }
}

#[tokio::test]
async fn reload_applies_a_valid_config_and_keeps_running_on_an_invalid_one() {
    let dir = tempdir();
    let rules = dir.path().join("rules.toml");
    let route_to = |sink: &str| {
        format!("[[routes]]\nname = \"all\"\nevents = [\"*\"]\nsinks = [\"{sink}\"]\n")
    };
    std::fs::write(&rules, route_to("a")).unwrap();
    let text = config(
        dir.path(),
        NO_LIMITS,
        &(sinks_and_sources(dir.path()) + "rules_file = \"rules.toml\"\n"),
    );
    // rules_file is a top-level key: it must come before the first table.
    let text = format!(
        "rules_file = \"rules.toml\"\n{}",
        text.replace("rules_file = \"rules.toml\"\n", "")
    );
    let daemon = Daemon::start(dir.path(), &text);
    daemon.accept_cl(&scan_body("before")).await;
    wait_dispatched(&daemon, 1).await;

    // A valid change: new routes, and a rotated secret.
    std::fs::write(&rules, route_to("b")).unwrap();
    let rotated = std::fs::read_to_string(&daemon.config_path)
        .unwrap()
        .replace(CL_SECRET, "whsec_rotated");
    std::fs::write(&daemon.config_path, rotated).unwrap();
    signal(daemon.pid(), "HUP");
    wait_log(&daemon, "configuration reloaded").await;
    assert_eq!(daemon.post_cl(&scan_body("old-secret")).await.status, 401);
    let body = scan_body("after");
    let signed = [(
        "x-compliancelayer-signature",
        hmac_hex("whsec_rotated", &[&body]),
    )];
    assert_eq!(daemon.post("/hooks/cl", &body, &signed).await.status, 202);
    wait_dispatched(&daemon, 2).await;
    assert_eq!(ids_in(dir.path(), "a"), ["before"]);
    assert_eq!(ids_in(dir.path(), "b"), ["after"]);

    // An invalid change is refused; the running configuration stays.
    std::fs::write(
        &rules,
        "[[routes]]\nname = \"broken\"\nevents = [\"*\"]\nsinks = [\"b\"]\nwhen = \"data.(\"\n",
    )
    .unwrap();
    signal(daemon.pid(), "HUP");
    wait_log(&daemon, "reload failed, keeping the running configuration").await;
    assert!(
        daemon.log().contains("routes[0] (\"broken\").when"),
        "{}",
        daemon.log()
    );
    let body = scan_body("still-b");
    let signed = [(
        "x-compliancelayer-signature",
        hmac_hex("whsec_rotated", &[&body]),
    )];
    assert_eq!(daemon.post("/hooks/cl", &body, &signed).await.status, 202);
    wait_dispatched(&daemon, 3).await;
    assert_eq!(ids_in(dir.path(), "b"), ["after", "still-b"]);
}

/// `route-test` shows what each sink gets: an exec hook gets the event as JSON, not the
/// rendered message (the capability is asked of the sink, in one place).
#[test]
fn route_test_shows_what_each_kind_of_sink_gets() {
    let dir = tempdir();
    let rest = format!(
        "[sources.cl]\nsecret = \"{CL_SECRET}\"\n\n[sinks.hook]\ntype = \"exec\"\ncommand = [\"/bin/true\"]\n\n[sinks.console]\ntype = \"log\"\n\n{}",
        "[[routes]]\nname = \"all\"\nevents = [\"*\"]\nsinks = [\"hook\", \"console\"]\n"
    );
    let path = write_config(dir.path(), &config(dir.path(), NO_LIMITS, &rest));
    let event = dir.path().join("event.json");
    std::fs::write(&event, sample("compliancelayer-scan.completed.json")).unwrap();
    let (_, out) = route_test(&path, &event);
    let hook = out.split("-> hook (exec):").nth(1).unwrap();
    let hook = hook.split("-> console").next().unwrap();
    assert_eq!(
        hook.trim(),
        "runs the hook with the event as JSON on stdin",
        "{out}"
    );
    assert!(
        out.contains("-> console (log):\n      | Scan completed: example.com"),
        "{out}"
    );
}

/// Without `--source`, an event is shown from every source, since routes may name sources:
/// a Scorecard sample is not reported as if ComplianceLayer had sent it.
#[test]
fn route_test_without_a_source_shows_every_source() {
    let dir = tempdir();
    let rest = format!(
        "[sources.cl]\nsecret = \"{CL_SECRET}\"\n\n[sources.scorecard]\nscheme = \"token\"\nsecret = \"t0ken\"\n\n[sinks.console]\ntype = \"log\"\n\n[[routes]]\nname = \"scorecard policies\"\nevents = [\"policy.*\"]\nsources = [\"scorecard\"]\nsinks = [\"console\"]\n"
    );
    let path = write_config(dir.path(), &config(dir.path(), NO_LIMITS, &rest));
    let event = dir.path().join("event.json");
    std::fs::write(&event, sample("scorecard-policy.published.json")).unwrap();
    let (code, text) = route_test(&path, &event);
    assert_eq!(code, Some(0), "{text}");
    let from_cl = text.find("from cl ").expect("shown from cl");
    let from_scorecard = text.find("from scorecard ").expect("shown from scorecard");
    assert!(from_cl < from_scorecard, "{text}");
    assert!(
        text[from_cl..from_scorecard].contains("no match: source \"cl\""),
        "{text}"
    );
    assert!(text[from_scorecard..].contains("MATCHED"), "{text}");
}

/// `hookroute route-test` on `event` under the configuration at `path`: its exit code and
/// what it printed.
fn route_test(path: &std::path::Path, event: &std::path::Path) -> (Option<i32>, String) {
    let out = Command::new(BIN)
        .args(["route-test", "--config"])
        .arg(path)
        .arg(event)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}
