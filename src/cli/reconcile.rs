//! `hookroute reconcile`: how each source's reconcile passes went; `--dry-run`, what a pass
//! would synthesise now (the command asks the API itself and reads the database, storing
//! nothing); `--once`, a pass now, begun by the running daemon (the one on the database,
//! or one of its replicas) and awaited here.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Args;
use jiff::Timestamp;

use super::DEFAULT_CONFIG;
use super::tools::admin;
use crate::config::{self, Config};
use crate::store::admin::{Access, Tools};
use crate::text::printable;

/// How often `--once` reads whether its pass has ended.
const POLL: Duration = Duration::from_millis(200);

#[derive(Debug, Args)]
pub struct ReconcileArgs {
    /// Configuration file (its `[storage]`, and the sources' `api` tables).
    #[arg(long, short, default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// Only this source; every source with an `api` table if not given.
    #[arg(long)]
    pub source: Option<String>,
    /// Print what a pass would synthesise now (asking the API, reading the database), and
    /// store nothing.
    #[arg(long, conflicts_with = "once")]
    pub dry_run: bool,
    /// Have the running daemon pass now, and print how it went.
    #[arg(long)]
    pub once: bool,
    /// How long `--once` waits for a daemon to take the request and finish its pass.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub wait: Duration,
    /// One JSON object per line.
    #[arg(long)]
    pub json: bool,
}

pub(super) fn run(args: &ReconcileArgs) -> anyhow::Result<ExitCode> {
    let (config, tools) = admin(
        &args.config,
        if args.once {
            Access::Write
        } else {
            Access::Read
        },
    )?;
    let sources = sources(&config, args.source.as_deref(), args.once)?;
    if args.dry_run {
        dry_run(args, &tools, &sources)
    } else if args.once {
        once(args, tools, &sources)
    } else {
        status(args, &tools, &sources)
    }
}

/// The sources to act on: `only`, or every one with an API; with `interval`, each must
/// reconcile (a daemon runs passes only for those).
fn sources(config: &Config, only: Option<&str>, interval: bool) -> anyhow::Result<Vec<String>> {
    let with_api = config.sources.iter().filter(|source| source.api.is_some());
    let names: Vec<String> = match only {
        Some(name) => {
            let Some(source) = config.sources.iter().find(|source| source.name == name) else {
                bail!("no source named {:?} in the configuration", printable(name));
            };
            match &source.api {
                None => bail!(
                    "source {name:?} has no [sources.{name}.api] table: it does not reconcile"
                ),
                Some(api) if interval && api.reconcile.is_none() => bail!(
                    "source {name:?} does not reconcile: set sources.{name}.api.reconcile (an interval) and reload"
                ),
                Some(_) => vec![name.to_owned()],
            }
        }
        None => with_api
            .filter(|source| {
                !interval
                    || source
                        .api
                        .as_ref()
                        .is_some_and(|api| api.reconcile.is_some())
            })
            .map(|source| source.name.clone())
            .collect(),
    };
    if names.is_empty() {
        bail!(
            "no source reconciles: give one an [sources.<name>.api] table with a reconcile interval"
        );
    }
    Ok(names)
}

fn status(args: &ReconcileArgs, tools: &Tools, sources: &[String]) -> anyhow::Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    for source in sources {
        let row = tools.pass(source)?;
        if args.json {
            writeln!(out, "{}", serde_json::to_string(&row)?)?;
        } else {
            writeln!(out, "{}", row.said())?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn dry_run(args: &ReconcileArgs, tools: &Tools, sources: &[String]) -> anyhow::Result<ExitCode> {
    let runtime = super::runtime()?;
    let mut out = std::io::stdout().lock();
    let mut failed = false;
    for source in sources {
        // The key of this source alone: the others may be credentials this shell cannot see.
        let config = config::load_for_source(&args.config, source)?;
        let settings = config
            .sources
            .iter()
            .find(|s| &s.name == source)
            .and_then(|s| s.api.clone())
            .context("the source lost its api table")?;
        let api = crate::api::Api::new(&settings)?.context("the API key was not read")?;
        let since = tools.pass_since(source, settings.lookback, Timestamp::now())?;
        let listed = runtime.block_on(crate::reconcile::synthesise(&api, source, since));
        let (events, count) = match listed {
            Ok(listed) => listed,
            Err(err) => {
                failed = true;
                writeln!(out, "{}: {err}", printable(source))?;
                continue;
            }
        };
        let ids: Vec<String> = events.iter().map(|e| e.event.delivery_id.clone()).collect();
        let stored = tools.seen(source, &ids)?;
        let new: Vec<&crate::event::Event> = events
            .iter()
            .map(|synthesised| &synthesised.event)
            .filter(|event| !stored.contains(&event.delivery_id))
            .collect();
        if args.json {
            for event in &new {
                let line = serde_json::json!({
                    "source": source,
                    "delivery_id": event.delivery_id,
                    "type": event.event_type,
                    "body": event.payload.value(),
                });
                writeln!(out, "{line}")?;
            }
            continue;
        }
        writeln!(
            out,
            "{}: listed {count}; {} would be reconciled, {} already stored",
            printable(source),
            new.len(),
            events.len() - new.len()
        )?;
        for event in new {
            let field = |value: Option<&serde_json::Value>| match value {
                Some(serde_json::Value::String(text)) => printable(text).into_owned(),
                Some(other) => other.to_string(),
                None => String::new(),
            };
            writeln!(
                out,
                "  {:<40} {:<16} {:<24} {}",
                printable(&event.delivery_id),
                printable(&event.event_type),
                field(event.data().get("domain")),
                field(event.payload.value().get("created_at")),
            )?;
        }
    }
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn once(args: &ReconcileArgs, mut tools: Tools, sources: &[String]) -> anyhow::Result<ExitCode> {
    let mut before = Vec::new();
    for source in sources {
        before.push(tools.pass(source)?);
        tools.request_pass(source, Timestamp::now())?;
    }
    let deadline = std::time::Instant::now() + args.wait;
    let mut out = std::io::stdout().lock();
    let mut ok = true;
    for earlier in before {
        let ended = loop {
            let row = tools.pass(&earlier.source)?;
            let taken = row.requested_at.is_none() && row.held_by.is_none();
            if taken && row.finished_at.is_some() && row.finished_at != earlier.finished_at {
                break Some(row);
            }
            if std::time::Instant::now() >= deadline {
                break None;
            }
            std::thread::sleep(POLL);
        };
        let Some(row) = ended else {
            ok = false;
            writeln!(
                out,
                "{}: no daemon finished a pass within {}; the request stands, and the next daemon to look begins it",
                printable(&earlier.source),
                humantime::format_duration(args.wait)
            )?;
            continue;
        };
        ok &= row.outcome.as_deref() == Some(crate::store::passes::OK);
        if args.json {
            writeln!(out, "{}", serde_json::to_string(&row)?)?;
        } else {
            writeln!(out, "{}", row.said())?;
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
