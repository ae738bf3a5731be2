//! Signature schemes: pure functions of (headers, raw body, now). Never performs I/O, never
//! parses JSON, and never logs: a verifier holds key bytes, so its `Debug` prints none of them.
//!
//! Every comparison of secret-derived bytes goes through `subtle` in constant time.
//! Several keys may be live at once (rotation); a delivery passes if any key verifies it.
//!
//! Wire formats:
//! - `compliancelayer`: `X-ComplianceLayer-Signature` holds the hex HMAC-SHA256 of the raw body
//!   (bare, or `sha256=<hex>`, the prefix in either case), or the timestamped form `t=<unix>,v1=<hex>[,v1=<hex>…]` signed over
//!   `<t>.<body>`.
//! - `standard-webhooks`: <https://github.com/standard-webhooks/standard-webhooks/blob/main/spec/standard-webhooks.md>
//! - `github`: `X-Hub-Signature-256: sha256=<hex>` over the raw body.
//! - `hmac-sha256`: a configured header, optional prefix, hex or base64.
//! - `token`: a shared secret in a configured header (for senders that cannot sign).

use std::fmt;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{KeyInit, Mac};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

type HmacSha256 = hmac::Hmac<Sha256>;

pub const COMPLIANCELAYER_SIGNATURE: &str = "x-compliancelayer-signature";
pub const COMPLIANCELAYER_EVENT: &str = "x-compliancelayer-event";
pub const COMPLIANCELAYER_DELIVERY: &str = "x-compliancelayer-delivery";
pub const GITHUB_SIGNATURE: &str = "x-hub-signature-256";
pub const GITHUB_DELIVERY: &str = "x-github-delivery";
pub const WEBHOOK_ID: &str = "webhook-id";
pub const WEBHOOK_TIMESTAMP: &str = "webhook-timestamp";
pub const WEBHOOK_SIGNATURE: &str = "webhook-signature";

/// How a digest is written in a signature header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    Hex,
    Base64,
}

/// A signature scheme with its parameters.
#[derive(Debug, Clone)]
pub enum Scheme {
    ComplianceLayer {
        tolerance: Duration,
        require_timestamp: bool,
    },
    StandardWebhooks {
        tolerance: Duration,
    },
    GitHub,
    HmacSha256 {
        header: HeaderName,
        prefix: String,
        encoding: Encoding,
    },
    Token {
        header: HeaderName,
        prefix: String,
    },
}

impl Scheme {
    /// The scheme's name as written in the configuration.
    pub fn name(&self) -> &'static str {
        match self {
            Self::ComplianceLayer { .. } => "compliancelayer",
            Self::StandardWebhooks { .. } => "standard-webhooks",
            Self::GitHub => "github",
            Self::HmacSha256 { .. } => "hmac-sha256",
            Self::Token { .. } => "token",
        }
    }
}

/// HMAC key bytes (or the token itself). `Debug` never shows them.
#[derive(Clone)]
pub struct Key(Vec<u8>);

impl Key {
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    fn mac(&self) -> HmacSha256 {
        HmacSha256::new_from_slice(&self.0).expect("HMAC accepts keys of any length")
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(***)")
    }
}

/// What a successful verification vouches for beyond the body itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verified {
    /// A delivery id covered by the signature (Standard Webhooks' `webhook-id`).
    pub signed_id: Option<String>,
    /// The signed timestamp, when the scheme carried one (unix seconds).
    pub timestamp: Option<i64>,
}

/// Why a delivery's signature was refused. Every variant answers 401; messages never echo
/// secrets or expected digests.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("missing signature header {0}")]
    MissingHeader(String),
    #[error("malformed {header} header: {reason}")]
    Malformed {
        header: String,
        reason: &'static str,
    },
    #[error("signature does not match")]
    Mismatch,
    #[error("this source requires a timestamped signature (t=<unix seconds>,v1=<hex>)")]
    TimestampRequired,
    #[error("signature timestamp is {age_secs} s old, beyond the {tolerance_secs} s tolerance")]
    Expired { age_secs: i64, tolerance_secs: u64 },
    #[error(
        "signature timestamp is {ahead_secs} s in the future, beyond the {tolerance_secs} s tolerance"
    )]
    FromFuture {
        ahead_secs: i64,
        tolerance_secs: u64,
    },
}

