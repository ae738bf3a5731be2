//! Deliveries, an event, dead letters: the `deliveries` and `dead-letter` commands as pages,
//! and the actions on them (replay, retry, re-queue), decided in [`crate::actions`] as the
//! command line decides them.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use serde::{Deserialize, Serialize};

use super::auth::{Csrf, Operator, Posted, Session, Token};
use super::{Choices, WebState, given};
use crate::actions;
use crate::duration::Since;
use crate::store::admin::{Filter, JobDetail, Row, RowStatus, STATUSES};
use crate::text::printable;

/// Rows on a page of deliveries, unless asked for another number (up to [`MOST_ROWS`]).
const ROWS: usize = 50;
const MOST_ROWS: usize = 500;
/// How many dead letters the dead-letter page groups.
const DEAD_SHOWN: usize = 1000;

/// The deliveries page's filters, as the form sends them (an empty field is no filter).
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct Filters {
    status: String,
    source: String,
    sink: String,
    route: String,
    #[serde(rename = "type")]
    event_type: String,
    since: String,
    /// An event id: straight to its page.
    id: String,
    /// The keyset cursor: events older than this one.
    before: String,
    limit: String,
}

impl Filters {
    /// The store's filter, or what is wrong with the form.
    fn parse(&self, now: jiff::Timestamp) -> Result<Filter, String> {
        let number = |name: &str, text: &str| {
            given(text)
                .map(|text| {
                    text.parse::<i64>()
                        .map_err(|_| format!("{name}: {text:?} is not a number"))
                })
                .transpose()
        };
        let status = given(&self.status)
            .map(|text| {
                RowStatus::parse(text).ok_or_else(|| {
                    format!("status: {text:?} is not one of {}", STATUSES.join(", "))
                })
            })
            .transpose()?;
        let event_type = given(&self.event_type)
            .map(|glob| {
                globset::Glob::new(glob)
                    .map(|glob| glob.compile_matcher())
                    .map_err(|err| format!("type: {err}"))
            })
            .transpose()?;
        let since = given(&self.since)
            .map(|text| {
                Since::parse(text)?.at(now).ok_or_else(|| {
                    format!("since: {text:?} reaches before the first time there is")
                })
            })
            .transpose()
            .map_err(|err| format!("since: {err}"))?;
        let limit = match number("limit", &self.limit)? {
            Some(limit) if limit > 0 => usize::try_from(limit).unwrap_or(MOST_ROWS).min(MOST_ROWS),
            Some(_) => return Err("limit: at least 1".into()),
            None => ROWS,
        };
        Ok(Filter {
            status,
            source: given(&self.source).map(str::to_owned),
            sink: given(&self.sink).map(str::to_owned),
            route: given(&self.route).map(str::to_owned),
            event_type,
            since,
            before: number("before", &self.before)?,
            limit,
        })
    }

    /// These filters with `before` as the cursor, as a query string.
    fn next_page(&self, before: i64) -> String {
        let before = before.to_string();
        let mut query = url::form_urlencoded::Serializer::new(String::new());
        for (name, value) in [
            ("status", &self.status),
            ("source", &self.source),
            ("sink", &self.sink),
            ("route", &self.route),
            ("type", &self.event_type),
            ("since", &self.since),
            ("limit", &self.limit),
            ("before", &before),
        ] {
            if !value.trim().is_empty() {
                query.append_pair(name, value);
            }
        }
        query.finish()
    }
}

/// A page of deliveries with what the filter form offers.
#[derive(Serialize)]
struct Deliveries {
    rows: Vec<Row>,
    /// The query string of the next page, if there is one.
    next: Option<String>,
    filters: Filters,
    statuses: &'static [&'static str],
    #[serde(flatten)]
    choices: Choices,
}

