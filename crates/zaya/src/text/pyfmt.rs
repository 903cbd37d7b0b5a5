//! Python formatting of template values: `json.dumps` (what transformers' `tojson` filter
//! calls) and `str()` / `repr()` (what Jinja2 prints for `{{ value }}`).
//!
//! Numbers keep the integer / float distinction of the input JSON: `3` prints `3`, `3.0`
//! prints `3.0`, and floats use Python's `repr` (shortest round-trip digits, exponent form
//! below 1e-4 and from 1e16: `1e-05`, `1e+16`).

use std::fmt::Write as _;

use minijinja::value::{Value, ValueKind};

/// Options of Python's `json.dumps`, as transformers' `tojson` filter forwards them.
#[derive(Debug, Clone, Default)]
pub struct JsonDumpsOptions {
    /// Escape every non-ASCII character as `\uXXXX` (transformers' default: false).
    pub ensure_ascii: bool,
    /// Pretty-print with this indent string (Python: an int n means n spaces).
    pub indent: Option<String>,
    /// `(item_separator, key_separator)`; `None` means Python's default: `(", ", ": ")`
    /// without indent, `(",", ": ")` with indent.
    pub separators: Option<(String, String)>,
    pub sort_keys: bool,
}

/// Why a value cannot be written as JSON (Python raises `TypeError` in the same cases).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotJson(pub String);

/// Python `json.dumps(value, ...)`.
pub fn json_dumps(value: &Value, opts: &JsonDumpsOptions) -> Result<String, NotJson> {
    let (item_sep, key_sep) = match &opts.separators {
        Some((i, k)) => (i.as_str(), k.as_str()),
        None if opts.indent.is_some() => (",", ": "),
        None => (", ", ": "),
    };
    let mut out = String::new();
    let w = JsonWriter {
        opts,
        item_sep,
        key_sep,
    };
    w.write(&mut out, value, 0)?;
    Ok(out)
}

struct JsonWriter<'a> {
    opts: &'a JsonDumpsOptions,
    item_sep: &'a str,
    key_sep: &'a str,
}

impl JsonWriter<'_> {
    fn newline(&self, out: &mut String, level: usize) {
        if let Some(indent) = &self.opts.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(indent);
            }
        }
    }

    fn write(&self, out: &mut String, v: &Value, level: usize) -> Result<(), NotJson> {
        match v.kind() {
            ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number => write_number(out, v, true),
            ValueKind::String => {
                json_string(out, v.as_str().unwrap_or_default(), self.opts.ensure_ascii)
            }
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = v.try_iter().map_err(|e| NotJson(e.to_string()))?.collect();
                if items.is_empty() {
                    out.push_str("[]");
                    return Ok(());
                }
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(self.item_sep);
                    }
                    self.newline(out, level + 1);
                    self.write(out, item, level + 1)?;
                }
                self.newline(out, level);
                out.push(']');
            }
            ValueKind::Map => {
                let mut pairs = map_pairs(v).map_err(NotJson)?;
                if pairs.is_empty() {
                    out.push_str("{}");
                    return Ok(());
                }
                let mut keyed = Vec::with_capacity(pairs.len());
                for (k, val) in pairs.drain(..) {
                    keyed.push((json_key(&k)?, val));
                }
                if self.opts.sort_keys {
                    keyed.sort_by(|a, b| a.0.cmp(&b.0));
                }
                out.push('{');
                for (i, (k, val)) in keyed.iter().enumerate() {
                    if i > 0 {
                        out.push_str(self.item_sep);
                    }
                    self.newline(out, level + 1);
                    json_string(out, k, self.opts.ensure_ascii);
                    out.push_str(self.key_sep);
                    self.write(out, val, level + 1)?;
                }
                self.newline(out, level);
                out.push('}');
            }
            ValueKind::Undefined => {
                return Err(NotJson(
                    "Object of type Undefined is not JSON serializable".into(),
                ))
            }
            other => {
                return Err(NotJson(format!(
                    "Object of type {other} is not JSON serializable"
                )))
            }
        }
        Ok(())
    }
}

/// Key of a JSON object as Python converts it (`str` kept, numbers / bools / None stringified).
fn json_key(k: &Value) -> Result<String, NotJson> {
    Ok(match k.kind() {
        ValueKind::String => k.as_str().unwrap_or_default().to_string(),
        ValueKind::None => "null".into(),
        ValueKind::Bool => (if k.is_true() { "true" } else { "false" }).into(),
        ValueKind::Number => {
            let mut s = String::new();
            write_number(&mut s, k, true);
            s
        }
        other => {
            return Err(NotJson(format!(
                "keys must be str, int, float, bool or None, not {other}"
            )))
        }
    })
}

fn map_pairs(v: &Value) -> Result<Vec<(Value, Value)>, String> {
    let keys = v.try_iter().map_err(|e| e.to_string())?;
    keys.map(|k| {
        let val = v.get_item(&k).map_err(|e| e.to_string())?;
        Ok((k, val))
    })
    .collect()
}

