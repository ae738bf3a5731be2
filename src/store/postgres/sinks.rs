//! Sinks' health on PostgreSQL, as on SQLite (`store::sqlite::sinks`): a sink's row is locked
//! while a change is applied, so two replicas' outcomes for one sink both count.

use sqlx::{Connection as _, PgConnection, PgExecutor};

use crate::metrics::SinkQueue;
use crate::store::sinks::{SINK_COLUMNS, SinkRow};
use crate::store::{SinkChange, SinkChanged, SinkState, StoreError};

type Columns = (
    String,
    Option<i64>,
    i64,
    Option<String>,
    Option<i64>,
    bool,
    Option<i64>,
    Option<i64>,
    Option<String>,
    Option<String>,
    bool,
    Option<i64>,
);

fn state(row: Columns) -> SinkState {
    let (sink, failing_since, failures, last_error, last_failure_at, transient) =
        (row.0, row.1, row.2, row.3, row.4, row.5);
    SinkState::from(SinkRow {
        sink,
        failing_since,
        failures,
        last_error,
        last_failure_at,
        transient,
        paused_since: row.6,
        paused_until: row.7,
        paused_by: row.8,
        pause_comment: row.9,
        pause_auto: row.10,
        next_probe: row.11,
    })
}

/// Every sink that is failing or paused, by name.
pub(super) async fn states(db: impl PgExecutor<'_>) -> Result<Vec<SinkState>, StoreError> {
    let sql = format!("SELECT {SINK_COLUMNS} FROM sink_states ORDER BY sink");
    let rows: Vec<Columns> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .fetch_all(db)
        .await?;
    Ok(rows.into_iter().map(state).collect())
}

/// Every failing or paused sink, and every sink's queue at `now`: `hookroute sink list`.
pub(super) async fn with_queues(
    conn: &mut PgConnection,
    now: jiff::Timestamp,
) -> Result<(Vec<SinkState>, Vec<SinkQueue>), StoreError> {
    let states = states(&mut *conn).await?;
    Ok((states, super::jobs::queues(&mut *conn, now).await?))
}

/// Applies `change` to `sink` at `now` in a transaction of its own.
pub(super) async fn change(
    conn: &mut PgConnection,
    sink: &str,
    change: SinkChange,
    now: jiff::Timestamp,
) -> Result<SinkChanged, StoreError> {
    let mut tx = conn.begin().await?;
    // A row to lock, even for a sink with none yet: another replica's first failure waits.
    sqlx::query("INSERT INTO sink_states (sink) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(sink)
        .execute(&mut *tx)
        .await?;
    let sql = format!("SELECT {SINK_COLUMNS} FROM sink_states WHERE sink = $1 FOR UPDATE");
    let row: Columns = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(sink)
        .fetch_one(&mut *tx)
        .await?;
    let changed = state(row).apply(change, now);
    if changed.after.is_healthy() {
        sqlx::query("DELETE FROM sink_states WHERE sink = $1")
            .bind(sink)
            .execute(&mut *tx)
            .await?;
    } else {
        let r = SinkRow::from(&changed.after);
        sqlx::query(
            "UPDATE sink_states SET failing_since = $2, failures = $3, last_error = $4,
                 last_failure_at = $5, transient = $6, paused_since = $7, paused_until = $8,
                 paused_by = $9, pause_comment = $10, pause_auto = $11, next_probe = $12
             WHERE sink = $1",
        )
        .bind(&r.sink)
        .bind(r.failing_since)
        .bind(r.failures)
        .bind(&r.last_error)
        .bind(r.last_failure_at)
        .bind(r.transient)
        .bind(r.paused_since)
        .bind(r.paused_until)
        .bind(&r.paused_by)
        .bind(&r.pause_comment)
        .bind(r.pause_auto)
        .bind(r.next_probe)
        .execute(&mut *tx)
        .await?;
    }
    if changed.resumed() || changed.paused() {
        // Due from when they were created: a paused sink's probe takes the oldest, and a
        // resumed sink's backlog drains in the order it came.
        sqlx::query(
            "UPDATE jobs SET next_attempt_at = created_at
             WHERE sink = $1 AND status = 'failed' AND next_attempt_at > created_at",
        )
        .bind(sink)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(changed)
}
