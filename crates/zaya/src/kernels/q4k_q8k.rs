//! Products against Q4_K weights with the activations rounded to Q8_K, in integers: the
//! arithmetic of candle's (llama.cpp's) Q4_K matmul — each activation row rounded per 256
//! values to `d·q` with `q` in `i8` exactly as candle's `BlockQ8K::from_float` does, the
//! nibbles multiplied by `q` in 16-bit pairs, scaled by the 6-bit sub-block scales in 32-bit
//! integers, one float scale per super-block — but reading the GGUF blocks in place. candle
//! repacks every Q4_K matrix into 16-row tiles on first use and keeps the tiles beside the
//! blocks (resident memory about 2.3× the weights, and the first pass over each expert
//! pays the repacking); this kernel needs no second copy.
//!
//! Q4_K super-block (144 bytes): f16 `d`, f16 `dmin`, 12 bytes of 6-bit scales and mins of
//! eight sub-blocks of 32, 128 bytes of nibbles (bytes `32c..32c+32`: weights `64c..64c+32`
//! in the low nibbles, `64c+32..64c+64` in the high ones). Weight `= d·sc_s·q − dmin·m_s`,
//! so `x·w = d·dx·Σ_s sc_s·Σ q·qx − dmin·dx·Σ_s m_s·Σ qx` with integer inner sums.
//!
//! - up to [`GEMV_ROWS`] rows: each weight super-block is decoded once (nibbles, the scale
//!   vectors) for all rows, weight rows split across the kernel pool; AVX-512BW bodies
//!   (`vpmaddubsw` / `vpmaddwd`), the same on 256-bit vectors where the CPU has AVX2 but
//!   not AVX-512BW, a portable body elsewhere.
//! - more rows: the same, [`GEMV_ROWS`] rows at a time (compute-bound there; the weight is
//!   read once per chunk).
//!
//! The reference is candle's own Q4_K matmul (`QTensor` forward): the integer sums are
//! exact in both, so the results differ only by the order of the float sums.

use half::f16;

use super::cpu::{self, GEMV_ROWS};
use super::KernelError;
use candle_core::Result;

/// Weights per super-block.
const QK_K: usize = 256;
/// Bytes per Q4_K super-block.
const BLOCK_BYTES: usize = 144;

/// Activation rows rounded to Q8_K (candle's `BlockQ8K::from_float`, bit for bit), with
/// the values of each super-block stored in the order the kernel reads them.
struct Q8kRows {
    /// Per row and super-block, the scale `d` (value `= d·q`).
    d: Vec<f32>,
    /// Per row and super-block, 256 values: sub-blocks of 32 in the order 0 2 1 3 4 6 5 7,
    /// so one 64-byte load lines up with the low (or high) nibbles of 64 weight bytes.
    qs: Vec<i8>,
    /// Per row and super-block, the sums of each run of 16 values (natural order).
    bsums: Vec<i16>,
}

/// Where sub-block `s` of a super-block's values is stored in [`Q8kRows::qs`].
const STORED_AT: [usize; 8] = [0, 2, 1, 3, 4, 6, 5, 7];

/// `m` rows of `k` values (`k` a multiple of 256) rounded to Q8_K as candle does:
/// `iscale = −127 / max` with `max` the first value of largest magnitude,
/// `q = clamp(round(iscale·x), −128, 127)`, `d = 1 / iscale` (all zero for a zero block).
fn quantize_rows(x: &[f32], m: usize, k: usize) -> Q8kRows {
    let kb = k / QK_K;
    let mut rows = Q8kRows {
        d: vec![0f32; m * kb],
        qs: vec![0i8; m * k],
        bsums: vec![0i16; m * kb * 16],
    };
    for (b, xs) in x[..m * k].chunks_exact(QK_K).enumerate() {
        let qs = &mut rows.qs[QK_K * b..QK_K * (b + 1)];
        let bsums = &mut rows.bsums[16 * b..16 * b + 16];
        rows.d[b] = quantize_block(xs, qs, bsums);
    }
    rows
}

