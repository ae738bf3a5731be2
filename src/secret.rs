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

/// The largest secret file read: a key, a URL or a password is far smaller.
const MAX_SECRET_BYTES: u64 = 64 << 10;

/// A secret from a file; the final newline editors and `echo` add is not part of it.
///
/// # Errors
/// The file cannot be read; the message names the file, never its content.
pub fn read_file(path: &Path) -> Result<String, String> {
    Ok(crate::private::read_regular(path, MAX_SECRET_BYTES)
        .map_err(|err| match err.kind() {
            std::io::ErrorKind::NotFound => format!(
                "{} does not exist yet: create it holding the secret, readable by the service \
                 (e.g. `install -m 0640 -g hookroute /dev/null {0}`, then write the secret in it)",
                path.display()
            ),
            _ => format!("cannot read {}: {err}", path.display()),
        })?
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

/// Takes every configured secret out of text a stranger sent back: a receiver's 404 page that
/// quotes the path it was posted to (`Cannot POST /hooks/ingest/TOKEN`), an SMTP relay that
/// echoes the `AUTH PLAIN` line in its refusal. The delivery engine runs every answer and error
/// through one before it is logged or kept.
///
/// Each secret is looked for in the forms it travels in (see [`forms`]); matches are replaced
/// by `***`, the longest first, so a URL goes as a whole rather than piece by piece.
#[derive(Default)]
pub struct Redactor {
    matcher: Option<aho_corasick::AhoCorasick>,
}

impl fmt::Debug for Redactor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Redactor(***)")
    }
}

/// What a redacted secret reads as.
pub const REDACTED: &str = "***";

/// Shortest text taken for a secret on its own: shorter would blank common words.
const SHORTEST: usize = 4;
/// Shortest part of a URL (a path segment) taken for a token, when it has a digit in it.
const SHORTEST_TOKEN: usize = 8;
/// Length from which a URL's path segment is a token even without a digit.
const LONG_TOKEN: usize = 16;

impl Redactor {
    /// A redactor for `secrets`, each in all its [`forms`].
    pub fn new(secrets: impl IntoIterator<Item = String>) -> Self {
        let mut patterns: Vec<String> = secrets.into_iter().flat_map(|s| forms(&s)).collect();
        patterns.sort_unstable();
        patterns.dedup();
        if patterns.is_empty() {
            return Self::default();
        }
        let matcher = aho_corasick::AhoCorasick::builder()
            .match_kind(aho_corasick::MatchKind::LeftmostLongest)
            .build(&patterns)
            .ok();
        Self { matcher }
    }

    /// `text` with every secret's every form replaced by [`REDACTED`].
    pub fn redact<'a>(&self, text: &'a str) -> std::borrow::Cow<'a, str> {
        match &self.matcher {
            Some(matcher) if matcher.is_match(text) => {
                let replace = vec![REDACTED; matcher.patterns_len()];
                std::borrow::Cow::Owned(matcher.replace_all(text, &replace))
            }
            _ => std::borrow::Cow::Borrowed(text),
        }
    }
}

/// The forms `secret` may come back in: as written, percent-encoded and -decoded, in base64
/// (SMTP's `AUTH` lines), and, for a URL, each part that may carry a token: the password, the
/// path and query together and apart, each query value, and each path segment that looks like
/// a token (a digit and 8 characters, or 16). A header value's credentials after its scheme
/// (`Bearer …`) count on their own.
pub fn forms(secret: &str) -> Vec<String> {
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
    use percent_encoding::{NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};

    let mut found = vec![secret.to_owned()];
    if let Some((_, token)) = secret.split_once(' ')
        && !token.contains(' ')
    {
        found.push(token.to_owned());
    }
    if let Ok(url) = url::Url::parse(secret)
        && url.has_host()
    {
        found.extend(url.password().map(str::to_owned));
        let path = url.path();
        if path.len() > 1 {
            found.push(path.to_owned());
        }
        if let Some(query) = url.query() {
            found.push(query.to_owned());
            found.push(format!("{path}?{query}"));
            found.extend(url.query_pairs().map(|(_, value)| value.into_owned()));
        }
        found.extend(
            url.path_segments()
                .into_iter()
                .flatten()
                .filter(|s| {
                    s.len() >= LONG_TOKEN
                        || (s.len() >= SHORTEST_TOKEN && s.bytes().any(|b| b.is_ascii_digit()))
                })
                .map(str::to_owned),
        );
    }
    let mut all = Vec::with_capacity(found.len() * 5);
    for form in found.into_iter().filter(|f| f.len() >= SHORTEST) {
        all.push(utf8_percent_encode(&form, NON_ALPHANUMERIC).to_string());
        if let Ok(decoded) = percent_decode_str(&form).decode_utf8() {
            all.push(decoded.into_owned());
        }
        all.push(STANDARD.encode(&form));
        all.push(URL_SAFE_NO_PAD.encode(&form));
        all.push(form);
    }
    all.retain(|f| f.len() >= SHORTEST);
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forwarding_urls_tokens_are_redacted_wherever_they_appear() {
        let redactor = Redactor::new([
            "https://in.example/hooks/ingest/tok3n5ecret99?api_key=K3Y-v4lue".into(),
        ]);
        for (answer, kept) in [
            ("Cannot POST /hooks/ingest/tok3n5ecret99", "Cannot POST ***"),
            (
                "no route for /hooks/ingest/tok3n5ecret99?api_key=K3Y-v4lue",
                "no route for ***",
            ),
            ("bad key K3Y-v4lue", "bad key ***"),
            ("token tok3n5ecret99 revoked", "token *** revoked"),
            (
                "GET /hooks/ingest/ not allowed",
                "GET /hooks/ingest/ not allowed",
            ),
        ] {
            assert_eq!(redactor.redact(answer), kept, "{answer}");
        }
    }

    #[test]
    fn an_smtp_login_is_redacted_in_base64_too() {
        use base64::Engine as _;
        let plain = base64::engine::general_purpose::STANDARD.encode("\0alerts\0hunter2-pw");
        let redactor = Redactor::new(["hunter2-pw".into(), "\0alerts\0hunter2-pw".into()]);
        let refusal = format!("535 5.7.8 AUTH PLAIN {plain} rejected; password hunter2-pw");
        assert_eq!(
            redactor.redact(&refusal),
            "535 5.7.8 AUTH PLAIN *** rejected; password ***"
        );
        let login = base64::engine::general_purpose::STANDARD.encode("hunter2-pw");
        assert_eq!(redactor.redact(&format!("334 {login}")), "334 ***");
    }

    #[test]
    fn nothing_configured_redacts_nothing() {
        let redactor = Redactor::new(Vec::new());
        assert!(matches!(
            redactor.redact("HTTP 500"),
            std::borrow::Cow::Borrowed(_)
        ));
        let short = Redactor::new(["ab".into()]);
        assert_eq!(short.redact("abab"), "abab");
    }
}
