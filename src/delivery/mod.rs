//! The delivery engine: turns pending jobs into attempts. Each sink has its own concurrency
//! limit, and the engine never waits on a sink (it only claims as many jobs as the sink has
//! room for and runs them as tasks), so one slow or down sink never delays another.
//!
//! Jobs are claimed in the database (marked in flight) before they are attempted, and every
//! attempt's outcome is recorded there; jobs still in flight when the process dies are tried
//! again at the next start. Delivery is therefore at least once: a sink may see a repeat after
//! a crash, and gets the delivery id to recognise it.

mod retry;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use jiff::Timestamp;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use retry::RetryPolicy;

use crate::dispatch::{NamedSink, Plan};
use crate::sinks::{Delivery, SinkError};
use crate::store::{AttemptOutcome, Job, Store};
use crate::templates::Message;

/// Longest sleep between looks at the queue: jobs re-queued from the command line are
/// picked up within this.
const POLL: Duration = Duration::from_millis(500);
/// Most jobs gathered into one digest.
const DIGEST_LIMIT: usize = 500;
/// Sinks enforce `delivery.timeout` themselves (the HTTP client's timeout, the exec sink's
/// process-group kill); the engine's own limit is a backstop that fires this much later, so
/// it never cuts a sink off before the sink could clean up.
const BACKSTOP_GRACE: Duration = Duration::from_secs(5);

pub struct Engine {
    store: Store,
    plan: Arc<ArcSwap<Plan>>,
    wake: Arc<Notify>,
}

impl Engine {
    /// `wake` is notified when the router created jobs.
    pub fn new(store: Store, plan: Arc<ArcSwap<Plan>>, wake: Arc<Notify>) -> Self {
        Self { store, plan, wake }
    }

    /// Runs until `stop` is cancelled; attempts still running then are abandoned and retried
    /// at the next start.
    pub async fn run(self, stop: CancellationToken) {
        // Per sink: its concurrency and the semaphore enforcing it (replaced when a reload
        // changes the concurrency; attempts holding the old one finish undisturbed).
        let mut limits: HashMap<String, (usize, Arc<Semaphore>)> = HashMap::new();
        let mut running = JoinSet::new();
        while !stop.is_cancelled() {
            let plan = self.plan.load_full();
            let next = match self.store.due_summary().await {
                Ok(due) => {
                    let now = Timestamp::now();
                    let mut next = now + POLL;
                    for (name, summary) in due {
                        let Some(sink) = plan.sinks.get(&name) else {
                            self.bury_orphans(&name).await;
                            continue;
                        };
                        let ready = match sink.digest {
                            Some(window) => summary.oldest + window,
                            None => summary.next_due,
                        }
                        .max(summary.next_due);
                        if ready > now {
                            next = next.min(ready);
                            continue;
                        }
                        let concurrency = sink.delivery.concurrency;
                        let limit = limits.entry(name.clone()).or_insert_with(|| {
                            (concurrency, Arc::new(Semaphore::new(concurrency)))
                        });
                        if limit.0 != concurrency {
                            *limit = (concurrency, Arc::new(Semaphore::new(concurrency)));
                        }
                        self.start(&plan, sink, &limit.1, &mut running).await;
                    }
                    next
                }
                Err(err) => {
                    tracing::error!(error = %err, "cannot read the delivery queue");
                    Timestamp::now() + POLL
                }
            };
            let wait = Timestamp::now()
                .duration_until(next)
                .unsigned_abs()
                .min(POLL);
            tokio::select! {
                () = self.wake.notified() => {}
                () = tokio::time::sleep(wait) => {}
                Some(_) = running.join_next() => {}
                () = stop.cancelled() => {}
            }
        }
        running.abort_all();
    }

    /// Jobs for a sink the configuration no longer has (removed by a reload) would wait
    /// forever: dead-letter them, visibly, so `dead-letter retry` can revive them if the sink
    /// comes back.
    async fn bury_orphans(&self, sink: &str) {
        let jobs = match self.store.claim_waiting(sink, DIGEST_LIMIT).await {
            Ok(jobs) => jobs,
            Err(err) => {
                tracing::error!(%sink, error = %err, "cannot claim jobs of a removed sink");
                return;
            }
        };
        for job in jobs {
            let error = format!("sink {sink:?} is no longer configured");
            let outcome = AttemptOutcome::Dead {
                error,
                response: String::new(),
            };
            finish(&self.store, sink, job, outcome, Timestamp::now()).await;
        }
    }

