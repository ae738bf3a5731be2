//! The defaults for hookroute's own events (`hookroute.*`, see [`crate::internal`]): each says
//! what broke, since when, what it affected, and the command to run next, in the words of
//! an on-call person reading it on a phone. Every sink shows them in its own format (a Slack
//! header and section, an email subject and body, a line), as any message.

/// The defaults, by id: `default/<type>`, and the grouped form of dead letters.
pub(super) const TEMPLATES: &[(&str, &str)] = &[
    (
        "default/hookroute.sink.failing",
        r#"Sink {{ data.sink }} is failing: {{ data.failures }} failed attempts since {{ data.since }}
Last error: {{ data.last_error }}
{%- if data.recent_errors | length > 1 %}
Recent errors: {{ data.recent_errors | join("; ") }}
{%- endif %}
{%- if data.waiting is number %}
Waiting: {{ data.waiting }} deliveries{% if data.waiting %}, the oldest for {{ data.oldest_waiting }}{% endif %}; dead letters: {{ data.dead_letters }}
{%- endif %}
Deliveries are retried; if it keeps failing past its pause_after, the sink is paused and its deliveries wait.
Next: hookroute deliveries list --sink {{ data.sink }} --status failed
      hookroute sink list"#,
    ),
    (
        "default/hookroute.sink.paused",
        r#"Sink {{ data.sink }} paused {% if data.automatic %}after failing since {{ data.since }} ({{ data.failures }} attempts){% else %}by {{ data.paused_by }}{% if data.until %} until {{ data.until }}{% endif %}{% endif %}
{%- if data.comment %}
Why: {{ data.comment }}
{%- endif %}
Its deliveries wait; none is dead-lettered for the outage.{% if data.automatic %} One delivery is tried every probe_interval, and the first success resumes the sink.{% endif %}
{%- if data.waiting is number %}
Waiting: {{ data.waiting }} deliveries{% if data.waiting %}, the oldest for {{ data.oldest_waiting }}{% endif %}
{%- endif %}
Next: hookroute sink list
      hookroute sink resume {{ data.sink }}"#,
    ),
    (
        "default/hookroute.sink.recovered",
        r#"Sink {{ data.sink }} recovered after {{ data.lasted }}: {{ data.how }}
{%- if data.failures %}
It had failed {{ data.failures }} attempts since {{ data.since }}; the last: {{ data.last_error }}
{%- endif %}
{%- if data.was_paused %}
It was paused: its waiting deliveries{% if data.waiting is number %} ({{ data.waiting }}){% endif %} go out now, oldest first.
{%- endif %}
Next: hookroute deliveries list --sink {{ data.sink }} --status dead
      hookroute dead-letter retry JOB (for any that died before)"#,
    ),
    (
        "default/hookroute.dead_letter",
        r#"Dead letter at {{ data.sink }}: {{ data.event_type or "an event" }}{% if data.event_source %} from {{ data.event_source }}{% endif %} (event {{ data.event_id }}) gave up
Error: {{ data.error }}
Route {{ data.route }}, job {{ data.job_id }}{% if data.event_delivery_id %}, delivery {{ data.event_delivery_id }}{% endif %}
Next: hookroute deliveries show {{ data.event_id }}
      hookroute dead-letter retry {{ data.job_id }}"#,
    ),
    (
        "group/hookroute.dead_letter",
        r#"{%- set sinks = events | map(attribute="data") | map(attribute="sink") | unique | list -%}
Dead letters at {{ sinks | join(", ") }}: {{ group.count }} deliveries gave up
{%- for e in events %}
{{ e.data.event_type or "event" }} {{ e.data.event_id }} (route {{ e.data.route }}, job {{ e.data.job_id }}): {{ e.data.error }}
{%- endfor %}
Next: hookroute deliveries list --sink {{ sinks | first }} --status dead
      hookroute dead-letter retry (all of them, once the sink is fixed)"#,
    ),
    (
        "default/hookroute.signature.failing",
        r#"Signatures failing for source {{ data.source }}: {{ data.failures }} deliveries refused since {{ data.since }}
{%- for reason, count in data.reasons | items %}
{{ reason }}: {{ count }}
{%- endfor %}
From: {% for client, count in data.clients | items %}{{ client }} ({{ count }}){% if not loop.last %}, {% endif %}{% endfor %}
The usual cause is a rotated or mistyped secret: compare the secret in the sender's webhook settings with sources.{{ data.source }}.
Next: hookroute check-config, then systemctl reload hookroute"#,
    ),
    (
        "default/hookroute.config.reload_failed",
        r#"Configuration reload failed: the running configuration stays
{{ data.problems }}
Next: hookroute check-config, fix what it names, then systemctl reload hookroute"#,
    ),
    (
        "default/hookroute.config.reloaded",
        r#"Configuration reloaded: {{ data.sources }} sources, {{ data.sinks }} sinks, {{ data.routes }} routes"#,
    ),
    (
        "default/hookroute.storage.degraded",
        r#"Storage degraded for {{ data.lasted }}, from {{ data.since }} to {{ data.until }}
Deliveries refused (503, the senders retry): {{ data.refused_deliveries }}; slow commits: {{ data.slow_commits }}{% if data.slow_commits %} (the slowest {{ data.slowest_commit_ms }} ms){% endif %}
{%- if data.last_error %}
Last error: {{ data.last_error }}
{%- endif %}
It takes writes again. Next: check the disk (df -h) or the database server, and journalctl -u hookroute"#,
    ),
    (
        "default/hookroute.started",
        r#"hookroute {{ data.version }} started"#,
    ),
    ("default/hookroute.stopping", r#"hookroute stopping"#),
];

/// The default for an internal event type, if it has one of its own.
pub(super) fn default_for(event_type: &str) -> Option<&'static str> {
    TEMPLATES
        .iter()
        .map(|(id, _)| *id)
        .find(|id| id.strip_prefix("default/") == Some(event_type))
}
