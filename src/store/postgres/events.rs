//! Events as replicas store them: a batch of new events with their dedupe keys, throttle
//! decisions and jobs in one transaction, and reading rows back as events.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use sqlx::postgres::PgRow;
use sqlx::{Postgres, Row as _, Transaction};

use crate::event::{Event, Payload};
use crate::store::{GroupTo, Inserted, Job, NewEvent, Quiet, StoreError, StoredEvent, from_ms};

pub(super) type Tx<'c> = Transaction<'c, Postgres>;

/// Stores a batch of new events in `tx`, each unless its delivery id was seen, with its
/// routing: see [`Storage::insert`](crate::store::Storage::insert). Answers one outcome per
/// event, in order. Jobs of an event's hand-over sinks are leased to `replica` from the start.
///
/// What a transaction waits for is taken in one order on every replica, so that two batches
/// sharing keys wait for each other instead of deadlocking: first the throttle keys' locks,
/// then the delivery ids, each sorted.
pub(super) async fn insert(
    tx: &mut Tx<'_>,
    replica: i64,
    batch: &[NewEvent],
) -> Result<Vec<Inserted>, StoreError> {
    if batch.is_empty() {
        return Ok(Vec::new());
    }
    // Each delivery's first copy in the batch, by delivery id: the others are its duplicates.
    let mut firsts: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    for (n, new) in batch.iter().enumerate() {
        firsts.entry((&new.source, &new.delivery_id)).or_insert(n);
    }
    let sorted: Vec<usize> = firsts.values().copied().collect();
    let mut throttles = Throttles::lock(tx, sorted.iter().map(|&n| &batch[n])).await?;
    let stored = store_events(tx, batch, &sorted).await?;
    let seen_before: Vec<usize> = sorted
        .iter()
        .copied()
        .filter(|n| !stored.contains_key(n))
        .collect();
    let earlier = first_copies(tx, batch, &seen_before).await?;
    let mut jobs = NewJobs::default();
    let mut grouped = Vec::new();
    let mut suppressed: HashMap<usize, Vec<String>> = HashMap::new();
    // In the order the events came: the first of two sharing a throttle key opens its window.
    for (n, new) in batch.iter().enumerate() {
        let Some(&id) = stored.get(&n) else { continue };
        for to in &new.routes {
            if let Some((key, window)) = &to.throttle
                && !throttles.admit(&to.route, key, *window, new.occurred_ms)
            {
                jobs.suppress(id, &to.route, key, new.received_at);
                suppressed.entry(n).or_default().push(to.route.clone());
                continue;
            }
            for sink in &to.sinks {
                match (to.quiet_for(sink), &to.group) {
                    (Some(quiet), _) => {
                        jobs.set_aside(id, &to.route, sink, quiet, new.received_at);
                    }
                    (None, Some(group)) => grouped.push((id, new, to.route.as_str(), sink, group)),
                    (None, None) => jobs.add(id, new, &to.route, sink),
                }
            }
        }
    }
    throttles.keep(tx).await?;
    join_groups(tx, &grouped, &mut jobs).await?;
    let mut created = jobs.insert(tx, replica).await?;

    Ok(batch
        .iter()
        .enumerate()
        .map(|(n, new)| {
            let first = firsts[&(new.source.as_str(), new.delivery_id.as_str())];
            match stored.get(&first) {
                Some(&id) if first == n => {
                    let (jobs, handed) = created.remove(&id).unwrap_or_default();
                    Inserted::New {
                        id,
                        jobs,
                        handed,
                        suppressed: suppressed.remove(&n).unwrap_or_default(),
                    }
                }
                Some(&id) => Inserted::Duplicate(id),
                None => Inserted::Duplicate(earlier[&first]),
            }
        })
        .collect())
}

/// The index into `of` that a 1-based position in it, as `WITH ORDINALITY` counts, names.
fn at(of: &[usize], position: i64) -> Result<usize, StoreError> {
    usize::try_from(position - 1)
        .ok()
        .and_then(|i| of.get(i).copied())
        .ok_or_else(|| sqlx::Error::RowNotFound.into())
}

