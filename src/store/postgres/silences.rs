//! Silences on PostgreSQL, as on SQLite (`store::sqlite::silences`): every replica reads those
//! not yet ended each second, so an `add` or `expire` reaches them all within one.

use sqlx::PgExecutor;

use crate::store::{Matchers, NewSilence, Silence, StoreError, from_ms};

const COLUMNS: &str = "id, route, sink, source, event_type, condition, starts_at, ends_at, comment, author, created_at";

type Columns = (
    i64,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    i64,
    i64,
    String,
    String,
    i64,
);

fn silence(row: Columns) -> Silence {
    let (id, route, sink, source, event_type, when, starts, ends, comment, author, created) = row;
    Silence {
        id,
        matchers: Matchers {
            route,
            sink,
            source,
            event_type,
            when,
        },
        starts_at: from_ms(starts),
        ends_at: from_ms(ends),
        comment,
        author,
        created_at: from_ms(created),
    }
}

/// Silences whose end is after `now`, oldest first; `ended`: those that ended at or before it,
/// the last to end first.
pub(super) async fn by_end(
    db: impl PgExecutor<'_>,
    now: i64,
    ended: bool,
) -> Result<Vec<Silence>, StoreError> {
    let sql = if ended {
        format!("SELECT {COLUMNS} FROM silences WHERE ends_at <= $1 ORDER BY ends_at DESC, id")
    } else {
        format!("SELECT {COLUMNS} FROM silences WHERE ends_at > $1 ORDER BY id")
    };
    let rows: Vec<Columns> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(now)
        .fetch_all(db)
        .await?;
    Ok(rows.into_iter().map(silence).collect())
}

pub(super) async fn get(db: impl PgExecutor<'_>, id: i64) -> Result<Option<Silence>, StoreError> {
    let sql = format!("SELECT {COLUMNS} FROM silences WHERE id = $1");
    let row: Option<Columns> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .fetch_optional(db)
        .await?;
    Ok(row.map(silence))
}

pub(super) async fn add(
    db: impl PgExecutor<'_>,
    new: &NewSilence,
    now: i64,
) -> Result<i64, StoreError> {
    let m = &new.matchers;
    Ok(sqlx::query_scalar(
        "INSERT INTO silences (route, sink, source, event_type, condition, starts_at, ends_at,
                               comment, author, created_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING id",
    )
    .bind(&m.route)
    .bind(&m.sink)
    .bind(&m.source)
    .bind(&m.event_type)
    .bind(&m.when)
    .bind(new.starts_at.as_millisecond())
    .bind(new.ends_at.as_millisecond())
    .bind(&new.comment)
    .bind(&new.author)
    .bind(now)
    .fetch_one(db)
    .await?)
}

/// Ends a silence at `now`; false when it had already ended (or there is none).
pub(super) async fn expire(db: impl PgExecutor<'_>, id: i64, now: i64) -> Result<bool, StoreError> {
    let done = sqlx::query("UPDATE silences SET ends_at = $2 WHERE id = $1 AND ends_at > $2")
        .bind(id)
        .bind(now)
        .execute(db)
        .await?;
    Ok(done.rows_affected() == 1)
}
