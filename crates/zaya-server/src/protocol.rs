//! Request bodies of the OpenAI API (the fields zaya implements) and their checks. Unknown
//! fields are ignored, as OpenAI-compatible servers do, so that clients sending newer fields
//! still work; fields zaya reads are typed, and a wrong type or value is a 400 naming the field.

use serde::Deserialize;
use serde_json::{Map, Value as Json};

use crate::error::{ApiError, ApiResult};
use zaya::sampling::{Sampler, SamplingParams};

/// The most alternatives `top_logprobs` / `logprobs` may ask for (OpenAI's bound).
pub const MAX_TOP_LOGPROBS: usize = 20;
/// Choices per request; each is a running row.
pub const MAX_N: usize = 16;

/// A string or a list of strings (`stop`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Sampling and stopping fields shared by both completion routes.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SamplingFields {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// vLLM's extension; 0 or -1 disables.
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<i64>,
    pub stop: Option<OneOrMany>,
    pub n: Option<usize>,
    /// Extension: do not stop at the end-of-sequence ids.
    #[serde(default)]
    pub ignore_eos: bool,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
}

impl SamplingFields {
    /// `zaya::sampling` parameters, checked by the sampler itself so that the rules live in
    /// one place. OpenAI's default temperature is 1.
    pub fn sampling_params(&self) -> ApiResult<SamplingParams> {
        let top_k = match self.top_k {
            None | Some(-1) | Some(0) => 0,
            Some(k) if k > 0 => k as usize,
            Some(k) => {
                return Err(ApiError::invalid(
                    "top_k",
                    format!("top_k must be -1, 0 or positive, got {k}"),
                ))
            }
        };
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if let Some(v) = v {
                if !(-2.0..=2.0).contains(&v) {
                    return Err(ApiError::invalid(
                        name,
                        format!("{name} must be in [-2, 2], got {v}"),
                    ));
                }
            }
        }
        let p = SamplingParams {
            temperature: self.temperature.unwrap_or(1.0),
            top_k,
            top_p: self.top_p.unwrap_or(1.0),
            min_p: self.min_p.unwrap_or(0.0),
            repetition_penalty: self.repetition_penalty.unwrap_or(1.0),
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            // Negative seeds (allowed by OpenAI) map to distinct u64 values.
            seed: self.seed.map(|s| s as u64).unwrap_or_else(random_seed),
        };
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(ApiError::invalid(
                    "top_p",
                    format!("top_p must be in (0, 1], got {p}"),
                ));
            }
        }
        if let Some(t) = self.temperature {
            if !(0.0..=2.0).contains(&t) {
                return Err(ApiError::invalid(
                    "temperature",
                    format!("temperature must be in [0, 2], got {t}"),
                ));
            }
        }
        Sampler::new(&p).map_err(|e| {
            let msg = e.to_string();
            let field = [
                "temperature",
                "top_p",
                "top_k",
                "min_p",
                "repetition_penalty",
                "presence_penalty",
                "frequency_penalty",
            ]
            .into_iter()
            .find(|f| msg.contains(f))
            .unwrap_or("sampling");
            ApiError::invalid(field, msg)
        })?;
        Ok(p)
    }

    pub fn n(&self) -> ApiResult<usize> {
        match self.n {
            None => Ok(1),
            Some(n) if (1..=MAX_N).contains(&n) => Ok(n),
            Some(n) => Err(ApiError::invalid(
                "n",
                format!("n must be between 1 and {MAX_N}, got {n}"),
            )),
        }
    }

    pub fn stop_strings(&self) -> ApiResult<Vec<String>> {
        let stops = self
            .stop
            .clone()
            .map(OneOrMany::into_vec)
            .unwrap_or_default();
        if stops.len() > 4 {
            return Err(ApiError::invalid(
                "stop",
                format!("at most 4 stop strings, got {}", stops.len()),
            ));
        }
        if stops.iter().any(String::is_empty) {
            return Err(ApiError::invalid("stop", "stop strings must not be empty"));
        }
        Ok(stops)
    }

    pub fn include_usage(&self) -> bool {
        self.stream
            && self
                .stream_options
                .as_ref()
                .is_some_and(|o| o.include_usage)
    }
}

