//! Where events go. Every sink has the same shape (Vector's): a config struct that denies
//! unknown keys, a `validate` that reports every problem, a `build` that creates clients, and
//! the running sink behind the [`Sink`] trait. What a sink can do is described once, by its
//! configuration's [`SinkConfig`] implementation.
//!
//! Adding a sink, all of it:
//! 1. a new file `src/sinks/<type>.rs`, holding the configuration struct
//!    (`#[serde(deny_unknown_fields)]`, with a `delivery: DeliveryOptions` field), its
//!    [`SinkConfig`] implementation (overriding the defaults only where the sink differs: a
//!    template, batches, digests, no rendered message), and the running sink implementing
//!    [`Sink`];
//! 2. one line in the `sinks!` list below: its module, variant, configuration struct and
//!    `type`. The module, [`SinkSpec`], [`SinkSpec::TYPES`], the parser and the dispatch come
//!    from that line.
//!
//! Nothing else matches on the kinds of sink: routing, the engine, `check-config` and
//! `route-test` ask [`SinkConfig`].
//!
//! Sinks never see HTTP requests or the database: they get a [`Delivery`] and say how it went.
//! Whether a failure is worth a retry is the sink's [`SinkError`] variant; what to do about it
//! is decided in one place, `delivery::retry`.

mod options;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
pub(crate) use http::{describe, parse_retry_after};
pub use options::{DeliveryOptions, RetryPolicy};
use serde::de::Error as _;
use serde::{Deserialize, Deserializer};

use crate::event::Event;
use crate::templates::{Message, TemplateRef};

/// One event on its way to one sink through one route.
#[derive(Debug, Clone, Copy)]
pub struct Delivery<'a> {
    /// The job this delivery is, and its stored event's id: for log lines and records.
    pub job_id: i64,
    pub event_id: i64,
    pub event: &'a Event,
    pub route: &'a str,
    /// When the job was queued: when the event was received, unless replayed.
    pub queued_at: jiff::Timestamp,
    /// Rendered from the route's, the sink's or the default template; empty for sinks that
    /// show no message ([`SinkSpec::shows_message`]).
    pub message: &'a Message,
    /// Files the enrichment fetched for the message (the PDF report): an email attaches them.
    pub attachments: &'a [Attachment],
}

/// A file to send with a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub filename: String,
    pub content_type: &'static str,
    pub bytes: std::sync::Arc<[u8]>,
}

impl Delivery<'_> {
    /// What places the message for the person reading it, whatever its template said.
    pub fn context(&self) -> Context<'_> {
        let (at, said) = match self.event.occurred_at {
            Some(at) => (at, ""),
            None => (self.queued_at, " (received)"),
        };
        Context {
            event_type: &self.event.event_type,
            source: &self.event.source,
            at: format!("{}{said}", at.strftime("%Y-%m-%d %H:%M:%S UTC")),
            route: self.route,
            delivery_id: crate::text::short_id(&self.event.delivery_id),
            link: self.message.link_beside(),
        }
    }
}

/// The same few facts under every human message, Slack's context line and an email's footer
/// alike: what happened, where it came from, when, the route that sent it, the delivery id to
/// look it up by (`hookroute deliveries list`), and a page about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Context<'a> {
    pub event_type: &'a str,
    pub source: &'a str,
    /// When it happened, as the sender says, else when it was received; UTC, to the second.
    pub at: String,
    pub route: &'a str,
    /// A hash-like id cut short (see `text::short_id`).
    pub delivery_id: std::borrow::Cow<'a, str>,
    /// A page about it (`Message::link`), unless the message shows it already.
    pub link: Option<&'a str>,
}

