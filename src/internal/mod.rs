//! hookroute's own events: what the daemon noticed about itself ([`crate::notice`]) becomes
//! an ordinary event from source `hookroute`, type `hookroute.<kind>`, accepted through
//! [`Intake::accept`] like a sender's. So it is stored durably, routed by the same rules and
//! shown, silenced, throttled, grouped and retried like any other: a team routes
//! `hookroute.*` to its email or chat and hears that a sink fails without running Prometheus.
//!
//! Each event's delivery id is made from what it is about (a sink's streak by its start, a
//! dead letter by its job), so when several replicas notice the same thing, dedupe keeps the
//! first and the rest are duplicates: one event. Each daemon sends at most `max_per_hour`
//! events of a kind; an internal event's own failure never makes another (see
//! `delivery::attempt::dead_letter` and the routing of [`crate::dispatch`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use jiff::{SignedDuration, Timestamp};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::internal::InternalConfig;
use crate::dispatch::Plan;
use crate::event::Event;
use crate::intake::{Accepted, Intake};
use crate::metrics::Metrics;
use crate::notice::{Kind, Notice, SOURCE, SinkNews};
use crate::store::Store;

/// How many times an event is offered to a store that refuses it, a second apart.
const TRIES: u32 = 3;
/// Most client addresses named in a `signature.failing` event.
const CLIENTS_NAMED: usize = 10;

/// Turns notices into events until `stop`, then those already noticed (a stopping daemon
/// still tells that it stops).
pub async fn run(
    mut notices: mpsc::Receiver<(Notice, Timestamp)>,
    (intake, store): (Intake, Store),
    plan: Arc<ArcSwap<Plan>>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let mut watch = Watch::default();
    let mut stopping = false;
    loop {
        let next = if stopping {
            notices.try_recv().ok()
        } else {
            tokio::select! {
                biased;
                next = notices.recv() => next,
                () = stop.cancelled() => {
                    stopping = true;
                    continue;
                }
            }
        };
        let Some((notice, at)) = next else { return };
        let plan = plan.load_full();
        if let Some(event) = watch.turn(notice, at, &plan.internal) {
            emit(event, (&intake, &store), &plan, &metrics, &mut watch).await;
        }
    }
}

/// An event to emit.
#[derive(Debug, Clone, PartialEq)]
struct Emit {
    kind: Kind,
    /// The delivery id: the same on every replica that notices the same thing.
    id: String,
    at: Timestamp,
    data: Value,
}

/// What the notices add up to: signature failures in their window, a storage outage, the
/// events sent this hour.
#[derive(Default)]
struct Watch {
    signatures: HashMap<String, Refusals>,
    outage: Option<Outage>,
    /// Per kind: the hour's start, and how many were sent in it.
    sent: HashMap<Kind, (Timestamp, u32)>,
}

/// A source's refused deliveries in the current window.
struct Refusals {
    since: Timestamp,
    count: u32,
    reasons: BTreeMap<String, u32>,
    clients: BTreeMap<String, u32>,
}

impl From<Timestamp> for Refusals {
    /// A window opening at `since`, empty.
    fn from(since: Timestamp) -> Self {
        Self {
            since,
            count: 0,
            reasons: BTreeMap::new(),
            clients: BTreeMap::new(),
        }
    }
}

/// Commits failing or slow since `since`.
struct Outage {
    since: Timestamp,
    failed: u64,
    slow: u64,
    slowest: Duration,
    last_error: Option<String>,
}

