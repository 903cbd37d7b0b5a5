//! `zaya train`: supervised fine-tuning from JSONL (`text`, `messages` + `tools`, or
//! pre-tokenized), packed rows without attention across examples, AdamW with warm-up +
//! cosine, clipping, accumulation, checkpoints written atomically every N steps, exact
//! resume, a CSV loss log and an SVG loss curve, and a final export in the native layout
//! (with the tokenizer files) that transformers loads.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};

use zaya::data::{pack, parse_jsonl, Encoder, PackedRow, PretokenizedOnly};
use zaya::lora::memory::{adapter_parameters, base_bytes, RunShape};
use zaya::lora::{attach_lora, LoraAdapter, LoraConfig, LoraModel};
use zaya::text::ZayaTokenizer;
use zaya::train::schedule::CosineSchedule;
use zaya::train::trainer::{Trainer, TrainerConfig, TrainerState};
use zaya::train::{Batch, Checkpointing, Trainable, TrainableModel};

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// Starting model (weights, config and tokenizer files).
    #[arg(long)]
    pub model: PathBuf,
    /// Training data, JSONL.
    #[arg(long)]
    pub data: PathBuf,
    /// Run directory: checkpoints, loss.csv, loss.svg and the exported model in `final/`.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    /// Packed rows per micro-batch.
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    /// Stop after this many optimizer steps (default: all epochs).
    #[arg(long)]
    pub max_steps: Option<u64>,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 10)]
    pub warmup_steps: u64,
    #[arg(long, default_value_t = 0.1)]
    pub min_lr_ratio: f64,
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f64,
    /// AdamW's epsilon (torch's default 1e-8). A larger one keeps updates proportional to
    /// small gradients (tensor-parallel runs compare with single-process ones at 0.1: an
    /// element whose gradient is rounding noise otherwise moves by ±lr).
    #[arg(long, default_value_t = 1e-8)]
    pub adam_eps: f64,
    /// Clip the global gradient norm to this value (0 = no clipping).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// Update each parameter as soon as the backward pass has its gradient, so the model's
    /// gradients are never all alive (peak memory of a full fine-tuning step without
    /// them). Needs `--max-grad-norm 0` and `--grad-accum 1`, one process; a non-finite
    /// gradient stops the run with the parameters before it in the pass already updated.
    #[arg(long)]
    pub optimizer_in_backward: bool,
    /// Gradient checkpointing: off, every (each layer) or K (every K layers).
    #[arg(long, default_value = "off")]
    pub checkpointing: String,
    /// Attention backend of the training forward: sdpa (fused forward and backward, the
    /// fastest), flex or eager (the reference).
    #[arg(long, default_value = "sdpa")]
    pub attn: String,
    /// Router balance loss weight (default: the config's router_aux_loss_coef).
    #[arg(long)]
    pub aux_loss_coef: Option<f64>,
    /// Step of the balancing-bias rule (0 = off).
    #[arg(long, default_value_t = 0.0)]
    pub balance_bias_lr: f64,
    #[arg(long, default_value_t = 50)]
    pub save_every: u64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Continue from the last checkpoint in --out.
    #[arg(long)]
    pub resume: bool,
    /// No progress bar (log lines instead).
    #[arg(long)]
    pub no_progress: bool,
    /// Train a LoRA adapter instead of every weight:
    /// `r=16,alpha=32,dropout=0.05,targets=q_proj,k_proj,...,experts,rslora`. The base stays
    /// frozen in `--dtype` (or `--quant`: QLoRA); checkpoints and `final/` hold the adapter in
    /// PEFT's format.
    #[arg(long)]
    pub lora: Option<String>,
    /// With --lora: dtype the frozen base is held in (f32, bf16, f16).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// With --lora: quantize the frozen base while loading (q8_0, q4_k, ...): QLoRA.
    #[arg(long)]
    pub quant: Option<String>,
    /// Refuse the run when the memory estimate exceeds this many GiB (default: the memory
    /// available now, MemAvailable).
    #[arg(long)]
    pub memory_budget_gib: Option<f64>,
    /// Pipeline stages (`--pp`) and data-parallel replicas (`--dp`): local ranks in this
    /// process, or one rank per process under `mpirun` (MPI build). The step's
    /// `--grad-accum` micro-batches are dealt to the replicas and run through the pipeline
    /// (1F1B); losses and checkpoints are the single-process run's.
    #[command(flatten)]
    pub parallel: crate::parallel_cmds::ParallelArgs,
    /// With --dp: keep every AdamW moment on every replica instead of sharding them over
    /// the replicas (ZeRO-1, the default).
    #[arg(long)]
    pub no_zero: bool,
    /// Seconds a rank waits for a peer before the run fails naming it.
    #[arg(long, default_value_t = 300)]
    pub dist_timeout: u64,
}

