//! Products against bf16 weights with f32 activations and f32 accumulation: `y = x · Wᵀ`
//! for a weight `W [N, K]` stored in bf16 (a linear layer, one expert, the lm_head), read in
//! place — never converted to an f32 copy of the whole matrix.
//!
//! - up to [`GEMV_ROWS`] rows (decode): a GEMV that streams each weight row once for all
//!   rows of `x`, widening bf16 → f32 in registers (a shift: bf16 is the top half of an
//!   f32), rows of `W` split across the kernel pool. Decode is bound by reading the weights,
//!   so this runs at the memory bandwidth; the body is compiled for AVX-512, AVX2 and the
//!   baseline and chosen at run time.
//! - more rows (prefill, busy experts) with bf16 activations (a bf16 model's): the AVX-512
//!   BF16 dot-product GEMM of [`linear_bf16`], where the CPU has it.
//! - more rows otherwise (AVX2 CPUs, AVX-512 ones without BF16): [`sgemm`]'s kernel with
//!   each weight tile widened to f32 as it is copied ([`sgemm::bf16_weight_fresh`]; from
//!   its share minimum for an expert's share of a prefill). AMD EPYC Zen 3, 2 threads, the
//!   medium config in bf16 with a balanced router: prefill 1×512 at 385 against 205 tok/s
//!   before it, when `W` was widened a tile of rows at a time into a buffer and each tile
//!   went through [`cpu::gemm`] (its GEMV for shares up to 32 rows) — the path still taken
//!   without AVX2.
//!
//! The reference is the f32 product with the widened operands (`f32(x) · f32(W)ᵀ`); the
//! results differ only by summation order (and `vdpbf16ps` flushing subnormals).

use std::mem::MaybeUninit;

use half::bf16;

use super::cpu::{self, GEMV_ROWS};
use super::sgemm;
use candle_core::Result;

#[inline(always)]
fn widen(w: bf16) -> f32 {
    f32::from_bits((w.to_bits() as u32) << 16)
}

#[inline(always)]
fn widen_into_body(src: &[bf16], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = widen(*s);
    }
}

simd_dispatch! {
    /// `dst = f32(src)`.
    pub(crate) fn widen_into(src: &[bf16], dst: &mut [f32]) => widen_into_body
}

/// The buffers of an `[m×k] · [n×k]ᵀ → [m×n]` product hold at least what it reads and writes.
fn check_sizes(x: usize, m: usize, k: usize, w: usize, n: usize, out: usize) -> Result<()> {
    if x < m * k || w < n * k || out < m * n {
        return Err(super::KernelError::Internal(format!(
            "bf16 linear: buffers too small for m={m}, n={n}, k={k}"
        ))
        .into());
    }
    Ok(())
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
    check_sizes(x.len(), m, k, w.len(), n, out.len())?;
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
    if sgemm::takes_rows(GEMV_ROWS + 1, m) {
        // SAFETY: the kernel writes only values.
        sgemm::bf16_weight_fresh(
            m,
            n,
            k,
            x,
            w,
            unsafe { cpu::as_uninit(&mut out[..m * n]) },
            true,
        )?;
        return Ok(());
    }
    cpu::widened_gemm(x, m, k, n, out, |j, row| {
        widen_into(&w[j * k..(j + 1) * k], row)
    })
}

/// The GEMV path of [`linear`]: each weight row read once for all rows of `x`.
fn gemv(x: &[f32], m: usize, k: usize, w: &[bf16], n: usize, out: &mut [f32]) {
    let block = cpu::dots_block_of(&x[..m * k], k, m, &w[..n * k], k, k);
    cpu::gemv_by_weight_rows(m, n, k, cpu::TILE_COLS, out, block);
}

/// `out[m×n] = x[m×k] · W[n×k]ᵀ` with **both** operands bf16 (the activations of a bf16
/// model are bf16 tensors), f32 accumulation. Every product of two bf16 values is exact in
/// f32, so this equals [`linear`] on the widened `x` up to summation order — which is what
/// [`linear`] is, here: its reference. Decode sizes go to the GEMV; larger products run on
/// AMX tiles where the CPU and OS allow it ([`super::amx`]; `ZAYA_AMX=0` turns it off), else
/// the AVX-512 BF16 dot-product instruction where the CPU has it (16 lanes × 2 products per
/// instruction, four times the f32 FMA rate), and through the widening path elsewhere.
///
/// `Rows::Share` is for a matrix that sees a few of a larger forward's rows — an expert's
/// share of a prefill: from [`STREAMED_MIN_ROWS`] rows the weights stream through AMX tiles
/// in place ([`super::amx::gemm_streamed`]) where the CPU allows it, instead of the
/// products `Rows::Whole` keeps up to [`GEMV_ROWS`] rows so that a decode row's result
/// does not depend on how many rows run with it (an expert of a 512-token prefill sees ~30
/// rows). Callers use it only when the forward holds more than [`GEMV_ROWS`] rows (not a
/// decode step). The AMX kernel's result for a row does not depend on the other rows either.
///
/// Every element of `out` is written and none is read first, so it may be fresh memory
/// ([`linear_bf16_new`]).
pub(crate) fn linear_bf16(
    rows: Rows,
    x: &[bf16],
    m: usize,
    k: usize,
    w: &[bf16],
    n: usize,
    out: &mut [MaybeUninit<f32>],
) -> Result<()> {
    check_sizes(x.len(), m, k, w.len(), n, out.len())?;
    let (x, w, out) = (&x[..m * k], &w[..n * k], &mut out[..m * n]);
    if let Some(product) = amx_product(rows, m, k, n) {
        product(x, m, k, w, n, out);
        return Ok(());
    }
    // Without AMX, shares up to `SHARE_DOT_MAX_ROWS` rows take the dot kernel: on weights
    // read from memory it beats the packed one at every such size since its 8-row tiles and
    // its look-ahead into the next weight block (`bf16_expert_share_speed`, Zen 4, 2
    // threads: 1.3× at 16 rows, 1.2× at 32, 1.1× at 48 and 64, equal at 96).
    #[cfg(target_arch = "x86_64")]
    if rows == Rows::Share
        && m <= SHARE_DOT_MAX_ROWS
        && n > 0
        && k > 0
        && !amx_on()
        && dot::available()
    {
        dot::gemm(x, m, k, w, n, out);
        return Ok(());
    }
    // Without bf16 dot products (AVX2 CPUs; AVX-512 ones before them), a share from
    // `sgemm`'s minimum takes its kernel, the weight tiles widened as they are copied, where
    // the widening path below would run its GEMV up to `GEMV_ROWS` rows.
    if rows == Rows::Share
        && m <= GEMV_ROWS
        && !amx_on()
        && !bf16_dots()
        && sgemm::takes_rows(sgemm::share_min_rows(), m)
    {
        let xf: Vec<f32> = x.iter().map(|v| widen(*v)).collect();
        sgemm::bf16_weight_fresh(m, n, k, &xf, w, out, true)?;
        return Ok(());
    }
    linear_bf16_without_amx(x, m, k, w, n, out)
}

