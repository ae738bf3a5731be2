//! The `email` sink: SMTP through lettre, plain, STARTTLS (`smtp://`) or implicit TLS
//! (`smtps://`), with optional AUTH. The subject is the message's title, the text part its
//! body, and an HTML part shows the same. Recipients come from the configuration only.
//!
//! Payload text can neither inject headers nor break the SMTP stream: the subject is one line
//! with CR and LF removed, bodies have their line endings normalised and travel base64-encoded
//! (lettre 0.11.23 sends a body holding a bare CR unencoded, RUSTSEC-2026-0561), and addresses,
//! whose display names lettre would panic on if they held CR/LF, are checked at load time.
//!
//! With `digest = "15m"`, events are collected for that long and go out as one email.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use async_trait::async_trait;
use lettre::message::header::{ContentTransferEncoding, ContentType};
use lettre::message::{Mailbox, MultiPart, SinglePart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use serde::Deserialize;

use super::{Attachment, Delivery, DeliveryOptions, Sink, SinkError, bounded};
use crate::duration::HumanDuration;
use crate::secret::SecretSource;
use crate::templates::{Message as Rendered, TemplateRef};

/// What an `smtp://` server is asked for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StartTls {
    /// Upgrade with STARTTLS, or fail: the default, so credentials never cross in clear.
    #[default]
    Required,
    /// Upgrade if offered.
    Opportunistic,
    /// Plain SMTP (a local relay).
    Never,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailSinkConfig {
    /// `smtp://host[:port]` (STARTTLS per `starttls`) or `smtps://host[:port]` (implicit TLS).
    pub url: String,
    #[serde(default)]
    pub starttls: StartTls,
    pub username: Option<String>,
    pub password: Option<SecretSource>,
    /// An extra CA to trust (a private mail relay).
    pub ca_file: Option<PathBuf>,
    /// Let `username`/`password` cross the network in clear (`starttls` other than `required`
    /// to a host that is not loopback). Off by default: a configuration error otherwise.
    #[serde(default)]
    pub allow_plaintext_auth: bool,
    pub from: String,
    pub to: Vec<String>,
    pub template: Option<TemplateRef>,
    /// What to fetch from the sender's API for the message: the report, the PDF.
    #[serde(default)]
    pub enrich: Vec<crate::rules::Enrich>,
    /// Collect events for this long and send them as one email.
    pub digest: Option<HumanDuration>,
    #[serde(default)]
    pub delivery: DeliveryOptions,
}

impl super::SinkConfig for EmailSinkConfig {
    fn relative_to(&mut self, base: &Path) {
        if let Some(file) = &mut self.ca_file {
            *file = base.join(&*file);
        }
        if let Some(password) = &mut self.password {
            password.relative_to(base);
        }
    }

    fn kind(&self) -> &'static str {
        "email"
    }

    fn delivery(&self) -> &DeliveryOptions {
        &self.delivery
    }

    fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let mut check = |result: Result<(), String>| {
            if let Err(problem) = result {
                problems.push(problem);
            }
        };
        let url = reqwest::Url::parse(&self.url)
            .ok()
            .filter(|url| matches!(url.scheme(), "smtp" | "smtps") && url.host_str().is_some());
        if url.is_none() {
            check(Err(
                "url: must be smtp://host[:port] or smtps://host[:port]".into(),
            ));
        }
        check(mailbox("from", &self.from).map(drop));
        if self.to.is_empty() {
            check(Err("to: list at least one recipient".into()));
        }
        for (i, to) in self.to.iter().enumerate() {
            check(mailbox(&format!("to[{i}]"), to).map(drop));
        }
        match (&self.username, &self.password) {
            (Some(_), Some(password)) => check(password.validate("password")),
            (None, None) => {}
            _ => check(Err("username and password go together".into())),
        }
        if let Some(url) = url {
            let in_clear = url.scheme() == "smtp" && self.starttls != StartTls::Required;
            if self.password.is_some()
                && in_clear
                && !is_loopback(&url)
                && !self.allow_plaintext_auth
            {
                check(Err(format!(
                    "password: with starttls = {:?} the login could cross the network in clear; \
                     use starttls = \"required\" or smtps://, or set allow_plaintext_auth = true",
                    format!("{:?}", self.starttls).to_lowercase()
                )));
            }
        }
        problems
    }

    fn build(&self, name: &str) -> Result<std::sync::Arc<dyn Sink>, String> {
        Ok(std::sync::Arc::new(EmailSink::new(self, name)?))
    }

    fn read_secrets(&self) -> Vec<String> {
        let read = self.password.as_ref().map(|p| p.resolve("password"));
        read.and_then(Result::err).into_iter().collect()
    }

    /// The password, and the login as `AUTH PLAIN` sends it (a relay may echo that line back).
    fn secrets(&self) -> Vec<String> {
        let mut secrets = Vec::new();
        if let (Some(user), Some(Ok(password))) = (
            &self.username,
            self.password.as_ref().map(|p| p.resolve("password")),
        ) {
            secrets.push(format!("\0{user}\0{password}"));
            secrets.push(password);
        }
        secrets
    }

    fn enrich(&self) -> &[crate::rules::Enrich] {
        &self.enrich
    }

    fn template(&self) -> Option<&TemplateRef> {
        self.template.as_ref()
    }

    fn digest(&self) -> Option<std::time::Duration> {
        self.digest.map(|HumanDuration(window)| window)
    }
}

