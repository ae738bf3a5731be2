//! The SQLite backend: migrations, the single writer thread (group commit) and typed queries.
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
//!
//! Where things are: this file holds the [`SqliteStore`] handle and its start-up
//! sequence; [`schema`] the migrations; [`writer`] the writer, syncer and checkpointer threads
//! and the commands they apply; [`events`] storing an event with its routing outcome; [`jobs`]
//! the due-job reads and attempt records; [`dedupe`] the delivery-id index; [`retention`]
//! pruning and returning freed space; [`admin`] the command-line tools' queries.

/// The columns [`events::event_at`] reads, in its order, of `events` aliased `e`.
macro_rules! event_columns {
    () => {
        "e.id, e.source, e.delivery_id, e.event_type, e.occurred_at, e.received_at, e.sender_delivery, e.payload"
    };
}

pub mod admin;
mod dedupe;
mod events;
mod jobs;
mod passes;
mod retention;
mod schema;
mod silences;
mod sinks;
mod writer;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use jiff::Timestamp;
use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use async_trait::async_trait;

use super::{
    AttemptOutcome, DueJob, DueSummary, Gather, Handoff, Inserted, Job, NewEvent, Prunable,
    PruneStep, Quiet, RouteTo, Silence, SinkChange, SinkChanged, SinkState, Storage, StoreError,
    StoredEvent, from_ms,
};
use crate::config::StorageConfig;
use crate::event::Event;
use crate::metrics::SinkQueue;
use crate::store::passes::{Begun, PassEnd, Schedule};
use writer::{Command, Done, Op, QUEUE_DEPTH, SyncFailure};

/// The SQLite database: cheap to clone, shared by the HTTP handlers and the delivery engine.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// The database file, for its size.
    path: PathBuf,
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

