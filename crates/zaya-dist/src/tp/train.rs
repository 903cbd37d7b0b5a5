//! Training one TP × EP rank: its slices of the weights as `Var`s, a forward whose graph
//! runs through the collectives of [`crate::autograd`], a vocab-parallel cross-entropy
//! (no rank ever holds a full row of logits), per-layer gradient checkpointing as in
//! [`zaya::train::checkpointing`], and the gathering of every gradient to its full tensor.
//!
//! Where the gradients of the parameters a rank holds come out:
//! - sharded (query heads, `o_proj` columns, expert slices, vocabulary rows): this rank's
//!   part, complete;
//! - replicated over the whole group (norms, router, residual scales, input scale/bias):
//!   complete and bit-identical on every rank (the replicated activations carry whole
//!   gradients: every `copy` all-reduces its backward);
//! - a KV head shared by several TP ranks (when `tp > num_key_value_heads`: its `k_proj`
//!   rows, conv channels, `temp`, value rows): each holder has the part that flows from
//!   its own query heads; the full gradient is the sum over the holders.
//!
//! [`TpTrainModel::gather`] assembles full tensors by exactly these rules.
//!
//! The router balance loss is computed on every rank over the whole batch (the router is
//! replicated and every rank sees every token), so nothing is summed for it.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::Arc;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var, D};

use zaya::train::aux_loss::{layer_balance_loss, LayerRoutingStats};
use zaya::train::{
    accumulate, boundary_grads, boundary_leaves, seeded, segment_seed, Batch, Checkpointing,
    LossScale, Param, Targets, TrainOptions,
};
use zaya::weights::{native_specs, Checkpoint};
use zaya::ForwardOptions;

use super::{Colls, TpModel};
use crate::autograd::{shared, Coll, SharedComm};
use crate::comm::Comm;
use crate::error::{ParallelError, ParallelResult};
use crate::mesh::Coords;
use crate::plan::{ParallelPlan, Selection};
use crate::tp::Groups;

/// Gradients of a stage's input boundary (`None` on the first stage).
pub use zaya::train::BoundaryGrads;

/// One trainable slice.
#[derive(Debug, Clone)]
pub struct ShardParam {
    /// HF name, `Var` (this rank's slice) and weight-decay flag.
    pub param: Param,
    /// Which part of the full tensor this is.
    pub selection: Selection,
    /// Shape of the full tensor.
    pub full_shape: Vec<usize>,
    spec: zaya::weights::TensorSpec,
}

/// Result of [`TpTrainModel::forward_backward`]: as [`zaya::train::BackwardOutput`], with
/// this rank's gradients aligned with [`TpTrainModel::params`].
#[derive(Debug, Clone)]
pub struct TpBackward {
    pub loss: f64,
    pub aux_loss: f64,
    pub targets: usize,
    pub routing: Vec<LayerRoutingStats>,
    pub grads: Vec<Option<Tensor>>,
}

/// One rank of a TP × EP mesh, trainable (f32 master weights of its slices).
pub struct TpTrainModel {
    model: TpModel,
    params: Vec<ShardParam>,
    /// The same parameters as the optimizer sees them.
    plain: Vec<Param>,
    /// Every tensor the rank reads, by HF name (the parameters' `Var`s and the buffers).
    tensors: HashMap<String, Tensor>,
    ckpt: Arc<Checkpoint>,
    tp: SharedComm,
    ep: SharedComm,
    /// The whole mesh (gradient norm, saving), when given ([`TpTrainModel::with_world`]).
    world: Option<SharedComm>,
}

impl std::fmt::Debug for TpTrainModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TpTrainModel")
            .field("coords", &self.model.coords)
            .field("params", &self.params.len())
            .finish()
    }
}

fn is_expert(name: &str) -> bool {
    name.contains(".mlp.experts.")
}

/// Whether the rank at `c` sends its gradient of `name` (held with `sel`) to the gather:
/// one copy of each replicated value, every holder of a sharded or shared one.
/// (A tied embedding's lookup and head gradients are parts of one gradient: both sent.)
fn contributes(c: Coords, name: &str, sel: &Selection) -> bool {
    c.dp == 0 && (is_expert(name) || c.ep == 0) && (!sel.is_whole() || c.tp == 0)
}

/// Whether the rank at `c` holds the copy of `name` (held with `sel`) that counts among the
/// ranks of one data-parallel replica: replicated values on TP rank 0 (of EP rank 0 for
/// non-expert tensors), sharded or shared ones on every holder (a shared KV head's
/// duplicate elements masked, see `shared_mask`), a tied embedding on the first stage.
pub(crate) fn one_copy(c: Coords, name: &str, sel: &Selection) -> bool {
    contributes(Coords { dp: 0, ..c }, name, sel)
        && (c.pp == 0 || name != "model.embed_tokens.weight")
}

/// The trainable tensors the rank at `c` of `plan` holds, in module order, with its
/// selection of each (balancing biases and empty slices are buffers, not parameters).
pub(crate) fn held_params(
    plan: &ParallelPlan,
    c: Coords,
) -> Vec<(zaya::weights::TensorSpec, Selection)> {
    native_specs(&plan.cfg)
        .into_iter()
        .filter(|s| plan.holds(c, &s.name) && !s.name.ends_with(".balancing_biases"))
        .map(|s| {
            let sel = plan.selection(c, &s);
            (s, sel)
        })
        .filter(|(s, sel)| sel.shape(&s.shape).iter().product::<usize>() > 0)
        .collect()
}

