//! `zaya train --pp N --dp N`: the pipeline × data-parallel driver
//! ([`zaya_dist::ParallelTrainer`]), and `zaya train --tp N --pp N --ep N --dp N` with
//! `--tp` or `--ep` above 1: the tensor × pipeline × expert × data-parallel one
//! ([`zaya_dist::TpParallelTrainer`]), on local ranks (threads of this process) or as one
//! rank per process under `mpirun` / `zaya launch --backend mpi` (MPI build).
//!
//! Every rank reads the data and plans the same batches; the step's `--grad-accum`
//! micro-batches are dealt to the replicas. Rank 0 alone writes `loss.csv`, the
//! checkpoints (gathered full tensors under their HF names, the single-process format: a
//! parallel run resumes on one rank and the other way round), `loss.svg` and `final/`.
//! Every rank reads only its own part of the weights (and, resuming, of the AdamW state)
//! from the files: a tensor/expert-parallel rank its slices, a pipeline × data-parallel
//! rank its stage's tensors; no rank loads the whole model. The setup (mesh size,
//! tensor/expert parallel degrees, layers per stage, micro-batches per replica) is checked
//! before any model is loaded.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

use zaya::train::trainer::{StepReport, TrainerConfig};
use zaya::train::{Batch, TrainableModel};
use zaya_dist::tp_driver::{check_tp_setup, RunState, TpParallelTrainer};
use zaya_dist::train_driver::{check_setup, DriverOptions, ParallelTrainer};
use zaya_dist::{Mesh, MeshShape, RankFailed};

use crate::train_run::{read_log, resume_state, trainer_config, BatchPlan, RunPlan, TrainArgs};

/// Fails on a setup the driver cannot run, before anything is loaded.
fn check(args: &TrainArgs, run: &RunPlan) -> Result<MeshShape> {
    let shape = args.parallel.mesh()?;
    if is_tp(shape) {
        check_tp_setup(&run.model_cfg, shape)?;
    } else {
        check_setup(&run.model_cfg, shape)?;
    }
    if args.grad_accum < shape.dp {
        bail!(
            "--grad-accum {} < --dp {}: each data-parallel replica needs at least one micro-batch per step (the step's micro-batches are dealt to the replicas)",
            args.grad_accum,
            shape.dp
        );
    }
    if args.dist_timeout == 0 {
        bail!("--dist-timeout must be at least 1 second");
    }
    Ok(shape)
}

/// Tensor or expert parallel: the TP driver (with any number of pipeline stages).
fn is_tp(shape: MeshShape) -> bool {
    shape.tp > 1 || shape.ep > 1
}

/// What [`rank_main`] needs of a rank's trainer (the pipeline × data-parallel driver or
/// the tensor × expert × data-parallel one).
trait RankTrainer {
    fn mesh(&self) -> &Mesh;
    fn steps(&self) -> u64;
    fn config(&self) -> &TrainerConfig;
    fn step(&mut self, micro: &[Batch]) -> zaya_dist::ParallelResult<StepReport>;
    /// Collective: the single-process checkpoint, written by rank 0.
    fn save(&mut self, root: &std::path::Path) -> zaya_dist::ParallelResult<()>;
    /// Collective: rank 0 writes the current weights as a model directory.
    fn save_model(&mut self, dir: &std::path::Path) -> zaya_dist::ParallelResult<()>;
    /// How the rank's share of the run is split (for the start line).
    fn split(&self) -> String;
}

impl RankTrainer for ParallelTrainer {
    fn mesh(&self) -> &Mesh {
        ParallelTrainer::mesh(self)
    }
    fn steps(&self) -> u64 {
        ParallelTrainer::steps(self)
    }
    fn config(&self) -> &TrainerConfig {
        ParallelTrainer::config(self)
    }
    fn step(&mut self, micro: &[Batch]) -> zaya_dist::ParallelResult<StepReport> {
        ParallelTrainer::step(self, micro)
    }
    fn save(&mut self, root: &std::path::Path) -> zaya_dist::ParallelResult<()> {
        ParallelTrainer::save(self, root).map(|_| ())
    }
    fn save_model(&mut self, dir: &std::path::Path) -> zaya_dist::ParallelResult<()> {
        ParallelTrainer::save_model(self, dir)
    }
    fn split(&self) -> String {
        let shape = self.mesh().shape;
        format!(
            "{} pipeline stages of {} layers, {} data-parallel replicas",
            shape.pp,
            self.layers().len(),
            shape.dp
        )
    }
}

