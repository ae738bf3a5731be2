//! Time as the logic sees it. Code that decides by the time (when a job is due, when to look
//! at the queue again, how long to wait for a batch) takes a [`Clock`] instead of calling the
//! wall clock or tokio's timer, so a test moves the time instead of sleeping for it.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use jiff::Timestamp;
use tokio::sync::watch;

/// A source of the current time, and of waits measured by it.
pub trait Clock: Send + Sync {
    fn now(&self) -> Timestamp;

    /// Resolves once [`now`](Self::now) is `deadline` or later. The engine's every wait
    /// (the next poll, a retry or digest coming due, a batch's linger) goes through here, so
    /// on a [`ManualClock`] it ends exactly when the test moves the time past it.
    fn sleep_until(&self, deadline: Timestamp) -> BoxFuture<'static, ()>;
}

/// The wall clock: what the daemon runs on.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }

    fn sleep_until(&self, deadline: Timestamp) -> BoxFuture<'static, ()> {
        let wait = Timestamp::now().duration_until(deadline);
        // A deadline in the past is no wait; one too far to represent is as good as never.
        let wait = Duration::try_from(wait).unwrap_or(Duration::ZERO);
        Box::pin(tokio::time::sleep(wait))
    }
}

/// A clock that moves only when told to: for tests. Sleepers wake when [`advance`] or
/// [`set`] takes the time past their deadline, and not before, however long that takes.
///
/// [`advance`]: Self::advance
/// [`set`]: Self::set
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<watch::Sender<Timestamp>>);

impl ManualClock {
    pub fn new(start: Timestamp) -> Self {
        Self(Arc::new(watch::Sender::new(start)))
    }

    pub fn advance(&self, by: Duration) {
        self.0.send_modify(|now| {
            *now = now
                .checked_add(by)
                .expect("a test advances the clock by a sane amount");
        });
    }

    /// Moves the clock to `at`, which may be earlier: the wall clock can step back too.
    pub fn set(&self, at: Timestamp) {
        self.0.send_replace(at);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        *self.0.borrow()
    }

    fn sleep_until(&self, deadline: Timestamp) -> BoxFuture<'static, ()> {
        let mut time = self.0.subscribe();
        Box::pin(async move {
            // The sender lives as long as any clone of the clock; a dropped one never wakes.
            if time.wait_for(|now| *now >= deadline).await.is_err() {
                std::future::pending::<()>().await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_manual_sleep_ends_when_the_clock_passes_its_deadline_and_not_before() {
        let start: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let clock = ManualClock::new(start);
        let mut sleep = clock.sleep_until(start + Duration::from_secs(900));
        let pending = |sleep: &mut BoxFuture<'static, ()>| {
            futures_util::FutureExt::now_or_never(sleep.as_mut()).is_none()
        };
        assert!(pending(&mut sleep));
        clock.advance(Duration::from_secs(899));
        assert!(pending(&mut sleep), "a second early");
        clock.advance(Duration::from_secs(1));
        assert!(!pending(&mut sleep), "due at the deadline");
        assert!(
            futures_util::FutureExt::now_or_never(clock.sleep_until(start)).is_some(),
            "a deadline passed is no wait"
        );
    }
}