/// Adds `local` (the selected part, row-major) into `full` (row-major `shape`).
fn add_selected(full: &mut [f32], shape: &[usize], ranges: &[Vec<Range<usize>>], local: &[f32]) {
    for_each_offset(shape, ranges, local.len(), |k, off| full[off] += local[k]);
}

/// Calls `f(k, offset)` for the first `count` elements of a selection, in row-major order:
/// `k` counts the selected elements, `offset` is the element's place in the full tensor.
fn for_each_offset(
    shape: &[usize],
    ranges: &[Vec<Range<usize>>],
    count: usize,
    mut f: impl FnMut(usize, usize),
) {
    let idx: Vec<Vec<usize>> = ranges
        .iter()
        .map(|rs| rs.iter().flat_map(|r| r.clone()).collect())
        .collect();
    let dims: Vec<usize> = idx.iter().map(Vec::len).collect();
    let mut strides = vec![1usize; shape.len()];
    for a in (0..shape.len().saturating_sub(1)).rev() {
        strides[a] = strides[a + 1] * shape[a + 1];
    }
    let mut pos = vec![0usize; dims.len()];
    for k in 0..count {
        let off: usize = pos
            .iter()
            .enumerate()
            .map(|(a, &p)| idx[a][p] * strides[a])
            .sum();
        f(k, off);
        for a in (0..pos.len()).rev() {
            pos[a] += 1;
            if pos[a] < dims[a] {
                break;
            }
            pos[a] = 0;
        }
    }
}

type Boundary = (Tensor, Option<Tensor>);

/// What a run over a segment of layers produced.
struct SegmentRun {
    hidden: Tensor,
    state: Option<Tensor>,
    normed: Option<Tensor>,
    aux_terms: Vec<Tensor>,
    aux_values: Vec<f64>,
    stats: Vec<LayerRoutingStats>,
}

/// A batch as tensors plus what every segment needs.
struct Prepared {
    ids: Vec<Vec<i64>>,
    ctx: zaya::model::ForwardContext,
    targets: Targets,
    real_host: Option<Vec<bool>>,
    real: Option<Tensor>,
    aux_weight: f64,
}

/// The vocab-parallel head's output.
struct HeadOutput {
    nll_sum: f64,
    grad_hidden: Option<Tensor>,
    grads: GradStore,
}

