//! The storage contract, checked through the [`Storage`] trait only, the same test on each
//! backend (SQLite in a temporary file, a database of the throwaway PostgreSQL cluster): what
//! the daemon relies on, whatever answers it. No test here reads a table; the schema's own
//! tests do that.
//!
//! Time is the caller's: every call that decides by time is given `now`, so windows of hours
//! are stepped, not waited for.

use std::collections::HashSet;
use std::time::Duration;

use hookroute::event::Event;
use hookroute::store::{
    AttemptOutcome, DueJob, Gather, Handoff, Inserted, Job, Prunable, RouteTo, SinkChange, Store,
    StoreError,
};
use jiff::Timestamp;

use crate::harness::*;
use crate::harness::{BACKEND, Backend};

/// A store of the running test's backend, in (or named from) `dir`.
async fn store(dir: &std::path::Path) -> Store {
    let path = dir.join("hookroute.toml");
    std::fs::write(&path, config(dir, NO_LIMITS, &standard_rest(dir))).unwrap();
    let config = hookroute::config::load(&path).unwrap();
    hookroute::store::open(&config.storage).await.unwrap()
}

fn t0() -> Timestamp {
    "2026-12-01T10:00:00Z".parse().unwrap()
}

fn after(at: Timestamp, seconds: i64) -> Timestamp {
    at + jiff::SignedDuration::from_secs(seconds)
}

fn event(id: &str) -> (Event, Vec<u8>) {
    let body = serde_json::json!({
        "id": id, "type": "scan.completed", "created_at": "2026-12-01T09:59:00Z",
        "data": {"domain": "example.com", "score": 61}
    })
    .to_string()
    .into_bytes();
    (Event::parse("cl", &body, None, None).unwrap(), body)
}

fn to(sinks: &[&str]) -> Vec<RouteTo> {
    vec![RouteTo {
        route: "all".into(),
        throttle: None,
        sinks: sinks.iter().map(|s| (*s).to_owned()).collect(),
        quiet: Vec::new(),
        group: None,
    }]
}

/// Stores a new event routed to `sinks` at `at`; its id.
async fn insert(store: &Store, id: &str, sinks: &[&str], at: Timestamp) -> i64 {
    let (event, body) = event(id);
    match store
        .insert(&event, &body, at, to(sinks), Handoff::default())
        .await
        .unwrap()
    {
        Inserted::New { id, .. } => id,
        other => panic!("{id} was not new: {other:?}"),
    }
}

async fn due(store: &Store, sink: &str, at: Timestamp) -> Vec<DueJob> {
    store
        .due_jobs(sink, 100, Gather::Each, at, HashSet::new())
        .await
        .unwrap()
}

async fn finish(store: &Store, job: &Job, outcome: AttemptOutcome, at: Timestamp) {
    store
        .finish_attempt(vec![(job.clone(), outcome)], at, at)
        .await
        .unwrap();
}

on_both_backends!(a_delivery_id_is_stored_once_until_it_expires);

/// Dedupe: a repeat is a duplicate of the first copy, however many arrive at once; pruned
/// past its retention, the id is new again.
async fn a_delivery_id_is_stored_once_until_it_expires() {
    let dir = tempdir();
    let store = store(dir.path()).await;
    let first = insert(&store, "once", &["a"], t0()).await;
    let copies = (0..20).map(|_| {
        let store = store.clone();
        async move {
            let (event, body) = event("once");
            store
                .insert(&event, &body, t0(), to(&["a"]), Handoff::default())
                .await
                .unwrap()
        }
    });
    for copy in futures_util::future::join_all(copies).await {
        assert_eq!(copy, Inserted::Duplicate(first));
    }
    // Twenty copies at once of a new id: one is new, the rest are its duplicates.
    let racing = (0..20).map(|_| {
        let store = store.clone();
        async move {
            let (event, body) = event("racing");
            store
                .insert(&event, &body, t0(), to(&["a"]), Handoff::default())
                .await
                .unwrap()
        }
    });
    let answers = futures_util::future::join_all(racing).await;
    let new: Vec<i64> = answers
        .iter()
        .filter_map(|a| match a {
            Inserted::New { id, .. } => Some(*id),
            Inserted::Duplicate(_) => None,
        })
        .collect();
    assert_eq!(new.len(), 1, "{answers:?}");
    assert!(
        answers
            .iter()
            .all(|a| matches!(a, Inserted::New { .. }) || *a == Inserted::Duplicate(new[0])),
        "{answers:?}"
    );

    // A week later, with a retention of a day, the ids are forgotten.
    let week = after(t0(), 7 * 86_400);
    prune_all(&store, Prunable::Dedupe, Duration::from_secs(86_400), week).await;
    let again = insert(&store, "once", &["a"], week).await;
    assert!(again > first);
    store.close().await;
}

