//! Products against Q4_K and Q6_K weights with f32 activations: `y = x · Wᵀ` for `W [N, K]`
//! stored as GGUF k-quant super-blocks of 256 weights, read in place. As in [`super::q8_0`],
//! the activations are **not** rounded (candle's quantized matmul rounds them to Q8_K): the
//! only error is the weights' own rounding.
//!
//! Layouts (candle's `BlockQ4K` / `BlockQ6K`, the same bytes as GGUF):
//! - Q4_K, 144 bytes: f16 `d`, f16 `dmin`, 12 bytes of packed 6-bit scales and mins for
//!   eight sub-blocks of 32 weights, 128 bytes of nibbles (bytes `32c..32c+32` hold weights
//!   `64c..64c+32` in their low nibbles and `64c+32..64c+64` in their high nibbles).
//!   Weight `= d·sc_s·q − dmin·m_s`.
//! - Q6_K, 210 bytes: 128 bytes of low nibbles, 64 bytes of high 2-bit pairs, 16 `i8`
//!   scales (one per 16 weights), f16 `d`. Weight `= d·sc_s·(q − 32)`.
//!
//! - up to [`GEMV_ROWS`] rows (decode): each super-block is unpacked once into registers /
//!   a stack tile for all rows of `x`, rows of `W` split across the kernel pool — bound by
//!   reading the weights (4.5 / 6.56 bits per weight). For Q4_K the `dmin·m_s` term is
//!   applied per sub-block to the precomputed sums of `x` over the sub-block.
//! - more rows: the weight is dequantized a tile of rows at a time (bit for bit as candle's
//!   `dequantize`) and multiplied by the f32 gemm ([`cpu::widened_gemm`]).
//!
//! The reference is the f32 product with candle's dequantized weight; the results differ
//! only by summation order.

use half::f16;

use super::cpu::{self, GEMV_ROWS};
use super::KernelError;
use candle_core::Result;

/// Weights per super-block.
pub(crate) const QK_K: usize = 256;

/// The k-quant formats with an in-place kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum KQuant {
    Q4K,
    Q6K,
}

impl KQuant {
    /// Bytes per super-block.
    pub(crate) const fn block_bytes(self) -> usize {
        match self {
            KQuant::Q4K => 144,
            KQuant::Q6K => 210,
        }
    }

    fn name(self) -> &'static str {
        match self {
            KQuant::Q4K => "q4_k",
            KQuant::Q6K => "q6_k",
        }
    }
}

#[inline(always)]
pub(crate) fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// The 6-bit scale and min of Q4_K sub-block `j` (llama.cpp's `get_scale_min_k4`).
#[inline(always)]
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// A Q4_K super-block: the per-sub-block scales `d·sc`, mins `dmin·m` and the 256 nibbles
/// as f32 (`0..=15`), in weight order.
#[inline(always)]
fn q4k_unpack(blk: &[u8], ds: &mut [f32; 8], ms: &mut [f32; 8], q: &mut [f32; QK_K]) {
    let d = f16_at(blk, 0);
    let dmin = f16_at(blk, 2);
    let sc = &blk[4..16];
    for j in 0..8 {
        let (s, m) = scale_min_k4(j, sc);
        ds[j] = d * s as f32;
        ms[j] = dmin * m as f32;
    }
    let qs: &[u8; 128] = blk[16..144].try_into().expect("144-byte block");
    for (bytes, out) in qs.chunks_exact(32).zip(q.chunks_exact_mut(64)) {
        let (lo, hi) = out.split_at_mut(32);
        for ((l, h), &b) in lo.iter_mut().zip(hi.iter_mut()).zip(bytes) {
            *l = (b & 0xF) as f32;
            *h = (b >> 4) as f32;
        }
    }
}

