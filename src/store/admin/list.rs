//! `deliveries list` and the status page's deliveries: rows of the newest events that pass a
//! filter, read a batch at a time below a keyset cursor, so a listing costs the same on a
//! long history as on a short one.

use jiff::Timestamp;
use serde::Serialize;

use super::silences::say_why_quiet;
use super::{Indexed, PAGE, Row, RowStatus, StoreError, Tools, unrouted};

/// How many rows a page examines at most for the filters no index serves (route, type): a
/// page of a rare type comes back short, with a cursor to go on, rather than reading the
/// whole history (about 35 µs a row on SQLite: a page stays well under 100 ms). The command
/// line's `list` reads on until it has its rows.
const SCAN_BUDGET: usize = 1_000;

#[derive(Debug, Default)]
pub struct Filter {
    pub status: Option<RowStatus>,
    pub source: Option<String>,
    /// Only jobs of this sink (routing records, which have none, are left out).
    pub sink: Option<String>,
    /// Only rows of this route (jobs and routing records).
    pub route: Option<String>,
    /// Only events whose type this glob matches.
    pub event_type: Option<globset::GlobMatcher>,
    pub since: Option<Timestamp>,
    /// Only events older than this one (the keyset cursor of the next page).
    pub before: Option<i64>,
    pub limit: usize,
}

impl Filter {
    /// Whether `row` passes the filters no index serves.
    fn takes(&self, row: &Row) -> bool {
        self.route
            .as_ref()
            .is_none_or(|route| row.route.as_ref() == Some(route))
            && self
                .event_type
                .as_ref()
                .is_none_or(|glob| glob.is_match(&row.event_type))
    }
}

/// A page of deliveries and the cursor of the next (`Filter::before`).
#[derive(Debug, Clone, Serialize)]
pub struct Listing {
    pub rows: Vec<Row>,
    pub next: Option<i64>,
}

/// One batch of rows in `[floor, below)`, newest first.
struct Batch {
    rows: Vec<Row>,
    /// The cursor below them; `None`: nothing is left.
    next: Option<i64>,
    /// The event the batch may have ended inside, when it holds another too.
    split: Option<i64>,
}

impl Tools {
    /// Deliveries, newest event first: up to `filter.limit` rows.
    ///
    /// # Errors
    /// On a database error (as every method here).
    pub fn list(&self, filter: &Filter) -> Result<Vec<Row>, StoreError> {
        let (mut rows, _) = self.rows(filter, filter.limit, usize::MAX)?;
        rows.truncate(filter.limit);
        rows.iter_mut().for_each(say_why_quiet);
        Ok(rows)
    }

    /// A page of deliveries, newest event first, and where the next one starts: up to
    /// `filter.limit` rows of whole events (a page never splits an event's rows, so the next
    /// page, every event below the last one shown, misses none; an event with more rows than
    /// a page is shown whole, alone), read by keyset as the command line reads (flat cost
    /// however many events are stored).
    ///
    /// # Errors
    /// On a database error.
    pub fn page(&self, filter: &Filter) -> Result<Listing, StoreError> {
        let mut want = filter.limit + 1;
        let (mut rows, mut next) = self.rows(filter, want, SCAN_BUDGET)?;
        if rows.len() > filter.limit {
            let boundary = rows[filter.limit].event_id;
            let whole = rows
                .iter()
                .take_while(|row| row.event_id > boundary)
                .count();
            if whole > 0 {
                rows.truncate(whole);
                next = Some(boundary + 1);
            } else {
                // The first event alone fills the page: read on until the next event shows.
                while rows.len() == want && rows.iter().all(|row| row.event_id == boundary) {
                    want *= 2;
                    (rows, next) = self.rows(filter, want, SCAN_BUDGET)?;
                }
                if rows.iter().any(|row| row.event_id != boundary) {
                    rows.retain(|row| row.event_id == boundary);
                    next = Some(boundary);
                }
            }
        }
        rows.iter_mut().for_each(say_why_quiet);
        Ok(Listing { rows, next })
    }

