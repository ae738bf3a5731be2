//! SQLite storage: migrations, the single writer thread (group commit) and typed queries.
//!
//! Invariants:
//! - One thread owns the write connection. Commands queue on a channel; the writer takes
//!   whatever is queued (up to `max_batch`) and applies it in one `BEGIN IMMEDIATE`
//!   transaction. Every command is answered only once that transaction is on disk: an
//!   answered insert is durable, and the HTTP layer may then say 2xx.
//! - Commit and flush are pipelined. The writer commits with `synchronous = NORMAL` (in WAL
//!   mode: consistent after a crash, and the WAL is synced before every checkpoint) and hands
//!   the batch's answers to the syncer thread, which `fdatasync`s the WAL and only then
//!   answers. The writer meanwhile applies the next batch, so it never idles on the disk,
//!   and one flush covers every batch committed while the previous one ran. The durability
//!   is `synchronous = FULL`'s; the throughput is not bound by one fsync per transaction.
//! - A failing batch is rolled back whole and every command in it gets the error, so a caller
//!   never believes something was stored that was not.
//! - Reads use their own connection and never block the writer (WAL).
//! - Checkpoints run on a thread of their own, so a commit never waits for one.
//! - Whether a delivery was seen is decided by the writer, from the `dedupe` table and the
//!   keys not yet merged into it ([`dedupe`]).

pub mod admin;
mod dedupe;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;

use jiff::Timestamp;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use tokio::sync::{mpsc, oneshot};

use crate::config::StorageConfig;
use crate::event::{Event, Payload};

