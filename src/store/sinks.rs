//! A sink's health, shared by every daemon serving the database: its failure streak (the calls
//! that failed since its last success) and whether it is paused. What a change means is
//! decided once, here ([`SinkState::apply`]); each backend reads the sink's row, applies the
//! change and writes the row back in one transaction, so two replicas' outcomes for one sink
//! never overwrite each other's counts.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use serde::Serialize;

/// Who pauses a sink when its outage outlasts `pause_after`.
pub const AUTOMATIC: &str = "hookroute";

/// One sink's health; the default is a healthy, running sink (no row is kept for it).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SinkState {
    pub sink: String,
    pub streak: Option<Streak>,
    pub pause: Option<Pause>,
}

/// Calls to a sink that failed since its last success.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Streak {
    pub since: Timestamp,
    pub failures: u32,
    pub last_error: String,
    pub last_at: Timestamp,
    /// Whether the last failure was an outage's (a connection error, a timeout, 5xx, 429)
    /// rather than a refusal that retrying cannot change.
    pub transient: bool,
}

/// A paused sink: its jobs wait instead of using up their attempts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Pause {
    pub since: Timestamp,
    /// When an operator's pause (`--for`) ends by itself.
    pub until: Option<Timestamp>,
    /// [`AUTOMATIC`], or the operator.
    pub by: String,
    pub comment: String,
    /// Paused by hookroute for an outage: one probe attempt every `probe_interval`, and the
    /// first success resumes it. An operator's pause makes no attempts at all.
    pub auto: bool,
    /// When the next probe may be made.
    pub next_probe: Timestamp,
}

/// What happened to a sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkChange {
    /// A call failed: opens or extends the streak, and pauses the sink when an outage's
    /// streak has lasted `pause_after`.
    Failed {
        error: String,
        transient: bool,
        pause_after: Option<Duration>,
        probe_interval: Duration,
    },
    /// A call succeeded: ends the streak, and a pause hookroute made.
    Succeeded,
    /// An operator pauses the sink (replacing any pause).
    Pause(Pause),
    /// An operator resumes the sink (or their pause ran out): ends the pause and the streak.
    Resume,
    /// Claims the paused sink's next probe: only one daemon makes it.
    Probe { interval: Duration },
}

/// A change as applied: the sink before and after, and whether it changed anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkChanged {
    pub before: SinkState,
    pub after: SinkState,
    pub applied: bool,
}

impl SinkChanged {
    /// Whether this change ended a pause: the sink's waiting retries are due now, so its
    /// backlog drains at once, oldest first.
    pub fn resumed(&self) -> bool {
        self.before.pause.is_some() && self.after.pause.is_none()
    }

    /// Whether this change paused the sink.
    pub fn paused(&self) -> bool {
        self.before.pause.is_none() && self.after.pause.is_some()
    }
}

impl SinkState {
    /// A running sink with no failures.
    pub fn healthy(sink: &str) -> Self {
        Self {
            sink: sink.to_owned(),
            ..Self::default()
        }
    }

    /// Whether there is nothing to keep: a healthy, running sink has no row.
    pub fn is_healthy(&self) -> bool {
        self.streak.is_none() && self.pause.is_none()
    }

    /// The pause in force at `now`: an operator's ends at its `until`.
    pub fn paused_at(&self, now: Timestamp) -> Option<&Pause> {
        self.pause
            .as_ref()
            .filter(|pause| pause.until.is_none_or(|until| until > now))
    }

