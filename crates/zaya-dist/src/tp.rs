//! Tensor parallelism for ZAYA1: one rank's slice of the model and its forward pass.
//!
//! Per decoder layer, TP rank `t` of `N`:
//! - CCA: its `Nq/N` query heads (rows of `q_proj`, their conv channels), the KV heads
//!   those heads use (rows of `k_proj`, conv channels, `temp`, and the value heads of those
//!   KV heads from `v_proj_current` / `v_proj_delayed`) — replicated on several ranks when
//!   `N > Nkv`. The key's q/k mean residual needs the mean of the *whole* group's raw
//!   queries; since the projection is linear, the rank holds the group mean of the `q_proj`
//!   rows (`[D, H]` per KV head, built at load) instead of the group's rows.
//! - `o_proj` row-parallel: each rank multiplies its heads' columns, the partial outputs
//!   are all-reduced, the bias is added once after.
//! - Router replicated (every rank takes the same top-1 decision from bit-identical input).
//! - Experts: `gate_up` rows (gate and up halves each) and `down` columns split by the
//!   inner axis; the weighted partial outputs are all-reduced.
//! - Embedding and lm_head vocab-parallel: each rank looks up the ids of its rows (zero
//!   elsewhere) and the lookups are all-reduced; logits are gathered along the vocabulary.
//!
//! Norms, residual scales and the router run replicated; the residual stream is identical
//! on every rank after each all-reduce.
//!
//! The layers take their collectives as a parameter ([`crate::autograd::Coll`]): host
//! collectives for inference, the same collectives with their backward for training
//! ([`train`]).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};

use zaya::attention::{self as core, AttnImplementation};
use zaya::cache::LayerCache;
use zaya::config::LayerType;
use zaya::model::attention::l2_to_sqrt_d;
use zaya::model::decoder::ResidualScaling;
use zaya::model::moe::ZayaRouter;
use zaya::model::rope::RotaryEmbedding;
use zaya::model::{check_input_ids, forward_context, rotary_tables, Linear, Weights};
use zaya::weights::{native_specs, Checkpoint, TensorSpec};
use zaya::{kernels, ForwardOptions, HybridCache, ZayaConfig};

use crate::autograd::{Coll, GatherBackward};
use crate::comm::Comm;
use crate::error::{ParallelError, ParallelResult};
use crate::mesh::Coords;
use crate::plan::{HeadShare, ParallelPlan};
use crate::tensor::all_gather_last;

pub mod train;

/// Reads one rank's slices of a checkpoint, as the plan says.
struct ShardReader<'a> {
    ckpt: &'a Arc<Checkpoint>,
    plan: &'a ParallelPlan,
    coords: Coords,
    specs: HashMap<String, TensorSpec>,
    dtype: DType,
    device: Device,
    /// This rank's tensors given in memory (by HF name, already sliced: the trainable
    /// `Var`s of [`train`]); read instead of the checkpoint.
    given: Option<&'a HashMap<String, Tensor>>,
}

impl ShardReader<'_> {
    fn spec(&self, name: &str) -> ParallelResult<&TensorSpec> {
        self.specs.get(name).ok_or_else(|| {
            ParallelError::Unsupported(format!("tensor `{name}` is not part of this config"))
        })
    }

    /// This rank's selection of `name`.
    fn get(&self, name: &str) -> ParallelResult<Tensor> {
        if let Some(given) = self.given {
            return given.get(name).cloned().ok_or_else(|| {
                ParallelError::Unsupported(format!("tensor `{name}` was not given to this rank"))
            });
        }
        let spec = self.spec(name)?;
        let sel = self.plan.selection(self.coords, spec);
        self.rows(name, &sel.ranges(&spec.shape))
    }

    /// Explicit ranges of `name`.
    fn rows(&self, name: &str, ranges: &[Vec<std::ops::Range<usize>>]) -> ParallelResult<Tensor> {
        let cfg = &self.plan.cfg;
        Ok(self
            .ckpt
            .load_selection(cfg, name, ranges, self.dtype, &self.device)?)
    }

    fn linear(&self, prefix: &str, bias: bool) -> ParallelResult<Linear> {
        let w = self.get(&format!("{prefix}.weight"))?;
        let b = if bias {
            Some(self.get(&format!("{prefix}.bias"))?)
        } else {
            None
        };
        Ok(Linear::dense(w, b))
    }

    /// A value projection restricted to this rank's value heads of one half (`None` when
    /// the rank has none there).
    fn value_linear(&self, prefix: &str, bias: bool) -> ParallelResult<Option<Linear>> {
        let l = self.linear(prefix, bias)?;
        Ok(match l.weight.dims().0 {
            0 => None,
            _ => Some(l),
        })
    }
}

/// A rank's CCA block.
#[derive(Debug, Clone)]
struct TpAttention {
    q_proj: Linear,
    k_proj: Linear,
    /// Query heads per KV head in the model (`Nq / Nkv`).
    group: usize,
    v_current: Option<Linear>,
    v_delayed: Option<Linear>,
    conv_w0: Tensor,
    conv_b0: Tensor,
    conv_w1: Tensor,
    conv_b1: Tensor,
    temp: Tensor,
    o_proj: Linear,
    o_bias: Option<Tensor>,
    heads: HeadShare,
    head_dim: usize,
    conv_history: usize,
}

/// Where an attention call keeps its state: one cache for the whole batch (or none), or,
/// for a decode step of rows at different positions (`T = 1`), one batch-1 cache per row
/// (`window`: the layer's sliding window).
pub(crate) enum AttnCache<'a, 'b> {
    Batch(Option<&'a mut LayerCache>),
    Rows {
        caches: &'a mut [&'b mut LayerCache],
        window: Option<usize>,
    },
}

impl TpAttention {
    fn load(r: &ShardReader, i: usize) -> ParallelResult<Self> {
        let cfg = &r.plan.cfg;
        let p = format!("model.layers.{i}.self_attn");
        let q = format!("{p}.qkv_proj");
        let bias = cfg.attention_bias;
        let heads = r.plan.heads(r.coords.tp);
        let d = cfg.head_dim;
        let group = cfg.num_attention_heads / cfg.num_key_value_heads;
        let o_bias = if bias {
            Some(r.get(&format!("{p}.o_proj.bias"))?)
        } else {
            None
        };
        Ok(TpAttention {
            q_proj: r.linear(&format!("{q}.q_proj"), bias)?,
            k_proj: r.linear(&format!("{q}.k_proj"), bias)?,
            group,
            v_current: r.value_linear(&format!("{q}.v_proj_current"), bias)?,
            v_delayed: r.value_linear(&format!("{q}.v_proj_delayed"), bias)?,
            conv_w0: r.get(&format!("{q}.conv_qk_depthwise.weight"))?,
            conv_b0: r.get(&format!("{q}.conv_qk_depthwise.bias"))?,
            conv_w1: r.get(&format!("{q}.conv_qk_grouped.weight"))?,
            conv_b1: r.get(&format!("{q}.conv_qk_grouped.bias"))?,
            temp: r.get(&format!("{p}.qk_norm.temp"))?,
            o_proj: r.linear(&format!("{p}.o_proj"), false)?,
            o_bias,
            heads,
            head_dim: d,
            conv_history: cfg.conv_state_len(),
        })
    }

