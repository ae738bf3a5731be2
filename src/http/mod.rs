//! The HTTP face: the router (drivable without a socket), health endpoints, and the server loop
//! with header-read and body-read timeouts and graceful shutdown.

mod client_ip;
mod error;
mod ingest;
mod limit;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::Router;
use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use ipnet::IpNet;
use tokio::net::TcpListener;
use tower::ServiceExt as _;
use tower_governor::GovernorLayer;
use tower_governor::governor::GovernorConfigBuilder;

pub use client_ip::{client_ip, is_trusted, limit_key};
pub use error::ApiError;
use limit::{ClientKey, FailureLimiter};

use crate::clock::Clock;
use crate::config::{Config, ServerConfig, SourceConfig};
use crate::intake::Intake;
use crate::metrics::Metrics;
use crate::store::Store;

/// Shared by every request.
pub struct AppState {
    /// Sources by path; replaced whole on reload (secret rotation, new sources).
    sources: ArcSwap<HashMap<String, SourceConfig>>,
    /// For readiness: whether the database takes a write.
    store: Store,
    /// Where verified events go.
    intake: Intake,
    /// The time deliveries are received at (and signatures' timestamps checked against).
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    /// Who may read `/metrics`.
    metrics_allowed: Vec<IpNet>,
    /// The delivery queues as last read for `/metrics`, and when: scrapes within
    /// [`QUEUES_FRESH`] share one read, so however often a stranger scrapes, the database
    /// answers at most once a second. The lock also keeps two renders from interleaving.
    queues: tokio::sync::Mutex<Option<(jiff::Timestamp, Vec<crate::metrics::SinkQueue>)>>,
    max_body_bytes: usize,
    /// Bytes of bodies not yet verified, across all requests (see `ingest::UNVERIFIED_BODIES`).
    unverified: tokio::sync::Semaphore,
    body_read_timeout: Duration,
    trusted_proxies: Arc<[IpNet]>,
    failures: Option<FailureLimiter>,
}

/// The HTTP application: its state and the periodic upkeep of its rate limiters.
#[derive(Clone)]
pub struct App {
    state: Arc<AppState>,
    traffic_limiter: Option<Arc<dyn Fn() + Send + Sync>>,
    router: Router,
}

impl App {
    pub fn new(
        config: &Config,
        store: Store,
        intake: Intake,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let trusted_proxies: Arc<[IpNet]> = config.server.trusted_proxies.clone().into();
        let limits = config.server.rate_limit;
        let state = Arc::new(AppState {
            sources: ArcSwap::from_pointee(sources_by_path(config)),
            store,
            intake,
            clock,
            metrics,
            metrics_allowed: config.metrics.allowed_ips.clone(),
            queues: tokio::sync::Mutex::new(None),
            max_body_bytes: config.server.max_body_bytes,
            unverified: tokio::sync::Semaphore::new(
                config
                    .server
                    .max_body_bytes
                    .saturating_mul(ingest::UNVERIFIED_BODIES)
                    .min(tokio::sync::Semaphore::MAX_PERMITS),
            ),
            body_read_timeout: config.server.body_read_timeout,
            trusted_proxies: Arc::clone(&trusted_proxies),
            failures: limits.as_ref().map(FailureLimiter::new),
        });

        let hooks = Router::new()
            .fallback(ingest::ingest)
            .with_state(Arc::clone(&state));
        let (hooks, traffic_limiter) = match limits {
            Some(limits) => {
                let governor = GovernorConfigBuilder::default()
                    .key_extractor(ClientKey { trusted_proxies })
                    .period(limit::traffic_period(limits.per_second))
                    .burst_size(limits.burst.get())
                    .finish()
                    .expect("period and burst are non-zero");
                let limiter = Arc::clone(governor.limiter());
                let upkeep: Arc<dyn Fn() + Send + Sync> = Arc::new(move || {
                    limiter.retain_recent();
                    limiter.shrink_to_fit();
                });
                let layer = GovernorLayer::new(governor).error_handler(|err| match err {
                    tower_governor::GovernorError::TooManyRequests { wait_time, .. } => {
                        ApiError::RateLimited {
                            retry_after_secs: wait_time.max(1),
                        }
                        .into_response()
                    }
                    tower_governor::GovernorError::UnableToExtractKey => {
                        ApiError::MalformedForwardedFor.into_response()
                    }
                    other => {
                        tracing::error!(error = %other, "rate limiter failed");
                        StatusCode::INTERNAL_SERVER_ERROR.into_response()
                    }
                });
                (hooks.layer(layer), Some(upkeep))
            }
            None => (hooks, None),
        };
        // Every answer on a webhook path is counted, the rate limiter's included.
        let hooks = hooks.layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            count_requests,
        ));
        let mut router = Router::new()
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz));
        if config.metrics.enabled {
            router = router.route("/metrics", get(scrape));
        }
        let router = router
            .with_state(Arc::clone(&state))
            .fallback_service(hooks);
        Self {
            state,
            traffic_limiter,
            router,
        }
    }

    /// The router, for serving or for driving in tests without a socket.
    pub fn router(&self) -> Router {
        self.router.clone()
    }

    /// Takes a reloaded configuration's sources; requests in flight finish with the old ones.
    pub fn reload(&self, config: &Config) {
        self.state.sources.store(Arc::new(sources_by_path(config)));
    }

    /// Where verified events go: also where the daemon's own events enter.
    pub fn intake(&self) -> Intake {
        self.state.intake.clone()
    }

    /// Lets the rate limiters forget idle clients; call periodically.
    pub fn maintain(&self) {
        if let Some(upkeep) = &self.traffic_limiter {
            upkeep();
        }
        if let Some(failures) = &self.state.failures {
            failures.maintain();
        }
    }
}

