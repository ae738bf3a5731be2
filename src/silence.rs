//! Silences applied: which (event, route, sink) a silence keeps quiet, and the set every
//! daemon holds in memory, read again from the database each second ([`Silences::keep_fresh`]),
//! so an `add` or `expire` reaches every replica within one. Applied when an event is routed
//! ([`crate::intake`]) and when a job comes due ([`crate::delivery`]), never to replays.
//!
//! A silence matches when every matcher it has matches: the route's and sink's names, the
//! event's source, a glob over its type, and a CEL condition as routes have (`--when`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use globset::{Glob, GlobMatcher};
use jiff::Timestamp;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::event::Event;
use crate::metrics::Metrics;
use crate::rules::Condition;
use crate::store::{Matchers, Silence, SilenceState, Store};

/// How often each daemon reads the silences again.
pub const REFRESH: Duration = Duration::from_secs(1);

/// A silence with its glob and condition compiled.
#[derive(Debug)]
pub struct Compiled {
    pub silence: Silence,
    event_type: Option<GlobMatcher>,
    when: Option<Condition>,
    broken: bool,
}

/// Checks matchers as `silence add` takes them: at least one, and the glob and the condition
/// compile.
///
/// # Errors
/// Each problem, naming the flag (`--when: line 1, column 7: …`).
pub fn check(matchers: &Matchers) -> Result<(), Vec<String>> {
    let mut problems = Vec::new();
    if matchers.is_empty() {
        problems.push(
            "say what to silence: at least one of --route, --sink, --source, --type, --when"
                .to_owned(),
        );
    }
    if let Err(found) = compile(matchers) {
        problems.extend(found);
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

/// The type glob and the condition of `matchers`, compiled.
///
/// # Errors
/// Each that does not compile, naming its flag.
fn compile(matchers: &Matchers) -> Result<(Option<GlobMatcher>, Option<Condition>), Vec<String>> {
    let glob = matchers.event_type.as_deref().map(Glob::new).transpose();
    let when = matchers.when.as_deref().map(Condition::compile).transpose();
    match (glob, when) {
        (Ok(glob), Ok(when)) => Ok((glob.map(|glob| glob.compile_matcher()), when)),
        (glob, when) => Err(glob
            .err()
            .map(|err| format!("--type: {err}"))
            .into_iter()
            .chain(when.err().map(|err| format!("--when: {err}")))
            .collect()),
    }
}

impl Compiled {
    /// A stored silence, ready to match. One whose glob or condition no longer compiles (the
    /// database was edited by hand) matches nothing, and says so once.
    pub fn new(silence: Silence) -> Self {
        match compile(&silence.matchers) {
            Ok((event_type, when)) => Self {
                event_type,
                when,
                broken: false,
                silence,
            },
            Err(problems) => {
                tracing::warn!(
                    silence = silence.id,
                    problems = %problems.join("; "),
                    "a silence does not compile; it matches nothing"
                );
                Self {
                    event_type: None,
                    when: None,
                    broken: true,
                    silence,
                }
            }
        }
    }

    /// Whether it keeps `event` through `route` from `sink` (its time aside).
    pub fn matches(&self, route: &str, sink: &str, event: &Event) -> bool {
        let m = &self.silence.matchers;
        let is = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
        !self.broken
            && is(&m.route, route)
            && is(&m.sink, sink)
            && is(&m.source, &event.source)
            && self
                .event_type
                .as_ref()
                .is_none_or(|glob| glob.is_match(&event.event_type))
            && self.when.as_ref().is_none_or(|when| when.holds(event))
    }
}

/// The silences not yet ended, as this daemon last read them.
#[derive(Debug, Default)]
pub struct Silences {
    live: ArcSwap<Vec<Arc<Compiled>>>,
}

impl Silences {
    /// The silence active at `now` that keeps `event` through `route` from `sink`, if any
    /// (the oldest, when several do).
    pub fn matching(&self, route: &str, sink: &str, event: &Event, now: Timestamp) -> Option<i64> {
        self.first_active(now, |c| c.matches(route, sink, event))
    }

    /// The silence active at `now` that holds a job of `event` through `route` to `sink`
    /// coming due, created at `created`: one created before the silence took effect (when it
    /// was added, or its start if later). A job created while it was in effect was set aside
    /// when routed, or is an operator's replay, which silences do not apply to.
    pub fn holding(
        &self,
        (route, sink): (&str, &str),
        event: &Event,
        created: Timestamp,
        now: Timestamp,
    ) -> Option<i64> {
        self.first_active(now, |c| {
            let s = &c.silence;
            created < s.created_at.max(s.starts_at) && c.matches(route, sink, event)
        })
    }

    /// The oldest silence active at `now` for which `holds`.
    fn first_active(&self, now: Timestamp, holds: impl Fn(&Compiled) -> bool) -> Option<i64> {
        let live = self.live.load();
        live.iter()
            .find(|c| c.silence.state(now) == SilenceState::Active && holds(c))
            .map(|c| c.silence.id)
    }

    /// Whether there is no silence at all: the common case, decided without looking further.
    pub fn is_empty(&self) -> bool {
        self.live.load().is_empty()
    }

    /// Takes `silences` as the live set; those already compiled (same id, unchanged) are
    /// kept, so a condition is compiled once, not every second.
    pub fn replace(&self, silences: Vec<Silence>) {
        let old: HashMap<i64, Arc<Compiled>> = self
            .live
            .load()
            .iter()
            .map(|c| (c.silence.id, Arc::clone(c)))
            .collect();
        let live = silences
            .into_iter()
            .map(|silence| match old.get(&silence.id) {
                Some(kept) if kept.silence == silence => Arc::clone(kept),
                _ => Arc::new(Compiled::new(silence)),
            })
            .collect();
        self.live.store(Arc::new(live));
    }

    /// Reads the silences every [`REFRESH`] until `stop`, keeping the `hookroute_silences`
    /// gauge. A failed read keeps the last set (and says so): a database hiccup neither
    /// lifts every silence nor stops the daemon.
    pub async fn keep_fresh(
        self: Arc<Self>,
        store: Store,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(REFRESH);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = stop.cancelled() => return,
            }
            let now = clock.now();
            match store.silences(now).await {
                Ok(silences) => {
                    let count = |state| silences.iter().filter(|s| s.state(now) == state).count();
                    metrics.silences(count(SilenceState::Active), count(SilenceState::Pending));
                    self.replace(silences);
                }
                Err(err) => {
                    tracing::warn!(error = %err, "cannot read the silences; keeping the last ones read")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn silence(id: i64, matchers: Matchers) -> Silence {
        Silence {
            id,
            matchers,
            starts_at: "2026-12-07T10:00:00Z".parse().unwrap(),
            ends_at: "2026-12-07T18:00:00Z".parse().unwrap(),
            comment: "planned".into(),
            author: "alice".into(),
            created_at: "2026-12-07T09:00:00Z".parse().unwrap(),
        }
    }

    fn event(source: &str, body: &str) -> Event {
        Event::parse(source, body.as_bytes(), None, None).unwrap()
    }

    #[test]
    fn every_matcher_given_must_match_and_only_while_active() {
        let silences = Silences::default();
        assert!(silences.is_empty());
        silences.replace(vec![
            silence(
                1,
                Matchers {
                    event_type: Some("alert.*".into()),
                    when: Some("data.domain == 'legacy.acme.example'".into()),
                    ..Matchers::default()
                },
            ),
            silence(
                2,
                Matchers {
                    route: Some("scans".into()),
                    sink: Some("slack".into()),
                    source: Some("cl".into()),
                    ..Matchers::default()
                },
            ),
        ]);
        let noon: Timestamp = "2026-12-07T12:00:00Z".parse().unwrap();
        let legacy = event(
            "cl",
            r#"{"type": "alert.triggered", "data": {"domain": "legacy.acme.example"}}"#,
        );
        let other = event(
            "cl",
            r#"{"type": "alert.triggered", "data": {"domain": "acme.example"}}"#,
        );
        let bare = event("cl", r#"{"type": "alert.triggered"}"#);
        assert_eq!(silences.matching("any", "any", &legacy, noon), Some(1));
        assert_eq!(silences.matching("any", "any", &other, noon), None);
        assert_eq!(silences.matching("any", "any", &bare, noon), None);
        assert_eq!(silences.matching("scans", "slack", &other, noon), Some(2));
        assert_eq!(silences.matching("scans", "email", &other, noon), None);
        let scorecard = event("sc", r#"{"event": "policy.published"}"#);
        assert_eq!(silences.matching("scans", "slack", &scorecard, noon), None);
        let evening: Timestamp = "2026-12-07T18:00:00Z".parse().unwrap();
        let morning: Timestamp = "2026-12-07T09:59:00Z".parse().unwrap();
        assert_eq!(silences.matching("any", "any", &legacy, evening), None);
        assert_eq!(silences.matching("any", "any", &legacy, morning), None);
    }

    #[test]
    fn add_refuses_no_matchers_and_a_condition_check_config_would_refuse() {
        assert!(check(&Matchers::default()).unwrap_err()[0].contains("at least one"));
        let bad = Matchers {
            when: Some("data.domain ==".into()),
            event_type: Some("alert.[".into()),
            ..Matchers::default()
        };
        let problems = check(&bad).unwrap_err().join("\n");
        assert!(problems.contains("--when: line 1, column"), "{problems}");
        assert!(problems.contains("--type: "), "{problems}");
        let unknown = Matchers {
            when: Some("domain == 'x'".into()),
            ..Matchers::default()
        };
        assert!(check(&unknown).unwrap_err()[0].contains("unknown variable \"domain\""));
    }

    #[test]
    fn a_silence_is_compiled_once_while_it_is_unchanged() {
        let silences = Silences::default();
        let one = silence(
            1,
            Matchers {
                when: Some("true".into()),
                ..Matchers::default()
            },
        );
        silences.replace(vec![one.clone()]);
        let first = Arc::clone(&silences.live.load()[0]);
        silences.replace(vec![one.clone()]);
        assert!(Arc::ptr_eq(&first, &silences.live.load()[0]));
        let expired = Silence {
            ends_at: "2026-12-07T11:00:00Z".parse().unwrap(),
            ..one
        };
        silences.replace(vec![expired]);
        assert!(!Arc::ptr_eq(&first, &silences.live.load()[0]));
    }
}
