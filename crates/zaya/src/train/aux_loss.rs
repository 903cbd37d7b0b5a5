//! Router load balancing: the Switch-style auxiliary loss, per-layer routing counts and the
//! balancing-bias update rule.
//!
//! The reference adds no auxiliary loss (ZAYA1 balances experts with its balancing biases);
//! the loss here is an opt-in training aid (`router_aux_loss_coef`, 0 switches it off).
//! For one layer with `E` real experts, over the `N` real (non-padding) tokens:
//!
//! `aux = E · Σ_{e<E} f_e · P_e`, with `f_e = count_e / N` (top-1 choices; tokens sent to
//! the skip class count in `N` but in no `f_e`) and `P_e = mean_t probs[t, e]`
//! (differentiable). The model-level value is the mean over layers.

use candle_core::{DType, Tensor};

use crate::error::{Result, ZayaError};

/// Where one layer sent the real tokens of a batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LayerRoutingStats {
    /// Tokens per class, `E + 1` entries, the skip class last.
    pub counts: Vec<u64>,
    /// Real tokens seen (the sum of `counts`).
    pub tokens: u64,
}

impl LayerRoutingStats {
    /// Counts `choice` (one class per token, `E` = skip) over the tokens where `real` is true
    /// (all tokens without a mask).
    pub fn from_choice(choice: &[u32], real: Option<&[bool]>, num_experts: usize) -> Result<Self> {
        if let Some(r) = real {
            if r.len() != choice.len() {
                return Err(ZayaError::Input(format!(
                    "routing mask has {} entries for {} tokens",
                    r.len(),
                    choice.len()
                )));
            }
        }
        let mut counts = vec![0u64; num_experts + 1];
        for (i, &c) in choice.iter().enumerate() {
            if real.is_some_and(|r| !r[i]) {
                continue;
            }
            let slot = counts.get_mut(c as usize).ok_or_else(|| {
                ZayaError::Input(format!("routing class {c} exceeds {num_experts} experts"))
            })?;
            *slot += 1;
        }
        let tokens = counts.iter().sum();
        Ok(LayerRoutingStats { counts, tokens })
    }

    /// Number of real experts `E`.
    pub fn num_experts(&self) -> usize {
        self.counts.len().saturating_sub(1)
    }

    /// Fraction of the real tokens sent to the skip class (0 for an empty batch).
    pub fn skip_fraction(&self) -> f64 {
        match (self.counts.last(), self.tokens) {
            (Some(&s), n) if n > 0 => s as f64 / n as f64,
            _ => 0.0,
        }
    }

