//! Spawns the real `hookroute` binary on an ephemeral loopback port with a temporary
//! directory for its database and sink files, and signs deliveries independently of the
//! daemon's own signer.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use hmac::{KeyInit, Mac};
use hookroute::config::StorageConfig;
use hookroute::store::admin::{Access, Filter, JobDetail, Row, Tools};
use sha2::Sha256;

pub const BIN: &str = env!("CARGO_BIN_EXE_hookroute");
pub const CL_SECRET: &str = "whsec_test_compliancelayer_secret";
pub const CL_SECRET_OLD: &str = "whsec_old_rotated_secret";

/// The daemon's `[server]` and `[storage]` preamble; `server` adds keys to `[server]`. The
/// storage is the backend the test runs on ([`on_both_backends!`]): SQLite in `dir`, or a new
/// database of the shared PostgreSQL cluster, whose name is kept in `dir` for [`db_rows`].
pub fn config(dir: &Path, server: &str, rest: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
shutdown_timeout = "5s"
{server}

{storage}

{rest}
"#,
        storage = storage(dir),
    )
}

/// The database a test's daemons use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

tokio::task_local! {
    /// The backend of the test running in this task (SQLite when not set).
    pub static BACKEND: Backend;
}

/// The backend of the running test.
pub fn backend() -> Backend {
    BACKEND.try_with(|b| *b).unwrap_or(Backend::Sqlite)
}

/// Makes two tests of the async fn `name` (taking nothing), one per backend:
/// `name::sqlite` and `name::postgres`. One test body, two backends.
macro_rules! on_both_backends {
    ($name:ident) => {
        mod $name {
            use $crate::harness::{BACKEND, Backend};

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                BACKEND.scope(Backend::Sqlite, super::$name()).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                BACKEND.scope(Backend::Postgres, super::$name()).await;
            }
        }
    };
}

/// The `[storage]` table for the running test's backend.
fn storage(dir: &Path) -> String {
    match backend() {
        Backend::Sqlite => format!(
            "[storage]\npath = \"{}\"\nbusy_timeout = \"300ms\"",
            dir.join("hookroute.db").display()
        ),
        Backend::Postgres => {
            // The directory's database if it has one: a test restarting its daemon with a
            // fresh configuration means the same database.
            let cluster = crate::postgres::shared();
            let url = match std::fs::read_to_string(dir.join(PG_MARKER)) {
                Ok(name) => cluster.url(&name),
                Err(_) => cluster.database(),
            };
            std::fs::write(dir.join(PG_MARKER), crate::postgres::database_name(&url)).unwrap();
            // A short lease, so a restarted daemon takes over its jobs within the tests' waits.
            format!(
                "[storage]\nurl = \"{url}\"\npassword = {{ file = \"{}\" }}\nlease = \"2s\"",
                cluster.password_file.display()
            )
        }
    }
}

/// In a test's directory, the name of its PostgreSQL database.
pub const PG_MARKER: &str = "postgres-database";

/// A ComplianceLayer source (two live secrets) and a file sink: what most tests need.
pub fn standard_rest(dir: &Path) -> String {
    format!(
        r#"
[sources.cl]
scheme = "compliancelayer"
secret = ["{CL_SECRET}", "{CL_SECRET_OLD}"]

[sinks.archive]
type = "file"
path = "{}"

{CATCH_ALL}"#,
        dir.join("events.jsonl").display()
    )
}

/// Sends every event to the `archive` sink.
pub const CATCH_ALL: &str =
    "[[routes]]\nname = \"everything\"\nevents = [\"*\"]\nsinks = [\"archive\"]\n";

/// No rate limits: for tests that send many failures on purpose.
pub const NO_LIMITS: &str = "rate_limit = { enabled = false }";

/// Where a daemon answers, and its database: what the tests talk to, whether the daemon is a
/// process of its own ([`Daemon`]) or runs in the test ([`InProcess`]).
pub struct Endpoint {
    pub addr: SocketAddr,
    pub dir: PathBuf,
    pub client: reqwest::Client,
    /// The database the daemon was started on, for [`Endpoint::tools`]: read at the start,
    /// as a test may break the configuration file later (to test a reload).
    storage: Option<StorageConfig>,
}

/// The storage settings of the configuration at `path`, read as the operator's tools read it.
fn storage_of(path: &Path) -> Option<StorageConfig> {
    hookroute::config::load_for_tools(path)
        .ok()
        .map(|config| config.storage)
}

