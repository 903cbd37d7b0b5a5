//! Parser of ZAYA1's generated text: thinking blocks and tool calls.
//!
//! ZAYA1 writes its reasoning as `<think>` … `</think>` (the chat template may already have
//! opened `<think>` in the prompt, so the opening tag can be missing) and tool calls as
//!
//! ```text
//! <zyphra_tool_call>
//! <function=get_weather>
//! <parameter=city>
//! Paris
//! </parameter>
//! <parameter=days>
//! 3
//! </parameter>
//! </function>
//! </zyphra_tool_call>
//! ```
//!
//! (`<zyphra_tool_call>` / `</zyphra_tool_call>` are special tokens 101 / 102, so decode with
//! `skip_special_tokens = false` before parsing; cut the stop token off first.) The body is the
//! Qwen3-Coder XML format: one `<parameter=KEY>` per argument, its value with one leading and
//! one trailing newline trimmed, read as JSON when it is valid JSON (numbers, booleans, null,
//! objects, arrays) and kept as a string otherwise, or always as a string when the tool's
//! schema (see [`OutputParser::with_tools`]) declares the parameter a string.
//!
//! Malformed markup never fails: it stays in `content` as text and a warning says what was
//! wrong (also logged with `tracing::warn!`).

use serde::Serialize;
use serde_json::{Map, Value as Json};

