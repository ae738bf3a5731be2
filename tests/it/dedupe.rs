//! A delivery id is stored and dispatched once, however often the sender retries.

use crate::harness::*;

on_both_backends!(retry_is_a_duplicate_even_under_a_new_delivery_header);
async fn retry_is_a_duplicate_even_under_a_new_delivery_header() {
    let dir = tempdir();
    let daemon = Daemon::start(
        dir.path(),
        &config(dir.path(), NO_LIMITS, &standard_rest(dir.path())),
    );
    let body = sample("compliancelayer-scan.completed.json");
    let signature = hmac_hex(CL_SECRET, &[&body]);
    let send = |delivery: &'static str| {
        let headers = [
            ("x-compliancelayer-signature", signature.clone()),
            ("x-compliancelayer-delivery", delivery.to_owned()),
            ("x-compliancelayer-event", "scan.completed".to_owned()),
        ];
        let daemon = &daemon;
        let body = body.clone();
        async move { daemon.post("/hooks/cl", &body, &headers).await }
    };
    let first = send("d-1").await;
    assert_eq!(first.status, 202, "{:?}", first.json);
    assert_eq!(
        first.json["delivery_id"],
        "550e8400-e29b-41d4-a716-446655440000"
    );
    let retry = send("d-1").await;
    assert_eq!(
        (retry.status, &retry.json["status"]),
        (200, &"duplicate".into())
    );
    assert_eq!(retry.json["id"], first.json["id"]);
    // The delivery header is unsigned: a captured body replayed under a fresh one is still a duplicate.
    let replay = send("d-forged").await;
    assert_eq!(replay.status, 200);

    let lines = wait_lines(&dir.path().join("events.jsonl"), 1).await;
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["type"], "scan.completed");
    assert_eq!(lines[0]["sender_delivery"], "d-1");
    assert_eq!(lines[0]["payload"]["data"]["grade"], "B");
    // Give a (wrong) second dispatch time to show up before counting.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(read_lines(&dir.path().join("events.jsonl")).len(), 1);
    assert_eq!(daemon.event_count(), 1);
    assert_eq!(daemon.job_count(), 1);
}

on_both_backends!(fifty_concurrent_copies_store_exactly_one);
async fn fifty_concurrent_copies_store_exactly_one() {
    let dir = tempdir();
    let daemon = Daemon::start(
        dir.path(),
        &config(dir.path(), NO_LIMITS, &standard_rest(dir.path())),
    );
    let body = scan_body("concurrent");
    let copies = (0..50).map(|_| daemon.post_cl(&body));
    let replies = futures_util::future::join_all(copies).await;
    let accepted = replies.iter().filter(|r| r.status == 202).count();
    let duplicates = replies
        .iter()
        .filter(|r| r.status == 200 && r.json["status"] == "duplicate")
        .count();
    assert_eq!((accepted, duplicates), (1, 49));
    assert_eq!(daemon.event_count(), 1);
    assert_eq!(
        wait_lines(&dir.path().join("events.jsonl"), 1).await.len(),
        1
    );
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(read_lines(&dir.path().join("events.jsonl")).len(), 1);
}