/// Prunes `what` older than `keep` at `now`, step by step, to the end; how many went.
async fn prune_all(store: &Store, what: Prunable, keep: Duration, now: Timestamp) -> usize {
    let (mut removed, mut from) = (0, 0);
    loop {
        let step = store.prune(what, keep, from, 1000, now).await.unwrap();
        removed += step.removed;
        match step.next {
            Some(next) => from = next,
            None => return removed,
        }
    }
}

on_both_backends!(a_job_is_due_until_its_outcome_is_recorded);

/// A job is due with its event until an attempt's outcome is recorded: failed, it is due
/// again at its retry time (as its next attempt); succeeded or dead, never again. Jobs being
/// attempted (`held`) are left out.
async fn a_job_is_due_until_its_outcome_is_recorded() {
    let dir = tempdir();
    let store = store(dir.path()).await;
    let id = insert(&store, "life", &["a", "b"], t0()).await;
    let [due_a] = due(&store, "a", t0()).await.try_into().unwrap();
    assert_eq!(due_a.job.event_id, id);
    assert_eq!(due_a.job.attempt, 1);
    assert_eq!(due_a.event.as_ref().unwrap().delivery_id, "life");
    let held = HashSet::from([due_a.job.id]);
    let others = store
        .due_jobs("a", 100, Gather::Each, t0(), held)
        .await
        .unwrap();
    assert!(others.is_empty(), "a held job is left out: {others:?}");

    // Failed: due again at its retry, an hour on, as the second attempt.
    let retry_at = after(t0(), 3600);
    let failed = AttemptOutcome::Failed {
        error: "HTTP 503".into(),
        response: "busy".into(),
        retry_at,
    };
    finish(&store, &due_a.job, failed, t0()).await;
    assert!(due(&store, "a", after(t0(), 60)).await.is_empty());
    let [retried] = due(&store, "a", retry_at).await.try_into().unwrap();
    assert_eq!((retried.job.id, retried.job.attempt), (due_a.job.id, 2));
    let succeeded = AttemptOutcome::Succeeded {
        response: "ok".into(),
    };
    finish(&store, &retried.job, succeeded, retry_at).await;
    assert!(due(&store, "a", after(t0(), 86_400)).await.is_empty());

    // Dead: never due again, counted for the operator.
    let [due_b] = due(&store, "b", t0()).await.try_into().unwrap();
    let dead = AttemptOutcome::Dead {
        error: "HTTP 404".into(),
        response: String::new(),
    };
    finish(&store, &due_b.job, dead, t0()).await;
    assert!(due(&store, "b", after(t0(), 86_400)).await.is_empty());
    let queues = store.queues(t0()).await.unwrap();
    let b = queues.iter().find(|q| q.sink == "b").unwrap();
    assert_eq!((b.waiting, b.dead), (0, 1), "{queues:?}");
    store.close().await;
}

on_both_backends!(a_digest_waits_for_its_window_on_the_callers_clock);

/// With a hold (a digest), nothing is due until the oldest job has waited the whole window;
/// then everything waiting is. The window is stepped, not waited for.
async fn a_digest_waits_for_its_window_on_the_callers_clock() {
    let dir = tempdir();
    let store = store(dir.path()).await;
    insert(&store, "d-1", &["digest"], t0()).await;
    insert(&store, "d-2", &["digest"], after(t0(), 300)).await;
    let window = Duration::from_secs(15 * 60);
    let at = |seconds| {
        let store = store.clone();
        async move {
            store
                .due_jobs(
                    "digest",
                    100,
                    Gather::Digest(window),
                    after(t0(), seconds),
                    HashSet::new(),
                )
                .await
                .unwrap()
        }
    };
    assert!(at(14 * 60).await.is_empty(), "held back within the window");
    let summary = store.due_summary().await.unwrap();
    assert_eq!(
        hookroute::store::digest_due(summary["digest"].oldest, window),
        after(t0(), 15 * 60),
        "the engine looks again when the oldest job's window closes"
    );
    assert_eq!(at(15 * 60).await.len(), 2, "then all of it");
    store.close().await;
}