/// A destination for events.
#[async_trait]
pub trait Sink: Send + Sync {
    /// Delivers one event; returns a short summary of the sink's answer for the job record.
    ///
    /// # Errors
    /// [`SinkError`] saying why the event did not arrive and whether trying again may help.
    async fn deliver(&self, delivery: &Delivery<'_>) -> Result<String, SinkError>;

    /// Delivers several events as one: a route's group, a digest, or (the file sink) a batch.
    /// `summary` is the message for them all (the grouped template's), empty for a batch of
    /// unrelated events. Every sink but the file sink sends one message, request or run.
    ///
    /// # Errors
    /// As [`Sink::deliver`]; the outcome applies to every event.
    async fn deliver_batch(
        &self,
        deliveries: &[Delivery<'_>],
        summary: &Message,
    ) -> Result<String, SinkError> {
        let _ = summary;
        let mut last = String::new();
        for delivery in deliveries {
            last = self.deliver(delivery).await?;
        }
        Ok(last)
    }
}

/// Why a delivery failed, classified once, where the sink knows best.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SinkError {
    /// Worth another try: the network, a 5xx, a timeout, a non-zero exit.
    #[error("{message}")]
    Transient { message: String, response: String },
    /// Trying again cannot help: a 4xx, an address the server refuses.
    #[error("{message}")]
    Permanent { message: String, response: String },
    /// The sink asked us to wait this long.
    #[error("{message}")]
    RateLimited {
        retry_after: Duration,
        message: String,
        response: String,
    },
}

impl SinkError {
    pub fn transient(message: impl Into<String>) -> Self {
        Self::Transient {
            message: message.into(),
            response: String::new(),
        }
    }

    pub fn permanent(message: impl Into<String>) -> Self {
        Self::Permanent {
            message: message.into(),
            response: String::new(),
        }
    }

    /// The same failure with its message and the sink's answer passed through `map`
    /// (redaction, say).
    #[must_use]
    pub fn map_text(self, map: impl Fn(&str) -> String) -> Self {
        match self {
            Self::Transient { message, response } => Self::Transient {
                message: map(&message),
                response: map(&response),
            },
            Self::Permanent { message, response } => Self::Permanent {
                message: map(&message),
                response: map(&response),
            },
            Self::RateLimited {
                retry_after,
                message,
                response,
            } => Self::RateLimited {
                retry_after,
                message: map(&message),
                response: map(&response),
            },
        }
    }

