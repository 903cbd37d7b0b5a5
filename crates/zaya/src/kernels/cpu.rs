//! Shared plumbing of the fused CPU kernels: element conversion, host views of candle
//! storages, the kernel thread pool, a bounds-checked wrapper over `gemm` for strided
//! views, and a few vectorisable primitives (exp, sums) compiled for the widest SIMD level
//! the CPU offers (chosen at run time, the build itself targets the x86-64 baseline).

use std::borrow::Cow;
use std::mem::MaybeUninit;
use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Result, Shape, Tensor};
use half::{bf16, f16};

use super::KernelError;

/// Element types the fused kernels read. All arithmetic is done in f32.
pub(crate) trait Elem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    /// `v` stored as `Self` and read back (as [`round_to`] for this type's dtype).
    fn round(v: f32) -> f32;
    /// `dst[i] = src[i].to_f32()` over `min(len)` elements: the loop a type may compile for
    /// the vector width of the CPU it runs on.
    fn widen_into(src: &[Self], dst: &mut [MaybeUninit<f32>]) {
        for (d, s) in dst.iter_mut().zip(src) {
            d.write(s.to_f32());
        }
    }
}

impl Elem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn round(v: f32) -> f32 {
        v
    }
}

impl Elem for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        widen_bf16(self)
    }
    #[inline(always)]
    fn round(v: f32) -> f32 {
        round_bf16(v)
    }
    fn widen_into(src: &[Self], dst: &mut [MaybeUninit<f32>]) {
        widen_bf16_into(src, dst)
    }
}

#[inline(always)]
fn widen_bf16_body(src: &[bf16], dst: &mut [MaybeUninit<f32>]) {
    for (d, s) in dst.iter_mut().zip(src) {
        d.write(widen_bf16(*s));
    }
}

simd_dispatch! {
    /// [`widen_bf16`] over a slice (`min(len)` elements), at the CPU's vector width.
    fn widen_bf16_into(src: &[bf16], dst: &mut [MaybeUninit<f32>]) => widen_bf16_body
}

#[inline(always)]
fn narrow_bf16_body(src: &[f32], dst: &mut [MaybeUninit<bf16>]) {
    for (d, s) in dst.iter_mut().zip(src) {
        d.write(narrow_bf16(*s));
    }
}

simd_dispatch! {
    /// [`narrow_bf16`] over a slice (`min(len)` elements), at the CPU's vector width.
    pub(crate) fn narrow_bf16_into(src: &[f32], dst: &mut [MaybeUninit<bf16>]) => narrow_bf16_body
}

/// `v` widened to f32 on this thread (a row a kernel reads twice).
pub(crate) fn widen_row<T: Elem>(v: &[T]) -> Vec<f32> {
    let mut out = Vec::with_capacity(v.len());
    T::widen_into(v, &mut out.spare_capacity_mut()[..v.len()]);
    // SAFETY: `widen_into` wrote all `v.len()` elements.
    unsafe { out.set_len(v.len()) };
    out
}

/// `bf16::to_f32` without a branch (loops over it vectorise): bf16 is the top half of an
/// f32; a NaN comes out quiet, as in `half`.
#[inline(always)]
pub(crate) fn widen_bf16(b: bf16) -> f32 {
    let i = b.to_bits() as u32;
    let nan = i & 0x7FFF > 0x7F80;
    f32::from_bits(if nan { (i | 0x0040) << 16 } else { i << 16 })
}

/// `bf16::from_f32(v)` without a branch ([`round_bf16`]'s top half).
#[inline(always)]
pub(crate) fn narrow_bf16(v: f32) -> bf16 {
    bf16::from_bits((round_bf16(v).to_bits() >> 16) as u16)
}

/// `bf16::from_f32(v).to_f32()` without a branch: round to nearest even on the top 16 bits
/// (adding `0x7FFF` plus the kept lowest bit carries exactly when `half` rounds up,
/// overflow to infinity included); a NaN stays a quiet NaN with the same top bits, as in
/// `half`.
#[inline(always)]
pub(crate) fn round_bf16(v: f32) -> f32 {
    let x = v.to_bits();
    let rounded = x.wrapping_add(0x7FFF + ((x >> 16) & 1)) & 0xFFFF_0000;
    let quiet = (x | 0x0040_0000) & 0xFFFF_0000;
    f32::from_bits(if x & 0x7FFF_FFFF > 0x7F80_0000 {
        quiet
    } else {
        rounded
    })
}

impl Elem for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn round(v: f32) -> f32 {
        f16::from_f32(v).to_f32()
    }
}

/// Rounds `v` to `dtype` and back, so fused code reproduces the reference's intermediate
/// casts (e.g. RMSNorm casts the normalised value back before the weight multiply).
#[inline(always)]
pub(crate) fn round_to(dtype: DType, v: f32) -> f32 {
    match dtype {
        DType::BF16 => round_bf16(v),
        DType::F16 => f16::from_f32(v).to_f32(),
        _ => v,
    }
}

/// True for the floating dtypes the fused kernels implement.
pub(crate) fn is_kernel_float(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
}

/// Calls `run(start, len)` for each maximal contiguous run of a strided layout, in logical
/// (row-major) order: the innermost axes whose strides are row-major form one run (a
/// cache's `[B, H, len, D]` view of a longer buffer is `B·H` runs of `len·D` values), so a
/// copy is a few `memcpy`s instead of one index per element.
fn for_each_run(layout: &Layout, mut run: impl FnMut(usize, usize)) {
    let dims = layout.dims();
    let stride = layout.stride();
    if dims.iter().product::<usize>() == 0 {
        return;
    }
    // inner axes [inner..] are contiguous among themselves (size-1 axes never break a run)
    let mut inner = dims.len();
    let mut len = 1usize;
    while inner > 0 && (dims[inner - 1] == 1 || stride[inner - 1] == len) {
        inner -= 1;
        len *= dims[inner];
    }
    let outer = &dims[..inner];
    let mut idx = vec![0usize; outer.len()];
    let mut off = layout.start_offset();
    loop {
        run(off, len);
        // odometer over the outer axes, innermost first
        let mut ax = outer.len();
        loop {
            if ax == 0 {
                return;
            }
            ax -= 1;
            idx[ax] += 1;
            off += stride[ax];
            if idx[ax] < outer[ax] {
                break;
            }
            off -= stride[ax] * outer[ax];
            idx[ax] = 0;
        }
    }
}

/// Shortest run [`widen`] hands to the pool one run per task; shorter runs (a transposed
/// last axis: one element each) are converted in one pass on this thread.
const POOL_RUN: usize = 16;

/// The start of every run of a strided layout ([`for_each_run`]) and their common length:
/// copies of the runs can go to the pool ([`collect_rows`], a run per row).
fn runs(layout: &Layout) -> (Vec<usize>, usize) {
    let (mut starts, mut run) = (Vec::new(), 0);
    for_each_run(layout, |a, n| {
        starts.push(a);
        run = n;
    });
    (starts, run)
}

/// The elements of `data` seen through `layout`, in logical (row-major) order, as f32 (for
/// f32 data: a copy).
fn widen<T: Elem>(data: &[T], layout: &Layout) -> Vec<f32> {
    match layout.contiguous_offsets() {
        Some((a, b)) => widen_slice(&data[a..b]),
        None => {
            // each run converted where it lies, on the pool (a rotary input, a view of q or
            // k, was converted element by element on one thread)
            let (starts, run) = runs(layout);
            if run < POOL_RUN {
                return starts
                    .iter()
                    .flat_map(|&a| &data[a..a + run])
                    .map(|x| x.to_f32())
                    .collect();
            }
            collect_rows(starts.len() * run, run, |r, dst| {
                T::widen_into(&data[starts[r]..starts[r] + run], dst)
            })
        }
    }
}

/// The elements of `storage` seen through `layout`, in logical (row-major) order, as f32.
/// Contiguous f32 input is borrowed; anything else is copied.
pub(crate) fn f32_view<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &'static str,
) -> Result<Cow<'a, [f32]>> {
    Ok(match storage {
        CpuStorage::F32(d) => match layout.contiguous_offsets() {
            Some((a, b)) => Cow::Borrowed(&d[a..b]),
            None => Cow::Owned(widen(d, layout)),
        },
        CpuStorage::BF16(d) => Cow::Owned(widen(d, layout)),
        CpuStorage::F16(d) => Cow::Owned(widen(d, layout)),
        other => {
            return Err(KernelError::UnsupportedDtype {
                op,
                dtype: other.dtype(),
            }
            .into())
        }
    })
}

/// Elements `[start, start + len)` of a contiguous storage as f32: borrowed for f32,
/// widened on the pool otherwise. Used to read one expert's weights without converting the
/// whole stacked tensor.
pub(crate) fn f32_range<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    start: usize,
    len: usize,
    op: &'static str,
) -> Result<Cow<'a, [f32]>> {
    let (a, b) = layout
        .contiguous_offsets()
        .ok_or(KernelError::NotContiguous {
            op,
            what: "weights",
        })?;
    if a + start + len > b {
        return Err(
            KernelError::Internal(format!("{op}: range {start}+{len} outside {}", b - a)).into(),
        );
    }
    let (lo, hi) = (a + start, a + start + len);
    fn widen_par<T: Elem>(src: &[T]) -> Vec<f32> {
        let mut out = vec![0f32; src.len()];
        par_chunks_mut(&mut out, 4096, |i, o| {
            for (d, s) in o.iter_mut().zip(&src[i * 4096..]) {
                *d = s.to_f32();
            }
        });
        out
    }
    Ok(match storage {
        CpuStorage::F32(d) => Cow::Borrowed(&d[lo..hi]),
        CpuStorage::BF16(d) => Cow::Owned(widen_par(&d[lo..hi])),
        CpuStorage::F16(d) => Cow::Owned(widen_par(&d[lo..hi])),
        other => {
            return Err(KernelError::UnsupportedDtype {
                op,
                dtype: other.dtype(),
            }
            .into())
        }
    })
}

/// Runs `f` on the CPU storage and layout of `t`.
pub(crate) fn with_cpu_storage<R>(
    t: &Tensor,
    op: &'static str,
    f: impl FnOnce(&CpuStorage, &Layout) -> Result<R>,
) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(s) => f(s, layout),
        _ => Err(KernelError::Internal(format!("{op}: tensor is not on the CPU")).into()),
    }
}

/// `v` widened to f32, split over the kernel pool for large inputs (a bf16 model's fused
/// kernels widen their inputs: on one thread, while the other waited, ~3 % of an 8B
/// prefill).
fn widen_slice<T: Elem>(v: &[T]) -> Vec<f32> {
    convert_on_pool(v, |d, s| T::widen_into(s, d))
}

/// `v` rounded to bf16 as [`narrow_bf16`] (and candle's `to_dtype`) round, split over the
/// kernel pool for large inputs: a bf16 model rounds every fused kernel's f32 result, and
/// one thread doing it while the other waits was ~4 % of an 8B prefill.
pub(crate) fn to_bf16(v: &[f32]) -> Vec<bf16> {
    convert_on_pool(v, |d, s| narrow_bf16_into(s, d))
}

/// `v` converted element by element by `convert(dst, src)` (which writes every element of
/// its `dst` chunk, as long as its `src` chunk), in chunks over the kernel pool from 64 Ki
/// elements.
fn convert_on_pool<S: Copy + Sync, D: Send>(
    v: &[S],
    convert: impl Fn(&mut [MaybeUninit<D>], &[S]) + Sync,
) -> Vec<D> {
    use rayon::prelude::*;
    const MIN_PARALLEL_LEN: usize = 1 << 16;
    const CHUNK: usize = 1 << 14;
    let mut out: Vec<D> = Vec::with_capacity(v.len());
    let spare = &mut out.spare_capacity_mut()[..v.len()];
    match pool() {
        Some(p) if v.len() >= MIN_PARALLEL_LEN => p.install(|| {
            spare
                .par_chunks_mut(CHUNK)
                .zip(v.par_chunks(CHUNK))
                .for_each(|(d, s)| convert(d, s))
        }),
        _ => convert(spare, v),
    }
    // SAFETY: `convert` wrote every element of each chunk, and the chunks cover `v.len()`.
    unsafe { out.set_len(v.len()) };
    out
}

