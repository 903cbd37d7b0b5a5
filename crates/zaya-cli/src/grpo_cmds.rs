//! `zaya grpo-loss` (TRL's GRPO policy loss and gradients for given token ids) and
//! `zaya grpo` (reinforcement fine-tuning; the loop lives in the `zaya-train` crate).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use candle_core::{DType, Device};

use zaya::text::ZayaTokenizer;
use zaya::train::schedule::CosineSchedule;
use zaya::train::trainer::{Trainer, TrainerConfig};
use zaya::train::{Trainable, TrainableModel};
use zaya::ZayaModel;
use zaya_train::grpo::{read_prompts, GrpoConfig, GrpoRun};
use zaya_train::rewards::{builtin, parse_reward_spec, ProcessReward, Reward};
use zaya_train::{grpo_loss_outputs, GrpoInputs, LossConfig};

/// The loss settings shared by `grpo` and `grpo-loss` (defaults of TRL 1.16 `GRPOConfig`).
#[derive(clap::Args, Debug, Clone)]
pub struct LossFlags {
    /// dapo, grpo, dr_grpo, bnpo, cispo, sapo or luspo.
    #[arg(long, default_value = "dapo")]
    pub loss_type: String,
    /// KL coefficient to the frozen starting model (0: no reference model).
    #[arg(long, default_value_t = 0.0)]
    pub beta: f64,
    /// Lower clipping range of the ratio.
    #[arg(long, default_value_t = 0.2)]
    pub epsilon: f64,
    /// Upper clipping range (default: --epsilon, as TRL); for cispo the ratio cap.
    #[arg(long)]
    pub epsilon_high: Option<f64>,
    /// token or sequence.
    #[arg(long, default_value = "token")]
    pub importance_sampling: String,
    /// Two-sided clipping cap of the ratio (off by default).
    #[arg(long)]
    pub delta: Option<f64>,
    /// Do not multiply the per-token KL by the importance ratio (TRL's use_bias_correction_kl=False).
    #[arg(long)]
    pub no_bias_correction_kl: bool,
}

