//! The events a pass synthesises: the body `scan.completed` or `alert.triggered` would have
//! carried for an entry of the API's lists, and the dedupe key both paths share.
//!
//! Both paths key a scan by its job id (`job:<job_id>`), the scan's identity in the webhook's
//! `data` and in the history alike, so whichever comes second is a duplicate; an alert by
//! its id (`alert:<id>`).

use serde_json::{Map, Value};

pub use crate::event::origin::RECONCILE as ORIGIN;

/// The webhook's `data` fields of `scan.completed`, as the sender's docs list them.
const SCAN_FIELDS: &[&str] = &[
    "scan_id",
    "job_id",
    "domain",
    "score",
    "grade",
    "issues_count",
    "critical_issues",
    "high_issues",
    "medium_issues",
    "low_issues",
    "scanned_at",
    "scan_duration_ms",
];

/// The webhook's `data` fields of `alert.triggered`.
const ALERT_FIELDS: &[&str] = &[
    "domain",
    "alert_type",
    "severity",
    "message",
    "previous_score",
    "current_score",
    "threshold",
    "job_id",
    "scan_id",
];

/// The dedupe key of a scan: its job id, whichever path brought it.
pub fn scan_key(job_id: &Value) -> Option<String> {
    crate::event::payload_id(job_id).map(|job| format!("job:{job}"))
}

/// The dedupe key of an alert, whichever path brought it: its domain, its type and the
/// second it was created (`alert:<domain>:<alert_type>:<unix seconds>`). The webhook carries
/// no id of the alert's own (its `id` is the delivery's), so the key is made of what both
/// the webhook and `/domains/alerts` say of it; the second, not the millisecond, because one
/// writes `…:00.000Z` where the other may write `…:00Z`.
pub fn alert_key(
    domain: Option<&Value>,
    alert_type: Option<&Value>,
    created_at: Option<&Value>,
) -> Option<String> {
    let text = |value: Option<&Value>| crate::event::payload_id(value?);
    let at: jiff::Timestamp = created_at?.as_str()?.trim().parse().ok()?;
    Some(format!(
        "alert:{}:{}:{}",
        text(domain)?.to_ascii_lowercase(),
        text(alert_type)?,
        at.as_second()
    ))
}

/// Keys a webhook the way reconcile keys what it synthesises, for a source that reconciles:
/// `scan.completed` by its job id, `alert.triggered` by [`alert_key`]. The reconciled event
/// of the same scan or alert, before or after it, is then its duplicate. The key is made of
/// the signed body, so it is as safe from replay as the payload's `id`, and a sender's
/// retries share it. A webhook without what the key needs keeps its own id.
pub fn key_like_reconcile(event: &mut crate::event::Event) {
    let body = event.payload.value();
    let data = body.get("data");
    let field = |name: &str| data.and_then(|data| data.get(name));
    let key = match event.event_type.as_str() {
        "scan.completed" => field("job_id").and_then(scan_key),
        "alert.triggered" => {
            alert_key(field("domain"), field("alert_type"), body.get("created_at"))
        }
        _ => None,
    };
    if let Some(key) = key.filter(|key| key.len() <= crate::event::MAX_ID_LEN) {
        event.delivery_id = key;
    }
}

/// The body `scan.completed` would have carried for a history entry; `None` for a scan not
/// completed, or one without a job id. The entry's fields may sit under `result` (as
/// `/scan/jobs/:id` gives them) or beside its status.
pub fn scan_completed(entry: &Value) -> Option<Value> {
    let entry = entry.as_object()?;
    let status = entry.get("status").and_then(Value::as_str);
    if status.is_some_and(|status| status != "completed") {
        return None;
    }
    let result = entry.get("result").and_then(Value::as_object);
    let field = |name: &str| {
        entry
            .get(name)
            .or_else(|| result.and_then(|result| result.get(name)))
            .filter(|value| !value.is_null())
    };
    let id = scan_key(field("job_id")?)?;
    let data: Map<String, Value> = SCAN_FIELDS
        .iter()
        .filter_map(|name| field(name).map(|value| ((*name).to_owned(), value.clone())))
        .collect();
    let created_at = ["completed_at", "scanned_at", "created_at"]
        .iter()
        .find_map(|name| field(name).cloned());
    Some(body(id, "scan.completed", created_at, data))
}

