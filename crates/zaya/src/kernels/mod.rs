//! Numerical building blocks of the model, each dispatched at run time between its
//! reference implementation ([`reference`](mod@reference), differentiable candle ops, the definition) and
//! fast ones (fused multi-threaded CPU code as candle `CustomOp`s with a backward, or the
//! system BLAS). [`registry`] declares what each implementation supports and holds the
//! overrides (`ZAYA_KERNELS=reference`, `ZAYA_KERNEL_<NAME>=reference|fast`, or from code).
//!
//! Every function here has the signature of its reference and computes the same function
//! with gradients (fast versions differ only by rounding: they compute in f32 and round once
//! where the reference rounds after every op in bf16/f16).
//!
//! Where the model plugs in: `rms_norm`, `softmax`, `rotary` and `swiglu` are already
//! called by the model; [`cca_conv`] replaces the two convolutions in
//! `CcaProjection::forward` (pass the `[B, S+T, C]` history-padded input), [`moe_experts`]
//! replaces the expert loop of `ZayaExperts::forward` (`routing.choice`, `routing.weight`),
//! and [`matmul`] is the product of `Linear::forward` (`matmul(&x2d, &w.t()?)`).
//!
//! Threads: the fused kernels use [`num_threads`] (`CANDLE_NUM_THREADS`, else
//! `RAYON_NUM_THREADS`, else the available cores) on their own pool.

use candle_core::{DType, Result, Tensor};

#[macro_use]
pub(crate) mod cpu;
/// Most rows for which the fused matmul takes its row-wise GEMV path (decode batches).
pub const GEMV_ROWS: usize = cpu::GEMV_ROWS;
pub mod reference;
pub mod registry;

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod amx;
mod bf16;
mod bias_add;
mod cca_conv;
mod gelu;
mod k_quants;
mod log_prob;
pub mod loss_head;
pub(crate) mod matmul;
mod moe;
mod q2k_q8k;
mod q3k_q8k;
mod q4k_q8k;
mod q5k_q8k;
mod q6k_q8k;
mod q8_0;
mod q8k;
mod qk_norm;
pub mod quantized;
mod residual_scale;
mod rms_norm;
mod rotary;
mod router_eda;
mod sgemm;
mod softmax;
mod swiglu;
mod team;

pub use cpu::num_threads;

/// Runs `f` on a thread of the kernels' pool: every kernel it calls then splits its work
/// with the pool's other threads (the caller takes part), where a call from outside hands
/// each kernel to the pool and waits. For loops of many small forwards (the engine's step
/// loop), whose thread would otherwise compete with the pool's threads for the cores.
/// The caller's scoped kernel choices ([`registry::with_choice`]) hold inside `f`.
pub fn run_in_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let choices = registry::scoped_choices();
    cpu::in_pool(move || registry::with_scoped(choices, f))
}
/// The GGML block fields the GPTQ rounding reads (`crate::gptq`).
pub(crate) use k_quants::{f16_at, scale_min_k4};
pub use matmul::blas_available;
use registry::{ImplId, Kernel};

