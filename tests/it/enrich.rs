//! Enrichment (#29): a failing scan's messages carry what the sender's API knows of it, the
//! top findings with their remediation in Slack (a loopback receiver) and email (a real SMTP
//! server), the PDF report attached to the email; the API down, the messages go out without
//! it and the record says why, unless the route requires it.

use std::time::Duration;

use base64::Engine as _;
use serde_json::json;

use crate::email::Smtp;
use crate::harness::*;
use crate::reconcile::{API_KEY, FakeApi};
use crate::recorder::Recorder;

/// A small PDF, as the API would send one.
const PDF: &[u8] =
    b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n";

/// The report of job 67890, in the reference's words: findings with severity and
/// remediation, module results.
fn report() -> serde_json::Value {
    json!({
        "domain": "legacy-portal.example", "score": 38, "grade": "F", "risk_level": "critical",
        "issues": [
            {"severity": "medium", "finding": "HSTS header missing", "remediation": "Send Strict-Transport-Security", "module": "headers"},
            {"severity": "critical", "finding": "Telnet open on port 23", "remediation": "Close port 23 at the firewall", "module": "ports"},
            {"severity": "low", "finding": "No DMARC reporting address", "module": "dns"}
        ],
        "modules": {
            "ssl": {"score": 20, "grade": "F", "findings": [
                {"severity": "high", "finding": "Certificate expires in 3 days", "remediation": "Renew the certificate"}
            ]},
            "ports": {"score": 10, "grade": "F"}
        },
        "report_url": "https://app.compliancelayer.net/reports/cl_rpt_67890"
    })
}

/// The configuration: source `cl` with the API at `api`, a Slack sink at `slack`, and
/// `more` (sinks and routes).
fn enriching(dir: &std::path::Path, api: &str, slack: &str, more: &str) -> String {
    std::fs::write(dir.join("api.key"), API_KEY).unwrap();
    let rest = format!(
        r#"
[sources.cl]
scheme = "compliancelayer"
secret = "{CL_SECRET}"
api = {{ key = {{ file = "api.key" }}, base_url = "{api}", enrich_wait = "2s" }}

[sinks.slack]
type = "slack"
webhook_url = {{ value = "{slack}" }}
delivery = {{ retry = {{ base = "1h" }} }}

{more}
"#
    );
    config(dir, NO_LIMITS, &rest)
}

/// The fake API, with job 67890's report.
async fn api_with_report() -> (std::sync::Arc<FakeApi>, String) {
    let (fake, api) = FakeApi::start().await;
    fake.reports
        .lock()
        .unwrap()
        .insert("67890".into(), report());
    (fake, api)
}

/// Scans to the Slack sink, enriched with their report.
const FAILING_TO_SLACK: &str = "[[routes]]\nname = \"failing\"\nevents = [\"scan.completed\"]\nsinks = [\"slack\"]\nenrich = [\"report\"]\n";

/// A failing scan of job 67890, as its webhook says it.
fn failing_scan() -> Vec<u8> {
    json!({
        "id": "550e8400-e29b-41d4-a716-446655440777", "type": "scan.completed",
        "created_at": jiff::Timestamp::now().to_string(),
        "data": {"scan_id": 12345, "job_id": 67890, "domain": "legacy-portal.example",
                 "score": 38, "grade": "F", "issues_count": 4, "critical_issues": 1, "high_issues": 1}
    })
    .to_string()
    .into_bytes()
}

