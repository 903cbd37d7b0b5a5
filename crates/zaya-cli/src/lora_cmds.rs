//! LoRA parts of the `zaya` command: `--adapter DIR` on the inference commands (base +
//! adapter, not merged), `zaya merge`, `zaya forward --adapter --grads` (adapter gradients
//! under their PEFT keys), and the memory report of a training run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};

use zaya::lora::memory::{estimate, MemoryReport, RunShape};
use zaya::lora::{LoraAdapter, LoraModel};
use zaya::train::{labelled_outputs_of, Checkpointing};
use zaya::weights::{load_all, save_checkpoint, Checkpoint, Layout};
use zaya::ZayaModel;

/// `model` with the adapter of `dir` attached (when given).
pub fn with_adapter(model: ZayaModel, dir: Option<&Path>) -> Result<ZayaModel> {
    let Some(dir) = dir else {
        return Ok(model);
    };
    let adapter = LoraAdapter::load(dir, model.config())
        .with_context(|| format!("loading the adapter {}", dir.display()))?;
    eprintln!(
        "adapter {}: r={}, alpha={}, {} modules, {} weights",
        dir.display(),
        adapter.config.r,
        adapter.config.alpha,
        adapter.sites.len(),
        adapter.num_parameters()
    );
    Ok(adapter.apply(&model)?)
}

/// `loss`, `aux_loss` and (with `grads`) `grad.<PEFT key>` of every adapter weight, over
/// the base in the dtype / quantization it was loaded with.
pub fn forward_with_labels(
    base: &ZayaModel,
    adapter_dir: &Path,
    batch: &zaya::train::Batch,
    grads: bool,
    checkpointing: bool,
) -> Result<BTreeMap<String, Tensor>> {
    let adapter = LoraAdapter::load(adapter_dir, base.config())
        .with_context(|| format!("loading the adapter {}", adapter_dir.display()))?;
    let lm = LoraModel::from_adapter(base, &adapter, 0)?;
    let cp = if checkpointing {
        Checkpointing::EveryLayer
    } else {
        Checkpointing::Off
    };
    Ok(labelled_outputs_of(
        lm.model(),
        lm.params(),
        batch,
        grads,
        cp,
    )?)
}

#[derive(clap::Args, Debug)]
pub struct MergeArgs {
    /// Base model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// PEFT adapter directory (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    pub adapter: PathBuf,
    /// Output model directory (native layout, the base's dtype, tokenizer files copied).
    #[arg(long)]
    pub out: PathBuf,
}

/// Tokenizer and generation files a model directory may carry.
pub const MODEL_SIDE_FILES: [&str; 5] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
];

/// Copies the tokenizer and generation files of `from` that exist into `to`.
pub fn copy_side_files(from: &Path, to: &Path) -> Result<()> {
    for f in MODEL_SIDE_FILES {
        let src = from.join(f);
        if src.exists() {
            let bytes =
                std::fs::read(&src).with_context(|| format!("reading {}", src.display()))?;
            zaya::durable::write_atomic(&to.join(f), &bytes)?;
        }
    }
    Ok(())
}

/// `W + scale · B A` for every adapted weight, written as a full model in the base's dtype.
pub fn run_merge(args: MergeArgs) -> Result<()> {
    let ckpt = Checkpoint::open(&args.model)?;
    let cfg = ckpt.config()?;
    ckpt.validate(&cfg)?;
    let adapter = LoraAdapter::load(&args.adapter, &cfg)
        .with_context(|| format!("loading the adapter {}", args.adapter.display()))?;
    let mut tensors = load_all(&ckpt, &cfg, &Device::Cpu)?;
    adapter.merge_into(&mut tensors)?;
    zaya::durable::remove_stale_temps(&args.out).ok();
    save_checkpoint(&args.out, &cfg, &tensors, Layout::Native)?;
    copy_side_files(&args.model, &args.out)?;
    eprintln!(
        "merged {} adapted weights of {} into {}",
        adapter.sites.len(),
        args.adapter.display(),
        args.out.display()
    );
    Ok(())
}

/// The memory estimate of a run, printed; refused when it does not fit in the memory
/// available now.
pub fn memory_check(
    cfg: &zaya::ZayaConfig,
    base_bytes: usize,
    trainable: usize,
    shape: RunShape,
    label: &str,
    budget_gib: Option<f64>,
) -> Result<MemoryReport> {
    let report = estimate(cfg, base_bytes as u64, trainable as u64, &shape);
    eprintln!(
        "memory ({label}, batch {} x {}, checkpointing {:?}): {}",
        shape.batch,
        shape.seq_len,
        shape.checkpointing,
        report.describe()
    );
    let budget = match budget_gib {
        Some(g) => Some((g * (1u64 << 30) as f64) as u64),
        None => zaya::weights::available_memory_bytes(),
    };
    if let Some(avail) = budget {
        report.check_fits(avail)?;
    }
    Ok(report)
}

/// Bytes of an activation element for a model dtype.
pub fn act_bytes(dtype: DType) -> usize {
    dtype.size_in_bytes()
}
