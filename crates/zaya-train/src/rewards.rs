//! Reward functions: the built-ins (`exact`, `regex`, `tool_call`, `json_schema`, `format`)
//! and `--reward-cmd`, an external process answering one number (or `null`) per completion.
//!
//! A reward returns `None` when it does not apply to a completion (TRL's `None`); a
//! completion no reward applies to gets advantage 0.

use std::time::Duration;

use serde_json::{json, Map, Value};
use zaya::text::tool_calls::{parse_output, ToolCall};

use crate::error::{GrpoError, Result};
use crate::process::JsonLinesProcess;

/// One completion with what a reward may look at.
#[derive(Debug, Clone)]
pub struct Scored<'a> {
    /// The prompt as text (rendered chat template for `messages` rows).
    pub prompt: &'a str,
    /// The completion text (every assistant turn, tool results left out).
    pub completion: &'a str,
    /// Tool calls parsed from the completion.
    pub tool_calls: &'a [ToolCall],
    /// The data row's other columns (`answer`, `expected_tool_calls`, `tools`, ...).
    pub columns: &'a Map<String, Value>,
}

pub trait Reward: Send {
    fn name(&self) -> &str;
    fn score(&mut self, items: &[Scored<'_>]) -> Result<Vec<Option<f64>>>;
}

/// `NAME[:WEIGHT]` of `--reward`.
pub fn parse_reward_spec(spec: &str) -> Result<(String, f64)> {
    let (name, weight) = match spec.rsplit_once(':') {
        Some((n, w)) => {
            let w: f64 = w.parse().map_err(|_| {
                GrpoError::Input(format!("--reward {spec}: weight `{w}` is not a number"))
            })?;
            (n.to_string(), w)
        }
        None => (spec.to_string(), 1.0),
    };
    if !weight.is_finite() {
        return Err(GrpoError::Input(format!(
            "--reward {spec}: weight must be finite"
        )));
    }
    Ok((name, weight))
}

/// A built-in reward by name; `regex` takes its pattern from `pattern` (the `--regex` flag)
/// or, per row, from the `regex` column.
pub fn builtin(name: &str, pattern: Option<&str>) -> Result<Box<dyn Reward>> {
    Ok(match name {
        "exact" => Box::new(Exact),
        "regex" => Box::new(RegexReward::new(pattern)?),
        "tool_call" => Box::new(ToolCallReward),
        "json_schema" => Box::new(JsonSchemaReward),
        "format" => Box::new(FormatReward),
        other => {
            return Err(GrpoError::Input(format!(
                "unknown reward `{other}` (built-ins: exact, regex, tool_call, json_schema, format; or --reward-cmd)"
            )))
        }
    })
}

/// The final answer of a completion: the content of the last `\boxed{...}`, else what
/// follows the last `answer:` (case-insensitive), else the last non-empty line of the
/// content (thinking and tool calls left out); trimmed.
pub fn extract_answer(completion: &str) -> String {
    let content = parse_output(completion).content;
    if let Some(i) = content.rfind("\\boxed{") {
        let rest = &content[i + 7..];
        let mut depth = 1;
        for (j, ch) in rest.char_indices() {
            match ch {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        return rest[..j].trim().to_string();
                    }
                }
                _ => {}
            }
        }
    }
    let lower = content.to_lowercase();
    if let Some(i) = lower.rfind("answer:") {
        // `to_lowercase` can change byte lengths; only use the index when it is safe
        if lower.len() == content.len() {
            return content[i + 7..].trim().to_string();
        }
    }
    content
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_string()
}

fn column_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.trim().to_string(),
        other => other.to_string(),
    }
}

/// 1 when the extracted answer equals the `answer` column (trimmed text; numbers compared
/// as numbers), else 0; `None` for rows without `answer`.
pub struct Exact;

