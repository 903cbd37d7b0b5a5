//! An AVX-512 / AVX2 f32 GEMM against a weight's transpose — the forward products of the MoE
//! experts (`x·W_guᵀ` and `act·W_downᵀ`: a few dozen token rows per expert with a trained
//! router, up to the whole forward with a skewed one), run again by their fused backward's
//! recompute, and the f32 linear layers' forward above 32 rows (see below). The `gemm`
//! crate (through [`cpu::gemm`]) packs the whole weight for every such product, a
//! transpose that costs about as much as the product when each weight element meets only
//! a few dozen rows, and its thread split gains nothing at this size:
//! on the Xeon of the training benchmark it ran them at ~115 GFLOP/s on one thread and on
//! two alike.
//!
//! Here the roles swap: the few rows of `lhs` are packed transposed (panels of `NR = 32`
//! rows, cheap), and the register tile is `Cᵀ` — `MR = 12` weight rows, broadcast from a
//! copy of those rows one cache line apart ([`TILE_PAD`]), times `NR` rows of `lhs` in two
//! zmm vectors (24 of the 32 registers) — over the whole reduction. The 12 weight rows
//! (`12·k` values, 24 KiB at `k = 512`) stay in L1 while the panels of `lhs` stream from
//! L2. Threads split the weight rows; each packs `lhs` and copies its tiles into a buffer
//! that stays allocated for the thread. The full tile
//! runs in assembly ([`tile_12x32`]: the compiled intrinsics spent an address add per
//! broadcast on the FMA ports), the partial ones at the edges in intrinsics ([`tile`]).
//! The first panel's assembly tile also copies the next weight tile, in the load and store
//! slots its multiply-adds leave free ([`Ahead`]): with an expert's few dozen rows (one
//! panel) the copy had been a separate pass of ~9 % of a prefill, waiting on memory.
//!
//! Busy experts (hundreds of rows) stay here too: the `gemm` crate's packing of a weight
//! that comes cold from memory gathers it one value at a time with a stride of `k` (21 % of
//! a medium prefill when experts above 128 rows went there), while this kernel reads each
//! weight row in order and packs only `lhs`, 16 × 16 values at a time in registers. Same
//! speed with warm caches at 512 rows (`step_shapes`: 94–97 vs 95–98 GFLOP/s per thread,
//! Zen 4); medium prefill, alternating both in one process: +7 % on average.
//!
//! Numerics: every output is one FMA chain over `k` in order (from the old value when
//! accumulating), whatever the tile position or the thread split: bit-identical for any
//! thread count and any number of rows (a row of the product does not depend on the other
//! rows), so a recomputed product (gradient checkpointing) equals the first one.
//!
//! The f32 linear layers' forward (`matmul::f32_linear`: a prefill's or a training step's
//! projections, hundreds of rows) runs here too above [`cpu::GEMV_ROWS`] rows, for the
//! same reason: a dense weight is read once per forward, cold.
//!
//! AVX2 CPUs without AVX-512 (AMD Zen 3, older Intel) run the same blocking with a 6 × 16
//! tile of ymm vectors ([`Isa::Avx2`], [`tile_6x16`]): the same FMA chains, so the same
//! bits. Before it they went to [`cpu::gemm`]: expert shares up to 32 rows to its GEMV at
//! ~20 GFLOP/s against 50–90 here (Zen 3, 2 threads, `step_shapes`, `expert_share_speed`),
//! larger ones to the `gemm` crate's weight packing.
//!
//! Everything else goes to [`cpu::gemm`]: other CPUs (no AVX2 + FMA), right operands that
//! are not a contiguous-row weight's transpose (the backward's `dy·W` and `dYᵀ·X`, where
//! the `gemm` crate measured faster), and fewer than
//! `min_rows` rows (at most [`cpu::GEMV_ROWS`] in a decode step, where its GEMV path keeps
//! decode's batch invariance; fewer than [`share_min_rows`] in an expert's share of a larger
//! forward).

use std::cell::RefCell;

use candle_core::Result;
use half::bf16;

#[cfg(test)]
use super::cpu::MatMut;
use super::cpu::{self, DstPtr, MatRef};

/// Weight rows (columns of the product) in the register tile.
const MR: usize = 12;
/// Rows of `lhs` in the register tile (two 16-lane vectors).
const NR: usize = 32;
/// Values between the rows of the weight tile's copy (64 bytes: one cache line). A
/// weight's rows are `k` values apart, 4 KiB at `k = 1024` and a multiple of it above:
/// read in place, the tile's 12 rows all fall into one set of the 8-way L1 and evict
/// each other on every step (Zen 4, warm, 512 × 1024 × 1024 and 328 × 2048 × 1024: 65–91
/// against 88–99 GFLOP/s on one thread, 130–136 against 172–190 on two). Copied one line
/// apart, they spread over 12 sets; the copy is also where a forward's cold weight rows
/// arrive, so the next tile's rows are prefetched into L2 while this one runs.
const TILE_PAD: usize = 16;
/// Most row panels for which [`block`] fetches the next weight tile from inside the first
/// panel's assembly tile, where that tile cannot copy it ([`Ahead::Copy`]: the next tile
/// short of twelve rows, or `k` not a multiple of 16). Before each panel, the lines of one
/// or two panels came as one burst of hundreds of prefetches, more than the miss buffers
/// hold: the copy of the next tile then waited on memory. Zen 4, 2 threads, sixteen cold
/// medium experts in turn (`k = 1024`, `n = 2048 / 1024`), same-process alternation
/// against a build without it (`cold_expert_shares`'s cold column): 24 rows 87 → 109 /
/// 106 → 124 GFLOP/s, 32 rows 137 → 156 / 139 → 167, 40 rows 114 → 133 / 131 → 146,
/// 64 rows 166 → 178 / 127 → 145, 96 rows 153 → 160 / 179 → 189, 128 rows 190 → 192 /
/// 194 → 202; at 256 and 512 rows even or slightly behind.
const AHEAD_IN_TILE_PANELS: usize = 4;
/// What the first row panel's assembly tile ([`tile_12x32`]) does beside its product, in
/// the load and store slots the multiply-adds leave free (three lines every four steps:
/// `12·k/16` lines over `k/4` groups, the next tile's twelve rows exactly). Copying there
/// rather than before the tile: medium prefill with a balanced router (shares of 24–40
/// rows), Zen 4, 2 threads, six alternated pairs of runs: +1.7 to +13 %, 525 against 501
/// tok/s on average (`cold_expert_shares`: 32 rows 138 → 150 / 147 → 156 GFLOP/s cold,
/// 152 → 168 / 173 → 190 warm).
#[derive(Clone, Copy)]
enum Ahead {
    /// Nothing more.
    None,
    /// Ask for the lines from here on into L2 (the next tile's rows, when contiguous).
    Prefetch(*const f32),
    /// Copy the next tile's twelve rows (contiguous from `src`, `k` values each, `k` a
    /// multiple of 16) to `dst`, `TILE_PAD` values apart as [`block`] lays a tile out.
    Copy { src: *const f32, dst: *mut f32 },
}

/// Weight rows in the AVX2 register tile (six broadcasts a step).
const MR_AVX2: usize = 6;
/// Rows of `lhs` in the AVX2 register tile (two 8-lane vectors): with [`MR_AVX2`], twelve
/// accumulators, two `lhs` vectors and a broadcast — 15 of the 16 ymm registers, the
/// shape of the `gemm` crate's own AVX2 microkernel.
const NR_AVX2: usize = 16;

/// The instruction set a product runs on, and with it the register tile: AVX-512F (the
/// `MR × NR` = 12 × 32 tile, the assembly one in full) or AVX2 + FMA (6 × 16, intrinsics;
/// CPUs such as AMD Zen 3 have no AVX-512). Both compute every output as the same FMA chain
/// over `k` in order, so they give the same bits.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Isa {
    Avx512,
    Avx2,
}

impl Isa {
    /// The widest the CPU has; `None` without AVX2 + FMA (the product is [`cpu::gemm`]'s).
    fn detect() -> Option<Isa> {
        match cpu::simd_level() {
            cpu::SimdLevel::Avx512 => Some(Isa::Avx512),
            cpu::SimdLevel::Avx2 => Some(Isa::Avx2),
            cpu::SimdLevel::Baseline => None,
        }
    }

    /// Every instruction set this CPU can run (the tests run the kernel on each).
    #[cfg(test)]
    fn available() -> Vec<Isa> {
        match Isa::detect() {
            Some(Isa::Avx512) => vec![Isa::Avx512, Isa::Avx2],
            Some(Isa::Avx2) => vec![Isa::Avx2],
            None => vec![],
        }
    }

    /// Weight rows in the register tile.
    fn mr(self) -> usize {
        match self {
            Isa::Avx512 => MR,
            Isa::Avx2 => MR_AVX2,
        }
    }

    /// Rows of `lhs` in the register tile (a packed panel).
    fn nr(self) -> usize {
        match self {
            Isa::Avx512 => NR,
            Isa::Avx2 => NR_AVX2,
        }
    }
}

/// The weight operand of a product: the rows of `W` (the right operand is `Wᵀ`), `ldw`
/// values apart, in f32 or in bf16. bf16 rows are widened to f32 as each tile is copied
/// (exact: a bf16 value is the top half of an f32), so a bf16 weight is never held as an
/// f32 copy and the product is the f32 one of the widened operands.
#[derive(Clone, Copy)]
enum WeightRows<'a> {
    F32 {
        data: &'a [f32],
        off: usize,
        ldw: usize,
    },
    Bf16 {
        data: &'a [bf16],
        ldw: usize,
    },
}

