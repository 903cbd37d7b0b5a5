//! Times every kernel's implementations and the attention backends on model-sized shapes.
//!
//! ```text
//! CANDLE_NUM_THREADS=2 RAYON_NUM_THREADS=2 cargo run --release -p zaya --example kernel_bench [--features blas]
//! ```
//!
//! Prints the kernel table, then one line per measurement: best wall time of a few runs
//! (after a warm-up), forward and, where noted, forward + backward. Arguments pick
//! sections (`matmul`, `kernels`, `attention`; default all).

use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use zaya::attention::{attend, AttnImplementation, MaskSpec};
use zaya::kernels::{
    self,
    registry::{self, Choice, ImplId, Kernel, KernelTable},
};

fn rand(dims: &[usize], scale: f64) -> Result<Tensor> {
    Ok((Tensor::rand(-1f32, 1f32, dims, &Device::Cpu)? * scale)?)
}

/// Best time in milliseconds over `runs` runs after one warm-up.
fn time(runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut best = f64::INFINITY;
    for _ in 0..runs {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(best)
}

fn with<R>(kernel: Kernel, choice: Choice, f: impl FnOnce() -> R) -> R {
    registry::with_choice(Some(kernel), choice, f).expect("valid choice")
}

/// Reference vs fused for one kernel, forward and forward + backward (the inputs are Vars,
/// so the forward times include recording the graph, as in training).
fn compare(kernel: Kernel, label: &str, f: &dyn Fn() -> Result<Tensor>) -> Result<()> {
    let mut line = format!("{label:<44}");
    for (name, choice) in [
        ("reference", Choice::Reference),
        ("fused", Choice::Impl(ImplId::Fused)),
    ] {
        let fwd = with(kernel, choice, || time(5, || f().map(|_| ())))?;
        let bwd = with(kernel, choice, || {
            time(3, || {
                let y = f()?;
                y.to_dtype(DType::F32)?.sum_all()?.backward()?;
                Ok(())
            })
        })?;
        line += &format!("  {name}: fwd {fwd:>8.2} ms, fwd+bwd {bwd:>8.2} ms");
    }
    println!("{line}");
    Ok(())
}

fn main() -> Result<()> {
    println!("{}", KernelTable::current());
    let args: Vec<String> = std::env::args().skip(1).collect();
    let want = |s: &str| args.is_empty() || args.iter().any(|a| a == s);
    if want("matmul") {
        bench_matmul()?;
    }
    if want("kernels") {
        bench_kernels()?;
    }
    if want("attention") {
        bench_attention()?;
    }
    Ok(())
}

fn bench_matmul() -> Result<()> {
    // Matmul: [512 x 2048] · [2048 x 2048], f32.
    let (m, k, n) = (512, 2048, 2048);
    let a = rand(&[m, k], 1.0)?;
    let b = rand(&[k, n], 1.0)?;
    let flops = 2.0 * (m * k * n) as f64;
    let candle = time(10, || Ok(a.matmul(&b).map(|_| ())?))?;
    println!(
        "matmul {m}x{k}x{n} f32  candle gemm: {candle:.2} ms = {:.0} GFLOP/s",
        flops / candle / 1e6
    );
    if kernels::blas_available() {
        let blas = with(Kernel::Matmul, Choice::Impl(ImplId::Blas), || {
            time(10, || Ok(kernels::matmul(&a, &b).map(|_| ())?))
        })?;
        println!(
            "matmul {m}x{k}x{n} f32  OpenBLAS:    {blas:.2} ms = {:.0} GFLOP/s",
            flops / blas / 1e6
        );
        let wt = rand(&[n, k], 1.0)?;
        let blas_t = with(Kernel::Matmul, Choice::Impl(ImplId::Blas), || {
            time(10, || Ok(kernels::matmul(&a, &wt.t()?).map(|_| ())?))
        })?;
        let candle_t = time(10, || Ok(a.matmul(&wt.t()?).map(|_| ())?))?;
        println!(
            "matmul x·Wᵀ (linear layout)  candle {:.0} GFLOP/s, OpenBLAS {:.0} GFLOP/s",
            flops / candle_t / 1e6,
            flops / blas_t / 1e6
        );
    } else {
        println!("matmul OpenBLAS: not built (run with --features blas)");
    }
    Ok(())
}

fn bench_kernels() -> Result<()> {
    // Elementwise / row kernels at model sizes.
    let x = Var::from_tensor(&rand(&[1, 512, 2048], 2.0)?)?;
    let w = Var::from_tensor(&rand(&[2048], 1.0)?)?;
    compare(Kernel::RmsNorm, "rms_norm [1,512,2048] f32", &|| {
        Ok(kernels::rms_norm(x.as_tensor(), w.as_tensor(), 1e-5)?)
    })?;
    let q = Var::from_tensor(&rand(&[1, 8, 512, 128], 1.0)?)?;
    let cos = rand(&[1, 512, 64], 1.0)?;
    let sin = rand(&[1, 512, 64], 1.0)?;
    compare(Kernel::Rotary, "rotary [1,8,512,128] rd 64 f32", &|| {
        Ok(kernels::rotary(q.as_tensor(), &cos, &sin)?)
    })?;
    let gu = Var::from_tensor(&rand(&[512, 4096], 3.0)?)?;
    compare(Kernel::Swiglu, "swiglu [512,4096] f32", &|| {
        Ok(kernels::swiglu(gu.as_tensor())?)
    })?;
    let s = Var::from_tensor(&rand(&[8, 512, 512], 5.0)?)?;
    compare(Kernel::Softmax, "softmax [8,512,512] f32", &|| {
        Ok(kernels::softmax_f32(s.as_tensor())?)
    })?;
    // CCA convs at the ZAYA1-8B shape: C = 1280, 10 groups of 128, K0 = K1 = 2, T = 512.
    let xc = Var::from_tensor(&rand(&[1, 514, 1280], 1.0)?)?;
    let w0 = Var::from_tensor(&rand(&[1280, 1, 2], 1.0)?)?;
    let b0 = Var::from_tensor(&rand(&[1280], 1.0)?)?;
    let w1 = Var::from_tensor(&rand(&[1280, 128, 2], 0.1)?)?;
    let b1 = Var::from_tensor(&rand(&[1280], 1.0)?)?;
    compare(Kernel::CcaConv, "cca_conv T512 C1280 G10 K2,2 f32", &|| {
        Ok(kernels::cca_conv(
            xc.as_tensor(),
            w0.as_tensor(),
            b0.as_tensor(),
            w1.as_tensor(),
            b1.as_tensor(),
            10,
        )?)
    })?;
    let xd = rand(&[1, 3, 1280], 1.0)?;
    let (w0t, b0t, w1t, b1t) = (
        w0.as_tensor().detach(),
        b0.as_tensor().detach(),
        w1.as_tensor().detach(),
        b1.as_tensor().detach(),
    );
    for (name, choice) in [("reference", Choice::Reference), ("fused", Choice::Auto)] {
        let ms = with(Kernel::CcaConv, choice, || {
            time(50, || {
                Ok(kernels::cca_conv(&xd, &w0t, &b0t, &w1t, &b1t, 10).map(|_| ())?)
            })
        })?;
        println!("cca_conv decode T1 {name}: {:.1} µs", ms * 1e3);
    }
    // MoE experts: 512 tokens, H 1024, I 1024, 8 experts, ~1/9 skipped.
    let (nt, h, i, e) = (512, 1024, 1024, 8);
    let xm = Var::from_tensor(&rand(&[nt, h], 1.0)?)?;
    let wm = Var::from_tensor(&rand(&[nt, 1], 1.0)?)?;
    let gum = Var::from_tensor(&rand(&[e, 2 * i, h], 0.05)?)?;
    let dm = Var::from_tensor(&rand(&[e, h, i], 0.05)?)?;
    let ids: Vec<u32> = (0..nt as u32)
        .map(|t| (t * 7 + 3) % (e as u32 + 1))
        .collect();
    compare(
        Kernel::MoeExperts,
        "moe_experts N512 H1024 I1024 E8 f32",
        &|| {
            Ok(kernels::moe_experts(
                xm.as_tensor(),
                &ids,
                wm.as_tensor(),
                gum.as_tensor(),
                dm.as_tensor(),
            )?)
        },
    )?;

    Ok(())
}

fn bench_attention() -> Result<()> {
    // Attention: ZAYA1-8B heads (8 query, 2 KV, D 128), causal.
    for &(t, past) in &[(1024usize, 0usize), (1, 4095)] {
        let n = t + past;
        let q = Var::from_tensor(&rand(&[1, 8, t, 128], 1.0)?)?;
        let k = Var::from_tensor(&rand(&[1, 2, n, 128], 1.0)?)?;
        let v = Var::from_tensor(&rand(&[1, 2, n, 128], 1.0)?)?;
        let spec = MaskSpec {
            batch: 1,
            q_start: past,
            q_len: t,
            kv_start: 0,
            kv_len: n,
            window: None,
            key_padding: None,
            documents: None,
        };
        let scale = 1.0 / (128f64).sqrt();
        let mut line = format!("attention T{t} N{n} Nq8 Nkv2 D128 causal");
        for backend in [
            AttnImplementation::Eager,
            AttnImplementation::Sdpa,
            AttnImplementation::Flex,
        ] {
            let (qd, kd, vd) = (
                q.as_tensor().detach(),
                k.as_tensor().detach(),
                v.as_tensor().detach(),
            );
            let fwd = time(3, || {
                Ok(attend(backend, &qd, &kd, &vd, &spec, scale, false).map(|_| ())?)
            })?;
            line += &format!("  {}: fwd {fwd:.2} ms", backend.as_str());
            if t > 1 {
                let bwd = time(2, || {
                    let (o, _) = attend(
                        backend,
                        q.as_tensor(),
                        k.as_tensor(),
                        v.as_tensor(),
                        &spec,
                        scale,
                        false,
                    )?;
                    o.sum_all()?.backward()?;
                    Ok(())
                })?;
                line += &format!(" fwd+bwd {bwd:.2} ms");
            }
        }
        println!("{line}");
    }
    Ok(())
}