impl Reward for Exact {
    fn name(&self) -> &str {
        "exact"
    }
    fn score(&mut self, items: &[Scored<'_>]) -> Result<Vec<Option<f64>>> {
        Ok(items
            .iter()
            .map(|it| {
                let want = it.columns.get("answer")?;
                let got = extract_answer(it.completion);
                let want = column_text(want);
                let same = got == want
                    || matches!((got.parse::<f64>(), want.parse::<f64>()), (Ok(a), Ok(b)) if a == b);
                Some(if same { 1.0 } else { 0.0 })
            })
            .collect())
    }
}

/// 1 when the completion matches the pattern (`--regex`, or the row's `regex` column), else 0.
pub struct RegexReward {
    fixed: Option<regex::Regex>,
}

impl RegexReward {
    pub fn new(pattern: Option<&str>) -> Result<Self> {
        let fixed = pattern
            .map(|p| {
                regex::Regex::new(p).map_err(|e| GrpoError::Input(format!("--regex `{p}`: {e}")))
            })
            .transpose()?;
        Ok(RegexReward { fixed })
    }
}

impl Reward for RegexReward {
    fn name(&self) -> &str {
        "regex"
    }
    fn score(&mut self, items: &[Scored<'_>]) -> Result<Vec<Option<f64>>> {
        items
            .iter()
            .map(|it| {
                let re = match (&self.fixed, it.columns.get("regex")) {
                    (Some(r), _) => r.clone(),
                    (None, Some(Value::String(p))) => {
                        regex::Regex::new(p).map_err(|e| GrpoError::Reward {
                            name: "regex".into(),
                            message: format!("column regex `{p}`: {e}"),
                        })?
                    }
                    (None, _) => return Ok(None),
                };
                Ok(Some(if re.is_match(it.completion) { 1.0 } else { 0.0 }))
            })
            .collect()
    }
}

/// Whether `value` is valid against a JSON schema (the subset tools use: `type`,
/// `properties`, `required`, `enum`, `items`, `additionalProperties: false`).
pub fn schema_valid(schema: &Value, value: &Value) -> bool {
    let Some(s) = schema.as_object() else {
        return true;
    };
    if let Some(e) = s.get("enum").and_then(Value::as_array) {
        if !e.contains(value) {
            return false;
        }
    }
    let type_ok = |t: &str| match t {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "integer" => value.as_f64().is_some_and(|x| x.fract() == 0.0),
        "number" => value.is_number(),
        "boolean" => value.is_boolean(),
        "null" => value.is_null(),
        _ => true,
    };
    match s.get("type") {
        Some(Value::String(t)) if !type_ok(t) => return false,
        Some(Value::Array(ts)) if !ts.iter().filter_map(Value::as_str).any(type_ok) => {
            return false
        }
        _ => {}
    }
    if let Some(obj) = value.as_object() {
        if let Some(req) = s.get("required").and_then(Value::as_array) {
            if req
                .iter()
                .filter_map(Value::as_str)
                .any(|k| !obj.contains_key(k))
            {
                return false;
            }
        }
        let props = s.get("properties").and_then(Value::as_object);
        for (k, v) in obj {
            match props.and_then(|p| p.get(k)) {
                Some(ps) if !schema_valid(ps, v) => return false,
                None if s.get("additionalProperties") == Some(&Value::Bool(false)) => return false,
                _ => {}
            }
        }
    }
    if let (Some(items), Some(arr)) = (s.get("items"), value.as_array()) {
        if !arr.iter().all(|v| schema_valid(items, v)) {
            return false;
        }
    }
    true
}

/// A tool call's arguments as the schema expects them: the parser returns text for
/// parameters it has no schema for, so numbers and booleans written as text are read back.
fn typed_arguments(args: &Map<String, Value>) -> Value {
    Value::Object(
        args.iter()
            .map(|(k, v)| {
                let v = match v {
                    Value::String(s) => serde_json::from_str::<Value>(s)
                        .ok()
                        .filter(|x| !x.is_string())
                        .unwrap_or_else(|| v.clone()),
                    _ => v.clone(),
                };
                (k.clone(), v)
            })
            .collect(),
    )
}

fn tool_schema<'a>(tools: Option<&'a Value>, name: &str) -> Option<&'a Value> {
    tools?.as_array()?.iter().find_map(|t| {
        let f = t.get("function").unwrap_or(t);
        (f.get("name")?.as_str()? == name).then(|| f.get("parameters"))?
    })
}

