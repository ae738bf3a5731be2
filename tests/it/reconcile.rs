//! Reconcile (#29): what the sender did that no webhook brought, from its API (a loopback
//! fake built from the reference's shapes), stored and delivered once whichever path brings
//! it first; the API's limits honoured; a refused key stops polling and says so; one replica
//! passes at a time; the key never shown.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::harness::*;

pub const API_KEY: &str = "cl_test_key_0123456789";

/// An answer the fake gives instead of the listing: a status and its headers.
type Canned = (u16, Vec<(&'static str, String)>);

/// A loopback stand-in for ComplianceLayer's API: lists what the test puts in it, answers
/// queued errors first, checks the key, and counts what it was asked.
#[derive(Default)]
pub struct FakeApi {
    pub scans: Mutex<Vec<Value>>,
    pub alerts: Mutex<Vec<Value>>,
    /// Each job's report (`/scan/jobs/:job_id/report`) and PDF, by job id.
    pub reports: Mutex<std::collections::HashMap<String, Value>>,
    pub pdfs: Mutex<std::collections::HashMap<String, Vec<u8>>>,
    /// Answered to the next requests, one each, before any listing.
    pub canned: Mutex<VecDeque<Canned>>,
    /// How long each answer takes.
    pub delay: Mutex<Duration>,
    /// Every path asked for, in order.
    pub asked: Mutex<Vec<String>>,
    in_flight: AtomicUsize,
    pub most_in_flight: AtomicUsize,
}

impl FakeApi {
    /// Serves it on a loopback port; returns it and its base URL (`…/v1`).
    pub async fn start() -> (Arc<Self>, String) {
        let fake = Arc::new(Self::default());
        let app = axum::Router::new()
            .route("/v1/{*path}", axum::routing::get(answer))
            .with_state(Arc::clone(&fake));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (fake, format!("http://{addr}/v1"))
    }

    pub fn requests(&self) -> usize {
        self.asked.lock().unwrap().len()
    }
}

async fn answer(
    axum::extract::State(fake): axum::extract::State<Arc<FakeApi>>,
    axum::extract::Path(path): axum::extract::Path<String>,
    headers: HeaderMap,
) -> Response {
    fake.asked.lock().unwrap().push(path.clone());
    let now = fake.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    fake.most_in_flight.fetch_max(now, Ordering::SeqCst);
    let delay = *fake.delay.lock().unwrap();
    tokio::time::sleep(delay).await;
    fake.in_flight.fetch_sub(1, Ordering::SeqCst);
    let authorised = headers
        .get("authorization")
        .is_some_and(|v| v == format!("Bearer {API_KEY}").as_str());
    if !authorised {
        let error = json!({"error": "unauthorized", "message": "Invalid or missing authentication", "status": 401});
        return (StatusCode::UNAUTHORIZED, axum::Json(error)).into_response();
    }
    if let Some((status, headers)) = fake.canned.lock().unwrap().pop_front() {
        let status = StatusCode::from_u16(status).unwrap();
        let error =
            json!({"error": "canned", "message": "as the test said", "status": status.as_u16()});
        let mut response = (status, axum::Json(error)).into_response();
        for (name, value) in headers {
            response.headers_mut().insert(name, value.parse().unwrap());
        }
        return response;
    }
    let report = path
        .strip_prefix("scan/jobs/")
        .and_then(|rest| rest.strip_suffix("/report"))
        .and_then(|job| fake.reports.lock().unwrap().get(job).cloned());
    if let Some(report) = report {
        return axum::Json(report).into_response();
    }
    let pdf = path
        .strip_prefix("compliance/reports/")
        .and_then(|rest| rest.strip_suffix("/pdf"))
        .and_then(|job| fake.pdfs.lock().unwrap().get(job).cloned());
    if let Some(pdf) = pdf {
        return ([("content-type", "application/pdf")], pdf).into_response();
    }
    match path.as_str() {
        "scan/history" => axum::Json(json!({"scans": *fake.scans.lock().unwrap()})).into_response(),
        "domains/alerts" => {
            axum::Json(json!({"alerts": *fake.alerts.lock().unwrap()})).into_response()
        }
        _ => (
            StatusCode::NOT_FOUND,
            axum::Json(
                json!({"error": "not_found", "message": "Resource not found", "status": 404}),
            ),
        )
            .into_response(),
    }
}

/// A completed scan as `/scan/history` lists it.
pub fn scan(job: u64, domain: &str, score: u64, grade: &str) -> Value {
    json!({
        "job_id": job, "scan_id": job - 1000, "status": "completed", "domain": domain,
        "score": score, "grade": grade, "critical_issues": u64::from(grade == "F") * 2,
        "completed_at": jiff::Timestamp::now().to_string()
    })
}

/// The standard configuration, its `cl` source reconciling every `every` with the fake at
/// `api`; the key read from `api.key` in `dir`.
fn reconciling(dir: &Path, api: &str, every: &str) -> String {
    config(dir, NO_LIMITS, &reconciling_rest(dir, api, every))
}

/// [`reconciling`]'s sources, sinks and routes.
fn reconciling_rest(dir: &Path, api: &str, every: &str) -> String {
    std::fs::write(dir.join("api.key"), API_KEY).unwrap();
    standard_rest(dir).replace(
        "[sources.cl]\n",
        &format!("[sources.cl]\napi = {{ key = {{ file = \"api.key\" }}, base_url = \"{api}\", reconcile = \"{every}\" }}\n"),
    )
}

/// Runs the real binary's command line, off the runtime's workers (the daemon in the test
/// needs them while `--once` waits for it).
pub async fn cli(args: &[&str], config: &Path) -> (Option<i32>, String) {
    let mut command = std::process::Command::new(BIN);
    command.args(args).arg("--config").arg(config);
    let out = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

async fn metrics(daemon: &Endpoint) -> String {
    let response = daemon
        .client
        .get(daemon.url("/metrics"))
        .send()
        .await
        .unwrap();
    response.text().await.unwrap()
}

on_both_backends!(scans_no_webhook_brought_are_reconciled_and_delivered_once);
/// The daemon was down while three scans completed (their webhooks never came): at start it
/// reads the history and stores and delivers each once; the sender's late retry of one
/// webhook is then a duplicate.
async fn scans_no_webhook_brought_are_reconciled_and_delivered_once() {
    let dir = tempdir();
    let (fake, api) = FakeApi::start().await;
    *fake.scans.lock().unwrap() = vec![
        scan(1001, "a.example", 91, "A"),
        scan(1002, "b.example", 55, "F"),
        scan(1003, "c.example", 77, "C"),
        json!({"job_id": 1004, "scan_id": 4, "status": "running", "domain": "d.example"}),
    ];
    let daemon = InProcess::start(dir.path(), &reconciling(dir.path(), &api, "1m")).await;
    ready(&daemon).await;
    let _ticking = Ticking::start(&daemon.clock, Duration::from_millis(20));
    let lines = wait_lines(&dir.path().join("events.jsonl"), 3).await;
    let mut keys: Vec<String> = lines
        .iter()
        .map(|line| line["delivery_id"].as_str().unwrap().to_owned())
        .collect();
    keys.sort();
    assert_eq!(keys, ["job:1001", "job:1002", "job:1003"]);
    assert!(
        lines
            .iter()
            .all(|line| line["payload"]["origin"] == "reconcile")
    );
    assert!(
        lines
            .iter()
            .any(|line| line["payload"]["data"]["grade"] == "F")
    );
    assert_eq!(fake.requests(), 2, "one request per endpoint per pass");

    // The sender's late retry of one scan's webhook: a duplicate, not a second delivery.
    let late = json!({
        "id": "550e8400-late", "type": "scan.completed",
        "data": {"job_id": 1002, "domain": "b.example", "grade": "F"}
    })
    .to_string();
    let answer = daemon.post_cl(late.as_bytes()).await;
    assert_eq!(
        (answer.status, &answer.json["status"]),
        (200, &"duplicate".into())
    );
    assert_eq!(daemon.event_count(), 3);

    let scraped = metrics(&daemon).await;
    for line in [
        r#"hookroute_reconcile_runs_total{source="cl",outcome="ok"} 1"#,
        r#"hookroute_reconciled_events_total{source="cl",type="scan.completed"} 3"#,
        r#"hookroute_reconcile_last_success_timestamp_seconds{source="cl"} "#,
    ] {
        assert!(scraped.contains(line), "{line} not in\n{scraped}");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(read_lines(&dir.path().join("events.jsonl")).len(), 3);
    daemon.stop().await;
}

on_both_backends!(what_a_webhook_brought_first_is_not_reconciled_again);
/// A scan's and an alert's webhooks come first; then the API lists them, and one alert no
/// webhook brought. `--dry-run` names that one alone and stores nothing; `--once` has the
/// daemon reconcile it, and `show` says where it came from.
async fn what_a_webhook_brought_first_is_not_reconciled_again() {
    let dir = tempdir();
    let (fake, api) = FakeApi::start().await;
    // With the status page, which says how the passes went.
    let port = crate::web::free_port();
    let rest = reconciling_rest(dir.path(), &api, "1h");
    let daemon = InProcess::start(
        dir.path(),
        &crate::web::page_config(dir.path(), port, &rest),
    )
    .await;
    ready(&daemon).await;
    let _ticking = Ticking::start(&daemon.clock, Duration::from_millis(20));
    let config = dir.path().join("config.toml");
    // The pass at start finds nothing.
    let first = eventually(|| {
        let asked = fake.requests();
        (asked == 2)
            .then_some(())
            .ok_or(format!("{asked} requests"))
    });
    first.await;

    let hour_ago = jiff::Timestamp::now() - jiff::SignedDuration::from_hours(1);
    let alert_at = jiff::Timestamp::from_second(hour_ago.as_second()).unwrap();
    let webhook = json!({
        "id": "550e8400-e29b-41d4-a716-446655449001", "type": "scan.completed",
        "created_at": format!("{hour_ago:.3}"),
        "data": {"job_id": 2001, "scan_id": 1001, "domain": "first.example", "score": 88, "grade": "B"}
    });
    daemon.accept_cl(webhook.to_string().as_bytes()).await;
    let alert = json!({
        "id": "550e8400-e29b-41d4-a716-446655449002", "type": "alert.triggered",
        "created_at": format!("{alert_at:.3}"),
        "data": {"domain": "first.example", "alert_type": "score_drop", "severity": "high",
                 "previous_score": 85, "current_score": 61, "threshold": 70}
    });
    daemon.accept_cl(alert.to_string().as_bytes()).await;
    assert_eq!(daemon.event_count(), 2);

    let now = jiff::Timestamp::now();
    *fake.scans.lock().unwrap() = vec![json!({
        "job_id": "2001", "scan_id": 1001, "status": "completed", "domain": "first.example",
        "score": 88, "grade": "B", "completed_at": hour_ago.to_string()
    })];
    *fake.alerts.lock().unwrap() = vec![
        // The alert the webhook brought, as the API spells its time (no milliseconds).
        json!({"id": 7, "domain": "First.example", "alert_type": "score_drop", "severity": "high",
               "created_at": alert_at.to_string()}),
        json!({"id": 8, "domain": "first.example", "alert_type": "critical_finding",
               "severity": "critical", "message": "Port 23 (telnet) open", "created_at": now.to_string()}),
    ];
    let expected = format!("alert:first.example:critical_finding:{}", now.as_second());

    let (code, said) = cli(&["reconcile", "--dry-run"], &config).await;
    assert_eq!(code, Some(0), "{said}");
    assert!(
        said.contains("cl: listed 3; 1 would be reconciled, 2 already stored"),
        "{said}"
    );
    assert!(said.contains(&expected), "{said}");
    assert!(!said.contains("job:2001 "), "{said}");
    assert_eq!(daemon.event_count(), 2, "a dry run stores nothing");

    let (code, said) = cli(&["reconcile", "--once"], &config).await;
    assert_eq!(code, Some(0), "{said}");
    assert!(
        said.contains(&format!(
            "ok: listed 3, reconciled 1, already stored 2: {expected}"
        )),
        "{said}"
    );
    assert_eq!(daemon.event_count(), 3);
    let lines = wait_lines(&dir.path().join("events.jsonl"), 3).await;
    let reconciled = lines
        .iter()
        .find(|line| line["payload"]["origin"] == "reconcile")
        .unwrap();
    assert_eq!(
        reconciled["payload"]["data"]["message"],
        "Port 23 (telnet) open"
    );

    let newest = daemon.deliveries()[0].event_id.to_string();
    let (code, shown) = cli(&["deliveries", "show", &newest], &config).await;
    assert_eq!(code, Some(0), "{shown}");
    assert!(shown.contains("origin:        reconcile"), "{shown}");
    let (_, summary) = cli(&["check-config"], &config).await;
    assert!(summary.contains(" reconcile=1h lookback=1day"), "{summary}");
    let (_, status) = cli(&["reconcile"], &config).await;
    assert!(
        status.contains("cl: last pass") && status.contains(" ok: listed 3"),
        "{status}"
    );
    daemon.stop().await;
}

on_both_backends!(the_apis_limits_are_honoured);
/// A 500 fails the pass (the next one tries again); a 429 with `Retry-After` quiets the
/// daemon for that long: a pass asked for meanwhile makes no request at all.
async fn the_apis_limits_are_honoured() {
    let dir = tempdir();
    let (fake, api) = FakeApi::start().await;
    fake.canned.lock().unwrap().extend([
        (500, vec![]),
        (429, vec![("retry-after", "3600".to_owned())]),
    ]);
    *fake.scans.lock().unwrap() = vec![scan(3001, "a.example", 91, "A")];
    let daemon = InProcess::start(dir.path(), &reconciling(dir.path(), &api, "1h")).await;
    ready(&daemon).await;
    let _ticking = Ticking::start(&daemon.clock, Duration::from_millis(20));
    let config = dir.path().join("config.toml");
    eventually(|| {
        let row = daemon.tools(|tools| tools.pass("cl").unwrap());
        (row.outcome.as_deref() == Some("failed"))
            .then_some(())
            .ok_or(format!("{row:?}"))
    })
    .await;
    assert_eq!(fake.requests(), 1, "a failed listing ends the pass");

    let (code, said) = cli(&["reconcile", "--once"], &config).await;
    assert_eq!(code, Some(1), "{said}");
    assert!(
        said.contains("rate_limited: rate limited by the API: retry in 1h"),
        "{said}"
    );
    assert_eq!(fake.requests(), 2);
    // Asked again within the hour: the daemon keeps quiet rather than ask the API.
    let (code, said) = cli(&["reconcile", "--once"], &config).await;
    assert_eq!(code, Some(1), "{said}");
    assert!(
        said.contains("rate_limited: rate limited by the API: retry in 59m"),
        "{said}"
    );
    assert_eq!(
        fake.requests(),
        2,
        "Retry-After ignored: {:?}",
        fake.asked.lock().unwrap()
    );
    assert_eq!(daemon.event_count(), 0);

    let scraped = metrics(&daemon).await;
    for line in [
        r#"hookroute_reconcile_runs_total{source="cl",outcome="failed"} 1"#,
        r#"hookroute_reconcile_runs_total{source="cl",outcome="rate_limited"} 2"#,
    ] {
        assert!(scraped.contains(line), "{line} not in\n{scraped}");
    }
    assert!(!scraped.contains("hookroute_reconcile_last_success_timestamp_seconds{"));
    daemon.stop().await;
}

on_both_backends!(a_refused_key_stops_polling_until_a_reload_and_is_never_shown);
/// The API refuses the key: the daemon says so (an error line, `hookroute.reconcile.failing`)
/// and asks no more; a reload with the right key reconciles at once. The key appears in no
/// log line, no command's output and nowhere in the database.
async fn a_refused_key_stops_polling_until_a_reload_and_is_never_shown() {
    let dir = tempdir();
    let (fake, api) = FakeApi::start().await;
    *fake.scans.lock().unwrap() = vec![scan(4001, "a.example", 91, "A")];
    let wrong = "cl_revoked_key_9876543210";
    // hookroute's own events go where a route says (`*` is the senders' events).
    let text = reconciling(dir.path(), &api, "1m")
        + "[[routes]]\nname = \"self\"\nevents = [\"hookroute.*\"]\nsinks = [\"archive\"]\n";
    std::fs::write(dir.path().join("api.key"), wrong).unwrap();
    let daemon = Daemon::start(dir.path(), &text);
    ready(&daemon).await;
    let said = wait_log(
        &daemon,
        "reconcile stops until the configuration is reloaded",
    )
    .await;
    assert!(said.contains("HTTP 401"), "{said}");
    let told = wait_lines(&dir.path().join("events.jsonl"), 1).await;
    assert_eq!(told[0]["type"], "hookroute.reconcile.failing");
    assert_eq!(told[0]["payload"]["data"]["source"], "cl");
    assert!(
        told[0]["payload"]["data"]["error"]
            .as_str()
            .unwrap()
            .contains("refused the key (HTTP 401)")
    );
    // Two looks later, still one request: polling stopped.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(fake.requests(), 1);

    std::fs::write(dir.path().join("api.key"), API_KEY).unwrap();
    signal(daemon.pid(), "HUP");
    eventually(|| {
        let ids = daemon.delivery_ids();
        ids.contains("job:4001")
            .then_some(())
            .ok_or(format!("{ids:?}"))
    })
    .await;

    // Nowhere to be seen: neither key, in the log, the commands' output or the database.
    let config = &daemon.config_path;
    let mut seen = daemon.log();
    for args in [
        &["reconcile"][..],
        &["reconcile", "--json"],
        &["reconcile", "--dry-run", "--json"],
        &["deliveries", "list", "--json"],
        &["check-config"],
    ] {
        seen.push_str(&cli(args, config).await.1);
    }
    for row in daemon.deliveries() {
        seen.push_str(
            &cli(
                &["deliveries", "show", &row.event_id.to_string(), "--json"],
                config,
            )
            .await
            .1,
        );
    }
    seen.push_str(&database_text(&daemon));
    assert!(seen.contains("job:4001"), "the checks read something");
    for key in [API_KEY, wrong] {
        assert!(!seen.contains(key), "the key {key} was shown");
    }
    daemon.terminate();
}

/// Everything the database holds, as text: the SQLite files' bytes, or each PostgreSQL
/// table's rows as JSON.
fn database_text(daemon: &Daemon) -> String {
    match backend() {
        Backend::Sqlite => ["hookroute.db", "hookroute.db-wal"]
            .iter()
            .filter_map(|file| std::fs::read(daemon.dir.join(file)).ok())
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .collect(),
        Backend::Postgres => {
            let tables: Vec<String> = db_rows(
                &daemon.dir,
                "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public'",
                |row| row.get(0),
            );
            tables
                .iter()
                .flat_map(|table| {
                    db_rows::<String>(
                        &daemon.dir,
                        &format!("SELECT row_to_json(t)::text FROM {table} t"),
                        |row| row.get(0),
                    )
                })
                .collect()
        }
    }
}

on_both_backends!(one_replica_reconciles_at_a_time);
/// Two replicas on PostgreSQL (one daemon on SQLite) start on one database: their passes
/// never overlap (the fake sees one request at a time, each slow), and each scan is stored
/// and delivered once.
async fn one_replica_reconciles_at_a_time() {
    let dirs = [tempdir(), tempdir()];
    let (fake, api) = FakeApi::start().await;
    *fake.delay.lock().unwrap() = Duration::from_millis(300);
    *fake.scans.lock().unwrap() = vec![
        scan(5001, "a.example", 91, "A"),
        scan(5002, "b.example", 55, "F"),
        scan(5003, "c.example", 77, "C"),
    ];
    let archive = dirs[0].path().join("events.jsonl");
    let clock = hookroute::clock::ManualClock::new(jiff::Timestamp::now());
    let daemons = replicas(
        &dirs,
        |dir| {
            reconciling(dir, &api, "1m").replace(
                &dir.join("events.jsonl").display().to_string(),
                &archive.display().to_string(),
            )
        },
        &clock,
    )
    .await;
    let _ticking = Ticking::start(&clock, Duration::from_millis(20));
    wait_lines(&archive, 3).await;
    // Long enough for a later replica's pass at its start (it waits for the first's).
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        fake.most_in_flight.load(Ordering::SeqCst),
        1,
        "passes overlapped"
    );
    let asked = fake.requests();
    assert!(
        asked % 2 == 0 && (2..=2 * daemons.len()).contains(&asked),
        "{:?}",
        fake.asked.lock().unwrap()
    );
    assert_eq!(daemons[0].event_count(), 3);
    assert_eq!(read_lines(&archive).len(), 3, "each scan delivered once");
    for daemon in daemons {
        daemon.stop().await;
    }
}

on_both_backends!(turning_reconciling_on_delivers_only_what_came_after_the_last_webhook);
/// A source received webhooks before it had an API (stored under their payload ids). With
/// its API configured, the first pass does not deliver those scans again: it reconciles only
/// what completed after the newest delivery stored from it.
async fn turning_reconciling_on_delivers_only_what_came_after_the_last_webhook() {
    let dir = tempdir();
    let daemon = InProcess::start(
        dir.path(),
        &config(dir.path(), NO_LIMITS, &standard_rest(dir.path())),
    )
    .await;
    ready(&daemon).await;
    let earlier = jiff::Timestamp::now() - jiff::SignedDuration::from_mins(10);
    for job in [6001, 6002] {
        let webhook = json!({
            "id": format!("550e8400-e29b-41d4-a716-44665544{job}"), "type": "scan.completed",
            "created_at": earlier.to_string(),
            "data": {"job_id": job, "domain": "old.example", "grade": "B"}
        });
        daemon.accept_cl(webhook.to_string().as_bytes()).await;
    }
    daemon.stop().await;

    let (fake, api) = FakeApi::start().await;
    let completed = |job: u64, at: jiff::Timestamp| {
        json!({"job_id": job, "status": "completed", "domain": "old.example", "grade": "B",
               "completed_at": at.to_string()})
    };
    *fake.scans.lock().unwrap() = vec![
        completed(6001, earlier),
        completed(6002, earlier),
        completed(
            6003,
            jiff::Timestamp::now() + jiff::SignedDuration::from_secs(1),
        ),
    ];
    let daemon = InProcess::start(dir.path(), &reconciling(dir.path(), &api, "1m")).await;
    ready(&daemon).await;
    let _ticking = Ticking::start(&daemon.clock, Duration::from_millis(20));
    wait_lines(&dir.path().join("events.jsonl"), 3).await;
    eventually(|| {
        let row = daemon.tools(|tools| tools.pass("cl").unwrap());
        (row.outcome.as_deref() == Some("ok"))
            .then_some(())
            .ok_or(format!("{row:?}"))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let lines = read_lines(&dir.path().join("events.jsonl"));
    let reconciled: Vec<&str> = lines
        .iter()
        .filter(|line| line["payload"]["origin"] == "reconcile")
        .map(|line| line["delivery_id"].as_str().unwrap())
        .collect();
    assert_eq!(reconciled, ["job:6003"]);
    assert_eq!(daemon.event_count(), 3);
    daemon.stop().await;
}
