//! JSON output exactly as qemu-img prints it (`--output=json`).
//!
//! qemu-img builds its output as a QDict and prints it with QEMU's own
//! pretty printer, so besides the layout (four-space indent, empty
//! containers split over two lines, non-ASCII escaped as `\uXXXX`) the key
//! order is the QDict's iteration order: the order of its hash buckets, and
//! within a bucket the most recently inserted key first. Objects here are
//! built in QAPI schema order (serde_json keeps insertion order) and printed
//! in that bucket order, so the text matches qemu-img's line for line.

use serde_json::{Map, Value};

/// Number of hash buckets of a QDict (`QDICT_BUCKET_MAX`).
const QDICT_BUCKETS: u32 = 512;

/// The bucket a key falls in: QEMU's `tdb_hash` modulo the bucket count.
fn bucket(key: &str) -> u32 {
    let bytes = key.as_bytes();
    let mut value = 0x238F_13AFu32.wrapping_mul(bytes.len() as u32);
    for (i, &b) in bytes.iter().enumerate() {
        value = value.wrapping_add(u32::from(b) << ((i * 5) % 24));
    }
    1_103_515_243u32.wrapping_mul(value).wrapping_add(12345) % QDICT_BUCKETS
}

/// Renders `v` as qemu-img does (without the final newline).
pub fn to_string(v: &Value) -> String {
    let mut out = String::new();
    write_value(&mut out, v, 0);
    out
}

fn indent(out: &mut String, level: usize) {
    for _ in 0..level {
        out.push_str("    ");
    }
}

fn write_value(out: &mut String, v: &Value, level: usize) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => write_string(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push('\n');
                indent(out, level + 1);
                write_value(out, item, level + 1);
            }
            out.push('\n');
            indent(out, level);
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (n, (k, v)) in qdict_order(map).into_iter().enumerate() {
                if n > 0 {
                    out.push(',');
                }
                out.push('\n');
                indent(out, level + 1);
                write_string(out, k);
                out.push_str(": ");
                write_value(out, v, level + 1);
            }
            out.push('\n');
            indent(out, level);
            out.push('}');
        }
    }
}

/// The entries of `map` in the order a QDict built by inserting them in
/// `map`'s order iterates them: by hash bucket, newest first within one.
pub fn qdict_order(map: &Map<String, Value>) -> Vec<(&String, &Value)> {
    let mut entries: Vec<(usize, &String, &Value)> = map.iter().enumerate().map(|(i, (k, v))| (i, k, v)).collect();
    entries.sort_by_key(|&(i, k, _)| (bucket(k), std::cmp::Reverse(i)));
    entries.into_iter().map(|(_, k, v)| (k, v)).collect()
}

fn write_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) > 0xFFFF => {
                let v = c as u32 - 0x10000;
                out.push_str(&format!("\\u{:04X}\\u{:04X}", 0xD800 + (v >> 10), 0xDC00 + (v & 0x3FF)));
            }
            c if (c as u32) < 0x20 || (c as u32) >= 0x7F => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A JSON object on one line as QEMU's `qobject_to_json` writes a QDict
/// (the `json:{...}` names it gives nodes): members (their values written
/// already) in the order of their hash buckets, `": "` and `", "` between
/// them.
pub fn qdict_compact(mut members: Vec<(&str, String)>) -> String {
    members.sort_by_key(|(k, _)| bucket(k));
    let body: Vec<String> = members.iter().map(|(k, v)| format!("{}: {v}", serde_json::json!(k))).collect();
    format!("{{{}}}", body.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn check_keys_in_qemu_order() {
        // The order qemu-img check --output=json prints these keys in.
        let v = json!({"filename": "a", "format": "qcow2", "check-errors": 0, "image-end-offset": 1,
                       "total-clusters": 2, "allocated-clusters": 3});
        let keys: Vec<String> = to_string(&v)
            .lines()
            .filter_map(|l| l.trim().strip_prefix('"').and_then(|l| l.split('"').next()).map(String::from))
            .collect();
        assert_eq!(
            keys,
            ["image-end-offset", "total-clusters", "check-errors", "allocated-clusters", "filename", "format"]
        );
    }

    #[test]
    fn layout_and_escapes() {
        let v = json!({"children": [], "data": {}, "s": "a\"\u{e9}\u{1F600}\n"});
        let s = to_string(&v);
        assert!(s.contains("\"children\": [\n    ]"));
        assert!(s.contains("\"data\": {\n    }"));
        assert!(s.contains(r#""a\"\u00E9\uD83D\uDE00\n""#));
    }
}
