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
fn the_unit_asks_for_the_watchdog() {
    assert_eq!(settings("WatchdogSec"), ["30s"]);
    assert_eq!(settings("Type"), ["notify"]);
}

/// #23.13: `SystemCallFilter=~@privileged @resources` without an error number killed an exec
/// hook with SIGSYS when it called `fchown` (`cp -p`), `setrlimit` or `nice`; and the unit's
/// `RUST_LOG=info` disagreed with the daemon's documented default.
#[test]
fn the_sandbox_refuses_calls_with_an_error_and_logs_at_the_default_level() {
    assert!(
        settings("SystemCallFilter")
            .iter()
            .any(|f| f.starts_with('~')),
        "the unit denies some calls"
    );
    assert_eq!(settings("SystemCallErrorNumber"), ["EPERM"]);
    assert_eq!(
        settings("Environment"),
        [format!("RUST_LOG={}", hookroute::cli::DEFAULT_LOG_FILTER)]
    );
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

/// With `WatchdogSec=`, the daemon pings systemd only while its writer commits and its engine
/// turns: a writer that cannot commit stops the pings (and systemd would restart it), and they
/// resume when it can again. systemd is played by a datagram socket, as `sd_notify` expects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watchdog_is_pinged_only_while_the_writer_makes_progress() {
    use std::os::unix::net::UnixDatagram;
    use std::time::{Duration, Instant};

    use crate::harness::*;

    let dir = tempdir();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let config = write_config(
        dir.path(),
        &config(dir.path(), NO_LIMITS, &standard_rest(dir.path())),
    );
    let env = [
        ("NOTIFY_SOCKET", socket_path.to_str().unwrap()),
        ("WATCHDOG_USEC", "1000000"),
    ];
    let daemon = Daemon::start_with(dir.path(), &config, &env);
    // Counts the watchdog pings over `span`.
    let pings = |span: Duration| {
        let deadline = Instant::now() + span;
        let mut pings = 0;
        let mut buf = [0u8; 256];
        while Instant::now() < deadline {
            if let Ok(n) = socket.recv(&mut buf) {
                pings += String::from_utf8_lossy(&buf[..n])
                    .matches("WATCHDOG=1")
                    .count();
            }
        }
        pings
    };
    assert!(pings(Duration::from_millis(2500)) >= 2, "pinged while well");

    // Another process holds the database's write lock: the writer cannot commit.
    let blocker = daemon.db();
    blocker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    pings(Duration::from_millis(700)); // a check under way may still pass
    assert_eq!(pings(Duration::from_millis(2500)), 0, "pinged while wedged");
    blocker.execute_batch("COMMIT").unwrap();
    assert!(pings(Duration::from_millis(2500)) >= 2, "pings resumed");
}
