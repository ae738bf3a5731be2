//! X-Forwarded-For is believed only from trusted proxies, for allowed_ips and rate limits alike.

use crate::harness::*;

fn rest(dir: &std::path::Path) -> String {
    format!(
        "{}\n[sources.locked]\nsecret = \"{CL_SECRET}\"\nallowed_ips = [\"203.0.113.7\"]\n",
        standard_rest(dir)
    )
}

async fn post_from(daemon: &Daemon, path: &str, id: &str, forwarded: Option<&str>) -> Reply {
    let body = scan_body(id);
    let mut headers = vec![("x-compliancelayer-signature", hmac_hex(CL_SECRET, &[&body]))];
    if let Some(forwarded) = forwarded {
        headers.push(("x-forwarded-for", forwarded.to_owned()));
    }
    daemon.post(path, &body, &headers).await
}

#[tokio::test]
async fn forwarded_address_honoured_only_from_a_trusted_peer() {
    let dir = tempdir();
    let trusted = format!("trusted_proxies = [\"127.0.0.1/32\"]\n{NO_LIMITS}");
    let daemon = Daemon::start(dir.path(), &config(dir.path(), &trusted, &rest(dir.path())));
    let cases = [
        (Some("203.0.113.7"), 202),
        // The client-supplied left part is ignored; the proxy-appended right part counts.
        (Some("198.51.100.1, 203.0.113.7"), 202),
        (Some("203.0.113.7, 198.51.100.1"), 403),
        (None, 403),
    ];
    for (i, (forwarded, expected)) in cases.into_iter().enumerate() {
        let reply = post_from(&daemon, "/hooks/locked", &format!("case-{i}"), forwarded).await;
        assert_eq!(reply.status, expected, "{forwarded:?}");
    }
    drop(daemon);

    let dir = tempdir();
    let daemon = Daemon::start(
        dir.path(),
        &config(dir.path(), NO_LIMITS, &rest(dir.path())),
    );
    let reply = post_from(&daemon, "/hooks/locked", "e", Some("203.0.113.7")).await;
    assert_eq!((reply.status, reply.error()), (403, "forbidden"));
    assert!(reply.message().contains("127.0.0.1"), "{}", reply.message());
    assert_eq!(daemon.count("events"), 0);
}

#[tokio::test]
async fn rate_limits_key_on_the_forwarded_client() {
    let dir = tempdir();
    let server = "trusted_proxies = [\"127.0.0.1\"]\nrate_limit = { per_second = 1, burst = 2 }";
    let daemon = Daemon::start(
        dir.path(),
        &config(dir.path(), server, &standard_rest(dir.path())),
    );
    let mut first = Vec::new();
    for i in 0..3 {
        first.push(
            post_from(
                &daemon,
                "/hooks/cl",
                &format!("one-{i}"),
                Some("198.51.100.1"),
            )
            .await
            .status,
        );
    }
    assert_eq!(first, [202, 202, 429]);
    // Another client behind the same proxy has its own budget.
    assert_eq!(
        post_from(&daemon, "/hooks/cl", "two", Some("198.51.100.2"))
            .await
            .status,
        202
    );
}