/// Errors of the kernel layer (bad overrides, unsupported inputs). Kernel functions return
/// candle's `Result` like the ops they replace; these errors travel inside it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum KernelError {
    #[error("kernel {op}: unsupported dtype {dtype:?}")]
    UnsupportedDtype { op: &'static str, dtype: DType },

    #[error("kernel {op}: {message}")]
    Shape { op: &'static str, message: String },

    #[error("kernel {op}: {what} must be contiguous")]
    NotContiguous {
        op: &'static str,
        what: &'static str,
    },

    #[error("kernel {kernel}: no implementation `{value}` (known: {known})")]
    UnknownImpl {
        kernel: &'static str,
        value: String,
        known: String,
    },

    #[error("kernel {kernel}: implementation `{implementation}` is not built into this binary")]
    ImplUnavailable {
        kernel: &'static str,
        implementation: &'static str,
    },

    #[error("{var}={value}: {message}")]
    BadEnv {
        var: String,
        value: String,
        message: String,
    },

    #[error("kernel {op}: {message}")]
    Backward { op: &'static str, message: String },

    #[error("internal kernel error: {0}")]
    Internal(String),
}

impl From<KernelError> for candle_core::Error {
    fn from(e: KernelError) -> Self {
        candle_core::Error::wrap(e)
    }
}

fn pick(kernel: Kernel, t: &Tensor) -> Result<ImplId> {
    Ok(registry::select(kernel, t.device(), t.dtype(), t.shape())?)
}

fn not_an_impl(kernel: Kernel, id: ImplId) -> candle_core::Error {
    KernelError::Internal(format!(
        "{} has no implementation {}",
        kernel.name(),
        id.name()
    ))
    .into()
}

/// `w ⊙ cast_back( x / sqrt(mean(x²) + eps) )` with the statistics in f32, as `ZayaRMSNorm`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    match pick(Kernel::RmsNorm, x)? {
        ImplId::Reference => reference::rms_norm(x, weight, eps),
        ImplId::Fused => rms_norm::fused(x, weight, eps),
        id => Err(not_an_impl(Kernel::RmsNorm, id)),
    }
}

/// `x.to_dtype(dtype)`, the same bits: an f32 tensor outside any graph cast to bf16 on the
/// CPU is rounded on the kernel pool ([`cpu::to_bf16`]; candle rounds on one thread), every
/// other cast is candle's. A bf16 model casts the f32 residual stream before each norm.
pub fn to_dtype(x: &Tensor, dtype: candle_core::DType) -> Result<Tensor> {
    use candle_core::DType;
    if x.dtype() == DType::F32
        && dtype == DType::BF16
        && x.device().is_cpu()
        && !x.track_op()
        && x.is_contiguous()
    {
        let v = cpu::with_cpu_storage(x, "to_dtype", |s, l| match (s, l.contiguous_offsets()) {
            (candle_core::CpuStorage::F32(d), Some((a, b))) => Ok(Some(cpu::to_bf16(&d[a..b]))),
            _ => Ok(None),
        })?;
        if let Some(v) = v {
            return Tensor::from_vec(v, x.shape(), x.device());
        }
    }
    x.to_dtype(dtype)
}

/// Softmax over the last axis computed in f32 and cast back to the input dtype.
pub fn softmax_f32(x: &Tensor) -> Result<Tensor> {
    match pick(Kernel::Softmax, x)? {
        ImplId::Reference => reference::softmax_f32(x),
        ImplId::Fused => softmax::fused(x),
        id => Err(not_an_impl(Kernel::Softmax, id)),
    }
}

/// Softmax over the last axis returning the input dtype (the router's softmax); computed in
/// f32 and rounded once, like torch on reduced-precision inputs.
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    softmax_f32(x)
}

/// Partial rotate-half RoPE: the first `cos.dim(-1)` dims of each head are rotated with
/// pairs `(i, i + rd/2)`, the rest pass through. `x` is `[B, heads, T, D]`, `cos`/`sin` are
/// `[B or 1, T, rd]`.
pub fn rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    match pick(Kernel::Rotary, x)? {
        ImplId::Reference => reference::rotary(x, cos, sin),
        ImplId::Fused => rotary::fused(x, cos, sin),
        id => Err(not_an_impl(Kernel::Rotary, id)),
    }
}

/// SwiGLU on a fused `[.., 2I]` gate/up projection: `silu(gate) ⊙ up`, gate first.
pub fn swiglu(gate_up: &Tensor) -> Result<Tensor> {
    match pick(Kernel::Swiglu, gate_up)? {
        ImplId::Reference => reference::swiglu(gate_up),
        ImplId::Fused => swiglu::fused(gate_up),
        id => Err(not_an_impl(Kernel::Swiglu, id)),
    }
}

/// SwiGLU with a bias `[2I]` added to the fused projection before the activation.
pub fn bias_swiglu(gate_up: &Tensor, bias: &Tensor) -> Result<Tensor> {
    match pick(Kernel::BiasSwiglu, gate_up)? {
        ImplId::Reference => reference::bias_swiglu(gate_up, bias),
        ImplId::Fused => swiglu::fused_bias(gate_up, bias),
        id => Err(not_an_impl(Kernel::BiasSwiglu, id)),
    }
}

