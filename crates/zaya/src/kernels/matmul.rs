//! The `matmul` kernel's fast implementation: the system OpenBLAS `sgemm` for f32 2-D
//! operands (cargo feature `blas`), as a custom op whose backward runs through the same
//! dispatcher (so gradients also use BLAS). Transposed operands (a linear layer's `Wᵀ`)
//! are passed to BLAS as transposed, without copies. Without the feature the registry
//! never selects it and candle's own gemm (the reference) runs.

use candle_core::{Result, Tensor};

/// Whether the BLAS implementation is built in (its library is linked at build time, so
/// being built in means being loadable).
pub fn blas_available() -> bool {
    cfg!(feature = "blas")
}

#[cfg(feature = "blas")]
mod imp {
    use std::sync::Once;

    use candle_core::backend::BackendStorage;
    use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

    use crate::kernels::cpu::{self, f32_view};
    use crate::kernels::KernelError;

    extern "C" {
        // OpenBLAS' own thread control (not part of CBLAS).
        fn openblas_set_num_threads(n: std::ffi::c_int);
    }

    fn init_threads() {
        static ONCE: Once = Once::new();
        ONCE.call_once(|| {
            let n = cpu::num_threads().min(i32::MAX as usize) as std::ffi::c_int;
            // SAFETY: plain setter of OpenBLAS' global thread count.
            unsafe { openblas_set_num_threads(n) };
        });
    }

    /// How a 2-D operand is handed to BLAS: transposed or not, leading dimension and
    /// element offset; `None` if its strides fit neither row- nor column-major.
    fn blas_operand(l: &Layout) -> Option<(bool, usize, usize)> {
        let (&[rows, cols], &[rs, cs]) = (l.dims(), l.stride()) else {
            return None;
        };
        let off = l.start_offset();
        // Strides of size-1 axes are arbitrary in candle layouts; ignore them.
        if cols == 1 || cs == 1 {
            let ld = if rows == 1 { cols.max(1) } else { rs };
            if ld >= cols.max(1) {
                return Some((false, ld, off));
            }
        }
        if rows == 1 || rs == 1 {
            let ld = if cols == 1 { rows.max(1) } else { cs };
            if ld >= rows.max(1) {
                return Some((true, ld, off));
            }
        }
        None
    }

    struct BlasMatmul;

    impl CustomOp2 for BlasMatmul {
        fn name(&self) -> &'static str {
            "zaya-blas-matmul"
        }

        fn cpu_fwd(
            &self,
            sa: &CpuStorage,
            la: &Layout,
            sb: &CpuStorage,
            lb: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            use cblas_sys::{cblas_sgemm, CBLAS_LAYOUT, CBLAS_TRANSPOSE};
            let (CpuStorage::F32(a), CpuStorage::F32(b)) = (sa, sb) else {
                return Err(KernelError::UnsupportedDtype {
                    op: "matmul",
                    dtype: sa.dtype(),
                }
                .into());
            };
            let (&[m, k], &[kb, n]) = (la.dims(), lb.dims()) else {
                return Err(KernelError::Shape {
                    op: "matmul",
                    message: format!(
                        "blas matmul takes 2-D operands, got {:?} and {:?}",
                        la.dims(),
                        lb.dims()
                    ),
                }
                .into());
            };
            if kb != k {
                return Err(KernelError::Shape {
                    op: "matmul",
                    message: format!("inner dimensions differ: {:?} · {:?}", la.dims(), lb.dims()),
                }
                .into());
            }
            let mut c = vec![0f32; m * n];
            if m == 0 || n == 0 {
                return Ok((CpuStorage::F32(c), Shape::from_dims(&[m, n])));
            }
            // Operands with unusual strides are copied to row-major first.
            let (a_own, a_op) = match blas_operand(la) {
                Some(op) => (None, op),
                None => (
                    Some(f32_view(sa, la, "matmul")?.into_owned()),
                    (false, k.max(1), 0),
                ),
            };
            let (b_own, b_op) = match blas_operand(lb) {
                Some(op) => (None, op),
                None => (
                    Some(f32_view(sb, lb, "matmul")?.into_owned()),
                    (false, n.max(1), 0),
                ),
            };
            let a_data: &[f32] = a_own.as_deref().unwrap_or(a);
            let b_data: &[f32] = b_own.as_deref().unwrap_or(b);
            let tr = |t: bool| {
                if t {
                    CBLAS_TRANSPOSE::CblasTrans
                } else {
                    CBLAS_TRANSPOSE::CblasNoTrans
                }
            };
            // Bounds of what BLAS will read, checked before the unchecked call.
            let extent = |(t, ld, off): (bool, usize, usize), rows: usize, cols: usize| {
                if t {
                    off + (cols - 1) * ld + rows
                } else {
                    off + (rows - 1) * ld + cols
                }
            };
            if k > 0 && (extent(a_op, m, k) > a_data.len() || extent(b_op, k, n) > b_data.len()) {
                return Err(KernelError::Internal("blas operand out of bounds".into()).into());
            }
            if k > 0 {
                init_threads();
                let as_int = |v: usize| {
                    i32::try_from(v).map_err(|_| {
                        KernelError::Internal(format!("blas dimension {v} exceeds i32"))
                    })
                };
                // SAFETY: extents checked above; `c` is m×n row-major with ld n.
                unsafe {
                    cblas_sgemm(
                        CBLAS_LAYOUT::CblasRowMajor,
                        tr(a_op.0),
                        tr(b_op.0),
                        as_int(m)?,
                        as_int(n)?,
                        as_int(k)?,
                        1.0,
                        a_data.as_ptr().add(a_op.2),
                        as_int(a_op.1)?,
                        b_data.as_ptr().add(b_op.2),
                        as_int(b_op.1)?,
                        0.0,
                        c.as_mut_ptr(),
                        as_int(n)?,
                    );
                }
            }
            Ok((CpuStorage::F32(c), Shape::from_dims(&[m, n])))
        }

