//! `zaya bench-engine`: generation throughput of the continuous-batching engine in-process at
//! several concurrencies (all requests submitted at once, greedy, no EOS, distinct prompts),
//! with time to first token and inter-token latency, against zaya's own static-batch
//! `generate` of the same prompts measured in the same run.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{DType, Device};

use zaya::attention::AttnImplementation;
use zaya::generation::{generate_greedy, GenerateOptions};
use zaya::ZayaModel;
use zaya_engine::{Engine, EngineConfig, Event, GenerationRequest};

use crate::bench::bench_ids;

#[derive(clap::Args)]
pub struct BenchEngineArgs {
    /// Model directory (default: the embedded default model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Attention backend: sdpa (fused, the fastest), flex or eager (the reference,
    /// used wherever attention probabilities are asked for).
    #[arg(long, default_value = "sdpa")]
    pub attn: String,
    /// Comma-separated concurrencies.
    #[arg(long, default_value = "1,8,32")]
    pub concurrency: String,
    #[arg(long, default_value_t = 64)]
    pub prompt_len: usize,
    #[arg(long, default_value_t = 64)]
    pub new_tokens: usize,
    /// Skip the static-batch `generate` comparison.
    #[arg(long)]
    pub no_reference: bool,
    /// Write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

struct Run {
    concurrency: usize,
    seconds: f64,
    tokens: usize,
    ttft_p50: f64,
    ttft_p99: f64,
    itl_p50: f64,
    itl_p99: f64,
    reference_seconds: Option<f64>,
    cpu_seconds: Option<f64>,
    reference_cpu_seconds: Option<f64>,
}

/// CPU time (user + system) this process has used, from `/proc/self/stat` (Linux; clock
/// ticks of 10 ms). On a shared machine wall time includes time spent waiting for a CPU;
/// CPU time per token compares runs fairly.
fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let i = ((v.len() - 1) as f64 * p).round() as usize;
    v[i]
}

fn one_run(
    model: &Arc<ZayaModel>,
    attn: AttnImplementation,
    c: usize,
    prompts: &[Vec<u32>],
    new_tokens: usize,
) -> Result<(f64, usize, Vec<f64>, Vec<f64>)> {
    let engine = Engine::start(
        model.clone(),
        None,
        EngineConfig {
            max_running: c.max(1),
            prefix_cache_bytes: 0,
            attn,
            ..Default::default()
        },
    )?;
    let start = Instant::now();
    let mut readers = Vec::new();
    for p in prompts.iter().take(c) {
        let h = engine
            .submit(GenerationRequest::new(p.clone(), new_tokens))
            .map_err(|e| anyhow::anyhow!("submit: {e}"))?;
        readers.push(std::thread::spawn(move || {
            let mut stamps = Vec::new();
            let mut error = None;
            while let Some(e) = h.recv() {
                match e {
                    Event::Token { .. } => stamps.push(start.elapsed().as_secs_f64()),
                    Event::Error { message } => error = Some(message),
                    _ => {}
                }
            }
            (stamps, error)
        }));
    }
    let mut ttft = Vec::new();
    let mut itl = Vec::new();
    let mut tokens = 0;
    for r in readers {
        let (stamps, error) = r
            .join()
            .map_err(|_| anyhow::anyhow!("reader thread panicked"))?;
        if let Some(e) = error {
            bail!("request failed: {e}");
        }
        tokens += stamps.len();
        if let Some(&first) = stamps.first() {
            ttft.push(first);
        }
        itl.extend(stamps.windows(2).map(|w| w[1] - w[0]));
    }
    let seconds = start.elapsed().as_secs_f64();
    engine.shutdown(true);
    Ok((seconds, tokens, ttft, itl))
}

