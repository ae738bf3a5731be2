//! Throttle windows: within a route's window only the first event per key passes; the rest
//! are suppressed (and recorded as such). Pure: the store keeps each (route, key)'s window
//! start and applies this in the transaction that stores the event, so the windows are
//! exactly as durable as the events they let through. Time is the event's own
//! `created_at`/`timestamp` when it has one: a backlog of retried deliveries is throttled by
//! when things happened, not by when they arrived together after an outage.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};

/// Whether an event at `at` passes a throttle whose window for the event's key opened at
/// `started` (`None`: never). `None`: suppressed. `Some`: it passes, with the window's start
/// to keep from now on.
pub fn admit(started: Option<Timestamp>, at: Timestamp, window: Duration) -> Option<Timestamp> {
    let Some(started) = started else {
        return Some(at);
    };
    let span = SignedDuration::try_from(window).unwrap_or(SignedDuration::MAX);
    if at.duration_since(started).abs() < span {
        return None;
    }
    // A late event from before the current window passes without moving the window back.
    Some(at.max(started))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + secs).unwrap()
    }

    /// The store's part: one window start per (route, key).
    #[derive(Default)]
    struct Windows(HashMap<(&'static str, &'static str), Timestamp>);

    impl Windows {
        fn admit(&mut self, route: &'static str, key: &'static str, at: Timestamp) -> bool {
            let hour = Duration::from_secs(3600);
            match admit(self.0.get(&(route, key)).copied(), at, hour) {
                Some(start) => {
                    self.0.insert((route, key), start);
                    true
                }
                None => false,
            }
        }
    }

    #[test]
    fn first_per_key_per_window() {
        let mut windows = Windows::default();
        assert!(windows.admit("r", "a.com", t(0)));
        assert!(!windows.admit("r", "a.com", t(1800)));
        assert!(windows.admit("r", "b.com", t(1800)), "keys are independent");
        assert!(
            windows.admit("other", "a.com", t(1800)),
            "routes are independent"
        );
        assert!(!windows.admit("r", "a.com", t(3599)));
        assert!(windows.admit("r", "a.com", t(3600)));
        assert_eq!(windows.0[&("r", "a.com")], t(3600));
        assert!(!windows.admit("r", "a.com", t(3700)));
        // Late arrivals from long before the window pass without moving it.
        assert!(windows.admit("r", "a.com", t(-7200)));
        assert_eq!(windows.0[&("r", "a.com")], t(3600));
        assert!(!windows.admit("r", "a.com", t(3800)));
    }

    #[test]
    fn a_late_event_inside_the_window_is_suppressed_too() {
        assert_eq!(
            admit(Some(t(3600)), t(3000), Duration::from_secs(3600)),
            None
        );
    }
}
