//! The `zaya` command. Subcommands with a stable interface (tests and external checks drive
//! them): `forward`, `generate`, `inspect`, `init`, `convert`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::{Parser, Subcommand};
use serde::Deserialize;

use zaya::attention::AttnImplementation;
use zaya::generation::{generate, GenerateOptions};
use zaya::weights::{self, Checkpoint, Layout};
use zaya::{Capture, ForwardOptions, ZayaConfig, ZayaModel};

mod bench;
mod bench_engine;
mod bench_mesh;
mod chat;
mod default_model;
mod grpo_cmds;
mod lora_cmds;
mod memory;
mod out;
mod parallel_cmds;
mod quant_cmds;
mod serve;
mod text_cmds;
mod train_cmds;
mod train_parallel;
mod train_run;

#[derive(Parser)]
#[command(name = "zaya", version, about = "Run, inspect and create ZAYA1 models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one forward pass and write logits (and captures) to a safetensors file.
    /// `--router-logits` also writes `expert_choice.{l}` [B·T] (num_experts = skip).
    Forward(ForwardArgs),
    /// Generate tokens (greedy) and print {"sequences": [[new ids], ...]}.
    Generate(GenerateArgs),
    /// Print the layout, parameter counts and dtypes of a checkpoint.
    Inspect { dir: PathBuf },
    /// Write a randomly initialised model (native layout) from a config.
    Init(InitArgs),
    /// Convert a checkpoint between the native and legacy layouts.
    Convert(ConvertArgs),
    /// Measure load time, prefill and decode throughput and peak memory.
    Bench(bench::BenchArgs),
    /// Chat with the model in the terminal (its chat template, streamed answers).
    Chat(chat::ChatArgs),
    /// List the kernels, their implementations on this machine and the one selected.
    Kernels,
    /// Fine-tune on JSONL data (text, chat with tools, or pre-tokenized).
    Train(train_run::TrainArgs),
    /// Print the token ids of a text: {"ids": [...]}.
    Tokenize(text_cmds::TokenizeArgs),
    /// Print the text of token ids: {"text": "..."}.
    Detokenize(text_cmds::DetokenizeArgs),
    /// Render a conversation with the model's chat template, exactly.
    Template(text_cmds::TemplateArgs),
    /// Split generated text into content, reasoning and tool calls.
    Parse(text_cmds::ParseArgs),
    /// Write a checkpoint as one GGUF file with quantized weights (config, tokenizer and
    /// chat template included); every `--model` option loads it.
    Quantize(quant_cmds::QuantizeArgs),
    /// Perplexity, KL divergence and top-1 agreement against a reference on held-out text.
    Eval(quant_cmds::EvalArgs),
    /// Throughput and latency of the continuous-batching engine at several concurrencies.
    BenchEngine(bench_engine::BenchEngineArgs),
    /// Serve the model over an OpenAI-compatible HTTP API.
    Serve(serve::ServeArgs),
    /// Print how a model splits over a --tp × --pp × --ep × --dp mesh: what each rank holds
    /// and its memory.
    Plan(parallel_cmds::PlanArgs),
    /// Start a command on several ranks: `zaya launch --nproc 4 [--backend mpi|local] --
    /// forward --tp 4 ...` (the torchrun of zaya).
    Launch(parallel_cmds::LaunchArgs),
    /// Prefill and decode throughput and per-rank weight memory of a --tp/--pp/--ep mesh on
    /// local ranks, against one rank in the same run.
    BenchParallel(parallel_cmds::BenchParallelArgs),
    /// Merge a LoRA adapter (PEFT format) into a model: W + scale · B A, written as a model.
    Merge(lora_cmds::MergeArgs),
    /// TRL's GRPO policy loss (and with --grads every parameter's gradient) for given
    /// prompts, completions and advantages.
    GrpoLoss(grpo_cmds::GrpoLossArgs),
    /// Reinforcement fine-tuning with GRPO: rollouts on the same weights, rewards (built-in
    /// or a process), tool environments, TRL's loss.
    Grpo(Box<grpo_cmds::GrpoArgs>),
}

