//! Grammar-constrained decoding with llguidance: JSON Schema (`response_format`) and ZAYA1
//! tool-call markup (`tool_choice` `required` / named) compiled into Lark grammars, and a
//! per-choice matcher that masks the tokens that may not come next.
//!
//! Tool calls are constrained in ZAYA1's own markup (`<zyphra_tool_call>` / `<function=…>` /
//! `<parameter=…>`), not as JSON converted afterwards: the model was trained to write that
//! markup, so the constrained text stays in distribution, and the same parser reads
//! constrained and free answers. Each parameter value is a `%json` sub-grammar of the
//! parameter's schema, except parameters the schema declares as strings, which ZAYA1 writes
//! verbatim (no quotes): those are free text without `<` (or one of the `enum` / `const`
//! values). Parameters come in the schema's property order; required ones must appear, others
//! may be left out, unknown ones cannot appear — so the arguments always validate (for string
//! parameters, `pattern` / length keywords are not enforced).

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{InferenceCapabilities, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Map, Value as Json};
use zaya::text::ZayaTokenizer;

use crate::error::ApiError;

/// Reasoning allowed before a constrained answer when the prompt opened thinking.
pub const MAX_THINKING_CHARS: usize = 512;

/// Shared, per-tokenizer state: the token trie and the parser factory.
pub struct GrammarCompiler {
    factory: Arc<ParserFactory>,
    vocab_size: usize,
    /// How to write these tags in a grammar: the special token or a literal.
    think_close: String,
    call_open: String,
    call_close: String,
}

impl std::fmt::Debug for GrammarCompiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrammarCompiler")
            .field("vocab_size", &self.vocab_size)
            .finish()
    }
}

/// What the output must be.
#[derive(Debug, Clone)]
pub enum GrammarSpec {
    /// Any JSON value matching the schema (`{"type": "object"}` for `json_object`).
    JsonSchema(Json),
    /// One tool call (or several when `parallel`) among `tools` (OpenAI tool objects).
    ToolCalls { tools: Vec<Json>, parallel: bool },
}

/// A compiled grammar, ready to start a matcher per choice.
pub struct Grammar {
    factory: Arc<ParserFactory>,
    grammar: TopLevelGrammar,
    vocab_size: usize,
    pub lark: String,
}

impl std::fmt::Debug for Grammar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammar").field("lark", &self.lark).finish()
    }
}

/// One choice's grammar state.
pub struct GrammarMatcher {
    matcher: Matcher,
    vocab_size: usize,
}

impl GrammarCompiler {
    /// `model_vocab` is the model's vocabulary (its logits); ids the tokenizer does not know
    /// are never allowed. `eos` is the id that ends an answer (the end-of-turn token).
    pub fn new(tok: &ZayaTokenizer, model_vocab: usize, eos: u32) -> Result<Self, String> {
        let json_text = tok
            .inner()
            .to_string(false)
            .map_err(|e| format!("serialising the tokenizer: {e}"))?;
        let value: Json =
            serde_json::from_str(&json_text).map_err(|e| format!("tokenizer JSON: {e}"))?;
        let mut words =
            std::panic::catch_unwind(|| llguidance::token_bytes_from_tokenizer_json(&value))
                .map_err(|_| "llguidance could not read the tokenizer's vocabulary".to_string())?
                .map_err(|e| format!("token bytes of the vocabulary: {e}"))?;
        if words.len() > model_vocab {
            return Err(format!(
                "the tokenizer has {} tokens, more than the model's {model_vocab}",
                words.len()
            ));
        }
        words.resize(model_vocab, Vec::new());
        let info = TokRxInfo {
            vocab_size: model_vocab as u32,
            tok_eos: eos,
            tok_bos: tok.bos_token_id(),
            tok_pad: tok.pad_token_id(),
            tok_unk: None,
            tok_end_of_turn: None,
        };
        let trie = TokTrie::from(&info, &words);
        let env: TokEnv = Arc::new(llguidance::toktrie::ApproximateTokEnv::new(trie));
        let mut factory = ParserFactory::new(
            &env,
            InferenceCapabilities::default(),
            &llguidance::earley::SlicedBiasComputer::general_slices(),
        )
        .map_err(|e| format!("llguidance parser factory: {e}"))?;
        factory.quiet();
        let tag = |t: &str| match tok.token_to_id(t) {
            Some(id) if tok.is_special_id(id) => t.to_string(),
            _ => serde_json::to_string(t).expect("string"),
        };
        Ok(GrammarCompiler {
            factory: Arc::new(factory),
            vocab_size: model_vocab,
            think_close: tag("</think>"),
            call_open: tag("<zyphra_tool_call>"),
            call_close: tag("</zyphra_tool_call>"),
        })
    }

