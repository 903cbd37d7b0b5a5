//! Fused bias add of the linear layers, `y + b` over the last axis: one pass on the kernel
//! pool (where the calling thread can take all the work, instead of waiting for a fixed
//! helper thread as candle's element-wise ops do); the backward hands the upstream
//! gradient to `y` unchanged and sums it over the rows for `b` in one pass.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use super::cpu::{self, f32_view, storage_from_f32, tensor_from_f32, with_cpu_storage};

const OP: &str = "bias_add";

struct BiasAdd;

impl CustomOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "zaya-bias-add"
    }

    fn cpu_fwd(
        &self,
        ys: &CpuStorage,
        yl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let n = yl.dims().last().copied().unwrap_or(0);
        let mut out = f32_view(ys, yl, OP)?.into_owned();
        let b = f32_view(bs, bl, OP)?;
        cpu::par_chunks_mut(&mut out, n, |_, row| {
            for (o, bv) in row.iter_mut().zip(b.iter()) {
                *o += bv;
            }
        });
        Ok((storage_from_f32(out, ys.dtype(), OP)?, yl.shape().clone()))
    }

    fn bwd(
        &self,
        y: &Tensor,
        bias: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = y.track_op().then(|| grad.to_dtype(y.dtype())).transpose()?;
        let db = if bias.track_op() {
            let n = bias.dim(D::Minus1)?;
            let rows = grad.elem_count() / n.max(1);
            let per = rows
                .div_ceil(cpu::num_threads().max(1))
                .max((1 << 14) / n.max(1))
                .max(1);
            let sums = with_cpu_storage(grad, OP, |gs, gl| {
                let g = f32_view(gs, gl, OP)?;
                let block = |c: &[f32]| {
                    let mut acc = vec![0f32; n];
                    for row in c.chunks(n) {
                        for (a, v) in acc.iter_mut().zip(row) {
                            *a += v;
                        }
                    }
                    acc
                };
                Ok(if rows > per {
                    cpu::in_pool(|| g.par_chunks(per * n).map(block).collect::<Vec<_>>())
                } else {
                    vec![block(&g)]
                })
            })?;
            let mut db = vec![0f32; n];
            for part in &sums {
                for (a, b) in db.iter_mut().zip(part) {
                    *a += b;
                }
            }
            Some(tensor_from_f32(db, bias.shape(), bias.dtype(), bias)?)
        } else {
            None
        };
        Ok((dy, db))
    }
}

/// `y + bias` (bias `[N]`, `y` `[.., N]`). Operands the fused op does not take (another
/// shape or dtype) go to the reference, which reports or handles them as before.
pub(super) fn fused(y: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let n = y.dim(D::Minus1)?;
    if n == 0 || bias.dims() != [n] || bias.dtype() != y.dtype() {
        return super::reference::bias_add(y, bias);
    }
    y.apply_op2(bias, BiasAdd)
}