/// Schema migrations, applied in order; `PRAGMA user_version` counts how many ran.
const MIGRATIONS: &[&str] = &[
    r"
CREATE TABLE events (
    id              INTEGER PRIMARY KEY,
    source          TEXT    NOT NULL,
    delivery_id     TEXT    NOT NULL,
    event_type      TEXT    NOT NULL,
    occurred_at     TEXT,
    received_at     INTEGER NOT NULL,   -- unix milliseconds
    sender_delivery TEXT,
    payload         BLOB    NOT NULL    -- the body exactly as signed
);

-- One row per (source, delivery id) seen within the retention window.
CREATE TABLE dedupe (
    source      TEXT    NOT NULL,
    delivery_id TEXT    NOT NULL,
    event_id    INTEGER NOT NULL,
    seen_at     INTEGER NOT NULL,
    PRIMARY KEY (source, delivery_id)
) WITHOUT ROWID;
CREATE INDEX dedupe_seen_at ON dedupe(seen_at);

-- Routing outcomes that created no job: a throttled route, or an event no route took.
CREATE TABLE dispatches (
    id       INTEGER PRIMARY KEY,
    event_id INTEGER NOT NULL REFERENCES events(id),
    route    TEXT,                      -- NULL when unrouted
    status   TEXT    NOT NULL CHECK (status IN ('suppressed', 'unrouted')),
    detail   TEXT,                      -- the throttle key
    at       INTEGER NOT NULL
);
CREATE INDEX dispatches_event ON dispatches(event_id);
CREATE INDEX dispatches_status ON dispatches(status, id);

-- One delivery of one event through one route to one sink, retried until it succeeds or dies.
CREATE TABLE jobs (
    id              INTEGER PRIMARY KEY,
    event_id        INTEGER NOT NULL REFERENCES events(id),
    route           TEXT    NOT NULL,
    sink            TEXT    NOT NULL,
    status          TEXT    NOT NULL CHECK (status IN ('pending', 'in_flight', 'succeeded', 'failed', 'dead')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,   -- unix milliseconds
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    last_error      TEXT,
    response        TEXT                -- the sink's answer, summarised and bounded
);
CREATE INDEX jobs_event ON jobs(event_id);
CREATE INDEX jobs_due ON jobs(sink, next_attempt_at) WHERE status IN ('pending', 'failed');
CREATE INDEX jobs_status ON jobs(status, id);

CREATE TABLE attempts (
    id          INTEGER PRIMARY KEY,
    job_id      INTEGER NOT NULL REFERENCES jobs(id),
    number      INTEGER NOT NULL,
    started_at  INTEGER NOT NULL,
    finished_at INTEGER NOT NULL,
    outcome     TEXT    NOT NULL CHECK (outcome IN ('succeeded', 'failed', 'dead')),
    error       TEXT,
    response    TEXT
);
CREATE INDEX attempts_job ON attempts(job_id);

-- Throttle windows, per route and rendered key: durable, so a restart does not reopen them.
CREATE TABLE throttles (
    route      TEXT    NOT NULL,
    key        TEXT    NOT NULL,
    started_at INTEGER NOT NULL,        -- unix milliseconds, on the events' own clock
    window_ms  INTEGER NOT NULL,
    PRIMARY KEY (route, key)
) WITHOUT ROWID;

-- `dispatch_cursor`: every event with an id up to it has its outcomes recorded. One row
-- updated per dispatch round, rather than a flag rewritten on every (payload-heavy) event row.
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
",
    r"
-- Waiting jobs by sink and age: with `jobs_due`, what the delivery engine asks on every turn
-- (which sinks wait, since when, and when next) is a few index seeks, however long the queue.
CREATE INDEX jobs_waiting ON jobs(sink, created_at) WHERE status IN ('pending', 'failed');
",
    r"
-- Events are routed in the transaction that stores them, so there is no dispatch cursor.
DELETE FROM meta WHERE key = 'dispatch_cursor';
-- The jobs being attempted are the engine's to know, in memory; a job stays pending until
-- its outcome is recorded. Jobs an earlier version marked in flight are simply pending.
UPDATE jobs SET status = 'pending' WHERE status = 'in_flight';
-- Status indexes cost a write on every insert and every status change, and only the dead
-- letters are ever looked up by status (`dead-letter retry`): index just those.
DROP INDEX jobs_status;
CREATE INDEX jobs_dead ON jobs(id) WHERE status = 'dead';
DROP INDEX dispatches_status;
",
    r"
-- A CHECK of `x IN (...)` over more than two values makes SQLite build a temporary table on
-- every insert and update of the row (a few per cent of the daemon's CPU under load); the
-- same check spelled as ORs does not. SQLite cannot change a CHECK in place, so both tables
-- are rebuilt (https://sqlite.org/lang_altertable.html#otheralter). `in_flight` is gone:
-- migration 3 retired it.
CREATE TABLE jobs_new (
    id              INTEGER PRIMARY KEY,
    event_id        INTEGER NOT NULL REFERENCES events(id),
    route           TEXT    NOT NULL,
    sink            TEXT    NOT NULL,
    status          TEXT    NOT NULL
                    CHECK (status = 'pending' OR status = 'succeeded' OR status = 'failed' OR status = 'dead'),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,   -- unix milliseconds
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    last_error      TEXT,
    response        TEXT                -- the sink's answer, summarised and bounded
);
INSERT INTO jobs_new SELECT id, event_id, route, sink, status, attempts, next_attempt_at,
                            created_at, updated_at, last_error, response FROM jobs;
DROP TABLE jobs;
ALTER TABLE jobs_new RENAME TO jobs;
CREATE INDEX jobs_event ON jobs(event_id);
CREATE INDEX jobs_due ON jobs(sink, next_attempt_at) WHERE status IN ('pending', 'failed');
CREATE INDEX jobs_waiting ON jobs(sink, created_at) WHERE status IN ('pending', 'failed');
CREATE INDEX jobs_dead ON jobs(id) WHERE status = 'dead';

CREATE TABLE attempts_new (
    id          INTEGER PRIMARY KEY,
    job_id      INTEGER NOT NULL REFERENCES jobs(id),
    number      INTEGER NOT NULL,
    started_at  INTEGER NOT NULL,
    finished_at INTEGER NOT NULL,
    outcome     TEXT    NOT NULL CHECK (outcome = 'succeeded' OR outcome = 'failed' OR outcome = 'dead'),
    error       TEXT,
    response    TEXT
);
INSERT INTO attempts_new SELECT id, job_id, number, started_at, finished_at, outcome, error, response
                         FROM attempts;
DROP TABLE attempts;
ALTER TABLE attempts_new RENAME TO attempts;
CREATE INDEX attempts_job ON attempts(job_id);
",
    r"
-- Keys reach `dedupe` in sorted batches after their events are stored (see store::dedupe);
-- this is the last event whose key is there. Every earlier event's key already is.
INSERT INTO meta (key, value) SELECT 'dedupe_merged', coalesce(max(id), 0) FROM events;
",
];

/// The columns [`event_at`] reads, in its order, of `events` aliased `e`.
macro_rules! event_columns {
    () => {
        "e.id, e.source, e.delivery_id, e.event_type, e.occurred_at, e.received_at, e.sender_delivery, e.payload"
    };
}
/// One event per row, as [`row_to_event`] reads it.
pub(crate) const SELECT_EVENT: &str = concat!("SELECT ", event_columns!(), " FROM events e");
/// How often the checkpointer copies the WAL back into the database file.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(100);
/// How often the writer itself finishes a checkpoint between batches. Only a checkpoint that
/// no commit races can complete, and only after a complete one does SQLite restart the WAL
/// from its beginning: without this the WAL grows without bound under sustained load.
const WRITER_CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// Depth of the writer's queue; a full queue makes handlers wait, which is the backpressure.
const QUEUE_DEPTH: usize = 8192;

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
    #[error("cannot open the database {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A batch failed; every command in it shares the cause.
    #[error("database write failed: {0}")]
    Write(Arc<rusqlite::Error>),
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
}

/// Sinks whose new jobs the delivery engine takes straight from ingest, with their event in
/// memory, instead of reading them back from the database. Their rows are still written with
/// the event, as the durable copy, but they come due only at `fallback`: until then no read
/// of due jobs finds them, so the engine cannot be given the same job twice. A job whose
/// hand-over never happened (the process died, or the request was dropped) is picked up from
/// the database then, or at the next start ([`Store::open`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Handoff {
    pub sinks: Vec<String>,
    pub fallback: Timestamp,
}

/// A routing outcome that creates no job, as recorded in `dispatches`. (Earlier versions also
/// recorded `unrouted` there; such rows stay valid.)
const SUPPRESSED: &str = "suppressed";

/// What periodic pruning removes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prunable {
    /// Delivery ids remembered for deduplication.
    Dedupe,
    /// Events whose routing and deliveries are finished, with their jobs and attempts.
    Events,
    /// Throttle windows that closed.
    Throttles,
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
}

impl AttemptOutcome {
    /// Adds a remark about the attempt (e.g. that a default template was sent) to what the
    /// job record keeps of the sink's answer.
    pub fn note(&mut self, remark: &str) {
        let (Self::Succeeded { response }
        | Self::Failed { response, .. }
        | Self::Dead { response, .. }) = self;
        *response = if response.is_empty() {
            format!("note: {remark}")
        } else {
            format!("note: {remark}\n{response}")
        };
    }
}

/// The columns of a new event row. The parsed payload stays with the caller: dropping a JSON
/// tree is work the single writer thread should not do.
struct NewEvent {
    source: String,
    delivery_id: String,
    event_type: String,
    occurred_at: Option<String>,
    received_at: i64,
    sender_delivery: Option<String>,
    body: Vec<u8>,
    /// The event's time on its own clock, for throttles (unix milliseconds).
    occurred_ms: i64,
    routes: Vec<RouteTo>,
    handoff: Handoff,
}