fn sources_by_path(config: &Config) -> HashMap<String, SourceConfig> {
    config
        .sources
        .iter()
        .map(|s| (s.path.clone(), s.clone()))
        .collect()
}

async fn healthz() -> impl IntoResponse {
    axum::Json(serde_json::json!({ "status": "ok" }))
}

async fn readyz(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    match state.store.touch(state.clock.now()).await {
        Ok(()) => (
            StatusCode::OK,
            axum::Json(serde_json::json!({ "status": "ready" })),
        )
            .into_response(),
        Err(err) => {
            tracing::warn!(error = %err, "not ready: database is not writable");
            ApiError::StorageUnavailable.into_response()
        }
    }
}

/// Most bytes hyper buffers per connection (its default is about 400 KiB): bodies are counted
/// against the budget of unverified bytes as they are read, so what waits unread in
/// connections' buffers must stay small; a webhook's headers fit many times over.
const READ_BUFFER: usize = 64 * 1024;

/// Counts the answer to a request on a webhook path, by source (`unknown` for a path no source
/// has: a label per path a stranger makes up would grow without bound).
async fn count_requests(
    State(state): State<Arc<AppState>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let source = state
        .sources
        .load()
        .get(request.uri().path())
        .map_or_else(|| "unknown".to_owned(), |s| s.name.clone());
    let response = next.run(request).await;
    state.metrics.request(&source, response.status().as_u16());
    response
}

/// How long a reading of the delivery queues serves `/metrics`.
const QUEUES_FRESH: Duration = Duration::from_secs(1);

/// `GET /metrics`: the Prometheus text format, to the addresses `[metrics] allowed_ips` lets in.
async fn scrape(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: axum::http::HeaderMap,
) -> Result<axum::response::Response, ApiError> {
    let client = client_ip(peer.ip(), &headers, &state.trusted_proxies)
        .map_err(|_| ApiError::MalformedForwardedFor)?;
    if !state.metrics_allowed.is_empty()
        && !state
            .metrics_allowed
            .iter()
            .any(|net| net.contains(&client))
    {
        return Err(ApiError::IpNotAllowed(client));
    }
    let mut cached = state.queues.lock().await;
    // On the daemon's clock, so a test steps past it; a clock set back is not fresh.
    let now = state.clock.now();
    let fresh = cached
        .as_ref()
        .is_some_and(|(read_at, _)| (*read_at..*read_at + QUEUES_FRESH).contains(&now));
    if !fresh {
        let queues = state.store.queues(now).await.unwrap_or_else(|err| {
            tracing::warn!(error = %err, "cannot read the delivery queues for /metrics");
            Vec::new()
        });
        *cached = Some((now, queues));
    }
    let queues = cached.as_ref().map_or(&[][..], |(_, queues)| queues);
    let text = state.metrics.render(queues, state.store.size_bytes());
    drop(cached);
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            crate::metrics::CONTENT_TYPE,
        )],
        text,
    )
        .into_response())
}

/// Serves `router` on `listener` until `shutdown` resolves, then stops accepting, lets
/// in-flight requests finish (up to `shutdown_timeout`) and returns.
///
/// Served through hyper directly rather than `axum::serve`, which sets no header-read timer:
/// here a client that dribbles its headers is cut off after `header_read_timeout`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    config: &ServerConfig,
    shutdown: impl Future<Output = ()>,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout)
        .max_buf_size(READ_BUFFER);
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Usually EMFILE: back off instead of spinning.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let service = router
            .clone()
            .map_request(move |mut request: axum::extract::Request<_>| {
                request
                    .extensions_mut()
                    .insert(ConnectInfo::<SocketAddr>(peer));
                request
            });
        let connection =
            http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(%peer, error = %err, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tracing::info!("shutting down: finishing in-flight requests");
    if tokio::time::timeout(config.shutdown_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("in-flight requests did not finish within shutdown_timeout");
    }
}
