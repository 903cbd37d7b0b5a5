//! The routes. Each handler validates the body (OpenAI-shaped 400s naming the field), builds
//! one `GenerationRequest` per prompt, submits it and turns the engine's events into a JSON
//! answer or an SSE stream.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json as AxumJson, Router};
use serde::de::DeserializeOwned;
use serde_json::{json, Map, Value as Json};
use tokio::sync::mpsc;
use zaya::text::{ChatRequest, OutputParser, TextError, ZayaTokenizer};
use zaya_engine::{
    ConstraintFactory, Event, FinishReason, GenerationRequest, RequestHandle, SubmitError,
    TokenLogprob, Usage,
};

use crate::error::{ApiError, ApiResult};
use crate::events::{forward, Events, Tracker};
use crate::grammar::GrammarSpec;
use crate::metrics::EngineNumbers;
use crate::protocol::{
    completion_prompts, ChatCompletionRequest, CompletionRequest, Prompt, ToolChoice,
    MAX_TOP_LOGPROBS,
};
use crate::tool_stream::{Delta, StreamingParser};
use crate::AppState;

pub fn router(state: Arc<AppState>) -> Router {
    let protected = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key));
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .merge(protected)
        .fallback(|req: Request| async move { ApiError::not_found(req.uri().path()) })
        .with_state(state)
}

async fn require_key(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &st.config.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match given {
            None => {
                return ApiError::unauthorized("missing API key: send `Authorization: Bearer KEY`")
                    .into_response()
            }
            Some(k) if k.trim() != key => {
                return ApiError::unauthorized("incorrect API key").into_response()
            }
            Some(_) => {}
        }
    }
    next.run(req).await
}

async fn health(State(st): State<Arc<AppState>>) -> Response {
    if st.shutting_down.load(Ordering::SeqCst) {
        return ApiError::unavailable("shutting down").into_response();
    }
    if let Some(why) = st.engine.unavailable() {
        return ApiError::unavailable(&why).into_response();
    }
    StatusCode::OK.into_response()
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    let m = st.engine.metrics();
    let numbers = EngineNumbers {
        running: m.running,
        waiting: m.waiting,
        prompt_tokens_total: m.prompt_tokens_total,
        generation_tokens_total: m.generation_tokens_total,
        prefix_cache_hit_tokens_total: m.prefix_cache_hit_tokens_total,
        requests_total: m.requests_total,
    };
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.metrics.render(&numbers),
    )
        .into_response()
}

async fn models(State(st): State<Arc<AppState>>) -> Response {
    AxumJson(json!({"object": "list", "data": [{
        "id": st.config.served_model_name,
        "object": "model",
        "created": st.created,
        "owned_by": "zaya",
        "max_model_len": st.context,
    }]}))
    .into_response()
}

fn parse_body<T: DeserializeOwned>(body: &Bytes) -> ApiResult<T> {
    serde_json::from_slice(body).map_err(|e| {
        if e.is_syntax() || e.is_eof() {
            ApiError::bad_body(format!("the body is not valid JSON: {e}"))
        } else {
            ApiError::bad_body(format!("invalid request: {e}"))
        }
    })
}

fn check_model(st: &AppState, model: Option<&str>) -> ApiResult<()> {
    match model {
        Some(m) if m != st.config.served_model_name => {
            Err(ApiError::unknown_model(m, &st.config.served_model_name))
        }
        _ => Ok(()),
    }
}

fn text_error(param: &str, e: TextError) -> ApiError {
    match e {
        TextError::TemplateRaised { .. }
        | TextError::TemplateRender { .. }
        | TextError::Conversation(_) => ApiError::invalid(param, e.to_string()),
        other => ApiError::internal(other.to_string()),
    }
}

/// `max_tokens` checked against the context: the default fills it.
fn max_new_tokens(
    st: &AppState,
    prompt_len: usize,
    asked: Option<usize>,
    param: &str,
) -> ApiResult<usize> {
    if prompt_len >= st.context {
        return Err(ApiError::context_length(
            prompt_len,
            asked.unwrap_or(0),
            st.context,
        ));
    }
    match asked {
        Some(0) => Err(ApiError::invalid(param, "max_tokens must be at least 1")),
        Some(n) if prompt_len + n > st.context => {
            Err(ApiError::context_length(prompt_len, n, st.context))
        }
        Some(n) => Ok(n),
        None => Ok(st.context - prompt_len),
    }
}