pub async fn list(
    State(state): State<Arc<WebState>>,
    session: Session,
    headers: HeaderMap,
    Query(filters): Query<Filters>,
) -> Response {
    if let Some(id) = Some(filters.id.trim()).filter(|id| !id.is_empty()) {
        return match id.parse::<i64>() {
            Ok(id) => Redirect::to(&format!("/events/{id}")).into_response(),
            Err(_) => state.problem(
                &headers,
                StatusCode::BAD_REQUEST,
                &format!("id: {:?} is not an event id (a number)", printable(id)),
            ),
        };
    }
    let filter = match filters.parse(state.clock.now()) {
        Ok(filter) => filter,
        Err(why) => return state.problem(&headers, StatusCode::BAD_REQUEST, &why),
    };
    let listing = match state.read(move |tools| tools.page(&filter)).await {
        Ok(listing) => listing,
        Err(unavailable) => return unavailable,
    };
    let page = Deliveries {
        rows: listing.rows,
        next: listing.next.map(|before| filters.next_page(before)),
        filters,
        statuses: STATUSES,
        choices: Choices::of(&state.config.load()),
    };
    state.answer(&headers, &session, "deliveries.html", &page)
}

/// An event as its page shows it.
#[derive(Serialize)]
struct EventPage {
    id: i64,
    source: String,
    #[serde(rename = "type")]
    event_type: String,
    delivery_id: String,
    /// `webhook`, `reconcile` or `hookroute` (see [`crate::event::Event::origin`]).
    origin: &'static str,
    sender_delivery: Option<String>,
    received_at: String,
    occurred_at: Option<String>,
    /// The payload as the sender sent it (JSON), for a client that asked for JSON.
    payload: serde_json::Value,
    /// The payload pretty-printed (the page spells control and direction characters).
    #[serde(skip)]
    pretty: String,
    /// What today's routes make of it, and why (as `route-test` says).
    verdicts: String,
    /// Routing records: the routes that created no job, or its being unrouted.
    routing: Vec<Row>,
    jobs: Vec<JobDetail>,
    sinks: Vec<String>,
}

pub async fn event(
    State(state): State<Arc<WebState>>,
    session: Session,
    headers: HeaderMap,
    Path(id): Path<i64>,
) -> Response {
    let detail = match state.read(move |tools| tools.show(id)).await {
        Ok(Some(detail)) => detail,
        Ok(None) => {
            return state.problem(&headers, StatusCode::NOT_FOUND, &format!("no event {id}"));
        }
        Err(unavailable) => return unavailable,
    };
    let config = state.config.load_full();
    let stored = detail.stored;
    let event = &stored.event;
    let payload = event.payload.value();
    let pretty = serde_json::to_string_pretty(payload).unwrap_or_default();
    let (verdicts, _) = crate::explain::verdicts(&config, event, state.clock.now());
    let page = EventPage {
        id: stored.id,
        source: event.source.clone(),
        event_type: event.event_type.clone(),
        delivery_id: event.delivery_id.clone(),
        origin: event.origin(),
        sender_delivery: event.sender_delivery.clone(),
        received_at: stored.received_at.to_string(),
        occurred_at: event.occurred_at.map(|at| at.to_string()),
        payload: payload.clone(),
        pretty,
        verdicts,
        routing: detail.routing,
        jobs: detail.jobs,
        sinks: Choices::of(&config).sinks,
    };
    if super::wants_json(&headers) {
        return axum::Json(&page).into_response();
    }
    state.page(
        "event.html",
        minijinja::context! {
            page => minijinja::Value::from(minijinja::value::Serde(&page)),
            pretty => page.pretty,
            user => session.user,
            role => session.role.as_str(),
            csrf => session.csrf,
        },
    )
}

/// The replay form: to every sink today's routes name, or to one; `force` queues even when
/// the sink has a job of the event waiting.
#[derive(Deserialize)]
pub struct ReplayForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    sink: String,
    #[serde(default)]
    force: Option<String>,
}

impl Token for ReplayForm {
    fn csrf(&self) -> &str {
        &self.csrf
    }
}

