//! The status page (#28) over real HTTP: its own listener, the login, the session cookie, the
//! CSRF token, the headers, and what the overview shows from the database. The daemon runs
//! in-process; the silence comes from the real command line.

use std::path::Path;
use std::time::Duration;

use reqwest::header::{HeaderMap, LOCATION, SET_COOKIE};

use crate::harness::*;

pub const ALICE: &str = "alice-viewer-token-0123456789";
pub const BOB: &str = "bob-operator-token-0123456789";

const FORM: &str = "application/x-www-form-urlencoded";

/// A form's body, as a browser encodes it.
fn form(pairs: &[(&str, &str)]) -> String {
    url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish()
}

/// A free loopback port for the admin listener.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// The daemon's configuration with the page on `port`: Alice views, Bob operates.
fn with_page(dir: &Path, port: u16) -> String {
    page_config(dir, port, &standard_rest(dir))
}

/// `rest` (sources, sinks, routes) with the page on `port`: Alice views, Bob operates.
pub fn page_config(dir: &Path, port: u16, rest: &str) -> String {
    std::fs::write(dir.join("alice.token"), format!("{ALICE}\n")).unwrap();
    std::fs::write(dir.join("bob.token"), BOB).unwrap();
    let rest = format!(
        r#"{}

[admin]
listen = "127.0.0.1:{port}"
session_ttl = "1h"

[admin.users.alice]
token = {{ file = "alice.token" }}
role = "viewer"

[admin.users.bob]
token = {{ file = "bob.token" }}
role = "operator"
"#,
        rest
    );
    config(
        dir,
        &format!("{NO_LIMITS}\ntrusted_proxies = [\"127.0.0.1/32\"]"),
        &rest,
    )
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// The session cookie a login answer set, and the whole header.
fn session_cookie(headers: &HeaderMap) -> (String, String) {
    let set = headers
        .get(SET_COOKIE)
        .expect("a cookie")
        .to_str()
        .unwrap()
        .to_owned();
    let pair = set.split(';').next().unwrap().trim().to_owned();
    (pair, set)
}

async fn login(page: &str, token: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut request = client()
        .post(format!("{page}/login"))
        .header("content-type", FORM)
        .body(form(&[("token", token)]));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.unwrap()
}

/// GETs `path` as JSON with the session `cookie`: the status and the body.
async fn get_json(page: &str, path: &str, cookie: &str) -> (u16, String) {
    let answer = client()
        .get(format!("{page}{path}"))
        .header("cookie", cookie)
        .header("accept", "application/json")
        .send()
        .await
        .unwrap();
    (answer.status().as_u16(), answer.text().await.unwrap())
}

/// The CSRF token the page's forms carry.
fn csrf(html: &str) -> String {
    let at = html
        .find("name=\"csrf\" value=\"")
        .unwrap_or_else(|| panic!("a form with a CSRF token: {html}"));
    html[at + 19..].split('"').next().unwrap().to_owned()
}

async fn a_status_page_on_its_own_listener_behind_a_login() {
    let dir = tempdir();
    let port = free_port();
    let daemon = InProcess::start(dir.path(), &with_page(dir.path(), port)).await;
    ready(&daemon).await;
    let page = format!("http://127.0.0.1:{port}");
    let http = client();

    // Never on the public listener.
    for path in ["/", "/login", "/style.css", "/logout"] {
        assert_eq!(daemon.get_status(path).await, 404, "{path}");
    }
    // No page without a session: a form to log in, or 401 for JSON.
    let anonymous = http.get(format!("{page}/")).send().await.unwrap();
    assert_eq!(anonymous.status(), 303);
    assert_eq!(anonymous.headers()[LOCATION], "/login");
    let anonymous = http
        .get(format!("{page}/"))
        .header("accept", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    let login_form = http.get(format!("{page}/login")).send().await.unwrap();
    assert_eq!(login_form.status(), 200);
    let headers = login_form.headers().clone();
    assert_eq!(
        headers["content-security-policy"],
        "default-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    );
    assert_eq!(headers["x-frame-options"], "DENY");
    assert_eq!(headers["referrer-policy"], "no-referrer");
    assert_eq!(headers["cache-control"], "no-store");

    // A wrong token is refused; the right one opens a session.
    let wrong = login(&page, "not-a-token-at-all-really", &[]).await;
    assert_eq!(wrong.status(), 401);
    assert!(wrong.text().await.unwrap().contains("not recognised"));
    let alice = login(&page, ALICE, &[]).await;
    assert_eq!(alice.status(), 303);
    let (cookie, set) = session_cookie(alice.headers());
    for flag in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=3600"] {
        assert!(set.contains(flag), "{set}");
    }
    assert!(!set.contains("Secure"), "plain HTTP on loopback: {set}");

    // The overview, from the database: the sinks, a silence added on the command line (its
    // hostile comment as text).
    let comment = "<script>alert(1)</script>\"><img src=x onerror=alert(2)>";
    let added = std::process::Command::new(BIN)
        .args([
            "silence", "add", "--type", "alert.*", "--for", "1h", "--author", "ops",
        ])
        .args(["--comment", comment, "--config"])
        .arg(dir.path().join("config.toml"))
        .output()
        .unwrap();
    assert!(added.status.success(), "{added:?}");
    let overview = http
        .get(format!("{page}/"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(overview.status(), 200);
    let html = overview.text().await.unwrap();
    assert!(html.contains("<td>archive</td>"), "{html}");
    assert!(html.contains("alice (viewer)"), "{html}");
    assert!(
        html.contains(
            "&lt;script&gt;alert(1)&lt;&#x2f;script&gt;&quot;&gt;&lt;img src=x onerror=alert(2)&gt;"
        ),
        "{html}"
    );
    assert!(!html.contains("<script>"), "{html}");
    let json: serde_json::Value =
        serde_json::from_str(&get_json(&page, "/", &cookie).await.1).unwrap();
    assert_eq!(json["sinks"][0]["sink"], "archive", "{json}");
    assert_eq!(json["silences"][0]["comment"], comment, "{json}");

    // Logging out needs the session's CSRF token.
    let token = csrf(&html);
    for fields in [vec![], vec![("csrf", "forged")]] {
        let refused = http
            .post(format!("{page}/logout"))
            .header("cookie", &cookie)
            .header("content-type", FORM)
            .body(form(&fields))
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status(), 403, "{fields:?}");
    }
    let out = http
        .post(format!("{page}/logout"))
        .header("cookie", &cookie)
        .header("content-type", FORM)
        .body(form(&[("csrf", token.as_str())]))
        .send()
        .await
        .unwrap();
    assert_eq!(out.status(), 303);
    let after = http
        .get(format!("{page}/"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(after.status(), 303, "the session is gone");

    // Behind a trusted proxy that says HTTPS, the cookie is Secure.
    let bob = login(&page, BOB, &[("x-forwarded-proto", "https")]).await;
    assert_eq!(bob.status(), 303);
    assert!(session_cookie(bob.headers()).1.contains("; Secure"));
    // Five logins a minute per client: the next is refused without being tried.
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(login(&page, BOB, &[]).await.status().as_u16());
    }
    assert_eq!(statuses, [303, 303, 429], "three logins before these");
    daemon.stop().await;
}
on_both_backends!(a_status_page_on_its_own_listener_behind_a_login);

/// `check-config` names the page's listener.
#[test]
fn check_config_names_the_status_page() {
    let dir = tempdir();
    let path = write_config(dir.path(), &with_page(dir.path(), 8081));
    let out = std::process::Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let said = stdout(&out);
    assert!(
        said.contains("status page: http://127.0.0.1:8081 (2 users)"),
        "{said}"
    );
    assert!(
        !said.contains(ALICE) && !said.contains(BOB),
        "never a token"
    );
}

/// The page's configuration is checked with the rest: its own listener, at least one user,
/// tokens long enough, never on the public listener's address.
#[test]
fn the_page_configuration_is_checked() {
    let dir = tempdir();
    std::fs::write(dir.path().join("short.token"), "short").unwrap();
    let text = format!(
        "{}\n[admin]\nlisten = \"localhost:x\"\n",
        config(dir.path(), "", &standard_rest(dir.path()))
    );
    let path = write_config(dir.path(), &text);
    let err = hookroute::config::load(&path).unwrap_err().to_string();
    assert!(err.contains("admin.listen"), "{err}");
    let text = format!(
        "{}\n[admin]\nlisten = \"127.0.0.1:9\"\n[admin.users.eve]\ntoken = {{ file = \"short.token\" }}\nrole = \"operator\"\n",
        config(dir.path(), "", &standard_rest(dir.path()))
    );
    let path = write_config(dir.path(), &text);
    let err = hookroute::config::load(&path).unwrap_err().to_string();
    assert!(
        err.contains("admin.users.eve.token: at least 16 characters"),
        "{err}"
    );
    let text = format!(
        "{}\n[admin]\nlisten = \"127.0.0.1:9\"\n",
        config(dir.path(), "", &standard_rest(dir.path()))
    );
    let path = write_config(dir.path(), &text);
    let err = hookroute::config::load(&path).unwrap_err().to_string();
    assert!(err.contains("admin.users: add at least one user"), "{err}");
}

/// Logs `token` in; the session cookie and the overview's CSRF token.
pub async fn session(page: &str, token: &str) -> (String, String, String) {
    let answer = login(page, token, &[]).await;
    assert_eq!(answer.status(), 303);
    let (cookie, _) = session_cookie(answer.headers());
    let html = client()
        .get(format!("{page}/"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    (cookie, csrf(&html), html)
}

async fn post(page: &str, path: &str, cookie: &str, fields: &[(&str, &str)]) -> u16 {
    client()
        .post(format!("{page}{path}"))
        .header("cookie", cookie)
        .header("content-type", FORM)
        .body(form(fields))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// An operator pauses a sink from the overview (recorded as theirs, with the comment) and
/// resumes it; a viewer sees no buttons, and a viewer's POST is refused (403), as is one
/// without the form's CSRF token.
async fn an_operator_pauses_and_resumes_a_sink_from_the_page() {
    let dir = tempdir();
    let port = free_port();
    let daemon = InProcess::start(dir.path(), &with_page(dir.path(), port)).await;
    ready(&daemon).await;
    let page = format!("http://127.0.0.1:{port}");
    let (alice, alice_csrf, alice_html) = session(&page, ALICE).await;
    assert!(!alice_html.contains(">Pause<"), "a viewer has no buttons");
    let (bob, bob_csrf, bob_html) = session(&page, BOB).await;
    assert!(bob_html.contains(">Pause<"), "{bob_html}");

    let pause = |csrf: &str| {
        vec![
            ("csrf", csrf.to_owned()),
            ("comment", "disk swap on the archive host".to_owned()),
            ("for", "2h".to_owned()),
        ]
    };
    let send = |cookie: String, path: &'static str, pairs: Vec<(&'static str, String)>| {
        let page = page.clone();
        async move {
            let refs: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
            post(&page, path, &cookie, &refs).await
        }
    };
    assert_eq!(
        send(alice.clone(), "/sinks/archive/pause", pause(&alice_csrf)).await,
        403,
        "a viewer"
    );
    assert_eq!(
        send(bob.clone(), "/sinks/archive/pause", pause("forged")).await,
        403,
        "no CSRF token"
    );
    assert_eq!(
        send(bob.clone(), "/sinks/nowhere/pause", pause(&bob_csrf)).await,
        404
    );
    assert_eq!(
        send(bob.clone(), "/sinks/archive/pause", pause(&bob_csrf)).await,
        303
    );
    let state = |daemon: &InProcess| {
        daemon.tools(|tools| {
            let configured = ["archive".to_owned()];
            let sinks = tools.sinks(&configured, jiff::Timestamp::now()).unwrap();
            sinks.into_iter().find(|s| s.sink == "archive").unwrap()
        })
    };
    let paused = state(&daemon);
    assert_eq!(paused.state, "paused");
    let pause_row = paused.health.pause.unwrap();
    assert_eq!(
        (pause_row.by.as_str(), pause_row.comment.as_str()),
        ("bob", "disk swap on the archive host")
    );
    assert!(pause_row.until.is_some());
    let resume = vec![("csrf", bob_csrf.clone())];
    assert_eq!(
        send(bob.clone(), "/sinks/archive/resume", resume).await,
        303
    );
    assert_eq!(state(&daemon).state, "active");
    daemon.stop().await;
}
on_both_backends!(an_operator_pauses_and_resumes_a_sink_from_the_page);

/// Every page and action, as each kind of visitor meets it: nothing on the public listener, no
/// page without a session, every action a POST that a viewer or a forged form cannot make;
/// each page answers JSON when asked, bad input gets 400 with why, what does not exist 404,
/// and an action that would do harm 409, changing nothing.
async fn every_page_and_action_as_each_visitor_meets_it() {
    let dir = tempdir();
    let port = free_port();
    let daemon = InProcess::start(dir.path(), &with_page(dir.path(), port)).await;
    ready(&daemon).await;
    let _ticking = Ticking::start(&daemon.clock, Duration::from_millis(20));
    for n in 0..3 {
        daemon.accept_cl(&scan_body(&format!("page-{n}"))).await;
    }
    let page = format!("http://127.0.0.1:{port}");
    let gets = [
        "/",
        "/deliveries",
        "/deliveries?status=succeeded&type=scan.*&since=1h",
        "/events/1",
        "/dead",
        "/silences",
        "/config",
    ];
    let posts = [
        "/events/1/replay",
        "/jobs/1/retry",
        "/dead/retry",
        "/silences",
        "/silences/1/expire",
        "/sinks/archive/pause",
        "/sinks/archive/resume",
    ];
    let http = client();
    for path in gets.iter().chain(&posts) {
        let path = path.split('?').next().unwrap();
        assert_eq!(daemon.get_status(path).await, 404, "public {path}");
        let anonymous = http.get(format!("{page}{path}")).send().await.unwrap();
        assert!(
            [303, 405].contains(&anonymous.status().as_u16()),
            "{path}: {}",
            anonymous.status()
        );
    }
    for path in posts {
        let status = client()
            .post(format!("{page}{path}"))
            .header("content-type", FORM)
            .body(form(&[("csrf", "x"), ("jobs", "1")]))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 303, "{path} without a session goes to the login");
    }

    let (alice, alice_csrf, _) = session(&page, ALICE).await;
    let (bob, bob_csrf, _) = session(&page, BOB).await;
    for path in gets {
        for cookie in [&alice, &bob] {
            let html = http
                .get(format!("{page}{path}"))
                .header("cookie", cookie)
                .send()
                .await
                .unwrap();
            assert_eq!(html.status(), 200, "{path}");
            assert_eq!(html.headers()["cache-control"], "no-store");
            let (status, json) = get_json(&page, path, cookie).await;
            assert_eq!(status, 200, "{path}");
            serde_json::from_str::<serde_json::Value>(&json).unwrap();
        }
    }
    // A viewer's POST and a POST without the token are refused, and change nothing.
    let jobs = daemon.job_count();
    for path in posts {
        let fields = [
            ("csrf", alice_csrf.as_str()),
            ("jobs", "1"),
            ("comment", "x"),
        ];
        assert_eq!(
            post(&page, path, &alice, &fields).await,
            403,
            "viewer {path}"
        );
        assert_eq!(
            post(&page, path, &bob, &[("jobs", "1"), ("comment", "x")]).await,
            403,
            "no CSRF token {path}"
        );
    }
    assert_eq!(daemon.job_count(), jobs);
    let silences = || daemon.tools(|tools| tools.silences(false, jiff::Timestamp::now()).unwrap());
    assert!(silences().is_empty());

    // Bad input: 400 with why.
    let answer = |path: &'static str| get_json(&page, path, &bob);
    for (path, why) in [
        (
            "/deliveries?status=lost",
            "status: \\\"lost\\\" is not one of",
        ),
        ("/deliveries?since=yesterday", "is not a duration"),
        ("/deliveries?type=%5B", "type:"),
        ("/deliveries?before=x", "before: \\\"x\\\" is not a number"),
        ("/deliveries?id=abc", "is not an event id"),
    ] {
        let (status, text) = answer(path).await;
        assert_eq!(status, 400, "{path}: {text}");
        assert!(text.contains(why), "{path}: {text}");
    }
    assert_eq!(answer("/events/999").await.0, 404);
    let jump = http
        .get(format!("{page}/deliveries?id=2"))
        .header("cookie", &bob)
        .send()
        .await
        .unwrap();
    assert_eq!(
        jump.headers()[LOCATION],
        "/events/2",
        "an id goes to its event"
    );

    // Pages by keyset: two events a page, every row once, the newest first.
    let mut seen = Vec::new();
    let mut path = "/deliveries?limit=2".to_owned();
    loop {
        let listed: serde_json::Value =
            serde_json::from_str(&get_json(&page, &path, &bob).await.1).unwrap();
        seen.extend(
            listed["rows"]
                .as_array()
                .unwrap()
                .iter()
                .map(|row| row["event_id"].as_i64().unwrap()),
        );
        match listed["next"].as_str() {
            Some(next) => path = format!("/deliveries?{next}"),
            None => break,
        }
    }
    assert_eq!(seen, [3, 2, 1]);

    // Actions that would do harm are refused with why (409), changing nothing.
    let jobs = daemon.job_count();
    let replay = [("csrf", bob_csrf.as_str()), ("sink", "archive")];
    let refused = client()
        .post(format!("{page}/jobs/1/retry"))
        .header("cookie", &bob)
        .header("content-type", FORM)
        .body(form(&[("csrf", bob_csrf.as_str())]))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 409);
    assert!(refused.text().await.unwrap().contains("has succeeded"));
    assert_eq!(post(&page, "/events/999/replay", &bob, &replay).await, 404);
    let nowhere = [("csrf", bob_csrf.as_str()), ("sink", "nowhere")];
    assert_eq!(post(&page, "/events/1/replay", &bob, &nowhere).await, 404);
    let dead = [("csrf", bob_csrf.as_str()), ("jobs", "1")];
    assert_eq!(post(&page, "/dead/retry", &bob, &dead).await, 409);
    let junk = [("csrf", bob_csrf.as_str()), ("jobs", "1,x")];
    assert_eq!(post(&page, "/dead/retry", &bob, &junk).await, 400);
    assert_eq!(daemon.job_count(), jobs);
    // A silence needs what to match, why, and for how long: 400 with each problem.
    let incomplete = client()
        .post(format!("{page}/silences"))
        .header("cookie", &bob)
        .header("content-type", FORM)
        .body(form(&[("csrf", bob_csrf.as_str()), ("action", "add")]))
        .send()
        .await
        .unwrap();
    assert_eq!(incomplete.status(), 400);
    let text = incomplete.text().await.unwrap();
    for why in ["say what to silence", "comment: say why", "for: how long"] {
        assert!(text.contains(why), "{why}: {text}");
    }
    assert!(silences().is_empty());
    assert_eq!(
        post(
            &page,
            "/silences/7/expire",
            &bob,
            &[("csrf", bob_csrf.as_str())]
        )
        .await,
        409
    );
    daemon.stop().await;
}
on_both_backends!(every_page_and_action_as_each_visitor_meets_it);
