//! Group commit: the writes that arrive while transactions are in flight share the next one.
//!
//! A transaction per event costs PostgreSQL a commit, a WAL flush and a handful of statements
//! for every event and every attempt; under a flood that, not the rows, is where its CPU goes.
//! Here each new event and each attempt's outcome joins a queue, and a few transactions at a
//! time take everything waiting. At ordinary load a transaction carries one write and nothing
//! waits; under a flood they grow as the commits slow down.

use std::sync::{Arc, Mutex};

use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::{JoinHandle, JoinSet};
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
    Insert(NewEvent, Reply<Inserted>),
    Finish(Finished, Reply<()>),
}

pub(super) struct Committer {
    queue: mpsc::Sender<Write>,
    stop: CancellationToken,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Committer {
    pub(super) fn start(pool: sqlx::PgPool, replica: i64) -> Self {
        let (queue, waiting) = mpsc::channel(QUEUE_DEPTH);
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(pool, replica, waiting, stop.clone()));
        Self {
            queue,
            stop,
            task: Mutex::new(Some(task)),
        }
    }

    /// Stores `new`; answers once its transaction committed.
    pub(super) async fn insert(&self, new: NewEvent) -> Result<Inserted, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.submit(Write::Insert(new, reply)).await?;
        answer.await.map_err(|_| StoreError::WriterGone)?
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
        let pool = pool.clone();
        batches.spawn(async move {
            commit(&pool, replica, batch).await;
            drop(slot);
        });
        while batches.try_join_next().is_some() {}
    }
    while batches.join_next().await.is_some() {}
}

/// Writes `batch` in one transaction and answers each write. When the server refuses the
/// transaction (a deadlock, a value it will not store), each write is tried in a transaction
/// of its own, so that one cannot fail the others.
async fn commit(pool: &sqlx::PgPool, replica: i64, batch: Vec<Write>) {
    let (mut inserts, mut finishes) = (Batch::default(), Batch::default());
    for write in batch {
        match write {
            Write::Insert(new, reply) => inserts.push(new, reply),
            Write::Finish(attempt, reply) => finishes.push(attempt, reply),
        }
    }
    match transaction(pool, replica, &inserts.writes, &finishes.writes).await {
        Ok(outcomes) => {
            for (reply, outcome) in inserts.replies.into_iter().zip(outcomes) {
                let _ = reply.send(Ok(outcome));
            }
            for reply in finishes.replies {
                let _ = reply.send(Ok(()));
            }
        }
        Err(StoreError::Postgres(sqlx::Error::Database(err)))
            if inserts.writes.len() + finishes.writes.len() > 1 =>
        {
            tracing::debug!(error = %err, "a transaction was refused; writing its parts one by one");
            for (new, reply) in inserts.writes.iter().zip(inserts.replies) {
                let outcome = transaction(pool, replica, std::slice::from_ref(new), &[]).await;
                let _ = reply.send(outcome.map(|mut one| one.remove(0)));
            }
            for (attempt, reply) in finishes.writes.iter().zip(finishes.replies) {
                let outcome = transaction(pool, replica, &[], std::slice::from_ref(attempt)).await;
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

    /// Answers every write with the transaction's failure.
    fn fail(self, err: &Arc<dyn std::error::Error + Send + Sync>) {
        for reply in self.replies {
            let _ = reply.send(Err(StoreError::Write(Arc::clone(err))));
        }
    }
}

/// New events first, then outcomes: every transaction takes its locks in that order.
async fn transaction(
    pool: &sqlx::PgPool,
    replica: i64,
    inserts: &[NewEvent],
    finishes: &[Finished],
) -> Result<Vec<Inserted>, StoreError> {
    let mut tx = pool.begin().await?;
    let inserted = events::insert(&mut tx, replica, inserts).await?;
    jobs::finish(&mut tx, finishes).await?;
    tx.commit().await?;
    Ok(inserted)
}
