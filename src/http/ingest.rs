//! `POST /hooks/<source>`: the ingest path. Cheap checks first (source, method, address,
//! lockout, media type, size), then the signature on the raw bytes, then parsing, then the
//! durable insert. Nothing is stored unless every check passed, and 2xx is answered only after
//! the insert committed.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use jiff::Timestamp;
use serde::Serialize;

use super::AppState;
use super::client_ip::{client_ip, limit_key};
use super::error::ApiError;
use super::limit::retry_after_secs;
use crate::config::SourceConfig;
use crate::dispatch;
use crate::event::Event;
use crate::signature::{COMPLIANCELAYER_DELIVERY, GITHUB_DELIVERY, WEBHOOK_ID};
use crate::store::Inserted;

pub async fn ingest(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    let sources = state.sources.load();
    let source = sources
        .get(parts.uri.path())
        .ok_or(ApiError::UnknownSource)?;
    if parts.method != Method::POST {
        return Err(ApiError::MethodNotAllowed);
    }
    let client = client_ip(peer.ip(), &parts.headers, &state.trusted_proxies);
    let key = limit_key(client);
    if let Some(wait) = state.failures.as_ref().and_then(|f| f.locked_for(key)) {
        return Err(ApiError::RateLimited {
            retry_after_secs: retry_after_secs(wait),
        });
    }
    if !source.allowed_ips.is_empty() && !source.allowed_ips.iter().any(|net| net.contains(&client))
    {
        tracing::warn!(source = %source.name, %client, "delivery from an address not allowed");
        return Err(ApiError::IpNotAllowed(client));
    }
    if !is_json(&parts.headers) {
        return Err(ApiError::UnsupportedMediaType);
    }
    let body = read_body(&state, &parts.headers, body).await?;

    let now = Timestamp::now();
    let verified = match source
        .verifier
        .verify(&parts.headers, &body, now.as_second())
    {
        Ok(verified) => verified,
        Err(err) => return Err(state.reject(source, client, key, ApiError::Signature(err))),
    };
    let event = Event::parse(
        &source.name,
        &body,
        verified.signed_id.as_deref(),
        sender_delivery(&parts.headers),
    )?;
    if verified.timestamp.is_none()
        && let Err(err) = check_event_age(source, &event, now)
    {
        return Err(state.reject(source, client, key, err));
    }

    let (routes, handoff) = {
        let plan = state.plan.load();
        let routes = dispatch::route(&plan, &event);
        let sinks = routes.iter().flat_map(|to| &to.sinks);
        let handoff = state.new_jobs.handoff(&plan, sinks, now);
        (routes, handoff)
    };
    let unrouted = routes.is_empty();
    // The sinks whose new jobs the delivery engine reads from the database: it reads only
    // those it is told have work.
    let stored_for: Vec<String> = routes
        .iter()
        .flat_map(|to| &to.sinks)
        .filter(|sink| !handoff.sinks.contains(sink))
        .cloned()
        .collect();
    let inserted = state
        .store
        .insert(&event, body.to_vec(), now, routes, handoff)
        .await;
    let (delivery_id, event_type) = (&event.delivery_id, &event.event_type);
    match inserted {
        Ok(Inserted::New {
            id,
            jobs,
            handed,
            suppressed,
        }) => {
            if jobs > handed.len() {
                state.new_jobs.add(stored_for.iter().map(String::as_str));
            }
            // Debug, not info: the `log` sink is how an operator journals every event.
            tracing::debug!(source = %source.name, %event_type, %delivery_id, event_id = id, jobs, %client, "delivery accepted");
            // Debug too: an unrouted event is recorded (`deliveries list --status unrouted`),
            // and event types no route takes are pointed out when the configuration loads.
            if unrouted {
                tracing::debug!(source = %source.name, %event_type, %delivery_id, event_id = id, "no route matched");
            }
            for route in suppressed {
                tracing::info!(source = %source.name, %event_type, %delivery_id, event_id = id, %route, "suppressed by throttle");
            }
            let body = Answer {
                status: "accepted",
                id,
                delivery_id,
            };
            let answer = (StatusCode::ACCEPTED, Json(body)).into_response();
            state.new_jobs.hand_over(handed, event);
            Ok(answer)
        }
        Ok(Inserted::Duplicate(id)) => {
            tracing::debug!(source = %source.name, %event_type, %delivery_id, event_id = id, "duplicate delivery");
            let body = Answer {
                status: "duplicate",
                id,
                delivery_id,
            };
            Ok((StatusCode::OK, Json(body)).into_response())
        }
        Err(err) => {
            tracing::error!(source = %source.name, %delivery_id, error = %err, "cannot store delivery");
            Err(ApiError::StorageUnavailable)
        }
    }
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
    let Some(value) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = value
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// Reads the whole body within the size limit and the read timeout.
async fn read_body(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<axum::body::Bytes, ApiError> {
    let limit = state.max_body_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    let collected =
        tokio::time::timeout(state.body_read_timeout, Limited::new(body, limit).collect())
            .await
            .map_err(|_| ApiError::BodyTimeout)?;
    match collected {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err) if err.downcast_ref::<LengthLimitError>().is_some() => {
            Err(ApiError::PayloadTooLarge { limit })
        }
        Err(err) => {
            tracing::debug!(error = %err, "cannot read request body");
            Err(ApiError::BodyUnreadable)
        }
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
