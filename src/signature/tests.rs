//! Signature vectors, every scheme's round trip, and property tests on what strangers send.

use super::*;

const TOLERANCE: Duration = Duration::from_secs(300);

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    pairs
        .iter()
        .map(|(k, v)| {
            (
                HeaderName::try_from(*k).unwrap(),
                HeaderValue::try_from(*v).unwrap(),
            )
        })
        .collect()
}

fn standard(secret_b64: &str) -> Verifier {
    let key = BASE64
        .decode(secret_b64.strip_prefix("whsec_").unwrap())
        .unwrap();
    Verifier::new(
        Scheme::StandardWebhooks {
            tolerance: TOLERANCE,
        },
        vec![Key::new(key)],
    )
}

/// The vector published with the official Standard Webhooks libraries.
#[test]
fn standard_webhooks_published_vector() {
    let verifier = standard("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD");
    let body = br#"{"email":"test@example.com","username":"test_user"}"#;
    let h = headers(&[
        (WEBHOOK_ID, "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk"),
        (WEBHOOK_TIMESTAMP, "1649367553"),
        (
            WEBHOOK_SIGNATURE,
            "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=",
        ),
    ]);
    let verified = verifier.verify(&h, body, 1649367553 + 10).unwrap();
    assert_eq!(
        verified.signed_id.as_deref(),
        Some("msg_27UH4WbU6Z5A5EzD8u03UvzRbpk")
    );
    assert_eq!(verified.timestamp, Some(1649367553));
    // Our signer produces the same bytes as the published vector.
    let signed = verifier.sign(body, 1649367553, "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk");
    assert_eq!(
        signed[2].1,
        "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw="
    );
    // Several signatures, the valid one last; an unknown version is skipped.
    let h = headers(&[
        (WEBHOOK_ID, "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk"),
        (WEBHOOK_TIMESTAMP, "1649367553"),
        (
            WEBHOOK_SIGNATURE,
            "v1a,abc v1,Ceqm1o5PuH2mWkDmtdEi3sIGMAbj2AZSsl6GTkA7Dx0= v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=",
        ),
    ]);
    assert!(verifier.verify(&h, body, 1649367553).is_ok());
    // Outside the tolerance either way.
    assert!(matches!(
        verifier.verify(&h, body, 1649367553 + 301),
        Err(SignatureError::Expired { .. })
    ));
    assert!(matches!(
        verifier.verify(&h, body, 1649367553 - 301),
        Err(SignatureError::FromFuture { .. })
    ));
}

#[test]
fn compliancelayer_forms() {
    let secret = "whsec_test_secret";
    let verifier = Verifier::new(
        Scheme::ComplianceLayer {
            tolerance: TOLERANCE,
            require_timestamp: false,
        },
        vec![Key::new(secret.as_bytes().to_vec())],
    );
    let body = br#"{"id":"1","type":"scan.completed"}"#;
    let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    let digest = hex::encode(mac.finalize().into_bytes());
    for value in [
        digest.clone(),
        digest.to_uppercase(),
        format!("sha256={digest}"),
        format!("SHA256={digest}"),
        format!("Sha256={}", digest.to_uppercase()),
    ] {
        let h = headers(&[(COMPLIANCELAYER_SIGNATURE, &value)]);
        assert_eq!(
            verifier.verify(&h, body, 0),
            Ok(Verified::default()),
            "{value}"
        );
    }
    let h = headers(&[(COMPLIANCELAYER_SIGNATURE, "sha256=zz")]);
    assert!(matches!(
        verifier.verify(&h, body, 0),
        Err(SignatureError::Malformed { .. })
    ));
    let tampered = br#"{"id":"1","type":"scan.completed "}"#;
    let h = headers(&[(COMPLIANCELAYER_SIGNATURE, &digest)]);
    assert_eq!(
        verifier.verify(&h, tampered, 0),
        Err(SignatureError::Mismatch)
    );
    assert_eq!(
        verifier.verify(&HeaderMap::new(), body, 0),
        Err(SignatureError::MissingHeader(
            COMPLIANCELAYER_SIGNATURE.into()
        ))
    );
}

