//! The ZAYA1 causal LM. The model is immutable (`&self`, shareable across threads); the
//! hybrid cache and the router state are values passed in and out. Layers are addressable
//! by index so pipeline stages and gradient checkpointing can drive them one at a time.

pub mod attention;
pub mod decoder;
pub mod linear;
pub mod moe;
pub mod rope;

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::attention::{AttnImplementation, MaskSpec};
use crate::cache::HybridCache;
use crate::config::{LayerType, ZayaConfig};
use crate::error::{Result, ZayaError};
use crate::gguf::{GgufCheckpoint, QuantizeOnLoad};
use crate::kernels;
use crate::quant::QuantPlan;
use crate::weights::Checkpoint;
pub use attention::AttentionInputs;
pub use decoder::{DecoderLayer, LayerOutput};
pub use linear::{
    Dropout, InputObserver, Linear, LinearWeight, LowRank, Observed, QuantizedSource, Weights,
};
pub use moe::{Routing, SkipBehaviour};
use rope::RotaryEmbedding;

/// What to record during a forward pass.
#[derive(Debug, Clone, Copy, Default)]
pub struct Capture {
    pub hidden_states: bool,
    pub attentions: bool,
}

#[derive(Debug, Clone, Default)]
pub struct ForwardOptions {
    /// `[B, P+T]`, 1 for real tokens, 0 for padding (covers cached tokens too).
    pub attention_mask: Option<Tensor>,
    /// `[B or 1, T]`; defaults to `P + t`.
    pub position_ids: Option<Tensor>,
    /// Keep only the last `k` positions' logits (0 keeps all).
    pub logits_to_keep: usize,
    pub capture: Capture,
    /// Skip the LM head (training computes the loss from the final hidden states in chunks).
    pub skip_lm_head: bool,
    /// Attention backend for this call.
    pub attn: AttnImplementation,
    /// Packed sequences `[B, T]`: a document id per token (documents contiguous). Each
    /// document is computed as if it were alone: no attention across documents, the CCA
    /// convolution history and the delayed value restart at each document, and default
    /// positions restart at 0. Not combinable with a cache that holds tokens.
    pub document_ids: Option<Tensor>,
}

/// Router decisions of one layer.
#[derive(Debug, Clone)]
pub struct LayerRouting {
    /// `[B·T, E+1]` raw logits.
    pub logits: Tensor,
    /// `[B·T, E+1]` probabilities (differentiable).
    pub probs: Tensor,
    /// Chosen class per token (`E` = skip).
    pub choice: Vec<u32>,
}

#[derive(Debug, Clone)]
pub struct ModelOutput {
    /// `[B, T', V]` in the parameter dtype (absent with `skip_lm_head`).
    pub logits: Option<Tensor>,
    /// Final-norm output `[B, T, H]`.
    pub last_hidden: Tensor,
    /// `L + 1` tensors: scaled embedding, outputs of layers 0..L−2, final-norm output.
    pub hidden_states: Vec<Tensor>,
    /// Per layer `[B, Nq, T, N]` (eager attention only).
    pub attentions: Vec<Tensor>,
    pub routing: Vec<LayerRouting>,
}

/// Everything a layer needs that is shared by the whole call.
pub struct ForwardContext {
    pub masks: BTreeMap<LayerType, MaskSpec>,
    pub rope: BTreeMap<LayerType, (Tensor, Tensor)>,
    pub conv_mask: Option<Tensor>,
    /// `[B, T, max(S,1)+1]`: 1 where token `t − back` belongs to the document of token `t`.
    pub same_document: Option<Tensor>,
    pub attn: AttnImplementation,
    pub batch: usize,
    pub seq_len: usize,
}

#[derive(Debug, Clone)]
pub struct ZayaModel {
    cfg: ZayaConfig,
    /// `None` on a part without the lookup or the (tied) head.
    embed_tokens: Option<Embedding>,
    input_hidden_states_scale: Option<Tensor>,
    input_hidden_states_bias: Option<Tensor>,
    /// The decoder layers `first_layer..first_layer + layers.len()` (all of them for a whole
    /// model).
    layers: Vec<DecoderLayer>,
    first_layer: usize,
    norm: Option<Tensor>,
    lm_head: Option<Linear>,
    rotary: BTreeMap<LayerType, RotaryEmbedding>,
    dtype: DType,
    device: Device,
}