    /// The sink after `change` at `now`, and whether it changed anything.
    pub fn apply(&self, change: SinkChange, now: Timestamp) -> SinkChanged {
        let mut after = self.clone();
        let applied = match change {
            SinkChange::Failed {
                error,
                transient,
                pause_after,
                probe_interval,
            } => {
                let streak = after.streak.get_or_insert_with(|| Streak {
                    since: now,
                    failures: 0,
                    last_error: String::new(),
                    last_at: now,
                    transient,
                });
                streak.failures = streak.failures.saturating_add(1);
                streak.last_error = error;
                streak.last_at = now;
                streak.transient = transient;
                let outage = now.duration_since(streak.since);
                let due = pause_after.is_some_and(|after| {
                    transient
                        && streak.failures > 1
                        && outage >= SignedDuration::try_from(after).unwrap_or(SignedDuration::MAX)
                });
                if due && after.pause.is_none() {
                    let comment = format!(
                        "{} failed attempts since {}; the last: {}",
                        streak.failures, streak.since, streak.last_error
                    );
                    after.pause = Some(Pause {
                        since: now,
                        until: None,
                        by: AUTOMATIC.to_owned(),
                        comment,
                        auto: true,
                        next_probe: later(now, probe_interval),
                    });
                }
                true
            }
            SinkChange::Succeeded => {
                let auto = after.pause.as_ref().is_some_and(|pause| pause.auto);
                let changed = after.streak.is_some() || auto;
                after.streak = None;
                if auto {
                    after.pause = None;
                }
                changed
            }
            SinkChange::Pause(pause) => {
                after.pause = Some(pause);
                true
            }
            SinkChange::Resume => {
                let changed = !after.is_healthy();
                after = Self::healthy(&self.sink);
                changed
            }
            SinkChange::Probe { interval } => match &mut after.pause {
                Some(pause) if pause.auto && pause.next_probe <= now => {
                    pause.next_probe = later(now, interval);
                    true
                }
                _ => false,
            },
        };
        SinkChanged {
            before: self.clone(),
            after,
            applied,
        }
    }
}

/// `now` plus `wait`, saturating.
pub(crate) fn later(now: Timestamp, wait: Duration) -> Timestamp {
    now.saturating_add(SignedDuration::try_from(wait).unwrap_or(SignedDuration::MAX))
        .unwrap_or(Timestamp::MAX)
}

/// A sink's row as both backends store it (unix milliseconds; absent parts as NULLs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct SinkRow {
    pub sink: String,
    pub failing_since: Option<i64>,
    pub failures: i64,
    pub last_error: Option<String>,
    pub last_failure_at: Option<i64>,
    pub transient: bool,
    pub paused_since: Option<i64>,
    pub paused_until: Option<i64>,
    pub paused_by: Option<String>,
    pub pause_comment: Option<String>,
    pub pause_auto: bool,
    pub next_probe: Option<i64>,
}

impl From<&SinkState> for SinkRow {
    fn from(state: &SinkState) -> Self {
        let (streak, pause) = (state.streak.as_ref(), state.pause.as_ref());
        Self {
            sink: state.sink.clone(),
            failing_since: streak.map(|s| s.since.as_millisecond()),
            failures: streak.map_or(0, |s| i64::from(s.failures)),
            last_error: streak.map(|s| s.last_error.clone()),
            last_failure_at: streak.map(|s| s.last_at.as_millisecond()),
            transient: streak.is_some_and(|s| s.transient),
            paused_since: pause.map(|p| p.since.as_millisecond()),
            paused_until: pause.and_then(|p| p.until).map(Timestamp::as_millisecond),
            paused_by: pause.map(|p| p.by.clone()),
            pause_comment: pause.map(|p| p.comment.clone()),
            pause_auto: pause.is_some_and(|p| p.auto),
            next_probe: pause.map(|p| p.next_probe.as_millisecond()),
        }
    }
}

impl From<SinkRow> for SinkState {
    fn from(row: SinkRow) -> Self {
        use super::from_ms;
        let streak = row.failing_since.map(|since| Streak {
            since: from_ms(since),
            failures: u32::try_from(row.failures).unwrap_or(u32::MAX),
            last_error: row.last_error.unwrap_or_default(),
            last_at: from_ms(row.last_failure_at.unwrap_or(since)),
            transient: row.transient,
        });
        let pause = row.paused_since.map(|since| Pause {
            since: from_ms(since),
            until: row.paused_until.map(from_ms),
            by: row.paused_by.unwrap_or_default(),
            comment: row.pause_comment.unwrap_or_default(),
            auto: row.pause_auto,
            next_probe: from_ms(row.next_probe.unwrap_or(since)),
        });
        Self {
            sink: row.sink,
            streak,
            pause,
        }
    }
}