    /// Claims what `sink` has room for and starts the attempts.
    async fn start(
        &self,
        plan: &Arc<Plan>,
        sink: &NamedSink,
        limit: &Arc<Semaphore>,
        running: &mut JoinSet<()>,
    ) {
        let room = limit.available_permits();
        if room == 0 {
            return;
        }
        let (count, hold) = match sink.digest {
            Some(window) => (DIGEST_LIMIT, Some(window)),
            None => (room, None),
        };
        let jobs = match self.store.claim_due(&sink.name, count, hold).await {
            Ok(jobs) => jobs,
            Err(err) => {
                tracing::error!(sink = %sink.name, error = %err, "cannot claim jobs");
                return;
            }
        };
        if jobs.is_empty() {
            return;
        }
        let batches: Vec<Vec<Job>> = if sink.digest.is_some() {
            vec![jobs]
        } else {
            jobs.into_iter().map(|j| vec![j]).collect()
        };
        for batch in batches {
            let Ok(permit) = Arc::clone(limit).try_acquire_owned() else {
                break;
            };
            let (store, plan, sink) = (self.store.clone(), Arc::clone(plan), sink.clone());
            running.spawn(async move {
                attempt(&store, &plan, &sink, batch).await;
                drop(permit);
            });
        }
    }
}

/// One attempt at delivering `jobs` (one job, or a digest's worth) and its recorded outcome.
async fn attempt(store: &Store, plan: &Plan, sink: &NamedSink, jobs: Vec<Job>) {
    let started = Timestamp::now();
    let mut prepared = Vec::with_capacity(jobs.len());
    for job in jobs {
        match store.event(job.event_id).await {
            Ok(Some(stored)) => {
                let route = plan
                    .routing
                    .table
                    .routes()
                    .iter()
                    .find(|r| r.name == job.route);
                let template = route
                    .and_then(|r| r.templates.get(sink.kind))
                    .or_else(|| plan.routing.sink_templates.get(&sink.name));
                let message = plan
                    .routing
                    .templates
                    .render(template.map(String::as_str), &stored.event);
                prepared.push((job, stored.event, message));
            }
            Ok(None) => {
                let outcome = AttemptOutcome::Dead {
                    error: "the event is no longer stored".into(),
                    response: String::new(),
                };
                finish(store, &sink.name, job, outcome, started).await;
            }
            Err(err) => {
                // Left in flight; the next start retries it.
                tracing::error!(job = job.id, error = %err, "cannot load the event for a job");
            }
        }
    }
    if prepared.is_empty() {
        return;
    }
    let deliveries: Vec<Delivery<'_>> = prepared
        .iter()
        .map(|(job, event, message): &(Job, _, Message)| Delivery {
            event,
            route: &job.route,
            message,
        })
        .collect();
    let timeout = sink.delivery.timeout.0;
    let result = match tokio::time::timeout(timeout + BACKSTOP_GRACE, async {
        match deliveries.as_slice() {
            [one] => sink.sink.deliver(one).await,
            many => sink.sink.deliver_batch(many).await,
        }
    })
    .await
    {
        Ok(result) => result,
        Err(_) => Err(SinkError::transient(format!(
            "timed out after {}",
            humantime::format_duration(timeout)
        ))),
    };
    drop(deliveries);
    let now = Timestamp::now();
    for (job, _, _) in prepared {
        let outcome = sink
            .delivery
            .retry
            .decide(&job, result.as_ref().cloned(), now, jitter());
        finish(store, &sink.name, job, outcome, started).await;
    }
}

/// Logs an attempt's outcome and records it.
async fn finish(store: &Store, sink: &str, job: Job, outcome: AttemptOutcome, started: Timestamp) {
    match &outcome {
        AttemptOutcome::Succeeded { .. } => {
            tracing::debug!(%sink, job = job.id, attempt = job.attempt, "delivered");
        }
        AttemptOutcome::Failed {
            error, retry_at, ..
        } => {
            tracing::warn!(%sink, job = job.id, attempt = job.attempt, %error, %retry_at, "delivery failed; will retry");
        }
        AttemptOutcome::Dead { error, .. } => {
            tracing::error!(%sink, job = job.id, attempt = job.attempt, %error, "delivery failed for good (dead letter)");
        }
    }
    if let Err(err) = store.finish_attempt(job, outcome, started).await {
        tracing::error!(%sink, error = %err, "cannot record a delivery attempt");
    }
}

/// A uniform draw in [0, 1) for backoff jitter.
fn jitter() -> f64 {
    rand::random::<f64>()
}
