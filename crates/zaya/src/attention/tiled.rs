//! The fused, memory-efficient attention engine behind the `sdpa` and `flex` backends:
//! tiled online softmax (FlashAttention-2 style) on the CPU, with a fused backward.
//!
//! * Scores are computed one `64 × 64` tile at a time (query rows × keys) and never
//!   materialised for the whole sequence; each tile is a small gemm on strided views.
//! * GQA without copies: the `G` query heads of a KV head are stacked into one block of
//!   `G × 64` rows that multiplies the shared K/V tile in place.
//! * A [`MaskSource`] classifies tiles as empty (skipped: no gemm, no exp), full (no mask
//!   evaluation) or partial (element mask); an optional [`ScoreSource`] modifies scores.
//! * Work items are (batch, KV head, query tile) in the forward and (batch, KV head, key
//!   chunk) in the backward, spread over the kernel pool.
//! * All arithmetic is f32; bf16/f16 inputs are widened on entry and the output rounded
//!   once.
//!
//! Fully masked rows reproduce the eager reference, whose additive `f32::MIN` mask makes
//! every score equal: the output is the uniform average of all values, and the backward
//! is the eager one too (uniform probabilities, score gradients flowing through).

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

use crate::kernels::cpu::{
    self, exp_approx, f32_view, host_f32_ref, storage_from_f32, tensor_from_f32, HostF32, MatMut,
    MatRef,
};
use crate::kernels::KernelError;

/// Tile edge (query rows and keys) of the engine and of flex block masks.
pub const TILE: usize = 64;

/// How much of a tile a mask lets through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TileKind {
    /// Nothing visible: the tile is skipped.
    Empty,
    /// Everything visible: no per-element mask evaluation.
    Full,
    /// Mixed: the element mask is consulted.
    Partial,
}

/// The mask of a fused attention call, in local indices (query row `0..T`, key `0..N`).
pub(crate) trait MaskSource: Send + Sync {
    /// Class of tile `(qt, kt)` for batch row `b` and query head `h`.
    fn tile(&self, b: usize, h: usize, qt: usize, kt: usize) -> TileKind;
    /// For a partial tile: `out[r·cols + c]` = whether query `qt·TILE + r` sees key
    /// `kt·TILE + c`.
    #[allow(clippy::too_many_arguments)]
    fn fill(
        &self,
        b: usize,
        h: usize,
        qt: usize,
        kt: usize,
        rows: usize,
        cols: usize,
        out: &mut [bool],
    );
    /// Whether the mask can differ between query heads.
    fn per_head(&self) -> bool;
}

/// A score modification `s' = f(s, b, h, q, k)` (local indices) and its derivative.
pub(crate) trait ScoreSource: Send + Sync {
    fn apply(&self, s: f32, b: usize, h: usize, q: usize, k: usize) -> f32;
    /// `∂f/∂s`; only called when [`ScoreSource::has_grad`].
    fn grad(&self, s: f32, b: usize, h: usize, q: usize, k: usize) -> f32;
    fn has_grad(&self) -> bool;
}

/// Geometry: q `[B, Nq, T, D]`, k `[B, Nkv, N, D]`, v `[B, Nkv, N, Dv]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dims {
    pub b: usize,
    pub nq: usize,
    pub nkv: usize,
    pub t: usize,
    pub n: usize,
    pub d: usize,
    pub dv: usize,
}

impl Dims {
    pub fn from_shapes(q: &[usize], k: &[usize], v: &[usize]) -> Result<Dims> {
        let bad = |message: String| -> candle_core::Error {
            KernelError::Shape {
                op: "attention",
                message,
            }
            .into()
        };
        let ([b, nq, t, d], [kb, nkv, n, kd], [vb, vh, vn, dv]) = (q, k, v) else {
            return Err(bad(format!("q, k, v must be 4-D, got {q:?}, {k:?}, {v:?}")));
        };
        if kb != b || vb != b || vh != nkv || vn != n || kd != d {
            return Err(bad(format!("inconsistent q {q:?}, k {k:?}, v {v:?}")));
        }
        if *nkv == 0 || !nq.is_multiple_of(*nkv) {
            return Err(bad(format!(
                "{nq} query heads are not a multiple of {nkv} KV heads"
            )));
        }
        Ok(Dims {
            b: *b,
            nq: *nq,
            nkv: *nkv,
            t: *t,
            n: *n,
            d: *d,
            dv: *dv,
        })
    }

