//! [`Trainable`] for a TP × EP rank, so [`zaya::train::trainer::Trainer`] trains it: every
//! rank runs its own trainer on its slices (AdamW is elementwise, so slices of the
//! single-process update are exactly the sharded updates) once the rank's gradients are
//! whole for every element it holds and the clipping norm is the norm over the mesh.
//!
//! - Gradients of a KV head shared by several TP ranks are summed over its holders
//!   ([`TpTrainModel::forward_backward`] returns each holder's part).
//! - The gradient norm counts every element once: a replicated tensor on TP rank 0 of EP
//!   rank 0, a shared KV head on its first holder, summed over the world.
//! - The balancing-bias rule runs on every rank from the same (replicated) routing counts.
//! - `save_weights` gathers the full model to world rank 0, which writes it. The optimizer
//!   state stays per rank: [`zaya::train::trainer::Trainer::save`] would have every rank
//!   write its own `optimizer.safetensors` into the same directory, so saving and resuming
//!   a `Trainer<TpTrainModel>` is not supported; [`crate::tp_driver`] (the CLI's TP
//!   training) gathers the moments with [`TpTrainModel::gather_full`] instead.

use std::collections::HashSet;
use std::path::Path;

use zaya::safetensors_io::{PlannedTensor, TensorSink};
use zaya::train::aux_loss::balance_bias_update;
use zaya::train::{BackwardOutput, Gradients, LayerRoutingStats, TokenLogps, Trainable};
use zaya::weights::{save_checkpoint, Layout, TensorSpec};
use zaya::{ZayaConfig, ZayaError, ZayaModel};

use super::*;
use crate::plan::{placement_of, Placement};
use crate::stream_save::{into_zaya, TAG_PIECE, TAG_READY};

/// One kind of sliced values a checkpoint file streams: this rank's values (`values[k]` for
/// [`TpTrainModel::params`]`[k]`, shaped like the slice; `None` where this rank keeps
/// none), each element taken from the one copy of the replica that `replica(coords, name)`
/// accepts.
pub(crate) struct SliceSet<'a> {
    pub(crate) values: &'a [Option<Tensor>],
    pub(crate) replica: &'a dyn Fn(Coords, &str) -> bool,
}

/// Index ranges per axis of what a rank holds of a tensor.
type AxisRanges = Vec<Vec<Range<usize>>>;

/// What a tensor of a checkpoint file is, for [`TpTrainModel::stream_full`].
pub(crate) enum Streamed {
    /// The full tensor of parameter `base` from its slices in `sets[set]`.
    Slices { base: String, set: usize },
    /// A balancing bias, from the first rank of the stage holding it.
    Bias,
    /// Values rank 0 already has (i64 step counts).
    Known(Vec<i64>),
}

/// Which of a rank's elements of a parameter count as its own (each element of the model
/// is owned by exactly one rank).
enum Owned {
    All,
    Nothing,
    /// 1 where owned, shaped like the rank's slice.
    Mask(Tensor),
}

fn z(e: ParallelError) -> ZayaError {
    match e {
        ParallelError::Model(e) => e,
        other => ZayaError::Input(other.to_string()),
    }
}

impl TpTrainModel {
    /// Whether TP ranks may hold the same elements of `name` (more TP ranks than KV heads).
    fn shared_placement(&self, name: &str) -> bool {
        let plan = &self.model.plan;
        plan.mesh.tp > plan.cfg.num_key_value_heads
            && matches!(
                placement_of(&plan.rules, name),
                Placement::KvHeads | Placement::ValueHeads { .. } | Placement::ConvChannels
            )
    }

    fn offsets(&self, c: Coords, spec: &TensorSpec) -> Vec<usize> {
        let sel = self.model.plan.selection(c, spec);
        let count = sel.shape(&spec.shape).iter().product();
        let mut out = Vec::with_capacity(count);
        for_each_offset(&spec.shape, &sel.ranges(&spec.shape), count, |_, o| {
            out.push(o)
        });
        out
    }

