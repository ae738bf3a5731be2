//! Sinks' health in SQLite (`sink_states`): the daemon changes a sink's row through the
//! writer, in the transaction of whatever else it commits; the operator's commands on their
//! own connection.

use rusqlite::{Connection, OptionalExtension, params};

use crate::store::sinks::{SINK_COLUMNS, SinkRow};
use crate::store::{SinkChange, SinkChanged, SinkState};

fn row_at(row: &rusqlite::Row<'_>) -> rusqlite::Result<SinkRow> {
    Ok(SinkRow {
        sink: row.get(0)?,
        failing_since: row.get(1)?,
        failures: row.get(2)?,
        last_error: row.get(3)?,
        last_failure_at: row.get(4)?,
        transient: row.get(5)?,
        paused_since: row.get(6)?,
        paused_until: row.get(7)?,
        paused_by: row.get(8)?,
        pause_comment: row.get(9)?,
        pause_auto: row.get(10)?,
        next_probe: row.get(11)?,
    })
}

/// Every sink that is failing or paused, by name.
pub(super) fn states(conn: &Connection) -> rusqlite::Result<Vec<SinkState>> {
    let sql = format!("SELECT {SINK_COLUMNS} FROM sink_states ORDER BY sink");
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map([], row_at)?;
    rows.map(|row| row.map(SinkState::from)).collect()
}

/// Applies `change` to `sink` at `now` (unix milliseconds), inside the caller's transaction.
pub(super) fn change(
    conn: &Connection,
    sink: &str,
    change: SinkChange,
    now: jiff::Timestamp,
) -> rusqlite::Result<SinkChanged> {
    let sql = format!("SELECT {SINK_COLUMNS} FROM sink_states WHERE sink = ?1");
    let before = conn
        .prepare_cached(&sql)?
        .query_row([sink], row_at)
        .optional()?
        .map_or_else(|| SinkState::healthy(sink), SinkState::from);
    let changed = before.apply(change, now);
    if !changed.applied {
        return Ok(changed);
    }
    if changed.after.is_healthy() {
        conn.prepare_cached("DELETE FROM sink_states WHERE sink = ?1")?
            .execute([sink])?;
    } else {
        let r = SinkRow::from(&changed.after);
        let sql = format!(
            "INSERT OR REPLACE INTO sink_states ({SINK_COLUMNS})
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"
        );
        conn.prepare_cached(&sql)?.execute(params![
            r.sink,
            r.failing_since,
            r.failures,
            r.last_error,
            r.last_failure_at,
            r.transient,
            r.paused_since,
            r.paused_until,
            r.paused_by,
            r.pause_comment,
            r.pause_auto,
            r.next_probe
        ])?;
    }
    if changed.resumed() || changed.paused() {
        // Due from when they were created: a paused sink's probe takes the oldest, and a
        // resumed sink's backlog drains in the order it came.
        conn.prepare_cached(
            "UPDATE jobs INDEXED BY jobs_due SET next_attempt_at = created_at
             WHERE sink = ?1 AND status IN ('pending', 'failed') AND status = 'failed'
                   AND next_attempt_at > created_at",
        )?
        .execute([sink])?;
    }
    Ok(changed)
}
