//! The `file` sink: appends one JSON line per event, for archives and for `tail -f`. A rotated
//! file (logrotate, `systemd/hookroute.logrotate`) is noticed at the next write: the path is
//! opened again, no signal needed.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::{Delivery, Sink, SinkError};
use crate::templates::Message;
use crate::event::Event;

/// One line of the file: the event, and the route that sent it here.
#[derive(Serialize)]
struct Line<'a> {
    route: &'a str,
    #[serde(flatten)]
    event: &'a Event,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSinkConfig {
    pub path: PathBuf,
    #[serde(default)]
    pub delivery: super::DeliveryOptions,
}

impl super::SinkConfig for FileSinkConfig {
    fn relative_to(&mut self, base: &Path) {
        self.path = base.join(&self.path);
    }

    fn kind(&self) -> &'static str {
        "file"
    }

    fn delivery(&self) -> &super::DeliveryOptions {
        &self.delivery
    }

    fn validate(&self) -> Vec<String> {
        if self.path.as_os_str().is_empty() {
            return vec!["path: must not be empty".into()];
        }
        Vec::new()
    }

    fn build(&self, _name: &str) -> Result<Arc<dyn Sink>, String> {
        Ok(Arc::new(FileSink::new(self)))
    }

    fn without_message(&self) -> Option<&'static str> {
        Some("appends the event as one JSON line")
    }

    fn batch(&self) -> usize {
        BATCH
    }
}

/// Most lines written at once, each batch one blocking-thread hand-off and one write: per
/// line, the hand-off would cost more than the write.
pub const BATCH: usize = 64;

pub struct FileSink {
    target: Arc<Target>,
}

/// The file, shared with the blocking threads that write it.
struct Target {
    path: PathBuf,
    /// Opened on first use, so a missing directory or a full disk is a delivery error
    /// (recorded, retried) rather than a reason for the daemon not to start.
    file: Mutex<Option<File>>,
}

impl FileSink {
    pub fn new(config: &FileSinkConfig) -> Self {
        Self {
            target: Arc::new(Target {
                path: config.path.clone(),
                file: Mutex::new(None),
            }),
        }
    }
}

/// Syncs what was written to `file`; a FIFO or a terminal has nothing to sync.
fn sync(file: &File) -> std::io::Result<()> {
    match file.sync_data() {
        Err(err) if err.kind() == std::io::ErrorKind::InvalidInput => Ok(()),
        result => result,
    }
}

impl Target {
    /// Appends one line. Under the lock, so concurrent deliveries never interleave within a
    /// line.
    fn append(&self, line: &[u8]) -> Result<(), SinkError> {
        let mut guard = self.file.lock().unwrap_or_else(|p| p.into_inner());
        // logrotate renamed or removed the file (and may have created a new one): write to
        // whatever the path names now, never on into the rotated file.
        if guard.as_ref().is_some_and(|file| !self.is_at_path(file)) {
            *guard = None;
        }
        let file = match &mut *guard {
            Some(file) => file,
            empty => empty.insert(self.open().map_err(|e| self.io_error(e))?),
        };
        // Synced before the job is marked delivered, so a line reported delivered survives a
        // crash of the machine as the event it came from does. Syncing each batch also keeps
        // the kernel from gathering 30 s of lines into one writeback burst, which stalled
        // the store's own syncs (and so the answers to senders) for up to 0.3 s.
        if let Err(err) = file.write_all(line).and_then(|()| sync(file)) {
            // Reopen next time: the file may have been rotated or its disk replaced.
            *guard = None;
            return Err(self.io_error(err));
        }
        Ok(())
    }

    /// Whether the path still names `file` (two `stat`s per batch of lines).
    fn is_at_path(&self, file: &File) -> bool {
        use std::os::unix::fs::MetadataExt as _;
        match (std::fs::metadata(&self.path), file.metadata()) {
            (Ok(named), Ok(open)) => named.dev() == open.dev() && named.ino() == open.ino(),
            _ => false,
        }
    }

    fn open(&self) -> std::io::Result<File> {
        crate::private::open(&self.path, File::options().append(true))
    }

    fn io_error(&self, source: std::io::Error) -> SinkError {
        SinkError::transient(format!("{}: {source}", self.path.display()))
    }
}

#[async_trait]
impl Sink for FileSink {
    async fn deliver(&self, delivery: &Delivery<'_>) -> Result<String, SinkError> {
        self.deliver_batch(std::slice::from_ref(delivery), &Message::default())
            .await
    }

    /// All the lines in one write: the engine hands this sink up to [`BATCH`] jobs at once.
    async fn deliver_batch(
        &self,
        deliveries: &[Delivery<'_>],
        _summary: &Message,
    ) -> Result<String, SinkError> {
        let mut text = Vec::new();
        for delivery in deliveries {
            let line = Line {
                route: delivery.route,
                event: delivery.event,
            };
            serde_json::to_writer(&mut text, &line)
                .map_err(|e| SinkError::permanent(format!("cannot encode the event: {e}")))?;
            text.push(b'\n');
        }
        // On a blocking thread: opening a FIFO nobody reads, or writing to a stalled disk,
        // must hold up this sink only, never the threads that answer senders.
        let target = Arc::clone(&self.target);
        let len = text.len();
        tokio::task::spawn_blocking(move || target.append(&text))
            .await
            .map_err(|e| SinkError::transient(format!("file write did not finish: {e}")))??;
        Ok(format!("appended {len} bytes"))
    }
}
