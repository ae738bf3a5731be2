//! Delivery jobs: the reads that find due ones, recording an attempt's outcomes, and making the
//! jobs of an earlier run due again at start-up.

use std::collections::{HashMap, HashSet};

use rusqlite::{Connection, OptionalExtension, Transaction, params};

use super::events::event_at;
use super::{AttemptOutcome, DueJob, DueSummary, Job, Quiet, from_ms};
use crate::metrics::SinkQueue;
use crate::store::digest_due;

/// Records an attempt that started at `started_at` and ended at `at` (unix milliseconds), and
/// moves each of its jobs on.
pub(super) fn record_attempt(
    tx: &Transaction<'_>,
    outcomes: &[(Job, AttemptOutcome)],
    started_at: i64,
    at: i64,
) -> rusqlite::Result<()> {
    let mut update = tx.prepare_cached(
        "UPDATE jobs SET status = ?2, last_error = ?3, response = ?4, next_attempt_at = ?5, updated_at = ?6,
                        attempts = ?7
         WHERE id = ?1 AND status IN ('pending', 'failed')",
    )?;
    let mut record = tx.prepare_cached(
        "INSERT INTO attempts (job_id, number, started_at, finished_at, outcome, error, response)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?;
    for (job, outcome) in outcomes {
        let (status, error, response, next) = outcome.columns(at);
        update.execute(params![
            job.id,
            status.as_str(),
            error,
            response,
            next,
            at,
            outcome.counted(job.attempt)
        ])?;
        record.execute(params![
            job.id,
            job.attempt,
            started_at,
            at,
            status.as_str(),
            error,
            response
        ])?;
    }
    Ok(())
}

/// Sets aside due jobs a silence or a mute window keeps from their sink, at `at` (unix
/// milliseconds): see [`Storage::quiet`](crate::store::Storage::quiet).
pub(super) fn quiet(tx: &Transaction<'_>, jobs: &[(Job, Quiet)], at: i64) -> rusqlite::Result<()> {
    let mut update = tx.prepare_cached(
        "UPDATE jobs SET status = ?2, quieted_by = ?3, updated_at = ?4
         WHERE id = ?1 AND status IN ('pending', 'failed')",
    )?;
    for (job, quiet) in jobs {
        update.execute(params![job.id, quiet.status().as_str(), quiet.by(), at])?;
    }
    Ok(())
}

/// Makes the jobs handed to the delivery engine of an earlier run, and not finished by it, due
/// from when they were created, as any other new job: no engine holds them now. A pending job
/// due after its creation is one of those, since every other pending job is written due at
/// once.
pub(super) fn recover_handed(conn: &Connection) -> rusqlite::Result<()> {
    let n = conn.execute(
        "UPDATE jobs INDEXED BY jobs_due SET next_attempt_at = created_at
         WHERE status IN ('pending', 'failed') AND status = 'pending'
               AND next_attempt_at > created_at",
        [],
    )?;
    if n > 0 {
        tracing::info!(
            jobs = n,
            "jobs handed over before the restart are due again"
        );
    }
    Ok(())
}

/// Up to `limit` due jobs of `sink` with their events, leaving out `held`: see
/// [`Storage::due_jobs`](crate::store::Storage::due_jobs).
pub(super) fn due(
    conn: &Connection,
    sink: &str,
    limit: usize,
    hold: Option<std::time::Duration>,
    now: i64,
    held: &HashSet<i64>,
) -> rusqlite::Result<Vec<DueJob>> {
    if let Some(hold) = hold {
        let oldest: Option<i64> = conn
            .prepare_cached(
                "SELECT created_at FROM jobs INDEXED BY jobs_waiting
                 WHERE sink = ?1 AND status IN ('pending', 'failed') AND next_attempt_at <= ?2
                 ORDER BY created_at LIMIT 1",
            )?
            .query_row(params![sink, now], |row| row.get(0))
            .optional()?;
        if oldest.is_none_or(|oldest| digest_due(from_ms(oldest), hold) > from_ms(now)) {
            return Ok(Vec::new());
        }
    }
    // `LIMIT 0 + ?3`, not `LIMIT ?3`: SQLite plans a bare LIMIT parameter by its value
    // and so re-prepares the statement whenever the limit changes, which here is
    // nearly every time. Held jobs are among the first due, so asking for that many
    // more leaves `limit` after they are skipped.
    let mut stmt = conn.prepare_cached(concat!(
        "SELECT j.id, j.event_id, j.route, j.sink, j.attempts, j.created_at, j.group_key, ",
        event_columns!(),
        " FROM jobs j INDEXED BY jobs_due LEFT JOIN events e ON e.id = j.event_id
         WHERE j.sink = ?1 AND j.status IN ('pending', 'failed') AND j.next_attempt_at <= ?2
         ORDER BY j.next_attempt_at, j.id LIMIT 0 + ?3"
    ))?;
    let mut rows = stmt.query(params![sink, now, (limit + held.len()) as i64])?;
    let mut due = Vec::with_capacity(limit);
    while let Some(row) = rows.next()? {
        if due.len() == limit {
            break;
        }
        let id: i64 = row.get(0)?;
        if held.contains(&id) {
            continue;
        }
        let job = Job {
            id,
            event_id: row.get(1)?,
            route: row.get(2)?,
            sink: row.get(3)?,
            attempt: row.get::<_, u32>(4)?.saturating_add(1),
            created_at: from_ms(row.get(5)?),
            group: row.get(6)?,
        };
        let event = match row.get_ref(7)? {
            rusqlite::types::ValueRef::Null => None,
            _ => Some(event_at(row, 7)?.event),
        };
        due.push(DueJob { job, event });
    }
    Ok(due)
}

/// For each sink with jobs waiting: when the next is due and when the oldest was created.
pub(super) fn waiting(conn: &Connection) -> rusqlite::Result<HashMap<String, DueSummary>> {
    // A skip scan over the sinks with waiting jobs, then two seeks per sink. (A plain
    // GROUP BY reads every waiting job: a backlog made each engine turn slower.)
    let mut stmt = conn.prepare_cached(
        "WITH RECURSIVE waiting(sink) AS (
             SELECT min(sink) FROM jobs INDEXED BY jobs_waiting
             WHERE status IN ('pending', 'failed')
             UNION ALL
             SELECT (SELECT min(sink) FROM jobs INDEXED BY jobs_waiting
                     WHERE status IN ('pending', 'failed') AND sink > waiting.sink)
             FROM waiting WHERE sink IS NOT NULL
         )
         SELECT sink,
                (SELECT min(next_attempt_at) FROM jobs INDEXED BY jobs_due
                 WHERE sink = waiting.sink AND status IN ('pending', 'failed')),
                (SELECT min(created_at) FROM jobs INDEXED BY jobs_waiting
                 WHERE sink = waiting.sink AND status IN ('pending', 'failed'))
         FROM waiting WHERE sink IS NOT NULL",
    )?;
    let rows = stmt.query_map([], |row| {
        Ok((
            row.get::<_, String>(0)?,
            DueSummary {
                next_due: from_ms(row.get(1)?),
                oldest: from_ms(row.get(2)?),
            },
        ))
    })?;
    rows.collect()
}

