//! The GRPO policy loss exactly as TRL 1.16 `GRPOTrainer._compute_loss` computes it, as a
//! function of the per-token log-probabilities.
//!
//! [`policy_loss`] builds TRL's expression with candle ops on a `[B, C]` leaf of the
//! completion log-probabilities (same operations, same order, f32 like torch), and its
//! backward gives `dL / dlogp` per token. The model is then differentiated through
//! `Σ (dL/dlogp) · logp` by [`zaya::train::Trainable::forward_backward_objective`]: by
//! the chain rule that is exactly the gradient of the loss, and the trainer needs no
//! GRPO-specific code.

use candle_core::{DType, Device, Tensor, Var, D};
use serde::{Deserialize, Serialize};

use crate::error::{GrpoError, Result};

/// `loss_type` of `GRPOConfig` (how per-token losses are aggregated; `cispo` and `sapo` also
/// change the per-token loss).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossType {
    Grpo,
    Dapo,
    DrGrpo,
    Bnpo,
    Cispo,
    Sapo,
    Luspo,
}

impl LossType {
    pub const ALL: [LossType; 7] = [
        LossType::Grpo,
        LossType::Dapo,
        LossType::DrGrpo,
        LossType::Bnpo,
        LossType::Cispo,
        LossType::Sapo,
        LossType::Luspo,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            LossType::Grpo => "grpo",
            LossType::Dapo => "dapo",
            LossType::DrGrpo => "dr_grpo",
            LossType::Bnpo => "bnpo",
            LossType::Cispo => "cispo",
            LossType::Sapo => "sapo",
            LossType::Luspo => "luspo",
        }
    }
}

impl std::str::FromStr for LossType {
    type Err = GrpoError;
    fn from_str(s: &str) -> Result<Self> {
        LossType::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| {
                GrpoError::Input(format!(
                    "unknown loss type `{s}` (one of dapo, grpo, dr_grpo, bnpo, cispo, sapo, luspo)"
                ))
            })
    }
}

/// `importance_sampling_level` of `GRPOConfig`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImportanceSampling {
    Token,
    Sequence,
}

impl std::str::FromStr for ImportanceSampling {
    type Err = GrpoError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "token" => Ok(ImportanceSampling::Token),
            "sequence" => Ok(ImportanceSampling::Sequence),
            _ => Err(GrpoError::Input(format!(
                "unknown importance sampling level `{s}` (token or sequence)"
            ))),
        }
    }
}

/// The loss settings of `GRPOConfig`, with its defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LossConfig {
    pub loss_type: LossType,
    /// KL coefficient (0: no reference model).
    pub beta: f64,
    /// Lower clipping range (`epsilon`).
    pub epsilon_low: f64,
    /// Upper clipping range (`epsilon_high`; TRL's default is `epsilon`). For `cispo` it is
    /// the cap of the ratio.
    pub epsilon_high: f64,
    pub importance_sampling: ImportanceSampling,
    /// Two-sided clipping cap of the ratio (`delta`; `None` = off).
    pub delta: Option<f64>,
    pub sapo_temperature_pos: f64,
    pub sapo_temperature_neg: f64,
    /// Multiply the per-token KL by the importance ratio (`use_bias_correction_kl`).
    pub use_bias_correction_kl: bool,
    /// `dr_grpo`'s divisor (`max_completion_length`).
    pub max_completion_length: usize,
    /// Temperature the logits are divided by before the log-softmax.
    pub temperature: f64,
}

impl Default for LossConfig {
    fn default() -> Self {
        LossConfig {
            loss_type: LossType::Dapo,
            beta: 0.0,
            epsilon_low: 0.2,
            epsilon_high: 0.2,
            importance_sampling: ImportanceSampling::Token,
            delta: None,
            sapo_temperature_pos: 1.0,
            sapo_temperature_neg: 1.05,
            use_bias_correction_kl: true,
            max_completion_length: 512,
            temperature: 1.0,
        }
    }
}

