//! AdamW with decoupled weight decay (Loshchilov & Hutter; the `torch.optim.AdamW`
//! update), f32 moments, per-parameter step counts, gradient clipping by global norm, and
//! optimizer state save/load for exact resume. candle-nn's `AdamW` keeps moments in the
//! parameter dtype, decays every parameter and has no state I/O, hence this one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::{Gradients, Param};
use crate::error::{Result, ZayaError};

/// AdamW hyper-parameters (the learning rate comes from the schedule at each step).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Applied to parameters with `Param::decay` only.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// `torch.optim.AdamW` defaults.
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

impl AdamWConfig {
    pub fn validate(&self) -> Result<()> {
        let ok = (0.0..1.0).contains(&self.beta1)
            && (0.0..1.0).contains(&self.beta2)
            && self.eps > 0.0
            && self.weight_decay >= 0.0
            && self.weight_decay.is_finite();
        if ok {
            Ok(())
        } else {
            Err(ZayaError::Input(format!(
                "invalid AdamW settings {self:?} (betas in [0, 1), eps > 0, weight_decay >= 0)"
            )))
        }
    }
}

/// AdamW state: first and second moments (f32) and the step count of every parameter.
#[derive(Debug, Clone)]
pub struct AdamW {
    cfg: AdamWConfig,
    exp_avg: Vec<Tensor>,
    exp_avg_sq: Vec<Tensor>,
    steps: Vec<u64>,
}