/// Inserts the delivery ids of `batch[sorted]`, in that order, and the events whose ids were
/// new; answers the stored events' ids by their place in `batch`. A copy of a delivery being
/// stored by another transaction makes its key's insert wait for that one: then this copy is
/// not stored.
async fn store_events(
    tx: &mut Tx<'_>,
    batch: &[NewEvent],
    sorted: &[usize],
) -> Result<HashMap<usize, i64>, StoreError> {
    let events = || sorted.iter().map(|&n| &batch[n]);
    let rows: Vec<(i64, i64)> = sqlx::query_as(
        "WITH input AS (
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[],
                                  $6::text[], $7::bytea[], $8::bool[])
                 WITH ORDINALITY AS t (source, delivery_id, event_type, occurred_at,
                                       received_at, sender_delivery, payload, unrouted, pos)),
         key AS (
             INSERT INTO dedupe (source, delivery_id, event_id, seen_at)
             SELECT source, delivery_id, nextval(pg_get_serial_sequence('events', 'id')),
                    received_at
             FROM input ORDER BY pos
             ON CONFLICT DO NOTHING RETURNING source, delivery_id, event_id),
         stored AS (
             INSERT INTO events (id, source, delivery_id, event_type, occurred_at, received_at,
                                 sender_delivery, payload, unrouted)
             SELECT key.event_id, source, delivery_id, i.event_type, i.occurred_at,
                    i.received_at, i.sender_delivery, i.payload, i.unrouted
             FROM key JOIN input AS i USING (source, delivery_id)
             RETURNING id, source, delivery_id)
         SELECT input.pos, stored.id FROM stored JOIN input USING (source, delivery_id)",
    )
    .bind(events().map(|e| e.source.as_str()).collect::<Vec<_>>())
    .bind(events().map(|e| e.delivery_id.as_str()).collect::<Vec<_>>())
    .bind(events().map(|e| e.event_type.as_str()).collect::<Vec<_>>())
    .bind(
        events()
            .map(|e| e.occurred_at.as_deref())
            .collect::<Vec<_>>(),
    )
    .bind(events().map(|e| e.received_at).collect::<Vec<_>>())
    .bind(
        events()
            .map(|e| e.sender_delivery.as_deref())
            .collect::<Vec<_>>(),
    )
    .bind(events().map(|e| e.body.as_slice()).collect::<Vec<_>>())
    .bind(
        events()
            .map(|e| e.routes.is_empty().then_some(true))
            .collect::<Vec<_>>(),
    )
    .fetch_all(&mut **tx)
    .await?;
    rows.into_iter()
        .map(|(position, id)| Ok((at(sorted, position)?, id)))
        .collect()
}

/// The event ids of the first copies of `batch[seen]`, stored before, by place in `batch`.
async fn first_copies(
    tx: &mut Tx<'_>,
    batch: &[NewEvent],
    seen: &[usize],
) -> Result<HashMap<usize, i64>, StoreError> {
    if seen.is_empty() {
        return Ok(HashMap::new());
    }
    let rows: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT pos, event_id
         FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS t (source, delivery_id, pos)
         JOIN dedupe USING (source, delivery_id)",
    )
    .bind(
        seen.iter()
            .map(|&n| batch[n].source.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        seen.iter()
            .map(|&n| batch[n].delivery_id.as_str())
            .collect::<Vec<_>>(),
    )
    .fetch_all(&mut **tx)
    .await?;
    if rows.len() != seen.len() {
        // A key pruned between the insert that met it and this read: the sender's retry
        // stores the delivery anew.
        return Err(sqlx::Error::RowNotFound.into());
    }
    rows.into_iter()
        .map(|(position, id)| Ok((at(seen, position)?, id)))
        .collect()
}