    fn g(&self) -> usize {
        self.nq / self.nkv
    }
    fn nqt(&self) -> usize {
        self.t.div_ceil(TILE)
    }
    fn nkt(&self) -> usize {
        self.n.div_ceil(TILE)
    }
}

/// Keys or values `[B, H, N, width]` as the forward reads them: each head's `N` rows
/// contiguous (row stride `width`), heads and batch rows at any stride. A cache's K/V (a
/// `[.., len, width]` view of a longer buffer) is read in place instead of being copied to a
/// packed tensor for every decoded token.
pub(crate) struct Heads<'a> {
    data: std::borrow::Cow<'a, [f32]>,
    start: usize,
    batch_stride: usize,
    head_stride: usize,
}

impl<'a> Heads<'a> {
    /// A packed `[B, H, N, width]` buffer.
    pub fn packed(data: &'a [f32], h: usize, n: usize, width: usize) -> Self {
        Self::packed_in(std::borrow::Cow::Borrowed(data), h, n, width)
    }

    fn packed_in(data: std::borrow::Cow<'a, [f32]>, h: usize, n: usize, width: usize) -> Self {
        Heads {
            data,
            start: 0,
            batch_stride: h * n * width,
            head_stride: n * width,
        }
    }

    /// The storage seen through `layout`: borrowed when it is f32 with contiguous head rows,
    /// copied (packed, f32) otherwise.
    fn from_storage(storage: &'a CpuStorage, layout: &Layout, op: &'static str) -> Result<Self> {
        let (dims, stride) = (layout.dims(), layout.stride());
        if let (CpuStorage::F32(d), [_, h, n, w], [sb, sh, sn, sw]) = (storage, dims, stride) {
            let rows_packed = (*w <= 1 || *sw == 1) && (*n <= 1 || *sn == *w);
            if rows_packed {
                return Ok(Heads {
                    data: std::borrow::Cow::Borrowed(d.as_slice()),
                    start: layout.start_offset(),
                    batch_stride: *sb,
                    head_stride: if *h <= 1 { n * w } else { *sh },
                });
            }
        }
        let packed = f32_view(storage, layout, op)?;
        let [_, h, n, w] = dims else {
            return Err(KernelError::Internal(format!("{op}: expected 4-D keys/values")).into());
        };
        Ok(Self::packed_in(packed, *h, *n, *w))
    }

    /// Offset of head `h` of batch row `b` in [`Self::data`].
    fn at(&self, b: usize, h: usize) -> usize {
        self.start + b * self.batch_stride + h * self.head_stride
    }

    fn data(&self) -> &[f32] {
        &self.data
    }
}

/// One fused attention problem.
pub(crate) struct Problem<'a> {
    pub dims: Dims,
    pub scale: f32,
    pub mask: &'a dyn MaskSource,
    pub score: Option<&'a dyn ScoreSource>,
}

