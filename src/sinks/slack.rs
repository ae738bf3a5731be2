//! The `slack` sink: a Block Kit message to an incoming webhook, with the plain-text fallback
//! Slack shows in notifications. The webhook URL is a secret: give it inline, in a file or in
//! an environment variable.

use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::json;

use super::{Delivery, DeliveryOptions, Sink, SinkError, http};
use crate::secret::SecretSource;
use crate::templates::{Message, TemplateRef};

/// Slack's limits on a header block and a section's text.
const HEADER_LIMIT: usize = 150;
const SECTION_LIMIT: usize = 3000;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlackSinkConfig {
    pub webhook_url: SecretSource,
    pub username: Option<String>,
    pub icon_emoji: Option<String>,
    pub channel: Option<String>,
    pub template: Option<TemplateRef>,
    /// What to fetch from the sender's API for the message: the report, the PDF.
    #[serde(default)]
    pub enrich: Vec<crate::rules::Enrich>,
    #[serde(default)]
    pub delivery: DeliveryOptions,
}

impl super::SinkConfig for SlackSinkConfig {
    fn relative_to(&mut self, base: &std::path::Path) {
        self.webhook_url.relative_to(base);
    }

    fn kind(&self) -> &'static str {
        "slack"
    }

    fn delivery(&self) -> &DeliveryOptions {
        &self.delivery
    }

    fn validate(&self) -> Vec<String> {
        self.webhook_url
            .validate("webhook_url")
            .err()
            .into_iter()
            .collect()
    }

    fn read_secrets(&self) -> Vec<String> {
        self.url().err().into_iter().collect()
    }

    fn secrets(&self) -> Vec<String> {
        self.url().into_iter().collect()
    }

    fn build(&self, _name: &str) -> Result<Arc<dyn Sink>, String> {
        Ok(Arc::new(SlackSink::new(self)?))
    }

    fn enrich(&self) -> &[crate::rules::Enrich] {
        &self.enrich
    }

    fn template(&self) -> Option<&TemplateRef> {
        self.template.as_ref()
    }
}

impl SlackSinkConfig {
    /// The webhook URL, read from wherever it is kept. The message never quotes it: the URL
    /// is the secret.
    fn url(&self) -> Result<String, String> {
        let url = self.webhook_url.resolve("webhook_url")?;
        reqwest::Url::parse(&url).map_err(|_| "webhook_url: not a URL".to_owned())?;
        Ok(url)
    }
}

pub struct SlackSink {
    client: reqwest::Client,
    url: String,
    username: Option<String>,
    icon_emoji: Option<String>,
    channel: Option<String>,
}

impl SlackSink {
    /// # Errors
    /// The webhook URL cannot be read or is not a URL.
    pub fn new(config: &SlackSinkConfig) -> Result<Self, String> {
        let url = config.url()?;
        Ok(Self {
            client: http::client(config.delivery.timeout.0)?,
            url,
            username: config.username.clone(),
            icon_emoji: config.icon_emoji.clone(),
            channel: config.channel.clone(),
        })
    }
}

impl SlackSink {
    /// Posts a message of a header, a section (escaped `body`) and a context line; `text`
    /// is what notifications show.
    async fn post(
        &self,
        (title, body): (&str, &str),
        context: String,
        text: String,
    ) -> Result<String, SinkError> {
        let mut blocks = vec![json!({
            "type": "header",
            "text": {"type": "plain_text", "text": truncate(&escape(title), HEADER_LIMIT), "emoji": true},
        })];
        if !body.is_empty() {
            blocks.push(json!({
                "type": "section",
                "text": {"type": "mrkdwn", "text": body},
            }));
        }
        blocks.push(json!({
            "type": "context",
            "elements": [{"type": "mrkdwn", "text": context}],
        }));
        let mut payload = json!({
            "text": text,
            "blocks": blocks,
        });
        for (key, value) in [
            ("username", &self.username),
            ("icon_emoji", &self.icon_emoji),
            ("channel", &self.channel),
        ] {
            if let Some(value) = value {
                payload[key] = json!(value);
            }
        }
        http::send(self.client.post(&self.url).json(&payload)).await
    }
}

#[async_trait]
impl Sink for SlackSink {
    async fn deliver(&self, delivery: &Delivery<'_>) -> Result<String, SinkError> {
        let message = delivery.message;
        let body = truncate(&escape(&message.body), SECTION_LIMIT);
        let text = escape(format!("{}\n{}", message.title, message.body).trim_end());
        let context = context_line(&delivery.context());
        self.post((&message.title, &body), context, text).await
    }

