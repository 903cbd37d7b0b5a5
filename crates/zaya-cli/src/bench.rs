//! `zaya bench`: load time, prefill and decode throughput and peak memory on a model, with
//! warm-up and the median of repeated runs. Inputs are a fixed formula of the vocabulary so
//! the reference script (`scripts/bench_reference.py`) feeds exactly the same token ids.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};

use zaya::generation::{generate, GenerateOptions, Greedy};
use zaya::{ForwardOptions, HybridCache, ZayaModel};

#[derive(clap::Args)]
pub struct BenchArgs {
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Attention backend: sdpa (fused, the fastest), flex or eager (the reference,
    /// used wherever attention probabilities are asked for).
    #[arg(long, default_value = "sdpa")]
    pub attn: String,
    /// Compute threads (sets CANDLE_NUM_THREADS / RAYON_NUM_THREADS before any work).
    #[arg(long)]
    pub threads: Option<usize>,
    #[arg(long, default_value_t = 512)]
    pub prefill_len: usize,
    #[arg(long, default_value_t = 32)]
    pub prompt_len: usize,
    #[arg(long, default_value_t = 128)]
    pub new_tokens: usize,
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Measure training steps instead of inference: zero grads + forward with labels +
    /// backward + AdamW, on `--train-batch` rows of `--train-seq-len` tokens.
    #[arg(long)]
    pub train: bool,
    #[arg(long, default_value_t = 4)]
    pub train_batch: usize,
    #[arg(long, default_value_t = 256)]
    pub train_seq_len: usize,
    /// Gradient checkpointing in `--train`: off, every (each layer) or K (every K layers).
    #[arg(long, default_value = "off")]
    pub checkpointing: String,
    /// In `--train`: update each parameter as soon as the backward pass has its gradient
    /// (`zaya train --optimizer-in-backward`) instead of AdamW over all gradients after it.
    #[arg(long)]
    pub optimizer_in_backward: bool,
    /// With any degree above 1 the mesh runs on local ranks beside one rank: inference as
    /// `zaya bench-parallel` (`--tp/--pp/--ep`, prefill of --prefill-len, --new-tokens
    /// decoded), `--train` as pipeline × data-parallel steps (`--pp/--dp`); tokens/s and
    /// bytes per rank.
    #[command(flatten)]
    pub parallel: crate::parallel_cmds::ParallelArgs,
}

/// Token `i` of row `r`: the same formula in the reference script (ids 3.., or every id of
/// a vocabulary of at most 3 tokens).
pub fn bench_ids(rows: usize, len: usize, vocab: usize) -> Vec<Vec<u32>> {
    let (span, base) = if vocab > 3 {
        (vocab - 3, 3)
    } else {
        (vocab.max(1), 0)
    };
    (0..rows)
        .map(|r| {
            (0..len)
                .map(|i| {
                    let x = (i as u64)
                        .wrapping_mul(7919)
                        .wrapping_add((r as u64).wrapping_mul(104_729))
                        .wrapping_add(13);
                    (x % span as u64 + base) as u32
                })
                .collect()
        })
        .collect()
}

/// Rejects sizes the benchmark cannot run with (zero repeats, a decode of fewer than two
/// tokens, a batch whose token count overflows) before any work, naming the flag.
pub fn check_sizes(args: &BenchArgs) -> Result<()> {
    if args.repeats == 0 {
        bail!("--repeats must be at least 1");
    }
    if args.optimizer_in_backward && (!args.train || args.parallel.is_parallel()) {
        bail!("--optimizer-in-backward applies to --train on one rank (no --tp/--pp/--ep/--dp)");
    }
    if args.train {
        if args.train_batch == 0 || args.train_seq_len < 2 {
            bail!("--train-batch must be at least 1 and --train-seq-len at least 2");
        }
        if args.train_batch.checked_mul(args.train_seq_len).is_none() {
            bail!(
                "--train-batch {} x --train-seq-len {} overflows",
                args.train_batch,
                args.train_seq_len
            );
        }
    } else {
        if args.prefill_len == 0 || args.prompt_len == 0 {
            bail!("--prefill-len and --prompt-len must be at least 1");
        }
        if args.new_tokens < 2 {
            bail!("--new-tokens must be at least 2 (decode time is measured after the first)");
        }
        if args.prompt_len.checked_add(args.new_tokens).is_none() {
            bail!("--prompt-len + --new-tokens overflows");
        }
    }
    Ok(())
}

/// Median of the timings (`check_sizes` guarantees at least one repeat).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

pub(crate) fn peak_rss_bytes() -> u64 {
    status_bytes("VmHWM:")
}

/// A `kB` field of /proc/self/status in bytes (0 where unavailable).
fn status_bytes(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with(field)).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|x| x.parse::<u64>().ok())
            })
        })
        .map_or(0, |kb| kb * 1024)
}