on_both_backends!(a_failing_scans_messages_carry_its_top_findings_and_the_pdf);
/// Slack and email get the two critical and high findings, most severe first, each with its
/// remediation, and the report's address; the email carries the PDF. One scan, two sinks:
/// the API is asked for its report and its PDF once each.
async fn a_failing_scans_messages_carry_its_top_findings_and_the_pdf() {
    let dir = tempdir();
    let (fake, api) = api_with_report().await;
    fake.pdfs
        .lock()
        .unwrap()
        .insert("67890".into(), PDF.to_vec());
    let slack = Recorder::start().await;
    let smtp = Smtp::start(dir.path(), "plain", "plain", None, None);
    let more = format!(
        r#"
[sinks.mail]
type = "email"
url = "smtp://127.0.0.1:{}"
starttls = "never"
from = "hookroute@example.com"
to = ["oncall@example.com"]
enrich = ["pdf"]

[[routes]]
name = "failing"
events = ["scan.completed"]
when = 'data.grade == "F"'
sinks = ["slack", "mail"]
enrich = ["report"]
"#,
        smtp.port
    );
    let daemon = Daemon::start(
        dir.path(),
        &enriching(dir.path(), &api, &slack.url("/hook"), &more),
    );
    daemon.accept_cl(&failing_scan()).await;

    let mail = &smtp.messages(1).await[0];
    let slack_said = eventually(|| {
        slack
            .requests()
            .first()
            .map(|request| request.json().to_string())
            .ok_or("no Slack message yet".to_owned())
    })
    .await;
    let top = [
        "Top findings (2 of 4):",
        "- [CRITICAL] Telnet open on port 23 (ports)",
        "  Fix: Close port 23 at the firewall",
        "- [HIGH] Certificate expires in 3 days (ssl)",
        "  Fix: Renew the certificate",
        "Full report: https://app.compliancelayer.net/reports/cl_rpt_67890",
    ];
    let text = mail["text"].as_str().unwrap().replace("\r\n", "\n");
    assert!(text.contains(&top.join("\n")), "{text}");
    for line in top {
        assert!(slack_said.contains(line), "{line} not in {slack_said}");
    }
    assert!(!text.contains("HSTS"), "only critical and high are listed");

    let attachments = mail["attachments"].as_array().unwrap();
    assert_eq!(attachments.len(), 1, "{mail}");
    assert_eq!(
        attachments[0]["filename"],
        "compliancelayer-report-67890.pdf"
    );
    assert_eq!(attachments[0]["content_type"], "application/pdf");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(attachments[0]["base64"].as_str().unwrap())
        .unwrap();
    assert_eq!(bytes, PDF);

    let asked = fake.asked.lock().unwrap().clone();
    assert_eq!(
        asked
            .iter()
            .filter(|p| *p == "scan/jobs/67890/report")
            .count(),
        1,
        "{asked:?}"
    );
    assert_eq!(
        asked
            .iter()
            .filter(|p| *p == "compliance/reports/67890/pdf")
            .count(),
        1,
        "{asked:?}"
    );
    wait_jobs(&daemon, "succeeded", 2).await;
    for (_, job) in daemon.all_jobs() {
        let said = job.history[0].response.clone().unwrap_or_default();
        assert!(!said.contains("not enriched"), "{said}");
    }
    daemon.terminate();
}

on_both_backends!(the_api_down_the_message_goes_without_and_says_why);
/// The API cannot be reached: the Slack message goes out without the findings and its record
/// says "not enriched: …"; a route that requires the enrichment fails its attempt instead,
/// sends nothing, and keeps its job for a retry.
async fn the_api_down_the_message_goes_without_and_says_why() {
    let dir = tempdir();
    // Nothing listens there: refused at once.
    let api = "http://127.0.0.1:1/v1";
    let slack = Recorder::start().await;
    let more = format!(
        r#"
[sinks.strict]
type = "slack"
webhook_url = {{ value = "{}" }}
delivery = {{ retry = {{ base = "1h" }} }}

[[routes]]
name = "failing"
events = ["scan.completed"]
sinks = ["slack"]
enrich = ["report"]
continue = true

[[routes]]
name = "must-know-why"
events = ["scan.completed"]
sinks = ["strict"]
enrich = ["report"]
enrich_required = true
"#,
        slack.url("/strict")
    );
    let daemon = Daemon::start(
        dir.path(),
        &enriching(dir.path(), api, &slack.url("/hook"), &more),
    );
    daemon.accept_cl(&failing_scan()).await;
    wait_jobs(&daemon, "succeeded", 1).await;
    wait_jobs(&daemon, "failed", 1).await;

    let requests = slack.requests();
    assert_eq!(requests.len(), 1, "the strict sink got nothing");
    assert_eq!(requests[0].path, "/hook");
    let said = requests[0].json().to_string();
    assert!(said.contains("legacy-portal.example graded F"), "{said}");
    assert!(!said.contains("Top findings"), "{said}");

    let sent = daemon.job_of("slack");
    let note = sent.history[0].response.clone().unwrap_or_default();
    assert!(
        note.contains("not enriched: report: cannot reach the API"),
        "{note}"
    );
    let held = daemon.job_of("strict");
    assert_eq!(held.status.as_str(), "failed");
    assert_eq!(held.history.len(), 1);
    let error = held.last_error.clone().unwrap_or_default();
    assert!(
        error.starts_with("not enriched: report: cannot reach the API"),
        "{error}"
    );
    assert!(held.next_attempt_at.is_some(), "retried with the job");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(slack.requests().len(), 1);
    daemon.terminate();
}

