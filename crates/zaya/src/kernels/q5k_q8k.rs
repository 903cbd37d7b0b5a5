//! Products against Q5_K weights with the activations rounded to Q8_K, in integers: the
//! arithmetic of candle's (llama.cpp's) Q5_K matmul, on the blocks in place, through the
//! bodies [`super::q8k`] shares (AVX-512 with or without VNNI, AVX2, portable).
//!
//! Q5_K super-block (176 bytes): f16 `d`, f16 `dmin`, the 12 bytes of 6-bit scales and mins
//! of eight sub-blocks of 32 that Q4_K has, 32 bytes `qh` of fifth bits, 128 bytes `qs` of
//! nibbles laid out as Q4_K's (bytes `32c..32c+32`: weights `64c..64c+32` in the low
//! nibbles, `64c+32..64c+64` in the high ones). Weight `64c + l` takes bit `2c` of `qh[l]`,
//! weight `64c + 32 + l` bit `2c + 1`, as its value's 16. Weight `= d·sc_s·q − dmin·m_s`.
//!
//! So a Q5_K block decodes to Q4_K's source vectors with a fifth bit each, and shares Q4_K's
//! storage order, lane scales and scale unpacking ([`super::q4k_q8k`]). The reference is
//! candle's own Q5_K matmul (`QTensor` forward): the integer dot products are exact in
//! both, so the results differ only by float rounding.

use super::q4k_q8k::{f16_at, scales_and_mins, LANE_SUB, UNITS};
use super::q8k::{self, Format, NaturalBlock, Q8kRows};

/// Bytes per Q5_K super-block.
const BLOCK_BYTES: usize = 176;
/// Where `qh` and `qs` start in a block.
const QH: usize = 16;
const QS: usize = 48;

/// The format [`q8k::linear`] runs.
pub(super) const Q5K: Format = Format {
    name: "q5_k",
    block_bytes: BLOCK_BYTES,
    units: UNITS,
    dots,
    natural,
};

/// `out[m×n] = q8k(x)[m×k] · deq(W)ᵀ`: `x` row-major f32, `W` `n` rows of `k / 256` Q5_K
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
    q8k::linear(&Q5K, x, m, k, w, n, out)
}

/// The 5-bit value (0..32) of weight `p` of a super-block.
#[inline(always)]
fn value(blk: &[u8], p: usize) -> u8 {
    let (c, l) = (p / 64, p % 64);
    let byte = blk[QS + 32 * c + l % 32];
    let (low, bit) = if l < 32 {
        (byte & 0xF, 2 * c)
    } else {
        (byte >> 4, 2 * c + 1)
    };
    low | ((blk[QH + l % 32] >> bit) & 1) << 4
}

