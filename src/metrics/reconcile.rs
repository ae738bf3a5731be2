//! What reconciling with the senders' APIs counts: passes by outcome, the events they
//! synthesised, and when each source last reconciled successfully (an alert on its age
//! catches a key that expired or an API gone quiet).

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::{Metrics, Source};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceOutcome {
    source: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceType {
    source: String,
    r#type: String,
}

#[derive(Default)]
pub(super) struct Reconciles {
    runs: Family<SourceOutcome, Counter>,
    events: Family<SourceType, Counter>,
    last_success: Family<Source, Gauge<f64, AtomicU64>>,
}

impl Reconciles {
    pub(super) fn register(&self, registry: &mut Registry) {
        registry.register(
            "reconcile_runs",
            "Reconcile passes by source and outcome (ok, failed, rate_limited, refused)",
            self.runs.clone(),
        );
        registry.register(
            "reconciled_events",
            "Events a reconcile pass synthesised (no webhook had brought them), by source and type",
            self.events.clone(),
        );
        registry.register(
            "reconcile_last_success_timestamp_seconds",
            "When a source's last reconcile pass succeeded (unix seconds)",
            self.last_success.clone(),
        );
    }
}

impl Metrics {
    /// A reconcile pass of `source` ended with `outcome`; `ok_at`: it succeeded then.
    pub fn reconcile_run(
        &self,
        source: &str,
        outcome: &'static str,
        ok_at: Option<jiff::Timestamp>,
    ) {
        let reconciles = &self.reconciles;
        reconciles
            .runs
            .get_or_create(&SourceOutcome {
                source: source.to_owned(),
                outcome,
            })
            .inc();
        if let Some(at) = ok_at {
            let seconds = at.as_millisecond() as f64 / 1000.0;
            reconciles
                .last_success
                .get_or_create(&Source {
                    source: source.to_owned(),
                })
                .set(seconds);
        }
    }

    /// A reconcile pass of `source` synthesised an event of `event_type`.
    pub fn reconciled(&self, source: &str, event_type: &str) {
        self.reconciles
            .events
            .get_or_create(&SourceType {
                source: source.to_owned(),
                r#type: event_type.to_owned(),
            })
            .inc();
    }
}
