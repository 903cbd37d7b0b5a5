//! Top-1 MoE experts over weights that are (at least partly) block-quantized. Same grouping
//! as the dense kernel: tokens bucketed by expert, per expert one matmul for gate/up over
//! the gathered rows, SwiGLU, one matmul for down, rows scattered back and scaled by the
//! routing weight (a differentiable multiply, as in the dense path, though the quantized
//! weights themselves are frozen). Each matmul is candle's quantized CPU matmul (it
//! quantizes the activations to the weight's dot-product partner format, Q8_0 / Q8_K, and
//! runs AVX-512 VNNI / AVX2 dot products where the CPU has them).
//!
//! Its reference is the dense kernel over the dequantized weights; the two differ by the
//! activation quantization only (tested in `tests/quantized.rs`).

use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{DType, Result, Tensor};

use super::KernelError;
use crate::model::moe::ExpertMatrices;

const OP: &str = "quantized_experts";

/// `x` `[N, H]`, `expert_ids` `[N]` (ids ≥ E are the skip class: zero rows), `weights`
/// `[N, 1]` or `[N]`; returns `[N, H]` in the dtype of `x`.
pub fn moe_experts(
    x: &Tensor,
    expert_ids: &[u32],
    weights: &Tensor,
    gate_up: &ExpertMatrices,
    down: &ExpertMatrices,
) -> Result<Tensor> {
    let (n, h) = x.dims2()?;
    if expert_ids.len() != n {
        return Err(KernelError::Shape {
            op: OP,
            message: format!("{} expert ids for {n} tokens", expert_ids.len()),
        }
        .into());
    }
    let e = count(gate_up)?;
    if count(down)? != e {
        return Err(KernelError::Shape {
            op: OP,
            message: format!("gate_up has {e} experts, down {}", count(down)?),
        }
        .into());
    }
    let weights = weights.reshape((n, 1))?;
    let mut buckets: Vec<Vec<u32>> = vec![Vec::new(); e];
    for (tok, &c) in expert_ids.iter().enumerate() {
        if (c as usize) < e {
            buckets[c as usize].push(tok as u32);
        }
    }
    let mut out = x.zeros_like()?;
    for (ex, rows) in buckets.iter().enumerate() {
        if rows.is_empty() {
            continue;
        }
        let idx = Tensor::new(rows.as_slice(), x.device())?;
        let xs = x.index_select(&idx, 0)?;
        let gu = matmul_t(&xs, gate_up, ex)?;
        let hidden = super::swiglu(&gu)?;
        let y = matmul_t(&hidden, down, ex)?;
        if y.dim(1)? != h {
            return Err(KernelError::Shape {
                op: OP,
                message: format!(
                    "expert {ex} down projection gives {} features, expected {h}",
                    y.dim(1)?
                ),
            }
            .into());
        }
        let w = weights.index_select(&idx, 0)?;
        out = out.index_add(&idx, &y.broadcast_mul(&w)?, 0)?;
    }
    Ok(out)
}

fn count(m: &ExpertMatrices) -> Result<usize> {
    match m {
        ExpertMatrices::Dense(t) => t.dim(0),
        ExpertMatrices::Quantized(qs) => Ok(qs.len()),
    }
}

/// `xs · W_eᵀ` in the dtype of `xs`.
fn matmul_t(xs: &Tensor, w: &ExpertMatrices, e: usize) -> Result<Tensor> {
    match w {
        ExpertMatrices::Dense(t) => xs.matmul(&t.get(e)?.t()?),
        ExpertMatrices::Quantized(qs) => qmatmul_t(xs, &qs[e]),
    }
}

/// `xs · Qᵀ` through candle's quantized CPU matmul (f32 in, f32 out).
pub(crate) fn qmatmul_t(xs: &Tensor, q: &Arc<QTensor>) -> Result<Tensor> {
    let y = xs
        .to_dtype(DType::F32)?
        .contiguous()?
        .apply_op1_no_bwd(q.as_ref())?;
    y.to_dtype(xs.dtype())
}
