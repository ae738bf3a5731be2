//! Silences: those in force and those that ended, a form that previews what a new one would
//! have matched (the command line's `--dry-run`) before adding it, and expiring one.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use serde::{Deserialize, Serialize};

use super::auth::{Csrf, Operator, Posted, Session, Token};
use super::{Choices, WebState, given};
use crate::actions::WouldSilence;
use crate::store::{Matchers, NewSilence, Silence, SilenceState};

/// How many ended silences the page shows.
const ENDED_SHOWN: usize = 20;
/// How many of the last events a preview looks at.
const PREVIEW_EVENTS: usize = 200;

/// The add form, as sent (an empty field is no matcher).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct SilenceForm {
    #[serde(skip_serializing)]
    csrf: String,
    route: String,
    sink: String,
    source: String,
    #[serde(rename = "type")]
    event_type: String,
    when: String,
    #[serde(rename = "for")]
    duration: String,
    comment: String,
    /// "preview" shows what it would match and stores nothing; anything else adds it.
    #[serde(skip_serializing)]
    action: String,
}

impl SilenceForm {
    /// The silence this form asks for, by `author` at `now`; or every problem with it.
    fn silence(&self, author: &str, now: jiff::Timestamp) -> Result<NewSilence, Vec<String>> {
        let given = |text: &str| given(text).map(str::to_owned);
        let matchers = Matchers {
            route: given(&self.route),
            sink: given(&self.sink),
            source: given(&self.source),
            event_type: given(&self.event_type),
            when: given(&self.when),
        };
        let mut problems = crate::silence::check(&matchers).err().unwrap_or_default();
        if self.comment.trim().is_empty() {
            problems.push("comment: say why, for whoever reads it later".into());
        }
        let ends_at = humantime::parse_duration(self.duration.trim())
            .ok()
            .filter(|span| !span.is_zero())
            .and_then(|span| jiff::SignedDuration::try_from(span).ok())
            .and_then(|span| now.checked_add(span).ok());
        let Some(ends_at) = ends_at else {
            problems.push("for: how long it lasts, such as 2h or 1d".into());
            return Err(problems);
        };
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(NewSilence {
            matchers,
            starts_at: now,
            ends_at,
            comment: self.comment.trim().to_owned(),
            author: author.to_owned(),
        })
    }
}

impl Token for SilenceForm {
    fn csrf(&self) -> &str {
        &self.csrf
    }
}

/// A silence with where it stands.
#[derive(Serialize)]
struct Listed {
    #[serde(flatten)]
    silence: Silence,
    state: SilenceState,
}

/// The silences page: in force, ended, the add form (refilled after a preview or a problem).
#[derive(Serialize)]
struct Silences {
    current: Vec<Listed>,
    ended: Vec<Listed>,
    form: SilenceForm,
    problems: Vec<String>,
    /// What a previewed silence would have matched among the last `looked_at` events.
    preview: Option<Vec<WouldSilence>>,
    looked_at: usize,
    #[serde(flatten)]
    choices: Choices,
}

pub async fn list(
    State(state): State<Arc<WebState>>,
    session: Session,
    headers: HeaderMap,
) -> Response {
    let form = SilenceForm {
        duration: "2h".into(),
        ..SilenceForm::default()
    };
    show(&state, &session, &headers, form, Vec::new(), None).await
}

/// Renders the page with `form` and what came of it.
async fn show(
    state: &WebState,
    session: &Session,
    headers: &HeaderMap,
    form: SilenceForm,
    problems: Vec<String>,
    preview: Option<(Vec<WouldSilence>, usize)>,
) -> Response {
    let now = state.clock.now();
    let read = state
        .read(move |tools| Ok((tools.silences(false, now)?, tools.silences(true, now)?)))
        .await;
    let (current, ended) = match read {
        Ok(read) => read,
        Err(unavailable) => return unavailable,
    };
    let with_state = |silence: Silence| Listed {
        state: silence.state(now),
        silence,
    };
    let (preview, looked_at) = match preview {
        Some((matched, looked_at)) => (Some(matched), looked_at),
        None => (None, 0),
    };
    let status = if problems.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::BAD_REQUEST
    };
    let page = Silences {
        current: current.into_iter().map(with_state).collect(),
        ended: ended
            .into_iter()
            .take(ENDED_SHOWN)
            .map(with_state)
            .collect(),
        form,
        problems,
        preview,
        looked_at,
        choices: Choices::of(&state.config.load()),
    };
    let mut response = state.answer(headers, session, "silences.html", &page);
    *response.status_mut() = status;
    response
}

/// Previews a silence (anyone logged in: it stores nothing), or adds it (operators only),
/// recorded as the user's.
pub async fn add(
    State(state): State<Arc<WebState>>,
    headers: HeaderMap,
    Posted(session, form): Posted<SilenceForm, false>,
) -> Response {
    // Anyone may preview; adding is an operator's.
    let preview = form.action == "preview";
    if let Err(refused) = session.check(&form.csrf, !preview) {
        return refused.into_response();
    }
    let now = state.clock.now();
    let new = match form.silence(&session.user, now) {
        Ok(new) => new,
        Err(problems) => return show(&state, &session, &headers, form, problems, None).await,
    };
    if preview {
        let config = state.config.load_full();
        let previewed = state
            .read(move |tools| crate::actions::preview(tools, &config, new, PREVIEW_EVENTS))
            .await;
        return match previewed {
            Ok(previewed) => {
                show(
                    &state,
                    &session,
                    &headers,
                    form,
                    Vec::new(),
                    Some(previewed),
                )
                .await
            }
            Err(unavailable) => unavailable,
        };
    }
    let matchers = serde_json::to_string(&new.matchers).unwrap_or_default();
    match state.read(move |tools| tools.add_silence(&new, now)).await {
        Ok(id) => {
            tracing::info!(user = %session.user, silence = id, %matchers, "status page: silence added");
            Redirect::to("/silences").into_response()
        }
        Err(unavailable) => unavailable,
    }
}

/// Ends a silence now (operators only).
pub async fn expire(
    State(state): State<Arc<WebState>>,
    headers: HeaderMap,
    Path(id): Path<i64>,
    Posted(session, _): Operator<Csrf>,
) -> Response {
    let now = state.clock.now();
    match state.read(move |tools| tools.expire_silence(id, now)).await {
        Ok(true) => {
            tracing::info!(user = %session.user, silence = id, "status page: silence expired");
            Redirect::to("/silences").into_response()
        }
        Ok(false) => state.problem(
            &headers,
            StatusCode::CONFLICT,
            &format!("silence {id} had already ended, or there is none"),
        ),
        Err(unavailable) => unavailable,
    }
}