pub(crate) fn parse_checkpointing(s: &str) -> Result<Checkpointing> {
    Ok(match s {
        "off" => Checkpointing::Off,
        "every" | "on" => Checkpointing::EveryLayer,
        k => Checkpointing::Every(
            k.parse()
                .with_context(|| format!("--checkpointing: `{k}` is not off, every or a number"))?,
        ),
    })
}

/// The run's micro-batches in order, built on demand (a huge `--epochs` costs no memory):
/// rows shuffled per epoch with the seed, cut into `--batch-size` chunks.
pub(crate) struct BatchPlan<'a> {
    rows: &'a [PackedRow],
    batch_size: usize,
    seed: u64,
    per_epoch: u64,
    /// Micro-batches of the whole run.
    pub(crate) total: u64,
    /// The row order of the epoch last asked for.
    order: Option<(u64, Vec<usize>)>,
}

impl<'a> BatchPlan<'a> {
    pub(crate) fn new(rows: &'a [PackedRow], args: &TrainArgs) -> Result<Self> {
        let per_epoch = rows.len().div_ceil(args.batch_size) as u64;
        let total = per_epoch.checked_mul(args.epochs as u64).with_context(|| {
            format!(
                "--epochs {}: {per_epoch} batches per epoch overflow the step count",
                args.epochs
            )
        })?;
        Ok(BatchPlan {
            rows,
            batch_size: args.batch_size,
            seed: args.seed,
            per_epoch,
            total,
            order: None,
        })
    }

    /// Micro-batch `k` of the run (`k < total`).
    pub(crate) fn get(&mut self, k: u64) -> Batch {
        let epoch = k / self.per_epoch;
        if self.order.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let mut order: Vec<usize> = (0..self.rows.len()).collect();
            order.shuffle(&mut StdRng::seed_from_u64(self.seed.wrapping_add(epoch)));
            self.order = Some((epoch, order));
        }
        let order = &self.order.as_ref().expect("set above").1;
        let start = (k % self.per_epoch) as usize * self.batch_size;
        let chunk = &order[start..(start + self.batch_size).min(order.len())];
        let rows = self.rows;
        let pick = |f: &dyn Fn(&PackedRow) -> Vec<u32>| {
            chunk.iter().map(|&i| f(&rows[i])).collect::<Vec<_>>()
        };
        Batch {
            input_ids: pick(&|r| r.input_ids.clone()),
            labels: chunk.iter().map(|&i| rows[i].labels.clone()).collect(),
            attention_mask: Some(pick(&|r| r.attention_mask.clone())),
            document_ids: Some(pick(&|r| r.document_ids.clone())),
        }
    }
}

/// Rejects sizes that are zero or whose products overflow, naming the flags.
fn check_sizes(args: &TrainArgs) -> Result<usize> {
    if args.batch_size == 0 || args.grad_accum == 0 || args.epochs == 0 || args.seq_len < 2 {
        bail!("--batch-size, --grad-accum and --epochs must be at least 1, --seq-len at least 2");
    }
    if args.save_every == 0 {
        bail!("--save-every must be at least 1");
    }
    if args.max_steps == Some(0) {
        bail!("--max-steps must be at least 1");
    }
    args.batch_size
        .checked_mul(args.grad_accum)
        .and_then(|n| n.checked_mul(args.seq_len))
        .with_context(|| {
            format!(
                "--batch-size {} x --grad-accum {} x --seq-len {} tokens per step overflows",
                args.batch_size, args.grad_accum, args.seq_len
            )
        })
}

