//! Load generator for `benches/ingest.sh`: keeps N HTTP/1.1 keep-alive connections busy for a
//! fixed time, each request a 1 KiB ComplianceLayer `scan.completed` body with a unique id,
//! signed (bare hex HMAC-SHA256) as the sender signs it. wrk's Lua cannot compute an HMAC per
//! request, hence this small tool. Prints one line of `key=value` results.

use std::time::{Duration, Instant};

use axum::body::Bytes;
use clap::Parser;
use hdrhistogram::Histogram;
use hmac::{KeyInit, Mac};
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;

#[derive(Parser)]
struct Args {
    /// Full URL to POST to.
    #[arg(long)]
    url: String,
    #[arg(long, default_value = "whsec_bench_secret")]
    secret: String,
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Seconds to run.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Body size in bytes.
    #[arg(long, default_value_t = 1024)]
    body_size: usize,
}

struct Tally {
    latencies: Histogram<u64>,
    ok: u64,
    failed: u64,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let url: hyper::Uri = args.url.parse().expect("a valid URL");
    let authority = url.authority().expect("URL with host:port").to_string();
    let path = url.path().to_owned();
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let deadline = Instant::now() + Duration::from_secs(args.duration);
    let started = Instant::now();

    let tasks: Vec<_> = (0..args.connections)
        .map(|conn| {
            let (authority, path, secret) = (authority.clone(), path.clone(), args.secret.clone());
            let body_size = args.body_size;
            tokio::spawn(async move {
                let mut tally = Tally {
                    latencies: Histogram::new(3).unwrap(),
                    ok: 0,
                    failed: 0,
                };
                let stream = tokio::net::TcpStream::connect(&authority)
                    .await
                    .expect("connect");
                stream.set_nodelay(true).unwrap();
                let (mut sender, connection) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream))
                        .await
                        .expect("handshake");
                tokio::spawn(connection);
                let mut n = 0u64;
                while Instant::now() < deadline {
                    n += 1;
                    let body = delivery(&format!("bench-{nonce}-{conn}-{n}"), body_size);
                    let signature = sign(&secret, &body);
                    let request = Request::post(path.as_str())
                        .header("host", authority.as_str())
                        .header("content-type", "application/json")
                        .header("user-agent", "ComplianceLayer-Webhooks/1.0")
                        .header("x-compliancelayer-event", "scan.completed")
                        .header("x-compliancelayer-signature", signature)
                        .body(Full::new(Bytes::from(body)))
                        .unwrap();
                    let sent = Instant::now();
                    if sender.ready().await.is_err() {
                        tally.failed += 1;
                        break;
                    }
                    match sender.send_request(request).await {
                        Ok(response) => {
                            let ok = response.status().is_success();
                            let _ = response.into_body().collect().await;
                            tally
                                .latencies
                                .record(sent.elapsed().as_micros() as u64)
                                .unwrap();
                            if ok { tally.ok += 1 } else { tally.failed += 1 }
                        }
                        Err(_) => {
                            tally.failed += 1;
                            break;
                        }
                    }
                }
                tally
            })
        })
        .collect();

    let mut total = Tally {
        latencies: Histogram::new(3).unwrap(),
        ok: 0,
        failed: 0,
    };
    for task in tasks {
        let tally = task.await.expect("connection task");
        total.latencies.add(&tally.latencies).unwrap();
        total.ok += tally.ok;
        total.failed += tally.failed;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "ok={} failed={} seconds={:.2} rps={:.0} p50_ms={:.2} p99_ms={:.2}",
        total.ok,
        total.failed,
        secs,
        total.ok as f64 / secs,
        total.latencies.value_at_quantile(0.50) as f64 / 1000.0,
        total.latencies.value_at_quantile(0.99) as f64 / 1000.0,
    );
}

/// A `scan.completed` body padded to exactly `size` bytes.
fn delivery(id: &str, size: usize) -> Vec<u8> {
    let head = format!(
        r#"{{"id":"{id}","type":"scan.completed","created_at":"2026-03-08T12:34:56.789Z","data":{{"scan_id":12345,"job_id":67890,"domain":"example.com","score":85,"grade":"B","issues_count":8,"pad":""#
    );
    let tail = r#""}}"#;
    let pad = size.saturating_sub(head.len() + tail.len());
    let mut body = head.into_bytes();
    body.extend(std::iter::repeat_n(b'x', pad));
    body.extend_from_slice(tail.as_bytes());
    body
}

fn sign(secret: &str, body: &[u8]) -> String {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}