/// Packs f32 results into a storage of `dtype` (rounding once).
pub(crate) fn storage_from_f32(v: Vec<f32>, dtype: DType, op: &'static str) -> Result<CpuStorage> {
    Ok(match dtype {
        DType::F32 => CpuStorage::F32(v),
        DType::BF16 => CpuStorage::BF16(to_bf16(&v)),
        DType::F16 => CpuStorage::F16(v.into_iter().map(f16::from_f32).collect()),
        other => return Err(KernelError::UnsupportedDtype { op, dtype: other }.into()),
    })
}

/// A tensor's values as f32 on the host, borrowed in place when the tensor is a contiguous
/// f32 CPU tensor (the backward passes' inputs: copying them was a serial memmove on the
/// calling thread), copied otherwise.
pub(crate) enum HostF32<G> {
    /// The storage's read guard and the tensor's range in it.
    Borrowed(G, usize, usize),
    Owned(Vec<f32>),
}

impl<G: std::ops::Deref<Target = candle_core::Storage>> std::ops::Deref for HostF32<G> {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match self {
            HostF32::Borrowed(guard, a, b) => match &**guard {
                candle_core::Storage::Cpu(CpuStorage::F32(d)) => &d[*a..*b],
                // `host_f32_ref` borrows f32 CPU storage only.
                _ => unreachable!("borrowed host values are f32 CPU storage"),
            },
            HostF32::Owned(v) => v,
        }
    }
}

/// See [`HostF32`].
pub(crate) fn host_f32_ref(
    t: &Tensor,
) -> Result<HostF32<impl std::ops::Deref<Target = candle_core::Storage> + '_>> {
    {
        let (storage, layout) = t.storage_and_layout();
        if let (candle_core::Storage::Cpu(CpuStorage::F32(_)), Some((a, b))) =
            (&*storage, layout.contiguous_offsets())
        {
            return Ok(HostF32::Borrowed(storage, a, b));
        }
    }
    Ok(HostF32::Owned(host_f32(t)?))
}

/// A tensor's elements as f32 in logical order (used by the backward passes, whose inputs
/// are ordinary tensors rather than storages).
pub(crate) fn host_f32(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

/// Builds a tensor of `dtype` on `t`'s device from f32 values.
pub(crate) fn tensor_from_f32(
    v: Vec<f32>,
    shape: &Shape,
    dtype: DType,
    like: &Tensor,
) -> Result<Tensor> {
    if dtype == DType::BF16 {
        return Tensor::from_vec(to_bf16(&v), shape.clone(), like.device());
    }
    Tensor::from_vec(v, shape.clone(), like.device())?.to_dtype(dtype)
}

// ---------------------------------------------------------------------------------------
// Threads

/// Number of threads the fused kernels use: `CANDLE_NUM_THREADS`, else `RAYON_NUM_THREADS`,
/// else the available cores (the same order candle's CPU backend uses). Read once.
pub fn num_threads() -> usize {
    static N: OnceLock<usize> = OnceLock::new();
    *N.get_or_init(|| {
        let from_env = |name: &str| {
            std::env::var(name)
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
                .filter(|&n| n > 0)
        };
        from_env("CANDLE_NUM_THREADS")
            .or_else(|| from_env("RAYON_NUM_THREADS"))
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    })
}

/// The kernels' own pool, so that their thread count does not depend on whoever built the
/// global rayon pool first. `None` when one thread is configured or the pool cannot start
/// (then everything runs on the calling thread).
fn pool() -> Option<&'static rayon::ThreadPool> {
    static POOL: OnceLock<Option<rayon::ThreadPool>> = OnceLock::new();
    POOL.get_or_init(|| {
        let n = num_threads();
        if n <= 1 {
            return None;
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .thread_name(|i| format!("zaya-kernel-{i}"))
            .build()
            .ok()
    })
    .as_ref()
}

/// Runs `f` inside the kernel pool (so nested rayon work, including gemm's, uses it).
pub(crate) fn in_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    match pool() {
        Some(p) => p.install(f),
        None => f(),
    }
}

/// Least work (a rough flop count) for which [`par_map`] and [`par_map_short`] split a
/// loop: below it, waking another thread costs more than the loop.
const MIN_PARALLEL_MAP_WORK: usize = 1 << 15;

/// `(0..n).map(f)` evaluated on the kernel pool; results in index order. Runs inline when
/// there is one item or one thread, or when `work` (a rough flop count) is too small to pay
/// for waking the pool.
pub(crate) fn par_map<R: Send>(
    n: usize,
    work: usize,
    f: impl Fn(usize) -> R + Sync + Send,
) -> Vec<R> {
    use rayon::prelude::*;
    match pool() {
        Some(p) if n > 1 && work >= MIN_PARALLEL_MAP_WORK => {
            p.install(|| (0..n).into_par_iter().map(f).collect())
        }
        _ => (0..n).map(f).collect(),
    }
}

/// Positions per row up to which a forward is a decode step's (one new token per row, a
/// few at most): its short loops take [`par_map_short`], and the CCA convolution its
/// few-positions path.
pub(crate) const DECODE_POSITIONS: usize = 4;

/// [`par_map`] for a loop that only decode runs (a few positions): on the spinning
/// [`team`](super::team) when it is free, since waking a sleeping pool thread costs about
/// as much as such a loop. (Prefill loops stay on the pool: handing them to the team kept
/// its helper spinning beside the pool's threads, 1–5 % slower.)
pub(crate) fn par_map_short<R: Send>(
    n: usize,
    work: usize,
    f: impl Fn(usize) -> R + Sync + Send,
) -> Vec<R> {
    if n > 1 && work >= MIN_PARALLEL_MAP_WORK {
        let mut out: Vec<R> = Vec::with_capacity(n);
        let slots = RowsOut::new(&mut out.spare_capacity_mut()[..n]);
        let ran = super::team::try_run(n, &|i| {
            let v = f(i);
            // SAFETY: task `i` alone writes slot `i`.
            let slot = unsafe { slots.row(i, 1) };
            slot[0].write(v);
        });
        if ran {
            // SAFETY: every task wrote its slot (a task's panic was re-raised above,
            // leaving the written values to leak rather than be read).
            unsafe { out.set_len(n) };
            return out;
        }
    }
    par_map(n, work, f)
}

/// Splits `data` into consecutive chunks of `chunk` elements and runs `f(chunk_index, chunk)`
/// on the pool (inline for small inputs).
pub(crate) fn par_chunks_mut<T: Send>(
    data: &mut [T],
    chunk: usize,
    f: impl Fn(usize, &mut [T]) + Sync + Send,
) {
    use rayon::prelude::*;
    const MIN_PARALLEL_LEN: usize = 1 << 14;
    let chunk = chunk.max(1);
    match pool() {
        Some(p) if data.len() >= MIN_PARALLEL_LEN && data.len() > chunk => {
            // Group rows so each task has enough work to amortise the scheduling.
            let per_task = chunk * (MIN_PARALLEL_LEN / 4 / chunk).max(1);
            p.install(|| {
                data.par_chunks_mut(per_task)
                    .enumerate()
                    .for_each(|(t, block)| {
                        let first = t * (per_task / chunk);
                        for (i, c) in block.chunks_mut(chunk).enumerate() {
                            f(first + i, c);
                        }
                    })
            })
        }
        _ => {
            for (i, c) in data.chunks_mut(chunk).enumerate() {
                f(i, c);
            }
        }
    }
}

/// Fills every block with zeros on the pool, the blocks split between the threads in
/// pieces of at least 256 KiB (inline with one thread or under 1 MiB in all).
pub(crate) fn par_fill_zero(blocks: &mut [&mut [MaybeUninit<f32>]]) {
    use rayon::prelude::*;
    const PIECE: usize = 1 << 16;
    let total: usize = blocks.iter().map(|b| b.len()).sum();
    match pool() {
        Some(p) if total >= 4 * PIECE => p.install(|| {
            blocks
                .par_iter_mut()
                .flat_map(|b| b.par_chunks_mut(PIECE))
                .for_each(|piece| piece.fill(MaybeUninit::new(0.0)))
        }),
        _ => blocks
            .iter_mut()
            .for_each(|b| b.fill(MaybeUninit::new(0.0))),
    }
}

/// A vector of `len` elements computed a row of `row` elements at a time on the pool, as
/// [`par_chunks_mut`] splits it: `f(r, out)` must write every element of row `r`'s `out`
/// (callers write each through a `zip` over inputs they have checked to be as long as a
/// row). The output is never zero-filled first (an 8B prefill spent ~7 % in such fills).
pub(crate) fn collect_rows<T: Send>(
    len: usize,
    row: usize,
    f: impl Fn(usize, &mut [MaybeUninit<T>]) + Sync + Send,
) -> Vec<T> {
    let mut out: Vec<T> = Vec::with_capacity(len);
    par_chunks_mut(&mut out.spare_capacity_mut()[..len], row, f);
    // SAFETY: `f` wrote every element of every row (its contract), and the rows cover
    // `0..len`.
    unsafe { out.set_len(len) };
    out
}

/// Runs `block(j0, c)` over the `n` weight rows of a GEMV, `c` holding the by-weight-row
/// outputs (`m` per weight row) of rows `j0..j0 + c.len() / m`, split as
/// [`split_weight_ranges`] splits them.
fn split_weight_rows(
    m: usize,
    n: usize,
    k: usize,
    align: usize,
    parallel: bool,
    by_col: &mut [f32],
    block: impl Fn(usize, &mut [f32]) + Sync + Send,
) {
    let out = RowsOut::new(by_col);
    split_weight_ranges(m, n, k, align, parallel, |rows| {
        // SAFETY: the ranges are disjoint, so each call alone writes its rows' outputs.
        let c = unsafe { out.row(rows.start * m, rows.len() * m) };
        block(rows.start, c)
    });
}

/// Runs `task(rows)` over the `n` weight rows of a GEMV (`m` rows of x, `k` columns).
/// With `parallel`, the rows are split into a few ranges per thread, each a multiple of
/// `align` rows: the split follows the weight (`n · k`), not the output length, so a
/// 2048-row projection at one row of x is worth every core. The ranges go to the spinning
/// [`team`](super::team) when it is free (a decode step's products are too short to wake
/// sleeping pool threads for), else to the pool.
fn split_weight_ranges(
    m: usize,
    n: usize,
    k: usize,
    align: usize,
    parallel: bool,
    task: impl Fn(std::ops::Range<usize>) + Sync + Send,
) {
    use rayon::prelude::*;
    const MIN_PARALLEL_WORK: usize = 1 << 16;
    let threads = num_threads();
    if parallel && threads > 1 && n > align && n * k * m >= MIN_PARALLEL_WORK {
        let rows = n.div_ceil(4 * threads).next_multiple_of(align);
        let range = |t: usize| t * rows..((t + 1) * rows).min(n);
        let tasks = n.div_ceil(rows);
        if super::team::try_run(tasks, &|t| task(range(t))) {
            return;
        }
        in_pool(|| (0..tasks).into_par_iter().for_each(|t| task(range(t))));
    } else {
        task(0..n);
    }
}

/// Outputs a task of [`gemv_by_weight_rows`] computes at a time into its own by-weight-row
/// buffer (16 KiB) before writing them to the output rows: the buffer stays in cache, and
/// no `[n × m]` buffer is cleared and then transposed on one thread (as a b8 decode step's
/// 262k-row lm_head was).
const GEMV_VALUES_PER_PIECE: usize = 4096;

/// `out[m×n]` (row-major) of a GEMV against a weight stored row by row (f32 or a compact
/// form): `block(j0, c)` writes `x_i · w_j` by weight row (`c[(j − j0)·m + i]`) for weight
/// rows `j0..j0 + c.len() / m`, which [`split_weight_ranges`] hands out in multiples of
/// `align` over the pool (`block` must compute each output independently of the range
/// it is given). Each weight row is read once for all rows of `x`.
pub(crate) fn gemv_by_weight_rows(
    m: usize,
    n: usize,
    k: usize,
    align: usize,
    out: &mut [f32],
    block: impl Fn(usize, &mut [f32]) + Sync + Send,
) {
    if m == 1 {
        // one row: the column order is the row order
        split_weight_rows(m, n, k, align, true, &mut out[..n], block);
        return;
    }
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        out.len() >= m * n,
        "gemv: output of {} for {m}×{n}",
        out.len()
    );
    let dst = RowsOut::new(out);
    let piece = (GEMV_VALUES_PER_PIECE / m).next_multiple_of(align.max(1));
    split_weight_ranges(m, n, k, align, true, |rows| {
        let mut by_col = vec![0f32; piece.min(rows.len()) * m];
        for j0 in rows.clone().step_by(piece) {
            let len = piece.min(rows.end - j0);
            let c = &mut by_col[..len * m];
            block(j0, c);
            for i in 0..m {
                // SAFETY: columns `rows` of every output row belong to this task alone.
                let d = unsafe { dst.row(i * n + j0, len) };
                for (d, v) in d.iter_mut().zip(c.iter().skip(i).step_by(m)) {
                    *d = *v;
                }
            }
        }
    });
}

