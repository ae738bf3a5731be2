//! CEL over events: compiled expressions, and the per-event activation they run against.

use std::fmt;
use std::sync::{Arc, OnceLock};

use cel::{Context, Env, Program, Value};

use super::reads::Reads;
use crate::event::Event;

/// A compiled CEL expression with its source text (for messages and `route-test`).
pub struct Expr {
    text: String,
    program: Program,
}

impl Expr {
    /// # Errors
    /// The parser's message with the line and column of the first problem.
    pub fn compile(text: &str) -> Result<Self, String> {
        match Program::compile(text) {
            Ok(program) => {
                // A name the activation does not provide would make the expression false for
                // every event: a route that silently never matches (`score < 70` for
                // `data.score < 70`). Refused here, where the operator sees it.
                let references = program.references();
                if let Some(unknown) = references
                    .variables()
                    .into_iter()
                    .find(|name| !VARIABLES.contains(name) && !is_bound(text, name))
                {
                    return Err(format!(
                        "unknown variable {unknown:?} in {text:?}; conditions see {} (fields \
                         of the payload's data are data.<field>)",
                        VARIABLES.join(", ")
                    ));
                }
                Ok(Self {
                    text: text.to_owned(),
                    program,
                })
            }
            Err(errors) => Err(errors
                .errors
                .iter()
                .map(|e| {
                    format!(
                        "line {}, column {}: {} in {text:?}",
                        e.pos.0,
                        e.pos.1 + 1,
                        e.msg
                    )
                })
                .collect::<Vec<_>>()
                .join("; ")),
        }
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    /// What of the payload it reads (worked out from its syntax tree when a route table is
    /// built, not per event).
    pub fn reads(&self) -> Reads {
        Reads::of(self.program.expression())
    }
}

/// A condition evaluated on its own, outside a route table (a silence's `--when`): it reads
/// only what it names of the payload.
#[derive(Debug)]
pub struct Condition {
    expr: Expr,
    reads: Reads,
}

impl Condition {
    /// # Errors
    /// As [`Expr::compile`]: the same message `check-config` gives for a route's `when`.
    pub fn compile(text: &str) -> Result<Self, String> {
        let expr = Expr::compile(text)?;
        let reads = expr.reads();
        Ok(Self { expr, reads })
    }

    /// Whether it holds for `event`; one that cannot be evaluated does not.
    pub fn holds(&self, event: &Event) -> bool {
        Activation::lazy(event, &self.reads)
            .eval_bool(&self.expr)
            .unwrap_or(false)
    }
}

/// The variables every expression sees (see [`Activation`]).
pub const VARIABLES: [&str; 7] = [
    "type",
    "source",
    "origin",
    "delivery_id",
    "occurred_at",
    "data",
    "payload",
];

/// Whether `name` is bound by a macro in `text` (`list.exists(x, x > 1)`): such names are
/// references too, to the macro's own variable.
fn is_bound(text: &str, name: &str) -> bool {
    ["all", "exists", "exists_one", "map", "filter"]
        .iter()
        .any(|m| {
            text.match_indices(&format!(".{m}(")).any(|(at, found)| {
                text[at + found.len()..]
                    .trim_start()
                    .strip_prefix(name)
                    .is_some_and(|rest| rest.trim_start().starts_with(','))
            })
        })
}

impl fmt::Debug for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Expr({:?})", self.text)
    }
}

/// The variables an expression sees, built from the event only when a route first needs them
/// (most events are decided by globs alone), and then only from the fields the expressions
/// read (`reads`, the union over every expression that may run on it).
pub struct Activation<'e> {
    event: &'e Event,
    reads: &'e Reads,
    context: Option<Context<'static, 'static>>,
}

impl<'e> Activation<'e> {
    pub fn lazy(event: &'e Event, reads: &'e Reads) -> Self {
        Self {
            event,
            reads,
            context: None,
        }
    }

    fn context(&mut self) -> &Context<'static, 'static> {
        let (event, reads) = (self.event, self.reads);
        self.context.get_or_insert_with(|| {
            let mut context = Context::with_env(Arc::clone(stdlib()));
            let payload = event.payload.value();
            let data = reads.data(payload);
            let payload = reads.payload(payload);
            context.add_variable_from_value("type", event.event_type.as_str());
            context.add_variable_from_value("source", event.source.as_str());
            context.add_variable_from_value("origin", event.origin());
            context.add_variable_from_value("delivery_id", event.delivery_id.as_str());
            context
                .add_variable_from_value("occurred_at", event.occurred_at.map(|t| t.to_string()));
            context.add_variable_from_value("data", data);
            context.add_variable_from_value("payload", payload);
            context
        })
    }

