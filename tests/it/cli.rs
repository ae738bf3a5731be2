//! The command line: check-config's summary and precise errors, env overrides, and `send`.

use std::process::{Command, Output};

use crate::harness::*;

fn hookroute(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(BIN)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn check_config_accepts_the_shipped_example() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml");
    let out = hookroute(&["check-config", "--config", example], &[]);
    assert!(out.status.success(), "{}", text(&out));
    let summary = text(&out);
    for expected in [
        "127.0.0.1:8080",
        "/hooks/compliancelayer",
        "scheme=compliancelayer",
        "/hooks/scorecard",
        "scheme=token",
        "archive",
        "file",
        "routes (from",
        "\"failing scans\" events=[\"scan.completed\"]",
        "throttle=1h per `data.domain`",
        // #23.10: its secrets are public, and check-config says so.
        "warning: sources.compliancelayer: uses a secret from the shipped example",
        "warning: sources.scorecard: uses a secret from the shipped example",
    ] {
        assert!(
            summary.contains(expected),
            "{expected} missing from:\n{summary}"
        );
    }
    // Environment overrides win over the file.
    let out = hookroute(
        &["check-config", "--config", example],
        &[("HOOKROUTE_SERVER__LISTEN", "127.0.0.1:9999")],
    );
    assert!(text(&out).contains("127.0.0.1:9999"), "{}", text(&out));
}

/// `config.example.toml` with its commented sinks uncommented and each route's second `sinks`
/// line taken, as its comments tell a new user to do.
fn example_uncommented() -> String {
    let example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml"))
            .unwrap();
    let mut out: Vec<String> = Vec::new();
    let mut in_sink = false;
    for line in example.lines() {
        if line.starts_with("# [sinks.") {
            in_sink = true;
        } else if line.is_empty() {
            in_sink = false;
        }
        if in_sink {
            out.push(line.strip_prefix('#').unwrap().trim_start().to_owned());
        } else if let Some(taken) = line.strip_prefix("# sinks = ") {
            let last = out.last_mut().unwrap();
            assert!(last.starts_with("sinks = "), "{last}");
            *last = format!("sinks = {taken}");
        } else {
            out.push(line.to_owned());
        }
    }
    out.join("\n")
}

/// #24.12: the example was a log-only toy. Uncommented as its comments say, it is the usual
/// setup: failing scans to Slack, critical alerts to email (with the example's `page`
/// template) and a ticket hook, policy changes to another channel, everything archived; and
/// check-config then asks for nothing but the secret files it names.
#[test]
fn the_example_uncommented_routes_the_usual_setup() {
    let dir = tempdir();
    let path = dir.path().join("config.toml");
    let config = example_uncommented();
    std::fs::write(&path, &config).unwrap();
    let path = path.to_str().unwrap();

    let out = hookroute(&["check-config", "--config", path], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let problems: Vec<String> = text(&out)
        .lines()
        .skip(1)
        .map(|line| line.split(": ").nth(1).unwrap_or(line).to_owned())
        .collect();
    assert_eq!(
        problems,
        [
            "sinks.slack-security.webhook_url",
            "sinks.slack-policy.webhook_url",
            "sinks.email-oncall.password",
            "sinks.siem.sign",
        ],
        "{}",
        text(&out)
    );
    assert!(
        text(&out).contains("/etc/hookroute/secrets/slack-security"),
        "{}",
        text(&out)
    );

    let route = |sample: &str| {
        // A sample's name, or (joined as it is absolute) a file of the test's own.
        let sample = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(sample);
        let out = hookroute(
            &[
                "route-test",
                "--config",
                path,
                "--source",
                "compliancelayer",
                sample.to_str().unwrap(),
            ],
            &[],
        );
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        text(&out)
    };
    let alert = route("compliancelayer-alert.triggered.json");
    for expected in [
        "2. \"critical alerts\": MATCHED",
        "-> email-oncall (email):\n      | [HIGH] example.com: Security score dropped from 85 to 61\n      | Score 85 -> 61, below the threshold of 70.",
        "-> ticket (exec):",
    ] {
        assert!(alert.contains(expected), "{expected} missing from\n{alert}");
    }
    let policy = route("scorecard-policy.published.json");
    assert!(
        policy.contains("5. \"policy changes\": MATCHED\n   -> slack-policy (slack):"),
        "{policy}"
    );
    // A failing scan goes to the security channel.
    let failing = dir.path().join("failing.json");
    std::fs::write(
        &failing,
        std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/compliancelayer-scan.completed.json"
        ))
        .unwrap()
        .replace("\"score\":85", "\"score\":52"),
    )
    .unwrap();
    let scan = route(failing.to_str().unwrap());
    assert!(
        scan.contains("4. \"failing scans\": MATCHED")
            && scan.contains("   -> slack-security (slack):\n      | Scan completed: example.com graded B (52/100, high risk)"),
        "{scan}"
    );
}

