//! Where events go. Every sink has the same shape (Vector's): a config struct that denies
//! unknown keys, a pure `validate`, a `build` that creates clients, and the running sink
//! behind the [`Sink`] trait. Adding a sink is one new file plus one [`SinkSpec`] variant.
//!
//! Sinks never see HTTP types or the database: they get an [`Event`] and say how it went.

pub mod file;
pub mod log;

use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;

use crate::event::Event;
use crate::templates::{Message, TemplateRef};

/// One event on its way to one sink through one route.
#[derive(Debug, Clone, Copy)]
pub struct Delivery<'a> {
    pub event: &'a Event,
    pub route: &'a str,
    /// Rendered from the route's, the sink's or the default template.
    pub message: &'a Message,
}

/// A destination for events.
#[async_trait]
pub trait Sink: Send + Sync {
    /// Delivers one event.
    ///
    /// # Errors
    /// [`SinkError`] describing why the event did not arrive.
    async fn deliver(&self, delivery: &Delivery<'_>) -> Result<(), SinkError>;
}

/// Why a delivery failed.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot encode the event: {0}")]
    Encode(#[from] serde_json::Error),
}

/// A sink as configured: `[sinks.<name>]` with `type = "..."`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SinkSpec {
    File(file::FileSinkConfig),
    Log(log::LogSinkConfig),
}

impl SinkSpec {
    /// The `type` as written in the configuration.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::File(_) => "file",
            Self::Log(_) => "log",
        }
    }

    /// The sink's own message template, if it overrides the default.
    pub fn template(&self) -> Option<&TemplateRef> {
        match self {
            Self::File(_) => None,
            Self::Log(config) => config.template.as_ref(),
        }
    }

    /// Checks the settings without touching the outside world.
    ///
    /// # Errors
    /// A message saying which setting is wrong.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Self::File(config) => config.validate(),
            Self::Log(_) => Ok(()),
        }
    }

    /// Creates the running sink.
    pub fn build(&self, name: &str) -> Arc<dyn Sink> {
        match self {
            Self::File(config) => Arc::new(file::FileSink::new(config)),
            Self::Log(_) => Arc::new(log::LogSink::new(name)),
        }
    }
}
