//! Secrets as the configuration names them, and the one decoding of a `whsec_` secret. A leaf:
//! sinks and sources read their secrets through this module, never through the configuration
//! hub, and nothing here ever prints a secret (`Debug` shows `***`, errors name only the key).

use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine as _;

/// A secret a sink needs (a webhook URL, a password, a signing key), given inline, in a file or
/// in an environment variable. Resolved when the sink is built; `Debug` never shows it.
#[derive(Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretSource {
    pub value: Option<String>,
    /// A file; `%d/` at its start is systemd's credentials directory.
    pub file: Option<PathBuf>,
    pub env: Option<String>,
    /// A systemd credential (`LoadCredential=name:/path` in the unit): the file of that name
    /// in `$CREDENTIALS_DIRECTORY`.
    pub credential: Option<String>,
}

impl fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretSource")
            .field("value", &self.value.as_ref().map(|_| "***"))
            .field("file", &self.file)
            .field("env", &self.env)
            .field("credential", &self.credential)
            .finish()
    }
}

impl SecretSource {
    /// Makes a relative `file` relative to `base` (a `%d/` path is the credentials directory's).
    pub fn relative_to(&mut self, base: &Path) {
        if let Some(file) = &mut self.file
            && !file.starts_with("%d")
        {
            *file = base.join(&*file);
        }
    }

    /// Checks that exactly one of `value`, `file`, `env` is given.
    ///
    /// # Errors
    /// A message naming `key`.
    pub fn validate(&self, key: &str) -> Result<(), String> {
        let given = [
            self.value.is_some(),
            self.file.is_some(),
            self.env.is_some(),
            self.credential.is_some(),
        ]
        .iter()
        .filter(|g| **g)
        .count();
        match given {
            1 => Ok(()),
            0 => Err(format!("{key}: give one of value, file, env or credential")),
            _ => Err(format!(
                "{key}: give only one of value, file, env or credential"
            )),
        }
    }

    /// Reads the secret. A file's final newline is not part of it.
    ///
    /// # Errors
    /// A message naming `key` (never the secret).
    pub fn resolve(&self, key: &str) -> Result<String, String> {
        let secret = if let Some(value) = &self.value {
            value.clone()
        } else if let Some(file) = &self.file {
            expand(file)
                .and_then(|path| read_file(&path))
                .map_err(|e| format!("{key}: {e}"))?
        } else if let Some(name) = &self.credential {
            credential(name)
                .and_then(|path| read_file(&path))
                .map_err(|e| format!("{key}: {e}"))?
        } else if let Some(var) = &self.env {
            std::env::var(var)
                .map_err(|_| format!("{key}: environment variable {var:?} is not set"))?
        } else {
            return Err(format!("{key}: no secret given"));
        };
        if secret.is_empty() {
            return Err(format!("{key}: the secret is empty"));
        }
        Ok(secret)
    }
}

/// `path` with a leading `%d/` (systemd's specifier) made `$CREDENTIALS_DIRECTORY/`.
///
/// # Errors
/// The path starts with `%d/` and no credentials directory is set.
pub fn expand(path: &Path) -> Result<PathBuf, String> {
    match path.strip_prefix("%d") {
        Ok(rest) => Ok(credentials_dir()?.join(rest)),
        Err(_) => Ok(path.to_path_buf()),
    }
}

/// The file of systemd credential `name`.
///
/// # Errors
/// No credentials directory is set, or `name` is not a plain file name.
pub fn credential(name: &str) -> Result<PathBuf, String> {
    if name.is_empty() || name.contains('/') || name == ".." {
        return Err(format!("credential {name:?}: not a credential name"));
    }
    Ok(credentials_dir()?.join(name))
}

fn credentials_dir() -> Result<PathBuf, String> {
    std::env::var_os("CREDENTIALS_DIRECTORY")
        .map(PathBuf::from)
        .ok_or_else(|| {
            "CREDENTIALS_DIRECTORY is not set: systemd sets it for a unit with LoadCredential="
                .to_owned()
        })
}

/// A secret from a file; the final newline editors and `echo` add is not part of it.
///
/// # Errors
/// The file cannot be read; the message names the file, never its content.
pub fn read_file(path: &Path) -> Result<String, String> {
    Ok(std::fs::read_to_string(path)
        .map_err(|err| format!("cannot read {}: {err}", path.display()))?
        .trim_end_matches(['\r', '\n'])
        .to_owned())
}

/// The HMAC key of a Standard Webhooks secret: the base64 after its `whsec_` prefix (the prefix
/// is optional). The message never quotes the secret.
///
/// # Errors
/// The text is not base64 or decodes to nothing.
pub fn decode_whsec(secret: &str) -> Result<Vec<u8>, &'static str> {
    let encoded = secret.strip_prefix("whsec_").unwrap_or(secret);
    match base64::engine::general_purpose::STANDARD.decode(encoded) {
        Ok(bytes) if !bytes.is_empty() => Ok(bytes),
        _ => Err("the secret is not valid base64 after its `whsec_` prefix"),
    }
}