    fn owned(&self, sp: &ShardParam) -> ParallelResult<Owned> {
        let c = self.model.coords;
        // data-parallel replicas hold the same values: replica 0 counts them; a tied
        // embedding is held by the first and the last stage: counted on the first
        if c.dp != 0 || !one_copy(c, &sp.param.name, &sp.selection) {
            return Ok(Owned::Nothing);
        }
        Ok(match self.shared_mask(sp)? {
            Some(m) => Owned::Mask(m),
            None => Owned::All,
        })
    }

    /// For a KV head shared by several TP ranks: 1 on the elements this rank is the first
    /// holder of, 0 on those a lower TP rank holds too (shaped like the slice); `None` for
    /// any other tensor.
    fn shared_mask(&self, sp: &ShardParam) -> ParallelResult<Option<Tensor>> {
        let c = self.model.coords;
        if is_expert(&sp.param.name) || !self.shared_placement(&sp.param.name) {
            return Ok(None);
        }
        let spec = &sp.spec;
        let lower: HashSet<usize> = (0..c.tp)
            .flat_map(|t| self.offsets(Coords { tp: t, ..c }, spec))
            .collect();
        let mask: Vec<f32> = self
            .offsets(c, spec)
            .into_iter()
            .map(|o| if lower.contains(&o) { 0.0 } else { 1.0 })
            .collect();
        let t = sp.param.var.as_tensor();
        Ok(Some(Tensor::from_vec(mask, t.shape(), t.device())?))
    }

    /// Sums the gradients of elements several TP ranks hold (a KV head shared when
    /// `tp > num_key_value_heads`) over those ranks, so every rank holds the whole gradient
    /// of each element it has: what an optimizer on the slices needs after
    /// [`TpStageBatch::backward`] (collective over TP, in the order of the model's tensors on
    /// every rank; `grads` aligned with [`TpTrainModel::params`]).
    pub fn complete_shared(&self, grads: &mut [Option<Tensor>]) -> ParallelResult<()> {
        let plan = &self.model.plan;
        let c = self.model.coords;
        for spec in native_specs(&plan.cfg) {
            if !plan.holds(c, &spec.name) || !self.shared_placement(&spec.name) {
                continue;
            }
            let mine = self.params.iter().position(|p| p.param.name == spec.name);
            let mut full = vec![0f32; spec.shape.iter().product()];
            let offsets = self.offsets(c, &spec);
            if let Some(i) = mine {
                let g = match &grads[i] {
                    Some(g) => g.flatten_all()?.to_vec1::<f32>()?,
                    None => vec![0f32; offsets.len()],
                };
                for (k, &o) in offsets.iter().enumerate() {
                    full[o] += g[k];
                }
            }
            self.tp.all_reduce_sum(&mut full)?;
            if let Some(i) = mine {
                let v: Vec<f32> = offsets.iter().map(|&o| full[o]).collect();
                let t = self.params[i].param.var.as_tensor();
                grads[i] = Some(Tensor::from_vec(v, t.shape(), t.device())?);
            }
        }
        Ok(())
    }

    fn world(&self) -> ParallelResult<&dyn Comm> {
        self.world.as_deref().ok_or_else(|| {
            ParallelError::Unsupported(
                "training a TP rank needs the mesh's world: build it with TpTrainModel::on_mesh"
                    .into(),
            )
        })
    }

    /// `sqrt(Σ g²)` over every element of the model once, from every rank's gradients.
    /// Collective over the world.
    pub fn global_grad_norm(&self, grads: &[Option<Tensor>]) -> ParallelResult<f64> {
        let mut local = 0f64;
        for (sp, g) in self.params.iter().zip(grads) {
            let Some(g) = g else { continue };
            let sq = g.to_dtype(DType::F32)?.sqr()?;
            let s = match self.owned(sp)? {
                Owned::All => sq.sum_all()?,
                Owned::Nothing => continue,
                Owned::Mask(m) => sq.mul(&m)?.sum_all()?,
            };
            local += f64::from(s.to_scalar::<f32>()?);
        }
        let mut buf = [local as f32];
        self.world()?.all_reduce_sum(&mut buf)?;
        Ok(f64::from(buf[0]).sqrt())
    }

