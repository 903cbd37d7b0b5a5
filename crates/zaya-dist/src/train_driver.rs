//! The pipeline × data-parallel training driver behind `zaya train --pp N --dp N`.
//!
//! Every rank holds only its pipeline stage of the single-device [`TrainableModel`] (f32
//! master weights of the stage's layers, the embedding on the first stage, the final norm
//! and head on the last: [`crate::pipeline::stage_part`]), read from the checkpoint by
//! [`ParallelTrainer::open`] (no rank reads the whole model), and runs it through the
//! single-device layer code ([`crate::pipeline::Stage`]). One optimizer step:
//!
//! 1. the step's micro-batches are dealt round-robin to the data-parallel replicas
//!    (micro-batch `k` to replica `k mod dp`; a replica left without one contributes zero
//!    gradients and still takes part in every exchange); each replica runs them through its pipeline
//!    with 1F1B, every loss divided by the **global** target count of the step (as the
//!    single-device step with gradient accumulation does);
//! 2. the stage's gradients are summed over the replicas, in buckets ([`crate::grad`]);
//! 3. a tied embedding's two halves (lookup on the first stage, LM head on the last) are
//!    summed between those two stages;
//! 4. the global gradient norm, loss, balance loss and routing counts are summed over the
//!    world in one small all-reduce; clipping uses the global norm;
//! 5. AdamW updates the parameters — with **ZeRO-1** each replica holds the moments of
//!    only its share of the stage's parameters (whole tensors, balanced by size), steps
//!    those, and the updated parameters are all-gathered over the replicas;
//! 6. the balancing-bias rule runs on every rank with the world's routing counts.
//!
//! The result equals the single-process [`zaya::train::trainer::Trainer`] step on the same
//! micro-batches up to the order of floating-point sums. Checkpoints are the single-process
//! ones, byte for byte (rank 0 writes them with [`write_checkpoint_with`], receiving the
//! weights, then the optimizer state, one bounded message at a time: [`crate::stream_save`]),
//! so a parallel run resumes on one rank and the other way round; a resumed rank reads its stage's weights and its share of `exp_avg` /
//! `exp_avg_sq` / `step` from the checkpoint's files.
//!
//! Tensor- or expert-parallel stages would plug in where [`crate::pipeline::Stage`] calls
//! [`zaya::train::StageBatch`]: a stage is whatever, given a micro-batch and the boundary
//! `(hidden, router state)` from the stage before (replicated over its TP group), runs its
//! layers forward (+ head and loss on the last stage) and backward from the boundary's
//! gradient, and returns the gradients of the parameters this rank holds. The `pp` group
//! already pairs ranks with the same TP/EP coordinates, so the boundary messages need no
//! change; what would change is [`Layout`] (per-rank shards), the norm (replicated tensors
//! counted on one TP rank only) and [`ParallelTrainer::gather`] (shards concatenated as the
//! plan's selection says).

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use zaya::safetensors_io::{file_order, PlannedTensor};
use zaya::train::optim::AdamW;
use zaya::train::trainer::{
    append_log, write_checkpoint_with, StepReport, TrainerConfig, TrainerParts,
};
use zaya::train::{Batch, Gradients, LayerRoutingStats, LossScale, Param, TrainableModel};
use zaya::weights::{native_specs, save_checkpoint_streamed, Checkpoint, TensorSpec};
use zaya::{ZayaConfig, ZayaError};

use crate::error::{ParallelError, ParallelResult};
use crate::mesh::{Coords, Mesh, MeshShape};
use crate::pipeline::{stage_holds, stage_layers, stage_part, Stage};
use crate::stream_save::{into_zaya, not_root, stream_file};
use crate::tp_driver::RunState;

/// Tags of the driver's point-to-point messages (pipeline tags are per micro-batch, in
/// their own group).
const TAG_TIED: u32 = 1 << 30;
const TAG_GATHER: u32 = (1 << 30) + 1;

/// How the driver reduces and stores.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DriverOptions {
    /// Shard AdamW's moments over the data-parallel replicas (ZeRO stage 1).
    pub zero1: bool,
    /// Values per gradient all-reduce bucket.
    pub bucket_elems: usize,
    /// Largest message of a checkpoint gather, in bytes: rank 0 holds at most one while it
    /// writes (see [`crate::stream_save`]).
    pub gather_bytes: usize,
}

impl Default for DriverOptions {
    fn default() -> Self {
        DriverOptions {
            zero1: true,
            bucket_elems: 1 << 22,
            gather_bytes: crate::stream_save::DEFAULT_GATHER_BYTES,
        }
    }
}

/// Which parameters a rank's stage holds and which replica keeps each one's optimizer
/// state.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    /// Indices into [`param_specs`] (the whole model's parameters, in the order of
    /// [`TrainableModel::params`]) of the stage's parameters: the stage's model holds
    /// exactly these, in this order.
    pub stage: Vec<usize>,
    /// Elements of each stage parameter.
    pub sizes: Vec<usize>,
    /// Per stage parameter: the data-parallel replica that keeps its AdamW state (`None`:
    /// every replica, without ZeRO).
    pub owner: Vec<Option<usize>>,
}

/// The trainable parameters of `cfg` (every native tensor but the balancing biases), in
/// the order of a whole [`TrainableModel::params`].
pub fn param_specs(cfg: &ZayaConfig) -> Vec<TensorSpec> {
    native_specs(cfg)
        .into_iter()
        .filter(|s| !s.name.ends_with(".balancing_biases"))
        .collect()
}

