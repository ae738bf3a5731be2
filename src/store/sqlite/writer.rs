//! The single writer thread, its syncer and its checkpointer: how commands become durable
//! transactions (see the invariants in the module above).

use std::path::Path;
use std::sync::{Arc, OnceLock};

use rusqlite::{Connection, Transaction, TransactionBehavior};
use tokio::sync::{mpsc, oneshot};

use super::dedupe::Recent;
use super::passes;
use super::{
    AttemptOutcome, Inserted, Job, NewEvent, Prunable, PruneStep, Quiet, SinkChange, SinkChanged,
    StoreError, events, jobs, retention, sinks,
};
use crate::store::passes::{Begun, PassEnd, Schedule};

/// How often the checkpointer copies the WAL back into the database file.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(100);
/// How often the writer itself finishes a checkpoint between batches. Only a checkpoint that
/// no commit races can complete, and only after a complete one does SQLite restart the WAL
/// from its beginning: without this the WAL grows without bound under sustained load.
const WRITER_CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// Depth of the writer's queue; a full queue makes handlers wait, which is the backpressure.
pub(super) const QUEUE_DEPTH: usize = 8192;

pub(super) enum Op {
    Insert(Box<NewEvent>),
    /// One attempt's outcomes: one job's, or every job of a batch or digest.
    FinishAttempt {
        outcomes: Vec<(Job, AttemptOutcome)>,
        started_at: i64,
        at: i64,
    },
    /// Jobs a silence or a mute window set aside when they came due.
    Quiet {
        jobs: Vec<(Job, Quiet)>,
        at: i64,
    },
    /// Something happened to a sink (see `Storage::change_sink`).
    Sink {
        sink: String,
        change: SinkChange,
        now: jiff::Timestamp,
    },
    Touch {
        at: i64,
    },
    /// Begins a reconcile pass if one is due (see `Storage::begin_pass`).
    BeginPass {
        source: String,
        schedule: Schedule,
        now: jiff::Timestamp,
    },
    EndPass {
        source: String,
        end: PassEnd,
        now: jiff::Timestamp,
    },
    Prune {
        what: Prunable,
        /// How long records are kept, in milliseconds, on the clock their table uses.
        keep: i64,
        now: i64,
        from: i64,
        limit: usize,
    },
    /// Returns up to this many free pages to the file system.
    Reclaim(usize),
    /// Answered after everything queued before it committed; the writer then exits.
    Shutdown,
}

pub(super) enum Done {
    Inserted(Inserted),
    Pruned(PruneStep),
    Sink(Box<SinkChanged>),
    Pass(Option<Begun>),
    Count(usize),
    Unit,
}

pub(super) struct Command {
    pub op: Op,
    pub reply: oneshot::Sender<Result<Done, StoreError>>,
}

/// A committed batch's answers, waiting for the WAL flush.
pub(super) type Answers = Vec<(oneshot::Sender<Result<Done, StoreError>>, Done)>;

/// The first WAL flush failure, shared by the syncer (who sets it) and the writer (who then
/// refuses to write).
pub(super) type SyncFailure = Arc<OnceLock<Arc<std::io::Error>>>;

pub(super) fn writer_loop(
    mut conn: Connection,
    mut recent: Recent,
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
                    let err: Arc<dyn std::error::Error + Send + Sync> = Arc::new(err);
                    for cmd in batch.drain(..) {
                        let _ = cmd.reply.send(Err(StoreError::Write(Arc::clone(&err))));
                    }
                }
            }
        }
        let merged = if stop {
            recent.merge_all(&mut conn)
        } else if recent.due() {
            recent.merge(&mut conn)
        } else {
            Ok(())
        };
        if let Err(err) = merged {
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
pub(super) fn sync_loop(
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
/// queue. So a flush costs one wake from outside, however many requests it answers
/// (measured: benches/LOG.md).
pub(super) fn replier(runtime: Option<tokio::runtime::Handle>) -> impl FnMut(Replies) {
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

pub(super) fn open_wal(db: &Path) -> std::io::Result<std::fs::File> {
    let mut path = db.as_os_str().to_owned();
    path.push("-wal");
    std::fs::OpenOptions::new().write(true).open(path)
}

fn apply_batch(
    conn: &mut Connection,
    recent: &mut Recent,
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

fn apply(tx: &Transaction<'_>, recent: &mut Recent, op: &Op) -> rusqlite::Result<Done> {
    Ok(match op {
        Op::Insert(event) => Done::Inserted(events::insert(tx, recent, event)?),
        Op::FinishAttempt {
            outcomes,
            started_at,
            at,
        } => {
            jobs::record_attempt(tx, outcomes, *started_at, *at)?;
            Done::Unit
        }
        Op::Quiet { jobs: quiet, at } => {
            jobs::quiet(tx, quiet, *at)?;
            Done::Unit
        }
        Op::Sink { sink, change, now } => {
            Done::Sink(Box::new(sinks::change(tx, sink, change.clone(), *now)?))
        }
        Op::Touch { at } => {
            super::schema::set_meta(tx, "last_ready_check", &at.to_string())?;
            Done::Unit
        }
        Op::BeginPass {
            source,
            schedule,
            now,
        } => Done::Pass(passes::begin(tx, source, schedule, *now)?),
        Op::EndPass { source, end, now } => {
            passes::end(tx, source, end, *now)?;
            Done::Unit
        }
        Op::Prune {
            what,
            keep,
            now,
            from,
            limit,
        } => {
            if *what == Prunable::Dedupe {
                // Keys not merged yet expire as the table's do.
                recent.forget_before(now.saturating_sub(*keep));
            }
            Done::Pruned(retention::prune(tx, *what, *keep, *now, *from, *limit)?)
        }
        Op::Reclaim(pages) => Done::Count(retention::reclaim(tx, *pages)?),
        Op::Shutdown => Done::Unit,
    })
}

/// Copies the WAL back into the database file off the commit path: the writer has
/// `wal_autocheckpoint` off, so no ingest ever waits for a checkpoint. Runs until `stop` is
/// dropped, then truncates the WAL once more.
pub(super) fn checkpoint_loop(conn: Connection, stop: std::sync::mpsc::Receiver<()>) {
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