/// Without a seed each request draws its own, like OpenAI (sampled requests differ).
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatCompletionRequest {
    pub model: Option<String>,
    pub messages: Vec<Json>,
    pub tools: Option<Vec<Json>>,
    pub tool_choice: Option<Json>,
    pub parallel_tool_calls: Option<bool>,
    pub chat_template_kwargs: Option<Map<String, Json>>,
    pub max_tokens: Option<usize>,
    pub max_completion_tokens: Option<usize>,
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<usize>,
    pub response_format: Option<Json>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: Json,
    pub max_tokens: Option<usize>,
    /// Number of alternatives per token (legacy API: an integer).
    pub logprobs: Option<usize>,
    #[serde(default)]
    pub echo: bool,
    pub suffix: Option<String>,
    pub response_format: Option<Json>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

/// What `tool_choice` asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolChoice {
    Auto,
    None,
    Required,
    Named(String),
}

impl ChatCompletionRequest {
    pub fn max_new_tokens(&self) -> Option<usize> {
        self.max_completion_tokens.or(self.max_tokens)
    }

    pub fn top_logprobs(&self) -> ApiResult<Option<usize>> {
        match (self.logprobs, self.top_logprobs) {
            (_, Some(k)) if k > MAX_TOP_LOGPROBS => Err(ApiError::invalid(
                "top_logprobs",
                format!("top_logprobs must be at most {MAX_TOP_LOGPROBS}, got {k}"),
            )),
            (false, Some(_)) => Err(ApiError::invalid(
                "top_logprobs",
                "top_logprobs needs logprobs: true",
            )),
            (true, k) => Ok(Some(k.unwrap_or(0))),
            (false, None) => Ok(None),
        }
    }

    /// Checks `tools`: each `{"type": "function", "function": {"name", "parameters"?}}`.
    pub fn checked_tools(&self) -> ApiResult<Vec<Json>> {
        let tools = self.tools.clone().unwrap_or_default();
        for (i, t) in tools.iter().enumerate() {
            if t.get("type").and_then(Json::as_str) != Some("function") {
                return Err(ApiError::invalid(
                    format!("tools[{i}].type"),
                    "only tools of type `function` are supported",
                ));
            }
            let f = t
                .get("function")
                .ok_or_else(|| ApiError::invalid(format!("tools[{i}].function"), "missing"))?;
            match f.get("name").and_then(Json::as_str) {
                Some(n) if !n.is_empty() && !n.contains(['<', '>', '\n']) => {}
                _ => {
                    return Err(ApiError::invalid(
                        format!("tools[{i}].function.name"),
                        "a non-empty name without `<`, `>` or newlines is required",
                    ))
                }
            }
            if let Some(p) = f.get("parameters") {
                if !p.is_object() {
                    return Err(ApiError::invalid(
                        format!("tools[{i}].function.parameters"),
                        "must be a JSON schema object",
                    ));
                }
            }
        }
        Ok(tools)
    }

    pub fn tool_choice(&self, tools: &[Json]) -> ApiResult<ToolChoice> {
        let choice = match &self.tool_choice {
            None | Some(Json::Null) => ToolChoice::Auto,
            Some(Json::String(s)) => match s.as_str() {
                "auto" => ToolChoice::Auto,
                "none" => ToolChoice::None,
                "required" => ToolChoice::Required,
                other => {
                    return Err(ApiError::invalid(
                        "tool_choice",
                        format!(
                        "unknown tool_choice `{other}` (auto, none, required or a named function)"
                    ),
                    ))
                }
            },
            Some(obj) => match obj.pointer("/function/name").and_then(Json::as_str) {
                Some(name) => ToolChoice::Named(name.to_string()),
                None => {
                    return Err(ApiError::invalid(
                        "tool_choice",
                        "expected {\"type\": \"function\", \"function\": {\"name\": ...}}",
                    ))
                }
            },
        };
        match &choice {
            ToolChoice::Required if tools.is_empty() => Err(ApiError::invalid(
                "tool_choice",
                "tool_choice `required` needs tools",
            )),
            ToolChoice::Named(n)
                if !tools
                    .iter()
                    .any(|t| t.pointer("/function/name").and_then(Json::as_str) == Some(n)) =>
            {
                Err(ApiError::invalid(
                    "tool_choice",
                    format!("tool_choice names `{n}`, which is not in tools"),
                ))
            }
            _ => Ok(choice),
        }
    }

