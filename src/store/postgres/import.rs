//! `hookroute migrate-storage`: moves an installation from SQLite to PostgreSQL (its events,
//! jobs with what set them aside or grouped them, attempts, throttle windows and silences).
//! Every row is
//! copied under its own id and inserted with `ON CONFLICT DO NOTHING`, so running it again (after
//! an interruption, say) copies only what is missing. The delivery ids are rebuilt from the
//! events (SQLite merges the newest into its index later), so dedupe is exact from the first
//! request; pruning later drops those past the retention.

use std::path::Path;

use rusqlite::types::ValueRef;
use serde_json::{Map, Value};
use sqlx::postgres::PgPool;

use crate::config::PostgresConfig;
use crate::store::StoreError;

/// Rows copied per statement.
const BATCH: i64 = 500;

/// Tables copied, in an order that keeps every reference valid, each with whether it is paged
/// by rowid (throttles, a table without one, by offset: it is small).
const TABLES: [(&str, bool); 6] = [
    ("events", true),
    ("dispatches", true),
    ("jobs", true),
    ("attempts", true),
    ("throttles", false),
    ("silences", true),
];

/// What was copied: each table with the rows it received (0 for rows already there).
pub type Copied = Vec<(&'static str, u64)>;

/// Copies the SQLite database at `from` into the PostgreSQL database `to` (migrating its schema
/// first). The daemon on `from` should be stopped: rows it writes meanwhile may be missed.
///
/// # Errors
/// Either database cannot be opened or has another schema, or a copy fails; what was copied
/// stays, and a second run completes it.
pub async fn from_sqlite(from: &Path, to: &PostgresConfig) -> Result<Copied, StoreError> {
    let sqlite = crate::store::sqlite::admin::Admin::open(from, crate::store::admin::Access::Read)?
        .into_connection();
    let pool = super::connect(to, 2).await?;
    super::schema::migrate(&pool, &to.url).await?;
    let mut copied = Vec::new();
    for (table, by_rowid) in TABLES {
        copied.push((table, copy(&sqlite, &pool, table, by_rowid).await?));
    }
    // The keys of every event, the newest kept where a delivery id came twice (after its
    // first key had expired).
    let keys = sqlx::query(
        "INSERT INTO dedupe (source, delivery_id, event_id, seen_at)
         SELECT source, delivery_id, id, received_at FROM events ORDER BY id DESC
         ON CONFLICT DO NOTHING",
    )
    .execute(&pool)
    .await?;
    copied.push(("dedupe", keys.rows_affected()));
    // Jobs handed to the old daemon's engine come due from when they were created, as they
    // would at its next start; and new rows continue after the copied ids.
    sqlx::query(
        "UPDATE jobs SET next_attempt_at = created_at
         WHERE status = 'pending' AND next_attempt_at > created_at AND leased_by IS NULL",
    )
    .execute(&pool)
    .await?;
    for table in ["events", "dispatches", "jobs", "attempts", "silences"] {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT setval(pg_get_serial_sequence('{table}', 'id'),
                           greatest((SELECT max(id) FROM {table}), 1))"
        )))
        .execute(&pool)
        .await?;
    }
    pool.close().await;
    Ok(copied)
}

/// Copies `table` a batch at a time; returns the rows inserted.
async fn copy(
    sqlite: &rusqlite::Connection,
    pool: &PgPool,
    table: &str,
    by_rowid: bool,
) -> Result<u64, StoreError> {
    let page = if by_rowid {
        format!("SELECT rowid, * FROM {table} WHERE rowid > ?1 ORDER BY rowid LIMIT ?2")
    } else {
        format!("SELECT NULL, * FROM {table} ORDER BY 2, 3 LIMIT ?2 OFFSET ?1")
    };
    let insert = format!(
        "INSERT INTO {table} SELECT * FROM jsonb_populate_recordset(NULL::{table}, $1)
         ON CONFLICT DO NOTHING"
    );
    let (mut after, mut inserted) = (0i64, 0);
    loop {
        let (rows, last) = read_page(sqlite, &page, after)?;
        if rows.is_empty() {
            return Ok(inserted);
        }
        after = last.unwrap_or(after + rows.len() as i64);
        inserted += sqlx::query(sqlx::AssertSqlSafe(insert.clone()))
            .bind(Value::Array(rows))
            .execute(pool)
            .await?
            .rows_affected();
    }
}

/// A page of rows as JSON objects (a blob as PostgreSQL's `\x` hex text), and the last rowid
/// (if paged by rowid).
fn read_page(
    sqlite: &rusqlite::Connection,
    sql: &str,
    after: i64,
) -> rusqlite::Result<(Vec<Value>, Option<i64>)> {
    let mut stmt = sqlite.prepare_cached(sql)?;
    let names: Vec<String> = stmt.column_names().map(str::to_owned).collect();
    let mut rows = stmt.query([after, BATCH])?;
    let (mut page, mut last) = (Vec::new(), None);
    while let Some(row) = rows.next()? {
        last = row.get(0)?;
        let mut object = Map::new();
        for (i, name) in names.iter().enumerate().skip(1) {
            let value = match row.get_ref(i)? {
                ValueRef::Null => Value::Null,
                ValueRef::Integer(n) => n.into(),
                ValueRef::Real(x) => x.into(),
                // PostgreSQL keeps no NUL in text (nor in jsonb's `\u0000`): a sink's answer
                // recorded by an older daemon may hold one.
                ValueRef::Text(t) => crate::text::storable(&String::from_utf8_lossy(t))
                    .into_owned()
                    .into(),
                ValueRef::Blob(b) => format!("\\x{}", hex::encode(b)).into(),
            };
            object.insert(name.clone(), value);
        }
        page.push(Value::Object(object));
    }
    Ok((page, last))
}
