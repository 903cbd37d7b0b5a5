//! The forward/backward engine, with optional gradient checkpointing per decoder layer.
//!
//! The layers are cut into segments (one segment of all layers without checkpointing; `k`
//! layers each with `Every(k)`). The forward keeps only the segment boundaries, detached:
//! the residual stream **and** the router state `ρ`, which also crosses layers (EDA). The
//! LM head + loss then runs in chunks on the detached final-norm output and yields
//! `d loss / d y`. The backward walks the segments in reverse: each one is recomputed from
//! its boundary, wrapped in fresh `Var`s, and differentiated with the seed
//! `Σ out ⊙ g_out + Σ ρ_out ⊙ g_ρ + coef·Σ aux_ℓ` — whose gradient with respect to `out` is
//! exactly `g_out` — giving the parameter gradients of the segment and the gradients of its
//! inputs for the segment before it. Parameter gradients are summed into one `GradStore`.
//! The last segment's graph is kept from the forward (it is needed first), so without
//! checkpointing nothing is recomputed.
//!
//! Recomputation is exact (same inputs, same ops, same top-1 choices), so the gradients
//! equal those without checkpointing up to the order of floating-point additions where a
//! tensor has several consumers.

use std::collections::HashMap;
use std::ops::Range;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};

use super::aux_loss::{layer_balance_loss, LayerRoutingStats};
use super::loss::{
    chunked_lm_loss, token_logps, weighted_logp_backward, LossHeadOutput, Targets, TokenLogps,
};
use super::{BackwardOutput, Batch, EvalOutput, Gradients, LossScale, Param, TrainOptions};
use crate::attention::AttnImplementation;
use crate::error::{Result, ZayaError};
use crate::model::{ForwardContext, ForwardOptions, ZayaModel};

/// Which decoder-layer boundaries are kept during the forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum Checkpointing {
    /// Keep the whole graph (fastest, most memory).
    #[default]
    Off,
    /// Keep only layer boundaries; recompute every layer during the backward pass.
    EveryLayer,
    /// Keep the boundary every `k` layers; recompute `k` layers at a time.
    Every(usize),
}

impl Checkpointing {
    /// Layers per segment (`None` = no checkpointing).
    pub fn segment_len(self) -> Result<Option<usize>> {
        match self {
            Checkpointing::Off => Ok(None),
            Checkpointing::EveryLayer => Ok(Some(1)),
            Checkpointing::Every(0) => Err(ZayaError::Input(
                "checkpointing every 0 layers: use Checkpointing::Off".into(),
            )),
            Checkpointing::Every(k) => Ok(Some(k)),
        }
    }

    /// The layer ranges recomputed as one piece.
    pub fn segments(self, num_layers: usize) -> Result<Vec<Range<usize>>> {
        let k = self.segment_len()?.unwrap_or(num_layers.max(1));
        Ok((0..num_layers)
            .step_by(k)
            .map(|s| s..(s + k).min(num_layers))
            .collect())
    }
}

/// A batch turned into tensors plus the pieces every segment needs.
struct Prepared<'a> {
    model: &'a ZayaModel,
    ids: Tensor,
    ctx: ForwardContext,
    targets: Targets,
    /// Per flat token, whether it is real (absent = all real).
    real_host: Option<Vec<bool>>,
    /// The same as an `[N]` f32 tensor.
    real: Option<Tensor>,
    /// Multiplies each layer's differentiable balance loss (0 = not in the graph).
    aux_weight: f64,
}

/// What a run over a segment produced.
struct SegmentRun {
    hidden: Tensor,
    state: Option<Tensor>,
    /// Final-norm output, when the segment ends with the last layer.
    normed: Option<Tensor>,
    /// Weighted, differentiable balance losses of the segment's layers.
    aux_terms: Vec<Tensor>,
    aux_values: Vec<f64>,
    stats: Vec<LayerRoutingStats>,
}

enum SegmentInput<'t> {
    /// The first segment starts from the token embedding.
    Embed,
    Boundary {
        hidden: &'t Tensor,
        state: Option<&'t Tensor>,
    },
}

