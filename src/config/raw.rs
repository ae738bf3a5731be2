//! What the operator wrote: a serde mirror of the TOML file (after `HOOKROUTE_*` overrides).
//!
//! Every struct denies unknown keys so a typo is an error, not a silently ignored setting.
//! The defaults of the daemon's own tables live here and only here, including those that
//! depend on another setting (a source's path, its scheme's tolerance and header); each
//! sink's live with its configuration struct in `sinks`, its delivery options' in
//! `sinks::options`. `config::validate` turns this into the checked [`Config`].
//!
//! [`Config`]: super::Config

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::duration::HumanDuration;
use crate::rules::RouteSpec;
use crate::rules::windows::WindowSpec;
use crate::secret::SecretSource;
use crate::signature::Encoding;
use crate::sinks::SinkSpec;
use crate::templates::TemplateSource;

/// A source's timestamp tolerance where its scheme signs one, as Stripe and Standard Webhooks
/// recommend.
pub const DEFAULT_TOLERANCE: Duration = Duration::from_secs(300);
/// The header of the `token` scheme.
pub const DEFAULT_TOKEN_HEADER: &str = "X-Webhook-Token";

/// The path of source `name`.
pub fn default_path(name: &str) -> String {
    format!("/hooks/{name}")
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub storage: RawStorage,
    #[serde(default)]
    pub metrics: RawMetrics,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub sources: BTreeMap<String, RawSource>,
    #[serde(default)]
    pub sinks: BTreeMap<String, SinkSpec>,
    /// Routes and templates in a file of their own (relative to this file), so they can be
    /// edited and reloaded apart from the rest.
    pub rules_file: Option<PathBuf>,
    #[serde(default)]
    pub routes: Vec<RouteSpec>,
    #[serde(default)]
    pub templates: BTreeMap<String, TemplateSource>,
    /// Recurring windows routes name in `mute_during` and `active_during`.
    #[serde(default)]
    pub time_intervals: BTreeMap<String, WindowSpec>,
    /// Strings every template sees as `vars.<name>`, e.g. `scan_url`.
    #[serde(default)]
    pub template_vars: BTreeMap<String, String>,
    /// The daemon's events about itself.
    #[serde(default, rename = "self")]
    pub internal: super::internal::RawSelf,
    /// The status page's own listener and users.
    pub admin: Option<super::admin::RawAdmin>,
}

/// `[metrics]`: `GET /metrics` on the main listener.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawMetrics {
    pub enabled: bool,
    /// CIDRs (or bare addresses) that may scrape; empty: anyone who reaches the listener.
    pub allowed_ips: Vec<String>,
}

impl Default for RawMetrics {
    fn default() -> Self {
        Self {
            enabled: true,
            allowed_ips: Vec::new(),
        }
    }
}

/// `[log]`: how log lines are written (read before the rest, see `config::log_format`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLog {
    pub format: LogFormat,
}

/// A log line's shape.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// `key=value` text, for people and the journal.
    #[default]
    Text,
    /// One JSON object per line, for Vector, Loki and the like.
    Json,
}

/// The rules file named by `rules_file`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRules {
    #[serde(default)]
    pub routes: Vec<RouteSpec>,
    #[serde(default)]
    pub templates: BTreeMap<String, TemplateSource>,
    #[serde(default)]
    pub time_intervals: BTreeMap<String, WindowSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawServer {
    pub listen: String,
    pub max_body_bytes: usize,
    pub trusted_proxies: Vec<String>,
    pub header_read_timeout: HumanDuration,
    pub body_read_timeout: HumanDuration,
    pub shutdown_timeout: HumanDuration,
    pub rate_limit: RawRateLimit,
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            max_body_bytes: 1024 * 1024,
            trusted_proxies: Vec::new(),
            header_read_timeout: HumanDuration(Duration::from_secs(10)),
            body_read_timeout: HumanDuration(Duration::from_secs(20)),
            shutdown_timeout: HumanDuration(Duration::from_secs(25)),
            rate_limit: RawRateLimit::default(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRateLimit {
    pub enabled: bool,
    pub per_second: u32,
    pub burst: u32,
    pub failed_per_minute: u32,
    pub failed_burst: u32,
    pub max_clients: usize,
}

impl Default for RawRateLimit {
    fn default() -> Self {
        Self {
            enabled: true,
            per_second: 50,
            burst: 200,
            failed_per_minute: 10,
            failed_burst: 5,
            max_clients: 100_000,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawStorage {
    /// SQLite (the default: `./data/hookroute.db` when neither this nor `url` is given).
    pub path: Option<PathBuf>,
    /// PostgreSQL, for several daemons on one database.
    pub url: Option<String>,
    /// PostgreSQL's password: never in the URL, which appears in logs and errors.
    pub password: Option<SecretSource>,
    /// PostgreSQL connections per daemon.
    pub pool_size: u32,
    /// PostgreSQL: how long a replica may be silent before the jobs it holds are anyone's.
    pub lease: HumanDuration,
    pub dedupe_retention: HumanDuration,
    pub event_retention: HumanDuration,
    pub busy_timeout: HumanDuration,
    pub max_batch: usize,
}

/// Where the database is when the configuration names none.
pub const DEFAULT_DATABASE: &str = "./data/hookroute.db";

impl Default for RawStorage {
    fn default() -> Self {
        Self {
            path: None,
            url: None,
            password: None,
            pool_size: 16,
            lease: HumanDuration(Duration::from_secs(10)),
            dedupe_retention: HumanDuration(Duration::from_secs(7 * 24 * 3600)),
            event_retention: HumanDuration(Duration::from_secs(90 * 24 * 3600)),
            busy_timeout: HumanDuration(Duration::from_secs(5)),
            max_batch: 512,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSource {
    pub scheme: Option<SchemeName>,
    pub path: Option<String>,
    pub secret: Option<OneOrMany>,
    pub secret_file: Option<OneOrMany>,
    pub secret_env: Option<OneOrMany>,
    /// systemd credentials (`LoadCredential=`), read from `$CREDENTIALS_DIRECTORY`.
    pub secret_credential: Option<OneOrMany>,
    pub secret_encoding: Option<SecretEncoding>,
    pub tolerance: Option<HumanDuration>,
    pub require_timestamp: Option<bool>,
    pub max_event_age: Option<HumanDuration>,
    pub header: Option<String>,
    pub prefix: Option<String>,
    pub encoding: Option<Encoding>,
    #[serde(default)]
    pub allowed_ips: Vec<String>,
    /// The sender's REST API (ComplianceLayer's): reconcile and enrich.
    pub api: Option<super::api::RawApi>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SchemeName {
    Compliancelayer,
    StandardWebhooks,
    Github,
    HmacSha256,
    Token,
}

impl fmt::Display for SchemeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Compliancelayer => "compliancelayer",
            Self::StandardWebhooks => "standard-webhooks",
            Self::Github => "github",
            Self::HmacSha256 => "hmac-sha256",
            Self::Token => "token",
        })
    }
}

/// How a secret string becomes HMAC key bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SecretEncoding {
    /// The secret's UTF-8 bytes, `whsec_` prefix included (Stripe's convention).
    Utf8,
    /// The base64-decoded part after `whsec_` (Standard Webhooks' convention).
    Base64,
}

/// `secret = "a"` or `secret = ["a", "b"]`: rotation needs several at once.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn as_slice(&self) -> &[String] {
        match self {
            Self::One(one) => std::slice::from_ref(one),
            Self::Many(many) => many,
        }
    }
}