    fn forward(
        &self,
        tp: &Coll,
        a: &Tensor,
        inputs: &zaya::model::AttentionInputs,
        mut cache: AttnCache<'_, '_>,
    ) -> ParallelResult<(Tensor, Option<Tensor>)> {
        let a = match inputs.conv_mask {
            Some(m) => a.broadcast_mul(&m.to_dtype(a.dtype())?.unsqueeze(2)?)?,
            None => a.clone(),
        };
        // the (replicated) normed input enters this rank's heads
        let a = tp.copy(&a)?;
        let (b, t, _) = a.dims3()?;
        let d = self.head_dim;
        let (nq, nkv) = (self.heads.query.len(), self.heads.kv.len());
        let per_kv = nq / nkv;
        let s = self.conv_history;

        // This rank's projections of `a` as one product where the weights allow
        // (`Linear::forward_same_input`, as one rank runs them).
        let mut layers = vec![&self.q_proj, &self.k_proj];
        layers.extend(self.v_current.as_ref());
        layers.extend(self.v_delayed.as_ref());
        let mut outs = Linear::forward_same_input(&layers, &a)?.into_iter();
        let mut next = || {
            outs.next().ok_or_else(|| {
                candle_core::Error::Msg("CCA projection: an output per layer expected".into())
            })
        };
        let (q_raw, k_raw) = (next()?, next()?);
        let vc_out = self.v_current.as_ref().map(|_| next()).transpose()?;
        let vd_out = self.v_delayed.as_ref().map(|_| next()).transpose()?;
        let u = Tensor::cat(&[&q_raw, &k_raw], D::Minus1)?;
        let c = u.dim(2)?;
        let k_rep = k_raw
            .reshape((b, t, nkv, 1, d))?
            .broadcast_as((b, t, nkv, per_kv, d))?
            .reshape((b, t, nq, d))?;
        let mq = ((q_raw.reshape((b, t, nq, d))? + k_rep)? * 0.5)?;
        let mk = if per_kv == self.group {
            // whole groups on this rank: the mean as one rank takes it
            mq.reshape((b, t, nkv, per_kv, d))?.mean(3)?
        } else {
            // A group spread over several ranks (more ranks than KV heads): each rank puts
            // the sum of its query heads into its KV head's slot, the slots are summed over
            // the TP group (every query head counted once, in rank order as one rank would
            // add them), then divided by the group size.
            let nkv_all = self.heads.kv_total;
            let local = mq.reshape((b, t, nkv, per_kv, d))?.sum(3)?;
            let mut slots = Vec::with_capacity(nkv_all);
            for j in 0..nkv_all {
                if self.heads.kv.contains(&j) {
                    slots.push(local.narrow(2, j - self.heads.kv.start, 1)?);
                } else {
                    slots.push(Tensor::zeros((b, t, 1, d), local.dtype(), local.device())?);
                }
            }
            // each rank then uses its own KV heads of the sum: the backward sums those uses
            let summed = tp.reduce_both(&Tensor::cat(&slots, 2)?)?;
            (summed.narrow(2, self.heads.kv.start, nkv)? / self.group as f64)?
        };

        // The conv history and the previous token's delayed value (`first`, `[B, 1, ·]`):
        // the batch cache's, or each row's (zeros, and the delayed value of a zero input, for
        // a row without state yet), exactly as a single-row call would take them.
        let no_state = |rows: usize| Tensor::zeros((rows, s, c), u.dtype(), u.device());
        let first_of = |rec: Option<&Tensor>, rows: usize| -> ParallelResult<Option<Tensor>> {
            Ok(match (&self.v_delayed, rec) {
                (None, _) => None,
                (Some(_), Some(r)) => Some(r.unsqueeze(1)?),
                (Some(vdl), None) => Some(vdl.forward(&Tensor::zeros(
                    (rows, 1, a.dim(2)?),
                    a.dtype(),
                    a.device(),
                )?)?),
            })
        };
        let (history, first) = match &cache {
            AttnCache::Batch(Some(c)) if c.has_previous_state() => (
                match c.conv_state() {
                    Some(h) => h.clone(),
                    None => no_state(b)?,
                },
                first_of(c.recurrent_state(), b)?,
            ),
            AttnCache::Batch(_) => (no_state(b)?, first_of(None, b)?),
            AttnCache::Rows { caches, .. } => {
                let mut hs = Vec::with_capacity(b);
                let mut fs = Vec::with_capacity(b);
                for c in caches.iter() {
                    let (h, f) = match (c.conv_state(), c.recurrent_state()) {
                        (Some(h), r) if c.has_previous_state() => (h.clone(), first_of(r, 1)?),
                        _ => (no_state(1)?, first_of(None, 1)?),
                    };
                    hs.push(h);
                    fs.extend(f);
                }
                let first = if fs.is_empty() {
                    None
                } else {
                    Some(Tensor::cat(&fs, 0)?)
                };
                (Tensor::cat(&hs, 0)?, first)
            }
        };
        let x = if s > 0 {
            Tensor::cat(&[&history, &u], 1)?
        } else {
            u.clone()
        };
        // Packed documents: the same per-document convolution as one rank, on this rank's
        // heads (the conv is per head, so a head's channels need nothing from other ranks).
        let z = match inputs.same_document {
            None => kernels::cca_conv(
                &x,
                &self.conv_w0,
                &self.conv_b0,
                &self.conv_w1,
                &self.conv_b1,
                nq + nkv,
            )?,
            Some(same) => zaya::model::attention::convolve_documents(
                &x,
                same,
                &self.conv_w0,
                &self.conv_b0,
                &self.conv_w1,
                &self.conv_b1,
                nq + nkv,
            )?,
        };
        let q = (z.narrow(2, 0, nq * d)?.reshape((b, t, nq, d))? + mq)?;
        let k = (z.narrow(2, nq * d, nkv * d)?.reshape((b, t, nkv, d))? + mk)?;

        // Values: this rank's current heads, then its delayed heads (the previous token's).
        let mut parts = Vec::with_capacity(2);
        parts.extend(vc_out);
        let rec = match (vd_out, first) {
            (Some(vd), Some(first)) => {
                let vdel = if t > 1 {
                    Tensor::cat(&[&first, &vd.narrow(1, 0, t - 1)?], 1)?
                } else {
                    first.clone()
                };
                // A document start inside a packed row takes the start-of-sequence delayed
                // value, as one rank does.
                let vdel = match inputs.same_document {
                    Some(same) => {
                        let keep = same.narrow(2, 1, 1)?.to_dtype(vdel.dtype())?;
                        let start_value = first.broadcast_as(vdel.shape())?;
                        (vdel.broadcast_mul(&keep)?
                            + start_value.broadcast_mul(&(1.0 - &keep)?)?)?
                    }
                    None => vdel,
                };
                parts.push(vdel);
                vd.narrow(1, t - 1, 1)?.squeeze(1)?.contiguous()?
            }
            _ => Tensor::zeros((b, 0), a.dtype(), a.device())?,
        };
        let v = Tensor::cat(&parts, D::Minus1)?.reshape((b, t, nkv, d))?;

        let q = l2_to_sqrt_d(&q, d)?;
        let k = l2_to_sqrt_d(&k, d)?.broadcast_mul(&self.temp.reshape((1, 1, nkv, 1))?)?;
        let q = kernels::rotary(&q.transpose(1, 2)?, inputs.cos, inputs.sin)?;
        let k = kernels::rotary(&k.transpose(1, 2)?, inputs.cos, inputs.sin)?;
        let v = v.transpose(1, 2)?;
        let conv = if s > 0 {
            x.narrow(1, x.dim(1)? - s, s)?.contiguous()?
        } else {
            Tensor::zeros((b, 0, c), u.dtype(), u.device())?
        };
        let scale = 1.0 / (d as f64).sqrt();
        let (o, probs) = match &mut cache {
            AttnCache::Batch(cache) => {
                let (k, v) = match cache.as_deref_mut() {
                    Some(cache) => {
                        cache.set_cca_state(conv, rec);
                        cache.update_kv(&k.contiguous()?, &v.contiguous()?)?
                    }
                    None => (k, v),
                };
                // with `want_probs`, the eager path and this rank's heads' probabilities
                core::attend(
                    inputs.backend,
                    &q,
                    &k,
                    &v,
                    inputs.mask,
                    scale,
                    inputs.want_probs,
                )?
            }
            AttnCache::Rows { caches, window } => {
                // each row over its own keys, as a single-row decode step does
                let mut outs = Vec::with_capacity(b);
                for (row, cache) in caches.iter_mut().enumerate() {
                    cache.set_cca_state(
                        conv.narrow(0, row, 1)?.contiguous()?,
                        rec.narrow(0, row, 1)?.contiguous()?,
                    );
                    let (past, held) = (cache.seen(), cache.kv_len());
                    let (k_all, v_all) = cache.update_kv(
                        &k.narrow(0, row, 1)?.contiguous()?,
                        &v.narrow(0, row, 1)?.contiguous()?,
                    )?;
                    let mask = core::MaskSpec {
                        batch: 1,
                        q_start: past,
                        q_len: 1,
                        kv_start: past - held,
                        kv_len: held + 1,
                        window: *window,
                        key_padding: None,
                        documents: None,
                    };
                    let q_row = q.narrow(0, row, 1)?;
                    outs.push(
                        core::attend(inputs.backend, &q_row, &k_all, &v_all, &mask, scale, false)?
                            .0,
                    );
                }
                (Tensor::cat(&outs, 0)?, None)
            }
        };
        let o = o.transpose(1, 2)?.reshape((b, t, nq * d))?;
        let partial = self.o_proj.forward(&o)?;
        let out = tp.reduce(&partial)?;
        let out = match &self.o_bias {
            Some(bias) => out.broadcast_add(bias)?,
            None => out,
        };
        Ok((out, probs))
    }
}

