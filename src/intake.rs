//! Accepting a verified event, the one step between the HTTP edge and everything behind it:
//! route it, store it durably with its routing outcome (jobs, throttle windows, suppressed
//! routes) and its dedupe check, then hand its new jobs to the delivery engine. The HTTP
//! handler calls [`Intake::accept`] once and only speaks HTTP; this module decides nothing
//! about requests.
//!
//! The hand-over: new jobs of sinks that take them ([`NewJobs::handoff`]) go to the engine in
//! memory, with their event, once the write is on disk, so the engine never reads back what
//! was just written. Their rows are the durable copy, written due only after a grace period
//! ([`crate::delivery::HANDOFF_GRACE`]) in case the hand-over never happens; a restart makes
//! them due at once.

use std::sync::Arc;

use arc_swap::ArcSwap;
use jiff::Timestamp;

use crate::delivery::{Health, NewJobs};
use crate::dispatch::{self, Plan, Routed};
use crate::event::Event;
use crate::metrics::Metrics;
use crate::notice::Notices;
use crate::silence::Silences;
use crate::store::{Inserted, Quiet, RouteTo, Store, StoreError};

/// What became of an accepted event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Accepted {
    /// Stored for good, with this id; `jobs` deliveries are on their way.
    New { id: i64, jobs: usize },
    /// Seen before; the first copy's id. Nothing was stored or dispatched again.
    Duplicate(i64),
}

/// Routes, stores and hands over events; cheap to clone.
#[derive(Clone)]
pub struct Intake {
    store: Store,
    /// Routes and sinks; swapped by a reload.
    plan: Arc<ArcSwap<Plan>>,
    /// Where new jobs go to the delivery engine.
    new_jobs: Arc<NewJobs>,
    metrics: Arc<Metrics>,
    /// The silences in force, kept fresh from the database.
    silences: Arc<Silences>,
    /// Paused sinks take no hand-overs: their jobs wait in the database.
    health: Arc<Health>,
    /// Told how each commit went (a storage outage is an internal event).
    notices: Arc<Notices>,
}

impl Intake {
    pub fn new(
        store: Store,
        plan: Arc<ArcSwap<Plan>>,
        new_jobs: Arc<NewJobs>,
        metrics: Arc<Metrics>,
        (silences, health, notices): (Arc<Silences>, Arc<Health>, Arc<Notices>),
    ) -> Self {
        Self {
            store,
            plan,
            new_jobs,
            metrics,
            silences,
            health,
            notices,
        }
    }

    /// Where the daemon tells what it notices about itself.
    pub fn notices(&self) -> &Notices {
        &self.notices
    }

    /// Stores `event` (its raw `body` as signed), received at `now`, unless its delivery id
    /// was seen; routes it in the same transaction and hands its new jobs over. Returns once
    /// the event is durable.
    ///
    /// # Errors
    /// [`StoreError`] when it could not be stored: nothing was, and the sender should retry.
    pub async fn accept(
        &self,
        event: Event,
        body: &[u8],
        now: Timestamp,
    ) -> Result<Accepted, StoreError> {
        let (routes, unevaluated, handoff, slow) = {
            let plan = self.plan.load();
            let Routed {
                to: mut routes,
                unevaluated,
            } = dispatch::route(&plan.routing, &event, now);
            if !self.silences.is_empty() {
                for to in &mut routes {
                    silence(&self.silences, to, &event, now);
                }
            }
            let handoff = self
                .new_jobs
                .handoff(&plan, due_now(&routes), now, |sink, c| {
                    if self.health.paused(sink, now).is_some() {
                        0
                    } else {
                        self.store.share(sink, c)
                    }
                });
            (routes, unevaluated, handoff, plan.internal.storage_slow)
        };
        let unrouted = routes.is_empty();
        // The sinks whose new jobs the engine reads from the database: it reads only those it
        // is told have work.
        let stored_for: Vec<String> = due_now(&routes)
            .filter(|sink| !handoff.sinks.contains(sink))
            .cloned()
            .collect();
        // Routes that set jobs aside, and how: said once the event is stored (a duplicate
        // sets nothing aside).
        let quieted: Vec<(String, Quiet)> = routes
            .iter()
            .filter_map(|to| Some((to.route.clone(), to.quiet.first()?.1.clone())))
            .collect();
        let committing = std::time::Instant::now();
        let inserted = self.store.insert(&event, body, now, routes, handoff).await;
        let took = committing.elapsed();
        self.notices.commit(
            inserted.as_ref().map(|_| took).map_err(ToString::to_string),
            slow,
            now,
        );
        let inserted = inserted?;
        let (source, event_type, delivery_id) =
            (&event.source, &event.event_type, &event.delivery_id);
        match inserted {
            Inserted::New {
                id,
                jobs,
                handed,
                suppressed,
            } => {
                if jobs > handed.len() {
                    self.new_jobs.add(stored_for.iter().map(String::as_str));
                }
                for (route, reason) in &unevaluated {
                    tracing::info!(event_id = id, %delivery_id, %source, %event_type, %route, %reason, "route condition could not be evaluated");
                }
                if unrouted {
                    self.metrics.unrouted(source);
                    tracing::info!(event_id = id, %delivery_id, %source, %event_type, "no route matched");
                }
                for (route, quiet) in &quieted {
                    // A throttled route created nothing, quiet or not.
                    if suppressed.contains(route) {
                        continue;
                    }
                    match quiet {
                        Quiet::Silenced(silence) => {
                            self.metrics.silenced(route);
                            tracing::info!(event_id = id, %delivery_id, %source, %event_type, %route, silence, "silenced");
                        }
                        Quiet::Muted(why) => {
                            self.metrics.muted(route);
                            tracing::info!(event_id = id, %delivery_id, %source, %event_type, %route, muted = %why, "muted");
                        }
                    }
                }
                for route in suppressed {
                    self.metrics.suppressed(&route);
                    tracing::info!(event_id = id, %delivery_id, %source, %event_type, %route, "suppressed by throttle");
                }
                self.new_jobs.hand_over(handed, event);
                Ok(Accepted::New { id, jobs })
            }
            Inserted::Duplicate(id) => Ok(Accepted::Duplicate(id)),
        }
    }
}

/// The sinks of `routes` whose new jobs are due at once: neither set aside nor waiting for
/// their group (the engine's look at the queue finds a group when it is due).
fn due_now(routes: &[RouteTo]) -> impl Iterator<Item = &String> {
    routes
        .iter()
        .filter(|to| to.group.is_none())
        .flat_map(|to| to.sinks.iter().filter(|sink| to.quiet_for(sink).is_none()))
}

/// Sets aside the sinks of `to` an active silence keeps `event` from (those a mute window
/// has not already).
fn silence(silences: &Silences, to: &mut RouteTo, event: &Event, now: Timestamp) {
    let silenced: Vec<(String, Quiet)> = to
        .sinks
        .iter()
        .filter(|sink| to.quiet_for(sink).is_none())
        .filter_map(|sink| {
            let id = silences.matching(&to.route, sink, event, now)?;
            Some((sink.clone(), Quiet::Silenced(id)))
        })
        .collect();
    to.quiet.extend(silenced);
}
