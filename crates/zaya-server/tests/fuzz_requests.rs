//! Fuzzing of the request bodies of `POST /v1/chat/completions` and `POST /v1/completions`:
//! the JSON is decoded into the request types and every field check the handlers run before
//! a request reaches the engine is applied (sampling, `n`, stop strings, logprobs, tools,
//! `tool_choice`, the messages handed to the chat template, the completion prompt forms).
//! Each body must end in a request or an OpenAI-shaped error, never a panic.
//!
//! `cargo test -p zaya-server --test fuzz_requests` runs 10 000 mutated bodies per endpoint;
//! `-- --ignored` the long run (1 000 000; `ZAYA_FUZZ_INPUTS` / `ZAYA_FUZZ_SEED` change it).

use serde_json::json;
use zaya_fuzz::{check, Input, ParseError, Target};
use zaya_server::protocol::{completion_prompts, ChatCompletionRequest, CompletionRequest};

fn api(e: zaya_server::ApiError) -> ParseError {
    format!("{e:?}").into()
}

struct ChatBody;

impl Target for ChatBody {
    fn name(&self) -> &'static str {
        "chat_request"
    }

    fn seeds(&self) -> Vec<Input> {
        let weather = json!({"type": "function", "function": {"name": "get_weather",
            "description": "Weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                "days": {"type": "integer", "minimum": 1}}, "required": ["city"]}}});
        let bodies = [
            json!({"model": "zaya-default", "messages": [{"role": "user", "content": "Hi"}]}),
            json!({"model": "zaya-default",
                "messages": [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
                    {"role": "assistant", "content": null, "tool_calls": [{"id": "call_0",
                        "type": "function", "function": {"name": "get_weather",
                        "arguments": "{\"city\": \"Paris\"}"}}]},
                    {"role": "tool", "tool_call_id": "call_0", "content": "sunny"}],
                "tools": [weather], "tool_choice": "auto", "parallel_tool_calls": true,
                "temperature": 0.7, "top_p": 0.9, "top_k": 20, "min_p": 0.05, "seed": 7,
                "presence_penalty": 0.5, "frequency_penalty": 0.2, "repetition_penalty": 1.1,
                "stop": ["\n\n", "END"], "max_completion_tokens": 64, "n": 2,
                "logprobs": true, "top_logprobs": 5, "stream": true,
                "stream_options": {"include_usage": true},
                "chat_template_kwargs": {"enable_thinking": false}}),
            json!({"messages": [{"role": "user", "content": "JSON please"}],
                "response_format": {"type": "json_schema", "json_schema": {"name": "x",
                    "schema": {"type": "object", "properties": {"a": {"type": "number"}}}}},
                "tools": [weather],
                "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
                "max_tokens": 16, "ignore_eos": true}),
        ];
        bodies
            .iter()
            .map(|b| vec![serde_json::to_vec(b).unwrap()])
            .collect()
    }

    fn run(&self, input: &Input) -> Result<(), ParseError> {
        let req: ChatCompletionRequest = serde_json::from_slice(&input[0])?;
        req.sampling.sampling_params().map_err(api)?;
        req.sampling.n().map_err(api)?;
        req.sampling.stop_strings().map_err(api)?;
        req.sampling.include_usage();
        req.top_logprobs().map_err(api)?;
        let tools = req.checked_tools().map_err(api)?;
        req.tool_choice(&tools).map_err(api)?;
        req.template_messages().map_err(api)?;
        Ok(())
    }
}

struct CompletionBody;

impl Target for CompletionBody {
    fn name(&self) -> &'static str {
        "completion_request"
    }

    fn seeds(&self) -> Vec<Input> {
        let bodies = [
            json!({"model": "zaya-default", "prompt": "And God said", "max_tokens": 8,
                "temperature": 0}),
            json!({"prompt": ["a", "b"], "n": 2, "logprobs": 3, "echo": true,
                "stop": "\n", "seed": 1, "stream": true}),
            json!({"prompt": [[1, 2, 3], [4, 5]], "max_tokens": 4}),
            json!({"prompt": [7, 8, 9], "suffix": "x", "top_p": 0.5}),
        ];
        bodies
            .iter()
            .map(|b| vec![serde_json::to_vec(b).unwrap()])
            .collect()
    }

    fn run(&self, input: &Input) -> Result<(), ParseError> {
        let req: CompletionRequest = serde_json::from_slice(&input[0])?;
        req.sampling.sampling_params().map_err(api)?;
        req.sampling.n().map_err(api)?;
        req.sampling.stop_strings().map_err(api)?;
        completion_prompts(&req.prompt).map_err(api)?;
        Ok(())
    }
}

#[test]
fn fuzz_chat_request() {
    check(&ChatBody, 10_000, 1);
}

#[test]
fn fuzz_completion_request() {
    check(&CompletionBody, 10_000, 1);
}

#[test]
#[ignore = "long fuzz run (1M inputs): cargo test -p zaya-server --release --test fuzz_requests -- --ignored"]
fn fuzz_long_chat_request() {
    check(&ChatBody, 1_000_000, 2);
}

#[test]
#[ignore = "long fuzz run (1M inputs): cargo test -p zaya-server --release --test fuzz_requests -- --ignored"]
fn fuzz_long_completion_request() {
    check(&CompletionBody, 1_000_000, 2);
}
