//! The command line: the clap definitions, `serve`, and the dispatch to the other commands
//! ([`check`]: `check-config`, `route-test`; [`send`]; [`tools`]: the operator's). Decides
//! exit codes: 0 ok, 1 a check failed (e.g. a delivery was refused), 2 bad configuration or
//! startup failure.

mod check;
mod reconcile;
mod send;
mod silence;
mod sink;
mod tools;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Without `RUST_LOG`: hookroute's own lines from info up, and only warnings and errors from
/// the libraries it uses. The unit sets the same.
pub const DEFAULT_LOG_FILTER: &str = "warn,hookroute=info";

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

use crate::config;
use crate::duration::Since;

const DEFAULT_CONFIG: &str = "/etc/hookroute/config.toml";
/// How long `send` waits for an answer; the senders themselves wait 30 s.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Parser)]
#[command(
    name = "hookroute",
    version,
    about = "Verify, deduplicate, store and route compliance webhooks"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The configuration file the command reads, if it reads one.
    pub fn config_path(&self) -> Option<&std::path::Path> {
        Some(match &self.command {
            Command::Serve(args) | Command::CheckConfig(args) => &args.config,
            Command::Send(args) => &args.config,
            Command::RouteTest(args) => &args.config,
            Command::Deliveries(DeliveriesCommand::List(args)) => &args.config,
            Command::Deliveries(DeliveriesCommand::Show(args)) => &args.config,
            Command::Replay(args) => &args.config,
            Command::Retry(args) => &args.config,
            Command::DeadLetter(DeadLetterCommand::Retry(args)) => &args.config,
            Command::Silence(command) => command.config(),
            Command::Sink(command) => command.config(),
            Command::Reconcile(args) => &args.config,
            Command::Completions { .. } | Command::Man { .. } | Command::MigrateStorage(_) => {
                return None;
            }
        })
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon.
    Serve(ConfigArg),
    /// Validate the configuration and print a summary; exit 2 with the problems otherwise.
    CheckConfig(ConfigArg),
    /// Sign a JSON payload as the source's sender would and POST it to the daemon.
    Send(SendArgs),
    /// Show which routes an event matches, why, and the message each sink would get; sends
    /// nothing. Exit 0 if a route matched, 1 if none did.
    RouteTest(RouteTestArgs),
    /// Inspect deliveries; works on the database while the daemon runs.
    #[command(subcommand)]
    Deliveries(DeliveriesCommand),
    /// Queue an event's delivery again: through the current routes, or to one sink. Refuses
    /// while a job of the event still waits for the same sink, unless `--force`.
    Replay(ReplayArgs),
    /// Try a failed delivery again now instead of at its next try; it keeps its attempts.
    Retry(RetryArgs),
    /// Dead letters: deliveries that failed for good.
    #[command(subcommand)]
    DeadLetter(DeadLetterCommand),
    /// Keep matching deliveries quiet for a while, without editing the routes; works while
    /// the daemon runs, and every daemon on the database applies it within a second.
    #[command(subcommand)]
    Silence(silence::SilenceCommand),
    /// Sinks' health: which are failing or paused; pause one for its maintenance, resume it.
    /// Works while the daemon runs; every daemon on the database follows within a second.
    #[command(subcommand)]
    Sink(sink::SinkCommand),
    /// Reconcile with the senders' APIs: how each source's passes went; what a pass would
    /// synthesise now (`--dry-run`); or a pass now, by the running daemon (`--once`).
    Reconcile(reconcile::ReconcileArgs),
    /// Copy an installation's SQLite database into PostgreSQL (events, delivery ids, jobs with
    /// their attempts, throttle windows); run it again to complete an interrupted copy. Stop
    /// the daemon first.
    MigrateStorage(MigrateArgs),
    /// Print a shell completion script, e.g. `hookroute completions bash >
    /// /usr/share/bash-completion/completions/hookroute`.
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), e.g. `hookroute man > hookroute.1`; with `--dir`, write
    /// it and a page for every subcommand (`hookroute-serve.1`, …) there.
    Man {
        /// Write every page into this directory instead of printing the main one.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum DeliveriesCommand {
    /// Deliveries, newest first: one row per job, suppressed route or unrouted event.
    List(Box<ListArgs>),
    /// An event, its routes, and every delivery attempt.
    Show(ShowArgs),
}

