//! Activations rounded to Q8_K for the integer k-quant products ([`super::q4k_q8k`],
//! [`super::q6k_q8k`]), and what both products share: the value layout, the driver and
//! the bodies that multiply decoded weights by the rounded activations.
//!
//! **Rounding**: each row per 256 values to `d·q` with `q` in `i8`, exactly as candle's
//! (llama.cpp's) `BlockQ8K::from_float` does.
//!
//! **Layout**: a super-block's 256 values are 64 *units* of four — one 32-bit lane of an
//! integer dot product (`vpdpbusd` adds four `u8 × i8` products into each lane). A format
//! decodes a weight super-block into four 64-byte vectors in the order its bits fall (its
//! *source* order); the bodies here transpose them four 32-bit lanes at a time within each
//! 128-bit lane (eight `unpack` instructions), after which lane `L` of the four vectors
//! holds four consecutive units — a run of 16 weights, which share one scale in both
//! formats (Q6_K has a scale per 16 weights, Q4_K one per 32). The activations are stored
//! in that same order ([`Units`]), once per row. Per row and super-block a lane then
//! accumulates its run's whole dot product in four `vpdpbusd` (`vpmaddubsw` + `vpmaddwd`
//! without VNNI) and is multiplied by its run's scale once, where the natural order needs
//! a 16-bit multiply-add with the scales for every 64 weights: about half the
//! instructions per row, which is what bounds products of more than a few rows.
//!
//! **Sums**: `x·w = Σ_runs d·sc_r·Σ q·qx − dmin·m_r·Σ qx` (Q6_K stores `q + 32`, so its
//! `dmin = d` and `m_r = 32·sc_r`). The dot products `Σ q·qx` are exact integers (below
//! 2²⁴, so exact in f32 too); the vector bodies multiply each lane's by `d·sc_r·dx` and
//! its activations' sum (times `dx`) by `dmin·m_r` in f32, one accumulator per row, so the
//! results equal candle's (which scales in integers) up to float rounding of those
//! products and the order of the sums — within the tests' tolerance of candle's matmul.

use super::cpu::{self, GEMV_ROWS};
use super::KernelError;
use candle_core::Result;

/// Values per super-block.
pub(super) const QK_K: usize = 256;

/// Where each unit of four values is stored: `units[j]` is the natural unit (values
/// `4u..4u+4`) held by storage unit `j` (bytes `4j..4j+4` of a stored super-block).
pub(super) type Units = [u8; 64];

/// The storage order of a format whose decoded source vector `v` holds natural unit
/// `src[v][l]` in its 32-bit lane `l`: after the transposition vector `t`'s lane `4q + v`
/// holds source `v`'s lane `4q + t`.
pub(super) const fn transposed(src: &[[u8; 16]; 4]) -> Units {
    let mut units = [0u8; 64];
    let mut t = 0;
    while t < 4 {
        let mut q = 0;
        while q < 4 {
            let mut v = 0;
            while v < 4 {
                units[16 * t + 4 * q + v] = src[v][4 * q + t];
                v += 1;
            }
            q += 1;
        }
        t += 1;
    }
    units
}

/// Whether `units` is an order the bodies can use: a permutation of the 64 units in which
/// lane `L` of the four stored vectors (storage units `L`, `16 + L`, `32 + L`, `48 + L`)
/// holds one run of 16 values in order.
pub(super) const fn lanes_hold_runs(units: &Units) -> bool {
    let mut seen = [false; 64];
    let mut j = 0;
    while j < 64 {
        let u = units[j] as usize;
        if u >= 64 || seen[u] {
            return false;
        }
        seen[u] = true;
        let lane = j % 16;
        if !units[lane].is_multiple_of(4) || u != units[lane] as usize + j / 16 {
            return false;
        }
        j += 1;
    }
    true
}

/// The run of 16 values (natural index) that lane `L` holds, divided by `per`: the index
/// of the lane's scale in a format with one scale per `16·per` values.
pub(super) const fn lane_scales(units: &Units, per: u8) -> [u32; 16] {
    let mut idx = [0u32; 16];
    let mut lane = 0;
    while lane < 16 {
        idx[lane] = (units[lane] / 4 / per) as u32;
        lane += 1;
    }
    idx
}

/// Activation rows rounded to Q8_K (candle's `BlockQ8K::from_float`, bit for bit), with
/// the values of each super-block stored in a format's [`Units`] order.
pub(super) struct Q8kRows {
    /// Per row and super-block, the scale `d` (value `= d·q`).
    pub(super) d: Vec<f32>,
    /// Per row and super-block, the 256 values in storage order.
    pub(super) qs: Vec<i8>,
    /// Per row and super-block, for each of the 16 lanes the sum of its run's 16 values
    /// times `d` (the run's sum as a value; exact integers, one rounding by `d`).
    pub(super) sums_dx: Vec<f32>,
}

/// Rows of a product with more activation rows than this are rounded on the kernel pool
/// (a prefill's: 512 rows of 2048 values took ~3 % of an 8B q4_k prefill on one thread
/// while the other waited).
const PARALLEL_ROUNDING_ROWS: usize = GEMV_ROWS;

/// `m` rows of `k` values (`k` a multiple of 256) rounded to Q8_K as candle does:
/// `iscale = −127 / max` with `max` the first value of largest magnitude,
/// `q = clamp(round(iscale·x), −128, 127)`, `d = 1 / iscale` (all zero for a zero block),
/// stored in the order `units`.
pub(super) fn quantize_rows(x: &[f32], m: usize, k: usize, units: &Units) -> Q8kRows {
    use rayon::prelude::*;
    let kb = k / QK_K;
    let mut rows = Q8kRows {
        d: vec![0f32; m * kb],
        qs: vec![0i8; m * k],
        sums_dx: vec![0f32; m * kb * 16],
    };
    let x = &x[..m * k];
    let units = &UnitShuffle::of(units);
    if m > PARALLEL_ROUNDING_ROWS && cpu::num_threads() > 1 {
        // each super-block is rounded on its own: the same values whatever the split
        cpu::in_pool(|| {
            x.par_chunks_exact(QK_K)
                .zip(rows.d.par_iter_mut())
                .zip(rows.qs.par_chunks_exact_mut(QK_K))
                .zip(rows.sums_dx.par_chunks_exact_mut(16))
                .with_min_len(kb)
                .for_each(|(((xs, d), qs), sums)| round_into(xs, units, d, qs, sums))
        });
    } else {
        x.chunks_exact(QK_K)
            .zip(rows.d.iter_mut())
            .zip(rows.qs.chunks_exact_mut(QK_K))
            .zip(rows.sums_dx.chunks_exact_mut(16))
            .for_each(|(((xs, d), qs), sums)| round_into(xs, units, d, qs, sums));
    }
    rows
}

/// A [`Units`] order as the AVX-512 rounding applies it: stored vector `t` (16 units) is
/// two two-vector permutes of the natural vectors (`idx[t]`: the unit's lane among the 32
/// of vectors 0–1 or 2–3) and a blend (`high[t]`: the lanes whose unit is in 2–3).
struct UnitShuffle {
    units: Units,
    idx: [[u32; 16]; 4],
    high: [u16; 4],
}

impl UnitShuffle {
    fn of(units: &Units) -> Self {
        let mut shuffle = UnitShuffle {
            units: *units,
            idx: [[0; 16]; 4],
            high: [0; 4],
        };
        for (j, &u) in units.iter().enumerate() {
            let (t, lane) = (j / 16, j % 16);
            shuffle.idx[t][lane] = u as u32 % 32;
            shuffle.high[t] |= u16::from(u >= 32) << lane;
        }
        shuffle
    }