#[test]
fn check_config_reports_every_problem_precisely() {
    let dir = tempdir();
    let path = dir.path().join("bad.toml");
    let cases: [(&str, &[&str]); 10] = [
        (
            "[storage]\ndedupe_retention = \"7d\"\nevent_retention = \"1d\"\n\n[sources.cl]\nsecret = \"s\"\n",
            &["storage.event_retention: must be at least storage.dedupe_retention"],
        ),
        (
            "[server]\nlisten = \"127.0.0.1:0\"\nlisten_port = 5\n",
            &["bad.toml:3:1: server.listen_port: unknown key `listen_port`"],
        ),
        // Every deserialization problem at once, each at its line and column and under the
        // key path as written, a wrong type inside a sink pointing at its field.
        (
            "[server]\nmax_body_bytes = \"1MB\"\n\n[sources.cl]\nsecret = \"s\"\ntolerence = \"1m\"\n\n[sinks.email-ciso]\ntype = \"email\"\nurl = \"smtp://127.0.0.1\"\nfrom = \"a@example.test\"\nto = \"b@example.test\"\n",
            &[
                "bad.toml:2:1: server.max_body_bytes: invalid type",
                "bad.toml:6:1: sources.cl.tolerence: unknown key `tolerence`; did you mean \"tolerance\"?",
                "bad.toml:12:1: sinks.email-ciso.to: invalid type: found string \"b@example.test\", expected a sequence",
            ],
        ),
        // Every syntax error, not only the first.
        (
            "[server]\nlisten = \n\n[storage]\npath = \"x\nmax_batch = 1\n",
            &["bad.toml:2:10: ", "bad.toml:5:"],
        ),
        (
            "[storage]\ndedupe_retention = \"a week\"\n",
            &["dedupe_retention", "invalid duration"],
        ),
        (
            "[server]\nlisten = \"nowhere\"\ntrusted_proxies = [\"10.0.0.0/33\"]\n\n[sources.cl]\nsecret_env = \"HOOKROUTE_TEST_UNSET_VAR\"\nheader = \"X-Sig\"\n",
            &[
                "server.listen: \"nowhere\" is not an address",
                "server.trusted_proxies[0]",
                "sources.cl.secret_env[0]: environment variable \"HOOKROUTE_TEST_UNSET_VAR\" is not set",
                "sources.cl.header: does not apply to scheme \"compliancelayer\"",
            ],
        ),
        (
            "[sources.sc]\nscheme = \"token\"\nsecret = \"tab\\tinside\"\n",
            &["sources.sc.secret[0]: a token travels in a header"],
        ),
        (
            "[sources.sw]\nscheme = \"standard-webhooks\"\nsecret = \"whsec_***notbase64\"\n",
            &["sources.sw.secret[0]: the secret is not valid base64"],
        ),
        (
            "[sources.cl]\nsecret = \"s\"\n\n[sinks.x]\ntype = \"carrier-pigeon\"\n",
            &["carrier-pigeon", "sinks"],
        ),
        // A sink's secret is read when the configuration is checked, as `serve` would, and
        // every problem of the sink is reported, not only the first.
        (
            "[sources.cl]\nsecret = \"s\"\n\n[sinks.chat]\ntype = \"slack\"\nwebhook_url = { env = \"HOOKROUTE_TEST_UNSET_URL\" }\n\n[sinks.fwd]\ntype = \"http\"\nurl = \"ftp://x\"\nheaders = { \"bad header\" = \"v\" }\ndelivery = { concurrency = 0 }\n",
            &[
                "sinks.chat.webhook_url: environment variable \"HOOKROUTE_TEST_UNSET_URL\" is not set",
                "sinks.fwd.url: must be http:// or https://",
                "sinks.fwd.headers: \"bad header\" is not a header name",
                "sinks.fwd.delivery.concurrency: must be at least 1",
            ],
        ),
    ];
    for (toml, expected) in cases {
        std::fs::write(&path, toml).unwrap();
        let out = hookroute(&["check-config", "--config", path.to_str().unwrap()], &[]);
        assert_eq!(out.status.code(), Some(2), "{toml}\n{}", text(&out));
        for needle in expected {
            assert!(
                text(&out).contains(needle),
                "{needle:?} missing for\n{toml}\n{}",
                text(&out)
            );
        }
        // A secret is never echoed back.
        assert!(!text(&out).contains("***notbase64"), "{}", text(&out));
    }
    let out = hookroute(
        &["check-config", "--config", "/nonexistent/hookroute.toml"],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("does not exist"), "{}", text(&out));
}