/// A scheme with its live keys.
#[derive(Debug, Clone)]
pub struct Verifier {
    scheme: Scheme,
    keys: Vec<Key>,
}

impl Verifier {
    pub fn new(scheme: Scheme, keys: Vec<Key>) -> Self {
        Self { scheme, keys }
    }

    /// The keys that are text, as the configuration gave them: what a redactor looks for.
    pub fn key_texts(&self) -> impl Iterator<Item = String> + '_ {
        self.keys
            .iter()
            .filter_map(|key| String::from_utf8(key.0.clone()).ok())
    }

    pub fn scheme(&self) -> &Scheme {
        &self.scheme
    }

    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    /// Verifies a delivery on its raw bytes. `now` is unix seconds.
    ///
    /// # Errors
    /// [`SignatureError`] saying which check failed.
    pub fn verify(
        &self,
        headers: &HeaderMap,
        body: &[u8],
        now: i64,
    ) -> Result<Verified, SignatureError> {
        match &self.scheme {
            Scheme::ComplianceLayer {
                tolerance,
                require_timestamp,
            } => {
                let value = header_str(headers, COMPLIANCELAYER_SIGNATURE)?;
                self.verify_compliancelayer(value, body, now, *tolerance, *require_timestamp)
            }
            Scheme::StandardWebhooks { tolerance } => {
                self.verify_standard(headers, body, now, *tolerance)
            }
            Scheme::GitHub => {
                let value = header_str(headers, GITHUB_SIGNATURE)?;
                let hex = strip_sha256(value).ok_or(SignatureError::Malformed {
                    header: GITHUB_SIGNATURE.into(),
                    reason: "expected sha256=<hex>",
                })?;
                let given = decode_hex(GITHUB_SIGNATURE, hex)?;
                self.match_any(&[given], &[body])
                    .map(|()| Verified::default())
            }
            Scheme::HmacSha256 {
                header,
                prefix,
                encoding,
            } => {
                let digest = prefixed_header(headers, header, prefix)?;
                let given = match encoding {
                    Encoding::Hex => decode_hex(header.as_str(), digest)?,
                    Encoding::Base64 => decode_base64(header.as_str(), digest)?,
                };
                self.match_any(&[given], &[body])
                    .map(|()| Verified::default())
            }
            Scheme::Token { header, prefix } => {
                let token = prefixed_header(headers, header, prefix)?;
                // Hashing both sides first keeps the comparison constant-time in the length too.
                let given = Sha256::digest(token.as_bytes());
                let ok = self
                    .keys
                    .iter()
                    .any(|key| bool::from(Sha256::digest(&key.0).ct_eq(&given)));
                if ok {
                    Ok(Verified::default())
                } else {
                    Err(SignatureError::Mismatch)
                }
            }
        }
    }

    fn verify_compliancelayer(
        &self,
        value: &str,
        body: &[u8],
        now: i64,
        tolerance: Duration,
        require_timestamp: bool,
    ) -> Result<Verified, SignatureError> {
        let header = COMPLIANCELAYER_SIGNATURE;
        if value.starts_with("t=") || value.contains(",v1=") {
            let mut timestamp = None;
            let mut given = Vec::new();
            for part in value.split(',') {
                match part.trim().split_once('=') {
                    Some(("t", t)) if timestamp.is_none() => {
                        timestamp =
                            Some(t.parse::<i64>().map_err(|_| SignatureError::Malformed {
                                header: header.into(),
                                reason: "t= is not a unix timestamp",
                            })?);
                    }
                    Some(("t", _)) => {
                        return Err(SignatureError::Malformed {
                            header: header.into(),
                            reason: "t= appears twice",
                        });
                    }
                    Some(("v1", hex)) => given.push(decode_hex(header, hex)?),
                    // Other versions (e.g. Stripe's v0) are ignored, as the format intends.
                    Some(_) => {}
                    None => {
                        return Err(SignatureError::Malformed {
                            header: header.into(),
                            reason: "expected key=value pairs",
                        });
                    }
                }
            }
            let timestamp = timestamp.ok_or(SignatureError::Malformed {
                header: header.into(),
                reason: "no t= timestamp",
            })?;
            if given.is_empty() {
                return Err(SignatureError::Malformed {
                    header: header.into(),
                    reason: "no v1= signature",
                });
            }
            check_tolerance(timestamp, now, tolerance)?;
            let t = timestamp.to_string();
            self.match_any(&given, &[t.as_bytes(), b".", body])?;
            return Ok(Verified {
                signed_id: None,
                timestamp: Some(timestamp),
            });
        }
        if require_timestamp {
            return Err(SignatureError::TimestampRequired);
        }
        let hex = strip_sha256(value).unwrap_or(value);
        let given = decode_hex(header, hex)?;
        self.match_any(&[given], &[body])
            .map(|()| Verified::default())
    }

    fn verify_standard(
        &self,
        headers: &HeaderMap,
        body: &[u8],
        now: i64,
        tolerance: Duration,
    ) -> Result<Verified, SignatureError> {
        let id = header_str(headers, WEBHOOK_ID)?;
        let timestamp_text = header_str(headers, WEBHOOK_TIMESTAMP)?;
        let signatures = header_str(headers, WEBHOOK_SIGNATURE)?;
        if id.is_empty() {
            return Err(SignatureError::Malformed {
                header: WEBHOOK_ID.into(),
                reason: "empty id",
            });
        }
        let timestamp = timestamp_text
            .parse::<i64>()
            .map_err(|_| SignatureError::Malformed {
                header: WEBHOOK_TIMESTAMP.into(),
                reason: "not a unix timestamp",
            })?;
        let mut given = Vec::new();
        for entry in signatures.split(' ').filter(|s| !s.is_empty()) {
            let (version, signature) = entry.split_once(',').ok_or(SignatureError::Malformed {
                header: WEBHOOK_SIGNATURE.into(),
                reason: "expected v1,<base64>",
            })?;
            // Asymmetric `v1a` signatures and future versions are not ours to check.
            if version == "v1" {
                given.push(decode_base64(WEBHOOK_SIGNATURE, signature)?);
            }
        }
        if given.is_empty() {
            return Err(SignatureError::Malformed {
                header: WEBHOOK_SIGNATURE.into(),
                reason: "no v1 signature",
            });
        }
        check_tolerance(timestamp, now, tolerance)?;
        self.match_any(
            &given,
            &[id.as_bytes(), b".", timestamp_text.as_bytes(), b".", body],
        )?;
        Ok(Verified {
            signed_id: Some(id.to_owned()),
            timestamp: Some(timestamp),
        })
    }

    /// Succeeds if any given digest equals the HMAC of `parts` under any key.
    fn match_any(&self, given: &[Vec<u8>], parts: &[&[u8]]) -> Result<(), SignatureError> {
        for key in &self.keys {
            let mut mac = key.mac();
            for part in parts {
                mac.update(part);
            }
            let expected = mac.finalize().into_bytes();
            if given
                .iter()
                .any(|g| bool::from(expected.as_slice().ct_eq(g)))
            {
                return Ok(());
            }
        }
        Err(SignatureError::Mismatch)
    }

    /// Signs `body` as this scheme's sender would, with the first key: what `hookroute send`
    /// and the tests use. `id` is the delivery id for schemes that sign one.
    pub fn sign(&self, body: &[u8], now: i64, id: &str) -> Vec<(HeaderName, HeaderValue)> {
        let key = self
            .keys
            .first()
            .expect("a validated source has at least one key");
        let hmac = |parts: &[&[u8]]| {
            let mut mac = key.mac();
            for part in parts {
                mac.update(part);
            }
            mac.finalize().into_bytes()
        };
        let header = |name: &str, value: String| {
            (
                HeaderName::try_from(name).expect("scheme header names are valid"),
                HeaderValue::try_from(value).expect("signatures are printable ASCII"),
            )
        };
        match &self.scheme {
            Scheme::ComplianceLayer {
                require_timestamp: true,
                ..
            } => {
                let t = now.to_string();
                let digest = hex::encode(hmac(&[t.as_bytes(), b".", body]));
                vec![header(
                    COMPLIANCELAYER_SIGNATURE,
                    format!("t={t},v1={digest}"),
                )]
            }
            Scheme::ComplianceLayer { .. } => {
                vec![header(
                    COMPLIANCELAYER_SIGNATURE,
                    hex::encode(hmac(&[body])),
                )]
            }
            Scheme::StandardWebhooks { .. } => {
                let t = now.to_string();
                let digest = BASE64.encode(hmac(&[id.as_bytes(), b".", t.as_bytes(), b".", body]));
                vec![
                    header(WEBHOOK_ID, id.to_owned()),
                    header(WEBHOOK_TIMESTAMP, t),
                    header(WEBHOOK_SIGNATURE, format!("v1,{digest}")),
                ]
            }
            Scheme::GitHub => vec![header(
                GITHUB_SIGNATURE,
                format!("sha256={}", hex::encode(hmac(&[body]))),
            )],
            Scheme::HmacSha256 {
                header: name,
                prefix,
                encoding,
            } => {
                let digest = hmac(&[body]);
                let digest = match encoding {
                    Encoding::Hex => hex::encode(digest),
                    Encoding::Base64 => BASE64.encode(digest),
                };
                vec![header(name.as_str(), format!("{prefix}{digest}"))]
            }
            Scheme::Token {
                header: name,
                prefix,
            } => {
                let token = String::from_utf8_lossy(&key.0);
                vec![header(name.as_str(), format!("{prefix}{token}"))]
            }
        }
    }
}