impl AdamW {
    pub fn new(params: &[Param], cfg: AdamWConfig) -> Result<Self> {
        cfg.validate()?;
        let zeros = params
            .iter()
            .map(|p| Tensor::zeros(p.var.shape(), DType::F32, p.var.device()))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(AdamW {
            cfg,
            exp_avg_sq: zeros.clone(),
            exp_avg: zeros,
            steps: vec![0; params.len()],
        })
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    /// New hyper-parameters from the next step on (the moments are kept).
    pub fn set_config(&mut self, cfg: AdamWConfig) -> Result<()> {
        cfg.validate()?;
        self.cfg = cfg;
        Ok(())
    }

    /// Steps taken by parameter `i` (parameters that got no gradient are not stepped, as in
    /// torch).
    pub fn steps(&self, i: usize) -> u64 {
        self.steps.get(i).copied().unwrap_or(0)
    }

    /// One update with learning rate `lr`:
    /// `p ← p·(1 − lr·wd)`; `m ← β₁m + (1−β₁)g`; `v ← β₂v + (1−β₂)g²`;
    /// `p ← p − lr/(1−β₁ᵗ) · m / (√v/√(1−β₂ᵗ) + ε)`.
    pub fn step(&mut self, params: &[Param], grads: &Gradients, lr: f64) -> Result<()> {
        if params.len() != self.steps.len() || grads.grads.len() != params.len() {
            return Err(ZayaError::Input(format!(
                "optimizer holds {} parameters, got {} parameters and {} gradients",
                self.steps.len(),
                params.len(),
                grads.grads.len()
            )));
        }
        if !lr.is_finite() || lr < 0.0 {
            return Err(ZayaError::Input(format!("learning rate {lr} is invalid")));
        }
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.cfg;
        for (i, (p, g)) in params.iter().zip(&grads.grads).enumerate() {
            let Some(g) = g else { continue };
            let g = g.to_dtype(DType::F32)?;
            self.steps[i] += 1;
            let t = self.steps[i] as i32;
            let m = ((&self.exp_avg[i] * beta1)? + (&g * (1.0 - beta1))?)?;
            let v = ((&self.exp_avg_sq[i] * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
            let bc1 = 1.0 - beta1.powi(t);
            let bc2_sqrt = (1.0 - beta2.powi(t)).sqrt();
            let denom = ((v.sqrt()? / bc2_sqrt)? + eps)?;
            let mut w = p.var.as_tensor().detach();
            if p.decay && weight_decay != 0.0 {
                w = (w * (1.0 - lr * weight_decay))?;
            }
            let w = (w - (m.div(&denom)? * (lr / bc1))?)?;
            p.var.set(&w)?;
            self.exp_avg[i] = m;
            self.exp_avg_sq[i] = v;
        }
        Ok(())
    }

    /// The state by name (`exp_avg.<name>`, `exp_avg_sq.<name>`, `step.<name>` as a one-element
    /// i64): what [`AdamW::save`] writes; sharded optimizers gather it from these maps.
    pub fn export(&self, params: &[Param]) -> Result<HashMap<String, Tensor>> {
        if params.len() != self.steps.len() {
            return Err(ZayaError::Input(format!(
                "optimizer holds {} parameters, asked to export {}",
                self.steps.len(),
                params.len()
            )));
        }
        let mut out: HashMap<String, Tensor> = HashMap::new();
        for (i, p) in params.iter().enumerate() {
            out.insert(format!("exp_avg.{}", p.name), self.exp_avg[i].clone());
            out.insert(format!("exp_avg_sq.{}", p.name), self.exp_avg_sq[i].clone());
            out.insert(
                format!("step.{}", p.name),
                Tensor::new(&[self.steps[i] as i64], &Device::Cpu)?,
            );
        }
        Ok(out)
    }

    /// The state of the parameters at `indices` only (in that order): one shard of a
    /// ZeRO-1 optimizer.
    pub fn select(&self, indices: &[usize]) -> Result<Self> {
        let n = self.steps.len();
        if let Some(&i) = indices.iter().find(|&&i| i >= n) {
            return Err(ZayaError::Input(format!(
                "optimizer parameter {i} out of range ({n} parameters)"
            )));
        }
        Ok(AdamW {
            cfg: self.cfg,
            exp_avg: indices.iter().map(|&i| self.exp_avg[i].clone()).collect(),
            exp_avg_sq: indices
                .iter()
                .map(|&i| self.exp_avg_sq[i].clone())
                .collect(),
            steps: indices.iter().map(|&i| self.steps[i]).collect(),
        })
    }

    /// Writes the state as safetensors (`exp_avg.<name>`, `exp_avg_sq.<name>`,
    /// `step.<name>`), atomically (temporary file, then rename).
    pub fn save(&self, params: &[Param], path: &Path) -> Result<()> {
        let out = self.export(params)?;
        let tmp = path.with_extension("tmp-write");
        candle_core::safetensors::save(&out, &tmp).map_err(|e| ZayaError::BadWeightsFile {
            path: tmp.clone(),
            message: e.to_string(),
        })?;
        crate::durable::rename_synced(&tmp, path)
    }

    /// Reads a state written by [`AdamW::save`] for the same parameter list.
    pub fn load(params: &[Param], path: &Path, cfg: AdamWConfig) -> Result<Self> {
        let dev = params
            .first()
            .map_or(Device::Cpu, |p| p.var.device().clone());
        let stored =
            candle_core::safetensors::load(path, &dev).map_err(|e| ZayaError::BadWeightsFile {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        Self::import(params, stored, cfg, path)
    }

    /// The state of `params` from a map as [`AdamW::export`] gives it; every entry must be
    /// used (`origin` names where the map came from in errors).
    pub fn import(
        params: &[Param],
        mut stored: HashMap<String, Tensor>,
        cfg: AdamWConfig,
        origin: &Path,
    ) -> Result<Self> {
        cfg.validate()?;
        let path = origin;
        let mut take = |name: String, shape: &[usize]| -> Result<Tensor> {
            let t = stored
                .remove(&name)
                .ok_or_else(|| ZayaError::MissingTensor {
                    name: name.clone(),
                    expected: shape.to_vec(),
                    location: path.to_path_buf(),
                })?;
            if t.dims() != shape {
                return Err(ZayaError::ShapeMismatch {
                    name,
                    expected: shape.to_vec(),
                    found: t.dims().to_vec(),
                    file: path.to_path_buf(),
                });
            }
            Ok(t)
        };
        let mut exp_avg = Vec::with_capacity(params.len());
        let mut exp_avg_sq = Vec::with_capacity(params.len());
        let mut steps = Vec::with_capacity(params.len());
        for p in params {
            let shape = p.var.dims();
            exp_avg.push(take(format!("exp_avg.{}", p.name), shape)?.to_dtype(DType::F32)?);
            exp_avg_sq.push(take(format!("exp_avg_sq.{}", p.name), shape)?.to_dtype(DType::F32)?);
            let s = take(format!("step.{}", p.name), &[1])?
                .to_dtype(DType::I64)?
                .to_vec1::<i64>()?[0];
            steps.push(u64::try_from(s).map_err(|_| ZayaError::BadWeightsFile {
                path: path.to_path_buf(),
                message: format!("negative step count for `{}`", p.name),
            })?);
        }
        if let Some((name, t)) = stored.into_iter().next() {
            return Err(ZayaError::UnexpectedTensor {
                name,
                shape: t.dims().to_vec(),
                file: PathBuf::from(path),
            });
        }
        Ok(AdamW {
            cfg,
            exp_avg,
            exp_avg_sq,
            steps,
        })
    }
}

/// Scales the gradients so that their global norm is at most `max_norm` (as
/// `torch.nn.utils.clip_grad_norm_`: factor `max_norm / (norm + 1e-6)` when below 1).
/// Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut Gradients, max_norm: f64) -> Result<f64> {
    if max_norm.is_nan() || max_norm <= 0.0 {
        return Err(ZayaError::Input(format!(
            "max_grad_norm must be positive, got {max_norm}"
        )));
    }
    let norm = grads.global_norm()?;
    clip_to_norm(grads, norm, max_norm)?;
    Ok(norm)
}

/// [`clip_grad_norm`] with the global norm computed elsewhere (a model whose parameters
/// are spread over ranks sums the shares of every rank: [`super::Trainable::grad_norm`]).
pub fn clip_to_norm(grads: &mut Gradients, norm: f64, max_norm: f64) -> Result<()> {
    if max_norm.is_nan() || max_norm <= 0.0 {
        return Err(ZayaError::Input(format!(
            "max_grad_norm must be positive, got {max_norm}"
        )));
    }
    if !norm.is_finite() {
        return Err(ZayaError::Input(format!(
            "gradient norm is {norm}: the loss diverged"
        )));
    }
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        grads.scale(coef)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    fn param(name: &str, v: &[f32], decay: bool) -> Param {
        Param {
            name: name.into(),
            var: Var::new(v, &Device::Cpu).unwrap(),
            decay,
        }
    }

    #[test]
    fn adamw_matches_a_hand_computation() {
        let params = vec![param("w", &[0.5, -1.0], true), param("b", &[0.25], false)];
        let cfg = AdamWConfig {
            beta1: 0.8,
            beta2: 0.9,
            eps: 1e-3,
            weight_decay: 0.1,
        };
        let mut opt = AdamW::new(&params, cfg).unwrap();
        // Row 0 is the gradient of `w`, row 1 of `b` (one coordinate, padded with 0).
        let g1 = [[0.2f64, -0.4], [1.0, 0.0]];
        let g2 = [[-0.1f64, 0.3], [0.5, 0.0]];
        let lr = [0.01f64, 0.02];
        for (step, g) in [g1, g2].iter().enumerate() {
            let grads = Gradients {
                grads: vec![
                    Some(Tensor::new(&[g[0][0] as f32, g[0][1] as f32], &Device::Cpu).unwrap()),
                    Some(Tensor::new(&[g[1][0] as f32], &Device::Cpu).unwrap()),
                ],
            };
            opt.step(&params, &grads, lr[step]).unwrap();
        }
        // Hand computation in f64.
        let mut want = Vec::new();
        for (idx, (p0, decay)) in [(vec![0.5f64, -1.0], true), (vec![0.25], false)]
            .into_iter()
            .enumerate()
        {
            let mut p = p0;
            let mut m = vec![0.0; p.len()];
            let mut v = vec![0.0; p.len()];
            for (step, g) in [g1, g2].iter().enumerate() {
                let t = (step + 1) as i32;
                for j in 0..p.len() {
                    let gj = g[idx][j];
                    if decay {
                        p[j] *= 1.0 - lr[step] * 0.1;
                    }
                    m[j] = 0.8 * m[j] + 0.2 * gj;
                    v[j] = 0.9 * v[j] + 0.1 * gj * gj;
                    let denom = v[j].sqrt() / (1.0 - 0.9f64.powi(t)).sqrt() + 1e-3;
                    p[j] -= lr[step] / (1.0 - 0.8f64.powi(t)) * m[j] / denom;
                }
            }
            want.push(p);
        }
        for (p, w) in params.iter().zip(&want) {
            let got = p.var.as_tensor().to_vec1::<f32>().unwrap();
            for (a, b) in got.iter().zip(w) {
                assert!((*a as f64 - b).abs() < 1e-6, "{}: {got:?} vs {w:?}", p.name);
            }
        }
        assert_eq!((opt.steps(0), opt.steps(1)), (2, 2));
    }

    #[test]
    fn parameters_without_gradient_are_not_touched() {
        let params = vec![param("w", &[0.5, -1.0], true)];
        let mut opt = AdamW::new(&params, AdamWConfig::default()).unwrap();
        opt.step(&params, &Gradients { grads: vec![None] }, 0.1)
            .unwrap();
        assert_eq!(
            params[0].var.as_tensor().to_vec1::<f32>().unwrap(),
            vec![0.5, -1.0]
        );
        assert_eq!(opt.steps(0), 0);
    }

    #[test]
    fn clipping_scales_to_the_max_norm_and_leaves_small_gradients() {
        let dev = Device::Cpu;
        let mut g = Gradients {
            grads: vec![
                Some(Tensor::new(&[3f32, 0.], &dev).unwrap()),
                None,
                Some(Tensor::new(&[4f32], &dev).unwrap()),
            ],
        };
        let norm = clip_grad_norm(&mut g, 1.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-9);
        let after = g.global_norm().unwrap();
        assert!((after - 5.0 / (5.0 + 1e-6)).abs() < 1e-6, "{after}");
        let a = g.grads[0].as_ref().unwrap().to_vec1::<f32>().unwrap();
        assert!((a[0] - 0.6).abs() < 1e-6 && a[1] == 0.0);
        let norm2 = clip_grad_norm(&mut g, 10.0).unwrap();
        assert!((norm2 - after).abs() < 1e-9);
        assert!((g.global_norm().unwrap() - after).abs() < 1e-9);
        assert!(clip_grad_norm(&mut g, 0.0).is_err());
    }

    #[test]
    fn state_round_trips_and_mismatches_are_reported() {
        let params = vec![param("w", &[0.5, -1.0], true), param("b", &[0.25], false)];
        let mut opt = AdamW::new(&params, AdamWConfig::default()).unwrap();
        let grads = Gradients {
            grads: vec![
                Some(Tensor::new(&[0.1f32, 0.2], &Device::Cpu).unwrap()),
                Some(Tensor::new(&[0.3f32], &Device::Cpu).unwrap()),
            ],
        };
        opt.step(&params, &grads, 0.01).unwrap();
        let dir = std::env::temp_dir().join(format!("zaya-optim-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("opt.safetensors");
        opt.save(&params, &path).unwrap();
        let loaded = AdamW::load(&params, &path, AdamWConfig::default()).unwrap();
        for i in 0..2 {
            assert_eq!(loaded.steps(i), 1);
            assert_eq!(
                loaded.exp_avg[i].to_vec1::<f32>().unwrap(),
                opt.exp_avg[i].to_vec1::<f32>().unwrap()
            );
            assert_eq!(
                loaded.exp_avg_sq[i].to_vec1::<f32>().unwrap(),
                opt.exp_avg_sq[i].to_vec1::<f32>().unwrap()
            );
        }
        let other = vec![param("w", &[0.5, -1.0, 2.0], true)];
        assert!(matches!(
            AdamW::load(&other, &path, AdamWConfig::default()),
            Err(ZayaError::ShapeMismatch { .. })
        ));
        let renamed = vec![param("x", &[0.5, -1.0], true)];
        assert!(matches!(
            AdamW::load(&renamed, &path, AdamWConfig::default()),
            Err(ZayaError::MissingTensor { .. })
        ));
        let subset = vec![param("w", &[0.5, -1.0], true)];
        assert!(matches!(
            AdamW::load(&subset, &path, AdamWConfig::default()),
            Err(ZayaError::UnexpectedTensor { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