impl TpTrainModel {
    /// The parameters' variables, in [`TpTrainModel::params`] order.
    fn vars(&self) -> impl Iterator<Item = &Tensor> + '_ {
        self.params.iter().map(|sp| sp.param.var.as_tensor())
    }

    /// The rank at `coords` of `plan`, reading its slices of its stage into `Var`s (with
    /// `pp > 1` the stage runs through [`TpTrainModel::stage_batch`]; the pipeline schedule
    /// and the sums over data-parallel replicas are the caller's). Collective over `g.tp` and `g.ep` (each is duplicated
    /// for the graphs' backward passes).
    pub fn at(
        ckpt: &Arc<Checkpoint>,
        plan: &ParallelPlan,
        coords: Coords,
        g: Groups,
    ) -> ParallelResult<Self> {
        let m = plan.mesh;
        let fits = |c: &dyn Comm, size: usize, rank: usize| c.size() == size && c.rank() == rank;
        if !fits(g.tp, m.tp, coords.tp) || !fits(g.ep, m.ep, coords.ep) {
            return Err(ParallelError::Unsupported(format!(
                "groups tp {}/{}, ep {}/{} (rank/size) drive the rank at {coords:?} of {}",
                g.tp.rank(),
                g.tp.size(),
                g.ep.rank(),
                g.ep.size(),
                m.label()
            )));
        }
        let cfg = &plan.cfg;
        let dev = Device::Cpu;
        let mut params = Vec::new();
        let mut tensors = HashMap::new();
        let trained: std::collections::HashSet<String> = held_params(plan, coords)
            .into_iter()
            .map(|(s, _)| s.name)
            .collect();
        for spec in native_specs(cfg) {
            if !plan.holds(coords, &spec.name) {
                continue;
            }
            let sel = plan.selection(coords, &spec);
            let t =
                ckpt.load_selection(cfg, &spec.name, &sel.ranges(&spec.shape), DType::F32, &dev)?;
            if !trained.contains(&spec.name) {
                tensors.insert(spec.name.clone(), t);
                continue;
            }
            let var = Var::from_tensor(&t)?;
            tensors.insert(spec.name.clone(), var.as_tensor().clone());
            params.push(ShardParam {
                param: Param {
                    name: spec.name.clone(),
                    decay: spec.shape.len() >= 2,
                    var,
                },
                selection: sel,
                full_shape: spec.shape.clone(),
                spec: spec.clone(),
            });
        }
        let model = TpModel::build(ckpt, plan, coords, DType::F32, &dev, Some(&tensors))?;
        Ok(TpTrainModel {
            model,
            plain: params.iter().map(|p| p.param.clone()).collect(),
            params,
            tensors,
            ckpt: Arc::clone(ckpt),
            tp: shared(g.tp)?,
            ep: shared(g.ep)?,
            world: None,
        })
    }

    /// The rank of `mesh` ([`TpTrainModel::at`] with the mesh's world kept for the
    /// gradient norm and saving, as [`zaya::train::Trainable`] needs). Collective.
    pub fn on_mesh(
        ckpt: &Arc<Checkpoint>,
        plan: &ParallelPlan,
        mesh: &crate::mesh::Mesh,
    ) -> ParallelResult<Self> {
        let mut m = Self::at(ckpt, plan, mesh.coords, mesh.groups())?;
        m.world = Some(shared(mesh.world.as_ref())?);
        Ok(m)
    }

    /// The rank's model (reads the live `Var`s).
    pub fn model(&self) -> &TpModel {
        &self.model
    }

    /// This rank's trainable slices, in module order.
    pub fn params(&self) -> &[ShardParam] {
        &self.params
    }

    pub fn coords(&self) -> Coords {
        self.model.coords
    }

    /// The plan this rank was cut by.
    pub fn plan(&self) -> &ParallelPlan {
        &self.model.plan
    }

    /// Rebuilds the model from the tensors (after a buffer such as a balancing bias changed:
    /// the router keeps a host copy).
    pub fn set_tensor(&mut self, name: &str, value: &Tensor) -> ParallelResult<()> {
        let old = self.tensors.get(name).ok_or_else(|| {
            ParallelError::Unsupported(format!("this rank holds no tensor `{name}`"))
        })?;
        if old.dims() != value.dims() {
            return Err(ParallelError::Unsupported(format!(
                "`{name}` is {:?} on this rank, got {:?}",
                old.dims(),
                value.dims()
            )));
        }
        match self.params.iter().find(|p| p.param.name == name) {
            Some(p) => p.param.var.set(&value.to_dtype(DType::F32)?)?,
            None => {
                self.tensors
                    .insert(name.to_string(), value.to_dtype(DType::F32)?);
            }
        }
        self.model = TpModel::build(
            &self.ckpt,
            &self.model.plan,
            self.model.coords,
            DType::F32,
            &Device::Cpu,
            Some(&self.tensors),
        )?;
        Ok(())
    }

    fn colls(&self) -> Colls<'static> {
        Colls {
            tp: Coll::Grad(Arc::clone(&self.tp)),
            ep: Coll::Grad(Arc::clone(&self.ep)),
        }
    }

    fn prepare(
        &self,
        batch: &Batch,
        opts: &TrainOptions,
        aux_weight: f64,
    ) -> ParallelResult<Prepared> {
        let m = &self.model;
        let (b, t) = batch.shape()?;
        let dev = &m.device;
        let flat: Vec<u32> = batch.input_ids.iter().flatten().copied().collect();
        let ids_t = Tensor::from_vec(flat, (b, t), dev)?;
        let ids = zaya::model::check_input_ids(&m.cfg, &ids_t, 0)?;
        let mask = batch
            .attention_mask
            .as_ref()
            .map(|mk| {
                let flat: Vec<u32> = mk.iter().flatten().copied().collect();
                Tensor::from_vec(flat, (b, t), dev)
            })
            .transpose()?;
        // Packed rows: the context's masks and same-document table, as one rank builds them.
        let document_ids = batch
            .document_ids
            .as_ref()
            .map(|d| {
                let flat: Vec<u32> = d.iter().flatten().copied().collect();
                Tensor::from_vec(flat, (b, t), dev)
            })
            .transpose()?;
        let fopts = ForwardOptions {
            attention_mask: mask,
            document_ids,
            attn: opts.attn,
            ..Default::default()
        };
        let ctx = zaya::model::forward_context(
            &m.stage_cfg,
            &m.rotary,
            m.dtype,
            dev,
            b,
            t,
            None,
            &fopts,
        )?;
        let targets = Targets::from_labels(&batch.labels, m.cfg.vocab_size)?;
        let real_host: Option<Vec<bool>> = batch
            .attention_mask
            .as_ref()
            .map(|mk| mk.iter().flatten().map(|&x| x != 0).collect());
        let real = real_host
            .as_ref()
            .map(|r| {
                let v: Vec<f32> = r.iter().map(|&x| if x { 1.0 } else { 0.0 }).collect();
                Tensor::from_vec(v, b * t, dev)
            })
            .transpose()?;
        Ok(Prepared {
            ids,
            ctx,
            targets,
            real_host,
            real,
            aux_weight,
        })
    }

    fn run(
        &self,
        p: &Prepared,
        range: Range<usize>,
        input: Option<(&Tensor, Option<&Tensor>)>,
    ) -> ParallelResult<SegmentRun> {
        let m = &self.model;
        let colls = self.colls();
        let e = m.cfg.num_experts;
        let (mut h, mut state) = match input {
            None => {
                let inp = m.input.as_ref().ok_or_else(|| {
                    ParallelError::Unsupported("this stage has no embedding".into())
                })?;
                (m.embed(&colls.tp, inp, &p.ids)?, None)
            }
            Some((h, s)) => (h.clone(), s.cloned()),
        };
        let mut aux_terms = Vec::new();
        let mut aux_values = Vec::new();
        let mut stats = Vec::new();
        let end = range.end;
        for idx in range {
            let (next, routing, _) = m.layer_forward(
                &colls,
                idx,
                &h,
                state.as_ref(),
                &p.ctx,
                crate::tp::AttnCache::Batch(None),
                false,
            )?;
            let st = LayerRoutingStats::from_choice(&routing.choice, p.real_host.as_deref(), e)?;
            let probs = if p.aux_weight != 0.0 {
                routing.probs.clone()
            } else {
                routing.probs.detach()
            };
            let l = layer_balance_loss(&probs, &st, p.real.as_ref())?;
            aux_values.push(f64::from(l.to_scalar::<f32>()?));
            if p.aux_weight != 0.0 {
                aux_terms.push((l * p.aux_weight)?);
            }
            stats.push(st);
            h = next;
            state = Some(routing.state);
        }
        let normed = match (&m.output, end == m.layers.len()) {
            (Some(out), true) => Some(zaya::kernels::rms_norm(
                &h.to_dtype(m.dtype)?,
                &out.norm,
                m.cfg.rms_norm_eps,
            )?),
            _ => None,
        };
        Ok(SegmentRun {
            hidden: h,
            state,
            normed,
            aux_terms,
            aux_values,
            stats,
        })
    }

    /// Vocab-parallel cross-entropy over the counted targets, `chunk` at a time, with its
    /// backward written out (Megatron's `_VocabParallelCrossEntropy`): the row maximum is
    /// the maximum of the ranks' maxima, `Σ exp` and the target's logit are all-reduced,
    /// `d logits = softmax − onehot` stays on the rank (its vocabulary slice), and the
    /// hidden state's gradient (partial: this slice's share) is all-reduced once.
    fn vocab_parallel_head(
        &self,
        hidden: &Tensor,
        targets: &Targets,
        normalizer: f64,
        chunk: usize,
        backward: bool,
    ) -> ParallelResult<HeadOutput> {
        let m = &self.model;
        let tp = self.tp.as_ref();
        let out = m
            .output
            .as_ref()
            .ok_or_else(|| ParallelError::Unsupported("this stage has no lm_head".into()))?;
        let w_var = out.lm_head.dense_weight().ok_or_else(|| {
            ParallelError::Unsupported("a quantized lm_head cannot be trained".into())
        })?;
        let w = w_var.detach();
        let bias = out.lm_head.bias.as_ref();
        let (b, t, h) = hidden.dims3()?;
        let dev = hidden.device();
        let per = w.dim(0)?;
        let start = m.vocab_start;
        let flat = hidden.detach().reshape((b * t, h))?;
        let mut grad_flat = Tensor::zeros((b * t, h), DType::F32, dev)?;
        let mut gw = Tensor::zeros(w.shape(), DType::F32, dev)?;
        let mut gb = bias
            .map(|b| Tensor::zeros(b.shape(), DType::F32, dev))
            .transpose()?;
        let mut nll_sum = 0f64;
        for c0 in (0..targets.len()).step_by(chunk) {
            let n = chunk.min(targets.len() - c0);
            let rows = Tensor::new(&targets.rows[c0..c0 + n], dev)?;
            let y = flat.index_select(&rows, 0)?;
            let mut logits = y.matmul(&w.t()?)?;
            if let Some(bias) = bias {
                logits = logits.broadcast_add(&bias.detach())?;
            }
            let logits = logits.to_dtype(DType::F32)?;
            // global row maximum (a constant: it cancels in the value and the gradient)
            let local_max: Vec<f32> = logits.max(D::Minus1)?.to_vec1()?;
            let all = tp.all_gather(&local_max)?;
            let gmax: Vec<f32> = (0..n)
                .map(|i| {
                    (0..tp.size())
                        .map(|r| all[r * n + i])
                        .fold(f32::NEG_INFINITY, f32::max)
                })
                .collect();
            let shifted = logits.broadcast_sub(&Tensor::from_vec(gmax, (n, 1), dev)?)?;
            let exp = shifted.exp()?;
            let mut sums: Vec<f32> = exp.sum(D::Minus1)?.to_vec1()?;
            tp.all_reduce_sum(&mut sums)?;
            // the target's shifted logit, from the rank that holds it
            let sh: Vec<f32> = shifted.flatten_all()?.to_vec1()?;
            let mut picked = vec![0f32; n];
            let mut onehot = vec![0f32; n * per];
            for (i, &id) in targets.ids[c0..c0 + n].iter().enumerate() {
                let id = id as usize;
                if id >= start && id < start + per {
                    picked[i] = sh[i * per + id - start];
                    onehot[i * per + id - start] = 1.0;
                }
            }
            tp.all_reduce_sum(&mut picked)?;
            let nll: f32 = sums.iter().zip(&picked).map(|(s, p)| s.ln() - p).sum();
            nll_sum += f64::from(nll);
            if backward {
                let sums_t = Tensor::from_vec(sums, (n, 1), dev)?;
                let onehot = Tensor::from_vec(onehot, (n, per), dev)?;
                let d = ((exp.broadcast_div(&sums_t)? - onehot)? / normalizer)?;
                gw = (gw + d.t()?.matmul(&y)?)?;
                if let Some(gb) = gb.as_mut() {
                    *gb = (&*gb + d.sum(0)?)?;
                }
                grad_flat = grad_flat.index_add(&rows, &d.matmul(&w)?, 0)?;
            }
        }
        let mut grads = GradStore::default();
        let grad_hidden = if backward {
            grads.insert(w_var, gw);
            if let (Some(bias), Some(gb)) = (bias, gb) {
                grads.insert(bias, gb);
            }
            // the hidden state is replicated: the slices' shares sum to its gradient
            let mut g = grad_flat.flatten_all()?.to_vec1::<f32>()?;
            tp.all_reduce_sum(&mut g)?;
            Some(Tensor::from_vec(g, (b, t, h), dev)?.to_dtype(hidden.dtype())?)
        } else {
            None
        };
        Ok(HeadOutput {
            nll_sum,
            grad_hidden,
            grads,
        })
    }
    /// A micro-batch prepared for this rank's stage (see [`TpStageBatch`]). Each layer's
    /// balance loss enters the objective with weight `aux_loss_coef · scale.aux_weight /
    /// num_hidden_layers` (the whole model's layer count, whatever stage runs it).
    pub fn stage_batch(
        &self,
        batch: &Batch,
        opts: &TrainOptions,
        scale: &LossScale,
    ) -> ParallelResult<TpStageBatch<'_>> {
        opts.validate()?;
        let num_layers = self.model.cfg.num_hidden_layers;
        let aux_weight = opts.aux_loss_coef * scale.aux_weight / num_layers.max(1) as f64;
        Ok(TpStageBatch {
            model: self,
            p: self.prepare(batch, opts, aux_weight)?,
        })
    }

    /// Loss and this rank's gradients for `batch` (every rank of the mesh calls it with the
    /// same batch): `nll_sum / normalizer + aux_loss_coef · aux_weight · aux`, as
    /// [`zaya::train::TrainableModel::forward_backward`]. One pipeline stage only.
    pub fn forward_backward(
        &self,
        batch: &Batch,
        opts: &TrainOptions,
        scale: &LossScale,
    ) -> ParallelResult<TpBackward> {
        if self.model.plan.mesh.pp != 1 {
            return Err(ParallelError::Unsupported(
                "a pipeline stage runs its part of a step through TpTrainModel::stage_batch".into(),
            ));
        }
        let sb = self.stage_batch(batch, opts, scale)?;
        let normalizer = match scale.normalizer {
            Some(n) => n,
            None if sb.p.targets.is_empty() => {
                return Err(ParallelError::Unsupported(
                    "the batch has no counted label (every target is -100)".into(),
                ))
            }
            None => sb.p.targets.len() as f64,
        };
        let fwd = sb.forward(TpStageInput::Embed, opts.checkpointing)?;
        let head = sb.head(&fwd, normalizer, opts.loss_chunk)?;
        let stats = fwd.stats.clone();
        let aux_values = fwd.aux_values.clone();
        let (grads, _) = sb.backward(fwd, TpStageUpstream::Normed(head.grad_hidden), head.grads)?;
        let num = aux_values.len().max(1) as f64;
        Ok(TpBackward {
            loss: head.nll_sum / normalizer,
            aux_loss: aux_values.iter().sum::<f64>() / num,
            targets: sb.p.targets.len(),
            routing: stats,
            grads,
        })
    }
    /// Mean NLL over the counted targets, without gradients.
    pub fn evaluate(&self, batch: &Batch, opts: &TrainOptions) -> ParallelResult<f64> {
        opts.validate()?;
        let p = self.prepare(batch, opts, 0.0)?;
        if p.targets.is_empty() {
            return Err(ParallelError::Unsupported(
                "the batch has no counted label (every target is -100)".into(),
            ));
        }
        let mut carry: Option<Boundary> = None;
        let mut normed = None;
        for seg in Checkpointing::EveryLayer.segments(self.model.layers.len())? {
            let run = self.run(&p, seg, carry.as_ref().map(|(h, s)| (h, s.as_ref())))?;
            normed = run.normed.map(|n| n.detach());
            carry = Some((run.hidden.detach(), run.state.map(|s| s.detach())));
        }
        let normed =
            normed.ok_or_else(|| ParallelError::Unsupported("the model has no layers".into()))?;
        let head = self.vocab_parallel_head(&normed, &p.targets, 1.0, opts.loss_chunk, false)?;
        Ok(head.nll_sum / p.targets.len() as f64)
    }

    /// Every parameter's full gradient, by HF name, on world rank 0 (`None` elsewhere).
    /// Collective over `world` (the whole mesh, every rank passing its own `grads`,
    /// aligned with [`TpTrainModel::params`]; a missing gradient counts as zero).
    pub fn gather(
        &self,
        world: &dyn Comm,
        grads: &[Option<Tensor>],
    ) -> ParallelResult<Option<BTreeMap<String, Tensor>>> {
        self.gather_by(world, grads, &contributes)
    }

    /// [`TpTrainModel::gather`] where `pick(coords, name, selection)` says which ranks send
    /// their values of a tensor (evaluated by every rank for itself and by rank 0 for all):
    /// rank 0 adds up what the picked ranks send, element by element.
    pub(crate) fn gather_by(
        &self,
        world: &dyn Comm,
        grads: &[Option<Tensor>],
        pick: &dyn Fn(Coords, &str, &Selection) -> bool,
    ) -> ParallelResult<Option<BTreeMap<String, Tensor>>> {
        let plan = &self.model.plan;
        if grads.len() != self.params.len() {
            return Err(ParallelError::Unsupported(format!(
                "{} gradients for {} parameters",
                grads.len(),
                self.params.len()
            )));
        }
        let c = self.model.coords;
        let mut buf = Vec::new();
        for (sp, g) in self.params.iter().zip(grads) {
            if !pick(c, &sp.param.name, &sp.selection) {
                continue;
            }
            match g {
                Some(g) => buf.extend(g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?),
                None => buf.extend(std::iter::repeat_n(0f32, sp.param.var.elem_count())),
            }
        }
        let mut send = vec![Vec::new(); world.size()];
        send[0] = buf;
        let got = world.all_to_all_v(&send)?;
        if world.rank() != 0 {
            return Ok(None);
        }
        let cfg = &plan.cfg;
        let specs: Vec<_> = native_specs(cfg)
            .into_iter()
            .filter(|s| !s.name.ends_with(".balancing_biases"))
            .collect();
        let mut full: BTreeMap<String, Vec<f32>> = specs
            .iter()
            .map(|s| (s.name.clone(), vec![0f32; s.shape.iter().product()]))
            .collect();
        for (r, data) in got.iter().enumerate() {
            let rc = plan.mesh.coords(r);
            let mut at = 0;
            for s in &specs {
                if !plan.holds(rc, &s.name) {
                    continue;
                }
                let sel = plan.selection(rc, s);
                let k: usize = sel.shape(&s.shape).iter().product();
                if k == 0 || !pick(rc, &s.name, &sel) {
                    continue;
                }
                if at + k > data.len() {
                    return Err(ParallelError::Unsupported(format!(
                        "rank {r} sent {} gradient values, fewer than its slices need",
                        data.len()
                    )));
                }
                let dst = full.get_mut(&s.name).expect("every spec has a buffer");
                add_selected(dst, &s.shape, &sel.ranges(&s.shape), &data[at..at + k]);
                at += k;
            }
            if at != data.len() {
                return Err(ParallelError::Unsupported(format!(
                    "rank {r} sent {} gradient values, its slices need {at}",
                    data.len()
                )));
            }
        }
        let dev = Device::Cpu;
        Ok(Some(
            specs
                .iter()
                .map(|s| {
                    let v = full.remove(&s.name).expect("buffer");
                    Ok((s.name.clone(), Tensor::from_vec(v, s.shape.clone(), &dev)?))
                })
                .collect::<ParallelResult<_>>()?,
        ))
    }
}