/// `value` after a `sha256=` prefix, in any case (`SHA256=` too), if it has one.
fn strip_sha256(value: &str) -> Option<&str> {
    const PREFIX: &str = "sha256=";
    let head = value.get(..PREFIX.len())?;
    head.eq_ignore_ascii_case(PREFIX)
        .then(|| &value[PREFIX.len()..])
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Result<&'a str, SignatureError> {
    let value = headers
        .get(name)
        .ok_or_else(|| SignatureError::MissingHeader(name.to_owned()))?;
    value
        .to_str()
        .map(str::trim)
        .map_err(|_| SignatureError::Malformed {
            header: name.to_owned(),
            reason: "not printable ASCII",
        })
}

/// The header's value after its configured prefix.
fn prefixed_header<'a>(
    headers: &'a HeaderMap,
    header: &HeaderName,
    prefix: &str,
) -> Result<&'a str, SignatureError> {
    header_str(headers, header.as_str())?
        .strip_prefix(prefix)
        .ok_or(SignatureError::Malformed {
            header: header.to_string(),
            reason: "missing the configured prefix",
        })
}

fn decode_hex(header: &str, text: &str) -> Result<Vec<u8>, SignatureError> {
    match hex::decode(text) {
        Ok(bytes) if bytes.len() == 32 => Ok(bytes),
        _ => Err(SignatureError::Malformed {
            header: header.to_owned(),
            reason: "expected 64 hex digits",
        }),
    }
}

fn decode_base64(header: &str, text: &str) -> Result<Vec<u8>, SignatureError> {
    match BASE64.decode(text) {
        Ok(bytes) if bytes.len() == 32 => Ok(bytes),
        _ => Err(SignatureError::Malformed {
            header: header.to_owned(),
            reason: "expected a base64 SHA-256 digest",
        }),
    }
}

fn check_tolerance(timestamp: i64, now: i64, tolerance: Duration) -> Result<(), SignatureError> {
    let tolerance_secs = tolerance.as_secs();
    let limit = i64::try_from(tolerance_secs).unwrap_or(i64::MAX);
    let age = now.saturating_sub(timestamp);
    if age > limit {
        Err(SignatureError::Expired {
            age_secs: age,
            tolerance_secs,
        })
    } else if -age > limit {
        Err(SignatureError::FromFuture {
            ahead_secs: -age,
            tolerance_secs,
        })
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests;