    /// Compiles `spec`; `close_thinking`: the prompt opened a thinking block, so the output is
    /// up to [`MAX_THINKING_CHARS`] of reasoning, `</think>`, then the constrained answer. Errors are the request's fault (400).
    pub fn compile(&self, spec: &GrammarSpec, close_thinking: bool) -> Result<Grammar, ApiError> {
        let (body, param) = match spec {
            GrammarSpec::JsonSchema(schema) => (
                format!("%json {}", compact(&strict_json(schema))),
                "response_format",
            ),
            GrammarSpec::ToolCalls { tools, parallel } => {
                (self.tool_rules(tools, *parallel)?, "tools")
            }
        };
        // The prompt opened a thinking block: some reasoning (no markup, bounded so that a
        // constrained answer always arrives), the close tag, then the constrained answer.
        let prefix = if close_thinking {
            format!(
                "/[^<]{{0,{MAX_THINKING_CHARS}}}/ {} \"\\n\\n\" ",
                self.think_close
            )
        } else {
            String::new()
        };
        let lark = format!("start: {prefix}answer\nanswer: {body}\n");
        let grammar = TopLevelGrammar::from_lark(lark.clone());
        // Compile once now so that a bad schema is a 400 at submission, not a failed stream.
        let mut probe = Matcher::new(self.factory.create_parser(grammar.clone()));
        if let Some(e) = probe.get_error() {
            return Err(ApiError::invalid(
                param,
                format!("cannot build the output grammar: {e}"),
            ));
        }
        if let Err(e) = probe.compute_mask() {
            return Err(ApiError::invalid(
                param,
                format!("cannot build the output grammar: {e}"),
            ));
        }
        Ok(Grammar {
            factory: self.factory.clone(),
            grammar,
            vocab_size: self.vocab_size,
            lark,
        })
    }

    fn tool_rules(&self, tools: &[Json], parallel: bool) -> Result<String, ApiError> {
        let mut rules = Vec::new();
        let mut alts = Vec::new();
        for (t, tool) in tools.iter().enumerate() {
            let f = tool.get("function").unwrap_or(tool);
            let name = f.get("name").and_then(Json::as_str).unwrap_or_default();
            let params = f.get("parameters").cloned().unwrap_or_else(|| json!({}));
            let defs: Map<String, Json> = ["$defs", "definitions"]
                .iter()
                .filter_map(|k| params.get(*k).map(|v| (k.to_string(), v.clone())))
                .collect();
            let required: Vec<&str> = params
                .get("required")
                .and_then(Json::as_array)
                .map(|r| r.iter().filter_map(Json::as_str).collect())
                .unwrap_or_default();
            let mut seq = Vec::new();
            if let Some(props) = params.get("properties").and_then(Json::as_object) {
                for (p, (key, schema)) in props.iter().enumerate() {
                    if key.is_empty() || key.contains(['<', '>', '\n']) {
                        return Err(ApiError::invalid(
                            format!("tools[{t}].function.parameters.properties"),
                            format!("parameter name {key:?} cannot be written in ZAYA1 tool-call markup"),
                        ));
                    }
                    let value = self.value_rule(schema, &defs);
                    let rule = format!("p{t}_{p}");
                    rules.push(format!(
                        "{rule}: {} {value}",
                        lit(&format!("<parameter={key}>\n"))
                    ));
                    seq.push(if required.contains(&key.as_str()) {
                        rule
                    } else {
                        format!("{rule}?")
                    });
                }
            }
            let fname = format!("f{t}");
            rules.push(format!(
                "{fname}: {} {} {}",
                lit(&format!("<function={name}>\n")),
                seq.join(" "),
                lit("</function>")
            ));
            alts.push(fname);
        }
        let call = format!(
            "{} \"\\n\" ({}) \"\\n\" {}",
            self.call_open,
            alts.join(" | "),
            self.call_close
        );
        let body = if parallel {
            "call (\"\\n\" call)*"
        } else {
            "call"
        };
        Ok(format!("{body}\ncall: {call}\n{}", rules.join("\n")))
    }