impl<'a> WeightRows<'a> {
    /// The transposed view's weight rows (`rhs.rs == 1`, checked by the callers).
    fn of(rhs: &MatRef<'a>) -> WeightRows<'a> {
        WeightRows::F32 {
            data: rhs.data,
            off: rhs.off,
            ldw: rhs.cs,
        }
    }

    /// `dst[..k]` = weight row `row` (its first `k` values) in f32.
    fn copy_row(&self, row: usize, k: usize, dst: &mut [f32]) {
        match *self {
            WeightRows::F32 { data, off, ldw } => {
                let at = off + row * ldw;
                dst[..k].copy_from_slice(&data[at..at + k]);
            }
            WeightRows::Bf16 { data, ldw } => {
                super::bf16::widen_into(&data[row * ldw..row * ldw + k], &mut dst[..k])
            }
        }
    }

    /// Cache lines (64 bytes) in the first `k` values of a row.
    fn row_lines(&self, k: usize) -> usize {
        match self {
            WeightRows::F32 { .. } => k.div_ceil(16),
            WeightRows::Bf16 { .. } => k.div_ceil(32),
        }
    }

    /// The address of cache line `line` of weight row `row`, for a prefetch (possibly past
    /// the weight: a prefetch never faults).
    fn line(&self, row: usize, line: usize) -> *const u8 {
        match *self {
            WeightRows::F32 { data, off, ldw } => data
                .as_ptr()
                .wrapping_add(off + row * ldw + 16 * line)
                .cast(),
            WeightRows::Bf16 { data, ldw } => {
                data.as_ptr().wrapping_add(row * ldw + 32 * line).cast()
            }
        }
    }

    /// The first row and the row stride of an f32 weight (what the AVX-512 assembly tile's
    /// copy and prefetch ahead read), `None` for bf16.
    fn f32_rows(&self) -> Option<(*const f32, usize)> {
        match *self {
            // SAFETY: `off` lies inside `data` (the view was checked by the callers).
            WeightRows::F32 { data, off, ldw } => Some((unsafe { data.as_ptr().add(off) }, ldw)),
            WeightRows::Bf16 { .. } => None,
        }
    }
}

/// Bytes of packed `lhs` (row panels) that every weight tile passes over before the next
/// group of panels: a group stays in L2 (1–2 MiB on the project's machines) beside the
/// weight tiles. Over the whole `lhs` at once, a dense layer's 512 rows at `k = 1024` (2
/// MiB) streamed from L3 for every tile: one thread on the Xeon, `step_shapes`, 98–114
/// GFLOP/s at 512 rows against 132 at 128.
const GROUP_BYTES: usize = 512 << 10;

/// Products smaller than this (`m·n·k`) run on the calling thread.
const MIN_PARALLEL_WORK: usize = 1 << 18;

/// Fewest rows of an expert's share of a larger forward for which this kernel runs rather
/// than the GEMV, on AVX-512. AMD EPYC Zen 4, an expert of the small config (`k = 512`,
/// `n = 512 / 1024`), 1 / 2 threads: the GEMV faster at 8 rows, this kernel 1.1× at 12,
/// 1.3–1.5× at 16–32 (`step_shapes`). On weights read from memory (a medium expert,
/// `expert_share_speed`): the GEMV 1.6× at 4 rows, equal at 8, this kernel 1.1× at 10, 1.3×
/// at 12 and 1.5× at 16.
const SHARE_MIN_ROWS: usize = 12;
/// [`SHARE_MIN_ROWS`] on AVX2, where the GEMV's dot products (eight lanes, a horizontal
/// sum per output) fall behind much sooner. AMD EPYC Zen 3, 2 threads, a medium expert
/// read from memory (`expert_share_speed`): the GEMV 1.2× at 2 rows, equal at 4, this
/// kernel 1.7× at 6, 2.2× at 8 and 3.5× at 16 (the GEMV near 20 GFLOP/s from 4 rows on);
/// a small expert in cache (`step_shapes`): this kernel 2.3–4× at 8–32 rows.
const SHARE_MIN_ROWS_AVX2: usize = 4;

/// Fewest rows of an expert's share of a larger forward (a prefill, a training step) for
/// which this kernel runs on this CPU rather than the GEMV.
pub(crate) fn share_min_rows() -> usize {
    match Isa::detect() {
        Some(Isa::Avx2) => SHARE_MIN_ROWS_AVX2,
        _ => SHARE_MIN_ROWS,
    }
}

/// Whether the kernel takes this product from `min_rows` rows (else it is [`cpu::gemm`]):
/// above [`cpu::GEMV_ROWS`] for decode and the dense layers, from [`share_min_rows`] for
/// expert shares.
pub(crate) fn takes(min_rows: usize, m: usize, rhs: &MatRef<'_>) -> bool {
    rhs.rs == 1 && takes_rows(min_rows, m)
}

/// Whether the kernel takes a product of `m` rows from `min_rows` against a row-major
/// weight (any `m × k` by `[n, k]ᵀ`, as [`bf16_weight_fresh`]'s): the CPU has AVX2 + FMA.
pub(crate) fn takes_rows(min_rows: usize, m: usize) -> bool {
    m >= min_rows && Isa::detect().is_some()
}

/// `dst[m×n] = (accumulate ? dst : 0) + lhs[m×k] · rhs[k×n]` on strided views with the
/// kernel for any number of rows: the tests' entry, accumulation and strided destinations
/// included (the forward takes [`gemm_fresh`]). `rhs` must be a weight's transpose
/// (`rhs.rs == 1`) and the CPU must have `isa` (checked: an error otherwise).
#[cfg(test)]
#[allow(clippy::too_many_arguments)]
fn weight_rows(
    isa: Isa,
    m: usize,
    n: usize,
    k: usize,
    dst: MatMut<'_>,
    accumulate: bool,
    lhs: MatRef<'_>,
    rhs: MatRef<'_>,
    parallel: bool,
) -> Result<()> {
    if rhs.rs != 1 || !Isa::available().contains(&isa) {
        return Err(super::KernelError::Internal(format!(
            "sgemm: needs {isa:?} (this CPU: {:?}) and a weight's transpose (rhs row stride {})",
            cpu::simd_level(),
            rhs.rs
        ))
        .into());
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    cpu::check_views(m, n, k, &dst, &lhs, &rhs)?;
    if k == 0 {
        cpu::zero_unless_accumulating(m, n, dst, accumulate);
        return Ok(());
    }
    let c = DstPtr(dst.data[dst.off..].as_mut_ptr());
    // SAFETY: the views were checked above for these m, n, k and strides, `isa` and
    // `rhs.rs == 1` too; `dst` is borrowed mutably.
    unsafe {
        run(
            isa,
            m,
            n,
            k,
            c,
            dst.rs,
            accumulate,
            &lhs,
            &WeightRows::of(&rhs),
            parallel,
        )
    };
    Ok(())
}

/// `dst[m×n] = lhs · rhs` into a fresh row-major buffer of exactly `m·n` values that
/// nothing has written yet (every value written, none read), returned initialised: this
/// kernel from `min_rows` rows (see [`takes`]), [`cpu::gemm_fresh`] otherwise. `parallel`
/// splits the product over the kernel pool (callers already inside a parallel region pass
/// `false`); the result does not depend on it. The f32 linear layers' forward
/// (`matmul::f32_linear`) and the experts' products (`moe`).
///
/// `min_rows`: above [`cpu::GEMV_ROWS`] keeps the GEMV for decode, so that a decode row's
/// result does not depend on the rows decoded with it; an expert's share of a larger
/// forward (a prefill or a training step) starts at [`share_min_rows`] — the rows are
/// independent of each other here too, and a forward and its recompute take the same path.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_fresh<'a>(
    min_rows: usize,
    m: usize,
    n: usize,
    k: usize,
    dst: &'a mut [std::mem::MaybeUninit<f32>],
    lhs: MatRef<'_>,
    rhs: MatRef<'_>,
    parallel: bool,
) -> Result<&'a mut [f32]> {
    let isa = match Isa::detect() {
        Some(isa) if takes(min_rows, m, &rhs) && m > 0 && n > 0 && k > 0 => isa,
        _ => return cpu::gemm_fresh(m, n, k, dst, lhs, rhs, 1.0, parallel),
    };
    cpu::check_operands(m, n, k, &lhs, &rhs, dst.len() == m * n)?;
    let c = DstPtr(dst.as_mut_ptr().cast::<f32>());
    // SAFETY: the operands were checked above and `dst` holds `m·n` values (row stride
    // `n`), which the kernel writes without reading (not accumulating); the CPU has `isa`
    // and `takes` saw `rhs.rs == 1`; `m, n, k > 0`.
    unsafe {
        run(
            isa,
            m,
            n,
            k,
            c,
            n,
            false,
            &lhs,
            &WeightRows::of(&rhs),
            parallel,
        )
    };
    // SAFETY: every value was written above.
    Ok(unsafe { cpu::assume_init_mut(dst) })
}

/// [`gemm_fresh`] into a new vector of `m·n` values (row-major), split over the pool.
pub(crate) fn gemm_new(
    min_rows: usize,
    m: usize,
    n: usize,
    k: usize,
    lhs: MatRef<'_>,
    rhs: MatRef<'_>,
) -> Result<Vec<f32>> {
    let mut out = cpu::uninit_f32(m * n);
    gemm_fresh(min_rows, m, n, k, &mut out, lhs, rhs, true)?;
    // SAFETY: `gemm_fresh` wrote every value (it returned without error).
    Ok(unsafe { out.assume_init() }.into_vec())
}

/// `dst[m×n] = x[m×k] · W[n×k]ᵀ` for a row-major bf16 weight `W` and f32 activations `x`
/// (row-major), into a buffer of exactly `m·n` values that nothing has written yet, returned
/// initialised: the kernel with each weight tile widened to f32 as it is copied, for CPUs
/// without bf16 dot products ([`super::bf16`]'s products from [`takes_rows`]). The f32
/// product of the widened operands, each output one FMA chain over `k` in order.
#[allow(clippy::too_many_arguments)]
pub(crate) fn bf16_weight_fresh<'a>(
    m: usize,
    n: usize,
    k: usize,
    x: &[f32],
    w: &[bf16],
    dst: &'a mut [std::mem::MaybeUninit<f32>],
    parallel: bool,
) -> Result<&'a mut [f32]> {
    let Some(isa) = Isa::detect() else {
        return Err(super::KernelError::Internal(format!(
            "sgemm: the bf16-weight product needs AVX2 + FMA (this CPU: {:?})",
            cpu::simd_level()
        ))
        .into());
    };
    if x.len() < m * k || w.len() < n * k || dst.len() != m * n {
        return Err(super::KernelError::Internal(format!(
            "sgemm: bf16-weight product of m={m}, n={n}, k={k} over buffers of {} / {} / {} \
             values",
            x.len(),
            w.len(),
            dst.len()
        ))
        .into());
    }
    if m == 0 || n == 0 || k == 0 {
        for v in dst.iter_mut() {
            v.write(0.0);
        }
        // SAFETY: every value was written just above.
        return Ok(unsafe { cpu::assume_init_mut(dst) });
    }
    let lhs = MatRef::rows(x, 0, k);
    let c = DstPtr(dst.as_mut_ptr().cast::<f32>());
    let rhs = WeightRows::Bf16 { data: w, ldw: k };
    // SAFETY: `x` holds `m × k` values (row stride `k`), `w` `n` rows of `k`, `dst` `m·n`
    // values (row stride `n`) written without reading; the CPU has `isa`; `m, n, k > 0`.
    unsafe { run(isa, m, n, k, c, n, false, &lhs, &rhs, parallel) };
    // SAFETY: every value was written above.
    Ok(unsafe { cpu::assume_init_mut(dst) })
}

/// The product over the weight rows, split across the pool when `parallel` and large.
///
/// # Safety
/// As [`block`] for all columns `0..n`: the CPU has `isa`, `rhs.rs == 1`, the views hold
/// the whole product, `c` (row stride `ldc`) holds `m` rows of `n` values and nobody else
/// accesses them meanwhile; `m, n, k > 0`.
#[allow(clippy::too_many_arguments)]
unsafe fn run(
    isa: Isa,
    m: usize,
    n: usize,
    k: usize,
    c: DstPtr,
    ldc: usize,
    accumulate: bool,
    lhs: &MatRef<'_>,
    rhs: &WeightRows<'_>,
    parallel: bool,
) {
    let threads = if parallel && m * n * k >= MIN_PARALLEL_WORK {
        cpu::num_threads()
    } else {
        1
    };
    let blocks = split(n, threads, isa.mr());
    let task = |t: usize| {
        let (n0, n1) = blocks[t];
        // SAFETY: the caller's conditions, and the blocks are disjoint column ranges of
        // the destination, so no two threads write the same element.
        unsafe { block(isa, m, n0, n1, k, c, ldc, accumulate, lhs, rhs) }
    };
    if blocks.len() == 1 {
        task(0);
    } else {
        cpu::par_map(blocks.len(), m * n * k, task);
    }
}

