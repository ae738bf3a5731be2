//! Loud when it matters (#27): the daemon's own events (`hookroute.*`) routed like any other,
//! and a failing destination paused instead of burned. The daemons run in-process on a clock
//! the test moves; Slack is a real HTTP server on loopback, email a real SMTP server, the
//! command line the real binary.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use hookroute::store::admin::{Filter, RowStatus};

use crate::email::Smtp;
use crate::harness::*;
use crate::recorder::{Answer, Recorder};

fn cli(config: &Path, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap()
}

fn scan(n: usize) -> Vec<u8> {
    format!(
        r#"{{"id": "scan-{n}", "type": "scan.completed", "data": {{"domain": "d{n}.example", "score": 90, "grade": "A"}}}}"#
    )
    .into_bytes()
}

/// A configuration whose `[self]` turns on `kinds` (the defaults if empty) and whose one
/// route sends `glob` to a file: its lines, and the configuration.
fn archiving(dir: &Path, kinds: &[&str], glob: &str) -> (std::path::PathBuf, String) {
    let archive = dir.join("events.jsonl");
    let internal = if kinds.is_empty() {
        String::new()
    } else {
        format!("[self]\nevents = {kinds:?}\n")
    };
    let rest = format!(
        r#"
{internal}
[sources.cl]
scheme = "compliancelayer"
secret = "{CL_SECRET}"

[sinks.archive]
type = "file"
path = "{}"

[[routes]]
name = "self"
events = ["{glob}"]
sinks = ["archive"]
"#,
        archive.display()
    );
    (archive, config(dir, NO_LIMITS, &rest))
}

/// The on-call inbox: an email sink named `mail` delivering to `smtp`.
fn oncall_mail(smtp: &Smtp) -> String {
    format!(
        "[sinks.mail]\ntype = \"email\"\nurl = \"smtp://127.0.0.1:{}\"\nstarttls = \"never\"\n\
         from = \"hookroute@example.com\"\nto = [\"oncall@example.com\"]\n",
        smtp.port
    )
}

/// Emails received whose subject starts with `prefix`.
fn mails(smtp: &Smtp, prefix: &str) -> Vec<serde_json::Value> {
    smtp.received()
        .into_iter()
        .filter(|m| {
            m["subject"]
                .as_str()
                .unwrap_or_default()
                .starts_with(prefix)
        })
        .collect()
}

/// Stored events of `event_type`, across the database.
fn events_of(daemon: &InProcess, event_type: &str) -> usize {
    let mut ids: Vec<i64> = daemon
        .deliveries()
        .into_iter()
        .filter(|row| row.event_type == event_type)
        .map(|row| row.event_id)
        .collect();
    ids.dedup();
    ids.len()
}

fn sink_state(daemon: &InProcess, sink: &str) -> &'static str {
    daemon.tools(|tools| {
        let now = jiff::Timestamp::now();
        let sinks = tools.sinks(&[], now).unwrap();
        sinks
            .iter()
            .find(|s| s.sink == sink)
            .map_or("active", |s| s.state)
    })
}

/// The Slack messages that answered 200, by the domain they name, in the order sent.
fn delivered_domains(slack: &Recorder) -> Vec<String> {
    slack
        .requests()
        .iter()
        .filter(|r| r.status == 200)
        .map(|r| {
            let text = String::from_utf8_lossy(&r.body).into_owned();
            (1..=9)
                .map(|n| format!("d{n}.example"))
                .find(|d| text.contains(d.as_str()))
                .unwrap_or(text)
        })
        .collect()
}

