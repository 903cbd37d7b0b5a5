//! Products against Q8_0 weights with f32 activations: `y = x · Wᵀ` for `W [N, K]` stored
//! as GGUF Q8_0 blocks (per 32 weights an f16 scale `d` and 32 signed bytes `q`, weight
//! `= d·q`), read in place. Unlike candle's quantized matmul, the activations are **not**
//! rounded to Q8_0 first: the only error is the weights' own rounding, which is what
//! `zaya quantize --format q8_0` promises (the activation rounding was most of q8_0's
//! measured KL to f32).
//!
//! - up to [`GEMV_ROWS`] rows (decode): each weight block is decoded once for several rows
//!   of `x` in registers, weight rows split across the kernel pool. On AVX-512, register
//!   tiles of activation rows × weight rows (`avx512::dots_tiled`; one row reads at about
//!   the memory's rate, several rows are bound by the f32 multiply-adds); an AVX2 body
//!   and the portable one (the autovectorised portable body was 1.8× slower on a Zen 3,
//!   3.4× on a Zen 4) take one weight row at a time.
//! - more rows: the weight is dequantized a tile of rows at a time into the thread's
//!   reused buffer and multiplied by the f32 gemm ([`cpu::widened_gemm`]).
//!
//! The reference is the f32 product with the dequantized weight (`x · deq(W)ᵀ`); the
//! results differ only by summation order.

use half::f16;

use super::cpu::{self, GEMV_ROWS};
use super::KernelError;
use candle_core::Result;

/// Weights per block.
pub(crate) const BLOCK: usize = 32;
/// Bytes per block: the f16 scale, then 32 `i8`.
pub(crate) const BLOCK_BYTES: usize = 34;

#[inline(always)]
fn scale(block: &[u8]) -> f32 {
    f16::from_bits(u16::from_le_bytes([block[0], block[1]])).to_f32()
}

/// Writes one row of `k` weights (`k / 32` blocks) as f32.
#[inline(always)]
fn dequantize_row_body(row: &[u8], out: &mut [f32]) {
    for (blk, o) in row
        .chunks_exact(BLOCK_BYTES)
        .zip(out.chunks_exact_mut(BLOCK))
    {
        let d = scale(blk);
        for (v, &q) in o.iter_mut().zip(&blk[2..]) {
            *v = d * (q as i8) as f32;
        }
    }
}

/// `out[i] = x_i · w` for the `out.len()` rows of `xs` (row length `k`) against one
/// weight row; the row's blocks are read once for all rows of `x`.
#[inline(always)]
fn dots_body(xs: &[f32], k: usize, row: &[u8], out: &mut [f32]) {
    // 16 lanes per accumulator; the block scale multiplies x so the sum stays in lanes
    // until the end of the row (no horizontal sum per block).
    let mut acc = [[0f32; 16]; GEMV_ROWS];
    let rows = out.len();
    for (b, blk) in row.chunks_exact(BLOCK_BYTES).enumerate() {
        let d = scale(blk);
        let mut q = [0f32; BLOCK];
        for (v, &byte) in q.iter_mut().zip(&blk[2..]) {
            *v = (byte as i8) as f32;
        }
        for (i, a) in acc.iter_mut().enumerate().take(rows) {
            let x = &xs[i * k + b * BLOCK..i * k + (b + 1) * BLOCK];
            for l in 0..16 {
                a[l] += d * (x[l] * q[l] + x[16 + l] * q[16 + l]);
            }
        }
    }
    for (o, a) in out.iter_mut().zip(&acc) {
        *o = cpu::hsum(a);
    }
}

simd_dispatch! {
    /// One Q8_0 row dequantized to f32.
    pub(crate) fn dequantize_row(row: &[u8], out: &mut [f32]) => dequantize_row_body
}

