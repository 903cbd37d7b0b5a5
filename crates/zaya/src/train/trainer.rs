//! The training loop: gradient accumulation over micro-batches, clipping, the schedule,
//! AdamW, the bias-balancing rule, a CSV log and checkpoints that resume exactly.
//!
//! A checkpoint is a directory `step-NNNNNNNN/` under a root, holding the model (native
//! f32 `model.safetensors` + `config.json`, balancing biases included), the optimizer state
//! (`optimizer.safetensors`) and `trainer_state.json` (step count and trainer settings). It is
//! written under a temporary name and renamed into place, then the root's `latest` file is
//! replaced atomically: a crash leaves the previous checkpoint intact and `latest` valid.
//! Training has no randomness (no dropout, deterministic kernels), so restoring these files
//! reproduces the uninterrupted run bit for bit.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::optim::{clip_to_norm, AdamW, AdamWConfig};
use super::schedule::CosineSchedule;
use super::{
    Batch, Checkpointing, Gradients, LayerRoutingStats, LossScale, TrainOptions, Trainable,
    TrainableModel,
};
use crate::attention::AttnImplementation;
use crate::error::{Result, ZayaError};
use crate::weights::write_atomic;

/// Settings of a training run (saved with every checkpoint).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerConfig {
    pub schedule: CosineSchedule,
    pub adamw: AdamWConfig,
    /// Clip the global gradient norm to this value (`None` = no clipping; the norm is
    /// still reported).
    pub max_grad_norm: Option<f64>,
    pub checkpointing: Checkpointing,
    /// Weight of the router balance loss (0 = off).
    pub aux_loss_coef: f64,
    pub loss_chunk: usize,
    /// Step of the bias-balancing rule (0 = off).
    pub balance_bias_lr: f64,
    /// Attention backend of the training forward (checkpoints written before this field
    /// existed load with the default).
    #[serde(default)]
    pub attn: AttnImplementation,
    /// Update each parameter as soon as the backward pass has its gradient (PyTorch's
    /// optimizer-in-backward): the model's gradients are never alive together (the f32
    /// medium model's step: peak RSS −3 GB). Needs no clipping and one micro-batch per step
    /// (both need every gradient before the first update); the gradient norm is still
    /// reported. A non-finite gradient stops the step with an error, but the parameters
    /// updated before it in that pass keep their update.
    #[serde(default)]
    pub optimizer_in_backward: bool,
}

impl TrainerConfig {
    /// Defaults for `model`: constant `lr`, torch AdamW settings, clipping at 1.0, the
    /// config's `router_aux_loss_coef`, no bias balancing.
    pub fn new<M: Trainable>(model: &M, lr: f64) -> Self {
        Self::for_config(model.config(), lr)
    }

    /// [`TrainerConfig::new`] from the model's configuration alone (a parallel rank holds
    /// no whole model).
    pub fn for_config(cfg: &crate::ZayaConfig, lr: f64) -> Self {
        let opts = TrainOptions::for_config(cfg);
        TrainerConfig {
            schedule: CosineSchedule::constant(lr),
            adamw: AdamWConfig::default(),
            max_grad_norm: Some(1.0),
            checkpointing: opts.checkpointing,
            aux_loss_coef: opts.aux_loss_coef,
            loss_chunk: opts.loss_chunk,
            balance_bias_lr: 0.0,
            attn: opts.attn,
            optimizer_in_backward: false,
        }
    }

    pub fn train_options(&self) -> TrainOptions {
        TrainOptions {
            checkpointing: self.checkpointing,
            aux_loss_coef: self.aux_loss_coef,
            loss_chunk: self.loss_chunk,
            attn: self.attn,
        }
    }

    pub fn validate(&self) -> Result<()> {
        self.schedule.validate()?;
        self.adamw.validate()?;
        self.train_options().validate()?;
        if let Some(n) = self.max_grad_norm {
            if !(n > 0.0 && n.is_finite()) {
                return Err(ZayaError::Input(format!(
                    "max_grad_norm must be positive, got {n}"
                )));
            }
        }
        if self.optimizer_in_backward && self.max_grad_norm.is_some() {
            return Err(ZayaError::Input(
                "optimizer_in_backward needs max_grad_norm off: clipping needs every gradient \
                 before the first update"
                    .into(),
            ));
        }
        if !(self.balance_bias_lr >= 0.0 && self.balance_bias_lr.is_finite()) {
            return Err(ZayaError::Input(format!(
                "balance_bias_lr must be finite and >= 0, got {}",
                self.balance_bias_lr
            )));
        }
        Ok(())
    }
}

