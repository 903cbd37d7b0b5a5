//! Text subcommands of `zaya` (stable interface; JSON on stdout):
//!
//! * `zaya tokenize --model DIR --text "..." [--no-special]` → `{"ids": [...]}`
//! * `zaya detokenize --model DIR --ids 1,2,3 [--skip-special]` → `{"text": "..."}`
//! * `zaya template --model DIR --conversation CONV.json [--add-generation-prompt]
//!   [--enable-thinking true|false]` → the rendered prompt, exactly (no newline added)
//! * `zaya parse --text "..." [--thinking-in-prompt] [--tools TOOLS.json]` →
//!   `{"content", "reasoning", "tool_calls": [{"name", "arguments"}], "warnings"}`
//!
//! Wire-up in main.rs: `mod text_cmds;`, subcommand variants `Tokenize(text_cmds::TokenizeArgs)`,
//! `Detokenize(text_cmds::DetokenizeArgs)`, `Template(text_cmds::TemplateArgs)`,
//! `Parse(text_cmds::ParseArgs)`, each dispatched to the `run_*` function of the same name.

use std::path::PathBuf;

use anyhow::{Context, Result};
use serde_json::{json, Value};
use zaya::text::{ChatRequest, OutputParser, ZayaTokenizer};

#[derive(clap::Args, Debug)]
pub struct TokenizeArgs {
    /// Model or tokenizer directory (tokenizer.json, tokenizer_config.json, ...).
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub text: String,
    /// Do not add special tokens (BOS / EOS from the tokenizer's post-processor).
    #[arg(long)]
    pub no_special: bool,
}

pub fn run_tokenize(args: TokenizeArgs) -> Result<()> {
    let tok = ZayaTokenizer::from_dir(&args.model)?;
    let ids = tok.encode(&args.text, !args.no_special)?;
    crate::out::println(&json!({ "ids": ids }).to_string())?;
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct DetokenizeArgs {
    #[arg(long)]
    pub model: PathBuf,
    /// Comma-separated token ids.
    #[arg(long, value_delimiter = ',', num_args = 0..)]
    pub ids: Vec<u32>,
    /// Drop special tokens from the text.
    #[arg(long)]
    pub skip_special: bool,
}

pub fn run_detokenize(args: DetokenizeArgs) -> Result<()> {
    let tok = ZayaTokenizer::from_dir(&args.model)?;
    // The model's padded vocabulary rows (ids past the tokenizer's) decode to nothing, as
    // in transformers and in `generate` / `chat`; only ids the model cannot produce fail.
    let config = args.model.join("config.json");
    let model_vocab = if config.exists() {
        zaya::ZayaConfig::from_file(&config)?.vocab_size
    } else {
        tok.vocab_size()
    };
    tok.check_ids_for_model(&args.ids, model_vocab)?;
    let text = tok.decode(&args.ids, args.skip_special)?;
    crate::out::println(&json!({ "text": text }).to_string())?;
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct TemplateArgs {
    #[arg(long)]
    pub model: PathBuf,
    /// `{"messages": [...], "tools": [...]}` (OpenAI / HF format; other keys become template
    /// keyword arguments).
    #[arg(long)]
    pub conversation: PathBuf,
    #[arg(long)]
    pub add_generation_prompt: bool,
    /// Omitted: `enable_thinking` stays undefined in the template (unless CONV.json sets it).
    #[arg(long)]
    pub enable_thinking: Option<bool>,
}

pub fn run_template(args: TemplateArgs) -> Result<()> {
    let tok = ZayaTokenizer::from_dir(&args.model)?;
    let mut req = ChatRequest::from_json_file(&args.conversation)?;
    if args.add_generation_prompt {
        req.add_generation_prompt = true;
    }
    if let Some(t) = args.enable_thinking {
        req.kwargs.remove("enable_thinking");
        req.enable_thinking = Some(t);
    }
    let prompt = tok.apply_chat_template(&req)?;
    crate::out::print(&prompt)?;
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct ParseArgs {
    /// Generated text, decoded with special tokens kept and the stop token cut off.
    #[arg(long)]
    pub text: String,
    /// The prompt opened `<think>` (thinking enabled), so the output may lack the opening tag.
    #[arg(long)]
    pub thinking_in_prompt: bool,
    /// JSON list of the request's tool schemas: parameters typed "string" stay strings.
    #[arg(long)]
    pub tools: Option<PathBuf>,
}

pub fn run_parse(args: ParseArgs) -> Result<()> {
    let mut parser = OutputParser::new().thinking_opened_in_prompt(args.thinking_in_prompt);
    if let Some(path) = &args.tools {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let tools: Vec<Value> = serde_json::from_str(&text)
            .with_context(|| format!("{}: expected a JSON list of tool schemas", path.display()))?;
        parser = parser.with_tools(&tools);
    }
    crate::out::println(&serde_json::to_string(&parser.parse(&args.text))?)?;
    Ok(())
}
