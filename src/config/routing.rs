//! Routes and templates: compiled, and every reference between routes, sinks, sources and
//! templates checked, whether they live in the configuration file or in its `rules_file`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use super::diagnose::Broken;
use super::raw::RawRules;
use super::{ConfiguredSink, Problems, Routing, did_you_mean, read_toml};
use crate::notice::Kind;
use crate::rules::windows::{Window, WindowSpec};
use crate::rules::{Route, RouteSpec, RouteTable};
use crate::templates::{TemplateSource, TemplatesBuilder};

/// The event families the senders document: each deserves a route.
pub const SEED_EVENT_TYPES: &[&str] = &[
    "scan.completed",
    "alert.triggered",
    "policy.created",
    "policy.updated",
    "policy.published",
    "policy.approved",
    "policy.rejected",
    "assessment.started",
    "assessment.completed",
    "assessment.scored",
    "assessment.failed",
];

/// The documented event type or family (`policy.*`) most like `glob`, for a glob that
/// matches none: `policies.*` is most likely `policy.*`.
fn closest_documented(glob: &str) -> String {
    let families = SEED_EVENT_TYPES
        .iter()
        .filter_map(|t| t.split_once('.'))
        .map(|(family, _)| format!("{family}.*"));
    SEED_EVENT_TYPES
        .iter()
        .map(|t| (*t).to_owned())
        .chain(families)
        .max_by(|a, b| strsim::jaro_winkler(glob, a).total_cmp(&strsim::jaro_winkler(glob, b)))
        .unwrap_or_default()
}

pub(super) struct RulesInput {
    pub(super) file: Option<PathBuf>,
    pub(super) routes: Vec<RouteSpec>,
    pub(super) templates: BTreeMap<String, TemplateSource>,
    pub(super) time_intervals: BTreeMap<String, WindowSpec>,
    pub(super) vars: BTreeMap<String, String>,
}

/// What routes may refer to besides the sinks that were read: every source the file names
/// (valid or not: a source whose secret cannot be read still exists), and the parts of the
/// configuration file that could not be read at all.
pub(super) struct Names<'a> {
    pub(super) sources: &'a [String],
    pub(super) broken: &'a Broken,
}

