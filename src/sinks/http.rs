//! The `http` sink: POSTs the event (or a rendered template) to a URL with configured headers,
//! optionally re-signed with the Standard Webhooks scheme so the next hop can verify it. Also
//! home of the request-and-classify step the `slack` sink shares.
//!
//! Every request carries `X-Hookroute-Hops` (and a JSON body `hookroute.hops`): how many times
//! hookroute daemons have forwarded the event. Past [`MAX_HOPS`] the sink refuses (a dead
//! letter saying "forwarding loop") and a daemon refuses such a delivery (400), so a sink
//! pointed at its own daemon, or two daemons forwarding to each other, stops within a few hops.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use axum::http::{HeaderName, HeaderValue, StatusCode};
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};
use serde::{Deserialize, Serialize};

use super::{Delivery, DeliveryOptions, RESPONSE_LIMIT, Sink, SinkError, bounded};
use crate::event::{Event, HOPS_HEADER, MAX_HOPS};
use crate::secret::{SecretSource, decode_whsec};
use crate::signature::{Key, Scheme, Verifier};
use crate::templates::{Message, TemplateRef};

/// How long to wait after a 429 that says nothing about it.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSinkConfig {
    pub url: String,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Send the rendered message instead of the event as JSON.
    pub template: Option<TemplateRef>,
    /// The `Content-Type` of a rendered message (default `text/plain; charset=utf-8`). A JSON
    /// type (`application/json`, `application/*+json`) makes the template a JSON body builder:
    /// Teams, Mattermost, Discord and PagerDuty take one; what it renders must parse as JSON.
    pub content_type: Option<String>,
    /// Re-sign each request with Standard Webhooks headers under this `whsec_` secret.
    pub sign: Option<SecretSource>,
    #[serde(default)]
    pub delivery: DeliveryOptions,
}

impl super::SinkConfig for HttpSinkConfig {
    fn relative_to(&mut self, base: &std::path::Path) {
        if let Some(sign) = &mut self.sign {
            sign.relative_to(base);
        }
    }

    fn kind(&self) -> &'static str {
        "http"
    }

    fn delivery(&self) -> &DeliveryOptions {
        &self.delivery
    }

    fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        match reqwest::Url::parse(&self.url) {
            Ok(url) if matches!(url.scheme(), "http" | "https") => {}
            Ok(_) => problems.push("url: must be http:// or https://".into()),
            Err(err) => problems.push(format!("url: {err}")),
        }
        if self.content_type.is_some() && self.template.is_none() {
            problems.push("content_type: applies to a `template`; the event itself is JSON".into());
        }
        if let Some(Err(_)) = self.content_type.as_deref().map(HeaderValue::try_from) {
            problems.push("content_type: not a valid header value".into());
        }
        for (name, value) in &self.headers {
            if name.eq_ignore_ascii_case("content-type") {
                problems.push(format!("headers.{name}: set by the sink; use content_type"));
            }
            if HeaderName::try_from(name.as_str()).is_err() {
                problems.push(format!("headers: {name:?} is not a header name"));
            }
            if HeaderValue::try_from(value.as_str()).is_err() {
                problems.push(format!("headers.{name}: not a valid header value"));
            }
        }
        if let Some(Err(problem)) = self.sign.as_ref().map(|sign| sign.validate("sign")) {
            problems.push(problem);
        }
        problems
    }

    fn read_secrets(&self) -> Vec<String> {
        self.signing_key().err().into_iter().collect()
    }

    /// The URL (tokens travel in its path and query) and the headers' values (credentials),
    /// besides the signing secret.
    fn secrets(&self) -> Vec<String> {
        let mut secrets = vec![self.url.clone()];
        secrets.extend(self.headers.values().cloned());
        secrets.extend(self.sign.as_ref().and_then(|s| s.resolve("sign").ok()));
        secrets
    }

    fn build(&self, _name: &str) -> Result<Arc<dyn Sink>, String> {
        Ok(Arc::new(HttpSink::new(self)?))
    }

    fn template(&self) -> Option<&TemplateRef> {
        self.template.as_ref()
    }
}

impl HttpSinkConfig {
    /// The key `sign` names, read and decoded, if the sink signs.
    fn signing_key(&self) -> Result<Option<Vec<u8>>, String> {
        let Some(source) = &self.sign else {
            return Ok(None);
        };
        source.validate("sign")?;
        let secret = source.resolve("sign")?;
        decode_whsec(&secret)
            .map(Some)
            .map_err(|why| format!("sign: {why}"))
    }
}

pub struct HttpSink {
    client: reqwest::Client,
    url: String,
    headers: reqwest::header::HeaderMap,
    /// With a template: the rendered message's `Content-Type`, and whether it must be JSON.
    as_text: Option<(HeaderValue, bool)>,
    signer: Option<Verifier>,
}