    /// `qs[4j..4j + 4] = q[4u..4u + 4]` for `u = units[j]`.
    fn apply(&self, q: &[i8; QK_K], qs: &mut [i8]) {
        #[cfg(target_arch = "x86_64")]
        if cpu::simd_level() == cpu::SimdLevel::Avx512 {
            // SAFETY: AVX-512F was detected on this CPU.
            return unsafe { avx512::shuffle_units(self, q, qs) };
        }
        self.apply_portable(q, qs)
    }

    /// [`Self::apply`] a unit at a time (its reference).
    fn apply_portable(&self, q: &[i8; QK_K], qs: &mut [i8]) {
        for (j, &u) in self.units.iter().enumerate() {
            let u = u as usize;
            qs[4 * j..4 * j + 4].copy_from_slice(&q[4 * u..4 * u + 4]);
        }
    }
}

/// One super-block of [`quantize_rows`]: its `d`, its values in `units` order and its
/// lanes' sums times `d`.
fn round_into(xs: &[f32], units: &UnitShuffle, d: &mut f32, qs: &mut [i8], sums_dx: &mut [f32]) {
    let (mut q, mut bsums) = ([0i8; QK_K], [0i16; 16]);
    *d = quantize_block(xs, &mut q, &mut bsums);
    units.apply(&q, qs);
    for (lane, sum) in sums_dx.iter_mut().enumerate() {
        *sum = bsums[units.units[lane] as usize / 4] as f32 * *d;
    }
}

/// One super-block of [`quantize_rows`] in natural order: returns `d` and writes the
/// values and the sums of each run of 16; a zero block leaves both untouched (zeros) and
/// returns 0.
fn quantize_block(xs: &[f32], qs: &mut [i8], bsums: &mut [i16]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if cpu::simd_level() == cpu::SimdLevel::Avx512 {
        // SAFETY: AVX-512F was detected on this CPU.
        return unsafe { avx512::quantize_block(xs, qs, bsums) };
    }
    quantize_block_portable(xs, qs, bsums)
}

/// [`quantize_block`]'s reference: [`round_block`], then the sums.
fn quantize_block_portable(xs: &[f32], qs: &mut [i8], bsums: &mut [i16]) -> f32 {
    let q: &mut [i8; QK_K] = (&mut qs[..QK_K]).try_into().expect("256 values");
    let d = round_block(xs, q);
    if d == 0.0 {
        return 0.0;
    }
    for (s, sum) in bsums[..16].iter_mut().enumerate() {
        *sum = q[16 * s..16 * s + 16]
            .iter()
            .map(|&v| v as i32)
            .sum::<i32>() as i16;
    }
    d
}

/// One super-block of `xs` (256 values) rounded into `q`; returns `d` (0 for a zero
/// block, `q` then untouched). candle's loop, written so that it vectorises: the first
/// value of largest magnitude, and `f32::round` (half away from zero) as a truncation
/// plus a correction, exact for every f32.
#[inline(always)]
fn round_block_body(xs: &[f32], q: &mut [i8; QK_K]) -> f32 {
    let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
    if amax == 0.0 {
        return 0.0;
    }
    let max = xs[xs.iter().position(|v| v.abs() == amax).unwrap_or(0)];
    let iscale = -127f32 / max;
    for (q, &v) in q.iter_mut().zip(xs) {
        let t = iscale * v;
        let r = t.trunc();
        // `t − r` is exact; a fraction of at least one half rounds away from zero
        let r = if (t - r).abs() >= 0.5 {
            r + 1f32.copysign(t)
        } else {
            r
        };
        *q = r.clamp(-128.0, 127.0) as i8;
    }
    1.0 / iscale
}

simd_dispatch! {
    /// One super-block rounded to Q8_K (see [`round_block_body`]).
    fn round_block(xs: &[f32], q: &mut [i8; QK_K]) -> f32 => round_block_body
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::QK_K;
    use std::arch::x86_64::*;

    /// [`super::quantize_block_portable`] in one pass of 16-value vectors, with the same
    /// values bit for bit: the first value of largest magnitude (a NaN is passed over, as
    /// `f32::max` does), half away from zero as a truncation plus a correction, a NaN
    /// product rounding to 0 (as `as i8` does), and each vector's sum is one of the sums
    /// of 16.
    ///
    /// # Safety
    /// AVX-512F must be available; `xs` holds 256 values, `qs` 256 and `bsums` 16.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn quantize_block(xs: &[f32], qs: &mut [i8], bsums: &mut [i16]) -> f32 {
        assert!(xs.len() >= QK_K && qs.len() >= QK_K && bsums.len() >= 16);
        let p = xs.as_ptr();
        let load = |c: usize| unsafe { _mm512_loadu_ps(p.add(16 * c)) };
        let sign = _mm512_set1_ps(-0.0);
        let mut m = _mm512_setzero_ps();
        for c in 0..16 {
            // `maxps` returns its second operand when the first is a NaN
            m = _mm512_max_ps(_mm512_abs_ps(load(c)), m);
        }
        let amax = _mm512_reduce_max_ps(m);
        if amax == 0.0 {
            return 0.0;
        }
        let target = _mm512_set1_ps(amax);
        let mut max = amax;
        for c in 0..16 {
            let hit = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(_mm512_abs_ps(load(c)), target);
            if hit != 0 {
                max = xs[16 * c + hit.trailing_zeros() as usize];
                break;
            }
        }
        let iscale = -127f32 / max;
        let (scale, half, one) = (
            _mm512_set1_ps(iscale),
            _mm512_set1_ps(0.5),
            _mm512_set1_ps(1.0),
        );
        let (lo, hi) = (_mm512_set1_ps(-128.0), _mm512_set1_ps(127.0));
        for (c, sum) in bsums[..16].iter_mut().enumerate() {
            let t = _mm512_mul_ps(scale, load(c));
            let r = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(t);
            let frac = _mm512_abs_ps(_mm512_sub_ps(t, r));
            let up = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(frac, half);
            // ±1 with the sign of `t`, in integer logic (the float forms are AVX-512DQ)
            let away = _mm512_castsi512_ps(_mm512_or_si512(
                _mm512_castps_si512(one),
                _mm512_and_si512(_mm512_castps_si512(sign), _mm512_castps_si512(t)),
            ));
            let r = _mm512_min_ps(_mm512_max_ps(_mm512_mask_add_ps(r, up, r, away), lo), hi);
            let ordered = _mm512_cmp_ps_mask::<_CMP_ORD_Q>(t, t);
            let v = _mm512_maskz_cvttps_epi32(ordered, r);
            *sum = _mm512_reduce_add_epi32(v) as i16;
            let at = 16 * c;
            _mm_storeu_si128(
                qs.as_mut_ptr().add(at) as *mut __m128i,
                _mm512_cvtsepi32_epi8(v),
            );
        }
        1.0 / iscale
    }

    /// [`super::UnitShuffle::apply`]: each stored vector from two two-vector permutes of
    /// the natural ones and a blend.
    ///
    /// # Safety
    /// AVX-512F must be available.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn shuffle_units(s: &super::UnitShuffle, q: &[i8; QK_K], qs: &mut [i8]) {
        assert!(qs.len() >= QK_K);
        let p = q.as_ptr();
        let n = |v: usize| unsafe { _mm512_loadu_si512(p.add(64 * v) as *const _) };
        let (n0, n1, n2, n3) = (n(0), n(1), n(2), n(3));
        for t in 0..4 {
            let idx = _mm512_loadu_si512(s.idx[t].as_ptr() as *const _);
            let low = _mm512_permutex2var_epi32(n0, idx, n1);
            let high = _mm512_permutex2var_epi32(n2, idx, n3);
            let v = _mm512_mask_blend_epi32(s.high[t], low, high);
            _mm512_storeu_si512(qs.as_mut_ptr().add(64 * t) as *mut _, v);
        }
    }
}