        fn bwd(
            &self,
            a: &Tensor,
            b: &Tensor,
            _c: &Tensor,
            grad: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>)> {
            let da = a
                .track_op()
                .then(|| crate::kernels::matmul(grad, &b.t()?))
                .transpose()?;
            let db = b
                .track_op()
                .then(|| crate::kernels::matmul(&a.t()?, grad))
                .transpose()?;
            Ok((da, db))
        }
    }

    pub(super) fn blas(a: &Tensor, b: &Tensor) -> Result<Tensor> {
        a.apply_op2(b, BlasMatmul)
    }
}

/// `a · b` on the system BLAS (`a` `[m, k]`, `b` `[k, n]`, f32, CPU).
pub(super) fn blas(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "blas")]
    {
        imp::blas(a, b)
    }
    #[cfg(not(feature = "blas"))]
    {
        // The registry only selects BLAS when it is built in; stay correct regardless.
        super::reference::matmul(a, b)
    }
}

/// `x · Wᵀ` for a contiguous f32 weight `W [N, K]` (the linear-layer layout), `x` `[M, K]`
/// f32, any `M`, as a custom op with its own backward:
///
/// - up to [`super::cpu::GEMV_ROWS`] rows (decode) [`super::cpu::gemm`]'s GEMV reads each
///   row of `W` once for all rows of `x`, rows of `W` split across the threads (decode is
///   bound by reading the weights, and a general GEMM spends most of its time packing at
///   this size);
/// - above, on AVX-512 CPUs, [`super::sgemm`] — the kernel of the busy experts' shares: it
///   reads `W` in place, where the `gemm` crate packs the whole weight on every call, and
///   a weight read once per forward comes cold from memory (medium prefill 1×512, Zen 4, 2
///   threads, six alternated binary pairs: median paired ratio +2.4 %, 498–571 → 490–613
///   tok/s); each output one FMA chain in `k` order, whatever the rows or threads, written
///   into a fresh buffer without a zero fill;
/// - elsewhere the `gemm` crate with the operands candle's matmul passes it (so the same
///   products in the same order), written into a fresh buffer that is never zero-filled
///   first (candle's matmul clears every output on the calling thread while the pool waits);
/// - the backward writes `dx = g · W` into a fresh buffer too, and `dW = gᵀ · x` straight
///   in `W`'s `[N, K]` layout: the op takes `W` itself, so the gradient reaches the weight
///   as it is. Through candle's `x.matmul(&w.t())`, `xᵀ · g` came out `[K, N]` and the
///   gradient store copied its transpose into place on one thread — a strided copy of
///   every weight gradient (5–9 % of a training step).
///
/// A custom op with a backward, so it runs whether or not gradients are recorded: a
/// checkpointed layer's first, untracked pass and its tracked recompute take the same
/// path. Other layouts and dtypes take the reference.
pub(crate) fn f32_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    use candle_core::DType;
    let fits = x.dtype() == DType::F32
        && w.dtype() == DType::F32
        && x.rank() == 2
        && w.rank() == 2
        && w.is_contiguous();
    if !fits {
        return super::reference::matmul(x, &w.t()?);
    }
    x.apply_op2(w, F32Weight { rhs: Rhs::Weight })
}

