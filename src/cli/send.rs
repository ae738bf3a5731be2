//! `send`: signs a payload as the source's sender would and POSTs it.

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::ExitCode;

use anyhow::Context as _;
use axum::http::{HeaderMap, HeaderName, HeaderValue, header};
use sha2::{Digest, Sha256};

use super::{SEND_TIMEOUT, SendArgs};
use crate::config;
use crate::signature::{COMPLIANCELAYER_DELIVERY, COMPLIANCELAYER_EVENT, Scheme};

pub(super) async fn send(args: SendArgs) -> anyhow::Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    let config = config::load_for_source(&args.config, &args.source)?;
    let source = config
        .sources
        .iter()
        .find(|s| s.name == args.source)
        .with_context(|| {
            let names: Vec<&str> = config.sources.iter().map(|s| s.name.as_str()).collect();
            format!(
                "no source named {:?} in {}; configured: {}",
                args.source,
                config.file.display(),
                names.join(", ")
            )
        })?;
    let body = std::fs::read(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let url = args.url.unwrap_or_else(|| {
        format!(
            "http://{}{}",
            connectable(config.server.listen),
            source.path
        )
    });

    let payload: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let event_type = ["type", "event"]
        .iter()
        .find_map(|k| payload.get(*k)?.as_str())
        .unwrap_or_default();
    // A stable id: sending the same file twice is the same delivery, as a sender's retry is.
    let id = match payload.get("id") {
        Some(serde_json::Value::String(id)) => id.clone(),
        _ => format!("msg_{}", &hex::encode(Sha256::digest(&body))[..24]),
    };
    let now = jiff::Timestamp::now().as_second();
    let mut headers: HeaderMap = source.verifier.sign(&body, now, &id).into_iter().collect();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(
        header::USER_AGENT,
        HeaderValue::from_static(concat!("hookroute-send/", env!("CARGO_PKG_VERSION"))),
    );
    if matches!(source.verifier.scheme(), Scheme::ComplianceLayer { .. }) {
        if let Ok(value) = HeaderValue::from_str(event_type) {
            headers.insert(HeaderName::from_static(COMPLIANCELAYER_EVENT), value);
        }
        if let Ok(value) = HeaderValue::from_str(&id) {
            headers.insert(HeaderName::from_static(COMPLIANCELAYER_DELIVERY), value);
        }
    }

    let client = reqwest::Client::builder()
        .timeout(SEND_TIMEOUT)
        .build()
        .context("cannot build the HTTP client")?;
    match client.post(&url).headers(headers).body(body).send().await {
        Ok(response) => {
            let status = response.status();
            let text = response.text().await.unwrap_or_default();
            writeln!(out, "{status} from {url}")?;
            writeln!(out, "{text}")?;
            Ok(if status.is_success() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Err(err) => {
            eprintln!("error: cannot deliver to {url}: {err}");
            Ok(ExitCode::from(1))
        }
    }
}

/// A listen address a client can dial: the wildcard becomes loopback.
fn connectable(listen: SocketAddr) -> SocketAddr {
    match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), listen.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), listen.port())
        }
        _ => listen,
    }
}