impl Layout {
    /// The layout of pipeline stage `pp` in `shape` (computable by any rank for any stage).
    pub fn of(cfg: &ZayaConfig, shape: MeshShape, pp: usize, zero1: bool) -> Self {
        let specs = param_specs(cfg);
        let stage: Vec<usize> = specs
            .iter()
            .enumerate()
            .filter(|(_, s)| stage_holds(cfg, shape.pp, pp, &s.name))
            .map(|(i, _)| i)
            .collect();
        let sizes: Vec<usize> = stage
            .iter()
            .map(|&i| specs[i].shape.iter().product())
            .collect();
        let owner = zero_owners(&sizes, shape.dp, zero1);
        Layout {
            stage,
            sizes,
            owner,
        }
    }

    /// Positions (in the stage's list) whose optimizer state replica `dp` keeps.
    pub fn owned_by(&self, dp: usize) -> Vec<usize> {
        (0..self.stage.len())
            .filter(|&k| self.owner[k].is_none_or(|d| d == dp))
            .collect()
    }
}

/// ZeRO-1's assignment of tensors of `sizes` elements to `dp` replicas (whole tensors,
/// largest first to the least-loaded replica, ties to the lowest index); `None` (every
/// replica keeps the state) without ZeRO or with one replica.
pub fn zero_owners(sizes: &[usize], dp: usize, zero1: bool) -> Vec<Option<usize>> {
    if !(zero1 && dp > 1) {
        return vec![None; sizes.len()];
    }
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    order.sort_by_key(|&k| std::cmp::Reverse(sizes[k]));
    let mut load = vec![0usize; dp];
    let mut owner = vec![None; sizes.len()];
    for k in order {
        let d = (0..dp).min_by_key(|&d| (load[d], d)).unwrap_or(0);
        load[d] += sizes[k];
        owner[k] = Some(d);
    }
    owner
}

/// The tied embedding's gradient `g` on the first stage (lookup) and the last (head) made
/// their sum on both, with `has` (whether a gradient exists) or-ed: collective between
/// pipeline members 0 and `stages − 1` of `pp` (`first` says which one this is).
pub(crate) fn sum_tied(
    pp: &dyn crate::comm::Comm,
    first: bool,
    g: &Tensor,
    has: &mut f32,
) -> ParallelResult<Tensor> {
    let last = pp.size() - 1;
    let mut mine = host(g)?;
    mine.push(*has);
    if first {
        pp.send(last, TAG_TIED, &mine)?;
        let mut sum = pp.recv(last, TAG_TIED)?;
        *has = sum.pop().unwrap_or(0.0);
        Ok(Tensor::from_vec(sum, g.shape(), g.device())?)
    } else {
        let mut first = pp.recv(0, TAG_TIED)?;
        let first_has = first.pop().unwrap_or(0.0);
        let g0 = Tensor::from_vec(first, g.shape(), g.device())?;
        let sum = (g0 + g)?;
        *has += first_has;
        let mut back = host(&sum)?;
        back.push(*has);
        pp.send(0, TAG_TIED, &back)?;
        Ok(sum)
    }
}

/// ZeRO-1: after each replica stepped the parameters it owns (`owner[k] == Some(replica)`),
/// every replica's updated values to the others. Collective over `dp` (member `me`).
pub(crate) fn all_gather_owned(
    dp: &dyn crate::comm::Comm,
    me: usize,
    params: &[Param],
    owner: &[Option<usize>],
) -> ParallelResult<()> {
    let n = dp.size();
    let owned_by = |d: usize| (0..params.len()).filter(move |&k| owner[k] == Some(d));
    let sizes: Vec<usize> = (0..n)
        .map(|d| owned_by(d).map(|k| params[k].var.elem_count()).sum())
        .collect();
    let width = sizes.iter().copied().max().unwrap_or(0);
    let mut mine = Vec::with_capacity(width);
    for k in owned_by(me) {
        mine.extend(host(params[k].var.as_tensor())?);
    }
    mine.resize(width, 0.0);
    let all = dp.all_gather(&mine)?;
    for d in (0..n).filter(|&d| d != me) {
        let mut at = d * width;
        for k in owned_by(d) {
            let v = &params[k].var;
            let c = v.elem_count();
            v.set(&Tensor::from_slice(
                &all[at..at + c],
                v.shape(),
                v.device(),
            )?)?;
            at += c;
        }
    }
    Ok(())
}

/// One rank of a pipeline × data-parallel training run.
pub struct ParallelTrainer {
    mesh: Mesh,
    /// The stage's part of the model (its parameters are `layout.stage`, in order).
    model: TrainableModel,
    layers: Range<usize>,
    layout: Layout,
    /// Positions of the stage parameters whose AdamW state this rank keeps.
    owned: Vec<usize>,
    opt: AdamW,
    cfg: TrainerConfig,
    step: u64,
    run: Option<serde_json::Value>,
    opts: DriverOptions,
    log: Option<PathBuf>,
}

impl std::fmt::Debug for ParallelTrainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParallelTrainer")
            .field("coords", &self.mesh.coords)
            .field("layers", &self.layers)
            .field("step", &self.step)
            .finish()
    }
}