#[derive(clap::Args)]
struct ModelArgs {
    /// Model directory (config.json + safetensors [+ tokenizer files]); default: the
    /// embedded default model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Weight dtype: f32, bf16 or f16 (the residual stream stays f32).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Attention backend: sdpa (fused, the fastest), flex or eager (the reference,
    /// used wherever attention probabilities are asked for).
    #[arg(long, default_value = "sdpa")]
    attn: String,
    /// Quantize the projections, experts and embeddings while loading, for this run only
    /// (a `zaya quantize` format: q8_0, q4_k, ..., or a mix: q4_k_m, q5_k_m).
    #[arg(long)]
    quant: Option<String>,
    /// A LoRA adapter directory in PEFT's format (adapter_config.json +
    /// adapter_model.safetensors), run on top of the base without merging.
    #[arg(long)]
    adapter: Option<PathBuf>,
}

#[derive(clap::Args)]
struct ForwardArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// {"input_ids": [[..]], "attention_mask": [[..]]}
    #[arg(long)]
    inputs: PathBuf,
    #[arg(long)]
    out: PathBuf,
    #[arg(long)]
    hidden_states: bool,
    #[arg(long)]
    attentions: bool,
    #[arg(long)]
    router_logits: bool,
    /// With "labels" in IN.json: also write `grad.<hf parameter name>` for every parameter
    /// (with --adapter: `grad.<PEFT key>` for every adapter weight, the base frozen).
    #[arg(long)]
    grads: bool,
    /// Compute the gradients with gradient checkpointing (every layer).
    #[arg(long)]
    checkpointing: bool,
    #[command(flatten)]
    parallel: parallel_cmds::ParallelArgs,
}

#[derive(clap::Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Token ids: {"input_ids": [[..]], "attention_mask": [[..]]}; prints {"sequences": ...}.
    #[arg(long, conflicts_with = "prompt", required_unless_present = "prompt")]
    inputs: Option<PathBuf>,
    /// Text prompt (repeatable: several prompts run as one batch); needs the tokenizer files
    /// in the model directory. The text is streamed as it is generated.
    #[arg(long)]
    prompt: Vec<String>,
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    #[arg(long)]
    ignore_eos: bool,
    /// With --prompt: print {"texts", "sequences", "finish_reasons"} instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    sampling: chat::SamplingArgs,
    #[command(flatten)]
    parallel: parallel_cmds::ParallelArgs,
}

#[derive(clap::Args)]
struct InitArgs {
    #[arg(long)]
    config: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long)]
    out: PathBuf,
    /// Stored dtype of the weights.
    #[arg(long, default_value = "f32")]
    dtype: String,
}

#[derive(clap::Args)]
struct ConvertArgs {
    #[arg(long)]
    from: PathBuf,
    #[arg(long)]
    to: PathBuf,
    /// Target layout: native or legacy.
    #[arg(long, default_value = "native")]
    layout: String,
    /// Store the weights in this dtype (f32, bf16, f16); default: as they are.
    #[arg(long)]
    dtype: Option<String>,
}

#[derive(Deserialize)]
struct Inputs {
    input_ids: Vec<Vec<i64>>,
    attention_mask: Option<Vec<Vec<i64>>>,
}

pub(crate) fn parse_dtype(s: &str) -> Result<DType> {
    Ok(match s {
        "f32" | "float32" => DType::F32,
        "bf16" | "bfloat16" => DType::BF16,
        "f16" | "float16" => DType::F16,
        other => bail!("unknown dtype `{other}` (expected f32, bf16 or f16)"),
    })
}

fn parse_attn(s: &str) -> Result<AttnImplementation> {
    AttnImplementation::parse(s)
        .with_context(|| format!("unknown attention backend `{s}` (expected eager, sdpa or flex)"))
}

