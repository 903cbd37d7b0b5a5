//! Reference implementations: the definitions every fast kernel is tested against. Built
//! only from differentiable candle ops (candle's fused rms_norm / softmax_last_dim / rope
//! silently drop gradients, so they are never used here).

use candle_core::{DType, Result, Tensor, D};

use super::KernelError;

/// `w ⊙ cast_back( x / sqrt(mean(x²) + eps) )` with the statistics in f32, as `ZayaRMSNorm`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = xf.broadcast_mul(&(var + eps)?.sqrt()?.recip()?)?;
    normed.to_dtype(dtype)?.broadcast_mul(weight)
}

/// Softmax over the last axis computed in f32 and cast back to the input dtype.
pub fn softmax_f32(x: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let max = xf.max_keepdim(D::Minus1)?.detach();
    let e = xf.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&s)?.to_dtype(dtype)
}

/// Softmax over the last axis returning the input dtype (the router's softmax). Like torch
/// on reduced-precision inputs, the arithmetic is done in f32 and rounded once.
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    softmax_f32(x)
}

/// Partial rotate-half RoPE: the first `cos.dim(-1)` dims of each head are rotated with
/// pairs `(i, i + rd/2)`, the rest pass through. `x` is `[B, heads, T, D]`, `cos`/`sin` are
/// `[B or 1, T, rd]`.
pub fn rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let rd = cos.dim(D::Minus1)?;
    if rd == 0 {
        return Ok(x.clone());
    }
    let cos = cos.unsqueeze(1)?;
    let sin = sin.unsqueeze(1)?;
    let x_rot = x.narrow(D::Minus1, 0, rd)?;
    let x1 = x_rot.narrow(D::Minus1, 0, rd / 2)?;
    let x2 = x_rot.narrow(D::Minus1, rd / 2, rd / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    let embedded = (x_rot.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?;
    if rd == d {
        return Ok(embedded);
    }
    let x_pass = x.narrow(D::Minus1, rd, d - rd)?;
    Tensor::cat(&[&embedded, &x_pass], D::Minus1)
}

/// SwiGLU on a fused `[.., 2I]` gate/up projection: `silu(gate) ⊙ up`, gate first.
pub fn swiglu(gate_up: &Tensor) -> Result<Tensor> {
    let i = gate_up.dim(D::Minus1)? / 2;
    let gate = gate_up.narrow(D::Minus1, 0, i)?;
    let up = gate_up.narrow(D::Minus1, i, i)?;
    gate.silu()?.mul(&up)
}

/// SwiGLU with a bias `[2I]` added to the fused projection before the activation.
pub fn bias_swiglu(gate_up: &Tensor, bias: &Tensor) -> Result<Tensor> {
    swiglu(&gate_up.broadcast_add(bias)?)
}

/// The decoder layer's residual-scale merge:
/// `f32((sub + sub_bias) ⊙ sub_scale) + (residual + res_bias) ⊙ res_scale`. Bias first, then
/// scale; the sublayer term in the parameter dtype, the residual term and the sum in f32
/// (`residual` is the f32 residual stream, the parameters are `[H]`).
pub fn residual_scale(
    sub: &Tensor,
    residual: &Tensor,
    sub_bias: &Tensor,
    sub_scale: &Tensor,
    res_bias: &Tensor,
    res_scale: &Tensor,
) -> Result<Tensor> {
    let sub = sub
        .broadcast_add(sub_bias)?
        .broadcast_mul(sub_scale)?
        .to_dtype(DType::F32)?;
    let res = residual
        .broadcast_add(&res_bias.to_dtype(DType::F32)?)?
        .broadcast_mul(&res_scale.to_dtype(DType::F32)?)?;
    sub + res
}

/// The clamp of the QK-norm's head norm: the dtype's machine epsilon, as the reference.
pub fn qk_norm_eps(dtype: DType) -> f64 {
    match dtype {
        DType::BF16 => 0.0078125,
        DType::F16 => 9.765625e-4,
        DType::F64 => f64::EPSILON,
        _ => f32::EPSILON as f64,
    }
}

/// The QK-norm: scales each head of `x` (last axis `head_dim`) to length √D, the norm
/// clamped at the dtype's machine epsilon as the reference does.
pub fn l2_to_sqrt_d(x: &Tensor, head_dim: usize) -> Result<Tensor> {
    let eps = qk_norm_eps(x.dtype());
    // max(√s, ε) computed as √max(s, ε²): the same value (ε² is exact in every dtype
    // here), but the backward never divides by √0 for an all-zero head (e.g. a padding
    // token whose embedding row is zero), which would turn the gradient into NaN.
    let norm = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .maximum(eps * eps)?
        .sqrt()?;
    let factor = (norm.recip()? * (head_dim as f64).sqrt())?;
    x.broadcast_mul(&factor)
}

/// The CCA query/key tail (architecture §5.4): from the convolution output `z` and the raw
/// projections `u` (both `[B, T, C]`, the `Nq` query heads first, then the `Nkv` key heads,
/// `C = (Nq + Nkv)·D`), the q/k mean residuals (`½(q_raw + k_raw)` per query head with its
/// key head repeated, and its mean over each key head's group for the keys), then the
/// QK-norm to length √D, and the keys scaled by `temp` `[Nkv]`. Returns queries
/// `[B, T, Nq, D]` and keys `[B, T, Nkv, D]`.
pub fn cca_qk_norm(
    z: &Tensor,
    u: &Tensor,
    temp: &Tensor,
    num_heads: usize,
    num_kv_heads: usize,
) -> Result<(Tensor, Tensor)> {
    let (b, t, c) = z.dims3()?;
    let (nq, nkv) = (num_heads, num_kv_heads);
    let d = c / (nq + nkv);
    let groups = nq / nkv;
    let q4 = u.narrow(2, 0, nq * d)?.reshape((b, t, nq, d))?;
    let k_rep = u
        .narrow(2, nq * d, nkv * d)?
        .reshape((b, t, nkv, 1, d))?
        .broadcast_as((b, t, nkv, groups, d))?
        .reshape((b, t, nq, d))?;
    let mq = ((q4 + k_rep)? * 0.5)?;
    let mk = mq.reshape((b, t, nkv, groups, d))?.mean(3)?;
    let q = (z.narrow(2, 0, nq * d)?.reshape((b, t, nq, d))? + mq)?;
    let k = (z.narrow(2, nq * d, nkv * d)?.reshape((b, t, nkv, d))? + mk)?;
    let q = l2_to_sqrt_d(&q, d)?;
    let k = l2_to_sqrt_d(&k, d)?.broadcast_mul(&temp.reshape((1, 1, nkv, 1))?)?;
    Ok((q, k))
}

/// The router's EDA step (exponential depth averaging): `state + prev ⊙ scale`, `scale`
/// `[R]` the layer's `router_states_scale`.
pub fn router_eda(state: &Tensor, prev: &Tensor, scale: &Tensor) -> Result<Tensor> {
    state + prev.broadcast_mul(scale)?
}

/// Numerically stable log-softmax over the last axis, built only from ops that have a
/// backward pass (candle's fused `softmax_last_dim` would silently drop the gradient). The
/// row maximum is detached: it cancels exactly in the value, so its gradient is zero anyway.
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

/// The log-probability of each row's target class: `log_softmax(logits)` gathered at
/// `ids` (`logits` `[N, V]`, `ids` `[N, 1]` u32) → `[N, 1]`.
pub fn log_prob_gather(logits: &Tensor, ids: &Tensor) -> Result<Tensor> {
    log_softmax(logits)?.gather(ids, 1)
}

/// A linear layer's bias, `y + bias` over the last axis (`bias` `[N]`).
pub fn bias_add(y: &Tensor, bias: &Tensor) -> Result<Tensor> {
    y.broadcast_add(bias)
}

/// The exact (erf) GELU, `½ x (1 + erf(x / √2))`: candle's differentiable `gelu_erf`.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    x.gelu_erf()
}