/// Each sink's waiting jobs (count, oldest creation) and dead letters, for `/metrics`.
pub(super) fn queues(conn: &Connection, now: i64) -> rusqlite::Result<Vec<SinkQueue>> {
    let mut queues: HashMap<String, SinkQueue> = HashMap::new();
    let mut waiting = conn.prepare_cached(
        "SELECT sink, count(*), min(created_at) FROM jobs INDEXED BY jobs_waiting
         WHERE status IN ('pending', 'failed') GROUP BY sink",
    )?;
    let mut rows = waiting.query([])?;
    while let Some(row) = rows.next()? {
        let sink: String = row.get(0)?;
        let oldest: i64 = row.get(2)?;
        let entry = queues.entry(sink.clone()).or_insert_with(|| empty(sink));
        entry.waiting = row.get::<_, i64>(1)?.unsigned_abs();
        entry.oldest_waiting =
            std::time::Duration::from_millis(u64::try_from(now - oldest).unwrap_or(0));
    }
    let mut dead = conn.prepare_cached(
        "SELECT sink, count(*) FROM jobs INDEXED BY jobs_dead WHERE status = 'dead' GROUP BY sink",
    )?;
    let mut rows = dead.query([])?;
    while let Some(row) = rows.next()? {
        let sink: String = row.get(0)?;
        queues
            .entry(sink.clone())
            .or_insert_with(|| empty(sink))
            .dead = row.get::<_, i64>(1)?.unsigned_abs();
    }
    let mut queues: Vec<SinkQueue> = queues.into_values().collect();
    queues.sort_by(|a, b| a.sink.cmp(&b.sink));
    Ok(queues)
}

fn empty(sink: String) -> SinkQueue {
    SinkQueue {
        sink,
        waiting: 0,
        oldest_waiting: std::time::Duration::ZERO,
        dead: 0,
    }
}
