//! `zaya train`: supervised fine-tuning from JSONL (`text`, `messages` + `tools`, or
//! pre-tokenized), packed rows without attention across examples, AdamW with warm-up +
//! cosine, clipping, accumulation, checkpoints written atomically every N steps, exact
//! resume, a CSV loss log and an SVG loss curve, and a final export in the native layout
//! (with the tokenizer files) that transformers loads.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};

use zaya::data::{pack, read_jsonl, Encoder, PackedRow, PretokenizedOnly};
use zaya::text::ZayaTokenizer;
use zaya::train::schedule::CosineSchedule;
use zaya::train::trainer::{Trainer, TrainerConfig};
use zaya::train::{Batch, Checkpointing, TrainableModel};

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
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// Gradient checkpointing: off, every (each layer) or K (every K layers).
    #[arg(long, default_value = "off")]
    pub checkpointing: String,
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

/// Every micro-batch of the whole run, in order: rows shuffled per epoch with the seed.
fn schedule_batches(rows: &[PackedRow], args: &TrainArgs) -> Vec<Batch> {
    let mut out = Vec::new();
    for epoch in 0..args.epochs {
        let mut order: Vec<usize> = (0..rows.len()).collect();
        order.shuffle(&mut StdRng::seed_from_u64(
            args.seed.wrapping_add(epoch as u64),
        ));
        for chunk in order.chunks(args.batch_size) {
            let pick = |f: &dyn Fn(&PackedRow) -> Vec<u32>| {
                chunk.iter().map(|&i| f(&rows[i])).collect::<Vec<_>>()
            };
            out.push(Batch {
                input_ids: pick(&|r| r.input_ids.clone()),
                labels: chunk.iter().map(|&i| rows[i].labels.clone()).collect(),
                attention_mask: Some(pick(&|r| r.attention_mask.clone())),
                document_ids: Some(pick(&|r| r.document_ids.clone())),
            });
        }
    }
    out
}

/// A small SVG line chart of the loss per step.
pub fn loss_svg(points: &[(u64, f64)]) -> String {
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
<text x="{pad}" y="{t}">loss {hi:.3}</text><text x="{pad}" y="{bl}">{lo:.3}</text><text x="{r}" y="{bl}" text-anchor="end">step {ms}</text>
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

fn read_log(path: &Path) -> Result<Vec<(u64, f64)>> {
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

pub fn run_train(args: TrainArgs) -> Result<()> {
    if args.batch_size == 0 || args.grad_accum == 0 || args.epochs == 0 || args.seq_len < 2 {
        bail!("--batch-size, --grad-accum and --epochs must be at least 1, --seq-len at least 2");
    }
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
    let mut trainer = if args.resume && args.out.join("latest").exists() {
        let t = Trainer::resume(&args.out)?.with_log(&log)?;
        eprintln!("resuming at step {}", t.steps());
        t
    } else {
        let model = TrainableModel::load(&args.model)?;
        let examples = read_jsonl(&args.data, encoder, model.config().vocab_size)?;
        let rows = pack(
            &examples,
            args.seq_len,
            model.config().pad_token_id.unwrap_or(0),
        );
        let steps = (schedule_batches(&rows, &args).len() / args.grad_accum) as u64;
        let total = args.max_steps.map_or(steps, |m| m.min(steps)).max(1);
        let mut cfg = TrainerConfig::new(&model, args.lr);
        cfg.schedule = CosineSchedule {
            peak_lr: args.lr,
            warmup_steps: args.warmup_steps.min(total),
            total_steps: total,
            min_lr_ratio: args.min_lr_ratio,
        };
        cfg.adamw.weight_decay = args.weight_decay;
        cfg.max_grad_norm = Some(args.max_grad_norm);
        cfg.checkpointing = parse_checkpointing(&args.checkpointing)?;
        if let Some(c) = args.aux_loss_coef {
            cfg.aux_loss_coef = c;
        }
        cfg.balance_bias_lr = args.balance_bias_lr;
        if log.exists() {
            std::fs::remove_file(&log)?;
        }
        Trainer::new(model, cfg)?.with_log(&log)?
    };
    let examples = read_jsonl(&args.data, encoder, trainer.model().config().vocab_size)?;
    let rows = pack(
        &examples,
        args.seq_len,
        trainer.model().config().pad_token_id.unwrap_or(0),
    );
    let batches = schedule_batches(&rows, &args);
    let total = trainer.config().schedule.total_steps;
    let tokens_per_step: usize = args.batch_size * args.grad_accum * args.seq_len;
    eprintln!(
        "{} examples -> {} packed rows of {}; {} steps of {} micro-batches",
        examples.len(),
        rows.len(),
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
        let s = trainer.steps() as usize;
        let micro = &batches[s * args.grad_accum..((s + 1) * args.grad_accum).min(batches.len())];
        if micro.is_empty() {
            break;
        }
        let r = trainer.step(micro)?;
        let tps = tokens_per_step as f64 / r.seconds.max(1e-9);
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
    let points = read_log(&log)?;
    zaya::weights::write_atomic(&args.out.join("loss.svg"), loss_svg(&points).as_bytes())?;
    let final_dir = args.out.join("final");
    trainer.model().save(&final_dir)?;
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
        "chat_template.jinja",
    ] {
        let src = args.model.join(f);
        if src.exists() {
            std::fs::copy(&src, final_dir.join(f))
                .with_context(|| format!("copying {}", src.display()))?;
        }
    }
    eprintln!(
        "done: {} steps; model in {}, loss log {}, curve {}",
        trainer.steps(),
        final_dir.display(),
        log.display(),
        args.out.join("loss.svg").display()
    );
    Ok(())
}
