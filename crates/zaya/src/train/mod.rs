//! Fine-tuning: a trainable model (f32 master weights in a candle `VarMap`), the causal-LM
//! loss computed in chunks, the router load-balancing loss and bias rule, per-layer gradient
//! checkpointing, AdamW with a warm-up + cosine schedule, and a training loop with exact
//! resume.
//!
//! Parameter names are the HF 5.23 (native layout) names, which are also the `VarMap` keys;
//! with tied embeddings there is no `lm_head.weight` parameter: the head uses
//! `model.embed_tokens.weight`, which receives both gradients (as in the reference, where
//! `named_parameters` lists the tied weight once). The per-layer `balancing_biases` are
//! buffers: they live in the `VarMap` (so the model reads them like any weight and they are
//! saved with the checkpoint) but are not parameters — no gradient, no optimizer; the
//! bias-balancing rule updates them between steps.

pub mod aux_loss;
pub mod checkpointing;
pub mod loss;
pub mod optim;
pub mod schedule;
pub mod trainer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

use crate::attention::AttnImplementation;
use crate::config::ZayaConfig;
use crate::error::{Result, ZayaError};
use crate::model::linear::Weights;
use crate::model::{ModelPart, ZayaModel};
use crate::weights::{native_specs, save_checkpoint, Checkpoint, Layout};
pub use aux_loss::LayerRoutingStats;
pub use checkpointing::{
    accumulate, boundary_grads, boundary_leaves, seeded, segment_seed, token_logps_of,
    BoundaryGrads, Checkpointing, LossHead, StageBatch, StageForward, StageInput, StageUpstream,
};
pub use loss::{Targets, TokenLogps, IGNORE_INDEX};

/// Where tensors handed over in memory come from, for error messages.
const IN_MEMORY: &str = "<in-memory tensors>";

/// One trainable tensor.
#[derive(Debug, Clone)]
pub struct Param {
    /// HF parameter name (native layout).
    pub name: String,
    pub var: Var,
    /// AdamW weight decay applies (matrices and stacked expert / conv weights); norms,
    /// biases, scales and every other 1-D parameter are not decayed.
    pub decay: bool,
}

/// A labelled batch. Rows have equal length; pad them and give an `attention_mask`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Batch {
    pub input_ids: Vec<Vec<u32>>,
    /// `-100` = not counted. Same shape as `input_ids`; position `t + 1` is the target of
    /// position `t` (the reference's shift).
    pub labels: Vec<Vec<i64>>,
    /// 1 for real tokens, 0 for padding.
    pub attention_mask: Option<Vec<Vec<u32>>>,
    /// Packed rows: a document id per position; documents do not see each other (see
    /// `ForwardOptions::document_ids`).
    pub document_ids: Option<Vec<Vec<u32>>>,
}

impl Batch {
    /// Plain language modelling on unpadded rows: the labels are the inputs (every shifted
    /// position counted), one document per row.
    pub fn language_modelling(input_ids: Vec<Vec<u32>>) -> Self {
        Batch {
            labels: input_ids
                .iter()
                .map(|r| r.iter().map(|&t| i64::from(t)).collect())
                .collect(),
            input_ids,
            attention_mask: None,
            document_ids: None,
        }
    }

    /// Checks the shapes and mask values; returns `(B, T)`.
    pub fn shape(&self) -> Result<(usize, usize)> {
        let b = self.input_ids.len();
        let t = self.input_ids.first().map_or(0, |r| r.len());
        if b == 0 || t == 0 {
            return Err(ZayaError::Input(
                "a batch needs at least one row of at least one token".into(),
            ));
        }
        let rect = |rows: &[Vec<_>]| rows.len() == b && rows.iter().all(|r| r.len() == t);
        if !rect(&self.input_ids) {
            return Err(ZayaError::Input(format!(
                "input_ids rows differ in length (row 0 has {t})"
            )));
        }
        if self.labels.len() != b || self.labels.iter().any(|r| r.len() != t) {
            return Err(ZayaError::Input(format!(
                "labels must have the shape of input_ids [{b}, {t}]"
            )));
        }
        if let Some(m) = &self.attention_mask {
            if !rect(m) {
                return Err(ZayaError::Input(format!(
                    "attention_mask must have the shape of input_ids [{b}, {t}]"
                )));
            }
            if m.iter().flatten().any(|&x| x > 1) {
                return Err(ZayaError::Input(
                    "attention_mask values must be 0 or 1".into(),
                ));
            }
        }
        Ok((b, t))
    }