fn submit(st: &AppState, reqs: Vec<GenerationRequest>) -> ApiResult<Vec<RequestHandle>> {
    let mut handles = Vec::with_capacity(reqs.len());
    for r in reqs {
        match st.engine.submit(r) {
            Ok(h) => handles.push(h),
            // Handles already submitted are dropped here, which cancels them.
            Err(SubmitError::QueueFull) => return Err(ApiError::queue_full()),
            Err(SubmitError::InvalidRequest(m)) => return Err(ApiError::invalid("messages", m)),
            Err(SubmitError::ShutDown) => {
                return Err(ApiError::unavailable("the server is shutting down"))
            }
        }
    }
    Ok(handles)
}

fn finish_name(reason: &FinishReason, tool_calls: bool) -> &'static str {
    match reason {
        FinishReason::Stop if tool_calls => "tool_calls",
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::Cancelled => "abort",
    }
}

fn usage_json(u: &Usage) -> Json {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    })
}

fn token_text(tok: &ZayaTokenizer, id: u32) -> String {
    tok.decode(&[id], false).unwrap_or_default()
}

/// Chat API logprob entry of one token.
fn chat_logprob(tok: &ZayaTokenizer, lp: &TokenLogprob) -> Json {
    let entry = |id: u32, logprob: f32| {
        let t = token_text(tok, id);
        json!({"token": t, "logprob": logprob, "bytes": t.as_bytes()})
    };
    let mut e = entry(lp.token, lp.logprob);
    e["top_logprobs"] = Json::Array(lp.top.iter().map(|(id, l)| entry(*id, *l)).collect());
    e
}

fn sse(data: &Json) -> Bytes {
    Bytes::from(format!("data: {data}\n\n"))
}

fn sse_response(rx: mpsc::UnboundedReceiver<Bytes>) -> Response {
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|e| ApiError::internal(e.to_string()).into_response())
}

// ---------------------------------------------------------------------------------------------
// Chat

/// Everything a chat answer needs besides the events.
struct ChatPlan {
    tools: Vec<Json>,
    parse_tools: bool,
    max_calls: Option<usize>,
    thinking_opened: bool,
    logprobs: bool,
}

impl ChatPlan {
    fn parser(&self) -> StreamingParser {
        let parser = OutputParser::new()
            .with_tools(&self.tools)
            .thinking_opened_in_prompt(self.thinking_opened);
        StreamingParser::new(
            parser,
            self.thinking_opened,
            self.parse_tools,
            self.max_calls,
        )
    }
}

/// Whether the answer is parsed for tool calls: when tools were given, unless `tool_choice`
/// is `none` (vLLM applies no tool parser then; the tools are still in the prompt).
fn parses_tool_calls(tools: &[Json], choice: &ToolChoice) -> bool {
    !tools.is_empty() && *choice != ToolChoice::None
}

async fn chat_completions(State(st): State<Arc<AppState>>, body: Bytes) -> Response {
    let start = Instant::now();
    match chat_inner(st, body, start).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

fn grammar_for(
    st: &AppState,
    spec: &GrammarSpec,
    close_thinking: bool,
) -> ApiResult<Arc<dyn ConstraintFactory>> {
    let compiler = st.grammars.as_ref().map_err(|e| {
        ApiError::invalid(
            "response_format",
            format!("constrained decoding is unavailable for this tokenizer: {e}"),
        )
    })?;
    Ok(Arc::new(compiler.compile(spec, close_thinking)?))
}

fn response_format_spec(rf: Option<&Json>) -> ApiResult<Option<GrammarSpec>> {
    let Some(rf) = rf else { return Ok(None) };
    match rf.get("type").and_then(Json::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(GrammarSpec::JsonSchema(json!({"type": "object"})))),
        Some("json_schema") => match rf.pointer("/json_schema/schema") {
            Some(s) if s.is_object() || s.is_boolean() => {
                Ok(Some(GrammarSpec::JsonSchema(s.clone())))
            }
            _ => Err(ApiError::invalid(
                "response_format.json_schema.schema",
                "a JSON schema object is required",
            )),
        },
        other => Err(ApiError::invalid(
            "response_format.type",
            format!("unsupported response_format type {other:?} (text, json_object, json_schema)"),
        )),
    }
}

