//! Enrichment: what the sender's API knows about a scan that its webhook does not carry,
//! fetched before a message is rendered. A route or a sink asks (`enrich = ["report"]`,
//! `["pdf"]`); for `scan.completed` and `alert.triggered` from a source with an API, the
//! scan's report (`/scan/jobs/:job_id/report`) gives templates `report` (its findings by
//! severity with their remediation, its module scores), and the PDF report
//! (`/compliance/reports/:job_id/pdf`) is attached to emails.
//!
//! It never blocks or loses a delivery: a fetch has `enrich_wait` (10 s by default), and a
//! message whose enrichment failed is sent without it, the job's record saying why, unless
//! the route says `enrich_required` (then the attempt fails, to be retried with the job).
//! What was fetched is kept a while per job, so the messages of one scan to several sinks,
//! and a retry, ask the API once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::OnceCell;

use crate::api::{Api, ApiError};
use crate::config::Config;
use crate::config::api::ApiConfig;
use crate::event::Event;
use crate::rules::Enrich;
use crate::sinks::Attachment;

/// How long a fetched report or PDF is kept for the other messages of its scan.
const KEEP: Duration = Duration::from_secs(3600);
/// The most scans kept per source: past it, the expired go first, then the oldest.
const KEPT: usize = 256;
/// The most findings a template sees (most severe first), and the top ones listed.
const FINDINGS: usize = 50;
const TOP: usize = 5;

/// What one message asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Wanted {
    pub report: bool,
    /// The PDF, as a file to attach (for a sink that can carry one).
    pub attach: bool,
    /// Fail the attempt rather than send without.
    pub required: bool,
}

impl Wanted {
    /// What `asked` (a route's and a sink's `enrich`) means for a sink of `kind`: an email
    /// carries the PDF; any other sink gets the report, which says where the PDF is.
    pub fn of(asked: &[Enrich], kind: &str, required: bool) -> Self {
        let pdf = asked.contains(&Enrich::Pdf);
        Self {
            report: asked.contains(&Enrich::Report) || (pdf && kind != "email"),
            attach: pdf && kind == "email",
            required,
        }
    }

    fn any(self) -> bool {
        self.report || self.attach
    }
}

/// What enrichment gave one message.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Enriched {
    /// The report as templates read it (see [`summary`]).
    pub report: Option<Value>,
    pub attachments: Vec<Attachment>,
    /// Why something asked for is missing: the job's record says "not enriched: …".
    pub missing: Option<String>,
    /// Whether the attempt is to fail, to be retried, rather than go without: the route
    /// requires the enrichment (`enrich_required`) and a later attempt may get what is
    /// missing (the API was down, slow, limited), unlike what no retry changes (no API
    /// table, no job, a refused key).
    pub retry: bool,
}

/// The API clients of the sources that have one, with what they fetched.
#[derive(Default)]
pub struct Enricher {
    sources: HashMap<String, Arc<Source>>,
}

struct Source {
    /// What it was built from: a reload that leaves it unchanged keeps the source (its
    /// client, so what the API said of its limits, and what was fetched).
    settings: ApiConfig,
    api: Arc<Api>,
    reports: Kept<Value>,
    pdfs: Kept<Arc<[u8]>>,
}

impl Enricher {
    /// A client for each source of `config` with an API (and its key); those of `previous`
    /// whose settings are unchanged are kept, with what they fetched and what the API said
    /// of its limits.
    ///
    /// # Errors
    /// A client that cannot be built, and why.
    pub fn build(config: &Config, previous: Option<&Self>) -> Result<Self, String> {
        let mut sources = HashMap::new();
        for source in &config.sources {
            let Some(settings) = &source.api else {
                continue;
            };
            let kept = previous
                .and_then(|previous| previous.sources.get(&source.name))
                .filter(|kept| kept.settings == *settings);
            if let Some(kept) = kept {
                sources.insert(source.name.clone(), Arc::clone(kept));
                continue;
            }
            let api =
                Api::new(settings).map_err(|err| format!("sources.{}.api: {err}", source.name))?;
            if let Some(api) = api {
                let fetched = Source {
                    settings: settings.clone(),
                    api: Arc::new(api),
                    reports: Kept::default(),
                    pdfs: Kept::default(),
                };
                sources.insert(source.name.clone(), Arc::new(fetched));
            }
        }
        Ok(Self { sources })
    }