/// `y` cut along its last axis into consecutive pieces of `widths` (views, no copies): the
/// outputs of several weights' products computed side by side.
pub(crate) fn split_last_axis(y: &Tensor, widths: &[usize]) -> Result<Vec<Tensor>> {
    let mut at = 0;
    widths
        .iter()
        .map(|&w| {
            let part = y.narrow(candle_core::D::Minus1, at, w);
            at += w;
            part
        })
        .collect()
}

/// The `block(j0, c)` of [`gemv_by_weight_rows`] for several weights side by side
/// (`parts`: each weight's row count and its own block): a range of rows is cut at the
/// weights' boundaries and each piece goes to its weight's block, its rows counted from
/// that weight's first. A layer's products of one input (the CCA's q/k/value projections)
/// then split over the threads as one product; each output is what its weight's block
/// computes alone (blocks compute each output independently of the range they get).
pub(crate) fn side_by_side<B: Fn(usize, &mut [f32]) + Sync + Send>(
    m: usize,
    parts: Vec<(usize, B)>,
) -> impl Fn(usize, &mut [f32]) + Sync + Send {
    move |j0, c| {
        let (end, mut start, mut at) = (j0 + c.len() / m.max(1), 0, j0);
        for (n, block) in &parts {
            let (lo, hi) = (at.max(start), end.min(start + n));
            if lo < hi {
                block(lo - start, &mut c[(lo - j0) * m..(hi - j0) * m]);
                at = hi;
            }
            start += n;
        }
    }
}

/// `out[m × Σnᵢ]` (row-major) = `xs · Wᵢᵀ` side by side for f32 weights `ws` (each `nᵢ`
/// contiguous rows of `k`) of one input `xs` (`m × k`, `m ≤ GEMV_ROWS`): [`gemm`]'s GEMV
/// of each weight, all their rows split over the threads as one product ([`side_by_side`]).
pub(crate) fn gemv_side_by_side(
    xs: &[f32],
    m: usize,
    k: usize,
    ws: &[(&[f32], usize)],
    out: &mut [f32],
) -> Result<()> {
    let n: usize = ws.iter().map(|&(_, n)| n).sum();
    if m > GEMV_ROWS
        || xs.len() < m * k
        || out.len() < m * n
        || ws.iter().any(|&(w, wn)| w.len() < wn * k)
    {
        return Err(KernelError::Internal(format!(
            "gemv side by side: {m} rows of {k} ({} values), weights of {:?} values for {:?} rows, output {}",
            xs.len(),
            ws.iter().map(|(w, _)| w.len()).collect::<Vec<_>>(),
            ws.iter().map(|&(_, n)| n).collect::<Vec<_>>(),
            out.len()
        ))
        .into());
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        out[..m * n].fill(0.0);
        return Ok(());
    }
    let parts = ws
        .iter()
        .map(|&(w, wn)| (wn, dots_block_of(&xs[..m * k], k, m, &w[..wn * k], k, k)))
        .collect();
    gemv_by_weight_rows(
        m,
        n,
        k,
        TILE_COLS,
        &mut out[..m * n],
        side_by_side(m, parts),
    );
    Ok(())
}

/// `out` for a kernel that takes its output uncleared ([`MaybeUninit`]).
///
/// # Safety
/// The kernel may write only initialized values (it never stores `MaybeUninit::uninit()`),
/// so that `out` holds valid `f32`s afterwards, as before.
pub(crate) unsafe fn as_uninit(out: &mut [f32]) -> &mut [MaybeUninit<f32>] {
    // SAFETY: `MaybeUninit<f32>` has the layout of `f32`; the caller writes only values.
    unsafe { &mut *(out as *mut [f32] as *mut [MaybeUninit<f32>]) }
}

/// The output buffer of a product whose pool tasks each write a disjoint set of its
/// elements (column blocks of the weight rows): a raw pointer the tasks may share.
#[derive(Clone, Copy)]
pub(crate) struct ColumnsOut(*mut f32);
// SAFETY: the tasks holding it write disjoint elements of the buffer, which outlives them
// (the product borrows it mutably for the whole call).
unsafe impl Send for ColumnsOut {}
unsafe impl Sync for ColumnsOut {}
impl ColumnsOut {
    #[cfg(test)]
    pub(crate) fn new(out: &mut [f32]) -> Self {
        ColumnsOut(out.as_mut_ptr())
    }
    /// For a product that writes every element of a buffer it was handed uncleared.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) fn uninit(out: &mut [MaybeUninit<f32>]) -> Self {
        ColumnsOut(out.as_mut_ptr() as *mut f32)
    }
    pub(crate) fn ptr(self) -> *mut f32 {
        self.0
    }
}

/// The output buffer of pool tasks that each write a disjoint set of its rows (an
/// expert's tokens): a raw pointer the tasks may share.
#[derive(Clone, Copy)]
pub(crate) struct RowsOut<'a, T>(*mut T, usize, std::marker::PhantomData<&'a mut [T]>);
// SAFETY: the tasks holding it write disjoint rows of the buffer, which it borrows mutably
// for its lifetime.
unsafe impl<T: Send> Send for RowsOut<'_, T> {}
unsafe impl<T: Send> Sync for RowsOut<'_, T> {}
impl<'a, T> RowsOut<'a, T> {
    pub(crate) fn new(out: &'a mut [T]) -> Self {
        RowsOut(out.as_mut_ptr(), out.len(), std::marker::PhantomData)
    }
    /// Elements `start..start + len` of the buffer.
    ///
    /// # Safety
    /// No other task may access these elements while the slice lives.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn row(&self, start: usize, len: usize) -> &mut [T] {
        assert!(
            start.checked_add(len).is_some_and(|end| end <= self.1),
            "rows {start}+{len} outside {}",
            self.1
        );
        std::slice::from_raw_parts_mut(self.0.add(start), len)
    }
}

/// `(0..n).map(f)` on the kernel pool, one task per index (for a few large tasks of
/// uneven size, such as the experts of a prefill): rayon splits the range in halves down
/// to single indices, each thread runs its half in order and a thread that runs out steals
/// from the other's; results in index order.
pub(crate) fn par_tasks<R: Send>(n: usize, f: impl Fn(usize) -> R + Sync + Send) -> Vec<R> {
    use rayon::prelude::*;
    match pool() {
        Some(p) if n > 1 => p.install(|| (0..n).into_par_iter().with_max_len(1).map(f).collect()),
        _ => (0..n).map(f).collect(),
    }
}

/// Deterministic test values in `[-1, 1)` (a multiplicative hash of the index and `seed`),
/// for the kernels' tests against their references.
#[cfg(test)]
pub(crate) fn test_data(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 2001) as f32 / 1000.0 - 1.0)
        .collect()
}

/// The best wall time of `repeats` runs of `f` after one warm-up run, in seconds: the
/// kernels' ignored speed tests.
#[cfg(test)]
pub(crate) fn best_seconds(repeats: usize, f: &mut dyn FnMut()) -> f64 {
    f();
    (0..repeats)
        .map(|_| {
            let t = std::time::Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// Elements of a weight tile widened at once by [`widened_gemm`] (about 2 MB of f32).
const TILE_ELEMS: usize = 1 << 19;

thread_local! {
    /// The widened weight tile, reused across calls so large products do not page in fresh
    /// memory every time.
    static TILE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `out[m×n] = x[m×k] · W[n×k]ᵀ` for a weight stored in a compact form (bf16, quantized
/// blocks): `widen(j, row)` writes weight row `j` as f32 into `row` (`k` long). The weight
/// is widened a tile of rows at a time (in parallel) into a buffer that stays allocated for
/// the thread, and each tile goes through the f32 gemm — never an f32 copy of the whole
/// matrix.
pub(crate) fn widened_gemm(
    x: &[f32],
    m: usize,
    k: usize,
    n: usize,
    out: &mut [f32],
    widen: impl Fn(usize, &mut [f32]) + Sync + Send,
) -> Result<()> {
    // at least 16 rows per tile (gemm efficiency), at most the whole weight
    let rows_per_tile = (TILE_ELEMS / k.max(1)).max(16).min(n);
    TILE.with(|cell| {
        // a product started on this thread while its tile is in use (the pool ran another
        // task, e.g. another expert of a prefill, while this one waits) gets its own
        let mut own = Vec::new();
        let mut held = cell.try_borrow_mut();
        let tile = match held.as_mut() {
            Ok(t) => &mut **t,
            Err(_) => &mut own,
        };
        if tile.len() < rows_per_tile * k {
            tile.resize(rows_per_tile * k, 0.0);
        }
        let mut j0 = 0;
        while j0 < n {
            let rows = rows_per_tile.min(n - j0);
            let buf = &mut tile[..rows * k];
            par_chunks_mut(buf, k, |r, d| widen(j0 + r, d));
            gemm(
                m,
                rows,
                k,
                MatMut::new(out, j0, n),
                false,
                MatRef::rows(x, 0, k),
                MatRef::rows(buf, 0, k).t(),
                1.0,
                true,
            )?;
            j0 += rows;
        }
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------
// gemm on strided views

/// A read-only matrix view: element `(r, c)` is `data[off + r·rs + c·cs]`.
#[derive(Clone, Copy)]
pub(crate) struct MatRef<'a> {
    pub data: &'a [f32],
    pub off: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> MatRef<'a> {
    pub fn new(data: &'a [f32], off: usize, rs: usize, cs: usize) -> Self {
        MatRef { data, off, rs, cs }
    }
    /// Row-major `[rows, cols]` starting at `off`.
    pub fn rows(data: &'a [f32], off: usize, cols: usize) -> Self {
        MatRef {
            data,
            off,
            rs: cols,
            cs: 1,
        }
    }
    /// The transpose of this view.
    pub fn t(self) -> Self {
        MatRef {
            data: self.data,
            off: self.off,
            rs: self.cs,
            cs: self.rs,
        }
    }
    fn fits(&self, rows: usize, cols: usize) -> bool {
        if rows == 0 || cols == 0 {
            return true;
        }
        self.off + (rows - 1) * self.rs + (cols - 1) * self.cs < self.data.len()
    }
}

/// A mutable row-major destination `[rows, ·]` with row stride `rs` starting at `off`.
pub(crate) struct MatMut<'a> {
    pub data: &'a mut [f32],
    pub off: usize,
    pub rs: usize,
}

impl<'a> MatMut<'a> {
    pub fn new(data: &'a mut [f32], off: usize, rs: usize) -> Self {
        MatMut { data, off, rs }
    }
}

/// Checks that the views of an `m×n = (m×k)·(k×n)` product lie inside their slices (and
/// that the destination's rows do not overlap), so the unchecked kernels never read or
/// write out of bounds.
pub(crate) fn check_views(
    m: usize,
    n: usize,
    k: usize,
    dst: &MatMut<'_>,
    lhs: &MatRef<'_>,
    rhs: &MatRef<'_>,
) -> Result<()> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    let dst_ok = dst.off + (m - 1) * dst.rs + n <= dst.data.len() && (m == 1 || dst.rs >= n);
    check_operands(m, n, k, lhs, rhs, dst_ok)
}

/// The operand half of [`check_views`] (`dst_ok`: the destination's own check).
pub(crate) fn check_operands(
    m: usize,
    n: usize,
    k: usize,
    lhs: &MatRef<'_>,
    rhs: &MatRef<'_>,
    dst_ok: bool,
) -> Result<()> {
    if !dst_ok || !lhs.fits(m, k) || !rhs.fits(k, n) {
        return Err(KernelError::Internal(format!(
            "gemm view out of bounds (m={m}, n={n}, k={k})"
        ))
        .into());
    }
    Ok(())
}

/// The product of an empty reduction (`k = 0`): zero, added to nothing when accumulating.
pub(crate) fn zero_unless_accumulating(m: usize, n: usize, dst: MatMut<'_>, accumulate: bool) {
    if !accumulate {
        for r in 0..m {
            dst.data[dst.off + r * dst.rs..dst.off + r * dst.rs + n].fill(0.0);
        }
    }
}

/// Most rows of `lhs` for which [`gemm`] takes its GEMV path.
pub(crate) const GEMV_ROWS: usize = 32;

/// `dst[m×n] = (accumulate ? dst : 0) + beta · lhs[m×k] · rhs[k×n]`.
///
/// `parallel` lets gemm split the product over the kernel pool (callers already running
/// inside a parallel region pass `false`). Every view is bounds-checked before the
/// unchecked gemm call, so a wrong stride is an error, never an out-of-bounds read.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm(
    m: usize,
    n: usize,
    k: usize,
    dst: MatMut<'_>,
    accumulate: bool,
    lhs: MatRef<'_>,
    rhs: MatRef<'_>,
    beta: f32,
    parallel: bool,
) -> Result<()> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    check_views(m, n, k, &dst, &lhs, &rhs)?;
    if k == 0 {
        zero_unless_accumulating(m, n, dst, accumulate);
        return Ok(());
    }
    // A few rows against a matrix whose columns are contiguous (a linear weight seen as
    // `Wᵀ`): a GEMV that reads each weight row once for all rows of `lhs` is bandwidth-bound
    // where the general GEMM spends its time packing (decode: experts at 1–8 tokens). Taken
    // for every size, small ones too (just not threaded): each output is one dot product, so
    // a row's result does not depend on how many rows run together — the batch invariance
    // the engine's decode relies on (a GEMM's blocking depends on M).
    if m <= GEMV_ROWS && rhs.rs == 1 && lhs.cs == 1 {
        let parallel = parallel && n * k >= 1 << 12;
        let (l, r) = (&lhs, &rhs);
        let xs = &l.data[l.off..l.off + (m - 1) * l.rs + k];
        let ws = &r.data[r.off..r.off + (n - 1) * r.cs + k];
        let by_col = gemv_by_col(xs, l.rs, m, ws, r.cs, n, k, parallel);
        for i in 0..m {
            let row = &mut dst.data[dst.off + i * dst.rs..dst.off + i * dst.rs + n];
            for (col, d) in row.iter_mut().enumerate() {
                let v = beta * by_col[col * m + i];
                *d = if accumulate { *d + v } else { v };
            }
        }
        return Ok(());
    }
    // SAFETY: the three views were checked above to lie inside their slices for the given
    // m, n, k and strides; `dst` is borrowed mutably, so nothing aliases it.
    unsafe {
        gemm_crate(
            m,
            n,
            k,
            DstPtr(dst.data.as_mut_ptr().add(dst.off)),
            dst.rs,
            accumulate,
            &lhs,
            &rhs,
            beta,
            parallel,
        );
    }
    Ok(())
}

/// `dst[m×n] = beta · lhs · rhs` into a fresh buffer (row-major, exactly `m·n` values) that
/// nothing has written yet, returned initialised. For outputs a product overwrites whole:
/// zero-filling them first was a serial memset on the calling thread while the other
/// cores waited (the training step's expert and loss-head gradients: hundreds of MB a step).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_fresh<'a>(
    m: usize,
    n: usize,
    k: usize,
    dst: &'a mut [MaybeUninit<f32>],
    lhs: MatRef<'_>,
    rhs: MatRef<'_>,
    beta: f32,
    parallel: bool,
) -> Result<&'a mut [f32]> {
    if dst.len() != m * n {
        return Err(KernelError::Internal(format!(
            "gemm destination holds {} values for {m}×{n}",
            dst.len()
        ))
        .into());
    }
    let gemv = m <= GEMV_ROWS && rhs.rs == 1 && lhs.cs == 1;
    if m <= 1 || n <= 1 || k == 0 || gemv {
        // These paths write every value too, but through a `&mut [f32]` (ours for the GEMV
        // and an empty reduction, the crate's for one row or one column), which must not
        // cover uninitialised memory: they get zeros first (small products only).
        dst.fill(MaybeUninit::new(0.0));
        // SAFETY: every value was just initialised.
        let dst = unsafe { assume_init_mut(dst) };
        gemm(
            m,
            n,
            k,
            MatMut::new(dst, 0, n),
            false,
            lhs,
            rhs,
            beta,
            parallel,
        )?;
        return Ok(dst);
    }
    check_operands(m, n, k, &lhs, &rhs, true)?;
    // SAFETY: the operand views were checked above and `dst` holds exactly m·n values, which
    // the crate writes without reading (`accumulate` false); it is borrowed mutably.
    unsafe {
        gemm_crate(
            m,
            n,
            k,
            DstPtr(dst.as_mut_ptr().cast::<f32>()),
            n,
            false,
            &lhs,
            &rhs,
            beta,
            parallel,
        );
        Ok(assume_init_mut(dst))
    }
}

/// A fresh f32 buffer of `len` values, not written yet (see [`gemm_fresh`]).
pub(crate) fn uninit_f32(len: usize) -> Box<[MaybeUninit<f32>]> {
    Box::new_uninit_slice(len)
}

/// # Safety
/// Every value of `v` must be initialised.
pub(crate) unsafe fn assume_init_mut(v: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<f32>(), v.len())
}

