//! Validation: every problem at once with its key path, the defaults, and which template a
//! message gets.

use super::*;
use crate::signature::Scheme;

/// Loads `toml` from a file in a fresh directory.
fn load_text(toml: &str) -> Result<Config, ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, toml).unwrap();
    load(&path)
}

/// The problems with `toml`, each as `line:column: key: message` (the file's name taken off).
fn problems(toml: &str) -> Vec<String> {
    match load_text(toml) {
        Err(ConfigError::Invalid { file, problems, .. }) => {
            let prefix = format!("{}:", file.display());
            problems
                .iter()
                .map(|p| p.strip_prefix(&prefix).unwrap_or(p).to_owned())
                .collect()
        }
        other => panic!("expected problems, got {other:?}"),
    }
}

#[test]
fn every_problem_is_reported_with_its_key_path() {
    let found = problems(
        r#"
[server]
listen = "nowhere"
max_body_bytes = 0

[storage]
dedupe_retention = "7d"
event_retention = "1d"

[sources.cl]
secret = "s"
path = "/healthz"

[sources.scorecard]
scheme = "token"
secret = "t0ken"

[sinks.archive]
type = "file"
path = ""

[[routes]]
name = "a"
events = ["*"]
sinks = ["archive", "nope"]

[[routes]]
name = "a"
events = ["*"]
sources = ["scorecrd"]
sinks = ["archive", "archve"]
"#,
    );
    for expected in [
        "3:1: server.listen: ",
        "4:1: server.max_body_bytes: must be greater than 0",
        "8:1: storage.event_retention: must be at least storage.dedupe_retention",
        "12:1: sources.cl.path: ",
        "20:1: sinks.archive.path: must not be empty",
        "25:21: routes[0] (\"a\").sinks[1]: unknown sink \"nope\"",
        "31:21: routes[1] (\"a\").sinks[1]: unknown sink \"archve\"; did you mean \"archive\"?",
        "30:12: routes[1] (\"a\").sources[0]: unknown source \"scorecrd\"; did you mean \"scorecard\"?",
        "27:1: routes[1] (\"a\"): another route has the same name",
    ] {
        assert!(
            found.iter().any(|p| p.starts_with(expected)),
            "{expected:?} not in {found:#?}"
        );
    }
    assert_eq!(found.len(), 9, "{found:#?}");
    assert!(
        !found[5].contains("did you mean"),
        "nothing close to \"nope\": {found:#?}"
    );
}