/// `[x · W₁ᵀ, x · W₂ᵀ, …]` for contiguous f32 weights of one input width and a decode
/// step's f32 rows (up to [`super::cpu::GEMV_ROWS`]): one GEMV over all the weights' rows
/// ([`super::cpu::gemv_side_by_side`]), each output equal to [`f32_linear`]'s. `None` where
/// that does not apply (more rows, a gradient graph, other dtypes or layouts, not the
/// CPU): the caller runs the products one by one. bf16 weights are not taken: the same
/// over `bf16::dot` was no faster on the 8B (0.978 and 1.010 at b1 in alternated pairs)
/// and slower at b8 (0.958 on the 8B-shaped 4-layer model).
pub(crate) fn f32_linear_same_input(x: &Tensor, ws: &[&Tensor]) -> Result<Option<Vec<Tensor>>> {
    use candle_core::{CpuStorage, DType, Storage};
    let Ok((m, k)) = x.dims2() else {
        return Ok(None);
    };
    let fits = x.dtype() == DType::F32
        && x.device().is_cpu()
        && (1..=super::cpu::GEMV_ROWS).contains(&m)
        && !x.track_op()
        && ws.iter().all(|w| {
            w.dtype() == DType::F32
                && w.dims2().is_ok_and(|(_, wk)| wk == k)
                && w.is_contiguous()
                && !w.track_op()
        });
    if !fits {
        return Ok(None);
    }
    let ns: Vec<usize> = ws.iter().map(|w| w.dim(0)).collect::<Result<_>>()?;
    let n: usize = ns.iter().sum();
    // read locks on every weight and the input for the product (nothing writes to them
    // while a forward reads them)
    let guards: Vec<_> = ws.iter().map(|w| w.storage_and_layout()).collect();
    let mut weights = Vec::with_capacity(ws.len());
    for ((storage, layout), &wn) in guards.iter().zip(&ns) {
        let (Storage::Cpu(CpuStorage::F32(d)), Some((a, b))) =
            (&**storage, layout.contiguous_offsets())
        else {
            return Ok(None);
        };
        weights.push((&d[a..b], wn));
    }
    let mut out = vec![0f32; m * n];
    super::cpu::with_cpu_storage(x, "matmul", |s, l| {
        let xs = super::cpu::f32_view(s, l, "matmul")?;
        super::cpu::gemv_side_by_side(&xs, m, k, &weights, &mut out)
    })?;
    let y = Tensor::from_vec(out, (m, n), x.device())?;
    super::cpu::split_last_axis(&y, &ns).map(Some)
}

/// [`f32_linear`] for a caller holding `b = Wᵀ` (a `[K, N]` view of a contiguous `W`):
/// the same products, with `b`'s gradient `xᵀ · g` written `[K, N]` (as candle's backward
/// does: a gradient of a view, which the store then copies into the weight's layout).
pub(crate) fn f32_weight(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    use candle_core::DType;
    let fits = a.dtype() == DType::F32
        && b.dtype() == DType::F32
        && a.rank() == 2
        && b.rank() == 2
        && b.t()?.is_contiguous();
    if !fits {
        return super::reference::matmul(a, b);
    }
    a.apply_op2(
        b,
        F32Weight {
            rhs: Rhs::Transposed,
        },
    )
}

/// Which form of the weight [`F32Weight`]'s second input is.
#[derive(Clone, Copy, PartialEq)]
enum Rhs {
    /// `W [N, K]`, contiguous.
    Weight,
    /// `Wᵀ [K, N]`, the transposed view of a contiguous `W`.
    Transposed,
}

/// The op of [`f32_linear`] and [`f32_weight`]: `x [M, K] · Wᵀ` for a contiguous f32
/// `W [N, K]`.
struct F32Weight {
    rhs: Rhs,
}

fn matmul_error(what: &str) -> candle_core::Error {
    super::KernelError::Internal(format!("matmul-f32-weight: {what}")).into()
}