/// The throttle windows a batch decides on, under locks on their keys until the transaction
/// ends, so that two replicas deciding for one key decide one after the other.
#[derive(Default)]
struct Throttles<'a> {
    windows: HashMap<(&'a str, &'a str), Window>,
}

#[derive(Default)]
struct Window {
    /// Unix milliseconds, on the events' clock.
    started: Option<i64>,
    length_ms: i64,
    /// Whether this batch opened it.
    opened: bool,
}

impl<'a> Throttles<'a> {
    /// Locks the throttle keys of `events`' routes, in the order of the locks' own ids, and
    /// reads their windows.
    async fn lock(
        tx: &mut Tx<'_>,
        events: impl Iterator<Item = &'a NewEvent>,
    ) -> Result<Self, StoreError> {
        let keys: BTreeSet<(&str, &str)> = events
            .flat_map(|e| &e.routes)
            .filter_map(|to| Some((to.route.as_str(), to.throttle.as_ref()?.0.as_str())))
            .collect();
        if keys.is_empty() {
            return Ok(Self::default());
        }
        let (routes, names): (Vec<&str>, Vec<&str>) = keys.iter().copied().unzip();
        sqlx::query(
            "SELECT pg_advisory_xact_lock(r, k)
             FROM (SELECT DISTINCT hashtext(r) AS r, hashtext(k) AS k
                   FROM unnest($1::text[], $2::text[]) AS t (r, k)) AS l
             ORDER BY r, k",
        )
        .bind(&routes)
        .bind(&names)
        .execute(&mut **tx)
        .await?;
        let started: HashMap<(String, String), i64> = sqlx::query_as(
            "SELECT route, key, started_at
             FROM throttles JOIN unnest($1::text[], $2::text[]) AS t (route, key)
                  USING (route, key)",
        )
        .bind(&routes)
        .bind(&names)
        .fetch_all(&mut **tx)
        .await?
        .into_iter()
        .map(|(route, key, at): (String, String, i64)| ((route, key), at))
        .collect();
        let windows = keys
            .into_iter()
            .map(|(route, key)| {
                let started = started.get(&(route.to_owned(), key.to_owned())).copied();
                let window = Window {
                    started,
                    ..Window::default()
                };
                ((route, key), window)
            })
            .collect();
        Ok(Self { windows })
    }

    /// Whether `route`'s throttle lets an event at `at_ms` through for `key`; if so, the
    /// window it opened is kept.
    fn admit(&mut self, route: &'a str, key: &'a str, length: Duration, at_ms: i64) -> bool {
        let window = self.windows.entry((route, key)).or_default();
        let admitted =
            crate::rules::throttle::admit(window.started.map(from_ms), from_ms(at_ms), length);
        let Some(start) = admitted else {
            return false;
        };
        *window = Window {
            started: Some(start.as_millisecond()),
            length_ms: i64::try_from(length.as_millis()).unwrap_or(i64::MAX),
            opened: true,
        };
        true
    }

    /// Writes the windows this batch opened.
    async fn keep(&self, tx: &mut Tx<'_>) -> Result<(), StoreError> {
        let opened: Vec<_> = self.windows.iter().filter(|(_, w)| w.opened).collect();
        if opened.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "INSERT INTO throttles (route, key, started_at, window_ms)
             SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[])
             ON CONFLICT (route, key) DO UPDATE SET started_at = excluded.started_at,
                                                    window_ms = excluded.window_ms",
        )
        .bind(
            opened
                .iter()
                .map(|((route, _), _)| *route)
                .collect::<Vec<_>>(),
        )
        .bind(opened.iter().map(|((_, key), _)| *key).collect::<Vec<_>>())
        .bind(opened.iter().map(|(_, w)| w.started).collect::<Vec<_>>())
        .bind(opened.iter().map(|(_, w)| w.length_ms).collect::<Vec<_>>())
        .execute(&mut **tx)
        .await?;
        Ok(())
    }
}

