//! The memory a training run needs, estimated before it starts: the base weights as held,
//! the trainable parameters with their gradients and AdamW moments, and the activations of
//! one micro-batch for the given batch, sequence length and checkpointing. A run that will
//! not fit in the memory available now is refused with the breakdown, instead of being
//! killed half-way by the OOM killer.
//!
//! The activation figure is a model of what the training graph keeps per token and layer
//! (residual stream and router state at segment boundaries; inside a recomputed segment the
//! projections, CCA convolution, attention, router and expert intermediates; the chunked
//! loss), calibrated against measured peak RSS (README, LoRA section); it is an estimate.

use crate::config::ZayaConfig;
use crate::error::{Result, ZayaError};
use crate::train::Checkpointing;

/// Inputs of the estimate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RunShape {
    pub batch: usize,
    pub seq_len: usize,
    pub checkpointing: Checkpointing,
    /// Bytes of an activation element (the model dtype: 4 for f32, 2 for bf16).
    pub act_bytes: usize,
    /// Positions per LM-head chunk of the loss.
    pub loss_chunk: usize,
}

/// The estimate, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryReport {
    /// Base weights as the model holds them (stored dtype or quantized).
    pub base: u64,
    /// Trainable parameters (f32).
    pub trainable: u64,
    /// Gradients of the trainable parameters (the step's sum and one micro-batch's).
    pub gradients: u64,
    /// AdamW first and second moments.
    pub optimizer: u64,
    /// Activations of one micro-batch's forward and backward.
    pub activations: u64,
    /// Runtime, allocator slack and the process itself.
    pub overhead: u64,
}

const MIB: u64 = 1 << 20;
const GIB: f64 = (1u64 << 30) as f64;

impl MemoryReport {
    pub fn total(&self) -> u64 {
        self.base
            + self.trainable
            + self.gradients
            + self.optimizer
            + self.activations
            + self.overhead
    }

    /// One line per item, in GiB.
    pub fn describe(&self) -> String {
        let g = |b: u64| b as f64 / GIB;
        format!(
            "base {:.2} GiB, trainable {:.3} GiB + gradients {:.3} GiB + AdamW {:.3} GiB, activations {:.2} GiB, overhead {:.2} GiB: total {:.2} GiB",
            g(self.base),
            g(self.trainable),
            g(self.gradients),
            g(self.optimizer),
            g(self.activations),
            g(self.overhead),
            g(self.total())
        )
    }

    /// Refuses (typed error with the breakdown) when the total exceeds `available` bytes.
    pub fn check_fits(&self, available: u64) -> Result<()> {
        if self.total() <= available {
            return Ok(());
        }
        Err(ZayaError::TrainingMemory {
            report: self.describe(),
            needed: self.total(),
            available,
            needed_gib: self.total() as f64 / GIB,
            available_gib: available as f64 / GIB,
        })
    }
}

/// Bytes a model of `cfg` holds when loaded in `dtype`, quantized as `plan` says (before
/// loading it: the check runs before the base takes any memory).
pub fn base_bytes(
    cfg: &ZayaConfig,
    dtype: candle_core::DType,
    plan: Option<&crate::quant::QuantPlan>,
) -> u64 {
    match plan {
        Some(plan) => plan.loaded_bytes(cfg, dtype),
        None => crate::weights::Checkpoint::required_bytes(cfg, dtype),
    }
}

/// Trainable weights of an adapter of `lora` on a model of `cfg`.
pub fn adapter_parameters(cfg: &ZayaConfig, lora: &super::LoraConfig) -> Result<u64> {
    Ok(super::plan(cfg, lora)?
        .iter()
        .map(|s| (s.shape_a[0] * s.shape_a[1] + s.shape_b[0] * s.shape_b[1]) as u64)
        .sum())
}