/// Splits the `n` weight rows into at most `threads` ranges `(n0, n1)` of whole tiles of
/// `mr` rows.
fn split(n: usize, threads: usize, mr: usize) -> Vec<(usize, usize)> {
    let tiles = n.div_ceil(mr);
    let per = tiles.div_ceil(threads.clamp(1, tiles)) * mr;
    (0..n)
        .step_by(per)
        .map(|n0| (n0, (n0 + per).min(n)))
        .collect()
}

thread_local! {
    /// The packed `lhs` and the weight tile's copy, kept for the thread (the pool's
    /// threads live for the process), so a product does not page in fresh memory.
    static PACKED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Columns `n0..n1` (weight rows) of the product, all `m` rows, on this thread.
///
/// # Safety
/// The CPU must have `isa`, `rhs.rs == 1`, the views must hold the whole `m×k` / `k×n`
/// product (see [`cpu::check_views`]), `c` must point at element `(0, 0)` of a destination
/// with row stride `ldc` holding columns `n0..n1` of `m` rows, and nobody else may access
/// those columns meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn block(
    isa: Isa,
    m: usize,
    n0: usize,
    n1: usize,
    k: usize,
    c: DstPtr,
    ldc: usize,
    accumulate: bool,
    lhs: &MatRef<'_>,
    rhs: &WeightRows<'_>,
) {
    PACKED.with(|packed| {
        let buf = &mut *packed.borrow_mut();
        let (mr, nr) = (isa.mr(), isa.nr());
        let panels = m.div_ceil(nr);
        let ldt = k + TILE_PAD;
        if buf.len() < panels * nr * k + 2 * mr * ldt {
            buf.resize(panels * nr * k + 2 * mr * ldt, 0.0);
        }
        let (xbuf, tbufs) = buf.split_at_mut(panels * nr * k);
        pack_lhs_transposed(isa, lhs, m, k, xbuf);
        // the first weight row and the row stride where the weight is f32 (the assembly
        // tile's copy ahead reads those)
        let f32_rows = rhs.f32_rows();
        let contiguous = matches!(f32_rows, Some((_, ldw)) if ldw == k);
        let row_lines = rhs.row_lines(k);
        // Row panels in groups whose packed `lhs` stays in L2 while every weight tile
        // passes over them (see [`GROUP_BYTES`]).
        let group = (GROUP_BYTES / (nr * k * 4)).max(1);
        for g0 in (0..panels).step_by(group) {
            // the group's panels
            let gp = group.min(panels - g0);
            // the tile's copy and the next one's: `tbufs[cur * MR * ldt..]` holds this tile
            let mut cur = 0;
            // whether the previous tile's first panel copied this tile already
            let mut copied = false;
            // Weight tile outer, the group's row panels inner: the tile's weight rows,
            // copied `TILE_PAD` apart (see there), stay in cache (L1 up to `k = 512`, L2
            // above) while every panel of the group passes.
            for j in (n0..n1).step_by(mr) {
                let cols = mr.min(n1 - j);
                let (first, second) = tbufs.split_at_mut(mr * ldt);
                let (tbuf, next_buf) = if cur == 0 {
                    (first, second)
                } else {
                    (second, first)
                };
                if !copied {
                    for (r, dst) in tbuf.chunks_exact_mut(ldt).take(cols).enumerate() {
                        rhs.copy_row(j + r, k, dst);
                    }
                }
                let wp = tbuf.as_ptr();
                // The next tile's rows come cold from memory in a forward. Where the first
                // panel runs the assembly tile and the next tile is twelve contiguous rows,
                // that tile copies them (asking for the lines after them as it goes), in the
                // slots its multiply-adds leave free; otherwise they are asked for ahead: with
                // few panels (an expert's share) from inside the first panel's tile, three
                // lines every four steps, else (and always on AVX2) a share of the lines
                // before each panel.
                let first_asm = isa == Isa::Avx512 && cols == MR && m - g0 * nr > 16;
                let copy = first_asm && j + 2 * MR <= n1 && contiguous && k.is_multiple_of(16);
                let next_lines = mr.min(n1.saturating_sub(j + mr)) * row_lines;
                let in_tile =
                    !copy && next_lines > 0 && first_asm && gp <= AHEAD_IN_TILE_PANELS && contiguous;
                let next_lines = if in_tile || copy { 0 } else { next_lines };
                let (mut row, mut line) = (j + mr, 0);
                for ip in 0..gp {
                    let ahead = match (ip, f32_rows, copy, in_tile) {
                        (0, Some((w, ldw)), true, _) => Ahead::Copy {
                            src: w.add((j + MR) * ldw),
                            dst: next_buf.as_mut_ptr(),
                        },
                        (0, Some((w, ldw)), _, true) => Ahead::Prefetch(w.wrapping_add((j + MR) * ldw)),
                        _ => Ahead::None,
                    };
                    for _ in ip * next_lines / gp..(ip + 1) * next_lines / gp {
                        prefetch_l2(rhs.line(row, line));
                        line += 1;
                        if line == row_lines {
                            (row, line) = (row + 1, 0);
                        }
                    }
                    let i = (g0 + ip) * nr;
                    let rows = nr.min(m - i);
                    let xp = xbuf.as_ptr().add((g0 + ip) * nr * k);
                    let cp = c.0.add(i * ldc + j);
                    // A last panel of at most one vector of rows takes the one-vector tile.
                    macro_rules! tile {
                        ($kernel:ident, $v:literal; $($r:literal)*) => {
                            match cols {
                                $($r => $kernel::<$r, $v>(k, xp, wp, ldt, cp, ldc, rows, accumulate, ahead),)*
                                _ => unreachable!("tile columns {cols} > {mr}"),
                            }
                        };
                    }
                    match isa {
                        Isa::Avx512 if rows > 16 => tile!(kernel, 2; 1 2 3 4 5 6 7 8 9 10 11 12),
                        Isa::Avx512 => tile!(kernel, 1; 1 2 3 4 5 6 7 8 9 10 11 12),
                        Isa::Avx2 if rows > 8 => tile!(kernel_avx2, 2; 1 2 3 4 5 6),
                        Isa::Avx2 => tile!(kernel_avx2, 1; 1 2 3 4 5 6),
                    }
                }
                copied = copy;
                if copy {
                    cur = 1 - cur;
                }
            }
        }
    })
}

/// Asks for the cache line at `p` to be brought into L2 (no fault, no effect elsewhere).
#[inline(always)]
fn prefetch_l2(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch never faults and changes no state but the caches.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(p as *const i8)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Packs the `m × k` `lhs` as panels of `nr` rows (the tile's, [`Isa::nr`]), each `k`
/// groups of `nr` values (`panel[p·nr + i] = lhs[ip·nr + i, p]`, rows past `m` zero).
/// Row-major `lhs` goes through register transposes, 16 rows × 16 columns at a time on
/// AVX-512, 8 × 8 on AVX2 (a scalar strided pack was 6 % of a medium prefill once every
/// expert product ran here); the last columns short of a block and other layouts are
/// copied one value at a time.
fn pack_lhs_transposed(isa: Isa, lhs: &MatRef<'_>, m: usize, k: usize, out: &mut [f32]) {
    let nr = isa.nr();
    // the transpose's block edge: a vector of the instruction set
    let edge = match isa {
        Isa::Avx512 => 16,
        Isa::Avx2 => 8,
    };
    // whole `edge × edge` blocks of columns, where `lhs` rows are contiguous (the callers
    // of `block` checked that the CPU has `isa`)
    let blocks = if lhs.cs == 1 && cfg!(target_arch = "x86_64") {
        k / edge
    } else {
        0
    };
    for (ip, i) in (0..m).step_by(nr).enumerate() {
        let rows = nr.min(m - i);
        let panel = &mut out[ip * nr * k..(ip + 1) * nr * k];
        if rows < nr {
            panel.fill(0.0);
        }
        #[cfg(target_arch = "x86_64")]
        if blocks > 0 {
            // rows past `m` read zeros (only a last panel of `rows % edge != 0` rows
            // allocates)
            let zeros = vec![
                0u32;
                if rows.is_multiple_of(edge) {
                    0
                } else {
                    edge * blocks
                }
            ];
            for part in (0..rows).step_by(edge) {
                let base = |c: usize| {
                    let r = part + c;
                    if r < rows {
                        lhs.data[lhs.off + (i + r) * lhs.rs..].as_ptr() as *const u32
                    } else {
                        zeros.as_ptr()
                    }
                };
                // SAFETY: the CPU has `isa` (see above); each existing row holds
                // `k ≥ edge·blocks` values from its start (the view was bounds-checked for
                // `m × k`), a missing row (only when `rows % edge != 0`) reads `zeros`;
                // the stores `p·nr + part .. + edge` for `p < edge·blocks` lie inside the
                // panel (`nr·k` values, `part + edge ≤ nr`).
                unsafe {
                    let dst = panel.as_mut_ptr().add(part) as *mut u32;
                    match isa {
                        Isa::Avx512 => cpu::transpose_blocks_16x16(base, blocks, dst, nr),
                        Isa::Avx2 => cpu::transpose_blocks_8x8(base, blocks, dst, nr),
                    }
                };
            }
        }
        for ii in 0..rows {
            let base = lhs.off + (i + ii) * lhs.rs;
            for p in edge * blocks..k {
                panel[p * nr + ii] = lhs.data[base + p * lhs.cs];
            }
        }
    }
}

/// The `Cᵀ` register tile of [`block`]: columns `0..R` of `C` (weight rows `w + j·ldw`,
/// read in place) times `rows ≤ 16·V` rows of `C` (the packed panel `x`: `k` groups of
/// `NR`), over the whole reduction, from `C` when `load_c`, else from zero.
///
/// # Safety
/// AVX-512F must be available; `x` must hold `k·NR` values, `w` `R` rows of `k` values
/// `ldw` apart; `c` must hold `rows` rows of `R` values `ldc` apart.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
unsafe fn kernel<const R: usize, const V: usize>(
    k: usize,
    x: *const f32,
    w: *const f32,
    ldw: usize,
    c: *mut f32,
    ldc: usize,
    rows: usize,
    load_c: bool,
    ahead: Ahead,
) {
    through_transpose_avx512::<R>(c, ldc, rows, load_c, |t| {
        if R == MR && V == 2 {
            // the whole tile: `t` is its `[12][2][16]` accumulator block
            tile_12x32(k, x, w, ldw, t.as_mut_ptr() as *mut f32, ahead);
        } else if R == MR {
            // a last panel of at most 16 rows: the first 16 values of each `[2][16]` row
            tile_12x16(k, x, w, ldw, t.as_mut_ptr() as *mut f32);
        } else {
            tile::<R, V>(k, x, w, ldw, t);
        }
    });
}

/// Runs a register tile on `Cᵀ`: `C` is row-major and the tiles hold its transpose, so the
/// `rows × R` block at `c` (row stride `ldc`) goes through a small `[R][N]` buffer, loaded
/// from `C` when `load_c` (else zero) and written back after `tile`. The reference of the
/// register-transpose forms the kernels run ([`through_transpose_avx512`],
/// [`through_transpose_avx2`]).
///
/// # Safety
/// `c` must hold `rows ≤ N` rows of `R` values `ldc` apart.
#[cfg(test)]
unsafe fn through_transpose<const R: usize, const N: usize>(
    c: *mut f32,
    ldc: usize,
    rows: usize,
    load_c: bool,
    tile: impl FnOnce(&mut [[f32; N]; R]),
) {
    let mut t = [[0f32; N]; R];
    if load_c {
        for ii in 0..rows {
            for (j, tj) in t.iter_mut().enumerate() {
                tj[ii] = *c.add(ii * ldc + j);
            }
        }
    }
    tile(&mut t);
    for ii in 0..rows {
        for (j, tj) in t.iter().enumerate() {
            *c.add(ii * ldc + j) = tj[ii];
        }
    }
}

/// [`through_transpose`] on AVX-512 for the `[R][NR]` tiles of [`kernel`]: each 16 rows of
/// `C` pass through one register transpose (`R` vectors of the tile, padded with zeros to
/// 16) and masked loads / stores of their `R` values. The scalar loop moved one value at a
/// time with a stride of `ldc`: 14 % of a `12 × 32 × 1024` tile's time, 28 % at `k = 256`
/// (one thread on the Xeon, the tile's operands in cache). Values are only moved, so the
/// bits are [`through_transpose`]'s.
///
/// # Safety
/// AVX-512F must be available; `c` must hold `rows ≤ NR` rows of `R ≤ 16` values `ldc`
/// apart.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn through_transpose_avx512<const R: usize>(
    c: *mut f32,
    ldc: usize,
    rows: usize,
    load_c: bool,
    tile: impl FnOnce(&mut [[f32; NR]; R]),
) {
    use std::arch::x86_64::*;
    let mask: __mmask16 = ((1u32 << R) - 1) as __mmask16;
    let mut t = [[0f32; NR]; R];
    let halves = rows.div_ceil(16);
    if load_c {
        for h in 0..halves {
            let r: [__m512i; 16] = std::array::from_fn(|i| {
                if 16 * h + i < rows {
                    _mm512_castps_si512(_mm512_maskz_loadu_ps(mask, c.add((16 * h + i) * ldc)))
                } else {
                    _mm512_setzero_si512()
                }
            });
            let cols = cpu::transpose_16x16(r);
            for (tj, v) in t.iter_mut().zip(cols) {
                _mm512_storeu_si512(tj.as_mut_ptr().add(16 * h) as *mut _, v);
            }
        }
    }
    tile(&mut t);
    for h in 0..halves {
        let r: [__m512i; 16] = std::array::from_fn(|j| {
            if j < R {
                _mm512_loadu_si512(t[j].as_ptr().add(16 * h) as *const _)
            } else {
                _mm512_setzero_si512()
            }
        });
        for (i, v) in cpu::transpose_16x16(r).iter().enumerate() {
            if 16 * h + i < rows {
                _mm512_mask_storeu_ps(c.add((16 * h + i) * ldc), mask, _mm512_castsi512_ps(*v));
            }
        }
    }
}

/// `t[j][i] += Σ_p w[j·ldw + p] · x[p·NR + i]` for `j < R`, `i < 16·V`, one FMA chain per
/// value over `p` in order: the partial tiles of [`kernel`] (at the right edge of the
/// weight rows, or a last panel of at most 16 rows), and its reference for the full one.
///
/// # Safety
/// As [`kernel`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile<const R: usize, const V: usize>(
    k: usize,
    x: *const f32,
    w: *const f32,
    ldw: usize,
    t: &mut [[f32; NR]; R],
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); V]; R];
    for (acc_j, tj) in acc.iter_mut().zip(t.iter()) {
        for (v, a) in acc_j.iter_mut().enumerate() {
            *a = _mm512_loadu_ps(tj.as_ptr().add(16 * v));
        }
    }
    for p in 0..k {
        let xp = x.add(p * NR);
        let xv: [__m512; V] = std::array::from_fn(|v| _mm512_loadu_ps(xp.add(16 * v)));
        for (j, acc_j) in acc.iter_mut().enumerate() {
            let wj = _mm512_set1_ps(*w.add(j * ldw + p));
            for (v, a) in acc_j.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(wj, xv[v], *a);
            }
        }
    }
    for (acc_j, tj) in acc.iter().zip(t.iter_mut()) {
        for (v, a) in acc_j.iter().enumerate() {
            _mm512_storeu_ps(tj.as_mut_ptr().add(16 * v), *a);
        }
    }
}

