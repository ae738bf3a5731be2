//! `hookroute silence`: add, list, show and expire silences while the daemon runs. Every
//! daemon serving the database applies an `add` or `expire` within a second (see
//! [`crate::silence`]); nothing here needs a secret.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use jiff::Timestamp;

use super::DEFAULT_CONFIG;
use super::tools::admin as tools;
use crate::config::Config;
use crate::silence::check;
use crate::store::admin::{Access, Tools};
use crate::store::{Matchers, NewSilence, Silence};
use crate::text::printable;

#[derive(Debug, Subcommand)]
pub enum SilenceCommand {
    /// Silence matching deliveries for a while: they are stored and recorded as silenced,
    /// not delivered (`replay` delivers one later). Prints the silence's id.
    Add(Box<AddArgs>),
    /// Silences in force or starting later; with `--expired`, those that ended.
    List(ListArgs),
    /// A silence, and the deliveries it has silenced so far.
    Show(ShowArgs),
    /// End a silence now.
    Expire(ExpireArgs),
}

#[derive(Debug, Args)]
pub struct AddArgs {
    /// Configuration file (the tools read its `[storage]` and, for --dry-run, its routes).
    #[arg(long, short, default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// Only this route's deliveries.
    #[arg(long)]
    pub route: Option<String>,
    /// Only deliveries to this sink.
    #[arg(long)]
    pub sink: Option<String>,
    /// Only events from this source.
    #[arg(long)]
    pub source: Option<String>,
    /// Only event types this glob matches, e.g. "alert.*".
    #[arg(long = "type", value_name = "GLOB")]
    pub event_type: Option<String>,
    /// Only events this CEL condition holds for, as a route's `when`, e.g.
    /// `data.domain == "legacy.acme.example"`.
    #[arg(long, value_name = "CEL")]
    pub when: Option<String>,
    /// How long it lasts from its start, e.g. "8h".
    #[arg(long = "for", value_name = "DURATION", value_parser = humantime::parse_duration,
          required_unless_present = "until", conflicts_with = "until")]
    pub duration: Option<Duration>,
    /// When it ends (RFC 3339, e.g. 2026-12-08T06:00:00Z).
    #[arg(long, value_name = "TIME")]
    pub until: Option<Timestamp>,
    /// When it starts (RFC 3339); now if not given.
    #[arg(long, value_name = "TIME")]
    pub starts: Option<Timestamp>,
    /// Why: shown with every delivery it silences.
    #[arg(long)]
    pub comment: String,
    /// Who: defaults to $USER.
    #[arg(long)]
    pub author: Option<String>,
    /// Store nothing: show which of the last stored events it would have matched.
    #[arg(long)]
    pub dry_run: bool,
    /// How many of the last events --dry-run looks at.
    #[arg(long, default_value_t = 100)]
    pub last: usize,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Configuration file (the tools read its `[storage]`).
    #[arg(long, short, default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// Those that ended instead (kept as long as events are).
    #[arg(long)]
    pub expired: bool,
    /// One JSON object per line.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// Configuration file (the tools read its `[storage]`).
    #[arg(long, short, default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// The silence's id.
    pub id: i64,
    /// At most this many silenced deliveries, newest first.
    #[arg(long, default_value_t = 100)]
    pub limit: usize,
    /// The silence and its deliveries as one JSON document.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ExpireArgs {
    /// Configuration file (the tools read its `[storage]`).
    #[arg(long, short, default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// The silence's id.
    pub id: i64,
    /// Print the ended silence as JSON.
    #[arg(long)]
    pub json: bool,
}

impl SilenceCommand {
    pub fn config(&self) -> &std::path::Path {
        match self {
            Self::Add(args) => &args.config,
            Self::List(args) => &args.config,
            Self::Show(args) => &args.config,
            Self::Expire(args) => &args.config,
        }
    }
}

pub(super) fn run(command: SilenceCommand) -> anyhow::Result<ExitCode> {
    match command {
        SilenceCommand::Add(args) => add(*args),
        SilenceCommand::List(args) => list(&args),
        SilenceCommand::Show(args) => show(&args),
        SilenceCommand::Expire(args) => expire(&args),
    }
}