on_both_backends!(handed_over_jobs_come_due_at_their_fallback);

/// Jobs handed to the engine in memory are stored due only at the hand-over's fallback, so no
/// read finds them meanwhile; at the fallback (the process died, say) they are due.
async fn handed_over_jobs_come_due_at_their_fallback() {
    let dir = tempdir();
    let store = store(dir.path()).await;
    let (event, body) = event("handed");
    let handoff = Handoff {
        sinks: vec!["a".into()],
        fallback: after(t0(), 10),
    };
    let inserted = store
        .insert(&event, &body, t0(), to(&["a", "b"]), handoff)
        .await
        .unwrap();
    let Inserted::New { jobs, handed, .. } = inserted else {
        panic!("{inserted:?}");
    };
    assert_eq!(jobs, 2);
    let [handed] = handed.try_into().unwrap();
    assert_eq!(handed.sink, "a");
    assert!(due(&store, "a", after(t0(), 9)).await.is_empty());
    assert_eq!(
        due(&store, "b", t0()).await.len(),
        1,
        "not handed over: due now"
    );
    let [fallen] = due(&store, "a", after(t0(), 10)).await.try_into().unwrap();
    assert_eq!(fallen.job.id, handed.id);
    store.close().await;
}

on_both_backends!(a_throttle_suppresses_within_its_window_by_key);

/// A route's throttle lets the first event per key through in a window (on the events' own
/// clock) and records the rest as suppressed; another key, or the next window, passes.
async fn a_throttle_suppresses_within_its_window_by_key() {
    let dir = tempdir();
    let store = store(dir.path()).await;
    let mut answers = Vec::new();
    for (id, key, at) in [
        ("t-1", "example.com", t0()),
        ("t-2", "example.com", after(t0(), 60)),
        ("t-3", "other.example", after(t0(), 120)),
    ] {
        answers.push(insert_throttled(&store, id, key, at).await);
    }
    assert_eq!(
        answers,
        [(1, vec![]), (0, vec!["scans".to_owned()]), (1, vec![]),]
    );
    store.close().await;
}

/// Stores event `id`, sent and received at `at`, for route `scans` with an hour's throttle
/// per `key`; the jobs it made and the routes that suppressed it.
async fn insert_throttled(
    store: &Store,
    id: &str,
    key: &str,
    at: Timestamp,
) -> (usize, Vec<String>) {
    let (mut event, body) = event(id);
    event.occurred_at = Some(at);
    let route = RouteTo {
        route: "scans".into(),
        throttle: Some((key.to_owned(), Duration::from_secs(3600))),
        sinks: vec!["a".into()],
        quiet: Vec::new(),
        group: None,
    };
    let inserted = store
        .insert(&event, &body, at, vec![route], Handoff::default())
        .await
        .unwrap();
    match inserted {
        Inserted::New {
            jobs, suppressed, ..
        } => (jobs, suppressed),
        other => panic!("{id} was not new: {other:?}"),
    }
}

on_both_backends!(the_tools_list_and_show_what_the_store_holds);

