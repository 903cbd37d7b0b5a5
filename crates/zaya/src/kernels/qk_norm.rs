//! Fused CCA query/key tail: the q/k mean residuals of the raw projections, the L2
//! normalisation of every head to length √D and the per-KV-head `temp` of the keys, in one
//! pass per token (architecture §5.4; [`super::reference::cca_qk_norm`] is the definition).
//!
//! Per token, with `G = Nq / Nkv` query heads per key head `g(h)`:
//! `q_pre[h] = z_q[h] + ½(q_raw[h] + k_raw[g(h)])`,
//! `k_pre[g] = z_k[g] + (1/G) Σ_{h∈g} ½(q_raw[h] + k_raw[g])`,
//! `q[h] = q_pre[h] · √D / max(‖q_pre[h]‖, ε)`, `k[g] = k_pre[g] · √D / max(‖k_pre[g]‖, ε) · temp[g]`.
//! The fused op writes `[q | k]` as one `[B, T, C]` tensor (the layout of its inputs) and
//! returns views of it. The backward recomputes the pre-norm heads and writes `dz`, `du`
//! and `d temp` in one pass.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{self, f32_view, storage_from_f32, tensor_from_f32, with_cpu_storage};
use super::KernelError;

const OP: &str = "cca_qk_norm";

#[derive(Clone, Copy)]
pub(super) struct Geometry {
    nq: usize,
    nkv: usize,
    d: usize,
}

impl Geometry {
    fn c(&self) -> usize {
        (self.nq + self.nkv) * self.d
    }

    fn groups(&self) -> usize {
        self.nq / self.nkv
    }

    /// The pre-norm heads of one token: `pre` gets `[q_pre (Nq·D) | k_pre (Nkv·D)]`.
    fn pre_norm(&self, z: &[f32], u: &[f32], pre: &mut [f32]) {
        let (nq, d, g) = (self.nq, self.d, self.groups());
        let kv0 = nq * d;
        let inv_g = 1.0 / g as f32;
        for kv in 0..self.nkv {
            let kr = &u[kv0 + kv * d..kv0 + (kv + 1) * d];
            let (qpre, kpre) = pre.split_at_mut(kv0);
            let kp = &mut kpre[kv * d..(kv + 1) * d];
            kp.fill(0.0);
            for h in kv * g..(kv + 1) * g {
                let qr = &u[h * d..(h + 1) * d];
                let zq = &z[h * d..(h + 1) * d];
                let qp = &mut qpre[h * d..(h + 1) * d];
                for j in 0..d {
                    let m = (qr[j] + kr[j]) * 0.5;
                    qp[j] = zq[j] + m;
                    kp[j] += m;
                }
            }
            let zk = &z[kv0 + kv * d..kv0 + (kv + 1) * d];
            for j in 0..d {
                kp[j] = zk[j] + kp[j] * inv_g;
            }
        }
    }
}