    /// The client of `source`'s API, shared by enrichment and reconciling: a 429 either
    /// meets quiets both.
    pub fn api(&self, source: &str) -> Option<Arc<Api>> {
        self.sources
            .get(source)
            .map(|source| Arc::clone(&source.api))
    }

    /// Fetches what `wanted` asks for about `event`'s scan, each within the source's wait.
    /// Events other than a scan's or an alert's get nothing, and no reason: there is nothing
    /// to fetch for them.
    pub async fn enrich(&self, event: &Event, wanted: Wanted) -> Enriched {
        if !wanted.any()
            || !matches!(
                event.event_type.as_str(),
                "scan.completed" | "alert.triggered"
            )
        {
            return Enriched::default();
        }
        let missing = |why: String| Enriched {
            missing: Some(why),
            ..Enriched::default()
        };
        let Some(job) = event
            .data()
            .get("job_id")
            .and_then(crate::event::payload_id)
        else {
            // Many alerts (a certificate about to expire) are about no scan: nothing to fetch.
            if event.event_type == "alert.triggered" {
                return Enriched::default();
            }
            return missing("the event names no scan job (data.job_id)".to_owned());
        };
        let Some(source) = self.sources.get(&event.source) else {
            return missing(format!(
                "source {:?} has no API table to fetch from",
                event.source
            ));
        };
        let mut enriched = Enriched::default();
        let mut reasons = Vec::new();
        if wanted.report {
            let fetched = source
                .reports
                .get(&job, source.settings.enrich_wait, || {
                    source.api.report(&job)
                })
                .await;
            match fetched {
                Ok(report) => enriched.report = Some(summary(&report)),
                Err((why, retry)) => {
                    reasons.push(format!("report: {why}"));
                    enriched.retry |= retry;
                }
            }
        }
        if wanted.attach {
            let fetched = source
                .pdfs
                .get(&job, source.settings.enrich_wait, || async {
                    let pdf = source.api.pdf(&job, source.settings.pdf_max_bytes).await?;
                    if !pdf.starts_with(b"%PDF-") {
                        return Err(ApiError::Shape("the PDF report is not a PDF".to_owned()));
                    }
                    Ok(Arc::from(pdf))
                })
                .await;
            match fetched {
                Ok(bytes) => enriched.attachments.push(Attachment {
                    filename: format!("compliancelayer-report-{}.pdf", file_safe(&job)),
                    content_type: "application/pdf",
                    bytes,
                }),
                Err((why, retry)) => {
                    reasons.push(format!("PDF: {why}"));
                    enriched.retry |= retry;
                }
            }
        }
        if !reasons.is_empty() {
            enriched.missing = Some(reasons.join("; "));
        }
        enriched.retry &= wanted.required;
        enriched
    }
}

/// A job id fit for a file name.
fn file_safe(job: &str) -> String {
    job.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect()
}

/// What was fetched, per job id: one fetch at a time per job (the messages of one scan wait
/// for the same answer), kept for [`KEEP`]. A failed fetch is not kept: the next asks again.
struct Kept<T> {
    entries: Mutex<HashMap<String, Slot<T>>>,
}

/// When a job's fetch began, and its answer once there is one.
type Slot<T> = (Instant, Arc<OnceCell<T>>);

impl<T> Default for Kept<T> {
    fn default() -> Self {
        Self {
            entries: Mutex::default(),
        }
    }
}

impl<T: Clone> Kept<T> {
    /// The value kept for `job`, or `fetch`'s, within `wait`; else why not, and whether a
    /// later try may do better.
    async fn get<F, Fut>(&self, job: &str, wait: Duration, fetch: F) -> Result<T, (String, bool)>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<T, ApiError>>,
    {
        let cell = {
            let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            if entries.len() >= KEPT && !entries.contains_key(job) {
                entries.retain(|_, (at, _)| at.elapsed() < KEEP);
                if entries.len() >= KEPT
                    && let Some(oldest) = entries
                        .iter()
                        .min_by_key(|(_, (at, _))| *at)
                        .map(|(key, _)| key.clone())
                {
                    entries.remove(&oldest);
                }
            }
            let entry = entries
                .entry(job.to_owned())
                .or_insert_with(|| (Instant::now(), Arc::new(OnceCell::new())));
            if entry.0.elapsed() >= KEEP {
                *entry = (Instant::now(), Arc::new(OnceCell::new()));
            }
            Arc::clone(&entry.1)
        };
        match tokio::time::timeout(wait, cell.get_or_try_init(fetch)).await {
            Ok(Ok(value)) => Ok(value.clone()),
            Ok(Err(err)) => Err((err.to_string(), err.is_transient())),
            Err(_) => Err((
                format!(
                    "the API did not answer within {}",
                    humantime::format_duration(wait)
                ),
                true,
            )),
        }
    }
}

