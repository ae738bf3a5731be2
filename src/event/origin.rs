//! Where an event came from: a sender's webhook, a reconcile pass (the event its webhook
//! would have carried, synthesised from the sender's API), or the daemon itself. Conditions
//! read it as `origin`, templates too, and `show` prints it.

use serde_json::Value;

use super::Event;

/// What a synthesised event's body says of where it came from (`"origin": "reconcile"`).
pub const RECONCILE: &str = "reconcile";

impl Event {
    /// `reconcile` for what a pass synthesised, `hookroute` for the daemon's own events,
    /// `webhook` for a sender's delivery.
    pub fn origin(&self) -> &'static str {
        if self.source == crate::notice::SOURCE {
            "hookroute"
        } else if self.payload.value().get("origin").and_then(Value::as_str) == Some(RECONCILE) {
            RECONCILE
        } else {
            "webhook"
        }
    }
}