fn unsupported(msg: impl Into<String>) -> ParallelError {
    ParallelError::Unsupported(msg.into())
}

/// Fails unless `shape` is a mesh this driver trains and `cfg` splits into its stages.
pub fn check_setup(cfg: &ZayaConfig, shape: MeshShape) -> ParallelResult<()> {
    if shape.tp > 1 || shape.ep > 1 {
        return Err(unsupported(format!(
            "training with --tp {} --ep {}: this driver trains pipeline (--pp) and data (--dp) parallel meshes only",
            shape.tp, shape.ep
        )));
    }
    stage_layers(cfg, shape.pp, 0)?;
    Ok(())
}

fn host(t: &Tensor) -> ParallelResult<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// `x` as two f32 (value and rounding error), so sums over ranks keep f64-like precision.
pub(crate) fn split_f64(x: f64) -> [f32; 2] {
    let hi = x as f32;
    [hi, (x - f64::from(hi)) as f32]
}
pub(crate) fn join_f64(v: &[f32]) -> f64 {
    f64::from(v[0]) + f64::from(v[1])
}

/// The file an optimizer state was read from (for errors).
fn origin(st: &Checkpoint) -> PathBuf {
    st.files()
        .first()
        .cloned()
        .unwrap_or_else(|| st.dir().to_path_buf())
}

impl ParallelTrainer {
    /// A rank of the run reading only its stage: the stage's weights from `weights` (the
    /// model directory of a fresh run, or the checkpoint a run resumes from), its share of
    /// the AdamW state (`exp_avg.*`, `exp_avg_sq.*`, `step.*` of the single-process
    /// `optimizer.safetensors`, by name) from `state` when resuming (a fresh optimizer
    /// otherwise). Nothing else of the files is read.
    pub fn open(
        mesh: Mesh,
        weights: &Checkpoint,
        state: Option<&Checkpoint>,
        at: RunState,
        opts: DriverOptions,
    ) -> ParallelResult<Self> {
        let cfg = weights.config()?;
        weights.validate(&cfg)?;
        check_setup(&cfg, mesh.shape)?;
        at.cfg.validate()?;
        let c = mesh.coords;
        let part = stage_part(&cfg, mesh.shape.pp, c.pp)?;
        let model = TrainableModel::load_part(weights, &cfg, &part)?;
        let layout = Layout::of(&cfg, mesh.shape, c.pp, opts.zero1);
        let owned = layout.owned_by(c.dp);
        let params: Vec<Param> = owned.iter().map(|&k| model.params()[k].clone()).collect();
        let opt = match state {
            None => AdamW::new(&params, at.cfg.adamw)?,
            Some(st) => {
                let dev = Device::Cpu;
                let mut mine = HashMap::new();
                for p in &params {
                    let name = &p.name;
                    for key in [format!("exp_avg.{name}"), format!("exp_avg_sq.{name}")] {
                        match st.stored_shape(&key) {
                            Some(s) if s == p.var.dims() => {}
                            found => {
                                return Err(ParallelError::Model(ZayaError::ShapeMismatch {
                                    name: key,
                                    expected: p.var.dims().to_vec(),
                                    found: found.map(<[usize]>::to_vec).unwrap_or_default(),
                                    file: origin(st),
                                }))
                            }
                        }
                        let t = st.load(&cfg, &key, DType::F32, &dev)?;
                        mine.insert(key, t);
                    }
                    let key = format!("step.{name}");
                    mine.insert(key.clone(), st.load(&cfg, &key, DType::I64, &dev)?);
                }
                AdamW::import(&params, mine, at.cfg.adamw, &origin(st))?
            }
        };
        Self::assemble(mesh, model, layout, opt, at, opts)
    }

    /// A rank of the run from a single-process trainer's parts (fresh or resumed: the full
    /// model and the full optimizer state); this rank keeps its stage's part of the model
    /// and its ZeRO shard of the state, and drops the rest.
    pub fn from_parts(
        mesh: Mesh,
        parts: TrainerParts<TrainableModel>,
        opts: DriverOptions,
    ) -> ParallelResult<Self> {
        let TrainerParts {
            model,
            opt,
            cfg,
            step,
            run,
        } = parts;
        let mcfg = model.config().clone();
        check_setup(&mcfg, mesh.shape)?;
        let c = mesh.coords;
        let part = stage_part(&mcfg, mesh.shape.pp, c.pp)?;
        let layout = Layout::of(&mcfg, mesh.shape, c.pp, opts.zero1);
        let global: Vec<usize> = layout
            .owned_by(c.dp)
            .iter()
            .map(|&k| layout.stage[k])
            .collect();
        let opt = opt.select(&global)?;
        let mut tensors = model.tensors()?;
        drop(model);
        tensors.retain(|name, _| part.holds(&mcfg, name));
        let model = TrainableModel::part_from_tensors(&mcfg, &part, &tensors)?;
        drop(tensors);
        Self::assemble(mesh, model, layout, opt, RunState { cfg, step, run }, opts)
    }