/// A weight format the driver runs: its super-block size, the order its bodies read the
/// activations in, its dot products and its reference decoding.
pub(super) struct Format {
    /// Name for errors (`"q4_k"`).
    pub(super) name: &'static str,
    /// Bytes per super-block of 256 weights.
    pub(super) block_bytes: usize,
    /// Where the rounded activations' units are stored ([`Units`]).
    pub(super) units: Units,
    /// `out[j·stride + i − rows.start] = x_i · w_j` for the activation rows `rows` against
    /// each weight row `w_j` of `w` (whole rows of `kb` super-blocks), with `stride`
    /// (≥ `rows.len()`) the last argument; each result independent of which other rows
    /// are asked with it. Many weight rows per call: one call per row cost a tenth of a
    /// one-row product's time at k = 2048 (the dispatch and each row's set-up).
    pub(super) dots: Dots,
    /// One super-block decoded in natural order, for [`dots_portable`].
    pub(super) natural: fn(&[u8]) -> NaturalBlock,
}

/// A format's [`Format::dots`].
pub(super) type Dots = fn(&Q8kRows, usize, std::ops::Range<usize>, &[u8], &mut [f32], usize);

/// A weight super-block decoded in natural order: weight `p` is
/// `d·sc[p/16]·q[p] − dmin·mn[p/16]`.
pub(super) struct NaturalBlock {
    pub(super) q: [u8; QK_K],
    /// Per run of 16 weights.
    pub(super) sc: [i32; 16],
    /// Per run of 16 weights.
    pub(super) mn: [i32; 16],
    pub(super) d: f32,
    pub(super) dmin: f32,
}

/// The bodies' reference for any format: the same integer dot products through the
/// format's natural decoding, the scales applied in integers, the mins' term from the
/// rows' sums in float.
pub(super) fn dots_portable(
    format: &Format,
    xq: &Q8kRows,
    kb: usize,
    rows: std::ops::Range<usize>,
    w: &[u8],
    out: &mut [f32],
    stride: usize,
) {
    let row_bytes = kb * format.block_bytes;
    for (j, row) in w.chunks_exact(row_bytes.max(1)).enumerate() {
        let out = &mut out[j * stride..j * stride + rows.len()];
        dots_portable_row(format, xq, kb, rows.clone(), row, out);
    }
}

/// [`dots_portable`] against one weight row.
fn dots_portable_row(
    format: &Format,
    xq: &Q8kRows,
    kb: usize,
    rows: std::ops::Range<usize>,
    row: &[u8],
    out: &mut [f32],
) {
    for (o, i) in out.iter_mut().zip(rows) {
        let mut acc = 0f32;
        for (b, blk) in row.chunks_exact(format.block_bytes).enumerate() {
            let w = (format.natural)(blk);
            let at = i * kb + b;
            let qs = &xq.qs[QK_K * at..QK_K * (at + 1)];
            let mut runs = [0i32; 16];
            for (j, &u) in format.units.iter().enumerate() {
                let u = u as usize;
                for e in 0..4 {
                    runs[u / 4] += w.q[4 * u + e] as i32 * qs[4 * j + e] as i32;
                }
            }
            let sumi: i32 = runs.iter().zip(&w.sc).map(|(r, s)| r * s).sum();
            let summ: f32 = xq.sums_dx[16 * at..16 * at + 16]
                .iter()
                .zip(&format.units)
                .map(|(&sum, &u)| sum * w.mn[u as usize / 4] as f32)
                .sum();
            acc += w.d * xq.d[at] * sumi as f32 - w.dmin * summ;
        }
        *o = acc;
    }
}

/// The AVX-512 bodies of a format: `k_quant_avx512!(name, "features", vnni|bw, decode,
/// BLOCK_BYTES)` defines `fn name(xq, kb, rows, w, out, stride)` (see [`Format::dots`])
/// with the format's `decode!(blk)` giving `([__m512i; 4]` source vectors, `__m512` lane scales times `d`,
/// `__m512` lane mins times `dmin)`. Per row and super-block: four dot products, a
/// conversion, a multiply by the row's `dx` and two multiply-adds. `vnni` uses `vpdpbusd`; `bw` the same sums through
/// `vpmaddubsw` + `vpmaddwd` (exact: a pair of products is at most 2·63·128 in 16 bits).
macro_rules! k_quant_avx512 {
    (@dp vnni, $acc:expr, $w:expr, $x:expr) => {
        _mm512_dpbusd_epi32($acc, $w, $x)
    };
    (@dp bw, $acc:expr, $w:expr, $x:expr) => {
        _mm512_add_epi32(
            $acc,
            _mm512_madd_epi16(_mm512_maddubs_epi16($w, $x), _mm512_set1_epi16(1)),
        )
    };
    ($name:ident, $features:literal, $dp:ident, $decode:ident, $block_bytes:expr) => {
        /// `out[j·stride + i − rows.start] = x_i · w_j` for the rows `rows` of `xq`
        /// against each weight row `w_j` of `w`: groups of up to eight rows, each group's
        /// sums in registers over the weight row (the super-block decoded and transposed
        /// once per group).
        #[target_feature(enable = $features)]
        pub(super) fn $name(
            xq: &Q8kRows,
            kb: usize,
            rows: std::ops::Range<usize>,
            w: &[u8],
            out: &mut [f32],
            stride: usize,
        ) {
            use std::arch::x86_64::*;

            /// `x_i · w` for rows `i0..i0 + R` of `xq` against one weight row.
            #[inline]
            #[target_feature(enable = $features)]
            fn dot_rows<const R: usize>(
                xq: &Q8kRows,
                kb: usize,
                i0: usize,
                row: &[u8],
            ) -> [f32; R] {
                const BLOCK: usize = $block_bytes;
                assert!(
                    xq.d.len() >= (i0 + R) * kb
                        && xq.qs.len() >= (i0 + R) * kb * QK_K
                        && xq.sums_dx.len() >= (i0 + R) * kb * 16
                        && row.len() >= kb * BLOCK
                );
                let mut acc = [_mm512_setzero_ps(); R];
                for (b, blk) in row[..kb * BLOCK].chunks_exact(BLOCK).enumerate() {
                    // The weight stream ~2 KiB ahead into L1, each of its cache lines once
                    // (the hardware prefetcher alone left the loads waiting; measured on
                    // the Q4_K body, see its module).
                    let ahead = blk.as_ptr().wrapping_add(2048) as *const i8;
                    let mut line = 0;
                    while line < BLOCK {
                        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line));
                        line += 64;
                    }
                    let (src, scd, mnd): ([__m512i; 4], __m512, __m512) = $decode!(blk);
                    // 4 × 4 transposition of 32-bit lanes within each 128-bit lane
                    let t0 = _mm512_unpacklo_epi32(src[0], src[1]);
                    let t1 = _mm512_unpacklo_epi32(src[2], src[3]);
                    let t2 = _mm512_unpackhi_epi32(src[0], src[1]);
                    let t3 = _mm512_unpackhi_epi32(src[2], src[3]);
                    let w = [
                        _mm512_unpacklo_epi64(t0, t1),
                        _mm512_unpackhi_epi64(t0, t1),
                        _mm512_unpacklo_epi64(t2, t3),
                        _mm512_unpackhi_epi64(t2, t3),
                    ];
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let at = (i0 + r) * kb + b;
                        // SAFETY: row `i0 + r`'s super-block `b` is within `xq` (asserted).
                        let (x, sums, dx) = unsafe {
                            (
                                xq.qs.as_ptr().add(QK_K * at),
                                _mm512_loadu_ps(xq.sums_dx.as_ptr().add(16 * at)),
                                _mm512_set1_ps(*xq.d.get_unchecked(at)),
                            )
                        };
                        let mut dot = _mm512_setzero_si512();
                        for (t, &w) in w.iter().enumerate() {
                            // SAFETY: 256 values from `x`.
                            let xv = unsafe { _mm512_loadu_si512(x.add(64 * t) as *const _) };
                            dot = k_quant_avx512!(@dp $dp, dot, w, xv);
                        }
                        let s = _mm512_mul_ps(scd, dx);
                        let a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), s, *acc);
                        *acc = _mm512_fnmadd_ps(sums, mnd, a);
                    }
                }
                acc.map(|a| _mm512_reduce_add_ps(a))
            }

            let row_bytes = kb * $block_bytes;
            for (j, row) in w.chunks_exact(row_bytes.max(1)).enumerate() {
                let out = &mut out[j * stride..j * stride + rows.len()];
                if let [o] = out {
                    // one row: a store (`copy_from_slice` was a `memcpy` call per weight row)
                    *o = dot_rows::<1>(xq, kb, rows.start, row)[0];
                    continue;
                }
                let mut i = rows.start;
                for o in out.chunks_mut(8) {
                    match o.len() {
                        8 => o.copy_from_slice(&dot_rows::<8>(xq, kb, i, row)),
                        7 => o.copy_from_slice(&dot_rows::<7>(xq, kb, i, row)),
                        6 => o.copy_from_slice(&dot_rows::<6>(xq, kb, i, row)),
                        5 => o.copy_from_slice(&dot_rows::<5>(xq, kb, i, row)),
                        4 => o.copy_from_slice(&dot_rows::<4>(xq, kb, i, row)),
                        3 => o.copy_from_slice(&dot_rows::<3>(xq, kb, i, row)),
                        2 => o.copy_from_slice(&dot_rows::<2>(xq, kb, i, row)),
                        _ => o[0] = dot_rows::<1>(xq, kb, i, row)[0],
                    }
                    i += o.len();
                }
            }
        }
    };
}
pub(super) use k_quant_avx512;

