//! The trainable form of an adapter: `Var`s for every `lora_A` / `lora_B` over a frozen base
//! model that stays in its stored form (no f32 master copy of the base, no gradient buffers
//! for it). The same forward/backward as full fine-tuning (chunked loss, balance loss,
//! gradient checkpointing) differentiates the adapter parameters only.
//!
//! For SFT (`zaya train --lora`) and GRPO: [`attach_lora`] turns a model and a
//! [`LoraConfig`] into trainable adapter vars, [`LoraModel::params`] lists them for the
//! optimizer (by PEFT key), [`LoraModel::model`] is the adapted model to run forwards with.

use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use rand::{rngs::StdRng, Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

use super::adapter::LoraAdapter;
use super::{attach, plan, LoraConfig, LoraInit, Site, SiteWeights};
use crate::config::ZayaConfig;
use crate::error::{Result, ZayaError};
use crate::model::ZayaModel;
use crate::train::{
    checkpointing, BackwardOutput, Batch, EvalOutput, LayerRoutingStats, LossScale, Param,
    TokenLogps, TrainOptions, Trainable,
};

/// A frozen base model with trainable LoRA factors.
pub struct LoraModel {
    base: ZayaModel,
    config: LoraConfig,
    sites: Vec<Site>,
    /// `lora_A`, `lora_B` of each site, in f32.
    vars: Vec<(Var, Var)>,
    params: Vec<Param>,
    /// `base` with the adapters attached (reads the live vars).
    model: ZayaModel,
    /// Seeds the dropout masks (differs per micro-batch; see [`LoraModel::set_dropout_key`]).
    seed: u64,
}

impl std::fmt::Debug for LoraModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoraModel")
            .field("sites", &self.sites.len())
            .field("r", &self.config.r)
            .finish()
    }
}

/// Turns `base` and `config` into trainable adapter vars: `A` initialised as PEFT does
/// (Kaiming-uniform, or Gaussian with std `1/r`) from `seed`, `B = 0`, so the adapted model
/// starts equal to the base. The base is shared, not copied.
pub fn attach_lora(base: &ZayaModel, config: &LoraConfig, seed: u64) -> Result<LoraModel> {
    let sites = plan(base.config(), config)?;
    let mut rng = StdRng::seed_from_u64(seed);
    let dev = base.device();
    let mut uniform = |shape: [usize; 2], fan_in: usize| -> Result<Tensor> {
        // kaiming_uniform_(a = √5) on [rows, fan_in]: bound = 1/√fan_in
        let bound = 1.0 / (fan_in as f64).sqrt();
        let v: Vec<f32> = (0..shape[0] * shape[1])
            .map(|_| rng.random_range(-bound..bound) as f32)
            .collect();
        Ok(Tensor::from_vec(v, (shape[0], shape[1]), dev)?)
    };
    let mut weights = Vec::with_capacity(sites.len());
    for s in &sites {
        let a = match config.init {
            LoraInit::Kaiming | LoraInit::NoInit => uniform(s.shape_a, s.shape_a[1])?,
            LoraInit::Gaussian => {
                let d = Normal::new(0f32, 1.0 / config.r as f32)
                    .map_err(|e| ZayaError::Input(format!("gaussian init: {e}")))?;
                let mut g = StdRng::seed_from_u64(
                    seed ^ crate::model::linear::splitmix64(weights.len() as u64),
                );
                let v: Vec<f32> = (0..s.shape_a[0] * s.shape_a[1])
                    .map(|_| d.sample(&mut g))
                    .collect();
                Tensor::from_vec(v, (s.shape_a[0], s.shape_a[1]), dev)?
            }
        };
        let b = match config.init {
            // PEFT's `init_lora_weights=False`: B keeps nn.Linear's init (not an identity start)
            LoraInit::NoInit => uniform(s.shape_b, s.shape_b[1])?,
            _ => Tensor::zeros((s.shape_b[0], s.shape_b[1]), DType::F32, dev)?,
        };
        weights.push(SiteWeights { a, b });
    }
    LoraModel::new(base, config.clone(), sites, weights, seed)
}