// ZAYA1's thinking and tool-call markup (the streaming parser of the server reads the same).
pub const THINK_OPEN: &str = "<think>";
pub const THINK_CLOSE: &str = "</think>";
pub const CALL_OPEN: &str = "<zyphra_tool_call>";
pub const CALL_CLOSE: &str = "</zyphra_tool_call>";
pub const FUNCTION_OPEN: &str = "<function=";
pub const FUNCTION_CLOSE: &str = "</function>";
pub const PARAM_OPEN: &str = "<parameter=";
pub const PARAM_CLOSE: &str = "</parameter>";

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ToolCall {
    pub name: String,
    /// Arguments in the order the model wrote them.
    pub arguments: Map<String, Json>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct ParsedOutput {
    /// Text outside thinking and tool-call blocks, trimmed (malformed blocks stay here).
    pub content: String,
    /// Text of the thinking block, trimmed; `None` when there is none.
    pub reasoning: Option<String>,
    pub tool_calls: Vec<ToolCall>,
    /// What was malformed, one line each.
    pub warnings: Vec<String>,
}

/// Parser options. `OutputParser::default()` parses any ZAYA1 output.
#[derive(Debug, Clone, Default)]
pub struct OutputParser {
    thinking_opened_in_prompt: bool,
    /// (function, parameter) whose schema type is `string`.
    string_params: Vec<(String, String)>,
}

/// Parse with the default options.
pub fn parse_output(text: &str) -> ParsedOutput {
    OutputParser::default().parse(text)
}

impl OutputParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// The prompt ended with `<think>` (thinking enabled by the template): text before
    /// `</think>` is reasoning, and output with no `</think>` at all is unfinished reasoning.
    pub fn thinking_opened_in_prompt(mut self, yes: bool) -> Self {
        self.thinking_opened_in_prompt = yes;
        self
    }

    /// Tool schemas of the request (OpenAI `{"type": "function", "function": {...}}` or bare
    /// function schemas): parameters declared `"type": "string"` keep their text verbatim
    /// instead of being read as JSON.
    pub fn with_tools(mut self, tools: &[Json]) -> Self {
        for tool in tools {
            let f = tool.get("function").unwrap_or(tool);
            let (Some(name), Some(props)) = (
                f.get("name").and_then(Json::as_str),
                f.pointer("/parameters/properties")
                    .and_then(Json::as_object),
            ) else {
                continue;
            };
            for (param, schema) in props {
                let is_string = match schema.get("type") {
                    Some(Json::String(t)) => t == "string",
                    Some(Json::Array(ts)) => {
                        !ts.is_empty() && ts.iter().all(|t| t == "string" || t == "null")
                    }
                    _ => false,
                };
                if is_string {
                    self.string_params.push((name.to_string(), param.clone()));
                }
            }
        }
        self
    }

    pub fn parse(&self, text: &str) -> ParsedOutput {
        let mut out = ParsedOutput::default();
        let rest = self.split_reasoning(text, &mut out);
        let mut content = String::new();
        let mut cur = rest.as_str();
        while let Some(start) = cur.find(CALL_OPEN) {
            content.push_str(&cur[..start]);
            let after = &cur[start + CALL_OPEN.len()..];
            let (body, raw_len, closed) = match after.find(CALL_CLOSE) {
                Some(end) => (
                    &after[..end],
                    CALL_OPEN.len() + end + CALL_CLOSE.len(),
                    true,
                ),
                None => (after, cur.len() - start, false),
            };
            let raw = &cur[start..start + raw_len];
            match self.parse_call_body(body) {
                Ok((calls, warnings)) => {
                    if !closed {
                        out.warnings
                            .push(format!("tool call without {CALL_CLOSE}; accepted because its function is complete"));
                    }
                    out.warnings.extend(warnings);
                    out.tool_calls.extend(calls);
                }
                Err(why) => {
                    out.warnings.push(format!(
                        "malformed tool call kept as text ({why}): {}",
                        excerpt(raw)
                    ));
                    content.push_str(raw);
                }
            }
            cur = &cur[start + raw_len..];
        }
        content.push_str(cur);
        for (tag, what) in [
            (CALL_CLOSE, "stray closing tag"),
            (
                FUNCTION_OPEN,
                "function markup outside <zyphra_tool_call>, left as text",
            ),
            (THINK_OPEN, "extra thinking tag left as text"),
            (THINK_CLOSE, "extra thinking tag left as text"),
        ] {
            if content.contains(tag) {
                out.warnings.push(format!("{what}: {tag}"));
            }
        }
        out.content = content.trim().to_string();
        for w in &out.warnings {
            tracing::warn!("zaya output parser: {w}");
        }
        out
    }

    /// Take the thinking block out of `text`; returns the remaining text.
    fn split_reasoning(&self, text: &str, out: &mut ParsedOutput) -> String {
        let open = text.find(THINK_OPEN);
        let close = text.find(THINK_CLOSE);
        match (open, close) {
            (Some(s), Some(e)) if s < e => {
                out.reasoning = Some(text[s + THINK_OPEN.len()..e].trim().to_string());
                format!("{}{}", &text[..s], &text[e + THINK_CLOSE.len()..])
            }
            // Opened by the template in the prompt.
            (_, Some(e)) => {
                out.reasoning = Some(text[..e].trim().to_string());
                text[e + THINK_CLOSE.len()..].to_string()
            }
            (Some(s), None) => {
                out.warnings.push(format!(
                    "unterminated {THINK_OPEN} block (generation stopped while thinking?); its text is the reasoning"
                ));
                out.reasoning = Some(text[s + THINK_OPEN.len()..].trim().to_string());
                text[..s].to_string()
            }
            (None, None) if self.thinking_opened_in_prompt => {
                out.warnings.push(format!(
                    "no {THINK_CLOSE} although the prompt opened thinking; all text is reasoning"
                ));
                out.reasoning = Some(text.trim().to_string());
                String::new()
            }
            (None, None) => text.to_string(),
        }
    }

    /// The inside of one `<zyphra_tool_call>` wrapper: one or more complete functions.
    fn parse_call_body(&self, body: &str) -> Result<(Vec<ToolCall>, Vec<String>), String> {
        let mut calls = Vec::new();
        let mut warnings = Vec::new();
        let mut cur = body.trim_start();
        if !cur.starts_with(FUNCTION_OPEN) {
            return Err(format!("expected {FUNCTION_OPEN}NAME>"));
        }
        while let Some(after) = cur.strip_prefix(FUNCTION_OPEN) {
            let gt = after
                .find('>')
                .ok_or_else(|| format!("{FUNCTION_OPEN} without '>'"))?;
            let name = after[..gt].trim();
            if name.is_empty() || name.contains('\n') || name.contains('<') {
                return Err(format!("bad function name {:?}", &after[..gt]));
            }
            let inner = &after[gt + 1..];
            let end = inner
                .find(FUNCTION_CLOSE)
                .ok_or_else(|| format!("function {name} without {FUNCTION_CLOSE}"))?;
            let arguments = self.parse_parameters(name, &inner[..end], &mut warnings)?;
            calls.push(ToolCall {
                name: name.to_string(),
                arguments,
            });
            cur = inner[end + FUNCTION_CLOSE.len()..].trim_start();
        }
        if !cur.trim().is_empty() {
            warnings.push(format!(
                "text after the function in a tool call ignored: {}",
                excerpt(cur)
            ));
        }
        Ok((calls, warnings))
    }

    fn parse_parameters(
        &self,
        function: &str,
        body: &str,
        warnings: &mut Vec<String>,
    ) -> Result<Map<String, Json>, String> {
        let mut args = Map::new();
        let mut cur = body;
        loop {
            let Some(start) = cur.find(PARAM_OPEN) else {
                if !cur.trim().is_empty() {
                    warnings.push(format!(
                        "text outside parameters of {function} ignored: {}",
                        excerpt(cur)
                    ));
                }
                break;
            };
            if !cur[..start].trim().is_empty() {
                warnings.push(format!(
                    "text outside parameters of {function} ignored: {}",
                    excerpt(&cur[..start])
                ));
            }
            let after = &cur[start + PARAM_OPEN.len()..];
            let gt = after
                .find('>')
                .ok_or_else(|| format!("{PARAM_OPEN} without '>' in {function}"))?;
            let key = after[..gt].trim();
            if key.is_empty() || key.contains('\n') || key.contains('<') {
                return Err(format!(
                    "bad parameter name {:?} in {function}",
                    &after[..gt]
                ));
            }
            let value_and_rest = &after[gt + 1..];
            let close = value_and_rest.find(PARAM_CLOSE);
            let next_open = value_and_rest.find(PARAM_OPEN);
            let (raw, next) = match close {
                Some(end) if next_open.is_none_or(|o| end < o) => (
                    &value_and_rest[..end],
                    &value_and_rest[end + PARAM_CLOSE.len()..],
                ),
                _ => {
                    warnings.push(format!(
                        "parameter {key} of {function} without {PARAM_CLOSE}; value taken up to the next parameter"
                    ));
                    let end = next_open.unwrap_or(value_and_rest.len());
                    (&value_and_rest[..end], &value_and_rest[end..])
                }
            };
            let value = self.convert_value(function, key, raw);
            if args.insert(key.to_string(), value).is_some() {
                warnings.push(format!(
                    "parameter {key} of {function} given twice; the last value is kept"
                ));
            }
            cur = next;
        }
        Ok(args)
    }

    fn convert_value(&self, function: &str, key: &str, raw: &str) -> Json {
        let v = raw.strip_prefix('\n').unwrap_or(raw);
        let v = v.strip_suffix('\n').unwrap_or(v);
        let declared_string = self
            .string_params
            .iter()
            .any(|(f, p)| f == function && p == key);
        if !declared_string {
            if let Ok(parsed) = serde_json::from_str::<Json>(v) {
                return parsed;
            }
        }
        Json::String(v.to_string())
    }
}

