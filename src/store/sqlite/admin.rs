//! What the operator's commands read and change while the daemon runs: a plain connection
//! with a busy timeout, so they take turns with the daemon's writer. Re-queued jobs are
//! picked up by the running daemon's delivery engine, which looks at the queue every half
//! second.
//!
//! Every query here is an index seek that reads about as many rows as it prints, so a command
//! takes as long on a year of history as on a day's (a test checks each plan and that the
//! work done does not grow with the history). `deliveries list` walks newest first:
//! - with no status, or `succeeded` (the normal outcome, so matches come quickly), it walks
//!   events (by id, or by `events_source`) and reads each one's jobs and routing records;
//! - any other status has a partial index of its own, newest event first (`jobs_dead`,
//!   `jobs_open`, `dispatches_status`, `events_unrouted`); a `--source` with it filters
//!   those rows.
//!
//! `--since` becomes the first event id received since then, found by bisecting ids (events
//! are numbered in the order they arrive), so it bounds every walk without an index on time.

use std::path::Path;
use std::time::Duration;

use jiff::Timestamp;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use super::events::row_to_event;
use super::silences;
use crate::metrics::SinkQueue;
use crate::store::PassRow;
use crate::store::admin::{
    Access, AdminBackend, Attempt, Head, Indexed, JobDetail, JobState, Row, RowStatus, at, retry_at,
};
use crate::store::{
    JobStatus, NewSilence, Silence, SinkChange, SinkChanged, SinkState, StoreError, StoredEvent,
};

pub struct Admin {
    conn: Connection,
}

/// The columns of a listed row, in [`row_at`]'s order: the event's, then the job's or the
/// routing record's.
macro_rules! row_columns {
    () => {
        "e.id, e.source, e.event_type, e.delivery_id, e.received_at"
    };
}

/// How many attempts job `j` had, all of them: a dead letter's retry resets the count the
/// retry policy goes by (`jobs.attempts`), not the record.
macro_rules! tries {
    () => {
        "(SELECT count(*) FROM attempts a WHERE a.job_id = j.id)"
    };
}

