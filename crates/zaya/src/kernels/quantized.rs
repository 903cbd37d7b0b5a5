//! Top-1 MoE experts over weights that are (at least partly) block-quantized. Same grouping
//! as the dense kernel: tokens bucketed by expert, per expert one matmul for gate/up over
//! the gathered rows, SwiGLU, one matmul for down, rows scattered back and scaled by the
//! routing weight (a differentiable multiply, as in the dense path, though the quantized
//! weights themselves are frozen). Q8_0 matmuls run on [`super::q8_0`] (f32 activations);
//! the other formats on candle's quantized CPU matmul (it quantizes the activations to the
//! weight's dot-product partner format, Q8_0 / Q8_K, and runs AVX-512 VNNI / AVX2 dot
//! products where the CPU has them).
//!
//! Its reference is the dense kernel over the dequantized weights; the two differ by
//! summation order (Q8_0) or by the activation quantization (tested in `tests/quantized.rs`).

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
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

/// `xs · Qᵀ` in f32: Q8_0 weights through our kernel with f32 activations
/// ([`super::q8_0`]), the other formats through candle's quantized CPU matmul.
pub(crate) fn qmatmul_t(xs: &Tensor, q: &Arc<QTensor>) -> Result<Tensor> {
    let x = xs.to_dtype(DType::F32)?.contiguous()?;
    let y = match (q.dtype(), q.shape().dims2()) {
        (GgmlDType::Q8_0, Ok((n, k))) if x.rank() == 2 && x.dim(1)? == k => {
            let m = x.dim(0)?;
            let xv = x.flatten_all()?.to_vec1::<f32>()?;
            let mut out = vec![0f32; m * n];
            super::q8_0::linear(&xv, m, k, &q.data()?, n, &mut out)?;
            Tensor::from_vec(out, (m, n), x.device())?
        }
        _ => x.apply_op1_no_bwd(q.as_ref())?,
    };
    y.to_dtype(xs.dtype())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Against its reference: the dense kernel over the dequantized weights. They differ by
    /// the activation quantization (Q8) inside candle's quantized matmul only.
    #[test]
    fn quantized_experts_match_the_dense_reference_on_dequantized_weights() {
        let dev = Device::Cpu;
        let (n, h, i, e) = (11, 256, 256, 4);
        // Seeded data: the tolerance below is about this draw, not a random one.
        use rand::{Rng, SeedableRng};
        use rand_distr::Distribution;
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut normal = |shape: &[usize], std: f32| {
            let d = rand_distr::Normal::new(0f32, std).unwrap();
            let v: Vec<f32> = (0..shape.iter().product::<usize>())
                .map(|_| d.sample(&mut rng))
                .collect();
            Tensor::from_vec(v, shape, &dev).unwrap()
        };
        let x = normal(&[n, h], 1.);
        let gu = normal(&[e, 2 * i, h], 0.05);
        let dn = normal(&[e, h, i], 0.05);
        // every expert used, two skipped tokens (id e)
        let ids: Vec<u32> = vec![0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 1];
        let w: Vec<f32> = (0..n).map(|_| rng.random_range(0.2f32..1.0)).collect();
        let w = Tensor::from_vec(w, (n, 1), &dev).unwrap();
        for d in [GgmlDType::Q8_0, GgmlDType::Q4K, GgmlDType::Q6K] {
            let qgu =
                crate::quant::split_experts(&crate::quant::quantize(&gu, d).unwrap()).unwrap();
            let qdn =
                crate::quant::split_experts(&crate::quant::quantize(&dn, d).unwrap()).unwrap();
            let deq = |qs: &[Arc<QTensor>]| {
                let parts: Vec<Tensor> = qs.iter().map(|q| q.dequantize(&dev).unwrap()).collect();
                Tensor::stack(&parts, 0).unwrap()
            };
            let want = crate::kernels::reference::moe_experts(&x, &ids, &w, &deq(&qgu), &deq(&qdn))
                .unwrap();
            let got = moe_experts(
                &x,
                &ids,
                &w,
                &ExpertMatrices::Quantized(qgu.clone()),
                &ExpertMatrices::Quantized(qdn.clone()),
            )
            .unwrap();
            let diff = (&got - &want).unwrap().sqr().unwrap().sum_all().unwrap();
            let norm = want.sqr().unwrap().sum_all().unwrap();
            let rel = (diff.to_scalar::<f32>().unwrap() / norm.to_scalar::<f32>().unwrap()).sqrt();
            eprintln!("{d:?}: relative error {rel}");
            // candle rounds both matmuls' activation rows to Q8 blocks; the SwiGLU output
            // feeding the down projection is heavy-tailed, so its blocks round coarsely
            // (about 2 % here; unseeded draws ranged up to 2.1 %).
            assert!(rel < 0.03, "{d:?}: relative error {rel}");
            // skipped tokens give exact zeros
            for row in [4usize, 9] {
                let r = got.get(row).unwrap().abs().unwrap().sum_all().unwrap();
                assert_eq!(r.to_scalar::<f32>().unwrap(), 0.0);
            }
            // a mixed store (dense gate_up, quantized down) runs the same grouping
            let mixed = moe_experts(
                &x,
                &ids,
                &w,
                &ExpertMatrices::Dense(deq(&qgu)),
                &ExpertMatrices::Quantized(qdn),
            )
            .unwrap();
            let diff = (&mixed - &want).unwrap().sqr().unwrap().sum_all().unwrap();
            let rel = (diff.to_scalar::<f32>().unwrap() / norm.to_scalar::<f32>().unwrap()).sqrt();
            assert!(rel < 0.02, "{d:?} mixed: relative error {rel}");
        }
    }
}