/// Whether the CPU has the AVX-512 BF16 dot products of [`linear_bf16`]'s own kernels.
fn bf16_dots() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        dot::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// [`linear_bf16`] into a new `m × n` buffer, never cleared first: every path writes each
/// element (an expert's gate/up output in a 512-token prefill is 8 MiB, and clearing it and
/// its down-projection output was ~3 % of an 8B prefill).
pub(crate) fn linear_bf16_new(
    rows: Rows,
    x: &[bf16],
    m: usize,
    k: usize,
    w: &[bf16],
    n: usize,
) -> Result<Vec<f32>> {
    let len = m * n;
    let mut out = Vec::with_capacity(len);
    linear_bf16(rows, x, m, k, w, n, &mut out.spare_capacity_mut()[..len])?;
    // SAFETY: `linear_bf16` wrote every element (it returned without error).
    unsafe { out.set_len(len) };
    Ok(out)
}

/// Which rows a [`linear_bf16`] product holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Rows {
    /// All rows of a forward (a `Linear`, a decode step's experts): up to [`GEMV_ROWS`]
    /// rows stay on the GEMV.
    Whole,
    /// An expert's share of a prefill's rows.
    Share,
}

/// Fewest rows of a share for which [`linear_bf16`] streams the weights through AMX tiles
/// instead of running the GEMV (Xeon Sapphire Rapids, 2 threads, k = 2048, n = 2048–4096:
/// equal at 4 rows, 1.7–1.8× faster at 8, 3× at 16).
const STREAMED_MIN_ROWS: usize = 8;
/// Most rows for which the weight-streaming AMX kernel beats the packing one (Sapphire
/// Rapids, 2 threads, eight 16 MiB gate/up weights in turn, `amx_expert_share_speed`:
/// 1.1–1.25× faster up to 32 rows, even at 48, 0.8–0.9× at 64, 0.7–0.8× at 96). The
/// same bound holds for `Rows::Whole` (a short prompt's `Linear`s, whose weights are read
/// from memory too; not measured separately).
const STREAMED_MAX_ROWS: usize = 48;

/// An AMX product: `out[m×n] = x[m×k] · W[n×k]ᵀ`, every element of `out` written.
type AmxProduct = fn(&[bf16], usize, usize, &[bf16], usize, &mut [MaybeUninit<f32>]);

/// The AMX kernel that takes an `m × k` by `n × k` product of `rows`, where the CPU, the
/// OS and the sizes allow one.
fn amx_product(rows: Rows, m: usize, k: usize, n: usize) -> Option<AmxProduct> {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    if n > 0 && k > 0 && super::amx::enabled() {
        let streams = super::amx::streams(k);
        match rows {
            // both AMX kernels give the same bits; streaming the weights wins up to a few
            // activation tiles, packing them once pays off above
            Rows::Whole if m > GEMV_ROWS => {
                return Some(if m <= STREAMED_MAX_ROWS && streams {
                    super::amx::gemm_streamed
                } else {
                    super::amx::gemm
                });
            }
            Rows::Share if (STREAMED_MIN_ROWS..=GEMV_ROWS).contains(&m) && streams => {
                return Some(super::amx::gemm_streamed);
            }
            Rows::Share if m > GEMV_ROWS => return amx_product(Rows::Whole, m, k, n),
            _ => {}
        }
    }
    let _ = (rows, m, k, n);
    None
}

/// Most rows of an expert's share that [`linear_bf16`] keeps on the dot kernel
/// without AMX (from `GEMV_ROWS + 1` on, a share would otherwise be packed).
const SHARE_DOT_MAX_ROWS: usize = 64;

/// Whether [`linear_bf16`] takes its AMX path.
fn amx_on() -> bool {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        super::amx::enabled()
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    {
        false
    }
}

/// [`linear_bf16`] without its AMX path: the AVX-512 BF16 kernel where the CPU has it, the
/// widening path elsewhere (also what `ZAYA_AMX=0` runs). Writes every element of `out`,
/// reading none first.
pub(crate) fn linear_bf16_without_amx(
    x: &[bf16],
    m: usize,
    k: usize,
    w: &[bf16],
    n: usize,
    out: &mut [MaybeUninit<f32>],
) -> Result<()> {
    check_sizes(x.len(), m, k, w.len(), n, out.len())?;
    #[cfg(target_arch = "x86_64")]
    if m > 0 && n > 0 && k > 0 && dot::available() {
        let (x, w, out) = (&x[..m * k], &w[..n * k], &mut out[..m * n]);
        if m > GEMV_ROWS {
            packed::gemm(x, m, k, w, n, out);
        } else {
            // Decode: the dot kernel reads the weight once for all rows with `vdpbf16ps`,
            // twice the multiply-adds per instruction of the widening GEMV, and a row's
            // result does not depend on the other rows (each (row, weight row) pair is one
            // chain per `k` block). Zen 4, 2 threads, k = 2048, a 64 MiB weight: 34.5 against
            // 23.9 GB/s at one row, 18.5 against 16.1 at eight (`bf16_decode_speed`).
            dot::gemm(x, m, k, w, n, out);
        }
        return Ok(());
    }
    // the widening path (no AVX-512 BF16) computes into cleared values
    let out = &mut out[..m * n];
    for v in out.iter_mut() {
        v.write(0.0);
    }
    // SAFETY: every element was written just above.
    let out = unsafe { cpu::assume_init_mut(out) };
    let xf: Vec<f32> = x[..m * k].iter().map(|v| widen(*v)).collect();
    linear(&xf, m, k, w, n, out)
}

/// The AVX-512 BF16 GEMM of [`linear_bf16`]. Dot-product form: both operands keep their
/// row-major `[rows, k]` layout (no packing), a register tile of `MR` activation rows ×
/// `NR` weight rows (`MR_TALL` × `NR_TALL` for 5–8 rows) accumulates 16-lane partial sums
/// with `vdpbf16ps` along `k`, reduced once per `k` block. Blocks of `NB` weight rows ×
/// `KC` columns stay in L2 while every activation tile passes over them; the weight-row
/// blocks are split across the pool.
#[cfg(target_arch = "x86_64")]
mod dot {
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;
    use std::sync::OnceLock;

