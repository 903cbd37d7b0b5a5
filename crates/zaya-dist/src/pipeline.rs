//! Pipeline-parallel training: one stage is the single-device trainable model restricted to
//! a range of decoder layers (the embedding runs on the first stage only; the final norm,
//! LM head and loss on the last), driven through the same forward/backward seam as the
//! single-device step ([`zaya::train::StageBatch`]), so per-layer gradient checkpointing
//! works within a stage exactly as on one device.
//!
//! Between stages travel the residual stream **and** the EDA router state (layer ℓ's router
//! reads the pre-norm state of layer ℓ−1, so the state crosses stage boundaries like the
//! hidden state), one message `[hidden | state]` per micro-batch forward, and their
//! gradients, one message `[d hidden | d state]` per micro-batch backward.
//!
//! Micro-batches run the **1F1B** schedule (Megatron-LM's non-interleaved
//! `forward_backward_pipelining_without_interleaving`): stage `s` of `P` runs
//! `min(P − s − 1, M)` warm-up forwards, then alternates one forward and one backward, then
//! drains the remaining backwards; at most `P − s` micro-batches are in flight on stage `s`.
//! A send is fused with the receive that follows it ([`Comm::send_recv`]), which is what
//! keeps neighbours that both send first from deadlocking.
//!
//! Each micro-batch's losses are weighted as in the single-device step with gradient
//! accumulation ([`LossScale`]: the token NLL divided by the step's global target count,
//! each layer's balance loss by the number of micro-batches and layers), so summing the
//! stages' gradients over micro-batches gives the single-device step's gradients.

use std::collections::HashMap;
use std::ops::Range;

use candle_core::{Device, Tensor};
use zaya::train::{
    Batch, BoundaryGrads, Gradients, LayerRoutingStats, LossHead, LossScale, Param, StageBatch,
    StageForward, StageInput, StageUpstream, TrainOptions,
};
use zaya::{ModelPart, ZayaConfig, ZayaModel};

use crate::comm::Comm;
use crate::error::{ParallelError, ParallelResult};

/// One step of a stage's schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PipeOp {
    Forward(usize),
    Backward(usize),
}

/// The 1F1B order of stage `stage` of `stages` over `micro` micro-batches: warm-up
/// forwards, steady one-forward-one-backward, cool-down backwards.
pub fn one_f_one_b(stages: usize, stage: usize, micro: usize) -> Vec<PipeOp> {
    let warmup = (stages - stage - 1).min(micro);
    let steady = micro - warmup;
    let mut ops = Vec::with_capacity(2 * micro);
    ops.extend((0..warmup).map(PipeOp::Forward));
    for i in 0..steady {
        ops.push(PipeOp::Forward(warmup + i));
        ops.push(PipeOp::Backward(i));
    }
    ops.extend((steady..micro).map(PipeOp::Backward));
    ops
}

/// Decoder layers of stage `stage` of `stages`: equal contiguous ranges; the layer count
/// must divide evenly (an uneven split would leave one stage the bottleneck silently).
pub fn stage_layers(cfg: &ZayaConfig, stages: usize, stage: usize) -> ParallelResult<Range<usize>> {
    let n = cfg.num_hidden_layers;
    if stages == 0 || stage >= stages {
        return Err(ParallelError::Unsupported(format!(
            "stage {stage} of {stages} pipeline stages"
        )));
    }
    if !n.is_multiple_of(stages) {
        return Err(ParallelError::Unsupported(format!(
            "--pp {stages}: the model's {n} decoder layers do not divide into {stages} equal stages"
        )));
    }
    let per = n / stages;
    Ok(stage * per..(stage + 1) * per)
}

/// The part of the model stage `stage` of `stages` holds: its layers, the embedding and
/// input scaling on the first stage, the final norm and LM head on the last (a tied
/// embedding on both, its gradient summed between them).
pub fn stage_part(cfg: &ZayaConfig, stages: usize, stage: usize) -> ParallelResult<ModelPart> {
    Ok(ModelPart {
        layers: stage_layers(cfg, stages, stage)?,
        input: stage == 0,
        output: stage + 1 == stages,
    })
}

/// Whether stage `stage` of `stages` holds (reads and updates) the tensor `name`
/// ([`stage_part`]; false for a stage that does not exist).
pub fn stage_holds(cfg: &ZayaConfig, stages: usize, stage: usize, name: &str) -> bool {
    stage_part(cfg, stages, stage).is_ok_and(|p| p.holds(cfg, name))
}

/// One pipeline stage of a single-device model (the whole model, or only the stage's part:
/// [`stage_part`]): it runs only `layers`, and only
/// `params` (the parameters it holds) get gradients.
pub struct Stage<'m> {
    pub model: &'m ZayaModel,
    pub params: Vec<Param>,
    pub layers: Range<usize>,
    pub stage: usize,
    pub stages: usize,
}

