//! The baseline for `benches/ingest.sh`: a bare axum server answering every request with
//! `200 OK`, on the same runtime settings hookroute uses. Prints `listening addr=<addr>`.

#![allow(clippy::print_stdout)] // its report is what it prints

use axum::Router;

#[tokio::main]
async fn main() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    println!(
        "listening addr={}",
        listener.local_addr().expect("local addr")
    );
    let app = Router::new().fallback(|| async { "OK" });
    axum::serve(listener, app).await.expect("serve");
}
