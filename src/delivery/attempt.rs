//! One attempt: render the messages (off the async threads), call the sink (a panic caught
//! and recorded), decide each job's fate and record it.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures_util::FutureExt as _;
use jiff::Timestamp;

use super::health::Health;
use super::{BACKSTOP_GRACE, retry};
use crate::clock::Clock;
use crate::dispatch::{NamedSink, Plan};
use crate::enrich::Enriched;
use crate::event::Event;
use crate::metrics::{DeliveryOutcome, Metrics};
use crate::notice::{self, DeadLetter, Notice, Notices};
use crate::silence::Silences;
use crate::sinks::{Delivery, SinkError};
use crate::store::{AttemptOutcome, DueJob, Job, Quiet, Store};
use crate::templates::Message;
use crate::text::storable;

/// What an attempt needs besides its jobs: the engine's shared parts.
pub(super) struct Context<'a> {
    pub clock: &'a dyn Clock,
    pub metrics: &'a Metrics,
    pub silences: &'a Silences,
    pub health: &'a Health,
    pub notices: &'a Notices,
}

/// One attempt at delivering `jobs` (one job, or a digest's worth) and its recorded outcome.
/// Returns whether every outcome was recorded.
pub(super) async fn attempt(
    context: Context<'_>,
    store: &Store,
    plan: &Arc<Plan>,
    sink: &NamedSink,
    jobs: Vec<DueJob>,
    slot: super::limits::Pass,
) -> bool {
    let Context {
        clock,
        metrics,
        silences,
        health,
        notices,
    } = context;
    let started = clock.now();
    let mut outcomes = Vec::with_capacity(jobs.len());
    let mut dead = Vec::new();
    let mut live = Vec::with_capacity(jobs.len());
    let mut quiet = Vec::new();
    for DueJob { job, event } in jobs {
        let route_sink = (job.route.as_str(), sink.name.as_str());
        match event {
            Some(event) if !silences.is_empty() => {
                match silences.holding(route_sink, &event, job.created_at, started) {
                    Some(id) => quiet.push((job, Quiet::Silenced(id))),
                    None => live.push((job, event)),
                }
            }
            Some(event) => live.push((job, event)),
            None => {
                let error = "the event is no longer stored".to_owned();
                dead.extend(dead_letter(&job, None, &error));
                let response = String::new();
                outcomes.push((job, AttemptOutcome::Dead { error, response }));
            }
        }
    }
    // A set-aside that could not be recorded leaves those jobs held (as any unrecorded
    // outcome does), not the others: they are still attempted.
    let set_aside = quiet.is_empty() || set_aside(store, &sink.name, quiet, started).await;
    let mut live = enrich(plan, sink, live).await;
    // What could not be enriched, when its route requires it and a retry may do better, is
    // not sent: it fails, to be retried with its job.
    for (job, event, enriched) in live.extract_if(.., |(_, _, enriched)| enriched.retry) {
        let why = enriched.missing.unwrap_or_default();
        let refused = SinkError::transient(format!("not enriched: {why}"));
        let outcome = retry::decide(
            &sink.delivery.retry,
            &job,
            Err(&refused),
            (started, false),
            jitter(),
        );
        if let AttemptOutcome::Dead { error, .. } = &outcome {
            dead.extend(dead_letter(&job, Some(&event), error));
        }
        outcomes.push((job, outcome));
    }
    let Some((prepared, summary)) = prepare(plan, sink, live).await else {
        return false; // the runtime is shutting down: the jobs stay due
    };
    if prepared.is_empty() {
        let recorded = finish(store, metrics, &sink.name, outcomes, started, started).await;
        tell_dead(notices, dead, recorded, started);
        return recorded && set_aside;
    }
    let deliveries: Vec<Delivery<'_>> = prepared
        .iter()
        .map(|(job, event, message, enriched): &Prepared| Delivery {
            job_id: job.id,
            event_id: job.event_id,
            event,
            route: &job.route,
            queued_at: job.created_at,
            message,
            attachments: &enriched.attachments,
        })
        .collect();
    let timeout = sink.delivery.timeout.0;
    // A panic is a bug, but one an event can trigger: caught here it costs that job (a dead
    // letter saying so) instead of leaving it pending, to panic again after every restart.
    let call = AssertUnwindSafe(async {
        match deliveries.as_slice() {
            [one] => sink.sink.deliver(one).await,
            many => sink.sink.deliver_batch(many, &summary).await,
        }
    })
    .catch_unwind();
    let called = std::time::Instant::now();
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
    metrics.attempt(&sink.name, called.elapsed());
    drop(deliveries);
    drop(slot);
    // What the sink answered is a stranger's text, made fit to log and keep once, for every
    // job the call carried: every configured secret taken out (a receiver may quote its URL's
    // token back), and a NUL made storable (PostgreSQL refuses one, and the record would
    // fail, leaving the job leased).
    let clean = |text: &str| storable(&plan.redactor.redact(text)).into_owned();
    let result = match result {
        Ok(answer) => Ok(clean(&answer)),
        Err(err) => Err(err.map_text(clean)),
    };
    let now = clock.now();
    let own_only = prepared
        .iter()
        .all(|(_, event, ..)| event.source == notice::SOURCE);
    let paused = health
        .after_call(
            (store, notices, &plan.internal),
            sink,
            result.as_ref().map(|_| ()),
            own_only,
            now,
        )
        .await;
    // One draw for the call: a group's jobs fail together and are retried together.
    let jitter = jitter();
    let grouped = grouped_note(&prepared);
    for (job, event, message, enriched) in prepared {
        let mut outcome = retry::decide(
            &sink.delivery.retry,
            &job,
            result.as_ref().cloned(),
            (now, paused),
            jitter,
        );
        if let AttemptOutcome::Dead { error, .. } = &outcome {
            dead.extend(dead_letter(&job, Some(&event), error));
        }
        if let Some(why) = message.fallback {
            outcome.note(&clean(&why));
        }
        if let Some(why) = &enriched.missing {
            outcome.note(&clean(&format!("not enriched: {why}")));
        }
        if let Some(grouped) = &grouped {
            outcome.note(grouped);
        }
        if let Some(why) = &summary.fallback {
            outcome.note(&clean(why));
        }
        outcomes.push((job, outcome));
    }
    let recorded = finish(store, metrics, &sink.name, outcomes, started, now).await;
    tell_dead(notices, dead, recorded, now);
    recorded && set_aside
}