/// One super-block of [`quantize_rows`]: returns `d` and writes the values (stored order)
/// and the sums of 16; a zero block leaves both untouched (zeros) and returns 0.
fn quantize_block(xs: &[f32], qs: &mut [i8], bsums: &mut [i16]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if cpu::simd_level() == cpu::SimdLevel::Avx512 {
        // SAFETY: AVX-512F was detected on this CPU.
        return unsafe { avx512::quantize_block(xs, qs, bsums) };
    }
    quantize_block_portable(xs, qs, bsums)
}

/// [`quantize_block`]'s reference: [`round_block`], then the sums and the reordering.
fn quantize_block_portable(xs: &[f32], qs: &mut [i8], bsums: &mut [i16]) -> f32 {
    let mut q = [0i8; QK_K];
    let d = round_block(xs, &mut q);
    if d == 0.0 {
        return 0.0;
    }
    for (s, sum) in bsums[..16].iter_mut().enumerate() {
        *sum = q[16 * s..16 * s + 16]
            .iter()
            .map(|&v| v as i32)
            .sum::<i32>() as i16;
    }
    for (s, at) in STORED_AT.iter().enumerate() {
        qs[32 * at..32 * at + 32].copy_from_slice(&q[32 * s..32 * s + 32]);
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

/// The eight 6-bit scales and eight 6-bit mins of a Q4_K super-block (the 12 bytes at 4),
/// as two little-endian u64 of one byte each (llama.cpp's unpacking).
#[inline(always)]
fn scales_and_mins(blk: &[u8]) -> (u64, u64) {
    const K1: u32 = 0x3f3f_3f3f;
    const K2: u32 = 0x0f0f_0f0f;
    const K3: u32 = 0x0303_0303;
    let w = |i: usize| u32::from_le_bytes([blk[4 + i], blk[5 + i], blk[6 + i], blk[7 + i]]);
    let (u0, u1, u2) = (w(0), w(4), w(8));
    let sc_lo = u0 & K1;
    let sc_hi = (u2 & K2) | (((u0 >> 6) & K3) << 4);
    let mn_lo = u1 & K1;
    let mn_hi = ((u2 >> 4) & K2) | (((u1 >> 6) & K3) << 4);
    (
        sc_lo as u64 | (sc_hi as u64) << 32,
        mn_lo as u64 | (mn_hi as u64) << 32,
    )
}

#[inline(always)]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// `out[i] = x_i · w` for the rows `rows` of `xq` against one Q4_K weight row: the
/// portable body (the same integer sums as the AVX-512 one, float sums in row order).
fn dots_portable(
    xq: &Q8kRows,
    kb: usize,
    rows: std::ops::Range<usize>,
    row: &[u8],
    out: &mut [f32],
) {
    for (o, i) in out.iter_mut().zip(rows) {
        let mut acc = 0f32;
        for (b, blk) in row.chunks_exact(BLOCK_BYTES).enumerate() {
            let at = i * kb + b;
            let (sc, mn) = scales_and_mins(blk);
            let qs = &xq.qs[QK_K * at..QK_K * (at + 1)];
            let bs = &xq.bsums[16 * at..16 * at + 16];
            let (mut sumi, mut summ) = (0i32, 0i32);
            for s in 0..8 {
                let (scale, min) = ((sc >> (8 * s)) as u8 as i32, (mn >> (8 * s)) as u8 as i32);
                let bytes = &blk[16 + 32 * (s / 2)..16 + 32 * (s / 2) + 32];
                let x = &qs[32 * STORED_AT[s]..32 * STORED_AT[s] + 32];
                let dot: i32 = bytes
                    .iter()
                    .zip(x)
                    .map(|(&b, &q)| (if s % 2 == 0 { b & 0xF } else { b >> 4 }) as i32 * q as i32)
                    .sum();
                sumi += scale * dot;
                summ += min * (bs[2 * s] as i32 + bs[2 * s + 1] as i32);
            }
            let dx = xq.d[at];
            acc += f16_at(blk, 0) * dx * sumi as f32 - f16_at(blk, 2) * dx * summ as f32;
        }
        *o = acc;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{scales_and_mins, Q8kRows, BLOCK_BYTES, QK_K};
    use std::arch::x86_64::*;

    /// `vpermw` indices that spread the scales of two sub-blocks over the 16-bit lanes of
    /// one product vector (lanes 0..16: the first, 16..32: the second).
    const fn pair(a: i16, b: i16) -> [i16; 32] {
        let mut v = [a; 32];
        let mut i = 16;
        while i < 32 {
            v[i] = b;
            i += 1;
        }
        v
    }
    const PAIRS: [[i16; 32]; 4] = [pair(0, 2), pair(1, 3), pair(4, 6), pair(5, 7)];
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
            m = _mm512_max_ps(_mm512_andnot_ps(sign, load(c)), m);
        }
        let amax = _mm512_reduce_max_ps(m);
        if amax == 0.0 {
            return 0.0;
        }
        let target = _mm512_set1_ps(amax);
        let mut max = amax;
        for c in 0..16 {
            let hit = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(_mm512_andnot_ps(sign, load(c)), target);
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
            let frac = _mm512_andnot_ps(sign, _mm512_sub_ps(t, r));
            let up = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(frac, half);
            let away = _mm512_or_ps(one, _mm512_and_ps(sign, t));
            let r = _mm512_min_ps(_mm512_max_ps(_mm512_mask_add_ps(r, up, r, away), lo), hi);
            let ordered = _mm512_cmp_ps_mask::<_CMP_ORD_Q>(t, t);
            let v = _mm512_maskz_cvttps_epi32(ordered, r);
            *sum = _mm512_reduce_add_epi32(v) as i16;
            let at = 32 * super::STORED_AT[c / 2] + 16 * (c % 2);
            _mm_storeu_si128(
                qs.as_mut_ptr().add(at) as *mut __m128i,
                _mm512_cvtsepi32_epi8(v),
            );
        }
        1.0 / iscale
    }

    /// How far ahead of the block being decoded [`dots`] prefetches the weight row.
    const PREFETCH_BYTES: usize = 2048;

    /// One super-block's decoded weights: the nibbles as four vectors of 64 bytes (sub-block
    /// pairs 0 2, 1 3, 4 6, 5 7), the matching scale vectors, each min twice, `d`, `dmin`.
    /// (expanded in place: a call would pass the vectors through memory)
    macro_rules! decode {
        ($blk:expr, $pairs:expr) => {{
            let blk: &[u8] = $blk;
            // both f16 scales in one conversion (exact, like `half`)
            let bits = i32::from_le_bytes([blk[0], blk[1], blk[2], blk[3]]);
            let dd = _mm_cvtph_ps(_mm_cvtsi32_si128(bits));
            let (d, dmin) = (_mm_cvtss_f32(dd), _mm_cvtss_f32(_mm_movehdup_ps(dd)));
            let (sc, mn) = scales_and_mins(blk);
            let sc16 = _mm512_castsi128_si512(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(sc as i64)));
            let p: &[__m512i; 4] = $pairs;
            let scales = [
                _mm512_permutexvar_epi16(p[0], sc16),
                _mm512_permutexvar_epi16(p[1], sc16),
                _mm512_permutexvar_epi16(p[2], sc16),
                _mm512_permutexvar_epi16(p[3], sc16),
            ];
            // each min twice: it applies to two runs of 16 sums
            let mn8 = _mm_cvtsi64_si128(mn as i64);
            let mins = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(mn8, mn8));
            let low = _mm512_set1_epi8(0x0F);
            assert!(blk.len() >= BLOCK_BYTES);
            // SAFETY: a block is 144 bytes with its nibbles at 16..144.
            let (q0, q1) = unsafe {
                let p = blk.as_ptr().add(16);
                (
                    _mm512_loadu_si512(p as *const _),
                    _mm512_loadu_si512(p.add(64) as *const _),
                )
            };
            let w = [
                _mm512_and_si512(q0, low),
                _mm512_and_si512(_mm512_srli_epi16(q0, 4), low),
                _mm512_and_si512(q1, low),
                _mm512_and_si512(_mm512_srli_epi16(q1, 4), low),
            ];
            (w, scales, mins, d, dmin)
        }};
    }

    /// `out[i] = x_i · w` for the rows `rows` of `xq` against one Q4_K weight row: groups
    /// of up to eight rows, each group's sums in registers over the weight row (the
    /// super-block is decoded once per group; eight rather than four: 4096 × 2048 from
    /// memory, Zen 4, 2 threads, 8 rows 7.1 → 8.3 GB/s, 16 rows 3.6 → 4.0).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    pub(super) fn dots(
        xq: &Q8kRows,
        kb: usize,
        rows: std::ops::Range<usize>,
        row: &[u8],
        out: &mut [f32],
    ) {
        debug_assert!(out.len() == rows.len() && row.len() == kb * BLOCK_BYTES);
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
                _ => o.copy_from_slice(&dot_rows::<1>(xq, kb, i, row)),
            }
            i += o.len();
        }
    }

    /// `x_i · w` for rows `i0..i0 + R` of `xq` against one Q4_K weight row.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    fn dot_rows<const R: usize>(xq: &Q8kRows, kb: usize, i0: usize, row: &[u8]) -> [f32; R] {
        assert!(xq.d.len() >= (i0 + R) * kb && row.len() >= kb * BLOCK_BYTES);
        // SAFETY (all loads): `PAIRS` holds 4 × 64 bytes; rows `i0..i0 + R` of `xq` hold
        // `kb` super-blocks of 256 values and 16 sums each (asserted through `d`).
        let pairs = PAIRS.map(|p| unsafe { _mm512_loadu_si512(p.as_ptr() as *const _) });
        let mut acc = [_mm512_setzero_ps(); R];
        let mut accm = [_mm256_setzero_ps(); R];
        for (b, blk) in row.chunks_exact(BLOCK_BYTES).enumerate() {
            // The weight stream ~2 KiB ahead, each of its cache lines once (a block is 144
            // bytes; past this row it is the next one's, which the thread reads next). The
            // hardware prefetcher alone left the loads waiting: 4096 × 2048 from memory,
            // 2 threads, Zen 4, same-process pairs: 1 row 20 → 23 GB/s, 2 rows 16 → 20.
            // Into L1: this one stream 2 KiB ahead is few lines in flight (into L2 instead:
            // 2 rows 24–25 → 17–19 GB/s, 8 rows 8.5 → 8.0), unlike the bf16 / f32 tiles'
            // prefetch of whole weight rows a tile ahead, which go to L2.
            let ahead = blk.as_ptr().wrapping_add(PREFETCH_BYTES) as *const i8;
            for line in [0, 48, 96] {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line));
            }
            let (w, scales, mins, d, dmin) = decode!(blk, &pairs);
            for r in 0..R {
                let at = (i0 + r) * kb + b;
                let (x, bs, dx) = unsafe {
                    (
                        xq.qs.as_ptr().add(QK_K * at),
                        _mm256_loadu_si256(xq.bsums.as_ptr().add(16 * at) as *const _),
                        *xq.d.get_unchecked(at),
                    )
                };
                let mut sumi = _mm512_setzero_si512();
                for v in 0..4 {
                    let xv = unsafe { _mm512_loadu_si512(x.add(64 * v) as *const _) };
                    let p = _mm512_madd_epi16(_mm512_maddubs_epi16(w[v], xv), scales[v]);
                    sumi = _mm512_add_epi32(sumi, p);
                }
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sumi), _mm512_set1_ps(d * dx), acc[r]);
                let m = _mm256_cvtepi32_ps(_mm256_madd_epi16(mins, bs));
                accm[r] = _mm256_fmadd_ps(m, _mm256_set1_ps(dmin * dx), accm[r]);
            }
        }
        let mut out = [0f32; R];
        for r in 0..R {
            let m = _mm256_add_ps(accm[r], _mm256_permute2f128_ps(accm[r], accm[r], 1));
            let m = _mm256_hadd_ps(m, m);
            let m = _mm256_hadd_ps(m, m);
            out[r] = _mm512_reduce_add_ps(acc[r]) - _mm256_cvtss_f32(m);
        }
        out
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{scales_and_mins, Q8kRows, BLOCK_BYTES, QK_K, STORED_AT};
    use std::arch::x86_64::*;

    /// `vpshufb` controls that spread the 16-bit scale `s` of eight over all lanes.
    const fn spread(s: u8) -> [u8; 32] {
        let mut v = [0u8; 32];
        let mut i = 0;
        while i < 32 {
            v[i] = 2 * s + (i % 2) as u8;
            i += 1;
        }
        v
    }
    const SPREAD: [[u8; 32]; 8] = [
        spread(0),
        spread(1),
        spread(2),
        spread(3),
        spread(4),
        spread(5),
        spread(6),
        spread(7),
    ];

    /// `out[i] = x_i · w` for the rows `rows` of `xq` against one Q4_K weight row, in
    /// groups of four rows (the AVX-512 body's arithmetic on 256-bit vectors, with half its
    /// registers: for CPUs without AVX-512BW, e.g. AMD Zen 3).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn dots(
        xq: &Q8kRows,
        kb: usize,
        rows: std::ops::Range<usize>,
        row: &[u8],
        out: &mut [f32],
    ) {
        debug_assert!(out.len() == rows.len() && row.len() == kb * BLOCK_BYTES);
        let mut i = rows.start;
        for o in out.chunks_mut(4) {
            match o.len() {
                4 => o.copy_from_slice(&dot_rows::<4>(xq, kb, i, row)),
                3 => o.copy_from_slice(&dot_rows::<3>(xq, kb, i, row)),
                2 => o.copy_from_slice(&dot_rows::<2>(xq, kb, i, row)),
                _ => o.copy_from_slice(&dot_rows::<1>(xq, kb, i, row)),
            }
            i += o.len();
        }
    }

    /// `x_i · w` for rows `i0..i0 + R` of `xq` against one Q4_K weight row. Per super-block
    /// and 32-byte nibble chunk: both sub-blocks' weights and scale vectors once, then each
    /// row's `vpmaddubsw` / `vpmaddwd` into its integer sum.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn dot_rows<const R: usize>(xq: &Q8kRows, kb: usize, i0: usize, row: &[u8]) -> [f32; R] {
        assert!(xq.d.len() >= (i0 + R) * kb && row.len() >= kb * BLOCK_BYTES);
        // SAFETY (all loads): `SPREAD` holds 8 × 32 bytes; a block is 144 bytes with its
        // nibbles at 16..144; rows `i0..i0 + R` of `xq` hold `kb` super-blocks of 256
        // values and 16 sums each (asserted through `d`).
        let spread = SPREAD.map(|c| unsafe { _mm256_loadu_si256(c.as_ptr() as *const _) });
        let low = _mm256_set1_epi8(0x0F);
        let mut acc = [_mm256_setzero_ps(); R];
        let mut accm = [_mm256_setzero_ps(); R];
        for (b, blk) in row.chunks_exact(BLOCK_BYTES).enumerate() {
            let bits = i32::from_le_bytes([blk[0], blk[1], blk[2], blk[3]]);
            let dd = _mm_cvtph_ps(_mm_cvtsi32_si128(bits));
            let (d, dmin) = (_mm_cvtss_f32(dd), _mm_cvtss_f32(_mm_movehdup_ps(dd)));
            let (sc, mn) = scales_and_mins(blk);
            let sc16 = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(sc as i64));
            let sc16 = _mm256_broadcastsi128_si256(sc16);
            let xs: [*const i8; R] =
                std::array::from_fn(|r| unsafe { xq.qs.as_ptr().add(QK_K * ((i0 + r) * kb + b)) });
            let mut sumi = [_mm256_setzero_si256(); R];
            for c in 0..4 {
                let q = unsafe { _mm256_loadu_si256(blk.as_ptr().add(16 + 32 * c) as *const _) };
                let (s0, s1) = (2 * c, 2 * c + 1);
                let w0 = _mm256_and_si256(q, low);
                let w1 = _mm256_and_si256(_mm256_srli_epi16(q, 4), low);
                let k0 = _mm256_shuffle_epi8(sc16, spread[s0]);
                let k1 = _mm256_shuffle_epi8(sc16, spread[s1]);
                for r in 0..R {
                    let (x0, x1) = unsafe {
                        (
                            _mm256_loadu_si256(xs[r].add(32 * STORED_AT[s0]) as *const _),
                            _mm256_loadu_si256(xs[r].add(32 * STORED_AT[s1]) as *const _),
                        )
                    };
                    let p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(w0, x0), k0);
                    let p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(w1, x1), k1);
                    sumi[r] = _mm256_add_epi32(sumi[r], _mm256_add_epi32(p0, p1));
                }
            }
            // each min twice: it applies to two runs of 16 sums
            let mn8 = _mm_cvtsi64_si128(mn as i64);
            let mins = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(mn8, mn8));
            for r in 0..R {
                let at = (i0 + r) * kb + b;
                let (bs, dx) = unsafe {
                    (
                        _mm256_loadu_si256(xq.bsums.as_ptr().add(16 * at) as *const _),
                        *xq.d.get_unchecked(at),
                    )
                };
                acc[r] =
                    _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi[r]), _mm256_set1_ps(d * dx), acc[r]);
                let m = _mm256_cvtepi32_ps(_mm256_madd_epi16(mins, bs));
                accm[r] = _mm256_fmadd_ps(m, _mm256_set1_ps(dmin * dx), accm[r]);
            }
        }
        let mut out = [0f32; R];
        for r in 0..R {
            out[r] = hsum(acc[r]) - hsum(accm[r]);
        }
        out
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }
}