/// The input of a recomputed segment: the embedding for the first one, else the boundary
/// leaves (residual stream and router state) whose gradients flow to the segment before.
fn segment_input(inputs: &Option<(Var, Option<Var>)>) -> SegmentInput<'_> {
    match inputs {
        None => SegmentInput::Embed,
        Some((h, s)) => SegmentInput::Boundary {
            hidden: h.as_tensor(),
            state: s.as_ref().map(|v| v.as_tensor()),
        },
    }
}

fn prepare<'a>(
    model: &'a ZayaModel,
    batch: &Batch,
    attn: AttnImplementation,
    aux_weight: f64,
) -> Result<Prepared<'a>> {
    let (b, t) = batch.shape()?;
    let dev = model.device();
    let flat: Vec<u32> = batch.input_ids.iter().flatten().copied().collect();
    let ids = Tensor::from_vec(flat, (b, t), dev)?;
    model.check_input_ids(&ids, 0)?;
    let mask = batch
        .attention_mask
        .as_ref()
        .map(|m| {
            let flat: Vec<u32> = m.iter().flatten().copied().collect();
            Tensor::from_vec(flat, (b, t), dev)
        })
        .transpose()?;
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
        attn,
        ..Default::default()
    };
    let ctx = model.context(b, t, None, &fopts)?;
    let targets = Targets::from_labels(&batch.labels, model.config().vocab_size)?;
    let real_host: Option<Vec<bool>> = batch
        .attention_mask
        .as_ref()
        .map(|m| m.iter().flatten().map(|&x| x != 0).collect());
    let real = real_host
        .as_ref()
        .map(|r| {
            let v: Vec<f32> = r.iter().map(|&x| if x { 1.0 } else { 0.0 }).collect();
            Tensor::from_vec(v, b * t, dev)
        })
        .transpose()?;
    Ok(Prepared {
        model,
        ids,
        ctx,
        targets,
        real_host,
        real,
        aux_weight,
    })
}

impl Prepared<'_> {
    fn run(&self, range: Range<usize>, input: SegmentInput) -> Result<SegmentRun> {
        let model = self.model;
        let num_layers = model.config().num_hidden_layers;
        let e = model.config().num_experts;
        let (mut h, mut state) = match input {
            SegmentInput::Embed => (model.embed(&self.ids)?, None),
            SegmentInput::Boundary { hidden, state } => (hidden.clone(), state.cloned()),
        };
        let mut aux_terms = Vec::new();
        let mut aux_values = Vec::new();
        let mut stats = Vec::new();
        let end = range.end;
        for idx in range {
            let out = model.layer_forward(idx, &h, state.as_ref(), &self.ctx, None, false)?;
            let st =
                LayerRoutingStats::from_choice(&out.routing.choice, self.real_host.as_deref(), e)?;
            if self.aux_weight != 0.0 {
                let l = layer_balance_loss(&out.routing.probs, &st, self.real.as_ref())?;
                aux_values.push(f64::from(l.to_scalar::<f32>()?));
                aux_terms.push((l * self.aux_weight)?);
            } else {
                // Off: the value is still reported, but nothing enters the graph.
                let l = layer_balance_loss(&out.routing.probs.detach(), &st, self.real.as_ref())?;
                aux_values.push(f64::from(l.to_scalar::<f32>()?));
            }
            stats.push(st);
            h = out.hidden;
            state = Some(out.routing.state);
        }
        let normed = if end == num_layers {
            Some(model.final_norm(&h)?)
        } else {
            None
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
}

/// Moves the gradients `acc` holds for `vars` (what the LM head gave them: for a tied
/// embedding, the head's part) into the store a segment's backward starts from
/// (`Tensor::backward_releasing_from`), so that the embedding lookup's backward adds its rows
/// into that buffer in place instead of into a fresh `[vocab × hidden]` zero tensor summed
/// with it afterwards. [`accumulate`] moves every entry back, reached by the segment or
/// not.
pub fn seeded<'a>(acc: &mut GradStore, vars: impl IntoIterator<Item = &'a Tensor>) -> GradStore {
    let mut start = GradStore::default();
    for t in vars {
        if let Some(g) = acc.remove(t) {
            start.insert(t, g);
        }
    }
    start
}

