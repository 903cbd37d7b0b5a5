//! Text in, text out: `zaya generate --prompt` and the interactive `zaya chat`.

use std::io::{BufRead, IsTerminal};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use serde_json::{json, Value};

use zaya::attention::AttnImplementation;
use zaya::generation::{generate, GenerateOptions, TextChooser};
use zaya::sampling::SamplingParams;
use zaya::text::{ChatRequest, OutputParser, ZayaTokenizer};
use zaya::ZayaModel;
use zaya_engine::{Engine, EngineConfig, Event, GenerationRequest};

use crate::out;

#[derive(clap::Args, Debug, Clone)]
pub struct SamplingArgs {
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// 0 disables.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    pub presence_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    pub frequency_penalty: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop when this text appears (repeatable); it is not part of the output.
    #[arg(long)]
    pub stop: Vec<String>,
}

impl SamplingArgs {
    pub fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            seed: self.seed,
        }
    }
}

/// `zaya generate --prompt ...`: streams the text of a single prompt as it is generated;
/// several prompts are generated as one batch and printed at the end.
/// `opts` carries the length, EOS handling and attention backend; the stop ids come from
/// the tokenizer files and the model config.
pub fn run_generate_text(
    model: &ZayaModel,
    model_dir: &Path,
    prompts: &[String],
    mut opts: GenerateOptions,
    sampling: &SamplingArgs,
    as_json: bool,
) -> Result<()> {
    let tok = ZayaTokenizer::from_dir(model_dir)
        .with_context(|| format!("loading the tokenizer of {}", model_dir.display()))?;
    let ids = prompts
        .iter()
        .map(|p| tok.encode_prompt(p).map_err(Into::into))
        .collect::<Result<Vec<_>>>()?;
    opts.eos_token_ids = tok.stop_token_ids(&model.config().eos_token_id);
    let stream = prompts.len() == 1 && !as_json;
    let sink = out::Sink::default();
    let start = Instant::now();
    let chooser = TextChooser::new(
        prompts.len(),
        &sampling.params(),
        Some(&tok),
        &sampling.stop,
        Box::new(|_, text: &str| {
            if stream {
                sink.write(text);
            }
        }),
    )?;
    if stream {
        out::print(&prompts[0])?;
    }
    let mut chooser = out::StopOnOutputFailure {
        inner: chooser,
        sink: &sink,
    };
    let result = generate(model, &ids, &opts, &mut chooser, &mut |_, _| {});
    // a closed or full stdout ended generation early: that is the error to report
    sink.check()?;
    let out = result?;
    let mut chooser = chooser.inner;
    chooser.finish()?;
    sink.check()?;
    let texts: Vec<String> = (0..prompts.len())
        .map(|r| chooser.text(r).to_string())
        .collect();
    let reasons: Vec<String> = out
        .finish_reasons
        .iter()
        .map(|f| format!("{f:?}").to_lowercase())
        .collect();
    print_generation(
        prompts,
        &texts,
        &out.sequences,
        &reasons,
        as_json,
        start.elapsed().as_secs_f64(),
        "",
    )
}

