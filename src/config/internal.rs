//! `[self]`: which internal events the daemon emits about itself, and when (see
//! [`crate::internal`]). Every setting has a default, so a configuration without the table
//! gets the events a team wants to hear.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::Deserialize;

use super::Problems;
use crate::duration::HumanDuration;
use crate::notice::Kind;

/// `[self]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawSelf {
    /// The kinds on, by name (`sink.failing`, `dead_letter`, …); the defaults if absent.
    pub events: Option<Vec<String>>,
    /// A sink is failing after this many failed calls in a row…
    pub failing_after_attempts: u32,
    /// …or after failing for this long.
    pub failing_after: HumanDuration,
    /// A source's refused signatures within `signature_window` that make it failing.
    pub signature_failures: u32,
    pub signature_window: HumanDuration,
    /// A commit slower than this counts as storage degraded.
    pub storage_slow: HumanDuration,
    /// Most events of one kind a daemon emits in an hour; past it they are counted, not sent.
    pub max_per_hour: u32,
}

impl Default for RawSelf {
    fn default() -> Self {
        Self {
            events: None,
            failing_after_attempts: 5,
            failing_after: HumanDuration(Duration::from_secs(5 * 60)),
            signature_failures: 20,
            signature_window: HumanDuration(Duration::from_secs(60)),
            storage_slow: HumanDuration(Duration::from_secs(5)),
            max_per_hour: 30,
        }
    }
}

/// `[self]`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InternalConfig {
    pub kinds: BTreeSet<Kind>,
    pub failing_after_attempts: u32,
    pub failing_after: Duration,
    pub signature_failures: u32,
    pub signature_window: Duration,
    pub storage_slow: Duration,
    pub max_per_hour: u32,
}

impl Default for InternalConfig {
    fn default() -> Self {
        validate(RawSelf::default(), &mut Problems::default())
    }
}

impl InternalConfig {
    pub fn on(&self, kind: Kind) -> bool {
        self.kinds.contains(&kind)
    }
}

pub(super) fn validate(raw: RawSelf, problems: &mut Problems) -> InternalConfig {
    let kinds = match raw.events {
        None => Kind::DEFAULT.into_iter().collect(),
        Some(names) => names
            .iter()
            .enumerate()
            .filter_map(|(i, name)| {
                let kind = Kind::parse(name);
                if kind.is_none() {
                    let known: Vec<&str> = Kind::ALL.iter().map(|k| k.name()).collect();
                    problems.add(
                        format!("self.events[{i}]"),
                        format!(
                            "{name:?} is not an internal event; one of: {}",
                            known.join(", ")
                        ),
                    );
                }
                kind
            })
            .collect(),
    };
    for (key, value) in [
        ("failing_after_attempts", raw.failing_after_attempts),
        ("signature_failures", raw.signature_failures),
        ("max_per_hour", raw.max_per_hour),
    ] {
        if value == 0 {
            problems.add(format!("self.{key}"), "must be at least 1");
        }
    }
    if raw.signature_window.0.is_zero() {
        problems.add("self.signature_window", "must be longer than 0s");
    }
    InternalConfig {
        kinds,
        failing_after_attempts: raw.failing_after_attempts.max(1),
        failing_after: raw.failing_after.0,
        signature_failures: raw.signature_failures.max(1),
        signature_window: raw.signature_window.0,
        storage_slow: raw.storage_slow.0,
        max_per_hour: raw.max_per_hour.max(1),
    }
}
