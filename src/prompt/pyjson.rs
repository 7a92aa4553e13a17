//! Python's `json.dumps` and `repr` for template values: chat templates run on
//! Python objects in transformers, and their output leaks Python formatting.

use std::fmt;
use std::sync::Arc;

use minijinja::value::{Object, ObjectRepr, Value, ValueKind};

/// Python's `None` where transformers passes it as a variable (`tools`,
/// `documents` when absent): defined, falsy, prints `None`, is `none`, and —
/// unlike minijinja's none — is not iterable (`for t in tools` fails).
#[derive(Debug)]
struct PyNone;

impl Object for PyNone {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Plain
    }

    fn is_true(self: &Arc<Self>) -> bool {
        false
    }

    fn render(self: &Arc<Self>, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("None")
    }
}

pub fn py_none() -> Value {
    Value::from_object(PyNone)
}

pub fn is_py_none(v: &Value) -> bool {
    v.downcast_object_ref::<PyNone>().is_some()
}

/// `json.dumps` options exposed to templates through `tojson(...)`.
#[derive(Debug, Clone)]
pub struct DumpOptions {
    pub indent: Option<String>,
    pub item_separator: String,
    pub key_separator: String,
    pub sort_keys: bool,
    pub ensure_ascii: bool,
}

impl Default for DumpOptions {
    fn default() -> Self {
        Self {
            indent: None,
            item_separator: ", ".into(),
            key_separator: ": ".into(),
            sort_keys: false,
            ensure_ascii: false,
        }
    }
}

/// Errors carry Python's message (`Object of type Undefined is not JSON serializable`).
pub fn dumps(value: &Value, opts: &DumpOptions) -> Result<String, String> {
    let mut out = String::new();
    write_json(value, opts, 0, &mut out)?;
    Ok(out)
}

fn write_json(value: &Value, opts: &DumpOptions, depth: usize, out: &mut String) -> Result<(), String> {
    match value.kind() {
        ValueKind::Undefined => return Err("Object of type Undefined is not JSON serializable".into()),
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => out.push_str(&number_repr(value)),
        ValueKind::String => write_json_string(value.as_str().unwrap_or_default(), opts.ensure_ascii, out),
        ValueKind::Iterable => return Err("Object of type generator is not JSON serializable".into()),
        ValueKind::Plain if is_py_none(value) => out.push_str("null"),
        ValueKind::Seq => {
            let items: Vec<Value> = value.try_iter().map_err(|e| e.to_string())?.collect();
            write_container(out, opts, depth, '[', ']', items.len(), |i, out| {
                write_json(&items[i], opts, depth + 1, out)
            })?;
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = value.try_iter().map_err(|e| e.to_string())?.collect();
            if opts.sort_keys {
                keys.sort();
            }
            write_container(out, opts, depth, '{', '}', keys.len(), |i, out| {
                let key = &keys[i];
                let key_text = match key.kind() {
                    ValueKind::String => key.as_str().unwrap_or_default().to_string(),
                    ValueKind::None => "null".into(),
                    ValueKind::Bool | ValueKind::Number => {
                        let mut s = String::new();
                        write_json(key, opts, depth, &mut s)?;
                        s
                    }
                    _ => return Err(format!("keys must be str, int, float, bool or None, not {}", py_type(key))),
                };
                write_json_string(&key_text, opts.ensure_ascii, out);
                out.push_str(&opts.key_separator);
                let item = value.get_item(key).map_err(|e| e.to_string())?;
                write_json(&item, opts, depth + 1, out)
            })?;
        }
        _ => return Err(format!("Object of type {} is not JSON serializable", py_type(value))),
    }
    Ok(())
}

fn write_container(
    out: &mut String,
    opts: &DumpOptions,
    depth: usize,
    open: char,
    close: char,
    len: usize,
    mut item: impl FnMut(usize, &mut String) -> Result<(), String>,
) -> Result<(), String> {
    out.push(open);
    if len == 0 {
        out.push(close);
        return Ok(());
    }
    for i in 0..len {
        if i > 0 {
            out.push_str(&opts.item_separator);
        }
        if let Some(indent) = &opts.indent {
            out.push('\n');
            out.push_str(&indent.repeat(depth + 1));
        }
        item(i, out)?;
    }
    if let Some(indent) = &opts.indent {
        out.push('\n');
        out.push_str(&indent.repeat(depth));
    }
    out.push(close);
    Ok(())
}

fn write_json_string(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && (c as u32) > 0x7e) => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's repr of a number: ints as digits, floats shortest round-trip with
/// Python's exponent rules (`1e-05`, `1e+16`, `21.5`, `3.0`).
pub fn number_repr(value: &Value) -> String {
    if value.is_integer() {
        return value.to_string();
    }
    match f64::try_from(value.clone()) {
        Ok(f) => float_repr(f),
        Err(_) => value.to_string(),
    }
}