/// Whether the AVX2 body runs on this CPU (detected once).
fn use_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *ON.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the AVX-512BW body runs on this CPU (detected once).
fn use_avx512bw() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *ON.get_or_init(|| {
            cpu::simd_level() == cpu::SimdLevel::Avx512
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("f16c")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn dots(xq: &Q8kRows, kb: usize, rows: std::ops::Range<usize>, row: &[u8], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if use_avx512bw() {
        // SAFETY: the CPU has AVX-512F/BW/VL, AVX2, FMA and F16C (detected).
        return unsafe { avx512::dots(xq, kb, rows, row, out) };
    }
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        // SAFETY: the CPU has AVX2, FMA and F16C (detected).
        return unsafe { avx2::dots(xq, kb, rows, row, out) };
    }
    dots_portable(xq, kb, rows, row, out)
}

/// Weight rows that pass over one group of activation rows in [`linear`] (4 rows of a
/// 2048-wide expert are 4.6 KB: with the group's 8 KB of activations, well inside L1).
const WEIGHT_TILE: usize = 4;

/// `out[m×n] = q8k(x)[m×k] · deq(W)ᵀ`: `x` row-major f32, `W` `n` rows of `k / 256` Q4_K
/// super-blocks read in place.
pub(crate) fn linear(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[u8],
    n: usize,
    out: &mut [f32],
) -> Result<()> {
    let kb = k / QK_K;
    let row_bytes = kb * BLOCK_BYTES;
    if !k.is_multiple_of(QK_K) || x.len() < m * k || w.len() < n * row_bytes || out.len() < m * n {
        return Err(KernelError::Internal(format!(
            "q4_k × q8_k linear: k={k} must be a multiple of {QK_K} and the buffers must hold \
             m={m}, n={n} (x {}, w {} bytes, out {})",
            x.len(),
            w.len(),
            out.len()
        ))
        .into());
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    let xq = quantize_rows(x, m, k);
    for r0 in (0..m).step_by(GEMV_ROWS) {
        let rows = r0..(r0 + GEMV_ROWS).min(m);
        let chunk = &mut out[r0 * n..rows.end * n];
        let mr = rows.len();
        cpu::gemv_by_weight_rows(mr, n, k, 1, chunk, |j0, o| {
            // Cache blocking: a group of eight activation rows (8·k bytes) stays in L1 while
            // a tile of weight rows passes over it, instead of every weight row streaming
            // all the rows' activations from L2. Each row's result does not depend on the
            // order (the bodies keep one accumulator per activation row).
            for (t, tile) in o.chunks_mut(WEIGHT_TILE * mr).enumerate() {
                let j = j0 + t * WEIGHT_TILE;
                for g in (0..mr).step_by(8) {
                    let group = g..(g + 8).min(mr);
                    for (r, c) in tile.chunks_mut(mr).enumerate() {
                        let row = &w[(j + r) * row_bytes..(j + r + 1) * row_bytes];
                        let at = rows.start + group.start..rows.start + group.end;
                        dots(&xq, kb, at, row, &mut c[group.clone()]);
                    }
                }
            }
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::{Device, Module, Tensor};

    use crate::kernels::cpu::test_data as data;

    /// A weight quantized to Q4_K by candle, with rows of different magnitudes and offsets
    /// so that scales and mins vary.
    fn q4k_weight(n: usize, k: usize, seed: u32) -> QTensor {
        let v: Vec<f32> = data(n * k, seed)
            .iter()
            .enumerate()
            .map(|(i, &v)| v * (1.0 + (i / k % 5) as f32) + 0.1 * (i / 32 % 3) as f32)
            .collect();
        let w = Tensor::from_vec(v, (n, k), &Device::Cpu).unwrap();
        QTensor::quantize(&w, GgmlDType::Q4K).unwrap()
    }

    /// Activations with heavy tails and a zero super-block (the all-zero rounding case).
    fn activations(m: usize, k: usize, seed: u32) -> Vec<f32> {
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

    /// The rounding equals candle's `BlockQ8K::from_float` byte for byte (candle's Q8_K
    /// tensor bytes: f32 `d`, 256 `i8`, 16 `i16` sums per super-block).
    #[test]
    fn activation_rounding_is_candles_bit_for_bit() {
        let (m, k) = (3, 768);
        let mut x = activations(m, k, 4);
        // a super-block whose largest value is −127 (scale 1), with exact ties: half-way
        // values round away from zero
        let ties = &mut x[2 * QK_K..3 * QK_K];
        for (i, v) in ties.iter_mut().enumerate() {
            *v = (i as f32 - 128.0) / 2.0 + 0.25 * (i % 3 == 0) as u8 as f32;
        }
        ties[7] = -127.0;
        let mine = quantize_rows(&x, m, k);
        let t = Tensor::from_vec(x, (m, k), &Device::Cpu).unwrap();
        let theirs = QTensor::quantize(&t, GgmlDType::Q8K).unwrap();
        let bytes = theirs.data().unwrap();
        assert_eq!(bytes.len(), m * k / QK_K * 292);
        for (b, blk) in bytes.chunks_exact(292).enumerate() {
            let d = f32::from_le_bytes(blk[0..4].try_into().unwrap());
            assert_eq!(d.to_bits(), mine.d[b].to_bits(), "super-block {b}: d");
            for s in 0..8 {
                let stored = &mine.qs[QK_K * b + 32 * STORED_AT[s]..][..32];
                for (t, &q) in stored.iter().enumerate() {
                    assert_eq!(
                        q as u8,
                        blk[4 + 32 * s + t],
                        "super-block {b} value {}",
                        32 * s + t
                    );
                }
            }
            for s in 0..16 {
                let sum = i16::from_le_bytes([blk[260 + 2 * s], blk[261 + 2 * s]]);
                assert_eq!(sum, mine.bsums[16 * b + s], "super-block {b} sum {s}");
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

    /// Against candle's Q4_K matmul (its own activation rounding, its VNNI or portable
    /// dot products): the integer sums are exact on both sides, so only the order of the
    /// float sums differs. GEMV sizes and more rows than one chunk.
    #[test]
    fn matches_candles_q4k_matmul() {
        for &(m, k, n) in &[
            (1, 256, 3),
            (1, 2048, 70),
            (2, 512, 33),
            (5, 1280, 17),
            (7, 512, 9),
            (GEMV_ROWS, 768, 21),
            (GEMV_ROWS + 3, 512, 19),
            (70, 1024, 40),
        ] {
            let q = q4k_weight(n, k, 11 + m as u32);
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
            // the portable body on the same rounding
            let xq = quantize_rows(&x, m, k);
            let row_bytes = k / QK_K * BLOCK_BYTES;
            for i in 0..m {
                for j in 0..n {
                    let mut p = [0f32];
                    dots_portable(
                        &xq,
                        k / QK_K,
                        i..i + 1,
                        &bytes[j * row_bytes..][..row_bytes],
                        &mut p,
                    );
                    // the AVX2 body too where it is not the one dispatched (AVX-512 CPUs)
                    let mut p2 = [p[0]];
                    #[cfg(target_arch = "x86_64")]
                    if use_avx2() {
                        // SAFETY: AVX2, FMA and F16C detected.
                        unsafe {
                            avx2::dots(
                                &xq,
                                k / QK_K,
                                i..i + 1,
                                &bytes[j * row_bytes..][..row_bytes],
                                &mut p2,
                            )
                        };
                    }
                    let mag: f32 = x[i * k..(i + 1) * k].iter().map(|v| v.abs()).sum::<f32>() * 8.0;
                    for (what, v) in [
                        ("kernel", got[i * n + j]),
                        ("portable", p[0]),
                        ("avx2", p2[0]),
                    ] {
                        assert!(
                            (v - want[i * n + j]).abs() <= 1e-5 * (1.0 + mag),
                            "{what} m={m} k={k} n={n} ({i},{j}): {v} vs candle {}",
                            want[i * n + j]
                        );
                    }
                }
            }
        }
    }

    /// How the weight rows are split over threads, and which rows share a chunk, does not
    /// change a bit of a row's result.
    #[test]
    fn results_do_not_depend_on_the_split() {
        let (k, n) = (512, 300);
        let q = q4k_weight(n, k, 21);
        let bytes = q.data().unwrap().into_owned();
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

    #[test]
    fn bad_sizes_are_an_error() {
        let mut out = vec![0f32; 2];
        assert!(linear(&[0.0; 128], 1, 128, &[0; 288], 2, &mut out).is_err());
        assert!(linear(&[0.0; 256], 1, 256, &[0; 144], 2, &mut out).is_err());
    }
}

/// `cargo test --release -p zaya --lib q4k_q8k::speed -- --ignored --nocapture`: this
/// kernel, candle's Q4_K matmul and a plain parallel read of the same bytes, on one
/// expert's gate/up shape of ZAYA1-8B (4096 × 2048), at 1, 8 and 64 rows (`SPEED_M=1,8`
/// picks others; `CANDLE_NUM_THREADS` sets the threads).
#[cfg(test)]
mod speed {
    use super::*;
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::{Device, Module, Tensor};
    use std::time::Instant;

    #[test]
    #[ignore]
    fn speed() {
        let (n, k) = (4096, 2048);
        // several matrices, so the bytes come from memory, not the cache
        let copies = 16;
        let w = Tensor::randn(0f32, 1., (n, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q4K).unwrap();
        let one = q.data().unwrap().into_owned();
        let bytes: Vec<Vec<u8>> = (0..copies).map(|_| one.clone()).collect();
        let qms: Vec<QMatMul> = (0..copies)
            .map(|_| {
                let s = candle_core::quantized::QStorage::from_data(
                    std::borrow::Cow::Owned(one.clone()),
                    &Device::Cpu,
                    GgmlDType::Q4K,
                )
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
                "q4_k m={m}: ours {:.3} ms ({:.1} GB/s), candle {:.3} ms ({:.1} GB/s), read {:.3} ms ({:.1} GB/s)",
                ours * 1e3, gb / ours, theirs * 1e3, gb / theirs, read * 1e3, gb / read
            );
        }
    }
}
