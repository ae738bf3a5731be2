//! hookroute: receives compliance webhooks, verifies and deduplicates them, stores each durably
//! before answering, and dispatches it to sinks.
//!
//! A delivery's way through the crate, and where to look:
//!
//! - [`http`]: the router, the ingest handler (checks, then the signature on the raw bytes,
//!   via [`signature`]; then [`event`] normalises the body), health endpoints, the server loop.
//! - [`intake`]: the one step after HTTP: route the event ([`dispatch`], over [`rules`]),
//!   store it with its routing outcome ([`store`]), hand its new jobs to [`delivery`].
//! - [`delivery`]: the engine that turns due jobs into attempts at [`sinks`], with messages
//!   from [`templates`] and the retry decisions of `delivery::retry`.
//! - [`config`]: the TOML file, validated into the [`config::Config`] everything is built
//!   from; [`cli`]: the commands, the operator's tools among them.
//! - [`internal`]: the daemon's own events (`hookroute.*`), made from what the others
//!   [`notice`] (a sink failing, a dead letter, a bad signature, a failed reload) and accepted
//!   through [`intake`] like a sender's.
//! - Leaves any module may use: [`duration`], [`secret`], [`clock`], [`private`] (file modes),
//!   [`text`] (a stranger's text made safe to keep, print and log), [`notice`].
//!
//! Dependencies point one way, and a test (`tests/it/layout.rs`) keeps it so: `cli` and
//! `http` → `intake` → `dispatch`, `store`, `delivery`; `delivery` → `dispatch`, `store`,
//! `sinks`, `templates`; `dispatch` → `config`, `sinks`, `store` (the routing decision's
//! types); `config` → `rules`, `sinks`, `signature`, `templates`; `store` → `config` (its
//! settings), `rules` (throttle windows are kept with the events), `metrics` (the queue
//! gauges' type); `sinks` → `signature` (the http sink signs), `templates`.
//! Sinks never see HTTP requests or the database; `rules`, `signature`, `event` and
//! `templates` do no I/O.

// The library is the daemon's own internals, documented for the people who work on it
// (`cargo doc --document-private-items`): module docs may point at private items.
#![allow(rustdoc::private_intra_doc_links)]

pub mod actions;
pub mod api;
pub mod cli;
pub mod clock;
pub mod config;
pub mod delivery;
pub mod dispatch;
pub mod duration;
pub mod enrich;
pub mod event;
pub mod explain;
pub mod http;
pub mod intake;
pub mod internal;
pub mod metrics;
pub mod notice;
pub mod private;
pub mod reconcile;
pub mod rules;
pub mod secret;
pub mod signature;
pub mod silence;
pub mod sinks;
pub mod store;
pub mod templates;
pub mod text;
pub mod web;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use arc_swap::ArcSwap;
use config::Config;
use config::StorageConfig;
use delivery::Engine;
use dispatch::Plan;
use store::{Prunable, Store, StoreError};

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A sink's client could not be built.
    #[error("{0}")]
    Sink(String),
    /// The status page's listener could not be opened.
    #[error("admin.listen {addr}: {source}")]
    Admin {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// How often idle rate-limiter entries are dropped.
const LIMITER_UPKEEP: Duration = Duration::from_secs(10);
/// How often expired dedupe records are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// Records looked at per pruning step, at most; a step also ends after a few milliseconds
/// (see `store::sqlite::retention`).
const PRUNE_STEP: usize = 256;
/// Free pages (4 KiB each) returned to the file system per step.
const RECLAIM_STEP: usize = 64;
/// How many times as long as a pruning step took the next one waits.
const PRUNE_PACE: u32 = 9;
/// How long a closed throttle window is kept, behind the newest window's start.
const THROTTLE_MARGIN: Duration = Duration::from_secs(24 * 3600);

/// Runs the daemon on `listener` until `shutdown` resolves; then drains in-flight requests,
/// stops the delivery engine and flushes the database writer.
///
/// # Errors
/// [`RunError`] when the database cannot be opened or a sink cannot be built.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    run_with_clock(config, listener, shutdown, Arc::new(clock::SystemClock)).await
}