/// #24.4: check-config stopped at the file's first layer of problems (unknown keys) and showed
/// the rest (an unreadable secret, an unknown sink) on the next run; and a missing secret file
/// also printed "no secret" and a false `unknown source`. Now one run reports every problem,
/// each once, and none caused by another: a source whose secret cannot be read, a sink or a
/// route that could not be read at all, still exist for what refers to them.
#[test]
fn check_config_reports_every_problem_in_one_run_and_none_caused_by_another() {
    let dir = tempdir();
    let rules = |top: &str, routes: &str| {
        format!(
            r#"{top}[server]
listen = "127.0.0.1:0"
lisen = "x"

[storage]
path = "db.sqlite"

[sources.compliancelayer]
secret_file = "missing-secret"
colour = "red"

[sinks.chat]
type = "slack"
webhook_urll = "x"

[sinks.log]
type = "file"
path = "out.jsonl"
{routes}"#
        )
    };
    let routes = r#"
[[routes]]
name = "no sinks"
events = ["*"]

[[routes]]
name = "all"
events = ["*"]
sources = ["compliancelayer"]
sinks = ["chat", "log", "missing"]
templates = { slack = "short" }
"#;
    let path = dir.path().join("hookroute.toml");
    std::fs::write(&path, rules("", routes)).unwrap();
    let out = hookroute(&["check-config", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let secret = dir.path().join("missing-secret");
    let reported: Vec<String> = text(&out)
        .lines()
        .skip(1)
        .map(|line| line.trim().replace(&*path.to_string_lossy(), "FILE"))
        .collect();
    let expected = [
        "FILE:3:1: server.lisen: unknown key `lisen`; did you mean \"listen\"?".to_owned(),
        format!(
            "FILE:9:1: sources.compliancelayer.secret_file[0]: {} does not exist yet: create it holding the secret, readable by the service (e.g. `install -m 0640 -g hookroute /dev/null {0}`, then write the secret in it)",
            secret.display()
        ),
        "FILE:10:1: sources.compliancelayer.colour: unknown key `colour`; known keys: scheme, path, secret, secret_file, secret_env, secret_credential, secret_encoding, tolerance, require_timestamp, max_event_age, header, prefix, encoding, allowed_ips, api".to_owned(),
        "FILE:12:8: sinks.chat: missing key `webhook_url`".to_owned(),
        "FILE:14:1: sinks.chat.webhook_urll: unknown key `webhook_urll`; did you mean \"webhook_url\"?".to_owned(),
        "FILE:20:1: routes[0]: missing key `sinks`".to_owned(),
        "FILE:28:25: routes[1] (\"all\").sinks[2]: unknown sink \"missing\"".to_owned(),
    ];
    assert_eq!(reported, expected, "{}", text(&out));
    assert!(
        text(&out).starts_with(&format!("error: {}: 7 problem(s):", path.display())),
        "{}",
        text(&out)
    );

    // Routes in a rules file of their own: the same, positions in that file.
    let rules_file = dir.path().join("rules.toml");
    std::fs::write(&rules_file, routes).unwrap();
    std::fs::write(&path, rules("rules_file = \"rules.toml\"\n", "")).unwrap();
    let out = hookroute(&["check-config", "--config", path.to_str().unwrap()], &[]);
    let report = text(&out);
    assert_eq!(out.status.code(), Some(2), "{report}");
    for line in [
        format!(
            "{}:2:1: routes[0]: missing key `sinks`",
            rules_file.display()
        ),
        format!(
            "{}:10:25: routes[1] (\"all\").sinks[2]: unknown sink \"missing\"",
            rules_file.display()
        ),
    ] {
        assert!(report.contains(&line), "{line} missing from\n{report}");
    }
    assert!(report.contains("7 problem(s)"), "{report}");
}

/// #24.5: a route glob that matches no event type the senders document (`policies.*`)
/// passed silently when a catch-all route hid the "no route matches" warning. Each such glob
/// is warned about, at its route, naming the closest documented type or family.
#[test]
fn check_config_warns_of_a_glob_no_documented_type_matches() {
    let dir = tempdir();
    let path = dir.path().join("hookroute.toml");
    std::fs::write(
        &path,
        format!(
            r#"[storage]
path = "db.sqlite"

[sources.cl]
secret = "{CL_SECRET}"

[sinks.log]
type = "file"
path = "out.jsonl"

[[routes]]
name = "policies"
events = ["policies.*", "policy.published", "scan.complete", "*.completed", "assesment.scored"]
sinks = ["log"]

[[routes]]
name = "everything else"
events = ["*"]
sinks = ["log"]
"#
        ),
    )
    .unwrap();
    let out = hookroute(&["check-config", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let warnings: Vec<&str> = std::str::from_utf8(&out.stdout)
        .unwrap()
        .lines()
        .filter_map(|line| line.strip_prefix("warning: "))
        .collect();
    let warned = |j: usize, glob: &str, closest: &str| {
        format!(
            "routes[0] (\"policies\").events[{j}]: \"{glob}\" matches none of the event types the senders document; did you mean \"{closest}\"? (If it is a type they added since, ignore this.)"
        )
    };
    assert_eq!(
        warnings,
        [
            warned(0, "policies.*", "policy.*"),
            warned(2, "scan.complete", "scan.completed"),
            warned(4, "assesment.scored", "assessment.scored"),
        ],
        "{}",
        text(&out)
    );
}

#[tokio::test]
async fn send_signs_and_delivers_a_sample() {
    let dir = tempdir();
    let rest = format!(
        "{}\n[sources.scorecard]\nscheme = \"token\"\nsecret = \"tok\"\n",
        standard_rest(dir.path())
    );
    let daemon = Daemon::start(dir.path(), &config(dir.path(), NO_LIMITS, &rest));
    let config = daemon.config_path.to_str().unwrap().to_owned();
    let url = daemon.url("/hooks/cl");
    let sample_path = format!(
        "{}/tests/fixtures/compliancelayer-scan.completed.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let send = |source: &str, file: &str| {
        hookroute(
            &[
                "send", "--config", &config, "--source", source, file, "--url", &url,
            ],
            &[],
        )
    };

    let out = send("cl", &sample_path);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("202"), "{}", text(&out));
    let again = send("cl", &sample_path);
    assert!(again.status.success());
    assert!(text(&again).contains("duplicate"), "{}", text(&again));
    let lines = wait_lines(&dir.path().join("events.jsonl"), 1).await;
    assert_eq!(
        lines[0]["sender_delivery"],
        "550e8400-e29b-41d4-a716-446655440000"
    );

    // Without --url it posts to the configured listen address and the source's own path.
    let scorecard = format!(
        "{}/tests/fixtures/scorecard-policy.published.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let config_with_port = std::fs::read_to_string(&config)
        .unwrap()
        .replace("127.0.0.1:0", &daemon.addr.to_string());
    let path2 = dir.path().join("client.toml");
    std::fs::write(&path2, config_with_port).unwrap();
    let out = hookroute(
        &[
            "send",
            "--config",
            path2.to_str().unwrap(),
            "--source",
            "scorecard",
            &scorecard,
        ],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(daemon.event_count(), 2);

    // A refused delivery is exit 1; an unknown source is a usage error, exit 2.
    let wrong = dir.path().join("wrong.toml");
    std::fs::write(
        &wrong,
        std::fs::read_to_string(&config)
            .unwrap()
            .replace(CL_SECRET, "whsec_wrong"),
    )
    .unwrap();
    let out = hookroute(
        &[
            "send",
            "--config",
            wrong.to_str().unwrap(),
            "--source",
            "cl",
            &sample_path,
            "--url",
            &url,
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("401"), "{}", text(&out));
    let out = send("nope", &sample_path);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out).contains("no source named \"nope\""),
        "{}",
        text(&out)
    );
}

/// Completions for bash, zsh and fish, and a man page, all from the command definitions.
#[test]
fn completions_and_the_man_page_come_from_the_commands() {
    for (shell, marker) in [
        ("bash", "_hookroute()"),
        ("zsh", "#compdef hookroute"),
        ("fish", "complete -c hookroute"),
    ] {
        let out = hookroute(&["completions", shell], &[]);
        assert!(out.status.success(), "{shell}: {}", text(&out));
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(script.contains(marker), "{shell}: {script}");
        assert!(
            script.contains("route-test") && script.contains("dead-letter"),
            "{shell}"
        );
    }
    // The bash script is valid bash.
    let dir = tempdir();
    let bash = dir.path().join("hookroute.bash");
    std::fs::write(&bash, hookroute(&["completions", "bash"], &[]).stdout).unwrap();
    let checked = Command::new("bash").arg("-n").arg(&bash).status().unwrap();
    assert!(checked.success());

    let man = hookroute(&["man"], &[]);
    assert!(man.status.success());
    let page = String::from_utf8_lossy(&man.stdout);
    assert!(
        page.starts_with(".ie") || page.contains(".TH hookroute"),
        "{page}"
    );
    for command in ["serve", "check\\-config", "route\\-test", "deliveries"] {
        assert!(
            page.contains(command),
            "{command} missing from the man page"
        );
    }
    // #24.10: every page the main page refers to (`hookroute\-serve(1)`) exists.
    let pages = dir.path().join("man");
    let written = hookroute(&["man", "--dir", pages.to_str().unwrap()], &[]);
    assert!(written.status.success(), "{}", text(&written));
    let referred: Vec<String> = page
        .split("hookroute\\-")
        .skip(1)
        .filter_map(|rest| rest.split_once("(1)"))
        .map(|(name, _)| format!("hookroute-{}.1", name.replace("\\-", "-")))
        .collect();
    assert!(referred.len() >= 8, "{referred:?}");
    for name in &referred {
        assert!(
            pages.join(name).is_file(),
            "{name} is referred to but not written"
        );
    }
    assert!(pages.join("hookroute-deliveries-list.1").is_file());
}

/// In an incident the operator's shell rarely has the daemon's secrets: the tools work
/// without them (and from any directory: a relative `storage.path` is the config file's, as
/// is a relative file-sink path, whatever directory the daemon starts in).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tools_need_no_secret_and_no_particular_directory() {
    let dir = tempdir();
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nrate_limit = {{ enabled = false }}\n\n[storage]\npath = \"data/hookroute.db\"\n\n[sources.cl]\nsecret_env = \"HOOKROUTE_TEST_CL_SECRET\"\n\n[sinks.chat]\ntype = \"slack\"\nwebhook_url = {{ env = \"HOOKROUTE_TEST_SLACK_URL\" }}\n\n[sinks.archive]\ntype = \"file\"\npath = \"events.jsonl\"\n\n{CATCH_ALL}"
    );
    let config = write_config(dir.path(), &toml);
    let env = [
        ("HOOKROUTE_TEST_CL_SECRET", CL_SECRET),
        (
            "HOOKROUTE_TEST_SLACK_URL",
            "http://127.0.0.1:1/services/T/B/X",
        ),
    ];
    let daemon = Daemon::start_with(dir.path(), &config, &env);
    let reply = daemon.accept_cl(&scan_body("incident")).await;
    let id = reply.json["id"].to_string();
    assert!(
        dir.path().join("data/hookroute.db").exists(),
        "relative to the config file"
    );
    // The daemon runs in the crate's directory; the file is the config file's neighbour.
    wait_lines(&dir.path().join("events.jsonl"), 1).await;
    daemon.terminate();

    let elsewhere = tempdir();
    let tool = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(&config)
            .current_dir(elsewhere.path())
            .env_remove("HOOKROUTE_TEST_CL_SECRET")
            .env_remove("HOOKROUTE_TEST_SLACK_URL")
            .output()
            .unwrap();
        (out.status.code(), text(&out))
    };
    let (code, out) = tool(&["deliveries", "list"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("scan.completed") && out.contains("succeeded"),
        "{out}"
    );
    assert_eq!(tool(&["deliveries", "show", &id]).0, Some(0));
    let (code, out) = tool(&["replay", &id, "--sink", "archive"]);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(tool(&["dead-letter", "retry", "--all"]).0, Some(0));
    // check-config still reads every secret: what it accepts, serve can run.
    let (code, out) = tool(&["check-config"]);
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("HOOKROUTE_TEST_CL_SECRET") && out.contains("HOOKROUTE_TEST_SLACK_URL"),
        "{out}"
    );
}

/// systemd credentials (`LoadCredential=`): a source's `secret_credential`, a sink secret's
/// `credential`, and `%d/` in a secret file's path all read `$CREDENTIALS_DIRECTORY`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_come_from_systemd_credentials() {
    let dir = tempdir();
    let creds = dir.path().join("credentials");
    std::fs::create_dir(&creds).unwrap();
    std::fs::write(creds.join("cl-secret"), format!("{CL_SECRET}\n")).unwrap();
    std::fs::write(
        creds.join("signing"),
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    )
    .unwrap();
    let receiver = crate::recorder::Recorder::start().await;
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nrate_limit = {{ enabled = false }}\n\n[storage]\npath = \"{}\"\n\n[sources.cl]\nsecret_credential = \"cl-secret\"\n\n[sinks.forward]\ntype = \"http\"\nurl = \"{}\"\nsign = {{ credential = \"signing\" }}\n\n[[routes]]\nname = \"all\"\nevents = [\"*\"]\nsinks = [\"forward\"]\n",
        dir.path().join("hookroute.db").display(),
        receiver.url("/in")
    );
    let config = write_config(dir.path(), &toml);
    let creds_env = [("CREDENTIALS_DIRECTORY", creds.to_str().unwrap())];
    let daemon = Daemon::start_with(dir.path(), &config, &creds_env);
    daemon.accept_cl(&scan_body("credential")).await;
    eventually(|| match receiver.requests().len() {
        1 => Ok(()),
        n => Err(format!("{n} requests")),
    })
    .await;
    assert!(
        receiver.requests()[0]
            .headers
            .contains_key("webhook-signature")
    );
    drop(daemon);

    // `%d/` in a file path is the same directory.
    let with_d = toml.replace(
        "secret_credential = \"cl-secret\"",
        "secret_file = \"%d/cl-secret\"",
    );
    let config = write_config(dir.path(), &with_d);
    let out = hookroute(
        &["check-config", "--config", config.to_str().unwrap()],
        &creds_env,
    );
    assert!(out.status.success(), "{}", text(&out));
    // Without the directory (not run by systemd), each problem says why.
    let out = hookroute(&["check-config", "--config", config.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out).contains("CREDENTIALS_DIRECTORY is not set"),
        "{}",
        text(&out)
    );
    assert!(text(&out).contains("sinks.forward.sign"), "{}", text(&out));
}

