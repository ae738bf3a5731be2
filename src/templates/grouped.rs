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
            .chain(super::internal::TEMPLATES)
            .find(|(id, _)| *id == first)
            .map_or(GENERIC_GROUP, |(id, _)| id)
    }

    /// One message for several events through `route` with `template` (an id from the
    /// builder) or the grouped default, each event with its own message already rendered;
    /// `key` is the group's key as stored (a JSON array of its values), if any.
    pub fn render_group(
        &self,
        template: Option<&str>,
        (route, key): (&str, Option<&str>),
        events: &[(&Event, &Message)],
    ) -> Message {
        let id = template.unwrap_or_else(|| {
            Self::default_group_for(events.iter().map(|(e, _)| e.event_type.as_str()))
        });
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
        let mut fallback = None;
        let text = self.bounded(id, &ctx).or_else(|err| {
            tracing::warn!(template = id, error = %err, "grouped template failed; using the generic one");
            fallback = Some(format!("template {id} failed ({err}); sent the generic default"));
            self.bounded(GENERIC_GROUP, &ctx)
        });
        let mut message = split(&text.unwrap_or_else(|_| format!("{} events", events.len())));
        message.fallback = fallback;
        message
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::templates::{TemplateRef, TemplateSource, TemplatesBuilder};

    fn events(bodies: &[&str]) -> Vec<Event> {
        bodies
            .iter()
            .map(|body| Event::parse("cl", body.as_bytes(), None, None).unwrap())
            .collect()
    }

    fn render(templates: &Templates, template: Option<&str>, events: &[Event]) -> Message {
        let messages: Vec<Message> = events
            .iter()
            .map(|e| templates.render(None, e, None))
            .collect();
        let pairs: Vec<(&Event, &Message)> = events.iter().zip(&messages).collect();
        templates.render_group(template, ("r", Some(r#"["cl"]"#)), &pairs)
    }

    /// Every family's grouped form, and the generic one for a mix.
    #[test]
    fn every_default_has_a_grouped_form() {
        let templates = TemplatesBuilder::new(&BTreeMap::new(), std::path::Path::new(".")).build();
        let alerts = events(&[
            r#"{"type": "alert.triggered", "data": {"domain": "a.com", "severity": "critical", "message": "cert expires"}}"#,
            r#"{"type": "alert.triggered", "data": {"domain": "b.com", "severity": "high"}}"#,
        ]);
        let message = render(&templates, None, &alerts);
        assert_eq!(message.title, "Alerts: 2 (CRITICAL, HIGH)");
        assert!(
            message
                .body
                .contains("Alert [CRITICAL] a.com: cert expires"),
            "{}",
            message.body
        );
        let policies = events(&[
            r#"{"event": "policy.published", "data": {"title": "Access"}}"#,
            r#"{"event": "policy.approved", "data": {"title": "Backup"}}"#,
        ]);
        let message = render(&templates, None, &policies);
        assert_eq!(message.title, "Policy events: 2");
        assert!(
            message.body.contains("Policy approved: Backup"),
            "{}",
            message.body
        );
        let assessments = events(&[
            r#"{"event": "assessment.started", "data": {"name": "Q1"}}"#,
            r#"{"event": "assessment.failed", "data": {"name": "Q2"}}"#,
        ]);
        assert_eq!(
            render(&templates, None, &assessments).title,
            "Assessment events: 2"
        );
        let mixed = [alerts[0].clone(), policies[0].clone()];
        let message = render(&templates, None, &mixed);
        assert_eq!(
            message.title,
            "2 events (cl), the first: Alert [CRITICAL] a.com: cert expires"
        );
        assert!(message.fallback.is_none());
    }

    /// A route's own grouped template sees `events` and `group`; one that fails falls back to
    /// the generic form and says so.
    #[test]
    fn a_routes_grouped_template_sees_events_and_group() {
        let mut builder = TemplatesBuilder::new(&BTreeMap::new(), std::path::Path::new("."));
        let own = |text: &str| {
            TemplateRef::Source(TemplateSource::Inline {
                text: text.to_owned(),
            })
        };
        let id = builder
            .resolve("route/r/group", &own("{{ group.count }} on {{ group.route }}: {{ events | map(attribute='data') | map(attribute='domain') | join(' ') }}"))
            .unwrap();
        let broken = builder
            .resolve(
                "route/b/group",
                &own("{{ events[0].data.missing.deeper | int + none }}"),
            )
            .unwrap();
        let templates = builder.build();
        let scans = events(&[
            r#"{"type": "scan.completed", "data": {"domain": "a.com"}}"#,
            r#"{"type": "scan.completed", "data": {"domain": "b.com"}}"#,
        ]);
        assert_eq!(
            render(&templates, Some(&id), &scans).title,
            "2 on r: a.com b.com"
        );
        let fell_back = render(&templates, Some(&broken), &scans);
        assert!(fell_back.title.starts_with("2 events"), "{fell_back:?}");
        assert!(fell_back.fallback.unwrap().contains("failed"));
    }
}
