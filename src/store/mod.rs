//! Storage: what the rest of the daemon needs from a database, as one trait ([`Storage`]) and
//! the types it speaks, so a backend implements the trait without touching `http`, `intake`,
//! `rules` or `delivery`. Two do: SQLite ([`sqlite`], one daemon, a single writer with group
//! commit) and PostgreSQL ([`postgres`], several daemons sharing the database, jobs leased).
//! What is decided rather than stored is written once here, above them: when a digest is due
//! ([`digest_due`]), the statuses ([`JobStatus`]), the operator's queries
//! ([`admin::Tools`]). `hookroute`'s durability guarantees are the trait's contract:
//!
//! - [`Storage::insert`] answers only once the event, its routing outcome and its delivery id
//!   are durable (a 2xx may follow), and stores nothing when it fails;
//! - a delivery id is stored once per source within the retention (the dedupe check is part
//!   of the insert, so it is exact);
//! - a job is due until its outcome is recorded ([`Storage::finish_attempt`]): jobs being
//!   attempted when the process dies are attempted again (at least once).
//!
//! Beside the trait: [`admin`], what the operator's commands ask of a backend; [`body`], how
//! a body is stored (compressed when that pays).

pub mod admin;
pub mod body;
mod gather;
pub mod passes;
pub mod postgres;
pub mod silences;
pub mod sinks;
pub mod sqlite;
mod status;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use jiff::Timestamp;

use crate::config::{Backend, StorageConfig};
use crate::event::Event;
use crate::metrics::SinkQueue;
pub use gather::{Gather, GroupTo, digest_due};
pub use passes::{Begun, Due, PassEnd, PassRow, Schedule};
pub use silences::{Matchers, NewSilence, Quiet, Silence, SilenceState};
pub use sinks::{Pause, SinkChange, SinkChanged, SinkState, Streak};
pub use status::JobStatus;

/// A database driver's error (rusqlite's, sqlx's), kept as the source of a [`StoreError`]:
/// the driver types stay inside their backends.
pub type DriverError = Box<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create the database directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create the database {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cannot open the database {path}: permission denied; run the command as the service \
         user, e.g. `sudo -u hookroute hookroute …`"
    )]
    PermissionDenied { path: PathBuf },
    #[error("cannot open the database {path}: {source}")]
    Open { path: PathBuf, source: DriverError },
    #[error(
        "the database {database} has schema version {version}, this hookroute knows version {known}: {}",
        if version > known {
            "it was written by a newer hookroute; run that one"
        } else {
            "start the daemon once to migrate it, then run the command again"
        }
    )]
    Schema {
        /// The file, or the URL.
        database: String,
        version: i64,
        known: i64,
    },
    /// A query failed; the backend's driver says why (each backend converts its own errors).
    #[error("database error: {0}")]
    Query(#[source] DriverError),
    /// The database's password could not be read (the message names the key, never the secret).
    #[error("{0}")]
    Secret(String),
    /// A batch failed; every command in it shares the cause.
    #[error("database write failed: {0}")]
    Write(Arc<dyn std::error::Error + Send + Sync>),
    #[error("cannot open the write-ahead log of {path}: {source}")]
    OpenWal {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("another hookroute serves the database {path}: one process per database")]
    InUse { path: PathBuf },
    #[error("cannot lock {path}: {source}")]
    Lock {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start a database thread: {0}")]
    Thread(std::io::Error),
    #[error("the database writer has stopped")]
    WriterGone,
    /// A write could not be committed within `storage.busy_timeout`; nothing was stored.
    #[error("the database did not take the write within storage.busy_timeout; nothing was stored")]
    Timeout,
    /// Flushing the WAL failed once: what the kernel still holds may never reach the disk,
    /// so the store refuses every write from then on, until a restart recovers from the WAL.
    #[error("flushing the database to disk failed ({0}); restart hookroute to recover")]
    Sync(Arc<std::io::Error>),
}

/// The outcome of storing a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inserted {
    /// Stored, and routed in the same transaction.
    New {
        id: i64,
        /// Delivery jobs created.
        jobs: usize,
        /// The jobs created for [`Handoff::sinks`], to be handed to the delivery engine.
        handed: Vec<Job>,
        /// Routes whose throttle suppressed the event.
        suppressed: Vec<String>,
    },
    /// Seen before within the retention window; carries the first copy's event id.
    Duplicate(i64),
}