/// What this rank's layer range starts from.
#[derive(Debug, Clone)]
pub enum TpStageInput {
    /// The token embedding (the first stage).
    Embed,
    /// The residual stream `[B, T, H]` and router state `[B, T, R]` from the stage before
    /// (detached, the same on every rank of the TP group; the state is absent only before
    /// layer 0).
    Boundary {
        hidden: Tensor,
        state: Option<Tensor>,
    },
}

/// The gradient arriving at the end of this rank's layer range.
#[derive(Debug, Clone)]
pub enum TpStageUpstream {
    /// The range ends with the last layer and the head ran: `d loss / d final-norm output`
    /// (whole, the same on every rank of the TP group).
    Normed(Option<Tensor>),
    /// `d loss / d (hidden, router state)` at the range's output, from the stage after (the
    /// same on every rank of the TP group).
    Boundary {
        hidden: Tensor,
        state: Option<Tensor>,
    },
}

/// The head's result on the last stage.
pub struct TpHeadOutput {
    /// Σ −log p(target) over the counted targets (the same on every rank).
    pub nll_sum: f64,
    /// `d(nll_sum / normalizer) / d final-norm output`, whole on every rank.
    pub grad_hidden: Option<Tensor>,
    /// This rank's lm_head slice gradients (the embedding slice when tied).
    pub grads: GradStore,
}