    /// A condition's truth. `Err` says why it counts as false: an evaluation error (usually a
    /// missing field) or a value that is not a boolean.
    pub fn eval_bool(&mut self, expr: &Expr) -> Result<bool, String> {
        match expr.program.execute(self.context()) {
            Ok(Value::Bool(b)) => Ok(b),
            Ok(other) => Err(format!("not a boolean: {}", display(&other))),
            Err(err) => Err(format!("cannot evaluate: {err}")),
        }
    }

    /// A throttle key: the expression's value as text, empty when it cannot be evaluated. A
    /// NUL (JSON may spell one) is kept as U+FFFD: PostgreSQL keeps no NUL in text, and a
    /// key is only ever compared.
    pub fn eval_key(&mut self, expr: &Expr) -> String {
        let key = expr
            .program
            .execute(self.context())
            .map(|v| display(&v))
            .unwrap_or_default();
        if key.contains('\0') {
            key.replace('\0', "\u{FFFD}")
        } else {
            key
        }
    }
}

/// The standard CEL environment, built once: building it is most of the cost of a context.
fn stdlib() -> &'static Arc<Env> {
    static STDLIB: OnceLock<Arc<Env>> = OnceLock::new();
    STDLIB.get_or_init(|| Arc::new(Env::stdlib()))
}

fn display(value: &Value) -> String {
    match value {
        Value::String(s) => s.to_string(),
        Value::Int(i) => i.to_string(),
        Value::UInt(u) => u.to_string(),
        Value::Float(f) => f.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null => "null".into(),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holds(condition: &str, body: &str) -> Result<bool, String> {
        let event = Event::parse("cl", body.as_bytes(), None, None).unwrap();
        let expr = Expr::compile(condition).unwrap();
        Activation::lazy(&event, &expr.reads()).eval_bool(&expr)
    }

    /// Killed mutants (cargo mutants, #23): JSON integers are CEL `int` (a `uint` has no
    /// `<` against `70`), only those past `i64` are `uint`; the standard library's functions
    /// are there; an expression shows its text.
    #[test]
    fn integers_are_ints_the_stdlib_is_there_and_text_is_kept() {
        let body = r#"{"type": "x", "data": {"score": 50, "big": 18446744073709551615, "tags": ["a", "b"]}}"#;
        // Signed arithmetic: a `uint` 50 minus 60 would fail.
        assert_eq!(
            holds("data.score - 60 == -10 && data.score < 70", body),
            Ok(true)
        );
        assert_eq!(
            holds("string(data.big) == '18446744073709551615'", body),
            Ok(true)
        );
        assert_eq!(
            holds(
                "size(data.tags) == 2 && data.tags.exists(t, t == 'b')",
                body
            ),
            Ok(true)
        );
        let expr = Expr::compile("data.score < 70").unwrap();
        assert_eq!(expr.text(), "data.score < 70");
        assert!(format!("{expr:?}").contains("data.score < 70"), "{expr:?}");
    }

    /// Narrowed to what it reads, an expression holds, fails or errs with the same message as
    /// on the whole payload: absent fields, wrong types, non-objects, presence tests, macros.
    #[test]
    fn narrowed_reads_decide_as_the_whole_payload_does() {
        let bodies = [
            r#"{"type": "scan.completed", "data": {"score": 50, "grade": "F", "domain": "a.example", "findings": [{"severity": "critical"}], "x": {"y": 1}}}"#,
            r#"{"type": "scan.completed", "data": {"score": "high", "grade": null}}"#,
            r#"{"type": "scan.completed", "data": [1, 2]}"#,
            r#"{"type": "scan.completed", "data": "text"}"#,
            r#"{"type": "scan.completed"}"#,
            r#"{"event": "policy.published", "data": {"x": 5}}"#,
        ];
        let conditions = [
            "data.score < 70 || data.grade in ['D', 'F']",
            "has(data.grade) && data.grade == null",
            "has(data.x.y)",
            "data.x.y == 1 && payload.data.x.y == 1",
            "data.findings.exists(f, f.severity == 'critical')",
            "size(data) > 2",
            "data.missing.deeper == 1",
            "payload.type == 'scan.completed'",
            "'score' in data",
        ];
        let whole = Reads::whole();
        for body in bodies {
            let event = Event::parse("cl", body.as_bytes(), None, None).unwrap();
            for text in conditions {
                let expr = Expr::compile(text).unwrap();
                let reads = expr.reads();
                assert_eq!(
                    Activation::lazy(&event, &reads).eval_bool(&expr),
                    Activation::lazy(&event, &whole).eval_bool(&expr),
                    "{text} on {body}"
                );
                assert_eq!(
                    Activation::lazy(&event, &reads).eval_key(&expr),
                    Activation::lazy(&event, &whole).eval_key(&expr),
                    "{text} on {body}"
                );
            }
        }
    }
}