/// Jobs with `status`, one of those a job leaves, through the partial index `index` of
/// jobs whose status is `partial`: newest event first.
macro_rules! jobs_with {
    ($index:literal, $partial:literal, $status:literal) => {
        concat!(
            "SELECT ",
            row_columns!(),
            ", j.id, j.route, j.sink, j.status, ",
            tries!(),
            ", j.next_attempt_at, coalesce(j.quieted_by, j.last_error)
             FROM jobs j INDEXED BY ",
            $index,
            " JOIN events e ON e.id = j.event_id
             WHERE ",
            $partial,
            " AND j.status = '",
            $status,
            "' AND j.event_id >= ?1 AND j.event_id < ?5 AND (?2 IS NULL OR e.source = ?2)
                   AND (?4 IS NULL OR j.sink = ?4)
             ORDER BY j.event_id DESC, j.id LIMIT ?3"
        )
    };
}
const DEAD_JOBS: &str = jobs_with!("jobs_dead", "j.status = 'dead'", "dead");
const PENDING_JOBS: &str = jobs_with!("jobs_open", "j.status IN ('pending', 'failed')", "pending");
const FAILED_JOBS: &str = jobs_with!("jobs_open", "j.status IN ('pending', 'failed')", "failed");
const SILENCED_JOBS: &str = jobs_with!(
    "jobs_quiet",
    "j.status IN ('silenced', 'muted')",
    "silenced"
);
const MUTED_JOBS: &str = jobs_with!("jobs_quiet", "j.status IN ('silenced', 'muted')", "muted");
/// Jobs a silence or a window set aside, newest event first.
const QUIETED_BY: &str = concat!(
    "SELECT ",
    row_columns!(),
    ", j.id, j.route, j.sink, j.status, ",
    tries!(),
    ", j.next_attempt_at, j.quieted_by
     FROM jobs j INDEXED BY jobs_quieted_by JOIN events e ON e.id = j.event_id
     WHERE j.quieted_by = ?1 ORDER BY j.event_id DESC, j.id LIMIT ?2"
);
/// Newest record first within an event too: the index's own order (its entries end with the
/// row id), so a page is read without sorting what it skips.
const SUPPRESSED: &str = concat!(
    "SELECT ",
    row_columns!(),
    ", NULL, d.route, NULL, d.status, 0, NULL, d.detail
     FROM dispatches d INDEXED BY dispatches_status JOIN events e ON e.id = d.event_id
     WHERE d.status = 'suppressed' AND d.event_id >= ?1 AND d.event_id < ?5 AND (?2 IS NULL OR e.source = ?2)
           AND ?4 IS NULL
     ORDER BY d.event_id DESC, d.id DESC LIMIT ?3"
);
const UNROUTED: &str = concat!(
    "SELECT ",
    row_columns!(),
    ", NULL, NULL, NULL, 'unrouted', 0, NULL, NULL
     FROM events e INDEXED BY events_unrouted
     WHERE e.unrouted = 1 AND e.id >= ?1 AND e.id < ?5 AND (?2 IS NULL OR e.source = ?2) AND ?4 IS NULL
     ORDER BY e.id DESC LIMIT ?3"
);
/// A page of events, newest first, below a cursor: all of them, or one source's.
const EVENTS_PAGE: &str = concat!(
    "SELECT ",
    row_columns!(),
    " FROM events e WHERE e.id < ?1 AND e.id >= ?2 ORDER BY e.id DESC LIMIT ?3"
);
const SOURCE_EVENTS_PAGE: &str = concat!(
    "SELECT ",
    row_columns!(),
    " FROM events e INDEXED BY events_source
     WHERE e.source = ?4 AND e.id < ?1 AND e.id >= ?2 ORDER BY e.id DESC LIMIT ?3"
);
/// One event's jobs, and its routing records, as the columns after [`row_columns!`].
const EVENT_JOBS: &str = concat!(
    "SELECT j.id, j.route, j.sink, j.status, ",
    tries!(),
    ", j.next_attempt_at, coalesce(j.quieted_by, j.last_error) FROM jobs j WHERE j.event_id = ?1 ORDER BY j.id"
);
/// Jobs as [`JobState`] has them: one, or an event's waiting jobs.
macro_rules! jobs_where {
    ($condition:literal) => {
        concat!(
            "SELECT j.id, j.event_id, j.route, j.sink, j.status, ",
            tries!(),
            ", j.next_attempt_at FROM jobs j WHERE ",
            $condition
        )
    };
}
const JOB: &str = jobs_where!("j.id = ?1");
const WAITING_JOBS: &str =
    jobs_where!("j.event_id = ?1 AND j.status IN ('pending', 'failed') ORDER BY j.id");
const EVENT_DISPATCHES: &str = "SELECT NULL, route, NULL, status, 0, NULL, detail
     FROM dispatches WHERE event_id = ?1 ORDER BY id";
/// The first event at or after an id, for bisecting by time.
const EVENT_FROM: &str = "SELECT id, received_at FROM events WHERE id >= ?1 ORDER BY id LIMIT 1";
/// The newest event's id (a seek: SQLite reads a rowid's `max()` off the end of the tree).
const LAST_EVENT: &str = "SELECT max(id) FROM events";
const EVENT: &str = concat!(
    "SELECT ",
    event_columns!(),
    " FROM events e WHERE e.id = ?1"
);

fn head_at(row: &rusqlite::Row<'_>) -> rusqlite::Result<Head> {
    Ok(Head {
        event_id: row.get(0)?,
        source: row.get(1)?,
        event_type: row.get(2)?,
        delivery_id: row.get(3)?,
        received_at: row.get(4)?,
    })
}

