//! Every problem a configuration has, each reported as a compiler would:
//! `file:line:column: key.path: what is wrong`.
//!
//! Validation records a problem by its key path as the operator wrote it (`sinks.ciso.to`,
//! `routes[2] ("low scores").when`); only when the report is written are the files read again
//! and each path looked up in the parsed TOML for its line and column. A key set by a
//! `HOOKROUTE_*` variable, or one the file lacks, is reported without a position.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::ConfigError;

/// One problem: where, and what is wrong.
#[derive(Debug)]
struct Problem {
    /// `None`: the configuration file itself (as opposed to its `rules_file`).
    file: Option<PathBuf>,
    key: String,
    message: String,
    /// Where a syntax error is (a byte offset); other problems are found by their key.
    offset: Option<usize>,
}

/// Every problem found so far.
#[derive(Debug, Default)]
pub(super) struct Problems(Vec<Problem>);

impl Problems {
    /// A problem with the configuration file's `key`.
    pub(super) fn add(&mut self, key: impl fmt::Display, message: impl fmt::Display) {
        self.add_at(None, key, message);
    }

    /// A problem with `key` of `file` (`None`: the configuration file).
    pub(super) fn add_at(
        &mut self,
        file: Option<&Path>,
        key: impl fmt::Display,
        message: impl fmt::Display,
    ) {
        self.0.push(Problem {
            file: file.map(Path::to_path_buf),
            key: key.to_string(),
            message: message.to_string(),
            offset: None,
        });
    }

    /// A TOML syntax error in `file` (`None`: the configuration file), at a byte range.
    fn add_syntax(&mut self, file: Option<&Path>, span: Option<Range<usize>>, message: &str) {
        self.0.push(Problem {
            file: file.map(Path::to_path_buf),
            key: String::new(),
            message: message.trim_end().to_owned(),
            offset: span.map(|span| span.start),
        });
    }

    pub(super) fn len(&self) -> usize {
        self.0.len()
    }

    /// Every problem, located, as one error; `Ok` when there are none.
    pub(super) fn into_result(self, config_file: &Path) -> Result<(), ConfigError> {
        if self.0.is_empty() {
            return Ok(());
        }
        // Each file read and parsed once; the report follows the files' order, then each
        // file's lines.
        let file_of = |problem: &Problem| {
            problem
                .file
                .clone()
                .unwrap_or_else(|| config_file.to_path_buf())
        };
        let mut files: Vec<PathBuf> = Vec::new();
        for file in self.0.iter().map(file_of) {
            if !files.contains(&file) {
                files.push(file);
            }
        }
        let texts: Vec<Option<String>> = files
            .iter()
            .map(|file| super::read_file(file).ok())
            .collect();
        let parsed: Vec<Option<(&str, Spanned<DeTable<'_>>)>> = texts
            .iter()
            .map(|text| {
                let text = text.as_deref()?;
                Some((text, DeTable::parse_recoverable(text).0))
            })
            .collect();
        let lines: Vec<Option<Lines>> =
            texts.iter().map(|t| t.as_deref().map(Lines::new)).collect();
        let mut located: Vec<(usize, usize, String)> = self
            .0
            .iter()
            .map(|problem| {
                let file = file_of(problem);
                let index = files.iter().position(|f| *f == file).expect("listed above");
                let source = parsed[index]
                    .as_ref()
                    .zip(lines[index].as_ref())
                    .map(|((_, root), lines)| (lines, root.get_ref()));
                let (offset, line) = render(&file, source, problem);
                (index, offset.unwrap_or(usize::MAX), line)
            })
            .collect();
        located.sort_by_key(|(file, offset, _)| (*file, *offset));
        let total = located.len();
        let problems = located
            .into_iter()
            .take(REPORTED)
            .map(|(_, _, line)| line)
            .collect();
        Err(ConfigError::Invalid {
            file: config_file.to_path_buf(),
            problems,
            total,
        })
    }
}

/// Problems listed in a report, at most; the rest are counted. Tens of thousands (a generated
/// file gone wrong) would bury the first, which usually explains the others.
pub const REPORTED: usize = 100;

/// Where a file's lines start, so that each problem's line is found by a binary search rather
/// than by reading the file up to it (which made a report quadratic in its problems).
struct Lines<'a> {
    text: &'a str,
    starts: Vec<usize>,
}