/// What one optimizer step did.
#[derive(Debug, Clone)]
pub struct StepReport {
    /// Steps taken after this one.
    pub step: u64,
    pub lr: f64,
    /// Cross-entropy, mean over the counted targets of all micro-batches.
    pub loss: f64,
    /// Balance loss (mean over layers and micro-batches), before the coefficient.
    pub aux_loss: f64,
    /// `loss + aux_loss_coef · aux_loss`: the objective that was differentiated.
    pub total_loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub targets: usize,
    /// Per layer routing counts over the step's real tokens.
    pub routing: Vec<LayerRoutingStats>,
    /// Skip share averaged over layers.
    pub skip_fraction: f64,
    pub seconds: f64,
}

/// `trainer_state.json` of a checkpoint: the step counter, the settings and the run facts
/// (the data position follows from the step).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    pub step: u64,
    pub config: TrainerConfig,
    /// What the caller says defines the run (data, row shape, ...), checked on resume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<serde_json::Value>,
}

impl TrainerState {
    /// Reads `dir/trainer_state.json` and validates its settings.
    pub fn read(dir: &Path) -> Result<Self> {
        let state_path = dir.join("trainer_state.json");
        let text =
            std::fs::read_to_string(&state_path).map_err(|e| ZayaError::io(&state_path, e))?;
        let state: TrainerState =
            serde_json::from_str(&text).map_err(|source| ZayaError::Json {
                path: state_path.clone(),
                source,
            })?;
        state.config.validate()?;
        Ok(state)
    }
}

const CSV_HEADER: &str = "step,lr,loss,aux_loss,total_loss,grad_norm,skip_fraction,targets,seconds";

pub struct Trainer<M: Trainable = TrainableModel> {
    model: M,
    opt: AdamW,
    cfg: TrainerConfig,
    step: u64,
    log: Option<PathBuf>,
    run: Option<serde_json::Value>,
}

impl<M: Trainable> std::fmt::Debug for Trainer<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("step", &self.step)
            .field("config", &self.cfg)
            .finish()
    }
}

fn checkpoint_name(step: u64) -> String {
    format!("step-{step:08}")
}

impl<M: Trainable> Trainer<M> {
    pub fn new(model: M, cfg: TrainerConfig) -> Result<Self> {
        cfg.validate()?;
        let opt = AdamW::new(model.params(), cfg.adamw)?;
        Ok(Trainer {
            model,
            opt,
            cfg,
            step: 0,
            log: None,
            run: None,
        })
    }

    /// Appends one CSV line per step to `path` (header written when the file is new).
    pub fn with_log(mut self, path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        start_log(&path)?;
        self.log = Some(path);
        Ok(self)
    }

    /// Records what defines the run for the caller (saved with every checkpoint, so a
    /// resume can refuse data or shapes that differ from the checkpoint's).
    pub fn with_run_facts(mut self, facts: serde_json::Value) -> Self {
        self.run = Some(facts);
        self
    }

    /// The facts saved by [`Trainer::with_run_facts`] (None for an older checkpoint).
    pub fn run_facts(&self) -> Option<&serde_json::Value> {
        self.run.as_ref()
    }

    /// Replaces the settings (e.g. a new learning rate or length on resume); they apply
    /// from the next step. The optimizer keeps its moments.
    pub fn set_config(&mut self, cfg: TrainerConfig) -> Result<()> {
        cfg.validate()?;
        self.opt.set_config(cfg.adamw)?;
        self.cfg = cfg;
        Ok(())
    }

