//! `POST /hooks/<source>`: the ingest path. Cheap checks first (source, method, address,
//! media type, size, the shared budget of unverified bytes), then the signature on the raw
//! bytes, then parsing, then the durable insert. Nothing is stored unless every check passed,
//! and 2xx is answered only after the insert committed. A client past its failure budget is
//! refused only when its signature fails: its valid deliveries still pass.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use jiff::Timestamp;
use serde::Serialize;
use tokio::sync::Semaphore;

use super::AppState;
use super::client_ip::{client_ip, limit_key};
use super::error::ApiError;
use super::limit::retry_after_secs;
use crate::config::SourceConfig;
use crate::event::{Event, HOPS_HEADER, MAX_HOPS, parse_hops};
use crate::intake::Accepted;
use crate::signature::{COMPLIANCELAYER_DELIVERY, GITHUB_DELIVERY, WEBHOOK_ID};

pub async fn ingest(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
) -> Result<Response, ApiError> {
    let arrived = std::time::Instant::now();
    let (parts, body) = request.into_parts();
    let sources = state.sources.load();
    let source = sources
        .get(parts.uri.path())
        .ok_or(ApiError::UnknownSource)?;
    if parts.method != Method::POST {
        return Err(ApiError::MethodNotAllowed);
    }
    let client = client_ip(peer.ip(), &parts.headers, &state.trusted_proxies)
        .map_err(|_| ApiError::MalformedForwardedFor)?;
    let key = limit_key(client);
    if !source.allowed_ips.is_empty() && !source.allowed_ips.iter().any(|net| net.contains(&client))
    {
        tracing::warn!(source = %source.name, %client, "delivery from an address not allowed");
        return Err(ApiError::IpNotAllowed(client));
    }
    if !is_json(&parts.headers) {
        return Err(ApiError::UnsupportedMediaType);
    }
    if let Some(value) = parts.headers.get(HOPS_HEADER) {
        match parse_hops(value.as_bytes()) {
            None => return Err(ApiError::MalformedHops),
            Some(hops) if hops > MAX_HOPS => {
                tracing::warn!(source = %source.name, hops, %client, "forwarding loop: delivery refused");
                return Err(ApiError::ForwardingLoop(hops));
            }
            Some(_) => {}
        }
    }
    let (body, unverified) = read_body(&state, &parts.headers, body).await?;

    let now = state.clock.now();
    let verified = source
        .verifier
        .verify(&parts.headers, &body, now.as_second());
    drop(unverified);
    let verified = match verified {
        Ok(verified) => verified,
        Err(err) => return Err(state.reject(source, client, key, ApiError::Signature(err))),
    };
    let mut event = Event::parse(
        &source.name,
        &body,
        verified.signed_id.as_deref(),
        sender_delivery(&parts.headers),
    )?;
    // A source that reconciles keys a scan (an alert) as reconcile does, whichever path
    // brings it first.
    if source.api.is_some() {
        crate::reconcile::key_like_reconcile(&mut event);
    }
    if verified.timestamp.is_none()
        && let Err(err) = check_event_age(source, &event, now)
    {
        return Err(state.reject(source, client, key, err));
    }

    let (source_name, event_type, delivery_id) = (
        source.name.clone(),
        event.event_type.clone(),
        event.delivery_id.clone(),
    );
    let (status, answer, id) = match state.intake.accept(event, &body, now).await {
        Ok(Accepted::New { id, jobs }) => {
            state
                .metrics
                .ingested(&source_name, true, arrived.elapsed());
            tracing::info!(event_id = id, %delivery_id, source = %source_name, %event_type, jobs, %client, "delivery accepted");
            (StatusCode::ACCEPTED, "accepted", id)
        }
        Ok(Accepted::Duplicate(id)) => {
            state
                .metrics
                .ingested(&source_name, false, arrived.elapsed());
            tracing::info!(event_id = id, %delivery_id, source = %source_name, %event_type, %client, "duplicate delivery");
            (StatusCode::OK, "duplicate", id)
        }
        Err(err) => {
            tracing::error!(source = %source_name, %delivery_id, error = %err, "cannot store delivery");
            return Err(ApiError::StorageUnavailable);
        }
    };
    let body = Answer {
        status: answer,
        id,
        delivery_id: &delivery_id,
    };
    Ok((status, Json(body)).into_response())
}

/// The body of a 2xx answer.
#[derive(Serialize)]
struct Answer<'a> {
    status: &'static str,
    /// The stored event's id (the first copy's, for a duplicate).
    id: i64,
    delivery_id: &'a str,
}

