//! Which deliveries were stored before: `(source, delivery_id)` is unique in `dedupe`.
//!
//! Delivery ids are random, so inserting each key into that unique index as its event is
//! stored dirties one random index page per delivery, written to the WAL and again at
//! checkpoint: under load, that was a quarter of the writer's time. So the writer keeps the
//! keys of events stored in the last second in memory and then merges them into `dedupe` in
//! key order, many to an index page, a few hundred keys per writer turn so no request waits
//! long for a merge. The events table is the log behind the memory: `meta.dedupe_merged` is
//! the last event id whose key is in `dedupe`, and opening the store merges the keys of every
//! later event, so a crash loses none. Only the writer thread stores events (and only one
//! process serves a database, see `lock_instance`), so the table and the memory together
//! decide exactly whether a key was seen.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};

/// How long keys gather in memory before they are merged. The longer, the more keys share
/// an index page, which under a flood is most of a merge's cost: merging every 50 ms instead
/// cost the ingest flood about a tenth of its throughput (benches/README.md).
const MERGE_EVERY: Duration = Duration::from_secs(1);
/// Keys merged per writer turn: each is about one index page once the index outgrows a
/// merge, so a turn's merge holds the writer for a millisecond or two. (All of a second's
/// keys at once, at 2,000 requests/s, was a 10 ms stall every second: p99 +0.5 ms.)
const MERGE_STEP: usize = 256;
/// How many keys wait in memory, at most (about 100 bytes each); past it, merges take
/// whatever waits instead of a step.
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
    /// Keys of the batch being applied: kept only if it commits.
    staged: Keys,
    /// Keys of events committed since the merge in progress began.
    committed: Keys,
    /// When the oldest key in `committed` was committed.
    since: Option<Instant>,
    /// The merge in progress: keys in key order, the first `done` of them merged.
    merging: Merging,
}

/// A second's keys on their way into `dedupe`, in key order.
#[derive(Debug, Default)]
struct Merging {
    keys: Vec<(String, String, Seen)>,
    done: usize,
    /// The newest event among `keys`: every key up to it is in `dedupe` once all are.
    last: i64,
}

impl Merging {
    fn get(&self, source: &str, delivery_id: &str) -> Option<Seen> {
        let at = self
            .keys
            .binary_search_by(|(s, id, _)| (s.as_str(), id.as_str()).cmp(&(source, delivery_id)))
            .ok()?;
        Some(self.keys[at].2)
    }

    fn waiting(&self) -> usize {
        self.keys.len() - self.done
    }
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
            staged: Keys::default(),
            committed: Keys::default(),
            since: None,
            merging: Merging::default(),
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
        recent.merge_all(conn)?;
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
            .or_else(|| self.merging.get(source, delivery_id))
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

    /// Forgets the keys in memory received before `before` (unix milliseconds), as pruning
    /// deletes the table's: a key the retention let go of is new again, merged or not.
    pub(super) fn forget_before(&mut self, before: i64) {
        for ids in self.committed.by_source.values_mut() {
            ids.retain(|_, seen| seen.at >= before);
        }
        let merging = &mut self.merging;
        let waiting = merging.keys.split_off(merging.done);
        merging
            .keys
            .extend(waiting.into_iter().filter(|(_, _, seen)| seen.at >= before));
    }

    /// The batch rolled back: its events were never stored.
    pub(super) fn roll_back(&mut self) {
        self.staged = Keys::default();
    }

    /// Whether a merge is under way, or enough keys waited long enough to start one.
    pub(super) fn due(&self) -> bool {
        self.merging.waiting() > 0
            || self.committed.len() >= MERGE_AT
            || self.since.is_some_and(|t| t.elapsed() >= MERGE_EVERY)
    }

    /// Writes the next step of waiting keys into `dedupe`, in one transaction of its own,
    /// starting a merge of the committed keys if none is under way. It need not wait for a
    /// flush: were it lost, the next open would merge the same keys.
    pub(super) fn merge(&mut self, conn: &mut Connection) -> rusqlite::Result<()> {
        if self.merging.waiting() == 0 {
            self.start_merge();
        }
        let step = if self.merging.waiting() + self.committed.len() >= MERGE_AT {
            self.merging.waiting()
        } else {
            MERGE_STEP
        };
        self.merge_step(conn, step)
    }