/// 64-bit FNV-1a of the data file: resume refuses data that changed under the run.
fn fingerprint(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// What a checkpoint's rows and batches depend on: a resume with other values would train
/// on different batches than the checkpoint's steps did, so it is refused.
fn run_facts(args: &TrainArgs, data: &[u8]) -> serde_json::Value {
    serde_json::json!({
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "grad_accum": args.grad_accum,
        "epochs": args.epochs,
        "seed": args.seed,
        "data_bytes": data.len(),
        "data_fnv1a64": fingerprint(data),
    })
}

/// The differences between the saved run facts and this command's, as flag messages.
fn fact_changes(saved: &serde_json::Value, now: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    for (key, flag) in [
        ("seq_len", "--seq-len"),
        ("batch_size", "--batch-size"),
        ("grad_accum", "--grad-accum"),
        ("epochs", "--epochs"),
        ("seed", "--seed"),
        ("lora", "--lora"),
    ] {
        if saved.get(key) != now.get(key) {
            out.push(format!(
                "{flag} {} (the checkpoint was trained with {})",
                now[key],
                saved.get(key).unwrap_or(&serde_json::Value::Null)
            ));
        }
    }
    if saved.get("data_bytes") != now.get("data_bytes")
        || saved.get("data_fnv1a64") != now.get("data_fnv1a64")
    {
        out.push("--data: the file differs from the one the checkpoint was trained on".into());
    }
    out
}

/// The trainer settings the flags ask for; `total` steps in the schedule.
pub(crate) fn trainer_config(
    model: &zaya::ZayaConfig,
    args: &TrainArgs,
    total: u64,
) -> Result<TrainerConfig> {
    let mut cfg = TrainerConfig::for_config(model, args.lr);
    cfg.schedule = CosineSchedule {
        peak_lr: args.lr,
        warmup_steps: args.warmup_steps.min(total),
        total_steps: total,
        min_lr_ratio: args.min_lr_ratio,
    };
    cfg.adamw.weight_decay = args.weight_decay;
    cfg.adamw.eps = args.adam_eps;
    cfg.max_grad_norm = (args.max_grad_norm != 0.0).then_some(args.max_grad_norm);
    cfg.optimizer_in_backward = args.optimizer_in_backward;
    if args.optimizer_in_backward {
        if cfg.max_grad_norm.is_some() {
            bail!("--optimizer-in-backward needs --max-grad-norm 0: clipping needs every gradient before the first update");
        }
        if args.grad_accum != 1 {
            bail!("--optimizer-in-backward needs --grad-accum 1: accumulation needs every gradient before the first update");
        }
    }
    cfg.checkpointing = parse_checkpointing(&args.checkpointing)?;
    if let Some(c) = args.aux_loss_coef {
        cfg.aux_loss_coef = c;
    }
    cfg.balance_bias_lr = args.balance_bias_lr;
    cfg.attn = zaya::attention::AttnImplementation::parse(&args.attn)
        .with_context(|| format!("--attn: `{}` is not eager, sdpa or flex", args.attn))?;
    Ok(cfg)
}

/// Settings that may change on resume (they apply from the next step): what changed, as
/// `name: old -> new` lines.
fn setting_changes(old: &TrainerConfig, new: &TrainerConfig) -> Vec<String> {
    let mut out = Vec::new();
    let mut diff = |name: &str, a: String, b: String| {
        if a != b {
            out.push(format!("{name}: {a} -> {b}"));
        }
    };
    diff(
        "--lr",
        old.schedule.peak_lr.to_string(),
        new.schedule.peak_lr.to_string(),
    );
    diff(
        "total steps (--max-steps)",
        old.schedule.total_steps.to_string(),
        new.schedule.total_steps.to_string(),
    );
    diff(
        "--warmup-steps",
        old.schedule.warmup_steps.to_string(),
        new.schedule.warmup_steps.to_string(),
    );
    diff(
        "--min-lr-ratio",
        old.schedule.min_lr_ratio.to_string(),
        new.schedule.min_lr_ratio.to_string(),
    );
    diff(
        "--weight-decay",
        old.adamw.weight_decay.to_string(),
        new.adamw.weight_decay.to_string(),
    );
    diff(
        "--adam-eps",
        old.adamw.eps.to_string(),
        new.adamw.eps.to_string(),
    );
    diff(
        "--max-grad-norm",
        format!("{:?}", old.max_grad_norm),
        format!("{:?}", new.max_grad_norm),
    );
    diff(
        "--checkpointing",
        format!("{:?}", old.checkpointing),
        format!("{:?}", new.checkpointing),
    );
    diff(
        "--aux-loss-coef",
        old.aux_loss_coef.to_string(),
        new.aux_loss_coef.to_string(),
    );
    diff(
        "--balance-bias-lr",
        old.balance_bias_lr.to_string(),
        new.balance_bias_lr.to_string(),
    );
    diff("--attn", old.attn.as_str().into(), new.attn.as_str().into());
    diff(
        "--optimizer-in-backward",
        old.optimizer_in_backward.to_string(),
        new.optimizer_in_backward.to_string(),
    );
    out
}

/// The checkpoint a resume of `out` starts from and its trainer state with the flags'
/// settings applied: checks that the data and row shape are the checkpoint's (refused
/// otherwise), says which settings changed (they apply from the next step), and on the
/// primary rank trims `loss.csv` to the checkpoint's step. Reads no weights. `None` when
/// `out` holds no checkpoint.
pub(crate) fn resume_state<M: Trainable>(
    args: &TrainArgs,
    primary: bool,
    facts: &serde_json::Value,
    total: u64,
    log: &Path,
    model_cfg: &zaya::ZayaConfig,
) -> Result<Option<(PathBuf, TrainerState)>> {
    let Some(dir) = Trainer::<M>::find_checkpoint_of(&args.out)? else {
        return Ok(None);
    };
    if primary && !args.out.join("latest").exists() {
        eprintln!(
            "{}: `latest` is missing; resuming from the newest complete checkpoint, {}",
            args.out.display(),
            dir.display()
        );
    }
    let mut state = TrainerState::read(&dir)?;
    match &state.run {
        Some(saved) => {
            let changes = fact_changes(saved, facts);
            if !changes.is_empty() {
                bail!(
                    "cannot resume {}: {} (these change which batches the steps see; start a new run with another --out)",
                    dir.display(),
                    changes.join("; ")
                );
            }
        }
        None if primary => eprintln!(
            "warning: {} records no data or row shape (older checkpoint); they are not checked",
            dir.display()
        ),
        None => {}
    }
    let step = state.step;
    let wanted = trainer_config(model_cfg, args, total.max(step))?;
    let changes = setting_changes(&state.config, &wanted);
    if !changes.is_empty() {
        if primary {
            eprintln!(
                "resume: applying changed settings from step {} on: {}",
                step + 1,
                changes.join(", ")
            );
        }
        state.config = wanted;
    }
    state.run = Some(facts.clone());
    if primary {
        let trimmed = zaya::train::trainer::trim_log(log, step)?;
        if trimmed > 0 {
            eprintln!(
                "resume: removed {trimmed} row(s) after step {step} from {}",
                log.display()
            );
        }
    }
    Ok(Some((dir, state)))
}

/// Resumes the run in `out` ([`resume_state`], then the checkpoint's model and optimizer).
/// `None` when `out` holds no checkpoint.
fn resume_run<M: Trainable>(
    args: &TrainArgs,
    primary: bool,
    run: &RunPlan,
    load: impl FnOnce(&Path) -> zaya::Result<M>,
) -> Result<Option<Trainer<M>>> {
    let Some((dir, state)) = resume_state::<M>(
        args,
        primary,
        &run.facts,
        run.total,
        &run.log,
        &run.model_cfg,
    )?
    else {
        return Ok(None);
    };
    let mut trainer = Trainer::resume_with(&dir, load)?;
    if trainer.config() != &state.config {
        trainer.set_config(state.config)?;
    }
    Ok(Some(trainer.with_run_facts(run.facts.clone())))
}

/// A small SVG line chart of the loss per step.
pub fn loss_svg(points: &[(u64, f64)]) -> String {
    curve_svg(points, "loss")
}

/// A small SVG line chart of `label` per step.
pub fn curve_svg(points: &[(u64, f64)], label: &str) -> String {
    let (w, h, pad) = (640.0, 360.0, 40.0);
    let max_step = points.iter().map(|p| p.0).max().unwrap_or(1).max(1) as f64;
    let (lo, hi) = points
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| {
            (lo.min(p.1), hi.max(p.1))
        });
    let span = (hi - lo).max(1e-9);
    let xy = |s: u64, l: f64| {
        (
            pad + (s as f64 / max_step) * (w - 2.0 * pad),
            h - pad - (l - lo) / span * (h - 2.0 * pad),
        )
    };
    let path: Vec<String> = points
        .iter()
        .map(|&(s, l)| {
            let (x, y) = xy(s, l);
            format!("{x:.1},{y:.1}")
        })
        .collect();
    format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<line x1="{pad}" y1="{b}" x2="{r}" y2="{b}" stroke="black"/><line x1="{pad}" y1="{pad}" x2="{pad}" y2="{b}" stroke="black"/>
<text x="{pad}" y="{t}">{label} {hi:.3}</text><text x="{pad}" y="{bl}">{lo:.3}</text><text x="{r}" y="{bl}" text-anchor="end">step {ms}</text>
<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{pts}"/>
</svg>
"##,
        b = h - pad,
        r = w - pad,
        t = pad - 8.0,
        bl = h - pad + 16.0,
        ms = max_step,
        pts = path.join(" ")
    )
}