    /// Number of counted targets after the causal shift.
    pub fn num_targets(&self) -> usize {
        self.labels
            .iter()
            .map(|r| r.iter().skip(1).filter(|&&l| l != IGNORE_INDEX).count())
            .sum()
    }
}

/// How a forward/backward pass is run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainOptions {
    pub checkpointing: Checkpointing,
    /// Weight of the router balance loss (`router_aux_loss_coef`); 0 switches it off (its
    /// value is still reported).
    pub aux_loss_coef: f64,
    /// Counted positions per LM-head chunk (bounds the live `[chunk, vocab]` logits).
    pub loss_chunk: usize,
    /// Attention backend of the training forward: `eager` (the reference, built from
    /// differentiable ops), `sdpa` or `flex` (fused forward and backward, tested against
    /// eager's gradients).
    pub attn: AttnImplementation,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            checkpointing: Checkpointing::Off,
            aux_loss_coef: 0.001,
            loss_chunk: 512,
            attn: AttnImplementation::default(),
        }
    }
}

impl TrainOptions {
    /// Rejects a zero chunk size, a negative or non-finite coefficient and `Every(0)`.
    pub fn validate(&self) -> Result<()> {
        if self.loss_chunk == 0 {
            return Err(ZayaError::Input(
                "loss chunk size must be at least 1".into(),
            ));
        }
        if !(self.aux_loss_coef >= 0.0 && self.aux_loss_coef.is_finite()) {
            return Err(ZayaError::Input(format!(
                "router_aux_loss_coef must be finite and >= 0, got {}",
                self.aux_loss_coef
            )));
        }
        self.checkpointing.segment_len()?;
        Ok(())
    }

    /// Defaults with the config's `router_aux_loss_coef` and a loss chunk of about 32M
    /// logits (128 MiB per `[chunk, vocab]` f32 tensor): 1048 positions for a 32k
    /// vocabulary, 128 for ZAYA1's 262k. The fused head (`kernels::loss_head`) holds one such
    /// buffer, the autograd head a handful. Every chunk's products read the whole head
    /// weight again (the GEMM packs it twice a chunk), so fewer, larger chunks cost less:
    /// against 16M logits (524 / 64 positions), the small config's training step (batch
    /// 4 × 256, the Xeon, three alternated pairs) took 1.1–2.7 % less time, and neither the
    /// small nor the medium step's peak RSS rose (2164–2191 against 2228–2244 MiB, 14155 /
    /// 14221 against 14241 / 14264).
    pub fn for_config(cfg: &ZayaConfig) -> Self {
        TrainOptions {
            aux_loss_coef: cfg.router_aux_loss_coef,
            loss_chunk: ((1usize << 25) / cfg.vocab_size.max(1)).clamp(8, 2048),
            ..Default::default()
        }
    }
}

/// How one micro-batch's losses are weighted in the step's objective
/// `Σ_mb nll_sum_mb / normalizer + coef · Σ_mb aux_weight_mb · aux_mb`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossScale {
    /// Divides the summed token NLL; `None` = this batch's own target count (the mean).
    pub normalizer: Option<f64>,
    /// Multiplies `coef · aux` (1 / number of micro-batches under accumulation).
    pub aux_weight: f64,
}

impl Default for LossScale {
    fn default() -> Self {
        LossScale {
            normalizer: None,
            aux_weight: 1.0,
        }
    }
}

/// Gradients aligned with [`TrainableModel::params`]; `None` where a parameter got none.
#[derive(Debug, Clone, Default)]
pub struct Gradients {
    pub grads: Vec<Option<Tensor>>,
}

impl Gradients {
    pub(crate) fn from_store(params: &[Param], store: &GradStore) -> Self {
        Gradients {
            grads: params
                .iter()
                .map(|p| store.get(p.var.as_tensor()).map(Tensor::detach))
                .collect(),
        }
    }

    /// Adds `other` (same parameter list) into `self`.
    pub fn accumulate(&mut self, other: &Gradients) -> Result<()> {
        if self.grads.is_empty() {
            *self = other.clone();
            return Ok(());
        }
        if self.grads.len() != other.grads.len() {
            return Err(ZayaError::Input(format!(
                "cannot add gradients of {} and {} parameters",
                self.grads.len(),
                other.grads.len()
            )));
        }
        for (a, b) in self.grads.iter_mut().zip(&other.grads) {
            *a = match (a.take(), b) {
                (Some(x), Some(y)) => Some((x + y)?),
                (x, None) => x,
                (None, Some(y)) => Some(y.clone()),
            };
        }
        Ok(())
    }

