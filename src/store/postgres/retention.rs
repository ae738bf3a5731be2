//! Pruning, one replica at a time: delivery ids, finished events and closed throttle windows
//! past their retention, in the same small steps as SQLite's (`store::sqlite::retention`).
//! Space is not returned by hookroute: PostgreSQL's autovacuum makes it reusable.

use std::time::Duration;

use jiff::Timestamp;
use sqlx::Transaction;
use sqlx::postgres::PgPool;

use crate::store::{Prunable, PruneStep, StoreError};

/// One step of pruning `what`: see [`Storage::prune`](crate::store::Storage::prune).
pub(super) async fn prune(
    pool: &PgPool,
    what: Prunable,
    keep: Duration,
    from: i64,
    limit: usize,
    now: Timestamp,
) -> Result<PruneStep, StoreError> {
    let keep = i64::try_from(keep.as_millis()).unwrap_or(i64::MAX);
    let limit_sql = i64::try_from(limit).unwrap_or(i64::MAX);
    let mut tx = pool.begin().await?;
    // One replica prunes at a time; the others find nothing to do.
    let mine: bool =
        sqlx::query_scalar("SELECT pg_try_advisory_xact_lock(hashtextextended('prune', 0))")
            .fetch_one(&mut *tx)
            .await?;
    if !mine {
        return Ok(PruneStep {
            removed: 0,
            next: None,
        });
    }
    let now = now.as_millisecond();
    let before = now.saturating_sub(keep);
    let step = match what {
        Prunable::Dedupe => {
            let removed = sqlx::query(
                "DELETE FROM dedupe WHERE (source, delivery_id) IN
                 (SELECT source, delivery_id FROM dedupe WHERE seen_at < $1 LIMIT $2)",
            )
            .bind(before)
            .bind(limit_sql)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            full_step(removed, limit, from)
        }
        Prunable::Throttles => {
            let removed = sqlx::query(
                "DELETE FROM throttles WHERE (route, key) IN
                 (SELECT route, key FROM throttles
                  WHERE started_at + window_ms < (SELECT max(started_at) FROM throttles) - $1
                  LIMIT $2)",
            )
            .bind(keep)
            .bind(limit_sql)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            full_step(removed, limit, from)
        }
        Prunable::Events => prune_events(&mut tx, before, from, limit_sql).await?,
        Prunable::Silences => {
            let removed = sqlx::query("DELETE FROM silences WHERE ends_at < $1")
                .bind(before)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            PruneStep {
                removed: usize::try_from(removed).unwrap_or(usize::MAX),
                next: None,
            }
        }
    };
    tx.commit().await?;
    Ok(step)
}

/// A pruning step that deleted `removed` of at most `limit`: more may be left if it was full.
fn full_step(removed: u64, limit: usize, from: i64) -> PruneStep {
    let removed = usize::try_from(removed).unwrap_or(usize::MAX);
    PruneStep {
        removed,
        next: (removed == limit).then_some(from),
    }
}

/// Finished events received before `before`, oldest first from id `from`, with their jobs,
/// attempts and routing records; as SQLite's (`store::sqlite::retention`).
async fn prune_events(
    tx: &mut Transaction<'_, sqlx::Postgres>,
    before: i64,
    from: i64,
    limit: i64,
) -> Result<PruneStep, StoreError> {
    let candidates: Vec<(i64, bool, bool)> = sqlx::query_as(
        "SELECT id, received_at < $2,
                EXISTS (SELECT 1 FROM jobs j
                        WHERE j.event_id = events.id AND j.status IN ('pending', 'failed'))
         FROM events WHERE id >= $1 ORDER BY id LIMIT $3",
    )
    .bind(from)
    .bind(before)
    .bind(limit)
    .fetch_all(&mut **tx)
    .await?;
    let expired: Vec<i64> = candidates
        .iter()
        .take_while(|(_, expired, _)| *expired)
        .filter(|(_, _, waiting)| !waiting)
        .map(|(id, ..)| *id)
        .collect();
    let ended = candidates.iter().any(|(_, expired, _)| !expired);
    if !expired.is_empty() {
        sqlx::query(
            "WITH gone AS (SELECT unnest($1::bigint[]) AS id),
             a AS (DELETE FROM attempts WHERE job_id IN
                   (SELECT id FROM jobs WHERE event_id IN (SELECT id FROM gone))),
             j AS (DELETE FROM jobs WHERE event_id IN (SELECT id FROM gone)),
             d AS (DELETE FROM dispatches WHERE event_id IN (SELECT id FROM gone))
             SELECT 1",
        )
        .bind(&expired)
        .execute(&mut **tx)
        .await?;
        sqlx::query("DELETE FROM events WHERE id = ANY($1)")
            .bind(&expired)
            .execute(&mut **tx)
            .await?;
    }
    let full = candidates.len() == usize::try_from(limit).unwrap_or(usize::MAX);
    let next = candidates
        .last()
        .filter(|_| full && !ended)
        .map(|&(id, ..)| id + 1);
    Ok(PruneStep {
        removed: expired.len(),
        next,
    })
}
