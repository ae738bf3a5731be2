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

fn problems(toml: &str) -> Vec<String> {
    match load_text(toml) {
        Err(ConfigError::Invalid { problems, .. }) => problems,
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
        "server.listen: ",
        "server.max_body_bytes: must be greater than 0",
        "storage.event_retention: must be at least storage.dedupe_retention",
        "sources.cl.path: ",
        "sinks.archive.path: must not be empty",
        "routes[0] (\"a\").sinks[1]: unknown sink \"nope\"",
        "routes[1] (\"a\").sinks[1]: unknown sink \"archve\"; did you mean \"archive\"?",
        "routes[1] (\"a\").sources[0]: unknown source \"scorecrd\"; did you mean \"scorecard\"?",
        "routes[1] (\"a\"): another route has the same name",
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
    let title = |route: &str, sink: &str| routing.message(route, sink, "log", &event).title;
    assert_eq!(title("with", "console"), "route: x.y");
    assert_eq!(title("without", "console"), "sink: x.y");
    assert_eq!(routing.template_for("without", "other", "log"), None);
    assert_eq!(
        title("without", "other"),
        "x.y from cl",
        "the default for the family"
    );
}