/// `lhs [m × k] · rhs [k × n]` as `m · n` new values, row-major, never zero-filled first
/// where the `gemm` crate writes them.
fn fresh_values(
    m: usize,
    n: usize,
    k: usize,
    lhs: super::cpu::MatRef<'_>,
    rhs: super::cpu::MatRef<'_>,
) -> Result<Vec<f32>> {
    let mut out = super::cpu::uninit_f32(m * n);
    super::cpu::gemm_fresh(m, n, k, &mut out, lhs, rhs, 1.0, true)?;
    // SAFETY: `gemm_fresh` wrote every value (it returned without error).
    Ok(unsafe { out.assume_init() }.into_vec())
}

/// The forward product `x · Wᵀ` of [`F32Weight`] as fresh values: more than
/// [`super::cpu::GEMV_ROWS`] rows on [`super::sgemm`] where it runs (it reads `W` in
/// place), else [`super::cpu::gemm_fresh`] as in [`fresh_values`]. The choice depends only
/// on the shapes and the CPU, so a checkpointed layer's recompute takes the same path as
/// its first pass.
fn forward_values(
    m: usize,
    n: usize,
    k: usize,
    x: super::cpu::MatRef<'_>,
    wt: super::cpu::MatRef<'_>,
) -> Result<Vec<f32>> {
    super::sgemm::gemm_new(super::cpu::GEMV_ROWS + 1, m, n, k, x, wt)
}

/// [`fresh_values`] as a `[m, n]` f32 tensor on `like`'s device.
fn fresh_product(
    m: usize,
    n: usize,
    k: usize,
    lhs: super::cpu::MatRef<'_>,
    rhs: super::cpu::MatRef<'_>,
    like: &Tensor,
) -> Result<Tensor> {
    Tensor::from_vec(fresh_values(m, n, k, lhs, rhs)?, (m, n), like.device())
}

impl candle_core::CustomOp2 for F32Weight {
    fn name(&self) -> &'static str {
        "matmul-f32-weight"
    }

    fn cpu_fwd(
        &self,
        a_s: &candle_core::CpuStorage,
        a_l: &candle_core::Layout,
        b_s: &candle_core::CpuStorage,
        b_l: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use super::cpu::{f32_view, MatRef};
        let (m, k) = a_l.shape().dims2()?;
        let (n, kb) = match self.rhs {
            Rhs::Weight => b_l.shape().dims2()?,
            Rhs::Transposed => {
                let (kb, n) = b_l.shape().dims2()?;
                (n, kb)
            }
        };
        if kb != k {
            return Err(matmul_error(&format!(
                "[{m}, {k}] against a [{n}, {kb}] weight"
            )));
        }
        let candle_core::CpuStorage::F32(w) = b_s else {
            return Err(matmul_error("the weight is not f32"));
        };
        // W's rows are contiguous, `k` apart
        let rows_contiguous = match self.rhs {
            Rhs::Weight => b_l.is_contiguous(),
            Rhs::Transposed => !(n > 1 && b_l.stride()[1] != k || k > 1 && b_l.stride()[0] != 1),
        };
        if !rows_contiguous {
            return Err(matmul_error("the weight's rows are not contiguous"));
        }
        let x = f32_view(a_s, a_l, "matmul")?;
        let start = b_l.start_offset();
        let w = &w[start..start + n * k];
        let out = forward_values(m, n, k, MatRef::rows(&x, 0, k), MatRef::rows(w, 0, k).t())?;
        Ok((
            candle_core::CpuStorage::F32(out),
            candle_core::Shape::from_dims(&[m, n]),
        ))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        use super::cpu::{f32_view, with_cpu_storage, MatRef};
        let (want_a, want_b) = (a.track_op(), b.track_op());
        if !want_a && !want_b {
            return Ok((None, None));
        }
        let (m, k) = a.dims2()?;
        // W [N, K] (a contiguous view of `b` when `b` is Wᵀ)
        let w = match self.rhs {
            Rhs::Weight => b.clone(),
            Rhs::Transposed => b.t()?,
        };
        let n = w.dim(0)?;
        if grad.dims() != [m, n] {
            return Err(matmul_error(&format!(
                "gradient {:?} for a [{m}, {n}] product",
                grad.dims()
            )));
        }
        with_cpu_storage(grad, "matmul", |g_s, g_l| {
            let g = f32_view(g_s, g_l, "matmul")?;
            let da = if want_a {
                // da = g · W: the operands candle's backward passes for `grad.matmul(&b.t())`.
                Some(with_cpu_storage(&w, "matmul", |w_s, w_l| {
                    let w = f32_view(w_s, w_l, "matmul")?;
                    fresh_product(m, k, n, MatRef::rows(&g, 0, n), MatRef::rows(&w, 0, k), a)
                })?)
            } else {
                None
            };
            let db = if want_b {
                Some(with_cpu_storage(a, "matmul", |a_s, a_l| {
                    let x = f32_view(a_s, a_l, "matmul")?;
                    let (g, x) = (MatRef::rows(&g, 0, n), MatRef::rows(&x, 0, k));
                    match self.rhs {
                        // dW = gᵀ · x, in the weight's own [N, K] layout
                        Rhs::Weight => fresh_product(n, k, m, g.t(), x, a),
                        // d(Wᵀ) = xᵀ · g, [K, N] as candle computes it
                        Rhs::Transposed => fresh_product(k, n, m, x.t(), g, a),
                    }
                })?)
            } else {
                None
            };
            Ok((da, db))
        })
    }
}