pub(crate) fn read_log(path: &Path) -> Result<Vec<(u64, f64)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text
        .lines()
        .skip(1)
        .filter_map(|l| {
            let mut f = l.split(',');
            let step = f.next()?.parse().ok()?;
            let _lr = f.next()?;
            let loss = f.next()?.parse().ok()?;
            Some((step, loss))
        })
        .collect())
}

/// What the data and the flags give before any model is loaded.
pub(crate) struct RunPlan {
    pub(crate) rows: Vec<PackedRow>,
    pub(crate) examples: usize,
    pub(crate) facts: serde_json::Value,
    pub(crate) log: PathBuf,
    pub(crate) tokens_per_step: usize,
    pub(crate) total: u64,
    pub(crate) model_cfg: zaya::ZayaConfig,
}

pub(crate) fn plan_run(args: &TrainArgs) -> Result<RunPlan> {
    let tokens_per_step = check_sizes(args)?;
    // Without tokenizer files only pre-tokenized data can be read.
    let tok = if args.model.join("tokenizer.json").exists() {
        let t = ZayaTokenizer::from_dir(&args.model)
            .with_context(|| format!("loading the tokenizer of {}", args.model.display()))?;
        Some(t)
    } else {
        None
    };
    let encoder: &dyn Encoder = match &tok {
        Some(t) => t,
        None => &PretokenizedOnly,
    };
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let log = args.out.join("loss.csv");
    let data =
        std::fs::read(&args.data).with_context(|| format!("reading {}", args.data.display()))?;
    let mut facts = run_facts(args, &data);
    if let Some(spec) = &args.lora {
        facts["lora"] = serde_json::json!(spec);
    }
    let model_cfg = zaya::ZayaConfig::from_file(args.model.join("config.json"))?;
    let examples = parse_jsonl(&args.data, &data, encoder, model_cfg.vocab_size)?;
    drop(data);
    let rows = pack(&examples, args.seq_len, model_cfg.pad_token_id.unwrap_or(0))?;
    let steps = BatchPlan::new(&rows, args)?.total / args.grad_accum as u64;
    let total = args.max_steps.map_or(steps, |m| m.min(steps)).max(1);
    Ok(RunPlan {
        examples: examples.len(),
        rows,
        facts,
        log,
        tokens_per_step,
        total,
        model_cfg,
    })
}

