//! Every fast kernel against its reference, forward and backward, over seeded random
//! shapes (odd sizes included) in f32 and bf16. The implementation is picked with the
//! registry's thread-scoped override, and each case first checks that the fast
//! implementation really is the one selected, so a silent fallback would fail the test.

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use zaya::kernels::{
    self,
    registry::{self, Choice, ImplId, Kernel},
};

const CASES: usize = 12;

fn rand_tensor(rng: &mut StdRng, dims: &[usize], scale: f32) -> Result<Tensor> {
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale)
        .collect();
    Ok(Tensor::from_vec(v, dims, &Device::Cpu)?)
}

fn rand_var(rng: &mut StdRng, dims: &[usize], scale: f32, dtype: DType) -> Result<Var> {
    Ok(Var::from_tensor(
        &rand_tensor(rng, dims, scale)?.to_dtype(dtype)?,
    )?)
}

/// Max |a − b| relative to max(1, max |b|).
fn rel_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a: Vec<f32> = a.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let b: Vec<f32> = b.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let scale = b.iter().fold(1f32, |m, v| m.max(v.abs()));
    let diff = a
        .iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(a.iter().all(|v| v.is_finite()), "non-finite values");
    Ok(diff / scale)
}

fn tolerance(dtype: DType) -> f32 {
    match dtype {
        DType::F32 => 2e-5,
        // The reference rounds after every op, the fused kernels once.
        _ => 4e-2,
    }
}

/// Runs `f` with `kernel` forced to `choice` on this thread.
fn with<R>(kernel: Kernel, choice: Choice, f: impl FnOnce() -> R) -> R {
    registry::with_choice(Some(kernel), choice, f).expect("valid choice")
}

/// Output and input gradients of `f` under `choice`, for a fixed random probe.
fn run(
    kernel: Kernel,
    choice: Choice,
    vars: &[&Var],
    probe: &Tensor,
    f: &dyn Fn() -> Result<Tensor>,
) -> Result<(Tensor, Vec<Option<Tensor>>)> {
    with(kernel, choice, || -> Result<_> {
        let out = f()?;
        let loss = out.to_dtype(DType::F32)?.mul(probe)?.sum_all()?;
        let grads = loss.backward()?;
        Ok((
            out.detach(),
            vars.iter()
                .map(|v| grads.get(v.as_tensor()).cloned())
                .collect(),
        ))
    })
}

/// Compares the fused implementation with the reference: forward and every gradient.
fn check(
    kernel: Kernel,
    dtype: DType,
    vars: &[&Var],
    out_dims: &[usize],
    rng: &mut StdRng,
    label: &str,
    f: &dyn Fn() -> Result<Tensor>,
) -> Result<()> {
    let main = vars[0].as_tensor();
    let selected = with(kernel, Choice::Impl(ImplId::Fused), || {
        registry::select(kernel, main.device(), dtype, main.shape())
    })?;
    assert_eq!(
        selected,
        ImplId::Fused,
        "{label}: fused implementation not selected"
    );
    let probe = rand_tensor(rng, out_dims, 1.0)?;
    let (yr, gr) = run(kernel, Choice::Reference, vars, &probe, f)?;
    let (yf, gf) = run(kernel, Choice::Impl(ImplId::Fused), vars, &probe, f)?;
    assert_eq!(yf.dtype(), yr.dtype(), "{label}: output dtype");
    let tol = tolerance(dtype);
    let d = rel_diff(&yf, &yr)?;
    assert!(d <= tol, "{label}: forward differs by {d}");
    for (i, ((a, b), v)) in gf.iter().zip(&gr).zip(vars).enumerate() {
        // An input that no output depends on (e.g. every token skipped) has no gradient in
        // the reference graph; the fused backward reports zeros. Both mean zero.
        let zeros = v.as_tensor().zeros_like()?;
        let (a, b) = match (a, b) {
            (Some(a), Some(b)) => (a, b),
            (Some(a), None) => (a, &zeros),
            (None, Some(b)) => (&zeros, b),
            (None, None) => panic!("{label}: gradient {i} missing in both"),
        };
        assert_eq!(a.dtype(), b.dtype(), "{label}: grad {i} dtype");
        let d = rel_diff(a, b)?;
        assert!(d <= tol * 2.0, "{label}: gradient {i} differs by {d}");
    }
    Ok(())
}

fn dtypes() -> [DType; 2] {
    [DType::F32, DType::BF16]
}

#[test]
fn rms_norm_fused_matches_reference() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(1);
    for case in 0..CASES {
        for dtype in dtypes() {
            let rows = rng.random_range(1..6);
            let h = [1, 3, 17, 64, 130][rng.random_range(0..5)];
            let dims = if case % 2 == 0 {
                vec![rows, h]
            } else {
                vec![2, rows, h]
            };
            let x = rand_var(&mut rng, &dims, 3.0, dtype)?;
            let w = rand_var(&mut rng, &[h], 1.5, dtype)?;
            check(
                Kernel::RmsNorm,
                dtype,
                &[&x, &w],
                &dims,
                &mut rng,
                &format!("rms_norm {dims:?} {dtype:?}"),
                &|| Ok(kernels::rms_norm(x.as_tensor(), w.as_tensor(), 1e-5)?),
            )?;
        }
    }
    Ok(())
}

#[test]
fn rms_norm_fused_reads_strided_input() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(11);
    let x = rand_tensor(&mut rng, &[7, 5], 2.0)?.t()?; // [5, 7], strided
    let w = rand_tensor(&mut rng, &[7], 1.0)?;
    let r = with(Kernel::RmsNorm, Choice::Reference, || {
        kernels::rms_norm(&x, &w, 1e-5)
    })?;
    let f = with(Kernel::RmsNorm, Choice::Auto, || {
        kernels::rms_norm(&x, &w, 1e-5)
    })?;
    assert!(rel_diff(&f, &r)? < 1e-6);
    Ok(())
}

#[test]
fn rotary_fused_matches_reference() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(2);
    for case in 0..CASES {
        for dtype in dtypes() {
            let (b, h, t) = (
                rng.random_range(1..3),
                rng.random_range(1..4),
                rng.random_range(1..6),
            );
            let d = [2, 6, 10, 16][rng.random_range(0..4)];
            let rd = 2 * rng.random_range(1..=d / 2);
            let bc = if case % 2 == 0 { 1 } else { b };
            let x = rand_var(&mut rng, &[b, h, t, d], 2.0, dtype)?;
            let cos = rand_var(&mut rng, &[bc, t, rd], 1.0, dtype)?;
            let sin = rand_var(&mut rng, &[bc, t, rd], 1.0, dtype)?;
            let label = format!("rotary x[{b},{h},{t},{d}] rd {rd} bc {bc} {dtype:?}");
            check(
                Kernel::Rotary,
                dtype,
                &[&x, &cos, &sin],
                &[b, h, t, d],
                &mut rng,
                &label,
                &|| {
                    Ok(kernels::rotary(
                        x.as_tensor(),
                        cos.as_tensor(),
                        sin.as_tensor(),
                    )?)
                },
            )?;
        }
    }
    Ok(())
}

#[test]
fn rotary_fused_handles_the_models_transposed_input() -> Result<()> {
    // The model passes `q.transpose(1, 2)` (non-contiguous) and RoPE tables that are not Vars.
    let mut rng = StdRng::seed_from_u64(12);
    let q = rand_tensor(&mut rng, &[2, 5, 3, 8], 1.0)?.transpose(1, 2)?;
    let cos = rand_tensor(&mut rng, &[1, 5, 4], 1.0)?;
    let sin = rand_tensor(&mut rng, &[1, 5, 4], 1.0)?;
    let r = with(Kernel::Rotary, Choice::Reference, || {
        kernels::rotary(&q, &cos, &sin)
    })?;
    let f = with(Kernel::Rotary, Choice::Auto, || {
        kernels::rotary(&q, &cos, &sin)
    })?;
    assert!(rel_diff(&f, &r)? < 1e-6);
    Ok(())
}

