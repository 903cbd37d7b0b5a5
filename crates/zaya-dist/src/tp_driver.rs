//! The tensor × pipeline × expert × data-parallel training driver behind `zaya train --tp N
//! --pp N --ep N --dp N` (any mesh with `--tp` or `--ep` above 1).
//!
//! Every rank holds a [`TpTrainModel`] (its slices of its pipeline stage's weights as f32
//! `Var`s, read from the checkpoint by selection: no rank reads or holds the whole model)
//! and the AdamW moments of those slices (AdamW is elementwise, so the slices of the
//! single-process update are the sharded updates). One optimizer step:
//!
//! 1. the step's micro-batches are dealt round-robin to the data-parallel replicas (as in
//!    [`crate::train_driver`]); every rank of a replica runs them through its stage with
//!    the 1F1B schedule of [`crate::pipeline`] over the TP stage API
//!    ([`TpTrainModel::stage_batch`]; the residual stream and the router state travel
//!    between stages, the `pp` group pairing ranks with equal TP/EP coordinates), every
//!    loss divided by the **global** target count of the step; with one stage this is
//!    forward, head and backward per micro-batch;
//! 2. gradients of KV heads shared by several TP ranks are summed over their holders
//!    ([`TpTrainModel::complete_shared`]), then every gradient over the replicas
//!    (bucketed all-reduce over the `dp` group), then a tied embedding's lookup and head
//!    halves between the first and the last stage;
//! 3. loss, balance loss and routing counts are summed over the world from one rank per
//!    TP × EP group (they are the same on all of its ranks); the clipping norm counts every
//!    element of the model once ([`TpTrainModel::global_grad_norm`]);
//! 4. AdamW updates the slices — with **ZeRO-1** each replica keeps the moments of only its
//!    share of the rank's slices (whole slices, balanced by size:
//!    [`crate::train_driver::zero_owners`]), steps those, and the updated slices are
//!    all-gathered over the replicas (an expert slice whose experts saw no token still
//!    steps when another EP rank's slice of the same stacked tensor did, as the single
//!    tensor does on one device); the balancing-bias rule runs on every rank for its
//!    stage's layers.
//!
//! Checkpoints are the single-process ones: world rank 0 gathers the full weights
//! ([`TpTrainModel::gather_weights`]) and the AdamW moments and step counts the same way
//! (each element from the one rank that owns it), and writes them with
//! [`write_checkpoint_with`], so a run resumes on any layout. A resumed rank reads its slices of
//! the weights and of `exp_avg` / `exp_avg_sq` / `step` from the checkpoint's files by
//! selection ([`TpParallelTrainer::open`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use zaya::safetensors_io::{file_order, PlannedTensor};
use zaya::train::optim::AdamW;
use zaya::train::trainer::{append_log, write_checkpoint_with, StepReport, TrainerConfig};
use zaya::train::{Batch, Gradients, LayerRoutingStats, LossScale, Param, Trainable};
use zaya::weights::{save_checkpoint_streamed, Checkpoint};
use zaya::{ZayaConfig, ZayaError};

use crate::error::{ParallelError, ParallelResult};
use crate::mesh::{Coords, Mesh, MeshShape};
use crate::pipeline::{
    flush, one_f_one_b, pack, receive, stage_layers, tag_backward, tag_forward, unpack, Pending,
    PipeOp,
};
use crate::plan::ParallelPlan;
use crate::stream_save::not_root;
use crate::tp::train::{
    held_params, BoundaryGrads, SliceSet, Streamed, TpStageBatch, TpStageForward, TpStageInput,
    TpStageUpstream, TpTrainModel,
};
use crate::train_driver::{
    all_gather_owned, join_f64, split_f64, sum_tied, zero_owners, DriverOptions,
};

fn unsupported(msg: impl Into<String>) -> ParallelError {
    ParallelError::Unsupported(msg.into())
}

fn into_zaya(e: ParallelError) -> ZayaError {
    match e {
        ParallelError::Model(e) => e,
        other => ZayaError::Input(other.to_string()),
    }
}

/// Fails unless this driver trains `cfg` on `shape` (the plan's divisibility rules, layers
/// that divide into the stages).
pub fn check_tp_setup(cfg: &ZayaConfig, shape: MeshShape) -> ParallelResult<()> {
    ParallelPlan::new(cfg, shape).map_err(|e| unsupported(e.to_string()))?;
    stage_layers(cfg, shape.pp, 0)?;
    Ok(())
}

