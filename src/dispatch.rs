//! The hand-off from ingest to sinks: the built sinks, and where an event goes. Routing runs
//! in [`intake`](crate::intake), before the event is stored, and the store applies the decision
//! (jobs, throttles, what created no job) in the transaction that stores the event: an event
//! is never stored unrouted, so there is nothing to dispatch after a crash and nothing to
//! read back. The delivery engine takes the jobs from there.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::config::internal::InternalConfig;
use crate::config::{Config, Routing};
use crate::event::Event;
use crate::notice;
use crate::rules::group;
use crate::secret::Redactor;
use crate::sinks::{DeliveryOptions, Sink};
use crate::store::{GroupTo, Quiet, RouteTo};

/// A configured sink, built.
#[derive(Clone)]
pub struct NamedSink {
    pub name: String,
    pub kind: &'static str,
    pub sink: Arc<dyn Sink>,
    pub delivery: DeliveryOptions,
    pub digest: Option<Duration>,
    /// Jobs per sink call, outside digests.
    pub batch: usize,
    pub shows_message: bool,
    /// Some route to it groups its events.
    pub grouped: bool,
    /// What it asks the sender's API for, on top of what a route asks.
    pub enrich: Vec<crate::rules::Enrich>,
}

/// What routing and delivery need from the configuration; replaced whole on reload, so a
/// request or an attempt in progress finishes with the plan it started with.
pub struct Plan {
    pub routing: Arc<Routing>,
    pub sinks: HashMap<String, NamedSink>,
    /// Every configured secret (sinks' and sources'), to take out of what sinks answer.
    pub redactor: Arc<Redactor>,
    /// `[self]`: the events the daemon emits about itself.
    pub internal: InternalConfig,
    /// The sources' API clients, for the messages that ask for enrichment.
    pub enricher: Arc<crate::enrich::Enricher>,
    /// Whether any route or sink asks for enrichment: when none does, an attempt looks
    /// nothing up.
    pub enriching: bool,
}

impl Plan {
    /// Builds every sink's client, and the sources' API clients.
    ///
    /// # Errors
    /// The first sink that cannot be built, and why.
    pub fn build(config: &Config) -> Result<Self, String> {
        Self::rebuild(config, None)
    }

    /// As [`Plan::build`], for a reload: the API clients of sources whose settings did not
    /// change are `previous`'s, with what they fetched and what the API said of its limits.
    ///
    /// # Errors
    /// As [`Plan::build`].
    pub fn rebuild(config: &Config, previous: Option<&Self>) -> Result<Self, String> {
        let routes = config.routing.table.routes();
        let mut sinks = HashMap::new();
        let mut secrets: Vec<String> = config
            .sources
            .iter()
            .flat_map(|source| source.verifier.key_texts())
            .chain(
                config
                    .sources
                    .iter()
                    .filter_map(|source| source.api.as_ref()?.key.clone()),
            )
            .collect();
        for s in &config.sinks {
            let config = s.spec.config();
            secrets.extend(config.secrets());
            let sink = config
                .build(&s.name)
                .map_err(|err| format!("sinks.{}: {err}", s.name))?;
            let named = NamedSink {
                name: s.name.clone(),
                kind: config.kind(),
                sink,
                delivery: *config.delivery(),
                digest: config.digest(),
                batch: config.batch(),
                shows_message: s.spec.shows_message(),
                grouped: routes.iter().any(|route| {
                    (route.group.is_some() || route.takes_internal(group::DEAD_LETTER))
                        && route.sinks.contains(&s.name)
                }),
                enrich: config.enrich().to_vec(),
            };
            sinks.insert(s.name.clone(), named);
        }
        Ok(Self {
            routing: Arc::clone(&config.routing),
            sinks,
            redactor: Arc::new(Redactor::new(secrets)),
            internal: config.internal.clone(),
            enricher: Arc::new(crate::enrich::Enricher::build(
                config,
                previous.map(|previous| &*previous.enricher),
            )?),
            enriching: routes.iter().any(|route| !route.enrich.is_empty())
                || config
                    .sinks
                    .iter()
                    .any(|s| !s.spec.config().enrich().is_empty()),
        })
    }

    /// What a message through `route` to `sink` asks the sender's API for.
    pub fn wanted(&self, route: &str, sink: &NamedSink) -> crate::enrich::Wanted {
        let route = self.routing.route(route);
        let mut asked = sink.enrich.clone();
        asked.extend(route.iter().flat_map(|route| route.enrich.iter().copied()));
        let required = route.is_some_and(|route| route.enrich_required);
        crate::enrich::Wanted::of(&asked, sink.kind, required)
    }
}

/// Where `event` goes under `routing` at `now`: every route that takes it, with its throttle
/// key and its sinks, all of them muted when the route's mute window holds. Empty when no
/// route takes it. The daemon stores this with the event; `replay` queues the same (route,
/// sink) pairs, muted or not.
pub fn route(routing: &Routing, event: &Event, now: jiff::Timestamp) -> Routed {
    let taken = routing.table.route(event);
    let about = about_sink(event);
    Routed {
        to: taken
            .routes
            .into_iter()
            .map(|(route, key)| {
                let mut quiet: Vec<(String, Quiet)> = match routing.muted(route, now) {
                    Some(why) => route
                        .sinks
                        .iter()
                        .map(|sink| (sink.clone(), Quiet::Muted(why.clone())))
                        .collect(),
                    None => Vec::new(),
                };
                if let Some(sink) = about.filter(|sink| route.sinks.iter().any(|s| s == sink))
                    && !quiet.iter().any(|(quiet, _)| quiet == sink)
                {
                    quiet.push((sink.to_owned(), Quiet::Muted(NOT_TO_ITSELF.to_owned())));
                }
                let group = route.group.as_ref().or_else(|| {
                    (event.source == notice::SOURCE && event.event_type == group::DEAD_LETTER)
                        .then(group::dead_letters)
                });
                RouteTo {
                    route: route.name.clone(),
                    throttle: route
                        .throttle
                        .as_ref()
                        .zip(key)
                        .map(|(t, key)| (key, t.window)),
                    sinks: route.sinks.clone(),
                    quiet,
                    group: group.map(|group| GroupTo {
                        key: group.key(event),
                        wait: group.wait,
                        interval: group.interval,
                    }),
                }
            })
            .collect(),
        unevaluated: taken
            .unevaluated
            .into_iter()
            .map(|(route, reason)| (route.name.clone(), reason))
            .collect(),
    }
}

/// What a job of an internal event about its own sink records instead of being delivered:
/// the alert that a sink fails cannot reach anyone through that sink, and trying would make
/// it fail again.
pub const NOT_TO_ITSELF: &str = "(hookroute's own event about this sink: never sent to it)";

/// The sink an internal event is about (`data.sink`), if it is one.
pub fn about_sink(event: &Event) -> Option<&str> {
    if event.source != notice::SOURCE {
        return None;
    }
    event.data().get("sink")?.as_str()
}

/// Where an event goes, and which routes could not tell.
#[derive(Debug, Default)]
pub struct Routed {
    /// Every route that takes the event; empty when none does.
    pub to: Vec<RouteTo>,
    /// Routes whose condition could not be evaluated on the event, and why: they do not take
    /// it, which the operator should hear about (a field of an unexpected type, say).
    pub unevaluated: Vec<(String, String)>,
}