#[derive(Debug, Clone)]
struct TpLayer {
    layer_type: LayerType,
    input_layernorm: Tensor,
    attn: TpAttention,
    post_attention_residual_scale: ResidualScaling,
    post_attention_layernorm: Tensor,
    router: ZayaRouter,
    /// `[E, 2·I/N, H]`, gate rows first.
    gate_up: Tensor,
    /// `[E, H, I/N]`.
    down: Tensor,
    post_mlp_residual_scale: ResidualScaling,
}

/// The router's choice per token of each layer (the same on every rank).
pub type Choices = Vec<Vec<u32>>;

#[derive(Debug, Clone)]
struct InputPart {
    embed: Tensor,
    scale: Tensor,
    bias: Tensor,
}

#[derive(Debug, Clone)]
struct OutputPart {
    norm: Tensor,
    lm_head: Linear,
}

/// The groups one rank computes with: its TP group, its pipeline group (the ranks of the
/// other stages with the same TP and EP coordinates) and its EP group.
#[derive(Clone, Copy)]
pub struct Groups<'a> {
    pub tp: &'a dyn Comm,
    pub pp: &'a dyn Comm,
    pub ep: &'a dyn Comm,
}

/// The collectives a layer runs with (inference: borrowed, no graph; training: owned,
/// recorded with their backward).
#[derive(Clone)]
pub(crate) struct Colls<'a> {
    pub(crate) tp: Coll<'a>,
    pub(crate) ep: Coll<'a>,
}

impl<'a> Colls<'a> {
    fn host(g: &Groups<'a>) -> Self {
        Colls {
            tp: Coll::Host(g.tp),
            ep: Coll::Host(g.ep),
        }
    }
}

impl crate::mesh::Mesh {
    pub fn groups(&self) -> Groups<'_> {
        Groups {
            tp: self.tp.as_ref(),
            pp: self.pp.as_ref(),
            ep: self.ep.as_ref(),
        }
    }
}

/// Message tags between pipeline stages.
const TAG_HIDDEN: u32 = 1;
const TAG_ROUTER_STATE: u32 = 2;
/// A later stage's captures, sent to the first stage.
const TAG_CAPTURES: u32 = 3;

/// What a mesh forward records besides the logits: `opts.capture` (hidden states,
/// attention probabilities) and, here, the router logits and choices of every layer.
#[derive(Debug, Clone, Copy, Default)]
pub struct MeshCapture {
    pub router_logits: bool,
}

/// A mesh forward's outputs. The captures are those of the whole model (every layer, the
/// same names, shapes and order as [`zaya::ModelOutput`]) on the ranks of the first
/// pipeline stage — each later stage sends its layers' captures there — and those of its
/// own layers on the other ranks.
#[derive(Debug, Clone)]
pub struct MeshOutput {
    /// `[B, T', V]`, full (the same on every rank).
    pub logits: Tensor,
    /// The router's choices of this stage's layers.
    pub choices: Choices,
    /// `L + 1` tensors `[B, T, H]` (f32): the scaled embedding, the inputs of layers
    /// 1..L, the final-norm output.
    pub hidden_states: Vec<Tensor>,
    /// Per layer `[B, Nq, T, N]`: every query head, in the model's head order.
    pub attentions: Vec<Tensor>,
    /// Per layer `[B·T, E+1]` raw router logits.
    pub router_logits: Vec<Tensor>,
    /// Per layer, the chosen class per token (`E` = skip), with `router_logits`.
    pub expert_choices: Choices,
}

/// One TP rank of a ZAYA1 model. The model is `&self`; the cache (holding this rank's
/// heads) and the router state are values, as in [`zaya::ZayaModel`].
#[derive(Debug, Clone)]
pub struct TpModel {
    cfg: ZayaConfig,
    /// `cfg` restricted to this stage's layers (what its cache and masks are built from).
    stage_cfg: ZayaConfig,
    plan: ParallelPlan,
    coords: Coords,
    tp_rank: usize,
    /// Global indices of this stage's decoder layers.
    layer_range: std::ops::Range<usize>,
    /// First stage: the embedding slice `[V/N, H]` (rows `vocab_start..`), input scale, bias.
    input: Option<InputPart>,
    vocab_start: usize,
    layers: Vec<TpLayer>,
    /// Last stage: the final norm and the lm_head rows of this rank's vocabulary slice.
    output: Option<OutputPart>,
    rotary: BTreeMap<LayerType, RotaryEmbedding>,
    dtype: DType,
    device: Device,
}

impl TpModel {
    /// Opens a checkpoint and reads the slices of TP rank `tp_rank` under `plan` (only
    /// those bytes are read from the files).
    pub fn load(
        dir: impl AsRef<Path>,
        plan: &ParallelPlan,
        tp_rank: usize,
        dtype: DType,
        device: &Device,
    ) -> ParallelResult<Self> {
        let ckpt = Arc::new(Checkpoint::open(dir)?);
        let cfg = ckpt.config()?;
        if cfg != plan.cfg {
            return Err(ParallelError::Unsupported(
                "the plan was made for another config than this checkpoint's".into(),
            ));
        }
        ckpt.validate(&cfg)?;
        Self::from_checkpoint(&ckpt, plan, tp_rank, dtype, device)
    }

