//! What the operator's commands ask of storage (`deliveries`, `replay`, `retry`,
//! `dead-letter`): their logic once, in [`Tools`], over the primitive queries a backend
//! implements next to [`Storage`](super::Storage) ([`AdminBackend`]), and the rows they print.
//! Synchronous: the command-line tools run a few queries and exit.

use jiff::Timestamp;
use serde::Serialize;

mod list;
mod passes;
mod silences;
mod sinks;

pub use list::{Filter, Listing};
pub use sinks::SinkStatus;

use super::{
    JobStatus, NewSilence, Silence, SinkChange, SinkChanged, SinkState, StoreError, StoredEvent,
    from_ms,
};
use crate::metrics::SinkQueue;
use crate::store::PassRow;

/// What a command does with the database: reads open it read-only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

/// Every status a listed row can have, as `--status` takes it ([`RowStatus`]'s names).
pub const STATUSES: &[&str] = &[
    "pending",
    "succeeded",
    "failed",
    "dead",
    "silenced",
    "muted",
    "suppressed",
    "unrouted",
];

/// What a listed row is: a job in its status, or a routing outcome that created no job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RowStatus {
    Pending,
    Succeeded,
    Failed,
    Dead,
    /// A silence set the job aside.
    Silenced,
    /// The route's mute window set the job aside.
    Muted,
    /// A route's throttle held the event back.
    Suppressed,
    /// No route took the event.
    Unrouted,
}

impl RowStatus {
    pub const ALL: [Self; 8] = [
        Self::Pending,
        Self::Succeeded,
        Self::Failed,
        Self::Dead,
        Self::Silenced,
        Self::Muted,
        Self::Suppressed,
        Self::Unrouted,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Dead => "dead",
            Self::Silenced => "silenced",
            Self::Muted => "muted",
            Self::Suppressed => "suppressed",
            Self::Unrouted => "unrouted",
        }
    }

    /// A status as stored or as `--status` names it; `None` for any other text.
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|status| status.as_str() == text)
    }
}

impl From<JobStatus> for RowStatus {
    fn from(status: JobStatus) -> Self {
        match status {
            JobStatus::Pending => Self::Pending,
            JobStatus::Failed => Self::Failed,
            JobStatus::Succeeded => Self::Succeeded,
            JobStatus::Dead => Self::Dead,
            JobStatus::Silenced => Self::Silenced,
            JobStatus::Muted => Self::Muted,
        }
    }
}

impl std::fmt::Display for RowStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `pad`, not `write_str`: the tools' tables give statuses a width.
        f.pad(self.as_str())
    }
}

/// One row of `deliveries list`: a job, or a routing outcome that created none.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub event_id: i64,
    pub job_id: Option<i64>,
    pub source: String,
    #[serde(rename = "type")]
    pub event_type: String,
    pub delivery_id: String,
    pub received_at: String,
    pub route: Option<String>,
    pub sink: Option<String>,
    pub status: RowStatus,
    pub attempts: u32,
    pub next_attempt_at: Option<String>,
    /// The last error, the throttle key of a suppressed route, or what set a job aside.
    pub detail: Option<String>,
}

/// A job with its attempts, for `deliveries show`.
#[derive(Debug, Clone, Serialize)]
pub struct JobDetail {
    pub id: i64,
    pub route: String,
    pub sink: String,
    pub status: JobStatus,
    pub attempts: u32,
    /// Only a failed job's retry has a time: a pending job is due now or being delivered.
    pub next_attempt_at: Option<String>,
    pub last_error: Option<String>,
    pub response: Option<String>,
    /// A set-aside job's silence (its id) or mute window (its name).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quieted_by: Option<String>,
    /// What set it aside, as the operator reads it (filled by [`Tools::show`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quiet: Option<String>,
    pub history: Vec<Attempt>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Attempt {
    pub number: u32,
    pub started_at: String,
    pub finished_at: String,
    pub outcome: String,
    pub error: Option<String>,
    pub response: Option<String>,
}

/// Where one job stands, for the commands that act on a job (`retry`, `dead-letter retry`)
/// or refuse to queue a second one (`replay`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobState {
    pub id: i64,
    pub event_id: i64,
    pub route: String,
    pub sink: String,
    pub status: JobStatus,
    /// Every attempt the job ever had, a dead letter's retries included (as `show` numbers
    /// them).
    pub attempts: u32,
    /// A failed job's next try.
    pub next_attempt_at: Option<String>,
}