enum Op {
    Insert(Box<NewEvent>),
    /// One attempt's outcomes: one job's, or every job of a batch or digest.
    FinishAttempt {
        outcomes: Vec<(Job, AttemptOutcome)>,
        started_at: i64,
        at: i64,
    },
    Touch {
        at: i64,
    },
    Prune {
        what: Prunable,
        /// How long records are kept, in milliseconds, on the clock their table uses.
        keep: i64,
        now: i64,
        limit: usize,
    },
    /// Answered after everything queued before it committed; the writer then exits.
    Shutdown,
}

enum Done {
    Inserted(Inserted),
    Count(usize),
    Unit,
}

struct Command {
    op: Op,
    reply: oneshot::Sender<Result<Done, StoreError>>,
}

/// Handle to the database: cheap to clone, shared by the HTTP handlers and the delivery engine.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    /// Held while the store is open: see [`lock_instance`].
    _instance: std::fs::File,
    queue: mpsc::Sender<Command>,
    reader: Mutex<Connection>,
    /// `None` once closed.
    threads: Mutex<Option<Threads>>,
}

struct Threads {
    writer: JoinHandle<()>,
    syncer: JoinHandle<()>,
    checkpointer: JoinHandle<()>,
    /// Dropping it stops the checkpointer.
    stop_checkpoints: std::sync::mpsc::Sender<()>,
}

