//! The engine stepped turn by turn on a clock the test moves: what comes due when, what a
//! reload does to jobs and limits, and what a stop leaves. A real SQLite store in a temporary
//! directory; the sink is a script that records its calls and answers as told.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::AtomicUsize;

use async_trait::async_trait;
use tokio::sync::Semaphore;

use super::*;
use crate::clock::ManualClock;
use crate::event::Event;
use crate::notice::Notices;
use crate::sinks::{Delivery, Sink, SinkError};
use crate::store::{Handoff, Inserted, Job, RouteTo};
use crate::templates::Message;

/// A sink that records each call's delivery ids and answers from a script (success once the
/// script is spent). With a gate, each call waits for a permit: the test decides when calls
/// end.
#[derive(Default)]
struct Scripted {
    calls: Mutex<Vec<Vec<String>>>,
    answers: Mutex<VecDeque<Result<String, SinkError>>>,
    gate: Option<Arc<Semaphore>>,
    in_flight: AtomicUsize,
    /// Calls in flight as each call started (itself included).
    crowd: Mutex<Vec<usize>>,
}

impl Scripted {
    fn gated() -> Self {
        Self {
            gate: Some(Arc::new(Semaphore::new(0))),
            ..Self::default()
        }
    }

    fn answer(&self, answer: Result<String, SinkError>) {
        self.answers.lock().unwrap().push_back(answer);
    }

    fn calls(&self) -> Vec<Vec<String>> {
        self.calls.lock().unwrap().clone()
    }

    fn delivered(&self) -> Vec<String> {
        self.calls().concat()
    }

    fn open(&self, calls: usize) {
        self.gate.as_ref().unwrap().add_permits(calls);
    }
}

#[async_trait]
impl Sink for Scripted {
    async fn deliver(&self, delivery: &Delivery<'_>) -> Result<String, SinkError> {
        self.deliver_batch(std::slice::from_ref(delivery), &Message::default())
            .await
    }

