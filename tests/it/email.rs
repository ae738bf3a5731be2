//! The email sink against a real SMTP server process (aiosmtpd, started here on loopback):
//! headers, recipients, bodies, STARTTLS with a test CA, implicit TLS, AUTH, digests, and
//! header-injection attempts from payload fields.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

use crate::harness::*;

/// Debian's interpreter, which has python3-aiosmtpd (the pyenv one on PATH may not).
const PYTHON: &str = "/usr/bin/python3";

pub struct Smtp {
    child: Child,
    pub port: u16,
    out: PathBuf,
}

impl Drop for Smtp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A CA and a certificate for 127.0.0.1 it signed, as PEM files.
pub struct TestCa {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn test_ca(dir: &Path) -> TestCa {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let files = TestCa {
        ca: dir.join("ca.pem"),
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    };
    std::fs::write(&files.ca, ca.as_ref().pem()).unwrap();
    std::fs::write(&files.cert, cert.pem()).unwrap();
    std::fs::write(&files.key, key.serialize_pem()).unwrap();
    files
}

impl Smtp {
    pub fn start(
        dir: &Path,
        name: &str,
        mode: &str,
        ca: Option<&TestCa>,
        auth: Option<&str>,
    ) -> Self {
        let out = dir.join(format!("mail-{name}"));
        std::fs::create_dir_all(&out).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/smtp_server.py");
        let mut command = Command::new(PYTHON);
        command
            .arg(script)
            .args(["--port", &port.to_string(), "--mode", mode])
            .arg("--out")
            .arg(&out);
        if let Some(ca) = ca {
            command
                .arg("--cert")
                .arg(&ca.cert)
                .arg("--key")
                .arg(&ca.key);
        }
        if let Some(auth) = auth {
            command.args(["--auth", auth]);
        }
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 with aiosmtpd");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "READY", "the SMTP server did not start");
        Self { child, port, out }
    }

