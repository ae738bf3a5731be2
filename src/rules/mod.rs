//! Routing: which routes take an event, and why. Pure: compiled once from the configuration
//! (globs, CEL conditions, throttle keys), then evaluated per event without I/O.
//!
//! Routes are evaluated top to bottom, like Alertmanager's: the first matching route wins
//! unless it says `continue = true`. A condition that cannot be evaluated for an event (a
//! missing field, a value of the wrong type) is false, never an error.

mod cel_env;
pub mod group;
mod reads;
pub mod throttle;
pub mod windows;

use std::collections::BTreeMap;
use std::time::Duration;

use globset::{Glob, GlobSet, GlobSetBuilder};
use serde::Deserialize;

use crate::duration::HumanDuration;
use crate::event::Event;
use crate::notice;
pub use cel_env::{Activation, Condition, Expr};

/// A route as written in the configuration (`[[routes]]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    pub name: String,
    /// Globs over the event type: `"scan.completed"`, `"policy.*"`, `"*"`.
    pub events: Vec<String>,
    /// Only events from these sources; empty means any.
    #[serde(default)]
    pub sources: Vec<String>,
    /// A CEL condition over `type`, `source`, `delivery_id`, `occurred_at`, `data`, `payload`.
    pub when: Option<String>,
    pub sinks: Vec<String>,
    /// Also try later routes after this one matched.
    #[serde(default, rename = "continue")]
    pub continue_: bool,
    pub throttle: Option<ThrottleSpec>,
    /// Time intervals (`[time_intervals.<name>]`) during which the route is quiet: its jobs
    /// are recorded as muted, not delivered.
    #[serde(default)]
    pub mute_during: Vec<String>,
    /// Time intervals outside which the route is quiet (none: always active).
    #[serde(default)]
    pub active_during: Vec<String>,
    /// Events sharing a key go to each sink as one delivery (see [`group`]).
    pub group: Option<group::GroupSpec>,
    /// Message template per sink kind (`slack = "name"` or `log = { text = "..." }`).
    #[serde(default)]
    pub templates: BTreeMap<String, crate::templates::TemplateRef>,
    /// What to fetch from the sender's API before rendering (see `crate::enrich`).
    #[serde(default)]
    pub enrich: Vec<Enrich>,
    /// Fail the attempt (to be retried) rather than send a message without the enrichment.
    #[serde(default)]
    pub enrich_required: bool,
}

/// What a route or a sink asks the sender's API for, about a scan, before its message is
/// rendered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Enrich {
    /// The scan's report: findings with remediation, module scores.
    Report,
    /// The PDF report: attached to emails, linked from chat.
    Pdf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThrottleSpec {
    pub window: HumanDuration,
    /// A CEL expression whose value groups events, e.g. `data.domain`; none means one group.
    pub key: Option<String>,
}

/// A compiled route.
#[derive(Debug)]
pub struct Route {
    pub name: String,
    pub event_globs: Vec<String>,
    events: GlobSet,
    pub sources: Vec<String>,
    pub when: Option<Expr>,
    pub sinks: Vec<String>,
    pub continue_: bool,
    pub throttle: Option<Throttle>,
    pub mute_during: Vec<String>,
    pub active_during: Vec<String>,
    pub group: Option<group::Group>,
    /// Template id per sink kind, resolved against the template set.
    pub templates: BTreeMap<String, String>,
    pub enrich: Vec<Enrich>,
    pub enrich_required: bool,
    /// Whether the route asks for hookroute's own events: by a glob of `hookroute.` types,
    /// or by naming the source. A catch-all (`*`) means what the senders send; it does not
    /// take them, so "everything to Slack" never carries the alert that Slack fails.
    pub internal: bool,
}

#[derive(Debug)]
pub struct Throttle {
    pub window: Duration,
    pub key: Option<Expr>,
}

/// The routes, in order.
#[derive(Debug, Default)]
pub struct RouteTable {
    routes: Vec<Route>,
    /// What of the payload any route's condition or throttle key reads.
    reads: reads::Reads,
}

/// What the routes made of one event (see [`RouteTable::route`]).
#[derive(Debug, Default)]
pub struct Taken<'a> {
    pub routes: Vec<(&'a Route, Option<String>)>,
    pub unevaluated: Vec<(&'a Route, String)>,
}

/// What one route made of one event.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Taken; carries the condition's value when there is one, and the throttle key.
    Matched {
        condition: Option<String>,
        throttle_key: Option<String>,
    },
    NoEventMatch,
    NoSourceMatch,
    /// The condition was false.
    ConditionFalse,
    /// The condition could not be evaluated on this event (a field of the wrong type, say):
    /// the route does not take it, and the operator is told why.
    ConditionError {
        reason: String,
    },
    /// An earlier route matched without `continue`.
    NotReached,
}

