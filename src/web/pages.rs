//! The pages: what each shows, read through the operator's queries off the async threads.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Redirect;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde::Serialize;

use super::WebState;
use super::auth::{Csrf, Operator, Posted, Session, Token};
use crate::metrics::SourceHour;
use crate::store::Silence;
use crate::store::admin::SinkStatus;

/// The overview: this daemon, each source's last hour, each sink's state and queue, the
/// silences in force.
#[derive(Serialize)]
struct Overview {
    version: &'static str,
    uptime: String,
    storage: String,
    sources: Vec<SourceLine>,
    sinks: Vec<SinkStatus>,
    silences: Vec<Silence>,
}

/// A configured source: where it posts, and its last hour on this daemon.
#[derive(Serialize)]
struct SourceLine {
    name: String,
    path: String,
    hour: SourceHour,
    /// Its last reconcile pass, for a source that reconciles.
    reconcile: Option<String>,
}

pub async fn overview(
    State(state): State<Arc<WebState>>,
    session: Session,
    headers: HeaderMap,
) -> Response {
    let now = state.clock.now();
    let config = state.config.load_full();
    let configured = super::Choices::of(&config).sinks;
    let read = state
        .read(move |tools| {
            let (sinks, silences) = (tools.sinks(&configured, now)?, tools.silences(false, now)?);
            Ok((sinks, silences, tools.passes()?))
        })
        .await;
    let (sinks, silences, mut passes) = match read {
        Ok(read) => read,
        Err(unavailable) => return unavailable,
    };
    let mut heard = state.metrics.last_hour();
    let sources = config
        .sources
        .iter()
        .map(|source| SourceLine {
            name: source.name.clone(),
            path: source.path.clone(),
            hour: heard
                .iter()
                .position(|hour| hour.source == source.name)
                .map(|at| heard.swap_remove(at))
                .unwrap_or_else(|| SourceHour {
                    source: source.name.clone(),
                    ..SourceHour::default()
                }),
            reconcile: source.api.as_ref().and_then(|api| api.reconcile).map(|_| {
                passes
                    .iter()
                    .position(|pass| pass.source == source.name)
                    .map_or_else(
                        || crate::store::PassRow::new(&source.name),
                        |at| passes.swap_remove(at),
                    )
                    .said()
            }),
        })
        .collect();
    let uptime = std::time::Duration::from_secs(state.started.elapsed().as_secs());
    let overview = Overview {
        version: env!("CARGO_PKG_VERSION"),
        uptime: humantime::format_duration(uptime).to_string(),
        storage: config.storage.describe(),
        sources,
        sinks,
        silences,
    };
    state.answer(&headers, &session, "overview.html", &overview)
}

/// The configuration in force, as `check-config` prints it: sources, sinks, routes, windows
/// and warnings; never a secret (it names how many a source has, not what they are).
pub async fn config(
    State(state): State<Arc<WebState>>,
    session: Session,
    headers: HeaderMap,
) -> Response {
    let config = state.config.load_full();
    let summary = crate::explain::summary(&config);
    let page = serde_json::json!({ "file": config.file, "summary": summary });
    state.answer(&headers, &session, "config.html", &page)
}

/// The pause form: why, and for how long (empty: until resumed).
#[derive(Deserialize)]
pub struct PauseForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    comment: String,
    #[serde(default, rename = "for")]
    duration: String,
}

impl Token for PauseForm {
    fn csrf(&self) -> &str {
        &self.csrf
    }
}

/// Pauses a sink (operators only): its deliveries wait until resumed or the time is up.
pub async fn pause(
    State(state): State<Arc<WebState>>,
    Path(sink): Path<String>,
    Posted(session, form): Operator<PauseForm>,
) -> Response {
    if !state.config.load().sinks.iter().any(|s| s.name == sink) {
        return (StatusCode::NOT_FOUND, "no such sink").into_response();
    }
    let comment = form.comment.trim().to_owned();
    if comment.is_empty() {
        return (
            StatusCode::BAD_REQUEST,
            "say why: the comment is shown with the pause",
        )
            .into_response();
    }
    let duration = match form.duration.trim() {
        "" => None,
        text => match humantime::parse_duration(text) {
            Ok(duration) => Some(duration),
            Err(_) => {
                return (
                    StatusCode::BAD_REQUEST,
                    "how long: a duration such as 2h, or nothing",
                )
                    .into_response();
            }
        },
    };
    let (now, user) = (state.clock.now(), session.user.clone());
    let paused = state.read(move |tools| {
        tools
            .pause_sink(&sink, (&user, &comment), duration, now)
            .map(|_| sink)
    });
    acted(paused.await, &session, "paused")
}

/// Resumes a sink (operators only): its waiting deliveries go out now, oldest first.
pub async fn resume(
    State(state): State<Arc<WebState>>,
    Path(sink): Path<String>,
    Posted(session, _): Operator<Csrf>,
) -> Response {
    let now = state.clock.now();
    let resumed = state.read(move |tools| tools.resume_sink(&sink, now).map(|_| sink));
    acted(resumed.await, &session, "resumed")
}

/// What an action on `sink` came to: back to the overview, logged with who did it.
fn acted(outcome: Result<String, Response>, session: &Session, what: &str) -> Response {
    match outcome {
        Ok(sink) => {
            tracing::info!(user = %session.user, %sink, action = what, "status page: sink {what}");
            Redirect::to("/").into_response()
        }
        Err(unavailable) => unavailable,
    }
}
