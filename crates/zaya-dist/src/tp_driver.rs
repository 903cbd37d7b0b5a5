//! The tensor × expert × data-parallel training driver behind `zaya train --tp N --ep N
//! --dp N` (one pipeline stage).
//!
//! Every rank holds a [`TpTrainModel`] (its slices of the weights as f32 `Var`s) and the
//! AdamW moments of exactly those slices (AdamW is elementwise, so the slices of the
//! single-process update are the sharded updates). One optimizer step:
//!
//! 1. the step's micro-batches are dealt round-robin to the data-parallel replicas (as in
//!    [`crate::train_driver`]); every rank of a replica's TP × EP group runs the same
//!    micro-batches through [`TpTrainModel::forward_backward`], every loss divided by the
//!    **global** target count of the step;
//! 2. gradients of KV heads shared by several TP ranks are summed over their holders
//!    ([`TpTrainModel::complete_shared`]), then every gradient is summed over the
//!    replicas (bucketed all-reduce over the `dp` group);
//! 3. loss, balance loss and routing counts are summed over the replicas (they are the same
//!    on every rank of a TP × EP group); the clipping norm counts every element of the
//!    model once ([`TpTrainModel::global_grad_norm`]);
//! 4. AdamW updates the slices (an expert slice whose experts saw no token still steps
//!    when another EP rank's slice of the same stacked tensor did, as the single tensor
//!    does on one device); the balancing-bias rule runs on every rank.
//!
//! Checkpoints are the single-process ones: world rank 0 gathers the full weights
//! ([`TpTrainModel::gather_weights`]) and the AdamW moments the same way
//! ([`TpTrainModel::gather_full`]) and writes them with [`write_checkpoint`], so a TP run
//! resumes on one rank and the other way round. ZeRO-1 is not applied (every replica keeps
//! the moments of its slices). Pipeline stages (`pp > 1`) with TP are not driven here.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use zaya::train::optim::AdamW;
use zaya::train::trainer::{append_log, write_checkpoint, StepReport, TrainerConfig, TrainerParts};
use zaya::train::{Batch, Gradients, LayerRoutingStats, LossScale, Trainable, TrainableModel};
use zaya::weights::Checkpoint;
use zaya::{ZayaConfig, ZayaError};

use crate::error::{ParallelError, ParallelResult};
use crate::mesh::{Mesh, MeshShape};
use crate::plan::ParallelPlan;
use crate::tp::train::TpTrainModel;

/// Values per gradient all-reduce bucket over the replicas.
const BUCKET_ELEMS: usize = 1 << 22;

fn unsupported(msg: impl Into<String>) -> ParallelError {
    ParallelError::Unsupported(msg.into())
}

/// Fails unless this driver trains `cfg` on `shape` (tensor / expert parallel, one
/// pipeline stage, the plan's divisibility rules).
pub fn check_tp_setup(cfg: &ZayaConfig, shape: MeshShape) -> ParallelResult<()> {
    if shape.pp > 1 {
        return Err(unsupported(format!(
            "training with --tp {} --ep {} and --pp {}: tensor/expert-parallel training runs one pipeline stage in this version (drop --pp, or train --pp with --dp only)",
            shape.tp, shape.ep, shape.pp
        )));
    }
    ParallelPlan::new(cfg, shape).map_err(|e| unsupported(e.to_string()))?;
    Ok(())
}

/// `x` as two f32 (value and rounding error), so sums over ranks keep f64-like precision.
fn split_f64(x: f64) -> [f32; 2] {
    let hi = x as f32;
    [hi, (x - f64::from(hi)) as f32]
}
fn join_f64(v: &[f32]) -> f64 {
    f64::from(v[0]) + f64::from(v[1])
}

/// One rank of a TP × EP × DP training run.
pub struct TpParallelTrainer {
    mesh: Mesh,
    model: TpTrainModel,
    opt: AdamW,
    cfg: TrainerConfig,
    step: u64,
    run: Option<serde_json::Value>,
    log: Option<PathBuf>,
    /// Rank 0, after [`TpParallelTrainer::save`]: the gathered single-process model.
    full: Option<TrainableModel>,
}

impl std::fmt::Debug for TpParallelTrainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TpParallelTrainer")
            .field("coords", &self.mesh.coords)
            .field("step", &self.step)
            .finish()
    }
}