#[test]
fn swiglu_fused_matches_reference() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(3);
    for case in 0..CASES {
        for dtype in dtypes() {
            let rows = rng.random_range(1..9);
            let i = [1, 3, 16, 33][rng.random_range(0..4)];
            let dims = if case % 3 == 0 {
                vec![2, rows, 2 * i]
            } else {
                vec![rows, 2 * i]
            };
            let mut out_dims = dims.clone();
            *out_dims.last_mut().unwrap() = i;
            let gu = rand_var(&mut rng, &dims, 4.0, dtype)?;
            check(
                Kernel::Swiglu,
                dtype,
                &[&gu],
                &out_dims,
                &mut rng,
                &format!("swiglu {dims:?} {dtype:?}"),
                &|| Ok(kernels::swiglu(gu.as_tensor())?),
            )?;
            let bias = rand_var(&mut rng, &[2 * i], 1.0, dtype)?;
            check(
                Kernel::BiasSwiglu,
                dtype,
                &[&gu, &bias],
                &out_dims,
                &mut rng,
                &format!("bias_swiglu {dims:?} {dtype:?}"),
                &|| Ok(kernels::bias_swiglu(gu.as_tensor(), bias.as_tensor())?),
            )?;
        }
    }
    Ok(())
}

#[test]
fn softmax_fused_matches_reference() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(4);
    for case in 0..CASES {
        for dtype in dtypes() {
            let rows = rng.random_range(1..7);
            let n = [1, 5, 17, 64][rng.random_range(0..4)];
            let dims = vec![rows, n];
            let x = rand_var(&mut rng, &dims, 6.0, dtype)?;
            let label = format!("softmax {dims:?} {dtype:?}");
            if case % 2 == 0 || dtype != DType::F32 {
                check(
                    Kernel::Softmax,
                    dtype,
                    &[&x],
                    &dims,
                    &mut rng,
                    &label,
                    &|| Ok(kernels::softmax(x.as_tensor())?),
                )?;
            } else {
                // Eager attention's masked rows: scores + f32::MIN, some rows fully masked.
                let mask: Vec<f32> = (0..rows * n)
                    .map(|i| {
                        if i / n == 0 || rng.random_bool(0.4) {
                            f32::MIN
                        } else {
                            0.0
                        }
                    })
                    .collect();
                let mask = Tensor::from_vec(mask, (rows, n), &Device::Cpu)?;
                check(
                    Kernel::Softmax,
                    dtype,
                    &[&x],
                    &dims,
                    &mut rng,
                    &label,
                    &|| Ok(kernels::softmax_f32(&x.as_tensor().broadcast_add(&mask)?)?),
                )?;
            }
        }
    }
    Ok(())
}

#[test]
fn cca_conv_fused_matches_reference() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(5);
    for case in 0..CASES {
        for dtype in dtypes() {
            let b = rng.random_range(1..3);
            let groups = rng.random_range(1..4);
            let d = [1, 3, 8][rng.random_range(0..3)];
            let (k0, k1) = (rng.random_range(1..4), rng.random_range(1..4));
            // both grouped-stage paths: few positions (decode) and the gemm one
            let t = rng.random_range(1..10);
            let c = groups * d;
            let len = t + k0 + k1 - 2;
            let x = rand_var(&mut rng, &[b, len, c], 1.0, dtype)?;
            let w0 = rand_var(&mut rng, &[c, 1, k0], 1.0, dtype)?;
            let b0 = rand_var(&mut rng, &[c], 1.0, dtype)?;
            let w1 = rand_var(&mut rng, &[c, d, k1], 0.5, dtype)?;
            let b1 = rand_var(&mut rng, &[c], 1.0, dtype)?;
            let label = format!("cca_conv B{b} T{t} G{groups} D{d} K{k0},{k1} {dtype:?}");
            let f = || -> Result<Tensor> {
                Ok(kernels::cca_conv(
                    x.as_tensor(),
                    w0.as_tensor(),
                    b0.as_tensor(),
                    w1.as_tensor(),
                    b1.as_tensor(),
                    groups,
                )?)
            };
            if case % 2 == 0 {
                // Every parameter trained: biases travel packed with the weights.
                check(
                    Kernel::CcaConv,
                    dtype,
                    &[&x, &w0, &b0, &w1, &b1],
                    &[b, t, c],
                    &mut rng,
                    &label,
                    &f,
                )?;
            } else {
                // Frozen biases (plain tensors): the op holds them.
                let (b0t, b1t) = (b0.as_tensor().detach(), b1.as_tensor().detach());
                check(
                    Kernel::CcaConv,
                    dtype,
                    &[&x, &w0, &w1],
                    &[b, t, c],
                    &mut rng,
                    &label,
                    &|| {
                        Ok(kernels::cca_conv(
                            x.as_tensor(),
                            w0.as_tensor(),
                            &b0t,
                            w1.as_tensor(),
                            &b1t,
                            groups,
                        )?)
                    },
                )?;
            }
        }
    }
    Ok(())
}

#[test]
fn cca_conv_rejects_inconsistent_shapes() -> Result<()> {
    let dev = Device::Cpu;
    let x = Tensor::zeros((1, 2, 6), DType::F32, &dev)?;
    let w0 = Tensor::zeros((6, 1, 2), DType::F32, &dev)?;
    let b = Tensor::zeros(6, DType::F32, &dev)?;
    let w1 = Tensor::zeros((6, 3, 2), DType::F32, &dev)?;
    // Two columns are only the history: no new token.
    assert!(kernels::cca_conv(&x, &w0, &b, &w1, &b, 2).is_err());
    let x = Tensor::zeros((1, 4, 6), DType::F32, &dev)?;
    // 6 channels are not 4 groups.
    assert!(kernels::cca_conv(&x, &w0, &b, &w1, &b, 4).is_err());
    assert!(kernels::cca_conv(&x, &w0, &b, &w1, &b, 2).is_ok());
    Ok(())
}

#[test]
fn moe_experts_fused_matches_reference() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(6);
    for _ in 0..CASES {
        for dtype in dtypes() {
            let n = rng.random_range(1..10);
            let h = [3, 8][rng.random_range(0..2)];
            let i = [2, 5][rng.random_range(0..2)];
            let e = rng.random_range(1..5);
            // Ids up to E inclusive: E is the skip class.
            let ids: Vec<u32> = (0..n).map(|_| rng.random_range(0..=e) as u32).collect();
            let x = rand_var(&mut rng, &[n, h], 1.0, dtype)?;
            let w = rand_var(&mut rng, &[n, 1], 1.0, dtype)?;
            let gu = rand_var(&mut rng, &[e, 2 * i, h], 0.7, dtype)?;
            let down = rand_var(&mut rng, &[e, h, i], 0.7, dtype)?;
            let label = format!("moe N{n} H{h} I{i} E{e} ids {ids:?} {dtype:?}");
            check(
                Kernel::MoeExperts,
                dtype,
                &[&x, &w, &gu, &down],
                &[n, h],
                &mut rng,
                &label,
                &|| {
                    Ok(kernels::moe_experts(
                        x.as_tensor(),
                        &ids,
                        w.as_tensor(),
                        gu.as_tensor(),
                        down.as_tensor(),
                    )?)
                },
            )?;
        }
    }
    Ok(())
}