    async fn deliver_batch(
        &self,
        deliveries: &[Delivery<'_>],
        _summary: &Message,
    ) -> Result<String, SinkError> {
        let crowd = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.crowd.lock().unwrap().push(crowd);
        let ids = deliveries.iter().map(|d| d.event.delivery_id.clone());
        self.calls.lock().unwrap().push(ids.collect());
        if let Some(gate) = &self.gate {
            gate.acquire().await.unwrap().forget();
        }
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        let answer = self.answers.lock().unwrap().pop_front();
        answer.unwrap_or_else(|| Ok("ok".into()))
    }
}

fn t0() -> Timestamp {
    "2026-01-01T00:00:00Z".parse().unwrap()
}

const MINUTE: Duration = Duration::from_secs(60);

/// An engine on a SQLite store in a temporary directory, its clock at [`t0`], its one sink
/// `rec` the script.
struct Rig {
    _dir: tempfile::TempDir,
    clock: ManualClock,
    config: crate::config::Config,
    plan: Arc<ArcSwap<Plan>>,
    sink: Arc<Scripted>,
    store: Store,
    engine: Engine,
    turns: Turns,
}

impl Rig {
    /// `tune` sets `rec` up (its digest, batch, limits) in the plan.
    async fn new(sink: Scripted, tune: impl Fn(&mut NamedSink)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "[storage]\npath = \"{}\"\n\n[sources.cl]\nsecret = \"s\"\n\n[sinks.rec]\ntype = \"log\"\n",
                dir.path().join("db.sqlite").display()
            ),
        )
        .unwrap();
        let config = crate::config::load(&config).unwrap();
        let sink = Arc::new(sink);
        let clock = ManualClock::new(t0());
        let plan = Arc::new(ArcSwap::from_pointee(Self::plan(&config, &sink, tune)));
        let store = crate::store::open(&config.storage).await.unwrap();
        let engine = Engine::new(
            store.clone(),
            Arc::clone(&plan),
            Arc::default(),
            Arc::new(clock.clone()),
            Arc::default(),
            (Arc::default(), Arc::default(), Arc::new(Notices::new().0)),
        );
        Self {
            _dir: dir,
            turns: Turns::new(clock.now()),
            clock,
            config,
            plan,
            sink,
            store,
            engine,
        }
    }

    fn plan(
        config: &crate::config::Config,
        sink: &Arc<Scripted>,
        tune: impl Fn(&mut NamedSink),
    ) -> Plan {
        let mut plan = Plan::build(config).unwrap();
        let rec = plan.sinks.get_mut("rec").unwrap();
        rec.sink = Arc::clone(sink) as Arc<dyn Sink>;
        rec.shows_message = false;
        tune(rec);
        plan
    }

    /// Replaces the plan, as a reload does.
    fn reload(&self, tune: impl Fn(&mut NamedSink)) {
        self.plan
            .store(Arc::new(Self::plan(&self.config, &self.sink, tune)));
    }

    /// Stores an event routed to `rec`, received now; its job is handed over if `handed`.
    async fn receive(&self, id: &str, handed: bool) -> Vec<Job> {
        let body = format!(r#"{{"id": "{id}", "type": "scan.completed"}}"#);
        let event = Event::parse("cl", body.as_bytes(), None, None).unwrap();
        let route = RouteTo {
            route: "r".into(),
            throttle: None,
            sinks: vec!["rec".into()],
            quiet: Vec::new(),
            group: None,
        };
        let now = self.clock.now();
        let handoff = if handed {
            Handoff {
                sinks: vec!["rec".into()],
                fallback: now + HANDOFF_GRACE,
            }
        } else {
            Handoff::default()
        };
        let inserted = self
            .store
            .insert(&event, body.as_bytes(), now, vec![route], handoff);
        let Inserted::New { handed: jobs, .. } = inserted.await.unwrap() else {
            panic!("a new event");
        };
        if handed {
            self.engine.new_jobs.hand_over(jobs.clone(), event);
        }
        jobs
    }

    /// One turn, and every attempt it started run to its recorded end. Returns when the
    /// engine would turn next unless woken.
    async fn turn(&mut self) -> Timestamp {
        let next = self.engine.turn(&mut self.turns).await;
        while self.turns.running.join_next().await.is_some() {}
        next
    }

    /// One turn, leaving its attempts running.
    async fn turn_only(&mut self) -> Timestamp {
        self.engine.turn(&mut self.turns).await
    }

    /// The sink's queue: jobs waiting and dead letters.
    async fn queue(&self) -> (u64, u64) {
        queue(&self.store, self.clock.now()).await
    }

    async fn next_due(&self) -> Timestamp {
        self.store.due_summary().await.unwrap()["rec"].next_due
    }
}

/// `rec`'s queue in `store` at `now`: jobs waiting and dead letters.
async fn queue(store: &Store, now: Timestamp) -> (u64, u64) {
    let queues = store.queues(now).await.unwrap();
    queues
        .iter()
        .find(|q| q.sink == "rec")
        .map_or((0, 0), |q| (q.waiting, q.dead))
}

/// Lets the runtime's other tasks run until `done` holds, for at most 5 s of real time.
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never happened: {what}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test]
async fn a_turn_starts_what_is_due_by_its_clock_and_nothing_else() {
    let mut rig = Rig::new(Scripted::default(), |_| {}).await;
    rig.receive("now", false).await;
    rig.clock.advance(60 * MINUTE);
    rig.receive("in-an-hour", false).await;
    rig.clock.set(t0());

    let next = rig.turn().await;
    assert_eq!(rig.sink.delivered(), ["now"]);
    assert_eq!(
        next,
        t0() + POLL,
        "nothing else is due before the next poll"
    );

    // Half an hour on, still nothing: the later job is not due.
    rig.clock.advance(30 * MINUTE);
    rig.turn().await;
    assert_eq!(rig.sink.delivered().len(), 1);

    // An hour on it is, and it is delivered once; so was the first.
    rig.clock.advance(30 * MINUTE);
    rig.turn().await;
    rig.turn().await;
    assert_eq!(rig.sink.delivered(), ["now", "in-an-hour"]);
    assert_eq!(rig.queue().await, (0, 0), "no job waits");
    rig.store.close().await;
}

