//! The operator's commands' primitive queries on PostgreSQL ([`AdminBackend`]; the commands'
//! logic is `store::admin::Tools`), the same as SQLite's (`store::sqlite::admin`, which says
//! how each is an index seek), on one connection of their own, each call on a small runtime
//! of its own (the commands are synchronous). A read-only command's session is read-only.

use std::collections::HashMap;

use jiff::Timestamp;
use sqlx::postgres::PgConnection;
use sqlx::{Connection as _, Executor as _};

use super::events::event_at;
use super::silences;
use crate::config::PostgresConfig;
use crate::metrics::SinkQueue;
use crate::store::PassRow;
use crate::store::admin::{
    Access, AdminBackend, Attempt, Head, Indexed, JobDetail, JobState, Row, RowStatus, at, retry_at,
};
use crate::store::{
    JobStatus, NewSilence, Silence, SinkChange, SinkChanged, SinkState, StoreError, StoredEvent,
};

pub struct Admin {
    runtime: tokio::runtime::Runtime,
    /// Behind a mutex: the trait's reads take `&self`, a connection's queries `&mut`.
    conn: std::sync::Mutex<PgConnection>,
}

/// A listed row as the queries below select it: the event's columns (a [`Head`]), then a
/// job's or a routing record's (id, route, sink, status, attempts, next attempt, detail).
type Listed = (
    i64,
    String,
    String,
    String,
    i64,
    Option<i64>,
    Option<String>,
    Option<String>,
    String,
    i32,
    Option<i64>,
    Option<String>,
);

/// The columns of a listed row's event.
macro_rules! head_columns {
    () => {
        "e.id, e.source, e.event_type, e.delivery_id, e.received_at"
    };
}

/// How many attempts job `j` had, all of them (see SQLite's `tries!`).
macro_rules! tries {
    () => {
        "(SELECT count(*)::int FROM attempts a WHERE a.job_id = j.id)"
    };
}

