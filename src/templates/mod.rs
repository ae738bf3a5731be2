//! Messages rendered from events with minijinja: good defaults for every event family the
//! senders emit, overridable per sink and per route, inline or from a file.
//!
//! A message's first line is its title (Slack header, email subject, log line); the rest is
//! its body. Missing fields render as nothing (chainable undefined), so a template never fails
//! on a sparse payload; a template that fails anyway falls back to the generic one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use minijinja::value::Serde;
use minijinja::{Environment, UndefinedBehavior, Value, context};
use serde::Deserialize;

use crate::event::Event;

mod grouped;
mod internal;

/// Where a template's text comes from.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum TemplateSource {
    Inline { text: String },
    File { file: PathBuf },
}

/// A template as a sink or route refers to it: a name from `[templates]`, or a source.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum TemplateRef {
    Named(String),
    Source(TemplateSource),
}

/// A rendered message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message {
    pub title: String,
    pub body: String,
    /// Why the chosen template was not used (it failed, or went past [`FUEL`] or
    /// [`OUTPUT_LIMIT`]) and a default was sent instead; kept in the job record.
    pub fallback: Option<String>,
    /// A web page about what the event reports (see [`link`]), for the sinks' context lines.
    pub link: Option<String>,
}

impl Message {
    /// The link to show beside the message: none when the message shows it already.
    pub fn link_beside(&self) -> Option<&str> {
        self.link
            .as_deref()
            .filter(|link| !self.body.contains(link))
    }
}

/// Most template instructions one rendering may execute (minijinja's fuel). The shipped
/// templates take a few hundred on the senders' events and about ten per field listed; a
/// template that loops over a stranger's payload inside another loop is stopped here instead
/// of holding a thread for seconds.
pub const FUEL: u64 = 100_000;

/// Most bytes one rendering may produce: more than any chat message or email body needs.
pub const OUTPUT_LIMIT: usize = 64 * 1024;

const GENERIC: &str = "default/generic";
const GENERIC_GROUP: &str = "group/generic";

/// What the shipped scan and alert templates add when enrichment fetched the scan's report:
/// the top critical and high findings, each with its remediation, and the report's address.
macro_rules! top_findings {
    () => {
        r#"
{%- if report and report.top %}
Top findings ({{ report.top | length }} of {{ report.findings_count }}):
{%- for f in report.top %}
- [{{ f.severity | upper }}] {{ f.finding }}{% if f.module %} ({{ f.module }}){% endif %}
{%- if f.remediation %}
  Fix: {{ f.remediation }}
{%- endif %}
{%- endfor %}
{%- endif %}
{%- if report and report.link %}
Full report: {{ report.link }}
{%- endif %}"#
    };
}

/// The shipped templates, by id.
const DEFAULTS: &[(&str, &str)] = &[
    (
        "default/scan.completed",
        concat!(
            r#"{%- set score = data.score -%}
{%- if score is number -%}
  {%- set risk = "low" if score >= 80 else ("medium" if score >= 60 else ("high" if score >= 40 else "critical")) -%}
{%- elif data.grade -%}
  {%- set risk = {"A": "low", "B": "low", "C": "medium", "D": "medium", "F": "high"}[data.grade] or "unknown" -%}
{%- else -%}
  {%- set risk = "unknown" -%}
{%- endif -%}
Scan completed: {{ data.domain or "unknown domain" }} graded {{ data.grade or "?" }} ({{ score if score is number else "?" }}/100, {{ risk }} risk)
{%- if data.issues_count is number %}
{{ data.issues_count }} issues: {{ data.critical_issues or 0 }} critical, {{ data.high_issues or 0 }} high, {{ data.medium_issues or 0 }} medium, {{ data.low_issues or 0 }} low
{%- endif %}
{%- if data.scan_id is defined %}
Scan {{ data.scan_id }}{% if data.job_id is defined %}, job {{ data.job_id }}{% endif %}{% if data.scanned_at %}, scanned {{ data.scanned_at }}{% endif %}
{%- endif %}
{%- if vars.scan_url and data.scan_id is defined %}
Report: {{ vars.scan_url | replace("{scan_id}", data.scan_id | string) | replace("{job_id}", data.job_id | string) }}
{%- endif %}"#,
            top_findings!()
        ),
    ),
    (
        "default/alert.triggered",
        concat!(
            r#"{%- set kind = (data.alert_type or "alert") | replace("_", " ") -%}
Alert{% if data.severity %} [{{ data.severity | upper }}]{% endif %} {{ data.domain or "unknown domain" }}: {{ data.message or kind }}
Type: {{ kind }}
{%- if data.previous_score is number and data.current_score is number %}
Score: {{ data.previous_score }} -> {{ data.current_score }}{% if data.threshold is number %} (threshold {{ data.threshold }}){% endif %}
{%- endif %}
{%- if data is mapping %}{% for key, value in data | items %}{% if key not in ["domain", "alert_type", "severity", "message", "previous_score", "current_score", "threshold", "report_url", "finding_url", "url", "link", "dashboard_url", "html_url"] %}
{{ key | replace("_", " ") | capitalize }}: {{ value }}
{%- endif %}{% endfor %}{% endif %}"#,
            top_findings!()
        ),
    ),
    (
        "default/policy",
        r#"{%- set action = (type | split(".") | list | last) -%}
Policy {{ action }}: {{ data.title or data.policy_id or "untitled policy" }}{% if data.version %} (v{{ data.version }}){% endif %}
Client: {{ data.client_id or "?" }}{% if data.policy_id %} · policy {{ data.policy_id }}{% endif %}
{%- for who in ["created_by", "updated_by", "published_by", "approved_by", "rejected_by"] %}{% if data[who] %}
{{ who | replace("_by", "") | capitalize }} by {{ data[who] }}
{%- endif %}{% endfor %}
{%- if data.reason %}
Reason: {{ data.reason }}
{%- endif %}"#,
    ),
    (
        "default/assessment",
        r#"{%- set action = (type | split(".") | list | last) -%}
Assessment {{ action }}: {{ data.name or data.assessment_id or "unnamed assessment" }}{% if data.template %} ({{ data.template }}){% endif %}
Client: {{ data.client_id or "?" }}
{%- if data.score is number %} · score {{ data.score }}{% endif %}
{%- if data.completion_percentage is number %} · {{ data.completion_percentage }}% complete{% endif %}
{%- if data.error or data.reason %}
Reason: {{ data.error or data.reason }}
{%- endif %}"#,
    ),
    (
        GENERIC,
        r#"{{ type }} from {{ source }}
{%- if data is mapping %}{% for key, value in data | items %}
{{ key }}: {{ value }}
{%- endfor %}{% endif %}"#,
    ),
];