/// Adds the gradients `gs` holds for `vars` (the parameters) into `acc`; one definition for
/// the single-process stages here and the tensor-parallel ones of `zaya-dist`.
///
/// candle leaves the gradient of a leaf undetached when the leaf feeds a product directly
/// (`d(a·b)/da = g·b` keeps `b`'s graph, and `b` may be another `Var`), so every gradient
/// taken out of a `GradStore` is detached: otherwise it would keep the segment's graph alive
/// and a later backward through it would count parameters twice.
pub fn accumulate<'a>(
    acc: &mut GradStore,
    vars: impl IntoIterator<Item = &'a Tensor>,
    gs: &GradStore,
) -> Result<()> {
    for t in vars {
        if let Some(g) = gs.get(t) {
            let g = g.detach();
            // the head's part of a tied embedding's gradient, summed in its own buffer
            let sum = match acc.remove(t) {
                Some(old) => old.add_reusing(&g)?,
                None => g,
            };
            acc.insert(t, sum);
        }
    }
    Ok(())
}

/// `Σ out ⊙ g` as a differentiable scalar (its gradient with respect to `out` is `g`).
/// The scalar is f32 whatever `out`'s dtype (a bf16 model's segment outputs are summed with
/// f32 balance-loss terms).
fn contract(out: &Tensor, g: &Tensor) -> Result<Tensor> {
    Ok(out
        .mul(&g.to_dtype(out.dtype())?)?
        .sum_all()?
        .to_dtype(DType::F32)?)
}

/// The scalar whose backward carries upstream gradients into a segment: `Σ out·g` over each
/// (segment output, its upstream gradient) pair, then the segment's balance-loss terms, summed
/// in that order; zero when there is nothing. One definition for every checkpointed backward
/// (the single-process stages here, the tensor-parallel stages of `zaya-dist`).
pub fn segment_seed(
    device: &Device,
    outputs: &[(&Tensor, &Tensor)],
    aux_terms: &[Tensor],
) -> Result<Tensor> {
    let mut seed: Option<Tensor> = None;
    let terms = outputs
        .iter()
        .map(|(out, g)| contract(out, g))
        .chain(aux_terms.iter().map(|a| Ok(a.to_dtype(DType::F32)?)));
    for term in terms {
        let term = term?;
        seed = Some(match seed {
            Some(s) => (s + term)?,
            None => term,
        });
    }
    match seed {
        Some(s) => Ok(s),
        None => Ok(Tensor::zeros((), DType::F32, device)?),
    }
}

/// What the LM head computes at the end of the forward pass.
pub enum LossHead<'o> {
    /// Causal-LM cross-entropy, `nll_sum / normalizer` (see [`LossScale`]).
    CrossEntropy,
    /// Any objective of the counted targets' log-probabilities under
    /// `softmax(logits / temperature)`: `objective` receives their [`TokenLogps`] (in the
    /// order of [`Targets::from_labels`]) and returns `dL / dlogp` for each; the model is
    /// differentiated through `Σ w · logp`, which has exactly the gradient of `L`.
    TokenObjective {
        temperature: f64,
        objective: &'o mut dyn FnMut(&TokenLogps) -> Result<Vec<f32>>,
    },
}

/// Loss and the gradients of `params` (the `Var`s the model reads: every weight for full
/// fine-tuning, the adapter factors for LoRA) for `batch`, with the head `loss_head`: the
/// whole layer range of [`StageBatch`] on one device.
pub fn forward_backward_of(
    model: &ZayaModel,
    params: &[Param],
    batch: &Batch,
    opts: &TrainOptions,
    scale: &LossScale,
    loss_head: LossHead<'_>,
) -> Result<BackwardOutput> {
    forward_backward_into(model, params, batch, opts, scale, loss_head, None)
}

