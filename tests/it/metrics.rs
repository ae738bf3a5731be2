//! `GET /metrics` against the real daemon, read back with a real Prometheus parser (the Python
//! client's, from Debian's `python3-prometheus-client`): the values follow what was sent.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::harness::*;

/// The samples of a scrape, by name and labels (`name{a="1",b="2"}`, labels sorted), as the
/// Prometheus client library parses them.
fn parse(text: &str) -> HashMap<String, f64> {
    let script = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
samples = {}
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
        samples[f"{s.name}{{{labels}}}"] = s.value
print(json.dumps(samples))
"#;
    let mut child = Command::new("/usr/bin/python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 with prometheus_client (tests/run.sh installs it)");
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the Prometheus parser refused the scrape: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `promtool check metrics` on a scrape: the exposition format and Prometheus's naming rules.
/// CI installs promtool (Debian's `prometheus`) and so requires it; elsewhere it is used when
/// present.
fn promtool_check(text: &str) {
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(_) if std::env::var_os("CI").is_none() => return,
        Err(err) => panic!("promtool is required in CI: {err}"),
    };
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn scrape(daemon: &Endpoint) -> (u16, String, String) {
    let response = daemon
        .client
        .get(daemon.url("/metrics"))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, content_type, response.text().await.unwrap())
}

on_both_backends!(metrics_follow_what_was_sent_and_delivered);

