//! Fused residual-scale merge of a decoder layer:
//! `y = f32((sub + b_h) ⊙ s_h) + (res + b_r) ⊙ s_r`, one pass per row. The sublayer term is
//! rounded to the parameter dtype after each op as the reference does, the residual term and
//! the sum are f32. The backward computes the two input gradients and the four parameter
//! gradients (row sums) in one pass.

use std::mem::MaybeUninit;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D};
use half::bf16;
use rayon::prelude::*;

use super::cpu::{self, f32_view, round_to, tensor_from_f32, with_cpu_storage};
use super::KernelError;

const OP: &str = "residual_scale";

/// One element of the merge: the sublayer term rounded after each op by `round`, the
/// residual term and the sum in f32.
#[inline(always)]
fn merge(round: impl Fn(f32) -> f32, s: f32, x: f32, [bh, sh, br, sr]: [f32; 4]) -> f32 {
    round(round(s + bh) * sh) + (x + br) * sr
}

/// The forward's rows; generic over the rounding so each dtype gets its own loop with the
/// rounding inlined (the loop vectorises).
fn merge_rows(
    round: impl Fn(f32) -> f32 + Sync,
    sub: &[f32],
    res: &[f32],
    [bh, sh, br, sr]: [&[f32]; 4],
) -> Vec<f32> {
    let h = bh.len();
    cpu::collect_rows(res.len(), h, |r, o| {
        let s = &sub[r * h..(r + 1) * h];
        let x = &res[r * h..(r + 1) * h];
        for j in 0..h {
            o[j].write(merge(&round, s[j], x[j], [bh[j], sh[j], br[j], sr[j]]));
        }
    })
}

/// [`merge_rows`]' row for a sublayer output of element type `S` read in place (widened
/// with `to_f32`, its terms rounded to `S` as the reference rounds them), inlined into each
/// dispatched variant below so it runs at the CPU's vector width: the generic loop,
/// compiled for the baseline target with the dtype's rounding behind a branch per element,
/// ran at a few GB/s (3.5 % of a medium f32 prefill).
#[inline(always)]
fn merge_row_body<S: cpu::Elem>(
    s: &[S],
    x: &[f32],
    bh: &[f32],
    sh: &[f32],
    br: &[f32],
    sr: &[f32],
    o: &mut [MaybeUninit<f32>],
) {
    let h = o.len();
    let (s, x, bh, sh, br, sr) = (&s[..h], &x[..h], &bh[..h], &sh[..h], &br[..h], &sr[..h]);
    for j in 0..h {
        let p = [bh[j], sh[j], br[j], sr[j]];
        o[j].write(merge(S::round, s[j].to_f32(), x[j], p));
    }
}

cpu::simd_dispatch! {
    fn merge_row_f32(
        s: &[f32],
        x: &[f32],
        bh: &[f32],
        sh: &[f32],
        br: &[f32],
        sr: &[f32],
        o: &mut [MaybeUninit<f32>]
    ) => merge_row_body
}

cpu::simd_dispatch! {
    fn merge_row_bf16(
        s: &[bf16],
        x: &[f32],
        bh: &[f32],
        sh: &[f32],
        br: &[f32],
        sr: &[f32],
        o: &mut [MaybeUninit<f32>]
    ) => merge_row_body
}

/// Rows per parallel task of the backward (its parameter partial sums are per task).
fn rows_per_task(rows: usize, h: usize) -> usize {
    let threads = cpu::num_threads().max(1);
    // At least ~16k elements per task, at most one task per thread.
    rows.div_ceil(threads).max((1 << 14) / h.max(1)).max(1)
}