/// [`forward_backward_of`] that hands each parameter's final gradient to `sink` during the
/// backward pass (see [`GradSink`]) instead of returning it; the returned gradients are
/// those `sink` did not take (none when it is given).
pub fn forward_backward_into(
    model: &ZayaModel,
    params: &[Param],
    batch: &Batch,
    opts: &TrainOptions,
    scale: &LossScale,
    loss_head: LossHead<'_>,
    sink: Option<&mut GradSink<'_>>,
) -> Result<BackwardOutput> {
    let num_layers = model.config().num_hidden_layers;
    let p = StageBatch::new(model, batch, opts, scale)?;
    let normalizer = match scale.normalizer {
        Some(n) => n,
        None if p.targets().is_empty() => {
            return Err(ZayaError::Input(
                "the batch has no counted label (every target is -100)".into(),
            ))
        }
        None => p.targets().len() as f64,
    };
    let fwd = p.forward(0..num_layers, StageInput::Embed, opts.checkpointing)?;
    let head = p.head(&fwd, normalizer, loss_head, opts.loss_chunk)?;
    let stats = fwd.stats.clone();
    let num = fwd.aux_values.len().max(1) as f64;
    let aux_loss = fwd.aux_values.iter().sum::<f64>() / num;
    if sink.is_some() && !head.nll_sum.is_finite() {
        // nothing is updated from a step whose loss is not finite
        return Err(ZayaError::Input(format!(
            "loss {} is not finite: no gradient handed to the optimizer",
            head.nll_sum / normalizer
        )));
    }
    let (grads, _) = p.backward_into(
        params,
        fwd,
        StageUpstream::Normed(head.grad_hidden),
        head.grads,
        sink,
    )?;
    Ok(BackwardOutput {
        loss: head.nll_sum / normalizer,
        aux_loss,
        targets: head.count,
        routing: stats,
        grads,
    })
}

/// What a layer range starts from.
#[derive(Debug, Clone)]
pub enum StageInput {
    /// The token embedding (the range starts at layer 0).
    Embed,
    /// The residual stream `[B, T, H]` and router state `[B, T, R]` handed over by the range
    /// before (detached; the state is absent only before layer 0).
    Boundary {
        hidden: Tensor,
        state: Option<Tensor>,
    },
}

/// The gradient arriving at the end of a layer range.
#[derive(Debug, Clone)]
pub enum StageUpstream {
    /// The range ends with the last layer and the LM head ran on it:
    /// `d loss / d final-norm output` (`None`: the head gave no gradient).
    Normed(Option<Tensor>),
    /// `d loss / d (hidden, router state)` at the range's output, from the range after it.
    Boundary {
        hidden: Tensor,
        state: Option<Tensor>,
    },
}

/// A micro-batch prepared once (ids, masks, RoPE tables, targets, the real-token mask) for
/// running any range of layers forward and backward: the single-device step runs the
/// whole range, a pipeline stage its own layers, handing the boundary (residual stream
/// **and** EDA router state) and its gradient to the neighbouring stages.
pub struct StageBatch<'a> {
    p: Prepared<'a>,
}

/// A layer range run forward: the detached input of every checkpointing segment, and the
/// last segment's graph (needed first by the backward).
pub struct StageForward {
    segments: Vec<Range<usize>>,
    /// Detached input of each segment but the last (`None` = the embedding).
    inputs: Vec<Option<(Tensor, Option<Tensor>)>>,
    /// The last segment's input leaves (`None` = the embedding).
    last_inputs: Option<(Var, Option<Var>)>,
    last: SegmentRun,
    /// Routing counts of the range's layers, in layer order.
    pub stats: Vec<LayerRoutingStats>,
    /// Balance-loss values (unweighted) of the range's layers.
    pub aux_values: Vec<f64>,
}

impl StageForward {
    /// The range's output (residual stream, router state), detached: what the next stage
    /// receives.
    pub fn output(&self) -> (Tensor, Option<Tensor>) {
        (
            self.last.hidden.detach(),
            self.last.state.as_ref().map(Tensor::detach),
        )
    }

