//! The `exec` sink: runs a command for each event. Never through a shell: `command` is an argv.
//! The event JSON arrives on stdin; the environment is cleared to `PATH`, the event's
//! `HOOKROUTE_*` variables and the configured `env`, so the daemon's own environment (which may
//! hold secrets) is not inherited. The command runs in its own process group, and the whole
//! group is killed when `delivery.timeout` passes. Exit status 0 is success; anything else is
//! retried. The exit status is the verdict: a child the hook leaves running is neither waited
//! for nor killed (its output stops being read once the hook has exited). Delivery is at least
//! once: a hook may see an event again after a crash and should use `HOOKROUTE_DELIVERY_ID` to
//! recognise it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use super::{Delivery, DeliveryOptions, RESPONSE_LIMIT, Sink, SinkError, bounded};
use crate::event::Event;
use crate::templates::Message;

/// How long output is still read after the hook exits: what it wrote is already in the pipe;
/// only a child it left behind could write more, and nothing waits for that.
const DRAIN: Duration = Duration::from_millis(100);

/// `PATH` for hooks unless `env` sets one: the system's directories, nothing user-writable.
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecSinkConfig {
    /// Program and arguments, e.g. `["/usr/local/bin/ticket", "--queue", "sec"]`.
    pub command: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub working_dir: Option<PathBuf>,
    #[serde(default)]
    pub delivery: DeliveryOptions,
}

impl super::SinkConfig for ExecSinkConfig {
    fn relative_to(&mut self, base: &Path) {
        if let Some(dir) = &mut self.working_dir {
            *dir = base.join(&*dir);
        }
    }

    fn kind(&self) -> &'static str {
        "exec"
    }

    fn delivery(&self) -> &DeliveryOptions {
        &self.delivery
    }

    fn validate(&self) -> Vec<String> {
        match self.command.first() {
            None => vec![
                "command: give the program and its arguments, e.g. [\"/usr/local/bin/hook\"]"
                    .into(),
            ],
            Some(program) if program.is_empty() => vec!["command[0]: empty program".into()],
            Some(_) => Vec::new(),
        }
    }

    fn build(&self, _name: &str) -> Result<std::sync::Arc<dyn Sink>, String> {
        Ok(std::sync::Arc::new(ExecSink::new(self)))
    }

    fn without_message(&self) -> Option<&'static str> {
        Some("runs the hook with the event as JSON on stdin")
    }
}

pub struct ExecSink {
    config: ExecSinkConfig,
}

impl ExecSink {
    pub fn new(config: &ExecSinkConfig) -> Self {
        Self {
            config: config.clone(),
        }
    }
}

#[derive(Serialize)]
struct Input<'a> {
    route: &'a str,
    #[serde(flatten)]
    event: &'a Event,
}

#[async_trait]
impl Sink for ExecSink {
    async fn deliver(&self, delivery: &Delivery<'_>) -> Result<String, SinkError> {
        let input = serde_json::to_vec(&Input {
            route: delivery.route,
            event: delivery.event,
        })
        .map_err(|e| SinkError::permanent(format!("cannot encode the event: {e}")))?;
        self.run(input, delivery, 1).await
    }