/// The output of `zaya generate --prompt`: `{"texts", "sequences", "finish_reasons"}` with
/// `--json`; otherwise a newline after the streamed single answer, or each prompt with its
/// answer; then the token rate on stderr (`extra` is appended inside its brackets).
pub(crate) fn print_generation(
    prompts: &[String],
    texts: &[String],
    sequences: &[Vec<u32>],
    reasons: &[impl serde::Serialize],
    as_json: bool,
    secs: f64,
    extra: &str,
) -> Result<()> {
    let stream = prompts.len() == 1 && !as_json;
    if as_json {
        out::println(
            &json!({
                "texts": texts,
                "sequences": sequences,
                "finish_reasons": reasons,
            })
            .to_string(),
        )?;
    } else if stream {
        out::println("")?;
    } else {
        for (p, t) in prompts.iter().zip(texts) {
            out::println(&format!("{p}{t}\n"))?;
        }
    }
    let n: usize = sequences.iter().map(Vec::len).sum();
    eprintln!(
        "[{n} tokens in {secs:.2} s, {:.1} tokens/s{extra}]",
        n as f64 / secs.max(1e-9)
    );
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct ChatArgs {
    /// Model directory (weights, config and tokenizer files); default: the embedded model.
    #[arg(long)]
    pub model: Option<std::path::PathBuf>,
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Attention backend: sdpa (fused, the fastest), flex or eager (the reference,
    /// used wherever attention probabilities are asked for).
    #[arg(long, default_value = "sdpa")]
    pub attn: String,
    /// A LoRA adapter directory (PEFT format), run on top of the model without merging.
    #[arg(long)]
    pub adapter: Option<std::path::PathBuf>,
    /// System prompt.
    #[arg(long)]
    pub system: Option<String>,
    /// Pass enable_thinking to the chat template (unset: the template's default).
    #[arg(long)]
    pub enable_thinking: Option<bool>,
    /// Do not print the thinking block (it is shown dimmed otherwise).
    #[arg(long)]
    pub hide_thinking: bool,
    #[arg(long, default_value_t = 512)]
    pub max_new_tokens: usize,
    /// One JSON object per answer instead of streamed text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

/// Prints an answer as the engine's events arrive: thinking dimmed (or hidden); stop tokens
/// carry no text.
struct AnswerPrinter<'a> {
    think_open: Option<u32>,
    think_close: Option<u32>,
    in_thinking: bool,
    show_thinking: bool,
    dim: bool,
    quiet: bool,
    sink: &'a out::Sink,
}

impl AnswerPrinter<'_> {
    fn token(&mut self, token: u32, text: &str) {
        if Some(token) == self.think_open {
            self.in_thinking = true;
            if self.dim && self.show_thinking && !self.quiet {
                self.sink.write("\x1b[2m");
            }
        }
        self.text(text);
        if Some(token) == self.think_close {
            self.in_thinking = false;
            if self.dim && self.show_thinking && !self.quiet {
                self.sink.write("\x1b[0m");
            }
        }
    }

    fn text(&mut self, text: &str) {
        if !text.is_empty() && !self.quiet && (self.show_thinking || !self.in_thinking) {
            self.sink.write(text);
        }
    }
}

/// Reads one line of stdin. `Ok(None)` at end of input; `Ok(Some(Err(why)))` for a line
/// that is not UTF-8 (consumed, so the session can go on).
fn read_line(input: &mut impl BufRead) -> Result<Option<std::result::Result<String, String>>> {
    let mut bytes = Vec::new();
    if input.read_until(b'\n', &mut bytes)? == 0 {
        return Ok(None);
    }
    while bytes.last().is_some_and(|&b| b == b'\n' || b == b'\r') {
        bytes.pop();
    }
    Ok(Some(String::from_utf8(bytes).map_err(|e| {
        format!(
            "the line is not valid UTF-8 (byte {}); it was ignored",
            e.utf8_error().valid_up_to()
        )
    })))
}

/// The prompt of one chat turn and the reply length it leaves room for.
struct TurnPrompt {
    ids: Vec<u32>,
    max_new_tokens: usize,
    /// Oldest turns (a user message and the answers after it) dropped to make room.
    dropped_turns: usize,
}

/// The part of the context kept free for the reply before old turns are dropped: the asked
/// length, but at most a quarter of the context (so a long `--max-new-tokens` does not
/// empty the history), and at least one token.
fn reply_reserve(max_new_tokens: usize, context: usize) -> usize {
    max_new_tokens.min(context / 4).max(1)
}

/// Removes the oldest turn of `history`: its first message and every message up to the
/// next user message.
fn drop_oldest_turn(history: &mut Vec<Value>) {
    let end = history
        .iter()
        .skip(1)
        .position(|m| m["role"] == "user")
        .map_or(history.len(), |p| p + 1);
    history.drain(..end);
}

/// Renders `system` + `history` (whose last message is the new user message) and drops the
/// oldest turns from `history` until the prompt leaves room for the reply. The reply gets
/// what is left of the context, up to `max_new_tokens`. A new message that alone does not
/// fit is an error (and `history` is left as it was).
fn fit_history(
    tok: &ZayaTokenizer,
    system: Option<&str>,
    history: &mut Vec<Value>,
    enable_thinking: Option<bool>,
    max_new_tokens: usize,
    context: usize,
) -> Result<TurnPrompt> {
    let reserve = reply_reserve(max_new_tokens, context);
    let render = |history: &[Value]| -> Result<Vec<u32>> {
        let mut messages = Vec::new();
        if let Some(s) = system {
            messages.push(json!({"role": "system", "content": s}));
        }
        messages.extend(history.iter().cloned());
        let mut req = ChatRequest::new(messages);
        req.add_generation_prompt = true;
        req.enable_thinking = enable_thinking;
        Ok(tok.encode_chat(&req)?)
    };
    let mut kept = history.clone();
    let mut dropped = 0;
    loop {
        let ids = render(&kept)?;
        if ids.len() + reserve <= context {
            *history = kept;
            return Ok(TurnPrompt {
                max_new_tokens: max_new_tokens.min(context - ids.len()),
                ids,
                dropped_turns: dropped,
            });
        }
        if kept.len() <= 1 {
            bail!(
                "the message is too long: its prompt has {} tokens, the model's context is {context} and {reserve} are kept for the reply",
                ids.len()
            );
        }
        drop_oldest_turn(&mut kept);
        dropped += 1;
    }
}

pub fn run_chat(args: ChatArgs, dtype: DType, attn: AttnImplementation) -> Result<()> {
    let model_dir = match &args.model {
        Some(d) => d.clone(),
        None => crate::default_model::dir()?,
    };
    let model = Arc::new(crate::lora_cmds::with_adapter(
        ZayaModel::load(&model_dir, dtype, &Device::Cpu)?,
        args.adapter.as_deref(),
    )?);
    let tok = Arc::new(ZayaTokenizer::from_dir(&model_dir)?);
    let stop_ids = tok.stop_token_ids(&model.config().eos_token_id);
    // The conversation runs on the engine so that each turn reuses the earlier turns' prompt
    // state from its prefix cache instead of computing the whole history again.
    let engine = Engine::start(
        model.clone(),
        Some(tok.clone()),
        EngineConfig {
            max_running: 1,
            attn,
            ..Default::default()
        },
    )?;
    let interactive = std::io::stdin().is_terminal();
    let colour = std::io::stdout().is_terminal();
    let mut system = args.system.clone();
    let mut history: Vec<Value> = Vec::new();
    let stdin = std::io::stdin();
    let mut input = stdin.lock();
    if interactive && !args.json {
        eprintln!(
            "zaya chat: {} — /reset clears the conversation, /system TEXT sets the system prompt, /quit exits",
            model_dir.display()
        );
    }
    let sink = out::Sink::default();
    loop {
        if interactive {
            out::print("> ")?;
        }
        let line = match read_line(&mut input)? {
            None => break,
            Some(Ok(line)) => line,
            Some(Err(why)) => {
                eprintln!("error: {why}");
                continue;
            }
        };
        let line = line.as_str();
        if line.trim().is_empty() {
            continue;
        }
        match line.trim() {
            "/quit" | "/exit" => break,
            "/reset" => {
                history.clear();
                if !args.json {
                    eprintln!("(conversation cleared)");
                }
                continue;
            }
            cmd if cmd.starts_with("/system") => {
                let text = cmd.trim_start_matches("/system").trim();
                system = (!text.is_empty()).then(|| text.to_string());
                history.clear();
                if !args.json {
                    eprintln!(
                        "(system prompt {}; conversation cleared)",
                        if system.is_some() { "set" } else { "removed" }
                    );
                }
                continue;
            }
            cmd if cmd.starts_with('/') => {
                eprintln!("unknown command {cmd} (try /reset, /system TEXT, /quit)");
                continue;
            }
            _ => {}
        }
        let mut turn_history = history.clone();
        turn_history.push(json!({"role": "user", "content": line}));
        let answer = fit_history(
            &tok,
            system.as_deref(),
            &mut turn_history,
            args.enable_thinking,
            args.max_new_tokens,
            model.config().max_position_embeddings,
        )
        .and_then(|prompt| {
            if prompt.dropped_turns > 0 {
                eprintln!(
                    "(context full: the oldest {} turn(s) of the conversation were dropped)",
                    prompt.dropped_turns
                );
            }
            if prompt.max_new_tokens < args.max_new_tokens {
                eprintln!(
                    "(the reply is limited to {} tokens by the context)",
                    prompt.max_new_tokens
                );
            }
            let request = GenerationRequest {
                sampling: args.sampling.params(),
                stop_token_ids: stop_ids.clone(),
                stop_strings: args.sampling.stop.clone(),
                skip_special_tokens: false,
                ..GenerationRequest::new(prompt.ids, prompt.max_new_tokens)
            };
            answer_turn(&engine, &tok, &args, &sink, colour, request)
        });
        // the terminal is gone: nothing more can be shown, end the session
        sink.check()?;
        match answer {
            Ok(msg) => {
                history = turn_history;
                history.push(msg);
            }
            // the conversation is kept as it was before this message
            Err(e) => {
                eprintln!("error: {e:#} (the message was not added; the conversation is kept)")
            }
        }
    }
    Ok(())
}

/// Generates, streams and prints one answer; returns the assistant message for the history.
fn answer_turn(
    engine: &Engine,
    tok: &ZayaTokenizer,
    args: &ChatArgs,
    sink: &out::Sink,
    colour: bool,
    request: GenerationRequest,
) -> Result<Value> {
    let stop_ids = request.stop_token_ids.clone();
    let mut printer = AnswerPrinter {
        think_open: tok.token_to_id("<think>"),
        think_close: tok.token_to_id("</think>"),
        in_thinking: false,
        show_thinking: !args.hide_thinking,
        dim: colour,
        quiet: args.json,
        sink,
    };
    let start = Instant::now();
    let handle = engine.submit(request).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut generated = Vec::new();
    let mut cached = 0;
    while let Some(event) = handle.recv() {
        match event {
            Event::Token { token, text, .. } => {
                generated.push(token);
                printer.token(token, &text);
                // stdout gone: stop generating (the session ends with the output error)
                if sink.has_failed() {
                    handle.cancel();
                }
            }
            Event::Finished { text, .. } => printer.text(&text),
            Event::Done { usage } => cached = usage.cached_tokens,
            Event::Error { message } => bail!("generation failed: {message}"),
        }
    }
    let secs = start.elapsed().as_secs_f64();
    if printer.in_thinking && colour && !args.json {
        sink.write("\x1b[0m");
    }
    let n = generated.len();
    let mut tokens = generated;
    if tokens.last().is_some_and(|t| stop_ids.contains(t)) {
        tokens.pop();
    }
    let parsed = OutputParser::new().parse(&decode_answer(tok, &tokens)?);
    let tps = n as f64 / secs.max(1e-9);
    let mut msg = json!({"role": "assistant", "content": parsed.content});
    if let Some(r) = &parsed.reasoning {
        msg["reasoning_content"] = json!(r);
    }
    if !parsed.tool_calls.is_empty() {
        msg["tool_calls"] = json!(parsed
            .tool_calls
            .iter()
            .map(|c| json!({"type": "function", "function": {"name": c.name, "arguments": c.arguments}}))
            .collect::<Vec<_>>());
    }
    if args.json {
        sink.write(
            &(json!({"content": parsed.content, "reasoning": parsed.reasoning, "tool_calls": parsed.tool_calls,
                   "warnings": parsed.warnings, "tokens": n, "tokens_per_s": tps,
                   "cached_prompt_tokens": cached})
            .to_string()
                + "\n"),
        );
    } else {
        sink.write("\n");
        for call in &parsed.tool_calls {
            sink.write(&format!(
                "[tool call] {}({})\n",
                call.name,
                Value::Object(call.arguments.clone())
            ));
        }
        let (dim, reset) = if colour {
            ("\x1b[2m", "\x1b[0m")
        } else {
            ("", "")
        };
        eprintln!("{dim}[{n} tokens, {tps:.1} tokens/s, {cached} prompt tokens cached]{reset}");
    }
    Ok(msg)
}

/// Decodes an answer keeping the thinking and tool-call markup (special tokens the output
/// parser reads) and dropping every other special token.
fn decode_answer(tok: &ZayaTokenizer, ids: &[u32]) -> Result<String> {
    let keep: Vec<u32> = [
        "<think>",
        "</think>",
        "<zyphra_tool_call>",
        "</zyphra_tool_call>",
    ]
    .iter()
    .filter_map(|t| tok.token_to_id(t))
    .collect();
    let visible: Vec<u32> = ids
        .iter()
        .copied()
        .filter(|id| !tok.is_special_id(*id) || keep.contains(id))
        .collect();
    Ok(tok.decode(&visible, false)?)
}

pub fn check_prompts(prompts: &[String]) -> Result<()> {
    if prompts.iter().any(|p| p.is_empty()) {
        bail!("--prompt must not be empty");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> ZayaTokenizer {
        ZayaTokenizer::from_dir(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/text/tokenizer"),
        )
        .unwrap()
    }

    fn turn(i: usize) -> [Value; 2] {
        [
            json!({"role": "user", "content": format!("question number {i} about the garden")}),
            json!({"role": "assistant", "content": format!("answer {i}: ").repeat(20)}),
        ]
    }

    #[test]
    fn oldest_turns_are_dropped_until_the_reply_fits() {
        let tok = tokenizer();
        let mut history: Vec<Value> = (0..8).flat_map(turn).collect();
        history.push(json!({"role": "user", "content": "and now?"}));
        let full = fit_history(
            &tok,
            Some("Be brief."),
            &mut history.clone(),
            None,
            64,
            100_000,
        )
        .unwrap();
        assert_eq!(full.dropped_turns, 0);
        assert_eq!(full.max_new_tokens, 64);
        // a context that holds about half of the conversation
        let context = full.ids.len() / 2 + 64;
        let fitted =
            fit_history(&tok, Some("Be brief."), &mut history, None, 512, context).unwrap();
        assert!(fitted.dropped_turns > 0);
        assert!(fitted.ids.len() + reply_reserve(512, context) <= context);
        assert_eq!(fitted.max_new_tokens, 512.min(context - fitted.ids.len()));
        // whole turns went, oldest first; the new message stays last
        assert_eq!(history.len(), 17 - 2 * fitted.dropped_turns);
        assert_eq!(history[0]["role"], "user");
        assert_eq!(history.last().unwrap()["content"], "and now?");
        assert!(history[0]["content"]
            .as_str()
            .unwrap()
            .contains(&format!("number {}", fitted.dropped_turns)));
    }

    #[test]
    fn a_message_that_alone_does_not_fit_is_an_error_and_changes_nothing() {
        let tok = tokenizer();
        let mut history: Vec<Value> = turn(0).into();
        history.push(json!({"role": "user", "content": "word ".repeat(400)}));
        let before = history.clone();
        let err = fit_history(&tok, None, &mut history, None, 32, 128)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("too long") && err.contains("128"), "{err}");
        assert_eq!(history, before);
    }

    #[test]
    fn replies_keep_at_least_one_token_and_at_most_a_quarter_of_the_context() {
        assert_eq!(reply_reserve(512, 2048), 512);
        assert_eq!(reply_reserve(4096, 2048), 512);
        assert_eq!(reply_reserve(0, 2048), 1);
        assert_eq!(reply_reserve(usize::MAX, 3), 1);
    }

    #[test]
    fn lines_that_are_not_utf8_are_reported_and_skipped() {
        let mut input: &[u8] = b"hello\r\nbad \xff line\nlast";
        assert_eq!(read_line(&mut input).unwrap(), Some(Ok("hello".into())));
        let bad = read_line(&mut input).unwrap().unwrap().unwrap_err();
        assert!(bad.contains("byte 4"), "{bad}");
        assert_eq!(read_line(&mut input).unwrap(), Some(Ok("last".into())));
        assert_eq!(read_line(&mut input).unwrap(), None);
    }
}
