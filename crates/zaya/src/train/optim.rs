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
/// The moments are updated in place by the fused step, so every moment tensor owns its
/// storage (cloning, exporting and selecting copy them).
#[derive(Debug)]
pub struct AdamW {
    cfg: AdamWConfig,
    exp_avg: Vec<Tensor>,
    exp_avg_sq: Vec<Tensor>,
    steps: Vec<u64>,
}

impl Clone for AdamW {
    fn clone(&self) -> Self {
        let copy = |ts: &[Tensor]| {
            ts.iter()
                .map(|t| t.copy().expect("copying a host tensor"))
                .collect()
        };
        AdamW {
            cfg: self.cfg,
            exp_avg: copy(&self.exp_avg),
            exp_avg_sq: copy(&self.exp_avg_sq),
            steps: self.steps.clone(),
        }
    }
}

impl AdamW {
    pub fn new(params: &[Param], cfg: AdamWConfig) -> Result<Self> {
        cfg.validate()?;
        let zeros = || {
            params
                .iter()
                .map(|p| Tensor::zeros(p.var.shape(), DType::F32, p.var.device()))
                .collect::<candle_core::Result<Vec<_>>>()
        };
        Ok(AdamW {
            cfg,
            exp_avg: zeros()?,
            exp_avg_sq: zeros()?,
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

    /// The first and second moments of parameter `i` (no copy; `None` past the end): what a
    /// sharded run streams into its checkpoint.
    pub fn moments(&self, i: usize) -> Option<(&Tensor, &Tensor)> {
        Some((self.exp_avg.get(i)?, self.exp_avg_sq.get(i)?))
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
        check_lr(lr)?;
        for (i, (p, g)) in params.iter().zip(&grads.grads).enumerate() {
            if let Some(g) = g {
                self.update(i, p, g, lr)?;
            }
        }
        Ok(())
    }

    /// The update of parameter `i` alone (`p`: the `i`-th of the list the optimizer was built
    /// for): what [`AdamW::step`] does for each parameter that has a gradient. Called by an
    /// optimizer in the backward pass as each gradient becomes final.
    pub fn step_param(&mut self, i: usize, p: &Param, grad: &Tensor, lr: f64) -> Result<()> {
        let n = self.steps.len();
        if i >= n {
            return Err(ZayaError::Input(format!(
                "optimizer parameter {i} ({}) out of range ({n} parameters)",
                p.name
            )));
        }
        if self.exp_avg[i].dims() != p.var.dims() {
            return Err(ZayaError::Input(format!(
                "optimizer parameter {i} has shape {:?}, {} has {:?}",
                self.exp_avg[i].dims(),
                p.name,
                p.var.dims()
            )));
        }
        check_lr(lr)?;
        self.update(i, p, grad, lr)
    }

    fn update(&mut self, i: usize, p: &Param, g: &Tensor, lr: f64) -> Result<()> {
        let g = g.to_dtype(DType::F32)?;
        self.steps[i] += 1;
        let c = StepConstants::new(&self.cfg, self.steps[i], lr, p.decay);
        let (m, v) = (&self.exp_avg[i], &self.exp_avg_sq[i]);
        if !fused_step(p.var.as_tensor(), m, v, &g, &c)? {
            let (m, v) = reference_step(p, m, v, &g, &c)?;
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
            out.insert(format!("exp_avg.{}", p.name), self.exp_avg[i].copy()?);
            out.insert(format!("exp_avg_sq.{}", p.name), self.exp_avg_sq[i].copy()?);
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
        let copy = |ts: &[Tensor]| -> Result<Vec<Tensor>> {
            Ok(indices
                .iter()
                .map(|&i| ts[i].copy())
                .collect::<candle_core::Result<_>>()?)
        };
        Ok(AdamW {
            cfg: self.cfg,
            exp_avg: copy(&self.exp_avg)?,
            exp_avg_sq: copy(&self.exp_avg_sq)?,
            steps: indices.iter().map(|&i| self.steps[i]).collect(),
        })
    }

    /// Writes the state as safetensors (`exp_avg.<name>`, `exp_avg_sq.<name>`,
    /// `step.<name>`), atomically (temporary file, then rename).
    pub fn save(&self, params: &[Param], path: &Path) -> Result<()> {
        Self::save_state(&self.export(params)?, path)
    }

    /// Writes a state map as [`AdamW::export`] gives it (or a sharded optimizer gathers it)
    /// the way [`AdamW::save`] does.
    pub fn save_state(state: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
        let tmp = path.with_extension("tmp-write");
        candle_core::safetensors::save(state, &tmp).map_err(|e| ZayaError::BadWeightsFile {
            path: tmp.clone(),
            message: e.to_string(),
        })?;
        crate::durable::rename_synced(&tmp, path)
    }

    /// [`AdamW::save_state`] without the state in memory: the same file, byte for byte,
    /// for `tensors` (`exp_avg.<name>`, `exp_avg_sq.<name>` in f32, `step.<name>` as one
    /// i64), their data streamed by `fill(tensor, sink)` in the file's order
    /// ([`crate::safetensors_io::file_order`]).
    pub fn save_state_streamed(
        path: &Path,
        tensors: &[crate::safetensors_io::PlannedTensor],
        fill: impl FnMut(
            &crate::safetensors_io::PlannedTensor,
            &mut crate::safetensors_io::TensorSink,
        ) -> Result<()>,
    ) -> Result<()> {
        // candle's `safetensors::save` passes no metadata
        crate::safetensors_io::write_file_streamed(
            path,
            &path.with_extension("tmp-write"),
            tensors,
            None,
            fill,
        )
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
            // owned copies: the fused step writes them in place
            exp_avg.push(owned_f32(take(format!("exp_avg.{}", p.name), shape)?)?);
            exp_avg_sq.push(owned_f32(take(format!("exp_avg_sq.{}", p.name), shape)?)?);
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

/// `t` as an f32 tensor with storage of its own.
/// A learning rate an update can use: finite and not negative.
fn check_lr(lr: f64) -> Result<()> {
    if !lr.is_finite() || lr < 0.0 {
        return Err(ZayaError::Input(format!("learning rate {lr} is invalid")));
    }
    Ok(())
}

fn owned_f32(t: Tensor) -> Result<Tensor> {
    Ok(if t.dtype() == DType::F32 {
        t.copy()?
    } else {
        t.to_dtype(DType::F32)?
    })
}

/// The scalars of one parameter's update, as f32 exactly as candle's affine ops round
/// them (the reference step multiplies by these f32 values).
struct StepConstants {
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    /// `1 / √(1 − β₂ᵗ)`
    inv_bc2_sqrt: f32,
    eps: f32,
    /// `1 − lr·wd` when the parameter decays.
    decay: Option<f32>,
    /// `lr / (1 − β₁ᵗ)`
    step_size: f32,
    // the f64 values the reference step hands to candle
    f64s: [f64; 7],
}

impl StepConstants {
    fn new(cfg: &AdamWConfig, step: u64, lr: f64, decays: bool) -> Self {
        let t = step.min(i32::MAX as u64) as i32;
        let bc1 = 1.0 - cfg.beta1.powi(t);
        let bc2_sqrt = (1.0 - cfg.beta2.powi(t)).sqrt();
        let decay = (decays && cfg.weight_decay != 0.0).then_some(1.0 - lr * cfg.weight_decay);
        StepConstants {
            beta1: cfg.beta1 as f32,
            one_minus_beta1: (1.0 - cfg.beta1) as f32,
            beta2: cfg.beta2 as f32,
            one_minus_beta2: (1.0 - cfg.beta2) as f32,
            inv_bc2_sqrt: (1.0 / bc2_sqrt) as f32,
            eps: cfg.eps as f32,
            decay: decay.map(|d| d as f32),
            step_size: (lr / bc1) as f32,
            f64s: [
                cfg.beta1,
                1.0 - cfg.beta1,
                cfg.beta2,
                1.0 - cfg.beta2,
                bc2_sqrt,
                cfg.eps,
                lr / bc1,
            ],
        }
    }
}

/// The update from candle tensor ops (any device or dtype): `m`, `v` new, the parameter
/// set through its `Var`.
fn reference_step(
    p: &Param,
    m: &Tensor,
    v: &Tensor,
    g: &Tensor,
    c: &StepConstants,
) -> Result<(Tensor, Tensor)> {
    let [beta1, one_minus_beta1, beta2, one_minus_beta2, bc2_sqrt, eps, step_size] = c.f64s;
    let m = ((m * beta1)? + (g * one_minus_beta1)?)?;
    let v = ((v * beta2)? + (g.sqr()? * one_minus_beta2)?)?;
    let denom = ((v.sqrt()? / bc2_sqrt)? + eps)?;
    let mut w = p.var.as_tensor().detach();
    if let Some(d) = c.decay {
        // the reference multiplies by the f64 `1 − lr·wd`; candle rounds it to this f32
        w = (w * d as f64)?;
    }
    let w = (w - (m.div(&denom)? * step_size)?)?;
    p.var.set(&w)?;
    Ok((m, v))
}

/// One element of the update, in the reference's operations and order (each candle affine
/// op is `x·a + b` in f32; the `+ 0` ones are dropped, which changes no value).
#[inline(always)]
fn update_body(w: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], c: &StepConstants) {
    for (((w, m), v), &g) in w.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
        *m = *m * c.beta1 + g * c.one_minus_beta1;
        *v = *v * c.beta2 + (g * g) * c.one_minus_beta2;
        let denom = (v.sqrt() * c.inv_bc2_sqrt) * 1.0 + c.eps;
        let mut x = *w;
        if let Some(d) = c.decay {
            x *= d;
        }
        *w = x - (*m / denom) * c.step_size;
    }
}

/// The update in one pass over the parameter, its moments and its gradient, in place (no
/// temporaries: the reference allocates a dozen parameter-sized tensors), split over the
/// kernel pool. Bit-identical to [`reference_step`]. `false` (nothing done) when a tensor
/// is not a contiguous f32 CPU tensor.
fn fused_step(w: &Tensor, m: &Tensor, v: &Tensor, g: &Tensor, c: &StepConstants) -> Result<bool> {
    use candle_core::{CpuStorage, InplaceOp1, Layout};
    use std::cell::RefCell;
    let fits = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous();
    let shared = |a: &Tensor, b: &Tensor| {
        let (sa, _) = a.storage_and_layout();
        let (sb, _) = b.storage_and_layout();
        std::ptr::eq(&*sa, &*sb)
    };
    if !(fits(w) && fits(m) && fits(v) && fits(g))
        || shared(w, m)
        || shared(w, v)
        || shared(m, v)
        || shared(g, w)
        || shared(g, m)
        || shared(g, v)
    {
        return Ok(false);
    }
    /// Runs `f` on the tensor's values, mutably.
    struct Values<F>(F);
    impl<F: Fn(&mut [f32]) -> candle_core::Result<()>> InplaceOp1 for Values<F> {
        fn name(&self) -> &'static str {
            "adamw"
        }
        fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
            let (CpuStorage::F32(d), Some((a, b))) = (s, l.contiguous_offsets()) else {
                candle_core::bail!("adamw: expected a contiguous f32 tensor");
            };
            (self.0)(&mut d[a..b])
        }
    }
    // The gradient is read where it is (a copy would be one more parameter-sized buffer at
    // the step's memory peak); `shared` above rules out a lock taken twice.
    let (g_storage, g_layout) = g.storage_and_layout();
    let (candle_core::Storage::Cpu(CpuStorage::F32(g)), Some((g0, g1))) =
        (&*g_storage, g_layout.contiguous_offsets())
    else {
        return Ok(false);
    };
    let g = &g[g0..g1];
    m.inplace_op1(&Values(|m: &mut [f32]| {
        let m = RefCell::new(m);
        v.inplace_op1(&Values(|v: &mut [f32]| {
            let v = RefCell::new(v);
            w.inplace_op1(&Values(|w: &mut [f32]| {
                let (mut m, mut v) = (m.borrow_mut(), v.borrow_mut());
                update_in_pool(w, &mut m, &mut v, g, c);
                Ok(())
            }))
        }))
    }))?;
    Ok(true)
}

fn update_in_pool(w: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], c: &StepConstants) {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 14;
    if w.len() < 2 * CHUNK {
        return update(w, m, v, g, c);
    }
    crate::kernels::cpu::in_pool(|| {
        w.par_chunks_mut(CHUNK)
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .zip(g.par_chunks(CHUNK))
            .for_each(|(((w, m), v), g)| update(w, m, v, g, c))
    })
}

crate::kernels::cpu::simd_dispatch! {
    /// [`update_body`] at the machine's SIMD level (the same values on every level).
    fn update(w: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], c: &StepConstants) => update_body
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

