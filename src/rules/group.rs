//! Grouping (a route's `group`), Alertmanager's `group_by`/`group_wait`/`group_interval`: the
//! events of a route that share a key go to each sink as one delivery. The first event of a
//! group waits `wait` for others; later events of a still-open group go out at most every
//! `interval`. Pure: the store keeps each group's state in its jobs (their shared due time)
//! and applies [`due`] in the transaction that stores the event, so a group is as durable as
//! its events.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use serde::Deserialize;

use crate::duration::HumanDuration;
use crate::event::Event;

/// Most events in one grouped delivery unless the route says otherwise.
pub const DEFAULT_MAX: usize = 50;

/// The type of hookroute's dead-letter events, which a route without a `group` of its own
/// groups by sink ([`dead_letters`]): a revoked webhook is one message, not hundreds.
pub const DEAD_LETTER: &str = "hookroute.dead_letter";

/// How dead-letter events group unless their route says otherwise: by sink, the first
/// waiting half a minute for the rest, then at most one message every five minutes.
pub fn dead_letters() -> &'static Group {
    static GROUP: std::sync::LazyLock<Group> = std::sync::LazyLock::new(|| Group {
        by: vec!["data.sink".to_owned()],
        wait: default_wait().0,
        interval: default_interval().0,
        max: DEFAULT_MAX,
    });
    &GROUP
}

/// A route's `group` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupSpec {
    /// What events of one group share: `source`, `type`, or a payload field (`data.domain`,
    /// `payload.id`). None: every event of the route is one group.
    #[serde(default)]
    pub by: Vec<String>,
    /// How long a group's first event waits for others.
    #[serde(default = "default_wait")]
    pub wait: HumanDuration,
    /// How often an open group's later events go out, at most.
    #[serde(default = "default_interval")]
    pub interval: HumanDuration,
    /// Most events in one delivery; more wait for the next.
    pub max: Option<usize>,
}

fn default_wait() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}

fn default_interval() -> HumanDuration {
    HumanDuration(Duration::from_secs(5 * 60))
}

/// A compiled `group`.
#[derive(Debug, Clone)]
pub struct Group {
    pub by: Vec<String>,
    pub wait: Duration,
    pub interval: Duration,
    pub max: usize,
}

impl Group {
    /// # Errors
    /// Every problem, as its key (under `at`) and what is wrong.
    pub fn compile(at: &str, spec: &GroupSpec) -> Result<Self, Vec<(String, String)>> {
        let mut problems = Vec::new();
        for (i, field) in spec.by.iter().enumerate() {
            let known = matches!(field.as_str(), "source" | "type")
                || field
                    .strip_prefix("data.")
                    .or_else(|| field.strip_prefix("payload."))
                    .is_some_and(|path| path.split('.').all(|step| !step.is_empty()));
            if !known {
                problems.push((
                    format!("{at}.group.by[{i}]"),
                    format!(
                        "{field:?}: group by \"source\", \"type\", or a payload field as \
                         \"data.<field>\" or \"payload.<field>\""
                    ),
                ));
            }
        }
        if spec.interval.0.is_zero() {
            problems.push((
                format!("{at}.group.interval"),
                "must be longer than 0s".to_owned(),
            ));
        }
        let max = spec.max.unwrap_or(DEFAULT_MAX);
        if max == 0 {
            problems.push((format!("{at}.group.max"), "must be at least 1".to_owned()));
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Self {
            by: spec.by.clone(),
            wait: spec.wait.0,
            interval: spec.interval.0,
            max,
        })
    }