/// The two causal convolutions of the CCA projection (architecture §5.4).
///
/// `x` `[B, S+T, C]` is the conv input already padded on the left with the `S = K0+K1−2`
/// history columns (zeros at a sequence start, else the cached ones); `w0` `[C, 1, K0]`,
/// `b0` `[C]` the depthwise conv; `w1` `[C, C/groups, K1]`, `b1` `[C]` the grouped conv.
/// Returns `z` `[B, T, C]`. The depthwise stage runs over `T + K1 − 1` positions (its bias
/// reaches the grouped conv even at padded positions), taps are cross-correlation (tap
/// `K−1` multiplies the newest column).
pub fn cca_conv(
    x: &Tensor,
    w0: &Tensor,
    b0: &Tensor,
    w1: &Tensor,
    b1: &Tensor,
    groups: usize,
) -> Result<Tensor> {
    let (b, len, c) = x.dims3()?;
    let shape = CcaShape::check(len, c, w0, b0, w1, b1, groups)?;
    let (t, k0, k1, d) = (shape.t, shape.k0, shape.k1, shape.d);
    // In reduced precision the reference accumulates both convolutions in f32 and rounds
    // the depthwise output to the input dtype between them, and the result once.
    let dtype = x.dtype();
    let f32s = |t: &Tensor| t.to_dtype(DType::F32);
    let (x, w0, b0, w1, b1) = (f32s(x)?, f32s(w0)?, f32s(b0)?, f32s(w1)?, f32s(b1)?);
    // Depthwise conv: mid_j = b0 + Σ_i w0[:, i] ⊙ x_{j+i}, over T + K1 − 1 positions.
    let t_mid = t + k1 - 1;
    let mut mid = b0
        .reshape((1, 1, c))?
        .broadcast_as((b, t_mid, c))?
        .contiguous()?;
    for i in 0..k0 {
        let w = w0.narrow(2, i, 1)?.reshape((1, 1, c))?;
        mid = (mid + x.narrow(1, i, t_mid)?.broadcast_mul(&w)?)?;
    }
    let mid = mid.to_dtype(dtype)?.to_dtype(DType::F32)?;
    // Grouped conv: per group a [D, K1·D] mixing of K1 consecutive taps, as one batched
    // matmul over the groups.
    let taps = (0..k1)
        .map(|i| mid.narrow(1, i, t)?.reshape((b * t, groups, d)))
        .collect::<Result<Vec<_>>>()?;
    let taps = Tensor::cat(&taps, 2)?.transpose(0, 1)?.contiguous()?; // [G, B·T, K1·D]
    let w = w1
        .reshape((groups, d, d, k1))? // [G, out, in, K1]
        .permute((0, 3, 2, 1))? // [G, K1, in, out]
        .reshape((groups, k1 * d, d))?;
    let z = taps.matmul(&w)?.transpose(0, 1)?.reshape((b, t, c))?;
    z.broadcast_add(&b1.reshape((1, 1, c))?)?.to_dtype(dtype)
}

