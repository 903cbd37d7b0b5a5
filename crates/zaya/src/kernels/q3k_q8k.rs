//! Products against Q3_K weights with the activations rounded to Q8_K, in integers: the
//! arithmetic of candle's (llama.cpp's) Q3_K matmul, on the blocks in place, through the
//! bodies [`super::q8k`] shares (AVX-512 with or without VNNI, AVX2, portable).
//!
//! Q3_K super-block (110 bytes): 32 bytes `hmask`, 64 bytes `qs` of 2-bit values (laid out
//! as Q2_K's), 12 bytes of sixteen 6-bit scales (one per run of 16 weights, stored `+32`),
//! f16 `d`. Weight `128n + 32j + l` (`l < 32`) is bits `2j..2j+2` of `qs[32n + l]`, minus
//! 4 unless bit `4n + j` of `hmask[l]` is set; weight `= d·(sc_r − 32)·q`.
//!
//! With the high bit as the value's 4 the stored value is `q + 4` in 0..8, so, as Q6_K
//! does with its 32: `x·w = Σ_runs d·s_r·Σ (q+4)·qx − d·4·s_r·Σ qx`. A block decodes to
//! Q2_K's source vectors with a third bit each, and shares Q2_K's storage order and lane
//! scales ([`super::q2k_q8k`]). The reference is candle's own Q3_K matmul (`QTensor`
//! forward): the integer dot products are exact in both, so the results differ only by
//! float rounding.

use half::f16;

use super::q2k_q8k::{LANE_RUN, UNITS};
use super::q8k::{self, Format, NaturalBlock, Q8kRows};

/// Bytes per Q3_K super-block.
const BLOCK_BYTES: usize = 110;
/// Where `qs` and the scales start in a block (`hmask` is at 0).
const QS: usize = 32;
const SCALES: usize = 96;

/// The format [`q8k::linear`] runs.
pub(super) const Q3K: Format = Format {
    name: "q3_k",
    block_bytes: BLOCK_BYTES,
    units: UNITS,
    dots,
    natural,
};

/// `out[m×n] = q8k(x)[m×k] · deq(W)ᵀ`: `x` row-major f32, `W` `n` rows of `k / 256` Q3_K
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
    q8k::linear(&Q3K, x, m, k, w, n, out)
}

#[inline(always)]
fn d_of(blk: &[u8]) -> f32 {
    f16::from_bits(u16::from_le_bytes([blk[108], blk[109]])).to_f32()
}

/// The sixteen scales of a block, `sc − 32` (llama.cpp's unpacking of the 12 bytes: low
/// nibbles of bytes 0..8, high nibbles of bytes 0..8, and two bits each from bytes 8..12).
#[inline(always)]
fn scales(blk: &[u8]) -> [i32; 16] {
    const K1: u32 = 0x0303_0303;
    const K2: u32 = 0x0f0f_0f0f;
    let w = |i: usize| {
        let b = &blk[SCALES + i..SCALES + i + 4];
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    };
    let (a0, a1, tmp) = (w(0), w(4), w(8));
    let words = [
        (a0 & K2) | ((tmp & K1) << 4),
        (a1 & K2) | (((tmp >> 2) & K1) << 4),
        ((a0 >> 4) & K2) | (((tmp >> 4) & K1) << 4),
        ((a1 >> 4) & K2) | (((tmp >> 6) & K1) << 4),
    ];
    std::array::from_fn(|r| ((words[r / 4] >> (8 * (r % 4))) & 0xFF) as i32 - 32)
}

