//! Events as the writer stores them: the insert with its dedupe check and routing outcome (jobs,
//! throttle windows, suppressed routes) in one transaction, and reading rows back as events.

use rusqlite::{OptionalExtension, Transaction, params};

use super::dedupe::Recent;
use super::{Inserted, Job, NewEvent, StoredEvent, from_ms};
use crate::event::{Event, Payload};
use crate::store::JobStatus;

/// Stores `event` unless its delivery id was seen, and applies its routing.
pub(super) fn insert(
    tx: &Transaction<'_>,
    recent: &mut Recent,
    event: &NewEvent,
) -> rusqlite::Result<Inserted> {
    if let Some(first) = recent.seen(tx, &event.source, &event.delivery_id)? {
        return Ok(Inserted::Duplicate(first));
    }
    tx.prepare_cached(
        "INSERT INTO events (source, delivery_id, event_type, occurred_at, received_at, sender_delivery, payload,
                             unrouted)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![
        event.source,
        event.delivery_id,
        event.event_type,
        event.occurred_at,
        event.received_at,
        event.sender_delivery,
        event.body,
        event.routes.is_empty().then_some(1),
    ])?;
    let id = tx.last_insert_rowid();
    recent.stage(&event.source, &event.delivery_id, id, event.received_at);
    let (jobs, handed, suppressed) = apply_routes(tx, id, event)?;
    Ok(Inserted::New {
        id,
        jobs,
        handed,
        suppressed,
    })
}

/// A routing outcome that creates no job, as recorded in `dispatches`.
const SUPPRESSED: &str = "suppressed";

/// Creates a new event's jobs, one per sink of every route that takes it, unless the route's
/// throttle suppresses it; records what created no job. Returns how many jobs it created,
/// those for handed-over sinks, and the suppressing routes.
fn apply_routes(
    tx: &Transaction<'_>,
    event_id: i64,
    event: &NewEvent,
) -> rusqlite::Result<(usize, Vec<Job>, Vec<String>)> {
    // An event no route takes is flagged on its own row (`unrouted`), not given a row
    // elsewhere: taking no route can be the common case.
    if event.routes.is_empty() {
        return Ok((0, Vec::new(), Vec::new()));
    }
    let mut record = tx.prepare_cached(
        "INSERT INTO dispatches (event_id, route, status, detail, at) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    let mut job = tx.prepare_cached(
        "INSERT INTO jobs (event_id, route, sink, status, next_attempt_at, created_at, updated_at, quieted_by)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6, ?7)",
    )?;
    let (mut jobs, mut handed, mut suppressed) = (0, Vec::new(), Vec::new());
    for to in &event.routes {
        if let Some((key, window)) = &to.throttle
            && !admit_throttled(tx, &to.route, key, *window, event.occurred_ms)?
        {
            record.execute(params![
                event_id,
                to.route,
                SUPPRESSED,
                key,
                event.received_at
            ])?;
            suppressed.push(to.route.clone());
            continue;
        }
        for sink in &to.sinks {
            let quiet = to.quiet_for(sink);
            if let Some(quiet) = quiet {
                let (status, by) = (quiet.status(), quiet.by());
                let at = event.received_at;
                job.execute(params![
                    event_id,
                    to.route,
                    sink,
                    status.as_str(),
                    at,
                    at,
                    by
                ])?;
                continue;
            }
            let hand = event.handoff.sinks.contains(sink);
            let due = if hand {
                event.handoff.fallback.as_millisecond()
            } else {
                event.received_at
            };
            let (pending, at) = (JobStatus::Pending.as_str(), event.received_at);
            job.execute(params![
                event_id,
                to.route,
                sink,
                pending,
                due,
                at,
                None::<String>
            ])?;
            jobs += 1;
            if hand {
                handed.push(Job {
                    id: tx.last_insert_rowid(),
                    event_id,
                    route: to.route.clone(),
                    sink: sink.clone(),
                    attempt: 1,
                    created_at: from_ms(event.received_at),
                });
            }
        }
    }
    Ok((jobs, handed, suppressed))
}

/// Whether `route`'s throttle lets an event at `at_ms` through for `key`; if so, keeps the
/// window it opened.
fn admit_throttled(
    tx: &Transaction<'_>,
    route: &str,
    key: &str,
    window: std::time::Duration,
    at_ms: i64,
) -> rusqlite::Result<bool> {
    let started: Option<i64> = tx
        .prepare_cached("SELECT started_at FROM throttles WHERE route = ?1 AND key = ?2")?
        .query_row(params![route, key], |row| row.get(0))
        .optional()?;
    let Some(start) = crate::rules::throttle::admit(started.map(from_ms), from_ms(at_ms), window)
    else {
        return Ok(false);
    };
    let window_ms = i64::try_from(window.as_millis()).unwrap_or(i64::MAX);
    tx.prepare_cached(
        "INSERT INTO throttles (route, key, started_at, window_ms) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (route, key) DO UPDATE SET started_at = excluded.started_at, window_ms = excluded.window_ms",
    )?
    .execute(params![route, key, start.as_millisecond(), window_ms])?;
    Ok(true)
}

pub(super) fn row_to_event(row: &rusqlite::Row<'_>) -> rusqlite::Result<StoredEvent> {
    event_at(row, 0)
}

/// The `event_columns!()`, starting at column `first`.
pub(super) fn event_at(row: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<StoredEvent> {
    let payload = row.get_ref(first + 7)?.as_blob()?;
    let received_at: i64 = row.get(first + 5)?;
    let occurred_at: Option<String> = row.get(first + 4)?;
    Ok(StoredEvent {
        id: row.get(first)?,
        received_at: from_ms(received_at),
        event: Event {
            source: row.get(first + 1)?,
            delivery_id: row.get(first + 2)?,
            event_type: row.get(first + 3)?,
            occurred_at: occurred_at.and_then(|t| t.parse().ok()),
            sender_delivery: row.get(first + 6)?,
            // Stored only after it parsed, so this holds JSON; `Null` guards a damaged row.
            payload: crate::store::body::unpack(payload)
                .and_then(|body| Payload::from_slice(&body).ok())
                .unwrap_or_default(),
        },
    })
}