/// A product's destination, carried by the pool's tasks that write disjoint blocks of it
/// ([`gemm_crate`]'s split, `sgemm`'s weight-row ranges).
#[derive(Clone, Copy)]
pub(crate) struct DstPtr(pub(crate) *mut f32);
// SAFETY: every user splits the destination into disjoint blocks, one per task, and holds
// it borrowed mutably for the call.
unsafe impl Send for DstPtr {}
unsafe impl Sync for DstPtr {}

/// The `gemm` crate's `dst = (accumulate ? dst : 0) + beta · lhs · rhs`, split over the
/// kernel pool when `parallel` and large enough. Without `accumulate` the crate writes every
/// value of the destination and reads none — checked in gemm-common 0.19.0's source (every
/// kernel stores without loading on its "alpha zero" status; the version is pinned in
/// `Cargo.toml`) and by `gemm_fresh_writes_every_value_and_reads_none`.
///
/// # Safety
/// `lhs` and `rhs` must hold their `m×k` / `k×n` views (checked by the caller); `dst` must be
/// valid for writes (and, when accumulating, reads) of `m` rows of `n` values at row stride
/// `dst_rs`, and nothing else may access them during the call.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_crate(
    m: usize,
    n: usize,
    k: usize,
    dst: DstPtr,
    dst_rs: usize,
    accumulate: bool,
    lhs: &MatRef<'_>,
    rhs: &MatRef<'_>,
    beta: f32,
    parallel: bool,
) {
    let threads = num_threads();
    let par = if parallel && threads > 1 && m * n * k >= 1 << 18 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    let run = move || {
        let dst = dst;
        gemm::gemm(
            m,
            n,
            k,
            dst.0,
            1,
            dst_rs as isize,
            accumulate,
            lhs.data.as_ptr().add(lhs.off),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr().add(rhs.off),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0f32,
            beta,
            false,
            false,
            false,
            par,
        )
    };
    match par {
        gemm::Parallelism::None => run(),
        _ => in_pool(run),
    }
}

/// Transposes 32-bit values 16 × 16 at a time: for `b < blocks`, the values `16b..16b + 16`
/// of the 16 rows `row(0..16)` become the vectors at `dst + p · width` (`p = 16b..16b + 16`),
/// lane `c` from row `c`. Used to pack operands column-major for the GEMM kernels (f32
/// values, or pairs of bf16 seen as one u32). The rows are loaded into named registers (an
/// array indexed by a run-time row count went through the stack: a store and a reload per
/// vector).
///
/// # Safety
/// AVX-512F must be available; each row must hold `16 · blocks` values and `dst` must be
/// writable at `p · width .. p · width + 16` for every `p < 16 · blocks`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn transpose_blocks_16x16(
    row: impl Fn(usize) -> *const u32,
    blocks: usize,
    dst: *mut u32,
    width: usize,
) {
    use std::arch::x86_64::*;
    let rows: [*const u32; 16] = std::array::from_fn(&row);
    for b in 0..blocks {
        let r: [__m512i; 16] =
            std::array::from_fn(|c| _mm512_loadu_si512(rows[c].add(16 * b) as *const _));
        for (p, v) in transpose_16x16(r).iter().enumerate() {
            _mm512_storeu_si512(dst.add((16 * b + p) * width) as *mut _, *v);
        }
    }
}

/// The 16 × 16 transpose of 32-bit lanes in registers: lane `c` of vector `p` of the result
/// is lane `p` of `r[c]`.
///
/// # Safety
/// AVX-512F must be available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) unsafe fn transpose_16x16(
    r: [std::arch::x86_64::__m512i; 16],
) -> [std::arch::x86_64::__m512i; 16] {
    use std::arch::x86_64::*;
    // pairs of rows interleaved, then quadruples, then the 128-bit lanes gathered
    let mut t = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    let mut u = [_mm512_setzero_si512(); 16];
    for i in 0..4 {
        u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    // now lane L of u[4i + j] holds rows 4i..4i+4 of value 4L + j
    let mut out = [_mm512_setzero_si512(); 16];
    for j in 0..4 {
        let x0 = _mm512_shuffle_i32x4::<0b10_00_10_00>(u[j], u[4 + j]);
        let x1 = _mm512_shuffle_i32x4::<0b11_01_11_01>(u[j], u[4 + j]);
        let y0 = _mm512_shuffle_i32x4::<0b10_00_10_00>(u[8 + j], u[12 + j]);
        let y1 = _mm512_shuffle_i32x4::<0b11_01_11_01>(u[8 + j], u[12 + j]);
        out[j] = _mm512_shuffle_i32x4::<0b10_00_10_00>(x0, y0);
        out[4 + j] = _mm512_shuffle_i32x4::<0b10_00_10_00>(x1, y1);
        out[8 + j] = _mm512_shuffle_i32x4::<0b11_01_11_01>(x0, y0);
        out[12 + j] = _mm512_shuffle_i32x4::<0b11_01_11_01>(x1, y1);
    }
    out
}

/// [`transpose_blocks_16x16`] for AVX: 8 × 8 at a time. For `b < blocks`, the values
/// `8b..8b + 8` of the 8 rows `row(0..8)` become the vectors at `dst + p · width`
/// (`p = 8b..8b + 8`), lane `c` from row `c`.
///
/// # Safety
/// AVX must be available; each row must hold `8 · blocks` values and `dst` must be
/// writable at `p · width .. p · width + 8` for every `p < 8 · blocks`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
pub(crate) unsafe fn transpose_blocks_8x8(
    row: impl Fn(usize) -> *const u32,
    blocks: usize,
    dst: *mut u32,
    width: usize,
) {
    use std::arch::x86_64::*;
    let rows: [*const f32; 8] = std::array::from_fn(|c| row(c) as *const f32);
    for b in 0..blocks {
        let r: [__m256; 8] = std::array::from_fn(|c| _mm256_loadu_ps(rows[c].add(8 * b)));
        for (p, v) in transpose_8x8(r).iter().enumerate() {
            _mm256_storeu_ps(dst.add((8 * b + p) * width) as *mut f32, *v);
        }
    }
}

/// The 8 × 8 transpose of 32-bit lanes in registers: lane `c` of vector `p` of the result
/// is lane `p` of `r[c]`.
///
/// # Safety
/// AVX must be available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
#[inline]
pub(crate) unsafe fn transpose_8x8(
    r: [std::arch::x86_64::__m256; 8],
) -> [std::arch::x86_64::__m256; 8] {
    use std::arch::x86_64::*;
    // pairs of rows interleaved, then quadruples (within 128-bit lanes), then the lanes
    // gathered: lane L of u[j] (j < 4) holds rows 0..4 of value 4L + j, of u[4 + j] rows
    // 4..8
    let t: [__m256; 8] = std::array::from_fn(|i| {
        let (a, c) = (r[2 * (i / 2)], r[2 * (i / 2) + 1]);
        if i % 2 == 0 {
            _mm256_unpacklo_ps(a, c)
        } else {
            _mm256_unpackhi_ps(a, c)
        }
    });
    let u: [__m256; 8] = std::array::from_fn(|i| {
        let (h, j) = (i / 4, i % 4);
        let (a, c) = (t[4 * h + j / 2], t[4 * h + 2 + j / 2]);
        if j % 2 == 0 {
            _mm256_shuffle_ps::<0b01_00_01_00>(a, c)
        } else {
            _mm256_shuffle_ps::<0b11_10_11_10>(a, c)
        }
    });
    let mut out = [_mm256_setzero_ps(); 8];
    for j in 0..4 {
        out[j] = _mm256_permute2f128_ps::<0x20>(u[j], u[4 + j]);
        out[4 + j] = _mm256_permute2f128_ps::<0x31>(u[j], u[4 + j]);
    }
    out
}

// ---------------------------------------------------------------------------------------
// Vectorisable primitives

/// `exp(x)` to ~1 ulp (Cephes `expf` range reduction and polynomial), written without
/// branches or libm calls so loops over it vectorise. `x < −87.3` gives 0 (the libm result
/// there is a denormal below 1e-38), `x > 88.3` gives +∞, NaN stays NaN.
#[inline(always)]
pub(crate) fn exp_approx(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5·2²³: adding it rounds to an integer and leaves that integer in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    let xc = x.clamp(-87.3, 88.3);
    let shifted = xc * LOG2E + MAGIC;
    let n = shifted - MAGIC;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let r2 = r * r;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let p = p * r2 + r + 1.0;
    let ni = shifted.to_bits() as i32 - MAGIC.to_bits() as i32;
    let pow2 = f32::from_bits(((ni + 127) << 23) as u32);
    let y = p * pow2;
    let y = if x < -87.3 { 0.0 } else { y };
    if x > 88.3 {
        f32::INFINITY
    } else {
        y
    }
}

/// `σ(x)·x`, the SiLU, with the vectorisable exp.
#[inline(always)]
pub(crate) fn silu(x: f32) -> f32 {
    x / (1.0 + exp_approx(-x))
}

/// Runs the body once per SIMD level: the body is an `#[inline(always)]` generic function,
/// so each `#[target_feature]` wrapper gets its own vectorised copy; the level is detected
/// once at run time.
macro_rules! simd_dispatch {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),*) $(-> $ret:ty)? => $body:ident) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? { $body($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? { $body($($arg),*) }
                match $crate::kernels::cpu::simd_level() {
                    // SAFETY: the level was detected on this CPU.
                    $crate::kernels::cpu::SimdLevel::Avx512 => return unsafe { avx512($($arg),*) },
                    $crate::kernels::cpu::SimdLevel::Avx2 => return unsafe { avx2($($arg),*) },
                    $crate::kernels::cpu::SimdLevel::Baseline => {}
                }
            }
            $body($($arg),*)
        }
    };
}
pub(crate) use simd_dispatch;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum SimdLevel {
    Avx512,
    Avx2,
    Baseline,
}