    /// TP rank `tp_rank` of a tensor-parallel plan (one pipeline stage).
    pub fn from_checkpoint(
        ckpt: &Arc<Checkpoint>,
        plan: &ParallelPlan,
        tp_rank: usize,
        dtype: DType,
        device: &Device,
    ) -> ParallelResult<Self> {
        let coords = Coords {
            tp: tp_rank,
            pp: 0,
            ep: 0,
            dp: 0,
        };
        Self::at(ckpt, plan, coords, dtype, device)
    }

    /// The rank at `coords` of the mesh: its TP slices of its pipeline stage's layers (the
    /// embedding on the first stage, the final norm and lm_head on the last).
    pub fn at(
        ckpt: &Arc<Checkpoint>,
        plan: &ParallelPlan,
        coords: Coords,
        dtype: DType,
        device: &Device,
    ) -> ParallelResult<Self> {
        Self::build(ckpt, plan, coords, dtype, device, None)
    }

    /// [`TpModel::at`] reading the rank's tensors from `given` (HF name → this rank's
    /// slice) instead of the checkpoint; `ckpt` only names the config.
    fn build(
        ckpt: &Arc<Checkpoint>,
        plan: &ParallelPlan,
        coords: Coords,
        dtype: DType,
        device: &Device,
        given: Option<&HashMap<String, Tensor>>,
    ) -> ParallelResult<Self> {
        let m = plan.mesh;
        // bf16 runs the single-rank model's bf16 semantics (bf16 weights and activations
        // between ops, f32 residual stream, f32 on the wire); f16 is not tested on ranks.
        if !matches!(dtype, DType::F32 | DType::BF16) {
            return Err(ParallelError::Unsupported(format!(
                "ranks run in f32 or bf16 (asked: {dtype:?})"
            )));
        }
        if coords.tp >= m.tp || coords.pp >= m.pp || coords.ep >= m.ep {
            return Err(ParallelError::Unsupported(format!(
                "rank {coords:?} outside the mesh {}",
                m.label()
            )));
        }
        let tp_rank = coords.tp;
        let cfg = plan.cfg.clone();
        let r = ShardReader {
            ckpt,
            plan,
            coords,
            specs: native_specs(&cfg)
                .into_iter()
                .map(|s| (s.name.clone(), s))
                .collect(),
            dtype,
            device: device.clone(),
            given,
        };
        // Replicated tensors go through the model's own constructors.
        let vb = match given {
            Some(g) => Weights::from(candle_nn::VarBuilder::from_tensors(
                g.clone(),
                dtype,
                device,
            )),
            None => Weights::from(ckpt.var_builder(&cfg, dtype, device)),
        };
        let h = cfg.hidden_size;
        let layer_range = plan.stage_layers(coords.pp);
        let mut layers = Vec::with_capacity(layer_range.len());
        for i in layer_range.clone() {
            let lv = vb.pp("model.layers").pp(i);
            let p = format!("model.layers.{i}");
            layers.push(TpLayer {
                layer_type: cfg.layer_types[i],
                input_layernorm: r.get(&format!("{p}.input_layernorm.weight"))?,
                attn: TpAttention::load(&r, i)?,
                post_attention_residual_scale: ResidualScaling::new(
                    h,
                    lv.pp("post_attention_residual_scale"),
                )?,
                post_attention_layernorm: r.get(&format!("{p}.post_attention_layernorm.weight"))?,
                router: ZayaRouter::new(&cfg, i, lv.pp("mlp").pp("gate"))?,
                gate_up: r.get(&format!("{p}.mlp.experts.gate_up_proj"))?,
                down: r.get(&format!("{p}.mlp.experts.down_proj"))?,
                post_mlp_residual_scale: ResidualScaling::new(h, lv.pp("post_mlp_residual_scale"))?,
            });
        }
        let first = coords.pp == 0;
        let last = coords.pp + 1 == m.pp;
        let input = if first {
            Some(InputPart {
                embed: r.get("model.embed_tokens.weight")?,
                scale: r.get("model.input_hidden_states_scale")?,
                bias: r.get("model.input_hidden_states_bias")?,
            })
        } else {
            None
        };
        let output = if last {
            let lm_bias = if cfg.lm_head_bias {
                Some(r.get("lm_head.bias")?)
            } else {
                None
            };
            let weight = match (&input, cfg.tie_word_embeddings) {
                (Some(i), true) => i.embed.clone(),
                (None, true) => r.get("model.embed_tokens.weight")?,
                (_, false) => r.get("lm_head.weight")?,
            };
            Some(OutputPart {
                norm: r.get("model.norm.weight")?,
                lm_head: Linear::dense(weight, lm_bias),
            })
        } else {
            None
        };
        let mut stage_cfg = cfg.clone();
        stage_cfg.num_hidden_layers = layer_range.len();
        stage_cfg.layer_types = cfg.layer_types[layer_range.clone()].to_vec();
        Ok(TpModel {
            rotary: rotary_tables(&stage_cfg),
            vocab_start: tp_rank * (cfg.vocab_size / m.tp),
            input,
            output,
            layers,
            layer_range,
            plan: plan.clone(),
            coords,
            tp_rank,
            stage_cfg,
            cfg,
            dtype,
            device: device.clone(),
        })
    }

    /// An empty cache for this rank: its stage's layers, its heads.
    pub fn new_cache(&self) -> HybridCache {
        HybridCache::new(&self.stage_cfg)
    }

    /// Global indices of this rank's decoder layers.
    pub fn layer_range(&self) -> std::ops::Range<usize> {
        self.layer_range.clone()
    }

    pub fn config(&self) -> &ZayaConfig {
        &self.cfg
    }

    pub fn plan(&self) -> &ParallelPlan {
        &self.plan
    }

    pub fn tp_rank(&self) -> usize {
        self.tp_rank
    }

    /// Bytes of the weights this rank holds.
    pub fn weight_bytes(&self) -> usize {
        let t = |x: &Tensor| x.elem_count() * x.dtype().size_in_bytes();
        let lin = |l: &Linear| l.bytes();
        let mut total = 0;
        if let Some(i) = &self.input {
            total += t(&i.embed) + t(&i.scale) + t(&i.bias);
        }
        if let Some(o) = &self.output {
            total += t(&o.norm);
            if !self.cfg.tie_word_embeddings || self.input.is_none() {
                total += lin(&o.lm_head);
            }
        }
        for l in &self.layers {
            let a = &l.attn;
            total += t(&l.input_layernorm)
                + t(&l.post_attention_layernorm)
                + lin(&a.q_proj)
                + lin(&a.k_proj)
                + a.v_current.as_ref().map_or(0, lin)
                + a.v_delayed.as_ref().map_or(0, lin)
                + [&a.conv_w0, &a.conv_b0, &a.conv_w1, &a.conv_b1, &a.temp]
                    .into_iter()
                    .map(t)
                    .sum::<usize>()
                + lin(&a.o_proj)
                + l.router.weight_bytes()
                + t(&l.gate_up)
                + t(&l.down);
        }
        total
    }