    /// The full model on world rank 0 (`None` elsewhere): every parameter gathered once,
    /// the balancing biases as rank 0 holds them. Collective over the world.
    pub fn gather_weights(&self) -> ParallelResult<Option<BTreeMap<String, Tensor>>> {
        let values: Vec<Tensor> = self
            .params
            .iter()
            .map(|sp| sp.param.var.as_tensor().detach())
            .collect();
        let full = self.gather_full(&values)?;
        // the balancing biases (replicated buffers) of every stage, from its first rank
        let world = self.world()?;
        let plan = &self.model.plan;
        let is_bias = |n: &str| n.ends_with(".balancing_biases");
        let first = |c: Coords| c.tp == 0 && c.ep == 0 && c.dp == 0;
        let specs: Vec<_> = native_specs(&plan.cfg)
            .into_iter()
            .filter(|s| is_bias(&s.name))
            .collect();
        let c = self.model.coords;
        let mut mine = Vec::new();
        if first(c) {
            for s in specs.iter().filter(|s| plan.holds(c, &s.name)) {
                let t = self.tensors.get(&s.name).ok_or_else(|| {
                    ParallelError::Unsupported(format!("this rank holds no `{}`", s.name))
                })?;
                mine.extend(t.flatten_all()?.to_vec1::<f32>()?);
            }
        }
        let mut send = vec![Vec::new(); world.size()];
        send[0] = mine;
        let got = world.all_to_all_v(&send)?;
        let Some(mut full) = full else {
            return Ok(None);
        };
        for (r, data) in got.iter().enumerate() {
            let rc = plan.mesh.coords(r);
            if !first(rc) {
                continue;
            }
            let mut at = 0;
            for s in specs.iter().filter(|s| plan.holds(rc, &s.name)) {
                let n: usize = s.shape.iter().product();
                let v = data.get(at..at + n).ok_or_else(|| {
                    ParallelError::Unsupported(format!(
                        "rank {r} sent {} balancing-bias values, fewer than its stage holds",
                        data.len()
                    ))
                })?;
                full.insert(
                    s.name.clone(),
                    Tensor::from_slice(v, s.shape.clone(), &Device::Cpu)?,
                );
                at += n;
            }
        }
        Ok(Some(full))
    }

    /// Full tensors on world rank 0 (`None` elsewhere) from per-rank values shaped like
    /// this rank's slices (aligned with [`TpTrainModel::params`]) whose copies agree
    /// wherever ranks hold the same element (weights, AdamW moments): every element taken
    /// once. Collective over the world.
    pub fn gather_full(
        &self,
        values: &[Tensor],
    ) -> ParallelResult<Option<BTreeMap<String, Tensor>>> {
        self.gather_values(values, &|c, _| c.dp == 0)
    }

    /// [`TpTrainModel::gather_full`] taking each tensor from the data-parallel replica that
    /// `replica(coords, name)` accepts (exactly one per tensor: under ZeRO-1, the one that
    /// keeps its optimizer state). Collective over the world.
    pub(crate) fn gather_values(
        &self,
        values: &[Tensor],
        replica: &dyn Fn(Coords, &str) -> bool,
    ) -> ParallelResult<Option<BTreeMap<String, Tensor>>> {
        let world = self.world()?;
        if values.len() != self.params.len() {
            return Err(ParallelError::Unsupported(format!(
                "{} values for {} parameters",
                values.len(),
                self.params.len()
            )));
        }
        let mut mine = Vec::with_capacity(self.params.len());
        for (sp, v) in self.params.iter().zip(values) {
            let v = v.to_dtype(DType::F32)?;
            mine.push(Some(match self.shared_mask(sp)? {
                Some(m) => v.mul(&m)?,
                None => v,
            }));
        }
        self.gather_by(world, &mine, &|c, name, sel| {
            replica(c, name) && one_copy(c, name, sel)
        })
    }

