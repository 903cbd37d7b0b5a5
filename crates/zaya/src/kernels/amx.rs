//! The AMX (Advanced Matrix Extensions) GEMM behind [`super::bf16::linear_bf16`]:
//! `out[m×n] = x[m×k] · W[n×k]ᵀ`, both operands bf16, f32 accumulation — the same products
//! as the AVX-512 BF16 kernel (`tdpbf16ps` multiplies bf16 pairs exactly and accumulates in
//! f32, flushing denormals), so results differ from it only by summation order.
//!
//! Layout: the 16×16 f32 result tiles accumulate `tdpbf16ps` of a 16×32 bf16 activation
//! tile (copied tile-major, see below) and a 16×32 weight tile in the VNNI layout
//! (pairs of bf16 along `k` interleaved: row `p` of the tile holds `W[j][2p], W[j][2p+1]`
//! for the 16 columns `j`). The weights are repacked on the fly, a panel of up to
//! [`MAX_PANEL`] weight rows at a time over the whole `k`, into a buffer that stays allocated
//! for the thread; the panel stays in L2 while every block of 32 activation rows passes over
//! it, 2 × 2 result tiles at a time held in tile registers over the whole `k` (no partial
//! sums through memory), the next steps' tiles prefetched into L1. Panels are split across
//! the kernel pool — each weight element is packed exactly once per call, and every output
//! element is computed by the same sequence of instructions whatever the thread count
//! (bit-identical results).
//!
//! Every buffer tiles are loaded from is 64-byte aligned: a tile row that straddles two cache lines makes
//! `tileloadd` three times slower (measured). Edges: `x` is copied into a zero-padded
//! tile-major buffer (rows to a multiple of 32, columns to a multiple of 32; 16×32 tiles
//! contiguous, so the 16 rows of a tile do not fall into one L1 set as rows 4 KiB apart
//! would); weight panels are zero-padded the same way, and result tiles that cross the edge
//! of `out` go through a scratch tile.
//!
//! Run time: CPUID (AMX-BF16 and AMX-TILE) and Linux's permission for the tile data
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`); without either, [`available`]
//! is false and callers use the AVX-512 BF16 kernel. `ZAYA_AMX=0` (or `off`) turns it off.

use std::arch::asm;
use std::cell::RefCell;
use std::mem::MaybeUninit;
use std::sync::OnceLock;

use half::bf16;

use super::cpu;

/// Most weight rows packed per task (sixteen 16-column tile groups, 1 MiB at k = 2048: the
/// panel stays in L2 while every block of activation rows passes over it).
const MAX_PANEL: usize = 256;
/// Most bytes of a packed weight panel (half the L2 of a Sapphire Rapids core: the
/// activation block and the prefetched tiles need the rest).
const PANEL_BYTES: usize = 1 << 20;
/// Largest packed-activation buffer kept by a thread between calls (a 512-token prefill at
/// k = 2048 takes 2 MiB).
const KEEP_ACTIVATION_BYTES: usize = 16 << 20;
/// bf16 per `k` step of a tile (16 rows × 64 bytes).
const KS: usize = 32;
/// Activation rows per micro-kernel step (two result-tile rows).
const MB: usize = 32;
/// Steps of `k` between a tile's prefetch into L1 and its load: a tile load that misses L1
/// runs at a third of the speed of one that hits it (Sapphire Rapids, 2 × 2 result tiles:
/// ~1.7 TFLOP/s per core from L2 against ~3.5 with the next tiles prefetched, ~5.3 from L1).
const PREFETCH_STEPS: usize = 2;

/// Whether the CPU has AMX-BF16 and the OS lets this process use the tile data.
pub(crate) fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        // CPUID is always available on x86_64.
        let (max, l7) = (
            std::arch::x86_64::__cpuid(0).eax,
            std::arch::x86_64::__cpuid_count(7, 0),
        );
        let amx_bf16 = l7.edx & (1 << 22) != 0;
        let amx_tile = l7.edx & (1 << 24) != 0;
        // the tile packing runs on AVX-512 F (every CPU with AMX has it)
        let avx512 = is_x86_feature_detected!("avx512f");
        if max < 7 || !amx_bf16 || !amx_tile || !avx512 {
            return false;
        }
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: a plain syscall with integer arguments; refused (non-zero) on kernels or
        // configurations without AMX support.
        let r = unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            )
        };
        r == 0
    })
}

/// [`available`] and not turned off with `ZAYA_AMX=0|off|false` (read once).
pub(crate) fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        let off = std::env::var("ZAYA_AMX")
            .map(|v| {
                matches!(
                    v.trim().to_ascii_lowercase().as_str(),
                    "0" | "off" | "false"
                )
            })
            .unwrap_or(false);
        !off && available()
    })
}

/// The palette-1 tile configuration: all eight tiles 16 rows × 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn full() -> Self {
        let mut c = [0u8; 64];
        c[0] = 1; // palette 1
        for t in 0..8 {
            c[16 + 2 * t..16 + 2 * t + 2].copy_from_slice(&64u16.to_le_bytes());
            c[48 + t] = 16;
        }
        TileConfig(c)
    }
}

/// The packed activations ([`pack_activations`]): `rows × ld` bf16 in tile-major order,
/// `rows` a multiple of 32, `ld` of 32.
#[derive(Clone, Copy)]
struct Act {
    p: *const bf16,
    ld: usize,
}
// SAFETY: read-only, outlives the tasks.
unsafe impl Send for Act {}
unsafe impl Sync for Act {}

/// A 64-byte aligned bf16 buffer that keeps its allocation across calls (tile loads from
/// it never straddle cache lines).
#[derive(Default)]
struct AlignedBuf(Vec<Line>);

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([bf16; 32]);

impl AlignedBuf {
    fn bytes(&self) -> usize {
        self.0.len() * std::mem::size_of::<Line>()
    }

    /// The first `len` elements, grown (zeroed) where the buffer is shorter; the contents
    /// are whatever the last use left.
    fn slice(&mut self, len: usize) -> &mut [bf16] {
        let lines = len.div_ceil(32);
        if self.0.len() < lines {
            self.0.resize(lines, Line([bf16::ZERO; 32]));
        }
        // SAFETY: `lines` lines of 32 bf16 each hold at least `len` bf16.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr() as *mut bf16, len) }
    }
}

thread_local! {
    /// The packed activations of the products this thread starts ([`gemm`]).
    static ACTIVATIONS: RefCell<AlignedBuf> = RefCell::new(AlignedBuf::default());
    /// The packed weight panel of this thread, reused across tasks and calls.
    static PACKED: RefCell<AlignedBuf> = RefCell::new(AlignedBuf::default());
}

/// `out[m×n] = x[m×k] · W[n×k]ᵀ`, every element of `out` written (it need not be cleared
/// or even initialized first). Callers check [`available`] and the slice sizes
/// (`x: m·k`, `w: n·k`, `out: m·n`); `m, n, k > 0`.
pub(crate) fn gemm(
    x: &[bf16],
    m: usize,
    k: usize,
    w: &[bf16],
    n: usize,
    out: &mut [MaybeUninit<f32>],
) {
    assert!(available() && k > 0 && x.len() == m * k && w.len() == n * k && out.len() == m * n);
    if m == 0 || n == 0 {
        return;
    }
    let kp = k.next_multiple_of(KS);
    let mp = m.next_multiple_of(MB);
    ACTIVATIONS.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            packed_product(x, m, k, mp, kp, w, n, out, buf.slice(mp * kp));
            // a long prefill's activations are not kept for the life of the thread
            if buf.bytes() > KEEP_ACTIVATION_BYTES {
                *buf = AlignedBuf::default();
            }
        }
        // a product started while this thread's buffer is in use (the pool ran another
        // task while this one waits for its panels)
        Err(_) => packed_product(
            x,
            m,
            k,
            mp,
            kp,
            w,
            n,
            out,
            AlignedBuf::default().slice(mp * kp),
        ),
    });
}

/// [`gemm`] with the activations packed into `packed_x` (`mp × kp`, 64-byte aligned).
#[allow(clippy::too_many_arguments)]
fn packed_product(
    x: &[bf16],
    m: usize,
    k: usize,
    mp: usize,
    kp: usize,
    w: &[bf16],
    n: usize,
    out: &mut [MaybeUninit<f32>],
    packed_x: &mut [bf16],
) {
    pack_activations(x, m, k, mp, kp, packed_x);
    let act = Act {
        p: packed_x.as_ptr(),
        ld: kp,
    };
    let o = cpu::ColumnsOut::uninit(out);
    // at least one panel per thread where `n` allows it, up to MAX_PANEL rows and
    // PANEL_BYTES of packed weight
    let panel = panel_width(n, kp, cpu::num_threads());
    cpu::par_map(n.div_ceil(panel), m * n * k, |b| {
        let j0 = b * panel;
        let j1 = (j0 + panel).min(n);
        PACKED.with(|buf| {
            let mut buf = buf.borrow_mut();
            let groups = (j1 - j0).div_ceil(16).next_multiple_of(2);
            let packed = buf.slice(groups * 16 * kp);
            pack_panel(w, k, kp, j0, j1, groups, packed);
            // SAFETY: AMX is available (asserted) and permitted; the activation buffer
            // holds `mp × kp`, the panel `groups × 16 × kp`, both 64-byte aligned; the
            // panel's columns `j0..j1` of `out` belong to this task alone.
            unsafe { panel_product(act, mp, kp, packed, groups, m, n, j0, j1, o.ptr()) }
        });
    });
}

/// Weight rows per task of [`gemm`]: at least one panel per thread where `n` allows it,
/// up to [`MAX_PANEL`] rows and [`PANEL_BYTES`] of packed weight, a multiple of [`MB`].
fn panel_width(n: usize, kp: usize, threads: usize) -> usize {
    n.div_ceil(threads.max(1))
        .next_multiple_of(MB)
        .min(MAX_PANEL)
        .min((PANEL_BYTES / (2 * kp.max(KS))) / MB * MB)
        .max(MB)
}

/// Copies `x` into tile-major order in `buf`: the 16×32 tile of rows `16·b..` and columns
/// `32·s..` is 1 KiB at `(b · kp/32 + s) · 512`, zero-padded to `mp × kp` (every element
/// written, so the buffer is reused as it is). Rows of `x` at their own stride (2·k bytes,
/// 4 KiB at k = 2048) would put the 16 rows of a tile in one L1 set.
/// The blocks of 16 rows are packed in parallel (each is a contiguous `16 × kp` part of
/// `buf`): one thread copying a prefill's activations while the other waited was ~3 % of
/// an 8B prefill, once per projection.
fn pack_activations(x: &[bf16], m: usize, k: usize, mp: usize, kp: usize, buf: &mut [bf16]) {
    assert!(buf.len() >= mp * kp && x.len() >= m * k);
    let steps = kp / KS;
    cpu::par_chunks_mut(&mut buf[..mp * kp], 16 * kp, |b, block| {
        for r in 0..16 {
            let i = 16 * b + r;
            let row = if i < m {
                &x[i * k..(i + 1) * k]
            } else {
                &[][..]
            };
            for s in 0..steps {
                let at = s * 512 + r * KS;
                let src = &row[(s * KS).min(row.len())..((s + 1) * KS).min(row.len())];
                block[at..at + src.len()].copy_from_slice(src);
                block[at + src.len()..at + KS].fill(bf16::ZERO);
            }
        }
    });
}

/// Packs `W[j0..j1, 0..k]` into `groups` VNNI tile columns of 16 weight rows each, `kp/2`
/// pair-rows per group, zero beyond `j1` and `k`. Every element of the `groups · 16 · kp`
/// buffer is written (no clearing first): 16 pair-rows of a group at a time are one 16×16
/// transpose of 32-bit pairs in AVX-512 registers, the weight rows' tails read masked.
fn pack_panel(
    w: &[bf16],
    k: usize,
    kp: usize,
    j0: usize,
    j1: usize,
    groups: usize,
    buf: &mut [bf16],
) {
    let group_len = kp * 16;
    assert!(buf.len() >= groups * group_len);
    assert!(j1 <= j0 + groups * 16 && j1 * k <= w.len() && kp >= k && kp.is_multiple_of(KS));
    for g in 0..groups {
        let first = j0 + 16 * g;
        let cols = j1.saturating_sub(first).min(16);
        let dst = &mut buf[g * group_len..(g + 1) * group_len];
        debug_assert!(is_x86_feature_detected!("avx512f"));
        let rows = if cols == 0 {
            &[][..]
        } else {
            &w[first * k..(first + cols) * k]
        };
        // SAFETY: callers checked [`available`] (AVX-512 F).
        unsafe { pack_group(rows, k, kp, cols, dst) };
    }
}

/// One group of [`pack_panel`]: `rows` (`cols` weight rows of `k`) into `dst`, `kp/2`
/// pair-rows of 16 pairs, zero beyond `cols` and `k`: 16 pair-rows at a time are one 16×16
/// transpose of bf16 pairs ([`cpu::transpose_blocks_16x16`]), the rows' last, partial block
/// transposed from a zero-padded copy.
///
/// # Safety
/// AVX-512F must be available.
unsafe fn pack_group(rows: &[bf16], k: usize, kp: usize, cols: usize, dst: &mut [bf16]) {
    assert!(rows.len() == cols * k && dst.len() == kp * 16 && cols <= 16);
    let dp = dst.as_mut_ptr() as *mut u32;
    // whole blocks of 16 pairs (32 bf16) in every row; missing rows read zeros
    let blocks = k / KS;
    let zeros = if cols < 16 {
        vec![0u32; 16 * blocks]
    } else {
        Vec::new()
    };
    let row = |c: usize| {
        if c < cols {
            rows[c * k..].as_ptr() as *const u32
        } else {
            zeros.as_ptr()
        }
    };
    // SAFETY: AVX-512F (the caller's); each row holds `16 · blocks` pairs, `dst` the
    // `16 · blocks` pair-rows of 16 written.
    cpu::transpose_blocks_16x16(row, blocks, dp, 16);
    if KS * blocks < kp {
        let mut tail = [[bf16::ZERO; KS]; 16];
        for (c, t) in tail.iter_mut().enumerate().take(cols) {
            t[..k - KS * blocks].copy_from_slice(&rows[c * k + KS * blocks..(c + 1) * k]);
        }
        // SAFETY: as above; the tail block's 16 pair-rows end at `kp/2`, inside `dst`.
        cpu::transpose_blocks_16x16(
            |c| tail[c].as_ptr() as *const u32,
            1,
            dp.add(16 * blocks * 16),
            16,
        );
    }
}

/// `out[0..m, j0..j1] = act · panelᵀ`, blocks of 32 activation rows × 32 weight columns
/// (2 × 2 result tiles in tmm0–3, activation tiles in tmm4–5, weight tiles in tmm6–7), each
/// over the whole `k` with its result in the tiles. The activation block (`32 × kp`) is
/// read once per 32 weight columns and the panel once per activation block, both from L2,
/// the tiles of step `s + PREFETCH_STEPS` prefetched into L1 while step `s` runs.
#[allow(clippy::too_many_arguments)]
unsafe fn panel_product(
    act: Act,
    mp: usize,
    kp: usize,
    panel: &[bf16],
    groups: usize,
    m: usize,
    n: usize,
    j0: usize,
    j1: usize,
    out: *mut f32,
) {
    let cfg = TileConfig::full();
    asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly));
    let ld64: isize = 64;
    let ldo = (n * 4) as isize;
    let group_len = kp * 16;
    let steps = kp / KS;
    let mut scratch = Tiles4([[0.0; 256]; 4]);
    let mut i0 = 0;
    while i0 < mp {
        // tile-major activations: 16 rows × kp columns per tile row, 512 bf16 per step
        let a0 = act.p.add(i0 * act.ld);
        let a1 = a0.add(16 * act.ld);
        let mut g = 0;
        while g < groups {
            let b0 = panel.as_ptr().add(g * group_len);
            let b1 = b0.add(group_len);
            zero4();
            for s in 0..steps {
                if s + PREFETCH_STEPS < steps {
                    let at = (s + PREFETCH_STEPS) * 512;
                    prefetch_tile(a0.add(at));
                    prefetch_tile(a1.add(at));
                    prefetch_tile(b0.add(at));
                    prefetch_tile(b1.add(at));
                }
                asm!(
                    "tileloadd tmm4, [{a0} + {ld}*1]",
                    "tileloadd tmm6, [{b0} + {ld}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tileloadd tmm7, [{b1} + {ld}*1]",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tileloadd tmm5, [{a1} + {ld}*1]",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    a0 = in(reg) a0.add(s * 512),
                    a1 = in(reg) a1.add(s * 512),
                    b0 = in(reg) b0.add(s * 512),
                    b1 = in(reg) b1.add(s * 512),
                    ld = in(reg) ld64,
                    options(nostack, readonly)
                );
            }
            let (i, j) = (i0, j0 + 16 * g);
            if i + MB <= m && j + 32 <= j1 {
                // a whole 32 × 32 block of `out`: stored in place
                let c0 = out.add(i * n + j);
                let c2 = c0.add(16 * n);
                asm!(
                    "tilestored [{c0} + {ldo}*1], tmm0",
                    "tilestored [{c1} + {ldo}*1], tmm1",
                    "tilestored [{c2} + {ldo}*1], tmm2",
                    "tilestored [{c3} + {ldo}*1], tmm3",
                    c0 = in(reg) c0,
                    c1 = in(reg) c0.add(16),
                    c2 = in(reg) c2,
                    c3 = in(reg) c2.add(16),
                    ldo = in(reg) ldo,
                    options(nostack)
                );
            } else {
                store4(&mut scratch.0);
                for (t, tile) in scratch.0.iter().enumerate() {
                    let (ti, tj) = (i + 16 * (t / 2), j + 16 * (t % 2));
                    let cols = j1.saturating_sub(tj).min(16);
                    if cols == 0 {
                        // a padding tile (the panel's groups are rounded up to pairs): its
                        // place would lie past `out`
                        continue;
                    }
                    for r in 0..16.min(m.saturating_sub(ti)) {
                        std::ptr::copy_nonoverlapping(
                            tile.as_ptr().add(16 * r),
                            out.add((ti + r) * n + tj),
                            cols,
                        );
                    }
                }
            }
            g += 2;
        }
        i0 += MB;
    }
    asm!("tilerelease", options(nostack, nomem));
}

/// Four 16×16 f32 result tiles, 64-byte aligned.
#[repr(C, align(64))]
struct Tiles4([[f32; 256]; 4]);

/// Prefetches the 16 cache lines of a 1 KiB tile into L1.
#[inline(always)]
unsafe fn prefetch_tile(p: *const bf16) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    let p = p as *const i8;
    for l in 0..16 {
        _mm_prefetch::<_MM_HINT_T0>(p.add(64 * l));
    }
}

/// Activation rows per block of [`gemm_streamed`] (two right-operand tiles).
const SM: usize = 32;
/// Weight rows per task of [`gemm_streamed`] when one activation tile covers `x` (four
/// left-operand tiles streamed through two tile registers).
const SN1: usize = 64;
/// Weight rows per task of [`gemm_streamed`] otherwise (two left-operand tiles).
const SN2: usize = 32;

/// Whether [`gemm_streamed`] takes these sizes: `k` a whole number of tile steps (the weight
/// rows are loaded in place, so a step may not run past a row).
pub(crate) fn streams(k: usize) -> bool {
    k > 0 && k.is_multiple_of(KS)
}

thread_local! {
    /// Zero-padded copy of the last, partial block of weight rows ([`gemm_streamed`]).
    static TAIL: RefCell<Vec<bf16>> = const { RefCell::new(Vec::new()) };
}

/// `out[m×n] = x[m×k] · W[n×k]ᵀ` for few activation rows (an expert's share of a prefill,
/// a short prompt). [`gemm`] packs every weight into tiles first; with few rows that copy
/// costs more than the product. Here the roles swap: the weight rows are the tiles' left
/// operand, loaded straight from `W` (row stride `2k` bytes, each weight read once), the
/// activations — packed once per call into the VNNI pair layout — the right operand, and
/// the result tiles (`outᵀ`, 16 weight rows × 16 activation rows) are transposed on the
/// way out. Each output element is the same sequence of `tdpbf16ps` pair products in the
/// same `k` order as in [`gemm`] (the two operands of a product swap places, which changes
/// nothing), so the two kernels agree bit for bit and a row's result does not depend on
/// the other rows. Every element of `out` is written (it need not be initialized first).
/// Callers check [`available`], [`streams`] and the slice sizes.
pub(crate) fn gemm_streamed(
    x: &[bf16],
    m: usize,
    k: usize,
    w: &[bf16],
    n: usize,
    out: &mut [MaybeUninit<f32>],
) {
    assert!(
        available() && streams(k) && x.len() == m * k && w.len() == n * k && out.len() == m * n
    );
    if m == 0 || n == 0 {
        return;
    }
    let mp = m.next_multiple_of(16);
    let xb = pack_pairs(x, m, k, mp);
    let xs = Act {
        p: xb.as_ptr(),
        ld: k,
    };
    let o = cpu::ColumnsOut::uninit(out);
    let block = if mp == 16 { SN1 } else { SN2 };
    cpu::par_map(n.div_ceil(block), m * n * k, |b| {
        let j0 = b * block;
        let rows = block.min(n - j0);
        let run = |a: *const bf16| {
            // SAFETY: AMX is available (asserted) and permitted; `a` holds `block` weight
            // rows of `k` (in place, or the padded tail copy), `xs` holds `mp × k`; the
            // rows `j0..j0 + rows` of every output row belong to this task alone.
            unsafe { streamed_block(a, k, xs, m, mp, n, j0, rows, o.ptr()) }
        };
        if rows == block {
            run(w[j0 * k..].as_ptr());
        } else {
            TAIL.with(|t| {
                let mut t = t.borrow_mut();
                t.clear();
                t.extend_from_slice(&w[j0 * k..(j0 + rows) * k]);
                t.resize(block * k, bf16::ZERO);
                run(t.as_ptr());
            });
        }
    });
}

/// `x` in the VNNI pair layout of a right-hand tile: for the 16 rows `16g..` of `x`, pair-row
/// `p` holds `x[16g + c][2p], x[16g + c][2p + 1]` for `c = 0..16` (64 bytes), at
/// `(g · k/2 + p) · 32`; rows `m..mp` are zero.
fn pack_pairs(x: &[bf16], m: usize, k: usize, mp: usize) -> Vec<bf16> {
    let mut buf = vec![bf16::ZERO; mp * k];
    let half = k / 2;
    for (i, row) in x.chunks_exact(k).take(m).enumerate() {
        let (g, c) = (i / 16, i % 16);
        let base = g * half * 32 + c * 2;
        for (p, pair) in row.chunks_exact(2).enumerate() {
            let at = base + p * 32;
            buf[at] = pair[0];
            buf[at + 1] = pair[1];
        }
    }
    buf
}

/// One task of [`gemm_streamed`]: the weight rows `j0..j0 + rows` (at `a`, `block` rows of
/// stride `k`) against every activation row. One activation tile (`mp == 16`): four weight
/// tiles per step, streamed through tmm4/tmm5 against the activations in tmm6, results in
/// tmm0–3. Otherwise, per block of 32 activation rows: two weight tiles (tmm4, tmm5) × two
/// activation tiles (tmm6, tmm7), results in tmm0–3. The results stay in the tiles across
/// the whole `k`.
#[allow(clippy::too_many_arguments)]
unsafe fn streamed_block(
    a: *const bf16,
    k: usize,
    xs: Act,
    m: usize,
    mp: usize,
    n: usize,
    j0: usize,
    rows: usize,
    out: *mut f32,
) {
    let cfg = TileConfig::full();
    asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly));
    let lda = (2 * k) as isize;
    let ld64: isize = 64;
    let steps = k / KS;
    // one right-hand tile spans 16 pair-rows: 512 bf16
    let group = k * 16;
    let mut c = Tiles4([[0f32; 256]; 4]);
    let c = &mut c.0;
    if mp == 16 {
        let a1 = a.add(16 * k);
        let a2 = a.add(32 * k);
        let a3 = a.add(48 * k);
        zero4();
        for s in 0..steps {
            asm!(
                "tileloadd tmm6, [{b} + {ld}*1]",
                "tileloadd tmm4, [{a0} + {lda}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm5, [{a1} + {lda}*1]",
                "tdpbf16ps tmm1, tmm5, tmm6",
                "tileloadd tmm4, [{a2} + {lda}*1]",
                "tdpbf16ps tmm2, tmm4, tmm6",
                "tileloadd tmm5, [{a3} + {lda}*1]",
                "tdpbf16ps tmm3, tmm5, tmm6",
                b = in(reg) xs.p.add(s * 512),
                a0 = in(reg) a.add(s * KS),
                a1 = in(reg) a1.add(s * KS),
                a2 = in(reg) a2.add(s * KS),
                a3 = in(reg) a3.add(s * KS),
                ld = in(reg) ld64,
                lda = in(reg) lda,
                options(nostack, readonly)
            );
        }
        store4(c);
        for (t, tile) in c.iter().enumerate() {
            scatter(
                tile,
                out,
                n,
                m,
                0,
                j0 + 16 * t,
                rows.saturating_sub(16 * t).min(16),
            );
        }
    } else {
        let a1 = a.add(16 * k);
        let mut i0 = 0;
        while i0 < mp {
            let b0 = xs.p.add((i0 / 16) * group);
            // a last block of 16 rows pairs its tile with a zero tile of the padding
            let b1 = if i0 + 16 < mp { b0.add(group) } else { b0 };
            zero4();
            for s in 0..steps {
                asm!(
                    "tileloadd tmm6, [{b0} + {ld}*1]",
                    "tileloadd tmm4, [{a0} + {lda}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tileloadd tmm7, [{b1} + {ld}*1]",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tileloadd tmm5, [{a1} + {lda}*1]",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    b0 = in(reg) b0.add(s * 512),
                    b1 = in(reg) b1.add(s * 512),
                    a0 = in(reg) a.add(s * KS),
                    a1 = in(reg) a1.add(s * KS),
                    ld = in(reg) ld64,
                    lda = in(reg) lda,
                    options(nostack, readonly)
                );
            }
            store4(c);
            let r0 = rows.min(16);
            let r1 = rows.saturating_sub(16);
            scatter(&c[0], out, n, m, i0, j0, r0);
            scatter(&c[2], out, n, m, i0, j0 + 16, r1);
            if i0 + 16 < mp {
                scatter(&c[1], out, n, m, i0 + 16, j0, r0);
                scatter(&c[3], out, n, m, i0 + 16, j0 + 16, r1);
            }
            i0 += SM;
        }
    }
    asm!("tilerelease", options(nostack, nomem));
}

/// Clears the result tiles tmm0–3.
#[inline(always)]
unsafe fn zero4() {
    asm!(
        "tilezero tmm0",
        "tilezero tmm1",
        "tilezero tmm2",
        "tilezero tmm3",
        options(nostack, nomem)
    );
}

/// Stores tmm0–3 into four 16×16 f32 tiles.
#[inline(always)]
unsafe fn store4(c: &mut [[f32; 256]; 4]) {
    let ld: isize = 64;
    asm!(
        "tilestored [{c0} + {ld}*1], tmm0",
        "tilestored [{c1} + {ld}*1], tmm1",
        "tilestored [{c2} + {ld}*1], tmm2",
        "tilestored [{c3} + {ld}*1], tmm3",
        c0 = in(reg) c[0].as_mut_ptr(),
        c1 = in(reg) c[1].as_mut_ptr(),
        c2 = in(reg) c[2].as_mut_ptr(),
        c3 = in(reg) c[3].as_mut_ptr(),
        ld = in(reg) ld,
        options(nostack)
    );
}

/// Writes a result tile of [`streamed_block`] (row `r` = weight row `j + r`, column `c` =
/// activation row `i + c`) into `out[i + c][j + r]`, for the `rows` valid weight rows and
/// the activation rows below `m`.
#[inline(always)]
unsafe fn scatter(
    tile: &[f32; 256],
    out: *mut f32,
    n: usize,
    m: usize,
    i: usize,
    j: usize,
    rows: usize,
) {
    if rows == 0 {
        return;
    }
    for c in 0..16.min(m.saturating_sub(i)) {
        let dst = out.add((i + c) * n + j);
        for r in 0..rows {
            *dst.add(r) = tile[r * 16 + c];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`super::gemm`] on an `f32` buffer (the tests fill it with NaN first: every element
    /// must be written).
    fn gemm(x: &[bf16], m: usize, k: usize, w: &[bf16], n: usize, out: &mut [f32]) {
        // SAFETY: the kernel writes only values.
        super::gemm(x, m, k, w, n, unsafe { cpu::as_uninit(out) })
    }

    /// [`super::gemm_streamed`] on an `f32` buffer, as [`gemm`].
    fn gemm_streamed(x: &[bf16], m: usize, k: usize, w: &[bf16], n: usize, out: &mut [f32]) {
        // SAFETY: the kernel writes only values.
        super::gemm_streamed(x, m, k, w, n, unsafe { cpu::as_uninit(out) })
    }

    fn data(n: usize, seed: u32) -> Vec<bf16> {
        (0..n)
            .map(|i| {
                let v = (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 2001) as f32 / 1000.0;
                bf16::from_f32(v - 1.0)
            })
            .collect()
    }

    /// f64 product of the widened operands and the sum of |products| (the scale of the
    /// f32 summation-order error).
    fn reference(x: &[bf16], m: usize, k: usize, w: &[bf16], n: usize) -> Vec<(f64, f64)> {
        let mut out = vec![(0.0, 0.0); m * n];
        for i in 0..m {
            for j in 0..n {
                let (mut s, mut a) = (0f64, 0f64);
                for t in 0..k {
                    let p = x[i * k + t].to_f64() * w[j * k + t].to_f64();
                    s += p;
                    a += p.abs();
                }
                out[i * n + j] = (s, a);
            }
        }
        out
    }

    /// Summation-order tolerance: a few f32 ulps of the largest partial sums.
    fn close(g: f32, want: f64, abs_sum: f64) -> bool {
        (g as f64 - want).abs() <= 2e-6 * abs_sum + 1e-30
    }

    fn skip() -> bool {
        if !available() {
            eprintln!("AMX (amx-bf16 + amx-tile with OS permission) not available: skipped");
            return true;
        }
        false
    }

    #[test]
    fn amx_matches_the_widened_product_and_the_dot_kernel() {
        if skip() {
            return;
        }
        let shapes = [
            (1, 32, 16),
            (15, 48, 33),
            (17, 32, 16),
            (64, 2048, 33),
            (513, 48, 2048),
            (17, 2048, 16),
            (1, 2048, 2048),
            (64, 32, 2048),
            (15, 2048, 33),
            (513, 32, 33),
            (33, 37, 70),
            (40, 1, 7),
        ];
        for &(m, k, n) in &shapes {
            let x = data(m * k, 3);
            let w = data(n * k, 5);
            let want = reference(&x, m, k, &w, n);
            let mut out = vec![f32::NAN; m * n];
            gemm(&x, m, k, &w, n, &mut out);
            for (idx, (g, (r, a))) in out.iter().zip(&want).enumerate() {
                assert!(close(*g, *r, *a), "m={m} k={k} n={n} at {idx}: {g} vs {r}");
            }
            // the AVX-512 BF16 kernel (or the widening path) on the same operands
            let mut dot = vec![f32::NAN; m * n];
            // SAFETY: the kernel writes only values.
            let dot_out = unsafe { cpu::as_uninit(&mut dot) };
            super::super::bf16::linear_bf16_without_amx(&x, m, k, &w, n, dot_out).unwrap();
            for (idx, (g, (d, (_, a)))) in out.iter().zip(dot.iter().zip(&want)).enumerate() {
                assert!(
                    close(*g, *d as f64, 2.0 * a),
                    "m={m} k={k} n={n} at {idx}: amx {g} vs dot {d}"
                );
            }
        }
    }

    #[test]
    fn streamed_weights_equal_the_packed_kernel_bit_for_bit() {
        if skip() {
            return;
        }
        // one and several activation tiles, partial tiles, weight-row tails of each task size
        let shapes = [
            (1, 32, 16),
            (3, 64, 70),
            (16, 2048, 64),
            (17, 96, 33),
            (31, 2048, 130),
            (32, 64, 32),
            (40, 128, 95),
            (70, 2048, 300),
        ];
        for &(m, k, n) in &shapes {
            assert!(streams(k));
            let x = data(m * k, 21);
            let w = data(n * k, 22);
            let want = reference(&x, m, k, &w, n);
            let mut packed = vec![f32::NAN; m * n];
            gemm(&x, m, k, &w, n, &mut packed);
            let mut streamed = vec![f32::NAN; m * n];
            cpu::in_pool(|| gemm_streamed(&x, m, k, &w, n, &mut streamed));
            for (idx, (s, (r, a))) in streamed.iter().zip(&want).enumerate() {
                assert!(close(*s, *r, *a), "m={m} k={k} n={n} at {idx}: {s} vs {r}");
            }
            assert!(
                streamed
                    .iter()
                    .zip(&packed)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "m={m} k={k} n={n}: streamed and packed AMX kernels differ"
            );
            // a row's result does not depend on the rows beside it
            let mut first = vec![f32::NAN; n];
            gemm_streamed(&x[..k], 1, k, &w, n, &mut first);
            assert!(first
                .iter()
                .zip(&streamed[..n])
                .all(|(a, b)| a.to_bits() == b.to_bits()));
        }
        assert!(!streams(48) && !streams(0));
    }

    /// The VNNI panel layout written one element at a time: pair-row `p` of group `g` holds
    /// `W[j0 + 16g + c][2p], W[j0 + 16g + c][2p + 1]` for `c = 0..16`, zero elsewhere.
    fn pack_panel_scalar(
        w: &[bf16],
        k: usize,
        kp: usize,
        j0: usize,
        j1: usize,
        groups: usize,
    ) -> Vec<bf16> {
        let mut buf = vec![bf16::ZERO; groups * kp * 16];
        for g in 0..groups {
            for c in 0..16 {
                let j = j0 + 16 * g + c;
                if j >= j1 {
                    continue;
                }
                for t in 0..k {
                    buf[g * kp * 16 + (t / 2) * 32 + 2 * c + t % 2] = w[j * k + t];
                }
            }
        }
        buf
    }

    #[test]
    fn packed_panels_hold_the_vnni_layout() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        // odd and short k, partial groups, a reused buffer holding stale values
        let mut buf = vec![bf16::from_f32(7.0); 4 * 2080 * 16];
        let buf = &mut buf[..];
        for &(k, n, j0, j1) in &[
            (1usize, 16usize, 0usize, 16usize),
            (1, 16, 0, 16),
            (33, 40, 16, 40),
            (64, 64, 0, 64),
            (2047, 70, 64, 70),
            (2080, 128, 0, 50),
            (5, 3, 0, 3),
        ] {
            let kp = k.next_multiple_of(KS);
            let groups = (j1 - j0).div_ceil(16).next_multiple_of(2);
            let w = data(n * k, 31);
            let want = pack_panel_scalar(&w, k, kp, j0, j1, groups);
            pack_panel(&w, k, kp, j0, j1, groups, buf);
            assert!(
                buf[..want.len()]
                    .iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "k={k} n={n} j0={j0} j1={j1}"
            );
        }
    }

    #[test]
    fn panel_widths_are_whole_tile_pairs_within_the_l2_budget() {
        for threads in [1, 2, 3, 8, 64] {
            for n in [1, 16, 33, 128, 2048, 262272] {
                for kp in [32, 1024, 2048, 8192, 32768] {
                    let p = panel_width(n, kp, threads);
                    assert!(
                        p >= MB && p.is_multiple_of(MB) && p <= MAX_PANEL,
                        "n={n} kp={kp} t={threads}"
                    );
                    // the budget holds wherever one panel of 32 rows fits in it
                    assert!(
                        p * 2 * kp <= PANEL_BYTES || p == MB,
                        "n={n} kp={kp} t={threads}"
                    );
                    // two threads get two panels of the 8B's products
                    if threads == 2 && n >= 2 * MB {
                        assert!(n.div_ceil(p) >= 2, "n={n} kp={kp}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_product_started_while_the_activation_buffer_is_held_gets_its_own() {
        if skip() {
            return;
        }
        let (m, k, n) = (40, 96, 50);
        let x = data(m * k, 41);
        let w = data(n * k, 42);
        let mut want = vec![f32::NAN; m * n];
        gemm(&x, m, k, &w, n, &mut want);
        let mut got = vec![f32::NAN; m * n];
        ACTIVATIONS.with(|cell| {
            let _held = cell.borrow_mut();
            gemm(&x, m, k, &w, n, &mut got);
        });
        assert!(got
            .iter()
            .zip(&want)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
    }

    #[test]
    fn amx_is_identical_across_panel_widths() {
        if skip() {
            return;
        }
        let (m, k, n) = (70, 2048 + 32, 300);
        let x = data(m * k, 9);
        let w = data(n * k, 13);
        let mut pooled = vec![0f32; m * n];
        cpu::in_pool(|| gemm(&x, m, k, &w, n, &mut pooled));
        // panels of 32 weight rows, one after the other on one thread, against `gemm`'s
        // wider panels split over the pool
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let mut single = vec![0f32; m * n];
        one.install(|| {
            let o = cpu::ColumnsOut::new(&mut single);
            let (kp, mp) = (k.next_multiple_of(KS), m.next_multiple_of(MB));
            let mut buf = AlignedBuf::default();
            let buf = buf.slice(mp * kp);
            pack_activations(&x, m, k, mp, kp, buf);
            let act = Act {
                p: buf.as_ptr(),
                ld: kp,
            };
            // panels of 32 rows: not the widths `gemm` takes on two threads
            for b in 0..n.div_ceil(MB) {
                let (j0, j1) = (b * MB, (b * MB + MB).min(n));
                let groups = (j1 - j0).div_ceil(16).next_multiple_of(2);
                let mut panel = AlignedBuf::default();
                let panel = panel.slice(groups * 16 * kp);
                pack_panel(&w, k, kp, j0, j1, groups, panel);
                // SAFETY: as in `gemm`.
                unsafe { panel_product(act, mp, kp, panel, groups, m, n, j0, j1, o.ptr()) };
            }
        });
        assert!(pooled
            .iter()
            .zip(&single)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
    }

    /// `cargo test --release -p zaya amx_bench -- --ignored --nocapture`: GFLOP/s of the AMX,
    /// AVX-512 BF16 and f32 (gemm crate) products on prefill shapes.
    /// What `tdpbf16ps` computes per output element, bit for bit: for each bf16 pair the
    /// two exact products are summed and rounded to f32 once, then added to the accumulator
    /// (a second rounding) — `acc + (p0 + p1)`. Not two fused multiply-adds in either order
    /// (`vdpbf16ps` here equals `(acc + p1) + p0`): on values over 24 binades those
    /// matched 171 of 256 outputs each, this model all 256. So the AMX kernels and the
    /// AVX-512 BF16 dot kernel differ by rounding as well as summation order, and no
    /// `vdpbf16ps` kernel can give AMX's bits (the reason decode's rows, which must not
    /// depend on how many run together, stay on one kernel family).
    /// What `tdpbf16ps` computes, as far as a model reproduces it bit for bit. With one
    /// non-zero pair per output element per instruction (a right-hand tile holding each
    /// activation pair on its own column's diagonal), each pair's two exact products are
    /// summed and rounded to f32, then added to the accumulator: `acc + (p0 + p1)`, on every
    /// output. With all 16 pairs of a step non-zero (the kernels' layout) neither that
    /// sequence over the pairs nor the two fused steps of `vdpbf16ps` (`(acc + p1) + p0`)
    /// gives its bits: within one instruction the 32 products are combined in an order or
    /// precision of the hardware's own (here the exact sum of the step rounded once, a
    /// pairwise tree, and either sequence each matched only 3–57 % of the outputs). So the
    /// AMX kernels and the dot kernel differ by rounding, not only by summation order, and
    /// decode's rows — whose results may not depend on how many run together — stay on one
    /// kernel family (`linear_bf16`'s GEMV up to `GEMV_ROWS` rows).
    #[test]
    fn tdpbf16ps_rounds_a_lone_pair_sum_then_accumulates() {
        if skip() {
            return;
        }
        let (k, rows) = (2048usize, 16usize);
        let steps = k / KS;
        // normal values over 24 binades (no subnormal products: the instruction flushes them)
        let val = |i: usize, seed: u32| {
            let h = (i as u32).wrapping_mul(2_654_435_761) ^ seed;
            let mant = (h % 2001) as f32 / 1000.0 - 1.0;
            let e = ((h >> 12) % 24) as i32 - 12;
            bf16::from_f32(mant * 2f32.powi(e))
        };
        let w: Vec<bf16> = (0..rows * k).map(|i| val(i, 7)).collect();
        let x: Vec<bf16> = (0..k).map(|i| val(i, 99)).collect();
        let product = |p: usize, j: usize| {
            let p0 = w[j * k + 2 * p].to_f32() * x[2 * p].to_f32();
            let p1 = w[j * k + 2 * p + 1].to_f32() * x[2 * p + 1].to_f32();
            (p0, p1)
        };
        // right-hand tile of step s: pair-row q, column c holds x's pair 16s + q where c == q
        let mut b = vec![bf16::ZERO; steps * 512];
        for s in 0..steps {
            for q in 0..16 {
                let p = s * 16 + q;
                b[s * 512 + q * 32 + q * 2] = x[2 * p];
                b[s * 512 + q * 32 + q * 2 + 1] = x[2 * p + 1];
            }
        }
        let mut c = Tiles4([[0f32; 256]; 4]);
        // SAFETY: AMX is available and permitted (checked above); every tile load reads
        // 16 rows of 64 bytes inside `b` and `w` (row stride 2k bytes, 16 rows).
        unsafe {
            let cfg = TileConfig::full();
            asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly));
            zero4();
            for s in 0..steps {
                asm!(
                    "tileloadd tmm6, [{b} + {ld}*1]",
                    "tileloadd tmm4, [{a} + {lda}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    b = in(reg) b.as_ptr().add(s * 512),
                    a = in(reg) w.as_ptr().add(s * KS),
                    ld = in(reg) 64isize,
                    lda = in(reg) (2 * k) as isize,
                    options(nostack, readonly)
                );
            }
            store4(&mut c.0);
            asm!("tilerelease", options(nostack, nomem));
        }
        let (mut lone, mut fused) = (0, 0);
        for j in 0..rows {
            for lane in 0..16 {
                let (mut a, mut f) = (0f32, 0f32);
                for s in 0..steps {
                    let (p0, p1) = product(s * 16 + lane, j);
                    a += p0 + p1;
                    f = (f + p1) + p0;
                }
                let g = c.0[0][j * 16 + lane].to_bits();
                lone += (g == a.to_bits()) as usize;
                fused += (g == f.to_bits()) as usize;
            }
        }
        assert_eq!(
            lone,
            16 * rows,
            "acc + (p0 + p1) matched {lone} of {}",
            16 * rows
        );
        assert!(
            fused < 16 * rows,
            "the two fused steps matched every output too"
        );

        // the kernels' layout: every pair of a step non-zero
        let xs: Vec<bf16> = (0..16 * k).map(|i| val(i, 99)).collect();
        let mut out = vec![f32::NAN; 16 * rows];
        gemm_streamed(&xs, 16, k, &w, rows, &mut out);
        let mut sequential = 0;
        for i in 0..16 {
            for j in 0..rows {
                let mut a = 0f32;
                for p in 0..k / 2 {
                    let p0 = w[j * k + 2 * p].to_f32() * xs[i * k + 2 * p].to_f32();
                    let p1 = w[j * k + 2 * p + 1].to_f32() * xs[i * k + 2 * p + 1].to_f32();
                    a += p0 + p1;
                }
                sequential += (out[i * rows + j].to_bits() == a.to_bits()) as usize;
            }
        }
        assert!(
            sequential < 16 * rows / 2,
            "the pair sums in sequence matched {sequential} of {} outputs of a full step",
            16 * rows
        );
    }

    #[test]
    #[ignore]
    fn amx_bench() {
        let best = |f: &mut dyn FnMut()| cpu::best_seconds(5, f);
        println!("threads: {}", cpu::num_threads());
        for &(m, k, n) in &[
            (512, 2048, 2048),
            (512, 2048, 8192),
            (512, 8192, 2048),
            // MoE experts of a prefill: few rows each
            (16, 1024, 2048),
            (32, 1024, 2048),
            (64, 1024, 2048),
            (128, 1024, 2048),
        ] {
            let x = data(m * k, 3);
            let w = data(n * k, 5);
            let mut out = vec![0f32; m * n];
            let flop = 2.0 * (m * n * k) as f64;
            let mut line = format!("m={m} k={k} n={n}:");
            if available() {
                let t = best(&mut || cpu::in_pool(|| gemm(&x, m, k, &w, n, &mut out)));
                line += &format!("  amx {:.0} GFLOP/s ({:.2} ms)", flop / t / 1e9, t * 1e3);
            }
            let t = best(&mut || {
                cpu::in_pool(|| {
                    // SAFETY: the kernel writes only values.
                    let o = unsafe { cpu::as_uninit(&mut out) };
                    super::super::bf16::linear_bf16_without_amx(&x, m, k, &w, n, o).unwrap()
                })
            });
            line += &format!(
                "  vdpbf16ps {:.0} GFLOP/s ({:.2} ms)",
                flop / t / 1e9,
                t * 1e3
            );
            let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
            let wf: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
            let t = best(&mut || {
                cpu::in_pool(|| unsafe {
                    gemm::gemm(
                        m,
                        n,
                        k,
                        out.as_mut_ptr(),
                        1,
                        n as isize,
                        false,
                        xf.as_ptr(),
                        1,
                        k as isize,
                        wf.as_ptr(),
                        k as isize,
                        1,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::Rayon(cpu::num_threads()),
                    )
                })
            });
            line += &format!(
                "  f32 gemm {:.0} GFLOP/s ({:.2} ms)",
                flop / t / 1e9,
                t * 1e3
            );
            println!("{line}");
        }
    }

    /// `cargo test --release -p zaya --lib amx_expert_share_speed -- --ignored --nocapture`:
    /// an expert's share of a prefill (a few rows against a gate/up weight read from
    /// memory: eight 16 MiB experts in turn), the weight-streaming against the packing AMX
    /// kernel — where [`super::super::bf16`] switches from one to the other.
    #[test]
    #[ignore]
    fn amx_expert_share_speed() {
        if skip() {
            return;
        }
        let best = |f: &mut dyn FnMut()| cpu::best_seconds(3, f);
        let (k, n, experts) = (2048, 4096, 8);
        let w = data(experts * n * k, 5);
        for m in [8, 16, 24, 32, 48, 64, 96, 128, 256, 512] {
            let x = data(m * k, 3);
            let mut out = vec![0f32; m * n];
            let gflop = 2.0 * (experts * m * n * k) as f64 / 1e9;
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
            let (ts, tp) = (run(gemm_streamed), run(gemm));
            println!(
                "m={m:<3} k={k} n={n}: streamed {:.0} GFLOP/s, packed {:.0} GFLOP/s",
                gflop / ts,
                gflop / tp
            );
        }
    }
}
