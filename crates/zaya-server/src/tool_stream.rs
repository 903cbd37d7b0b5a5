//! Streaming split of generated chat text into reasoning, content and tool calls.
//!
//! The text arrives in deltas of any size (the engine releases UTF-8-safe pieces); this parser
//! turns them into the deltas OpenAI streams: `reasoning_content`, `content`, and for each tool
//! call first `{index, id, type, function: {name, arguments: ""}}` and then fragments of the
//! arguments JSON. ZAYA1's markup (`<think>`, `<zyphra_tool_call>`, `<function=…>`,
//! `<parameter=…>`) never reaches `content`: a suffix that could still become a tag is held
//! back until it is decided. Values are converted by [`zaya::text::OutputParser`] (the same
//! rules as the non-streamed answer: JSON when it parses, a string when the tool's schema says
//! so), and whitespace is trimmed the way the non-streamed parse trims it, so the streamed
//! pieces concatenate to exactly what [`OutputParser::parse`] returns for the whole text.

use serde_json::{Map, Value as Json};
use zaya::text::tool_calls::{
    CALL_CLOSE, CALL_OPEN, FUNCTION_CLOSE, FUNCTION_OPEN, PARAM_CLOSE, THINK_CLOSE, THINK_OPEN,
};
use zaya::text::OutputParser;

#[derive(Debug, Clone, PartialEq)]
pub enum Delta {
    Reasoning(String),
    Content(String),
    /// A new tool call: OpenAI's first delta of a call (index, id, type, name).
    ToolCallStart {
        index: usize,
        name: String,
    },
    /// More of the arguments JSON of call `index`.
    ToolCallArguments {
        index: usize,
        fragment: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Content,
    Reasoning,
    /// Inside `<zyphra_tool_call>`.
    Call,
}

/// One function being streamed.
#[derive(Debug, Clone)]
struct OpenFunction {
    index: usize,
    name: String,
    /// Text after `<function=NAME>` so far.
    body: String,
    /// Arguments JSON already sent.
    sent: String,
}

#[derive(Debug, Clone, Default)]
struct Trimmed {
    started: bool,
    held: String,
}

pub struct StreamingParser {
    parser: OutputParser,
    parse_tools: bool,
    /// With `parallel_tool_calls: false`, calls after the first are dropped.
    max_calls: Option<usize>,
    mode: Mode,
    reasoning_done: bool,
    pending: String,
    function: Option<OpenFunction>,
    /// Functions completed inside the current wrapper.
    functions_in_wrapper: usize,
    calls: usize,
    content: Trimmed,
    reasoning: Trimmed,
}

impl StreamingParser {
    /// `parser` carries the tool schemas (for string parameters); `thinking_opened` says that
    /// the prompt ended inside `<think>`; `parse_tools` false leaves tool markup in the content
    /// (no tools were offered).
    pub fn new(
        parser: OutputParser,
        thinking_opened: bool,
        parse_tools: bool,
        max_calls: Option<usize>,
    ) -> Self {
        StreamingParser {
            // Only converts values of complete functions: never inside a thinking block.
            parser: parser.thinking_opened_in_prompt(false),
            parse_tools,
            max_calls,
            mode: if thinking_opened {
                Mode::Reasoning
            } else {
                Mode::Content
            },
            reasoning_done: false,
            pending: String::new(),
            function: None,
            functions_in_wrapper: 0,
            calls: 0,
            content: Trimmed::default(),
            reasoning: Trimmed::default(),
        }
    }

    /// Number of tool calls started so far.
    pub fn tool_calls(&self) -> usize {
        self.calls
    }

    pub fn push(&mut self, text: &str) -> Vec<Delta> {
        let mut out = Vec::new();
        self.pending.push_str(text);
        self.run(&mut out, false);
        out
    }