/// The real binary, as a child process: for crashes, signals and the command line.
pub struct Daemon {
    child: Child,
    endpoint: Endpoint,
    pub config_path: PathBuf,
    log: Arc<Mutex<Vec<String>>>,
}

impl std::ops::Deref for Daemon {
    type Target = Endpoint;

    fn deref(&self) -> &Endpoint {
        &self.endpoint
    }
}

/// The daemon run in the test's own runtime through `hookroute::run_with_clock`, on a clock
/// the test moves: for behaviour that depends on time, without waiting for it.
pub struct InProcess {
    endpoint: Endpoint,
    pub clock: hookroute::clock::ManualClock,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), hookroute::RunError>>>,
}

impl std::ops::Deref for InProcess {
    type Target = Endpoint;

    fn deref(&self) -> &Endpoint {
        &self.endpoint
    }
}

impl InProcess {
    /// Writes `config` into `dir` and runs the daemon on it, its clock starting now.
    pub async fn start(dir: &Path, config: &str) -> Self {
        let clock = hookroute::clock::ManualClock::new(jiff::Timestamp::now());
        Self::start_on(dir, config, clock).await
    }

    /// [`start`](Self::start) on `clock`: replicas in one test share one.
    pub async fn start_on(dir: &Path, config: &str, clock: hookroute::clock::ManualClock) -> Self {
        let config = hookroute::config::load(&write_config(dir, config)).expect("valid config");
        let listener = tokio::net::TcpListener::bind(config.server.listen)
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let storage = config.storage.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(hookroute::run_with_clock(
            config,
            listener,
            async {
                let _ = stopped.await;
            },
            Arc::new(clock.clone()),
        ));
        Self {
            endpoint: Endpoint {
                addr,
                dir: dir.to_path_buf(),
                client: http_client(),
                storage: Some(storage),
            },
            clock,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Stops the daemon as SIGTERM would, and waits for it.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
}

/// What a command printed, asserting it succeeded (else its output is the failure).
pub fn stdout(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// Waits until the daemon answers (its database open and migrated).
pub async fn ready(daemon: &Endpoint) {
    for _ in 0..200 {
        if daemon.get_status("/readyz").await == 200 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the daemon never became ready");
}

/// The daemons a test runs on one database, on `clock`: one on SQLite (one daemon per
/// file), two replicas on PostgreSQL, each in its own of `dirs` with the configuration
/// `config` writes for it, and ready.
pub async fn replicas(
    dirs: &[tempfile::TempDir; 2],
    config: impl Fn(&Path) -> String,
    clock: &hookroute::clock::ManualClock,
) -> Vec<InProcess> {
    let replicas = match backend() {
        Backend::Sqlite => 1,
        Backend::Postgres => 2,
    };
    let mut daemons = Vec::new();
    for dir in &dirs[..replicas] {
        if let Ok(name) = std::fs::read_to_string(dirs[0].path().join(PG_MARKER)) {
            std::fs::write(dir.path().join(PG_MARKER), name).unwrap();
        }
        let daemon = InProcess::start_on(dir.path(), &config(dir.path()), clock.clone()).await;
        ready(&daemon).await;
        daemons.push(daemon);
    }
    daemons
}

/// Moves `clock` on by `step` every few milliseconds of real time until dropped: for a
/// stretch where the engines should keep looking at the queue (as they do every half second
/// on the wall clock) without the test stepping each look.
pub struct Ticking(tokio::task::JoinHandle<()>);

impl Ticking {
    pub fn start(clock: &hookroute::clock::ManualClock, step: Duration) -> Self {
        let clock = clock.clone();
        Self(tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(20)).await;
                clock.advance(step);
            }
        }))
    }
}

impl Drop for Ticking {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Endpoint {
    /// Runs `read` on the operator's tools over this daemon's database (as its configuration
    /// names it): tests read what was stored through the store's contract, the same on either
    /// backend, not through its tables. On a thread of its own, as the tools block.
    pub fn tools<T: Send>(&self, read: impl FnOnce(&Tools) -> T + Send) -> T {
        let storage = self.storage.as_ref();
        tools_on(storage.expect("a configuration the tools can read"), read)
    }

    /// Every job and routing outcome, newest event first (`deliveries list`).
    pub fn deliveries(&self) -> Vec<Row> {
        self.tools(|tools| tools.list(&everything()).expect("the list reads"))
    }