    /// Vocab-parallel lookup: rows of this rank's slice, zero for the other ids, summed
    /// over the group; then the input scale and bias into the f32 stream.
    fn embed(&self, tp: &Coll, input: &InputPart, ids: &[Vec<i64>]) -> ParallelResult<Tensor> {
        let (b, t) = (ids.len(), ids[0].len());
        let per = input.embed.dim(0)?;
        let pad = self.cfg.pad_token_id.map(|p| p as i64);
        let mut local = Vec::with_capacity(b * t);
        let mut keep = Vec::with_capacity(b * t);
        let mut pads = Vec::with_capacity(b * t);
        for &id in ids.iter().flatten() {
            let i = id as usize;
            let mine = i >= self.vocab_start && i < self.vocab_start + per;
            local.push(if mine {
                (i - self.vocab_start) as u32
            } else {
                0
            });
            keep.push(if mine { 1f32 } else { 0f32 });
            pads.push(u8::from(Some(id) == pad));
        }
        let local = Tensor::from_vec(local, b * t, &self.device)?;
        let keep = Tensor::from_vec(keep, (b * t, 1), &self.device)?.to_dtype(self.dtype)?;
        let mut rows = input.embed.index_select(&local, 0)?;
        // `padding_idx`: the pad row gets no gradient from the lookup (as the single-rank
        // model; only when a graph is recorded).
        if input.embed.track_op() && pads.contains(&1) {
            let is_pad = Tensor::from_vec(pads, (b * t, 1), &self.device)?
                .broadcast_as(rows.shape())?
                .contiguous()?;
            rows = is_pad.where_cond(&rows.detach(), &rows)?;
        }
        let e = rows.broadcast_mul(&keep)?;
        let e = tp.reduce(&e)?.reshape((b, t, self.cfg.hidden_size))?;
        Ok(e.broadcast_add(&input.bias)?
            .broadcast_mul(&input.scale)?
            .to_dtype(DType::F32)?)
    }

    #[allow(clippy::too_many_arguments)]
    fn layer_forward(
        &self,
        g: &Colls,
        idx: usize,
        h: &Tensor,
        state: Option<&Tensor>,
        ctx: &zaya::model::ForwardContext,
        cache: AttnCache<'_, '_>,
        want_probs: bool,
    ) -> ParallelResult<(Tensor, zaya::model::Routing, Option<Tensor>)> {
        let l = &self.layers[idx];
        let eps = self.cfg.rms_norm_eps;
        let (cos, sin) = &ctx.rope[&l.layer_type];
        let inputs = zaya::model::AttentionInputs {
            mask: &ctx.masks[&l.layer_type],
            cos,
            sin,
            conv_mask: ctx.conv_mask.as_ref(),
            same_document: ctx.same_document.as_ref(),
            want_probs,
            backend: ctx.attn,
        };
        let a = kernels::rms_norm(&h.to_dtype(self.dtype)?, &l.input_layernorm, eps)?;
        let (attn, probs) = l.attn.forward(&g.tp, &a, &inputs, cache)?;
        let r = l.post_attention_residual_scale.forward(&attn, h)?;
        let n = kernels::rms_norm(&r.to_dtype(self.dtype)?, &l.post_attention_layernorm, eps)?;
        let (b, t, hd) = n.dims3()?;
        let routing = l.router.forward(&n, state)?;
        let flat = n.reshape((b * t, hd))?;
        // The tokens and their routing weights (replicated) enter this rank's expert slices.
        let xw = Tensor::cat(&[&flat, &routing.weight.to_dtype(flat.dtype())?], 1)?;
        let xw = g.tp.copy(&xw)?;
        let partial = if g.ep.size() > 1 {
            self.ep_experts(&g.ep, l, &xw, &routing.choice)?
        } else {
            let x = xw.narrow(1, 0, hd)?;
            let w = xw.narrow(1, hd, 1)?.to_dtype(routing.weight.dtype())?;
            kernels::moe_experts(&x, &routing.choice, &w, &l.gate_up, &l.down)?
        };
        let m = g.tp.reduce(&partial)?.reshape((b, t, hd))?;
        Ok((l.post_mlp_residual_scale.forward(&m, &r)?, routing, probs))
    }

    /// Expert parallelism: the router (replicated) has chosen an expert for every token;
    /// this EP rank takes its contiguous share of the tokens, sends each token routed to
    /// an expert (with its routing weight; the expert's local index travels beside) to the
    /// rank holding it by an all-to-all, computes the tokens it received with its experts,
    /// returns the outputs by the inverse all-to-all and places them back in token order.
    /// Skip-routed tokens never leave their rank (their output is zero). The shares are then
    /// gathered so every EP rank holds all `[N, H]` outputs (attention runs replicated over
    /// EP). `xw` is `[N, H + 1]`: the tokens and their routing weights. With [`Coll::Grad`]
    /// every step has its backward (the inverse all-to-all, the own rows of the gather).
    fn ep_experts(
        &self,
        ep: &Coll,
        l: &TpLayer,
        xw: &Tensor,
        choice: &[u32],
    ) -> ParallelResult<Tensor> {
        let (n, h1) = xw.dims2()?;
        let h = h1 - 1;
        let (p, q) = (ep.size(), ep.rank());
        let experts = self.cfg.num_experts;
        let per = experts / p;
        let share = n.div_ceil(p);
        let mine = (q * share).min(n)..((q + 1) * share).min(n);
        // this rank's routed tokens, grouped by destination (token order inside a group)
        let mut order: Vec<Vec<usize>> = vec![Vec::new(); p];
        let mut local_ids: Vec<Vec<f32>> = vec![Vec::new(); p];
        for i in mine.clone() {
            let c = choice[i] as usize;
            if c >= experts {
                continue; // skip class: stays here, contributes zero
            }
            let dest = c / per;
            order[dest].push(i);
            local_ids[dest].push((c - dest * per) as f32);
        }
        let counts: Vec<usize> = order.iter().map(Vec::len).collect();
        let sel: Vec<u32> = order.iter().flatten().map(|&i| i as u32).collect();
        let sel = Tensor::from_vec(sel, counts.iter().sum::<usize>(), &self.device)?;
        let xw = ep.copy(xw)?;
        let sent = xw.index_select(&sel, 0)?;
        let (got, recv) = ep.all_to_all_rows(&sent, &counts)?;
        let ids: Vec<u32> = ep
            .comm()
            .all_to_all_v(&local_ids)?
            .into_iter()
            .flatten()
            .map(|v| v as u32)
            .collect();
        let total: usize = recv.iter().sum();
        if ids.len() != total {
            return Err(ParallelError::Unsupported(format!(
                "EP rank {q} received {total} tokens but {} expert indices",
                ids.len()
            )));
        }
        let x = got.narrow(1, 0, h)?;
        let out = if total > 0 {
            let w = got.narrow(1, h, 1)?;
            // the whole forward's size, as one rank sees it (see `moe_experts_of_forward`)
            kernels::moe_experts_of_forward(&x, &ids, &w, &l.gate_up, &l.down, n)?
        } else {
            // nothing to compute, but the return trip (and its backward) still runs
            x.affine(0.0, 0.0)?
        };
        let (back, _) = ep.all_to_all_rows(&out.contiguous()?, &recv)?;
        let local = Tensor::zeros((share, h), back.dtype(), &self.device)?;
        let at: Vec<u32> = order
            .iter()
            .flatten()
            .map(|&i| (i - mine.start) as u32)
            .collect();
        let local = if at.is_empty() {
            // Every token of this share is skip-routed: nothing comes back, but the return
            // trip must stay in the graph (its backward is a collective the other members
            // run too).
            local.broadcast_add(&back.sum_keepdim(0)?)?
        } else {
            local.index_add(&Tensor::from_vec(at, back.dim(0)?, &self.device)?, &back, 0)?
        };
        let all = ep.all_gather_rows(&local, GatherBackward::OwnRows)?;
        Ok(all.narrow(0, 0, n)?)
    }

