//! What the operator's commands read and change while the daemon runs: a plain connection
//! with a busy timeout, so they take turns with the daemon's writer. Re-queued jobs are
//! picked up by the running daemon's delivery engine, which looks at the queue every half
//! second.

use std::path::Path;
use std::time::Duration;

use jiff::Timestamp;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use super::events::row_to_event;
use super::{SELECT_EVENT, from_ms};
use crate::store::StoreError;
use crate::store::admin::{AdminStorage, Attempt, EventDetail, Filter, JobDetail, Row};

pub struct Admin {
    conn: Connection,
}

/// When a job with `status`, due at `next`, is tried again, as the tools show it: only a failed
/// job's retry has a time. A pending job is due now or being delivered, and its row's time
/// is only the fallback of a job handed to the engine in memory.
fn retry_at(status: &str, next: i64) -> Option<String> {
    (status == "failed").then(|| at(next))
}

fn at(ms: i64) -> String {
    from_ms(ms).to_string()
}

impl Admin {
    /// Opens an existing database (never creates one: a typo in the path is an error).
    ///
    /// # Errors
    /// The database does not exist or cannot be opened.
    pub fn open(path: &Path) -> rusqlite::Result<Self> {
        let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
        conn.busy_timeout(Duration::from_secs(10))?;
        // Opening is lazy: read the schema now, so a file that cannot be read fails here.
        conn.query_row("SELECT count(*) FROM sqlite_schema", [], |_| Ok(()))?;
        Ok(Self { conn })
    }
}