    /// A parameter value and its closing markup: verbatim text for string parameters (as ZAYA1 writes them), JSON
    /// of the schema otherwise.
    fn value_rule(&self, schema: &Json, defs: &Map<String, Json>) -> String {
        let is_string = match schema.get("type") {
            Some(Json::String(t)) => t == "string",
            Some(Json::Array(ts)) => {
                !ts.is_empty() && ts.iter().all(|t| t == "string" || t == "null")
            }
            _ => false,
        };
        if is_string {
            let choices: Vec<&str> = match (schema.get("enum"), schema.get("const")) {
                (Some(Json::Array(e)), _) => e.iter().filter_map(Json::as_str).collect(),
                (_, Some(Json::String(c))) => vec![c.as_str()],
                _ => Vec::new(),
            };
            if !choices.is_empty() {
                let close = lit(PARAM_CLOSE);
                return format!(
                    "({}) {close}",
                    choices
                        .iter()
                        .map(|c| lit(c))
                        .collect::<Vec<_>>()
                        .join(" | ")
                );
            }
            // Non-empty, no '<', not starting or ending with a newline (the markup's own), at
            // most `maxLength` (default MAX_STRING_CHARS) characters. The closing markup is part
            // of the same lexeme: llguidance's lexer matches greedily and would otherwise take
            // the newline before `</parameter>` into the value.
            let max = schema
                .get("maxLength")
                .and_then(Json::as_u64)
                .map_or(MAX_STRING_CHARS, |m| m as usize)
                .max(1);
            let inner = if max >= 2 {
                format!("([^<]{{0,{}}}[^<\\n])?", max - 2)
            } else {
                String::new()
            };
            return format!("/[^<\\n]{inner}\\n<\\/parameter>\\n/");
        }
        let mut s = schema.clone();
        if let Some(obj) = s.as_object_mut() {
            for (k, v) in defs {
                obj.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
        format!("%json {} {}", compact(&strict_json(&s)), lit(PARAM_CLOSE))
    }
}

/// Longest verbatim string parameter without a `maxLength` (keeps a rambling model from
/// filling `max_tokens` inside one value).
pub const MAX_STRING_CHARS: usize = 256;

/// JSON as ZAYA1's template writes it (`json.dumps` separators), without the free whitespace
/// llguidance allows by default: a small model can otherwise emit blank lines until
/// `max_tokens`.
fn strict_json(schema: &Json) -> Json {
    let mut s = schema.clone();
    if let Some(obj) = s.as_object_mut() {
        obj.entry("x-guidance").or_insert_with(
            || json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}),
        );
    }
    s
}

/// What follows every parameter value.
const PARAM_CLOSE: &str = "\n</parameter>\n";

fn lit(s: &str) -> String {
    serde_json::to_string(s).expect("string")
}

fn compact(v: &Json) -> String {
    serde_json::to_string(v).expect("json")
}

impl Grammar {
    /// A fresh matcher at the start of the output.
    pub fn start(&self) -> Result<GrammarMatcher, String> {
        let matcher = Matcher::new(self.factory.create_parser(self.grammar.clone()));
        if let Some(e) = matcher.get_error() {
            return Err(e);
        }
        Ok(GrammarMatcher {
            matcher,
            vocab_size: self.vocab_size,
        })
    }
}

impl GrammarMatcher {
    /// Clears `allowed[id]` for every token the grammar forbids next.
    pub fn mask(&mut self, allowed: &mut [bool]) -> Result<(), String> {
        let vob = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| e.to_string())?;
        for (id, a) in allowed.iter_mut().enumerate() {
            if id >= self.vocab_size || !vob.is_allowed(id as u32) {
                *a = false;
            }
        }
        Ok(())
    }

    pub fn commit(&mut self, token: u32) -> Result<(), String> {
        self.matcher.consume_token(token).map_err(|e| e.to_string())
    }

    /// The grammar is complete and nothing may follow.
    pub fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }
}

impl zaya_engine::ConstraintFactory for Grammar {
    fn start(&self) -> Result<Box<dyn zaya_engine::TokenConstraint>, String> {
        Ok(Box::new(Grammar::start(self)?))
    }
}

impl zaya_engine::TokenConstraint for GrammarMatcher {
    fn mask(&mut self, allowed: &mut [bool]) -> Result<(), String> {
        GrammarMatcher::mask(self, allowed)
    }

