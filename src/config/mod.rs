//! Configuration in three steps, as ripgrep does it: what the operator wrote ([`raw`]), a pure
//! validation that reports *every* problem with its key path, and the checked [`Config`] that the
//! rest of the daemon consumes.
//!
//! This module and [`crate::secret`] are the only places that read environment variables or
//! secret files, so a secret enters the process in one place and leaves it only as key bytes
//! inside a verifier or a sink's client.

pub mod admin;
pub mod api;
mod diagnose;
pub mod internal;
mod problems;
pub mod raw;
mod routing;
mod sources;
mod storage;

pub(crate) use storage::check_postgres_url;
use storage::validate_backend;
pub use storage::{Backend, PostgresConfig, StorageConfig};

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use diagnose::Broken;
use figment::Figment;
use figment::providers::{Env, Format, Toml};
use figment::value::{Dict, Value};
use ipnet::IpNet;
use serde::de::DeserializeOwned;

use crate::event::Event;
use crate::rules::RouteTable;
use crate::signature::Verifier;
use crate::sinks::SinkSpec;
use crate::templates::{Message, Templates};
use problems::Problems;
use raw::RawConfig;
pub use routing::SEED_EVENT_TYPES;
use routing::{RulesInput, validate_routing};

/// Prefix of the environment variables that override file settings, e.g.
/// `HOOKROUTE_SERVER__LISTEN=127.0.0.1:9000` for `server.listen`.
pub const ENV_PREFIX: &str = "HOOKROUTE_";

/// Paths the daemon serves itself, so no source may take them.
const RESERVED_PATHS: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub file: PathBuf,
    pub server: ServerConfig,
    /// `[log] format`: chosen before the configuration is loaded (see [`log_format`]); kept
    /// so that a reload can say a change waits for a restart.
    pub log: raw::LogFormat,
    pub storage: StorageConfig,
    pub metrics: MetricsConfig,
    pub sources: Vec<SourceConfig>,
    pub sinks: Vec<ConfiguredSink>,
    pub routing: Arc<Routing>,
    /// `[self]`: the events the daemon emits about itself.
    pub internal: internal::InternalConfig,
    /// `[admin]`: the status page's listener and users; `None` when it is off.
    pub admin: Option<admin::AdminConfig>,
}

impl Config {
    /// Everything worth a look that does not stop the daemon: the routing's warnings, and
    /// any source that still verifies with a secret shipped in `config.example.toml` (public,
    /// so anyone can sign deliveries for it).
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = self.routing.warnings.clone();
        for source in &self.sources {
            if source
                .verifier
                .key_texts()
                .any(|key| sources::EXAMPLE_SECRETS.contains(&key.as_str()))
            {
                warnings.push(format!(
                    "sources.{}: uses a secret from the shipped example, which anyone can read: \
                     anyone can sign deliveries it will accept. Set the secret the sender shows \
                     (secret_file, secret_credential or secret_env)",
                    source.name
                ));
            }
        }
        // Enrichment fetches from the API of the event's source: a route whose sources have
        // none would send every message without it.
        for route in self.routing.table.routes() {
            let enriches = !route.enrich.is_empty();
            let reachable = self.sources.iter().any(|source| {
                source.api.is_some()
                    && (route.sources.is_empty() || route.sources.contains(&source.name))
            });
            if enriches && !reachable {
                warnings.push(format!(
                    "route {:?} asks for enrichment, but no source it takes has an \
                     [sources.<name>.api] table: its messages go without",
                    route.name
                ));
            }
        }
        warnings
    }
}

/// Routes and the templates they render with; swapped whole on reload.
#[derive(Debug)]
pub struct Routing {
    pub table: RouteTable,
    pub templates: Templates,
    /// Template id for each sink that overrides the default.
    pub sink_templates: HashMap<String, String>,
    /// The time intervals routes are muted by, by name.
    pub windows: BTreeMap<String, crate::rules::windows::Window>,
    /// The file the routes came from.
    pub origin: PathBuf,
    /// Things worth a look that do not stop the daemon (e.g. event families with no route).
    pub warnings: Vec<String>,
}