pub(crate) fn simd_level() -> SimdLevel {
    static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
            {
                return SimdLevel::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return SimdLevel::Avx2;
            }
        }
        SimdLevel::Baseline
    })
}

const LANES: usize = 16;

#[inline(always)]
fn exp_sub_sum_body(row: &mut [f32], m: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (a, x) in acc.iter_mut().zip(c.iter_mut()) {
            *x = exp_approx(*x - m);
            *a += *x;
        }
    }
    let mut s = 0f32;
    for x in chunks.into_remainder() {
        *x = exp_approx(*x - m);
        s += *x;
    }
    acc.iter().sum::<f32>() + s
}

simd_dispatch! {
    /// `row[j] ← exp(row[j] − m)`; returns the sum. `−∞` entries become 0.
    pub(crate) fn exp_sub_sum(row: &mut [f32], m: f32) -> f32 => exp_sub_sum_body
}

#[inline(always)]
fn sum_exp_sub_body(row: &[f32], m: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a += exp_approx(*x - m);
        }
    }
    acc.iter().sum::<f32>()
        + chunks
            .remainder()
            .iter()
            .map(|x| exp_approx(*x - m))
            .sum::<f32>()
}

simd_dispatch! {
    /// `Σ exp(row[j] − m)`, the row left as it is.
    pub(crate) fn sum_exp_sub(row: &[f32], m: f32) -> f32 => sum_exp_sub_body
}

#[inline(always)]
fn neg_softmax_scaled_body(row: &[f32], lse: f32, g: f32, out: &mut [f32]) {
    for (o, x) in out.iter_mut().zip(row) {
        *o = -g * exp_approx(*x - lse);
    }
}

simd_dispatch! {
    /// `out[j] = −g · exp(row[j] − lse)` (`lse` the row's log-sum-exp: `−g · softmax`).
    pub(crate) fn neg_softmax_scaled(row: &[f32], lse: f32, g: f32, out: &mut [f32]) => neg_softmax_scaled_body
}

#[inline(always)]
fn neg_softmax_scaled_in_place_body(row: &mut [f32], lse: f32, g: f32) {
    for x in row.iter_mut() {
        *x = -g * exp_approx(*x - lse);
    }
}

simd_dispatch! {
    /// [`neg_softmax_scaled`] written over its input (the loss head's logits buffer).
    pub(crate) fn neg_softmax_scaled_in_place(row: &mut [f32], lse: f32, g: f32) => neg_softmax_scaled_in_place_body
}

#[inline(always)]
fn sum_sq_body(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v * v;
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().map(|v| v * v).sum::<f32>()
}

simd_dispatch! {
    /// `Σ x²` with 16 independent partial sums.
    pub(crate) fn sum_sq(x: &[f32]) -> f32 => sum_sq_body
}

/// `Σ a[i]` over a power-of-two number of lanes as a fixed tree (halves added lane-wise
/// until one is left): vectorises, and needs `log2 N` dependent adds instead of `N`. The
/// order is fixed, so the result is the same wherever it is called.
#[inline(always)]
pub(crate) fn hsum<const N: usize>(a: &[f32; N]) -> f32 {
    debug_assert!(N.is_power_of_two());
    let mut v = *a;
    let mut w = N;
    while w > 1 {
        w /= 2;
        for i in 0..w {
            v[i] += v[i + w];
        }
    }
    v[0]
}

/// `Σ x·w` over the common length: the one-row, one-column dot-product tile.
#[inline(always)]
fn dot_body<W: WeightElem>(x: &[f32], w: &[W]) -> f32 {
    let k = x.len().min(w.len());
    let mut out = [0f32];
    dots_tile::<1, 1, W>(x, k, w, k, k, &mut out, 1);
    out[0]
}

simd_dispatch! {
    /// `Σ a·b` over the common length.
    pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 => dot_body
}

simd_dispatch! {
    #[cfg(test)]
    /// `Σ x·w` over the common length, `w` widened exactly: bit for bit [`dot`] of `x` and
    /// the widened `w` (the same tile, the same order), without the widened copy.
    pub(crate) fn dot_bf16(x: &[f32], w: &[bf16]) -> f32 => dot_body
}

/// A stored weight element the dot-product tiles read: f32, or bf16 widened exactly (its
/// bits are the high half of an f32).
pub(crate) trait WeightElem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    /// 16 consecutive elements at `p`, widened.
    ///
    /// # Safety
    /// AVX-512F must be available (call only from code compiled for it) and `p` must point
    /// at 16 readable elements.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
    /// [`load16`](WeightElem::load16) as two 8-lane halves.
    ///
    /// # Safety
    /// AVX2 must be available (call only from code compiled for it) and `p` must point at
    /// 16 readable elements.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16_avx2(p: *const Self) -> [std::arch::x86_64::__m256; 2];
}

impl WeightElem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const f32) -> std::arch::x86_64::__m512 {
        std::arch::x86_64::_mm512_loadu_ps(p)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16_avx2(p: *const f32) -> [std::arch::x86_64::__m256; 2] {
        use std::arch::x86_64::*;
        [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))]
    }
}

impl WeightElem for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const bf16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        let h = _mm256_loadu_si256(p as *const __m256i);
        _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16_avx2(p: *const bf16) -> [std::arch::x86_64::__m256; 2] {
        use std::arch::x86_64::*;
        let half = |q: *const half::bf16| {
            let h = _mm_loadu_si128(q as *const __m128i);
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
        };
        [half(p), half(p.add(8))]
    }
}

/// `R` rows of `xs` (row stride `xs_stride`) against `C` rows of `ws` (stride `ws_stride`),
/// length `k`: `out[j·out_stride + i] = x_i · w_j`. Register-tiled (`R × C` accumulators of
/// 16 lanes; each loaded vector feeds `C` or `R` FMAs), but every output's arithmetic is the
/// same whatever the tile: one 16-lane FMA chain over `k` in order, the lanes summed by
/// [`hsum`], then the tail (`k mod 16`) in order. So a row's result never depends on how
/// many rows or columns run with it (the engine's batch invariance rests on this).
#[inline(always)]
fn dots_tile<const R: usize, const C: usize, W: WeightElem>(
    xs: &[f32],
    xs_stride: usize,
    ws: &[W],
    ws_stride: usize,
    k: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    let mut acc = [[[0f32; LANES]; C]; R];
    let chunks = k / LANES;
    for c in 0..chunks {
        let o = c * LANES;
        let mut w = [[0f32; LANES]; C];
        for (j, wj) in w.iter_mut().enumerate() {
            for (d, s) in wj
                .iter_mut()
                .zip(&ws[j * ws_stride + o..j * ws_stride + o + LANES])
            {
                *d = s.to_f32();
            }
        }
        for (i, ai) in acc.iter_mut().enumerate() {
            let x = &xs[i * xs_stride + o..i * xs_stride + o + LANES];
            for (aij, wj) in ai.iter_mut().zip(&w) {
                for l in 0..LANES {
                    // fused: one rounding, one instruction where the CPU has FMA (every
                    // SIMD level this is compiled for), the same value on every level
                    aij[l] = x[l].mul_add(wj[l], aij[l]);
                }
            }
        }
    }
    let tail = (xs, xs_stride, ws, ws_stride, chunks * LANES, k);
    finish_dots::<R, C, W>(|i, j| acc[i][j], tail, out, out_stride);
}

/// The end of every level's dot-product tile (so all give the same bits): for each row
/// `i < R` and weight row `j < C`, the 16 lanes of its accumulator (`lanes(i, j)`) summed by
/// [`hsum`], plus the values from `from` to `k` (`tail = (xs, xs_stride, ws, ws_stride,
/// from, k)`) in order, into `out[j·out_stride + i]`.
#[inline(always)]
#[allow(clippy::type_complexity)]
fn finish_dots<const R: usize, const C: usize, W: WeightElem>(
    lanes: impl Fn(usize, usize) -> [f32; LANES],
    tail: (&[f32], usize, &[W], usize, usize, usize),
    out: &mut [f32],
    out_stride: usize,
) {
    let (xs, xs_stride, ws, ws_stride, from, k) = tail;
    for i in 0..R {
        let x = &xs[i * xs_stride + from..i * xs_stride + k];
        for j in 0..C {
            let w = &ws[j * ws_stride + from..j * ws_stride + k];
            out[j * out_stride + i] =
                hsum(&lanes(i, j)) + x.iter().zip(w).map(|(u, v)| u * v.to_f32()).sum::<f32>();
        }
    }
}

/// The AVX-512 form of [`dots_tile`]: the same lanes, FMAs, order and final sums (so the
/// same bits), with the accumulators pinned in registers.
///
/// # Safety
/// AVX-512F must be available; the slices must hold `R` rows of `xs` and `C` rows of `ws`
/// of length `k` at their strides, and `out` the `(C − 1)·out_stride + R` outputs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
unsafe fn dots_tile_avx512<const R: usize, const C: usize, W: WeightElem>(
    xs: &[f32],
    xs_stride: usize,
    ws: &[W],
    ws_stride: usize,
    k: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    use std::arch::x86_64::*;
    debug_assert!(xs.len() >= (R - 1) * xs_stride + k && ws.len() >= (C - 1) * ws_stride + k);
    let (xp, wp) = (xs.as_ptr(), ws.as_ptr());
    let mut acc = [[_mm512_setzero_ps(); C]; R];
    let chunks = k / LANES;
    for c in 0..chunks {
        let o = c * LANES;
        let mut w = [_mm512_setzero_ps(); C];
        for (j, wj) in w.iter_mut().enumerate() {
            *wj = W::load16(wp.add(j * ws_stride + o));
            // Several weight rows at once are several streams (a 2048-wide bf16 row is one
            // 4 KiB page, where the hardware prefetcher starts over), so fetch the next
            // tile's rows at the same offset while this tile computes. One row at a time is
            // one sequential stream, which the hardware prefetcher follows: prefetching it
            // into L1 cost a fifth of the one-row read rate (`gemv_read_rate_from_memory`:
            // 35–37 against 44 GB/s, fold 50), and one row in tiles of four weight rows
            // with the L2 prefetch reads the same as one row alone (f32, same-process
            // alternation: 45–47 GB/s either way). Into L2 (`_MM_HINT_T2`): a tile ahead is
            // more lines in flight than L1's miss buffers hold, and T0 stalled the loads
            // (`gemv_read_rate_from_memory`, Zen 4, same-process alternation: f32 2 rows
            // 20–27 → 29–31 GB/s, 4 rows 21 → 25, 8 rows 13 → 18; bf16 alike). Prefetches
            // never fault; the address past the last row is only formed (wrapping), never
            // read.
            if C > 1 {
                _mm_prefetch::<_MM_HINT_T2>(wp.wrapping_add((j + C) * ws_stride + o) as *const i8);
            }
        }
        for (i, ai) in acc.iter_mut().enumerate() {
            let x = _mm512_loadu_ps(xp.add(i * xs_stride + o));
            for (aij, wj) in ai.iter_mut().zip(&w) {
                *aij = _mm512_fmadd_ps(x, *wj, *aij);
            }
        }
    }
    let lanes = |i: usize, j: usize| {
        let mut lanes = [0f32; LANES];
        _mm512_storeu_ps(lanes.as_mut_ptr(), acc[i][j]);
        lanes
    };
    let tail = (xs, xs_stride, ws, ws_stride, chunks * LANES, k);
    finish_dots::<R, C, W>(lanes, tail, out, out_stride);
}