/// The jobs and suppressed-route records a batch creates, as columns.
#[derive(Default)]
struct NewJobs<'a> {
    event: Vec<i64>,
    route: Vec<&'a str>,
    sink: Vec<&'a str>,
    created: Vec<i64>,
    due: Vec<i64>,
    handed: Vec<bool>,
    group: Vec<Option<&'a str>>,
    /// Suppressed routes: event, route, throttle key, when.
    suppressed: (Vec<i64>, Vec<&'a str>, Vec<&'a str>, Vec<i64>),
    /// Jobs set aside by a silence or a mute window: event, route, sink, status, by what,
    /// when.
    quiet: SetAside<'a>,
}

#[derive(Default)]
struct SetAside<'a> {
    event: Vec<i64>,
    route: Vec<&'a str>,
    sink: Vec<&'a str>,
    status: Vec<&'static str>,
    by: Vec<String>,
    at: Vec<i64>,
}

impl<'a> NewJobs<'a> {
    fn add(&mut self, event: i64, new: &'a NewEvent, route: &'a str, sink: &'a str) {
        // Jobs handed to this replica's engine come due only at the hand-over's fallback, as
        // on SQLite, so that this replica takes one from the database only if the hand-over
        // never happened.
        let handed = new.handoff.sinks.iter().any(|s| s == sink);
        self.event.push(event);
        self.route.push(route);
        self.sink.push(sink);
        self.created.push(new.received_at);
        self.due.push(if handed {
            new.handoff.fallback.as_millisecond()
        } else {
            new.received_at
        });
        self.handed.push(handed);
        self.group.push(None);
    }

    /// A grouped job, due with its group's next delivery.
    fn add_grouped(
        &mut self,
        event: i64,
        route: &'a str,
        sink: &'a str,
        key: &'a str,
        at: (i64, i64),
    ) {
        let (created, due) = at;
        self.event.push(event);
        self.route.push(route);
        self.sink.push(sink);
        self.created.push(created);
        self.due.push(due);
        self.handed.push(false);
        self.group.push(Some(key));
    }

    fn set_aside(&mut self, event: i64, route: &'a str, sink: &'a str, quiet: &Quiet, at: i64) {
        let q = &mut self.quiet;
        q.event.push(event);
        q.route.push(route);
        q.sink.push(sink);
        q.status.push(quiet.status().as_str());
        q.by.push(quiet.by());
        q.at.push(at);
    }

    fn suppress(&mut self, event: i64, route: &'a str, key: &'a str, at: i64) {
        self.suppressed.0.push(event);
        self.suppressed.1.push(route);
        self.suppressed.2.push(key);
        self.suppressed.3.push(at);
    }

