//! Fused exact GELU, `½ x (1 + erf(x / √2))` (the router MLP's activation), with the
//! derivative `½ (1 + erf(x / √2)) + x · φ(x)` (`φ` the standard normal density) in one pass
//! instead of the dozen element-wise ops of the reference's autograd graph.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use super::cpu::{self, f32_view, storage_from_f32, tensor_from_f32, with_cpu_storage};

const OP: &str = "gelu_erf";

/// `1 / √(2π)`.
const INV_SQRT_2PI: f32 = 0.398_942_3;

/// As candle's `gelu_erf` on f32 (the reference): the same expression and `erf`.
#[inline]
fn gelu(x: f32) -> f32 {
    (candle_core::cpu::erf::erf_f32(x * std::f32::consts::FRAC_1_SQRT_2) + 1.) * 0.5 * x
}

#[inline]
fn gelu_grad(x: f32) -> f32 {
    let cdf = 0.5 * (1.0 + candle_core::cpu::erf::erf_f32(x * std::f32::consts::FRAC_1_SQRT_2));
    cdf + x * INV_SQRT_2PI * (-0.5 * x * x).exp()
}

struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "zaya-gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let mut out = f32_view(s, l, OP)?.into_owned();
        cpu::par_chunks_mut(&mut out, 1024, |_, c| {
            for v in c.iter_mut() {
                *v = gelu(*v);
            }
        });
        Ok((storage_from_f32(out, s.dtype(), OP)?, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let mut dx = with_cpu_storage(grad, OP, |gs, gl| Ok(f32_view(gs, gl, OP)?.into_owned()))?;
        with_cpu_storage(x, OP, |xs, xl| {
            let xv = f32_view(xs, xl, OP)?;
            cpu::par_chunks_mut(&mut dx, 1024, |i, c| {
                let xc = &xv[i * 1024..];
                for (g, &x) in c.iter_mut().zip(xc) {
                    *g *= gelu_grad(x);
                }
            });
            Ok(())
        })?;
        Ok(Some(tensor_from_f32(dx, x.shape(), x.dtype(), x)?))
    }
}

pub(super) fn fused(x: &Tensor) -> Result<Tensor> {
    x.apply_op1(Gelu)
}