/// The report as templates read it (`report.*`), whatever of it the API gave: `score`,
/// `grade`, `risk_level`; `findings`, each `{severity, finding, remediation, module}`, most
/// severe first (at most [`FINDINGS`]); `top`, the first [`TOP`] critical or high ones;
/// `modules`, each `{name, score, grade}`; `link`, the report's own address if it gives one.
pub fn summary(report: &Value) -> Value {
    let mut findings: Vec<Value> = Vec::new();
    let mut collect = |list: Option<&Value>, module: Option<&str>| {
        for item in list.and_then(Value::as_array).into_iter().flatten() {
            if let Some(finding) = finding(item, module) {
                findings.push(finding);
            }
        }
    };
    for key in ["findings", "issues"] {
        collect(report.get(key), None);
    }
    let mut modules = Vec::new();
    let module_entries: Vec<(String, &Value)> = match report.get("modules") {
        Some(Value::Object(by_name)) => by_name.iter().map(|(name, m)| (name.clone(), m)).collect(),
        Some(Value::Array(list)) => list
            .iter()
            .filter_map(|m| {
                let name = m.get("name").or_else(|| m.get("module"))?.as_str()?;
                Some((name.to_owned(), m))
            })
            .collect(),
        _ => Vec::new(),
    };
    for (name, module) in module_entries {
        for key in ["findings", "issues"] {
            collect(module.get(key), Some(&name));
        }
        modules.push(json!({
            "name": name,
            "score": module.get("score").cloned().unwrap_or(Value::Null),
            "grade": module.get("grade").cloned().unwrap_or(Value::Null),
        }));
    }
    findings.sort_by_key(|f| severity_rank(f["severity"].as_str().unwrap_or("")));
    let count = findings.len();
    findings.truncate(FINDINGS);
    let top: Vec<Value> = findings
        .iter()
        .filter(|f| matches!(f["severity"].as_str(), Some("critical" | "high")))
        .take(TOP)
        .cloned()
        .collect();
    let link = ["report_url", "pdf_url", "url"]
        .iter()
        .filter_map(|key| report.get(*key)?.as_str())
        .find(|url| url.starts_with("https://") || url.starts_with("http://"));
    let field = |key: &str| report.get(key).cloned().unwrap_or(Value::Null);
    json!({
        "score": field("score"),
        "grade": field("grade"),
        "risk_level": field("risk_level"),
        "findings_count": count,
        "findings": findings,
        "top": top,
        "modules": modules,
        "link": link,
    })
}

/// One finding in the shape templates read, if it says anything.
fn finding(item: &Value, module: Option<&str>) -> Option<Value> {
    let text = |keys: &[&str]| {
        keys.iter()
            .find_map(|key| item.get(*key)?.as_str())
            .map(str::to_owned)
    };
    let said = text(&["finding", "title", "message", "description"])?;
    let severity = text(&["severity", "level"])
        .unwrap_or_default()
        .to_lowercase();
    Some(json!({
        "severity": severity,
        "finding": said,
        "remediation": text(&["remediation", "fix", "recommendation"]),
        "module": text(&["module", "category"]).or_else(|| module.map(str::to_owned)),
    }))
}