/// The experts take strided token rows (a mesh narrows them out of `[tokens | weight]`): the
/// same values as from contiguous rows, bit for bit, on both implementations and in both
/// dtypes. (The reference's gather refused them; the fused kernel read bf16 tokens in place
/// only when contiguous and otherwise skipped the bf16 rounding of its intermediates.)
#[test]
fn moe_experts_take_strided_token_rows() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(26);
    let (n, h, i, e) = (7, 16, 8, 3);
    let ids: Vec<u32> = (0..n).map(|t| (t % (e + 1)) as u32).collect();
    for dtype in [DType::F32, DType::BF16] {
        let xw = rand_tensor(&mut rng, &[n, h + 1], 1.0)?.to_dtype(dtype)?;
        let gu = rand_tensor(&mut rng, &[e, 2 * i, h], 0.5)?.to_dtype(dtype)?;
        let down = rand_tensor(&mut rng, &[e, h, i], 0.5)?.to_dtype(dtype)?;
        let (x, w) = (xw.narrow(1, 0, h)?, xw.narrow(1, h, 1)?);
        assert!(!x.is_contiguous());
        for choice in [Choice::Reference, Choice::Auto] {
            let run = |x: &Tensor, w: &Tensor| {
                with(Kernel::MoeExperts, choice, || {
                    kernels::moe_experts(x, &ids, w, &gu, &down)
                })
            };
            let strided = run(&x, &w)?;
            let packed = run(&x.contiguous()?, &w.contiguous()?)?;
            let d = (strided.to_dtype(DType::F32)? - packed.to_dtype(DType::F32)?)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert_eq!(d, 0.0, "{dtype:?} {choice:?}");
        }
    }
    // quantized experts (candle's gather inside) likewise
    let (h, i) = (32, 32);
    let xw = rand_tensor(&mut rng, &[n, h + 1], 1.0)?;
    let (x, w) = (xw.narrow(1, 0, h)?, xw.narrow(1, h, 1)?);
    let (gu, _) = q8_0_experts(&mut rng, e, 2 * i, h)?;
    let (down, _) = q8_0_experts(&mut rng, e, h, i)?;
    let strided = kernels::quantized::moe_experts(&x, &ids, &w, &gu, &down)?;
    let packed =
        kernels::quantized::moe_experts(&x.contiguous()?, &ids, &w.contiguous()?, &gu, &down)?;
    let d = (strided - packed)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    assert_eq!(d, 0.0, "quantized");
    Ok(())
}

/// `e` random `[r, c]` expert matrices quantized to Q8_0, and their dequantized stack
/// `[e, r, c]`.
fn q8_0_experts(
    rng: &mut StdRng,
    e: usize,
    r: usize,
    c: usize,
) -> Result<(zaya::model::moe::ExpertMatrices, Tensor)> {
    use candle_core::quantized::{GgmlDType, QTensor};
    let qs = (0..e)
        .map(|_| {
            let w = rand_tensor(rng, &[r, c], 0.5)?;
            Ok(std::sync::Arc::new(QTensor::quantize(&w, GgmlDType::Q8_0)?))
        })
        .collect::<Result<Vec<_>>>()?;
    let dense = qs
        .iter()
        .map(|q| q.dequantize(&Device::Cpu))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let dense = Tensor::stack(&dense, 0)?;
    Ok((zaya::model::moe::ExpertMatrices::Quantized(qs), dense))
}

/// Quantized experts compute what the dense experts compute on the dequantized weights
/// (Q8_0 keeps f32 activations, so only the order of the sums differs), forward and the
/// input's gradient (QLoRA trains through them), with skip-class tokens, experts without
/// tokens and experts with several.
#[test]
fn quantized_experts_match_dense_experts_on_their_dequantized_weights() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(61);
    let (n, h, i, e) = (9, 64, 32, 4);
    // expert 1 gets no token, 4 is the skip class
    let ids: Vec<u32> = vec![0, 2, 4, 3, 0, 2, 2, 4, 0];
    let (gu, gu_dense) = q8_0_experts(&mut rng, e, 2 * i, h)?;
    let (down, down_dense) = q8_0_experts(&mut rng, e, h, i)?;
    let x = rand_var(&mut rng, &[n, h], 1.0, DType::F32)?;
    let w = rand_tensor(&mut rng, &[n, 1], 1.0)?;
    let probe = rand_tensor(&mut rng, &[n, h], 1.0)?;
    let q = kernels::quantized::moe_experts(x.as_tensor(), &ids, &w, &gu, &down)?;
    let d = kernels::moe_experts(x.as_tensor(), &ids, &w, &gu_dense, &down_dense)?;
    assert!(rel_diff(&q, &d)? < 1e-5, "forward {}", rel_diff(&q, &d)?);
    for (t, &id) in ids.iter().enumerate() {
        if id as usize >= e {
            let row: Vec<f32> = q.get(t)?.to_vec1()?;
            assert!(row.iter().all(|&v| v == 0.0), "skipped token {t}");
        }
    }
    let gq = (q * &probe)?.sum_all()?.backward()?;
    let gd = (d * &probe)?.sum_all()?.backward()?;
    let (gq, gd) = (gq.get(&x).expect("x grad"), gd.get(&x).expect("x grad"));
    assert!(rel_diff(gq, gd)? < 1e-5, "gradient {}", rel_diff(gq, gd)?);
    Ok(())
}

#[test]
fn moe_experts_skip_rows_are_exactly_zero() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(16);
    let x = rand_tensor(&mut rng, &[3, 4], 1.0)?;
    let w = rand_tensor(&mut rng, &[3], 1.0)?;
    let gu = rand_tensor(&mut rng, &[2, 6, 4], 1.0)?;
    let down = rand_tensor(&mut rng, &[2, 4, 3], 1.0)?;
    let y = with(Kernel::MoeExperts, Choice::Auto, || {
        kernels::moe_experts(&x, &[2, 0, 2], &w, &gu, &down)
    })?;
    let y: Vec<Vec<f32>> = y.to_vec2()?;
    assert!(y[0].iter().chain(&y[2]).all(|&v| v == 0.0));
    assert!(y[1].iter().any(|&v| v != 0.0));
    // Wrong number of ids is an error, not a panic.
    assert!(kernels::moe_experts(&x, &[0, 1], &w, &gu, &down).is_err());
    Ok(())
}

#[test]
fn matmul_selection_follows_the_build() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(7);
    let a = rand_tensor(&mut rng, &[5, 7], 1.0)?;
    let blas_built = cfg!(feature = "blas");
    // any number of rows: BLAS when built, else the f32-weight op (the threaded GEMV up to
    // 32 rows, zaya's sgemm or the gemm crate and a weight-layout backward above)
    let want = if blas_built {
        ImplId::Blas
    } else {
        ImplId::Fused
    };
    let sel = with(Kernel::Matmul, Choice::Auto, || {
        registry::select(Kernel::Matmul, a.device(), DType::F32, a.shape())
    })?;
    assert_eq!(sel, want);
    let big = rand_tensor(&mut rng, &[64, 7], 1.0)?;
    let sel_big = with(Kernel::Matmul, Choice::Auto, || {
        registry::select(Kernel::Matmul, big.device(), DType::F32, big.shape())
    })?;
    assert_eq!(sel_big, want);
    // bf16 weights are never BLAS: the bf16-weight kernel at any number of rows.
    for t in [&a, &big] {
        let sel_bf16 = with(Kernel::Matmul, Choice::Auto, || {
            registry::select(Kernel::Matmul, t.device(), DType::BF16, t.shape())
        })?;
        assert_eq!(sel_bf16, ImplId::Fused);
    }
    // Naming BLAS is an error exactly when it is not built in.
    assert_eq!(
        registry::with_choice(Some(Kernel::Matmul), Choice::Impl(ImplId::Blas), || ()).is_ok(),
        blas_built
    );
    Ok(())
}