    /// `sqrt(Σ ‖g‖²)` over every gradient, accumulated in f64.
    pub fn global_norm(&self) -> Result<f64> {
        let mut sum = 0f64;
        for g in self.grads.iter().flatten() {
            sum += squared_norm(g)?;
        }
        Ok(sum.sqrt())
    }

    /// Multiplies every gradient by `factor`.
    pub fn scale(&mut self, factor: f64) -> Result<()> {
        for slot in self.grads.iter_mut() {
            if let Some(g) = slot.take() {
                // In the gradient's own buffer where nothing else holds it (the values of
                // `g * factor` either way): clipping runs when every gradient is alive.
                *slot = Some(g.affine_reusing(factor, 0.0)?);
            }
        }
        Ok(())
    }

    /// Gradients by HF parameter name (parameters without a gradient are left out).
    pub fn named(&self, params: &[Param]) -> BTreeMap<String, Tensor> {
        params
            .iter()
            .zip(&self.grads)
            .filter_map(|(p, g)| g.as_ref().map(|g| (p.name.clone(), g.clone())))
            .collect()
    }
}

/// Result of [`TrainableModel::forward_backward`].
#[derive(Debug, Clone)]
pub struct BackwardOutput {
    /// Σ NLL / normalizer (the reference's loss when the normaliser is the target count).
    pub loss: f64,
    /// Balance loss (unweighted, mean over layers).
    pub aux_loss: f64,
    /// Counted targets of this batch.
    pub targets: usize,
    /// Per layer routing counts over the real tokens.
    pub routing: Vec<LayerRoutingStats>,
    pub grads: Gradients,
}

/// Result of [`TrainableModel::evaluate`].
#[derive(Debug, Clone)]
pub struct EvalOutput {
    /// Mean NLL over the counted targets.
    pub loss: f64,
    pub aux_loss: f64,
    pub targets: usize,
    pub routing: Vec<LayerRoutingStats>,
}

/// A model whose weights are `Var`s (f32 master copies) in a `VarMap`.
pub struct TrainableModel {
    cfg: ZayaConfig,
    varmap: VarMap,
    model: ZayaModel,
    params: Vec<Param>,
    /// `model.layers.{i}.mlp.gate.balancing_biases`, per layer held.
    biases: Vec<Var>,
    /// What of the model this holds (a pipeline stage, or the whole model).
    part: ModelPart,
    device: Device,
}

impl std::fmt::Debug for TrainableModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrainableModel")
            .field("layers", &self.cfg.num_hidden_layers)
            .field("params", &self.params.len())
            .finish()
    }
}

fn bias_name(layer: usize) -> String {
    format!("model.layers.{layer}.mlp.gate.balancing_biases")
}