    use half::bf16;

    use super::super::cpu;

    /// Activation rows per register tile.
    const MR: usize = 4;
    /// Weight rows per register tile: MR·NR accumulators + NR weight vectors + 1 activation
    /// vector must stay in the 32 zmm registers (4 × 6 made LLVM spill accumulators).
    const NR: usize = 5;
    /// Tiles for 5–8 activation rows: 8 × 3 accumulators + 3 weight vectors + 1 activation
    /// vector (28 of the 32 registers), so each weight vector is loaded once for up to 8
    /// rows (a decode batch of 8, its lm_head) where 4-row tiles read the weight tile twice.
    const MR_TALL: usize = 8;
    const NR_TALL: usize = 3;
    /// Columns of `k` per block (a multiple of the 32 bf16 of a vector). Long: each block
    /// ends with a horizontal sum per accumulator, which costs as much as ~8 dot steps.
    const KC: usize = 2048;
    /// Weight rows per block (a multiple of both tile widths): NB · KC bf16 = 240 KiB (in
    /// L2), reused by every activation tile.
    const NB: usize = 4 * NR * NR_TALL;
    /// Cache lines of the next block's weights a later row tile pulls into L2 per step.
    const AHEAD_LINES: usize = 4;

    pub(super) fn available() -> bool {
        static OK: OnceLock<bool> = OnceLock::new();
        *OK.get_or_init(|| {
            is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512bf16")
        })
    }

    /// Callers check [`available`] and the slice sizes (`x: m·k`, `w: n·k`, `out: m·n`);
    /// `out` is cleared here (the blocks add into it), so it may be fresh memory.
    pub(super) fn gemm(
        x: &[bf16],
        m: usize,
        k: usize,
        w: &[bf16],
        n: usize,
        out: &mut [MaybeUninit<f32>],
    ) {
        debug_assert!(available() && x.len() == m * k && w.len() == n * k && out.len() == m * n);
        for v in out.iter_mut() {
            v.write(0.0);
        }
        let o = cpu::ColumnsOut::uninit(out);
        let blocks = n.div_ceil(NB);
        let block = |b: usize| {
            let j0 = b * NB;
            let j1 = (j0 + NB).min(n);
            // SAFETY: the CPU has the features (checked by the caller through `available`);
            // the block's rows and columns are inside the slices; blocks write disjoint
            // columns of `out`.
            unsafe { block_product(x, m, k, w, j0, j1, n, o.ptr()) }
        };
        cpu::par_map(blocks, m * n * k, block);
    }

