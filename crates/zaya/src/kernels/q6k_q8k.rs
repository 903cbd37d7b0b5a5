//! Products against Q6_K weights with the activations rounded to Q8_K, in integers: the
//! arithmetic of candle's (llama.cpp's) Q6_K matmul — activations rounded by
//! [`super::q8k`] exactly as candle's `BlockQ8K::from_float`, the 6-bit values multiplied
//! by them in 16-bit pairs, scaled by the `i8` scale of each run of 16 in 32-bit integers,
//! the `−32` offset applied once per super-block through the activations' sums of 16, one
//! float scale per super-block — reading the GGUF blocks in place. candle repacks every
//! Q6_K matrix on first use and keeps the copy beside the blocks (ZAYA1-8B in q4_k_m, whose
//! head and 20 layers' v and experts' down projections are Q6_K: +2 GB resident over the
//! file), and the first pass over each expert pays the repacking; this kernel needs neither.
//!
//! Q6_K super-block (210 bytes): 128 bytes `ql` of low nibbles, 64 bytes `qh` of 2-bit
//! pairs, 16 `i8` scales (one per 16 weights), f16 `d`. Half `h` of the block (weights
//! `128h..128h+128`) reads `ql[64h..64h+64]` and `qh[32h..32h+32]`: byte `l` of its `ql`
//! holds weights `l` (low nibble) and `l+64` (high), with `qh[l mod 32]`'s bit pairs
//! 0–1 / 4–5 (`l < 32`) or 2–3 / 6–7 above them. Weight `= d·sc_s·(q − 32)`, so
//! `x·w = d·dx·(Σ_s sc_s·Σ q·qx − 32·Σ_s sc_s·bsum_s)` with integer inner sums.
//!
//! The same driver as Q4_K ([`super::q8k::linear`]): weight rows split over the kernel
//! pool, each super-block decoded once for a group of up to eight activation rows. Bodies:
//! AVX-512BW, AVX2, portable. The reference is candle's own Q6_K matmul (`QTensor`
//! forward): the integer sums are exact in both, so the results differ only by the order
//! of the float sums.

use half::f16;

use super::q8k::{self, Format, Q8kRows, QK_K};
use candle_core::Result;

/// Bytes per Q6_K super-block.
const BLOCK_BYTES: usize = 210;

/// The format [`q8k::linear`] runs: activations in their natural order (a 64-byte load of
/// `ql` holds 64 consecutive weights in its low nibbles and the next 64 in its high ones).
const Q6K: Format = Format {
    name: "q6_k",
    block_bytes: BLOCK_BYTES,
    order: q8k::NATURAL,
    dots,
};

/// `out[m×n] = q8k(x)[m×k] · deq(W)ᵀ`: `x` row-major f32, `W` `n` rows of `k / 256` Q6_K
/// super-blocks read in place.
pub(crate) fn linear(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[u8],
    n: usize,
    out: &mut [f32],
) -> Result<()> {
    q8k::linear(&Q6K, x, m, k, w, n, out)
}

#[inline(always)]
fn d_of(blk: &[u8]) -> f32 {
    f16::from_bits(u16::from_le_bytes([blk[208], blk[209]])).to_f32()
}

/// The 6-bit value (0..64) of weight `p` of a super-block.
#[inline(always)]
fn value(blk: &[u8], p: usize) -> i32 {
    let (h, l) = (p / 128, p % 128);
    let byte = blk[64 * h + l % 64];
    let low = if l < 64 { byte & 0xF } else { byte >> 4 };
    let shift = 2 * (l / 32);
    let high = (blk[128 + 32 * h + l % 32] >> shift) & 3;
    (low | high << 4) as i32
}

