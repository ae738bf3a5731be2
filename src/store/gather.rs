//! Jobs that go out together: a digest (a sink's every job, after a window) and a route's
//! groups (its events sharing a key, after a wait). When each is due is decided here, once,
//! for both backends.

use jiff::Timestamp;

/// When a digest is due: once its oldest waiting job (created at `oldest`) has waited the
/// whole `window`. The one statement of the rule: the delivery engine looks by it, and each
/// backend's [`Storage::due_jobs`](super::Storage::due_jobs) holds a digest's jobs back by it.
pub fn digest_due(oldest: Timestamp, window: std::time::Duration) -> Timestamp {
    jiff::SignedDuration::try_from(window)
        .ok()
        .and_then(|window| oldest.checked_add(window).ok())
        .unwrap_or(Timestamp::MAX)
}

/// How a read of due jobs treats jobs that go out together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gather {
    /// Each job on its own.
    Each,
    /// A digest: none until the oldest due job has waited this long ([`digest_due`]), then
    /// all of them.
    Digest(std::time::Duration),
    /// Routes to the sink group their events: a group's due jobs are read together, by one
    /// daemon (PostgreSQL's replicas take turns reading the sink).
    Groups,
}

impl Gather {
    /// The digest's window, if it is one.
    pub const fn hold(self) -> Option<std::time::Duration> {
        match self {
            Self::Digest(window) => Some(window),
            Self::Each | Self::Groups => None,
        }
    }
}

/// Where a new job joins its group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupTo {
    pub key: String,
    pub wait: std::time::Duration,
    pub interval: std::time::Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_digest_is_due_once_its_oldest_job_waited_the_window() {
        let oldest: Timestamp = "2026-12-06T10:00:00Z".parse().unwrap();
        let window = std::time::Duration::from_secs(15 * 60);
        assert_eq!(
            digest_due(oldest, window).to_string(),
            "2026-12-06T10:15:00Z"
        );
        // A window no clock reaches holds the digest back for good, rather than wrapping.
        assert_eq!(digest_due(oldest, std::time::Duration::MAX), Timestamp::MAX);
        assert_eq!(digest_due(Timestamp::MAX, window), Timestamp::MAX);
    }
}
