//! What periodic pruning removes: delivery ids past `dedupe_retention`, finished events past
//! `event_retention` with their jobs and attempts, and closed throttle windows; and returning
//! the space they took to the file system. A small step per call, each an index seek, that
//! also ends after [`STEP_TIME`], so a backlog of a million expired events never holds the
//! writer for long.

use std::time::{Duration, Instant};

use rusqlite::{OptionalExtension, Transaction, params};

use super::{Prunable, PruneStep};

/// How long a step may hold the writer, about: a step stops at the first record past it.
const STEP_TIME: Duration = Duration::from_millis(4);
/// Delivery ids deleted per statement within a step.
const KEYS_AT_ONCE: usize = 32;

/// Deletes records of `what` older than `keep` milliseconds, looking at up to `limit` of them
/// from `from` on (an event id, for events).
pub(super) fn prune(
    tx: &Transaction<'_>,
    what: Prunable,
    keep: i64,
    now: i64,
    from: i64,
    limit: usize,
) -> rusqlite::Result<PruneStep> {
    prune_within(tx, what, keep, now, from, limit, STEP_TIME)
}

/// [`prune`], in steps that end after `budget` (having made progress).
fn prune_within(
    tx: &Transaction<'_>,
    what: Prunable,
    keep: i64,
    now: i64,
    from: i64,
    limit: usize,
    budget: Duration,
) -> rusqlite::Result<PruneStep> {
    let started = Instant::now();
    let within = |done: usize| done == 0 || started.elapsed() < budget;
    let limit_sql = i64::try_from(limit).unwrap_or(i64::MAX);
    let before = now.saturating_sub(keep);
    match what {
        Prunable::Dedupe => {
            let (mut removed, mut more) = (0, true);
            let mut expired = tx.prepare_cached(EXPIRED_KEYS)?;
            while more && removed < limit && within(removed) {
                let chunk = KEYS_AT_ONCE.min(limit - removed);
                let n = expired.execute(params![before, chunk as i64])?;
                more = n == chunk;
                removed += n;
            }
            Ok(PruneStep {
                removed,
                next: more.then_some(from),
            })
        }
        Prunable::Throttles => {
            let removed = tx
                .prepare_cached(
                    "DELETE FROM throttles WHERE (route, key) IN
                     (SELECT route, key FROM throttles
                      WHERE started_at + window_ms < (SELECT max(started_at) FROM throttles) - ?1 LIMIT ?2)",
                )?
                .execute(params![keep, limit_sql])?;
            Ok(PruneStep {
                removed,
                next: (removed == limit).then_some(from),
            })
        }
        Prunable::Events => prune_events(tx, before, from, limit_sql, within),
        // A few rows, kept for `event_retention` after they ended.
        Prunable::Silences => {
            let removed = tx
                .prepare_cached("DELETE FROM silences WHERE ends_at < ?1")?
                .execute([before])?;
            Ok(PruneStep {
                removed,
                next: None,
            })
        }
    }
}

/// Events from an id on, oldest first: whether each was received before a time, and whether
/// it has a delivery still to come.
const OLDEST_EVENTS: &str = "SELECT id, received_at < ?2,
            EXISTS (SELECT 1 FROM jobs j INDEXED BY jobs_open
                    WHERE j.event_id = events.id AND j.status IN ('pending', 'failed'))
     FROM events WHERE id >= ?1 ORDER BY id LIMIT ?3";
/// An event and everything recorded about it.
const DELETE_EVENT: [&str; 4] = [
    "DELETE FROM attempts WHERE job_id IN (SELECT id FROM jobs WHERE event_id = ?1)",
    "DELETE FROM jobs WHERE event_id = ?1",
    "DELETE FROM dispatches WHERE event_id = ?1",
    "DELETE FROM events WHERE id = ?1",
];
const EXPIRED_KEYS: &str = "DELETE FROM dedupe WHERE (source, delivery_id) IN
     (SELECT source, delivery_id FROM dedupe WHERE seen_at < ?1 LIMIT ?2)";

