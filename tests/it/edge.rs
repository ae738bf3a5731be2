//! The HTTP edge in-process: the daemon's own router, wired as `serve` wires it, driven with
//! `oneshot` on a temporary store, from any client address (not only loopback). Statuses,
//! hostile input, signatures, proxies and rate limits; "nothing stored" is read through the
//! store's contract (the operator's tools). What needs a socket or a process (slow clients,
//! pipelining, kill -9, signals) stays with the spawned daemon.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::ConnectInfo;
use hookroute::store::admin::Row;
use http_body_util::BodyExt as _;
use tower::ServiceExt as _;

use crate::harness::*;

/// The daemon's router and store, without a socket or an engine.
struct Edge {
    router: axum::Router,
    store: hookroute::store::Store,
    dir: std::path::PathBuf,
}

/// An answer: its status, headers and JSON body (`null` if it had none).
struct Answer {
    status: u16,
    headers: axum::http::HeaderMap,
    json: serde_json::Value,
}

impl Answer {
    fn error(&self) -> &str {
        self.json["error"].as_str().unwrap_or_default()
    }
}

impl Edge {
    /// The daemon with the standard source and archive, `server` added to `[server]`.
    async fn standard(dir: &Path, server: &str) -> Self {
        Self::start(dir, &config(dir, server, &standard_rest(dir))).await
    }

    /// The daemon on `config` (written into `dir`), its clock a manual one.
    async fn start(dir: &Path, config: &str) -> Self {
        let config = hookroute::config::load(&write_config(dir, config)).expect("valid config");
        let clock = hookroute::clock::ManualClock::new(jiff::Timestamp::now());
        let parts = hookroute::assemble(&config, Arc::new(clock))
            .await
            .expect("the daemon's parts");
        Self {
            router: parts.app.router(),
            store: parts.store,
            dir: dir.to_path_buf(),
        }
    }

    /// Sends `request` as if from `peer`, as `serve` tags each connection.
    async fn send_from(&self, peer: &str, mut request: axum::http::Request<Body>) -> Answer {
        let peer = SocketAddr::new(peer.parse::<IpAddr>().unwrap(), 40_000);
        request.extensions_mut().insert(ConnectInfo(peer));
        let response = self.router.clone().oneshot(request).await.unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        Answer {
            status,
            headers,
            json,
        }
    }

    /// A JSON POST of `body` to `path` with `headers`, from 127.0.0.1.
    async fn post(&self, path: &str, body: &[u8], headers: &[(&str, &str)]) -> Answer {
        self.post_from("127.0.0.1", path, body, headers).await
    }

    async fn post_from(
        &self,
        peer: &str,
        path: &str,
        body: &[u8],
        headers: &[(&str, &str)],
    ) -> Answer {
        let mut request =
            axum::http::Request::post(path).header("content-type", "application/json");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(Body::from(body.to_vec())).unwrap();
        self.send_from(peer, request).await
    }

    /// Whatever was stored, read through the store's contract.
    fn stored(&self) -> Vec<Row> {
        deliveries_at(&self.dir)
    }

    async fn stop(self) {
        self.store.close().await;
    }
}

fn sig(body: &[u8]) -> String {
    hmac_hex(CL_SECRET, &[body])
}

const SIG: &str = "x-compliancelayer-signature";

on_both_backends!(every_refusal_has_its_exact_status_and_stores_nothing);