simd_dispatch! {
    /// `out[i] = x_i · w` for up to [`GEMV_ROWS`] rows of `xs` against one Q8_0 row
    /// (portable body, compiled for each SIMD level).
    fn dots_portable(xs: &[f32], k: usize, row: &[u8], out: &mut [f32]) => dots_body
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{BLOCK, BLOCK_BYTES};
    use std::arch::x86_64::*;

    /// `out[i] = x_i · w` for the `out.len()` rows of `xs` against one Q8_0 row, in groups
    /// of four rows (each block decoded once per group).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn dots(xs: &[f32], k: usize, row: &[u8], out: &mut [f32]) {
        let mut i = 0;
        for o in out.chunks_mut(4) {
            match o.len() {
                4 => o.copy_from_slice(&dot_rows::<4>(xs, k, i, row)),
                3 => o.copy_from_slice(&dot_rows::<3>(xs, k, i, row)),
                2 => o.copy_from_slice(&dot_rows::<2>(xs, k, i, row)),
                // one row: a store (`copy_from_slice` here was a `memcpy` call per weight row)
                _ => o[0] = dot_rows::<1>(xs, k, i, row)[0],
            }
            i += o.len();
        }
    }

    /// `x_i · w` for rows `i0..i0 + R` of `xs`. Per block: the 32 bytes widened to four f32
    /// vectors, each row's four products summed, then scaled by the block's `d` into the
    /// row's accumulator (one fused multiply-add: no per-block horizontal sum).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn dot_rows<const R: usize>(xs: &[f32], k: usize, i0: usize, row: &[u8]) -> [f32; R] {
        let kb = k / BLOCK;
        assert!(xs.len() >= (i0 + R) * k && row.len() >= kb * BLOCK_BYTES);
        let mut acc = [_mm256_setzero_ps(); R];
        for b in 0..kb {
            // SAFETY (all loads): block `b` is bytes `34b..34b + 34` of `row`, and rows
            // `i0..i0 + R` of `xs` hold `k` values each (asserted above).
            let (d, w) = unsafe {
                let p = row.as_ptr().add(b * BLOCK_BYTES);
                let bits = u16::from_le_bytes([*p, *p.add(1)]) as i32;
                let d = _mm256_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)));
                let w: [__m256; 4] = std::array::from_fn(|v| {
                    let q = _mm_loadl_epi64(p.add(2 + 8 * v) as *const _);
                    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q))
                });
                (d, w)
            };
            for (r, a) in acc.iter_mut().enumerate() {
                let t = unsafe {
                    let x = xs.as_ptr().add((i0 + r) * k + b * BLOCK);
                    let t0 = _mm256_mul_ps(_mm256_loadu_ps(x), w[0]);
                    let t1 = _mm256_mul_ps(_mm256_loadu_ps(x.add(8)), w[1]);
                    let t0 = _mm256_fmadd_ps(_mm256_loadu_ps(x.add(16)), w[2], t0);
                    let t1 = _mm256_fmadd_ps(_mm256_loadu_ps(x.add(24)), w[3], t1);
                    _mm256_add_ps(t0, t1)
                };
                *a = _mm256_fmadd_ps(t, d, *a);
            }
        }
        acc.map(|a| {
            let s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
        })
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{BLOCK, BLOCK_BYTES};
    use std::arch::x86_64::*;

    /// `out[c·m + i] = x_i · w_c` for the `m` rows of `xs` and the `cols` consecutive Q8_0
    /// weight rows in `w` (`row_bytes` each), by register tiles: up to 4 activation rows ×
    /// 4 weight rows, 8 × 2 above four rows (each weight block's decode shared by more
    /// rows), 1 × 8 for one row. Each block of a weight row is decoded and scaled once per
    /// tile (`q·d`: exact in f32, the dequantized weight itself), each loaded activation
    /// vector feeds every weight row of the tile, and every output is one 16-lane FMA chain
    /// over the blocks in order, summed at the end: the same arithmetic whatever the tile,
    /// so a row's result does not depend on the other rows (the engine's batch invariance).
    /// The row-at-a-time body before it decoded each block once per four activation rows
    /// and reloaded the activations for every weight row: Zen 4, 4096×2048 from memory, 2
    /// threads (`speed`), 2 rows 24–26 → 26 GB/s, 4 rows 12 → 18, 6 rows 6.6 → 14, 8 rows
    /// 5.4 → 10.4; one row 35–37 → 32–34 (not yet explained: a 1 × 1 tile without the
    /// prefetch, as the f32 GEMV runs one row, is still to try; any tile shape keeps the
    /// invariance).
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub(super) fn dots_tiled(
        xs: &[f32],
        k: usize,
        m: usize,
        w: &[u8],
        row_bytes: usize,
        cols: usize,
        out: &mut [f32],
    ) {
        assert!(
            k.is_multiple_of(BLOCK)
                && row_bytes == k / BLOCK * BLOCK_BYTES
                && xs.len() >= m * k
                && w.len() >= cols * row_bytes
                && out.len() >= cols * m
        );
        // 4 × 4 tiles up to four rows (16 accumulators + 8 weight vectors + 2 activation
        // vectors), 8 × 2 above (16 + 4 + 2: each weight block's decode shared by more
        // rows), 1 × 8 for one row (8 + 16 + 2): no spills
        let (r_max, c_max) = if m > 4 {
            (8, 2)
        } else if m == 1 {
            (1, 8)
        } else {
            (4, 4)
        };
        let mut c0 = 0;
        while c0 < cols {
            let c = (cols - c0).min(c_max);
            let mut i0 = 0;
            while i0 < m {
                let r = (m - i0).min(r_max);
                let t = Tile {
                    xs,
                    k,
                    i0,
                    w: &w[c0 * row_bytes..(c0 + c) * row_bytes],
                    row_bytes,
                };
                macro_rules! run {
                    ($r:literal, $c:literal) => {{
                        let v = tile::<$r, $c>(&t);
                        for (cc, col) in v.iter().enumerate() {
                            for (rr, &x) in col.iter().enumerate() {
                                out[(c0 + cc) * m + i0 + rr] = x;
                            }
                        }
                    }};
                }
                match (r, c) {
                    (1, 8) => run!(1, 8),
                    (1, 7) => run!(1, 7),
                    (1, 6) => run!(1, 6),
                    (1, 5) => run!(1, 5),
                    (8, 2) => run!(8, 2),
                    (7, 2) => run!(7, 2),
                    (6, 2) => run!(6, 2),
                    (5, 2) => run!(5, 2),
                    (8, _) => run!(8, 1),
                    (7, _) => run!(7, 1),
                    (6, _) => run!(6, 1),
                    (5, _) => run!(5, 1),
                    (4, 4) => run!(4, 4),
                    (3, 4) => run!(3, 4),
                    (2, 4) => run!(2, 4),
                    (1, 4) => run!(1, 4),
                    (4, 3) => run!(4, 3),
                    (3, 3) => run!(3, 3),
                    (2, 3) => run!(2, 3),
                    (1, 3) => run!(1, 3),
                    (4, 2) => run!(4, 2),
                    (3, 2) => run!(3, 2),
                    (2, 2) => run!(2, 2),
                    (1, 2) => run!(1, 2),
                    (4, _) => run!(4, 1),
                    (3, _) => run!(3, 1),
                    (2, _) => run!(2, 1),
                    _ => run!(1, 1),
                }
                i0 += r;
            }
            c0 += c;
        }
    }

    /// Rows `i0..i0 + R` of `xs` against the `C` weight rows of `w`.
    struct Tile<'a> {
        xs: &'a [f32],
        k: usize,
        i0: usize,
        w: &'a [u8],
        row_bytes: usize,
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    fn tile<const R: usize, const C: usize>(t: &Tile) -> [[f32; R]; C] {
        let (k, kb) = (t.k, t.k / BLOCK);
        assert!(
            t.xs.len() >= (t.i0 + R) * k
                && t.row_bytes >= kb * BLOCK_BYTES
                && t.w.len() >= C * t.row_bytes
        );
        let mut acc = [[_mm512_setzero_ps(); R]; C];
        // the next tile's weight rows follow these (rows are consecutive in `w`)
        let ahead = t.w.as_ptr().wrapping_add(C * t.row_bytes);
        for b in 0..kb {
            // Into L2, a tile ahead: without it the tile's C interleaved row streams
            // read at half the memory's rate (one row, 4096×2048, 2 threads: 17–18 →
            // 32–34 GB/s); a prefetch never faults, whatever the address.
            for c in 0..C {
                _mm_prefetch::<_MM_HINT_T2>(
                    ahead.wrapping_add(c * t.row_bytes + b * BLOCK_BYTES) as *const i8
                );
            }
            // SAFETY (all loads): block `b < kb` of weight row `c < C` is bytes
            // `c·row_bytes + 34b ..+ 34` of `w`, and rows `i0..i0 + R` of `xs` hold `k =
            // 32·kb` values each (asserted above).
            let wv: [[__m512; 2]; C] = std::array::from_fn(|c| unsafe {
                let p = t.w.as_ptr().add(c * t.row_bytes + b * BLOCK_BYTES);
                let bits = u16::from_le_bytes([*p, *p.add(1)]) as i32;
                let d = _mm512_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)));
                let lo = _mm_loadu_si128(p.add(2) as *const __m128i);
                let hi = _mm_loadu_si128(p.add(18) as *const __m128i);
                [
                    _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lo)), d),
                    _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(hi)), d),
                ]
            });
            #[allow(clippy::needless_range_loop)] // `r` also places the row in `xs`
            for r in 0..R {
                let (x0, x1) = unsafe {
                    let x = t.xs.as_ptr().add((t.i0 + r) * k + b * BLOCK);
                    (_mm512_loadu_ps(x), _mm512_loadu_ps(x.add(16)))
                };
                for c in 0..C {
                    acc[c][r] = _mm512_fmadd_ps(x0, wv[c][0], acc[c][r]);
                    acc[c][r] = _mm512_fmadd_ps(x1, wv[c][1], acc[c][r]);
                }
            }
        }
        acc.map(|col| col.map(|a| _mm512_reduce_add_ps(a)))
    }
}