impl Store {
    /// Opens (creating if needed) the database, migrates it and starts the writer thread.
    ///
    /// # Errors
    /// [`StoreError`] when the directory or database cannot be created, opened or migrated.
    pub fn open(config: &StorageConfig) -> Result<Self, StoreError> {
        let path = config.path.clone();
        if let Some(dir) = path.parent() {
            crate::private::create_dir(dir).map_err(|source| StoreError::CreateDir {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let instance = lock_instance(&path)?;
        // Created private before SQLite sees it: SQLite gives the WAL and shared-memory files
        // the database file's own mode.
        crate::private::touch(&path).map_err(|source| StoreError::Create {
            path: path.clone(),
            source,
        })?;
        let open_err = |source| StoreError::Open {
            path: path.clone(),
            source,
        };
        let mut writer = Connection::open(&path).map_err(open_err)?;
        writer.busy_timeout(config.busy_timeout).map_err(open_err)?;
        // The page cache is small on purpose: reads come through the memory map, and when
        // a B-tree split renumbers pages SQLite parks one at a page number past 1 GiB, after
        // which the next commit scans the whole cache for pages past the end of the file. At
        // 64 MiB that scan alone was 5% of the daemon's CPU under load.
        writer
            .execute_batch(
                "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;
                 PRAGMA wal_autocheckpoint = 0; PRAGMA cache_size = -2048;
                 PRAGMA mmap_size = 268435456;",
            )
            .map_err(open_err)?;
        migrate(&mut writer).map_err(open_err)?;
        recover_handed(&writer).map_err(open_err)?;
        let recent = dedupe::Recent::open(&mut writer).map_err(open_err)?;
        let reader = open_reader(&path, config).map_err(open_err)?;
        // The connections' first reads in WAL mode created the WAL file. SQLite deletes it only
        // when the last connection closes, and the writer's stays open until every flush is
        // done, so this descriptor names the live WAL throughout.
        let wal = open_wal(&path).map_err(|source| StoreError::OpenWal {
            path: path.clone(),
            source,
        })?;

        let checkpointer = Connection::open(&path).map_err(open_err)?;
        checkpointer
            .busy_timeout(config.busy_timeout)
            .map_err(open_err)?;

        let (queue, rx) = mpsc::channel(QUEUE_DEPTH);
        let max_batch = config.max_batch;
        let (to_syncer, committed) = std::sync::mpsc::channel();
        let failed = SyncFailure::default();
        let syncer = std::thread::Builder::new()
            .name("hookroute-sync".into())
            .spawn({
                let failed = Arc::clone(&failed);
                let answer = replier(tokio::runtime::Handle::try_current().ok());
                move || sync_loop(|| wal.sync_data(), &committed, &failed, answer)
            })
            .map_err(StoreError::Thread)?;
        let writer = std::thread::Builder::new()
            .name("hookroute-writer".into())
            .spawn(move || writer_loop(writer, recent, rx, max_batch, &to_syncer, &failed))
            .map_err(StoreError::Thread)?;
        let (stop_checkpoints, stop) = std::sync::mpsc::channel();
        let checkpointer = std::thread::Builder::new()
            .name("hookroute-checkpoint".into())
            .spawn(move || checkpoint_loop(checkpointer, stop))
            .map_err(StoreError::Thread)?;
        Ok(Self {
            inner: Arc::new(Inner {
                _instance: instance,
                queue,
                reader: Mutex::new(reader),
                threads: Mutex::new(Some(Threads {
                    writer,
                    syncer,
                    checkpointer,
                    stop_checkpoints,
                })),
            }),
        })
    }

    /// Stores a verified delivery, routed to `routes`, unless its `(source, delivery_id)` was
    /// seen before. Returns only once the transaction holding it is on disk.
    ///
    /// # Errors
    /// [`StoreError`] when the write failed: nothing was stored.
    pub async fn insert(
        &self,
        event: &Event,
        body: Vec<u8>,
        received_at: Timestamp,
        routes: Vec<RouteTo>,
        handoff: Handoff,
    ) -> Result<Inserted, StoreError> {
        let op = Op::Insert(Box::new(NewEvent {
            source: event.source.clone(),
            delivery_id: event.delivery_id.clone(),
            event_type: event.event_type.clone(),
            occurred_at: event.occurred_at.map(|t| t.to_string()),
            received_at: received_at.as_millisecond(),
            sender_delivery: event.sender_delivery.clone(),
            body,
            occurred_ms: event.occurred_at.unwrap_or(received_at).as_millisecond(),
            routes,
            handoff,
        }));
        match self.submit(op).await? {
            Done::Inserted(inserted) => Ok(inserted),
            _ => unreachable!("insert answers Inserted"),
        }
    }

    /// Up to `limit` due jobs of `sink`, oldest due first, each with its event, leaving out
    /// `held` (the jobs the engine is already attempting). With `hold`, none until the oldest
    /// due job has waited that long; then all of them (a digest). With `due_by`, jobs due up
    /// to then rather than now.
    ///
    /// A read: which jobs are being attempted is the engine's to know, in memory. Marking
    /// them in the database would cost every job a write through the single writer, and a
    /// crash needs no mark: a job is pending until its outcome is recorded, so whatever was
    /// being attempted is attempted again after a restart.
    ///
    /// # Errors
    /// [`StoreError`] on a database error.
    pub async fn due_jobs(
        &self,
        sink: &str,
        limit: usize,
        hold: Option<std::time::Duration>,
        due_by: Option<Timestamp>,
        held: HashSet<i64>,
    ) -> Result<Vec<DueJob>, StoreError> {
        let sink = sink.to_owned();
        let now = Timestamp::now().as_millisecond();
        let due_by = due_by.map_or(now, Timestamp::as_millisecond);
        self.read(move |conn| {
            if let Some(hold) = hold {
                let oldest: Option<i64> = conn
                    .prepare_cached(
                        "SELECT created_at FROM jobs INDEXED BY jobs_waiting
                         WHERE sink = ?1 AND status IN ('pending', 'failed') AND next_attempt_at <= ?2
                         ORDER BY created_at LIMIT 1",
                    )?
                    .query_row(params![sink, due_by], |row| row.get(0))
                    .optional()?;
                let hold_ms = i64::try_from(hold.as_millis()).unwrap_or(i64::MAX);
                if oldest.is_none_or(|oldest| oldest.saturating_add(hold_ms) > now) {
                    return Ok(Vec::new());
                }
            }
            // `LIMIT 0 + ?3`, not `LIMIT ?3`: SQLite plans a bare LIMIT parameter by its value
            // and so re-prepares the statement whenever the limit changes, which here is
            // nearly every time. Held jobs are among the first due, so asking for that many
            // more leaves `limit` after they are skipped.
            let mut stmt = conn.prepare_cached(concat!(
                "SELECT j.id, j.event_id, j.route, j.sink, j.attempts, j.created_at, ",
                event_columns!(),
                " FROM jobs j INDEXED BY jobs_due LEFT JOIN events e ON e.id = j.event_id
                 WHERE j.sink = ?1 AND j.status IN ('pending', 'failed') AND j.next_attempt_at <= ?2
                 ORDER BY j.next_attempt_at, j.id LIMIT 0 + ?3"
            ))?;
            let mut rows = stmt.query(params![sink, due_by, (limit + held.len()) as i64])?;
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
                };
                let event = match row.get_ref(6)? {
                    rusqlite::types::ValueRef::Null => None,
                    _ => Some(event_at(row, 6)?.event),
                };
                due.push(DueJob { job, event });
            }
            Ok(due)
        })
        .await
    }

    /// Records an attempt and moves its jobs on: each succeeded, failed (due again later) or
    /// dead. One write for all of them, however many jobs the attempt carried.
    ///
    /// # Errors
    /// [`StoreError`] when the write failed; the jobs stay due.
    pub async fn finish_attempt(
        &self,
        outcomes: Vec<(Job, AttemptOutcome)>,
        started_at: Timestamp,
    ) -> Result<(), StoreError> {
        let op = Op::FinishAttempt {
            outcomes,
            started_at: started_at.as_millisecond(),
            at: Timestamp::now().as_millisecond(),
        };
        self.submit(op).await.map(|_| ())
    }

    /// For each sink with jobs waiting: when the next is due and when the oldest was created.
    ///
    /// # Errors
    /// [`StoreError`] on a database error.
    pub async fn due_summary(&self) -> Result<HashMap<String, DueSummary>, StoreError> {
        self.read(|conn| {
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
        })
        .await
    }

    /// Proves the database takes writes (readiness).
    ///
    /// # Errors
    /// [`StoreError`] when it does not.
    pub async fn touch(&self) -> Result<(), StoreError> {
        self.submit(Op::Touch {
            at: Timestamp::now().as_millisecond(),
        })
        .await
        .map(|_| ())
    }

    /// Deletes up to `limit` records of `what` older than `keep`; returns how many went.
    /// Dedupe records and events are aged by the wall clock; throttle windows by the events'
    /// own clock (the newest window's start), the one their windows are measured on.
    ///
    /// # Errors
    /// [`StoreError`] when the write failed.
    pub async fn prune(
        &self,
        what: Prunable,
        keep: std::time::Duration,
        limit: usize,
    ) -> Result<usize, StoreError> {
        let keep = i64::try_from(keep.as_millis()).unwrap_or(i64::MAX);
        match self
            .submit(Op::Prune {
                what,
                keep,
                now: Timestamp::now().as_millisecond(),
                limit,
            })
            .await?
        {
            Done::Count(n) => Ok(n),
            _ => unreachable!("prune answers Count"),
        }
    }

    async fn submit(&self, op: Op) -> Result<Done, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.inner
            .queue
            .send(Command { op, reply })
            .await
            .map_err(|_| StoreError::WriterGone)?;
        answer.await.map_err(|_| StoreError::WriterGone)?
    }

    /// Runs a read on the read connection, off the async threads.
    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            let conn = inner
                .reader
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            f(&conn).map_err(StoreError::from)
        })
        .await
        .map_err(|_| StoreError::WriterGone)?
    }

    /// Lets the writer commit everything queued before this call, then stops it. Idempotent.
    pub async fn close(&self) {
        let threads = self
            .inner
            .threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(threads) = threads {
            if let Err(err) = self.submit(Op::Shutdown).await {
                tracing::warn!(error = %err, "database writer did not stop cleanly");
            }
            let _ = tokio::task::spawn_blocking(move || {
                let _ = threads.writer.join();
                let _ = threads.syncer.join();
                drop(threads.stop_checkpoints);
                let _ = threads.checkpointer.join();
            })
            .await;
        }
    }
}