impl SqliteStore {
    /// Opens (creating if needed) the database, migrates it and starts the writer thread.
    ///
    /// # Errors
    /// [`StoreError`] when the directory or database cannot be created, opened or migrated.
    pub fn open(path: &Path, config: &StorageConfig) -> Result<Self, StoreError> {
        let path = path.to_path_buf();
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
        let open_err = open_error(&path);
        let mut writer = Connection::open(&path).map_err(open_err)?;
        writer.busy_timeout(config.busy_timeout).map_err(open_err)?;
        // A new database tracks its free pages, so pruning can return the space to the file
        // system ([`retention::reclaim`]); an older one reuses it (a `VACUUM` converts it).
        let pages: i64 = writer
            .query_row("PRAGMA page_count", [], |row| row.get(0))
            .map_err(open_err)?;
        if pages == 0 {
            writer
                .pragma_update(None, "auto_vacuum", retention::INCREMENTAL)
                .map_err(open_err)?;
        }
        // The page cache is small on purpose: when a B-tree split renumbers pages SQLite
        // parks one at a page number past 1 GiB, after which the next commit scans the whole
        // cache for pages past the end of the file, which with a large cache cost a visible
        // share of the daemon's CPU under load. Nor is the file memory-mapped: what the writer
        // reads besides the hot pages (a delivery id's index leaf, say) comes from the
        // kernel's page cache just as fast, while every page read through a map stays in the
        // daemon's resident memory (the measurements: benches/LOG.md).
        writer
            .execute_batch(
                "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;
                 PRAGMA wal_autocheckpoint = 0; PRAGMA cache_size = -2048;
                 PRAGMA mmap_size = 0;",
            )
            .map_err(open_err)?;
        schema::migrate(&mut writer, &path)?;
        jobs::recover_handed(&writer).map_err(open_err)?;
        let recent = dedupe::Recent::open(&mut writer).map_err(open_err)?;
        let reader = open_reader(&path, config).map_err(open_err)?;
        // The connections' first reads in WAL mode created the WAL file. SQLite deletes it only
        // when the last connection closes, and the writer's stays open until every flush is
        // done, so this descriptor names the live WAL throughout.
        let wal = writer::open_wal(&path).map_err(|source| StoreError::OpenWal {
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
                let answer = writer::replier(tokio::runtime::Handle::try_current().ok());
                move || writer::sync_loop(|| wal.sync_data(), &committed, &failed, answer)
            })
            .map_err(StoreError::Thread)?;
        let writer = std::thread::Builder::new()
            .name("hookroute-writer".into())
            .spawn(move || writer::writer_loop(writer, recent, rx, max_batch, &to_syncer, &failed))
            .map_err(StoreError::Thread)?;
        let (stop_checkpoints, stop) = std::sync::mpsc::channel();
        let checkpointer = std::thread::Builder::new()
            .name("hookroute-checkpoint".into())
            .spawn(move || writer::checkpoint_loop(checkpointer, stop))
            .map_err(StoreError::Thread)?;
        Ok(Self {
            inner: Arc::new(Inner {
                path: path.clone(),
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
}

#[async_trait]
impl Storage for SqliteStore {
    async fn insert(
        &self,
        event: &Event,
        body: &[u8],
        received_at: Timestamp,
        routes: Vec<RouteTo>,
        handoff: Handoff,
    ) -> Result<Inserted, StoreError> {
        let op = Op::Insert(Box::new(NewEvent::new(
            event,
            body,
            received_at,
            routes,
            handoff,
        )));
        match self.submit(op).await? {
            Done::Inserted(inserted) => Ok(inserted),
            _ => unreachable!("insert answers Inserted"),
        }
    }

    async fn due_jobs(
        &self,
        sink: &str,
        limit: usize,
        gather: Gather,
        now: Timestamp,
        held: HashSet<i64>,
    ) -> Result<Vec<DueJob>, StoreError> {
        // A read: which jobs are being attempted is the engine's to know, in memory. Marking
        // them in the database would cost every job a write through the single writer, and a
        // crash needs no mark: a job is pending until its outcome is recorded. One daemon
        // serves the database, so a group's due jobs are read together whatever `gather` says.
        let hold = gather.hold();
        let sink = sink.to_owned();
        let now = now.as_millisecond();
        self.read(move |conn| jobs::due(conn, &sink, limit, hold, now, &held))
            .await
    }

    async fn finish_attempt(
        &self,
        outcomes: Vec<(Job, AttemptOutcome)>,
        started_at: Timestamp,
        finished_at: Timestamp,
    ) -> Result<(), StoreError> {
        let op = Op::FinishAttempt {
            outcomes,
            started_at: started_at.as_millisecond(),
            at: finished_at.as_millisecond(),
        };
        self.submit(op).await.map(|_| ())
    }

    async fn quiet(&self, jobs: Vec<(Job, Quiet)>, now: Timestamp) -> Result<(), StoreError> {
        let at = now.as_millisecond();
        self.submit(Op::Quiet { jobs, at }).await.map(|_| ())
    }

    async fn silences(&self, now: Timestamp) -> Result<Vec<Silence>, StoreError> {
        let now = now.as_millisecond();
        self.read(move |conn| silences::by_end(conn, now, false))
            .await
    }

    async fn due_summary(&self) -> Result<HashMap<String, DueSummary>, StoreError> {
        self.read(jobs::waiting).await
    }

    async fn change_sink(
        &self,
        sink: &str,
        change: SinkChange,
        now: Timestamp,
    ) -> Result<SinkChanged, StoreError> {
        let sink = sink.to_owned();
        match self.submit(Op::Sink { sink, change, now }).await? {
            Done::Sink(changed) => Ok(*changed),
            _ => unreachable!("a sink's change answers Sink"),
        }
    }

    async fn sink_states(&self) -> Result<Vec<SinkState>, StoreError> {
        self.read(sinks::states).await
    }

    async fn begin_pass(
        &self,
        source: &str,
        schedule: Schedule,
        now: Timestamp,
    ) -> Result<Option<Begun>, StoreError> {
        // Looked at on a reader first: most looks find nothing due, and cost the writer nothing.
        let owned = source.to_owned();
        let row = self.read(move |conn| passes::get(conn, &owned)).await?;
        if row.due(&schedule, now).is_none() {
            return Ok(None);
        }
        let source = source.to_owned();
        match self
            .submit(Op::BeginPass {
                source,
                schedule,
                now,
            })
            .await?
        {
            Done::Pass(begun) => Ok(begun),
            _ => unreachable!("beginning a pass answers Pass"),
        }
    }

    async fn newest_seen(&self, source: &str) -> Result<Option<Timestamp>, StoreError> {
        let source = source.to_owned();
        let ms = self
            .read(move |conn| passes::newest_seen(conn, &source))
            .await?;
        Ok(ms.map(from_ms))
    }

    async fn end_pass(&self, source: &str, end: PassEnd, now: Timestamp) -> Result<(), StoreError> {
        let source = source.to_owned();
        self.submit(Op::EndPass { source, end, now })
            .await
            .map(|_| ())
    }

    async fn touch(&self, now: Timestamp) -> Result<(), StoreError> {
        self.submit(Op::Touch {
            at: now.as_millisecond(),
        })
        .await
        .map(|_| ())
    }

    async fn prune(
        &self,
        what: Prunable,
        keep: std::time::Duration,
        from: i64,
        limit: usize,
        now: Timestamp,
    ) -> Result<PruneStep, StoreError> {
        let keep = i64::try_from(keep.as_millis()).unwrap_or(i64::MAX);
        let op = Op::Prune {
            what,
            keep,
            now: now.as_millisecond(),
            from,
            limit,
        };
        match self.submit(op).await? {
            Done::Pruned(step) => Ok(step),
            _ => unreachable!("prune answers Pruned"),
        }
    }

    async fn reclaim(&self, pages: usize) -> Result<usize, StoreError> {
        match self.submit(Op::Reclaim(pages)).await? {
            Done::Count(free) => Ok(free),
            _ => unreachable!("reclaim answers Count"),
        }
    }

    async fn queues(&self, now: Timestamp) -> Result<Vec<SinkQueue>, StoreError> {
        let now = now.as_millisecond();
        self.read(move |conn| jobs::queues(conn, now)).await
    }

    fn size_bytes(&self) -> u64 {
        ["", "-wal"]
            .iter()
            .map(|suffix| {
                let mut file = self.inner.path.as_os_str().to_owned();
                file.push(suffix);
                std::fs::metadata(file).map_or(0, |m| m.len())
            })
            .sum()
    }

    async fn close(&self) {
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

/// Turns rusqlite's error opening `path` into the storage error that names it.
fn open_error(path: &Path) -> impl Fn(rusqlite::Error) -> StoreError + Copy + '_ {
    |source| StoreError::Open {
        path: path.to_path_buf(),
        source: Box::new(source),
    }
}

/// rusqlite's errors, as the source of the storage error they cause.
impl From<rusqlite::Error> for StoreError {
    fn from(err: rusqlite::Error) -> Self {
        Self::Query(Box::new(err))
    }
}
