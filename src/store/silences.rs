//! Silences as stored: what an operator said to keep quiet, from when to when, and why. Kept in
//! the database, not the configuration, so every daemon serving it applies the same ones
//! (each reads them again every second: [`Storage::silences`](super::Storage::silences)) and
//! they survive restarts. What a silence matches is decided in [`crate::silence`].

use jiff::Timestamp;
use serde::Serialize;

use super::{JobStatus, RouteTo};

/// Why a job is set aside instead of delivered: kept as its status and `quieted_by`, so
/// `replay` can deliver it later on request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Quiet {
    /// A silence, by its id, matched the (event, route, sink).
    Silenced(i64),
    /// The route's mute window, by its name, was active.
    Muted(String),
}

impl Quiet {
    pub const fn status(&self) -> JobStatus {
        match self {
            Self::Silenced(_) => JobStatus::Silenced,
            Self::Muted(_) => JobStatus::Muted,
        }
    }

    /// What the job's `quieted_by` column holds: the silence's id, or the window's name.
    pub fn by(&self) -> String {
        match self {
            Self::Silenced(id) => id.to_string(),
            Self::Muted(window) => window.clone(),
        }
    }
}

impl RouteTo {
    /// Why `sink`'s job is set aside, if it is.
    pub(crate) fn quiet_for(&self, sink: &str) -> Option<&Quiet> {
        self.quiet
            .iter()
            .find(|(quiet, _)| quiet == sink)
            .map(|(_, why)| why)
    }
}

/// What a silence matches; every one given must match (at least one is).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Matchers {
    /// A route's name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    /// A sink's name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sink: Option<String>,
    /// A source's name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// A glob over the event type, as routes' `events` (`alert.*`).
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub event_type: Option<String>,
    /// A CEL condition over the event, as routes' `when`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub when: Option<String>,
}

impl Matchers {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// A silence to add.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSilence {
    pub matchers: Matchers,
    pub starts_at: Timestamp,
    pub ends_at: Timestamp,
    pub comment: String,
    pub author: String,
}

/// A stored silence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Silence {
    pub id: i64,
    pub matchers: Matchers,
    pub starts_at: Timestamp,
    pub ends_at: Timestamp,
    pub comment: String,
    pub author: String,
    pub created_at: Timestamp,
}

/// Where a silence stands at a moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SilenceState {
    /// Starts later.
    Pending,
    Active,
    /// Ended (on time, or expired by an operator).
    Expired,
}

impl SilenceState {
    pub const ALL: [Self; 3] = [Self::Pending, Self::Active, Self::Expired];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Active => "active",
            Self::Expired => "expired",
        }
    }
}

impl std::fmt::Display for SilenceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

impl Silence {
    /// Where it stands at `now`: it holds from its start up to (not including) its end.
    pub fn state(&self, now: Timestamp) -> SilenceState {
        if now >= self.ends_at {
            SilenceState::Expired
        } else if now < self.starts_at {
            SilenceState::Pending
        } else {
            SilenceState::Active
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_silence_holds_from_its_start_up_to_its_end() {
        let t = |s: &str| -> Timestamp { s.parse().unwrap() };
        let silence = Silence {
            id: 1,
            matchers: Matchers {
                route: Some("r".into()),
                ..Matchers::default()
            },
            starts_at: t("2026-12-07T10:00:00Z"),
            ends_at: t("2026-12-07T18:00:00Z"),
            comment: "planned".into(),
            author: "alice".into(),
            created_at: t("2026-12-07T09:00:00Z"),
        };
        assert_eq!(
            silence.state(t("2026-12-07T09:59:59Z")),
            SilenceState::Pending
        );
        assert_eq!(
            silence.state(t("2026-12-07T10:00:00Z")),
            SilenceState::Active
        );
        assert_eq!(
            silence.state(t("2026-12-07T17:59:59.999Z")),
            SilenceState::Active
        );
        assert_eq!(
            silence.state(t("2026-12-07T18:00:00Z")),
            SilenceState::Expired
        );
        assert!(!silence.matchers.is_empty() && Matchers::default().is_empty());
    }
}