/// An event as stored, with its row id.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub id: i64,
    pub received_at: Timestamp,
    pub event: Event,
}

/// One route that takes a new event, as the routing rules decided before it was stored. The
/// store applies the decision in the transaction that stores the event, so an event is never
/// stored without its routing: nothing is left to dispatch after a crash, and no event is
/// read back just to be routed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteTo {
    pub route: String,
    /// The route's throttle: this event's key, and the window's length.
    pub throttle: Option<(String, std::time::Duration)>,
    pub sinks: Vec<String>,
    /// Those of `sinks` a silence or a mute window keeps this event from: their jobs are
    /// recorded as such, never due.
    pub quiet: Vec<(String, Quiet)>,
    /// The route's group for this event: its jobs join the group's next delivery
    /// ([`crate::rules::group::due`]).
    pub group: Option<GroupTo>,
}

/// The columns of a new event row, as both backends store it. The parsed payload stays with
/// the caller: dropping a JSON tree is work a writer batching many events should not do.
pub(crate) struct NewEvent {
    pub source: String,
    pub delivery_id: String,
    pub event_type: String,
    pub occurred_at: Option<String>,
    pub received_at: i64,
    pub sender_delivery: Option<String>,
    /// The body as signed, packed ([`body::pack`]).
    pub body: Vec<u8>,
    /// The event's time on its own clock, for throttles (unix milliseconds).
    pub occurred_ms: i64,
    pub routes: Vec<RouteTo>,
    pub handoff: Handoff,
}

impl NewEvent {
    /// What [`Storage::insert`] was given, as a row to write.
    pub(crate) fn new(
        event: &Event,
        body: &[u8],
        received_at: Timestamp,
        routes: Vec<RouteTo>,
        handoff: Handoff,
    ) -> Self {
        Self {
            source: event.source.clone(),
            delivery_id: event.delivery_id.clone(),
            event_type: event.event_type.clone(),
            occurred_at: event.occurred_at.map(|t| t.to_string()),
            received_at: received_at.as_millisecond(),
            sender_delivery: event.sender_delivery.clone(),
            body: body::pack(body),
            occurred_ms: event.occurred_at.unwrap_or(received_at).as_millisecond(),
            routes,
            handoff,
        }
    }
}

/// Sinks whose new jobs the delivery engine takes straight from ingest, with their event in
/// memory, instead of reading them back from the database. Their rows are still written with
/// the event, as the durable copy, but they come due only at `fallback`: until then no read
/// of due jobs finds them, so the engine cannot be given the same job twice. A job whose
/// hand-over never happened (the process died, or the request was dropped) is picked up from
/// the database then, or at the next start ([`open`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Handoff {
    pub sinks: Vec<String>,
    pub fallback: Timestamp,
}

/// What periodic pruning removes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prunable {
    /// Delivery ids remembered for deduplication.
    Dedupe,
    /// Events whose routing and deliveries are finished, with their jobs and attempts.
    Events,
    /// Throttle windows that closed.
    Throttles,
    /// Silences that ended.
    Silences,
}

/// One step of a pruning pass: how many records went, and where the next step starts
/// (`None` once nothing expired is left).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PruneStep {
    pub removed: usize,
    pub next: Option<i64>,
}

/// A job being attempted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub id: i64,
    pub event_id: i64,
    pub route: String,
    pub sink: String,
    /// Attempts so far, this one included.
    pub attempt: u32,
    pub created_at: Timestamp,
    /// Its group's key, when its route groups events: delivered with the group's others.
    pub group: Option<String>,
}

/// A job due for an attempt, with its event (`None` if the event is no longer stored).
#[derive(Debug, Clone)]
pub struct DueJob {
    pub job: Job,
    pub event: Option<Event>,
}

/// A sink's waiting jobs, in brief.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DueSummary {
    pub next_due: Timestamp,
    pub oldest: Timestamp,
}