/// Bytes as MiB for the tables.
fn mib(bytes: u64) -> String {
    format!("{:.0}", bytes as f64 / (1 << 20) as f64)
}

/// The result table: a title line, then one indented `name value` line per row.
fn print_table(title: &str, rows: &[(String, String)]) -> Result<(), crate::out::OutputError> {
    let mut text = format!("{title}\n");
    for (k, v) in rows {
        text.push_str(&format!("  {k:<36} {v}\n"));
    }
    crate::out::print(&text)
}

/// Read bandwidth of this machine with the benchmark's thread count (GB/s): the best of
/// five passes over a buffer much larger than the caches, split across threads. Each
/// thread folds its part with integer adds, which vectorise (a chain of f32 adds does not:
/// it ran compute-bound, 20–25 % under the memory's rate on the project's AMD EPYC), so the
/// loop is bound by memory and the decode floor computed from it is not understated.
fn read_bandwidth_gbs(threads: usize) -> f64 {
    let n: usize = 64 << 20; // 256 MiB of u32
    let mut mapped = ProbeBuffer::new(n);
    let buf = mapped.as_mut_slice();
    for (i, v) in buf.iter_mut().enumerate() {
        *v = i as u32 % 7;
    }
    let buf = &*buf;
    let chunk = n.div_ceil(threads.max(1));
    let mut best = 0f64;
    for _ in 0..5 {
        let start = Instant::now();
        let total: u32 = std::thread::scope(|s| {
            let hs: Vec<_> = buf
                .chunks(chunk)
                .map(|c| s.spawn(move || c.iter().fold(0u32, |a, &x| a.wrapping_add(x))))
                .collect();
            hs.into_iter()
                .map(|h| h.join().unwrap_or(0))
                .fold(0u32, u32::wrapping_add)
        });
        std::hint::black_box(total);
        let gbs = (n * 4) as f64 / start.elapsed().as_secs_f64() / 1e9;
        best = best.max(gbs);
    }
    best
}

/// The probe's buffer: an anonymous mapping of its own where the platform has `mmap`, given
/// back when dropped, so it never joins the heap (which `zaya` does not trim: a block
/// carved from the heap's top would stay resident and count in every later peak); a `Vec`
/// elsewhere, or if the mapping fails. The mapping asks for huge pages when the heap has
/// them ([`crate::memory`]): the weights are read from 2 MiB pages then, and from 4 KiB
/// pages the same fold reads 15–30 % slower (AMD EPYC, `bf16::tests::huge_page_read_rate`),
/// which understated the decode floor (the probe read 4 KiB pages until 2026-12-07).
enum ProbeBuffer {
    #[cfg(unix)]
    Mapped {
        ptr: *mut u32,
        len: usize,
    },
    Heap(Vec<u32>),
}

impl ProbeBuffer {
    /// `len` zeroed values.
    fn new(len: usize) -> Self {
        #[cfg(unix)]
        {
            // SAFETY: an anonymous private mapping of fresh, zeroed pages; checked below.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len * 4,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if p != libc::MAP_FAILED {
                #[cfg(target_os = "linux")]
                if crate::memory::heap_has_huge_pages() {
                    // SAFETY: advice over the whole mapping just made, before its first
                    // touch; it changes how the pages are backed, not what they hold.
                    unsafe { libc::madvise(p, len * 4, libc::MADV_HUGEPAGE) };
                }
                return ProbeBuffer::Mapped {
                    ptr: p as *mut u32,
                    len,
                };
            }
        }
        ProbeBuffer::Heap(vec![0; len])
    }

    fn as_mut_slice(&mut self) -> &mut [u32] {
        match self {
            // SAFETY: a live mapping of `len` u32, page aligned, owned by `self`.
            #[cfg(unix)]
            ProbeBuffer::Mapped { ptr, len } => unsafe {
                std::slice::from_raw_parts_mut(*ptr, *len)
            },
            ProbeBuffer::Heap(v) => v,
        }
    }
}

impl Drop for ProbeBuffer {
    fn drop(&mut self) {
        #[cfg(unix)]
        if let ProbeBuffer::Mapped { ptr, len } = *self {
            // SAFETY: the mapping made in `new`, not used after this.
            unsafe { libc::munmap(ptr as *mut libc::c_void, len * 4) };
        }
    }
}

