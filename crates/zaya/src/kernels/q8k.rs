//! Activations rounded to Q8_K for the integer k-quant products ([`super::q4k_q8k`],
//! [`super::q6k_q8k`]): each row rounded per 256 values to `d·q` with `q` in `i8` exactly
//! as candle's (llama.cpp's) `BlockQ8K::from_float` does, with the sums of each run of 16
//! values, and the driver both products share (rows of the weight split over the kernel
//! pool, activation rows in cache-sized groups). Each weight format brings only its
//! super-block dot products.

use super::cpu::{self, GEMV_ROWS};
use super::KernelError;
use candle_core::Result;

/// Values per super-block.
pub(super) const QK_K: usize = 256;

/// Activation rows rounded to Q8_K (candle's `BlockQ8K::from_float`, bit for bit), with
/// the values of each super-block stored in the order the weight format's kernel reads them.
pub(super) struct Q8kRows {
    /// Per row and super-block, the scale `d` (value `= d·q`).
    pub(super) d: Vec<f32>,
    /// Per row and super-block, 256 values: its eight sub-blocks of 32 stored in the
    /// order the rounding was asked for ([`Order`]).
    pub(super) qs: Vec<i8>,
    /// Per row and super-block, the sums of each run of 16 values (natural order).
    pub(super) bsums: Vec<i16>,
}

/// Where each sub-block of 32 values is stored within its super-block's 256 (`order[s]`:
/// the slot of sub-block `s`), so that a kernel's vector loads line up with the weights it
/// decodes.
pub(super) type Order = [usize; 8];

/// The values in their natural order.
pub(super) const NATURAL: Order = [0, 1, 2, 3, 4, 5, 6, 7];

/// `m` rows of `k` values (`k` a multiple of 256) rounded to Q8_K as candle does:
/// `iscale = −127 / max` with `max` the first value of largest magnitude,
/// `q = clamp(round(iscale·x), −128, 127)`, `d = 1 / iscale` (all zero for a zero block).
pub(super) fn quantize_rows(x: &[f32], m: usize, k: usize, order: &Order) -> Q8kRows {
    let kb = k / QK_K;
    let mut rows = Q8kRows {
        d: vec![0f32; m * kb],
        qs: vec![0i8; m * k],
        bsums: vec![0i16; m * kb * 16],
    };
    for (b, xs) in x[..m * k].chunks_exact(QK_K).enumerate() {
        let qs = &mut rows.qs[QK_K * b..QK_K * (b + 1)];
        let bsums = &mut rows.bsums[16 * b..16 * b + 16];
        rows.d[b] = quantize_block(xs, qs, bsums, order);
    }
    rows
}

/// One super-block of [`quantize_rows`]: returns `d` and writes the values (stored order)
/// and the sums of 16; a zero block leaves both untouched (zeros) and returns 0.
fn quantize_block(xs: &[f32], qs: &mut [i8], bsums: &mut [i16], order: &Order) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if cpu::simd_level() == cpu::SimdLevel::Avx512 {
        // SAFETY: AVX-512F was detected on this CPU.
        return unsafe { avx512::quantize_block(xs, qs, bsums, order) };
    }
    quantize_block_portable(xs, qs, bsums, order)
}

/// [`quantize_block`]'s reference: [`round_block`], then the sums and the reordering.
fn quantize_block_portable(xs: &[f32], qs: &mut [i8], bsums: &mut [i16], order: &Order) -> f32 {
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
    for (s, at) in order.iter().enumerate() {
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

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Order, QK_K};
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
    pub(super) unsafe fn quantize_block(
        xs: &[f32],
        qs: &mut [i8],
        bsums: &mut [i16],
        order: &Order,
    ) -> f32 {
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
            let at = 32 * order[c / 2] + 16 * (c % 2);
            _mm_storeu_si128(
                qs.as_mut_ptr().add(at) as *mut __m128i,
                _mm512_cvtsepi32_epi8(v),
            );
        }
        1.0 / iscale
    }
}

/// Whether the k-quant products here have a vector body on this CPU (AVX2 or AVX-512BW).
/// Elsewhere their portable bodies are slower than candle's own kernels, which then run.
pub(super) fn has_vector_bodies() -> bool {
    use_avx512bw() || use_avx2()
}

/// Whether the AVX2 body runs on this CPU (detected once).
pub(super) fn use_avx2() -> bool {
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
pub(super) fn use_avx512bw() -> bool {
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

/// A weight format the driver runs: its super-block size, the order its kernel reads the
/// activations in, and its dot products.
pub(super) struct Format {
    /// Name for errors (`"q4_k"`).
    pub(super) name: &'static str,
    /// Bytes per super-block of 256 weights.
    pub(super) block_bytes: usize,
    /// Where the rounded activations' sub-blocks are stored ([`Order`]).
    pub(super) order: Order,
    /// `out[i] = x_i · w` for the activation rows `rows` against one weight row of `kb`
    /// super-blocks; each result independent of which other rows are asked with it.
    pub(super) dots: fn(&Q8kRows, usize, std::ops::Range<usize>, &[u8], &mut [f32]),
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
    let kb = k / QK_K;
    let row_bytes = kb * format.block_bytes;
    if !k.is_multiple_of(QK_K) || x.len() < m * k || w.len() < n * row_bytes || out.len() < m * n {
        return Err(KernelError::Internal(format!(
            "{} × q8_k linear: k={k} must be a multiple of {QK_K} and the buffers must hold \
             m={m}, n={n} (x {}, w {} bytes, out {})",
            format.name,
            x.len(),
            w.len(),
            out.len()
        ))
        .into());
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    let xq = quantize_rows(x, m, k, &format.order);
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
                        (format.dots)(&xq, kb, at, row, &mut c[group.clone()]);
                    }
                }
            }
        });
    }
    Ok(())
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

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
        let order = [0, 2, 1, 3, 4, 6, 5, 7];
        let mine = quantize_rows(&x, m, k, &order);
        let t = Tensor::from_vec(x, (m, k), &Device::Cpu).unwrap();
        let theirs = QTensor::quantize(&t, GgmlDType::Q8K).unwrap();
        let bytes = theirs.data().unwrap();
        assert_eq!(bytes.len(), m * k / QK_K * 292);
        for (b, blk) in bytes.chunks_exact(292).enumerate() {
            let d = f32::from_le_bytes(blk[0..4].try_into().unwrap());
            assert_eq!(d.to_bits(), mine.d[b].to_bits(), "super-block {b}: d");
            for s in 0..8 {
                let stored = &mine.qs[QK_K * b + 32 * order[s]..][..32];
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
        let order = [0, 2, 1, 3, 4, 6, 5, 7];
        for (i, xs) in blocks.iter().enumerate() {
            let (mut qa, mut sa) = ([0i8; QK_K], [0i16; 16]);
            let (mut qb, mut sb) = ([0i8; QK_K], [0i16; 16]);
            let da = quantize_block_portable(xs, &mut qa, &mut sa, &order);
            // SAFETY: AVX-512F checked above; the buffers have the sizes required.
            let db = unsafe { avx512::quantize_block(xs, &mut qb, &mut sb, &order) };
            assert_eq!(da.to_bits(), db.to_bits(), "block {i}: d");
            assert_eq!(qa, qb, "block {i}: values");
            assert_eq!(sa, sb, "block {i}: sums");
        }
    }
}
