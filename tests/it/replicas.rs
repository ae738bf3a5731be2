//! Several daemons on one PostgreSQL database (a real server: `postgres::Cluster`): dedupe
//! exact across them, each job delivered once.

use std::collections::HashMap;

use crate::email::Smtp;
use crate::harness::*;
use crate::postgres::{Cluster, database_name, shared};
use crate::recorder::Recorder;
use hookroute::store::admin::RowStatus;

/// A daemon's configuration on the PostgreSQL database `url`, with the standard source and
/// its file sink in `dir`.
fn pg_config(dir: &std::path::Path, cluster: &Cluster, url: &str) -> String {
    with_rest(cluster, url, &standard_rest(dir))
}

/// A daemon's configuration on `url`, with `rest` (sources, sinks, routes).
pub fn with_rest(cluster: &Cluster, url: &str, rest: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
shutdown_timeout = "5s"
{NO_LIMITS}

[storage]
url = "{url}"
password = {{ file = "{}" }}
lease = "2s"

{}"#,
        cluster.password_file.display(),
        rest
    )
}

/// Two daemons in two directories on one new database.
fn two_daemons(cluster: &Cluster) -> ([tempfile::TempDir; 2], [Daemon; 2]) {
    let url = cluster.database();
    let dirs = [tempdir(), tempdir()];
    let daemons =
        [0, 1].map(|i| Daemon::start(dirs[i].path(), &pg_config(dirs[i].path(), cluster, &url)));
    (dirs, daemons)
}

/// Sends a signed scan with delivery id `id` to the daemon at `addr`, as a load balancer
/// would pass it on; whether it was acknowledged (2xx).
async fn send_scan(client: &reqwest::Client, addr: std::net::SocketAddr, id: &str) -> bool {
    let body = scan_body(id);
    let sent = client
        .post(format!("http://{addr}/hooks/cl"))
        .header("content-type", "application/json")
        .header("x-compliancelayer-signature", hmac_hex(CL_SECRET, &[&body]))
        .body(body)
        .send()
        .await;
    sent.is_ok_and(|reply| reply.status().is_success())
}

/// Delivery ids of every line the daemons' file sinks wrote, with how often each came.
fn delivered(dirs: &[tempfile::TempDir]) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for dir in dirs {
        for line in read_lines(&dir.path().join("events.jsonl")) {
            *seen
                .entry(line["delivery_id"].as_str().unwrap().to_owned())
                .or_default() += 1;
        }
    }
    seen
}

#[tokio::test]
async fn a_daemon_on_postgres_stores_a_delivery_once_and_delivers_it() {
    let cluster = shared();
    let url = cluster.database();
    let dir = tempdir();
    let daemon = Daemon::start(dir.path(), &pg_config(dir.path(), cluster, &url));
    let body = sample("compliancelayer-scan.completed.json");
    let first = daemon.accept_cl(&body).await;
    let retry = daemon.post_cl(&body).await;
    assert_eq!(
        (retry.status, &retry.json["status"]),
        (200, &"duplicate".into())
    );
    assert_eq!(retry.json["id"], first.json["id"]);
    let lines = wait_lines(&dir.path().join("events.jsonl"), 1).await;
    assert_eq!(lines[0]["payload"]["data"]["grade"], "B");
    let db = database_name(&url);
    assert_eq!(delivery_ids_at(dir.path()).len(), 1);
    // The lease goes with the outcome (the schema's leased_by column).
    eventually(|| {
        let status = cluster.psql(db, "SELECT status || ' ' || (leased_by IS NULL) FROM jobs");
        (status == "succeeded true\n").then_some(()).ok_or(status)
    })
    .await;
    assert!(
        !daemon.log().contains(crate::postgres::PASSWORD),
        "the password is never logged"
    );
    daemon.terminate();
    assert_eq!(
        cluster.psql(db, "SELECT count(*) FROM replicas"),
        "0\n",
        "a daemon that stops leaves the replicas"
    );
}

