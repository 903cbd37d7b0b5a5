//! Products against Q2_K weights with the activations rounded to Q8_K, in integers: the
//! arithmetic of candle's (llama.cpp's) Q2_K matmul, on the blocks in place, through the
//! bodies [`super::q8k`] shares (AVX-512 with or without VNNI, AVX2, portable).
//!
//! Q2_K super-block (84 bytes): 16 bytes of scales (per run of 16 weights: a 4-bit scale
//! in the low nibble, a 4-bit min in the high one), 64 bytes `qs` of 2-bit values, f16
//! `d`, f16 `dmin`. Weight `128n + 32j + l` (`l < 32`) is bits `2j..2j+2` of
//! `qs[32n + l]`; weight `= d·sc_r·q − dmin·m_r` for its run `r`.
//!
//! Decoded, the 64 bytes of `qs` shifted right by `2v` and masked are source vector `v`:
//! its bytes `32n + l` hold weight `128n + 32v + l`. The reference is candle's own Q2_K
//! matmul (`QTensor` forward): the integer dot products are exact in both, so the results
//! differ only by float rounding.

use half::f16;

use super::q8k::{self, Format, NaturalBlock, Q8kRows, Units};

/// Bytes per Q2_K super-block.
const BLOCK_BYTES: usize = 84;
/// Where `qs` starts in a block.
const QS: usize = 16;

/// Natural unit in lane `l` of source vector `v`: bytes `4l..4l+4` of the shifted `qs`,
/// half `l / 8` of the block, weights `128·(l / 8) + 32v + 4·(l mod 8)` onwards.
const fn source_unit(v: usize, l: usize) -> u8 {
    (32 * (l / 8) + 8 * v + l % 8) as u8
}

/// The bodies' storage order.
pub(super) const UNITS: Units = q8k::transposed(&{
    let mut src = [[0u8; 16]; 4];
    let mut v = 0;
    while v < 4 {
        let mut l = 0;
        while l < 16 {
            src[v][l] = source_unit(v, l);
            l += 1;
        }
        v += 1;
    }
    src
});
const _: () = assert!(q8k::lanes_hold_runs(&UNITS));

/// Lane `L`'s scale and min: one per run of 16.
pub(super) const LANE_RUN: [u32; 16] = q8k::lane_scales(&UNITS, 1);

/// The format [`q8k::linear`] runs.
pub(super) const Q2K: Format = Format {
    name: "q2_k",
    block_bytes: BLOCK_BYTES,
    units: UNITS,
    dots,
    natural,
};

/// `out[m×n] = q8k(x)[m×k] · deq(W)ᵀ`: `x` row-major f32, `W` `n` rows of `k / 256` Q2_K
/// super-blocks read in place.
#[cfg(test)]
pub(crate) fn linear(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[u8],
    n: usize,
    out: &mut [f32],
) -> candle_core::Result<()> {
    q8k::linear(&Q2K, x, m, k, w, n, out)
}

#[inline(always)]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// `d`, `dmin` of a block.
#[inline(always)]
fn d_dmin(blk: &[u8]) -> (f32, f32) {
    (f16_at(blk, 80), f16_at(blk, 82))
}