impl RankTrainer for TpParallelTrainer {
    fn mesh(&self) -> &Mesh {
        TpParallelTrainer::mesh(self)
    }
    fn steps(&self) -> u64 {
        TpParallelTrainer::steps(self)
    }
    fn config(&self) -> &TrainerConfig {
        TpParallelTrainer::config(self)
    }
    fn step(&mut self, micro: &[Batch]) -> zaya_dist::ParallelResult<StepReport> {
        TpParallelTrainer::step(self, micro)
    }
    fn save(&mut self, root: &std::path::Path) -> zaya_dist::ParallelResult<()> {
        TpParallelTrainer::save(self, root).map(|_| ())
    }
    fn save_model(&mut self, dir: &std::path::Path) -> zaya_dist::ParallelResult<()> {
        TpParallelTrainer::save_model(self, dir)
    }
    fn split(&self) -> String {
        let shape = self.mesh().shape;
        format!(
            "{} tensor-parallel x {} expert-parallel ranks, {} pipeline stages of {} layers, {} data-parallel replicas",
            shape.tp,
            shape.ep,
            shape.pp,
            self.model().model().layer_range().len(),
            shape.dp
        )
    }
}

/// The rank's pipeline × data-parallel trainer: its stage's tensors read from the files.
fn pp_trainer(
    args: &TrainArgs,
    run: &RunPlan,
    mesh: Mesh,
    start: &RankStart,
) -> Result<Box<dyn RankTrainer>> {
    let (weights, state) = start.open()?;
    let t = ParallelTrainer::open(
        mesh,
        &weights,
        state.as_ref(),
        start.state.clone(),
        driver_options(args),
    )?;
    Ok(Box::new(t.with_log(&run.log)?))
}

/// Where a parallel run starts, before any weight is read: the weights (the model, or the
/// checkpoint resumed from), the AdamW state file when resuming, and the step counter and
/// settings (a resume's checks, messages and `loss.csv` trimming are the single-process
/// ones; the data position follows from the step).
struct RankStart {
    weights: std::path::PathBuf,
    optimizer: Option<std::path::PathBuf>,
    state: RunState,
}

impl RankStart {
    /// The weights and (resuming) the optimizer state, opened (memory maps: a rank reads
    /// only what it asks for).
    fn open(&self) -> Result<(zaya::weights::Checkpoint, Option<zaya::weights::Checkpoint>)> {
        let weights = zaya::weights::Checkpoint::open(&self.weights)
            .with_context(|| format!("opening {}", self.weights.display()))?;
        let state = self
            .optimizer
            .as_ref()
            .map(|p| {
                zaya::weights::Checkpoint::open_file(p)
                    .with_context(|| format!("opening {}", p.display()))
            })
            .transpose()?;
        Ok((weights, state))
    }
}

fn rank_start(args: &TrainArgs, run: &RunPlan, primary: bool) -> Result<RankStart> {
    let resumed = if args.resume {
        resume_state::<TrainableModel>(
            args,
            primary,
            &run.facts,
            run.total,
            &run.log,
            &run.model_cfg,
        )?
    } else {
        None
    };
    Ok(match resumed {
        Some((dir, st)) => {
            if primary {
                eprintln!("resuming at step {}", st.step);
            }
            RankStart {
                optimizer: Some(dir.join("optimizer.safetensors")),
                weights: dir,
                state: RunState {
                    cfg: st.config,
                    step: st.step,
                    run: st.run,
                },
            }
        }
        None => {
            if primary {
                if args.resume {
                    eprintln!(
                        "{}: no checkpoint to resume from; starting at step 0",
                        args.out.display()
                    );
                }
                if run.log.exists() {
                    std::fs::remove_file(&run.log)?;
                }
            }
            RankStart {
                weights: args.model.clone(),
                optimizer: None,
                state: RunState {
                    cfg: trainer_config(&run.model_cfg, args, run.total)?,
                    step: 0,
                    run: Some(run.facts.clone()),
                },
            }
        }
    })
}

/// The rank's tensor/expert-parallel trainer: its slices read from the files.
fn tp_trainer(
    args: &TrainArgs,
    run: &RunPlan,
    mesh: Mesh,
    start: &RankStart,
) -> Result<Box<dyn RankTrainer>> {
    let (weights, state) = start.open()?;
    let t = TpParallelTrainer::open(
        mesh,
        &std::sync::Arc::new(weights),
        state.as_ref(),
        start.state.clone(),
        driver_options(args),
    )?;
    Ok(Box::new(t.with_log(&run.log)?))
}