#[test]
fn compliancelayer_timestamped() {
    let verifier = Verifier::new(
        Scheme::ComplianceLayer {
            tolerance: TOLERANCE,
            require_timestamp: true,
        },
        vec![Key::new(b"old".to_vec()), Key::new(b"new".to_vec())],
    );
    let body = b"{}";
    let mut mac = HmacSha256::new_from_slice(b"new").unwrap();
    mac.update(b"1000.{}");
    let digest = hex::encode(mac.finalize().into_bytes());
    let value = format!("t=1000,v0=ignored,v1={}, v1={digest}", "0".repeat(64));
    let h = headers(&[(COMPLIANCELAYER_SIGNATURE, &value)]);
    assert_eq!(
        verifier.verify(&h, body, 1100).unwrap().timestamp,
        Some(1000)
    );
    assert!(matches!(
        verifier.verify(&h, body, 1301),
        Err(SignatureError::Expired { age_secs: 301, .. })
    ));
    // The bare form is refused when a timestamp is required.
    let h = headers(&[(COMPLIANCELAYER_SIGNATURE, &digest)]);
    assert_eq!(
        verifier.verify(&h, body, 1000),
        Err(SignatureError::TimestampRequired)
    );
    for bad in ["t=abc,v1=00", "t=1000", "t=1,t=2,v1=00"] {
        let h = headers(&[(COMPLIANCELAYER_SIGNATURE, bad)]);
        assert!(
            matches!(
                verifier.verify(&h, body, 1000),
                Err(SignatureError::Malformed { .. })
            ),
            "{bad}"
        );
    }
}

#[test]
fn token_compares_whole_value() {
    let verifier = Verifier::new(
        Scheme::Token {
            header: HeaderName::from_static("x-token"),
            prefix: "Bearer ".into(),
        },
        vec![Key::new(b"s3cret".to_vec())],
    );
    assert!(
        verifier
            .verify(&headers(&[("x-token", "Bearer s3cret")]), b"", 0)
            .is_ok()
    );
    for bad in ["Bearer s3cre", "Bearer s3cret1", "Bearer  s3cret"] {
        assert_eq!(
            verifier.verify(&headers(&[("x-token", bad)]), b"", 0),
            Err(SignatureError::Mismatch),
            "{bad}"
        );
    }
    assert!(matches!(
        verifier.verify(&headers(&[("x-token", "s3cret")]), b"", 0),
        Err(SignatureError::Malformed { .. })
    ));
}

fn every_scheme() -> [Scheme; 6] {
    [
        Scheme::ComplianceLayer {
            tolerance: TOLERANCE,
            require_timestamp: false,
        },
        Scheme::ComplianceLayer {
            tolerance: TOLERANCE,
            require_timestamp: true,
        },
        Scheme::StandardWebhooks {
            tolerance: TOLERANCE,
        },
        Scheme::GitHub,
        Scheme::HmacSha256 {
            header: HeaderName::from_static("x-sig"),
            prefix: "v=".into(),
            encoding: Encoding::Base64,
        },
        Scheme::Token {
            header: HeaderName::from_static("x-token"),
            prefix: String::new(),
        },
    ]
}

#[test]
fn sign_then_verify_every_scheme() {
    for scheme in every_scheme() {
        let verifier = Verifier::new(scheme.clone(), vec![Key::new(b"k".to_vec())]);
        let h: HeaderMap = verifier.sign(b"{}", 50, "msg_1").into_iter().collect();
        assert!(verifier.verify(&h, b"{}", 60).is_ok(), "{}", scheme.name());
    }
}

#[test]
fn debug_hides_keys() {
    let verifier = Verifier::new(Scheme::GitHub, vec![Key::new(b"topsecret".to_vec())]);
    assert!(!format!("{verifier:?}").contains("topsecret"));
}

mod props {
    use super::*;
    use proptest::prelude::*;

    /// Header values as a stranger may send them: any bytes a header can carry.
    fn header_value() -> impl Strategy<Value = HeaderValue> {
        prop_oneof![
            "[ -~]{0,80}".prop_map(|s| HeaderValue::from_str(&s).unwrap()),
            "(t=[0-9]{0,12},)?(v1=[0-9a-fA-F]{0,70},?){0,3}"
                .prop_map(|s| HeaderValue::from_str(&s).unwrap()),
            "(v1,[A-Za-z0-9+/=]{0,50} ?){0,3}".prop_map(|s| HeaderValue::from_str(&s).unwrap()),
            prop::collection::vec(any::<u8>(), 0..80)
                .prop_filter_map("a header value", |b| HeaderValue::from_bytes(&b).ok()),
        ]
    }