/// One step of [`tile_12x32`] at step offset `$u` (0–3 of an unrolled group): the two
/// vectors of `lhs` values, then each weight row broadcast and multiplied into its two
/// accumulators (`zmm2j`, `zmm2j+1`). Rows 0–3 / 4–7 / 8–11 sit at `{a0}` / `{a1}` / `{a2}`
/// plus 0, `ldw`, `2·ldw`, `3·ldw` bytes×4.
#[cfg(target_arch = "x86_64")]
macro_rules! tile_step {
    ($u:literal) => {
        concat!(
            "vmovups zmm24, [{x} + 128*", $u, "]\n",
            "vmovups zmm25, [{x} + 128*", $u, " + 64]\n",
            tile_step!(@row $u, "{a0}", 26, 0, 1),
            tile_step!(@row $u, "{a0} + {l}", 27, 2, 3),
            tile_step!(@row $u, "{a0} + {l}*2", 28, 4, 5),
            tile_step!(@row $u, "{a0} + {l3}", 29, 6, 7),
            tile_step!(@row $u, "{a1}", 26, 8, 9),
            tile_step!(@row $u, "{a1} + {l}", 27, 10, 11),
            tile_step!(@row $u, "{a1} + {l}*2", 28, 12, 13),
            tile_step!(@row $u, "{a1} + {l3}", 29, 14, 15),
            tile_step!(@row $u, "{a2}", 26, 16, 17),
            tile_step!(@row $u, "{a2} + {l}", 27, 18, 19),
            tile_step!(@row $u, "{a2} + {l}*2", 28, 20, 21),
            tile_step!(@row $u, "{a2} + {l3}", 29, 22, 23),
        )
    };
    (@row $u:literal, $at:literal, $b:literal, $lo:literal, $hi:literal) => {
        concat!(
            "vbroadcastss zmm", $b, ", dword ptr [", $at, " + 4*", $u, "]\n",
            "vfmadd231ps zmm", $lo, ", zmm24, zmm", $b, "\n",
            "vfmadd231ps zmm", $hi, ", zmm25, zmm", $b, "\n",
        )
    };
}

/// One line of [`Ahead::Copy`]: ask for the line eight rows further on (the tile after
/// next from row 4 of the next one on: every line is asked for before it is copied), copy
/// the line at `{cs}` to `{cd}`, and at a row's end skip the copy's padding.
#[cfg(target_arch = "x86_64")]
macro_rules! copy_line {
    () => {
        concat!(
            "prefetcht1 [{cs} + {l}*8]\n",
            "vmovups zmm30, [{cs}]\n",
            "vmovups [{cd}], zmm30\n",
            "add {cs}, 64\n",
            "add {cd}, 64\n",
            "dec {cl}\n",
            "jnz 6f\n",
            "add {cd}, 64\n",
            "mov {cl}, {rl}\n",
            "6:\n",
        )
    };
}

/// The body of [`tile_12x32`]: load the accumulators, the steps in groups of four (each
/// group followed by the `$ahead` lines), the remaining steps, store. `$extra` are the
/// operands the `$ahead` lines use.
#[cfg(target_arch = "x86_64")]
macro_rules! tile_12x32_asm {
    ($acc:expr, $x:expr, $w:expr, $ldw:expr, $l:expr, $k:expr;
     [$($ahead:tt)*]; $($extra:tt)*) => {
        std::arch::asm!(
            "vmovups zmm0, [{acc}]", "vmovups zmm1, [{acc} + 64]",
            "vmovups zmm2, [{acc} + 128]", "vmovups zmm3, [{acc} + 192]",
            "vmovups zmm4, [{acc} + 256]", "vmovups zmm5, [{acc} + 320]",
            "vmovups zmm6, [{acc} + 384]", "vmovups zmm7, [{acc} + 448]",
            "vmovups zmm8, [{acc} + 512]", "vmovups zmm9, [{acc} + 576]",
            "vmovups zmm10, [{acc} + 640]", "vmovups zmm11, [{acc} + 704]",
            "vmovups zmm12, [{acc} + 768]", "vmovups zmm13, [{acc} + 832]",
            "vmovups zmm14, [{acc} + 896]", "vmovups zmm15, [{acc} + 960]",
            "vmovups zmm16, [{acc} + 1024]", "vmovups zmm17, [{acc} + 1088]",
            "vmovups zmm18, [{acc} + 1152]", "vmovups zmm19, [{acc} + 1216]",
            "vmovups zmm20, [{acc} + 1280]", "vmovups zmm21, [{acc} + 1344]",
            "vmovups zmm22, [{acc} + 1408]", "vmovups zmm23, [{acc} + 1472]",
            "test {quads}, {quads}",
            "jz 3f",
            "2:",
            tile_step!(0),
            tile_step!(1),
            tile_step!(2),
            tile_step!(3),
            $($ahead)*
            "add {a0}, 16", "add {a1}, 16", "add {a2}, 16", "add {x}, 512",
            "dec {quads}",
            "jnz 2b",
            "3:",
            "test {rest}, {rest}",
            "jz 5f",
            "4:",
            tile_step!(0),
            "add {a0}, 4", "add {a1}, 4", "add {a2}, 4", "add {x}, 128",
            "dec {rest}",
            "jnz 4b",
            "5:",
            "vmovups [{acc}], zmm0", "vmovups [{acc} + 64], zmm1",
            "vmovups [{acc} + 128], zmm2", "vmovups [{acc} + 192], zmm3",
            "vmovups [{acc} + 256], zmm4", "vmovups [{acc} + 320], zmm5",
            "vmovups [{acc} + 384], zmm6", "vmovups [{acc} + 448], zmm7",
            "vmovups [{acc} + 512], zmm8", "vmovups [{acc} + 576], zmm9",
            "vmovups [{acc} + 640], zmm10", "vmovups [{acc} + 704], zmm11",
            "vmovups [{acc} + 768], zmm12", "vmovups [{acc} + 832], zmm13",
            "vmovups [{acc} + 896], zmm14", "vmovups [{acc} + 960], zmm15",
            "vmovups [{acc} + 1024], zmm16", "vmovups [{acc} + 1088], zmm17",
            "vmovups [{acc} + 1152], zmm18", "vmovups [{acc} + 1216], zmm19",
            "vmovups [{acc} + 1280], zmm20", "vmovups [{acc} + 1344], zmm21",
            "vmovups [{acc} + 1408], zmm22", "vmovups [{acc} + 1472], zmm23",
            acc = in(reg) $acc,
            x = inout(reg) $x => _,
            a0 = inout(reg) $w => _,
            a1 = inout(reg) $w.add(4 * $ldw) => _,
            a2 = inout(reg) $w.add(8 * $ldw) => _,
            l = in(reg) $l,
            l3 = in(reg) 3 * $l,
            quads = inout(reg) $k / 4 => _,
            rest = inout(reg) $k % 4 => _,
            $($extra)*
            out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _,
            out("zmm4") _, out("zmm5") _, out("zmm6") _, out("zmm7") _,
            out("zmm8") _, out("zmm9") _, out("zmm10") _, out("zmm11") _,
            out("zmm12") _, out("zmm13") _, out("zmm14") _, out("zmm15") _,
            out("zmm16") _, out("zmm17") _, out("zmm18") _, out("zmm19") _,
            out("zmm20") _, out("zmm21") _, out("zmm22") _, out("zmm23") _,
            out("zmm24") _, out("zmm25") _, out("zmm26") _, out("zmm27") _,
            out("zmm28") _, out("zmm29") _,
            options(nostack),
        )
    };
}