/// One daemon per database: the jobs being attempted and the newest delivery ids are held in
/// memory, so a second daemon on the same file would attempt those jobs again and miss those
/// duplicates. An advisory lock on `<database>.lock`, which the
/// kernel releases however the process ends; the command-line tools do not take it.
fn lock_instance(db: &Path) -> Result<std::fs::File, StoreError> {
    let mut path = db.as_os_str().to_owned();
    path.push(".lock");
    let path = PathBuf::from(path);
    let lock_err = |source| StoreError::Lock {
        path: path.clone(),
        source,
    };
    let file =
        crate::private::open(&path, std::fs::OpenOptions::new().write(true)).map_err(lock_err)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::InUse {
            path: db.to_path_buf(),
        }),
        Err(std::fs::TryLockError::Error(source)) => Err(lock_err(source)),
    }
}

fn open_reader(path: &Path, config: &StorageConfig) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(config.busy_timeout)?;
    Ok(conn)
}

/// Brings the schema up to date, then enforces foreign keys on `conn`.
fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    // Off while migrating: rebuilding a table drops the old one, which foreign keys would
    // refuse while other tables point at it. The pragma is a no-op inside a transaction.
    conn.pragma_update(None, "foreign_keys", false)?;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let version: i64 = tx.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    for (i, sql) in (1..)
        .zip(MIGRATIONS)
        .skip(usize::try_from(version).unwrap_or(0))
    {
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i)?;
    }
    tx.commit()?;
    conn.pragma_update(None, "foreign_keys", true)
}

/// A committed batch's answers, waiting for the WAL flush.
type Answers = Vec<(oneshot::Sender<Result<Done, StoreError>>, Done)>;

/// The first WAL flush failure, shared by the syncer (who sets it) and the writer (who then
/// refuses to write).
type SyncFailure = Arc<OnceLock<Arc<std::io::Error>>>;

fn writer_loop(
    mut conn: Connection,
    mut recent: dedupe::Recent,
    mut rx: mpsc::Receiver<Command>,
    max_batch: usize,
    syncer: &std::sync::mpsc::Sender<Answers>,
    failed: &SyncFailure,
) {
    let mut batch = Vec::with_capacity(max_batch);
    let mut last_checkpoint = std::time::Instant::now();
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(cmd) => batch.push(cmd),
                Err(_) => break,
            }
        }
        let stop = batch.iter().any(|cmd| matches!(cmd.op, Op::Shutdown));
        if let Some(err) = failed.get() {
            for cmd in batch.drain(..) {
                let _ = cmd.reply.send(Err(StoreError::Sync(Arc::clone(err))));
            }
        } else {
            match apply_batch(&mut conn, &mut recent, &batch) {
                Ok(done) => {
                    let answers = batch.drain(..).map(|cmd| cmd.reply).zip(done).collect();
                    if syncer.send(answers).is_err() {
                        break;
                    }
                }
                Err(err) => {
                    // Rolled back: nothing to flush, so the answer need not wait.
                    tracing::error!(error = %err, commands = batch.len(), "database batch failed");
                    let err = Arc::new(err);
                    for cmd in batch.drain(..) {
                        let _ = cmd.reply.send(Err(StoreError::Write(Arc::clone(&err))));
                    }
                }
            }
        }
        if (stop || recent.due())
            && let Err(err) = recent.merge(&mut conn)
        {
            // The keys stay in memory, still deciding, and the next merge takes them too.
            tracing::warn!(error = %err, "merging delivery ids into the dedupe index failed");
        }
        if stop {
            break;
        }
        if last_checkpoint.elapsed() >= WRITER_CHECKPOINT_EVERY {
            last_checkpoint = std::time::Instant::now();
            // Cheap: the checkpointer thread has already copied all but the newest frames.
            if let Err(err) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                tracing::warn!(error = %err, "WAL checkpoint failed");
            }
        }
    }
    tracing::debug!("database writer stopped");
}

/// Flushes the WAL (`flush`), then hands every batch committed before the flush began to
/// `answer`, with its outcome. Runs until the writer hangs up.
fn sync_loop(
    mut flush: impl FnMut() -> std::io::Result<()>,
    committed: &std::sync::mpsc::Receiver<Answers>,
    failed: &SyncFailure,
    mut answer: impl FnMut(Replies),
) {
    while let Ok(first) = committed.recv() {
        let ready: Vec<Answers> = std::iter::once(first).chain(committed.try_iter()).collect();
        let synced = match failed.get() {
            Some(err) => Err(Arc::clone(err)),
            None => flush().map_err(|err| {
                tracing::error!(error = %err, "cannot flush the database WAL; refusing writes until restarted");
                Arc::clone(failed.get_or_init(|| Arc::new(err)))
            }),
        };
        let replies = ready.into_iter().flatten().map(|(reply, done)| {
            let outcome = match &synced {
                Ok(()) => Ok(done),
                Err(err) => Err(StoreError::Sync(Arc::clone(err))),
            };
            (reply, outcome)
        });
        answer(replies.collect());
    }
    tracing::debug!("database syncer stopped");
}

/// Flushed commands and their outcomes, ready to be answered.
type Replies = Vec<(
    oneshot::Sender<Result<Done, StoreError>>,
    Result<Done, StoreError>,
)>;

fn send_replies(replies: Replies) {
    for (reply, outcome) in replies {
        let _ = reply.send(outcome);
    }
}

