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
//! - up to [`GEMV_ROWS`](super::cpu::GEMV_ROWS) rows: each weight super-block is decoded once (nibbles, the scale
//!   vectors) for all rows, weight rows split across the kernel pool; AVX-512BW bodies
//!   (`vpmaddubsw` / `vpmaddwd`), the same on 256-bit vectors where the CPU has AVX2 but
//!   not AVX-512BW, a portable body elsewhere.
//! - more rows: the same, [`GEMV_ROWS`](super::cpu::GEMV_ROWS) rows at a time (compute-bound there; the weight is
//!   read once per chunk).
//!
//! The reference is candle's own Q4_K matmul (`QTensor` forward): the integer sums are
use half::f16;

use super::q8k::{self, Format, Q8kRows, QK_K};
use candle_core::Result;

/// Bytes per Q4_K super-block.
const BLOCK_BYTES: usize = 144;

/// Where sub-block `s` of a super-block's activations is stored in [`Q8kRows::qs`]: the
/// order 0 2 1 3 4 6 5 7, so one 64-byte load lines up with the low (or high) nibbles of
/// 64 weight bytes.
const STORED_AT: q8k::Order = [0, 2, 1, 3, 4, 6, 5, 7];

/// The format [`q8k::linear`] runs.
const Q4K: Format = Format {
    name: "q4_k",
    block_bytes: BLOCK_BYTES,
    order: STORED_AT,
    dots,
};

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
    q8k::linear(&Q4K, x, m, k, w, n, out)
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

fn dots(xq: &Q8kRows, kb: usize, rows: std::ops::Range<usize>, row: &[u8], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if q8k::use_avx512bw() {
        // SAFETY: the CPU has AVX-512F/BW/VL, AVX2, FMA and F16C (detected).
        return unsafe { avx512::dots(xq, kb, rows, row, out) };
    }
    #[cfg(target_arch = "x86_64")]
    if q8k::use_avx2() {
        // SAFETY: the CPU has AVX2, FMA and F16C (detected).
        return unsafe { avx2::dots(xq, kb, rows, row, out) };
    }
    dots_portable(xq, kb, rows, row, out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::{Device, Module, Tensor};

    use crate::kernels::cpu::{test_data as data, GEMV_ROWS};
    use crate::kernels::q8k::tests::activations;

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
            let xq = q8k::quantize_rows(&x, m, k, &STORED_AT);
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
                    if q8k::use_avx2() {
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
    use crate::kernels::cpu;
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
