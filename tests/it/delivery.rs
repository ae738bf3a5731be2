//! Delivery to the outside world through the running daemon: Slack and HTTP against real
//! loopback servers, exec hooks as real child processes, retries, dead letters, outages,
//! crashes, and the operator commands.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::*;
use crate::recorder::{Answer, Recorder};

/// Sources `cl`, the given sinks, and a route sending every event to `sinks`.
fn with_sinks(dir: &Path, sinks: &str, route_to: &[&str]) -> String {
    let route = format!(
        "[[routes]]\nname = \"all\"\nevents = [\"*\"]\nsinks = {}\n",
        serde_json::to_string(route_to).unwrap()
    );
    config(
        dir,
        NO_LIMITS,
        &format!("[sources.cl]\nsecret = \"{CL_SECRET}\"\n\n{sinks}\n{route}"),
    )
}

fn hookroute(args: &[&str], config: &Path) -> (Option<i32>, String) {
    let out = Command::new(BIN)
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

on_both_backends!(slack_block_kit_honours_retry_after_and_retries_5xx);

async fn slack_block_kit_honours_retry_after_and_retries_5xx() {
    let dir = tempdir();
    let slack = Recorder::start().await;
    slack.script([
        Answer {
            headers: vec![("retry-after", "120".into())],
            ..Answer::status(429)
        },
        Answer::status(500),
    ]);
    let sinks = format!(
        r##"[sinks.security]
type = "slack"
webhook_url = {{ value = "{}" }}
username = "hookroute"
icon_emoji = ":shield:"
channel = "#security"
delivery = {{ retry = {{ base = "1m", cap = "1m" }} }}
"##,
        slack.url("/services/T000/B000/XXXX")
    );
    // In-process, on a clock the test moves: Slack's wait and the backoff are minutes, and
    // each try comes when the clock says, not before.
    let daemon = InProcess::start(dir.path(), &with_sinks(dir.path(), &sinks, &["security"])).await;
    let asked_at = hookroute::clock::Clock::now(&daemon.clock);
    daemon
        .accept_cl(&sample("compliancelayer-scan.completed.json"))
        .await;
    wait_jobs(&daemon, "failed", 1).await;
    let job = daemon.job_of("security");
    let next: jiff::Timestamp = job.next_attempt_at.expect("a retry").parse().unwrap();
    assert_eq!(
        next.as_millisecond(),
        (asked_at + Duration::from_secs(120)).as_millisecond(),
        "Retry-After: 120 honoured, to the millisecond the store keeps"
    );

    // The second try (a 500) recorded before the clock moves on, so its retry, at most a
    // minute later, is due after the step.
    daemon.clock.set(next);
    eventually(|| match daemon.job_of("security").history.len() {
        2 => Ok(()),
        n => Err(format!("{n} attempts recorded")),
    })
    .await;
    assert_eq!(slack.requests().len(), 2);
    daemon.clock.advance(Duration::from_secs(60));
    wait_jobs(&daemon, "succeeded", 1).await;

    let requests = slack.requests();
    assert_eq!(
        requests.iter().map(|r| r.status).collect::<Vec<_>>(),
        [429, 500, 200]
    );
    assert_eq!(requests[2].path, "/services/T000/B000/XXXX");
    let payload = requests[2].json();
    assert_eq!(payload["username"], "hookroute");
    assert_eq!(payload["icon_emoji"], ":shield:");
    assert_eq!(payload["channel"], "#security");
    assert_eq!(payload["blocks"][0]["type"], "header");
    assert_eq!(
        payload["blocks"][0]["text"]["text"],
        "Scan completed: example.com graded B (85/100, low risk)"
    );
    assert_eq!(payload["blocks"][1]["type"], "section");
    assert!(
        payload["blocks"][1]["text"]["text"]
            .as_str()
            .unwrap()
            .contains("8 issues: 0 critical, 2 high")
    );
    assert!(
        payload["blocks"][2]["elements"][0]["text"]
            .as_str()
            .unwrap()
            .contains("550e8400-e29b-41d4-a716-446655440000")
    );
    assert!(
        payload["text"]
            .as_str()
            .unwrap()
            .starts_with("Scan completed: example.com"),
        "plain-text fallback"
    );
    assert_eq!(requests[2].headers["content-type"], "application/json");
    assert_eq!(daemon.job_of("security").history.len(), 3);
    daemon.stop().await;
}

on_both_backends!(the_tools_give_a_next_try_only_for_a_retry);

/// `deliveries list` and `show` give a next try for a failed job's retry only: a pending job
/// is due now or being delivered, whatever its row's fallback time says.
async fn the_tools_give_a_next_try_only_for_a_retry() {
    let dir = tempdir();
    let slack = Recorder::start().await;
    slack.script([Answer::status(500)]);
    let stuck = fifo(dir.path(), "stuck.fifo");
    let sinks = format!(
        "[sinks.retrying]\ntype = \"slack\"\nwebhook_url = {{ value = \"{}\" }}\ndelivery = {{ retry = {{ base = \"1h\" }} }}\n\n[sinks.stuck]\ntype = \"file\"\npath = \"{}\"\n",
        slack.url("/hook"),
        stuck.display()
    );
    let daemon = Daemon::start(
        dir.path(),
        &with_sinks(dir.path(), &sinks, &["retrying", "stuck"]),
    );
    let event_id = daemon.accept_cl(&scan_body("next-try")).await.json["id"]
        .as_i64()
        .unwrap();
    wait_jobs(&daemon, "failed", 1).await;
    let config = daemon.config_path.clone();

    let (code, out) = hookroute(&["deliveries", "list", "--json"], &config);
    assert_eq!(code, Some(0), "{out}");
    let rows: HashMap<String, serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .map(|row| (row["sink"].as_str().unwrap().to_owned(), row))
        .collect();
    assert_eq!(rows["retrying"]["status"], "failed");
    assert!(rows["retrying"]["next_attempt_at"].is_string(), "{out}");
    assert_eq!(rows["stuck"]["status"], "pending");
    assert!(rows["stuck"]["next_attempt_at"].is_null(), "{out}");

    let (_, out) = hookroute(
        &["deliveries", "show", &event_id.to_string(), "--json"],
        &config,
    );
    let shown: serde_json::Value = serde_json::from_str(&out).unwrap();
    let next: Vec<bool> = shown["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|job| job["next_attempt_at"].is_string())
        .collect();
    let statuses: Vec<&str> = shown["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|job| job["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        statuses.iter().zip(&next).collect::<Vec<_>>(),
        [(&"failed", &true), (&"pending", &false)],
        "{out}"
    );
    let (_, out) = hookroute(&["deliveries", "show", &event_id.to_string()], &config);
    assert_eq!(out.matches("next try").count(), 1, "{out}");
}

on_both_backends!(permanent_errors_go_to_dead_letters_and_can_be_retried);
async fn permanent_errors_go_to_dead_letters_and_can_be_retried() {
    let dir = tempdir();
    let slack = Recorder::start().await;
    slack.script([Answer {
        body: "no_service".into(),
        ..Answer::status(404)
    }]);
    let sinks = format!(
        "[sinks.security]\ntype = \"slack\"\nwebhook_url = {{ value = \"{}\" }}\n",
        slack.url("/hook")
    );
    let daemon = Daemon::start(dir.path(), &with_sinks(dir.path(), &sinks, &["security"]));
    let reply = daemon
        .post_cl(&sample("compliancelayer-alert.triggered.json"))
        .await;
    let event_id = reply.json["id"].as_i64().unwrap();
    wait_jobs(&daemon, "dead", 1).await;
    assert_eq!(slack.requests().len(), 1, "a 404 is not retried");
    let config = daemon.config_path.clone();

    let (code, out) = hookroute(&["deliveries", "list", "--status", "dead"], &config);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("alert.triggered") && out.contains("security") && out.contains("HTTP 404"),
        "{out}"
    );
    let (_, json) = hookroute(
        &["deliveries", "list", "--status", "dead", "--json"],
        &config,
    );
    let row: serde_json::Value = serde_json::from_str(json.lines().next().unwrap()).unwrap();
    assert_eq!(row["event_id"], event_id);
    let job_id = row["job_id"].as_i64().unwrap().to_string();
    let (code, out) = hookroute(&["deliveries", "show", &event_id.to_string()], &config);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("dead after 1 attempt") && out.contains("HTTP 404: no_service"),
        "{out}"
    );

    // The operator fixes Slack and retries the dead letter; the running daemon delivers it.
    let (code, out) = hookroute(&["dead-letter", "retry", &job_id], &config);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("re-queued 1 dead delivery"), "{out}");
    wait_jobs(&daemon, "succeeded", 1).await;
    assert_eq!(slack.requests().len(), 2);
    let (code, _) = hookroute(&["dead-letter", "retry", &job_id], &config);
    assert_eq!(code, Some(1), "nothing dead to retry");
    // --all re-queues every dead letter at once.
    slack.script([Answer::status(404), Answer::status(404)]);
    for name in [
        "compliancelayer-scan.completed.json",
        "scorecard-assessment.completed.json",
    ] {
        daemon.accept_cl(&sample(name)).await;
    }
    wait_jobs(&daemon, "dead", 2).await;
    let (code, out) = hookroute(&["dead-letter", "retry", "--all"], &config);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("re-queued 2 dead deliveries"), "{out}");
    wait_jobs(&daemon, "succeeded", 3).await;
    let (code, _) = hookroute(&["deliveries", "show", "999"], &config);
    assert_eq!(code, Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_forward_is_resigned_for_the_next_hop() {
    let dir = tempdir();
    let next_hop = Recorder::start().await;
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let sinks = format!(
        "[sinks.forward]\ntype = \"http\"\nurl = \"{}\"\nheaders = {{ X-Team = \"security\" }}\nsign = {{ value = \"{secret}\" }}\n",
        next_hop.url("/ingest")
    );
    let daemon = Daemon::start(dir.path(), &with_sinks(dir.path(), &sinks, &["forward"]));
    daemon
        .accept_cl(&sample("compliancelayer-scan.completed.json"))
        .await;
    wait_jobs(&daemon, "succeeded", 1).await;
    let request = &next_hop.requests()[0];
    assert_eq!(request.headers["x-team"], "security");
    // The official Standard Webhooks library accepts the signature.
    standardwebhooks::Webhook::new(secret)
        .unwrap()
        .verify(&request.body, &request.headers)
        .unwrap();
    assert_eq!(
        request.headers["webhook-id"],
        "cl:550e8400-e29b-41d4-a716-446655440000"
    );
    let body = request.json();
    assert_eq!(body["route"], "all");
    assert_eq!(body["type"], "scan.completed");
    assert_eq!(body["payload"]["data"]["domain"], "example.com");
}

on_both_backends!(outage_then_recovery_delivers_everything_once);

async fn outage_then_recovery_delivers_everything_once() {
    let dir = tempdir();
    let target = Recorder::start().await;
    target.set_down(true);
    let sinks = format!(
        "[sinks.forward]\ntype = \"http\"\nurl = \"{}\"\ndelivery = {{ retry = {{ base = \"1m\", cap = \"10m\", max_attempts = 50 }} }}\n",
        target.url("/in")
    );
    // In-process, on a clock the test moves: an outage of half an hour, not waited for.
    let daemon = InProcess::start(dir.path(), &with_sinks(dir.path(), &sinks, &["forward"])).await;
    let ids: Vec<String> = (0..10).map(|i| format!("outage-{i}")).collect();
    for id in &ids {
        daemon.accept_cl(&scan_body(id)).await;
    }
    // Each job fails, and fails again at each retry while the outage lasts (each try
    // recorded before the clock moves on, so every next try is at most 10 min on).
    for tries in 1..=3 {
        if tries > 1 {
            daemon.clock.advance(Duration::from_secs(600));
        }
        eventually(|| {
            let jobs = daemon.all_jobs();
            let tried = jobs
                .iter()
                .filter(|(_, job)| job.history.len() >= tries)
                .count();
            (tried == 10)
                .then_some(())
                .ok_or(format!("{tried} of 10 jobs tried {tries} times"))
        })
        .await;
    }
    assert_eq!(target.requests().len(), 30);
    assert!(target.requests().iter().all(|r| r.status == 503));
    target.set_down(false);
    daemon.clock.advance(Duration::from_secs(600));
    wait_jobs(&daemon, "succeeded", 10).await;
    let mut delivered: Vec<String> = target
        .requests()
        .iter()
        .filter(|r| r.status == 200)
        .map(|r| r.json()["delivery_id"].as_str().unwrap().to_owned())
        .collect();
    delivered.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(delivered, expected, "every event delivered, none twice");
    daemon.stop().await;
}

on_both_backends!(a_slow_sink_does_not_delay_the_others);

async fn a_slow_sink_does_not_delay_the_others() {
    let dir = tempdir();
    let (slow, fast) = (Recorder::start().await, Recorder::start().await);
    slow.set_delay(Duration::from_secs(3));
    let sinks = format!(
        "[sinks.slow]\ntype = \"http\"\nurl = \"{}\"\ndelivery = {{ concurrency = 1 }}\n\n[sinks.fast]\ntype = \"http\"\nurl = \"{}\"\n",
        slow.url("/"),
        fast.url("/")
    );
    let daemon = Daemon::start(
        dir.path(),
        &with_sinks(dir.path(), &sinks, &["slow", "fast"]),
    );
    for i in 0..4 {
        daemon.accept_cl(&scan_body(&format!("iso-{i}"))).await;
    }
    let started = Instant::now();
    while fast.requests().len() < 4 {
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "the fast sink waited for the slow one"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        slow.requests().len() <= 1,
        "the slow sink runs one at a time"
    );
}

on_both_backends!(concurrency_bounds_calls_in_flight_however_many_are_claimed);

/// Jobs are claimed ahead of free slots (so a busy writer does not throttle delivery), but
/// the sink never sees more calls at once than its concurrency.
async fn concurrency_bounds_calls_in_flight_however_many_are_claimed() {
    let dir = tempdir();
    let target = Recorder::start().await;
    target.set_delay(Duration::from_millis(150));
    let sinks = format!(
        "[sinks.target]\ntype = \"http\"\nurl = \"{}\"\ndelivery = {{ concurrency = 2 }}\n",
        target.url("/")
    );
    let daemon = Daemon::start(dir.path(), &with_sinks(dir.path(), &sinks, &["target"]));
    for i in 0..12 {
        let body = scan_body(&format!("bounded-{i}"));
        daemon.accept_cl(&body).await;
    }
    wait_jobs(&daemon, "succeeded", 12).await;
    assert_eq!(target.requests().len(), 12, "each job delivered once");
    assert_eq!(target.most_in_flight(), 2, "two at a time, never more");
}

on_both_backends!(a_graceful_stop_finishes_the_sink_calls_it_made);

/// SIGTERM while a sink is answering: the call finishes and its outcome is recorded, the
/// jobs waiting for a slot are left due, and the next start delivers those only. A rolling
/// restart repeats nothing.
async fn a_graceful_stop_finishes_the_sink_calls_it_made() {
    let dir = tempdir();
    let target = Recorder::start().await;
    target.set_delay(Duration::from_millis(1500));
    let sinks = format!(
        "[sinks.target]\ntype = \"http\"\nurl = \"{}\"\ndelivery = {{ concurrency = 1 }}\n",
        target.url("/")
    );
    let text = with_sinks(dir.path(), &sinks, &["target"]);
    let daemon = Daemon::start(dir.path(), &text);
    for i in 0..3 {
        daemon.accept_cl(&scan_body(&format!("graceful-{i}"))).await;
    }
    eventually(|| {
        (target.in_flight() == 1)
            .then_some(())
            .ok_or("no call in flight".to_owned())
    })
    .await;
    let stopping = Instant::now();
    assert!(daemon.terminate().success());
    assert!(
        stopping.elapsed() >= Duration::from_millis(500),
        "the stop waited for the sink's answer"
    );
    assert_eq!(
        target.requests().len(),
        1,
        "one call made, none started after"
    );
    let status = |dir: &Path| -> HashMap<String, i64> { jobs_at(dir) };
    let after_stop = status(dir.path());
    assert_eq!(after_stop.get("succeeded"), Some(&1), "{after_stop:?}");
    assert_eq!(after_stop.get("pending"), Some(&2), "{after_stop:?}");

    target.set_delay(Duration::ZERO);
    let daemon = Daemon::start(dir.path(), &text);
    wait_jobs(&daemon, "succeeded", 3).await;
    let mut ids: Vec<String> = target
        .requests()
        .iter()
        .map(|r| r.json()["delivery_id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    assert_eq!(ids, ["graceful-0", "graceful-1", "graceful-2"], "each once");
}

/// A hook path and the directory it writes into, under `dir`.
fn hook_and_out(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let (hook, out) = (dir.join("hook.sh"), dir.join("out"));
    std::fs::create_dir(&out).unwrap();
    (hook, out)
}

fn exec_sink(hook: &Path, out: &Path, extra: &str) -> String {
    format!(
        "[sinks.hook]\ntype = \"exec\"\ncommand = [\"{}\", \"--flag\"]\nenv = {{ OUT = \"{}\" }}\nworking_dir = \"{}\"\n{extra}\n",
        hook.display(),
        out.display(),
        out.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_gets_the_event_on_stdin_and_a_clean_environment() {
    let dir = tempdir();
    let (hook, out) = hook_and_out(dir.path());
    script(
        &hook,
        "cat > \"$OUT/$HOOKROUTE_DELIVERY_ID.json\"\nenv > \"$OUT/$HOOKROUTE_DELIVERY_ID.env\"\necho \"$1\" > \"$OUT/args\"\npwd > \"$OUT/pwd\"\necho done",
    );
    let text = with_sinks(dir.path(), &exec_sink(&hook, &out, ""), &["hook"]);
    let config_path = write_config(dir.path(), &text);
    let daemon = Daemon::start_with(
        dir.path(),
        &config_path,
        &[("DAEMON_SECRET", "must-not-leak")],
    );
    // Shell metacharacters in the payload are data, never code.
    let evil = format!(
        r#"{{"id": "evil", "type": "scan.completed", "data": {{"domain": "x.com; touch {0}/pwned1 && $(touch {0}/pwned2) `touch {0}/pwned3`"}}}}"#,
        out.display()
    );
    daemon.accept_cl(evil.as_bytes()).await;
    wait_jobs(&daemon, "succeeded", 1).await;

    let stdin: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("evil.json")).unwrap()).unwrap();
    assert_eq!(stdin["type"], "scan.completed");
    assert_eq!(stdin["route"], "all");
    assert!(
        stdin["payload"]["data"]["domain"]
            .as_str()
            .unwrap()
            .contains("$(touch")
    );
    for marker in ["pwned1", "pwned2", "pwned3"] {
        assert!(
            !out.join(marker).exists(),
            "{marker}: payload text was executed"
        );
    }
    let env = std::fs::read_to_string(out.join("evil.env")).unwrap();
    let names: Vec<&str> = env.lines().filter_map(|l| l.split('=').next()).collect();
    for expected in [
        "PATH",
        "HOOKROUTE_EVENT_TYPE",
        "HOOKROUTE_DELIVERY_ID",
        "HOOKROUTE_SOURCE",
        "OUT",
    ] {
        assert!(names.contains(&expected), "{expected} missing from {env}");
    }
    assert!(
        env.contains("HOOKROUTE_EVENT_TYPE=scan.completed") && env.contains("HOOKROUTE_SOURCE=cl"),
        "{env}"
    );
    assert!(
        !env.contains("must-not-leak") && !env.contains("RUST_LOG"),
        "the daemon's environment leaked: {env}"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("args")).unwrap().trim(),
        "--flag"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("pwd")).unwrap().trim(),
        out.canonicalize().unwrap().to_str().unwrap()
    );
    let response = daemon.only_job().response.unwrap_or_default();
    assert!(response.contains("stdout: done"), "{response}");
}

on_both_backends!(exec_failures_are_retried_and_timeouts_kill_the_process_group);

async fn exec_failures_are_retried_and_timeouts_kill_the_process_group() {
    let dir = tempdir();
    let (hook, out) = hook_and_out(dir.path());
    // Fails the first time, succeeds the second.
    script(
        &hook,
        "if [ ! -e \"$OUT/tried\" ]; then touch \"$OUT/tried\"; echo 'ticket system down' >&2; exit 3; fi\ncat > /dev/null",
    );
    let extra = "delivery = { retry = { base = \"100ms\" } }";
    let daemon = Daemon::start(
        dir.path(),
        &with_sinks(dir.path(), &exec_sink(&hook, &out, extra), &["hook"]),
    );
    daemon.accept_cl(&scan_body("flaky")).await;
    wait_jobs(&daemon, "succeeded", 1).await;
    let first = daemon.only_job().history.remove(0);
    assert_eq!(first.number, 1);
    let (error, response) = (
        first.error.unwrap_or_default(),
        first.response.unwrap_or_default(),
    );
    assert!(error.contains("exit status: 3"), "{error}");
    assert!(response.contains("ticket system down"), "{response}");
    drop(daemon);

    // A hook that hangs, with a grandchild: after the timeout the whole group is gone.
    let dir = tempdir();
    let (hook, out) = hook_and_out(dir.path());
    script(
        &hook,
        "sleep 300 &\necho $! > \"$OUT/grandchild\"\nsleep 300",
    );
    let extra = "delivery = { timeout = \"1s\", retry = { max_attempts = 1 } }";
    let daemon = Daemon::start(
        dir.path(),
        &with_sinks(dir.path(), &exec_sink(&hook, &out, extra), &["hook"]),
    );
    daemon.accept_cl(&scan_body("hangs")).await;
    wait_jobs(&daemon, "dead", 1).await;
    let error = daemon.only_job().last_error.unwrap_or_default();
    assert!(
        error.contains("timed out after 1s") && error.contains("process group was killed"),
        "{error}"
    );
    let pid = std::fs::read_to_string(out.join("grandchild"))
        .unwrap()
        .trim()
        .to_owned();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        // Gone, or a zombie waiting for a reaper: either way no longer running.
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok();
        if state
            .as_deref()
            .is_none_or(|s| s.split_whitespace().nth(2) == Some("Z"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "grandchild {pid} survived the timeout: {state:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

on_both_backends!(a_blocked_file_sink_never_stalls_ingest);

/// A file sink that blocks (a FIFO nobody reads: opening it never returns) holds up its own
/// deliveries and nothing else: with every one of its concurrency slots stuck, deliveries are
/// still accepted promptly.
async fn a_blocked_file_sink_never_stalls_ingest() {
    let dir = tempdir();
    let fifo = fifo(dir.path(), "stuck.fifo");
    let sink = format!(
        "[sinks.stuck]\ntype = \"file\"\npath = \"{}\"\n",
        fifo.display()
    );
    let daemon = Daemon::start(dir.path(), &with_sinks(dir.path(), &sink, &["stuck"]));
    let accepted = tokio::time::timeout(Duration::from_secs(10), async {
        for i in 0..12 {
            daemon
                .accept_cl(&scan_body(&format!("behind-a-fifo-{i}")))
                .await;
        }
    })
    .await;
    assert!(accepted.is_ok(), "ingest stalled:\n{}", daemon.log());
    assert_eq!(daemon.event_count(), 12);
    assert_eq!(jobs(&daemon).get("succeeded"), None);
}

on_both_backends!(a_full_handoff_queue_spills_to_the_database_and_nothing_is_delivered_twice);

/// New jobs are handed to the engine in memory until a sink has 1024 waiting; past that they
/// wait in the database. Both ways meet at the sink, and no job takes both: every event is
/// delivered exactly once.
async fn a_full_handoff_queue_spills_to_the_database_and_nothing_is_delivered_twice() {
    const EVENTS: usize = 1100;
    let dir = tempdir();
    let fifo = fifo(dir.path(), "slow.fifo");
    let sink = format!(
        "[sinks.slow]\ntype = \"file\"\npath = \"{}\"\ndelivery = {{ concurrency = 1 }}\n",
        fifo.display()
    );
    // In-process, on a clock the test moves: the hand-over's fallback is passed without
    // waiting for it.
    let daemon = InProcess::start(dir.path(), &with_sinks(dir.path(), &sink, &["slow"])).await;
    // Nobody reads the FIFO yet, so the first call blocks and everything else waits.
    let bodies: Vec<Vec<u8>> = (0..EVENTS)
        .map(|i| scan_body(&format!("spill-{i}")))
        .collect();
    for chunk in bodies.chunks(50) {
        futures_util::future::join_all(chunk.iter().map(|b| daemon.accept_cl(b))).await;
    }
    // A handed-over job's row is due only at the fallback; a stored one at once.
    let handed: i64 = daemon.value("SELECT count(*) FROM jobs WHERE next_attempt_at > created_at");
    let stored: i64 = daemon.value("SELECT count(*) FROM jobs WHERE next_attempt_at = created_at");
    assert!(handed >= 1024, "{handed} handed over");
    assert!(stored > 0, "nothing spilled to the database");
    assert_eq!(handed + stored, EVENTS as i64);
    // Past the fallback the handed-over rows are due in the database too, while the engine
    // still has them: it must not take them a second time, however often it looks (each
    // step of the clock past its next look makes it look at the whole queue).
    daemon.clock.advance(Duration::from_secs(11));
    let looking = Ticking::start(&daemon.clock, Duration::from_secs(1));

    let received = fifo_lines(fifo);
    // Times each delivery id came through the FIFO.
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut count = |line: String| {
        let line: serde_json::Value = serde_json::from_str(&line).unwrap();
        *seen
            .entry(line["delivery_id"].as_str().unwrap().to_owned())
            .or_insert(0) += 1;
    };
    for delivered in 0..EVENTS {
        let line = received
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("{delivered} of {EVENTS} lines"));
        count(line);
    }
    wait_jobs(&daemon, "succeeded", EVENTS as i64).await;
    // Anything delivered twice would have come in by now, after its job succeeded.
    while let Ok(line) = received.recv_timeout(Duration::from_millis(200)) {
        count(line);
    }
    drop(looking);
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    assert_eq!(seen.len(), EVENTS);
    daemon.stop().await;
}

on_both_backends!(jobs_in_flight_at_a_crash_are_delivered_after_restart);

async fn jobs_in_flight_at_a_crash_are_delivered_after_restart() {
    let dir = tempdir();
    let (hook, out) = hook_and_out(dir.path());
    script(
        &hook,
        "echo \"$HOOKROUTE_DELIVERY_ID\" >> \"$OUT/started\"\nsleep 30\necho \"$HOOKROUTE_DELIVERY_ID\" >> \"$OUT/done\"",
    );
    let text = with_sinks(dir.path(), &exec_sink(&hook, &out, ""), &["hook"]);
    let daemon = Daemon::start(dir.path(), &text);
    for i in 0..3 {
        daemon.accept_cl(&scan_body(&format!("crash-{i}"))).await;
    }
    eventually(|| {
        let started = std::fs::read_to_string(out.join("started")).unwrap_or_default();
        match started.lines().count() {
            3 => Ok(()),
            n => Err(format!("{n} of 3 hooks started\n{}", daemon.log())),
        }
    })
    .await;
    // Being attempted is not a state of the job: it stays pending until its outcome is in.
    assert_eq!(jobs(&daemon).get("pending"), Some(&3));
    daemon.kill9();
    // The orphaned hooks from the first run are of no interest here: kill them.
    let _ = Command::new("pkill")
        .args(["-f", &format!("{} --flag", hook.display())])
        .status();

    script(&hook, "echo \"$HOOKROUTE_DELIVERY_ID\" >> \"$OUT/done\"");
    let daemon = Daemon::start(dir.path(), &text);
    wait_jobs(&daemon, "succeeded", 3).await;
    let done = std::fs::read_to_string(out.join("done")).unwrap();
    let mut ids: Vec<&str> = done.lines().collect();
    ids.sort_unstable();
    assert_eq!(ids, ["crash-0", "crash-1", "crash-2"]);
}

on_both_backends!(replay_requeues_through_routes_or_to_one_sink);

async fn replay_requeues_through_routes_or_to_one_sink() {
    let dir = tempdir();
    let sinks = format!(
        "[sinks.archive]\ntype = \"file\"\npath = \"{}\"\n\n[sinks.extra]\ntype = \"file\"\npath = \"{}\"\n",
        dir.path().join("archive.jsonl").display(),
        dir.path().join("extra.jsonl").display()
    );
    let daemon = Daemon::start(dir.path(), &with_sinks(dir.path(), &sinks, &["archive"]));
    let reply = daemon.post_cl(&scan_body("replayed")).await;
    let id = reply.json["id"].as_i64().unwrap().to_string();
    wait_jobs(&daemon, "succeeded", 1).await;
    let config = daemon.config_path.clone();

    let (code, out) = hookroute(&["replay", &id], &config);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("via route \"all\" to sink \"archive\""),
        "{out}"
    );
    wait_jobs(&daemon, "succeeded", 2).await;
    assert_eq!(
        wait_lines(&dir.path().join("archive.jsonl"), 2).await.len(),
        2
    );

    let (code, out) = hookroute(&["replay", &id, "--sink", "extra"], &config);
    assert_eq!(code, Some(0), "{out}");
    wait_jobs(&daemon, "succeeded", 3).await;
    assert_eq!(
        wait_lines(&dir.path().join("extra.jsonl"), 1).await[0]["delivery_id"],
        "replayed"
    );
    let (code, out) = hookroute(&["replay", &id, "--sink", "nope"], &config);
    assert_eq!(code, Some(2), "{out}");

    let (code, out) = hookroute(
        &["deliveries", "list", "--since", "1h", "--source", "cl"],
        &config,
    );
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(
        out.lines().filter(|l| l.contains("succeeded")).count(),
        3,
        "{out}"
    );
    let (_, out) = hookroute(&["deliveries", "list", "--source", "other"], &config);
    assert_eq!(out.lines().count(), 1, "header only: {out}");
}

on_both_backends!(a_waiting_job_is_retried_now_not_queued_twice);

/// #24.2: there was no "retry now" for a failed job, and `replay --sink` queued a second job
/// beside one still waiting, so Slack got the message twice. `retry JOB` makes a failed job
/// due now (keeping its attempts); `replay` refuses while a job of the event waits for the
/// same sink, unless `--force`; and a command given the wrong kind of id says what it is.
async fn a_waiting_job_is_retried_now_not_queued_twice() {
    let dir = tempdir();
    let slack = Recorder::start().await;
    slack.script([Answer::status(500)]);
    let config_text = config(
        dir.path(),
        NO_LIMITS,
        &format!(
            "[sources.cl]\nsecret = \"{CL_SECRET}\"\n\n[sinks.chat]\ntype = \"slack\"\nwebhook_url = {{ value = \"{}\" }}\ndelivery = {{ retry = {{ base = \"1h\" }} }}\n\n[[routes]]\nname = \"scans\"\nevents = [\"scan.completed\"]\nsinks = [\"chat\"]\n",
            slack.url("/hook")
        ),
    );
    let daemon = Daemon::start(dir.path(), &config_text);
    let event = daemon.accept_cl(&scan_body("twice")).await.json["id"]
        .as_i64()
        .unwrap();
    wait_jobs(&daemon, "failed", 1).await;
    let job = daemon.only_job().id;
    let unrouted = daemon
        .accept_cl(&sample("compliancelayer-alert.triggered.json"))
        .await
        .json["id"]
        .as_i64()
        .unwrap();
    assert_ne!(unrouted, job, "an event id with no job of that number");
    let config = daemon.config_path.clone();
    let (event, job) = (event.to_string(), job.to_string());
    let count_jobs = || daemon.job_count();

    // The job waits an hour for its next try: replaying the event to its sink is refused.
    for replay in [
        vec!["replay", event.as_str(), "--sink", "chat"],
        vec!["replay", event.as_str()],
    ] {
        let (code, out) = hookroute(&replay, &config);
        assert_eq!(code, Some(1), "{replay:?}: {out}");
        assert!(
            out.contains(&format!(
                "event {event} already has job {job} waiting for sink \"chat\" (failed, next try at "
            )) && out.contains("nothing queued"),
            "{out}"
        );
    }
    assert_eq!(count_jobs(), 1);
    // `dead-letter retry` of a job that is not dead, or of an event id, says so.
    let (code, out) = hookroute(&["dead-letter", "retry", &job], &config);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(&format!("job {job} is failed, next try at "))
            && out.contains(&format!("`hookroute retry {job}` tries it now")),
        "{out}"
    );
    let (code, out) = hookroute(&["dead-letter", "retry", &unrouted.to_string()], &config);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(&format!(
            "no job {unrouted}; event {unrouted} exists: `hookroute deliveries show {unrouted}`"
        )),
        "{out}"
    );

    // Retried now: delivered at once, as the job's second attempt.
    let (code, out) = hookroute(&["retry", &job], &config);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(&format!(
            "job {job} (event {event} to sink \"chat\") is due now; it keeps its 1 attempt(s)"
        )),
        "{out}"
    );
    wait_jobs(&daemon, "succeeded", 1).await;
    assert_eq!(slack.requests().len(), 2);
    let (_, out) = hookroute(&["deliveries", "show", &event], &config);
    assert!(out.contains("succeeded after 2 attempt(s)"), "{out}");
    let (code, out) = hookroute(&["retry", &job], &config);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(&format!(
            "job {job} has succeeded: `hookroute replay {event} --sink chat` delivers its event again"
        )),
        "{out}"
    );
    let (code, out) = hookroute(&["retry", "999"], &config);
    assert_eq!((code, out.trim()), (Some(1), "no job 999"));

    // Nothing waits now: a replay is queued; beside a waiting one, only with --force.
    slack.script([Answer::status(500)]);
    let (code, out) = hookroute(&["replay", &event, "--sink", "chat"], &config);
    assert_eq!(code, Some(0), "{out}");
    wait_jobs(&daemon, "failed", 1).await;
    let (code, _) = hookroute(&["replay", &event, "--sink", "chat"], &config);
    assert_eq!((code, count_jobs()), (Some(1), 2));
    let (code, out) = hookroute(&["replay", &event, "--sink", "chat", "--force"], &config);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("queued job"), "{out}");
    assert_eq!(count_jobs(), 3);
    wait_jobs(&daemon, "succeeded", 2).await;
}

