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
use candle_core::Result;

/// Bytes per Q6_K super-block.
const BLOCK_BYTES: usize = 210;

/// The bodies' storage order: source vector `v` lane `l` is natural unit `16v + l`.
const UNITS: Units = q8k::transposed(&{
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
const Q6K: Format = Format {
    name: "q6_k",
    block_bytes: BLOCK_BYTES,
    units: UNITS,
    dots,
    natural,
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
    use super::q8k::{k_quant_avx2, k_quant_avx512};
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

    k_quant_avx512!(
        dots_vnni,
        "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c",
        vnni,
        decode512,
        BLOCK_BYTES
    );
    k_quant_avx512!(
        dots_avx512,
        "avx512f,avx512bw,avx512vl,avx2,fma,f16c",
        bw,
        decode512,
        BLOCK_BYTES
    );
    k_quant_avx2!(dots_avx2, decode256, lanes, BLOCK_BYTES);
}

fn dots(xq: &Q8kRows, kb: usize, rows: std::ops::Range<usize>, row: &[u8], out: &mut [f32]) {
    match q8k::body() {
        // SAFETY (all three): the CPU has the features of the body `q8k::body` picked.
        #[cfg(target_arch = "x86_64")]
        q8k::Body::Vnni => unsafe { x86::dots_vnni(xq, kb, rows, row, out) },
        #[cfg(target_arch = "x86_64")]
        q8k::Body::Avx512 => unsafe { x86::dots_avx512(xq, kb, rows, row, out) },
        #[cfg(target_arch = "x86_64")]
        q8k::Body::Avx2 => unsafe { x86::dots_avx2(xq, kb, rows, row, out) },
        _ => q8k::dots_portable(&Q6K, xq, kb, rows, row, out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::{Device, Module, Tensor};

    use crate::kernels::cpu::{test_data as data, GEMV_ROWS};
    use crate::kernels::q8k::tests::activations;

    /// Each body this CPU has, over all `m` rows at once (groups of rows).
    fn bodies(xq: &Q8kRows, kb: usize, m: usize, row: &[u8]) -> Vec<(&'static str, Vec<f32>)> {
        let mut p = vec![0f32; m];
        q8k::dots_portable(&Q6K, xq, kb, 0..m, row, &mut p);
        let mut all = vec![("portable", p)];
        #[cfg(target_arch = "x86_64")]
        {
            let has = |f| match f {
                "vnni" => std::arch::is_x86_feature_detected!("avx512vnni"),
                _ => std::arch::is_x86_feature_detected!("avx512bw"),
            };
            let mut v = vec![0f32; m];
            if matches!(q8k::body(), q8k::Body::Vnni) && has("vnni") {
                // SAFETY: AVX-512F/BW/VL/VNNI, AVX2, FMA and F16C detected.
                unsafe { x86::dots_vnni(xq, kb, 0..m, row, &mut v) };
                all.push(("avx512 vnni", v.clone()));
            }
            if matches!(q8k::body(), q8k::Body::Vnni | q8k::Body::Avx512) && has("bw") {
                // SAFETY: AVX-512F/BW/VL, AVX2, FMA and F16C detected.
                unsafe { x86::dots_avx512(xq, kb, 0..m, row, &mut v) };
                all.push(("avx512", v.clone()));
            }
            if q8k::body() != q8k::Body::Portable {
                // SAFETY: AVX2, FMA and F16C detected (every vector body implies them).
                unsafe { x86::dots_avx2(xq, kb, 0..m, row, &mut v) };
                all.push(("avx2", v));
            }
        }
        all
    }

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
                let got = d_of(blk) * (scale as f32 * (value(blk, p) as i32 - 32) as f32);
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
            let xq = q8k::quantize_rows(&x, m, k, &UNITS);
            let row_bytes = k / QK_K * BLOCK_BYTES;
            for j in 0..n {
                let row = &bytes[j * row_bytes..][..row_bytes];
                let bodies = bodies(&xq, k / QK_K, m, row);
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