/// The AVX2 form of [`dots_tile`]: each 16-lane accumulator as two ymm halves, the same
/// FMAs, order and final sums (so the same bits). The weight vectors are loaded one weight
/// row at a time and met by every row's `lhs` values, so a tile needs `2·R·C` accumulators
/// and two more registers (of the 16): [`dots_avx2`] keeps `R·C ≤ 4`.
///
/// # Safety
/// AVX2 and FMA must be available; the slices must hold `R` rows of `xs` and `C` rows of
/// `ws` of length `k` at their strides, and `out` the `(C − 1)·out_stride + R` outputs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dots_tile_avx2<const R: usize, const C: usize, W: WeightElem>(
    xs: &[f32],
    xs_stride: usize,
    ws: &[W],
    ws_stride: usize,
    k: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    use std::arch::x86_64::*;
    debug_assert!(xs.len() >= (R - 1) * xs_stride + k && ws.len() >= (C - 1) * ws_stride + k);
    let (xp, wp) = (xs.as_ptr(), ws.as_ptr());
    let mut acc = [[[_mm256_setzero_ps(); 2]; C]; R];
    let chunks = k / LANES;
    for c in 0..chunks {
        let o = c * LANES;
        for j in 0..C {
            let [w0, w1] = W::load16_avx2(wp.add(j * ws_stride + o));
            // the next tile's rows into L2, as in `dots_tile_avx512`
            if C > 1 {
                _mm_prefetch::<_MM_HINT_T2>(wp.wrapping_add((j + C) * ws_stride + o) as *const i8);
            }
            for (i, ai) in acc.iter_mut().enumerate() {
                let x = xp.add(i * xs_stride + o);
                let a = &mut ai[j];
                a[0] = _mm256_fmadd_ps(_mm256_loadu_ps(x), w0, a[0]);
                a[1] = _mm256_fmadd_ps(_mm256_loadu_ps(x.add(8)), w1, a[1]);
            }
        }
    }
    let lanes = |i: usize, j: usize| {
        let mut lanes = [0f32; LANES];
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc[i][j][0]);
        _mm256_storeu_ps(lanes.as_mut_ptr().add(8), acc[i][j][1]);
        lanes
    };
    let tail = (xs, xs_stride, ws, ws_stride, chunks * LANES, k);
    finish_dots::<R, C, W>(lanes, tail, out, out_stride);
}

/// [`dots_block`] on AVX2 in tiles that fit its 16 registers ([`dots_tile_avx2`]): 4 or 3
/// rows against one weight row, 2 × 2, one row against one weight row (a single row keeps
/// one weight stream, as in [`dots_in_tiles`]). The 4 × 4 tiles of the other levels need
/// 32 ymm accumulators: compiled for AVX2 from the portable body they spilled (Zen 3,
/// `gemv_read_rate_from_memory`: f32 4.6 GB/s at 8 rows against a 21 GB/s read rate).
///
/// # Safety
/// AVX2 and FMA must be available; the buffers must hold what [`dots_block`] checks.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn dots_avx2<W: WeightElem>(
    xs: &[f32],
    xs_stride: usize,
    m: usize,
    ws: &[W],
    ws_stride: usize,
    n: usize,
    k: usize,
    out: &mut [f32],
) {
    let mut i0 = 0;
    while i0 < m {
        let r = (m - i0).min(4);
        let cw = if r == 2 { 2 } else { 1 };
        let x = &xs[i0 * xs_stride..];
        let mut j0 = 0;
        while j0 < n {
            let w = &ws[j0 * ws_stride..];
            let o = &mut out[j0 * m + i0..];
            match (r, (n - j0).min(cw)) {
                (1, _) => dots_tile_avx2::<1, 1, W>(x, xs_stride, w, ws_stride, k, o, m),
                (2, 1) => dots_tile_avx2::<2, 1, W>(x, xs_stride, w, ws_stride, k, o, m),
                (2, _) => dots_tile_avx2::<2, 2, W>(x, xs_stride, w, ws_stride, k, o, m),
                (3, _) => dots_tile_avx2::<3, 1, W>(x, xs_stride, w, ws_stride, k, o, m),
                _ => dots_tile_avx2::<4, 1, W>(x, xs_stride, w, ws_stride, k, o, m),
            }
            j0 += cw;
        }
        i0 += r;
    }
}

/// All `m × n` dot products of a tile function in tiles: 4 rows × 4 weight rows (16
/// accumulators, 8 loads per 16 FMAs) while rows last; a last group of 3 rows × 4, 2 × 2, or
/// 1 row against one weight row at a time. Few rows are bound by streaming the weights, and
/// each weight row is a stream of its own: interleaving 8 of them (one 4 KiB page each for a
/// 2048-wide bf16 row) cost 20 % of 8B batch-1 decode against reading them one after the
/// other with the next one prefetched (bench, 2026-12-02).
macro_rules! dots_in_tiles {
    ($tile:ident, $w:ty, $xs:expr, $xs_stride:expr, $m:expr, $ws:expr, $ws_stride:expr, $n:expr, $k:expr, $out:expr) => {{
        let (xs, xs_stride, m, ws, ws_stride, n, k, out) =
            ($xs, $xs_stride, $m, $ws, $ws_stride, $n, $k, $out);
        macro_rules! row_tiles {
            ($r:literal, $cw:literal, $i0:expr) => {{
                let x = &xs[$i0 * xs_stride..];
                let mut j0 = 0;
                while j0 < n {
                    let w = &ws[j0 * ws_stride..];
                    let o = &mut out[j0 * m + $i0..];
                    match (n - j0).min($cw) {
                        1 => $tile::<$r, 1, $w>(x, xs_stride, w, ws_stride, k, o, m),
                        2 => $tile::<$r, 2, $w>(x, xs_stride, w, ws_stride, k, o, m),
                        3 => $tile::<$r, 3, $w>(x, xs_stride, w, ws_stride, k, o, m),
                        4 => $tile::<$r, 4, $w>(x, xs_stride, w, ws_stride, k, o, m),
                        5 => $tile::<$r, 5, $w>(x, xs_stride, w, ws_stride, k, o, m),
                        6 => $tile::<$r, 6, $w>(x, xs_stride, w, ws_stride, k, o, m),
                        7 => $tile::<$r, 7, $w>(x, xs_stride, w, ws_stride, k, o, m),
                        _ => $tile::<$r, 8, $w>(x, xs_stride, w, ws_stride, k, o, m),
                    }
                    j0 += $cw;
                }
            }};
        }
        let mut i0 = 0;
        while i0 < m {
            match m - i0 {
                1 => row_tiles!(1, 1, i0),
                2 => row_tiles!(2, 2, i0),
                3 => row_tiles!(3, 4, i0),
                _ => row_tiles!(4, 4, i0),
            }
            i0 += 4;
        }
    }};
}

/// Weight types with a portable tiled dot-product block.
pub(crate) trait DotsBlock: WeightElem {
    #[allow(clippy::too_many_arguments)]
    fn portable(
        xs: &[f32],
        xs_stride: usize,
        m: usize,
        ws: &[Self],
        ws_stride: usize,
        n: usize,
        k: usize,
        out: &mut [f32],
    );
}

/// [`DotsBlock`] for a weight type: the tiles at each SIMD level through `simd_dispatch!`
/// (which takes no generics, hence one expansion per type).
macro_rules! dots_block_for {
    ($w:ty) => {
        impl DotsBlock for $w {
            fn portable(
                xs: &[f32],
                xs_stride: usize,
                m: usize,
                ws: &[$w],
                ws_stride: usize,
                n: usize,
                k: usize,
                out: &mut [f32],
            ) {
                #[inline(always)]
                #[allow(clippy::too_many_arguments)]
                fn body(
                    xs: &[f32],
                    xs_stride: usize,
                    m: usize,
                    ws: &[$w],
                    ws_stride: usize,
                    n: usize,
                    k: usize,
                    out: &mut [f32],
                ) {
                    dots_in_tiles!(dots_tile, $w, xs, xs_stride, m, ws, ws_stride, n, k, out)
                }
                simd_dispatch! {
                    fn run(xs: &[f32], xs_stride: usize, m: usize, ws: &[$w], ws_stride: usize, n: usize, k: usize, out: &mut [f32]) => body
                }
                run(xs, xs_stride, m, ws, ws_stride, n, k, out)
            }
        }
    };
}

dots_block_for!(f32);
dots_block_for!(bf16);

/// `out[j·m + i] = x_i · w_j` (by weight row) for the `m` rows of `xs` (stride
/// `xs_stride`) and the `n` rows of `ws` (stride `ws_stride`, f32 or bf16), each equal to a
/// single-pair call, bit for bit, on every SIMD level.
#[allow(clippy::too_many_arguments)]
pub(crate) fn dots_block<W: DotsBlock>(
    xs: &[f32],
    xs_stride: usize,
    m: usize,
    ws: &[W],
    ws_stride: usize,
    n: usize,
    k: usize,
    out: &mut [f32],
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        xs.len() >= (m - 1) * xs_stride + k
            && ws.len() >= (n - 1) * ws_stride + k
            && out.len() >= n * m,
        "dots_block: buffers too small for m={m}, n={n}, k={k}"
    );
    #[cfg(target_arch = "x86_64")]
    if simd_level() == SimdLevel::Avx512 {
        #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn run<W: WeightElem>(
            xs: &[f32],
            xs_stride: usize,
            m: usize,
            ws: &[W],
            ws_stride: usize,
            n: usize,
            k: usize,
            out: &mut [f32],
        ) {
            dots_in_tiles!(
                dots_tile_avx512,
                W,
                xs,
                xs_stride,
                m,
                ws,
                ws_stride,
                n,
                k,
                out
            )
        }
        // SAFETY: AVX-512 was detected on this CPU; the sizes were checked above, and every
        // tile reads inside them.
        unsafe { run(xs, xs_stride, m, ws, ws_stride, n, k, out) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if simd_level() == SimdLevel::Avx2 {
        // SAFETY: AVX2 and FMA were detected on this CPU; the sizes were checked above, and
        // every tile reads inside them.
        unsafe { dots_avx2(xs, xs_stride, m, ws, ws_stride, n, k, out) };
        return;
    }
    W::portable(xs, xs_stride, m, ws, ws_stride, n, k, out)
}

/// The GEMV of `m` rows of `xs` (stride `xs_stride`) against the `n` rows of `ws` (stride
/// `ws_stride`), by weight row (`[n × m]`), split over the kernel pool in whole tiles when
/// `parallel`. Each weight row is read once for
/// all rows of `xs`, and each output is the batch-invariant dot of [`dots_block`].
#[allow(clippy::too_many_arguments)]
fn gemv_by_col<W: DotsBlock>(
    xs: &[f32],
    xs_stride: usize,
    m: usize,
    ws: &[W],
    ws_stride: usize,
    n: usize,
    k: usize,
    parallel: bool,
) -> Vec<f32> {
    let mut by_col = vec![0f32; n * m];
    if m == 0 || n == 0 {
        return by_col;
    }
    let block = dots_block_of(xs, xs_stride, m, ws, ws_stride, k);
    split_weight_rows(m, n, k, TILE_COLS, parallel, &mut by_col, block);
    by_col
}

/// The widest tile, in weight rows: the unit [`split_weight_rows`] hands out.
pub(crate) const TILE_COLS: usize = 8;

