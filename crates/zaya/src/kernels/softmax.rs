//! Fused softmax over the last axis: f32 arithmetic, one rounding to the input dtype,
//! vectorised exp, rows spread over the kernel pool; fused backward.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, D};

use super::cpu::{self, f32_view, host_f32, storage_from_f32, tensor_from_f32};

const OP: &str = "softmax";

struct Softmax;

/// Softmax of one row in place. A row whose maximum is not finite (all `−∞`, or a `+∞`/NaN
/// entry) becomes NaN, as the reference's `x − max` does.
fn softmax_row(row: &mut [f32]) {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !m.is_finite() || row.iter().any(|v| v.is_nan()) {
        row.fill(f32::NAN);
        return;
    }
    let s = cpu::exp_sub_sum(row, m);
    let inv = 1.0 / s;
    for v in row.iter_mut() {
        *v *= inv;
    }
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "zaya-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let dtype = s.dtype();
        let n = l.dims().last().copied().unwrap_or(0);
        let mut out = f32_view(s, l, OP)?.into_owned();
        cpu::par_chunks_mut(&mut out, n, |_, row| softmax_row(row));
        Ok((storage_from_f32(out, dtype, OP)?, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let n = x.dim(D::Minus1)?;
        let yh = host_f32(y)?;
        let mut g = host_f32(grad)?;
        // dx = y ⊙ (g − Σ g·y), row by row, in place over g.
        cpu::par_chunks_mut(&mut g, n, |r, gr| {
            let yr = &yh[r * n..(r + 1) * n];
            let s = cpu::dot(gr, yr);
            for (gv, yv) in gr.iter_mut().zip(yr) {
                *gv = yv * (*gv - s);
            }
        });
        Ok(Some(tensor_from_f32(g, x.shape(), x.dtype(), x)?))
    }
}

pub(super) fn fused(x: &Tensor) -> Result<Tensor> {
    x.apply_op1(Softmax)
}
