//! Each source's last hour (accepted, duplicates, refused, the last delivery), as the status
//! page's overview shows it: counts per minute in memory, this daemon's own, so the page
//! answers without reading the history and a quiet source costs sixty small counters.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

/// How far back the tally goes.
const HOUR: Duration = Duration::from_secs(3600);

/// What happened to one request, as the tally counts it.
#[derive(Debug, Clone, Copy)]
pub(super) enum Tallied {
    Accepted,
    Duplicate,
    Refused,
}

/// A source's last hour.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SourceHour {
    pub source: String,
    pub accepted: u64,
    pub duplicates: u64,
    pub refused: u64,
    /// How long ago the last delivery was accepted (seconds), if it was this past hour.
    pub last_accepted_ago: Option<u64>,
}

#[derive(Default)]
struct Tally {
    /// (minute since the tally began, accepted, duplicates, refused), oldest first.
    minutes: VecDeque<(u64, [u64; 3])>,
    last_accepted: Option<Instant>,
}

/// Every source's tally.
pub(super) struct Recent {
    began: Instant,
    sources: Mutex<HashMap<String, Tally>>,
}

impl Recent {
    pub(super) fn new() -> Self {
        Self {
            began: Instant::now(),
            sources: Mutex::default(),
        }
    }

    pub(super) fn record(&self, source: &str, outcome: Tallied) {
        let now = Instant::now();
        let minute = self.minute(now);
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        if !sources.contains_key(source) {
            sources.insert(source.to_owned(), Tally::default());
        }
        let Some(tally) = sources.get_mut(source) else {
            return;
        };
        if tally.minutes.back().is_none_or(|(at, _)| *at != minute) {
            tally.minutes.push_back((minute, [0; 3]));
        }
        // Minutes older than the hour go as new ones come.
        while tally
            .minutes
            .front()
            .is_some_and(|(at, _)| *at + 60 <= minute)
        {
            tally.minutes.pop_front();
        }
        if let Some((_, counts)) = tally.minutes.back_mut() {
            counts[outcome as usize] += 1;
        }
        if let Tallied::Accepted = outcome {
            tally.last_accepted = Some(now);
        }
    }

    /// Every source heard from, by name: its counts of the last sixty minutes.
    pub(super) fn last_hour(&self) -> Vec<SourceHour> {
        let now = Instant::now();
        let minute = self.minute(now);
        let sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        let mut hours: Vec<SourceHour> = sources
            .iter()
            .map(|(source, tally)| {
                let mut counts = [0; 3];
                for (_, minute_counts) in tally.minutes.iter().filter(|(at, _)| at + 60 > minute) {
                    for (total, count) in counts.iter_mut().zip(minute_counts) {
                        *total += count;
                    }
                }
                SourceHour {
                    source: source.clone(),
                    accepted: counts[Tallied::Accepted as usize],
                    duplicates: counts[Tallied::Duplicate as usize],
                    refused: counts[Tallied::Refused as usize],
                    last_accepted_ago: tally
                        .last_accepted
                        .map(|at| now.duration_since(at))
                        .filter(|ago| *ago < HOUR)
                        .map(|ago| ago.as_secs()),
                }
            })
            .collect();
        hours.sort_by(|a, b| a.source.cmp(&b.source));
        hours
    }

    fn minute(&self, now: Instant) -> u64 {
        now.duration_since(self.began).as_secs() / 60
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_each_outcome_per_source() {
        let recent = Recent::new();
        recent.record("cl", Tallied::Accepted);
        recent.record("cl", Tallied::Accepted);
        recent.record("cl", Tallied::Duplicate);
        recent.record("cs", Tallied::Refused);
        let hours = recent.last_hour();
        assert_eq!(hours.len(), 2);
        assert_eq!(
            (
                hours[0].source.as_str(),
                hours[0].accepted,
                hours[0].duplicates,
                hours[0].refused
            ),
            ("cl", 2, 1, 0)
        );
        assert_eq!(hours[0].last_accepted_ago, Some(0));
        assert_eq!((hours[1].refused, hours[1].last_accepted_ago), (1, None));
    }
}