/// The `block(j0, c)` of [`split_weight_rows`] for the tiled dot products of [`dots_block`].
pub(crate) fn dots_block_of<'a, W: DotsBlock>(
    xs: &'a [f32],
    xs_stride: usize,
    m: usize,
    ws: &'a [W],
    ws_stride: usize,
    k: usize,
) -> impl Fn(usize, &mut [f32]) + Sync + Send + 'a {
    // The tiles sweep the weight rows once per group of 4 rows of `xs`: above 4 rows the
    // block goes a cache-sized chunk of weight rows at a time, so the later sweeps read
    // it from L2 and not from memory (a 4000-row lm_head block was read 8 times at 32 rows).
    let chunk = if m <= 4 {
        usize::MAX
    } else {
        (DOTS_CHUNK_BYTES / (k * std::mem::size_of::<W>()).max(1)).next_multiple_of(TILE_COLS)
    };
    move |j0, c| {
        let cols = c.len() / m;
        let mut s = 0;
        while s < cols {
            let e = cols.min(s.saturating_add(chunk));
            let w = &ws[(j0 + s) * ws_stride..(j0 + e - 1) * ws_stride + k];
            dots_block(
                xs,
                xs_stride,
                m,
                w,
                ws_stride,
                e - s,
                k,
                &mut c[s * m..e * m],
            );
            s = e;
        }
    }
}

/// Weight bytes a [`dots_block_of`] chunk holds: well inside a core's L2 (1 MB on Zen 4,
/// 2 MB on recent Xeons) beside the activation rows.
const DOTS_CHUNK_BYTES: usize = 256 << 10;

#[inline(always)]
fn silu_mul_body(gate: &[f32], up: &[f32], out: &mut [MaybeUninit<f32>]) {
    for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
        o.write(silu(*g) * u);
    }
}

simd_dispatch! {
    /// `out = silu(gate) · up`, written without reading `out` (fresh memory is fine).
    pub(crate) fn silu_mul(gate: &[f32], up: &[f32], out: &mut [MaybeUninit<f32>]) => silu_mul_body
}

#[inline(always)]
fn silu_mul_bf16_body(gate: &[f32], up: &[f32], out: &mut [MaybeUninit<bf16>]) {
    for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
        o.write(narrow_bf16(silu(round_bf16(*g)) * round_bf16(*u)));
    }
}

simd_dispatch! {
    /// `out = bf16(silu(bf16(gate)) · bf16(up))`: a bf16 model's SwiGLU on f32 products,
    /// every value rounded where the reference's bf16 tensors round it.
    pub(crate) fn silu_mul_bf16(gate: &[f32], up: &[f32], out: &mut [MaybeUninit<bf16>]) => silu_mul_bf16_body
}

#[inline(always)]
fn silu_mul_grad_body(gate: &[f32], up: &[f32], dy: &[f32], dgate: &mut [f32], dup: &mut [f32]) {
    for ((((dg, du), &g), &u), &d) in dgate
        .iter_mut()
        .zip(dup.iter_mut())
        .zip(gate)
        .zip(up)
        .zip(dy)
    {
        let s = 1.0 / (1.0 + exp_approx(-g));
        *dg = d * u * s * (1.0 + g * (1.0 - s));
        *du = d * g * s;
    }
}

simd_dispatch! {
    /// Gradients of `silu(gate)·up`: `dgate = dy·up·σ(g)(1 + g(1 − σ(g)))`, `dup = dy·silu(g)`.
    pub(crate) fn silu_mul_grad(gate: &[f32], up: &[f32], dy: &[f32], dgate: &mut [f32], dup: &mut [f32]) => silu_mul_grad_body
}

#[cfg(test)]
mod tests {
    /// The short loops' map gives its results in index order, on the team or the pool.
    #[test]
    fn par_map_short_keeps_the_order() {
        for n in [0, 1, 2, 37, 300] {
            let want: Vec<String> = (0..n).map(|i| format!("item {i}")).collect();
            for work in [0, 1 << 20] {
                let got = super::par_map_short(n, work, |i| format!("item {i}"));
                assert_eq!(got, want, "n {n}, work {work}");
            }
        }
    }

    /// `par_fill_zero` zeroes every value of every block, small totals (inline) and large
    /// ones (on the pool, blocks not multiples of the piece), and nothing around them.
    #[test]
    fn par_fill_zero_zeroes_every_block_and_nothing_else() {
        for sizes in [vec![3usize, 0, 17], vec![300_001, 65_536, 1, 131_071]] {
            let total: usize = sizes.iter().sum();
            let mut buf: Vec<MaybeUninit<f32>> = vec![MaybeUninit::new(f32::NAN); total + 2];
            {
                let mut rest = &mut buf[1..total + 1];
                let mut blocks = Vec::new();
                for &n in &sizes {
                    let (block, tail) = rest.split_at_mut(n);
                    blocks.push(block);
                    rest = tail;
                }
                in_pool(|| par_fill_zero(&mut blocks));
            }
            // SAFETY: every value was initialised (NaN, then zero inside the blocks).
            let vals: Vec<f32> = buf.iter().map(|v| unsafe { v.assume_init() }).collect();
            assert!(
                vals[0].is_nan() && vals[total + 1].is_nan(),
                "{sizes:?}: wrote outside"
            );
            assert!(
                vals[1..total + 1].iter().all(|&v| v == 0.0),
                "{sizes:?}: a value left"
            );
        }
    }

    /// A product into a fresh buffer equals the one into a zeroed buffer and never reads
    /// its destination (filled with NaN here, which any read would carry into the result):
    /// the gemm crate's path (large, transposed left operand, one thread and the pool), the
    /// GEMV path (few rows), an empty reduction, and a wrong destination size (an error).
    #[test]
    fn gemm_fresh_writes_every_value_and_reads_none() {
        use super::{gemm, gemm_fresh, MatMut, MatRef};
        use std::mem::MaybeUninit;
        let fill = |len: usize, s: usize| -> Vec<f32> {
            (0..len)
                .map(|i| ((i * 7 + s * 13) % 23) as f32 / 11.0 - 1.0)
                .collect()
        };
        for &(m, n, k, transposed_lhs, parallel) in &[
            (96, 80, 70, true, true),
            (96, 80, 70, false, false),
            (300, 129, 64, true, true),
            (4, 50, 33, false, true),
            (5, 7, 0, false, false),
            // the crate's own vector paths: one row, one column, a reduction of one
            (1, 50, 40, true, false),
            (70, 1, 40, false, true),
            (64, 48, 1, true, false),
            (40, 40, 40, true, false),
        ] {
            let a = fill(m * k, 1);
            let b = fill(k * n, 2);
            let lhs = if transposed_lhs {
                MatRef::rows(&a, 0, m).t()
            } else {
                MatRef::rows(&a, 0, k)
            };
            let rhs = MatRef::rows(&b, 0, n);
            let mut want = vec![0f32; m * n];
            gemm(
                m,
                n,
                k,
                MatMut::new(&mut want, 0, n),
                false,
                lhs,
                rhs,
                0.5,
                parallel,
            )
            .unwrap();
            let mut fresh = vec![MaybeUninit::new(f32::NAN); m * n];
            let got = gemm_fresh(m, n, k, &mut fresh, lhs, rhs, 0.5, parallel).unwrap();
            assert_eq!(got, &want[..], "m {m}, n {n}, k {k}");
        }
        let a = fill(8, 3);
        let mut short = vec![MaybeUninit::new(0f32); 3];
        let (l, r) = (MatRef::rows(&a, 0, 2), MatRef::rows(&a, 0, 2));
        assert!(gemm_fresh(2, 2, 2, &mut short, l, r, 1.0, false).is_err());
    }

    /// Every output of a multi-row GEMV lands at its place, whatever the split: row counts
    /// around the piece size, weight-row counts that are not multiples of the alignment or
    /// of the pieces, and the serial path for small products.
    #[test]
    fn gemv_by_weight_rows_writes_every_output_once() {
        use super::gemv_by_weight_rows;
        for &(m, n, k, align) in &[
            (2, 5001, 64, 1),
            (3, 4099, 32, 4),
            (8, 9000, 16, 8),
            (5, 700, 256, 1),
            (7, 3, 8, 1),
            (16, 1030, 64, 8),
        ] {
            let mut out = vec![f32::NAN; m * n];
            gemv_by_weight_rows(m, n, k, align, &mut out, |j0, c| {
                assert_eq!(j0 % align, 0, "block start {j0} not a multiple of {align}");
                for (r, col) in c.chunks_mut(m).enumerate() {
                    for (i, v) in col.iter_mut().enumerate() {
                        *v = (i * 100_000 + j0 + r) as f32;
                    }
                }
            });
            for i in 0..m {
                for j in 0..n {
                    assert_eq!(
                        out[i * n + j],
                        (i * 100_000 + j) as f32,
                        "m {m} n {n}: ({i}, {j})"
                    );
                }
            }
        }
    }

    /// `dot_bf16` is `dot` of `x` and the widened weights, bit for bit, at every length
    /// around the 16-lane tiles (and with the operands in `dot`'s other order).
    #[test]
    fn dot_bf16_equals_dot_of_the_widened_weights() {
        use super::{dot, dot_bf16, test_data};
        use half::bf16;
        for n in (0..70).chain([255, 256, 257, 1000, 4099]) {
            let x = test_data(n, 7);
            let w: Vec<bf16> = test_data(n, 11).into_iter().map(bf16::from_f32).collect();
            let wide: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
            let got = dot_bf16(&x, &w).to_bits();
            assert_eq!(got, dot(&x, &wide).to_bits(), "n = {n}");
            assert_eq!(got, dot(&wide, &x).to_bits(), "n = {n}");
        }
    }

    /// `cargo test --release -p zaya --lib cpu::tests::gemv_read_rate -- --ignored
    /// --nocapture`: the read rate of the one-row GEMV of [`super::gemm`] on the small
    /// config's decode shapes (f32 weights), on the kernel pool, best of 20.
    #[test]
    #[ignore = "timing, not a check"]
    fn gemv_read_rate() {
        use super::{gemm, in_pool, num_threads, test_data, MatMut, MatRef};
        println!("threads: {}", num_threads());
        for &(n, k) in &[
            (512, 512),
            (1024, 512),
            (2048, 512),
            (8192, 512),
            (32000, 512),
        ] {
            let x = test_data(k, 1);
            let w = test_data(n * k, 2);
            let mut out = vec![0f32; n];
            let product = |out: &mut [f32]| {
                gemm(
                    1,
                    n,
                    k,
                    MatMut::new(out, 0, n),
                    false,
                    MatRef::rows(&x, 0, k),
                    MatRef::rows(&w, 0, k).t(),
                    1.0,
                    true,
                )
                .unwrap()
            };
            let best = super::best_seconds(20, &mut || in_pool(|| product(&mut out)));
            // back to back from a pool thread, as inside a forward (no cross-thread
            // hand-off into the pool per call)
            let reps = 200;
            let inside = super::best_seconds(5, &mut || {
                in_pool(|| {
                    for _ in 0..reps {
                        product(&mut out)
                    }
                })
            }) / reps as f64;
            println!(
                "n={n:<6} k={k}: {:8.1} us, {:5.1} GB/s; back to back in the pool {:8.1} us, {:5.1} GB/s",
                best * 1e6,
                (n * k * 4) as f64 / best / 1e9,
                inside * 1e6,
                (n * k * 4) as f64 / inside / 1e9
            );
        }
    }