/// Resets the kernel's peak-RSS mark (`VmHWM`) to the current RSS (`/proc/self/clear_refs`,
/// value 5; Linux 4.0 on). False where that is not possible.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// The bandwidth probes of one run and the peak RSS without their buffers: a probe between
/// the run's phases maps 256 MiB ([`ProbeBuffer`], given back after it), so the peak so far
/// is kept before it and the kernel's mark is reset after it.
struct Probes {
    threads: usize,
    /// Whether the peak mark can be reset: without it only the probes before loading and
    /// after the peak is read run, and the first still counts in the peak of a model
    /// smaller than its buffer (the JSON's b1 probe fields are then null).
    resettable: bool,
    peak: u64,
}

impl Probes {
    fn new(threads: usize) -> Self {
        Probes {
            threads,
            resettable: reset_peak_rss(),
            peak: 0,
        }
    }

    /// A probe that does not count in the peak RSS, if the peak mark can be reset.
    fn between_phases(&mut self) -> Option<f64> {
        if !self.resettable {
            return None;
        }
        self.peak = self.peak.max(peak_rss_bytes());
        let gbs = read_bandwidth_gbs(self.threads);
        reset_peak_rss();
        Some(gbs)
    }

    /// The run's peak RSS so far, probes excluded.
    fn peak_rss(&self) -> u64 {
        self.peak.max(peak_rss_bytes())
    }
}