impl LoraModel {
    fn new(
        base: &ZayaModel,
        config: LoraConfig,
        sites: Vec<Site>,
        weights: Vec<SiteWeights>,
        seed: u64,
    ) -> Result<Self> {
        let mut vars = Vec::with_capacity(sites.len());
        let mut params = Vec::with_capacity(2 * sites.len());
        let mut live = Vec::with_capacity(sites.len());
        for (s, w) in sites.iter().zip(weights) {
            // `from_tensor` copies: the vars never alias the caller's tensors.
            let a = Var::from_tensor(&w.a.to_dtype(DType::F32)?.to_device(base.device())?)?;
            let b = Var::from_tensor(&w.b.to_dtype(DType::F32)?.to_device(base.device())?)?;
            params.push(Param {
                name: s.key_a.clone(),
                var: a.clone(),
                decay: true,
            });
            params.push(Param {
                name: s.key_b.clone(),
                var: b.clone(),
                decay: true,
            });
            live.push(SiteWeights {
                a: a.as_tensor().clone(),
                b: b.as_tensor().clone(),
            });
            vars.push((a, b));
        }
        let model = attach(base, &config, &sites, &live, None)?;
        Ok(LoraModel {
            base: base.clone(),
            config,
            sites,
            vars,
            params,
            model,
            seed,
        })
    }

    /// Continues training a loaded adapter (its weights become the vars' starting values).
    pub fn from_adapter(base: &ZayaModel, adapter: &LoraAdapter, seed: u64) -> Result<Self> {
        Self::new(
            base,
            adapter.config.clone(),
            adapter.sites.clone(),
            adapter.weights.clone(),
            seed,
        )
    }

    /// The adapter parameters (PEFT keys as names), for the optimizer.
    pub fn params(&self) -> &[Param] {
        &self.params
    }

    /// The adapted model (base + live adapter vars); run forwards with it.
    pub fn model(&self) -> &ZayaModel {
        &self.model
    }

    /// The frozen base.
    pub fn base(&self) -> &ZayaModel {
        &self.base
    }

    pub fn lora_config(&self) -> &LoraConfig {
        &self.config
    }

    pub fn sites(&self) -> &[Site] {
        &self.sites
    }

    /// Number of trainable weights.
    pub fn num_parameters(&self) -> usize {
        self.params.iter().map(|p| p.var.elem_count()).sum()
    }

    /// Dropout masks for the next forward passes are drawn from `(seed, step, micro)`: the
    /// same triple gives the same masks (checkpointing recomputes layers exactly). Without
    /// dropout this does nothing.
    pub fn set_dropout_key(&mut self, step: u64, micro: u64) -> Result<()> {
        if self.config.dropout <= 0.0 {
            return Ok(());
        }
        use crate::model::linear::splitmix64;
        let key = splitmix64(splitmix64(self.seed ^ step.rotate_left(17)) ^ micro);
        let live = self.live_weights(false);
        self.model = attach(&self.base, &self.config, &self.sites, &live, Some(key))?;
        Ok(())
    }

    /// The factors as the model reads them: the vars themselves (`detached = false`: the
    /// training forward records a graph to them) or detached tensors over the same storage.
    fn live_weights(&self, detached: bool) -> Vec<SiteWeights> {
        let t = |v: &Var| {
            if detached {
                v.as_tensor().detach()
            } else {
                v.as_tensor().clone()
            }
        };
        self.vars
            .iter()
            .map(|(a, b)| SiteWeights { a: t(a), b: t(b) })
            .collect()
    }

    /// The model without dropout (evaluation, sampling rollouts).
    pub fn eval_model(&self) -> Result<ZayaModel> {
        attach(
            &self.base,
            &self.config,
            &self.sites,
            &self.live_weights(false),
            None,
        )
    }

    /// The frozen base with the live adapter factors attached, detached and without dropout:
    /// what the engine samples rollouts from. It reads the vars' storage (the optimizer writes
    /// it in place, so the view follows every step) and shares every base tensor; nothing is
    /// merged or copied.
    pub fn inference_view(&self) -> Result<ZayaModel> {
        attach(
            &self.base,
            &self.config,
            &self.sites,
            &self.live_weights(true),
            None,
        )
    }

