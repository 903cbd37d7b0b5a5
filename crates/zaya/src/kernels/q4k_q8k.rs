//! Products against Q4_K weights with the activations rounded to Q8_K, in integers: the
//! arithmetic of candle's (llama.cpp's) Q4_K matmul — activations rounded by
//! [`super::q8k`] exactly as candle's `BlockQ8K::from_float`, integer dot products with
//! the nibbles, the 6-bit sub-block scales and mins applied in 32-bit integers, one float
//! scale per super-block and term — but reading the GGUF blocks in place. candle repacks
//! every Q4_K matrix into 16-row tiles on first use and keeps the tiles beside the blocks
//! (resident memory about 2.3× the weights, and the first pass over each expert pays the
//! repacking); this kernel needs no second copy.
//!
//! Q4_K super-block (144 bytes): f16 `d`, f16 `dmin`, 12 bytes of 6-bit scales and mins of
//! eight sub-blocks of 32, 128 bytes of nibbles (bytes `32c..32c+32`: weights `64c..64c+32`
//! in the low nibbles, `64c+32..64c+64` in the high ones). Weight `= d·sc_s·q − dmin·m_s`.
//!
//! Decoded, a 64-byte load of nibbles gives, in its low nibbles, weights `128c..128c+32`
//! and `128c+64..128c+96`, in its high nibbles the two runs of 32 after each: those are
//! the source vectors. The driver and the bodies (AVX-512 with or without VNNI, AVX2,
//! portable) are [`super::q8k`]'s; the weight rows are split across the kernel pool, each
//! super-block decoded once per group of up to eight activation rows, products of more
//! than [`GEMV_ROWS`](super::cpu::GEMV_ROWS) rows that many rows at a time.
//!
//! The reference is candle's own Q4_K matmul (`QTensor` forward): the integer sums are
//! exact in both, so the results differ only by the order of the float sums.

use half::f16;

use super::q8k::{self, Format, NaturalBlock, Q8kRows, Units, QK_K};

/// Bytes per Q4_K super-block.
const BLOCK_BYTES: usize = 144;

/// Natural unit in lane `l` of source vector `v`: `v / 2` picks the 64 nibble bytes (128
/// weights), `v % 2` the low or high nibbles; lanes 0..8 are the first 32 bytes' weights,
/// lanes 8..16 the next 32 bytes' (64 weights further on).
const fn source_unit(v: usize, l: usize) -> u8 {
    let unit = 32 * (v / 2) + 8 * (v % 2) + if l < 8 { l } else { l + 8 };
    unit as u8
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

/// Lane `L`'s sub-block (scale and min): one per two runs of 16.
pub(super) const LANE_SUB: [u32; 16] = q8k::lane_scales(&UNITS, 2);

/// [`LANE_SUB`] eight lanes on: where lane `L`'s min sits in [`scale_lanes512`]'s vector of
/// eight scales then eight mins.
pub(super) const LANE_SUB_MIN: [u32; 16] = {
    let mut idx = LANE_SUB;
    let mut lane = 0;
    while lane < 16 {
        idx[lane] += 8;
        lane += 1;
    }
    idx
};

/// Lanes 0..8 take `d`, lanes 8..16 `dmin` (from a vector whose lanes 0 and 1 hold them).
pub(super) const D_DMIN_LANES: [u32; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1];

/// The lanes' `d·sc` and `dmin·m` of a Q4_K or Q5_K super-block (both begin with `d`,
/// `dmin` and the 12 bytes of scales and mins), for the AVX-512 bodies: the eight scales and
/// eight mins widened and multiplied by their `d` in one vector, then spread to the lanes —
/// the same products as widening and scaling each lane's own (five vector operations fewer
/// a super-block than spreading each byte vector first, in a body bound by them).
#[cfg(target_arch = "x86_64")]
macro_rules! scale_lanes512 {
    ($blk:expr) => {{
        let blk: &[u8] = $blk;
        // both f16 scales in one conversion (exact, like `half`): [d, dmin, 0, 0]
        let bits = i32::from_le_bytes([blk[0], blk[1], blk[2], blk[3]]);
        let dd = _mm512_castps128_ps512(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)));
        let (sc, mn) = $crate::kernels::q4k_q8k::scales_and_mins(blk);
        // SAFETY: the three index tables hold 16 lanes each.
        let (by, sub, sub_min) = unsafe {
            use $crate::kernels::q4k_q8k::{D_DMIN_LANES, LANE_SUB, LANE_SUB_MIN};
            (
                _mm512_loadu_si512(D_DMIN_LANES.as_ptr() as *const _),
                _mm512_loadu_si512(LANE_SUB.as_ptr() as *const _),
                _mm512_loadu_si512(LANE_SUB_MIN.as_ptr() as *const _),
            )
        };
        let v = _mm512_cvtepu8_epi32(_mm_set_epi64x(mn as i64, sc as i64));
        let v = _mm512_mul_ps(_mm512_cvtepi32_ps(v), _mm512_permutexvar_ps(by, dd));
        (
            _mm512_permutexvar_ps(sub, v),
            _mm512_permutexvar_ps(sub_min, v),
        )
    }};
}
#[cfg(target_arch = "x86_64")]
pub(super) use scale_lanes512;

