//! Events as replicas store them: the insert with its dedupe key, throttle decisions and jobs
//! in one transaction, and reading rows back as events.

use std::time::Duration;

use jiff::Timestamp;
use sqlx::postgres::{PgPool, PgRow};
use sqlx::{Row as _, Transaction};

use crate::event::{Event, Payload};
use crate::store::from_ms;
use crate::store::{Handoff, Inserted, Job, RouteTo, StoreError, StoredEvent};

/// Stores `event` unless its delivery id was seen, with its routing: see
/// [`Storage::insert`](crate::store::Storage::insert). Jobs of `handoff`'s sinks are leased
/// to `replica` from the start.
pub(super) async fn insert(
    pool: &PgPool,
    replica: i64,
    event: &Event,
    body: &[u8],
    received_at: Timestamp,
    routes: Vec<RouteTo>,
    handoff: Handoff,
) -> Result<Inserted, StoreError> {
    let received = received_at.as_millisecond();
    let mut tx = pool.begin().await?;
    // The key and the event in one statement. A copy of this delivery being stored by
    // another transaction makes the key's insert wait for it: then nothing is inserted
    // here, and the first copy's id is read below.
    let id: Option<i64> = sqlx::query_scalar(
        "WITH key AS (
             INSERT INTO dedupe (source, delivery_id, event_id, seen_at)
             VALUES ($1, $2, nextval(pg_get_serial_sequence('events', 'id')), $5)
             ON CONFLICT DO NOTHING RETURNING event_id)
         INSERT INTO events (id, source, delivery_id, event_type, occurred_at, received_at,
                             sender_delivery, payload, unrouted)
         SELECT event_id, $1, $2, $3, $4, $5, $6, $7, $8 FROM key RETURNING id",
    )
    .bind(&event.source)
    .bind(&event.delivery_id)
    .bind(&event.event_type)
    .bind(event.occurred_at.map(|t| t.to_string()))
    .bind(received)
    .bind(&event.sender_delivery)
    .bind(crate::store::body::pack(body))
    .bind(routes.is_empty().then_some(true))
    .fetch_optional(&mut *tx)
    .await?;
    let Some(id) = id else {
        let first: i64 = sqlx::query_scalar(
            "SELECT event_id FROM dedupe WHERE source = $1 AND delivery_id = $2",
        )
        .bind(&event.source)
        .bind(&event.delivery_id)
        .fetch_one(&mut *tx)
        .await?;
        tx.rollback().await?;
        return Ok(Inserted::Duplicate(first));
    };
    let occurred = event.occurred_at.unwrap_or(received_at).as_millisecond();
    let mut pairs: (Vec<&str>, Vec<&str>, Vec<bool>) = Default::default();
    let mut suppressed = Vec::new();
    for to in &routes {
        if let Some((key, window)) = &to.throttle
            && !admit_throttled(&mut tx, &to.route, key, *window, occurred).await?
        {
            sqlx::query(
                "INSERT INTO dispatches (event_id, route, status, detail, at)
                 VALUES ($1, $2, 'suppressed', $3, $4)",
            )
            .bind(id)
            .bind(&to.route)
            .bind(key)
            .bind(received)
            .execute(&mut *tx)
            .await?;
            suppressed.push(to.route.clone());
            continue;
        }
        for sink in &to.sinks {
            pairs.0.push(&to.route);
            pairs.1.push(sink);
            pairs.2.push(handoff.sinks.contains(sink));
        }
    }
    // Jobs handed to this replica's engine are leased to it from the start: no other
    // replica takes them while it lives, and all of them may once it does not. As on SQLite,
    // their rows come due only at the hand-over's fallback, so that this replica takes one
    // from the database only if the hand-over never happened.
    let rows = sqlx::query(
        "INSERT INTO jobs (event_id, route, sink, status, next_attempt_at, created_at,
                           updated_at, leased_by)
         SELECT $1, route, sink, 'pending', CASE WHEN handed THEN $7 ELSE $2 END, $2, $2,
                CASE WHEN handed THEN $3 END
         FROM unnest($4::text[], $5::text[], $6::bool[]) AS t (route, sink, handed)
         RETURNING id, route, sink, leased_by IS NOT NULL",
    )
    .bind(id)
    .bind(received)
    .bind(replica)
    .bind(&pairs.0)
    .bind(&pairs.1)
    .bind(&pairs.2)
    .bind(handoff.fallback.as_millisecond())
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    let jobs = rows.len();
    let handed = rows
        .iter()
        .filter(|row| row.get::<bool, _>(3))
        .map(|row| Job {
            id: row.get(0),
            event_id: id,
            route: row.get(1),
            sink: row.get(2),
            attempt: 1,
            created_at: received_at,
        })
        .collect();
    Ok(Inserted::New {
        id,
        jobs,
        handed,
        suppressed,
    })
}

/// Whether `route`'s throttle lets an event at `at_ms` through for `key`; if so, keeps the
/// window it opened. Under a lock on the key until the transaction ends, so two replicas
/// deciding for the same key decide one after the other.
async fn admit_throttled(
    tx: &mut Transaction<'_, sqlx::Postgres>,
    route: &str,
    key: &str,
    window: Duration,
    at_ms: i64,
) -> Result<bool, StoreError> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1), hashtext($2))")
        .bind(route)
        .bind(key)
        .execute(&mut **tx)
        .await?;
    let started: Option<i64> =
        sqlx::query_scalar("SELECT started_at FROM throttles WHERE route = $1 AND key = $2")
            .bind(route)
            .bind(key)
            .fetch_optional(&mut **tx)
            .await?;
    let Some(start) = crate::rules::throttle::admit(started.map(from_ms), from_ms(at_ms), window)
    else {
        return Ok(false);
    };
    let window_ms = i64::try_from(window.as_millis()).unwrap_or(i64::MAX);
    sqlx::query(
        "INSERT INTO throttles (route, key, started_at, window_ms) VALUES ($1, $2, $3, $4)
         ON CONFLICT (route, key) DO UPDATE SET started_at = excluded.started_at,
                                                window_ms = excluded.window_ms",
    )
    .bind(route)
    .bind(key)
    .bind(start.as_millisecond())
    .bind(window_ms)
    .execute(&mut **tx)
    .await?;
    Ok(true)
}

/// The event columns (id, source, delivery_id, event_type, occurred_at, received_at,
/// sender_delivery, payload) from column `first`.
pub(crate) fn event_at(row: &PgRow, first: usize) -> Result<StoredEvent, StoreError> {
    let payload: Vec<u8> = row.try_get(first + 7)?;
    let occurred_at: Option<String> = row.try_get(first + 4)?;
    Ok(StoredEvent {
        id: row.try_get(first)?,
        received_at: from_ms(row.try_get(first + 5)?),
        event: Event {
            source: row.try_get(first + 1)?,
            delivery_id: row.try_get(first + 2)?,
            event_type: row.try_get(first + 3)?,
            occurred_at: occurred_at.and_then(|t| t.parse().ok()),
            sender_delivery: row.try_get(first + 6)?,
            payload: crate::store::body::unpack(&payload)
                .and_then(|body| Payload::from_slice(&body).ok())
                .unwrap_or_default(),
        },
    })
}