/// How an attempt ended, and what becomes of the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptOutcome {
    Succeeded {
        response: String,
    },
    /// Failed; tried again at `retry_at`.
    Failed {
        error: String,
        response: String,
        retry_at: Timestamp,
    },
    /// Failed for good: a permanent error, or out of attempts or time.
    Dead {
        error: String,
        response: String,
    },
    /// Failed while its sink was paused for an outage: due again at `retry_at`, and not
    /// counted against the job's attempts (the outage is the sink's, not the job's).
    Deferred {
        error: String,
        response: String,
        retry_at: Timestamp,
    },
}

impl AttemptOutcome {
    /// What the job's row records of it, finished at `at` (unix milliseconds): its status,
    /// error, response, and when it is next due.
    pub(crate) fn columns(&self, at: i64) -> (JobStatus, Option<&str>, &str, i64) {
        match self {
            Self::Succeeded { response } => (JobStatus::Succeeded, None, response, at),
            // A deferred attempt leaves its job failed and due again, as a failed one does.
            Self::Failed {
                error,
                response,
                retry_at,
            }
            | Self::Deferred {
                error,
                response,
                retry_at,
            } => (
                JobStatus::Failed,
                Some(error),
                response,
                retry_at.as_millisecond(),
            ),
            Self::Dead { error, response } => (JobStatus::Dead, Some(error), response, at),
        }
    }

    /// The attempts the job has used after this one, attempt number `attempt`: a deferred
    /// attempt uses none.
    pub(crate) fn counted(&self, attempt: u32) -> u32 {
        match self {
            Self::Deferred { .. } => attempt.saturating_sub(1),
            _ => attempt,
        }
    }

    /// Adds a remark about the attempt (e.g. that a default template was sent) to what the
    /// job record keeps of the sink's answer.
    pub fn note(&mut self, remark: &str) {
        let (Self::Succeeded { response }
        | Self::Failed { response, .. }
        | Self::Dead { response, .. }
        | Self::Deferred { response, .. }) = self;
        *response = if response.is_empty() {
            format!("note: {remark}")
        } else {
            format!("note: {remark}\n{response}")
        };
    }
}

/// The operations the daemon needs from its database.
#[async_trait]
pub trait Storage: Send + Sync {
    /// Stores `event` (its raw `body` as signed), received at `received_at`, with its
    /// routing outcome, unless its delivery id was seen: each of `routes` becomes jobs (or a
    /// suppressed record when its throttle window is closed); the jobs of `handoff`'s sinks
    /// come due only at its fallback. Answers once all of it is durable.
    /// (A step in the life of a job: [`crate::delivery`].)
    ///
    /// # Errors
    /// [`StoreError`] when it was not stored; nothing was.
    async fn insert(
        &self,
        event: &Event,
        body: &[u8],
        received_at: Timestamp,
        routes: Vec<RouteTo>,
        handoff: Handoff,
    ) -> Result<Inserted, StoreError>;

    /// Up to `limit` jobs of `sink` due by `now`, oldest due first, each with its event,
    /// leaving out `held` (the jobs the engine is attempting), gathered as `gather` says.
    /// (A step in the life of a job: [`crate::delivery`].)
    ///
    /// # Errors
    /// [`StoreError`] on a database error.
    async fn due_jobs(
        &self,
        sink: &str,
        limit: usize,
        gather: Gather,
        now: Timestamp,
        held: HashSet<i64>,
    ) -> Result<Vec<DueJob>, StoreError>;

    /// Records an attempt that ran from `started_at` to `finished_at` and moves its jobs on:
    /// each succeeded, failed (due again later) or dead. A job already finished (succeeded or
    /// dead) stays so: a late outcome (a retried write, a replica whose lease lapsed) is
    /// recorded as an attempt but revives nothing.
    /// (A step in the life of a job: [`crate::delivery`].)
    ///
    /// # Errors
    /// [`StoreError`] when the write failed; the jobs stay due.
    async fn finish_attempt(
        &self,
        outcomes: Vec<(Job, AttemptOutcome)>,
        started_at: Timestamp,
        finished_at: Timestamp,
    ) -> Result<(), StoreError>;

