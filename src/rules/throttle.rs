//! Throttle windows: within a route's window only the first event per key passes; the rest
//! are suppressed (and recorded as such by the caller). Pure: the caller supplies each event's
//! time, which is the event's own `created_at`/`timestamp` when it has one. Measuring on the
//! events' clock means a backlog of retried deliveries is throttled by when things happened,
//! not by when they arrived together after an outage.

use std::collections::HashMap;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};

use crate::store::ThrottleWindow;

#[derive(Debug, Default)]
pub struct Throttles {
    /// (route, key) → window start.
    started: HashMap<(String, String), Timestamp>,
}

impl Throttles {
    pub fn new(windows: impl IntoIterator<Item = ThrottleWindow>) -> Self {
        Self {
            started: windows
                .into_iter()
                .map(|w| ((w.route, w.key), w.started_at))
                .collect(),
        }
    }

    /// Whether an event at `at` passes route `route`'s throttle for `key`. `None`: suppressed.
    /// `Some`: it passes, and the returned window is the state to persist.
    pub fn admit(
        &mut self,
        route: &str,
        key: &str,
        at: Timestamp,
        window: Duration,
    ) -> Option<ThrottleWindow> {
        let span = SignedDuration::try_from(window).unwrap_or(SignedDuration::MAX);
        let entry = self
            .started
            .entry((route.to_owned(), key.to_owned()))
            .or_insert(Timestamp::MIN);
        let distance = at.duration_since(*entry).abs();
        if *entry != Timestamp::MIN && distance < span {
            return None;
        }
        // A late event from before the current window passes without moving the window back.
        if at > *entry {
            *entry = at;
        }
        Some(ThrottleWindow {
            route: route.to_owned(),
            key: key.to_owned(),
            started_at: *entry,
            window,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + secs).unwrap()
    }

    #[test]
    fn first_per_key_per_window() {
        let hour = Duration::from_secs(3600);
        let mut throttles = Throttles::default();
        assert!(throttles.admit("r", "a.com", t(0), hour).is_some());
        assert!(throttles.admit("r", "a.com", t(1800), hour).is_none());
        assert!(
            throttles.admit("r", "b.com", t(1800), hour).is_some(),
            "keys are independent"
        );
        assert!(
            throttles.admit("other", "a.com", t(1800), hour).is_some(),
            "routes are independent"
        );
        assert!(throttles.admit("r", "a.com", t(3599), hour).is_none());
        let reopened = throttles.admit("r", "a.com", t(3600), hour).unwrap();
        assert_eq!(reopened.started_at, t(3600));
        assert!(throttles.admit("r", "a.com", t(3700), hour).is_none());
        // Late arrivals from long before the window pass without moving it.
        let late = throttles.admit("r", "a.com", t(-7200), hour).unwrap();
        assert_eq!(late.started_at, t(3600));
        assert!(throttles.admit("r", "a.com", t(3800), hour).is_none());
    }

    #[test]
    fn state_survives_a_restart() {
        let hour = Duration::from_secs(3600);
        let mut before = Throttles::default();
        let window = before.admit("r", "k", t(0), hour).unwrap();
        let mut after = Throttles::new([window]);
        assert!(after.admit("r", "k", t(60), hour).is_none());
    }
}
