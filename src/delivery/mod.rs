//! The delivery engine: turns pending jobs into attempts. Each sink has its own concurrency
//! limit, and the engine never waits on a sink (it only claims as many jobs as the sink has
//! room for and runs them as tasks), so one slow or down sink never delays another.
//!
//! A sink's room is its concurrency times [`PREFETCH`]: recording an outcome goes through the
//! single database writer, which under heavy ingest answers in milliseconds, so a fast sink
//! that took one job per free slot and waited for each record would deliver a few hundred
//! jobs a second while thousands arrive. Claimed jobs wait in memory for a slot, and a slot
//! is freed as soon as the sink answers, before the outcome is recorded.
//!
//! Claims live in memory ([`Held`]): a job is held until its outcome is recorded, and left out
//! of every read meanwhile. The database only learns of an attempt when it ended, so a job
//! being attempted when the process dies is still pending and is tried again at the next
//! start. Delivery is therefore at least once: a sink may see a repeat after a crash, and gets
//! the delivery id to recognise it.
//!
//! New jobs reach the engine two ways. Ingest hands most over directly, with their event
//! ([`NewJobs::hand_over`]), so nothing just written is read back: their rows are the durable
//! copy, written due only [`HANDOFF_GRACE`] later (see [`Handoff`]). Everything else is read
//! from the database: jobs of digests, of a sink whose hand-over queue is full, retries,
//! re-queued jobs, and whatever an earlier run left.

mod retry;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::panic::AssertUnwindSafe;

use arc_swap::ArcSwap;
use futures_util::FutureExt as _;
use jiff::Timestamp;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::dispatch::{NamedSink, Plan};
use crate::event::Event;
use crate::sinks::{Delivery, SinkError};
use crate::store::{AttemptOutcome, DueJob, Handoff, Job, Store};
use crate::templates::Message;

/// Longest sleep between looks at the queue: jobs re-queued from the command line are
/// picked up within this.
const POLL: Duration = Duration::from_millis(500);
/// Jobs claimed per concurrency slot of a sink, at most, ahead of delivering them.
const PREFETCH: usize = 16;
/// Most jobs gathered into one digest.
const DIGEST_LIMIT: usize = 500;
/// When a handed-over job's row comes due if the engine never got it. Far longer than a
/// hand-over takes (the time to flush the write), and short enough that a job whose request
/// was dropped in between is still delivered soon.
pub const HANDOFF_GRACE: Duration = Duration::from_secs(10);
/// Most handed-over jobs waiting for one sink; past that, new jobs are read from the database
/// when the sink has room. Bounds the memory that events waiting for a slow sink take.
const HANDOFF_LIMIT: usize = 1024;
/// How long handed-over jobs wait for more to fill a batching sink's call. Reads from the
/// database batch by themselves, finding whatever came in meanwhile; hand-overs come one event
/// at a time, and without the wait the file sink got a call every few jobs under the
/// benchmark's flood, which cost the daemon about a quarter more CPU per request.
const LINGER: Duration = Duration::from_millis(5);
/// Sinks enforce `delivery.timeout` themselves (the HTTP client's timeout, the exec sink's
/// process-group kill); the engine's own limit is a backstop that fires this much later, so
/// it never cuts a sink off before the sink could clean up.
const BACKSTOP_GRACE: Duration = Duration::from_secs(5);

/// A sink's limits, replaced when a reload changes its concurrency (attempts holding the old
/// ones finish undisturbed).
struct Limits {
    concurrency: usize,
    /// Sink calls in progress.
    running: Arc<Semaphore>,
    /// Jobs claimed and not yet recorded: bounds what waits in memory.
    claimed: Arc<Semaphore>,
}

impl Limits {
    fn new(concurrency: usize) -> Self {
        Self {
            concurrency,
            running: Arc::new(Semaphore::new(concurrency)),
            claimed: Arc::new(Semaphore::new(concurrency.saturating_mul(PREFETCH))),
        }
    }
}

/// The jobs being attempted, by id: claimed, not yet recorded. A job leaves only once its
/// outcome is in the database, so no read ever finds it due while it is attempted.
#[derive(Clone, Default)]
struct Held(Arc<Mutex<HashSet<i64>>>);