    /// Messages as the chat template wants them: roles checked, assistant `tool_calls`
    /// arguments (a JSON string in OpenAI's format) turned into objects, as the ZAYA1 template
    /// iterates over them.
    pub fn template_messages(&self) -> ApiResult<Vec<Json>> {
        if self.messages.is_empty() {
            return Err(ApiError::invalid(
                "messages",
                "at least one message is required",
            ));
        }
        let mut out = Vec::with_capacity(self.messages.len());
        for (i, m) in self.messages.iter().enumerate() {
            let Some(obj) = m.as_object() else {
                return Err(ApiError::invalid(
                    format!("messages[{i}]"),
                    "a message must be an object",
                ));
            };
            let role = obj.get("role").and_then(Json::as_str).unwrap_or("");
            if !matches!(role, "system" | "developer" | "user" | "assistant" | "tool") {
                return Err(ApiError::invalid(
                    format!("messages[{i}].role"),
                    format!("unknown role `{role}` (system, developer, user, assistant or tool)"),
                ));
            }
            let mut obj = obj.clone();
            if role == "developer" {
                obj.insert("role".into(), Json::String("system".into()));
            }
            match obj.get("content") {
                None | Some(Json::Null) if role == "assistant" => {}
                None | Some(Json::Null) => {
                    return Err(ApiError::invalid(
                        format!("messages[{i}].content"),
                        "missing",
                    ))
                }
                Some(Json::String(_)) => {}
                Some(Json::Array(parts)) => {
                    for (j, p) in parts.iter().enumerate() {
                        match p.get("type").and_then(Json::as_str) {
                            Some("text") if p.get("text").is_some_and(Json::is_string) => {}
                            Some("text") => return Err(ApiError::invalid(format!("messages[{i}].content[{j}].text"), "missing")),
                            other => {
                                return Err(ApiError::invalid(
                                    format!("messages[{i}].content[{j}].type"),
                                    format!("unsupported content part {other:?} (this model reads text only)"),
                                ))
                            }
                        }
                    }
                }
                Some(_) => {
                    return Err(ApiError::invalid(
                        format!("messages[{i}].content"),
                        "must be a string or a list of parts",
                    ))
                }
            }
            if role == "tool" {
                // The template prints tool content as text: flatten parts.
                if let Some(Json::Array(parts)) = obj.get("content") {
                    let text: String = parts
                        .iter()
                        .filter_map(|p| p.get("text").and_then(Json::as_str))
                        .collect();
                    obj.insert("content".into(), Json::String(text));
                }
            }
            if let Some(calls) = obj.get_mut("tool_calls") {
                let Some(calls) = calls.as_array_mut() else {
                    return Err(ApiError::invalid(
                        format!("messages[{i}].tool_calls"),
                        "must be a list",
                    ));
                };
                for (j, c) in calls.iter_mut().enumerate() {
                    let field = format!("messages[{i}].tool_calls[{j}].function");
                    let Some(f) = c.get_mut("function").and_then(Json::as_object_mut) else {
                        return Err(ApiError::invalid(field, "missing"));
                    };
                    if !f.get("name").is_some_and(Json::is_string) {
                        return Err(ApiError::invalid(format!("{field}.name"), "missing"));
                    }
                    let args = match f.get("arguments") {
                        None | Some(Json::Null) => Json::Object(Map::new()),
                        Some(Json::String(s)) if s.trim().is_empty() => Json::Object(Map::new()),
                        Some(Json::String(s)) => match serde_json::from_str::<Json>(s) {
                            Ok(v @ Json::Object(_)) => v,
                            _ => {
                                return Err(ApiError::invalid(
                                    format!("{field}.arguments"),
                                    "must be a JSON object (as a string)",
                                ))
                            }
                        },
                        Some(v @ Json::Object(_)) => v.clone(),
                        Some(_) => {
                            return Err(ApiError::invalid(
                                format!("{field}.arguments"),
                                "must be a JSON object",
                            ))
                        }
                    };
                    f.insert("arguments".into(), args);
                }
            }
            out.push(Json::Object(obj));
        }
        Ok(out)
    }
}

/// The prompts of a completion request: text or token ids, one or several.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
}

