//! What the daemon notices about itself (a sink failing, a dead letter, a bad signature, a
//! failed reload), as the parts that notice it tell it: a leaf they all may use. Sending never
//! waits and never fails the sender's work: a notice that finds the queue full is counted and
//! dropped. [`crate::internal`] turns notices into `hookroute.*` events.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use jiff::Timestamp;
use tokio::sync::mpsc;

/// The source every internal event comes from.
pub const SOURCE: &str = "hookroute";

/// Notices waiting to become events, at most: more are dropped (and counted).
const QUEUE: usize = 4096;

/// Something the daemon noticed about itself.
#[derive(Debug, Clone, PartialEq)]
pub enum Notice {
    /// A sink's failure streak passed `[self]`'s threshold.
    SinkFailing(SinkNews),
    /// A sink was paused: by hookroute for an outage, or by an operator.
    SinkPaused {
        news: SinkNews,
        /// When the pause began: what makes it one event across replicas (an operator's
        /// pause replacing hookroute's is another).
        at: Timestamp,
        by: String,
        comment: String,
        until: Option<Timestamp>,
    },
    /// A failing or paused sink delivered again, or an operator resumed it.
    SinkRecovered {
        news: SinkNews,
        paused: bool,
        by: String,
    },
    /// A job went to the dead letters.
    DeadLetter(DeadLetter),
    /// A delivery was refused for its signature (or its signed time).
    BadSignature {
        source: String,
        reason: String,
        client: IpAddr,
    },
    /// A commit failed: the sender was answered 503.
    StorageFailed {
        error: String,
    },
    /// A commit took longer than `[self] storage_slow`.
    StorageSlow {
        took: Duration,
    },
    /// A commit succeeded after failures or slow ones.
    StorageOk,
    ReloadFailed {
        problems: String,
    },
    /// The sender's API refused a source's key: reconciling stops until a reload.
    ReconcileFailing {
        source: String,
        error: String,
    },
    Reloaded {
        sources: usize,
        sinks: usize,
        routes: usize,
    },
    Started {
        version: &'static str,
    },
    Stopping,
}

/// A sink's streak, as the notices about it tell it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkNews {
    pub sink: String,
    /// When the streak began: what makes each notice about it one event across replicas.
    pub since: Timestamp,
    pub failures: u32,
    /// The last error, its secrets taken out.
    pub last_error: String,
    /// The last few different errors the daemon that tells saw, oldest first.
    pub recent_errors: Vec<String>,
}

/// A dead letter, as its notice tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub job_id: i64,
    pub event_id: i64,
    pub route: String,
    pub sink: String,
    pub error: String,
    /// The event's source, type and delivery id, when it is still stored.
    pub event: Option<(String, String, String)>,
}

/// Where notices are sent; cheap to share.
#[derive(Debug)]
pub struct Notices {
    queue: mpsc::Sender<(Notice, Timestamp)>,
    dropped: AtomicU64,
    /// Whether a commit failed (or was slow) since the last good one: ingest tells the good
    /// one only then, so the hot path costs one load.
    degraded: AtomicBool,
}

impl Notices {
    /// A sender and the receiving end [`crate::internal::run`] drains.
    pub fn new() -> (Self, mpsc::Receiver<(Notice, Timestamp)>) {
        let (queue, receiver) = mpsc::channel(QUEUE);
        let notices = Self {
            queue,
            dropped: AtomicU64::new(0),
            degraded: AtomicBool::new(false),
        };
        (notices, receiver)
    }

    /// Tells `notice`, noticed at `at`.
    pub fn send(&self, notice: Notice, at: Timestamp) {
        if self.queue.try_send((notice, at)).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Notices dropped for a full queue so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Tells how a commit went: a failure, a slow one, or a good one after either.
    pub fn commit(&self, result: Result<Duration, String>, slow: Duration, at: Timestamp) {
        match result {
            Ok(took) if took < slow => {
                if self.degraded.load(Ordering::Relaxed)
                    && self.degraded.swap(false, Ordering::Relaxed)
                {
                    self.send(Notice::StorageOk, at);
                }
            }
            Ok(took) => {
                self.degraded.store(true, Ordering::Relaxed);
                self.send(Notice::StorageSlow { took }, at);
            }
            Err(error) => {
                self.degraded.store(true, Ordering::Relaxed);
                self.send(Notice::StorageFailed { error }, at);
            }
        }
    }
}

/// The kinds of internal event, each `hookroute.<name>`: what `[self] events` turns on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    SinkFailing,
    SinkPaused,
    SinkRecovered,
    DeadLetter,
    SignatureFailing,
    ReloadFailed,
    ReconcileFailing,
    Reloaded,
    StorageDegraded,
    Started,
    Stopping,
}

impl Kind {
    pub const ALL: [Self; 11] = [
        Self::SinkFailing,
        Self::SinkPaused,
        Self::SinkRecovered,
        Self::DeadLetter,
        Self::SignatureFailing,
        Self::ReloadFailed,
        Self::ReconcileFailing,
        Self::Reloaded,
        Self::StorageDegraded,
        Self::Started,
        Self::Stopping,
    ];

    /// On unless `[self] events` says otherwise: what a team wants to hear without asking.
    pub const DEFAULT: [Self; 7] = [
        Self::SinkFailing,
        Self::SinkPaused,
        Self::SinkRecovered,
        Self::DeadLetter,
        Self::SignatureFailing,
        Self::ReloadFailed,
        Self::ReconcileFailing,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Self::SinkFailing => "sink.failing",
            Self::SinkPaused => "sink.paused",
            Self::SinkRecovered => "sink.recovered",
            Self::DeadLetter => "dead_letter",
            Self::SignatureFailing => "signature.failing",
            Self::ReloadFailed => "config.reload_failed",
            Self::ReconcileFailing => "reconcile.failing",
            Self::Reloaded => "config.reloaded",
            Self::StorageDegraded => "storage.degraded",
            Self::Started => "started",
            Self::Stopping => "stopping",
        }
    }

    /// The event type: `hookroute.<name>`.
    pub fn event_type(self) -> String {
        format!("{SOURCE}.{}", self.name())
    }

    /// A kind by its name, with or without `hookroute.`.
    pub fn parse(name: &str) -> Option<Self> {
        let name = name.strip_prefix("hookroute.").unwrap_or(name);
        Self::ALL.into_iter().find(|kind| kind.name() == name)
    }
}