async fn chat_inner(st: Arc<AppState>, body: Bytes, start: Instant) -> ApiResult<Response> {
    let req: ChatCompletionRequest = parse_body(&body)?;
    check_model(&st, req.model.as_deref())?;
    let tools = req.checked_tools()?;
    let choice = req.tool_choice(&tools)?;
    let messages = req.template_messages()?;
    let sampling = req.sampling.sampling_params()?;
    let n = req.sampling.n()?;
    let stop_strings = req.sampling.stop_strings()?;
    let top_logprobs = req.top_logprobs()?;

    let mut creq = ChatRequest::new(messages);
    creq.add_generation_prompt = true;
    // As OpenAI and vLLM: the model sees the tools whatever `tool_choice` says; with `none`
    // its output is not parsed for calls (any markup stays in `content`, as vLLM returns it).
    if !tools.is_empty() {
        creq.tools = Some(tools.clone());
    }
    let parse_tools = parses_tool_calls(&tools, &choice);
    for (k, v) in req.chat_template_kwargs.clone().unwrap_or_default() {
        match (k.as_str(), v) {
            ("enable_thinking", Json::Bool(b)) => creq.enable_thinking = Some(b),
            ("add_generation_prompt", Json::Bool(b)) => creq.add_generation_prompt = b,
            (_, v) => {
                creq.kwargs.insert(k, v);
            }
        }
    }
    let tok = st.tokenizer.clone();
    let prompt_text = tok
        .apply_chat_template(&creq)
        .map_err(|e| text_error("messages", e))?;
    let prompt = tok
        .encode(&prompt_text, false)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let thinking_opened = prompt_text.trim_end().ends_with("<think>");
    let max_tokens = max_new_tokens(&st, prompt.len(), req.max_new_tokens(), "max_tokens")?;

    let format_spec = response_format_spec(req.response_format.as_ref())?;
    let parallel = req.parallel_tool_calls.unwrap_or(true);
    let tool_spec = match &choice {
        ToolChoice::Required => Some(GrammarSpec::ToolCalls {
            tools: tools.clone(),
            parallel,
        }),
        ToolChoice::Named(name) => Some(GrammarSpec::ToolCalls {
            tools: tools
                .iter()
                .filter(|t| t.pointer("/function/name").and_then(Json::as_str) == Some(name))
                .cloned()
                .collect(),
            parallel: false,
        }),
        _ => None,
    };
    let constraint = match (format_spec, tool_spec) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "response_format",
                "response_format cannot be combined with tool_choice required or a named tool",
            ))
        }
        (Some(spec), None) | (None, Some(spec)) => Some(grammar_for(&st, &spec, thinking_opened)?),
        (None, None) => None,
    };

    let plan = ChatPlan {
        tools,
        parse_tools,
        max_calls: if parallel { None } else { Some(1) },
        thinking_opened,
        logprobs: top_logprobs.is_some(),
    };
    let greq = GenerationRequest {
        prompt,
        sampling,
        max_tokens,
        stop_token_ids: if req.sampling.ignore_eos {
            Vec::new()
        } else {
            st.stop_ids.clone()
        },
        stop_strings,
        logprobs: top_logprobs,
        n,
        constraint,
        // The markup (<think>, <zyphra_tool_call>) is made of special tokens: keep them.
        skip_special_tokens: false,
    };
    let handles = submit(&st, vec![greq])?;
    let id = format!("chatcmpl-{:x}{:08x}", st.created, st.next_id());
    let tracker = Tracker::new(st.clone(), id, start, n, 1);
    let events = forward(handles);
    if req.sampling.stream {
        Ok(chat_stream(
            st,
            tracker,
            events,
            plan,
            n,
            req.sampling.include_usage(),
        ))
    } else {
        chat_whole(st, tracker, events, plan, n).await
    }
}

