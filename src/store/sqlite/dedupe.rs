//! Which deliveries were stored before: `(source, delivery_id)` is unique in `dedupe`.
//!
//! Delivery ids are random, so inserting each key into that unique index as its event is
//! stored dirties one random index page per delivery, written to the WAL and again at
//! checkpoint: under load, that was a quarter of the writer's time. So the writer keeps the
//! keys of events stored since the last merge in memory and merges them into `dedupe` in key
//! order, many to an index page, twenty times a second. The events table is the log behind the
//! memory: `meta.dedupe_merged` is the last event id whose key is in `dedupe`, and opening the
//! store merges the keys of every later event, so a crash loses none. Only the writer thread
//! stores events (and only one process serves a database, see `lock_instance`), so the table
//! and the memory together decide exactly whether a key was seen.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};

/// How long a key waits in memory, at most, before it is merged. A merge holds the writer
/// for about one index page per key once the index outgrows the merge, so merges stay small:
/// once a second, at 2,000 requests/s, it was a 10 ms stall every second (p99 +0.5 ms, the
/// slowest request 13 ms instead of 7; benches/README.md). Under a flood the keys per merge
/// grow with the rate, and so does how many share a page.
const MERGE_EVERY: Duration = Duration::from_millis(50);
/// How many keys wait in memory, at most (about 100 bytes each).
const MERGE_AT: usize = 1 << 16;
/// The `meta` key holding the last event id whose key is in `dedupe`.
const MERGED: &str = "dedupe_merged";

/// The event that first carried a key, and when it was received (unix milliseconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    event_id: i64,
    at: i64,
}

/// Keys by source, then delivery id: looked up by `&str` without building a key.
#[derive(Debug, Default)]
struct Keys {
    by_source: HashMap<String, HashMap<String, Seen>>,
}

impl Keys {
    fn get(&self, source: &str, delivery_id: &str) -> Option<Seen> {
        self.by_source.get(source)?.get(delivery_id).copied()
    }

    fn insert(&mut self, source: &str, delivery_id: &str, seen: Seen) {
        let ids = match self.by_source.get_mut(source) {
            Some(ids) => ids,
            None => self.by_source.entry(source.to_owned()).or_default(),
        };
        ids.insert(delivery_id.to_owned(), seen);
    }

    fn len(&self) -> usize {
        self.by_source.values().map(HashMap::len).sum()
    }

    fn absorb(&mut self, other: Keys) {
        for (source, ids) in other.by_source {
            self.by_source.entry(source).or_default().extend(ids);
        }
    }
}

/// The keys not yet merged into `dedupe`. Owned by the writer thread.
#[derive(Debug)]
pub(super) struct Recent {
    /// Keys of committed events after `merged`.
    committed: Keys,
    /// Keys of the batch being applied: kept only if it commits.
    staged: Keys,
    /// When the oldest unmerged key was committed.
    since: Option<Instant>,
}