    /// The final-norm output (with its graph), when the range ends with the last layer.
    pub fn normed(&self) -> Option<&Tensor> {
        self.last.normed.as_ref()
    }
}

impl<'a> StageBatch<'a> {
    /// Prepares `batch`; each layer's balance loss enters the objective with weight
    /// `aux_loss_coef · scale.aux_weight / num_hidden_layers` (the same per layer whatever
    /// range runs it).
    pub fn new(
        model: &'a ZayaModel,
        batch: &Batch,
        opts: &TrainOptions,
        scale: &LossScale,
    ) -> Result<Self> {
        opts.validate()?;
        let num_layers = model.config().num_hidden_layers;
        let aux_weight = opts.aux_loss_coef * scale.aux_weight / num_layers.max(1) as f64;
        Ok(StageBatch {
            p: prepare(model, batch, opts.attn, aux_weight)?,
        })
    }

    /// The counted targets of the batch (after the causal shift).
    pub fn targets(&self) -> &Targets {
        &self.p.targets
    }

    /// Runs `layers` from `input`; with checkpointing, only segment boundaries are kept for
    /// all but the last segment (recomputed by [`StageBatch::backward`]).
    pub fn forward(
        &self,
        layers: Range<usize>,
        input: StageInput,
        checkpointing: Checkpointing,
    ) -> Result<StageForward> {
        let num_layers = self.p.model.config().num_hidden_layers;
        if layers.is_empty() || layers.end > num_layers {
            return Err(ZayaError::Input(format!(
                "layer range {layers:?} is empty or beyond the model's {num_layers} layers"
            )));
        }
        if matches!(input, StageInput::Embed) != (layers.start == 0) {
            return Err(ZayaError::Input(format!(
                "layer range {layers:?}: the embedding is the input of layer 0 and only of it"
            )));
        }
        let segments: Vec<Range<usize>> = checkpointing
            .segments(layers.len())?
            .into_iter()
            .map(|s| s.start + layers.start..s.end + layers.start)
            .collect();
        let last = segments.len() - 1;
        let mut stats = Vec::with_capacity(layers.len());
        let mut aux_values = Vec::with_capacity(layers.len());
        // Forward: every segment but the last runs without keeping its graph; its outputs
        // become the (detached) input boundary of the next segment.
        let mut inputs: Vec<Option<(Tensor, Option<Tensor>)>> = Vec::with_capacity(last + 1);
        inputs.push(match input {
            StageInput::Embed => None,
            StageInput::Boundary { hidden, state } => Some((hidden, state)),
        });
        for seg in &segments[..last] {
            let run = self
                .p
                .run(seg.clone(), boundary_input(inputs.last().unwrap()))?;
            stats.extend(run.stats);
            aux_values.extend(run.aux_values);
            inputs.push(Some((run.hidden.detach(), run.state.map(|s| s.detach()))));
        }
        // The last segment keeps its graph; its inputs are leaves so their gradients come out.
        let last_inputs = boundary_leaves(inputs.pop().expect("one input per segment").as_ref())?;
        let run = self
            .p
            .run(segments[last].clone(), segment_input(&last_inputs))?;
        stats.extend(run.stats.iter().cloned());
        aux_values.extend(run.aux_values.iter().copied());
        Ok(StageForward {
            segments,
            inputs,
            last_inputs,
            last: run,
            stats,
            aux_values,
        })
    }

    /// The LM head on the range's final-norm output: `nll_sum / normalizer` (or a token
    /// objective), its gradient with respect to that output and the head's parameter
    /// gradients. Fails unless the range ended with the last layer.
    pub fn head(
        &self,
        fwd: &StageForward,
        normalizer: f64,
        loss_head: LossHead<'_>,
        loss_chunk: usize,
    ) -> Result<LossHeadOutput> {
        let normed = fwd
            .normed()
            .ok_or_else(|| ZayaError::Input("the LM head runs after the last layer only".into()))?;
        let p = &self.p;
        match loss_head {
            LossHead::CrossEntropy => {
                chunked_lm_loss(p.model, normed, &p.targets, normalizer, loss_chunk, true)
            }
            LossHead::TokenObjective {
                temperature,
                objective,
            } => {
                let lp = token_logps(p.model, normed, &p.targets, temperature, loss_chunk)?;
                let w = objective(&lp)?;
                weighted_logp_backward(p.model, normed, &p.targets, temperature, &w, loss_chunk)
            }
        }
    }

