//! Delivery jobs shared by the replicas: claiming due ones under a lease, recording outcomes
//! (which release the lease), and what the engine and `/metrics` ask about the queue.

use std::collections::HashMap;
use std::time::Duration;

use jiff::Timestamp;
use sqlx::postgres::{PgPool, PgRow};
use sqlx::{Postgres, Row as _, Transaction};

use super::events::event_at;
use crate::metrics::SinkQueue;
use crate::store::{AttemptOutcome, DueJob, DueSummary, Job, StoreError};
use crate::store::{Gather, digest_due, from_ms};

/// Claims up to `limit` due jobs of `sink` for `replica`: see
/// [`Storage::due_jobs`](crate::store::Storage::due_jobs), due as [`due_at!`] says.
pub(super) async fn claim(
    pool: &PgPool,
    (replica, lease, held): (i64, i64, &[i64]),
    sink: &str,
    limit: usize,
    gather: Gather,
    now: Timestamp,
) -> Result<Vec<DueJob>, StoreError> {
    let now = now.as_millisecond();
    let mut tx = pool.begin().await?;
    if gather == Gather::Groups {
        // The replicas take turns reading a grouping sink, so a group due at once is claimed
        // whole by one of them, and goes out as one delivery.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('claim ' || $1, 0))")
            .bind(sink)
            .execute(&mut *tx)
            .await?;
    }
    if let Some(hold) = gather.hold() {
        // One digest at a time across the replicas; one finding the lock taken has
        // nothing to send (the other is sending it).
        let mine: bool = sqlx::query_scalar(
            "SELECT pg_try_advisory_xact_lock(hashtextextended('digest ' || $1, 0))",
        )
        .bind(sink)
        .fetch_one(&mut *tx)
        .await?;
        let oldest: Option<i64> = sqlx::query_scalar(concat!(
            "SELECT min(created_at) FROM jobs
             WHERE sink = $1 AND status IN ('pending', 'failed') AND next_attempt_at <= $2
               AND ",
            claimable!("$3", "$4", "$5")
        ))
        .bind(sink)
        .bind(now)
        .bind(replica)
        .bind(held)
        .bind(lease)
        .fetch_one(&mut *tx)
        .await?;
        let due = |oldest| digest_due(from_ms(oldest), hold) <= from_ms(now);
        if !mine || !oldest.is_some_and(due) {
            tx.rollback().await?;
            return Ok(Vec::new());
        }
    }
    let rows = sqlx::query(concat!(
        "WITH claimed AS (
             UPDATE jobs SET leased_by = $4
             WHERE id IN (
                 SELECT id FROM jobs
                 WHERE sink = $1 AND status IN ('pending', 'failed') AND ",
        due_at!("$4"),
        " <= $2 AND ",
        claimable!("$4", "$6", "$5"),
        "
                 ORDER BY next_attempt_at, id LIMIT $3
                 FOR UPDATE SKIP LOCKED)
             RETURNING id, event_id, route, sink, attempts, created_at, next_attempt_at, group_key)
         SELECT c.id, c.event_id, c.route, c.sink, c.attempts, c.created_at,
                e.id, e.source, e.delivery_id, e.event_type, e.occurred_at, e.received_at,
                e.sender_delivery, e.payload, c.group_key
         FROM claimed c LEFT JOIN events e ON e.id = c.event_id
         ORDER BY c.next_attempt_at, c.id"
    ))
    .bind(sink)
    .bind(now)
    .bind(i64::try_from(limit).unwrap_or(i64::MAX))
    .bind(replica)
    .bind(lease)
    .bind(held)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    rows.iter().map(due_job).collect()
}

/// One attempt's outcomes, as [`Storage::finish_attempt`](crate::store::Storage::finish_attempt)
/// was given them.
pub(super) struct Finished {
    pub outcomes: Vec<(Job, AttemptOutcome)>,
    pub started_at: Timestamp,
    pub finished_at: Timestamp,
}

/// Records the outcomes of `attempts`, releasing their jobs' leases.
pub(super) async fn finish(
    tx: &mut Transaction<'_, Postgres>,
    attempts: &[Finished],
) -> Result<(), StoreError> {
    let mut columns: Outcomes = Outcomes::default();
    for attempt in attempts {
        let at = attempt.finished_at.as_millisecond();
        for (job, outcome) in &attempt.outcomes {
            let (status, error, response, next) = outcome.columns(at);
            columns.ids.push(job.id);
            columns.statuses.push(status.as_str());
            columns.errors.push(error);
            columns.responses.push(response);
            columns.next.push(next);
            columns
                .numbers
                .push(i32::try_from(job.attempt).unwrap_or(i32::MAX));
            columns
                .counted
                .push(i32::try_from(outcome.counted(job.attempt)).unwrap_or(i32::MAX));
            columns.started.push(attempt.started_at.as_millisecond());
            columns.finished.push(at);
        }
    }
    if columns.ids.is_empty() {
        return Ok(());
    }
    // The lease goes with the outcome: a failed job is anyone's to retry when it is due.
    sqlx::query(
        "WITH o AS (
             SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[],
                                  $5::bigint[], $6::int[], $7::bigint[], $8::bigint[], $9::int[])
                 AS o (id, status, error, response, next, number, started, finished, counted)),
         updated AS (
             UPDATE jobs j SET status = o.status, last_error = o.error, response = o.response,
                               next_attempt_at = o.next, updated_at = o.finished,
                               attempts = o.counted, leased_by = NULL
             FROM o WHERE j.id = o.id AND j.status IN ('pending', 'failed'))
         INSERT INTO attempts (job_id, number, started_at, finished_at, outcome, error, response)
         SELECT id, number, started, finished, status, error, response FROM o",
    )
    .bind(&columns.ids)
    .bind(&columns.statuses)
    .bind(&columns.errors)
    .bind(&columns.responses)
    .bind(&columns.next)
    .bind(&columns.numbers)
    .bind(&columns.started)
    .bind(&columns.finished)
    .bind(&columns.counted)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// For each sink with jobs this replica may take (its own included): when the next is due