fn driver_options(args: &TrainArgs) -> DriverOptions {
    DriverOptions {
        zero1: !args.no_zero,
        ..Default::default()
    }
}

pub fn run(args: &TrainArgs, run: &RunPlan) -> Result<()> {
    let shape = check(args, run)?;
    let timeout = Duration::from_secs(args.dist_timeout);
    #[cfg(not(feature = "mpi"))]
    if zaya_dist::comm::launched_by_mpi() {
        // every copy would run all the ranks itself and write the same files
        bail!("started by an MPI launcher, but this zaya was built without MPI: rebuild with `--features mpi` (needs libopenmpi-dev, libclang-dev)");
    }
    #[cfg(feature = "mpi")]
    if zaya_dist::mpi_backend::launched_by_mpi() {
        let world = zaya_dist::mpi_backend::MpiWorld::init()?;
        let comm =
            crate::parallel_cmds::mpi_world_comm(&world, args.parallel.collectives, timeout)?;
        if comm.size() != shape.world() {
            bail!(
                "rank {}: {} processes were started but --tp {} --pp {} --ep {} --dp {} needs {}",
                comm.world_rank(),
                comm.size(),
                shape.tp,
                shape.pp,
                shape.ep,
                shape.dp,
                shape.world()
            );
        }
        let primary = comm.rank() == 0;
        let start = rank_start(args, run, primary)?;
        let mesh = Mesh::new(comm, shape)?;
        let trainer = if is_tp(shape) {
            tp_trainer(args, run, mesh, &start)?
        } else {
            pp_trainer(args, run, mesh, &start)?
        };
        return rank_main(args, run, trainer);
    }
    // local ranks: each reads its own part of the files
    let start = rank_start(args, run, true)?;
    let world = zaya_dist::LocalWorld::new(shape.world(), timeout)?;
    let outs = world.run(|comm| -> Result<()> {
        let mesh = Mesh::new(Box::new(comm), shape)?;
        let trainer = if is_tp(shape) {
            tp_trainer(args, run, mesh, &start)?
        } else {
            pp_trainer(args, run, mesh, &start)?
        };
        rank_main(args, run, trainer)
    });
    first_failure(outs)
}

/// The run's outcome from every local rank: the first failure that is a cause (a rank's own
/// error), not a peer reporting that another rank has gone.
fn first_failure(outs: Vec<Result<(), RankFailed<anyhow::Error>>>) -> Result<()> {
    let mut consequence = None;
    for o in outs {
        match o {
            Ok(()) => {}
            Err(RankFailed::Error { rank, error }) => {
                let peer_gone = error.chain().any(|e| {
                    matches!(
                        e.downcast_ref::<zaya_dist::ParallelError>(),
                        Some(zaya_dist::ParallelError::Dist(
                            zaya_dist::DistError::PeerGone { .. }
                        ))
                    ) || matches!(
                        e.downcast_ref::<zaya_dist::DistError>(),
                        Some(zaya_dist::DistError::PeerGone { .. })
                    )
                });
                let e = error.context(format!("rank {rank} failed"));
                if !peer_gone {
                    return Err(e);
                }
                consequence.get_or_insert(e);
            }
            Err(e @ RankFailed::Panicked { .. }) => return Err(anyhow::anyhow!("{e}")),
        }
    }
    consequence.map_or(Ok(()), Err)
}