impl Watch {
    /// What `notice`, noticed `at`, comes to: an event to emit, if its kind is on.
    fn turn(&mut self, notice: Notice, at: Timestamp, config: &InternalConfig) -> Option<Emit> {
        let (kind, id, data) = match notice {
            Notice::SinkFailing(news) => {
                let id = streak_id("sink.failing", &news);
                (Kind::SinkFailing, id, sink_data(&news, json!({})))
            }
            Notice::SinkPaused {
                news,
                at: paused_at,
                by,
                comment,
                until,
            } => {
                let id = format!("sink.paused:{}:{}", news.sink, paused_at.as_millisecond());
                let more = json!({
                    "paused_at": paused_at.to_string(),
                    "paused_by": by,
                    "automatic": by == crate::store::sinks::AUTOMATIC,
                    "comment": comment,
                    "until": until.map(|t| t.to_string()),
                });
                (Kind::SinkPaused, id, sink_data(&news, more))
            }
            Notice::SinkRecovered { news, paused, by } => {
                let id = streak_id("sink.recovered", &news);
                let lasted = duration_text(at.duration_since(news.since));
                let more = json!({ "was_paused": paused, "how": by, "recovered_at": at.to_string(), "lasted": lasted });
                (Kind::SinkRecovered, id, sink_data(&news, more))
            }
            Notice::DeadLetter(letter) => {
                let id = format!("dead_letter:{}:{}", letter.job_id, at.as_millisecond());
                let (source, event_type, delivery_id) = letter.event.unzip3();
                let data = json!({
                    "sink": letter.sink,
                    "route": letter.route,
                    "job_id": letter.job_id,
                    "event_id": letter.event_id,
                    "error": letter.error,
                    "event_source": source,
                    "event_type": event_type,
                    "event_delivery_id": delivery_id,
                });
                (Kind::DeadLetter, id, data)
            }
            Notice::BadSignature {
                source,
                reason,
                client,
            } => {
                return self.refused(source, reason, client.to_string(), at, config);
            }
            Notice::StorageFailed { error } => {
                let outage = self.outage(at);
                outage.failed += 1;
                outage.last_error = Some(error);
                return None;
            }
            Notice::StorageSlow { took } => {
                let outage = self.outage(at);
                outage.slow += 1;
                outage.slowest = outage.slowest.max(took);
                return None;
            }
            Notice::StorageOk => {
                let outage = self.outage.take()?;
                let id = format!("storage.degraded:{}", outage.since.as_millisecond());
                let data = json!({
                    "since": outage.since.to_string(),
                    "until": at.to_string(),
                    "lasted": duration_text(at.duration_since(outage.since)),
                    "refused_deliveries": outage.failed,
                    "slow_commits": outage.slow,
                    "slowest_commit_ms": u64::try_from(outage.slowest.as_millis()).unwrap_or(u64::MAX),
                    "last_error": outage.last_error,
                });
                (Kind::StorageDegraded, id, data)
            }
            Notice::ReloadFailed { problems } => {
                let id = format!("config.reload_failed:{}", at.as_millisecond());
                (Kind::ReloadFailed, id, json!({ "problems": problems }))
            }
            Notice::ReconcileFailing { source, error } => {
                // One daemon passes at a time, and a refusal stops the others: one event.
                let id = format!("reconcile.failing:{source}:{}", at.as_millisecond());
                let data = json!({ "source": source, "error": error, "until": "the configuration is reloaded" });
                (Kind::ReconcileFailing, id, data)
            }
            Notice::Reloaded {
                sources,
                sinks,
                routes,
            } => {
                let id = format!("config.reloaded:{}", at.as_millisecond());
                let data = json!({ "sources": sources, "sinks": sinks, "routes": routes });
                (Kind::Reloaded, id, data)
            }
            Notice::Started { version } => {
                let id = format!("started:{}", at.as_millisecond());
                (Kind::Started, id, json!({ "version": version }))
            }
            Notice::Stopping => {
                let id = format!("stopping:{}", at.as_millisecond());
                (Kind::Stopping, id, json!({}))
            }
        };
        config.on(kind).then_some(Emit { kind, id, at, data })
    }

    fn outage(&mut self, at: Timestamp) -> &mut Outage {
        self.outage.get_or_insert(Outage {
            since: at,
            failed: 0,
            slow: 0,
            slowest: Duration::ZERO,
            last_error: None,
        })
    }

    /// Counts a refused delivery of `source`; the one that reaches the threshold within the
    /// window makes the event. Its id names the hour, so replicas (and a flood lasting the
    /// hour) make one.
    fn refused(
        &mut self,
        source: String,
        reason: String,
        client: String,
        at: Timestamp,
        config: &InternalConfig,
    ) -> Option<Emit> {
        let window =
            SignedDuration::try_from(config.signature_window).unwrap_or(SignedDuration::MAX);
        let refusals = self
            .signatures
            .entry(source.clone())
            .or_insert_with(|| Refusals::from(at));
        if at.duration_since(refusals.since) > window {
            *refusals = Refusals::from(at);
        }
        refusals.count += 1;
        *refusals.reasons.entry(reason).or_default() += 1;
        if refusals.clients.len() < CLIENTS_NAMED || refusals.clients.contains_key(&client) {
            *refusals.clients.entry(client).or_default() += 1;
        }
        if refusals.count != config.signature_failures || !config.on(Kind::SignatureFailing) {
            return None;
        }
        let hour = at.as_second().div_euclid(3600) * 3600;
        let data = json!({
            "source": source,
            "failures": refusals.count,
            "since": refusals.since.to_string(),
            "window": duration_text(window),
            "reasons": refusals.reasons,
            "clients": refusals.clients,
        });
        Some(Emit {
            kind: Kind::SignatureFailing,
            id: format!("signature.failing:{source}:{hour}"),
            at,
            data,
        })
    }