    /// One run for the group: its events as a JSON array on stdin (each as [`Sink::deliver`]
    /// gives one), `HOOKROUTE_GROUP_SIZE` their number; the other variables name the first.
    async fn deliver_batch(
        &self,
        deliveries: &[Delivery<'_>],
        _summary: &Message,
    ) -> Result<String, SinkError> {
        let Some(first) = deliveries.first() else {
            return Ok(String::new());
        };
        let inputs: Vec<Input<'_>> = deliveries
            .iter()
            .map(|d| Input {
                route: d.route,
                event: d.event,
            })
            .collect();
        let input = serde_json::to_vec(&inputs)
            .map_err(|e| SinkError::permanent(format!("cannot encode the events: {e}")))?;
        self.run(input, first, deliveries.len()).await
    }
}

impl ExecSink {
    /// Runs the command with `input` on stdin, for `delivery` (the first of `size` events).
    async fn run(
        &self,
        input: Vec<u8>,
        delivery: &Delivery<'_>,
        size: usize,
    ) -> Result<String, SinkError> {
        let event = delivery.event;
        let (program, args) = self
            .config
            .command
            .split_first()
            .expect("validated: command is not empty");
        let mut command = Command::new(program);
        command
            .args(args)
            .env_clear()
            .env("PATH", DEFAULT_PATH)
            .envs(&self.config.env)
            .env("HOOKROUTE_EVENT_TYPE", &event.event_type)
            .env("HOOKROUTE_DELIVERY_ID", &event.delivery_id)
            .env("HOOKROUTE_SOURCE", &event.source)
            .env("HOOKROUTE_ROUTE", delivery.route)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        if size > 1 {
            command.env("HOOKROUTE_GROUP_SIZE", size.to_string());
        }
        if let Some(dir) = &self.config.working_dir {
            command.current_dir(dir);
        }
        let mut child = command.spawn().map_err(|err| spawn_error(program, &err))?;
        let group = child
            .id()
            .and_then(|id| rustix::process::Pid::from_raw(id as i32));
        let (mut stdin, stdout, stderr) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take());
        // Input and output flow at once: a hook that streams (reads a little, writes a
        // little) would otherwise fill its stdout pipe while we still wait to finish stdin.
        // The exit status is the verdict: a hook that leaves a child behind (`work &`) holds
        // its pipes open past its own exit, so once it has exited only what is already
        // buffered is read, for at most [`DRAIN`].
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let timeout: Duration = self.config.delivery.timeout.0;
        let run = async {
            let feed = async {
                if let Some(mut stdin) = stdin.take() {
                    // A hook that ignores its input closes the pipe early; that is its business.
                    let _ = stdin.write_all(&input).await;
                }
            };
            let io = async {
                tokio::join!(feed, capture(stdout, &mut out), capture(stderr, &mut err));
            };
            tokio::pin!(io);
            let mut io_done = false;
            let status = loop {
                tokio::select! {
                    status = child.wait() => break status,
                    () = &mut io, if !io_done => io_done = true,
                }
            };
            if !io_done {
                let _ = tokio::time::timeout(DRAIN, io).await;
            }
            status
        };
        let Ok(status) = tokio::time::timeout(timeout, run).await else {
            if let Some(group) = group {
                let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
            }
            let _ = child.wait().await;
            return Err(SinkError::transient(format!(
                "{program} timed out after {}; its process group was killed",
                humantime::format_duration(timeout)
            )));
        };
        let (out, err) = (String::from_utf8_lossy(&out), String::from_utf8_lossy(&err));
        let response = bounded(&format!(
            "stdout: {}\nstderr: {}",
            out.trim_end(),
            err.trim_end()
        ));
        match status {
            Ok(status) if status.success() => Ok(response),
            Ok(status) => Err(SinkError::Transient {
                message: format!("{program} exited with {status}"),
                response,
            }),
            Err(err) => Err(SinkError::Transient {
                message: format!("cannot wait for {program}: {err}"),
                response,
            }),
        }
    }
}

/// Why `program` could not be started, and whether trying again could help. A missing or
/// forbidden program, an argument list or environment too large for the kernel (`E2BIG`) and
/// a NUL byte in a value (the event's type or id goes into the environment) fail the same way
/// every time, so they go straight to the dead letters with the reason.
fn spawn_error(program: &str, err: &std::io::Error) -> SinkError {
    use std::io::ErrorKind;
    let message = format!("cannot start {program}: {err}");
    match err.kind() {
        ErrorKind::NotFound
        | ErrorKind::PermissionDenied
        | ErrorKind::InvalidInput
        | ErrorKind::ArgumentListTooLong => SinkError::permanent(message),
        _ => SinkError::transient(message),
    }
}

/// Reads a pipe to its end into `kept`, keeping at most [`RESPONSE_LIMIT`] bytes of it. What
/// was read stays in `kept` if the read is abandoned.
async fn capture(pipe: Option<impl AsyncRead + Unpin>, kept: &mut Vec<u8>) {
    let Some(mut pipe) = pipe else {
        return;
    };
    let mut chunk = [0u8; 8192];
    while let Ok(n) = pipe.read(&mut chunk).await {
        if n == 0 {
            break;
        }
        let room = RESPONSE_LIMIT.saturating_sub(kept.len());
        kept.extend_from_slice(&chunk[..n.min(room)]);
    }
}