/// Events received before `before`, oldest first from id `from`, with their jobs, attempts and
/// routing records; an event with a delivery still to come stays. Ids grow with time, so the
/// first event young enough to keep ends the pass.
fn prune_events(
    tx: &Transaction<'_>,
    before: i64,
    from: i64,
    limit: i64,
    within: impl Fn(usize) -> bool,
) -> rusqlite::Result<PruneStep> {
    let candidates: Vec<(i64, bool, bool)> = tx
        .prepare_cached(OLDEST_EVENTS)?
        .query_map(params![from, before, limit], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?))
        })?
        .collect::<rusqlite::Result<_>>()?;
    let mut removed = 0;
    for (looked, &(id, expired, waiting)) in candidates.iter().enumerate() {
        if !expired {
            return Ok(PruneStep {
                removed,
                next: None,
            });
        }
        if !within(looked) {
            return Ok(PruneStep {
                removed,
                next: Some(id),
            });
        }
        if !waiting {
            for sql in DELETE_EVENT {
                tx.prepare_cached(sql)?.execute([id])?;
            }
            removed += 1;
        }
    }
    let full = candidates.len() == usize::try_from(limit).unwrap_or(usize::MAX);
    let next = candidates.last().filter(|_| full).map(|&(id, ..)| id + 1);
    Ok(PruneStep { removed, next })
}

/// Returns up to `pages` free pages at the end of the file to the file system, if the
/// database keeps track of them (`auto_vacuum = INCREMENTAL`, set when it was created);
/// returns how many free pages are left to return.
pub(super) fn reclaim(tx: &Transaction<'_>, pages: usize) -> rusqlite::Result<usize> {
    let mode: i64 = tx.query_row("PRAGMA auto_vacuum", [], |row| row.get(0))?;
    if mode != INCREMENTAL {
        return Ok(0);
    }
    // A pragma that returns no rows (nothing to free) still ran.
    tx.query_row(&format!("PRAGMA incremental_vacuum({pages})"), [], |_| {
        Ok(())
    })
    .optional()?;
    let free: i64 = tx.query_row("PRAGMA freelist_count", [], |row| row.get(0))?;
    Ok(usize::try_from(free).unwrap_or(0))
}

