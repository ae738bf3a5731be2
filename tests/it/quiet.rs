//! Quiet when asked (#26): silences added from the command line while the daemon runs, on
//! every replica within a second, until they expire; mute windows by the local clock. The
//! daemons run in-process on a clock the test moves, the command line as the real binary.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use hookroute::clock::Clock as _;
use hookroute::store::admin::RowStatus;

use crate::harness::*;

/// The daemon's configuration: everything archived.
fn quiet_config(dir: &Path, extra: &str) -> String {
    config(dir, "", &format!("{}\n{extra}", standard_rest(dir)))
}

fn cli(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .arg("--config")
        .arg(dir.join("config.toml"))
        .output()
        .unwrap()
}

fn alert(id: &str, domain: &str) -> Vec<u8> {
    format!(
        r#"{{"id": "{id}", "type": "alert.triggered", "data": {{"domain": "{domain}", "severity": "high"}}}}"#
    )
    .into_bytes()
}

/// The archive's lines' ids.
fn archived(dir: &Path) -> Vec<String> {
    read_lines(&dir.join("events.jsonl"))
        .iter()
        .map(|line| {
            line["payload"]["id"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect()
}

/// A silence added on the command line holds on every replica within a second: the matching
/// event is stored and recorded as silenced by it, the others delivered; `--dry-run` names
/// exactly what routing silenced; `show` says by what; `replay` delivers it; the silence ends
/// on time by the daemon's clock, and `expire` ends one at once.
async fn a_silence_holds_on_every_replica_within_a_second_until_it_ends() {
    let dirs = [tempdir(), tempdir()];
    let clock = hookroute::clock::ManualClock::new(jiff::Timestamp::now());
    let daemons = replicas(&dirs, |dir| quiet_config(dir, ""), &clock).await;
    let replicas = daemons.len();
    // The clock runs ahead of the wall clock (a second every 20 ms): what the command line
    // queues at the wall clock's now is soon due.
    let _ticking = Ticking::start(&clock, Duration::from_millis(100));
    let dir = dirs[0].path();
    let starts = clock.now().to_string();
    let id = stdout(&cli(
        dir,
        &[
            "silence",
            "add",
            "--type",
            "alert.*",
            "--when",
            "data.domain == 'legacy.acme.example'",
            "--for",
            "8h",
            "--starts",
            &starts,
            "--comment",
            "planned cert change",
            "--author",
            "alice",
        ],
    ));
    let id: i64 = id.trim().parse().expect("add prints the silence's id");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for (n, daemon) in daemons.iter().enumerate() {
        daemon
            .accept_cl(&alert(&format!("legacy-{n}"), "legacy.acme.example"))
            .await;
        daemon
            .accept_cl(&alert(&format!("other-{n}"), "acme.example"))
            .await;
    }
    let others: Vec<String> = (0..replicas).map(|n| format!("other-{n}")).collect();
    eventually(|| {
        let seen = archived_by(&dirs);
        (seen == others)
            .then_some(())
            .ok_or(format!("archived {seen:?}"))
    })
    .await;
    let daemon = &daemons[0];
    let silenced = daemon.tools(|tools| {
        tools
            .list(&hookroute::store::admin::Filter {
                status: Some(RowStatus::Silenced),
                limit: 100,
                ..Default::default()
            })
            .unwrap()
    });
    assert_eq!(silenced.len(), replicas, "{silenced:?}");
    for row in &silenced {
        assert!(row.delivery_id.starts_with("legacy-"), "{row:?}");
        assert_eq!(row.detail.as_deref(), Some(&*format!("silenced by {id}")));
    }
    // The dry run names what routing did.
    let dry = stdout(&cli(
        dir,
        &[
            "silence",
            "add",
            "--dry-run",
            "--json",
            "--type",
            "alert.*",
            "--when",
            "data.domain == 'legacy.acme.example'",
            "--for",
            "1h",
            "--comment",
            "what would it catch?",
        ],
    ));
    let mut would: Vec<i64> = dry
        .lines()
        .map(|line| {
            serde_json::from_str::<serde_json::Value>(line).unwrap()["event_id"]
                .as_i64()
                .unwrap()
        })
        .collect();
    let mut did: Vec<i64> = silenced.iter().map(|row| row.event_id).collect();
    would.sort_unstable();
    did.sort_unstable();
    assert_eq!(would, did, "--dry-run matches what routing silenced");
    assert_eq!(
        daemon.tools(|tools| tools.silences(false, jiff::Timestamp::now()).unwrap().len()),
        1,
        "a dry run stores nothing"
    );
    // `show` of the event says by what; `silence show` lists it.
    let event = silenced[0].event_id.to_string();
    let shown = stdout(&cli(dir, &["deliveries", "show", &event]));
    assert!(
        shown.contains(&format!(
            "silenced by {id}: planned cert change, alice, until "
        )),
        "{shown}"
    );
    let listed = stdout(&cli(dir, &["silence", "show", &id.to_string()]));
    assert!(
        listed.contains(&format!("silenced {replicas} deliveries")),
        "{listed}"
    );
    let metrics = daemon
        .client
        .get(format!("http://{}/metrics", daemon.addr))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("hookroute_events_silenced_total{route=\"everything\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("hookroute_silences{state=\"active\"} 1"),
        "{metrics}"
    );
    // Silences do not apply to replays.
    stdout(&cli(dir, &["replay", &event]));
    let replayed = silenced[0].delivery_id.clone();
    eventually(|| {
        archived_by(&dirs)
            .contains(&replayed)
            .then_some(())
            .ok_or("not replayed yet".to_owned())
    })
    .await;
    // Eight hours on by the daemon's clock, the silence has ended.
    clock.advance(Duration::from_secs(8 * 3600));
    daemon
        .accept_cl(&alert("after", "legacy.acme.example"))
        .await;
    eventually(|| {
        archived_by(&dirs)
            .contains(&"after".to_owned())
            .then_some(())
            .ok_or("not delivered after the silence".to_owned())
    })
    .await;
    // `expire` ends one at once, for every replica within a second.
    let starts = clock.now().to_string();
    let second = stdout(&cli(
        dir,
        &[
            "silence",
            "add",
            "--source",
            "cl",
            "--for",
            "1h",
            "--starts",
            &starts,
            "--comment",
            "all of cl",
            "--author",
            "bob",
        ],
    ));
    let second = second.trim();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    daemons[replicas - 1]
        .accept_cl(&alert("held", "x.example"))
        .await;
    assert!(
        stdout(&cli(dir, &["silence", "list"])).contains("all of cl"),
        "listed while active"
    );
    let expired = stdout(&cli(dir, &["silence", "expire", second, "--json"]));
    let expired: serde_json::Value = serde_json::from_str(&expired).unwrap();
    assert_eq!(expired["state"], "expired", "{expired}");
    assert_eq!(expired["matchers"]["source"], "cl", "{expired}");
    let again = cli(dir, &["silence", "expire", second]);
    assert_eq!(
        again.status.code(),
        Some(1),
        "an ended silence cannot end again"
    );
    assert!(stdout(&cli(dir, &["silence", "list", "--expired"])).contains("all of cl"));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    daemons[replicas - 1]
        .accept_cl(&alert("released", "x.example"))
        .await;
    eventually(|| {
        let seen = archived_by(&dirs);
        (seen.contains(&"released".to_owned()) && !seen.contains(&"held".to_owned()))
            .then_some(())
            .ok_or(format!("archived {seen:?}"))
    })
    .await;
    for daemon in daemons {
        daemon.stop().await;
    }
}
on_both_backends!(a_silence_holds_on_every_replica_within_a_second_until_it_ends);

/// `silence add` refuses what `check-config` would refuse, before storing anything.
#[tokio::test]
async fn a_bad_silence_is_refused_with_the_reason() {
    let dir = tempdir();
    let config = quiet_config(dir.path(), "");
    let daemon = InProcess::start(dir.path(), &config).await;
    ready(&daemon).await;
    let refused = cli(
        dir.path(),
        &[
            "silence",
            "add",
            "--when",
            "data.domain ==",
            "--for",
            "1h",
            "--comment",
            "x",
            "--author",
            "a",
        ],
    );
    assert_eq!(refused.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("--when: line 1, column"), "{stderr}");
    let nothing = cli(
        dir.path(),
        &["silence", "add", "--for", "1h", "--comment", "x"],
    );
    assert_eq!(nothing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&nothing.stderr).contains("at least one of --route"));
    let silences = daemon.tools(|tools| tools.silences(false, jiff::Timestamp::now()).unwrap());
    assert!(silences.is_empty(), "nothing stored: {silences:?}");
    daemon.stop().await;
}

/// A route muted from 01:00 to 04:00 in Berlin, the night the clocks go forward (2027-03-28,
/// 02:00 becomes 03:00): two hours of real time muted, not three, and the jobs of the events
/// in them recorded as muted.
async fn a_mute_window_follows_the_local_clock_across_a_dst_change() {
    let dir = tempdir();
    let at = |text: &str| -> jiff::Timestamp { text.parse().unwrap() };
    let clock = hookroute::clock::ManualClock::new(at("2027-03-27T23:58:00Z"));
    let rest = format!(
        r#"
[sources.cl]
secret = "{CL_SECRET}"

[sinks.archive]
type = "file"
path = "{}"

[time_intervals.night]
times = [{{ start = "01:00", end = "04:00" }}]
location = "Europe/Berlin"

[[routes]]
name = "quiet at night"
events = ["*"]
sinks = ["archive"]
mute_during = ["night"]
"#,
        dir.path().join("events.jsonl").display()
    );
    let daemon =
        InProcess::start_on(dir.path(), &config(dir.path(), "", &rest), clock.clone()).await;
    let _ticking = Ticking::start(&clock, Duration::from_millis(1));
    // (UTC time, delivered): 00:59 CET, 01:00 CET, 03:59 CEST, 04:00 CEST.
    let moments = [
        ("2027-03-27T23:59:00Z", true),
        ("2027-03-28T00:00:30Z", false),
        ("2027-03-28T01:59:00Z", false),
        ("2027-03-28T02:00:30Z", true),
    ];
    for (n, (moment, _)) in moments.iter().enumerate() {
        clock.set(at(moment));
        daemon
            .accept_cl(&alert(&format!("m{n}"), "a.example"))
            .await;
    }
    let delivered: Vec<String> = moments
        .iter()
        .enumerate()
        .filter(|(_, (_, delivered))| *delivered)
        .map(|(n, _)| format!("m{n}"))
        .collect();
    eventually(|| {
        let seen = archived(dir.path());
        (seen == delivered)
            .then_some(())
            .ok_or(format!("archived {seen:?}"))
    })
    .await;
    let muted: Vec<_> = daemon
        .deliveries()
        .into_iter()
        .filter(|row| row.status == RowStatus::Muted)
        .collect();
    assert_eq!(muted.len(), 2, "{muted:?}");
    assert!(
        muted
            .iter()
            .all(|row| row.detail.as_deref() == Some("muted during night"))
    );
    // `route-test --at` says the same; `check-config` shows the window and its next change.
    let event = dir.path().join("alert.json");
    std::fs::write(&event, alert("t", "a.example")).unwrap();
    for (moment, delivered) in moments {
        let event = event.to_str().unwrap();
        let args = ["route-test", "--source", "cl", "--at", moment, event];
        let text = stdout(&cli(dir.path(), &args));
        assert_eq!(
            !text.contains("muted during night"),
            delivered,
            "{moment}: {text}"
        );
    }
    let summary = stdout(&cli(dir.path(), &["check-config"]));
    assert!(
        summary.contains("night")
            && summary.contains("Europe/Berlin")
            && summary.contains("changes at "),
        "{summary}"
    );
    daemon.stop().await;
}
on_both_backends!(a_mute_window_follows_the_local_clock_across_a_dst_change);

/// The archive's lines' ids, every replica's, sorted.
fn archived_by(dirs: &[tempfile::TempDir]) -> Vec<String> {
    let mut ids: Vec<String> = dirs.iter().flat_map(|dir| archived(dir.path())).collect();
    ids.sort();
    ids
}

/// A silence added while a delivery waits for its retry holds the retry too: the job is
/// recorded as silenced when it comes due, and the sink is not called again.
async fn a_silence_holds_a_retry_that_was_waiting() {
    let dir = tempdir();
    let receiver = crate::recorder::Recorder::start().await;
    receiver.script([crate::recorder::Answer::status(500)]);
    let rest = format!(
        r#"
[sources.cl]
secret = "{CL_SECRET}"

[sinks.receiver]
type = "http"
url = "{}"
delivery = {{ retry = {{ base = "1m", cap = "1m" }} }}

[[routes]]
name = "alerts"
events = ["*"]
sinks = ["receiver"]
"#,
        receiver.url("/in")
    );
    let clock = hookroute::clock::ManualClock::new(jiff::Timestamp::now());
    let daemon =
        InProcess::start_on(dir.path(), &config(dir.path(), "", &rest), clock.clone()).await;
    ready(&daemon).await;
    let _ticking = Ticking::start(&clock, Duration::from_millis(1));
    daemon.accept_cl(&alert("retried", "a.example")).await;
    wait_jobs(&daemon, "failed", 1).await;
    assert_eq!(receiver.requests().len(), 1);
    let starts = clock.now().to_string();
    let id = stdout(&cli(
        dir.path(),
        &[
            "silence",
            "add",
            "--sink",
            "receiver",
            "--for",
            "2h",
            "--starts",
            &starts,
            "--comment",
            "receiver maintenance",
            "--author",
            "carol",
        ],
    ));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    clock.advance(Duration::from_secs(120));
    wait_jobs(&daemon, "silenced", 1).await;
    let job = daemon.only_job();
    assert_eq!(job.quieted_by.as_deref(), Some(id.trim()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.requests().len(), 1, "the retry was not sent");
    daemon.stop().await;
}
on_both_backends!(a_silence_holds_a_retry_that_was_waiting);

/// An ended silence is kept as long as events are (`event_retention`), then pruned with them.
async fn an_ended_silence_is_pruned_after_the_event_retention() {
    let dir = tempdir();
    let clock = hookroute::clock::ManualClock::new(jiff::Timestamp::now());
    let config = quiet_config(dir.path(), "")
        .replace("[storage]\n", "[storage]\nevent_retention = \"7d\"\n");
    let daemon = InProcess::start_on(dir.path(), &config, clock.clone()).await;
    ready(&daemon).await;
    let starts = clock.now().to_string();
    let args = [
        "silence",
        "add",
        "--route",
        "everything",
        "--for",
        "1h",
        "--starts",
        &starts,
        "--comment",
        "brief",
        "--author",
        "dan",
    ];
    stdout(&cli(dir.path(), &args));
    let ended = |daemon: &InProcess| {
        daemon.tools(|tools| tools.silences(true, jiff::Timestamp::MAX).unwrap().len())
    };
    assert_eq!(ended(&daemon), 1);
    // Six days on (pruning runs hourly on the daemon's clock): ended, still kept.
    clock.advance(Duration::from_secs(6 * 24 * 3600));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(ended(&daemon), 1, "kept within the retention");
    // Past a week after it ended: pruned.
    clock.advance(Duration::from_secs(2 * 24 * 3600));
    eventually(|| {
        (ended(&daemon) == 0)
            .then_some(())
            .ok_or("still kept".to_owned())
    })
    .await;
    daemon.stop().await;
}
on_both_backends!(an_ended_silence_is_pruned_after_the_event_retention);