impl<'a> Lines<'a> {
    fn new(text: &'a str) -> Self {
        let starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Self { text, starts }
    }

    /// 1-based line and column (in characters) of a byte offset.
    fn line_and_column(&self, offset: usize) -> (usize, usize) {
        let mut end = offset.min(self.text.len());
        while !self.text.is_char_boundary(end) {
            end -= 1;
        }
        let line = self.starts.partition_point(|&start| start <= end);
        let start = self.starts[line - 1];
        (line, self.text[start..end].chars().count() + 1)
    }
}

/// Records every TOML syntax error in `text` (the parser recovers and goes on); returns
/// whether there were none.
pub(super) fn check_syntax(file: Option<&Path>, text: &str, problems: &mut Problems) -> bool {
    let (_, errors) = DeTable::parse_recoverable(text);
    for error in &errors {
        problems.add_syntax(file, error.span(), error.message());
    }
    errors.is_empty()
}

/// `file:line:column: key: message`, without the position when the key cannot be found; and
/// the byte offset the position is at. `source` is the file's lines and its parsed form.
fn render(
    file: &Path,
    source: Option<(&Lines<'_>, &DeTable<'_>)>,
    problem: &Problem,
) -> (Option<usize>, String) {
    let Problem {
        key,
        message,
        offset,
        ..
    } = problem;
    let offset = offset.or_else(|| source.and_then(|(_, root)| locate(root, key)));
    let at = match (source, offset) {
        (Some((lines, _)), Some(offset)) => {
            let (line, column) = lines.line_and_column(offset);
            format!("{}:{line}:{column}", file.display())
        }
        _ => file.display().to_string(),
    };
    let line = if key.is_empty() {
        format!("{at}: {message}")
    } else {
        format!("{at}: {key}: {message}")
    };
    (offset, line)
}

/// One step of a key path.
#[derive(Debug, PartialEq)]
enum Segment<'a> {
    Key(Cow<'a, str>),
    Index(usize),
}

/// The steps of a key path as validation writes it: `a.b`, `a[2]`, `"quoted key"`, and a
/// route's name in parentheses after its index (`routes[0] ("name")`), which is skipped.
fn segments(key: &str) -> Vec<Segment<'_>> {
    let mut found = Vec::new();
    let mut rest = key;
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix('.') {
            rest = after;
        } else if let Some(after) = rest.strip_prefix('[') {
            let Some((index, after)) = after.split_once(']') else {
                break;
            };
            match index.parse() {
                Ok(index) => found.push(Segment::Index(index)),
                Err(_) => break,
            }
            rest = after;
        } else if let Some(after) = rest.strip_prefix(" (") {
            rest = skip_parenthesis(after);
        } else if rest.starts_with('"') {
            let Some((name, after)) = quoted(rest) else {
                break;
            };
            found.push(Segment::Key(name));
            rest = after;
        } else {
            let end = rest.find(['.', '[', ' ']).unwrap_or(rest.len());
            found.push(Segment::Key(Cow::Borrowed(&rest[..end])));
            rest = &rest[end..];
        }
    }
    found
}

/// A `"…"` at the start of `text` (as `{:?}` writes it) and what follows it.
fn quoted(text: &str) -> Option<(Cow<'_, str>, &str)> {
    let mut escaped = false;
    for (i, c) in text.char_indices().skip(1) {
        match c {
            '\\' if !escaped => escaped = true,
            '"' if !escaped => {
                let inner = &text[1..i];
                let name = if inner.contains('\\') {
                    Cow::Owned(inner.replace("\\\"", "\"").replace("\\\\", "\\"))
                } else {
                    Cow::Borrowed(inner)
                };
                return Some((name, &text[i + 1..]));
            }
            _ => escaped = false,
        }
    }
    None
}