    /// End of the text: everything held back is released.
    pub fn finish(&mut self) -> Vec<Delta> {
        let mut out = Vec::new();
        self.run(&mut out, true);
        if let Some(f) = self.function.take() {
            // Stopped inside a function (length): close the arguments so they parse.
            let (args, _) = self.arguments(&f.name, &f.body, false);
            let mut full =
                serde_json::to_string(&Json::Object(args)).unwrap_or_else(|_| "{}".into());
            if !full.starts_with(&f.sent) {
                full = format!("{}}}", f.sent.trim_end_matches(',').trim_end_matches('}'));
            }
            if full.len() > f.sent.len() {
                out.push(Delta::ToolCallArguments {
                    index: f.index,
                    fragment: full[f.sent.len()..].to_string(),
                });
            }
        }
        out
    }

    fn run(&mut self, out: &mut Vec<Delta>, end: bool) {
        loop {
            let progressed = match self.mode {
                Mode::Content => self.step_text(out, end, Mode::Content),
                Mode::Reasoning => self.step_text(out, end, Mode::Reasoning),
                Mode::Call => self.step_call(out, end),
            };
            if !progressed {
                break;
            }
        }
    }

    /// The tags that end text of `mode`.
    fn tags(&self, mode: Mode) -> Vec<&'static str> {
        match mode {
            Mode::Reasoning => vec![THINK_CLOSE],
            _ => {
                let mut t = Vec::new();
                if !self.reasoning_done {
                    t.push(THINK_OPEN);
                }
                if self.parse_tools {
                    t.push(CALL_OPEN);
                }
                t
            }
        }
    }

    /// Emits text of the current mode up to the next tag (switching mode at it) or up to a
    /// suffix that may still become a tag. Returns whether the mode changed.
    fn step_text(&mut self, out: &mut Vec<Delta>, end: bool, mode: Mode) -> bool {
        let tags = self.tags(mode);
        let found = tags
            .iter()
            .filter_map(|t| self.pending.find(t).map(|i| (i, *t)))
            .min_by_key(|(i, _)| *i);
        if let Some((i, tag)) = found {
            let before = self.pending[..i].to_string();
            self.pending.drain(..i + tag.len());
            self.emit(out, mode, &before);
            match tag {
                THINK_OPEN => self.mode = Mode::Reasoning,
                THINK_CLOSE => {
                    self.mode = Mode::Content;
                    self.reasoning_done = true;
                }
                _ => {
                    self.mode = Mode::Call;
                    self.functions_in_wrapper = 0;
                }
            }
            return true;
        }
        let keep = if end {
            0
        } else {
            held_suffix(&self.pending, &tags)
        };
        let cut = self.pending.len() - keep;
        let text = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        self.emit(out, mode, &text);
        if end && mode == Mode::Reasoning {
            self.flush_held(out, Mode::Reasoning);
        }
        false
    }

    /// Text with the non-streamed parse's trimming: leading whitespace of the channel dropped,
    /// trailing whitespace held until more text follows (dropped at the end).
    fn emit(&mut self, out: &mut Vec<Delta>, mode: Mode, text: &str) {
        let state = if mode == Mode::Reasoning {
            &mut self.reasoning
        } else {
            &mut self.content
        };
        let mut t = text;
        if !state.started {
            t = t.trim_start();
            if t.is_empty() {
                return;
            }
            state.started = true;
        }
        let body = t.trim_end();
        if body.is_empty() {
            state.held.push_str(t);
            return;
        }
        let mut s = std::mem::take(&mut state.held);
        s.push_str(body);
        state.held = t[body.len()..].to_string();
        out.push(if mode == Mode::Reasoning {
            Delta::Reasoning(s)
        } else {
            Delta::Content(s)
        });
    }

    fn flush_held(&mut self, _out: &mut [Delta], mode: Mode) {
        // Trailing whitespace is trimmed in the non-streamed answer too: drop it.
        let state = if mode == Mode::Reasoning {
            &mut self.reasoning
        } else {
            &mut self.content
        };
        state.held.clear();
    }