    /// Sets aside due `jobs` a silence or a mute window now keeps from their sink (a retry
    /// waiting when the silence was added, say) at `now`: they are no longer due, and no
    /// attempt is recorded. A job already finished stays so.
    /// (A step in the life of a job: [`crate::delivery`].)
    ///
    /// # Errors
    /// [`StoreError`] when the write failed; the jobs stay due.
    async fn quiet(&self, jobs: Vec<(Job, Quiet)>, now: Timestamp) -> Result<(), StoreError>;

    /// The silences not yet ended at `now` (active, or starting later), oldest first: what
    /// every daemon applies, read again each second.
    ///
    /// # Errors
    /// [`StoreError`] on a database error.
    async fn silences(&self, now: Timestamp) -> Result<Vec<Silence>, StoreError>;

    /// Applies `change` to `sink`'s health at `now` in one transaction (see
    /// [`SinkState::apply`]); a change that pauses or resumes the sink also makes its
    /// waiting retries due from their creation: the probe takes the oldest, and the backlog
    /// drains at once, in the order it came.
    ///
    /// # Errors
    /// [`StoreError`] when the write failed; nothing changed.
    async fn change_sink(
        &self,
        sink: &str,
        change: SinkChange,
        now: Timestamp,
    ) -> Result<SinkChanged, StoreError>;

    /// Every sink that is failing or paused: what every daemon reads each second.
    ///
    /// # Errors
    /// [`StoreError`] on a database error.
    async fn sink_states(&self) -> Result<Vec<SinkState>, StoreError>;

    /// For each sink with jobs waiting: when the next is due and when the oldest was created.
    ///
    /// # Errors
    /// [`StoreError`] on a database error.
    async fn due_summary(&self) -> Result<HashMap<String, DueSummary>, StoreError>;

    /// Begins `source`'s reconcile pass at `now` when one is due on `schedule` (see
    /// [`PassRow::due`]): says why, or `None` when another daemon runs one or the last began
    /// within the interval. Decided and marked in one transaction, so one daemon passes.
    ///
    /// # Errors
    /// [`StoreError`] on a database error; no pass was begun.
    async fn begin_pass(
        &self,
        source: &str,
        schedule: Schedule,
        now: Timestamp,
    ) -> Result<Option<Begun>, StoreError>;

    /// When the newest delivery stored from `source` (within the dedupe retention) was
    /// received: how far a source's first reconcile pass looks back.
    ///
    /// # Errors
    /// [`StoreError`] on a database error.
    async fn newest_seen(&self, source: &str) -> Result<Option<Timestamp>, StoreError>;

    /// Records how this daemon's pass of `source` ended at `now`, letting go of it.
    ///
    /// # Errors
    /// [`StoreError`] when the write failed (the pass is anyone's once its hold lapses).
    async fn end_pass(&self, source: &str, end: PassEnd, now: Timestamp) -> Result<(), StoreError>;

    /// Proves the database takes writes (readiness).
    ///
    /// # Errors
    /// [`StoreError`] when it does not.
    async fn touch(&self, now: Timestamp) -> Result<(), StoreError>;

    /// One step of pruning `what` older than `keep` at `now`: looks at up to `limit` records
    /// from `from` on (0, or the previous step's `next`) and deletes those expired.
    ///
    /// # Errors
    /// [`StoreError`] when the write failed.
    async fn prune(
        &self,
        what: Prunable,
        keep: std::time::Duration,
        from: i64,
        limit: usize,
        now: Timestamp,
    ) -> Result<PruneStep, StoreError>;

    /// Returns up to `pages` pages of the space pruning freed to the file system; answers how
    /// many free pages are left to return (0 if the backend reuses space instead).
    ///
    /// # Errors
    /// [`StoreError`] when the write failed.
    async fn reclaim(&self, pages: usize) -> Result<usize, StoreError>;

    /// Each sink's waiting jobs (how many, and the oldest one's age at `now`) and dead
    /// letters: what `/metrics` shows.
    ///
    /// # Errors
    /// [`StoreError`] on a database error.
    async fn queues(&self, now: Timestamp) -> Result<Vec<SinkQueue>, StoreError>;