impl Routing {
    /// The template for a message through `route` to the sink `sink` of type `kind`: the
    /// route's for that type, else the sink's own; `None` means the default for the event's
    /// family. The one place that decides, for the daemon and `route-test` alike.
    pub fn template_for(&self, route: &str, sink: &str, kind: &str) -> Option<&str> {
        self.route(route)
            .and_then(|r| r.templates.get(kind))
            .or_else(|| self.sink_templates.get(sink))
            .map(String::as_str)
    }

    /// The message for `event` through `route` to `sink` (of type `kind`), with `report`
    /// if enrichment fetched one.
    pub fn message(
        &self,
        (route, sink, kind): (&str, &str, &str),
        event: &Event,
        report: Option<&serde_json::Value>,
    ) -> Message {
        self.templates
            .render(self.template_for(route, sink, kind), event, report)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub max_body_bytes: usize,
    /// Peers whose `X-Forwarded-For` is believed; empty means nobody's.
    pub trusted_proxies: Vec<IpNet>,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub shutdown_timeout: Duration,
    /// `None` when rate limiting is switched off.
    pub rate_limit: Option<RateLimitConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimitConfig {
    pub per_second: NonZeroU32,
    pub burst: NonZeroU32,
    pub failed_per_minute: NonZeroU32,
    pub failed_burst: NonZeroU32,
    pub max_clients: usize,
}

/// `GET /metrics`: whether it is served, and to whom.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsConfig {
    pub enabled: bool,
    /// Who may scrape (the client address as for sources); empty means anyone.
    pub allowed_ips: Vec<IpNet>,
}

/// One webhook sender: where it posts and how its deliveries are verified.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    pub name: String,
    pub path: String,
    pub verifier: Verifier,
    pub allowed_ips: Vec<IpNet>,
    /// Oldest signed `created_at`/`timestamp` accepted when the signature itself has no timestamp.
    pub max_event_age: Option<Duration>,
    /// The sender's REST API, when configured (`[sources.<name>.api]`).
    pub api: Option<api::ApiConfig>,
}

#[derive(Debug, Clone)]
pub struct ConfiguredSink {
    pub name: String,
    pub spec: SinkSpec,
}

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {0} does not exist")]
    NotFound(PathBuf),
    #[error(
        "cannot read the config file {0}: permission denied; it is readable by the service's \
         group: run the command as the service user, e.g. `sudo -u hookroute hookroute …`"
    )]
    PermissionDenied(PathBuf),
    #[error("cannot read the config file {0}: {1}")]
    Unreadable(PathBuf, std::io::Error),
    /// Syntax, unknown keys, wrong types and values that do not make sense, each with its file,
    /// line, column and key path.
    /// The first [`problems::REPORTED`] problems are listed, and how many there are in all.
    #[error("{file}: {total} problem(s):\n  {}{}", .problems.join("\n  "), more(*.total, .problems.len()))]
    Invalid {
        file: PathBuf,
        problems: Vec<String>,
        total: usize,
    },
}

/// The line that ends a report listing `listed` of `total` problems.
fn more(total: usize, listed: usize) -> String {
    match total - listed {
        0 => String::new(),
        rest => format!("\n  … and {rest} more (fix these first)"),
    }
}

/// The log format `[log] format` (or `HOOKROUTE_LOG__FORMAT`) asks for, read on its own before
/// logging starts, so the rest of the configuration's problems are logged in that format. A
/// file that cannot be read or parsed gives the default; loading it properly reports why.
pub fn log_format(path: Option<&Path>) -> raw::LogFormat {
    #[derive(serde::Deserialize, Default)]
    struct OnlyLog {
        #[serde(default)]
        log: raw::RawLog,
    }
    let mut figment = Figment::new();
    if let Some(text) = path.and_then(|path| read_file(path).ok()) {
        figment = figment.merge(Toml::string(&text));
    }
    figment
        .merge(Env::prefixed(ENV_PREFIX).split("__").only(&["log.format"]))
        .extract::<OnlyLog>()
        .map(|only| only.log.format)
        .unwrap_or_default()
}