pub fn run(
    args: BenchArgs,
    dtype: candle_core::DType,
    attn: zaya::attention::AttnImplementation,
) -> Result<()> {
    check_sizes(&args)?;
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let dev = Device::Cpu;
    // The machine's read bandwidth: on this project's virtual machines it moves between
    // ~36 and ~60 GB/s within minutes, so a floor is only as good as the probes' closeness
    // to what it bounds. Probes run at the start (before loading), before each measured
    // batch-1 repeat and after the last, and at the end (after the peak RSS is read); the
    // floor uses the higher of the first and last around the batch-1 decode where those
    // could run (the peak RSS mark resets), else of the start and end ones, and each
    // repeat is also set against the higher of the two probes beside it.
    let mut probes = Probes::new(threads);
    let bw_start = read_bandwidth_gbs(threads);
    if probes.resettable {
        // the probe's buffer is not the run's
        reset_peak_rss();
    }
    let t0 = Instant::now();
    let model = ZayaModel::load(&args.model, dtype, &dev)?;
    let load_s = t0.elapsed().as_secs_f64();
    let rss_after_load = status_bytes("VmRSS:");
    // what the loaded model holds, in its formats (a GGUF's quantized blocks, not f32)
    let weight_bytes = model.weight_bytes() as u64;
    let cfg = model.config().clone();
    let v = cfg.vocab_size;

    // prefill: batch 1 × prefill_len, one forward with a fresh cache
    let ids = bench_ids(1, args.prefill_len, v);
    let ids = Tensor::new(ids, &dev)?;
    let opts = ForwardOptions {
        logits_to_keep: 1,
        attn,
        ..Default::default()
    };
    let mut prefill = Vec::new();
    for i in 0..=args.repeats {
        let mut cache = HybridCache::new(&cfg);
        let s = Instant::now();
        // as `generate` runs its forwards: one hand-off to the kernel pool per forward
        zaya::kernels::run_in_pool(|| model.forward(&ids, Some(&mut cache), &opts))?;
        if i > 0 {
            prefill.push(s.elapsed().as_secs_f64());
        }
    }
    let prefill_tps = args.prefill_len as f64 / median(prefill);

    // decode: prompt_len prompt, new_tokens greedy steps; decode time = total − prefill.
    // `between()` runs before each measured repeat and after the last (the batch-1
    // decode's bandwidth probes); returns each measured repeat's tokens per second.
    let decode = |batch: usize, between: &mut dyn FnMut()| -> Result<Vec<f64>> {
        let prompts = bench_ids(batch, args.prompt_len, v);
        let gopts = GenerateOptions {
            max_new_tokens: args.new_tokens,
            ignore_eos: true,
            attn,
            ..Default::default()
        };
        let pre = GenerateOptions {
            max_new_tokens: 1,
            ..gopts.clone()
        };
        let mut rates = Vec::new();
        for i in 0..=args.repeats.min(2) {
            if i > 0 {
                between();
            }
            let s = Instant::now();
            generate(&model, &prompts, &pre, &mut Greedy, &mut |_, _| {})?;
            let p = s.elapsed().as_secs_f64();
            let s = Instant::now();
            generate(&model, &prompts, &gopts, &mut Greedy, &mut |_, _| {})?;
            let total = s.elapsed().as_secs_f64();
            if i > 0 {
                rates.push((batch * (args.new_tokens - 1)) as f64 / (total - p).max(1e-9));
            }
        }
        between();
        Ok(rates)
    };
    // The rate of the median repeat time (the slower of two).
    let typical = |rates: &[f64]| 1.0 / median(rates.iter().map(|r| 1.0 / r).collect());
    // Probes beside every batch-1 repeat: the machine's read rate moves within seconds
    // here, so each repeat is also compared with the probes right before and after it.
    let mut b1_probes: Vec<f64> = Vec::new();
    let b1_rates = decode(1, &mut || b1_probes.extend(probes.between_phases()))?;
    let decode_b1 = typical(&b1_rates);
    let decode_b8 = typical(&decode(8, &mut || {})?);
    let (bw_b1_before, bw_b1_after) = (b1_probes.first().copied(), b1_probes.last().copied());

    let peak = probes.peak_rss();

    // Memory-bandwidth floor of batch-1 decode: every weight a token touches is read once.
    let bytes_per_token = model.bytes_per_token();
    let bw_end = read_bandwidth_gbs(threads);
    let (before, after) = match (bw_b1_before, bw_b1_after) {
        (Some(b), Some(a)) => (b, a),
        _ => (bw_start, bw_end),
    };
    let bracket = if bw_b1_before.is_some() {
        "right before / after the b1 decode"
    } else {
        "at the start / end"
    };
    let bw = before.max(after);
    let floor = |gbs: f64| gbs * 1e9 / bytes_per_token as f64;
    let limit = floor(bw);
    let decode_b1_read_gbs = decode_b1 * bytes_per_token as f64 / 1e9;
    // Each batch-1 repeat against the higher of the probes beside it (none without them).
    let matched: Vec<f64> = if b1_probes.len() == b1_rates.len() + 1 {
        b1_rates
            .iter()
            .zip(b1_probes.windows(2))
            .map(|(r, p)| r / floor(p[0].max(p[1])))
            .collect()
    } else {
        Vec::new()
    };
    let matched_text = if matched.is_empty() {
        String::new()
    } else {
        let each: Vec<String> = matched
            .iter()
            .map(|x| format!("{:.0} %", 100.0 * x))
            .collect();
        format!(
            "; each repeat against its own probes: {} (probes {})",
            each.join(", "),
            b1_probes
                .iter()
                .map(|g| format!("{g:.1}"))
                .collect::<Vec<_>>()
                .join(" / ")
        )
    };
    let rows = [
        ("load (s)".to_string(), format!("{load_s:.2}")),
        (
            format!("prefill 1x{} (tok/s)", args.prefill_len),
            format!("{prefill_tps:.1}"),
        ),
        ("decode b1 (tok/s)".into(), format!("{decode_b1:.1}")),
        (
            "decode b1 bandwidth limit (tok/s)".into(),
            format!(
                "{limit:.1}  ({bw:.1} GB/s of {before:.1} / {after:.1} {bracket}, \
                 {bw_start:.1} / {bw_end:.1} at the run's start / end; {:.1} MB/token)",
                bytes_per_token as f64 / 1e6
            ),
        ),
        (
            // Against each probe of the bracket too: where the machine's read rate moved
            // during the batch-1 decode, one ratio says little.
            "decode b1 / limit".into(),
            format!(
                "{:.0} %  ({:.0} % / {:.0} % of the floor {bracket}{matched_text})",
                100.0 * decode_b1 / limit,
                100.0 * decode_b1 / floor(before),
                100.0 * decode_b1 / floor(after)
            ),
        ),
        (
            // The decode's own read rate: steadier to compare across runs than a ratio to
            // probes that move with the machine (17-29 GB/s within an hour on one VM).
            "decode b1 weight reads (GB/s)".into(),
            format!("{decode_b1_read_gbs:.1}  (bytes a token reads x tok/s)"),
        ),
        ("decode b8 (tok/s)".into(), format!("{decode_b8:.1}")),
        ("peak RSS (MiB)".into(), mib(peak)),
        (
            "RSS after load / weights (MiB)".into(),
            format!("{} / {}", mib(rss_after_load), mib(weight_bytes)),
        ),
    ];
    print_table(
        &format!(
            "zaya bench: {} ({} threads, {}, attn {})",
            args.model.display(),
            threads,
            args.dtype,
            args.attn
        ),
        &rows,
    )?;
    if let Some(path) = args.json {
        let j = serde_json::json!({
            "model": args.model.display().to_string(),
            "threads": threads,
            "dtype": args.dtype,
            "attn": args.attn,
            "load_s": load_s,
            "prefill_tokens_per_s": prefill_tps,
            "decode_b1_tokens_per_s": decode_b1,
            "decode_b8_tokens_per_s": decode_b8,
            "decode_b1_bandwidth_limit_tokens_per_s": limit,
            "decode_b1_weight_read_gb_s": decode_b1_read_gbs,
            "read_bandwidth_gb_s": bw,
            "read_bandwidth_gb_s_start": bw_start,
            "read_bandwidth_gb_s_end": bw_end,
            "read_bandwidth_gb_s_b1_before": bw_b1_before,
            "read_bandwidth_gb_s_b1_after": bw_b1_after,
            "read_bandwidth_gb_s_b1_probes": b1_probes,
            "decode_b1_tokens_per_s_per_repeat": b1_rates,
            "decode_b1_floor_fraction_per_repeat": matched,
            "bytes_per_token": bytes_per_token,
            "peak_rss_bytes": peak,
            "heap": crate::memory::describe(),
            "rss_after_load_bytes": rss_after_load,
            "weight_bytes": weight_bytes,
            "prefill_len": args.prefill_len,
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
        });
        std::fs::write(&path, serde_json::to_string_pretty(&j)?)?;
    }
    Ok(())
}

