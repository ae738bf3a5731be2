//! A throwaway PostgreSQL cluster for the tests: `initdb` into a temporary directory as an
//! unprivileged user, a server on a random loopback port, a database per test. The server runs
//! under a small shell that reads commands (`stop`, `start`) from a pipe this process holds:
//! when the test binary exits, however it exits, the pipe closes and the shell stops the
//! server and removes its files, so no test run leaves a server behind.
//!
//! The cluster asks for a password over TCP (`scram-sha-256`), as a real one does: the daemon
//! connects to `127.0.0.1` with its password in a file. The tests' own queries go through
//! the server's Unix socket with `psql`, a real client beside the daemon's driver.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The role the daemon logs in as, and its password.
pub const USER: &str = "hookroute";
pub const PASSWORD: &str = "test-password-not-a-secret";

/// `nobody`: `initdb` and `postgres` refuse to run as root.
const NOBODY: u32 = 65534;

pub struct Cluster {
    pub port: u16,
    dir: PathBuf,
    bin: PathBuf,
    /// The password, in a file the daemon's configuration names.
    pub password_file: PathBuf,
    control: Mutex<Control>,
}

struct Control {
    _shell: Child,
    commands: ChildStdin,
    acks: BufReader<ChildStdout>,
}

/// The cluster most tests share (one per test binary); each test takes its own database.
pub fn shared() -> &'static Cluster {
    static SHARED: OnceLock<Cluster> = OnceLock::new();
    SHARED.get_or_init(Cluster::start)
}

