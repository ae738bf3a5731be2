//! The PostgreSQL backend: any number of daemons on one database.
//!
//! What SQLite's single writer does in memory is done in the database here, so that replicas
//! agree without talking to each other:
//!
//! - **Dedupe** is the primary key of `dedupe`: a delivery's key is inserted with
//!   `ON CONFLICT DO NOTHING` in the transaction that stores its event, so a copy arriving at
//!   another replica at the same instant waits for that transaction and then finds the key.
//! - **Leases**: a replica claims due jobs with `FOR UPDATE SKIP LOCKED`, marking them
//!   `leased_by` itself, and says it is alive several times a lease (`replicas.seen_at`, on the
//!   database's clock, so the hosts' clocks do not matter). A job leased by a replica that has
//!   not said so within the lease is anyone's again: a replica killed mid-attempt leaves its
//!   jobs to the others once its lease runs out. One that stops cleanly releases them.
//! - **Throttles and digests** are decided under advisory transaction locks, so two replicas
//!   never both open a window or both send a digest.
//!
//! Every transaction commits with `synchronous_commit` on (the server's default): a 2xx still
//! means the event is on the database's disk.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use jiff::Timestamp;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use tokio_util::sync::CancellationToken;

use super::{
    AttemptOutcome, DueJob, DueSummary, Gather, Handoff, Inserted, Job, NewEvent, Prunable,
    PruneStep, Quiet, RouteTo, Silence, SinkChange, SinkChanged, SinkState, Storage, StoreError,
};
use crate::config::PostgresConfig;
use crate::event::Event;
use crate::metrics::SinkQueue;
use crate::store::passes::{Begun, PassEnd, Schedule};

/// Beats per lease (`storage.lease`): a replica says it is alive five times a lease, so a slow
/// beat or two never hands over jobs that are still being attempted.
const BEATS_PER_LEASE: u32 = 5;
/// How long a request may wait for a connection: under a second, so that while the server is
/// down a request, and a load balancer's probe of `/readyz`, gets its 503 within one.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(800);

/// The database's clock, in unix milliseconds.
macro_rules! now_ms {
    () => {
        "(extract(epoch FROM clock_timestamp()) * 1000)::bigint"
    };
}

/// Whether replica `$me` may take a job: no one holds it; or `$me` leased it and its engine
/// does not hold it (`$held`: a hand-over that never happened); or another replica leased it
/// and has been silent for longer than the lease (`$lease`, milliseconds). A replica never
/// takes a job back from itself while its engine holds it, even after an outage that made
/// its own lease look expired.
macro_rules! claimable {
    ($me:literal, $held:literal, $lease:literal) => {
        concat!(
            "(leased_by IS NULL OR (leased_by = ",
            $me,
            " AND NOT id = ANY(",
            $held,
            ")) OR (leased_by <> ",
            $me,
            " AND leased_by NOT IN (SELECT id FROM replicas WHERE seen_at > ",
            now_ms!(),
            " - ",
            $lease,
            ")))"
        )
    };
}

/// When a job is due for replica `$me`: at its `next_attempt_at`, or at once if another
/// replica leased it (one that [`claimable!`] lets `$me` take is dead, and so is its
/// hand-over, whose row would come due only at the hand-over's fallback), as a crashed
/// SQLite daemon's jobs are at its restart.
macro_rules! due_at {
    ($me:literal) => {
        concat!(
            "(CASE WHEN leased_by <> ",
            $me,
            " THEN 0 ELSE next_attempt_at END)"
        )
    };
}

pub mod admin;
mod commit;
mod events;
pub mod import;
mod jobs;
mod passes;
mod retention;
mod schema;
mod silences;
mod sinks;

