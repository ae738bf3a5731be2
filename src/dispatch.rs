//! Hands stored events to sinks. The database is the queue: the dispatcher reads events past
//! its persisted cursor in id order, delivers each to every sink, and records the outcomes
//! together with the advanced cursor in one transaction. An event stored before a crash but
//! not yet past the cursor is therefore dispatched after the restart (at least once).

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::sinks::Sink;
use crate::store::{DispatchRecord, Store};

/// Events read per round; their outcomes are recorded in one write.
const BATCH: usize = 256;
/// Pause after a database error before trying again.
const ERROR_PAUSE: Duration = Duration::from_secs(1);

/// A configured sink with its name.
#[derive(Clone)]
pub struct NamedSink {
    pub name: String,
    pub sink: Arc<dyn Sink>,
}

pub struct Dispatcher {
    store: Store,
    sinks: Vec<NamedSink>,
    wake: Arc<Notify>,
}

impl Dispatcher {
    /// `wake` is notified by the ingest path after each commit of a new event.
    pub fn new(store: Store, sinks: Vec<NamedSink>, wake: Arc<Notify>) -> Self {
        Self { store, sinks, wake }
    }

    /// Runs until `stop` is cancelled, finishing the round in progress first.
    pub async fn run(self, stop: CancellationToken) {
        let mut cursor = loop {
            match self.store.dispatch_cursor().await {
                Ok(cursor) => break cursor,
                Err(err) => {
                    tracing::error!(error = %err, "cannot read the dispatch cursor");
                    pause(&stop, ERROR_PAUSE).await;
                    if stop.is_cancelled() {
                        return;
                    }
                }
            }
        };
        while !stop.is_cancelled() {
            let batch = match self.store.events_after(cursor, BATCH).await {
                Ok(batch) => batch,
                Err(err) => {
                    tracing::error!(error = %err, "cannot read undispatched events");
                    pause(&stop, ERROR_PAUSE).await;
                    continue;
                }
            };
            let Some(last) = batch.last().map(|e| e.id) else {
                tokio::select! {
                    () = self.wake.notified() => {}
                    () = stop.cancelled() => {}
                }
                continue;
            };
            let mut records = Vec::with_capacity(batch.len() * self.sinks.len());
            for stored in &batch {
                let outcomes =
                    join_all(self.sinks.iter().map(|s| s.sink.deliver(&stored.event))).await;
                for (sink, outcome) in self.sinks.iter().zip(outcomes) {
                    if let Err(err) = &outcome {
                        tracing::warn!(sink = %sink.name, event_id = stored.id, error = %err, "dispatch failed");
                    }
                    records.push(DispatchRecord {
                        event_id: stored.id,
                        sink: sink.name.clone(),
                        result: outcome.map_err(|e| e.to_string()),
                    });
                }
            }
            match self.store.record_dispatch(last, records).await {
                Ok(()) => cursor = last,
                Err(err) => {
                    // Not advancing the cursor redelivers this round: at least once, never lost.
                    tracing::error!(error = %err, "cannot record dispatch outcomes");
                    pause(&stop, ERROR_PAUSE).await;
                }
            }
        }
    }
}

async fn pause(stop: &CancellationToken, duration: Duration) {
    tokio::select! {
        () = tokio::time::sleep(duration) => {}
        () = stop.cancelled() => {}
    }
}