    /// Collective over the world: the file-ordered `tensors` on rank 0, each in chunks of
    /// whole leading-axis rows of at most `bound_bytes` (at least one row), assembled there
    /// from the slices' rows the ranks send ([`Streamed`] says what each tensor is) and
    /// handed to the file writer `write(fill)` (called on rank 0 only). A rank sends its
    /// rows of a chunk only when rank 0 asks for them, so rank 0 holds one chunk and one
    /// rank's part of it at a time, never the model. Returns (on rank 0) the most values
    /// of one chunk it held.
    pub(crate) fn stream_full(
        &self,
        tensors: &[PlannedTensor],
        sets: &[SliceSet],
        what: &dyn Fn(&str) -> ParallelResult<Streamed>,
        bound_bytes: usize,
        write: impl FnOnce(
            &mut dyn FnMut(&PlannedTensor, &mut TensorSink) -> zaya::Result<()>,
        ) -> zaya::Result<()>,
    ) -> ParallelResult<usize> {
        let world = self.world()?;
        let plan = &self.model.plan;
        let me = world.rank();
        let bound = (bound_bytes / std::mem::size_of::<f32>()).max(1);
        let position: HashMap<&str, usize> = self
            .params
            .iter()
            .enumerate()
            .map(|(k, sp)| (sp.param.name.as_str(), k))
            .collect();
        let specs: HashMap<String, TensorSpec> = native_specs(&plan.cfg)
            .into_iter()
            .map(|s| (s.name.clone(), s))
            .collect();
        let first = |c: Coords| c.tp == 0 && c.ep == 0 && c.dp == 0;
        // this rank's slice of a file tensor (f32, shared KV heads masked), as rows
        let local = |t: &PlannedTensor| -> ParallelResult<Tensor> {
            let v = match what(&t.name)? {
                Streamed::Slices { base, set } => {
                    let k = *position.get(base.as_str()).ok_or_else(|| {
                        ParallelError::Unsupported(format!("this rank holds no `{base}`"))
                    })?;
                    let v = sets[set].values[k].as_ref().ok_or_else(|| {
                        ParallelError::Unsupported(format!(
                            "this rank keeps no `{}` but was picked to send it",
                            t.name
                        ))
                    })?;
                    let v = v.to_dtype(DType::F32)?;
                    match self.shared_mask(&self.params[k])? {
                        Some(m) => v.mul(&m)?,
                        None => v,
                    }
                }
                Streamed::Bias => self
                    .tensors
                    .get(&t.name)
                    .ok_or_else(|| {
                        ParallelError::Unsupported(format!("this rank holds no `{}`", t.name))
                    })?
                    .to_dtype(DType::F32)?,
                Streamed::Known(_) => {
                    return Err(ParallelError::Unsupported(format!(
                        "`{}` is written by rank 0 alone",
                        t.name
                    )))
                }
            };
            let rows = v.dims().first().copied().unwrap_or(1);
            Ok(v.reshape((rows, ()))?)
        };
        // the ranks sending a file tensor, in rank order, with the index ranges they hold
        // (per axis; the whole tensor for a bias)
        let senders = |t: &PlannedTensor| -> ParallelResult<Vec<(usize, AxisRanges)>> {
            let whole = || {
                t.shape
                    .iter()
                    .map(|&d| std::iter::once(0..d).collect())
                    .collect::<AxisRanges>()
            };
            let mut out = Vec::new();
            match what(&t.name)? {
                Streamed::Slices { base, set } => {
                    let replica = sets[set].replica;
                    let base = base.as_str();
                    let spec = specs.get(base).ok_or_else(|| {
                        ParallelError::Unsupported(format!("`{base}` is no tensor of the model"))
                    })?;
                    for r in 0..world.size() {
                        let rc = plan.mesh.coords(r);
                        if !plan.holds(rc, base) {
                            continue;
                        }
                        let sel = plan.selection(rc, spec);
                        let k: usize = sel.shape(&spec.shape).iter().product();
                        if k > 0 && replica(rc, base) && one_copy(rc, base, &sel) {
                            out.push((r, sel.ranges(&spec.shape)));
                        }
                    }
                }
                Streamed::Bias => {
                    let r = (0..world.size())
                        .find(|&r| {
                            let rc = plan.mesh.coords(r);
                            first(rc) && plan.holds(rc, &t.name)
                        })
                        .ok_or_else(|| {
                            ParallelError::Unsupported(format!("no rank holds `{}`", t.name))
                        })?;
                    out.push((r, whole()));
                }
                Streamed::Known(_) => {}
            }
            Ok(out)
        };
        // a tensor's chunks: leading-axis rows [a, b) of at most `bound` values
        let chunks = |t: &PlannedTensor| -> Vec<Range<usize>> {
            let rows = t.shape.first().copied().unwrap_or(1);
            let row: usize = t.shape.iter().skip(1).product();
            let per = (bound / row.max(1)).max(1);
            (0..rows)
                .step_by(per)
                .map(|a| a..(a + per).min(rows))
                .collect()
        };
        // a sender's rows inside chunk `c`: positions in its slice, and their rows in the chunk
        let rows_in = |ranges: &[Vec<Range<usize>>], c: &Range<usize>| -> (Vec<u32>, Vec<usize>) {
            let lead: Vec<usize> = match ranges.first() {
                Some(rs) => rs.iter().flat_map(|r| r.clone()).collect(),
                None => vec![0],
            };
            lead.iter()
                .enumerate()
                .filter(|(_, g)| c.contains(g))
                .map(|(i, g)| (i as u32, g - c.start))
                .unzip()
        };
        let pick = |v: &Tensor, at: &[u32]| -> ParallelResult<Vec<f32>> {
            let idx = Tensor::new(at, v.device())?;
            Ok(v.index_select(&idx, 0)?.flatten_all()?.to_vec1::<f32>()?)
        };
        if me != 0 {
            for t in tensors {
                let Some((_, ranges)) = senders(t)?.into_iter().find(|(r, _)| *r == me) else {
                    continue;
                };
                let v = local(t)?;
                for c in chunks(t) {
                    let (at, _) = rows_in(&ranges, &c);
                    if !at.is_empty() {
                        world.recv(0, TAG_READY)?;
                        world.send(0, TAG_PIECE, &pick(&v, &at)?)?;
                    }
                }
            }
            return Ok(0);
        }
        let mut next = 0usize;
        let mut max_held = 0usize;
        let mut fill = |t: &PlannedTensor, sink: &mut TensorSink| -> zaya::Result<()> {
            let mut run = || -> ParallelResult<()> {
                let want = tensors.get(next).map(|w| w.name.as_str());
                if want != Some(t.name.as_str()) {
                    return Err(ParallelError::Unsupported(format!(
                        "the writer asked for `{}`, the gather's plan has {want:?} next",
                        t.name
                    )));
                }
                next += 1;
                if let Streamed::Known(v) = what(&t.name)? {
                    sink.write_i64(&v)?;
                    return Ok(());
                }
                let from = senders(t)?;
                let mine = match from.iter().any(|(r, _)| *r == 0) {
                    true => Some(local(t)?),
                    false => None,
                };
                let row: usize = t.shape.iter().skip(1).product();
                for c in chunks(t) {
                    let mut shape = vec![c.len()];
                    shape.extend(t.shape.iter().skip(1));
                    let mut buf = vec![0f32; c.len() * row];
                    for (r, ranges) in &from {
                        let (at, rows) = rows_in(ranges, &c);
                        if at.is_empty() {
                            continue;
                        }
                        let got = match (&mine, *r) {
                            (Some(v), 0) => pick(v, &at)?,
                            _ => {
                                world.send(*r, TAG_READY, &[0.0])?;
                                world.recv(*r, TAG_PIECE)?
                            }
                        };
                        // the sender's selection, its leading axis cut to this chunk's rows
                        let mut sel: Vec<Vec<Range<usize>>> =
                            vec![rows.iter().map(|&g| g..g + 1).collect()];
                        sel.extend(ranges.iter().skip(1).cloned());
                        let k: usize = sel
                            .iter()
                            .map(|rs| rs.iter().map(|r| r.len()).sum::<usize>())
                            .product();
                        if got.len() != k {
                            return Err(ParallelError::Unsupported(format!(
                                "rank {r} sent {} values of `{}` rows {c:?}, its slice holds {k}",
                                got.len(),
                                t.name
                            )));
                        }
                        max_held = max_held.max(buf.len() + got.len());
                        add_selected(&mut buf, &shape, &sel, &got);
                    }
                    sink.write_f32_as(&buf, t.dtype)?;
                }
                Ok(())
            };
            run().map_err(into_zaya)
        };
        write(&mut fill)?;
        if next != tensors.len() {
            return Err(ParallelError::Unsupported(format!(
                "the checkpoint writer took {next} of {} tensors",
                tensors.len()
            )));
        }
        Ok(max_held)
    }