/// The token embedding table, dense or quantized.
#[derive(Debug, Clone)]
enum Embedding {
    Dense(Tensor),
    Quantized(Arc<QTensor>),
}

impl Embedding {
    fn bytes(&self) -> usize {
        match self {
            Embedding::Dense(t) => tensor_bytes(t),
            Embedding::Quantized(q) => q.storage_size_in_bytes(),
        }
    }
}

pub(crate) fn tensor_bytes(t: &Tensor) -> usize {
    t.elem_count() * t.dtype().size_in_bytes()
}

fn host_2d(t: &Tensor, what: &str) -> Result<Vec<Vec<i64>>> {
    if t.rank() != 2 {
        return Err(ZayaError::Input(format!(
            "{what} must be 2-D, found shape {:?}",
            t.dims()
        )));
    }
    Ok(t.to_dtype(DType::I64)?.to_vec2::<i64>()?)
}

/// Which part of the model a [`ZayaModel`] holds: a range of decoder layers, the input side
/// (embedding lookup and input scaling) and the output side (final norm and LM head; a tied
/// head is the embedding table). A pipeline stage is such a part; the whole model holds
/// everything. Only the tensors of its part are read from the weight source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelPart {
    pub layers: Range<usize>,
    /// The embedding lookup and the input scaling.
    pub input: bool,
    /// The final norm and the LM head.
    pub output: bool,
}

impl ModelPart {
    /// Every tensor of `cfg`.
    pub fn whole(cfg: &ZayaConfig) -> Self {
        ModelPart {
            layers: 0..cfg.num_hidden_layers,
            input: true,
            output: true,
        }
    }

    /// Whether this part holds the native tensor `name` (a tied embedding is held by the
    /// input side and by the output side).
    pub fn holds(&self, cfg: &ZayaConfig, name: &str) -> bool {
        if let Some(rest) = name.strip_prefix("model.layers.") {
            let idx: Option<usize> = rest.split('.').next().and_then(|s| s.parse().ok());
            return idx.is_some_and(|i| self.layers.contains(&i));
        }
        match name {
            "model.embed_tokens.weight" => self.input || (self.output && cfg.tie_word_embeddings),
            "model.input_hidden_states_scale" | "model.input_hidden_states_bias" => self.input,
            _ => self.output,
        }
    }

    /// Fails unless the part is a valid range of `cfg`'s layers.
    pub fn check(&self, cfg: &ZayaConfig) -> Result<()> {
        let n = cfg.num_hidden_layers;
        if self.layers.start > self.layers.end || self.layers.end > n {
            return Err(ZayaError::Input(format!(
                "model part: layer range {:?} is not within the model's {n} layers",
                self.layers
            )));
        }
        if self.layers.is_empty() && !self.input && !self.output {
            return Err(ZayaError::Input("model part: holds nothing".into()));
        }
        Ok(())
    }
}

/// What quantizing a model of `cfg` under `plan` while loading builds: the plan resolved
/// for the model, and where it stores a tied head apart ([`QuantPlan::splits_tied_head`])
/// the untied model a file written with it holds, whose head is read from the tied
/// embedding (`vb` renamed); else `cfg` and `vb` as they are.
fn split_tied_head(
    vb: VarBuilder<'static>,
    cfg: &ZayaConfig,
    plan: &QuantPlan,
) -> (VarBuilder<'static>, ZayaConfig, QuantPlan) {
    let plan = plan.for_model(cfg);
    let built = plan.stored_config(cfg);
    if built.tie_word_embeddings == cfg.tie_word_embeddings {
        return (vb, built, plan);
    }
    let (source, tied) = (plan.clone(), cfg.clone());
    let vb = vb.rename_f(move |name| source.source_of(&tied, name).to_string());
    (vb, built, plan)
}

impl ZayaModel {
    pub fn new(cfg: &ZayaConfig, vb: VarBuilder) -> Result<Self> {
        Self::from_weights(cfg, Weights::from(vb))
    }

    /// Builds the model from a weight source that may hold quantized tensors.
    pub fn from_weights(cfg: &ZayaConfig, vb: Weights) -> Result<Self> {
        Self::part_from_weights(cfg, vb, &ModelPart::whole(cfg))
    }

