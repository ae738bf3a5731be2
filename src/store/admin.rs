//! What the operator's commands ask of storage (`deliveries`, `replay`, `dead-letter`), as one
//! trait a backend implements next to [`Storage`](super::Storage), and the rows they print.
//! Synchronous: the command-line tools run one query and exit.

use jiff::Timestamp;
use serde::Serialize;

use super::{StoreError, StoredEvent, from_ms};

/// What a command does with the database: reads open it read-only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

/// Every status a listed row can have.
pub const STATUSES: &[&str] = &[
    "pending",
    "succeeded",
    "failed",
    "dead",
    "suppressed",
    "unrouted",
];

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
    pub status: String,
    pub attempts: u32,
    pub next_attempt_at: Option<String>,
    /// The last error, or the throttle key of a suppressed route.
    pub detail: Option<String>,
}

/// A job with its attempts, for `deliveries show`.
#[derive(Debug, Clone, Serialize)]
pub struct JobDetail {
    pub id: i64,
    pub route: String,
    pub sink: String,
    pub status: String,
    pub attempts: u32,
    /// Only a failed job's retry has a time: a pending job is due now or being delivered.
    pub next_attempt_at: Option<String>,
    pub last_error: Option<String>,
    pub response: Option<String>,
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
    pub status: String,
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

#[derive(Debug, Default)]
pub struct Filter {
    pub status: Option<String>,
    pub source: Option<String>,
    pub since: Option<Timestamp>,
    pub limit: usize,
}

/// The operator's queries and changes, made while the daemon runs.
pub trait AdminStorage {
    /// Deliveries, newest event first.
    ///
    /// # Errors
    /// On a database error.
    fn list(&self, filter: &Filter) -> Result<Vec<Row>, StoreError>;

    /// An event with its routing, jobs and attempts; `None` when there is no such event.
    ///
    /// # Errors
    /// On a database error.
    fn show(&self, event_id: i64) -> Result<Option<EventDetail>, StoreError>;

    /// A job, if there is one with this id.
    ///
    /// # Errors
    /// On a database error.
    fn job(&self, job_id: i64) -> Result<Option<JobState>, StoreError>;

    /// An event's jobs still waiting (pending, or failed and due again later).
    ///
    /// # Errors
    /// On a database error.
    fn waiting_jobs(&self, event_id: i64) -> Result<Vec<JobState>, StoreError>;

    /// Makes a failed job due now, keeping its attempts (and so its place in the retry
    /// policy). False when the job is not failed (any more).
    ///
    /// # Errors
    /// On a database error.
    fn retry_now(&self, job_id: i64) -> Result<bool, StoreError>;

    /// Queues new jobs for `event_id`, one per (route, sink); returns their ids.
    ///
    /// # Errors
    /// On a database error.
    fn enqueue(
        &mut self,
        event_id: i64,
        pairs: &[(String, String)],
    ) -> Result<Vec<i64>, StoreError>;

    /// Puts dead jobs back in the queue with a fresh set of attempts: one job, or all of them.
    /// Returns how many were re-queued.
    ///
    /// # Errors
    /// On a database error.
    fn retry_dead(&self, job_id: Option<i64>) -> Result<usize, StoreError>;
}

/// When a job with `status`, due at `next`, is tried again, as the tools show it: only a failed
/// job's retry has a time. A pending job is due now or being delivered, and its row's time
/// is only the fallback of a job handed to the engine in memory.
pub(crate) fn retry_at(status: &str, next: i64) -> Option<String> {
    (status == "failed").then(|| at(next))
}

/// A stored time as the tools print it.
pub(crate) fn at(ms: i64) -> String {
    from_ms(ms).to_string()
}

/// The event columns of a listed row.
pub(crate) struct Head {
    pub event_id: i64,
    pub source: String,
    pub event_type: String,
    pub delivery_id: String,
    pub received_at: i64,
}

/// The row of an event no route took (and none was replayed to).
pub(crate) fn unrouted(head: &Head) -> Row {
    Row {
        event_id: head.event_id,
        job_id: None,
        source: head.source.clone(),
        event_type: head.event_type.clone(),
        delivery_id: head.delivery_id.clone(),
        received_at: at(head.received_at),
        route: None,
        sink: None,
        status: "unrouted".into(),
        attempts: 0,
        next_attempt_at: None,
        detail: None,
    }
}

/// Numbers a job's attempts as `show` prints them. A dead letter retried starts a fresh count
/// for the retry policy; the record numbers every attempt the job ever had, in order, and
/// counts them all.
pub(crate) fn number_attempts(job: &mut JobDetail) {
    for (number, attempt) in (1..).zip(job.history.iter_mut()) {
        attempt.number = number;
    }
    job.attempts = u32::try_from(job.history.len()).unwrap_or(u32::MAX);
}