/// Tool calls against the row's `expected_tool_calls` (`[{"name", "arguments"}]`), in
/// order. Partial credit per expected call: 0.5 for the right name, plus 0.5 when the
/// arguments equal the expected ones, or 0.25 when they differ but are valid against the
/// tool's schema (from the row's `tools`). The sum is divided by the larger of the expected
/// and produced call counts (extra calls cost). `None` for rows without `expected_tool_calls`.
pub struct ToolCallReward;

pub fn tool_call_score(calls: &[ToolCall], expected: &[Value], tools: Option<&Value>) -> f64 {
    if expected.is_empty() {
        return if calls.is_empty() { 1.0 } else { 0.0 };
    }
    let mut total = 0.0;
    for (want, got) in expected.iter().zip(calls) {
        let name = want.get("name").and_then(Value::as_str).unwrap_or("");
        if got.name != name {
            continue;
        }
        total += 0.5;
        let want_args = want.get("arguments").cloned().unwrap_or_else(|| json!({}));
        let want_args = match want_args {
            Value::String(s) => serde_json::from_str(&s).unwrap_or(Value::String(s)),
            v => v,
        };
        let got_args = typed_arguments(&got.arguments);
        let want_typed = match &want_args {
            Value::Object(m) => typed_arguments(m),
            v => v.clone(),
        };
        if got_args == want_typed {
            total += 0.5;
        } else if tool_schema(tools, name).is_some_and(|s| schema_valid(s, &got_args)) {
            total += 0.25;
        }
    }
    total / expected.len().max(calls.len()) as f64
}

