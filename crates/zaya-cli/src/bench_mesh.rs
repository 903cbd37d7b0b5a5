//! `zaya bench --tp/--pp/--ep/--dp`: the parallel measurements beside one rank. Inference
//! reuses `zaya bench-parallel` (prefill of `--prefill-len` tokens and `--new-tokens` cached
//! greedy decode, weight bytes per rank; on local ranks, or one rank per process under
//! `mpirun`, where each rank's peak RSS is its own); `--train` (local ranks) times pipeline ×
//! data-parallel optimizer steps ([`zaya_dist::ParallelTrainer`]: 1F1B over one-row
//! micro-batches, bucketed gradient sums, ZeRO-1) against the single-rank step on the same
//! batch, and reports each rank's training-state bytes (f32 weights and gradients of its
//! stage, AdamW moments of its ZeRO share). Local ranks are threads of one process: the
//! peak RSS is the whole process's, not a rank's. Under `mpirun` (MPI build) `--train`
//! runs one rank per process (`--tp/--ep` through [`zaya_dist::TpParallelTrainer`],
//! `--pp/--dp` through [`ParallelTrainer`]), each reading only its part of the model
//! directory, and rank 0 reports the step time, tokens/s and every process's peak RSS;
//! the one-process baseline is `zaya bench --train` without parallel degrees (running it
//! inside rank 0 would put the whole model into rank 0's peak).

use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use zaya::train::optim::{AdamW, AdamWConfig};
use zaya::train::trainer::{Trainer, TrainerConfig};
use zaya::train::{Batch, LossScale, TrainOptions, TrainableModel};
use zaya_dist::train_driver::{check_setup, DriverOptions, Layout, ParallelTrainer};
use zaya_dist::Mesh;

use crate::bench::{bench_ids, check_sizes, BenchArgs};

