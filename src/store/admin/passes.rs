//! Reconcile passes as the operator's commands see them: asking for one now, and reading how
//! each source's last one went.

use jiff::Timestamp;

use super::Tools;
use crate::store::{PassRow, StoreError};

impl Tools {
    /// Asks the daemons for a pass of `source` now; the first to look begins it.
    pub fn request_pass(&mut self, source: &str, now: Timestamp) -> Result<(), StoreError> {
        self.backend.request_pass(source, now)
    }

    /// `source`'s passes, or a row with none yet.
    pub fn pass(&self, source: &str) -> Result<PassRow, StoreError> {
        Ok(self
            .backend
            .passes()?
            .into_iter()
            .find(|row| row.source == source)
            .unwrap_or_else(|| PassRow::new(source)))
    }

    /// Every source's passes, by name.
    pub fn passes(&self) -> Result<Vec<PassRow>, StoreError> {
        self.backend.passes()
    }

    /// How far back `source`'s next pass looks at `now` (see [`crate::store::passes::since`]):
    /// its first successful one no further than the newest delivery stored from it.
    pub fn pass_since(
        &self,
        source: &str,
        lookback: std::time::Duration,
        now: Timestamp,
    ) -> Result<Option<Timestamp>, StoreError> {
        let floor = if self.pass(source)?.last_success.is_none() {
            self.backend.newest_seen(source)?.map(crate::store::from_ms)
        } else {
            None
        };
        Ok(crate::store::passes::since(lookback, now, floor))
    }

    /// Which of `ids` are stored as `source`'s delivery ids.
    pub fn seen(&self, source: &str, ids: &[String]) -> Result<Vec<String>, StoreError> {
        self.backend.seen(source, ids)
    }
}