/// The operator's tools, written once over each backend's primitives, read back what the
/// trait stored: a page of events, rows by status, an event with its attempts.
async fn the_tools_list_and_show_what_the_store_holds() {
    use hookroute::store::admin::{Access, Filter, RowStatus};
    let dir = tempdir();
    let store = store(dir.path()).await;
    let mut ids = Vec::new();
    for n in 0..70 {
        ids.push(insert(&store, &format!("tool-{n}"), &["a"], after(t0(), n)).await);
    }
    let [first] = due(&store, "a", t0())
        .await
        .into_iter()
        .filter(|d| d.job.event_id == ids[0])
        .collect::<Vec<_>>()
        .try_into()
        .unwrap();
    let dead = AttemptOutcome::Dead {
        error: "HTTP 404".into(),
        response: "gone".into(),
    };
    finish(&store, &first.job, dead, t0()).await;
    store.close().await;

    // The tools are synchronous (PostgreSQL's run a runtime of their own): off the test's.
    let path = dir.path().join("hookroute.toml");
    tokio::task::spawn_blocking(move || {
        let config = hookroute::config::load(&path).unwrap();
        let tools = hookroute::store::open_admin(&config.storage, Access::Read).unwrap();
        let all = tools
            .list(&Filter {
                limit: 100,
                ..Filter::default()
            })
            .unwrap();
        assert_eq!(all.len(), 70, "more than one page of events");
        assert_eq!(all[0].event_id, ids[69], "newest first");
        let dead_rows = tools
            .list(&Filter {
                status: Some(RowStatus::Dead),
                limit: 10,
                ..Filter::default()
            })
            .unwrap();
        assert_eq!(dead_rows.len(), 1);
        assert_eq!(dead_rows[0].event_id, ids[0]);
        let shown = tools.show(ids[0]).unwrap().unwrap();
        let [job] = shown.jobs.try_into().unwrap();
        assert_eq!(job.attempts, 1);
        assert_eq!(job.history[0].error.as_deref(), Some("HTTP 404"));
        assert!(tools.show(9_999).unwrap().is_none());
    })
    .await
    .unwrap();
}

on_both_backends!(a_write_after_close_is_refused_not_lost);

/// Once closed, a store refuses writes with an error rather than accepting what it cannot
/// keep.
async fn a_write_after_close_is_refused_not_lost() {
    let dir = tempdir();
    let store = store(dir.path()).await;
    insert(&store, "before", &["a"], t0()).await;
    store.close().await;
    let (event, body) = event("after");
    let refused: Result<Inserted, StoreError> = store
        .insert(&event, &body, t0(), to(&["a"]), Handoff::default())
        .await;
    assert!(refused.is_err(), "{refused:?}");
}

on_both_backends!(pruning_takes_finished_events_and_leaves_waiting_ones);

/// Events past their retention go with their jobs once nothing of them waits; an event with a
/// job still waiting stays (and its job stays due) until that job is done.
async fn pruning_takes_finished_events_and_leaves_waiting_ones() {
    let dir = tempdir();
    let store = store(dir.path()).await;
    insert(&store, "finished", &["a"], t0()).await;
    let waiting = insert(&store, "waiting", &["b"], t0()).await;
    let [done] = due(&store, "a", t0()).await.try_into().unwrap();
    let succeeded = AttemptOutcome::Succeeded {
        response: String::new(),
    };
    finish(&store, &done.job, succeeded.clone(), t0()).await;

    let week = after(t0(), 7 * 86_400);
    let day = Duration::from_secs(86_400);
    assert_eq!(prune_all(&store, Prunable::Events, day, week).await, 1);
    let [still] = due(&store, "b", week).await.try_into().unwrap();
    assert_eq!(still.job.event_id, waiting);
    assert!(still.event.is_some(), "its event is kept with it");
    finish(&store, &still.job, succeeded, week).await;
    assert_eq!(prune_all(&store, Prunable::Events, day, week).await, 1);
    // Nothing left to take.
    assert_eq!(prune_all(&store, Prunable::Events, day, week).await, 0);
    store.close().await;
}

on_both_backends!(the_queues_say_what_waits_and_for_how_long);

/// What `/metrics` reads: per sink, the jobs waiting (pending or failed), the oldest one's
/// age at the caller's `now`, and the dead letters.
async fn the_queues_say_what_waits_and_for_how_long() {
    let dir = tempdir();
    let store = store(dir.path()).await;
    insert(&store, "q-1", &["a"], t0()).await;
    insert(&store, "q-2", &["a"], after(t0(), 60)).await;
    let queues = store.queues(after(t0(), 120)).await.unwrap();
    let [a] = queues.try_into().unwrap();
    assert_eq!(a.sink, "a");
    assert_eq!(a.waiting, 2);
    assert_eq!(a.dead, 0);
    assert_eq!(a.oldest_waiting, Duration::from_secs(120));
    store.close().await;
}