/// What one stage computed over a step's micro-batches.
#[derive(Debug, Clone)]
pub struct StageStep {
    /// Summed over micro-batches, aligned with [`Stage::params`].
    pub grads: Gradients,
    /// Last stage: `Σ_mb nll_sum_mb / normalizer` (the step's loss); 0 elsewhere.
    pub loss: f64,
    /// Last stage: counted targets; 0 elsewhere.
    pub targets: usize,
    /// `Σ_mb aux_weight · Σ_{layers here} aux / num_layers`: this stage's share of the
    /// step's balance loss (the stages' shares sum to the single-device value).
    pub aux: f64,
    /// Routing counts of the stage's layers, merged over the micro-batches.
    pub routing: Vec<LayerRoutingStats>,
}

pub(crate) const fn tag_forward(mb: usize) -> u32 {
    (2 * mb) as u32
}
pub(crate) const fn tag_backward(mb: usize) -> u32 {
    (2 * mb + 1) as u32
}

fn host(t: &Tensor) -> ParallelResult<Vec<f32>> {
    Ok(t.to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?)
}

/// `[hidden | state]` as one message.
pub(crate) fn pack(hidden: &Tensor, state: Option<&Tensor>) -> ParallelResult<Vec<f32>> {
    let mut buf = host(hidden)?;
    if let Some(s) = state {
        buf.extend(host(s)?);
    }
    Ok(buf)
}

/// The inverse of [`pack`] for a `[b, t]` micro-batch: the state is whatever follows the
/// `[b, t, hidden]` residual stream (nothing = no state).
pub(crate) fn unpack(
    buf: Vec<f32>,
    (b, t): (usize, usize),
    hidden: usize,
    what: &str,
) -> ParallelResult<(Tensor, Option<Tensor>)> {
    let n = b * t * hidden;
    let rest = buf.len().checked_sub(n).filter(|r| r % (b * t) == 0);
    let Some(rest) = rest else {
        return Err(ParallelError::Unsupported(format!(
            "{what}: a message of {} values is not a [{b}, {t}, {hidden}] residual stream plus a [{b}, {t}, R] router state",
            buf.len()
        )));
    };
    let dev = Device::Cpu;
    let h = Tensor::from_slice(&buf[..n], (b, t, hidden), &dev)?;
    let s = if rest == 0 {
        None
    } else {
        Some(Tensor::from_slice(&buf[n..], (b, t, rest / (b * t)), &dev)?)
    };
    Ok((h, s))
}

/// A send waiting to be fused with the next receive.
pub(crate) type Pending = Option<(usize, u32, Vec<f32>)>;

pub(crate) fn flush(comm: &dyn Comm, pending: &mut Pending) -> ParallelResult<()> {
    if let Some((dst, tag, data)) = pending.take() {
        comm.send(dst, tag, &data)?;
    }
    Ok(())
}

pub(crate) fn receive(
    comm: &dyn Comm,
    pending: &mut Pending,
    src: usize,
    tag: u32,
) -> ParallelResult<Vec<f32>> {
    Ok(match pending.take() {
        Some((dst, stag, data)) => comm.send_recv(dst, stag, &data, src, tag)?,
        None => comm.recv(src, tag)?,
    })
}

struct InFlight<'a> {
    batch: StageBatch<'a>,
    fwd: StageForward,
    /// Last stage: the head's gradient of the final-norm output and its parameter grads.
    head: Option<(Option<Tensor>, candle_core::backprop::GradStore)>,
}

impl<'m> Stage<'m> {
    /// Stage `stage` of `stages` of `model`, holding the parameters of `all` it reads.
    pub fn new(
        model: &'m ZayaModel,
        all: &[Param],
        stage: usize,
        stages: usize,
    ) -> ParallelResult<Self> {
        let cfg = model.config();
        let layers = stage_layers(cfg, stages, stage)?;
        let params = all
            .iter()
            .filter(|p| stage_holds(cfg, stages, stage, &p.name))
            .cloned()
            .collect();
        Ok(Stage {
            model,
            params,
            layers,
            stage,
            stages,
        })
    }

    fn first(&self) -> bool {
        self.stage == 0
    }
    fn last(&self) -> bool {
        self.stage + 1 == self.stages
    }