fn read_inputs(path: &Path) -> Result<Inputs> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let inputs: Inputs =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    if inputs.input_ids.is_empty() {
        bail!("{}: input_ids is empty", path.display());
    }
    let t = inputs.input_ids[0].len();
    if inputs.input_ids.iter().any(|r| r.len() != t) {
        bail!(
            "{}: rows of input_ids differ in length (pad them and give an attention_mask)",
            path.display()
        );
    }
    if let Some(m) = &inputs.attention_mask {
        if m.len() != inputs.input_ids.len() || m.iter().any(|r| r.len() != t) {
            bail!(
                "{}: attention_mask must have the shape of input_ids",
                path.display()
            );
        }
    }
    Ok(inputs)
}

impl ModelArgs {
    fn dir(&self) -> Result<PathBuf> {
        match &self.model {
            Some(d) => Ok(d.clone()),
            None => default_model::dir(),
        }
    }
}

/// The model the flags ask for, with its adapter attached when `--adapter` is given.
fn load_model(args: &ModelArgs) -> Result<ZayaModel> {
    lora_cmds::with_adapter(load_base(args)?, args.adapter.as_deref())
}

/// The model without its adapter.
fn load_base(args: &ModelArgs) -> Result<ZayaModel> {
    let dtype = parse_dtype(&args.dtype)?;
    let plan = match &args.quant {
        Some(f) => Some(zaya::quant::QuantPlan::named(f)?),
        None => None,
    };
    Ok(ZayaModel::load_quantized(
        args.dir()?,
        dtype,
        &Device::Cpu,
        plan.as_ref(),
    )?)
}

