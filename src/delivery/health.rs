//! Each sink's health as the engine acts on it: which sinks are paused (read from the
//! database every second, so a pause or resume on one replica reaches all), and what a
//! call's outcome does to its sink's streak. A failing sink is announced once per streak, a
//! sink whose outage outlasts `pause_after` is paused, and its first success resumes it; the
//! notices go to [`crate::internal`]. The store decides what a change means
//! ([`crate::store::SinkState::apply`]); this module only says what happened.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use jiff::Timestamp;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::config::internal::InternalConfig;
use crate::dispatch::{NamedSink, Plan};
use crate::metrics::Metrics;
use crate::notice::{Notice, Notices, SinkNews};
use crate::sinks::SinkError;
use crate::store::{Pause, SinkChange, SinkChanged, SinkState, Store, Streak};

/// How often every daemon reads the sinks' states.
const FRESH: Duration = Duration::from_secs(1);

/// How many different recent errors of a sink the daemon keeps to tell.
const RECENT_ERRORS: usize = 3;

/// The sinks that are failing or paused, as last read or changed here.
#[derive(Default)]
pub struct Health {
    states: ArcSwap<HashMap<String, SinkState>>,
    /// Each failing sink's last few different errors seen here (the database keeps the last).
    recent: std::sync::Mutex<HashMap<String, VecDeque<String>>>,
}

impl Health {
    /// `sink`'s pause in force at `now`, if it is paused.
    pub fn paused(&self, sink: &str, now: Timestamp) -> Option<Pause> {
        self.states.load().get(sink)?.paused_at(now).cloned()
    }

    fn is_healthy(&self, sink: &str) -> bool {
        !self.states.load().contains_key(sink)
    }

    /// Keeps `state` as the sink's latest.
    fn put(&self, state: SinkState) {
        self.states.rcu(|states| {
            let mut states = HashMap::clone(states);
            if state.is_healthy() {
                states.remove(&state.sink);
            } else {
                states.insert(state.sink.clone(), state.clone());
            }
            states
        });
    }

    /// Remembers `error` among `sink`'s recent ones (`None`: it delivered, forget them), and
    /// returns them, oldest first.
    fn remember(&self, sink: &str, error: Option<String>) -> Vec<String> {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        let Some(error) = error else {
            recent.remove(sink);
            return Vec::new();
        };
        let errors = recent.entry(sink.to_owned()).or_default();
        errors.retain(|seen| *seen != error);
        errors.push_back(error);
        while errors.len() > RECENT_ERRORS {
            errors.pop_front();
        }
        errors.iter().cloned().collect()
    }