/// Jobs with `status`, newest event first, through the partial index of jobs whose status
/// is `partial`.
macro_rules! jobs_with {
    ($partial:literal, $status:literal) => {
        concat!(
            "SELECT ",
            head_columns!(),
            ", j.id, j.route, j.sink, j.status, ",
            tries!(),
            ", j.next_attempt_at, coalesce(j.quieted_by, j.last_error)
             FROM jobs j JOIN events e ON e.id = j.event_id
             WHERE ",
            $partial,
            " AND j.status = '",
            $status,
            "' AND j.event_id >= $1 AND j.event_id < $5 AND ($2::text IS NULL OR e.source = $2)
                   AND ($4::text IS NULL OR j.sink = $4)
             ORDER BY j.event_id DESC, j.id LIMIT $3"
        )
    };
}
const DEAD_JOBS: &str = jobs_with!("j.status = 'dead'", "dead");
const PENDING_JOBS: &str = jobs_with!("j.status IN ('pending', 'failed')", "pending");
const FAILED_JOBS: &str = jobs_with!("j.status IN ('pending', 'failed')", "failed");
const SILENCED_JOBS: &str = jobs_with!("j.status IN ('silenced', 'muted')", "silenced");
const MUTED_JOBS: &str = jobs_with!("j.status IN ('silenced', 'muted')", "muted");
/// Jobs a silence or a window set aside, newest event first.
const QUIETED_BY: &str = concat!(
    "SELECT ",
    head_columns!(),
    ", j.id, j.route, j.sink, j.status, ",
    tries!(),
    ", j.next_attempt_at, j.quieted_by
     FROM jobs j JOIN events e ON e.id = j.event_id
     WHERE j.quieted_by = $1 ORDER BY j.event_id DESC, j.id LIMIT $2"
);
const SUPPRESSED: &str = concat!(
    "SELECT ",
    head_columns!(),
    ", NULL::bigint, d.route, NULL::text, d.status, 0, NULL::bigint, d.detail
     FROM dispatches d JOIN events e ON e.id = d.event_id
     WHERE d.status = 'suppressed' AND d.event_id >= $1 AND d.event_id < $5 AND ($2::text IS NULL OR e.source = $2)
           AND $4::text IS NULL
     ORDER BY d.event_id DESC, d.id DESC LIMIT $3"
);
const UNROUTED: &str = concat!(
    "SELECT ",
    head_columns!(),
    ", NULL::bigint, NULL::text, NULL::text, 'unrouted', 0, NULL::bigint, NULL::text
     FROM events e
     WHERE e.unrouted AND e.id >= $1 AND e.id < $5 AND ($2::text IS NULL OR e.source = $2)
           AND $4::text IS NULL
     ORDER BY e.id DESC LIMIT $3"
);
/// A page of events, newest first, below a cursor: all of them, or one source's.
const EVENTS_PAGE: &str = concat!(
    "SELECT ",
    head_columns!(),
    " FROM events e WHERE e.id < $1 AND e.id >= $2 ORDER BY e.id DESC LIMIT $3"
);
const SOURCE_EVENTS_PAGE: &str = concat!(
    "SELECT ",
    head_columns!(),
    " FROM events e WHERE e.source = $4 AND e.id < $1 AND e.id >= $2 ORDER BY e.id DESC LIMIT $3"
);
/// The routing records, then the jobs, of a page of events, as the columns after the head.
const PAGE_ROWS: &str = concat!(
    "SELECT event_id, NULL::bigint, route, NULL::text, status, 0, NULL::bigint, detail
     FROM dispatches WHERE event_id = ANY($1)
     UNION ALL
     SELECT j.event_id, j.id, j.route, j.sink, j.status, ",
    tries!(),
    ", j.next_attempt_at, coalesce(j.quieted_by, j.last_error)
     FROM jobs j WHERE j.event_id = ANY($1)
     ORDER BY 1, 2 NULLS FIRST"
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
const JOB: &str = jobs_where!("j.id = $1");
const WAITING_JOBS: &str =
    jobs_where!("j.event_id = $1 AND j.status IN ('pending', 'failed') ORDER BY j.id");
/// A job as [`JobState`] has it, as the queries select it.
type JobStateColumns = (i64, i64, String, String, String, i32, i64);

fn job_state(columns: JobStateColumns) -> Result<JobState, StoreError> {
    let (id, event_id, route, sink, status, attempts, next) = columns;
    let status = parse_status(&status, JobStatus::parse)?;
    Ok(JobState {
        id,
        event_id,
        route,
        sink,
        next_attempt_at: retry_at(status, next),
        status,
        attempts: u32::try_from(attempts).unwrap_or(0),
    })
}

/// A stored status as `parse` reads it: text no hookroute writes is an error, not a guess.
fn parse_status<T>(text: &str, parse: fn(&str) -> Option<T>) -> Result<T, StoreError> {
    parse(text).ok_or_else(|| sqlx::Error::Decode(format!("unknown status {text:?}").into()).into())
}

/// A job as `show` selects it: id, route, sink, status, attempts, next attempt, last error,
/// response.
type JobColumns = (i64, String, String, String, i32, i64, Text, Text, Text);
/// A text column that may be NULL.
type Text = Option<String>;
/// An attempt as `show` selects it: its job, number, start, end, outcome, error, response.
type AttemptColumns = (i64, i32, i64, i64, String, Option<String>, Option<String>);

/// The columns after the head of a listed row, with their event's id.
type Detail = (
    i64,
    Option<i64>,
    Option<String>,
    Option<String>,
    String,
    i32,
    Option<i64>,
    Option<String>,
);

impl Admin {
    /// Connects and checks the schema is the one this build knows (the tools never migrate).
    ///
    /// # Errors
    /// The database cannot be reached, or has another schema version.
    pub fn open(config: &PostgresConfig, access: Access) -> Result<Self, StoreError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(StoreError::Thread)?;
        let conn = runtime.block_on(async {
            let mut conn = PgConnection::connect_with(&super::options(config)?).await?;
            if access == Access::Read {
                conn.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
                    .await?;
            }
            let version = super::schema::version(&mut conn).await?;
            super::schema::check_version(&config.url, version, true)?;
            Ok::<_, StoreError>(conn)
        })?;
        Ok(Self {
            runtime,
            conn: std::sync::Mutex::new(conn),
        })
    }

    /// Runs `f` on the connection, to completion.
    fn run<T>(
        &self,
        f: impl AsyncFnOnce(&mut PgConnection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        self.runtime.block_on(f(&mut conn))
    }
}

/// A listed row from the columns the queries select.
fn listed(row: Listed) -> Result<Row, StoreError> {
    let (
        event_id,
        source,
        event_type,
        delivery_id,
        received_at,
        job,
        route,
        sink,
        status,
        attempts,
        next,
        detail,
    ) = row;
    let head = Head {
        event_id,
        source,
        event_type,
        delivery_id,
        received_at,
    };
    with_head(
        &head,
        (event_id, job, route, sink, status, attempts, next, detail),
    )
}

fn with_head(head: &Head, detail: Detail) -> Result<Row, StoreError> {
    let (_, job_id, route, sink, status, attempts, next, detail) = detail;
    let status = parse_status(&status, RowStatus::parse)?;
    Ok(Row {
        event_id: head.event_id,
        job_id,
        source: head.source.clone(),
        event_type: head.event_type.clone(),
        delivery_id: head.delivery_id.clone(),
        received_at: at(head.received_at),
        route,
        sink,
        next_attempt_at: next.and_then(|next| retry_at(status, next)),
        status,
        attempts: u32::try_from(attempts).unwrap_or(0),
        detail,
    })
}

impl AdminBackend for Admin {
    fn last_event_id(&self) -> Result<Option<i64>, StoreError> {
        self.run(async |conn| {
            Ok(sqlx::query_scalar("SELECT max(id) FROM events")
                .fetch_one(&mut *conn)
                .await?)
        })
    }

    fn received_from(&self, id: i64) -> Result<Option<i64>, StoreError> {
        self.run(async |conn| {
            Ok(sqlx::query_scalar(
                "SELECT received_at FROM events WHERE id >= $1 ORDER BY id LIMIT 1",
            )
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?)
        })
    }

    fn events_page(
        &self,
        below: i64,
        floor: i64,
        limit: usize,
        source: Option<&str>,
    ) -> Result<Vec<Head>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.run(async |conn| {
            let query = match source {
                Some(source) => sqlx::query_as(SOURCE_EVENTS_PAGE)
                    .bind(below)
                    .bind(floor)
                    .bind(limit)
                    .bind(source),
                None => sqlx::query_as(EVENTS_PAGE)
                    .bind(below)
                    .bind(floor)
                    .bind(limit),
            };
            let heads: Vec<(i64, String, String, String, i64)> =
                query.fetch_all(&mut *conn).await?;
            Ok(heads
                .into_iter()
                .map(
                    |(event_id, source, event_type, delivery_id, received_at)| Head {
                        event_id,
                        source,
                        event_type,
                        delivery_id,
                        received_at,
                    },
                )
                .collect())
        })
    }

    fn rows_of(&self, events: &[Head]) -> Result<Vec<Vec<Row>>, StoreError> {
        let ids: Vec<i64> = events.iter().map(|head| head.event_id).collect();
        // One query for the page: each event's routing records, then its jobs.
        let details: Vec<Detail> = self.run(async |conn| {
            Ok(sqlx::query_as(PAGE_ROWS)
                .bind(&ids)
                .fetch_all(&mut *conn)
                .await?)
        })?;
        let mut by_event: HashMap<i64, Vec<Detail>> = HashMap::new();
        for detail in details {
            by_event.entry(detail.0).or_default().push(detail);
        }
        events
            .iter()
            .map(|head| {
                by_event
                    .remove(&head.event_id)
                    .unwrap_or_default()
                    .into_iter()
                    .map(|detail| with_head(head, detail))
                    .collect()
            })
            .collect()
    }

    fn records_of(&self, event: &Head) -> Result<Vec<Row>, StoreError> {
        let records: Vec<Detail> = self.run(async |conn| {
            Ok(sqlx::query_as(
                "SELECT event_id, NULL::bigint, route, NULL::text, status, 0, NULL::bigint, detail
                 FROM dispatches WHERE event_id = $1 ORDER BY id",
            )
            .bind(event.event_id)
            .fetch_all(&mut *conn)
            .await?)
        })?;
        records
            .into_iter()
            .map(|record| with_head(event, record))
            .collect()
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
        self.run(async |conn| {
            let rows: Vec<Listed> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .bind(floor)
                .bind(source)
                .bind(i64::try_from(limit).unwrap_or(i64::MAX))
                .bind(sink)
                .bind(below)
                .fetch_all(&mut *conn)
                .await?;
            rows.into_iter().map(listed).collect()
        })
    }

    fn event(&self, event_id: i64) -> Result<Option<StoredEvent>, StoreError> {
        self.run(async |conn| {
            let row = sqlx::query(
                "SELECT id, source, delivery_id, event_type, occurred_at, received_at,
                        sender_delivery, payload FROM events WHERE id = $1",
            )
            .bind(event_id)
            .fetch_optional(&mut *conn)
            .await?;
            row.map(|row| event_at(&row, 0)).transpose()
        })
    }

    fn jobs_of(&self, event_id: i64) -> Result<Vec<JobDetail>, StoreError> {
        self.run(async |conn| {
            let jobs: Vec<JobColumns> = sqlx::query_as(
                "SELECT id, route, sink, status, attempts, next_attempt_at, last_error, response,
                        quieted_by
                     FROM jobs WHERE event_id = $1 ORDER BY id",
            )
            .bind(event_id)
            .fetch_all(&mut *conn)
            .await?;
            let ids: Vec<i64> = jobs.iter().map(|job| job.0).collect();
            let attempts: Vec<AttemptColumns> = sqlx::query_as(
                "SELECT job_id, number, started_at, finished_at, outcome, error, response
                     FROM attempts WHERE job_id = ANY($1) ORDER BY id",
            )
            .bind(&ids)
            .fetch_all(&mut *conn)
            .await?;
            jobs.into_iter()
                .map(
                    |(id, route, sink, status, count, next, last_error, response, quieted_by)| {
                        let status = parse_status(&status, JobStatus::parse)?;
                        Ok(JobDetail {
                            id,
                            route,
                            sink,
                            next_attempt_at: retry_at(status, next),
                            status,
                            attempts: u32::try_from(count).unwrap_or(0),
                            last_error,
                            response,
                            quieted_by,
                            quiet: None,
                            history: attempts
                                .iter()
                                .filter(|attempt| attempt.0 == id)
                                .map(|(_, number, started, finished, outcome, error, response)| {
                                    Attempt {
                                        number: u32::try_from(*number).unwrap_or(0),
                                        started_at: at(*started),
                                        finished_at: at(*finished),
                                        outcome: outcome.clone(),
                                        error: error.clone(),
                                        response: response.clone(),
                                    }
                                })
                                .collect(),
                        })
                    },
                )
                .collect()
        })
    }

    fn job(&self, job_id: i64) -> Result<Option<JobState>, StoreError> {
        self.run(async |conn| {
            let job: Option<JobStateColumns> = sqlx::query_as(JOB)
                .bind(job_id)
                .fetch_optional(&mut *conn)
                .await?;
            job.map(job_state).transpose()
        })
    }

    fn waiting_jobs(&self, event_id: i64) -> Result<Vec<JobState>, StoreError> {
        self.run(async |conn| {
            let jobs: Vec<JobStateColumns> = sqlx::query_as(WAITING_JOBS)
                .bind(event_id)
                .fetch_all(&mut *conn)
                .await?;
            jobs.into_iter().map(job_state).collect()
        })
    }

    fn retry_now(&self, job_id: i64, now: Timestamp) -> Result<bool, StoreError> {
        let now = now.as_millisecond();
        self.run(async |conn| {
            let done = sqlx::query(
                "UPDATE jobs SET next_attempt_at = $1, updated_at = $1
                 WHERE id = $2 AND status = 'failed'",
            )
            .bind(now)
            .bind(job_id)
            .execute(&mut *conn)
            .await?;
            Ok(done.rows_affected() == 1)
        })
    }

    fn enqueue(
        &mut self,
        event_id: i64,
        pairs: &[(String, String)],
        now: Timestamp,
    ) -> Result<Vec<i64>, StoreError> {
        let now = now.as_millisecond();
        let (routes, sinks): (Vec<&str>, Vec<&str>) =
            pairs.iter().map(|(r, s)| (r.as_str(), s.as_str())).unzip();
        self.run(async |conn| {
            let mut tx = conn.begin().await?;
            let ids: Vec<i64> = sqlx::query_scalar(
                "INSERT INTO jobs (event_id, route, sink, status, next_attempt_at, created_at, updated_at)
                 SELECT $1, route, sink, 'pending', $2, $2, $2
                 FROM unnest($3::text[], $4::text[]) WITH ORDINALITY AS t (route, sink, n)
                 ORDER BY n RETURNING id",
            )
            .bind(event_id)
            .bind(now)
            .bind(&routes)
            .bind(&sinks)
            .fetch_all(&mut *tx)
            .await?;
            // It has jobs now: no longer listed as unrouted.
            sqlx::query("UPDATE events SET unrouted = NULL WHERE id = $1 AND unrouted IS NOT NULL")
                .bind(event_id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(ids)
        })
    }

    fn quieted_by(&self, by: &str, limit: usize) -> Result<Vec<Row>, StoreError> {
        self.run(async |conn| {
            let rows: Vec<Listed> = sqlx::query_as(QUIETED_BY)
                .bind(by)
                .bind(i64::try_from(limit).unwrap_or(i64::MAX))
                .fetch_all(&mut *conn)
                .await?;
            rows.into_iter().map(listed).collect()
        })
    }

    fn add_silence(&mut self, new: &NewSilence, now: Timestamp) -> Result<i64, StoreError> {
        self.run(async |conn| silences::add(&mut *conn, new, now.as_millisecond()).await)
    }

    fn silences(&self, ended: bool, now: Timestamp) -> Result<Vec<Silence>, StoreError> {
        self.run(async |conn| silences::by_end(&mut *conn, now.as_millisecond(), ended).await)
    }

    fn silence(&self, id: i64) -> Result<Option<Silence>, StoreError> {
        self.run(async |conn| silences::get(&mut *conn, id).await)
    }

    fn expire_silence(&self, id: i64, now: Timestamp) -> Result<bool, StoreError> {
        self.run(async |conn| silences::expire(&mut *conn, id, now.as_millisecond()).await)
    }

    fn sinks(&self, now: Timestamp) -> Result<(Vec<SinkState>, Vec<SinkQueue>), StoreError> {
        self.run(async |conn| super::sinks::with_queues(conn, now).await)
    }

    fn change_sink(
        &mut self,
        sink: &str,
        change: SinkChange,
        now: Timestamp,
    ) -> Result<SinkChanged, StoreError> {
        self.run(async |conn| super::sinks::change(conn, sink, change, now).await)
    }

    fn request_pass(&mut self, source: &str, now: Timestamp) -> Result<(), StoreError> {
        self.run(async |conn| super::passes::request(&mut *conn, source, now).await)
    }

    fn passes(&self) -> Result<Vec<PassRow>, StoreError> {
        self.run(async |conn| super::passes::all(&mut *conn).await)
    }

    fn seen(&self, source: &str, ids: &[String]) -> Result<Vec<String>, StoreError> {
        self.run(async |conn| super::passes::seen(&mut *conn, source, ids).await)
    }

    fn newest_seen(&self, source: &str) -> Result<Option<i64>, StoreError> {
        self.run(async |conn| super::passes::newest_seen(&mut *conn, source).await)
    }

    fn retry_dead(&self, job_id: Option<i64>, now: Timestamp) -> Result<usize, StoreError> {
        self.run(async |conn| super::jobs::retry_dead(conn, job_id, now).await)
    }
}
