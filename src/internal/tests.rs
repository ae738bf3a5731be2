//! The notices' arithmetic, and every kind's message.

use super::*;

fn at(second: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + second).unwrap()
}

#[test]
fn twenty_refusals_in_a_minute_make_one_event_naming_reasons_and_clients() {
    let config = InternalConfig::default();
    let mut watch = Watch::default();
    let mut made = Vec::new();
    for i in 0..45 {
        let reason = if i % 3 == 0 { "stale" } else { "mismatch" };
        let notice = Notice::BadSignature {
            source: "cl".into(),
            reason: reason.into(),
            client: format!("192.0.2.{}", i % 2).parse().unwrap(),
        };
        made.extend(watch.turn(notice, at(i), &config));
    }
    assert_eq!(made.len(), 1, "{made:?}");
    let data = &made[0].data;
    assert_eq!(data["failures"], 20);
    assert_eq!(data["reasons"], json!({"mismatch": 13, "stale": 7}));
    assert_eq!(data["clients"], json!({"192.0.2.0": 10, "192.0.2.1": 10}));
    assert_eq!(
        made[0].id,
        format!("signature.failing:cl:{}", at(19).as_second() / 3600 * 3600)
    );
}

#[test]
fn a_storage_outage_is_told_when_it_ends_and_only_if_on() {
    let mut config = InternalConfig::default();
    let mut watch = Watch::default();
    for i in 0..3 {
        let failed = Notice::StorageFailed {
            error: "disk full".into(),
        };
        assert_eq!(watch.turn(failed, at(i), &config), None);
    }
    assert_eq!(
        watch.turn(Notice::StorageOk, at(10), &config),
        None,
        "off by default"
    );
    config.kinds.insert(Kind::StorageDegraded);
    watch.turn(
        Notice::StorageFailed {
            error: "disk full".into(),
        },
        at(20),
        &config,
    );
    watch.turn(
        Notice::StorageSlow {
            took: Duration::from_secs(7),
        },
        at(21),
        &config,
    );
    let event = watch.turn(Notice::StorageOk, at(80), &config).unwrap();
    assert_eq!(
        event.id,
        format!("storage.degraded:{}", at(20).as_millisecond())
    );
    assert_eq!(event.data["refused_deliveries"], 1);
    assert_eq!(event.data["slow_commits"], 1);
    assert_eq!(event.data["lasted"], "1m");
    assert_eq!(watch.turn(Notice::StorageOk, at(90), &config), None);
}

/// Every kind renders with its own default template (no fallback): what broke, since
/// when, and the command to run next.
#[test]
fn every_kind_has_a_message_that_says_what_to_do() {
    use crate::notice::{DeadLetter, SinkNews};
    use crate::templates::TemplatesBuilder;
    let templates = TemplatesBuilder::new(&BTreeMap::new(), std::path::Path::new(".")).build();
    let config = InternalConfig {
        kinds: Kind::ALL.into_iter().collect(),
        ..InternalConfig::default()
    };
    let news = SinkNews {
        sink: "slack-security".into(),
        since: at(0),
        failures: 7,
        last_error: "HTTP 500".into(),
        recent_errors: vec!["timed out after 30s".into(), "HTTP 500".into()],
    };
    let notices = [
        Notice::SinkFailing(news.clone()),
        Notice::SinkPaused {
            news: news.clone(),
            at: at(300),
            by: crate::store::sinks::AUTOMATIC.into(),
            comment: "7 failed attempts".into(),
            until: None,
        },
        Notice::SinkRecovered {
            news: news.clone(),
            paused: true,
            by: "delivering again".into(),
        },
        Notice::DeadLetter(DeadLetter {
            job_id: 9,
            event_id: 4,
            route: "scans".into(),
            sink: "slack-security".into(),
            error: "HTTP 404".into(),
            event: Some(("cl".into(), "scan.completed".into(), "d-1".into())),
        }),
        Notice::ReloadFailed {
            problems: "sinks.x: missing key `type`".into(),
        },
        Notice::Reloaded {
            sources: 1,
            sinks: 2,
            routes: 3,
        },
        Notice::Started { version: "1.0.0" },
        Notice::Stopping,
    ];
    let expected = [
        (
            "Sink slack-security is failing",
            "hookroute deliveries list --sink slack-security",
        ),
        (
            "Sink slack-security paused",
            "hookroute sink resume slack-security",
        ),
        ("Sink slack-security recovered", "--status dead"),
        (
            "Dead letter at slack-security",
            "hookroute dead-letter retry 9",
        ),
        ("Configuration reload failed", "hookroute check-config"),
        ("Configuration reloaded", ""),
        ("hookroute 1.0.0 started", ""),
        ("hookroute stopping", ""),
    ];
    let mut watch = Watch::default();
    let mut emitted: Vec<Emit> = notices
        .into_iter()
        .map(|notice| watch.turn(notice, at(600), &config).unwrap())
        .collect();
    for _ in 0..20 {
        let refused = Notice::BadSignature {
            source: "cl".into(),
            reason: "invalid_signature".into(),
            client: "192.0.2.7".parse().unwrap(),
        };
        emitted.extend(watch.turn(refused, at(601), &config));
    }
    watch.turn(
        Notice::StorageFailed {
            error: "disk full".into(),
        },
        at(602),
        &config,
    );
    emitted.extend(watch.turn(Notice::StorageOk, at(700), &config));
    let expected = expected.into_iter().chain([
        (
            "Signatures failing for source cl",
            "rotated or mistyped secret",
        ),
        (
            "Storage degraded for 1m 38s",
            "Deliveries refused (503, the senders retry): 1",
        ),
    ]);
    assert_eq!(emitted.len(), 10);
    for (emit, (title, body)) in emitted.iter().zip(expected) {
        let body_json = json!({"id": emit.id, "type": emit.kind.event_type(), "data": emit.data});
        let event = Event::parse(SOURCE, body_json.to_string().as_bytes(), None, None).unwrap();
        let message = templates.render(None, &event, None);
        assert_eq!(message.fallback, None, "{message:?}");
        assert!(
            message.title.starts_with(title),
            "{}: {message:?}",
            emit.kind.name()
        );
        assert!(
            message.body.contains(body),
            "{}: {}",
            emit.kind.name(),
            message.body
        );
    }
}

#[test]
fn each_kind_is_bounded_per_hour() {
    let mut watch = Watch::default();
    let allowed = (0..40)
        .filter(|i| watch.allow(Kind::DeadLetter, at(*i), 30))
        .count();
    assert_eq!(allowed, 30);
    assert!(watch.allow(Kind::SinkFailing, at(41), 30), "per kind");
    assert!(watch.allow(Kind::DeadLetter, at(3600), 30), "a new hour");
}