impl Route {
    /// Compiles one route. `index` and the route's name go into every message.
    ///
    /// # Errors
    /// Every problem found, as its key path (starting with the route's) and what is wrong.
    pub fn compile(
        index: usize,
        spec: &RouteSpec,
        templates: BTreeMap<String, String>,
    ) -> Result<Self, Vec<(String, String)>> {
        let at = format!("routes[{index}] ({:?})", spec.name);
        let mut problems = Vec::new();
        if spec.events.is_empty() {
            problems.push((
                format!("{at}.events"),
                "list at least one event glob, e.g. \"*\"".to_owned(),
            ));
        }
        let mut globs = GlobSetBuilder::new();
        for (i, pattern) in spec.events.iter().enumerate() {
            match Glob::new(pattern) {
                Ok(glob) => {
                    globs.add(glob);
                }
                Err(err) => problems.push((format!("{at}.events[{i}]"), err.to_string())),
            }
        }
        if spec.sinks.is_empty() {
            problems.push((format!("{at}.sinks"), "name at least one sink".to_owned()));
        }
        let when = spec.when.as_deref().and_then(|text| {
            Expr::compile(text)
                .map_err(|err| problems.push((format!("{at}.when"), err.to_string())))
                .ok()
        });
        let throttle = spec.throttle.as_ref().and_then(|t| {
            if t.window.0.is_zero() {
                problems.push((
                    format!("{at}.throttle.window"),
                    "must be longer than 0s".to_owned(),
                ));
            }
            let key = match t.key.as_deref().map(Expr::compile) {
                Some(Ok(key)) => Some(key),
                Some(Err(err)) => {
                    problems.push((format!("{at}.throttle.key"), err.to_string()));
                    return None;
                }
                None => None,
            };
            Some(Throttle {
                window: t.window.0,
                key,
            })
        });
        let group = spec.group.as_ref().and_then(|spec| {
            group::Group::compile(&at, spec)
                .map_err(|found| problems.extend(found))
                .ok()
        });
        let events = globs
            .build()
            .map_err(|err| problems.push((format!("{at}.events"), err.to_string())));
        match events {
            Ok(events) if problems.is_empty() => Ok(Self {
                name: spec.name.clone(),
                event_globs: spec.events.clone(),
                events,
                sources: spec.sources.clone(),
                when,
                sinks: spec.sinks.clone(),
                continue_: spec.continue_,
                throttle,
                mute_during: spec.mute_during.clone(),
                active_during: spec.active_during.clone(),
                group,
                templates,
                enrich: spec.enrich.clone(),
                enrich_required: spec.enrich_required,
                internal: spec
                    .events
                    .iter()
                    .any(|glob| glob.starts_with("hookroute."))
                    || spec.sources.iter().any(|source| source == notice::SOURCE),
            }),
            _ => Err(problems),
        }
    }

    /// Whether the route's globs cover an event type (ignoring sources and condition).
    pub fn covers(&self, event_type: &str) -> bool {
        self.events.is_match(event_type)
    }

    /// Whether the route takes hookroute's own events of `event_type` (ignoring its
    /// condition).
    pub fn takes_internal(&self, event_type: &str) -> bool {
        self.internal
            && self.covers(event_type)
            && (self.sources.is_empty() || self.sources.iter().any(|s| s == notice::SOURCE))
    }

    /// The route's globs (with their index in `events`) that match none of `types`.
    pub fn globs_matching_none<'a>(&'a self, types: &[&str]) -> Vec<(usize, &'a str)> {
        let matched: std::collections::HashSet<usize> = types
            .iter()
            .flat_map(|event_type| self.events.matches(event_type))
            .collect();
        self.event_globs
            .iter()
            .enumerate()
            .filter(|(i, _)| !matched.contains(i))
            .map(|(i, glob)| (i, glob.as_str()))
            .collect()
    }
}

impl RouteTable {
    pub fn new(routes: Vec<Route>) -> Self {
        let mut reads = reads::Reads::default();
        for route in &routes {
            let key = route.throttle.as_ref().and_then(|t| t.key.as_ref());
            for expr in route.when.iter().chain(key) {
                reads.merge(&expr.reads());
            }
        }
        Self { routes, reads }
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// Every route's verdict on `event`, in order.
    pub fn evaluate(&self, event: &Event) -> Vec<(&Route, Verdict)> {
        let mut activation = Activation::lazy(event, &self.reads);
        let mut taken = false;
        self.routes
            .iter()
            .map(|route| {
                let verdict = if taken {
                    Verdict::NotReached
                } else {
                    route.verdict(event, &mut activation)
                };
                if matches!(verdict, Verdict::Matched { .. }) && !route.continue_ {
                    taken = true;
                }
                (route, verdict)
            })
            .collect()
    }

    /// The routes that take `event`, with their throttle keys; and those whose condition
    /// could not be evaluated on it, with why.
    pub fn route(&self, event: &Event) -> Taken<'_> {
        let mut taken = Taken::default();
        for (route, verdict) in self.evaluate(event) {
            match verdict {
                Verdict::Matched { throttle_key, .. } => taken.routes.push((route, throttle_key)),
                Verdict::ConditionError { reason } => taken.unevaluated.push((route, reason)),
                _ => {}
            }
        }
        taken
    }
}