/// Text, tokens and logprobs of one choice, gathered for a non-streamed answer.
#[derive(Default)]
struct ChoiceAcc {
    text: String,
    logprobs: Vec<TokenLogprob>,
    finish: Option<FinishReason>,
}

/// Runs the events to the end; `Err` on an engine error.
async fn gather(
    tracker: &mut Tracker,
    mut events: Events,
    choices_per_request: usize,
    total: usize,
) -> ApiResult<Vec<ChoiceAcc>> {
    let mut acc: Vec<ChoiceAcc> = (0..total).map(|_| ChoiceAcc::default()).collect();
    while let Some((req, ev)) = events.recv().await {
        match ev {
            Event::Token {
                choice,
                text,
                logprob,
                ..
            } => {
                let c = req * choices_per_request + choice;
                tracker.on_token(c);
                if let Some(a) = acc.get_mut(c) {
                    a.text.push_str(&text);
                    a.logprobs.extend(logprob);
                }
            }
            Event::Finished {
                choice,
                reason,
                text,
            } => {
                let c = req * choices_per_request + choice;
                if let Some(a) = acc.get_mut(c) {
                    a.text.push_str(&text);
                    a.finish = Some(reason);
                }
            }
            Event::Done { usage } => {
                if tracker.on_done(&usage) {
                    break;
                }
            }
            Event::Error { message } => {
                tracker.on_error();
                return Err(ApiError::internal(format!("generation failed: {message}")));
            }
        }
    }
    Ok(acc)
}

fn tool_call_id(request_id: &str, choice: usize, index: usize) -> String {
    format!(
        "call_{}_{choice}_{index}",
        request_id.trim_start_matches("chatcmpl-")
    )
}

async fn chat_whole(
    st: Arc<AppState>,
    mut tracker: Tracker,
    events: Events,
    plan: ChatPlan,
    n: usize,
) -> ApiResult<Response> {
    let acc = gather(&mut tracker, events, n, n).await?;
    let mut choices = Vec::with_capacity(n);
    for (i, a) in acc.into_iter().enumerate() {
        let mut parser = plan.parser();
        let mut deltas = parser.push(&a.text);
        deltas.extend(parser.finish());
        let (mut reasoning, mut content) = (String::new(), String::new());
        let mut calls: Vec<(String, String)> = Vec::new();
        for d in deltas {
            match d {
                Delta::Reasoning(s) => reasoning.push_str(&s),
                Delta::Content(s) => content.push_str(&s),
                Delta::ToolCallStart { name, .. } => calls.push((name, String::new())),
                Delta::ToolCallArguments { index, fragment } => {
                    if let Some(c) = calls.get_mut(index) {
                        c.1.push_str(&fragment);
                    }
                }
            }
        }
        let reason = a.finish.unwrap_or(FinishReason::Cancelled);
        let finish = finish_name(&reason, !calls.is_empty());
        tracker.on_finish(i, finish);
        let mut message = Map::new();
        message.insert("role".into(), json!("assistant"));
        message.insert(
            "content".into(),
            if content.is_empty() && !calls.is_empty() {
                Json::Null
            } else {
                json!(content)
            },
        );
        if plan.thinking_opened || !reasoning.is_empty() {
            message.insert("reasoning_content".into(), json!(reasoning));
            message.insert("reasoning".into(), json!(reasoning));
        }
        if !calls.is_empty() {
            let id = tracker.id.clone();
            message.insert(
                "tool_calls".into(),
                Json::Array(
                    calls
                        .into_iter()
                        .enumerate()
                        .map(|(k, (name, args))| json!({"id": tool_call_id(&id, i, k), "type": "function", "function": {"name": name, "arguments": args}}))
                        .collect(),
                ),
            );
        }
        let logprobs = if plan.logprobs {
            json!({"content": a.logprobs.iter().map(|lp| chat_logprob(&st.tokenizer, lp)).collect::<Vec<_>>()})
        } else {
            Json::Null
        };
        choices.push(
            json!({"index": i, "message": message, "logprobs": logprobs, "finish_reason": finish}),
        );
    }
    tracker.complete();
    Ok(AxumJson(json!({
        "id": tracker.id,
        "object": "chat.completion",
        "created": st.created,
        "model": st.config.served_model_name,
        "choices": choices,
        "usage": usage_json(&tracker.usage),
    }))
    .into_response())
}

