//! The one event shape every sender is normalised into. Pure: parses bytes, performs no I/O.
//!
//! ComplianceLayer sends `{"id", "type", "created_at", "data"}`; Compliance Scorecard sends
//! `{"event", "timestamp", "data"}`. Only the event type is required: every other field may be
//! missing, and new fields and event types pass through untouched in `payload`.

use jiff::Timestamp;
use serde::Serialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// A verified delivery, normalised.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    pub source: String,
    /// The dedupe key: always something the signature covers (see [`Event::parse`]).
    pub delivery_id: String,
    #[serde(rename = "type")]
    pub event_type: String,
    /// The sender's `created_at` / `timestamp`, when present and well-formed.
    pub occurred_at: Option<Timestamp>,
    /// The sender's own, unsigned delivery header (`X-ComplianceLayer-Delivery`,
    /// `X-GitHub-Delivery`), kept for logs and the CLI only.
    pub sender_delivery: Option<String>,
    /// The whole JSON body as sent.
    pub payload: Value,
}

/// Why a body is not an event. Answers 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("body is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("body must be a JSON object")]
    NotAnObject,
    #[error("body has no event type: expected a non-empty string in \"type\" or \"event\"")]
    NoEventType,
}

impl Event {
    /// Normalises a verified body.
    ///
    /// The dedupe key must be covered by the signature, or a captured body could be replayed under
    /// a fresh id: `signed_id` (Standard Webhooks' `webhook-id`) first, then the payload's `id`,
    /// then the SHA-256 of the body.
    ///
    /// # Errors
    /// [`EventError`] when the body is not a JSON object with an event type.
    pub fn parse(
        source: &str,
        body: &[u8],
        signed_id: Option<&str>,
        sender_delivery: Option<&str>,
    ) -> Result<Self, EventError> {
        let payload: Value =
            serde_json::from_slice(body).map_err(|err| EventError::InvalidJson(err.to_string()))?;
        let object = payload.as_object().ok_or(EventError::NotAnObject)?;
        let event_type = ["type", "event"]
            .iter()
            .find_map(|field| object.get(*field).and_then(Value::as_str))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(EventError::NoEventType)?
            .to_owned();
        let occurred_at = ["created_at", "timestamp"]
            .iter()
            .find_map(|field| object.get(*field).and_then(Value::as_str))
            .and_then(|text| text.parse::<Timestamp>().ok());
        let delivery_id = match signed_id {
            Some(id) => id.to_owned(),
            None => payload_id(object)
                .unwrap_or_else(|| format!("sha256:{}", hex::encode(Sha256::digest(body)))),
        };
        Ok(Self {
            source: source.to_owned(),
            delivery_id,
            event_type,
            occurred_at,
            sender_delivery: sender_delivery.map(str::to_owned),
            payload,
        })
    }

    /// The payload's `data` object, or `null` when the sender sent none.
    pub fn data(&self) -> &Value {
        self.payload.get("data").unwrap_or(&Value::Null)
    }
}

fn payload_id(object: &Map<String, Value>) -> Option<String> {
    match object.get("id")? {
        Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_owned()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(name: &str) -> Vec<u8> {
        let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(&path).unwrap_or_else(|err| panic!("{path}: {err}"))
    }

    #[test]
    fn both_sender_shapes() {
        let scan = Event::parse(
            "cl",
            &sample("compliancelayer-scan.completed.json"),
            None,
            Some("d-1"),
        )
        .unwrap();
        assert_eq!(scan.event_type, "scan.completed");
        assert_eq!(scan.delivery_id, "550e8400-e29b-41d4-a716-446655440000");
        assert_eq!(
            scan.occurred_at,
            Some("2026-03-08T12:34:56.789Z".parse().unwrap())
        );
        assert_eq!(scan.data()["grade"], "B");
        assert_eq!(scan.sender_delivery.as_deref(), Some("d-1"));

        let body = sample("scorecard-policy.published.json");
        let policy = Event::parse("sc", &body, None, None).unwrap();
        assert_eq!(policy.event_type, "policy.published");
        assert_eq!(
            policy.occurred_at,
            Some("2025-02-20T15:30:00Z".parse().unwrap())
        );
        // No id in Scorecard bodies: the key is the body's hash, which the signature covers.
        assert_eq!(
            policy.delivery_id,
            format!("sha256:{}", hex::encode(Sha256::digest(&body)))
        );
    }

    #[test]
    fn signed_id_wins_and_fields_may_be_missing() {
        let event =
            Event::parse("s", br#"{"id": 7, "event": "x.y"}"#, Some("msg_1"), None).unwrap();
        assert_eq!(event.delivery_id, "msg_1");
        assert_eq!(event.occurred_at, None);
        assert_eq!(event.data(), &Value::Null);
        let event = Event::parse(
            "s",
            br#"{"id": 7, "type": "x", "created_at": "yesterday"}"#,
            None,
            None,
        )
        .unwrap();
        assert_eq!(event.delivery_id, "7");
        assert_eq!(event.occurred_at, None);
    }

    #[test]
    fn rejects_what_is_not_an_event() {
        let cases: [(&[u8], EventError); 5] = [
            (b"[1]", EventError::NotAnObject),
            (b"\"scan\"", EventError::NotAnObject),
            (br#"{"data": {}}"#, EventError::NoEventType),
            (br#"{"type": "  "}"#, EventError::NoEventType),
            (br#"{"type": 5}"#, EventError::NoEventType),
        ];
        for (body, expected) in cases {
            assert_eq!(Event::parse("s", body, None, None), Err(expected));
        }
        assert!(matches!(
            Event::parse("s", b"{", None, None),
            Err(EventError::InvalidJson(_))
        ));
    }
}