/// Whether `url` names this machine, where nothing crosses a network.
fn is_loopback(url: &reqwest::Url) -> bool {
    let host = url.host_str().unwrap_or_default();
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Parses an address from the configuration; CR and LF are refused outright.
fn mailbox(key: &str, text: &str) -> Result<Mailbox, String> {
    if text.contains(['\r', '\n']) {
        return Err(format!("{key}: line breaks are not allowed in an address"));
    }
    Mailbox::from_str(text).map_err(|e| format!("{key}: {text:?} is not an email address ({e})"))
}

pub struct EmailSink {
    name: String,
    /// The relay must offer STARTTLS: if it does not, say how to change that.
    starttls_required: bool,
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    to: Vec<Mailbox>,
}

impl EmailSink {
    /// # Errors
    /// The password or CA file cannot be read, or the transport cannot be built.
    pub fn new(config: &EmailSinkConfig, name: &str) -> Result<Self, String> {
        super::install_tls_provider();
        let url = reqwest::Url::parse(&config.url).map_err(|e| format!("url: {e}"))?;
        let host = url
            .host_str()
            .unwrap_or_default()
            .trim_matches(['[', ']'])
            .to_owned();
        let implicit = url.scheme() == "smtps";
        let mut tls = TlsParameters::builder(host.clone());
        if let Some(ca_file) = &config.ca_file {
            let pem = std::fs::read(ca_file)
                .map_err(|e| format!("ca_file: cannot read {}: {e}", ca_file.display()))?;
            let cert = Certificate::from_pem(&pem).map_err(|e| format!("ca_file: {e}"))?;
            tls = tls.add_root_certificate(cert);
        }
        let tls = tls.build_rustls().map_err(|e| format!("TLS: {e}"))?;
        let tls = match (implicit, config.starttls) {
            (true, _) => Tls::Wrapper(tls),
            (false, StartTls::Required) => Tls::Required(tls),
            (false, StartTls::Opportunistic) => Tls::Opportunistic(tls),
            (false, StartTls::Never) => Tls::None,
        };
        let port = url.port().unwrap_or(if implicit { 465 } else { 587 });
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
            .port(port)
            .tls(tls)
            .timeout(Some(config.delivery.timeout.0));
        if let (Some(username), Some(password)) = (&config.username, &config.password) {
            builder = builder.credentials(Credentials::new(
                username.clone(),
                password.resolve("password")?,
            ));
        }
        Ok(Self {
            name: name.to_owned(),
            starttls_required: !implicit && config.starttls == StartTls::Required,
            transport: builder.build(),
            from: mailbox("from", &config.from)?,
            to: config
                .to
                .iter()
                .map(|to| mailbox("to", to))
                .collect::<Result<_, _>>()?,
        })
    }

    /// A `Message-ID` that is the same each time these deliveries are retried, so a mail client
    /// can recognise a repeat (delivery is at least once): from the sink, the routes and the
    /// events' delivery ids.
    fn message_id(&self, deliveries: &[Delivery<'_>]) -> String {
        use sha2::{Digest as _, Sha256};
        let mut hash = Sha256::new();
        hash.update(self.name.as_bytes());
        for delivery in deliveries {
            for part in [
                delivery.route,
                &delivery.event.source,
                &delivery.event.delivery_id,
            ] {
                hash.update([0]);
                hash.update(part.as_bytes());
            }
        }
        format!("<{}@hookroute>", &hex::encode(hash.finalize())[..32])
    }

    async fn send(
        &self,
        subject: &str,
        body: Body,
        message_id: String,
        attachments: &[Attachment],
    ) -> Result<String, SinkError> {
        let Body { text, html } = body;
        let html = format!("<!doctype html><html><body>{html}</body></html>");
        let part = |content_type: ContentType, body: String| {
            SinglePart::builder()
                .header(content_type)
                .header(ContentTransferEncoding::Base64)
                .body(body)
        };
        let mut message = Message::builder()
            .message_id(Some(message_id))
            .from(self.from.clone())
            .subject(one_line(subject));
        for to in &self.to {
            message = message.to(to.clone());
        }
        let alternative = MultiPart::alternative()
            .singlepart(part(ContentType::TEXT_PLAIN, text))
            .singlepart(part(ContentType::TEXT_HTML, html));
        // Files (the enrichment's PDF report) follow the text in a mixed part.
        let content = match attachments {
            [] => alternative,
            files => files.iter().fold(
                MultiPart::mixed().multipart(alternative),
                |mixed, file| {
                    let content_type = ContentType::parse(file.content_type)
                        .unwrap_or(ContentType::TEXT_PLAIN);
                    mixed.singlepart(
                        lettre::message::Attachment::new(file.filename.clone())
                            .body(file.bytes.to_vec(), content_type),
                    )
                },
            ),
        };
        let message = message
            .multipart(content)
            .map_err(|e| SinkError::permanent(format!("cannot build the email: {e}")))?;
        match self.transport.send(message).await {
            Ok(response) => Ok(bounded(&format!(
                "{} {}",
                response.code(),
                response.message().collect::<Vec<_>>().join(" ")
            ))),
            Err(err)
                if self.starttls_required
                    && err.is_client()
                    && err.to_string().contains("STARTTLS") =>
            {
                Err(SinkError::permanent(format!(
                    "SMTP: {err}; the relay does not offer STARTTLS, which starttls = \"required\" \
                     (the default) asks for: use smtps://, or set starttls = \"opportunistic\" or \
                     \"never\" for a relay you trust"
                )))
            }
            Err(err) if err.is_permanent() => Err(SinkError::permanent(format!("SMTP: {err}"))),
            Err(err) => Err(SinkError::transient(format!("SMTP: {err}"))),
        }
    }
}

#[async_trait]
impl Sink for EmailSink {
    async fn deliver(&self, delivery: &Delivery<'_>) -> Result<String, SinkError> {
        let id = self.message_id(std::slice::from_ref(delivery));
        let mut body = Body::default();
        body.add(delivery, false);
        self.send(&delivery.message.title, body, id, delivery.attachments)
            .await
    }

    async fn deliver_batch(
        &self,
        deliveries: &[Delivery<'_>],
        summary: &Rendered,
    ) -> Result<String, SinkError> {
        let subject = match deliveries {
            [one] => one.message.title.clone(),
            _ if !summary.title.is_empty() => summary.title.clone(),
            many => format!(
                "{} events, the first: {}",
                many.len(),
                many[0].message.title
            ),
        };
        let mut body = Body::default();
        if deliveries.len() > 1 {
            body.summary(summary);
        }
        for delivery in deliveries {
            body.add(delivery, deliveries.len() > 1);
        }
        let attachments: Vec<Attachment> = deliveries
            .iter()
            .flat_map(|delivery| delivery.attachments.iter().cloned())
            .collect();
        self.send(&subject, body, self.message_id(deliveries), &attachments)
            .await
    }
}

/// An email's text and HTML parts, built together so that they say the same: each event's
/// message, then its context (`Delivery::context`) as a footer for the person on call.
#[derive(Debug, Default)]
struct Body {
    text: String,
    html: String,
}

impl Body {
    /// A group's summary above its events: the grouped template's lines.
    fn summary(&mut self, summary: &Rendered) {
        let text = normalise(&summary.body);
        if text.is_empty() {
            return;
        }
        self.text.push_str(&format!("{text}\n"));
        self.html.push_str(&format!(
            "<p>{}</p>\n",
            escape_html(&text).replace('\n', "<br>\n")
        ));
    }

    /// One event: its message (headed by its title when the email holds several), then its
    /// context.
    fn add(&mut self, delivery: &Delivery<'_>, titled: bool) {
        let message = delivery.message;
        if !self.text.is_empty() {
            self.text.push_str("\n\n----\n\n");
            self.html.push_str("<hr>\n");
        }
        if titled {
            let title = one_line(&message.title);
            self.text.push_str(&format!("{title}\n"));
            self.html
                .push_str(&format!("<h3>{}</h3>\n", escape_html(&title)));
        } else {
            self.html.push_str(&format!(
                "<h2>{}</h2>\n",
                escape_html(&one_line(&message.title))
            ));
        }
        let text = normalise(&message.body);
        if !text.is_empty() {
            self.text.push_str(&format!("{text}\n"));
            self.html.push_str(&format!(
                "<p>{}</p>\n",
                escape_html(&text).replace('\n', "<br>\n")
            ));
        }
        let context = delivery.context();
        let event = format!("{} from {}", context.event_type, context.source);
        let mut rows = vec![
            ("Event", event),
            ("When", context.at),
            ("Route", context.route.to_owned()),
            ("Delivery", context.delivery_id.into_owned()),
        ];
        if let Some(link) = context.link {
            rows.push(("Link", link.to_owned()));
        }
        // "-- " is the signature separator mail clients dim or fold.
        self.text.push_str("\n-- \n");
        self.html
            .push_str("<table style=\"color:#555;font-size:smaller\">\n");
        for (label, value) in rows {
            let value = one_line(&value);
            self.text
                .push_str(&format!("{:<10}{value}\n", format!("{label}:")));
            let shown = match label {
                // A plain web address (see `templates::link`): no quote can end the attribute.
                "Link" => format!("<a href=\"{0}\">{0}</a>", escape_html(&value)),
                _ => escape_html(&value),
            };
            self.html
                .push_str(&format!("<tr><td>{label}</td><td>{shown}</td></tr>\n"));
        }
        self.html.push_str("</table>\n");
    }
}

/// A subject is one line: CR and LF become spaces.
fn one_line(text: &str) -> String {
    text.replace(['\r', '\n'], " ")
}

/// Line endings as `\n` only: no bare CR can reach the SMTP stream.
fn normalise(text: &str) -> String {
    text.replace("\r\n", "\n").replace('\r', "\n")
}

fn escape_html(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_cannot_break_out() {
        assert_eq!(
            one_line("a\r\nBcc: x@evil.example\rc"),
            "a  Bcc: x@evil.example c"
        );
        assert_eq!(normalise("a\r\nb\rc\n.\r\n"), "a\nb\nc\n.\n");
        assert!(mailbox("from", "Ops <ops@example.com>\r\nBcc: x@y.z").is_err());
        assert!(mailbox("to", "not an address").is_err());
        assert_eq!(
            mailbox("to", "Sec Team <sec@example.com>")
                .unwrap()
                .email
                .to_string(),
            "sec@example.com"
        );
    }
}
