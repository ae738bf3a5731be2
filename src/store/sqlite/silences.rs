//! Silences in SQLite: the daemon reads those not yet ended every second (an index seek on
//! `silences_end`); the operator's commands add, list and expire them on their own connection,
//! taking turns with the writer as every command does.

use rusqlite::{Connection, OptionalExtension, params};

use crate::store::{Matchers, NewSilence, Silence, from_ms};

const COLUMNS: &str = "id, route, sink, source, event_type, condition, starts_at, ends_at, comment, author, created_at";

fn silence_at(row: &rusqlite::Row<'_>) -> rusqlite::Result<Silence> {
    Ok(Silence {
        id: row.get(0)?,
        matchers: Matchers {
            route: row.get(1)?,
            sink: row.get(2)?,
            source: row.get(3)?,
            event_type: row.get(4)?,
            when: row.get(5)?,
        },
        starts_at: from_ms(row.get(6)?),
        ends_at: from_ms(row.get(7)?),
        comment: row.get(8)?,
        author: row.get(9)?,
        created_at: from_ms(row.get(10)?),
    })
}

/// Silences whose end is after `now`, oldest first; `ended`: those that ended at or before it,
/// the last to end first.
pub(super) fn by_end(conn: &Connection, now: i64, ended: bool) -> rusqlite::Result<Vec<Silence>> {
    let sql = if ended {
        format!(
            "SELECT {COLUMNS} FROM silences INDEXED BY silences_end WHERE ends_at <= ?1 ORDER BY ends_at DESC, id"
        )
    } else {
        format!(
            "SELECT {COLUMNS} FROM silences INDEXED BY silences_end WHERE ends_at > ?1 ORDER BY id"
        )
    };
    let mut stmt = conn.prepare_cached(&sql)?;
    let silences = stmt.query_map([now], silence_at)?;
    silences.collect()
}

pub(super) fn get(conn: &Connection, id: i64) -> rusqlite::Result<Option<Silence>> {
    let sql = format!("SELECT {COLUMNS} FROM silences WHERE id = ?1");
    conn.prepare_cached(&sql)?
        .query_row([id], silence_at)
        .optional()
}

pub(super) fn add(conn: &Connection, new: &NewSilence, now: i64) -> rusqlite::Result<i64> {
    let m = &new.matchers;
    conn.prepare_cached(
        "INSERT INTO silences (route, sink, source, event_type, condition, starts_at, ends_at,
                               comment, author, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )?
    .execute(params![
        m.route,
        m.sink,
        m.source,
        m.event_type,
        m.when,
        new.starts_at.as_millisecond(),
        new.ends_at.as_millisecond(),
        new.comment,
        new.author,
        now
    ])?;
    Ok(conn.last_insert_rowid())
}

/// Ends a silence at `now`; false when it had already ended (or there is none).
pub(super) fn expire(conn: &Connection, id: i64, now: i64) -> rusqlite::Result<bool> {
    let changed = conn.execute(
        "UPDATE silences SET ends_at = ?2 WHERE id = ?1 AND ends_at > ?2",
        params![id, now],
    )?;
    Ok(changed == 1)
}
