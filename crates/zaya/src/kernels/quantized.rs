//! Top-1 MoE experts over weights that are (at least partly) block-quantized. Same grouping
//! as the dense kernel: tokens bucketed by expert, per expert one matmul for gate/up over
//! the gathered rows, SwiGLU, one matmul for down, rows scattered back and scaled by the
//! routing weight (a differentiable multiply, as in the dense path, though the quantized
//! weights themselves are frozen). Q8_0 matmuls run on [`super::q8_0`] (f32 activations);
//! the k-quants (Q2_K to Q6_K) on the `q*k_q8k` kernels over [`super::q8k`]'s bodies
//! (candle's Q8_K activation rounding and integer sums, on the blocks in place), or Q4_K
//! and Q6_K on [`super::k_quants`] (f32 activations) when `ZAYA_KQUANT_F32=1`; the other
//! formats on candle's quantized CPU matmul (it quantizes the activations to the weight's
//! dot-product partner format, Q8_0 / Q8_K, and runs AVX-512 VNNI / AVX2 dot products
//! where the CPU has them).
//!
//! Its reference is the dense kernel over the dequantized weights; the two differ by
//! summation order (Q8_0; Q4_K / Q6_K with `ZAYA_KQUANT_F32=1`) or by the activation
//! quantization (the other formats, the k-quants by default; tested in
//! `tests/quantized.rs`).

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
    // candle's gather takes contiguous rows only (the dense kernels take any view)
    let x = &x.contiguous()?;
    let weights = weights.reshape((n, 1))?.contiguous()?;
    let mut buckets: Vec<Vec<u32>> = vec![Vec::new(); e];
    for (tok, &c) in expert_ids.iter().enumerate() {
        if (c as usize) < e {
            buckets[c as usize].push(tok as u32);
        }
    }
    // Each expert's scaled rows, stacked in bucket order with one zero row (for tokens
    // routed to no expert) at the end, then put in token order by one gather. (Adding
    // each expert's rows into the output with `index_add` copied the whole `[N, H]` output
    // once per expert: sixteen passes a layer in a prefill.)
    let mut parts = Vec::with_capacity(e + 1);
    let zero_row = buckets.iter().map(Vec::len).sum::<usize>() as u32;
    let mut order = vec![zero_row; n];
    let mut next = 0u32;
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
        parts.push(y.broadcast_mul(&w)?);
        for &tok in rows {
            order[tok as usize] = next;
            next += 1;
        }
    }
    parts.push(Tensor::zeros((1, h), x.dtype(), x.device())?);
    Tensor::cat(&parts, 0)?.index_select(&Tensor::new(order, x.device())?, 0)
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

/// `xs · Qᵀ` in f32: Q8_0 weights through [`super::q8_0`] (f32 activations), the k-quants
/// (Q2_K to Q6_K) through the `q*k_q8k` kernels on [`super::q8k`]'s bodies (or, opted in,
/// Q4_K / Q6_K through [`super::k_quants`] with f32 activations), the other formats through candle's quantized CPU matmul. The weight
/// is frozen; the input gets a gradient (QLoRA trains adapters on top of a quantized base),
/// computed against the dequantized weight a block of rows at a time.
pub(crate) fn qmatmul_t(xs: &Tensor, q: &Arc<QTensor>) -> Result<Tensor> {
    let x = xs.to_dtype(DType::F32)?.contiguous()?;
    let y = if x.track_op() {
        x.apply_op1(FrozenQMatMul(Arc::clone(q)))?
    } else {
        x.apply_op1_no_bwd(&FrozenQMatMul(Arc::clone(q)))?
    };
    y.to_dtype(xs.dtype())
}