    /// The forward pass of a tensor-parallel rank (one stage; every rank of the TP group
    /// calls it with the same inputs). Returns the full logits `[B, T', V]` (gathered; the
    /// same on every rank) and the router's choices per layer. With a cache (from
    /// [`TpModel::new_cache`]), continues after its tokens.
    pub fn forward(
        &self,
        comm: &dyn Comm,
        input_ids: &Tensor,
        cache: Option<&mut HybridCache>,
        opts: &ForwardOptions,
    ) -> ParallelResult<(Tensor, Choices)> {
        let solo = crate::local::LocalWorld::new(1, crate::comm::DEFAULT_TIMEOUT)?.comm(0);
        let g = Groups {
            tp: comm,
            pp: &solo,
            ep: &solo,
        };
        self.forward_mesh(g, input_ids, cache, opts)
    }

    /// The forward pass of the rank at this model's coordinates: `tp` is its TP group, `pp`
    /// its pipeline group (the ranks of the other stages with the same TP coordinate).
    /// Stage 0 embeds; each stage runs its layers and sends the residual stream **and the
    /// router state** (EDA) to the next; the last stage computes the logits, which are
    /// broadcast back over the pipeline group, so every rank returns the full logits. The
    /// choices are those of this stage's layers.
    pub fn forward_mesh(
        &self,
        g: Groups,
        input_ids: &Tensor,
        cache: Option<&mut HybridCache>,
        opts: &ForwardOptions,
    ) -> ParallelResult<(Tensor, Choices)> {
        let out = self.forward_mesh_captured(g, input_ids, cache, opts, MeshCapture::default())?;
        Ok((out.logits, out.choices))
    }

    /// [`TpModel::forward_mesh`] with the captures `opts.capture` and `extra` ask for:
    /// hidden states (replicated over TP and EP), attention probabilities (this rank's query
    /// heads gathered over the TP group; the eager attention computes them), router logits
    /// and choices (the router is replicated). A later pipeline stage sends its captures
    /// to the first stage after the logits, so the first stage's ranks return the whole
    /// model's.
    pub fn forward_mesh_captured(
        &self,
        g: Groups,
        input_ids: &Tensor,
        mut cache: Option<&mut HybridCache>,
        opts: &ForwardOptions,
        extra: MeshCapture,
    ) -> ParallelResult<MeshOutput> {
        let m = self.plan.mesh;
        let (tp, pp) = (g.tp, g.pp);
        let colls = Colls::host(&g);
        let fits = |c: &dyn Comm, size: usize, rank: usize| c.size() == size && c.rank() == rank;
        if !fits(tp, m.tp, self.coords.tp)
            || !fits(pp, m.pp, self.coords.pp)
            || !fits(g.ep, m.ep, self.coords.ep)
        {
            return Err(ParallelError::Unsupported(format!(
                "groups tp {}/{}, pp {}/{}, ep {}/{} (rank/size) drive the rank at {:?} of {}",
                tp.rank(),
                tp.size(),
                pp.rank(),
                pp.size(),
                g.ep.rank(),
                g.ep.size(),
                self.coords,
                m.label()
            )));
        }
        let cap = opts.capture;
        if let Some(c) = cache.as_deref() {
            c.check(&self.stage_cfg)?;
        }
        let past = cache.as_ref().map_or(0, |c| c.seq_len());
        let ids = check_input_ids(&self.cfg, input_ids, past)?;
        let (b, t) = (ids.len(), ids[0].len());
        let ctx = forward_context(
            &self.stage_cfg,
            &self.rotary,
            self.dtype,
            &self.device,
            b,
            t,
            cache.as_deref(),
            opts,
        )?;
        let (mut h, mut state) = match &self.input {
            Some(input) => (self.embed(&colls.tp, input, &ids)?, None),
            None => self.recv_from_previous_stage(pp, b, t)?,
        };
        let mut choices = Vec::with_capacity(self.layers.len());
        let mut hidden_states = Vec::new();
        let mut attentions = Vec::new();
        let mut router_logits = Vec::new();
        for idx in 0..self.layers.len() {
            let layer_cache = match cache.as_deref_mut() {
                None => None,
                Some(c) => Some(c.layer_mut(idx).ok_or_else(|| {
                    ParallelError::Unsupported(format!("cache has no layer {idx}"))
                })?),
            };
            if cap.hidden_states {
                hidden_states.push(h.clone());
            }
            let (next, routing, probs) = self.layer_forward(
                &colls,
                idx,
                &h,
                state.as_ref(),
                &ctx,
                AttnCache::Batch(layer_cache),
                cap.attentions,
            )?;
            if cap.attentions {
                let p = probs.ok_or_else(|| {
                    ParallelError::Unsupported(format!(
                        "layer {} gave no attention probabilities",
                        self.layer_range.start + idx
                    ))
                })?;
                // this rank's query heads (a contiguous range, in rank order) to all heads
                attentions.push(crate::tensor::all_gather_axis(tp, &p, 1)?);
            }
            if extra.router_logits {
                router_logits.push(routing.logits.clone());
            }
            h = next;
            choices.push(routing.choice);
            state = Some(routing.state);
        }
        let keep = opts.logits_to_keep;
        let kept = if keep > 0 && keep < t { keep } else { t };
        let logits = match &self.output {
            None => {
                self.send_to_next_stage(pp, &h, state.as_ref())?;
                None
            }
            Some(out) => {
                let y =
                    kernels::rms_norm(&h.to_dtype(self.dtype)?, &out.norm, self.cfg.rms_norm_eps)?;
                if cap.hidden_states {
                    hidden_states.push(y.clone());
                }
                let y = if kept < t {
                    y.narrow(1, t - kept, kept)?
                } else {
                    y
                };
                let local = out.lm_head.forward(&y)?;
                Some(all_gather_last(tp, &local)?)
            }
        };
        let mut expert_choices = if extra.router_logits {
            choices.clone()
        } else {
            Vec::new()
        };
        let logits = self.logits_on_every_stage(pp, logits, b, kept)?;
        if m.pp > 1 && (cap.hidden_states || cap.attentions || extra.router_logits) {
            self.gather_captures(
                pp,
                &mut hidden_states,
                &mut attentions,
                &mut router_logits,
                &mut expert_choices,
            )?;
        }
        Ok(MeshOutput {
            logits,
            choices,
            hidden_states,
            attentions,
            router_logits,
            expert_choices,
        })
    }