/// [`run`] on `clock`: the time by which deliveries are received and jobs come due. Tests
/// drive the daemon in-process with a clock they move.
///
/// # Errors
/// As [`run`].
pub async fn run_with_clock(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    clock: Arc<dyn clock::Clock>,
) -> Result<(), RunError> {
    let Parts {
        app,
        store,
        engine,
        plan,
        metrics,
        silences,
        health,
        notices,
        internal,
    } = assemble(&config, Arc::clone(&clock)).await?;
    let stop = CancellationToken::new();
    // Stopped last, after everything that may notice something: it tells what they did.
    let internal_stop = CancellationToken::new();
    let internal = tokio::spawn(internal::run(
        internal,
        (app.intake(), store.clone()),
        Arc::clone(&plan),
        Arc::clone(&metrics),
        internal_stop.clone(),
    ));
    let reconcilers = Arc::new(reconcile::Reconcilers::start(
        &config,
        reconcile::Context {
            intake: app.intake(),
            plan: Arc::clone(&plan),
            store: store.clone(),
            clock: Arc::clone(&clock),
            metrics: Arc::clone(&metrics),
            notices: Arc::clone(&notices),
            stop: stop.clone(),
        },
    ));
    let health = tokio::spawn(health.keep_fresh(
        (store.clone(), Arc::clone(&plan)),
        Arc::clone(&clock),
        (Arc::clone(&metrics), Arc::clone(&notices)),
        stop.clone(),
    ));
    let silences = tokio::spawn(silences.keep_fresh(
        store.clone(),
        Arc::clone(&clock),
        Arc::clone(&metrics),
        stop.clone(),
    ));
    let watchdog = tokio::spawn(watchdog(
        store.clone(),
        Arc::clone(&clock),
        engine.heartbeat(),
        stop.clone(),
    ));
    let engine = tokio::spawn(engine.run(stop.clone()));
    let upkeep = tokio::spawn(upkeep(
        app.clone(),
        store.clone(),
        config.storage.clone(),
        Arc::clone(&clock),
        stop.clone(),
    ));
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    // The configuration in force, for the status page; replaced whole on reload.
    let live = Arc::new(ArcSwap::from_pointee(config.clone()));
    let reloader = tokio::spawn(reload_on_hangup(
        Arc::clone(&live),
        (app.clone(), Arc::clone(&reconcilers)),
        plan,
        (Arc::clone(&metrics), Arc::clone(&notices)),
        Arc::clone(&clock),
        stop.clone(),
    ));
    notices.send(
        notice::Notice::Started {
            version: env!("CARGO_PKG_VERSION"),
        },
        clock.now(),
    );

    let page = match &config.admin {
        Some(admin) => {
            let state = web::WebState::new(
                Arc::clone(&live),
                Arc::clone(&metrics),
                admin.clone(),
                Arc::clone(&clock),
            )?;
            let listener =
                TcpListener::bind(admin.listen)
                    .await
                    .map_err(|source| RunError::Admin {
                        addr: admin.listen,
                        source,
                    })?;
            let (server, stop) = (config.server.clone(), stop.clone());
            Some(tokio::spawn(async move {
                web::serve(listener, state, &server, stop.cancelled_owned()).await;
            }))
        }
        None => None,
    };
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, sources = config.sources.len(), sinks = config.sinks.len(), "listening");
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    // shutdown_timeout counts from the signal, for the requests and the attempts together.
    let signalled = Arc::new(std::sync::OnceLock::new());
    let shutdown = {
        let signalled = Arc::clone(&signalled);
        let (notices, clock) = (Arc::clone(&notices), Arc::clone(&clock));
        async move {
            shutdown.await;
            let _ = signalled.set(tokio::time::Instant::now());
            notices.send(notice::Notice::Stopping, clock.now());
        }
    };
    http::serve(listener, app.router(), &config.server, shutdown).await;
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);

    stop.cancel();
    if let Some(page) = page {
        let _ = page.await;
    }
    let _ = silences.await;
    reconcilers.stopped().await;
    let _ = health.await;
    let _ = upkeep.await;
    let _ = reloader.await;
    let _ = watchdog.await;
    if let Ok(attempts) = engine.await {
        let since = signalled
            .get()
            .copied()
            .unwrap_or_else(tokio::time::Instant::now);
        delivery::drain(attempts, since + config.server.shutdown_timeout).await;
    }
    internal_stop.cancel();
    let _ = internal.await;
    store.close().await;
    tracing::info!("stopped");
    Ok(())
}

