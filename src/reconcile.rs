//! Reconcile: what the sender did that no webhook brought. A ComplianceLayer source with an
//! API lists its scans (`/scan/history`) and alerts (`/domains/alerts`); each completed scan
//! or alert no stored event covers becomes the event its webhook would have carried, marked
//! `origin = "reconcile"`, and is accepted like a delivery (stored, routed, delivered once).
//!
//! Both paths key a scan by its job id (`job:<job_id>`), the scan's identity in the webhook's
//! `data` and in the history alike, so whichever comes second is a duplicate; an alert by
//! its id (`alert:<id>`).

use serde_json::{Map, Value};

/// What a synthesised event's body says of where it came from.
pub const ORIGIN: &str = "reconcile";

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

/// Keys a `scan.completed` webhook by its scan's job id, for a source that reconciles: the
/// reconciled event of that scan, before or after it, is then its duplicate. The job id is in
/// the signed body, so the key is as safe from replay as the payload's `id`, and a sender's
/// retries of one scan share it.
pub fn key_by_job(event: &mut crate::event::Event) {
    if event.event_type != "scan.completed" {
        return;
    }
    if let Some(key) = event
        .payload
        .value()
        .get("data")
        .and_then(|data| data.get("job_id"))
        .and_then(scan_key)
        .filter(|key| key.len() <= crate::event::MAX_ID_LEN)
    {
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
/// for one without an id.
pub fn alert_triggered(entry: &Value) -> Option<Value> {
    let entry = entry.as_object()?;
    let id = format!("alert:{}", crate::event::payload_id(entry.get("id")?)?);
    let data: Map<String, Value> = ALERT_FIELDS
        .iter()
        .filter_map(|name| {
            entry
                .get(*name)
                .filter(|value| !value.is_null())
                .map(|value| ((*name).to_owned(), value.clone()))
        })
        .collect();
    let created_at = ["created_at", "triggered_at"]
        .iter()
        .find_map(|name| entry.get(*name).cloned());
    Some(body(id, "alert.triggered", created_at, data))
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
        assert_eq!(body["id"], "alert:alrt_42");
        assert_eq!(body["type"], "alert.triggered");
        assert_eq!(body["data"]["current_score"], 61);
        assert_eq!(alert_triggered(&json!({"domain": "x"})), None);
    }
}

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Pass {
    /// Entries the API listed.
    pub listed: usize,
    /// Events made from them, by delivery id: none of them was stored before.
    pub reconciled: Vec<String>,
    /// Entries a stored event (a webhook's, or an earlier pass's) already covered.
    pub covered: usize,
}

/// Why a pass stopped.
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error(transparent)]
    Api(#[from] crate::api::ApiError),
    #[error("cannot store a reconciled event: {0}")]
    Store(#[from] crate::store::StoreError),
}

/// One pass for `source`: its scan history, then its alerts; each completed scan or alert
/// from `lookback` before `now` on that no stored event covers is accepted as the event its
/// webhook would have carried. The dedupe index decides what is covered, as it does for a
/// sender's retry, so a pass and a webhook racing each other still store one event.
///
/// # Errors
/// The first call the API refused or failed, or a store that did not answer; what was
/// accepted before it stays accepted.
pub async fn pass(
    api: &crate::api::Api,
    source: &str,
    intake: &crate::intake::Intake,
    lookback: std::time::Duration,
    now: jiff::Timestamp,
) -> Result<Pass, PassError> {
    let since = jiff::SignedDuration::try_from(lookback)
        .ok()
        .and_then(|lookback| now.checked_sub(lookback).ok());
    let mut done = Pass::default();
    let scans = api.history().await?;
    let alerts = api.alerts().await?;
    done.listed = scans.len() + alerts.len();
    let bodies = scans
        .iter()
        .filter_map(scan_completed)
        .chain(alerts.iter().filter_map(alert_triggered));
    for body in bodies {
        let text = body.to_string();
        let Ok(event) = crate::event::Event::parse(source, text.as_bytes(), None, None) else {
            continue;
        };
        // Older than the lookback: the dedupe records may be gone, so leave it.
        if let (Some(since), Some(at)) = (since, event.occurred_at)
            && at < since
        {
            continue;
        }
        let key = event.delivery_id.clone();
        match intake.accept(event, text.as_bytes(), now).await? {
            crate::intake::Accepted::New { .. } => done.reconciled.push(key),
            crate::intake::Accepted::Duplicate(_) => done.covered += 1,
        }
    }
    Ok(done)
}

/// A reconcile task for each source with an API and an interval (`[sources.<name>.api]`).
pub fn spawn(
    config: &crate::config::Config,
    intake: &crate::intake::Intake,
    clock: &std::sync::Arc<dyn crate::clock::Clock>,
    stop: &tokio_util::sync::CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    for source in &config.sources {
        let Some(settings) = &source.api else {
            continue;
        };
        let Some(every) = settings.reconcile else {
            continue;
        };
        match crate::api::Api::new(settings) {
            Ok(Some(api)) => tasks.push(tokio::spawn(run(
                api,
                source.name.clone(),
                intake.clone(),
                (every, settings.lookback),
                std::sync::Arc::clone(clock),
                stop.clone(),
            ))),
            Ok(None) => {}
            Err(err) => tracing::error!(source = %source.name, error = %err, "cannot reconcile"),
        }
    }
    tasks
}

/// Reconciles `source` every `every`, the first pass at once, until `stop`. A refused key
/// ends it (until the configuration is reloaded with another); any other failure waits for
/// the next pass.
pub async fn run(
    api: crate::api::Api,
    source: String,
    intake: crate::intake::Intake,
    (every, lookback): (std::time::Duration, std::time::Duration),
    clock: std::sync::Arc<dyn crate::clock::Clock>,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        match pass(&api, &source, &intake, lookback, clock.now()).await {
            Ok(done) => tracing::info!(
                source,
                listed = done.listed,
                reconciled = done.reconciled.len(),
                covered = done.covered,
                "reconciled with the sender's API"
            ),
            Err(PassError::Api(err @ crate::api::ApiError::Refused { .. })) => {
                tracing::error!(source, error = %err, "reconcile stops until the configuration is reloaded with a key the API takes");
                return;
            }
            Err(err) => {
                tracing::warn!(source, error = %err, "reconcile pass failed; trying again at the next")
            }
        }
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = stop.cancelled() => return,
        }
    }
}