    proptest! {
        #[test]
        fn no_header_value_panics_and_none_forges(
            value in header_value(),
            body in prop::collection::vec(any::<u8>(), 0..64),
            now in any::<i64>(),
        ) {
            for scheme in every_scheme() {
                let verifier = Verifier::new(scheme.clone(), vec![Key::new(b"k".to_vec())]);
                let mut headers = HeaderMap::new();
                for name in [COMPLIANCELAYER_SIGNATURE, WEBHOOK_SIGNATURE, WEBHOOK_TIMESTAMP,
                             WEBHOOK_ID, GITHUB_SIGNATURE, "x-sig", "x-token"] {
                    headers.insert(HeaderName::from_static(name), value.clone());
                }
                // Without the key, a random value verifies only by a 2^-256 chance (or,
                // for the token scheme, by being the token).
                let forged = verifier.verify(&headers, &body, now).is_ok();
                prop_assert!(!forged || value.as_bytes().ends_with(b"k"), "{}", scheme.name());
            }
        }

        #[test]
        fn what_is_signed_verifies_and_any_change_does_not(
            body in prop::collection::vec(any::<u8>(), 0..256),
            flip in any::<prop::sample::Index>(),
            id in "[!-~]{1,40}",
            now in 0i64..4_000_000_000,
            upper in any::<bool>(),
        ) {
            for scheme in every_scheme() {
                let verifier = Verifier::new(scheme.clone(), vec![Key::new(b"k".to_vec())]);
                let mut headers: HeaderMap = verifier.sign(&body, now, &id).into_iter().collect();
                // The bare form's prefix and digits, in any case.
                let bare = headers
                    .get(COMPLIANCELAYER_SIGNATURE)
                    .filter(|v| !v.as_bytes().starts_with(b"t="));
                if upper && let Some(v) = bare {
                    let loud = format!("SHA256={}", v.to_str().unwrap().to_uppercase());
                    headers.insert(COMPLIANCELAYER_SIGNATURE, HeaderValue::from_str(&loud).unwrap());
                }
                prop_assert!(verifier.verify(&headers, &body, now).is_ok(), "{}", scheme.name());
                if !body.is_empty() && !matches!(scheme, Scheme::Token { .. }) {
                    let mut changed = body.clone();
                    changed[flip.index(body.len())] ^= 1;
                    prop_assert!(verifier.verify(&headers, &changed, now).is_err());
                }
            }
        }
    }
}

/// Killed mutants (cargo mutants, #23): the names `check-config` prints, a key's `Debug`, and
/// what a verifier tells the redactor and the summary about its keys.
#[test]
fn names_debug_and_keys_say_what_they_should() {
    let names: Vec<&str> = [
        Scheme::ComplianceLayer {
            tolerance: TOLERANCE,
            require_timestamp: false,
        },
        Scheme::GitHub,
    ]
    .iter()
    .map(Scheme::name)
    .collect();
    assert_eq!(names, ["compliancelayer", "github"]);
    assert_eq!(
        standard("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
            .scheme()
            .name(),
        "standard-webhooks"
    );
    let key = Key::new(b"whsec_secret".to_vec());
    assert_eq!(format!("{key:?}"), "Key(***)");
    let verifier = Verifier::new(
        Scheme::GitHub,
        vec![
            key,
            Key::new(vec![0xff, 0xfe]),
            Key::new(b"second".to_vec()),
        ],
    );
    assert_eq!(verifier.key_count(), 3);
    assert_eq!(
        verifier.key_texts().collect::<Vec<_>>(),
        ["whsec_secret", "second"],
        "the keys that are text, as given"
    );
}

/// Killed mutants (cargo mutants, #23): a timestamp exactly at the tolerance passes either
/// way and says how far off it is past it; a digest of the wrong length is malformed, not
/// merely wrong; a second `t=` is refused.
#[test]
fn tolerance_edges_digest_lengths_and_a_repeated_timestamp() {
    let tolerance = Duration::from_secs(300);
    assert!(check_tolerance(1000, 1300, tolerance).is_ok());
    assert!(check_tolerance(1300, 1000, tolerance).is_ok());
    assert!(matches!(
        check_tolerance(1000, 1301, tolerance),
        Err(SignatureError::Expired { age_secs: 301, .. })
    ));
    assert!(matches!(
        check_tolerance(1301, 1000, tolerance),
        Err(SignatureError::FromFuture {
            ahead_secs: 301,
            ..
        })
    ));
    assert!(matches!(
        decode_hex("h", "abcd"),
        Err(SignatureError::Malformed { .. })
    ));
    assert!(decode_hex("h", &"ab".repeat(32)).is_ok());
    assert!(matches!(
        decode_base64("h", "q83v"),
        Err(SignatureError::Malformed { .. })
    ));
    let verifier = Verifier::new(
        Scheme::ComplianceLayer {
            tolerance,
            require_timestamp: false,
        },
        vec![Key::new(b"secret".to_vec())],
    );
    let twice = headers(&[(
        COMPLIANCELAYER_SIGNATURE,
        &format!("t=100,t=200,v1={}", "ab".repeat(32)),
    )]);
    assert!(matches!(
        verifier.verify(&twice, b"{}", 100),
        Err(SignatureError::Malformed {
            reason: "t= appears twice",
            ..
        })
    ));
}