/// `out[i] = x_i · w` for the rows `rows` of `xq` against one Q6_K weight row: the
/// portable body (the same integer sums as the vector ones, float sums in row order).
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
            let qs = &xq.qs[QK_K * at..QK_K * (at + 1)];
            let bs = &xq.bsums[16 * at..16 * at + 16];
            let (mut sumi, mut offset) = (0i32, 0i32);
            for s in 0..16 {
                let scale = blk[192 + s] as i8 as i32;
                let dot: i32 = (16 * s..16 * s + 16)
                    .map(|p| value(blk, p) * qs[p] as i32)
                    .sum();
                sumi += scale * dot;
                offset += scale * bs[s] as i32;
            }
            acc += d_of(blk) * xq.d[at] * (sumi - 32 * offset) as f32;
        }
        *o = acc;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Q8kRows, BLOCK_BYTES, QK_K};
    use std::arch::x86_64::*;

    /// `vpermw` indices that spread the 16-bit scales over the products of vector `v`
    /// (weights `64v..64v+64`): 16-bit lane `t` holds the sums of weights `64v+2t` and
    /// `64v+2t+1`, whose scale is number `4v + t/8`.
    const fn spread(v: i16) -> [i16; 32] {
        let mut s = [0i16; 32];
        let mut t = 0;
        while t < 32 {
            s[t] = 4 * v + (t / 8) as i16;
            t += 1;
        }
        s
    }
    const SPREAD: [[i16; 32]; 4] = [spread(0), spread(1), spread(2), spread(3)];

    /// How far ahead of the block being decoded [`dots`] prefetches the weight row (as
    /// the Q4_K kernel; see there for the measurements).
    const PREFETCH_BYTES: usize = 2048;

    /// `out[i] = x_i · w` for the rows `rows` of `xq` against one Q6_K weight row: groups
    /// of up to eight rows, each group's sums in registers over the weight row.
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

    /// `x_i · w` for rows `i0..i0 + R` of `xq` against one Q6_K weight row.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    fn dot_rows<const R: usize>(xq: &Q8kRows, kb: usize, i0: usize, row: &[u8]) -> [f32; R] {
        assert!(xq.d.len() >= (i0 + R) * kb && row.len() >= kb * BLOCK_BYTES);
        // SAFETY (all loads): `SPREAD` holds 4 × 64 bytes; a block is 210 bytes (`ql` at
        // 0..128, `qh` at 128..192, scales at 192..208, `d` at 208); rows `i0..i0 + R` of
        // `xq` hold `kb` super-blocks of 256 values and 16 sums each (asserted through `d`).
        let spread = SPREAD.map(|p| unsafe { _mm512_loadu_si512(p.as_ptr() as *const _) });
        let (low, high) = (_mm512_set1_epi8(0x0F), _mm512_set1_epi8(0x30));
        let mut acc = [_mm512_setzero_ps(); R];
        for (b, blk) in row.chunks_exact(BLOCK_BYTES).enumerate() {
            let ahead = blk.as_ptr().wrapping_add(PREFETCH_BYTES) as *const i8;
            for line in [0, 64, 128, 192] {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line));
            }
            let p = blk.as_ptr();
            let d = super::d_of(blk);
            let sc16 = unsafe { _mm256_cvtepi8_epi16(_mm_loadu_si128(p.add(192) as *const _)) };
            let sc = _mm512_castsi256_si512(sc16);
            let scales = spread.map(|s| _mm512_permutexvar_epi16(s, sc));
            // the 6-bit values of weights 64v..64v+64 in vector v
            let mut w = [_mm512_setzero_si512(); 4];
            for h in 0..2 {
                let (ql, qh) = unsafe {
                    (
                        _mm512_loadu_si512(p.add(64 * h) as *const _),
                        _mm256_loadu_si256(p.add(128 + 32 * h) as *const _),
                    )
                };
                // bytes 0..32 take bits 0–1 / 4–5 of `qh`, bytes 32..64 bits 2–3 / 6–7
                let qh =
                    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(qh), _mm256_srli_epi16::<2>(qh));
                let hi_lo = _mm512_and_si512(_mm512_slli_epi16::<4>(qh), high);
                let hi_hi = _mm512_and_si512(qh, high);
                w[2 * h] = _mm512_or_si512(_mm512_and_si512(ql, low), hi_lo);
                w[2 * h + 1] =
                    _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16::<4>(ql), low), hi_hi);
            }
            for (r, acc) in acc.iter_mut().enumerate() {
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
                // the −32 offset: 32·Σ sc_s·bsum_s, in the low eight lanes
                let offset = _mm256_slli_epi32::<5>(_mm256_madd_epi16(sc16, bs));
                let sumi = _mm512_sub_epi32(sumi, _mm512_zextsi256_si512(offset));
                *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sumi), _mm512_set1_ps(d * dx), *acc);
            }
        }
        acc.map(|a| _mm512_reduce_add_ps(a))
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Q8kRows, BLOCK_BYTES, QK_K};
    use std::arch::x86_64::*;

    /// `vpshufb` controls that pick the scales of sub-block `j` of 32 weights (numbers
    /// `2j` and `2j+1`, eight times each) for `vpmovsxbw`.
    const fn pick(j: u8) -> [u8; 16] {
        let mut v = [0u8; 16];
        let mut i = 0;
        while i < 16 {
            v[i] = 2 * j + (i / 8) as u8;
            i += 1;
        }
        v
    }
    const PICK: [[u8; 16]; 8] = [
        pick(0),
        pick(1),
        pick(2),
        pick(3),
        pick(4),
        pick(5),
        pick(6),
        pick(7),
    ];

    /// `out[i] = x_i · w` for the rows `rows` of `xq` against one Q6_K weight row, in
    /// groups of four rows (the AVX-512 body's arithmetic on 256-bit vectors, for CPUs
    /// without AVX-512BW).
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

    /// `x_i · w` for rows `i0..i0 + R` of `xq` against one Q6_K weight row. Per super-block
    /// and sub-block of 32: its values and scale vector once, then each row's `vpmaddubsw`
    /// / `vpmaddwd` into its integer sum.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn dot_rows<const R: usize>(xq: &Q8kRows, kb: usize, i0: usize, row: &[u8]) -> [f32; R] {
        assert!(xq.d.len() >= (i0 + R) * kb && row.len() >= kb * BLOCK_BYTES);
        // SAFETY (all loads): `PICK` holds 8 × 16 bytes; a block is 210 bytes (`ql` at
        // 0..128, `qh` at 128..192, scales at 192..208); rows `i0..i0 + R` of `xq` hold `kb`
        // super-blocks of 256 values and 16 sums each (asserted through `d`).
        let pick = PICK.map(|c| unsafe { _mm_loadu_si128(c.as_ptr() as *const _) });
        let (low, high) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x30));
        let mut acc = [_mm256_setzero_ps(); R];
        for (b, blk) in row.chunks_exact(BLOCK_BYTES).enumerate() {
            let p = blk.as_ptr();
            let d = super::d_of(blk);
            let sc8 = unsafe { _mm_loadu_si128(p.add(192) as *const _) };
            let xs: [*const i8; R] =
                std::array::from_fn(|r| unsafe { xq.qs.as_ptr().add(QK_K * ((i0 + r) * kb + b)) });
            let mut sumi = [_mm256_setzero_si256(); R];
            for h in 0..2 {
                let (qa, qb, qh) = unsafe {
                    (
                        _mm256_loadu_si256(p.add(64 * h) as *const _),
                        _mm256_loadu_si256(p.add(64 * h + 32) as *const _),
                        _mm256_loadu_si256(p.add(128 + 32 * h) as *const _),
                    )
                };
                // sub-blocks 4h..4h+4: weights 128h + 32j + (0..32)
                let w = [
                    _mm256_or_si256(
                        _mm256_and_si256(qa, low),
                        _mm256_and_si256(_mm256_slli_epi16::<4>(qh), high),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(qb, low),
                        _mm256_and_si256(_mm256_slli_epi16::<2>(qh), high),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16::<4>(qa), low),
                        _mm256_and_si256(qh, high),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16::<4>(qb), low),
                        _mm256_and_si256(_mm256_srli_epi16::<2>(qh), high),
                    ),
                ];
                for (j, w) in w.iter().enumerate() {
                    let sb = 4 * h + j;
                    let k = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(sc8, pick[sb]));
                    for r in 0..R {
                        let x = unsafe { _mm256_loadu_si256(xs[r].add(32 * sb) as *const _) };
                        let prod = _mm256_madd_epi16(_mm256_maddubs_epi16(*w, x), k);
                        sumi[r] = _mm256_add_epi32(sumi[r], prod);
                    }
                }
            }
            let sc16 = _mm256_cvtepi8_epi16(sc8);
            for r in 0..R {
                let at = (i0 + r) * kb + b;
                let (bs, dx) = unsafe {
                    (
                        _mm256_loadu_si256(xq.bsums.as_ptr().add(16 * at) as *const _),
                        *xq.d.get_unchecked(at),
                    )
                };
                let offset = _mm256_slli_epi32::<5>(_mm256_madd_epi16(sc16, bs));
                let s = _mm256_sub_epi32(sumi[r], offset);
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(d * dx), acc[r]);
            }
        }
        acc.map(|a| hsum(a))
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

    /// A weight quantized to Q6_K by candle, with rows of different magnitudes and signs
    /// so that the scales vary (negative ones included).
    fn q6k_weight(n: usize, k: usize, seed: u32) -> QTensor {
        let v: Vec<f32> = data(n * k, seed)
            .iter()
            .enumerate()
            .map(|(i, &v)| v * (1.0 + (i / k % 5) as f32) + 0.1 * (i / 16 % 3) as f32)
            .collect();
        let w = Tensor::from_vec(v, (n, k), &Device::Cpu).unwrap();
        QTensor::quantize(&w, GgmlDType::Q6K).unwrap()
    }

    /// The portable body's reading of the bit fields is candle's: its dequantized weight
    /// equals `d·sc_s·(value − 32)` for every weight.
    #[test]
    fn the_bit_fields_are_read_as_candle_dequantizes_them() {
        let (n, k) = (3, 512);
        let q = q6k_weight(n, k, 2);
        let bytes = q.data().unwrap().into_owned();
        let want: Vec<f32> = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let mut negative_scales = 0;
        for (b, blk) in bytes.chunks_exact(BLOCK_BYTES).enumerate() {
            for p in 0..QK_K {
                let scale = blk[192 + p / 16] as i8;
                negative_scales += (scale < 0) as usize;
                let got = d_of(blk) * (scale as f32 * (value(blk, p) - 32) as f32);
                assert_eq!(got, want[QK_K * b + p], "super-block {b} weight {p}");
            }
        }
        assert!(negative_scales > 0, "the data must reach negative scales");
    }

    /// Against candle's Q6_K matmul (its own activation rounding, its vector or portable
    /// dot products): the integer sums are exact on both sides, so only the order of the
    /// float sums differs. GEMV sizes and more rows than one chunk; every body.
    #[test]
    fn matches_candles_q6k_matmul() {
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
            let q = q6k_weight(n, k, 11 + m as u32);
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
            let xq = q8k::quantize_rows(&x, m, k, &q8k::NATURAL);
            let row_bytes = k / QK_K * BLOCK_BYTES;
            for j in 0..n {
                let row = &bytes[j * row_bytes..][..row_bytes];
                let mut p = vec![0f32; m];
                dots_portable(&xq, k / QK_K, 0..m, row, &mut p);
                // each vector body where the CPU has it, over all rows at once (groups)
                let mut bodies = vec![("portable", p)];
                #[cfg(target_arch = "x86_64")]
                {
                    if q8k::use_avx2() {
                        let mut v = vec![0f32; m];
                        // SAFETY: AVX2, FMA and F16C detected.
                        unsafe { avx2::dots(&xq, k / QK_K, 0..m, row, &mut v) };
                        bodies.push(("avx2", v));
                    }
                    if q8k::use_avx512bw() {
                        let mut v = vec![0f32; m];
                        // SAFETY: AVX-512F/BW/VL, AVX2, FMA and F16C detected.
                        unsafe { avx512::dots(&xq, k / QK_K, 0..m, row, &mut v) };
                        bodies.push(("avx512", v));
                    }
                }
                for i in 0..m {
                    let mag: f32 = x[i * k..(i + 1) * k].iter().map(|v| v.abs()).sum::<f32>() * 8.0;
                    let w = want[i * n + j];
                    let kernel = [("kernel", got[i * n + j])];
                    let others = bodies.iter().map(|(what, v)| (*what, v[i]));
                    for (what, v) in kernel.into_iter().chain(others) {
                        assert!(
                            (v - w).abs() <= 1e-5 * (1.0 + mag),
                            "{what} m={m} k={k} n={n} ({i},{j}): {v} vs candle {w}"
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
        let bytes = q6k_weight(n, k, 21).data().unwrap().into_owned();
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
        assert!(linear(&[0.0; 128], 1, 128, &[0; 420], 2, &mut out).is_err());
        assert!(linear(&[0.0; 256], 1, 256, &[0; 210], 2, &mut out).is_err());
    }
}

/// `cargo test --release -p zaya --lib q6k_q8k::speed -- --ignored --nocapture`: this
/// kernel, candle's Q6_K matmul and a plain parallel read of the same bytes, on the shape
/// of one expert's down projection of ZAYA1-8B (2048 × 2048; `SPEED_NK=n,k` picks
/// another), at 1, 8 and 64 rows (`SPEED_M=1,8` picks others; `CANDLE_NUM_THREADS` sets
/// the threads).
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
        let (n, k) = std::env::var("SPEED_NK")
            .map(|v| {
                let d: Vec<usize> = v.split(',').map(|s| s.parse().unwrap()).collect();
                (d[0], d[1])
            })
            .unwrap_or((2048, 2048));
        // several matrices, so the bytes come from memory, not the cache
        let copies = 24;
        let w = Tensor::randn(0f32, 1., (n, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q6K).unwrap();
        let one = q.data().unwrap().into_owned();
        let bytes: Vec<Vec<u8>> = (0..copies).map(|_| one.clone()).collect();
        let qms: Vec<QMatMul> = (0..copies)
            .map(|_| {
                let s = candle_core::quantized::QStorage::from_data(
                    std::borrow::Cow::Owned(one.clone()),
                    &Device::Cpu,
                    GgmlDType::Q6K,
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
                "q6_k {n}x{k} m={m}: ours {:.3} ms ({:.1} GB/s), candle {:.3} ms ({:.1} GB/s), read {:.3} ms ({:.1} GB/s)",
                ours * 1e3, gb / ours, theirs * 1e3, gb / theirs, read * 1e3, gb / read
            );
        }
    }
}