impl Reward for ToolCallReward {
    fn name(&self) -> &str {
        "tool_call"
    }
    fn score(&mut self, items: &[Scored<'_>]) -> Result<Vec<Option<f64>>> {
        items
            .iter()
            .map(|it| {
                let Some(exp) = it.columns.get("expected_tool_calls") else {
                    return Ok(None);
                };
                let exp = exp.as_array().ok_or_else(|| GrpoError::Reward {
                    name: "tool_call".into(),
                    message: "column expected_tool_calls must be a list".into(),
                })?;
                Ok(Some(tool_call_score(
                    it.tool_calls,
                    exp,
                    it.columns.get("tools"),
                )))
            })
            .collect()
    }
}

/// The completion's content parsed as JSON against the row's `schema` column: 1 valid,
/// 0.5 JSON but not valid, 0 not JSON. `None` for rows without `schema`.
pub struct JsonSchemaReward;

impl Reward for JsonSchemaReward {
    fn name(&self) -> &str {
        "json_schema"
    }
    fn score(&mut self, items: &[Scored<'_>]) -> Result<Vec<Option<f64>>> {
        Ok(items
            .iter()
            .map(|it| {
                let schema = it.columns.get("schema")?;
                let content = parse_output(it.completion).content;
                let text = content
                    .trim()
                    .trim_start_matches("```json")
                    .trim_start_matches("```")
                    .trim_end_matches("```")
                    .trim();
                Some(match serde_json::from_str::<Value>(text) {
                    Ok(v) if schema_valid(schema, &v) => 1.0,
                    Ok(_) => 0.5,
                    Err(_) => 0.0,
                })
            })
            .collect())
    }
}

/// 1 when the thinking and tool-call markup is well formed (the parser has nothing to
/// warn about), else 0.
pub struct FormatReward;

impl Reward for FormatReward {
    fn name(&self) -> &str {
        "format"
    }
    fn score(&mut self, items: &[Scored<'_>]) -> Result<Vec<Option<f64>>> {
        Ok(items
            .iter()
            .map(|it| {
                let p = parse_output(it.completion);
                Some(if p.warnings.is_empty() { 1.0 } else { 0.0 })
            })
            .collect())
    }
}

/// `--reward-cmd`: one JSON line per completion in
/// (`{"prompt", "completion", "tool_calls": [{"name", "arguments"}], "columns": {...}}`), one
/// line out: a number or `null`.
pub struct ProcessReward {
    name: String,
    process: JsonLinesProcess,
}

impl ProcessReward {
    pub fn start(command: &str, timeout: Duration) -> Result<Self> {
        Ok(ProcessReward {
            name: "reward_cmd".into(),
            process: JsonLinesProcess::start("reward", command, timeout)?,
        })
    }
}

/// Reads a reward process's answer: a finite number or `null`.
pub fn parse_reward_answer(v: &Value) -> std::result::Result<Option<f64>, String> {
    match v {
        Value::Null => Ok(None),
        Value::Number(n) => match n.as_f64() {
            Some(x) if x.is_finite() => Ok(Some(x)),
            _ => Err(format!("{n} is not a finite number")),
        },
        other => {
            let shown: String = other.to_string().chars().take(200).collect();
            Err(format!("expected a number or null, got `{shown}`"))
        }
    }
}

impl Reward for ProcessReward {
    fn name(&self) -> &str {
        &self.name
    }
    fn score(&mut self, items: &[Scored<'_>]) -> Result<Vec<Option<f64>>> {
        items
            .iter()
            .enumerate()
            .map(|(i, it)| {
                let req = json!({
                    "prompt": it.prompt,
                    "completion": it.completion,
                    "tool_calls": it.tool_calls,
                    "columns": it.columns,
                });
                let v = self.process.request(&req)?;
                parse_reward_answer(&v).map_err(|m| GrpoError::Reward {
                    name: self.name.clone(),
                    message: format!("completion {i}: {m}"),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_extracted() {
        assert_eq!(extract_answer("so \\boxed{4{2}} done"), "4{2}");
        assert_eq!(extract_answer("think\nAnswer: 42 "), "42");
        assert_eq!(extract_answer("a\nb\n\n"), "b");
    }

    #[test]
    fn tool_call_partial_credit() {
        let call = |n: &str, a: Value| ToolCall {
            name: n.into(),
            arguments: a.as_object().unwrap().clone(),
        };
        let exp = vec![json!({"name": "get_weather", "arguments": {"city": "Paris"}})];
        let tools = json!([{"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]);
        let s = |calls: &[ToolCall]| tool_call_score(calls, &exp, Some(&tools));
        assert_eq!(s(&[call("get_weather", json!({"city": "Paris"}))]), 1.0);
        assert_eq!(s(&[call("get_weather", json!({"city": "Rome"}))]), 0.75);
        assert_eq!(s(&[call("get_weather", json!({"town": "Rome"}))]), 0.5);
        assert_eq!(s(&[call("other", json!({}))]), 0.0);
        assert_eq!(s(&[]), 0.0);
        // an extra call halves the credit
        assert_eq!(
            s(&[
                call("get_weather", json!({"city": "Paris"})),
                call("x", json!({}))
            ]),
            0.5
        );
    }

    #[test]
    fn reward_specs_and_answers() {
        assert_eq!(parse_reward_spec("exact").unwrap(), ("exact".into(), 1.0));
        assert_eq!(
            parse_reward_spec("format:0.5").unwrap(),
            ("format".into(), 0.5)
        );
        assert!(parse_reward_spec("format:x").is_err());
        assert_eq!(parse_reward_answer(&json!(0.5)).unwrap(), Some(0.5));
        assert_eq!(parse_reward_answer(&Value::Null).unwrap(), None);
        assert!(parse_reward_answer(&json!("1")).is_err());
        assert!(builtin("nope", None).is_err());
    }

    #[test]
    fn schemas_validate() {
        let s =
            json!({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]});
        assert!(schema_valid(&s, &json!({"n": 3})));
        assert!(!schema_valid(&s, &json!({"n": 3.5})));
        assert!(!schema_valid(&s, &json!({})));
    }
}