/// The daemon's parts, wired together: what [`run`] serves and runs, and what a test drives
/// without a socket (the router through `tower::ServiceExt::oneshot`, the store through its
/// contract).
pub struct Parts {
    pub app: http::App,
    pub store: Store,
    /// Not yet running: [`Engine::run`] starts it.
    pub engine: Engine,
    pub plan: Arc<ArcSwap<Plan>>,
    pub metrics: Arc<metrics::Metrics>,
    /// Not yet kept fresh: [`silence::Silences::keep_fresh`] does.
    pub silences: Arc<silence::Silences>,
    /// Not yet kept fresh: [`delivery::Health::keep_fresh`] does.
    pub health: Arc<delivery::Health>,
    pub notices: Arc<notice::Notices>,
    /// What [`internal::run`] turns into events.
    pub internal: tokio::sync::mpsc::Receiver<(notice::Notice, jiff::Timestamp)>,
}

/// Builds the sinks, opens the database and wires ingest to the engine, on `clock`.
///
/// # Errors
/// As [`run`].
pub async fn assemble(config: &Config, clock: Arc<dyn clock::Clock>) -> Result<Parts, RunError> {
    let plan = Arc::new(ArcSwap::from_pointee(
        Plan::build(config).map_err(RunError::Sink)?,
    ));
    let store = store::open(&config.storage).await?;
    let metrics = Arc::new(metrics::Metrics::new());
    metrics.config_loaded(true, clock.now());
    configure_metrics(&metrics, config);
    let new_jobs = Arc::new(delivery::NewJobs::default());
    // Read once before the first request, so a restart never lets a silenced event through.
    let silences = Arc::new(silence::Silences::default());
    silences.replace(store.silences(clock.now()).await?);
    let health = Arc::new(delivery::Health::default());
    health.replace(store.sink_states().await?);
    let (notices, internal) = notice::Notices::new();
    let notices = Arc::new(notices);
    let shared = (
        Arc::clone(&silences),
        Arc::clone(&health),
        Arc::clone(&notices),
    );
    let engine = Engine::new(
        store.clone(),
        Arc::clone(&plan),
        Arc::clone(&new_jobs),
        Arc::clone(&clock),
        Arc::clone(&metrics),
        shared.clone(),
    );
    let intake = intake::Intake::new(
        store.clone(),
        Arc::clone(&plan),
        new_jobs,
        Arc::clone(&metrics),
        shared,
    );
    let app = http::App::new(config, store.clone(), intake, clock, Arc::clone(&metrics));
    Ok(Parts {
        app,
        store,
        engine,
        plan,
        metrics,
        silences,
        health,
        notices,
        internal,
    })
}

