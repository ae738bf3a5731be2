//! Every deserialization problem in one run.
//!
//! serde stops at the first error. When the whole configuration does not deserialize, this
//! goes over it again, one unit at a time (each top-level table, each source, sink, route and
//! template), and within a unit drops each offending key and tries again, so a typo in
//! `[server]` and a wrong type in `[sinks.ciso]` are reported together, each with its key path.
//!
//! What is left is the configuration repaired: every offending key dropped, and every unit
//! that still does not deserialize (a required key missing) taken out and named in
//! [`Broken`]. Validation goes on with it, so the problems only it finds (an unreadable secret,
//! a route naming no sink) are in the same report, and it leaves out those a broken unit would
//! cause: a route naming a broken sink does not name an unknown one.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use figment::error::Kind;
use figment::value::{Dict, Value};
use serde::de::DeserializeOwned;

use super::raw::{RawLog, RawMetrics, RawServer, RawSource, RawStorage};
use super::{Problems, did_you_mean};
use crate::rules::RouteSpec;
use crate::rules::windows::WindowSpec;
use crate::sinks::SinkSpec;
use crate::templates::TemplateSource;

/// Enough tries to report every mistake in one table, bounded against a pathological one.
const MAX_PER_UNIT: usize = 64;

/// The units taken out of a repaired configuration: they exist, but could not be read.
#[derive(Debug, Default)]
pub(super) struct Broken {
    pub sources: BTreeSet<String>,
    pub sinks: BTreeSet<String>,
    /// Indices of routes in the file, as written (the repaired list lacks them).
    pub routes: BTreeSet<usize>,
    pub time_intervals: BTreeSet<String>,
}

impl Broken {
    /// The index in the file of the `i`-th route that was read.
    pub fn route_index(&self, i: usize) -> usize {
        (0..)
            .filter(|index| !self.routes.contains(index))
            .nth(i)
            .unwrap_or(i)
    }
}

/// Records every problem deserializing `root` as a `T` (the configuration or a rules file),
/// from `file` (`None`: the configuration file), and returns `root` repaired (see the module
/// doc).
pub(super) fn every_problem<T: DeserializeOwned>(
    file: Option<&Path>,
    root: &Dict,
    problems: &mut Problems,
) -> (Dict, Broken) {
    let mut repaired = Dict::new();
    let mut broken = Broken::default();
    for (key, value) in root {
        // Alone, a known key deserializes as `T` (whose other keys all have defaults) or fails
        // inside its value; an unknown one fails at the top with serde's list of the known.
        let alone = Value::from(Dict::from([(key.clone(), value.clone())]));
        match alone.deserialize::<T>() {
            Ok(_) => {
                repaired.insert(key.clone(), value.clone());
                continue;
            }
            Err(err) if err.path.is_empty() => {
                for err in err {
                    problems.add_at(file, key, message(&err.kind));
                }
                continue;
            }
            Err(_) => {}
        }
        let mut unit = Unit {
            file,
            at: key.clone(),
            problems,
        };
        let value = match key.as_str() {
            "server" => unit.check::<RawServer>(value),
            "storage" => unit.check::<RawStorage>(value),
            "metrics" => unit.check::<RawMetrics>(value),
            "log" => unit.check::<RawLog>(value),
            "rules_file" => unit.check::<PathBuf>(value),
            "template_vars" => unit.check::<BTreeMap<String, String>>(value),
            "sources" => unit.each_entry(value, &mut broken.sources, |unit, value| {
                unit.check::<RawSource>(value)
            }),
            "templates" => {
                let mut names = BTreeSet::new();
                let mut templates = unit.each_entry(value, &mut names, |unit, value| {
                    unit.check::<TemplateSource>(value)
                });
                // A broken template stays, empty, so what refers to it finds it.
                if let Some(Value::Dict(_, templates)) = &mut templates {
                    for name in names {
                        let empty = Dict::from([("text".to_owned(), Value::from(""))]);
                        templates.insert(name, Value::from(empty));
                    }
                }
                templates
            }
            "sinks" => unit.each_entry(value, &mut broken.sinks, |unit, value| {
                unit.check_sink(value)
            }),
            "time_intervals" => {
                unit.each_entry(value, &mut broken.time_intervals, |unit, value| {
                    unit.check::<WindowSpec>(value)
                })
            }
            "routes" => unit.each_item(value, &mut broken.routes, |unit, value| {
                unit.check::<RouteSpec>(value)
            }),
            _ => unit
                .check::<T>(&alone)
                .and_then(|alone| alone.into_dict()?.remove(key)),
        };
        if let Some(value) = value {
            repaired.insert(key.clone(), value);
        }
    }
    (repaired, broken)
}

/// One part of the configuration being checked, and where it is.
struct Unit<'a> {
    file: Option<&'a Path>,
    /// Its key path, e.g. `sinks.ciso`.
    at: String,
    problems: &'a mut Problems,
}