impl TrainableModel {
    /// Loads a checkpoint directory (either layout, any stored float dtype) into f32 `Var`s.
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        let ckpt = Checkpoint::open(dir)?;
        let cfg = ckpt.config()?;
        ckpt.validate(&cfg)?;
        Self::load_part(&ckpt, &cfg, &ModelPart::whole(&cfg))
    }

    /// Reads only the tensors of `part` (a pipeline stage: its layers, the embedding on the
    /// input side, the final norm and head on the output side) from `ckpt` into f32 `Var`s;
    /// nothing else of the checkpoint is read. `ckpt` should have been validated against
    /// `cfg`.
    pub fn load_part(ckpt: &Checkpoint, cfg: &ZayaConfig, part: &ModelPart) -> Result<Self> {
        part.check(cfg)?;
        let dev = Device::Cpu;
        let tensors = native_specs(cfg)
            .into_iter()
            .filter(|s| part.holds(cfg, &s.name))
            .map(|s| Ok((s.name.clone(), ckpt.load(cfg, &s.name, DType::F32, &dev)?)))
            .collect::<Result<BTreeMap<_, _>>>()?;
        Self::part_from_tensors(cfg, part, &tensors)
    }

    /// Builds from every native tensor (names and shapes as [`native_specs`]), copied to f32.
    pub fn from_tensors(cfg: &ZayaConfig, tensors: &BTreeMap<String, Tensor>) -> Result<Self> {
        Self::part_from_tensors(cfg, &ModelPart::whole(cfg), tensors)
    }

    /// Builds the part `part` of the model from exactly its native tensors (those
    /// [`ModelPart::holds`]), copied to f32. Its parameters are the part's, in module order.
    pub fn part_from_tensors(
        cfg: &ZayaConfig,
        part: &ModelPart,
        tensors: &BTreeMap<String, Tensor>,
    ) -> Result<Self> {
        part.check(cfg)?;
        let specs: Vec<_> = native_specs(cfg)
            .into_iter()
            .filter(|s| part.holds(cfg, &s.name))
            .collect();
        for (name, t) in tensors {
            if !specs.iter().any(|s| &s.name == name) {
                return Err(ZayaError::UnexpectedTensor {
                    name: name.clone(),
                    shape: t.dims().to_vec(),
                    file: PathBuf::from(IN_MEMORY),
                });
            }
        }
        let varmap = VarMap::new();
        let mut params = Vec::new();
        let mut biases = Vec::new();
        {
            let mut data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
            for spec in &specs {
                let t = tensors
                    .get(&spec.name)
                    .ok_or_else(|| ZayaError::MissingTensor {
                        name: spec.name.clone(),
                        expected: spec.shape.clone(),
                        location: PathBuf::from(IN_MEMORY),
                    })?;
                if t.dims() != spec.shape.as_slice() {
                    return Err(ZayaError::ShapeMismatch {
                        name: spec.name.clone(),
                        expected: spec.shape.clone(),
                        found: t.dims().to_vec(),
                        file: PathBuf::from(IN_MEMORY),
                    });
                }
                // `from_tensor` copies: the master weights never alias the caller's tensors.
                let var = Var::from_tensor(&t.to_dtype(DType::F32)?)?;
                if spec.name.ends_with(".balancing_biases") {
                    biases.push(var.clone());
                } else {
                    params.push(Param {
                        name: spec.name.clone(),
                        decay: spec.shape.len() >= 2,
                        var: var.clone(),
                    });
                }
                data.insert(spec.name.clone(), var);
            }
        }
        let device = Device::Cpu;
        let model = Self::build(cfg, part, &varmap, &device)?;
        Ok(TrainableModel {
            cfg: cfg.clone(),
            varmap,
            model,
            params,
            biases,
            part: part.clone(),
            device,
        })
    }

    /// What of the model this holds.
    pub fn part(&self) -> &ModelPart {
        &self.part
    }

    fn build(
        cfg: &ZayaConfig,
        part: &ModelPart,
        varmap: &VarMap,
        device: &Device,
    ) -> Result<ZayaModel> {
        let before = varmap.all_vars().len();
        let vb = VarBuilder::from_varmap(varmap, DType::F32, device);
        let model = ZayaModel::part_from_weights(cfg, Weights::from(vb), part)?;
        // A name the model asks for that is not in the map would be silently created (with
        // a default init) by the VarMap backend: that would be a bug, not a user error.
        let after = varmap.all_vars().len();
        if after != before {
            return Err(ZayaError::Input(format!(
                "model construction created {} unexpected variables",
                after - before
            )));
        }
        Ok(model)
    }

    pub fn config(&self) -> &ZayaConfig {
        &self.cfg
    }

    /// The model, reading the live `Var`s (updates by the optimizer are seen immediately).
    pub fn model(&self) -> &ZayaModel {
        &self.model
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Every trainable parameter, in module order.
    pub fn params(&self) -> &[Param] {
        &self.params
    }

    pub fn param_index(&self, name: &str) -> Option<usize> {
        self.params.iter().position(|p| p.name == name)
    }

    /// Every native tensor (parameters and balancing biases) as detached copies.
    pub fn tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        let data = self.varmap.data().lock().unwrap_or_else(|e| e.into_inner());
        data.iter()
            .map(|(k, v)| Ok((k.clone(), v.as_tensor().detach().copy()?)))
            .collect()
    }

    /// Writes a native-layout f32 checkpoint directory (config + weights).
    pub fn save(&self, dir: &Path) -> Result<()> {
        if self.part != ModelPart::whole(&self.cfg) {
            return Err(ZayaError::Input(format!(
                "a model part (layers {:?}) is not a checkpoint: gather the whole model to save it",
                self.part.layers
            )));
        }
        save_checkpoint(dir, &self.cfg, &self.tensors()?, Layout::Native)
    }

    /// Balancing biases of every layer (`E + 1` each, skip last).
    pub fn balancing_biases(&self) -> Result<Vec<Vec<f32>>> {
        self.biases
            .iter()
            .map(|b| Ok(b.as_tensor().to_vec1::<f32>()?))
            .collect()
    }

    /// Overwrites the balancing biases of `layer`. The router keeps a host copy of its biases
    /// for the top-1 choice, so the model is rebuilt from the `VarMap` (cheap: it shares the
    /// `Var` storage; nothing is copied).
    pub fn set_balancing_biases(&mut self, layer: usize, values: &[f32]) -> Result<()> {
        self.write_bias(layer, values)?;
        self.model = Self::build(&self.cfg, &self.part, &self.varmap, &self.device)?;
        Ok(())
    }

    fn write_bias(&self, layer: usize, values: &[f32]) -> Result<()> {
        let var = layer
            .checked_sub(self.part.layers.start)
            .and_then(|i| self.biases.get(i))
            .ok_or_else(|| {
                ZayaError::Input(format!(
                    "layer {layer} out of range (this model holds layers {:?})",
                    self.part.layers
                ))
            })?;
        if values.len() != self.cfg.num_experts + 1 {
            return Err(ZayaError::ShapeMismatch {
                name: bias_name(layer),
                expected: vec![self.cfg.num_experts + 1],
                found: vec![values.len()],
                file: PathBuf::from(IN_MEMORY),
            });
        }
        var.set(&Tensor::new(values, &self.device)?)?;
        Ok(())
    }

    /// The bias-balancing rule on every layer held (a part: its layers, `routing` given for
    /// those only) from that layer's routing counts of the step:
    /// `b_e += lr · sign(mean_count − count_e)` for real experts, skip untouched.
    pub fn apply_bias_balancing(&mut self, routing: &[LayerRoutingStats], lr: f64) -> Result<()> {
        if routing.len() != self.biases.len() {
            return Err(ZayaError::Input(format!(
                "routing counts for {} layers, the model holds {}",
                routing.len(),
                self.biases.len()
            )));
        }
        let current = self.balancing_biases()?;
        let first = self.part.layers.start;
        for (j, (b, stats)) in current.iter().zip(routing).enumerate() {
            let layer = first + j;
            let new = aux_loss::balance_bias_update(b, &stats.counts, lr)?;
            self.write_bias(layer, &new)?;
        }
        self.model = Self::build(&self.cfg, &self.part, &self.varmap, &self.device)?;
        Ok(())
    }

    /// Loss and gradients of every parameter for `batch`. The objective differentiated is
    /// `nll_sum / normalizer + aux_loss_coef · aux_weight · aux`.
    pub fn forward_backward(
        &self,
        batch: &Batch,
        opts: &TrainOptions,
        scale: &LossScale,
    ) -> Result<BackwardOutput> {
        checkpointing::forward_backward_of(
            &self.model,
            &self.params,
            batch,
            opts,
            scale,
            LossHead::CrossEntropy,
        )
    }

    /// [`TrainableModel::forward_backward`] that hands each parameter's gradient to `sink`
    /// as soon as it is final, during the backward pass (an optimizer in the backward: the
    /// whole model's gradients are never alive together). The returned gradients are empty.
    pub fn forward_backward_into(
        &self,
        batch: &Batch,
        opts: &TrainOptions,
        scale: &LossScale,
        sink: &mut checkpointing::GradSink<'_>,
    ) -> Result<BackwardOutput> {
        checkpointing::forward_backward_into(
            &self.model,
            &self.params,
            batch,
            opts,
            scale,
            LossHead::CrossEntropy,
            Some(sink),
        )
    }

    /// Gradients of a per-token objective of the targets' log-probabilities (see
    /// [`LossHead::TokenObjective`]) plus `aux_loss_coef · aux_weight ·` the balance loss.
    /// The returned `loss` is 0 (the objective knows its own value); `targets` counts the
    /// scored tokens.
    pub fn forward_backward_objective(
        &self,
        batch: &Batch,
        opts: &TrainOptions,
        aux_weight: f64,
        temperature: f64,
        objective: &mut dyn FnMut(&TokenLogps) -> Result<Vec<f32>>,
    ) -> Result<BackwardOutput> {
        checkpointing::objective_backward_of(
            &self.model,
            &self.params,
            batch,
            opts,
            aux_weight,
            temperature,
            objective,
        )
    }

    /// Log-probabilities and entropies of the counted targets under
    /// `softmax(logits / temperature)`, without gradients (layer by layer).
    pub fn token_logps(
        &self,
        batch: &Batch,
        opts: &TrainOptions,
        temperature: f64,
    ) -> Result<TokenLogps> {
        checkpointing::token_logps_of(&self.model, batch, opts, temperature)
    }

    /// A model for inference that reads the same weight storage as the trainable `Var`s
    /// (no copy): optimizer updates are written in place and seen by the view at once. Its
    /// tensors are detached, so nothing it runs records a graph and the fast inference
    /// kernels are used. Rebuild the view after [`TrainableModel::set_balancing_biases`],
    /// [`TrainableModel::apply_bias_balancing`] or [`TrainableModel::load_tensors`] (the
    /// router keeps a host copy of its biases).
    pub fn inference_view(&self) -> Result<ZayaModel> {
        let tensors: std::collections::HashMap<String, Tensor> = {
            let data = self.varmap.data().lock().unwrap_or_else(|e| e.into_inner());
            data.iter()
                .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
                .collect()
        };
        ZayaModel::part_from_weights(
            &self.cfg,
            Weights::from(VarBuilder::from_tensors(tensors, DType::F32, &self.device)),
            &self.part,
        )
    }

    /// Loss without gradients (layer by layer, no graph kept beyond one layer).
    pub fn evaluate(&self, batch: &Batch, opts: &TrainOptions) -> Result<EvalOutput> {
        checkpointing::evaluate_of(&self.model, batch, opts)
    }

    /// Loads tensors by native name into the parameters and biases (exact resume and tests).
    pub fn load_tensors(&mut self, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
        {
            let data = self.varmap.data().lock().unwrap_or_else(|e| e.into_inner());
            for (name, t) in tensors {
                let var = data.get(name).ok_or_else(|| ZayaError::UnexpectedTensor {
                    name: name.clone(),
                    shape: t.dims().to_vec(),
                    file: PathBuf::from(IN_MEMORY),
                })?;
                if var.dims() != t.dims() {
                    return Err(ZayaError::ShapeMismatch {
                        name: name.clone(),
                        expected: var.dims().to_vec(),
                        found: t.dims().to_vec(),
                        file: PathBuf::from(IN_MEMORY),
                    });
                }
                var.set(&t.to_dtype(DType::F32)?)?;
            }
        }
        self.model = Self::build(&self.cfg, &self.part, &self.varmap, &self.device)?;
        Ok(())
    }
}