    /// `sink`'s recent errors seen here, oldest first.
    fn recent_of(&self, sink: &str) -> Vec<String> {
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        recent
            .get(sink)
            .map(|errors| errors.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Replaces what is known with what the database holds.
    pub fn replace(&self, states: Vec<SinkState>) {
        let states = states.into_iter().map(|s| (s.sink.clone(), s)).collect();
        self.states.store(Arc::new(states));
    }

    /// Reads the sinks' states every second until `stop`; ends an operator's pause whose
    /// time ran out, and keeps `hookroute_sink_paused` current. What changed since the last
    /// read (an operator's pause or resume, another replica's news) is announced as if seen
    /// here: each announcement is one event however many replicas make it (see
    /// [`crate::internal`]).
    pub async fn keep_fresh(
        self: Arc<Self>,
        (store, plan): (Store, Arc<ArcSwap<Plan>>),
        clock: Arc<dyn Clock>,
        (metrics, notices): (Arc<Metrics>, Arc<Notices>),
        stop: CancellationToken,
    ) {
        loop {
            match store.sink_states().await {
                Ok(mut states) => {
                    let now = clock.now();
                    let plan = plan.load();
                    for state in &mut states {
                        if state.pause.is_some() && state.paused_at(now).is_none() {
                            let resumed = store.change_sink(&state.sink, SinkChange::Resume, now);
                            if let Ok(changed) = resumed.await {
                                *state = changed.after;
                            }
                        }
                    }
                    let known = self.states.load_full();
                    let mut sinks: Vec<&String> =
                        known.keys().chain(states.iter().map(|s| &s.sink)).collect();
                    sinks.sort();
                    sinks.dedup();
                    for sink in sinks {
                        let before = known
                            .get(sink)
                            .cloned()
                            .unwrap_or_else(|| SinkState::healthy(sink));
                        let after = states
                            .iter()
                            .find(|s| &s.sink == sink)
                            .cloned()
                            .unwrap_or_else(|| SinkState::healthy(sink));
                        if before != after {
                            let changed = SinkChanged {
                                before,
                                after,
                                applied: true,
                            };
                            let recent = self.recent_of(sink);
                            announce(&changed, &notices, (&plan.internal, &recent), now);
                        }
                    }
                    metrics.paused_sinks(plan.sinks.keys().map(String::as_str), |sink| {
                        states
                            .iter()
                            .any(|s| s.sink == sink && s.paused_at(now).is_some())
                    });
                    self.replace(states);
                }
                Err(err) => tracing::warn!(error = %err, "cannot read the sinks' states"),
            }
            tokio::select! {
                () = clock.sleep_until(clock.now() + FRESH) => {}
                () = stop.cancelled() => return,
            }
        }
    }

    /// Records what a call to `sink` came to at `now`, and tells what it changed. A call
    /// that carried only hookroute's own events does not count its failure: the alert about
    /// a failing sink must not make the sink look failing (or keep it so). Returns whether
    /// the sink is paused now: its jobs' transient failures then use no attempts.
    pub(super) async fn after_call(
        &self,
        (store, notices, internal): (&Store, &Notices, &InternalConfig),
        sink: &NamedSink,
        result: Result<(), &SinkError>,
        own_only: bool,
        now: Timestamp,
    ) -> bool {
        let change = match result {
            Ok(()) if self.is_healthy(&sink.name) => return false,
            Ok(()) => SinkChange::Succeeded,
            Err(_) if own_only => return self.paused(&sink.name, now).is_some(),
            Err(err) => SinkChange::Failed {
                error: err.to_string(),
                transient: !matches!(err, SinkError::Permanent { .. }),
                pause_after: sink.delivery.pause_after(),
                probe_interval: sink.delivery.probe_interval.0,
            },
        };
        let recent = match &change {
            SinkChange::Failed { error, .. } => self.remember(&sink.name, Some(error.clone())),
            _ => self.remember(&sink.name, None),
        };
        match store.change_sink(&sink.name, change, now).await {
            Ok(changed) => {
                announce(&changed, notices, (internal, &recent), now);
                let paused = changed.after.paused_at(now).is_some();
                self.put(changed.after);
                paused
            }
            Err(err) => {
                tracing::warn!(sink = %sink.name, error = %err, "cannot record the sink's health");
                self.paused(&sink.name, now).is_some()
            }
        }
    }

    /// Claims `sink`'s next probe at `now` if it is paused by hookroute and one is due.
    /// `None`: not paused; `Some(false)`: paused, and no attempt may be made now.
    pub(super) async fn probe(
        &self,
        store: &Store,
        sink: &NamedSink,
        now: Timestamp,
    ) -> Option<bool> {
        let pause = self.paused(&sink.name, now)?;
        if !pause.auto || pause.next_probe > now {
            return Some(false);
        }
        let interval = sink.delivery.probe_interval.0;
        match store
            .change_sink(&sink.name, SinkChange::Probe { interval }, now)
            .await
        {
            Ok(changed) => {
                let claimed = changed.applied;
                self.put(changed.after);
                Some(claimed)
            }
            Err(err) => {
                tracing::warn!(sink = %sink.name, error = %err, "cannot claim a probe of a paused sink");
                Some(false)
            }
        }
    }
}

/// Logs and tells what `changed` means: a streak that became failing (by `internal`'s
/// threshold), a pause, a recovery or a resume.
fn announce(
    changed: &SinkChanged,
    notices: &Notices,
    (internal, recent): (&InternalConfig, &[String]),
    now: Timestamp,
) {
    let SinkChanged { before, after, .. } = changed;
    let sink = &after.sink;
    let threshold = (internal.failing_after_attempts, internal.failing_after);
    let failing = |state: &SinkState| {
        state
            .streak
            .as_ref()
            .is_some_and(|s| is_failing(s, threshold))
    };
    if let Some(streak) = &after.streak
        && failing(after)
        && !failing(before)
    {
        tracing::warn!(%sink, failures = streak.failures, since = %streak.since, error = %streak.last_error, "sink failing");
        notices.send(Notice::SinkFailing(news(sink, streak, recent)), now);
    }
    if let Some(pause) = after.paused_at(now)
        && before.pause.as_ref().is_none_or(|p| p.since != pause.since)
    {
        tracing::warn!(%sink, by = %pause.by, comment = %pause.comment, "sink paused: its jobs wait");
        let news = after
            .streak
            .as_ref()
            .map_or_else(|| quiet_news(sink, pause.since), |s| news(sink, s, recent));
        let (by, comment, until) = (pause.by.clone(), pause.comment.clone(), pause.until);
        notices.send(
            Notice::SinkPaused {
                news,
                at: pause.since,
                by,
                comment,
                until,
            },
            now,
        );
    }
    let ended = |old: bool, new: bool| old && !new;
    if ended(before.pause.is_some(), after.pause.is_some())
        || ended(failing(before), after.streak.is_some())
    {
        let by = match &before.pause {
            Some(pause) if !pause.auto => "the operator's pause ended",
            _ => "delivering again",
        };
        tracing::info!(%sink, %by, "sink recovered");
        let news = match (&before.streak, &before.pause) {
            (Some(streak), _) => news(sink, streak, recent),
            (None, Some(pause)) => quiet_news(sink, pause.since),
            (None, None) => return,
        };
        let paused = before.pause.is_some();
        notices.send(
            Notice::SinkRecovered {
                news,
                paused,
                by: by.to_owned(),
            },
            now,
        );
    }
}

/// Whether `streak` has lasted `attempts` calls or `time`.
fn is_failing(streak: &Streak, (attempts, time): (u32, Duration)) -> bool {
    streak.failures >= attempts
        || Duration::try_from(streak.last_at.duration_since(streak.since)).is_ok_and(|d| d >= time)
}

fn news(sink: &str, streak: &Streak, recent: &[String]) -> SinkNews {
    SinkNews {
        sink: sink.to_owned(),
        since: streak.since,
        failures: streak.failures,
        last_error: streak.last_error.clone(),
        recent_errors: recent.to_vec(),
    }
}

/// News of a sink paused or resumed by an operator while it was not failing.
fn quiet_news(sink: &str, since: Timestamp) -> SinkNews {
    SinkNews {
        sink: sink.to_owned(),
        since,
        failures: 0,
        last_error: String::new(),
        recent_errors: Vec::new(),
    }
}