on_both_backends!(a_late_outcome_does_not_revive_a_finished_job);

/// An outcome recorded twice (a retried write, a replica that lost its lease and finished
/// anyway) leaves a finished job finished: a success is never turned back into a retry.
async fn a_late_outcome_does_not_revive_a_finished_job() {
    let dir = tempdir();
    let store = store(dir.path()).await;
    insert(&store, "late", &["a"], t0()).await;
    let [job] = due(&store, "a", t0()).await.try_into().unwrap();
    let succeeded = AttemptOutcome::Succeeded {
        response: "ok".into(),
    };
    finish(&store, &job.job, succeeded, t0()).await;
    let late = AttemptOutcome::Failed {
        error: "timeout".into(),
        response: String::new(),
        retry_at: after(t0(), 60),
    };
    finish(&store, &job.job, late, after(t0(), 1)).await;
    assert!(
        due(&store, "a", after(t0(), 3600)).await.is_empty(),
        "a succeeded job came due again"
    );
    store.close().await;
}

on_both_backends!(closed_throttle_windows_are_pruned_behind_the_newest_and_open_ones_kept);

/// Throttle windows go once they closed `keep` before the newest window opened (the events'
/// own clock, not the caller's): a late event can still find its window, and an open window
/// keeps suppressing after a prune.
async fn closed_throttle_windows_are_pruned_behind_the_newest_and_open_ones_kept() {
    let dir = tempdir();
    let store = store(dir.path()).await;
    let hour = Duration::from_secs(3600);
    let throttled = |id: &'static str, key: &'static str, at: Timestamp| {
        let store = store.clone();
        async move { insert_throttled(&store, id, key, at).await.0 }
    };
    assert_eq!(throttled("old", "a.example", t0()).await, 1);
    assert_eq!(
        throttled("new", "b.example", after(t0(), 3 * 3600)).await,
        1
    );
    let now = after(t0(), 3 * 3600 + 60);
    assert_eq!(
        prune_all(&store, Prunable::Throttles, 3 * hour, now).await,
        0,
        "a.example's window closed only two hours before b.example's opened"
    );
    assert_eq!(prune_all(&store, Prunable::Throttles, hour, now).await, 1);
    assert_eq!(
        throttled("new-again", "b.example", after(t0(), 3 * 3600 + 1800)).await,
        0,
        "b.example's window is open and kept"
    );
    assert_eq!(throttled("old-again", "a.example", now).await, 1);
    store.close().await;
}

/// PostgreSQL's replicas: a job one store claimed is not another's while its claim stands;
/// released (a hand-over let go), or its store closed, it is the other's at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replicas_claim_is_its_own_until_released_or_closed() {
    BACKEND
        .scope(Backend::Postgres, async {
            let dir = tempdir();
            let (a, b) = (store(dir.path()).await, store(dir.path()).await);
            insert(&a, "claimed", &["s"], t0()).await;
            insert(&a, "second", &["s"], t0()).await;
            let now = after(t0(), 1);
            let claimed = a
                .due_jobs("s", 1, Gather::Each, now, HashSet::new())
                .await
                .unwrap();
            assert_eq!(claimed.len(), 1);
            let rest = due(&b, "s", now).await;
            assert_eq!(
                rest.len(),
                1,
                "the other replica gets the unclaimed one only"
            );
            assert_ne!(rest[0].job.id, claimed[0].job.id);

            a.release(vec![claimed[0].job.id]).await.unwrap();
            let taken = due(&b, "s", now).await;
            let ids: Vec<i64> = taken.iter().map(|d| d.job.id).collect();
            assert!(ids.contains(&claimed[0].job.id), "released: {ids:?}");

            // b holds both now; closing b lets a have them at once, without a lease's wait.
            assert!(due(&a, "s", now).await.is_empty());
            b.close().await;
            assert_eq!(due(&a, "s", now).await.len(), 2);
            a.close().await;
        })
        .await;
}

on_both_backends!(a_sinks_health_is_shared_and_a_pause_keeps_the_queue_in_order);

