//! Measures candle's quantized CPU matmul (the path `Linear` and the quantized experts use)
//! on ZAYA1-8B's shapes against the dense f32 / bf16 matmul of the `matmul` kernel:
//! decode GEMV (1 row) and small batches (8 rows) through the attention projections, one
//! expert's gate/up and down, and the lm_head. Prints a table and, with `--json FILE`, JSON.
//!
//! `cargo run --release -p zaya --example quant_bench [-- --rows 1,8 --json out.json]`

use std::sync::Arc;
use std::time::Instant;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

fn time<F: FnMut()>(mut f: F) -> f64 {
    f(); // warm-up (also packs the repacked weight tiles once)
    let mut best = f64::INFINITY;
    let mut spent = 0.0;
    let mut runs = 0;
    while (spent < 0.6 && runs < 200) || runs < 3 {
        let t = Instant::now();
        f();
        let s = t.elapsed().as_secs_f64();
        best = best.min(s);
        spent += s;
        runs += 1;
    }
    best
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |k: &str| {
        args.iter()
            .position(|a| a == k)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let rows: Vec<usize> = arg("--rows")
        .unwrap_or_else(|| "1,8".into())
        .split(',')
        .map(|s| s.parse().unwrap())
        .collect();
    let with_head = !args.iter().any(|a| a == "--no-head");
    let mut shapes = vec![
        ("q_proj", 1024usize, 2048usize),
        ("k_proj", 256, 2048),
        ("o_proj", 2048, 1024),
        ("expert gate_up", 4096, 2048),
        ("expert down", 2048, 2048),
    ];
    if with_head {
        shapes.push(("lm_head", 262272, 2048));
    }
    let dev = Device::Cpu;
    let mut out = Vec::new();
    let bw = read_bandwidth();
    println!("memory read bandwidth (all threads, 512 MiB): {bw:.1} GB/s\n");
    out.push(serde_json::json!({"read_bandwidth_gb_per_s": bw}));
    println!(
        "| shape (out x in) | rows | format | µs | weight GB/s | x f32 |\n|---|---|---|---|---|---|"
    );
    for (name, n, k) in shapes {
        let w = Tensor::randn(0f32, 0.02, (n, k), &dev)?;
        for &m in &rows {
            let x = Tensor::randn(0f32, 1., (m, k), &dev)?;
            let wt = w.t()?;
            let f32_s = time(|| {
                zaya::kernels::matmul(&x, &wt).unwrap();
            });
            let wb = w.to_dtype(DType::BF16)?;
            let wbt = wb.t()?;
            let xb = x.to_dtype(DType::BF16)?;
            let bf16_s = time(|| {
                zaya::kernels::matmul(&xb, &wbt).unwrap();
            });
            let mut rowsout = vec![
                ("f32".to_string(), f32_s, n * k * 4),
                ("bf16".to_string(), bf16_s, n * k * 2),
            ];
            for d in [GgmlDType::Q8_0, GgmlDType::Q4K, GgmlDType::Q6K] {
                let q = Arc::new(QTensor::quantize(&w, d)?);
                let s = time(|| {
                    x.apply_op1_no_bwd(q.as_ref()).unwrap();
                });
                rowsout.push((
                    zaya::quant::ggml_name(d).to_string(),
                    s,
                    q.storage_size_in_bytes(),
                ));
            }
            for (fmt, s, bytes) in rowsout {
                let gbs = bytes as f64 / s / 1e9;
                println!(
                    "| {name} {n}x{k} | {m} | {fmt} | {:.0} | {gbs:.1} | {:.2} |",
                    s * 1e6,
                    f32_s / s
                );
                out.push(serde_json::json!({
                    "shape": name, "out": n, "in": k, "rows": m, "format": fmt,
                    "seconds": s, "weight_bytes": bytes, "gb_per_s": gbs, "speedup_vs_f32": f32_s / s,
                }));
            }
        }
    }
    if let Some(p) = arg("--json") {
        std::fs::write(p, serde_json::to_string_pretty(&out)?)?;
    }
    Ok(())
}

/// Read bandwidth: the best of five threaded sums over 512 MiB (what a weight-streaming
/// decode step is bounded by).
pub fn read_bandwidth() -> f64 {
    use rayon::prelude::*;
    let buf = vec![1f32; 128 << 20];
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t = Instant::now();
        let s: f32 = buf
            .par_chunks(1 << 16)
            .map(|c| {
                // 16 independent sums: vectorised, so the loop is bound by memory, not adds
                let mut acc = [0f32; 16];
                for v in c.chunks_exact(16) {
                    for (a, x) in acc.iter_mut().zip(v) {
                        *a += x;
                    }
                }
                acc.iter().sum::<f32>()
            })
            .sum();
        std::hint::black_box(s);
        best = best.min(t.elapsed().as_secs_f64());
    }
    (buf.len() * 4) as f64 / best / 1e9
}
