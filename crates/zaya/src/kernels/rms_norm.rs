//! Fused RMSNorm: one pass per row for the statistics and the output, rows spread over the
//! kernel pool. Reproduces the reference's cast of the normalised value back to the input
//! dtype before the weight multiply. The backward is fused as well.

use candle_core::backend::BackendStorage;
use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, D};
use half::bf16;

use super::cpu::{self, f32_view, host_f32_ref, round_to, storage_from_f32, tensor_from_f32};
use super::KernelError;

const OP: &str = "rms_norm";

#[inline(always)]
fn scale_row_bf16_body(x: &[f32], inv: f32, w: &[f32], o: &mut [MaybeUninit<bf16>]) {
    for ((o, &xv), &wv) in o.iter_mut().zip(x).zip(w) {
        o.write(cpu::narrow_bf16(cpu::round_bf16(xv * inv) * wv));
    }
}

cpu::simd_dispatch! {
    /// One bf16 output row: `bf16(bf16(x·inv)·w)`, at the CPU's vector width.
    fn scale_row_bf16(x: &[f32], inv: f32, w: &[f32], o: &mut [MaybeUninit<bf16>]) => scale_row_bf16_body
}

struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "zaya-rms-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dtype = xs.dtype();
        let h = xl.dims().last().copied().unwrap_or(0);
        let w = f32_view(ws, wl, OP)?;
        // every output element is written through a zip with `w` (`collect_rows`' contract)
        if w.len() != h || !xl.shape().elem_count().is_multiple_of(h.max(1)) {
            return Err(KernelError::Shape {
                op: OP,
                message: format!("weight of {} for rows of {h}", w.len()),
            }
            .into());
        }
        let eps = self.eps;
        let inv_rms = |xr: &[f32]| 1.0 / (cpu::sum_sq(xr) / h as f32 + eps).sqrt();
        // bf16 rows in, bf16 rows out, each row widened once into a scratch row: the same
        // values as the f32 path below followed by its rounding, in one pass over memory
        if let (CpuStorage::BF16(d), Some((a, b))) = (xs, xl.contiguous_offsets()) {
            let x = &d[a..b];
            let out = cpu::collect_rows(x.len(), h, |r, o| {
                let xr = cpu::widen_row(&x[r * h..(r + 1) * h]);
                scale_row_bf16(&xr, inv_rms(&xr), &w, o);
            });
            return Ok((CpuStorage::BF16(out), xl.shape().clone()));
        }
        let x = f32_view(xs, xl, OP)?;
        let out = cpu::collect_rows(x.len(), h, |r, o| {
            let xr = &x[r * h..(r + 1) * h];
            let inv = inv_rms(xr);
            for ((o, &xv), &wv) in o.iter_mut().zip(xr).zip(w.iter()) {
                o.write(round_to(dtype, xv * inv) * wv);
            }
        });
        Ok((storage_from_f32(out, dtype, OP)?, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dtype = x.dtype();
        let h = x.dim(D::Minus1)?;
        let xh = host_f32_ref(x)?;
        let wh = host_f32_ref(w)?;
        let gh = host_f32_ref(grad)?;
        let rows = xh.len().checked_div(h).unwrap_or(0);
        let eps = self.eps;
        // Rows are split into one block per thread; each block returns its dx rows and its
        // partial dw, summed afterwards.
        let blocks = cpu::num_threads().min(rows).max(1);
        let per = rows.div_ceil(blocks);
        let parts = cpu::par_map(blocks, xh.len() * 8, |blk| {
            let r0 = (blk * per).min(rows);
            let r1 = ((blk + 1) * per).min(rows);
            let mut dx = vec![0f32; (r1 - r0) * h];
            let mut dw = vec![0f32; h];
            for r in r0..r1 {
                let xr = &xh[r * h..(r + 1) * h];
                let gr = &gh[r * h..(r + 1) * h];
                let inv = 1.0 / (cpu::sum_sq(xr) / h as f32 + eps).sqrt();
                // y = round(x·inv)·w: dn = g·w; dx = inv·(dn − n·mean(dn·n)).
                let mut dot = 0f32;
                for j in 0..h {
                    let n = xr[j] * inv;
                    dot += gr[j] * wh[j] * n;
                    dw[j] += gr[j] * round_to(dtype, n);
                }
                let mean = dot / h as f32;
                let dxr = &mut dx[(r - r0) * h..(r - r0 + 1) * h];
                for j in 0..h {
                    let n = xr[j] * inv;
                    dxr[j] = inv * (gr[j] * wh[j] - n * mean);
                }
            }
            (dx, dw)
        });
        let mut dx = Vec::with_capacity(xh.len());
        let mut dw = vec![0f32; h];
        for (px, pw) in parts {
            dx.extend_from_slice(&px);
            for (a, b) in dw.iter_mut().zip(&pw) {
                *a += b;
            }
        }
        let dx = x
            .track_op()
            .then(|| tensor_from_f32(dx, x.shape(), dtype, x))
            .transpose()?;
        let dw = w
            .track_op()
            .then(|| tensor_from_f32(dw, w.shape(), w.dtype(), w))
            .transpose()?;
        Ok((dx, dw))
    }
}

pub(super) fn fused(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let h = x.dim(D::Minus1)?;
    if weight.dims() != [h] {
        return Err(KernelError::Shape {
            op: OP,
            message: format!("weight must be [{h}], got {:?}", weight.dims()),
        }
        .into());
    }
    if weight.dtype() != x.dtype() {
        return Err(KernelError::Shape {
            op: OP,
            message: format!(
                "weight dtype {:?} differs from input dtype {:?}",
                weight.dtype(),
                x.dtype()
            ),
        }
        .into());
    }
    x.apply_op2(weight, RmsNorm { eps: eps as f32 })
}