#[cfg(feature = "blas")]
#[test]
fn matmul_blas_matches_reference() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(8);
    for case in 0..CASES {
        let (m, k, n) = (
            rng.random_range(1..40),
            rng.random_range(1..40),
            rng.random_range(1..40),
        );
        let a = rand_var(&mut rng, &[m, k], 1.0, DType::F32)?;
        // A linear layer multiplies by a transposed [n, k] weight: BLAS gets it as transposed.
        let w = rand_var(&mut rng, &[n, k], 1.0, DType::F32)?;
        let label = format!("matmul {m}x{k}x{n} case {case}");
        let sel = with(Kernel::Matmul, Choice::Auto, || {
            registry::select(
                Kernel::Matmul,
                a.as_tensor().device(),
                DType::F32,
                a.as_tensor().shape(),
            )
        })?;
        assert_eq!(sel, ImplId::Blas);
        let probe = rand_tensor(&mut rng, &[m, n], 1.0)?;
        let f = || -> Result<Tensor> {
            let wt = if case % 2 == 0 {
                w.as_tensor().t()?
            } else {
                w.as_tensor().t()?.contiguous()?
            };
            Ok(kernels::matmul(a.as_tensor(), &wt)?)
        };
        let (yr, gr) = run(Kernel::Matmul, Choice::Reference, &[&a, &w], &probe, &f)?;
        let (yb, gb) = run(
            Kernel::Matmul,
            Choice::Impl(ImplId::Blas),
            &[&a, &w],
            &probe,
            &f,
        )?;
        assert!(rel_diff(&yb, &yr)? < 1e-5, "{label}");
        for (x, y) in gb.iter().zip(&gr) {
            assert!(
                rel_diff(x.as_ref().unwrap(), y.as_ref().unwrap())? < 1e-5,
                "{label} grad"
            );
        }
    }
    Ok(())
}

/// Whether zaya's AVX-512 f32 kernel (`kernels/sgemm.rs`) runs on this CPU.
fn sgemm_runs() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The f32-weight op equals candle's matmul, forward and both gradients, at decode sizes
/// (the GEMV) and above (zaya's `sgemm` on AVX-512 CPUs, elsewhere the `gemm` crate into
/// unfilled outputs), through the linear layer's entry (`kernels::linear`: the op takes
/// `W`, `dW = gᵀ·a` in its layout) and through `kernels::matmul` with `Wᵀ`: the forward
/// and the gradients to rounding (bit for bit above the GEMV where the `gemm` crate runs:
/// candle's own call), the weight's gradient contiguous, and above the GEMV a
/// row's forward independent of the other rows where `sgemm` runs (the first rows alone give
/// the same bits).
#[test]
fn f32_weight_matmul_matches_the_reference_forward_and_backward() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(12);
    for (m, k, n) in [
        (1, 7, 5),
        (32, 64, 33),
        (33, 64, 33),
        (100, 130, 70),
        (300, 96, 257),
        (1024, 64, 96),
    ] {
        let a = rand_var(&mut rng, &[m, k], 1.0, DType::F32)?;
        let w = rand_var(&mut rng, &[n, k], 1.0, DType::F32)?;
        let probe = rand_tensor(&mut rng, &[m, n], 1.0)?;
        // the linear layer's entry (the op takes W) and a caller holding Wᵀ
        let through_linear =
            || -> Result<Tensor> { Ok(kernels::linear(a.as_tensor(), w.as_tensor())?) };
        let through_matmul =
            || -> Result<Tensor> { Ok(kernels::matmul(a.as_tensor(), &w.as_tensor().t()?)?) };
        for (entry, f) in [
            ("linear", &through_linear as &dyn Fn() -> Result<Tensor>),
            ("matmul", &through_matmul),
        ] {
            let (yr, gr) = run(Kernel::Matmul, Choice::Reference, &[&a, &w], &probe, f)?;
            let (yf, gf) = run(
                Kernel::Matmul,
                Choice::Impl(ImplId::Fused),
                &[&a, &w],
                &probe,
                f,
            )?;
            let label = format!("{entry} m={m} k={k} n={n}");
            assert!(rel_diff(&yf, &yr)? < 1e-5, "{label}");
            if m > 32 && !sgemm_runs() {
                // the gemm crate with candle's operands: the same products in the same order
                assert_eq!(
                    yf.flatten_all()?.to_vec1::<f32>()?,
                    yr.flatten_all()?.to_vec1::<f32>()?,
                    "{label}: forward not bit-identical"
                );
            }
            if m > 40 && sgemm_runs() {
                let first = a.as_tensor().narrow(0, 0, 40)?;
                let alone = with(Kernel::Matmul, Choice::Impl(ImplId::Fused), || {
                    kernels::linear(&first, w.as_tensor())
                })?;
                assert_eq!(
                    alone.flatten_all()?.to_vec1::<f32>()?,
                    yf.narrow(0, 0, 40)?.flatten_all()?.to_vec1::<f32>()?,
                    "{label}: the first 40 rows alone differ"
                );
            }
            for (name, x, y) in [("da", &gf[0], &gr[0]), ("dW", &gf[1], &gr[1])] {
                let (x, y) = (x.as_ref().expect("gradient"), y.as_ref().expect("gradient"));
                assert!(rel_diff(x, y)? < 1e-5, "{label}: {name}");
            }
            assert!(
                gf[1].as_ref().unwrap().is_contiguous(),
                "{label}: dW not contiguous"
            );
        }
    }
    Ok(())
}

/// The decode GEMV (≤ 8 rows against a linear layer's transposed weight) equals the
/// reference matmul, and calls that record gradients still get them.
#[test]
fn small_row_matmul_matches_the_reference_and_keeps_gradients() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(11);
    for (m, k, n) in [
        (1, 7, 5),
        (3, 64, 33),
        (8, 130, 70),
        (2, 512, 1000),
        (8, 256, 3000),
    ] {
        let a = rand_tensor(&mut rng, &[m, k], 1.0)?;
        let w = rand_tensor(&mut rng, &[n, k], 1.0)?;
        let fast = with(Kernel::Matmul, Choice::Impl(ImplId::Fused), || {
            kernels::matmul(&a, &w.t()?)
        })?;
        let slow = with(Kernel::Matmul, Choice::Reference, || {
            kernels::matmul(&a, &w.t()?)
        })?;
        assert_eq!(fast.dims(), &[m, n]);
        let d = (fast - &slow)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let scale = slow.abs()?.max_all()?.to_scalar::<f32>()?.max(1.0);
        assert!(d <= 1e-5 * scale, "m={m} k={k} n={n}: diff {d}");
    }
    let a = candle_core::Var::from_tensor(&rand_tensor(&mut rng, &[2, 9], 1.0)?)?;
    let w = rand_tensor(&mut rng, &[4, 9], 1.0)?;
    let y = with(Kernel::Matmul, Choice::Impl(ImplId::Fused), || {
        kernels::matmul(a.as_tensor(), &w.t()?)
    })?;
    let g = y.sum_all()?.backward()?;
    assert!(
        g.get(a.as_tensor()).is_some(),
        "no gradient through the matmul"
    );
    Ok(())
}