#[derive(Debug, Subcommand)]
pub enum DeadLetterCommand {
    /// Put dead deliveries back in the queue with a fresh set of attempts.
    Retry(DeadRetryArgs),
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Configuration file (the tools read its `[storage]` and, for replay, its routes).
    #[arg(long, short, default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// Only rows with this status: pending, succeeded, failed (will retry), dead,
    /// suppressed or unrouted.
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(crate::store::admin::STATUSES))]
    pub status: Option<String>,
    /// Only events from this source.
    #[arg(long)]
    pub source: Option<String>,
    /// Only deliveries to this sink.
    #[arg(long)]
    pub sink: Option<String>,
    /// Only deliveries of this route.
    #[arg(long)]
    pub route: Option<String>,
    /// Only events whose type this glob matches, e.g. "alert.*".
    #[arg(long = "type", value_name = "GLOB", value_parser = parse_glob)]
    pub event_type: Option<globset::GlobMatcher>,
    /// Only events older than this one (an event id): the next page after a list's last event.
    #[arg(long, value_name = "EVENT")]
    pub before: Option<i64>,
    /// Only events received since then: a duration back from now ("1h", "7d"), a time
    /// ("2026-12-05T14:00:00Z") or a date ("2026-12-05", from its midnight UTC).
    #[arg(long, value_parser = Since::parse)]
    pub since: Option<Since>,
    /// At most this many rows.
    #[arg(long, default_value_t = 100)]
    pub limit: usize,
    /// One JSON object per line.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// Configuration file (the tools read its `[storage]` and, for replay, its routes).
    #[arg(long, short, default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// Event id (the `id` the daemon answered with, or the EVENT column of `list`); with
    /// `--job`, a job id (the JOB column, `job_id` in the log) whose event to show.
    pub id: i64,
    /// Take ID as a job id.
    #[arg(long)]
    pub job: bool,
    /// The event, its routing and its jobs as one JSON document.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// Configuration file (the tools read its `[storage]` and, for replay, its routes).
    #[arg(long, short, default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// Event id.
    pub id: i64,
    /// Deliver to this sink only (even if no route sends this event there).
    #[arg(long)]
    pub sink: Option<String>,
    /// Queue it even if a job of the event still waits for the same sink (it may be delivered
    /// twice).
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct RetryArgs {
    /// Configuration file (the tools read its `[storage]` and, for replay, its routes).
    #[arg(long, short, default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// Job id (the JOB column of `deliveries list --status failed`).
    pub job: i64,
}

#[derive(Debug, Args)]
pub struct DeadRetryArgs {
    /// Configuration file (the tools read its `[storage]` and, for replay, its routes).
    #[arg(long, short, default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// Job id (the JOB column of `deliveries list --status dead`).
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    pub id: Option<i64>,
    /// Every dead delivery.
    #[arg(long)]
    pub all: bool,
}

#[derive(Debug, Args)]
pub struct RouteTestArgs {
    /// Configuration file.
    #[arg(long, short, default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// The source the event comes from; without it, the event is shown from every source.
    #[arg(long)]
    pub source: Option<String>,
    /// The event's JSON body, as the sender would post it.
    pub event: PathBuf,
    /// Evaluate mute windows at this time (RFC 3339) instead of now.
    #[arg(long, value_name = "TIME")]
    pub at: Option<jiff::Timestamp>,
}

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// The SQLite database (`storage.path`).
    #[arg(long)]
    pub from: PathBuf,
    /// The PostgreSQL database, `postgres://user@host/db?sslmode=…` (no password in it).
    #[arg(long)]
    pub to: String,
    /// A file holding the PostgreSQL password (else `PGPASSWORD`, or none).
    #[arg(long)]
    pub password_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ConfigArg {
    /// Configuration file.
    #[arg(long, short, default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
}

#[derive(Debug, Args)]
pub struct SendArgs {
    /// Configuration file (for the source's scheme, secret and path).
    #[arg(long, short, default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// Name of the source to sign for, as in `[sources.<name>]`.
    #[arg(long)]
    pub source: String,
    /// JSON payload to send.
    pub file: PathBuf,
    /// Where to POST; defaults to the configured listen address and the source's path.
    #[arg(long)]
    pub url: Option<String>,
}

