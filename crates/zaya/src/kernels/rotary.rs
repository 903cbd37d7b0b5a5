//! Fused partial rotate-half RoPE on `[B, heads, T, D]`: each output row is written once,
//! pairs `(i, i + rd/2)` rotated in registers, the tail copied. Rows are spread over the
//! kernel pool. The backward is the inverse rotation (plus cos/sin gradients when those
//! are tracked, which the model never does but a user might).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::cpu::{self, f32_view, host_f32, storage_from_f32, tensor_from_f32};
use super::KernelError;

const OP: &str = "rotary";

#[derive(Clone, Copy)]
struct Geometry {
    b: usize,
    h: usize,
    t: usize,
    d: usize,
    rd: usize,
    /// Batch of cos/sin: 1 (shared) or `b`.
    bc: usize,
}

impl Geometry {
    fn new(x: &[usize], cos: &[usize], sin: &[usize]) -> Result<Geometry> {
        let bad = |message: String| -> candle_core::Error {
            KernelError::Shape { op: OP, message }.into()
        };
        let [b, h, t, d] = x else {
            return Err(bad(format!("x must be [B, heads, T, D], got {x:?}")));
        };
        let [bc, tc, rd] = cos else {
            return Err(bad(format!("cos must be [B or 1, T, rd], got {cos:?}")));
        };
        if cos != sin {
            return Err(bad(format!("cos {cos:?} and sin {sin:?} differ")));
        }
        if (*bc != 1 && bc != b) || tc != t || rd > d || !rd.is_multiple_of(2) {
            return Err(bad(format!(
                "cos/sin {cos:?} do not fit x {x:?} (need [1 or {b}, {t}, even rd <= {d}])"
            )));
        }
        Ok(Geometry {
            b: *b,
            h: *h,
            t: *t,
            d: *d,
            rd: *rd,
            bc: *bc,
        })
    }

    /// Offset of the cos/sin row for x row `r` (rows ordered b, h, t).
    #[inline]
    fn table_row(&self, r: usize) -> usize {
        let t = r % self.t;
        let b = r / (self.t * self.h);
        let b = if self.bc == 1 { 0 } else { b };
        (b * self.t + t) * self.rd
    }
}

/// `out = R x` (or `Rᵀ x` with `transpose`), with `R` the per-position rotation built from
/// the cos/sin rows (each half of the table is used as given; RoPE tables repeat it).
fn rotate(x: &[f32], cos: &[f32], sin: &[f32], g: Geometry, transpose: bool) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    let half = g.rd / 2;
    cpu::par_chunks_mut(&mut out, g.d, |r, o| {
        let xr = &x[r * g.d..(r + 1) * g.d];
        let off = g.table_row(r);
        let (c, s) = (&cos[off..off + g.rd], &sin[off..off + g.rd]);
        for i in 0..half {
            let (x1, x2) = (xr[i], xr[i + half]);
            if transpose {
                o[i] = x1 * c[i] + x2 * s[i + half];
                o[i + half] = x2 * c[i + half] - x1 * s[i];
            } else {
                o[i] = x1 * c[i] - x2 * s[i];
                o[i + half] = x2 * c[i + half] + x1 * s[i + half];
            }
        }
        o[g.rd..].copy_from_slice(&xr[g.rd..]);
    });
    out
}

struct Rotary;

impl CustomOp3 for Rotary {
    fn name(&self) -> &'static str {
        "zaya-rotary"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        cs: &CpuStorage,
        cl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = Geometry::new(xl.dims(), cl.dims(), sl.dims())?;
        let x = f32_view(xs, xl, OP)?;
        let cos = f32_view(cs, cl, OP)?;
        let sin = f32_view(ss, sl, OP)?;
        let out = rotate(&x, &cos, &sin, g, false);
        Ok((storage_from_f32(out, xs.dtype(), OP)?, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = Geometry::new(x.dims(), cos.dims(), sin.dims())?;
        let gh = host_f32(grad)?;
        let ch = host_f32(cos)?;
        let sh = host_f32(sin)?;
        let dx = x
            .track_op()
            .then(|| tensor_from_f32(rotate(&gh, &ch, &sh, g, true), x.shape(), x.dtype(), x))
            .transpose()?;
        let (dcos, dsin) = if cos.track_op() || sin.track_op() {
            // dcos_i = Σ g_i·x_i, dsin_i = Σ g_i·rot(x)_i over heads (and batch if shared).
            let xh = host_f32(x)?;
            let mut dc = vec![0f32; ch.len()];
            let mut ds = vec![0f32; sh.len()];
            let half = g.rd / 2;
            for r in 0..g.b * g.h * g.t {
                let off = g.table_row(r);
                let xr = &xh[r * g.d..(r + 1) * g.d];
                let gr = &gh[r * g.d..(r + 1) * g.d];
                for i in 0..half {
                    dc[off + i] += gr[i] * xr[i];
                    dc[off + i + half] += gr[i + half] * xr[i + half];
                    ds[off + i] -= gr[i] * xr[i + half];
                    ds[off + i + half] += gr[i + half] * xr[i];
                }
            }
            (
                cos.track_op()
                    .then(|| tensor_from_f32(dc, cos.shape(), cos.dtype(), cos))
                    .transpose()?,
                sin.track_op()
                    .then(|| tensor_from_f32(ds, sin.shape(), sin.dtype(), sin))
                    .transpose()?,
            )
        } else {
            (None, None)
        };
        Ok((dx, dcos, dsin))
    }
}

pub(super) fn fused(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if cos.dtype() != x.dtype() || sin.dtype() != x.dtype() {
        return Err(KernelError::Shape {
            op: OP,
            message: format!(
                "cos/sin dtype {:?}/{:?} differ from x dtype {:?}",
                cos.dtype(),
                sin.dtype(),
                x.dtype()
            ),
        }
        .into());
    }
    if cos.dims().last() == Some(&0) {
        return Ok(x.clone());
    }
    x.apply_op3(cos, sin, Rotary)
}