/// Compiles templates and routes, checking every reference between routes, sinks, sources
/// and templates.
pub(super) fn validate_routing(
    config_path: &Path,
    input: RulesInput,
    names: &Names<'_>,
    sinks: &[ConfiguredSink],
    problems: &mut Problems,
) -> Routing {
    let base_dir = config_path.parent().unwrap_or(Path::new("."));
    // The file routes and templates are in, when it is not the configuration file.
    // The rules file's own broken routes; the configuration file's are in `names`.
    let (origin, rules_file, rules, rules_broken) = match input.file {
        Some(file) => {
            let file = base_dir.join(file);
            if !input.routes.is_empty()
                || !input.templates.is_empty()
                || !input.time_intervals.is_empty()
            {
                problems.add(
                    "rules_file",
                    "routes, templates and time intervals go either in the config file or in \
                     rules_file, not both",
                );
            }
            let rules = match super::read_file(&file) {
                Ok(text) => read_toml(Some(&file), &text, None, problems),
                Err(err) => {
                    problems.add("rules_file", format!("{}: {err}", file.display()));
                    None
                }
            };
            let (rules, broken) = rules.unwrap_or_default();
            (file.clone(), Some(file), rules, Some(broken))
        }
        None => (
            config_path.to_path_buf(),
            None,
            RawRules {
                routes: input.routes,
                templates: input.templates,
                time_intervals: input.time_intervals,
            },
            None,
        ),
    };
    let broken_routes = rules_broken.as_ref().unwrap_or(names.broken);
    let mut windows = BTreeMap::new();
    for (name, spec) in &rules.time_intervals {
        match Window::compile(name, spec) {
            Ok(window) => {
                windows.insert(name.clone(), window);
            }
            Err(found) => {
                for (key, message) in found {
                    problems.add_at(rules_file.as_deref(), key, message);
                }
            }
        }
    }

    let mut templates = TemplatesBuilder::new(&input.vars, base_dir);
    for (name, source) in &rules.templates {
        if let Err(message) = templates.add_named(name, source) {
            problems.add_at(rules_file.as_deref(), format!("templates.{name}"), message);
        }
    }
    let mut sink_templates = HashMap::new();
    for sink in sinks {
        if let Some(reference) = sink.spec.config().template() {
            match templates.resolve(&format!("sink/{}", sink.name), reference) {
                Ok(id) => {
                    sink_templates.insert(sink.name.clone(), id);
                }
                Err(message) => problems.add(format!("sinks.{}.template", sink.name), message),
            }
        }
    }

    // Looked up by name, not searched: validation stays linear in a file of any size.
    let sink_kinds: HashMap<&str, &'static str> = sinks
        .iter()
        .map(|s| (s.name.as_str(), s.spec.config().kind()))
        .collect();
    let source_names: HashSet<&str> = names.sources.iter().map(String::as_str).collect();
    let mut warnings = Vec::new();
    let mut route_names = HashSet::new();
    // The types a route's glob should match one of: the senders' documented ones, and
    // hookroute's own.
    let internal: Vec<String> = Kind::ALL.iter().map(|k| k.event_type()).collect();
    let mut known: Vec<&str> = SEED_EVENT_TYPES.to_vec();
    known.extend(internal.iter().map(String::as_str));
    let mut routes = Vec::new();
    for (read, spec) in rules.routes.iter().enumerate() {
        // Where the route is in the file, routes that could not be read counted.
        let i = broken_routes.route_index(read);
        let at = format!("routes[{i}] ({:?})", spec.name);
        let mut add = |key: &dyn fmt::Display, message: &dyn fmt::Display| {
            problems.add_at(rules_file.as_deref(), key, message);
        };
        if spec.name.trim().is_empty() {
            add(&at, &"a route needs a name");
        } else if !route_names.insert(spec.name.as_str()) {
            add(&at, &"another route has the same name");
        }
        for (j, source) in spec.sources.iter().enumerate() {
            if !source_names.contains(source.as_str()) {
                let names = names.sources.iter().map(String::as_str);
                add(
                    &format!("{at}.sources[{j}]"),
                    &format!("unknown source {source:?}{}", did_you_mean(source, names)),
                );
            }
        }
        let mut kinds = Vec::new();
        // A sink that could not be read has no known type: its route's templates go unchecked.
        let mut kinds_known = true;
        for (j, name) in spec.sinks.iter().enumerate() {
            match sink_kinds.get(name.as_str()) {
                Some(kind) => kinds.push(*kind),
                None if names.broken.sinks.contains(name) => kinds_known = false,
                None => {
                    let names = sinks.iter().map(|s| s.name.as_str());
                    let hint = did_you_mean(name, names);
                    add(
                        &format!("{at}.sinks[{j}]"),
                        &format!("unknown sink {name:?}{hint}"),
                    );
                }
            }
        }
        for (list, names) in [
            ("mute_during", &spec.mute_during),
            ("active_during", &spec.active_during),
        ] {
            for (j, name) in names.iter().enumerate() {
                let known = rules.time_intervals.contains_key(name)
                    || broken_routes.time_intervals.contains(name);
                if !known {
                    let names = rules.time_intervals.keys().map(String::as_str);
                    let hint = did_you_mean(name, names);
                    add(
                        &format!("{at}.{list}[{j}]"),
                        &format!("unknown time interval {name:?}{hint}"),
                    );
                }
            }
        }
        let mut route_templates = BTreeMap::new();
        for (kind, reference) in &spec.templates {
            // `group`: the message for a group's (or a digest's) events together.
            if kind != "group" && !kinds.contains(&kind.as_str()) {
                if !kinds_known {
                    continue;
                }
                add(
                    &format!("{at}.templates.{kind}"),
                    &format!("none of this route's sinks is of type {kind:?}"),
                );
                continue;
            }
            match templates.resolve(&format!("route/{}/{kind}", spec.name), reference) {
                Ok(id) => {
                    route_templates.insert(kind.clone(), id);
                }
                Err(message) => add(&format!("{at}.templates.{kind}"), &message),
            }
        }
        match Route::compile(i, spec, route_templates) {
            Ok(route) => {
                for (j, glob) in route.globs_matching_none(&known) {
                    warnings.push(format!(
                        "{at}.events[{j}]: {glob:?} matches none of the event types the senders \
                         document; did you mean {:?}? (If it is a type they added since, ignore this.)",
                        closest_documented(glob)
                    ));
                }
                routes.push(route);
            }
            Err(found) => {
                for (key, message) in found {
                    add(&key, &message);
                }
            }
        }
    }

    let table = RouteTable::new(routes);
    let uncovered: Vec<&str> = SEED_EVENT_TYPES
        .iter()
        .copied()
        .filter(|t| !table.routes().iter().any(|r| r.covers(t)))
        .collect();
    if !uncovered.is_empty() {
        warnings.push(format!(
            "no route matches {}: such events are stored and recorded as unrouted",
            uncovered.join(", ")
        ));
    }
    warnings.extend(alerts_with_nowhere_to_go(&table, sinks));
    Routing {
        table,
        templates: templates.build(),
        sink_templates,
        windows,
        origin,
        warnings,
    }
}