/// Decode-sized expert calls (a few tokens per expert, wide weights) take the fused gemm's
/// GEMV path: forward and backward still equal the reference.
#[test]
fn moe_experts_with_few_tokens_per_expert_match_the_reference() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(5);
    let (n, h, i, e) = (6usize, 128usize, 96usize, 3usize);
    let x = candle_core::Var::from_tensor(&rand_tensor(&mut rng, &[n, h], 1.0)?)?;
    let w = rand_tensor(&mut rng, &[n, 1], 1.0)?;
    let gu = candle_core::Var::from_tensor(&rand_tensor(&mut rng, &[e, 2 * i, h], 0.1)?)?;
    let down = candle_core::Var::from_tensor(&rand_tensor(&mut rng, &[e, h, i], 0.1)?)?;
    let ids = [0u32, 2, 0, 3, 1, 0]; // 3 = skip
    let run = |choice: Choice| -> Result<(Tensor, Vec<Tensor>)> {
        let y = with(Kernel::MoeExperts, choice, || {
            kernels::moe_experts(x.as_tensor(), &ids, &w, gu.as_tensor(), down.as_tensor())
        })?;
        let g = (y.sqr()?.sum_all()?).backward()?;
        let grads = [x.as_tensor(), gu.as_tensor(), down.as_tensor()]
            .iter()
            .map(|t| g.get(t).cloned().expect("gradient"))
            .collect();
        Ok((y, grads))
    };
    let (yf, gf) = run(Choice::Impl(ImplId::Fused))?;
    let (yr, gr) = run(Choice::Reference)?;
    let close = |a: &Tensor, b: &Tensor, what: &str| -> Result<()> {
        let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let s = b.abs()?.max_all()?.to_scalar::<f32>()?.max(1.0);
        assert!(d <= 1e-5 * s, "{what}: diff {d} (scale {s})");
        Ok(())
    };
    close(&yf, &yr, "output")?;
    for (k, (a, b)) in gf.iter().zip(&gr).enumerate() {
        close(a, b, &format!("gradient {k}"))?;
    }
    Ok(())
}

/// Training-sized expert calls: 33..128 rows per expert take the AVX-512 small-M kernel
/// for the forward products (and the backward's recompute), more rows the `gemm` crate;
/// forward and backward equal the reference, and a second run is bit-identical.
#[test]
fn moe_experts_with_dozens_of_tokens_per_expert_match_the_reference() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(7);
    let (h, i, e) = (80usize, 56usize, 4usize);
    // Rows per expert: 33 (one full panel + 1), 70, 128 (the kernel's most), 140 (gemm
    // crate), 5 skipped; interleaved so the gathers are non-trivial.
    let counts = [33usize, 70, 128, 140, 5];
    let mut ids = Vec::new();
    for (c, &cnt) in counts.iter().enumerate() {
        ids.extend(std::iter::repeat_n(c as u32, cnt));
    }
    for k in 0..ids.len() {
        let j = rng.random_range(0..ids.len());
        ids.swap(k, j);
    }
    let n = ids.len();
    let x = candle_core::Var::from_tensor(&rand_tensor(&mut rng, &[n, h], 1.0)?)?;
    let w = rand_tensor(&mut rng, &[n, 1], 1.0)?;
    let gu = candle_core::Var::from_tensor(&rand_tensor(&mut rng, &[e, 2 * i, h], 0.2)?)?;
    let down = candle_core::Var::from_tensor(&rand_tensor(&mut rng, &[e, h, i], 0.2)?)?;
    let run = |choice: Choice| -> Result<(Tensor, Vec<Tensor>)> {
        let y = with(Kernel::MoeExperts, choice, || {
            kernels::moe_experts(x.as_tensor(), &ids, &w, gu.as_tensor(), down.as_tensor())
        })?;
        let g = (y.sqr()?.sum_all()?).backward()?;
        let grads = [x.as_tensor(), gu.as_tensor(), down.as_tensor()]
            .iter()
            .map(|t| g.get(t).cloned().expect("gradient"))
            .collect();
        Ok((y, grads))
    };
    let (yf, gf) = run(Choice::Impl(ImplId::Fused))?;
    let (yr, gr) = run(Choice::Reference)?;
    let close = |a: &Tensor, b: &Tensor, what: &str| -> Result<()> {
        let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let s = b.abs()?.max_all()?.to_scalar::<f32>()?.max(1.0);
        assert!(d <= 1e-5 * s, "{what}: diff {d} (scale {s})");
        Ok(())
    };
    close(&yf, &yr, "output")?;
    for (k, (a, b)) in gf.iter().zip(&gr).enumerate() {
        close(a, b, &format!("gradient {k}"))?;
    }
    let (yf2, gf2) = run(Choice::Impl(ImplId::Fused))?;
    let bits = |t: &Tensor| -> Result<Vec<u32>> {
        Ok(t.flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .map(|v| v.to_bits())
            .collect())
    };
    assert_eq!(bits(&yf)?, bits(&yf2)?, "output not reproducible");
    for (a, b) in gf.iter().zip(&gf2) {
        assert_eq!(bits(a)?, bits(b)?, "gradient not reproducible");
    }
    Ok(())
}

/// bf16 weights read in place (GEMV up to 8 rows, tiled GEMM above), with f32 and with bf16
/// activations, against the reference: f32 activations must match `x · f32(W)ᵀ` to f32
/// rounding; bf16 activations the reference's bf16 product to bf16 rounding.
#[test]
fn bf16_weight_matmul_matches_the_reference() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(21);
    for (m, k, n) in [
        (1, 7, 5),
        (1, 2048, 300),
        (3, 64, 33),
        (8, 130, 70),
        (9, 33, 17),
        (20, 64, 3),
        (64, 300, 129),
        (130, 1100, 600),
    ] {
        let w = rand_tensor(&mut rng, &[n, k], 1.0)?.to_dtype(DType::BF16)?;
        for act in [DType::F32, DType::BF16] {
            let a = rand_tensor(&mut rng, &[m, k], 1.0)?.to_dtype(act)?;
            let fast = with(Kernel::Matmul, Choice::Auto, || {
                kernels::matmul(&a, &w.t()?)
            })?;
            let slow = with(Kernel::Matmul, Choice::Reference, || {
                kernels::matmul(&a, &w.t()?)
            })?;
            assert_eq!(fast.dims(), &[m, n]);
            assert_eq!(fast.dtype(), act, "output in the activation dtype");
            // the definition, in f64-free f32: x · f32(W)ᵀ
            let exact = a
                .to_dtype(DType::F32)?
                .matmul(&w.to_dtype(DType::F32)?.t()?)?;
            let tol = if act == DType::F32 { 1e-5 } else { 1e-2 };
            let d_exact = rel_diff(&fast, &exact)?;
            assert!(
                d_exact <= tol,
                "m={m} k={k} n={n} {act:?}: {d_exact} from x·f32(W)ᵀ"
            );
            let d = rel_diff(&fast, &slow)?;
            assert!(
                d <= tol,
                "m={m} k={k} n={n} {act:?}: {d} from the reference"
            );
        }
    }
    // Activations that start inside their storage, and strided ones, give the same bits as
    // a fresh contiguous copy.
    let (m, k, n) = (40, 96, 70);
    let w = rand_tensor(&mut rng, &[n, k], 1.0)?.to_dtype(DType::BF16)?;
    for act in [DType::F32, DType::BF16] {
        let big = rand_tensor(&mut rng, &[m + 3, k], 1.0)?.to_dtype(act)?;
        let offset = big.narrow(0, 2, m)?;
        let strided = rand_tensor(&mut rng, &[k, m], 1.0)?.to_dtype(act)?.t()?;
        for a in [offset, strided] {
            let fresh = a.contiguous()?.copy()?;
            let (got, want) = with(
                Kernel::Matmul,
                Choice::Auto,
                || -> candle_core::Result<_> {
                    Ok((
                        kernels::matmul(&a, &w.t()?)?,
                        kernels::matmul(&fresh, &w.t()?)?,
                    ))
                },
            )?;
            assert_eq!(got.dims(), &[m, n]);
            let (g, f) = (
                got.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
                want.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
            );
            assert!(
                g.iter().zip(&f).all(|(p, q)| p.to_bits() == q.to_bits()),
                "{act:?}: a strided or offset input changed the product"
            );
        }
    }
    // A call that records gradients takes the differentiable reference.
    let a = candle_core::Var::from_tensor(
        &rand_tensor(&mut rng, &[2, 9], 1.0)?.to_dtype(DType::BF16)?,
    )?;
    let w = rand_tensor(&mut rng, &[4, 9], 1.0)?.to_dtype(DType::BF16)?;
    let y = with(Kernel::Matmul, Choice::Auto, || {
        kernels::matmul(a.as_tensor(), &w.t()?)
    })?;
    let g = y.to_dtype(DType::F32)?.sum_all()?.backward()?;
    assert!(
        g.get(a.as_tensor()).is_some(),
        "no gradient through the bf16 matmul"
    );
    Ok(())
}