    /// Every job, with the delivery id of its event and its attempts (`deliveries show` of
    /// each event), ordered by sink.
    pub fn all_jobs(&self) -> Vec<(String, JobDetail)> {
        let mut jobs = self.tools(|tools| {
            let mut jobs = Vec::new();
            let mut events: Vec<(i64, String)> = tools
                .list(&everything())
                .expect("the list reads")
                .into_iter()
                .map(|row| (row.event_id, row.delivery_id))
                .collect();
            events.dedup();
            for (event, delivery_id) in events {
                let detail = tools.show(event).expect("show reads").expect("the event");
                jobs.extend(
                    detail
                        .jobs
                        .into_iter()
                        .map(|job| (delivery_id.clone(), job)),
                );
            }
            jobs
        });
        jobs.sort_by(|a, b| a.1.sink.cmp(&b.1.sink).then(a.1.id.cmp(&b.1.id)));
        jobs
    }

    /// The delivery ids of the events stored.
    pub fn delivery_ids(&self) -> HashSet<String> {
        let rows = self.deliveries();
        rows.into_iter().map(|row| row.delivery_id).collect()
    }

    /// How many events are stored, as the tools list them.
    pub fn event_count(&self) -> usize {
        let events: HashSet<i64> = self.deliveries().iter().map(|row| row.event_id).collect();
        events.len()
    }

    /// How many jobs there are, whatever their status.
    pub fn job_count(&self) -> usize {
        self.deliveries()
            .iter()
            .filter(|row| row.job_id.is_some())
            .count()
    }

    /// The one job of `sink` (the newest, if several), with its attempts (`deliveries show`).
    pub fn job_of(&self, sink: &str) -> JobDetail {
        self.job_where(|row| row.sink.as_deref() == Some(sink))
    }

    /// The only job there is, with its attempts.
    pub fn only_job(&self) -> JobDetail {
        assert_eq!(self.job_count(), 1, "one job: {:?}", self.deliveries());
        self.job_where(|_| true)
    }

    fn job_where(&self, wanted: impl Fn(&Row) -> bool) -> JobDetail {
        let rows = self.deliveries();
        let row = rows
            .iter()
            .find(|row| row.job_id.is_some() && wanted(row))
            .unwrap_or_else(|| panic!("no such job: {rows:?}"));
        let job = row.job_id;
        let event = self.tools(|tools| tools.show(row.event_id).unwrap().expect("the event"));
        event
            .jobs
            .into_iter()
            .find(|detail| Some(detail.id) == job)
            .expect("the job is in its event's details")
    }
}

/// [`Endpoint::tools`] on the database of the configuration in `dir`.
fn tools_at<T: Send>(dir: &Path, read: impl FnOnce(&Tools) -> T + Send) -> T {
    let storage = storage_of(&dir.join("config.toml"));
    tools_on(&storage.expect("a configuration the tools can read"), read)
}

fn tools_on<T: Send>(storage: &StorageConfig, read: impl FnOnce(&Tools) -> T + Send) -> T {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let tools = hookroute::store::open_admin(storage, Access::Read)
                    .expect("the database opens");
                read(&tools)
            })
            .join()
            .expect("the read did not panic")
    })
}

impl Daemon {
    /// Writes `config` into `dir` and starts the daemon on it.
    pub fn start(dir: &Path, config: &str) -> Self {
        Self::start_with(dir, &write_config(dir, config), &[])
    }