pub struct PostgresStore {
    pool: PgPool,
    /// Where inserts wait to share a transaction.
    committer: commit::Committer,
    /// This replica's row in `replicas`.
    replica: i64,
    /// `storage.lease`, in milliseconds.
    lease_ms: i64,
    /// What the beats learn.
    seen: Arc<Seen>,
    stop: CancellationToken,
    beats: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// What the beats learn: the database's size, and the replicas alive, by which sinks'
/// concurrency is shared.
#[derive(Default)]
struct Seen {
    size: AtomicU64,
    replicas: std::sync::Mutex<Replicas>,
    /// What this replica holds of each sink's concurrency: told to the others at each beat.
    held: std::sync::Mutex<HashMap<String, usize>>,
    /// What the other replicas alive held of each sink's, at their last beats.
    others: std::sync::Mutex<HashMap<String, usize>>,
}

/// The replicas alive at the last beat, and this one's place among them.
#[derive(Default, Clone, Copy)]
struct Replicas {
    alive: usize,
    /// Alive replicas that joined before this one.
    rank: usize,
    /// Beats since this replica joined, and whether the first found it alone.
    beats: u32,
    alone: bool,
    at: Option<std::time::Instant>,
}

/// Beats a replica that joined others waits before it takes its share of a sink's
/// concurrency: by then each of them has beaten at least once since it joined and given up
/// the part it takes.
const SETTLING_BEATS: u32 = 3;

impl Replicas {
    /// This replica's part of `concurrency`: an equal share, the remainder going to the
    /// longest-standing replicas; none while it has not beaten for a lease (the others
    /// count it gone and share its part) or while the others may not have seen it join.
    fn share(&self, concurrency: usize, lease: Duration) -> usize {
        let current = self.at.is_some_and(|at| at.elapsed() < lease);
        let settled = self.alone || self.beats >= SETTLING_BEATS;
        if !current || !settled || self.alive == 0 {
            return 0;
        }
        concurrency / self.alive + usize::from(self.rank < concurrency % self.alive)
    }
}

/// Connects to the database `config` names (the password read now, never logged).
///
/// # Errors
/// [`StoreError`] when the password cannot be read or the server refuses.
pub(crate) async fn connect(config: &PostgresConfig, size: u32) -> Result<PgPool, StoreError> {
    let options = options(config)?;
    let pool = PgPoolOptions::new()
        .max_connections(size)
        .acquire_timeout(CONNECT_TIMEOUT)
        .connect_with(options)
        .await?;
    Ok(pool)
}

/// How to connect to the database `config` names, its password read now.
fn options(config: &PostgresConfig) -> Result<PgConnectOptions, StoreError> {
    let mut options: PgConnectOptions = config.url.parse()?;
    if let Some(secret) = &config.password {
        let password = secret
            .resolve("storage.password")
            .map_err(StoreError::Secret)?;
        options = options.password(&password);
    }
    Ok(options.application_name("hookroute"))
}

impl PostgresStore {
    /// Connects, migrates the schema if this replica is the first to start, and registers
    /// this replica.
    ///
    /// # Errors
    /// [`StoreError`] when the database cannot be reached, or its schema is newer.
    pub async fn open(config: &PostgresConfig, busy_timeout: Duration) -> Result<Self, StoreError> {
        let pool = connect(config, config.pool_size).await?;
        schema::migrate(&pool, &config.url).await?;
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_default();
        let replica: i64 = sqlx::query_scalar(concat!(
            "INSERT INTO replicas (host, pid, started_at, seen_at) VALUES ($1, $2, ",
            now_ms!(),
            ", ",
            now_ms!(),
            ") RETURNING id"
        ))
        .bind(host)
        .bind(i32::try_from(std::process::id()).unwrap_or(i32::MAX))
        .fetch_one(&pool)
        .await?;
        tracing::info!(replica, "joined the database's replicas");
        let store = Self {
            committer: commit::Committer::start(pool.clone(), replica, busy_timeout),
            pool,
            replica,
            lease_ms: i64::try_from(config.lease.as_millis()).unwrap_or(i64::MAX),
            seen: Arc::default(),
            stop: CancellationToken::new(),
            beats: std::sync::Mutex::new(None),
        };
        store.beat().await?;
        let beats = tokio::spawn(beat_loop(
            config.lease / BEATS_PER_LEASE,
            store.pool.clone(),
            (replica, store.lease_ms),
            Arc::clone(&store.seen),
            store.stop.clone(),
        ));
        *store.beats.lock().unwrap_or_else(|p| p.into_inner()) = Some(beats);
        Ok(store)
    }