/// Where a run stands when its ranks are built: the settings, the optimizer steps taken
/// and the run facts saved with every checkpoint (a fresh run: step 0).
#[derive(Debug, Clone)]
pub struct RunState {
    pub cfg: TrainerConfig,
    pub step: u64,
    pub run: Option<serde_json::Value>,
}

/// One rank of a TP × PP × EP × DP training run.
pub struct TpParallelTrainer {
    mesh: Mesh,
    model: TpTrainModel,
    /// Per parameter (of [`TpTrainModel::params`]): the replica keeping its AdamW state
    /// (`None`: every replica, without ZeRO-1).
    owner: Vec<Option<usize>>,
    /// Positions of the parameters whose AdamW state this rank keeps.
    owned: Vec<usize>,
    opt: AdamW,
    cfg: TrainerConfig,
    step: u64,
    run: Option<serde_json::Value>,
    opts: DriverOptions,
    log: Option<PathBuf>,
}

impl std::fmt::Debug for TpParallelTrainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TpParallelTrainer")
            .field("coords", &self.mesh.coords)
            .field("step", &self.step)
            .finish()
    }
}

/// Which replica keeps the AdamW state of each trainable slice of the rank at `c`
/// (aligned with its [`TpTrainModel::params`]): the same on every replica of a mesh
/// position, and computable by any rank for any other.
fn owners_at(plan: &ParallelPlan, c: Coords, zero1: bool) -> Vec<(String, Option<usize>)> {
    let held = held_params(plan, c);
    let sizes: Vec<usize> = held
        .iter()
        .map(|(s, sel)| sel.shape(&s.shape).iter().product())
        .collect();
    held.into_iter()
        .zip(zero_owners(&sizes, plan.mesh.dp, zero1))
        .map(|((s, _), o)| (s.name, o))
        .collect()
}

/// The file an optimizer state was read from (for errors).
fn origin(st: &Checkpoint) -> PathBuf {
    st.files()
        .first()
        .cloned()
        .unwrap_or_else(|| st.dir().to_path_buf())
}