/// A warning when hookroute's alert that a sink fails goes to that one sink alone: routing
/// never sends an internal event to the sink it is about, so that alert would reach no one.
fn alerts_with_nowhere_to_go(table: &RouteTable, sinks: &[ConfiguredSink]) -> Option<String> {
    let failing = Kind::SinkFailing.event_type();
    let mut to: Vec<&String> = table
        .routes()
        .iter()
        .filter(|route| route.takes_internal(&failing))
        .flat_map(|route| &route.sinks)
        .collect();
    to.sort();
    to.dedup();
    let [only] = to.as_slice() else { return None };
    let kind = sinks
        .iter()
        .find(|s| &&s.name == only)?
        .spec
        .config()
        .kind();
    (!matches!(kind, "file" | "log")).then(|| {
        format!(
            "hookroute's own events (hookroute.*) go only to sink {only:?}, which can fail: an \
             event about it is never sent to it, so if it fails no one hears. Route them to a \
             second sink too (the archive, or email)"
        )
    })
}

impl Routing {
    /// The route named `name`, if the table has one (jobs name their route).
    pub fn route(&self, name: &str) -> Option<&Route> {
        self.table.routes().iter().find(|r| r.name == name)
    }

    /// The route's own template for a group's message (`templates = { group = … }`), if any.
    pub fn group_template(&self, route: &str) -> Option<&str> {
        self.route(route)
            .and_then(|r| r.templates.get("group"))
            .map(String::as_str)
    }

    /// Most events in one delivery of `route`'s groups.
    pub fn group_max(&self, route: &str) -> usize {
        self.route(route)
            .and_then(|r| r.group.as_ref())
            .map_or(crate::rules::group::DEFAULT_MAX, |group| group.max)
    }

    /// Why `route` is quiet at `at`, if it is: during one of its `mute_during` windows, or
    /// outside all of its `active_during` ones. The phrase is what a muted job records.
    pub fn muted(&self, route: &Route, at: jiff::Timestamp) -> Option<String> {
        let open = |name: &String| self.windows.get(name).is_some_and(|w| w.contains(at));
        if let Some(window) = route.mute_during.iter().find(|name| open(name)) {
            return Some(format!("during {window}"));
        }
        if !route.active_during.is_empty() && !route.active_during.iter().any(open) {
            return Some(format!("outside {}", route.active_during.join(", ")));
        }
        None
    }
}