/// Validated geometry of a [`cca_conv`] call.
pub(crate) struct CcaShape {
    pub t: usize,
    pub k0: usize,
    pub k1: usize,
    pub d: usize,
}

impl CcaShape {
    pub(crate) fn check(
        len: usize,
        c: usize,
        w0: &Tensor,
        b0: &Tensor,
        w1: &Tensor,
        b1: &Tensor,
        groups: usize,
    ) -> Result<CcaShape> {
        let bad = |message: String| -> candle_core::Error {
            KernelError::Shape {
                op: "cca_conv",
                message,
            }
            .into()
        };
        if groups == 0 || !c.is_multiple_of(groups) {
            return Err(bad(format!(
                "{c} channels are not divisible into {groups} groups"
            )));
        }
        let d = c / groups;
        let (wc, one, k0) = w0.dims3()?;
        let (w1c, w1d, k1) = w1.dims3()?;
        if wc != c || one != 1 || k0 == 0 {
            return Err(bad(format!(
                "w0 must be [{c}, 1, K0>0], got {:?}",
                w0.dims()
            )));
        }
        if w1c != c || w1d != d || k1 == 0 {
            return Err(bad(format!(
                "w1 must be [{c}, {d}, K1>0], got {:?}",
                w1.dims()
            )));
        }
        if b0.dims() != [c] || b1.dims() != [c] {
            return Err(bad(format!(
                "biases must be [{c}], got {:?} and {:?}",
                b0.dims(),
                b1.dims()
            )));
        }
        let s = k0 + k1 - 2;
        if len <= s {
            return Err(bad(format!(
                "input has {len} columns, needs the {s} history columns plus at least one new one"
            )));
        }
        Ok(CcaShape {
            t: len - s,
            k0,
            k1,
            d,
        })
    }
}