/// Pings systemd's watchdog (`WatchdogSec=` in the unit) only while the daemon does its work:
/// every half interval, the database writer must commit and flush a write, and the delivery
/// engine must have turned. A wedged writer or engine stops the pings, and systemd restarts
/// the service; a merely slow one gets the other half of the interval.
async fn watchdog(
    store: Store,
    clock: Arc<dyn clock::Clock>,
    engine: Arc<AtomicU64>,
    stop: CancellationToken,
) {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return;
    };
    let period = interval / 2;
    let mut last_turn = engine.load(Ordering::Relaxed);
    loop {
        tokio::select! {
            () = tokio::time::sleep(period) => {}
            () = stop.cancelled() => return,
        }
        let writer = matches!(
            tokio::time::timeout(period, store.touch(clock.now())).await,
            Ok(Ok(()))
        );
        let turn = engine.load(Ordering::Relaxed);
        let engine_moved = turn != last_turn;
        last_turn = turn;
        if writer && engine_moved {
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
        } else {
            tracing::warn!(
                writer,
                engine = engine_moved,
                "no progress: not pinging the watchdog"
            );
        }
    }
}

/// Exports `config`'s sources and sinks from 0 (see [`metrics::Metrics::configured`]).
fn configure_metrics(metrics: &metrics::Metrics, config: &Config) {
    metrics.configured(
        config.sources.iter().map(|s| s.name.as_str()),
        config.sinks.iter().map(|s| s.name.as_str()),
    );
}

/// Re-reads the configuration on SIGHUP (`systemctl reload`). A valid one replaces sources,
/// sinks, routes and templates; deliveries in flight finish with what they started with. An
/// invalid one is logged and the running configuration stays.
async fn reload_on_hangup(
    live: Arc<ArcSwap<Config>>,
    (app, reconcilers): (http::App, Arc<reconcile::Reconcilers>),
    plan: Arc<ArcSwap<Plan>>,
    (metrics, notices): (Arc<metrics::Metrics>, Arc<notice::Notices>),
    clock: Arc<dyn clock::Clock>,
    stop: CancellationToken,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hangup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP: reloading is off");
        return;
    };
    loop {
        tokio::select! {
            _ = hangup.recv() => {}
            () = stop.cancelled() => return,
        }
        // Off the runtime's workers: reading the files and building the sinks' clients is
        // blocking work, and however long it takes, requests, /healthz and a SIGTERM go on.
        let running = live.load_full();
        let file = running.file.clone();
        let previous = plan.load_full();
        let loading = tokio::task::spawn_blocking(move || {
            config::load(&file)
                .map_err(|e| e.to_string())
                .and_then(|new| {
                    let plan = Plan::rebuild(&new, Some(&previous))?;
                    Ok((new, plan))
                })
        });
        let loaded = tokio::select! {
            loaded = loading => loaded.unwrap_or_else(|err| Err(format!("the reload failed: {err}"))),
            () = stop.cancelled() => return,
        };
        match loaded {
            Ok((new, new_plan)) => {
                if (&new.server, &new.storage, &new.metrics, new.log)
                    != (
                        &running.server,
                        &running.storage,
                        &running.metrics,
                        running.log,
                    )
                {
                    tracing::warn!(
                        "[server], [storage], [metrics] and [log] changes take effect at the next restart"
                    );
                }
                for warning in new.warnings() {
                    tracing::warn!("{warning}");
                }
                app.reload(&new);
                metrics.config_loaded(true, clock.now());
                configure_metrics(&metrics, &new);
                plan.store(Arc::new(new_plan));
                // After the plan: the tasks take its API clients.
                reconcilers.reload(&new);
                let (sources, sinks, routes) = (
                    new.sources.len(),
                    new.sinks.len(),
                    new.routing.table.routes().len(),
                );
                live.store(Arc::new(new));
                tracing::info!(sources, sinks, routes, "configuration reloaded");
                let reloaded = notice::Notice::Reloaded {
                    sources,
                    sinks,
                    routes,
                };
                notices.send(reloaded, clock.now());
            }
            Err(err) => {
                metrics.config_loaded(false, clock.now());
                tracing::error!("reload failed, keeping the running configuration: {err}");
                let failed = notice::Notice::ReloadFailed { problems: err };
                notices.send(failed, clock.now());
            }
        }
    }
}