/// `[xs · Q₁ᵀ, xs · Q₂ᵀ, …]` for k-quant weights of one format and input width (a layer's
/// projections of the same input): `xs` is rounded to Q8_K once and all the weights' rows
/// are split over the threads as one product ([`super::q8k::linear_many`]); each output
/// equals [`qmatmul_t`]'s for its weight. `None` where that does not apply (other or mixed
/// formats, an input under a gradient graph, the f32 k-quant kernel opted in, a non-CPU
/// tensor): the caller runs the products one by one.
pub(crate) fn qmatmul_t_same_input(
    xs: &Tensor,
    qs: &[&Arc<QTensor>],
) -> Result<Option<Vec<Tensor>>> {
    let Some(first) = qs.first() else {
        return Ok(Some(Vec::new()));
    };
    let Some(format) = super::q8k::format_of(first.dtype()) else {
        return Ok(None);
    };
    let k = first.shape().dims2()?.1;
    let same = qs
        .iter()
        .all(|q| q.dtype() == first.dtype() && q.shape().dims2().is_ok_and(|(_, qk)| qk == k));
    let fits = same
        && xs.device().is_cpu()
        && xs.dims().last() == Some(&k)
        && !xs.track_op()
        && !(matches!(first.dtype(), GgmlDType::Q4K | GgmlDType::Q6K) && kquant_f32_kernel());
    if !fits {
        return Ok(None);
    }
    let x = xs.to_dtype(DType::F32)?.contiguous()?;
    let m = x.elem_count() / k.max(1);
    let ns = qs
        .iter()
        .map(|q| Ok(q.shape().dims2()?.0))
        .collect::<Result<Vec<usize>>>()?;
    let n: usize = ns.iter().sum();
    let data = qs.iter().map(|q| q.data()).collect::<Result<Vec<_>>>()?;
    let weights: Vec<(&[u8], usize)> = data
        .iter()
        .map(|d| d.as_ref())
        .zip(ns.iter().copied())
        .collect();
    let mut out = vec![0f32; m * n];
    super::cpu::with_cpu_storage(&x, OP, |s, l| {
        let x = super::cpu::f32_view(s, l, OP)?;
        super::q8k::linear_many(format, &x, m, k, &weights, &mut out)
    })?;
    let mut dims = xs.dims().to_vec();
    *dims.last_mut().expect("rank >= 1") = n;
    let y = Tensor::from_vec(out, dims, xs.device())?.to_dtype(xs.dtype())?;
    super::cpu::split_last_axis(&y, &ns).map(Some)
}

/// Whether Q4_K / Q6_K products run on [`super::k_quants`] (f32 activations, no activation
/// rounding): opt-in with `ZAYA_KQUANT_F32=1`, read once. Off by default because an f32
/// multiply-add per weight is slower than integer dot products on Q8_K-rounded activations
/// (medium model, q4_k, 2 threads, Sapphire Rapids: decode b1 32 tok/s against candle's 48).
fn kquant_f32_kernel() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("ZAYA_KQUANT_F32").is_ok_and(|v| v.trim() == "1"))
}

/// candle's quantized matmul with a backward for its input only.
struct FrozenQMatMul(Arc<QTensor>);

/// Dequantized rows held at once by the backward (16 Mi f32 = 64 MiB).
const DEQUANT_CHUNK_ELEMS: usize = 1 << 24;