impl TpParallelTrainer {
    /// A rank of the run from a single-process trainer's parts (fresh or resumed: the full
    /// model and the full optimizer state): this rank keeps its slices of both. `ckpt` is
    /// a checkpoint of the same architecture (the model's buffers are built from it, then
    /// every tensor is set from `parts`). Collective over the mesh.
    pub fn from_parts(
        mesh: Mesh,
        ckpt: &Arc<Checkpoint>,
        parts: TrainerParts<TrainableModel>,
    ) -> ParallelResult<Self> {
        let TrainerParts {
            model: full,
            opt: full_opt,
            cfg,
            step,
            run,
        } = parts;
        check_tp_setup(full.config(), mesh.shape)?;
        let plan =
            ParallelPlan::new(full.config(), mesh.shape).map_err(|e| unsupported(e.to_string()))?;
        let mut model = TpTrainModel::on_mesh(ckpt, &plan, &mesh)?;
        model.load_full(&full.tensors()?)?;
        let state = full_opt.export(full.params())?;
        let mut mine = HashMap::new();
        for (i, sp) in model.params().iter().enumerate() {
            let name = &sp.param.name;
            for key in [format!("exp_avg.{name}"), format!("exp_avg_sq.{name}")] {
                let t = state
                    .get(&key)
                    .ok_or_else(|| unsupported(format!("no optimizer state `{key}`")))?;
                mine.insert(key, model.slice_of(i, t)?);
            }
            let key = format!("step.{name}");
            let s = state
                .get(&key)
                .ok_or_else(|| unsupported(format!("no optimizer state `{key}`")))?;
            mine.insert(key, s.clone());
        }
        let opt = AdamW::import(
            Trainable::params(&model),
            mine,
            cfg.adamw,
            Path::new("<optimizer state sliced for this rank>"),
        )?;
        Ok(TpParallelTrainer {
            mesh,
            model,
            opt,
            cfg,
            step,
            run,
            log: None,
            full: None,
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

    /// One optimizer step over the step's micro-batches (identical on every rank): equal to
    /// [`zaya::train::trainer::Trainer::step`] on the same micro-batches up to the order of
    /// floating-point sums.
    pub fn step(&mut self, micro_batches: &[Batch]) -> ParallelResult<StepReport> {
        let start = Instant::now();
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
        let opts = self.cfg.train_options();
        let scale = LossScale {
            normalizer: Some(total as f64),
            aux_weight: 1.0 / micro_batches.len() as f64,
        };
        let n = self.model.params().len();
        let mut acc: Vec<Option<Tensor>> = vec![None; n];
        let mut routing: Vec<LayerRoutingStats> = Vec::new();
        let (mut loss, mut aux) = (0f64, 0f64);
        for (_, mb) in micro_batches
            .iter()
            .enumerate()
            .filter(|(k, _)| k % shape.dp == c.dp)
        {
            let out = self.model.forward_backward(mb, &opts, &scale)?;
            for (a, g) in acc.iter_mut().zip(out.grads) {
                if let Some(g) = g {
                    *a = Some(match a.take() {
                        Some(old) => (old + g)?,
                        None => g,
                    });
                }
            }
            loss += out.loss;
            aux += out.aux_loss * scale.aux_weight;
            if routing.is_empty() {
                routing = out.routing;
            } else {
                for (a, b) in routing.iter_mut().zip(&out.routing) {
                    a.merge(b)?;
                }
            }
        }
        self.model.complete_shared(&mut acc)?;

        // gradients (and which exist) summed over the replicas
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
        // loss (2), aux (2), routing counts per layer
        let cfg = self.model.config();
        let (nl, e1) = (cfg.num_hidden_layers, cfg.num_experts + 1);
        let mut buf = vec![0f32; 4 + nl * e1];
        buf[..2].copy_from_slice(&split_f64(loss));
        buf[2..4].copy_from_slice(&split_f64(aux));
        for (l, st) in routing.iter().enumerate().take(nl) {
            for (e, &k) in st.counts.iter().enumerate().take(e1) {
                buf[4 + l * e1 + e] = k as f32;
            }
        }
        if shape.dp > 1 {
            let dp = self.mesh.dp.as_ref();
            grads = crate::grad::all_reduce_sum(dp, &grads, BUCKET_ELEMS)?;
            dp.all_reduce_sum(&mut has)?;
            dp.all_reduce_sum(&mut buf)?;
        }
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
        let mut grads: Vec<Option<Tensor>> = grads
            .into_iter()
            .zip(&has)
            .map(|(g, &h)| (h > 0.0).then_some(g))
            .collect();
        let norm = self.model.global_grad_norm(&grads)?;
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
        self.opt
            .step(Trainable::params(&self.model), &Gradients { grads }, lr)?;
        self.step += 1;
        if self.cfg.balance_bias_lr > 0.0 {
            Trainable::apply_bias_balancing(&mut self.model, &routing, self.cfg.balance_bias_lr)?;
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

    /// Collective: the full model and the full AdamW state on world rank 0 (`None`
    /// elsewhere), as the single-process trainer holds them.
    pub fn gather(&self) -> ParallelResult<Option<(TrainableModel, AdamW)>> {
        let weights = self.model.gather_weights()?;
        let params = Trainable::params(&self.model);
        let state = self.opt.export(params)?;
        let pick = |prefix: &str| -> ParallelResult<Vec<Tensor>> {
            params
                .iter()
                .map(|p| {
                    state
                        .get(&format!("{prefix}.{}", p.name))
                        .cloned()
                        .ok_or_else(|| unsupported(format!("no optimizer state for `{}`", p.name)))
                })
                .collect()
        };
        let m = self.model.gather_full(&pick("exp_avg")?)?;
        let v = self.model.gather_full(&pick("exp_avg_sq")?)?;
        // step counts as tensors of each slice's shape: every element of the model is owned
        // by one rank, so the gathered tensor holds the count everywhere
        let steps: Vec<Tensor> = params
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let s = self.opt.steps(i) as f32;
                Ok(Tensor::full(s, p.var.shape(), &Device::Cpu)?)
            })
            .collect::<ParallelResult<_>>()?;
        let s = self.model.gather_full(&steps)?;
        let (Some(weights), Some(m), Some(v), Some(s)) = (weights, m, v, s) else {
            return Ok(None);
        };
        let cfg = self.model.config().clone();
        let full = TrainableModel::from_tensors(&cfg, &weights)?;
        let dev = Device::Cpu;
        let mut moments = HashMap::new();
        for p in full.params() {
            let name = &p.name;
            let (Some(mt), Some(vt), Some(st)) = (m.get(name), v.get(name), s.get(name)) else {
                // a tensor no rank trains (no elements): a fresh state
                moments.insert(format!("exp_avg.{name}"), p.var.zeros_like()?);
                moments.insert(format!("exp_avg_sq.{name}"), p.var.zeros_like()?);
                moments.insert(
                    format!("step.{name}"),
                    Tensor::new(&[self.step as i64], &dev)?,
                );
                continue;
            };
            let step = st
                .flatten_all()?
                .to_vec1::<f32>()?
                .first()
                .copied()
                .unwrap_or(0.0);
            moments.insert(format!("exp_avg.{name}"), mt.clone());
            moments.insert(format!("exp_avg_sq.{name}"), vt.clone());
            moments.insert(format!("step.{name}"), Tensor::new(&[step as i64], &dev)?);
        }
        let opt = AdamW::import(
            full.params(),
            moments,
            self.cfg.adamw,
            Path::new("<optimizer state gathered from the ranks>"),
        )?;
        Ok(Some((full, opt)))
    }

    /// Collective: writes `root/step-NNNNNNNN/` as the single-process trainer does (rank 0,
    /// full tensors under their HF names); returns the directory on rank 0.
    pub fn save(&mut self, root: &Path) -> ParallelResult<Option<PathBuf>> {
        let out = match self.gather()? {
            Some((full, opt)) => {
                let dir =
                    write_checkpoint(root, &full, &opt, &self.cfg, self.step, self.run.as_ref())?;
                self.full = Some(full);
                Some(dir)
            }
            None => None,
        };
        // nobody reads a checkpoint before rank 0 has written it
        self.mesh.world.barrier()?;
        Ok(out)
    }

    /// Rank 0 after [`TpParallelTrainer::save`]: the gathered single-process model.
    pub fn gathered_model(&self) -> Option<&TrainableModel> {
        self.full.as_ref()
    }
}