/// Reads, overrides and validates the configuration at `path`.
///
/// # Errors
/// [`ConfigError`] naming the file, the key and what is wrong with it.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    load_with(path, Secrets::Read)
}

/// As [`load`], for the operator's tools (`deliveries`, `replay`, `dead-letter`), which need
/// the storage and the routes but never a secret: a secret that cannot be read (an unset
/// `secret_env` in an incident shell) does not stop them. Sources get a key that is never used.
///
/// # Errors
/// As [`load`], secrets aside.
pub fn load_for_tools(path: &Path) -> Result<Config, ConfigError> {
    load_with(path, Secrets::Skip)
}

/// As [`load`], for `send` and `reconcile --dry-run`: only the secrets of the source they act
/// for are read, so they work on a host where the others are systemd credentials they cannot
/// see.
///
/// # Errors
/// As [`load`], the other secrets aside.
pub fn load_for_source(path: &Path, source: &str) -> Result<Config, ConfigError> {
    load_with(path, Secrets::Source(source))
}

/// Reads and validates the configuration, every problem in one report: when the file does not
/// deserialize, validation goes on with what could be read (see [`diagnose`]).
fn load_with(path: &Path, secrets: Secrets<'_>) -> Result<Config, ConfigError> {
    let mut problems = Problems::default();
    let config = parse(path, &mut problems)?
        .and_then(|(raw, broken)| validate(path, raw, &broken, secrets, &mut problems));
    problems.into_result(path)?;
    Ok(config.expect("a configuration without problems is valid"))
}

/// The most a configuration or rules file may hold: ten thousand routes fit in a tenth of it.
pub const MAX_FILE_BYTES: u64 = 4 << 20;

/// Reads a configuration or rules file: a regular file of at most [`MAX_FILE_BYTES`] (see
/// [`crate::private::read_regular`]; a FIFO once froze a reload).
fn read_file(path: &Path) -> std::io::Result<String> {
    crate::private::read_regular(path, MAX_FILE_BYTES)
}

/// Which of the secrets a configuration names validation reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Secrets<'a> {
    Read,
    Skip,
    /// Only this source's: `send` signs with it, and needs no other.
    Source(&'a str),
}

impl Secrets<'_> {
    /// Whether the source `name`'s secrets are read.
    fn for_source(self, name: &str) -> Secrets<'static> {
        match self {
            Self::Read => Secrets::Read,
            Self::Source(only) if only == name => Secrets::Read,
            Self::Skip | Self::Source(_) => Secrets::Skip,
        }
    }
}

/// Step 1: the TOML file, then `HOOKROUTE_*` environment overrides: what could be read of
/// them, with every problem recorded in `problems`; `None` when nothing could (a syntax
/// error). Errs only when the file cannot be read at all.
fn parse(path: &Path, problems: &mut Problems) -> Result<Option<(RawConfig, Broken)>, ConfigError> {
    let text = read_file(path).map_err(|err| match err.kind() {
        std::io::ErrorKind::NotFound => ConfigError::NotFound(path.to_path_buf()),
        std::io::ErrorKind::PermissionDenied => ConfigError::PermissionDenied(path.to_path_buf()),
        _ => ConfigError::Unreadable(path.to_path_buf(), err),
    })?;
    // Only nested keys (`SERVER__LISTEN`) are settings: the top level holds tables alone, and
    // this keeps variables such as `HOOKROUTE_CL_SECRET` (named by `secret_env`) from being
    // mistaken for unknown settings.
    let env = Env::prefixed(ENV_PREFIX)
        .filter(|key| key.as_str().contains("__"))
        .split("__");
    Ok(read_toml(None, &text, Some(env), problems))
}