/// One super-block in natural order (the portable body's decoding).
fn natural(blk: &[u8]) -> NaturalBlock {
    let (d, dmin) = d_dmin(blk);
    NaturalBlock {
        q: std::array::from_fn(|p| {
            let (n, j, l) = (p / 128, p % 128 / 32, p % 32);
            (blk[QS + 32 * n + l] >> (2 * j)) & 3
        }),
        sc: std::array::from_fn(|r| (blk[r] & 0xF) as i32),
        mn: std::array::from_fn(|r| (blk[r] >> 4) as i32),
        d,
        dmin,
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::q8k::{k_quant_avx2, k_quant_avx512, k_quant_bodies};
    use super::{d_dmin, Q8kRows, BLOCK_BYTES, LANE_RUN, QS};
    use crate::kernels::q8k::QK_K;

    /// One super-block for the AVX-512 bodies: the four source vectors (`qs` shifted by
    /// 0, 2, 4, 6), the lanes' `d·sc` and `dmin·m`.
    macro_rules! decode512 {
        ($blk:expr) => {{
            let blk: &[u8] = $blk;
            assert!(blk.len() >= BLOCK_BYTES);
            let (d, dmin) = d_dmin(blk);
            // SAFETY (loads): `LANE_RUN` holds 16 lanes; a block is 84 bytes with its
            // scales at 0..16 and `qs` at 16..80.
            let (idx, scales, qs) = unsafe {
                (
                    _mm512_loadu_si512(LANE_RUN.as_ptr() as *const _),
                    _mm_loadu_si128(blk.as_ptr() as *const _),
                    _mm512_loadu_si512(blk.as_ptr().add(QS) as *const _),
                )
            };
            let packed = _mm512_permutexvar_epi32(idx, _mm512_cvtepu8_epi32(scales));
            let nibble = _mm512_set1_epi32(0xF);
            let sc = _mm512_cvtepi32_ps(_mm512_and_si512(packed, nibble));
            let mn = _mm512_cvtepi32_ps(_mm512_srli_epi32::<4>(packed));
            let two = _mm512_set1_epi8(3);
            let w = [
                _mm512_and_si512(qs, two),
                _mm512_and_si512(_mm512_srli_epi16::<2>(qs), two),
                _mm512_and_si512(_mm512_srli_epi16::<4>(qs), two),
                _mm512_and_si512(_mm512_srli_epi16::<6>(qs), two),
            ];
            (
                w,
                _mm512_mul_ps(sc, _mm512_set1_ps(d)),
                _mm512_mul_ps(mn, _mm512_set1_ps(dmin)),
            )
        }};
    }

    /// Half `p` (bytes `32p..32p+32`) of the four source vectors, for the AVX2 body.
    macro_rules! decode256 {
        ($blk:expr, $p:expr) => {{
            let blk: &[u8] = $blk;
            let p: usize = $p;
            assert!(blk.len() >= BLOCK_BYTES && p < 2);
            // SAFETY: within the block's `qs`.
            let qs = unsafe { _mm256_loadu_si256(blk.as_ptr().add(QS + 32 * p) as *const _) };
            let two = _mm256_set1_epi8(3);
            [
                _mm256_and_si256(qs, two),
                _mm256_and_si256(_mm256_srli_epi16::<2>(qs), two),
                _mm256_and_si256(_mm256_srli_epi16::<4>(qs), two),
                _mm256_and_si256(_mm256_srli_epi16::<6>(qs), two),
            ]
        }};
    }

    /// The lanes' `d·sc` and `dmin·m` for the AVX2 body.
    macro_rules! lanes {
        ($blk:expr) => {{
            let blk: &[u8] = $blk;
            let (d, dmin) = d_dmin(blk);
            let packed = |lane: usize| blk[LANE_RUN[lane] as usize];
            let scd: [f32; 16] = std::array::from_fn(|lane| (packed(lane) & 0xF) as f32 * d);
            let mnd: [f32; 16] = std::array::from_fn(|lane| (packed(lane) >> 4) as f32 * dmin);
            (scd, mnd)
        }};
    }

    k_quant_bodies!(decode512, decode256, lanes, BLOCK_BYTES);
}

q8k::k_quant_dots!(Q2K);

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};

    use crate::kernels::q8k::tests as shared;

    fn q2k_weight(n: usize, k: usize, seed: u32) -> QTensor {
        shared::test_weight(GgmlDType::Q2K, 16, n, k, seed)
    }

    /// The portable decoding reads the bit fields as candle dequantizes them, and the test
    /// data reaches every 2-bit value.
    #[test]
    fn the_bit_fields_are_read_as_candle_dequantizes_them() {
        let blocks = shared::natural_is_candles_dequantize(&Q2K, &q2k_weight(3, 512, 2));
        let mut values = [0usize; 4];
        for q in blocks.iter().flat_map(|w| w.q) {
            values[q as usize] += 1;
        }
        assert!(
            values.iter().all(|&c| c > 0),
            "every 2-bit value occurs: {values:?}"
        );
    }

    q8k::k_quant_tests!(Q2K, q2k_weight);
}

/// `cargo test --release -p zaya --lib q2k_q8k::speed -- --ignored --nocapture`: this kernel,
/// candle's Q2_K matmul and a plain read of the same bytes on one expert's gate/up shape of
/// ZAYA1-8B (4096 × 2048; see [`q8k::speed`]).
#[test]
#[ignore]
#[cfg(test)]
fn speed() {
    q8k::speed(candle_core::quantized::GgmlDType::Q2K, (4096, 2048), linear);
}