/// Replays an event (operators only); back to its page, which shows the new jobs.
pub async fn replay(
    State(state): State<Arc<WebState>>,
    headers: HeaderMap,
    Path(id): Path<i64>,
    Posted(session, form): Operator<ReplayForm>,
) -> Response {
    let config = state.config.load_full();
    let sink = given(&form.sink).map(str::to_owned);
    let force = form.force.is_some();
    let replayed = state
        .act(&headers, move |tools| {
            actions::replay(tools, &config, id, sink.as_deref(), force)
        })
        .await;
    match replayed {
        Ok(queued) => {
            for job in &queued {
                tracing::info!(user = %session.user, event = id, job = job.job, sink = %job.sink,
                    "status page: event replayed");
            }
            Redirect::to(&format!("/events/{id}")).into_response()
        }
        Err(refused) => refused,
    }
}

/// Tries a failed job now (operators only); it keeps its attempts.
pub async fn retry(
    State(state): State<Arc<WebState>>,
    headers: HeaderMap,
    Path(job): Path<i64>,
    Posted(session, _): Operator<Csrf>,
) -> Response {
    match state
        .act(&headers, move |tools| actions::retry(tools, job))
        .await
    {
        Ok(job) => {
            tracing::info!(user = %session.user, job = job.id, sink = %job.sink,
                "status page: failed job retried now");
            Redirect::to(&format!("/events/{}", job.event_id)).into_response()
        }
        Err(refused) => refused,
    }
}

/// A group of dead letters: one sink, one reason.
#[derive(Serialize)]
struct DeadGroup {
    sink: String,
    reason: String,
    rows: Vec<Row>,
    /// The group's job ids, as the retry form sends them.
    jobs: String,
}

/// The newest dead letters, grouped by sink and reason, most letters first.
pub async fn dead(
    State(state): State<Arc<WebState>>,
    session: Session,
    headers: HeaderMap,
) -> Response {
    let filter = Filter {
        status: Some(RowStatus::Dead),
        limit: DEAD_SHOWN,
        ..Filter::default()
    };
    let rows = match state.read(move |tools| tools.list(&filter)).await {
        Ok(rows) => rows,
        Err(unavailable) => return unavailable,
    };
    let shown = rows.len();
    let mut groups: BTreeMap<(String, String), Vec<Row>> = BTreeMap::new();
    for row in rows {
        let key = (
            row.sink.clone().unwrap_or_default(),
            row.detail.clone().unwrap_or_default(),
        );
        groups.entry(key).or_default().push(row);
    }
    let mut groups: Vec<DeadGroup> = groups
        .into_iter()
        .map(|((sink, reason), rows)| DeadGroup {
            jobs: rows
                .iter()
                .filter_map(|row| row.job_id)
                .map(|id| id.to_string())
                .collect::<Vec<_>>()
                .join(","),
            sink,
            reason,
            rows,
        })
        .collect();
    groups.sort_by_key(|group| std::cmp::Reverse(group.rows.len()));
    let page = serde_json::json!({ "groups": groups, "shown": shown, "most": DEAD_SHOWN });
    state.answer(&headers, &session, "dead.html", &page)
}

/// The retry form of dead letters: the jobs, comma-separated (one, or a group's).
#[derive(Deserialize)]
pub struct DeadForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    jobs: String,
}

impl Token for DeadForm {
    fn csrf(&self) -> &str {
        &self.csrf
    }
}

/// Re-queues dead letters with fresh attempts (operators only).
pub async fn retry_dead(
    State(state): State<Arc<WebState>>,
    headers: HeaderMap,
    Posted(session, form): Operator<DeadForm>,
) -> Response {
    let jobs: Result<Vec<i64>, _> = form
        .jobs
        .split(',')
        .map(str::trim)
        .filter(|id| !id.is_empty())
        .map(str::parse)
        .collect();
    let jobs = match jobs {
        Ok(jobs) if !jobs.is_empty() => jobs,
        _ => {
            return state.problem(
                &headers,
                StatusCode::BAD_REQUEST,
                "jobs: job ids, separated by commas",
            );
        }
    };
    let asked = jobs.len();
    let retried = state
        .act(&headers, move |tools| {
            actions::retry_dead(tools, Some(&jobs))
        })
        .await;
    match retried {
        Ok(count) => {
            tracing::info!(user = %session.user, asked, requeued = count,
                "status page: dead letters re-queued");
            Redirect::to("/dead").into_response()
        }
        Err(refused) => refused,
    }
}
