//! Reconcile: what the sender did that no webhook brought. A ComplianceLayer source with an
//! API lists its scans (`/scan/history`) and alerts (`/domains/alerts`); each completed scan
//! or alert no stored event covers becomes the event its webhook would have carried (see
//! [`synth`]), marked `origin = "reconcile"`, and is accepted like a delivery: stored,
//! routed, delivered once.
//!
//! Each source's task looks every few seconds whether a pass is due; the database decides
//! ([`Storage::begin_pass`](crate::store::Storage::begin_pass)), so on PostgreSQL one replica
//! passes at a time and the API hears from the cluster once an interval. A pass is due when
//! the task starts, when the interval has passed since anyone's last, and when an operator
//! asks (`hookroute reconcile --once`). A key the API refuses stops every daemon's passes
//! until a reload (or an operator's request) and says so (`hookroute.reconcile.failing`).

mod synth;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::Timestamp;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::api::{Api, ApiError};
use crate::clock::Clock;
use crate::config::Config;
use crate::config::api::ApiConfig;
use crate::intake::{Accepted, Intake};
use crate::metrics::Metrics;
use crate::notice::{Notice, Notices};
use crate::store::passes::{OK, REFUSED};
use crate::store::{PassEnd, Schedule, Store, StoreError};
pub use synth::{ORIGIN, alert_key, alert_triggered, key_like_reconcile, scan_completed, scan_key};

/// How often a task asks the database whether a pass is due: how soon an operator's
/// `--once` is taken up.
const LOOK: Duration = Duration::from_secs(2);
/// How many delivery ids a pass's record names; the count says the rest.
const NAMED: usize = 20;

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Pass {
    /// Entries the API listed.
    pub listed: usize,
    /// Events made from them, by delivery id and type: none of them was stored before.
    pub reconciled: Vec<(String, String)>,
    /// Entries a stored event (a webhook's, or an earlier pass's) already covered.
    pub covered: usize,
}

impl std::fmt::Display for Pass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "listed {}, reconciled {}, already stored {}",
            self.listed,
            self.reconciled.len(),
            self.covered
        )?;
        let ids: Vec<&str> = self.reconciled.iter().map(|(id, _)| id.as_str()).collect();
        if !ids.is_empty() {
            write!(f, ": {}", ids[..ids.len().min(NAMED)].join(", "))?;
            if ids.len() > NAMED {
                write!(f, " and {} more", ids.len() - NAMED)?;
            }
        }
        Ok(())
    }
}

/// Why a pass stopped.
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("cannot store a reconciled event: {0}")]
    Store(#[from] StoreError),
}

impl PassError {
    /// The outcome a pass's record and metric give it.
    fn outcome(&self) -> &'static str {
        match self {
            Self::Api(ApiError::Refused { .. }) => REFUSED,
            Self::Api(ApiError::RateLimited { .. }) => "rate_limited",
            Self::Api(_) | Self::Store(_) => "failed",
        }
    }
}

/// An event a pass would synthesise, and the body it was read from (what is stored).
#[derive(Debug)]
pub struct Synthesised {
    pub event: crate::event::Event,
    pub body: String,
}

/// What the API lists for `source`, from `since` on (see [`crate::store::passes::since`]), as
/// the events their webhooks would have carried, and how many entries it listed. Older
/// entries are left: their dedupe records may have been pruned, or their webhooks stored
/// under another key.
///
/// # Errors
/// The first call the API refused or failed.
pub async fn synthesise(
    api: &Api,
    source: &str,
    since: Option<Timestamp>,
) -> Result<(Vec<Synthesised>, usize), ApiError> {
    let scans = api.history().await?;
    let alerts = api.alerts().await?;
    let listed = scans.len() + alerts.len();
    let events = scans
        .iter()
        .filter_map(scan_completed)
        .chain(alerts.iter().filter_map(alert_triggered))
        .filter_map(|body| {
            let body = body.to_string();
            let event = crate::event::Event::parse(source, body.as_bytes(), None, None).ok()?;
            if let (Some(since), Some(at)) = (since, event.occurred_at)
                && at < since
            {
                return None;
            }
            Some(Synthesised { event, body })
        })
        .collect();
    Ok((events, listed))
}

/// One pass for `source`: each event [`synthesise`] makes is accepted through `intake`. The
/// dedupe index decides what is covered, as it does for a sender's retry, so a pass and a
/// webhook racing each other still store one event.
///
/// # Errors
/// The first call the API refused or failed, or a store that did not answer; what was
/// accepted before it stays accepted.
pub async fn pass(
    api: &Api,
    source: &str,
    intake: &Intake,
    since: Option<Timestamp>,
    now: Timestamp,
) -> Result<Pass, PassError> {
    let (events, listed) = synthesise(api, source, since).await?;
    let mut done = Pass {
        listed,
        ..Pass::default()
    };
    for Synthesised { event, body } in events {
        let about = (event.delivery_id.clone(), event.event_type.clone());
        match intake.accept(event, body.as_bytes(), now).await? {
            Accepted::New { .. } => done.reconciled.push(about),
            Accepted::Duplicate(_) => done.covered += 1,
        }
    }
    Ok(done)
}

/// What every reconcile task shares.
#[derive(Clone)]
pub struct Context {
    pub intake: Intake,
    /// Whose API clients the tasks use: one per source, shared with enrichment.
    pub plan: Arc<arc_swap::ArcSwap<crate::dispatch::Plan>>,
    pub store: Store,
    pub clock: Arc<dyn Clock>,
    pub metrics: Arc<Metrics>,
    pub notices: Arc<Notices>,
    /// The daemon's stop.
    pub stop: CancellationToken,
}

