//! Routes stored events: the dispatcher reads events past its persisted cursor in id order,
//! routes each (rules, throttles) and turns every (event, route, sink) into a delivery job,
//! recording the jobs, the suppressed and unrouted outcomes, the opened throttle windows and
//! the advanced cursor in one transaction. An event stored before a crash but not yet past the
//! cursor is routed after the restart; the delivery engine takes it from there.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Routing};
use crate::rules::Throttles;
use crate::sinks::{DeliveryOptions, Sink};
use crate::store::{DispatchRecord, NewJob, Outcome, Store, StoredEvent, ThrottleWindow};

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
    pub delivery: DeliveryOptions,
    pub digest: Option<Duration>,
    pub shows_message: bool,
}

/// What the dispatcher needs from the configuration; replaced whole on reload, so a round
/// in progress finishes with the plan it started with.
pub struct Plan {
    pub routing: Arc<Routing>,
    pub sinks: HashMap<String, NamedSink>,
}

impl Plan {
    /// Builds every sink's client.
    ///
    /// # Errors
    /// The first sink that cannot be built, and why.
    pub fn build(config: &Config) -> Result<Self, String> {
        let mut sinks = HashMap::new();
        for s in &config.sinks {
            let sink = s
                .spec
                .build(&s.name)
                .map_err(|err| format!("sinks.{}: {err}", s.name))?;
            let named = NamedSink {
                name: s.name.clone(),
                kind: s.spec.kind(),
                sink,
                delivery: *s.spec.delivery(),
                digest: s.spec.digest(),
                shows_message: s.spec.shows_message(),
            };
            sinks.insert(s.name.clone(), named);
        }
        Ok(Self {
            routing: Arc::clone(&config.routing),
            sinks,
        })
    }
}

pub struct Dispatcher {
    store: Store,
    plan: Arc<ArcSwap<Plan>>,
    wake: Arc<Notify>,
    /// Tells the delivery engine there is work.
    jobs_created: Arc<Notify>,
}

impl Dispatcher {
    /// `wake` is notified by the ingest path after each commit of a new event; `plan` is
    /// swapped by a reload.
    pub fn new(
        store: Store,
        plan: Arc<ArcSwap<Plan>>,
        wake: Arc<Notify>,
        jobs_created: Arc<Notify>,
    ) -> Self {
        Self {
            store,
            plan,
            wake,
            jobs_created,
        }
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
            let mut round = Round::default();
            for stored in &batch {
                route_one(&plan, stored, &mut throttles, &mut round);
            }
            match self
                .store
                .record_routing(last, round.jobs, round.records, round.windows)
                .await
            {
                Ok(()) => {
                    cursor = last;
                    self.jobs_created.notify_one();
                }
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

/// What one routing round produced.
#[derive(Default)]
struct Round {
    jobs: Vec<NewJob>,
    records: Vec<DispatchRecord>,
    windows: Vec<ThrottleWindow>,
}

/// Routes one event: a job for every sink of every route that takes it.
fn route_one(plan: &Plan, stored: &StoredEvent, throttles: &mut Throttles, round: &mut Round) {
    let event = &stored.event;
    let routes = plan.routing.table.route(event);
    if routes.is_empty() {
        tracing::info!(event_id = stored.id, event_type = %event.event_type, source = %event.source, "no route matched");
        round.records.push(DispatchRecord {
            event_id: stored.id,
            route: None,
            outcome: Outcome::Unrouted,
        });
        return;
    }
    let at = event.occurred_at.unwrap_or(stored.received_at);
    for (route, key) in routes {
        if let (Some(throttle), Some(key)) = (&route.throttle, key) {
            match throttles.admit(&route.name, &key, at, throttle.window) {
                Some(window) => round.windows.push(window),
                None => {
                    tracing::info!(event_id = stored.id, route = %route.name, %key, "suppressed by throttle");
                    let outcome = Outcome::Suppressed { key };
                    round.records.push(DispatchRecord {
                        event_id: stored.id,
                        route: Some(route.name.clone()),
                        outcome,
                    });
                    continue;
                }
            }
        }
        for sink in &route.sinks {
            round.jobs.push(NewJob {
                event_id: stored.id,
                route: route.name.clone(),
                sink: sink.clone(),
            });
        }
    }
}

async fn pause(stop: &CancellationToken, duration: Duration) {
    tokio::select! {
        () = tokio::time::sleep(duration) => {}
        () = stop.cancelled() => {}
    }
}