    fn assemble(
        mesh: Mesh,
        model: TrainableModel,
        layout: Layout,
        opt: AdamW,
        at: RunState,
        opts: DriverOptions,
    ) -> ParallelResult<Self> {
        let names: Vec<&str> = model.params().iter().map(|p| p.name.as_str()).collect();
        let specs = param_specs(model.config());
        let want: Vec<&str> = layout
            .stage
            .iter()
            .map(|&i| specs[i].name.as_str())
            .collect();
        if names != want {
            return Err(unsupported(format!(
                "the stage's model holds {} parameters, its layout {}: they must be the same, in order",
                names.len(),
                want.len()
            )));
        }
        let layers = model.part().layers.clone();
        let owned = layout.owned_by(mesh.coords.dp);
        Ok(ParallelTrainer {
            mesh,
            model,
            layers,
            layout,
            owned,
            opt,
            cfg: at.cfg,
            step: at.step,
            run: at.run,
            opts,
            log: None,
        })
    }

    /// Rank 0 appends one CSV row per step to `path` (created with its header if new).
    pub fn with_log(mut self, path: impl Into<PathBuf>) -> ParallelResult<Self> {
        let path = path.into();
        if self.mesh.world.rank() == 0 {
            zaya::train::trainer::start_log(&path)?;
            self.log = Some(path);
        }
        Ok(self)
    }

    pub fn mesh(&self) -> &Mesh {
        &self.mesh
    }
    pub fn coords(&self) -> Coords {
        self.mesh.coords
    }
    /// This rank's part of the model: its pipeline stage.
    pub fn model(&self) -> &TrainableModel {
        &self.model
    }
    pub fn config(&self) -> &TrainerConfig {
        &self.cfg
    }
    pub fn steps(&self) -> u64 {
        self.step
    }
    /// Decoder layers of this rank's stage.
    pub fn layers(&self) -> Range<usize> {
        self.layers.clone()
    }