#[tokio::test]
async fn fifty_copies_over_two_daemons_store_one_and_deliver_it_once() {
    let cluster = shared();
    let (dirs, daemons) = two_daemons(cluster);
    let body = scan_body("one-delivery-two-daemons");
    let copies = (0..50).map(|i| daemons[i % 2].post_cl(&body));
    let replies = futures_util::future::join_all(copies).await;
    let statuses: Vec<u16> = replies.iter().map(|r| r.status).collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 202).count(),
        1,
        "{statuses:?}"
    );
    assert!(
        statuses.iter().all(|s| *s == 202 || *s == 200),
        "{statuses:?}"
    );
    assert_eq!(delivery_ids_at(dirs[0].path()).len(), 1);
    assert_eq!(jobs_at(dirs[1].path()).values().sum::<i64>(), 1);
    eventually(|| {
        let seen = delivered(&dirs);
        (seen.values().sum::<usize>() == 1)
            .then_some(())
            .ok_or(format!("{seen:?}"))
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(delivered(&dirs).values().sum::<usize>(), 1);
    for daemon in daemons {
        daemon.terminate();
    }
}

#[tokio::test]
async fn a_thousand_deliveries_over_two_daemons_are_each_delivered_once() {
    let cluster = shared();
    let (dirs, daemons) = two_daemons(cluster);
    let ids: Vec<String> = (0..1000).map(|i| format!("spread-{i}")).collect();
    for chunk in ids.chunks(50) {
        let sends = chunk.iter().enumerate().map(|(i, id)| {
            let (daemon, body) = (&daemons[i % 2], scan_body(id));
            async move { daemon.accept_cl(&body).await }
        });
        futures_util::future::join_all(sends).await;
    }
    let seen = eventually(|| {
        let seen = delivered(&dirs);
        (seen.len() == ids.len())
            .then_some(seen.clone())
            .ok_or(format!("{} of {} delivered", seen.len(), ids.len()))
    })
    .await;
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    assert_eq!(delivery_ids_at(dirs[0].path()).len(), 1000);
    assert_eq!(jobs_at(dirs[1].path()).get("succeeded"), Some(&1000));
    for daemon in daemons {
        assert!(daemon.terminate().success());
    }
}

/// Deliveries arriving together share a transaction; one that PostgreSQL refuses (here a
/// trigger refuses its type) fails alone, with a 503 its sender retries, never the others.
#[tokio::test]
async fn an_event_postgres_refuses_fails_alone_not_the_transaction_it_shared() {
    let cluster = shared();
    let url = cluster.database();
    let db = database_name(&url);
    let dir = tempdir();
    let daemon = Daemon::start(dir.path(), &pg_config(dir.path(), cluster, &url));
    cluster.psql(
        db,
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.event_type = 'scan.refused' THEN RAISE EXCEPTION 'refused'; END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER refuse BEFORE INSERT ON events FOR EACH ROW EXECUTE FUNCTION refuse()",
    );
    let refused = |id: &str| {
        serde_json::json!({"id": id, "type": "scan.refused", "data": {}})
            .to_string()
            .into_bytes()
    };
    let mut answers = Vec::new();
    for round in 0..5 {
        let sends = (0..40).map(|i| {
            let id = format!("shared-{round}-{i}");
            let (poison, daemon) = (i % 20 == 7, &daemon);
            let body = if poison { refused(&id) } else { scan_body(&id) };
            async move { (poison, daemon.post_cl(&body).await.status) }
        });
        answers.extend(futures_util::future::join_all(sends).await);
    }
    for (poison, status) in &answers {
        assert_eq!(*status, if *poison { 503 } else { 202 }, "{answers:?}");
    }
    assert_eq!(delivery_ids_at(dir.path()).len(), 190);
    eventually(|| {
        let seen = delivered(std::slice::from_ref(&dir));
        (seen.len() == 190)
            .then_some(())
            .ok_or(format!("{} of 190 delivered", seen.len()))
    })
    .await;
    assert!(daemon.terminate().success());
}

/// PostgreSQL going away is a 503 with `Retry-After` (never a 2xx for an event that is not
/// stored), `/readyz` says so, and the daemon recovers by itself when the server is back.
#[tokio::test]
async fn postgres_down_is_503_and_the_daemon_recovers_when_it_is_back() {
    let cluster = Cluster::start();
    let url = cluster.database();
    let dir = tempdir();
    let daemon = Daemon::start(dir.path(), &pg_config(dir.path(), &cluster, &url));
    daemon.accept_cl(&scan_body("before")).await;

    cluster.stop();
    // #23.2: within a second, not the pool's old 5 s: a load balancer probing with a 2 s
    // timeout must see a 503, not a hang.
    let asked = std::time::Instant::now();
    let reply = daemon.post_cl(&scan_body("while-down")).await;
    assert_eq!((reply.status, reply.error()), (503, "storage_unavailable"));
    assert!(reply.headers.contains_key("retry-after"));
    assert!(
        asked.elapsed() < std::time::Duration::from_millis(1200),
        "{:?}",
        asked.elapsed()
    );
    let asked = std::time::Instant::now();
    assert_eq!(daemon.get_status("/readyz").await, 503);
    assert!(
        asked.elapsed() < std::time::Duration::from_millis(1200),
        "{:?}",
        asked.elapsed()
    );

    cluster.restart();
    // The sender's retry is stored once the server is back.
    let mut stored = false;
    for _ in 0..50 {
        if daemon.post_cl(&scan_body("while-down")).await.status == 202 {
            stored = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(stored, "the daemon did not recover: {}", daemon.log());
    let mut stored: Vec<String> = deliveries_at(dir.path())
        .into_iter()
        .map(|row| row.delivery_id)
        .collect();
    stored.reverse(); // the list is newest first
    assert_eq!(stored, ["before", "while-down"]);
    wait_lines(&dir.path().join("events.jsonl"), 2).await;
    assert_eq!(read_lines(&dir.path().join("events.jsonl")).len(), 2);
}

/// A replica killed while it holds jobs (its sink hangs) leaves them to the other once its
/// lease runs out; while it lives, the other never takes them. Nothing is lost, and nothing
/// is delivered twice here: the killed replica's attempts never reached the sink.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replicas_jobs_are_delivered_by_the_other_after_its_lease() {
    const EVENTS: usize = 20;
    let cluster = shared();
    let url = cluster.database();
    let db = database_name(&url);
    let shared_dir = tempdir();
    // Nobody reads the FIFO yet: the sink's first write blocks, as a hung sink would.
    let fifo = fifo(shared_dir.path(), "sink.fifo");
    let rest = format!(
        "[sources.cl]\nsecret = \"{CL_SECRET}\"\n\n[sinks.slow]\ntype = \"file\"\npath = \"{}\"\ndelivery = {{ concurrency = 1 }}\n\n[[routes]]\nname = \"all\"\nevents = [\"*\"]\nsinks = [\"slow\"]\n",
        fifo.display()
    );
    let dirs = [tempdir(), tempdir()];
    let first = Daemon::start(dirs[0].path(), &with_rest(cluster, &url, &rest));
    for i in 0..EVENTS {
        first.accept_cl(&scan_body(&format!("held-{i}"))).await;
    }
    let second = Daemon::start(dirs[1].path(), &with_rest(cluster, &url, &rest));
    let holders = || {
        cluster.psql(
            db,
            "SELECT count(DISTINCT leased_by) || ' ' || count(leased_by) FROM jobs",
        )
    };
    // Longer than a lease: the first replica beats, so its jobs stay its own.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!(
        holders(),
        format!("1 {EVENTS}\n"),
        "every job leased to the first replica"
    );
    let owner = cluster.psql(db, "SELECT DISTINCT leased_by FROM jobs");
    assert_eq!(cluster.psql(db, "SELECT min(id) FROM replicas"), owner);

    first.kill9();
    let received = fifo_lines(fifo);
    let mut seen: HashMap<String, usize> = HashMap::new();
    while seen.values().sum::<usize>() < EVENTS {
        let line = received
            .recv_timeout(std::time::Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("{seen:?}\n{}", second.log()));
        let line: serde_json::Value = serde_json::from_str(&line).unwrap();
        *seen
            .entry(line["delivery_id"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    eventually(|| {
        let done = jobs_at(dirs[1].path());
        (done.get("succeeded") == Some(&(EVENTS as i64)))
            .then_some(())
            .ok_or(format!("{done:?}"))
    })
    .await;
    while let Ok(line) = received.recv_timeout(std::time::Duration::from_millis(300)) {
        let line: serde_json::Value = serde_json::from_str(&line).unwrap();
        *seen
            .entry(line["delivery_id"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    assert_eq!(seen.len(), EVENTS, "every job delivered");
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "duplicates: {twice:?}");
    assert!(second.terminate().success());
}

/// A rolling restart under a steady flood, as a load balancer sees it: SIGTERM one replica
/// (it drains and releases its jobs), start it again, then the other. Every delivery that got
/// a 2xx from either is stored once and delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_a_flood_loses_nothing() {
    use std::sync::{Arc, Mutex};
    let cluster = shared();
    let url = cluster.database();
    let dirs = [tempdir(), tempdir()];
    let configs =
        [0, 1].map(|i| write_config(dirs[i].path(), &pg_config(dirs[i].path(), cluster, &url)));
    let start = |i: usize| Daemon::start_with(dirs[i].path(), &configs[i], &[]);
    let mut daemons = [Some(start(0)), Some(start(1))];
    // The addresses the "load balancer" sends to: whichever replicas are up.
    let up: Arc<Mutex<Vec<std::net::SocketAddr>>> = Arc::new(Mutex::new(
        daemons.iter().flatten().map(|d| d.addr).collect(),
    ));
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = tokio::spawn({
        let (up, acked, stop) = (Arc::clone(&up), Arc::clone(&acked), Arc::clone(&stop));
        async move {
            let client = http_client();
            let mut n = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && n < 5000 {
                let targets = up.lock().unwrap().clone();
                let Some(addr) = targets.get(n % targets.len().max(1)) else {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                };
                let id = format!("rolling-{n}");
                if send_scan(&client, *addr, &id).await {
                    acked.lock().unwrap().push(id);
                }
                n += 1;
            }
        }
    });
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    for i in [0, 1] {
        let daemon = daemons[i].take().unwrap();
        up.lock().unwrap().retain(|addr| *addr != daemon.addr);
        assert!(daemon.terminate().success(), "replica {i} drained");
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let daemon = start(i);
        up.lock().unwrap().push(daemon.addr);
        daemons[i] = Some(daemon);
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    flood.await.unwrap();
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 100,
        "the flood ran: {} acknowledged",
        acked.len()
    );
    let seen = eventually(|| {
        let seen = delivered(&dirs);
        let missing = acked.iter().filter(|id| !seen.contains_key(*id)).count();
        (missing == 0).then_some(seen.clone()).ok_or(format!(
            "{missing} of {} acknowledged not delivered",
            acked.len()
        ))
    })
    .await;
    let stored = delivery_ids_at(dirs[0].path()).len();
    assert_eq!(stored, acked.len(), "every 2xx stored, nothing else");
    // A graceful stop finishes the sink calls it made and records them: nothing repeats.
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "delivered twice: {twice:?}");
}

/// A sink's `concurrency` holds across replicas: however the events are spread over two
/// daemons, the receiver never answers more calls at once than the limit, and each event
/// reaches it once. With a limit of one, the replica without a share leaves its events' jobs
/// to the one with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sinks_concurrency_is_a_limit_across_replicas() {
    const EVENTS: usize = 16;
    let cluster = shared();
    for concurrency in [1, 3] {
        let url = cluster.database();
        let receiver = Recorder::start().await;
        receiver.set_delay(std::time::Duration::from_millis(150));
        let rest = format!(
            "[sources.cl]\nsecret = \"{CL_SECRET}\"\n\n[sinks.receiver]\ntype = \"http\"\nurl = \"{}\"\ndelivery = {{ concurrency = {concurrency} }}\n\n[[routes]]\nname = \"all\"\nevents = [\"*\"]\nsinks = [\"receiver\"]\n",
            receiver.url("/")
        );
        let dirs = [tempdir(), tempdir()];
        let daemons =
            [0, 1].map(|i| Daemon::start(dirs[i].path(), &with_rest(cluster, &url, &rest)));
        // Both replicas have seen each other and settled their shares.
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        for i in 0..EVENTS {
            daemons[i % 2]
                .accept_cl(&scan_body(&format!("limited-{concurrency}-{i}")))
                .await;
        }
        eventually(|| {
            let n = receiver.requests().len();
            (n >= EVENTS)
                .then_some(())
                .ok_or(format!("{n} of {EVENTS} delivered"))
        })
        .await;
        let mut ids: Vec<String> = receiver
            .requests()
            .iter()
            .map(|r| r.json()["delivery_id"].as_str().unwrap().to_owned())
            .collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), EVENTS, "each event delivered once");
        assert_eq!(
            receiver.most_in_flight(),
            concurrency,
            "at most {concurrency} calls at once across both replicas"
        );
        for daemon in daemons {
            assert!(daemon.terminate().success());
        }
    }
}

/// Throttle windows and digests are the database's, not a replica's: events of one throttle
/// key sent to both replicas at once open one window (one delivered, the rest suppressed),
/// and a digest sink fed by both sends one email for its window, with every event in it.
/// In-process, both replicas on one clock the test moves: the window is a realistic 15 min.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttles_and_digests_are_shared_across_replicas() {
    const COPIES: usize = 10;
    const WINDOW: std::time::Duration = std::time::Duration::from_secs(15 * 60);
    let cluster = shared();
    let url = cluster.database();
    let smtp_dir = tempdir();
    let smtp = Smtp::start(smtp_dir.path(), "shared-digest", "plain", None, None);
    let dirs = [tempdir(), tempdir()];
    let clock = hookroute::clock::ManualClock::new(jiff::Timestamp::now());
    let mut daemons = Vec::new();
    for dir in &dirs {
        let rest = format!(
            r#"
[sources.cl]
secret = "{CL_SECRET}"

[sinks.archive]
type = "file"
path = "{}"

[sinks.digest]
type = "email"
url = "smtp://127.0.0.1:{}"
starttls = "never"
from = "h@example.com"
to = ["ops@example.com"]
digest = "15m"

[[routes]]
name = "per domain"
events = ["scan.completed"]
sinks = ["archive"]
throttle = {{ window = "1h", key = "data.domain" }}
continue = true

[[routes]]
name = "digest"
events = ["*"]
sinks = ["digest"]
"#,
            dir.path().join("events.jsonl").display(),
            smtp.port
        );
        let config = with_rest(cluster, &url, &rest);
        daemons.push(InProcess::start_on(dir.path(), &config, clock.clone()).await);
    }
    // Copies of one key (distinct deliveries, one window), all at once over both replicas.
    let sends = (0..COPIES).map(|i| {
        let body = format!(
            r#"{{"id": "throttled-{i}", "type": "scan.completed", "created_at": "2026-03-08T12:0{i}:00Z", "data": {{"domain": "a.com"}}}}"#
        );
        let daemon = &daemons[i % 2];
        async move { daemon.accept_cl(body.as_bytes()).await }
    });
    futures_util::future::join_all(sends).await;
    // The archive's one call at a time may be the other replica's: it finds the job when it
    // looks at the queue, which takes its clock moving (a second in a few milliseconds).
    let looking = Ticking::start(&clock, std::time::Duration::from_secs(1));
    let archived = eventually(|| {
        let seen = delivered(&dirs);
        (!seen.is_empty())
            .then_some(seen)
            .ok_or("nothing archived".to_owned())
    })
    .await;
    let rows = daemons[0].deliveries();
    let suppressed = rows.iter().filter(|row| {
        row.status == RowStatus::Suppressed && row.detail.as_deref() == Some("a.com")
    });
    assert_eq!(suppressed.count(), COPIES - 1, "one window for the key");
    drop(looking);

    clock.advance(WINDOW);
    let messages = smtp.messages(1).await;
    let subject = messages[0]["subject"].as_str().unwrap();
    assert!(
        subject == format!("Scans completed: {COPIES} domains"),
        "every event in the one digest: {subject}"
    );
    wait_jobs(&daemons[0], "succeeded", COPIES as i64 + 1).await;
    // Another window on, with nothing new: no second digest from the other replica.
    clock.advance(WINDOW);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(smtp.received().len(), 1, "one email for the window");
    assert_eq!(
        delivered(&dirs),
        archived,
        "one event of the key archived, once"
    );
    assert_eq!(archived.values().sum::<usize>(), 1);
    let digested = daemons[1]
        .deliveries()
        .into_iter()
        .filter(|row| row.sink.as_deref() == Some("digest") && row.status == RowStatus::Succeeded);
    assert_eq!(digested.count(), COPIES);
    for daemon in daemons {
        daemon.stop().await;
    }
}