/// The full tile of [`kernel`] (12 weight rows × 32 rows of `lhs`) in assembly: `acc`
/// (`[12][2][16]` values) plus the product over `k` steps. Compiled from intrinsics
/// ([`tile`]), the twelve rows `ldw` apart cost about one address add per broadcast, on
/// the FMA ports on Intel cores; here three row pointers, `ldw` and `3·ldw` address all
/// twelve, four steps per loop (one thread on the Xeon, `step_shapes`: 108 → 132, 127 →
/// 143, 131 → 152 GFLOP/s at 32 / 64 / 128 rows of the small config's gate/up product).
/// The same arithmetic as [`tile`]: one FMA per value and step, in order (tested equal
/// bit for bit). With `ahead`, the run also asks for the lines from there on into L2 (see
/// [`block`]); a prefetch never faults, so any address will do.
///
/// # Safety
/// AVX-512F; `x` must hold `k·NR` values, `w` 12 rows of `k` values `ldw` apart, `acc` 384
/// values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_12x32(
    k: usize,
    x: *const f32,
    w: *const f32,
    ldw: usize,
    acc: *mut f32,
    ahead: Ahead,
) {
    let l = ldw * 4;
    match ahead {
        // three lines a group of four steps: `12·k/16` lines over `k/4` groups, the next
        // tile's rows exactly when they are contiguous
        Ahead::Prefetch(pf) => tile_12x32_asm!(
            acc, x, w, ldw, l, k;
            [
                "prefetcht1 [{pf}]",
                "prefetcht1 [{pf} + 64]",
                "prefetcht1 [{pf} + 128]",
                "add {pf}, 192",
            ];
            pf = inout(reg) pf => _,
        ),
        Ahead::Copy { src, dst } => {
            debug_assert!(k.is_multiple_of(16));
            let row_lines = k / 16;
            tile_12x32_asm!(
                acc, x, w, ldw, l, k;
                [copy_line!(), copy_line!(), copy_line!(),];
                cs = inout(reg) src => _,
                cd = inout(reg) dst => _,
                cl = inout(reg) row_lines => _,
                rl = in(reg) row_lines,
                out("zmm30") _,
            )
        }
        Ahead::None => tile_12x32_asm!(acc, x, w, ldw, l, k; [];),
    }
}

/// One step of [`tile_12x16`] at step offset `$u`: the vector of `lhs` values, then each
/// weight row's value broadcast by its multiply-add's own memory operand (`{1to16}`) into
/// its accumulator `zmmj`. Rows as in [`tile_step`].
#[cfg(target_arch = "x86_64")]
macro_rules! tile16_step {
    ($u:literal) => {
        concat!(
            "vmovups zmm24, [{x} + 128*", $u, "]\n",
            tile16_step!(@row $u, "{a0}", 0),
            tile16_step!(@row $u, "{a0} + {l}", 1),
            tile16_step!(@row $u, "{a0} + {l}*2", 2),
            tile16_step!(@row $u, "{a0} + {l3}", 3),
            tile16_step!(@row $u, "{a1}", 4),
            tile16_step!(@row $u, "{a1} + {l}", 5),
            tile16_step!(@row $u, "{a1} + {l}*2", 6),
            tile16_step!(@row $u, "{a1} + {l3}", 7),
            tile16_step!(@row $u, "{a2}", 8),
            tile16_step!(@row $u, "{a2} + {l}", 9),
            tile16_step!(@row $u, "{a2} + {l}*2", 10),
            tile16_step!(@row $u, "{a2} + {l3}", 11),
        )
    };
    (@row $u:literal, $at:literal, $acc:literal) => {
        concat!(
            "vfmadd231ps zmm", $acc, ", zmm24, dword ptr [", $at, " + 4*", $u, "]{{1to16}}\n",
        )
    };
}

/// The tile of [`kernel`] for a last panel of at most 16 rows (12 weight rows × one vector
/// of `lhs` rows) in assembly: the first 16 values of each 32-value row of `acc` plus the
/// product over `k` steps. From intrinsics ([`tile`]) each weight value was a broadcast
/// load of its own beside its one multiply-add, plus an address add; here the broadcast
/// rides in the multiply-add's memory operand and three row pointers address the twelve
/// rows, as in [`tile_12x32`]. One thread on the Xeon, operands in cache, 16 rows: 131 /
/// 122 / 121 → 154 / 147 / 145 GFLOP/s at `k` = 256 / 512 / 1024 (the two-vector tile
/// 173–181). The same arithmetic as [`tile`] (tested equal bit for bit).
///
/// # Safety
/// AVX-512F; `x` must hold `k·NR` values, `w` 12 rows of `k` values `ldw` apart, `acc` 384
/// values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_12x16(k: usize, x: *const f32, w: *const f32, ldw: usize, acc: *mut f32) {
    let l = ldw * 4;
    std::arch::asm!(
        "vmovups zmm0, [{acc}]", "vmovups zmm1, [{acc} + 128]",
        "vmovups zmm2, [{acc} + 256]", "vmovups zmm3, [{acc} + 384]",
        "vmovups zmm4, [{acc} + 512]", "vmovups zmm5, [{acc} + 640]",
        "vmovups zmm6, [{acc} + 768]", "vmovups zmm7, [{acc} + 896]",
        "vmovups zmm8, [{acc} + 1024]", "vmovups zmm9, [{acc} + 1152]",
        "vmovups zmm10, [{acc} + 1280]", "vmovups zmm11, [{acc} + 1408]",
        "test {quads}, {quads}",
        "jz 3f",
        "2:",
        tile16_step!(0),
        tile16_step!(1),
        tile16_step!(2),
        tile16_step!(3),
        "add {a0}, 16", "add {a1}, 16", "add {a2}, 16", "add {x}, 512",
        "dec {quads}",
        "jnz 2b",
        "3:",
        "test {rest}, {rest}",
        "jz 5f",
        "4:",
        tile16_step!(0),
        "add {a0}, 4", "add {a1}, 4", "add {a2}, 4", "add {x}, 128",
        "dec {rest}",
        "jnz 4b",
        "5:",
        "vmovups [{acc}], zmm0", "vmovups [{acc} + 128], zmm1",
        "vmovups [{acc} + 256], zmm2", "vmovups [{acc} + 384], zmm3",
        "vmovups [{acc} + 512], zmm4", "vmovups [{acc} + 640], zmm5",
        "vmovups [{acc} + 768], zmm6", "vmovups [{acc} + 896], zmm7",
        "vmovups [{acc} + 1024], zmm8", "vmovups [{acc} + 1152], zmm9",
        "vmovups [{acc} + 1280], zmm10", "vmovups [{acc} + 1408], zmm11",
        acc = in(reg) acc,
        x = inout(reg) x => _,
        a0 = inout(reg) w => _,
        a1 = inout(reg) w.add(4 * ldw) => _,
        a2 = inout(reg) w.add(8 * ldw) => _,
        l = in(reg) l,
        l3 = in(reg) 3 * l,
        quads = inout(reg) k / 4 => _,
        rest = inout(reg) k % 4 => _,
        out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _,
        out("zmm4") _, out("zmm5") _, out("zmm6") _, out("zmm7") _,
        out("zmm8") _, out("zmm9") _, out("zmm10") _, out("zmm11") _,
        out("zmm24") _,
        options(nostack),
    )
}

/// [`kernel`] on AVX2: columns `0..R` (`R ≤ MR_AVX2`) times `rows ≤ 8·V` rows of the
/// packed panel (`k` groups of [`NR_AVX2`]); the full tile in assembly ([`tile_6x16`]),
/// the partial ones in intrinsics ([`tile_avx2`]). `ahead` is unused (the AVX-512 tile's
/// copy).
///
/// # Safety
/// AVX2 and FMA must be available; `x` must hold `k·NR_AVX2` values, `w` `R` rows of `k`
/// values `ldw` apart; `c` must hold `rows` rows of `R` values `ldc` apart.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel_avx2<const R: usize, const V: usize>(
    k: usize,
    x: *const f32,
    w: *const f32,
    ldw: usize,
    c: *mut f32,
    ldc: usize,
    rows: usize,
    load_c: bool,
    _ahead: Ahead,
) {
    through_transpose_avx2::<R>(c, ldc, rows, load_c, |t| {
        if R == MR_AVX2 && V == 2 {
            // the whole tile: `t` is its `[6][2][8]` accumulator block
            tile_6x16(k, x, w, ldw, t.as_mut_ptr() as *mut f32);
        } else {
            tile_avx2::<R, V>(k, x, w, ldw, t);
        }
    });
}

/// [`through_transpose_avx512`] on AVX2 for the `[R][NR_AVX2]` tiles of [`kernel_avx2`]:
/// each 8 rows of `C` pass through one 8 × 8 register transpose and masked loads / stores
/// of their `R` values. Values are only moved, so the bits are [`through_transpose`]'s.
///
/// # Safety
/// AVX2 must be available; `c` must hold `rows ≤ NR_AVX2` rows of `R ≤ 8` values `ldc`
/// apart.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn through_transpose_avx2<const R: usize>(
    c: *mut f32,
    ldc: usize,
    rows: usize,
    load_c: bool,
    tile: impl FnOnce(&mut [[f32; NR_AVX2]; R]),
) {
    use std::arch::x86_64::*;
    // lanes `0..R` set (the sign bit selects a lane of a masked load or store)
    let mask = _mm256_cmpgt_epi32(
        _mm256_set1_epi32(R as i32),
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
    );
    let mut t = [[0f32; NR_AVX2]; R];
    let halves = rows.div_ceil(8);
    if load_c {
        for h in 0..halves {
            let r: [__m256; 8] = std::array::from_fn(|i| {
                if 8 * h + i < rows {
                    _mm256_maskload_ps(c.add((8 * h + i) * ldc), mask)
                } else {
                    _mm256_setzero_ps()
                }
            });
            let cols = cpu::transpose_8x8(r);
            for (tj, v) in t.iter_mut().zip(cols) {
                _mm256_storeu_ps(tj.as_mut_ptr().add(8 * h), v);
            }
        }
    }
    tile(&mut t);
    for h in 0..halves {
        let r: [__m256; 8] = std::array::from_fn(|j| {
            if j < R {
                _mm256_loadu_ps(t[j].as_ptr().add(8 * h))
            } else {
                _mm256_setzero_ps()
            }
        });
        for (i, v) in cpu::transpose_8x8(r).iter().enumerate() {
            if 8 * h + i < rows {
                _mm256_maskstore_ps(c.add((8 * h + i) * ldc), mask, *v);
            }
        }
    }
}