    /// Inside `<zyphra_tool_call>`: functions, then the closing tag.
    fn step_call(&mut self, out: &mut Vec<Delta>, end: bool) -> bool {
        if let Some(mut f) = self.function.take() {
            f.body.push_str(&self.pending);
            self.pending.clear();
            if let Some(close) = f.body.find(FUNCTION_CLOSE) {
                let rest = f.body[close + FUNCTION_CLOSE.len()..].to_string();
                f.body.truncate(close);
                self.send_arguments(out, &mut f, true);
                self.pending = rest;
                self.functions_in_wrapper += 1;
                return true;
            }
            self.send_arguments(out, &mut f, false);
            self.function = Some(f);
            return false;
        }
        let rest = self.pending.trim_start();
        if let Some(after) = rest.strip_prefix(CALL_CLOSE) {
            self.pending = after.to_string();
            self.mode = Mode::Content;
            return true;
        }
        if let Some(after) = rest.strip_prefix(FUNCTION_OPEN) {
            let Some(gt) = after.find('>') else {
                if end || after.contains(['\n', '<']) {
                    return self.malformed(out);
                }
                return false;
            };
            let name = after[..gt].trim().to_string();
            if name.is_empty() || name.contains(['\n', '<']) {
                return self.malformed(out);
            }
            let body = after[gt + 1..].to_string();
            self.pending.clear();
            let allowed = self.max_calls.is_none_or(|m| self.calls < m);
            let index = self.calls;
            if allowed {
                out.push(Delta::ToolCallStart {
                    index,
                    name: name.clone(),
                });
                self.calls += 1;
            }
            self.function = Some(OpenFunction {
                index: if allowed { index } else { usize::MAX },
                name,
                body: String::new(),
                sent: String::new(),
            });
            self.pending = body;
            return true;
        }
        if !end && (FUNCTION_OPEN.starts_with(rest) || CALL_CLOSE.starts_with(rest)) {
            return false;
        }
        if end && rest.is_empty() {
            return false;
        }
        self.malformed(out)
    }

    /// Markup that is not a tool call: before any function it stays text (as the non-streamed
    /// parser keeps it); after a complete function the rest of the wrapper is ignored.
    fn malformed(&mut self, out: &mut Vec<Delta>) -> bool {
        if self.functions_in_wrapper > 0 {
            match self.pending.find(CALL_CLOSE) {
                Some(i) => {
                    self.pending.drain(..i + CALL_CLOSE.len());
                    self.mode = Mode::Content;
                    true
                }
                None => {
                    self.pending.clear();
                    false
                }
            }
        } else {
            let text = format!("{CALL_OPEN}{}", self.pending);
            self.pending = text;
            self.mode = Mode::Content;
            // Emit the opening tag as text, then continue in content mode.
            let cut = CALL_OPEN.len();
            let head = self.pending[..cut].to_string();
            self.pending.drain(..cut);
            self.emit(out, Mode::Content, &head);
            true
        }
    }

    /// Arguments of a function body (complete parameters only unless `complete`).
    fn arguments(&self, name: &str, body: &str, complete: bool) -> (Map<String, Json>, bool) {
        let upto = if complete {
            body.len()
        } else {
            match body.rfind(PARAM_CLOSE) {
                Some(i) => i + PARAM_CLOSE.len(),
                None => 0,
            }
        };
        let text = format!(
            "{CALL_OPEN}{FUNCTION_OPEN}{name}>{}{FUNCTION_CLOSE}{CALL_CLOSE}",
            &body[..upto]
        );
        let parsed = self.parser.parse(&text);
        match parsed.tool_calls.into_iter().next() {
            Some(c) => (c.arguments, true),
            None => (Map::new(), false),
        }
    }