/// The steps of a run, from the trainer's current step to the schedule's end, with
/// checkpoints every `--save-every` steps and at the end.
fn run_steps<M: Trainable>(
    trainer: &mut Trainer<M>,
    run: &RunPlan,
    args: &TrainArgs,
) -> Result<()> {
    let mut plan = BatchPlan::new(&run.rows, args)?;
    let total = trainer.config().schedule.total_steps;
    eprintln!(
        "{} examples -> {} packed rows of {}; {} steps of {} micro-batches",
        run.examples,
        run.rows.len(),
        args.seq_len,
        total,
        args.grad_accum
    );
    let bar = if args.no_progress {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(total)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise} < {eta_precise}] {msg}",
        )
        .expect("valid template"),
    );
    bar.set_position(trainer.steps());
    while trainer.steps() < total {
        let ga = args.grad_accum as u64;
        let first = trainer.steps() * ga;
        if first >= plan.total {
            break;
        }
        let micro: Vec<Batch> = (first..(first + ga).min(plan.total))
            .map(|k| plan.get(k))
            .collect();
        let r = trainer.step(&micro)?;
        let tps = run.tokens_per_step as f64 / r.seconds.max(1e-9);
        let msg = format!(
            "loss {:.4} aux {:.4} skip {:.1}% lr {:.2e} {:.0} tok/s",
            r.loss,
            r.aux_loss,
            100.0 * r.skip_fraction,
            r.lr,
            tps
        );
        if args.no_progress {
            eprintln!("step {}/{}: {msg}", r.step, total);
        }
        bar.set_message(msg);
        bar.set_position(r.step);
        if r.step % args.save_every == 0 && r.step < total {
            trainer.save(&args.out)?;
        }
    }
    bar.finish();
    trainer.save(&args.out)?;
    let points = read_log(&run.log)?;
    zaya::weights::write_atomic(&args.out.join("loss.svg"), loss_svg(&points).as_bytes())?;
    Ok(())
}