    /// The layout of this rank's stage.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    fn stage_params(&self) -> Vec<Param> {
        self.model.params().to_vec()
    }

    fn tied_position(&self) -> Option<usize> {
        let shape = self.mesh.shape;
        if !(self.model.config().tie_word_embeddings && shape.pp > 1) {
            return None;
        }
        self.model
            .params()
            .iter()
            .position(|p| p.name == "model.embed_tokens.weight")
    }

    /// Gradients of the stage's parameters for `micro_batches` (all of the step's; this
    /// replica takes its share), summed over the replicas and the tied-embedding halves,
    /// plus the world's sums: `(grads, has_grad, loss, aux, targets, routing, norm)`.
    fn gradients(
        &self,
        micro_batches: &[Batch],
        opts: &zaya::train::TrainOptions,
    ) -> ParallelResult<Computed> {
        let shape = self.mesh.shape;
        let c = self.mesh.coords;
        if micro_batches.is_empty() {
            return Err(ZayaError::Input("a step needs at least one batch".into()).into());
        }
        let total: usize = micro_batches.iter().map(Batch::num_targets).sum();
        if total == 0 {
            return Err(ZayaError::Input(
                "no counted label in the step's batches (every target is -100)".into(),
            )
            .into());
        }
        let scale = LossScale {
            normalizer: Some(total as f64),
            aux_weight: 1.0 / micro_batches.len() as f64,
        };
        let mine: Vec<Batch> = micro_batches
            .iter()
            .enumerate()
            .filter(|(k, _)| k % shape.dp == c.dp)
            .map(|(_, b)| b.clone())
            .collect();
        let params = self.stage_params();
        let stage = Stage {
            model: self.model.model(),
            params: params.clone(),
            layers: self.layers.clone(),
            stage: c.pp,
            stages: shape.pp,
        };
        let out = stage.run_1f1b(self.mesh.pp.as_ref(), &mine, opts, &scale)?;

        let mut grads = Vec::with_capacity(params.len());
        let mut has = Vec::with_capacity(params.len());
        for (p, g) in params.iter().zip(&out.grads.grads) {
            match g {
                Some(g) => {
                    grads.push(g.clone());
                    has.push(1f32);
                }
                None => {
                    grads.push(Tensor::zeros(p.var.shape(), DType::F32, &Device::Cpu)?);
                    has.push(0f32);
                }
            }
        }
        if shape.dp > 1 {
            grads =
                crate::grad::all_reduce_sum(self.mesh.dp.as_ref(), &grads, self.opts.bucket_elems)?;
            self.mesh.dp.all_reduce_sum(&mut has)?;
        }
        // The tied embedding: first stage (lookup) + last stage (head), the same sum on both.
        let tied = self.tied_position();
        if let Some(k) = tied {
            grads[k] = sum_tied(self.mesh.pp.as_ref(), c.pp == 0, &grads[k], &mut has[k])?;
        }

        // One world all-reduce: [norm² (2), loss (2), aux (2), targets, counts per layer].
        let cfg = self.model.config();
        let (nl, e1) = (cfg.num_hidden_layers, cfg.num_experts + 1);
        let mut buf = vec![0f32; 7 + nl * e1];
        if c.dp == 0 {
            let mut sq = 0f64;
            for (k, g) in grads.iter().enumerate() {
                // the tied embedding is counted once (on the first stage)
                if has[k] > 0.0 && !(tied == Some(k) && c.pp != 0) {
                    sq += f64::from(g.sqr()?.sum_all()?.to_scalar::<f32>()?);
                }
            }
            buf[..2].copy_from_slice(&split_f64(sq));
        }
        buf[2..4].copy_from_slice(&split_f64(out.loss));
        buf[4..6].copy_from_slice(&split_f64(out.aux));
        buf[6] = out.targets as f32;
        for (j, st) in out.routing.iter().enumerate() {
            let layer = self.layers.start + j;
            for (e, &n) in st.counts.iter().enumerate() {
                buf[7 + layer * e1 + e] = n as f32;
            }
        }
        self.mesh.world.all_reduce_sum(&mut buf)?;
        let routing = (0..nl)
            .map(|l| {
                let counts: Vec<u64> = buf[7 + l * e1..7 + (l + 1) * e1]
                    .iter()
                    .map(|&v| v as u64)
                    .collect();
                LayerRoutingStats {
                    tokens: counts.iter().sum(),
                    counts,
                }
            })
            .collect();
        Ok(Computed {
            params,
            grads,
            has: has.iter().map(|&h| h > 0.0).collect(),
            loss: join_f64(&buf[2..4]),
            aux: join_f64(&buf[4..6]),
            targets: total,
            routing,
            norm: join_f64(&buf[..2]).max(0.0).sqrt(),
        })
    }

    /// One optimizer step over the step's micro-batches (identical on every rank): equal to
    /// [`zaya::train::trainer::Trainer::step`] on the same micro-batches.
    pub fn step(&mut self, micro_batches: &[Batch]) -> ParallelResult<StepReport> {
        let start = Instant::now();
        let opts = self.cfg.train_options();
        let mut cmp = self.gradients(micro_batches, &opts)?;
        if !cmp.norm.is_finite() || !cmp.loss.is_finite() {
            return Err(ZayaError::Input(format!(
                "step {}: loss {}, gradient norm {}: not finite, update skipped",
                self.step + 1,
                cmp.loss,
                cmp.norm
            ))
            .into());
        }
        if let Some(max) = self.cfg.max_grad_norm {
            let coef = max / (cmp.norm + 1e-6);
            if coef < 1.0 {
                for g in cmp.grads.iter_mut() {
                    *g = (&*g * coef)?;
                }
            }
        }
        let lr = self.cfg.schedule.lr(self.step);
        let owned_params: Vec<Param> = self.owned.iter().map(|&k| cmp.params[k].clone()).collect();
        let grads = Gradients {
            grads: self
                .owned
                .iter()
                .map(|&k| cmp.has[k].then(|| cmp.grads[k].clone()))
                .collect(),
        };
        self.opt.step(&owned_params, &grads, lr)?;
        if self.opts.zero1 && self.mesh.shape.dp > 1 {
            self.all_gather_params(&cmp.params)?;
        }
        self.step += 1;
        if self.cfg.balance_bias_lr > 0.0 {
            // the world's counts of this stage's layers
            self.model.apply_bias_balancing(
                &cmp.routing[self.layers.clone()],
                self.cfg.balance_bias_lr,
            )?;
        }
        let skip_fraction = cmp
            .routing
            .iter()
            .map(LayerRoutingStats::skip_fraction)
            .sum::<f64>()
            / cmp.routing.len().max(1) as f64;
        let report = StepReport {
            step: self.step,
            lr,
            loss: cmp.loss,
            aux_loss: cmp.aux,
            total_loss: cmp.loss + self.cfg.aux_loss_coef * cmp.aux,
            grad_norm: cmp.norm,
            targets: cmp.targets,
            routing: cmp.routing,
            skip_fraction,
            seconds: start.elapsed().as_secs_f64(),
        };
        if let Some(path) = &self.log {
            append_log(path, &report)?;
        }
        Ok(report)
    }

    /// ZeRO-1: each replica's updated parameters to the other replicas of its stage.
    fn all_gather_params(&self, params: &[Param]) -> ParallelResult<()> {
        all_gather_owned(
            self.mesh.dp.as_ref(),
            self.mesh.coords.dp,
            params,
            &self.layout.owner,
        )
    }

    /// Collective: every native tensor of the model (each stage's parameters and balancing
    /// biases, from the stage's first replica) on rank 0, `None` elsewhere. The whole model
    /// on one rank: for tests and small models; checkpoints stream ([`ParallelTrainer::save`]).
    pub fn gather_weights(&self) -> ParallelResult<Option<BTreeMap<String, Tensor>>> {
        let world = self.mesh.world.as_ref();
        let shape = self.mesh.shape;
        let cfg = self.model.config().clone();
        if world.rank() != 0 {
            if self.mesh.coords.dp == 0 {
                // parameters then biases, in the stage model's order
                let mut buf = Vec::new();
                for p in self.model.params() {
                    buf.extend(host(p.var.as_tensor())?);
                }
                for b in self.model.balancing_biases()? {
                    buf.extend(b);
                }
                world.send(0, TAG_GATHER, &buf)?;
            }
            world.barrier()?;
            return Ok(None);
        }
        let specs = param_specs(&cfg);
        let dev = Device::Cpu;
        let mut values = self.model.tensors()?;
        for r in 1..shape.world() {
            let c = shape.coords(r);
            if c.dp != 0 {
                continue;
            }
            let layout = Layout::of(&cfg, shape, c.pp, self.opts.zero1);
            let buf = world.recv(r, TAG_GATHER)?;
            let mut at = 0usize;
            let mut take = |n: usize| -> ParallelResult<&[f32]> {
                let s = buf.get(at..at + n).ok_or_else(|| {
                    unsupported(format!(
                        "rank {r} sent {} values, fewer than its stage holds",
                        buf.len()
                    ))
                })?;
                at += n;
                Ok(s)
            };
            for &i in &layout.stage {
                let s = &specs[i];
                let n = s.shape.iter().product();
                values.insert(
                    s.name.clone(),
                    Tensor::from_slice(take(n)?, s.shape.as_slice(), &dev)?,
                );
            }
            for l in stage_layers(&cfg, shape.pp, c.pp)? {
                let n = cfg.num_experts + 1;
                values.insert(
                    format!("model.layers.{l}.mlp.gate.balancing_biases"),
                    Tensor::from_slice(take(n)?, n, &dev)?,
                );
            }
        }
        world.barrier()?;
        Ok(Some(values))
    }

    /// Collective: the full AdamW state (`exp_avg.*`, `exp_avg_sq.*`, `step.*` of every
    /// parameter, each from the replica that keeps it) on rank 0, `None` elsewhere. The
    /// whole state on one rank: for tests; checkpoints stream ([`ParallelTrainer::save`]).
    pub fn gather_optimizer(&self) -> ParallelResult<Option<HashMap<String, Tensor>>> {
        let world = self.mesh.world.as_ref();
        let shape = self.mesh.shape;
        let cfg = self.model.config().clone();
        let all = self.model.params();
        let owned: Vec<Param> = self.owned.iter().map(|&k| all[k].clone()).collect();
        let state = self.opt.export(&owned)?;
        if world.rank() != 0 {
            let mut buf = Vec::new();
            for p in &owned {
                let name = &p.name;
                buf.extend(host(&state[&format!("exp_avg.{name}")])?);
                buf.extend(host(&state[&format!("exp_avg_sq.{name}")])?);
                buf.extend(host(&state[&format!("step.{name}")])?);
            }
            world.send(0, TAG_GATHER, &buf)?;
            world.barrier()?;
            return Ok(None);
        }
        let specs = param_specs(&cfg);
        let dev = Device::Cpu;
        let mut moments: HashMap<String, Tensor> = state;
        for r in 1..shape.world() {
            let c = shape.coords(r);
            let layout = Layout::of(&cfg, shape, c.pp, self.opts.zero1);
            let buf = world.recv(r, TAG_GATHER)?;
            let mut at = 0usize;
            let mut take = |n: usize| -> ParallelResult<&[f32]> {
                let s = buf.get(at..at + n).ok_or_else(|| {
                    unsupported(format!(
                        "rank {r} sent {} optimizer values, fewer than it keeps",
                        buf.len()
                    ))
                })?;
                at += n;
                Ok(s)
            };
            for k in layout.owned_by(c.dp) {
                let s = &specs[layout.stage[k]];
                let n = layout.sizes[k];
                let m = Tensor::from_slice(take(n)?, s.shape.as_slice(), &dev)?;
                let v = Tensor::from_slice(take(n)?, s.shape.as_slice(), &dev)?;
                let st = take(1)?[0] as i64;
                moments.insert(format!("exp_avg.{}", s.name), m);
                moments.insert(format!("exp_avg_sq.{}", s.name), v);
                moments.insert(format!("step.{}", s.name), Tensor::new(&[st], &dev)?);
            }
        }
        world.barrier()?;
        Ok(Some(moments))
    }

    /// The world rank that sends the checkpoint's copy of stage-held tensor `name`: the first
    /// replica of the first stage holding it (a tied embedding's two copies are equal).
    fn weight_owner(&self, name: &str) -> ParallelResult<usize> {
        let cfg = self.model.config();
        let shape = self.mesh.shape;
        let stage = match name
            .strip_prefix("model.layers.")
            .and_then(|r| r.strip_suffix(".mlp.gate.balancing_biases"))
        {
            Some(l) => {
                let l: usize = l
                    .parse()
                    .map_err(|_| unsupported(format!("`{name}`: no layer number")))?;
                (0..shape.pp)
                    .find(|&p| stage_layers(cfg, shape.pp, p).is_ok_and(|r| r.contains(&l)))
            }
            None => (0..shape.pp).find(|&p| stage_holds(cfg, shape.pp, p, name)),
        }
        .ok_or_else(|| unsupported(format!("no pipeline stage holds `{name}`")))?;
        Ok(shape.rank_of(Coords {
            tp: 0,
            pp: stage,
            ep: 0,
            dp: 0,
        }))
    }

    /// `model.safetensors`' tensors in file order (every native tensor, f32 as the
    /// single-process trainer stores them), the world rank sending each, and this rank's
    /// values by name (only what it sends).
    fn weight_plan(&self) -> ParallelResult<FilePlan> {
        let cfg = self.model.config();
        let planned: Vec<PlannedTensor> = native_specs(cfg)
            .into_iter()
            .map(|s| PlannedTensor {
                name: s.name,
                dtype: DType::F32,
                shape: s.shape,
            })
            .collect();
        let ordered = file_order(&planned)?;
        let owners = ordered
            .iter()
            .map(|t| self.weight_owner(&t.name))
            .collect::<ParallelResult<Vec<_>>>()?;
        let me = self.mesh.world.rank();
        let mut mine = HashMap::new();
        if owners.contains(&me) {
            for p in self.model.params() {
                mine.insert(p.name.clone(), Source::Tensor(p.var.as_tensor().clone()));
            }
            for (l, b) in self.layers.clone().zip(self.model.balancing_biases()?) {
                mine.insert(
                    format!("model.layers.{l}.mlp.gate.balancing_biases"),
                    Source::Values(b),
                );
            }
        }
        Ok((ordered, owners, mine))
    }

    /// `optimizer.safetensors`' tensors in file order (`exp_avg.<name>`, `exp_avg_sq.<name>`
    /// f32, `step.<name>` one i64, for every parameter), the world rank sending each (the
    /// replica keeping the state, on the first stage holding the parameter), and this
    /// rank's values by name.
    fn optimizer_plan(&self) -> ParallelResult<FilePlan> {
        let cfg = self.model.config();
        let shape = self.mesh.shape;
        let specs = param_specs(cfg);
        let layouts: Vec<Layout> = (0..shape.pp)
            .map(|p| Layout::of(cfg, shape, p, self.opts.zero1))
            .collect();
        let mut planned = Vec::with_capacity(3 * specs.len());
        let mut owner_of: HashMap<String, usize> = HashMap::new();
        for (i, s) in specs.iter().enumerate() {
            let (stage, k) = layouts
                .iter()
                .enumerate()
                .find_map(|(p, l)| l.stage.iter().position(|&j| j == i).map(|k| (p, k)))
                .ok_or_else(|| unsupported(format!("no pipeline stage holds `{}`", s.name)))?;
            let rank = shape.rank_of(Coords {
                tp: 0,
                pp: stage,
                ep: 0,
                dp: layouts[stage].owner[k].unwrap_or(0),
            });
            for (prefix, dtype, dims) in [
                ("exp_avg", DType::F32, s.shape.clone()),
                ("exp_avg_sq", DType::F32, s.shape.clone()),
                ("step", DType::I64, vec![1]),
            ] {
                let name = format!("{prefix}.{}", s.name);
                owner_of.insert(name.clone(), rank);
                planned.push(PlannedTensor {
                    name,
                    dtype,
                    shape: dims,
                });
            }
        }
        let ordered = file_order(&planned)?;
        let owners: Vec<usize> = ordered.iter().map(|t| owner_of[&t.name]).collect();
        let all = self.model.params();
        let mut mine = HashMap::new();
        for (j, &k) in self.owned.iter().enumerate() {
            let name = &all[k].name;
            let (m, v) = self
                .opt
                .moments(j)
                .ok_or_else(|| unsupported(format!("no AdamW state for `{name}`")))?;
            mine.insert(format!("exp_avg.{name}"), Source::Tensor(m.clone()));
            mine.insert(format!("exp_avg_sq.{name}"), Source::Tensor(v.clone()));
            let st = crate::stream_save::i64_wire(self.opt.steps(j) as i64);
            mine.insert(format!("step.{name}"), Source::Values(st.to_vec()));
        }
        Ok((ordered, owners, mine))
    }

    /// Collective: writes `root/step-NNNNNNNN/` as the single-process trainer does (rank 0,
    /// full tensors under their HF names, the same files byte for byte); returns the
    /// directory on rank 0. Rank 0 receives and writes the weights, then the optimizer
    /// state, one message of at most [`DriverOptions::gather_bytes`] at a time, so it never
    /// holds more than that of either.
    pub fn save(&mut self, root: &Path) -> ParallelResult<Option<PathBuf>> {
        let bound = self.opts.gather_bytes;
        let world = self.mesh.world.as_ref();
        let (wt, wo, wmine) = self.weight_plan()?;
        let (ot, oo, omine) = self.optimizer_plan()?;
        let wlocal = source_reader(&wt, &wmine);
        let olocal = source_reader(&ot, &omine);
        let out = if world.rank() == 0 {
            let mcfg = self.model.config().clone();
            Some(write_checkpoint_with(
                root,
                &self.cfg,
                self.step,
                self.run.as_ref(),
                |tmp| {
                    stream_file(world, &wt, &wo, bound, &wlocal, |fill| {
                        save_checkpoint_streamed(tmp, &mcfg, &wt, fill)
                    })
                    .map_err(into_zaya)?;
                    let path = tmp.join("optimizer.safetensors");
                    stream_file(world, &ot, &oo, bound, &olocal, |fill| {
                        AdamW::save_state_streamed(&path, &ot, fill)
                    })
                    .map_err(into_zaya)?;
                    Ok(())
                },
            )?)
        } else {
            stream_file(world, &wt, &wo, bound, &wlocal, not_root)?;
            stream_file(world, &ot, &oo, bound, &olocal, not_root)?;
            None
        };
        // nobody reads a checkpoint before rank 0 has written it
        world.barrier()?;
        Ok(out)
    }

    /// Collective: rank 0 writes the current weights as a model directory (`dir`, the
    /// single-process layout, byte for byte), receiving them one message of at most
    /// [`DriverOptions::gather_bytes`] at a time.
    pub fn save_model(&self, dir: &Path) -> ParallelResult<()> {
        let world = self.mesh.world.as_ref();
        let (wt, wo, wmine) = self.weight_plan()?;
        let wlocal = source_reader(&wt, &wmine);
        let cfg = self.model.config();
        stream_file(world, &wt, &wo, self.opts.gather_bytes, &wlocal, |fill| {
            save_checkpoint_streamed(dir, cfg, &wt, fill)
        })?;
        world.barrier()?;
        Ok(())
    }

    /// Collective: `loss`, `aux_loss` and `grad.<HF name>` of every parameter for a labelled
    /// batch, as [`zaya::train::labelled_outputs`] computes them on one rank (cross-entropy
    /// only); on rank 0, `None` elsewhere. Nothing is updated.
    pub fn labelled_gradients(
        &self,
        micro_batches: &[Batch],
        checkpointing: zaya::train::Checkpointing,
    ) -> ParallelResult<Option<BTreeMap<String, Tensor>>> {
        let opts = zaya::train::TrainOptions {
            checkpointing,
            aux_loss_coef: 0.0,
            ..Default::default()
        };
        self.gathered_gradients(micro_batches, &opts)
    }

    /// Collective: the step's objective's gradients (`grad.<HF name>`, full tensors, summed
    /// over replicas, before clipping), `loss` and `aux_loss` (mean over layers and
    /// micro-batches) on rank 0; `None` elsewhere. Nothing is updated.
    pub fn gathered_gradients(
        &self,
        micro_batches: &[Batch],
        opts: &zaya::train::TrainOptions,
    ) -> ParallelResult<Option<BTreeMap<String, Tensor>>> {
        let cmp = self.gradients(micro_batches, opts)?;
        let world = self.mesh.world.as_ref();
        let shape = self.mesh.shape;
        let cfg = self.model.config();
        let specs = param_specs(cfg);
        let pack = |grads: &[Tensor], has: &[bool]| -> ParallelResult<Vec<f32>> {
            let mut buf = Vec::new();
            for (g, &h) in grads.iter().zip(has) {
                buf.push(if h { 1.0 } else { 0.0 });
                buf.extend(host(g)?);
            }
            Ok(buf)
        };
        // the balance loss, mean over layers and micro-batches (reported, not differentiated)
        let aux = cmp.aux;
        if world.rank() != 0 {
            if self.mesh.coords.dp == 0 {
                world.send(0, TAG_GATHER, &pack(&cmp.grads, &cmp.has)?)?;
            }
            world.barrier()?;
            return Ok(None);
        }
        let mut out = BTreeMap::new();
        let mut put = |stage: &[usize], buf: &[f32]| -> ParallelResult<()> {
            let mut at = 0;
            for &i in stage {
                let p = &specs[i];
                let n: usize = p.shape.iter().product();
                let h = buf.get(at).copied().unwrap_or(0.0) > 0.0;
                let vals = buf.get(at + 1..at + 1 + n).ok_or_else(|| {
                    unsupported("a stage sent fewer gradient values than it holds")
                })?;
                at += 1 + n;
                if h {
                    out.insert(
                        format!("grad.{}", p.name),
                        Tensor::from_slice(vals, p.shape.as_slice(), &Device::Cpu)?,
                    );
                }
            }
            Ok(())
        };
        put(&self.layout.stage, &pack(&cmp.grads, &cmp.has)?)?;
        for pp in 1..shape.pp {
            let r = shape.rank_of(Coords {
                tp: 0,
                pp,
                ep: 0,
                dp: 0,
            });
            let layout = Layout::of(cfg, shape, pp, false);
            let buf = world.recv(r, TAG_GATHER)?;
            put(&layout.stage, &buf)?;
        }
        out.insert(
            "loss".into(),
            Tensor::new(&[cmp.loss as f32], &Device::Cpu)?,
        );
        out.insert("aux_loss".into(), Tensor::new(&[aux as f32], &Device::Cpu)?);
        world.barrier()?;
        Ok(Some(out))
    }
}

