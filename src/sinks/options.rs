//! How a sink's jobs are run: `[sinks.<name>.delivery]`, with its retry policy. A leaf that the
//! sinks' configurations and the delivery engine both read; what an outcome means for a job is
//! decided in `delivery::retry`.

use std::time::Duration;

use serde::Deserialize;

use crate::duration::HumanDuration;

/// How a sink's jobs are run (`[sinks.<name>.delivery]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryOptions {
    /// Jobs of this sink in flight at once.
    pub concurrency: usize,
    /// One attempt's time limit; for `exec`, after it the whole process group is killed.
    pub timeout: HumanDuration,
    pub retry: RetryPolicy,
    /// How long the sink may fail without a success (an outage: connection errors,
    /// timeouts, 5xx, 429) before it is paused: its jobs wait instead of using up their
    /// attempts. `0s`: never.
    pub pause_after: HumanDuration,
    /// How often a paused sink is tried with one job; the first success resumes it.
    pub probe_interval: HumanDuration,
}

impl DeliveryOptions {
    /// `pause_after`, unless pausing is off.
    pub fn pause_after(&self) -> Option<Duration> {
        Some(self.pause_after.0).filter(|after| !after.is_zero())
    }

    /// Every problem, each as `key: what is wrong`.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.concurrency == 0 {
            problems.push("delivery.concurrency: must be at least 1".into());
        }
        if self.probe_interval.0.is_zero() {
            problems.push("delivery.probe_interval: must be longer than 0s".into());
        }
        if self.retry.max_attempts == 0 {
            problems.push("delivery.retry.max_attempts: must be at least 1".into());
        }
        problems
    }
}

impl Default for DeliveryOptions {
    fn default() -> Self {
        Self {
            concurrency: 4,
            timeout: HumanDuration(Duration::from_secs(30)),
            retry: RetryPolicy::default(),
            pause_after: HumanDuration(Duration::from_secs(15 * 60)),
            probe_interval: HumanDuration(Duration::from_secs(60)),
        }
    }
}

/// Per-sink retry settings (`[sinks.<name>.delivery.retry]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    pub base: HumanDuration,
    pub cap: HumanDuration,
    pub max_attempts: u32,
    pub max_age: HumanDuration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            base: HumanDuration(Duration::from_secs(2)),
            cap: HumanDuration(Duration::from_secs(30 * 60)),
            max_attempts: 12,
            max_age: HumanDuration(Duration::from_secs(24 * 3600)),
        }
    }
}

impl RetryPolicy {
    /// The wait before attempt `attempt + 1`, for a draw `unit` in [0, 1).
    pub fn backoff(&self, attempt: u32, unit: f64) -> Duration {
        let exponent = attempt.saturating_sub(1).min(32);
        let ceiling = self
            .base
            .0
            .saturating_mul(1u32 << exponent.min(31))
            .min(self.cap.0);
        ceiling.mul_f64(unit.clamp(0.0, 1.0))
    }
}
