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
mod pages;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::http::{HeaderName, HeaderValue, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use ipnet::IpNet;
use minijinja::Environment;
use serde::Serialize;

use crate::clock::Clock;
use crate::config::admin::AdminConfig;
use crate::config::{Config, ServerConfig};
use crate::store::admin::Tools;

pub use auth::Sessions;

/// The pages' templates and style, embedded in the binary.
const TEMPLATES: &[(&str, &str)] = &[
    ("base.html", include_str!("templates/base.html")),
    ("login.html", include_str!("templates/login.html")),
    ("overview.html", include_str!("templates/overview.html")),
];
const STYLE: &str = include_str!("templates/style.css");

/// What every page needs.
pub struct WebState {
    admin: AdminConfig,
    sessions: Sessions,
    /// The operator's queries, on a thread and a connection of their own.
    tools: Queries,
    clock: Arc<dyn Clock>,
    env: Environment<'static>,
    /// What the overview says of this daemon.
    about: About,
    /// Peers whose `X-Forwarded-Proto` is believed (the cookie is `Secure` behind HTTPS).
    trusted_proxies: Vec<IpNet>,
}

/// This daemon, as the overview shows it.
#[derive(Debug, Clone, Serialize)]
struct About {
    version: &'static str,
    storage: String,
    sources: Vec<(String, String)>,
    sinks: Vec<String>,
    #[serde(skip)]
    started: Instant,
}

impl WebState {
    /// # Errors
    /// When the database cannot be opened for the pages' queries.
    pub fn new(
        config: &Config,
        admin: AdminConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Arc<Self>, crate::store::StoreError> {
        let tools = Queries::open(config.storage.clone())?;
        let mut env = Environment::new();
        for (name, text) in TEMPLATES {
            env.add_template(name, text)
                .expect("the embedded templates are valid");
        }
        let about = About {
            version: env!("CARGO_PKG_VERSION"),
            storage: config.storage.describe(),
            sources: config
                .sources
                .iter()
                .map(|s| (s.name.clone(), s.path.clone()))
                .collect(),
            sinks: config.sinks.iter().map(|s| s.name.clone()).collect(),
            started: Instant::now(),
        };
        Ok(Arc::new(Self {
            sessions: Sessions::new(admin.session_ttl),
            admin,
            tools,
            clock,
            env,
            about,
            trusted_proxies: config.server.trusted_proxies.clone(),
        }))
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