/// Everything `deliveries show` prints.
#[derive(Debug, Clone)]
pub struct EventDetail {
    pub stored: StoredEvent,
    pub jobs: Vec<JobDetail>,
    /// Routes that created no job (suppressed), or the event's being unrouted.
    pub routing: Vec<Row>,
}

/// A status `deliveries list` finds through an index of its own, newest event first (the
/// others, no status and `succeeded`, walk the events).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Indexed {
    Pending,
    Failed,
    Dead,
    Silenced,
    Muted,
    Suppressed,
    Unrouted,
}

impl Indexed {
    /// The index for `status`; `None` for `succeeded`, which is walked.
    fn of(status: RowStatus) -> Option<Self> {
        Some(match status {
            RowStatus::Pending => Self::Pending,
            RowStatus::Failed => Self::Failed,
            RowStatus::Dead => Self::Dead,
            RowStatus::Silenced => Self::Silenced,
            RowStatus::Muted => Self::Muted,
            RowStatus::Suppressed => Self::Suppressed,
            RowStatus::Unrouted => Self::Unrouted,
            RowStatus::Succeeded => return None,
        })
    }
}

/// What a backend answers for the operator's commands: primitive reads and writes, each an
/// index seek that reads about as many rows as it returns (a test per backend checks the
/// plans). The commands' logic (walking pages of events, bisecting ids by time, what an event
/// with no rows is) is written once above them, in [`Tools`].
pub trait AdminBackend: Send {
    /// The newest event's id, if there is an event.
    ///
    /// # Errors
    /// On a database error (as every method here).
    fn last_event_id(&self) -> Result<Option<i64>, StoreError>;

    /// When the first event with an id of at least `id` was received (unix milliseconds).
    fn received_from(&self, id: i64) -> Result<Option<i64>, StoreError>;

    /// Up to `limit` events with ids below `below` and at least `floor`, newest first: all of
    /// them, or `source`'s.
    fn events_page(
        &self,
        below: i64,
        floor: i64,
        limit: usize,
        source: Option<&str>,
    ) -> Result<Vec<Head>, StoreError>;

    /// Each of `events`' rows, in its order: its routing records, then its jobs (empty for
    /// an event with neither).
    fn rows_of(&self, events: &[Head]) -> Result<Vec<Vec<Row>>, StoreError>;

    /// An event's routing records alone (the routes that created no job).
    fn records_of(&self, event: &Head) -> Result<Vec<Row>, StoreError>;

    /// Up to `limit` rows with `status`, newest event first, of events in `[floor, below)`:
    /// all of them, or `source`'s (and `sink`'s).
    fn with_status(
        &self,
        status: Indexed,
        range: (i64, i64),
        of: (Option<&str>, Option<&str>),
        limit: usize,
    ) -> Result<Vec<Row>, StoreError>;

    /// An event.
    fn event(&self, event_id: i64) -> Result<Option<StoredEvent>, StoreError>;

    /// An event's jobs, each with every attempt, in order.
    fn jobs_of(&self, event_id: i64) -> Result<Vec<JobDetail>, StoreError>;

    /// A job, if there is one with this id.
    fn job(&self, job_id: i64) -> Result<Option<JobState>, StoreError>;

    /// An event's jobs still waiting (pending, or failed and due again later).
    fn waiting_jobs(&self, event_id: i64) -> Result<Vec<JobState>, StoreError>;