/// A source's running task.
struct Task {
    settings: ApiConfig,
    /// Set when the API refused the key: a reload begins the task afresh, even unchanged (the
    /// key may have been re-enabled on the sender's side).
    refused: Arc<AtomicBool>,
    stop: CancellationToken,
    handle: JoinHandle<()>,
}

/// The reconcile tasks, one per source with an API and an interval (`[sources.<name>.api]`),
/// restarted by a reload that changes a source's settings or finds its key refused.
pub struct Reconcilers {
    context: Context,
    tasks: Mutex<HashMap<String, Task>>,
}

impl Reconcilers {
    /// Starts a task for each source of `config` that reconciles.
    pub fn start(config: &Config, context: Context) -> Self {
        let reconcilers = Self {
            context,
            tasks: Mutex::default(),
        };
        reconcilers.reload(config);
        reconcilers
    }

    /// Brings the tasks in line with `config`: starts new ones, stops those of sources that
    /// no longer reconcile, restarts those whose settings changed or whose key was refused.
    pub fn reload(&self, config: &Config) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        let wanted: HashMap<&str, &ApiConfig> = config
            .sources
            .iter()
            .filter_map(|source| {
                let api = source.api.as_ref()?;
                api.reconcile.map(|_| (source.name.as_str(), api))
            })
            .collect();
        tasks.retain(|name, task| {
            let keep = wanted.get(name.as_str()) == Some(&&task.settings)
                && !task.refused.load(Ordering::Relaxed)
                && !task.handle.is_finished();
            if !keep {
                task.stop.cancel();
            }
            keep
        });
        for (name, settings) in wanted {
            if tasks.contains_key(name) {
                continue;
            }
            // The plan's client, shared with enrichment (the plan was built with this config).
            let Some(api) = self.context.plan.load().enricher.api(name) else {
                continue;
            };
            let stop = self.context.stop.child_token();
            let refused = Arc::new(AtomicBool::new(false));
            let handle = tokio::spawn(run(
                api,
                (name.to_owned(), settings.clone()),
                (self.context.clone(), Arc::clone(&refused)),
                stop.clone(),
            ));
            let task = Task {
                settings: settings.clone(),
                refused,
                stop,
                handle,
            };
            tasks.insert(name.to_owned(), task);
        }
    }

    /// Waits for every task to end (once the daemon's stop is cancelled).
    pub async fn stopped(&self) {
        let tasks: Vec<Task> = {
            let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
            tasks.drain().map(|(_, task)| task).collect()
        };
        for task in tasks {
            task.stop.cancel();
            let _ = task.handle.await;
        }
    }
}

/// Reconciles `source` whenever the database says a pass is due, until `stop`. After a
/// refused key the database says so only when an operator asks (see [`PassRow::due`]).
///
/// [`PassRow::due`]: crate::store::PassRow::due
async fn run(
    api: Arc<Api>,
    (source, settings): (String, ApiConfig),
    (cx, refused): (Context, Arc<AtomicBool>),
    stop: CancellationToken,
) {
    let schedule = Schedule {
        every: settings.reconcile.unwrap_or(Duration::MAX),
        // Two requests, and room for the store: a daemon that dies in a pass holds it no longer.
        hold: settings.timeout * 2 + Duration::from_secs(30),
        since: cx.clock.now(),
    };
    loop {
        match cx.store.begin_pass(&source, schedule, cx.clock.now()).await {
            Ok(Some(begun)) => {
                tracing::debug!(source, ?begun, "reconcile pass begins");
                let floor = if begun.first {
                    cx.store.newest_seen(&source).await.unwrap_or_else(|err| {
                        tracing::warn!(source, error = %err, "cannot read the newest delivery stored; the first pass looks back its whole lookback");
                        None
                    })
                } else {
                    None
                };
                let since = crate::store::passes::since(settings.lookback, cx.clock.now(), floor);
                let ok = turn(&api, &source, since, &cx).await;
                refused.store(!ok, Ordering::Relaxed);
            }
            Ok(None) => {}
            Err(err) => {
                tracing::warn!(source, error = %err, "cannot ask the database whether a reconcile pass is due")
            }
        }
        tokio::select! {
            () = cx.clock.sleep_until(cx.clock.now() + LOOK) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// One pass begun by this daemon, recorded, counted and logged; false when the key was
/// refused.
async fn turn(api: &Api, source: &str, since: Option<Timestamp>, cx: &Context) -> bool {
    let result = pass(api, source, &cx.intake, since, cx.clock.now()).await;
    let now = cx.clock.now();
    let end = match &result {
        Ok(done) => {
            for (_, event_type) in &done.reconciled {
                cx.metrics.reconciled(source, event_type);
            }
            cx.metrics.reconcile_run(source, OK, Some(now));
            tracing::info!(
                source,
                listed = done.listed,
                reconciled = done.reconciled.len(),
                covered = done.covered,
                "reconciled with the sender's API"
            );
            PassEnd {
                outcome: OK,
                detail: done.to_string(),
            }
        }
        Err(err) => {
            let outcome = err.outcome();
            cx.metrics.reconcile_run(source, outcome, None);
            if outcome == REFUSED {
                tracing::error!(source, error = %err, "reconcile stops until the configuration is reloaded (or `hookroute reconcile --once`)");
            } else {
                tracing::warn!(source, error = %err, "reconcile pass failed; trying again at the next");
            }
            PassEnd {
                outcome,
                detail: err.to_string(),
            }
        }
    };
    let refused = end.outcome == REFUSED;
    if refused {
        let notice = Notice::ReconcileFailing {
            source: source.to_owned(),
            error: end.detail.clone(),
        };
        cx.notices.send(notice, now);
    }
    if let Err(err) = cx.store.end_pass(source, end, now).await {
        tracing::warn!(source, error = %err, "cannot record the end of a reconcile pass");
    }
    !refused
}