/// Periodic housekeeping: the rate limiter's memory, and (a task of its own, since a backlog
/// can take minutes) the retention of dedupe records, events and throttle windows.
async fn upkeep(
    app: http::App,
    store: Store,
    storage: StorageConfig,
    clock: Arc<dyn clock::Clock>,
    stop: CancellationToken,
) {
    let retention = tokio::spawn(retention(store, storage, clock, stop.clone()));
    let mut tick = tokio::time::interval(LIMITER_UPKEEP);
    loop {
        tokio::select! {
            _ = tick.tick() => app.maintain(),
            () = stop.cancelled() => break,
        }
    }
    let _ = retention.await;
}

/// Prunes at start-up and then every [`PRUNE_EVERY`] on `clock` (so a test moves a month
/// on instead of shortening the retention to seconds), until `stop`.
async fn retention(
    store: Store,
    storage: StorageConfig,
    clock: Arc<dyn clock::Clock>,
    stop: CancellationToken,
) {
    loop {
        // The next pass is due an interval after this one began, not after it ended: a clock
        // moved on during a pass (a long backlog, a test stepping days) brings the next one
        // forward instead of skipping the time it moved over.
        let began = clock.now();
        for (what, keep) in [
            (Prunable::Dedupe, storage.dedupe_retention),
            (Prunable::Events, storage.event_retention),
            // A day past the newest window, on the events' clock: margin for late events.
            (Prunable::Throttles, THROTTLE_MARGIN),
            // Ended silences are kept as long as the events they may have silenced.
            (Prunable::Silences, storage.event_retention),
        ] {
            if prune(&store, &*clock, what, keep, &stop).await.is_err() {
                return; // stopping
            }
        }
        tokio::select! {
            () = clock.sleep_until(began + PRUNE_EVERY) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// Waits `paced` times as long as a step that began at `started` took, so that pruning takes
/// at most a tenth of the writer's time; `Err` if the daemon stops meanwhile.
async fn pause(started: tokio::time::Instant, stop: &CancellationToken) -> Result<(), ()> {
    tokio::select! {
        () = tokio::time::sleep(started.elapsed() * PRUNE_PACE) => Ok(()),
        () = stop.cancelled() => Err(()),
    }
}

/// Prunes `what` older than `keep`, a small step per write with a pause after each (see
/// [`pause`]): a backlog of expired records (after the retention was shortened, say) then
/// never holds the writer for long, and a request waits at most one step for it. Then
/// returns the space freed, in the same way. `Err` if the daemon stops meanwhile.
async fn prune(
    store: &Store,
    clock: &dyn clock::Clock,
    what: Prunable,
    keep: Duration,
    stop: &CancellationToken,
) -> Result<(), ()> {
    let (mut pruned, mut from) = (0, 0);
    loop {
        let started = tokio::time::Instant::now();
        match store.prune(what, keep, from, PRUNE_STEP, clock.now()).await {
            Ok(step) => {
                pruned += step.removed;
                let Some(next) = step.next else { break };
                from = next;
            }
            Err(err) => {
                tracing::warn!(?what, error = %err, "cannot prune");
                break;
            }
        }
        pause(started, stop).await?;
    }
    if pruned == 0 {
        return Ok(());
    }
    tracing::info!(?what, pruned, "pruned expired records");
    let mut returning = false;
    loop {
        let started = tokio::time::Instant::now();
        match store.reclaim(RECLAIM_STEP).await {
            Ok(0) => break,
            Ok(_) => returning = true,
            Err(err) => {
                tracing::warn!(error = %err, "cannot return free space to the file system");
                break;
            }
        }
        pause(started, stop).await?;
    }
    if returning {
        tracing::info!(?what, "returned the freed space to the file system");
    }
    Ok(())
}
