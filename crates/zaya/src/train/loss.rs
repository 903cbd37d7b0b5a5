//! Causal-LM cross-entropy exactly as the reference computes it (`ForCausalLMLoss`): the
//! labels are shifted left by one (position `t` predicts label `t + 1`, the last position
//! predicts nothing), `-100` is ignored, and the loss is the mean over the counted targets
//! (or their sum divided by a caller-given normaliser, for gradient accumulation).
//!
//! The `[tokens × vocab]` logits are never materialised at once: the LM head and the
//! log-softmax run over chunks of the counted positions, each chunk is differentiated on its
//! own (its logits are freed before the next chunk starts) and the gradient with respect to
//! the final hidden states is assembled from the chunks.

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var, D};

use crate::error::{Result, ZayaError};
use crate::model::ZayaModel;

/// Label value that contributes nothing to the loss.
pub const IGNORE_INDEX: i64 = -100;

/// The counted targets of a batch after the causal shift.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Targets {
    /// Flat (row-major `b·T + t`) index of the position whose logits predict the target.
    pub rows: Vec<u32>,
    /// Target token of each counted position.
    pub ids: Vec<u32>,
}

impl Targets {
    /// Shifts `labels` (`[B][T]`) as the reference does and checks every label is either
    /// `-100` or a token id below `vocab_size`.
    pub fn from_labels(labels: &[Vec<i64>], vocab_size: usize) -> Result<Self> {
        let t = labels.first().map_or(0, |r| r.len());
        let mut rows = Vec::new();
        let mut ids = Vec::new();
        for (b, row) in labels.iter().enumerate() {
            if row.len() != t {
                return Err(ZayaError::Input(format!(
                    "labels row {b} has {} positions, row 0 has {t}",
                    row.len()
                )));
            }
            for (pos, &l) in row.iter().enumerate() {
                if l == IGNORE_INDEX {
                    continue;
                }
                if l < 0 || l as usize >= vocab_size {
                    return Err(ZayaError::Input(format!(
                        "label {l} at row {b}, position {pos} is neither -100 nor a token id \
                         below vocab_size {vocab_size}"
                    )));
                }
                // The label at position 0 is never predicted (nothing precedes it).
                if pos > 0 {
                    rows.push((b * t + pos - 1) as u32);
                    ids.push(l as u32);
                }
            }
        }
        Ok(Targets { rows, ids })
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

/// Numerically stable log-softmax over the last axis (defined beside the loss head's
/// kernel, [`crate::kernels::log_prob_gather`]).
pub use crate::kernels::reference::log_softmax;

/// What the LM head and the loss produced for one batch.
#[derive(Debug)]
pub struct LossHeadOutput {
    /// Σ −log p(target) over the counted targets (accumulated in f64 on the host).
    pub nll_sum: f64,
    /// Number of counted targets.
    pub count: usize,
    /// `d(nll_sum / normalizer) / d(hidden)`, shaped like `hidden` (absent without backward).
    pub grad_hidden: Option<Tensor>,
    /// Gradients of the LM head parameters (the embedding when tied), keyed by tensor id.
    pub grads: GradStore,
}

/// LM head + cross-entropy over `hidden` (`[B, T, H]`, the final-norm output), `chunk`
/// counted positions at a time. With `backward`, each chunk's `nll / normalizer` is
/// differentiated immediately.
pub fn chunked_lm_loss(
    model: &ZayaModel,
    hidden: &Tensor,
    targets: &Targets,
    normalizer: f64,
    chunk: usize,
    backward: bool,
) -> Result<LossHeadOutput> {
    if chunk == 0 {
        return Err(ZayaError::Input(
            "loss chunk size must be at least 1".into(),
        ));
    }
    if !(normalizer > 0.0 && normalizer.is_finite()) {
        return Err(ZayaError::Input(format!(
            "loss normaliser must be positive and finite, got {normalizer}"
        )));
    }
    let (b, t, h) = hidden.dims3()?;
    let dev = hidden.device();
    let flat = hidden.detach().reshape((b * t, h))?;
    if backward {
        // d(nll / normalizer) / d logp = −1 / normalizer, as the autograd path below seeds it.
        let coef = vec![(-(1.0 / normalizer)) as f32; targets.len()];
        if let Some(out) = fused_head(model, &flat, targets, &coef, 1.0, chunk)? {
            let nll_sum = -out.grads.sum_logp;
            return out.into_output(nll_sum, (b, t, h));
        }
    }
    let mut grads = GradStore::default();
    let mut grad_flat = if backward {
        Some(Tensor::zeros((b * t, h), hidden.dtype(), dev)?)
    } else {
        None
    };
    let mut nll_sum = 0f64;
    for start in (0..targets.len()).step_by(chunk) {
        let n = chunk.min(targets.len() - start);
        let rows = Tensor::new(&targets.rows[start..start + n], dev)?;
        let ids = Tensor::new(&targets.ids[start..start + n], dev)?.unsqueeze(1)?;
        let y = Var::from_tensor(&flat.index_select(&rows, 0)?)?;
        // The reference up-casts the logits to f32 before the loss.
        let logits = model.lm_head(y.as_tensor())?.to_dtype(DType::F32)?;
        let picked = crate::kernels::log_prob_gather(&logits, &ids)?;
        let nll = picked.sum_all()?.neg()?;
        nll_sum += f64::from(nll.to_scalar::<f32>()?);
        if let Some(acc) = grad_flat.as_mut() {
            let gs = (nll / normalizer)?.backward()?;
            // Gradients are detached: a leaf's gradient can keep a graph (see
            // `checkpointing::accumulate`).
            if let Some(g) = gs.get(y.as_tensor()) {
                *acc = acc.index_add(&rows, &g.detach().to_dtype(acc.dtype())?, 0)?;
            }
            for w in model
                .lm_head_weight()
                .into_iter()
                .chain(model.lm_head_bias())
            {
                if let Some(g) = gs.get(w) {
                    let g = g.detach();
                    // summed in the first chunk's buffer (no third [vocab × hidden] tensor)
                    let sum = match grads.remove(w) {
                        Some(old) => old.add_reusing(&g)?,
                        None => g,
                    };
                    grads.insert(w, sum);
                }
            }
        }
    }
    Ok(LossHeadOutput {
        nll_sum,
        count: targets.len(),
        grad_hidden: grad_flat.map(|g| g.reshape((b, t, h))).transpose()?,
        grads,
    })
}

/// Log-probability and entropy of every counted target under the temperature-scaled
/// next-token distribution `softmax(logits / temperature)` (what TRL's fused LM head returns
/// for GRPO), in the order of `targets`. No gradient is recorded.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenLogps {
    pub logps: Vec<f32>,
    pub entropies: Vec<f32>,
}

fn check_temperature(temperature: f64) -> Result<()> {
    if !(temperature > 0.0 && temperature.is_finite()) {
        return Err(ZayaError::Input(format!(
            "temperature must be positive and finite, got {temperature}"
        )));
    }
    Ok(())
}

/// `logits · (1 / temperature)`, up-cast to f32 (TRL multiplies by the inverse).
fn scaled_logits(model: &ZayaModel, y: &Tensor, temperature: f64) -> Result<Tensor> {
    let logits = model.lm_head(y)?.to_dtype(DType::F32)?;
    Ok(if temperature == 1.0 {
        logits
    } else {
        (logits * (1.0 / temperature))?
    })
}

/// [`TokenLogps`] of `targets` over `hidden` (`[B, T, H]`, the final-norm output), `chunk`
/// targets at a time.
pub fn token_logps(
    model: &ZayaModel,
    hidden: &Tensor,
    targets: &Targets,
    temperature: f64,
    chunk: usize,
) -> Result<TokenLogps> {
    check_temperature(temperature)?;
    if chunk == 0 {
        return Err(ZayaError::Input(
            "loss chunk size must be at least 1".into(),
        ));
    }
    let (b, t, h) = hidden.dims3()?;
    let dev = hidden.device();
    let flat = hidden.detach().reshape((b * t, h))?;
    let mut out = TokenLogps::default();
    for start in (0..targets.len()).step_by(chunk) {
        let n = chunk.min(targets.len() - start);
        let rows = Tensor::new(&targets.rows[start..start + n], dev)?;
        let ids = Tensor::new(&targets.ids[start..start + n], dev)?.unsqueeze(1)?;
        let logits = scaled_logits(model, &flat.index_select(&rows, 0)?, temperature)?;
        let lp = log_softmax(&logits)?;
        out.logps
            .extend(lp.gather(&ids, 1)?.squeeze(1)?.to_vec1::<f32>()?);
        // H = −Σ p log p
        let ent = (lp.exp()? * &lp)?.sum(D::Minus1)?.neg()?;
        out.entropies.extend(ent.to_vec1::<f32>()?);
    }
    Ok(out)
}

/// The backward of `Σ_k weights[k] · logp_k` (logp under `softmax(logits / temperature)`,
/// targets in the order of `targets`): the gradient with respect to `hidden` and the LM head
/// gradients. Any objective `L(logp)` is differentiated through the model by passing
/// `weights = dL / dlogp` — so a policy-gradient loss is a function of the per-token
/// log-probabilities, not a second trainer.
pub fn weighted_logp_backward(
    model: &ZayaModel,
    hidden: &Tensor,
    targets: &Targets,
    temperature: f64,
    weights: &[f32],
    chunk: usize,
) -> Result<LossHeadOutput> {
    check_temperature(temperature)?;
    if chunk == 0 {
        return Err(ZayaError::Input(
            "loss chunk size must be at least 1".into(),
        ));
    }
    if weights.len() != targets.len() {
        return Err(ZayaError::Input(format!(
            "{} per-token weights for {} counted targets",
            weights.len(),
            targets.len()
        )));
    }
    if let Some(k) = weights.iter().position(|w| !w.is_finite()) {
        return Err(ZayaError::Input(format!(
            "per-token weight {k} is {} (not finite)",
            weights[k]
        )));
    }
    let (b, t, h) = hidden.dims3()?;
    let dev = hidden.device();
    let flat = hidden.detach().reshape((b * t, h))?;
    let inv_temp = (1.0 / temperature) as f32;
    if let Some(out) = fused_head(model, &flat, targets, weights, inv_temp, chunk)? {
        return out.into_output(0.0, (b, t, h));
    }
    let mut grads = GradStore::default();
    let mut acc = Tensor::zeros((b * t, h), hidden.dtype(), dev)?;
    for start in (0..targets.len()).step_by(chunk) {
        let n = chunk.min(targets.len() - start);
        let w = &weights[start..start + n];
        if w.iter().all(|&x| x == 0.0) {
            continue;
        }
        let rows = Tensor::new(&targets.rows[start..start + n], dev)?;
        let ids = Tensor::new(&targets.ids[start..start + n], dev)?.unsqueeze(1)?;
        let y = Var::from_tensor(&flat.index_select(&rows, 0)?)?;
        let logits = scaled_logits(model, y.as_tensor(), temperature)?;
        let picked = crate::kernels::log_prob_gather(&logits, &ids)?.squeeze(1)?;
        let seed = (picked * Tensor::new(w, dev)?)?.sum_all()?;
        let gs = seed.backward()?;
        if let Some(g) = gs.get(y.as_tensor()) {
            acc = acc.index_add(&rows, &g.detach().to_dtype(acc.dtype())?, 0)?;
        }
        for p in model
            .lm_head_weight()
            .into_iter()
            .chain(model.lm_head_bias())
        {
            if let Some(g) = gs.get(p) {
                let g = g.detach();
                let sum = match grads.remove(p) {
                    Some(old) => old.add_reusing(&g)?,
                    None => g,
                };
                grads.insert(p, sum);
            }
        }
    }
    Ok(LossHeadOutput {
        nll_sum: 0.0,
        count: targets.len(),
        grad_hidden: Some(acc.reshape((b, t, h))?),
        grads,
    })
}

/// The fused training head (`kernels::loss_head`) over every counted target, where the
/// registry picks it and the head is a plain dense f32 `x · Wᵀ (+ b)`; `None` sends the
/// caller down its autograd path (the kernel's reference).
fn fused_head(
    model: &ZayaModel,
    flat: &Tensor,
    targets: &Targets,
    coef: &[f32],
    inv_temp: f32,
    chunk: usize,
) -> Result<Option<FusedHead>> {
    let Some((weight, bias)) = model.plain_dense_head() else {
        return Ok(None);
    };
    let out = crate::kernels::loss_head_backward(
        flat,
        weight,
        bias,
        &targets.rows,
        &targets.ids,
        coef,
        inv_temp,
        chunk,
    )?;
    Ok(out.map(|grads| FusedHead {
        grads,
        weight: weight.clone(),
        bias: bias.cloned(),
        count: targets.len(),
    }))
}

struct FusedHead {
    grads: crate::kernels::loss_head::HeadGradients,
    weight: Tensor,
    bias: Option<Tensor>,
    count: usize,
}

impl FusedHead {
    fn into_output(self, nll_sum: f64, (b, t, h): (usize, usize, usize)) -> Result<LossHeadOutput> {
        let dev = self.weight.device().clone();
        let mut grads = GradStore::default();
        if let Some(dw) = self.grads.d_weight {
            grads.insert(
                &self.weight,
                Tensor::from_vec(dw, self.weight.shape(), &dev)?,
            );
        }
        if let (Some(db), Some(bias)) = (self.grads.d_bias, &self.bias) {
            grads.insert(bias, Tensor::from_vec(db, bias.shape(), &dev)?);
        }
        Ok(LossHeadOutput {
            nll_sum,
            count: self.count,
            grad_hidden: Some(Tensor::from_vec(self.grads.d_hidden, (b, t, h), &dev)?),
            grads,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn targets_shift_left_and_skip_ignored_labels() {
        let labels = vec![vec![5, -100, 7, 8], vec![-100, 1, -100, 2]];
        let t = Targets::from_labels(&labels, 10).unwrap();
        // row 0: positions 1..3 carry -100, 7, 8 → predicted from positions 1 and 2
        // row 1: labels 1 (pos 1) and 2 (pos 3) → predicted from flat rows 4 and 6
        assert_eq!(t.rows, vec![1, 2, 4, 6]);
        assert_eq!(t.ids, vec![7, 8, 1, 2]);
    }

    #[test]
    fn bad_labels_are_rejected() {
        assert!(Targets::from_labels(&[vec![0, 10]], 10).is_err());
        assert!(Targets::from_labels(&[vec![0, -5]], 10).is_err());
        assert!(Targets::from_labels(&[vec![0, 1], vec![1]], 10).is_err());
    }

    #[test]
    fn log_softmax_is_stable_and_differentiable() {
        let dev = Device::Cpu;
        let x = Var::new(&[[1000f32, 1001., 1002.], [-3., 0., 2.]], &dev).unwrap();
        let lp = log_softmax(x.as_tensor()).unwrap();
        let got: Vec<Vec<f32>> = lp.to_vec2().unwrap();
        for (row, xs) in got.iter().zip([[1000f64, 1001., 1002.], [-3., 0., 2.]]) {
            let m = xs.iter().cloned().fold(f64::MIN, f64::max);
            let lse = m + xs.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
            for (g, v) in row.iter().zip(xs) {
                assert!((*g as f64 - (v - lse)).abs() < 1e-5, "{got:?}");
            }
        }
        // d/dx Σ_j w_j log_softmax(x)_j = w − softmax(x)·Σw
        let w = Tensor::new(&[[1f32, 0., 0.], [0., 2., 0.]], &dev).unwrap();
        let g = (lp * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap()
            .get(x.as_tensor())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let xs = [[1000f64, 1001., 1002.], [-3., 0., 2.]];
        let ws = [[1f64, 0., 0.], [0., 2., 0.]];
        for r in 0..2 {
            let m = xs[r].iter().cloned().fold(f64::MIN, f64::max);
            let z: f64 = xs[r].iter().map(|v| (v - m).exp()).sum();
            let sw: f64 = ws[r].iter().sum();
            for j in 0..3 {
                let want = ws[r][j] - (xs[r][j] - m).exp() / z * sw;
                assert!((g[r][j] as f64 - want).abs() < 1e-5, "{g:?}");
            }
        }
    }
}
