//! What of an event's payload the routes' expressions read, so that an activation converts
//! those fields into CEL values and not the whole payload: a scanner's body carries a findings
//! array that a condition on `data.score` never looks at, and converting it was most of the
//! cost of routing (benches/LOG.md, 2026-12-07).
//!
//! Only member selections are narrowed (`data.score`, `has(data.grade)`, `payload.data.x`):
//! the selected field is kept whole, with everything under it. Any other use of `data` or
//! `payload` (the bare variable, an index, `size(data)`, a macro variable of that name) reads
//! the whole of it. Fields absent from the event stay absent, so an expression errs, holds or
//! fails exactly as it would on the whole payload.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use cel::common::ast::{EntryExpr, Expr};
use cel::{IdedExpr, Value};
use serde_json::Value as Json;

/// The parts of `data` and `payload` some expression reads.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reads {
    data: Need,
    payload: Need,
}

/// What is read of one JSON value: all of it, or some of its members (none, to begin with).
#[derive(Debug, Clone, PartialEq)]
enum Need {
    Whole,
    Fields(BTreeMap<String, Need>),
}

impl Default for Need {
    fn default() -> Self {
        Self::Fields(BTreeMap::new())
    }
}

impl Need {
    /// Marks the member at `path` (all of it) as read.
    fn require(&mut self, path: &[&str]) {
        match (self, path.split_first()) {
            (Self::Whole, _) => {}
            (need, None) => *need = Self::Whole,
            (Self::Fields(fields), Some((first, rest))) => {
                fields.entry((*first).to_owned()).or_default().require(rest)
            }
        }
    }

    fn merge(&mut self, other: &Self) {
        match (self, other) {
            (Self::Whole, _) => {}
            (need, Self::Whole) => *need = Self::Whole,
            (Self::Fields(mine), Self::Fields(theirs)) => {
                for (name, need) in theirs {
                    mine.entry(name.clone()).or_default().merge(need);
                }
            }
        }
    }

    /// `json` as a CEL value, with only the members read. A value that is not an object is
    /// converted whole: a selection on it fails as it would have.
    fn project(&self, json: &Json) -> Value {
        match (self, json) {
            (Self::Fields(fields), Json::Object(members)) => Value::from(
                fields
                    .iter()
                    .filter_map(|(name, need)| {
                        let member = members.get(name)?;
                        Some((name.clone(), need.project(member)))
                    })
                    .collect::<HashMap<String, Value>>(),
            ),
            _ => to_cel(json),
        }
    }
}

impl Reads {
    /// What `expr` reads.
    pub fn of(expr: &IdedExpr) -> Self {
        let mut reads = Self::default();
        reads.collect(expr);
        reads
    }

    /// All of the payload, as before the reads were narrowed: what tests compare against.
    #[cfg(test)]
    pub fn whole() -> Self {
        Self {
            data: Need::Whole,
            payload: Need::Whole,
        }
    }

    /// Everything either reads.
    pub fn merge(&mut self, other: &Self) {
        self.data.merge(&other.data);
        self.payload.merge(&other.payload);
    }

    /// The `data` the expressions see: the payload's `data` member, or an empty map when there
    /// is none (so `data.score` fails as "No such key").
    pub fn data(&self, payload: &Json) -> Value {
        match payload.get("data") {
            Some(data) => self.data.project(data),
            None => Value::from(HashMap::<String, Value>::new()),
        }
    }

    pub fn payload(&self, payload: &Json) -> Value {
        self.payload.project(payload)
    }

    fn need_mut(&mut self, variable: &str) -> Option<&mut Need> {
        match variable {
            "data" => Some(&mut self.data),
            "payload" => Some(&mut self.payload),
            _ => None,
        }
    }