pub fn run(args: BenchArgs) -> Result<()> {
    check_sizes(&args)?;
    if args.train {
        #[cfg(feature = "mpi")]
        if zaya_dist::mpi_backend::launched_by_mpi() {
            return run_train_mpi(args);
        }
        if zaya_dist::comm::launched_by_mpi() {
            // every copy would run the whole mesh of local ranks itself
            bail!("started by an MPI launcher, but this zaya was built without MPI: rebuild with `--features mpi` (needs libopenmpi-dev, libclang-dev)");
        }
        return run_train(args);
    }
    if args.parallel.dp > 1 {
        bail!("--dp is a training degree: use it with --train");
    }
    let measured =
        crate::parallel_cmds::measure_bench_parallel(&crate::parallel_cmds::BenchParallelArgs {
            model: args.model.clone(),
            parallel: args.parallel.clone(),
            prompt_len: args.prefill_len,
            new_tokens: args.new_tokens,
            dtype: args.dtype.clone(),
            json: false,
        })?;
    let Some((v, text)) = measured else {
        return Ok(()); // an MPI rank other than 0: rank 0 reports
    };
    crate::out::print(&text)?;
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_string_pretty(&v)?)?;
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn run_train(args: BenchArgs) -> Result<()> {
    let shape = args.parallel.mesh()?;
    let model = TrainableModel::load(&args.model)?;
    let cfg = model.config().clone();
    check_setup(&cfg, shape)?;
    if args.train_batch < shape.dp {
        bail!(
            "--train-batch {} < --dp {}: each replica needs at least one row (one micro-batch per row)",
            args.train_batch,
            shape.dp
        );
    }
    let attn = crate::parse_attn(&args.attn)?;
    let checkpointing = crate::train_run::parse_checkpointing(&args.checkpointing)?;
    let rows = bench_ids(args.train_batch, args.train_seq_len, cfg.vocab_size);
    let micro: Vec<Batch> = rows
        .iter()
        .map(|r| Batch::language_modelling(vec![r.clone()]))
        .collect();
    let tokens = (args.train_batch * args.train_seq_len) as f64;
    let opts = TrainOptions {
        checkpointing,
        attn,
        ..TrainOptions::for_config(&cfg)
    };

    // one rank, the same micro-batches accumulated
    let total: usize = micro.iter().map(Batch::num_targets).sum();
    let scale = LossScale {
        normalizer: Some(total as f64),
        aux_weight: 1.0 / micro.len() as f64,
    };
    let mut adamw = AdamW::new(model.params(), AdamWConfig::default())?;
    let mut single_times = Vec::new();
    let mut single_losses = Vec::new();
    let tensors = model.tensors()?;
    for i in 0..=args.repeats {
        let s = Instant::now();
        let mut grads = zaya::train::Gradients::default();
        let mut loss = 0.0;
        for mb in &micro {
            let out = model.forward_backward(mb, &opts, &scale)?;
            grads.accumulate(&out.grads)?;
            loss += out.loss;
        }
        adamw.step(model.params(), &grads, 1e-4)?;
        if i > 0 {
            single_times.push(s.elapsed().as_secs_f64());
        }
        single_losses.push(loss);
    }
    drop(model);

    // the mesh
    let mut tcfg = TrainerConfig::new(&TrainableModel::from_tensors(&cfg, &tensors)?, 1e-4);
    tcfg.checkpointing = checkpointing;
    tcfg.max_grad_norm = None;
    let world = zaya_dist::LocalWorld::new(shape.world(), Duration::from_secs(600))?;
    let outs = world.run(|comm| -> Result<_> {
        let mesh = Mesh::new(Box::new(comm), shape)?;
        let m = TrainableModel::from_tensors(&cfg, &tensors)?;
        let parts = Trainer::new(m, tcfg.clone())?.into_parts();
        let mut t = ParallelTrainer::from_parts(mesh, parts, DriverOptions::default())?;
        let mut times = Vec::new();
        let mut losses = Vec::new();
        for i in 0..=args.repeats {
            t.mesh().world.barrier()?;
            let s = Instant::now();
            let r = t.step(&micro)?;
            t.mesh().world.barrier()?;
            if i > 0 {
                times.push(s.elapsed().as_secs_f64());
            }
            losses.push(r.loss);
        }
        // training state per rank: weights + gradients of the stage, moments of its share
        let c = t.coords();
        let layout = Layout::of(&cfg, shape, c.pp, true);
        let elems = |ks: &[usize]| -> u64 { ks.iter().map(|&k| layout.sizes[k] as u64).sum() };
        let all: Vec<usize> = (0..layout.stage.len()).collect();
        let bytes = 8 * elems(&all) + 8 * elems(&layout.owned_by(c.dp));
        let rank_bytes = t.mesh().world.all_gather(&[bytes as f32])?;
        Ok((times, losses, rank_bytes))
    });
    let mut rank0 = None;
    for (rank, o) in outs.into_iter().enumerate() {
        match o {
            Ok(v) if rank == 0 => rank0 = Some(v),
            Ok(_) => {}
            Err(e) => bail!("{e}"),
        }
    }
    let (times, losses, rank_bytes) = rank0.expect("rank 0 ran");
    let params: u64 = tensors.values().map(|t| t.elem_count() as u64).sum();
    let single_state = 16 * params;
    let single_step = median(single_times);
    let step = median(times);
    let same = losses
        .iter()
        .zip(&single_losses)
        .all(|(a, b)| (a - b).abs() <= 1e-5 * b.abs());
    let mib = |b: f64| b / (1u64 << 20) as f64;
    let v = serde_json::json!({
        "model": args.model.display().to_string(),
        "mesh": shape,
        "train_batch": args.train_batch,
        "train_seq_len": args.train_seq_len,
        "micro_batches": micro.len(),
        "checkpointing": args.checkpointing,
        "single": {
            "train_step_s": single_step,
            "train_tokens_per_s": tokens / single_step,
            "state_mib": mib(single_state as f64),
            "losses": single_losses,
        },
        "parallel": {
            "train_step_s": step,
            "train_tokens_per_s": tokens / step,
            "rank_state_mib": rank_bytes.iter().map(|&b| mib(f64::from(b))).collect::<Vec<_>>(),
            "losses": losses,
        },
        "same_losses": same,
    });
    let text = format!(
        "zaya bench --train {} on local ranks vs one rank ({} one-row micro-batches of {} tokens, checkpointing {}, same losses: {same})\n\
         train tok/s: {:.1} vs {:.1} ({:.2}x)\n\
         training state per rank (MiB: f32 weights + grads + AdamW moments): {} vs {:.1}\n",
        shape.label(),
        micro.len(),
        args.train_seq_len,
        args.checkpointing,
        tokens / step,
        tokens / single_step,
        single_step / step,
        rank_bytes
            .iter()
            .map(|&b| format!("{:.1}", mib(f64::from(b))))
            .collect::<Vec<_>>()
            .join(" "),
        mib(single_state as f64),
    );
    crate::out::print(&text)?;
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_string_pretty(&v)?)?;
    }
    Ok(())
}

