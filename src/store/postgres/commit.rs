//! Group commit: the writes that arrive while transactions are in flight share the next one.
//!
//! A transaction per event costs PostgreSQL a commit, a WAL flush and a handful of statements
//! for every event and every attempt; under a flood that, not the rows, is where its CPU goes.
//! Here each new event and each attempt's outcome joins a queue, and a few transactions at a
//! time take everything waiting. At ordinary load a transaction carries one write and nothing
//! waits; under a flood they grow as the commits slow down.
//!
//! A new event waits at most `storage.busy_timeout` for its commit: its sender gives up after
//! 30 s, and an answer it never sees is a delivery stored behind its back. A transaction runs
//! with `statement_timeout` set to what its most pressed event has left, so the server itself
//! cancels it and nothing is stored; events whose time ran out while they queued are answered
//! without being tried. Either way the request gets 503 and the sender retries later.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::jobs::Finished;
use super::{events, jobs};
use crate::store::{Inserted, NewEvent, StoreError};

/// Transactions in flight at once: one being committed while the next is built.
const IN_FLIGHT: usize = 2;
/// Writes per transaction at most.
const MAX_BATCH: usize = 512;
/// Writes waiting at most; a full queue makes requests wait, which is the backpressure.
const QUEUE_DEPTH: usize = 8192;

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

enum Write {
    /// A new event, and when its request stops waiting.
    Insert(NewEvent, Instant, Reply<Inserted>),
    Finish(Finished, Reply<()>),
}

pub(super) struct Committer {
    queue: mpsc::Sender<Write>,
    /// `storage.busy_timeout`.
    timeout: Duration,
    /// Whether the last transaction with new events in it ran out of time: `/readyz` says so
    /// until one commits again.
    stalled: Arc<AtomicBool>,
    stop: CancellationToken,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Committer {
    pub(super) fn start(pool: sqlx::PgPool, replica: i64, timeout: Duration) -> Self {
        let (queue, waiting) = mpsc::channel(QUEUE_DEPTH);
        let stop = CancellationToken::new();
        let stalled = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(run(
            pool,
            replica,
            waiting,
            Arc::clone(&stalled),
            stop.clone(),
        ));
        Self {
            queue,
            timeout,
            stalled,
            stop,
            task: Mutex::new(Some(task)),
        }
    }

    /// Stores `new`; answers once its transaction committed, or with
    /// [`StoreError::Timeout`] (nothing stored) when that takes longer than the bound.
    pub(super) async fn insert(&self, new: NewEvent) -> Result<Inserted, StoreError> {
        let deadline = Instant::now() + self.timeout;
        let (reply, answer) = oneshot::channel();
        // A full queue is backpressure, but within the same bound.
        tokio::time::timeout_at(deadline, self.submit(Write::Insert(new, deadline, reply)))
            .await
            .map_err(|_| StoreError::Timeout)??;
        answer.await.map_err(|_| StoreError::WriterGone)?
    }

    /// Whether new events commit: `false` after a transaction ran out of time, until one
    /// commits again.
    pub(super) fn is_stalled(&self) -> bool {
        self.stalled.load(Ordering::Relaxed)
    }

    /// Records an attempt's outcomes; answers once its transaction committed.
    pub(super) async fn finish(&self, attempt: Finished) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        self.submit(Write::Finish(attempt, reply)).await?;
        answer.await.map_err(|_| StoreError::WriterGone)?
    }

    async fn submit(&self, write: Write) -> Result<(), StoreError> {
        self.queue
            .send(write)
            .await
            .map_err(|_| StoreError::WriterGone)
    }

    /// Takes no more writes, and waits for the transactions in flight.
    pub(super) async fn close(&self) {
        self.stop.cancel();
        let task = self.task.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

async fn run(
    pool: sqlx::PgPool,
    replica: i64,
    mut waiting: mpsc::Receiver<Write>,
    stalled: Arc<AtomicBool>,
    stop: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut batches = JoinSet::new();
    loop {
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            break;
        };
        let first = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            first = waiting.recv() => first,
        };
        let Some(first) = first else { break };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match waiting.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let (pool, stalled) = (pool.clone(), Arc::clone(&stalled));
        batches.spawn(async move {
            commit(&pool, replica, batch, &stalled).await;
            drop(slot);
        });
        while batches.try_join_next().is_some() {}
    }
    while batches.join_next().await.is_some() {}
}