fn severity_rank(severity: &str) -> u8 {
    match severity {
        "critical" => 0,
        "high" => 1,
        "medium" => 2,
        "low" => 3,
        "info" | "informational" => 4,
        _ => 5,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_becomes_its_findings_by_severity_and_its_modules() {
        let report = json!({
            "score": 42, "grade": "F",
            "issues": [
                {"severity": "low", "finding": "No DMARC reporting address"},
                {"severity": "CRITICAL", "finding": "Telnet open on port 23", "remediation": "Close port 23", "module": "ports"}
            ],
            "modules": {
                "ssl": {"score": 30, "grade": "F", "findings": [
                    {"severity": "high", "title": "Certificate expires in 3 days", "remediation": "Renew it"}
                ]},
                "dns": {"score": 90}
            },
            "report_url": "https://app.compliancelayer.net/reports/cl_rpt_1"
        });
        let summary = summary(&report);
        assert_eq!(summary["findings_count"], 3);
        assert_eq!(summary["findings"][0]["finding"], "Telnet open on port 23");
        assert_eq!(summary["findings"][0]["severity"], "critical");
        assert_eq!(summary["top"].as_array().unwrap().len(), 2);
        assert_eq!(summary["top"][1]["module"], "ssl");
        assert_eq!(summary["top"][1]["remediation"], "Renew it");
        assert_eq!(summary["modules"][0]["name"], "dns");
        assert_eq!(
            summary["link"],
            "https://app.compliancelayer.net/reports/cl_rpt_1"
        );
        // Whatever the API leaves out is absent, not an error.
        let bare = super::summary(&json!({"weird": true}));
        assert_eq!(bare["top"], json!([]));
        assert_eq!(bare["link"], Value::Null);
    }

    #[tokio::test]
    async fn what_no_retry_can_fetch_is_said_and_not_retried() {
        let parse = |body: serde_json::Value| {
            Event::parse("cl", body.to_string().as_bytes(), None, None).unwrap()
        };
        let none = Enricher::default();
        let wanted = Wanted::of(&[Enrich::Report], "slack", true);
        let alert = parse(
            json!({"id": "a", "type": "alert.triggered", "data": {"alert_type": "ssl_expiry"}}),
        );
        assert_eq!(
            none.enrich(&alert, wanted).await,
            Enriched::default(),
            "nothing to fetch"
        );
        let scan = parse(json!({"id": "s", "type": "scan.completed", "data": {"domain": "x"}}));
        let said = none.enrich(&scan, wanted).await;
        assert_eq!(
            said.missing.as_deref(),
            Some("the event names no scan job (data.job_id)")
        );
        assert!(!said.retry);
        let scan = parse(json!({"id": "s", "type": "scan.completed", "data": {"job_id": 7}}));
        let said = none.enrich(&scan, wanted).await;
        assert!(said.missing.unwrap().contains("has no API table"));
        assert!(!said.retry);
        let policy = parse(json!({"event": "policy.published", "data": {"job_id": 7}}));
        assert_eq!(none.enrich(&policy, wanted).await, Enriched::default());
    }

    #[test]
    fn a_reload_keeps_a_sources_client_while_its_settings_stay() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        let load = |base: &str| {
            let text = format!(
                "[sources.cl]\nsecret = \"whsec_x\"\napi = {{ key = {{ value = \"cl_x\" }}, base_url = \"{base}\" }}\n"
            );
            std::fs::write(&path, text).unwrap();
            crate::config::load(&path).unwrap()
        };
        let first = Enricher::build(&load("http://127.0.0.1:9/v1"), None).unwrap();
        let same = Enricher::build(&load("http://127.0.0.1:9/v1"), Some(&first)).unwrap();
        let (a, b) = (first.api("cl").unwrap(), same.api("cl").unwrap());
        assert!(Arc::ptr_eq(&a, &b), "unchanged: the same client");
        let moved = Enricher::build(&load("http://127.0.0.1:10/v1"), Some(&same)).unwrap();
        assert!(
            !Arc::ptr_eq(&b, &moved.api("cl").unwrap()),
            "changed: a new one"
        );
        assert!(moved.api("other").is_none());
    }

    #[test]
    fn an_email_carries_the_pdf_and_chat_gets_the_report_that_links_it() {
        let pdf = [Enrich::Pdf];
        assert_eq!(
            Wanted::of(&pdf, "email", false),
            Wanted {
                report: false,
                attach: true,
                required: false
            }
        );
        assert_eq!(
            Wanted::of(&pdf, "slack", true),
            Wanted {
                report: true,
                attach: false,
                required: true
            }
        );
        assert!(!Wanted::of(&[], "email", true).any());
        assert_eq!(file_safe("job/../x y"), "job____x_y");
    }
}