/// The reference's bf16 evaluation of one token, op by op: every elementwise op of
/// [`super::reference::cca_qk_norm`] rounds its result to bf16 (candle's bf16 arithmetic:
/// an f32 operation, then round to nearest even), `x · c` by a scalar is candle's affine
/// `x · bf16(c) + 0` (two roundings), and both sums (the group mean, the squared norm)
/// accumulate in bf16 in index order from zero, as candle's reductions over bf16 do. The
/// result is bit-identical to the reference in bf16, so greedy tokens of a bf16 model do not
/// change; `z`, `u` and `temp` hold bf16 values, `o` gets `[q | k]`.
#[inline(always)]
fn bf16_token_body(geo: &Geometry, z: &[f32], u: &[f32], temp: &[f32], eps: f32, o: &mut [f32]) {
    use cpu::round_bf16 as r;
    let (nq, nkv, d, g) = (geo.nq, geo.nkv, geo.d, geo.groups());
    let kv0 = nq * d;
    let inv_g = r(1.0 / g as f32);
    let sqrt_d = r((d as f32).sqrt());
    let e2 = r(eps * eps);
    let affine = |v: f32, c: f32| r(r(v * c) + 0.0);
    {
        let (qpre, kpre) = o.split_at_mut(kv0);
        for kv in 0..nkv {
            let kr = &u[kv0 + kv * d..kv0 + (kv + 1) * d];
            let kp = &mut kpre[kv * d..(kv + 1) * d];
            kp.fill(0.0);
            for h in kv * g..(kv + 1) * g {
                let qr = &u[h * d..(h + 1) * d];
                let zq = &z[h * d..(h + 1) * d];
                let qp = &mut qpre[h * d..(h + 1) * d];
                for j in 0..d {
                    let m = affine(r(qr[j] + kr[j]), 0.5);
                    qp[j] = r(zq[j] + m);
                    kp[j] = r(kp[j] + m);
                }
            }
            let zk = &z[kv0 + kv * d..kv0 + (kv + 1) * d];
            for j in 0..d {
                kp[j] = r(zk[j] + affine(kp[j], inv_g));
            }
        }
    }
    // Each head's squared norm is a chain of bf16 additions in index order. The heads'
    // chains run side by side (element j of every head, then j + 1): up to 16 heads as the
    // lanes of one vector, from a transposed copy of the row, otherwise interleaved so that
    // the CPU overlaps them instead of waiting on one chain's latency at a time. The same
    // sums either way, bit for bit.
    let heads = nq + nkv;
    let mut lanes = [0f32; LANES];
    let mut heap_sums = Vec::new();
    let sums: &[f32] = if heads <= LANES {
        let mut column = [0f32; LANES];
        for j in 0..d {
            for (h, c) in column.iter_mut().enumerate().take(heads) {
                *c = o[h * d + j];
            }
            for (ss, &v) in lanes.iter_mut().zip(&column) {
                *ss = r(*ss + r(v * v));
            }
        }
        &lanes[..heads]
    } else {
        heap_sums.resize(heads, 0f32);
        for j in 0..d {
            for (h, ss) in heap_sums.iter_mut().enumerate() {
                let v = o[h * d + j];
                *ss = r(*ss + r(v * v));
            }
        }
        &heap_sums
    };
    for (head, x) in o.chunks_mut(d).enumerate() {
        let ss = sums[head];
        // candle's maximum: `if a < b { b } else { a }`
        let n = r(if ss < e2 { e2 } else { ss }.sqrt());
        let f = affine(r(1.0 / n), sqrt_d);
        if head < nq {
            for v in x.iter_mut() {
                *v = r(*v * f);
            }
        } else {
            let t = temp[head - nq];
            for v in x.iter_mut() {
                *v = r(r(*v * f) * t);
            }
        }
    }
}

/// Heads whose squared-norm chains [`bf16_token`] runs as the lanes of one vector.
const LANES: usize = 16;

cpu::simd_dispatch! {
    /// [`bf16_token_body`] compiled for the CPU's vector width.
    fn bf16_token(geo: &Geometry, z: &[f32], u: &[f32], temp: &[f32], eps: f32, o: &mut [f32]) => bf16_token_body
}

/// `(Σ x², √D / max(‖x‖, ε))` of one head.
#[inline]
fn norm_factor(x: &[f32], eps: f32, sqrt_d: f32) -> (f32, f32) {
    let ss = cpu::sum_sq(x);
    let n = ss.max(eps * eps).sqrt();
    (ss, (1.0 / n) * sqrt_d)
}

/// `dp` for `y = p · f · t` (`f = √D / max(‖p‖, ε)`) and upstream `g`: `f·t·(g − p (p·g)/n²)`
/// where the norm is above the clamp, `f·t·g` below it, and half the correction on the
/// clamp itself (the reference's `maximum` splits a tie's gradient).
#[inline]
fn head_grad(p: &[f32], g: &[f32], ss: f32, f: f32, t: f32, eps: f32, dp: &mut [f32]) {
    let e2 = eps * eps;
    let w = if ss > e2 {
        1.0
    } else if ss == e2 {
        0.5
    } else {
        0.0
    };
    let n2 = ss.max(e2);
    let c = if w > 0.0 {
        w * cpu::dot(p, g) / n2
    } else {
        0.0
    };
    let ft = f * t;
    for j in 0..p.len() {
        dp[j] = ft * (g[j] - p[j] * c);
    }
}

struct QkNorm {
    geo: Geometry,
    eps: f32,
}