#[tokio::test]
async fn a_failed_job_is_tried_again_at_its_next_try_and_not_a_second_before() {
    let mut rig = Rig::new(Scripted::default(), |rec| {
        rec.delivery.retry.base.0 = 15 * MINUTE;
        rec.delivery.retry.cap.0 = 15 * MINUTE;
    })
    .await;
    rig.sink
        .answer(Err(SinkError::transient("502 from the receiver")));
    rig.receive("flaky", false).await;

    rig.turn().await;
    assert_eq!(rig.sink.delivered(), ["flaky"]);
    let retry_at = rig.next_due().await;
    assert!(
        retry_at > t0() && retry_at <= t0() + 15 * MINUTE,
        "{retry_at}"
    );
    assert_eq!(rig.queue().await, (1, 0), "failed, waiting for its retry");

    rig.clock.set(retry_at - Duration::from_secs(1));
    let next = rig.turn().await;
    assert_eq!(rig.sink.delivered().len(), 1, "a second early");
    assert!(next <= retry_at, "the engine turns again by the retry");

    rig.clock.set(retry_at);
    rig.turn().await;
    assert_eq!(rig.sink.delivered(), ["flaky", "flaky"]);
    assert_eq!(rig.queue().await, (0, 0));
    rig.store.close().await;
}

#[tokio::test]
async fn a_digest_is_one_call_once_its_window_closes() {
    let mut rig = Rig::new(Scripted::default(), |rec| rec.digest = Some(15 * MINUTE)).await;
    rig.receive("first", false).await;
    rig.clock.advance(5 * MINUTE);
    rig.receive("second", false).await;

    let closes = t0() + 15 * MINUTE;
    rig.clock.set(closes - Duration::from_secs(1));
    rig.turn().await;
    assert!(rig.sink.calls().is_empty(), "the window is still open");
    assert!(rig.turns.next_look <= closes, "the engine looks by then");

    rig.clock.set(closes);
    rig.turn().await;
    assert_eq!(
        rig.sink.calls(),
        [vec!["first", "second"]],
        "one call for both"
    );

    // The next window opens with the next event, and waits its whole length again.
    rig.receive("third", false).await;
    rig.clock.advance(14 * MINUTE);
    rig.turn().await;
    assert_eq!(rig.sink.calls().len(), 1);
    rig.clock.advance(MINUTE);
    rig.turn().await;
    assert_eq!(rig.sink.calls()[1], ["third"]);
    rig.store.close().await;
}

#[tokio::test]
async fn jobs_of_a_sink_a_reload_removed_become_dead_letters() {
    let mut rig = Rig::new(Scripted::default(), |_| {}).await;
    rig.sink.answer(Err(SinkError::transient("down")));
    rig.receive("a", false).await;
    rig.turn().await;
    rig.receive("b", false).await;

    let mut without = Plan::build(&rig.config).unwrap();
    without.sinks.clear();
    rig.plan.store(Arc::new(without));
    rig.clock.advance(POLL);
    rig.turn().await;
    assert_eq!(
        rig.queue().await,
        (0, 2),
        "the job waiting for its retry too"
    );
    assert_eq!(rig.sink.delivered(), ["a"], "no call to a removed sink");
    rig.store.close().await;
}

