//! The status page: what hookroute did, for the people who are not in a shell. It has a
//! listener of its own (`[admin] listen`, off unless configured), never the public webhook
//! listener, so a reverse proxy exposes only `/hooks/*` unless told otherwise. Pages are
//! rendered on the server (minijinja, which escapes every value: a payload is a stranger's
//! text), work without JavaScript, and answer JSON to `Accept: application/json`.
//!
//! Who may see it: the users of `[admin.users]`, by a token traded for a session cookie at
//! the login form ([`auth`]); operators may also act, by POSTs that carry the session's CSRF
//! token. What it shows comes from the operator's queries (`store::admin::Tools`), the same
//! the command line runs.

mod auth;
mod deliveries;
mod pages;
mod silences;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use axum::Router;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use ipnet::IpNet;
use minijinja::Environment;
use serde::Serialize;

use crate::actions::Refused;
use crate::clock::Clock;
use crate::config::admin::AdminConfig;
use crate::config::{Config, ServerConfig};
use crate::metrics::Metrics;
use crate::store::admin::Tools;

use auth::Session;
pub use auth::Sessions;

/// The pages' templates and style, embedded in the binary.
const TEMPLATES: &[(&str, &str)] = &[
    ("base.html", include_str!("templates/base.html")),
    ("login.html", include_str!("templates/login.html")),
    ("overview.html", include_str!("templates/overview.html")),
    ("deliveries.html", include_str!("templates/deliveries.html")),
    ("event.html", include_str!("templates/event.html")),
    ("dead.html", include_str!("templates/dead.html")),
    ("silences.html", include_str!("templates/silences.html")),
    ("config.html", include_str!("templates/config.html")),
    ("problem.html", include_str!("templates/problem.html")),
];
const STYLE: &str = include_str!("templates/style.css");

/// What every page needs.
pub struct WebState {
    admin: AdminConfig,
    sessions: Sessions,
    /// The operator's queries, on a thread and a connection of their own.
    tools: Queries,
    /// The configuration in force (replaced on reload): routes for replays and previews.
    config: Arc<ArcSwap<Config>>,
    /// Each source's last hour.
    metrics: Arc<Metrics>,
    clock: Arc<dyn Clock>,
    env: Environment<'static>,
    started: Instant,
    /// Peers whose `X-Forwarded-Proto` is believed (the cookie is `Secure` behind HTTPS).
    trusted_proxies: Vec<IpNet>,
}

impl WebState {
    /// # Errors
    /// When the database cannot be opened for the pages' queries.
    pub fn new(
        config: Arc<ArcSwap<Config>>,
        metrics: Arc<Metrics>,
        admin: AdminConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Arc<Self>, crate::store::StoreError> {
        let (storage, trusted_proxies) = {
            let config = config.load();
            (
                config.storage.clone(),
                config.server.trusted_proxies.clone(),
            )
        };
        let tools = Queries::open(storage)?;
        let mut env = Environment::new();
        // Every string a page shows may be a stranger's: control and direction characters
        // are spelt as escapes (as the command line prints them) before HTML escaping, so no
        // payload can reorder or hide what is around it. Line breaks stay.
        env.set_formatter(|out, state, value| match value.as_str() {
            Some(text) if !value.is_safe() => {
                let shown = crate::text::printable_lines(text, "");
                minijinja::escape_formatter(out, state, &minijinja::Value::from(shown))
            }
            _ => minijinja::escape_formatter(out, state, value),
        });
        for (name, text) in TEMPLATES {
            env.add_template(name, text)
                .expect("the embedded templates are valid");
        }
        Ok(Arc::new(Self {
            sessions: Sessions::new(admin.session_ttl),
            admin,
            tools,
            config,
            metrics,
            clock,
            env,
            started: Instant::now(),
            trusted_proxies,
        }))
    }

    /// `page` as JSON to a client that asked for it, else rendered as `template` for
    /// `session`'s user (with their role and the CSRF token every form carries).
    fn answer<T: Serialize>(
        &self,
        headers: &HeaderMap,
        session: &Session,
        template: &str,
        page: &T,
    ) -> Response {
        if wants_json(headers) {
            return axum::Json(page).into_response();
        }
        self.page(
            template,
            minijinja::context! {
                page => minijinja::Value::from(minijinja::value::Serde(page)),
                user => session.user.clone(),
                role => session.role.as_str(),
                csrf => session.csrf.clone(),
            },
        )
    }

    /// Runs `query` with the operator's queries; a database that does not answer is 503.
    async fn read<T: Send + 'static>(
        &self,
        query: impl FnOnce(&mut Tools) -> Result<T, crate::store::StoreError> + Send + 'static,
    ) -> Result<T, Response> {
        self.act(&HeaderMap::new(), query).await
    }