fn cmd_forward(args: ForwardArgs) -> Result<()> {
    let inputs = read_inputs(&args.inputs)?;
    if args.parallel.is_parallel() {
        let labels = train_cmds::has_labels(&args.inputs)?;
        if args.grads && !labels {
            bail!("--grads needs \"labels\" in {}", args.inputs.display());
        }
        if labels && parse_dtype(&args.model.dtype)? != DType::F32 {
            // the loss and gradients come from the training code, which keeps f32 weights
            bail!(
                "inputs with \"labels\" (loss, --grads) run in f32 with parallel ranks (asked --dtype {})",
                args.model.dtype
            );
        }
        // TP / EP meshes (one replica, any number of stages): the loss and gradients of the
        // TP ranks; pipeline-only meshes: by the pipeline stages (below)
        let shape = args.parallel.mesh()?;
        let tp_labels =
            if labels && shape.dp == 1 && (shape.pp == 1 || shape.tp > 1 || shape.ep > 1) {
                Some(parallel_cmds::Labelled {
                    batch: train_cmds::read_batch(&args.inputs)?,
                    grads: args.grads,
                    checkpointing: if args.checkpointing {
                        zaya::train::Checkpointing::EveryLayer
                    } else {
                        zaya::train::Checkpointing::Off
                    },
                })
            } else {
                None
            };
        if args.model.quant.is_some() || args.model.adapter.is_some() {
            bail!("--quant and --adapter cannot be combined with parallel ranks");
        }
        let dev = Device::Cpu;
        let opts = ForwardOptions {
            attention_mask: inputs
                .attention_mask
                .map(|m| Tensor::new(m, &dev))
                .transpose()?,
            capture: Capture {
                hidden_states: args.hidden_states,
                attentions: args.attentions,
            },
            // attention probabilities come from the eager attention (as on one rank)
            attn: if args.attentions {
                AttnImplementation::Eager
            } else {
                parse_attn(&args.model.attn)?
            },
            ..Default::default()
        };
        parallel_cmds::forward_parallel(
            &args.model.dir()?,
            &args.parallel,
            parse_dtype(&args.model.dtype)?,
            &Tensor::new(inputs.input_ids, &dev)?,
            &opts,
            zaya_dist::MeshCapture {
                router_logits: args.router_logits,
            },
            tp_labels.as_ref(),
            &args.out,
        )?;
        if labels && tp_labels.is_none() {
            // loss (and gradients) by pipeline stages, added to the logits file
            let mut tensors: BTreeMap<String, Tensor> =
                candle_core::safetensors::load(&args.out, &dev)?
                    .into_iter()
                    .collect();
            tensors.extend(train_parallel::labelled_outputs_on_stages(
                &args.model.dir()?,
                &args.inputs,
                &args.parallel,
                args.grads,
                args.checkpointing,
            )?);
            candle_core::safetensors::save(&tensors.into_iter().collect(), &args.out)
                .with_context(|| format!("writing {}", args.out.display()))?;
        }
        return Ok(());
    }
    let base = load_base(&args.model)?;
    let model = lora_cmds::with_adapter(base.clone(), args.model.adapter.as_deref())?;
    let dev = Device::Cpu;
    let ids = Tensor::new(inputs.input_ids.clone(), &dev)?;
    let opts = ForwardOptions {
        attention_mask: inputs
            .attention_mask
            .map(|m| Tensor::new(m, &dev))
            .transpose()?,
        capture: Capture {
            hidden_states: args.hidden_states,
            attentions: args.attentions,
        },
        attn: if args.attentions {
            AttnImplementation::Eager
        } else {
            parse_attn(&args.model.attn)?
        },
        ..Default::default()
    };
    let out = model.forward(&ids, None, &opts)?;
    let mut tensors: BTreeMap<String, Tensor> = BTreeMap::new();
    tensors.insert(
        "logits".into(),
        out.logits.expect("lm head ran").to_dtype(DType::F32)?,
    );
    for (i, h) in out.hidden_states.iter().enumerate() {
        tensors.insert(format!("hidden_states.{i}"), h.to_dtype(DType::F32)?);
    }
    for (i, a) in out.attentions.iter().enumerate() {
        tensors.insert(format!("attentions.{i}"), a.to_dtype(DType::F32)?);
    }
    if args.router_logits {
        for (i, r) in out.routing.iter().enumerate() {
            tensors.insert(format!("router_logits.{i}"), r.logits.to_dtype(DType::F32)?);
            // chosen class per token; num_experts means the skip expert
            let choice: Vec<i64> = r.choice.iter().map(|&c| c as i64).collect();
            tensors.insert(format!("expert_choice.{i}"), Tensor::new(choice, &dev)?);
        }
    }
    if let (true, Some(adapter)) = (
        train_cmds::has_labels(&args.inputs)?,
        args.model.adapter.as_deref(),
    ) {
        // adapter gradients over the frozen base as loaded (--dtype / --quant)
        let batch = train_cmds::read_batch(&args.inputs)?;
        tensors.extend(lora_cmds::forward_with_labels(
            &base,
            adapter,
            &batch,
            args.grads,
            args.checkpointing,
        )?);
    } else if train_cmds::has_labels(&args.inputs)? {
        // loss (and, with --grads, gradients) computed on f32 master weights
        tensors.extend(train_cmds::forward_with_labels(
            &args.model.dir()?,
            &args.inputs,
            args.grads,
            args.checkpointing,
        )?);
    } else if args.grads {
        bail!("--grads needs \"labels\" in {}", args.inputs.display());
    }
    candle_core::safetensors::save(&tensors.into_iter().collect(), &args.out)
        .with_context(|| format!("writing {}", args.out.display()))?;
    Ok(())
}

