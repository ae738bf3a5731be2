//! The command line: `serve`, `check-config` and `send`. Decides exit codes:
//! 0 ok, 1 a check failed (e.g. a delivery was refused), 2 bad configuration or startup failure.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use axum::http::{HeaderMap, HeaderName, HeaderValue, header};
use clap::{Args, Parser, Subcommand};
use sha2::{Digest, Sha256};

use crate::config::{self, Config};
use crate::event::Event;
use crate::rules::Verdict;
use crate::signature::{COMPLIANCELAYER_DELIVERY, COMPLIANCELAYER_EVENT, Scheme};
use crate::store::admin::{AdminStorage, EventDetail, Filter};

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
    /// Queue an event's delivery again: through the current routes, or to one sink.
    Replay(ReplayArgs),
    /// Dead letters: deliveries that failed for good.
    #[command(subcommand)]
    DeadLetter(DeadLetterCommand),
}

#[derive(Debug, Subcommand)]
pub enum DeliveriesCommand {
    /// Deliveries, newest first: one row per job, suppressed route or unrouted event.
    List(ListArgs),
    /// An event, its routes, and every delivery attempt.
    Show(ShowArgs),
}

#[derive(Debug, Subcommand)]
pub enum DeadLetterCommand {
    /// Put dead deliveries back in the queue with a fresh set of attempts.
    Retry(RetryArgs),
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[arg(long, short, default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(crate::store::admin::STATUSES))]
    pub status: Option<String>,
    #[arg(long)]
    pub source: Option<String>,
    /// Only events received within this long, e.g. "1h", "7d".
    #[arg(long, value_parser = humantime::parse_duration)]
    pub since: Option<Duration>,
    #[arg(long, default_value_t = 100)]
    pub limit: usize,
    /// One JSON object per line.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    #[arg(long, short, default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// Event id (the `id` the daemon answered with, or the EVENT column of `list`).
    pub id: i64,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ReplayArgs {
    #[arg(long, short, default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// Event id.
    pub id: i64,
    /// Deliver to this sink only (even if no route sends this event there).
    #[arg(long)]
    pub sink: Option<String>,
}

#[derive(Debug, Args)]
pub struct RetryArgs {
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
    /// The source the event comes from; defaults to the first configured source.
    #[arg(long)]
    pub source: Option<String>,
    /// The event's JSON body, as the sender would post it.
    pub event: PathBuf,
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
        Command::CheckConfig(args) => check_config(args),
        Command::Send(args) => runtime()?.block_on(send(args)),
        Command::RouteTest(args) => route_test(args),
        Command::Deliveries(DeliveriesCommand::List(args)) => list(args),
        Command::Deliveries(DeliveriesCommand::Show(args)) => show(args),
        Command::Replay(args) => replay(args),
        Command::DeadLetter(DeadLetterCommand::Retry(args)) => retry_dead(args),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn serve(args: ConfigArg) -> anyhow::Result<ExitCode> {
    let config = config::load(&args.config)?;
    runtime()?.block_on(async {
        let listen = config.server.listen;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        crate::run(config, listener, shutdown_signal()).await?;
        Ok(ExitCode::SUCCESS)
    })
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

fn check_config(args: ConfigArg) -> anyhow::Result<ExitCode> {
    let config = config::load(&args.config)?;
    print!("{}", summary(&config));
    Ok(ExitCode::SUCCESS)
}

/// What `check-config` prints: enough to see at a glance what the daemon will do.
fn summary(config: &Config) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let server = &config.server;
    let _ = writeln!(out, "configuration OK: {}", config.file.display());
    let _ = writeln!(out, "listen:      http://{}", server.listen);
    let _ = writeln!(
        out,
        "database:    {} (dedupe records kept {})",
        config.storage.path.display(),
        humantime::format_duration(config.storage.dedupe_retention)
    );
    match &server.rate_limit {
        Some(l) => {
            let _ = writeln!(
                out,
                "rate limit:  {}/s per client (burst {}); failed signatures {}/min (burst {})",
                l.per_second, l.burst, l.failed_per_minute, l.failed_burst
            );
        }
        None => {
            let _ = writeln!(out, "rate limit:  off");
        }
    }
    if !server.trusted_proxies.is_empty() {
        let proxies: Vec<String> = server
            .trusted_proxies
            .iter()
            .map(ToString::to_string)
            .collect();
        let _ = writeln!(
            out,
            "proxies:     X-Forwarded-For trusted from {}",
            proxies.join(", ")
        );
    }
    let _ = writeln!(out, "sources:");
    for source in &config.sources {
        let _ = write!(
            out,
            "  {:<18} POST {:<28} scheme={} secrets={}",
            source.name,
            source.path,
            source.verifier.scheme().name(),
            source.verifier.key_count()
        );
        if !source.allowed_ips.is_empty() {
            let nets: Vec<String> = source.allowed_ips.iter().map(ToString::to_string).collect();
            let _ = write!(out, " allowed_ips={}", nets.join(","));
        }
        if let Some(age) = source.max_event_age {
            let _ = write!(out, " max_event_age={}", humantime::format_duration(age));
        }
        out.push('\n');
    }
    let _ = writeln!(out, "sinks:");
    if config.sinks.is_empty() {
        let _ = writeln!(out, "  (none: events are stored but go nowhere)");
    }
    for sink in &config.sinks {
        let _ = writeln!(out, "  {:<18} {}", sink.name, sink.spec.config().kind());
    }
    let routing = &config.routing;
    let _ = writeln!(
        out,
        "routes (from {}, first match wins unless continue):",
        routing.origin.display()
    );
    if routing.table.is_empty() {
        let _ = writeln!(out, "  (none: every event is stored as unrouted)");
    }
    for (i, route) in routing.table.routes().iter().enumerate() {
        let _ = write!(
            out,
            "  {}. {:?} events={:?}",
            i + 1,
            route.name,
            route.event_globs
        );
        if !route.sources.is_empty() {
            let _ = write!(out, " sources={:?}", route.sources);
        }
        if let Some(when) = &route.when {
            let _ = write!(out, " when=`{}`", when.text());
        }
        let _ = write!(out, " -> {}", route.sinks.join(", "));
        if let Some(throttle) = &route.throttle {
            let key = throttle
                .key
                .as_ref()
                .map_or("(one window)".to_owned(), |k| format!("`{}`", k.text()));
            let _ = write!(
                out,
                " throttle={} per {key}",
                humantime::format_duration(throttle.window)
            );
        }
        if route.continue_ {
            out.push_str(" continue");
        }
        out.push('\n');
    }
    for warning in &routing.warnings {
        let _ = writeln!(out, "warning: {warning}");
    }
    out
}

fn route_test(args: RouteTestArgs) -> anyhow::Result<ExitCode> {
    use std::fmt::Write as _;
    let config = config::load(&args.config)?;
    let source = match &args.source {
        Some(name) => config
            .sources
            .iter()
            .find(|s| &s.name == name)
            .map(|s| s.name.clone())
            .with_context(|| format!("no source named {name:?} in {}", config.file.display()))?,
        None => config
            .sources
            .first()
            .map(|s| s.name.clone())
            .unwrap_or_default(),
    };
    let body = std::fs::read(&args.event)
        .with_context(|| format!("cannot read {}", args.event.display()))?;
    let event = Event::parse(&source, &body, None, None)
        .with_context(|| format!("{} is not an event", args.event.display()))?;

    let routing = &config.routing;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "event: {} from {} (delivery id {})",
        event.event_type, event.source, event.delivery_id
    );
    let mut matched = 0;
    for (i, (route, verdict)) in routing.table.evaluate(&event).into_iter().enumerate() {
        let _ = write!(out, "{}. {:?}: ", i + 1, route.name);
        let when = route.when.as_ref().map(|w| w.text()).unwrap_or_default();
        match verdict {
            Verdict::Matched {
                condition,
                throttle_key,
            } => {
                matched += 1;
                out.push_str("MATCHED");
                if let Some(value) = condition {
                    let _ = write!(out, " (when `{when}` is {value})");
                }
                out.push('\n');
                if let (Some(throttle), Some(key)) = (&route.throttle, throttle_key) {
                    let _ = writeln!(
                        out,
                        "   throttle: first event per key {key:?} every {} passes (not applied in a test)",
                        humantime::format_duration(throttle.window)
                    );
                }
                for name in &route.sinks {
                    let Some(sink) = config.sinks.iter().find(|s| &s.name == name) else {
                        continue;
                    };
                    let kind = sink.spec.config().kind();
                    let _ = writeln!(out, "   -> {name} ({kind}):");
                    if let Some(what) = sink.spec.config().without_message() {
                        let _ = writeln!(out, "      {what}");
                        continue;
                    }
                    let message = routing.message(&route.name, name, kind, &event);
                    for line in std::iter::once(message.title.as_str()).chain(message.body.lines())
                    {
                        let _ = writeln!(out, "      | {line}");
                    }
                }
            }
            Verdict::NoEventMatch => {
                let _ = writeln!(
                    out,
                    "no match: {:?} is not one of {:?}",
                    event.event_type, route.event_globs
                );
            }
            Verdict::NoSourceMatch => {
                let _ = writeln!(
                    out,
                    "no match: source {:?} is not one of {:?}",
                    event.source, route.sources
                );
            }
            Verdict::ConditionFalse { value } => {
                let _ = writeln!(out, "no match: when `{when}` is {value}");
            }
            Verdict::NotReached => {
                let _ = writeln!(
                    out,
                    "not reached: an earlier route matched without continue"
                );
            }
        }
    }
    if matched == 0 {
        let _ = writeln!(
            out,
            "result: no route matched; the daemon would store the event as unrouted"
        );
    } else {
        let _ = writeln!(out, "result: {matched} route(s) matched");
    }
    print!("{out}");
    Ok(if matched == 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

async fn send(args: SendArgs) -> anyhow::Result<ExitCode> {
    let config = config::load(&args.config)?;
    let source = config
        .sources
        .iter()
        .find(|s| s.name == args.source)
        .with_context(|| {
            let names: Vec<&str> = config.sources.iter().map(|s| s.name.as_str()).collect();
            format!(
                "no source named {:?} in {}; configured: {}",
                args.source,
                config.file.display(),
                names.join(", ")
            )
        })?;
    let body = std::fs::read(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let url = args.url.unwrap_or_else(|| {
        format!(
            "http://{}{}",
            connectable(config.server.listen),
            source.path
        )
    });

    let payload: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let event_type = ["type", "event"]
        .iter()
        .find_map(|k| payload.get(*k)?.as_str())
        .unwrap_or_default();
    // A stable id: sending the same file twice is the same delivery, as a sender's retry is.
    let id = match payload.get("id") {
        Some(serde_json::Value::String(id)) => id.clone(),
        _ => format!("msg_{}", &hex::encode(Sha256::digest(&body))[..24]),
    };
    let now = jiff::Timestamp::now().as_second();
    let mut headers: HeaderMap = source.verifier.sign(&body, now, &id).into_iter().collect();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(
        header::USER_AGENT,
        HeaderValue::from_static(concat!("hookroute-send/", env!("CARGO_PKG_VERSION"))),
    );
    if matches!(source.verifier.scheme(), Scheme::ComplianceLayer { .. }) {
        if let Ok(value) = HeaderValue::from_str(event_type) {
            headers.insert(HeaderName::from_static(COMPLIANCELAYER_EVENT), value);
        }
        if let Ok(value) = HeaderValue::from_str(&id) {
            headers.insert(HeaderName::from_static(COMPLIANCELAYER_DELIVERY), value);
        }
    }

    let client = reqwest::Client::builder()
        .timeout(SEND_TIMEOUT)
        .build()
        .context("cannot build the HTTP client")?;
    match client.post(&url).headers(headers).body(body).send().await {
        Ok(response) => {
            let status = response.status();
            let text = response.text().await.unwrap_or_default();
            println!("{status} from {url}");
            println!("{text}");
            Ok(if status.is_success() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Err(err) => {
            eprintln!("error: cannot deliver to {url}: {err}");
            Ok(ExitCode::from(1))
        }
    }
}

/// A listen address a client can dial: the wildcard becomes loopback.
fn connectable(listen: SocketAddr) -> SocketAddr {
    match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), listen.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), listen.port())
        }
        _ => listen,
    }
}

fn admin(config_path: &std::path::Path) -> anyhow::Result<(Config, Box<dyn AdminStorage>)> {
    let config = config::load(config_path)?;
    let admin = crate::store::open_admin(&config.storage)?;
    Ok((config, admin))
}

fn list(args: ListArgs) -> anyhow::Result<ExitCode> {
    let (_, admin) = admin(&args.config)?;
    let since = match args.since {
        Some(since) => Some(jiff::Timestamp::now() - jiff::SignedDuration::try_from(since)?),
        None => None,
    };
    let filter = Filter {
        status: args.status,
        source: args.source,
        since,
        limit: args.limit,
    };
    let rows = admin.list(&filter)?;
    if args.json {
        for row in &rows {
            println!("{}", serde_json::to_string(row)?);
        }
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:>6} {:>6}  {:<20} {:<16} {:<22} {:<24} {:<14} {:<10} {:>3}  DETAIL",
        "EVENT", "JOB", "RECEIVED", "SOURCE", "TYPE", "ROUTE", "SINK", "STATUS", "TRY"
    );
    for row in &rows {
        let detail = match (&row.detail, &row.next_attempt_at) {
            (Some(detail), Some(next)) => format!("{detail} (next try {next})"),
            (Some(detail), None) => detail.clone(),
            (None, Some(next)) => format!("next try {next}"),
            (None, None) => String::new(),
        };
        println!(
            "{:>6} {:>6}  {:<20} {:<16} {:<22} {:<24} {:<14} {:<10} {:>3}  {}",
            row.event_id,
            row.job_id
                .map(|id| id.to_string())
                .unwrap_or_else(|| "-".into()),
            row.received_at.get(..19).unwrap_or(&row.received_at),
            row.source,
            row.event_type,
            row.route.as_deref().unwrap_or("-"),
            row.sink.as_deref().unwrap_or("-"),
            row.status,
            row.attempts,
            detail.replace('\n', " "),
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn show(args: ShowArgs) -> anyhow::Result<ExitCode> {
    let (_, admin) = admin(&args.config)?;
    let Some(EventDetail {
        stored,
        jobs,
        routing: notes,
    }) = admin.show(args.id)?
    else {
        eprintln!("no event {}", args.id);
        return Ok(ExitCode::from(1));
    };
    if args.json {
        /// Serialised straight to text: going through a `serde_json::Value` would parse the
        /// payload again, and a body serde_json cannot hold as a tree (`1e999`) would fail.
        #[derive(serde::Serialize)]
        struct Shown<'a> {
            id: i64,
            received_at: String,
            event: &'a crate::event::Event,
            jobs: &'a [crate::store::admin::JobDetail],
            routing: &'a [crate::store::admin::Row],
        }
        let shown = Shown {
            id: stored.id,
            received_at: stored.received_at.to_string(),
            event: &stored.event,
            jobs: &jobs,
            routing: &notes,
        };
        println!("{}", serde_json::to_string_pretty(&shown)?);
        return Ok(ExitCode::SUCCESS);
    }
    let event = &stored.event;
    println!(
        "event {}: {} from {}",
        stored.id, event.event_type, event.source
    );
    println!("  delivery id:   {}", event.delivery_id);
    if let Some(header) = &event.sender_delivery {
        println!("  sender's id:   {header}");
    }
    println!("  received:      {}", stored.received_at);
    if let Some(at) = event.occurred_at {
        println!("  occurred:      {at}");
    }
    println!(
        "  payload:       {}",
        serde_json::to_string_pretty(event.payload.value())?.replace('\n', "\n                 ")
    );
    for note in &notes {
        println!(
            "  {}: {}{}",
            note.status,
            note.route.as_deref().unwrap_or("no route matched"),
            note.detail
                .as_ref()
                .map(|k| format!(" (throttle key {k:?})"))
                .unwrap_or_default()
        );
    }
    for job in &jobs {
        println!(
            "job {}: route {:?} -> sink {:?}: {} after {} attempt(s)",
            job.id, job.route, job.sink, job.status, job.attempts
        );
        if let Some(next) = &job.next_attempt_at {
            println!("  next try:      {next}");
        }
        for attempt in &job.history {
            println!(
                "  attempt {} at {}: {}",
                attempt.number, attempt.started_at, attempt.outcome
            );
            if let Some(error) = &attempt.error {
                println!("    error:       {error}");
            }
            if let Some(response) = attempt.response.as_deref().filter(|r| !r.is_empty()) {
                println!(
                    "    response:    {}",
                    response.replace('\n', "\n                 ")
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn replay(args: ReplayArgs) -> anyhow::Result<ExitCode> {
    let (config, mut admin) = admin(&args.config)?;
    let Some(EventDetail { stored, .. }) = admin.show(args.id)? else {
        eprintln!("no event {}", args.id);
        return Ok(ExitCode::from(1));
    };
    // Replays go through today's routes; throttles are not applied to what an operator asks for.
    let mut pairs: Vec<(String, String)> = crate::dispatch::route(&config.routing, &stored.event)
        .into_iter()
        .flat_map(|to| {
            let route = to.route;
            to.sinks.into_iter().map(move |sink| (route.clone(), sink))
        })
        .filter(|(_, sink)| args.sink.as_ref().is_none_or(|only| only == sink))
        .collect();
    if let Some(sink) = &args.sink {
        anyhow::ensure!(
            config.sinks.iter().any(|s| &s.name == sink),
            "no sink named {sink:?} in {}",
            config.file.display()
        );
        if pairs.is_empty() {
            pairs.push(("replay".into(), sink.clone()));
        }
    }
    pairs.dedup();
    if pairs.is_empty() {
        eprintln!(
            "no route matches event {}; nothing queued (name a sink with --sink)",
            args.id
        );
        return Ok(ExitCode::from(1));
    }
    let ids = admin.enqueue(args.id, &pairs)?;
    for ((route, sink), id) in pairs.iter().zip(ids) {
        println!(
            "queued job {id}: event {} via route {route:?} to sink {sink:?}",
            args.id
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn retry_dead(args: RetryArgs) -> anyhow::Result<ExitCode> {
    let (_, admin) = admin(&args.config)?;
    let count = admin.retry_dead(args.id)?;
    println!(
        "re-queued {count} dead deliver{}",
        if count == 1 { "y" } else { "ies" }
    );
    Ok(if count == 0 && args.id.is_some() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
