//! Every signature scheme, accepted and refused, through the running daemon.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

use crate::harness::*;

fn cl_header(value: String) -> [(&'static str, String); 1] {
    [("x-compliancelayer-signature", value)]
}

#[tokio::test]
async fn compliancelayer_accepts_every_documented_form() {
    let dir = tempdir();
    let daemon = Daemon::start(
        dir.path(),
        &config(dir.path(), NO_LIMITS, &standard_rest(dir.path())),
    );
    let t = now().to_string();
    type Sign = Box<dyn Fn(&[u8]) -> String>;
    let forms: [(&str, Sign); 4] = [
        // As the sender documents it: bare lowercase hex of the raw body.
        ("bare", Box::new(|b| hmac_hex(CL_SECRET, &[b]))),
        (
            "upper",
            Box::new(|b| hmac_hex(CL_SECRET, &[b]).to_uppercase()),
        ),
        (
            "prefixed",
            Box::new(|b| format!("sha256={}", hmac_hex(CL_SECRET, &[b]))),
        ),
        (
            "timestamped",
            Box::new(move |b| {
                format!("t={t},v1={}", hmac_hex(CL_SECRET, &[t.as_bytes(), b".", b]))
            }),
        ),
    ];
    for (id, sign) in forms {
        let body = scan_body(id);
        let signature = sign(&body);
        let reply = daemon
            .post("/hooks/cl", &body, &cl_header(signature.clone()))
            .await;
        assert_eq!(reply.status, 202, "{signature}: {:?}", reply.json);
        assert_eq!(reply.json["status"], "accepted");
    }
    assert_eq!(daemon.event_count(), 4);
}

on_both_backends!(compliancelayer_refusals_store_nothing);

async fn compliancelayer_refusals_store_nothing() {
    let dir = tempdir();
    let daemon = Daemon::start(
        dir.path(),
        &config(dir.path(), NO_LIMITS, &standard_rest(dir.path())),
    );
    let body = scan_body("refused");
    let good = hmac_hex(CL_SECRET, &[&body]);
    let old_t = (now() - 301).to_string();
    // Past the 300 s tolerance by more than a slow run takes to reach the case.
    let future_t = (now() + 360).to_string();
    // (what, body, signature header, error code, words in the message)
    type Case<'a> = (&'a str, Vec<u8>, Option<String>, &'a str, &'a str);
    let cases: Vec<Case> = vec![
        (
            "wrong secret",
            body.clone(),
            Some(hmac_hex("whsec_wrong", &[&body])),
            "invalid_signature",
            "does not match",
        ),
        (
            "tampered body",
            body[..body.len() - 1]
                .iter()
                .chain(b" }")
                .copied()
                .collect(),
            Some(good.clone()),
            "invalid_signature",
            "does not match",
        ),
        (
            "missing header",
            body.clone(),
            None,
            "missing_signature",
            "x-compliancelayer-signature",
        ),
        (
            "not hex",
            body.clone(),
            Some("sha256=xyz".into()),
            "invalid_signature",
            "malformed",
        ),
        (
            "truncated hex",
            body.clone(),
            Some(good[..40].to_owned()),
            "invalid_signature",
            "malformed",
        ),
        (
            "expired timestamp",
            body.clone(),
            Some(format!(
                "t={old_t},v1={}",
                hmac_hex(CL_SECRET, &[old_t.as_bytes(), b".", &body])
            )),
            "timestamp_out_of_tolerance",
            "old",
        ),
        (
            "future timestamp",
            body.clone(),
            Some(format!(
                "t={future_t},v1={}",
                hmac_hex(CL_SECRET, &[future_t.as_bytes(), b".", &body])
            )),
            "timestamp_out_of_tolerance",
            "future",
        ),
        (
            "timestamp not covered",
            body.clone(),
            Some(format!("t={},v1={good}", now())),
            "invalid_signature",
            "does not match",
        ),
    ];
    for (what, body, signature, code, message) in cases {
        let headers: Vec<_> = signature.map(cl_header).into_iter().flatten().collect();
        let reply = daemon.post("/hooks/cl", &body, &headers).await;
        assert_eq!(reply.status, 401, "{what}: {:?}", reply.json);
        assert_eq!(reply.error(), code, "{what}");
        assert!(
            reply.message().contains(message),
            "{what}: {}",
            reply.message()
        );
    }
    assert_eq!(daemon.event_count(), 0);
    assert_eq!(daemon.count("dedupe"), 0);
    // The refusals are logged with their reason, and no secret appears in the log.
    let log = wait_log(&daemon, "delivery refused").await;
    assert!(!log.contains(CL_SECRET) && !log.contains(&good), "{log}");
}

