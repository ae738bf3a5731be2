//! Reconcile (#29): what the sender did that no webhook brought, from its API (a loopback
//! fake built from the reference's shapes), stored and delivered once whichever path brings
//! it first.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::routing::get;

use crate::harness::*;

const API_KEY: &str = "cl_test_key_0123456789";

/// The fake API: three completed scans (and one still running) in the history, no alerts.
/// Returns its base URL and how many requests it has answered.
async fn fake_api() -> (String, Arc<AtomicUsize>) {
    let requests = Arc::new(AtomicUsize::new(0));
    let history = serde_json::json!({"scans": [
        {"job_id": 1001, "scan_id": 1, "status": "completed", "domain": "a.example", "score": 91, "grade": "A", "completed_at": jiff::Timestamp::now().to_string()},
        {"job_id": 1002, "scan_id": 2, "status": "completed", "domain": "b.example", "score": 55, "grade": "F", "completed_at": jiff::Timestamp::now().to_string()},
        {"job_id": 1003, "scan_id": 3, "status": "completed", "domain": "c.example", "score": 77, "grade": "C", "completed_at": jiff::Timestamp::now().to_string()},
        {"job_id": 1004, "scan_id": 4, "status": "running", "domain": "d.example"}
    ]});
    let counted = |answer: serde_json::Value| {
        let requests = Arc::clone(&requests);
        get(move |headers: axum::http::HeaderMap| async move {
            requests.fetch_add(1, Ordering::SeqCst);
            let authorised = headers
                .get("authorization")
                .is_some_and(|v| v == format!("Bearer {API_KEY}").as_str());
            if !authorised {
                return (
                    axum::http::StatusCode::UNAUTHORIZED,
                    axum::Json(
                        serde_json::json!({"error": "unauthorized", "message": "Invalid or missing authentication", "status": 401}),
                    ),
                );
            }
            (axum::http::StatusCode::OK, axum::Json(answer))
        })
    };
    let app = axum::Router::new()
        .route("/v1/scan/history", counted(history))
        .route(
            "/v1/domains/alerts",
            counted(serde_json::json!({"alerts": []})),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/v1"), requests)
}

on_both_backends!(scans_no_webhook_brought_are_reconciled_and_delivered_once);
/// The daemon was down while three scans completed (their webhooks never came): at start it
/// reads the history and stores and delivers each once; the sender's late retry of one
/// webhook is then a duplicate.
async fn scans_no_webhook_brought_are_reconciled_and_delivered_once() {
    let dir = tempdir();
    let (api, requests) = fake_api().await;
    std::fs::write(dir.path().join("api.key"), API_KEY).unwrap();
    let rest = standard_rest(dir.path()).replace(
        "[sources.cl]\n",
        &format!("[sources.cl]\napi = {{ key = {{ file = \"api.key\" }}, base_url = \"{api}\", reconcile = \"1m\" }}\n"),
    );
    let daemon = InProcess::start(dir.path(), &config(dir.path(), NO_LIMITS, &rest)).await;
    ready(&daemon).await;
    let _ticking = Ticking::start(&daemon.clock, std::time::Duration::from_millis(20));
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
    assert_eq!(
        requests.load(Ordering::SeqCst),
        2,
        "one request per endpoint per pass"
    );

    // The sender's late retry of one scan's webhook: a duplicate, not a second delivery.
    let late = serde_json::json!({
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
    daemon.stop().await;
}
