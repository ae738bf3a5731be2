//! Load generator for `benches/ingest.sh` and `benches/history.sh`: N HTTP/1.1 keep-alive
//! connections, each request a 1 KiB ComplianceLayer `scan.completed` body with a unique id,
//! signed (bare hex HMAC-SHA256) as the sender signs it. wrk's Lua cannot compute an HMAC per
//! request, hence this small tool. Prints one line of `key=value` results.
//!
//! - A flood by default; `--rate` paces the requests instead (spread over the connections,
//!   each on a fixed schedule; latency counts from when a request was due, so a slow answer
//!   delays the next request without hiding the wait).
//! - `--requests` stops after that many; else `--duration` seconds.
//! - `--url` may be given more than once (replicas behind no balancer): connection `i` goes
//!   to the `i`-th URL, round robin.
//! - `--tail FILE` follows a file sink's output and reports each event's time from being sent
//!   to its line being there (the body carries its send time).
//!
//! The body looks like a real one (findings with ids, titles and severities from a scanner's
//! vocabulary), so it compresses as real bodies do: repeated filler would flatter storage.

#![allow(clippy::print_stdout)] // its report is what it prints

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use clap::Parser;
use hdrhistogram::Histogram;
use hmac::{KeyInit, Mac};
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;

#[derive(Parser)]
struct Args {
    /// Full URL to POST to; several spread the connections over them.
    #[arg(long, required = true)]
    url: Vec<String>,
    #[arg(long, default_value = "whsec_bench_secret")]
    secret: String,
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Seconds to run (unless `--requests` ends it first).
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Stop after this many requests in all (0: no limit).
    #[arg(long, default_value_t = 0)]
    requests: u64,
    /// Requests per second in all (0: as fast as answers come).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Body size in bytes.
    #[arg(long, default_value_t = 1024)]
    body_size: usize,
    /// A file sink's output to follow for the time from send to delivery.
    #[arg(long)]
    tail: Option<std::path::PathBuf>,
}

struct Tally {
    latencies: Histogram<u64>,
    ok: u64,
    failed: u64,
}