#[tokio::test]
async fn require_timestamp_base64_secret_and_max_event_age() {
    let dir = tempdir();
    let key = b"0123456789abcdef0123456789abcdef";
    let secret = format!("whsec_{}", BASE64.encode(key));
    let rest = format!(
        r#"
[sources.strict]
secret_env = "HOOKROUTE_TEST_STRICT_SECRET"
secret_encoding = "base64"
require_timestamp = true

[sources.aged]
secret_file = "{}"
max_event_age = "1h"
"#,
        dir.path().join("aged.secret").display()
    );
    std::fs::write(dir.path().join("aged.secret"), format!("{CL_SECRET}\n")).unwrap();
    let config_path = write_config(dir.path(), &config(dir.path(), NO_LIMITS, &rest));
    let daemon = Daemon::start_with(
        dir.path(),
        &config_path,
        &[("HOOKROUTE_TEST_STRICT_SECRET", &secret)],
    );

    // The key is the base64-decoded part after whsec_, and the bare form is refused.
    let body = scan_body("strict");
    let t = now().to_string();
    let signature = format!(
        "t={t},v1={}",
        hex::encode(hmac_raw(key, &[t.as_bytes(), b".", &body]))
    );
    assert_eq!(
        daemon
            .post("/hooks/strict", &body, &cl_header(signature))
            .await
            .status,
        202
    );
    let bare = hex::encode(hmac_raw(key, &[&body]));
    let reply = daemon.post("/hooks/strict", &body, &cl_header(bare)).await;
    assert_eq!((reply.status, reply.error()), (401, "invalid_signature"));
    assert!(
        reply.message().contains("requires a timestamped signature"),
        "{}",
        reply.message()
    );

    // The secret file's trailing newline is not part of the secret; old bodies are replays.
    let fresh = scan_body("fresh");
    assert_eq!(
        daemon
            .post(
                "/hooks/aged",
                &fresh,
                &cl_header(hmac_hex(CL_SECRET, &[&fresh]))
            )
            .await
            .status,
        202
    );
    let old = sample("compliancelayer-scan.completed.json");
    let reply = daemon
        .post(
            "/hooks/aged",
            &old,
            &cl_header(hmac_hex(CL_SECRET, &[&old])),
        )
        .await;
    assert_eq!((reply.status, reply.error()), (401, "event_too_old"));
    let undated = br#"{"id": "undated", "type": "scan.completed"}"#;
    let reply = daemon
        .post(
            "/hooks/aged",
            undated,
            &cl_header(hmac_hex(CL_SECRET, &[undated])),
        )
        .await;
    assert_eq!((reply.status, reply.error()), (401, "event_too_old"));
    assert_eq!(daemon.event_count(), 2);
}