/// One rank's run: the steps, the collective checkpoints, and on rank 0 the log, the curve
/// and the final export.
fn rank_main(args: &TrainArgs, run: &RunPlan, mut trainer: Box<dyn RankTrainer>) -> Result<()> {
    let shape = trainer.mesh().shape;
    let primary = trainer.mesh().world.rank() == 0;
    let mut plan = BatchPlan::new(&run.rows, args)?;
    let total = trainer.config().schedule.total_steps;
    if primary {
        eprintln!(
            "{} examples -> {} packed rows of {}; {} steps of {} micro-batches on {} ({} ranks: {}{})",
            run.examples,
            run.rows.len(),
            args.seq_len,
            total,
            args.grad_accum,
            shape.label(),
            shape.world(),
            trainer.split(),
            if shape.dp > 1 && !args.no_zero { ", ZeRO-1" } else { "" }
        );
    }
    let bar = if args.no_progress || !primary {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(total)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise} < {eta_precise}] {msg}",
        )
        .expect("valid template"),
    );
    bar.set_position(trainer.steps());
    while trainer.steps() < total {
        let ga = args.grad_accum as u64;
        let first = trainer.steps() * ga;
        if first >= plan.total {
            break;
        }
        let micro: Vec<Batch> = (first..(first + ga).min(plan.total))
            .map(|k| plan.get(k))
            .collect();
        let r = trainer
            .step(&micro)
            .with_context(|| format!("step {}", trainer.steps() + 1))?;
        if primary {
            let tps = run.tokens_per_step as f64 / r.seconds.max(1e-9);
            let msg = format!(
                "loss {:.4} aux {:.4} skip {:.1}% lr {:.2e} {:.0} tok/s",
                r.loss,
                r.aux_loss,
                100.0 * r.skip_fraction,
                r.lr,
                tps
            );
            if args.no_progress {
                eprintln!("step {}/{}: {msg}", r.step, total);
            }
            bar.set_message(msg);
            bar.set_position(r.step);
        }
        if r.step % args.save_every == 0 && r.step < total {
            trainer.save(&args.out)?;
        }
    }
    bar.finish();
    trainer.save(&args.out)?;
    let final_dir = args.out.join("final");
    if primary {
        zaya::durable::remove_stale_temps(&final_dir)?;
    }
    trainer.save_model(&final_dir)?;
    if !primary {
        return Ok(());
    }
    let points = read_log(&run.log)?;
    zaya::weights::write_atomic(
        &args.out.join("loss.svg"),
        crate::train_run::loss_svg(&points).as_bytes(),
    )?;
    crate::lora_cmds::copy_side_files(&args.model, &final_dir)?;
    eprintln!(
        "done: {} steps on {}; model in {}, loss log {}, curve {}",
        trainer.steps(),
        shape.label(),
        final_dir.display(),
        run.log.display(),
        args.out.join("loss.svg").display()
    );
    Ok(())
}

/// `zaya forward --pp N` with `labels` in IN.json: `loss`, `aux_loss` and (with `grads`)
/// `grad.<HF name>` of every parameter, computed by pipeline stages on local ranks and
/// gathered on rank 0 — the values one rank writes (f32 master weights, cross-entropy only).
pub fn labelled_outputs_on_stages(
    model_dir: &std::path::Path,
    inputs_json: &std::path::Path,
    parallel: &crate::parallel_cmds::ParallelArgs,
    grads: bool,
    checkpointing: bool,
) -> Result<std::collections::BTreeMap<String, candle_core::Tensor>> {
    let shape = parallel.mesh()?;
    if shape.tp > 1 || shape.ep > 1 || shape.dp > 1 {
        bail!("loss and gradients with parallel ranks use pipeline stages only in this version (--pp; not --tp, --ep or --dp)");
    }
    if zaya_dist::comm::launched_by_mpi() {
        bail!("zaya forward with labels runs its pipeline stages as local ranks (not under mpirun) in this version");
    }
    let batch = crate::train_cmds::read_batch(inputs_json)?;
    let open = || {
        zaya::weights::Checkpoint::open(model_dir)
            .with_context(|| format!("opening {}", model_dir.display()))
    };
    let cfg = open()?.config()?;
    check_setup(&cfg, shape)?;
    let cp = if checkpointing {
        zaya::train::Checkpointing::EveryLayer
    } else {
        zaya::train::Checkpointing::Off
    };
    let world = zaya_dist::LocalWorld::new(shape.world(), zaya_dist::DEFAULT_TIMEOUT)?;
    let outs = world.run(|comm| -> Result<_> {
        let mesh = Mesh::new(Box::new(comm), shape)?;
        // each stage reads only its own tensors
        let at = RunState {
            cfg: TrainerConfig::for_config(&cfg, 1e-3),
            step: 0,
            run: None,
        };
        let t = ParallelTrainer::open(mesh, &open()?, None, at, DriverOptions::default())?;
        Ok(t.labelled_gradients(std::slice::from_ref(&batch), cp)?)
    });
    let mut out = None;
    let mut failures = Vec::new();
    for (rank, o) in outs.into_iter().enumerate() {
        match o {
            Ok(v) if rank == 0 => out = v,
            Ok(_) => {}
            Err(e) => failures.push(Err(e)),
        }
    }
    first_failure(failures)?;
    let mut out = out.context("rank 0 gathered no gradients")?;
    if !grads {
        out.retain(|k, _| !k.starts_with("grad."));
    }
    Ok(out)
}