    pub fn start_with(dir: &Path, config_path: &Path, env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(config_path)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn hookroute");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let lines = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                // `addr=…` in text lines, `"addr":"…"` in JSON ones.
                let listening = line
                    .contains("listening")
                    .then(|| {
                        line.split("addr=")
                            .nth(1)
                            .or_else(|| line.split("\"addr\":\"").nth(1))
                    })
                    .flatten();
                if let Some(addr) =
                    listening.and_then(|s| s.split(|c: char| c.is_whitespace() || c == '"').next())
                {
                    let _ = tx.send(addr.parse::<SocketAddr>().unwrap());
                }
                lines.lock().unwrap().push(line);
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "daemon did not start; log:\n{}",
                    log.lock().unwrap().join("\n")
                );
            }
        };
        Self {
            child,
            endpoint: Endpoint {
                addr,
                dir: dir.to_path_buf(),
                client: http_client(),
                storage: storage_of(config_path),
            },
            config_path: config_path.to_path_buf(),
            log,
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM and wait for the exit status.
    pub fn terminate(mut self) -> ExitStatus {
        signal(self.child.id(), "TERM");
        wait_timeout(&mut self.child, Duration::from_secs(15))
            .expect("daemon stopped after SIGTERM")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn wait(mut self, limit: Duration) -> Option<ExitStatus> {
        wait_timeout(&mut self.child, limit)
    }
}

impl Endpoint {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// The status `GET path` answers (`/healthz`, `/readyz`).
    pub async fn get_status(&self, path: &str) -> u16 {
        let response = self
            .client
            .get(self.url(path))
            .send()
            .await
            .expect("request");
        response.status().as_u16()
    }

    /// Posts `body` to `path` with JSON content type and the given headers.
    pub async fn post(&self, path: &str, body: &[u8], headers: &[(&str, String)]) -> Reply {
        let mut request = self
            .client
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body.to_vec());
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        Reply::read(request.send().await.expect("request")).await
    }

    /// Posts a ComplianceLayer delivery signed (bare hex) with `CL_SECRET`.
    pub async fn post_cl(&self, body: &[u8]) -> Reply {
        self.post(
            "/hooks/cl",
            body,
            &[("x-compliancelayer-signature", hmac_hex(CL_SECRET, &[body]))],
        )
        .await
    }

    /// Posts a signed ComplianceLayer delivery that must be accepted (202).
    pub async fn accept_cl(&self, body: &[u8]) -> Reply {
        let reply = self.post_cl(body).await;
        assert_eq!(reply.status, 202, "delivery not accepted: {}", reply.json);
        reply
    }

    pub fn db(&self) -> rusqlite::Connection {
        open_db(&self.dir)
    }

    pub fn count(&self, table: &str) -> i64 {
        self.value(&format!("SELECT count(*) FROM {table}"))
    }

    /// The one value `sql` selects.
    pub fn value<T: rusqlite::types::FromSql>(&self, sql: &str) -> T {
        db_value(&self.dir, sql)
    }

    /// Every row `sql` selects, each read by `row`.
    pub fn rows<T>(
        &self,
        sql: &str,
        row: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> Vec<T> {
        db_rows(&self.dir, sql, row)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain-HTTP client; reqwest is built without a default TLS provider, so pick one first.
pub fn http_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

pub fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success());
}

fn wait_timeout(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// The one value `sql` selects from the database in `dir`.
pub fn db_value<T: rusqlite::types::FromSql>(dir: &Path, sql: &str) -> T {
    db_rows(dir, sql, |r| r.get(0))
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("{sql}: no row"))
}

/// Every row `sql` selects from the database in `dir`, each read by `row`. On PostgreSQL the
/// rows `psql` prints are read through an in-memory SQLite table, so a test reads them the
/// same way on either backend.
pub fn db_rows<T>(
    dir: &Path,
    sql: &str,
    row: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> Vec<T> {
    let (db, sql) = match std::fs::read_to_string(dir.join(PG_MARKER)) {
        Ok(database) => (
            crate::postgres::shared().query(&database, sql),
            "SELECT * FROM result",
        ),
        Err(_) => (open_db(dir), sql),
    };
    let mut stmt = db.prepare(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    stmt.query_map([], row)
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// Writes an executable shell script (a hook is the operator's program; hookroute itself
/// never involves a shell).
pub fn script(path: &Path, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

pub fn open_db(dir: &Path) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(dir.join("hookroute.db")).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn
}

#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub json: serde_json::Value,
}

impl Reply {
    pub async fn read(response: reqwest::Response) -> Self {
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text().await.unwrap();
        let json = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
        Self {
            status,
            headers,
            json,
        }
    }

    /// The error code, asserting the documented error body shape on the way.
    pub fn error(&self) -> &str {
        assert_eq!(self.json["status"], self.status, "{:?}", self.json);
        assert!(
            self.json["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{:?}",
            self.json
        );
        self.json["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error field: {:?}", self.json))
    }

    pub fn message(&self) -> &str {
        self.json["message"].as_str().unwrap_or_default()
    }
}

/// HMAC-SHA256 over the concatenated parts, as lowercase hex: an implementation independent
/// of the daemon's.
pub fn hmac_hex(key: &str, parts: &[&[u8]]) -> String {
    hex::encode(hmac_raw(key.as_bytes(), parts))
}

pub fn hmac_raw(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut mac = hmac::Hmac::<Sha256>::new_from_slice(key).unwrap();
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().to_vec()
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A ComplianceLayer `scan.completed` body with a unique id.
pub fn scan_body(id: &str) -> Vec<u8> {
    serde_json::json!({
        "id": id,
        "type": "scan.completed",
        "created_at": jiff::Timestamp::now().to_string(),
        "data": {"scan_id": 12345, "domain": "example.com", "score": 85, "grade": "B"}
    })
    .to_string()
    .into_bytes()
}

pub fn sample(name: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name),
    )
    .unwrap()
}

/// The lines `path` holds now (the file sink's output): for checking that nothing more came.
pub fn read_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Waits until `path` holds `n` lines (the file sink's output) and returns them.
pub async fn wait_lines(path: &Path, n: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<_> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if lines.len() >= n || Instant::now() > deadline {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits until the daemon's log holds `needle` `times` times (its lines are written by a
/// thread of their own, a moment after what they report), and returns the log.
pub async fn wait_log_n(daemon: &Daemon, needle: &str, times: usize) -> String {
    eventually(|| {
        let log = daemon.log();
        if log.matches(needle).count() >= times {
            Ok(log)
        } else {
            Err(format!("{needle:?} not logged {times} times:\n{log}"))
        }
    })
    .await
}

/// Waits until the daemon's log holds `needle`, and returns the log.
pub async fn wait_log(daemon: &Daemon, needle: &str) -> String {
    wait_log_n(daemon, needle, 1).await
}

/// Job counts by status, read through the store's contract.
pub fn jobs(daemon: &Endpoint) -> HashMap<String, i64> {
    job_counts(daemon.deliveries())
}

/// [`Endpoint::deliveries`] of the database of the configuration in `dir` (a daemon stopped,
/// say, or driven without one).
pub fn deliveries_at(dir: &Path) -> Vec<Row> {
    tools_at(dir, |tools| {
        tools.list(&everything()).expect("the list reads")
    })
}

/// [`jobs`] of the database of the configuration in `dir`.
pub fn jobs_at(dir: &Path) -> HashMap<String, i64> {
    job_counts(deliveries_at(dir))
}

fn job_counts(rows: Vec<Row>) -> HashMap<String, i64> {
    let mut counts = HashMap::new();
    for row in rows {
        if row.job_id.is_some() {
            *counts.entry(row.status.as_str().to_owned()).or_default() += 1;
        }
    }
    counts
}

/// [`Endpoint::delivery_ids`] of the database of the configuration in `dir`.
pub fn delivery_ids_at(dir: &Path) -> HashSet<String> {
    let rows = deliveries_at(dir);
    rows.into_iter().map(|row| row.delivery_id).collect()
}

/// `deliveries list` with no filter and no practical limit.
fn everything() -> Filter {
    Filter {
        limit: usize::MAX >> 1,
        ..Filter::default()
    }
}

pub async fn wait_jobs(daemon: &Endpoint, status: &str, n: i64) {
    eventually(|| {
        let counts = jobs(daemon);
        if counts.get(status).copied().unwrap_or(0) >= n {
            Ok(())
        } else {
            Err(format!("{n} {status} jobs: {counts:?}"))
        }
    })
    .await
}

/// Polls `check` until it succeeds, for at most 20 s; then fails with its last complaint.
pub async fn eventually<T>(mut check: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match check() {
            Ok(value) => return value,
            Err(why) if Instant::now() > deadline => panic!("gave up waiting: {why}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(25)).await,
        }
    }
}

/// Writes a configuration file into `dir` and returns its path.
pub fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A FIFO named `name` in `dir`: a file sink writing to it blocks until someone reads.
pub fn fifo(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    let made = std::process::Command::new("mkfifo").arg(&path).status();
    assert!(made.unwrap().success(), "mkfifo {}", path.display());
    path
}

/// The lines written to the FIFO at `path`, as they come: opening it for reading (on a
/// thread of its own) is what lets a file sink's blocked write through.
pub fn fifo_lines(path: PathBuf) -> mpsc::Receiver<String> {
    let (lines, received) = mpsc::channel();
    std::thread::spawn(move || {
        let reader = BufReader::new(std::fs::File::open(&path).unwrap());
        for line in reader.lines() {
            if lines.send(line.unwrap()).is_err() {
                return;
            }
        }
    });
    received
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("hookroute-it")
        .tempdir()
        .unwrap()
}