    fn collect(&mut self, expr: &IdedExpr) {
        if let Some((variable, path)) = selection(expr)
            && let Some(need) = self.need_mut(variable)
        {
            need.require(&path);
            return;
        }
        match &expr.expr {
            Expr::Call(call) => {
                call.target.iter().for_each(|target| self.collect(target));
                call.args.iter().for_each(|arg| self.collect(arg));
            }
            Expr::Comprehension(comprehension) => {
                // A macro variable named `data` hides the event's: whatever it reads inside,
                // the whole payload is kept rather than telling the two apart.
                let bound = [
                    Some(&comprehension.iter_var),
                    comprehension.iter_var2.as_ref(),
                ];
                for name in bound.into_iter().flatten().chain([&comprehension.accu_var]) {
                    if let Some(need) = self.need_mut(name) {
                        *need = Need::Whole;
                    }
                }
                for part in [
                    &comprehension.iter_range,
                    &comprehension.accu_init,
                    &comprehension.loop_cond,
                    &comprehension.loop_step,
                    &comprehension.result,
                ] {
                    self.collect(part);
                }
            }
            Expr::List(list) => list.elements.iter().for_each(|e| self.collect(e)),
            Expr::Map(map) => map.entries.iter().for_each(|e| self.collect_entry(&e.expr)),
            Expr::Struct(fields) => fields
                .entries
                .iter()
                .for_each(|e| self.collect_entry(&e.expr)),
            Expr::Select(select) => self.collect(&select.operand),
            Expr::Ident(_) | Expr::Literal(_) | Expr::Unspecified => {}
        }
    }

    fn collect_entry(&mut self, entry: &EntryExpr) {
        match entry {
            EntryExpr::StructField(field) => self.collect(&field.value),
            EntryExpr::MapEntry(entry) => {
                self.collect(&entry.key);
                self.collect(&entry.value);
            }
        }
    }
}

/// `a.b.c` (presence tests included) as `("a", ["b", "c"])`; a bare `a` as `("a", [])`.
fn selection(expr: &IdedExpr) -> Option<(&str, Vec<&str>)> {
    let mut path = Vec::new();
    let mut expr = expr;
    loop {
        match &expr.expr {
            Expr::Ident(name) => {
                path.reverse();
                return Some((name, path));
            }
            Expr::Select(select) => {
                path.push(select.field.as_str());
                expr = &select.operand;
            }
            _ => return None,
        }
    }
}

/// JSON to CEL, keeping integers as CEL `int` (serde would make positive ones `uint`, and CEL
/// has no `uint < int` overload, so `data.score < 70` would never hold).
fn to_cel(json: &Json) -> Value {
    match json {
        Json::Null => Value::Null,
        Json::Bool(b) => Value::Bool(*b),
        Json::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => Value::Int(i),
            (None, Some(u)) => Value::UInt(u),
            _ => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Json::String(s) => Value::String(Arc::new(s.clone())),
        Json::Array(items) => Value::List(Arc::new(items.iter().map(to_cel).collect())),
        Json::Object(map) => {
            let map: HashMap<String, Value> =
                map.iter().map(|(k, v)| (k.clone(), to_cel(v))).collect();
            Value::from(map)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reads(text: &str) -> Reads {
        Reads::of(cel::Program::compile(text).unwrap().expression())
    }

    fn fields(names: &[(&str, Need)]) -> Need {
        Need::Fields(
            names
                .iter()
                .map(|(name, need)| ((*name).to_owned(), need.clone()))
                .collect(),
        )
    }

    #[test]
    fn member_selections_narrow_and_anything_else_reads_the_whole() {
        let example = reads("data.score < 70 || data.grade in ['D', 'F']");
        assert_eq!(
            example.data,
            fields(&[("grade", Need::Whole), ("score", Need::Whole)])
        );
        assert_eq!(example.payload, Need::default());
        assert_eq!(
            reads("has(data.x.y) && payload.data.z == 1").data,
            fields(&[("x", fields(&[("y", Need::Whole)]))])
        );
        assert_eq!(
            reads("payload.data.z == 1").payload,
            fields(&[("data", fields(&[("z", Need::Whole)]))])
        );
        assert_eq!(
            reads("data.findings.exists(f, f.severity == 'critical')").data,
            fields(&[("findings", Need::Whole)])
        );
        for whole in [
            "size(data) > 2",
            "data['score'] < 70",
            "'score' in data",
            "data == {}",
            "[1].exists(data, data > 0) && data.score > 1",
        ] {
            assert_eq!(reads(whole).data, Need::Whole, "{whole}");
        }
        let mut both = reads("data.score < 70");
        both.merge(&reads("data.domain"));
        assert_eq!(
            both.data,
            fields(&[("domain", Need::Whole), ("score", Need::Whole)])
        );
        both.merge(&reads("size(data) > 0"));
        assert_eq!(both.data, Need::Whole);
    }
}