impl Unit<'_> {
    /// `value` as a `T` would have it: repaired, or `None` when it cannot be.
    fn check<T: DeserializeOwned>(&mut self, value: &Value) -> Option<Value> {
        self.check_with(value, |value| value.deserialize::<T>().err())
    }

    /// Deserializes `value` (`error` says what is wrong with it, if anything), dropping each
    /// key that fails and trying again, until it deserializes (what is left is returned) or
    /// the failure is not about one key (`None`).
    fn check_with(
        &mut self,
        value: &Value,
        error: impl Fn(&Value) -> Option<figment::Error>,
    ) -> Option<Value> {
        let mut value = value.clone();
        let mut dropped: Vec<Vec<String>> = Vec::new();
        for _ in 0..MAX_PER_UNIT {
            let Some(errors) = error(&value) else {
                return Some(value);
            };
            let mut progress = false;
            for err in errors {
                if let Kind::MissingField(field) = &err.kind {
                    let mut path = err.path.clone();
                    path.push(field.to_string());
                    if dropped.contains(&path) {
                        // Reported already, as whatever was wrong with the value dropped.
                        return None;
                    }
                }
                let key = key_path(&self.at, &value, &err.path);
                self.problems.add_at(self.file, key, message(&err.kind));
                if remove(&mut value, &err.path) {
                    dropped.push(err.path);
                    progress = true;
                }
            }
            if !progress {
                return None;
            }
        }
        None
    }

    /// A sink's settings are checked as the type it names, so errors name their field.
    fn check_sink(&mut self, value: &Value) -> Option<Value> {
        let kind = match value {
            Value::Dict(_, table) => table.get("type").and_then(Value::as_str),
            _ => None,
        };
        let (Some(kind), Value::Dict(tag, table)) = (kind, value) else {
            return self.check::<SinkSpec>(value);
        };
        if !SinkSpec::TYPES.contains(&kind) {
            let unknown = Kind::UnknownVariant(kind.to_owned(), SinkSpec::TYPES);
            let key = format!("{}.type", self.at);
            self.problems.add_at(self.file, key, message(&unknown));
            return None;
        }
        let mut settings = table.clone();
        settings.remove("type");
        let kind = kind.to_owned();
        let mut repaired = self.check_with(&Value::Dict(*tag, settings), |value| {
            SinkSpec::from_settings(&kind, value).err()
        })?;
        if let Value::Dict(_, settings) = &mut repaired {
            settings.insert("type".to_owned(), Value::from(kind));
        }
        Some(repaired)
    }

    /// A table of named units (sources, sinks, templates), each checked; those that cannot be
    /// repaired are left out and named in `broken`.
    fn each_entry(
        &mut self,
        value: &Value,
        broken: &mut BTreeSet<String>,
        mut check: impl FnMut(&mut Unit<'_>, &Value) -> Option<Value>,
    ) -> Option<Value> {
        let Value::Dict(tag, entries) = value else {
            return self.check::<Dict>(value);
        };
        let mut repaired = Dict::new();
        for (name, value) in entries {
            match check(&mut self.child(format!(".{}", key_segment(name))), value) {
                Some(value) => {
                    repaired.insert(name.clone(), value);
                }
                None => {
                    broken.insert(name.clone());
                }
            }
        }
        Some(Value::Dict(*tag, repaired))
    }

    /// A list of units (routes), each checked; those that cannot be repaired are left out and
    /// their indices put in `broken`.
    fn each_item(
        &mut self,
        value: &Value,
        broken: &mut BTreeSet<usize>,
        mut check: impl FnMut(&mut Unit<'_>, &Value) -> Option<Value>,
    ) -> Option<Value> {
        let Value::Array(tag, items) = value else {
            return self.check::<Vec<Value>>(value);
        };
        let mut repaired = Vec::new();
        for (i, value) in items.iter().enumerate() {
            match check(&mut self.child(format!("[{i}]")), value) {
                Some(value) => repaired.push(value),
                None => {
                    broken.insert(i);
                }
            }
        }
        Some(Value::Array(*tag, repaired))
    }

    /// The part of this unit at `step` (`.name` or `[i]`).
    fn child(&mut self, step: String) -> Unit<'_> {
        Unit {
            file: self.file,
            at: self.at.clone() + &step,
            problems: self.problems,
        }
    }
}

/// What is wrong, in the configuration's words (a key, not a field).
fn message(kind: &Kind) -> String {
    match kind {
        Kind::UnknownField(name, expected) => {
            let hint = did_you_mean(name, expected.iter().copied());
            if hint.is_empty() {
                format!("unknown key `{name}`; known keys: {}", expected.join(", "))
            } else {
                format!("unknown key `{name}`{hint}")
            }
        }
        Kind::UnknownVariant(name, expected) => {
            let hint = did_you_mean(name, expected.iter().copied());
            if hint.is_empty() {
                format!("unknown value {name:?}; expected one of {expected:?}")
            } else {
                format!("unknown value {name:?}{hint}")
            }
        }
        Kind::MissingField(name) => format!("missing key `{name}`"),
        other => other.to_string(),
    }
}

/// `at` followed by figment's `path` inside `value`, array indices as `[i]`.
fn key_path(at: &str, value: &Value, path: &[String]) -> String {
    let mut key = at.to_owned();
    let mut value = Some(value);
    for step in path {
        if let Some(Value::Array(_, items)) = value {
            key.push_str(&format!("[{step}]"));
            value = step.parse().ok().and_then(|i: usize| items.get(i));
        } else {
            key.push('.');
            key.push_str(&key_segment(step));
            value = value
                .and_then(|v| v.as_dict())
                .and_then(|table| table.get(step));
        }
    }
    key
}

/// A key as TOML writes it: bare when it can be, quoted otherwise.
fn key_segment(name: &str) -> String {
    let bare = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if bare {
        name.to_owned()
    } else {
        format!("{name:?}")
    }
}

/// Removes the value at `path`; whether there was one.
fn remove(value: &mut Value, path: &[String]) -> bool {
    match (value, path) {
        (Value::Dict(_, table), [last]) => table.remove(last).is_some(),
        (Value::Dict(_, table), [first, rest @ ..]) => table
            .get_mut(first)
            .is_some_and(|value| remove(value, rest)),
        (Value::Array(_, items), [first, rest @ ..]) => match first.parse::<usize>() {
            Ok(i) if i < items.len() && rest.is_empty() => {
                items.remove(i);
                true
            }
            Ok(i) if i < items.len() => remove(&mut items[i], rest),
            _ => false,
        },
        _ => false,
    }
}