    /// Runs this stage's part of a step over `micro` with the 1F1B schedule; `comm` is the
    /// pipeline group (member `s` = stage `s`). Every stage must be given the same
    /// micro-batches (only the first reads the tokens, only the last the labels, but every
    /// stage builds the masks and positions).
    pub fn run_1f1b(
        &self,
        comm: &dyn Comm,
        micro: &[Batch],
        opts: &TrainOptions,
        scale: &LossScale,
    ) -> ParallelResult<StageStep> {
        if comm.size() != self.stages || comm.rank() != self.stage {
            return Err(ParallelError::Unsupported(format!(
                "stage {} of {} given pipeline group member {} of {}",
                self.stage,
                self.stages,
                comm.rank(),
                comm.size()
            )));
        }
        let normalizer = scale.normalizer.ok_or_else(|| {
            ParallelError::Unsupported(
                "a pipeline step needs the step's global target count as its normaliser".into(),
            )
        })?;
        let cfg = self.model.config();
        let hidden = cfg.hidden_size;
        let num_layers = cfg.num_hidden_layers.max(1) as f64;
        let mut total = Gradients::default();
        let mut routing: Vec<LayerRoutingStats> = Vec::new();
        let (mut loss, mut aux, mut targets) = (0.0, 0.0, 0usize);
        let mut inflight: HashMap<usize, InFlight<'_>> = HashMap::new();
        let mut pending: Pending = None;
        for op in one_f_one_b(self.stages, self.stage, micro.len()) {
            match op {
                PipeOp::Forward(i) => {
                    let batch = StageBatch::new(self.model, &micro[i], opts, scale)?;
                    let input = if self.first() {
                        flush(comm, &mut pending)?;
                        StageInput::Embed
                    } else {
                        let buf = receive(comm, &mut pending, self.stage - 1, tag_forward(i))?;
                        let (hidden, state) =
                            unpack(buf, micro[i].shape()?, hidden, "pipeline forward")?;
                        StageInput::Boundary { hidden, state }
                    };
                    let fwd = batch.forward(self.layers.clone(), input, opts.checkpointing)?;
                    for (k, s) in fwd.stats.iter().enumerate() {
                        if routing.len() <= k {
                            routing.push(s.clone());
                        } else {
                            routing[k].merge(s)?;
                        }
                    }
                    aux += scale.aux_weight * fwd.aux_values.iter().sum::<f64>() / num_layers;
                    let head = if self.last() {
                        let out = batch.head(
                            &fwd,
                            normalizer,
                            LossHead::CrossEntropy,
                            opts.loss_chunk,
                        )?;
                        loss += out.nll_sum / normalizer;
                        targets += out.count;
                        Some((out.grad_hidden, out.grads))
                    } else {
                        let (h, s) = fwd.output();
                        pending = Some((self.stage + 1, tag_forward(i), pack(&h, s.as_ref())?));
                        None
                    };
                    inflight.insert(i, InFlight { batch, fwd, head });
                }
                PipeOp::Backward(i) => {
                    let InFlight { batch, fwd, head } = inflight.remove(&i).ok_or_else(|| {
                        ParallelError::Unsupported(format!(
                            "1F1B: backward of micro-batch {i} before its forward"
                        ))
                    })?;
                    let (upstream, acc) = match head {
                        Some((g, acc)) => {
                            flush(comm, &mut pending)?;
                            (StageUpstream::Normed(g), acc)
                        }
                        None => {
                            let buf = receive(comm, &mut pending, self.stage + 1, tag_backward(i))?;
                            let (hidden, state) =
                                unpack(buf, micro[i].shape()?, hidden, "pipeline backward")?;
                            (
                                StageUpstream::Boundary { hidden, state },
                                Default::default(),
                            )
                        }
                    };
                    let (grads, up): (Gradients, BoundaryGrads) =
                        batch.backward(&self.params, fwd, upstream, acc)?;
                    total.accumulate(&grads)?;
                    if !self.first() {
                        let (g_h, g_s) = up.ok_or_else(|| {
                            ParallelError::Unsupported(
                                "no gradient reached the stage's input".into(),
                            )
                        })?;
                        pending =
                            Some((self.stage - 1, tag_backward(i), pack(&g_h, g_s.as_ref())?));
                    }
                }
            }
        }
        flush(comm, &mut pending)?;
        if total.grads.is_empty() {
            total.grads = vec![None; self.params.len()];
        }
        Ok(StageStep {
            grads: total,
            loss,
            targets,
            aux,
            routing,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_f_one_b_has_warmup_steady_and_cooldown() {
        use PipeOp::{Backward as B, Forward as F};
        assert_eq!(
            one_f_one_b(4, 0, 5),
            vec![F(0), F(1), F(2), F(3), B(0), F(4), B(1), B(2), B(3), B(4)]
        );
        assert_eq!(
            one_f_one_b(4, 3, 3),
            vec![F(0), B(0), F(1), B(1), F(2), B(2)]
        );
        assert_eq!(one_f_one_b(4, 0, 2), vec![F(0), F(1), B(0), B(1)]);
        // every micro-batch once each way, forward first, at most `stages - stage` in flight
        for stages in 1..5 {
            for stage in 0..stages {
                for micro in 0..7 {
                    let ops = one_f_one_b(stages, stage, micro);
                    assert_eq!(ops.len(), 2 * micro);
                    let mut live = 0usize;
                    let mut seen = vec![false; micro];
                    for op in ops {
                        match op {
                            F(i) => {
                                seen[i] = true;
                                live += 1;
                                assert!(live <= stages - stage);
                            }
                            B(i) => {
                                assert!(seen[i]);
                                live -= 1;
                            }
                        }
                    }
                    assert_eq!(live, 0);
                }
            }
        }
    }
}
