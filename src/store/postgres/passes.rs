//! Reconcile passes on PostgreSQL, as on SQLite (`store::sqlite::passes`): a source's row is
//! locked while a replica decides whether a pass is due and marks it begun, so two replicas
//! looking at once begin one pass between them.

use sqlx::{Connection as _, PgConnection, PgExecutor};

use crate::store::StoreError;
use crate::store::passes::{Begun, PASS_COLUMNS, PassEnd, PassRow, Schedule};

type Columns = (
    String,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<String>,
    Option<String>,
);

fn pass(row: Columns) -> PassRow {
    PassRow {
        source: row.0,
        requested_at: row.1,
        started_at: row.2,
        held_by: row.3,
        finished_at: row.4,
        last_success: row.5,
        outcome: row.6,
        detail: row.7,
    }
}

/// `source`'s row, or a row with no pass yet.
pub(super) async fn get(db: impl PgExecutor<'_>, source: &str) -> Result<PassRow, StoreError> {
    let sql = format!("SELECT {PASS_COLUMNS} FROM reconcile_passes WHERE source = $1");
    let row: Option<Columns> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(source)
        .fetch_optional(db)
        .await?;
    Ok(row.map_or_else(|| PassRow::new(source), pass))
}

/// Every source's row, by name.
pub(super) async fn all(db: impl PgExecutor<'_>) -> Result<Vec<PassRow>, StoreError> {
    let sql = format!("SELECT {PASS_COLUMNS} FROM reconcile_passes ORDER BY source");
    let rows: Vec<Columns> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .fetch_all(db)
        .await?;
    Ok(rows.into_iter().map(pass).collect())
}

/// Begins `source`'s pass for replica `me` at `now` if one is due, in a transaction of its own.
pub(super) async fn begin(
    conn: &mut PgConnection,
    (source, me): (&str, i64),
    schedule: &Schedule,
    now: jiff::Timestamp,
) -> Result<Option<Begun>, StoreError> {
    let mut tx = conn.begin().await?;
    // A row to lock, even for a source with none yet: another replica's first look waits.
    sqlx::query("INSERT INTO reconcile_passes (source) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(source)
        .execute(&mut *tx)
        .await?;
    let sql = format!("SELECT {PASS_COLUMNS} FROM reconcile_passes WHERE source = $1 FOR UPDATE");
    let row: Columns = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(source)
        .fetch_one(&mut *tx)
        .await?;
    let row = pass(row);
    let Some(due) = row.due(schedule, now) else {
        return Ok(None);
    };
    let begun = row.begun_for(due);
    let row = row.begun(me, now);
    sqlx::query(
        "UPDATE reconcile_passes SET requested_at = NULL, started_at = $2, held_by = $3
         WHERE source = $1",
    )
    .bind(source)
    .bind(row.started_at)
    .bind(row.held_by)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Some(begun))
}

/// Records how replica `me`'s pass of `source` ended at `now`; nothing if another replica
/// took it over meanwhile.
pub(super) async fn end(
    db: impl PgExecutor<'_>,
    (source, me): (&str, i64),
    end: &PassEnd,
    now: jiff::Timestamp,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE reconcile_passes SET held_by = NULL, finished_at = $2, outcome = $3, detail = $4,
                last_success = CASE WHEN $5 THEN $2 ELSE last_success END
         WHERE source = $1 AND held_by = $6",
    )
    .bind(source)
    .bind(now.as_millisecond())
    .bind(end.outcome)
    .bind(&end.detail)
    .bind(end.succeeded())
    .bind(me)
    .execute(db)
    .await?;
    Ok(())
}

/// Asks for a pass of `source` now: the replica that looks next begins it.
pub(super) async fn request(
    db: impl PgExecutor<'_>,
    source: &str,
    now: jiff::Timestamp,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO reconcile_passes (source, requested_at) VALUES ($1, $2)
         ON CONFLICT (source) DO UPDATE SET requested_at = $2",
    )
    .bind(source)
    .bind(now.as_millisecond())
    .execute(db)
    .await?;
    Ok(())
}

/// Which of `ids` are stored for `source` (the dedupe table is exact on PostgreSQL).
pub(super) async fn seen(
    db: impl PgExecutor<'_>,
    source: &str,
    ids: &[String],
) -> Result<Vec<String>, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT delivery_id FROM dedupe WHERE source = $1 AND delivery_id = ANY($2)",
    )
    .bind(source)
    .bind(ids)
    .fetch_all(db)
    .await?)
}

/// When the newest delivery from `source` was received (unix milliseconds): its newest key in
/// `dedupe`, exact on PostgreSQL.
pub(super) async fn newest_seen(
    db: impl PgExecutor<'_>,
    source: &str,
) -> Result<Option<i64>, StoreError> {
    Ok(
        sqlx::query_scalar("SELECT max(seen_at) FROM dedupe WHERE source = $1")
            .bind(source)
            .fetch_one(db)
            .await?,
    )
}