/// `a · b` with `b = Wᵀ` of a contiguous bf16 weight `W [N, K]` (`a` bf16 or f32) through
/// [`super::bf16::linear`] / [`super::bf16::linear_bf16`]: the weight is read in place, the
/// product accumulates in f32 and is rounded once to `a`'s dtype. Inference only (no backward): calls
/// that record gradients, and other layouts, take the reference.
pub(crate) fn bf16_weight(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    use candle_core::{CpuStorage, DType};
    let w = b.t()?;
    let fits = b.dtype() == DType::BF16
        && matches!(a.dtype(), DType::F32 | DType::BF16)
        && !b.track_op()
        && w.is_contiguous()
        && a.device().is_cpu();
    if !fits {
        return super::reference::matmul(a, b);
    }
    if a.track_op() {
        // A frozen weight under a graph (adapters over a bf16 base): the same kernel
        // forward, and a backward for the input only.
        return a.apply_op1(FrozenBf16Linear { w });
    }
    let (m, k) = a.dims2()?;
    let n = w.dim(0)?;
    // bf16 activations stay bf16 (exact in either form; the bf16 × bf16 kernel uses the
    // CPU's bf16 dot products for prefill-sized products), f32 ones are read as they are;
    // both in place where `a` is contiguous.
    let a = if a.dtype() == DType::BF16 && !a.is_contiguous() {
        a.contiguous()?
    } else {
        a.clone()
    };
    // two read locks held over the product: nothing writes to a weight or to an activation
    // while a forward reads it
    let out = super::cpu::with_cpu_storage(&a, "matmul", |xs, xl| {
        super::cpu::with_cpu_storage(&w, "matmul", |s, l| {
            let w = bf16_weight_slice(s, l)?;
            match (xs, xl.contiguous_offsets()) {
                (CpuStorage::BF16(x), Some((a0, a1))) => {
                    let rows = super::bf16::Rows::Whole;
                    super::bf16::linear_bf16_new(rows, &x[a0..a1], m, k, w, n)
                }
                // strided `a` (made contiguous above where it is bf16) and f32 activations
                _ => {
                    let x = super::cpu::f32_view(xs, xl, "matmul")?;
                    let mut out = vec![0f32; m * n];
                    super::bf16::linear(&x, m, k, w, n, &mut out)?;
                    Ok(out)
                }
            }
        })
    })?;
    super::cpu::tensor_from_f32(out, &candle_core::Shape::from((m, n)), a.dtype(), &a)
}

/// The elements of a contiguous bf16 weight's storage.
fn bf16_weight_slice<'a>(
    s: &'a candle_core::CpuStorage,
    l: &candle_core::Layout,
) -> Result<&'a [half::bf16]> {
    use candle_core::backend::BackendStorage;
    let candle_core::CpuStorage::BF16(d) = s else {
        return Err(candle_core::Error::Msg(format!(
            "matmul: unexpected storage {:?}",
            s.dtype()
        )));
    };
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("matmul: weight is not contiguous".into()))?;
    Ok(&d[start..end])
}

