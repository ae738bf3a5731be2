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
//! Claims live in memory ([`inbox::Held`]): a job is held until its outcome is recorded, and left out
//! of every read meanwhile. The database only learns of an attempt when it ended, so a job
//! being attempted when the process dies is still pending and is tried again at the next
//! start. Delivery is therefore at least once: a sink may see a repeat after a crash, and gets
//! the delivery id to recognise it.
//!
//! New jobs reach the engine two ways. Ingest hands most over directly, with their event
//! ([`NewJobs::hand_over`]), so nothing just written is read back: their rows are the durable
//! copy, written due only [`HANDOFF_GRACE`] later (see [`crate::store::Handoff`]). Everything else is read
//! from the database: jobs of digests, of a sink whose hand-over queue is full, retries,
//! re-queued jobs, and whatever an earlier run left.
//!
//! # The life of a job
//!
//! One job per (event, route, sink). Its row's status is a [`JobStatus`](crate::store::JobStatus);
//! the other states live in memory (this daemon's) or in a lease (PostgreSQL's replicas).
//! Every place that moves a job says so and points here.
//!
//! | state | where it is | moved on by |
//! | --- | --- | --- |
//! | **stored** (`pending`) | a row, due now, or (handed over) at its fallback, [`HANDOFF_GRACE`] later, or (grouped) with its group's delivery (`rules::group::due`) | `Storage::insert`, with its event, in one transaction (`intake`); `replay` adds one (`store::admin::Tools::enqueue`) |
//! | **handed over** | [`NewJobs`], with its event, in this daemon's memory | `NewJobs::hand_over` after the insert is durable; taken by a turn (`take_handed`), or given back (`NewJobs::release`, `Storage::release`: due at once) |
//! | **held** | [`inbox::Held`]: left out of every read while an attempt runs | a turn's claim (`Storage::due_jobs`, or a hand-over taken) |
//! | **leased** (PostgreSQL) | `jobs.leased_by`: this replica's until the lease lapses | `due_jobs` claims with the hold; a replica that stops renewing loses its leases, and another claims the jobs |
//! | **failed** | a row due again at its next try | `Storage::finish_attempt` with a retryable error (`retry`); `hookroute retry` makes it due now |
//! | **waiting for a paused sink** | a `failed` (or `pending`) row due from its creation, left unclaimed but for the sink's probe | `Storage::change_sink` pausing the sink ([`health`]); a probe that fails records a deferred attempt (`retry`: it uses none); the sink's resume makes the backlog due, oldest first |
//! | **succeeded** | a row, with its attempts | `finish_attempt`; pruned with its event |
//! | **silenced**, **muted** | a row set aside, never due (`quieted_by`: the silence, or the window) | `Storage::insert` when routing found a silence, the route's mute window, or an internal event about the sink itself (`dispatch::NOT_TO_ITSELF`) (`intake`); `Storage::quiet` when a silence added since holds a job coming due (`attempt::set_aside`); `replay` queues a new job |
//! | **dead** | a row waiting for an operator | `finish_attempt` (a permanent error, out of attempts or time); a sink removed by a reload (`Engine::bury_orphans`); `hookroute dead-letter retry` makes it `pending` with fresh attempts |
//!
//! A process that dies loses only memory: held and handed-over jobs are still `pending` rows,
//! due again at the next start (SQLite makes handed-over rows due at once then; PostgreSQL's
//! leases lapse), so delivery is at least once.

mod attempt;
mod health;
mod inbox;
mod limits;
mod retry;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use jiff::Timestamp;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use health::Health;
pub use inbox::NewJobs;

use crate::clock::Clock;
use crate::dispatch::{NamedSink, Plan};
use crate::metrics::Metrics;
use crate::notice::Notices;
use crate::silence::Silences;
use crate::store::{AttemptOutcome, DueJob, Gather, Store};
use attempt::{Context, attempt, dead_letter, finish, tell_dead};
use limits::Limits;

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

pub struct Engine {
    store: Store,
    plan: Arc<ArcSwap<Plan>>,
    new_jobs: Arc<NewJobs>,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    /// The silences in force: a job coming due may have been silenced since it was created.
    silences: Arc<Silences>,
    /// Which sinks are paused, and what calls' outcomes do to their streaks.
    health: Arc<Health>,
    /// Where the engine tells what it notices (a sink failing, a dead letter).
    notices: Arc<Notices>,
    /// Counts turns: whoever watches the engine (systemd's watchdog) sees it move.
    turns: Arc<AtomicU64>,
    /// Cancelled when the engine stops: attempts still waiting for a slot give up, so a
    /// stopping daemon finishes only the sink calls already made.
    stopping: CancellationToken,
}

