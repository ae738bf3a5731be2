//! Text a stranger wrote (a sender's event type, a receiver's answer, a hook's output), made
//! safe for where it goes. A leaf: the store keeps it, the operator's tools print it and the
//! log writes it, each through one function here.
//!
//! - [`storable`]: what both backends can keep. PostgreSQL's `text` refuses NUL, so a NUL in
//!   a receiver's answer once failed the attempt's record, leaving its job leased for ever.
//! - [`printable`]: what a terminal shows as written. Control characters (an escape sequence
//!   can erase a row and draw a forged one, set the window's title, or split a row with a
//!   newline) and bidirectional overrides (which reorder what follows) are spelt as escapes.
//! - [`EscapeControls`]: the same for a log line as it is written, so no field can start a
//!   line of its own that reads like the daemon's.

use std::borrow::Cow;
use std::fmt;

/// `text` with every NUL made U+FFFD (the replacement character), so either backend keeps it.
pub fn storable(text: &str) -> Cow<'_, str> {
    if text.contains('\0') {
        Cow::Owned(text.replace('\0', "\u{FFFD}"))
    } else {
        Cow::Borrowed(text)
    }
}

/// Whether a terminal would act on `c` rather than show it: C0 and C1 controls, DEL, and the
/// Unicode format characters that change how the rest of a line reads (bidirectional embeddings,
/// overrides and isolates, and the line and paragraph separators).
fn is_hazard(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{200E}' | '\u{200F}'              // left-to-right and right-to-left marks
            | '\u{202A}'..='\u{202E}'            // embeddings and overrides
            | '\u{2066}'..='\u{2069}'            // isolates
            | '\u{2028}' | '\u{2029}'            // line and paragraph separators
            | '\u{061C}')
}

/// Writes `text` to `out` with each hazard (see [`is_hazard`]) spelt as an escape: `\n`, `\r`,
/// `\t`, `\u{1b}`, `\u{202e}`.
fn write_escaped(out: &mut (impl fmt::Write + ?Sized), text: &str) -> fmt::Result {
    let mut rest = text;
    while let Some(at) = rest.find(is_hazard) {
        out.write_str(&rest[..at])?;
        let c = rest[at..].chars().next().expect("found at a char boundary");
        match c {
            '\n' => out.write_str("\\n")?,
            '\r' => out.write_str("\\r")?,
            '\t' => out.write_str("\\t")?,
            c => write!(out, "\\u{{{:x}}}", u32::from(c))?,
        }
        rest = &rest[at + c.len_utf8()..];
    }
    out.write_str(rest)
}

/// `text` as a terminal should show it: every control character and bidirectional override
/// spelt as an escape, so what a stranger wrote stays on its own row and says only itself.
pub fn printable(text: &str) -> Cow<'_, str> {
    if !text.contains(is_hazard) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    write_escaped(&mut out, text).expect("writing to a String cannot fail");
    Cow::Owned(out)
}

/// `text` for a terminal, keeping its line breaks: each line [`printable`], joined by a newline
/// and `indent`, so a multi-line answer reads as an indented block and nothing in it escapes.
pub fn printable_lines(text: &str, indent: &str) -> String {
    text.lines()
        .map(|line| printable(line))
        .collect::<Vec<_>>()
        .join(&format!("\n{indent}"))
}

/// Hex digits of a hash-like id kept in a human message.
const SHORT_HASH: usize = 12;

/// `id` as a person reads it in a message: a hash (`sha256:` and 64 hex digits, the id of a
/// body that carries none, as Compliance Scorecard's) cut to its first 12 digits and `…`, which
/// tell deliveries apart as well; any other id as it is. `show` keeps the whole id.
pub fn short_id(id: &str) -> Cow<'_, str> {
    let (prefix, digits) = id.rsplit_once(':').unwrap_or(("", id));
    let is_hash = digits.len() >= 32 && digits.bytes().all(|b| b.is_ascii_hexdigit());
    if !is_hash {
        return Cow::Borrowed(id);
    }
    let separator = if prefix.is_empty() { "" } else { ":" };
    Cow::Owned(format!("{prefix}{separator}{}…", &digits[..SHORT_HASH]))
}

/// A [`fmt::Write`] that passes text on with its hazards escaped (see [`printable`]): the
/// daemon's text log writes every field through one, so a sender's `\n` cannot begin a line.
pub struct EscapeControls<'a, W: ?Sized>(pub &'a mut W);

impl<W: fmt::Write + ?Sized> fmt::Write for EscapeControls<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        write_escaped(self.0, s)
    }
}

/// The text log's fields, written as tracing-subscriber's default does, through
/// [`EscapeControls`]: a sender's `\n` in an event type stays in its field instead of
/// starting a convincing line of its own. (The JSON format escapes by itself.)
#[derive(Debug, Default)]
pub struct EscapedFields(tracing_subscriber::fmt::format::DefaultFields);

impl<'w> tracing_subscriber::fmt::FormatFields<'w> for EscapedFields {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(
        &self,
        mut writer: tracing_subscriber::fmt::format::Writer<'w>,
        fields: R,
    ) -> fmt::Result {
        let mut escaped = EscapeControls(&mut writer);
        let writer = tracing_subscriber::fmt::format::Writer::new(&mut escaped);
        self.0.format_fields(writer, fields)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_like_ids_are_shortened_and_others_kept() {
        let hash = format!("sha256:{}", "ab12".repeat(16));
        assert_eq!(short_id(&hash), "sha256:ab12ab12ab12…");
        assert_eq!(short_id(&"f0".repeat(20)), "f0f0f0f0f0f0…");
        for kept in [
            "550e8400-e29b-41d4-a716-446655440000",
            "cl:evt_123",
            "42",
            "sha256:xyz",
        ] {
            assert_eq!(short_id(kept), kept);
        }
    }

    #[test]
    fn storable_text_has_no_nul() {
        assert_eq!(storable("200 ok\0tail"), "200 ok\u{FFFD}tail");
        assert!(matches!(storable("plain"), Cow::Borrowed("plain")));
    }

    #[test]
    fn printable_text_cannot_move_the_cursor_or_reorder_the_line() {
        for (hostile, shown) in [
            ("scan\x1b[2K\rforged", "scan\\u{1b}[2K\\rforged"),
            ("500 \x1b]0;title\x07", "500 \\u{1b}]0;title\\u{7}"),
            ("a\nb\tc", "a\\nb\\tc"),
            ("txt.\u{202E}exe", "txt.\\u{202e}exe"),
            ("\u{2066}x\u{2069}", "\\u{2066}x\\u{2069}"),
            ("\u{9b}31m", "\\u{9b}31m"),
            ("déjà vu ✓", "déjà vu ✓"),
        ] {
            assert_eq!(printable(hostile), shown, "{hostile:?}");
        }
        assert!(matches!(printable("scan.completed"), Cow::Borrowed(_)));
    }

    #[test]
    fn printable_lines_keep_their_breaks_and_nothing_else() {
        assert_eq!(printable_lines("a\nb\x1b[2Jc", "  "), "a\n  b\\u{1b}[2Jc");
    }

    #[test]
    fn the_escaping_writer_escapes_what_it_passes_on() {
        use fmt::Write as _;
        let mut out = String::new();
        let forged = "x\n2026 ERROR forged";
        write!(EscapeControls(&mut out), "type={forged}").unwrap();
        assert_eq!(out, "type=x\\n2026 ERROR forged");
    }
}
