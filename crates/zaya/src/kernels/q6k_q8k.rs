//! Products against Q6_K weights with the activations rounded to Q8_K, in integers: the
//! arithmetic of candle's (llama.cpp's) Q6_K matmul — activations rounded by
//! [`super::q8k`] exactly as candle's `BlockQ8K::from_float`, integer dot products with
//! the 6-bit values, the `i8` scale of each run of 16 applied in 32-bit integers, the
//! `−32` offset once per run through the activations' sums — reading the GGUF blocks in
//! place. candle repacks every Q6_K matrix on first use and keeps the copy beside the
//! blocks (ZAYA1-8B in q4_k_m, whose head and 20 layers' v and experts' down projections
//! are Q6_K: +2 GB resident over the file), and the first pass over each expert pays the
//! repacking; this kernel needs neither.
//!
//! Q6_K super-block (210 bytes): 128 bytes `ql` of low nibbles, 64 bytes `qh` of 2-bit
//! pairs, 16 `i8` scales (one per 16 weights), f16 `d`. Half `h` of the block (weights
//! `128h..128h+128`) reads `ql[64h..64h+64]` and `qh[32h..32h+32]`: byte `l` of its `ql`
//! holds weights `l` (low nibble) and `l+64` (high), with `qh[l mod 32]`'s bit pairs
//! 0–1 / 4–5 (`l < 32`) or 2–3 / 6–7 above them. Weight `= d·sc_r·(q − 32)`.
//!
//! Decoded, a 64-byte load of `ql` with its `qh` bits gives 64 consecutive weights (low
//! nibbles) and the next 64 (high): source vector `v` holds weights `64v..64v+64`. The
//! driver and the bodies (AVX-512 with or without VNNI, AVX2, portable) are
//! [`super::q8k`]'s. The reference is candle's own Q6_K matmul (`QTensor` forward): the
//! integer sums are exact in both, so the results differ only by the order of the float
//! sums.

use half::f16;

use super::q8k::{self, Format, NaturalBlock, Q8kRows, Units, QK_K};

/// Bytes per Q6_K super-block.
const BLOCK_BYTES: usize = 210;

/// The bodies' storage order: source vector `v` lane `l` is natural unit `16v + l`.
pub(super) const UNITS: Units = q8k::transposed(&{
    let mut src = [[0u8; 16]; 4];
    let mut v = 0;
    while v < 4 {
        let mut l = 0;
        while l < 16 {
            src[v][l] = (16 * v + l) as u8;
            l += 1;
        }
        v += 1;
    }
    src
});
const _: () = assert!(q8k::lanes_hold_runs(&UNITS));

/// Lane `L`'s scale: one per run of 16.
const LANE_SCALE: [u32; 16] = q8k::lane_scales(&UNITS, 1);

/// The format [`q8k::linear`] runs.
pub(super) const Q6K: Format = Format {
    name: "q6_k",
    block_bytes: BLOCK_BYTES,
    units: UNITS,
    dots,
    natural,
};

/// `out[m×n] = q8k(x)[m×k] · deq(W)ᵀ`: `x` row-major f32, `W` `n` rows of `k / 256` Q6_K
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
    q8k::linear(&Q6K, x, m, k, w, n, out)
}

#[inline(always)]
fn d_of(blk: &[u8]) -> f32 {
    f16::from_bits(u16::from_le_bytes([blk[208], blk[209]])).to_f32()
}

/// The 6-bit value (0..64) of weight `p` of a super-block.
#[inline(always)]
fn value(blk: &[u8], p: usize) -> u8 {
    let (h, l) = (p / 128, p % 128);
    let byte = blk[64 * h + l % 64];
    let low = if l < 64 { byte & 0xF } else { byte >> 4 };
    let shift = 2 * (l / 32);
    let high = (blk[128 + 32 * h + l % 32] >> shift) & 3;
    low | high << 4
}