on_both_backends!(scorecard_bodies_without_id_dedupe_on_their_hash);
async fn scorecard_bodies_without_id_dedupe_on_their_hash() {
    let dir = tempdir();
    let rest = format!(
        "[sources.scorecard]\nscheme = \"token\"\nsecret = \"tok\"\n\n[sinks.archive]\ntype = \"file\"\npath = \"{}\"\n{CATCH_ALL}",
        dir.path().join("events.jsonl").display()
    );
    let daemon = Daemon::start(dir.path(), &config(dir.path(), NO_LIMITS, &rest));
    let token = [("x-webhook-token", "tok".to_owned())];
    let policy = sample("scorecard-policy.published.json");
    let assessment = sample("scorecard-assessment.completed.json");
    assert_eq!(
        daemon
            .post("/hooks/scorecard", &policy, &token)
            .await
            .status,
        202
    );
    assert_eq!(
        daemon
            .post("/hooks/scorecard", &policy, &token)
            .await
            .status,
        200
    );
    assert_eq!(
        daemon
            .post("/hooks/scorecard", &assessment, &token)
            .await
            .status,
        202
    );
    let lines = wait_lines(&dir.path().join("events.jsonl"), 2).await;
    let types: Vec<_> = lines.iter().map(|l| l["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["policy.published", "assessment.completed"]);
    assert_eq!(lines[0]["occurred_at"], "2025-02-20T15:30:00Z");
}

const DAY: std::time::Duration = std::time::Duration::from_secs(86_400);

/// Posts `body` until it is accepted as new (202), for up to 10 s: pruning runs in the
/// background once the clock passed its hour.
async fn until_new(daemon: &InProcess, body: &[u8]) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let status = daemon.post_cl(body).await.status;
        if status == 202 {
            return;
        }
        assert_eq!(status, 200, "a duplicate until pruned");
        assert!(std::time::Instant::now() < deadline, "never pruned");
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
}

on_both_backends!(dedupe_records_expire_after_the_retention);

/// In-process, on a clock the test moves: a week's retention, not a second's. Past it the id
/// is forgotten, so the same delivery is a new event again while the first one stays stored.
async fn dedupe_records_expire_after_the_retention() {
    let dir = tempdir();
    let text = config(dir.path(), NO_LIMITS, &standard_rest(dir.path()))
        .replace("[storage]\n", "[storage]\ndedupe_retention = \"7d\"\n");
    let daemon = InProcess::start(dir.path(), &text).await;
    let body = scan_body("expiring");
    daemon.accept_cl(&body).await;
    assert_eq!(daemon.post_cl(&body).await.status, 200);
    // Six days on (pruning ran: it runs hourly on the daemon's clock), still a duplicate.
    daemon.clock.advance(6 * DAY);
    wait_jobs(&daemon, "succeeded", 1).await;
    assert_eq!(daemon.post_cl(&body).await.status, 200);

    daemon
        .clock
        .advance(DAY + std::time::Duration::from_secs(60));
    until_new(&daemon, &body).await;
    let stored = daemon.deliveries();
    assert_eq!(stored.len(), 2, "{stored:?}");
    assert!(stored.iter().all(|row| row.delivery_id == "expiring"));
    daemon.stop().await;
}

on_both_backends!(finished_events_expire_after_the_event_retention);

/// In-process, a month's retention stepped: the delivered event goes with its job and
/// attempts; the one whose delivery is still to come stays, however old.
async fn finished_events_expire_after_the_event_retention() {
    let dir = tempdir();
    let hook = dir.path().join("fails.sh");
    script(&hook, "exit 1");
    let rest = format!(
        r#"[sources.cl]
secret = "{CL_SECRET}"

[sinks.archive]
type = "file"
path = "{}"

[sinks.stuck]
type = "exec"
command = ["{}"]
delivery = {{ retry = {{ base = "90d", cap = "90d", max_age = "365d" }} }}

[[routes]]
name = "scans"
events = ["scan.completed"]
sinks = ["archive"]

[[routes]]
name = "alerts"
events = ["alert.triggered"]
sinks = ["stuck"]
"#,
        dir.path().join("events.jsonl").display(),
        hook.display()
    );
    let text = config(dir.path(), NO_LIMITS, &rest).replace(
        "[storage]\n",
        "[storage]\ndedupe_retention = \"30d\"\nevent_retention = \"30d\"\n",
    );
    let daemon = InProcess::start(dir.path(), &text).await;
    daemon
        .accept_cl(&sample("compliancelayer-scan.completed.json"))
        .await;
    daemon
        .accept_cl(&sample("compliancelayer-alert.triggered.json"))
        .await;
    // The file sink's lone job waits the hand-over's linger for company, on the clock too.
    daemon.clock.advance(std::time::Duration::from_millis(10));
    let job_states = |daemon: &InProcess| -> Vec<(String, String)> {
        let mut states: Vec<(String, String)> = daemon
            .deliveries()
            .into_iter()
            .filter_map(|row| Some((row.sink?, row.status.as_str().to_owned())))
            .collect();
        states.sort();
        states
    };
    let expected = [
        ("archive".to_owned(), "succeeded".to_owned()),
        ("stuck".to_owned(), "failed".to_owned()),
    ];
    eventually(|| {
        let states = job_states(&daemon);
        (states == expected)
            .then_some(())
            .ok_or(format!("{states:?}"))
    })
    .await;

    daemon.clock.advance(31 * DAY);
    eventually(|| match daemon.deliveries().as_slice() {
        [only] if only.event_type == "alert.triggered" => Ok(()),
        rows => Err(format!("{rows:?}")),
    })
    .await;
    assert_eq!(
        job_states(&daemon),
        [("stuck".to_owned(), "failed".to_owned())]
    );
    // The schema's own invariant: no attempt outlives its job.
    let orphans: i64 =
        daemon.value("SELECT count(*) FROM attempts WHERE job_id NOT IN (SELECT id FROM jobs)");
    assert_eq!(orphans, 0);
    daemon.stop().await;
}

/// Keys reach the unique index in batches, after their events: the ones not yet merged when
/// the process dies are merged from the events table at the next start, so every retry is
/// still a duplicate of the first copy.
#[tokio::test]
async fn delivery_ids_not_yet_merged_survive_a_crash() {
    let dir = tempdir();
    let text = config(dir.path(), NO_LIMITS, &standard_rest(dir.path()));
    let daemon = Daemon::start(dir.path(), &text);
    let bodies: Vec<Vec<u8>> = (0..3).map(|i| scan_body(&format!("crash-{i}"))).collect();
    let mut ids = Vec::new();
    for body in &bodies {
        ids.push(daemon.accept_cl(body).await.json["id"].clone());
    }
    // Held in memory so far (merges run a second apart, after a write), and still decisive.
    assert_eq!(daemon.count("dedupe"), 0);
    let retry = daemon.post_cl(&bodies[0]).await;
    assert_eq!((retry.status, &retry.json["id"]), (200, &ids[0]));
    daemon.kill9();

    let daemon = Daemon::start(dir.path(), &text);
    assert_eq!(daemon.count("dedupe"), 3, "{}", daemon.log());
    for (body, id) in bodies.iter().zip(&ids) {
        let retry = daemon.post_cl(body).await;
        assert_eq!(
            (retry.status, &retry.json["status"]),
            (200, &"duplicate".into())
        );
        assert_eq!(&retry.json["id"], id);
    }
    assert_eq!(daemon.event_count(), 3);
}

/// While deliveries keep coming, waiting keys are merged about once a second.
#[tokio::test]
async fn delivery_ids_are_merged_while_the_daemon_runs() {
    let dir = tempdir();
    let daemon = Daemon::start(
        dir.path(),
        &config(dir.path(), NO_LIMITS, &standard_rest(dir.path())),
    );
    daemon.accept_cl(&scan_body("early")).await;
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    daemon.accept_cl(&scan_body("late")).await;
    eventually(|| match daemon.count("dedupe") {
        0 => Err("nothing merged".to_owned()),
        _ => Ok(()),
    })
    .await;
    assert_eq!(daemon.post_cl(&scan_body("early")).await.status, 200);
    assert_eq!(daemon.post_cl(&scan_body("late")).await.status, 200);
}

on_both_backends!(a_pruning_backlog_delays_neither_requests_nor_a_stop);

/// A backlog of expired events (as after shortening the retention) goes a little at a time:
/// requests are answered meanwhile, and a SIGTERM stops the daemon at once, not after the
/// backlog.
async fn a_pruning_backlog_delays_neither_requests_nor_a_stop() {
    let dir = tempdir();
    let text = config(dir.path(), NO_LIMITS, &standard_rest(dir.path()));
    // The daemon makes the database; the backlog is then written into it, received in 1970.
    assert_eq!(Daemon::start(dir.path(), &text).terminate().code(), Some(0));
    let backlog = 100_000;
    match backend() {
        Backend::Sqlite => {
            let mut conn = rusqlite::Connection::open(dir.path().join("hookroute.db")).unwrap();
            let tx = conn.transaction().unwrap();
            tx.execute(
                &format!(
                    "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {backlog})
                     INSERT INTO events (source, delivery_id, event_type, received_at, payload)
                     SELECT 'cl', 'expired-' || i, 'scan.completed', 0, CAST('{{}}' AS BLOB) FROM n"
                ),
                [],
            )
            .unwrap();
            tx.execute(
                "INSERT INTO jobs (event_id, route, sink, status, attempts, next_attempt_at, created_at, updated_at)
                 SELECT id, 'everything', 'archive', 'succeeded', 1, 0, 0, 0 FROM events",
                [],
            )
            .unwrap();
            // Their delivery ids expired long ago: none is left to merge into the dedupe index.
            tx.execute(
                "UPDATE meta SET value = (SELECT max(id) FROM events) WHERE key = 'dedupe_merged'",
                [],
            )
            .unwrap();
            tx.commit().unwrap();
        }
        Backend::Postgres => {
            let database = std::fs::read_to_string(dir.path().join(PG_MARKER)).unwrap();
            crate::postgres::shared().psql(
                &database,
                &format!(
                    "WITH e AS (
                         INSERT INTO events (source, delivery_id, event_type, received_at, payload)
                         SELECT 'cl', 'expired-' || n, 'scan.completed', 0, '\\x7b7d'::bytea
                         FROM generate_series(1, {backlog}) AS n RETURNING id)
                     INSERT INTO jobs (event_id, route, sink, status, attempts, next_attempt_at,
                                       created_at, updated_at)
                     SELECT id, 'everything', 'archive', 'succeeded', 1, 0, 0, 0 FROM e"
                ),
            );
        }
    }
    let total = backlog;

    let daemon = Daemon::start(dir.path(), &text);
    eventually(|| match daemon.event_count() {
        n if n < total => Ok(()),
        n => Err(format!(
            "{n} events: pruning has not begun\n{}",
            daemon.log()
        )),
    })
    .await;
    for i in 0..20 {
        let sent = std::time::Instant::now();
        daemon.accept_cl(&scan_body(&format!("during-{i}"))).await;
        assert!(
            sent.elapsed() < std::time::Duration::from_millis(500),
            "a request took {:?} while pruning",
            sent.elapsed()
        );
    }
    let stopping = std::time::Instant::now();
    assert_eq!(daemon.terminate().code(), Some(0));
    assert!(
        stopping.elapsed() < std::time::Duration::from_secs(3),
        "stopping took {:?}",
        stopping.elapsed()
    );
    let left: i64 = db_value(dir.path(), "SELECT count(*) FROM events");
    assert!(
        left > 1000,
        "the backlog was not the point: only {left} left"
    );
}