/// A listed row: `head`, then a job's or a routing record's columns from `first` on.
fn row_at(head: &Head, row: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<Row> {
    let status = status(row, first + 3, RowStatus::parse)?;
    let next: Option<i64> = row.get(first + 5)?;
    Ok(Row {
        event_id: head.event_id,
        job_id: row.get(first)?,
        source: head.source.clone(),
        event_type: head.event_type.clone(),
        delivery_id: head.delivery_id.clone(),
        received_at: at(head.received_at),
        route: row.get(first + 1)?,
        sink: row.get(first + 2)?,
        next_attempt_at: next.and_then(|next| retry_at(status, next)),
        status,
        attempts: row.get(first + 4)?,
        detail: row.get(first + 6)?,
    })
}

/// Column `i`, a stored status, as `parse` reads it: text no hookroute writes is an error, not
/// a guess.
fn status<T>(
    row: &rusqlite::Row<'_>,
    i: usize,
    parse: fn(&str) -> Option<T>,
) -> rusqlite::Result<T> {
    let text: String = row.get(i)?;
    parse(&text).ok_or_else(|| {
        let unknown = format!("unknown status {text:?}");
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, unknown.into())
    })
}

fn job_at(row: &rusqlite::Row<'_>) -> rusqlite::Result<JobState> {
    let status = status(row, 4, JobStatus::parse)?;
    let next: i64 = row.get(6)?;
    Ok(JobState {
        id: row.get(0)?,
        event_id: row.get(1)?,
        route: row.get(2)?,
        sink: row.get(3)?,
        next_attempt_at: retry_at(status, next),
        status,
        attempts: row.get(5)?,
    })
}

impl Admin {
    /// Opens an existing database (never creates one: a typo in the path is an error) of the
    /// schema this build knows. Read-only access opens it read-only: a read never writes,
    /// migrates or merges anything.
    ///
    /// # Errors
    /// The database does not exist, cannot be opened, or has another schema version.
    pub fn open(path: &Path, access: Access) -> Result<Self, StoreError> {
        let flags = match access {
            Access::Read => OpenFlags::SQLITE_OPEN_READ_ONLY,
            Access::Write => OpenFlags::SQLITE_OPEN_READ_WRITE,
        };
        let open_err = super::open_error(path);
        let conn = Connection::open_with_flags(path, flags).map_err(open_err)?;
        conn.busy_timeout(Duration::from_secs(10))
            .map_err(open_err)?;
        // Opening is lazy: reading the header now makes a file that cannot be read fail here.
        let version = super::schema::version(&conn).map_err(open_err)?;
        super::schema::check_version(path, version)?;
        // SQLite opens a file it may not write read-only, and says so only at the first write.
        if access == Access::Write && conn.is_readonly(rusqlite::MAIN_DB).map_err(open_err)? {
            return Err(StoreError::PermissionDenied {
                path: path.to_path_buf(),
            });
        }
        Ok(Self { conn })
    }

    /// The connection, for a command that reads the whole database (`migrate-storage`).
    pub fn into_connection(self) -> Connection {
        self.conn
    }

    /// The rows `sql` (one of the per-event queries) reads for `head`'s event.
    fn rows(&self, sql: &str, head: &Head) -> rusqlite::Result<Vec<Row>> {
        let mut stmt = self.conn.prepare_cached(sql)?;
        let mut found = stmt.query([head.event_id])?;
        let mut rows = Vec::new();
        while let Some(row) = found.next()? {
            rows.push(row_at(head, row, 0)?);
        }
        Ok(rows)
    }
}

impl AdminBackend for Admin {
    fn last_event_id(&self) -> Result<Option<i64>, StoreError> {
        let mut stmt = self.conn.prepare_cached(LAST_EVENT)?;
        Ok(stmt.query_row([], |row| row.get(0))?)
    }

    fn received_from(&self, id: i64) -> Result<Option<i64>, StoreError> {
        let mut stmt = self.conn.prepare_cached(EVENT_FROM)?;
        Ok(stmt.query_row([id], |row| row.get(1)).optional()?)
    }

