//! Events as the writer stores them: the insert with its dedupe check and routing outcome (jobs,
//! throttle windows, suppressed routes) in one transaction, and reading rows back as events.

use rusqlite::{OptionalExtension, Transaction, params};

use super::dedupe::Recent;
use super::{Inserted, Job, NewEvent, StoredEvent, from_ms};
use crate::event::{Event, Payload};
use crate::store::{GroupTo, JobStatus};

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
    let mut grouped = tx.prepare_cached(
        "INSERT INTO jobs (event_id, route, sink, status, next_attempt_at, created_at, updated_at, group_key)
         VALUES (?1, ?2, ?3, 'pending', ?4, ?5, ?5, ?6)",
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
            if let Some(group) = &to.group {
                let due = group_due(tx, (&to.route, sink), group, event.received_at)?;
                let at = event.received_at;
                grouped.execute(params![event_id, to.route, sink, due, at, group.key])?;
                jobs += 1;
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
                    group: None,
                });
            }
        }
    }
    Ok((jobs, handed, suppressed))
}

/// When a new job of `group` through `route` to `sink`, received at `at` (unix milliseconds),
/// is due: by its group's newest job ([`crate::rules::group::due`]).
fn group_due(
    tx: &Transaction<'_>,
    (route, sink): (&str, &str),
    group: &GroupTo,
    at: i64,
) -> rusqlite::Result<i64> {
    let latest: Option<(i64, bool)> = tx
        .prepare_cached(
            "SELECT next_attempt_at, status IN ('pending', 'failed') FROM jobs INDEXED BY jobs_group
             WHERE sink = ?1 AND route = ?2 AND group_key = ?3 ORDER BY id DESC LIMIT 1",
        )?
        .query_row(params![sink, route, group.key], |row| {
            Ok((row.get(0)?, row.get(1)?))
        })
        .optional()?;
    let latest = latest.map(|(due, waiting)| (from_ms(due), waiting));
    let due = crate::rules::group::due(latest, from_ms(at), group.wait, group.interval);
    Ok(due.as_millisecond())
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