/// The AVX2 body of a format (CPUs without AVX-512BW): `k_quant_avx2!(name, decode,
/// lanes, BLOCK_BYTES)` with the format's `decode!(blk, p)` giving, for half `p` (bytes
/// `32p..32p+32` of each source vector), the four source halves (`[__m256i; 4]`), and
/// `lanes!(blk)` giving `([f32; 16]` lane scales times `d`, `[f32; 16]` lane mins times
/// `dmin)`: the AVX-512 bodies' sums on 256-bit vectors, in groups of four rows.
macro_rules! k_quant_avx2 {
    ($name:ident, $decode:ident, $lanes:ident, $block_bytes:expr) => {
        /// `out[j·stride + i − rows.start] = x_i · w_j` for the rows `rows` of `xq`
        /// against each weight row `w_j` of `w`.
        #[target_feature(enable = "avx2,fma,f16c")]
        pub(super) fn $name(
            xq: &Q8kRows,
            kb: usize,
            rows: std::ops::Range<usize>,
            w: &[u8],
            out: &mut [f32],
            stride: usize,
        ) {
            use std::arch::x86_64::*;

            #[inline]
            #[target_feature(enable = "avx2,fma,f16c")]
            fn hsum(v: __m256) -> f32 {
                let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
            }

            /// `x_i · w` for rows `i0..i0 + R` of `xq` against one weight row.
            #[inline]
            #[target_feature(enable = "avx2,fma,f16c")]
            fn dot_rows<const R: usize>(
                xq: &Q8kRows,
                kb: usize,
                i0: usize,
                row: &[u8],
            ) -> [f32; R] {
                const BLOCK: usize = $block_bytes;
                assert!(
                    xq.d.len() >= (i0 + R) * kb
                        && xq.qs.len() >= (i0 + R) * kb * QK_K
                        && xq.sums_dx.len() >= (i0 + R) * kb * 16
                        && row.len() >= kb * BLOCK
                );
                let ones = _mm256_set1_epi16(1);
                let mut acc = [_mm256_setzero_ps(); R];
                for (b, blk) in row[..kb * BLOCK].chunks_exact(BLOCK).enumerate() {
                    let (scd, mnd): ([f32; 16], [f32; 16]) = $lanes!(blk);
                    for p in 0..2 {
                        let src: [__m256i; 4] = $decode!(blk, p);
                        let t0 = _mm256_unpacklo_epi32(src[0], src[1]);
                        let t1 = _mm256_unpacklo_epi32(src[2], src[3]);
                        let t2 = _mm256_unpackhi_epi32(src[0], src[1]);
                        let t3 = _mm256_unpackhi_epi32(src[2], src[3]);
                        let w = [
                            _mm256_unpacklo_epi64(t0, t1),
                            _mm256_unpackhi_epi64(t0, t1),
                            _mm256_unpacklo_epi64(t2, t3),
                            _mm256_unpackhi_epi64(t2, t3),
                        ];
                        // SAFETY: 8 of the 16 lanes.
                        let (scd, mnd) = unsafe {
                            (
                                _mm256_loadu_ps(scd.as_ptr().add(8 * p)),
                                _mm256_loadu_ps(mnd.as_ptr().add(8 * p)),
                            )
                        };
                        for (r, acc) in acc.iter_mut().enumerate() {
                            let at = (i0 + r) * kb + b;
                            // SAFETY: row `i0 + r`'s super-block `b` is within `xq`.
                            let (x, sums, dx) = unsafe {
                                (
                                    xq.qs.as_ptr().add(QK_K * at + 32 * p),
                                    _mm256_loadu_ps(xq.sums_dx.as_ptr().add(16 * at + 8 * p)),
                                    _mm256_set1_ps(*xq.d.get_unchecked(at)),
                                )
                            };
                            let mut dot = _mm256_setzero_si256();
                            for (t, &w) in w.iter().enumerate() {
                                // SAFETY: within the super-block's 256 values.
                                let xv = unsafe { _mm256_loadu_si256(x.add(64 * t) as *const _) };
                                let pr = _mm256_madd_epi16(_mm256_maddubs_epi16(w, xv), ones);
                                dot = _mm256_add_epi32(dot, pr);
                            }
                            let s = _mm256_mul_ps(scd, dx);
                            let a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), s, *acc);
                            *acc = _mm256_fnmadd_ps(sums, mnd, a);
                        }
                    }
                }
                acc.map(|a| hsum(a))
            }

            let row_bytes = kb * $block_bytes;
            for (j, row) in w.chunks_exact(row_bytes.max(1)).enumerate() {
                let out = &mut out[j * stride..j * stride + rows.len()];
                let mut i = rows.start;
                for o in out.chunks_mut(4) {
                    match o.len() {
                        4 => o.copy_from_slice(&dot_rows::<4>(xq, kb, i, row)),
                        3 => o.copy_from_slice(&dot_rows::<3>(xq, kb, i, row)),
                        2 => o.copy_from_slice(&dot_rows::<2>(xq, kb, i, row)),
                        // one row: a store (`copy_from_slice` was a `memcpy` call per weight row)
                        _ => o[0] = dot_rows::<1>(xq, kb, i, row)[0],
                    }
                    i += o.len();
                }
            }
        }
    };
}
pub(super) use k_quant_avx2;