    async fn beat(&self) -> Result<(), StoreError> {
        beat(&self.pool, (self.replica, self.lease_ms), &self.seen).await
    }

    /// Lets go of this replica's leases on `jobs` (all of them if `None`), making them due
    /// at once: handed-over jobs came due only at their fallback.
    async fn release_leases(&self, jobs: Option<Vec<i64>>) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE jobs SET leased_by = NULL, next_attempt_at = LEAST(next_attempt_at, $2)
             WHERE leased_by = $1 AND ($3::bigint[] IS NULL OR id = ANY($3))",
        )
        .bind(self.replica)
        .bind(jiff::Timestamp::now().as_millisecond())
        .bind(jobs)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

/// Says this replica is alive; notes the replicas alive and the database's size.
async fn beat(
    pool: &PgPool,
    (replica, lease_ms): (i64, i64),
    seen: &Seen,
) -> Result<(), StoreError> {
    let held = serde_json::to_value(&*seen.held.lock().unwrap_or_else(|p| p.into_inner()))
        .unwrap_or_default();
    let (alive, rank, bytes): (i64, i64, i64) = sqlx::query_as(concat!(
        "WITH me AS (UPDATE replicas SET held = $3, seen_at = ",
        now_ms!(),
        " WHERE id = $1 RETURNING id)
         SELECT count(*), count(*) FILTER (WHERE id < $1),
                pg_database_size(current_database())
         FROM (SELECT id FROM replicas WHERE id <> $1 AND seen_at > ",
        now_ms!(),
        " - $2 UNION ALL SELECT id FROM me) AS alive"
    ))
    .bind(replica)
    .bind(lease_ms)
    .bind(held)
    .fetch_one(pool)
    .await?;
    let others: Vec<(String, i64)> = sqlx::query_as(concat!(
        "SELECT held.key, sum(held.value::bigint)::bigint
         FROM replicas, jsonb_each_text(replicas.held) AS held
         WHERE id <> $1 AND seen_at > ",
        now_ms!(),
        " - $2 GROUP BY held.key"
    ))
    .bind(replica)
    .bind(lease_ms)
    .fetch_all(pool)
    .await?;
    *seen.others.lock().unwrap_or_else(|p| p.into_inner()) = others
        .into_iter()
        .map(|(sink, held)| (sink, usize::try_from(held).unwrap_or(0)))
        .collect();
    seen.size.store(bytes.unsigned_abs(), Ordering::Relaxed);
    let mut replicas = seen.replicas.lock().unwrap_or_else(|p| p.into_inner());
    let alive = usize::try_from(alive).unwrap_or(0);
    if replicas.beats == 0 {
        replicas.alone = alive == 1;
    }
    *replicas = Replicas {
        alive,
        rank: usize::try_from(rank).unwrap_or(0),
        beats: replicas.beats.saturating_add(1),
        at: Some(std::time::Instant::now()),
        ..*replicas
    };
    Ok(())
}

async fn beat_loop(
    every: Duration,
    pool: PgPool,
    replica: (i64, i64),
    seen: Arc<Seen>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = stop.cancelled() => return,
        }
        if let Err(err) = beat(&pool, replica, &seen).await {
            tracing::warn!(error = %err, "cannot tell the database this replica is alive");
        }
    }
}

#[async_trait]
impl Storage for PostgresStore {
    async fn insert(
        &self,
        event: &Event,
        body: &[u8],
        received_at: Timestamp,
        routes: Vec<RouteTo>,
        handoff: Handoff,
    ) -> Result<Inserted, StoreError> {
        let new = NewEvent::new(event, body, received_at, routes, handoff);
        self.committer.insert(new).await
    }

