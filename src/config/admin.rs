//! `[admin]`: the status page's own listener and who may use it (see [`crate::web`]). Off
//! unless `listen` is set: the page is never on the public webhook listener, so a reverse
//! proxy exposes only `/hooks/*` unless it is told otherwise.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::Problems;
use crate::duration::HumanDuration;
use crate::secret::SecretSource;

/// The shortest token accepted: a token is a password someone may type.
const MIN_TOKEN: usize = 16;

/// `[admin]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: String,
    /// How long a login lasts.
    #[serde(default = "default_ttl")]
    pub session_ttl: HumanDuration,
    #[serde(default)]
    pub users: BTreeMap<String, RawUser>,
}

fn default_ttl() -> HumanDuration {
    HumanDuration(Duration::from_secs(8 * 3600))
}

/// `[admin.users.<name>]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUser {
    pub token: SecretSource,
    pub role: Role,
}

/// What a user may do: look, or also act (retry, replay, silence, pause).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Viewer,
    Operator,
}

impl Role {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Viewer => "viewer",
            Self::Operator => "operator",
        }
    }
}

/// `[admin]`, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    pub session_ttl: Duration,
    pub users: Vec<AdminUser>,
}

/// A user: their token kept only as its SHA-256, so the process never holds it in clear.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminUser {
    pub name: String,
    pub role: Role,
    /// `None` when the configuration was read without its secrets (the tools).
    pub token_sha256: Option<[u8; 32]>,
}

impl std::fmt::Debug for AdminUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminUser")
            .field("name", &self.name)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

/// Checks `[admin]`; reads the tokens when `read`.
pub(super) fn validate(
    raw: Option<RawAdmin>,
    base: &Path,
    read: bool,
    public: Option<SocketAddr>,
    problems: &mut Problems,
) -> Option<AdminConfig> {
    let raw = raw?;
    let listen = match raw.listen.parse::<SocketAddr>() {
        Ok(listen) => listen,
        Err(_) => {
            let message = format!("{:?} is not an address like \"127.0.0.1:8081\"", raw.listen);
            problems.add("admin.listen", message);
            return None;
        }
    };
    if public.is_some_and(|public| public == listen && listen.port() != 0) {
        problems.add(
            "admin.listen",
            "must differ from server.listen: the page never shares the public webhook listener",
        );
    }
    if raw.users.is_empty() {
        problems.add(
            "admin.users",
            "add at least one user ([admin.users.<name>] with token and role): nobody could log in",
        );
    }
    let mut users = Vec::new();
    for (name, mut user) in raw.users {
        let key = format!("admin.users.{name}.token");
        if let Err(problem) = user.token.validate(&key) {
            problems.add(&key, problem.trim_start_matches(&format!("{key}: ")));
            continue;
        }
        user.token.relative_to(base);
        let token_sha256 = if read {
            match user.token.resolve(&key) {
                Ok(token) if token.trim().len() < MIN_TOKEN => {
                    problems.add(
                        &key,
                        format!("at least {MIN_TOKEN} characters: a token is a password"),
                    );
                    None
                }
                Ok(token) => Some(Sha256::digest(token.trim().as_bytes()).into()),
                Err(problem) => {
                    problems.add(&key, problem.trim_start_matches(&format!("{key}: ")));
                    None
                }
            }
        } else {
            None
        };
        users.push(AdminUser {
            name,
            role: user.role,
            token_sha256,
        });
    }
    Some(AdminConfig {
        listen,
        session_ttl: raw.session_ttl.0,
        users,
    })
}
