//! The files an operator installs: the systemd unit and the logrotate snippet.

const UNIT: &str = include_str!("../../systemd/hookroute.service");
const LOGROTATE: &str = include_str!("../../systemd/hookroute.logrotate");

/// The values of `key=` lines in the unit, in order.
fn settings(key: &str) -> Vec<&'static str> {
    let prefix = format!("{key}=");
    UNIT.lines()
        .filter_map(|l| l.strip_prefix(prefix.as_str()))
        .collect()
}

#[test]
fn a_reload_checks_the_configuration_before_signalling() {
    let start = settings("ExecStart");
    let config = start[0]
        .split("--config ")
        .nth(1)
        .expect("ExecStart names its configuration");
    let reload = settings("ExecReload");
    assert_eq!(reload.len(), 2, "{reload:?}");
    assert!(
        reload[0].contains("check-config") && reload[0].ends_with(config),
        "first check {config}: {reload:?}"
    );
    assert!(reload[1].contains("kill -HUP $MAINPID"), "{reload:?}");
}

#[test]
fn logrotate_rotates_the_file_sinks_without_signalling() {
    assert!(
        LOGROTATE.contains("/var/lib/hookroute/*.jsonl {"),
        "{LOGROTATE}"
    );
    assert!(!LOGROTATE.contains("postrotate"), "no signal is needed");
    assert!(
        !LOGROTATE.contains("copytruncate"),
        "a truncated file would be rewritten mid-line"
    );
}