    /// Makes a failed job due at `now`, keeping its attempts. False when the job is not
    /// failed (any more).
    fn retry_now(&self, job_id: i64, now: Timestamp) -> Result<bool, StoreError>;

    /// Queues new jobs for `event_id` at `now`, one per (route, sink); returns their ids.
    fn enqueue(
        &mut self,
        event_id: i64,
        pairs: &[(String, String)],
        now: Timestamp,
    ) -> Result<Vec<i64>, StoreError>;

    /// Puts dead jobs back in the queue at `now` with a fresh set of attempts: one job, or
    /// all of them. Returns how many were re-queued.
    fn retry_dead(&self, job_id: Option<i64>, now: Timestamp) -> Result<usize, StoreError>;

    /// Up to `limit` jobs set aside by `by` (a silence's id, or a window's name), newest
    /// event first.
    fn quieted_by(&self, by: &str, limit: usize) -> Result<Vec<Row>, StoreError>;

    /// Stores a silence made at `now`; returns its id.
    fn add_silence(&mut self, new: &NewSilence, now: Timestamp) -> Result<i64, StoreError>;

    /// Silences not ended at `now`, oldest first; `ended`: those that had, the last to end
    /// first.
    fn silences(&self, ended: bool, now: Timestamp) -> Result<Vec<Silence>, StoreError>;

    /// A silence, if there is one with this id.
    fn silence(&self, id: i64) -> Result<Option<Silence>, StoreError>;

    /// Ends a silence at `now`; false when it had already ended, or there is none.
    fn expire_silence(&self, id: i64, now: Timestamp) -> Result<bool, StoreError>;

    /// Every failing or paused sink, and each sink's queue at `now`.
    fn sinks(&self, now: Timestamp) -> Result<(Vec<SinkState>, Vec<SinkQueue>), StoreError>;

    /// Applies `change` to `sink` at `now`, as [`Storage::change_sink`](super::Storage) does.
    fn change_sink(
        &mut self,
        sink: &str,
        change: SinkChange,
        now: Timestamp,
    ) -> Result<SinkChanged, StoreError>;

    /// Asks the daemons for a reconcile pass of `source` now (`reconcile --once`).
    fn request_pass(&mut self, source: &str, now: Timestamp) -> Result<(), StoreError>;

    /// Every source's reconcile passes, by name.
    fn passes(&self) -> Result<Vec<PassRow>, StoreError>;

    /// Which of `ids` are stored as `source`'s delivery ids (a dedupe lookup each).
    fn seen(&self, source: &str, ids: &[String]) -> Result<Vec<String>, StoreError>;

    /// When the newest delivery from `source` was received (unix milliseconds), as
    /// [`Storage::newest_seen`](super::Storage::newest_seen) says.
    fn newest_seen(&self, source: &str) -> Result<Option<i64>, StoreError>;
}

/// How many events (or rows of a status) a batch reads at a time.
const PAGE: usize = 64;

/// The operator's queries and changes, made while the daemon runs, written once over a
/// backend's [`AdminBackend`].
pub struct Tools {
    backend: Box<dyn AdminBackend>,
}

impl Tools {
    pub fn new(backend: Box<dyn AdminBackend>) -> Self {
        Self { backend }
    }

    /// An event with its routing, jobs and attempts; `None` when there is no such event.
    pub fn show(&self, event_id: i64) -> Result<Option<EventDetail>, StoreError> {
        let Some(stored) = self.backend.event(event_id)? else {
            return Ok(None);
        };
        let mut jobs = self.backend.jobs_of(event_id)?;
        jobs.iter_mut().for_each(number_attempts);
        for job in &mut jobs {
            job.quiet = self.why_quiet(job.status, job.quieted_by.as_deref())?;
        }
        let head = Head {
            event_id,
            source: stored.event.source.clone(),
            event_type: stored.event.event_type.clone(),
            delivery_id: stored.event.delivery_id.clone(),
            received_at: stored.received_at.as_millisecond(),
        };
        // The jobs are read above, with their attempts: only the routing records are left.
        let mut routing = self.backend.records_of(&head)?;
        if routing.is_empty() && jobs.is_empty() {
            routing.push(unrouted(&head));
        }
        Ok(Some(EventDetail {
            stored,
            jobs,
            routing,
        }))
    }