/// The notice of `job`'s dead letter, unless its event is hookroute's own: an internal
/// event's failure never makes another.
pub(super) fn dead_letter(job: &Job, event: Option<&Event>, error: &str) -> Option<DeadLetter> {
    if event.is_some_and(|event| event.source == notice::SOURCE) {
        return None;
    }
    Some(DeadLetter {
        job_id: job.id,
        event_id: job.event_id,
        route: job.route.clone(),
        sink: job.sink.clone(),
        error: error.to_owned(),
        event: event.map(|e| {
            (
                e.source.clone(),
                e.event_type.clone(),
                e.delivery_id.clone(),
            )
        }),
    })
}

/// Tells the dead letters of an attempt, once they are `recorded`.
pub(super) fn tell_dead(notices: &Notices, dead: Vec<DeadLetter>, recorded: bool, at: Timestamp) {
    if recorded {
        for letter in dead {
            notices.send(Notice::DeadLetter(letter), at);
        }
    }
}

/// A job ready for its sink: its event, its message and what enrichment fetched for it.
type Prepared = (Job, Event, Message, Enriched);

/// Fetches what each job's route and sink ask the sender's API for (see [`crate::enrich`]),
/// all of them at once, each within its source's wait.
async fn enrich(
    plan: &Plan,
    sink: &NamedSink,
    jobs: Vec<(Job, Event)>,
) -> Vec<(Job, Event, Enriched)> {
    if !plan.enriching {
        return jobs
            .into_iter()
            .map(|(job, event)| (job, event, Enriched::default()))
            .collect();
    }
    let fetches = jobs
        .iter()
        .map(|(job, event)| plan.enricher.enrich(event, plan.wanted(&job.route, sink)));
    let enriched = futures_util::future::join_all(fetches).await;
    jobs.into_iter()
        .zip(enriched)
        .map(|((job, event), enriched)| (job, event, enriched))
        .collect()
}