/// One super-block in natural order (the portable body's decoding): weight
/// `= d·sc·q − d·32·sc`.
fn natural(blk: &[u8]) -> NaturalBlock {
    let sc: [i32; 16] = std::array::from_fn(|r| blk[192 + r] as i8 as i32);
    let d = d_of(blk);
    NaturalBlock {
        q: std::array::from_fn(|p| value(blk, p)),
        sc,
        mn: sc.map(|s| 32 * s),
        d,
        dmin: d,
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::q8k::{k_quant_avx2, k_quant_avx512, k_quant_bodies};
    use super::{Q8kRows, BLOCK_BYTES, LANE_SCALE, QK_K};

    /// One super-block for the AVX-512 bodies: the four source vectors (weights
    /// `64v..64v+64`), the lanes' `d·sc` and `d·32·sc` (exact: `32·` is a power of two).
    macro_rules! decode512 {
        ($blk:expr) => {{
            let blk: &[u8] = $blk;
            assert!(blk.len() >= BLOCK_BYTES);
            let p = blk.as_ptr();
            let d = super::d_of(blk);
            // SAFETY (loads): a block is 210 bytes (`ql` at 0..128, `qh` at 128..192,
            // scales at 192..208); `LANE_SCALE` holds 16 lanes.
            let sc = unsafe {
                let idx = _mm512_loadu_si512(LANE_SCALE.as_ptr() as *const _);
                let sc = _mm512_cvtepi8_epi32(_mm_loadu_si128(p.add(192) as *const _));
                _mm512_permutexvar_epi32(idx, sc)
            };
            let (low, high) = (_mm512_set1_epi8(0x0F), _mm512_set1_epi8(0x30));
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
            let scd = _mm512_mul_ps(_mm512_cvtepi32_ps(sc), _mm512_set1_ps(d));
            (w, scd, _mm512_mul_ps(scd, _mm512_set1_ps(32.0)))
        }};
    }

    /// Half `p` (bytes `32p..32p+32`) of the four source vectors, for the AVX2 body.
    macro_rules! decode256 {
        ($blk:expr, $p:expr) => {{
            let blk: &[u8] = $blk;
            let p: usize = $p;
            assert!(blk.len() >= BLOCK_BYTES && p < 2);
            let (low, high) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x30));
            let mut w = [_mm256_setzero_si256(); 4];
            for h in 0..2 {
                // SAFETY: within the block's `ql` and `qh`.
                let (ql, qh) = unsafe {
                    (
                        _mm256_loadu_si256(blk.as_ptr().add(64 * h + 32 * p) as *const _),
                        _mm256_loadu_si256(blk.as_ptr().add(128 + 32 * h) as *const _),
                    )
                };
                let qh = if p == 0 {
                    qh
                } else {
                    _mm256_srli_epi16::<2>(qh)
                };
                let hi_lo = _mm256_and_si256(_mm256_slli_epi16::<4>(qh), high);
                let hi_hi = _mm256_and_si256(qh, high);
                w[2 * h] = _mm256_or_si256(_mm256_and_si256(ql, low), hi_lo);
                w[2 * h + 1] =
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(ql), low), hi_hi);
            }
            w
        }};
    }

    /// The lanes' `d·sc` and `d·32·sc` for the AVX2 body.
    macro_rules! lanes {
        ($blk:expr) => {{
            let blk: &[u8] = $blk;
            let d = super::d_of(blk);
            let scd: [f32; 16] =
                std::array::from_fn(|lane| blk[192 + LANE_SCALE[lane] as usize] as i8 as f32 * d);
            (scd, scd.map(|s| 32.0 * s))
        }};
    }

    k_quant_bodies!(decode512, decode256, lanes, BLOCK_BYTES);
}

q8k::k_quant_dots!(Q6K);

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::Device;

    use crate::kernels::q8k::tests as shared;

    fn q6k_weight(n: usize, k: usize, seed: u32) -> QTensor {
        shared::test_weight(GgmlDType::Q6K, 16, n, k, seed)
    }

    q8k::k_quant_tests!(Q6K, q6k_weight);

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
                let got = d_of(blk) * (scale as f32 * (value(blk, p) as i32 - 32) as f32);
                assert_eq!(got, want[QK_K * b + p], "super-block {b} weight {p}");
            }
        }
        assert!(negative_scales > 0, "the data must reach negative scales");
    }
}

/// `cargo test --release -p zaya --lib q6k_q8k::speed -- --ignored --nocapture`: this kernel,
/// candle's Q6_K matmul and a plain read of the same bytes on the shape of one expert's
/// down projection of ZAYA1-8B (2048 × 2048; see [`q8k::speed`]).
#[test]
#[ignore]
#[cfg(test)]
fn speed() {
    q8k::speed(candle_core::quantized::GgmlDType::Q6K, (2048, 2048), linear);
}