impl Tally {
    fn new() -> Self {
        Self {
            latencies: Histogram::new(3).unwrap(),
            ok: 0,
            failed: 0,
        }
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let targets: Vec<(String, String)> = args
        .url
        .iter()
        .map(|url| {
            let url: hyper::Uri = url.parse().expect("a valid URL");
            let authority = url.authority().expect("URL with host:port").to_string();
            (authority, url.path().to_owned())
        })
        .collect();
    let nonce = now_us();
    let deadline = Instant::now() + Duration::from_secs(args.duration);
    let started = Instant::now();
    let budget = Arc::new(AtomicU64::new(if args.requests == 0 {
        u64::MAX
    } else {
        args.requests
    }));
    // Each connection's gap between requests, and its first request's offset.
    let gap = (args.rate > 0)
        .then(|| Duration::from_secs_f64(args.connections as f64 / args.rate as f64));
    let tail = args.tail.clone().map(|file| tokio::spawn(follow(file)));

    let tasks: Vec<_> = (0..args.connections)
        .map(|conn| {
            let (authority, path) = targets[conn % targets.len()].clone();
            let secret = args.secret.clone();
            let (body_size, budget) = (args.body_size, Arc::clone(&budget));
            let offset = gap.map(|gap| gap.mul_f64(conn as f64 / args.connections as f64));
            tokio::spawn(async move {
                let mut tally = Tally::new();
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
                let mut due = started + offset.unwrap_or_default();
                while Instant::now() < deadline
                    && budget
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                            left.checked_sub(1)
                        })
                        .is_ok()
                {
                    n += 1;
                    if gap.is_some() {
                        tokio::time::sleep_until(due.into()).await;
                    }
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
                    let sent = if gap.is_some() { due } else { Instant::now() };
                    if let Some(gap) = gap {
                        due += gap;
                    }
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

    let mut total = Tally::new();
    for task in tasks {
        let tally = task.await.expect("connection task");
        total.latencies.add(&tally.latencies).unwrap();
        total.ok += tally.ok;
        total.failed += tally.failed;
    }
    let secs = started.elapsed().as_secs_f64();
    let ms = |histogram: &Histogram<u64>, q| histogram.value_at_quantile(q) as f64 / 1000.0;
    print!(
        "ok={} failed={} seconds={:.2} rps={:.0} p50_ms={:.2} p99_ms={:.2} max_ms={:.2}",
        total.ok,
        total.failed,
        secs,
        total.ok as f64 / secs,
        ms(&total.latencies, 0.50),
        ms(&total.latencies, 0.99),
        ms(&total.latencies, 1.0),
    );
    if let Some(tail) = tail {
        // Lines still on their way get two more seconds.
        tokio::time::sleep(Duration::from_secs(2)).await;
        tail.abort();
        let delivered = TAILED.lock().unwrap();
        print!(
            " sink_lines={} sink_p50_ms={:.2} sink_p99_ms={:.2}",
            delivered.len(),
            ms(&delivered, 0.50),
            ms(&delivered, 0.99),
        );
    }
    println!();
}

/// Send-to-line times seen by [`follow`].
static TAILED: std::sync::LazyLock<std::sync::Mutex<Histogram<u64>>> =
    std::sync::LazyLock::new(|| std::sync::Mutex::new(Histogram::new(3).unwrap()));

/// Follows `file` as lines are appended (polling every millisecond), recording for each line
/// the time since its event was sent.
async fn follow(file: std::path::PathBuf) {
    use tokio::io::AsyncReadExt as _;
    // Lines already there were sent by someone else.
    let mut opened = match tokio::fs::File::open(&file).await {
        Ok(mut opened) => {
            use tokio::io::AsyncSeekExt as _;
            opened.seek(std::io::SeekFrom::End(0)).await.unwrap();
            opened
        }
        Err(_) => loop {
            match tokio::fs::File::open(&file).await {
                Ok(opened) => break opened,
                Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        },
    };
    let mut pending = Vec::new();
    let mut chunk = vec![0; 1 << 16];
    loop {
        let n = opened.read(&mut chunk).await.unwrap_or(0);
        if n == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        }
        let seen = now_us();
        pending.extend_from_slice(&chunk[..n]);
        let complete = pending
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        let mut tailed = TAILED.lock().unwrap();
        for line in pending[..complete].split(|&b| b == b'\n') {
            if let Some(sent) = sent_us(line) {
                let _ = tailed.record(seen.saturating_sub(sent));
            }
        }
        pending.drain(..complete);
    }
}

/// The `"sent_us"` a line's payload carries.
fn sent_us(line: &[u8]) -> Option<u64> {
    const KEY: &[u8] = br#""sent_us":"#;
    let at = line.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let digits = line[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&line[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// What a scanner reports, to draw findings from.
const CHECKS: &[(&str, &str)] = &[
    (
        "ssl.certificate_expiring",
        "Certificate expires in less than 30 days",
    ),
    (
        "ssl.weak_cipher",
        "Server accepts TLS_RSA_WITH_3DES_EDE_CBC_SHA",
    ),
    ("ssl.tls10_enabled", "TLS 1.0 is enabled"),
    (
        "headers.hsts_missing",
        "Strict-Transport-Security header is missing",
    ),
    (
        "headers.csp_missing",
        "Content-Security-Policy header is missing",
    ),
    ("headers.xfo_missing", "X-Frame-Options header is missing"),
    ("dns.spf_softfail", "SPF record ends in ~all"),
    ("dns.dmarc_none", "DMARC policy is p=none"),
    ("dns.dnssec_missing", "DNSSEC is not enabled"),
    (
        "ports.rdp_open",
        "Port 3389 (RDP) is reachable from the internet",
    ),
    (
        "ports.smb_open",
        "Port 445 (SMB) is reachable from the internet",
    ),
    ("ports.ssh_password", "SSH accepts password authentication"),
];
const SEVERITIES: &[&str] = &["critical", "high", "medium", "low", "info"];

/// A `scan.completed` body of exactly `size` bytes (if `size` allows), sent now: the envelope
/// and its summary, then findings drawn at random until the size is reached.
fn delivery(id: &str, size: usize) -> Vec<u8> {
    let mut random = xorshift(id);
    let mut body = format!(
        r#"{{"id":"{id}","type":"scan.completed","created_at":"2026-03-08T12:34:56.789Z","sent_us":{},"data":{{"scan_id":{},"job_id":{},"domain":"host-{:x}.example.com","score":{},"grade":"B","issues_count":8,"critical_issues":0,"high_issues":2,"medium_issues":3,"low_issues":3,"scanned_at":"2026-03-08T12:34:51.942Z","scan_duration_ms":{},"findings":["#,
        now_us(),
        random() % 1_000_000,
        random() % 1_000_000,
        random() % 0xFFFF_FFFF,
        random() % 101,
        random() % 10_000,
    );
    let tail = r#"],"note":""}}"#;
    loop {
        let (check, title) = CHECKS[(random() % CHECKS.len() as u64) as usize];
        let finding = format!(
            r#"{{"id":"f-{:08x}","check":"{check}","title":"{title}","severity":"{}","port":{}}},"#,
            random() as u32,
            SEVERITIES[(random() % SEVERITIES.len() as u64) as usize],
            random() % 65536,
        );
        if body.len() + finding.len() + tail.len() > size {
            break;
        }
        body.push_str(&finding);
    }
    if body.ends_with(',') {
        body.pop();
    }
    body.push_str(&tail[..tail.len() - 3]);
    // The note takes up the rest: words, as a human would write them.
    let words = [
        "scan", "retried", "after", "timeout", "on", "port", "check", "ok",
    ];
    while body.len() + 3 < size {
        let word = words[(random() % words.len() as u64) as usize];
        let room = size - 3 - body.len();
        body.push_str(&word[..word.len().min(room)]);
        if body.len() + 3 < size {
            body.push(' ');
        }
    }
    body.push_str(r#""}}"#);
    body.into_bytes()
}

/// A small deterministic generator seeded by `seed`'s bytes.
fn xorshift(seed: &str) -> impl FnMut() -> u64 {
    let mut state = seed.bytes().fold(0xCBF2_9CE4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01B3)
    }) | 1;
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    }
}

fn sign(secret: &str, body: &[u8]) -> String {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}