/// [`tile`] on AVX2: `t[j][i] += Σ_p w[j·ldw + p] · x[p·NR_AVX2 + i]` for `j < R`,
/// `i < 8·V`, one FMA chain per value over `p` in order (the same arithmetic as the
/// AVX-512 tiles): the partial tiles of [`kernel_avx2`], and its reference for the full one.
///
/// # Safety
/// As [`kernel_avx2`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2<const R: usize, const V: usize>(
    k: usize,
    x: *const f32,
    w: *const f32,
    ldw: usize,
    t: &mut [[f32; NR_AVX2]; R],
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); V]; R];
    for (acc_j, tj) in acc.iter_mut().zip(t.iter()) {
        for (v, a) in acc_j.iter_mut().enumerate() {
            *a = _mm256_loadu_ps(tj.as_ptr().add(8 * v));
        }
    }
    for p in 0..k {
        let xp = x.add(p * NR_AVX2);
        let xv: [__m256; V] = std::array::from_fn(|v| _mm256_loadu_ps(xp.add(8 * v)));
        for (j, acc_j) in acc.iter_mut().enumerate() {
            let wj = _mm256_broadcast_ss(&*w.add(j * ldw + p));
            for (a, xv) in acc_j.iter_mut().zip(&xv) {
                *a = _mm256_fmadd_ps(wj, *xv, *a);
            }
        }
    }
    for (acc_j, tj) in acc.iter().zip(t.iter_mut()) {
        for (v, a) in acc_j.iter().enumerate() {
            _mm256_storeu_ps(tj.as_mut_ptr().add(8 * v), *a);
        }
    }
}

/// One step of [`tile_6x16`] at step offset `$u` (0–3 of an unrolled group): the two
/// vectors of `lhs` values, then each weight row broadcast (into `ymm14` and `ymm15` in
/// turn) and multiplied into its two accumulators (`ymm2j`, `ymm2j+1`). Rows 0–2 / 3–5 sit
/// at `{a0}` / `{a1}` plus 0, `ldw`, `2·ldw` values.
#[cfg(target_arch = "x86_64")]
macro_rules! tile_step_avx2 {
    ($u:literal) => {
        concat!(
            "vmovups ymm12, [{x} + 64*", $u, "]\n",
            "vmovups ymm13, [{x} + 64*", $u, " + 32]\n",
            tile_step_avx2!(@row $u, "{a0}", 14, 0, 1),
            tile_step_avx2!(@row $u, "{a0} + {l}", 15, 2, 3),
            tile_step_avx2!(@row $u, "{a0} + {l}*2", 14, 4, 5),
            tile_step_avx2!(@row $u, "{a1}", 15, 6, 7),
            tile_step_avx2!(@row $u, "{a1} + {l}", 14, 8, 9),
            tile_step_avx2!(@row $u, "{a1} + {l}*2", 15, 10, 11),
        )
    };
    (@row $u:literal, $at:literal, $b:literal, $lo:literal, $hi:literal) => {
        concat!(
            "vbroadcastss ymm", $b, ", dword ptr [", $at, " + 4*", $u, "]\n",
            "vfmadd231ps ymm", $lo, ", ymm12, ymm", $b, "\n",
            "vfmadd231ps ymm", $hi, ", ymm13, ymm", $b, "\n",
        )
    };
}

/// The full tile of [`kernel_avx2`] (6 weight rows × 16 rows of `lhs`) in assembly: `acc`
/// (`[6][2][8]` values) plus the product over `k` steps, four steps a loop, two row
/// pointers with `ldw` and `2·ldw` addressing all six (compiled from intrinsics, the loop
/// recomputed row addresses with three integer ops a step beside its 12 FMAs). The same
/// arithmetic as [`tile_avx2`] (tested equal bit for bit).
///
/// # Safety
/// AVX2 and FMA; `x` must hold `k·NR_AVX2` values, `w` 6 rows of `k` values `ldw` apart,
/// `acc` 96 values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_6x16(k: usize, x: *const f32, w: *const f32, ldw: usize, acc: *mut f32) {
    std::arch::asm!(
        "vmovups ymm0, [{acc}]", "vmovups ymm1, [{acc} + 32]",
        "vmovups ymm2, [{acc} + 64]", "vmovups ymm3, [{acc} + 96]",
        "vmovups ymm4, [{acc} + 128]", "vmovups ymm5, [{acc} + 160]",
        "vmovups ymm6, [{acc} + 192]", "vmovups ymm7, [{acc} + 224]",
        "vmovups ymm8, [{acc} + 256]", "vmovups ymm9, [{acc} + 288]",
        "vmovups ymm10, [{acc} + 320]", "vmovups ymm11, [{acc} + 352]",
        "test {quads}, {quads}",
        "jz 3f",
        "2:",
        tile_step_avx2!(0),
        tile_step_avx2!(1),
        tile_step_avx2!(2),
        tile_step_avx2!(3),
        "add {a0}, 16", "add {a1}, 16", "add {x}, 256",
        "dec {quads}",
        "jnz 2b",
        "3:",
        "test {rest}, {rest}",
        "jz 5f",
        "4:",
        tile_step_avx2!(0),
        "add {a0}, 4", "add {a1}, 4", "add {x}, 64",
        "dec {rest}",
        "jnz 4b",
        "5:",
        "vmovups [{acc}], ymm0", "vmovups [{acc} + 32], ymm1",
        "vmovups [{acc} + 64], ymm2", "vmovups [{acc} + 96], ymm3",
        "vmovups [{acc} + 128], ymm4", "vmovups [{acc} + 160], ymm5",
        "vmovups [{acc} + 192], ymm6", "vmovups [{acc} + 224], ymm7",
        "vmovups [{acc} + 256], ymm8", "vmovups [{acc} + 288], ymm9",
        "vmovups [{acc} + 320], ymm10", "vmovups [{acc} + 352], ymm11",
        acc = in(reg) acc,
        x = inout(reg) x => _,
        a0 = inout(reg) w => _,
        a1 = inout(reg) w.add(3 * ldw) => _,
        l = in(reg) ldw * 4,
        quads = inout(reg) k / 4 => _,
        rest = inout(reg) k % 4 => _,
        out("ymm0") _, out("ymm1") _, out("ymm2") _, out("ymm3") _,
        out("ymm4") _, out("ymm5") _, out("ymm6") _, out("ymm7") _,
        out("ymm8") _, out("ymm9") _, out("ymm10") _, out("ymm11") _,
        out("ymm12") _, out("ymm13") _, out("ymm14") _, out("ymm15") _,
        options(nostack),
    )
}

/// Never called: [`takes`] is false off x86-64 (no AVX2), so [`gemm_fresh`] delegates.
#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_avx2<const R: usize, const V: usize>(
    _k: usize,
    _x: *const f32,
    _w: *const f32,
    _ldw: usize,
    _c: *mut f32,
    _ldc: usize,
    _rows: usize,
    _load_c: bool,
    _ahead: Ahead,
) {
    unreachable!("the AVX2 GEMM runs only where AVX2 was detected")
}