/// The merge's rows: `sub` in its dtype, `res` f32, `params` `b_h, s_h, b_r, s_r` (each
/// `[H]`, widened to f32).
fn forward_rows(
    ss: &CpuStorage,
    sl: &Layout,
    rs: &CpuStorage,
    rl: &Layout,
    params: [&[f32]; 4],
) -> Result<(CpuStorage, Shape)> {
    let dtype = ss.dtype();
    let h = sl.dims().last().copied().unwrap_or(0);
    let res = f32_view(rs, rl, OP)?;
    let [bh, sh, br, sr] = params;
    if sl.shape() != rl.shape() {
        return Err(KernelError::Shape {
            op: OP,
            message: format!("sub {:?} and res {:?} differ", sl.dims(), rl.dims()),
        }
        .into());
    }
    let out = match (ss, sl.contiguous_offsets()) {
        // a bf16 sublayer output is read where it is, widened as each row is merged
        (CpuStorage::BF16(d), Some((a, b))) => {
            let sub = &d[a..b];
            cpu::collect_rows(res.len(), h, |r, o| {
                let rows = r * h..(r + 1) * h;
                merge_row_bf16(&sub[rows.clone()], &res[rows], bh, sh, br, sr, o)
            })
        }
        (CpuStorage::F32(d), Some((a, b))) => {
            let sub = &d[a..b];
            cpu::collect_rows(res.len(), h, |r, o| {
                let rows = r * h..(r + 1) * h;
                merge_row_f32(&sub[rows.clone()], &res[rows], bh, sh, br, sr, o)
            })
        }
        _ => {
            let sub = f32_view(ss, sl, OP)?;
            match dtype {
                DType::BF16 => merge_rows(cpu::round_bf16, &sub, &res, params),
                _ => merge_rows(|v| round_to(dtype, v), &sub, &res, params),
            }
        }
    };
    Ok((CpuStorage::F32(out), sl.shape().clone()))
}

/// `sub` `[.., H]` (parameter dtype), `res` `[.., H]` f32, `params` `[4, H]` (parameter dtype):
/// rows `b_h`, `s_h`, `b_r`, `s_r`.
struct ResidualScale;

impl CustomOp3 for ResidualScale {
    fn name(&self) -> &'static str {
        "zaya-residual-scale"
    }

    fn cpu_fwd(
        &self,
        ss: &CpuStorage,
        sl: &Layout,
        rs: &CpuStorage,
        rl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let h = sl.dims().last().copied().unwrap_or(0);
        let p = f32_view(ps, pl, OP)?;
        let params = [&p[..h], &p[h..2 * h], &p[2 * h..3 * h], &p[3 * h..]];
        forward_rows(ss, sl, rs, rl, params)
    }

    fn bwd(
        &self,
        sub: &Tensor,
        res: &Tensor,
        params: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dtype = sub.dtype();
        let h = sub.dim(D::Minus1)?;
        let rows = sub.elem_count().checked_div(h).unwrap_or(0);
        let per = rows_per_task(rows, h);
        let mut dsub = vec![0f32; rows * h];
        let mut dres = vec![0f32; rows * h];
        let partials: Vec<Vec<f32>> = with_cpu_storage(sub, OP, |ss, sl| {
            with_cpu_storage(res, OP, |rs, rl| {
                with_cpu_storage(params, OP, |ps, pl| {
                    with_cpu_storage(grad, OP, |gs, gl| {
                        let sub = f32_view(ss, sl, OP)?;
                        let res = f32_view(rs, rl, OP)?;
                        let p = f32_view(ps, pl, OP)?;
                        let g = f32_view(gs, gl, OP)?;
                        let (bh, sh, br, sr) =
                            (&p[..h], &p[h..2 * h], &p[2 * h..3 * h], &p[3 * h..]);
                        let task = |(t, (ds, dr)): (usize, (&mut [f32], &mut [f32]))| {
                            // d b_h, d s_h, d b_r, d s_r of this task's rows.
                            let mut acc = vec![0f32; 4 * h];
                            let (abh, rest) = acc.split_at_mut(h);
                            let (ash, rest) = rest.split_at_mut(h);
                            let (abr, asr) = rest.split_at_mut(h);
                            let r0 = t * per;
                            for (i, (dsr, drr)) in
                                ds.chunks_mut(h).zip(dr.chunks_mut(h)).enumerate()
                            {
                                let r = r0 + i;
                                let s = &sub[r * h..(r + 1) * h];
                                let x = &res[r * h..(r + 1) * h];
                                let gr = &g[r * h..(r + 1) * h];
                                for j in 0..h {
                                    let gj = gr[j];
                                    let gs = round_to(dtype, gj) * sh[j];
                                    dsr[j] = gs;
                                    abh[j] += gs;
                                    ash[j] += gj * round_to(dtype, s[j] + bh[j]);
                                    let gr_ = gj * sr[j];
                                    drr[j] = gr_;
                                    abr[j] += gr_;
                                    asr[j] += gj * (x[j] + br[j]);
                                }
                            }
                            acc
                        };
                        let chunk = per * h;
                        Ok(if rows > per {
                            cpu::in_pool(|| {
                                dsub.par_chunks_mut(chunk)
                                    .zip(dres.par_chunks_mut(chunk))
                                    .enumerate()
                                    .map(task)
                                    .collect()
                            })
                        } else {
                            vec![task((0, (&mut dsub[..], &mut dres[..])))]
                        })
                    })
                })
            })
        })?;
        let mut dp = vec![0f32; 4 * h];
        for part in &partials {
            for (a, b) in dp.iter_mut().zip(part) {
                *a += b;
            }
        }
        let dsub = sub
            .track_op()
            .then(|| tensor_from_f32(dsub, sub.shape(), dtype, sub))
            .transpose()?;
        let dres = res
            .track_op()
            .then(|| tensor_from_f32(dres, res.shape(), DType::F32, res))
            .transpose()?;
        let dp = params
            .track_op()
            .then(|| tensor_from_f32(dp, params.shape(), params.dtype(), params))
            .transpose()?;
        Ok((dsub, dres, dp))
    }
}