    /// At least `want` rows the filter takes (or every one there is), by batches below the
    /// filter's cursor, examining about `budget` rows at most; and, when the scan stopped for
    /// its budget, where to go on.
    fn rows(
        &self,
        filter: &Filter,
        want: usize,
        budget: usize,
    ) -> Result<(Vec<Row>, Option<i64>), StoreError> {
        let floor = match filter.since {
            Some(since) => self.first_since(since)?,
            None => 0,
        };
        let mut below = filter.before.unwrap_or(i64::MAX);
        let mut rows = Vec::new();
        let mut examined = 0;
        while rows.len() < want {
            if examined >= budget {
                return Ok((rows, Some(below)));
            }
            let Batch {
                rows: batch,
                next,
                split,
            } = self.batch(filter, (floor, below), want - rows.len())?;
            examined += batch.len().max(1);
            rows.extend(batch.into_iter().filter(|row| filter.takes(row)));
            if rows.len() >= want {
                break;
            }
            // More are wanted: the event the batch ended inside comes whole with the next.
            if let Some(last) = split {
                rows.retain(|row| row.event_id != last);
                below = last + 1;
                continue;
            }
            match next {
                Some(next) => below = next,
                None => break,
            }
        }
        Ok((rows, None))
    }

    /// One batch of rows in `[floor, below)`, newest first; the cursor below them (`None`:
    /// nothing is left); and the event the batch may have ended inside, if it holds another.
    /// No status, or `succeeded` (the normal outcome, so matches come quickly), walks the
    /// events, whole: that is the index seek; the other statuses have an index of their own,
    /// read for no more than the `wanted` rows (a page at most).
    fn batch(
        &self,
        filter: &Filter,
        (floor, below): (i64, i64),
        wanted: usize,
    ) -> Result<Batch, StoreError> {
        let indexed = match filter.status.map(Indexed::of) {
            Some(Some(indexed)) => indexed,
            status => {
                let succeeded = status.is_some();
                let heads =
                    self.backend
                        .events_page(below, floor, PAGE, filter.source.as_deref())?;
                let next = (heads.len() == PAGE).then(|| heads.last().map(|h| h.event_id));
                let mut listed = Vec::new();
                for (head, rows) in heads.iter().zip(self.backend.rows_of(&heads)?) {
                    if rows.is_empty() {
                        if !succeeded && filter.sink.is_none() {
                            listed.push(unrouted(head));
                        }
                        continue;
                    }
                    listed.extend(rows.into_iter().filter(|row| {
                        (!succeeded || row.status == RowStatus::Succeeded)
                            && filter
                                .sink
                                .as_ref()
                                .is_none_or(|sink| row.sink.as_ref() == Some(sink))
                    }));
                }
                return Ok(Batch {
                    rows: listed,
                    next: next.flatten(),
                    split: None,
                });
            }
        };
        let of = (filter.source.as_deref(), filter.sink.as_deref());
        let limit = wanted.clamp(1, PAGE);
        let rows = self
            .backend
            .with_status(indexed, (floor, below), of, limit)?;
        if rows.len() < limit {
            return Ok(Batch {
                rows,
                next: None,
                split: None,
            });
        }
        // A full batch may end inside an event; one that is all one event is gone past.
        let last = rows[rows.len() - 1].event_id;
        let split = (rows[0].event_id != last).then_some(last);
        Ok(Batch {
            rows,
            next: Some(last),
            split,
        })
    }

    /// `--since`: the first event id received at or after `since`, by bisecting ids (events
    /// are numbered in the order they arrive), so it bounds every walk without an index on
    /// time.
    fn first_since(&self, since: Timestamp) -> Result<i64, StoreError> {
        let since = since.as_millisecond();
        let Some(last) = self.backend.last_event_id()? else {
            return Ok(0);
        };
        // The first id whose next event was received since then; past the last if none was.
        let (mut low, mut high) = (0, last + 1);
        while low < high {
            let middle = low + (high - low) / 2;
            let received = self.backend.received_from(middle)?;
            if received.is_some_and(|received| received >= since) {
                high = middle;
            } else {
                low = middle + 1;
            }
        }
        Ok(low)
    }
}