/// Never called: [`takes`] is false off x86-64 (no AVX-512F), so [`gemm_fresh`] delegates.
#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel<const R: usize, const V: usize>(
    _k: usize,
    _x: *const f32,
    _w: *const f32,
    _ldw: usize,
    _c: *mut f32,
    _ldc: usize,
    _rows: usize,
    _load_c: bool,
    _ahead: Ahead,
) {
    unreachable!("the AVX-512 GEMM runs only where AVX-512F was detected")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu::test_data;

    /// A `rows × cols` operand inside a larger buffer: `off` elements before it, rows (or,
    /// transposed, columns) `pad` elements longer than needed.
    struct Operand {
        data: Vec<f32>,
        off: usize,
        rs: usize,
        cs: usize,
    }

    impl Operand {
        fn new(rows: usize, cols: usize, transposed: bool, seed: u32) -> Self {
            let (off, pad) = (5, 3);
            let (rs, cs) = if transposed {
                (1, rows + pad)
            } else {
                (cols + pad, 1)
            };
            let len = off + rows.max(1) * cols.max(1) + pad * rows.max(cols) + 8;
            Operand {
                data: test_data(len, seed),
                off,
                rs,
                cs,
            }
        }
        fn view(&self) -> MatRef<'_> {
            MatRef::new(&self.data, self.off, self.rs, self.cs)
        }
        fn at(&self, r: usize, c: usize) -> f64 {
            self.data[self.off + r * self.rs + c * self.cs] as f64
        }
    }

    /// Runs [`weight_rows`] on `isa` into a destination with padded rows (stride `n + 2`,
    /// offset 1), filled with `init`; returns the whole buffer.
    #[allow(clippy::too_many_arguments)]
    fn run(
        isa: Isa,
        m: usize,
        n: usize,
        k: usize,
        a: &Operand,
        b: &Operand,
        accumulate: bool,
        parallel: bool,
    ) -> Vec<f32> {
        let ldc = n + 2;
        let mut c = test_data(1 + m * ldc, 77);
        weight_rows(
            isa,
            m,
            n,
            k,
            MatMut::new(&mut c, 1, ldc),
            accumulate,
            a.view(),
            b.view(),
            parallel,
        )
        .unwrap();
        c
    }

    /// The kernel against an f64 product over odd shapes, 1..200 rows, both layouts of
    /// `lhs`, padded strides and offsets, with and without accumulation, on one thread and
    /// on the pool (bit-identical), and the padding of the destination untouched; on every
    /// instruction set of the CPU, all giving the same bits.
    #[test]
    fn matches_the_f64_product_over_odd_shapes() {
        if Isa::detect().is_none() {
            eprintln!("no AVX2 here: the kernel is not run (gemm is cpu::gemm)");
            return;
        }
        let ms = [
            1, 2, 3, 5, 11, 12, 13, 16, 17, 24, 25, 31, 32, 33, 47, 48, 49, 64, 65, 100, 127, 200,
            300,
        ];
        let ns = [1, 7, 11, 12, 13, 24, 25, 31, 65, 100, 129, 512];
        let ks = [1, 3, 17, 255, 256, 257, 513];
        let mut case = 0usize;
        for (mi, &m) in ms.iter().enumerate() {
            for j in 0..3 {
                let n = ns[(mi * 3 + j) % ns.len()];
                let k = ks[(mi * 2 + j) % ks.len()];
                for ta in [false, true] {
                    let tb = true;
                    case += 1;
                    let accumulate = case.is_multiple_of(2);
                    let a = Operand::new(m, k, ta, case as u32);
                    let b = Operand::new(k, n, tb, 1000 + case as u32);
                    let isas = Isa::available();
                    let serial = run(isas[0], m, n, k, &a, &b, accumulate, false);
                    for &isa in &isas {
                        let pooled = run(isa, m, n, k, &a, &b, accumulate, true);
                        for (i, (s, p)) in serial.iter().zip(&pooled).enumerate() {
                            assert_eq!(
                                s.to_bits(),
                                p.to_bits(),
                                "{isa:?} m={m} n={n} k={k} at {i}"
                            );
                        }
                    }
                    let init = test_data(1 + m * (n + 2), 77);
                    assert_eq!(serial[0], init[0], "element before the destination");
                    for r in 0..m {
                        for col in 0..n + 2 {
                            let idx = 1 + r * (n + 2) + col;
                            if col >= n {
                                if idx < serial.len() {
                                    assert_eq!(serial[idx], init[idx], "padding written");
                                }
                                continue;
                            }
                            let mut want = if accumulate { init[idx] as f64 } else { 0.0 };
                            let mut scale = want.abs();
                            for p in 0..k {
                                want += a.at(r, p) * b.at(p, col);
                                scale += (a.at(r, p) * b.at(p, col)).abs();
                            }
                            let got = serial[idx] as f64;
                            // The rigorous bound of a recursive f32 sum (Higham: γ_k+1 ·
                            // Σ|terms|, unit roundoff 2⁻²⁴): a wrong term is far outside.
                            let bound = (k + 1) as f64 * f64::powi(2.0, -24) * scale;
                            assert!(
                                (got - want).abs() <= bound + 1e-30,
                                "m={m} n={n} k={k} ta={ta} tb={tb} acc={accumulate} \
                                 ({r}, {col}): {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Runs an intrinsics tile (`reference`, on the tile) and its assembly form (`asm`, on
    /// the tile's values through a pointer) from the same starting tile `init` (`[R][N]`,
    /// row by row), asserts the same bits value by value and returns the assembly result.
    fn same_tile<const R: usize, const N: usize>(
        init: &[f32],
        reference: impl FnOnce(&mut [[f32; N]; R]),
        asm: impl FnOnce(*mut f32),
        what: &str,
    ) -> [[f32; N]; R] {
        let mut want = [[0f32; N]; R];
        for (row, chunk) in want.iter_mut().zip(init.chunks(N)) {
            row.copy_from_slice(chunk);
        }
        let mut got = want;
        reference(&mut want);
        asm(got.as_mut_ptr() as *mut f32);
        for (j, (g, e)) in got.iter().zip(&want).enumerate() {
            for (i, (a, b)) in g.iter().zip(e).enumerate() {
                assert_eq!(
                    a.to_bits(),
                    b.to_bits(),
                    "{what}: weight row {j} lhs row {i}"
                );
            }
        }
        got
    }

    /// The assembly tiles (two vectors of `lhs` rows, and one) equal their intrinsics
    /// reference bit for bit: every unroll remainder, a weight row stride longer than the
    /// reduction, a nonzero starting tile.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn the_assembly_tile_equals_the_intrinsics_tile() {
        if cpu::simd_level() != cpu::SimdLevel::Avx512 {
            return;
        }
        for k in [0, 1, 2, 3, 4, 5, 7, 8, 9, 64, 255, 511] {
            let ldw = k + 5;
            let w = test_data(MR * ldw + 3, k as u32 + 1);
            let x = test_data(NR * k.max(1), k as u32 + 100);
            let init = test_data(MR * NR, 7);
            let (xp, wp) = (x.as_ptr(), w[3..].as_ptr());
            let ahead = if k % 2 == 1 {
                Ahead::Prefetch(w.as_ptr())
            } else {
                Ahead::None
            };
            // SAFETY (all four tiles): AVX-512F checked above; `x` holds `k·NR`, `w` 12 rows
            // `ldw` apart starting 3 values in, each tile 384 values.
            let got = same_tile::<MR, NR>(
                &init,
                |t| unsafe { tile::<MR, 2>(k, xp, wp, ldw, t) },
                |t| unsafe { tile_12x32(k, xp, wp, ldw, t, ahead) },
                &format!("k={k}"),
            );
            if k > 0 {
                assert_ne!(got[0], init[..NR], "k={k}: the tile did not move");
            }
            // the one-vector tile: the first 16 values of each row move, the rest do not
            let got = same_tile::<MR, NR>(
                &init,
                |t| unsafe { tile::<MR, 1>(k, xp, wp, ldw, t) },
                |t| unsafe { tile_12x16(k, xp, wp, ldw, t) },
                &format!("k={k} one vector"),
            );
            if k > 0 {
                assert_ne!(
                    got[0][..16],
                    init[..16],
                    "k={k}: the one-vector tile did not move"
                );
                assert_eq!(
                    got[0][16..],
                    init[16..NR],
                    "k={k}: the one-vector tile wrote past 16"
                );
            }
        }
    }

    /// The register-transpose moves of a tile to and from `C` equal the scalar reference bit
    /// for bit, for every tile width and row count, loading `C` or not, leaving the columns
    /// past the tile and the rows past `rows` untouched.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn register_transposes_move_tiles_as_the_scalar_one() {
        let isas = Isa::available();
        macro_rules! check {
            ($simd:ident, $n:expr; $($r:literal)*) => {$({
                const R: usize = $r;
                let ldc = R + 3;
                for rows in [1, 2, 7, 8, 9, 15, 16, 17, 31, 32].into_iter().filter(|&r| r <= $n) {
                    for load_c in [false, true] {
                        let init = test_data(rows * ldc + 5, (R * 64 + rows) as u32);
                        let (mut want, mut got) = (init.clone(), init.clone());
                        let tile = |t: &mut [[f32; $n]; R]| {
                            for (j, tj) in t.iter_mut().enumerate() {
                                for (i, v) in tj.iter_mut().enumerate() {
                                    *v = *v * 2.0 + (100 * j + i) as f32;
                                }
                            }
                        };
                        // SAFETY: the CPU has the ISA (from `Isa::available`); both buffers
                        // hold `rows` rows of `ldc ≥ R` values.
                        unsafe {
                            through_transpose::<R, $n>(want.as_mut_ptr(), ldc, rows, load_c, tile);
                            $simd::<R>(got.as_mut_ptr(), ldc, rows, load_c, tile);
                        }
                        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                            assert_eq!(
                                a.to_bits(),
                                b.to_bits(),
                                "{} R={R} rows={rows} load_c={load_c} at {i}",
                                stringify!($simd)
                            );
                        }
                    }
                }
            })*};
        }
        if isas.contains(&Isa::Avx512) {
            check!(through_transpose_avx512, NR; 1 2 3 4 5 6 7 8 9 10 11 12);
        }
        if isas.contains(&Isa::Avx2) {
            check!(through_transpose_avx2, NR_AVX2; 1 2 3 4 5 6);
        }
    }

    /// [`the_assembly_tile_equals_the_intrinsics_tile`] for the AVX2 tile.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn the_avx2_assembly_tile_equals_the_intrinsics_tile() {
        if Isa::detect().is_none() {
            return;
        }
        for k in [0, 1, 2, 3, 4, 5, 7, 8, 9, 64, 255, 511] {
            let ldw = k + 5;
            let w = test_data(MR_AVX2 * ldw + 3, k as u32 + 1);
            let x = test_data(NR_AVX2 * k.max(1), k as u32 + 100);
            let init = test_data(MR_AVX2 * NR_AVX2, 7);
            let (xp, wp) = (x.as_ptr(), w[3..].as_ptr());
            // SAFETY (both tiles): AVX2 and FMA checked above; `x` holds `k·NR_AVX2`, `w` 6
            // rows `ldw` apart starting 3 values in, each tile 96 values.
            let got = same_tile::<MR_AVX2, NR_AVX2>(
                &init,
                |t| unsafe { tile_avx2::<MR_AVX2, 2>(k, xp, wp, ldw, t) },
                |t| unsafe { tile_6x16(k, xp, wp, ldw, t) },
                &format!("k={k}"),
            );
            if k > 0 {
                assert_ne!(got[0], init[..NR_AVX2], "k={k}: the tile did not move");
            }
        }
    }

    /// A bf16 weight widened as its tiles are copied gives the bits of the f32 product of
    /// the widened weight, over shapes with partial tiles and panels, and an error on
    /// buffers too small.
    #[test]
    fn bf16_weights_give_the_bits_of_their_widened_product() {
        if Isa::detect().is_none() {
            return;
        }
        for (case, &(m, n, k)) in [(1, 1, 1), (5, 7, 9), (33, 50, 130), (70, 13, 512)]
            .iter()
            .enumerate()
        {
            let x = test_data(m * k, 30 + case as u32);
            let w: Vec<bf16> = test_data(n * k, 40 + case as u32)
                .iter()
                .map(|&v| bf16::from_f32(v))
                .collect();
            let wf: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
            let want = gemm_new(
                1,
                m,
                n,
                k,
                MatRef::rows(&x, 0, k),
                MatRef::rows(&wf, 0, k).t(),
            )
            .unwrap();
            let mut out = cpu::uninit_f32(m * n);
            let got = bf16_weight_fresh(m, n, k, &x, &w, &mut out, true).unwrap();
            for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g.to_bits(), e.to_bits(), "m={m} n={n} k={k} at {i}");
            }
        }
        let mut out = cpu::uninit_f32(4);
        let w = [bf16::ZERO; 3];
        assert!(bf16_weight_fresh(2, 2, 2, &[0.0; 4], &w, &mut out, false).is_err());
    }

    /// A row of the product does not depend on the other rows (the batch invariance): rows
    /// 3..m−2 computed alone equal the same rows of the whole product, bit for bit.
    #[test]
    fn rows_do_not_depend_on_the_other_rows() {
        if Isa::detect().is_none() {
            return;
        }
        let (m, n, k) = (77, 70, 600);
        for ta in [false, true] {
            let a = Operand::new(m, k, ta, 1);
            let b = Operand::new(k, n, true, 2);
            let mut whole = cpu::uninit_f32(m * n);
            let whole = gemm_fresh(
                cpu::GEMV_ROWS + 1,
                m,
                n,
                k,
                &mut whole,
                a.view(),
                b.view(),
                true,
            )
            .unwrap();
            let sub = m - 5;
            let mut part = cpu::uninit_f32(sub * n);
            let a_sub = MatRef::new(&a.data, a.off + 3 * a.rs, a.rs, a.cs);
            let part = gemm_fresh(
                cpu::GEMV_ROWS + 1,
                sub,
                n,
                k,
                &mut part,
                a_sub,
                b.view(),
                true,
            )
            .unwrap();
            for (x, y) in part.iter().zip(&whole[3 * n..(3 + sub) * n]) {
                assert_eq!(x.to_bits(), y.to_bits());
            }
        }
    }

    /// Tiles copied by the tile before them (weight rows contiguous, `k` a multiple of 16,
    /// more than 16 rows) give each row the bits of that row alone (one row never takes
    /// the assembly tile nor the copy): a misplaced line or a missed row padding fails it.
    #[test]
    fn tiles_copied_ahead_give_the_bits_of_a_row_alone() {
        for isa in Isa::available() {
            tiles_copied_ahead_on(isa);
        }
    }

    fn tiles_copied_ahead_on(isa: Isa) {
        for (case, &(m, n, k)) in [
            (17, 24, 16),
            (40, 100, 512),
            (33, 49, 1024),
            (100, 36, 256),
            (200, 61, 64),
        ]
        .iter()
        .enumerate()
        {
            let a = Operand::new(m, k, false, 10 + case as u32);
            // a weight `[n, k]` whose rows follow each other, as the copy needs
            let weight = test_data(n * k, 20 + case as u32);
            let b = MatRef::rows(&weight, 0, k).t();
            for parallel in [false, true] {
                let mut whole = vec![0f32; m * n];
                let dst = MatMut::new(&mut whole, 0, n);
                weight_rows(isa, m, n, k, dst, false, a.view(), b, parallel).unwrap();
                for i in 0..m {
                    let mut row = vec![0f32; n];
                    let lhs = MatRef::new(&a.data, a.off + i * a.rs, a.rs, a.cs);
                    let dst = MatMut::new(&mut row, 0, n);
                    weight_rows(isa, 1, n, k, dst, false, lhs, b, false).unwrap();
                    for (j, (x, y)) in row.iter().zip(&whole[i * n..(i + 1) * n]).enumerate() {
                        assert_eq!(
                            x.to_bits(),
                            y.to_bits(),
                            "{isa:?} m={m} n={n} k={k} parallel={parallel}: row {i} column {j}"
                        );
                    }
                }
            }
        }
    }

    /// Which products the kernel takes; the others are [`cpu::gemm`]'s.
    #[test]
    fn takes_few_rows_against_a_weight_transpose() {
        let w = vec![0f32; 4];
        let wt = MatRef::rows(&w, 0, 2).t();
        let plain = MatRef::rows(&w, 0, 2);
        let avx2 = Isa::detect().is_some();
        let above_gemv = |m: usize, rhs: &MatRef<'_>| takes(cpu::GEMV_ROWS + 1, m, rhs);
        assert_eq!(above_gemv(cpu::GEMV_ROWS + 1, &wt), avx2);
        assert_eq!(above_gemv(4096, &wt), avx2, "busy experts stay here");
        assert!(
            !above_gemv(cpu::GEMV_ROWS, &wt),
            "GEMV rows stay on cpu::gemm"
        );
        assert!(
            !above_gemv(64, &plain),
            "a row-major rhs stays on cpu::gemm"
        );
        let share = share_min_rows();
        assert_eq!(takes(share, share, &wt), avx2);
        assert!(!takes(share, share - 1, &wt));
    }

    #[test]
    fn empty_reduction_and_bad_views() {
        for isa in Isa::available() {
            empty_reduction_and_bad_views_on(isa);
        }
    }

    fn empty_reduction_and_bad_views_on(isa: Isa) {
        let a = vec![1f32; 6];
        let mut c = vec![5f32; 4];
        let wt = MatRef::rows(&a, 0, 3).t();
        weight_rows(
            isa,
            2,
            2,
            0,
            MatMut::new(&mut c, 0, 2),
            true,
            MatRef::rows(&a, 0, 0),
            wt,
            false,
        )
        .unwrap();
        assert_eq!(c, vec![5.0; 4], "k = 0 accumulates nothing");
        weight_rows(
            isa,
            2,
            2,
            0,
            MatMut::new(&mut c, 0, 2),
            false,
            MatRef::rows(&a, 0, 0),
            wt,
            false,
        )
        .unwrap();
        assert_eq!(c, vec![0.0; 4], "k = 0 without accumulating is zero");
        weight_rows(
            isa,
            2,
            2,
            3,
            MatMut::new(&mut c, 0, 2),
            false,
            MatRef::rows(&a, 0, 3),
            wt,
            false,
        )
        .unwrap();
        assert_eq!(c, vec![3.0; 4]);
        // Wᵀ of 2 rows of 3 does not fit in 6 elements at offset 1
        let bad = weight_rows(
            isa,
            2,
            2,
            3,
            MatMut::new(&mut c, 0, 2),
            false,
            MatRef::rows(&a, 0, 3),
            MatRef::rows(&a, 1, 3).t(),
            false,
        );
        assert!(bad.is_err());
        // destination rows overlapping
        let bad = weight_rows(
            isa,
            2,
            2,
            1,
            MatMut::new(&mut c, 0, 1),
            false,
            MatRef::rows(&a, 0, 1),
            MatRef::rows(&a, 0, 1).t(),
            false,
        );
        assert!(bad.is_err());
        // a row-major rhs is not the kernel's
        let bad = weight_rows(
            isa,
            2,
            2,
            2,
            MatMut::new(&mut c, 0, 2),
            false,
            MatRef::rows(&a, 0, 2),
            MatRef::rows(&a, 0, 2),
            false,
        );
        assert!(bad.is_err());
    }

    /// An expert's share of a prefill against weights read from memory (eight 8 MiB gate/up
    /// weights of the medium config in turn, more than the L3), the GEMV of [`cpu::gemm`]
    /// against this kernel, as GB/s of weight (the floor is the machine's read bandwidth):
    /// where [`share_min_rows`] should sit for cold weights. `cargo test --release -p zaya
    /// --lib sgemm::tests::expert_share_speed -- --ignored --nocapture`
    #[test]
    #[ignore = "timing, not a check"]
    fn expert_share_speed() {
        let Some(isa) = Isa::detect() else {
            return;
        };
        println!("{isa:?}");
        let best = |f: &mut dyn FnMut()| cpu::best_seconds(3, f);
        println!("threads: {}", cpu::num_threads());
        let (k, n, experts) = (1024, 2048, 8);
        let w = test_data(experts * n * k, 5);
        let gb = (experts * n * k * 4) as f64 / 1e9;
        for m in [2, 4, 6, 8, 10, 12, 16, 24] {
            let x = test_data(m * k, 3);
            let mut out = vec![0f32; m * n];
            let mut run = |ours: bool| {
                best(&mut || {
                    cpu::in_pool(|| {
                        for e in w.chunks(n * k) {
                            let (dst, lhs) = (MatMut::new(&mut out, 0, n), MatRef::rows(&x, 0, k));
                            let rhs = MatRef::rows(e, 0, k).t();
                            if ours {
                                weight_rows(isa, m, n, k, dst, false, lhs, rhs, true).unwrap()
                            } else {
                                cpu::gemm(m, n, k, dst, false, lhs, rhs, 1.0, true).unwrap()
                            }
                        }
                    })
                })
            };
            let (tg, ts) = (run(false), run(true));
            println!(
                "m={m:<2} k={k} n={n}: GEMV {:.1} GB/s {:.0} GFLOP/s, sgemm {:.1} GB/s {:.0} GFLOP/s",
                gb / tg,
                gb * m as f64 / 2.0 / tg,
                gb / ts,
                gb * m as f64 / 2.0 / ts
            );
        }
    }

    /// Expert shares against weights read from memory (sixteen 8 / 4 MiB medium experts in
    /// turn, more than the L3) and against one expert's weights over and over (in cache),
    /// GFLOP/s: what reading the weights still costs at each share size. `cargo test
    /// --release -p zaya --lib sgemm::tests::cold_expert_shares -- --ignored --nocapture`
    #[test]
    #[ignore = "timing, not a check"]
    fn cold_expert_shares() {
        let Some(isa) = Isa::detect() else {
            return;
        };
        println!("{isa:?}");
        let best = |f: &mut dyn FnMut()| cpu::best_seconds(3, f);
        println!("threads: {}", cpu::num_threads());
        let experts = 16;
        for (k, n) in [(1024, 2048), (1024, 1024)] {
            let w = test_data(experts * n * k, 5);
            for m in [24, 32, 40, 64, 96, 128, 256, 512] {
                let x = test_data(m * k, 3);
                let mut out = vec![0f32; m * n];
                let mut run = |cold: bool| {
                    best(&mut || {
                        cpu::in_pool(|| {
                            for e in 0..experts {
                                let e = if cold { e } else { 0 };
                                let weight = &w[e * n * k..(e + 1) * n * k];
                                let dst = MatMut::new(&mut out, 0, n);
                                let (lhs, rhs) =
                                    (MatRef::rows(&x, 0, k), MatRef::rows(weight, 0, k).t());
                                weight_rows(isa, m, n, k, dst, false, lhs, rhs, true).unwrap()
                            }
                        })
                    })
                };
                let flop = 2.0 * (experts * m * n * k) as f64 / 1e9;
                let (cold, warm) = (run(true), run(false));
                println!(
                    "m={m:<3} k={k} n={n}: cold {:.0} GFLOP/s, warm {:.0} GFLOP/s",
                    flop / cold,
                    flop / warm
                );
            }
        }
    }

    /// GFLOP/s of the training step's product classes (small config: H = I = 512, 32000
    /// vocabulary, batch 4 × 256, a few dozen rows per expert; `ZAYA_STEP_SHAPES=medium`:
    /// H = I = 1024, where a weight's rows are 4 KiB apart), this kernel (where the
    /// right operand is a weight's transpose) against [`cpu::gemm`], one thread and the
    /// pool: `cargo test --release -p zaya --lib sgemm::tests::step_shapes -- --ignored
    /// --nocapture`
    #[test]
    #[ignore = "timing, not a check"]
    fn step_shapes() {
        let Some(isa) = Isa::detect() else {
            return;
        };
        println!("{isa:?}");
        let best = |f: &mut dyn FnMut()| cpu::best_seconds(10, f);
        let (h, i, v, t) = match std::env::var("ZAYA_STEP_SHAPES").as_deref() {
            Ok("medium") => (1024, 1024, 32000, 512),
            _ => (512, 512, 32000, 1024),
        };
        println!("threads: {}", cpu::num_threads());
        // (label, m, n, k, lhs transposed, rhs transposed)
        let mut classes = vec![
            ("attn proj x·Wᵀ", t, h, h, false, true),
            ("attn proj dx g·W", t, h, h, false, false),
            ("attn proj dW gᵀ·x", h, h, t, true, false),
            ("lm_head chunk y·Wᵀ", 512, v, h, false, true),
            ("lm_head dy g·W", 512, h, v, false, false),
            ("lm_head dW gᵀ·y", v, h, 512, true, false),
        ];
        for r in [8, 12, 16, 24, 32, 33, 48, 64, 100, 128, 200] {
            classes.extend([
                ("expert gate_up x·Wguᵀ", r, 2 * i, h, false, true),
                ("expert down act·Wdᵀ", r, h, i, false, true),
                ("expert dact dy·Wd", r, i, h, false, false),
                ("expert dx dgu·Wgu", r, h, 2 * i, false, false),
                ("expert dWd dyᵀ·act", h, i, r, true, false),
                ("expert dWgu dguᵀ·x", 2 * i, h, r, true, false),
            ]);
        }
        for (label, m, n, k, ta, tb) in classes {
            let a = Operand::new(m, k, ta, 1);
            let b = Operand::new(k, n, tb, 2);
            let mut c = vec![0f32; m * n];
            let flop = 2.0 * (m * n * k) as f64 / 1e9;
            let mut line = format!("{label:<22} m={m:<5} n={n:<5} k={k:<5}");
            for parallel in [false, true] {
                let ours = tb.then(|| {
                    best(&mut || {
                        cpu::in_pool(|| {
                            weight_rows(
                                isa,
                                m,
                                n,
                                k,
                                MatMut::new(&mut c, 0, n),
                                false,
                                a.view(),
                                b.view(),
                                parallel,
                            )
                            .unwrap()
                        })
                    })
                });
                let theirs = best(&mut || {
                    cpu::in_pool(|| {
                        cpu::gemm(
                            m,
                            n,
                            k,
                            MatMut::new(&mut c, 0, n),
                            false,
                            a.view(),
                            b.view(),
                            1.0,
                            parallel,
                        )
                        .unwrap()
                    })
                });
                let ours = ours.map_or("    -".to_string(), |s| format!("{:>5.0}", flop / s));
                line += &format!(
                    " | {}T: sgemm {ours} cpu::gemm {:>5.0}",
                    if parallel { cpu::num_threads() } else { 1 },
                    flop / theirs
                );
            }
            println!("{line} GFLOP/s");
        }
    }
}