    fn commit(&mut self, token: u32) -> Result<(), String> {
        GrammarMatcher::commit(self, token)
    }

    fn is_finished(&self) -> bool {
        GrammarMatcher::is_finished(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> ZayaTokenizer {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/default");
        ZayaTokenizer::from_dir(dir).unwrap()
    }

    /// Walks the grammar greedily along `text`'s tokens: every token must be allowed.
    fn accepts(g: &Grammar, tok: &ZayaTokenizer, text: &str) -> bool {
        let ids = tok.encode(text, false).unwrap();
        let mut m = g.start().unwrap();
        for id in ids {
            let mut allowed = vec![true; 1984];
            m.mask(&mut allowed).unwrap();
            if !allowed[id as usize] {
                eprintln!(
                    "token {id} {:?} rejected in {text:?}",
                    tok.decode(&[id], false).unwrap()
                );
                return false;
            }
            m.commit(id).unwrap();
        }
        let mut allowed = vec![true; 1984];
        m.mask(&mut allowed).unwrap();
        allowed[106]
    }

    #[test]
    fn json_schema_masks() {
        let tok = tokenizer();
        let c = GrammarCompiler::new(&tok, 1984, 106).unwrap();
        let g = c
            .compile(&GrammarSpec::JsonSchema(json!({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"], "additionalProperties": false})), false)
            .unwrap();
        assert!(accepts(&g, &tok, "{\"a\": 12}"));
        assert!(!accepts(&g, &tok, "{\"a\": \"x\"}"));
        assert!(!accepts(&g, &tok, "{}"));
        // Ids past the tokenizer's vocabulary are never allowed.
        let mut m = g.start().unwrap();
        let mut allowed = vec![true; 1984];
        m.mask(&mut allowed).unwrap();
        assert!(allowed.iter().skip(1930).all(|a| !a));
        assert!(allowed.iter().any(|a| *a));
        assert!(c
            .compile(
                &GrammarSpec::JsonSchema(json!({"type": "frobnicate"})),
                false
            )
            .is_err());
    }

    #[test]
    fn tool_call_markup() {
        let tok = tokenizer();
        let c = GrammarCompiler::new(&tok, 1984, 106).unwrap();
        let tools = vec![
            json!({"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}, "unit": {"type": "string", "enum": ["c", "f"]}}, "required": ["city"]}}}),
            json!({"type": "function", "function": {"name": "now"}}),
        ];
        let g = c
            .compile(
                &GrammarSpec::ToolCalls {
                    tools: tools.clone(),
                    parallel: false,
                },
                false,
            )
            .unwrap();
        let ok = "<zyphra_tool_call>\n<function=get_weather>\n<parameter=city>\nSão Paulo\n</parameter>\n<parameter=days>\n3\n</parameter>\n</function>\n</zyphra_tool_call>";
        assert!(accepts(&g, &tok, ok), "{}", g.lark);
        assert!(accepts(
            &g,
            &tok,
            "<zyphra_tool_call>\n<function=now>\n</function>\n</zyphra_tool_call>"
        ));
        assert!(
            !accepts(&g, &tok, &ok.replace("\n3\n", "\n\"3\"\n")),
            "days must be an integer"
        );
        assert!(
            !accepts(
                &g,
                &tok,
                "<zyphra_tool_call>\n<function=get_weather>\n</function>\n</zyphra_tool_call>"
            ),
            "city is required"
        );
        assert!(!accepts(
            &g,
            &tok,
            "<zyphra_tool_call>\n<function=other>\n</function>\n</zyphra_tool_call>"
        ));
        assert!(!accepts(&g, &tok, "Sure! <zyphra_tool_call>"));
        let parsed = zaya::text::OutputParser::new().with_tools(&tools).parse(ok);
        assert_eq!(
            Json::Object(parsed.tool_calls[0].arguments.clone()),
            json!({"city": "São Paulo", "days": 3})
        );
        let g = c
            .compile(
                &GrammarSpec::ToolCalls {
                    tools,
                    parallel: true,
                },
                true,
            )
            .unwrap();
        assert!(accepts(&g, &tok, &format!("Weather, then.\n</think>\n\n{ok}\n<zyphra_tool_call>\n<function=now>\n</function>\n</zyphra_tool_call>")));
    }
}
