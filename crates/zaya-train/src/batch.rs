//! A batch of scored completions as TRL's `_compute_loss` receives it, its conversion to the
//! model's labelled batch (left-padded prompts, right-padded completions) and the GRPO
//! forward/backward on any [`Trainable`] (full fine-tuning or a LoRA adapter).

use std::collections::BTreeMap;

use candle_core::Tensor;
use serde::Deserialize;
use zaya::train::{Batch, Gradients, TokenLogps, TrainOptions, Trainable, IGNORE_INDEX};
use zaya::ZayaModel;

use crate::error::{GrpoError, Result};
use crate::loss::{policy_loss, Accumulation, LossConfig, LossInputs, LossOutput};

/// Completions of a group of prompts with everything the loss needs. `prompt_ids` are not
/// padded; completions (and every per-token row) are right-padded to one width `C`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpoInputs {
    pub prompt_ids: Vec<Vec<u32>>,
    pub completion_ids: Vec<Vec<u32>>,
    pub completion_mask: Vec<Vec<u32>>,
    /// 0 for tokens the loss skips although the model attends to them (tool results).
    #[serde(default)]
    pub tool_mask: Option<Vec<Vec<u32>>>,
    pub advantages: Vec<f32>,
    #[serde(default)]
    pub old_logps: Option<Vec<Vec<f32>>>,
    #[serde(default)]
    pub ref_logps: Option<Vec<Vec<f32>>>,
}

impl GrpoInputs {
    /// Parses and validates an input document (`zaya grpo-loss --inputs`).
    pub fn from_json(text: &str, vocab_size: usize) -> Result<Self> {
        let doc: GrpoInputs = serde_json::from_str(text)
            .map_err(|e| GrpoError::Input(format!("GRPO inputs: {e}")))?;
        doc.validate(vocab_size)?;
        Ok(doc)
    }

    pub fn rows(&self) -> usize {
        self.prompt_ids.len()
    }

    /// Completion width `C`.
    pub fn width(&self) -> usize {
        self.completion_ids.first().map_or(0, Vec::len)
    }