impl Held {
    fn snapshot(&self) -> HashSet<i64> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<i64>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What ingest tells the engine: the jobs it hands over, and which sinks have new jobs to read
/// from the database. Cheap to share with the HTTP handlers.
#[derive(Default)]
pub struct NewJobs {
    sinks: Mutex<HashSet<String>>,
    handed: Mutex<HashMap<String, VecDeque<DueJob>>>,
    /// Every job the engine has: handed over, or claimed; shared with the engine.
    held: Held,
    wake: Notify,
}

impl NewJobs {
    /// Notes jobs just stored for `sinks`, and wakes the engine.
    pub fn add<'a>(&self, sinks: impl IntoIterator<Item = &'a str>) {
        {
            let mut noted = self.sinks.lock().unwrap_or_else(|p| p.into_inner());
            for sink in sinks {
                if !noted.contains(sink) {
                    noted.insert(sink.to_owned());
                }
            }
        }
        self.wake.notify_one();
    }

    /// Which of `sinks` (the routed ones of an event received at `now`) take their new jobs
    /// by hand-over: those outside digests whose queue has room.
    pub fn handoff<'a>(
        &self,
        plan: &Plan,
        sinks: impl IntoIterator<Item = &'a String>,
        now: Timestamp,
    ) -> Handoff {
        let mut sinks = sinks.into_iter().peekable();
        if sinks.peek().is_none() {
            return Handoff::default();
        }
        let queues = self.handed.lock().unwrap_or_else(|p| p.into_inner());
        let mut handoff = Handoff {
            sinks: Vec::new(),
            fallback: now + HANDOFF_GRACE,
        };
        for sink in sinks {
            let open = plan.sinks.get(sink).is_some_and(|s| s.digest.is_none())
                && queues.get(sink).is_none_or(|q| q.len() < HANDOFF_LIMIT);
            if open && !handoff.sinks.contains(sink) {
                handoff.sinks.push(sink.clone());
            }
        }
        handoff
    }

    /// Gives the engine `jobs`, just stored for the sinks [`handoff`](Self::handoff) chose,
    /// with their `event`.
    pub fn hand_over(&self, jobs: Vec<Job>, event: Event) {
        if jobs.is_empty() {
            return;
        }
        {
            // Held from now on: were the hand-over slower than the grace, a read of due jobs
            // must still not return them.
            let mut held = self.held.lock();
            let mut queues = self.handed.lock().unwrap_or_else(|p| p.into_inner());
            let mut event = Some(event);
            let last = jobs.len() - 1;
            for (i, job) in jobs.into_iter().enumerate() {
                // A job its row's read already claimed stays with that claim.
                if !held.insert(job.id) {
                    continue;
                }
                let event = if i == last {
                    event.take()
                } else {
                    event.clone()
                };
                let queue = queues.entry(job.sink.clone()).or_default();
                queue.push_back(DueJob { job, event });
            }
        }
        self.wake.notify_one();
    }

    fn take(&self) -> HashSet<String> {
        std::mem::take(&mut *self.sinks.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Up to `max` handed-over jobs of `sink`, oldest first.
    fn take_handed(&self, sink: &str, max: usize) -> Vec<DueJob> {
        let mut queues = self.handed.lock().unwrap_or_else(|p| p.into_inner());
        let Some(queue) = queues.get_mut(sink) else {
            return Vec::new();
        };
        let jobs = queue.drain(..max.min(queue.len())).collect();
        if queue.is_empty() {
            queues.remove(sink);
        }
        jobs
    }

    /// The sinks with handed-over jobs: how many, and when the oldest was stored.
    fn handed_sinks(&self) -> Vec<(String, usize, Timestamp)> {
        let queues = self.handed.lock().unwrap_or_else(|p| p.into_inner());
        queues
            .iter()
            .filter_map(|(sink, queue)| {
                let oldest = queue.front()?.job.created_at;
                Some((sink.clone(), queue.len(), oldest))
            })
            .collect()
    }

    /// Lets go of the jobs handed over for `sink`, which no longer takes them (a reload
    /// removed it or made it a digest): their rows come due and are read as any other.
    fn release(&self, sink: &str) {
        let jobs = self.take_handed(sink, usize::MAX);
        let mut held = self.held.lock();
        for due in jobs {
            held.remove(&due.job.id);
        }
    }
}

pub struct Engine {
    store: Store,
    plan: Arc<ArcSwap<Plan>>,
    new_jobs: Arc<NewJobs>,
}

impl Engine {
    /// `new_jobs` is where ingest hands over jobs and notes the sinks it created others for.
    pub fn new(store: Store, plan: Arc<ArcSwap<Plan>>, new_jobs: Arc<NewJobs>) -> Self {
        Self {
            store,
            plan,
            new_jobs,
        }
    }

    /// Runs until `stop` is cancelled; attempts still running then are abandoned and retried
    /// at the next start.
    ///
    /// Each turn asks only the sinks that can have work: those with new jobs, and those the
    /// last look at the whole queue found due, for as long as they keep finding jobs. The
    /// whole queue (digests, retries coming due, re-queued jobs, removed sinks) is looked at
    /// when it said something would be due, and at least every `POLL`. Under a flood a turn
    /// comes with every few deliveries, and reading the whole queue each time was measurable:
    /// without it, 5% to 20% more events were delivered during the benchmark's flood, at the
    /// same ingest rate.
    pub async fn run(self, stop: CancellationToken) {
        let mut limits: HashMap<String, Limits> = HashMap::new();
        let mut running = JoinSet::new();
        let mut next_look = Timestamp::now();
        let mut active = HashSet::new();
        while !stop.is_cancelled() {
            let plan = self.plan.load_full();
            let mut sinks = self.new_jobs.take();
            if Timestamp::now() >= next_look {
                (next_look, active) = self.look(&plan, &mut limits, &mut running).await;
            } else {
                sinks.extend(active.drain());
            }
            for name in sinks {
                let Some(sink) = plan.sinks.get(&name).filter(|s| s.digest.is_none()) else {
                    continue; // a digest, or a removed sink: the next look sees to it
                };
                let limit = limits_for(&mut limits, sink);
                if self.start(&plan, sink, limit, &mut running).await != Some(0) {
                    active.insert(name);
                }
            }
            let mut wait = Timestamp::now()
                .duration_until(next_look)
                .unsigned_abs()
                .min(POLL);
            if let Some(linger) = self.start_handed(&plan, &mut limits, &mut running) {
                wait = wait.min(linger);
            }
            tokio::select! {
                () = self.new_jobs.wake.notified() => {}
                () = tokio::time::sleep(wait) => {}
                Some(_) = running.join_next() => while running.try_join_next().is_some() {},
                () = stop.cancelled() => {}
            }
        }
        running.abort_all();
    }

    /// Starts the handed-over jobs each sink has room for. A batching sink's jobs wait up to
    /// [`LINGER`] for a full batch; returns how long until the first of those is due.
    fn start_handed(
        &self,
        plan: &Arc<Plan>,
        limits: &mut HashMap<String, Limits>,
        running: &mut JoinSet<()>,
    ) -> Option<Duration> {
        let now = Timestamp::now();
        let mut linger: Option<Duration> = None;
        for (name, waiting, oldest) in self.new_jobs.handed_sinks() {
            let Some(sink) = plan.sinks.get(&name).filter(|s| s.digest.is_none()) else {
                self.new_jobs.release(&name);
                continue;
            };
            let ready = oldest + LINGER;
            if waiting < sink.batch && ready > now {
                let left = now.duration_until(ready).unsigned_abs();
                linger = Some(linger.map_or(left, |l| l.min(left)));
                continue;
            }
            let limits = limits_for(limits, sink);
            let room = limits.claimed.available_permits().min(waiting);
            if room == 0 {
                continue; // woken again when a running attempt ends
            }
            let Ok(reserved) = Arc::clone(&limits.claimed)
                .try_acquire_many_owned(u32::try_from(room).unwrap_or(u32::MAX))
            else {
                continue;
            };
            let jobs = self.new_jobs.take_handed(&name, room);
            self.launch(plan, sink, limits, jobs, reserved, running);
        }
        linger
    }

    /// Looks at the whole queue and starts what is due. Returns when to look again, and the
    /// sinks that had jobs due and may have more.
    async fn look(
        &self,
        plan: &Arc<Plan>,
        limits: &mut HashMap<String, Limits>,
        running: &mut JoinSet<()>,
    ) -> (Timestamp, HashSet<String>) {
        let due = match self.store.due_summary().await {
            Ok(due) => due,
            Err(err) => {
                tracing::error!(error = %err, "cannot read the delivery queue");
                return (Timestamp::now() + POLL, HashSet::new());
            }
        };
        let now = Timestamp::now();
        let mut next = now + POLL;
        let mut active = HashSet::new();
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
            let started = self
                .start(plan, sink, limits_for(limits, sink), running)
                .await;
            if sink.digest.is_none() && started != Some(0) {
                active.insert(name);
            }
        }
        (next, active)
    }

    /// Jobs for a sink the configuration no longer has (removed by a reload) would wait
    /// forever: dead-letter them, visibly, so `dead-letter retry` can revive them if the sink
    /// comes back.
    async fn bury_orphans(&self, sink: &str) {
        let far = Timestamp::MAX;
        let due = self.store.due_jobs(
            sink,
            DIGEST_LIMIT,
            None,
            Some(far),
            self.new_jobs.held.snapshot(),
        );
        let jobs = match due.await {
            Ok(jobs) => jobs,
            Err(err) => {
                tracing::error!(%sink, error = %err, "cannot read jobs of a removed sink");
                return;
            }
        };
        let error = format!("sink {sink:?} is no longer configured");
        let outcomes = jobs
            .into_iter()
            .map(|due| {
                let outcome = AttemptOutcome::Dead {
                    error: error.clone(),
                    response: String::new(),
                };
                (due.job, outcome)
            })
            .collect();
        finish(&self.store, sink, outcomes, Timestamp::now()).await;
    }

    /// Claims what `sink` has room for and starts the attempts. Returns how many jobs it
    /// started, or `None` when the sink had no room (or the read failed), so it did not look.
    async fn start(
        &self,
        plan: &Arc<Plan>,
        sink: &NamedSink,
        limits: &Limits,
        running: &mut JoinSet<()>,
    ) -> Option<usize> {
        // A digest is one sink call: it needs a free slot, then takes everything waiting.
        let (count, reserve, hold) = match sink.digest {
            Some(_) if limits.running.available_permits() == 0 => return None,
            Some(window) => (DIGEST_LIMIT, 1, Some(window)),
            None => {
                let room = limits.claimed.available_permits();
                (room, room, None)
            }
        };
        if reserve == 0 {
            return None;
        }
        // Places reserved before claiming, so every claimed job is sure of one.
        let Ok(reserved) = Arc::clone(&limits.claimed)
            .try_acquire_many_owned(u32::try_from(reserve).unwrap_or(u32::MAX))
        else {
            return None;
        };
        let due = self
            .store
            .due_jobs(&sink.name, count, hold, None, self.new_jobs.held.snapshot());
        let jobs = match due.await {
            Ok(jobs) => jobs,
            Err(err) => {
                tracing::error!(sink = %sink.name, error = %err, "cannot read due jobs");
                return None;
            }
        };
        let started = jobs.len();
        self.new_jobs
            .held
            .lock()
            .extend(jobs.iter().map(|due| due.job.id));
        self.launch(plan, sink, limits, jobs, reserved, running);
        Some(started)
    }

    /// Runs the attempts at `jobs`, held and with their places `reserved`.
    fn launch(
        &self,
        plan: &Arc<Plan>,
        sink: &NamedSink,
        limits: &Limits,
        jobs: Vec<DueJob>,
        mut reserved: tokio::sync::OwnedSemaphorePermit,
        running: &mut JoinSet<()>,
    ) {
        // A digest is one call holding one place; otherwise up to `batch` jobs go in a call,
        // each holding its own place.
        let per_call = if sink.digest.is_some() {
            DIGEST_LIMIT
        } else {
            sink.batch
        };
        let mut jobs = jobs.into_iter().peekable();
        while jobs.peek().is_some() {
            let batch: Vec<DueJob> = jobs.by_ref().take(per_call).collect();
            let claimed = reserved.split(if sink.digest.is_some() {
                1
            } else {
                batch.len()
            });
            let slot = Arc::clone(&limits.running);
            let (store, plan, sink) = (self.store.clone(), Arc::clone(plan), sink.clone());
            let held = self.new_jobs.held.clone();
            running.spawn(async move {
                let ids: Vec<i64> = batch.iter().map(|due| due.job.id).collect();
                let recorded = attempt(&store, &plan, &sink, batch, &slot).await;
                // A job whose outcome could not be recorded stays held, as the database
                // still says it is due: attempted again after a restart, not in a loop now.
                if recorded {
                    let mut held = held.lock();
                    for id in ids {
                        held.remove(&id);
                    }
                }
                drop(claimed);
            });
        }
    }
}

