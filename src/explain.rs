//! What the configuration does, and what it would do with an event, as text for people:
//! `check-config` and `route-test` print it, and the status page shows it. Written once so
//! the page and the command line never disagree. Every value a sender wrote goes through
//! [`printable`], so no event can forge a line.

use crate::config::Config;
use crate::event::Event;
use crate::rules::Verdict;
use crate::text::printable;

/// What `check-config` prints: enough to see at a glance what the daemon will do.
pub fn summary(config: &Config) -> String {
    let now = jiff::Timestamp::now();
    use std::fmt::Write as _;
    let mut out = String::new();
    let server = &config.server;
    let _ = writeln!(out, "configuration OK: {}", config.file.display());
    let _ = writeln!(out, "listen:      http://{}", server.listen);
    if let Some(admin) = &config.admin {
        let _ = writeln!(
            out,
            "status page: http://{} ({} users)",
            admin.listen,
            admin.users.len()
        );
    }
    let _ = writeln!(
        out,
        "database:    {} (dedupe records kept {})",
        config.storage.describe(),
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
        if let Some(api) = &source.api {
            let _ = write!(out, " api={}", api.base_url);
            if let Some(every) = api.reconcile {
                let _ = write!(
                    out,
                    " reconcile={} lookback={}",
                    humantime::format_duration(every),
                    humantime::format_duration(api.lookback)
                );
            }
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
        if let Some(group) = &route.group {
            let _ = write!(
                out,
                " group by {:?} wait={} interval={} max={}",
                group.by,
                humantime::format_duration(group.wait),
                humantime::format_duration(group.interval),
                group.max
            );
        }
        if !route.mute_during.is_empty() {
            let _ = write!(out, " mute_during={:?}", route.mute_during);
        }
        if !route.active_during.is_empty() {
            let _ = write!(out, " active_during={:?}", route.active_during);
        }
        if !route.enrich.is_empty() {
            let asked: Vec<&str> = route
                .enrich
                .iter()
                .map(|what| match what {
                    crate::rules::Enrich::Report => "report",
                    crate::rules::Enrich::Pdf => "pdf",
                })
                .collect();
            let required = if route.enrich_required {
                " (required)"
            } else {
                ""
            };
            let _ = write!(out, " enrich={}{required}", asked.join(","));
        }
        if route.continue_ {
            out.push_str(" continue");
        }
        out.push('\n');
    }
    let kinds: Vec<&str> = config.internal.kinds.iter().map(|k| k.name()).collect();
    let takers: Vec<String> = routing
        .table
        .routes()
        .iter()
        .filter(|route| {
            config
                .internal
                .kinds
                .iter()
                .any(|kind| route.takes_internal(&kind.event_type()))
        })
        .map(|route| format!("{:?}", route.name))
        .collect();
    let _ = writeln!(
        out,
        "hookroute's own events: {} -> {}",
        if kinds.is_empty() {
            "none".to_owned()
        } else {
            kinds.join(", ")
        },
        if takers.is_empty() {
            "no route asks for them (logged only)".to_owned()
        } else {
            format!("routes {}", takers.join(", "))
        }
    );
    if !routing.windows.is_empty() {
        let _ = writeln!(out, "time intervals (now {now}):");
    }
    for window in routing.windows.values() {
        let state = if window.contains(now) {
            "in it now"
        } else {
            "not in it now"
        };
        let next = window.next_change(now).map_or_else(
            || "never changes".to_owned(),
            |at| {
                let local = at.to_zoned_datetime(window.zone.clone());
                format!(
                    "changes at {} ({})",
                    local.strftime("%Y-%m-%d %H:%M %Z"),
                    at
                )
            },
        );
        let _ = writeln!(
            out,
            "  {:<18} {} ({state}; {next})",
            window.name, window.location
        );
    }
    for warning in config.warnings() {
        let _ = writeln!(out, "warning: {warning}");
    }
    out
}

/// Every route's verdict on `event` and why, and what each matched sink would get; returns the
/// text and how many routes matched.
pub fn verdicts(config: &Config, event: &Event, at: jiff::Timestamp) -> (String, usize) {
    use std::fmt::Write as _;
    let routing = &config.routing;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "event: {} from {} (delivery id {})",
        printable(&event.event_type),
        printable(&event.source),
        printable(&event.delivery_id)
    );
    let mut matched = 0;
    for (i, (route, verdict)) in routing.table.evaluate(event).into_iter().enumerate() {
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
                if let Some(why) = routing.muted(route, at) {
                    let _ = writeln!(out, "   muted {why} at {at}: recorded, not delivered");
                }
                if let (Some(throttle), Some(key)) = (&route.throttle, throttle_key) {
                    let _ = writeln!(
                        out,
                        "   throttle: first event per key \"{}\" every {} passes (not applied in a test)",
                        printable(&key),
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
                    let message = routing.message((&route.name, name, kind), event, None);
                    for line in std::iter::once(message.title.as_str()).chain(message.body.lines())
                    {
                        let _ = writeln!(out, "      | {}", printable(line));
                    }
                    // Slack and email show the link beside the message (`Delivery::context`).
                    if let Some(link) = message.link_beside() {
                        let _ = writeln!(out, "      link: {}", printable(link));
                    }
                }
            }
            Verdict::NoEventMatch => {
                let _ = writeln!(
                    out,
                    "no match: \"{}\" is not one of {:?}",
                    printable(&event.event_type),
                    route.event_globs
                );
            }
            Verdict::NoSourceMatch => {
                let _ = writeln!(
                    out,
                    "no match: source \"{}\" is not one of {:?}",
                    printable(&event.source),
                    route.sources
                );
            }
            Verdict::ConditionFalse => {
                let _ = writeln!(out, "no match: when `{when}` is false");
            }
            Verdict::ConditionError { reason } => {
                // The reason says "cannot evaluate: …".
                let _ = writeln!(out, "no match: when `{when}` {reason}");
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
    (out, matched)
}
