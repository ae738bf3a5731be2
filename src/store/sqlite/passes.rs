//! Reconcile passes in SQLite (`reconcile_passes`, see `store::passes`): the daemon begins
//! and ends its passes through the writer; the operator's commands ask for one and read them
//! on their own connection. One daemon serves a SQLite database, so a pass is always its own.

use rusqlite::{Connection, OptionalExtension, params};

use crate::store::passes::{Begun, PASS_COLUMNS, PassEnd, PassRow, Schedule};

/// Who holds a pass: the one daemon.
const DAEMON: i64 = 0;

fn row_at(row: &rusqlite::Row<'_>) -> rusqlite::Result<PassRow> {
    Ok(PassRow {
        source: row.get(0)?,
        requested_at: row.get(1)?,
        started_at: row.get(2)?,
        held_by: row.get(3)?,
        finished_at: row.get(4)?,
        last_success: row.get(5)?,
        outcome: row.get(6)?,
        detail: row.get(7)?,
    })
}

/// `source`'s row, or a row with no pass yet.
pub(super) fn get(conn: &Connection, source: &str) -> rusqlite::Result<PassRow> {
    let sql = format!("SELECT {PASS_COLUMNS} FROM reconcile_passes WHERE source = ?1");
    let row = conn
        .prepare_cached(&sql)?
        .query_row([source], row_at)
        .optional()?;
    Ok(row.unwrap_or_else(|| PassRow::new(source)))
}

/// Every source's row, by name.
pub(super) fn all(conn: &Connection) -> rusqlite::Result<Vec<PassRow>> {
    let sql = format!("SELECT {PASS_COLUMNS} FROM reconcile_passes ORDER BY source");
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map([], row_at)?;
    rows.collect()
}

/// Begins `source`'s pass at `now` if one is due, inside the caller's transaction.
pub(super) fn begin(
    conn: &Connection,
    source: &str,
    schedule: &Schedule,
    now: jiff::Timestamp,
) -> rusqlite::Result<Option<Begun>> {
    let row = get(conn, source)?;
    let Some(due) = row.due(schedule, now) else {
        return Ok(None);
    };
    let begun = row.begun_for(due);
    let row = row.begun(DAEMON, now);
    conn.prepare_cached(
        "INSERT INTO reconcile_passes (source, requested_at, started_at, held_by)
         VALUES (?1, NULL, ?2, ?3)
         ON CONFLICT (source) DO UPDATE SET requested_at = NULL, started_at = ?2, held_by = ?3",
    )?
    .execute(params![row.source, row.started_at, row.held_by])?;
    Ok(Some(begun))
}

/// Records how the daemon's pass of `source` ended at `now`.
pub(super) fn end(
    conn: &Connection,
    source: &str,
    end: &PassEnd,
    now: jiff::Timestamp,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "UPDATE reconcile_passes SET held_by = NULL, finished_at = ?2, outcome = ?3, detail = ?4,
                last_success = CASE WHEN ?5 THEN ?2 ELSE last_success END
         WHERE source = ?1 AND held_by = ?6",
    )?
    .execute(params![
        source,
        now.as_millisecond(),
        end.outcome,
        end.detail,
        end.succeeded(),
        DAEMON
    ])?;
    Ok(())
}

/// Asks for a pass of `source` now: the daemon begins it within its next look.
pub(super) fn request(
    conn: &Connection,
    source: &str,
    now: jiff::Timestamp,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO reconcile_passes (source, requested_at) VALUES (?1, ?2)
         ON CONFLICT (source) DO UPDATE SET requested_at = ?2",
    )?
    .execute(params![source, now.as_millisecond()])?;
    Ok(())
}

/// Which of `ids` are stored for `source`: in `dedupe`, or among the events the writer has
/// not merged into it yet (a second's worth, found by id from the merge's mark).
pub(super) fn seen(
    conn: &Connection,
    source: &str,
    ids: &[String],
) -> rusqlite::Result<Vec<String>> {
    let merged = merged(conn)?;
    let mut in_table =
        conn.prepare_cached("SELECT 1 FROM dedupe WHERE source = ?1 AND delivery_id = ?2")?;
    let mut unmerged = conn.prepare_cached(
        "SELECT 1 FROM events WHERE id > ?1 AND source = ?2 AND delivery_id = ?3 LIMIT 1",
    )?;
    let mut found = Vec::new();
    for id in ids {
        if in_table.exists(params![source, id])? || unmerged.exists(params![merged, source, id])? {
            found.push(id.clone());
        }
    }
    Ok(found)
}

/// When the newest delivery from `source` was received (unix milliseconds): the newest key in
/// `dedupe` (an index range of the source's keys), or a newer event not merged into it yet.
pub(super) fn newest_seen(conn: &Connection, source: &str) -> rusqlite::Result<Option<i64>> {
    let merged = merged(conn)?;
    conn.query_row(
        "SELECT max(at) FROM (
             SELECT max(seen_at) AS at FROM dedupe WHERE source = ?1
             UNION ALL
             SELECT max(received_at) FROM events WHERE id > ?2 AND source = ?1)",
        params![source, merged],
        |row| row.get(0),
    )
}

/// The last event id whose key is in `dedupe` (see `store::sqlite::dedupe`): later events'
/// keys are still in the writer's memory.
fn merged(conn: &Connection) -> rusqlite::Result<i64> {
    Ok(conn
        .query_row(
            "SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'dedupe_merged'",
            [],
            |row| row.get(0),
        )
        .optional()?
        .unwrap_or(0))
}