/// Top-1 SwiGLU experts. `x` `[N, H]`; token `n` goes to expert `expert_ids[n]` (an id
/// `≥ E` is the skip class and yields a zero row); the expert output is scaled by
/// `weights[n]` (`[N]` or `[N, 1]`). `gate_up` `[E, 2I, H]` (gate rows first), `down`
/// `[E, H, I]`. One matmul pair per expert over its gathered tokens, as the model did.
pub fn moe_experts(
    x: &Tensor,
    expert_ids: &[u32],
    weights: &Tensor,
    gate_up: &Tensor,
    down: &Tensor,
) -> Result<Tensor> {
    let shape = MoeShape::check(x, expert_ids, weights, gate_up, down)?;
    // candle's gather takes contiguous rows only; the fused kernel takes any view
    let x = &x.contiguous()?;
    let weights = weights.reshape((shape.n, 1))?.contiguous()?;
    let mut out = x.zeros_like()?;
    let mut buckets: Vec<Vec<u32>> = vec![Vec::new(); shape.e];
    for (tok, &c) in expert_ids.iter().enumerate() {
        if (c as usize) < shape.e {
            buckets[c as usize].push(tok as u32);
        }
    }
    for (e, rows) in buckets.iter().enumerate() {
        if rows.is_empty() {
            continue;
        }
        let idx = Tensor::new(rows.as_slice(), x.device())?;
        let xs = x.index_select(&idx, 0)?;
        let gu = xs.matmul(&gate_up.get(e)?.t()?)?;
        let hidden = swiglu(&gu)?;
        let y = hidden.matmul(&down.get(e)?.t()?)?;
        let w = weights.index_select(&idx, 0)?;
        out = out.index_add(&idx, &y.broadcast_mul(&w)?, 0)?;
    }
    Ok(out)
}

/// Validated geometry of a [`moe_experts`] call.
pub(crate) struct MoeShape {
    pub n: usize,
    pub h: usize,
    pub e: usize,
    pub i: usize,
}

impl MoeShape {
    pub(crate) fn check(
        x: &Tensor,
        expert_ids: &[u32],
        weights: &Tensor,
        gate_up: &Tensor,
        down: &Tensor,
    ) -> Result<MoeShape> {
        let bad = |message: String| -> candle_core::Error {
            KernelError::Shape {
                op: "moe_experts",
                message,
            }
            .into()
        };
        let (n, h) = x.dims2()?;
        let (e, i2, gh) = gate_up.dims3()?;
        let (de, dh, i) = down.dims3()?;
        if expert_ids.len() != n {
            return Err(bad(format!(
                "{} expert ids for {n} tokens",
                expert_ids.len()
            )));
        }
        if weights.elem_count() != n
            || !(weights.rank() == 1 || (weights.rank() == 2 && weights.dim(1)? == 1))
        {
            return Err(bad(format!(
                "weights must be [{n}] or [{n}, 1], got {:?}",
                weights.dims()
            )));
        }
        if gh != h || !i2.is_multiple_of(2) {
            return Err(bad(format!(
                "gate_up must be [E, 2I, {h}], got {:?}",
                gate_up.dims()
            )));
        }
        if de != e || dh != h || i != i2 / 2 {
            return Err(bad(format!(
                "down must be [{e}, {h}, {}], got {:?}",
                i2 / 2,
                down.dims()
            )));
        }
        Ok(MoeShape { n, h, e, i })
    }
}

/// `a · b` (candle's matmul; batched and broadcasting as candle allows).
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.dtype() != b.dtype() {
        // A weight stored in another dtype (bf16 weights, f32 activations) is widened: the
        // product is computed in the activation dtype.
        return a.matmul(&b.to_dtype(a.dtype())?);
    }
    a.matmul(b)
}