pub(super) fn fused(
    sub: &Tensor,
    residual: &Tensor,
    sub_bias: &Tensor,
    sub_scale: &Tensor,
    res_bias: &Tensor,
    res_scale: &Tensor,
) -> Result<Tensor> {
    let h = sub.dim(D::Minus1)?;
    let bad =
        |message: String| -> candle_core::Error { KernelError::Shape { op: OP, message }.into() };
    if h == 0 {
        return Err(bad(format!("empty hidden axis in {:?}", sub.dims())));
    }
    if residual.dims() != sub.dims() {
        return Err(bad(format!(
            "residual {:?} and sublayer output {:?} differ in shape",
            residual.dims(),
            sub.dims()
        )));
    }
    if residual.dtype() != DType::F32 {
        return Err(bad(format!(
            "the residual stream must be f32, got {:?}",
            residual.dtype()
        )));
    }
    for (name, p) in [
        ("hidden_states_bias", sub_bias),
        ("hidden_states_scale", sub_scale),
        ("residual_bias", res_bias),
        ("residual_scale", res_scale),
    ] {
        if p.dims() != [h] || p.dtype() != sub.dtype() {
            return Err(bad(format!(
                "{name} must be [{h}] of {:?}, got {:?} of {:?}",
                sub.dtype(),
                p.dims(),
                p.dtype()
            )));
        }
    }
    let params = [sub_bias, sub_scale, res_bias, res_scale];
    if !sub.track_op() && !residual.track_op() && params.iter().all(|p| !p.track_op()) {
        // Nothing to differentiate (inference, rollouts): the parameters are read where
        // they are. Stacking them cost an allocation and four copies per merge, about 1 %
        // of a batch-1 decode step of the small model and of the q4_k 8B.
        let op = ResidualScaleNoGraph(params.map(Tensor::clone));
        return sub.apply_op2_no_bwd(residual, &op);
    }
    // One [4, H] operand (a differentiable stack) so the op has three inputs.
    let params = Tensor::stack(&params, 0)?;
    sub.apply_op3(residual, &params, ResidualScale)
}

/// [`ResidualScale`] without a graph: `sub`, `res` and the four `[H]` parameters as they
/// are (clones sharing their storage, so in-place weight updates are seen).
struct ResidualScaleNoGraph([Tensor; 4]);

impl CustomOp2 for ResidualScaleNoGraph {
    fn name(&self) -> &'static str {
        "zaya-residual-scale-no-graph"
    }

    fn cpu_fwd(
        &self,
        ss: &CpuStorage,
        sl: &Layout,
        rs: &CpuStorage,
        rl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let guards: Vec<_> = self.0.iter().map(|p| p.storage_and_layout()).collect();
        let views = guards
            .iter()
            .map(|(st, l)| match &**st {
                candle_core::Storage::Cpu(c) => f32_view(c, l, OP),
                other => Err(KernelError::Shape {
                    op: OP,
                    message: format!("parameter on {:?}, input on the CPU", other.device()),
                }
                .into()),
            })
            .collect::<Result<Vec<_>>>()?;
        forward_rows(ss, sl, rs, rl, [&views[0], &views[1], &views[2], &views[3]])
    }
}