/// Slack down for a stepped 20 minutes: one `hookroute.sink.failing` email, the sink paused
/// at its `pause_after` (one `sink.paused` email), no job dead, one probe per interval and
/// `hookroute_sink_paused` 1; Slack back: one `recovered` email and the backlog delivered
/// once each, in order. The route sends `hookroute.*` to Slack too: it never gets an event
/// about itself (recorded as such). On PostgreSQL two replicas share the work, and each
/// internal event is still stored once.
async fn a_failing_sink_is_paused_not_burned_and_recovers_in_order() {
    let dirs = [tempdir(), tempdir()];
    let slack = Recorder::start().await;
    slack.set_down_with(500);
    let smtp = Smtp::start(dirs[0].path(), "loud", "plain", None, None);
    let archive = dirs[0].path().join("events.jsonl");
    let rest = format!(
        r#"
[sources.cl]
secret = "{CL_SECRET}"

[sinks.slack]
type = "slack"
webhook_url = {{ value = "{}" }}
delivery = {{ concurrency = 1, pause_after = "10m", probe_interval = "1m", retry = {{ base = "2s", cap = "1m", max_attempts = 100 }} }}

{}

[sinks.archive]
type = "file"
path = "{}"

[[routes]]
name = "scans"
events = ["scan.completed"]
sinks = ["slack"]

[[routes]]
name = "self"
events = ["hookroute.*"]
sinks = ["mail", "slack", "archive"]
"#,
        slack.url("/hook"),
        oncall_mail(&smtp),
        archive.display()
    );
    let clock = hookroute::clock::ManualClock::new(jiff::Timestamp::now());
    let daemons = replicas(&dirs, |dir| config(dir, NO_LIMITS, &rest), &clock).await;
    let daemon = &daemons[0];
    for n in 1..=3 {
        daemon.accept_cl(&scan(n)).await;
    }

    // Ten minutes of failures, stepped two seconds at a time.
    let ticking = Ticking::start(&clock, Duration::from_secs(2));
    eventually(|| match sink_state(daemon, "slack") {
        "paused" => Ok(()),
        state => Err(format!(
            "slack is {state}, {} requests",
            slack.requests().len()
        )),
    })
    .await;
    drop(ticking);
    let failing = smtp.messages(2).await;
    let failing_mails = mails(&smtp, "Sink slack is failing");
    assert_eq!(failing_mails.len(), 1, "{failing:?}");
    let text = failing_mails[0]["text"].as_str().unwrap_or_default();
    assert!(text.contains("Last error: HTTP 500"), "{text}");
    assert!(
        text.contains("hookroute deliveries list --sink slack --status failed"),
        "{text}"
    );
    let paused = mails(&smtp, "Sink slack paused");
    assert_eq!(paused.len(), 1, "{failing:?}");
    let text = paused[0]["text"].as_str().unwrap_or_default();
    assert!(text.contains("hookroute sink resume slack"), "{text}");
    assert!(text.contains("Waiting: 3 deliveries"), "{text}");

    // Paused: one probe a minute, and nothing else.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut seen = slack.requests().len();
    for minute in 1..=3 {
        clock.advance(Duration::from_secs(60));
        eventually(|| {
            let now = slack.requests().len();
            (now > seen)
                .then_some(())
                .ok_or(format!("minute {minute}: no probe"))
        })
        .await;
        tokio::time::sleep(Duration::from_millis(400)).await;
        let now = slack.requests().len();
        assert_eq!(now, seen + 1, "minute {minute}: one probe");
        seen = now;
    }
    let metrics = reqwest::get(daemon.url("/metrics")).await.unwrap();
    let metrics = metrics.text().await.unwrap();
    assert!(
        metrics.contains("hookroute_sink_paused{sink=\"slack\"} 1"),
        "{metrics}"
    );
    let dead = |daemon: &InProcess| {
        daemon.tools(|tools| {
            let filter = Filter {
                status: Some(RowStatus::Dead),
                limit: 100,
                ..Filter::default()
            };
            tools.list(&filter).unwrap().len()
        })
    };
    assert_eq!(dead(daemon), 0, "nothing dead for the outage");

    // Back: the next probe succeeds and resumes it; the backlog follows, oldest first.
    slack.set_down(false);
    clock.advance(Duration::from_secs(60));
    let _ticking = Ticking::start(&clock, Duration::from_millis(200));
    eventually(|| {
        let delivered = delivered_domains(&slack);
        (delivered.len() >= 3)
            .then_some(())
            .ok_or(format!("{delivered:?}"))
    })
    .await;
    let recovered = smtp.messages(3).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        delivered_domains(&slack),
        ["d1.example", "d2.example", "d3.example"],
        "once each, in order"
    );
    assert_eq!(
        mails(&smtp, "Sink slack recovered").len(),
        1,
        "{recovered:?}"
    );
    assert_eq!(sink_state(daemon, "slack"), "active");
    assert_eq!(dead(daemon), 0);

    // Slack never got an event about itself: each is recorded as such.
    for request in slack.requests() {
        let body = String::from_utf8_lossy(&request.body);
        assert!(!body.contains("Sink slack"), "{body}");
    }
    let refused: Vec<_> = daemon
        .deliveries()
        .into_iter()
        .filter(|row| row.sink.as_deref() == Some("slack") && row.source == "hookroute")
        .collect();
    assert_eq!(refused.len(), 3, "{refused:?}");
    for row in &refused {
        assert_eq!(row.status, RowStatus::Muted);
        let detail = row.detail.as_deref().unwrap_or_default();
        assert!(detail.contains("never sent to it"), "{detail}");
    }
    // One of each, however many replicas noticed.
    for kind in ["sink.failing", "sink.paused", "sink.recovered"] {
        assert_eq!(events_of(daemon, &format!("hookroute.{kind}")), 1, "{kind}");
    }
    let archived: Vec<String> = read_lines(&archive)
        .iter()
        .map(|line| line["type"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(
        archived,
        [
            "hookroute.sink.failing",
            "hookroute.sink.paused",
            "hookroute.sink.recovered"
        ]
    );
    for daemon in daemons {
        daemon.stop().await;
    }
}
on_both_backends!(a_failing_sink_is_paused_not_burned_and_recovers_in_order);

/// A revoked Slack webhook (404): its deliveries go to the dead letters at once, as before,
/// and the dead letters reach the on-call inbox as one message for the sink, not one each.
/// The sink is failing but not paused: a refusal is not an outage.
async fn a_revoked_webhook_is_one_dead_letter_message() {
    let dir = tempdir();
    let slack = Recorder::start().await;
    slack.script((0..12).map(|_| {
        let mut answer = Answer::status(404);
        answer.body = "no_service".into();
        answer
    }));
    let smtp = Smtp::start(dir.path(), "dead", "plain", None, None);
    let rest = format!(
        r#"
[sources.cl]
secret = "{CL_SECRET}"

[sinks.slack]
type = "slack"
webhook_url = {{ value = "{}" }}

{}

[[routes]]
name = "scans"
events = ["scan.completed"]
sinks = ["slack"]

[[routes]]
name = "self"
sources = ["hookroute"]
events = ["*"]
sinks = ["mail"]
"#,
        slack.url("/hook"),
        oncall_mail(&smtp)
    );
    let clock = hookroute::clock::ManualClock::new(jiff::Timestamp::now());
    let daemon = InProcess::start_on(
        dir.path(),
        &config(dir.path(), NO_LIMITS, &rest),
        clock.clone(),
    )
    .await;
    for n in 0..12 {
        daemon.accept_cl(&scan(n)).await;
    }
    wait_jobs(&daemon, "dead", 12).await;
    // The group's wait: nothing yet.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        mails(&smtp, "Dead letter").is_empty(),
        "{:?}",
        smtp.received()
    );
    clock.advance(Duration::from_secs(30));
    let _ticking = Ticking::start(&clock, Duration::from_millis(100));
    eventually(|| {
        let dead = mails(&smtp, "Dead letter");
        (!dead.is_empty())
            .then_some(dead)
            .ok_or("no dead-letter email".to_owned())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let dead = mails(&smtp, "Dead letter");
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(
        dead[0]["subject"].as_str().unwrap(),
        "Dead letters at slack: 12 deliveries gave up"
    );
    let text = dead[0]["text"].as_str().unwrap();
    assert!(text.contains("HTTP 404"), "{text}");
    assert!(
        text.contains("hookroute deliveries list --sink slack --status dead"),
        "{text}"
    );
    assert_eq!(mails(&smtp, "Sink slack is failing").len(), 1);
    assert_eq!(
        sink_state(&daemon, "slack"),
        "failing",
        "failing, not paused"
    );
    // The command the message names lists them.
    let listed = stdout(&cli(
        &dir.path().join("config.toml"),
        &[
            "deliveries",
            "list",
            "--sink",
            "slack",
            "--status",
            "dead",
            "--json",
        ],
    ));
    assert_eq!(listed.lines().count(), 12, "{listed}");
    daemon.stop().await;
}
on_both_backends!(a_revoked_webhook_is_one_dead_letter_message);

/// Twenty bad signatures within a minute (a rotated secret) make one
/// `hookroute.signature.failing`, with the reasons and the client; more make no second one.
async fn bad_signatures_make_one_signature_failing_event() {
    let dir = tempdir();
    let (archive, text) = archiving(dir.path(), &[], "hookroute.*");
    let daemon = InProcess::start(dir.path(), &text).await;
    let _ticking = Ticking::start(&daemon.clock, Duration::from_millis(100));
    let body = scan(1);
    let wrong = hmac_hex("whsec_the_old_secret", &[&body]);
    for _ in 0..30 {
        let reply = daemon
            .post(
                "/hooks/cl",
                &body,
                &[("X-ComplianceLayer-Signature", wrong.clone())],
            )
            .await;
        assert_eq!(reply.status, 401);
    }
    let lines = wait_lines(&archive, 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let lines = if read_lines(&archive).len() > lines.len() {
        read_lines(&archive)
    } else {
        lines
    };
    assert_eq!(lines.len(), 1, "{lines:?}");
    let event = &lines[0]["payload"];
    assert_eq!(event["type"], "hookroute.signature.failing");
    assert_eq!(event["data"]["source"], "cl");
    assert_eq!(event["data"]["failures"], 20);
    assert_eq!(event["data"]["clients"]["127.0.0.1"], 20);
    let reasons = event["data"]["reasons"].as_object().unwrap();
    assert_eq!(
        reasons.values().filter_map(|n| n.as_u64()).sum::<u64>(),
        20,
        "{reasons:?}"
    );
    assert_eq!(
        daemon.event_count(),
        1,
        "the refused deliveries stored nothing"
    );
    daemon.stop().await;
}
on_both_backends!(bad_signatures_make_one_signature_failing_event);

/// `check-config` warns when the alert that a sink fails could only go to that sink.
#[test]
fn check_config_warns_when_the_alert_about_a_sink_has_nowhere_to_go() {
    let dir = tempdir();
    let rest = format!(
        r#"
[sources.cl]
secret = "{CL_SECRET}"

[sinks.slack]
type = "slack"
webhook_url = {{ value = "https://hooks.slack.com/services/T0/B0/x" }}

[sinks.archive]
type = "file"
path = "{}"

[[routes]]
name = "everything"
events = ["*"]
sinks = ["archive"]

[[routes]]
name = "self"
events = ["hookroute.*"]
sinks = ["slack"]
"#,
        dir.path().join("events.jsonl").display()
    );
    let path = write_config(dir.path(), &config(dir.path(), "", &rest));
    let out = cli(&path, &["check-config"]);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("hookroute's own events (hookroute.*) go only to sink \"slack\""),
        "{said}"
    );
    // With a second sink for them, no warning.
    let fixed = rest.replace("sinks = [\"slack\"]", "sinks = [\"slack\", \"archive\"]");
    let path = write_config(dir.path(), &config(dir.path(), "", &fixed));
    let said = stdout(&cli(&path, &["check-config"]));
    assert!(!said.contains("go only to sink"), "{said}");
    assert!(
        said.contains(
            "hookroute's own events: sink.failing, sink.paused, sink.recovered, dead_letter, \
             signature.failing, config.reload_failed, reconcile.failing -> routes \"self\""
        ),
        "{said}"
    );
}

/// `hookroute sink pause --for` on the command line: every daemon holds the sink's jobs (a
/// `sink.paused` event says who and why), `sink list` shows it, and `sink resume` sends the
/// waiting deliveries at once.
async fn an_operator_pauses_and_resumes_a_sink() {
    let dir = tempdir();
    let receiver = Recorder::start().await;
    let archive = dir.path().join("events.jsonl");
    let rest = format!(
        r#"
[sources.cl]
secret = "{CL_SECRET}"

[sinks.receiver]
type = "http"
url = "{}"

[sinks.archive]
type = "file"
path = "{}"

[[routes]]
name = "scans"
events = ["scan.completed"]
sinks = ["receiver"]

[[routes]]
name = "self"
events = ["hookroute.sink.*"]
sinks = ["archive"]
"#,
        receiver.url("/in"),
        archive.display()
    );
    let clock = hookroute::clock::ManualClock::new(jiff::Timestamp::now());
    let daemon = InProcess::start_on(
        dir.path(),
        &config(dir.path(), NO_LIMITS, &rest),
        clock.clone(),
    )
    .await;
    ready(&daemon).await;
    let path = dir.path().join("config.toml");
    let said = stdout(&cli(
        &path,
        &[
            "sink",
            "pause",
            "receiver",
            "--for",
            "2h",
            "--comment",
            "receiver maintenance",
            "--author",
            "alice",
        ],
    ));
    assert!(said.contains("receiver paused until"), "{said}");
    let _ticking = Ticking::start(&clock, Duration::from_millis(100));
    let lines = wait_lines(&archive, 1).await;
    let event = &lines[0]["payload"];
    assert_eq!(event["type"], "hookroute.sink.paused");
    assert_eq!(event["data"]["paused_by"], "alice");
    assert_eq!(event["data"]["comment"], "receiver maintenance");
    for n in 1..=2 {
        daemon.accept_cl(&scan(n)).await;
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(receiver.requests().is_empty(), "paused: nothing is sent");
    let listed = stdout(&cli(&path, &["sink", "list", "--json"]));
    let receiver_row: serde_json::Value = listed
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
        .find(|row| row["sink"] == "receiver")
        .unwrap();
    assert_eq!(receiver_row["state"], "paused", "{listed}");
    assert_eq!(receiver_row["waiting"], 2, "{listed}");
    assert_eq!(receiver_row["pause"]["comment"], "receiver maintenance");
    let table = stdout(&cli(&path, &["sink", "list"]));
    assert!(table.contains("paused since"), "{table}");

    let said = stdout(&cli(&path, &["sink", "resume", "receiver"]));
    assert!(said.contains("receiver resumed"), "{said}");
    eventually(|| {
        let got = receiver.requests().len();
        (got == 2).then_some(()).ok_or(format!("{got} delivered"))
    })
    .await;
    let lines = wait_lines(&archive, 2).await;
    assert_eq!(lines[1]["payload"]["type"], "hookroute.sink.recovered");
    assert_eq!(
        lines[1]["payload"]["data"]["how"],
        "the operator's pause ended"
    );
    daemon.stop().await;
}
on_both_backends!(an_operator_pauses_and_resumes_a_sink);

/// A reload with a typo keeps the running configuration and is routed as
/// `hookroute.config.reload_failed`, naming the problem; a good reload is
/// `hookroute.config.reloaded` when that kind is on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_with_a_typo_is_routed_as_reload_failed() {
    let dir = tempdir();
    let (archive, text) = archiving(
        dir.path(),
        &["config.reload_failed", "config.reloaded"],
        "hookroute.config.*",
    );
    let daemon = Daemon::start(dir.path(), &text);
    std::fs::write(
        &daemon.config_path,
        text.replace("type = \"file\"", "tpye = \"file\""),
    )
    .unwrap();
    signal(daemon.pid(), "HUP");
    let lines = wait_lines(&archive, 1).await;
    let event = &lines[0]["payload"];
    assert_eq!(event["type"], "hookroute.config.reload_failed", "{event}");
    let problems = event["data"]["problems"].as_str().unwrap();
    assert!(problems.contains("sinks.archive"), "{problems}");
    // Still running the old configuration: a good reload is told too.
    std::fs::write(&daemon.config_path, &text).unwrap();
    signal(daemon.pid(), "HUP");
    let lines = wait_lines(&archive, 2).await;
    assert_eq!(lines[1]["payload"]["type"], "hookroute.config.reloaded");
    assert_eq!(lines[1]["payload"]["data"]["sinks"], 1);
}

/// Storage that refuses writes for a while (another process holds the lock): once it takes
/// them again, one `hookroute.storage.degraded` says from when to when and how many
/// deliveries were answered 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storage_outage_is_told_once_it_is_over() {
    let dir = tempdir();
    let (archive, text) = archiving(dir.path(), &["storage.degraded"], "hookroute.storage.*");
    let daemon = Daemon::start(dir.path(), &text);
    let blocker = daemon.db();
    blocker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    for n in 0..3 {
        let reply = daemon.post_cl(&scan(n)).await;
        assert_eq!(reply.status, 503);
    }
    blocker.execute_batch("ROLLBACK").unwrap();
    daemon.accept_cl(&scan(0)).await;
    let lines = wait_lines(&archive, 1).await;
    let event = &lines[0]["payload"];
    assert_eq!(event["type"], "hookroute.storage.degraded", "{event}");
    assert_eq!(event["data"]["refused_deliveries"], 3, "{event}");
    assert!(event["data"]["last_error"].as_str().is_some(), "{event}");
    assert!(event["data"]["since"].as_str() < event["data"]["until"].as_str());
}
