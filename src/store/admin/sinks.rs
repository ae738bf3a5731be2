//! `hookroute sink`: each sink's state as the operator sees it, and pausing and resuming one.
//! A pause is a row every daemon reads within a second, so it holds on every replica.

use std::time::Duration;

use jiff::Timestamp;
use serde::Serialize;

use super::Tools;
use crate::store::{Pause, SinkChange, SinkChanged, SinkState, StoreError};

/// One sink, as `sink list` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct SinkStatus {
    pub sink: String,
    /// `active`, `failing` (failed since its last success), or `paused`.
    pub state: &'static str,
    /// Whether the configuration (as the command read it) has the sink.
    pub configured: bool,
    #[serde(flatten)]
    pub health: SinkState,
    /// Jobs pending or waiting for a retry.
    pub waiting: u64,
    /// How long the oldest waiting job has waited, in seconds.
    pub oldest_waiting_seconds: u64,
    pub dead: u64,
}

impl Tools {
    /// Every sink that is `configured`, failing, paused or has jobs, by name, at `now`.
    ///
    /// # Errors
    /// On a database error.
    pub fn sinks(
        &self,
        configured: &[String],
        now: Timestamp,
    ) -> Result<Vec<SinkStatus>, StoreError> {
        let (states, queues) = self.backend.sinks(now)?;
        let mut names: Vec<&String> = configured
            .iter()
            .chain(states.iter().map(|s| &s.sink))
            .chain(queues.iter().map(|q| &q.sink))
            .collect();
        names.sort();
        names.dedup();
        Ok(names
            .into_iter()
            .map(|name| {
                let health = states
                    .iter()
                    .find(|s| &s.sink == name)
                    .cloned()
                    .unwrap_or_else(|| SinkState::healthy(name));
                let queue = queues.iter().find(|q| &q.sink == name);
                let state = match (&health.paused_at(now), &health.streak) {
                    (Some(_), _) => "paused",
                    (None, Some(_)) => "failing",
                    (None, None) => "active",
                };
                SinkStatus {
                    sink: name.clone(),
                    state,
                    configured: configured.contains(name),
                    health,
                    waiting: queue.map_or(0, |q| q.waiting),
                    oldest_waiting_seconds: queue.map_or(0, |q| q.oldest_waiting.as_secs()),
                    dead: queue.map_or(0, |q| q.dead),
                }
            })
            .collect())
    }

    /// Pauses `sink` at `now` for `time` (or until resumed): its jobs wait, and no attempt
    /// is made, until then.
    ///
    /// # Errors
    /// On a database error.
    pub fn pause_sink(
        &mut self,
        sink: &str,
        (by, comment): (&str, &str),
        time: Option<Duration>,
        now: Timestamp,
    ) -> Result<SinkChanged, StoreError> {
        let until = time.map(|time| crate::store::sinks::later(now, time));
        let pause = Pause {
            since: now,
            until,
            by: by.to_owned(),
            comment: comment.to_owned(),
            auto: false,
            next_probe: now,
        };
        self.backend
            .change_sink(sink, SinkChange::Pause(pause), now)
    }

    /// Resumes `sink` at `now`: its waiting jobs are due at once, oldest first. `applied` is
    /// false when it was neither paused nor failing.
    ///
    /// # Errors
    /// On a database error.
    pub fn resume_sink(&mut self, sink: &str, now: Timestamp) -> Result<SinkChanged, StoreError> {
        self.backend.change_sink(sink, SinkChange::Resume, now)
    }
}