    pub fn model(&self) -> &M {
        &self.model
    }
    pub fn config(&self) -> &TrainerConfig {
        &self.cfg
    }
    /// Optimizer steps taken.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// One optimizer step over `micro_batches` (gradient accumulation): the token losses of
    /// all micro-batches are averaged together (each micro-batch's NLL sum is divided by the
    /// step's total target count), the balance loss is averaged over micro-batches.
    pub fn step(&mut self, micro_batches: &[Batch]) -> Result<StepReport> {
        let start = Instant::now();
        if micro_batches.is_empty() {
            return Err(ZayaError::Input("a step needs at least one batch".into()));
        }
        let total: usize = micro_batches.iter().map(Batch::num_targets).sum();
        if total == 0 {
            return Err(ZayaError::Input(
                "no counted label in the step's batches (every target is -100)".into(),
            ));
        }
        let opts = self.cfg.train_options();
        let scale = LossScale {
            normalizer: Some(total as f64),
            aux_weight: 1.0 / micro_batches.len() as f64,
        };
        if self.cfg.optimizer_in_backward {
            return self.step_in_backward(micro_batches, &opts, &scale, start);
        }
        let mut grads = Gradients::default();
        let mut routing: Vec<LayerRoutingStats> = Vec::new();
        let (mut loss, mut aux) = (0.0, 0.0);
        for (k, mb) in micro_batches.iter().enumerate() {
            self.model.before_micro_batch(self.step, k as u64)?;
            let out = self.model.forward_backward(mb, &opts, &scale)?;
            grads.accumulate(&out.grads)?;
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
        let (lr, grad_norm) = self.update(grads, loss)?;
        self.finish_step(loss, aux, routing, lr, grad_norm, total, start)
    }

    /// [`Trainer::step`] with the optimizer in the backward pass
    /// ([`TrainerConfig::optimizer_in_backward`]).
    fn step_in_backward(
        &mut self,
        micro_batches: &[Batch],
        opts: &TrainOptions,
        scale: &LossScale,
        start: Instant,
    ) -> Result<StepReport> {
        let [batch] = micro_batches else {
            return Err(ZayaError::Input(format!(
                "optimizer_in_backward takes one micro-batch per step, got {} (gradient \
                 accumulation needs every gradient before the first update)",
                micro_batches.len()
            )));
        };
        self.model.before_micro_batch(self.step, 0)?;
        let lr = self.cfg.schedule.lr(self.step);
        let step = self.step + 1;
        let mut sum_sq = 0f64;
        let (model, opt) = (&self.model, &mut self.opt);
        let params = model.params();
        let out = model.forward_backward_into(batch, opts, scale, &mut |i, g| {
            let sq = super::squared_norm(&g)?;
            if !sq.is_finite() {
                return Err(ZayaError::Input(format!(
                    "step {step}: the gradient of {} is not finite: update stopped (the \
                     parameters updated before it in this backward pass keep their update)",
                    params[i].name
                )));
            }
            sum_sq += sq;
            opt.step_param(i, &params[i], &g, lr)
        })?;
        self.step += 1;
        let total = batch.num_targets();
        let aux = out.aux_loss * scale.aux_weight;
        self.finish_step(out.loss, aux, out.routing, lr, sum_sq.sqrt(), total, start)
    }

    /// The bias-balancing rule, the report and its log line, after the update.
    #[allow(clippy::too_many_arguments)]
    fn finish_step(
        &mut self,
        loss: f64,
        aux: f64,
        routing: Vec<LayerRoutingStats>,
        lr: f64,
        grad_norm: f64,
        total: usize,
        start: Instant,
    ) -> Result<StepReport> {
        if self.cfg.balance_bias_lr > 0.0 {
            self.model
                .apply_bias_balancing(&routing, self.cfg.balance_bias_lr)?;
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
            grad_norm,
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

    /// Prepares the model for micro-batch `micro` of the next step, as [`Trainer::step`]
    /// does before each forward (LoRA draws its dropout masks from `(step, micro)`): for
    /// callers that run their own backward passes and then call [`Trainer::update`].
    pub fn before_micro_batch(&mut self, micro: u64) -> Result<()> {
        self.model.before_micro_batch(self.step, micro)
    }

    /// Clipping, the schedule's learning rate and AdamW for gradients computed elsewhere
    /// (a policy-gradient objective, for instance); `loss` is only checked to be finite.
    /// Counts the step. Returns `(lr, gradient norm before clipping)`.
    pub fn update(&mut self, mut grads: Gradients, loss: f64) -> Result<(f64, f64)> {
        let grad_norm = self.model.grad_norm(&grads)?;
        if let Some(max) = self.cfg.max_grad_norm {
            clip_to_norm(&mut grads, grad_norm, max)?;
        }
        // Never apply a NaN/inf update: the weights stay as they were and the caller sees why.
        if !grad_norm.is_finite() || !loss.is_finite() {
            return Err(ZayaError::Input(format!(
                "step {}: loss {loss}, gradient norm {grad_norm}: not finite, update skipped",
                self.step + 1
            )));
        }
        let lr = self.cfg.schedule.lr(self.step);
        self.opt.step(self.model.params(), &grads, lr)?;
        self.step += 1;
        Ok((lr, grad_norm))
    }

    /// Writes `root/step-NNNNNNNN/` (model, optimizer, trainer state) and points
    /// `root/latest` at it. Returns the checkpoint directory.
    ///
    /// Every file is fsynced before its rename and the directories after, so a power loss
    /// cannot leave `latest` naming a checkpoint whose files are empty; temporaries of an
    /// interrupted save are removed first.
    pub fn save(&self, root: &Path) -> Result<PathBuf> {
        write_checkpoint(
            root,
            &self.model,
            &self.opt,
            &self.cfg,
            self.step,
            self.run.as_ref(),
        )
    }

    /// The optimizer (its state is what `optimizer.safetensors` holds).
    pub fn optimizer(&self) -> &AdamW {
        &self.opt
    }

    /// Takes the trainer apart (a parallel driver shards the model and the optimizer).
    pub fn into_parts(self) -> TrainerParts<M> {
        TrainerParts {
            model: self.model,
            opt: self.opt,
            cfg: self.cfg,
            step: self.step,
            run: self.run,
        }
    }

    /// The checkpoint a resume of `root` starts from: the one `root/latest` names; without
    /// `latest`, the newest complete `step-*` directory (a save interrupted before `latest`
    /// was written, or `latest` deleted). `None` when `root` has no checkpoint at all. A
    /// `latest` naming a missing or incomplete checkpoint is an error, not a silent restart.
    pub fn find_checkpoint_of(root: &Path) -> Result<Option<PathBuf>> {
        let latest = root.join("latest");
        if latest.exists() {
            let name = std::fs::read_to_string(&latest).map_err(|e| ZayaError::io(&latest, e))?;
            let dir = root.join(name.trim());
            if !is_complete_checkpoint::<M>(&dir) {
                return Err(ZayaError::Input(format!(
                    "{} names `{}`, which is not a complete checkpoint (trainer_state.json, model.safetensors, optimizer.safetensors); remove `latest` to resume from the newest complete one",
                    latest.display(),
                    name.trim()
                )));
            }
            return Ok(Some(dir));
        }
        let entries = match std::fs::read_dir(root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(ZayaError::io(root, e)),
        };
        let mut best: Option<(u64, PathBuf)> = None;
        for entry in entries {
            let entry = entry.map_err(|e| ZayaError::io(root, e))?;
            let name = entry.file_name();
            let Some(step) = name
                .to_str()
                .and_then(|n| n.strip_prefix("step-"))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            let path = entry.path();
            if is_complete_checkpoint::<M>(&path) && best.as_ref().is_none_or(|(s, _)| step > *s) {
                best = Some((step, path));
            }
        }
        Ok(best.map(|(_, p)| p))
    }

    /// Resumes from the checkpoint `root/latest` points at, the newest complete one when
    /// `latest` is missing (see [`Trainer::find_checkpoint`]), or from `root` itself when it
    /// is a checkpoint directory.
    pub fn resume_with(root: &Path, load: impl FnOnce(&Path) -> Result<M>) -> Result<Self> {
        let dir = if is_complete_checkpoint::<M>(root) {
            root.to_path_buf()
        } else {
            Self::find_checkpoint_of(root)?.ok_or_else(|| {
                ZayaError::Input(format!("{}: no checkpoint to resume from", root.display()))
            })?
        };
        let state = TrainerState::read(&dir)?;
        let model = load(&dir)?;
        let opt = AdamW::load(
            model.params(),
            &dir.join("optimizer.safetensors"),
            state.config.adamw,
        )?;
        Ok(Trainer {
            model,
            opt,
            cfg: state.config,
            step: state.step,
            log: None,
            run: state.run,
        })
    }
}

/// What a [`Trainer`] is made of (see [`Trainer::into_parts`]).
pub struct TrainerParts<M> {
    pub model: M,
    pub opt: AdamW,
    pub cfg: TrainerConfig,
    /// Optimizer steps taken.
    pub step: u64,
    /// The run facts saved with every checkpoint.
    pub run: Option<serde_json::Value>,
}

/// Creates the CSV loss log with its header unless it exists.
pub fn start_log(path: &Path) -> Result<()> {
    if !path.exists() {
        write_atomic(path, format!("{CSV_HEADER}\n").as_bytes())?;
    }
    Ok(())
}

/// Appends the row of one step to a loss log made by [`start_log`].
pub fn append_log(path: &Path, report: &StepReport) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(|e| ZayaError::io(path, e))?;
    writeln!(
        f,
        "{},{:e},{},{},{},{},{},{},{:.3}",
        report.step,
        report.lr,
        report.loss,
        report.aux_loss,
        report.total_loss,
        report.grad_norm,
        report.skip_fraction,
        report.targets,
        report.seconds
    )
    .map_err(|e| ZayaError::io(path, e))
}

/// Writes `root/step-NNNNNNNN/` (model, optimizer, trainer state) and points `root/latest`
/// at it (see [`Trainer::save`]); a parallel run writes the gathered full tensors with it,
/// so its checkpoints are the single-process ones.
pub fn write_checkpoint<M: Trainable>(
    root: &Path,
    model: &M,
    opt: &AdamW,
    cfg: &TrainerConfig,
    step: u64,
    run: Option<&serde_json::Value>,
) -> Result<PathBuf> {
    write_checkpoint_with(root, cfg, step, run, |tmp| {
        model.save_weights(tmp)?;
        opt.save(model.params(), &tmp.join("optimizer.safetensors"))
    })
}

/// [`write_checkpoint`] where `write(dir)` writes the weights and `optimizer.safetensors`
/// into the (temporary) checkpoint directory: a sharded run writes the tensors it gathered
/// without building a model or an optimizer around them.
pub fn write_checkpoint_with(
    root: &Path,
    cfg: &TrainerConfig,
    step: u64,
    run: Option<&serde_json::Value>,
    write: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    std::fs::create_dir_all(root).map_err(|e| ZayaError::io(root, e))?;
    crate::durable::remove_stale_temps(root)?;
    let name = checkpoint_name(step);
    let tmp = root.join(format!(".tmp-{name}"));
    write(&tmp)?;
    let state = TrainerState {
        step,
        config: cfg.clone(),
        run: run.cloned(),
    };
    let text = serde_json::to_string_pretty(&state)
        .map_err(|e| ZayaError::Input(format!("trainer state does not serialise: {e}")))?;
    write_atomic(&tmp.join("trainer_state.json"), text.as_bytes())?;
    let dir = root.join(&name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| ZayaError::io(&dir, e))?;
    }
    crate::durable::rename_synced(&tmp, &dir)?;
    write_atomic(&root.join("latest"), name.as_bytes())?;
    Ok(dir)
}

impl Trainer {
    /// The checkpoint a resume of `root` starts from (see [`Trainer::find_checkpoint_of`]).
    pub fn find_checkpoint(root: &Path) -> Result<Option<PathBuf>> {
        Self::find_checkpoint_of(root)
    }