/// A micro-batch prepared once for a TP rank's stage: [`TpStageBatch::forward`] runs the
/// stage's layers from the embedding or a boundary, [`TpStageBatch::head`] the
/// vocab-parallel cross-entropy on the last stage, [`TpStageBatch::backward`] the layers'
/// backward from the upstream gradient. Every rank of the TP × EP group calls each of them
/// in the same order (their collectives pair up); the pipeline schedule (1F1B) may hold
/// several micro-batches' forwards before their backwards.
pub struct TpStageBatch<'m> {
    model: &'m TpTrainModel,
    p: Prepared,
}

/// A stage run forward: the detached input of every checkpointing segment, and the last
/// segment's graph (needed first by the backward).
pub struct TpStageForward {
    segments: Vec<Range<usize>>,
    inputs: Vec<Option<Boundary>>,
    last_inputs: Option<(Var, Option<Var>)>,
    last: SegmentRun,
    /// Routing counts of the stage's layers (over the whole batch: every rank has them).
    pub stats: Vec<LayerRoutingStats>,
    /// Balance-loss values (unweighted) of the stage's layers.
    pub aux_values: Vec<f64>,
}

impl TpStageForward {
    /// The stage's output (residual stream, router state), detached: what the next stage
    /// receives.
    pub fn output(&self) -> Boundary {
        (
            self.last.hidden.detach(),
            self.last.state.as_ref().map(Tensor::detach),
        )
    }