    /// What the sink answered, if anything.
    pub fn response(&self) -> &str {
        match self {
            Self::Transient { response, .. }
            | Self::Permanent { response, .. }
            | Self::RateLimited { response, .. } => response,
        }
    }
}

/// Makes ring the process's TLS provider, once: reqwest and lettre are built without a
/// default one, and every client (sinks, `hookroute send`) must find it installed.
pub fn install_tls_provider() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// The most of a sink's answer kept in a job record.
pub const RESPONSE_LIMIT: usize = 2048;

/// Cuts `text` to [`RESPONSE_LIMIT`] bytes on a character boundary.
pub fn bounded(text: &str) -> String {
    if text.len() <= RESPONSE_LIMIT {
        return text.to_owned();
    }
    let mut end = RESPONSE_LIMIT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// What a configured sink is and can do: implemented once per sink by its configuration
/// struct, the defaults covering most sinks. Everything the daemon asks about a sink (its
/// template, whether it batches or digests, whether it shows a rendered message, how to check
/// and build it) is asked here, so no other module matches on the kinds of sink.
pub trait SinkConfig {
    /// The `type` as written in the configuration.
    fn kind(&self) -> &'static str;

    /// `[sinks.<name>.delivery]`.
    fn delivery(&self) -> &DeliveryOptions;

    /// Every problem with the settings, each as `key: what is wrong` (the key relative to the
    /// sink). Secrets are only checked for shape here; see [`SinkConfig::read_secrets`].
    fn validate(&self) -> Vec<String>;

    /// Reads the sink's secrets and reports those that cannot be read or used, as
    /// [`SinkConfig::validate`] does: `check-config` and `serve` call it, so what one accepts
    /// the other can build; the operator's tools do not, and work without the secrets. No
    /// message ever quotes a secret.
    fn read_secrets(&self) -> Vec<String> {
        Vec::new()
    }

    /// Every secret the sink sends, read (those that cannot be read left out), for the
    /// daemon's [`crate::secret::Redactor`]: a receiver that quotes one back in its answer
    /// must not get it into the log or the database.
    fn secrets(&self) -> Vec<String> {
        Vec::new()
    }

    /// Makes relative paths in the settings (files, secret files) relative to `base`.
    fn relative_to(&mut self, _base: &Path) {}

    /// Creates the running sink.
    ///
    /// # Errors
    /// A message when a client cannot be created (e.g. an unreadable CA file).
    fn build(&self, name: &str) -> Result<Arc<dyn Sink>, String>;

    /// The sink's own message template, if it overrides the default.
    fn template(&self) -> Option<&TemplateRef> {
        None
    }

    /// What the sink asks the sender's API for before rendering (see `crate::enrich`), on
    /// top of what the route asks.
    fn enrich(&self) -> &[crate::rules::Enrich] {
        &[]
    }

    /// What the sink does with the event when it shows no rendered message (it hands over
    /// the event itself), for `route-test`; `None` for sinks that show the message.
    fn without_message(&self) -> Option<&'static str> {
        None
    }

    /// Most jobs handed to the sink in one call (each job keeps its own outcome record, and
    /// all of them share the call's outcome).
    fn batch(&self) -> usize {
        1
    }

    /// The window over which events are collected into one delivery, for sinks that digest.
    fn digest(&self) -> Option<Duration> {
        None
    }
}

/// Every sink, named once: its module, its [`SinkSpec`] variant with its configuration
/// struct, and its `type`. The modules, the enum, [`SinkSpec::TYPES`], the parser and the
/// dispatch to each sink's [`SinkConfig`] are generated from the list, so no other place
/// names the kinds of sink.
macro_rules! sinks {
    ($($module:ident: $variant:ident($config:ty) = $kind:literal),* $(,)?) => {
        $(pub mod $module;)*

        /// A sink as configured: `[sinks.<name>]` with `type = "..."`.
        #[derive(Debug, Clone)]
        pub enum SinkSpec {
            $($variant($config),)*
        }

        impl SinkSpec {
            /// Every `type` a sink may have.
            pub const TYPES: &[&str] = &[$($kind),*];

            /// The sink of type `kind` from its settings (its table without `type`).
            ///
            /// Each type's struct is deserialized directly rather than through serde's
            /// buffered, internally tagged enum, so an error from a deserializer that tracks
            /// key paths (figment's) names the field it is about: `config` uses this to point
            /// at `sinks.ciso.to`.
            ///
            /// # Errors
            /// An unknown `kind`, or the deserializer's error for the settings.
            pub fn from_settings<'de, D: Deserializer<'de>>(
                kind: &str,
                settings: D,
            ) -> Result<Self, D::Error> {
                Ok(match kind {
                    $($kind => Self::$variant(Deserialize::deserialize(settings)?),)*
                    other => return Err(D::Error::unknown_variant(other, Self::TYPES)),
                })
            }

            /// The sink's configuration and capabilities.
            pub fn config(&self) -> &dyn SinkConfig {
                match self {
                    $(Self::$variant(config) => config,)*
                }
            }

            fn config_mut(&mut self) -> &mut dyn SinkConfig {
                match self {
                    $(Self::$variant(config) => config,)*
                }
            }
        }
    };
}

sinks! {
    file: File(file::FileSinkConfig) = "file",
    log: Log(log::LogSinkConfig) = "log",
    slack: Slack(slack::SlackSinkConfig) = "slack",
    http: Http(http::HttpSinkConfig) = "http",
    exec: Exec(exec::ExecSinkConfig) = "exec",
    email: Email(email::EmailSinkConfig) = "email",
}

/// `type = "..."` picks the variant; the rest of the table are its settings.
impl<'de> Deserialize<'de> for SinkSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut table = serde_json::Map::deserialize(deserializer)?;
        let kind = match table.remove("type") {
            Some(serde_json::Value::String(kind)) => kind,
            Some(_) => return Err(D::Error::custom("`type` must be a string")),
            None => return Err(D::Error::missing_field("type")),
        };
        Self::from_settings(&kind, serde_json::Value::Object(table)).map_err(D::Error::custom)
    }
}