/// What follows the `)` that closes a parenthesis opened just before `text`.
fn skip_parenthesis(text: &str) -> &str {
    match text.strip_prefix('"').and_then(|_| quoted(text)) {
        Some((_, after)) => after.strip_prefix(')').unwrap_or(after),
        None => text.split_once(')').map_or("", |(_, after)| after),
    }
}

/// The byte offset of the deepest part of `key` the file has: the key itself where it is
/// written, else the table or array element that holds it.
fn locate(root: &DeTable<'_>, key: &str) -> Option<usize> {
    let mut table = root;
    let mut value: Option<&Spanned<DeValue<'_>>> = None;
    let mut at = None;
    for segment in segments(key) {
        let next = match (&segment, value.map(Spanned::get_ref)) {
            (Segment::Key(name), None) => entry(table, name),
            (Segment::Key(name), Some(DeValue::Table(inner))) => {
                table = inner;
                entry(table, name)
            }
            (Segment::Index(i), Some(DeValue::Array(items))) => {
                items.get(*i).map(|item| (item.span().start, item))
            }
            _ => None,
        };
        let Some((offset, found)) = next else {
            break;
        };
        at = Some(offset);
        value = Some(found);
    }
    at
}

/// The entry `name` of `table`: where its key is written, and its value.
fn entry<'t, 'i>(table: &'t DeTable<'i>, name: &str) -> Option<(usize, &'t Spanned<DeValue<'i>>)> {
    table
        .iter()
        .find(|(key, _)| key.get_ref() == name)
        .map(|(key, value)| (key.span().start, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_paths_split_into_steps() {
        use Segment::{Index, Key};
        let key = |s: &'static str| Key(Cow::Borrowed(s));
        assert_eq!(
            segments("sinks.email-ciso.to"),
            [key("sinks"), key("email-ciso"), key("to")]
        );
        assert_eq!(
            segments(r#"routes[2] ("a \"b\" (c)").sinks[1]"#),
            [key("routes"), Index(2), key("sinks"), Index(1)]
        );
        assert_eq!(
            segments(r#"sources."odd name".path"#),
            [key("sources"), key("odd name"), key("path")]
        );
        assert_eq!(segments(""), []);
    }

    #[test]
    fn keys_are_found_where_they_are_written() {
        let text = "[server]\nlisten = 1\n\n[sinks.ciso]\ntype = \"email\"\nto = 42\n\n\
                    [[routes]]\nname = \"a\"\n\n[[routes]]\nname = \"b\"\nsinks = [\"x\", \"y\"]\n";
        let (root, _) = DeTable::parse_recoverable(text);
        let lines = Lines::new(text);
        let at =
            |key: &str| locate(root.get_ref(), key).map(|offset| lines.line_and_column(offset));
        assert_eq!(at("server.listen"), Some((2, 1)));
        assert_eq!(at("sinks.ciso.to"), Some((6, 1)));
        assert_eq!(
            at("sinks.ciso.missing"),
            Some((4, 8)),
            "the table that lacks it"
        );
        assert_eq!(at(r#"routes[1] ("b").sinks[1]"#), Some((13, 15)));
        assert_eq!(at("storage.path"), None);
    }

    #[test]
    fn every_syntax_error_is_reported_with_its_position() {
        let text = "[server]\nlisten = \n[storage]\npath = \"x\nmax_batch = 1\n";
        let mut problems = Problems::default();
        assert!(!check_syntax(None, text, &mut problems));
        let lines: Vec<String> = problems
            .0
            .iter()
            .map(|p| {
                let (root, _) = DeTable::parse_recoverable(text);
                render(
                    Path::new("c.toml"),
                    Some((&Lines::new(text), root.get_ref())),
                    p,
                )
                .1
            })
            .collect();
        assert!(lines.len() >= 2, "{lines:?}");
        assert!(lines[0].starts_with("c.toml:2:"), "{lines:?}");
        assert!(
            lines.iter().any(|l| l.starts_with("c.toml:4:")),
            "{lines:?}"
        );
    }
}