pub fn run(args: BenchEngineArgs, dtype: DType, attn: AttnImplementation) -> Result<()> {
    let dir = match &args.model {
        Some(d) => d.clone(),
        None => crate::default_model::dir()?,
    };
    let model = Arc::new(ZayaModel::load(&dir, dtype, &Device::Cpu)?);
    let concurrencies: Vec<usize> = args
        .concurrency
        .split(',')
        .map(|s| s.trim().parse::<usize>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("--concurrency: {e}"))?;
    if concurrencies.contains(&0) {
        bail!("--concurrency values must be >= 1");
    }
    let vocab = model.config().vocab_size;
    let max_c = concurrencies.iter().copied().max().unwrap_or(1);
    let prompts = bench_ids(max_c, args.prompt_len, vocab);
    // warm-up (thread pools, allocator)
    one_run(&model, attn, 1, &prompts, 4)?;

    let mut runs = Vec::new();
    for &c in &concurrencies {
        let cpu0 = process_cpu_seconds();
        let (seconds, tokens, ttft, itl) = one_run(&model, attn, c, &prompts, args.new_tokens)?;
        let cpu1 = process_cpu_seconds();
        let cpu_seconds = cpu0.zip(cpu1).map(|(a, b)| b - a);
        let mut reference_cpu_seconds = None;
        let reference_seconds = if args.no_reference {
            None
        } else {
            let opts = GenerateOptions {
                max_new_tokens: args.new_tokens,
                ignore_eos: true,
                attn,
                ..Default::default()
            };
            let t = Instant::now();
            let c0 = process_cpu_seconds();
            generate_greedy(&model, &prompts[..c], &opts)?;
            reference_cpu_seconds = c0.zip(process_cpu_seconds()).map(|(a, b)| b - a);
            Some(t.elapsed().as_secs_f64())
        };
        runs.push(Run {
            concurrency: c,
            seconds,
            tokens,
            ttft_p50: percentile(ttft.clone(), 0.5),
            ttft_p99: percentile(ttft, 0.99),
            itl_p50: percentile(itl.clone(), 0.5),
            itl_p99: percentile(itl, 0.99),
            reference_seconds,
            cpu_seconds,
            reference_cpu_seconds,
        });
    }

    let base = runs.first().map(|r| r.tokens as f64 / r.seconds);
    println!(
        "engine throughput ({}, {} prompt tokens, {} new tokens per request, {:?}, attn {})",
        dir.display(),
        args.prompt_len,
        args.new_tokens,
        dtype,
        attn.as_str()
    );
    println!(
        "  {:>4} {:>9} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>11} {:>10} {:>10}",
        "conc",
        "tok/s",
        "x conc1",
        "ttft p50",
        "ttft p99",
        "itl p50",
        "itl p99",
        "x generate",
        "tok/cpu-s",
        "x conc1 cpu",
        "x gen cpu"
    );
    let cpu_rate = |r: &Run| r.cpu_seconds.map(|c| r.tokens as f64 / c.max(0.01));
    let base_cpu = runs.first().and_then(cpu_rate);
    let mut json_runs = Vec::new();
    for r in &runs {
        let tps = r.tokens as f64 / r.seconds;
        let vs_generate = r
            .reference_seconds
            .map(|s| format!("{:.2}", s / r.seconds))
            .unwrap_or_else(|| "-".into());
        let fmt = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.2}"));
        let cpu_tps = cpu_rate(r);
        let vs_generate_cpu = r
            .reference_cpu_seconds
            .zip(r.cpu_seconds)
            .map(|(g, e)| g.max(0.01) / e.max(0.01));
        println!(
            "  {:>4} {:>9.1} {:>8.2} {:>7.1}ms {:>7.1}ms {:>7.2}ms {:>7.2}ms {:>9} {:>11} {:>10} {:>10}",
            r.concurrency,
            tps,
            tps / base.unwrap_or(tps),
            r.ttft_p50 * 1e3,
            r.ttft_p99 * 1e3,
            r.itl_p50 * 1e3,
            r.itl_p99 * 1e3,
            vs_generate,
            cpu_tps.map_or_else(|| "-".to_string(), |v| format!("{v:.1}")),
            fmt(cpu_tps.zip(base_cpu).map(|(a, b)| a / b)),
            fmt(vs_generate_cpu)
        );
        json_runs.push(serde_json::json!({
            "concurrency": r.concurrency,
            "tokens": r.tokens,
            "seconds": r.seconds,
            "tokens_per_second": tps,
            "ttft_p50_s": r.ttft_p50,
            "ttft_p99_s": r.ttft_p99,
            "itl_p50_s": r.itl_p50,
            "itl_p99_s": r.itl_p99,
            "generate_seconds": r.reference_seconds,
            "cpu_seconds": r.cpu_seconds,
            "generate_cpu_seconds": r.reference_cpu_seconds,
        }));
    }
    let json = serde_json::json!({
        "model": dir.display().to_string(),
        "dtype": format!("{dtype:?}"),
        "attn": attn.as_str(),
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "runs": json_runs,
    });
    println!("{json}");
    if let Some(p) = &args.json {
        std::fs::write(p, serde_json::to_string_pretty(&json)?)?;
    }
    Ok(())
}