/// `zaya bench --train`: optimizer steps per second on a fixed labelled batch (every
/// position a target), timed as the reference script times `zero_grad + forward(labels) +
/// backward + AdamW.step`. Run in its own process so peak RSS is the training peak alone.
pub fn run_train(args: BenchArgs, attn: zaya::attention::AttnImplementation) -> Result<()> {
    check_sizes(&args)?;
    use zaya::train::optim::{AdamW, AdamWConfig};
    use zaya::train::{Batch, LossScale, TrainOptions, TrainableModel};
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let t0 = Instant::now();
    let model = TrainableModel::load(&args.model)?;
    let load_s = t0.elapsed().as_secs_f64();
    let cfg = model.config().clone();
    let ids = bench_ids(args.train_batch, args.train_seq_len, cfg.vocab_size);
    let batch = Batch::language_modelling(ids);
    let opts = TrainOptions {
        checkpointing: crate::train_run::parse_checkpointing(&args.checkpointing)?,
        attn,
        ..TrainOptions::for_config(&cfg)
    };
    let mut adamw = AdamW::new(model.params(), AdamWConfig::default())?;
    let mut times = Vec::new();
    let mut losses = Vec::new();
    for i in 0..=args.repeats {
        let s = Instant::now();
        let out = if args.optimizer_in_backward {
            let params = model.params();
            model.forward_backward_into(&batch, &opts, &LossScale::default(), &mut |i, g| {
                adamw.step_param(i, &params[i], &g, 1e-4)
            })?
        } else {
            let out = model.forward_backward(&batch, &opts, &LossScale::default())?;
            adamw.step(model.params(), &out.grads, 1e-4)?;
            out
        };
        if i > 0 {
            times.push(s.elapsed().as_secs_f64());
        }
        losses.push(out.loss);
    }
    let tokens = (args.train_batch * args.train_seq_len) as f64;
    let step_s = median(times);
    let tps = tokens / step_s;
    let peak = peak_rss_bytes();
    let rows = [
        ("load (s)".to_string(), format!("{load_s:.2}")),
        ("train step (s)".into(), format!("{step_s:.3}")),
        ("train (tok/s)".into(), format!("{tps:.1}")),
        (
            "loss first / last".into(),
            format!("{:.4} / {:.4}", losses[0], losses[losses.len() - 1]),
        ),
        ("peak RSS (MiB)".into(), mib(peak)),
    ];
    print_table(
        &format!(
            "zaya bench --train: {} ({} threads, f32, attn {}, batch {} x {}, checkpointing {}{})",
            args.model.display(),
            threads,
            args.attn,
            args.train_batch,
            args.train_seq_len,
            args.checkpointing,
            if args.optimizer_in_backward {
                ", optimizer in backward"
            } else {
                ""
            }
        ),
        &rows,
    )?;
    if let Some(path) = args.json {
        let j = serde_json::json!({
            "model": args.model.display().to_string(),
            "threads": threads,
            "dtype": "f32",
            "train_batch": args.train_batch,
            "train_seq_len": args.train_seq_len,
            "checkpointing": args.checkpointing,
            "optimizer_in_backward": args.optimizer_in_backward,
            "attn": args.attn,
            "load_s": load_s,
            "train_step_s": step_s,
            "train_tokens_per_s": tps,
            "losses": losses,
            "peak_rss_bytes": peak,
            "heap": crate::memory::describe(),
        });
        std::fs::write(&path, serde_json::to_string_pretty(&j)?)?;
    }
    Ok(())
}