/// The explicit body this CPU runs (detected once): AVX-512 where the kernels' level is
/// AVX-512, AVX2 where that is the widest, else the portable body. Zen 4, 4096×2048, 2
/// threads: the portable body compiled for AVX-512 read 8.7 GB/s at one row, a third of
/// the machine's read rate (`speed`).
#[derive(Clone, Copy, PartialEq, Debug)]
enum Body {
    Avx512,
    Avx2,
    Portable,
}

fn body() -> Body {
    #[cfg(target_arch = "x86_64")]
    {
        static ON: std::sync::OnceLock<Body> = std::sync::OnceLock::new();
        *ON.get_or_init(|| {
            let f16 = std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c");
            match cpu::simd_level() {
                cpu::SimdLevel::Avx512 if f16 => Body::Avx512,
                cpu::SimdLevel::Avx2 if f16 => Body::Avx2,
                _ => Body::Portable,
            }
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Body::Portable
    }
}

/// A body of [`dots`]: `out[i] = x_i · w` for the rows of `xs` against one Q8_0 row.
type Dots = fn(&[f32], usize, &[u8], &mut [f32]);

/// `out[i] = x_i · w` for up to [`GEMV_ROWS`] rows of `xs` against one Q8_0 row: the
/// one-weight-row bodies, for CPUs without AVX-512 (those run [`gemv_tiled`]).
fn dots(xs: &[f32], k: usize, row: &[u8], out: &mut [f32]) {
    match body() {
        // SAFETY: the CPU has AVX2, FMA and F16C (detected; an AVX-512 body implies them).
        #[cfg(target_arch = "x86_64")]
        Body::Avx512 | Body::Avx2 => unsafe { avx2::dots(xs, k, row, out) },
        _ => dots_portable(xs, k, row, out),
    }
}

/// `out[m×n] = x[m×k] · deq(W)ᵀ`, `x` and `out` row-major f32, `W` `n` rows of `k / 32`
/// Q8_0 blocks.
pub(crate) fn linear(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[u8],
    n: usize,
    out: &mut [f32],
) -> Result<()> {
    let row_bytes = k / BLOCK * BLOCK_BYTES;
    if !k.is_multiple_of(BLOCK) || x.len() < m * k || w.len() < n * row_bytes || out.len() < m * n {
        return Err(KernelError::Internal(format!(
            "q8_0 linear: k={k} must be a multiple of {BLOCK} and the buffers must hold \
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
    if m > GEMV_ROWS {
        return cpu::widened_gemm(x, m, k, n, out, |j, row| {
            dequantize_row(&w[j * row_bytes..(j + 1) * row_bytes], row)
        });
    }
    #[cfg(target_arch = "x86_64")]
    if body() == Body::Avx512 {
        gemv_tiled(x, m, k, w, n, out);
        return Ok(());
    }
    gemv(x, m, k, w, n, out, dots);
    Ok(())
}

/// The GEMV (`m ≤` [`GEMV_ROWS`]): each weight row decoded once for all x rows by `dots`.
fn gemv(x: &[f32], m: usize, k: usize, w: &[u8], n: usize, out: &mut [f32], dots: Dots) {
    let row_bytes = k / BLOCK * BLOCK_BYTES;
    cpu::gemv_by_weight_rows(m, n, k, 1, out, |j0, o| {
        for (r, c) in o.chunks_mut(m).enumerate() {
            let j = j0 + r;
            dots(&x[..m * k], k, &w[j * row_bytes..(j + 1) * row_bytes], c)
        }
    });
}

/// The GEMV on AVX-512 register tiles ([`avx512::dots_tiled`]), weight rows split across
/// the pool in multiples of four rows.
#[cfg(target_arch = "x86_64")]
fn gemv_tiled(x: &[f32], m: usize, k: usize, w: &[u8], n: usize, out: &mut [f32]) {
    debug_assert_eq!(body(), Body::Avx512);
    let row_bytes = k / BLOCK * BLOCK_BYTES;
    cpu::gemv_by_weight_rows(m, n, k, 4, out, |j0, o| {
        let cols = o.len() / m;
        let rows = &w[j0 * row_bytes..(j0 + cols) * row_bytes];
        // SAFETY: the CPU has AVX-512F, AVX2, FMA and F16C (`body` detected them).
        unsafe { avx512::dots_tiled(&x[..m * k], k, m, rows, row_bytes, cols, o) }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    use crate::kernels::cpu::test_data as data;

    /// The kernel against `x · deq(W)ᵀ` with the weight quantized and dequantized by candle
    /// (so the block layout is candle's / GGUF's), on GEMV and GEMM sizes.
    #[test]
    fn matches_the_dequantized_product() {
        for &(m, k, n) in &[
            (1, 32, 3),
            (1, 256, 70),
            (3, 64, 33),
            (8, 96, 9),
            (9, 64, 40),
            (40, 320, 75),
        ] {
            let w = Tensor::from_vec(data(n * k, 11), (n, k), &Device::Cpu).unwrap();
            let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
            let deq: Vec<f32> = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let bytes = q.data().unwrap();
            assert_eq!(
                bytes.len(),
                n * k / BLOCK * BLOCK_BYTES,
                "candle's Q8_0 block layout"
            );
            let x = data(m * k, 5);
            let mut out = vec![f32::NAN; m * n];
            linear(&x, m, k, &bytes, n, &mut out).unwrap();
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k)
                        .map(|t| x[i * k + t] as f64 * deq[j * k + t] as f64)
                        .sum();
                    let got = out[i * n + j] as f64;
                    assert!(
                        (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "m={m} k={k} n={n} ({i},{j}): {got} vs {want}"
                    );
                }
            }
        }
    }

    /// The explicit bodies (where this CPU has them) against the portable one, every row
    /// count of the GEMV, an odd number of blocks.
    #[test]
    fn simd_body_matches_the_portable_one() {
        let (n, k) = (37, 352);
        let w = Tensor::from_vec(data(n * k, 7), (n, k), &Device::Cpu).unwrap();
        let bytes = QTensor::quantize(&w, GgmlDType::Q8_0)
            .unwrap()
            .data()
            .unwrap()
            .into_owned();
        for m in 1..=GEMV_ROWS {
            let x = data(m * k, m as u32);
            let mut want = vec![f32::NAN; m * n];
            gemv(&x, m, k, &bytes, n, &mut want, dots_portable);
            let mut bodies: Vec<(&str, Dots)> = vec![("dispatched", dots)];
            #[cfg(target_arch = "x86_64")]
            {
                use std::arch::is_x86_feature_detected as has;
                if has!("avx2") && has!("fma") && has!("f16c") {
                    // SAFETY: AVX2, FMA and F16C detected.
                    bodies.push(("avx2", |x, k, r, o| unsafe { avx2::dots(x, k, r, o) }));
                }
            }
            let mut results: Vec<(&str, Vec<f32>)> = Vec::new();
            for (name, f) in bodies {
                let mut got = vec![f32::NAN; m * n];
                gemv(&x, m, k, &bytes, n, &mut got, f);
                results.push((name, got));
            }
            #[cfg(target_arch = "x86_64")]
            if body() == Body::Avx512 {
                let mut got = vec![f32::NAN; m * n];
                gemv_tiled(&x, m, k, &bytes, n, &mut got);
                // a row's result does not depend on the rows run with it (nor on the tile)
                for i in 0..m {
                    let mut alone = vec![f32::NAN; n];
                    gemv_tiled(&x[i * k..(i + 1) * k], 1, k, &bytes, n, &mut alone);
                    for j in 0..n {
                        assert_eq!(
                            got[i * n + j].to_bits(),
                            alone[j].to_bits(),
                            "m={m} row {i}"
                        );
                    }
                }
                results.push(("avx512 tiles", got));
            }
            for (name, got) in results {
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                        "{name} m={m}: {g} vs {w}"
                    );
                }
            }
        }
    }

    #[test]
    fn bad_sizes_are_an_error() {
        let mut out = vec![0f32; 2];
        assert!(linear(&[0.0; 30], 1, 30, &[0; 68], 2, &mut out).is_err());
        assert!(linear(&[0.0; 32], 1, 32, &[0; 34], 2, &mut out).is_err());
    }

    /// Throughput on an expert-sized matrix (4096×2048) against a plain read of the same
    /// bytes on the same threads: `cargo test --release -p zaya --lib q8_0::tests::speed
    /// -- --ignored --nocapture` (`SPEED_M=1,8`, `CANDLE_NUM_THREADS`).
    #[test]
    #[ignore]
    fn speed() {
        use std::time::Instant;
        let (n, k) = (4096, 2048);
        // several matrices, so the bytes come from memory, not the cache
        let copies = 16;
        let w = Tensor::randn(0f32, 1., (n, k), &Device::Cpu).unwrap();
        let one = QTensor::quantize(&w, GgmlDType::Q8_0)
            .unwrap()
            .data()
            .unwrap()
            .into_owned();
        let bytes: Vec<Vec<u8>> = (0..copies).map(|_| one.clone()).collect();
        let ms: Vec<usize> = std::env::var("SPEED_M")
            .map(|v| v.split(',').map(|s| s.parse().unwrap()).collect())
            .unwrap_or(vec![1, 8]);
        for m in ms {
            let x = data(m * k, 3);
            let mut out = vec![0f32; m * n];
            let (mut ours, mut portable, mut read) = (f64::MAX, f64::MAX, f64::MAX);
            let mut avx2 = f64::MAX;
            for _ in 0..5 {
                let t = Instant::now();
                for b in &bytes {
                    linear(&x, m, k, b, n, &mut out).unwrap();
                }
                ours = ours.min(t.elapsed().as_secs_f64() / copies as f64);
                let t = Instant::now();
                for b in &bytes {
                    gemv(&x, m, k, b, n, &mut out, dots_portable);
                }
                portable = portable.min(t.elapsed().as_secs_f64() / copies as f64);
                #[cfg(target_arch = "x86_64")]
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                    && std::arch::is_x86_feature_detected!("f16c")
                {
                    let t = Instant::now();
                    for b in &bytes {
                        // SAFETY: AVX2, FMA and F16C detected.
                        gemv(&x, m, k, b, n, &mut out, |x, k, r, o| unsafe {
                            avx2::dots(x, k, r, o)
                        });
                    }
                    avx2 = avx2.min(t.elapsed().as_secs_f64() / copies as f64);
                }
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
                "q8_0 m={m}: ours ({:?}) {:.3} ms ({:.1} GB/s), portable body {:.3} ms ({:.1} \
                 GB/s), avx2 body {:.3} ms ({:.1} GB/s), read {:.3} ms ({:.1} GB/s)",
                body(),
                ours * 1e3,
                gb / ours,
                portable * 1e3,
                gb / portable,
                avx2 * 1e3,
                gb / avx2,
                read * 1e3,
                gb / read
            );
        }
    }
}
