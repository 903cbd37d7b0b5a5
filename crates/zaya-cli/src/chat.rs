//! Text in, text out: `zaya generate --prompt` and the interactive `zaya chat`.

use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use serde_json::{json, Value};

use zaya::attention::AttnImplementation;
use zaya::generation::{generate, GenerateOptions, TextChooser, TokenChooser};
use zaya::sampling::{Sampler, SamplingParams};
use zaya::text::{ChatRequest, OutputParser, StreamDecoder, ZayaTokenizer};
use zaya::ZayaModel;

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

/// Encodes a plain prompt. The ZAYA1 tokenizer's post-processor appends `<end_of_turn>`
/// after BOS + text (as the reference's integration test shows); a prompt to continue must
/// not end with an end-of-turn, so trailing EOS ids added by the post-processor are removed.
pub fn encode_prompt(tok: &ZayaTokenizer, text: &str) -> Result<Vec<u32>> {
    let mut ids = tok.encode(text, true)?;
    let plain = tok.encode(text, false)?;
    let eos = tok.eos_token_ids();
    while ids.len() > plain.len()
        && ids.last().is_some_and(|l| eos.contains(l))
        && !plain.ends_with(&ids[ids.len() - 1..])
    {
        ids.pop();
    }
    Ok(ids)
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
        .map(|p| encode_prompt(&tok, p))
        .collect::<Result<Vec<_>>>()?;
    opts.eos_token_ids = tok.stop_token_ids(&model.config().eos_token_id);
    let stream = prompts.len() == 1 && !as_json;
    let mut stdout = std::io::stdout();
    let start = Instant::now();
    let mut chooser = TextChooser::new(
        prompts.len(),
        &sampling.params(),
        Some(&tok),
        &sampling.stop,
        Box::new(|_, text: &str| {
            if stream {
                let mut out = std::io::stdout();
                let _ = out.write_all(text.as_bytes());
                let _ = out.flush();
            }
        }),
    )?;
    if stream {
        print!("{}", prompts[0]);
        stdout.flush()?;
    }
    let out = generate(model, &ids, &opts, &mut chooser, &mut |_, _| {})?;
    chooser.finish()?;
    let secs = start.elapsed().as_secs_f64();
    let n: usize = out.sequences.iter().map(Vec::len).sum();
    let texts: Vec<String> = (0..prompts.len())
        .map(|r| chooser.text(r).to_string())
        .collect();
    if as_json {
        println!(
            "{}",
            json!({
                "texts": texts,
                "sequences": out.sequences,
                "finish_reasons": out.finish_reasons.iter().map(|f| format!("{f:?}").to_lowercase()).collect::<Vec<_>>(),
            })
        );
    } else if stream {
        println!();
    } else {
        for (p, t) in prompts.iter().zip(&texts) {
            println!("{p}{t}\n");
        }
    }
    eprintln!(
        "[{n} tokens in {secs:.2} s, {:.1} tokens/s]",
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
    #[arg(long, default_value = "eager")]
    pub attn: String,
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

/// Streams an answer to the terminal: thinking dimmed (or hidden), stop tokens not shown.
struct ChatChooser<'a> {
    tok: &'a ZayaTokenizer,
    sampler: Sampler,
    stream: StreamDecoder,
    stop_ids: Vec<u32>,
    think_open: Option<u32>,
    think_close: Option<u32>,
    in_thinking: bool,
    show_thinking: bool,
    dim: bool,
    quiet: bool,
    started: bool,
}

impl TokenChooser for ChatChooser<'_> {
    fn choose(
        &mut self,
        _row: usize,
        logits: &[f32],
        context: &[u32],
    ) -> zaya::Result<(u32, bool)> {
        if !self.started {
            self.sampler.begin(context.len());
            self.started = true;
        }
        let token = self
            .sampler
            .sample(logits, context)
            .map_err(|e| zaya::ZayaError::Input(e.to_string()))?;
        if self.stop_ids.contains(&token) {
            return Ok((token, false));
        }
        let mut out = std::io::stdout();
        if Some(token) == self.think_open {
            self.in_thinking = true;
            if self.dim && self.show_thinking && !self.quiet {
                let _ = out.write_all(b"\x1b[2m");
            }
        }
        let text = self.stream.step(self.tok, token)?;
        if let Some(text) = text {
            if !self.quiet && (self.show_thinking || !self.in_thinking) {
                let _ = out.write_all(text.as_bytes());
                let _ = out.flush();
            }
        }
        if Some(token) == self.think_close {
            self.in_thinking = false;
            if self.dim && self.show_thinking && !self.quiet {
                let _ = out.write_all(b"\x1b[0m");
            }
        }
        Ok((token, false))
    }
}