#[tokio::test]
async fn standard_webhooks_interoperates_with_the_official_library() {
    let dir = tempdir();
    let secret = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
    let rest = format!("[sources.sw]\nscheme = \"standard-webhooks\"\nsecret = \"{secret}\"\n");
    let daemon = Daemon::start(dir.path(), &config(dir.path(), NO_LIMITS, &rest));
    let official = standardwebhooks::Webhook::new(secret).unwrap();
    let send = |id: &'static str, ts: i64, body: Vec<u8>, signature: Option<String>| {
        let signature = signature.unwrap_or_else(|| official.sign(id, ts, &body).unwrap());
        let headers = [
            ("webhook-id", id.to_owned()),
            ("webhook-timestamp", ts.to_string()),
            ("webhook-signature", signature),
        ];
        let daemon = &daemon;
        async move { daemon.post("/hooks/sw", &body, &headers).await }
    };

    let body = br#"{"type":"policy.published","data":{"policy_id":"p1"}}"#.to_vec();
    let reply = send("msg_1", now(), body.clone(), None).await;
    assert_eq!(reply.status, 202, "{:?}", reply.json);
    assert_eq!(reply.json["delivery_id"], "msg_1");
    // webhook-id is signed, so it is the dedupe key: a re-signed retry is a duplicate.
    assert_eq!(
        send("msg_1", now() - 5, body.clone(), None).await.status,
        200
    );
    // The published vector's exact headers: valid signature, but far outside the tolerance.
    let vector = br#"{"email":"test@example.com","username":"test_user"}"#.to_vec();
    let reply = send(
        "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
        1649367553,
        vector,
        Some("v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=".into()),
    )
    .await;
    assert_eq!(
        (reply.status, reply.error()),
        (401, "timestamp_out_of_tolerance")
    );
    // Wrong signature, and the signature of a different id.
    let wrong = official.sign("msg_other", now(), &body).unwrap();
    assert_eq!(
        send("msg_2", now(), body.clone(), Some(wrong)).await.status,
        401
    );
    assert_eq!(
        send("msg_3", now(), body.clone(), Some("v1,not-base64!".into()))
            .await
            .error(),
        "invalid_signature"
    );
    assert_eq!(daemon.event_count(), 1);

    // And the other way round: what `hookroute send` signs, the official library verifies.
    let body_path = dir.path().join("policy.json");
    std::fs::write(&body_path, &body).unwrap();
    let out = std::process::Command::new(BIN)
        .args(["send", "--source", "sw", "--url"])
        .arg(format!("http://{}/hooks/sw", daemon.addr))
        .arg("--config")
        .arg(&daemon.config_path)
        .arg(&body_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(daemon.event_count(), 2);
}

#[tokio::test]
async fn github_generic_hmac_and_token_schemes() {
    let dir = tempdir();
    let rest = r#"
[sources.gh]
scheme = "github"
secret = "gh-secret"

[sources.generic]
scheme = "hmac-sha256"
header = "X-Signature"
prefix = "v1="
encoding = "base64"
secret = "generic-secret"

[sources.scorecard]
scheme = "token"
header = "Authorization"
prefix = "Bearer "
secret = ["tok-new", "tok-old"]
"#;
    let daemon = Daemon::start(dir.path(), &config(dir.path(), NO_LIMITS, rest));
    type Sign = fn(&[u8]) -> Vec<(&'static str, String)>;
    let cases: [(&str, Sign, u16); 9] = [
        (
            "/hooks/gh",
            |b| {
                vec![(
                    "x-hub-signature-256",
                    format!("sha256={}", hmac_hex("gh-secret", &[b])),
                )]
            },
            202,
        ),
        (
            "/hooks/gh",
            |b| vec![("x-hub-signature-256", hmac_hex("gh-secret", &[b]))],
            401,
        ),
        ("/hooks/gh", |_| vec![], 401),
        (
            "/hooks/generic",
            |b| {
                vec![(
                    "x-signature",
                    format!("v1={}", BASE64.encode(hmac_raw(b"generic-secret", &[b]))),
                )]
            },
            202,
        ),
        (
            "/hooks/generic",
            |b| {
                vec![(
                    "x-signature",
                    BASE64.encode(hmac_raw(b"generic-secret", &[b])),
                )]
            },
            401,
        ),
        (
            "/hooks/generic",
            |b| {
                vec![(
                    "x-signature",
                    format!("v1={}", hmac_hex("generic-secret", &[b])),
                )]
            },
            401,
        ),
        (
            "/hooks/scorecard",
            |_| vec![("authorization", "Bearer tok-old".into())],
            202,
        ),
        (
            "/hooks/scorecard",
            |_| vec![("authorization", "Bearer tok-wrong".into())],
            401,
        ),
        ("/hooks/scorecard", |_| vec![], 401),
    ];
    for (i, (path, sign, expected)) in cases.into_iter().enumerate() {
        // A fresh body per case, so an acceptance is never answered as a duplicate.
        let body = scan_body(&format!("case-{i}"));
        let reply = daemon.post(path, &body, &sign(&body)).await;
        assert_eq!(reply.status, expected, "case {i} {path}: {:?}", reply.json);
    }
    assert_eq!(daemon.event_count(), 3);
}