    /// Adds another batch's counts (gradient accumulation).
    pub fn merge(&mut self, other: &LayerRoutingStats) -> Result<()> {
        if self.counts.is_empty() {
            *self = other.clone();
            return Ok(());
        }
        if other.counts.len() != self.counts.len() {
            return Err(ZayaError::Input(format!(
                "cannot merge routing counts over {} and {} classes",
                self.counts.len(),
                other.counts.len()
            )));
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.tokens += other.tokens;
        Ok(())
    }
}

/// The balance loss of one layer. `probs` is the router's `[N, E+1]` softmax (its gradient
/// flows into the router), `stats` the counts of the same tokens, `real` an optional `[N]`
/// f32 mask (1 = real token). Returns a scalar; 0 (no gradient) when no token is real.
pub fn layer_balance_loss(
    probs: &Tensor,
    stats: &LayerRoutingStats,
    real: Option<&Tensor>,
) -> Result<Tensor> {
    let (n, classes) = probs.dims2()?;
    let e = stats.num_experts();
    if classes != e + 1 {
        return Err(ZayaError::Input(format!(
            "router probabilities have {classes} classes, the counts {}",
            e + 1
        )));
    }
    let dev = probs.device();
    if stats.tokens == 0 || e == 0 {
        return Ok(Tensor::zeros((), DType::F32, dev)?);
    }
    let tokens = stats.tokens as f64;
    // Σ_e f_e P_e = Σ_t Σ_e probs[t,e] · f_e / N  (real tokens only)
    let f: Vec<f32> = stats.counts[..e]
        .iter()
        .map(|&c| (c as f64 / tokens) as f32)
        .collect();
    let f = Tensor::from_vec(f, (e, 1), dev)?;
    let p = probs.to_dtype(DType::F32)?.narrow(1, 0, e)?;
    let per_token = p.matmul(&f)?; // [N, 1]
    let per_token = match real {
        Some(m) => per_token.broadcast_mul(&m.reshape((n, 1))?)?,
        None => per_token,
    };
    Ok((per_token.sum_all()? * (e as f64 / tokens))?)
}

/// The bias-balancing rule applied after a step: `b_e += lr · sign(mean_count − count_e)` on
/// the real experts (over-used experts are pushed down, under-used ones up); the skip entry is
/// left alone. `counts` has `E + 1` entries like the biases.
pub fn balance_bias_update(biases: &[f32], counts: &[u64], lr: f64) -> Result<Vec<f32>> {
    if biases.len() != counts.len() || biases.len() < 2 {
        return Err(ZayaError::Input(format!(
            "{} balancing biases for {} routing counts",
            biases.len(),
            counts.len()
        )));
    }
    let e = biases.len() - 1;
    let mean = counts[..e].iter().sum::<u64>() as f64 / e as f64;
    let mut out = biases.to_vec();
    for (b, &c) in out[..e].iter_mut().zip(&counts[..e]) {
        let diff = mean - c as f64;
        let sign = if diff > 0.0 {
            1.0
        } else if diff < 0.0 {
            -1.0
        } else {
            0.0
        };
        *b = (f64::from(*b) + lr * sign) as f32;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn counts_skip_padding_and_report_the_skip_share() {
        let s = LayerRoutingStats::from_choice(&[0, 2, 2, 1, 2], Some(&[true; 5]), 2).unwrap();
        assert_eq!(s.counts, vec![1, 1, 3]);
        assert!((s.skip_fraction() - 0.6).abs() < 1e-12);
        let s = LayerRoutingStats::from_choice(&[0, 2, 2], Some(&[false, true, true]), 2).unwrap();
        assert_eq!((s.counts, s.tokens), (vec![0, 0, 2], 2));
        assert!(LayerRoutingStats::from_choice(&[3], None, 2).is_err());
    }

    #[test]
    fn balance_loss_value_and_gradient_match_the_formula() {
        let dev = Device::Cpu;
        // 4 tokens, E = 2 (+ skip); token 3 is padding.
        let p = [
            [0.5f32, 0.3, 0.2],
            [0.1, 0.7, 0.2],
            [0.2, 0.2, 0.6],
            [0.9, 0.05, 0.05],
        ];
        let probs = Var::new(&p, &dev).unwrap();
        let real = [true, true, true, false];
        let stats = LayerRoutingStats::from_choice(&[0, 1, 2, 0], Some(&real), 2).unwrap();
        let mask = Tensor::new(&[1f32, 1., 1., 0.], &dev).unwrap();
        let loss = layer_balance_loss(probs.as_tensor(), &stats, Some(&mask)).unwrap();
        // f = [1/3, 1/3]; P = [(0.5+0.1+0.2)/3, (0.3+0.7+0.2)/3]
        let f = [1.0 / 3.0, 1.0 / 3.0];
        let pm = [0.8 / 3.0, 1.2 / 3.0];
        let want = 2.0 * (f[0] * pm[0] + f[1] * pm[1]);
        let got = loss.to_scalar::<f32>().unwrap() as f64;
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        // d/dprobs[t,e] = E · f_e / N on real tokens and real experts, 0 elsewhere.
        let g: Vec<Vec<f32>> = loss
            .backward()
            .unwrap()
            .get(probs.as_tensor())
            .unwrap()
            .to_vec2()
            .unwrap();
        for (t, row) in g.iter().enumerate() {
            for (e, &v) in row.iter().enumerate() {
                let want = if real[t] && e < 2 {
                    2.0 * f[e] / 3.0
                } else {
                    0.0
                };
                assert!((v as f64 - want).abs() < 1e-6, "{g:?}");
            }
        }
    }

    #[test]
    fn bias_rule_moves_real_experts_towards_the_mean_and_keeps_skip() {
        let b = [0.1f32, 0.0, -0.2, -1.0];
        let counts = [10, 4, 7, 30]; // mean over real experts = 7
        let out = balance_bias_update(&b, &counts, 0.01).unwrap();
        let want = vec![(f64::from(0.1f32) - 0.01) as f32, 0.01, -0.2, -1.0];
        assert_eq!(out, want);
        assert!(balance_bias_update(&b, &counts[..3], 0.01).is_err());
    }
}
