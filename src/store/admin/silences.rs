//! Silences as the operator's commands see them: adding, listing and ending them, and what
//! set a job aside, as `show` and `list` say it.

use jiff::Timestamp;

use super::{Row, RowStatus, Tools};
use crate::store::{JobStatus, NewSilence, Silence, StoreError};

impl Tools {
    /// Stores a silence made at `now`; returns its id.
    pub fn add_silence(&mut self, new: &NewSilence, now: Timestamp) -> Result<i64, StoreError> {
        self.backend.add_silence(new, now)
    }

    /// The silences active or pending at `now`, or (`ended`) those that had ended by then.
    pub fn silences(&self, ended: bool, now: Timestamp) -> Result<Vec<Silence>, StoreError> {
        self.backend.silences(ended, now)
    }

    /// A silence with up to `limit` of the jobs it set aside, newest event first.
    pub fn silence(
        &self,
        id: i64,
        limit: usize,
    ) -> Result<Option<(Silence, Vec<Row>)>, StoreError> {
        let Some(silence) = self.backend.silence(id)? else {
            return Ok(None);
        };
        let rows = self.backend.quieted_by(&id.to_string(), limit)?;
        // Mute windows are named, silences numbered: a window named "7" is not this silence.
        let rows = rows
            .into_iter()
            .filter(|row| row.status == RowStatus::Silenced)
            .collect();
        Ok(Some((silence, rows)))
    }

    /// Ends a silence at `now`; false when it had already ended, or there is none.
    pub fn expire_silence(&self, id: i64, now: Timestamp) -> Result<bool, StoreError> {
        self.backend.expire_silence(id, now)
    }

    /// What set a job aside, as `show` says it: the silence with its comment, author and end,
    /// or the window.
    pub(super) fn why_quiet(
        &self,
        status: JobStatus,
        by: Option<&str>,
    ) -> Result<Option<String>, StoreError> {
        let Some(by) = by else { return Ok(None) };
        Ok(Some(match status {
            JobStatus::Silenced => {
                let silence = match by.parse() {
                    Ok(id) => self.backend.silence(id)?,
                    Err(_) => None,
                };
                match silence {
                    Some(s) => format!(
                        "silenced by {}: {}, {}, until {}",
                        s.id, s.comment, s.author, s.ends_at
                    ),
                    None => format!("silenced by {by} (since pruned)"),
                }
            }
            JobStatus::Muted => format!("muted {by}"),
            _ => return Ok(None),
        }))
    }
}

/// A set-aside row's detail, as `list` prints it: what set it aside, by name.
pub(super) fn say_why_quiet(row: &mut Row) {
    let verb = match row.status {
        RowStatus::Silenced => "silenced by",
        RowStatus::Muted => "muted",
        _ => return,
    };
    if let Some(by) = &row.detail {
        row.detail = Some(format!("{verb} {by}"));
    }
}