    /// `cargo test --release -p zaya --lib cpu::tests::gemv_read_rate_from_memory --
    /// --ignored --nocapture`: the one-row GEMV on the medium config's decode shapes (f32),
    /// each call on the next of 128 distinct weights (more than any L3), back to back in the
    /// pool as in a decode step, against the machine's read rate (integer fold, as `zaya
    /// bench` probes it) over the same bytes.
    #[test]
    #[ignore = "timing, not a check"]
    fn gemv_read_rate_from_memory() {
        use super::{gemv_by_col, in_pool, num_threads, DotsBlock};
        use rayon::prelude::*;
        println!("threads: {}", num_threads());
        fn case<W: DotsBlock>(name: &str, n: usize, k: usize, m: usize, to: impl Fn(f32) -> W) {
            let bytes = n * k * std::mem::size_of::<W>();
            let count = (512 << 20) / bytes;
            let ws: Vec<Vec<W>> = (0..count)
                .map(|i| {
                    super::test_data(n * k, i as u32)
                        .into_iter()
                        .map(&to)
                        .collect()
                })
                .collect();
            let x = super::test_data(m * k, 7);
            let t = super::best_seconds(3, &mut || {
                in_pool(|| {
                    for w in &ws {
                        std::hint::black_box(gemv_by_col(&x, k, m, w, k, n, k, true));
                    }
                })
            });
            let fold = super::best_seconds(3, &mut || {
                let s: u64 = in_pool(|| {
                    ws.par_iter()
                        .map(|w| {
                            let b = unsafe {
                                std::slice::from_raw_parts(
                                    w.as_ptr() as *const u32,
                                    w.len() * std::mem::size_of::<W>() / 4,
                                )
                            };
                            b.iter().fold(0u32, |a, &v| a.wrapping_add(v)) as u64
                        })
                        .sum()
                });
                std::hint::black_box(s);
            });
            let gb = (count * bytes) as f64 / 1e9;
            println!(
                "{name} n={n:<5} k={k} m={m}: GEMV {:5.1} GB/s ({:6.1} us a call), fold {:5.1} GB/s",
                gb / t,
                t / count as f64 * 1e6,
                gb / fold
            );
        }
        for m in [1, 2, 4, 8] {
            case::<f32>("f32 ", 2048, 1024, m, |v| v);
            case::<half::bf16>("bf16", 4096, 2048, m, half::bf16::from_f32);
        }
    }

    #[test]
    fn branch_free_bf16_conversions_equal_half_bit_for_bit() {
        use super::{narrow_bf16, round_bf16, widen_bf16};
        // every bf16 value, NaNs and infinities included
        for b in 0..=u16::MAX {
            let v = bf16::from_bits(b);
            assert_eq!(
                widen_bf16(v).to_bits(),
                v.to_f32().to_bits(),
                "bf16 {b:#06x}"
            );
        }
        // f32 values around every rounding boundary of every exponent, plus a sweep
        let mut xs: Vec<u32> = Vec::new();
        for hi in (0..=u16::MAX as u32).step_by(7) {
            for lo in [0u32, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF, 0x4000, 0xC000] {
                xs.push(hi << 16 | lo);
            }
        }
        xs.extend((0..2_000_000u32).map(|i| i.wrapping_mul(2_654_435_761)));
        for x in xs {
            let v = f32::from_bits(x);
            let want = bf16::from_f32(v).to_f32().to_bits();
            assert_eq!(round_bf16(v).to_bits(), want, "f32 {x:#010x}");
            assert_eq!(narrow_bf16(v).to_bits(), bf16::from_f32(v).to_bits());
        }
    }

    use super::*;

    /// Strided reads copy whole runs and give the elements in logical order: narrowed
    /// (a cache view), transposed, broadcast and size-1 axes, against an element-by-element
    /// odometer.
    #[test]
    fn strided_gather_follows_the_layout() {
        fn naive(data: &[f32], l: &Layout) -> Vec<f32> {
            let (dims, stride) = (l.dims(), l.stride());
            let n: usize = dims.iter().product();
            (0..n)
                .map(|mut i| {
                    let mut off = l.start_offset();
                    for ax in (0..dims.len()).rev() {
                        off += (i % dims[ax]) * stride[ax];
                        i /= dims[ax];
                    }
                    data[off]
                })
                .collect()
        }
        let data: Vec<f32> = (0..2 * 3 * 8 * 5).map(|i| i as f32).collect();
        let base = Layout::contiguous((2, 3, 8, 5));
        let layouts = [
            base.narrow(2, 0, 4).unwrap(),
            base.narrow(2, 3, 5).unwrap(),
            base.narrow(3, 1, 2).unwrap(),
            base.transpose(1, 2).unwrap(),
            base.narrow(0, 1, 1).unwrap().narrow(2, 2, 3).unwrap(),
            Layout::contiguous((1, 5)).broadcast_as((4, 5)).unwrap(),
            Layout::contiguous((3, 1)).broadcast_as((3, 6)).unwrap(),
        ];
        for l in &layouts {
            assert_eq!(widen(&data, l), naive(&data, l), "{l:?}");
        }
        // views large enough to be copied or widened on the pool, run by run (values exact in
        // bf16)
        let data: Vec<f32> = (0..4 * 64 * 8 * 16).map(|i| (i % 251) as f32).collect();
        let data_b: Vec<bf16> = data.iter().map(|&v| bf16::from_f32(v)).collect();
        let base = Layout::contiguous((4, 64, 8, 16));
        for l in [
            base.transpose(1, 2).unwrap(),
            base.narrow(3, 4, 8).unwrap(),
            base.narrow(1, 1, 60).unwrap(),
            base.transpose(2, 3).unwrap(),
        ] {
            assert_eq!(widen(&data_b, &l), naive(&data, &l), "{l:?}");
            assert_eq!(widen(&data, &l), naive(&data, &l), "{l:?}");
        }
    }

    /// The tiled dot products are bit-identical to one `dot` per pair, for every row and
    /// weight-row count (every tile shape and edge) and for lengths with and without a tail
    /// (the engine's batch invariance rests on this).
    #[test]
    fn tiled_dots_equal_single_dots_bit_for_bit() {
        let val = |i: usize| ((i as u32).wrapping_mul(2_654_435_761) % 2001) as f32 / 997.0 - 1.0;
        for k in [1, 15, 16, 33, 512, 517] {
            let stride = k + 3;
            let xs: Vec<f32> = (0..9 * stride).map(val).collect();
            let wstride = k + 5;
            let ws: Vec<f32> = (0..11 * wstride).map(|i| val(i * 7 + 5)).collect();
            for rows in 1..=9 {
                for cols in 1..=11 {
                    let mut out = vec![f32::NAN; rows * cols];
                    dots_block(&xs, stride, rows, &ws, wstride, cols, k, &mut out);
                    let wb: Vec<bf16> = ws.iter().map(|&v| bf16::from_f32(v)).collect();
                    let mut out_b = vec![f32::NAN; rows * cols];
                    dots_block(&xs, stride, rows, &wb, wstride, cols, k, &mut out_b);
                    // the AVX2 tiles on an AVX-512 CPU too: the same bits
                    #[cfg(target_arch = "x86_64")]
                    if simd_level() != SimdLevel::Baseline {
                        let mut o = vec![f32::NAN; rows * cols];
                        let mut o_b = vec![f32::NAN; rows * cols];
                        // SAFETY: AVX2 + FMA (every level above the baseline has them);
                        // the buffers hold `rows × k`, `cols × k` and `rows·cols` values.
                        unsafe {
                            super::dots_avx2(&xs, stride, rows, &ws, wstride, cols, k, &mut o);
                            super::dots_avx2(&xs, stride, rows, &wb, wstride, cols, k, &mut o_b);
                        }
                        for (a, b) in o.iter().zip(&out).chain(o_b.iter().zip(&out_b)) {
                            assert_eq!(a.to_bits(), b.to_bits(), "AVX2 k={k} {rows}x{cols}");
                        }
                    }
                    for j in 0..cols {
                        let w = &ws[j * wstride..j * wstride + k];
                        for i in 0..rows {
                            let x = &xs[i * stride..i * stride + k];
                            let single = dot(x, w);
                            let got = out[j * rows + i];
                            assert_eq!(
                                got.to_bits(),
                                single.to_bits(),
                                "k={k} rows={rows} cols={cols} ({i}, {j})"
                            );
                            // bf16 weights: the same against a one-pair call
                            let mut one = [f32::NAN];
                            dots_block(x, k, 1, &wb[j * wstride..], wstride, 1, k, &mut one);
                            assert_eq!(
                                out_b[j * rows + i].to_bits(),
                                one[0].to_bits(),
                                "bf16 k={k} rows={rows} cols={cols} ({i}, {j})"
                            );
                            let widened: Vec<f32> = wb[j * wstride..j * wstride + k]
                                .iter()
                                .map(|v| v.to_f32())
                                .collect();
                            assert_eq!(
                                one[0].to_bits(),
                                dot(x, &widened).to_bits(),
                                "bf16 = widened"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The tree sum is the exact sum where every partial sum is exact.
    #[test]
    fn tree_sum_adds_every_lane() {
        let a: [f32; 16] = std::array::from_fn(|i| i as f32);
        assert_eq!(hsum(&a), 120.0);
        let b: [f32; 64] = std::array::from_fn(|i| (i % 7) as f32);
        assert_eq!(hsum(&b), (0..64).map(|i| (i % 7) as f32).sum::<f32>());
    }

    #[test]
    fn exp_approx_is_within_two_ulp_of_libm() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = x.exp();
            let got = exp_approx(x);
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 2.5e-7, "worst relative error {worst}");
        assert_eq!(exp_approx(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_approx(-200.0), 0.0);
        assert_eq!(exp_approx(100.0), f32::INFINITY);
        assert!(exp_approx(f32::NAN).is_nan());
        assert_eq!(exp_approx(0.0), 1.0);
    }

    #[test]
    fn simd_primitives_match_scalar_loops() {
        let a: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..37).map(|i| (i as f32 * 0.11).cos()).collect();
        let d: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - d).abs() < 1e-5);
        let s: f32 = a.iter().map(|x| x * x).sum();
        assert!((sum_sq(&a) - s).abs() < 1e-5);
        let mut r = a.clone();
        let total = exp_sub_sum(&mut r, 0.5);
        let want: Vec<f32> = a.iter().map(|x| (x - 0.5).exp()).collect();
        for (g, w) in r.iter().zip(&want) {
            assert!((g - w).abs() < 1e-6);
        }
        assert!((total - want.iter().sum::<f32>()).abs() < 1e-5);
        // the non-mutating sum agrees with the mutating one
        assert!((sum_exp_sub(&a, 0.5) - total).abs() < 1e-6);
        let mut neg = vec![0f32; 37];
        neg_softmax_scaled(&a, 0.5, 2.0, &mut neg);
        for (g, w) in neg.iter().zip(&want) {
            assert!((g + 2.0 * w).abs() < 1e-6);
        }
        let mut out = vec![MaybeUninit::uninit(); 37];
        silu_mul(&a, &b, &mut out);
        // SAFETY: `silu_mul` wrote every element.
        let out: Vec<f32> = out.iter().map(|v| unsafe { v.assume_init() }).collect();
        for i in 0..37 {
            let want = a[i] / (1.0 + (-a[i]).exp()) * b[i];
            assert!((out[i] - want).abs() < 1e-6);
        }
        // the bf16 SwiGLU is the chain it fuses, bit for bit: both inputs rounded to bf16,
        // `silu_mul`, the result rounded (values around bf16 rounding ties included)
        let gate: Vec<f32> = (0..1000)
            .map(|i| (i as f32 - 500.0) * 0.01731 + 1e-3)
            .collect();
        let up: Vec<f32> = (0..1000)
            .map(|i| f32::from_bits(0x3f80_8000 + i * 97))
            .collect();
        let (rg, ru): (Vec<f32>, Vec<f32>) = (
            gate.iter().map(|&v| round_bf16(v)).collect(),
            up.iter().map(|&v| round_bf16(v)).collect(),
        );
        let mut chain = vec![MaybeUninit::uninit(); 1000];
        silu_mul(&rg, &ru, &mut chain);
        // SAFETY: `silu_mul` wrote every element.
        let chain: Vec<f32> = chain.iter().map(|v| unsafe { v.assume_init() }).collect();
        let mut fused = vec![MaybeUninit::uninit(); 1000];
        silu_mul_bf16(&gate, &up, &mut fused);
        for (i, (f, c)) in fused.iter().zip(&chain).enumerate() {
            // SAFETY: `silu_mul_bf16` wrote every element.
            let f = unsafe { f.assume_init() };
            assert_eq!(f.to_bits(), narrow_bf16(*c).to_bits(), "element {i}");
        }
    }

    #[test]
    fn gemm_rejects_views_outside_their_buffers() {
        let a = vec![1f32; 4];
        let mut c = vec![0f32; 4];
        let bad = gemm(
            2,
            2,
            3,
            MatMut::new(&mut c, 0, 2),
            false,
            MatRef::rows(&a, 0, 3),
            MatRef::rows(&a, 0, 2),
            1.0,
            false,
        );
        assert!(bad.is_err());
        gemm(
            2,
            2,
            2,
            MatMut::new(&mut c, 0, 2),
            false,
            MatRef::rows(&a, 0, 2),
            MatRef::rows(&a, 0, 2),
            1.0,
            false,
        )
        .unwrap();
        assert_eq!(c, vec![2.0; 4]);
    }
}
