//! Where events go. Every sink has the same shape (Vector's): a config struct that denies
//! unknown keys, a pure `validate`, a `build` that creates clients, and the running sink
//! behind the [`Sink`] trait. Adding a sink is one new file plus one [`SinkSpec`] variant.
//!
//! Sinks never see HTTP requests or the database: they get a [`Delivery`] and say how it went.
//! Whether a failure is worth a retry is the sink's [`SinkError`] variant; what to do about it
//! is decided in one place, `delivery::retry`.

pub mod email;
pub mod exec;
pub mod file;
pub mod http;
pub mod log;
mod options;
pub mod slack;

use std::time::Duration;

use async_trait::async_trait;
pub use options::{DeliveryOptions, RetryPolicy};
use serde::Deserialize;

use crate::duration::HumanDuration;
use crate::event::Event;
use crate::templates::{Message, TemplateRef};

/// One event on its way to one sink through one route.
#[derive(Debug, Clone, Copy)]
pub struct Delivery<'a> {
    pub event: &'a Event,
    pub route: &'a str,
    /// Rendered from the route's, the sink's or the default template; empty for sinks that
    /// show no message ([`SinkSpec::shows_message`]).
    pub message: &'a Message,
}

/// A destination for events.
#[async_trait]
pub trait Sink: Send + Sync {
    /// Delivers one event; returns a short summary of the sink's answer for the job record.
    ///
    /// # Errors
    /// [`SinkError`] saying why the event did not arrive and whether trying again may help.
    async fn deliver(&self, delivery: &Delivery<'_>) -> Result<String, SinkError>;

    /// Delivers several events as one (a digest). Sinks that offer digests override this.
    ///
    /// # Errors
    /// As [`Sink::deliver`]; the outcome applies to every event.
    async fn deliver_batch(&self, deliveries: &[Delivery<'_>]) -> Result<String, SinkError> {
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

    /// What the sink answered, if anything.
    pub fn response(&self) -> &str {
        match self {
            Self::Transient { response, .. }
            | Self::Permanent { response, .. }
            | Self::RateLimited { response, .. } => response,
        }
    }
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

/// A sink as configured: `[sinks.<name>]` with `type = "..."`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SinkSpec {
    File(file::FileSinkConfig),
    Log(log::LogSinkConfig),
    Slack(slack::SlackSinkConfig),
    Http(http::HttpSinkConfig),
    Exec(exec::ExecSinkConfig),
    Email(email::EmailSinkConfig),
}

impl SinkSpec {
    /// The `type` as written in the configuration.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::File(_) => "file",
            Self::Log(_) => "log",
            Self::Slack(_) => "slack",
            Self::Http(_) => "http",
            Self::Exec(_) => "exec",
            Self::Email(_) => "email",
        }
    }

    pub fn delivery(&self) -> &DeliveryOptions {
        match self {
            Self::File(config) => &config.delivery,
            Self::Log(config) => &config.delivery,
            Self::Slack(config) => &config.delivery,
            Self::Http(config) => &config.delivery,
            Self::Exec(config) => &config.delivery,
            Self::Email(config) => &config.delivery,
        }
    }

    /// Most jobs handed to the sink in one call (each job keeps its own outcome record, and
    /// all of them share the call's outcome).
    pub fn batch(&self) -> usize {
        match self {
            Self::File(_) => file::BATCH,
            _ => 1,
        }
    }

    /// The window over which events are collected into one delivery, for sinks that digest.
    pub fn digest(&self) -> Option<Duration> {
        match self {
            Self::Email(config) => config.digest.map(|HumanDuration(d)| d),
            _ => None,
        }
    }

    /// Whether the sink shows a rendered message; `file` and `exec` hand over the event
    /// itself, so rendering one for them would be work thrown away on every delivery.
    pub fn shows_message(&self) -> bool {
        !matches!(self, Self::File(_) | Self::Exec(_))
    }

    /// The sink's own message template, if it overrides the default.
    pub fn template(&self) -> Option<&TemplateRef> {
        match self {
            Self::File(_) | Self::Exec(_) => None,
            Self::Log(config) => config.template.as_ref(),
            Self::Slack(config) => config.template.as_ref(),
            Self::Http(config) => config.template.as_ref(),
            Self::Email(config) => config.template.as_ref(),
        }
    }

    /// Checks the settings without touching the outside world.
    ///
    /// # Errors
    /// A message saying which setting is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.delivery().concurrency == 0 {
            return Err("delivery.concurrency: must be at least 1".into());
        }
        if self.delivery().retry.max_attempts == 0 {
            return Err("delivery.retry.max_attempts: must be at least 1".into());
        }
        match self {
            Self::File(config) => config.validate(),
            Self::Log(_) => Ok(()),
            Self::Slack(config) => config.validate(),
            Self::Http(config) => config.validate(),
            Self::Exec(config) => config.validate(),
            Self::Email(config) => config.validate(),
        }
    }

    /// Creates the running sink.
    ///
    /// # Errors
    /// A message when a client cannot be created (e.g. an unreadable CA file).
    pub fn build(&self, name: &str) -> Result<std::sync::Arc<dyn Sink>, String> {
        Ok(match self {
            Self::File(config) => std::sync::Arc::new(file::FileSink::new(config)),
            Self::Log(_) => std::sync::Arc::new(log::LogSink::new(name)),
            Self::Slack(config) => std::sync::Arc::new(slack::SlackSink::new(config)?),
            Self::Http(config) => std::sync::Arc::new(http::HttpSink::new(config)?),
            Self::Exec(config) => std::sync::Arc::new(exec::ExecSink::new(config)),
            Self::Email(config) => std::sync::Arc::new(email::EmailSink::new(config)?),
        })
    }
}
