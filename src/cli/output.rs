//! How the CLI prints: JSON through serde_json, or a plain text rendering; and what
//! happens when the reader goes away.
//!
//! A closed pipe (`satchel stats --prometheus | head -1`) is not an error: the CLI
//! stops and exits 0 without a word, as ripgrep does. Rust ignores SIGPIPE, so
//! without this every write after `head` exits would fail with EPIPE (and
//! `println!` would panic).

use std::io::{ErrorKind, Write};

use rmpv::Value;

/// Writes `text` and a newline to stdout; exits 0 at once if stdout is closed.
pub fn line(text: &str) {
    let mut out = std::io::stdout().lock();
    let written = out
        .write_all(text.as_bytes())
        .and_then(|()| out.write_all(b"\n"))
        .and_then(|()| out.flush());
    if let Err(e) = written {
        if e.kind() == ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        // Nothing sensible to print it to; stderr may be gone too.
        let _ = writeln!(std::io::stderr(), "satchel: cannot write the output: {e}");
        std::process::exit(1);
    }
}

/// Writes a message to stderr; a closed stderr is ignored.
pub fn error(text: &str) {
    let _ = writeln!(std::io::stderr().lock(), "satchel: {text}");
}

/// Prints a result: JSON on one line with `json`, else as text (strings as they
/// are, maps as `key: value` lines, lists of maps separated by blank lines).
pub fn value(v: &Value, json: bool) {
    if json {
        return line(&to_json(v).to_string());
    }
    let mut text = String::new();
    match v {
        Value::String(s) => text.push_str(s.as_str().unwrap_or("")),
        Value::Map(_) => write_map(&mut text, v, 0),
        Value::Array(items) if items.iter().all(Value::is_map) => {
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    text.push('\n');
                }
                write_map(&mut text, item, 0);
            }
        }
        other => text.push_str(&to_json(other).to_string()),
    }
    line(text.trim_end_matches('\n'));
}

fn write_map(out: &mut String, v: &Value, indent: usize) {
    let Some(entries) = v.as_map() else { return };
    for (k, val) in entries {
        let key = key_text(k);
        if val.is_map() {
            out.push_str(&format!("{:indent$}{key}:\n", ""));
            write_map(out, val, indent + 2);
        } else {
            out.push_str(&format!("{:indent$}{key}: {}\n", "", to_json(val)));
        }
    }
}

fn key_text(k: &Value) -> String {
    match k.as_str() {
        Some(s) => s.to_owned(),
        None => to_json(k).to_string(),
    }
}

/// MessagePack → JSON: bin as an array of bytes, ext as `{"ext": type, "len": n}`,
/// non-string map keys as their JSON text, non-finite floats as null.
pub fn to_json(v: &Value) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        Value::Nil => J::Null,
        Value::Boolean(b) => J::Bool(*b),
        Value::Integer(i) => i
            .as_u64()
            .map(J::from)
            .or_else(|| i.as_i64().map(J::from))
            .unwrap_or(J::Null),
        Value::F32(f) => serde_json::Number::from_f64(*f as f64).map_or(J::Null, J::Number),
        Value::F64(f) => serde_json::Number::from_f64(*f).map_or(J::Null, J::Number),
        Value::String(s) => J::String(s.as_str().unwrap_or("").to_owned()),
        Value::Binary(b) => J::Array(b.iter().map(|&x| J::from(x)).collect()),
        Value::Array(a) => J::Array(a.iter().map(to_json).collect()),
        Value::Map(m) => J::Object(m.iter().map(|(k, v)| (key_text(k), to_json(v))).collect()),
        Value::Ext(t, d) => serde_json::json!({"ext": t, "len": d.len()}),
    }
}

/// JSON → MessagePack (for `cache set --json-value`).
pub fn from_json(v: &serde_json::Value) -> Value {
    match v {
        serde_json::Value::Null => Value::Nil,
        serde_json::Value::Bool(b) => Value::Boolean(*b),
        serde_json::Value::Number(n) => n
            .as_u64()
            .map(Value::from)
            .or_else(|| n.as_i64().map(Value::from))
            .unwrap_or_else(|| Value::F64(n.as_f64().unwrap_or(0.0))),
        serde_json::Value::String(s) => Value::from(s.as_str()),
        serde_json::Value::Array(a) => Value::Array(a.iter().map(from_json).collect()),
        serde_json::Value::Object(o) => Value::Map(
            o.iter()
                .map(|(k, v)| (Value::from(k.as_str()), from_json(v)))
                .collect(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trips_and_renders_what_json_lacks() {
        let j = serde_json::json!({"a": [1, -2, 2.5, "x", null, true], "b": {"c": "d"}});
        assert_eq!(to_json(&from_json(&j)), j);
        let odd = Value::Map(vec![
            (Value::from(1), Value::Binary(vec![1, 2])),
            (Value::from("e"), Value::Ext(5, vec![0; 3])),
            (Value::from("n"), Value::F64(f64::NAN)),
        ]);
        assert_eq!(
            to_json(&odd).to_string(),
            r#"{"1":[1,2],"e":{"ext":5,"len":3},"n":null}"#
        );
    }
}