/// A database a newer hookroute migrated is refused, by the daemon and by the tools, with a
/// message saying so; nothing is written to it.
#[test]
fn a_newer_schema_is_refused() {
    let cluster = shared();
    let url = cluster.database();
    let dir = tempdir();
    let config = write_config(dir.path(), &pg_config(dir.path(), cluster, &url));
    let db = database_name(&url);
    // Migrated by this build first (the tools refuse a database no daemon has migrated).
    let tools = |args: &[&str]| {
        std::process::Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap()
    };
    let unmigrated = tools(&["deliveries", "list"]);
    assert!(!unmigrated.status.success());
    assert!(
        String::from_utf8_lossy(&unmigrated.stderr).contains("start the daemon once"),
        "{unmigrated:?}"
    );
    let daemon = Daemon::start_with(dir.path(), &config, &[]);
    assert!(daemon.terminate().success());
    assert_eq!(
        cluster.psql(db, "SELECT max(version) FROM hookroute_schema"),
        "6\n",
        "the replicas' table and what they hold of each sink; silences; groups; sinks' health; \
         reconcile passes"
    );
    cluster.psql(db, "INSERT INTO hookroute_schema (version) VALUES (99)");
    let before = cluster.psql(db, "SELECT count(*) FROM replicas");

    let serve = std::process::Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!serve.status.success());
    let said = String::from_utf8_lossy(&serve.stderr);
    assert!(
        said.contains("schema version 99") && said.contains("newer hookroute"),
        "{said}"
    );
    assert!(!said.contains(crate::postgres::PASSWORD));
    let listed = tools(&["deliveries", "list"]);
    assert!(String::from_utf8_lossy(&listed.stderr).contains("schema version 99"));
    assert_eq!(cluster.psql(db, "SELECT count(*) FROM replicas"), before);
}