/// Collects templates while the configuration is validated.
pub struct TemplatesBuilder {
    env: Environment<'static>,
    scan_url: Option<String>,
    base_dir: PathBuf,
    named: BTreeMap<String, String>,
}

/// The compiled template set.
#[derive(Debug)]
pub struct Templates {
    env: Environment<'static>,
    /// `template_vars.scan_url`: a scan's report page, `{scan_id}` and `{job_id}` filled in.
    scan_url: Option<String>,
}

impl TemplatesBuilder {
    /// `vars` are available to every template as `vars.<name>`; relative template files are
    /// read from `base_dir` (the configuration file's directory).
    pub fn new(vars: &BTreeMap<String, String>, base_dir: &Path) -> Self {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Chainable);
        env.set_fuel(Some(FUEL));
        env.add_global("vars", Value::from(Serde(vars)));
        for (id, text) in DEFAULTS
            .iter()
            .chain(grouped::GROUPED)
            .chain(internal::TEMPLATES)
        {
            env.add_template_owned(*id, *text)
                .expect("the shipped templates compile");
        }
        Self {
            scan_url: vars.get("scan_url").cloned(),
            env,
            base_dir: base_dir.to_path_buf(),
            named: BTreeMap::new(),
        }
    }

    /// Registers `[templates.<name>]`.
    ///
    /// # Errors
    /// The file cannot be read or the template does not compile.
    pub fn add_named(&mut self, name: &str, source: &TemplateSource) -> Result<(), String> {
        let id = format!("named/{name}");
        self.add(&id, source)?;
        self.named.insert(name.to_owned(), id);
        Ok(())
    }

    /// Resolves a sink's or route's reference to a template id; `owner` names the inline one.
    ///
    /// # Errors
    /// An unknown name, an unreadable file, or a template that does not compile.
    pub fn resolve(&mut self, owner: &str, reference: &TemplateRef) -> Result<String, String> {
        match reference {
            TemplateRef::Named(name) => self
                .named
                .get(name)
                .cloned()
                .ok_or_else(|| format!("no template named {name:?} in [templates]")),
            TemplateRef::Source(source) => {
                let id = format!("inline/{owner}");
                self.add(&id, source)?;
                Ok(id)
            }
        }
    }

    fn add(&mut self, id: &str, source: &TemplateSource) -> Result<(), String> {
        let text = match source {
            TemplateSource::Inline { text } => text.clone(),
            TemplateSource::File { file } => {
                let path = self.base_dir.join(file);
                std::fs::read_to_string(&path)
                    .map_err(|err| format!("cannot read {}: {err}", path.display()))?
            }
        };
        self.env
            .add_template_owned(id.to_owned(), text)
            .map_err(|err| describe(&err))
    }

    pub fn build(self) -> Templates {
        Templates {
            env: self.env,
            scan_url: self.scan_url,
        }
    }
}

