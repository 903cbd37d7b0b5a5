//! Products against bf16 weights with f32 activations and f32 accumulation: `y = x · Wᵀ`
//! for a weight `W [N, K]` stored in bf16 (a linear layer, one expert, the lm_head), read in
//! place — never converted to an f32 copy of the whole matrix.
//!
//! - up to [`GEMV_ROWS`] rows (decode): a GEMV that streams each weight row once for all
//!   rows of `x`, widening bf16 → f32 in registers (a shift: bf16 is the top half of an
//!   f32), rows of `W` split across the kernel pool. Decode is bound by reading the weights,
//!   so this runs at the memory bandwidth; the body is compiled for AVX-512, AVX2 and the
//!   baseline and chosen at run time.
//! - more rows (prefill, busy experts): `W` is widened a tile of rows at a time into a
//!   buffer that stays allocated for the thread (no fresh pages per call), and each tile goes
//!   through the f32 gemm, which is compute-bound at this size.
//!
//! The reference is the f32 product with the widened weight (`x · f32(W)ᵀ`); the results
//! differ only by summation order.

use std::cell::RefCell;

use half::bf16;

use super::cpu::{self, par_chunks_mut, simd_level, MatMut, MatRef, SimdLevel, GEMV_ROWS};
use candle_core::Result;

const LANES: usize = 16;

#[inline(always)]
fn widen(w: bf16) -> f32 {
    f32::from_bits((w.to_bits() as u32) << 16)
}

#[inline(always)]
fn dot_bf16_body(x: &[f32], w: &[bf16]) -> f32 {
    let mut acc = [0f32; LANES];
    let mut cx = x.chunks_exact(LANES);
    let mut cw = w.chunks_exact(LANES);
    for (a, b) in (&mut cx).zip(&mut cw) {
        for ((s, u), v) in acc.iter_mut().zip(a).zip(b) {
            *s += u * widen(*v);
        }
    }
    acc.iter().sum::<f32>()
        + cx.remainder()
            .iter()
            .zip(cw.remainder())
            .map(|(u, v)| u * widen(*v))
            .sum::<f32>()
}

/// `Σ x·w` for up to [`GEMV_ROWS`] rows of `x` against one weight row; one pass over `w`.
#[inline(always)]
fn dots_bf16_body(xs: &[f32], k: usize, w: &[bf16], out: &mut [f32]) {
    for (i, o) in out.iter_mut().enumerate() {
        *o = dot_bf16_body(&xs[i * k..(i + 1) * k], w);
    }
}

#[inline(always)]
fn widen_into_body(src: &[bf16], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = widen(*s);
    }
}

simd_dispatch! {
    /// `out[i] = x_i · w` for the `out.len()` rows of `xs` (row length `k`).
    pub(crate) fn dots_bf16(xs: &[f32], k: usize, w: &[bf16], out: &mut [f32]) => dots_bf16_body
}

simd_dispatch! {
    /// `dst = f32(src)`.
    pub(crate) fn widen_into(src: &[bf16], dst: &mut [f32]) => widen_into_body
}

/// Elements of a weight tile widened at once in the GEMM path (about 2 MB of f32).
const TILE_ELEMS: usize = 1 << 19;