async fn metrics_follow_what_was_sent_and_delivered() {
    let dir = tempdir();
    let stuck = fifo(dir.path(), "stuck.fifo");
    let rest = format!(
        r#"[sources.cl]
secret = "{CL_SECRET}"

[sinks.archive]
type = "file"
path = "{}"

[sinks.stuck]
type = "file"
path = "{}"

[sinks.gone]
type = "http"
url = "http://127.0.0.1:1/in"
delivery = {{ retry = {{ max_attempts = 1 }} }}

[[routes]]
name = "all"
events = ["*"]
sinks = ["archive", "stuck", "gone"]
"#,
        dir.path().join("events.jsonl").display(),
        stuck.display()
    );
    let daemon = Daemon::start(dir.path(), &config(dir.path(), NO_LIMITS, &rest));
    daemon.accept_cl(&scan_body("m-1")).await;
    daemon.accept_cl(&scan_body("m-2")).await;
    assert_eq!(daemon.post_cl(&scan_body("m-1")).await.status, 200);
    let forged = [("x-compliancelayer-signature", "0".repeat(64))];
    assert_eq!(
        daemon
            .post("/hooks/cl", &scan_body("m-3"), &forged)
            .await
            .status,
        401
    );
    assert_eq!(daemon.post("/hooks/nowhere", b"{}", &[]).await.status, 404);
    wait_lines(&dir.path().join("events.jsonl"), 2).await;
    // Counted before they are recorded: once recorded, counted.
    wait_jobs(&daemon, "succeeded", 2).await;
    wait_jobs(&daemon, "dead", 2).await;

    let (status, content_type, text) = scrape(&daemon).await;
    assert_eq!(status, 200);
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    promtool_check(&text);
    let samples = parse(&text);
    let value = |key: &str| {
        *samples
            .get(key)
            .unwrap_or_else(|| panic!("{key} missing from\n{text}"))
    };
    assert_eq!(
        value(r#"hookroute_requests_total{source="cl",status="202"}"#),
        2.0
    );
    assert_eq!(
        value(r#"hookroute_requests_total{source="cl",status="200"}"#),
        1.0
    );
    assert_eq!(
        value(r#"hookroute_requests_total{source="cl",status="401"}"#),
        1.0
    );
    assert_eq!(
        value(r#"hookroute_requests_total{source="unknown",status="404"}"#),
        1.0
    );
    assert_eq!(
        value(r#"hookroute_signature_failures_total{reason="invalid_signature",source="cl"}"#),
        1.0
    );
    assert_eq!(
        value(r#"hookroute_events_accepted_total{source="cl"}"#),
        2.0
    );
    assert_eq!(
        value(r#"hookroute_events_duplicate_total{source="cl"}"#),
        1.0
    );
    assert_eq!(value("hookroute_ingest_duration_seconds_count{}"), 3.0);
    assert_eq!(
        value(r#"hookroute_deliveries_total{outcome="succeeded",sink="archive"}"#),
        2.0
    );
    assert_eq!(
        value(r#"hookroute_deliveries_total{outcome="dead",sink="gone"}"#),
        2.0
    );
    assert!(value(r#"hookroute_attempt_duration_seconds_count{sink="archive"}"#) >= 1.0);
    // The stuck sink's jobs wait: one is being attempted (blocked on the FIFO), both count.
    assert_eq!(value(r#"hookroute_jobs_waiting{sink="stuck"}"#), 2.0);
    assert!(value(r#"hookroute_oldest_waiting_seconds{sink="stuck"}"#) >= 0.0);
    assert_eq!(value(r#"hookroute_dead_letters{sink="gone"}"#), 2.0);
    assert_eq!(
        value(&format!(
            r#"hookroute_build_info{{version="{}"}}"#,
            env!("CARGO_PKG_VERSION")
        )),
        1.0
    );
    assert_eq!(
        value(r#"hookroute_config_reloads_total{outcome="success"}"#),
        1.0
    );
    assert!(value("hookroute_config_last_reload_success_timestamp_seconds{}") > 1.7e9);
    assert!(value("hookroute_database_size_bytes{}") > 4096.0);

    // A reload that fails is counted, and the last success stays.
    std::fs::write(&daemon.config_path, "not toml [").unwrap();
    signal(daemon.pid(), "HUP");
    eventually(|| {
        let samples = parse(&futures_block(scrape(&daemon)).2);
        match samples.get(r#"hookroute_config_reloads_total{outcome="failure"}"#) {
            Some(n) if *n == 1.0 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}

/// Runs a future to completion from synchronous code inside the test's runtime.
fn futures_block<F: std::future::Future>(future: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(future))
}

#[tokio::test]
async fn metrics_can_be_limited_to_some_addresses_or_turned_off() {
    let dir = tempdir();
    let only_elsewhere = format!(
        "[metrics]\nallowed_ips = [\"10.0.0.0/8\"]\n\n{}",
        standard_rest(dir.path())
    );
    let daemon = Daemon::start(dir.path(), &config(dir.path(), NO_LIMITS, &only_elsewhere));
    let (status, _, text) = scrape(&daemon).await;
    assert_eq!(status, 403, "{text}");
    drop(daemon);

    let dir = tempdir();
    let off = format!(
        "[metrics]\nenabled = false\n\n{}",
        standard_rest(dir.path())
    );
    let daemon = Daemon::start(dir.path(), &config(dir.path(), NO_LIMITS, &off));
    assert_eq!(scrape(&daemon).await.0, 404);
}

/// The alert rules docs/operations.md offers.
fn documented_rules() -> String {
    let page = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operations.md"))
        .unwrap();
    page.split("```yaml\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("a yaml block of alert rules in docs/operations.md")
        .to_owned()
}

/// The summary `alert` of `rules` gives for a series labelled `label=value`, as Prometheus
/// expands it.
fn summary(rules: &str, alert: &str, label: &str, value: &str) -> String {
    let rule = rules
        .split_once(&format!("- alert: {alert}\n"))
        .unwrap_or_else(|| panic!("no rule {alert}"))
        .1;
    let line = rule
        .lines()
        .find_map(|line| line.trim().strip_prefix("summary: \""))
        .and_then(|rest| rest.strip_suffix('"'))
        .unwrap_or_else(|| panic!("{alert} has no summary"));
    line.replace(&format!("{{{{ $labels.{label} }}}}"), value)
}

/// Runs `promtool` with `args` and `files` written into a directory of their own; CI installs
/// promtool (Debian's `prometheus`) and so requires it; elsewhere it is used when present.
fn promtool(args: &[&str], files: &[(&str, &str)]) {
    let dir = tempdir();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    match Command::new("promtool")
        .args(args)
        .current_dir(dir.path())
        .output()
    {
        Ok(out) => assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(_) if std::env::var_os("CI").is_none() => {}
        Err(err) => panic!("promtool is required in CI: {err}"),
    }
}

/// #24.1: `hookroute_dead_letters{sink}` appeared only with a sink's first trouble, so the
/// documented `delta()` alert missed the first dead letter. Now every configured sink's series
/// is there from the start at 0, and the documented rules, fed what the real daemon exported
/// before and after its first dead letter, fire on it (`promtool test rules`) and resolve.
#[tokio::test]
async fn the_documented_alerts_fire_on_the_first_dead_letter() {
    let dir = tempdir();
    let rest = format!(
        r#"[sources.cl]
secret = "{CL_SECRET}"

[sinks.archive]
type = "file"
path = "{}"

[sinks.gone]
type = "http"
url = "http://127.0.0.1:1/in"
delivery = {{ retry = {{ max_attempts = 1 }} }}

[[routes]]
name = "all"
events = ["*"]
sinks = ["gone"]
"#,
        dir.path().join("events.jsonl").display(),
    );
    // In-process: the queue reading is cached for a second of the daemon's clock, stepped.
    let daemon = InProcess::start(dir.path(), &config(dir.path(), NO_LIMITS, &rest)).await;
    let dead = r#"hookroute_deliveries_total{outcome="dead",sink="gone"}"#;
    let paused = r#"hookroute_sink_paused{sink="gone"}"#;
    let before = parse(&scrape(&daemon).await.2);
    // Before anything happened, every configured sink is there, at 0.
    for sink in ["archive", "gone"] {
        for gauge in [
            "dead_letters",
            "jobs_waiting",
            "oldest_waiting_seconds",
            "sink_paused",
        ] {
            let key = format!(r#"hookroute_{gauge}{{sink="{sink}"}}"#);
            assert_eq!(before.get(&key), Some(&0.0), "{key}: {before:?}");
        }
    }
    assert_eq!(
        before.get(r#"hookroute_events_accepted_total{source="cl"}"#),
        Some(&0.0)
    );
    assert_eq!(before.get(dead), Some(&0.0), "{before:?}");

    daemon.accept_cl(&scan_body("first-dead")).await;
    wait_jobs(&daemon, "dead", 1).await;
    daemon.clock.advance(Duration::from_secs(1)); // past the cached queue reading
    let after = parse(&scrape(&daemon).await.2);
    assert_eq!(after.get(dead), Some(&1.0), "{after:?}");
    assert_eq!(
        after.get(r#"hookroute_dead_letters{sink="gone"}"#),
        Some(&1.0)
    );

    // Scraped once a minute: three scrapes before, twenty after.
    let series = |before: f64, after: f64| {
        format!(
            "{before} {before} {before} {}",
            vec![after.to_string(); 20].join(" ")
        )
    };
    let rules = documented_rules();
    let tests = format!(
        r#"rule_files: [rules.yml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: '{dead}'
        values: '{dead_values}'
      - series: 'hookroute_oldest_waiting_seconds{{sink="gone"}}'
        values: '0 0 0 0+60x20'
      - series: 'hookroute_signature_failures_total{{source="cl",reason="invalid_signature"}}'
        values: '0 0 0 0+180x20'
      - series: '{paused}'
        values: '{paused_values}'
      - series: 'hookroute_config_reloads_total{{outcome="failure"}}'
        values: '0 0 0 1x20'
    alert_rule_test:
      - eval_time: 2m
        alertname: HookrouteDeadLetters
        exp_alerts: []
      - eval_time: 4m
        alertname: HookrouteDeadLetters
        exp_alerts:
          - exp_labels: {{ severity: warning, sink: gone, outcome: dead }}
            exp_annotations: {{ summary: "{dead_summary}" }}
      - eval_time: 22m
        alertname: HookrouteDeadLetters
        exp_alerts: []
      - eval_time: 12m
        alertname: HookrouteDeliveryStuck
        exp_alerts: []
      - eval_time: 14m
        alertname: HookrouteDeliveryStuck
        exp_alerts:
          - exp_labels: {{ severity: critical, sink: gone }}
            exp_annotations: {{ summary: "{stuck_summary}" }}
      - eval_time: 2m
        alertname: HookrouteSignatureFailures
        exp_alerts: []
      - eval_time: 10m
        alertname: HookrouteSignatureFailures
        exp_alerts:
          - exp_labels: {{ severity: warning, source: cl }}
            exp_annotations: {{ summary: "{signature_summary}" }}
      - eval_time: 2m
        alertname: HookrouteSinkPaused
        exp_alerts: []
      - eval_time: 4m
        alertname: HookrouteSinkPaused
        exp_alerts:
          - exp_labels: {{ severity: critical, sink: gone }}
            exp_annotations: {{ summary: "{paused_summary}" }}
      - eval_time: 2m
        alertname: HookrouteReloadFailed
        exp_alerts: []
      - eval_time: 4m
        alertname: HookrouteReloadFailed
        exp_alerts:
          - exp_labels: {{ severity: warning, outcome: failure }}
            exp_annotations: {{ summary: "{reload_summary}" }}
"#,
        paused = paused,
        paused_values = series(before[paused], 1.0),
        paused_summary = summary(&rules, "HookrouteSinkPaused", "sink", "gone"),
        reload_summary = summary(&rules, "HookrouteReloadFailed", "sink", ""),
        dead_values = series(before[dead], after[dead]),
        dead_summary = summary(&rules, "HookrouteDeadLetters", "sink", "gone").replace('"', "\\\""),
        stuck_summary = summary(&rules, "HookrouteDeliveryStuck", "sink", "gone"),
        signature_summary = summary(&rules, "HookrouteSignatureFailures", "source", "cl"),
    );
    promtool(&["check", "rules", "rules.yml"], &[("rules.yml", &rules)]);
    promtool(
        &["test", "rules", "tests.yml"],
        &[("rules.yml", &rules), ("tests.yml", &tests)],
    );
}

on_both_backends!(scrapes_within_a_second_share_one_reading_of_the_queues);

/// #23.14: `/metrics` cost a database query per scrape, and anyone reaching the listener could
/// scrape it thousands of times a second. The queue gauges come from one reading a second.
async fn scrapes_within_a_second_share_one_reading_of_the_queues() {
    let dir = tempdir();
    fifo(dir.path(), "stuck.fifo");
    let rest = format!(
        "[sources.cl]\nsecret = \"{CL_SECRET}\"\n\n[sinks.stuck]\ntype = \"file\"\npath = \"{}\"\n\n[[routes]]\nname = \"all\"\nevents = [\"*\"]\nsinks = [\"stuck\"]\n",
        dir.path().join("stuck.fifo").display()
    );
    // In-process, on a clock the test moves: "within a second" is the daemon's second.
    let daemon = InProcess::start(dir.path(), &config(dir.path(), NO_LIMITS, &rest)).await;
    let waiting = |text: &str| {
        parse(text)
            .get(r#"hookroute_jobs_waiting{sink="stuck"}"#)
            .copied()
    };
    let (status, _, first) = scrape(&daemon).await;
    // A configured sink is exported from the start, at 0.
    assert_eq!((status, waiting(&first)), (200, Some(0.0)));
    daemon.accept_cl(&scan_body("queued")).await;
    // A burst of scrapes in the same second: all answered, from the same reading.
    let burst = (0..200).map(|_| scrape(&daemon));
    // Each distinct text parsed once: the parser is a process, and 200 of them took 20 s.
    let mut parsed: HashMap<String, Option<f64>> = HashMap::new();
    for (status, _, text) in futures_util::future::join_all(burst).await {
        assert_eq!(status, 200);
        let value = *parsed.entry(text).or_insert_with_key(|text| waiting(text));
        assert_eq!(value, Some(0.0), "read again within a second");
    }
    daemon.clock.advance(Duration::from_millis(999));
    assert_eq!(
        waiting(&scrape(&daemon).await.2),
        Some(0.0),
        "still the same second"
    );
    daemon.clock.advance(Duration::from_millis(1));
    assert_eq!(waiting(&scrape(&daemon).await.2), Some(1.0));
    // The sink's open of the FIFO blocks a thread of this runtime until someone reads.
    let _unstuck = fifo_lines(dir.path().join("stuck.fifo"));
    daemon.stop().await;
}