/// A format's three vector bodies from its decode macros (`decode512!(blk)`,
/// `decode256!(blk, p)`, `lanes!(blk)`, see [`k_quant_avx512`] / [`k_quant_avx2`]):
/// `dots_vnni`, `dots_avx512` and `dots_avx2`, where the format also imports those two
/// macros.
macro_rules! k_quant_bodies {
    ($decode512:ident, $decode256:ident, $lanes:ident, $block_bytes:expr) => {
        k_quant_avx512!(
            dots_vnni,
            "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c",
            vnni,
            $decode512,
            $block_bytes
        );
        k_quant_avx512!(
            dots_avx512,
            "avx512f,avx512bw,avx512vl,avx2,fma,f16c",
            bw,
            $decode512,
            $block_bytes
        );
        k_quant_avx2!(dots_avx2, $decode256, $lanes, $block_bytes);
    };
}
pub(super) use k_quant_bodies;

/// A format's `dots`: the body [`body`] picks — `x86::dots_vnni` / `dots_avx512` /
/// `dots_avx2` ([`k_quant_bodies`]) — or [`dots_portable`] over the format `$format`.
macro_rules! k_quant_dots {
    ($format:ident) => {
        fn dots(
            xq: &Q8kRows,
            kb: usize,
            rows: std::ops::Range<usize>,
            w: &[u8],
            out: &mut [f32],
            stride: usize,
        ) {
            match q8k::body() {
                // SAFETY (all three): the CPU has the features of the body `q8k::body` picked.
                #[cfg(target_arch = "x86_64")]
                q8k::Body::Vnni => unsafe { x86::dots_vnni(xq, kb, rows, w, out, stride) },
                #[cfg(target_arch = "x86_64")]
                q8k::Body::Avx512 => unsafe { x86::dots_avx512(xq, kb, rows, w, out, stride) },
                #[cfg(target_arch = "x86_64")]
                q8k::Body::Avx2 => unsafe { x86::dots_avx2(xq, kb, rows, w, out, stride) },
                _ => q8k::dots_portable(&$format, xq, kb, rows, w, out, stride),
            }
        }
    };
}
pub(super) use k_quant_dots;

/// The shared tests of a format, inside its test module: against candle's matmul (the
/// driver and every body), the split invariance and the size errors, with
/// `$weight(n, k, seed)` candle's quantization of a test matrix in the format.
#[cfg(test)]
macro_rules! k_quant_tests {
    ($format:ident, $weight:ident) => {
        /// Every body this CPU has.
        fn bodies() -> shared::BodyList {
            #[cfg(target_arch = "x86_64")]
            {
                vec![
                    (
                        "avx512 vnni",
                        q8k::Body::Vnni,
                        x86::dots_vnni as shared::Dots,
                    ),
                    ("avx512", q8k::Body::Avx512, x86::dots_avx512),
                    ("avx2", q8k::Body::Avx2, x86::dots_avx2),
                ]
            }
            #[cfg(not(target_arch = "x86_64"))]
            {
                Vec::new()
            }
        }

        /// Against candle's matmul, the driver and every body ([`shared::matches_candle`]).
        #[test]
        fn matches_candles_matmul() {
            shared::matches_candle(&$format, linear, $weight, bodies());
        }

        #[test]
        fn results_do_not_depend_on_the_split() {
            shared::results_do_not_depend_on_the_split(linear, &$weight(300, 512, 21));
        }

        #[test]
        fn bad_sizes_are_an_error() {
            shared::bad_sizes_are_an_error(linear, BLOCK_BYTES);
        }

        #[test]
        fn no_columns_give_zeros() {
            shared::no_columns_give_zeros(linear);
        }
    };
}
#[cfg(test)]
pub(super) use k_quant_tests;

/// Which body runs a format's dots on this CPU (detected once).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Body {
    /// AVX-512BW with VNNI (`vpdpbusd`).
    Vnni,
    /// AVX-512BW without VNNI.
    Avx512,
    Avx2,
    Portable,
}