impl Problem<'_> {
    /// Classifies tile `(qt, kt)` for every query head of KV head `kvh`; false if all empty.
    fn kinds(&self, b: usize, kvh: usize, qt: usize, kt: usize, out: &mut [TileKind]) -> bool {
        let g = self.dims.g();
        let mut any = false;
        for gi in 0..g {
            out[gi] = if gi > 0 && !self.mask.per_head() {
                out[0]
            } else {
                self.mask.tile(b, kvh * g + gi, qt, kt)
            };
            any |= out[gi] != TileKind::Empty;
        }
        any
    }

    /// Writes the masked, modified scores of one stacked tile in place (`−∞` where hidden).
    #[allow(clippy::too_many_arguments)]
    fn mask_scores(
        &self,
        s: &mut [f32],
        kinds: &[TileKind],
        bits: &mut [bool],
        b: usize,
        kvh: usize,
        qt: usize,
        kt: usize,
        tq: usize,
        tk: usize,
    ) {
        let g = self.dims.g();
        let (t0, k0) = (qt * TILE, kt * TILE);
        let mut bits_for: Option<usize> = None;
        for (gi, kind) in kinds.iter().enumerate().take(g) {
            let h = kvh * g + gi;
            let rows = &mut s[gi * tq * tk..(gi + 1) * tq * tk];
            match kind {
                TileKind::Empty => rows.fill(f32::NEG_INFINITY),
                TileKind::Full => {
                    if let Some(sc) = self.score {
                        for (i, row) in rows.chunks_mut(tk).enumerate() {
                            for (j, v) in row.iter_mut().enumerate() {
                                *v = sc.apply(*v, b, h, t0 + i, k0 + j);
                            }
                        }
                    }
                }
                TileKind::Partial => {
                    let key = if self.mask.per_head() { h } else { 0 };
                    if bits_for != Some(key) {
                        self.mask.fill(b, h, qt, kt, tq, tk, &mut bits[..tq * tk]);
                        bits_for = Some(key);
                    }
                    for (i, row) in rows.chunks_mut(tk).enumerate() {
                        for (j, v) in row.iter_mut().enumerate() {
                            *v = if !bits[i * tk + j] {
                                f32::NEG_INFINITY
                            } else if let Some(sc) = self.score {
                                sc.apply(*v, b, h, t0 + i, k0 + j)
                            } else {
                                *v
                            };
                        }
                    }
                }
            }
        }
    }

    /// Mean of the values of KV head `kvh` over all keys (the output of a fully masked row).
    fn mean_v(&self, v: &Heads, b: usize, kvh: usize) -> Vec<f32> {
        let Dims { n, dv, .. } = self.dims;
        let mut m = vec![0f32; dv];
        if n == 0 {
            return m;
        }
        let base = v.at(b, kvh);
        for row in v.data()[base..base + n * dv].chunks(dv) {
            for (a, x) in m.iter_mut().zip(row) {
                *a += x;
            }
        }
        let inv = 1.0 / n as f32;
        m.iter_mut().for_each(|x| *x *= inv);
        m
    }

    /// Gathers the stacked rows `[G·tq, width]` of a `[B, Nq, T, width]` tensor.
    fn gather_rows(
        &self,
        x: &[f32],
        width: usize,
        b: usize,
        kvh: usize,
        t0: usize,
        tq: usize,
    ) -> Vec<f32> {
        let Dims { nq, t, .. } = self.dims;
        let g = self.dims.g();
        let mut out = Vec::with_capacity(g * tq * width);
        for gi in 0..g {
            let src = ((b * nq + kvh * g + gi) * t + t0) * width;
            out.extend_from_slice(&x[src..src + tq * width]);
        }
        out
    }
}