    /// The final-norm output (with its graph) on the last stage.
    pub fn normed(&self) -> Option<&Tensor> {
        self.last.normed.as_ref()
    }
}

fn as_input(v: &Option<(Var, Option<Var>)>) -> Option<(&Tensor, Option<&Tensor>)> {
    v.as_ref()
        .map(|(h, s)| (h.as_tensor(), s.as_ref().map(|s| s.as_tensor())))
}

impl TpStageBatch<'_> {
    /// The counted targets of the batch (after the causal shift).
    pub fn targets(&self) -> &Targets {
        &self.p.targets
    }

    /// Runs this rank's layers from `input`; with checkpointing only the segment
    /// boundaries are kept for all but the last segment.
    pub fn forward(
        &self,
        input: TpStageInput,
        checkpointing: Checkpointing,
    ) -> ParallelResult<TpStageForward> {
        let m = self.model;
        let first = m.model.input.is_some();
        if matches!(input, TpStageInput::Embed) != first {
            return Err(ParallelError::Unsupported(
                "the embedding is the input of the first stage and only of it".into(),
            ));
        }
        let segments = checkpointing.segments(m.model.layers.len())?;
        let last = segments.len() - 1;
        let mut stats = Vec::new();
        let mut aux_values = Vec::new();
        let mut inputs: Vec<Option<Boundary>> = Vec::with_capacity(last + 1);
        inputs.push(match input {
            TpStageInput::Embed => None,
            TpStageInput::Boundary { hidden, state } => Some((hidden, state)),
        });
        for seg in &segments[..last] {
            let inp = inputs.last().expect("one input per segment").as_ref();
            let run = m.run(&self.p, seg.clone(), inp.map(|(h, s)| (h, s.as_ref())))?;
            stats.extend(run.stats);
            aux_values.extend(run.aux_values);
            inputs.push(Some((run.hidden.detach(), run.state.map(|s| s.detach()))));
        }
        let last_inputs = boundary_leaves(inputs.pop().expect("one input per segment").as_ref())?;
        let run = m.run(&self.p, segments[last].clone(), as_input(&last_inputs))?;
        stats.extend(run.stats.iter().cloned());
        aux_values.extend(run.aux_values.iter().copied());
        Ok(TpStageForward {
            segments,
            inputs,
            last_inputs,
            last: run,
            stats,
            aux_values,
        })
    }

    /// The vocab-parallel cross-entropy on the last stage: `nll_sum / normalizer`, its
    /// gradient with respect to the final-norm output and this rank's head gradients.
    pub fn head(
        &self,
        fwd: &TpStageForward,
        normalizer: f64,
        chunk: usize,
    ) -> ParallelResult<TpHeadOutput> {
        let normed = fwd.normed().ok_or_else(|| {
            ParallelError::Unsupported("the head runs after the last layer only".into())
        })?;
        let h = self
            .model
            .vocab_parallel_head(normed, &self.p.targets, normalizer, chunk, true)?;
        Ok(TpHeadOutput {
            nll_sum: h.nll_sum,
            grad_hidden: h.grad_hidden,
            grads: h.grads,
        })
    }

    /// The backward of [`TpStageBatch::forward`], last segment first, seeded with
    /// `upstream`; parameter gradients are added to `acc` (the head's). Returns this rank's
    /// gradients (aligned with [`TpTrainModel::params`]; shared KV heads hold each holder's
    /// part, see the module docs) and the gradients of the stage's input boundary (`None`
    /// on the first stage), whole on every rank of the TP group.
    pub fn backward(
        &self,
        fwd: TpStageForward,
        upstream: TpStageUpstream,
        mut acc: GradStore,
    ) -> ParallelResult<(Vec<Option<Tensor>>, BoundaryGrads)> {
        let m = self.model;
        let TpStageForward {
            segments,
            inputs,
            last_inputs,
            last: run,
            ..
        } = fwd;
        let dev = &m.model.device;
        let mut outputs = Vec::with_capacity(2);
        match &upstream {
            TpStageUpstream::Normed(Some(g)) => {
                let normed = run.normed.as_ref().ok_or_else(|| {
                    ParallelError::Unsupported(
                        "a head gradient for a stage without the final norm".into(),
                    )
                })?;
                outputs.push((normed, g));
            }
            TpStageUpstream::Normed(None) => {}
            TpStageUpstream::Boundary { hidden, state } => {
                outputs.push((&run.hidden, hidden));
                if let (Some(s), Some(g)) = (&run.state, state) {
                    outputs.push((s, g));
                }
            }
        }
        let seed = segment_seed(dev, &outputs, &run.aux_terms)?;
        drop(outputs);
        // the run's tensors are the graph's: let go of them so the backward frees each
        // activation once it is done with it
        drop(run);
        // the head's gradients are where the backward starts (a tied embedding's rows are
        // added into them in place), as in the single-process backward
        let start = seeded(&mut acc, m.vars());
        let gs = seed.backward_releasing_from(start, &mut |_, g| Ok(Some(g)))?;
        accumulate(&mut acc, m.vars(), &gs)?;
        let mut upstream = boundary_grads(&gs, last_inputs.as_ref())?;
        drop((gs, last_inputs));
        for i in (0..segments.len() - 1).rev() {
            let vars = boundary_leaves(inputs[i].as_ref())?;
            let run = m.run(&self.p, segments[i].clone(), as_input(&vars))?;
            let (g_h, g_s) = upstream.take().ok_or_else(|| {
                ParallelError::Unsupported(
                    "checkpointing: no gradient reached a segment boundary".into(),
                )
            })?;
            let mut outputs = vec![(&run.hidden, &g_h)];
            if let (Some(s), Some(g)) = (&run.state, &g_s) {
                outputs.push((s, g));
            }
            let seed = segment_seed(dev, &outputs, &run.aux_terms)?;
            drop(outputs);
            drop(run);
            let start = seeded(&mut acc, m.vars());
            let gs = seed.backward_releasing_from(start, &mut |_, g| Ok(Some(g)))?;
            accumulate(&mut acc, m.vars(), &gs)?;
            upstream = boundary_grads(&gs, vars.as_ref())?;
        }
        let grads = m
            .params
            .iter()
            .map(|sp| acc.get(sp.param.var.as_tensor()).map(Tensor::detach))
            .collect();
        Ok((grads, upstream))
    }
}