/// `Σ g²` of one gradient (an f32 sum, as the global norm adds them): the value of candle's
/// `g.sqr()?.sum_all()`, read in place where `g` is a contiguous f32 CPU tensor — the
/// gradient-sized square is never built (it was a transient at the training step's memory
/// peak, when every gradient is alive).
pub(crate) fn squared_norm(g: &Tensor) -> Result<f64> {
    if g.dtype() == DType::F32 && g.device().is_cpu() {
        if let Some((a, b)) = g.layout().contiguous_offsets() {
            let (storage, _) = g.storage_and_layout();
            if let candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) = &*storage {
                if let Some(sum) = candle_sum_of_squares(&v[a..b]) {
                    return Ok(f64::from(sum));
                }
            }
        }
    }
    Ok(f64::from(
        g.to_dtype(DType::F32)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f32>()?,
    ))
}

/// `Σ x²` in f32 in the order of candle's CPU `sum_all` over the squares (`None` where that
/// order is not known here: non-x86 CPUs, whose candle kernels differ). With AVX2, candle
/// keeps 32 running sums — sum `l` takes the elements `≡ l (mod 32)` of the largest prefix
/// that is a multiple of 32 —, folds them as its `vec_reduce` does, then adds the tail in
/// order; without, it adds every element in order.
fn candle_sum_of_squares(xs: &[f32]) -> Option<f32> {
    #[cfg(target_arch = "x86_64")]
    {
        if !std::is_x86_feature_detected!("avx2") {
            return Some(xs.iter().fold(0f32, |s, &x| s + x * x));
        }
        let whole = xs.len() & !31;
        let mut acc = [0f32; 32];
        for block in xs[..whole].chunks_exact(32) {
            for (a, &x) in acc.iter_mut().zip(block) {
                *a += x * x;
            }
        }
        // `vec_reduce`: the four 8-lane vectors as (v0 + v1) + (v2 + v3), then the halves
        // of the 8 lanes added, then two horizontal adds.
        let lane = |l: usize| (acc[l] + acc[8 + l]) + (acc[16 + l] + acc[24 + l]);
        let t: [f32; 4] = std::array::from_fn(|l| lane(l) + lane(l + 4));
        let mut sum = (t[0] + t[1]) + (t[2] + t[3]);
        for &x in &xs[whole..] {
            sum += x * x;
        }
        Some(sum)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = xs;
        None
    }
}