impl SinkSpec {
    /// Makes the settings' relative paths relative to `base`, the configuration file's
    /// directory, so a sink finds its files from whatever directory the daemon started in.
    pub fn relative_to(&mut self, base: &Path) {
        self.config_mut().relative_to(base);
    }

    /// Every problem with the settings, the delivery options' included.
    pub fn validate(&self) -> Vec<String> {
        let config = self.config();
        let mut problems = config.delivery().validate();
        problems.extend(config.validate());
        problems
    }

    /// Every problem reading the sink's secrets (see [`SinkConfig::read_secrets`]).
    pub fn read_secrets(&self) -> Vec<String> {
        self.config().read_secrets()
    }

    /// Whether the sink shows a rendered message; `file` and `exec` hand over the event
    /// itself, so rendering one for them would be work thrown away on every delivery.
    pub fn shows_message(&self) -> bool {
        self.config().without_message().is_none()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn spec(value: serde_json::Value) -> SinkSpec {
        serde_json::from_value(value).unwrap()
    }

    /// What each kind of sink can do, as the engine, routing and `route-test` see it.
    #[test]
    fn every_sink_describes_itself_once() {
        let template = json!({"text": "{{ type }}"});
        let cases = [
            (
                json!({"type": "file", "path": "/tmp/x.jsonl"}),
                "file",
                false,
                file::BATCH,
                false,
            ),
            (
                json!({"type": "log", "template": template}),
                "log",
                true,
                1,
                false,
            ),
            (
                json!({"type": "slack", "webhook_url": {"value": "https://hooks.slack.test/T/B/X"}, "template": template}),
                "slack",
                true,
                1,
                false,
            ),
            (
                json!({"type": "http", "url": "https://example.test/in", "template": template}),
                "http",
                true,
                1,
                false,
            ),
            (
                json!({"type": "exec", "command": ["/bin/true"]}),
                "exec",
                false,
                1,
                false,
            ),
            (
                json!({"type": "email", "url": "smtps://mail.test", "from": "a@example.test", "to": ["b@example.test"], "digest": "15m", "template": template}),
                "email",
                true,
                1,
                true,
            ),
        ];
        let kinds: Vec<&str> = cases.iter().map(|case| case.1).collect();
        assert_eq!(
            kinds,
            SinkSpec::TYPES,
            "every type is tested, and only those"
        );
        for (value, kind, shows_message, batch, digests) in cases {
            let spec = spec(value);
            let config = spec.config();
            assert_eq!(config.kind(), kind);
            assert_eq!(spec.shows_message(), shows_message, "{kind}");
            assert_eq!(config.template().is_some(), shows_message, "{kind}");
            assert_eq!(config.batch(), batch, "{kind}");
            assert_eq!(config.digest().is_some(), digests, "{kind}");
            assert_eq!(spec.validate(), Vec::<String>::new(), "{kind}");
            assert_eq!(spec.read_secrets(), Vec::<String>::new(), "{kind}");
            assert!(config.build("x").is_ok(), "{kind}");
        }
    }

    #[test]
    fn validation_reports_every_problem_and_reads_secrets() {
        let email = spec(json!({
            "type": "email", "url": "ftp://x", "from": "not an address", "to": [],
            "username": "u", "password": {"env": "HOOKROUTE_TEST_UNSET_PASSWORD"},
            "delivery": {"concurrency": 0}
        }));
        let mut problems = email.validate();
        problems.extend(email.read_secrets());
        for key in ["delivery.concurrency", "url", "from", "to", "password"] {
            assert!(
                problems.iter().any(|p| p.starts_with(&format!("{key}: "))),
                "{key} missing from {problems:?}"
            );
        }
        let slack =
            spec(json!({"type": "slack", "webhook_url": {"env": "HOOKROUTE_TEST_UNSET_URL"}}));
        assert_eq!(
            slack.validate(),
            Vec::<String>::new(),
            "only read on demand"
        );
        assert_eq!(
            slack.read_secrets(),
            ["webhook_url: environment variable \"HOOKROUTE_TEST_UNSET_URL\" is not set"]
        );
    }
}