/// Forward pass: the output `[B, Nq, T, Dv]` and the row log-sum-exp `[B, Nq, T]`
/// (`−∞` for fully masked rows), which the backward reuses.
pub(crate) fn forward(
    p: &Problem,
    q: &[f32],
    k: &Heads,
    v: &Heads,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let dims = p.dims;
    let Dims {
        b: nb,
        nq,
        nkv,
        t,
        n,
        d,
        dv,
    } = dims;
    let g = dims.g();
    let nqt = dims.nqt();
    let items = nb * nkv * nqt;
    let work = nb * nq * t * n.max(1) * (d + dv) * 2;
    let tile = |item: usize| -> Result<(Vec<f32>, Vec<f32>)> {
        let qt = item % nqt;
        let kvh = (item / nqt) % nkv;
        let b = item / (nqt * nkv);
        let t0 = qt * TILE;
        let tq = TILE.min(t - t0);
        let r = g * tq;
        let qb = p.gather_rows(q, d, b, kvh, t0, tq);
        let (kbase, vbase) = (k.at(b, kvh), v.at(b, kvh));
        let mut m = vec![f32::NEG_INFINITY; r];
        let mut l = vec![0f32; r];
        let mut acc = vec![0f32; r * dv];
        let mut s = vec![0f32; r * TILE];
        let mut bits = vec![false; TILE * TILE];
        let mut kinds = vec![TileKind::Empty; g];
        for kt in 0..dims.nkt() {
            if !p.kinds(b, kvh, qt, kt, &mut kinds) {
                continue;
            }
            let k0 = kt * TILE;
            let tk = TILE.min(n - k0);
            let s = &mut s[..r * tk];
            cpu::gemm(
                r,
                tk,
                d,
                MatMut::new(s, 0, tk),
                false,
                MatRef::rows(&qb, 0, d),
                MatRef::new(k.data(), kbase + k0 * d, 1, d),
                p.scale,
                false,
            )?;
            p.mask_scores(s, &kinds, &mut bits, b, kvh, qt, kt, tq, tk);
            // Online softmax: rescale what was accumulated when the running max grows.
            for row in 0..r {
                let sr = &mut s[row * tk..(row + 1) * tk];
                let mx = sr.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                if mx == f32::NEG_INFINITY {
                    sr.fill(0.0);
                    continue;
                }
                let m_new = m[row].max(mx);
                let alpha = exp_approx(m[row] - m_new);
                let sum = cpu::exp_sub_sum(sr, m_new);
                l[row] = l[row] * alpha + sum;
                if alpha != 1.0 {
                    acc[row * dv..(row + 1) * dv]
                        .iter_mut()
                        .for_each(|a| *a *= alpha);
                }
                m[row] = m_new;
            }
            cpu::gemm(
                r,
                dv,
                tk,
                MatMut::new(&mut acc, 0, dv),
                true,
                MatRef::rows(s, 0, tk),
                MatRef::new(v.data(), vbase + k0 * dv, dv, 1),
                1.0,
                false,
            )?;
        }
        let mut lse = vec![f32::NEG_INFINITY; r];
        let mut mean_v: Option<Vec<f32>> = None;
        for row in 0..r {
            let o = &mut acc[row * dv..(row + 1) * dv];
            if l[row] > 0.0 {
                let inv = 1.0 / l[row];
                o.iter_mut().for_each(|x| *x *= inv);
                lse[row] = m[row] + l[row].ln();
            } else {
                o.copy_from_slice(mean_v.get_or_insert_with(|| p.mean_v(v, b, kvh)));
            }
        }
        Ok((acc, lse))
    };
    // A decode step's items go to the spinning team, as its products do: on the pool they
    // woke an idle pool thread each layer, which then spun beside the team's helper (three
    // spinning threads on two cores: a small-model decode run had 4× the context switches).
    // An item's result does not depend on the thread that computes it.
    let results = if t <= cpu::DECODE_POSITIONS {
        cpu::par_map_short(items, work, tile)
    } else {
        cpu::par_map(items, work, tile)
    };
    let mut out = vec![0f32; nb * nq * t * dv];
    let mut lse_all = vec![f32::NEG_INFINITY; nb * nq * t];
    for (item, res) in results.into_iter().enumerate() {
        let (acc, lse) = res?;
        let qt = item % nqt;
        let kvh = (item / nqt) % nkv;
        let b = item / (nqt * nkv);
        let t0 = qt * TILE;
        let tq = TILE.min(t - t0);
        for gi in 0..g {
            let h = kvh * g + gi;
            let dst = ((b * nq + h) * t + t0) * dv;
            out[dst..dst + tq * dv].copy_from_slice(&acc[gi * tq * dv..(gi + 1) * tq * dv]);
            let dst = (b * nq + h) * t + t0;
            lse_all[dst..dst + tq].copy_from_slice(&lse[gi * tq..(gi + 1) * tq]);
        }
    }
    Ok((out, lse_all))
}