    /// Merges every key in memory (when the writer stops, or opens the store).
    pub(super) fn merge_all(&mut self, conn: &mut Connection) -> rusqlite::Result<()> {
        let waiting = self.merging.waiting();
        self.merge_step(conn, waiting)?;
        self.start_merge();
        let waiting = self.merging.waiting();
        self.merge_step(conn, waiting)
    }

    /// Takes the committed keys as the next merge, in key order.
    fn start_merge(&mut self) {
        let mut keys: Vec<(String, String, Seen)> = std::mem::take(&mut self.committed)
            .by_source
            .into_iter()
            .flat_map(|(source, ids)| {
                ids.into_iter()
                    .map(move |(id, seen)| (source.clone(), id, seen))
            })
            .collect();
        keys.sort_unstable_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        let last = keys.iter().map(|key| key.2.event_id).max().unwrap_or(0);
        self.merging = Merging {
            keys,
            done: 0,
            last,
        };
        self.since = None;
    }

    /// Writes up to `limit` waiting keys; after the last, records that every key up to the
    /// merge's newest event is in the table.
    fn merge_step(&mut self, conn: &mut Connection, limit: usize) -> rusqlite::Result<()> {
        let merging = &mut self.merging;
        let end = merging.done + limit.min(merging.waiting());
        if end == merging.done {
            return Ok(());
        }
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            // A key already there (a merge cut short by a crash left it, or a hand-edited
            // database) keeps its first event.
            let mut insert = tx.prepare_cached(
                "INSERT INTO dedupe (source, delivery_id, event_id, seen_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (source, delivery_id) DO NOTHING",
            )?;
            for (source, delivery_id, seen) in &merging.keys[merging.done..end] {
                insert.execute(params![source, delivery_id, seen.event_id, seen.at])?;
            }
        }
        if end == merging.keys.len() {
            super::schema::set_meta(&tx, MERGED, &merging.last.to_string())?;
        }
        tx.commit()?;
        merging.done = end;
        if merging.waiting() == 0 {
            *merging = Merging::default();
        }
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
        assert_eq!(merged(&conn).as_deref(), Some("3"));
    }

    /// Where the last completed merge ended, as `meta` records it.
    fn merged(conn: &Connection) -> Option<String> {
        conn.query_row(
            "SELECT value FROM meta WHERE key = 'dedupe_merged'",
            [],
            |r| r.get(0),
        )
        .optional()
        .unwrap()
    }

    /// A merge takes a step per writer turn; keys stay decided by memory until it is done,
    /// and keys committed meanwhile wait for the next merge.
    #[test]
    fn a_merge_moves_a_step_of_keys_per_turn() {
        let (_dir, mut conn) = open();
        let mut recent = Recent::open(&mut conn).unwrap();
        let before = merged(&conn);
        let ids: Vec<String> = (0..MERGE_STEP + 10).map(|n| format!("k{n:05}")).collect();
        for id in &ids {
            let event = store_event(&conn, id);
            recent.stage("cl", id, event, 7);
        }
        recent.commit();
        recent.merge(&mut conn).unwrap();
        assert_eq!(table(&conn).len(), MERGE_STEP, "one step");
        assert_eq!(merged(&conn), before, "not every key is in the table yet");
        assert!(recent.due(), "the rest waits for the next turn");
        let late = store_event(&conn, "late");
        recent.stage("cl", "late", late, 7);
        recent.commit();
        for id in [&ids[0], &ids[MERGE_STEP + 9]] {
            assert!(seen(&recent, &mut conn, id).is_some(), "{id} is decided");
        }
        recent.merge(&mut conn).unwrap();
        assert_eq!(
            table(&conn).len(),
            ids.len(),
            "the late key is not in this merge"
        );
        assert_eq!(merged(&conn), Some(ids.len().to_string()));
        assert_eq!(seen(&recent, &mut conn, "late"), Some(late));
        assert!(!recent.due(), "the late key waits its second");
        recent.merge_all(&mut conn).unwrap();
        assert_eq!(table(&conn).len(), ids.len() + 1);
        assert_eq!(merged(&conn), Some(late.to_string()));
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