/// What a [`trainer::Trainer`] trains: full fine-tuning ([`TrainableModel`]) or an adapter
/// over a frozen base ([`crate::lora::LoraModel`]).
pub trait Trainable {
    /// Files a complete checkpoint directory holds besides the trainer's own.
    const CHECKPOINT_FILES: &'static [&'static str];
    fn config(&self) -> &ZayaConfig;
    /// What the optimizer updates.
    fn params(&self) -> &[Param];
    fn forward_backward(
        &self,
        batch: &Batch,
        opts: &TrainOptions,
        scale: &LossScale,
    ) -> Result<BackwardOutput>;
    /// [`Trainable::forward_backward`] that hands parameter `i`'s gradient to `sink` (see
    /// [`checkpointing::GradSink`]); the returned gradients are those it did not take. By
    /// default after the pass, in parameter order (no memory saved); full fine-tuning
    /// hands each one over during the pass as soon as it is final.
    fn forward_backward_into(
        &self,
        batch: &Batch,
        opts: &TrainOptions,
        scale: &LossScale,
        sink: &mut checkpointing::GradSink<'_>,
    ) -> Result<BackwardOutput> {
        let mut out = self.forward_backward(batch, opts, scale)?;
        if !out.loss.is_finite() {
            return Err(ZayaError::Input(format!(
                "loss {} is not finite: no gradient handed to the optimizer",
                out.loss
            )));
        }
        for (i, g) in out.grads.grads.iter_mut().enumerate() {
            if let Some(g) = g.take() {
                sink(i, g)?;
            }
        }
        Ok(out)
    }
    /// The balancing-bias rule after a step.
    fn apply_bias_balancing(&mut self, routing: &[LayerRoutingStats], lr: f64) -> Result<()>;
    /// Called before each micro-batch's forward (LoRA draws its dropout masks from it).
    fn before_micro_batch(&mut self, _step: u64, _micro: u64) -> Result<()> {
        Ok(())
    }
    /// Writes the trained weights into a checkpoint directory (full fine-tuning: the model;
    /// LoRA: the adapter in PEFT's format).
    fn save_weights(&self, dir: &Path) -> Result<()>;
    fn device(&self) -> &Device;
    /// Gradients of [`Trainable::params`] for a per-token objective of the targets'
    /// log-probabilities (GRPO's loss; see [`checkpointing::objective_backward_of`]).
    fn forward_backward_objective(
        &self,
        batch: &Batch,
        opts: &TrainOptions,
        aux_weight: f64,
        temperature: f64,
        objective: &mut dyn FnMut(&TokenLogps) -> Result<Vec<f32>>,
    ) -> Result<BackwardOutput>;
    /// Log-probabilities and entropies of the counted targets under the current weights,
    /// without gradients (and without dropout).
    fn token_logps(
        &self,
        batch: &Batch,
        opts: &TrainOptions,
        temperature: f64,
    ) -> Result<TokenLogps>;
    /// A detached model for inference (the engine's rollouts) that reads the trained storage
    /// itself: optimizer updates, written in place, are seen at once, nothing is copied, no
    /// graph is recorded. LoRA: the frozen base with the live adapter factors attached (not
    /// merged), without dropout.
    fn inference_view(&self) -> Result<ZayaModel>;
    /// The policy GRPO's KL term compares against when the model holds it already: LoRA's
    /// frozen base with the adapters disabled (TRL + PEFT's `disable_adapter()`), sharing the
    /// base's storage. `None` for full fine-tuning, whose starting weights are overwritten
    /// (the caller loads a separate reference).
    fn frozen_reference(&self) -> Option<ZayaModel> {
        None
    }
    /// The global norm of `grads` (this model's gradients). A model sharded over ranks sums
    /// every rank's share (each element counted once).
    fn grad_norm(&self, grads: &Gradients) -> Result<f64> {
        grads.global_norm()
    }
}