pub fn float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    if f == 0.0 {
        return if f.is_sign_negative() { "-0.0".into() } else { "0.0".into() };
    }
    // Rust's `{:e}` gives the shortest round-trip digits, like Python's repr.
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exp) {
        let point = exp + 1; // digits before the decimal point
        let body = if point <= 0 {
            format!("0.{}{}", "0".repeat((-point) as usize), digits)
        } else if point as usize >= digits.len() {
            format!("{}{}.0", digits, "0".repeat(point as usize - digits.len()))
        } else {
            format!("{}.{}", &digits[..point as usize], &digits[point as usize..])
        };
        format!("{sign}{body}")
    } else {
        let frac = &digits[1..];
        let mantissa = if frac.is_empty() { digits[..1].to_string() } else { format!("{}.{}", &digits[..1], frac) };
        format!("{sign}{mantissa}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs())
    }
}

/// Python's `repr()` of a template value, which is what `{{ value }}` prints
/// for containers: `['a', 1, True, None, {'k': 'v'}]`.
pub fn repr(value: &Value) -> String {
    let mut out = String::new();
    write_repr(value, &mut out);
    out
}

fn write_repr(value: &Value, out: &mut String) {
    if is_py_none(value) {
        out.push_str("None");
        return;
    }
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("None"),
        ValueKind::Bool => out.push_str(if value.is_true() { "True" } else { "False" }),
        ValueKind::Number => out.push_str(&number_repr(value)),
        ValueKind::String => write_str_repr(value.as_str().unwrap_or_default(), out),
        ValueKind::Seq | ValueKind::Iterable => {
            out.push('[');
            if let Ok(items) = value.try_iter() {
                for (i, item) in items.enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    write_repr(&item, out);
                }
            }
            out.push(']');
        }
        ValueKind::Map => {
            out.push('{');
            if let Ok(keys) = value.try_iter() {
                for (i, key) in keys.enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    write_repr(&key, out);
                    out.push_str(": ");
                    write_repr(&value.get_item(&key).unwrap_or_default(), out);
                }
            }
            out.push('}');
        }
        _ => out.push_str(&value.to_string()),
    }
}

/// Python's string repr: single quotes unless the text has a `'` and no `"`.
fn write_str_repr(s: &str, out: &mut String) {
    let quote = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push(quote);
}

fn py_type(value: &Value) -> &'static str {
    match value.kind() {
        ValueKind::Undefined => "Undefined",
        ValueKind::None => "NoneType",
        ValueKind::Bool => "bool",
        ValueKind::Number if value.is_integer() => "int",
        ValueKind::Number => "float",
        ValueKind::String => "str",
        ValueKind::Seq => "list",
        ValueKind::Map => "dict",
        _ => "object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prompt::FromSerde;

    #[test]
    fn floats_print_like_python() {
        for (f, want) in [
            (21.5, "21.5"),
            (0.5, "0.5"),
            (1e-05, "1e-05"),
            (1e16, "1e+16"),
            (123456789012345.0, "123456789012345.0"),
            (3.0, "3.0"),
            (0.0001, "0.0001"),
            (-2.5e-7, "-2.5e-07"),
            (0.1 + 0.2, "0.30000000000000004"),
        ] {
            assert_eq!(float_repr(f), want, "{f}");
        }
    }

    #[test]
    fn dumps_matches_python_defaults() -> Result<(), String> {
        let v = Value::from_serde(serde_json::json!({"b": [1, 2.5, "é<>"], "a": null, "t": true, "e": {}}));
        assert_eq!(dumps(&v, &DumpOptions::default())?, r#"{"b": [1, 2.5, "é<>"], "a": null, "t": true, "e": {}}"#);
        let opts = DumpOptions {
            indent: Some("  ".into()),
            item_separator: ",".into(),
            sort_keys: true,
            ensure_ascii: true,
            ..DumpOptions::default()
        };
        assert_eq!(
            dumps(&v, &opts)?,
            "{\n  \"a\": null,\n  \"b\": [\n    1,\n    2.5,\n    \"\\u00e9<>\"\n  ],\n  \"e\": {},\n  \"t\": true\n}"
        );
        Ok(())
    }

    #[test]
    fn repr_matches_python() {
        let v = Value::from_serde(serde_json::json!([{"type": "text", "text": "it's"}, true, null, 1.0]));
        assert_eq!(repr(&v), r#"[{'type': 'text', 'text': "it's"}, True, None, 1.0]"#);
    }
}