impl Cluster {
    /// A cluster of its own, for a test that stops and starts the server.
    pub fn start() -> Self {
        let bin = bin_dir();
        let root = tempfile::Builder::new()
            .prefix("hookroute-pg-")
            .tempdir()
            .unwrap()
            .keep();
        let as_root = is_root();
        if as_root {
            std::os::unix::fs::chown(&root, Some(NOBODY), Some(NOBODY)).unwrap();
        }
        let password_file = root.join("password");
        std::fs::write(&password_file, format!("{PASSWORD}\n")).unwrap();
        let status = command(&bin.join("initdb"), as_root)
            .arg("-D")
            .arg(root.join("data"))
            .args([
                "-U",
                USER,
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ])
            .arg(format!("--pwfile={}", password_file.display()))
            .args([
                "-E",
                "UTF8",
                "--no-locale",
                "--no-sync",
                "--no-instructions",
            ])
            .stdout(Stdio::null())
            .status()
            .expect("run initdb");
        assert!(status.success(), "initdb failed");
        let port = free_port();
        let script = format!(
            r#"
bin=$0 root=$1
start() {{
    "$bin/postgres" -D "$root/data" -p {port} -c listen_addresses=127.0.0.1 -k "$root" \
        -c max_connections=300 -c fsync=on -c synchronous_commit=on >>"$root/server.log" 2>&1 &
    pid=$!
}}
start
echo started
while read -r command; do
    case $command in
        stop) kill -INT "$pid"; wait "$pid";;
        start) start;;
    esac
    echo "$command"
done
kill -INT "$pid" 2>/dev/null
wait
rm -rf "$root"
"#
        );
        let mut shell = command(Path::new("/bin/sh"), as_root)
            .arg("-c")
            .arg(script)
            .arg(&bin)
            .arg(&root)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the PostgreSQL shell");
        let control = Control {
            commands: shell.stdin.take().unwrap(),
            acks: BufReader::new(shell.stdout.take().unwrap()),
            _shell: shell,
        };
        let cluster = Self {
            port,
            dir: root,
            bin,
            password_file,
            control: Mutex::new(control),
        };
        cluster.ack("started");
        cluster.wait_ready();
        cluster
    }

    /// Stops the server (a fast shutdown: clients are disconnected), as an outage would.
    pub fn stop(&self) {
        self.send("stop");
    }

    /// Starts the server again after [`stop`](Self::stop), and waits until it answers.
    pub fn restart(&self) {
        self.send("start");
        self.wait_ready();
    }

    fn send(&self, command: &str) {
        {
            let mut control = self.control.lock().unwrap();
            writeln!(control.commands, "{command}").unwrap();
        }
        self.ack(command);
    }

    fn ack(&self, expected: &str) {
        let mut line = String::new();
        let mut control = self.control.lock().unwrap();
        control.acks.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), expected, "PostgreSQL shell: {}", self.log());
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let ready = Command::new(self.bin.join("pg_isready"))
                .args(["-q", "-h"])
                .arg(&self.dir)
                .args(["-p", &self.port.to_string()])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("PostgreSQL did not start: {}", self.log());
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// A new, empty database; returns the URL the daemon is configured with (no password:
    /// that is in [`password_file`](Self::password_file)).
    pub fn database(&self) -> String {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "t{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        self.psql("postgres", &format!("CREATE DATABASE {name}"));
        self.url(&name)
    }

    /// The URL of `database`.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/{database}", self.port)
    }

    /// Runs `sql` in `database` with `psql`; returns what it printed, one row per line,
    /// columns separated by `|`.
    pub fn psql(&self, database: &str, sql: &str) -> String {
        let output = Command::new(self.bin.join("psql"))
            .arg("-h")
            .arg(&self.dir)
            .args(["-p", &self.port.to_string(), "-U", USER, "-d", database])
            .args(["-AtqX", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .output()
            .expect("run psql");
        assert!(
            output.status.success(),
            "{sql}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    /// Starts `psql` running `sql` in `database` and returns at once: for a session that holds
    /// a lock while the test goes on.
    pub fn psql_in_background(&self, database: &str, sql: &str) -> std::process::Child {
        Command::new(self.bin.join("psql"))
            .arg("-h")
            .arg(&self.dir)
            .args(["-p", &self.port.to_string(), "-U", USER, "-d", database])
            .args(["-AtqX", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("run psql")
    }

    /// The rows `sql` selects in `database`, as the table `result` of an in-memory SQLite
    /// database: integers as integers, NULL as NULL, everything else as text.
    pub fn query(&self, database: &str, sql: &str) -> rusqlite::Connection {
        const FIELD: char = '\u{1f}';
        const RECORD: char = '\u{1e}';
        const NULL: &str = "\u{1a}";
        let output = Command::new(self.bin.join("psql"))
            .arg("-h")
            .arg(&self.dir)
            .args(["-p", &self.port.to_string(), "-U", USER, "-d", database])
            .args(["-AtqX", "-v", "ON_ERROR_STOP=1"])
            .arg(format!("--field-separator={FIELD}"))
            .arg(format!("--record-separator={RECORD}"))
            .args(["-P", &format!("null={NULL}"), "-c", sql])
            .output()
            .expect("run psql");
        assert!(
            output.status.success(),
            "{sql}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let text = String::from_utf8(output.stdout).unwrap();
        let rows: Vec<Vec<&str>> = text
            .trim_end_matches('\n')
            .split(RECORD)
            .filter(|r| !r.is_empty())
            .map(|r| r.split(FIELD).collect())
            .collect();
        let columns = rows.first().map_or(1, Vec::len);
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        let names: Vec<String> = (0..columns).map(|i| format!("c{i}")).collect();
        conn.execute_batch(&format!("CREATE TABLE result ({})", names.join(", ")))
            .unwrap();
        let marks = vec!["?"; columns].join(", ");
        let mut insert = conn
            .prepare(&format!("INSERT INTO result VALUES ({marks})"))
            .unwrap();
        for row in rows {
            let values: Vec<rusqlite::types::Value> = row
                .into_iter()
                .map(|v| match v {
                    NULL => rusqlite::types::Value::Null,
                    v => v.parse::<i64>().map_or_else(
                        |_| rusqlite::types::Value::Text(v.to_owned()),
                        rusqlite::types::Value::Integer,
                    ),
                })
                .collect();
            insert.execute(rusqlite::params_from_iter(values)).unwrap();
        }
        drop(insert);
        conn
    }
}

/// The database name in a URL [`Cluster::database`] made.
pub fn database_name(url: &str) -> &str {
    url.rsplit('/').next().unwrap()
}

/// `program`, run as `nobody` when the tests run as root.
fn command(program: &Path, as_root: bool) -> Command {
    let mut command = Command::new(program);
    if as_root {
        command.uid(NOBODY).gid(NOBODY).current_dir("/");
    }
    command
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// The newest PostgreSQL server's programs (Debian puts them in
/// `/usr/lib/postgresql/<version>/bin`), or `HOOKROUTE_PG_BIN`.
fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("HOOKROUTE_PG_BIN") {
        return dir.into();
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin).expect(
        "PostgreSQL's server programs were not found: install Debian's postgresql package \
         (tests/run.sh does) or set HOOKROUTE_PG_BIN",
    )
}

/// A port nothing listens on now (the server binds it a moment later).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
