//! A job's status, one name per state on both backends.

/// Where a job stands (the life of a job: [`crate::delivery`]). Stored as its name,
/// the same text on both backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// Due (now, or at its hand-over's fallback), or being attempted.
    Pending,
    /// Failed, to be tried again at its next try.
    Failed,
    Succeeded,
    /// Failed for good: waits for an operator.
    Dead,
    /// Set aside by a silence; `replay` delivers it.
    Silenced,
    /// Set aside by its route's mute window; `replay` delivers it.
    Muted,
}

impl JobStatus {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Failed => "failed",
            Self::Succeeded => "succeeded",
            Self::Dead => "dead",
            Self::Silenced => "silenced",
            Self::Muted => "muted",
        }
    }

    pub const ALL: [Self; 6] = [
        Self::Pending,
        Self::Failed,
        Self::Succeeded,
        Self::Dead,
        Self::Silenced,
        Self::Muted,
    ];

    /// A stored status; `None` for text no version of hookroute writes.
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|status| status.as_str() == text)
    }
}

impl std::fmt::Display for JobStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `pad`, not `write_str`: the tools' tables give statuses a width.
        f.pad(self.as_str())
    }
}
