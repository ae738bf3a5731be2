//! Statuses that need the real daemon: a database that cannot take writes (503, and the
//! recovery), slow clients cut off on the socket. The other statuses are in `edge.rs`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::harness::*;

fn assert_nothing_stored(daemon: &Daemon) {
    assert_eq!(
        daemon.event_count(),
        0,
        "a rejected request stored an event"
    );
    assert_eq!(daemon.count("dedupe"), 0);
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
    assert_eq!(daemon.event_count(), 0);
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