/// bf16 experts read in place: buckets of a few tokens (GEMV) and of many (the bf16 dot
/// GEMM) match the reference in bf16 (which rounds the gate/up output and the activation
/// to bf16, as the fused path does) and the f32 evaluation of the same (bf16-valued)
/// numbers, to bf16 rounding.
#[test]
fn bf16_experts_match_the_f32_evaluation_of_the_same_weights() -> Result<()> {
    // expert 0: 2 tokens (GEMV), expert 1: most tokens (GEMM), expert 2: none, some skipped
    let ids: Vec<u32> = (0..48)
        .map(|t| match t {
            0 | 7 => 0,
            t if t % 5 == 0 => 3,
            _ => 1,
        })
        .collect();
    check_bf16_experts(22, 96, 80, 3, &ids)
}

/// Tile-sized widths (k a multiple of 32) in a prefill-sized forward (96 rows): expert
/// shares of 8–48 rows (11, 23 and 48 here) stream their weights through AMX tiles where the
/// CPU has them, a 2-row share takes the GEMV (on other CPUs: the AVX-512 BF16 / widening
/// paths); id 4 is the skip class.
#[test]
fn bf16_expert_shares_of_a_prefill_match_the_f32_evaluation() -> Result<()> {
    let ids: Vec<u32> = (0..96)
        .map(|t| match t {
            0 | 9 => 0,
            t if t % 8 == 1 => 1,
            t if t % 7 == 0 => 4,
            t if t % 3 == 0 => 3,
            _ => 2,
        })
        .collect();
    check_bf16_experts(23, 128, 64, 4, &ids)
}

/// bf16 experts on the fused kernel against the f32 evaluation of the same bf16 values and
/// against the bf16 reference (`ids` ≥ `e` are skipped tokens).
fn check_bf16_experts(seed: u64, h: usize, i: usize, e: usize, ids: &[u32]) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    let n = ids.len();
    let x = rand_tensor(&mut rng, &[n, h], 1.0)?.to_dtype(DType::BF16)?;
    let w = rand_tensor(&mut rng, &[n, 1], 1.0)?.to_dtype(DType::BF16)?;
    let gu = rand_tensor(&mut rng, &[e, 2 * i, h], 0.2)?.to_dtype(DType::BF16)?;
    let down = rand_tensor(&mut rng, &[e, h, i], 0.2)?.to_dtype(DType::BF16)?;
    let fast = with(Kernel::MoeExperts, Choice::Impl(ImplId::Fused), || {
        kernels::moe_experts(&x, ids, &w, &gu, &down)
    })?;
    let f32s = |t: &Tensor| t.to_dtype(DType::F32);
    let exact = with(Kernel::MoeExperts, Choice::Reference, || {
        kernels::moe_experts(&f32s(&x)?, ids, &f32s(&w)?, &f32s(&gu)?, &f32s(&down)?)
    })?;
    assert_eq!(fast.dtype(), DType::BF16);
    let d = rel_diff(&fast, &exact)?;
    assert!(d <= 1e-2, "bf16 experts differ by {d}");
    let reference = with(Kernel::MoeExperts, Choice::Reference, || {
        kernels::moe_experts(&x, ids, &w, &gu, &down)
    })?;
    let d = rel_diff(&fast, &reference)?;
    assert!(
        d <= 1e-2,
        "bf16 experts differ from the bf16 reference by {d}"
    );
    Ok(())
}

/// A forward handed to the kernel pool keeps the caller's scoped kernel choices (the
/// engine runs its steps there; the parity suites choose kernels by scope).
#[test]
fn run_in_pool_carries_the_scoped_choices() -> Result<()> {
    let shape = candle_core::Shape::from_dims(&[4, 64]);
    let pick = || registry::select(Kernel::Softmax, &Device::Cpu, DType::F32, &shape);
    let (thread, inside) = with(Kernel::Softmax, Choice::Reference, || {
        kernels::run_in_pool(|| (std::thread::current().name().map(str::to_owned), pick()))
    });
    assert_eq!(inside?, ImplId::Reference);
    if kernels::num_threads() > 1 {
        // it did run on a pool thread, whose own scope is empty
        assert!(thread.is_some_and(|n| n.starts_with("zaya-kernel-")));
    }
    // and the pool thread's scope is left as it was
    let after = kernels::run_in_pool(pick)?;
    assert_eq!(after, pick()?);
    Ok(())
}

#[test]
fn residual_scale_fused_matches_reference() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(21);
    for case in 0..CASES {
        for dtype in dtypes() {
            let rows = rng.random_range(1..9);
            let h = [1, 5, 16, 67, 130][rng.random_range(0..5)];
            let dims = if case % 2 == 0 {
                vec![rows, h]
            } else {
                vec![2, rows, h]
            };
            let sub = rand_var(&mut rng, &dims, 3.0, dtype)?;
            // The residual stream is f32 whatever the parameter dtype.
            let res = rand_var(&mut rng, &dims, 5.0, DType::F32)?;
            let p: Vec<Var> = (0..4)
                .map(|_| rand_var(&mut rng, &[h], 1.5, dtype))
                .collect::<Result<_>>()?;
            check(
                Kernel::ResidualScale,
                dtype,
                &[&sub, &res, &p[0], &p[1], &p[2], &p[3]],
                &dims,
                &mut rng,
                &format!("residual_scale {dims:?} {dtype:?}"),
                &|| {
                    Ok(kernels::residual_scale(
                        sub.as_tensor(),
                        res.as_tensor(),
                        p[0].as_tensor(),
                        p[1].as_tensor(),
                        p[2].as_tensor(),
                        p[3].as_tensor(),
                    )?)
                },
            )?;
        }
    }
    Ok(())
}

#[test]
fn residual_scale_is_bit_identical_to_the_reference_in_f32() -> Result<()> {
    // Same ops in the same order in f32: the forward must not differ at all (the decoder's
    // residual stream goes through it twice per layer).
    let mut rng = StdRng::seed_from_u64(22);
    let sub = rand_tensor(&mut rng, &[3, 40, 96], 2.0)?;
    let res = rand_tensor(&mut rng, &[3, 40, 96], 7.0)?;
    let p: Vec<Tensor> = (0..4)
        .map(|_| rand_tensor(&mut rng, &[96], 1.3))
        .collect::<Result<_>>()?;
    let f = |c| {
        with(Kernel::ResidualScale, c, || {
            kernels::residual_scale(&sub, &res, &p[0], &p[1], &p[2], &p[3])
        })
    };
    let a: Vec<f32> = f(Choice::Reference)?.flatten_all()?.to_vec1()?;
    let b: Vec<f32> = f(Choice::Impl(ImplId::Fused))?.flatten_all()?.to_vec1()?;
    assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
    Ok(())
}