on_both_backends!(a_reconciling_source_keys_a_scan_by_its_job);
/// A source that reconciles with the sender's API keys a scan by its job id: a second
/// webhook about the same scan under another event id is a duplicate (as the reconciled
/// event of that scan will be), while a source without an API keys by the event id.
async fn a_reconciling_source_keys_a_scan_by_its_job() {
    let dir = tempdir();
    std::fs::write(dir.path().join("api.key"), "cl_test_key_0123456789").unwrap();
    let rest = standard_rest(dir.path()).replace(
        "[sources.cl]\n",
        "[sources.cl]\napi = { key = { file = \"api.key\" }, base_url = \"http://127.0.0.1:9/v1\" }\n",
    );
    let rest = format!("{rest}\n[sources.plain]\nsecret = \"{CL_SECRET}\"\n");
    let daemon = InProcess::start(dir.path(), &config(dir.path(), NO_LIMITS, &rest)).await;
    ready(&daemon).await;
    let scan = |id: &str| {
        serde_json::json!({
            "id": id, "type": "scan.completed",
            "data": {"job_id": 67890, "domain": "example.com", "grade": "D"}
        })
        .to_string()
        .into_bytes()
    };
    let first = daemon.accept_cl(&scan("evt-1")).await;
    assert_eq!(first.json["delivery_id"], "job:67890");
    let again = daemon.post_cl(&scan("evt-2")).await;
    assert_eq!(
        (again.status, &again.json["status"]),
        (200, &"duplicate".into())
    );
    // Without an API the event id is the key, as before.
    for id in ["evt-1", "evt-2"] {
        let body = scan(id);
        let signed = [("x-compliancelayer-signature", hmac_hex(CL_SECRET, &[&body]))];
        let answer = daemon.post("/hooks/plain", &body, &signed).await;
        assert_eq!(
            (answer.status, answer.json["delivery_id"].as_str()),
            (202, Some(id))
        );
    }
    assert_eq!(daemon.event_count(), 3);
    daemon.stop().await;
}