thread_local! {
    /// The widened weight tile, reused across calls so large products do not page in fresh
    /// memory every time.
    static TILE: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `out[m×n] = x[m×k] · W[n×k]ᵀ`, `x` and `out` row-major f32, `W` row-major bf16.
pub(crate) fn linear(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[bf16],
    n: usize,
    out: &mut [f32],
) -> Result<()> {
    if x.len() < m * k || w.len() < n * k || out.len() < m * n {
        return Err(super::KernelError::Internal(format!(
            "bf16 linear: buffers too small for m={m}, n={n}, k={k}"
        ))
        .into());
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        out[..m * n].fill(0.0);
        return Ok(());
    }
    if m <= GEMV_ROWS {
        gemv(x, m, k, w, n, out);
        return Ok(());
    }
    // at least 16 rows per tile (gemm efficiency), at most the whole weight
    let rows_per_tile = (TILE_ELEMS / k).max(16);
    let rows_per_tile = if rows_per_tile > n { n } else { rows_per_tile };
    TILE.with(|tile| {
        let mut tile = tile.borrow_mut();
        if tile.len() < rows_per_tile * k {
            tile.resize(rows_per_tile * k, 0.0);
        }
        let mut j0 = 0;
        while j0 < n {
            let rows = rows_per_tile.min(n - j0);
            let buf = &mut tile[..rows * k];
            let src = &w[j0 * k..(j0 + rows) * k];
            par_chunks_mut(buf, k, |r, d| widen_into(&src[r * k..(r + 1) * k], d));
            cpu::gemm(
                m,
                rows,
                k,
                MatMut::new(out, j0, n),
                false,
                MatRef::rows(x, 0, k),
                MatRef::rows(buf, 0, k).t(),
                1.0,
                true,
            )?;
            j0 += rows;
        }
        Ok(())
    })
}

/// The GEMV path of [`linear`]: `out[m×n]` from the column-major products of [`gemv_cols`].
fn gemv(x: &[f32], m: usize, k: usize, w: &[bf16], n: usize, out: &mut [f32]) {
    if m == 1 {
        gemv_cols(x, 1, k, w, n, &mut out[..n]);
        return;
    }
    let mut by_col = vec![0f32; n * m];
    gemv_cols(x, m, k, w, n, &mut by_col);
    for i in 0..m {
        for (j, d) in out[i * n..(i + 1) * n].iter_mut().enumerate() {
            *d = by_col[j * m + i];
        }
    }
}

/// `by_col[j·m + i] = x_i · w_j`: weight rows split into a few blocks per pool thread (the
/// split follows the weight bytes, not the output length: a 2048-row projection is worth
/// every core), each weight row read once for all rows of `x`.
fn gemv_cols(x: &[f32], m: usize, k: usize, w: &[bf16], n: usize, by_col: &mut [f32]) {
    use rayon::prelude::*;
    const MIN_PARALLEL_WORK: usize = 1 << 16;
    let block = |j0: usize, o: &mut [f32]| {
        for (r, c) in o.chunks_mut(m).enumerate() {
            let j = j0 + r;
            dots_bf16(&x[..m * k], k, &w[j * k..(j + 1) * k], c);
        }
    };
    let threads = cpu::num_threads();
    if threads > 1 && n > 1 && n * k * m >= MIN_PARALLEL_WORK {
        let rows = n.div_ceil(4 * threads);
        cpu::in_pool(|| {
            by_col
                .par_chunks_mut(rows * m)
                .enumerate()
                .for_each(|(b, o)| block(b * rows, o))
        });
    } else {
        block(0, by_col);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    }

    /// f64 product with the widened weight: what the kernel must reproduce up to f32
    /// summation order.
    fn reference(x: &[f32], m: usize, k: usize, w: &[bf16], n: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k)
                    .map(|t| x[i * k + t] as f64 * w[j * k + t].to_f64())
                    .sum::<f64>() as f32;
            }
        }
        out
    }

    #[test]
    fn gemv_and_tiled_gemm_match_the_widened_product() {
        // k not a multiple of the lanes; n larger than one tile for k = 37 needs 14171 rows,
        // so also a small k = 4099 case to cross tiles.
        for &(m, k, n) in &[
            (1, 37, 50),
            (3, 64, 129),
            (8, 300, 70),
            (9, 37, 50),
            (9, 37, 5),
            (40, 257, 33),
            (12, 4099, 300),
        ] {
            let x = data(m * k, 7);
            let w: Vec<bf16> = data(n * k, 11).into_iter().map(bf16::from_f32).collect();
            let mut out = vec![f32::NAN; m * n];
            linear(&x, m, k, &w, n, &mut out).unwrap();
            let want = reference(&x, m, k, &w, n);
            for (g, r) in out.iter().zip(&want) {
                assert!(
                    (g - r).abs() <= 1e-4 * (1.0 + r.abs()),
                    "m={m} k={k} n={n}: {g} vs {r}"
                );
            }
        }
    }

    #[test]
    fn short_buffers_are_an_error() {
        let w = vec![bf16::ONE; 4];
        let mut out = vec![0f32; 1];
        assert!(linear(&[1.0; 2], 1, 2, &w, 2, &mut out).is_err());
    }
}