/// The CCA projection's two causal convolutions: `x` `[B, S+T, C]` (history columns
/// first), depthwise `w0` `[C,1,K0]`, `b0` `[C]`, grouped `w1` `[C, C/groups, K1]`, `b1`
/// `[C]` → `[B, T, C]`. See [`reference::cca_conv`].
pub fn cca_conv(
    x: &Tensor,
    w0: &Tensor,
    b0: &Tensor,
    w1: &Tensor,
    b1: &Tensor,
    groups: usize,
) -> Result<Tensor> {
    match pick(Kernel::CcaConv, x)? {
        ImplId::Reference => reference::cca_conv(x, w0, b0, w1, b1, groups),
        ImplId::Fused => cca_conv::fused(x, w0, b0, w1, b1, groups),
        id => Err(not_an_impl(Kernel::CcaConv, id)),
    }
}

/// The decoder layer's residual-scale merge,
/// `f32((sub + sub_bias) ⊙ sub_scale) + (residual + res_bias) ⊙ res_scale` with `residual`
/// the f32 residual stream and `[H]` parameters. See [`reference::residual_scale`].
pub fn residual_scale(
    sub: &Tensor,
    residual: &Tensor,
    sub_bias: &Tensor,
    sub_scale: &Tensor,
    res_bias: &Tensor,
    res_scale: &Tensor,
) -> Result<Tensor> {
    match pick(Kernel::ResidualScale, sub)? {
        ImplId::Reference => {
            reference::residual_scale(sub, residual, sub_bias, sub_scale, res_bias, res_scale)
        }
        ImplId::Fused => {
            residual_scale::fused(sub, residual, sub_bias, sub_scale, res_bias, res_scale)
        }
        id => Err(not_an_impl(Kernel::ResidualScale, id)),
    }
}

/// The CCA query/key tail: mean residuals of the raw projections `u`, added to the
/// convolution output `z` (both `[B, T, (Nq + Nkv)·D]`), QK-norm to √D and the keys' `temp`
/// `[Nkv]`. Returns queries `[B, T, Nq, D]` and keys `[B, T, Nkv, D]`. See
/// [`reference::cca_qk_norm`].
pub fn cca_qk_norm(
    z: &Tensor,
    u: &Tensor,
    temp: &Tensor,
    num_heads: usize,
    num_kv_heads: usize,
) -> Result<(Tensor, Tensor)> {
    qk_norm::check(z, u, temp, num_heads, num_kv_heads)?;
    match pick(Kernel::CcaQkNorm, z)? {
        ImplId::Reference => reference::cca_qk_norm(z, u, temp, num_heads, num_kv_heads),
        ImplId::Fused => qk_norm::fused(z, u, temp, num_heads, num_kv_heads),
        id => Err(not_an_impl(Kernel::CcaQkNorm, id)),
    }
}

/// The router's EDA step `state + prev ⊙ scale` (`scale` `[R]`, `router_states_scale`).
pub fn router_eda(state: &Tensor, prev: &Tensor, scale: &Tensor) -> Result<Tensor> {
    match pick(Kernel::RouterEda, state)? {
        ImplId::Reference => reference::router_eda(state, prev, scale),
        ImplId::Fused => router_eda::fused(state, prev, scale),
        id => Err(not_an_impl(Kernel::RouterEda, id)),
    }
}

/// The log-probability of each row's target class, `log_softmax(logits)[n, ids[n]]`
/// (`logits` `[N, V]`, `ids` `[N, 1]` u32) → `[N, 1]`: the loss head's cross-entropy term.
pub fn log_prob_gather(logits: &Tensor, ids: &Tensor) -> Result<Tensor> {
    log_prob::check(logits, ids)?;
    match pick(Kernel::LogProbGather, logits)? {
        ImplId::Reference => reference::log_prob_gather(logits, ids),
        ImplId::Fused => log_prob::fused(logits, ids),
        id => Err(not_an_impl(Kernel::LogProbGather, id)),
    }
}