    fn send_arguments(&self, out: &mut Vec<Delta>, f: &mut OpenFunction, complete: bool) {
        if f.index == usize::MAX {
            return;
        }
        let (args, _) = self.arguments(&f.name, &f.body, complete);
        if !complete && args.is_empty() {
            return;
        }
        let full = serde_json::to_string(&Json::Object(args)).unwrap_or_else(|_| "{}".into());
        let target = if complete {
            full.as_str()
        } else {
            &full[..full.len() - 1]
        };
        if target.starts_with(f.sent.as_str()) && target.len() > f.sent.len() {
            out.push(Delta::ToolCallArguments {
                index: f.index,
                fragment: target[f.sent.len()..].to_string(),
            });
            f.sent = target.to_string();
        } else if complete && !f.sent.ends_with('}') {
            // A later value replaced an earlier one (duplicate key): close what was sent.
            out.push(Delta::ToolCallArguments {
                index: f.index,
                fragment: "}".into(),
            });
            f.sent.push('}');
        }
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of one of `tags`.
fn held_suffix(text: &str, tags: &[&str]) -> usize {
    let mut best = 0;
    for tag in tags {
        for len in (1..tag.len()).rev() {
            if len <= text.len()
                && text.is_char_boundary(text.len() - len)
                && text.ends_with(&tag[..len])
            {
                best = best.max(len);
                break;
            }
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Concatenated stream: (reasoning, content, [(name, arguments string)]).
    fn collect(deltas: &[Delta]) -> (String, String, Vec<(String, String)>) {
        let (mut r, mut c, mut calls) =
            (String::new(), String::new(), Vec::<(String, String)>::new());
        for d in deltas {
            match d {
                Delta::Reasoning(s) => r.push_str(s),
                Delta::Content(s) => c.push_str(s),
                Delta::ToolCallStart { index, name } => {
                    assert_eq!(*index, calls.len(), "indices count up");
                    calls.push((name.clone(), String::new()));
                }
                Delta::ToolCallArguments { index, fragment } => calls[*index].1.push_str(fragment),
            }
        }
        (r, c, calls)
    }

    fn stream(text: &str, chunk: usize, thinking: bool, tools: &[Json]) -> Vec<Delta> {
        let mut p = StreamingParser::new(
            OutputParser::new()
                .with_tools(tools)
                .thinking_opened_in_prompt(thinking),
            thinking,
            true,
            None,
        );
        let chars: Vec<char> = text.chars().collect();
        let mut out = Vec::new();
        for piece in chars.chunks(chunk) {
            out.extend(p.push(&piece.iter().collect::<String>()));
        }
        out.extend(p.finish());
        out
    }

    /// Streaming in any chunking gives exactly the non-streamed parse.
    fn check_same_as_whole(text: &str, thinking: bool, tools: &[Json]) {
        let whole = OutputParser::new()
            .with_tools(tools)
            .thinking_opened_in_prompt(thinking)
            .parse(text);
        for chunk in [1, 2, 3, 5, 7, 1000] {
            let deltas = stream(text, chunk, thinking, tools);
            let (r, c, calls) = collect(&deltas);
            assert_eq!(c, whole.content, "content, chunk {chunk}: {text:?}");
            assert_eq!(
                r,
                whole.reasoning.clone().unwrap_or_default(),
                "reasoning, chunk {chunk}: {text:?}"
            );
            assert_eq!(
                calls.len(),
                whole.tool_calls.len(),
                "calls, chunk {chunk}: {text:?}"
            );
            for ((name, args), want) in calls.iter().zip(&whole.tool_calls) {
                assert_eq!(name, &want.name);
                let parsed: Json =
                    serde_json::from_str(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
                assert_eq!(parsed, Json::Object(want.arguments.clone()));
                assert_eq!(args, &serde_json::to_string(&want.arguments).unwrap());
            }
            for d in &deltas {
                if let Delta::Content(s) | Delta::Reasoning(s) = d {
                    for tag in [
                        "<zyphra_tool_call",
                        "</zyphra_tool_call",
                        "<function=",
                        "<parameter=",
                        "<think>",
                        "</think>",
                    ] {
                        assert!(
                            !s.contains(tag) || !whole.warnings.is_empty(),
                            "markup {tag} leaked into {s:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn plain_text_and_thinking() {
        check_same_as_whole("Hello there, <b>bold</b> and a < sign.", false, &[]);
        check_same_as_whole(
            "<think>\nLet me see.\n</think>\n\nThe answer is 4.",
            false,
            &[],
        );
        check_same_as_whole("Let me see.\n</think>\n\nThe answer is 4.\n", true, &[]);
        check_same_as_whole("still thinking when cut", true, &[]);
        check_same_as_whole("  \n", false, &[]);
        check_same_as_whole("é ü 日本語 <thin", false, &[]);
    }

    #[test]
    fn calls_after_thinking_parameterless_and_braces() {
        let tools = [
            json!({"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}),
        ];
        check_same_as_whole("<think>\nI need the weather.\n</think>\n\nLet me check.\n<zyphra_tool_call>\n<function=get_weather>\n<parameter=city>\nSão Paulo\n</parameter>\n<parameter=days>\n3\n</parameter>\n</function>\n</zyphra_tool_call>", false, &tools);
        // Parameterless tool.
        check_same_as_whole(
            "<zyphra_tool_call>\n<function=now>\n</function>\n</zyphra_tool_call>",
            false,
            &[],
        );
        // Braces, quotes and markup-like text inside arguments.
        check_same_as_whole("<zyphra_tool_call>\n<function=run>\n<parameter=code>\nfn main() { println!(\"{}\", 1 < 2); }\n</parameter>\n<parameter=obj>\n{\"a\": {\"b\": [1, 2]}}\n</parameter>\n</function>\n</zyphra_tool_call>", false, &[]);
        // Two calls, one wrapper each, text between them, thinking opened by the prompt.
        check_same_as_whole("plan\n</think>\nok <zyphra_tool_call>\n<function=a>\n<parameter=x>\n1\n</parameter>\n</function>\n</zyphra_tool_call>\n<zyphra_tool_call>\n<function=b>\n</function>\n</zyphra_tool_call> done", true, &[]);
        // Several functions in one wrapper.
        check_same_as_whole("<zyphra_tool_call>\n<function=a>\n</function>\n<function=b>\n<parameter=y>\n\"s\"\n</parameter>\n</function>\n</zyphra_tool_call>", false, &[]);
    }

    #[test]
    fn first_delta_is_the_name_then_argument_fragments() {
        let deltas = stream("<zyphra_tool_call>\n<function=f>\n<parameter=a>\n1\n</parameter>\n<parameter=b>\nx\n</parameter>\n</function>\n</zyphra_tool_call>", 1, false, &[]);
        assert_eq!(
            deltas[0],
            Delta::ToolCallStart {
                index: 0,
                name: "f".into()
            }
        );
        let frags: Vec<_> = deltas[1..]
            .iter()
            .map(|d| match d {
                Delta::ToolCallArguments { fragment, .. } => fragment.clone(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(frags, ["{\"a\":1", ",\"b\":\"x\"", "}"]);
    }

    #[test]
    fn malformed_markup_stays_text() {
        check_same_as_whole(
            "before <zyphra_tool_call>just text</zyphra_tool_call> after",
            false,
            &[],
        );
    }

    #[test]
    fn without_tools_markup_is_content_and_calls_can_be_limited() {
        let mut p = StreamingParser::new(OutputParser::new(), false, false, None);
        let mut d = p.push("<zyphra_tool_call><function=f></function></zyphra_tool_call>");
        d.extend(p.finish());
        assert_eq!(
            collect(&d).1,
            "<zyphra_tool_call><function=f></function></zyphra_tool_call>"
        );
        let mut p = StreamingParser::new(OutputParser::new(), false, true, Some(1));
        let mut d = p.push("<zyphra_tool_call><function=f></function></zyphra_tool_call><zyphra_tool_call><function=g></function></zyphra_tool_call>");
        d.extend(p.finish());
        let (_, _, calls) = collect(&d);
        assert_eq!(calls, [("f".to_string(), "{}".to_string())]);
    }
}