    /// The model the no-gradient passes run: the training model, or without its dropout.
    fn no_dropout_model(&self) -> Result<std::borrow::Cow<'_, ZayaModel>> {
        Ok(if self.config.dropout > 0.0 {
            std::borrow::Cow::Owned(self.eval_model()?)
        } else {
            std::borrow::Cow::Borrowed(&self.model)
        })
    }

    /// A detached snapshot of the adapter (for saving).
    pub fn adapter(&self) -> Result<LoraAdapter> {
        let weights = self
            .vars
            .iter()
            .map(|(a, b)| -> Result<SiteWeights> {
                Ok(SiteWeights {
                    a: a.as_tensor().detach().copy()?,
                    b: b.as_tensor().detach().copy()?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(LoraAdapter {
            config: self.config.clone(),
            sites: self.sites.clone(),
            weights,
        })
    }

    /// Loss and the gradients of every adapter parameter.
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
            checkpointing::LossHead::CrossEntropy,
        )
    }

    /// Gradients of the adapter factors for a per-token objective of the targets'
    /// log-probabilities (GRPO; see [`checkpointing::objective_backward_of`]), through the
    /// same forward/backward (and gradient checkpointing) as [`LoraModel::forward_backward`].
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

    /// Log-probabilities of the counted targets under base + adapter, without gradients and
    /// without dropout.
    pub fn token_logps(
        &self,
        batch: &Batch,
        opts: &TrainOptions,
        temperature: f64,
    ) -> Result<TokenLogps> {
        let model = self.no_dropout_model()?;
        checkpointing::token_logps_of(&model, batch, opts, temperature)
    }

    /// Loss without gradients.
    pub fn evaluate(&self, batch: &Batch, opts: &TrainOptions) -> Result<EvalOutput> {
        checkpointing::evaluate_of(&self.model, batch, opts)
    }

    /// Writes the adapter in PEFT's format.
    pub fn save(&self, dir: &Path) -> Result<()> {
        self.adapter()?.save(dir)
    }
}

impl Trainable for LoraModel {
    const CHECKPOINT_FILES: &'static [&'static str] =
        &[super::adapter::CONFIG_FILE, super::adapter::WEIGHTS_FILE];

    fn config(&self) -> &ZayaConfig {
        self.base.config()
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
        LoraModel::forward_backward(self, batch, opts, scale)
    }

    fn apply_bias_balancing(&mut self, _routing: &[LayerRoutingStats], _lr: f64) -> Result<()> {
        Err(ZayaError::Input(
            "the balancing-bias rule changes the base model; a LoRA run keeps the base frozen (use --balance-bias-lr 0)".into(),
        ))
    }

    fn before_micro_batch(&mut self, step: u64, micro: u64) -> Result<()> {
        self.set_dropout_key(step, micro)
    }

    fn save_weights(&self, dir: &Path) -> Result<()> {
        self.save(dir)
    }

    fn device(&self) -> &Device {
        self.base.device()
    }

    fn forward_backward_objective(
        &self,
        batch: &Batch,
        opts: &TrainOptions,
        aux_weight: f64,
        temperature: f64,
        objective: &mut dyn FnMut(&TokenLogps) -> Result<Vec<f32>>,
    ) -> Result<BackwardOutput> {
        LoraModel::forward_backward_objective(self, batch, opts, aux_weight, temperature, objective)
    }

    fn token_logps(
        &self,
        batch: &Batch,
        opts: &TrainOptions,
        temperature: f64,
    ) -> Result<TokenLogps> {
        LoraModel::token_logps(self, batch, opts, temperature)
    }

    fn inference_view(&self) -> Result<ZayaModel> {
        LoraModel::inference_view(self)
    }

    /// The base with the adapters disabled: TRL's reference for a new PEFT adapter (the
    /// adapter starts at `B = 0`, so this is the starting policy, also after a resume).
    fn frozen_reference(&self) -> Option<ZayaModel> {
        Some(self.base.clone())
    }
}
