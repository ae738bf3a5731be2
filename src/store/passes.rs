//! Reconcile passes, shared by every daemon serving the database: one row per source in
//! `reconcile_passes` says when its last pass began, who holds the one running, how the last
//! ended, and whether an operator asked for one (`hookroute reconcile --once`). When a pass
//! is due is decided once, here ([`PassRow::due`]); each backend reads the source's row,
//! decides and marks the pass begun in one transaction, so on PostgreSQL one replica
//! reconciles at a time, and the sender's API hears from the cluster once an interval.

use std::time::Duration;

use jiff::Timestamp;
use serde::Serialize;

use crate::duration::Since;

/// The columns of `reconcile_passes`, in [`PassRow`]'s order.
pub(crate) const PASS_COLUMNS: &str =
    "source, requested_at, started_at, held_by, finished_at, last_success, outcome, detail";

/// The outcome of a pass that succeeded.
pub const OK: &str = "ok";
/// The outcome of a pass whose key the API refused.
pub const REFUSED: &str = "refused";

/// One source's passes, as its row keeps them (times in unix milliseconds).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PassRow {
    pub source: String,
    /// When an operator asked for a pass now, until one begins.
    pub requested_at: Option<i64>,
    /// When the last pass began.
    pub started_at: Option<i64>,
    /// The daemon running a pass (a PostgreSQL replica's id), until it ends.
    pub held_by: Option<i64>,
    pub finished_at: Option<i64>,
    pub last_success: Option<i64>,
    /// How the last pass ended: `ok`, `failed` or `refused`.
    pub outcome: Option<String>,
    /// What it did, or why it failed (never the key).
    pub detail: Option<String>,
}

/// When a daemon's reconcile task may begin a pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    /// The source's interval: a pass begins at most once in it, whoever begins it.
    pub every: Duration,
    /// How long a pass may run before another daemon takes over from one that died in it.
    pub hold: Duration,
    /// When the task began: a daemon starting (or reloaded) passes at once, unless one began
    /// since.
    pub since: Timestamp,
}

/// A pass begun: why, and whether the source never had a successful one (its first then
/// looks back no further than the newest delivery stored from it: see `crate::reconcile`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Begun {
    pub due: Due,
    pub first: bool,
}

/// Why a pass is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Due {
    /// An operator asked for one.
    Requested,
    /// The task began after the last pass did.
    Start,
    /// The interval has passed.
    Interval,
}

impl PassRow {
    /// A source with no pass yet.
    pub fn new(source: &str) -> Self {
        Self {
            source: source.to_owned(),
            ..Self::default()
        }
    }

    /// Why a pass is due at `now` on `schedule`; `None` while another runs, or when the last
    /// began within the interval.
    pub fn due(&self, schedule: &Schedule, now: Timestamp) -> Option<Due> {
        let Some(started) = self.started_at else {
            return Some(Due::Start);
        };
        let ago = |d: Duration| {
            Since::Ago(d)
                .at(now)
                .map_or(i64::MIN, Timestamp::as_millisecond)
        };
        if self.held_by.is_some() && started > ago(schedule.hold) {
            return None;
        }
        let since = schedule.since.as_millisecond();
        // A key refused since this task began stops its passes (every daemon's) until a
        // reload begins it afresh or an operator asks.
        let refused = self.outcome.as_deref() == Some(REFUSED)
            && self.finished_at.is_some_and(|finished| finished >= since);
        if self.requested_at.is_some() {
            Some(Due::Requested)
        } else if refused {
            None
        } else if started < since {
            Some(Due::Start)
        } else if started <= ago(schedule.every) {
            Some(Due::Interval)
        } else {
            None
        }
    }

    /// What beginning a pass that is `due` on this row means.
    pub fn begun_for(&self, due: Due) -> Begun {
        Begun {
            due,
            first: self.last_success.is_none(),
        }
    }

    /// The row once `by` began a pass at `now`: it answers any request made before (the
    /// request is taken, not compared by time, so hosts' clocks never matter).
    pub fn begun(mut self, by: i64, now: Timestamp) -> Self {
        self.started_at = Some(now.as_millisecond());
        self.held_by = Some(by);
        self.requested_at = None;
        self
    }

    /// The source's passes in a line, as `hookroute reconcile` and the status page say it:
    /// the last one's start, outcome and detail, and the last success.
    pub fn said(&self) -> String {
        let at = |ms: Option<i64>| {
            ms.and_then(|ms| Timestamp::from_millisecond(ms).ok())
                .map_or_else(|| "never".to_owned(), |at| at.to_string())
        };
        let source = crate::text::printable(&self.source);
        let Some(started) = self.started_at else {
            return format!("{source}: no pass yet");
        };
        let state = if self.held_by.is_some() {
            "running"
        } else {
            self.outcome.as_deref().unwrap_or_default()
        };
        format!(
            "{source}: last pass {} {state}: {}; last success {}",
            at(Some(started)),
            crate::text::printable(self.detail.as_deref().unwrap_or("")),
            at(self.last_success)
        )
    }
}