    /// The fused in-place step gives the reference step's bits (parameter and both
    /// moments) over several steps, with and without decay, on the pool path and the
    /// single-thread path, with zero and large gradients.
    #[test]
    fn fused_step_equals_the_reference_bit_for_bit() {
        let val = |i: usize, s: u32| {
            let x = (i as u32)
                .wrapping_mul(2_654_435_761)
                .wrapping_add(s.wrapping_mul(97));
            ((x >> 8) % 20001) as f32 / 10000.0 - 1.0
        };
        let cfg = AdamWConfig {
            weight_decay: 0.05,
            ..Default::default()
        };
        for (n, decay) in [(37usize, true), (100_003, false), (70_001, true)] {
            let init: Vec<f32> = (0..n).map(|i| val(i, 1)).collect();
            let fused = vec![param("w", &init, decay)];
            let reference = param("w", &init, decay);
            let mut opt = AdamW::new(&fused, cfg).unwrap();
            let (mut m, mut v) = (
                Tensor::zeros(n, DType::F32, &Device::Cpu).unwrap(),
                Tensor::zeros(n, DType::F32, &Device::Cpu).unwrap(),
            );
            for step in 1..=3u64 {
                let g: Vec<f32> = (0..n)
                    .map(|i| match i % 11 {
                        0 => 0.0,
                        1 => 300.0 * val(i, step as u32),
                        _ => val(i, step as u32 + 7),
                    })
                    .collect();
                let g = Tensor::new(g.as_slice(), &Device::Cpu).unwrap();
                let lr = 1e-3 * step as f64;
                let grads = Gradients {
                    grads: vec![Some(g.clone())],
                };
                opt.step(&fused, &grads, lr).unwrap();
                let c = StepConstants::new(&cfg, step, lr, decay);
                (m, v) = reference_step(&reference, &m, &v, &g, &c).unwrap();
                let bits = |t: &Tensor| -> Vec<u32> {
                    t.to_vec1::<f32>()
                        .unwrap()
                        .iter()
                        .map(|x| x.to_bits())
                        .collect()
                };
                assert_eq!(
                    bits(fused[0].var.as_tensor()),
                    bits(reference.var.as_tensor()),
                    "n={n} step {step}: weights"
                );
                assert_eq!(
                    bits(&opt.exp_avg[0]),
                    bits(&m),
                    "n={n} step {step}: exp_avg"
                );
                assert_eq!(
                    bits(&opt.exp_avg_sq[0]),
                    bits(&v),
                    "n={n} step {step}: exp_avg_sq"
                );
            }
        }
    }

    /// Exported and cloned state is a snapshot: later steps do not change it.
    #[test]
    fn exported_state_does_not_follow_later_steps() {
        let params = vec![param("w", &[0.5, -1.0], true)];
        let mut opt = AdamW::new(&params, AdamWConfig::default()).unwrap();
        let grads = Gradients {
            grads: vec![Some(Tensor::new(&[0.2f32, -0.4], &Device::Cpu).unwrap())],
        };
        opt.step(&params, &grads, 0.1).unwrap();
        let saved = opt.export(&params).unwrap();
        let copy = opt.clone();
        let before = saved["exp_avg.w"].to_vec1::<f32>().unwrap();
        opt.step(&params, &grads, 0.1).unwrap();
        assert_eq!(saved["exp_avg.w"].to_vec1::<f32>().unwrap(), before);
        assert_eq!(copy.exp_avg[0].to_vec1::<f32>().unwrap(), before);
        assert_ne!(opt.exp_avg[0].to_vec1::<f32>().unwrap(), before);
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
