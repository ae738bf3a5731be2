//! A body's tree, whatever valid JSON a stranger sent. Pure.

use serde_json::Value;

/// Containers nested deeper than this are kept as their JSON text: serde_json's own limit, and
/// what the recursive readers of a tree (conditions, templates, printing) are safe with.
pub const MAX_DEPTH: usize = 128;

/// The tree of valid JSON `text`. serde_json refuses two things valid JSON may hold: a number
/// no `f64` can carry (`1e999`), and nesting past [`MAX_DEPTH`]. Either would cost the whole
/// tree, and with it every condition and template on the event, so such a body is read again
/// by [`lenient`], which keeps everything else as it is.
pub(super) fn tree(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| lenient(text))
}

/// An open container while [`lenient`] reads.
enum Open {
    Array(Vec<Value>),
    Object(serde_json::Map<String, Value>, Option<String>),
}

/// Reads valid JSON `text` into a tree without recursion, in one pass: a number out of
/// `f64`'s range becomes the string of its digits, a container deeper than [`MAX_DEPTH`] the
/// string of its JSON text. A repeated key keeps its last value, as serde_json's maps do.
/// Anything else (which valid JSON cannot hold) ends the read with what was read so far.
pub(super) fn lenient(text: &str) -> Value {
    let bytes = text.as_bytes();
    let mut open: Vec<Open> = Vec::new();
    let mut at = 0;
    loop {
        let Some(&byte) = bytes.get(at) else {
            return close_all(open);
        };
        let start = at;
        let value = match byte {
            b' ' | b'\t' | b'\n' | b'\r' | b',' | b':' => {
                at += 1;
                continue;
            }
            b'{' | b'[' if open.len() >= MAX_DEPTH => {
                at = container_end(bytes, at);
                Value::String(text.get(start..at).unwrap_or_default().to_owned())
            }
            b'{' => {
                open.push(Open::Object(serde_json::Map::new(), None));
                at += 1;
                continue;
            }
            b'[' => {
                open.push(Open::Array(Vec::new()));
                at += 1;
                continue;
            }
            b'}' | b']' => {
                at += 1;
                match open.pop() {
                    Some(Open::Array(items)) => Value::Array(items),
                    Some(Open::Object(map, _)) => Value::Object(map),
                    None => return Value::Null,
                }
            }
            b'"' => {
                at = string_end(bytes, at);
                let string: String = serde_json::from_str(text.get(start..at).unwrap_or_default())
                    .unwrap_or_default();
                if let Some(Open::Object(_, key @ None)) = open.last_mut() {
                    *key = Some(string);
                    continue;
                }
                Value::String(string)
            }
            b't' | b'f' | b'n' => {
                let (value, len) = match byte {
                    b't' => (Value::Bool(true), 4),
                    b'f' => (Value::Bool(false), 5),
                    _ => (Value::Null, 4),
                };
                at += len;
                value
            }
            _ => {
                while bytes
                    .get(at)
                    .is_some_and(|b| matches!(b, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E'))
                {
                    at += 1;
                }
                let digits = text.get(start..at).unwrap_or_default();
                if digits.is_empty() {
                    return close_all(open); // not JSON after all
                }
                serde_json::from_str::<serde_json::Number>(digits)
                    .map_or_else(|_| Value::String(digits.to_owned()), Value::Number)
            }
        };
        match open.last_mut() {
            Some(Open::Array(items)) => items.push(value),
            Some(Open::Object(map, key)) => {
                map.insert(key.take().unwrap_or_default(), value);
            }
            None => return value,
        }
    }
}

/// Closes whatever is still open (only reached on text that is not valid JSON).
fn close_all(mut open: Vec<Open>) -> Value {
    let mut value = Value::Null;
    while let Some(container) = open.pop() {
        value = match container {
            Open::Array(mut items) => {
                items.push(value);
                Value::Array(items)
            }
            Open::Object(map, _) => Value::Object(map),
        };
    }
    value
}

/// Where the string starting at `at` (its opening quote) ends: just past its closing quote.
fn string_end(bytes: &[u8], mut at: usize) -> usize {
    at += 1;
    while let Some(&byte) = bytes.get(at) {
        at += 1;
        match byte {
            b'\\' => at += 1,
            b'"' => return at,
            _ => {}
        }
    }
    bytes.len()
}

/// Where the container starting at `at` ends: just past its closing bracket.
fn container_end(bytes: &[u8], mut at: usize) -> usize {
    let mut depth = 0usize;
    while let Some(&byte) = bytes.get(at) {
        match byte {
            b'"' => {
                at = string_end(bytes, at);
                continue;
            }
            b'{' | b'[' => depth += 1,
            b'}' | b']' => {
                depth -= 1;
                if depth == 0 {
                    return at + 1;
                }
            }
            _ => {}
        }
        at += 1;
    }
    bytes.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Killed mutants (cargo mutants, #23): spaced text, escapes, literals, numbers and empty
    /// containers read as serde_json reads them, and a container past the depth limit is kept
    /// whole as its text, brackets and escaped quotes inside its strings included.
    #[test]
    fn lenient_reads_spaced_text_and_keeps_a_deep_container_whole() {
        let shallow = "{ \"s\" : \"q\\\"x]\" ,\n \"t\": true, \"f\": false, \"n\": null,\n \"num\": [ -1.5e3 , 42 ],\n \"o\": { \"k\": [ { } , [ ] ] } }";
        assert_eq!(
            lenient(shallow),
            serde_json::from_str::<Value>(shallow).unwrap()
        );

        let inner = "\"a]\\\"}\"";
        let depth = MAX_DEPTH + 1;
        let text = format!(
            "{{ \"deep\": {}{inner}{} }}",
            "[".repeat(depth),
            "]".repeat(depth)
        );
        let mut value = &lenient(&text)["deep"];
        let mut arrays = 0;
        while let Value::Array(items) = value {
            assert_eq!(items.len(), 1);
            value = &items[0];
            arrays += 1;
        }
        // The object and 127 arrays are open when the 128th array is met: it and what it
        // holds are kept as text.
        assert_eq!(arrays, MAX_DEPTH - 1);
        let kept = depth - arrays;
        assert_eq!(
            value,
            &Value::String(format!("{}{inner}{}", "[".repeat(kept), "]".repeat(kept)))
        );
    }
}
