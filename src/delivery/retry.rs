//! What a failed attempt means for its job: this is the one place that decides. Pure: the
//! caller supplies the time and the random draw.
//!
//! Backoff is exponential with full jitter (a uniformly random wait between zero and
//! `min(cap, base * 2^(attempt-1))`), which spreads retries from many jobs apart. A job dies
//! on a permanent error, after `max_attempts`, or when the next try would fall after
//! `max_age` from the job's creation. A sink that asks us to wait (429 + Retry-After) is
//! waited for, within the same limits.

use jiff::{SignedDuration, Timestamp};

use crate::sinks::{RetryPolicy, SinkError};
use crate::store::{AttemptOutcome, Job};

/// The job's fate after attempt `job.attempt` ended with `result` at `now`, under `policy`.
/// While its sink is `paused` for an outage, a failure that is not the job's own (anything
/// but a refusal) uses no attempt and keeps the job at its place in the queue: due from its
/// creation, for the next probe or the sink's resume.
pub fn decide(
    policy: &RetryPolicy,
    job: &Job,
    result: Result<String, &SinkError>,
    (now, paused): (Timestamp, bool),
    unit: f64,
) -> AttemptOutcome {
    let error = match result {
        Ok(response) => return AttemptOutcome::Succeeded { response },
        Err(error) => error,
    };
    let (message, response) = (error.to_string(), error.response().to_owned());
    let wait = match error {
        SinkError::Permanent { .. } => {
            return AttemptOutcome::Dead {
                error: message,
                response,
            };
        }
        _ if paused => {
            return AttemptOutcome::Deferred {
                error: format!("{message} (the sink is paused: not counted as an attempt)"),
                response,
                retry_at: job.created_at,
            };
        }
        SinkError::RateLimited { retry_after, .. } => *retry_after,
        SinkError::Transient { .. } => policy.backoff(job.attempt, unit),
    };
    let retry_at = now
        .saturating_add(SignedDuration::try_from(wait).unwrap_or(SignedDuration::MAX))
        .unwrap_or(now);
    let deadline = job
        .created_at
        .saturating_add(SignedDuration::try_from(policy.max_age.0).unwrap_or(SignedDuration::MAX))
        .unwrap_or(Timestamp::MAX);
    if job.attempt >= policy.max_attempts {
        let error = format!("{message} (gave up after {} attempts)", job.attempt);
        AttemptOutcome::Dead { error, response }
    } else if retry_at > deadline {
        let error = format!("{message} (gave up: the next try would pass max_age)");
        AttemptOutcome::Dead { error, response }
    } else {
        AttemptOutcome::Failed {
            error: message,
            response,
            retry_at,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::duration::HumanDuration;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            base: HumanDuration(Duration::from_secs(2)),
            cap: HumanDuration(Duration::from_secs(60)),
            max_attempts: 5,
            max_age: HumanDuration(Duration::from_secs(3600)),
        }
    }

    fn job(attempt: u32) -> Job {
        Job {
            id: 1,
            event_id: 1,
            route: "r".into(),
            sink: "s".into(),
            attempt,
            created_at: Timestamp::from_second(1000).unwrap(),
            group: None,
        }
    }

    fn transient() -> SinkError {
        SinkError::Transient {
            message: "HTTP 503".into(),
            response: "busy".into(),
        }
    }

    #[test]
    fn exponential_full_jitter_capped() {
        let p = policy();
        assert_eq!(
            p.backoff(1, 0.999_999).as_secs(),
            1,
            "attempt 1: up to base"
        );
        assert_eq!(p.backoff(3, 1.0), Duration::from_secs(8));
        assert_eq!(p.backoff(3, 0.5), Duration::from_secs(4));
        assert_eq!(p.backoff(3, 0.0), Duration::ZERO);
        assert_eq!(p.backoff(10, 1.0), Duration::from_secs(60), "capped");
        assert_eq!(
            p.backoff(u32::MAX, 1.0),
            Duration::from_secs(60),
            "no overflow"
        );
    }

    #[test]
    fn decisions() {
        let p = policy();
        let now = Timestamp::from_second(1010).unwrap();
        assert_eq!(
            decide(&p, &job(1), Ok("200".into()), (now, false), 0.5),
            AttemptOutcome::Succeeded {
                response: "200".into()
            }
        );
        match decide(&p, &job(2), Err(&transient()), (now, false), 1.0) {
            AttemptOutcome::Failed {
                retry_at, response, ..
            } => {
                assert_eq!(retry_at, Timestamp::from_second(1014).unwrap());
                assert_eq!(response, "busy");
            }
            other => panic!("{other:?}"),
        }
        let permanent = SinkError::Permanent {
            message: "HTTP 404".into(),
            response: "no_service".into(),
        };
        assert!(matches!(
            decide(&p, &job(1), Err(&permanent), (now, false), 0.5),
            AttemptOutcome::Dead { .. }
        ));
        match decide(&p, &job(5), Err(&transient()), (now, false), 0.5) {
            AttemptOutcome::Dead { error, .. } => {
                assert!(error.contains("gave up after 5 attempts"), "{error}")
            }
            other => panic!("{other:?}"),
        }
        let limited = SinkError::RateLimited {
            retry_after: Duration::from_secs(30),
            message: "HTTP 429".into(),
            response: String::new(),
        };
        match decide(&p, &job(1), Err(&limited), (now, false), 0.0) {
            AttemptOutcome::Failed { retry_at, .. } => {
                assert_eq!(retry_at, Timestamp::from_second(1040).unwrap())
            }
            other => panic!("{other:?}"),
        }
        let too_late = SinkError::RateLimited {
            retry_after: Duration::from_secs(7200),
            message: "HTTP 429".into(),
            response: String::new(),
        };
        assert!(matches!(
            decide(&p, &job(1), Err(&too_late), (now, false), 0.0),
            AttemptOutcome::Dead { .. }
        ));
        // Paused: an outage's failure keeps the job in its place, even past its attempts;
        // a refusal is still the job's own.
        assert_eq!(
            decide(&p, &job(12), Err(&transient()), (now, true), 0.5),
            AttemptOutcome::Deferred {
                error: "HTTP 503 (the sink is paused: not counted as an attempt)".into(),
                response: "busy".into(),
                retry_at: job(12).created_at,
            }
        );
        assert!(matches!(
            decide(&p, &job(1), Err(&permanent), (now, true), 0.5),
            AttemptOutcome::Dead { .. }
        ));
    }
}