impl Trainable for TrainableModel {
    const CHECKPOINT_FILES: &'static [&'static str] = &["model.safetensors", "config.json"];

    fn config(&self) -> &ZayaConfig {
        &self.cfg
    }
    fn params(&self) -> &[Param] {
        &self.params
    }
    fn forward_backward(
        &self,
        batch: &Batch,
        opts: &TrainOptions,
        scale: &LossScale,
    ) -> Result<BackwardOutput> {
        TrainableModel::forward_backward(self, batch, opts, scale)
    }
    fn forward_backward_into(
        &self,
        batch: &Batch,
        opts: &TrainOptions,
        scale: &LossScale,
        sink: &mut checkpointing::GradSink<'_>,
    ) -> Result<BackwardOutput> {
        TrainableModel::forward_backward_into(self, batch, opts, scale, sink)
    }
    fn apply_bias_balancing(&mut self, routing: &[LayerRoutingStats], lr: f64) -> Result<()> {
        TrainableModel::apply_bias_balancing(self, routing, lr)
    }
    fn save_weights(&self, dir: &Path) -> Result<()> {
        self.save(dir)
    }
    fn device(&self) -> &Device {
        &self.device
    }
    fn forward_backward_objective(
        &self,
        batch: &Batch,
        opts: &TrainOptions,
        aux_weight: f64,
        temperature: f64,
        objective: &mut dyn FnMut(&TokenLogps) -> Result<Vec<f32>>,
    ) -> Result<BackwardOutput> {
        TrainableModel::forward_backward_objective(
            self,
            batch,
            opts,
            aux_weight,
            temperature,
            objective,
        )
    }
    fn token_logps(
        &self,
        batch: &Batch,
        opts: &TrainOptions,
        temperature: f64,
    ) -> Result<TokenLogps> {
        TrainableModel::token_logps(self, batch, opts, temperature)
    }
    fn inference_view(&self) -> Result<ZayaModel> {
        TrainableModel::inference_view(self)
    }
}