    /// The backward of a range run by [`StageBatch::forward`], last segment first, seeded
    /// with `upstream`; the parameter gradients of `params` are added to `acc` (e.g. the
    /// head's). Returns them with the gradients of the range's input boundary (`None` when
    /// the range starts from the embedding).
    pub fn backward(
        &self,
        params: &[Param],
        fwd: StageForward,
        upstream: StageUpstream,
        acc: GradStore,
    ) -> Result<(Gradients, BoundaryGrads)> {
        self.backward_into(params, fwd, upstream, acc, None)
    }

    /// [`StageBatch::backward`] that hands each parameter's final gradient to `sink` as
    /// soon as the backward pass has it (see [`GradSink`]).
    pub fn backward_into(
        &self,
        params: &[Param],
        fwd: StageForward,
        upstream: StageUpstream,
        mut acc: GradStore,
        sink: Option<&mut GradSink<'_>>,
    ) -> Result<(Gradients, BoundaryGrads)> {
        let mut sinking = Sinking::new(params, sink);
        let vars = || params.iter().map(|p| p.var.as_tensor());
        let StageForward {
            segments,
            inputs,
            last_inputs,
            last: run,
            ..
        } = fwd;
        let dev = self.p.model.device();
        let mut outputs = Vec::with_capacity(2);
        match &upstream {
            StageUpstream::Normed(Some(g)) => {
                let normed = run.normed.as_ref().ok_or_else(|| {
                    ZayaError::Input("a head gradient for a range that has no final norm".into())
                })?;
                outputs.push((normed, g));
            }
            StageUpstream::Normed(None) => {}
            StageUpstream::Boundary { hidden, state } => {
                outputs.push((&run.hidden, hidden));
                if let (Some(s), Some(g)) = (&run.state, state) {
                    outputs.push((s, g));
                }
            }
        }
        let seed = segment_seed(dev, &outputs, &run.aux_terms)?;
        drop(outputs);
        // The run's tensors are the graph's: let go of them, so the backward frees each
        // activation once it is done with it (peak memory of a step without checkpointing).
        drop(run);
        let start = seeded(&mut acc, vars());
        let gs = seed.backward_releasing_from(start, &mut |v, g| sinking.ready(v, g))?;
        accumulate(&mut acc, vars(), &gs)?;
        let mut upstream = boundary_grads(&gs, last_inputs.as_ref())?;
        drop(gs);

        for i in (0..segments.len() - 1).rev() {
            let inputs = boundary_leaves(inputs[i].as_ref())?;
            let run = self.p.run(segments[i].clone(), segment_input(&inputs))?;
            let (g_h, g_s) = upstream.take().ok_or_else(|| {
                ZayaError::Input("checkpointing: no gradient reached a segment boundary".into())
            })?;
            let mut outputs = vec![(&run.hidden, &g_h)];
            if let (Some(s), Some(g)) = (&run.state, &g_s) {
                outputs.push((s, g));
            }
            let seed = segment_seed(dev, &outputs, &run.aux_terms)?;
            drop(outputs);
            drop(run);
            let start = seeded(&mut acc, vars());
            let gs = seed.backward_releasing_from(start, &mut |v, g| sinking.ready(v, g))?;
            accumulate(&mut acc, vars(), &gs)?;
            upstream = boundary_grads(&gs, inputs.as_ref())?;
        }
        // what only the head gave a gradient (the LM head's weight)
        sinking.flush(&mut acc)?;
        Ok((Gradients::from_store(params, &acc), upstream))
    }
}