/// Gradients `(dq, dk, dv)` for upstream `dout`, given the forward output `o` and `lse`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    p: &Problem,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    lse: &[f32],
    dout: &[f32],
) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    if p.score.is_some_and(|sc| !sc.has_grad()) {
        return Err(KernelError::Backward {
            op: "attention",
            message:
                "the score_mod has no derivative; give ScoreMod::custom one to train through it"
                    .into(),
        }
        .into());
    }
    let dims = p.dims;
    let Dims {
        b: nb,
        nq,
        nkv,
        t,
        n,
        d,
        dv,
    } = dims;
    let g = dims.g();
    let (nqt, nkt) = (dims.nqt(), dims.nkt());
    // D_i = dO_i · O_i, the softmax-backward row term.
    let di: Vec<f32> = (0..nb * nq * t)
        .map(|row| {
            cpu::dot(
                &dout[row * dv..(row + 1) * dv],
                &o[row * dv..(row + 1) * dv],
            )
        })
        .collect();
    // Key chunks per (b, KV head), enough to keep every thread busy.
    let per_bh = nb * nkv;
    let chunks = (2 * cpu::num_threads())
        .div_ceil(per_bh.max(1))
        .clamp(1, nkt.max(1));
    let tiles_per_chunk = nkt.div_ceil(chunks).max(1);
    let items = per_bh * chunks;
    let work = 2 * nb * nq * t * n.max(1) * (d + dv) * 2;
    let scale = p.scale;
    let results = cpu::par_map(
        items,
        work,
        |item| -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
            let c = item % chunks;
            let kvh = (item / chunks) % nkv;
            let b = item / (chunks * nkv);
            let kt_lo = (c * tiles_per_chunk).min(nkt);
            let kt_hi = ((c + 1) * tiles_per_chunk).min(nkt);
            let kc0 = (kt_lo * TILE).min(n);
            let kc1 = (kt_hi * TILE).min(n);
            let nk = kc1 - kc0;
            let (kbase, vbase) = ((b * nkv + kvh) * n * d, (b * nkv + kvh) * n * dv);
            let mut dk = vec![0f32; nk * d];
            let mut dvv = vec![0f32; nk * dv];
            let mut dq = vec![0f32; g * t * d];
            if nk == 0 {
                return Ok((dk, dvv, dq));
            }
            let mut s = vec![0f32; g * TILE * TILE];
            let mut pm = vec![0f32; g * TILE * TILE];
            let mut ds = vec![0f32; g * TILE * TILE];
            let mut bits = vec![false; TILE * TILE];
            let mut kinds = vec![TileKind::Empty; g];
            for qt in 0..nqt {
                let t0 = qt * TILE;
                let tq = TILE.min(t - t0);
                let r = g * tq;
                let qb = p.gather_rows(q, d, b, kvh, t0, tq);
                let dob = p.gather_rows(dout, dv, b, kvh, t0, tq);
                let row_ix = |row: usize| (b * nq + kvh * g + row / tq) * t + t0 + row % tq;
                let lse_r: Vec<f32> = (0..r).map(|row| lse[row_ix(row)]).collect();
                let di_r: Vec<f32> = (0..r).map(|row| di[row_ix(row)]).collect();
                let mut dqb = vec![0f32; r * d];
                for kt in kt_lo..kt_hi {
                    if !p.kinds(b, kvh, qt, kt, &mut kinds) {
                        continue;
                    }
                    let k0 = kt * TILE;
                    let tk = TILE.min(n - k0);
                    let (s, pm, ds) = (&mut s[..r * tk], &mut pm[..r * tk], &mut ds[..r * tk]);
                    cpu::gemm(
                        r,
                        tk,
                        d,
                        MatMut::new(s, 0, tk),
                        false,
                        MatRef::rows(&qb, 0, d),
                        MatRef::new(k, kbase + k0 * d, 1, d),
                        scale,
                        false,
                    )?;
                    // P = exp(mod(s) − lse) where visible (fully masked rows are handled below).
                    pm.copy_from_slice(s);
                    p.mask_scores(pm, &kinds, &mut bits, b, kvh, qt, kt, tq, tk);
                    for row in 0..r {
                        let pr = &mut pm[row * tk..(row + 1) * tk];
                        if lse_r[row] == f32::NEG_INFINITY {
                            pr.fill(0.0);
                        } else {
                            cpu::exp_sub_sum(pr, lse_r[row]);
                        }
                    }
                    // dV += Pᵀ·dO
                    cpu::gemm(
                        tk,
                        dv,
                        r,
                        MatMut::new(&mut dvv, (k0 - kc0) * dv, dv),
                        true,
                        MatRef::new(pm, 0, 1, tk),
                        MatRef::rows(&dob, 0, dv),
                        1.0,
                        false,
                    )?;
                    // dP = dO·Vᵀ, then dS = P ⊙ (dP − D) ⊙ mod'(s) · scale
                    cpu::gemm(
                        r,
                        tk,
                        dv,
                        MatMut::new(ds, 0, tk),
                        false,
                        MatRef::rows(&dob, 0, dv),
                        MatRef::new(v, vbase + k0 * dv, 1, dv),
                        1.0,
                        false,
                    )?;
                    for (row, &d_row) in di_r.iter().enumerate() {
                        let (h, i) = (kvh * g + row / tq, row % tq);
                        for j in 0..tk {
                            let e = row * tk + j;
                            let pv = pm[e];
                            ds[e] = if pv == 0.0 {
                                0.0
                            } else {
                                let dmod = p
                                    .score
                                    .map_or(1.0, |sc| sc.grad(s[e], b, h, t0 + i, k0 + j));
                                pv * (ds[e] - d_row) * dmod * scale
                            };
                        }
                    }
                    // dQ += dS·K, dK += dSᵀ·Q
                    cpu::gemm(
                        r,
                        d,
                        tk,
                        MatMut::new(&mut dqb, 0, d),
                        true,
                        MatRef::rows(ds, 0, tk),
                        MatRef::new(k, kbase + k0 * d, d, 1),
                        1.0,
                        false,
                    )?;
                    cpu::gemm(
                        tk,
                        d,
                        r,
                        MatMut::new(&mut dk, (k0 - kc0) * d, d),
                        true,
                        MatRef::new(ds, 0, 1, tk),
                        MatRef::rows(&qb, 0, d),
                        1.0,
                        false,
                    )?;
                }
                // Fully masked rows: uniform probabilities over all N keys, eager's gradient.
                let inv_n = 1.0 / n as f32;
                for row in (0..r).filter(|&row| lse_r[row] == f32::NEG_INFINITY) {
                    let (h, i) = (kvh * g + row / tq, row % tq);
                    let qrow = &qb[row * d..(row + 1) * d];
                    let dorow = &dob[row * dv..(row + 1) * dv];
                    let mut dqrow = vec![0f32; d];
                    for j in kc0..kc1 {
                        let vj = &v[vbase + j * dv..vbase + (j + 1) * dv];
                        let kj = &k[kbase + j * d..kbase + (j + 1) * d];
                        let dvj = &mut dvv[(j - kc0) * dv..(j - kc0 + 1) * dv];
                        for (a, x) in dvj.iter_mut().zip(dorow) {
                            *a += x * inv_n;
                        }
                        let dmod = p.score.map_or(1.0, |sc| {
                            sc.grad(scale * cpu::dot(qrow, kj), b, h, t0 + i, j)
                        });
                        let dsj = (cpu::dot(dorow, vj) - di_r[row]) * inv_n * dmod * scale;
                        for (a, x) in dqrow.iter_mut().zip(kj) {
                            *a += dsj * x;
                        }
                        for (a, x) in dk[(j - kc0) * d..(j - kc0 + 1) * d].iter_mut().zip(qrow) {
                            *a += dsj * x;
                        }
                    }
                    for (a, x) in dqb[row * d..(row + 1) * d].iter_mut().zip(&dqrow) {
                        *a += x;
                    }
                }
                for gi in 0..g {
                    let dst = (gi * t + t0) * d;
                    for (a, x) in dq[dst..dst + tq * d]
                        .iter_mut()
                        .zip(&dqb[gi * tq * d..(gi + 1) * tq * d])
                    {
                        *a += x;
                    }
                }
            }
            Ok((dk, dvv, dq))
        },
    );
    let mut dq = vec![0f32; nb * nq * t * d];
    let mut dk = vec![0f32; nb * nkv * n * d];
    let mut dvv = vec![0f32; nb * nkv * n * dv];
    for (item, res) in results.into_iter().enumerate() {
        let (dk_c, dv_c, dq_c) = res?;
        let c = item % chunks;
        let kvh = (item / chunks) % nkv;
        let b = item / (chunks * nkv);
        let kc0 = (c * tiles_per_chunk * TILE).min(n);
        let base = (b * nkv + kvh) * n;
        dk[(base + kc0) * d..(base + kc0) * d + dk_c.len()].copy_from_slice(&dk_c);
        dvv[(base + kc0) * dv..(base + kc0) * dv + dv_c.len()].copy_from_slice(&dv_c);
        let qbase = (b * nq + kvh * g) * t * d;
        for (a, x) in dq[qbase..qbase + g * t * d].iter_mut().zip(&dq_c) {
            *a += x;
        }
    }
    Ok((dq, dk, dvv))
}