    /// Inserts them; answers, by event, how many jobs it has and those handed over (leased
    /// to `replica` from the start: no other replica takes them while it lives, and all of
    /// them may once it does not).
    async fn insert(
        self,
        tx: &mut Tx<'_>,
        replica: i64,
    ) -> Result<HashMap<i64, (usize, Vec<Job>)>, StoreError> {
        if !self.suppressed.0.is_empty() {
            sqlx::query(
                "INSERT INTO dispatches (event_id, route, status, detail, at)
                 SELECT event_id, route, 'suppressed', detail, at
                 FROM unnest($1::bigint[], $2::text[], $3::text[], $4::bigint[])
                     AS t (event_id, route, detail, at)",
            )
            .bind(&self.suppressed.0)
            .bind(&self.suppressed.1)
            .bind(&self.suppressed.2)
            .bind(&self.suppressed.3)
            .execute(&mut **tx)
            .await?;
        }
        let q = &self.quiet;
        if !q.event.is_empty() {
            sqlx::query(
                "INSERT INTO jobs (event_id, route, sink, status, next_attempt_at, created_at,
                                   updated_at, quieted_by)
                 SELECT event_id, route, sink, status, at, at, at, by
                 FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[],
                             $6::bigint[]) AS t (event_id, route, sink, status, by, at)",
            )
            .bind(&q.event)
            .bind(&q.route)
            .bind(&q.sink)
            .bind(&q.status)
            .bind(&q.by)
            .bind(&q.at)
            .execute(&mut **tx)
            .await?;
        }
        let mut created: HashMap<i64, (usize, Vec<Job>)> = HashMap::new();
        if self.event.is_empty() {
            return Ok(created);
        }
        let rows = sqlx::query(
            "INSERT INTO jobs (event_id, route, sink, status, next_attempt_at, created_at,
                               updated_at, leased_by, group_key)
             SELECT event_id, route, sink, 'pending', due, created, created,
                    CASE WHEN handed THEN $7::bigint END, group_key
             FROM unnest($1::bigint[], $2::text[], $3::text[], $4::bigint[], $5::bigint[],
                         $6::bool[], $8::text[])
                 AS t (event_id, route, sink, created, due, handed, group_key)
             RETURNING id, event_id, route, sink, created_at, leased_by IS NOT NULL",
        )
        .bind(&self.event)
        .bind(&self.route)
        .bind(&self.sink)
        .bind(&self.created)
        .bind(&self.due)
        .bind(&self.handed)
        .bind(replica)
        .bind(&self.group)
        .fetch_all(&mut **tx)
        .await?;
        for row in rows {
            let event_id: i64 = row.try_get(1)?;
            let (count, handed) = created.entry(event_id).or_default();
            *count += 1;
            if row.try_get(5)? {
                handed.push(Job {
                    id: row.try_get(0)?,
                    event_id,
                    route: row.try_get(2)?,
                    sink: row.try_get(3)?,
                    attempt: 1,
                    created_at: from_ms(row.try_get(4)?),
                    group: None,
                });
            }
        }
        Ok(created)
    }
}

/// A group's newest job: when it is due, and whether it still waits.
type Newest = (jiff::Timestamp, bool);

/// A new grouped job: its event's id and row, route, sink and group.
type Grouped<'a> = (i64, &'a NewEvent, &'a str, &'a String, &'a GroupTo);

/// Adds `grouped` jobs to `jobs`, each due with its group's next delivery
/// ([`crate::rules::group::due`]). Each group is locked for the transaction, in key order on
/// every replica, so two replicas storing events of one group agree on its delivery.
async fn join_groups<'a>(
    tx: &mut Tx<'_>,
    grouped: &[Grouped<'a>],
    jobs: &mut NewJobs<'a>,
) -> Result<(), StoreError> {
    let keys: BTreeSet<(&str, &str, &str)> = grouped
        .iter()
        .map(|(_, _, route, sink, group)| (*route, sink.as_str(), group.key.as_str()))
        .collect();
    // The newest job of each group, as this transaction sees it: the batch's own included.
    let mut latest: HashMap<(&str, &str, &str), Option<Newest>> = HashMap::new();
    for &(route, sink, key) in &keys {
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
            .bind(format!("group {route}\u{1f}{sink}\u{1f}{key}"))
            .execute(&mut **tx)
            .await?;
        let row: Option<(i64, bool)> = sqlx::query_as(
            "SELECT next_attempt_at, status IN ('pending', 'failed') FROM jobs
             WHERE sink = $1 AND route = $2 AND group_key = $3 ORDER BY id DESC LIMIT 1",
        )
        .bind(sink)
        .bind(route)
        .bind(key)
        .fetch_optional(&mut **tx)
        .await?;
        latest.insert(
            (route, sink, key),
            row.map(|(due, waiting)| (from_ms(due), waiting)),
        );
    }
    for &(event, new, route, sink, group) in grouped {
        let at = (route, sink.as_str(), group.key.as_str());
        let newest = latest.get(&at).copied().flatten();
        let due =
            crate::rules::group::due(newest, from_ms(new.received_at), group.wait, group.interval);
        latest.insert(at, Some((due, true)));
        jobs.add_grouped(
            event,
            route,
            sink,
            &group.key,
            (new.received_at, due.as_millisecond()),
        );
    }
    Ok(())
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