/// ([`due_at!`]), and the oldest.
pub(super) async fn waiting(
    pool: &PgPool,
    replica: i64,
    lease: i64,
) -> Result<HashMap<String, DueSummary>, StoreError> {
    let rows = sqlx::query(concat!(
        "SELECT sink, min(",
        due_at!("$1"),
        "), min(created_at) FROM jobs
         WHERE status IN ('pending', 'failed') AND ",
        claimable!("$1", "'{}'::bigint[]", "$2"),
        "
         GROUP BY sink"
    ))
    .bind(replica)
    .bind(lease)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .iter()
        .map(|row| {
            (
                row.get(0),
                DueSummary {
                    next_due: from_ms(row.get(1)),
                    oldest: from_ms(row.get(2)),
                },
            )
        })
        .collect())
}

/// Each sink's waiting jobs and dead letters, for `/metrics`.
pub(super) async fn queues(
    db: impl sqlx::PgExecutor<'_>,
    now: Timestamp,
) -> Result<Vec<SinkQueue>, StoreError> {
    let rows = sqlx::query(
        "SELECT sink, count(*) FILTER (WHERE status IN ('pending', 'failed')),
                min(created_at) FILTER (WHERE status IN ('pending', 'failed')),
                count(*) FILTER (WHERE status = 'dead')
         FROM jobs WHERE status IN ('pending', 'failed', 'dead')
         GROUP BY sink ORDER BY sink",
    )
    .fetch_all(db)
    .await?;
    let now = now.as_millisecond();
    Ok(rows
        .iter()
        .map(|row| SinkQueue {
            sink: row.get(0),
            waiting: row.get::<i64, _>(1).unsigned_abs(),
            oldest_waiting: row
                .get::<Option<i64>, _>(2)
                .map_or(Duration::ZERO, |oldest| {
                    Duration::from_millis(u64::try_from(now - oldest).unwrap_or(0))
                }),
            dead: row.get::<i64, _>(3).unsigned_abs(),
        })
        .collect())
}

/// The columns of `finish_attempt`'s outcomes, bound as arrays.
#[derive(Default)]
struct Outcomes<'a> {
    ids: Vec<i64>,
    statuses: Vec<&'static str>,
    errors: Vec<Option<&'a str>>,
    responses: Vec<&'a str>,
    next: Vec<i64>,
    numbers: Vec<i32>,
    /// The attempts each job has used after this one (see `AttemptOutcome::counted`).
    counted: Vec<i32>,
    started: Vec<i64>,
    finished: Vec<i64>,
}

/// A claimed job, with its event if it is still stored.
fn due_job(row: &PgRow) -> Result<DueJob, StoreError> {
    let attempts: i32 = row.try_get(4)?;
    let job = Job {
        id: row.try_get(0)?,
        event_id: row.try_get(1)?,
        route: row.try_get(2)?,
        sink: row.try_get(3)?,
        attempt: u32::try_from(attempts).unwrap_or(0).saturating_add(1),
        created_at: from_ms(row.try_get(5)?),
        group: row.try_get(14)?,
    };
    let event = match row.try_get::<Option<i64>, _>(6)? {
        None => None,
        Some(_) => Some(event_at(row, 6)?.event),
    };
    Ok(DueJob { job, event })
}

/// Puts dead jobs back in the queue at `now` with a fresh set of attempts, unleased: one job,
/// or all of them (`dead-letter retry`). Returns how many.
pub(super) async fn retry_dead(
    conn: &mut sqlx::PgConnection,
    job_id: Option<i64>,
    now: jiff::Timestamp,
) -> Result<usize, StoreError> {
    let done = sqlx::query(
        "UPDATE jobs SET status = 'pending', attempts = 0, next_attempt_at = $1,
                         created_at = $1, updated_at = $1, leased_by = NULL
         WHERE status = 'dead' AND ($2::bigint IS NULL OR id = $2)",
    )
    .bind(now.as_millisecond())
    .bind(job_id)
    .execute(&mut *conn)
    .await?;
    Ok(usize::try_from(done.rows_affected()).unwrap_or(usize::MAX))
}