/// Without a graph (inference) the fused merge reads the four parameters where they are:
/// the same bits as the differentiable op over their stack, in f32 and bf16, and a weight
/// updated in place (a training run's inference view shares the `Var`s' storage) is seen
/// by the next call.
#[test]
fn residual_scale_without_a_graph_reads_the_parameters_in_place() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(24);
    for dtype in dtypes() {
        let dims = [2, 5, 48];
        let sub = rand_tensor(&mut rng, &dims, 2.0)?.to_dtype(dtype)?;
        let res = rand_tensor(&mut rng, &dims, 7.0)?;
        let vars: Vec<Var> = (0..4)
            .map(|_| rand_var(&mut rng, &[48], 1.3, dtype))
            .collect::<Result<_>>()?;
        // detached: views of the vars' storage that record no graph
        let view: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().detach()).collect();
        let fused = |p: &[Tensor]| -> Result<Vec<f32>> {
            with(Kernel::ResidualScale, Choice::Impl(ImplId::Fused), || {
                kernels::residual_scale(&sub, &res, &p[0], &p[1], &p[2], &p[3])
            })?
            .flatten_all()?
            .to_vec1::<f32>()
            .map_err(Into::into)
        };
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for round in 0..2 {
            let tracked: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            assert!(tracked[0].track_op());
            let want = fused(&tracked)?;
            let got = fused(&view)?;
            assert_eq!(bits(&got), bits(&want), "{dtype:?} round {round}");
            // an optimizer step in place
            for v in &vars {
                v.set(&rand_tensor(&mut rng, &[48], 1.3)?.to_dtype(dtype)?)?;
            }
        }
    }
    Ok(())
}

#[test]
fn residual_scale_rejects_bad_operands() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(23);
    let sub = rand_tensor(&mut rng, &[2, 8], 1.0)?;
    let p = rand_tensor(&mut rng, &[8], 1.0)?;
    let short = rand_tensor(&mut rng, &[7], 1.0)?;
    with(Kernel::ResidualScale, Choice::Impl(ImplId::Fused), || {
        // a parameter of the wrong length
        assert!(kernels::residual_scale(&sub, &sub, &p, &short, &p, &p).is_err());
        // a residual of another shape
        let res = rand_tensor(&mut rng, &[3, 8], 1.0).unwrap();
        assert!(kernels::residual_scale(&sub, &res, &p, &p, &p, &p).is_err());
        // a residual stream that is not f32
        let res16 = sub.to_dtype(DType::BF16).unwrap();
        assert!(kernels::residual_scale(&sub, &res16, &p, &p, &p, &p).is_err());
    });
    Ok(())
}

#[test]
fn cca_qk_norm_fused_matches_reference() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(24);
    // f16 keeps the reference (its rounding is not reproduced); bf16 is fused, bit-exact
    // (`cca_qk_norm_bf16_is_bit_identical_to_the_reference`).
    let select = |dtype| {
        with(Kernel::CcaQkNorm, Choice::Auto, || {
            registry::select(
                Kernel::CcaQkNorm,
                &Device::Cpu,
                dtype,
                &candle_core::Shape::from_dims(&[1, 4, 24]),
            )
        })
    };
    assert_eq!(select(DType::F16)?, ImplId::Reference);
    assert_eq!(select(DType::BF16)?, ImplId::Fused);
    for case in 0..CASES {
        let dtype = DType::F32;
        let b = rng.random_range(1..3);
        let t = rng.random_range(1..7);
        let nkv = rng.random_range(1..3);
        let nq = nkv * [1, 2, 4][rng.random_range(0..3)];
        let d = [2, 8, 13, 32][rng.random_range(0..4)];
        let c = (nq + nkv) * d;
        let z = rand_var(&mut rng, &[b, t, c], 2.0, dtype)?;
        let u = rand_var(&mut rng, &[b, t, c], 2.0, dtype)?;
        let temp = rand_var(&mut rng, &[nkv], 2.0, dtype)?;
        if case == 0 {
            // An all-zero head (a padding token): the norm is clamped, the gradient finite.
            let zeros = Tensor::zeros((b, t, c), dtype, &Device::Cpu)?;
            z.set(&zeros)?;
            u.set(&zeros)?;
        }
        // One output for the harness: queries and keys side by side again.
        let f = || -> Result<Tensor> {
            let (q, k) =
                kernels::cca_qk_norm(z.as_tensor(), u.as_tensor(), temp.as_tensor(), nq, nkv)?;
            assert_eq!(q.dims(), [b, t, nq, d]);
            assert_eq!(k.dims(), [b, t, nkv, d]);
            Ok(Tensor::cat(&[&q, &k], 2)?)
        };
        check(
            Kernel::CcaQkNorm,
            dtype,
            &[&z, &u, &temp],
            &[b, t, nq + nkv, d],
            &mut rng,
            &format!("cca_qk_norm b{b} t{t} nq{nq} nkv{nkv} d{d} {dtype:?}"),
            &f,
        )?;
    }
    Ok(())
}

/// In bf16 the reference rounds after every op, and the transformers fixtures' greedy tokens
/// follow that rounding: the fused bf16 forward must reproduce it bit for bit (zero heads,
/// heads whose squared norm sits at the clamp, the 8B's head size included); a bf16 call that
/// records gradients runs the reference, backward included.
#[test]
fn cca_qk_norm_bf16_is_bit_identical_to_the_reference() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(25);
    let bits = |t: &Tensor| -> Result<Vec<u16>> {
        Ok(t.flatten_all()?
            .to_vec1::<half::bf16>()?
            .iter()
            .map(|v| v.to_bits())
            .collect())
    };
    for case in 0..CASES + 4 {
        let b = rng.random_range(1..3);
        let t = rng.random_range(1..9);
        let nkv = rng.random_range(1..3);
        let nq = nkv * [1, 2, 4][rng.random_range(0..3)];
        let d = [2, 8, 13, 32, 128][rng.random_range(0..5)];
        let c = (nq + nkv) * d;
        let scale = [2.0, 0.01, 50.0][case % 3];
        let mut z = rand_tensor(&mut rng, &[b, t, c], scale)?.to_dtype(DType::BF16)?;
        let mut u = rand_tensor(&mut rng, &[b, t, c], scale)?.to_dtype(DType::BF16)?;
        let temp = rand_tensor(&mut rng, &[nkv], 2.0)?.to_dtype(DType::BF16)?;
        if case == 0 {
            z = z.zeros_like()?;
            u = u.zeros_like()?;
        }
        if case == 1 {
            // tiny heads: the squared norm lands on or below the clamp ε² = 2⁻¹⁴
            z = (z.ones_like()? * 2f64.powi(-10))?;
            u = u.zeros_like()?;
        }
        let run = |choice| {
            with(Kernel::CcaQkNorm, choice, || {
                kernels::cca_qk_norm(&z, &u, &temp, nq, nkv)
            })
        };
        let (fq, fk) = run(Choice::Impl(ImplId::Fused))?;
        let (rq, rk) = run(Choice::Reference)?;
        assert_eq!(fq.dtype(), DType::BF16);
        let label = format!("case {case}: b{b} t{t} nq{nq} nkv{nkv} d{d} scale {scale}");
        assert_eq!(bits(&fq)?, bits(&rq)?, "queries differ, {label}");
        assert_eq!(bits(&fk)?, bits(&rk)?, "keys differ, {label}");
    }
    // with gradients: the reference's bf16 backward
    let z = Var::from_tensor(&rand_tensor(&mut rng, &[1, 3, 24], 1.0)?.to_dtype(DType::BF16)?)?;
    let u = rand_tensor(&mut rng, &[1, 3, 24], 1.0)?.to_dtype(DType::BF16)?;
    let temp = rand_tensor(&mut rng, &[2], 1.0)?.to_dtype(DType::BF16)?;
    let grad = |choice| -> Result<Vec<u16>> {
        let (q, k) = with(Kernel::CcaQkNorm, choice, || {
            kernels::cca_qk_norm(z.as_tensor(), &u, &temp, 4, 2)
        })?;
        let loss =
            (q.to_dtype(DType::F32)?.sqr()?.sum_all()? + k.to_dtype(DType::F32)?.sum_all()?)?;
        bits(
            loss.backward()?
                .get(z.as_tensor())
                .expect("z has a gradient"),
        )
    };
    assert_eq!(grad(Choice::Impl(ImplId::Fused))?, grad(Choice::Reference)?);
    Ok(())
}