impl candle_core::CustomOp1 for FrozenQMatMul {
    fn name(&self) -> &'static str {
        "zaya-frozen-qmatmul"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let q = self.0.as_ref();
        let (n, k) = q.shape().dims2()?;
        let dims = l.dims();
        match (
            q.dtype(),
            super::q8k::format_of(q.dtype()),
            s,
            l.contiguous_offsets(),
        ) {
            (GgmlDType::Q8_0, _, candle_core::CpuStorage::F32(x), Some((a, b)))
                if dims.last() == Some(&k) =>
            {
                let m = (b - a) / k.max(1);
                let mut out = vec![0f32; m * n];
                super::q8_0::linear(&x[a..b], m, k, &q.data()?, n, &mut out)?;
                let mut out_dims = dims.to_vec();
                *out_dims.last_mut().expect("rank >= 1") = n;
                Ok((candle_core::CpuStorage::F32(out), out_dims.into()))
            }
            (
                kind @ (GgmlDType::Q4K | GgmlDType::Q6K),
                _,
                candle_core::CpuStorage::F32(x),
                Some((a, b)),
            ) if dims.last() == Some(&k)
                && k.is_multiple_of(super::k_quants::QK_K)
                && kquant_f32_kernel() =>
            {
                let kind = if kind == GgmlDType::Q4K {
                    super::k_quants::KQuant::Q4K
                } else {
                    super::k_quants::KQuant::Q6K
                };
                let m = (b - a) / k.max(1);
                let mut out = vec![0f32; m * n];
                super::k_quants::linear(kind, &x[a..b], m, k, &q.data()?, n, &mut out)?;
                let mut out_dims = dims.to_vec();
                *out_dims.last_mut().expect("rank >= 1") = n;
                Ok((candle_core::CpuStorage::F32(out), out_dims.into()))
            }
            (_, Some(format), candle_core::CpuStorage::F32(x), Some((a, b)))
                if dims.last() == Some(&k) && k.is_multiple_of(256) =>
            {
                // candle's arithmetic (activations rounded to Q8_K, integer dot products)
                // on the blocks in place, without candle's repacked copy of the matrix (on
                // every CPU: where there is no vector body the portable one is slower than
                // candle's kernels, but those keep a repacked copy the memory estimates do
                // not count)
                let m = (b - a) / k.max(1);
                let mut out = vec![0f32; m * n];
                super::q8k::linear(format, &x[a..b], m, k, &q.data()?, n, &mut out)?;
                let mut out_dims = dims.to_vec();
                *out_dims.last_mut().expect("rank >= 1") = n;
                Ok((candle_core::CpuStorage::F32(out), out_dims.into()))
            }
            _ => candle_core::CustomOp1::cpu_fwd(q, s, l),
        }
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad_times_dequantized(grad, &self.0)?))
    }
}

/// `g · W` for `g` `[.., out]` and the quantized `W` `[out, in]`, dequantizing at most
/// [`DEQUANT_CHUNK_ELEMS`] weights at a time (no full f32 copy of a large matrix).
pub(crate) fn grad_times_dequantized(g: &Tensor, q: &QTensor) -> Result<Tensor> {
    use candle_core::quantized::QStorage;
    let (out, inp) = q.shape().dims2()?;
    let dims = g.dims().to_vec();
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let g = g.to_dtype(DType::F32)?.reshape((rows, out))?;
    let dev = candle_core::Device::Cpu;
    let data = q.data()?;
    let row_bytes = data.len() / out.max(1);
    let chunk = (DEQUANT_CHUNK_ELEMS / inp.max(1)).max(1);
    let mut acc: Option<Tensor> = None;
    for start in (0..out).step_by(chunk) {
        let n = chunk.min(out - start);
        let w = if n == out {
            q.dequantize(&dev)?
        } else {
            let bytes = &data[start * row_bytes..(start + n) * row_bytes];
            let storage = QStorage::from_data(std::borrow::Cow::Borrowed(bytes), &dev, q.dtype())?;
            QTensor::new(storage, (n, inp))?.dequantize(&dev)?
        };
        let part = g.narrow(1, start, n)?.contiguous()?.matmul(&w)?;
        acc = Some(match acc {
            None => part,
            Some(a) => (a + part)?,
        });
    }
    let mut out_dims = dims;
    *out_dims.last_mut().expect("rank >= 1") = inp;
    acc.expect("out >= 1").reshape(out_dims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Against its reference: the dense kernel over the dequantized weights. Q8_0 (and
    /// Q4_K / Q6_K with `ZAYA_KQUANT_F32=1`) run our in-place kernels with f32 activations,
    /// so they differ by summation order only.
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
            // Q8_0 (and Q4_K / Q6_K with ZAYA_KQUANT_F32=1): summation order only (below
            // 1e-6). Otherwise candle rounds both matmuls' activation rows to Q8_K blocks;
            // the SwiGLU output feeding the down projection is heavy-tailed, so its blocks
            // round coarsely (about 2 % here; unseeded draws ranged up to 2.1 %).
            let bound = if d == GgmlDType::Q8_0 || kquant_f32_kernel() {
                1e-5
            } else {
                0.03
            };
            assert!(rel < bound, "{d:?}: relative error {rel}");
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
            let bound = if d == GgmlDType::Q8_0 || kquant_f32_kernel() {
                1e-5
            } else {
                0.02
            };
            assert!(rel < bound, "{d:?} mixed: relative error {rel}");
        }
    }
}