pub(super) fn body() -> Body {
    #[cfg(target_arch = "x86_64")]
    {
        static BODY: std::sync::OnceLock<Body> = std::sync::OnceLock::new();
        *BODY.get_or_init(|| {
            let has = |f: &str| match f {
                "avx512bw" => std::arch::is_x86_feature_detected!("avx512bw"),
                "avx512vnni" => std::arch::is_x86_feature_detected!("avx512vnni"),
                "avx2" => std::arch::is_x86_feature_detected!("avx2"),
                "fma" => std::arch::is_x86_feature_detected!("fma"),
                "f16c" => std::arch::is_x86_feature_detected!("f16c"),
                _ => false,
            };
            if cpu::simd_level() == cpu::SimdLevel::Avx512 && has("avx512bw") && has("f16c") {
                if has("avx512vnni") {
                    Body::Vnni
                } else {
                    Body::Avx512
                }
            } else if has("avx2") && has("fma") && has("f16c") {
                Body::Avx2
            } else {
                Body::Portable
            }
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Body::Portable
    }
}

/// Weight rows that pass over one group of activation rows in [`linear`] (4 rows of a
/// 2048-wide expert are 4.6 KB of Q4_K: with the group's 8 KB of activations, well inside
/// L1).
const WEIGHT_TILE: usize = 4;

/// `out[m×n] = q8k(x)[m×k] · deq(W)ᵀ`: `x` row-major f32, `W` `n` rows of `k / 256`
/// super-blocks of `format` read in place.
pub(super) fn linear(
    format: &Format,
    x: &[f32],
    m: usize,
    k: usize,
    w: &[u8],
    n: usize,
    out: &mut [f32],
) -> Result<()> {
    linear_many(format, x, m, k, &[(w, n)], out)
}

/// The k-quant format whose products [`linear`] runs for `dtype` (`None`: not a k-quant).
pub(super) fn format_of(dtype: candle_core::quantized::GgmlDType) -> Option<&'static Format> {
    use candle_core::quantized::GgmlDType as G;
    Some(match dtype {
        G::Q2K => &super::q2k_q8k::Q2K,
        G::Q3K => &super::q3k_q8k::Q3K,
        G::Q4K => &super::q4k_q8k::Q4K,
        G::Q5K => &super::q5k_q8k::Q5K,
        G::Q6K => &super::q6k_q8k::Q6K,
        _ => return None,
    })
}

/// [`linear`] of one input against several weights of one format (`weights`: each one's
/// blocks and row count `n_i`), side by side in `out` (`m × Σ n_i`, weight after weight in
/// each row): a layer's projections of the same input. The activations are rounded once and
/// all the weights' rows are split over the threads as one product — a decode step's
/// q/k/value projections are 0.15–1.2 MB each at q4_k, too short to split one by one. Each
/// output is the one [`linear`] computes for its weight alone.
pub(super) fn linear_many(
    format: &Format,
    x: &[f32],
    m: usize,
    k: usize,
    weights: &[(&[u8], usize)],
    out: &mut [f32],
) -> Result<()> {
    let kb = k / QK_K;
    let row_bytes = kb * format.block_bytes;
    let n: usize = weights.iter().map(|&(_, n)| n).sum();
    let short = weights.iter().any(|&(w, wn)| w.len() < wn * row_bytes);
    if !k.is_multiple_of(QK_K) || x.len() < m * k || short || out.len() < m * n {
        let bytes: Vec<usize> = weights.iter().map(|(w, _)| w.len()).collect();
        let rows: Vec<usize> = weights.iter().map(|&(_, n)| n).collect();
        return Err(KernelError::Internal(format!(
            "{} × q8_k linear: k={k} must be a multiple of {QK_K} and the buffers must hold \
             m={m}, n={rows:?} (x {}, w {bytes:?} bytes, out {})",
            format.name,
            x.len(),
            out.len()
        ))
        .into());
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        // empty rows: every product is 0 (the bodies would see no weight rows to run over)
        out[..m * n].fill(0.0);
        return Ok(());
    }
    let xq = quantize_rows(x, m, k, &format.units);
    for r0 in (0..m).step_by(GEMV_ROWS) {
        let rows = r0..(r0 + GEMV_ROWS).min(m);
        let chunk = &mut out[r0 * n..rows.end * n];
        let mr = rows.len();
        let xq = &xq;
        let parts = weights
            .iter()
            .map(|&(w, wn)| {
                let rows = rows.clone();
                let block = move |j0: usize, o: &mut [f32]| {
                    let ws = &w[j0 * row_bytes..(j0 + o.len() / mr) * row_bytes];
                    if mr <= 8 {
                        // one group of activation rows: the range's weight rows in one call
                        (format.dots)(xq, kb, rows.clone(), ws, o, mr);
                        return;
                    }
                    // Cache blocking: a group of eight activation rows (8·k bytes) stays in
                    // L1 while a tile of weight rows passes over it, instead of every weight
                    // row streaming all the rows' activations from L2. Each row's result
                    // does not depend on the order (the bodies keep one accumulator per
                    // activation row).
                    for (t, tile) in o.chunks_mut(WEIGHT_TILE * mr).enumerate() {
                        let tw = &ws[t * WEIGHT_TILE * row_bytes..][..tile.len() / mr * row_bytes];
                        for g in (0..mr).step_by(8) {
                            let group = g..(g + 8).min(mr);
                            let at = rows.start + group.start..rows.start + group.end;
                            (format.dots)(xq, kb, at, tw, &mut tile[group.start..], mr);
                        }
                    }
                };
                (wn, block)
            })
            .collect();
        cpu::gemv_by_weight_rows(mr, n, k, 1, chunk, cpu::side_by_side(mr, parts));
    }
    Ok(())
}

/// The k-quant kernels' speed against candle's matmul of the same format and a plain
/// parallel read of the same bytes (`q4k_q8k::speed`, `q6k_q8k::speed`), at 1, 8 and 64
/// rows (`SPEED_M=1,8` picks others, `SPEED_NK=n,k` another shape; `CANDLE_NUM_THREADS`
/// sets the threads).
#[cfg(test)]
pub(super) fn speed(
    dtype: candle_core::quantized::GgmlDType,
    shape: (usize, usize),
    linear: tests::Linear,
) {
    use candle_core::quantized::{QMatMul, QStorage, QTensor};
    use candle_core::{Device, Module, Tensor};
    use std::time::Instant;

    let (n, k) = std::env::var("SPEED_NK")
        .map(|v| {
            let d: Vec<usize> = v.split(',').map(|s| s.parse().unwrap()).collect();
            (d[0], d[1])
        })
        .unwrap_or(shape);
    let w = Tensor::randn(0f32, 1., (n, k), &Device::Cpu).unwrap();
    let one = QTensor::quantize(&w, dtype)
        .unwrap()
        .data()
        .unwrap()
        .into_owned();
    // several matrices (at least 64 MB), so the bytes come from memory, not the cache
    let copies = (64_000_000 / one.len()).max(8);
    let bytes: Vec<Vec<u8>> = (0..copies).map(|_| one.clone()).collect();
    let qms: Vec<QMatMul> = (0..copies)
        .map(|_| {
            let s = QStorage::from_data(std::borrow::Cow::Owned(one.clone()), &Device::Cpu, dtype)
                .unwrap();
            QMatMul::from_qtensor(QTensor::new(s, (n, k)).unwrap()).unwrap()
        })
        .collect();
    let ms: Vec<usize> = std::env::var("SPEED_M")
        .map(|v| v.split(',').map(|s| s.parse().unwrap()).collect())
        .unwrap_or(vec![1, 8, 64]);
    for m in ms {
        let x = Tensor::randn(0f32, 1., (m, k), &Device::Cpu).unwrap();
        let xv: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let mut out = vec![0f32; m * n];
        let (mut ours, mut theirs, mut read) = (f64::MAX, f64::MAX, f64::MAX);
        for _ in 0..5 {
            let t = Instant::now();
            for b in &bytes {
                linear(&xv, m, k, b, n, &mut out).unwrap();
            }
            ours = ours.min(t.elapsed().as_secs_f64() / copies as f64);
            let t = Instant::now();
            for qm in &qms {
                let _ = qm.forward(&x).unwrap();
            }
            theirs = theirs.min(t.elapsed().as_secs_f64() / copies as f64);
            let t = Instant::now();
            for b in &bytes {
                let s: u64 = cpu::in_pool(|| {
                    use rayon::prelude::*;
                    b.par_chunks(1 << 16)
                        .map(|c| {
                            c.chunks_exact(8)
                                .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
                                .fold(0u64, |a, b| a ^ b)
                        })
                        .reduce(|| 0, |a, b| a ^ b)
                });
                std::hint::black_box(s);
            }
            read = read.min(t.elapsed().as_secs_f64() / copies as f64);
        }
        let gb = one.len() as f64 / 1e9;
        eprintln!(
            "{dtype:?} {n}x{k} m={m}: ours {:.3} ms ({:.1} GB/s), candle {:.3} ms ({:.1} GB/s), read {:.3} ms ({:.1} GB/s)",
            ours * 1e3, gb / ours, theirs * 1e3, gb / theirs, read * 1e3, gb / read
        );
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::{Device, Module, Tensor};

    use crate::kernels::cpu::test_data as data;

    /// Activations with heavy tails and a zero super-block (the all-zero rounding case).
    pub(crate) fn activations(m: usize, k: usize, seed: u32) -> Vec<f32> {
        let mut x: Vec<f32> = data(m * k, seed)
            .iter()
            .enumerate()
            .map(|(i, &v)| v * v * v * (1.0 + (i % 97 == 0) as u8 as f32 * 20.0))
            .collect();
        if m * k >= 2 * QK_K {
            x[QK_K..2 * QK_K].fill(0.0);
        }
        x
    }

    /// `transposed` is what the bodies' unpack instructions do, and only orders whose lanes
    /// hold whole runs pass the check.
    #[test]
    fn storage_orders() {
        let src: [[u8; 16]; 4] =
            std::array::from_fn(|v| std::array::from_fn(|l| (16 * v + l) as u8));
        let units = transposed(&src);
        // vector 1's lane 4·2 + 3 holds source 3's lane 4·2 + 1: unit 16·3 + 9
        assert_eq!(units[16 + 4 * 2 + 3], 57);
        assert!(lanes_hold_runs(&units));
        assert_eq!(lane_scales(&units, 1)[4 * 2 + 3], 14);
        let natural: Units = std::array::from_fn(|j| j as u8);
        assert!(!lanes_hold_runs(&natural));
        let mut twice = units;
        twice[5] = twice[6];
        assert!(!lanes_hold_runs(&twice));
    }

    /// The rounding equals candle's `BlockQ8K::from_float` byte for byte (candle's Q8_K
    /// tensor bytes: f32 `d`, 256 `i8`, 16 `i16` sums per super-block).
    #[test]
    fn activation_rounding_is_candles_bit_for_bit() {
        // a few rows, and more than GEMV_ROWS (rounded on the pool)
        for m in [3, GEMV_ROWS + 8] {
            rounding_is_candles(m, 768);
        }
    }

    fn rounding_is_candles(m: usize, k: usize) {
        let mut x = activations(m, k, 4);
        // a super-block whose largest value is −127 (scale 1), with exact ties: half-way
        // values round away from zero
        let ties = &mut x[2 * QK_K..3 * QK_K];
        for (i, v) in ties.iter_mut().enumerate() {
            *v = (i as f32 - 128.0) / 2.0 + 0.25 * (i % 3 == 0) as u8 as f32;
        }
        ties[7] = -127.0;
        // a storage order that moves every unit (the Q6_K bodies' order)
        let src: [[u8; 16]; 4] =
            std::array::from_fn(|v| std::array::from_fn(|l| (16 * v + l) as u8));
        let units = transposed(&src);
        assert!(lanes_hold_runs(&units));
        let mine = quantize_rows(&x, m, k, &units);
        let t = Tensor::from_vec(x, (m, k), &Device::Cpu).unwrap();
        let theirs = QTensor::quantize(&t, GgmlDType::Q8K).unwrap();
        let bytes = theirs.data().unwrap();
        assert_eq!(bytes.len(), m * k / QK_K * 292);
        for (b, blk) in bytes.chunks_exact(292).enumerate() {
            let d = f32::from_le_bytes(blk[0..4].try_into().unwrap());
            assert_eq!(d.to_bits(), mine.d[b].to_bits(), "super-block {b}: d");
            for (j, &u) in units.iter().enumerate() {
                for e in 0..4 {
                    let p = 4 * u as usize + e;
                    let q = mine.qs[QK_K * b + 4 * j + e];
                    assert_eq!(q as u8, blk[4 + p], "super-block {b} value {p}");
                }
            }
            for (lane, &u) in units[..16].iter().enumerate() {
                let run = u as usize / 4;
                let sum = i16::from_le_bytes([blk[260 + 2 * run], blk[261 + 2 * run]]);
                let want = sum as f32 * mine.d[b];
                let got = mine.sums_dx[16 * b + lane];
                assert_eq!(got.to_bits(), want.to_bits(), "super-block {b} lane {lane}");
            }
        }
    }

    /// The AVX-512 super-block rounding equals its portable reference bit for bit,
    /// including the cases candle's test data never reaches: repeated and negative
    /// maxima, NaN and infinite values, a zero block, values that are all ties.
    #[test]
    fn vector_rounding_is_the_portable_one() {
        if cpu::simd_level() != cpu::SimdLevel::Avx512 {
            return;
        }
        let mut blocks: Vec<Vec<f32>> = (0..8).map(|s| activations(1, QK_K, 40 + s)).collect();
        blocks.push(vec![0.0; QK_K]);
        let mut b = blocks[0].clone();
        (b[3], b[200]) = (-9.0, 9.0); // the first of two maxima of opposite sign
        blocks.push(b);
        let mut b = blocks[1].clone();
        (b[10], b[11]) = (f32::NAN, -f32::NAN);
        blocks.push(b);
        let mut b = blocks[2].clone();
        b[77] = f32::INFINITY;
        blocks.push(b);
        let mut b: Vec<f32> = (0..QK_K).map(|i| (i as f32 - 128.0) / 2.0).collect();
        b[5] = -127.0; // scale 1: every other value is a tie
        blocks.push(b);
        blocks.push(vec![f32::NAN; QK_K]);
        for (i, xs) in blocks.iter().enumerate() {
            let (mut qa, mut sa) = ([0i8; QK_K], [0i16; 16]);
            let (mut qb, mut sb) = ([0i8; QK_K], [0i16; 16]);
            let da = quantize_block_portable(xs, &mut qa, &mut sa);
            // SAFETY: AVX-512F checked above; the buffers have the sizes required.
            let db = unsafe { avx512::quantize_block(xs, &mut qb, &mut sb) };
            assert_eq!(da.to_bits(), db.to_bits(), "block {i}: d");
            assert_eq!(qa, qb, "block {i}: values");
            assert_eq!(sa, sb, "block {i}: sums");
        }
    }

    /// The AVX-512 unit shuffle stores what the unit-by-unit copy stores, for the formats'
    /// orders and an arbitrary permutation of the 64 units.
    #[test]
    fn vector_unit_shuffle_is_the_portable_one() {
        if cpu::simd_level() != cpu::SimdLevel::Avx512 {
            return;
        }
        let q: [i8; QK_K] = std::array::from_fn(|i| (i as i32 * 37 % 251 - 125) as i8);
        let mut any: Units = std::array::from_fn(|j| j as u8);
        for j in (1..64).rev() {
            any.swap(j, (j * 7919 + 13) % (j + 1));
        }
        let orders = [
            super::super::q4k_q8k::UNITS,
            super::super::q6k_q8k::UNITS,
            super::super::q2k_q8k::UNITS,
            any,
        ];
        for (o, units) in orders.iter().enumerate() {
            let shuffle = UnitShuffle::of(units);
            let (mut a, mut b) = ([0i8; QK_K], [0i8; QK_K]);
            shuffle.apply_portable(&q, &mut a);
            // SAFETY: AVX-512F checked above.
            unsafe { avx512::shuffle_units(&shuffle, &q, &mut b) };
            assert_eq!(a, b, "order {o}");
        }
    }

    /// A test matrix quantized by candle to `dtype`: rows of different magnitudes and an
    /// offset that changes every `run` values, so that scales (and mins) vary, negative
    /// ones included where the format has them.
    pub(crate) fn test_weight(
        dtype: GgmlDType,
        run: usize,
        n: usize,
        k: usize,
        seed: u32,
    ) -> QTensor {
        let v: Vec<f32> = data(n * k, seed)
            .iter()
            .enumerate()
            .map(|(i, &v)| v * (1.0 + (i / k % 5) as f32) + 0.1 * (i / run % 3) as f32)
            .collect();
        let w = Tensor::from_vec(v, (n, k), &Device::Cpu).unwrap();
        QTensor::quantize(&w, dtype).unwrap()
    }

    /// The format's natural decoding of `q`'s blocks (weight `d·sc·q − dmin·mn`, the
    /// portable body's reading) equals candle's dequantization within f32 rounding;
    /// returns the decoded blocks for the format's own checks of what the data reached.
    pub(crate) fn natural_is_candles_dequantize(format: &Format, q: &QTensor) -> Vec<NaturalBlock> {
        let bytes = q.data().unwrap().into_owned();
        let want: Vec<f32> = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let mut blocks = Vec::new();
        for (b, blk) in bytes.chunks_exact(format.block_bytes).enumerate() {
            let w = (format.natural)(blk);
            for p in 0..QK_K {
                let r = p / 16;
                let got = w.d * w.sc[r] as f32 * w.q[p] as f32 - w.dmin * w.mn[r] as f32;
                let want = want[QK_K * b + p];
                assert!(
                    (got - want).abs() <= 1e-6 * (1.0 + want.abs()),
                    "{} super-block {b} weight {p}: {got} vs {want}",
                    format.name
                );
            }
            blocks.push(w);
        }
        blocks
    }

    /// A format's dots bodies for [`matches_candle`], each with the body level it needs
    /// (`Vnni` runs where `body()` is `Vnni`; `Avx512` also where it is `Vnni`; `Avx2`
    /// wherever a vector body runs).
    pub(crate) type BodyList = Vec<(&'static str, Body, Dots)>;
    /// A format's dots body.
    pub(crate) type Dots =
        unsafe fn(&Q8kRows, usize, std::ops::Range<usize>, &[u8], &mut [f32], usize);
    /// A format's `linear`.
    pub(crate) type Linear = fn(&[f32], usize, usize, &[u8], usize, &mut [f32]) -> Result<()>;

    /// Whether this CPU runs `needs`'s body.
    fn runs(needs: Body) -> bool {
        match needs {
            Body::Vnni => body() == Body::Vnni,
            Body::Avx512 => matches!(body(), Body::Vnni | Body::Avx512),
            Body::Avx2 => body() != Body::Portable,
            Body::Portable => true,
        }
    }

    /// Against candle's matmul (its own activation rounding, its VNNI or portable dot
    /// products): the integer dot products are exact on both sides, so only float
    /// rounding and the order of the float sums differ. The driver on GEMV sizes and more
    /// rows than one chunk, and every body this CPU has (over all rows at once: groups),
    /// the portable reference included. `weight(n, k, seed)` is candle's quantization of a
    /// test matrix in the format.
    pub(crate) fn matches_candle(
        format: &Format,
        linear: Linear,
        weight: impl Fn(usize, usize, u32) -> QTensor,
        bodies: BodyList,
    ) {
        for &(m, k, n) in &[
            (1, 256, 3),
            (1, 2048, 70),
            (2, 512, 33),
            (5, 1280, 17),
            (9, 512, 9),
            (GEMV_ROWS, 768, 21),
            (GEMV_ROWS + 3, 512, 19),
            (70, 1024, 40),
        ] {
            let q = weight(n, k, 11 + m as u32);
            let bytes = q.data().unwrap().into_owned();
            let x = activations(m, k, 5 + n as u32);
            let mut got = vec![f32::NAN; m * n];
            linear(&x, m, k, &bytes, n, &mut got).unwrap();
            let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
            let want: Vec<f32> = QMatMul::from_qtensor(q)
                .unwrap()
                .forward(&xt)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let (kb, xq) = (k / QK_K, quantize_rows(&x, m, k, &format.units));
            let row_bytes = kb * format.block_bytes;
            // every body over all weight rows in one call, its outputs `m + 2` apart (the
            // gaps must stay untouched), and the portable one row at a time
            let stride = m + 2;
            let mut all: Vec<(&str, Vec<f32>)> = Vec::new();
            for (name, needs, dots) in &bodies {
                if runs(*needs) {
                    let mut v = vec![f32::NAN; n * stride];
                    // SAFETY: this CPU has the body's features (`runs`).
                    unsafe { dots(&xq, kb, 0..m, &bytes[..n * row_bytes], &mut v, stride) };
                    assert!(v.chunks(stride).all(|c| c[m..].iter().all(|g| g.is_nan())));
                    all.push((name, v));
                }
            }
            for j in 0..n {
                let row = &bytes[j * row_bytes..][..row_bytes];
                let mut p = vec![0f32; m];
                dots_portable(format, &xq, kb, 0..m, row, &mut p, m);
                let mut results = vec![("portable", p)];
                for (name, v) in &all {
                    results.push((name, v[j * stride..j * stride + m].to_vec()));
                }
                for i in 0..m {
                    let mag: f32 = x[i * k..(i + 1) * k].iter().map(|v| v.abs()).sum::<f32>() * 8.0;
                    let w = want[i * n + j];
                    let kernel = [("kernel", got[i * n + j])];
                    let others = results.iter().map(|(what, v)| (*what, v[i]));
                    for (what, v) in kernel.into_iter().chain(others) {
                        assert!(
                            (v - w).abs() <= 1e-5 * (1.0 + mag),
                            "{} {what} m={m} k={k} n={n} ({i},{j}): {v} vs candle {w}",
                            format.name
                        );
                    }
                }
            }
        }
    }

    /// How the weight rows are split over threads, and which rows share a chunk, does not
    /// change a bit of a row's result.
    pub(crate) fn results_do_not_depend_on_the_split(linear: Linear, weight: &QTensor) {
        let (n, k) = weight.shape().dims2().unwrap();
        let bytes = weight.data().unwrap().into_owned();
        let m = GEMV_ROWS + 5;
        let x = activations(m, k, 9);
        let mut all = vec![0f32; m * n];
        linear(&x, m, k, &bytes, n, &mut all).unwrap();
        for i in [0, 7, GEMV_ROWS, m - 1] {
            let mut one = vec![0f32; n];
            linear(&x[i * k..(i + 1) * k], 1, k, &bytes, n, &mut one).unwrap();
            for j in 0..n {
                assert_eq!(
                    one[j].to_bits(),
                    all[i * n + j].to_bits(),
                    "row {i} col {j}"
                );
            }
        }
    }

    /// Several weights side by side give, bit for bit, what each gives alone: at one row
    /// (a decode step), a few, and more than a GEMV's rows; weights of unequal lengths
    /// whose rows the threads' ranges straddle. Too few bytes in any weight is an error.
    #[test]
    fn side_by_side_weights_are_each_alone() {
        for dtype in [GgmlDType::Q4K, GgmlDType::Q6K, GgmlDType::Q2K] {
            let format = format_of(dtype).expect("a k-quant");
            let k = 512;
            let weights: Vec<Vec<u8>> = [(96, 1), (37, 2), (8, 3), (200, 4)]
                .iter()
                .map(|&(n, seed)| {
                    test_weight(dtype, 16, n, k, seed)
                        .data()
                        .unwrap()
                        .into_owned()
                })
                .collect();
            let ns = [96, 37, 8, 200];
            let parts: Vec<(&[u8], usize)> = weights.iter().map(|w| w.as_slice()).zip(ns).collect();
            let total: usize = ns.iter().sum();
            for m in [1, 3, GEMV_ROWS + 3] {
                let x = activations(m, k, 11);
                let mut all = vec![f32::NAN; m * total];
                linear_many(format, &x, m, k, &parts, &mut all).unwrap();
                let mut at = 0;
                for (w, n) in &parts {
                    let mut one = vec![f32::NAN; m * n];
                    linear(format, &x, m, k, w, *n, &mut one).unwrap();
                    for i in 0..m {
                        for j in 0..*n {
                            assert_eq!(
                                one[i * n + j].to_bits(),
                                all[i * total + at + j].to_bits(),
                                "{dtype:?} m={m} row {i}, weight column {j} at {at}"
                            );
                        }
                    }
                    at += n;
                }
            }
            let mut short = parts.clone();
            short[2].0 = &short[2].0[..short[2].0.len() - 1];
            let mut out = vec![0f32; total];
            let err = linear_many(format, &activations(1, k, 2), 1, k, &short, &mut out);
            assert!(err.is_err(), "{dtype:?}: a short weight is an error");
        }
    }

    /// A row length that is not a multiple of 256, or too few weight bytes, is an error.
    /// `k = 0`: every product is 0, written over whatever the output held.
    pub(crate) fn no_columns_give_zeros(linear: Linear) {
        for m in [1, 2] {
            let mut out = vec![f32::NAN; m * 3];
            linear(&[], m, 0, &[], 3, &mut out).unwrap();
            assert!(out.iter().all(|&v| v == 0.0), "m={m}: {out:?}");
        }
    }

    pub(crate) fn bad_sizes_are_an_error(linear: Linear, block_bytes: usize) {
        let mut out = vec![0f32; 2];
        assert!(linear(&[0.0; 128], 1, 128, &vec![0; 2 * block_bytes], 2, &mut out).is_err());
        assert!(linear(&[0.0; 256], 1, 256, &vec![0; block_bytes], 2, &mut out).is_err());
    }
}