/// Deserializes a TOML file's `text` (and `env` over it) as a `T`, recording every problem
/// with it in `problems`, its syntax errors included, and returns what could be read (see
/// [`diagnose`]). `file` is `None` for the configuration file, else the file the text came
/// from.
fn read_toml<T: DeserializeOwned>(
    file: Option<&Path>,
    text: &str,
    env: Option<Env>,
    problems: &mut Problems,
) -> Option<(T, Broken)> {
    if !problems::check_syntax(file, text, problems) {
        return None;
    }
    let mut figment = Figment::from(Toml::string(text));
    if let Some(env) = env {
        figment = figment.merge(env);
    }
    let err = match figment.extract::<T>() {
        Ok(value) => return Some((value, Broken::default())),
        Err(err) => err,
    };
    let before = problems.len();
    let repaired = figment
        .extract::<Dict>()
        .ok()
        .map(|root| diagnose::every_problem::<T>(file, &root, problems));
    if problems.len() == before {
        for err in err {
            problems.add_at(file, err.path.join("."), err.kind);
        }
        return None;
    }
    let (root, broken) = repaired?;
    let read = Value::from(root).deserialize::<T>().ok()?;
    Some((read, broken))
}

/// Step 2: check everything, collecting every problem rather than stopping at the first, and
/// none that a `broken` part of the file would cause. `None` when there were problems.
fn validate(
    path: &Path,
    mut raw: RawConfig,
    broken: &Broken,
    secrets: Secrets<'_>,
    problems: &mut Problems,
) -> Option<Config> {
    let start = problems.len();
    let log_format = raw.log.format;
    let server = validate_server(raw.server, problems);
    // Relative to the configuration file, so the tools find the daemon's database from any
    // working directory.
    let base = path.parent().unwrap_or(Path::new("."));
    let storage = StorageConfig {
        backend: validate_backend(&mut raw.storage, base, problems),
        dedupe_retention: raw.storage.dedupe_retention.0,
        event_retention: raw.storage.event_retention.0,
        busy_timeout: raw.storage.busy_timeout.0,
        max_batch: raw.storage.max_batch.max(1),
    };
    if storage.event_retention < storage.dedupe_retention {
        // A remembered delivery id must point at an event that still exists.
        problems.add(
            "storage.event_retention",
            "must be at least storage.dedupe_retention",
        );
    }

    let metrics = MetricsConfig {
        enabled: raw.metrics.enabled,
        allowed_ips: parse_networks("metrics.allowed_ips", &raw.metrics.allowed_ips, problems),
    };

    if raw.sources.is_empty() && broken.sources.is_empty() {
        problems.add(
            "sources",
            "no sources are configured; add a [sources.<name>] table",
        );
    }
    // Every source the file names, valid or not, for the routes' references.
    let source_names: Vec<String> = raw
        .sources
        .keys()
        .chain(&broken.sources)
        .cloned()
        .chain([crate::notice::SOURCE.to_owned()])
        .collect();
    let mut sources = Vec::new();
    for (name, source) in raw.sources {
        if name == crate::notice::SOURCE {
            problems.add(
                format!("sources.{name}"),
                "is the source of hookroute's own events; name this source otherwise",
            );
        }
        let read = secrets.for_source(&name);
        if let Some(source) = sources::validate_source(&name, source, base, read, problems) {
            sources.push(source);
        }
    }
    for (i, source) in sources.iter().enumerate() {
        if let Some(other) = sources[..i].iter().find(|s| s.path == source.path) {
            problems.add(
                format!("sources.{}.path", source.name),
                format!(
                    "{:?} is already the path of source {:?}",
                    source.path, other.name
                ),
            );
        }
    }

    let mut sinks = Vec::new();
    for (name, mut spec) in raw.sinks {
        let mut found = spec.validate();
        // After the checks of what was written (an empty path stays an error), before
        // anything reads a file.
        spec.relative_to(base);
        if secrets == Secrets::Read {
            found.extend(spec.read_secrets());
        }
        for problem in found {
            match problem.split_once(": ") {
                Some((key, message)) => problems.add(format!("sinks.{name}.{key}"), message),
                None => problems.add(format!("sinks.{name}"), problem),
            }
        }
        sinks.push(ConfiguredSink { name, spec });
    }
    let rules = RulesInput {
        file: raw.rules_file,
        routes: raw.routes,
        templates: raw.templates,
        time_intervals: raw.time_intervals,
        vars: raw.template_vars,
    };
    let names = routing::Names {
        sources: &source_names,
        broken,
    };
    let routing = validate_routing(path, rules, &names, &sinks, problems);
    let internal = internal::validate(raw.internal, problems);
    let public = server.as_ref().map(|server| server.listen);
    let read = secrets == Secrets::Read;
    let admin = admin::validate(raw.admin, base, read, public, problems);

    if problems.len() > start {
        return None;
    }
    Some(Config {
        file: path.to_path_buf(),
        server: server?,
        log: log_format,
        storage,
        metrics,
        sources,
        sinks,
        routing: Arc::new(routing),
        internal,
        admin,
    })
}

