//! A source's validation: its path, scheme and headers, and every secret it names, all of them
//! live at once during a rotation.

use std::path::Path;

use super::raw::{self, RawSource, SchemeName, SecretEncoding};
use super::{Problems, RESERVED_PATHS, Secrets, SourceConfig, parse_networks};
use crate::duration::HumanDuration;
use crate::secret;
use crate::signature::{Key, Scheme, Verifier};

/// The secrets `config.example.toml` ships with: public, so a source that still uses one is
/// warned about (`Config::warnings`).
pub const EXAMPLE_SECRETS: &[&str] = &[
    "whsec_example_change_me",
    "example-scorecard-token-change-me",
];

pub(super) fn validate_source(
    name: &str,
    raw: RawSource,
    base: &Path,
    secrets: Secrets<'static>,
    problems: &mut Problems,
) -> Option<SourceConfig> {
    let key = |field: &str| format!("sources.{name}.{field}");
    let start = problems.len();

    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        problems.add(
            format!("sources.{name:?}"),
            "a source name may hold only letters, digits, '-' and '_'",
        );
    }
    let scheme_name = raw.scheme.unwrap_or(SchemeName::Compliancelayer);
    let path = raw.path.clone().unwrap_or_else(|| raw::default_path(name));
    if !path.starts_with('/') {
        problems.add(key("path"), format!("{path:?} must start with '/'"));
    } else if RESERVED_PATHS.contains(&path.as_str()) {
        problems.add(
            key("path"),
            format!("{path:?} is reserved for the daemon's own use"),
        );
    }

    // Keys that only some schemes understand: a stray one is a mistake worth reporting.
    let applies = |field: &str, present: bool, schemes: &[SchemeName], problems: &mut Problems| {
        if present && !schemes.contains(&scheme_name) {
            problems.add(
                key(field),
                format!("does not apply to scheme \"{scheme_name}\""),
            );
        }
    };
    use SchemeName::*;
    applies(
        "tolerance",
        raw.tolerance.is_some(),
        &[Compliancelayer, StandardWebhooks],
        problems,
    );
    applies(
        "require_timestamp",
        raw.require_timestamp.is_some(),
        &[Compliancelayer],
        problems,
    );
    applies(
        "header",
        raw.header.is_some(),
        &[HmacSha256, Token],
        problems,
    );
    applies(
        "prefix",
        raw.prefix.is_some(),
        &[HmacSha256, Token],
        problems,
    );
    applies("encoding", raw.encoding.is_some(), &[HmacSha256], problems);
    applies(
        "secret_encoding",
        raw.secret_encoding.is_some(),
        &[Compliancelayer, Github, HmacSha256, StandardWebhooks],
        problems,
    );
    if scheme_name == StandardWebhooks && raw.secret_encoding == Some(SecretEncoding::Utf8) {
        problems.add(
            key("secret_encoding"),
            "standard-webhooks secrets are always base64 (whsec_<base64>)",
        );
    }

    let secret_encoding = match scheme_name {
        StandardWebhooks => SecretEncoding::Base64,
        _ => raw.secret_encoding.unwrap_or(SecretEncoding::Utf8),
    };
    let keys = match secrets {
        Secrets::Read => resolve_secrets(
            name,
            &raw,
            base,
            secret_encoding,
            scheme_name == Token,
            problems,
        ),
        // The tools never verify a signature; the key is never used.
        Secrets::Skip | Secrets::Source(_) => vec![Key::new(b"not read".to_vec())],
    };
    let tolerance = raw
        .tolerance
        .map_or(raw::DEFAULT_TOLERANCE, |HumanDuration(d)| d);
    let header = |default: Option<&str>, problems: &mut Problems| {
        let text = raw.header.as_deref().or(default);
        match text.map(axum::http::HeaderName::try_from) {
            Some(Ok(header)) => Some(header),
            Some(Err(_)) => {
                problems.add(
                    key("header"),
                    format!("{:?} is not a valid header name", text.unwrap_or_default()),
                );
                None
            }
            None => {
                problems.add(
                    key("header"),
                    format!("scheme \"{scheme_name}\" needs the header that carries the signature"),
                );
                None
            }
        }
    };
    let scheme = match scheme_name {
        Compliancelayer => Some(Scheme::ComplianceLayer {
            tolerance,
            require_timestamp: raw.require_timestamp.unwrap_or(false),
        }),
        StandardWebhooks => Some(Scheme::StandardWebhooks { tolerance }),
        Github => Some(Scheme::GitHub),
        HmacSha256 => header(None, problems).map(|header| Scheme::HmacSha256 {
            header,
            prefix: raw.prefix.clone().unwrap_or_default(),
            encoding: raw.encoding.unwrap_or(crate::signature::Encoding::Hex),
        }),
        Token => header(Some(raw::DEFAULT_TOKEN_HEADER), problems).map(|header| Scheme::Token {
            header,
            prefix: raw.prefix.clone().unwrap_or_default(),
        }),
    };
    let allowed_ips = parse_networks(&key("allowed_ips"), &raw.allowed_ips, problems);
    applies("api", raw.api.is_some(), &[Compliancelayer], problems);
    let api = super::api::validate(name, raw.api, base, secrets == Secrets::Read, problems);

    if problems.len() > start {
        return None;
    }
    Some(SourceConfig {
        name: name.to_owned(),
        path,
        verifier: Verifier::new(scheme?, keys),
        allowed_ips,
        max_event_age: raw.max_event_age.map(|HumanDuration(d)| d),
        api,
    })
}