impl Recent {
    /// Reads where the last merge ended and merges the keys of every event stored after it
    /// (after a crash; a clean stop merges everything).
    pub(super) fn open(conn: &mut Connection) -> rusqlite::Result<Self> {
        let merged: Option<String> = conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [MERGED], |row| {
                row.get(0)
            })
            .optional()?;
        let merged: i64 = merged.and_then(|id| id.parse().ok()).unwrap_or(0);
        let mut recent = Self {
            committed: Keys::default(),
            staged: Keys::default(),
            since: None,
        };
        {
            let mut tail = conn.prepare(
                "SELECT id, source, delivery_id, received_at FROM events WHERE id > ?1 ORDER BY id",
            )?;
            let mut rows = tail.query([merged])?;
            while let Some(row) = rows.next()? {
                let seen = Seen {
                    event_id: row.get(0)?,
                    at: row.get(3)?,
                };
                recent
                    .committed
                    .insert(&row.get::<_, String>(1)?, &row.get::<_, String>(2)?, seen);
            }
        }
        recent.merge(conn)?;
        Ok(recent)
    }

    /// The id of the event that first carried this key, if one was stored within the
    /// retention: the batch being applied, then memory, then the table.
    pub(super) fn seen(
        &self,
        tx: &Transaction<'_>,
        source: &str,
        delivery_id: &str,
    ) -> rusqlite::Result<Option<i64>> {
        if let Some(seen) = self
            .staged
            .get(source, delivery_id)
            .or_else(|| self.committed.get(source, delivery_id))
        {
            return Ok(Some(seen.event_id));
        }
        tx.prepare_cached("SELECT event_id FROM dedupe WHERE source = ?1 AND delivery_id = ?2")?
            .query_row(params![source, delivery_id], |row| row.get(0))
            .optional()
    }

    /// Notes an event stored by the batch being applied.
    pub(super) fn stage(&mut self, source: &str, delivery_id: &str, event_id: i64, at: i64) {
        self.staged
            .insert(source, delivery_id, Seen { event_id, at });
    }

    /// The batch committed: its keys count from now on.
    pub(super) fn commit(&mut self) {
        if self.staged.len() > 0 {
            self.since.get_or_insert_with(Instant::now);
            self.committed.absorb(std::mem::take(&mut self.staged));
        }
    }

    /// The batch rolled back: its events were never stored.
    pub(super) fn roll_back(&mut self) {
        self.staged = Keys::default();
    }

    /// Whether enough keys waited long enough to be merged.
    pub(super) fn due(&self) -> bool {
        self.committed.len() >= MERGE_AT || self.since.is_some_and(|t| t.elapsed() >= MERGE_EVERY)
    }

    /// Writes the committed keys into `dedupe` in key order, in one transaction of their own.
    /// It need not wait for a flush: were it lost, the next open would merge the same keys.
    pub(super) fn merge(&mut self, conn: &mut Connection) -> rusqlite::Result<()> {
        let mut keys: Vec<(&str, &str, Seen)> = self
            .committed
            .by_source
            .iter()
            .flat_map(|(source, ids)| {
                ids.iter()
                    .map(|(id, seen)| (source.as_str(), id.as_str(), *seen))
            })
            .collect();
        let Some(last) = keys.iter().map(|key| key.2.event_id).max() else {
            return Ok(()); // nothing waits
        };
        keys.sort_unstable_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            // A key already there (only a hand-edited database has one) keeps its first event.
            let mut insert = tx.prepare_cached(
                "INSERT INTO dedupe (source, delivery_id, event_id, seen_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (source, delivery_id) DO NOTHING",
            )?;
            for (source, delivery_id, seen) in &keys {
                insert.execute(params![source, delivery_id, seen.event_id, seen.at])?;
            }
        }
        super::writer::set_meta(&tx, MERGED, &last.to_string())?;
        tx.commit()?;
        self.committed = Keys::default();
        self.since = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open() -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = Connection::open(dir.path().join("d.db")).unwrap();
        super::super::schema::migrate(&mut conn, std::path::Path::new("d.db")).unwrap();
        (dir, conn)
    }

    fn store_event(conn: &Connection, delivery_id: &str) -> i64 {
        conn.execute(
            "INSERT INTO events (source, delivery_id, event_type, received_at, payload)
             VALUES ('cl', ?1, 'scan.completed', 7, '{}')",
            [delivery_id],
        )
        .unwrap();
        conn.last_insert_rowid()
    }

    fn seen(recent: &Recent, conn: &mut Connection, delivery_id: &str) -> Option<i64> {
        let tx = conn.transaction().unwrap();
        recent.seen(&tx, "cl", delivery_id).unwrap()
    }

    fn table(conn: &Connection) -> Vec<(String, i64, i64)> {
        let mut stmt = conn
            .prepare("SELECT delivery_id, event_id, seen_at FROM dedupe ORDER BY delivery_id")
            .unwrap();
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    #[test]
    fn a_rolled_back_batch_leaves_no_key_behind() {
        let (_dir, mut conn) = open();
        let mut recent = Recent::open(&mut conn).unwrap();
        recent.stage("cl", "a", 1, 7);
        assert_eq!(
            seen(&recent, &mut conn, "a"),
            Some(1),
            "the batch sees its own keys"
        );
        recent.roll_back();
        assert_eq!(seen(&recent, &mut conn, "a"), None);
        recent.stage("cl", "b", 2, 7);
        recent.commit();
        assert_eq!(seen(&recent, &mut conn, "b"), Some(2));
        assert!(!recent.due(), "a fresh key waits");
    }

    #[test]
    fn merging_moves_keys_into_the_table_in_order() {
        let (_dir, mut conn) = open();
        let mut recent = Recent::open(&mut conn).unwrap();
        for id in ["c", "a", "b"] {
            let event = store_event(&conn, id);
            recent.stage("cl", id, event, 7);
        }
        recent.commit();
        assert!(table(&conn).is_empty());
        recent.merge(&mut conn).unwrap();
        assert_eq!(
            table(&conn),
            [("a".into(), 2, 7), ("b".into(), 3, 7), ("c".into(), 1, 7)]
        );
        assert_eq!(seen(&recent, &mut conn, "c"), Some(1), "found in the table");
        let merged: String = conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'dedupe_merged'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(merged, "3");
    }

    /// What a crash leaves: events stored after the last merge. Opening merges their keys;
    /// earlier events' keys (pruned from the table by then) do not come back.
    #[test]
    fn opening_merges_the_keys_of_events_stored_after_the_last_merge() {
        let (_dir, mut conn) = open();
        let expired = store_event(&conn, "expired");
        conn.execute(
            "UPDATE meta SET value = ?1 WHERE key = 'dedupe_merged'",
            [expired.to_string()],
        )
        .unwrap();
        store_event(&conn, "x");
        store_event(&conn, "y");
        let recent = Recent::open(&mut conn).unwrap();
        assert_eq!(table(&conn), [("x".into(), 2, 7), ("y".into(), 3, 7)]);
        assert_eq!(seen(&recent, &mut conn, "expired"), None);
    }
}
