//! The operator's tools: `deliveries list` and `show`, `replay`, `retry`, `dead-letter retry`.
//! They work on the database while the daemon runs, through [`Tools`]. When one cannot
//! do what was asked, it says where things stand and which command would do it instead.

use std::io::Write as _;

use anyhow::Context as _;
use std::process::ExitCode;

use super::{DeadRetryArgs, ListArgs, MigrateArgs, ReplayArgs, RetryArgs, ShowArgs};
use crate::actions::{self, Queued, Refused};
use crate::config::{self, Config};
use crate::store::admin::{Access, EventDetail, Filter, RowStatus, Tools};
use crate::text::{printable, printable_lines};

pub(super) fn admin(
    config_path: &std::path::Path,
    access: Access,
) -> anyhow::Result<(Config, Tools)> {
    let config = config::load_for_tools(config_path)?;
    let admin = crate::store::open_admin(&config.storage, access)?;
    Ok((config, admin))
}

pub(super) fn list(args: ListArgs) -> anyhow::Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    let (_, admin) = admin(&args.config, Access::Read)?;
    let since = args
        .since
        .map(|since| {
            since
                .at(jiff::Timestamp::now())
                .context("--since reaches before the first time there is")
        })
        .transpose()?;
    let filter = Filter {
        // One of STATUSES: clap took nothing else.
        status: args.status.as_deref().and_then(RowStatus::parse),
        source: args.source,
        sink: args.sink,
        route: args.route,
        event_type: args.event_type,
        since,
        before: args.before,
        limit: args.limit,
    };
    let rows = admin.list(&filter)?;
    if args.json {
        for row in &rows {
            writeln!(out, "{}", serde_json::to_string(row)?)?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(
        out,
        "{:>6} {:>6}  {:<20} {:<16} {:<22} {:<24} {:<14} {:<10} {:>3}  DETAIL",
        "EVENT", "JOB", "RECEIVED", "SOURCE", "TYPE", "ROUTE", "SINK", "STATUS", "TRY"
    )?;
    for row in &rows {
        let detail = match (&row.detail, &row.next_attempt_at) {
            (Some(detail), Some(next)) => format!("{detail} (next try {next})"),
            (Some(detail), None) => detail.clone(),
            (None, Some(next)) => format!("next try {next}"),
            (None, None) => String::new(),
        };
        // Every column a stranger may have written is shown escaped (see `text::printable`),
        // so no row can erase, split or forge another.
        writeln!(
            out,
            "{:>6} {:>6}  {:<20} {:<16} {:<22} {:<24} {:<14} {:<10} {:>3}  {}",
            row.event_id,
            row.job_id
                .map(|id| id.to_string())
                .unwrap_or_else(|| "-".into()),
            printable(row.received_at.get(..19).unwrap_or(&row.received_at)),
            printable(&row.source),
            printable(&row.event_type),
            printable(row.route.as_deref().unwrap_or("-")),
            printable(row.sink.as_deref().unwrap_or("-")),
            row.status,
            row.attempts,
            printable(&detail),
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) fn show(args: ShowArgs) -> anyhow::Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    let (_, admin) = admin(&args.config, Access::Read)?;
    // Event ids and job ids are both small numbers: say so when the other kind exists.
    let event_id = if args.job {
        let Some(event_id) = admin.job(args.id)?.map(|job| job.event_id) else {
            let hint = if admin.show(args.id)?.is_some() {
                format!(" (event {0} exists: `deliveries show {0}`)", args.id)
            } else {
                String::new()
            };
            eprintln!("no job {}{hint}", args.id);
            return Ok(ExitCode::from(1));
        };
        event_id
    } else {
        args.id
    };
    let Some(EventDetail {
        stored,
        jobs,
        routing: notes,
    }) = admin.show(event_id)?
    else {
        let hint = match admin.job(event_id)? {
            Some(_) => format!(" (job {0} exists: `deliveries show --job {0}`)", event_id),
            None => String::new(),
        };
        eprintln!("no event {event_id}{hint}");
        return Ok(ExitCode::from(1));
    };
    if args.json {
        /// Serialised straight to text: going through a `serde_json::Value` would parse the
        /// payload again, and a body serde_json cannot hold as a tree (`1e999`) would fail.
        #[derive(serde::Serialize)]
        struct Shown<'a> {
            id: i64,
            received_at: String,
            origin: &'static str,
            event: &'a crate::event::Event,
            jobs: &'a [crate::store::admin::JobDetail],
            routing: &'a [crate::store::admin::Row],
        }
        let shown = Shown {
            id: stored.id,
            received_at: stored.received_at.to_string(),
            origin: stored.event.origin(),
            event: &stored.event,
            jobs: &jobs,
            routing: &notes,
        };
        writeln!(out, "{}", serde_json::to_string_pretty(&shown)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    let event = &stored.event;
    writeln!(
        out,
        "event {}: {} from {}",
        stored.id,
        printable(&event.event_type),
        printable(&event.source)
    )?;
    writeln!(out, "  delivery id:   {}", printable(&event.delivery_id))?;
    writeln!(out, "  origin:        {}", event.origin())?;
    if let Some(header) = &event.sender_delivery {
        writeln!(out, "  sender's id:   {}", printable(header))?;
    }
    writeln!(out, "  received:      {}", stored.received_at)?;
    if let Some(at) = event.occurred_at {
        writeln!(out, "  occurred:      {at}")?;
    }
    // JSON escapes control characters in strings, but not bidirectional overrides.
    writeln!(
        out,
        "  payload:       {}",
        printable_lines(
            &serde_json::to_string_pretty(event.payload.value())?,
            "                 "
        )
    )?;
    for note in &notes {
        writeln!(
            out,
            "  {}: {}{}",
            note.status,
            printable(note.route.as_deref().unwrap_or("no route matched")),
            note.detail
                .as_ref()
                .map(|k| format!(" (throttle key \"{}\")", printable(k)))
                .unwrap_or_default()
        )?;
    }
    for job in &jobs {
        writeln!(
            out,
            "job {} (event {}): route \"{}\" -> sink \"{}\": {} after {} attempt(s)",
            job.id,
            stored.id,
            printable(&job.route),
            printable(&job.sink),
            job.status,
            job.attempts
        )?;
        if let Some(next) = &job.next_attempt_at {
            writeln!(out, "  next try:      {next}")?;
        }
        if let Some(quiet) = &job.quiet {
            writeln!(out, "  {}", printable(quiet))?;
        }
        for attempt in &job.history {
            writeln!(
                out,
                "  attempt {} at {}: {}",
                attempt.number, attempt.started_at, attempt.outcome
            )?;
            if let Some(error) = &attempt.error {
                writeln!(out, "    error:       {}", printable(error))?;
            }
            if let Some(response) = attempt.response.as_deref().filter(|r| !r.is_empty()) {
                writeln!(
                    out,
                    "    response:    {}",
                    printable_lines(response, "                 ")
                )?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) fn replay(args: ReplayArgs) -> anyhow::Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    let (config, mut admin) = admin(&args.config, Access::Write)?;
    match actions::replay(
        &mut admin,
        &config,
        args.id,
        args.sink.as_deref(),
        args.force,
    ) {
        Ok(queued) => {
            for Queued { job, route, sink } in queued {
                writeln!(
                    out,
                    "queued job {job}: event {} via route {route:?} to sink {sink:?}",
                    args.id
                )?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(Refused::Twice { event, waiting }) => {
            for job in waiting {
                eprintln!(
                    "event {event} already has job {} waiting for sink \"{}\" ({})",
                    job.id,
                    printable(&job.sink),
                    actions::standing(&job)
                );
            }
            eprintln!(
                "nothing queued: `hookroute retry JOB` tries a failed job now; --force queues another \
                 job anyway (the sink may get the event twice)"
            );
            Ok(ExitCode::from(1))
        }
        Err(Refused::NoSink(sink)) => {
            anyhow::bail!("no sink named {sink:?} in {}", config.file.display())
        }
        Err(Refused::NoRoute(id)) => {
            eprintln!("no route matches event {id}; nothing queued (name a sink with --sink)");
            Ok(ExitCode::from(1))
        }
        Err(refused) => refused_or_failed(refused),
    }
}

pub(super) fn retry(args: RetryArgs) -> anyhow::Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    let (_, admin) = admin(&args.config, Access::Write)?;
    match actions::retry(&admin, args.job) {
        Ok(job) => {
            writeln!(
                out,
                "job {} (event {} to sink \"{}\") is due now; it keeps its {} attempt(s)",
                job.id,
                job.event_id,
                printable(&job.sink),
                job.attempts
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Err(refused) => refused_or_failed(refused),
    }
}

pub(super) fn retry_dead(args: DeadRetryArgs) -> anyhow::Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    let (_, admin) = admin(&args.config, Access::Write)?;
    let one = args.id.map(|id| [id]);
    match actions::retry_dead(&admin, one.as_ref().map(|one| &one[..])) {
        Ok(count) => {
            writeln!(
                out,
                "re-queued {count} dead deliver{}",
                if count == 1 { "y" } else { "ies" }
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Err(refused) => refused_or_failed(refused),
    }
}

/// An action that did nothing: exit 1 with why (and what would do what was meant); a
/// database error fails the command.
fn refused_or_failed(refused: Refused) -> anyhow::Result<ExitCode> {
    match refused {
        Refused::Store(err) => Err(err.into()),
        refused => {
            eprintln!("{refused}");
            Ok(ExitCode::from(1))
        }
    }
}

pub(super) async fn migrate_storage(args: MigrateArgs) -> anyhow::Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    if let Err(problem) = crate::config::check_postgres_url(&args.to) {
        anyhow::bail!("--to {problem}");
    }
    let to = crate::config::PostgresConfig {
        url: args.to,
        password: args.password_file.map(|file| crate::secret::SecretSource {
            file: Some(file),
            ..Default::default()
        }),
        pool_size: 2,
        lease: std::time::Duration::from_secs(10),
    };
    let copied = crate::store::postgres::import::from_sqlite(&args.from, &to).await?;
    for (table, rows) in copied {
        writeln!(out, "{table:<12} {rows} rows copied")?;
    }
    writeln!(
        out,
        "done: point [storage] url at {} and start the daemons",
        to.url
    )?;
    Ok(ExitCode::SUCCESS)
}