impl Templates {
    /// The default template for an event type's family.
    pub fn default_for(event_type: &str) -> &'static str {
        match event_type {
            "scan.completed" => "default/scan.completed",
            "alert.triggered" => "default/alert.triggered",
            t if t.starts_with("policy.") => "default/policy",
            t if t.starts_with("assessment.") => "default/assessment",
            t => internal::default_for(t).unwrap_or(GENERIC),
        }
    }

    /// Renders `event` with `template` (an id from the builder), or the default for its type;
    /// `report`: what enrichment fetched (`crate::enrich::summary`), else undefined. Never
    /// fails: a template error falls back to the generic template, whose inputs are always
    /// present.
    pub fn render(
        &self,
        template: Option<&str>,
        event: &Event,
        report: Option<&serde_json::Value>,
    ) -> Message {
        let id = template.unwrap_or_else(|| Self::default_for(&event.event_type));
        let ctx = context! {
            type => event.event_type.as_str(),
            source => event.source.as_str(),
            origin => event.origin(),
            delivery_id => event.delivery_id.as_str(),
            occurred_at => event.occurred_at.map(|t| t.to_string()),
            sender_delivery => event.sender_delivery.as_deref(),
            data => Value::from(Serde(event.data())),
            payload => Value::from(Serde(event.payload.value())),
            report => report.map(|report| Value::from(Serde(report))),
        };
        let mut fallback = None;
        let text = self.bounded(id, &ctx).or_else(|err| {
            let why = format!("template {id} failed ({err}); sent the generic default");
            tracing::warn!(template = id, error = %err, "template failed; using the generic one");
            fallback = Some(why);
            self.bounded(GENERIC, &ctx)
        });
        let mut message =
            split(&text.unwrap_or_else(|_| format!("{} from {}", event.event_type, event.source)));
        message.fallback = fallback;
        message.link = link(event, self.scan_url.as_deref());
        message
    }

    /// Renders template `id` within [`FUEL`] and [`OUTPUT_LIMIT`].
    fn bounded(&self, id: &str, ctx: &Value) -> Result<String, String> {
        let template = self.env.get_template(id).map_err(|e| describe(&e))?;
        let mut out = Bounded(Vec::new());
        match template.render_captured_to(ctx.clone(), &mut out) {
            Ok(_) => Ok(String::from_utf8_lossy(&out.0).into_owned()),
            Err(_) if out.0.len() >= OUTPUT_LIMIT => {
                Err(format!("its output went past {OUTPUT_LIMIT} bytes"))
            }
            Err(err) if err.kind() == minijinja::ErrorKind::OutOfFuel => {
                Err(format!("it went past {FUEL} instructions"))
            }
            Err(err) => Err(describe(&err)),
        }
    }
}

/// A buffer that refuses to grow past [`OUTPUT_LIMIT`], which ends the rendering.
struct Bounded(Vec<u8>);

impl std::io::Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + buf.len() > OUTPUT_LIMIT {
            self.0.resize(OUTPUT_LIMIT, 0);
            return Err(std::io::Error::other("template output limit"));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// minijinja's error with its template position, in one line.
fn describe(err: &minijinja::Error) -> String {
    match err.line() {
        Some(line) => format!("{} (line {line})", err.detail().unwrap_or(&err.to_string())),
        None => err.to_string(),
    }
}

fn split(text: &str) -> Message {
    let text = text.trim();
    let (title, body) = text.split_once('\n').unwrap_or((text, ""));
    Message {
        title: title.trim().to_owned(),
        body: body.trim().to_owned(),
        ..Message::default()
    }
}

/// Fields of an event's `data` that may hold a page about it, the most specific first. The
/// default alert template leaves them out of its list of fields: the sinks show the link.
const LINK_FIELDS: &[&str] = &[
    "report_url",
    "finding_url",
    "url",
    "link",
    "dashboard_url",
    "html_url",
];

/// A page about what `event` reports, for a person on call: a web address the payload gives
/// (one of [`LINK_FIELDS`]), else a scan's report page from `scan_url`. Only a plain `http(s)`
/// address is taken: it is shown as a link, and must not carry markup into a message.
pub fn link(event: &Event, scan_url: Option<&str>) -> Option<String> {
    let data = event.data();
    let given = LINK_FIELDS
        .iter()
        .filter_map(|field| data.get(field)?.as_str())
        .find(|url| is_web_address(url));
    if let Some(url) = given {
        return Some(url.to_owned());
    }
    let id = |field: &str| match data.get(field) {
        Some(serde_json::Value::String(id)) => id.clone(),
        Some(serde_json::Value::Number(id)) => id.to_string(),
        _ => String::new(),
    };
    let scan_id = id("scan_id");
    if scan_id.is_empty() {
        return None;
    }
    let url = scan_url?
        .replace("{scan_id}", &scan_id)
        .replace("{job_id}", &id("job_id"));
    is_web_address(&url).then_some(url)
}

fn is_web_address(text: &str) -> bool {
    (text.starts_with("https://") || text.starts_with("http://"))
        && text.len() <= 2048
        && !text.chars().any(|c| {
            c.is_whitespace() || c.is_control() || matches!(c, '<' | '>' | '"' | '|' | '\\')
        })
}

#[cfg(test)]
mod tests;