/// The training LM head's forward and backward over counted rows in one call (see
/// [`loss_head`]): `hidden` `[N, H]`, `weight` `[V, H]`, `bias` `[V]`, all f32.
/// `Some` with the fused kernel's result; `None` where the registry picks the reference,
/// which is the caller's chunked autograd path (`train::loss`).
#[allow(clippy::too_many_arguments)]
pub fn loss_head_backward(
    hidden: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    rows: &[u32],
    ids: &[u32],
    coef: &[f32],
    inv_temp: f32,
    chunk: usize,
) -> Result<Option<loss_head::HeadGradients>> {
    if pick(Kernel::LossHead, weight)? != ImplId::Fused
        || hidden.dtype() != DType::F32
        || bias.is_some_and(|b| b.dtype() != DType::F32)
    {
        return Ok(None);
    }
    let (v, h) = weight.dims2()?;
    let n_hidden = hidden.dims2()?.0;
    if hidden.dims() != [n_hidden, h] {
        return Err(KernelError::Shape {
            op: "loss_head",
            message: format!(
                "hidden {:?} does not match the head weight {:?}",
                hidden.dims(),
                weight.dims()
            ),
        }
        .into());
    }
    let (want_weight, want_bias) = (weight.track_op(), bias.is_some_and(Tensor::track_op));
    let w = weight.contiguous()?;
    let x = hidden.contiguous()?;
    let b = bias.map(Tensor::contiguous).transpose()?;
    let out = cpu::with_cpu_storage(&w, "loss_head", |ws, wl| {
        cpu::with_cpu_storage(&x, "loss_head", |xs, xl| {
            let wv = cpu::f32_view(ws, wl, "loss_head")?;
            let xv = cpu::f32_view(xs, xl, "loss_head")?;
            let bv = b.as_ref().map(cpu::host_f32).transpose()?;
            let params = loss_head::HeadParams {
                weight: &wv,
                bias: bv.as_deref(),
                vocab: v,
                hidden: h,
            };
            let counted = loss_head::HeadRows {
                hidden: &xv,
                rows,
                ids,
                coef,
            };
            Ok(loss_head::backward(
                &params,
                &counted,
                inv_temp,
                chunk,
                want_weight,
                want_bias,
            )?)
        })
    })?;
    Ok(Some(out))
}

/// A linear layer's bias, `y + bias` over the last axis (`bias` `[N]`).
pub fn bias_add(y: &Tensor, bias: &Tensor) -> Result<Tensor> {
    match pick(Kernel::BiasAdd, y)? {
        ImplId::Reference => reference::bias_add(y, bias),
        ImplId::Fused => bias_add::fused(y, bias),
        id => Err(not_an_impl(Kernel::BiasAdd, id)),
    }
}

/// The exact GELU `½ x (1 + erf(x / √2))` (the router MLP's activation).
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    match pick(Kernel::GeluErf, x)? {
        ImplId::Reference => reference::gelu_erf(x),
        ImplId::Fused => gelu::fused(x),
        id => Err(not_an_impl(Kernel::GeluErf, id)),
    }
}

/// Top-1 SwiGLU experts: `x` `[N, H]`, `expert_ids[n]` (`≥ E` = skip → zero row),
/// `weights` `[N]`/`[N,1]`, `gate_up` `[E, 2I, H]`, `down` `[E, H, I]` → `[N, H]`.
/// See [`reference::moe_experts`].
pub fn moe_experts(
    x: &Tensor,
    expert_ids: &[u32],
    weights: &Tensor,
    gate_up: &Tensor,
    down: &Tensor,
) -> Result<Tensor> {
    moe_experts_of_forward(x, expert_ids, weights, gate_up, down, x.dim(0)?)
}