/// A sink's health through the contract: failures from two handles count together, the
/// outage pauses it at `pause_after` (its waiting retries due from their creation, so the
/// probe takes the oldest), only one handle claims each probe, a deferred attempt uses none
/// of the job's attempts, and a success resumes it.
async fn a_sinks_health_is_shared_and_a_pause_keeps_the_queue_in_order() {
    let dir = tempdir();
    let a = store(dir.path()).await;
    // One daemon per SQLite file: there both handles are the same store.
    let b = match backend() {
        Backend::Sqlite => a.clone(),
        Backend::Postgres => store(dir.path()).await,
    };
    let first = insert(&a, "first", &["slack"], t0()).await;
    insert(&a, "second", &["slack"], after(t0(), 1)).await;
    let outage = |seconds| {
        let change = SinkChange::Failed {
            error: "HTTP 503".into(),
            transient: true,
            pause_after: Some(Duration::from_secs(600)),
            probe_interval: Duration::from_secs(60),
        };
        (change, after(t0(), seconds))
    };
    for (n, (change, at)) in (0..4).map(|i| outage(i * 100)).enumerate() {
        let store = if n % 2 == 0 { &a } else { &b };
        let changed = store.change_sink("slack", change, at).await.unwrap();
        assert!(changed.applied && !changed.paused());
    }
    // Both jobs failed once and wait for their retries, the first's later than the second's.
    for (i, due) in due(&a, "slack", after(t0(), 5))
        .await
        .into_iter()
        .enumerate()
    {
        let retry_at = after(t0(), if i == 0 { 900 } else { 800 });
        let outcome = AttemptOutcome::Failed {
            error: "HTTP 503".into(),
            response: String::new(),
            retry_at,
        };
        finish(&a, &due.job, outcome, after(t0(), 5)).await;
    }
    let states = b.sink_states().await.unwrap();
    assert_eq!(states.len(), 1);
    let streak = states[0].streak.clone().unwrap();
    assert_eq!(
        (streak.failures, streak.since),
        (4, t0()),
        "both handles' failures"
    );

    let (change, at) = outage(600);
    let changed = b.change_sink("slack", change, at).await.unwrap();
    assert!(changed.paused(), "ten minutes of an outage");
    let due_now = due(&a, "slack", after(t0(), 601)).await;
    assert_eq!(due_now.len(), 2, "paused: due from their creation");
    assert_eq!(due_now[0].job.event_id, first, "the oldest first");

    let probe = |at| {
        let interval = Duration::from_secs(60);
        (SinkChange::Probe { interval }, at)
    };
    let (early, at) = probe(after(t0(), 620));
    assert!(
        !a.change_sink("slack", early, at).await.unwrap().applied,
        "not before its time"
    );
    let claims = futures_util::future::join_all([&a, &b].map(|store| {
        let (change, at) = probe(after(t0(), 660));
        async move {
            store
                .change_sink("slack", change, at)
                .await
                .unwrap()
                .applied
        }
    }))
    .await;
    assert_eq!(
        claims.iter().filter(|c| **c).count(),
        1,
        "one probe: {claims:?}"
    );

    // The probe fails while paused: recorded, and the job keeps its attempts.
    let job = due_now[0].job.clone();
    let outcome = AttemptOutcome::Deferred {
        error: "HTTP 503".into(),
        response: String::new(),
        retry_at: job.created_at,
    };
    let mut probed = job.clone();
    probed.attempt = 2;
    finish(&a, &probed, outcome, after(t0(), 661)).await;
    let again = due(&b, "slack", after(t0(), 662)).await;
    assert_eq!(again[0].job.id, job.id, "still first in line");
    assert_eq!(again[0].job.attempt, 2, "the deferred attempt used none");

    let resumed = a
        .change_sink("slack", SinkChange::Succeeded, after(t0(), 720))
        .await
        .unwrap();
    assert!(resumed.resumed() && resumed.after.is_healthy());
    assert!(
        b.sink_states().await.unwrap().is_empty(),
        "a healthy sink has no row"
    );
}

on_both_backends!(a_reconcile_pass_is_begun_once_an_interval_and_when_asked);

