//! Routes stored events to sinks. The database is the queue: the dispatcher reads events past
//! its persisted cursor in id order, routes each (rules, throttles), delivers it, and records
//! every outcome together with the opened throttle windows and the advanced cursor in one
//! transaction. An event stored before a crash but not yet past the cursor is dispatched after
//! the restart (at least once).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use futures_util::future::join_all;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Routing};
use crate::rules::Throttles;
use crate::sinks::{Delivery, Sink};
use crate::store::{DispatchRecord, Outcome, Store, StoredEvent, ThrottleWindow};

/// Events read per round; their outcomes are recorded in one write.
const BATCH: usize = 256;
/// Pause after a database error before trying again.
const ERROR_PAUSE: Duration = Duration::from_secs(1);

/// A configured sink, built.
#[derive(Clone)]
pub struct NamedSink {
    pub name: String,
    pub kind: &'static str,
    pub sink: Arc<dyn Sink>,
}

/// What the dispatcher needs from the configuration; replaced whole on reload, so a round
/// in progress finishes with the plan it started with.
pub struct Plan {
    pub routing: Arc<Routing>,
    pub sinks: HashMap<String, NamedSink>,
}

impl Plan {
    pub fn build(config: &Config) -> Self {
        let sinks = config
            .sinks
            .iter()
            .map(|s| {
                let sink = NamedSink {
                    name: s.name.clone(),
                    kind: s.spec.kind(),
                    sink: s.spec.build(&s.name),
                };
                (s.name.clone(), sink)
            })
            .collect();
        Self {
            routing: Arc::clone(&config.routing),
            sinks,
        }
    }
}

pub struct Dispatcher {
    store: Store,
    plan: Arc<ArcSwap<Plan>>,
    wake: Arc<Notify>,
}

impl Dispatcher {
    /// `wake` is notified by the ingest path after each commit of a new event; `plan` is
    /// swapped by a reload.
    pub fn new(store: Store, plan: Arc<ArcSwap<Plan>>, wake: Arc<Notify>) -> Self {
        Self { store, plan, wake }
    }

    /// Runs until `stop` is cancelled, finishing the round in progress first.
    pub async fn run(self, stop: CancellationToken) {
        let Some(mut cursor) = self
            .retry(&stop, "read the dispatch cursor", || {
                self.store.dispatch_cursor()
            })
            .await
        else {
            return;
        };
        let Some(mut throttles) = self.load_throttles(&stop).await else {
            return;
        };
        while !stop.is_cancelled() {
            let batch = match self.store.events_after(cursor, BATCH).await {
                Ok(batch) => batch,
                Err(err) => {
                    tracing::error!(error = %err, "cannot read events to dispatch");
                    pause(&stop, ERROR_PAUSE).await;
                    continue;
                }
            };
            let Some(last) = batch.last().map(|e| e.id) else {
                tokio::select! {
                    () = self.wake.notified() => {}
                    () = stop.cancelled() => {}
                }
                continue;
            };
            let plan = self.plan.load_full();
            let mut records = Vec::new();
            let mut windows = Vec::new();
            for stored in &batch {
                dispatch_one(&plan, stored, &mut throttles, &mut records, &mut windows).await;
            }
            match self.store.record_dispatch(last, records, windows).await {
                Ok(()) => cursor = last,
                Err(err) => {
                    // Not advancing the cursor redelivers this round: at least once, never
                    // lost. The windows it opened were not stored, so forget them too.
                    tracing::error!(error = %err, "cannot record dispatch outcomes");
                    pause(&stop, ERROR_PAUSE).await;
                    let Some(reloaded) = self.load_throttles(&stop).await else {
                        return;
                    };
                    throttles = reloaded;
                }
            }
        }
    }

    async fn load_throttles(&self, stop: &CancellationToken) -> Option<Throttles> {
        let windows = self
            .retry(stop, "read throttle windows", || {
                self.store.throttle_windows()
            })
            .await?;
        Some(Throttles::new(windows))
    }

    /// Retries a start-up read until it works or the dispatcher is stopped.
    async fn retry<T, F, Fut>(&self, stop: &CancellationToken, what: &str, read: F) -> Option<T>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, crate::store::StoreError>>,
    {
        loop {
            match read().await {
                Ok(value) => return Some(value),
                Err(err) => tracing::error!(error = %err, "cannot {what}"),
            }
            pause(stop, ERROR_PAUSE).await;
            if stop.is_cancelled() {
                return None;
            }
        }
    }
}

/// Routes one event and delivers it to every sink of every route that takes it.
async fn dispatch_one(
    plan: &Plan,
    stored: &StoredEvent,
    throttles: &mut Throttles,
    records: &mut Vec<DispatchRecord>,
    windows: &mut Vec<ThrottleWindow>,
) {
    let event = &stored.event;
    let record = |route: Option<&str>, sink: Option<&str>, outcome| DispatchRecord {
        event_id: stored.id,
        route: route.map(str::to_owned),
        sink: sink.map(str::to_owned),
        outcome,
    };
    let routes = plan.routing.table.route(event);
    if routes.is_empty() {
        tracing::info!(event_id = stored.id, event_type = %event.event_type, source = %event.source, "no route matched");
        records.push(record(None, None, Outcome::Unrouted));
        return;
    }
    let at = event.occurred_at.unwrap_or(stored.received_at);
    let mut deliveries = Vec::new();
    for (route, key) in routes {
        if let (Some(throttle), Some(key)) = (&route.throttle, key) {
            match throttles.admit(&route.name, &key, at, throttle.window) {
                Some(window) => windows.push(window),
                None => {
                    tracing::info!(event_id = stored.id, route = %route.name, %key, "suppressed by throttle");
                    records.push(record(Some(&route.name), None, Outcome::Suppressed { key }));
                    continue;
                }
            }
        }
        for sink in route.sinks.iter().filter_map(|name| plan.sinks.get(name)) {
            let template = route
                .templates
                .get(sink.kind)
                .or_else(|| plan.routing.sink_templates.get(&sink.name));
            let message = plan
                .routing
                .templates
                .render(template.map(String::as_str), event);
            deliveries.push((route.name.as_str(), sink, message));
        }
    }
    let outcomes = join_all(
        deliveries
            .iter()
            .map(|(route, sink, message)| async move {
                sink.sink
                    .deliver(&Delivery {
                        event,
                        route,
                        message,
                    })
                    .await
            })
            .collect::<Vec<_>>(),
    )
    .await;
    for ((route, sink, _), outcome) in deliveries.iter().zip(outcomes) {
        let outcome = match outcome {
            Ok(()) => Outcome::Delivered,
            Err(err) => {
                tracing::warn!(event_id = stored.id, %route, sink = %sink.name, error = %err, "delivery failed");
                Outcome::Failed {
                    error: err.to_string(),
                }
            }
        };
        records.push(record(Some(route), Some(&sink.name), outcome));
    }
}

async fn pause(stop: &CancellationToken, duration: Duration) {
    tokio::select! {
        () = tokio::time::sleep(duration) => {}
        () = stop.cancelled() => {}
    }
}