/// A Q6_K super-block: the per-16-weights scales `d·sc` and the 256 values `q − 32` as
/// f32, in weight order (weight `p` is in sub-block `p / 16`).
#[inline(always)]
fn q6k_unpack(blk: &[u8], ds: &mut [f32; 16], q: &mut [f32; QK_K]) {
    let d = f16_at(blk, 208);
    for (s, &b) in ds.iter_mut().zip(&blk[192..208]) {
        *s = d * (b as i8) as f32;
    }
    for h in 0..2 {
        let ql: &[u8; 64] = blk[64 * h..64 * h + 64].try_into().expect("210-byte block");
        let qh: &[u8; 32] = blk[128 + 32 * h..160 + 32 * h]
            .try_into()
            .expect("210-byte block");
        let out: &mut [f32; 128] = (&mut q[128 * h..128 * h + 128])
            .try_into()
            .expect("256 weights");
        for l in 0..32 {
            let (a, b, hb) = (ql[l], ql[l + 32], qh[l]);
            out[l] = (((a & 0xF) | ((hb & 3) << 4)) as i8 - 32) as f32;
            out[l + 32] = (((b & 0xF) | (((hb >> 2) & 3) << 4)) as i8 - 32) as f32;
            out[l + 64] = (((a >> 4) | (((hb >> 4) & 3) << 4)) as i8 - 32) as f32;
            out[l + 96] = (((b >> 4) | (((hb >> 6) & 3) << 4)) as i8 - 32) as f32;
        }
    }
}

/// One Q4_K row (`k / 256` super-blocks) as f32, bit for bit as candle's `dequantize`.
#[inline(always)]
fn q4k_dequantize_row_body(row: &[u8], out: &mut [f32]) {
    let (mut ds, mut ms, mut q) = ([0f32; 8], [0f32; 8], [0f32; QK_K]);
    for (blk, o) in row.chunks_exact(144).zip(out.chunks_exact_mut(QK_K)) {
        q4k_unpack(blk, &mut ds, &mut ms, &mut q);
        for (s, (o, q)) in o.chunks_exact_mut(32).zip(q.chunks_exact(32)).enumerate() {
            let (d, m) = (ds[s], ms[s]);
            for (v, &q) in o.iter_mut().zip(q) {
                *v = d * q - m;
            }
        }
    }
}

/// One Q6_K row as f32, bit for bit as candle's `dequantize`.
#[inline(always)]
fn q6k_dequantize_row_body(row: &[u8], out: &mut [f32]) {
    let (mut ds, mut q) = ([0f32; 16], [0f32; QK_K]);
    for (blk, o) in row.chunks_exact(210).zip(out.chunks_exact_mut(QK_K)) {
        q6k_unpack(blk, &mut ds, &mut q);
        for (s, (o, q)) in o.chunks_exact_mut(16).zip(q.chunks_exact(16)).enumerate() {
            let d = ds[s];
            for (v, &q) in o.iter_mut().zip(q) {
                *v = d * q;
            }
        }
    }
}

/// `out[i] = x_i · w` for the `out.len()` rows of `xs` (row length `k`) against one Q4_K
/// row; `xsum[i·k/32 + s]` is the sum of row `i` of `x` over sub-block `s`.
#[inline(always)]
fn q4k_dots_body(xs: &[f32], k: usize, xsum: &[f32], row: &[u8], out: &mut [f32]) {
    let rows = out.len();
    let nsub = k / 32;
    // 16 lanes per row; the sub-block scale multiplies the partial products so the sum
    // stays in lanes until the end of the row.
    let mut acc = [[0f32; 16]; GEMV_ROWS];
    let mut mins = [0f32; GEMV_ROWS];
    let (mut ds, mut ms, mut q) = ([0f32; 8], [0f32; 8], [0f32; QK_K]);
    for (b, blk) in row.chunks_exact(144).enumerate() {
        q4k_unpack(blk, &mut ds, &mut ms, &mut q);
        for (i, (a, mn)) in acc.iter_mut().zip(mins.iter_mut()).enumerate().take(rows) {
            let x: &[f32; QK_K] = xs[i * k + b * QK_K..i * k + (b + 1) * QK_K]
                .try_into()
                .expect("a super-block of x");
            for (s, (x, q)) in x.chunks_exact(32).zip(q.chunks_exact(32)).enumerate() {
                let d = ds[s];
                for l in 0..16 {
                    a[l] += d * (x[l] * q[l] + x[16 + l] * q[16 + l]);
                }
            }
            let xs8 = &xsum[i * nsub + b * 8..i * nsub + b * 8 + 8];
            let mut t = 0f32;
            for (m, s) in ms.iter().zip(xs8) {
                t += m * s;
            }
            *mn += t;
        }
    }
    for ((o, a), mn) in out.iter_mut().zip(&acc).zip(&mins) {
        *o = cpu::hsum(a) - mn;
    }
}

