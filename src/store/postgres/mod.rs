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
    AttemptOutcome, DueJob, DueSummary, Handoff, Inserted, Job, Prunable, PruneStep, RouteTo,
    Storage, StoreError,
};
use crate::config::PostgresConfig;
use crate::event::Event;
use crate::metrics::SinkQueue;

/// Beats per lease (`storage.lease`): a replica says it is alive five times a lease, so a slow
/// beat or two never hands over jobs that are still being attempted.
const BEATS_PER_LEASE: u32 = 5;
/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

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

pub mod admin;
mod events;
pub mod import;
mod jobs;
mod retention;
mod schema;

pub struct PostgresStore {
    pool: PgPool,
    /// This replica's row in `replicas`.
    replica: i64,
    /// `storage.lease`, in milliseconds.
    lease_ms: i64,
    size: Arc<AtomicU64>,
    stop: CancellationToken,
    beats: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
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
    pub async fn open(config: &PostgresConfig) -> Result<Self, StoreError> {
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
            pool,
            replica,
            lease_ms: i64::try_from(config.lease.as_millis()).unwrap_or(i64::MAX),
            size: Arc::default(),
            stop: CancellationToken::new(),
            beats: std::sync::Mutex::new(None),
        };
        store.beat().await?;
        let beats = tokio::spawn(beat_loop(
            config.lease / BEATS_PER_LEASE,
            store.pool.clone(),
            replica,
            Arc::clone(&store.size),
            store.stop.clone(),
        ));
        *store.beats.lock().unwrap_or_else(|p| p.into_inner()) = Some(beats);
        Ok(store)
    }

    async fn beat(&self) -> Result<(), StoreError> {
        beat(&self.pool, self.replica, &self.size).await
    }
}

/// Says this replica is alive, and notes the database's size.
async fn beat(pool: &PgPool, replica: i64, size: &AtomicU64) -> Result<(), StoreError> {
    sqlx::query(concat!(
        "UPDATE replicas SET seen_at = ",
        now_ms!(),
        " WHERE id = $1"
    ))
    .bind(replica)
    .execute(pool)
    .await?;
    let bytes: i64 = sqlx::query_scalar("SELECT pg_database_size(current_database())")
        .fetch_one(pool)
        .await?;
    size.store(bytes.unsigned_abs(), Ordering::Relaxed);
    Ok(())
}

async fn beat_loop(
    every: Duration,
    pool: PgPool,
    replica: i64,
    size: Arc<AtomicU64>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = stop.cancelled() => return,
        }
        if let Err(err) = beat(&pool, replica, &size).await {
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
        events::insert(
            &self.pool,
            self.replica,
            event,
            body,
            received_at,
            routes,
            handoff,
        )
        .await
    }

    async fn due_jobs(
        &self,
        sink: &str,
        limit: usize,
        hold: Option<Duration>,
        now: Timestamp,
        held: HashSet<i64>,
    ) -> Result<Vec<DueJob>, StoreError> {
        let held: Vec<i64> = held.into_iter().collect();
        jobs::claim(
            &self.pool,
            (self.replica, self.lease_ms, &held),
            sink,
            limit,
            hold,
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
        jobs::finish(&self.pool, outcomes, started_at, finished_at).await
    }

    async fn due_summary(&self) -> Result<HashMap<String, DueSummary>, StoreError> {
        jobs::waiting(&self.pool, self.replica, self.lease_ms).await
    }

    async fn touch(&self) -> Result<(), StoreError> {
        self.beat().await
    }

    async fn prune(
        &self,
        what: Prunable,
        keep: Duration,
        from: i64,
        limit: usize,
    ) -> Result<PruneStep, StoreError> {
        retention::prune(&self.pool, what, keep, from, limit).await
    }

    async fn reclaim(&self, _pages: usize) -> Result<usize, StoreError> {
        // PostgreSQL's autovacuum makes the space of deleted rows reusable.
        Ok(0)
    }

    async fn queues(&self, now: Timestamp) -> Result<Vec<SinkQueue>, StoreError> {
        jobs::queues(&self.pool, now).await
    }

    fn size_bytes(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    async fn close(&self) {
        self.stop.cancel();
        let beats = self.beats.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(beats) = beats {
            let _ = beats.await;
        }
        // Whatever this replica still holds is anyone's now, at once rather than after the
        // lease (handed-over jobs too, which came due only at their fallback); and it is no
        // longer one of the replicas.
        let released = sqlx::query(
            "UPDATE jobs SET leased_by = NULL, next_attempt_at = LEAST(next_attempt_at, $2)
             WHERE leased_by = $1",
        )
        .bind(self.replica)
        .bind(jiff::Timestamp::now().as_millisecond())
        .execute(&self.pool)
        .await;
        let left = sqlx::query("DELETE FROM replicas WHERE id = $1")
            .bind(self.replica)
            .execute(&self.pool)
            .await;
        match released.and(left) {
            Ok(_) => tracing::info!(replica = self.replica, "left the database's replicas"),
            Err(err) => {
                tracing::warn!(error = %err, "cannot release this replica's jobs; they are released when its lease runs out")
            }
        }
        self.pool.close().await;
    }
}
