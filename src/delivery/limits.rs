//! A sink's limits in one daemon: calls at once, and jobs claimed ahead of them.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Semaphore;

use super::PREFETCH;

/// A sink's limits in this daemon: its share of the sink's concurrency, resized (never
/// replaced) when a reload or the replicas change it.
pub(super) struct Limits {
    pub(super) concurrency: usize,
    /// Sink calls in progress.
    pub(super) running: Arc<Semaphore>,
    /// Jobs claimed and not yet recorded: bounds what waits in memory.
    pub(super) claimed: Arc<Semaphore>,
    /// Sink calls in progress, counted exactly: after the limit shrank they may outnumber
    /// it, and other replicas must not take what they still hold.
    pub(super) calls: Arc<AtomicUsize>,
}

impl Limits {
    pub(super) fn new(concurrency: usize) -> Self {
        Self {
            concurrency,
            running: Arc::new(Semaphore::new(concurrency)),
            claimed: Arc::new(Semaphore::new(concurrency.saturating_mul(PREFETCH))),
            calls: Arc::default(),
        }
    }

    /// Sink calls in progress.
    pub(super) fn calls(&self) -> usize {
        self.calls.load(Ordering::Relaxed)
    }

    /// Makes the limit `concurrency` on the same semaphores, so that the calls and claims
    /// made under the old one count against the new: a limit that shrank (a reload, or
    /// another replica taking its share) is not exceeded while the earlier calls finish.
    pub(super) fn resize(&mut self, concurrency: usize) {
        resize(&self.running, self.concurrency, concurrency);
        resize(
            &self.claimed,
            self.concurrency.saturating_mul(PREFETCH),
            concurrency.saturating_mul(PREFETCH),
        );
        self.concurrency = concurrency;
    }
}

/// One sink call in progress, counted in [`Limits::calls`] until dropped.
pub(super) struct Call(Arc<AtomicUsize>);

impl Call {
    pub(super) fn start(calls: Arc<AtomicUsize>) -> Self {
        calls.fetch_add(1, Ordering::Relaxed);
        Self(calls)
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Moves `semaphore` from `from` permits to `to`. Permits in use when it shrinks are taken
/// out as they come back: the waiter that takes them is ahead of every later one.
fn resize(semaphore: &Arc<Semaphore>, from: usize, to: usize) {
    if to >= from {
        semaphore.add_permits(to - from);
        return;
    }
    let in_use = (from - to) - semaphore.forget_permits(from - to);
    if let Ok(in_use) = u32::try_from(in_use)
        && in_use > 0
    {
        let semaphore = Arc::clone(semaphore);
        tokio::spawn(async move {
            if let Ok(permits) = semaphore.acquire_many_owned(in_use).await {
                permits.forget();
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_limit_that_shrinks_counts_the_calls_made_under_the_old_one() {
        let mut limits = Limits::new(4);
        let in_use = Arc::clone(&limits.running)
            .acquire_many_owned(3)
            .await
            .unwrap();
        limits.resize(2);
        assert_eq!(
            limits.running.available_permits(),
            0,
            "three in use, two allowed"
        );
        drop(in_use);
        tokio::task::yield_now().await;
        assert_eq!(limits.running.available_permits(), 2);
        limits.resize(5);
        assert_eq!(limits.running.available_permits(), 5);
        assert_eq!(limits.claimed.available_permits(), 5 * PREFETCH);
    }
}