/// Runs a parsed command.
///
/// # Errors
/// Configuration and startup failures, which `main` reports with exit code 2.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    crate::sinks::install_tls_provider();
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::CheckConfig(args) => check::check_config(args),
        Command::Send(args) => runtime()?.block_on(send::send(args)),
        Command::RouteTest(args) => check::route_test(args),
        Command::Deliveries(DeliveriesCommand::List(args)) => tools::list(*args),
        Command::Deliveries(DeliveriesCommand::Show(args)) => tools::show(args),
        Command::Replay(args) => tools::replay(args),
        Command::Retry(args) => tools::retry(args),
        Command::DeadLetter(DeadLetterCommand::Retry(args)) => tools::retry_dead(args),
        Command::Silence(command) => silence::run(command),
        Command::Sink(command) => sink::run(command),
        Command::Reconcile(args) => reconcile::run(&args),
        Command::MigrateStorage(args) => runtime()?.block_on(tools::migrate_storage(args)),
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut command, "hookroute", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Man { dir } => {
            // `help` is clap's, and has no page of its own.
            let command = <Cli as clap::CommandFactory>::command().disable_help_subcommand(true);
            match dir {
                // The main page names a page per subcommand (`hookroute-serve(1)`): write them.
                Some(dir) => std::fs::create_dir_all(&dir)
                    .and_then(|()| clap_mangen::generate_to(command, &dir))
                    .with_context(|| format!("cannot write manual pages to {}", dir.display()))?,
                None => clap_mangen::Man::new(command)
                    .render(&mut std::io::stdout())
                    .context("cannot write the manual page")?,
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `--type`: a glob over event types.
fn parse_glob(text: &str) -> Result<globset::GlobMatcher, String> {
    globset::Glob::new(text)
        .map(|glob| glob.compile_matcher())
        .map_err(|err| err.to_string())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn serve(args: ConfigArg) -> anyhow::Result<ExitCode> {
    let config = config::load(&args.config)?;
    let runtime = runtime()?;
    let served = runtime.block_on(async {
        let listen = config.server.listen;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        crate::run(config, listener, shutdown_signal()).await?;
        Ok(ExitCode::SUCCESS)
    });
    // Whatever blocking work is left (a reload reading a slow file system, say) does not hold
    // the exit: everything that matters was flushed before `run` returned.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    served
}

/// Resolves on SIGTERM (systemd's stop) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term =
        signal(SignalKind::terminate()).expect("installing a SIGTERM handler cannot fail on Unix");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn since_takes_a_duration_a_time_or_a_date() {
        use super::Since;
        let parse_since = Since::parse;
        let now: jiff::Timestamp = "2026-12-06T12:00:00Z".parse().unwrap();
        let at = |text: &str| parse_since(text).unwrap().at(now).unwrap().to_string();
        assert_eq!(at("1h"), "2026-12-06T11:00:00Z");
        assert_eq!(at("2026-12-05T14:30:00Z"), "2026-12-05T14:30:00Z");
        assert_eq!(at("2026-12-05T14:30:00+01:00"), "2026-12-05T13:30:00Z");
        assert_eq!(at("2026-12-05"), "2026-12-05T00:00:00Z");
        assert!(matches!(parse_since("7d"), Ok(Since::Ago(_))));
        let refused = parse_since("yesterday").unwrap_err();
        assert!(
            refused.contains("a duration") && refused.contains("a date"),
            "{refused}"
        );
    }

    use clap::CommandFactory as _;

    use super::*;

    /// `--help` explains every flag and argument of every command.
    #[test]
    fn every_argument_has_help() {
        fn check(command: &clap::Command, path: &str) {
            let path = format!("{path} {}", command.get_name());
            for arg in command.get_arguments() {
                let builtin = matches!(arg.get_id().as_str(), "help" | "version");
                assert!(
                    builtin || arg.get_help().is_some(),
                    "{path}: {} has no help",
                    arg.get_id()
                );
            }
            for sub in command.get_subcommands() {
                assert!(
                    sub.get_about().is_some(),
                    "{path} {} has no about",
                    sub.get_name()
                );
                check(sub, &path);
            }
        }
        Cli::command().debug_assert();
        check(&Cli::command(), "");
    }
}