    async fn due_jobs(
        &self,
        sink: &str,
        limit: usize,
        gather: Gather,
        now: Timestamp,
        held: HashSet<i64>,
    ) -> Result<Vec<DueJob>, StoreError> {
        let held: Vec<i64> = held.into_iter().collect();
        jobs::claim(
            &self.pool,
            (self.replica, self.lease_ms, &held),
            sink,
            limit,
            gather,
            now,
        )
        .await
    }

    async fn finish_attempt(
        &self,
        outcomes: Vec<(Job, AttemptOutcome)>,
        started_at: Timestamp,
        finished_at: Timestamp,
    ) -> Result<(), StoreError> {
        let attempt = jobs::Finished {
            outcomes,
            started_at,
            finished_at,
        };
        self.committer.finish(attempt).await
    }

    async fn quiet(&self, jobs: Vec<(Job, Quiet)>, now: Timestamp) -> Result<(), StoreError> {
        let (ids, statuses, by): (Vec<i64>, Vec<&str>, Vec<String>) = jobs
            .iter()
            .map(|(job, quiet)| (job.id, quiet.status().as_str(), quiet.by()))
            .collect();
        // The lease goes with it, as with an outcome.
        sqlx::query(
            "UPDATE jobs j SET status = q.status, quieted_by = q.by, updated_at = $4,
                               leased_by = NULL
             FROM unnest($1::bigint[], $2::text[], $3::text[]) AS q (id, status, by)
             WHERE j.id = q.id AND j.status IN ('pending', 'failed')",
        )
        .bind(&ids)
        .bind(&statuses)
        .bind(&by)
        .bind(now.as_millisecond())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn silences(&self, now: Timestamp) -> Result<Vec<Silence>, StoreError> {
        silences::by_end(&self.pool, now.as_millisecond(), false).await
    }

    async fn change_sink(
        &self,
        sink: &str,
        change: SinkChange,
        now: Timestamp,
    ) -> Result<SinkChanged, StoreError> {
        let mut conn = self.pool.acquire().await?;
        sinks::change(&mut conn, sink, change, now).await
    }

    async fn sink_states(&self) -> Result<Vec<SinkState>, StoreError> {
        sinks::states(&self.pool).await
    }

    async fn due_summary(&self) -> Result<HashMap<String, DueSummary>, StoreError> {
        jobs::waiting(&self.pool, self.replica, self.lease_ms).await
    }

    async fn begin_pass(
        &self,
        source: &str,
        schedule: Schedule,
        now: Timestamp,
    ) -> Result<Option<Begun>, StoreError> {
        // Looked at without a lock first: most looks find nothing due.
        if passes::get(&self.pool, source)
            .await?
            .due(&schedule, now)
            .is_none()
        {
            return Ok(None);
        }
        let mut conn = self.pool.acquire().await?;
        passes::begin(&mut conn, (source, self.replica), &schedule, now).await
    }

    async fn newest_seen(&self, source: &str) -> Result<Option<Timestamp>, StoreError> {
        let ms = passes::newest_seen(&self.pool, source).await?;
        Ok(ms.map(super::from_ms))
    }

    async fn end_pass(&self, source: &str, end: PassEnd, now: Timestamp) -> Result<(), StoreError> {
        passes::end(&self.pool, (source, self.replica), &end, now).await
    }

    /// Ready when new events commit (the last transaction with some did not run out of time)
    /// and this replica can beat.
    async fn touch(&self, _now: Timestamp) -> Result<(), StoreError> {
        if self.committer.is_stalled() {
            return Err(StoreError::Timeout);
        }
        self.beat().await
    }

    async fn prune(
        &self,
        what: Prunable,
        keep: Duration,
        from: i64,
        limit: usize,
        now: Timestamp,
    ) -> Result<PruneStep, StoreError> {
        retention::prune(&self.pool, what, keep, from, limit, now).await
    }

    async fn reclaim(&self, _pages: usize) -> Result<usize, StoreError> {
        // PostgreSQL's autovacuum makes the space of deleted rows reusable.
        Ok(0)
    }

    async fn queues(&self, now: Timestamp) -> Result<Vec<SinkQueue>, StoreError> {
        jobs::queues(&self.pool, now).await
    }

    fn size_bytes(&self) -> u64 {
        self.seen.size.load(Ordering::Relaxed)
    }

    /// An equal part of `concurrency` (see [`Replicas::share`]), but never more than the
    /// other replicas left: what they hold counts their calls still in flight, so a replica
    /// that was alone and filled the whole limit keeps it, call by call, until those end.
    fn share(&self, sink: &str, concurrency: usize) -> usize {
        let lease = Duration::from_millis(self.lease_ms.unsigned_abs());
        let replicas = *self.seen.replicas.lock().unwrap_or_else(|p| p.into_inner());
        let others = self
            .seen
            .others
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(sink)
            .copied()
            .unwrap_or(0);
        replicas
            .share(concurrency, lease)
            .min(concurrency.saturating_sub(others))
    }

    fn hold(&self, sink: &str, held: usize) {
        let mut holding = self.seen.held.lock().unwrap_or_else(|p| p.into_inner());
        if holding.get(sink) != Some(&held) {
            holding.insert(sink.to_owned(), held);
        }
    }

    async fn release(&self, jobs: Vec<i64>) -> Result<(), StoreError> {
        self.release_leases(Some(jobs)).await
    }

    async fn close(&self) {
        self.committer.close().await;
        self.stop.cancel();
        let beats = self.beats.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(beats) = beats {
            let _ = beats.await;
        }
        // Whatever this replica still holds is anyone's now, at once rather than after the
        // lease (handed-over jobs too, which came due only at their fallback); and it is no
        // longer one of the replicas.
        let released = self.release_leases(None).await;
        let left = sqlx::query("DELETE FROM replicas WHERE id = $1")
            .bind(self.replica)
            .execute(&self.pool)
            .await;
        match released.and(left.map_err(StoreError::from)) {
            Ok(_) => tracing::info!(replica = self.replica, "left the database's replicas"),
            Err(err) => {
                tracing::warn!(error = %err, "cannot release this replica's jobs; they are released when its lease runs out")
            }
        }
        self.pool.close().await;
    }
}

/// sqlx's errors, as the source of the storage error they cause.
impl From<sqlx::Error> for StoreError {
    fn from(err: sqlx::Error) -> Self {
        Self::Query(Box::new(err))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(10);

    fn replicas(alive: usize, rank: usize) -> Replicas {
        Replicas {
            alive,
            rank,
            beats: SETTLING_BEATS,
            alone: false,
            at: Some(std::time::Instant::now()),
        }
    }

    #[test]
    fn the_replicas_shares_add_up_to_the_concurrency() {
        for alive in 1..=5 {
            for concurrency in 1..=9 {
                let shares: Vec<usize> = (0..alive)
                    .map(|rank| replicas(alive, rank).share(concurrency, LEASE))
                    .collect();
                assert_eq!(shares.iter().sum::<usize>(), concurrency, "{shares:?}");
                let (least, most) = (shares.iter().min(), shares.iter().max());
                assert!(most.unwrap() - least.unwrap() <= 1, "{shares:?}");
            }
        }
    }

    #[test]
    fn no_share_before_the_others_saw_it_join_or_once_its_beats_are_stale() {
        let joined = Replicas {
            beats: 1,
            ..replicas(2, 1)
        };
        assert_eq!(joined.share(4, LEASE), 0, "the others may still use it all");
        let first = Replicas {
            beats: 1,
            alone: true,
            ..replicas(1, 0)
        };
        assert_eq!(
            first.share(4, LEASE),
            4,
            "alone from the start: nothing to wait for"
        );
        let stale = Replicas {
            at: std::time::Instant::now().checked_sub(LEASE),
            ..replicas(2, 0)
        };
        assert_eq!(stale.share(4, LEASE), 0, "the others count it gone");
    }
}