    /// Builds the part `part` of the model (a pipeline stage): only its tensors are asked
    /// of `vb`. Running what the part does not hold (the embedding on a later stage, a
    /// layer of another stage, the head before the last) is a typed error.
    pub fn part_from_weights(cfg: &ZayaConfig, vb: Weights, part: &ModelPart) -> Result<Self> {
        part.check(cfg)?;
        let h = cfg.hidden_size;
        let m = vb.pp("model");
        let embed = m.pp("embed_tokens");
        let embed_tokens = if part.holds(cfg, "model.embed_tokens.weight") {
            Some(match embed.quantized((cfg.vocab_size, h), "weight")? {
                Some(q) => Embedding::Quantized(q),
                // A table that is only looked up (untied) reads one row per token: a
                // frozen one stays in its stored dtype and its rows widen as looked up
                // (half the memory of ZAYA1-8B's f32 table from a bf16 GGUF).
                None if !cfg.tie_word_embeddings => {
                    Embedding::Dense(embed.get_stored((cfg.vocab_size, h), "weight")?)
                }
                None => Embedding::Dense(embed.get((cfg.vocab_size, h), "weight")?),
            })
        } else {
            None
        };
        let layers = part
            .layers
            .clone()
            .map(|i| DecoderLayer::new(cfg, i, m.pp("layers").pp(i)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let lm_head = if part.output {
            let lm_bias = if cfg.lm_head_bias {
                Some(vb.pp("lm_head").get(cfg.vocab_size, "bias")?)
            } else {
                None
            };
            Some(match (&embed_tokens, cfg.tie_word_embeddings) {
                (Some(e), true) => Linear {
                    weight: match e {
                        Embedding::Dense(t) => LinearWeight::Dense(t.clone()),
                        Embedding::Quantized(q) => LinearWeight::Quantized(Arc::clone(q)),
                    },
                    bias: lm_bias,
                    adapter: None,
                    observer: embed.observed("weight"),
                },
                _ => {
                    let mut head = Linear::new(h, cfg.vocab_size, false, vb.pp("lm_head"))?;
                    head.bias = lm_bias;
                    head
                }
            })
        } else {
            None
        };
        let (scale, bias) = if part.input {
            (
                Some(m.get(h, "input_hidden_states_scale")?),
                Some(m.get(h, "input_hidden_states_bias")?),
            )
        } else {
            (None, None)
        };
        let rotary = rotary_tables(cfg);
        Ok(ZayaModel {
            cfg: cfg.clone(),
            input_hidden_states_scale: scale,
            input_hidden_states_bias: bias,
            embed_tokens,
            layers,
            first_layer: part.layers.start,
            norm: if part.output {
                Some(m.pp("norm").get(h, "weight")?)
            } else {
                None
            },
            lm_head,
            rotary,
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    /// The part of the model this holds.
    pub fn part(&self) -> ModelPart {
        ModelPart {
            layers: self.layer_range(),
            input: self.input_hidden_states_scale.is_some(),
            output: self.lm_head.is_some(),
        }
    }

    /// The decoder layers this holds (`0..num_hidden_layers` for a whole model).
    pub fn layer_range(&self) -> Range<usize> {
        self.first_layer..self.first_layer + self.layers.len()
    }

    fn lacks(&self, what: &str) -> ZayaError {
        ZayaError::Input(format!(
            "this model is a part (layers {:?}) without {what}",
            self.layer_range()
        ))
    }

    /// Fails unless this is the whole model (a part runs only through the layer API).
    fn check_whole(&self) -> Result<()> {
        if self.part() != ModelPart::whole(&self.cfg) {
            return Err(self.lacks(
                "the rest of the model: a full pass needs every layer, the embedding and the head",
            ));
        }
        Ok(())
    }

    fn head(&self) -> Result<&Linear> {
        self.lm_head
            .as_ref()
            .ok_or_else(|| self.lacks("the final norm and LM head"))
    }

    /// Opens a checkpoint directory (either layout), validates every tensor and builds the
    /// model with its weights in `dtype`.
    /// A GGUF file written by `zaya quantize` loads the same way (config from its metadata).
    pub fn load(dir: impl AsRef<Path>, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_quantized(dir, dtype, device, None)
    }

    /// [`ZayaModel::load`], quantizing the tensors `quant` selects while loading (tensors
    /// already quantized in a GGUF stay as they are). Dense weights are in `dtype`.
    pub fn load_quantized(
        path: impl AsRef<Path>,
        dtype: DType,
        device: &Device,
        quant: Option<&QuantPlan>,
    ) -> Result<Self> {
        let path = path.as_ref();
        let quant = quant.filter(|p| p.quantizes());
        if crate::gguf::is_gguf(path) {
            let g = Arc::new(GgufCheckpoint::open(path)?);
            g.validate()?;
            // Before anything is allocated: a clear error instead of an OOM kill.
            g.check_fits(dtype, quant)?;
            let cfg = g.config().clone();
            let vb = g.var_builder(dtype, device);
            return match quant {
                Some(plan) => {
                    let (vb, built, plan) = split_tied_head(vb, &cfg, plan);
                    let inner = Some(g as Arc<dyn QuantizedSource>);
                    let src = Arc::new(QuantizeOnLoad::new(vb.clone(), &built, plan, inner));
                    Self::from_weights(&built, Weights::new(vb, Some(src)))
                }
                None => Self::from_weights(&cfg, Weights::new(vb, Some(g))),
            };
        }
        let ckpt = Arc::new(Checkpoint::open(path)?);
        let cfg = ckpt.config()?;
        ckpt.validate(&cfg)?;
        // Before anything is allocated: a clear error instead of an OOM kill.
        ckpt.check_fits(&cfg, dtype, quant)?;
        let vb = ckpt.var_builder(&cfg, dtype, device);
        match quant {
            None => Self::new(&cfg, vb),
            Some(plan) => {
                let (vb, built, plan) = split_tied_head(vb, &cfg, plan);
                let src = Arc::new(
                    QuantizeOnLoad::new(vb.clone(), &built, plan, None)
                        .with_stored_dtypes(&ckpt, &cfg)?,
                );
                Self::from_weights(&built, Weights::new(vb, Some(src)))
            }
        }
    }

    pub fn config(&self) -> &ZayaConfig {
        &self.cfg
    }

    /// Chooses what skip-routed tokens contribute (see [`SkipBehaviour`]); the default
    /// follows transformers. Set it before sharing the model.
    pub fn set_skip_behaviour(&mut self, skip: SkipBehaviour) {
        for layer in &mut self.layers {
            layer.mlp.skip = skip;
        }
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn device(&self) -> &Device {
        &self.device
    }
    pub fn layers(&self) -> &[DecoderLayer] {
        &self.layers
    }

    /// A layer to attach adapters to (on a copy of the model; see `lora::attach`).
    pub(crate) fn layer_mut(&mut self, idx: usize) -> Option<&mut DecoderLayer> {
        self.layers.get_mut(idx)
    }

    /// Checks token ids and the context length; returns the ids on the host.
    pub fn check_input_ids(&self, input_ids: &Tensor, past: usize) -> Result<Vec<Vec<i64>>> {
        check_input_ids(&self.cfg, input_ids, past)
    }

    /// Builds masks, RoPE tables and the conv mask for a call of `[batch, t]` tokens after
    /// the cache's `P` tokens.
    pub fn context(
        &self,
        batch: usize,
        t: usize,
        cache: Option<&HybridCache>,
        opts: &ForwardOptions,
    ) -> Result<ForwardContext> {
        forward_context(
            &self.cfg,
            &self.rotary,
            self.dtype,
            &self.device,
            batch,
            t,
            cache,
            opts,
        )
    }

    /// Scaled token embedding, in f32: `f32((e + β_in) ⊙ γ_in)`.
    pub fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let ids = input_ids.to_dtype(DType::U32)?.flatten_all()?;
        let (Some(embed_tokens), Some(in_scale), Some(in_bias)) = (
            &self.embed_tokens,
            &self.input_hidden_states_scale,
            &self.input_hidden_states_bias,
        ) else {
            return Err(self.lacks("the embedding"));
        };
        let table = match embed_tokens {
            Embedding::Dense(t) => t,
            // Quantized rows are dequantized as they are looked up (f32), then given the
            // dtype of the rest of the model.
            Embedding::Quantized(q) => {
                let e = q.embedding(&ids)?.to_dtype(self.dtype)?;
                let e = e.reshape((b, t, self.cfg.hidden_size))?;
                return Ok(e
                    .broadcast_add(in_bias)?
                    .broadcast_mul(in_scale)?
                    .to_dtype(DType::F32)?);
            }
        };
        let mut e = table.index_select(&ids, 0)?;
        // The reference embedding has `padding_idx = pad_token_id`: the lookup sends no
        // gradient to the pad row. Rows looked up for pad tokens are swapped for a detached
        // copy of themselves (same values, no gradient path). Only when a graph is recorded
        // (trainable weights); inference pays nothing.
        if let (true, Some(pad)) = (table.track_op(), self.cfg.pad_token_id) {
            let is_pad = ids
                .eq(pad)?
                .unsqueeze(1)?
                .broadcast_as(e.shape())?
                .contiguous()?;
            e = is_pad.where_cond(&e.detach(), &e)?;
        }
        let e = e
            .reshape((b, t, self.cfg.hidden_size))?
            .to_dtype(self.dtype)?;
        Ok(e.broadcast_add(in_bias)?
            .broadcast_mul(in_scale)?
            .to_dtype(DType::F32)?)
    }

    /// Runs layer `idx` on the residual stream `h`.
    pub fn layer_forward(
        &self,
        idx: usize,
        h: &Tensor,
        router_state: Option<&Tensor>,
        ctx: &ForwardContext,
        cache: Option<&mut HybridCache>,
        want_probs: bool,
    ) -> Result<LayerOutput> {
        let layer = idx
            .checked_sub(self.first_layer)
            .and_then(|i| self.layers.get(i))
            .ok_or_else(|| self.lacks(&format!("layer {idx}")))?;
        let (cos, sin) = &ctx.rope[&layer.layer_type];
        let inputs = AttentionInputs {
            mask: &ctx.masks[&layer.layer_type],
            cos,
            sin,
            conv_mask: ctx.conv_mask.as_ref(),
            same_document: ctx.same_document.as_ref(),
            want_probs,
            backend: ctx.attn,
        };
        let layer_cache = match cache {
            None => None,
            Some(c) => Some(c.layer_mut(idx).ok_or_else(|| {
                ZayaError::Input(format!(
                    "cache has no layer {idx}: it was made for another config"
                ))
            })?),
        };
        Ok(layer.forward(h, router_state, &inputs, layer_cache)?)
    }

    /// Final RMSNorm of the f32 residual stream, in the parameter dtype.
    pub fn final_norm(&self, h: &Tensor) -> Result<Tensor> {
        let norm = self
            .norm
            .as_ref()
            .ok_or_else(|| self.lacks("the final norm"))?;
        Ok(kernels::rms_norm(
            &kernels::to_dtype(h, self.dtype)?,
            norm,
            self.cfg.rms_norm_eps,
        )?)
    }

    /// `[.., H]` → `[.., V]`.
    pub fn lm_head(&self, y: &Tensor) -> Result<Tensor> {
        Ok(self.head()?.forward(y)?)
    }

    /// Hands the LM head's input `y` (the final norm's output) to its observer without
    /// computing the logits: a calibration pass needs the inputs only, and on ZAYA1-8B the
    /// head's product (vocabulary 262 272) is a third of a forward's work.
    pub fn observe_lm_head_input(&self, y: &Tensor) -> Result<()> {
        Ok(self.head()?.observe_input(y)?)
    }

    /// The dense lm_head weight (tied: the embedding). Training reads it; a model whose
    /// head is quantized is frozen and has none.
    pub fn lm_head_weight(&self) -> Option<&Tensor> {
        self.lm_head.as_ref().and_then(Linear::dense_weight)
    }

    /// Bytes of every weight held (embedding and head counted once when tied).
    pub fn weight_bytes(&self) -> usize {
        let mut total = self.embed_tokens.as_ref().map_or(0, Embedding::bytes);
        if let Some(head) = &self.lm_head {
            if !self.cfg.tie_word_embeddings || self.embed_tokens.is_none() {
                total += head.weight.bytes();
            }
            total += head.bias.as_ref().map_or(0, tensor_bytes);
        }
        total += self.input_and_final_bytes();
        total
            + self
                .layers
                .iter()
                .map(|l| l.weight_bytes(false))
                .sum::<usize>()
    }

    /// Bytes of the input scale and bias and the final norm (read whole by every token).
    fn input_and_final_bytes(&self) -> usize {
        [
            &self.input_hidden_states_scale,
            &self.input_hidden_states_bias,
            &self.norm,
        ]
        .into_iter()
        .flatten()
        .map(tensor_bytes)
        .sum()
    }

    /// Bytes one decoded token reads at batch 1: every non-expert weight, one expert per
    /// layer (top-1; the largest expert, as an upper bound), the lm_head, and one
    /// embedding row.
    pub fn bytes_per_token(&self) -> usize {
        let emb_row =
            self.embed_tokens.as_ref().map_or(0, Embedding::bytes) / self.cfg.vocab_size.max(1);
        let head = self.lm_head.as_ref().map_or(0, Linear::bytes);
        let total = emb_row + head + self.input_and_final_bytes();
        total
            + self
                .layers
                .iter()
                .map(|l| l.weight_bytes(true))
                .sum::<usize>()
    }
    pub fn lm_head_bias(&self) -> Option<&Tensor> {
        self.lm_head.as_ref().and_then(|h| h.bias.as_ref())
    }

    /// The head's dense weight and bias when the head is exactly `x · Wᵀ (+ b)`: no adapter,
    /// no observer, not quantized (what a fused training head may compute on its own).
    pub fn plain_dense_head(&self) -> Option<(&Tensor, Option<&Tensor>)> {
        let head = self.lm_head.as_ref()?;
        if head.adapter.is_some() || head.observer.is_some() {
            return None;
        }
        Some((head.dense_weight()?, head.bias.as_ref()))
    }

    /// Most rows a [`decode_rows`](Self::decode_rows) call should take for its results not
    /// to depend on how many rows run together: up to this many rows, every linear layer and
    /// expert runs the row-wise GEMV kernel, whose result for a row does not depend on the
    /// other rows (a general GEMM's blocking could change the last bits). Larger batches are
    /// correct too, just not bit-identical to a single-row run.
    pub const INVARIANT_DECODE_ROWS: usize = kernels::GEMV_ROWS;

    /// One decode step for independent sequences at different positions: `tokens[i]` is fed
    /// after the state in `caches[i]` (each a batch-1 cache, possibly empty). Projections,
    /// router and experts run batched over the rows; attention runs per row over that row's
    /// keys. Returns the logits `[B, V]` (parameter dtype) and updates every cache.
    pub fn decode_rows(
        &self,
        tokens: &[u32],
        caches: &mut [&mut HybridCache],
        attn: AttnImplementation,
    ) -> Result<Tensor> {
        if tokens.is_empty() || tokens.len() != caches.len() {
            return Err(ZayaError::Input(format!(
                "decode_rows needs one token per cache and at least one row: {} tokens, {} caches",
                tokens.len(),
                caches.len()
            )));
        }
        self.check_whole()?;
        let vocab = self.cfg.vocab_size;
        let mut positions = Vec::with_capacity(tokens.len());
        for (row, (c, &id)) in caches.iter().zip(tokens).enumerate() {
            c.check(&self.cfg)?;
            if c.layers().iter().any(|l| l.batch() > 1) {
                return Err(ZayaError::Input(format!(
                    "decode_rows: cache of row {row} holds a batch of {} sequences; each row needs its own",
                    c.layers().iter().map(|l| l.batch()).max().unwrap_or(0)
                )));
            }
            if id as usize >= vocab {
                return Err(ZayaError::TokenOutOfRange {
                    id: id as i64,
                    row,
                    position: c.seq_len(),
                    vocab_size: vocab,
                });
            }
            if c.seq_len() + 1 > self.cfg.max_position_embeddings {
                return Err(ZayaError::ContextTooLong {
                    row,
                    length: c.seq_len() + 1,
                    limit: self.cfg.max_position_embeddings,
                });
            }
            positions.push(vec![c.seq_len() as i64]);
        }
        let b = tokens.len();
        let ids = Tensor::from_vec(tokens.to_vec(), (b, 1), &self.device)?;
        let mut rope = BTreeMap::new();
        for (lt, rot) in &self.rotary {
            rope.insert(*lt, rot.cos_sin(&positions, self.dtype, &self.device)?);
        }
        let mut h = self.embed(&ids)?;
        let mut state: Option<Tensor> = None;
        for (idx, layer) in self.layers.iter().enumerate() {
            let (cos, sin) = &rope[&layer.layer_type];
            let window = match layer.layer_type {
                LayerType::Hybrid => None,
                LayerType::HybridSliding => self.cfg.sliding_window,
            };
            let mut rows: Vec<&mut crate::cache::LayerCache> = caches
                .iter_mut()
                .map(|c| {
                    c.layer_mut(idx)
                        .ok_or_else(|| ZayaError::Input(format!("cache has no layer {idx}")))
                })
                .collect::<Result<_>>()?;
            let (next, st) =
                layer.forward_rows(&h, state.as_ref(), cos, sin, window, attn, &mut rows)?;
            h = next;
            state = Some(st);
        }
        let y = self.final_norm(&h)?;
        Ok(self.lm_head(&y)?.squeeze(1)?)
    }

    /// The full forward pass. With a cache, this call continues after its `P` tokens
    /// (prefill, chunked prefill or decode) and updates it.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        mut cache: Option<&mut HybridCache>,
        opts: &ForwardOptions,
    ) -> Result<ModelOutput> {
        self.check_whole()?;
        if let Some(c) = cache.as_deref() {
            c.check(&self.cfg)?;
        }
        let past = cache.as_ref().map_or(0, |c| c.seq_len());
        let ids = self.check_input_ids(input_ids, past)?;
        let (b, t) = (ids.len(), ids[0].len());
        let ctx = self.context(b, t, cache.as_deref(), opts)?;
        let mut h = self.embed(input_ids)?;
        let mut hidden_states = Vec::new();
        let mut attentions = Vec::new();
        let mut routing = Vec::with_capacity(self.layers.len());
        let mut state: Option<Tensor> = None;
        for idx in 0..self.layers.len() {
            if opts.capture.hidden_states {
                hidden_states.push(h.clone());
            }
            let out = self.layer_forward(
                idx,
                &h,
                state.as_ref(),
                &ctx,
                cache.as_deref_mut(),
                opts.capture.attentions,
            )?;
            h = out.hidden;
            if let Some(p) = out.attention_probs {
                attentions.push(p);
            }
            routing.push(LayerRouting {
                logits: out.routing.logits,
                probs: out.routing.probs,
                choice: out.routing.choice,
            });
            state = Some(out.routing.state);
        }
        let y = self.final_norm(&h)?;
        if opts.capture.hidden_states {
            hidden_states.push(y.clone());
        }
        let logits = if opts.skip_lm_head {
            None
        } else {
            let keep = opts.logits_to_keep;
            let ysel = if keep > 0 && keep < t {
                y.narrow(1, t - keep, keep)?
            } else {
                y.clone()
            };
            Some(self.lm_head(&ysel)?)
        };
        Ok(ModelOutput {
            logits,
            last_hidden: y,
            hidden_states,
            attentions,
            routing,
        })
    }
}

/// The RoPE table of every layer type `cfg` uses.
pub fn rotary_tables(cfg: &ZayaConfig) -> BTreeMap<LayerType, RotaryEmbedding> {
    cfg.rope_parameters
        .iter()
        .filter(|(t, _)| cfg.layer_types.contains(t))
        .map(|(t, rp)| (*t, RotaryEmbedding::new(rp, cfg.head_dim)))
        .collect()
}

/// Masks, RoPE tables and the conv mask for a call of `[batch, t]` tokens after the
/// cache's `P` tokens: what [`ZayaModel::context`] builds, for any holder of the config and
/// the RoPE tables (a rank of a parallel model holds no `ZayaModel`).
#[allow(clippy::too_many_arguments)]
pub fn forward_context(
    cfg: &ZayaConfig,
    rotary: &BTreeMap<LayerType, RotaryEmbedding>,
    dtype: DType,
    device: &Device,
    batch: usize,
    t: usize,
    cache: Option<&HybridCache>,
    opts: &ForwardOptions,
) -> Result<ForwardContext> {
    let past = cache.map_or(0, |c| c.seq_len());
    let mask = match &opts.attention_mask {
        None => None,
        Some(m) => {
            let m = host_2d(m, "attention_mask")?;
            if m.len() != batch || m.iter().any(|r| r.len() != past + t) {
                return Err(ZayaError::Input(format!(
                    "attention_mask must be [{batch}, {}] (cached + new tokens), found [{}, {}]",
                    past + t,
                    m.len(),
                    m.first().map_or(0, |r| r.len())
                )));
            }
            Some(m)
        }
    };
    let documents = match &opts.document_ids {
        None => None,
        Some(d) => {
            if past > 0 {
                return Err(ZayaError::Input(
                    "document_ids cannot continue from a cache holding tokens".into(),
                ));
            }
            let d = host_2d(d, "document_ids")?;
            if d.len() != batch || d.iter().any(|r| r.len() != t) {
                return Err(ZayaError::Input(format!(
                    "document_ids must be [{batch}, {t}]"
                )));
            }
            let d: Vec<Vec<u32>> = d
                .iter()
                .map(|r| r.iter().map(|&x| x as u32).collect())
                .collect();
            for (row, r) in d.iter().enumerate() {
                let mut seen = std::collections::HashSet::new();
                for (i, &x) in r.iter().enumerate() {
                    if (i == 0 || r[i - 1] != x) && !seen.insert(x) {
                        return Err(ZayaError::Input(format!(
                            "document_ids row {row}: document {x} is not contiguous (again at position {i})"
                        )));
                    }
                }
            }
            Some(d)
        }
    };
    let positions: Vec<Vec<i64>> = match &opts.position_ids {
        Some(p) => {
            let p = host_2d(p, "position_ids")?;
            if (p.len() != batch && p.len() != 1) || p.iter().any(|r| r.len() != t) {
                return Err(ZayaError::Input(format!(
                    "position_ids must be [{batch} or 1, {t}], found [{}, {}]",
                    p.len(),
                    p.first().map_or(0, |r| r.len())
                )));
            }
            p
        }
        None => match &documents {
            // positions restart at every document
            Some(d) => d
                .iter()
                .map(|r| {
                    let mut start = 0;
                    (0..t)
                        .map(|i| {
                            if i > 0 && r[i] != r[i - 1] {
                                start = i;
                            }
                            (i - start) as i64
                        })
                        .collect()
                })
                .collect(),
            None => vec![(past..past + t).map(|x| x as i64).collect()],
        },
    };
    let key_padding: Option<Vec<Vec<bool>>> = mask.as_ref().map(|m| {
        m.iter()
            .map(|r| r.iter().map(|&x| x != 0).collect())
            .collect()
    });
    let mut masks = BTreeMap::new();
    let mut rope = BTreeMap::new();
    for (lt, rot) in rotary {
        let held = cache.map_or(0, |c| c.kv_len_of(cfg, *lt));
        masks.insert(
            *lt,
            MaskSpec {
                batch,
                q_start: past,
                q_len: t,
                kv_start: past - held,
                kv_len: held + t,
                window: match lt {
                    LayerType::Hybrid => None,
                    LayerType::HybridSliding => cfg.sliding_window,
                },
                key_padding: key_padding.clone(),
                documents: documents.clone(),
            },
        );
        rope.insert(*lt, rot.cos_sin(&positions, dtype, device)?);
    }
    let conv_mask = match &mask {
        Some(m) if t > 1 && m.iter().any(|r| r.contains(&0)) => {
            let data: Vec<f32> = m
                .iter()
                .flat_map(|r| r[past..].iter().map(|&x| x as f32))
                .collect();
            Some(Tensor::from_vec(data, (batch, t), device)?)
        }
        _ => None,
    };
    let s_len = cfg.conv_state_len();
    let same_document = match &documents {
        None => None,
        Some(d) => {
            // at least two columns: column 1 (previous token) drives the delayed value
            let cols = s_len.max(1) + 1;
            let mut data = Vec::with_capacity(batch * t * cols);
            for r in d {
                for i in 0..t {
                    for back in 0..cols {
                        data.push(if i >= back && r[i - back] == r[i] {
                            1f32
                        } else {
                            0f32
                        });
                    }
                }
            }
            Some(Tensor::from_vec(data, (batch, t, cols), device)?)
        }
    };
    Ok(ForwardContext {
        masks,
        rope,
        conv_mask,
        same_document,
        attn: opts.attn,
        batch,
        seq_len: t,
    })
}

/// Checks token ids against `cfg` (vocabulary, context length after `past` cached tokens);
/// returns the ids on the host.
pub fn check_input_ids(cfg: &ZayaConfig, input_ids: &Tensor, past: usize) -> Result<Vec<Vec<i64>>> {
    let ids = host_2d(input_ids, "input_ids")?;
    let vocab = cfg.vocab_size;
    for (row, r) in ids.iter().enumerate() {
        for (position, &id) in r.iter().enumerate() {
            if id < 0 || id as usize >= vocab {
                return Err(ZayaError::TokenOutOfRange {
                    id,
                    row,
                    position,
                    vocab_size: vocab,
                });
            }
        }
        if past + r.len() > cfg.max_position_embeddings {
            return Err(ZayaError::ContextTooLong {
                row,
                length: past + r.len(),
                limit: cfg.max_position_embeddings,
            });
        }
    }
    if ids.is_empty() || ids[0].is_empty() {
        return Err(ZayaError::Input(
            "input_ids must hold at least one token".into(),
        ));
    }
    Ok(ids)
}