    /// Checks shapes, masks, ids and values; every error names the field and row.
    pub fn validate(&self, vocab_size: usize) -> Result<()> {
        let b = self.prompt_ids.len();
        let c = self.width();
        if b == 0 || c == 0 {
            return Err(GrpoError::Input(
                "GRPO inputs need at least one row and a completion width of at least 1".into(),
            ));
        }
        let rect = |name: &str, rows: usize, lens: &mut dyn Iterator<Item = usize>| {
            if rows != b {
                return Err(GrpoError::Input(format!(
                    "{name} has {rows} rows, prompt_ids has {b}"
                )));
            }
            for (r, len) in lens.enumerate() {
                if len != c {
                    return Err(GrpoError::Input(format!(
                        "{name} row {r} has {len} positions, completion_ids row 0 has {c}"
                    )));
                }
            }
            Ok(())
        };
        rect(
            "completion_ids",
            self.completion_ids.len(),
            &mut self.completion_ids.iter().map(Vec::len),
        )?;
        rect(
            "completion_mask",
            self.completion_mask.len(),
            &mut self.completion_mask.iter().map(Vec::len),
        )?;
        if let Some(t) = &self.tool_mask {
            rect("tool_mask", t.len(), &mut t.iter().map(Vec::len))?;
        }
        for (name, v) in [
            ("old_logps", &self.old_logps),
            ("ref_logps", &self.ref_logps),
        ] {
            if let Some(v) = v {
                rect(name, v.len(), &mut v.iter().map(Vec::len))?;
                for (r, row) in v.iter().enumerate() {
                    if let Some(t) = row.iter().position(|x| !x.is_finite() || *x > 0.0) {
                        return Err(GrpoError::Input(format!(
                            "{name} row {r} position {t}: {} is not a log-probability",
                            row[t]
                        )));
                    }
                }
            }
        }
        if self.advantages.len() != b {
            return Err(GrpoError::Input(format!(
                "advantages has {} values for {b} rows",
                self.advantages.len()
            )));
        }
        if let Some(r) = self.advantages.iter().position(|a| !a.is_finite()) {
            return Err(GrpoError::Input(format!(
                "advantages row {r} is {} (not finite)",
                self.advantages[r]
            )));
        }
        for (r, p) in self.prompt_ids.iter().enumerate() {
            if p.is_empty() {
                return Err(GrpoError::Input(format!("prompt_ids row {r} is empty")));
            }
            if let Some(&id) = p.iter().find(|&&id| id as usize >= vocab_size) {
                return Err(GrpoError::Input(format!(
                    "prompt_ids row {r}: token {id} is not below vocab_size {vocab_size}"
                )));
            }
        }
        for (r, (ids, m)) in self
            .completion_ids
            .iter()
            .zip(&self.completion_mask)
            .enumerate()
        {
            for (t, (&id, &mv)) in ids.iter().zip(m).enumerate() {
                if mv > 1 {
                    return Err(GrpoError::Input(format!(
                        "completion_mask row {r} position {t} is {mv} (0 or 1)"
                    )));
                }
                if mv == 1 && id as usize >= vocab_size {
                    return Err(GrpoError::Input(format!(
                        "completion_ids row {r} position {t}: token {id} is not below vocab_size {vocab_size}"
                    )));
                }
                if mv == 1 && t > 0 && m[t - 1] == 0 {
                    return Err(GrpoError::Input(format!(
                        "completion_mask row {r}: position {t} follows padding (completions are right-padded)"
                    )));
                }
            }
        }
        if let Some(tm) = &self.tool_mask {
            if let Some((r, t)) = tm
                .iter()
                .enumerate()
                .find_map(|(r, row)| row.iter().position(|&x| x > 1).map(|t| (r, t)))
            {
                return Err(GrpoError::Input(format!(
                    "tool_mask row {r} position {t} is not 0 or 1"
                )));
            }
        }
        Ok(())
    }

    /// `[B][C]` loss mask: completion mask × tool mask.
    pub fn loss_mask(&self) -> Vec<Vec<f32>> {
        self.completion_mask
            .iter()
            .enumerate()
            .map(|(r, m)| {
                m.iter()
                    .enumerate()
                    .map(|(t, &x)| {
                        let tool = self.tool_mask.as_ref().map_or(1, |tm| tm[r][t]);
                        (x * tool) as f32
                    })
                    .collect()
            })
            .collect()
    }

    /// Loss-mask tokens (`num_items_in_batch` for one generation batch).
    pub fn num_loss_tokens(&self) -> usize {
        self.loss_mask()
            .iter()
            .flatten()
            .filter(|&&x| x > 0.0)
            .count()
    }

    /// The labelled model batch: prompts left-padded with `pad_id` (attention 0), the
    /// completions after them; labels are the completion tokens where the completion mask
    /// is 1 (TRL scores every attended completion token and masks the loss afterwards).
    /// Also returns the `(row, completion position)` of each counted target, in target order.
    pub fn to_batch(&self, pad_id: u32) -> (Batch, Vec<(usize, usize)>) {
        let p = self.prompt_ids.iter().map(Vec::len).max().unwrap_or(0);
        let c = self.width();
        let mut batch = Batch {
            attention_mask: Some(Vec::new()),
            ..Default::default()
        };
        let mut positions = Vec::new();
        for (r, prompt) in self.prompt_ids.iter().enumerate() {
            let fill = p - prompt.len();
            let mut ids = vec![pad_id; fill];
            ids.extend(prompt);
            ids.extend(&self.completion_ids[r]);
            let mut mask = vec![0u32; fill];
            mask.extend(std::iter::repeat_n(1, prompt.len()));
            mask.extend(&self.completion_mask[r]);
            let mut labels = vec![IGNORE_INDEX; p];
            for (t, (&id, &m)) in self.completion_ids[r]
                .iter()
                .zip(&self.completion_mask[r])
                .enumerate()
            {
                if m == 1 {
                    labels.push(i64::from(id));
                    positions.push((r, t));
                } else {
                    labels.push(IGNORE_INDEX);
                }
            }
            debug_assert_eq!(ids.len(), p + c);
            batch.input_ids.push(ids);
            batch.labels.push(labels);
            if let Some(m) = batch.attention_mask.as_mut() {
                m.push(mask);
            }
        }
        (batch, positions)
    }