/// The API answers, but slower than `enrich_wait`: the message does not wait for it longer
/// than that, and its record says how long it waited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_api_delays_a_message_no_longer_than_the_wait() {
    let dir = tempdir();
    let (fake, api) = api_with_report().await;
    *fake.delay.lock().unwrap() = Duration::from_secs(6);
    let slack = Recorder::start().await;
    let daemon = Daemon::start(
        dir.path(),
        &enriching(dir.path(), &api, &slack.url("/hook"), FAILING_TO_SLACK),
    );
    let sent = std::time::Instant::now();
    daemon.accept_cl(&failing_scan()).await;
    wait_jobs(&daemon, "succeeded", 1).await;
    let took = sent.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(5),
        "{took:?}"
    );
    let said = slack.requests()[0].json().to_string();
    assert!(!said.contains("Top findings"), "{said}");
    let note = daemon.only_job().history[0]
        .response
        .clone()
        .unwrap_or_default();
    assert!(
        note.contains("not enriched: report: the API did not answer within 2s"),
        "{note}"
    );
    daemon.terminate();
}

/// One client per source for enrichment and reconciling: a 429 that a report's fetch met
/// keeps a reconcile pass asked for meanwhile from asking the API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_met_by_enrichment_quiets_reconciling_too() {
    let dir = tempdir();
    let (fake, api) = api_with_report().await;
    let slack = Recorder::start().await;
    let text = enriching(dir.path(), &api, &slack.url("/hook"), FAILING_TO_SLACK).replace(
        "enrich_wait = \"2s\" }",
        "enrich_wait = \"2s\", reconcile = \"1h\" }",
    );
    let daemon = InProcess::start(dir.path(), &text).await;
    ready(&daemon).await;
    let _ticking = Ticking::start(&daemon.clock, Duration::from_millis(20));
    eventually(|| {
        let asked = fake.requests();
        (asked == 2)
            .then_some(())
            .ok_or(format!("{asked} requests"))
    })
    .await;

    fake.canned
        .lock()
        .unwrap()
        .push_back((429, vec![("retry-after", "3600".to_owned())]));
    daemon.accept_cl(&failing_scan()).await;
    wait_jobs(&daemon, "succeeded", 1).await;
    let note = daemon.only_job().history[0]
        .response
        .clone()
        .unwrap_or_default();
    assert!(
        note.contains("not enriched: report: rate limited by the API: retry in 1h"),
        "{note}"
    );
    assert_eq!(fake.requests(), 3);

    let config = dir.path().join("config.toml");
    let (code, said) = crate::reconcile::cli(&["reconcile", "--once"], &config).await;
    assert_eq!(code, Some(1), "{said}");
    assert!(said.contains("rate_limited"), "{said}");
    assert_eq!(fake.requests(), 3, "{:?}", fake.asked.lock().unwrap());
    daemon.stop().await;
}