/// How the syncer answers: through a task on `runtime` if there is one. A reply sent from the
/// syncer thread wakes its handler through the runtime's shared queue, often unparking a
/// worker, a futex call each; sent from a task on the runtime it is a push onto a local
/// queue. So a flush costs one wake from outside, however many requests it answers (ingest
/// +5% to +10%).
fn replier(runtime: Option<tokio::runtime::Handle>) -> impl FnMut(Replies) {
    let to_task = runtime.map(|runtime| {
        let (to_task, mut flushed) = mpsc::unbounded_channel::<Replies>();
        runtime.spawn(async move {
            while let Some(replies) = flushed.recv().await {
                send_replies(replies);
            }
        });
        to_task
    });
    move |replies| match &to_task {
        Some(to_task) => {
            if let Err(unsent) = to_task.send(replies) {
                send_replies(unsent.0); // the runtime is shutting down
            }
        }
        None => send_replies(replies),
    }
}

/// Makes the jobs handed to the delivery engine of an earlier run, and not finished by it, due
/// from when they were created, as any other new job: no engine holds them now. A pending job
/// due after its creation is one of those, since every other pending job is written due at
/// once.
fn recover_handed(conn: &Connection) -> rusqlite::Result<()> {
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

fn open_wal(db: &Path) -> std::io::Result<std::fs::File> {
    let mut path = db.as_os_str().to_owned();
    path.push("-wal");
    std::fs::OpenOptions::new().write(true).open(path)
}

fn apply_batch(
    conn: &mut Connection,
    recent: &mut dedupe::Recent,
    batch: &[Command],
) -> rusqlite::Result<Vec<Done>> {
    let applied = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .and_then(|tx| {
            let done = batch
                .iter()
                .map(|cmd| apply(&tx, recent, &cmd.op))
                .collect::<rusqlite::Result<Vec<_>>>()?;
            tx.commit()?;
            Ok(done)
        });
    match applied {
        Ok(_) => recent.commit(),
        Err(_) => recent.roll_back(),
    }
    applied
}

fn apply(
    tx: &rusqlite::Transaction<'_>,
    recent: &mut dedupe::Recent,
    op: &Op,
) -> rusqlite::Result<Done> {
    match op {
        Op::Insert(event) => {
            if let Some(first) = recent.seen(tx, &event.source, &event.delivery_id)? {
                return Ok(Done::Inserted(Inserted::Duplicate(first)));
            }
            tx.prepare_cached(
                "INSERT INTO events (source, delivery_id, event_type, occurred_at, received_at, sender_delivery, payload)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![
                event.source,
                event.delivery_id,
                event.event_type,
                event.occurred_at,
                event.received_at,
                event.sender_delivery,
                event.body,
            ])?;
            let id = tx.last_insert_rowid();
            recent.stage(&event.source, &event.delivery_id, id, event.received_at);
            let (jobs, handed, suppressed) = apply_routes(tx, id, event)?;
            Ok(Done::Inserted(Inserted::New {
                id,
                jobs,
                handed,
                suppressed,
            }))
        }
        Op::FinishAttempt {
            outcomes,
            started_at,
            at,
        } => {
            let mut update = tx.prepare_cached(
                "UPDATE jobs SET status = ?2, last_error = ?3, response = ?4, next_attempt_at = ?5, updated_at = ?6,
                                attempts = ?7
                 WHERE id = ?1",
            )?;
            let mut record = tx.prepare_cached(
                "INSERT INTO attempts (job_id, number, started_at, finished_at, outcome, error, response)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            for (job, outcome) in outcomes {
                let (status, error, response, next) = match outcome {
                    AttemptOutcome::Succeeded { response } => ("succeeded", None, response, *at),
                    AttemptOutcome::Failed {
                        error,
                        response,
                        retry_at,
                    } => ("failed", Some(error), response, retry_at.as_millisecond()),
                    AttemptOutcome::Dead { error, response } => {
                        ("dead", Some(error), response, *at)
                    }
                };
                update.execute(params![
                    job.id,
                    status,
                    error,
                    response,
                    next,
                    at,
                    job.attempt
                ])?;
                record.execute(params![
                    job.id,
                    job.attempt,
                    started_at,
                    at,
                    status,
                    error,
                    response
                ])?;
            }
            Ok(Done::Unit)
        }
        Op::Touch { at } => {
            set_meta(tx, "last_ready_check", &at.to_string())?;
            Ok(Done::Unit)
        }
        Op::Prune {
            what: Prunable::Dedupe,
            keep,
            now,
            limit,
        } => {
            let before = now.saturating_sub(*keep);
            let n = tx
                .prepare_cached(
                    "DELETE FROM dedupe WHERE (source, delivery_id) IN
                     (SELECT source, delivery_id FROM dedupe WHERE seen_at < ?1 LIMIT ?2)",
                )?
                .execute(params![before, *limit as i64])?;
            Ok(Done::Count(n))
        }
        Op::Prune {
            what: Prunable::Events,
            keep,
            now,
            limit,
        } => {
            let before = now.saturating_sub(*keep);
            // Oldest first, stopping at the first event young enough to keep (ids grow with
            // time), so only expired rows are read; skipped are events with a delivery still
            // to come.
            let mut expired = Vec::new();
            let mut scan = tx.prepare_cached(
                "SELECT id, received_at, EXISTS (SELECT 1 FROM jobs j WHERE j.event_id = events.id
                                                 AND j.status IN ('pending', 'failed'))
                 FROM events ORDER BY id",
            )?;
            let mut rows = scan.query([])?;
            while let Some(row) = rows.next()? {
                if row.get::<_, i64>(1)? >= before || expired.len() >= *limit {
                    break;
                }
                if !row.get::<_, bool>(2)? {
                    expired.push(row.get::<_, i64>(0)?);
                }
            }
            for id in &expired {
                for sql in [
                    "DELETE FROM attempts WHERE job_id IN (SELECT id FROM jobs WHERE event_id = ?1)",
                    "DELETE FROM jobs WHERE event_id = ?1",
                    "DELETE FROM dispatches WHERE event_id = ?1",
                    "DELETE FROM events WHERE id = ?1",
                ] {
                    tx.prepare_cached(sql)?.execute([id])?;
                }
            }
            Ok(Done::Count(expired.len()))
        }
        Op::Prune {
            what: Prunable::Throttles,
            keep,
            limit,
            ..
        } => {
            let n = tx
                .prepare_cached(
                    "DELETE FROM throttles WHERE (route, key) IN
                     (SELECT route, key FROM throttles
                      WHERE started_at + window_ms < (SELECT max(started_at) FROM throttles) - ?1 LIMIT ?2)",
                )?
                .execute(params![keep, *limit as i64])?;
            Ok(Done::Count(n))
        }
        Op::Shutdown => Ok(Done::Unit),
    }
}