/// Reconcile passes (`store::passes`): one at a time, once an interval whoever asks, at a
/// task's start, and when an operator asks through the tools; a refused key holds every
/// task that began before it until one begins afresh. The tools also say which delivery ids
/// are stored, the merged and the just-inserted alike.
async fn a_reconcile_pass_is_begun_once_an_interval_and_when_asked() {
    use hookroute::store::admin::Access;
    use hookroute::store::{Begun, Due, PassEnd, Schedule};
    let dir = tempdir();
    let store = store(dir.path()).await;
    let every = Duration::from_secs(600);
    let schedule = |since| Schedule {
        every,
        hold: Duration::from_secs(60),
        since,
    };
    let ended = |outcome: &'static str| PassEnd {
        outcome,
        detail: format!("{outcome} pass"),
    };
    let first = schedule(t0());
    // The source never had a successful pass: its first looks back no further than its
    // newest delivery.
    let begun = store.begin_pass("cl", first, t0()).await.unwrap();
    assert_eq!(
        begun,
        Some(Begun {
            due: Due::Start,
            first: true
        })
    );
    // Running: nobody else begins one, not even a task that started since.
    let later = schedule(after(t0(), 5));
    assert_eq!(
        store
            .begin_pass("cl", later, after(t0(), 5))
            .await
            .unwrap()
            .map(|b| b.due),
        None
    );
    store
        .end_pass("cl", ended("ok"), after(t0(), 10))
        .await
        .unwrap();
    assert_eq!(
        store
            .begin_pass("cl", first, after(t0(), 20))
            .await
            .unwrap()
            .map(|b| b.due),
        None
    );
    // A task that began after that pass did passes at once (a restart catches up).
    let restarted = schedule(after(t0(), 30));
    let begun = store
        .begin_pass("cl", restarted, after(t0(), 30))
        .await
        .unwrap();
    assert_eq!(
        begun,
        Some(Begun {
            due: Due::Start,
            first: false
        })
    );
    store
        .end_pass("cl", ended("ok"), after(t0(), 31))
        .await
        .unwrap();
    assert_eq!(
        store
            .begin_pass("cl", first, after(t0(), 629))
            .await
            .unwrap()
            .map(|b| b.due),
        None
    );
    let due = store
        .begin_pass("cl", first, after(t0(), 630))
        .await
        .unwrap()
        .map(|b| b.due);
    assert_eq!(due, Some(Due::Interval));
    store
        .end_pass("cl", ended("refused"), after(t0(), 631))
        .await
        .unwrap();
    assert_eq!(
        store
            .begin_pass("cl", first, after(t0(), 2000))
            .await
            .unwrap()
            .map(|b| b.due),
        None,
        "a refused key holds the passes"
    );
    assert_eq!(store.newest_seen("cl").await.unwrap(), None);
    insert(&store, "pass-stored", &["a"], after(t0(), 2000)).await;
    assert_eq!(
        store.newest_seen("cl").await.unwrap(),
        Some(after(t0(), 2000)),
        "the newest delivery stored, merged or not"
    );
    assert_eq!(store.newest_seen("other").await.unwrap(), None);

    let path = dir.path().join("hookroute.toml");
    let row = tokio::task::spawn_blocking(move || {
        let config = hookroute::config::load(&path).unwrap();
        let mut tools = hookroute::store::open_admin(&config.storage, Access::Write).unwrap();
        let row = tools.pass("cl").unwrap();
        tools.request_pass("cl", after(t0(), 2001)).unwrap();
        let ids = ["pass-stored".to_owned(), "never".to_owned()];
        assert_eq!(tools.seen("cl", &ids).unwrap(), ["pass-stored"]);
        assert!(tools.seen("other", &ids).unwrap().is_empty());
        assert_eq!(tools.pass("nobody").unwrap().started_at, None);
        row
    })
    .await
    .unwrap();
    assert_eq!(row.outcome.as_deref(), Some("refused"));
    assert_eq!(row.held_by, None);
    assert_eq!(row.last_success, Some(after(t0(), 31).as_millisecond()));
    let due = store
        .begin_pass("cl", first, after(t0(), 2002))
        .await
        .unwrap()
        .map(|b| b.due);
    assert_eq!(due, Some(Due::Requested), "an operator's request is taken");
    assert_eq!(
        store
            .begin_pass("cl", first, after(t0(), 2003))
            .await
            .unwrap()
            .map(|b| b.due),
        None,
        "once"
    );
    store.close().await;
}
