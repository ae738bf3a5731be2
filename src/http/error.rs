//! The one error type of the HTTP layer. Each variant documents its status code; the body is
//! always `{"error": "...", "message": "...", "status": N}`, and internals (database errors,
//! expected digests) never reach a client: they are logged where they happen.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::event::{EventError, HOPS_HEADER, MAX_HOPS};
use crate::signature::SignatureError;

/// How long a sender should wait before retrying after a storage failure.
const STORAGE_RETRY_AFTER_SECS: u64 = 5;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 404: no source is configured at this path.
    #[error("no webhook source is configured at this path")]
    UnknownSource,
    /// 405: sources take POST only.
    #[error("method not allowed; webhook deliveries must be POSTed")]
    MethodNotAllowed,
    /// 403: the client's address is not in the source's `allowed_ips`.
    #[error("client address {0} is not allowed for this source")]
    IpNotAllowed(std::net::IpAddr),
    /// 429: over the rate limit, or a failed signature past the failure budget.
    #[error("too many requests; retry after {retry_after_secs} s")]
    RateLimited { retry_after_secs: u64 },
    /// 415: the body is not declared as JSON.
    #[error("content type must be application/json")]
    UnsupportedMediaType,
    /// 413: the body exceeds `max_body_bytes`.
    #[error("body exceeds the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// 408: the body did not arrive within `body_read_timeout`.
    #[error("the request body was not received in time")]
    BodyTimeout,
    /// 400: a trusted proxy's `X-Forwarded-For` holds something that is not an address.
    #[error("X-Forwarded-For holds an entry that is not an IP address")]
    MalformedForwardedFor,
    /// 400: the body could not be read.
    #[error("cannot read the request body")]
    BodyUnreadable,
    /// 401: missing, malformed or wrong signature, or a timestamp out of tolerance.
    #[error("{0}")]
    Signature(#[from] SignatureError),
    /// 401: validly signed but older than `max_event_age` (a replay).
    #[error("{0}")]
    StaleEvent(String),
    /// 400: not a JSON object with an event type.
    #[error("{0}")]
    BadEvent(#[from] EventError),
    /// 400: the forwarding hop header is not a number.
    #[error("{HOPS_HEADER} must be a number from 0 to 255")]
    MalformedHops,
    /// 400: another hookroute forwarded this delivery more than `MAX_HOPS` times: a loop of
    /// forwarding sinks. Refused for good (a 4xx), so the forwarding sink dead-letters it.
    #[error(
        "forwarding loop: this delivery was forwarded {0} times between hookroute daemons (at most {MAX_HOPS})"
    )]
    ForwardingLoop(u8),
    /// 503: too many bodies are being received at once; the sender should retry.
    #[error("too many deliveries are being received at once; retry later")]
    Overloaded,
    /// 503: the delivery could not be stored; the sender should retry.
    #[error("storage is unavailable; the delivery was not stored, retry later")]
    StorageUnavailable,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::UnknownSource => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::IpNotAllowed(_) => StatusCode::FORBIDDEN,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::BodyUnreadable
            | Self::BadEvent(_)
            | Self::MalformedForwardedFor
            | Self::MalformedHops
            | Self::ForwardingLoop(_) => StatusCode::BAD_REQUEST,
            Self::Signature(_) | Self::StaleEvent(_) => StatusCode::UNAUTHORIZED,
            Self::StorageUnavailable | Self::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// A stable, machine-readable name for the failure.
    pub fn code(&self) -> &'static str {
        match self {
            Self::UnknownSource => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::IpNotAllowed(_) => "forbidden",
            Self::RateLimited { .. } => "rate_limited",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::PayloadTooLarge { .. } => "payload_too_large",
            Self::BodyTimeout => "request_timeout",
            Self::BodyUnreadable | Self::MalformedForwardedFor => "bad_request",
            Self::MalformedHops => "invalid_hops",
            Self::ForwardingLoop(_) => "forwarding_loop",
            Self::BadEvent(EventError::InvalidJson(_)) => "invalid_json",
            Self::BadEvent(_) => "invalid_event",
            Self::Signature(SignatureError::MissingHeader(_)) => "missing_signature",
            Self::Signature(SignatureError::Expired { .. } | SignatureError::FromFuture { .. }) => {
                "timestamp_out_of_tolerance"
            }
            Self::Signature(_) => "invalid_signature",
            Self::StaleEvent(_) => "event_too_old",
            Self::StorageUnavailable => "storage_unavailable",
            Self::Overloaded => "overloaded",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body =
            json!({ "error": self.code(), "message": self.to_string(), "status": status.as_u16() });
        let mut response = (status, Json(body)).into_response();
        let headers = response.headers_mut();
        match self {
            Self::MethodNotAllowed => {
                headers.insert(header::ALLOW, HeaderValue::from_static("POST"));
            }
            Self::RateLimited { retry_after_secs } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
            }
            Self::StorageUnavailable | Self::Overloaded => {
                headers.insert(
                    header::RETRY_AFTER,
                    HeaderValue::from(STORAGE_RETRY_AFTER_SECS),
                );
            }
            _ => {}
        }
        response
    }
}
