//! `[storage]`: SQLite at a path, or PostgreSQL at a URL that never holds the password.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::Problems;
use super::raw::{self, RawStorage};
use crate::secret::SecretSource;

#[derive(Debug, Clone, PartialEq)]
pub struct StorageConfig {
    pub backend: Backend,
    pub dedupe_retention: Duration,
    /// Finished events (and their jobs and attempts) are deleted after this long.
    pub event_retention: Duration,
    pub busy_timeout: Duration,
    pub max_batch: usize,
}

/// Which database holds the events, jobs and delivery ids.
#[derive(Debug, Clone, PartialEq)]
pub enum Backend {
    /// One daemon per file.
    Sqlite(PathBuf),
    /// Any number of daemons on one database.
    Postgres(PostgresConfig),
}

#[derive(Debug, Clone, PartialEq)]
pub struct PostgresConfig {
    /// `postgres://user@host/db?sslmode=…`, without a password (so it can be shown).
    pub url: String,
    /// Read when the database is opened, by the daemon and the tools alike.
    pub password: Option<SecretSource>,
    pub pool_size: u32,
    /// How long a replica may be silent before the jobs it holds are anyone's.
    pub lease: Duration,
}

impl StorageConfig {
    /// Where the database is, as an operator would recognise it (never with a password).
    pub fn describe(&self) -> String {
        match &self.backend {
            Backend::Sqlite(path) => path.display().to_string(),
            Backend::Postgres(pg) => pg.url.clone(),
        }
    }
}

/// SQLite at `path`, or PostgreSQL at `url`: one of them.
pub(super) fn validate_backend(
    raw: &mut RawStorage,
    base: &Path,
    problems: &mut Problems,
) -> Backend {
    let password = raw.password.take();
    let Some(url) = raw.url.take() else {
        if password.is_some() {
            problems.add(
                "storage.password",
                "only PostgreSQL (storage.url) takes a password",
            );
        }
        let path = raw
            .path
            .take()
            .unwrap_or_else(|| raw::DEFAULT_DATABASE.into());
        return Backend::Sqlite(base.join(path));
    };
    if raw.path.is_some() {
        problems.add(
            "storage.url",
            "give path (SQLite) or url (PostgreSQL), not both",
        );
    }
    if let Err(message) = check_postgres_url(&url) {
        problems.add("storage.url", message);
    }
    let mut password = password;
    if let Some(secret) = &mut password {
        if let Err(message) = secret.validate("password") {
            problems.add("storage", message);
        }
        secret.relative_to(base);
    }
    if raw.lease.0 < Duration::from_secs(1) {
        problems.add("storage.lease", "must be at least 1s");
    }
    if raw.pool_size == 0 {
        problems.add("storage.pool_size", "must be at least 1");
    }
    Backend::Postgres(PostgresConfig {
        url,
        password,
        pool_size: raw.pool_size,
        lease: raw.lease.0,
    })
}

/// A `postgres://` URL without a password in it. The messages never repeat the URL.
///
/// # Errors
/// What is wrong with it.
pub(crate) fn check_postgres_url(text: &str) -> Result<(), String> {
    let url = url::Url::parse(text).map_err(|e| format!("not a URL ({e})"))?;
    if !matches!(url.scheme(), "postgres" | "postgresql") {
        return Err(format!(
            "{:?} is not a PostgreSQL URL: give postgres://user@host/database",
            url.scheme()
        ));
    }
    if url.password().is_some() || url.query_pairs().any(|(key, _)| key == "password") {
        return Err(
            "holds a password, which would then appear wherever the URL is shown; give it \
             as storage.password = { file = \"…\" } (or env, or credential) instead"
                .into(),
        );
    }
    text.parse::<sqlx::postgres::PgConnectOptions>()
        .map(drop)
        .map_err(|e| format!("cannot be used: {e}"))
}