/// A checkpoint file's tensors in file order, the world rank that sends each, and this
/// rank's values by name (only of what it sends).
type FilePlan = (Vec<PlannedTensor>, Vec<usize>, HashMap<String, Source>);

/// A rank's values of one checkpoint tensor.
pub(crate) enum Source {
    /// Held as a tensor (read a range at a time, converted to f32).
    Tensor(Tensor),
    /// Already wire values (balancing biases, an i64 step count as two f32).
    Values(Vec<f32>),
}

/// The [`crate::stream_save::Local`] reader of `mine` for the file-ordered `tensors`.
pub(crate) fn source_reader<'a>(
    tensors: &'a [PlannedTensor],
    mine: &'a HashMap<String, Source>,
) -> impl Fn(usize, Range<usize>) -> ParallelResult<Vec<f32>> + 'a {
    move |i, r| {
        let name = &tensors[i].name;
        match mine.get(name) {
            Some(Source::Tensor(t)) => Ok(t
                .flatten_all()?
                .narrow(0, r.start, r.len())?
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()?),
            Some(Source::Values(v)) => v
                .get(r.clone())
                .map(<[f32]>::to_vec)
                .ok_or_else(|| unsupported(format!("`{name}`: values {r:?} of {}", v.len()))),
            None => Err(unsupported(format!(
                "this rank was asked for `{name}`, which it does not hold"
            ))),
        }
    }
}

/// What [`ParallelTrainer::gradients`] gives.
struct Computed {
    /// The stage's parameters.
    params: Vec<Param>,
    /// Their gradients, summed over replicas (and tied halves).
    grads: Vec<Tensor>,
    has: Vec<bool>,
    loss: f64,
    aux: f64,
    targets: usize,
    routing: Vec<LayerRoutingStats>,
    norm: f64,
}