#[test]
fn cca_qk_norm_rejects_inconsistent_heads() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(25);
    let z = rand_tensor(&mut rng, &[1, 2, 24], 1.0)?;
    let temp = rand_tensor(&mut rng, &[2], 1.0)?;
    for choice in [Choice::Reference, Choice::Impl(ImplId::Fused)] {
        with(Kernel::CcaQkNorm, choice, || {
            // 3 query heads over 2 key heads
            assert!(kernels::cca_qk_norm(&z, &z, &temp, 3, 2).is_err());
            // temp [2] for one key head (2 + 1 heads of 8 channels)
            assert!(kernels::cca_qk_norm(&z, &z, &temp, 2, 1).is_err());
            // u of another shape (4 + 2 heads of 4 channels)
            assert!(kernels::cca_qk_norm(&z, &z, &temp, 4, 2).is_ok());
            let u = rand_tensor(&mut rng, &[1, 3, 24], 1.0).unwrap();
            assert!(kernels::cca_qk_norm(&z, &u, &temp, 4, 2).is_err());
            // 24 channels are not 8 + 2 heads of equal size
            assert!(kernels::cca_qk_norm(&z, &z, &temp, 8, 2).is_err());
        });
    }
    Ok(())
}

#[test]
fn gelu_erf_fused_matches_reference() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(26);
    for case in 0..CASES {
        for dtype in dtypes() {
            let rows = rng.random_range(1..9);
            let n = [1, 7, 64, 129][rng.random_range(0..4)];
            let dims = if case % 2 == 0 {
                vec![rows, n]
            } else {
                vec![2, rows, n]
            };
            let x = rand_var(&mut rng, &dims, 5.0, dtype)?;
            check(
                Kernel::GeluErf,
                dtype,
                &[&x],
                &dims,
                &mut rng,
                &format!("gelu_erf {dims:?} {dtype:?}"),
                &|| Ok(kernels::gelu_erf(x.as_tensor())?),
            )?;
        }
    }
    Ok(())
}

#[test]
fn router_eda_fused_matches_reference() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(27);
    for case in 0..CASES {
        for dtype in dtypes() {
            let rows = rng.random_range(1..9);
            let r = [1, 6, 32, 129][rng.random_range(0..4)];
            let dims = if case % 2 == 0 {
                vec![rows, r]
            } else {
                vec![2, rows, r]
            };
            let x = rand_var(&mut rng, &dims, 3.0, dtype)?;
            let prev = rand_var(&mut rng, &dims, 3.0, dtype)?;
            let scale = rand_var(&mut rng, &[r], 1.0, dtype)?;
            check(
                Kernel::RouterEda,
                dtype,
                &[&x, &prev, &scale],
                &dims,
                &mut rng,
                &format!("router_eda {dims:?} {dtype:?}"),
                &|| {
                    Ok(kernels::router_eda(
                        x.as_tensor(),
                        prev.as_tensor(),
                        scale.as_tensor(),
                    )?)
                },
            )?;
        }
    }
    // A state of another shape is a typed error, not a panic.
    let x = rand_tensor(&mut rng, &[2, 4], 1.0)?;
    let short = rand_tensor(&mut rng, &[3], 1.0)?;
    with(Kernel::RouterEda, Choice::Impl(ImplId::Fused), || {
        assert!(kernels::router_eda(&x, &x, &short).is_err());
        assert!(kernels::router_eda(&x, &x.t().unwrap(), &short).is_err());
    });
    Ok(())
}

#[test]
fn log_prob_gather_fused_matches_reference() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(28);
    for _ in 0..CASES {
        for dtype in dtypes() {
            let n = rng.random_range(1..9);
            let v = [1, 5, 100, 1000][rng.random_range(0..4)];
            let logits = rand_var(&mut rng, &[n, v], 12.0, dtype)?;
            let ids: Vec<u32> = (0..n).map(|_| rng.random_range(0..v as u32)).collect();
            let ids = Tensor::from_vec(ids, (n, 1), &Device::Cpu)?;
            check(
                Kernel::LogProbGather,
                dtype,
                &[&logits],
                &[n, 1],
                &mut rng,
                &format!("log_prob_gather [{n}, {v}] {dtype:?}"),
                &|| Ok(kernels::log_prob_gather(logits.as_tensor(), &ids)?),
            )?;
        }
    }
    Ok(())
}

#[test]
fn log_prob_gather_rejects_bad_targets() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(29);
    let logits = rand_tensor(&mut rng, &[3, 10], 1.0)?;
    let outside = Tensor::new(&[[1u32], [10], [2]], &Device::Cpu)?;
    let short = Tensor::new(&[[1u32], [2]], &Device::Cpu)?;
    with(Kernel::LogProbGather, Choice::Impl(ImplId::Fused), || {
        assert!(kernels::log_prob_gather(&logits, &outside).is_err());
        assert!(kernels::log_prob_gather(&logits, &short).is_err());
        assert!(kernels::log_prob_gather(&logits.unsqueeze(0).unwrap(), &short).is_err());
    });
    Ok(())
}

#[test]
fn bias_add_fused_matches_reference() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(30);
    for case in 0..CASES {
        for dtype in dtypes() {
            let rows = rng.random_range(1..40);
            let n = [1, 7, 128, 300][rng.random_range(0..4)];
            let dims = if case % 2 == 0 {
                vec![rows, n]
            } else {
                vec![2, rows, n]
            };
            let y = rand_var(&mut rng, &dims, 3.0, dtype)?;
            let b = rand_var(&mut rng, &[n], 1.0, dtype)?;
            check(
                Kernel::BiasAdd,
                dtype,
                &[&y, &b],
                &dims,
                &mut rng,
                &format!("bias_add {dims:?} {dtype:?}"),
                &|| Ok(kernels::bias_add(y.as_tensor(), b.as_tensor())?),
            )?;
        }
    }
    // Operands the fused op does not take behave as the reference: a wrong length is an
    // error either way.
    let y = rand_tensor(&mut rng, &[3, 8], 1.0)?;
    let short = rand_tensor(&mut rng, &[7], 1.0)?;
    for choice in [Choice::Reference, Choice::Impl(ImplId::Fused)] {
        with(Kernel::BiasAdd, choice, || {
            assert!(kernels::bias_add(&y, &short).is_err());
        });
    }
    Ok(())
}