impl Engine {
    /// `new_jobs` is where ingest hands over jobs and notes the sinks it created others for.
    pub fn new(
        store: Store,
        plan: Arc<ArcSwap<Plan>>,
        new_jobs: Arc<NewJobs>,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
        (silences, health, notices): (Arc<Silences>, Arc<Health>, Arc<Notices>),
    ) -> Self {
        Self {
            store,
            plan,
            new_jobs,
            clock,
            metrics,
            silences,
            health,
            notices,
            turns: Arc::default(),
            stopping: CancellationToken::new(),
        }
    }

    /// A counter of the engine's turns, which it advances at least every half second while
    /// it runs: it stops only when the engine is stuck.
    pub fn heartbeat(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.turns)
    }

    /// Runs until `stop` is cancelled, then returns the attempts in progress for the caller
    /// to let finish (see [`drain`]). Attempts not yet at their sink give up: their jobs stay
    /// due, for the next start or (on PostgreSQL) another replica.
    ///
    /// Each turn asks only the sinks that can have work: those with new jobs, and those the
    /// last look at the whole queue found due, for as long as they keep finding jobs. The
    /// whole queue (digests, retries coming due, re-queued jobs, removed sinks) is looked at
    /// when it said something would be due, and at least every `POLL`. Under a flood a turn
    /// comes with every few deliveries, and reading the whole queue each time held delivery
    /// back (measured: benches/LOG.md).
    ///
    /// Every wait (the next look, a retry or digest coming due, a batch's linger) is a
    /// deadline on the engine's [`Clock`], so a test moves time instead of sleeping.
    pub async fn run(self, stop: CancellationToken) -> JoinSet<()> {
        let mut turns = Turns::new(self.clock.now());
        while !stop.is_cancelled() {
            let next = self.turn(&mut turns).await;
            let running = &mut turns.running;
            tokio::select! {
                () = self.new_jobs.wake.notified() => {}
                () = self.clock.sleep_until(next) => {}
                Some(_) = running.join_next() => while running.try_join_next().is_some() {},
                () = stop.cancelled() => {}
            }
        }
        self.stopping.cancel();
        turns.running
    }

    /// One turn: starts what is due and what was handed over, as far as each sink has room.
    /// Returns when the next is due, unless the engine is woken before.
    async fn turn(&self, turns: &mut Turns) -> Timestamp {
        self.turns.fetch_add(1, Ordering::Relaxed);
        let plan = self.plan.load_full();
        // Every sink's share, and what this daemon holds of it, kept current whether or not
        // it has work now: another replica may be waiting for the calls it lets go.
        for sink in plan.sinks.values() {
            if turns.limits.contains_key(&sink.name) {
                self.limits_for(&mut turns.limits, sink);
            }
        }
        let mut sinks = self.new_jobs.take();
        if self.clock.now() >= turns.next_look {
            (turns.next_look, turns.active) = self
                .look(&plan, &mut turns.limits, &mut turns.running)
                .await;
        } else {
            sinks.extend(turns.active.drain());
        }
        for name in sinks {
            let Some(sink) = plan.sinks.get(&name).filter(|s| s.digest.is_none()) else {
                continue; // a digest, or a removed sink: the next look sees to it
            };
            let limit = self.limits_for(&mut turns.limits, sink);
            if self.start(&plan, sink, limit, &mut turns.running).await != Some(0) {
                turns.active.insert(name);
            }
        }
        let mut next = turns.next_look.min(self.clock.now() + POLL);
        let handed = self.start_handed(&plan, &mut turns.limits, &mut turns.running);
        if let Some(lingering) = handed.await {
            next = next.min(lingering);
        }
        next
    }

    /// Starts the handed-over jobs each sink has room for. A batching sink's jobs wait up to
    /// [`LINGER`] for a full batch; returns when the first of those is due. Jobs of a sink
    /// whose whole concurrency other replicas hold are let go, for them to take.
    async fn start_handed(
        &self,
        plan: &Arc<Plan>,
        limits: &mut HashMap<String, Limits>,
        running: &mut JoinSet<()>,
    ) -> Option<Timestamp> {
        let now = self.clock.now();
        let mut lingering: Option<Timestamp> = None;
        for (name, waiting, oldest) in self.new_jobs.handed_sinks() {
            let Some(sink) = plan.sinks.get(&name).filter(|s| s.digest.is_none()) else {
                self.new_jobs.release(&name);
                continue;
            };
            let ready = oldest + LINGER;
            if waiting < sink.batch && ready > now {
                lingering = Some(lingering.map_or(ready, |at| at.min(ready)));
                continue;
            }
            let limits = self.limits_for(limits, sink);
            // A paused sink's jobs wait in the database, for its probe or its resume.
            if limits.concurrency == 0 || self.health.paused(&name, now).is_some() {
                let jobs = self.new_jobs.release(&name);
                if let Err(err) = self.store.release(jobs).await {
                    tracing::warn!(sink = %name, error = %err, "cannot let go of handed-over jobs; they are released when this daemon stops");
                }
                continue;
            }
            let room = limits.claimed.available().min(waiting);
            if room == 0 {
                continue; // woken again when a running attempt ends
            }
            let Some(reserved) = limits.claimed.try_take(room) else {
                continue;
            };
            let jobs = self.new_jobs.take_handed(&name, room);
            self.launch(plan, sink, limits, jobs, reserved, running);
        }
        lingering
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
                return (self.clock.now() + POLL, HashSet::new());
            }
        };
        let now = self.clock.now();
        let mut next = now + POLL;
        let mut active = HashSet::new();
        for (name, summary) in due {
            let Some(sink) = plan.sinks.get(&name) else {
                self.bury_orphans(&name).await;
                continue;
            };
            let ready = match sink.digest {
                Some(window) => crate::store::digest_due(summary.oldest, window),
                None => summary.next_due,
            }
            .max(summary.next_due);
            if ready > now {
                next = next.min(ready);
                continue;
            }
            let started = self
                .start(plan, sink, self.limits_for(limits, sink), running)
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
    /// (A step in the life of a job: the module docs.)
    async fn bury_orphans(&self, sink: &str) {
        // Every job of the sink, however far off its next try.
        let due = self.store.due_jobs(
            sink,
            DIGEST_LIMIT,
            Gather::Each,
            Timestamp::MAX,
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
        let mut dead = Vec::new();
        let outcomes = jobs
            .into_iter()
            .map(|due| {
                dead.extend(dead_letter(&due.job, due.event.as_ref(), &error));
                let outcome = AttemptOutcome::Dead {
                    error: error.clone(),
                    response: String::new(),
                };
                (due.job, outcome)
            })
            .collect();
        let now = self.clock.now();
        let recorded = finish(&self.store, &self.metrics, sink, outcomes, now, now).await;
        tell_dead(&self.notices, dead, recorded, now);
    }

    /// `sink`'s limits: this daemon's share of its concurrency (all of it unless replicas
    /// share it), resized when a reload or the replicas changed it.
    fn limits_for<'a>(
        &self,
        limits: &'a mut HashMap<String, Limits>,
        sink: &NamedSink,
    ) -> &'a Limits {
        let concurrency = self.store.share(&sink.name, sink.delivery.concurrency);
        let limit = limits
            .entry(sink.name.clone())
            .or_insert_with(|| Limits::new(concurrency));
        if limit.concurrency != concurrency {
            limit.resize(concurrency);
        }
        self.store.hold(&sink.name, concurrency.max(limit.calls()));
        limit
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
        let (count, reserve, gather) = match sink.digest {
            Some(_) if limits.running.available() == 0 => return None,
            Some(window) => (DIGEST_LIMIT, 1, Gather::Digest(window)),
            None => {
                let room = limits.claimed.available();
                let gather = if sink.grouped {
                    Gather::Groups
                } else {
                    Gather::Each
                };
                (room, room, gather)
            }
        };
        if reserve == 0 {
            return None;
        }
        // A paused sink makes no attempt but its probe: one job (or one digest), claimed only
        // by a daemon with room to make it.
        let (count, reserve) = match self.health.probe(&self.store, sink, self.clock.now()).await {
            Some(false) => return None,
            Some(true) if sink.digest.is_none() => (1, 1),
            _ => (count, reserve),
        };
        // Places reserved before claiming, so every claimed job is sure of one.
        let reserved = limits.claimed.try_take(reserve)?;
        let due = self.store.due_jobs(
            &sink.name,
            count,
            gather,
            self.clock.now(),
            self.new_jobs.held.snapshot(),
        );
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
        mut reserved: limits::Pass,
        running: &mut JoinSet<()>,
    ) {
        // A digest is one call holding one place; a group's jobs go in calls of their own, up
        // to the route's `max`; otherwise up to `batch` jobs go in a call, each holding its
        // own place.
        let per_call = if sink.digest.is_some() {
            DIGEST_LIMIT
        } else {
            sink.batch
        };
        // A digest holds every job of its sink, grouped or not: one call.
        let by_group = sink.digest.is_none();
        let group_max = |route: &str| plan.routing.group_max(route);
        for batch in sink_calls(jobs, per_call, by_group.then_some(&group_max)) {
            let claimed = reserved.split(if sink.digest.is_some() {
                1
            } else {
                batch.len()
            });
            let slot = limits.running.queue();
            let calls = Arc::clone(&limits.calls);
            let (store, plan, sink) = (self.store.clone(), Arc::clone(plan), sink.clone());
            let (held, clock, metrics, silences, stopping) = (
                self.new_jobs.held.clone(),
                Arc::clone(&self.clock),
                Arc::clone(&self.metrics),
                Arc::clone(&self.silences),
                self.stopping.clone(),
            );
            let (health, notices) = (Arc::clone(&self.health), Arc::clone(&self.notices));
            running.spawn(async move {
                let ids: Vec<i64> = batch.iter().map(|due| due.job.id).collect();
                let slot = tokio::select! {
                    biased;
                    () = stopping.cancelled() => return,
                    slot = slot => slot,
                };
                let Some(slot) = slot else {
                    return; // never closed
                };
                let call = limits::Call::start(calls);
                let context = Context {
                    clock: &*clock,
                    metrics: &metrics,
                    silences: &silences,
                    health: &health,
                    notices: &notices,
                };
                let recorded = attempt(context, &store, &plan, &sink, batch, slot).await;
                drop(call);
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

/// Splits claimed jobs into sink calls: with `group_max`, each group's jobs (by route and
/// key, in the order they came) in calls of at most its route's `max`; the others `per_call`
/// at a time.
fn sink_calls(
    jobs: Vec<DueJob>,
    per_call: usize,
    group_max: Option<&dyn Fn(&str) -> usize>,
) -> Vec<Vec<DueJob>> {
    // Runs of jobs that may share a call, each with its most per call: one per group (keyed
    // by route and group key), and one of everything else (keyed `None`).
    type Run = (Option<(String, String)>, usize, Vec<DueJob>);
    let mut runs: Vec<Run> = Vec::new();
    for due in jobs {
        let (key, most) = match (&due.job.group, group_max) {
            (Some(key), Some(max)) => {
                let route = &due.job.route;
                (Some((route.clone(), key.clone())), max(route))
            }
            _ => (None, per_call),
        };
        match runs.iter_mut().find(|(of, ..)| *of == key) {
            Some((.., members)) => members.push(due),
            None => runs.push((key, most, vec![due])),
        }
    }
    // Groups first, in the order they came.
    runs.sort_by_key(|(key, ..)| key.is_none());
    let mut calls = Vec::new();
    for (_, most, members) in runs {
        let mut members = members.into_iter().peekable();
        while members.peek().is_some() {
            calls.push(members.by_ref().take(most.max(1)).collect());
        }
    }
    calls
}

/// Lets the attempts a stopped engine returned finish and record their outcomes until
/// `deadline`, then abandons the rest (their jobs stay due and are attempted again). A sink
/// that was called is answered and its outcome kept, so a graceful stop (a rolling restart)
/// repeats nothing; only a crash or a sink slower than the deadline can.
pub async fn drain(mut attempts: JoinSet<()>, deadline: tokio::time::Instant) {
    let finished = tokio::time::timeout_at(deadline, async {
        while attempts.join_next().await.is_some() {}
    });
    if finished.await.is_err() {
        tracing::warn!(
            attempts = attempts.len(),
            "shutdown_timeout reached: abandoning attempts in progress (their jobs are attempted again)"
        );
        attempts.abort_all();
    }
}

/// What the engine carries from one turn to the next.
struct Turns {
    limits: HashMap<String, Limits>,
    /// The attempts in progress.
    running: JoinSet<()>,
    /// When to look at the whole queue again.
    next_look: Timestamp,
    /// Sinks that found jobs in their last read, and may have more.
    active: HashSet<String>,
}

impl Turns {
    fn new(now: Timestamp) -> Self {
        Self {
            limits: HashMap::new(),
            running: JoinSet::new(),
            next_look: now,
            active: HashSet::new(),
        }
    }
}

#[cfg(test)]
mod tests;