    /// Resumes a full fine-tuning run (see [`Trainer::resume_with`]).
    pub fn resume(root: &Path) -> Result<Self> {
        Self::resume_with(root, |dir| TrainableModel::load(dir))
    }
}

/// A checkpoint directory with all three parts written (the rename into place makes them
/// appear together; this also rejects directories damaged by hand).
fn is_complete_checkpoint<M: Trainable>(dir: &Path) -> bool {
    ["trainer_state.json", "optimizer.safetensors"]
        .iter()
        .chain(M::CHECKPOINT_FILES)
        .all(|f| dir.join(f).is_file())
}

/// Keeps the header and the rows of steps `<= step` of a loss log written by
/// [`Trainer::with_log`] (rows of steps re-run after a resume would be duplicates).
/// Returns how many rows were removed. A missing file is left missing.
pub fn trim_log(path: &Path, step: u64) -> Result<usize> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(ZayaError::io(path, e)),
    };
    let mut kept = String::with_capacity(text.len());
    let mut removed = 0;
    for (i, line) in text.lines().enumerate() {
        let row_step = line.split(',').next().and_then(|f| f.parse::<u64>().ok());
        // the header (first line) stays; a row stays if its step is within the checkpoint;
        // a torn last line of a killed run (no parsable step) goes
        let keep = i == 0 || row_step.is_some_and(|s| s <= step);
        if keep {
            kept.push_str(line);
            kept.push('\n');
        } else {
            removed += 1;
        }
    }
    if removed > 0 {
        write_atomic(path, kept.as_bytes())?;
    }
    Ok(removed)
}