/// The columns of a sink's row, in [`SinkRow`]'s order: what both backends select and write.
pub(crate) const SINK_COLUMNS: &str = "sink, failing_since, failures, last_error, last_failure_at, transient, \
     paused_since, paused_until, paused_by, pause_comment, pause_auto, next_probe";

#[cfg(test)]
mod tests {
    use super::*;

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + second).unwrap()
    }

    fn failed(transient: bool) -> SinkChange {
        SinkChange::Failed {
            error: "HTTP 500".into(),
            transient,
            pause_after: Some(Duration::from_secs(900)),
            probe_interval: Duration::from_secs(60),
        }
    }

    #[test]
    fn an_outage_pauses_after_pause_after_and_a_success_resumes() {
        let mut state = SinkState::healthy("slack");
        for minute in 0..15 {
            let changed = state.apply(failed(true), at(minute * 60));
            assert!(!changed.paused(), "minute {minute}");
            state = changed.after;
        }
        let streak = state.streak.clone().unwrap();
        assert_eq!((streak.since, streak.failures), (at(0), 15));
        let changed = state.apply(failed(true), at(900));
        assert!(changed.paused());
        let pause = changed.after.pause.clone().unwrap();
        assert!(pause.auto && pause.by == AUTOMATIC && pause.next_probe == at(960));
        state = changed.after;

        let early = state.apply(
            SinkChange::Probe {
                interval: Duration::from_secs(60),
            },
            at(930),
        );
        assert!(!early.applied, "one probe per interval");
        let probe = state.apply(
            SinkChange::Probe {
                interval: Duration::from_secs(60),
            },
            at(960),
        );
        assert!(probe.applied);
        assert_eq!(probe.after.pause.as_ref().unwrap().next_probe, at(1020));
        assert!(
            !probe
                .after
                .apply(
                    SinkChange::Probe {
                        interval: Duration::from_secs(60)
                    },
                    at(960)
                )
                .applied
        );

        let success = probe.after.apply(SinkChange::Succeeded, at(1000));
        assert!(success.applied && success.resumed());
        assert!(success.after.is_healthy());
        assert!(!success.after.apply(SinkChange::Succeeded, at(1001)).applied);
    }

    #[test]
    fn refusals_never_pause_and_an_operators_pause_outlives_a_success() {
        let mut state = SinkState::healthy("slack");
        for minute in 0..30 {
            state = state.apply(failed(false), at(minute * 60)).after;
        }
        assert!(state.pause.is_none(), "a 404 is not an outage");

        let pause = Pause {
            since: at(0),
            until: Some(at(7200)),
            by: "alice".into(),
            comment: "maintenance".into(),
            auto: false,
            next_probe: at(0),
        };
        let paused = state.apply(SinkChange::Pause(pause), at(0)).after;
        let success = paused.apply(SinkChange::Succeeded, at(10)).after;
        assert!(success.paused_at(at(10)).is_some() && success.streak.is_none());
        assert!(success.paused_at(at(7200)).is_none(), "ends by itself");
        assert!(
            !success
                .apply(
                    SinkChange::Probe {
                        interval: Duration::from_secs(1)
                    },
                    at(20)
                )
                .applied
        );
        let resumed = success.apply(SinkChange::Resume, at(30));
        assert!(resumed.resumed() && resumed.after.is_healthy());
    }

    #[test]
    fn a_row_reads_back_as_written() {
        let mut state = SinkState::healthy("mail");
        state = state.apply(failed(true), at(0)).after;
        state = state.apply(failed(true), at(1000)).after;
        assert!(state.pause.is_some());
        assert_eq!(SinkState::from(SinkRow::from(&state)), state);
        let healthy = SinkState::healthy("mail");
        assert_eq!(SinkState::from(SinkRow::from(&healthy)), healthy);
    }
}
