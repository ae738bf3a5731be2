//! Every status code the ingest endpoint answers, each rejection checked to store nothing.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::harness::*;

fn assert_nothing_stored(daemon: &Daemon) {
    assert_eq!(
        daemon.count("events"),
        0,
        "a rejected request stored an event"
    );
    assert_eq!(daemon.count("dedupe"), 0);
}

on_both_backends!(client_errors_have_exact_codes_and_store_nothing);

async fn client_errors_have_exact_codes_and_store_nothing() {
    let dir = tempdir();
    let rest = format!(
        "{}\n[sources.locked]\nsecret = \"{CL_SECRET}\"\nallowed_ips = [\"203.0.113.0/24\"]\n",
        standard_rest(dir.path())
    );
    let daemon = Daemon::start(
        dir.path(),
        &config(
            dir.path(),
            &format!("max_body_bytes = 4096\n{NO_LIMITS}"),
            &rest,
        ),
    );
    let signed = |body: &[u8]| vec![("x-compliancelayer-signature", hmac_hex(CL_SECRET, &[body]))];

    // 404: nobody configured this path.
    let reply = daemon.post("/hooks/nope", b"{}", &[]).await;
    assert_eq!((reply.status, reply.error()), (404, "not_found"));
    // 405: sources take POST only, and say so.
    let response = daemon
        .client
        .get(daemon.url("/hooks/cl"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 405);
    assert_eq!(response.headers()["allow"], "POST");
    let reply = Reply::read(response).await;
    assert_eq!(reply.error(), "method_not_allowed");
    // 403: the client's address is not in allowed_ips.
    let body = scan_body("forbidden");
    let reply = daemon.post("/hooks/locked", &body, &signed(&body)).await;
    assert_eq!((reply.status, reply.error()), (403, "forbidden"));
    // 415: not declared as JSON, or not declared at all.
    let body = scan_body("media");
    for content_type in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        None,
    ] {
        let mut request = daemon
            .client
            .post(daemon.url("/hooks/cl"))
            .body(body.clone());
        request = request.header("x-compliancelayer-signature", hmac_hex(CL_SECRET, &[&body]));
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        let reply = Reply::read(request.send().await.unwrap()).await;
        assert_eq!(
            (reply.status, reply.error()),
            (415, "unsupported_media_type"),
            "{content_type:?}"
        );
    }
    // ... while JSON with parameters or a +json subtype is fine (checked by the 401 it reaches).
    for content_type in [
        "application/json; charset=utf-8",
        "application/cloudevents+json",
    ] {
        let request = daemon
            .client
            .post(daemon.url("/hooks/cl"))
            .header("content-type", content_type)
            .body("{}");
        assert_eq!(
            request.send().await.unwrap().status(),
            401,
            "{content_type}"
        );
    }
    // 413: declared too large, and too large while streaming (chunked, no Content-Length).
    let big = vec![b' '; 5000];
    let reply = daemon.post("/hooks/cl", &big, &signed(&big)).await;
    assert_eq!((reply.status, reply.error()), (413, "payload_too_large"));
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        vec![Ok(vec![b' '; 3000]), Ok(vec![b' '; 3000])];
    let stream = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    let response = daemon
        .client
        .post(daemon.url("/hooks/cl"))
        .header("content-type", "application/json")
        .body(stream)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    // 400: signed, but not an event.
    for (body, code) in [
        (&b"{not json"[..], "invalid_json"),
        (b"[1, 2]", "invalid_event"),
        (br#"{"data": {"domain": "example.com"}}"#, "invalid_event"),
        (br#"{"type": ""}"#, "invalid_event"),
    ] {
        let reply = daemon.post("/hooks/cl", body, &signed(body)).await;
        assert_eq!(
            (reply.status, reply.error()),
            (400, code),
            "{}",
            String::from_utf8_lossy(body)
        );
    }
    // 401 before 400: an unsigned bad body says nothing about its content.
    let reply = daemon.post("/hooks/cl", b"{not json", &[]).await;
    assert_eq!(reply.status, 401);
    assert_nothing_stored(&daemon);

    // And the good path answers 202, then 200.
    let body = scan_body("ok");
    assert_eq!(
        daemon.post("/hooks/cl", &body, &signed(&body)).await.status,
        202
    );
    assert_eq!(
        daemon.post("/hooks/cl", &body, &signed(&body)).await.status,
        200
    );
    let health = daemon
        .client
        .get(daemon.url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let ready = daemon
        .client
        .get(daemon.url("/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
}

#[tokio::test]
async fn rate_limit_answers_429_with_retry_after() {
    let dir = tempdir();
    let server = "rate_limit = { per_second = 1, burst = 3 }";
    let daemon = Daemon::start(
        dir.path(),
        &config(dir.path(), server, &standard_rest(dir.path())),
    );
    let mut statuses = Vec::new();
    for i in 0..5 {
        let reply = daemon.post_cl(&scan_body(&format!("burst-{i}"))).await;
        if reply.status == 429 {
            assert_eq!(reply.error(), "rate_limited");
            let retry_after: u64 = reply.headers["retry-after"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!((1..=2).contains(&retry_after), "{retry_after}");
        }
        statuses.push(reply.status);
    }
    assert_eq!(statuses, [202, 202, 202, 429, 429]);
    assert_eq!(daemon.count("events"), 3);
}

#[tokio::test]
async fn failed_signatures_are_refused_but_never_a_valid_one_from_the_same_address() {
    let dir = tempdir();
    let server =
        "rate_limit = { per_second = 100, burst = 100, failed_per_minute = 1, failed_burst = 2 }";
    let daemon = Daemon::start(
        dir.path(),
        &config(dir.path(), server, &standard_rest(dir.path())),
    );
    let bad = [("x-compliancelayer-signature", "0".repeat(64))];
    let body = scan_body("guess");
    assert_eq!(daemon.post("/hooks/cl", &body, &bad).await.status, 401);
    assert_eq!(daemon.post("/hooks/cl", &body, &bad).await.status, 401);
    let locked = daemon.post("/hooks/cl", &body, &bad).await;
    assert_eq!((locked.status, locked.error()), (429, "rate_limited"));
    assert!(locked.headers.contains_key("retry-after"));
    assert_nothing_stored(&daemon);
    // An attacker behind the same NAT keeps failing; the real sender's deliveries all pass.
    for i in 0..10 {
        let guess = daemon.post("/hooks/cl", &body, &bad).await;
        assert_eq!(guess.status, 429, "a failure past the budget");
        daemon.accept_cl(&scan_body(&format!("real-{i}"))).await;
    }
    assert_eq!(daemon.count("events"), 10);
}

#[tokio::test]
async fn storage_unavailable_is_503_and_recovers() {
    let dir = tempdir();
    let daemon = Daemon::start(
        dir.path(),
        &config(dir.path(), NO_LIMITS, &standard_rest(dir.path())),
    );
    // Another process holds the write lock (a backup, a stuck tool): the daemon cannot commit.
    let blocker = daemon.db();
    blocker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let reply = daemon.post_cl(&scan_body("blocked")).await;
    assert_eq!((reply.status, reply.error()), (503, "storage_unavailable"));
    assert!(reply.headers.contains_key("retry-after"));
    let ready = daemon
        .client
        .get(daemon.url("/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    blocker.execute_batch("ROLLBACK").unwrap();
    assert_nothing_stored(&daemon);
    // The sender's retry succeeds once the lock is gone.
    daemon.accept_cl(&scan_body("blocked")).await;
    assert_eq!(
        daemon
            .client
            .get(daemon.url("/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[test]
fn slow_headers_and_slow_bodies_are_cut_off() {
    let dir = tempdir();
    let server = format!("{NO_LIMITS}\nheader_read_timeout = \"1s\"\nbody_read_timeout = \"1s\"");
    let daemon = Daemon::start(
        dir.path(),
        &config(dir.path(), &server, &standard_rest(dir.path())),
    );

    // Headers that never finish: the connection is closed after header_read_timeout.
    let (waited, _) = send_and_wait(daemon.addr, b"POST /hooks/cl HTTP/1.1\r\nHost: x\r\n");
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "{waited:?}"
    );

    // A body that stalls: 408 after body_read_timeout.
    let (waited, response) = send_and_wait(
        daemon.addr,
        b"POST /hooks/cl HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"id\":",
    );
    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
    assert!(response.contains("request_timeout"), "{response}");
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    assert_eq!(daemon.count("events"), 0);
}

/// Writes `bytes` on a fresh connection and reads until the server closes it: how long that
/// took, and what came back.
fn send_and_wait(addr: std::net::SocketAddr, bytes: &[u8]) -> (Duration, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let started = Instant::now();
    stream.write_all(bytes).unwrap();
    let mut buf = Vec::new();
    let _ = stream.read_to_end(&mut buf);
    (
        started.elapsed(),
        String::from_utf8_lossy(&buf).into_owned(),
    )
}
