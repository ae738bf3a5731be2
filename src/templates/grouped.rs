//! The grouped forms of the default templates: one message for a group's (or a digest's)
//! events. Each template sees `events` (every event as `type`, `source`, `delivery_id`,
//! `occurred_at`, `data`, and its own rendered `title`) and `group` (`route`, `key`: the
//! values it is grouped by, `count`). The family's form is used when every event is of one
//! family, else the generic one.

use minijinja::Value;
use minijinja::value::Serde;
use serde::Serialize;

use super::{GENERIC_GROUP, Message, Templates, split};
use crate::event::Event;

/// The grouped defaults, by id.
pub(super) const GROUPED: &[(&str, &str)] = &[
    (
        "group/scan.completed",
        r#"{%- set ns = namespace(failing=0) -%}
{%- for e in events %}{% if (e.data.score is number and e.data.score < 70) or e.data.grade in ["D", "F"] %}{% set ns.failing = ns.failing + 1 %}{% endif %}{% endfor -%}
Scans completed: {{ group.count }} domain{{ "s" if group.count != 1 }}{% if ns.failing %}, {{ ns.failing }} graded D or F or below 70{% endif %}
{%- for e in events %}
{{ e.data.domain or "unknown domain" }}: {{ e.data.grade or "?" }} ({{ e.data.score if e.data.score is number else "?" }}/100{% if e.data.critical_issues %}, {{ e.data.critical_issues }} critical{% endif %})
{%- endfor %}"#,
    ),
    (
        "group/alert.triggered",
        r#"{%- set severities = events | map(attribute="data") | map(attribute="severity") | reject("none") | map("upper") | unique | list -%}
Alerts: {{ group.count }}{% if severities %} ({{ severities | join(", ") }}){% endif %}
{%- for e in events %}
{{ e.title }}
{%- endfor %}"#,
    ),
    (
        "group/policy",
        r#"Policy events: {{ group.count }}
{%- for e in events %}
{{ e.title }}
{%- endfor %}"#,
    ),
    (
        "group/assessment",
        r#"Assessment events: {{ group.count }}
{%- for e in events %}
{{ e.title }}
{%- endfor %}"#,
    ),
    (
        GENERIC_GROUP,
        r#"{{ group.count }} events{% if group.key %} ({{ group.key | join(", ") }}){% endif %}, the first: {{ events[0].title }}
{%- for e in events %}
{{ e.title }}
{%- endfor %}"#,
    ),
];

/// One event as a grouped template sees it.
#[derive(Serialize)]
struct Member<'a> {
    #[serde(rename = "type")]
    event_type: &'a str,
    source: &'a str,
    delivery_id: &'a str,
    occurred_at: Option<String>,
    data: &'a serde_json::Value,
    title: &'a str,
}

/// What a group is, for its template.
#[derive(Serialize)]
struct About<'a> {
    route: &'a str,
    /// The values the group shares (none for a digest, or a route grouping everything).
    key: Vec<String>,
    count: usize,
}

impl Templates {
    /// The grouped default for events of `types`: their family's when they share one.
    pub fn default_group_for<'a>(mut types: impl Iterator<Item = &'a str>) -> &'static str {
        let family = |t: &str| Self::default_for(t).replace("default/", "group/");
        let Some(first) = types.next().map(family) else {
            return GENERIC_GROUP;
        };
        if !types.all(|t| family(t) == first) {
            return GENERIC_GROUP;
        }
        GROUPED
            .iter()
            .find(|(id, _)| *id == first)
            .map_or(GENERIC_GROUP, |(id, _)| id)
    }

    /// One message for several events through `route`, each with its own message already
    /// rendered; `key` is the group's key as stored (a JSON array of its values), if any.
    pub fn render_group(
        &self,
        route: &str,
        key: Option<&str>,
        events: &[(&Event, &Message)],
    ) -> Message {
        let id = Self::default_group_for(events.iter().map(|(e, _)| e.event_type.as_str()));
        let members: Vec<Member<'_>> = events
            .iter()
            .map(|(event, message)| Member {
                event_type: &event.event_type,
                source: &event.source,
                delivery_id: &event.delivery_id,
                occurred_at: event.occurred_at.map(|t| t.to_string()),
                data: event.data(),
                title: &message.title,
            })
            .collect();
        let about = About {
            route,
            key: key
                .and_then(|key| serde_json::from_str(key).ok())
                .unwrap_or_default(),
            count: events.len(),
        };
        let ctx = minijinja::context! {
            events => Value::from(Serde(&members)),
            group => Value::from(Serde(&about)),
        };
        let text = self.bounded(id, &ctx).or_else(|err| {
            tracing::warn!(template = id, error = %err, "grouped template failed; using the generic one");
            self.bounded(GENERIC_GROUP, &ctx)
        });
        split(&text.unwrap_or_else(|_| format!("{} events", events.len())))
    }
}