impl AdminStorage for Admin {
    /// Deliveries, newest event first.
    ///
    /// # Errors
    /// On a database error.
    fn list(&self, filter: &Filter) -> Result<Vec<Row>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT * FROM (
                 SELECT e.id, j.id, e.source, e.event_type, e.delivery_id, e.received_at, j.route, j.sink,
                        j.status, j.attempts, j.next_attempt_at, j.last_error
                 FROM jobs j JOIN events e ON e.id = j.event_id
                 UNION ALL
                 SELECT e.id, NULL, e.source, e.event_type, e.delivery_id, e.received_at, d.route, NULL,
                        d.status, 0, NULL, d.detail
                 FROM dispatches d JOIN events e ON e.id = d.event_id
                 UNION ALL
                 SELECT e.id, NULL, e.source, e.event_type, e.delivery_id, e.received_at, NULL, NULL,
                        'unrouted', 0, NULL, NULL
                 FROM events e
                 WHERE NOT EXISTS (SELECT 1 FROM jobs j WHERE j.event_id = e.id)
                   AND NOT EXISTS (SELECT 1 FROM dispatches d WHERE d.event_id = e.id))
             WHERE (?1 IS NULL OR status = ?1) AND (?2 IS NULL OR source = ?2) AND received_at >= ?3
             ORDER BY 1 DESC, 2 LIMIT ?4",
        )?;
        let since = filter.since.map_or(0, Timestamp::as_millisecond);
        let rows = stmt.query_map(
            params![filter.status, filter.source, since, filter.limit as i64],
            |row| {
                let status: String = row.get(8)?;
                let next: Option<i64> = row.get(10)?;
                Ok(Row {
                    event_id: row.get(0)?,
                    job_id: row.get(1)?,
                    source: row.get(2)?,
                    event_type: row.get(3)?,
                    delivery_id: row.get(4)?,
                    received_at: at(row.get(5)?),
                    route: row.get(6)?,
                    sink: row.get(7)?,
                    next_attempt_at: next.and_then(|next| retry_at(&status, next)),
                    status,
                    attempts: row.get(9)?,
                    detail: row.get(11)?,
                })
            },
        )?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// An event, its jobs with every attempt, and its routing outcomes.
    ///
    /// # Errors
    /// On a database error.
    fn show(&self, event_id: i64) -> Result<Option<EventDetail>, StoreError> {
        let Some(event) = self
            .conn
            .query_row(
                &format!("{SELECT_EVENT} WHERE id = ?1"),
                [event_id],
                row_to_event,
            )
            .optional()?
        else {
            return Ok(None);
        };
        let mut jobs = self.conn.prepare(
            "SELECT id, route, sink, status, attempts, next_attempt_at, last_error, response FROM jobs
             WHERE event_id = ?1 ORDER BY id",
        )?;
        let mut attempts = self.conn.prepare(
            "SELECT number, started_at, finished_at, outcome, error, response FROM attempts WHERE job_id = ?1 ORDER BY id",
        )?;
        let mut details = Vec::new();
        let rows: Vec<JobDetail> = jobs
            .query_map([event_id], |row| {
                let status: String = row.get(3)?;
                let next: i64 = row.get(5)?;
                Ok(JobDetail {
                    id: row.get(0)?,
                    route: row.get(1)?,
                    sink: row.get(2)?,
                    next_attempt_at: retry_at(&status, next),
                    status,
                    attempts: row.get(4)?,
                    last_error: row.get(6)?,
                    response: row.get(7)?,
                    history: Vec::new(),
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
        for mut job in rows {
            job.history = attempts
                .query_map([job.id], |row| {
                    Ok(Attempt {
                        number: row.get(0)?,
                        started_at: at(row.get(1)?),
                        finished_at: at(row.get(2)?),
                        outcome: row.get(3)?,
                        error: row.get(4)?,
                        response: row.get(5)?,
                    })
                })?
                .collect::<rusqlite::Result<_>>()?;
            // A dead letter retried starts a fresh count for the retry policy; the record
            // numbers every attempt the job ever had, in order, and counts them all.
            for (number, attempt) in (1..).zip(job.history.iter_mut()) {
                attempt.number = number;
            }
            job.attempts = u32::try_from(job.history.len()).unwrap_or(u32::MAX);
            details.push(job);
        }
        let notes = self
            .list(&Filter {
                limit: usize::MAX >> 1,
                ..Filter::default()
            })?
            .into_iter()
            .filter(|r| r.event_id == event_id && r.job_id.is_none())
            .collect();
        Ok(Some(EventDetail {
            stored: event,
            jobs: details,
            routing: notes,
        }))
    }

    fn job_event(&self, job_id: i64) -> Result<Option<i64>, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT event_id FROM jobs WHERE id = ?1", [job_id], |row| {
                row.get(0)
            })
            .optional()?)
    }

    /// Queues new jobs for `event_id`, one per (route, sink); returns their ids.
    ///
    /// # Errors
    /// On a database error.
    fn enqueue(
        &mut self,
        event_id: i64,
        pairs: &[(String, String)],
    ) -> Result<Vec<i64>, StoreError> {
        let now = Timestamp::now().as_millisecond();
        let tx = self.conn.transaction()?;
        let mut ids = Vec::new();
        {
            let mut insert = tx.prepare(
                "INSERT INTO jobs (event_id, route, sink, status, next_attempt_at, created_at, updated_at)
                 VALUES (?1, ?2, ?3, 'pending', ?4, ?4, ?4)",
            )?;
            for (route, sink) in pairs {
                insert.execute(params![event_id, route, sink, now])?;
                ids.push(tx.last_insert_rowid());
            }
        }
        tx.commit()?;
        Ok(ids)
    }

    /// Puts dead jobs back in the queue with a fresh set of attempts: one job, or all of them.
    /// Returns how many were re-queued.
    ///
    /// # Errors
    /// On a database error.
    fn retry_dead(&self, job_id: Option<i64>) -> Result<usize, StoreError> {
        let now = Timestamp::now().as_millisecond();
        Ok(self.conn.execute(
            "UPDATE jobs SET status = 'pending', attempts = 0, next_attempt_at = ?1, created_at = ?1, updated_at = ?1
             WHERE status = 'dead' AND (?2 IS NULL OR id = ?2)",
            params![now, job_id],
        )?)
    }
}