impl CustomOp3 for QkNorm {
    fn name(&self) -> &'static str {
        "zaya-cca-qk-norm"
    }

    fn cpu_fwd(
        &self,
        zs: &CpuStorage,
        zl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dtype = zs.dtype();
        let geo = self.geo;
        let (c, d, nq) = (geo.c(), geo.d, geo.nq);
        let z = f32_view(zs, zl, OP)?;
        let u = f32_view(us, ul, OP)?;
        let temp = f32_view(ts, tl, OP)?;
        let sqrt_d = (d as f32).sqrt();
        let eps = self.eps;
        let mut out = vec![0f32; z.len()];
        if dtype == DType::BF16 {
            cpu::par_chunks_mut(&mut out, c, |r, o| {
                bf16_token(
                    &geo,
                    &z[r * c..(r + 1) * c],
                    &u[r * c..(r + 1) * c],
                    &temp,
                    eps,
                    o,
                )
            });
            return Ok((storage_from_f32(out, dtype, OP)?, zl.shape().clone()));
        }
        cpu::par_chunks_mut(&mut out, c, |r, o| {
            geo.pre_norm(&z[r * c..(r + 1) * c], &u[r * c..(r + 1) * c], o);
            for (head, x) in o.chunks_mut(d).enumerate() {
                let (_, f) = norm_factor(x, eps, sqrt_d);
                if head < nq {
                    for v in x.iter_mut() {
                        *v *= f;
                    }
                } else {
                    let t = temp[head - nq];
                    for v in x.iter_mut() {
                        *v = (*v * f) * t;
                    }
                }
            }
        });
        Ok((storage_from_f32(out, dtype, OP)?, zl.shape().clone()))
    }

    fn bwd(
        &self,
        z: &Tensor,
        u: &Tensor,
        temp: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let geo = self.geo;
        let (c, d, nq, nkv, g) = (geo.c(), geo.d, geo.nq, geo.nkv, geo.groups());
        let rows = z.elem_count() / c;
        let threads = cpu::num_threads().max(1);
        let per = rows.div_ceil(threads).max((1 << 14) / c).max(1);
        let sqrt_d = (d as f32).sqrt();
        let eps = self.eps;
        let half_g = 0.5 / g as f32;
        let mut dz = vec![0f32; rows * c];
        let mut du = vec![0f32; rows * c];
        let partials: Vec<Vec<f32>> = with_cpu_storage(z, OP, |zs, zl| {
            with_cpu_storage(u, OP, |us, ul| {
                with_cpu_storage(temp, OP, |ts, tl| {
                    with_cpu_storage(grad, OP, |gs, gl| {
                        let z = f32_view(zs, zl, OP)?;
                        let u = f32_view(us, ul, OP)?;
                        let temp = f32_view(ts, tl, OP)?;
                        let gy = f32_view(gs, gl, OP)?;
                        let task = |(t, (dzb, dub)): (usize, (&mut [f32], &mut [f32]))| {
                            let mut dtemp = vec![0f32; nkv];
                            let mut pre = vec![0f32; c];
                            for (i, (dzr, dur)) in
                                dzb.chunks_mut(c).zip(dub.chunks_mut(c)).enumerate()
                            {
                                let r = t * per + i;
                                geo.pre_norm(
                                    &z[r * c..(r + 1) * c],
                                    &u[r * c..(r + 1) * c],
                                    &mut pre,
                                );
                                let gr = &gy[r * c..(r + 1) * c];
                                // dz = d pre (the conv output enters the pre-norm heads as is).
                                for head in 0..nq + nkv {
                                    let p = &pre[head * d..(head + 1) * d];
                                    let gh = &gr[head * d..(head + 1) * d];
                                    let (ss, f) = norm_factor(p, eps, sqrt_d);
                                    let t = if head < nq {
                                        1.0
                                    } else {
                                        let kv = head - nq;
                                        let mut s = 0f32;
                                        for j in 0..d {
                                            s += gh[j] * (p[j] * f);
                                        }
                                        dtemp[kv] += s;
                                        temp[kv]
                                    };
                                    head_grad(
                                        p,
                                        gh,
                                        ss,
                                        f,
                                        t,
                                        eps,
                                        &mut dzr[head * d..(head + 1) * d],
                                    );
                                }
                                // du: q_raw[h] gets ½ dq_pre[h] + ½/G dk_pre[g(h)];
                                // k_raw[g] gets ½ Σ_{h∈g} dq_pre[h] + ½ dk_pre[g].
                                let (dq, dk) = dzr.split_at(nq * d);
                                let (duq, duk) = dur.split_at_mut(nq * d);
                                for kv in 0..nkv {
                                    let dkg = &dk[kv * d..(kv + 1) * d];
                                    let dukg = &mut duk[kv * d..(kv + 1) * d];
                                    for j in 0..d {
                                        dukg[j] = 0.5 * dkg[j];
                                    }
                                    for h in kv * g..(kv + 1) * g {
                                        let dqh = &dq[h * d..(h + 1) * d];
                                        let duqh = &mut duq[h * d..(h + 1) * d];
                                        for j in 0..d {
                                            duqh[j] = 0.5 * dqh[j] + half_g * dkg[j];
                                            dukg[j] += 0.5 * dqh[j];
                                        }
                                    }
                                }
                            }
                            dtemp
                        };
                        let chunk = per * c;
                        Ok(if rows > per {
                            cpu::in_pool(|| {
                                dz.par_chunks_mut(chunk)
                                    .zip(du.par_chunks_mut(chunk))
                                    .enumerate()
                                    .map(task)
                                    .collect()
                            })
                        } else {
                            vec![task((0, (&mut dz[..], &mut du[..])))]
                        })
                    })
                })
            })
        })?;
        let mut dtemp = vec![0f32; nkv];
        for part in &partials {
            for (a, b) in dtemp.iter_mut().zip(part) {
                *a += b;
            }
        }
        let dz = z
            .track_op()
            .then(|| tensor_from_f32(dz, z.shape(), z.dtype(), z))
            .transpose()?;
        let du = u
            .track_op()
            .then(|| tensor_from_f32(du, u.shape(), u.dtype(), u))
            .transpose()?;
        let dtemp = temp
            .track_op()
            .then(|| tensor_from_f32(dtemp, temp.shape(), temp.dtype(), temp))
            .transpose()?;
        Ok((dz, du, dtemp))
    }
}

