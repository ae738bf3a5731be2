//! A sink's limits in one daemon: calls at once, and jobs claimed ahead of them.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::PREFETCH;

/// A sink's limits in this daemon: its share of the sink's concurrency, resized (never
/// replaced) when a reload or the replicas change it.
pub(super) struct Limits {
    pub(super) concurrency: usize,
    /// Sink calls in progress.
    pub(super) running: Gate,
    /// Jobs claimed and not yet recorded: bounds what waits in memory.
    pub(super) claimed: Gate,
    /// Sink calls in progress, counted exactly: after the limit shrank they may outnumber
    /// it, and other replicas must not take what they still hold.
    pub(super) calls: Arc<AtomicUsize>,
}

impl Limits {
    pub(super) fn new(concurrency: usize) -> Self {
        Self {
            concurrency,
            running: Gate::new(concurrency),
            claimed: Gate::new(concurrency.saturating_mul(PREFETCH)),
            calls: Arc::default(),
        }
    }

    /// Sink calls in progress.
    pub(super) fn calls(&self) -> usize {
        self.calls.load(Ordering::Relaxed)
    }

    /// Makes the limit `concurrency` on the same gates, so that the calls and claims made
    /// under the old one count against the new: a limit that shrank (a reload, or another
    /// replica taking its share) is not exceeded while the earlier calls finish.
    pub(super) fn resize(&mut self, concurrency: usize) {
        self.running.resize(self.concurrency, concurrency);
        self.claimed.resize(
            self.concurrency.saturating_mul(PREFETCH),
            concurrency.saturating_mul(PREFETCH),
        );
        self.concurrency = concurrency;
    }
}

/// A semaphore whose size can shrink below what is in use. The permits it owes are taken out
/// as they come back ([`Pass`]'s drop forgets them), before any waiter can have them: jobs
/// claimed under the old limit and already waiting for a slot start only once the calls in
/// flight fit the new one.
#[derive(Clone)]
pub(super) struct Gate {
    semaphore: Arc<Semaphore>,
    /// Permits to forget as they are returned.
    owed: Arc<AtomicUsize>,
}

impl Gate {
    fn new(permits: usize) -> Self {
        Self {
            semaphore: Arc::new(Semaphore::new(permits)),
            owed: Arc::default(),
        }
    }

    pub(super) fn available(&self) -> usize {
        self.semaphore.available_permits()
    }

    /// `n` permits now, or `None` if fewer are free.
    pub(super) fn try_take(&self, n: usize) -> Option<Pass> {
        let n = u32::try_from(n).ok()?;
        let permit = Arc::clone(&self.semaphore).try_acquire_many_owned(n).ok()?;
        Some(self.pass(permit))
    }

    /// One permit, once one is free (`None` only if the semaphore were closed: never), its
    /// place in line taken now: permits go out in the order `queue` was called. The engine
    /// queues a claim's calls in the order they were claimed, so they start in that order
    /// (a paused sink's backlog drains oldest first), whichever task runs first.
    pub(super) fn queue(&self) -> impl Future<Output = Option<Pass>> + Send + 'static {
        let mut acquire = Box::pin(Arc::clone(&self.semaphore).acquire_owned());
        // The semaphore is fair, and a waiter's place is taken at its first poll.
        let first = acquire
            .as_mut()
            .poll(&mut std::task::Context::from_waker(std::task::Waker::noop()));
        let gate = self.clone();
        async move {
            let permit = match first {
                std::task::Poll::Ready(permit) => permit,
                std::task::Poll::Pending => acquire.await,
            };
            Some(gate.pass(permit.ok()?))
        }
    }

    fn pass(&self, permit: OwnedSemaphorePermit) -> Pass {
        Pass {
            permit: Some(permit),
            owed: Arc::clone(&self.owed),
        }
    }

    /// Moves the gate from `from` permits to `to`: a shrink forgets the free permits and owes
    /// the rest; a growth first cancels what is owed.
    fn resize(&self, from: usize, to: usize) {
        if to >= from {
            let grow = to - from;
            let cancelled = take_up_to(&self.owed, grow);
            self.semaphore.add_permits(grow - cancelled);
        } else {
            let shrink = from - to;
            let forgotten = self.semaphore.forget_permits(shrink);
            self.owed.fetch_add(shrink - forgotten, Ordering::SeqCst);
        }
    }
}

/// Permits taken from a [`Gate`]; returned when dropped, unless the gate owes them.
pub(super) struct Pass {
    permit: Option<OwnedSemaphorePermit>,
    owed: Arc<AtomicUsize>,
}

impl Pass {
    /// Splits `n` permits off into a pass of their own.
    pub(super) fn split(&mut self, n: usize) -> Option<Pass> {
        let permit = self.permit.as_mut()?.split(n)?;
        Some(Pass {
            permit: Some(permit),
            owed: Arc::clone(&self.owed),
        })
    }
}

impl Drop for Pass {
    fn drop(&mut self) {
        let Some(mut permit) = self.permit.take() else {
            return;
        };
        let owed = take_up_to(&self.owed, permit.num_permits());
        if owed > 0
            && let Some(forgotten) = permit.split(owed)
        {
            forgotten.forget();
        }
    }
}

/// Takes up to `most` off `counter`; returns how much it took. Nothing owed (the usual case,
/// every permit returned) is a read, not a write.
fn take_up_to(counter: &AtomicUsize, most: usize) -> usize {
    let mut taken = 0;
    let _ = counter.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |owed| {
        taken = owed.min(most);
        (taken > 0).then(|| owed - taken)
    });
    taken
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_limit_that_shrinks_counts_the_calls_made_under_the_old_one() {
        let mut limits = Limits::new(4);
        let in_use = limits.running.try_take(3).unwrap();
        limits.resize(2);
        assert_eq!(limits.running.available(), 0, "three in use, two allowed");
        drop(in_use);
        assert_eq!(limits.running.available(), 2);
        limits.resize(5);
        assert_eq!(limits.running.available(), 5);
        assert_eq!(limits.claimed.available(), 5 * PREFETCH);
    }

    /// Waiters get their permits in the order they queued, whichever task runs first.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn permits_go_out_in_the_order_queued() {
        let gate = Gate::new(1);
        let busy = gate.try_take(1).unwrap();
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let queued: Vec<_> = (0..8).map(|_| gate.queue()).collect();
        let mut tasks = Vec::new();
        // Spawned last first: the order they run in is not the order they queued in.
        for (n, slot) in queued.into_iter().enumerate().rev() {
            let order = Arc::clone(&order);
            tasks.push(tokio::spawn(async move {
                let pass = slot.await.unwrap();
                order.lock().unwrap().push(n);
                drop(pass);
            }));
        }
        tokio::task::yield_now().await;
        drop(busy);
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), (0..8).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_waiter_gets_no_permit_the_shrunk_gate_owes() {
        let gate = Gate::new(3);
        let mut held: Vec<Pass> = (0..3).map(|_| gate.try_take(1).unwrap()).collect();
        let waiter = tokio::spawn({
            let queued = gate.queue();
            async move { queued.await.unwrap() }
        });
        tokio::task::yield_now().await;
        gate.resize(3, 1);
        held.pop();
        held.pop();
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "two returned, both owed");
        held.pop();
        let pass = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("the third returned is the waiter's");
        drop(pass);
        assert_eq!(gate.available(), 1);

        // Growing again cancels a debt before adding permits.
        let all = gate.try_take(1).unwrap();
        gate.resize(1, 0);
        gate.resize(0, 2);
        assert_eq!(gate.available(), 1, "one in use of two");
        drop(all);
        assert_eq!(gate.available(), 2);
    }
}