/// The body `alert.triggered` would have carried for an entry of `/domains/alerts`; `None`
/// for one without what its key needs (see [`alert_key`]).
pub fn alert_triggered(entry: &Value) -> Option<Value> {
    let entry = entry.as_object()?;
    let created_at = ["created_at", "triggered_at"]
        .iter()
        .find_map(|name| entry.get(*name))?;
    let id = alert_key(
        entry.get("domain"),
        entry.get("alert_type"),
        Some(created_at),
    )?;
    let data: Map<String, Value> = ALERT_FIELDS
        .iter()
        .filter_map(|name| {
            entry
                .get(*name)
                .filter(|value| !value.is_null())
                .map(|value| ((*name).to_owned(), value.clone()))
        })
        .collect();
    Some(body(id, "alert.triggered", Some(created_at.clone()), data))
}

fn body(
    id: String,
    event_type: &str,
    created_at: Option<Value>,
    data: Map<String, Value>,
) -> Value {
    let mut body = Map::new();
    body.insert("id".into(), Value::String(id));
    body.insert("type".into(), Value::String(event_type.to_owned()));
    if let Some(created_at) = created_at {
        body.insert("created_at".into(), created_at);
    }
    body.insert("origin".into(), Value::String(ORIGIN.to_owned()));
    body.insert("data".into(), Value::Object(data));
    Value::Object(body)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_completed_scan_becomes_the_webhook_it_would_have_sent() {
        let entry = json!({
            "job_id": 67890, "scan_id": 12345, "status": "completed", "domain": "example.com",
            "score": 61, "grade": "D", "issues_count": 8, "critical_issues": 2,
            "completed_at": "2026-12-07T10:00:00Z", "plan": "professional"
        });
        let body = scan_completed(&entry).unwrap();
        assert_eq!(body["id"], "job:67890");
        assert_eq!(body["type"], "scan.completed");
        assert_eq!(body["origin"], "reconcile");
        assert_eq!(body["created_at"], "2026-12-07T10:00:00Z");
        assert_eq!(body["data"]["grade"], "D");
        assert_eq!(body["data"]["job_id"], 67890);
        assert!(
            body["data"].get("plan").is_none(),
            "only the webhook's fields"
        );
        // The same from `/scan/jobs/:id`'s shape, the summary under `result`.
        let nested =
            json!({"status": "completed", "result": {"job_id": "67890", "domain": "example.com"}});
        assert_eq!(scan_completed(&nested).unwrap()["id"], "job:67890");
    }

    #[test]
    fn what_is_not_a_completed_scan_with_a_job_is_left() {
        for entry in [
            json!({"job_id": 1, "status": "running"}),
            json!({"job_id": null, "status": "completed"}),
            json!({"domain": "example.com"}),
            json!({"job_id": " ", "status": "completed"}),
            json!([1, 2]),
        ] {
            assert_eq!(scan_completed(&entry), None, "{entry}");
        }
    }

    #[test]
    fn an_alert_becomes_the_webhook_it_would_have_sent() {
        let entry = json!({
            "id": "alrt_42", "domain": "example.com", "alert_type": "score_drop",
            "severity": "high", "previous_score": 85, "current_score": 61,
            "created_at": "2026-12-07T08:00:00Z"
        });
        let body = alert_triggered(&entry).unwrap();
        assert_eq!(body["id"], "alert:example.com:score_drop:1796630400");
        assert_eq!(body["type"], "alert.triggered");
        assert_eq!(body["data"]["current_score"], 61);
        assert_eq!(alert_triggered(&json!({"domain": "x"})), None);
        assert_eq!(
            alert_triggered(&json!({"domain": "x", "alert_type": "t", "created_at": "soon"})),
            None
        );
        // The webhook's spelling of the same moment keys the same alert.
        let webhook = alert_key(
            Some(&json!("Example.com")),
            Some(&json!("score_drop")),
            Some(&json!("2026-12-07T08:00:00.000Z")),
        );
        assert_eq!(
            webhook.as_deref(),
            Some("alert:example.com:score_drop:1796630400")
        );
    }
}