fn chat_stream(
    st: Arc<AppState>,
    mut tracker: Tracker,
    mut events: Events,
    plan: ChatPlan,
    n: usize,
    include_usage: bool,
) -> Response {
    let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
    tokio::spawn(async move {
        let base = json!({"id": tracker.id, "object": "chat.completion.chunk", "created": st.created, "model": st.config.served_model_name});
        let chunk = |choice: usize, delta: Json, logprobs: Json, finish: Option<&str>| {
            let mut c = base.clone();
            c["choices"] = json!([{"index": choice, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]);
            if include_usage {
                c["usage"] = Json::Null;
            }
            sse(&c)
        };
        let mut parsers: Vec<StreamingParser> = (0..n).map(|_| plan.parser()).collect();
        let mut started = vec![false; n];
        let id = tracker.id.clone();
        let to_json = |choice: usize, d: Delta| -> Json {
            match d {
                Delta::Content(s) => json!({"content": s}),
                Delta::Reasoning(s) => json!({"reasoning_content": s, "reasoning": s}),
                Delta::ToolCallStart { index, name } => {
                    json!({"tool_calls": [{"index": index, "id": tool_call_id(&id, choice, index), "type": "function", "function": {"name": name, "arguments": ""}}]})
                }
                Delta::ToolCallArguments { index, fragment } => {
                    json!({"tool_calls": [{"index": index, "function": {"arguments": fragment}}]})
                }
            }
        };
        let mut out: VecDeque<Bytes> = VecDeque::new();
        // Also ends when the client goes away while no event comes (a queued request).
        while let Some((_, ev)) = tokio::select! {
            ev = events.recv() => ev,
            _ = tx.closed() => None,
        } {
            match ev {
                Event::Token {
                    choice,
                    text,
                    logprob,
                    ..
                } if choice < n => {
                    tracker.on_token(choice);
                    if !started[choice] {
                        started[choice] = true;
                        out.push_back(chunk(
                            choice,
                            json!({"role": "assistant", "content": ""}),
                            Json::Null,
                            None,
                        ));
                    }
                    let mut lp = match (&logprob, plan.logprobs) {
                        (Some(l), true) => json!({"content": [chat_logprob(&st.tokenizer, l)]}),
                        _ => Json::Null,
                    };
                    let deltas = parsers[choice].push(&text);
                    if deltas.is_empty() && !lp.is_null() {
                        out.push_back(chunk(choice, json!({}), lp.take(), None));
                    }
                    for d in deltas {
                        out.push_back(chunk(choice, to_json(choice, d), lp.take(), None));
                    }
                }
                Event::Finished {
                    choice,
                    reason,
                    text,
                } if choice < n => {
                    if !started[choice] {
                        started[choice] = true;
                        out.push_back(chunk(
                            choice,
                            json!({"role": "assistant", "content": ""}),
                            Json::Null,
                            None,
                        ));
                    }
                    let mut deltas = parsers[choice].push(&text);
                    deltas.extend(parsers[choice].finish());
                    for d in deltas {
                        out.push_back(chunk(choice, to_json(choice, d), Json::Null, None));
                    }
                    let finish = finish_name(&reason, parsers[choice].tool_calls() > 0);
                    tracker.on_finish(choice, finish);
                    out.push_back(chunk(choice, json!({}), Json::Null, Some(finish)));
                }
                // The last engine request of this HTTP request is done.
                Event::Done { usage } if tracker.on_done(&usage) => {
                    tracker.complete();
                    if include_usage {
                        let mut c = base.clone();
                        c["choices"] = json!([]);
                        c["usage"] = usage_json(&tracker.usage);
                        out.push_back(sse(&c));
                    }
                    out.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
                }
                Event::Error { message } => {
                    tracker.on_error();
                    out.push_back(sse(&ApiError::internal(format!(
                        "generation failed: {message}"
                    ))
                    .body()));
                    out.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
                }
                _ => {}
            }
            while let Some(b) = out.pop_front() {
                if tx.send(b).is_err() {
                    // Client gone: dropping `events` makes the forwarder cancel the request.
                    return;
                }
            }
        }
    });
    sse_response(rx)
}

// ---------------------------------------------------------------------------------------------
// Completions

async fn completions(State(st): State<Arc<AppState>>, body: Bytes) -> Response {
    let start = Instant::now();
    match completions_inner(st, body, start).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn completions_inner(st: Arc<AppState>, body: Bytes, start: Instant) -> ApiResult<Response> {
    let req: CompletionRequest = parse_body(&body)?;
    check_model(&st, req.model.as_deref())?;
    if req.suffix.is_some() {
        return Err(ApiError::invalid("suffix", "suffix is not supported"));
    }
    if let Some(k) = req.logprobs {
        if k > MAX_TOP_LOGPROBS {
            return Err(ApiError::invalid(
                "logprobs",
                format!("logprobs must be at most {MAX_TOP_LOGPROBS}, got {k}"),
            ));
        }
    }
    let sampling = req.sampling.sampling_params()?;
    let n = req.sampling.n()?;
    let stop_strings = req.sampling.stop_strings()?;
    let prompts = completion_prompts(&req.prompt)?;
    let constraint = match response_format_spec(req.response_format.as_ref())? {
        Some(spec) => Some(grammar_for(&st, &spec, false)?),
        None => None,
    };
    let tok = st.tokenizer.clone();
    let mut greqs = Vec::new();
    let mut echoes = Vec::new();
    for p in &prompts {
        let ids = match p {
            Prompt::Text(t) => tok
                .encode_prompt(t)
                .map_err(|e| ApiError::internal(e.to_string()))?,
            Prompt::Tokens(ids) => {
                if let Some(pos) = ids.iter().position(|&i| i as usize >= st.vocab_size) {
                    return Err(ApiError::invalid(
                        "prompt",
                        format!(
                            "token id {} at position {pos} is outside the vocabulary ({} ids)",
                            ids[pos], st.vocab_size
                        ),
                    ));
                }
                ids.clone()
            }
        };
        if ids.is_empty() {
            return Err(ApiError::invalid("prompt", "the prompt is empty"));
        }
        echoes.push(match p {
            Prompt::Text(t) => t.clone(),
            Prompt::Tokens(ids) => tok.decode(ids, true).unwrap_or_default(),
        });
        let max_tokens = max_new_tokens(
            &st,
            ids.len(),
            Some(req.max_tokens.unwrap_or(16)),
            "max_tokens",
        )?;
        greqs.push(GenerationRequest {
            prompt: ids,
            sampling: sampling.clone(),
            max_tokens,
            stop_token_ids: if req.sampling.ignore_eos {
                Vec::new()
            } else {
                st.stop_ids.clone()
            },
            stop_strings: stop_strings.clone(),
            logprobs: req.logprobs,
            n,
            constraint: constraint.clone(),
            skip_special_tokens: true,
        });
    }
    let engine_requests = greqs.len();
    let handles = submit(&st, greqs)?;
    let id = format!("cmpl-{:x}{:08x}", st.created, st.next_id());
    let total = n * engine_requests;
    let tracker = Tracker::new(st.clone(), id, start, total, engine_requests);
    let events = forward(handles);
    let echo = if req.echo { Some(echoes) } else { None };
    if req.sampling.stream {
        Ok(completion_stream(
            st,
            tracker,
            events,
            n,
            total,
            echo,
            req.logprobs.is_some(),
            req.sampling.include_usage(),
        ))
    } else {
        let mut tracker = tracker;
        let acc = gather(&mut tracker, events, n, total).await?;
        let choices: Vec<Json> = acc
            .into_iter()
            .enumerate()
            .map(|(i, a)| {
                let reason = a.finish.unwrap_or(FinishReason::Cancelled);
                let finish = finish_name(&reason, false);
                tracker.on_finish(i, finish);
                let text = match &echo {
                    Some(e) => format!("{}{}", e[i / n], a.text),
                    None => a.text,
                };
                let logprobs = if req.logprobs.is_some() {
                    completion_logprobs(&st.tokenizer, &a.logprobs)
                } else {
                    Json::Null
                };
                json!({"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish})
            })
            .collect();
        tracker.complete();
        Ok(AxumJson(json!({
            "id": tracker.id,
            "object": "text_completion",
            "created": st.created,
            "model": st.config.served_model_name,
            "choices": choices,
            "usage": usage_json(&tracker.usage),
        }))
        .into_response())
    }
}

/// Legacy completions logprobs: parallel lists.
fn completion_logprobs(tok: &ZayaTokenizer, lps: &[TokenLogprob]) -> Json {
    let mut offset = 0usize;
    let mut tokens = Vec::new();
    let mut token_logprobs = Vec::new();
    let mut top = Vec::new();
    let mut offsets = Vec::new();
    for lp in lps {
        let t = token_text(tok, lp.token);
        offsets.push(offset);
        offset += t.len();
        tokens.push(t);
        token_logprobs.push(lp.logprob);
        let mut m = Map::new();
        for (id, l) in &lp.top {
            m.insert(token_text(tok, *id), json!(l));
        }
        top.push(Json::Object(m));
    }
    json!({"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets})
}

#[allow(clippy::too_many_arguments)]
fn completion_stream(
    st: Arc<AppState>,
    mut tracker: Tracker,
    mut events: Events,
    n: usize,
    total: usize,
    echo: Option<Vec<String>>,
    logprobs: bool,
    include_usage: bool,
) -> Response {
    let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
    tokio::spawn(async move {
        let base = json!({"id": tracker.id, "object": "text_completion", "created": st.created, "model": st.config.served_model_name});
        let chunk = |choice: usize, text: &str, lp: Json, finish: Option<&str>| {
            let mut c = base.clone();
            c["choices"] =
                json!([{"index": choice, "text": text, "logprobs": lp, "finish_reason": finish}]);
            if include_usage {
                c["usage"] = Json::Null;
            }
            sse(&c)
        };
        let mut out: VecDeque<Bytes> = VecDeque::new();
        if let Some(e) = &echo {
            for c in 0..total {
                out.push_back(chunk(c, &e[c / n], Json::Null, None));
            }
        }
        while let Some((req, ev)) = tokio::select! {
            ev = events.recv() => ev,
            _ = tx.closed() => None,
        } {
            match ev {
                Event::Token {
                    choice,
                    text,
                    logprob,
                    ..
                } => {
                    let c = req * n + choice;
                    tracker.on_token(c);
                    let lp = match (&logprob, logprobs) {
                        (Some(l), true) => {
                            completion_logprobs(&st.tokenizer, std::slice::from_ref(l))
                        }
                        _ => Json::Null,
                    };
                    // One chunk per token, even when its text is held back (a partial
                    // character, a possible stop string): clients count tokens by chunks.
                    out.push_back(chunk(c, &text, lp, None));
                }
                Event::Finished {
                    choice,
                    reason,
                    text,
                } => {
                    let c = req * n + choice;
                    let finish = finish_name(&reason, false);
                    tracker.on_finish(c, finish);
                    out.push_back(chunk(c, &text, Json::Null, Some(finish)));
                }
                Event::Done { usage } => {
                    if tracker.on_done(&usage) {
                        tracker.complete();
                        if include_usage {
                            let mut c = base.clone();
                            c["choices"] = json!([]);
                            c["usage"] = usage_json(&tracker.usage);
                            out.push_back(sse(&c));
                        }
                        out.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
                    }
                }
                Event::Error { message } => {
                    tracker.on_error();
                    out.push_back(sse(&ApiError::internal(format!(
                        "generation failed: {message}"
                    ))
                    .body()));
                    out.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
                }
            }
            while let Some(b) = out.pop_front() {
                if tx.send(b).is_err() {
                    return;
                }
            }
        }
    });
    sse_response(rx)
}

// ---------------------------------------------------------------------------------------------
// Tokenizer routes (vLLM's shapes)

#[derive(serde::Deserialize)]
struct TokenizeRequest {
    model: Option<String>,
    prompt: Option<String>,
    messages: Option<Vec<Json>>,
    tools: Option<Vec<Json>>,
    chat_template_kwargs: Option<Map<String, Json>>,
    #[serde(default = "yes")]
    add_special_tokens: bool,
    #[serde(default = "yes")]
    add_generation_prompt: bool,
}

fn yes() -> bool {
    true
}

async fn tokenize(State(st): State<Arc<AppState>>, body: Bytes) -> Response {
    let run = || -> ApiResult<Json> {
        let req: TokenizeRequest = parse_body(&body)?;
        check_model(&st, req.model.as_deref())?;
        let tok = &st.tokenizer;
        let ids = match (req.prompt, req.messages) {
            (Some(p), None) => if req.add_special_tokens {
                tok.encode_prompt(&p)
            } else {
                tok.encode(&p, false)
            }
            .map_err(|e| ApiError::internal(e.to_string()))?,
            (None, Some(messages)) => {
                let chat: ChatCompletionRequest = serde_json::from_value(json!({"messages": messages, "tools": req.tools, "chat_template_kwargs": req.chat_template_kwargs}))
                    .map_err(|e| ApiError::bad_body(e.to_string()))?;
                let mut creq = ChatRequest::new(chat.template_messages()?);
                creq.add_generation_prompt = req.add_generation_prompt;
                creq.tools = chat.tools.clone();
                for (k, v) in chat.chat_template_kwargs.clone().unwrap_or_default() {
                    match (k.as_str(), v) {
                        ("enable_thinking", Json::Bool(b)) => creq.enable_thinking = Some(b),
                        (_, v) => {
                            creq.kwargs.insert(k, v);
                        }
                    }
                }
                tok.encode_chat(&creq)
                    .map_err(|e| text_error("messages", e))?
            }
            _ => {
                return Err(ApiError::bad_body(
                    "give exactly one of `prompt` or `messages`",
                ))
            }
        };
        Ok(json!({"count": ids.len(), "max_model_len": st.context, "tokens": ids}))
    };
    match run() {
        Ok(v) => AxumJson(v).into_response(),
        Err(e) => e.into_response(),
    }
}

#[derive(serde::Deserialize)]
struct DetokenizeRequest {
    model: Option<String>,
    tokens: Vec<u32>,
}

async fn detokenize(State(st): State<Arc<AppState>>, body: Bytes) -> Response {
    let run = || -> ApiResult<Json> {
        let req: DetokenizeRequest = parse_body(&body)?;
        check_model(&st, req.model.as_deref())?;
        if let Some(pos) = req.tokens.iter().position(|&i| i as usize >= st.vocab_size) {
            return Err(ApiError::invalid(
                "tokens",
                format!(
                    "token id {} at position {pos} is outside the vocabulary ({} ids)",
                    req.tokens[pos], st.vocab_size
                ),
            ));
        }
        let text = st
            .tokenizer
            .decode(&req.tokens, false)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        Ok(json!({"prompt": text}))
    };
    match run() {
        Ok(v) => AxumJson(v).into_response(),
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(plan: &ChatPlan, text: &str) -> (String, usize) {
        let mut p = plan.parser();
        // In pieces, as the engine streams it.
        let mut deltas = Vec::new();
        for piece in text.as_bytes().chunks(7) {
            deltas.extend(p.push(std::str::from_utf8(piece).unwrap()));
        }
        deltas.extend(p.finish());
        let content = deltas
            .iter()
            .filter_map(|d| match d {
                Delta::Content(s) => Some(s.as_str()),
                _ => None,
            })
            .collect();
        (content, p.tool_calls())
    }

    #[test]
    fn tool_choice_none_returns_call_markup_as_text() {
        let tools = vec![
            json!({"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}),
        ];
        let text = "Let me look.\n<zyphra_tool_call>\n<function=get_weather>\n<parameter=city>\nEden\n</parameter>\n</function>\n</zyphra_tool_call>";
        let plan = |choice: ToolChoice| ChatPlan {
            tools: tools.clone(),
            parse_tools: parses_tool_calls(&tools, &choice),
            max_calls: None,
            thinking_opened: false,
            logprobs: false,
        };
        assert_eq!(answer(&plan(ToolChoice::None), text), (text.to_string(), 0));
        assert_eq!(
            answer(&plan(ToolChoice::Auto), text),
            ("Let me look.".to_string(), 1)
        );
        assert!(!parses_tool_calls(&[], &ToolChoice::Auto));
    }
}