/// How far back a pass looks at `now`: `lookback`, and for a source's first successful pass
/// no further than `floor`, the newest delivery stored from it. Webhooks stored before the
/// source had an API were keyed by their payload id, not their job, so a first pass cannot
/// match them; what came after the newest of them is what was missed.
pub fn since(lookback: Duration, now: Timestamp, floor: Option<Timestamp>) -> Option<Timestamp> {
    Since::Ago(lookback).at(now).max(floor)
}

/// How a pass ended, as its row records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassEnd {
    /// [`OK`], [`REFUSED`], `failed` or `rate_limited`.
    pub outcome: &'static str,
    pub detail: String,
}

impl PassEnd {
    /// Whether the pass succeeded: its end is the source's last success.
    pub fn succeeded(&self) -> bool {
        self.outcome == OK
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: i64 = 60_000;

    fn at(ms: i64) -> Timestamp {
        Timestamp::from_millisecond(ms).unwrap()
    }

    fn schedule(since: i64) -> Schedule {
        Schedule {
            every: Duration::from_secs(600),
            hold: Duration::from_secs(60),
            since: at(since),
        }
    }

    #[test]
    fn a_pass_is_due_at_start_at_the_interval_and_when_asked() {
        let now = 100 * MINUTE;
        assert_eq!(
            PassRow::new("cl").due(&schedule(now), at(now)),
            Some(Due::Start)
        );
        let ended = |started| PassRow {
            started_at: Some(started),
            finished_at: Some(started + 1000),
            ..PassRow::new("cl")
        };
        // Another daemon's pass since this task began covers its start.
        assert_eq!(
            ended(now - MINUTE).due(&schedule(now - 2 * MINUTE), at(now)),
            None
        );
        assert_eq!(
            ended(now - MINUTE).due(&schedule(now), at(now)),
            Some(Due::Start)
        );
        assert_eq!(
            ended(now - 10 * MINUTE).due(&schedule(0), at(now)),
            Some(Due::Interval)
        );
        assert_eq!(ended(now - 9 * MINUTE).due(&schedule(0), at(now)), None);
        let asked = PassRow {
            requested_at: Some(now - 1000),
            ..ended(now - MINUTE)
        };
        assert_eq!(asked.due(&schedule(0), at(now)), Some(Due::Requested));
    }

    #[test]
    fn a_refused_key_stops_passes_until_a_task_begins_afresh_or_an_operator_asks() {
        let now = 100 * MINUTE;
        let refused = PassRow {
            started_at: Some(now - 20 * MINUTE),
            finished_at: Some(now - 20 * MINUTE),
            outcome: Some(REFUSED.into()),
            ..PassRow::new("cl")
        };
        assert_eq!(refused.due(&schedule(0), at(now)), None);
        assert_eq!(
            refused.due(&schedule(now - MINUTE), at(now)),
            Some(Due::Start)
        );
        let asked = PassRow {
            requested_at: Some(now),
            ..refused
        };
        assert_eq!(asked.due(&schedule(0), at(now)), Some(Due::Requested));
    }

    #[test]
    fn a_first_pass_looks_no_further_back_than_the_newest_delivery() {
        let now = at(100 * MINUTE);
        let day = Duration::from_secs(24 * 3600);
        let back = at(100 * MINUTE - 24 * 60 * MINUTE);
        assert_eq!(since(day, now, None), Some(back));
        assert_eq!(
            since(day, now, Some(at(90 * MINUTE))),
            Some(at(90 * MINUTE))
        );
        let older = at(100 * MINUTE - 30 * 60 * MINUTE);
        assert_eq!(
            since(day, now, Some(older)),
            Some(back),
            "the lookback still bounds it"
        );
        let row = PassRow::new("cl");
        assert!(row.begun_for(Due::Start).first);
        let succeeded = PassRow {
            last_success: Some(1),
            ..row
        };
        assert!(!succeeded.begun_for(Due::Interval).first);
    }

    #[test]
    fn a_running_pass_is_nobody_elses_until_its_hold_lapses() {
        let now = 100 * MINUTE;
        let running = PassRow::new("cl").begun(7, at(now - 30_000));
        let asked = PassRow {
            requested_at: Some(now),
            ..running.clone()
        };
        assert_eq!(asked.due(&schedule(now), at(now)), None);
        // Its daemon died in it: another takes over once the hold has passed.
        let stale = PassRow::new("cl").begun(7, at(now - 2 * MINUTE));
        assert_eq!(stale.due(&schedule(now), at(now)), Some(Due::Start));
    }
}