    fn loss_inputs(&self) -> LossInputs {
        LossInputs {
            mask: self.loss_mask(),
            advantages: self.advantages.clone(),
            old_logps: self.old_logps.clone(),
            ref_logps: self.ref_logps.clone(),
        }
    }
}

/// Scatters per-target values into a `[B][C]` grid (0 elsewhere, as TRL's masked outputs).
pub fn to_grid(values: &[f32], positions: &[(usize, usize)], b: usize, c: usize) -> Vec<Vec<f32>> {
    let mut grid = vec![vec![0f32; c]; b];
    for (&v, &(r, t)) in values.iter().zip(positions) {
        grid[r][t] = v;
    }
    grid
}

/// What one GRPO forward/backward produced.
#[derive(Debug, Clone)]
pub struct GrpoBackward {
    pub loss: LossOutput,
    /// `[B][C]` log-probabilities of the completion tokens (0 on padding).
    pub per_token_logps: Vec<Vec<f32>>,
    /// Masked mean entropy of the completion tokens.
    pub entropy: f64,
    /// Balance loss (unweighted), as in `zaya train`.
    pub aux_loss: f64,
    pub grads: Gradients,
    pub routing: Vec<zaya::train::LayerRoutingStats>,
}

fn masked_mean(grid: &[Vec<f32>], mask: &[Vec<f32>]) -> f64 {
    let (mut s, mut n) = (0f64, 0f64);
    for (g, m) in grid.iter().zip(mask) {
        for (&x, &w) in g.iter().zip(m) {
            s += f64::from(x) * f64::from(w);
            n += f64::from(w);
        }
    }
    s / n.max(1.0)
}

fn pad_id(cfg: &zaya::ZayaConfig) -> u32 {
    cfg.pad_token_id.unwrap_or(0)
}

/// The GRPO loss of `inputs` and the gradient of every trained parameter (every weight, or
/// the adapter factors) plus `aux_weight · aux_loss_coef ·` the router balance loss when
/// `opts.aux_loss_coef > 0`.
pub fn grpo_backward<M: Trainable>(
    model: &M,
    inputs: &GrpoInputs,
    cfg: &LossConfig,
    acc: &Accumulation,
    opts: &TrainOptions,
    aux_weight: f64,
) -> Result<GrpoBackward> {
    inputs.validate(model.config().vocab_size)?;
    let (batch, positions) = inputs.to_batch(pad_id(model.config()));
    let (b, c) = (inputs.rows(), inputs.width());
    let li = inputs.loss_inputs();
    let mut seen: Option<(LossOutput, Vec<Vec<f32>>, f64)> = None;
    let mut objective = |lp: &TokenLogps| -> zaya::Result<Vec<f32>> {
        let grid = to_grid(&lp.logps, &positions, b, c);
        let ent = to_grid(&lp.entropies, &positions, b, c);
        let out =
            policy_loss(cfg, acc, &grid, &li).map_err(|e| zaya::ZayaError::Input(e.to_string()))?;
        let w = positions.iter().map(|&(r, t)| out.grad[r][t]).collect();
        seen = Some((out, grid, masked_mean(&ent, &li.mask)));
        Ok(w)
    };
    let out = model.forward_backward_objective(
        &batch,
        opts,
        aux_weight,
        cfg.temperature,
        &mut objective,
    )?;
    let (loss, per_token_logps, entropy) =
        seen.ok_or_else(|| GrpoError::Input("the batch has no completion token to score".into()))?;
    Ok(GrpoBackward {
        loss,
        per_token_logps,
        entropy,
        aux_loss: out.aux_loss,
        grads: out.grads,
        routing: out.routing,
    })
}