/// `PRAGMA auto_vacuum`'s value for incremental vacuum.
pub(super) const INCREMENTAL: i64 = 2;

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::Connection;

    /// A new database as the store makes it, holding `events` events received at 0..events
    /// ms, each with one job (the ones in `open` still waiting) and one attempt, and 8 KiB of
    /// payload each so that pruning them frees pages.
    fn database(events: i64, open: &[i64]) -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        let mut conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "auto_vacuum", INCREMENTAL)
            .unwrap();
        super::super::schema::migrate(&mut conn, &path).unwrap();
        let tx = conn.transaction().unwrap();
        for id in 1..=events {
            tx.execute(
                "INSERT INTO events (id, source, delivery_id, event_type, received_at, payload)
                 VALUES (?1, 'cl', ?1, 'scan.completed', ?1, zeroblob(8192))",
                [id],
            )
            .unwrap();
            let status = if open.contains(&id) {
                "failed"
            } else {
                "succeeded"
            };
            tx.execute(
                "INSERT INTO jobs (event_id, route, sink, status, attempts, next_attempt_at, created_at, updated_at)
                 VALUES (?1, 'r', 'archive', ?2, 1, 0, 0, 0)",
                params![id, status],
            )
            .unwrap();
            tx.execute(
                "INSERT INTO attempts (job_id, number, started_at, finished_at, outcome)
                 VALUES (last_insert_rowid(), 1, 0, 0, 'failed')",
                [],
            )
            .unwrap();
        }
        tx.commit().unwrap();
        (dir, conn)
    }

    fn count(conn: &Connection, table: &str) -> i64 {
        conn.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
            .unwrap()
    }

    /// 1,000 events of which the first 899 expired: steps of 64 look at no more than 64 each,
    /// go on where the last one stopped, keep the expired events whose delivery is still
    /// waiting, and stop at the first event young enough to keep.
    #[test]
    fn events_are_pruned_in_bounded_steps_that_resume() {
        let (_dir, mut conn) = database(1000, &[5, 500]);
        let (mut from, mut steps, mut removed) = (0, 0, 0);
        loop {
            let tx = conn.transaction().unwrap();
            let step =
                prune_within(&tx, Prunable::Events, 100, 1000, from, 64, Duration::MAX).unwrap();
            tx.commit().unwrap();
            assert!(step.removed <= 64);
            removed += step.removed;
            steps += 1;
            let Some(next) = step.next else { break };
            assert!(next > from, "a step moves on");
            from = next;
        }
        assert_eq!(removed, 897, "899 expired, 2 of them still waiting");
        assert_eq!(steps, 15, "900 events looked at, 64 at a time");
        assert_eq!(count(&conn, "events"), 103);
        assert_eq!(count(&conn, "jobs"), 103);
        assert_eq!(count(&conn, "attempts"), 103);
        let kept: i64 = conn
            .query_row("SELECT min(id) FROM events WHERE id > 500", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(
            kept, 900,
            "received at 900 ms, when 1000 - 100 is the limit"
        );
    }

    /// A step ends when its time is up, having removed at least one record, so pruning goes
    /// on however slow the disk.
    #[test]
    fn a_step_ends_when_its_time_is_up() {
        let (_dir, mut conn) = database(10, &[]);
        let mut step = |from| {
            let tx = conn.transaction().unwrap();
            let step =
                prune_within(&tx, Prunable::Events, 0, 1000, from, 64, Duration::ZERO).unwrap();
            tx.commit().unwrap();
            step
        };
        assert_eq!(
            step(0),
            PruneStep {
                removed: 1,
                next: Some(2)
            }
        );
        assert_eq!(
            step(2),
            PruneStep {
                removed: 1,
                next: Some(3)
            }
        );
    }

    /// The steps read by index: no statement scans a table.
    #[test]
    fn a_step_seeks_instead_of_scanning() {
        let (_dir, conn) = database(10, &[]);
        let mut statements = Vec::new();
        for sql in [OLDEST_EVENTS, EXPIRED_KEYS]
            .into_iter()
            .chain(DELETE_EVENT)
        {
            let mut explain = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
            let mut rows = explain.raw_query();
            while let Some(row) = rows.next().unwrap() {
                statements.push((sql, row.get::<_, String>(3).unwrap()));
            }
        }
        let scans: Vec<_> = statements
            .iter()
            .filter(|(_, step)| step.starts_with("SCAN"))
            .collect();
        assert!(scans.is_empty(), "{scans:#?}");
    }

    /// Space freed by pruning goes back to the file system, a bounded step at a time.
    #[test]
    fn freed_pages_are_returned_in_steps() {
        let (_dir, mut conn) = database(300, &[]);
        let pages = |conn: &Connection| -> i64 {
            conn.query_row("PRAGMA page_count", [], |r| r.get(0))
                .unwrap()
        };
        let full = pages(&conn);
        let tx = conn.transaction().unwrap();
        let step = prune_within(&tx, Prunable::Events, 0, 1000, 0, 300, Duration::MAX).unwrap();
        tx.commit().unwrap();
        assert_eq!(step.removed, 300);
        let mut left = Vec::new();
        loop {
            let tx = conn.transaction().unwrap();
            let free = reclaim(&tx, 128).unwrap();
            tx.commit().unwrap();
            left.push(free);
            if free == 0 {
                break;
            }
        }
        assert!(left.len() > 2, "{left:?}");
        assert!(left.windows(2).all(|w| w[0] - w[1] <= 128), "{left:?}");
        assert!(
            pages(&conn) * 10 < full,
            "{} of {full} pages left",
            pages(&conn)
        );
    }
}
