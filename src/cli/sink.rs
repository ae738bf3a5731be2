//! `hookroute sink`: each sink's state (active, failing, paused), and pausing a destination
//! for its maintenance or resuming one. Every daemon serving the database reads a pause or a
//! resume within a second; a resumed sink's waiting deliveries go out at once, oldest first.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use jiff::Timestamp;

use super::DEFAULT_CONFIG;
use super::tools::admin;
use crate::store::admin::{Access, SinkStatus};
use crate::text::printable;

#[derive(Debug, Subcommand)]
pub enum SinkCommand {
    /// Every sink: active, failing or paused (since when, by whom, why), its last error, and
    /// its waiting deliveries and dead letters.
    List(ListArgs),
    /// Pause a sink: its deliveries wait (none uses an attempt or goes to the dead letters)
    /// until `resume` or the end of `--for`.
    Pause(PauseArgs),
    /// Resume a paused (or failing) sink: its waiting deliveries go out now, oldest first.
    Resume(ResumeArgs),
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Configuration file (the tools read its `[storage]` and its sinks).
    #[arg(long, short, default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// One JSON object per line.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct PauseArgs {
    /// Configuration file (the tools read its `[storage]` and its sinks).
    #[arg(long, short, default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// The sink's name.
    pub sink: String,
    /// How long, e.g. "2h"; until `resume` if not given.
    #[arg(long = "for", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Why: shown by `sink list` and in the `hookroute.sink.paused` event.
    #[arg(long)]
    pub comment: String,
    /// Who: defaults to $USER.
    #[arg(long)]
    pub author: Option<String>,
}

#[derive(Debug, Args)]
pub struct ResumeArgs {
    /// Configuration file (the tools read its `[storage]`).
    #[arg(long, short, default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// The sink's name.
    pub sink: String,
}

impl SinkCommand {
    /// The configuration file it reads.
    pub fn config(&self) -> &std::path::Path {
        match self {
            Self::List(args) => &args.config,
            Self::Pause(args) => &args.config,
            Self::Resume(args) => &args.config,
        }
    }
}

pub(super) fn run(command: SinkCommand) -> anyhow::Result<ExitCode> {
    match command {
        SinkCommand::List(args) => list(&args),
        SinkCommand::Pause(args) => pause(args),
        SinkCommand::Resume(args) => resume(&args),
    }
}

fn list(args: &ListArgs) -> anyhow::Result<ExitCode> {
    let (config, tools) = admin(&args.config, Access::Read)?;
    let configured: Vec<String> = config.sinks.iter().map(|s| s.name.clone()).collect();
    let now = Timestamp::now();
    let sinks = tools.sinks(&configured, now)?;
    let mut out = std::io::stdout().lock();
    if args.json {
        for sink in &sinks {
            writeln!(out, "{}", serde_json::to_string(sink)?)?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(
        out,
        "{:<24} {:<8} {:>8} {:>8} {:>6}  DETAIL",
        "SINK", "STATE", "WAITING", "OLDEST", "DEAD"
    )?;
    for sink in &sinks {
        let oldest = if sink.waiting == 0 {
            "-".to_owned()
        } else {
            humantime::format_duration(Duration::from_secs(sink.oldest_waiting_seconds)).to_string()
        };
        writeln!(
            out,
            "{:<24} {:<8} {:>8} {:>8} {:>6}  {}",
            printable(&sink.sink),
            sink.state,
            sink.waiting,
            oldest,
            sink.dead,
            detail(sink, now)
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

/// What a sink's row says beyond its counts: its pause, its streak, and whether the
/// configuration still has it.
fn detail(sink: &SinkStatus, now: Timestamp) -> String {
    let mut parts = Vec::new();
    if let Some(pause) = sink.health.paused_at(now) {
        let mut said = format!("paused since {} by {}", pause.since, pause.by);
        if let Some(until) = pause.until {
            said.push_str(&format!(" until {until}"));
        }
        if pause.auto {
            said.push_str(&format!(", next probe {}", pause.next_probe));
        }
        said.push_str(&format!(": {}", pause.comment));
        parts.push(said);
    }
    if let Some(streak) = &sink.health.streak {
        parts.push(format!(
            "failing since {} ({} attempts), last error: {}",
            streak.since, streak.failures, streak.last_error
        ));
    }
    if !sink.configured {
        parts.push("not in the configuration".to_owned());
    }
    printable(&parts.join("; ")).into_owned()
}

fn pause(args: PauseArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        !args.comment.trim().is_empty(),
        "--comment: say why, for whoever reads it later"
    );
    let author = args
        .author
        .or_else(|| std::env::var("USER").ok())
        .filter(|author| !author.trim().is_empty())
        .context("say who pauses it: --author, or $USER")?;
    let (config, mut tools) = admin(&args.config, Access::Write)?;
    if !config.sinks.iter().any(|s| s.name == args.sink) {
        eprintln!("no sink {:?} in {}", args.sink, args.config.display());
        return Ok(ExitCode::from(2));
    }
    let changed = tools.pause_sink(
        &args.sink,
        (&author, &args.comment),
        args.duration,
        Timestamp::now(),
    )?;
    let pause = changed.after.pause.context("the pause was not recorded")?;
    let until = pause.until.map_or_else(
        || "until resumed".to_owned(),
        |until| format!("until {until}"),
    );
    writeln!(
        std::io::stdout(),
        "{} paused {until}; its deliveries wait",
        args.sink
    )?;
    Ok(ExitCode::SUCCESS)
}

fn resume(args: &ResumeArgs) -> anyhow::Result<ExitCode> {
    let (_, mut tools) = admin(&args.config, Access::Write)?;
    let changed = tools.resume_sink(&args.sink, Timestamp::now())?;
    let mut out = std::io::stdout().lock();
    if changed.before.pause.is_some() {
        writeln!(
            out,
            "{} resumed; its waiting deliveries go out now, oldest first",
            args.sink
        )?;
    } else if changed.applied {
        writeln!(
            out,
            "{} was not paused; its failure streak is cleared",
            args.sink
        )?;
    } else {
        writeln!(out, "{} was not paused", args.sink)?;
    }
    Ok(ExitCode::SUCCESS)
}
