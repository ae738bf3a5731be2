//! The one event shape every sender is normalised into. Pure: parses bytes, performs no I/O.
//!
//! ComplianceLayer sends `{"id", "type", "created_at", "data"}`; Compliance Scorecard sends
//! `{"event", "timestamp", "data"}`. Only the event type is required: every other field may be
//! missing, and new fields and event types pass through untouched in `payload`.

use std::borrow::Cow;
use std::fmt;
use std::sync::OnceLock;

use jiff::Timestamp;
use serde::de::{IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;
use serde_json::{Value, error::Category};
use sha2::{Digest, Sha256};

pub use hops::{HOPS_HEADER, MAX_HOPS, parse_hops};
pub use tree::MAX_DEPTH;
use tree::tree;

mod hops;
pub mod origin;
mod tree;

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
    pub payload: Payload,
}

/// A JSON body kept as sent, parsed into a tree only when something reads its fields (a
/// condition, a template). Accepting, storing and forwarding an event need only the few
/// envelope fields, and building and dropping the tree of every body was a tenth of the
/// daemon's work under load. Serialises as the original JSON text.
#[derive(Debug, Clone)]
pub struct Payload {
    raw: Box<RawValue>,
    tree: OnceLock<Value>,
}

impl Payload {
    /// # Errors
    /// When `json` is not valid JSON.
    pub fn from_slice(json: &[u8]) -> Result<Self, serde_json::Error> {
        Ok(Self {
            raw: serde_json::from_slice(json)?,
            tree: OnceLock::new(),
        })
    }

    /// The parsed body: always its tree, whatever a stranger put in it (see [`tree::tree`]).
    pub fn value(&self) -> &Value {
        self.tree.get_or_init(|| tree(self.raw.get()))
    }

    /// The body as sent.
    pub fn as_str(&self) -> &str {
        self.raw.get()
    }
}

impl Default for Payload {
    /// `null`.
    fn default() -> Self {
        Self {
            raw: RawValue::NULL.to_owned(),
            tree: OnceLock::new(),
        }
    }
}

impl PartialEq for Payload {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Serialize for Payload {
    /// The body as sent, on one line: a line-based consumer of the file sink (`jq`, Vector,
    /// Loki) must see one delivery as one record, never a pretty-printed body's lines as
    /// records of their own.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match one_line(self.raw.get()) {
            Cow::Borrowed(_) => self.raw.serialize(serializer),
            Cow::Owned(text) => RawValue::from_string(text)
                .map_err(serde::ser::Error::custom)?
                .serialize(serializer),
        }
    }
}

/// Valid JSON `text` without line breaks: as it is when it has none, else with every
/// whitespace character outside strings dropped, which changes nothing JSON can tell. (Inside
/// a string a line break is always escaped, so only structure can hold one.)
fn one_line(text: &str) -> Cow<'_, str> {
    if !text.bytes().any(|b| b == b'\n' || b == b'\r') {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let (mut in_string, mut escaped) = (false, false);
    for c in text.chars() {
        if in_string {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_string = false,
                _ => {}
            }
        } else if matches!(c, ' ' | '\t' | '\n' | '\r') {
            continue;
        } else if c == '"' {
            in_string = true;
        }
        out.push(c);
    }
    Cow::Owned(out)
}

/// The envelope fields of a body, read without building its tree. Like a JSON object read
/// into a map, a repeated key keeps its last value.
#[derive(Default)]
struct Envelope {
    event_type: Option<Value>,
    event: Option<Value>,
    created_at: Option<Value>,
    timestamp: Option<Value>,
    id: Option<Value>,
}

impl<'de> Deserialize<'de> for Envelope {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> Visitor<'de> for Fields {
            type Value = Envelope;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Envelope, A::Error> {
                let mut envelope = Envelope::default();
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    let slot = match key.as_ref() {
                        "type" => &mut envelope.event_type,
                        "event" => &mut envelope.event,
                        "created_at" => &mut envelope.created_at,
                        "timestamp" => &mut envelope.timestamp,
                        "id" => &mut envelope.id,
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                            continue;
                        }
                    };
                    // Read as text first: an odd number or deep nesting in an envelope field
                    // must not make the body unreadable (see `tree`).
                    *slot = Some(tree(map.next_value::<&'de RawValue>()?.get()));
                }
                Ok(envelope)
            }
        }
        deserializer.deserialize_map(Fields)
    }
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
    /// A NUL in the fields a delivery is known by: no database keeps it as text, no log or
    /// environment variable shows it faithfully, and no sender means it.
    #[error("\"{0}\" must not contain NUL characters")]
    Nul(&'static str),
    /// An id or type longer than anyone sends: it would be logged twice per event and kept
    /// in every index, so a sender could fill the disk with its log.
    #[error("\"{field}\" is {len} bytes long; at most {limit} are accepted")]
    TooLong {
        field: &'static str,
        len: usize,
        limit: usize,
    },
}