/// Takes parameter `i`'s final gradient (index into the step's parameter list) during the
/// backward pass: an optimizer that updates the parameter at once (`zaya train
/// --optimizer-in-backward`), so that a whole model's gradients are never alive together.
/// Each parameter with a gradient is handed over exactly once; an error stops the backward
/// pass (parameters handed over before it keep their update).
pub type GradSink<'s> = dyn FnMut(usize, Tensor) -> Result<()> + 's;

/// Routes the gradients a backward pass reports final to a [`GradSink`], if there is one.
struct Sinking<'p, 's, 'k> {
    params: &'p [Param],
    index: HashMap<candle_core::TensorId, usize>,
    taken: Vec<bool>,
    sink: Option<&'k mut GradSink<'s>>,
}

impl<'p, 's, 'k> Sinking<'p, 's, 'k> {
    fn new(params: &'p [Param], sink: Option<&'k mut GradSink<'s>>) -> Self {
        let index = match sink {
            Some(_) => params
                .iter()
                .enumerate()
                .map(|(i, p)| (p.var.as_tensor().id(), i))
                .collect(),
            None => HashMap::new(),
        };
        Sinking {
            params,
            index,
            taken: vec![false; params.len()],
            sink,
        }
    }

    /// The backward's callback for a variable whose gradient `g` is final: a parameter's goes
    /// to the sink (the head's part is in it already: the backward started from it, see
    /// [`seeded`]), anything else stays.
    fn ready(&mut self, var: &Tensor, g: Tensor) -> candle_core::Result<Option<Tensor>> {
        let (Some(sink), Some(&i)) = (self.sink.as_deref_mut(), self.index.get(&var.id())) else {
            return Ok(Some(g));
        };
        if self.taken[i] {
            // a parameter read by two checkpointing segments: its first part already went
            // to the optimizer, so the step would be wrong
            return Err(candle_core::Error::Msg(format!(
                "parameter {} received a gradient after the optimizer took it",
                self.params[i].name
            )));
        }
        let g = g.detach();
        self.taken[i] = true;
        sink(i, g).map_err(candle_core::Error::wrap)?;
        Ok(None)
    }

    /// Hands over the gradients still in `acc` (parameters no segment reads).
    fn flush(&mut self, acc: &mut GradStore) -> Result<()> {
        let Some(sink) = self.sink.as_deref_mut() else {
            return Ok(());
        };
        for (i, p) in self.params.iter().enumerate() {
            if let Some(g) = acc.remove(p.var.as_tensor()) {
                self.taken[i] = true;
                sink(i, g.detach())?;
            }
        }
        Ok(())
    }
}

/// A detached boundary as the input of a segment run without a graph to its inputs.
fn boundary_input(b: &Option<(Tensor, Option<Tensor>)>) -> SegmentInput<'_> {
    match b {
        None => SegmentInput::Embed,
        Some((h, s)) => SegmentInput::Boundary {
            hidden: h,
            state: s.as_ref(),
        },
    }
}

/// Fresh leaves for a detached boundary, so its gradients come out of the backward.
pub fn boundary_leaves(b: Option<&(Tensor, Option<Tensor>)>) -> Result<Option<(Var, Option<Var>)>> {
    b.map(|(h, s)| {
        Ok((
            Var::from_tensor(h)?,
            s.as_ref().map(Var::from_tensor).transpose()?,
        ))
    })
    .transpose()
}

/// Gradients of a range's input boundary (residual stream, router state); `None` for a
/// range that starts from the embedding.
pub type BoundaryGrads = Option<(Tensor, Option<Tensor>)>;

/// Gradients of a segment's boundary inputs (none for the embedding segment).
pub fn boundary_grads(
    gs: &GradStore,
    inputs: Option<&(Var, Option<Var>)>,
) -> Result<BoundaryGrads> {
    let Some((h, s)) = inputs else {
        return Ok(None);
    };
    // Detached: see `accumulate` (the router state feeds `ρ · scale` directly, so its
    // gradient would otherwise carry the next layer's `router_states_scale`).
    let g_h = match gs.get(h.as_tensor()) {
        Some(g) => g.detach(),
        None => h.as_tensor().zeros_like()?,
    };
    let g_s = s
        .as_ref()
        .and_then(|s| gs.get(s.as_tensor()).map(Tensor::detach));
    Ok(Some((g_h, g_s)))
}