/// See [`super::cca_qk_norm`].
pub(super) fn fused(
    z: &Tensor,
    u: &Tensor,
    temp: &Tensor,
    num_heads: usize,
    num_kv_heads: usize,
) -> Result<(Tensor, Tensor)> {
    let (geo, b, t) = check(z, u, temp, num_heads, num_kv_heads)?;
    // The bf16 forward reproduces the reference's per-op rounding; the fused backward is
    // the f32 formula, so a bf16 call that records gradients (LoRA over a bf16 base) takes
    // the reference, whose backward rounds as it does.
    if z.dtype() != DType::F32 && (z.track_op() || u.track_op() || temp.track_op()) {
        return super::reference::cca_qk_norm(z, u, temp, num_heads, num_kv_heads);
    }
    let op = QkNorm {
        geo,
        eps: super::reference::qk_norm_eps(z.dtype()) as f32,
    };
    let y = z.apply_op3(u, temp, op)?;
    let (nq, nkv, d) = (geo.nq, geo.nkv, geo.d);
    let q = y.narrow(2, 0, nq * d)?.reshape((b, t, nq, d))?;
    let k = y.narrow(2, nq * d, nkv * d)?.reshape((b, t, nkv, d))?;
    Ok((q, k))
}

/// Validates a call; returns the geometry and `(B, T)`.
pub(super) fn check(
    z: &Tensor,
    u: &Tensor,
    temp: &Tensor,
    num_heads: usize,
    num_kv_heads: usize,
) -> Result<(Geometry, usize, usize)> {
    let bad =
        |message: String| -> candle_core::Error { KernelError::Shape { op: OP, message }.into() };
    let (b, t, c) = z.dims3()?;
    if u.dims() != z.dims() {
        return Err(bad(format!(
            "conv output {:?} and raw projections {:?} differ in shape",
            z.dims(),
            u.dims()
        )));
    }
    if u.dtype() != z.dtype() || temp.dtype() != z.dtype() {
        return Err(bad(format!(
            "dtypes differ: conv output {:?}, raw projections {:?}, temp {:?}",
            z.dtype(),
            u.dtype(),
            temp.dtype()
        )));
    }
    if num_kv_heads == 0 || num_heads == 0 || !num_heads.is_multiple_of(num_kv_heads) {
        return Err(bad(format!(
            "{num_heads} query heads are not a multiple of {num_kv_heads} key heads"
        )));
    }
    if !c.is_multiple_of(num_heads + num_kv_heads) || c == 0 {
        return Err(bad(format!(
            "{c} channels are not {num_heads} + {num_kv_heads} heads of equal size"
        )));
    }
    if temp.dims() != [num_kv_heads] {
        return Err(bad(format!(
            "temp must be [{num_kv_heads}], got {:?}",
            temp.dims()
        )));
    }
    let d = c / (num_heads + num_kv_heads);
    Ok((
        Geometry {
            nq: num_heads,
            nkv: num_kv_heads,
            d,
        },
        b,
        t,
    ))
}