/// The longest event type accepted, in bytes (`scan.completed` is 14).
pub const MAX_TYPE_LEN: usize = 128;
/// The longest delivery id accepted, in bytes: the payload's `id`, a signed `webhook-id` or
/// the sender's delivery header (a UUID is 36).
pub const MAX_ID_LEN: usize = 256;

/// Refuses `value` of `field` when it holds a NUL or is longer than `limit` bytes.
fn check(field: &'static str, value: &str, limit: usize) -> Result<(), EventError> {
    if value.contains('\0') {
        return Err(EventError::Nul(field));
    }
    if value.len() > limit {
        return Err(EventError::TooLong {
            field,
            len: value.len(),
            limit,
        });
    }
    Ok(())
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
        let payload =
            Payload::from_slice(body).map_err(|err| EventError::InvalidJson(err.to_string()))?;
        let envelope: Envelope =
            serde_json::from_str(payload.as_str()).map_err(|err| match err.classify() {
                Category::Data => EventError::NotAnObject,
                _ => EventError::InvalidJson(err.to_string()),
            })?;
        let event_type = text(&envelope.event_type)
            .or_else(|| text(&envelope.event))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(EventError::NoEventType)?
            .to_owned();
        check("type", &event_type, MAX_TYPE_LEN)?;
        let occurred_at = text(&envelope.created_at)
            .or_else(|| text(&envelope.timestamp))
            .and_then(|text| text.parse::<Timestamp>().ok());
        let delivery_id = match signed_id {
            Some(id) => id.to_owned(),
            None => envelope
                .id
                .as_ref()
                .and_then(payload_id)
                .unwrap_or_else(|| format!("sha256:{}", hex::encode(Sha256::digest(body)))),
        };
        check("id", &delivery_id, MAX_ID_LEN)?;
        if let Some(header) = sender_delivery {
            check("delivery header", header, MAX_ID_LEN)?;
        }
        Ok(Self {
            source: source.to_owned(),
            delivery_id,
            event_type,
            occurred_at,
            sender_delivery: sender_delivery.map(str::to_owned),
            payload,
        })
    }

    /// How many times hookroute daemons forwarded this event before it arrived here: the
    /// `hookroute.hops` an http sink writes into the body it forwards (signed with it, so a
    /// stranger cannot set it), 0 for a sender's own event.
    pub fn hops(&self) -> u8 {
        self.payload
            .value()
            .get("hookroute")
            .and_then(|h| h.get("hops"))
            .and_then(Value::as_u64)
            .map_or(0, |hops| u8::try_from(hops).unwrap_or(u8::MAX))
    }

    /// The payload's `data` object, or `null` when the sender sent none.
    pub fn data(&self) -> &Value {
        self.payload.value().get("data").unwrap_or(&Value::Null)
    }
}