on_both_backends!(jobs_of_a_sink_removed_by_reload_become_dead_letters);

async fn jobs_of_a_sink_removed_by_reload_become_dead_letters() {
    let dir = tempdir();
    let target = Recorder::start().await;
    target.set_down(true);
    let forward = format!(
        "[sinks.forward]\ntype = \"http\"\nurl = \"{}\"\ndelivery = {{ retry = {{ base = \"10m\" }} }}\n",
        target.url("/")
    );
    let archive = format!(
        "[sinks.archive]\ntype = \"file\"\npath = \"{}\"\n",
        dir.path().join("a.jsonl").display()
    );
    let daemon = Daemon::start(
        dir.path(),
        &with_sinks(dir.path(), &(forward + &archive), &["forward"]),
    );
    daemon.accept_cl(&scan_body("orphan")).await;
    wait_jobs(&daemon, "failed", 1).await;

    std::fs::write(
        &daemon.config_path,
        with_sinks(dir.path(), &archive, &["archive"]),
    )
    .unwrap();
    signal(daemon.pid(), "HUP");
    wait_jobs(&daemon, "dead", 1).await;
    let error = daemon.job_of("forward").last_error.unwrap_or_default();
    assert_eq!(error, "sink \"forward\" is no longer configured");
}

/// logrotate renames the archive (and may create an empty one in its place): the next
/// delivery goes to a file at the configured path, never on into the rotated one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_sink_follows_its_path_after_a_rotation() {
    let dir = tempdir();
    let archive = dir.path().join("events.jsonl");
    let daemon = Daemon::start(
        dir.path(),
        &config(dir.path(), NO_LIMITS, &standard_rest(dir.path())),
    );
    daemon.accept_cl(&scan_body("before")).await;
    wait_lines(&archive, 1).await;
    // Rotated away, nothing in its place.
    std::fs::rename(&archive, dir.path().join("events.jsonl.1")).unwrap();
    daemon.accept_cl(&scan_body("after-rename")).await;
    let lines = wait_lines(&archive, 1).await;
    assert_eq!(lines.len(), 1, "the path was not reopened");
    assert_eq!(lines[0]["delivery_id"], "after-rename");
    // Rotated with `create`: an empty file appears at the path.
    std::fs::rename(&archive, dir.path().join("events.jsonl.2")).unwrap();
    std::fs::write(&archive, "").unwrap();
    daemon.accept_cl(&scan_body("after-create")).await;
    let lines = wait_lines(&archive, 1).await;
    assert_eq!(lines.len(), 1, "the new file was not written");
    assert_eq!(lines[0]["delivery_id"], "after-create");
    let rotated = |name: &str| read_lines(&dir.path().join(name)).len();
    assert_eq!(
        (rotated("events.jsonl.1"), rotated("events.jsonl.2")),
        (1, 1)
    );
}