    /// A job, if there is one with this id.
    pub fn job(&self, job_id: i64) -> Result<Option<JobState>, StoreError> {
        self.backend.job(job_id)
    }

    /// An event's jobs still waiting (pending, or failed and due again later).
    pub fn waiting_jobs(&self, event_id: i64) -> Result<Vec<JobState>, StoreError> {
        self.backend.waiting_jobs(event_id)
    }

    /// Makes a failed job due now, keeping its attempts (and so its place in the retry
    /// policy). False when the job is not failed (any more).
    pub fn retry_now(&self, job_id: i64) -> Result<bool, StoreError> {
        self.backend.retry_now(job_id, Timestamp::now())
    }

    /// Queues new jobs for `event_id`, one per (route, sink); returns their ids.
    pub fn enqueue(
        &mut self,
        event_id: i64,
        pairs: &[(String, String)],
    ) -> Result<Vec<i64>, StoreError> {
        self.backend.enqueue(event_id, pairs, Timestamp::now())
    }

    /// Puts dead jobs back in the queue with a fresh set of attempts: one job, or all of them.
    /// Returns how many were re-queued.
    pub fn retry_dead(&self, job_id: Option<i64>) -> Result<usize, StoreError> {
        self.backend.retry_dead(job_id, Timestamp::now())
    }

    /// The newest `n` events, newest first (what `silence add --dry-run` tries).
    pub fn recent_events(&self, n: usize) -> Result<Vec<StoredEvent>, StoreError> {
        let mut events = Vec::with_capacity(n);
        let mut below = i64::MAX;
        while events.len() < n {
            let heads = self
                .backend
                .events_page(below, 0, PAGE.min(n - events.len()), None)?;
            let Some(last) = heads.last() else { break };
            below = last.event_id;
            for head in &heads {
                events.extend(self.backend.event(head.event_id)?);
            }
        }
        Ok(events)
    }
}

/// When a job with `status`, due at `next`, is tried again, as the tools show it: only a failed
/// job's retry has a time. A pending job is due now or being delivered, and its row's time
/// is only the fallback of a job handed to the engine in memory.
pub(crate) fn retry_at(status: impl Into<RowStatus>, next: i64) -> Option<String> {
    (status.into() == RowStatus::Failed).then(|| at(next))
}

/// A stored time as the tools print it.
pub(crate) fn at(ms: i64) -> String {
    from_ms(ms).to_string()
}

/// The event columns of a listed row.
pub struct Head {
    pub event_id: i64,
    pub source: String,
    pub event_type: String,
    pub delivery_id: String,
    pub received_at: i64,
}

/// The row of an event no route took (and none was replayed to).
fn unrouted(head: &Head) -> Row {
    Row {
        event_id: head.event_id,
        job_id: None,
        source: head.source.clone(),
        event_type: head.event_type.clone(),
        delivery_id: head.delivery_id.clone(),
        received_at: at(head.received_at),
        route: None,
        sink: None,
        status: RowStatus::Unrouted,
        attempts: 0,
        next_attempt_at: None,
        detail: None,
    }
}

/// Numbers a job's attempts as `show` prints them. A dead letter retried starts a fresh count
/// for the retry policy; the record numbers every attempt the job ever had, in order, and
/// counts them all.
fn number_attempts(job: &mut JobDetail) {
    for (number, attempt) in (1..).zip(job.history.iter_mut()) {
        attempt.number = number;
    }
    job.attempts = u32::try_from(job.history.len()).unwrap_or(u32::MAX);
}