/// `sink`'s limits, made anew when a reload changed its concurrency.
fn limits_for<'a>(limits: &'a mut HashMap<String, Limits>, sink: &NamedSink) -> &'a Limits {
    let concurrency = sink.delivery.concurrency;
    let limit = limits
        .entry(sink.name.clone())
        .or_insert_with(|| Limits::new(concurrency));
    if limit.concurrency != concurrency {
        *limit = Limits::new(concurrency);
    }
    limit
}

/// One attempt at delivering `jobs` (one job, or a digest's worth) and its recorded outcome.
/// Returns whether every outcome was recorded.
async fn attempt(
    store: &Store,
    plan: &Arc<Plan>,
    sink: &NamedSink,
    jobs: Vec<DueJob>,
    slot: &Arc<Semaphore>,
) -> bool {
    let Ok(slot) = slot.acquire().await else {
        return false; // never closed
    };
    let started = Timestamp::now();
    let mut outcomes = Vec::with_capacity(jobs.len());
    let mut live = Vec::with_capacity(jobs.len());
    for DueJob { job, event } in jobs {
        match event {
            Some(event) => live.push((job, event)),
            None => outcomes.push((
                job,
                AttemptOutcome::Dead {
                    error: "the event is no longer stored".into(),
                    response: String::new(),
                },
            )),
        }
    }
    let Some(prepared) = prepare(plan, sink, live).await else {
        return false; // the runtime is shutting down: the jobs stay due
    };
    if prepared.is_empty() {
        return finish(store, &sink.name, outcomes, started).await;
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
    // A panic is a bug, but one an event can trigger: caught here it costs that job (a dead
    // letter saying so) instead of leaving it pending, to panic again after every restart.
    let call = AssertUnwindSafe(async {
        match deliveries.as_slice() {
            [one] => sink.sink.deliver(one).await,
            many => sink.sink.deliver_batch(many).await,
        }
    })
    .catch_unwind();
    let result = match tokio::time::timeout(timeout + BACKSTOP_GRACE, call).await {
        Ok(Ok(result)) => result,
        Ok(Err(panic)) => Err(SinkError::permanent(format!(
            "the sink failed on this event (a bug): {}",
            panic_message(&*panic)
        ))),
        Err(_) => Err(SinkError::transient(format!(
            "timed out after {}",
            humantime::format_duration(timeout)
        ))),
    };
    drop(deliveries);
    drop(slot);
    let now = Timestamp::now();
    for (job, _, message) in prepared {
        let mut outcome = retry::decide(
            &sink.delivery.retry,
            &job,
            result.as_ref().cloned(),
            now,
            jitter(),
        );
        if let Some(why) = message.fallback {
            outcome.note(&why);
        }
        outcomes.push((job, outcome));
    }
    finish(store, &sink.name, outcomes, started).await
}

/// Pairs each job with its message, rendered on a blocking thread: a template works through
/// a stranger's payload, and however bounded (see `templates::FUEL`), that work must not hold
/// up the threads that answer senders or run other attempts. `None` only when the runtime is
/// shutting down.
async fn prepare(
    plan: &Arc<Plan>,
    sink: &NamedSink,
    jobs: Vec<(Job, Event)>,
) -> Option<Vec<(Job, Event, Message)>> {
    if !sink.shows_message {
        return Some(
            jobs.into_iter()
                .map(|(job, event)| (job, event, Message::default()))
                .collect(),
        );
    }
    let (plan, sink) = (Arc::clone(plan), sink.clone());
    let rendered = tokio::task::spawn_blocking(move || {
        jobs.into_iter()
            .map(|(job, event)| {
                let message = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    render(&plan, &sink, &job.route, &event)
                }))
                .unwrap_or_else(|panic| Message {
                    title: format!("{} from {}", event.event_type, event.source),
                    body: String::new(),
                    fallback: Some(format!(
                        "rendering failed on this event (a bug): {}",
                        panic_message(&*panic)
                    )),
                });
                (job, event, message)
            })
            .collect()
    });
    rendered.await.ok()
}

/// The message for `event` through `route` to `sink` (see `Routing::template_for`).
fn render(plan: &Plan, sink: &NamedSink, route: &str, event: &Event) -> Message {
    plan.routing.message(route, &sink.name, sink.kind, event)
}

/// Logs an attempt's outcomes and records them; returns whether they were recorded.
async fn finish(
    store: &Store,
    sink: &str,
    outcomes: Vec<(Job, AttemptOutcome)>,
    started: Timestamp,
) -> bool {
    if outcomes.is_empty() {
        return true;
    }
    for (job, outcome) in &outcomes {
        match outcome {
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
    }
    match store.finish_attempt(outcomes, started).await {
        Ok(()) => true,
        Err(err) => {
            tracing::error!(%sink, error = %err, "cannot record a delivery attempt");
            false
        }
    }
}

/// What a caught panic said.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("panicked")
}

/// A uniform draw in [0, 1) for backoff jitter.
fn jitter() -> f64 {
    rand::random::<f64>()
}