impl LossFlags {
    pub fn config(&self, max_completion_length: usize, temperature: f64) -> Result<LossConfig> {
        let cfg = LossConfig {
            loss_type: self.loss_type.parse()?,
            beta: self.beta,
            epsilon_low: self.epsilon,
            epsilon_high: self.epsilon_high.unwrap_or(self.epsilon),
            importance_sampling: self.importance_sampling.parse()?,
            delta: self.delta,
            use_bias_correction_kl: !self.no_bias_correction_kl,
            max_completion_length,
            temperature,
            ..Default::default()
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

#[derive(clap::Args, Debug)]
pub struct GrpoLossArgs {
    /// Model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// {"prompt_ids", "completion_ids", "completion_mask", "advantages"[, "old_logps",
    /// "ref_logps", "tool_mask"]}: prompts unpadded, completions right-padded.
    #[arg(long)]
    pub inputs: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub loss: LossFlags,
    /// dr_grpo's divisor (default: the completion width).
    #[arg(long)]
    pub max_completion_length: Option<usize>,
    /// Temperature the logits are divided by.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Also write grad.<HF parameter name> for every parameter.
    #[arg(long)]
    pub grads: bool,
}

pub fn run_grpo_loss(args: GrpoLossArgs) -> Result<()> {
    let model = TrainableModel::load(&args.model)
        .with_context(|| format!("loading {}", args.model.display()))?;
    let text = std::fs::read_to_string(&args.inputs)
        .with_context(|| format!("reading {}", args.inputs.display()))?;
    let inputs = GrpoInputs::from_json(&text, model.config().vocab_size)
        .with_context(|| format!("{}", args.inputs.display()))?;
    let width = args.max_completion_length.unwrap_or(inputs.width());
    let cfg = args.loss.config(width, args.temperature)?;
    let tensors = grpo_loss_outputs(&model, &inputs, &cfg, args.grads)?;
    candle_core::safetensors::save(&tensors.into_iter().collect(), &args.out)
        .with_context(|| format!("writing {}", args.out.display()))?;
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct GrpoArgs {
    /// Starting model (weights, config and tokenizer files); default: the embedded model.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Prompts, JSONL: `prompt` (text) or `messages` (+ `tools`), plus any other columns.
    #[arg(long)]
    pub data: PathBuf,
    /// Run directory: checkpoints, grpo.csv, reward.svg and the exported model in `final/`.
    #[arg(long)]
    pub out: PathBuf,
    /// Built-in reward NAME[:WEIGHT] (exact, regex, tool_call, json_schema, format); repeatable.
    #[arg(long = "reward")]
    pub rewards: Vec<String>,
    /// Pattern of the `regex` reward (default: the row's `regex` column).
    #[arg(long)]
    pub regex: Option<String>,
    /// External reward process (JSON lines in, one number or null per line out).
    #[arg(long)]
    pub reward_cmd: Option<String>,
    /// Weight of --reward-cmd.
    #[arg(long, default_value_t = 1.0)]
    pub reward_cmd_weight: f64,
    /// Tool environment process (tool calls in, tool results out, JSON lines).
    #[arg(long)]
    pub env_cmd: Option<String>,
    #[arg(long, default_value_t = 1)]
    pub max_tool_turns: usize,
    /// Seconds a reward or environment process may take per answer.
    #[arg(long, default_value_t = 30.0)]
    pub process_timeout: f64,
    #[arg(long, default_value_t = 8)]
    pub num_generations: usize,
    #[arg(long, default_value_t = 512)]
    pub max_completion_length: usize,
    #[command(flatten)]
    pub loss: LossFlags,
    /// group, batch or none.
    #[arg(long, default_value = "group")]
    pub scale_rewards: String,
    #[arg(long, default_value_t = 1)]
    pub num_iterations: usize,
    #[arg(long)]
    pub mask_truncated_completions: bool,
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// Completions per micro-batch (per_device_train_batch_size).
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Optimizer steps to take.
    #[arg(long, default_value_t = 100)]
    pub max_steps: u64,
    #[arg(long, default_value_t = 1e-6)]
    pub lr: f64,
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: u64,
    /// Floor of the cosine decay as a fraction of --lr (1 = constant).
    #[arg(long, default_value_t = 1.0)]
    pub min_lr_ratio: f64,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// Gradient checkpointing: off, every or K.
    #[arg(long, default_value = "off")]
    pub checkpointing: String,
    /// Router balance loss weight (default 0: TRL adds it only when the config asks for router logits).
    #[arg(long, default_value_t = 0.0)]
    pub aux_loss_coef: f64,
    /// Attention backend of the rollouts: eager, sdpa or flex.
    #[arg(long, default_value = "sdpa")]
    pub attn: String,
    /// Save a checkpoint every N generation batches.
    #[arg(long, default_value_t = 50)]
    pub save_every: u64,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    #[arg(long)]
    pub resume: bool,
    /// Train a LoRA adapter instead of every weight, as `zaya train --lora`:
    /// `r=16,alpha=32,dropout=0.05,targets=q_proj,k_proj,...,experts,rslora`. The base stays
    /// frozen in `--dtype` (or `--quant`: QLoRA) and is also the KL reference (adapters
    /// disabled); rollouts run on the base with the live adapter attached; checkpoints and
    /// `final/` hold the adapter in PEFT's format.
    #[arg(long)]
    pub lora: Option<String>,
    /// With --lora: dtype the frozen base is held in (f32, bf16, f16).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// With --lora: quantize the frozen base while loading (q8_0, q4_k, ...): QLoRA.
    #[arg(long)]
    pub quant: Option<String>,
    /// With --lora: refuse the run when the memory estimate exceeds this many GiB (default:
    /// the memory available now, MemAvailable).
    #[arg(long)]
    pub memory_budget_gib: Option<f64>,
}

fn run_facts(args: &GrpoArgs, data: &[u8]) -> serde_json::Value {
    let mut facts = serde_json::json!({
        "data_bytes": data.len(),
        "data_hash": format!("{:016x}", data.iter().fold(0xcbf29ce484222325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100000001b3))),
        "num_generations": args.num_generations,
        "batch_size": args.batch_size,
        "grad_accum": args.grad_accum,
        "num_iterations": args.num_iterations,
        "seed": args.seed,
    });
    if let Some(spec) = &args.lora {
        facts["lora"] = serde_json::json!(spec);
    }
    facts
}

/// The trainer settings the flags ask for.
fn trainer_config<M: Trainable>(model: &M, args: &GrpoArgs) -> Result<TrainerConfig> {
    let mut c = TrainerConfig::new(model, args.lr);
    c.schedule = CosineSchedule {
        peak_lr: args.lr,
        warmup_steps: args.warmup_steps,
        total_steps: args.max_steps,
        min_lr_ratio: args.min_lr_ratio,
    };
    c.adamw.weight_decay = args.weight_decay;
    c.max_grad_norm = Some(args.max_grad_norm);
    c.checkpointing = crate::train_run::parse_checkpointing(&args.checkpointing)?;
    c.aux_loss_coef = args.aux_loss_coef;
    Ok(c)
}

/// What every GRPO run needs before a model is loaded.
struct Setup {
    model_dir: PathBuf,
    cfg: GrpoConfig,
    tok: Arc<ZayaTokenizer>,
    prompts: Vec<zaya_train::rollout::Prompt>,
    rewards: Vec<(Box<dyn Reward>, f64)>,
    env: Option<zaya_train::process::JsonLinesProcess>,
    facts: serde_json::Value,
    log: PathBuf,
}

fn setup(args: &GrpoArgs) -> Result<Setup> {
    let model_dir = match &args.model {
        Some(d) => d.clone(),
        None => crate::default_model::dir()?,
    };
    let tok = Arc::new(
        ZayaTokenizer::from_dir(&model_dir)
            .with_context(|| format!("loading the tokenizer of {}", model_dir.display()))?,
    );
    let data =
        std::fs::read(&args.data).with_context(|| format!("reading {}", args.data.display()))?;
    let text = String::from_utf8(data.clone())
        .with_context(|| format!("{} is not UTF-8", args.data.display()))?;
    let prompts = read_prompts(&args.data, &text, &tok)?;
    let timeout = Duration::from_secs_f64(args.process_timeout.max(0.001));
    let mut rewards: Vec<(Box<dyn Reward>, f64)> = Vec::new();
    for spec in &args.rewards {
        let (name, w) = parse_reward_spec(spec)?;
        rewards.push((builtin(&name, args.regex.as_deref())?, w));
    }
    if let Some(cmd) = &args.reward_cmd {
        rewards.push((
            Box::new(ProcessReward::start(cmd, timeout)?),
            args.reward_cmd_weight,
        ));
    }
    let env = args
        .env_cmd
        .as_deref()
        .map(|c| zaya_train::process::JsonLinesProcess::start("environment", c, timeout))
        .transpose()?;
    let cfg = GrpoConfig {
        loss: args
            .loss
            .config(args.max_completion_length, args.temperature)?,
        num_generations: args.num_generations,
        batch_size: args.batch_size,
        grad_accum: args.grad_accum,
        num_iterations: args.num_iterations,
        scale_rewards: args.scale_rewards.parse()?,
        mask_truncated_completions: args.mask_truncated_completions,
        top_p: args.top_p,
        top_k: args.top_k,
        min_p: args.min_p,
        repetition_penalty: args.repetition_penalty,
        max_tool_turns: if args.env_cmd.is_some() {
            args.max_tool_turns
        } else {
            0
        },
        seed: args.seed,
        aux_loss_coef: args.aux_loss_coef,
        attn: args.attn.clone(),
    };
    cfg.validate()?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    Ok(Setup {
        facts: run_facts(args, &data),
        log: args.out.join("grpo.csv"),
        model_dir,
        cfg,
        tok,
        prompts,
        rewards,
        env,
    })
}

/// The resumed trainer (`--resume` and a checkpoint in `--out`) or a new one.
fn start_trainer<M: Trainable>(
    args: &GrpoArgs,
    s: &Setup,
    load: impl FnOnce(&Path) -> zaya::Result<M>,
    fresh: impl FnOnce() -> Result<M>,
) -> Result<Trainer<M>> {
    let found = if args.resume {
        let found = Trainer::<M>::find_checkpoint_of(&args.out)?;
        if found.is_none() {
            eprintln!(
                "{}: no checkpoint to resume from; starting at step 0",
                args.out.display()
            );
        }
        found
    } else {
        None
    };
    let trainer = match found {
        Some(dir) => {
            let mut t = Trainer::resume_with(&dir, load)?;
            if let Some(saved) = t.run_facts() {
                if saved != &s.facts {
                    anyhow::bail!(
                        "cannot resume {}: the data, group/batch sizes, iterations, seed or --lora differ from the checkpoint's ({saved} vs {})",
                        dir.display(),
                        s.facts
                    );
                }
            }
            let c = trainer_config(t.model(), args)?;
            t.set_config(c)?;
            let trimmed = zaya::train::trainer::trim_log(&s.log, t.steps())?;
            eprintln!(
                "resuming at step {} from {} ({trimmed} log row(s) after it removed)",
                t.steps(),
                dir.display()
            );
            t
        }
        None => {
            if s.log.exists() {
                std::fs::remove_file(&s.log)?;
            }
            let model = fresh()?;
            let c = trainer_config(&model, args)?;
            Trainer::new(model, c)?
        }
    };
    Ok(trainer.with_run_facts(s.facts.clone()))
}

pub fn run_grpo(args: GrpoArgs) -> Result<()> {
    if args.lora.is_none() && (args.quant.is_some() || args.dtype != "f32") {
        anyhow::bail!("--dtype and --quant choose how the frozen base of a --lora run is held; full fine-tuning keeps f32 master weights");
    }
    let s = setup(&args)?;
    if let Some(spec) = args.lora.clone() {
        return run_grpo_lora(&args, s, &spec);
    }
    let trainer = start_trainer(
        &args,
        &s,
        |d| TrainableModel::load(d),
        || Ok(TrainableModel::load(&s.model_dir)?),
    )?;
    // the starting weights, frozen (f32 as the trained copy)
    let reference = if args.loss.beta > 0.0 {
        Some(ZayaModel::load(&s.model_dir, DType::F32, &Device::Cpu)?)
    } else {
        None
    };
    let (steps, final_dir) = drive(&args, s, trainer, reference)?;
    eprintln!(
        "done: {steps} steps; model in {}, log {}, curve {}",
        final_dir.display(),
        args.out.join("grpo.csv").display(),
        args.out.join("reward.svg").display()
    );
    Ok(())
}

/// `--lora`: the base loaded frozen as `--dtype` / `--quant` say, the adapter trained. The KL
/// reference is the base itself (adapters disabled); nothing of the base is copied.
fn run_grpo_lora(args: &GrpoArgs, s: Setup, spec: &str) -> Result<()> {
    use zaya::lora::memory::{adapter_parameters, base_bytes, RunShape};
    use zaya::lora::{attach_lora, LoraAdapter, LoraConfig, LoraModel};

    let mut lora = LoraConfig::parse_spec(spec)?;
    lora.base_model = Some(s.model_dir.display().to_string());
    let dtype = crate::parse_dtype(&args.dtype)?;
    let plan = match &args.quant {
        Some(f) => Some(zaya::quant::QuantPlan::named(f)?),
        None => None,
    };
    let model_cfg = zaya::ZayaConfig::from_file(s.model_dir.join("config.json"))?;
    let trainable = adapter_parameters(&model_cfg, &lora)?;
    let longest_prompt = s.prompts.iter().map(|p| p.ids.len()).max().unwrap_or(0);
    let shape = RunShape {
        batch: args.batch_size,
        seq_len: longest_prompt + args.max_completion_length,
        checkpointing: crate::train_run::parse_checkpointing(&args.checkpointing)?,
        act_bytes: crate::lora_cmds::act_bytes(dtype),
        loss_chunk: zaya::train::TrainOptions::for_config(&model_cfg).loss_chunk,
    };
    let label = format!(
        "GRPO, LoRA r={} over a {} base",
        lora.r,
        args.quant.clone().unwrap_or_else(|| args.dtype.clone())
    );
    // Before the base is loaded: a clear refusal instead of an OOM kill half-way.
    crate::lora_cmds::memory_check(
        &model_cfg,
        base_bytes(&model_cfg, dtype, plan.as_ref()) as usize,
        trainable as usize,
        shape,
        &label,
        args.memory_budget_gib,
    )?;
    let base = ZayaModel::load_quantized(&s.model_dir, dtype, &Device::Cpu, plan.as_ref())
        .with_context(|| format!("loading {}", s.model_dir.display()))?;
    eprintln!(
        "base: {:.2} GiB held (also the KL reference, adapters disabled); adapter: {} sites, {} trainable weights",
        base.weight_bytes() as f64 / (1u64 << 30) as f64,
        zaya::lora::plan(base.config(), &lora)?.len(),
        trainable
    );
    let seed = args.seed;
    let trainer = start_trainer(
        args,
        &s,
        |d| {
            let adapter = LoraAdapter::load(d, base.config())?;
            LoraModel::from_adapter(&base, &adapter, seed)
        },
        || Ok(attach_lora(&base, &lora, seed)?),
    )?;
    let (steps, final_dir) = drive(args, s, trainer, None)?;
    eprintln!(
        "done: {steps} steps; adapter (PEFT format) in {}, log {}, curve {}",
        final_dir.display(),
        args.out.join("grpo.csv").display(),
        args.out.join("reward.svg").display()
    );
    Ok(())
}

/// The GRPO loop, the last checkpoint, the reward curve and the export to `final/` (the model
/// with its tokenizer files, or the adapter); returns the steps taken and `final/`.
fn drive<M: Trainable>(
    args: &GrpoArgs,
    s: Setup,
    trainer: Trainer<M>,
    reference: Option<ZayaModel>,
) -> Result<(u64, PathBuf)> {
    let eos = trainer.model().config().eos_token_id.clone();
    let mut run = GrpoRun {
        cfg: s.cfg,
        trainer,
        reference,
        stop_token_ids: s.tok.stop_token_ids(&eos),
        tokenizer: s.tok,
        prompts: s.prompts,
        rewards: s.rewards,
        env: s.env,
        out: args.out.clone(),
        save_every: args.save_every,
    };
    let names: Vec<String> = run
        .rewards
        .iter()
        .map(|(r, _)| r.name().to_string())
        .collect();
    run.run(args.max_steps, |r| {
        let per: Vec<String> = names
            .iter()
            .zip(&r.reward_per_func)
            .map(|(n, m)| format!("{n} {m:.3}"))
            .collect();
        eprintln!(
            "step {}: reward {:.3} ± {:.3} [{}] loss {:.4} kl {:.4} clip {:.3} len {:.1} entropy {:.3} | gen {:.1}s score {:.2}s train {:.1}s",
            r.step,
            r.reward,
            r.reward_std,
            per.join(", "),
            r.loss,
            r.kl,
            r.clip_region,
            r.completion_len_mean,
            r.entropy,
            r.gen_seconds,
            r.score_seconds,
            r.train_seconds
        );
    })?;
    run.trainer.save(&args.out)?;
    let points = read_rewards(&s.log)?;
    zaya::weights::write_atomic(
        &args.out.join("reward.svg"),
        crate::train_run::curve_svg(&points, "reward").as_bytes(),
    )?;
    let final_dir = args.out.join("final");
    zaya::durable::remove_stale_temps(&final_dir)?;
    run.trainer.model().save_weights(&final_dir)?;
    if args.lora.is_none() {
        crate::lora_cmds::copy_side_files(&s.model_dir, &final_dir)?;
    }
    Ok((run.trainer.steps(), final_dir))
}

/// `(step, reward)` of a grpo.csv log.
pub fn read_rewards(path: &std::path::Path) -> Result<Vec<(u64, f64)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            Some((f.first()?.parse().ok()?, f.get(4)?.parse().ok()?))
        })
        .collect())
}