    /// The database's size on disk, in bytes (its write-ahead log included).
    fn size_bytes(&self) -> u64;

    /// How many of `sink`'s `concurrency` calls this daemon may make at once. A sink's limit
    /// holds for everyone serving the database: one daemon has all of it; replicas share it
    /// (see the PostgreSQL backend).
    fn share(&self, _sink: &str, concurrency: usize) -> usize {
        concurrency
    }

    /// Tells the other daemons how much of `sink`'s concurrency this one holds: its share,
    /// or its calls in flight when they outnumber a share that shrank.
    fn hold(&self, _sink: &str, _held: usize) {}

    /// Lets go of `jobs` this daemon took (handed over, never attempted): anyone may attempt
    /// them now. On a database only one daemon serves, their rows already say when.
    /// (A step in the life of a job: [`crate::delivery`].)
    ///
    /// # Errors
    /// [`StoreError`] when the write failed; the jobs are released when this daemon stops.
    async fn release(&self, jobs: Vec<i64>) -> Result<(), StoreError> {
        let _ = jobs;
        Ok(())
    }

    /// Makes everything accepted so far durable and stops the backend's workers. Idempotent.
    async fn close(&self);
}

/// The database handle the daemon passes around.
pub type Store = Arc<dyn Storage>;

/// Opens the database `config` names for the operator's commands: an existing one only (a
/// typo in the path is an error, not a new empty database), read-only unless `access` says
/// the command writes.
///
/// # Errors
/// [`StoreError`] when it cannot be opened.
pub fn open_admin(
    config: &StorageConfig,
    access: admin::Access,
) -> Result<admin::Tools, StoreError> {
    let path = match &config.backend {
        Backend::Sqlite(path) => path,
        Backend::Postgres(pg) => {
            let backend = postgres::admin::Admin::open(pg, access)?;
            return Ok(admin::Tools::new(Box::new(backend)));
        }
    };
    let admin = sqlite::admin::Admin::open(path, access).map_err(|err| {
        // SQLite says "unable to open database file"; the operator needs to hear why.
        let mut options = std::fs::OpenOptions::new();
        options.read(true).write(access == admin::Access::Write);
        let denied = matches!(err, StoreError::Open { .. })
            && options
                .open(path)
                .is_err_and(|err| err.kind() == std::io::ErrorKind::PermissionDenied);
        if denied {
            StoreError::PermissionDenied { path: path.clone() }
        } else {
            err
        }
    })?;
    Ok(admin::Tools::new(Box::new(admin)))
}

/// Opens the database `config` names (creating and migrating it as needed).
///
/// # Errors
/// [`StoreError`] when it cannot be opened.
pub async fn open(config: &StorageConfig) -> Result<Store, StoreError> {
    Ok(match &config.backend {
        Backend::Sqlite(path) => Arc::new(sqlite::SqliteStore::open(path, config)?),
        Backend::Postgres(pg) => {
            Arc::new(postgres::PostgresStore::open(pg, config.busy_timeout).await?)
        }
    })
}

/// A stored unix-millisecond time; a corrupt one reads as the epoch rather than failing.
pub(crate) fn from_ms(ms: i64) -> Timestamp {
    Timestamp::from_millisecond(ms).unwrap_or(Timestamp::UNIX_EPOCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_have_one_name_each_and_read_back() {
        use admin::{RowStatus, STATUSES};
        let names: Vec<&str> = RowStatus::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(
            names, STATUSES,
            "--status takes exactly the statuses a row has"
        );
        for status in RowStatus::ALL {
            assert_eq!(RowStatus::parse(status.as_str()), Some(status));
            assert_eq!(
                serde_json::to_value(status).unwrap(),
                serde_json::json!(status.as_str())
            );
        }
        for status in JobStatus::ALL {
            assert_eq!(JobStatus::parse(status.as_str()), Some(status));
            assert_eq!(RowStatus::from(status).as_str(), status.as_str());
        }
        assert_eq!(JobStatus::parse("suppressed"), None);
        assert_eq!(RowStatus::parse("Pending"), None);
    }
}
