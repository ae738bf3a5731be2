//! A duration as people write it in the configuration. A leaf: every module that reads a
//! duration from TOML uses this one type, and none of them needs the configuration for it.

use std::time::Duration;

use serde::{Deserialize, Deserializer};

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
