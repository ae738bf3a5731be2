//! A duration as people write it in the configuration. A leaf: every module that reads a
//! duration from TOML uses this one type, and none of them needs the configuration for it.

use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Where a listing starts (`--since`, the status page's "since"): a time, or a span back
/// from when it is asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Since {
    Ago(Duration),
    At(jiff::Timestamp),
}

impl Since {
    /// A duration (`"1h"`, `"7d"`), an RFC 3339 time or a date (from its midnight UTC).
    ///
    /// # Errors
    /// Any other text, with what is accepted.
    pub fn parse(text: &str) -> Result<Self, String> {
        if let Ok(span) = humantime::parse_duration(text) {
            return Ok(Self::Ago(span));
        }
        if let Ok(at) = text.parse::<jiff::Timestamp>() {
            return Ok(Self::At(at));
        }
        if let Ok(date) = text.parse::<jiff::civil::Date>()
            && let Ok(at) = date.to_zoned_datetime(jiff::tz::TimeZone::UTC)
        {
            return Ok(Self::At(at.timestamp()));
        }
        Err(format!(
            "{text:?} is not a duration (\"1h\", \"7d\"), a time (\"2026-12-05T14:00:00Z\") \
             or a date (\"2026-12-05\")"
        ))
    }

    /// The time this means, `now` being when it is asked; `None` for a span longer than
    /// there is time before `now`.
    pub fn at(self, now: jiff::Timestamp) -> Option<jiff::Timestamp> {
        match self {
            Self::At(at) => Some(at),
            Self::Ago(span) => jiff::SignedDuration::try_from(span)
                .ok()
                .and_then(|span| now.checked_sub(span).ok()),
        }
    }
}

/// A duration written for humans: `"300s"`, `"15m"`, `"24h"`, `"7d"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_duration(&text).map(HumanDuration).map_err(|err| {
            serde::de::Error::custom(format!(
                "invalid duration {text:?} ({err}); write e.g. \"30s\", \"15m\", \"24h\" or \"7d\""
            ))
        })
    }
}
