//! Peak memory and time of one forward/backward with and without gradient checkpointing.
//!
//! `cargo run --release -p zaya --example train_memory -- <off|1|2|4|time> [batch] [seq] [layers]`
//! (`time` runs every mode interleaved and reports only times)
//!
//! Builds a random model (hidden 512, 8 heads / 2 KV, head_dim 64, 16 experts,
//! moe_intermediate 512, router_hidden 128, vocab 32000; `layers` default 8) and a random
//! `batch × seq` batch. The first forward/backward gives the memory: process peak RSS
//! (`VmHWM`, reset through `/proc/self/clear_refs` once the model is built) above the RSS of
//! the weights, i.e. activations + kept graph + gradients. Then the best of three more is timed (wall and CPU). Run each
//! mode in its own process: freed memory stays in the allocator and would hide the next
//! measurement.

use std::time::Instant;

use zaya::train::{Batch, Checkpointing, LossScale, TrainOptions, TrainableModel};
use zaya::ZayaConfig;

fn status_kib(field: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// User + system CPU seconds of this process (`/proc/self/stat` fields 14 and 15, in
/// clock ticks of 1/100 s): unlike wall time, barely affected by other processes on a shared
/// machine.
fn cpu_seconds() -> f64 {
    let text = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The command name (field 2) is in parentheses and may hold spaces: split after it.
    let rest = text.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // `rest` starts at field 3, so fields 14 and 15 are at indices 11 and 12.
    (f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)) as f64 / 100.0
}

fn reset_peak() {
    // "5" resets VmHWM to the current RSS (Linux >= 4.0).
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn main() -> zaya::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map_or("off", String::as_str);
    let arg = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (batch, seq, layers) = (arg(2, 4), arg(3, 256), arg(4, 8));
    let checkpointing = match mode {
        "off" | "time" => Checkpointing::Off,
        k => Checkpointing::Every(k.parse().map_err(|_| {
            zaya::ZayaError::Input(format!("mode must be off or a layer count, got {k}"))
        })?),
    };
    let cfg = ZayaConfig::from_json(&serde_json::json!({
        "vocab_size": 32000, "hidden_size": 512, "num_hidden_layers": layers,
        "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64,
        "moe_intermediate_size": 512, "num_experts": 16, "router_hidden_size": 128,
        "max_position_embeddings": 4096
    }))?;
    let model = {
        let weights = zaya::init::random_weights(&cfg, 0)?;
        TrainableModel::from_tensors(&cfg, &weights)?
    };
    let params: usize = model.params().iter().map(|p| p.var.elem_count()).sum();
    // Deterministic pseudo-random tokens (LCG), every position labelled.
    let mut x = 12345u64;
    let ids: Vec<Vec<u32>> = (0..batch)
        .map(|_| {
            (0..seq)
                .map(|_| {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    1 + ((x >> 33) % (cfg.vocab_size as u64 - 1)) as u32
                })
                .collect()
        })
        .collect();
    let b = Batch::language_modelling(ids);
    let opts = TrainOptions {
        checkpointing,
        ..TrainOptions::for_config(&cfg)
    };
    if mode == "time" {
        // Modes interleaved round by round, so that load from other processes hits all
        // of them alike; per mode the minimum and the median over the rounds.
        let modes = [
            ("off", Checkpointing::Off),
            ("4", Checkpointing::Every(4)),
            ("2", Checkpointing::Every(2)),
            ("1", Checkpointing::EveryLayer),
        ];
        let mut times: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
        for round in 0..=5 {
            for (i, (_, cp)) in modes.iter().enumerate() {
                let o = TrainOptions {
                    checkpointing: *cp,
                    ..opts
                };
                let start = Instant::now();
                model.forward_backward(&b, &o, &LossScale::default())?;
                // Round 0 warms caches and the allocator.
                if round > 0 {
                    times[i].push(start.elapsed().as_secs_f64());
                }
            }
        }
        for ((name, _), t) in modes.iter().zip(&mut times) {
            t.sort_by(f64::total_cmp);
            println!(
                "time mode={name} layers={layers} batch={batch}x{seq}: min {:.2}s median {:.2}s",
                t[0],
                t[t.len() / 2]
            );
        }
        return Ok(());
    }
    // Memory of the first step in a fresh process (the allocator holds only the weights);
    // time of a second step (warm caches).
    let before = status_kib("VmRSS:");
    reset_peak();
    let out = model.forward_backward(&b, &opts, &LossScale::default())?;
    let peak = status_kib("VmHWM:");
    drop(out);
    // Best of three: the minimum is the least disturbed by other load on the machine.
    let (mut secs, mut cpu) = (f64::INFINITY, f64::INFINITY);
    let mut out = None;
    for _ in 0..3 {
        let start = Instant::now();
        let cpu0 = cpu_seconds();
        out = Some(model.forward_backward(&b, &opts, &LossScale::default())?);
        secs = secs.min(start.elapsed().as_secs_f64());
        cpu = cpu.min(cpu_seconds() - cpu0);
    }
    let out = out.ok_or_else(|| zaya::ZayaError::Input("no timed step".into()))?;
    println!(
        "mode={mode} layers={layers} batch={batch}x{seq} params={:.1}M loss={:.4} \
         step={secs:.2}s cpu={cpu:.2}s rss_weights={:.0}MiB peak={:.0}MiB step_peak_above_weights={:.0}MiB",
        params as f64 / 1e6,
        out.loss,
        before as f64 / 1024.0,
        peak as f64 / 1024.0,
        peak.saturating_sub(before) as f64 / 1024.0
    );
    Ok(())
}