fn cmd_generate(args: GenerateArgs) -> Result<()> {
    if args.parallel.is_parallel() {
        let Some(inputs_path) = &args.inputs else {
            return parallel_cmds::generate_text_on_mesh(
                &args.model.dir()?,
                &args.parallel,
                parse_dtype(&args.model.dtype)?,
                parse_attn(&args.model.attn)?,
                &args.prompt,
                args.max_new_tokens,
                args.ignore_eos,
                &args.sampling,
                args.json,
            );
        };
        if args.sampling.params().temperature > 0.0 {
            bail!("generation with parallel ranks is greedy in this version (no --temperature)");
        }
        let inputs = read_inputs(inputs_path)?;
        return parallel_cmds::generate_parallel(
            &args.model.dir()?,
            &args.parallel,
            parse_dtype(&args.model.dtype)?,
            &inputs.input_ids,
            inputs.attention_mask.as_deref(),
            args.max_new_tokens,
            args.ignore_eos,
            parse_attn(&args.model.attn)?,
        );
    }
    let model = load_model(&args.model)?;
    let Some(inputs_path) = &args.inputs else {
        chat::check_prompts(&args.prompt)?;
        let opts = GenerateOptions {
            max_new_tokens: args.max_new_tokens,
            ignore_eos: args.ignore_eos,
            attn: parse_attn(&args.model.attn)?,
            ..Default::default()
        };
        return chat::run_generate_text(
            &model,
            &args.model.dir()?,
            &args.prompt,
            opts,
            &args.sampling,
            args.json,
        );
    };
    let inputs = read_inputs(inputs_path)?;
    let prompts: Vec<Vec<u32>> = match &inputs.attention_mask {
        Some(mask) => inputs
            .input_ids
            .iter()
            .zip(mask)
            .map(|(ids, m)| {
                ids.iter()
                    .zip(m)
                    .filter(|(_, &m)| m != 0)
                    .map(|(&i, _)| i as u32)
                    .collect()
            })
            .collect(),
        None => inputs
            .input_ids
            .iter()
            .map(|r| r.iter().map(|&i| i as u32).collect())
            .collect(),
    };
    for (row, p) in inputs.input_ids.iter().enumerate() {
        if let Some(pos) = p
            .iter()
            .position(|&i| i < 0 || i as usize >= model.config().vocab_size)
        {
            return Err(zaya::ZayaError::TokenOutOfRange {
                id: p[pos],
                row,
                position: pos,
                vocab_size: model.config().vocab_size,
            }
            .into());
        }
    }
    let opts = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        eos_token_ids: model.config().eos_token_id.clone(),
        ignore_eos: args.ignore_eos,
        attn: parse_attn(&args.model.attn)?,
        ..Default::default()
    };
    // temperature 0 (the default) is greedy
    let mut chooser = zaya::generation::TextChooser::new(
        prompts.len(),
        &args.sampling.params(),
        None,
        &[],
        Box::new(|_, _| {}),
    )?;
    let out = generate(&model, &prompts, &opts, &mut chooser, &mut |_, _| {})?;
    out::println(&serde_json::json!({ "sequences": out.sequences }).to_string())?;
    Ok(())
}

fn cmd_inspect(dir: PathBuf) -> Result<()> {
    let ckpt = Checkpoint::open(&dir)?;
    let cfg = ckpt.config()?;
    ckpt.validate(&cfg)?;
    let specs = weights::native_specs(&cfg);
    let count = |s: &weights::TensorSpec| s.shape.iter().product::<usize>();
    let total: usize = specs.iter().map(count).sum();
    let expert: usize = specs.iter().filter(|s| s.expert).map(count).sum();
    let embed = cfg.vocab_size * cfg.hidden_size;
    // Per token: everything but the experts, plus one expert per layer (top-1).
    let active = total - expert + expert / cfg.num_experts;
    let report = serde_json::json!({
        "dir": dir.display().to_string(),
        "layout": ckpt.layout().as_str(),
        "tensors": ckpt.num_tensors(),
        "dtypes": ckpt.dtypes(),
        "layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "experts": cfg.num_experts,
        "parameters": {
            "total": total,
            "total_without_embedding": total - embed,
            "active_per_token": active,
            "active_per_token_without_embedding": active - embed,
        },
    });
    out::println(&serde_json::to_string_pretty(&report)?)?;
    Ok(())
}

fn cmd_init(args: InitArgs) -> Result<()> {
    let cfg = ZayaConfig::from_file(&args.config)?;
    let dtype = parse_dtype(&args.dtype)?;
    // Streams tensor by tensor: an 8B model is written without being held in memory.
    let n = zaya::init::write_random_checkpoint(
        &args.out,
        &cfg,
        args.seed,
        dtype,
        zaya::safetensors_io::DEFAULT_SHARD_BYTES,
    )?;
    eprintln!("wrote {n} tensors to {}", args.out.display());
    Ok(())
}

