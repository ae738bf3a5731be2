//! Grouping (#26): a route's events that share a key go to each sink as one delivery, after
//! the group's wait, durable across a crash.

use std::time::Duration;

use crate::email::Smtp;
use crate::harness::*;
use crate::recorder::Recorder;

fn scan(id: usize, domain: &str, score: u32) -> Vec<u8> {
    format!(
        r#"{{"id": "sweep-{id}", "type": "scan.completed", "data": {{"domain": "{domain}", "score": {score}, "grade": "{}"}}}}"#,
        if score < 60 { "F" } else { "B" }
    )
    .into_bytes()
}

/// A sweep over 40 domains becomes one Slack message and one email, each listing the scans
/// (the grouped default template), after the group's 30 s; the archive still gets a line per
/// event; `deliveries show` of any of them names the grouped delivery.
async fn a_scan_sweep_becomes_one_slack_message_and_one_email() {
    const SWEEP: usize = 40;
    let dir = tempdir();
    let slack = Recorder::start().await;
    let smtp = Smtp::start(dir.path(), "sweep", "plain", None, None);
    let rest = format!(
        r#"
[sources.cl]
secret = "{CL_SECRET}"

[sinks.slack]
type = "slack"
webhook_url = {{ value = "{}" }}

[sinks.mail]
type = "email"
url = "smtp://127.0.0.1:{}"
starttls = "never"
from = "h@example.com"
to = ["ops@example.com"]

[sinks.archive]
type = "file"
path = "{}"

[[routes]]
name = "sweep"
events = ["scan.completed"]
sinks = ["slack", "mail", "archive"]
group = {{ by = ["source", "type"], wait = "30s", interval = "5m" }}
"#,
        slack.url("/hook"),
        smtp.port,
        dir.path().join("events.jsonl").display()
    );
    let clock = hookroute::clock::ManualClock::new(jiff::Timestamp::now());
    let daemon = InProcess::start_on(
        dir.path(),
        &config(dir.path(), NO_LIMITS, &rest),
        clock.clone(),
    )
    .await;
    for i in 0..SWEEP {
        let score = if i % 10 == 0 { 41 } else { 88 };
        daemon
            .accept_cl(&scan(i, &format!("d{i:02}.example"), score))
            .await;
    }
    // Nothing goes out during the wait.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(slack.requests().is_empty(), "sent before the group's wait");
    clock.advance(Duration::from_secs(30));
    let _looking = Ticking::start(&clock, Duration::from_millis(100));
    let mail = smtp.messages(1).await;
    eventually(|| {
        (slack.requests().len() == 1 && read_lines(&dir.path().join("events.jsonl")).len() == SWEEP)
            .then_some(())
            .ok_or(format!("{} slack requests", slack.requests().len()))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let posted = slack.requests();
    assert_eq!(posted.len(), 1, "one Slack message for the sweep");
    let message = posted[0].json();
    let header = message["blocks"][0]["text"]["text"].as_str().unwrap();
    assert_eq!(
        header, "Scans completed: 40 domains, 4 graded D or F or below 70",
        "{message}"
    );
    let listed = message["blocks"][1]["text"]["text"].as_str().unwrap();
    assert!(listed.contains("d00.example: F (41/100)"), "{listed}");
    assert!(listed.contains("d39.example: B (88/100)"), "{listed}");
    assert_eq!(smtp.received().len(), 1, "one email for the sweep");
    assert_eq!(
        mail[0]["subject"].as_str().unwrap(),
        "Scans completed: 40 domains, 4 graded D or F or below 70"
    );
    wait_jobs(&daemon, "succeeded", 3 * SWEEP as i64).await;
    let job = daemon.job_of("slack");
    let note = job.history[0].response.as_deref().unwrap_or_default();
    assert!(note.contains("one delivery for a group of 40"), "{note}");
    daemon.stop().await;
}
on_both_backends!(a_scan_sweep_becomes_one_slack_message_and_one_email);

/// A daemon killed while a group waits delivers it after the restart, once, as one request.
async fn a_group_waiting_through_a_kill_9_is_delivered_once() {
    let dir = tempdir();
    let receiver = Recorder::start().await;
    let rest = format!(
        r#"
[sources.cl]
secret = "{CL_SECRET}"

[sinks.receiver]
type = "http"
url = "{}"

[[routes]]
name = "by domain"
events = ["*"]
sinks = ["receiver"]
group = {{ by = ["data.domain"], wait = "3s" }}
"#,
        receiver.url("/in")
    );
    let config = config(dir.path(), NO_LIMITS, &rest);
    let daemon = Daemon::start(dir.path(), &config);
    for i in 0..5 {
        daemon.accept_cl(&scan(i, "one.example", 90)).await;
    }
    daemon.accept_cl(&scan(5, "other.example", 90)).await;
    daemon.kill9();
    assert!(receiver.requests().is_empty(), "killed during the wait");
    let daemon = Daemon::start(dir.path(), &config);
    eventually(|| {
        (receiver.requests().len() == 2)
            .then_some(())
            .ok_or(format!("{} requests", receiver.requests().len()))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut sizes: Vec<usize> = receiver
        .requests()
        .iter()
        .map(|r| r.json().as_array().map_or(1, Vec::len))
        .collect();
    sizes.sort_unstable();
    assert_eq!(sizes, [1, 5], "each group once, in one request");
    assert!(daemon.terminate().success());
}
on_both_backends!(a_group_waiting_through_a_kill_9_is_delivered_once);

/// An exec hook gets a group as one run, the events as a JSON array on stdin and their number
/// in `HOOKROUTE_GROUP_SIZE`; `replay` of one of them delivers it alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exec_hook_gets_a_group_on_stdin_and_a_replay_alone() {
    let dir = tempdir();
    let hook = dir.path().join("hook.sh");
    let out = dir.path().join("runs");
    std::fs::create_dir(&out).unwrap();
    script(
        &hook,
        &format!(
            "n=$(ls {out} | grep -c size)\ncat > {out}/$n.json\necho \"${{HOOKROUTE_GROUP_SIZE:-1}}\" > {out}/$n.size",
            out = out.display()
        ),
    );
    let rest = format!(
        r#"
[sources.cl]
secret = "{CL_SECRET}"

[sinks.hook]
type = "exec"
command = ["{}"]

[[routes]]
name = "scans"
events = ["scan.completed"]
sinks = ["hook"]
group = {{ wait = "10s" }}
"#,
        hook.display()
    );
    let clock = hookroute::clock::ManualClock::new(jiff::Timestamp::now());
    let daemon = InProcess::start_on(
        dir.path(),
        &config(dir.path(), NO_LIMITS, &rest),
        clock.clone(),
    )
    .await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let reply = daemon
            .accept_cl(&scan(i, &format!("e{i}.example"), 90))
            .await;
        ids.push(reply.json["id"].as_i64().unwrap());
    }
    clock.advance(Duration::from_secs(10));
    let _looking = Ticking::start(&clock, Duration::from_millis(100));
    wait_jobs(&daemon, "succeeded", 3).await;
    let run = |n: usize| {
        let input: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join(format!("{n}.json"))).unwrap())
                .unwrap();
        let size = std::fs::read_to_string(out.join(format!("{n}.size"))).unwrap();
        (input, size.trim().to_owned())
    };
    let (input, size) = run(0);
    assert_eq!(size, "3");
    let domains: Vec<&str> = input
        .as_array()
        .expect("the group as a JSON array")
        .iter()
        .map(|event| event["payload"]["data"]["domain"].as_str().unwrap())
        .collect();
    assert_eq!(domains, ["e0.example", "e1.example", "e2.example"]);
    // Replayed, one event goes alone.
    let replayed = std::process::Command::new(BIN)
        .args(["replay", &ids[1].to_string(), "--config"])
        .arg(dir.path().join("config.toml"))
        .output()
        .unwrap();
    assert!(replayed.status.success(), "{replayed:?}");
    eventually(|| {
        out.join("1.size")
            .exists()
            .then_some(())
            .ok_or("not replayed yet".to_owned())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (input, size) = run(1);
    assert_eq!(size, "1");
    assert_eq!(input["payload"]["data"]["domain"], "e1.example");
    daemon.stop().await;
}

/// Two replicas on one PostgreSQL database, the events of one group spread over both: the
/// group goes out once, whole, from one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_send_a_group_once_whole() {
    const EVENTS: usize = 12;
    let cluster = crate::postgres::shared();
    let url = cluster.database();
    let receiver = Recorder::start().await;
    let dirs = [tempdir(), tempdir()];
    let clock = hookroute::clock::ManualClock::new(jiff::Timestamp::now());
    let rest = format!(
        r#"
[sources.cl]
secret = "{CL_SECRET}"

[sinks.receiver]
type = "http"
url = "{}"

[[routes]]
name = "all"
events = ["*"]
sinks = ["receiver"]
group = {{ wait = "1m" }}
"#,
        receiver.url("/in")
    );
    let mut daemons = Vec::new();
    for dir in &dirs {
        let config = crate::replicas::with_rest(cluster, &url, &rest);
        daemons.push(InProcess::start_on(dir.path(), &config, clock.clone()).await);
    }
    let sends = (0..EVENTS).map(|i| {
        let daemon = &daemons[i % 2];
        async move { daemon.accept_cl(&scan(i, "a.example", 90)).await }
    });
    futures_util::future::join_all(sends).await;
    clock.advance(Duration::from_secs(60));
    let _looking = Ticking::start(&clock, Duration::from_millis(100));
    eventually(|| {
        (!receiver.requests().is_empty())
            .then_some(())
            .ok_or("nothing sent".to_owned())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let requests = receiver.requests();
    assert_eq!(requests.len(), 1, "one delivery for the group");
    assert_eq!(requests[0].json().as_array().map(Vec::len), Some(EVENTS));
    for daemon in daemons {
        daemon.stop().await;
    }
}