/// Whether a `Content-Type` names JSON: `application/json` or any `application/*+json`, in any
/// case, parameters allowed. What ingest accepts, and what makes an http sink's template a
/// JSON body.
pub fn is_json_media_type(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

fn text(field: &Option<Value>) -> Option<&str> {
    field.as_ref().and_then(Value::as_str)
}

/// An id as text: a string as it is (trimmed), a number in its digits; nothing else is an
/// id. The payload's `id`, and the ids reconcile reads from the sender's API.
pub(crate) fn payload_id(id: &Value) -> Option<String> {
    match id {
        Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_owned()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Killed mutants (cargo mutants, #23): the limits at their edges, which bodies count as
    /// JSON, a blank id, and payloads compared by their text.
    #[test]
    fn limits_media_types_blank_ids_and_payload_equality() {
        let body = |id: &str, kind: &str| serde_json::json!({"id": id, "type": kind}).to_string();
        let parse = |b: String| Event::parse("x", b.as_bytes(), None, None);
        assert!(parse(body("i", &"t".repeat(MAX_TYPE_LEN))).is_ok());
        assert!(matches!(
            parse(body("i", &"t".repeat(MAX_TYPE_LEN + 1))),
            Err(EventError::TooLong { field: "type", .. })
        ));
        assert!(parse(body(&"i".repeat(MAX_ID_LEN), "t")).is_ok());
        assert!(parse(body(&"i".repeat(MAX_ID_LEN + 1), "t")).is_err());
        let blank = parse(body("   ", "t")).unwrap();
        assert!(
            blank.delivery_id.starts_with("sha256:"),
            "{}",
            blank.delivery_id
        );
        for (content_type, json) in [
            ("application/json", true),
            ("Application/JSON; charset=utf-8", true),
            ("application/cloudevents+json", true),
            ("text/json", false),
            ("application/jsonx", false),
            ("text/plain+json", false),
            ("", false),
        ] {
            assert_eq!(is_json_media_type(content_type), json, "{content_type}");
        }
        let one = Payload::from_slice(br#"{"a": 1}"#).unwrap();
        assert_eq!(one, Payload::from_slice(br#"{"a": 1}"#).unwrap());
        assert_ne!(one, Payload::from_slice(br#"{"a": 2}"#).unwrap());
    }

    #[test]
    fn a_forwarded_event_knows_its_hops() {
        let forwarded = br#"{"type": "scan.completed", "hookroute": {"hops": 3}}"#;
        assert_eq!(Event::parse("x", forwarded, None, None).unwrap().hops(), 3);
        let sent = br#"{"type": "scan.completed", "hookroute": "no"}"#;
        assert_eq!(Event::parse("x", sent, None, None).unwrap().hops(), 0);
        let huge = br#"{"type": "x", "hookroute": {"hops": 70000}}"#;
        assert_eq!(Event::parse("x", huge, None, None).unwrap().hops(), 255);
    }

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
    fn the_payload_is_kept_as_sent_and_parsed_on_demand() {
        let body = br#"{"type": "x.y",  "z": 1, "a": [1, 2.50], "data": {"k": "v"}}"#;
        let event = Event::parse("s", body, None, None).unwrap();
        assert_eq!(event.payload.as_str().as_bytes(), body);
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(json["payload"]["a"][1], 2.5);
        assert_eq!(event.data()["k"], "v");
        // A repeated key keeps its last value, as in a JSON object read into a map.
        let event = Event::parse("s", br#"{"type": "a", "type": "b"}"#, None, None).unwrap();
        assert_eq!(event.event_type, "b");
    }

    #[test]
    fn odd_numbers_and_deep_nesting_keep_the_rest_of_the_tree() {
        let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
        let body = format!(
            r#"{{"type": "scan.completed", "id": 1e999, "data": {{"score": 10, "huge": -1e999, "big": 123456789012345678901234567890, "deep": {deep}}}}}"#
        );
        let event = Event::parse("s", body.as_bytes(), None, None).unwrap();
        assert_eq!(event.delivery_id, "1e999");
        let data = event.data();
        assert_eq!(data["score"], 10);
        assert_eq!(data["huge"], "-1e999");
        assert_eq!(data["big"].as_f64(), Some(1.2345678901234568e29));
        // Kept down to the depth limit; below it, the JSON text.
        let mut node = &data["deep"];
        for _ in 0..MAX_DEPTH - 2 {
            node = &node[0];
        }
        let rest = node.as_str().expect("text below the limit");
        assert_eq!(rest.len(), 2 * (200 - (MAX_DEPTH - 2)) + 1);
        assert!(rest.starts_with("[[") && rest.ends_with("]]"));
    }

    #[test]
    fn lenient_reads_what_serde_json_reads_the_same_way() {
        for text in [
            r#"{"a": [1, -2.5e3, true, false, null, "x\"y\\", {}], "b": {"c": [[]]}, "a": 0}"#,
            r#"[ "\u00e9\n" , 0 , {"k" : {"l": "]}"}} ]"#,
            "\"plain\"",
            "  42  ",
        ] {
            let expected: Value = serde_json::from_str(text).unwrap();
            assert_eq!(tree::lenient(text), expected, "{text}");
        }
    }

    #[test]
    fn a_body_on_several_lines_serialises_on_one() {
        let body =
            b"{\n  \"type\": \"x\",\r\n  \"data\": {\"text\": \"a b\\n c\", \"q\": \"\\\"\"}\n}";
        let event = Event::parse("s", body, None, None).unwrap();
        let line = serde_json::to_string(&event).unwrap();
        assert!(!line.contains('\n') && !line.contains('\r'), "{line}");
        let json: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(json["payload"]["data"]["text"], "a b\n c");
        assert_eq!(json["payload"]["data"]["q"], "\"");
        assert_eq!(one_line(r#"{"a": 1}"#), Cow::Borrowed(r#"{"a": 1}"#));
    }

    #[test]
    fn rejects_what_is_not_an_event() {
        let cases: [(&[u8], EventError); 8] = [
            (b"[1]", EventError::NotAnObject),
            (b"\"scan\"", EventError::NotAnObject),
            (br#"{"data": {}}"#, EventError::NoEventType),
            (br#"{"type": "  "}"#, EventError::NoEventType),
            (br#"{"type": 5}"#, EventError::NoEventType),
            (
                br#"{"type": "scan\u0000.completed"}"#,
                EventError::Nul("type"),
            ),
            (br#"{"event": "a\u0000"}"#, EventError::Nul("type")),
            (br#"{"type": "a", "id": "x\u0000y"}"#, EventError::Nul("id")),
        ];
        for (body, expected) in cases {
            assert_eq!(Event::parse("s", body, None, None), Err(expected));
        }
        assert!(matches!(
            Event::parse("s", b"{", None, None),
            Err(EventError::InvalidJson(_))
        ));
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        /// JSON text as a stranger may write it: every kind of value, numbers no `f64`
        /// holds, repeated keys, escapes and raw Unicode in strings, any layout.
        fn json_text() -> impl Strategy<Value = String> {
            let leaf = prop_oneof![
                Just("null".to_owned()),
                any::<bool>().prop_map(|b| b.to_string()),
                any::<i64>().prop_map(|n| n.to_string()),
                any::<u64>().prop_map(|n| n.to_string()),
                any::<f64>()
                    .prop_filter("finite", |f| f.is_finite())
                    .prop_map(|f| serde_json::to_string(&f).unwrap()),
                prop_oneof![
                    Just("1e999"),
                    Just("-1e400"),
                    Just("123456789012345678901234567890"),
                    Just("0.000000000000000000000000000001e-400"),
                ]
                .prop_map(str::to_owned),
                any::<String>().prop_map(|s| serde_json::to_string(&s).unwrap()),
            ];
            let space = prop_oneof![Just(""), Just(" "), Just("\n  "), Just("\r\n\t")];
            leaf.prop_recursive(6, 64, 6, move |inner| {
                prop_oneof![
                    (prop::collection::vec(inner.clone(), 0..6), space.clone()).prop_map(
                        |(items, sp)| format!("[{sp}{}{sp}]", items.join(&format!(",{sp}")))
                    ),
                    (
                        prop::collection::vec(
                            (
                                prop_oneof![Just("a"), Just("b"), Just("type"), Just("é\\n")],
                                inner
                            ),
                            0..6
                        ),
                        space.clone()
                    )
                        .prop_map(|(fields, sp)| {
                            let fields: Vec<String> = fields
                                .iter()
                                .map(|(k, v)| {
                                    format!("{}{sp}:{sp}{v}", serde_json::to_string(k).unwrap())
                                })
                                .collect();
                            format!("{{{sp}{}{sp}}}", fields.join(&format!(",{sp}")))
                        }),
                ]
            })
        }

        /// `text` nested inside `depth` arrays.
        fn nested(text: &str, depth: usize) -> String {
            format!("{}{text}{}", "[".repeat(depth), "]".repeat(depth))
        }

        proptest! {
            #[test]
            fn lenient_agrees_with_serde_json_wherever_serde_json_can_read(text in json_text()) {
                if let Ok(expected) = serde_json::from_str::<Value>(&text) {
                    prop_assert_eq!(tree::lenient(&text), expected);
                }
            }

            #[test]
            fn any_valid_body_keeps_its_tree(data in json_text(), depth in 0usize..400) {
                let body = format!("{{\"type\": \"x.y\", \"data\": {}}}", nested(&data, depth));
                let event = Event::parse("s", body.as_bytes(), None, None).unwrap();
                prop_assert_eq!(&event.payload.value()["type"], "x.y");
                prop_assert!(event.payload.value().get("data").is_some());
            }

            #[test]
            fn any_body_serialises_as_one_line_that_round_trips(data in json_text()) {
                let body = format!("{{\n  \"type\": \"x.y\",\n  \"data\":\n{data}\n}}");
                let event = Event::parse("s", body.as_bytes(), None, None).unwrap();
                let line = serde_json::to_string(&event).unwrap();
                prop_assert!(!line.contains('\n') && !line.contains('\r'));
                let read = tree::lenient(&line);
                prop_assert_eq!(&read["payload"], &tree::lenient(&body));
            }

            #[test]
            fn parsing_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
                let _ = Event::parse("s", &bytes, None, None).map(|e| e.payload.value().clone());
            }
        }
    }
}
