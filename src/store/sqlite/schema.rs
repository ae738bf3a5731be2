//! The schema and its migrations. `PRAGMA user_version` counts the migrations that ran; each
//! runs once, in order, in one transaction with the others still due.

use std::path::Path;

use rusqlite::{Connection, Transaction, TransactionBehavior};

use crate::store::StoreError;

/// Schema migrations, applied in order; `PRAGMA user_version` counts how many ran.
pub(super) const MIGRATIONS: &[&str] = &[
    r"
CREATE TABLE events (
    id              INTEGER PRIMARY KEY,
    source          TEXT    NOT NULL,
    delivery_id     TEXT    NOT NULL,
    event_type      TEXT    NOT NULL,
    occurred_at     TEXT,
    received_at     INTEGER NOT NULL,   -- unix milliseconds
    sender_delivery TEXT,
    payload         BLOB    NOT NULL    -- the body exactly as signed
);

-- One row per (source, delivery id) seen within the retention window.
CREATE TABLE dedupe (
    source      TEXT    NOT NULL,
    delivery_id TEXT    NOT NULL,
    event_id    INTEGER NOT NULL,
    seen_at     INTEGER NOT NULL,
    PRIMARY KEY (source, delivery_id)
) WITHOUT ROWID;
CREATE INDEX dedupe_seen_at ON dedupe(seen_at);

-- Routing outcomes that created no job: a throttled route, or an event no route took.
CREATE TABLE dispatches (
    id       INTEGER PRIMARY KEY,
    event_id INTEGER NOT NULL REFERENCES events(id),
    route    TEXT,                      -- NULL when unrouted
    status   TEXT    NOT NULL CHECK (status IN ('suppressed', 'unrouted')),
    detail   TEXT,                      -- the throttle key
    at       INTEGER NOT NULL
);
CREATE INDEX dispatches_event ON dispatches(event_id);
CREATE INDEX dispatches_status ON dispatches(status, id);

-- One delivery of one event through one route to one sink, retried until it succeeds or dies.
CREATE TABLE jobs (
    id              INTEGER PRIMARY KEY,
    event_id        INTEGER NOT NULL REFERENCES events(id),
    route           TEXT    NOT NULL,
    sink            TEXT    NOT NULL,
    status          TEXT    NOT NULL CHECK (status IN ('pending', 'in_flight', 'succeeded', 'failed', 'dead')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,   -- unix milliseconds
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    last_error      TEXT,
    response        TEXT                -- the sink's answer, summarised and bounded
);
CREATE INDEX jobs_event ON jobs(event_id);
CREATE INDEX jobs_due ON jobs(sink, next_attempt_at) WHERE status IN ('pending', 'failed');
CREATE INDEX jobs_status ON jobs(status, id);

CREATE TABLE attempts (
    id          INTEGER PRIMARY KEY,
    job_id      INTEGER NOT NULL REFERENCES jobs(id),
    number      INTEGER NOT NULL,
    started_at  INTEGER NOT NULL,
    finished_at INTEGER NOT NULL,
    outcome     TEXT    NOT NULL CHECK (outcome IN ('succeeded', 'failed', 'dead')),
    error       TEXT,
    response    TEXT
);
CREATE INDEX attempts_job ON attempts(job_id);

-- Throttle windows, per route and rendered key: durable, so a restart does not reopen them.
CREATE TABLE throttles (
    route      TEXT    NOT NULL,
    key        TEXT    NOT NULL,
    started_at INTEGER NOT NULL,        -- unix milliseconds, on the events' own clock
    window_ms  INTEGER NOT NULL,
    PRIMARY KEY (route, key)
) WITHOUT ROWID;

-- `dispatch_cursor`: every event with an id up to it has its outcomes recorded. One row
-- updated per dispatch round, rather than a flag rewritten on every (payload-heavy) event row.
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
",
    r"
-- Waiting jobs by sink and age: with `jobs_due`, what the delivery engine asks on every turn
-- (which sinks wait, since when, and when next) is a few index seeks, however long the queue.
CREATE INDEX jobs_waiting ON jobs(sink, created_at) WHERE status IN ('pending', 'failed');
",
    r"
-- Events are routed in the transaction that stores them, so there is no dispatch cursor.
DELETE FROM meta WHERE key = 'dispatch_cursor';
-- The jobs being attempted are the engine's to know, in memory; a job stays pending until
-- its outcome is recorded. Jobs an earlier version marked in flight are simply pending.
UPDATE jobs SET status = 'pending' WHERE status = 'in_flight';
-- Status indexes cost a write on every insert and every status change, and only the dead
-- letters are ever looked up by status (`dead-letter retry`): index just those.
DROP INDEX jobs_status;
CREATE INDEX jobs_dead ON jobs(id) WHERE status = 'dead';
DROP INDEX dispatches_status;
",
    r"
-- A CHECK of `x IN (...)` over more than two values makes SQLite build a temporary table on
-- every insert and update of the row (a few per cent of the daemon's CPU under load); the
-- same check spelled as ORs does not. SQLite cannot change a CHECK in place, so both tables
-- are rebuilt (https://sqlite.org/lang_altertable.html#otheralter). `in_flight` is gone:
-- migration 3 retired it.
CREATE TABLE jobs_new (
    id              INTEGER PRIMARY KEY,
    event_id        INTEGER NOT NULL REFERENCES events(id),
    route           TEXT    NOT NULL,
    sink            TEXT    NOT NULL,
    status          TEXT    NOT NULL
                    CHECK (status = 'pending' OR status = 'succeeded' OR status = 'failed' OR status = 'dead'),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,   -- unix milliseconds
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    last_error      TEXT,
    response        TEXT                -- the sink's answer, summarised and bounded
);
INSERT INTO jobs_new SELECT id, event_id, route, sink, status, attempts, next_attempt_at,
                            created_at, updated_at, last_error, response FROM jobs;
DROP TABLE jobs;
ALTER TABLE jobs_new RENAME TO jobs;
CREATE INDEX jobs_event ON jobs(event_id);
CREATE INDEX jobs_due ON jobs(sink, next_attempt_at) WHERE status IN ('pending', 'failed');
CREATE INDEX jobs_waiting ON jobs(sink, created_at) WHERE status IN ('pending', 'failed');
CREATE INDEX jobs_dead ON jobs(id) WHERE status = 'dead';

CREATE TABLE attempts_new (
    id          INTEGER PRIMARY KEY,
    job_id      INTEGER NOT NULL REFERENCES jobs(id),
    number      INTEGER NOT NULL,
    started_at  INTEGER NOT NULL,
    finished_at INTEGER NOT NULL,
    outcome     TEXT    NOT NULL CHECK (outcome = 'succeeded' OR outcome = 'failed' OR outcome = 'dead'),
    error       TEXT,
    response    TEXT
);
INSERT INTO attempts_new SELECT id, job_id, number, started_at, finished_at, outcome, error, response
                         FROM attempts;
DROP TABLE attempts;
ALTER TABLE attempts_new RENAME TO attempts;
CREATE INDEX attempts_job ON attempts(job_id);
",
    r"
-- Keys reach `dedupe` in sorted batches after their events are stored (see store::dedupe);
-- this is the last event whose key is there. Every earlier event's key already is.
INSERT INTO meta (key, value) SELECT 'dedupe_merged', coalesce(max(id), 0) FROM events;
",
    r"
-- What `deliveries list` filters by, so each filter is an index seek that reads only the rows
-- it prints, however long the history (see store::sqlite::admin):
-- by source, newest first (appended to at the end of each source's range, so cheap to keep);
CREATE INDEX events_source ON events(source, id);
-- events no route took: flagged, since such an event has nothing else to be found by. Set
-- when stored, cleared when a replay gives it jobs. Earlier versions' `unrouted` dispatch rows
-- become the flag.
ALTER TABLE events ADD COLUMN unrouted INTEGER;
UPDATE events SET unrouted = 1
 WHERE NOT EXISTS (SELECT 1 FROM jobs j WHERE j.event_id = events.id)
   AND NOT EXISTS (SELECT 1 FROM dispatches d WHERE d.event_id = events.id AND d.status <> 'unrouted');
DELETE FROM dispatches WHERE status = 'unrouted';
CREATE INDEX events_unrouted ON events(id) WHERE unrouted = 1;
-- jobs by status, newest event first: only the statuses a job leaves (waiting, dead), so a
-- delivered job is written to no status index. Succeeded jobs are found from their events.
DROP INDEX jobs_dead;
CREATE INDEX jobs_dead ON jobs(event_id) WHERE status = 'dead';
CREATE INDEX jobs_open ON jobs(event_id) WHERE status IN ('pending', 'failed');
-- suppressed routes, newest event first (a row exists only when a throttle suppressed one).
CREATE INDEX dispatches_status ON dispatches(status, event_id);
",
    r"
-- Silences (`hookroute silence`): what to keep quiet, from when to when, and why. Every
-- matcher is optional; at least one is set. Each daemon reads those not yet ended every
-- second (`silences_end`).
CREATE TABLE silences (
    id          INTEGER PRIMARY KEY,
    route       TEXT,
    sink        TEXT,
    source      TEXT,
    event_type  TEXT,                   -- a glob
    condition   TEXT,                   -- CEL, as a route's `when`
    starts_at   INTEGER NOT NULL,       -- unix milliseconds
    ends_at     INTEGER NOT NULL,
    comment     TEXT    NOT NULL,
    author      TEXT    NOT NULL,
    created_at  INTEGER NOT NULL
);
CREATE INDEX silences_end ON silences(ends_at);

-- Jobs a silence or a mute window set aside: two more statuses, and by what (the silence's
-- id, or the window's name). SQLite cannot change a CHECK in place: the table is rebuilt, as
-- in migration 4, its CHECK still spelled as ORs.
CREATE TABLE jobs_new (
    id              INTEGER PRIMARY KEY,
    event_id        INTEGER NOT NULL REFERENCES events(id),
    route           TEXT    NOT NULL,
    sink            TEXT    NOT NULL,
    status          TEXT    NOT NULL
                    CHECK (status = 'pending' OR status = 'succeeded' OR status = 'failed' OR status = 'dead'
                           OR status = 'silenced' OR status = 'muted'),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,   -- unix milliseconds
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    last_error      TEXT,
    response        TEXT,               -- the sink's answer, summarised and bounded
    quieted_by      TEXT                -- silenced: the silence's id; muted: the window's name
);
INSERT INTO jobs_new SELECT id, event_id, route, sink, status, attempts, next_attempt_at,
                            created_at, updated_at, last_error, response, NULL FROM jobs;
DROP TABLE jobs;
ALTER TABLE jobs_new RENAME TO jobs;
CREATE INDEX jobs_event ON jobs(event_id);
CREATE INDEX jobs_due ON jobs(sink, next_attempt_at) WHERE status IN ('pending', 'failed');
CREATE INDEX jobs_waiting ON jobs(sink, created_at) WHERE status IN ('pending', 'failed');
CREATE INDEX jobs_dead ON jobs(event_id) WHERE status = 'dead';
CREATE INDEX jobs_open ON jobs(event_id) WHERE status IN ('pending', 'failed');
-- set-aside jobs, newest event first (`deliveries list --status silenced`), and by what
-- (`silence show`).
CREATE INDEX jobs_quiet ON jobs(event_id) WHERE status IN ('silenced', 'muted');
CREATE INDEX jobs_quieted_by ON jobs(quieted_by, event_id) WHERE quieted_by IS NOT NULL;
",
    r"
-- Grouped jobs (a route's `group`): the key their group shares. A group's state is its jobs:
-- the newest one says when its next delivery is due (rules::group::due).
ALTER TABLE jobs ADD COLUMN group_key TEXT;
CREATE INDEX jobs_group ON jobs(sink, route, group_key, id) WHERE group_key IS NOT NULL;
",
    r"
-- Each sink's health, shared by every daemon: its failure streak and its pause
-- (store::sinks). A healthy, running sink has no row.
CREATE TABLE sink_states (
    sink            TEXT    PRIMARY KEY,
    failing_since   INTEGER,            -- unix milliseconds
    failures        INTEGER NOT NULL DEFAULT 0,
    last_error      TEXT,
    last_failure_at INTEGER,
    transient       INTEGER NOT NULL DEFAULT 0,
    paused_since    INTEGER,
    paused_until    INTEGER,            -- an operator's `--for`
    paused_by       TEXT,
    pause_comment   TEXT,
    pause_auto      INTEGER NOT NULL DEFAULT 0,
    next_probe      INTEGER
) WITHOUT ROWID;
",
    r"
-- Each source's reconcile passes (store::passes): when the last began and how it ended,
-- and an operator's request for one now (`hookroute reconcile --once`).
CREATE TABLE reconcile_passes (
    source       TEXT    PRIMARY KEY,
    requested_at INTEGER,              -- unix milliseconds
    started_at   INTEGER,
    held_by      INTEGER,              -- the daemon running one, until it ends
    finished_at  INTEGER,
    last_success INTEGER,
    outcome      TEXT,                 -- ok, failed, refused
    detail       TEXT
) WITHOUT ROWID;
",
];

/// The schema version of `conn`'s database: how many migrations ran.
pub(super) fn version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("PRAGMA user_version", [], |row| row.get(0))
}

/// Refuses a database this build cannot read: one from a newer build, or (for the tools, which
/// never migrate) one the daemon has not migrated yet.
pub(super) fn check_version(path: &Path, version: i64) -> Result<(), StoreError> {
    let known = MIGRATIONS.len() as i64;
    if version == known {
        return Ok(());
    }
    Err(StoreError::Schema {
        database: path.display().to_string(),
        version,
        known,
    })
}

/// Brings the schema up to date, then enforces foreign keys on `conn`. A database from a newer
/// build is refused, not run on a schema this build does not know.
pub(super) fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let open_err = super::open_error(path);
    let found = version(conn).map_err(open_err)?;
    if found > MIGRATIONS.len() as i64 {
        return check_version(path, found);
    }
    apply(conn).map_err(open_err)
}

fn apply(conn: &mut Connection) -> rusqlite::Result<()> {
    // Off while migrating: rebuilding a table drops the old one, which foreign keys would
    // refuse while other tables point at it. The pragma is a no-op inside a transaction.
    conn.pragma_update(None, "foreign_keys", false)?;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let version: i64 = tx.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    for (i, sql) in (1..)
        .zip(MIGRATIONS)
        .skip(usize::try_from(version).unwrap_or(0))
    {
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i)?;
    }
    tx.commit()?;
    conn.pragma_update(None, "foreign_keys", true)
}

/// Sets `key` of the `meta` table (defined here, with every table), in the writer's
/// transaction `tx`.
pub(super) fn set_meta(tx: &Transaction<'_>, key: &str, value: &str) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO meta (key, value) VALUES (?1, ?2)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    )?
    .execute(rusqlite::params![key, value])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database made by the first `version` migrations and holding `rows`, then migrated to
    /// the current schema.
    fn migrated_from(version: usize, rows: &str) -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        let old = Connection::open(&path).unwrap();
        for (number, sql) in (1..).zip(&MIGRATIONS[..version]) {
            old.execute_batch(sql).unwrap();
            old.pragma_update(None, "user_version", number).unwrap();
        }
        old.execute_batch(rows).unwrap();
        drop(old);
        let mut conn = Connection::open(&path).unwrap();
        apply(&mut conn).unwrap();
        (dir, conn)
    }

    /// A database from before routing moved into the ingest transaction: its dispatch cursor
    /// goes, jobs it marked in flight are pending again, and only dead letters stay indexed
    /// by status.
    #[test]
    fn migration_3_upgrades_a_version_2_database() {
        let (_dir, conn) = migrated_from(
            2,
            "INSERT INTO events (source, delivery_id, event_type, received_at, payload)
                 VALUES ('cl', 'd1', 'scan.completed', 0, '{}');
             INSERT INTO jobs (event_id, route, sink, status, attempts, next_attempt_at, created_at, updated_at)
                 VALUES (1, 'r', 'archive', 'in_flight', 1, 0, 0, 0), (1, 'r', 'mail', 'dead', 3, 0, 0, 0);
             INSERT INTO meta (key, value) VALUES ('dispatch_cursor', '1');",
        );
        let query = |sql: &str| -> String { conn.query_row(sql, [], |r| r.get(0)).unwrap() };
        assert_eq!(
            query("SELECT group_concat(status) FROM jobs ORDER BY id"),
            "pending,dead"
        );
        assert_eq!(
            query(
                "SELECT group_concat(name) FROM sqlite_schema WHERE name IN ('jobs_status', 'jobs_dead')"
            ),
            "jobs_dead"
        );
        assert_eq!(
            query("SELECT count(*) || '' FROM meta WHERE key = 'dispatch_cursor'"),
            "0"
        );
        let plan: Vec<String> = conn
            .prepare("EXPLAIN QUERY PLAN SELECT id FROM jobs WHERE status = 'dead'")
            .unwrap()
            .query_map([], |row| row.get(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(
            plan.iter().any(|step| step.contains("jobs_dead")),
            "{plan:?}"
        );
    }

    /// Jobs and attempts keep their rows, indexes and checks through the rebuild, and writing
    /// them no longer builds a temporary table per statement.
    #[test]
    fn migration_4_rebuilds_jobs_and_attempts_with_the_same_rows() {
        let (_dir, conn) = migrated_from(
            3,
            "INSERT INTO events (source, delivery_id, event_type, received_at, payload)
                 VALUES ('cl', 'd1', 'scan.completed', 0, '{}');
             INSERT INTO jobs (event_id, route, sink, status, attempts, next_attempt_at, created_at, updated_at, last_error)
                 VALUES (1, 'r', 'archive', 'failed', 1, 5, 0, 1, 'HTTP 500'), (1, 'r', 'mail', 'dead', 3, 0, 0, 0, 'gone');
             INSERT INTO attempts (job_id, number, started_at, finished_at, outcome, error)
                 VALUES (1, 1, 0, 1, 'failed', 'HTTP 500'), (2, 3, 0, 0, 'dead', 'gone');",
        );
        let query = |sql: &str| -> String { conn.query_row(sql, [], |r| r.get(0)).unwrap() };
        assert_eq!(
            query(
                "SELECT group_concat(id || ':' || sink || ':' || status || ':' || attempts || ':' || last_error, ' ')
                 FROM jobs"
            ),
            "1:archive:failed:1:HTTP 500 2:mail:dead:3:gone"
        );
        assert_eq!(
            query("SELECT group_concat(job_id || ':' || outcome, ' ') FROM attempts"),
            "1:failed 2:dead"
        );
        assert_eq!(
            query(
                "SELECT group_concat(name, ' ') FROM sqlite_schema
                 WHERE type = 'index' AND tbl_name IN ('jobs', 'attempts') ORDER BY name"
            ),
            "attempts_job jobs_event jobs_due jobs_waiting jobs_dead jobs_open jobs_quiet jobs_quieted_by jobs_group"
        );
        // Migration 5: the old writer stored every key with its event, so the merged keys
        // end at the last event.
        assert_eq!(
            query("SELECT value FROM meta WHERE key = 'dedupe_merged'"),
            "1"
        );
        assert!(
            conn.execute("UPDATE jobs SET status = 'lost' WHERE id = 1", [])
                .is_err(),
            "the status check survives the rebuild"
        );
        assert!(
            conn.execute(
                "INSERT INTO attempts (job_id, number, started_at, finished_at, outcome) VALUES (9, 1, 0, 0, 'succeeded')",
                [],
            )
            .is_err(),
            "attempts still reference jobs"
        );
        for sql in [
            "INSERT INTO jobs (event_id, route, sink, status, next_attempt_at, created_at, updated_at)
             VALUES (1, 'r', 'archive', 'pending', 0, 0, 0)",
            "UPDATE jobs SET status = 'succeeded' WHERE id = 1",
            "INSERT INTO attempts (job_id, number, started_at, finished_at, outcome) VALUES (1, 2, 0, 0, 'succeeded')",
        ] {
            let program: Vec<String> = conn
                .prepare(&format!("EXPLAIN {sql}"))
                .unwrap()
                .query_map([], |row| row.get(1))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            assert!(
                !program.iter().any(|op| op == "OpenEphemeral"),
                "{sql}: {program:?}"
            );
        }
    }

    /// Events no route took are flagged, from either way earlier versions recorded them (no
    /// rows at all, or an `unrouted` dispatch row, which goes); routed and suppressed events
    /// are not.
    #[test]
    fn migration_6_flags_unrouted_events() {
        let (_dir, conn) = migrated_from(
            5,
            "INSERT INTO events (source, delivery_id, event_type, received_at, payload) VALUES
                 ('cl', 'routed', 'scan.completed', 0, '{}'), ('cl', 'bare', 'scan.completed', 0, '{}'),
                 ('cl', 'recorded', 'scan.completed', 0, '{}'), ('cl', 'throttled', 'scan.completed', 0, '{}');
             INSERT INTO jobs (event_id, route, sink, status, attempts, next_attempt_at, created_at, updated_at)
                 VALUES (1, 'r', 'archive', 'succeeded', 1, 0, 0, 0);
             INSERT INTO dispatches (event_id, route, status, detail, at)
                 VALUES (3, NULL, 'unrouted', NULL, 0), (4, 'r', 'suppressed', 'k', 0);",
        );
        let query = |sql: &str| -> String { conn.query_row(sql, [], |r| r.get(0)).unwrap() };
        assert_eq!(
            query("SELECT group_concat(delivery_id, ' ') FROM events WHERE unrouted = 1"),
            "bare recorded"
        );
        assert_eq!(
            query("SELECT group_concat(status, ' ') FROM dispatches"),
            "suppressed"
        );
    }
}
