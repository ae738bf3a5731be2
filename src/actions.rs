//! What an operator does to deliveries while the daemon runs (replay an event, retry a failed
//! job, re-queue a dead letter, preview a silence), decided once for the command line and the
//! status page, so both refuse the same things for the same reasons. Each works through the
//! operator's queries ([`Tools`]) and today's configuration.

use jiff::Timestamp;
use serde::Serialize;

use crate::config::Config;
use crate::silence::Compiled;
use crate::store::admin::{JobState, Tools};
use crate::store::{JobStatus, NewSilence, Silence, StoreError};
use crate::text::printable;

/// Why an action did nothing.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("no event {0}")]
    NoEvent(i64),
    #[error("no sink named {0:?} in the configuration")]
    NoSink(String),
    /// A second job for a sink that still has one waiting would deliver the event twice.
    #[error("event {event} already has a job waiting for {}", sinks(.waiting))]
    Twice { event: i64, waiting: Vec<JobState> },
    #[error("no route matches event {0}; nothing queued (name a sink)")]
    NoRoute(i64),
    /// The job is not in a state the action takes; says which action would do what was meant.
    #[error("{0}")]
    NotRetried(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn sinks(jobs: &[JobState]) -> String {
    jobs.iter()
        .map(|job| {
            format!(
                "sink \"{}\" (job {}, {})",
                printable(&job.sink),
                job.id,
                standing(job)
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A job an action queued.
#[derive(Debug, Clone, Serialize)]
pub struct Queued {
    pub job: i64,
    pub route: String,
    pub sink: String,
}

/// Queues event `event_id` again through today's routes (or to `only` that sink). Throttles,
/// silences and mute windows are not applied to what an operator asks for. Refused, unless
/// `force`, when a sink it would go to still has a job of that event waiting.
///
/// # Errors
/// What was refused, or a database error.
pub fn replay(
    tools: &mut Tools,
    config: &Config,
    event_id: i64,
    only: Option<&str>,
    force: bool,
) -> Result<Vec<Queued>, Refused> {
    let Some(detail) = tools.show(event_id)? else {
        return Err(Refused::NoEvent(event_id));
    };
    let now = Timestamp::now();
    let mut pairs: Vec<(String, String)> =
        crate::dispatch::route(&config.routing, &detail.stored.event, now)
            .to
            .into_iter()
            .flat_map(|to| {
                let route = to.route;
                to.sinks.into_iter().map(move |sink| (route.clone(), sink))
            })
            .filter(|(_, sink)| only.is_none_or(|only| only == sink))
            .collect();
    if let Some(sink) = only {
        if !config.sinks.iter().any(|s| s.name == sink) {
            return Err(Refused::NoSink(sink.to_owned()));
        }
        if pairs.is_empty() {
            pairs.push(("replay".into(), sink.to_owned()));
        }
    }
    pairs.dedup();
    let waiting: Vec<JobState> = tools
        .waiting_jobs(event_id)?
        .into_iter()
        .filter(|job| pairs.iter().any(|(_, sink)| *sink == job.sink))
        .collect();
    if !force && !waiting.is_empty() {
        return Err(Refused::Twice {
            event: event_id,
            waiting,
        });
    }
    if pairs.is_empty() {
        return Err(Refused::NoRoute(event_id));
    }
    let ids = tools.enqueue(event_id, &pairs)?;
    Ok(pairs
        .into_iter()
        .zip(ids)
        .map(|((route, sink), job)| Queued { job, route, sink })
        .collect())
}

/// Makes failed job `job_id` due now; it keeps its attempts.
///
/// # Errors
/// The job is not failed (with what would do what was meant), or a database error.
pub fn retry(tools: &Tools, job_id: i64) -> Result<JobState, Refused> {
    if tools.retry_now(job_id)?
        && let Some(job) = tools.job(job_id)?
    {
        return Ok(job);
    }
    Err(Refused::NotRetried(not_retried(tools, job_id)?))
}

/// Re-queues dead letters with fresh attempts: one job, or every one of `jobs` (all of them
/// when `None`). Returns how many were re-queued.
///
/// # Errors
/// A single job that is not dead (with what would do what was meant), or a database error.
pub fn retry_dead(tools: &Tools, jobs: Option<&[i64]>) -> Result<usize, Refused> {
    match jobs {
        None => Ok(tools.retry_dead(None)?),
        Some([one]) => match tools.retry_dead(Some(*one))? {
            0 => Err(Refused::NotRetried(not_retried(tools, *one)?)),
            count => Ok(count),
        },
        Some(jobs) => jobs
            .iter()
            .try_fold(0, |count, job| Ok(count + tools.retry_dead(Some(*job))?)),
    }
}

/// Why job `id` was not retried, and the command that does what was meant: the id may be an
/// event's, or the job may be in another state than the command takes.
fn not_retried(tools: &Tools, id: i64) -> Result<String, StoreError> {
    let Some(job) = tools.job(id)? else {
        let hint = if tools.show(id)?.is_some() {
            format!("; event {id} exists: `hookroute deliveries show {id}` lists its jobs")
        } else {
            String::new()
        };
        return Ok(format!("no job {id}{hint}"));
    };
    let what = match job.status {
        JobStatus::Failed => format!("`hookroute retry {id}` tries it now"),
        JobStatus::Dead => {
            format!("`hookroute dead-letter retry {id}` re-queues it with fresh attempts")
        }
        JobStatus::Pending => "it is due now, or being delivered".to_owned(),
        JobStatus::Succeeded | JobStatus::Silenced | JobStatus::Muted => format!(
            "`hookroute replay {} --sink {}` delivers its event {}",
            job.event_id,
            printable(&job.sink),
            if job.status == JobStatus::Succeeded {
                "again"
            } else {
                "now"
            }
        ),
    };
    let is = match job.status {
        JobStatus::Succeeded => "has succeeded".to_owned(),
        _ => format!("is {}", standing(&job)),
    };
    Ok(format!("job {id} {is}: {what}"))
}

/// A job's status as the hints give it: a failed one with its next try.
pub fn standing(job: &JobState) -> String {
    match &job.next_attempt_at {
        Some(next) => format!("{}, next try at {next}", job.status),
        None => job.status.to_string(),
    }
}

/// A delivery a silence would have kept quiet.
#[derive(Debug, Clone, Serialize)]
pub struct WouldSilence {
    pub event_id: i64,
    pub received_at: String,
    pub source: String,
    #[serde(rename = "type")]
    pub event_type: String,
    pub route: String,
    pub sink: String,
}

/// Which of the last `last` stored events `new` would have kept from which (route, sink), by
/// today's routes: what routing does with it from now on. Stores nothing. Returns the
/// matches and how many events were looked at.
///
/// # Errors
/// On a database error.
pub fn preview(
    tools: &Tools,
    config: &Config,
    new: NewSilence,
    last: usize,
) -> Result<(Vec<WouldSilence>, usize), StoreError> {
    let silence = Compiled::new(Silence {
        id: 0,
        matchers: new.matchers,
        starts_at: new.starts_at,
        ends_at: new.ends_at,
        comment: new.comment,
        author: new.author,
        created_at: Timestamp::now(),
    });
    let events = tools.recent_events(last)?;
    let mut matched = Vec::new();
    for stored in &events {
        let routed = crate::dispatch::route(&config.routing, &stored.event, stored.received_at);
        for to in routed.to {
            for sink in &to.sinks {
                if silence.matches(&to.route, sink, &stored.event) {
                    matched.push(WouldSilence {
                        event_id: stored.id,
                        received_at: stored.received_at.to_string(),
                        source: stored.event.source.clone(),
                        event_type: stored.event.event_type.clone(),
                        route: to.route.clone(),
                        sink: sink.clone(),
                    });
                }
            }
        }
    }
    Ok((matched, events.len()))
}