/// One super-block in natural order (the portable body's decoding).
fn natural(blk: &[u8]) -> NaturalBlock {
    let (sc, mn) = scales_and_mins(blk);
    let byte = |v: u64, s: usize| (v >> (8 * s)) as u8 as i32;
    NaturalBlock {
        q: std::array::from_fn(|p| value(blk, p)),
        sc: std::array::from_fn(|r| byte(sc, r / 2)),
        mn: std::array::from_fn(|r| byte(mn, r / 2)),
        d: f16_at(blk, 0),
        dmin: f16_at(blk, 2),
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::q8k::{k_quant_avx2, k_quant_avx512, k_quant_bodies};
    use super::{scales_and_mins, Q8kRows, BLOCK_BYTES, LANE_SUB, QH, QS};
    use crate::kernels::q4k_q8k::scale_lanes512;
    use crate::kernels::q8k::QK_K;

    /// One super-block for the AVX-512 bodies: Q4_K's four source vectors (nibbles) with
    /// their fifth bits, the lanes' `d·sc` and `dmin·m`.
    macro_rules! decode512 {
        ($blk:expr) => {{
            let blk: &[u8] = $blk;
            assert!(blk.len() >= BLOCK_BYTES);
            let (scd, mnd) = scale_lanes512!(blk);
            let (low, five) = (_mm512_set1_epi8(0x0F), _mm512_set1_epi8(0x10));
            // SAFETY: a block is 176 bytes with `qh` at 16..48 and `qs` at 48..176.
            let (q0, q1, qh) = unsafe {
                let p = blk.as_ptr();
                (
                    _mm512_loadu_si512(p.add(QS) as *const _),
                    _mm512_loadu_si512(p.add(QS + 64) as *const _),
                    _mm256_loadu_si256(p.add(QH) as *const _),
                )
            };
            // bytes 0..32 of each 64-byte load are chunk 2c's (bits 0, 1 / 4, 5 of `qh`),
            // bytes 32..64 chunk 2c + 1's (bits 2, 3 / 6, 7): `qh` and `qh >> 2` side by side
            let qh =
                _mm512_inserti64x4::<1>(_mm512_castsi256_si512(qh), _mm256_srli_epi16::<2>(qh));
            let fifth = |v: __m512i| _mm512_and_si512(v, five);
            let w = [
                _mm512_or_si512(_mm512_and_si512(q0, low), fifth(_mm512_slli_epi16::<4>(qh))),
                _mm512_or_si512(
                    _mm512_and_si512(_mm512_srli_epi16::<4>(q0), low),
                    fifth(_mm512_slli_epi16::<3>(qh)),
                ),
                _mm512_or_si512(_mm512_and_si512(q1, low), fifth(qh)),
                _mm512_or_si512(
                    _mm512_and_si512(_mm512_srli_epi16::<4>(q1), low),
                    fifth(_mm512_srli_epi16::<1>(qh)),
                ),
            ];
            (w, scd, mnd)
        }};
    }

    /// Half `p` (bytes `32p..32p+32`) of the four source vectors, for the AVX2 body.
    macro_rules! decode256 {
        ($blk:expr, $p:expr) => {{
            let blk: &[u8] = $blk;
            let p: usize = $p;
            assert!(blk.len() >= BLOCK_BYTES && p < 2);
            let (low, five) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x10));
            // SAFETY: within the block's `qs` and `qh`.
            let (q0, q1, qh) = unsafe {
                let at = blk.as_ptr().add(QS + 32 * p);
                (
                    _mm256_loadu_si256(at as *const _),
                    _mm256_loadu_si256(at.add(64) as *const _),
                    _mm256_loadu_si256(blk.as_ptr().add(QH) as *const _),
                )
            };
            let qh = if p == 0 {
                qh
            } else {
                _mm256_srli_epi16::<2>(qh)
            };
            let fifth = |v: __m256i| _mm256_and_si256(v, five);
            [
                _mm256_or_si256(_mm256_and_si256(q0, low), fifth(_mm256_slli_epi16::<4>(qh))),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16::<4>(q0), low),
                    fifth(_mm256_slli_epi16::<3>(qh)),
                ),
                _mm256_or_si256(_mm256_and_si256(q1, low), fifth(qh)),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16::<4>(q1), low),
                    fifth(_mm256_srli_epi16::<1>(qh)),
                ),
            ]
        }};
    }

    /// The lanes' `d·sc` and `dmin·m` for the AVX2 body.
    macro_rules! lanes {
        ($blk:expr) => {{
            let blk: &[u8] = $blk;
            let (sc, mn) = scales_and_mins(blk);
            let (d, dmin) = (super::f16_at(blk, 0), super::f16_at(blk, 2));
            let byte = |v: u64, lane: usize| (v >> (8 * LANE_SUB[lane])) as u8 as f32;
            let scd: [f32; 16] = std::array::from_fn(|lane| byte(sc, lane) * d);
            let mnd: [f32; 16] = std::array::from_fn(|lane| byte(mn, lane) * dmin);
            (scd, mnd)
        }};
    }

    k_quant_bodies!(decode512, decode256, lanes, BLOCK_BYTES);
}

q8k::k_quant_dots!(Q5K);

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};

    use crate::kernels::q8k::tests as shared;

    fn q5k_weight(n: usize, k: usize, seed: u32) -> QTensor {
        shared::test_weight(GgmlDType::Q5K, 32, n, k, seed)
    }

    /// The portable decoding reads the bit fields as candle dequantizes them, and the test
    /// data sets fifth bits.
    #[test]
    fn the_bit_fields_are_read_as_candle_dequantizes_them() {
        let blocks = shared::natural_is_candles_dequantize(&Q5K, &q5k_weight(3, 512, 2));
        let fifth_bits = blocks.iter().flat_map(|w| w.q).filter(|&q| q >= 16).count();
        assert!(fifth_bits > 0, "the data must set fifth bits");
    }

    q8k::k_quant_tests!(Q5K, q5k_weight);
}

/// `cargo test --release -p zaya --lib q5k_q8k::speed -- --ignored --nocapture`: this kernel,
/// candle's Q5_K matmul and a plain read of the same bytes on one expert's gate/up shape of
/// ZAYA1-8B (4096 × 2048; see [`q8k::speed`]).
#[test]
#[ignore]
#[cfg(test)]
fn speed() {
    q8k::speed(candle_core::quantized::GgmlDType::Q5K, (4096, 2048), linear);
}
