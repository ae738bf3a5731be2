//! The `hookroute` binary: parse the command line, set up logging, hand over to the library,
//! and turn errors into exit codes (2: configuration or startup failure).

use std::io::IsTerminal as _;
use std::process::ExitCode;

use clap::Parser as _;
use hookroute::config::raw::LogFormat;
use tracing_subscriber::EnvFilter;

/// jemalloc rather than glibc's malloc: the many small allocations of parsing, routing and
/// rendering an event cost less, and a flood's memory goes back to the system once it is
/// over (glibc kept it in its arenas for good). Its settings: `.cargo/config.toml`.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = hookroute::cli::Cli::parse();
    // An empty RUST_LOG (a unit's `Environment=RUST_LOG=`) means the default, not silence.
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.trim().is_empty() => EnvFilter::new(directives),
        _ => EnvFilter::new(hookroute::cli::DEFAULT_LOG_FILTER),
    };
    // Lines are written by a thread of their own, many per write: one write per line cost the
    // ingest path about a twentieth of its throughput (benches/README.md). Nothing is dropped:
    // a full buffer (128k lines) makes loggers wait. The guard flushes at exit.
    let (stderr, _flush_at_exit) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("hookroute-log")
        .finish(std::io::BufWriter::new(std::io::stderr()));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(stderr);
    match hookroute::config::log_format(cli.config_path()) {
        LogFormat::Json => logs.json().flatten_event(true).init(),
        LogFormat::Text => logs
            .fmt_fields(hookroute::text::EscapedFields::default())
            .with_ansi(std::io::stderr().is_terminal())
            .init(),
    }
    match hookroute::cli::run(cli) {
        Ok(code) => code,
        // The reader went away (`deliveries list | head -1`): what it wanted, it has.
        Err(err) if is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}

/// Whether writing to stdout failed because its reader closed the pipe.
fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