impl LossConfig {
    pub fn validate(&self) -> Result<()> {
        let finite = |name: &str, v: f64, ok: bool| {
            if v.is_finite() && ok {
                Ok(())
            } else {
                Err(GrpoError::Input(format!("{name} = {v} is out of range")))
            }
        };
        finite("beta", self.beta, self.beta >= 0.0)?;
        finite("epsilon", self.epsilon_low, self.epsilon_low >= 0.0)?;
        finite("epsilon_high", self.epsilon_high, self.epsilon_high >= 0.0)?;
        finite("temperature", self.temperature, self.temperature > 0.0)?;
        finite(
            "sapo_temperature_pos",
            self.sapo_temperature_pos,
            self.sapo_temperature_pos > 0.0,
        )?;
        finite(
            "sapo_temperature_neg",
            self.sapo_temperature_neg,
            self.sapo_temperature_neg > 0.0,
        )?;
        if let Some(d) = self.delta {
            finite("delta", d, d > 0.0)?;
        }
        if self.max_completion_length == 0 {
            return Err(GrpoError::Input(
                "max_completion_length must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

/// What one micro-batch's loss is divided by (TRL's accumulation bookkeeping).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Accumulation {
    /// `current_gradient_accumulation_steps`.
    pub grad_accum: usize,
    /// `steps_per_generation`.
    pub steps_per_generation: usize,
    /// Loss-mask tokens of the whole generation batch (`num_items_in_batch`; `dapo` and
    /// `cispo` divide by it).
    pub num_items_in_batch: f64,
}

/// The per-row inputs of the loss (completion positions only, right-padded to `C`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LossInputs {
    /// `[B][C]`, 1 where the loss counts the token (completion mask × tool mask).
    pub mask: Vec<Vec<f32>>,
    pub advantages: Vec<f32>,
    /// `[B][C]` log-probabilities of the policy that sampled (None: on-policy, ratio 1).
    pub old_logps: Option<Vec<Vec<f32>>>,
    /// `[B][C]` reference-model log-probabilities (needed when `beta > 0`).
    pub ref_logps: Option<Vec<Vec<f32>>>,
}

/// Value, per-token gradient and TRL's logged metrics of one evaluation of the loss.
#[derive(Debug, Clone, PartialEq)]
pub struct LossOutput {
    pub loss: f64,
    /// `dL / dlogp`, `[B][C]`.
    pub grad: Vec<Vec<f32>>,
    /// Masked mean of the per-token KL (beta > 0).
    pub kl: Option<f64>,
    pub clip_low: f64,
    pub clip_high: f64,
    pub clip_region: f64,
}

fn tensor2(rows: &[Vec<f32>], c: usize, name: &str, dev: &Device) -> Result<Tensor> {
    if let Some((r, row)) = rows.iter().enumerate().find(|(_, r)| r.len() != c) {
        return Err(GrpoError::Input(format!(
            "{name} row {r} has {} values, the completions are {c} wide",
            row.len()
        )));
    }
    let flat: Vec<f32> = rows.iter().flatten().copied().collect();
    Ok(Tensor::from_vec(flat, (rows.len(), c), dev)?)
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(f64::from(t.to_dtype(DType::F32)?.to_scalar::<f32>()?))
}

/// TRL's `_compute_loss` on the completion log-probabilities `logps` (`[B][C]`, 0 where the
/// completion is padding). Returns the loss that TRL backpropagates and its gradient with
/// respect to every log-probability.
pub fn policy_loss(
    cfg: &LossConfig,
    acc: &Accumulation,
    logps: &[Vec<f32>],
    inputs: &LossInputs,
) -> Result<LossOutput> {
    cfg.validate()?;
    let dev = Device::Cpu;
    let b = logps.len();
    let c = logps.first().map_or(0, Vec::len);
    if b == 0 || c == 0 {
        return Err(GrpoError::Input(
            "the loss needs at least one row with one completion position".into(),
        ));
    }
    if inputs.mask.len() != b || inputs.advantages.len() != b {
        return Err(GrpoError::Input(format!(
            "{b} rows of log-probabilities, {} mask rows, {} advantages",
            inputs.mask.len(),
            inputs.advantages.len()
        )));
    }
    if let Some(i) = inputs.advantages.iter().position(|a| !a.is_finite()) {
        return Err(GrpoError::Input(format!(
            "advantage of row {i} is {} (not finite)",
            inputs.advantages[i]
        )));
    }
    let logp_var = Var::from_tensor(&tensor2(logps, c, "logps", &dev)?)?;
    let logp = logp_var.as_tensor();
    let mask = tensor2(&inputs.mask, c, "mask", &dev)?;
    let adv = Tensor::from_vec(inputs.advantages.clone(), (b, 1), &dev)?;
    let old = match &inputs.old_logps {
        Some(o) => tensor2(o, c, "old_logps", &dev)?,
        None => logp.detach(),
    };

    let log_ratio = (logp - &old)?;
    let log_iw = match cfg.importance_sampling {
        ImportanceSampling::Token => log_ratio,
        ImportanceSampling::Sequence => {
            let num = (&log_ratio * &mask)?.sum_keepdim(D::Minus1)?;
            let den = mask.sum_keepdim(D::Minus1)?.clamp(1f32, f32::MAX)?;
            num.div(&den)?
        }
    };
    let coef_1 = log_iw.exp()?;

    let per_token_kl = if cfg.beta != 0.0 {
        let r = inputs.ref_logps.as_ref().ok_or_else(|| {
            GrpoError::Input("beta > 0 needs the reference log-probabilities (ref_logps)".into())
        })?;
        let r = tensor2(r, c, "ref_logps", &dev)?;
        let d = (r - logp)?;
        let kl = ((d.exp()? - d)? - 1.0)?;
        Some(if cfg.use_bias_correction_kl {
            kl.broadcast_mul(&coef_1)?
        } else {
            kl
        })
    } else {
        None
    };

    let eps_low = cfg.epsilon_low as f32;
    let eps_high = cfg.epsilon_high as f32;
    let mut per_token_loss = match cfg.loss_type {
        LossType::Cispo => {
            let clamped = coef_1.clamp(f32::MIN, eps_high)?.detach();
            clamped.broadcast_mul(&adv)?.broadcast_mul(logp)?.neg()?
        }
        LossType::Grpo | LossType::Bnpo | LossType::DrGrpo | LossType::Dapo | LossType::Luspo => {
            let coef_2 = coef_1.clamp(1.0 - eps_low, 1.0 + eps_high)?;
            let coef_1 = match cfg.delta {
                Some(d) => coef_1.clamp(f32::MIN, d as f32)?,
                None => coef_1.clone(),
            };
            let l1 = coef_1.broadcast_mul(&adv)?;
            let l2 = coef_2.broadcast_mul(&adv)?;
            l1.minimum(&l2)?.neg()?
        }
        LossType::Sapo => {
            let pos = adv.gt(0f32)?;
            let temps = pos.where_cond(
                &Tensor::full(cfg.sapo_temperature_pos as f32, (b, 1), &dev)?,
                &Tensor::full(cfg.sapo_temperature_neg as f32, (b, 1), &dev)?,
            )?;
            let x = temps.broadcast_mul(&(&coef_1 - 1.0)?)?;
            // sigmoid from differentiable ops
            let sig = (x.neg()?.exp()? + 1.0)?.recip()?;
            let soft = (sig * 4.0)?.broadcast_div(&temps)?;
            soft.broadcast_mul(&adv)?.neg()?
        }
    };
    if let Some(kl) = &per_token_kl {
        per_token_loss = per_token_loss.broadcast_add(&(kl * cfg.beta)?)?;
    }
    let masked = per_token_loss.broadcast_mul(&mask)?;
    let ga = acc.grad_accum.max(1) as f64;
    let loss = match cfg.loss_type {
        LossType::Grpo | LossType::Sapo => {
            let den = mask.sum(D::Minus1)?.clamp(1f32, f32::MAX)?;
            (masked.sum(D::Minus1)?.div(&den)?.mean_all()? / ga)?
        }
        LossType::Bnpo => {
            let den = mask.sum_all()?.clamp(1f32, f32::MAX)?;
            (masked.sum_all()?.div(&den)? / ga)?
        }
        LossType::DrGrpo => {
            (masked.sum_all()? / (b as f64 * cfg.max_completion_length as f64 * ga))?
        }
        LossType::Dapo | LossType::Cispo => {
            let normalizer =
                acc.num_items_in_batch.max(1.0) * ga / acc.steps_per_generation.max(1) as f64;
            (masked.sum_all()? / normalizer)?
        }
        LossType::Luspo => (masked.sum(D::Minus1)?.mean_all()? / ga)?,
    };
    let value = scalar(&loss)?;
    let grads = loss.backward()?;
    let grad = match grads.get(logp) {
        Some(g) => g.to_dtype(DType::F32)?.to_vec2::<f32>()?,
        None => vec![vec![0f32; c]; b],
    };

    // Metrics as TRL logs them (global masked means; a [B, 1] tensor counts per sequence).
    let global_masked_mean = |x: &Tensor| -> Result<f64> {
        if x.dim(1)? == 1 && c != 1 {
            Ok(scalar(&x.mean_all()?)?)
        } else {
            let m = mask.sum_all()?;
            Ok(scalar(&x.broadcast_mul(&mask)?.sum_all()?)? / scalar(&m)?.max(1.0))
        }
    };
    let kl = per_token_kl
        .as_ref()
        .map(|k| global_masked_mean(&k.detach()))
        .transpose()?;
    let coef = coef_1.detach();
    let adv_neg = adv.lt(0f32)?.to_dtype(DType::F32)?;
    let adv_pos = adv.gt(0f32)?.to_dtype(DType::F32)?;
    let (low, high) = match cfg.loss_type {
        LossType::Cispo => (
            coef.zeros_like()?,
            coef.gt(eps_high)?
                .to_dtype(DType::F32)?
                .broadcast_mul(&adv_pos)?,
        ),
        LossType::Sapo => (coef.zeros_like()?, coef.zeros_like()?),
        _ => (
            coef.lt(1.0 - eps_low)?
                .to_dtype(DType::F32)?
                .broadcast_mul(&adv_neg)?,
            coef.gt(1.0 + eps_high)?
                .to_dtype(DType::F32)?
                .broadcast_mul(&adv_pos)?,
        ),
    };
    let region = (&low + &high)?.clamp(0f32, 1f32)?;
    Ok(LossOutput {
        loss: value,
        grad,
        kl,
        clip_low: global_masked_mean(&low)?,
        clip_high: global_masked_mean(&high)?,
        clip_region: global_masked_mean(&region)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs() -> (Vec<Vec<f32>>, LossInputs) {
        let logps = vec![vec![-1.0, -2.0, -0.5], vec![-0.3, -1.2, 0.0]];
        let li = LossInputs {
            mask: vec![vec![1.0, 1.0, 1.0], vec![1.0, 1.0, 0.0]],
            advantages: vec![0.7, -0.7],
            old_logps: Some(vec![vec![-1.1, -1.7, -0.5], vec![-0.2, -1.5, 0.0]]),
            ref_logps: Some(vec![vec![-1.0, -1.9, -0.6], vec![-0.4, -1.0, 0.0]]),
        };
        (logps, li)
    }

    /// Central finite differences of the loss value against its reported gradient.
    #[test]
    fn gradient_matches_finite_differences_for_every_loss_type() {
        let (logps, li) = inputs();
        let acc = Accumulation {
            grad_accum: 1,
            steps_per_generation: 1,
            num_items_in_batch: 5.0,
        };
        for lt in LossType::ALL {
            for is in [ImportanceSampling::Token, ImportanceSampling::Sequence] {
                let cfg = LossConfig {
                    loss_type: lt,
                    beta: 0.1,
                    epsilon_low: 0.2,
                    epsilon_high: if lt == LossType::Cispo { 1.2 } else { 0.28 },
                    importance_sampling: is,
                    ..Default::default()
                };
                let out = policy_loss(&cfg, &acc, &logps, &li).unwrap();
                for r in 0..2 {
                    for t in 0..3 {
                        if li.mask[r][t] == 0.0 {
                            continue;
                        }
                        let h = 1e-2f32;
                        let mut p = logps.clone();
                        p[r][t] += h;
                        let up = policy_loss(&cfg, &acc, &p, &li).unwrap().loss;
                        p[r][t] -= 2.0 * h;
                        let down = policy_loss(&cfg, &acc, &p, &li).unwrap().loss;
                        let fd = (up - down) / (2.0 * h as f64);
                        let g = out.grad[r][t] as f64;
                        // cispo's ratio is detached: its gradient is not the derivative
                        // of the value (TRL's definition), so only the sign pattern is checked.
                        if lt == LossType::Cispo {
                            continue;
                        }
                        assert!(
                            (fd - g).abs() < 2e-3 * (1.0 + g.abs()),
                            "{lt:?} {is:?} [{r},{t}]: fd {fd} vs grad {g}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn on_policy_ratio_is_one_and_nothing_clips() {
        let (logps, mut li) = inputs();
        li.old_logps = None;
        li.ref_logps = None;
        let acc = Accumulation {
            grad_accum: 1,
            steps_per_generation: 1,
            num_items_in_batch: 5.0,
        };
        let out = policy_loss(&LossConfig::default(), &acc, &logps, &li).unwrap();
        // dapo: −Σ A·mask / N with ratio 1: (−0.7·3 + 0.7·2) / 5
        assert!((out.loss - (-0.7 * 3.0 + 0.7 * 2.0) / 5.0).abs() < 1e-6);
        assert_eq!(out.clip_region, 0.0);
        assert_eq!(out.grad[0][0], -0.7 / 5.0);
        assert_eq!(out.grad[1][2], 0.0);
    }

    #[test]
    fn bad_inputs_are_refused() {
        let (logps, li) = inputs();
        let acc = Accumulation {
            grad_accum: 1,
            steps_per_generation: 1,
            num_items_in_batch: 5.0,
        };
        let mut bad = li.clone();
        bad.ref_logps = None;
        let cfg = LossConfig {
            beta: 0.1,
            ..Default::default()
        };
        assert!(policy_loss(&cfg, &acc, &logps, &bad)
            .unwrap_err()
            .to_string()
            .contains("ref_logps"));
        let mut bad = li.clone();
        bad.mask[1].pop();
        assert!(policy_loss(&LossConfig::default(), &acc, &logps, &bad)
            .unwrap_err()
            .to_string()
            .contains("mask row 1"));
        let mut bad = li;
        bad.advantages[0] = f32::NAN;
        assert!(policy_loss(&LossConfig::default(), &acc, &logps, &bad).is_err());
    }
}