impl Route {
    fn verdict(&self, event: &Event, activation: &mut Activation<'_>) -> Verdict {
        if !self.events.is_match(&event.event_type) {
            return Verdict::NoEventMatch;
        }
        if !self.sources.is_empty() && !self.sources.contains(&event.source) {
            return Verdict::NoSourceMatch;
        }
        if event.source == notice::SOURCE && !self.internal {
            return Verdict::NoSourceMatch;
        }
        let condition = match &self.when {
            Some(expr) => match activation.eval_bool(expr) {
                Ok(true) => Some("true".to_owned()),
                Ok(false) => return Verdict::ConditionFalse,
                Err(reason) => return Verdict::ConditionError { reason },
            },
            None => None,
        };
        let throttle_key = self.throttle.as_ref().map(|t| {
            t.key
                .as_ref()
                .map(|key| activation.eval_key(key))
                .unwrap_or_default()
        });
        Verdict::Matched {
            condition,
            throttle_key,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, events: &[&str], when: Option<&str>, continue_: bool) -> RouteSpec {
        RouteSpec {
            name: name.into(),
            events: events.iter().map(|s| s.to_string()).collect(),
            sources: Vec::new(),
            when: when.map(Into::into),
            sinks: vec!["s".into()],
            continue_,
            throttle: None,
            mute_during: Vec::new(),
            active_during: Vec::new(),
            group: None,
            templates: BTreeMap::new(),
            enrich: Vec::new(),
            enrich_required: false,
        }
    }

    fn table(specs: &[RouteSpec]) -> RouteTable {
        RouteTable::new(
            specs
                .iter()
                .enumerate()
                .map(|(i, s)| Route::compile(i, s, BTreeMap::new()).unwrap())
                .collect(),
        )
    }

    fn event(source: &str, body: &str) -> Event {
        Event::parse(source, body.as_bytes(), None, None).unwrap()
    }

    /// Killed mutants (cargo mutants, #23): a route's sources, what it covers, an empty table,
    /// and a condition that cannot be evaluated reported as such.
    #[test]
    fn sources_coverage_and_unevaluated_conditions() {
        let mut only_cl = spec("only cl", &["scan.*"], None, false);
        only_cl.sources = vec!["cl".into()];
        let failing = spec("failing", &["*"], Some("data.score > 'x'"), true);
        let table = table(&[failing, only_cl]);
        let scan = r#"{"type": "scan.completed", "data": {"score": 3}}"#;
        assert_eq!(taken(&table, &event("cl", scan)), ["only cl"]);
        assert!(taken(&table, &event("scorecard", scan)).is_empty());
        let routed = table.route(&event("cl", scan));
        assert_eq!(routed.unevaluated.len(), 1);
        assert_eq!(routed.unevaluated[0].0.name, "failing");
        let route = &table.routes()[1];
        assert!(route.covers("scan.completed") && !route.covers("alert.triggered"));
        assert!(!table.is_empty() && RouteTable::new(Vec::new()).is_empty());
    }

    fn taken(table: &RouteTable, event: &Event) -> Vec<String> {
        table
            .route(event)
            .routes
            .into_iter()
            .map(|(r, _)| r.name.clone())
            .collect()
    }

    #[test]
    fn globs_first_match_and_continue() {
        let table = table(&[
            spec("scans", &["scan.*"], None, true),
            spec(
                "policies",
                &["policy.published", "policy.approved"],
                None,
                false,
            ),
            spec("everything", &["*"], None, false),
            spec("never", &["*"], None, false),
        ]);
        let scan = event("cl", r#"{"type": "scan.completed"}"#);
        assert_eq!(taken(&table, &scan), ["scans", "everything"]);
        let policy = event("sc", r#"{"event": "policy.published"}"#);
        assert_eq!(taken(&table, &policy), ["policies"]);
        let verdicts: Vec<_> = table
            .evaluate(&policy)
            .into_iter()
            .map(|(_, v)| v)
            .collect();
        assert_eq!(verdicts[0], Verdict::NoEventMatch);
        assert_eq!(verdicts[2], Verdict::NotReached);
        let new = event("sc", r#"{"event": "policy.archived"}"#);
        assert_eq!(taken(&table, &new), ["everything"]);
    }

    #[test]
    fn conditions_on_both_shapes_and_missing_fields() {
        let table = table(&[
            spec(
                "failing",
                &["scan.completed"],
                Some("data.score < 70 || data.grade in ['D', 'F']"),
                false,
            ),
            spec(
                "client",
                &["policy.*"],
                Some("data.client_id == 'client456' && source == 'sc'"),
                false,
            ),
        ]);
        let low = event(
            "cl",
            r#"{"type": "scan.completed", "data": {"score": 61, "grade": "C"}}"#,
        );
        assert_eq!(taken(&table, &low), ["failing"]);
        let graded = event(
            "cl",
            r#"{"type": "scan.completed", "data": {"score": 75, "grade": "F"}}"#,
        );
        assert_eq!(taken(&table, &graded), ["failing"]);
        let fine = event(
            "cl",
            r#"{"type": "scan.completed", "data": {"score": 95, "grade": "A"}}"#,
        );
        assert!(taken(&table, &fine).is_empty());
        // A missing field makes the condition false, and says why.
        let bare = event("cl", r#"{"type": "scan.completed"}"#);
        assert!(taken(&table, &bare).is_empty());
        match &table.evaluate(&bare)[0].1 {
            Verdict::ConditionError { reason } => {
                assert!(reason.contains("No such key"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        let policy = event(
            "sc",
            r#"{"event": "policy.published", "data": {"client_id": "client456"}}"#,
        );
        assert_eq!(taken(&table, &policy), ["client"]);
        assert!(
            taken(
                &table,
                &event(
                    "cl",
                    r#"{"event": "policy.published", "data": {"client_id": "client456"}}"#
                )
            )
            .is_empty()
        );
    }

    #[test]
    fn non_boolean_condition_is_false() {
        let table = table(&[spec("odd", &["*"], Some("data.score"), false)]);
        let e = event("cl", r#"{"type": "x", "data": {"score": 5}}"#);
        assert!(taken(&table, &e).is_empty());
    }

    #[test]
    fn throttle_keys() {
        let mut s = spec("t", &["*"], None, false);
        s.throttle = Some(ThrottleSpec {
            window: HumanDuration(Duration::from_secs(60)),
            key: Some("data.domain".into()),
        });
        let table = table(&[s]);
        let e = event("cl", r#"{"type": "x", "data": {"domain": "example.com"}}"#);
        assert_eq!(table.route(&e).routes[0].1.as_deref(), Some("example.com"));
        let missing = event("cl", r#"{"type": "x"}"#);
        assert_eq!(table.route(&missing).routes[0].1.as_deref(), Some(""));
        let nul = event("cl", r#"{"type": "x", "data": {"domain": "a\u0000b"}}"#);
        assert_eq!(table.route(&nul).routes[0].1.as_deref(), Some("a\u{FFFD}b"));
    }

    fn lines(problems: &[(String, String)]) -> String {
        let lines: Vec<String> = problems.iter().map(|(k, m)| format!("{k}: {m}")).collect();
        lines.join("\n")
    }

    #[test]
    fn compile_errors_name_the_route_and_position() {
        let mut bad = spec("broken", &["scan.[", "x"], Some("data.score <"), false);
        bad.sinks.clear();
        let problems = Route::compile(3, &bad, BTreeMap::new()).unwrap_err();
        let text = lines(&problems);
        assert!(text.contains("routes[3] (\"broken\").events[0]"), "{text}");
        assert!(
            text.contains("routes[3] (\"broken\").when: line 1, column"),
            "{text}"
        );
        assert!(text.contains("routes[3] (\"broken\").sinks"), "{text}");
    }

    #[test]
    fn a_condition_naming_an_unknown_variable_is_an_error_naming_the_route() {
        let bad = spec("low scores", &["scan.completed"], Some("score < 70"), false);
        let problems = Route::compile(0, &bad, BTreeMap::new()).unwrap_err();
        let text = lines(&problems);
        assert!(
            text.contains("routes[0] (\"low scores\").when: unknown variable \"score\""),
            "{text}"
        );
        for fine in [
            "data.score < 70 || data.grade in ['D', 'F']",
            "has(data.domain) && type.startsWith('scan.') && source == 'cl'",
            "data.items.exists(item, item > 3) && data.items.all(x, x != 0)",
            "payload.id != '' && delivery_id != '' && occurred_at != ''",
        ] {
            let ok = spec("fine", &["*"], Some(fine), false);
            assert!(Route::compile(0, &ok, BTreeMap::new()).is_ok(), "{fine}");
        }
    }
}