fn add(args: AddArgs) -> anyhow::Result<ExitCode> {
    let now = Timestamp::now();
    let matchers = Matchers {
        route: args.route,
        sink: args.sink,
        source: args.source,
        event_type: args.event_type,
        when: args.when,
    };
    if let Err(problems) = check(&matchers) {
        for problem in problems {
            eprintln!("{problem}");
        }
        return Ok(ExitCode::from(2));
    }
    anyhow::ensure!(
        !args.comment.trim().is_empty(),
        "--comment: say why, for whoever reads it later"
    );
    let starts_at = args.starts.unwrap_or(now);
    let ends_at = match (args.duration, args.until) {
        (Some(span), _) => starts_at
            .checked_add(jiff::SignedDuration::try_from(span)?)
            .context("--for reaches past the last time there is")?,
        (None, Some(until)) => until,
        (None, None) => anyhow::bail!("say how long: --for 8h, or --until TIME"),
    };
    anyhow::ensure!(
        ends_at > starts_at && ends_at > now,
        "the silence would end ({ends_at}) before it starts ({starts_at}) or in the past"
    );
    let author = args
        .author
        .or_else(|| std::env::var("USER").ok())
        .filter(|author| !author.trim().is_empty())
        .or_else(|| args.dry_run.then(String::new))
        .context("say who adds it: --author, or $USER")?;
    let new = NewSilence {
        matchers,
        starts_at,
        ends_at,
        comment: args.comment,
        author,
    };
    let access = if args.dry_run {
        Access::Read
    } else {
        Access::Write
    };
    let (config, mut tools) = tools(&args.config, access)?;
    let mut out = std::io::stdout().lock();
    if args.dry_run {
        return dry_run(&mut out, &config, &tools, new, args.last, args.json);
    }
    let id = tools.add_silence(&new, now)?;
    if args.json {
        let silence = tools.silence(id, 0)?.map(|(silence, _)| silence);
        writeln!(out, "{}", serde_json::to_string(&silence)?)?;
    } else {
        writeln!(out, "{id}")?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Which of the last `last` events the silence would have kept from which (route, sink), by
/// today's routes: what routing does with it from now on.
fn dry_run(
    out: &mut impl std::io::Write,
    config: &Config,
    tools: &Tools,
    new: NewSilence,
    last: usize,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let (matched, looked_at) = crate::actions::preview(tools, config, new, last)?;
    if json {
        for row in &matched {
            writeln!(out, "{}", serde_json::to_string(row)?)?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(
        out,
        "would silence {} deliveries of the last {looked_at} events (nothing stored):",
        matched.len(),
    )?;
    for row in &matched {
        writeln!(
            out,
            "  event {:>6}  {:<20}  {:<16} {:<22} route {:?} -> sink {:?}",
            row.event_id,
            row.received_at.get(..19).unwrap_or_default(),
            printable(&row.source),
            printable(&row.event_type),
            printable(&row.route),
            printable(&row.sink),
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

fn list(args: &ListArgs) -> anyhow::Result<ExitCode> {
    let (_, tools) = tools(&args.config, Access::Read)?;
    let now = Timestamp::now();
    let silences = tools.silences(args.expired, now)?;
    let mut out = std::io::stdout().lock();
    if args.json {
        for silence in &silences {
            writeln!(out, "{}", with_state(silence, now)?)?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(
        out,
        "{:>4}  {:<8} {:<20} {:<20} {:<12} {:<40}  COMMENT",
        "ID", "STATE", "STARTS", "ENDS", "AUTHOR", "MATCHES"
    )?;
    for s in &silences {
        writeln!(
            out,
            "{:>4}  {:<8} {:<20} {:<20} {:<12} {:<40}  {}",
            s.id,
            s.state(now),
            short(s.starts_at),
            short(s.ends_at),
            printable(&s.author),
            printable(&describe(&s.matchers)),
            printable(&s.comment),
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

fn show(args: &ShowArgs) -> anyhow::Result<ExitCode> {
    let (_, tools) = tools(&args.config, Access::Read)?;
    let now = Timestamp::now();
    let Some((silence, rows)) = tools.silence(args.id, args.limit)? else {
        eprintln!("no silence {}", args.id);
        return Ok(ExitCode::from(1));
    };
    let mut out = std::io::stdout().lock();
    if args.json {
        let mut shown = with_state(&silence, now)?;
        shown["silenced"] = serde_json::to_value(&rows)?;
        writeln!(out, "{}", serde_json::to_string_pretty(&shown)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(out, "silence {}: {}", silence.id, silence.state(now))?;
    writeln!(
        out,
        "  matches:  {}",
        printable(&describe(&silence.matchers))
    )?;
    writeln!(out, "  starts:   {}", silence.starts_at)?;
    writeln!(out, "  ends:     {}", silence.ends_at)?;
    writeln!(out, "  comment:  {}", printable(&silence.comment))?;
    writeln!(out, "  author:   {}", printable(&silence.author))?;
    writeln!(out, "  added:    {}", silence.created_at)?;
    writeln!(out, "silenced {} deliveries (newest first):", rows.len())?;
    for row in &rows {
        writeln!(
            out,
            "  event {:>6}  job {:>6}  {:<20} {:<16} {:<22} route {:?} -> sink {:?}",
            row.event_id,
            row.job_id.unwrap_or_default(),
            printable(row.received_at.get(..19).unwrap_or(&row.received_at)),
            printable(&row.source),
            printable(&row.event_type),
            printable(row.route.as_deref().unwrap_or("-")),
            printable(row.sink.as_deref().unwrap_or("-")),
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

fn expire(args: &ExpireArgs) -> anyhow::Result<ExitCode> {
    let (_, tools) = tools(&args.config, Access::Write)?;
    let now = Timestamp::now();
    if tools.expire_silence(args.id, now)? {
        let mut out = std::io::stdout().lock();
        match tools.silence(args.id, 0)? {
            Some((silence, _)) if args.json => {
                writeln!(out, "{}", with_state(&silence, now)?)?;
            }
            _ => writeln!(out, "silence {} expired at {now}", args.id)?,
        }
        return Ok(ExitCode::SUCCESS);
    }
    match tools.silence(args.id, 0)? {
        Some((silence, _)) => eprintln!(
            "silence {} had already ended at {}",
            args.id, silence.ends_at
        ),
        None => eprintln!("no silence {}", args.id),
    }
    Ok(ExitCode::from(1))
}

/// A silence as JSON, with its state at `now`.
fn with_state(silence: &Silence, now: Timestamp) -> anyhow::Result<serde_json::Value> {
    let mut value = serde_json::to_value(silence)?;
    value["state"] = serde_json::to_value(silence.state(now))?;
    Ok(value)
}

/// What a silence matches, as one line: `route="x" type="alert.*" when=…`.
fn describe(m: &Matchers) -> String {
    [
        ("route", &m.route),
        ("sink", &m.sink),
        ("source", &m.source),
        ("type", &m.event_type),
        ("when", &m.when),
    ]
    .into_iter()
    .filter_map(|(key, value)| value.as_ref().map(|v| format!("{key}={v:?}")))
    .collect::<Vec<_>>()
    .join(" ")
}

fn short(at: Timestamp) -> String {
    let text = at.to_string();
    text.get(..19).unwrap_or(&text).to_owned()
}