pub fn run_chat(args: ChatArgs, dtype: DType, attn: AttnImplementation) -> Result<()> {
    let model_dir = match &args.model {
        Some(d) => d.clone(),
        None => crate::default_model::dir()?,
    };
    let model = ZayaModel::load(&model_dir, dtype, &Device::Cpu)?;
    let tok = ZayaTokenizer::from_dir(&model_dir)?;
    let stop_ids = tok.stop_token_ids(&model.config().eos_token_id);
    let interactive = std::io::stdin().is_terminal();
    let colour = std::io::stdout().is_terminal();
    let mut system = args.system.clone();
    let mut history: Vec<Value> = Vec::new();
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    if interactive && !args.json {
        eprintln!(
            "zaya chat: {} — /reset clears the conversation, /system TEXT sets the system prompt, /quit exits",
            model_dir.display()
        );
    }
    loop {
        if interactive {
            print!("> ");
            std::io::stdout().flush()?;
        }
        let Some(line) = lines.next() else { break };
        let line = line?;
        let line = line.trim_end_matches(['\r', '\n']);
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
        history.push(json!({"role": "user", "content": line}));
        let mut messages = Vec::new();
        if let Some(s) = &system {
            messages.push(json!({"role": "system", "content": s}));
        }
        messages.extend(history.iter().cloned());
        let mut req = ChatRequest::new(messages);
        req.add_generation_prompt = true;
        req.enable_thinking = args.enable_thinking;
        let prompt = tok.encode_chat(&req)?;
        let opts = GenerateOptions {
            max_new_tokens: args.max_new_tokens,
            eos_token_ids: stop_ids.clone(),
            attn,
            ..Default::default()
        };
        let mut chooser = ChatChooser {
            tok: &tok,
            sampler: Sampler::new(&args.sampling.params()).map_err(|e| anyhow::anyhow!("{e}"))?,
            stream: StreamDecoder::new(false),
            stop_ids: stop_ids.clone(),
            think_open: tok.token_to_id("<think>"),
            think_close: tok.token_to_id("</think>"),
            in_thinking: false,
            show_thinking: !args.hide_thinking,
            dim: colour,
            quiet: args.json,
            started: false,
        };
        let start = Instant::now();
        let out = generate(&model, &[prompt], &opts, &mut chooser, &mut |_, _| {})?;
        let secs = start.elapsed().as_secs_f64();
        if chooser.in_thinking && colour && !args.json {
            print!("\x1b[0m");
        }
        let mut tokens = out.sequences[0].clone();
        if tokens.last().is_some_and(|t| stop_ids.contains(t)) {
            tokens.pop();
        }
        let parsed = OutputParser::new().parse(&decode_answer(&tok, &tokens)?);
        let n = out.sequences[0].len();
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
            println!(
                "{}",
                json!({"content": parsed.content, "reasoning": parsed.reasoning, "tool_calls": parsed.tool_calls,
                       "warnings": parsed.warnings, "tokens": n, "tokens_per_s": tps})
            );
        } else {
            println!();
            for call in &parsed.tool_calls {
                println!(
                    "[tool call] {}({})",
                    call.name,
                    Value::Object(call.arguments.clone())
                );
            }
            let (dim, reset) = if colour {
                ("\x1b[2m", "\x1b[0m")
            } else {
                ("", "")
            };
            eprintln!("{dim}[{n} tokens, {tps:.1} tokens/s]{reset}");
        }
        std::io::stdout().flush()?;
        history.push(msg);
    }
    Ok(())
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