    fn bias_balancing(&mut self, routing: &[LayerRoutingStats], lr: f64) -> ParallelResult<()> {
        let range = self.model.layer_range();
        if routing.len() != range.len() {
            return Err(ParallelError::Unsupported(format!(
                "routing counts for {} layers, this rank has {}",
                routing.len(),
                range.len()
            )));
        }
        for (i, stats) in range.zip(routing) {
            let name = format!("model.layers.{i}.mlp.gate.balancing_biases");
            let cur: Vec<f32> = self.tensors[&name].to_vec1()?;
            let new = balance_bias_update(&cur, &stats.counts, lr)?;
            let t = Tensor::new(new.as_slice(), &self.model.device)?;
            self.tensors.insert(name, t);
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
}

impl Trainable for TpTrainModel {
    const CHECKPOINT_FILES: &'static [&'static str] = &["model.safetensors", "config.json"];

    fn config(&self) -> &ZayaConfig {
        &self.model.cfg
    }

    fn params(&self) -> &[Param] {
        &self.plain
    }

    fn forward_backward(
        &self,
        batch: &Batch,
        opts: &TrainOptions,
        scale: &LossScale,
    ) -> zaya::Result<BackwardOutput> {
        let mut r = TpTrainModel::forward_backward(self, batch, opts, scale).map_err(z)?;
        self.complete_shared(&mut r.grads).map_err(z)?;
        Ok(BackwardOutput {
            loss: r.loss,
            aux_loss: r.aux_loss,
            targets: r.targets,
            routing: r.routing,
            grads: Gradients { grads: r.grads },
        })
    }

    fn apply_bias_balancing(&mut self, routing: &[LayerRoutingStats], lr: f64) -> zaya::Result<()> {
        self.bias_balancing(routing, lr).map_err(z)
    }

    fn save_weights(&self, dir: &Path) -> zaya::Result<()> {
        if let Some(full) = self.gather_weights().map_err(z)? {
            save_checkpoint(dir, &self.model.cfg, &full, Layout::Native)?;
        }
        Ok(())
    }

    fn grad_norm(&self, grads: &Gradients) -> zaya::Result<f64> {
        self.global_grad_norm(&grads.grads).map_err(z)
    }

    fn device(&self) -> &Device {
        &self.model.device
    }

    fn forward_backward_objective(
        &self,
        _batch: &Batch,
        _opts: &TrainOptions,
        _aux_weight: f64,
        _temperature: f64,
        _objective: &mut dyn FnMut(&TokenLogps) -> zaya::Result<Vec<f32>>,
    ) -> zaya::Result<BackwardOutput> {
        Err(unsupported("per-token objectives (GRPO)"))
    }

    fn token_logps(
        &self,
        _batch: &Batch,
        _opts: &TrainOptions,
        _temperature: f64,
    ) -> zaya::Result<TokenLogps> {
        Err(unsupported("token log-probabilities (GRPO)"))
    }

    fn inference_view(&self) -> zaya::Result<ZayaModel> {
        Err(unsupported(
            "a single-device inference view (the rank holds slices)",
        ))
    }
}

fn unsupported(what: &str) -> ZayaError {
    ZayaError::Input(format!(
        "{what} under tensor/expert parallelism: not in this version"
    ))
}