    /// Whether another event of `kind` may go out at `at` this hour.
    fn allow(&mut self, kind: Kind, at: Timestamp, most: u32) -> bool {
        let (start, sent) = self.sent.entry(kind).or_insert((at, 0));
        if at.duration_since(*start) >= SignedDuration::from_hours(1) {
            (*start, *sent) = (at, 0);
        }
        *sent += 1;
        *sent <= most
    }
}

/// Stores and routes `event` as any event is, a few times if the store refuses.
async fn emit(
    mut event: Emit,
    (intake, store): (&Intake, &Store),
    plan: &Plan,
    metrics: &Metrics,
    watch: &mut Watch,
) {
    let kind = event.kind.name();
    // What a sink's event affects: the jobs waiting for it, and its dead letters.
    if let Some(sink) = event
        .data
        .get("sink")
        .and_then(Value::as_str)
        .map(str::to_owned)
        && matches!(
            event.kind,
            Kind::SinkFailing | Kind::SinkPaused | Kind::SinkRecovered
        )
        && let Ok(queues) = store.queues(event.at).await
        && let Some(queue) = queues.iter().find(|q| q.sink == sink)
    {
        event.data["waiting"] = json!(queue.waiting);
        event.data["oldest_waiting"] = json!(duration_text(
            SignedDuration::try_from(queue.oldest_waiting).unwrap_or_default()
        ));
        event.data["dead_letters"] = json!(queue.dead);
    }
    let body = json!({
        "id": event.id,
        "type": event.kind.event_type(),
        "created_at": event.at.to_string(),
        "data": event.data,
    })
    .to_string();
    let parsed = match Event::parse(SOURCE, body.as_bytes(), Some(&event.id), None) {
        Ok(parsed) => parsed,
        Err(err) => {
            tracing::error!(kind, error = %err, "cannot make an internal event (a bug)");
            return;
        }
    };
    // Emitted for the routes that ask for it: one no route takes would only be a row
    // marked unrouted. The log and the metric still tell it.
    if plan.routing.table.route(&parsed).routes.is_empty() {
        metrics.internal_event(kind, "unrouted");
        tracing::info!(kind, delivery_id = %event.id, data = %event.data, "internal event (no route takes it)");
        return;
    }
    if !watch.allow(event.kind, event.at, plan.internal.max_per_hour) {
        metrics.internal_event(kind, "limited");
        tracing::warn!(kind, id = %event.id, "internal event not sent: past [self] max_per_hour");
        return;
    }
    for attempt in 1..=TRIES {
        match intake
            .accept(parsed.clone(), body.as_bytes(), event.at)
            .await
        {
            Ok(Accepted::New { id, jobs }) => {
                metrics.internal_event(kind, "emitted");
                tracing::info!(event_id = id, kind, delivery_id = %event.id, jobs, "internal event");
                return;
            }
            Ok(Accepted::Duplicate(_)) => {
                metrics.internal_event(kind, "duplicate");
                return;
            }
            Err(err) if attempt < TRIES => {
                tracing::warn!(kind, error = %err, "cannot store an internal event; trying again");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(err) => {
                metrics.internal_event(kind, "failed");
                tracing::error!(kind, error = %err, "cannot store an internal event");
            }
        }
    }
}

/// A sink streak's event id: one per streak, whoever notices it.
fn streak_id(what: &str, news: &SinkNews) -> String {
    format!("{what}:{}:{}", news.sink, news.since.as_millisecond())
}

/// A sink's event data: the streak, with `more`.
fn sink_data(news: &SinkNews, more: Value) -> Value {
    let mut data = json!({
        "sink": news.sink,
        "since": news.since.to_string(),
        "failures": news.failures,
        "last_error": news.last_error,
        "recent_errors": news.recent_errors,
    });
    if let (Some(data), Value::Object(more)) = (data.as_object_mut(), more) {
        data.extend(more);
    }
    data
}

/// A duration as people read it: `20m`, `2h 5m`.
fn duration_text(duration: SignedDuration) -> String {
    let seconds = duration.as_secs().max(0).unsigned_abs();
    humantime::format_duration(Duration::from_secs(seconds)).to_string()
}

/// `Option<(a, b, c)>` as three options.
trait Unzip3<A, B, C> {
    fn unzip3(self) -> (Option<A>, Option<B>, Option<C>);
}

impl<A, B, C> Unzip3<A, B, C> for Option<(A, B, C)> {
    fn unzip3(self) -> (Option<A>, Option<B>, Option<C>) {
        match self {
            Some((a, b, c)) => (Some(a), Some(b), Some(c)),
            None => (None, None, None),
        }
    }
}

#[cfg(test)]
mod tests;