#[test]
fn defaults_fill_what_is_left_out() {
    let config = load_text("[sources.cl]\nsecret = \"s\"\n").unwrap();
    assert_eq!(config.server.listen, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(config.server.max_body_bytes, 1024 * 1024);
    assert_eq!(config.sources[0].path, "/hooks/cl");
    assert!(matches!(
        config.sources[0].verifier.scheme(),
        Scheme::ComplianceLayer {
            tolerance: raw::DEFAULT_TOLERANCE,
            require_timestamp: false
        }
    ));
    assert_eq!(config.storage.max_batch, 512);
}

#[test]
fn a_routes_template_for_the_sink_type_wins_over_the_sinks_own() {
    let config = load_text(
        r#"
[sources.cl]
secret = "s"

[sinks.console]
type = "log"
template = { text = "sink: {{ type }}" }

[sinks.other]
type = "log"

[[routes]]
name = "with"
events = ["x.*"]
sinks = ["console"]
templates = { log = { text = "route: {{ type }}" } }

[[routes]]
name = "without"
events = ["*"]
sinks = ["console", "other"]
"#,
    )
    .unwrap();
    let routing = &config.routing;
    let event = crate::event::Event::parse("cl", br#"{"type": "x.y"}"#, None, None).unwrap();
    let title = |route: &str, sink: &str| routing.message((route, sink, "log"), &event, None).title;
    assert_eq!(title("with", "console"), "route: x.y");
    assert_eq!(title("without", "console"), "sink: x.y");
    assert_eq!(routing.template_for("without", "other", "log"), None);
    assert_eq!(
        title("without", "other"),
        "x.y from cl",
        "the default for the family"
    );
}

/// serde stops at the first error; the report does not: unknown keys and wrong types in
/// several tables, and several in one table, each at its line and column, in file order.
#[test]
fn every_deserialization_problem_is_reported_at_its_field() {
    let found = problems(
        r#"
[server]
max_body_bytes = "lots"
colour = "blue"

[sources.cl]
secret = "s"
tolerence = "5m"

[sinks.email-ciso]
type = "email"
url = "smtp://127.0.0.1"
from = "a@example.test"
to = 42
smtp_host = "x"

[sinks.ops]
type = "slakc"

[[routes]]
name = "r"
events = "scan.*"
sinks = ["ops"]
"#,
    );
    assert_eq!(
        found,
        [
            "3:1: server.max_body_bytes: invalid type: found string \"lots\", expected usize",
            "4:1: server.colour: unknown key `colour`; known keys: listen, max_body_bytes, \
             trusted_proxies, header_read_timeout, body_read_timeout, shutdown_timeout, rate_limit",
            "8:1: sources.cl.tolerence: unknown key `tolerence`; did you mean \"tolerance\"?",
            "14:1: sinks.email-ciso.to: invalid type: found signed int `42`, expected a sequence",
            "15:1: sinks.email-ciso.smtp_host: unknown key `smtp_host`; known keys: url, starttls, \
             username, password, ca_file, allow_plaintext_auth, from, to, template, enrich, digest, delivery",
            "18:1: sinks.ops.type: unknown value \"slakc\"; did you mean \"slack\"?",
            "22:1: routes[0].events: invalid type: found string \"scan.*\", expected a sequence",
        ]
    );
}

#[test]
fn every_syntax_error_is_reported_at_its_line_and_column() {
    let found = problems("[server]\nlisten = \n\n[storage]\npath = \"x\nmax_batch = 1\n");
    assert!(found.len() >= 2, "{found:#?}");
    assert!(found[0].starts_with("2:10: "), "{found:#?}");
    assert!(found.iter().any(|p| p.starts_with("5:")), "{found:#?}");
}

#[test]
fn a_rules_files_problems_name_that_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let rules = dir.path().join("rules.toml");
    std::fs::write(
        &config,
        "rules_file = \"rules.toml\"\n[sources.cl]\nsecret = \"s\"\n[sinks.out]\ntype = \"log\"\n",
    )
    .unwrap();
    std::fs::write(
        &rules,
        "[[routes]]\nname = \"a\"\nevents = [\"*\"]\nsinks = [\"out\"]\n\n\
         [[routes]]\nname = \"b\"\nevents = [\"*\"]\nsinks = [\"uot\"]\nwhen = \"score < 7\"\n",
    )
    .unwrap();
    let Err(ConfigError::Invalid { problems, .. }) = load(&config) else {
        panic!("expected problems");
    };
    let at = format!("{}:", rules.display());
    assert_eq!(problems.len(), 2, "{problems:#?}");
    assert!(
        problems[0].starts_with(&format!(
            "{at}9:10: routes[1] (\"b\").sinks[0]: unknown sink"
        )),
        "{problems:#?}"
    );
    assert!(
        problems[1].starts_with(&format!(
            "{at}10:1: routes[1] (\"b\").when: unknown variable"
        )),
        "{problems:#?}"
    );
}

/// `url` selects PostgreSQL; a password never goes in it, and one database is named, not two.
#[test]
fn a_postgres_url_is_checked_and_never_holds_the_password() {
    let with = |storage: &str| format!("[storage]\n{storage}\n\n[sources.cl]\nsecret = \"s\"\n");
    let config = load_text(&with(
        "url = \"postgres://hookroute@db.internal/hookroute?sslmode=verify-full\"\npassword = { env = \"PGPASS_TEST\" }",
    ))
    .unwrap();
    let Backend::Postgres(pg) = &config.storage.backend else {
        panic!("{:?}", config.storage.backend)
    };
    assert_eq!(pg.pool_size, 16);
    assert_eq!(
        config.storage.describe(),
        "postgres://hookroute@db.internal/hookroute?sslmode=verify-full"
    );

    let found = problems(&with("url = \"postgres://hookroute:hunter2@db/hookroute\""));
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(
        found[0].contains("storage.url: holds a password"),
        "{found:?}"
    );
    assert!(
        !found[0].contains("hunter2"),
        "the message never repeats it"
    );
    let found = problems(&with("url = \"postgres://db/h?password=hunter2\""));
    assert!(found[0].contains("holds a password") && !found[0].contains("hunter2"));

    let found = problems(&with("url = \"mysql://db/h\""));
    assert!(found[0].contains("not a PostgreSQL URL"), "{found:?}");
    let found = problems(&with("url = \"postgres://db/h\"\npath = \"h.db\""));
    assert!(found[0].contains("give path (SQLite) or url (PostgreSQL), not both"));
    let found = problems(&with("path = \"h.db\"\npassword = { value = \"x\" }"));
    assert!(
        found[0].contains("storage.password: only PostgreSQL"),
        "{found:?}"
    );
}

#[test]
fn a_compliancelayer_source_may_name_its_api() {
    let config = load_text(
        r#"
[sources.cl]
secret = "whsec_x"
api = { key = { env = "HOOKROUTE_TEST_API_KEY_UNSET" }, reconcile = "10m" }
"#,
    );
    // The key is a secret: an unset variable is a problem named by its key path.
    let err = config.unwrap_err().to_string();
    assert!(err.contains("sources.cl.api.key"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("api.key"), "cl_live_0123456789\n").unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(
        &path,
        r#"
[sources.cl]
secret = "whsec_x"
api = { key = { file = "api.key" }, base_url = "http://127.0.0.1:9/v1", reconcile = "10m" }
"#,
    )
    .unwrap();
    let config = load(&path).unwrap();
    let api = config.sources[0].api.as_ref().unwrap();
    assert_eq!(api.key.as_deref(), Some("cl_live_0123456789"));
    assert_eq!(api.base_url.as_str(), "http://127.0.0.1:9/v1");
    assert_eq!(api.reconcile, Some(Duration::from_secs(600)));
    assert_eq!(api.lookback, Duration::from_secs(24 * 3600));
    assert!(!format!("{api:?}").contains("cl_live"), "never the key");
    // The tools read no secret.
    let tools = load_for_tools(&path).unwrap();
    assert_eq!(tools.sources[0].api.as_ref().unwrap().key, None);
}

#[test]
fn an_api_is_checked_with_the_rest() {
    let found = problems(
        r#"
[sources.cl]
secret = "whsec_x"
api = { key = { value = "cl_x" }, base_url = "ftp://x", reconcile = "5s" }

[sources.scorecard]
scheme = "token"
secret = "t0ken-t0ken"
api = { key = { value = "cl_y" } }
"#,
    );
    let all = found.join("\n");
    assert!(all.contains("sources.cl.api.base_url"), "{all}");
    assert!(
        all.contains("sources.scorecard.api: does not apply to scheme \"token\""),
        "{all}"
    );
    let found = problems(
        r#"
[sources.cl]
secret = "whsec_x"
api = { key = { value = "cl_x" }, reconcile = "5s" }
"#,
    );
    assert!(
        found
            .join("\n")
            .contains("sources.cl.api.reconcile: at least 1m"),
        "{found:?}"
    );
}

#[test]
fn enrichment_is_checked_and_a_route_no_api_serves_is_warned_of() {
    let found = problems(
        r#"
[sources.cl]
secret = "whsec_x"
api = { key = { value = "cl_x" }, enrich_wait = "0s" }

[sinks.log]
type = "log"

[[routes]]
name = "failing"
events = ["scan.completed"]
sinks = ["log"]
enrich = ["summary"]
"#,
    )
    .join("\n");
    assert!(
        found.contains("sources.cl.api.enrich_wait: between 1ms and 1m"),
        "{found}"
    );
    assert!(
        found.contains("enrich"),
        "an unknown kind is named: {found}"
    );

    let config = load_text(
        r#"
[sources.cl]
secret = "whsec_x"

[sources.scorecard]
scheme = "token"
secret = "t0ken-t0ken"

[sinks.log]
type = "log"

[[routes]]
name = "failing"
events = ["scan.completed"]
sinks = ["log"]
enrich = ["report", "pdf"]
enrich_required = true
"#,
    )
    .unwrap();
    let route = &config.routing.table.routes()[0];
    assert_eq!(
        route.enrich,
        [crate::rules::Enrich::Report, crate::rules::Enrich::Pdf]
    );
    assert!(route.enrich_required);
    let warnings = config.warnings().join("\n");
    assert!(
        warnings.contains("route \"failing\" asks for enrichment, but no source it takes"),
        "{warnings}"
    );
}