/// With a template the http sink sends the rendered message with one `Content-Type`: text by
/// default (no stray blank lines), or a JSON body built by the template, which is how Teams,
/// Mattermost, Discord and PagerDuty are reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_sink_sends_a_template_as_text_or_as_json() {
    let dir = tempdir();
    let receiver = Recorder::start().await;
    let sinks = format!(
        r#"[sinks.text]
type = "http"
url = "{}"
template = {{ text = "{{{{ data.domain }}}} scanned" }}

[sinks.chat]
type = "http"
url = "{}"
content_type = "application/json"
template = {{ text = '{{"text": {{{{ (data.domain ~ " scored " ~ data.score) | tojson }}}}}}' }}
"#,
        receiver.url("/text"),
        receiver.url("/chat")
    );
    let daemon = Daemon::start(
        dir.path(),
        &with_sinks(dir.path(), &sinks, &["text", "chat"]),
    );
    daemon.accept_cl(&scan_body("templated")).await;
    wait_jobs(&daemon, "succeeded", 2).await;
    let requests = receiver.requests();
    let by_path = |path: &str| requests.iter().find(|r| r.path == path).unwrap().clone();
    let text = by_path("/text");
    let types: Vec<_> = text.headers.get_all("content-type").iter().collect();
    assert_eq!(types, ["text/plain; charset=utf-8"]);
    assert_eq!(String::from_utf8_lossy(&text.body), "example.com scanned");
    let chat = by_path("/chat");
    let types: Vec<_> = chat.headers.get_all("content-type").iter().collect();
    assert_eq!(types, ["application/json"]);
    assert_eq!(
        chat.json(),
        serde_json::json!({"text": "example.com scored 85"})
    );
}

