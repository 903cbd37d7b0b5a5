//! `zaya grpo-loss` (TRL's GRPO policy loss and gradients for given token ids) and
//! `zaya grpo` (reinforcement fine-tuning; the loop lives in the `zaya-train` crate).

use std::path::PathBuf;

use anyhow::{Context, Result};

use zaya::train::TrainableModel;
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
}

fn run_facts(args: &GrpoArgs, data: &[u8]) -> serde_json::Value {
    serde_json::json!({
        "data_bytes": data.len(),
        "data_hash": format!("{:016x}", data.iter().fold(0xcbf29ce484222325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100000001b3))),
        "num_generations": args.num_generations,
        "batch_size": args.batch_size,
        "grad_accum": args.grad_accum,
        "num_iterations": args.num_iterations,
        "seed": args.seed,
    })
}

pub fn run_grpo(args: GrpoArgs) -> Result<()> {
    use std::sync::Arc;
    use std::time::Duration;
    use zaya::train::schedule::CosineSchedule;
    use zaya::train::trainer::{Trainer, TrainerConfig};
    use zaya_train::grpo::{read_prompts, GrpoConfig, GrpoRun};
    use zaya_train::rewards::{builtin, parse_reward_spec, ProcessReward, Reward};

    let model_dir = match &args.model {
        Some(d) => d.clone(),
        None => crate::default_model::dir()?,
    };
    let tok = Arc::new(
        zaya::text::ZayaTokenizer::from_dir(&model_dir)
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
    let log = args.out.join("grpo.csv");
    let facts = run_facts(&args, &data);
    let schedule = CosineSchedule {
        peak_lr: args.lr,
        warmup_steps: args.warmup_steps,
        total_steps: args.max_steps,
        min_lr_ratio: args.min_lr_ratio,
    };
    let trainer_cfg = |model: &TrainableModel| -> Result<TrainerConfig> {
        let mut c = TrainerConfig::new(model, args.lr);
        c.schedule = schedule;
        c.adamw.weight_decay = args.weight_decay;
        c.max_grad_norm = Some(args.max_grad_norm);
        c.checkpointing = crate::train_run::parse_checkpointing(&args.checkpointing)?;
        c.aux_loss_coef = args.aux_loss_coef;
        Ok(c)
    };
    let resumed = if args.resume {
        match Trainer::find_checkpoint(&args.out)? {
            Some(dir) => {
                let mut t = Trainer::resume(&dir)?;
                if let Some(saved) = t.run_facts() {
                    if saved != &facts {
                        anyhow::bail!(
                            "cannot resume {}: the data, group/batch sizes, iterations or seed differ from the checkpoint's ({saved} vs {facts})",
                            dir.display()
                        );
                    }
                }
                let c = trainer_cfg(t.model())?;
                t.set_config(c)?;
                let trimmed = zaya::train::trainer::trim_log(&log, t.steps())?;
                eprintln!(
                    "resuming at step {} from {} ({trimmed} log row(s) after it removed)",
                    t.steps(),
                    dir.display()
                );
                Some(t)
            }
            None => {
                eprintln!(
                    "{}: no checkpoint to resume from; starting at step 0",
                    args.out.display()
                );
                None
            }
        }
    } else {
        None
    };
    let trainer = match resumed {
        Some(t) => t,
        None => {
            if log.exists() {
                std::fs::remove_file(&log)?;
            }
            let model = TrainableModel::load(&model_dir)?;
            let c = trainer_cfg(&model)?;
            Trainer::new(model, c)?
        }
    }
    .with_run_facts(facts);
    // the starting weights, frozen (f32 as the trained copy)
    let reference = if args.loss.beta > 0.0 {
        Some(zaya::ZayaModel::load(
            &model_dir,
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )?)
    } else {
        None
    };
    let cfg_model = trainer.model().config().clone();
    let eos = cfg_model.eos_token_id.clone();
    let mut run = GrpoRun {
        cfg,
        trainer,
        reference,
        stop_token_ids: tok.stop_token_ids(&eos),
        tokenizer: tok,
        prompts,
        rewards,
        env,
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
    let points = read_rewards(&log)?;
    zaya::weights::write_atomic(
        &args.out.join("reward.svg"),
        crate::train_run::curve_svg(&points, "reward").as_bytes(),
    )?;
    let final_dir = args.out.join("final");
    zaya::durable::remove_stale_temps(&final_dir)?;
    run.trainer.model().save(&final_dir)?;
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
        "chat_template.jinja",
    ] {
        let src = model_dir.join(f);
        if src.exists() {
            let bytes =
                std::fs::read(&src).with_context(|| format!("reading {}", src.display()))?;
            zaya::durable::write_atomic(&final_dir.join(f), &bytes)?;
        }
    }
    eprintln!(
        "done: {} steps; model in {}, log {}, curve {}",
        run.trainer.steps(),
        final_dir.display(),
        log.display(),
        args.out.join("reward.svg").display()
    );
    Ok(())
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