/// Writes `batch` in one transaction and answers each write. New events whose time ran out
/// while they queued are answered with [`StoreError::Timeout`] untried. When the server
/// refuses the transaction (a deadlock, a value it will not store), each write is tried in a
/// transaction of its own, so that one cannot fail the others; when it ran out of time, its
/// new events are answered so and the attempts' outcomes (which no request waits for) are
/// written on their own.
async fn commit(pool: &sqlx::PgPool, replica: i64, batch: Vec<Write>, stalled: &AtomicBool) {
    let (mut inserts, mut finishes) = (Batch::default(), Batch::default());
    let mut deadlines = Vec::new();
    let now = Instant::now();
    for write in batch {
        match write {
            Write::Insert(_, deadline, reply) if deadline <= now => {
                let _ = reply.send(Err(StoreError::Timeout));
                stalled.store(true, Ordering::Relaxed);
            }
            Write::Insert(new, deadline, reply) => {
                deadlines.push(deadline);
                inserts.push(new, reply);
            }
            Write::Finish(attempt, reply) => finishes.push(attempt, reply),
        }
    }
    if inserts.writes.is_empty() && finishes.writes.is_empty() {
        return;
    }
    let deadline = deadlines.iter().min().copied();
    match transaction(pool, replica, &inserts.writes, &finishes.writes, deadline).await {
        Ok(outcomes) => {
            if !inserts.writes.is_empty() {
                stalled.store(false, Ordering::Relaxed);
            }
            for (reply, outcome) in inserts.replies.into_iter().zip(outcomes) {
                let _ = reply.send(Ok(outcome));
            }
            finishes.settle(Ok(()));
        }
        Err(err) if is_timeout(&err) => {
            stalled.store(true, Ordering::Relaxed);
            for reply in inserts.replies {
                let _ = reply.send(Err(StoreError::Timeout));
            }
            if !finishes.writes.is_empty() {
                let outcome = transaction(pool, replica, &[], &finishes.writes, None).await;
                finishes.settle(outcome.map(drop));
            }
        }
        Err(err) if refused(&err) && inserts.writes.len() + finishes.writes.len() > 1 => {
            tracing::debug!(error = %err, "a transaction was refused; writing its parts one by one");
            for ((new, reply), deadline) in
                inserts.writes.iter().zip(inserts.replies).zip(deadlines)
            {
                let outcome = if deadline <= Instant::now() {
                    Err(StoreError::Timeout)
                } else {
                    transaction(
                        pool,
                        replica,
                        std::slice::from_ref(new),
                        &[],
                        Some(deadline),
                    )
                    .await
                    .map(|mut one| one.remove(0))
                };
                let _ = reply.send(outcome);
            }
            for (attempt, reply) in finishes.writes.iter().zip(finishes.replies) {
                let outcome =
                    transaction(pool, replica, &[], std::slice::from_ref(attempt), None).await;
                let _ = reply.send(outcome.map(drop));
            }
        }
        Err(err) => {
            let err: Arc<dyn std::error::Error + Send + Sync> = Arc::new(err);
            inserts.fail(&err);
            finishes.fail(&err);
        }
    }
}

/// Whether `err` is the server cancelling a statement at `statement_timeout` (SQLSTATE 57014),
/// or a transaction that outlived its deadline here.
fn is_timeout(err: &StoreError) -> bool {
    match err {
        StoreError::Timeout => true,
        err => database_error(err).is_some_and(|db| db.code().as_deref() == Some("57014")),
    }
}

/// Whether the server refused a statement (a constraint, a conflict), as opposed to the
/// connection failing.
fn refused(err: &StoreError) -> bool {
    database_error(err).is_some()
}

/// The server's own error, when `err` is one.
fn database_error(err: &StoreError) -> Option<&dyn sqlx::error::DatabaseError> {
    match err {
        StoreError::Query(source) => source.downcast_ref::<sqlx::Error>()?.as_database_error(),
        _ => None,
    }
}

/// Writes of one kind, with whom to answer.
struct Batch<W, T> {
    writes: Vec<W>,
    replies: Vec<Reply<T>>,
}

impl<W, T> Default for Batch<W, T> {
    fn default() -> Self {
        Self {
            writes: Vec::new(),
            replies: Vec::new(),
        }
    }
}

impl<W, T> Batch<W, T> {
    fn push(&mut self, write: W, reply: Reply<T>) {
        self.writes.push(write);
        self.replies.push(reply);
    }

    /// Answers every write with the transaction's outcome.
    fn settle(self, outcome: Result<(), StoreError>)
    where
        T: Default,
    {
        match outcome {
            Ok(()) => {
                for reply in self.replies {
                    let _ = reply.send(Ok(T::default()));
                }
            }
            Err(err) => self.fail(&(Arc::new(err) as Arc<dyn std::error::Error + Send + Sync>)),
        }
    }

    /// Answers every write with the transaction's failure.
    fn fail(self, err: &Arc<dyn std::error::Error + Send + Sync>) {
        for reply in self.replies {
            let _ = reply.send(Err(StoreError::Write(Arc::clone(err))));
        }
    }
}

/// New events first, then outcomes: every transaction takes its locks in that order. With a
/// `deadline`, the server cancels any statement still running then (`statement_timeout`,
/// which also bounds a wait for a lock), and the whole transaction is given up shortly after
/// it, should the server not answer at all.
async fn transaction(
    pool: &sqlx::PgPool,
    replica: i64,
    inserts: &[NewEvent],
    finishes: &[Finished],
    deadline: Option<Instant>,
) -> Result<Vec<Inserted>, StoreError> {
    let run = async {
        let mut tx = pool.begin().await?;
        if let Some(deadline) = deadline {
            let left = deadline
                .saturating_duration_since(Instant::now())
                .as_millis()
                .max(1);
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "SET LOCAL statement_timeout = {left}"
            )))
            .execute(&mut *tx)
            .await?;
        }
        let inserted = events::insert(&mut tx, replica, inserts).await?;
        jobs::finish(&mut tx, finishes).await?;
        tx.commit().await?;
        Ok(inserted)
    };
    match deadline {
        Some(deadline) => tokio::time::timeout_at(deadline + BACKSTOP, run)
            .await
            .unwrap_or(Err(StoreError::Timeout)),
        None => run.await,
    }
}

/// How long past its deadline a transaction is given up here when the server has not
/// cancelled it (it does not answer at all): then whether it committed is unknown, which only
/// a server that went silent mid-commit can cause.
const BACKSTOP: Duration = Duration::from_secs(1);
