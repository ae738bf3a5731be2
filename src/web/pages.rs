//! The pages: what each shows, read through the operator's queries off the async threads.

use std::sync::Arc;

use axum::extract::{Form, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Redirect;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde::Serialize;

use super::WebState;
use super::auth::{Csrf, Session};
use crate::store::Silence;
use crate::store::admin::SinkStatus;

/// The overview: this daemon, each sink's state and queue, the silences in force.
#[derive(Serialize)]
struct Overview {
    version: &'static str,
    uptime: String,
    storage: String,
    sources: Vec<(String, String)>,
    sinks: Vec<SinkStatus>,
    silences: Vec<Silence>,
}

pub async fn overview(
    State(state): State<Arc<WebState>>,
    session: Session,
    headers: HeaderMap,
) -> Response {
    let now = state.clock.now();
    let configured = state.about.sinks.clone();
    let read = state.tools.run(move |tools| {
        Ok::<_, crate::store::StoreError>((
            tools.sinks(&configured, now)?,
            tools.silences(false, now)?,
        ))
    });
    let (sinks, silences) = match read.await {
        Some(Ok(read)) => read,
        Some(Err(err)) => return unavailable(&err.to_string()),
        None => return unavailable("the queries' thread stopped"),
    };
    let uptime = std::time::Duration::from_secs(state.about.started.elapsed().as_secs());
    let overview = Overview {
        version: state.about.version,
        uptime: humantime::format_duration(uptime).to_string(),
        storage: state.about.storage.clone(),
        sources: state.about.sources.clone(),
        sinks,
        silences,
    };
    if super::wants_json(&headers) {
        return axum::Json(overview).into_response();
    }
    state.page(
        "overview.html",
        minijinja::context! {
            page => minijinja::Value::from(minijinja::value::Serde(&overview)),
            user => session.user,
            role => session.role.as_str(),
            csrf => session.csrf,
        },
    )
}

/// The database did not answer.
fn unavailable(why: &str) -> Response {
    tracing::error!(error = %why, "status page: cannot read the database");
    (
        StatusCode::SERVICE_UNAVAILABLE,
        "the database did not answer; try again",
    )
        .into_response()
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

/// Pauses a sink (operators only): its deliveries wait until resumed or the time is up.
pub async fn pause(
    State(state): State<Arc<WebState>>,
    session: Session,
    Path(sink): Path<String>,
    Form(form): Form<PauseForm>,
) -> Response {
    if let Err(refused) = session.check(&form.csrf, true) {
        return refused.into_response();
    }
    if !state.about.sinks.contains(&sink) {
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
    let paused = state.tools.run(move |tools| {
        tools
            .pause_sink(&sink, (&user, &comment), duration, now)
            .map(|_| sink)
    });
    acted(paused.await, &session, "paused")
}

/// Resumes a sink (operators only): its waiting deliveries go out now, oldest first.
pub async fn resume(
    State(state): State<Arc<WebState>>,
    session: Session,
    Path(sink): Path<String>,
    Form(form): Form<Csrf>,
) -> Response {
    if let Err(refused) = session.check(&form.csrf, true) {
        return refused.into_response();
    }
    let now = state.clock.now();
    let resumed = state
        .tools
        .run(move |tools| tools.resume_sink(&sink, now).map(|_| sink));
    acted(resumed.await, &session, "resumed")
}

/// What an action on `sink` came to: back to the overview, logged with who did it.
fn acted(
    outcome: Option<Result<String, crate::store::StoreError>>,
    session: &Session,
    what: &str,
) -> Response {
    match outcome {
        Some(Ok(sink)) => {
            tracing::info!(user = %session.user, %sink, action = what, "status page: sink {what}");
            Redirect::to("/").into_response()
        }
        Some(Err(err)) => unavailable(&err.to_string()),
        None => unavailable("the queries' thread stopped"),
    }
}