/// The documented templates for Teams, Mattermost, Discord and PagerDuty build JSON bodies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_chat_and_paging_templates_send_json() {
    let readme = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/configuration.md"
    ))
    .unwrap();
    let block = readme
        .split("## JSON bodies for chat and paging services")
        .nth(1)
        .and_then(|rest| rest.split("```toml\n").nth(1))
        .and_then(|rest| rest.split("```").next())
        .expect("docs/configuration.md's block of JSON templates");
    let receiver = Recorder::start().await;
    // Every service's URL points at the recorder, by the sink's name.
    let mut sinks = String::new();
    let mut names = Vec::new();
    for line in block.lines() {
        if let Some(name) = line.strip_prefix("[sinks.") {
            let name = name.split(']').next().unwrap().to_owned();
            sinks += line;
            sinks += "\n";
            names.push(name);
        } else if line.starts_with("url = ") {
            sinks += &format!(
                "url = \"{}\"\n",
                receiver.url(&format!("/{}", names.last().unwrap()))
            );
        } else {
            sinks += line;
            sinks += "\n";
        }
    }
    assert_eq!(names, ["teams", "mattermost", "discord", "pagerduty"]);
    let dir = tempdir();
    let names_ref: Vec<&str> = names.iter().map(String::as_str).collect();
    let text = with_sinks(dir.path(), &sinks, &names_ref)
        + "\n[template_vars]\npagerduty_key = \"R0UTINGKEY\"\n";
    let daemon = Daemon::start(dir.path(), &text);
    daemon
        .accept_cl(&sample("compliancelayer-scan.completed.json"))
        .await;
    wait_jobs(&daemon, "succeeded", 4).await;
    for request in receiver.requests() {
        let body: serde_json::Value = serde_json::from_slice(&request.body)
            .unwrap_or_else(|e| panic!("{}: not JSON ({e})", request.path));
        assert_eq!(request.headers["content-type"], "application/json");
        if request.path == "/pagerduty" {
            assert_eq!(body["routing_key"], "R0UTINGKEY");
            assert_eq!(body["payload"]["custom_details"]["domain"], "example.com");
        }
    }
}