impl HttpSink {
    /// # Errors
    /// The signing secret cannot be read or decoded, or the client cannot be built.
    pub fn new(config: &HttpSinkConfig) -> Result<Self, String> {
        let signer = config.signing_key()?.map(|key| {
            Verifier::new(
                Scheme::StandardWebhooks {
                    tolerance: Duration::ZERO,
                },
                vec![Key::new(key)],
            )
        });
        let headers = config
            .headers
            .iter()
            .filter_map(|(k, v)| {
                Some((
                    HeaderName::try_from(k.as_str()).ok()?,
                    HeaderValue::try_from(v.as_str()).ok()?,
                ))
            })
            .collect();
        Ok(Self {
            client: client(config.delivery.timeout.0)?,
            url: config.url.clone(),
            headers,
            as_text: config.template.is_some().then(|| {
                let content_type = config
                    .content_type
                    .as_deref()
                    .unwrap_or("text/plain; charset=utf-8");
                let json = crate::event::is_json_media_type(content_type);
                let value = HeaderValue::try_from(content_type)
                    .unwrap_or(HeaderValue::from_static("text/plain; charset=utf-8"));
                (value, json)
            }),
            signer,
        })
    }
}

/// The JSON body: the event, the route that sent it, and how many hops it has travelled
/// between hookroute daemons (read back by [`Event::hops`] where it arrives).
#[derive(Serialize)]
struct Body<'a> {
    route: &'a str,
    #[serde(flatten)]
    event: &'a Event,
    hookroute: Hops,
}

#[derive(Serialize)]
struct Hops {
    hops: u8,
}

/// How many times `event` was forwarded, this time included: past [`MAX_HOPS`] the daemons
/// forward to each other (or to themselves), and another try would only go round again.
fn hops(event: &Event) -> Result<u8, SinkError> {
    let hops = event.hops().saturating_add(1);
    if hops > MAX_HOPS {
        return Err(SinkError::permanent(format!(
            "forwarding loop: the event was already forwarded {} times between hookroute \
             daemons (at most {MAX_HOPS}); not forwarding it again",
            hops - 1
        )));
    }
    Ok(hops)
}

/// A rendered message as the body's text.
fn text_of(message: &Message) -> String {
    if message.body.is_empty() {
        message.title.clone()
    } else {
        format!("{}\n{}", message.title, message.body)
    }
}

impl HttpSink {
    /// The template rendered `text`, which the receiver expects as JSON when `json`.
    fn checked(content_type: &HeaderValue, json: bool, text: &str) -> Result<(), SinkError> {
        match serde_json::from_str::<serde::de::IgnoredAny>(text) {
            Err(err) if json => Err(SinkError::permanent(format!(
                "the template did not render JSON ({err}); the receiver expects {}",
                content_type.to_str().unwrap_or("JSON")
            ))),
            _ => Ok(()),
        }
    }

    /// POSTs `body`, signed as the webhook `id` when the sink signs.
    async fn post(
        &self,
        body: Vec<u8>,
        content_type: HeaderValue,
        hops: u8,
        id: &str,
    ) -> Result<String, SinkError> {
        let mut headers = self.headers.clone();
        headers.insert(reqwest::header::CONTENT_TYPE, content_type);
        headers.insert(HOPS_HEADER, HeaderValue::from(u16::from(hops)));
        let mut request = self.client.post(&self.url).headers(headers);
        if let Some(signer) = &self.signer {
            for (name, value) in signer.sign(&body, jiff::Timestamp::now().as_second(), id) {
                request = request.header(name, value);
            }
        }
        send(request.body(body)).await
    }
}

#[async_trait]
impl Sink for HttpSink {
    async fn deliver(&self, delivery: &Delivery<'_>) -> Result<String, SinkError> {
        let hops = hops(delivery.event)?;
        let (body, content_type) = match &self.as_text {
            Some((content_type, json)) => {
                let text = text_of(delivery.message);
                Self::checked(content_type, *json, &text)?;
                (text.into_bytes(), content_type.clone())
            }
            None => {
                let body = serde_json::to_vec(&Body {
                    route: delivery.route,
                    event: delivery.event,
                    hookroute: Hops { hops },
                })
                .map_err(|e| SinkError::permanent(format!("cannot encode the event: {e}")))?;
                (body, HeaderValue::from_static("application/json"))
            }
        };
        self.post(body, content_type, hops, &webhook_id(delivery.event))
            .await
    }

