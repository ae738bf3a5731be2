//! `check-config` (a summary of what the daemon will do) and `route-test` (what an event
//! would get, and why), both without sending anything.

use std::io::Write as _;
use std::process::ExitCode;

use anyhow::Context as _;

use super::{ConfigArg, RouteTestArgs};
use crate::config;
use crate::event::Event;

pub(super) fn check_config(args: ConfigArg) -> anyhow::Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    let config = config::load(&args.config)?;
    write!(out, "{}", crate::explain::summary(&config))?;
    Ok(ExitCode::SUCCESS)
}

pub(super) fn route_test(args: RouteTestArgs) -> anyhow::Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    // Explaining routes needs no secret, as the operator's tools do not.
    let config = config::load_for_tools(&args.config)?;
    // Routes may depend on the source: without --source, the event is shown from each.
    let sources: Vec<&str> = match &args.source {
        Some(name) => vec![
            config
                .sources
                .iter()
                .find(|s| &s.name == name)
                .map(|s| s.name.as_str())
                .with_context(|| {
                    format!("no source named {name:?} in {}", config.file.display())
                })?,
        ],
        None => config.sources.iter().map(|s| s.name.as_str()).collect(),
    };
    let body = std::fs::read(&args.event)
        .with_context(|| format!("cannot read {}", args.event.display()))?;
    let mut matched = 0;
    for (i, source) in sources.iter().enumerate() {
        let event = Event::parse(source, &body, None, None)
            .with_context(|| format!("{} is not an event", args.event.display()))?;
        if i > 0 {
            writeln!(out)?;
        }
        let at = args.at.unwrap_or_else(jiff::Timestamp::now);
        let (text, n) = crate::explain::verdicts(&config, &event, at);
        write!(out, "{text}")?;
        matched += n;
    }
    Ok(if matched == 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