    /// Waits for `n` messages and returns them, oldest first.
    pub async fn messages(&self, n: usize) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let received = self.received();
            if received.len() >= n || Instant::now() > deadline {
                return received;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The messages received so far, oldest first.
    pub fn received(&self) -> Vec<serde_json::Value> {
        let mut files: Vec<_> = std::fs::read_dir(&self.out)
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        files.sort();
        files
            .iter()
            .map(|p| serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap())
            .collect()
    }
}

/// A received message's header `name` (any case).
fn header(message: &serde_json::Value, name: &str) -> Option<String> {
    message["headers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h[0].as_str().unwrap().eq_ignore_ascii_case(name))
        .map(|h| h[1].as_str().unwrap().to_owned())
}

fn config_with(dir: &Path, sinks: &str, routes: &str) -> String {
    config(
        dir,
        NO_LIMITS,
        &format!("[sources.cl]\nsecret = \"{CL_SECRET}\"\n\n{sinks}\n{routes}"),
    )
}

fn daemon_with(dir: &Path, sinks: &str, routes: &str) -> Daemon {
    Daemon::start(dir, &config_with(dir, sinks, routes))
}

/// The status and last error of `sink`'s newest job ("none" before it has one).
fn job_status(daemon: &Daemon, sink: &str) -> (String, Option<String>) {
    let rows = daemon.deliveries();
    let job = rows
        .into_iter()
        .find(|row| row.job_id.is_some() && row.sink.as_deref() == Some(sink));
    job.map_or(("none".to_owned(), None), |row| {
        (row.status.as_str().to_owned(), row.detail)
    })
}

async fn wait_status(daemon: &Daemon, sink: &str, status: &str) -> Option<String> {
    eventually(|| match job_status(daemon, sink) {
        (now, error) if now == status => Ok(error),
        (now, error) => Err(format!("{sink}: {now} {error:?}\n{}", daemon.log())),
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_with_a_test_ca_and_auth() {
    let dir = tempdir();
    let ca = test_ca(dir.path());
    let smtp = Smtp::start(
        dir.path(),
        "starttls",
        "starttls",
        Some(&ca),
        Some("hookroute:s3cret"),
    );
    let password = dir.path().join("smtp.password");
    std::fs::write(&password, "s3cret\n").unwrap();
    let sink = |name: &str, secret: &str| {
        format!(
            "[sinks.{name}]\ntype = \"email\"\nurl = \"smtp://127.0.0.1:{}\"\nca_file = \"{}\"\nusername = \"hookroute\"\npassword = {secret}\nfrom = \"Hookroute <hookroute@example.com>\"\nto = [\"ciso@example.com\", \"Sec Team <sec@example.com>\"]\ndelivery = {{ retry = {{ base = \"100ms\" }} }}\n",
            smtp.port,
            ca.ca.display()
        )
    };
    let sinks = sink("mail", &format!("{{ file = \"{}\" }}", password.display()))
        + &sink("wrong", "{ value = \"guess\" }");
    let routes = "[[routes]]\nname = \"all\"\nevents = [\"*\"]\nsinks = [\"mail\", \"wrong\"]\n";
    let daemon = daemon_with(dir.path(), &sinks, routes);
    daemon
        .accept_cl(&sample("compliancelayer-scan.completed.json"))
        .await;

    let message = &smtp.messages(1).await[0];
    assert_eq!(message["tls"], true, "STARTTLS was used");
    assert_eq!(message["authenticated"], true);
    assert_eq!(message["mail_from"], "hookroute@example.com");
    assert_eq!(
        message["rcpt_tos"],
        serde_json::json!(["ciso@example.com", "sec@example.com"])
    );
    assert_eq!(
        message["subject"],
        "Scan completed: example.com graded B (85/100, low risk)"
    );
    let header = |name: &str| header(message, name);
    assert_eq!(
        header("From").as_deref(),
        Some("Hookroute <hookroute@example.com>")
    );
    assert!(header("To").unwrap().contains("Sec Team <sec@example.com>"));
    assert!(
        message["text"]
            .as_str()
            .unwrap()
            .contains("8 issues: 0 critical, 2 high, 3 medium, 3 low")
    );
    assert!(
        message["html"]
            .as_str()
            .unwrap()
            .contains("<h2>Scan completed: example.com")
    );
    assert!(
        message["raw"]
            .as_str()
            .unwrap()
            .contains("Content-Transfer-Encoding: base64")
    );
    wait_status(&daemon, "mail", "succeeded").await;
    // A refused login is permanent: no retries, straight to the dead letters.
    let error = wait_status(&daemon, "wrong", "dead").await.unwrap();
    assert!(
        error.contains("535") || error.to_lowercase().contains("auth"),
        "{error}"
    );
    assert!(!daemon.log().contains("s3cret"), "the password was logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn implicit_tls_and_a_plain_relay() {
    let dir = tempdir();
    let ca = test_ca(dir.path());
    let (tls, plain) = (
        Smtp::start(dir.path(), "tls", "tls", Some(&ca), None),
        Smtp::start(dir.path(), "plain", "plain", None, None),
    );
    let sinks = format!(
        "[sinks.tls]\ntype = \"email\"\nurl = \"smtps://127.0.0.1:{}\"\nca_file = \"{}\"\nfrom = \"h@example.com\"\nto = [\"a@example.com\"]\n\n[sinks.relay]\ntype = \"email\"\nurl = \"smtp://127.0.0.1:{}\"\nstarttls = \"never\"\nfrom = \"h@example.com\"\nto = [\"b@example.com\"]\n",
        tls.port,
        ca.ca.display(),
        plain.port
    );
    let routes = "[[routes]]\nname = \"all\"\nevents = [\"*\"]\nsinks = [\"tls\", \"relay\"]\n";
    let daemon = daemon_with(dir.path(), &sinks, routes);
    daemon
        .accept_cl(&sample("compliancelayer-alert.triggered.json"))
        .await;
    let over_tls = &tls.messages(1).await[0];
    assert_eq!(over_tls["tls"], true);
    assert_eq!(
        over_tls["subject"],
        "Alert [HIGH] example.com: Security score dropped from 85 to 61"
    );
    let relayed = &plain.messages(1).await[0];
    assert_eq!(relayed["tls"], false);
    assert_eq!(relayed["rcpt_tos"], serde_json::json!(["b@example.com"]));
}

/// #24.11: an alert's email said what happened but not when, from where, through which route,
/// under which id, or where to look. Every email now ends with the same context Slack shows,
/// in both parts, with a link to the finding when the payload gives one (a plain web address
/// only) or a scan report's page from `template_vars.scan_url`, shown once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_email_says_when_where_which_route_and_links_the_finding() {
    let dir = tempdir();
    let smtp = Smtp::start(dir.path(), "context", "plain", None, None);
    let sinks = format!(
        "[sinks.oncall]\ntype = \"email\"\nurl = \"smtp://127.0.0.1:{}\"\nstarttls = \"never\"\nfrom = \"h@example.com\"\nto = [\"oncall@example.com\"]\n",
        smtp.port
    );
    let routes = "[[routes]]\nname = \"critical alerts\"\nevents = [\"*\"]\nsinks = [\"oncall\"]\n\n[template_vars]\nscan_url = \"https://app.example/scans/{scan_id}\"\n";
    let daemon = daemon_with(dir.path(), &sinks, routes);
    daemon
        .accept_cl(&sample("compliancelayer-alert.triggered.json"))
        .await;
    let message = &smtp.messages(1).await[0];
    let text = &message["text"].as_str().unwrap().replace("\r\n", "\n");
    let footer = text
        .split("\n-- \n")
        .nth(1)
        .unwrap_or_else(|| panic!("no footer:\n{text}"));
    assert_eq!(
        footer.trim_end(),
        "Event:    alert.triggered from cl\n\
         When:     2026-03-09 08:00:00 UTC\n\
         Route:    critical alerts\n\
         Delivery: 550e8400-e29b-41d4-a716-446655440001",
        "{text}"
    );
    let html = message["html"].as_str().unwrap();
    for cell in [
        "<tr><td>When</td><td>2026-03-09 08:00:00 UTC</td></tr>",
        "<tr><td>Route</td><td>critical alerts</td></tr>",
    ] {
        assert!(html.contains(cell), "{cell} missing from\n{html}");
    }

    // A finding's page from the payload, in both parts; an address that is not a plain web
    // one is left out.
    let finding = serde_json::json!({
        "id": "alert-with-link", "type": "alert.triggered", "created_at": "2026-12-01T10:00:00Z",
        "data": {"domain": "example.com", "alert_type": "critical_finding", "severity": "critical",
                 "report_url": "https://app.example/findings/42?tab=a&b=c", "url": "javascript:alert(1)"}
    });
    daemon.accept_cl(finding.to_string().as_bytes()).await;
    let message = &smtp.messages(2).await[1];
    let text = &message["text"].as_str().unwrap().replace("\r\n", "\n");
    assert!(
        text.ends_with("Link:     https://app.example/findings/42?tab=a&b=c\n"),
        "{text}"
    );
    assert!(
        message["html"].as_str().unwrap().contains(
            "<a href=\"https://app.example/findings/42?tab=a&amp;b=c\">https://app.example/findings/42?tab=a&amp;b=c</a>"
        ),
        "{}",
        message["html"]
    );
    let no_link = serde_json::json!({
        "id": "alert-bad-link", "type": "alert.triggered",
        "data": {"domain": "example.com", "url": "javascript:alert(1)"}
    });
    daemon.accept_cl(no_link.to_string().as_bytes()).await;
    let message = &smtp.messages(3).await[2];
    let text = &message["text"].as_str().unwrap().replace("\r\n", "\n");
    assert!(
        !text.contains("Link:") && !text.contains("javascript"),
        "{text}"
    );
    // No time in the payload: when it was received, said so.
    assert!(text.contains(" UTC (received)\n"), "{text}");

    // A scan's report page, which the default template already shows, is not repeated.
    daemon
        .accept_cl(&sample("compliancelayer-scan.completed.json"))
        .await;
    let message = &smtp.messages(4).await[3];
    let text = &message["text"].as_str().unwrap().replace("\r\n", "\n");
    assert_eq!(
        text.matches("https://app.example/scans/12345").count(),
        1,
        "{text}"
    );
}

on_both_backends!(digest_sends_one_email_per_window);

async fn digest_sends_one_email_per_window() {
    const WINDOW: Duration = Duration::from_secs(15 * 60);
    let dir = tempdir();
    let smtp = Smtp::start(dir.path(), "digest", "plain", None, None);
    let sinks = format!(
        "[sinks.digest]\ntype = \"email\"\nurl = \"smtp://127.0.0.1:{}\"\nstarttls = \"never\"\nfrom = \"h@example.com\"\nto = [\"ops@example.com\"]\ndigest = \"15m\"\n",
        smtp.port
    );
    // In-process, on a clock the test moves: a realistic window, not waited for.
    let daemon = InProcess::start(
        dir.path(),
        &config_with(
            dir.path(),
            &sinks,
            "[[routes]]\nname = \"all\"\nevents = [\"*\"]\nsinks = [\"digest\"]\n",
        ),
    )
    .await;
    for name in [
        "compliancelayer-scan.completed.json",
        "compliancelayer-alert.triggered.json",
        "scorecard-assessment.completed.json",
    ] {
        daemon.accept_cl(&sample(name)).await;
        daemon.clock.advance(Duration::from_secs(60));
    }
    // A second before the window closes (counted from the first event): nothing sent. The
    // engine looks when its clock passes its next look; a moment of real time lets it.
    daemon
        .clock
        .advance(WINDOW - Duration::from_secs(3 * 60 + 1));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        smtp.received().is_empty(),
        "the digest did not wait for its window"
    );

    daemon.clock.advance(Duration::from_secs(1));
    let messages = smtp.messages(1).await;
    assert_eq!(messages.len(), 1);
    let message = &messages[0];
    assert_eq!(
        message["subject"],
        "3 events, the first: Scan completed: example.com graded B (85/100, low risk)"
    );
    let text = message["text"].as_str().unwrap();
    for title in [
        "Scan completed: example.com",
        "Alert [HIGH] example.com",
        "Assessment completed: Q1 2025",
    ] {
        assert!(
            text.contains(title),
            "{title} missing from the digest:\n{text}"
        );
    }
    wait_jobs(&daemon, "succeeded", 3).await;
    // Another whole window on, with nothing new: no second email.
    daemon.clock.advance(WINDOW);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(smtp.received().len(), 1, "one email for the whole window");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payload_text_cannot_inject_headers_or_recipients() {
    let dir = tempdir();
    let smtp = Smtp::start(dir.path(), "inject", "plain", None, None);
    let mail = |name: &str, to: &str| {
        format!(
            "[sinks.{name}]\ntype = \"email\"\nurl = \"smtp://127.0.0.1:{}\"\nstarttls = \"never\"\nfrom = \"h@example.com\"\nto = [\"{to}\"]\n",
            smtp.port
        )
    };
    let sinks = mail("ops", "ops@example.com") + &mail("nobody", "nobody@reject.invalid");
    let routes = r#"[[routes]]
name = "raw fields"
events = ["*"]
sinks = ["ops", "nobody"]
templates = { email = { text = "{{ data.subject }}\n{{ data.body }}" } }
"#;
    let daemon = daemon_with(dir.path(), &sinks, routes);
    let body = serde_json::json!({
        "id": "inject",
        "type": "alert.triggered",
        "data": {
            "subject": "Hello\rBcc: evil@example.com\rX-Injected: yes",
            "body": "line one\r\n.\r\nRCPT TO:<evil@example.com>\rline two\n.\nQUIT\r\nlast line",
        }
    })
    .to_string();
    daemon.accept_cl(body.as_bytes()).await;
    let message = &smtp.messages(1).await[0];
    assert_eq!(
        message["rcpt_tos"],
        serde_json::json!(["ops@example.com"]),
        "only the configured recipient"
    );
    let names: Vec<String> = message["headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h[0].as_str().unwrap().to_lowercase())
        .collect();
    assert!(
        !names.contains(&"bcc".to_owned()) && !names.contains(&"x-injected".to_owned()),
        "{names:?}"
    );
    assert_eq!(
        message["subject"],
        "Hello Bcc: evil@example.com X-Injected: yes"
    );
    let text = message["text"].as_str().unwrap();
    assert!(
        text.contains("line one")
            && text.contains("RCPT TO:<evil@example.com>")
            && text.contains("last line"),
        "{text}"
    );
    assert!(
        !text.replace("\r\n", "\n").contains('\r'),
        "no bare CR survives: {text:?}"
    );
    // A recipient the server refuses is a permanent failure.
    let error = wait_status(&daemon, "nobody", "dead").await.unwrap();
    assert!(error.contains("550"), "{error}");
    wait_status(&daemon, "ops", "succeeded").await;
}

/// A relay that offers no STARTTLS, while the sink requires it (the default): nothing is sent
/// in clear, the job dies at once, and the error says what to change. A message that does go
/// out carries a `Date` and a `Message-ID` that stays the same when the job is retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_required_against_a_plain_relay_says_what_to_set() {
    let dir = tempdir();
    let smtp = Smtp::start(dir.path(), "plain-relay", "plain", None, None);
    let sink = |name: &str, starttls: &str| {
        format!(
            "[sinks.{name}]\ntype = \"email\"\nurl = \"smtp://127.0.0.1:{}\"\n{starttls}\nfrom = \"h@example.com\"\nto = [\"a@example.com\"]\n",
            smtp.port
        )
    };
    let sinks = sink("strict", "") + &sink("relay", "starttls = \"never\"");
    let routes = "[[routes]]\nname = \"all\"\nevents = [\"*\"]\nsinks = [\"strict\", \"relay\"]\n";
    let daemon = daemon_with(dir.path(), &sinks, routes);
    daemon.accept_cl(&scan_body("mid")).await;

    let error = wait_status(&daemon, "strict", "dead")
        .await
        .unwrap_or_default();
    assert!(error.contains("starttls"), "{error}");
    assert_eq!(daemon.job_of("strict").attempts, 1, "a permanent failure");

    let message = &smtp.messages(1).await[0];
    let header = |name: &str| header(message, name);
    assert!(header("Date").is_some(), "{message}");
    let id = header("Message-ID").expect("a Message-ID");
    assert!(id.starts_with('<') && id.ends_with("@hookroute>"), "{id}");
    assert_eq!(smtp.received().len(), 1, "the strict sink sent nothing");
}