async fn every_refusal_has_its_exact_status_and_stores_nothing() {
    let dir = tempdir();
    let rest = format!(
        "{}\n[sources.locked]\nsecret = \"{CL_SECRET}\"\nallowed_ips = [\"203.0.113.0/24\"]\n",
        standard_rest(dir.path())
    );
    let server = format!("max_body_bytes = 4096\n{NO_LIMITS}");
    let edge = Edge::start(dir.path(), &config(dir.path(), &server, &rest)).await;
    let body = scan_body("refused");
    let good = sig(&body);

    // 404: nobody configured this path.
    let answer = edge.post("/hooks/nope", b"{}", &[]).await;
    assert_eq!((answer.status, answer.error()), (404, "not_found"));
    // 405: sources take POST only, and say so.
    let get = axum::http::Request::get("/hooks/cl")
        .body(Body::empty())
        .unwrap();
    let answer = edge.send_from("127.0.0.1", get).await;
    assert_eq!((answer.status, answer.error()), (405, "method_not_allowed"));
    assert_eq!(answer.headers["allow"], "POST");
    // 403: the client's address is not in allowed_ips; from inside the range it is.
    let answer = edge.post("/hooks/locked", &body, &[(SIG, &good)]).await;
    assert_eq!((answer.status, answer.error()), (403, "forbidden"));
    // 415: not declared as JSON, or not declared at all.
    for content_type in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        None,
    ] {
        let mut request = axum::http::Request::post("/hooks/cl").header(SIG, &good);
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        let request = request.body(Body::from(body.clone())).unwrap();
        let answer = edge.send_from("127.0.0.1", request).await;
        assert_eq!(
            (answer.status, answer.error()),
            (415, "unsupported_media_type"),
            "{content_type:?}"
        );
    }
    // ... while JSON with parameters or a +json subtype is fine (checked by the 401 it reaches).
    for content_type in [
        "application/json; charset=utf-8",
        "application/cloudevents+json",
    ] {
        let request = axum::http::Request::post("/hooks/cl")
            .header("content-type", content_type)
            .body(Body::from("{}"))
            .unwrap();
        assert_eq!(
            edge.send_from("127.0.0.1", request).await.status,
            401,
            "{content_type}"
        );
    }
    // 413: declared too large, and too large while streaming (no Content-Length).
    let big = vec![b' '; 5000];
    let answer = edge.post("/hooks/cl", &big, &[(SIG, &sig(&big))]).await;
    assert_eq!((answer.status, answer.error()), (413, "payload_too_large"));
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        vec![Ok(vec![b' '; 3000]), Ok(vec![b' '; 3000])];
    let streamed = axum::http::Request::post("/hooks/cl")
        .header("content-type", "application/json")
        .body(Body::from_stream(futures_util::stream::iter(chunks)))
        .unwrap();
    assert_eq!(edge.send_from("127.0.0.1", streamed).await.status, 413);
    // 401: unsigned, wrongly signed, signed with another secret; before 400, so an unsigned
    // bad body says nothing about its content.
    let other = hmac_hex("whsec_someone_else", &[&body]);
    for signature in [None, Some("0".repeat(64)), Some(other)] {
        let headers: Vec<(&str, &str)> = signature.iter().map(|s| (SIG, s.as_str())).collect();
        let answer = edge.post("/hooks/cl", &body, &headers).await;
        assert_eq!(answer.status, 401, "{signature:?}");
    }
    assert_eq!(edge.post("/hooks/cl", b"{not json", &[]).await.status, 401);
    // 400: signed, but not an event (or an event no one could route or show).
    let long_id = format!(
        r#"{{"id": "{}", "type": "scan.completed"}}"#,
        "x".repeat(300)
    );
    for (bad, code) in [
        (&b"{not json"[..], "invalid_json"),
        (b"[1, 2]", "invalid_event"),
        (br#"{"data": {"domain": "example.com"}}"#, "invalid_event"),
        (br#"{"type": ""}"#, "invalid_event"),
        (
            br#"{"id": "a", "type": "scan\u0000completed"}"#,
            "invalid_event",
        ),
        (long_id.as_bytes(), "invalid_event"),
    ] {
        let answer = edge.post("/hooks/cl", bad, &[(SIG, &sig(bad))]).await;
        assert_eq!(
            (answer.status, answer.error()),
            (400, code),
            "{}",
            String::from_utf8_lossy(bad)
        );
    }
    assert!(edge.stored().is_empty(), "a refusal stored something");

    // And the good path answers 202, then 200 for the copy; health and readiness 200.
    assert_eq!(
        edge.post("/hooks/cl", &body, &[(SIG, &good)]).await.status,
        202
    );
    assert_eq!(
        edge.post("/hooks/cl", &body, &[(SIG, &good)]).await.status,
        200
    );
    let inside = edge
        .post_from("203.0.113.9", "/hooks/locked", &body, &[(SIG, &good)])
        .await;
    assert_eq!(inside.status, 202, "allowed_ips lets its range in");
    for path in ["/healthz", "/readyz"] {
        let request = axum::http::Request::get(path).body(Body::empty()).unwrap();
        assert_eq!(
            edge.send_from("127.0.0.1", request).await.status,
            200,
            "{path}"
        );
    }
    let stored = edge.stored();
    assert_eq!(stored.len(), 2, "one event per source, once: {stored:?}");
    edge.stop().await;
}

#[tokio::test]
async fn rotation_accepts_the_old_and_the_new_secret_and_nothing_else() {
    let dir = tempdir();
    let edge = Edge::standard(dir.path(), NO_LIMITS).await;
    for (i, secret) in [CL_SECRET, CL_SECRET_OLD].into_iter().enumerate() {
        let body = scan_body(&format!("rotated-{i}"));
        let answer = edge
            .post("/hooks/cl", &body, &[(SIG, &hmac_hex(secret, &[&body]))])
            .await;
        assert_eq!(answer.status, 202, "{secret}");
    }
    let body = scan_body("retired");
    let retired = hmac_hex("whsec_retired_long_ago", &[&body]);
    assert_eq!(
        edge.post("/hooks/cl", &body, &[(SIG, &retired)])
            .await
            .status,
        401
    );
    assert_eq!(edge.stored().len(), 2);
    edge.stop().await;
}

/// A proxy's X-Forwarded-For is believed from a trusted peer only: for allowed_ips and for
/// the rate limits. In-process, the peer can be any address, as a real proxy's is.
#[tokio::test]
async fn forwarded_for_counts_only_from_a_trusted_proxy() {
    let dir = tempdir();
    let rest = format!(
        "{}\n[sources.locked]\nsecret = \"{CL_SECRET}\"\nallowed_ips = [\"203.0.113.7\"]\n",
        standard_rest(dir.path())
    );
    let server = format!("trusted_proxies = [\"10.0.0.2/32\"]\n{NO_LIMITS}");
    let edge = Edge::start(dir.path(), &config(dir.path(), &server, &rest)).await;
    let cases = [
        ("10.0.0.2", Some("203.0.113.7"), 202),
        // The client-supplied left part is ignored; the proxy-appended right part counts.
        ("10.0.0.2", Some("198.51.100.1, 203.0.113.7"), 202),
        ("10.0.0.2", Some("203.0.113.7, 198.51.100.1"), 403),
        ("10.0.0.2", None, 403),
        // An untrusted peer's header is nobody's word.
        ("10.0.0.3", Some("203.0.113.7"), 403),
        // The client itself, straight in.
        ("203.0.113.7", None, 202),
    ];
    for (i, (peer, forwarded, expected)) in cases.into_iter().enumerate() {
        let body = scan_body(&format!("case-{i}"));
        let signature = sig(&body);
        let mut headers = vec![(SIG, signature.as_str())];
        headers.extend(forwarded.map(|f| ("x-forwarded-for", f)));
        let answer = edge.post_from(peer, "/hooks/locked", &body, &headers).await;
        assert_eq!(answer.status, expected, "{peer} {forwarded:?}");
    }
    // A refusal names the address it saw, so the operator can tell a missing trusted proxy.
    let body = scan_body("which");
    let answer = edge
        .post_from("10.0.0.3", "/hooks/locked", &body, &[(SIG, &sig(&body))])
        .await;
    let message = answer.json["message"].as_str().unwrap_or_default();
    assert!(message.contains("10.0.0.3"), "{message}");
    assert_eq!(edge.stored().len(), 3);
    edge.stop().await;
}

#[tokio::test]
async fn rate_limits_answer_429_per_client_and_never_lock_out_a_valid_sender() {
    let dir = tempdir();
    let server = "trusted_proxies = [\"10.0.0.2\"]\nrate_limit = { per_second = 1, burst = 5, failed_per_minute = 1, failed_burst = 2 }";
    let edge = Edge::standard(dir.path(), server).await;
    // A burst of five, then 429 with a Retry-After of a second or two.
    let mut statuses = Vec::new();
    for i in 0..7 {
        let body = scan_body(&format!("burst-{i}"));
        let answer = edge
            .post_from("198.51.100.1", "/hooks/cl", &body, &[(SIG, &sig(&body))])
            .await;
        if answer.status == 429 {
            assert_eq!(answer.error(), "rate_limited");
            let retry_after: u64 = answer.headers["retry-after"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!((1..=2).contains(&retry_after), "{retry_after}");
        }
        statuses.push(answer.status);
    }
    assert_eq!(statuses, [202, 202, 202, 202, 202, 429, 429]);
    // Another client has its own budget, straight in or behind the trusted proxy.
    let body = scan_body("other");
    let signed = sig(&body);
    assert_eq!(
        edge.post_from("198.51.100.2", "/hooks/cl", &body, &[(SIG, &signed)])
            .await
            .status,
        202
    );
    let behind = [(SIG, signed.as_str()), ("x-forwarded-for", "198.51.100.3")];
    assert_eq!(
        edge.post_from("10.0.0.2", "/hooks/cl", &scan_body("x"), &behind)
            .await
            .status,
        401
    );

    // Failed signatures have a budget of their own: a guesser is locked out after two...
    let guess = scan_body("guess");
    let wrong = "0".repeat(64);
    let from = "198.51.100.9";
    assert_eq!(
        edge.post_from(from, "/hooks/cl", &guess, &[(SIG, &wrong)])
            .await
            .status,
        401
    );
    assert_eq!(
        edge.post_from(from, "/hooks/cl", &guess, &[(SIG, &wrong)])
            .await
            .status,
        401
    );
    let locked = edge
        .post_from(from, "/hooks/cl", &guess, &[(SIG, &wrong)])
        .await;
    assert_eq!((locked.status, locked.error()), (429, "rate_limited"));
    assert!(locked.headers.contains_key("retry-after"));
    // ... while a valid delivery from the same address still passes.
    let real = scan_body("real");
    assert_eq!(
        edge.post_from(from, "/hooks/cl", &real, &[(SIG, &sig(&real))])
            .await
            .status,
        202
    );
    let stored: Vec<String> = edge
        .stored()
        .into_iter()
        .map(|row| row.delivery_id)
        .collect();
    assert_eq!(stored.len(), 7, "{stored:?}");
    assert!(!stored.iter().any(|id| id == "guess"));
    edge.stop().await;
}

/// A header the proxy passed on that is not an address is the proxy's fault, not a client's:
/// 400, and no one's budget is charged for it.
#[tokio::test]
async fn a_malformed_forwarded_for_is_400_and_charges_no_one() {
    let dir = tempdir();
    let server = "trusted_proxies = [\"10.0.0.2\"]\nrate_limit = { per_second = 100, burst = 100, failed_per_minute = 1, failed_burst = 2 }";
    let edge = Edge::standard(dir.path(), server).await;
    let wrong = "0".repeat(64);
    let body = scan_body("xff");
    for _ in 0..5 {
        let request = axum::http::Request::post("/hooks/cl")
            .header("content-type", "application/json")
            .header(SIG, &wrong)
            .header(
                "x-forwarded-for",
                axum::http::HeaderValue::from_bytes(b"198.51.100.1\xff").unwrap(),
            )
            .body(Body::from(body.clone()))
            .unwrap();
        let answer = edge.send_from("10.0.0.2", request).await;
        assert_eq!((answer.status, answer.error()), (400, "bad_request"));
    }
    let garbage = [
        (SIG, wrong.as_str()),
        ("x-forwarded-for", "nonsense, 10.0.0.2"),
    ];
    assert_eq!(
        edge.post_from("10.0.0.2", "/hooks/cl", &body, &garbage)
            .await
            .status,
        400
    );
    // Nobody was charged: the clients behind the proxy get their own budgets.
    for client in ["198.51.100.7", "198.51.100.8"] {
        let headers = [(SIG, wrong.as_str()), ("x-forwarded-for", client)];
        let answer = edge
            .post_from("10.0.0.2", "/hooks/cl", &body, &headers)
            .await;
        assert_eq!(answer.status, 401, "{client} was refused for someone else");
    }
    assert!(edge.stored().is_empty());
    edge.stop().await;
}