fn validate_server(raw: raw::RawServer, problems: &mut Problems) -> Option<ServerConfig> {
    let listen = raw
        .listen
        .parse::<SocketAddr>()
        .map_err(|_| {
            problems.add(
                "server.listen",
                format!(
                    "{:?} is not an address like \"127.0.0.1:8080\" or \"[::1]:8080\"",
                    raw.listen
                ),
            )
        })
        .ok();
    let trusted_proxies = parse_networks("server.trusted_proxies", &raw.trusted_proxies, problems);
    if raw.max_body_bytes == 0 {
        problems.add("server.max_body_bytes", "must be greater than 0");
    }
    let limit = raw.rate_limit;
    let rate_limit = if limit.enabled {
        let mut positive = |key: &str, value: u32| {
            NonZeroU32::new(value)
                .ok_or_else(|| {
                    problems.add(format!("server.rate_limit.{key}"), "must be greater than 0")
                })
                .ok()
        };
        let per_second = positive("per_second", limit.per_second);
        let burst = positive("burst", limit.burst);
        let failed_per_minute = positive("failed_per_minute", limit.failed_per_minute);
        let failed_burst = positive("failed_burst", limit.failed_burst);
        match (per_second, burst, failed_per_minute, failed_burst) {
            (Some(per_second), Some(burst), Some(failed_per_minute), Some(failed_burst)) => {
                Some(RateLimitConfig {
                    per_second,
                    burst,
                    failed_per_minute,
                    failed_burst,
                    max_clients: limit.max_clients.max(1),
                })
            }
            _ => None,
        }
    } else {
        None
    };
    Some(ServerConfig {
        listen: listen?,
        max_body_bytes: raw.max_body_bytes,
        trusted_proxies,
        header_read_timeout: raw.header_read_timeout.0,
        body_read_timeout: raw.body_read_timeout.0,
        shutdown_timeout: raw.shutdown_timeout.0,
        rate_limit,
    })
}
/// `; did you mean "…"?` naming the configured name closest to a misspelt `name`, if one is
/// close enough to be what was meant.
fn did_you_mean<'a>(name: &str, configured: impl Iterator<Item = &'a str>) -> String {
    configured
        .map(|candidate| (strsim::jaro_winkler(name, candidate), candidate))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, candidate)| format!("; did you mean {candidate:?}?"))
        .unwrap_or_default()
}

/// Parses CIDRs, accepting a bare address as a single-host network.
fn parse_networks(key: &str, texts: &[String], problems: &mut Problems) -> Vec<IpNet> {
    texts
        .iter()
        .enumerate()
        .filter_map(|(i, text)| {
            let parsed = text
                .parse::<IpNet>()
                .or_else(|_| text.parse::<IpAddr>().map(IpNet::from));
            parsed
                .map_err(|_| {
                    problems.add(
                        format!("{key}[{i}]"),
                        format!("{text:?} is not an IP address or CIDR"),
                    )
                })
                .ok()
        })
        .collect()
}

#[cfg(test)]
mod tests;
