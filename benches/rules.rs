//! Route evaluation cost for `benches/ingest.sh`: a table of 200 routes (globs, sources and
//! CEL conditions, every route `continue = true` so all 200 are evaluated, the worst case)
//! against a one-route table measured in the same run, on the shipped sample events.

#![allow(clippy::print_stdout)] // its report is what it prints

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hookroute::event::Event;
use hookroute::rules::{Route, RouteSpec, RouteTable};

fn spec(i: usize) -> RouteSpec {
    let (events, when) = match i % 5 {
        0 => (
            vec!["scan.completed"],
            format!("data.score < {} || data.grade in ['D', 'F']", 50 + i % 40),
        ),
        1 => (
            vec!["scan.*", "alert.*"],
            format!("data.domain == 'd{i}.example.com'"),
        ),
        2 => (
            vec!["policy.*"],
            format!("data.client_id == 'client{i}' && type != 'policy.rejected'"),
        ),
        3 => (
            vec!["assessment.*"],
            format!("has(data.score) && data.score > {}.0", i % 100),
        ),
        _ => (
            vec!["*"],
            format!("source == 'cl' && size(data) > {}", i % 7),
        ),
    };
    RouteSpec {
        name: format!("route {i}"),
        events: events.into_iter().map(str::to_owned).collect(),
        sources: Vec::new(),
        when: Some(when),
        sinks: vec!["sink".into()],
        continue_: true,
        throttle: None,
        mute_during: Vec::new(),
        active_during: Vec::new(),
        group: None,
        templates: BTreeMap::new(),
        enrich: Vec::new(),
        enrich_required: false,
    }
}

fn table(n: usize) -> RouteTable {
    RouteTable::new(
        (0..n)
            .map(|i| Route::compile(i, &spec(i), BTreeMap::new()).expect("valid route"))
            .collect(),
    )
}

/// Mean and p99 time of one `route` call over the events, for about `budget`.
fn measure(table: &RouteTable, events: &[Event], budget: Duration) -> (Duration, Duration) {
    let mut samples = Vec::new();
    let started = Instant::now();
    while started.elapsed() < budget {
        for event in events {
            let t = Instant::now();
            std::hint::black_box(table.route(std::hint::black_box(event)));
            samples.push(t.elapsed());
        }
    }
    samples.sort_unstable();
    let mean = samples.iter().sum::<Duration>() / samples.len() as u32;
    (mean, samples[samples.len() * 99 / 100])
}

fn main() {
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
    let events: Vec<Event> = std::fs::read_dir(fixtures)
        .expect("fixtures")
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            let body = std::fs::read(&path).ok()?;
            Event::parse("cl", &body, None, None).ok()
        })
        .collect();
    let (one, two_hundred) = (table(1), table(200));
    let budget = Duration::from_secs(2);
    let _ = measure(&two_hundred, &events, Duration::from_millis(300)); // warm-up
    let (base_mean, base_p99) = measure(&one, &events, budget);
    let (mean, p99) = measure(&two_hundred, &events, budget);
    println!("route table   mean/event   p99/event");
    println!("1 route       {:>9.1?}   {:>9.1?}", base_mean, base_p99);
    println!("200 routes    {:>9.1?}   {:>9.1?}", mean, p99);
    println!(
        "ratio 200/1: {:.1}x; 200 routes take {:.3} ms at p99 (target: well under 1 ms)",
        mean.as_secs_f64() / base_mean.as_secs_f64(),
        p99.as_secs_f64() * 1000.0
    );
}