/// Python's `json` string escaping.
fn json_string(out: &mut String, s: &str, ensure_ascii: bool) {
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
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c if ensure_ascii && (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{:04x}", unit);
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Integers as decimal, floats as Python's `repr`; `json` selects JSON's spelling of the
/// non-finite floats (`Infinity`, `NaN`) over Python's (`inf`, `nan`).
fn write_number(out: &mut String, v: &Value, json: bool) {
    if v.is_integer() {
        let _ = write!(out, "{v}");
        return;
    }
    let x = f64::try_from(v.clone()).unwrap_or(f64::NAN);
    out.push_str(&py_float_repr(x, json));
}

/// Python `repr(float)` (`float_repr_style == 'short'`).
pub(crate) fn py_float_repr(x: f64, json: bool) -> String {
    if x.is_nan() {
        return if json { "NaN" } else { "nan" }.into();
    }
    if x.is_infinite() {
        let s = match (json, x > 0.0) {
            (true, true) => "Infinity",
            (true, false) => "-Infinity",
            (false, true) => "inf",
            (false, false) => "-inf",
        };
        return s.into();
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    // Shortest round-trip digits, as `d.ddddde±x`.
    let sci = format!("{:e}", x.abs());
    let (mantissa, exp) = sci.split_once('e').expect("LowerExp has an exponent");
    let exp: i32 = exp.parse().expect("LowerExp exponent is an integer");
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let ndigits = digits.len() as i32;
    // Value = 0.DIGITS * 10^decpt.
    let decpt = exp + 1;
    let mut s = String::new();
    if x < 0.0 {
        s.push('-');
    }
    if decpt <= -4 || decpt > 16 {
        s.push_str(&digits[..1]);
        if ndigits > 1 {
            s.push('.');
            s.push_str(&digits[1..]);
        }
        let e = decpt - 1;
        let _ = write!(s, "e{}{:02}", if e < 0 { '-' } else { '+' }, e.abs());
    } else if decpt <= 0 {
        s.push_str("0.");
        for _ in 0..(-decpt) {
            s.push('0');
        }
        s.push_str(&digits);
    } else if decpt >= ndigits {
        s.push_str(&digits);
        for _ in 0..(decpt - ndigits) {
            s.push('0');
        }
        s.push_str(".0");
    } else {
        s.push_str(&digits[..decpt as usize]);
        s.push('.');
        s.push_str(&digits[decpt as usize..]);
    }
    s
}

/// Python `str(value)`: strings as they are, everything else as `repr`.
pub fn py_str(v: &Value) -> String {
    let mut out = String::new();
    match v.kind() {
        ValueKind::String => out.push_str(v.as_str().unwrap_or_default()),
        ValueKind::Undefined => {}
        _ => py_repr(&mut out, v),
    }
    out
}

/// Python `repr(value)` for the JSON-like values templates see.
fn py_repr(out: &mut String, v: &Value) {
    match v.kind() {
        ValueKind::None => out.push_str("None"),
        ValueKind::Bool => out.push_str(if v.is_true() { "True" } else { "False" }),
        ValueKind::Number => write_number(out, v, false),
        ValueKind::String => py_str_repr(out, v.as_str().unwrap_or_default()),
        ValueKind::Seq => {
            out.push('[');
            if let Ok(items) = v.try_iter() {
                for (i, item) in items.enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    py_repr(out, &item);
                }
            }
            out.push(']');
        }
        ValueKind::Map => match map_pairs(v) {
            Ok(pairs) => {
                out.push('{');
                for (i, (k, val)) in pairs.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    py_repr(out, k);
                    out.push_str(": ");
                    py_repr(out, val);
                }
                out.push('}');
            }
            Err(_) => {
                let _ = write!(out, "{v}");
            }
        },
        // Undefined inside a container, iterators, namespaces, macros: no Python counterpart
        // in a chat template's data; fall back to MiniJinja's own spelling.
        _ => {
            let _ = write!(out, "{v}");
        }
    }
}

/// Python `repr(str)`: single quotes unless the text has `'` and no `"`; escapes `\\`, the quote,
/// `\n`, `\r`, `\t` and non-printable characters (`\xNN`, `\uNNNN`, `\UNNNNNNNN`).
fn py_str_repr(out: &mut String, s: &str) {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
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
            c if !py_printable(c) => {
                let n = c as u32;
                let _ = if n < 0x100 {
                    write!(out, "\\x{n:02x}")
                } else if n < 0x10000 {
                    write!(out, "\\u{n:04x}")
                } else {
                    write!(out, "\\U{n:08x}")
                };
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

/// Approximation of Python's `str.isprintable()` for one character: false for control
/// characters (Cc), format characters (Cf), separators other than the ASCII space (Zs, Zl,
/// Zp), private-use characters and noncharacters. Unassigned code points (Cn) count as
/// printable here, whereas Python escapes them.
fn py_printable(c: char) -> bool {
    let n = c as u32;
    !matches!(n,
        0x00..=0x1f | 0x7f..=0xa0 | 0xad
        | 0x600..=0x605 | 0x61c | 0x6dd | 0x70f | 0x890..=0x891 | 0x8e2 | 0x1680 | 0x180e
        | 0x2000..=0x200f | 0x2028..=0x202f | 0x205f..=0x2064 | 0x2066..=0x206f
        | 0x3000 | 0xd800..=0xf8ff | 0xfdd0..=0xfdef | 0xfeff | 0xfff9..=0xfffb
        | 0x110bd | 0x110cd | 0x13430..=0x1343f | 0x1bca0..=0x1bca3 | 0x1d173..=0x1d17a
        | 0xe0001 | 0xe0020..=0xe007f | 0xf0000..=0x10ffff)
        && (n & 0xfffe) != 0xfffe
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(json: &str) -> Value {
        let j: serde_json::Value = serde_json::from_str(json).unwrap();
        Value::from_serialize(&j)
    }

    #[test]
    fn float_repr_matches_python() {
        // Expected strings are Python 3.11 `repr(float)`.
        let cases: &[(f64, &str)] = &[
            (1.0, "1.0"),
            (0.5, "0.5"),
            (-2.25, "-2.25"),
            (1e-7, "1e-07"),
            (1e-5, "1e-05"),
            (0.0001, "0.0001"),
            (0.00012, "0.00012"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.5e20, "1.5e+20"),
            (123456789012345678.0, "1.2345678901234568e+17"),
            (1.23456, "1.23456"),
            (0.1 + 0.2, "0.30000000000000004"),
            (1e100, "1e+100"),
            (2.5e-300, "2.5e-300"),
            (-0.0, "-0.0"),
            (12.0, "12.0"),
            (1234.5, "1234.5"),
        ];
        for (x, want) in cases {
            assert_eq!(py_float_repr(*x, false), *want, "{x}");
        }
        assert_eq!(py_float_repr(f64::INFINITY, true), "Infinity");
        assert_eq!(py_float_repr(f64::NEG_INFINITY, false), "-inf");
        assert_eq!(py_float_repr(f64::NAN, true), "NaN");
    }

    #[test]
    fn dumps_default_indent_separators_sort() {
        let x = v(r#"{"b": [1, 2.0, true, null], "a": {"x": "é<&>'"}, "e": [], "f": {}}"#);
        let d = JsonDumpsOptions::default();
        assert_eq!(
            json_dumps(&x, &d).unwrap(),
            r#"{"b": [1, 2.0, true, null], "a": {"x": "é<&>'"}, "e": [], "f": {}}"#
        );
        let ind = JsonDumpsOptions {
            indent: Some("  ".into()),
            ..Default::default()
        };
        assert_eq!(
            json_dumps(&x, &ind).unwrap(),
            "{\n  \"b\": [\n    1,\n    2.0,\n    true,\n    null\n  ],\n  \"a\": {\n    \"x\": \"é<&>'\"\n  },\n  \"e\": [],\n  \"f\": {}\n}"
        );
        let compact_sorted = JsonDumpsOptions {
            separators: Some((",".into(), ":".into())),
            sort_keys: true,
            ensure_ascii: true,
            ..Default::default()
        };
        assert_eq!(
            json_dumps(&x, &compact_sorted).unwrap(),
            r#"{"a":{"x":"\u00e9<&>'"},"b":[1,2.0,true,null],"e":[],"f":{}}"#
        );
    }

    #[test]
    fn dumps_escapes_like_python() {
        let x = Value::from("q\"b\\n\n\r\t\u{8}\u{c}\u{1}\u{7f}🙏");
        assert_eq!(
            json_dumps(&x, &JsonDumpsOptions::default()).unwrap(),
            "\"q\\\"b\\\\n\\n\\r\\t\\b\\f\\u0001\u{7f}🙏\""
        );
        let ascii = JsonDumpsOptions {
            ensure_ascii: true,
            ..Default::default()
        };
        assert_eq!(
            json_dumps(&Value::from("\u{7f}🙏"), &ascii).unwrap(),
            "\"\\u007f\\ud83d\\ude4f\""
        );
        assert!(json_dumps(&Value::UNDEFINED, &ascii).is_err());
    }

    #[test]
    fn python_str_and_repr() {
        assert_eq!(py_str(&Value::from(true)), "True");
        assert_eq!(py_str(&Value::from(())), "None");
        assert_eq!(py_str(&Value::from("plain 'text'")), "plain 'text'");
        assert_eq!(py_str(&Value::UNDEFINED), "");
        assert_eq!(
            py_str(&v(
                r#"{"a": [1, 1.5, "x'y", "x\"y", "x'\"y", "\u00e9\u00a0\u200b\n"], "b": {}}"#
            )),
            r#"{'a': [1, 1.5, "x'y", 'x"y', 'x\'"y', 'é\xa0\u200b\n'], 'b': {}}"#
        );
        assert_eq!(
            py_str(&v(r#"["\udbff\udfff", "\u0663"]"#)),
            r"['\U0010ffff', '٣']"
        );
        assert_eq!(py_str(&v(r#"["\u0000"]"#)), r"['\x00']");
    }
}