fn cmd_convert(args: ConvertArgs) -> Result<()> {
    let layout = match args.layout.as_str() {
        "native" => Layout::Native,
        "legacy" => Layout::Legacy,
        other => bail!("unknown layout `{other}` (expected native or legacy)"),
    };
    let dtype = args.dtype.as_deref().map(parse_dtype).transpose()?;
    weights::convert_with_dtype(&args.from, &args.to, layout, dtype)?;
    Ok(())
}

/// The error and its causes on one line, each said once: a library error that already
/// prints its source (`path: cause`) is not followed by the cause again.
fn error_text(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let part = cause.to_string();
        if text.contains(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}

/// Writes the thread count into `RAYON_NUM_THREADS` when nothing set it. candle 0.11 asks
/// for its thread count on every matmul, and without the variable it counts the physical
/// cores by parsing `/proc/cpuinfo` each time (perf: ~5 % of a decode step in the kernel's
/// `show_cpuinfo`). The value is the kernels' own count (`CANDLE_NUM_THREADS`, else the
/// CPUs this process may run on). Runs before any thread starts.
fn pin_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var(
            "RAYON_NUM_THREADS",
            zaya::kernels::num_threads().to_string(),
        );
    }
}

fn main() {
    memory::configure();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ZAYA_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Command::Bench(b) = &cli.command {
        if let Some(n) = b.threads {
            // candle sizes its thread pools from these on first use: set them before any work.
            std::env::set_var("CANDLE_NUM_THREADS", n.to_string());
            std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        }
    }
    pin_thread_count();
    let result = match cli.command {
        Command::Forward(a) => cmd_forward(a),
        Command::Generate(a) => cmd_generate(a),
        Command::Inspect { dir } => cmd_inspect(dir),
        Command::Init(a) => cmd_init(a),
        Command::Convert(a) => cmd_convert(a),
        Command::Chat(a) => parse_dtype(&a.dtype).and_then(|d| {
            let attn = parse_attn(&a.attn)?;
            chat::run_chat(a, d, attn)
        }),
        Command::Train(a) => train_run::run_train(a),
        Command::Kernels => {
            out::print(&zaya::kernels::registry::KernelTable::current().to_string())
                .map_err(Into::into)
        }
        Command::Tokenize(a) => text_cmds::run_tokenize(a),
        Command::Detokenize(a) => text_cmds::run_detokenize(a),
        Command::Template(a) => text_cmds::run_template(a),
        Command::Parse(a) => text_cmds::run_parse(a),
        Command::Quantize(a) => quant_cmds::run_quantize(a),
        Command::Eval(a) => quant_cmds::run_eval(a),
        Command::Serve(a) => serve::run_serve(a),
        Command::Plan(a) => parallel_cmds::run_plan(a),
        Command::Launch(a) => parallel_cmds::run_launch(a),
        Command::BenchParallel(a) => parallel_cmds::run_bench_parallel(a),
        Command::Merge(a) => lora_cmds::run_merge(a),
        Command::GrpoLoss(a) => grpo_cmds::run_grpo_loss(a),
        Command::Grpo(a) => grpo_cmds::run_grpo(*a),
        Command::Bench(a) if a.parallel.is_parallel() => bench_mesh::run(a),
        Command::Bench(a) if a.train => {
            parse_attn(&a.attn).and_then(|attn| bench::run_train(a, attn))
        }
        Command::Bench(a) => parse_dtype(&a.dtype).and_then(|d| {
            let attn = parse_attn(&a.attn)?;
            bench::run(a, d, attn)
        }),
        Command::BenchEngine(a) => parse_dtype(&a.dtype).and_then(|d| {
            let attn = parse_attn(&a.attn)?;
            bench_engine::run(a, d, attn)
        }),
    };
    if let Err(e) = result {
        if out::is_closed_pipe(&e) {
            // the reader has what it wanted (`| head`): a quiet, successful exit
            std::process::exit(0);
        }
        eprintln!("error: {}", error_text(&e));
        std::process::exit(1);
    }
}