/// One super-block in natural order (the portable body's decoding): values `q + 4`.
fn natural(blk: &[u8]) -> NaturalBlock {
    let sc = scales(blk);
    let d = d_of(blk);
    NaturalBlock {
        q: std::array::from_fn(|p| {
            let (n, j, l) = (p / 128, p % 128 / 32, p % 32);
            let low = (blk[QS + 32 * n + l] >> (2 * j)) & 3;
            low | ((blk[l] >> (4 * n + j)) & 1) << 2
        }),
        sc,
        mn: sc.map(|s| 4 * s),
        d,
        dmin: d,
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::q8k::{k_quant_avx2, k_quant_avx512, k_quant_bodies};
    use super::{d_of, scales, Q8kRows, BLOCK_BYTES, LANE_RUN, QS};
    use crate::kernels::q8k::QK_K;

    /// One super-block for the AVX-512 bodies: the four source vectors (`qs` shifted by
    /// 0, 2, 4, 6 with their `hmask` bit as 4), the lanes' `d·s` and `d·4·s`.
    macro_rules! decode512 {
        ($blk:expr) => {{
            let blk: &[u8] = $blk;
            assert!(blk.len() >= BLOCK_BYTES);
            let d = d_of(blk);
            let sc = scales(blk);
            // SAFETY (loads): `LANE_RUN` and `sc` hold 16 lanes; a block is 110 bytes with
            // `hmask` at 0..32 and `qs` at 32..96.
            let (idx, sc, qs, hm) = unsafe {
                (
                    _mm512_loadu_si512(LANE_RUN.as_ptr() as *const _),
                    _mm512_loadu_si512(sc.as_ptr() as *const _),
                    _mm512_loadu_si512(blk.as_ptr().add(QS) as *const _),
                    _mm256_loadu_si256(blk.as_ptr() as *const _),
                )
            };
            let scd = _mm512_mul_ps(
                _mm512_cvtepi32_ps(_mm512_permutexvar_epi32(idx, sc)),
                _mm512_set1_ps(d),
            );
            // bytes 32n + l of `qs` take bit 4n + v of `hmask[l]`: `hmask` and `hmask >> 4`
            // side by side, then bit v of each byte moved to bit 2
            let hm =
                _mm512_inserti64x4::<1>(_mm512_castsi256_si512(hm), _mm256_srli_epi16::<4>(hm));
            let (two, four) = (_mm512_set1_epi8(3), _mm512_set1_epi8(4));
            let high = [
                _mm512_slli_epi16::<2>(hm),
                _mm512_slli_epi16::<1>(hm),
                hm,
                _mm512_srli_epi16::<1>(hm),
            ];
            let low = [
                qs,
                _mm512_srli_epi16::<2>(qs),
                _mm512_srli_epi16::<4>(qs),
                _mm512_srli_epi16::<6>(qs),
            ];
            let w: [__m512i; 4] = std::array::from_fn(|v| {
                _mm512_or_si512(
                    _mm512_and_si512(low[v], two),
                    _mm512_and_si512(high[v], four),
                )
            });
            (w, scd, _mm512_mul_ps(scd, _mm512_set1_ps(4.0)))
        }};
    }

    /// Half `p` (bytes `32p..32p+32`) of the four source vectors, for the AVX2 body.
    macro_rules! decode256 {
        ($blk:expr, $p:expr) => {{
            let blk: &[u8] = $blk;
            let p: usize = $p;
            assert!(blk.len() >= BLOCK_BYTES && p < 2);
            // SAFETY: within the block's `hmask` and `qs`.
            let (qs, hm) = unsafe {
                (
                    _mm256_loadu_si256(blk.as_ptr().add(QS + 32 * p) as *const _),
                    _mm256_loadu_si256(blk.as_ptr() as *const _),
                )
            };
            let hm = if p == 0 {
                hm
            } else {
                _mm256_srli_epi16::<4>(hm)
            };
            let (two, four) = (_mm256_set1_epi8(3), _mm256_set1_epi8(4));
            let high = [
                _mm256_slli_epi16::<2>(hm),
                _mm256_slli_epi16::<1>(hm),
                hm,
                _mm256_srli_epi16::<1>(hm),
            ];
            let low = [
                qs,
                _mm256_srli_epi16::<2>(qs),
                _mm256_srli_epi16::<4>(qs),
                _mm256_srli_epi16::<6>(qs),
            ];
            let w: [__m256i; 4] = std::array::from_fn(|v| {
                _mm256_or_si256(
                    _mm256_and_si256(low[v], two),
                    _mm256_and_si256(high[v], four),
                )
            });
            w
        }};
    }

    /// The lanes' `d·s` and `d·4·s` for the AVX2 body.
    macro_rules! lanes {
        ($blk:expr) => {{
            let blk: &[u8] = $blk;
            let (sc, d) = (scales(blk), d_of(blk));
            let scd: [f32; 16] = std::array::from_fn(|lane| sc[LANE_RUN[lane] as usize] as f32 * d);
            (scd, scd.map(|s| 4.0 * s))
        }};
    }

    k_quant_bodies!(decode512, decode256, lanes, BLOCK_BYTES);
}

q8k::k_quant_dots!(Q3K);

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};

    use crate::kernels::q8k::tests as shared;

    fn q3k_weight(n: usize, k: usize, seed: u32) -> QTensor {
        shared::test_weight(GgmlDType::Q3K, 16, n, k, seed)
    }

    /// The portable decoding reads the bit fields as candle dequantizes them, and the test
    /// data reaches every 3-bit value and negative scales.
    #[test]
    fn the_bit_fields_are_read_as_candle_dequantizes_them() {
        let blocks = shared::natural_is_candles_dequantize(&Q3K, &q3k_weight(3, 512, 2));
        let mut values = [0usize; 8];
        for q in blocks.iter().flat_map(|w| w.q) {
            values[q as usize] += 1;
        }
        let negative_scales = blocks.iter().flat_map(|w| w.sc).filter(|&s| s < 0).count();
        assert!(
            values.iter().all(|&c| c > 0),
            "every 3-bit value occurs: {values:?}"
        );
        assert!(negative_scales > 0, "the data must reach negative scales");
    }

    q8k::k_quant_tests!(Q3K, q3k_weight);
}

/// `cargo test --release -p zaya --lib q3k_q8k::speed -- --ignored --nocapture`: this kernel,
/// candle's Q3_K matmul and a plain read of the same bytes on one expert's gate/up shape of
/// ZAYA1-8B (4096 × 2048; see [`q8k::speed`]).
#[test]
#[ignore]
#[cfg(test)]
fn speed() {
    q8k::speed(candle_core::quantized::GgmlDType::Q3K, (4096, 2048), linear);
}