/// The format [`q8k::linear`] runs.
pub(super) const Q4K: Format = Format {
    name: "q4_k",
    block_bytes: BLOCK_BYTES,
    units: UNITS,
    dots,
    natural,
};

/// `out[m×n] = q8k(x)[m×k] · deq(W)ᵀ`: `x` row-major f32, `W` `n` rows of `k / 256` Q4_K
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
    q8k::linear(&Q4K, x, m, k, w, n, out)
}

/// The eight 6-bit scales and eight 6-bit mins of a Q4_K (or Q5_K) super-block (the 12
/// bytes at 4),
/// as two little-endian u64 of one byte each (llama.cpp's unpacking).
#[inline(always)]
pub(super) fn scales_and_mins(blk: &[u8]) -> (u64, u64) {
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
pub(super) fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// One super-block in natural order (the portable body's decoding).
fn natural(blk: &[u8]) -> NaturalBlock {
    let (sc, mn) = scales_and_mins(blk);
    let byte = |v: u64, s: usize| (v >> (8 * s)) as u8 as i32;
    NaturalBlock {
        q: std::array::from_fn(|p| {
            let s = p / 32;
            let b = blk[16 + 32 * (s / 2) + p % 32];
            if s % 2 == 0 {
                b & 0xF
            } else {
                b >> 4
            }
        }),
        sc: std::array::from_fn(|r| byte(sc, r / 2)),
        mn: std::array::from_fn(|r| byte(mn, r / 2)),
        d: f16_at(blk, 0),
        dmin: f16_at(blk, 2),
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::q8k::{k_quant_avx2, k_quant_avx512, k_quant_bodies};
    use super::{scales_and_mins, Q8kRows, BLOCK_BYTES, LANE_SUB, QK_K};

    /// One super-block for the AVX-512 bodies: the four source vectors (nibbles), the
    /// lanes' `d·sc` and `dmin·m`.
    macro_rules! decode512 {
        ($blk:expr) => {{
            let blk: &[u8] = $blk;
            assert!(blk.len() >= BLOCK_BYTES);
            let (scd, mnd) = scale_lanes512!(blk);
            let low = _mm512_set1_epi8(0x0F);
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
                _mm512_and_si512(_mm512_srli_epi16::<4>(q0), low),
                _mm512_and_si512(q1, low),
                _mm512_and_si512(_mm512_srli_epi16::<4>(q1), low),
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
            let low = _mm256_set1_epi8(0x0F);
            // SAFETY: within the block's nibbles (16..144).
            let (q0, q1) = unsafe {
                let at = blk.as_ptr().add(16 + 32 * p);
                (
                    _mm256_loadu_si256(at as *const _),
                    _mm256_loadu_si256(at.add(64) as *const _),
                )
            };
            [
                _mm256_and_si256(q0, low),
                _mm256_and_si256(_mm256_srli_epi16::<4>(q0), low),
                _mm256_and_si256(q1, low),
                _mm256_and_si256(_mm256_srli_epi16::<4>(q1), low),
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

q8k::k_quant_dots!(Q4K);

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};

    use crate::kernels::q8k::tests as shared;

    fn q4k_weight(n: usize, k: usize, seed: u32) -> QTensor {
        shared::test_weight(GgmlDType::Q4K, 32, n, k, seed)
    }

    q8k::k_quant_tests!(Q4K, q4k_weight);
}

/// `cargo test --release -p zaya --lib q4k_q8k::speed -- --ignored --nocapture`: this kernel,
/// candle's Q4_K matmul and a plain read of the same bytes on one expert's gate/up shape of
/// ZAYA1-8B (4096 × 2048; see [`q8k::speed`]).
#[test]
#[ignore]
#[cfg(test)]
fn speed() {
    q8k::speed(candle_core::quantized::GgmlDType::Q4K, (4096, 2048), linear);
}