    fn events_page(
        &self,
        below: i64,
        floor: i64,
        limit: usize,
        source: Option<&str>,
    ) -> Result<Vec<Head>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let heads = match source {
            Some(source) => self
                .conn
                .prepare_cached(SOURCE_EVENTS_PAGE)?
                .query_map(params![below, floor, limit, source], head_at)?
                .collect::<rusqlite::Result<_>>()?,
            None => self
                .conn
                .prepare_cached(EVENTS_PAGE)?
                .query_map(params![below, floor, limit], head_at)?
                .collect::<rusqlite::Result<_>>()?,
        };
        Ok(heads)
    }

    fn rows_of(&self, events: &[Head]) -> Result<Vec<Vec<Row>>, StoreError> {
        let mut rows_of = Vec::with_capacity(events.len());
        for head in events {
            let mut rows = self.records_of(head)?;
            rows.extend(self.rows(EVENT_JOBS, head)?);
            rows_of.push(rows);
        }
        Ok(rows_of)
    }

    fn records_of(&self, event: &Head) -> Result<Vec<Row>, StoreError> {
        Ok(self.rows(EVENT_DISPATCHES, event)?)
    }

    fn with_status(
        &self,
        status: Indexed,
        (floor, below): (i64, i64),
        (source, sink): (Option<&str>, Option<&str>),
        limit: usize,
    ) -> Result<Vec<Row>, StoreError> {
        let sql = match status {
            Indexed::Pending => PENDING_JOBS,
            Indexed::Failed => FAILED_JOBS,
            Indexed::Dead => DEAD_JOBS,
            Indexed::Silenced => SILENCED_JOBS,
            Indexed::Muted => MUTED_JOBS,
            Indexed::Suppressed => SUPPRESSED,
            Indexed::Unrouted => UNROUTED,
        };
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut stmt = self.conn.prepare_cached(sql)?;
        let mut rows = stmt.query(params![floor, source, limit, sink, below])?;
        let mut listed = Vec::new();
        while let Some(row) = rows.next()? {
            listed.push(row_at(&head_at(row)?, row, 5)?);
        }
        Ok(listed)
    }

    fn event(&self, event_id: i64) -> Result<Option<StoredEvent>, StoreError> {
        let mut stmt = self.conn.prepare_cached(EVENT)?;
        Ok(stmt.query_row([event_id], row_to_event).optional()?)
    }

    fn jobs_of(&self, event_id: i64) -> Result<Vec<JobDetail>, StoreError> {
        let mut jobs = self.conn.prepare_cached(
            "SELECT id, route, sink, status, attempts, next_attempt_at, last_error, response, quieted_by
             FROM jobs WHERE event_id = ?1 ORDER BY id",
        )?;
        let mut attempts = self.conn.prepare_cached(
            "SELECT number, started_at, finished_at, outcome, error, response FROM attempts WHERE job_id = ?1 ORDER BY id",
        )?;
        let mut details: Vec<JobDetail> = jobs
            .query_map([event_id], |row| {
                let status = status(row, 3, JobStatus::parse)?;
                let next: i64 = row.get(5)?;
                Ok(JobDetail {
                    id: row.get(0)?,
                    route: row.get(1)?,
                    sink: row.get(2)?,
                    next_attempt_at: retry_at(status, next),
                    status,
                    attempts: row.get(4)?,
                    last_error: row.get(6)?,
                    response: row.get(7)?,
                    quieted_by: row.get(8)?,
                    quiet: None,
                    history: Vec::new(),
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
        for job in &mut details {
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
        }
        Ok(details)
    }

    fn job(&self, job_id: i64) -> Result<Option<JobState>, StoreError> {
        let mut stmt = self.conn.prepare_cached(JOB)?;
        Ok(stmt.query_row([job_id], job_at).optional()?)
    }

    fn waiting_jobs(&self, event_id: i64) -> Result<Vec<JobState>, StoreError> {
        let mut stmt = self.conn.prepare_cached(WAITING_JOBS)?;
        let jobs = stmt.query_map([event_id], job_at)?;
        Ok(jobs.collect::<rusqlite::Result<_>>()?)
    }

    fn retry_now(&self, job_id: i64, now: Timestamp) -> Result<bool, StoreError> {
        let now = now.as_millisecond();
        let changed = self.conn.execute(
            "UPDATE jobs SET next_attempt_at = ?1, updated_at = ?1 WHERE id = ?2 AND status = 'failed'",
            params![now, job_id],
        )?;
        Ok(changed == 1)
    }

    fn enqueue(
        &mut self,
        event_id: i64,
        pairs: &[(String, String)],
        now: Timestamp,
    ) -> Result<Vec<i64>, StoreError> {
        let now = now.as_millisecond();
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
            // It has jobs now: no longer listed as unrouted.
            tx.execute(
                "UPDATE events SET unrouted = NULL WHERE id = ?1 AND unrouted IS NOT NULL",
                [event_id],
            )?;
        }
        tx.commit()?;
        Ok(ids)
    }

    fn quieted_by(&self, by: &str, limit: usize) -> Result<Vec<Row>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut stmt = self.conn.prepare_cached(QUIETED_BY)?;
        let mut rows = stmt.query(params![by, limit])?;
        let mut listed = Vec::new();
        while let Some(row) = rows.next()? {
            listed.push(row_at(&head_at(row)?, row, 5)?);
        }
        Ok(listed)
    }

    fn add_silence(&mut self, new: &NewSilence, now: Timestamp) -> Result<i64, StoreError> {
        Ok(silences::add(&self.conn, new, now.as_millisecond())?)
    }

    fn silences(&self, ended: bool, now: Timestamp) -> Result<Vec<Silence>, StoreError> {
        Ok(silences::by_end(&self.conn, now.as_millisecond(), ended)?)
    }

    fn silence(&self, id: i64) -> Result<Option<Silence>, StoreError> {
        Ok(silences::get(&self.conn, id)?)
    }

    fn expire_silence(&self, id: i64, now: Timestamp) -> Result<bool, StoreError> {
        Ok(silences::expire(&self.conn, id, now.as_millisecond())?)
    }

    fn sinks(&self, now: Timestamp) -> Result<(Vec<SinkState>, Vec<SinkQueue>), StoreError> {
        let states = super::sinks::states(&self.conn)?;
        Ok((
            states,
            super::jobs::queues(&self.conn, now.as_millisecond())?,
        ))
    }

    fn change_sink(
        &mut self,
        sink: &str,
        change: SinkChange,
        now: Timestamp,
    ) -> Result<SinkChanged, StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let changed = super::sinks::change(&tx, sink, change, now)?;
        tx.commit()?;
        Ok(changed)
    }

    fn request_pass(&mut self, source: &str, now: Timestamp) -> Result<(), StoreError> {
        Ok(super::passes::request(&self.conn, source, now)?)
    }

    fn passes(&self) -> Result<Vec<PassRow>, StoreError> {
        Ok(super::passes::all(&self.conn)?)
    }

    fn seen(&self, source: &str, ids: &[String]) -> Result<Vec<String>, StoreError> {
        Ok(super::passes::seen(&self.conn, source, ids)?)
    }

    fn newest_seen(&self, source: &str) -> Result<Option<i64>, StoreError> {
        Ok(super::passes::newest_seen(&self.conn, source)?)
    }

    fn retry_dead(&self, job_id: Option<i64>, now: Timestamp) -> Result<usize, StoreError> {
        let now = now.as_millisecond();
        let requeue = "UPDATE jobs SET status = 'pending', attempts = 0, next_attempt_at = ?1,
                                       created_at = ?1, updated_at = ?1";
        let count = match job_id {
            Some(id) => self.conn.execute(
                &format!("{requeue} WHERE id = ?2 AND status = 'dead'"),
                params![now, id],
            )?,
            None => self.conn.execute(
                &format!("{requeue} WHERE id IN (SELECT id FROM jobs INDEXED BY jobs_dead WHERE status = 'dead')"),
                params![now],
            )?,
        };
        Ok(count)
    }
}

#[cfg(test)]
#[path = "admin_tests.rs"]
mod tests;