/// `loss`, `aux_loss` and `grad.<HF name>` of every parameter for a labelled batch on
/// `shape.world()` local ranks (threads), as the single-rank
/// [`zaya::train::labelled_outputs`]: cross-entropy only (the balance loss reported).
pub fn labelled_grads_on_local_ranks(
    dir: &std::path::Path,
    shape: crate::mesh::MeshShape,
    batch: &Batch,
    checkpointing: Checkpointing,
    timeout: std::time::Duration,
) -> ParallelResult<BTreeMap<String, Tensor>> {
    let ckpt = Arc::new(Checkpoint::open(dir)?);
    let cfg = ckpt.config()?;
    ckpt.validate(&cfg)?;
    let plan = ParallelPlan::new(&cfg, shape)?;
    let world = crate::local::LocalWorld::new(shape.world(), timeout)?;
    let outs = world.run(|comm| {
        let mesh = crate::mesh::Mesh::new(Box::new(comm), shape)?;
        labelled_grads_on_mesh(&ckpt, &plan, &mesh, batch, checkpointing)
    });
    super::first_of(outs)?
        .ok_or_else(|| ParallelError::Unsupported("rank 0 gathered nothing".into()))
}

/// One rank's part of [`labelled_grads_on_local_ranks`] on any backend (MPI processes):
/// world rank 0 returns the outputs, the others `None`.
pub fn labelled_grads_on_mesh(
    ckpt: &Arc<Checkpoint>,
    plan: &ParallelPlan,
    mesh: &crate::mesh::Mesh,
    batch: &Batch,
    checkpointing: Checkpointing,
) -> ParallelResult<Option<BTreeMap<String, Tensor>>> {
    let model = TpTrainModel::at(ckpt, plan, mesh.coords, mesh.groups())?;
    let opts = TrainOptions {
        checkpointing,
        aux_loss_coef: 0.0,
        ..Default::default()
    };
    let r = if plan.mesh.pp == 1 {
        model.forward_backward(batch, &opts, &LossScale::default())?
    } else {
        // pipeline stages: the training driver's 1F1B over this stage; the loss comes from
        // the last stage, the balance-loss shares from every stage (one rank per TP × EP
        // group); `gather` sums the tied embedding's halves and shared KV heads' parts
        let scale = LossScale {
            normalizer: Some(batch.num_targets() as f64),
            aux_weight: 1.0,
        };
        let s = crate::tp_driver::run_1f1b(
            &model,
            mesh.pp.as_ref(),
            std::slice::from_ref(batch),
            &opts,
            &scale,
        )?;
        let c = mesh.coords;
        let mut buf = [0f32; 4];
        if c.tp == 0 && c.ep == 0 && c.dp == 0 {
            buf[..2].copy_from_slice(&crate::train_driver::split_f64(s.loss));
            buf[2..].copy_from_slice(&crate::train_driver::split_f64(s.aux));
        }
        mesh.world.all_reduce_sum(&mut buf)?;
        TpBackward {
            loss: crate::train_driver::join_f64(&buf[..2]),
            aux_loss: crate::train_driver::join_f64(&buf[2..]),
            targets: batch.num_targets(),
            routing: s.routing,
            grads: s.grads,
        }
    };
    let full = model.gather(mesh.world.as_ref(), &r.grads)?;
    Ok(full.map(|g| {
        let dev = Device::Cpu;
        let mut out: BTreeMap<String, Tensor> = g
            .into_iter()
            .map(|(k, v)| (format!("grad.{k}"), v))
            .collect();
        out.insert(
            "loss".into(),
            Tensor::new(&[r.loss as f32], &dev).expect("scalar"),
        );
        out.insert(
            "aux_loss".into(),
            Tensor::new(&[r.aux_loss as f32], &dev).expect("scalar"),
        );
        out
    }))
}

mod trainable;
pub(crate) use trainable::{SliceSet, Streamed};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::single_range_in_vec_init)]
    fn add_selected_places_blocks() {
        // [3, 4], rows 0..1 and 2..3, columns 1..3
        let mut full = vec![0f32; 12];
        add_selected(
            &mut full,
            &[3, 4],
            &[vec![0..1, 2..3], vec![1..3]],
            &[1., 2., 3., 4.],
        );
        assert_eq!(full, vec![0., 1., 2., 0., 0., 0., 0., 0., 0., 3., 4., 0.]);
    }
}
