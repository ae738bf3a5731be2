//! The pages: what each shows, read through the operator's queries off the async threads.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::WebState;
use super::auth::Session;
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