impl AppState {
    /// Logs a refused delivery and charges the client's failure budget; past the budget the
    /// answer becomes 429.
    fn reject(
        &self,
        source: &SourceConfig,
        client: std::net::IpAddr,
        key: std::net::IpAddr,
        err: ApiError,
    ) -> ApiError {
        tracing::warn!(source = %source.name, %client, reason = %err, "delivery refused");
        self.metrics.signature_failure(&source.name, err.code());
        self.intake.notices().send(
            crate::notice::Notice::BadSignature {
                source: source.name.clone(),
                reason: err.code().to_owned(),
                client,
            },
            self.clock.now(),
        );
        match self.failures.as_ref().and_then(|f| f.record_failure(key)) {
            Some(wait) => ApiError::RateLimited {
                retry_after_secs: retry_after_secs(wait),
            },
            None => err,
        }
    }
}

/// `application/json`, or any `application/*+json`, parameters allowed.
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(crate::event::is_json_media_type)
}

/// Reads the whole body within the size limit and the read timeout, and within the budget all
/// unverified bodies share (see [`UNVERIFIED_BODIES`]). The budget is drawn as bytes arrive,
/// so a client that declares a large body and sends nothing holds none of it; what it holds is
/// returned when the permit is dropped, once the signature has been checked.
async fn read_body<'s>(
    state: &'s AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<(Bytes, Unverified<'s>), ApiError> {
    let limit = state.max_body_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    let mut held = Unverified::none(&state.unverified);
    let read = async {
        let mut body = body;
        // Sized once from the declared length: growing by doubling would copy the body and
        // leave the smaller buffers behind; pages not yet written cost no memory.
        let mut bytes = Vec::with_capacity(declared.map_or(0, |len| len as usize));
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|err| {
                tracing::debug!(error = %err, "cannot read request body");
                ApiError::BodyUnreadable
            })?;
            let Ok(data) = frame.into_data() else {
                continue; // trailers
            };
            if bytes.len() + data.len() > limit {
                return Err(ApiError::PayloadTooLarge { limit });
            }
            held.grow(bytes.len() + data.len())?;
            bytes.extend_from_slice(&data);
        }
        Ok(Bytes::from(bytes))
    };
    let bytes = tokio::time::timeout(state.body_read_timeout, read)
        .await
        .map_err(|_| ApiError::BodyTimeout)??;
    Ok((bytes, held))
}

/// How many bodies of `max_body_bytes` may be held at once before their signatures are checked,
/// across all clients: 64 MiB with the default limit. Past it, new bytes are refused with 503
/// and `Retry-After`, so stalled or slow uploads cannot take the daemon's memory.
pub const UNVERIFIED_BODIES: usize = 64;

/// The share of the unverified-body budget one request holds, in bytes; returned on drop.
pub struct Unverified<'a> {
    budget: &'a Semaphore,
    held: usize,
}

impl<'a> Unverified<'a> {
    fn none(budget: &'a Semaphore) -> Self {
        Self { budget, held: 0 }
    }

    /// Holds at least `len` bytes, drawing in steps so each frame is not a draw of its own.
    fn grow(&mut self, len: usize) -> Result<(), ApiError> {
        const STEP: usize = 16 * 1024;
        if len <= self.held {
            return Ok(());
        }
        let more = (len - self.held).next_multiple_of(STEP);
        let permits = u32::try_from(more).map_err(|_| ApiError::Overloaded)?;
        let permit = self
            .budget
            .try_acquire_many(permits)
            .map_err(|_| ApiError::Overloaded)?;
        permit.forget();
        self.held += more;
        Ok(())
    }
}

impl Drop for Unverified<'_> {
    fn drop(&mut self) {
        self.budget.add_permits(self.held);
    }
}

/// The sender's own delivery header: unsigned, so metadata only.
fn sender_delivery(headers: &HeaderMap) -> Option<&str> {
    [COMPLIANCELAYER_DELIVERY, GITHUB_DELIVERY, WEBHOOK_ID]
        .iter()
        .find_map(|name| headers.get(*name).and_then(|v| v.to_str().ok()))
}

/// With no timestamp in the signature, the signed body's own timestamp bounds replays.
fn check_event_age(source: &SourceConfig, event: &Event, now: Timestamp) -> Result<(), ApiError> {
    let Some(max_age) = source.max_event_age else {
        return Ok(());
    };
    let Some(occurred_at) = event.occurred_at else {
        return Err(ApiError::StaleEvent(
            "event has no created_at/timestamp to check against this source's max_event_age".into(),
        ));
    };
    let age = now.duration_since(occurred_at);
    if age.as_secs() > i64::try_from(max_age.as_secs()).unwrap_or(i64::MAX) {
        return Err(ApiError::StaleEvent(format!(
            "event was created {} s ago, beyond this source's max_event_age of {} s",
            age.as_secs(),
            max_age.as_secs()
        )));
    }
    Ok(())
}