/// `out[i] = x_i · w` for the rows of `xs` against one Q6_K row (`_xsum` unused).
#[inline(always)]
fn q6k_dots_body(xs: &[f32], k: usize, _xsum: &[f32], row: &[u8], out: &mut [f32]) {
    let rows = out.len();
    let mut acc = [[0f32; 16]; GEMV_ROWS];
    let (mut ds, mut q) = ([0f32; 16], [0f32; QK_K]);
    for (b, blk) in row.chunks_exact(210).enumerate() {
        q6k_unpack(blk, &mut ds, &mut q);
        for (i, a) in acc.iter_mut().enumerate().take(rows) {
            let x: &[f32; QK_K] = xs[i * k + b * QK_K..i * k + (b + 1) * QK_K]
                .try_into()
                .expect("a super-block of x");
            for (s, (x, q)) in x.chunks_exact(32).zip(q.chunks_exact(32)).enumerate() {
                let (d0, d1) = (ds[2 * s], ds[2 * s + 1]);
                for l in 0..16 {
                    a[l] += d0 * (x[l] * q[l]) + d1 * (x[16 + l] * q[16 + l]);
                }
            }
        }
    }
    for (o, a) in out.iter_mut().zip(&acc) {
        *o = cpu::hsum(a);
    }
}

simd_dispatch! {
    /// One Q4_K row dequantized to f32.
    pub(crate) fn q4k_dequantize_row(row: &[u8], out: &mut [f32]) => q4k_dequantize_row_body
}

simd_dispatch! {
    /// One Q6_K row dequantized to f32.
    pub(crate) fn q6k_dequantize_row(row: &[u8], out: &mut [f32]) => q6k_dequantize_row_body
}

simd_dispatch! {
    /// `out[i] = x_i · w` for up to [`GEMV_ROWS`] rows of `xs` against one Q4_K row.
    fn q4k_dots(xs: &[f32], k: usize, xsum: &[f32], row: &[u8], out: &mut [f32]) => q4k_dots_body
}

simd_dispatch! {
    /// `out[i] = x_i · w` for up to [`GEMV_ROWS`] rows of `xs` against one Q6_K row.
    fn q6k_dots(xs: &[f32], k: usize, xsum: &[f32], row: &[u8], out: &mut [f32]) => q6k_dots_body
}