/// `migrate-storage` moves a SQLite installation into PostgreSQL: its events, their delivery
/// ids (a retry of an old delivery is still a duplicate), jobs and attempts; run twice, the
/// second run copies nothing; new events continue after the copied ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_storage_moves_an_installation_idempotently() {
    let dir = tempdir();
    let old = Daemon::start(
        dir.path(),
        &config(dir.path(), NO_LIMITS, &standard_rest(dir.path())),
    );
    let bodies: Vec<Vec<u8>> = (0..3).map(|i| scan_body(&format!("moved-{i}"))).collect();
    for body in &bodies {
        old.accept_cl(body).await;
    }
    wait_jobs(&old, "succeeded", 3).await;
    assert!(old.terminate().success());

    let cluster = shared();
    let url = cluster.database();
    let db = database_name(&url);
    let migrate = || {
        std::process::Command::new(BIN)
            .args(["migrate-storage", "--from"])
            .arg(dir.path().join("hookroute.db"))
            .args(["--to", &url, "--password-file"])
            .arg(&cluster.password_file)
            .output()
            .unwrap()
    };
    let first = migrate();
    let said = String::from_utf8_lossy(&first.stdout);
    assert!(
        first.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(said.contains("events       3 rows copied"), "{said}");
    let second = migrate();
    let said = String::from_utf8_lossy(&second.stdout);
    assert!(second.status.success());
    assert!(
        said.contains("events       0 rows copied") && said.contains("dedupe       0"),
        "{said}"
    );
    assert_eq!(
        cluster.psql(
            db,
            "SELECT count(*) || ' ' || count(DISTINCT delivery_id) FROM events"
        ),
        "3 3\n"
    );
    assert_eq!(
        cluster.psql(db, "SELECT string_agg(status, ' ') FROM jobs"),
        "succeeded succeeded succeeded\n"
    );
    assert_eq!(cluster.psql(db, "SELECT count(*) FROM attempts"), "3\n");

    let new_dir = tempdir();
    let daemon = Daemon::start(new_dir.path(), &pg_config(new_dir.path(), cluster, &url));
    let retry = daemon.post_cl(&bodies[1]).await;
    assert_eq!(
        (retry.status, &retry.json["status"]),
        (200, &"duplicate".into())
    );
    let fresh = daemon.accept_cl(&scan_body("after-the-move")).await;
    assert!(fresh.json["id"].as_i64().unwrap() > 3, "{}", fresh.json);
    wait_lines(&new_dir.path().join("events.jsonl"), 1).await;
    assert_eq!(read_lines(&new_dir.path().join("events.jsonl")).len(), 1);
}

