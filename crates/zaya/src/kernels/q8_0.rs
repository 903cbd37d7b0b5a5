//! Products against Q8_0 weights with f32 activations: `y = x · Wᵀ` for `W [N, K]` stored
//! as GGUF Q8_0 blocks (per 32 weights an f16 scale `d` and 32 signed bytes `q`, weight
//! `= d·q`), read in place. Unlike candle's quantized matmul, the activations are **not**
//! rounded to Q8_0 first: the only error is the weights' own rounding, which is what
//! `zaya quantize --format q8_0` promises (the activation rounding was most of q8_0's
//! measured KL to f32).
//!
//! - up to [`GEMV_ROWS`] rows (decode): each weight row is decoded once for all rows of
//!   `x` in registers, rows split across the kernel pool — bound by reading the weights
//!   (34 bytes per 32 weights).
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
    /// `out[i] = x_i · w` for up to [`GEMV_ROWS`] rows of `xs` against one Q8_0 row.
    fn dots(xs: &[f32], k: usize, row: &[u8], out: &mut [f32]) => dots_body
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
    // GEMV: each weight row decoded once for all x rows.
    cpu::gemv_by_weight_rows(m, n, k, 1, out, |j0, o| {
        for (r, c) in o.chunks_mut(m).enumerate() {
            let j = j0 + r;
            dots(&x[..m * k], k, &w[j * row_bytes..(j + 1) * row_bytes], c)
        }
    });
    Ok(())
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

    #[test]
    fn bad_sizes_are_an_error() {
        let mut out = vec![0f32; 2];
        assert!(linear(&[0.0; 30], 1, 30, &[0; 68], 2, &mut out).is_err());
        assert!(linear(&[0.0; 32], 1, 32, &[0; 34], 2, &mut out).is_err());
    }
}