/// `mpirun -n N zaya bench --train --tp/--pp/--ep/--dp ...`: this process is one rank of
/// the mesh; rank 0 prints and writes the report.
#[cfg(feature = "mpi")]
fn run_train_mpi(args: BenchArgs) -> Result<()> {
    use zaya::weights::Checkpoint;
    use zaya_dist::tp_driver::{check_tp_setup, RunState};
    use zaya_dist::TpParallelTrainer;

    let shape = args.parallel.mesh()?;
    let tp = shape.tp > 1 || shape.ep > 1;
    let ckpt = std::sync::Arc::new(Checkpoint::open(&args.model)?);
    let cfg = ckpt.config()?;
    if tp {
        check_tp_setup(&cfg, shape)?;
    } else {
        check_setup(&cfg, shape)?;
    }
    if args.train_batch < shape.dp {
        bail!(
            "--train-batch {} < --dp {}: each replica needs at least one row (one micro-batch per row)",
            args.train_batch,
            shape.dp
        );
    }
    let checkpointing = crate::train_run::parse_checkpointing(&args.checkpointing)?;
    let micro: Vec<Batch> = bench_ids(args.train_batch, args.train_seq_len, cfg.vocab_size)
        .into_iter()
        .map(|r| Batch::language_modelling(vec![r]))
        .collect();
    let tokens = (args.train_batch * args.train_seq_len) as f64;
    let mut tcfg = TrainerConfig::for_config(&cfg, 1e-4);
    tcfg.checkpointing = checkpointing;
    tcfg.max_grad_norm = None;

    let world = zaya_dist::mpi_backend::MpiWorld::init()?;
    let comm = crate::parallel_cmds::mpi_world_comm(
        &world,
        args.parallel.collectives,
        Duration::from_secs(600),
    )?;
    if comm.size() != shape.world() {
        bail!(
            "rank {}: {} processes were started but --tp {} --pp {} --ep {} --dp {} needs {}",
            comm.rank(),
            comm.size(),
            shape.tp,
            shape.pp,
            shape.ep,
            shape.dp,
            shape.world()
        );
    }
    let mesh = Mesh::new(comm, shape)?;
    let at = RunState {
        cfg: tcfg,
        step: 0,
        run: None,
    };
    let opts = DriverOptions::default();
    let mut t = if tp {
        RankTrainer::Tp(Box::new(TpParallelTrainer::open(
            mesh, &ckpt, None, at, opts,
        )?))
    } else {
        RankTrainer::Pp(Box::new(ParallelTrainer::open(
            mesh, &ckpt, None, at, opts,
        )?))
    };
    let mut times = Vec::new();
    let mut losses = Vec::new();
    for i in 0..=args.repeats {
        t.world().barrier()?;
        let s = Instant::now();
        let loss = t.step(&micro)?;
        t.world().barrier()?;
        if i > 0 {
            times.push(s.elapsed().as_secs_f64());
        }
        losses.push(loss);
    }
    // training state: f32 weights + gradients of what the rank holds, AdamW moments of its
    // share; the peak RSS is this process's own
    let (held, kept) = t.elements();
    let mib = |b: f64| b / (1u64 << 20) as f64;
    let state = mib((8 * held + 8 * kept) as f64);
    let rss = mib(crate::bench::peak_rss_bytes() as f64);
    let all = t.world().all_gather(&[state as f32, rss as f32])?;
    if t.world().rank() != 0 {
        return Ok(());
    }
    let rank_state: Vec<f32> = all.iter().step_by(2).copied().collect();
    let rank_rss: Vec<f32> = all.iter().skip(1).step_by(2).copied().collect();
    let step = median(times);
    let v = serde_json::json!({
        "model": args.model.display().to_string(),
        "mesh": shape,
        "launcher": "mpi",
        "train_batch": args.train_batch,
        "train_seq_len": args.train_seq_len,
        "micro_batches": micro.len(),
        "checkpointing": args.checkpointing,
        "parallel": {
            "train_step_s": step,
            "train_tokens_per_s": tokens / step,
            "rank_state_mib": rank_state,
            "rank_peak_rss_mib": rank_rss,
            "losses": losses,
        },
    });
    let list = |v: &[f32]| {
        v.iter()
            .map(|x| format!("{x:.1}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let text = format!(
        "zaya bench --train {} on {} MPI processes ({} one-row micro-batches of {} tokens, checkpointing {})\n\
         train step: {:.3} s, {:.1} tok/s\n\
         training state per rank (MiB: f32 weights + grads + AdamW moments): {}\n\
         peak RSS per rank (MiB): {}\n",
        shape.label(),
        shape.world(),
        micro.len(),
        args.train_seq_len,
        args.checkpointing,
        step,
        tokens / step,
        list(&rank_state),
        list(&rank_rss),
    );
    crate::out::print(&text)?;
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_string_pretty(&v)?)?;
    }
    Ok(())
}