impl TpParallelTrainer {
    /// A rank of the run reading only its own slices: the weights from `weights` (the
    /// model directory of a fresh run, or the checkpoint a run resumes from), the AdamW
    /// state (`exp_avg.*`, `exp_avg_sq.*`, `step.*` of the single-process
    /// `optimizer.safetensors`) from `state` when resuming (a fresh optimizer otherwise).
    /// Collective over the mesh.
    pub fn open(
        mesh: Mesh,
        weights: &Arc<Checkpoint>,
        state: Option<&Checkpoint>,
        at: RunState,
        opts: DriverOptions,
    ) -> ParallelResult<Self> {
        let cfg = weights.config()?;
        weights.validate(&cfg)?;
        check_tp_setup(&cfg, mesh.shape)?;
        at.cfg.validate()?;
        let plan = ParallelPlan::new(&cfg, mesh.shape).map_err(|e| unsupported(e.to_string()))?;
        let model = TpTrainModel::on_mesh(weights, &plan, &mesh)?;
        let owner: Vec<Option<usize>> = owners_at(&plan, mesh.coords, opts.zero1)
            .into_iter()
            .map(|(_, o)| o)
            .collect();
        if owner.len() != model.params().len() {
            return Err(unsupported(format!(
                "the plan gives this rank {} trainable slices, its model holds {}",
                owner.len(),
                model.params().len()
            )));
        }
        let me = mesh.coords.dp;
        let owned: Vec<usize> = (0..owner.len())
            .filter(|&k| owner[k].is_none_or(|d| d == me))
            .collect();
        let params: Vec<Param> = owned
            .iter()
            .map(|&k| model.params()[k].param.clone())
            .collect();
        let opt = match state {
            None => AdamW::new(&params, at.cfg.adamw)?,
            Some(st) => {
                let dev = Device::Cpu;
                let mut mine = HashMap::new();
                for &k in &owned {
                    let sp = &model.params()[k];
                    let name = &sp.param.name;
                    let ranges = sp.selection.ranges(&sp.full_shape);
                    for key in [format!("exp_avg.{name}"), format!("exp_avg_sq.{name}")] {
                        match st.stored_shape(&key) {
                            Some(s) if s == sp.full_shape.as_slice() => {}
                            found => {
                                return Err(ParallelError::Model(ZayaError::ShapeMismatch {
                                    name: key,
                                    expected: sp.full_shape.clone(),
                                    found: found.map(<[usize]>::to_vec).unwrap_or_default(),
                                    file: origin(st),
                                }))
                            }
                        }
                        let t = st.load_selection(&cfg, &key, &ranges, DType::F32, &dev)?;
                        mine.insert(key, t);
                    }
                    let key = format!("step.{name}");
                    mine.insert(key.clone(), st.load(&cfg, &key, DType::I64, &dev)?);
                }
                AdamW::import(&params, mine, at.cfg.adamw, &origin(st))?
            }
        };
        Ok(TpParallelTrainer {
            mesh,
            model,
            owner,
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
    pub fn model(&self) -> &TpTrainModel {
        &self.model
    }
    pub fn config(&self) -> &TrainerConfig {
        &self.cfg
    }
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// This rank's gradients for the step's micro-batches (every rank is given all of them;
    /// its replica takes its share), whole for every element it holds: shared KV heads
    /// summed over their holders, summed over the replicas and the tied embedding's halves;
    /// with the world's loss, balance loss, routing counts and the gradient norm (each
    /// element of the model counted once).
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
        let StageSums {
            grads: mut acc,
            loss,
            aux,
            routing: stage_routing,
        } = run_1f1b(&self.model, self.mesh.pp.as_ref(), &mine, opts, &scale)?;
        self.model.complete_shared(&mut acc)?;

        // gradients (and which exist) summed over the replicas
        let n = acc.len();
        let mut has: Vec<f32> = acc
            .iter()
            .map(|g| if g.is_some() { 1.0 } else { 0.0 })
            .collect();
        let mut grads: Vec<Tensor> = Vec::with_capacity(n);
        for (sp, g) in self.model.params().iter().zip(acc) {
            grads.push(match g {
                Some(g) => g.to_dtype(DType::F32)?,
                None => Tensor::zeros(sp.param.var.shape(), DType::F32, &Device::Cpu)?,
            });
        }
        // A stacked expert tensor is one parameter on one device: it has a gradient (zero
        // rows for experts without tokens) when any of its experts saw a token. Its EP
        // slices agree on that (the AdamW step counts and moments stay the single-process
        // ones). The EP ranks hold the same parameter names in the same order.
        if shape.ep > 1 {
            self.mesh.ep.all_reduce_sum(&mut has)?;
        }
        if shape.dp > 1 {
            let dp = self.mesh.dp.as_ref();
            grads = crate::grad::all_reduce_sum(dp, &grads, self.opts.bucket_elems)?;
            dp.all_reduce_sum(&mut has)?;
        }
        // a tied embedding: the first stage's lookup part + the last stage's head part
        if self.model.config().tie_word_embeddings && shape.pp > 1 {
            if let Some(k) = self
                .model
                .params()
                .iter()
                .position(|sp| sp.param.name == "model.embed_tokens.weight")
            {
                grads[k] = sum_tied(self.mesh.pp.as_ref(), c.pp == 0, &grads[k], &mut has[k])?;
            }
        }
        // loss (2), aux (2), routing counts per layer: one rank of each TP × EP group
        // (they all hold the same values) of every stage and replica
        let cfg = self.model.config();
        let (nl, e1) = (cfg.num_hidden_layers, cfg.num_experts + 1);
        let layers = self.model.model().layer_range();
        let mut buf = vec![0f32; 4 + nl * e1];
        if c.tp == 0 && c.ep == 0 {
            buf[..2].copy_from_slice(&split_f64(loss));
            buf[2..4].copy_from_slice(&split_f64(aux));
            for (j, st) in stage_routing.iter().enumerate() {
                let l = layers.start + j;
                for (e, &k) in st.counts.iter().enumerate().take(e1) {
                    buf[4 + l * e1 + e] = k as f32;
                }
            }
        }
        self.mesh.world.all_reduce_sum(&mut buf)?;
        let loss = join_f64(&buf[..2]);
        let aux = join_f64(&buf[2..4]);
        let routing: Vec<LayerRoutingStats> = (0..nl)
            .map(|l| {
                let counts: Vec<u64> = buf[4 + l * e1..4 + (l + 1) * e1]
                    .iter()
                    .map(|&v| v as u64)
                    .collect();
                LayerRoutingStats {
                    tokens: counts.iter().sum(),
                    counts,
                }
            })
            .collect();
        let grads: Vec<Option<Tensor>> = grads
            .into_iter()
            .zip(&has)
            .map(|(g, &h)| (h > 0.0).then_some(g))
            .collect();
        let norm = self.model.global_grad_norm(&grads)?;
        Ok(Computed {
            grads,
            loss,
            aux,
            targets: total,
            routing,
            norm,
        })
    }

    /// Collective: the step's objective's gradients (`grad.<HF name>`, full tensors, summed
    /// over micro-batches and replicas, before clipping), `loss` and `aux_loss` (mean over
    /// layers and micro-batches) on world rank 0, as the single-process step computes them
    /// before its update; `None` elsewhere. Nothing is updated.
    pub fn gathered_gradients(
        &self,
        micro_batches: &[Batch],
        opts: &zaya::train::TrainOptions,
    ) -> ParallelResult<Option<std::collections::BTreeMap<String, Tensor>>> {
        let cmp = self.gradients(micro_batches, opts)?;
        let values: Vec<Tensor> = self
            .model
            .params()
            .iter()
            .zip(&cmp.grads)
            .map(|(sp, g)| match g {
                Some(g) => Ok(g.clone()),
                None => Ok(sp.param.var.zeros_like()?),
            })
            .collect::<ParallelResult<_>>()?;
        let Some(full) = self.model.gather_values(&values, &|c, _| c.dp == 0)? else {
            return Ok(None);
        };
        let dev = Device::Cpu;
        let mut out: std::collections::BTreeMap<String, Tensor> = full
            .into_iter()
            .map(|(k, v)| (format!("grad.{k}"), v))
            .collect();
        out.insert("loss".into(), Tensor::new(&[cmp.loss as f32], &dev)?);
        out.insert("aux_loss".into(), Tensor::new(&[cmp.aux as f32], &dev)?);
        Ok(Some(out))
    }

    /// One optimizer step over the step's micro-batches (identical on every rank): equal to
    /// [`zaya::train::trainer::Trainer::step`] on the same micro-batches up to the order of
    /// floating-point sums.
    pub fn step(&mut self, micro_batches: &[Batch]) -> ParallelResult<StepReport> {
        let start = Instant::now();
        let opts = self.cfg.train_options();
        let Computed {
            mut grads,
            loss,
            aux,
            targets: total,
            routing,
            norm,
        } = self.gradients(micro_batches, &opts)?;
        let shape = self.mesh.shape;
        let c = self.mesh.coords;
        let layers = self.model.model().layer_range();
        if !norm.is_finite() || !loss.is_finite() {
            return Err(ZayaError::Input(format!(
                "step {}: loss {loss}, gradient norm {norm}: not finite, update skipped",
                self.step + 1
            ))
            .into());
        }
        if let Some(max) = self.cfg.max_grad_norm {
            let coef = max / (norm + 1e-6);
            if coef < 1.0 {
                for g in grads.iter_mut().flatten() {
                    *g = (&*g * coef)?;
                }
            }
        }
        let lr = self.cfg.schedule.lr(self.step);
        let params = Trainable::params(&self.model);
        let owned_params: Vec<Param> = self.owned.iter().map(|&k| params[k].clone()).collect();
        let owned_grads = Gradients {
            grads: self.owned.iter().map(|&k| grads[k].take()).collect(),
        };
        self.opt.step(&owned_params, &owned_grads, lr)?;
        if shape.dp > 1 && self.owner.iter().any(Option::is_some) {
            all_gather_owned(self.mesh.dp.as_ref(), c.dp, params, &self.owner)?;
        }
        self.step += 1;
        if self.cfg.balance_bias_lr > 0.0 {
            Trainable::apply_bias_balancing(
                &mut self.model,
                &routing[layers.clone()],
                self.cfg.balance_bias_lr,
            )?;
        }
        let skip_fraction = routing
            .iter()
            .map(LayerRoutingStats::skip_fraction)
            .sum::<f64>()
            / routing.len().max(1) as f64;
        let report = StepReport {
            step: self.step,
            lr,
            loss,
            aux_loss: aux,
            total_loss: loss + self.cfg.aux_loss_coef * aux,
            grad_norm: norm,
            targets: total,
            routing,
            skip_fraction,
            seconds: start.elapsed().as_secs_f64(),
        };
        if let Some(path) = &self.log {
            append_log(path, &report)?;
        }
        Ok(report)
    }

    /// Collective: the full AdamW state on world rank 0 (`None` elsewhere) as the
    /// single-process `optimizer.safetensors` holds it (`exp_avg.<name>`,
    /// `exp_avg_sq.<name>`, `step.<name>`): each element from the one rank that keeps it
    /// (under ZeRO-1, its replica's owner).
    pub fn gather_optimizer(&self) -> ParallelResult<Option<HashMap<String, Tensor>>> {
        let plan = self.model.plan();
        let zero1 = self.opts.zero1;
        // (coords with dp 0) → owners of that position's slices, by name
        let owners: std::cell::RefCell<HashMap<(usize, usize, usize), Owners>> = Default::default();
        let keeps = |c: Coords, name: &str| -> bool {
            let mut o = owners.borrow_mut();
            let at = o
                .entry((c.tp, c.pp, c.ep))
                .or_insert_with(|| owners_at(plan, c, zero1).into_iter().collect());
            match at.get(name) {
                Some(Some(d)) => *d == c.dp,
                _ => c.dp == 0,
            }
        };
        let params = Trainable::params(&self.model);
        let owned_params: Vec<Param> = self.owned.iter().map(|&k| params[k].clone()).collect();
        let mut state = self.opt.export(&owned_params)?;
        // a slice this rank keeps no state for is never picked: zeros stand in
        let mut pick = |prefix: &str| -> ParallelResult<Vec<Tensor>> {
            params
                .iter()
                .map(|p| match state.remove(&format!("{prefix}.{}", p.name)) {
                    Some(t) => Ok(t),
                    None => Ok(p.var.zeros_like()?),
                })
                .collect()
        };
        let m = self.model.gather_values(&pick("exp_avg")?, &keeps)?;
        let v = self.model.gather_values(&pick("exp_avg_sq")?, &keeps)?;
        let steps = self.gathered_steps()?;
        let (Some(m), Some(v), Some(steps)) = (m, v, steps) else {
            return Ok(None);
        };
        let dev = Device::Cpu;
        let mut moments = HashMap::new();
        for (name, mt) in m {
            let vt = v
                .get(&name)
                .ok_or_else(|| unsupported(format!("no gathered exp_avg_sq for `{name}`")))?
                .clone();
            let step = match steps.get(&name) {
                Some(&s) => s,
                // a tensor no rank trains (no elements): a fresh state
                None => self.step as i64,
            };
            moments.insert(format!("exp_avg_sq.{name}"), vt);
            moments.insert(format!("step.{name}"), Tensor::new(&[step], &dev)?);
            moments.insert(format!("exp_avg.{name}"), mt);
        }
        Ok(Some(moments))
    }

    /// Collective: every parameter's AdamW step count by name on world rank 0 (`None`
    /// elsewhere). Every rank sends one per slice it holds (0 where it keeps no state); the
    /// slices of a tensor that keep state agree, so rank 0 takes the largest.
    fn gathered_steps(&self) -> ParallelResult<Option<HashMap<String, i64>>> {
        let plan = self.model.plan();
        let params = Trainable::params(&self.model);
        let world = self.mesh.world.as_ref();
        let mut mine: Vec<f32> = vec![0.0; 2 * params.len()];
        for (j, &k) in self.owned.iter().enumerate() {
            let [hi, lo] = split_f64(self.opt.steps(j) as f64);
            mine[2 * k] = hi;
            mine[2 * k + 1] = lo;
        }
        let mut send = vec![Vec::new(); world.size()];
        send[0] = mine;
        let got = world.all_to_all_v(&send)?;
        if world.rank() != 0 {
            return Ok(None);
        }
        let mut steps: HashMap<String, i64> = HashMap::new();
        for (r, data) in got.iter().enumerate() {
            let held = held_params(plan, plan.mesh.coords(r));
            if 2 * held.len() != data.len() {
                return Err(unsupported(format!(
                    "rank {r} sent {} step-count values for {} slices",
                    data.len(),
                    held.len()
                )));
            }
            for ((spec, _), s) in held.iter().zip(data.chunks(2)) {
                let e = steps.entry(spec.name.clone()).or_insert(0);
                *e = (*e).max(join_f64(s) as i64);
            }
        }
        Ok(Some(steps))
    }

    /// `model.safetensors`' tensors in file order (every native tensor in f32, as the
    /// single-process trainer stores them).
    fn weight_files(&self) -> ParallelResult<Vec<PlannedTensor>> {
        let planned: Vec<PlannedTensor> = zaya::weights::native_specs(self.model.config())
            .into_iter()
            .map(|s| PlannedTensor {
                name: s.name,
                dtype: DType::F32,
                shape: s.shape,
            })
            .collect();
        Ok(file_order(&planned)?)
    }

    /// Collective: rank 0 writes `model.safetensors` and `config.json` into `dir`,
    /// receiving a chunk of rows of at most [`DriverOptions::gather_bytes`] at a time.
    fn stream_weights(&self, dir: &Path) -> ParallelResult<()> {
        let bound = self.opts.gather_bytes;
        let files = self.weight_files()?;
        let values: Vec<Option<Tensor>> = self
            .model
            .params()
            .iter()
            .map(|sp| Some(sp.param.var.as_tensor().clone()))
            .collect();
        let first_replica = |c: Coords, _: &str| c.dp == 0;
        let sets = [SliceSet {
            values: &values,
            replica: &first_replica,
        }];
        let what = |name: &str| -> ParallelResult<Streamed> {
            Ok(if name.ends_with(".balancing_biases") {
                Streamed::Bias
            } else {
                Streamed::Slices {
                    base: name.to_string(),
                    set: 0,
                }
            })
        };
        let cfg = self.model.config();
        if self.mesh.world.rank() == 0 {
            self.model
                .stream_full(&files, &sets, &what, bound, |fill| {
                    save_checkpoint_streamed(dir, cfg, &files, fill)
                })?;
        } else {
            self.model
                .stream_full(&files, &sets, &what, bound, not_root)?;
        }
        Ok(())
    }

    /// Collective: rank 0 writes `path` (`optimizer.safetensors`, the single-process file
    /// byte for byte), receiving a chunk of rows of a moment tensor at a time, each element
    /// from the replica that keeps it.
    fn stream_optimizer(&self, path: &Path) -> ParallelResult<()> {
        let bound = self.opts.gather_bytes;
        let plan = self.model.plan();
        let zero1 = self.opts.zero1;
        let owners: std::cell::RefCell<HashMap<(usize, usize, usize), Owners>> = Default::default();
        let keeps = |c: Coords, name: &str| -> bool {
            let mut o = owners.borrow_mut();
            let at = o
                .entry((c.tp, c.pp, c.ep))
                .or_insert_with(|| owners_at(plan, c, zero1).into_iter().collect());
            match at.get(name) {
                Some(Some(d)) => *d == c.dp,
                _ => c.dp == 0,
            }
        };
        let steps = self.gathered_steps()?;
        let n = self.model.params().len();
        let mut m: Vec<Option<Tensor>> = vec![None; n];
        let mut v: Vec<Option<Tensor>> = vec![None; n];
        for (j, &k) in self.owned.iter().enumerate() {
            let (a, b) = self
                .opt
                .moments(j)
                .ok_or_else(|| unsupported(format!("no AdamW state for slice {k}")))?;
            m[k] = Some(a.clone());
            v[k] = Some(b.clone());
        }
        let mut planned = Vec::new();
        for s in zaya::weights::native_specs(self.model.config())
            .into_iter()
            .filter(|s| !s.name.ends_with(".balancing_biases"))
        {
            for (prefix, dtype, dims) in [
                ("exp_avg", DType::F32, s.shape.clone()),
                ("exp_avg_sq", DType::F32, s.shape.clone()),
                ("step", DType::I64, vec![1]),
            ] {
                planned.push(PlannedTensor {
                    name: format!("{prefix}.{}", s.name),
                    dtype,
                    shape: dims,
                });
            }
        }
        let files = file_order(&planned)?;
        let sets = [
            SliceSet {
                values: &m,
                replica: &keeps,
            },
            SliceSet {
                values: &v,
                replica: &keeps,
            },
        ];
        let what = |name: &str| -> ParallelResult<Streamed> {
            let (prefix, base) = name
                .split_once('.')
                .ok_or_else(|| unsupported(format!("`{name}` is no optimizer tensor")))?;
            Ok(match prefix {
                "exp_avg" => Streamed::Slices {
                    base: base.to_string(),
                    set: 0,
                },
                "exp_avg_sq" => Streamed::Slices {
                    base: base.to_string(),
                    set: 1,
                },
                // a tensor no rank trains (no elements): a fresh state at the run's step
                _ => Streamed::Known(vec![steps
                    .as_ref()
                    .and_then(|s| s.get(base).copied())
                    .unwrap_or(self.step as i64)]),
            })
        };
        if self.mesh.world.rank() == 0 {
            self.model
                .stream_full(&files, &sets, &what, bound, |fill| {
                    AdamW::save_state_streamed(path, &files, fill)
                })?;
        } else {
            self.model
                .stream_full(&files, &sets, &what, bound, not_root)?;
        }
        Ok(())
    }

    /// Collective: writes `root/step-NNNNNNNN/` as the single-process trainer does (rank 0,
    /// full tensors under their HF names, the same files byte for byte); returns the
    /// directory on rank 0. Rank 0 receives and writes the weights, then the optimizer
    /// state, a chunk of at most [`DriverOptions::gather_bytes`] at a time (whole rows,
    /// assembled from the slices), so it never holds more than that of either.
    pub fn save(&mut self, root: &Path) -> ParallelResult<Option<PathBuf>> {
        let out = if self.mesh.world.rank() == 0 {
            let this = &*self;
            Some(write_checkpoint_with(
                root,
                &this.cfg,
                this.step,
                this.run.as_ref(),
                |tmp| {
                    this.stream_weights(tmp).map_err(into_zaya)?;
                    this.stream_optimizer(&tmp.join("optimizer.safetensors"))
                        .map_err(into_zaya)
                },
            )?)
        } else {
            self.stream_weights(root)?;
            self.stream_optimizer(root)?;
            None
        };
        // nobody reads a checkpoint before rank 0 has written it
        self.mesh.world.barrier()?;
        Ok(out)
    }

    /// Collective: rank 0 writes the current weights as a model directory (`dir`, the
    /// single-process layout, byte for byte), receiving a bounded chunk at a time.
    pub fn save_model(&self, dir: &Path) -> ParallelResult<()> {
        self.stream_weights(dir)?;
        self.mesh.world.barrier()?;
        Ok(())
    }

    /// Positions (in [`TpTrainModel::params`]) of the slices whose AdamW state this rank
    /// keeps.
    pub fn owned(&self) -> &[usize] {
        &self.owned
    }

    /// The AdamW state this rank keeps (of the slices [`TpParallelTrainer::owned`] lists).
    pub fn optimizer(&self) -> &AdamW {
        &self.opt
    }
}

/// The stage's part of one step over this replica's `micro` batches with 1F1B (one
/// stage: forward, head and backward per micro-batch): this rank's gradients summed
/// over the micro-batches (aligned with [`TpTrainModel::params`]), and the stage's
/// loss, balance-loss share and routing counts.
pub(crate) fn run_1f1b(
    model: &TpTrainModel,
    comm: &dyn crate::comm::Comm,
    micro: &[Batch],
    opts: &zaya::train::TrainOptions,
    scale: &LossScale,
) -> ParallelResult<StageSums> {
    struct InFlight<'a> {
        batch: TpStageBatch<'a>,
        fwd: TpStageForward,
        head: Option<(Option<Tensor>, candle_core::backprop::GradStore)>,
    }
    let stages = comm.size();
    let stage = comm.rank();
    if model.coords().pp != stage || model.plan().mesh.pp != stages {
        return Err(unsupported(format!(
            "stage {} of {} given pipeline group member {stage} of {stages}",
            model.coords().pp,
            model.plan().mesh.pp
        )));
    }
    let (first, last) = (stage == 0, stage + 1 == stages);
    let normalizer = scale.normalizer.ok_or_else(|| {
        unsupported("a training step needs the step's global target count as its normaliser")
    })?;
    let cfg = model.config();
    let hidden = cfg.hidden_size;
    let num_layers = cfg.num_hidden_layers.max(1) as f64;
    let mut sums = StageSums {
        grads: vec![None; model.params().len()],
        loss: 0.0,
        aux: 0.0,
        routing: Vec::new(),
    };
    let mut inflight: HashMap<usize, InFlight<'_>> = HashMap::new();
    let mut pending: Pending = None;
    for op in one_f_one_b(stages, stage, micro.len()) {
        match op {
            PipeOp::Forward(i) => {
                let batch = model.stage_batch(&micro[i], opts, scale)?;
                let input = if first {
                    flush(comm, &mut pending)?;
                    TpStageInput::Embed
                } else {
                    let buf = receive(comm, &mut pending, stage - 1, tag_forward(i))?;
                    let (hidden, state) =
                        unpack(buf, micro[i].shape()?, hidden, "pipeline forward")?;
                    TpStageInput::Boundary { hidden, state }
                };
                let fwd = batch.forward(input, opts.checkpointing)?;
                for (k, s) in fwd.stats.iter().enumerate() {
                    if sums.routing.len() <= k {
                        sums.routing.push(s.clone());
                    } else {
                        sums.routing[k].merge(s)?;
                    }
                }
                sums.aux += scale.aux_weight * fwd.aux_values.iter().sum::<f64>() / num_layers;
                let head = if last {
                    let out = batch.head(&fwd, normalizer, opts.loss_chunk)?;
                    sums.loss += out.nll_sum / normalizer;
                    Some((out.grad_hidden, out.grads))
                } else {
                    let (h, s) = fwd.output();
                    pending = Some((stage + 1, tag_forward(i), pack(&h, s.as_ref())?));
                    None
                };
                inflight.insert(i, InFlight { batch, fwd, head });
            }
            PipeOp::Backward(i) => {
                let InFlight { batch, fwd, head } = inflight.remove(&i).ok_or_else(|| {
                    unsupported(format!(
                        "1F1B: backward of micro-batch {i} before its forward"
                    ))
                })?;
                let (upstream, acc) = match head {
                    Some((g, acc)) => {
                        flush(comm, &mut pending)?;
                        (TpStageUpstream::Normed(g), acc)
                    }
                    None => {
                        let buf = receive(comm, &mut pending, stage + 1, tag_backward(i))?;
                        let (hidden, state) =
                            unpack(buf, micro[i].shape()?, hidden, "pipeline backward")?;
                        (
                            TpStageUpstream::Boundary { hidden, state },
                            Default::default(),
                        )
                    }
                };
                let (grads, up): (Vec<Option<Tensor>>, BoundaryGrads) =
                    batch.backward(fwd, upstream, acc)?;
                for (a, g) in sums.grads.iter_mut().zip(grads) {
                    if let Some(g) = g {
                        *a = Some(match a.take() {
                            Some(old) => old.add_reusing(&g)?,
                            None => g,
                        });
                    }
                }
                if !first {
                    let (g_h, g_s) =
                        up.ok_or_else(|| unsupported("no gradient reached the stage's input"))?;
                    pending = Some((stage - 1, tag_backward(i), pack(&g_h, g_s.as_ref())?));
                }
            }
        }
    }
    flush(comm, &mut pending)?;
    Ok(sums)
}

/// The replica keeping the AdamW state of each slice of one mesh position, by name.
type Owners = HashMap<String, Option<usize>>;

/// What [`TpParallelTrainer::gradients`] gives.
struct Computed {
    /// Aligned with [`TpTrainModel::params`]; `None`: no gradient anywhere.
    grads: Vec<Option<Tensor>>,
    loss: f64,
    aux: f64,
    targets: usize,
    routing: Vec<LayerRoutingStats>,
    norm: f64,
}

/// What a stage computed over a replica's micro-batches.
pub(crate) struct StageSums {
    /// This rank's parameter gradients (shared KV heads: each holder's part).
    pub(crate) grads: Vec<Option<Tensor>>,
    /// Last stage: `Σ nll_sum / normalizer`; 0 elsewhere.
    pub(crate) loss: f64,
    /// This stage's share of the step's balance loss.
    pub(crate) aux: f64,
    /// Routing counts of the stage's layers, merged over the micro-batches.
    pub(crate) routing: Vec<LayerRoutingStats>,
}