/// Runs every layer without keeping a graph beyond one layer; returns the detached
/// final-norm output, the routing stats and the balance-loss values per layer.
fn forward_no_grad(
    p: &Prepared<'_>,
    num_layers: usize,
) -> Result<(Tensor, Vec<LayerRoutingStats>, Vec<f64>)> {
    let mut stats = Vec::with_capacity(num_layers);
    let mut aux_values = Vec::with_capacity(num_layers);
    let mut carry: Option<(Tensor, Option<Tensor>)> = None;
    let mut normed = None;
    for seg in Checkpointing::EveryLayer.segments(num_layers)? {
        let input = match &carry {
            None => SegmentInput::Embed,
            Some((h, s)) => SegmentInput::Boundary {
                hidden: h,
                state: s.as_ref(),
            },
        };
        let run = p.run(seg, input)?;
        stats.extend(run.stats);
        aux_values.extend(run.aux_values);
        normed = run.normed.map(|n| n.detach());
        carry = Some((run.hidden.detach(), run.state.map(|s| s.detach())));
    }
    let normed = normed.ok_or_else(|| ZayaError::Input("the model has no layers".into()))?;
    Ok((normed, stats, aux_values))
}

/// Gradients of a per-token objective of the targets' log-probabilities (see
/// [`LossHead::TokenObjective`]) plus `aux_loss_coef · aux_weight ·` the balance loss, for
/// the `Var`s in `params`: the GRPO backward of full fine-tuning and of LoRA alike. The
/// returned `loss` is 0 (the objective knows its own value); `targets` counts the scored
/// tokens.
pub fn objective_backward_of(
    model: &ZayaModel,
    params: &[Param],
    batch: &Batch,
    opts: &TrainOptions,
    aux_weight: f64,
    temperature: f64,
    objective: &mut dyn FnMut(&TokenLogps) -> Result<Vec<f32>>,
) -> Result<BackwardOutput> {
    let scale = LossScale {
        normalizer: Some(1.0),
        aux_weight,
    };
    forward_backward_of(
        model,
        params,
        batch,
        opts,
        &scale,
        LossHead::TokenObjective {
            temperature,
            objective,
        },
    )
}

/// Log-probabilities and entropies of the counted targets of `batch` under
/// `softmax(logits / temperature)`, without gradients (layer by layer): any model, e.g. the
/// frozen reference policy of GRPO's KL term.
pub fn token_logps_of(
    model: &ZayaModel,
    batch: &Batch,
    opts: &TrainOptions,
    temperature: f64,
) -> Result<TokenLogps> {
    opts.validate()?;
    let p = prepare(model, batch, opts.attn, 0.0)?;
    let (normed, _, _) = forward_no_grad(&p, model.config().num_hidden_layers)?;
    token_logps(p.model, &normed, &p.targets, temperature, opts.loss_chunk)
}

/// Loss without gradients (layer by layer, no graph kept beyond one layer).
pub fn evaluate_of(model: &ZayaModel, batch: &Batch, opts: &TrainOptions) -> Result<EvalOutput> {
    opts.validate()?;
    let num_layers = model.config().num_hidden_layers;
    let p = prepare(model, batch, opts.attn, 0.0)?;
    if p.targets.is_empty() {
        return Err(ZayaError::Input(
            "the batch has no counted label (every target is -100)".into(),
        ));
    }
    // One layer at a time, detaching in between: no graph outlives a layer.
    let (normed, stats, aux_values) = forward_no_grad(&p, num_layers)?;
    let head = chunked_lm_loss(
        p.model,
        &normed,
        &p.targets,
        p.targets.len() as f64,
        opts.loss_chunk,
        false,
    )?;
    let num = aux_values.len().max(1) as f64;
    Ok(EvalOutput {
        loss: head.nll_sum / head.count as f64,
        aux_loss: aux_values.iter().sum::<f64>() / num,
        targets: head.count,
        routing: stats,
    })
}