    /// One request for the group: a JSON array of the events as [`Sink::deliver`] sends each,
    /// or with a template, each event's rendering (a JSON array of them when the receiver
    /// takes JSON, else one after another, a blank line apart).
    async fn deliver_batch(
        &self,
        deliveries: &[Delivery<'_>],
        _summary: &Message,
    ) -> Result<String, SinkError> {
        let Some(first) = deliveries.first() else {
            return Ok(String::new());
        };
        let mut most = 0;
        for delivery in deliveries {
            most = most.max(hops(delivery.event)?);
        }
        let encode = |e: serde_json::Error| SinkError::permanent(format!("cannot encode the events: {e}"));
        let (body, content_type) = match &self.as_text {
            Some((content_type, json)) => {
                let texts: Vec<String> = deliveries.iter().map(|d| text_of(d.message)).collect();
                for text in &texts {
                    Self::checked(content_type, *json, text)?;
                }
                let body = if *json {
                    let values: Vec<&serde_json::value::RawValue> = texts
                        .iter()
                        .filter_map(|text| serde_json::from_str(text).ok())
                        .collect();
                    serde_json::to_vec(&values).map_err(encode)?
                } else {
                    texts.join("\n\n").into_bytes()
                };
                (body, content_type.clone())
            }
            None => {
                let bodies: Vec<Body<'_>> = deliveries
                    .iter()
                    .map(|d| Body {
                        route: d.route,
                        event: d.event,
                        hookroute: Hops { hops: most },
                    })
                    .collect();
                let body = serde_json::to_vec(&bodies).map_err(encode)?;
                (body, HeaderValue::from_static("application/json"))
            }
        };
        // Stable across retries of the same group, distinct from its first event's own id.
        let id = format!("{}+{}", webhook_id(first.event), deliveries.len() - 1);
        self.post(body, content_type, most, &id).await
    }
}

/// Bytes a `webhook-id` spells as `%XX`: controls, space and `%` itself (non-ASCII always is),
/// so every id is a valid header value whatever the sender put in its `id`.
const ID_ESCAPED: &AsciiSet = &CONTROLS.add(b' ').add(b'%');

/// `<source>:<delivery id>`, percent-encoded where a header could not carry it. Stable across
/// retries, so the next hop can deduplicate them, and distinct for distinct ids.
fn webhook_id(event: &Event) -> String {
    let id = format!("{}:{}", event.source, event.delivery_id);
    utf8_percent_encode(&id, ID_ESCAPED).to_string()
}

/// An HTTP client for sinks: rustls with the system's roots, and a per-request timeout.
pub(super) fn client(timeout: Duration) -> Result<reqwest::Client, String> {
    super::install_tls_provider();
    reqwest::Client::builder()
        .timeout(timeout)
        // A webhook answers where it was asked; following a redirect would carry the body
        // (and its signature) to wherever the receiver points.
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("hookroute/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))
}

/// Sends a request and classifies the answer: 2xx delivered; 429 waits for `Retry-After`;
/// 408, 425 and 5xx, and network trouble, are worth a retry; any other answer is permanent.
///
/// Neither the URL nor anything derived from it reaches the error: reqwest's own text quotes
/// the URL, and a Slack incoming-webhook URL (or a token in a forwarding URL) is a secret.
/// Only the first [`RESPONSE_LIMIT`] bytes of the answer are read; the connection is dropped
/// after that, so a receiver cannot make the daemon buffer a body of any size.
pub(super) async fn send(request: reqwest::RequestBuilder) -> Result<String, SinkError> {
    let mut response = request
        .send()
        .await
        .map_err(|err| SinkError::transient(format!("request failed: {}", describe(err))))?;
    let status = response.status();
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_retry_after);
    let mut kept = Vec::new();
    while kept.len() < RESPONSE_LIMIT {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let room = RESPONSE_LIMIT - kept.len();
                kept.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            Ok(None) | Err(_) => break,
        }
    }
    drop(response);
    let text = String::from_utf8_lossy(&kept);
    let summary = bounded(&format!("HTTP {}: {}", status.as_u16(), text.trim()));
    let message = format!("HTTP {}", status.as_u16());
    match status {
        s if s.is_success() => Ok(summary),
        StatusCode::TOO_MANY_REQUESTS => Err(SinkError::RateLimited {
            retry_after: retry_after.unwrap_or(DEFAULT_RETRY_AFTER),
            message,
            response: summary,
        }),
        s if s.is_server_error() || s == StatusCode::REQUEST_TIMEOUT || s.as_u16() == 425 => {
            Err(SinkError::Transient {
                message,
                response: summary,
            })
        }
        _ => Err(SinkError::Permanent {
            message,
            response: summary,
        }),
    }
}

/// A reqwest error and its causes in one line, without the URL reqwest attaches to it.
pub(crate) fn describe(err: reqwest::Error) -> String {
    let kind = if err.is_timeout() {
        "timed out"
    } else if err.is_connect() {
        "cannot connect"
    } else if err.is_redirect() {
        "redirected (redirects are not followed)"
    } else {
        "error"
    };
    let err = err.without_url();
    let mut text = kind.to_owned();
    let mut cause: Option<&dyn std::error::Error> = std::error::Error::source(&err);
    while let Some(inner) = cause {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        cause = inner.source();
    }
    text
}

/// `Retry-After` as seconds or as an HTTP date.
pub(crate) fn parse_retry_after(value: &str) -> Option<Duration> {
    if let Ok(seconds) = value.trim().parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhook_ids_are_always_header_values() {
        let mut event = Event::parse("cl", br#"{"type": "x"}"#, None, None).unwrap();
        for (id, expected) in [
            ("550e8400-e29b", "cl:550e8400-e29b"),
            ("a\nb", "cl:a%0Ab"),
            ("50% off", "cl:50%25%20off"),
            ("é", "cl:%C3%A9"),
        ] {
            event.delivery_id = id.to_owned();
            let encoded = webhook_id(&event);
            assert_eq!(encoded, expected);
            assert!(HeaderValue::try_from(encoded).is_ok());
        }
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }
}