/// `loss` (and with `grads`, `grad.<HF name>` for every parameter) for a labelled batch, as
/// the reference `ZayaForCausalLM(input_ids, labels=…)` computes them: cross-entropy only
/// (the reference has no auxiliary loss). `aux_loss` (the balance loss, unweighted) is
/// reported beside it.
pub fn labelled_outputs(
    model: &TrainableModel,
    batch: &Batch,
    grads: bool,
    checkpointing: Checkpointing,
) -> Result<BTreeMap<String, Tensor>> {
    labelled_outputs_of(model.model(), model.params(), batch, grads, checkpointing)
}

/// [`labelled_outputs`] for any model and parameter list (a LoRA model's adapter factors:
/// `grad.<PEFT key>`).
pub fn labelled_outputs_of(
    model: &ZayaModel,
    params: &[Param],
    batch: &Batch,
    grads: bool,
    checkpointing: Checkpointing,
) -> Result<BTreeMap<String, Tensor>> {
    let opts = TrainOptions {
        checkpointing,
        aux_loss_coef: 0.0,
        ..Default::default()
    };
    let mut out = BTreeMap::new();
    let (loss, aux) = if grads {
        let r = checkpointing::forward_backward_of(
            model,
            params,
            batch,
            &opts,
            &LossScale::default(),
            LossHead::CrossEntropy,
        )?;
        for (name, g) in r.grads.named(params) {
            out.insert(format!("grad.{name}"), g);
        }
        (r.loss, r.aux_loss)
    } else {
        let r = checkpointing::evaluate_of(model, batch, &opts)?;
        (r.loss, r.aux_loss)
    };
    out.insert("loss".into(), Tensor::new(&[loss as f32], model.device())?);
    out.insert(
        "aux_loss".into(),
        Tensor::new(&[aux as f32], model.device())?,
    );
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::squared_norm;
    use candle_core::{DType, Device, IndexOp, Tensor};

    /// candle's own `Σ g²`: a tensor of squares, then `sum_all`.
    fn through_candle(g: &Tensor) -> f64 {
        let sq = g.to_dtype(DType::F32).unwrap().sqr().unwrap();
        f64::from(sq.sum_all().unwrap().to_scalar::<f32>().unwrap())
    }

    /// The gradient norm read in place adds in candle's order: the clipping factor, and so
    /// every clipped update, is the same as before it stopped building the squares.
    #[test]
    fn squared_norm_in_place_equals_candles_sum_of_squares_bit_for_bit() {
        let dev = Device::Cpu;
        let data = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|i| ((i as u32).wrapping_mul(2_654_435_761) % 20011) as f32 / 997.0 - 10.0)
                .collect()
        };
        for n in [0, 1, 5, 31, 32, 33, 63, 64, 65, 1000, 4097, (1 << 20) + 17] {
            let g = Tensor::from_vec(data(n), n, &dev).unwrap();
            assert_eq!(
                squared_norm(&g).unwrap().to_bits(),
                through_candle(&g).to_bits(),
                "{n} values"
            );
        }
        // an offset view (read in place) and a transposed one (candle's path)
        let g = Tensor::from_vec(data(64 * 97), (64, 97), &dev).unwrap();
        for view in [g.i(3..40).unwrap(), g.t().unwrap()] {
            assert_eq!(
                squared_norm(&view).unwrap().to_bits(),
                through_candle(&view).to_bits()
            );
        }
    }
}