/// AVX-512 bodies: each super-block is dequantized in registers to the exact f32 weights
/// (candle's `dequantize`, bit for bit: `(d·sc)·q − dmin·m` / `(d·sc)·(q − 32)`, each
/// product and difference rounded as there), then multiplied into every row of `x` with
/// four accumulators per row.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{f16_at, scale_min_k4, GEMV_ROWS, QK_K};
    use std::arch::x86_64::*;

    /// A Q4_K super-block (144 bytes) as 16 vectors of 16 weights, in weight order. Per
    /// sub-block the 16 possible weights `d·sc·j − dmin·m` (`j` = 0..15, each rounded as
    /// candle does) form a table, and each nibble picks its weight with one permute.
    /// The f16 pair at the start of a Q4_K block as f32 (`vcvtph2ps`, exact like `half`).
    #[inline]
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    fn f16_pair(blk: &[u8]) -> (f32, f32) {
        let bits = i32::from_le_bytes([blk[0], blk[1], blk[2], blk[3]]);
        let f = _mm512_cvtph_ps(_mm256_castsi128_si256(_mm_cvtsi32_si128(bits)));
        let hi = _mm512_permutexvar_ps(_mm512_set1_epi32(1), f);
        (_mm512_cvtss_f32(f), _mm512_cvtss_f32(hi))
    }

    /// (expanded in place: a call would pass the 16 vectors through memory)
    macro_rules! q4k_block {
        ($blk:expr, $w:ident) => {{
            let blk: &[u8] = $blk;
            let w: &mut [__m512; 16] = &mut $w;
            let blk: &[u8; 144] = blk.try_into().expect("144-byte block");
            let (d, dmin) = f16_pair(blk);
            let sc = &blk[4..16];
            let iota = _mm512_setr_ps(
                0., 1., 2., 3., 4., 5., 6., 7., 8., 9., 10., 11., 12., 13., 14., 15.,
            );
            for c in 0..4 {
                let (s0, m0) = scale_min_k4(2 * c, sc);
                let (s1, m1) = scale_min_k4(2 * c + 1, sc);
                let t0 = _mm512_sub_ps(
                    _mm512_mul_ps(_mm512_set1_ps(d * s0 as f32), iota),
                    _mm512_set1_ps(dmin * m0 as f32),
                );
                let t1 = _mm512_sub_ps(
                    _mm512_mul_ps(_mm512_set1_ps(d * s1 as f32), iota),
                    _mm512_set1_ps(dmin * m1 as f32),
                );
                // SAFETY: 32 bytes at 16 + 32c lie within the 144-byte block.
                let (a, b) = unsafe {
                    let p = blk.as_ptr().add(16 + 32 * c);
                    (
                        _mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const __m128i)),
                        _mm512_cvtepu8_epi32(_mm_loadu_si128(p.add(16) as *const __m128i)),
                    )
                };
                // the permute reads the low 4 bits of each lane: the low nibble as it is, the
                // high one after a shift
                w[4 * c] = _mm512_permutexvar_ps(a, t0);
                w[4 * c + 1] = _mm512_permutexvar_ps(b, t0);
                w[4 * c + 2] = _mm512_permutexvar_ps(_mm512_srli_epi32(a, 4), t1);
                w[4 * c + 3] = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), t1);
            }
        }};
    }

    /// A Q6_K super-block (210 bytes) as 16 vectors of 16 weights, in weight order.
    /// (expanded in place: a call would pass the 16 vectors through memory)
    macro_rules! q6k_block {
        ($blk:expr, $w:ident) => {{
            let blk: &[u8] = $blk;
            let w: &mut [__m512; 16] = &mut $w;
            let blk: &[u8; 210] = blk.try_into().expect("210-byte block");
            let d = f16_at(blk, 208);
            let m4 = _mm_set1_epi8(0x0F);
            let m3 = _mm_set1_epi8(3);
            let off = _mm512_set1_epi32(32);
            let to_f32 =
                |q: __m128i| _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(q), off));
            for h in 0..2 {
                for l0 in [0usize, 16] {
                    // SAFETY: ql bytes 64h + l0 + {0, 32} .. +16 lie in 0..128, qh bytes
                    // 128 + 32h + l0 .. +16 in 128..192.
                    let (a, b, hb) = unsafe {
                        let p = blk.as_ptr();
                        (
                            _mm_loadu_si128(p.add(64 * h + l0) as *const __m128i),
                            _mm_loadu_si128(p.add(64 * h + 32 + l0) as *const __m128i),
                            _mm_loadu_si128(p.add(128 + 32 * h + l0) as *const __m128i),
                        )
                    };
                    let hi = |shift: i32| {
                        let v = match shift {
                            0 => hb,
                            2 => _mm_srli_epi16(hb, 2),
                            4 => _mm_srli_epi16(hb, 4),
                            _ => _mm_srli_epi16(hb, 6),
                        };
                        _mm_slli_epi16(_mm_and_si128(v, m3), 4)
                    };
                    let q = [
                        _mm_or_si128(_mm_and_si128(a, m4), hi(0)),
                        _mm_or_si128(_mm_and_si128(b, m4), hi(2)),
                        _mm_or_si128(_mm_and_si128(_mm_srli_epi16(a, 4), m4), hi(4)),
                        _mm_or_si128(_mm_and_si128(_mm_srli_epi16(b, 4), m4), hi(6)),
                    ];
                    for (g, q) in q.into_iter().enumerate() {
                        let v = 8 * h + 2 * g + l0 / 16;
                        let s = d * (blk[192 + v] as i8) as f32;
                        w[v] = _mm512_mul_ps(_mm512_set1_ps(s), to_f32(q));
                    }
                }
            }
        }};
    }

    /// `acc[i] += x_i[b·256 ..][..256] · w` for the first `rows` rows of `xs`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    fn accumulate(
        w: &[__m512; 16],
        xs: &[f32],
        k: usize,
        b: usize,
        rows: usize,
        acc: &mut [[__m512; 4]; GEMV_ROWS],
    ) {
        for (i, a) in acc.iter_mut().enumerate().take(rows) {
            let x: &[f32; QK_K] = xs[i * k + b * QK_K..i * k + (b + 1) * QK_K]
                .try_into()
                .expect("a super-block of x");
            let mut a4 = *a;
            for v in 0..16 {
                // SAFETY: 16 floats at 16v lie within the 256 of `x`.
                let xv = unsafe { _mm512_loadu_ps(x.as_ptr().add(16 * v)) };
                a4[v % 4] = _mm512_fmadd_ps(xv, w[v], a4[v % 4]);
            }
            *a = a4;
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    fn finish(acc: &[[__m512; 4]; GEMV_ROWS], out: &mut [f32]) {
        for (o, a) in out.iter_mut().zip(acc) {
            let s = _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]));
            *o = _mm512_reduce_add_ps(s);
        }
    }

    /// `$name(xs, k, row, out)`: `out[i] = x_i · w` for up to [`GEMV_ROWS`] rows against one
    /// weight row of `$bytes`-byte super-blocks, each decoded by `$block` into 16 vectors.
    macro_rules! block_dots {
        ($(#[$doc:meta])* $name:ident, $bytes:literal, $block:ident) => {
            $(#[$doc])*
            #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
            pub(super) fn $name(xs: &[f32], k: usize, row: &[u8], out: &mut [f32]) {
                let mut w = [_mm512_setzero_ps(); 16];
                if out.len() == 1 {
                    // one row (decode): eight accumulators kept in registers over the row
                    let mut a = [_mm512_setzero_ps(); 8];
                    for (blk, x) in row.chunks_exact($bytes).zip(xs.chunks_exact(QK_K)) {
                        $block!(blk, w);
                        for v in 0..16 {
                            // SAFETY: 16 floats at 16v lie within the 256 of `x`.
                            let xv = unsafe { _mm512_loadu_ps(x.as_ptr().add(16 * v)) };
                            a[v % 8] = _mm512_fmadd_ps(xv, w[v], a[v % 8]);
                        }
                    }
                    let s = [0, 2, 4, 6].map(|i| _mm512_add_ps(a[i], a[i + 1]));
                    let s = _mm512_add_ps(_mm512_add_ps(s[0], s[1]), _mm512_add_ps(s[2], s[3]));
                    out[0] = _mm512_reduce_add_ps(s);
                    return;
                }
                let mut acc = [[_mm512_setzero_ps(); 4]; GEMV_ROWS];
                for (b, blk) in row.chunks_exact($bytes).enumerate() {
                    $block!(blk, w);
                    accumulate(&w, xs, k, b, out.len(), &mut acc);
                }
                finish(&acc, out);
            }
        };
    }

    block_dots!(
        /// `out[i] = x_i · w` for up to [`GEMV_ROWS`] rows against one Q4_K row.
        q4k_dots,
        144,
        q4k_block
    );
    block_dots!(
        /// `out[i] = x_i · w` for up to [`GEMV_ROWS`] rows against one Q6_K row.
        q6k_dots,
        210,
        q6k_block
    );

    /// One row dequantized (bit for bit as candle's `dequantize`).
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    pub(super) fn dequantize_row(q4k: bool, row: &[u8], out: &mut [f32]) {
        let bytes = if q4k { 144 } else { 210 };
        let mut w = [_mm512_setzero_ps(); 16];
        for (blk, o) in row.chunks_exact(bytes).zip(out.chunks_exact_mut(QK_K)) {
            if q4k {
                q4k_block!(blk, w);
            } else {
                q6k_block!(blk, w);
            }
            for (v, o) in w.iter().zip(o.chunks_exact_mut(16)) {
                // SAFETY: `o` holds 16 floats.
                unsafe { _mm512_storeu_ps(o.as_mut_ptr(), *v) };
            }
        }
    }
}

/// Whether the AVX-512 bodies run ([`cpu::simd_level`] found AVX-512F/VL, AVX2 and FMA).
#[inline]
fn use_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        cpu::simd_level() == cpu::SimdLevel::Avx512
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// One row of `kind` dequantized to f32 (bit for bit as candle's `dequantize`).
fn dequantize_row(kind: KQuant, row: &[u8], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if use_avx512() {
        // SAFETY: the CPU has AVX-512F/VL, AVX2 and FMA (detected).
        return unsafe { avx512::dequantize_row(kind == KQuant::Q4K, row, out) };
    }
    match kind {
        KQuant::Q4K => q4k_dequantize_row(row, out),
        KQuant::Q6K => q6k_dequantize_row(row, out),
    }
}

/// `out[i] = x_i · w` for up to [`GEMV_ROWS`] rows of `xs` against one row of `kind`.
fn dots(kind: KQuant, xs: &[f32], k: usize, xsum: &[f32], row: &[u8], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if use_avx512() {
        // SAFETY: the CPU has AVX-512F/VL, AVX2 and FMA (detected).
        return unsafe {
            match kind {
                KQuant::Q4K => avx512::q4k_dots(xs, k, row, out),
                KQuant::Q6K => avx512::q6k_dots(xs, k, row, out),
            }
        };
    }
    match kind {
        KQuant::Q4K => q4k_dots(xs, k, xsum, row, out),
        KQuant::Q6K => q6k_dots(xs, k, xsum, row, out),
    }
}

/// Sums of each row of `x` (`m × k`) over each run of 32 (Q4_K's sub-blocks).
fn sub_block_sums(x: &[f32], m: usize, k: usize) -> Vec<f32> {
    x[..m * k]
        .chunks_exact(32)
        .map(|c| {
            let mut a = [0f32; 16];
            for l in 0..16 {
                a[l] = c[l] + c[16 + l];
            }
            cpu::hsum(&a)
        })
        .collect()
}

/// The by-weight-row GEMV outputs (`o[(j − j0)·m + i] = x_i · w_j`) for weight rows
/// `j0..j0 + o.len() / m`: the unit that [`linear`] hands to the pool's threads.
#[allow(clippy::too_many_arguments)]
fn gemv_rows(
    kind: KQuant,
    x: &[f32],
    m: usize,
    k: usize,
    xsum: &[f32],
    w: &[u8],
    j0: usize,
    o: &mut [f32],
) {
    let row_bytes = k / QK_K * kind.block_bytes();
    for (r, c) in o.chunks_mut(m).enumerate() {
        let row = &w[(j0 + r) * row_bytes..(j0 + r + 1) * row_bytes];
        dots(kind, &x[..m * k], k, xsum, row, c);
    }
}

/// `out[m×n] = x[m×k] · deq(W)ᵀ`, `x` and `out` row-major f32, `W` `n` rows of `k / 256`
/// super-blocks of `kind`.
pub(crate) fn linear(
    kind: KQuant,
    x: &[f32],
    m: usize,
    k: usize,
    w: &[u8],
    n: usize,
    out: &mut [f32],
) -> Result<()> {
    let row_bytes = k / QK_K * kind.block_bytes();
    if !k.is_multiple_of(QK_K) || x.len() < m * k || w.len() < n * row_bytes || out.len() < m * n {
        return Err(KernelError::Internal(format!(
            "{} linear: k={k} must be a multiple of {QK_K} and the buffers must hold \
             m={m}, n={n} (x {}, w {} bytes, out {})",
            kind.name(),
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
            dequantize_row(kind, &w[j * row_bytes..(j + 1) * row_bytes], row)
        });
    }
    // the portable Q4_K body applies the mins to sums of x (the AVX-512 one needs none)
    let xsum = match kind {
        KQuant::Q4K if !use_avx512() => sub_block_sums(x, m, k),
        _ => Vec::new(),
    };
    // GEMV: each weight row unpacked once for all x rows.
    cpu::gemv_by_weight_rows(m, n, k, 1, out, |j0, o| {
        gemv_rows(kind, x, m, k, &xsum, w, j0, o)
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    use crate::kernels::cpu::test_data as data;

    fn kinds() -> [(KQuant, GgmlDType); 2] {
        [(KQuant::Q4K, GgmlDType::Q4K), (KQuant::Q6K, GgmlDType::Q6K)]
    }

    /// A weight quantized by candle: its bytes and candle's dequantization.
    fn quantized(n: usize, k: usize, dt: GgmlDType, seed: u32) -> (Vec<u8>, Vec<f32>) {
        // rows of different magnitudes and offsets, so scales and mins vary
        let v: Vec<f32> = data(n * k, seed)
            .iter()
            .enumerate()
            .map(|(i, &v)| v * (1.0 + (i / k % 5) as f32) + 0.1 * (i / 32 % 3) as f32)
            .collect();
        let w = Tensor::from_vec(v, (n, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, dt).unwrap();
        let deq: Vec<f32> = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        (q.data().unwrap().into_owned(), deq)
    }

    /// Row dequantization equals candle's `dequantize` bit for bit (the GEMM path's input).
    #[test]
    fn dequantization_matches_candle_bit_for_bit() {
        for (kind, dt) in kinds() {
            let (n, k) = (7, 768);
            let (bytes, deq) = quantized(n, k, dt, 3);
            assert_eq!(
                bytes.len(),
                n * k / QK_K * kind.block_bytes(),
                "{dt:?} layout"
            );
            let row_bytes = k / QK_K * kind.block_bytes();
            for j in 0..n {
                let bytes = &bytes[j * row_bytes..][..row_bytes];
                // the dispatched body (AVX-512 where the CPU has it) and the portable one
                let mut simd = vec![f32::NAN; k];
                dequantize_row(kind, bytes, &mut simd);
                let mut portable = vec![f32::NAN; k];
                match kind {
                    KQuant::Q4K => q4k_dequantize_row_body(bytes, &mut portable),
                    KQuant::Q6K => q6k_dequantize_row_body(bytes, &mut portable),
                }
                for row in [&simd, &portable] {
                    for (t, (a, b)) in row.iter().zip(&deq[j * k..(j + 1) * k]).enumerate() {
                        assert_eq!(
                            a.to_bits(),
                            b.to_bits(),
                            "{dt:?} row {j} weight {t}: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }

    /// The kernel against `x · deq(W)ᵀ` with candle's dequantized weight, on GEMV sizes
    /// (1..=GEMV_ROWS rows) and GEMM sizes, K a multiple of 256 but not of the lanes' span.
    #[test]
    fn matches_the_dequantized_product() {
        for (kind, dt) in kinds() {
            for &(m, k, n) in &[
                (1, 256, 3),
                (1, 768, 70),
                (2, 256, 33),
                (3, 1280, 17),
                (8, 512, 9),
                (17, 256, 40),
                (GEMV_ROWS, 768, 21),
                (GEMV_ROWS + 1, 512, 19),
                (40, 1280, 75),
            ] {
                let (bytes, deq) = quantized(n, k, dt, 11 + m as u32);
                let x = data(m * k, 5);
                let mut out = vec![f32::NAN; m * n];
                linear(kind, &x, m, k, &bytes, n, &mut out).unwrap();
                // the portable GEMV body (the dispatched one is AVX-512 on such CPUs)
                let mut portable = vec![f32::NAN; m * n];
                if m <= GEMV_ROWS {
                    let xsum = sub_block_sums(&x, m, k);
                    let row_bytes = k / QK_K * kind.block_bytes();
                    let mut c = vec![0f32; m];
                    for j in 0..n {
                        let row = &bytes[j * row_bytes..(j + 1) * row_bytes];
                        match kind {
                            KQuant::Q4K => q4k_dots_body(&x, k, &xsum, row, &mut c),
                            KQuant::Q6K => q6k_dots_body(&x, k, &xsum, row, &mut c),
                        }
                        for i in 0..m {
                            portable[i * n + j] = c[i];
                        }
                    }
                }
                for i in 0..m {
                    for j in 0..n {
                        let (mut want, mut mag) = (0f64, 0f64);
                        for t in 0..k {
                            let p = x[i * k + t] as f64 * deq[j * k + t] as f64;
                            want += p;
                            mag += p.abs();
                        }
                        // summation order only (the portable Q4_K body also splits off
                        // the min term)
                        let mut got = vec![("kernel", out[i * n + j] as f64)];
                        if m <= GEMV_ROWS {
                            got.push(("portable", portable[i * n + j] as f64));
                        }
                        for (what, got) in got {
                            assert!(
                                (got - want).abs() <= 1e-5 * (1.0 + mag),
                                "{dt:?} {what} m={m} k={k} n={n} ({i},{j}): {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// How the weight rows are split over threads does not change a bit of the result.
    #[test]
    fn row_split_gives_identical_results() {
        for (kind, _) in kinds() {
            let dt = if kind == KQuant::Q4K {
                GgmlDType::Q4K
            } else {
                GgmlDType::Q6K
            };
            for m in [1, 3, GEMV_ROWS] {
                let (k, n) = (512, 300);
                let (bytes, _) = quantized(n, k, dt, 21);
                let x = data(m * k, 9);
                let mut pooled = vec![0f32; m * n];
                linear(kind, &x, m, k, &bytes, n, &mut pooled).unwrap();
                let xsum = match kind {
                    KQuant::Q4K => sub_block_sums(&x, m, k),
                    KQuant::Q6K => Vec::new(),
                };
                for step in [1, 7, n] {
                    let mut by_col = vec![0f32; n * m];
                    for j0 in (0..n).step_by(step) {
                        let rows = step.min(n - j0);
                        gemv_rows(
                            kind,
                            &x,
                            m,
                            k,
                            &xsum,
                            &bytes,
                            j0,
                            &mut by_col[j0 * m..(j0 + rows) * m],
                        );
                    }
                    for i in 0..m {
                        for j in 0..n {
                            assert_eq!(
                                pooled[i * n + j].to_bits(),
                                by_col[j * m + i].to_bits(),
                                "{kind:?} m={m} step={step} ({i},{j})"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn bad_sizes_are_an_error() {
        let mut out = vec![0f32; 2];
        for kind in [KQuant::Q4K, KQuant::Q6K] {
            let b = kind.block_bytes();
            assert!(linear(kind, &[0.0; 128], 1, 128, &vec![0; 2 * b], 2, &mut out).is_err());
            assert!(linear(kind, &[0.0; 256], 1, 256, &vec![0; b], 2, &mut out).is_err());
        }
    }
}

#[cfg(test)]
mod speed {
    use super::*;
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::{Device, Module, Tensor};
    use std::time::Instant;

    #[test]
    #[ignore]
    fn speed() {
        let (n, k) = (16384, 4096);
        for (kind, dt) in [(KQuant::Q4K, GgmlDType::Q4K), (KQuant::Q6K, GgmlDType::Q6K)] {
            let w = Tensor::randn(0f32, 1., (n, k), &Device::Cpu).unwrap();
            let q = QTensor::quantize(&w, dt).unwrap();
            drop(w);
            let bytes = q.data().unwrap().into_owned();
            let qm = QMatMul::from_qtensor(q).unwrap();
            for m in [1usize, 8] {
                let x = Tensor::randn(0f32, 1., (m, k), &Device::Cpu).unwrap();
                let xv: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
                let mut out = vec![0f32; m * n];
                let (mut ours, mut theirs, mut read, mut serial) =
                    (f64::MAX, f64::MAX, f64::MAX, f64::MAX);
                for _ in 0..5 {
                    let t = Instant::now();
                    linear(kind, &xv, m, k, &bytes, n, &mut out).unwrap();
                    ours = ours.min(t.elapsed().as_secs_f64());
                    let t = Instant::now();
                    gemv_rows(kind, &xv, m, k, &[0f32; 0][..], &bytes, 0, &mut out);
                    serial = serial.min(t.elapsed().as_secs_f64());
                    let t = Instant::now();
                    let _ = qm.forward(&x).unwrap();
                    theirs = theirs.min(t.elapsed().as_secs_f64());
                    let t = Instant::now();
                    let s: u64 = cpu::in_pool(|| {
                        use rayon::prelude::*;
                        bytes
                            .par_chunks(1 << 16)
                            .map(|c| {
                                c.chunks_exact(8)
                                    .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
                                    .fold(0u64, |a, b| a ^ b)
                            })
                            .reduce(|| 0, |a, b| a ^ b)
                    });
                    std::hint::black_box(s);
                    read = read.min(t.elapsed().as_secs_f64());
                }
                let gb = bytes.len() as f64 / 1e9;
                eprintln!(
                    "{kind:?} m={m}: serial {:.2} ms, ours {:.2} ms ({:.1} GB/s), candle {:.2} ms ({:.1} GB/s), read {:.2} ms ({:.1} GB/s)",
                    serial * 1e3,
                    ours * 1e3, gb / ours, theirs * 1e3, gb / theirs, read * 1e3, gb / read
                );
            }
        }
    }
}
