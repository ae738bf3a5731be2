//! The hand-over inbox: where ingest leaves new jobs for the engine, with their events, and
//! notes which sinks have new jobs in the database; and which jobs the engine holds.
//!
//! A job handed over is held from that moment ([`Held`]) until its outcome is recorded, and
//! left out of every read of due jobs meanwhile, so the engine is never given the same job
//! twice: once from the hand-over and again from its row.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use jiff::Timestamp;
use tokio::sync::Notify;

use super::{HANDOFF_GRACE, HANDOFF_LIMIT};
use crate::dispatch::Plan;
use crate::event::Event;
use crate::store::{DueJob, Handoff, Job};

/// The jobs being attempted, by id: claimed, not yet recorded. A job leaves only once its
/// outcome is in the database, so no read ever finds it due while it is attempted.
#[derive(Clone, Default)]
pub(super) struct Held(Arc<Mutex<HashSet<i64>>>);

impl Held {
    pub(super) fn snapshot(&self) -> HashSet<i64> {
        self.lock().clone()
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<i64>> {
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
    pub(super) held: Held,
    pub(super) wake: Notify,
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
    /// by hand-over: those outside digests whose queue has room, and of which this daemon may
    /// call some (`share` of a sink's concurrency, see
    /// [`Storage::share`](crate::store::Storage::share)).
    pub fn handoff<'a>(
        &self,
        plan: &Plan,
        sinks: impl IntoIterator<Item = &'a String>,
        now: Timestamp,
        share: impl Fn(&str, usize) -> usize,
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
            let open = plan
                .sinks
                .get(sink)
                .is_some_and(|s| s.digest.is_none() && share(sink, s.delivery.concurrency) > 0)
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

    pub(super) fn take(&self) -> HashSet<String> {
        std::mem::take(&mut *self.sinks.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Up to `max` handed-over jobs of `sink`, oldest first.
    pub(super) fn take_handed(&self, sink: &str, max: usize) -> Vec<DueJob> {
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
    pub(super) fn handed_sinks(&self) -> Vec<(String, usize, Timestamp)> {
        let queues = self.handed.lock().unwrap_or_else(|p| p.into_inner());
        queues
            .iter()
            .filter_map(|(sink, queue)| {
                let oldest = queue.front()?.job.created_at;
                Some((sink.clone(), queue.len(), oldest))
            })
            .collect()
    }

    /// Lets go of the jobs handed over for `sink`, which no longer takes them here (a reload
    /// removed it or made it a digest, or other replicas hold its concurrency): their rows
    /// come due and are read as any other. Returns their ids.
    pub(super) fn release(&self, sink: &str) -> Vec<i64> {
        let jobs = self.take_handed(sink, usize::MAX);
        let mut held = self.held.lock();
        jobs.iter()
            .map(|due| {
                held.remove(&due.job.id);
                due.job.id
            })
            .collect()
    }
}