/// Gathers the source's secrets from `secret`, `secret_file`, `secret_credential` and
/// `secret_env`, all of them: during a rotation the old and the new secret are both live.
fn resolve_secrets(
    name: &str,
    raw: &RawSource,
    base: &Path,
    encoding: SecretEncoding,
    in_header: bool,
    problems: &mut Problems,
) -> Vec<Key> {
    let mut found: Vec<(String, String)> = Vec::new();
    fn list(field: &Option<raw::OneOrMany>) -> &[String] {
        field.as_ref().map_or(&[], raw::OneOrMany::as_slice)
    }
    for (i, secret) in list(&raw.secret).iter().enumerate() {
        found.push((format!("sources.{name}.secret[{i}]"), secret.clone()));
    }
    // Files, named by path (`%d/` for systemd's credentials directory) or as credentials.
    let files = list(&raw.secret_file).iter().enumerate().map(|(i, file)| {
        let path = secret::expand(Path::new(file)).map(|path| base.join(path));
        (format!("sources.{name}.secret_file[{i}]"), path)
    });
    let credentials = list(&raw.secret_credential)
        .iter()
        .enumerate()
        .map(|(i, credential)| {
            let path = secret::credential(credential);
            (format!("sources.{name}.secret_credential[{i}]"), path)
        });
    for (key, path) in credentials.chain(files) {
        match path.and_then(|path| secret::read_file(&path)) {
            Ok(text) => found.push((key, text)),
            Err(err) => problems.add(key, err),
        }
    }
    for (i, var) in list(&raw.secret_env).iter().enumerate() {
        let key = format!("sources.{name}.secret_env[{i}]");
        match std::env::var(var) {
            Ok(value) => found.push((key, value)),
            Err(_) => problems.add(
                key,
                format!("environment variable {var:?} is not set or not UTF-8"),
            ),
        }
    }
    // Only when none is named: a named one that cannot be read is a problem of its own.
    let named = [
        &raw.secret,
        &raw.secret_file,
        &raw.secret_credential,
        &raw.secret_env,
    ]
    .iter()
    .any(|field| !list(field).is_empty());
    if !named {
        problems.add(
            format!("sources.{name}"),
            "no secret: set `secret`, `secret_file`, `secret_env` or `secret_credential`",
        );
    }
    found
        .into_iter()
        .filter_map(|(key, secret)| match decode_secret(&secret, encoding) {
            // A token is sent as it is, in a header: only visible ASCII can travel there.
            Ok(_) if in_header && !secret.bytes().all(|b| b.is_ascii_graphic()) => {
                problems.add(key, "a token travels in a header: use visible ASCII only, no spaces or control characters");
                None
            }
            Ok(bytes) => Some(Key::new(bytes)),
            Err(message) => {
                problems.add(key, message);
                None
            }
        })
        .collect()
}

/// Turns a secret string into HMAC key bytes. Messages never quote the secret.
fn decode_secret(secret: &str, encoding: SecretEncoding) -> Result<Vec<u8>, &'static str> {
    if secret.is_empty() {
        return Err("the secret is empty");
    }
    match encoding {
        SecretEncoding::Utf8 => Ok(secret.as_bytes().to_vec()),
        SecretEncoding::Base64 => crate::secret::decode_whsec(secret),
    }
}
