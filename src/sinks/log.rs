//! The `log` sink: one structured log line per event (the journal, under systemd).

use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;

use super::{Delivery, Sink, SinkError};
use crate::templates::TemplateRef;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSinkConfig {
    /// Overrides the default message; the log line is the message's title.
    pub template: Option<TemplateRef>,
    #[serde(default)]
    pub delivery: super::DeliveryOptions,
}

impl super::SinkConfig for LogSinkConfig {
    fn kind(&self) -> &'static str {
        "log"
    }

    fn delivery(&self) -> &super::DeliveryOptions {
        &self.delivery
    }

    fn validate(&self) -> Vec<String> {
        Vec::new()
    }

    fn build(&self, name: &str) -> Result<Arc<dyn Sink>, String> {
        Ok(Arc::new(LogSink::new(name)))
    }

    fn template(&self) -> Option<&TemplateRef> {
        self.template.as_ref()
    }
}

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
    async fn deliver(&self, delivery: &Delivery<'_>) -> Result<String, SinkError> {
        let event = delivery.event;
        tracing::info!(
            job_id = delivery.job_id,
            event_id = delivery.event_id,
            sink = %self.name,
            route = %delivery.route,
            source = %event.source,
            event_type = %event.event_type,
            delivery_id = %event.delivery_id,
            "{}",
            delivery.message.title
        );
        Ok("logged".into())
    }
}