/// The trainer of one MPI rank of `zaya bench --train`.
#[cfg(feature = "mpi")]
enum RankTrainer {
    Pp(Box<ParallelTrainer>),
    Tp(Box<zaya_dist::TpParallelTrainer>),
}

#[cfg(feature = "mpi")]
impl RankTrainer {
    fn world(&self) -> &dyn zaya_dist::Comm {
        match self {
            RankTrainer::Pp(t) => t.mesh().world.as_ref(),
            RankTrainer::Tp(t) => t.mesh().world.as_ref(),
        }
    }

    /// One optimizer step; its loss.
    fn step(&mut self, micro: &[Batch]) -> zaya_dist::ParallelResult<f64> {
        Ok(match self {
            RankTrainer::Pp(t) => t.step(micro)?.loss,
            RankTrainer::Tp(t) => t.step(micro)?.loss,
        })
    }

    /// Elements of the parameters this rank holds, and of those whose AdamW state it keeps.
    fn elements(&self) -> (u64, u64) {
        match self {
            RankTrainer::Pp(t) => {
                let layout = t.layout();
                let sum = |ks: &[usize]| ks.iter().map(|&k| layout.sizes[k] as u64).sum::<u64>();
                let all: Vec<usize> = (0..layout.stage.len()).collect();
                (sum(&all), sum(&layout.owned_by(t.coords().dp)))
            }
            RankTrainer::Tp(t) => {
                let params = t.model().params();
                let n = |k: usize| params[k].param.var.elem_count() as u64;
                (
                    (0..params.len()).map(n).sum(),
                    t.owned().iter().map(|&k| n(k)).sum(),
                )
            }
        }
    }
}