/// Pairs each job with its message, rendered on a blocking thread: a template works through
/// a stranger's payload, and however bounded (see `templates::FUEL`), that work must not hold
/// up the threads that answer senders or run other attempts. With several jobs of a group or
/// a digest, also the message for them all. `None` only when the runtime is shutting down.
async fn prepare(
    plan: &Arc<Plan>,
    sink: &NamedSink,
    jobs: Vec<(Job, Event, Enriched)>,
) -> Option<(Vec<Prepared>, Message)> {
    if !sink.shows_message {
        let jobs = jobs
            .into_iter()
            .map(|(job, event, enriched)| (job, event, Message::default(), enriched))
            .collect();
        return Some((jobs, Message::default()));
    }
    let (plan, sink) = (Arc::clone(plan), sink.clone());
    let rendered = tokio::task::spawn_blocking(move || {
        let messages: Vec<Prepared> = jobs
            .into_iter()
            .map(|(job, event, enriched)| {
                let message = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    let about = (job.route.as_str(), sink.name.as_str(), sink.kind);
                    plan.routing
                        .message(about, &event, enriched.report.as_ref())
                }))
                .unwrap_or_else(|panic| Message {
                    title: format!("{} from {}", event.event_type, event.source),
                    fallback: Some(format!(
                        "rendering failed on this event (a bug): {}",
                        panic_message(&*panic)
                    )),
                    ..Message::default()
                });
                (job, event, message, enriched)
            })
            .collect();
        let summary = match messages.as_slice() {
            [(first, ..), _, ..] if first.group.is_some() || sink.digest.is_some() => {
                let events: Vec<(&Event, &Message)> =
                    messages.iter().map(|(_, e, m, _)| (e, m)).collect();
                let rendered = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    let about = (first.route.as_str(), first.group.as_deref());
                    let template = plan.routing.group_template(&first.route);
                    plan.routing
                        .templates
                        .render_group(template, about, &events)
                }));
                rendered.unwrap_or_default()
            }
            _ => Message::default(),
        };
        (messages, summary)
    });
    rendered.await.ok()
}

/// Logs an attempt's outcomes and records them; returns whether they were recorded.
pub(super) async fn finish(
    store: &Store,
    metrics: &Metrics,
    sink: &str,
    outcomes: Vec<(Job, AttemptOutcome)>,
    started: Timestamp,
    finished: Timestamp,
) -> bool {
    if outcomes.is_empty() {
        return true;
    }
    for (job, outcome) in &outcomes {
        metrics.delivery(
            sink,
            match outcome {
                AttemptOutcome::Succeeded { .. } => DeliveryOutcome::Succeeded,
                AttemptOutcome::Failed { .. } | AttemptOutcome::Deferred { .. } => {
                    DeliveryOutcome::Failed
                }
                AttemptOutcome::Dead { .. } => DeliveryOutcome::Dead,
            },
        );
        match outcome {
            AttemptOutcome::Succeeded { .. } => {
                tracing::debug!(job_id = job.id, event_id = job.event_id, %sink, route = %job.route, attempt = job.attempt, "delivered");
            }
            AttemptOutcome::Failed {
                error, retry_at, ..
            } => {
                tracing::warn!(job_id = job.id, event_id = job.event_id, %sink, route = %job.route, attempt = job.attempt, %error, %retry_at, "delivery failed; will retry");
            }
            AttemptOutcome::Deferred { error, .. } => {
                tracing::warn!(job_id = job.id, event_id = job.event_id, %sink, route = %job.route, attempt = job.attempt, %error, "delivery failed while the sink is paused; the job waits");
            }
            AttemptOutcome::Dead { error, .. } => {
                tracing::error!(job_id = job.id, event_id = job.event_id, %sink, route = %job.route, attempt = job.attempt, %error, "delivery failed for good (dead letter)");
            }
        }
    }
    match store.finish_attempt(outcomes, started, finished).await {
        Ok(()) => true,
        Err(err) => {
            tracing::error!(%sink, error = %err, "cannot record a delivery attempt");
            false
        }
    }
}

/// What each job of a grouped delivery records of it: which events went together, so
/// `deliveries show` of any of them names the others.
fn grouped_note(prepared: &[Prepared]) -> Option<String> {
    const NAMED: usize = 20;
    let [(first, ..), _, ..] = prepared else {
        return None;
    };
    let key = first.group.as_deref()?;
    let mut ids: Vec<String> = prepared
        .iter()
        .take(NAMED)
        .map(|(job, ..)| job.event_id.to_string())
        .collect();
    if prepared.len() > NAMED {
        ids.push(format!("and {} more", prepared.len() - NAMED));
    }
    Some(format!(
        "one delivery for a group of {} events (route {:?}, group {key}): events {}",
        prepared.len(),
        first.route,
        ids.join(", ")
    ))
}

/// Sets aside jobs a silence added since they were created now holds; returns whether that
/// was recorded (if not, they stay held, as any job whose outcome could not be).
/// (A step in the life of a job: the module docs.)
async fn set_aside(store: &Store, sink: &str, jobs: Vec<(Job, Quiet)>, now: Timestamp) -> bool {
    for (job, quiet) in &jobs {
        tracing::info!(job_id = job.id, event_id = job.event_id, %sink, route = %job.route, quieted_by = %quiet.by(), "silenced while waiting");
    }
    match store.quiet(jobs, now).await {
        Ok(()) => true,
        Err(err) => {
            tracing::error!(%sink, error = %err, "cannot record silenced jobs");
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