/// A `[B][C]` grid of per-token values.
pub type Grid = Vec<Vec<f32>>;

/// `[B][C]` completion log-probabilities (and entropies) under the trained model's current
/// weights, without gradients.
pub fn completion_logps<M: Trainable>(
    model: &M,
    inputs: &GrpoInputs,
    opts: &TrainOptions,
    temperature: f64,
) -> Result<(Grid, Grid)> {
    grid_logps(model.config(), inputs, |batch| {
        model.token_logps(batch, opts, temperature)
    })
}

/// [`completion_logps`] under a frozen model (GRPO's reference policy).
pub fn reference_logps(
    model: &ZayaModel,
    inputs: &GrpoInputs,
    opts: &TrainOptions,
    temperature: f64,
) -> Result<(Grid, Grid)> {
    grid_logps(model.config(), inputs, |batch| {
        zaya::train::token_logps_of(model, batch, opts, temperature)
    })
}

fn grid_logps(
    cfg: &zaya::ZayaConfig,
    inputs: &GrpoInputs,
    logps: impl FnOnce(&Batch) -> zaya::Result<TokenLogps>,
) -> Result<(Grid, Grid)> {
    let (batch, positions) = inputs.to_batch(pad_id(cfg));
    let (b, c) = (inputs.rows(), inputs.width());
    if positions.is_empty() {
        return Ok((vec![vec![0.0; c]; b], vec![vec![0.0; c]; b]));
    }
    let lp = logps(&batch)?;
    Ok((
        to_grid(&lp.logps, &positions, b, c),
        to_grid(&lp.entropies, &positions, b, c),
    ))
}

/// `zaya grpo-loss`: `loss`, `per_token_logps` `[B, C]` and, with `grads`, `grad.<name>`
/// for every trained parameter (HF names; PEFT keys for a LoRA adapter) — TRL's policy loss
/// for one batch (one micro-batch = the whole generation batch; no router balance term).
pub fn grpo_loss_outputs<M: Trainable>(
    model: &M,
    inputs: &GrpoInputs,
    cfg: &LossConfig,
    grads: bool,
) -> Result<BTreeMap<String, Tensor>> {
    inputs.validate(model.config().vocab_size)?;
    let acc = Accumulation {
        grad_accum: 1,
        steps_per_generation: 1,
        num_items_in_batch: inputs.num_loss_tokens() as f64,
    };
    let opts = TrainOptions {
        aux_loss_coef: 0.0,
        ..TrainOptions::for_config(model.config())
    };
    let dev = model.device();
    let (b, c) = (inputs.rows(), inputs.width());
    let mut out = BTreeMap::new();
    let (loss, logps) = if grads {
        let r = grpo_backward(model, inputs, cfg, &acc, &opts, 0.0)?;
        for (name, g) in r.grads.named(model.params()) {
            out.insert(format!("grad.{name}"), g);
        }
        (r.loss.loss, r.per_token_logps)
    } else {
        let (logps, _) = completion_logps(model, inputs, &opts, cfg.temperature)?;
        let l = policy_loss(cfg, &acc, &logps, &inputs.loss_inputs())?;
        (l.loss, logps)
    };
    out.insert("loss".into(), Tensor::new(&[loss as f32], dev)?);
    let flat: Vec<f32> = logps.into_iter().flatten().collect();
    out.insert(
        "per_token_logps".into(),
        Tensor::from_vec(flat, (b, c), dev)?,
    );
    Ok(out)
}