    /// Runs `action` with the operator's queries: what it refused is answered with why and
    /// the status that says it (404 for what does not exist, 409 for what is not in a state
    /// the action takes); a database that does not answer is 503.
    async fn act<T: Send + 'static, E: Into<Refused> + Send + 'static>(
        &self,
        headers: &HeaderMap,
        action: impl FnOnce(&mut Tools) -> Result<T, E> + Send + 'static,
    ) -> Result<T, Response> {
        let refused = match self.tools.run(action).await {
            Some(Ok(done)) => return Ok(done),
            Some(Err(refused)) => refused.into(),
            None => return Err(unavailable("the queries' thread stopped")),
        };
        let status = match &refused {
            Refused::NoEvent(_) | Refused::NoSink(_) => StatusCode::NOT_FOUND,
            Refused::Twice { .. } | Refused::NoRoute(_) | Refused::NotRetried(_) => {
                StatusCode::CONFLICT
            }
            Refused::Store(err) => return Err(unavailable(&err.to_string())),
        };
        Err(self.problem(headers, status, &refused.to_string()))
    }

    /// A request the page cannot do: `status`, and why, as a page (or JSON).
    fn problem(&self, headers: &HeaderMap, status: StatusCode, why: &str) -> Response {
        if wants_json(headers) {
            return (status, axum::Json(serde_json::json!({ "error": why }))).into_response();
        }
        let mut response = self.page(
            "problem.html",
            minijinja::context! { status => status.as_u16(), why => why },
        );
        *response.status_mut() = status;
        response
    }

    /// Renders `template` with `context`, or the error page.
    fn page(&self, template: &str, context: minijinja::Value) -> Response {
        match self
            .env
            .get_template(template)
            .and_then(|t| t.render(context))
        {
            Ok(html) => Html(html).into_response(),
            Err(err) => {
                tracing::error!(template, error = %err, "cannot render a page (a bug)");
                (
                    axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                    "cannot render this page",
                )
                    .into_response()
            }
        }
    }
}

/// A job for the queries' thread.
type Query = Box<dyn FnOnce(&mut Tools) + Send>;

/// The operator's queries (`store::admin::Tools`, synchronous, the command line's) on a
/// thread of their own, which opens the database and is the only one to touch it: the
/// pages never block the async threads, and a PostgreSQL tools connection (with its own
/// small runtime) lives and dies outside them. The thread ends with the last sender.
struct Queries(std::sync::Mutex<std::sync::mpsc::Sender<Query>>);

impl Queries {
    fn open(storage: crate::config::StorageConfig) -> Result<Self, crate::store::StoreError> {
        let (jobs, queue) = std::sync::mpsc::channel::<Query>();
        let (opened, open) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("hookroute-page".into())
            .spawn(move || {
                let access = crate::store::admin::Access::Write;
                let mut tools = match crate::store::open_admin(&storage, access) {
                    Ok(tools) => {
                        let _ = opened.send(Ok(()));
                        tools
                    }
                    Err(err) => {
                        let _ = opened.send(Err(err));
                        return;
                    }
                };
                while let Ok(job) = queue.recv() {
                    job(&mut tools);
                }
            })
            .map_err(crate::store::StoreError::Thread)?;
        open.recv()
            .map_err(|_| crate::store::StoreError::WriterGone)??;
        Ok(Self(std::sync::Mutex::new(jobs)))
    }