/// A daemon's directory (readable by all), its config file and its database, after it stored
/// `body` and stopped.
async fn stopped_after(body: &[u8]) -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let dir = tempdir();
    mode(dir.path(), 0o755);
    let config = write_config(
        dir.path(),
        &config(dir.path(), NO_LIMITS, &standard_rest(dir.path())),
    );
    let daemon = Daemon::start_with(dir.path(), &config, &[]);
    daemon.accept_cl(body).await;
    daemon.terminate();
    let db = dir.path().join("hookroute.db");
    assert!(db.exists());
    (dir, config, db)
}

fn mode(path: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The tools run by someone the permissions apply to: `nobody` when the tests run as root (who
/// may read and write anything), else us.
fn someone_else() -> Command {
    if rustix::process::geteuid().is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", BIN]);
        c
    } else {
        Command::new(BIN)
    }
}

/// `deliveries list` and `show` only read: they work on a database they may not write, and
/// leave it and its WAL as they were; `replay`, which writes, says it may not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_commands_work_on_a_database_they_may_not_write() {
    let (dir, config, db) = stopped_after(&scan_body("kept")).await;
    let before = std::fs::read(&db).unwrap();
    // The daemon leaves its WAL and shared-memory index beside the database, and a reader
    // takes its turn through them: those it may write, the database itself not.
    mode(&config, 0o644);
    mode(&db, 0o444);
    for suffix in ["-wal", "-shm"] {
        mode(&dir.path().join(format!("hookroute.db{suffix}")), 0o666);
    }
    mode(dir.path(), 0o755);
    let run = |args: &[&str]| {
        let out = someone_else()
            .args(args)
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        (out.status.code(), text(&out))
    };
    let (code, listed) = run(&["deliveries", "list", "--json"]);
    assert_eq!(code, Some(0), "{listed}");
    assert!(listed.contains(r#""delivery_id":"kept""#), "{listed}");
    let (code, shown) = run(&["deliveries", "show", "1"]);
    assert_eq!(code, Some(0), "{shown}");
    assert!(shown.contains("kept"), "{shown}");
    let (code, refused) = run(&["replay", "1", "--sink", "archive"]);
    assert_eq!(code, Some(2), "{refused}");
    assert!(refused.contains("permission denied"), "{refused}");
    assert_eq!(std::fs::read(&db).unwrap(), before, "the database changed");
    let wal = std::fs::metadata(dir.path().join("hookroute.db-wal")).unwrap();
    assert_eq!(wal.len(), 0, "a read wrote to the WAL");
}

/// A file the operator cannot read is named, with how to run the tool as the service user,
/// rather than reported as "unable to open database file".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permission_denied_names_the_file_and_the_service_user() {
    let (_dir, config, db) = stopped_after(&scan_body("denied")).await;

    // Someone else: `nobody` when the tests run as root (who may read anything), else us
    // after taking our own permissions away. The database first, then the config file.
    mode(&config, 0o644);
    for unreadable in [&db, &config] {
        mode(unreadable, 0o000);
        let out = someone_else()
            .args(["deliveries", "list", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        let out_text = text(&out);
        assert_eq!(out.status.code(), Some(2), "{out_text}");
        assert!(out_text.contains("permission denied"), "{out_text}");
        assert!(
            out_text.contains(&unreadable.display().to_string()),
            "{out_text}"
        );
        assert!(out_text.contains("sudo -u hookroute"), "{out_text}");
    }
}

/// #24.7: `deliveries list | head -1` panicked ("failed printing to stdout: Broken pipe") in 2
/// of 10 runs. A reader that goes away ends the tool quietly, with success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_stops_reading_ends_the_tools_quietly() {
    use std::io::BufRead as _;
    let dir = tempdir();
    let daemon = Daemon::start(
        dir.path(),
        &config(dir.path(), NO_LIMITS, &standard_rest(dir.path())),
    );
    // A payload whose pretty print is far larger than a pipe's buffer.
    let data: serde_json::Map<String, serde_json::Value> = (0..20_000)
        .map(|i| (format!("field_{i}"), serde_json::Value::from(i)))
        .collect();
    let body = serde_json::json!({"id": "wide", "type": "scan.completed", "data": data});
    daemon.accept_cl(body.to_string().as_bytes()).await;
    for _ in 0..5 {
        let mut child = Command::new(BIN)
            .args(["deliveries", "show", "1", "--config"])
            .arg(&daemon.config_path)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        assert!(first.starts_with("event 1:"), "{first}");
        // The reader is gone now.
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{:?}: {stderr}", out.status);
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

/// #24.9: `--since` took only durations. It takes a time and a date too, and says what it
/// accepts when it refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_since_takes_a_duration_a_time_or_a_date() {
    let dir = tempdir();
    let daemon = Daemon::start(
        dir.path(),
        &config(dir.path(), NO_LIMITS, &standard_rest(dir.path())),
    );
    daemon.accept_cl(&scan_body("dated")).await;
    let config = daemon.config_path.to_str().unwrap().to_owned();
    let rows = |since: &str| {
        let out = hookroute(
            &[
                "deliveries",
                "list",
                "--json",
                "--since",
                since,
                "--config",
                &config,
            ],
            &[],
        );
        assert!(out.status.success(), "{since}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).lines().count()
    };
    let tomorrow = (jiff::Timestamp::now() + jiff::SignedDuration::from_hours(24)).to_string();
    assert_eq!(rows("1h"), 1);
    assert_eq!(rows("2020-01-01"), 1);
    assert_eq!(rows("2020-01-01T00:00:00Z"), 1);
    assert_eq!(rows(&tomorrow), 0);
    assert_eq!(rows(&tomorrow[..10]), 0);
    let refused = hookroute(
        &[
            "deliveries",
            "list",
            "--since",
            "yesterday",
            "--config",
            &config,
        ],
        &[],
    );
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        text(&refused).contains("a date (\"2026-12-05\")"),
        "{}",
        text(&refused)
    );
}

/// #24.3: `send` read every secret of the configuration, so it could not test-fire on a host
/// where the others are systemd credentials. It reads the chosen source's only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_reads_only_the_secret_it_signs_with() {
    let dir = tempdir();
    let receiver = crate::recorder::Recorder::start().await;
    let configured = config(
        dir.path(),
        "",
        &format!(
            "[sources.cl]\nsecret = \"{CL_SECRET}\"\n\n[sources.scorecard]\nscheme = \"token\"\nheader = \"X-Webhook-Token\"\nsecret_credential = \"scorecard-token\"\n\n[sinks.slack]\ntype = \"slack\"\nwebhook_url = {{ env = \"HOOKROUTE_TEST_UNSET_SLACK_URL\" }}\n"
        ),
    );
    let path = write_config(dir.path(), &configured);
    let sample = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/compliancelayer-scan.completed.json"
    );
    let config = path.to_str().unwrap();
    let checked = hookroute(&["check-config", "--config", config], &[]);
    assert_eq!(checked.status.code(), Some(2), "the daemon needs them all");
    let sent = hookroute(
        &[
            "send",
            "--config",
            config,
            "--source",
            "cl",
            sample,
            "--url",
            &receiver.url("/in"),
        ],
        &[],
    );
    assert!(sent.status.success(), "{}", text(&sent));
    let request = &receiver.requests()[0];
    let signature = request.headers["x-compliancelayer-signature"]
        .to_str()
        .unwrap();
    assert_eq!(signature, hmac_hex(CL_SECRET, &[&request.body]));
}

/// `deliveries list` narrows by route and by a type glob, and goes on below an event
/// (`--before`, the next page after a listing's last event).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_list_narrows_by_route_and_type_and_pages_by_event() {
    let dir = tempdir();
    let rest = format!(
        "{}\n[[routes]]\nname = \"alerts\"\nevents = [\"alert.*\"]\nsinks = [\"archive\"]\n",
        standard_rest(dir.path()).replace(
            "sinks = [\"archive\"]\n",
            "sinks = [\"archive\"]\ncontinue = true\n"
        )
    );
    let daemon = InProcess::start(dir.path(), &config(dir.path(), "", &rest)).await;
    ready(&daemon).await;
    for id in ["s1", "s2"] {
        daemon.accept_cl(&scan_body(id)).await;
    }
    let alert = serde_json::json!({"id": "a1", "type": "alert.triggered", "data": {}});
    daemon.accept_cl(alert.to_string().as_bytes()).await;
    let list = |args: &[&str]| -> Vec<(i64, String, String)> {
        let out = Command::new(BIN)
            .args(["deliveries", "list", "--json", "--config"])
            .arg(dir.path().join("config.toml"))
            .args(args)
            .output()
            .unwrap();
        stdout(&out)
            .lines()
            .map(|line| {
                let row: serde_json::Value = serde_json::from_str(line).unwrap();
                (
                    row["event_id"].as_i64().unwrap(),
                    row["type"].as_str().unwrap().to_owned(),
                    row["route"].as_str().unwrap_or("-").to_owned(),
                )
            })
            .collect()
    };
    let alerts = list(&["--type", "alert.*"]);
    assert_eq!(alerts.len(), 2, "both routes' jobs: {alerts:?}");
    assert!(
        alerts
            .iter()
            .all(|(id, kind, _)| *id == 3 && kind == "alert.triggered")
    );
    assert_eq!(
        list(&["--route", "alerts"]),
        [(3, "alert.triggered".to_owned(), "alerts".to_owned())]
    );
    let older: Vec<i64> = list(&["--before", "3"]).iter().map(|row| row.0).collect();
    assert_eq!(older, [2, 1]);
    daemon.stop().await;
}
