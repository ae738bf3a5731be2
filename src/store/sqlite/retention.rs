//! What periodic pruning removes: delivery ids past `dedupe_retention`, finished events past
//! `event_retention` with their jobs and attempts, and closed throttle windows. A chunk per
//! call, so pruning never holds the writer for long.

use rusqlite::{Transaction, params};

use super::Prunable;

/// Deletes up to `limit` records of `what` older than `keep` milliseconds; returns how many.
pub(super) fn prune(
    tx: &Transaction<'_>,
    what: Prunable,
    keep: i64,
    now: i64,
    limit: usize,
) -> rusqlite::Result<usize> {
    match what {
        Prunable::Dedupe => {
            let before = now.saturating_sub(keep);
            let n = tx
                .prepare_cached(
                    "DELETE FROM dedupe WHERE (source, delivery_id) IN
                     (SELECT source, delivery_id FROM dedupe WHERE seen_at < ?1 LIMIT ?2)",
                )?
                .execute(params![before, limit as i64])?;
            Ok(n)
        }
        Prunable::Events => {
            let before = now.saturating_sub(keep);
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
                if row.get::<_, i64>(1)? >= before || expired.len() >= limit {
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
            Ok(expired.len())
        }
        Prunable::Throttles => {
            let n = tx
                .prepare_cached(
                    "DELETE FROM throttles WHERE (route, key) IN
                     (SELECT route, key FROM throttles
                      WHERE started_at + window_ms < (SELECT max(started_at) FROM throttles) - ?1 LIMIT ?2)",
                )?
                .execute(params![keep, limit as i64])?;
            Ok(n)
        }
    }
}