/// Activation bytes per token of one decoder layer while its graph is alive.
fn layer_bytes_per_token(cfg: &ZayaConfig, s: usize, seq_len: usize) -> u64 {
    let h = cfg.hidden_size as u64;
    let c = cfg.conv_channels() as u64;
    let kv = cfg.kv_dim() as u64;
    let q = cfg.q_dim() as u64;
    let r = cfg.router_hidden_size as u64;
    let i = cfg.moe_intermediate_size as u64;
    let s = s as u64;
    // residual stream and merges (f32), norms and their inputs (model dtype)
    let residual = 10 * h * 4 + 6 * h * s;
    // raw projections, conv history + two convolutions, mean residuals, normed/rotated q k,
    // values, attention output, o_proj
    let attention = (8 * c + 4 * kv + 3 * q + 2 * h) * s;
    // eager attention scores and probabilities (f32) over the keys
    let scores = 2 * cfg.num_attention_heads as u64 * seq_len as u64 * 4;
    // router: down-projection, norm, two GELU layers, logits, softmax
    let router = (10 * r + 4 * (cfg.num_experts as u64 + 1)) * s.max(4);
    // one expert per token: gathered input, gate/up, SwiGLU, down, weighted
    let experts = (2 * h + 2 * 2 * i + 2 * i + 2 * h) * s;
    residual + attention + scores + router + experts
}

/// The estimate for a run of `shape` over a model holding `base_bytes` of weights with
/// `trainable` f32 parameters.
pub fn estimate(
    cfg: &ZayaConfig,
    base_bytes: u64,
    trainable: u64,
    shape: &RunShape,
) -> MemoryReport {
    let tokens = (shape.batch * shape.seq_len) as u64;
    let per_layer = layer_bytes_per_token(cfg, shape.act_bytes, shape.seq_len);
    let layers = cfg.num_hidden_layers as u64;
    let segment = match shape.checkpointing {
        Checkpointing::Off => layers,
        Checkpointing::EveryLayer => 1,
        Checkpointing::Every(k) => (k as u64).min(layers),
    };
    // boundaries kept for every layer: residual stream (f32) and router state
    let boundaries = layers
        * tokens
        * (cfg.hidden_size as u64 * 4 + cfg.router_hidden_size as u64 * shape.act_bytes as u64);
    // the live segment, plus its backward's transient gradients (about as large again)
    let live = 2 * segment * per_layer * tokens;
    // the chunked loss: logits, log-softmax and their gradients for one chunk, and the
    // final hidden state with its gradient
    let chunk = shape.loss_chunk.min(shape.batch * shape.seq_len).max(1) as u64;
    let loss = 4 * chunk * cfg.vocab_size as u64 * 4 + 2 * tokens * cfg.hidden_size as u64 * 4;
    MemoryReport {
        base: base_bytes,
        trainable: trainable * 4,
        gradients: 2 * trainable * 4,
        optimizer: 2 * trainable * 4,
        activations: boundaries + live + loss,
        overhead: 256 * MIB,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg_8b() -> ZayaConfig {
        ZayaConfig::from_file(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../bench/configs/zaya1-8b.json"
        ))
        .unwrap()
    }

    #[test]
    fn checkpointing_shrinks_the_estimate_and_refusal_names_the_parts() {
        let cfg = cfg_8b();
        let shape = |c| RunShape {
            batch: 1,
            seq_len: 512,
            checkpointing: c,
            act_bytes: 2,
            loss_chunk: 64,
        };
        let off = estimate(&cfg, 17_700_000_000, 20_000_000, &shape(Checkpointing::Off));
        let every = estimate(
            &cfg,
            17_700_000_000,
            20_000_000,
            &shape(Checkpointing::EveryLayer),
        );
        assert!(every.activations * 4 < off.activations, "{off:?} {every:?}");
        // bf16 8B with checkpointing at 1 x 512 should fit the 22 GB goal
        assert!(every.total() < 22_000_000_000, "{}", every.describe());
        let e = every.check_fits(10 << 30).unwrap_err().to_string();
        assert!(
            e.contains("base") && e.contains("activations") && e.contains("AdamW"),
            "{e}"
        );
        assert!(every.check_fits(every.total()).is_ok());
    }
}