/// [`moe_experts`] on the share of a forward of `forward_rows` tokens that an
/// expert-parallel rank received: the fused kernel chooses its products by the whole
/// forward's size (a decode step or not), so a mesh computes every expert row exactly as
/// one rank does.
pub fn moe_experts_of_forward(
    x: &Tensor,
    expert_ids: &[u32],
    weights: &Tensor,
    gate_up: &Tensor,
    down: &Tensor,
    forward_rows: usize,
) -> Result<Tensor> {
    match pick(Kernel::MoeExperts, x)? {
        ImplId::Reference => reference::moe_experts(x, expert_ids, weights, gate_up, down),
        ImplId::Fused => moe::fused(x, expert_ids, weights, gate_up, down, forward_rows),
        id => Err(not_an_impl(Kernel::MoeExperts, id)),
    }
}

/// `x · Wᵀ` for a linear layer's weight `W [out, in]` (PyTorch's layout), `x` `[rows, in]`:
/// [`matmul`] of `x` and `W`'s transpose, except that the f32 fast path takes `W` itself,
/// so that its gradient is written in `W`'s layout (see [`matmul::f32_linear`]).
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let wt = w.t()?;
    if x.rank() != 2 || w.rank() != 2 {
        return reference::matmul(x, &wt);
    }
    match select_matmul(x, w.dtype())? {
        ImplId::Fused if w.dtype() == DType::F32 && x.dtype() == DType::F32 => {
            matmul::f32_linear(x, w)
        }
        id => matmul_with(id, x, &wt),
    }
}

/// [`linear`] of one 2-D input against several weights `[Nᵢ, K]` at once where the
/// registry's fused f32 kernel takes them as one product (a decode step's f32 rows: one
/// GEMV over all the weights' rows, each output what [`linear`] gives for its weight
/// alone); `None` where it does not (other kernels or dtypes, more rows, a gradient graph):
/// the caller runs them one by one.
pub fn linear_same_input(x: &Tensor, ws: &[&Tensor]) -> Result<Option<Vec<Tensor>>> {
    if x.rank() != 2 || ws.iter().any(|w| w.rank() != 2 || w.dtype() != DType::F32) {
        return Ok(None);
    }
    match select_matmul(x, DType::F32)? {
        ImplId::Fused => matmul::f32_linear_same_input(x, ws),
        _ => Ok(None),
    }
}

/// `a · b` for linear layers (`b` is `Wᵀ` of a weight `W [N, K]`; a layer holding `W` calls
/// [`linear`]). 2-D f32 operands may run on the system BLAS (feature `blas`), else on the
/// f32-weight op (decode's GEMV up to 32 rows, zaya's AVX-512 GEMM or the `gemm` crate
/// into unfilled outputs above, its own backward).
/// Dispatch is on the **weight's** dtype: a bf16 weight (with bf16 or f32 activations) runs
/// the bf16-weight kernel, which reads the stored bf16 in place with f32 accumulation, at
/// any number of rows. Everything else is candle's matmul.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.rank() != 2 || b.rank() != 2 {
        return reference::matmul(a, b);
    }
    matmul_with(select_matmul(a, b.dtype())?, a, b)
}

/// The registry's choice for a product of the 2-D `a` with a 2-D weight of `weight_dtype`:
/// it sees the weight's dtype and the lhs shape.
fn select_matmul(a: &Tensor, weight_dtype: DType) -> Result<ImplId> {
    Ok(registry::select(
        Kernel::Matmul,
        a.device(),
        weight_dtype,
        a.shape(),
    )?)
}

/// [`matmul`] of 2-D operands through implementation `id`.
fn matmul_with(id: ImplId, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    match id {
        ImplId::Reference => reference::matmul(a, b),
        ImplId::Blas if b.dtype() == a.dtype() && b.dim(0)? == a.dim(1)? => matmul::blas(a, b),
        ImplId::Blas => reference::matmul(a, b),
        ImplId::Fused if b.dtype() == DType::BF16 => matmul::bf16_weight(a, b),
        ImplId::Fused => matmul::f32_weight(a, b),
    }
}

#[cfg(test)]
mod tests {
    use super::reference::{rms_norm, rotary};
    use candle_core::{DType, Device, Tensor};