/// Creates a new event's jobs, one per sink of every route that takes it, unless the route's
/// throttle suppresses it; records what created no job. Returns how many jobs it created,
/// those for handed-over sinks, and the suppressing routes.
fn apply_routes(
    tx: &rusqlite::Transaction<'_>,
    event_id: i64,
    event: &NewEvent,
) -> rusqlite::Result<(usize, Vec<Job>, Vec<String>)> {
    // An event no route takes is known by having neither jobs nor dispatch rows (`deliveries
    // list` shows it as unrouted): a row of its own would be a write and an index entry per
    // event, when taking no route can be the common case.
    if event.routes.is_empty() {
        return Ok((0, Vec::new(), Vec::new()));
    }
    let mut record = tx.prepare_cached(
        "INSERT INTO dispatches (event_id, route, status, detail, at) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    let mut job = tx.prepare_cached(
        "INSERT INTO jobs (event_id, route, sink, status, next_attempt_at, created_at, updated_at)
         VALUES (?1, ?2, ?3, 'pending', ?4, ?5, ?5)",
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
            let hand = event.handoff.sinks.contains(sink);
            let due = if hand {
                event.handoff.fallback.as_millisecond()
            } else {
                event.received_at
            };
            job.execute(params![event_id, to.route, sink, due, event.received_at])?;
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
    tx: &rusqlite::Transaction<'_>,
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

/// A stored unix-millisecond time; a corrupt one reads as the epoch rather than failing.
pub(crate) fn from_ms(ms: i64) -> Timestamp {
    Timestamp::from_millisecond(ms).unwrap_or(Timestamp::UNIX_EPOCH)
}

fn set_meta(tx: &rusqlite::Transaction<'_>, key: &str, value: &str) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO meta (key, value) VALUES (?1, ?2)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    )?
    .execute(params![key, value])?;
    Ok(())
}

/// Copies the WAL back into the database file off the commit path: the writer has
/// `wal_autocheckpoint` off, so no ingest ever waits for a checkpoint. Runs until `stop` is
/// dropped, then truncates the WAL once more.
fn checkpoint_loop(conn: Connection, stop: std::sync::mpsc::Receiver<()>) {
    let checkpoint = |mode: &str| {
        if let Err(err) = conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |_| Ok(()))
        {
            tracing::warn!(error = %err, "WAL checkpoint failed");
        }
    };
    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(CHECKPOINT_EVERY)
    {
        checkpoint("PASSIVE");
    }
    checkpoint("TRUNCATE");
}

fn row_to_event(row: &rusqlite::Row<'_>) -> rusqlite::Result<StoredEvent> {
    event_at(row, 0)
}

/// The `event_columns!()`, starting at column `first`.
fn event_at(row: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<StoredEvent> {
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
            // Stored only after it parsed, so this holds JSON; `Null` guards a hand-edited row.
            payload: Payload::from_slice(payload).unwrap_or_default(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn committed(n: usize) -> (Answers, Vec<oneshot::Receiver<Result<Done, StoreError>>>) {
        (0..n)
            .map(|_| {
                let (reply, answer) = oneshot::channel();
                ((reply, Done::Unit), answer)
            })
            .unzip()
    }

    /// A database made by the first `version` migrations and holding `rows`, then migrated to
    /// the current schema.
    fn migrated_from(version: usize, rows: &str) -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        let old = Connection::open(&path).unwrap();
        for (number, sql) in (1..).zip(&MIGRATIONS[..version]) {
            old.execute_batch(sql).unwrap();
            old.pragma_update(None, "user_version", number).unwrap();
        }
        old.execute_batch(rows).unwrap();
        drop(old);
        let mut conn = Connection::open(&path).unwrap();
        migrate(&mut conn).unwrap();
        (dir, conn)
    }

    /// A database from before routing moved into the ingest transaction: its dispatch cursor
    /// goes, jobs it marked in flight are pending again, and only dead letters stay indexed
    /// by status.
    #[test]
    fn migration_3_upgrades_a_version_2_database() {
        let (_dir, conn) = migrated_from(
            2,
            "INSERT INTO events (source, delivery_id, event_type, received_at, payload)
                 VALUES ('cl', 'd1', 'scan.completed', 0, '{}');
             INSERT INTO jobs (event_id, route, sink, status, attempts, next_attempt_at, created_at, updated_at)
                 VALUES (1, 'r', 'archive', 'in_flight', 1, 0, 0, 0), (1, 'r', 'mail', 'dead', 3, 0, 0, 0);
             INSERT INTO meta (key, value) VALUES ('dispatch_cursor', '1');",
        );
        let query = |sql: &str| -> String { conn.query_row(sql, [], |r| r.get(0)).unwrap() };
        assert_eq!(
            query("SELECT group_concat(status) FROM jobs ORDER BY id"),
            "pending,dead"
        );
        assert_eq!(
            query(
                "SELECT group_concat(name) FROM sqlite_schema WHERE name IN ('jobs_status', 'dispatches_status', 'jobs_dead')"
            ),
            "jobs_dead"
        );
        assert_eq!(
            query("SELECT count(*) || '' FROM meta WHERE key = 'dispatch_cursor'"),
            "0"
        );
        let plan: Vec<String> = conn
            .prepare("EXPLAIN QUERY PLAN SELECT id FROM jobs WHERE status = 'dead'")
            .unwrap()
            .query_map([], |row| row.get(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(
            plan.iter().any(|step| step.contains("jobs_dead")),
            "{plan:?}"
        );
    }

    /// Jobs and attempts keep their rows, indexes and checks through the rebuild, and writing
    /// them no longer builds a temporary table per statement.
    #[test]
    fn migration_4_rebuilds_jobs_and_attempts_with_the_same_rows() {
        let (_dir, conn) = migrated_from(
            3,
            "INSERT INTO events (source, delivery_id, event_type, received_at, payload)
                 VALUES ('cl', 'd1', 'scan.completed', 0, '{}');
             INSERT INTO jobs (event_id, route, sink, status, attempts, next_attempt_at, created_at, updated_at, last_error)
                 VALUES (1, 'r', 'archive', 'failed', 1, 5, 0, 1, 'HTTP 500'), (1, 'r', 'mail', 'dead', 3, 0, 0, 0, 'gone');
             INSERT INTO attempts (job_id, number, started_at, finished_at, outcome, error)
                 VALUES (1, 1, 0, 1, 'failed', 'HTTP 500'), (2, 3, 0, 0, 'dead', 'gone');",
        );
        let query = |sql: &str| -> String { conn.query_row(sql, [], |r| r.get(0)).unwrap() };
        assert_eq!(
            query(
                "SELECT group_concat(id || ':' || sink || ':' || status || ':' || attempts || ':' || last_error, ' ')
                 FROM jobs"
            ),
            "1:archive:failed:1:HTTP 500 2:mail:dead:3:gone"
        );
        assert_eq!(
            query("SELECT group_concat(job_id || ':' || outcome, ' ') FROM attempts"),
            "1:failed 2:dead"
        );
        assert_eq!(
            query(
                "SELECT group_concat(name, ' ') FROM sqlite_schema
                 WHERE type = 'index' AND tbl_name IN ('jobs', 'attempts') ORDER BY name"
            ),
            "jobs_event jobs_due jobs_waiting jobs_dead attempts_job"
        );
        // Migration 5: the old writer stored every key with its event, so the merged keys
        // end at the last event.
        assert_eq!(
            query("SELECT value FROM meta WHERE key = 'dedupe_merged'"),
            "1"
        );
        assert!(
            conn.execute("UPDATE jobs SET status = 'lost' WHERE id = 1", [])
                .is_err(),
            "the status check survives the rebuild"
        );
        assert!(
            conn.execute(
                "INSERT INTO attempts (job_id, number, started_at, finished_at, outcome) VALUES (9, 1, 0, 0, 'succeeded')",
                [],
            )
            .is_err(),
            "attempts still reference jobs"
        );
        for sql in [
            "INSERT INTO jobs (event_id, route, sink, status, next_attempt_at, created_at, updated_at)
             VALUES (1, 'r', 'archive', 'pending', 0, 0, 0)",
            "UPDATE jobs SET status = 'succeeded' WHERE id = 1",
            "INSERT INTO attempts (job_id, number, started_at, finished_at, outcome) VALUES (1, 2, 0, 0, 'succeeded')",
        ] {
            let program: Vec<String> = conn
                .prepare(&format!("EXPLAIN {sql}"))
                .unwrap()
                .query_map([], |row| row.get(1))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            assert!(
                !program.iter().any(|op| op == "OpenEphemeral"),
                "{sql}: {program:?}"
            );
        }
    }

    /// One failed flush poisons the store: that batch and every later one is answered with the
    /// error, even if a later flush would succeed (the kernel may have dropped the pages).
    #[test]
    fn a_failed_flush_refuses_everything_after_it() {
        let (to_syncer, from_writer) = std::sync::mpsc::channel();
        let (first, mut first_answers) = committed(1);
        let (second, mut second_answers) = committed(2);
        to_syncer.send(first).unwrap();
        drop(to_syncer);
        let failed = SyncFailure::default();
        let mut flushes = 0;
        sync_loop(
            || {
                flushes += 1;
                Err(std::io::Error::other("EIO"))
            },
            &from_writer,
            &failed,
            send_replies,
        );
        assert_eq!(flushes, 1);
        assert!(matches!(
            first_answers[0].try_recv(),
            Ok(Err(StoreError::Sync(_)))
        ));
        assert!(failed.get().is_some());

        let (to_syncer, from_writer) = std::sync::mpsc::channel();
        to_syncer.send(second).unwrap();
        drop(to_syncer);
        sync_loop(|| Ok(()), &from_writer, &failed, send_replies);
        for answer in &mut second_answers {
            assert!(matches!(answer.try_recv(), Ok(Err(StoreError::Sync(_)))));
        }
    }

    #[test]
    fn answers_wait_for_the_flush() {
        let (to_syncer, from_writer) = std::sync::mpsc::channel();
        let (batch, answers) = committed(3);
        to_syncer.send(batch).unwrap();
        drop(to_syncer);
        let answers = std::cell::RefCell::new(answers);
        let mut unanswered_at_flush = 0;
        sync_loop(
            || {
                unanswered_at_flush = answers
                    .borrow_mut()
                    .iter_mut()
                    .map(|answer| answer.try_recv())
                    .filter(Result::is_err)
                    .count();
                Ok(())
            },
            &from_writer,
            &SyncFailure::default(),
            send_replies,
        );
        assert_eq!(unanswered_at_flush, 3);
        for answer in answers.borrow_mut().iter_mut() {
            assert!(matches!(answer.try_recv(), Ok(Ok(Done::Unit))));
        }
    }
}
