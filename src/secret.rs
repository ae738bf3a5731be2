//! Secrets as the configuration names them, and the one decoding of a `whsec_` secret. A leaf:
//! sinks and sources read their secrets through this module, never through the configuration
//! hub, and nothing here ever prints a secret (`Debug` shows `***`, errors name only the key).

use std::fmt;
use std::path::PathBuf;

use base64::Engine as _;

/// A secret a sink needs (a webhook URL, a password, a signing key), given inline, in a file or
/// in an environment variable. Resolved when the sink is built; `Debug` never shows it.
#[derive(Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretSource {
    pub value: Option<String>,
    pub file: Option<PathBuf>,
    pub env: Option<String>,
}

impl fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretSource")
            .field("value", &self.value.as_ref().map(|_| "***"))
            .field("file", &self.file)
            .field("env", &self.env)
            .finish()
    }
}

impl SecretSource {
    /// Checks that exactly one of `value`, `file`, `env` is given.
    ///
    /// # Errors
    /// A message naming `key`.
    pub fn validate(&self, key: &str) -> Result<(), String> {
        let given = [
            self.value.is_some(),
            self.file.is_some(),
            self.env.is_some(),
        ]
        .iter()
        .filter(|g| **g)
        .count();
        match given {
            1 => Ok(()),
            0 => Err(format!("{key}: give one of value, file or env")),
            _ => Err(format!("{key}: give only one of value, file or env")),
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
            std::fs::read_to_string(file)
                .map_err(|err| format!("{key}: cannot read {}: {err}", file.display()))?
                .trim_end_matches(['\r', '\n'])
                .to_owned()
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
