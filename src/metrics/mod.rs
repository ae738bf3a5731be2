//! What the daemon counts, for `GET /metrics` (Prometheus text format 0.0.4, by the
//! `prometheus-client` crate). One [`Metrics`] per daemon, passed to whoever records into it,
//! so two daemons in one process (the in-process tests) never share counts. A leaf: it knows
//! nothing of the modules that record.
//!
//! Counters and histograms are recorded where things happen; the queue gauges and the
//! database size are read from storage when scraped ([`Metrics::render`]), so they are never
//! stale and cost nothing between scrapes.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

mod recent;
mod reconcile;

pub use recent::SourceHour;
use recent::{Recent, Tallied};

/// The `Content-Type` of what [`Metrics::render`] writes.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Request {
    source: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceReason {
    source: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Source {
    source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Route {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Sink {
    sink: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SinkOutcome {
    sink: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindOutcome {
    kind: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct State {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Version {
    version: &'static str,
}

/// How an attempt ended, for `hookroute_deliveries_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryOutcome {
    Succeeded,
    /// Failed, to be tried again.
    Failed,
    /// Failed for good: a dead letter.
    Dead,
}

/// One sink's queue, as storage reports it at a scrape.
#[derive(Debug, Clone, PartialEq)]
pub struct SinkQueue {
    pub sink: String,
    /// Jobs pending or failed (to be retried).
    pub waiting: u64,
    /// How long the oldest waiting job has waited.
    pub oldest_waiting: Duration,
    pub dead: u64,
}

/// Every metric the daemon exposes.
pub struct Metrics {
    registry: Registry,
    requests: Family<Request, Counter>,
    signature_failures: Family<SourceReason, Counter>,
    accepted: Family<Source, Counter>,
    duplicates: Family<Source, Counter>,
    unrouted: Family<Source, Counter>,
    suppressed: Family<Route, Counter>,
    silenced: Family<Route, Counter>,
    muted: Family<Route, Counter>,
    silences: Family<State, Gauge>,
    paused: Family<Sink, Gauge>,
    internal: Family<KindOutcome, Counter>,
    ingest_duration: Histogram,
    deliveries: Family<SinkOutcome, Counter>,
    attempt_duration: Family<Sink, Histogram>,
    jobs_waiting: Family<Sink, Gauge>,
    oldest_waiting: Family<Sink, Gauge<f64, AtomicU64>>,
    dead_letters: Family<Sink, Gauge>,
    reloads: Family<Outcome, Counter>,
    last_reload: Gauge<f64, AtomicU64>,
    database_bytes: Gauge,
    /// The configured sinks: each has its queue gauges from the start, at 0, so an alert on
    /// `hookroute_dead_letters` sees the first dead letter as a change (a series that is born
    /// at 1 has no change to see).
    sinks: std::sync::Mutex<Vec<String>>,
    /// Each source's last hour, for the status page.
    recent: Recent,
    reconciles: reconcile::Reconciles,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("hookroute");
        let metrics = Self {
            requests: Family::default(),
            signature_failures: Family::default(),
            accepted: Family::default(),
            duplicates: Family::default(),
            unrouted: Family::default(),
            suppressed: Family::default(),
            silenced: Family::default(),
            muted: Family::default(),
            silences: Family::default(),
            paused: Family::default(),
            internal: Family::default(),
            // 1 ms to about 16 s: a durable 2xx takes a few milliseconds, a stalled disk seconds.
            ingest_duration: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            deliveries: Family::default(),
            // 5 ms to about 80 s: a file write to a webhook near its 30 s timeout.
            attempt_duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.005, 2.0, 15))
            }),
            jobs_waiting: Family::default(),
            oldest_waiting: Family::default(),
            dead_letters: Family::default(),
            reloads: Family::default(),
            last_reload: Gauge::default(),
            database_bytes: Gauge::default(),
            sinks: std::sync::Mutex::default(),
            recent: Recent::new(),
            reconciles: reconcile::Reconciles::default(),
            registry: Registry::default(),
        };
        let build_info = Family::<Version, Gauge>::default();
        build_info
            .get_or_create(&Version {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register(
            "requests",
            "Requests to webhook paths, by source and answered status",
            metrics.requests.clone(),
        );
        registry.register(
            "signature_failures",
            "Deliveries refused for their signature (or a replay), by source and reason",
            metrics.signature_failures.clone(),
        );
        registry.register(
            "events_accepted",
            "Deliveries stored as new events, by source",
            metrics.accepted.clone(),
        );
        registry.register(
            "events_duplicate",
            "Deliveries recognised as repeats of a stored one, by source",
            metrics.duplicates.clone(),
        );
        registry.register(
            "events_unrouted",
            "New events no route took, by source",
            metrics.unrouted.clone(),
        );
        registry.register(
            "events_suppressed",
            "New events a route's throttle held back, by route",
            metrics.suppressed.clone(),
        );
        registry.register(
            "events_silenced",
            "New events a silence kept from a route's sinks (one or more), by route",
            metrics.silenced.clone(),
        );
        registry.register(
            "events_muted",
            "New events a route's mute window kept from its sinks, by route",
            metrics.muted.clone(),
        );
        registry.register(
            "silences",
            "Silences this daemon applies, by state (active, pending: starting later)",
            metrics.silences.clone(),
        );
        registry.register(
            "sink_paused",
            "Whether a sink is paused (1): its jobs wait, for an outage or an operator",
            metrics.paused.clone(),
        );
        registry.register(
            "internal_events",
            "hookroute's own events by kind and outcome (emitted, duplicate: another replica's; \
             limited: past max_per_hour; failed: not stored)",
            metrics.internal.clone(),
        );
        registry.register(
            "ingest_duration_seconds",
            "From a request's arrival to its durable 2xx",
            metrics.ingest_duration.clone(),
        );
        registry.register(
            "deliveries",
            "Delivery attempts by sink and outcome (succeeded, failed and retried, dead)",
            metrics.deliveries.clone(),
        );
        registry.register(
            "attempt_duration_seconds",
            "How long one call to a sink took",
            metrics.attempt_duration.clone(),
        );
        registry.register(
            "jobs_waiting",
            "Jobs pending or waiting for a retry, by sink",
            metrics.jobs_waiting.clone(),
        );
        registry.register(
            "oldest_waiting_seconds",
            "Age of the oldest waiting job, by sink",
            metrics.oldest_waiting.clone(),
        );
        registry.register(
            "dead_letters",
            "Jobs that failed for good and wait for an operator, by sink",
            metrics.dead_letters.clone(),
        );
        registry.register(
            "config_reloads",
            "Configuration reloads by outcome (success, failure)",
            metrics.reloads.clone(),
        );
        registry.register(
            "config_last_reload_success_timestamp_seconds",
            "When the configuration was last loaded successfully (unix seconds)",
            metrics.last_reload.clone(),
        );
        registry.register(
            "database_size_bytes",
            "Size of the database on disk, its write-ahead log included",
            metrics.database_bytes.clone(),
        );
        metrics.reconciles.register(&mut registry);
        registry.register("build_info", "The running build; always 1", build_info);
        Self {
            registry,
            ..metrics
        }
    }

    /// A request to a webhook path was answered with `status`.
    pub fn request(&self, source: &str, status: u16) {
        if status >= 400 {
            self.recent.record(source, Tallied::Refused);
        }
        self.requests
            .get_or_create(&Request {
                source: source.to_owned(),
                status,
            })
            .inc();
    }

    /// A delivery was refused for its signature or as a replay; `reason` is the answer's code.
    pub fn signature_failure(&self, source: &str, reason: &str) {
        self.signature_failures
            .get_or_create(&SourceReason {
                source: source.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// A delivery was answered 2xx `took` after it arrived; `new` unless a duplicate.
    pub fn ingested(&self, source: &str, new: bool, took: Duration) {
        let (family, outcome) = if new {
            (&self.accepted, Tallied::Accepted)
        } else {
            (&self.duplicates, Tallied::Duplicate)
        };
        self.recent.record(source, outcome);
        family
            .get_or_create(&Source {
                source: source.to_owned(),
            })
            .inc();
        self.ingest_duration.observe(took.as_secs_f64());
    }

    /// Each source heard from this past hour, by name.
    pub fn last_hour(&self) -> Vec<SourceHour> {
        self.recent.last_hour()
    }

    /// A new event took no route.
    pub fn unrouted(&self, source: &str) {
        self.unrouted
            .get_or_create(&Source {
                source: source.to_owned(),
            })
            .inc();
    }

    /// A route's throttle held a new event back.
    pub fn suppressed(&self, route: &str) {
        self.suppressed
            .get_or_create(&Route {
                route: route.to_owned(),
            })
            .inc();
    }

    /// A silence kept a new event from some of `route`'s sinks.
    pub fn silenced(&self, route: &str) {
        let route = Route {
            route: route.to_owned(),
        };
        self.silenced.get_or_create(&route).inc();
    }

    /// `route`'s mute window kept a new event from its sinks.
    pub fn muted(&self, route: &str) {
        let route = Route {
            route: route.to_owned(),
        };
        self.muted.get_or_create(&route).inc();
    }

    /// Which of the configured `sinks` are paused now.
    pub fn paused_sinks<'a>(
        &self,
        sinks: impl IntoIterator<Item = &'a str>,
        paused: impl Fn(&str) -> bool,
    ) {
        for sink in sinks {
            let series = Sink {
                sink: sink.to_owned(),
            };
            self.paused
                .get_or_create(&series)
                .set(i64::from(paused(sink)));
        }
    }

    /// An internal event of `kind` came to `outcome`.
    pub fn internal_event(&self, kind: &'static str, outcome: &'static str) {
        self.internal
            .get_or_create(&KindOutcome { kind, outcome })
            .inc();
    }

    /// The silences last read: how many hold now, and how many start later.
    pub fn silences(&self, active: usize, pending: usize) {
        for (state, count) in [("active", active), ("pending", pending)] {
            let count = i64::try_from(count).unwrap_or(i64::MAX);
            self.silences.get_or_create(&State { state }).set(count);
        }
    }

    /// A call to `sink` took `took`.
    pub fn attempt(&self, sink: &str, took: Duration) {
        self.attempt_duration
            .get_or_create(&Sink {
                sink: sink.to_owned(),
            })
            .observe(took.as_secs_f64());
    }

    /// A job's attempt at `sink` ended so.
    pub fn delivery(&self, sink: &str, outcome: DeliveryOutcome) {
        let outcome = match outcome {
            DeliveryOutcome::Succeeded => "succeeded",
            DeliveryOutcome::Failed => "failed",
            DeliveryOutcome::Dead => "dead",
        };
        self.deliveries
            .get_or_create(&SinkOutcome {
                sink: sink.to_owned(),
                outcome,
            })
            .inc();
    }

    /// A configuration was loaded (at start, or by a reload) at `now`, or a reload failed.
    pub fn config_loaded(&self, ok: bool, now: jiff::Timestamp) {
        if ok {
            self.last_reload.set(now.as_millisecond() as f64 / 1000.0);
        }
        self.reloads
            .get_or_create(&Outcome {
                outcome: if ok { "success" } else { "failure" },
            })
            .inc();
    }

    /// Takes a loaded configuration's sources and sinks: their series are exported from now
    /// on, at 0 until something happens, so `increase()` and `delta()` see the first event.
    pub fn configured<'a>(
        &self,
        sources: impl IntoIterator<Item = &'a str>,
        sinks: impl IntoIterator<Item = &'a str>,
    ) {
        for source in sources {
            let source = Source {
                source: source.to_owned(),
            };
            for family in [&self.accepted, &self.duplicates, &self.unrouted] {
                family.get_or_create(&source).inc_by(0);
            }
        }
        let sinks: Vec<String> = sinks.into_iter().map(str::to_owned).collect();
        for sink in &sinks {
            let series = Sink { sink: sink.clone() };
            self.paused.get_or_create(&series).set(0);
            for outcome in ["succeeded", "failed", "dead"] {
                self.deliveries
                    .get_or_create(&SinkOutcome {
                        sink: sink.clone(),
                        outcome,
                    })
                    .inc_by(0);
            }
        }
        *self.sinks.lock().unwrap_or_else(|p| p.into_inner()) = sinks;
    }

    /// Everything, in the Prometheus text format, with the queues and database size as
    /// storage reports them now.
    pub fn render(&self, queues: &[SinkQueue], database_bytes: u64) -> String {
        // A sink removed by a reload leaves the gauges once nothing of it is left; a configured
        // sink with nothing waiting reads 0.
        self.jobs_waiting.clear();
        self.oldest_waiting.clear();
        self.dead_letters.clear();
        for sink in self.sinks.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let sink = Sink { sink: sink.clone() };
            self.jobs_waiting.get_or_create(&sink).set(0);
            self.oldest_waiting.get_or_create(&sink).set(0.0);
            self.dead_letters.get_or_create(&sink).set(0);
        }
        for queue in queues {
            let sink = Sink {
                sink: queue.sink.clone(),
            };
            self.jobs_waiting
                .get_or_create(&sink)
                .set(i64::try_from(queue.waiting).unwrap_or(i64::MAX));
            self.oldest_waiting
                .get_or_create(&sink)
                .set(queue.oldest_waiting.as_secs_f64());
            self.dead_letters
                .get_or_create(&sink)
                .set(i64::try_from(queue.dead).unwrap_or(i64::MAX));
        }
        self.database_bytes
            .set(i64::try_from(database_bytes).unwrap_or(i64::MAX));
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry);
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_what_was_recorded() {
        let metrics = Metrics::new();
        metrics.request("cl", 202);
        metrics.request("cl", 202);
        metrics.signature_failure("cl", "invalid_signature");
        metrics.ingested("cl", true, Duration::from_millis(3));
        metrics.delivery("archive", DeliveryOutcome::Dead);
        let text = metrics.render(
            &[SinkQueue {
                sink: "archive".into(),
                waiting: 2,
                oldest_waiting: Duration::from_secs(90),
                dead: 1,
            }],
            4096,
        );
        for line in [
            "hookroute_requests_total{source=\"cl\",status=\"202\"} 2",
            "hookroute_signature_failures_total{source=\"cl\",reason=\"invalid_signature\"} 1",
            "hookroute_events_accepted_total{source=\"cl\"} 1",
            "hookroute_ingest_duration_seconds_count 1",
            "hookroute_deliveries_total{sink=\"archive\",outcome=\"dead\"} 1",
            "hookroute_jobs_waiting{sink=\"archive\"} 2",
            "hookroute_oldest_waiting_seconds{sink=\"archive\"} 90.0",
            "hookroute_dead_letters{sink=\"archive\"} 1",
            "hookroute_database_size_bytes 4096",
            "hookroute_build_info{version=\"",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        // A sink that no longer waits, and is not configured, leaves the gauges.
        let text = metrics.render(&[], 0);
        assert!(!text.contains("hookroute_jobs_waiting{"), "{text}");
    }

    #[test]
    fn configured_sinks_and_sources_are_exported_from_zero() {
        let metrics = Metrics::new();
        metrics.configured(["cl"], ["slack", "mail"]);
        let text = metrics.render(&[], 0);
        for line in [
            "hookroute_dead_letters{sink=\"slack\"} 0",
            "hookroute_dead_letters{sink=\"mail\"} 0",
            "hookroute_jobs_waiting{sink=\"mail\"} 0",
            "hookroute_oldest_waiting_seconds{sink=\"mail\"} 0.0",
            "hookroute_deliveries_total{sink=\"slack\",outcome=\"dead\"} 0",
            "hookroute_events_accepted_total{source=\"cl\"} 0",
            "hookroute_events_unrouted_total{source=\"cl\"} 0",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        // A reload that drops a sink drops its gauges.
        metrics.configured(["cl"], ["mail"]);
        let text = metrics.render(&[], 0);
        assert!(
            !text.contains("hookroute_dead_letters{sink=\"slack\"}"),
            "{text}"
        );
    }
}
