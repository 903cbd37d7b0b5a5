//! Fused EDA step of the ZAYA1 router (exponential depth averaging):
//! `ρ = ρ̃ + ρ_prev ⊙ σ` with `σ` `[R]` the layer's `router_states_scale`, one pass per row;
//! the backward passes the upstream gradient to `ρ̃` as is and computes `d ρ_prev` and the
//! row sum `d σ` in one pass (the reference's broadcast multiply reduces `d σ` with a
//! strided sum).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use super::cpu::{self, f32_view, storage_from_f32, tensor_from_f32, with_cpu_storage};
use super::KernelError;

const OP: &str = "router_eda";

struct RouterEda;

impl CustomOp3 for RouterEda {
    fn name(&self) -> &'static str {
        "zaya-router-eda"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dtype = xs.dtype();
        let r = xl.dims().last().copied().unwrap_or(0);
        let x = f32_view(xs, xl, OP)?;
        let prev = f32_view(ps, pl, OP)?;
        let scale = f32_view(ss, sl, OP)?;
        let mut out = vec![0f32; x.len()];
        cpu::par_chunks_mut(&mut out, r, |i, o| {
            let xr = &x[i * r..(i + 1) * r];
            let pr = &prev[i * r..(i + 1) * r];
            for j in 0..r {
                // Rounded like the reference's two ops in a reduced-precision dtype.
                o[j] = xr[j] + cpu::round_to(dtype, pr[j] * scale[j]);
            }
        });
        Ok((storage_from_f32(out, dtype, OP)?, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        prev: &Tensor,
        scale: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let r = x.dim(D::Minus1)?;
        let rows = x.elem_count() / r.max(1);
        let per = rows
            .div_ceil(cpu::num_threads().max(1))
            .max((1 << 14) / r.max(1))
            .max(1);
        let mut dprev = vec![0f32; rows * r];
        let partials: Vec<Vec<f32>> = with_cpu_storage(prev, OP, |ps, pl| {
            with_cpu_storage(scale, OP, |ss, sl| {
                with_cpu_storage(grad, OP, |gs, gl| {
                    let p = f32_view(ps, pl, OP)?;
                    let s = f32_view(ss, sl, OP)?;
                    let g = f32_view(gs, gl, OP)?;
                    let task = |(t, dp): (usize, &mut [f32])| {
                        let mut ds = vec![0f32; r];
                        for (i, dpr) in dp.chunks_mut(r).enumerate() {
                            let row = t * per + i;
                            let gr = &g[row * r..(row + 1) * r];
                            let pr = &p[row * r..(row + 1) * r];
                            for j in 0..r {
                                dpr[j] = gr[j] * s[j];
                                ds[j] += gr[j] * pr[j];
                            }
                        }
                        ds
                    };
                    Ok(if rows > per {
                        cpu::in_pool(|| {
                            dprev
                                .par_chunks_mut(per * r)
                                .enumerate()
                                .map(task)
                                .collect()
                        })
                    } else {
                        vec![task((0, &mut dprev[..]))]
                    })
                })
            })
        })?;
        let mut dscale = vec![0f32; r];
        for part in &partials {
            for (a, b) in dscale.iter_mut().zip(part) {
                *a += b;
            }
        }
        // y = x + (…): the upstream gradient is x's gradient, unchanged.
        let dx = x.track_op().then(|| grad.to_dtype(x.dtype())).transpose()?;
        let dprev = prev
            .track_op()
            .then(|| tensor_from_f32(dprev, prev.shape(), prev.dtype(), prev))
            .transpose()?;
        let dscale = scale
            .track_op()
            .then(|| tensor_from_f32(dscale, scale.shape(), scale.dtype(), scale))
            .transpose()?;
        Ok((dx, dprev, dscale))
    }
}

pub(super) fn fused(x: &Tensor, prev: &Tensor, scale: &Tensor) -> Result<Tensor> {
    let r = x.dim(D::Minus1)?;
    let bad =
        |message: String| -> candle_core::Error { KernelError::Shape { op: OP, message }.into() };
    if r == 0 {
        return Err(bad(format!("empty router axis in {:?}", x.dims())));
    }
    if prev.dims() != x.dims() || prev.dtype() != x.dtype() {
        return Err(bad(format!(
            "previous state {:?} of {:?} does not match the state {:?} of {:?}",
            prev.dims(),
            prev.dtype(),
            x.dims(),
            x.dtype()
        )));
    }
    if scale.dims() != [r] || scale.dtype() != x.dtype() {
        return Err(bad(format!(
            "router_states_scale must be [{r}] of {:?}, got {:?} of {:?}",
            x.dtype(),
            scale.dims(),
            scale.dtype()
        )));
    }
    x.apply_op3(prev, scale, RouterEda)
}