fn excerpt(s: &str) -> String {
    const MAX: usize = 80;
    let s = s.trim();
    match s.char_indices().nth(MAX) {
        Some((i, _)) => format!("{:?}…", &s[..i]),
        None => format!("{s:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn thinking_then_two_calls() {
        let text = "<think>\nI need the weather.\n</think>\n\nLet me check.\n<zyphra_tool_call>\n<function=get_weather>\n<parameter=city>\nSão Paulo\n</parameter>\n<parameter=days>\n3\n</parameter>\n<parameter=options>\n{\"exact\": true, \"steps\": [1, 2.5]}\n</parameter>\n</function>\n</zyphra_tool_call>\n<zyphra_tool_call>\n<function=calculate>\n<parameter=expression>\n6 * 7 < 50 && x > 1\n</parameter>\n<parameter=flag>\nfalse\n</parameter>\n<parameter=nothing>\nnull\n</parameter>\n</function>\n</zyphra_tool_call>";
        let p = parse_output(text);
        assert_eq!(p.reasoning.as_deref(), Some("I need the weather."));
        assert_eq!(p.content, "Let me check.");
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
        assert_eq!(p.tool_calls.len(), 2);
        assert_eq!(p.tool_calls[0].name, "get_weather");
        assert_eq!(
            Json::Object(p.tool_calls[0].arguments.clone()),
            json!({"city": "São Paulo", "days": 3, "options": {"exact": true, "steps": [1, 2.5]}})
        );
        let keys: Vec<_> = p.tool_calls[0].arguments.keys().cloned().collect();
        assert_eq!(keys, ["city", "days", "options"]);
        assert_eq!(
            Json::Object(p.tool_calls[1].arguments.clone()),
            json!({"expression": "6 * 7 < 50 && x > 1", "flag": false, "nothing": null})
        );
    }

    #[test]
    fn value_newlines_trimmed_once() {
        let p = parse_output("<zyphra_tool_call><function=f><parameter=a>\n\nline\n\n</parameter><parameter=b>x</parameter></function></zyphra_tool_call>");
        assert_eq!(
            Json::Object(p.tool_calls[0].arguments.clone()),
            json!({"a": "\nline\n", "b": "x"})
        );
    }

    #[test]
    fn schema_string_parameters_stay_strings() {
        let tools = [
            json!({"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"zip": {"type": "string"}, "n": {"type": "integer"}}}}}),
        ];
        let text = "<zyphra_tool_call>\n<function=f>\n<parameter=zip>\n02134\n</parameter>\n<parameter=n>\n7\n</parameter>\n</function>\n</zyphra_tool_call>";
        let typed = OutputParser::new().with_tools(&tools).parse(text);
        assert_eq!(
            Json::Object(typed.tool_calls[0].arguments.clone()),
            json!({"zip": "02134", "n": 7})
        );
        // Without the schema "02134" is not valid JSON either (leading zero): still a string.
        let p = parse_output(&text.replace("02134", "2134"));
        assert_eq!(p.tool_calls[0].arguments["zip"], json!(2134));
    }

    #[test]
    fn missing_opening_think() {
        let p = parse_output("reasoning here\n</think>\n\nThe answer.");
        assert_eq!(p.reasoning.as_deref(), Some("reasoning here"));
        assert_eq!(p.content, "The answer.");
        assert!(p.warnings.is_empty());

        let unfinished = OutputParser::new()
            .thinking_opened_in_prompt(true)
            .parse("still thinking");
        assert_eq!(unfinished.reasoning.as_deref(), Some("still thinking"));
        assert_eq!(unfinished.content, "");
        assert_eq!(unfinished.warnings.len(), 1);

        let plain = parse_output("no thinking at all");
        assert_eq!(plain.reasoning, None);
        assert_eq!(plain.content, "no thinking at all");
    }

    #[test]
    fn unterminated_think_is_reasoning_with_warning() {
        let p = parse_output("<think>\npartial thought");
        assert_eq!(p.reasoning.as_deref(), Some("partial thought"));
        assert_eq!(p.content, "");
        assert_eq!(p.warnings.len(), 1);
    }

    #[test]
    fn malformed_calls_stay_text() {
        let cases = [
            "before <zyphra_tool_call>\n<function=f>\n<parameter=a>\n1\n</parameter>\n</zyphra_tool_call> after",
            "<zyphra_tool_call>just text</zyphra_tool_call>",
            "<zyphra_tool_call><function=>\n</function></zyphra_tool_call>",
            "<zyphra_tool_call><function=f><parameter=>1</parameter></function></zyphra_tool_call>",
            "<zyphra_tool_call><function=f",
        ];
        for text in cases {
            let p = parse_output(text);
            assert!(p.tool_calls.is_empty(), "{text}");
            assert_eq!(p.content, text.trim(), "{text}");
            assert!(!p.warnings.is_empty(), "{text}");
        }
    }

    #[test]
    fn lenient_recoveries_warn() {
        // Missing wrapper close, complete function: accepted.
        let p = parse_output(
            "<zyphra_tool_call>\n<function=f>\n<parameter=a>\n1\n</parameter>\n</function>\n",
        );
        assert_eq!(p.tool_calls.len(), 1);
        assert_eq!(p.warnings.len(), 1);
        // Missing </parameter>: value runs to the next parameter.
        let p = parse_output("<zyphra_tool_call><function=f><parameter=a>\n1\n<parameter=b>\ntwo\n</parameter></function></zyphra_tool_call>");
        assert_eq!(
            Json::Object(p.tool_calls[0].arguments.clone()),
            json!({"a": 1, "b": "two"})
        );
        assert_eq!(p.warnings.len(), 1);
        // Duplicate key, stray text, bare function markup, stray close tag.
        let p = parse_output("x <function=g></function> </zyphra_tool_call><zyphra_tool_call><function=f>junk<parameter=a>1</parameter><parameter=a>2</parameter></function>tail</zyphra_tool_call>");
        assert_eq!(p.tool_calls[0].arguments["a"], json!(2));
        assert_eq!(p.warnings.len(), 5, "{:?}", p.warnings);
        assert_eq!(p.content, "x <function=g></function> </zyphra_tool_call>");
    }

    #[test]
    fn several_functions_in_one_wrapper_and_no_arguments() {
        let p = parse_output("<zyphra_tool_call>\n<function=a>\n</function>\n<function=b>\n<parameter=x>\n[1, {\"y\": \"<z>\"}]\n</parameter>\n</function>\n</zyphra_tool_call>");
        assert_eq!(p.tool_calls.len(), 2);
        assert!(p.tool_calls[0].arguments.is_empty());
        assert_eq!(p.tool_calls[1].arguments["x"], json!([1, {"y": "<z>"}]));
        assert!(p.warnings.is_empty());
    }
}