/// A new trainer or the resumed one.
pub(crate) fn start_trainer<M: Trainable>(
    args: &TrainArgs,
    primary: bool,
    run: &RunPlan,
    load: impl FnOnce(&Path) -> zaya::Result<M>,
    fresh: impl FnOnce() -> Result<M>,
) -> Result<Trainer<M>> {
    let resumed = if args.resume {
        resume_run(args, primary, run, load)?
    } else {
        None
    };
    Ok(match resumed {
        Some(t) if !primary => t,
        Some(t) => {
            eprintln!("resuming at step {}", t.steps());
            t.with_log(&run.log)?
        }
        None if !primary => {
            let model = fresh()?;
            let cfg = trainer_config(model.config(), args, run.total)?;
            Trainer::new(model, cfg)?.with_run_facts(run.facts.clone())
        }
        None => {
            if args.resume {
                eprintln!(
                    "{}: no checkpoint to resume from; starting at step 0",
                    args.out.display()
                );
            }
            let model = fresh()?;
            let cfg = trainer_config(model.config(), args, run.total)?;
            if run.log.exists() {
                std::fs::remove_file(&run.log)?;
            }
            Trainer::new(model, cfg)?
                .with_run_facts(run.facts.clone())
                .with_log(&run.log)?
        }
    })
}

fn run_shape(args: &TrainArgs, cfg: &zaya::ZayaConfig, act_bytes: usize) -> Result<RunShape> {
    Ok(RunShape {
        batch: args.batch_size,
        seq_len: args.seq_len,
        checkpointing: parse_checkpointing(&args.checkpointing)?,
        act_bytes,
        loss_chunk: zaya::train::TrainOptions::for_config(cfg).loss_chunk,
    })
}