on_both_backends!(show_tells_events_and_jobs_apart_and_counts_every_attempt);

/// Event ids and job ids are both small numbers: `show` takes either, names both, hints at
/// the other kind, and numbers a retried dead letter's attempts 1..N with a summary to match.
async fn show_tells_events_and_jobs_apart_and_counts_every_attempt() {
    let dir = tempdir();
    let receiver = Recorder::start().await;
    receiver.script([Answer::status(400)]);
    let sinks = format!(
        "[sinks.forward]\ntype = \"http\"\nurl = \"{}\"\n\n[sinks.archive]\ntype = \"file\"\npath = \"{}\"\n",
        receiver.url("/in"),
        dir.path().join("archive.jsonl").display()
    );
    let daemon = Daemon::start(
        dir.path(),
        &with_sinks(dir.path(), &sinks, &["forward", "archive"]),
    );
    daemon.accept_cl(&scan_body("ids")).await;
    wait_jobs(&daemon, "dead", 1).await;
    let config = daemon.config_path.clone();
    let forward_job = daemon.job_of("forward").id;
    let (code, out) = hookroute(&["dead-letter", "retry", &forward_job.to_string()], &config);
    assert_eq!(code, Some(0), "{out}");
    wait_jobs(&daemon, "succeeded", 2).await;

    let (code, out) = hookroute(
        &["deliveries", "show", "--job", &forward_job.to_string()],
        &config,
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(&format!("job {forward_job} (event 1): route \"all\" -> sink \"forward\": succeeded after 2 attempt(s)")),
        "{out}"
    );
    // The forward job's block: its attempts are 1 and 2, each once.
    let block = out
        .split(&format!("job {forward_job} (event 1)"))
        .nth(1)
        .unwrap()
        .split("\njob ")
        .next()
        .unwrap();
    let numbers: Vec<&str> = block
        .lines()
        .filter_map(|l| l.trim().strip_prefix("attempt "))
        .map(|l| l.split(' ').next().unwrap())
        .collect();
    assert_eq!(numbers, ["1", "2"], "{out}");
    // #24.8: `list` counts the same attempts as `show`, not the retry policy's fresh count.
    let (_, json) = hookroute(&["deliveries", "list", "--json"], &config);
    let tries: HashMap<String, i64> = json
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .map(|row| {
            (
                row["sink"].as_str().unwrap().to_owned(),
                row["attempts"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(tries["forward"], 2, "{json}");
    assert_eq!(tries["archive"], 1, "{json}");
    let (_, table) = hookroute(&["deliveries", "list"], &config);
    let row = table.lines().find(|l| l.contains(" forward ")).unwrap();
    assert!(row.contains("succeeded    2"), "{table}");
    // Job 2 exists, event 2 does not: the answer says which to ask for.
    let (code, out) = hookroute(&["deliveries", "show", "2"], &config);
    assert_eq!(code, Some(1));
    assert!(
        out.contains("no event 2 (job 2 exists: `deliveries show --job 2`)"),
        "{out}"
    );
}

/// #24.13: Slack's context line showed a Scorecard event's 71-character `sha256:…` delivery
/// id; a hash-like id is cut to its first 12 digits there (`show` keeps it whole).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slack_shows_a_hash_like_delivery_id_short() {
    let dir = tempdir();
    let slack = Recorder::start().await;
    let sinks = format!(
        "[sinks.security]\ntype = \"slack\"\nwebhook_url = {{ value = \"{}\" }}\n",
        slack.url("/services/T000/B000/XXXX")
    );
    let daemon = Daemon::start(dir.path(), &with_sinks(dir.path(), &sinks, &["security"]));
    let body = br#"{"event": "policy.published", "timestamp": "2025-02-20T15:30:00Z", "data": {"policy_id": "p-1", "title": "Access control"}}"#;
    daemon.accept_cl(body).await;
    wait_jobs(&daemon, "succeeded", 1).await;
    let id = daemon.deliveries().remove(0).delivery_id;
    assert!(id.starts_with("sha256:") && id.len() == 71, "{id}");
    let context = slack.requests()[0].json()["blocks"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()["elements"][0]["text"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(context.contains(&format!("{}…", &id[..19])), "{context}");
    assert!(!context.contains(&id), "{context}");
    // #24.11: the same facts as an email's footer, the time the event happened included.
    assert_eq!(
        context,
        format!(
            "policy.published · cl · 2025-02-20 15:30:00 UTC · {}… · route all",
            &id[..19]
        )
    );
}