    /// The key `event` is grouped by: its `by` values, as a JSON array of strings (a missing
    /// field is empty). Stored with each job, and shown to the person reading the message.
    pub fn key(&self, event: &Event) -> String {
        let values: Vec<String> = self
            .by
            .iter()
            .map(|field| match field.as_str() {
                "source" => event.source.clone(),
                "type" => event.event_type.clone(),
                path => {
                    let (root, rest) = path.split_once('.').unwrap_or((path, ""));
                    let mut value = match root {
                        "data" => event.data(),
                        _ => event.payload.value(),
                    };
                    for step in rest.split('.') {
                        value = value.get(step).unwrap_or(&serde_json::Value::Null);
                    }
                    match value {
                        serde_json::Value::String(text) => text.clone(),
                        serde_json::Value::Null => String::new(),
                        other => other.to_string(),
                    }
                }
            })
            .collect();
        // NUL is kept out of the key: PostgreSQL keeps no NUL in text.
        serde_json::to_string(&values)
            .unwrap_or_default()
            .replace("\\u0000", "\u{FFFD}")
    }
}

/// When a new job of a group is due, its group's newest job being due at `latest` (`waiting`:
/// not yet delivered): with the flush it is waiting for, if that is still to come; else at the
/// group's next interval, if the group is still open; else a new group, after `wait`.
pub fn due(
    latest: Option<(Timestamp, bool)>,
    now: Timestamp,
    wait: Duration,
    interval: Duration,
) -> Timestamp {
    let after = |at: Timestamp, span: Duration| {
        SignedDuration::try_from(span)
            .ok()
            .and_then(|span| at.checked_add(span).ok())
            .unwrap_or(Timestamp::MAX)
    };
    match latest {
        Some((flush, true)) if flush > now => flush,
        Some((flush, _)) if after(flush, interval) > now => after(flush, interval),
        _ => after(now, wait),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    const WAIT: Duration = Duration::from_secs(30);
    const INTERVAL: Duration = Duration::from_secs(300);

    #[test]
    fn a_group_waits_then_goes_out_at_most_every_interval() {
        // The first event opens a group, due after the wait.
        assert_eq!(due(None, t(0), WAIT, INTERVAL), t(30));
        // Others join that flush.
        assert_eq!(due(Some((t(30), true)), t(10), WAIT, INTERVAL), t(30));
        // After the flush, the group is open: the next flush an interval after it.
        assert_eq!(due(Some((t(30), false)), t(31), WAIT, INTERVAL), t(330));
        // A flush being delivered as the event comes: the next one.
        assert_eq!(due(Some((t(30), true)), t(30), WAIT, INTERVAL), t(330));
        // Once an interval passed with nothing, the group is closed: a new one.
        assert_eq!(due(Some((t(30), false)), t(330), WAIT, INTERVAL), t(360));
    }

    #[test]
    fn keys_name_their_values_and_a_missing_field_is_empty() {
        let spec = GroupSpec {
            by: vec![
                "source".into(),
                "type".into(),
                "data.domain".into(),
                "data.a.b".into(),
            ],
            wait: default_wait(),
            interval: default_interval(),
            max: None,
        };
        let group = Group::compile("routes[0]", &spec).unwrap();
        assert_eq!(group.max, DEFAULT_MAX);
        let event = Event::parse(
            "cl",
            br#"{"type": "scan.completed", "data": {"domain": "a.com", "a": {"b": 7}}}"#,
            None,
            None,
        )
        .unwrap();
        assert_eq!(group.key(&event), r#"["cl","scan.completed","a.com","7"]"#);
        let bare = Event::parse("cl", br#"{"type": "x"}"#, None, None).unwrap();
        assert_eq!(group.key(&bare), r#"["cl","x","",""]"#);
    }

    #[test]
    fn mistakes_name_the_key() {
        let spec = GroupSpec {
            by: vec!["domain".into(), "data.".into()],
            wait: default_wait(),
            interval: HumanDuration(Duration::ZERO),
            max: Some(0),
        };
        let problems = Group::compile("routes[2] (\"x\")", &spec).unwrap_err();
        let keys: Vec<&str> = problems.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "routes[2] (\"x\").group.by[0]",
                "routes[2] (\"x\").group.by[1]",
                "routes[2] (\"x\").group.interval",
                "routes[2] (\"x\").group.max"
            ]
        );
    }
}