/// `x · Wᵀ` for a frozen contiguous bf16 `W [N, K]` with a backward for `x` only: forward
/// through [`super::bf16::linear`] (weight read in place), backward `dx = dy · W` with `W`
/// widened to f32 a tile of rows at a time (no f32 copy of the weight is kept).
struct FrozenBf16Linear {
    w: Tensor,
}

/// Rows of `W` widened at once in the backward (≤ 4 Mi f32 = 16 MiB).
const FROZEN_TILE_ELEMS: usize = 1 << 22;

impl candle_core::CustomOp1 for FrozenBf16Linear {
    fn name(&self) -> &'static str {
        "zaya-frozen-bf16-linear"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::backend::BackendStorage;
        let (m, k) = l.shape().dims2()?;
        let n = self.w.dim(0)?;
        let xs = super::cpu::f32_view(s, l, "matmul")?;
        let mut out = vec![0f32; m * n];
        super::cpu::with_cpu_storage(&self.w, "matmul", |ws, wl| {
            super::bf16::linear(&xs, m, k, bf16_weight_slice(ws, wl)?, n, &mut out)
        })?;
        Ok((
            super::cpu::storage_from_f32(out, s.dtype(), "matmul")?,
            candle_core::Shape::from_dims(&[m, n]),
        ))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        use super::cpu::{MatMut, MatRef};
        use candle_core::CpuStorage;
        let (m, k) = x.dims2()?;
        let n = self.w.dim(0)?;
        let gh = super::cpu::host_f32(g)?;
        let mut dx = vec![0f32; m * k];
        let rows = (FROZEN_TILE_ELEMS / k.max(1)).clamp(1, n.max(1));
        let mut tile = vec![0f32; rows * k];
        super::cpu::with_cpu_storage(&self.w, "matmul", |ws, wl| {
            let CpuStorage::BF16(d) = ws else {
                return Err(candle_core::Error::Msg("matmul: weight is not bf16".into()));
            };
            let (start, _) = wl.contiguous_offsets().ok_or_else(|| {
                candle_core::Error::Msg("matmul: weight is not contiguous".into())
            })?;
            for r0 in (0..n).step_by(rows) {
                let r = rows.min(n - r0);
                let src = &d[start + r0 * k..start + (r0 + r) * k];
                super::bf16::widen_into(src, &mut tile[..r * k]);
                // dx[m×k] += g[:, r0..r0+r] · W[r0..r0+r, :]
                super::cpu::gemm(
                    m,
                    k,
                    r,
                    MatMut::new(&mut dx, 0, k),
                    r0 > 0,
                    MatRef::new(&gh, r0, n, 1),
                    MatRef::rows(&tile, 0, k),
                    1.0,
                    true,
                )?;
            }
            Ok(())
        })?;
        Ok(Some(super::cpu::tensor_from_f32(
            dx,
            x.shape(),
            x.dtype(),
            x,
        )?))
    }
}

#[cfg(test)]
mod frozen_tests {
    use candle_core::{DType, Device, Tensor, Var};

    /// The frozen bf16 linear's gradient equals the reference matmul's over the widened
    /// weight (several row tiles).
    #[test]
    fn frozen_bf16_linear_gradient_matches_the_reference() {
        let dev = Device::Cpu;
        let (m, k, n) = (5, 1 << 12, 3000); // 3000 rows of 4096: three backward tiles
        let w = Tensor::randn(0f32, 0.05, (n, k), &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let x = Var::randn(0f32, 1.0, (m, k), &dev).unwrap();
        let g = Tensor::randn(0f32, 1.0, (m, n), &dev).unwrap();
        let y = super::bf16_weight(x.as_tensor(), &w.t().unwrap()).unwrap();
        let dx = (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let dx = dx.get(x.as_tensor()).unwrap();
        let want = g.matmul(&w.to_dtype(DType::F32).unwrap()).unwrap();
        let err = (dx - &want)
            .unwrap()
            .abs()
            .unwrap()
            .max_keepdim(1)
            .unwrap()
            .max(0)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(err < 1e-3, "{err}");
        let yref = x
            .as_tensor()
            .matmul(&w.to_dtype(DType::F32).unwrap().t().unwrap())
            .unwrap();
        let y = super::bf16_weight(x.as_tensor(), &w.t().unwrap()).unwrap();
        let e = (y - yref)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap();
        assert!(e.to_scalar::<f32>().unwrap() < 1e-3);
    }
}
