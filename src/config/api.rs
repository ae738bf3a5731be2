//! `[sources.<name>.api]`: a ComplianceLayer source's REST API (`Authorization: Bearer cl_…`),
//! for reconciling what its webhooks may have missed and enriching messages with a scan's
//! report. Off unless given. The key is a secret: read from a file, the environment or a
//! systemd credential, never logged.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use super::Problems;
use crate::duration::HumanDuration;
use crate::secret::SecretSource;

/// The API's address, from its public reference.
pub const DEFAULT_BASE_URL: &str = "https://api.compliancelayer.net/v1";
/// How far back a reconcile pass compares the sender's scans with the stored events.
const DEFAULT_LOOKBACK: Duration = Duration::from_secs(24 * 3600);
/// How long one request to the API may take.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a message waits for its enrichment before it is sent without.
const DEFAULT_ENRICH_WAIT: Duration = Duration::from_secs(10);
/// The largest PDF report attached to an email: mail relays commonly refuse much more.
const DEFAULT_PDF_MAX_BYTES: usize = 10 << 20;
/// The shortest reconcile interval: the API lists at most 100 scans, and is rate limited.
const MIN_INTERVAL: Duration = Duration::from_secs(60);

/// `[sources.<name>.api]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawApi {
    pub key: SecretSource,
    pub base_url: Option<String>,
    /// How often to reconcile; off when absent.
    pub reconcile: Option<HumanDuration>,
    pub lookback: Option<HumanDuration>,
    pub timeout: Option<HumanDuration>,
    /// How long a message waits for its enrichment (the report, the PDF).
    pub enrich_wait: Option<HumanDuration>,
    /// The largest PDF report attached to an email.
    pub pdf_max_bytes: Option<usize>,
}

/// `[sources.<name>.api]`, checked.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiConfig {
    pub base_url: url::Url,
    /// `None` when the configuration was read without its secrets (the tools).
    pub key: Option<String>,
    pub reconcile: Option<Duration>,
    pub lookback: Duration,
    pub timeout: Duration,
    pub enrich_wait: Duration,
    pub pdf_max_bytes: usize,
}

impl std::fmt::Debug for ApiConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiConfig")
            .field("base_url", &self.base_url.as_str())
            .field("reconcile", &self.reconcile)
            .field("lookback", &self.lookback)
            .field("timeout", &self.timeout)
            .field("enrich_wait", &self.enrich_wait)
            .field("pdf_max_bytes", &self.pdf_max_bytes)
            .finish_non_exhaustive()
    }
}

/// Checks source `source`'s `api` table; reads the key when `read`.
pub(super) fn validate(
    source: &str,
    raw: Option<RawApi>,
    base: &Path,
    read: bool,
    problems: &mut Problems,
) -> Option<ApiConfig> {
    let mut raw = raw?;
    let at = |field: &str| format!("sources.{source}.api.{field}");
    let base_url = raw.base_url.as_deref().unwrap_or(DEFAULT_BASE_URL);
    let base_url = match url::Url::parse(base_url) {
        Ok(url) if matches!(url.scheme(), "https" | "http") && url.host().is_some() => url,
        _ => {
            problems.add(
                at("base_url"),
                format!("{base_url:?} is not an http(s) address like {DEFAULT_BASE_URL:?}"),
            );
            return None;
        }
    };
    let reconcile = raw.reconcile.map(|every| every.0);
    if reconcile.is_some_and(|every| every < MIN_INTERVAL) {
        problems.add(
            at("reconcile"),
            "at least 1m: each pass reads the sender's scan history, and the API is rate limited",
        );
    }
    let enrich_wait = raw.enrich_wait.map_or(DEFAULT_ENRICH_WAIT, |wait| wait.0);
    if enrich_wait.is_zero() || enrich_wait > Duration::from_secs(60) {
        problems.add(
            at("enrich_wait"),
            "between 1ms and 1m: how long a message waits for its enrichment before it is sent without",
        );
    }
    let key_at = at("key");
    if let Err(problem) = raw.key.validate(&key_at) {
        problems.add(&key_at, problem.trim_start_matches(&format!("{key_at}: ")));
        return None;
    }
    raw.key.relative_to(base);
    let key = if read {
        match raw.key.resolve(&key_at) {
            Ok(key) if key.trim().is_empty() => {
                problems.add(&key_at, "is empty");
                None
            }
            Ok(key) => Some(key.trim().to_owned()),
            Err(problem) => {
                problems.add(&key_at, problem.trim_start_matches(&format!("{key_at}: ")));
                None
            }
        }
    } else {
        None
    };
    Some(ApiConfig {
        base_url,
        key,
        reconcile,
        lookback: raw.lookback.map_or(DEFAULT_LOOKBACK, |lookback| lookback.0),
        timeout: raw.timeout.map_or(DEFAULT_TIMEOUT, |timeout| timeout.0),
        enrich_wait,
        pdf_max_bytes: raw.pdf_max_bytes.unwrap_or(DEFAULT_PDF_MAX_BYTES),
    })
}