    /// One decode step for independent rows at different positions on the mesh: `tokens[i]`
    /// is fed after the state in `caches[i]` (this rank's batch-1 cache of row `i`, possibly
    /// empty). Projections, router and experts run batched over the rows (with their
    /// collectives once per layer, not once per row); attention runs per row over that row's
    /// keys, as [`ZayaModel::decode_rows`](zaya::ZayaModel::decode_rows) does on one rank.
    /// Every stage returns the logits `[B, V]`. Up to
    /// [`ZayaModel::INVARIANT_DECODE_ROWS`](zaya::ZayaModel::INVARIANT_DECODE_ROWS) rows, a
    /// row's logits do not depend on the other rows.
    pub fn decode_rows_mesh(
        &self,
        g: Groups,
        tokens: &[u32],
        caches: &mut [&mut HybridCache],
        attn: AttnImplementation,
    ) -> ParallelResult<Tensor> {
        let b = tokens.len();
        if b == 0 || b != caches.len() {
            return Err(ParallelError::Unsupported(format!(
                "decode_rows_mesh needs one token per cache and at least one row: {b} tokens, {} caches",
                caches.len()
            )));
        }
        let vocab = self.cfg.vocab_size;
        let mut positions = Vec::with_capacity(b);
        for (row, (c, &id)) in caches.iter().zip(tokens).enumerate() {
            c.check(&self.stage_cfg)?;
            if c.layers().iter().any(|l| l.batch() > 1) {
                return Err(ParallelError::Unsupported(format!(
                    "decode_rows_mesh: the cache of row {row} holds a batch; each row needs its own"
                )));
            }
            if id as usize >= vocab {
                return Err(zaya::ZayaError::TokenOutOfRange {
                    id: id as i64,
                    row,
                    position: c.seq_len(),
                    vocab_size: vocab,
                }
                .into());
            }
            if c.seq_len() + 1 > self.cfg.max_position_embeddings {
                return Err(zaya::ZayaError::ContextTooLong {
                    row,
                    length: c.seq_len() + 1,
                    limit: self.cfg.max_position_embeddings,
                }
                .into());
            }
            positions.push(vec![c.seq_len() as i64]);
        }
        let (tp, pp) = (g.tp, g.pp);
        let colls = Colls::host(&g);
        let opts = ForwardOptions {
            attn,
            ..Default::default()
        };
        // the masks of this context are not used (each row builds its own); the RoPE tables
        // are the rows' own positions
        let mut ctx = forward_context(
            &self.stage_cfg,
            &self.rotary,
            self.dtype,
            &self.device,
            b,
            1,
            None,
            &opts,
        )?;
        for (lt, rot) in &self.rotary {
            ctx.rope
                .insert(*lt, rot.cos_sin(&positions, self.dtype, &self.device)?);
        }
        let (mut h, mut state) = match &self.input {
            Some(input) => {
                let ids: Vec<Vec<i64>> = tokens.iter().map(|&t| vec![i64::from(t)]).collect();
                (self.embed(&colls.tp, input, &ids)?, None)
            }
            None => self.recv_from_previous_stage(pp, b, 1)?,
        };
        for idx in 0..self.layers.len() {
            let window = match self.layers[idx].layer_type {
                LayerType::Hybrid => None,
                LayerType::HybridSliding => self.cfg.sliding_window,
            };
            let mut rows: Vec<&mut LayerCache> = caches
                .iter_mut()
                .map(|c| {
                    c.layer_mut(idx).ok_or_else(|| {
                        ParallelError::Unsupported(format!("cache has no layer {idx}"))
                    })
                })
                .collect::<ParallelResult<_>>()?;
            let cache = AttnCache::Rows {
                caches: &mut rows,
                window,
            };
            let (next, routing, _) =
                self.layer_forward(&colls, idx, &h, state.as_ref(), &ctx, cache, false)?;
            h = next;
            state = Some(routing.state);
        }
        let logits = match &self.output {
            None => {
                self.send_to_next_stage(pp, &h, state.as_ref())?;
                None
            }
            Some(out) => {
                let y =
                    kernels::rms_norm(&h.to_dtype(self.dtype)?, &out.norm, self.cfg.rms_norm_eps)?;
                Some(all_gather_last(tp, &out.lm_head.forward(&y)?)?)
            }
        };
        let logits = self.logits_on_every_stage(pp, logits, b, 1)?;
        Ok(logits.squeeze(1)?)
    }

    /// Pipeline: a later stage's input, the residual stream `[B, T, H]` and the router
    /// state `[B, T, R]` sent by the stage before it (checked against the shapes expected).
    fn recv_from_previous_stage(
        &self,
        pp: &dyn Comm,
        b: usize,
        t: usize,
    ) -> ParallelResult<(Tensor, Option<Tensor>)> {
        let (h_dim, r_dim) = (self.cfg.hidden_size, self.cfg.router_hidden_size);
        let from = self.coords.pp - 1;
        let h = pp.recv(from, TAG_HIDDEN)?;
        let st = pp.recv(from, TAG_ROUTER_STATE)?;
        let shape_err = |what: &str, n: usize, want: usize| {
            ParallelError::Unsupported(format!(
                "stage {} received {n} values of {what} from stage {from}, expected {want}",
                self.coords.pp
            ))
        };
        if h.len() != b * t * h_dim {
            return Err(shape_err("hidden state", h.len(), b * t * h_dim));
        }
        if st.len() != b * t * r_dim {
            return Err(shape_err("router state", st.len(), b * t * r_dim));
        }
        Ok((
            Tensor::from_vec(h, (b, t, h_dim), &self.device)?,
            Some(Tensor::from_vec(st, (b, t, r_dim), &self.device)?.to_dtype(self.dtype)?),
        ))
    }

    /// Pipeline: the residual stream and the router state (EDA) go to the next stage.
    fn send_to_next_stage(
        &self,
        pp: &dyn Comm,
        h: &Tensor,
        state: Option<&Tensor>,
    ) -> ParallelResult<()> {
        let to = self.coords.pp + 1;
        pp.send(to, TAG_HIDDEN, &h.flatten_all()?.to_vec1::<f32>()?)?;
        let st = state.ok_or_else(|| {
            ParallelError::Unsupported(format!("stage {} has no layer", self.coords.pp))
        })?;
        pp.send(
            to,
            TAG_ROUTER_STATE,
            &st.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
        )?;
        Ok(())
    }

    /// The logits `[B, kept, V]` on every stage: the last stage computed them (`Some`), the
    /// others get them by a broadcast (stage 0 feeds the next token when decoding).
    fn logits_on_every_stage(
        &self,
        pp: &dyn Comm,
        logits: Option<Tensor>,
        b: usize,
        kept: usize,
    ) -> ParallelResult<Tensor> {
        let stages = self.plan.mesh.pp;
        if stages == 1 {
            return logits.ok_or_else(|| {
                ParallelError::Unsupported("the only stage computed no logits".into())
            });
        }
        let vocab = self.cfg.vocab_size;
        let mut buf = match &logits {
            Some(l) => l.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
            None => vec![0f32; b * kept * vocab],
        };
        pp.broadcast(stages - 1, &mut buf)?;
        Ok(Tensor::from_vec(buf, (b, kept, vocab), &self.device)?.to_dtype(self.dtype)?)
    }