    /// `out[:, j0..j1] += x · W[j0..j1]ᵀ`, `k` block by `k` block.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn block_product(
        x: &[bf16],
        m: usize,
        k: usize,
        w: &[bf16],
        j0: usize,
        j1: usize,
        n: usize,
        out: *mut f32,
    ) {
        let (xp, wp) = (x.as_ptr(), w.as_ptr());
        // With more rows than the first (tallest) row tile takes, the tiles after the first
        // read this block's weights from L2; meanwhile they pull the next block's rows
        // (contiguous: rows of `W` are) into L2, so that the next block's first row tile
        // does not wait on memory either.
        let next_rows = (j1 + NB).min(n) - j1;
        let ahead = if k <= KC && m > MR_TALL && next_rows > 0 {
            let lines = (next_rows * k * 2).div_ceil(64);
            Some((wp.wrapping_add(j1 * k) as *const u8, lines))
        } else {
            None
        };
        let mut later = 0;
        let mut k0 = 0;
        while k0 < k {
            let kl = KC.min(k - k0);
            let mut i0 = 0;
            while i0 < m {
                let tall = m - i0 > MR;
                let (mr, nr_max) = if tall {
                    (MR_TALL.min(m - i0), NR_TALL)
                } else {
                    (m - i0, NR)
                };
                let mut jt = j0;
                while jt < j1 {
                    let nr = nr_max.min(j1 - jt);
                    let t = Tile {
                        x: xp.add(i0 * k + k0),
                        w: wp.add(jt * k + k0),
                        stride: k,
                        kl,
                        out: out.add(i0 * n + jt),
                        out_stride: n,
                        prefetch: i0 == 0,
                        ahead: match ahead {
                            Some((base, lines)) if i0 > 0 => {
                                // this tile's share: AHEAD_LINES per step, tile after tile.
                                // From 13 rows on the later tiles (20 or more) cover the
                                // next block; 9–12 rows have 12 (of NR = 5 columns), which
                                // cover 80 % of it. Eight lines per step for those (a
                                // run-time choice in the loop) was no faster at 9–12 rows
                                // and cost 12–16 rows a third (accumulators spilled).
                                let k_steps = kl / 32;
                                let first = later * k_steps * AHEAD_LINES;
                                later += 1;
                                // up to the next block's last line (at most three lines
                                // past it: a prefetch never faults)
                                let steps = lines
                                    .saturating_sub(first)
                                    .div_ceil(AHEAD_LINES)
                                    .min(k_steps);
                                Ahead {
                                    base: base.wrapping_add(first * 64),
                                    steps,
                                }
                            }
                            _ => Ahead::NONE,
                        },
                    };
                    match mr {
                        8 => by_cols_tall::<8>(nr, &t),
                        7 => by_cols_tall::<7>(nr, &t),
                        6 => by_cols_tall::<6>(nr, &t),
                        5 => by_cols_tall::<5>(nr, &t),
                        4 => by_cols::<4>(nr, &t),
                        3 => by_cols::<3>(nr, &t),
                        2 => by_cols::<2>(nr, &t),
                        _ => by_cols::<1>(nr, &t),
                    }
                    jt += nr;
                }
                i0 += mr;
            }
            k0 += kl;
        }
    }

    /// One register tile: `R` rows of `x` and `C` rows of `W`, both of row stride `stride`,
    /// over `kl` columns, added into `out` (row stride `out_stride`).
    struct Tile {
        x: *const bf16,
        w: *const bf16,
        stride: usize,
        kl: usize,
        out: *mut f32,
        out_stride: usize,
        /// Prefetch the `C` weight rows after this tile's at each step (the first row tile
        /// of a block: the later ones find the rows in cache). Several weight rows are
        /// several streams, each a 4 KiB page where the hardware prefetcher starts over.
        /// Into L2 (`_MM_HINT_T2`), not L1: a tile's worth of lines in flight to L1 is more
        /// than its miss buffers hold, and T0 prefetches stalled the loads.
        /// `bf16_expert_share_speed` (Zen 4, 2 threads, eight 16 MiB weights, same-process
        /// alternation): T0 against T2 at 4 rows 30 → 35 GB/s, 8 rows 25 → 34, 12 rows
        /// 16 → 19; no prefetch against T2 at 1 row 39–40 → 47–55 GB/s, 2 rows 33–37 →
        /// 46–50 (with T0 the one- and two-row tiles had been ~5 % slower with it).
        prefetch: bool,
        /// Lines of the next block's weights to pull into L2 during this tile.
        ahead: Ahead,
    }

    /// [`AHEAD_LINES`] cache lines from `base` on at each of the first `steps` steps.
    struct Ahead {
        base: *const u8,
        steps: usize,
    }

    impl Ahead {
        const NONE: Ahead = Ahead {
            base: std::ptr::null(),
            steps: 0,
        };
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn by_cols<const R: usize>(nr: usize, t: &Tile) {
        match nr {
            5 => tile::<R, 5>(t),
            4 => tile::<R, 4>(t),
            3 => tile::<R, 3>(t),
            2 => tile::<R, 2>(t),
            _ => tile::<R, 1>(t),
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn by_cols_tall<const R: usize>(nr: usize, t: &Tile) {
        match nr {
            3 => tile::<R, 3>(t),
            2 => tile::<R, 2>(t),
            _ => tile::<R, 1>(t),
        }
    }

    #[inline(always)]
    unsafe fn load(p: *const bf16) -> __m512bh {
        std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(p as *const _))
    }

    #[inline(always)]
    unsafe fn load_masked(p: *const bf16, mask: __mmask32) -> __m512bh {
        std::mem::transmute::<__m512i, __m512bh>(_mm512_maskz_loadu_epi16(mask, p as *const i16))
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn tile<const R: usize, const C: usize>(t: &Tile) {
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        let steps = t.kl / 32;
        for s in 0..steps {
            let off = s * 32;
            if s < t.ahead.steps {
                let p = t.ahead.base.wrapping_add(s * 64 * AHEAD_LINES) as *const i8;
                for l in 0..AHEAD_LINES {
                    _mm_prefetch::<_MM_HINT_T2>(p.wrapping_add(64 * l));
                }
            }
            if t.prefetch {
                for c in 0..C {
                    // past the block's last tile this points beyond `w`: a prefetch never faults
                    _mm_prefetch::<_MM_HINT_T2>(
                        t.w.wrapping_add((C + c) * t.stride + off) as *const i8
                    );
                }
            }
            let mut wv = [load(t.w.add(off)); C];
            for (c, v) in wv.iter_mut().enumerate().skip(1) {
                *v = load(t.w.add(c * t.stride + off));
            }
            for (r, row) in acc.iter_mut().enumerate() {
                let xv = load(t.x.add(r * t.stride + off));
                for (a, v) in row.iter_mut().zip(&wv) {
                    *a = _mm512_dpbf16_ps(*a, xv, *v);
                }
            }
        }
        let rem = t.kl % 32;
        if rem > 0 {
            // zero-filled tails: a zero pair adds nothing
            let off = steps * 32;
            let mask: __mmask32 = (1u32 << rem) - 1;
            let mut wv = [load_masked(t.w.add(off), mask); C];
            for (c, v) in wv.iter_mut().enumerate().skip(1) {
                *v = load_masked(t.w.add(c * t.stride + off), mask);
            }
            for (r, row) in acc.iter_mut().enumerate() {
                let xv = load_masked(t.x.add(r * t.stride + off), mask);
                for (a, v) in row.iter_mut().zip(&wv) {
                    *a = _mm512_dpbf16_ps(*a, xv, *v);
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            for (c, a) in row.iter().enumerate() {
                *t.out.add(r * t.out_stride + c) += _mm512_reduce_add_ps(*a);
            }
        }
    }
}

/// The AVX-512 BF16 GEMM of [`linear_bf16`] for many rows (a prefill), in outer-product
/// form, as BLAS kernels are: a panel of [`packed::PANEL`] weight rows is packed once per
/// call into the `vdpbf16ps` pair layout (for each pair of `k` columns, the 16 rows of a
/// group side by side: one vector), and a register tile of `MR` activation rows × the
/// panel's 4 groups accumulates `acc[r][g] += pair(x[r]) · panel[g]` — one broadcast of an
/// activation pair feeds four instructions, one weight vector feeds `MR`. Each output lane
/// sums its pairs in `k` order over the whole `k` in one register and is stored once (no
/// horizontal sums, no partial results in memory), so a result does not depend on the
/// thread count or on the other rows. The dot-product kernel ([`dot`]) reads both operands
/// in place instead; it stays for the few-row products, where packing the weight costs
/// more than it saves.
#[cfg(target_arch = "x86_64")]
mod packed {
    use std::arch::x86_64::*;
    use std::cell::RefCell;
    use std::mem::MaybeUninit;

    use half::bf16;

    use super::super::cpu;

    /// Activation rows per register tile: `MR × 4` accumulators + 4 weight vectors + the
    /// broadcast pair fit the 32 zmm registers.
    const MR: usize = 6;
    /// Weight rows per panel (four groups of 16 lanes). A 2048-deep panel is 256 KiB: it
    /// stays in L2 while every activation tile passes over it.
    pub(super) const PANEL: usize = 64;

    thread_local! {
        /// This thread's packed panel, reused across tasks and calls.
        static PANEL_BUF: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
    }

    /// Callers check [`super::dot::available`] and the slice sizes (`x: m·k`, `w: n·k`,
    /// `out: m·n`), `m, n, k > 0`.
    /// Writes every element of `out` (once: no clearing needed).
    pub(super) fn gemm(
        x: &[bf16],
        m: usize,
        k: usize,
        w: &[bf16],
        n: usize,
        out: &mut [MaybeUninit<f32>],
    ) {
        debug_assert!(x.len() == m * k && w.len() == n * k && out.len() == m * n);
        let o = cpu::ColumnsOut::uninit(out);
        cpu::par_map(n.div_ceil(PANEL), m * n * k, |b| {
            let j0 = b * PANEL;
            let j1 = (j0 + PANEL).min(n);
            PANEL_BUF.with(|buf| {
                let mut buf = buf.borrow_mut();
                let groups = (j1 - j0).div_ceil(16);
                pack(w, k, j0, j1, groups, &mut buf);
                // SAFETY: the CPU has the features (checked by the caller); the panel holds
                // `k.div_ceil(2) · groups · 16` pairs, `x` holds `m · k`; this task alone
                // writes the columns `j0..j1` of `out`.
                unsafe {
                    match groups {
                        4 => panel_product::<4>(x, m, k, &buf, j0, j1, n, o.ptr()),
                        3 => panel_product::<3>(x, m, k, &buf, j0, j1, n, o.ptr()),
                        2 => panel_product::<2>(x, m, k, &buf, j0, j1, n, o.ptr()),
                        _ => panel_product::<1>(x, m, k, &buf, j0, j1, n, o.ptr()),
                    }
                }
            });
        });
    }

    /// Packs `W[j0..j1, 0..k]` pair-major: pair `p`, group `g`, lane `c` holds
    /// `W[j0 + 16g + c][2p..2p + 2]` (as one u32, the even column in the low half) at
    /// `(p · groups + g) · 16 + c`; zero beyond `j1` and `k`.
    fn pack(w: &[bf16], k: usize, j0: usize, j1: usize, groups: usize, buf: &mut Vec<u32>) {
        let pairs = k.div_ceil(2);
        let width = groups * 16;
        // Only the pairs the transposes do not write need zeros (missing rows' lanes of the
        // tail pairs); zero-filling the whole panel cost as much as a tenth of packing it.
        if buf.len() < pairs * width {
            buf.resize(pairs * width, 0);
        }
        let full = k / 2;
        let blocks = full / 16;
        buf[16 * blocks * width..pairs * width].fill(0);
        for g in 0..groups {
            let first = j0 + 16 * g;
            let rows = (j1 - first).min(16);
            let dst = buf[16 * g..].as_mut_ptr();
            // SAFETY: the CPU has AVX-512 F (the caller's check); the group's rows are
            // inside `w`, pairs `0..16·blocks ≤ k/2` inside each row, and every store
            // inside `buf` (`pairs · width`).
            unsafe {
                if rows == 16 {
                    cpu::transpose_blocks_16x16(
                        |c| w.as_ptr().add((first + c) * k) as *const u32,
                        blocks,
                        dst,
                        width,
                    )
                } else {
                    // a last group of fewer than 16 weight rows: the missing rows read a
                    // zero row (their lanes must be zero)
                    let zeros = vec![bf16::ZERO; 32 * blocks];
                    let row = |c: usize| {
                        if c < rows {
                            w.as_ptr().add((first + c) * k) as *const u32
                        } else {
                            zeros.as_ptr() as *const u32
                        }
                    };
                    cpu::transpose_blocks_16x16(row, blocks, dst, width)
                }
            };
            for c in 0..rows {
                let row = &w[(first + c) * k..(first + c + 1) * k];
                for p in 16 * blocks..full {
                    buf[p * width + 16 * g + c] =
                        u32::from(row[2 * p].to_bits()) | u32::from(row[2 * p + 1].to_bits()) << 16;
                }
                if k % 2 == 1 {
                    buf[full * width + 16 * g + c] = u32::from(row[k - 1].to_bits());
                }
            }
        }
    }

    /// `out[0..m, j0..j1] = x · panelᵀ`, `MR` rows at a time over the whole `k`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn panel_product<const G: usize>(
        x: &[bf16],
        m: usize,
        k: usize,
        panel: &[u32],
        j0: usize,
        j1: usize,
        n: usize,
        out: *mut f32,
    ) {
        let t = Tile {
            x: x.as_ptr(),
            k,
            panel: panel.as_ptr(),
            out: out.add(j0),
            n,
            cols: j1 - j0,
        };
        let mut i0 = 0;
        while i0 < m {
            let r = MR.min(m - i0);
            match r {
                6 => tile::<6, G>(&t, i0),
                5 => tile::<5, G>(&t, i0),
                4 => tile::<4, G>(&t, i0),
                3 => tile::<3, G>(&t, i0),
                2 => tile::<2, G>(&t, i0),
                _ => tile::<1, G>(&t, i0),
            }
            i0 += r;
        }
    }

    /// A panel product's operands: `x` (row stride `k`), the packed panel, and `out` at the
    /// panel's first column (row stride `n`, `cols` valid columns).
    struct Tile {
        x: *const bf16,
        k: usize,
        panel: *const u32,
        out: *mut f32,
        n: usize,
        cols: usize,
    }

    /// Rows `i0..i0 + R` of the panel product.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn tile<const R: usize, const G: usize>(t: &Tile, i0: usize) {
        let mut acc = [[_mm512_setzero_ps(); G]; R];
        let x = t.x.add(i0 * t.k);
        let full = t.k / 2;
        // one pair step: the panel's G vectors of pair `p` against each row's broadcast pair
        macro_rules! step {
            ($p:expr, $pair:expr) => {{
                let b = t.panel.add($p * G * 16);
                let mut bv = [_mm512_setzero_si512(); G];
                for (g, v) in bv.iter_mut().enumerate() {
                    *v = _mm512_loadu_si512(b.add(g * 16) as *const _);
                }
                for (r, row) in acc.iter_mut().enumerate() {
                    let a = as_bh(_mm512_set1_epi32($pair(r)));
                    for (av, v) in row.iter_mut().zip(&bv) {
                        *av = _mm512_dpbf16_ps(*av, a, as_bh(*v));
                    }
                }
            }};
        }
        for p in 0..full {
            step!(p, |r: usize| (x.add(r * t.k + 2 * p) as *const i32)
                .read_unaligned());
        }
        if t.k % 2 == 1 {
            // the last column alone: its pair's upper half is zero, in the panel too
            step!(full, |r: usize| (*x.add(r * t.k + t.k - 1)).to_bits()
                as i32);
        }
        for (r, row) in acc.iter().enumerate() {
            let o = t.out.add((i0 + r) * t.n);
            for (g, v) in row.iter().enumerate() {
                let valid = t.cols.saturating_sub(16 * g).min(16);
                if valid == 16 {
                    _mm512_storeu_ps(o.add(16 * g), *v);
                } else if valid > 0 {
                    _mm512_mask_storeu_ps(o.add(16 * g), ((1u32 << valid) - 1) as __mmask16, *v);
                }
            }
        }
    }

    #[inline(always)]
    unsafe fn as_bh(v: __m512i) -> __m512bh {
        std::mem::transmute::<__m512i, __m512bh>(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::kernels::cpu::test_data as data;

    // The kernels on `f32` buffers (the tests fill them with NaN first where every element
    // must be written).

    fn linear_bf16(
        rows: Rows,
        x: &[bf16],
        m: usize,
        k: usize,
        w: &[bf16],
        n: usize,
        out: &mut [f32],
    ) -> Result<()> {
        // SAFETY: the kernels write only values.
        super::linear_bf16(rows, x, m, k, w, n, unsafe { cpu::as_uninit(out) })
    }

    #[cfg(target_arch = "x86_64")]
    fn dot_gemm(x: &[bf16], m: usize, k: usize, w: &[bf16], n: usize, out: &mut [f32]) {
        // SAFETY: the kernel writes only values.
        dot::gemm(x, m, k, w, n, unsafe { cpu::as_uninit(out) })
    }

    #[cfg(target_arch = "x86_64")]
    fn packed_gemm(x: &[bf16], m: usize, k: usize, w: &[bf16], n: usize, out: &mut [f32]) {
        // SAFETY: the kernel writes only values.
        packed::gemm(x, m, k, w, n, unsafe { cpu::as_uninit(out) })
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

    /// bf16 operands `x [m×k]`, `W [n×k]` from the seeds, `x` widened, and the f64-summed
    /// product they must reproduce.
    #[allow(clippy::type_complexity)]
    fn bf16_operands(
        (m, k, n): (usize, usize, usize),
        (sx, sw): (u32, u32),
    ) -> (Vec<bf16>, Vec<bf16>, Vec<f32>, Vec<f32>) {
        let x: Vec<bf16> = data(m * k, sx).into_iter().map(bf16::from_f32).collect();
        let w: Vec<bf16> = data(n * k, sw).into_iter().map(bf16::from_f32).collect();
        let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
        let want = reference(&xf, m, k, &w, n);
        (x, w, xf, want)
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
    fn bf16_activations_match_the_widened_product() {
        // Crosses every blocking edge of the dot kernel: rows not a multiple of MR, weight
        // rows not a multiple of NR or NB, k not a multiple of 32 and larger than KC.
        for &(m, k, n) in &[
            (9, 32, 6),
            (9, 37, 50),
            (13, 1100, 61),
            (40, 257, 97),
            (4, 64, 7),
            (20, 300, 70),
            (33, 2048, 100),
            (64, 96, 200),
            (7, 2100, 130),
            (8, 64, 61),
        ] {
            let (x, w, xf, want) = bf16_operands((m, k, n), (3, 5));
            let mut out = vec![f32::NAN; m * n];
            linear_bf16(Rows::Whole, &x, m, k, &w, n, &mut out).unwrap();
            for (g, r) in out.iter().zip(&want) {
                assert!(
                    (g - r).abs() <= 1e-4 * (1.0 + r.abs()),
                    "m={m} k={k} n={n}: {g} vs {r}"
                );
            }
            // an expert's share of a prefill: AMX, packed or GEMV, the same product
            let mut share = vec![f32::NAN; m * n];
            linear_bf16(Rows::Share, &x, m, k, &w, n, &mut share).unwrap();
            for (g, r) in share.iter().zip(&want) {
                assert!(
                    (g - r).abs() <= 1e-4 * (1.0 + r.abs()),
                    "share m={m} k={k} n={n}: {g} vs {r}"
                );
            }
            // into a new buffer (uncleared where AMX takes the product): the same bits
            for (rows, into) in [(Rows::Whole, &out), (Rows::Share, &share)] {
                let new = linear_bf16_new(rows, &x, m, k, &w, n).unwrap();
                assert!(
                    new.len() == m * n
                        && new
                            .iter()
                            .zip(into)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{rows:?} m={m} k={k} n={n}: a new buffer differs"
                );
            }
            // and the same as the widening path it replaces, up to summation order
            let mut widened = vec![0f32; m * n];
            linear(&xf, m, k, &w, n, &mut widened).unwrap();
            for (g, r) in out.iter().zip(&widened) {
                assert!((g - r).abs() <= 1e-4 * (1.0 + r.abs()));
            }
            // a decode step: a row's result does not depend on the rows decoded with it,
            // nor on the pool
            if m <= GEMV_ROWS {
                for rows in [1, 2.min(m)] {
                    let at = m - rows;
                    let mut alone = vec![f32::NAN; rows * n];
                    cpu::in_pool(|| {
                        linear_bf16(Rows::Whole, &x[at * k..], rows, k, &w, n, &mut alone).unwrap()
                    });
                    assert!(
                        alone
                            .iter()
                            .zip(&out[at * n..])
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "m={m} k={k} n={n}: the last {rows} rows alone differ"
                    );
                }
            }
        }
    }

    /// Both AVX-512 BF16 kernels against the widened product, across every edge of the
    /// packed one: rows not a multiple of its tile (6), weight rows not a multiple of a group
    /// (16) or panel (64), odd `k` (a last pair of one column).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn packed_and_dot_kernels_match_the_widened_product() {
        if !dot::available() {
            return;
        }
        for &(m, k, n) in &[
            (1, 1, 1),
            (5, 3, 17),
            (6, 64, 16),
            (7, 33, 65),
            (9, 70, 33),
            (13, 2048, 130),
            (40, 257, 97),
            (64, 1, 200),
            (17, 31, 50),
            (48, 130, 101),
        ] {
            let (x, w, _, want) = bf16_operands((m, k, n), (13, 17));
            let mut packed_out = vec![f32::NAN; m * n];
            packed_gemm(&x, m, k, &w, n, &mut packed_out);
            let mut dot_out = vec![f32::NAN; m * n];
            dot_gemm(&x, m, k, &w, n, &mut dot_out);
            for (i, r) in want.iter().enumerate() {
                for got in [packed_out[i], dot_out[i]] {
                    assert!(
                        (got - r).abs() <= 1e-4 * (1.0 + r.abs()),
                        "m={m} k={k} n={n} at {i}: {got} vs {r}"
                    );
                }
            }
            // a row's result depends neither on the other rows nor on the pool
            let mut one = vec![f32::NAN; n];
            packed_gemm(&x[(m - 1) * k..], 1, k, &w, n, &mut one);
            assert!(one
                .iter()
                .zip(&packed_out[(m - 1) * n..])
                .all(|(a, b)| a.to_bits() == b.to_bits()));
            let mut pooled = vec![f32::NAN; m * n];
            cpu::in_pool(|| packed_gemm(&x, m, k, &w, n, &mut pooled));
            assert!(pooled
                .iter()
                .zip(&packed_out)
                .all(|(a, b)| a.to_bits() == b.to_bits()));
        }
    }

    /// `cargo test --release -p zaya --lib bf16::tests::bf16_gemm_speed -- --ignored
    /// --nocapture`: GFLOP/s of the two AVX-512 BF16 kernels on prefill and expert shapes.
    #[cfg(target_arch = "x86_64")]
    #[test]
    #[ignore]
    fn bf16_gemm_speed() {
        if !dot::available() {
            println!("no AVX-512 BF16 here");
            return;
        }
        let best = |f: &mut dyn FnMut()| cpu::best_seconds(5, f);
        println!("threads: {}", cpu::num_threads());
        for &(m, k, n) in &[
            (512, 2048, 2048),
            (512, 2048, 8192),
            (512, 8192, 2048),
            (9, 1024, 2048),
            (12, 1024, 2048),
            (16, 1024, 2048),
            (32, 1024, 2048),
            (64, 1024, 2048),
            (128, 1024, 2048),
        ] {
            let x: Vec<bf16> = data(m * k, 3).into_iter().map(bf16::from_f32).collect();
            let w: Vec<bf16> = data(n * k, 5).into_iter().map(bf16::from_f32).collect();
            let mut out = vec![0f32; m * n];
            let flop = 2.0 * (m * n * k) as f64;
            let td = best(&mut || cpu::in_pool(|| dot_gemm(&x, m, k, &w, n, &mut out)));
            let tp = best(&mut || cpu::in_pool(|| packed_gemm(&x, m, k, &w, n, &mut out)));
            println!(
                "m={m} k={k} n={n}: dot {:.0} GFLOP/s, packed {:.0} GFLOP/s",
                flop / td / 1e9,
                flop / tp / 1e9
            );
        }
    }

    /// `cargo test --release -p zaya --lib bf16::tests::bf16_decode_speed -- --ignored
    /// --nocapture`: decode-sized products (bf16 activations, a 256 MiB weight: read from
    /// memory), the widening GEMV against the `vdpbf16ps` dot kernel and, where AMX is on,
    /// the weight-streaming AMX kernel, as GB/s of weight. Xeon (this project's, 2 threads,
    /// 2026-12-08, best of 5, three runs): dot 25–30 / 18–21 GB/s at 1 / 8 rows, AMX
    /// streamed 18–25 / 19–23 — 0.7–0.95× the dot kernel at one row and 1.0–1.3× at eight,
    /// with or without software prefetches of the next steps (into L1) or of the next
    /// 16-row group (into L2) — so decode stays on the dot kernel (one kernel for every
    /// decode batch: `tdpbf16ps` does not round as `vdpbf16ps` does, see the AMX tests).
    #[cfg(target_arch = "x86_64")]
    #[test]
    #[ignore]
    fn bf16_decode_speed() {
        if !dot::available() {
            println!("no AVX-512 BF16 here");
            return;
        }
        let best = |f: &mut dyn FnMut()| cpu::best_seconds(5, f);
        println!("threads: {}", cpu::num_threads());
        let (k, n) = (2048, 65536);
        let w: Vec<bf16> = data(n * k, 5).into_iter().map(bf16::from_f32).collect();
        for m in [1, 2, 4, 8, 16, 32] {
            let x: Vec<bf16> = data(m * k, 3).into_iter().map(bf16::from_f32).collect();
            let mut out = vec![0f32; m * n];
            let gb = (n * k * 2) as f64 / 1e9;
            let tw = best(&mut || {
                cpu::in_pool(|| {
                    let xf: Vec<f32> = x.iter().map(|v| widen(*v)).collect();
                    linear(&xf, m, k, &w, n, &mut out).unwrap()
                })
            });
            let td = best(&mut || cpu::in_pool(|| dot_gemm(&x, m, k, &w, n, &mut out)));
            #[cfg(target_os = "linux")]
            let streamed = if super::super::amx::enabled() {
                let ts = best(&mut || {
                    cpu::in_pool(|| {
                        // SAFETY: the kernel writes only values.
                        super::super::amx::gemm_streamed(&x, m, k, &w, n, unsafe {
                            cpu::as_uninit(&mut out)
                        })
                    })
                });
                format!(", AMX streamed {:.1} GB/s", gb / ts)
            } else {
                String::new()
            };
            #[cfg(not(target_os = "linux"))]
            let streamed = String::new();
            println!(
                "m={m:<2} k={k} n={n}: widening GEMV {:.1} GB/s, dot {:.1} GB/s{streamed}",
                gb / tw,
                gb / td
            );
        }
    }

    /// `cargo test --release -p zaya --lib bf16::tests::huge_page_read_rate -- --ignored
    /// --nocapture`: the dot kernel over one 256 MiB weight on 4 KiB pages against the same
    /// weight on 2 MiB pages (`madvise(MADV_HUGEPAGE)` before the first write, as glibc's
    /// `hugetlb` tunable does for the `zaya` binary's heap), alternated in one process
    /// (this machine's read rate moves too much between runs for anything else), GB/s of
    /// weight at 1, 2 and 8 rows. Zeroed pages are all one shared page until written, so
    /// both copies are written in full first.
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    #[test]
    #[ignore]
    fn huge_page_read_rate() {
        if !dot::available() {
            println!("no AVX-512 BF16 here");
            return;
        }
        let (k, n) = (2048usize, 65536usize);
        let weight = |huge: bool| {
            let mut w = vec![bf16::ZERO; n * k];
            if huge {
                // the whole pages of the (calloc'ed, untouched) buffer
                let start = (w.as_ptr() as usize + 4095) & !4095;
                let end = (w.as_ptr() as usize + n * k * 2) & !4095;
                // SAFETY: advice over pages of a live allocation we own; it changes how
                // they are backed, not what they hold.
                unsafe {
                    libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE)
                };
            }
            for (i, v) in w.iter_mut().enumerate() {
                *v = bf16::from_f32((i * 7919 % 1000) as f32 * 1e-3 - 0.5);
            }
            w
        };
        let ws = [weight(false), weight(true)];
        let gb = (n * k * 2) as f64 / 1e9;
        // whether the kernel gave the huge pages (it may not: THP off, or no free 2 MiB)
        let rollup = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap_or_default();
        let huge = rollup.lines().find(|l| l.starts_with("AnonHugePages"));
        println!(
            "threads: {}; {}",
            cpu::num_threads(),
            huge.unwrap_or("AnonHugePages: ?")
        );
        for m in [1usize, 2, 8] {
            let x: Vec<bf16> = data(m * k, 3).into_iter().map(bf16::from_f32).collect();
            let mut out = vec![0f32; m * n];
            for _ in 0..4 {
                let mut line = format!("m={m}:");
                for (w, pages) in ws.iter().zip(["4 KiB", "2 MiB"]) {
                    let t = std::time::Instant::now();
                    cpu::in_pool(|| dot_gemm(&x, m, k, w, n, &mut out));
                    line += &format!("  {pages} pages {:.1} GB/s", gb / t.elapsed().as_secs_f64());
                }
                println!("{line}");
            }
        }
    }

    /// `cargo test --release -p zaya --lib bf16::tests::bf16_expert_share_speed -- --ignored
    /// --nocapture`: an expert's share of a prefill (a few rows against a gate/up weight
    /// read from memory: eight 16 MiB experts in turn, more than the L3), dot against packed
    /// kernel, as GB/s of weight — the floor is the machine's read bandwidth.
    #[cfg(target_arch = "x86_64")]
    #[test]
    #[ignore]
    fn bf16_expert_share_speed() {
        if !dot::available() {
            println!("no AVX-512 BF16 here");
            return;
        }
        let best = |f: &mut dyn FnMut()| cpu::best_seconds(3, f);
        println!("threads: {}", cpu::num_threads());
        let (k, n, experts) = (2048, 4096, 8);
        let w: Vec<bf16> = data(experts * n * k, 5)
            .into_iter()
            .map(bf16::from_f32)
            .collect();
        for m in [1, 2, 4, 6, 8, 10, 12, 16, 24, 32, 48, 64, 96, 128, 256, 512] {
            let x: Vec<bf16> = data(m * k, 3).into_iter().map(bf16::from_f32).collect();
            let mut out = vec![0f32; m * n];
            let gb = (experts * n * k * 2) as f64 / 1e9;
            type Kernel = fn(&[bf16], usize, usize, &[bf16], usize, &mut [f32]);
            let mut run = |f: Kernel| {
                best(&mut || {
                    cpu::in_pool(|| {
                        for e in w.chunks(n * k) {
                            f(&x, m, k, e, n, &mut out)
                        }
                    })
                })
            };
            let (td, tp) = (run(dot_gemm), run(packed_gemm));
            println!(
                "m={m:<2} k={k} n={n}: dot {:.1} GB/s {:.0} GFLOP/s, packed {:.1} GB/s {:.0} GFLOP/s",
                gb / td,
                gb * m as f64 / td,
                gb / tp,
                gb * m as f64 / tp
            );
        }
    }

    /// `cargo test --release -p zaya --lib bf16::tests::bf16_decode_token_speed -- --ignored
    /// --nocapture`: the products of one ZAYA1-8B decode token at batch 1 (40 layers of
    /// q/k/v/o, router and one expert's gate/up and down, then the 262272-row lm_head; bf16
    /// activations, 2.6 GB of distinct weights), one `dot::gemm` call each, against an
    /// integer fold over the same bytes: what the kernel and its per-call hand-off to the
    /// pool cost at the real model's shapes, apart from everything else in a forward. Run it
    /// with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` to read huge-page memory as the `zaya`
    /// binary's heap is (on 4 KiB pages both the kernel and the fold read slower).
    #[cfg(target_arch = "x86_64")]
    #[test]
    #[ignore]
    fn bf16_decode_token_speed() {
        use rayon::prelude::*;
        if !dot::available() {
            println!("no AVX-512 BF16 here");
            return;
        }
        let h = 2048;
        // (rows, k) of each product of one layer, as the 8B config has them
        let layer: [(usize, usize); 8] = [
            (1024, h),     // q
            (256, h),      // k
            (128, h),      // v (current)
            (128, h),      // v (delayed)
            (h, 1024),     // o
            (256, h),      // router down-projection
            (2 * 2048, h), // expert gate/up
            (h, 2048),     // expert down
        ];
        let mut shapes: Vec<(usize, usize)> = (0..40).flat_map(|_| layer).collect();
        shapes.push((262_272, h)); // lm_head
        let weights: Vec<Vec<bf16>> = shapes
            .iter()
            .map(|&(n, k)| vec![bf16::from_f32(0.5); n * k])
            .collect();
        let xs: Vec<Vec<bf16>> = [h, 1024]
            .iter()
            .map(|&k| data(k, 3).into_iter().map(bf16::from_f32).collect())
            .collect();
        let bytes: usize = shapes.iter().map(|(n, k)| 2 * n * k).sum();
        let mut out = vec![0f32; 262_272];
        let best = |f: &mut dyn FnMut()| cpu::best_seconds(3, f);
        // the first `count` products, best of three
        let mut products = |count: usize| {
            best(&mut || {
                cpu::in_pool(|| {
                    for (w, &(n, k)) in weights.iter().zip(&shapes).take(count) {
                        let x = if k == h { &xs[0] } else { &xs[1] };
                        dot_gemm(x, 1, k, w, n, &mut out[..n]);
                    }
                })
            })
        };
        let token = products(shapes.len());
        let layers_only = products(shapes.len() - 1);
        let fold = best(&mut || {
            let s: u64 = cpu::in_pool(|| {
                weights
                    .par_iter()
                    .flat_map(|w| w.par_chunks(1 << 15))
                    .map(|c| {
                        // as 64-bit words (the bench's probe folds words too): a fold
                        // of widened bf16 values ran compute-bound
                        // SAFETY: any bit pattern is a valid u64
                        let (head, words, tail) = unsafe { c.align_to::<u64>() };
                        let edge = head.iter().chain(tail).map(|v| v.to_bits() as u64);
                        words
                            .iter()
                            .copied()
                            .chain(edge)
                            .fold(0u64, u64::wrapping_add)
                    })
                    .reduce(|| 0, u64::wrapping_add)
            });
            std::hint::black_box(s);
        });
        let lm = 2.0 * 262_272.0 * h as f64;
        println!(
            "threads {}: one token {:.1} ms = {:.1} GB/s; 40 layers {:.1} ms = {:.1} GB/s; \
             lm_head {:.1} ms = {:.1} GB/s; fold {:.1} GB/s",
            cpu::num_threads(),
            token * 1e3,
            bytes as f64 / token / 1e9,
            layers_only * 1e3,
            (bytes as f64 - lm) / layers_only / 1e9,
            (token - layers_only) * 1e3,
            lm / (token - layers_only) / 1e9,
            bytes as f64 / fold / 1e9
        );
    }

    #[test]
    fn short_buffers_are_an_error() {
        let w = vec![bf16::ONE; 4];
        let mut out = vec![0f32; 1];
        assert!(linear(&[1.0; 2], 1, 2, &w, 2, &mut out).is_err());
    }
}