    #[test]
    fn the_pool_casts_between_f32_and_bf16_give_candles_bits() {
        // ties, denormals, infinities, NaNs, overflow to infinity; long enough to be split
        let special = [
            0.0f32,
            -0.0,
            1.0 + f32::EPSILON * 65536.0 * 0.5,
            f32::from_bits(0x3F80_8000),
            f32::from_bits(0x3F81_8000),
            1e-40,
            -3e-39,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::from_bits(0x7F80_0001),
            f32::MAX,
            3.3895e38,
        ];
        let n = 5 * 26_217;
        let v: Vec<f32> = (0..n)
            .map(|i| match i % 97 {
                j if j < special.len() => special[j],
                _ => ((i as u32).wrapping_mul(2_654_435_761) as f32) * 1e-7 - 200.0,
            })
            .collect();
        let x = Tensor::from_vec(v, (n / 5, 5), &Device::Cpu).unwrap();
        let ours = super::to_dtype(&x, DType::BF16).unwrap();
        let candle = x.to_dtype(DType::BF16).unwrap();
        assert_eq!(ours.shape(), candle.shape());
        let (a, b) = (
            ours.flatten_all().unwrap().to_vec1::<half::bf16>().unwrap(),
            candle
                .flatten_all()
                .unwrap()
                .to_vec1::<half::bf16>()
                .unwrap(),
        );
        assert!(a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()));
        // strided input and other casts fall back to candle's
        let t = super::to_dtype(&x.t().unwrap(), DType::BF16).unwrap();
        assert_eq!(t.dims(), &[5, n / 5]);
        // and back: the fused kernels' pooled widening of bf16 inputs gives candle's f32
        let wide = super::cpu::with_cpu_storage(&ours, "test", |s, l| {
            Ok(super::cpu::f32_view(s, l, "test")?.into_owned())
        })
        .unwrap();
        let candle = ours.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
        let candle = candle.to_vec1::<f32>().unwrap();
        assert_eq!(wide.len(), candle.len());
        assert!(wide
            .iter()
            .zip(&candle)
            .all(|(p, q)| p.to_bits() == q.to_bits() || (p.is_nan() && q.is_nan())));
    }

    #[test]
    fn rotary_rotates_pairs_half_apart_and_keeps_the_tail() {
        let dev = Device::Cpu;
        // one head, one position, D = 6, rd = 4: pairs (0,2), (1,3); dims 4,5 untouched
        let x = Tensor::new(&[[[[1f32, 2., 3., 4., 5., 6.]]]], &dev).unwrap();
        let angle = [0.3f32, 0.7];
        let cos = Tensor::new(
            &[[[
                angle[0].cos(),
                angle[1].cos(),
                angle[0].cos(),
                angle[1].cos(),
            ]]],
            &dev,
        )
        .unwrap();
        let sin = Tensor::new(
            &[[[
                angle[0].sin(),
                angle[1].sin(),
                angle[0].sin(),
                angle[1].sin(),
            ]]],
            &dev,
        )
        .unwrap();
        let want = [
            1. * angle[0].cos() - 3. * angle[0].sin(),
            2. * angle[1].cos() - 4. * angle[1].sin(),
            3. * angle[0].cos() + 1. * angle[0].sin(),
            4. * angle[1].cos() + 2. * angle[1].sin(),
            5.,
            6.,
        ];
        for y in [
            rotary(&x, &cos, &sin).unwrap(),
            super::rotary(&x, &cos, &sin).unwrap(),
        ] {
            let y: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
            for (a, b) in y.iter().zip(want) {
                assert!((a - b).abs() < 1e-6, "{y:?} vs {want:?}");
            }
        }
    }

    #[test]
    fn rms_norm_matches_definition() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[3f32, 4.]], &dev).unwrap();
        let w = Tensor::new(&[2f32, 1.], &dev).unwrap();
        let rms = (12.5f32).sqrt();
        for y in [
            rms_norm(&x, &w, 0.0).unwrap(),
            super::rms_norm(&x, &w, 0.0).unwrap(),
        ] {
            let y: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
            assert!((y[0] - 6. / rms).abs() < 1e-6 && (y[1] - 4. / rms).abs() < 1e-6);
        }
    }
}