    /// Pipeline: each later stage sends its captures to the first stage, which appends
    /// them in stage order (so it holds the whole model's); the other stages keep theirs.
    fn gather_captures(
        &self,
        pp: &dyn Comm,
        hidden_states: &mut Vec<Tensor>,
        attentions: &mut Vec<Tensor>,
        router_logits: &mut Vec<Tensor>,
        expert_choices: &mut Choices,
    ) -> ParallelResult<()> {
        use crate::tensor::{pack_tensors, unpack_tensors};
        let stage = self.coords.pp;
        if stage > 0 {
            // [counts] then the hidden states, attentions, router logits, choices
            let mut msg = vec![Tensor::new(
                &[
                    hidden_states.len() as f32,
                    attentions.len() as f32,
                    router_logits.len() as f32,
                    expert_choices.len() as f32,
                ],
                &self.device,
            )?];
            msg.extend(
                hidden_states
                    .iter()
                    .map(|t| t.to_dtype(DType::F32))
                    .collect::<Result<Vec<_>, _>>()?,
            );
            msg.extend(
                attentions
                    .iter()
                    .map(|t| t.to_dtype(DType::F32))
                    .collect::<Result<Vec<_>, _>>()?,
            );
            msg.extend(
                router_logits
                    .iter()
                    .map(|t| t.to_dtype(DType::F32))
                    .collect::<Result<Vec<_>, _>>()?,
            );
            for c in expert_choices.iter() {
                let v: Vec<f32> = c.iter().map(|&x| x as f32).collect();
                let n = v.len();
                msg.push(Tensor::from_vec(v, n, &self.device)?);
            }
            pp.send(0, TAG_CAPTURES, &pack_tensors(&msg)?)?;
            return Ok(());
        }
        for from in 1..pp.size() {
            let got = unpack_tensors(&pp.recv(from, TAG_CAPTURES)?, &self.device)?;
            let bad = || {
                ParallelError::Unsupported(format!(
                    "stage {from} sent captures that do not describe themselves"
                ))
            };
            let counts: Vec<usize> = got
                .first()
                .ok_or_else(bad)?
                .to_vec1::<f32>()?
                .into_iter()
                .map(|c| c as usize)
                .collect();
            if counts.len() != 4 || 1 + counts.iter().sum::<usize>() != got.len() {
                return Err(bad());
            }
            let mut rest = got.into_iter().skip(1);
            let mut take = |n: usize| -> Vec<Tensor> { rest.by_ref().take(n).collect() };
            let hs = take(counts[0]);
            hidden_states.extend(hs);
            let at = take(counts[1]);
            attentions.extend(
                at.into_iter()
                    .map(|t| t.to_dtype(self.dtype))
                    .collect::<Result<Vec<_>, _>>()?,
            );
            let rl = take(counts[2]);
            router_logits.extend(
                rl.into_iter()
                    .map(|t| t.to_dtype(self.dtype))
                    .collect::<Result<Vec<_>, _>>()?,
            );
            for c in take(counts[3]) {
                expert_choices.push(c.to_vec1::<f32>()?.into_iter().map(|x| x as u32).collect());
            }
        }
        Ok(())
    }

    /// Greedy decoding from `prompt` `[1, T]` with this rank's cache: a prefill, then one
    /// cached step per token (stops after `eos` when given). Every rank returns the same ids.
    pub fn generate_greedy(
        &self,
        comm: &dyn Comm,
        prompt: &Tensor,
        max_new_tokens: usize,
        eos: &[u32],
        attn: AttnImplementation,
    ) -> ParallelResult<Vec<u32>> {
        let solo = crate::local::LocalWorld::new(1, crate::comm::DEFAULT_TIMEOUT)?.comm(0);
        let g = Groups {
            tp: comm,
            pp: &solo,
            ep: &solo,
        };
        self.generate_greedy_mesh(g, prompt, max_new_tokens, eos, attn)
    }

    /// [`TpModel::generate_greedy`] on a TP × PP mesh: each stage keeps the cache of its
    /// own layers and heads.
    pub fn generate_greedy_mesh(
        &self,
        g: Groups,
        prompt: &Tensor,
        max_new_tokens: usize,
        eos: &[u32],
        attn: AttnImplementation,
    ) -> ParallelResult<Vec<u32>> {
        let mut cache = self.new_cache();
        let opts = ForwardOptions {
            attn,
            logits_to_keep: 1,
            ..Default::default()
        };
        let mut input = prompt.clone();
        let mut out = Vec::with_capacity(max_new_tokens);
        for _ in 0..max_new_tokens {
            let (logits, _) = self.forward_mesh(g, &input, Some(&mut cache), &opts)?;
            let row: Vec<f32> = logits.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
            // the first maximum, as the single-rank greedy decoder (and torch.argmax)
            let next = zaya::generation::argmax(&row);
            out.push(next);
            if eos.contains(&next) {
                break;
            }
            input = Tensor::new(&[[next]], &self.device)?;
        }
        Ok(out)
    }
}

/// Runs `tp` local ranks (threads of this process), each loading only its slices of the
/// checkpoint in `dir`, and returns rank 0's full logits and router choices. The first
/// rank error is returned (an error of its own rather than a peer's "has exited").
pub fn forward_on_local_ranks(
    dir: &Path,
    tp: usize,
    input_ids: &Tensor,
    opts: &ForwardOptions,
    timeout: std::time::Duration,
) -> ParallelResult<(Tensor, Choices)> {
    forward_mesh_on_local_ranks(
        dir,
        crate::mesh::MeshShape::new(tp, 1, 1, 1)?,
        input_ids,
        opts,
        timeout,
    )
}

/// [`forward_on_local_ranks`] on a TP × PP × EP mesh (`dp` replicas run the same input).
/// Returns rank 0's logits and the choices of the first stage's layers.
pub fn forward_mesh_on_local_ranks(
    dir: &Path,
    shape: crate::mesh::MeshShape,
    input_ids: &Tensor,
    opts: &ForwardOptions,
    timeout: std::time::Duration,
) -> ParallelResult<(Tensor, Choices)> {
    let out = forward_mesh_captured_on_local_ranks(
        dir,
        shape,
        input_ids,
        opts,
        MeshCapture::default(),
        DType::F32,
        timeout,
    )?;
    Ok((out.logits, out.choices))
}

/// [`forward_mesh_on_local_ranks`] with captures ([`TpModel::forward_mesh_captured`]):
/// rank 0's outputs, which hold the whole model's captures.
pub fn forward_mesh_captured_on_local_ranks(
    dir: &Path,
    shape: crate::mesh::MeshShape,
    input_ids: &Tensor,
    opts: &ForwardOptions,
    extra: MeshCapture,
    dtype: DType,
    timeout: std::time::Duration,
) -> ParallelResult<MeshOutput> {
    let ckpt = Arc::new(Checkpoint::open(dir)?);
    let cfg = ckpt.config()?;
    ckpt.validate(&cfg)?;
    let plan = ParallelPlan::new(&cfg, shape)?;
    let world = crate::local::LocalWorld::new(shape.world(), timeout)?;
    let outs = world.run(|comm| {
        let mesh = crate::mesh::Mesh::new(Box::new(comm), shape)?;
        let model = TpModel::at(&ckpt, &plan, mesh.coords, dtype, &Device::Cpu)?;
        model.forward_mesh_captured(mesh.groups(), input_ids, None, opts, extra)
    });
    first_of(outs)
}

/// Rank 0's value, or the most telling error of the ranks.
pub fn first_of<T>(
    outs: Vec<Result<T, crate::local::RankFailed<ParallelError>>>,
) -> ParallelResult<T> {
    use crate::local::RankFailed;
    let mut first_err = None;
    let mut own_err = None;
    let mut value = None;
    for (rank, o) in outs.into_iter().enumerate() {
        match o {
            Ok(v) if rank == 0 => value = Some(v),
            Ok(_) => {}
            Err(RankFailed::Error { error, .. }) => {
                let peer = matches!(
                    error,
                    ParallelError::Dist(crate::comm::DistError::PeerGone { .. })
                );
                if !peer && own_err.is_none() {
                    own_err = Some(error);
                } else if first_err.is_none() {
                    first_err = Some(error);
                }
            }
            Err(RankFailed::Panicked { rank, message }) => {
                if own_err.is_none() {
                    own_err = Some(ParallelError::Unsupported(format!(
                        "rank {rank} panicked: {message}"
                    )));
                }
            }
        }
    }
    match (own_err.or(first_err), value) {
        (Some(e), _) => Err(e),
        (None, Some(v)) => Ok(v),
        (None, None) => Err(ParallelError::Unsupported("rank 0 returned nothing".into())),
    }
}