#[tokio::test]
async fn a_shrunk_share_starts_no_call_until_the_calls_in_flight_fit_it() {
    let mut rig = Rig::new(Scripted::gated(), |rec| rec.delivery.concurrency = 3).await;
    for i in 0..6 {
        rig.receive(&format!("e{i}"), false).await;
    }
    rig.turn_only().await;
    let sink = Arc::clone(&rig.sink);
    until("three calls", || sink.in_flight.load(Ordering::SeqCst) == 3).await;

    rig.reload(|rec| rec.delivery.concurrency = 1);
    rig.clock.advance(POLL);
    rig.turn_only().await;
    // Calls end one by one; none starts until the last of the three made under the old
    // limit is done, and then one at a time.
    for _ in 0..6 {
        sink.open(1);
        let calls = sink.calls().len();
        until("a call ends", || {
            sink.calls().len() > calls || sink.in_flight.load(Ordering::SeqCst) < 3
        })
        .await;
        rig.clock.advance(POLL);
        rig.turn_only().await;
    }
    sink.open(6);
    while rig.turns.running.join_next().await.is_some() {}
    rig.turn().await;

    assert_eq!(sink.delivered().len(), 6);
    let crowd = sink.crowd.lock().unwrap().clone();
    assert_eq!(crowd[..3], [1, 2, 3], "three at once under the old limit");
    assert!(
        crowd[3..].iter().all(|&n| n == 1),
        "one at a time after the shrink: {crowd:?}"
    );
    rig.store.close().await;
}

#[tokio::test]
async fn handed_over_jobs_linger_for_a_fuller_batch_then_go() {
    let mut rig = Rig::new(Scripted::default(), |rec| rec.batch = 10).await;
    rig.receive("alone", true).await;
    let next = rig.turn().await;
    assert!(rig.sink.calls().is_empty(), "waiting for company");
    assert_eq!(next, t0() + LINGER, "the engine wakes as the linger ends");

    rig.clock.advance(LINGER / 2);
    rig.receive("company", true).await;
    rig.turn().await;
    assert!(rig.sink.calls().is_empty());

    rig.clock.set(next);
    rig.turn().await;
    assert_eq!(rig.sink.calls(), [vec!["alone", "company"]]);

    // A full batch goes at once.
    for i in 0..10 {
        rig.receive(&format!("full-{i}"), true).await;
    }
    rig.turn().await;
    assert_eq!(rig.sink.calls().len(), 2);
    assert_eq!(rig.sink.calls()[1].len(), 10);
    assert_eq!(rig.queue().await, (0, 0), "each recorded");
    rig.store.close().await;
}

#[tokio::test]
async fn run_wakes_by_its_clock_not_by_the_wall_clock() {
    let rig = Rig::new(Scripted::default(), |_| {}).await;
    rig.clock.advance(60 * MINUTE);
    rig.receive("later", false).await;
    rig.clock.set(t0());
    let stop = CancellationToken::new();
    let Rig {
        engine,
        sink,
        store,
        clock,
        ..
    } = rig;
    let running = tokio::spawn(engine.run(stop.clone()));
    // Real time passes (the engine's whole poll, several times) and nothing is due by its
    // clock; then the clock moves an hour, and the job goes at once.
    tokio::time::sleep(POLL * 2).await;
    assert!(sink.calls().is_empty());
    clock.advance(60 * MINUTE);
    until(
        "the engine wakes when its clock passes the job's time",
        || !sink.calls().is_empty(),
    )
    .await;
    stop.cancel();
    drain(
        running.await.unwrap(),
        tokio::time::Instant::now() + Duration::from_secs(5),
    )
    .await;
    assert_eq!(sink.delivered(), ["later"]);
    store.close().await;
}

#[tokio::test]
async fn a_stop_lets_the_calls_in_flight_finish_and_starts_no_other() {
    let rig = Rig::new(Scripted::gated(), |rec| rec.delivery.concurrency = 1).await;
    for id in ["one", "two", "three"] {
        rig.receive(id, false).await;
    }
    let stop = CancellationToken::new();
    let Rig {
        engine,
        sink,
        store,
        ..
    } = rig;
    let running = tokio::spawn(engine.run(stop.clone()));
    until("the first call starts", || sink.calls().len() == 1).await;

    stop.cancel();
    let attempts = running.await.unwrap();
    sink.open(3);
    drain(
        attempts,
        tokio::time::Instant::now() + Duration::from_secs(5),
    )
    .await;
    assert_eq!(
        sink.delivered(),
        ["one"],
        "the two waiting for a slot gave up"
    );
    assert_eq!(
        queue(&store, t0()).await,
        (2, 0),
        "the call made was recorded; the others are due for the next start"
    );
    store.close().await;
}