/// #23.12: two replicas, `concurrency = 8`, a steady stream, restarting one then the other:
/// the receiver saw 12 calls at once about 2 s after a replica rejoined (the other's calls,
/// made under its larger share while alone, still ran when the newcomer took its own). A
/// replica takes a share only out of what the others do not hold, calls in flight included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sinks_concurrency_holds_through_a_rolling_restart_under_load() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;
    const CONCURRENCY: usize = 8;
    let cluster = shared();
    let url = cluster.database();
    let receiver = Recorder::start().await;
    // Calls longer than a beat: those made while a replica was alone outlive its rejoining.
    receiver.set_delay(Duration::from_millis(1500));
    let rest = format!(
        "[sources.cl]\nsecret = \"{CL_SECRET}\"\n\n[sinks.receiver]\ntype = \"http\"\nurl = \"{}\"\ndelivery = {{ concurrency = {CONCURRENCY} }}\n\n[[routes]]\nname = \"all\"\nevents = [\"*\"]\nsinks = [\"receiver\"]\n",
        receiver.url("/")
    );
    let dirs = [tempdir(), tempdir()];
    let configs = [0, 1].map(|i| write_config(dirs[i].path(), &with_rest(cluster, &url, &rest)));
    let start = |i: usize| Daemon::start_with(dirs[i].path(), &configs[i], &[]);
    let mut daemons = [Some(start(0)), Some(start(1))];
    let up = Arc::new(std::sync::Mutex::new(
        daemons.iter().flatten().map(|d| d.addr).collect::<Vec<_>>(),
    ));
    let stop = Arc::new(AtomicBool::new(false));
    // About 20 deliveries a second, to whichever replicas are up.
    let stream = tokio::spawn({
        let (up, stop) = (Arc::clone(&up), Arc::clone(&stop));
        async move {
            let client = http_client();
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) && n < 2000 {
                let targets = up.lock().unwrap().clone();
                if let Some(addr) = targets.get(n % targets.len().max(1)) {
                    send_scan(&client, *addr, &format!("steady-{n}")).await;
                    n += 1;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    for i in [0, 1] {
        let daemon = daemons[i].take().unwrap();
        up.lock().unwrap().retain(|addr| *addr != daemon.addr);
        assert!(daemon.terminate().success(), "replica {i} drained");
        // Alone, the other takes the whole limit and fills it.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let daemon = start(i);
        up.lock().unwrap().push(daemon.addr);
        daemons[i] = Some(daemon);
        tokio::time::sleep(Duration::from_secs(4)).await;
    }
    stop.store(true, Ordering::Relaxed);
    stream.await.unwrap();
    assert!(receiver.requests().len() > 20, "the sink was busy");
    assert!(
        receiver.most_in_flight() <= CONCURRENCY,
        "{} calls at once, the limit is {CONCURRENCY}",
        receiver.most_in_flight()
    );
}