    /// One message for the group: the summary's title, its lines (one per event in the
    /// shipped grouped templates) as far as a section holds them, then "and N more".
    async fn deliver_batch(
        &self,
        deliveries: &[Delivery<'_>],
        summary: &Message,
    ) -> Result<String, SinkError> {
        let Some(first) = deliveries.first() else {
            return Ok(String::new());
        };
        let title = if summary.title.is_empty() {
            format!("{} events", deliveries.len())
        } else {
            summary.title.clone()
        };
        let lines: Vec<&str> = if summary.body.is_empty() {
            deliveries.iter().map(|d| d.message.title.as_str()).collect()
        } else {
            summary.body.lines().collect()
        };
        let body = listed(&lines, SECTION_LIMIT);
        let first = first.context();
        let context = escape(&format!(
            "{} events · {} · from {} · route {}",
            deliveries.len(),
            first.source,
            first.at,
            first.route
        ));
        let text = escape(&title);
        self.post((&title, &body), context, text).await
    }
}

/// `lines`, escaped, as many as fit in `limit` characters; past them "…and N more".
fn listed(lines: &[&str], limit: usize) -> String {
    let mut text = String::new();
    for (shown, line) in lines.iter().enumerate() {
        let line = escape(line);
        let more = format!("\n…and {} more", lines.len() - shown);
        let needed = text.chars().count() + 1 + line.chars().count();
        let tail = if shown + 1 < lines.len() { more.chars().count() } else { 0 };
        if needed + tail > limit {
            text.push_str(&more);
            return text.trim_start().to_owned();
        }
        if !text.is_empty() {
            text.push('\n');
        }
        text.push_str(&line);
    }
    text
}

/// The context line under a message: its facts escaped, and its link (a plain web address, see
/// `templates::link`) as Slack's `<url|label>`.
fn context_line(context: &super::Context<'_>) -> String {
    let mut line = escape(&format!(
        "{} · {} · {} · {} · route {}",
        context.event_type, context.source, context.at, context.delivery_id, context.route
    ));
    if let Some(link) = context.link {
        line.push_str(&format!(" · <{}|open>", link.replace('&', "&amp;")));
    }
    line
}

/// Slack reads `&`, `<` and `>` as markup in every text field (the `text` fallback shown in
/// notifications as much as the blocks): payload data must not become a `<!channel>` ping or
/// a link labelled as something else, so everything built from an event goes through here.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Cuts escaped `text` to `limit` characters, never inside an entity (a cut `&amp;` would
/// show as text).
fn truncate(text: &str, limit: usize) -> String {
    if text.chars().count() <= limit {
        return text.to_owned();
    }
    let mut cut: String = text.chars().take(limit - 1).collect();
    if let Some(amp) = cut.rfind('&').filter(|&at| !cut[at..].contains(';')) {
        cut.truncate(amp);
    }
    cut.push('…');
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_context_line_escapes_its_facts_and_links_its_page() {
        let context = crate::sinks::Context {
            event_type: "alert.triggered",
            source: "cl",
            at: "2026-03-09 08:00:00 UTC".into(),
            route: "<!channel> & co",
            delivery_id: "d-1".into(),
            link: Some("https://a.example/f?x=1&y=2"),
        };
        assert_eq!(
            context_line(&context),
            "alert.triggered · cl · 2026-03-09 08:00:00 UTC · d-1 · route &lt;!channel&gt; &amp; co \
             · <https://a.example/f?x=1&amp;y=2|open>"
        );
    }

    #[test]
    fn a_long_list_ends_with_how_many_more() {
        let lines: Vec<String> = (0..100).map(|i| format!("domain-{i}.example: F")).collect();
        let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
        let text = listed(&lines, 300);
        assert!(text.chars().count() <= 300, "{text}");
        let shown = text.lines().filter(|l| l.starts_with("domain-")).count();
        assert!(text.ends_with(&format!("…and {} more", 100 - shown)), "{text}");
        assert_eq!(listed(&["a", "<b>"], 300), "a\n&lt;b&gt;");
    }

    #[test]
    fn escapes_markup_and_truncates() {
        assert_eq!(
            escape("<!channel> & <http://x|y>"),
            "&lt;!channel&gt; &amp; &lt;http://x|y&gt;"
        );
        assert_eq!(truncate("abcdef", 4), "abc…");
        assert_eq!(truncate("abc", 4), "abc");
        assert_eq!(truncate("ab&amp;cd", 5), "ab…", "an entity is never cut");
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn escaped_text_has_no_markup_and_reads_back(text in any::<String>(), limit in 2usize..200) {
                let escaped = escape(&text);
                prop_assert!(!escaped.contains('<') && !escaped.contains('>'));
                let unescaped = escaped.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&");
                prop_assert_eq!(&unescaped, &text);
                let cut = truncate(&escaped, limit);
                prop_assert!(cut.chars().count() <= limit);
                // Never half an entity: every `&` still starts one.
                for (at, _) in cut.match_indices('&') {
                    let rest = &cut[at..];
                    prop_assert!(rest.starts_with("&lt;") || rest.starts_with("&gt;") || rest.starts_with("&amp;"), "{cut}");
                }
            }
        }
    }
}