    /// Runs `query` on the queries' thread; `None` if the thread is gone.
    async fn run<T: Send + 'static>(
        &self,
        query: impl FnOnce(&mut Tools) -> T + Send + 'static,
    ) -> Option<T> {
        let (answer, answered) = tokio::sync::oneshot::channel();
        let job: Query = Box::new(move |tools| {
            let _ = answer.send(query(tools));
        });
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(job)
            .ok()?;
        answered.await.ok()
    }
}

/// The status page's routes; everything else is 404.
pub fn router(state: Arc<WebState>) -> Router {
    Router::new()
        .route("/", get(pages::overview))
        .route("/login", get(auth::login_form).post(auth::login))
        .route("/logout", post(auth::logout))
        .route("/sinks/{sink}/pause", post(pages::pause))
        .route("/sinks/{sink}/resume", post(pages::resume))
        .route("/deliveries", get(deliveries::list))
        .route("/events/{id}", get(deliveries::event))
        .route("/events/{id}/replay", post(deliveries::replay))
        .route("/jobs/{id}/retry", post(deliveries::retry))
        .route("/dead", get(deliveries::dead))
        .route("/dead/retry", post(deliveries::retry_dead))
        .route("/silences", get(silences::list).post(silences::add))
        .route("/silences/{id}/expire", post(silences::expire))
        .route("/config", get(pages::config))
        .route("/style.css", get(style))
        .layer(axum::middleware::map_response(headers))
        .with_state(state)
}

/// Serves the page on `listener` until `shutdown`, with the public listener's timeouts.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<WebState>,
    server: &ServerConfig,
    shutdown: impl std::future::Future<Output = ()>,
) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, users = state.admin.users.len(), "status page listening");
    }
    crate::http::serve(listener, router(state), server, shutdown).await;
}

async fn style() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], STYLE)
}

/// The same strict headers on every answer: no script but ours (there is none), no framing,
/// no referrer, nothing cached (pages hold payloads).
async fn headers(mut response: Response) -> Response {
    let set = [
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        ),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::CACHE_CONTROL, "no-store"),
    ];
    let headers = response.headers_mut();
    for (name, value) in set {
        headers.insert(name, HeaderValue::from_static(value));
    }
    headers.insert(
        HeaderName::from_static("cross-origin-opener-policy"),
        HeaderValue::from_static("same-origin"),
    );
    response
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

/// What the configuration in force names: the choices of the pages' forms.
#[derive(Serialize)]
struct Choices {
    sources: Vec<String>,
    sinks: Vec<String>,
    routes: Vec<String>,
}

impl Choices {
    fn of(config: &Config) -> Self {
        Self {
            sources: config.sources.iter().map(|s| s.name.clone()).collect(),
            sinks: config.sinks.iter().map(|s| s.name.clone()).collect(),
            routes: (config.routing.table.routes().iter())
                .map(|r| r.name.clone())
                .collect(),
        }
    }
}

/// A form's field as given: trimmed, and `None` when left empty (no filter, no matcher).
fn given(text: &str) -> Option<&str> {
    Some(text.trim()).filter(|text| !text.is_empty())
}

/// Whether the client asked for JSON.
fn wants_json(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("application/json"))
}

/// The client's address: the peer, or behind a trusted proxy its `X-Forwarded-For`.
fn client(state: &WebState, peer: SocketAddr, headers: &axum::http::HeaderMap) -> std::net::IpAddr {
    crate::http::client_ip(peer.ip(), headers, &state.trusted_proxies).unwrap_or(peer.ip())
}