/// The fused attention as a candle op on `(q, k, v)`, with the backward above. The mask
/// and score modification are held by the op; the forward's log-sum-exp is kept for the
/// backward when any input is tracked (candle gives `bwd` only the output).
pub(crate) struct FusedAttention {
    pub mask: Arc<dyn MaskSource>,
    pub score: Option<Arc<dyn ScoreSource>>,
    pub scale: f32,
    pub name: &'static str,
    keep_lse: bool,
    lse: Mutex<Option<Vec<f32>>>,
}

impl FusedAttention {
    fn problem(&self, dims: Dims) -> Problem<'_> {
        Problem {
            dims,
            scale: self.scale,
            mask: self.mask.as_ref(),
            score: self.score.as_deref(),
        }
    }
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = Dims::from_shapes(ql.dims(), kl.dims(), vl.dims())?;
        let q = f32_view(qs, ql, self.name)?;
        let k = Heads::from_storage(ks, kl, self.name)?;
        let v = Heads::from_storage(vs, vl, self.name)?;
        let (out, lse) = forward(&self.problem(dims), &q, &k, &v)?;
        if self.keep_lse {
            *self.lse.lock().unwrap_or_else(|e| e.into_inner()) = Some(lse);
        }
        let shape = Shape::from_dims(&[dims.b, dims.nq, dims.t, dims.dv]);
        Ok((storage_from_f32(out, qs.dtype(), self.name)?, shape))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dims = Dims::from_shapes(q.dims(), k.dims(), v.dims())?;
        let (qh, kh, vh) = (host_f32_ref(q)?, host_f32_ref(k)?, host_f32_ref(v)?);
        let p = self.problem(dims);
        let lse = self.lse.lock().unwrap_or_else(|e| e.into_inner()).take();
        let (oh, lse) = match lse {
            Some(lse) => (host_f32_ref(out)?, lse),
            // Not kept (the op was built for inference): recompute.
            None => {
                let (o, lse) = forward(
                    &p,
                    &qh,
                    &Heads::packed(&kh, dims.nkv, dims.n, dims.d),
                    &Heads::packed(&vh, dims.nkv, dims.n, dims.dv),
                )?;
                (HostF32::Owned(o), lse)
            }
        };
        let (dq, dk, dv) = backward(&p, &qh, &kh, &vh, &oh, &lse, &host_f32_ref(grad)?)?;
        let dq = q
            .track_op()
            .then(|| tensor_from_f32(dq, q.shape(), q.dtype(), q))
            .transpose()?;
        let dk = k
            .track_op()
            .then(|| tensor_from_f32(dk, k.shape(), k.dtype(), k))
            .transpose()?;
        let dv = v
            .track_op()
            .then(|| tensor_from_f32(dv, v.shape(), v.dtype(), v))
            .transpose()?;
        Ok((dq, dk, dv))
    }
}

/// Runs the fused attention on `q` `[B,Nq,T,D]`, `k` `[B,Nkv,N,D]`, `v` `[B,Nkv,N,Dv]`.
pub(crate) fn attend(
    name: &'static str,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Arc<dyn MaskSource>,
    score: Option<Arc<dyn ScoreSource>>,
    scale: f64,
) -> Result<Tensor> {
    Dims::from_shapes(q.dims(), k.dims(), v.dims())?;
    let dtype = q.dtype();
    let odd = [q, k, v]
        .iter()
        .map(|t| t.dtype())
        .find(|&dt| dt != dtype || !matches!(dt, DType::F32 | DType::BF16 | DType::F16));
    if let Some(dt) = odd {
        return Err(KernelError::UnsupportedDtype {
            op: name,
            dtype: dt,
        }
        .into());
    }
    if !q.device().is_cpu() {
        return Err(KernelError::Internal(format!(
            "{name}: the fused attention runs on the CPU only"
        ))
        .into());
    }
    let op = FusedAttention {
        mask,
        score,
        scale: scale as f32,
        name,
        keep_lse: q.track_op() || k.track_op() || v.track_op(),
        lse: Mutex::new(None),
    };
    q.apply_op3(k, v, op)
}
