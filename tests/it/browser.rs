//! The status page in a real browser (#28): Debian's headless Chromium, driven through
//! chromedriver (WebDriver, by `fantoccini`), against the real daemon with real data, clicking
//! through as an on-call person would. Each page's screenshot is written under
//! `target/screenshots/` for a reviewer to look at.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};

use crate::harness::*;
use crate::web::{BOB, free_port, page_config};

/// What a hostile sender can put in a field: markup, an attribute breakout, a terminal escape
/// and a right-to-left override.
const HOSTILE: &str =
    "<script>alert(1)</script>\"><img src=x onerror=alert(2)>\u{1b}[2J\u{202e}gnp.exe";

/// chromedriver on a loopback port, killed when dropped.
struct Driver {
    child: Child,
    port: u16,
}

impl Driver {
    async fn start() -> Self {
        let port = free_port();
        let mut child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (Debian's chromium-driver; tests/run.sh installs it)");
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Self { child, port };
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("chromedriver did not listen on {port}");
    }

    /// A headless Chromium with a profile of its own, and nothing that reaches past loopback.
    async fn browser(&self, profile: &Path) -> Client {
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1280,900",
        ]
        .map(str::to_owned)
        .into_iter()
        .chain([format!("--user-data-dir={}", profile.display())])
        .collect::<Vec<_>>();
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({ "binary": "/usr/bin/chromium", "args": args }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        ClientBuilder::new(connector)
            .capabilities(capabilities)
            .connect(&format!("http://127.0.0.1:{}", self.port))
            .await
            .expect("a Chromium session")
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where the screenshots go: `target/screenshots/`.
fn screenshots() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn screenshot(browser: &Client, name: &str) {
    let png = browser.screenshot().await.expect("a screenshot");
    assert!(png.starts_with(b"\x89PNG"), "{name}: a PNG");
    std::fs::write(screenshots().join(format!("{name}.png")), png).unwrap();
}

/// No dialog is open: no script of a payload ran.
async fn no_dialog(browser: &Client) {
    match browser.get_alert_text().await {
        Err(err) if err.is_no_such_alert() => {}
        other => panic!("a dialog opened: {other:?}"),
    }
}

async fn find(browser: &Client, css: &str) -> Element {
    browser
        .find(Locator::Css(css))
        .await
        .unwrap_or_else(|err| panic!("{css}: {err}"))
}

/// Waits (a bounded while) for `check`: a page that answered a form on the same address
/// comes a moment after the submit returns.
async fn until(what: &str, mut check: impl AsyncFnMut() -> bool) {
    for _ in 0..300 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what}: not within 15 s");
}

/// What `css` finds reads; tried again while a page that replaces it is still loading.
async fn text(browser: &Client, css: &str) -> String {
    for _ in 0..300 {
        if let Ok(element) = browser.find(Locator::Css(css)).await
            && let Ok(text) = element.text().await
        {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{css}: nothing to read within 15 s");
}

async fn path(browser: &Client) -> String {
    let url = browser.current_url().await.unwrap();
    match url.query() {
        Some(query) => format!("{}?{query}", url.path()),
        None => url.path().to_owned(),
    }
}

/// Waits (a bounded while) until the browser is at a page whose path and query start with
/// `at` (are `/`, for the overview): a click or a submit returns before the next page has
/// loaded.
async fn arrive(browser: &Client, at: &str) {
    for _ in 0..300 {
        let now = path(browser).await;
        if (now == at || (at != "/" && now.starts_with(at)))
            && browser
                .execute("return document.readyState", vec![])
                .await
                .is_ok_and(|state| state == "complete")
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("not at {at} within 15 s: at {}", path(browser).await);
}

/// Clicks what `css` finds and waits to arrive at `at`.
async fn click(browser: &Client, css: &str, at: &str) {
    find(browser, css).await.click().await.unwrap();
    arrive(browser, at).await;
}

/// An exec sink that fails (and, with one attempt, dead-letters) until `ok` exists.
fn ticket_sink(dir: &Path) -> String {
    let hook = dir.join("ticket.sh");
    script(
        &hook,
        &format!(
            "#!/bin/sh\ncat > /dev/null\ntest -f {}\n",
            dir.join("ok").display()
        ),
    );
    format!(
        r#"
[sources.cl]
scheme = "compliancelayer"
secret = ["{CL_SECRET}"]

[sinks.archive]
type = "file"
path = "{archive}"

[sinks.ticket]
type = "exec"
command = ["{hook}"]
delivery = {{ timeout = "5s", retry = {{ max_attempts = 1 }} }}

[[routes]]
name = "everything"
events = ["*"]
sinks = ["archive"]
continue = true

[[routes]]
name = "alerts"
events = ["alert.*"]
sinks = ["ticket"]
"#,
        archive = dir.join("events.jsonl").display(),
        hook = hook.display(),
    )
}

fn alert_body(id: &str, domain: &str) -> Vec<u8> {
    serde_json::json!({
        "id": id,
        "type": "alert.triggered",
        "created_at": jiff::Timestamp::now().to_string(),
        "data": {"domain": domain, "alert_type": "critical_finding", "severity": "critical"}
    })
    .to_string()
    .into_bytes()
}

/// Logs in, filters deliveries, opens a hostile event (shown as text, no script runs),
/// replays it and sees the new job, re-queues a dead letter and sees it delivered, previews
/// and adds a silence and sees it keep the next event quiet, reads the configuration, and logs
/// out; a screenshot of each page.
async fn an_on_call_person_clicks_through_the_status_page() {
    let dir = tempdir();
    let port = free_port();
    let config = page_config(dir.path(), port, &ticket_sink(dir.path()));
    let daemon = InProcess::start(dir.path(), &config).await;
    ready(&daemon).await;
    // The daemon's clock keeps the wall clock's pace, so the engine goes on looking.
    let _ticking = Ticking::start(&daemon.clock, Duration::from_millis(20));
    for n in 0..3 {
        daemon.accept_cl(&scan_body(&format!("scan-{n}"))).await;
    }
    daemon.accept_cl(&alert_body("alert-1", HOSTILE)).await;
    until(
        "the alert's ticket is dead, the archive has all four",
        async || {
            let rows = daemon.deliveries();
            let status = |sink: &str, status: &str| {
                rows.iter()
                    .filter(|row| {
                        row.sink.as_deref() == Some(sink) && row.status.as_str() == status
                    })
                    .count()
            };
            status("ticket", "dead") == 1 && status("archive", "succeeded") == 4
        },
    )
    .await;

    let driver = Driver::start().await;
    let profile = tempdir();
    let browser = driver.browser(profile.path()).await;
    let page = format!("http://127.0.0.1:{port}");

    // No page without a session: the login form.
    browser.goto(&format!("{page}/deliveries")).await.unwrap();
    arrive(&browser, "/login").await;
    screenshot(&browser, "login").await;
    find(&browser, "#token").await.send_keys(BOB).await.unwrap();
    click(&browser, "form.login button", "/").await;
    let sinks = text(&browser, "table.sinks").await;
    assert!(
        sinks.contains("ticket") && sinks.contains("archive"),
        "{sinks}"
    );
    let sources = text(&browser, "#sources").await;
    assert!(sources.contains("cl"), "{sources}");
    screenshot(&browser, "overview").await;
    // On a phone's width nothing runs off the side: the page reflows instead.
    browser.set_window_size(390, 844).await.unwrap();
    let (page_width, screen_width) = (
        browser
            .execute("return document.documentElement.scrollWidth", vec![])
            .await
            .unwrap(),
        browser
            .execute("return window.innerWidth", vec![])
            .await
            .unwrap(),
    );
    assert!(
        page_width.as_u64() <= screen_width.as_u64(),
        "{page_width} wide on a {screen_width} screen"
    );
    screenshot(&browser, "overview-phone").await;
    browser.set_window_size(1280, 900).await.unwrap();

    // Deliveries, filtered to the alerts through the form.
    click(&browser, "header nav a[href='/deliveries']", "/deliveries").await;
    let filters = browser.form(Locator::Css("#filters")).await.unwrap();
    filters.set_by_name("type", "alert.*").await.unwrap();
    filters.submit().await.unwrap();
    arrive(
        &browser,
        "/deliveries?status=&source=&sink=&route=&type=alert.*",
    )
    .await;
    let rows = browser
        .find_all(Locator::Css("#rows tbody tr"))
        .await
        .unwrap();
    assert_eq!(rows.len(), 2, "the alert's archive and ticket jobs");
    let listed = text(&browser, "#rows").await;
    assert!(
        listed.contains("dead") && !listed.contains("scan.completed"),
        "{listed}"
    );
    screenshot(&browser, "deliveries").await;

    // The hostile event: its payload is text, and no script ran.
    click(&browser, "#rows tbody tr a", "/events/").await;
    no_dialog(&browser).await;
    let payload = text(&browser, "#payload").await;
    assert!(
        payload.contains("<script>alert(1)</script>")
            && payload.contains("onerror=alert(2)>")
            && payload.contains("\\u001b[2J")
            && payload.contains("\\u{202e}gnp.exe"),
        "{payload}"
    );
    assert!(
        !payload.contains('\u{202e}') && !payload.contains('\u{1b}'),
        "{payload:?}"
    );
    assert!(
        browser.find(Locator::Css("img[src=x]")).await.is_err(),
        "no element came of the payload"
    );
    screenshot(&browser, "event").await;
    let event_path = path(&browser).await;

    // Replay it to the archive: the new job is on the page.
    let jobs_before = browser
        .find_all(Locator::Css("section.job"))
        .await
        .unwrap()
        .len();
    let replay = browser.form(Locator::Css("#replay")).await.unwrap();
    find(&browser, "#replay select[name=sink]")
        .await
        .select_by_value("archive")
        .await
        .unwrap();
    replay.submit().await.unwrap();
    arrive(&browser, &event_path).await;
    until("the page with the replay's job", async || {
        let jobs = browser.find_all(Locator::Css("section.job")).await;
        jobs.is_ok_and(|jobs| jobs.len() > jobs_before)
    })
    .await;
    let jobs = browser.find_all(Locator::Css("section.job")).await.unwrap();
    assert_eq!(
        jobs.len(),
        jobs_before + 1,
        "the replay's job: {}",
        text(&browser, "main").await
    );
    let last = jobs.last().unwrap().text().await.unwrap();
    assert!(
        last.contains("route “replay”") || last.contains("sink “archive”"),
        "{last}"
    );

    // The dead letter: re-queued from its group once the hook is mended; it is delivered.
    std::fs::write(dir.path().join("ok"), "").unwrap();
    click(&browser, "header nav a[href='/dead']", "/dead").await;
    let group = text(&browser, "section.group h2").await;
    assert!(group.contains("ticket: 1 dead"), "{group}");
    screenshot(&browser, "dead-letters").await;
    find(&browser, "section.group form button")
        .await
        .click()
        .await
        .unwrap();
    until("the page without the group", async || {
        text(&browser, "main").await.contains("No dead letters.")
    })
    .await;
    until("the re-queued ticket is delivered", async || {
        daemon
            .deliveries()
            .iter()
            .any(|row| row.sink.as_deref() == Some("ticket") && row.status.as_str() == "succeeded")
    })
    .await;

    // A silence: previewed (what it would have matched, nothing stored), then added; the
    // next scan is kept quiet.
    click(&browser, "header nav a[href='/silences']", "/silences").await;
    let add = browser.form(Locator::Css("#add-silence")).await.unwrap();
    add.set_by_name("type", "scan.*").await.unwrap();
    add.set_by_name("comment", "scanner maintenance")
        .await
        .unwrap();
    add.submit_with(Locator::Css("button[value=preview]"))
        .await
        .unwrap();
    until("the preview", async || {
        browser.find(Locator::Css("#preview h3")).await.is_ok()
    })
    .await;
    let preview = text(&browser, "#preview h3").await;
    assert!(preview.contains("Would silence 3 deliveries"), "{preview}");
    assert!(
        daemon
            .tools(|tools| tools.silences(false, jiff::Timestamp::now()).unwrap())
            .is_empty()
    );
    screenshot(&browser, "silence-preview").await;
    let add = browser.form(Locator::Css("#add-silence")).await.unwrap();
    add.submit_with(Locator::Css("button[value=add]"))
        .await
        .unwrap();
    until("the page with the silence", async || {
        text(&browser, "#current")
            .await
            .contains("scanner maintenance")
    })
    .await;
    let current = text(&browser, "#current").await;
    assert!(
        current.contains("scanner maintenance") && current.contains("bob"),
        "{current}"
    );
    screenshot(&browser, "silences").await;
    // Every daemon reads the silences each second: the next event after that is quiet.
    until("the daemon applies the silence", async || {
        let metrics = reqwest::get(format!("http://{}/metrics", daemon.addr))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        metrics.contains("hookroute_silences{state=\"active\"} 1")
    })
    .await;
    daemon.accept_cl(&scan_body("scan-after")).await;
    until("the next scan is silenced", async || {
        daemon
            .deliveries()
            .iter()
            .any(|row| row.delivery_id == "scan-after" && row.status.as_str() == "silenced")
    })
    .await;

    // The configuration, as check-config prints it.
    click(&browser, "header nav a[href='/config']", "/config").await;
    let summary = text(&browser, "#summary").await;
    assert!(
        summary.contains("\"alerts\"") && !summary.contains(CL_SECRET),
        "{summary}"
    );
    screenshot(&browser, "config").await;

    // Logging out ends the session.
    click(&browser, "form.logout button", "/login").await;
    browser.goto(&format!("{page}/")).await.unwrap();
    arrive(&browser, "/login").await;
    no_dialog(&browser).await;
    browser.close().await.unwrap();
    daemon.stop().await;
}
on_both_backends!(an_on_call_person_clicks_through_the_status_page);