pub fn run_train(args: TrainArgs) -> Result<()> {
    let run = plan_run(&args)?;
    if args.parallel.is_parallel() || zaya_dist::comm::launched_by_mpi() {
        if args.lora.is_some() {
            bail!("--lora trains on one rank in this version (no --tp/--pp/--ep/--dp)");
        }
        if args.optimizer_in_backward {
            bail!("--optimizer-in-backward trains on one rank in this version (no --tp/--pp/--ep/--dp)");
        }
        return crate::train_parallel::run(&args, &run);
    }
    if let Some(spec) = args.lora.clone() {
        return run_train_lora(&args, &run, &spec);
    }
    if args.quant.is_some() || args.dtype != "f32" {
        bail!("--dtype and --quant choose how the frozen base of a --lora run is held; full fine-tuning keeps f32 master weights");
    }
    let cfg = &run.model_cfg;
    let params: u64 = zaya::weights::native_specs(cfg)
        .iter()
        .map(|s| s.shape.iter().product::<usize>() as u64)
        .sum();
    crate::lora_cmds::memory_check(
        cfg,
        0,
        params as usize,
        run_shape(&args, cfg, 4)?,
        "full fine-tuning, f32",
        args.memory_budget_gib,
    )?;
    let mut trainer = start_trainer(
        &args,
        true,
        &run,
        |d| TrainableModel::load(d),
        || Ok(TrainableModel::load(&args.model)?),
    )?;
    run_steps(&mut trainer, &run, &args)?;
    let final_dir = args.out.join("final");
    // an export killed half-way leaves temporaries (up to the model's size) behind
    zaya::durable::remove_stale_temps(&final_dir)?;
    trainer.model().save(&final_dir)?;
    crate::lora_cmds::copy_side_files(&args.model, &final_dir)?;
    eprintln!(
        "done: {} steps; model in {}, loss log {}, curve {}",
        trainer.steps(),
        final_dir.display(),
        run.log.display(),
        args.out.join("loss.svg").display()
    );
    Ok(())
}

/// LoRA / QLoRA: the base loaded frozen as `--dtype` / `--quant` says, adapter vars trained.
fn run_train_lora(args: &TrainArgs, run: &RunPlan, spec: &str) -> Result<()> {
    let mut lora = LoraConfig::parse_spec(spec)?;
    lora.base_model = Some(args.model.display().to_string());
    if args.balance_bias_lr != 0.0 {
        bail!("--balance-bias-lr changes the base model; a --lora run keeps it frozen");
    }
    let dtype = crate::parse_dtype(&args.dtype)?;
    let plan = match &args.quant {
        Some(f) => Some(zaya::quant::QuantPlan::named(f)?),
        None => None,
    };
    let cfg = &run.model_cfg;
    let base_est = base_bytes(cfg, dtype, plan.as_ref());
    let trainable = adapter_parameters(cfg, &lora)?;
    let label = format!(
        "LoRA r={} over a {} base",
        lora.r,
        args.quant.clone().unwrap_or_else(|| args.dtype.clone())
    );
    // Before the base is loaded: a clear refusal instead of an OOM kill half-way.
    crate::lora_cmds::memory_check(
        cfg,
        base_est as usize,
        trainable as usize,
        run_shape(args, cfg, crate::lora_cmds::act_bytes(dtype))?,
        &label,
        args.memory_budget_gib,
    )?;
    let base = zaya::ZayaModel::load_quantized(
        &args.model,
        dtype,
        &candle_core::Device::Cpu,
        plan.as_ref(),
    )
    .with_context(|| format!("loading {}", args.model.display()))?;
    eprintln!(
        "base: {:.2} GiB held; adapter: {} sites, {} trainable weights",
        base.weight_bytes() as f64 / (1u64 << 30) as f64,
        zaya::lora::plan(base.config(), &lora)?.len(),
        trainable
    );
    let seed = args.seed;
    let mut trainer = start_trainer(
        args,
        true,
        run,
        |d| {
            let adapter = LoraAdapter::load(d, base.config())?;
            LoraModel::from_adapter(&base, &adapter, seed)
        },
        || Ok(attach_lora(&base, &lora, seed)?),
    )?;
    run_steps(&mut trainer, run, args)?;
    let final_dir = args.out.join("final");
    zaya::durable::remove_stale_temps(&final_dir).ok();
    trainer.model().save(&final_dir)?;
    eprintln!(
        "done: {} steps; adapter (PEFT format) in {}, loss log {}, curve {}",
        trainer.steps(),
        final_dir.display(),
        run.log.display(),
        args.out.join("loss.svg").display()
    );
    Ok(())
}