pub fn completion_prompts(prompt: &Json) -> ApiResult<Vec<Prompt>> {
    let bad = || {
        ApiError::invalid("prompt", "prompt must be a string, a list of strings, a list of token ids or a list of lists of token ids")
    };
    let ids = |v: &[Json]| -> ApiResult<Vec<u32>> {
        v.iter()
            .map(|x| {
                x.as_u64()
                    .filter(|&i| i <= u32::MAX as u64)
                    .map(|i| i as u32)
                    .ok_or_else(bad)
            })
            .collect()
    };
    let prompts = match prompt {
        Json::String(s) => vec![Prompt::Text(s.clone())],
        Json::Array(items) if items.is_empty() => return Err(bad()),
        Json::Array(items) if items.iter().all(Json::is_string) => items
            .iter()
            .map(|s| Prompt::Text(s.as_str().unwrap_or_default().to_string()))
            .collect(),
        Json::Array(items) if items.iter().all(Json::is_number) => {
            vec![Prompt::Tokens(ids(items)?)]
        }
        Json::Array(items) if items.iter().all(Json::is_array) => items
            .iter()
            .map(|r| ids(r.as_array().map(Vec::as_slice).unwrap_or_default()).map(Prompt::Tokens))
            .collect::<ApiResult<_>>()?,
        _ => return Err(bad()),
    };
    if prompts.len() > MAX_N {
        return Err(ApiError::invalid(
            "prompt",
            format!("at most {MAX_N} prompts per request"),
        ));
    }
    Ok(prompts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn chat(body: Json) -> ChatCompletionRequest {
        serde_json::from_value(body).unwrap()
    }

    #[test]
    fn tool_call_arguments_become_objects_and_roles_are_checked() {
        let r = chat(json!({"model": "m", "messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}}]},
            {"role": "tool", "tool_call_id": "c", "content": "ok"}
        ]}));
        let m = r.template_messages().unwrap();
        assert_eq!(m[0]["role"], "system");
        assert_eq!(
            m[2]["tool_calls"][0]["function"]["arguments"],
            json!({"a": 1})
        );
        let bad = chat(json!({"messages": [{"role": "wizard", "content": "x"}]}));
        assert_eq!(
            bad.template_messages().unwrap_err().param.as_deref(),
            Some("messages[0].role")
        );
        let bad = chat(
            json!({"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}]}),
        );
        assert_eq!(
            bad.template_messages().unwrap_err().param.as_deref(),
            Some("messages[0].tool_calls[0].function.arguments")
        );
        let bad = chat(json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}));
        assert!(bad.template_messages().is_err());
        assert!(chat(json!({"messages": []})).template_messages().is_err());
    }

    #[test]
    fn sampling_fields_are_checked() {
        let ok =
            chat(json!({"messages": [], "temperature": 0, "top_k": -1, "seed": -3, "stop": "x"}));
        let p = ok.sampling.sampling_params().unwrap();
        assert_eq!(p.temperature, 0.0);
        assert_eq!(p.top_k, 0);
        assert_eq!(p.seed, (-3i64) as u64);
        assert_eq!(ok.sampling.stop_strings().unwrap(), ["x"]);
        for (field, body) in [
            ("temperature", json!({"messages": [], "temperature": 3.0})),
            ("top_p", json!({"messages": [], "top_p": 0.0})),
            ("top_k", json!({"messages": [], "top_k": -5})),
            (
                "presence_penalty",
                json!({"messages": [], "presence_penalty": 9}),
            ),
        ] {
            let e = chat(body).sampling.sampling_params().unwrap_err();
            assert_eq!(e.param.as_deref(), Some(field), "{e:?}");
        }
        assert!(chat(json!({"messages": [], "n": 0})).sampling.n().is_err());
        let lp = chat(json!({"messages": [], "logprobs": true, "top_logprobs": 21}));
        assert_eq!(
            lp.top_logprobs().unwrap_err().param.as_deref(),
            Some("top_logprobs")
        );
        let lp = chat(json!({"messages": [], "logprobs": true, "top_logprobs": 3}));
        assert_eq!(lp.top_logprobs().unwrap(), Some(3));
    }

    #[test]
    fn tool_choice_forms() {
        let tools = vec![
            json!({"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}),
        ];
        let r = |c: Json| chat(json!({"messages": [], "tool_choice": c})).tool_choice(&tools);
        assert_eq!(r(json!("auto")).unwrap(), ToolChoice::Auto);
        assert_eq!(r(json!("required")).unwrap(), ToolChoice::Required);
        assert_eq!(
            r(json!({"type": "function", "function": {"name": "f"}})).unwrap(),
            ToolChoice::Named("f".into())
        );
        assert!(r(json!({"type": "function", "function": {"name": "g"}})).is_err());
        assert!(r(json!("sometimes")).is_err());
        let bad = chat(json!({"messages": [], "tools": [{"type": "retrieval"}]}));
        assert!(bad.checked_tools().is_err());
    }

    #[test]
    fn completion_prompt_forms() {
        assert_eq!(
            completion_prompts(&json!("a")).unwrap(),
            [Prompt::Text("a".into())]
        );
        assert_eq!(
            completion_prompts(&json!([1, 2])).unwrap(),
            [Prompt::Tokens(vec![1, 2])]
        );
        assert_eq!(completion_prompts(&json!([[1], [2]])).unwrap().len(), 2);
        assert!(completion_prompts(&json!([-1])).is_err());
        assert!(completion_prompts(&json!({"a": 1})).is_err());
        assert!(completion_prompts(&json!([])).is_err());
    }
}
