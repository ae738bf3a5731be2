//! The `log` sink: one structured log line per event (the journal, under systemd).

use async_trait::async_trait;
use serde::Deserialize;

use super::{Sink, SinkError};
use crate::event::Event;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSinkConfig {}

pub struct LogSink {
    name: String,
}

impl LogSink {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
        }
    }
}

#[async_trait]
impl Sink for LogSink {
    async fn deliver(&self, event: &Event) -> Result<(), SinkError> {
        tracing::info!(
            sink = %self.name,
            source = %event.source,
            event_type = %event.event_type,
            delivery_id = %event.delivery_id,
            "event"
        );
        Ok(())
    }
}
