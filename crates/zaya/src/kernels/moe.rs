//! Fused top-1 MoE experts. Tokens are bucketed by expert; per expert, one gemm for the
//! gate/up projection reading the stacked `[E, 2I, H]` weights in place (transposed view),
//! a fused SwiGLU, one gemm for the down projection, and the rows written straight into the
//! output. Only the experts that receive tokens are touched; bf16 experts are read in
//! place by the bf16-weight kernel (GEMV for a few tokens, GEMM for many), f32
//! accumulation, without converting the expert to f32; with bf16 activations the gate/up
//! output and the activation are rounded to bf16, as the reference's bf16 products are. The routing weight is applied afterwards with a differentiable
//! multiply, so the router keeps its gradient; the op itself has a fused backward that
//! recomputes the expert activations instead of storing them.
//!
//! f32 products: the forward's two (`x·W_guᵀ`, `act·W_downᵀ`, also the backward's
//! recompute) go through [`sgemm::gemm_new`] (an AVX-512 / AVX2 kernel against a weight's transpose
//! for any row count from its minimum, [`cpu::gemm_fresh`] elsewhere), straight into buffers
//! never zero-filled (with the SwiGLU between them, ~2 % of a small prefill went to clearing
//! them); the backward's (`dy·W_down`, `dgu·W_gu`)
//! through [`cpu::gemm`], which measured faster at those shapes, and the weight gradients
//! (`dYᵀ·X`) through [`cpu::gemm_fresh`], straight into buffers never zero-filled.

use std::mem::MaybeUninit;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::bf16::Rows;
use super::cpu::{
    self, f32_range, f32_view, host_f32_ref, storage_from_f32, tensor_from_f32, with_cpu_storage,
    MatRef, GEMV_ROWS,
};
use super::reference::MoeShape;
use super::{sgemm, swiglu, KernelError};

const OP: &str = "moe_experts";

struct MoeExperts {
    ids: Vec<u32>,
    n: usize,
    /// Rows of the whole forward this op is part of (`n`, or more on an expert-parallel
    /// rank, which sees only the tokens dispatched to it): whether it is a decode step,
    /// so that one rank and a mesh pick the same kernel for an expert's rows.
    forward_rows: usize,
    h: usize,
    e: usize,
    i: usize,
}

impl MoeExperts {
    fn buckets(&self) -> Vec<Vec<usize>> {
        let mut b = vec![Vec::new(); self.e];
        for (tok, &c) in self.ids.iter().enumerate() {
            if (c as usize) < self.e {
                b[c as usize].push(tok);
            }
        }
        b
    }

    /// One expert of a bf16 model, as the reference runs it: the gate/up output and the
    /// activation are bf16 values, products accumulate in f32. Returns the expert's f32
    /// output rows (`rows.len() × h`), in the order of `rows`.
    fn bf16_expert(
        &self,
        xb: &[half::bf16],
        rows: &[usize],
        gw: &[half::bf16],
        dw: &[half::bf16],
        products: Rows,
    ) -> Result<Vec<f32>> {
        let (h, i, r) = (self.h, self.i, rows.len());
        let mut xe = Vec::with_capacity(r * h);
        for &row in rows {
            xe.extend_from_slice(&xb[row * h..(row + 1) * h]);
        }
        let gu = super::bf16::linear_bf16_new(products, &xe, r, h, gw, 2 * i)?;
        // per row: gate and up rounded to bf16, SwiGLU, the activation rounded to bf16 (the
        // same operations as the unfused chain, without its three full-size buffers); rows
        // on the pool, as a prefill's last and largest expert often runs alone
        let act = cpu::collect_rows(r * i, i, |t, dst| {
            let row = &gu[t * 2 * i..(t + 1) * 2 * i];
            cpu::silu_mul_bf16(&row[..i], &row[i..], dst);
        });
        super::bf16::linear_bf16_new(products, &act, r, i, dw, h)
    }

    /// The bf16 experts of a prefill (more rows than a decode step), as pool tasks
    /// ([`Self::expert_tasks`]), each the expert's whole chain ([`Self::bf16_expert`]), its
    /// rows rounded to bf16 as they are stored.
    fn bf16_prefill(
        &self,
        xb: &[half::bf16],
        g: &[half::bf16],
        d: &[half::bf16],
        buckets: &[Vec<usize>],
    ) -> Result<Vec<half::bf16>> {
        self.expert_tasks(
            buckets,
            half::bf16::ZERO,
            |e, rows| {
                let (gw, dw) = self.expert_weights(g, d, e);
                self.bf16_expert(xb, rows, gw, dw, Rows::Share)
            },
            cpu::narrow_bf16,
        )
    }

    /// One expert of an f32 forward (weights of any float dtype, read as f32): its output
    /// rows (`rows.len() × h`), in the order of `rows`.
    #[allow(clippy::too_many_arguments)]
    fn f32_expert(
        &self,
        x: &[f32],
        rows: &[usize],
        gs: &CpuStorage,
        gl: &Layout,
        ds: &CpuStorage,
        dl: &Layout,
        e: usize,
    ) -> Result<Vec<f32>> {
        let (h, i, r) = (self.h, self.i, rows.len());
        let wgu = f32_range(gs, gl, e * 2 * i * h, 2 * i * h, OP)?;
        let wd = f32_range(ds, dl, e * h * i, h * i, OP)?;
        let xe = self.gather(x, rows);
        let gu = self.gate_up(&xe, &wgu, r)?;
        let act = swiglu::forward(&gu, None, i);
        sgemm::gemm_new(
            self.sgemm_min_rows(),
            r,
            h,
            i,
            MatRef::rows(&act, 0, i),
            MatRef::rows(&wd, 0, i).t(),
        )
    }

    /// The f32 experts of a prefill, as pool tasks ([`Self::expert_tasks`]).
    fn f32_prefill(
        &self,
        x: &[f32],
        gs: &CpuStorage,
        gl: &Layout,
        ds: &CpuStorage,
        dl: &Layout,
        buckets: &[Vec<usize>],
    ) -> Result<Vec<f32>> {
        self.expert_tasks(
            buckets,
            0.0,
            |e, rows| self.f32_expert(x, rows, gs, gl, ds, dl, e),
            |v| v,
        )
    }

    /// A prefill's experts as pool tasks, largest first (`expert(e, rows)` gives expert
    /// `e`'s f32 output rows), each writing its rows of the `[n, h]` output through `store`;
    /// rows routed to no expert (an id past the last one) stay `zero`. Splitting each
    /// product over the pool instead left the element-wise steps between an expert's
    /// products to one thread while the other waited (a fifth of an 8B prefill); a task's
    /// products still split when a thread is free to take part of them. The kernels'
    /// results do not depend on how their work is split, so the output equals the
    /// expert-by-expert loop's bit for bit.
    fn expert_tasks<T: Copy + Send>(
        &self,
        buckets: &[Vec<usize>],
        zero: T,
        expert: impl Fn(usize, &[usize]) -> Result<Vec<f32>> + Sync + Send,
        store: impl Fn(f32) -> T + Sync + Send,
    ) -> Result<Vec<T>> {
        let h = self.h;
        let mut y = vec![zero; self.n * h];
        let order = Self::largest_first(buckets);
        let out = cpu::RowsOut::new(&mut y);
        let results = cpu::par_tasks(order.len(), |t| {
            let rows = &buckets[order[t]];
            let ye = expert(order[t], rows)?;
            for (k, &row) in rows.iter().enumerate() {
                // SAFETY: each row belongs to one expert's bucket, so to this task alone
                // (`row` is checked against the buffer by `RowsOut::row`).
                let dst = unsafe { out.row(row * h, h) };
                for (o, &v) in dst.iter_mut().zip(&ye[k * h..(k + 1) * h]) {
                    *o = store(v);
                }
            }
            Ok(())
        });
        results.into_iter().collect::<Result<Vec<()>>>()?;
        Ok(y)
    }

    /// Expert `e`'s gate/up `[2I, H]` and down `[H, I]` weights within the stacked ones.
    fn expert_weights<'a, T>(&self, g: &'a [T], d: &'a [T], e: usize) -> (&'a [T], &'a [T]) {
        let (gu, dn) = (2 * self.i * self.h, self.h * self.i);
        (&g[e * gu..(e + 1) * gu], &d[e * dn..(e + 1) * dn])
    }

    /// The experts that receive rows, those with the most rows first (the pool's threads
    /// start on the longest tasks, so the last ones to finish are short).
    fn largest_first(buckets: &[Vec<usize>]) -> Vec<usize> {
        let mut order: Vec<usize> = (0..buckets.len())
            .filter(|&e| !buckets[e].is_empty())
            .collect();
        order.sort_by_key(|&e| std::cmp::Reverse(buckets[e].len()));
        order
    }

    /// Gathers the rows of `x` `[N, H]` listed in `rows`.
    fn gather(&self, x: &[f32], rows: &[usize]) -> Vec<f32> {
        let h = self.h;
        let mut out = Vec::with_capacity(rows.len() * h);
        for &r in rows {
            out.extend_from_slice(&x[r * h..(r + 1) * h]);
        }
        out
    }

    /// Fewest rows of an expert for which its f32 products take [`sgemm`]'s kernel: a
    /// decode step (no more rows than the GEMV takes) keeps the GEMV up to
    /// [`GEMV_ROWS`], so a row's result does not depend on the rows decoded with it; a larger
    /// forward's expert shares take the kernel from fewer rows.
    fn sgemm_min_rows(&self) -> usize {
        if self.forward_rows > GEMV_ROWS {
            sgemm::share_min_rows()
        } else {
            GEMV_ROWS + 1
        }
    }

    /// `gu = xe · W_guᵀ` `[R, 2I]` for one expert.
    fn gate_up(&self, xe: &[f32], wgu: &[f32], r: usize) -> Result<Vec<f32>> {
        let (h, i2) = (self.h, 2 * self.i);
        sgemm::gemm_new(
            self.sgemm_min_rows(),
            r,
            i2,
            h,
            MatRef::rows(xe, 0, h),
            MatRef::rows(wgu, 0, h).t(),
        )
    }
}

/// `xs` as f32 in `slot`, widened on the first call.
fn widened<'a, 'b>(
    slot: &'a mut Option<std::borrow::Cow<'b, [f32]>>,
    xs: &'b CpuStorage,
    xl: &Layout,
) -> Result<&'a [f32]> {
    if slot.is_none() {
        *slot = Some(f32_view(xs, xl, OP)?);
    }
    Ok(slot.as_deref().unwrap_or_default())
}

impl CustomOp3 for MoeExperts {
    fn name(&self) -> &'static str {
        "zaya-moe-experts"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        ds: &CpuStorage,
        dl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (h, i) = (self.h, self.i);
        // `x` as f32, widened only where a path reads it (a bf16 model's experts read the
        // bf16 rows as they are)
        let mut x_wide = None;
        // bf16 experts are read in place by the bf16-weight kernel (no f32 copy per call).
        let bf16_weights = match (gs, ds) {
            (CpuStorage::BF16(g), CpuStorage::BF16(d)) => {
                let range = |l: &Layout| {
                    l.contiguous_offsets().ok_or(KernelError::NotContiguous {
                        op: OP,
                        what: "weights",
                    })
                };
                let ((g0, g1), (d0, d1)) = (range(gl)?, range(dl)?);
                Some((&g[g0..g1], &d[d0..d1]))
            }
            _ => None,
        };
        let x_bf16 = match xs {
            CpuStorage::BF16(v) => xl.contiguous_offsets().map(|(a, b)| &v[a..b]),
            _ => None,
        };
        let buckets = self.buckets();
        if let (Some((g, d)), Some(xb)) = (bf16_weights, x_bf16) {
            if self.forward_rows > GEMV_ROWS {
                let y = self.bf16_prefill(xb, g, d, &buckets)?;
                return Ok((CpuStorage::BF16(y), Shape::from_dims(&[self.n, h])));
            }
        }
        if let (CpuStorage::F32(_), CpuStorage::F32(_), true) =
            (gs, ds, self.forward_rows > GEMV_ROWS)
        {
            let y = self.f32_prefill(widened(&mut x_wide, xs, xl)?, gs, gl, ds, dl, &buckets)?;
            return Ok((
                storage_from_f32(y, xs.dtype(), OP)?,
                Shape::from_dims(&[self.n, h]),
            ));
        }
        let mut y = vec![0f32; self.n * h];
        for (e, rows) in buckets.iter().enumerate() {
            if rows.is_empty() {
                continue;
            }
            let r = rows.len();
            let ye = match (bf16_weights, x_bf16) {
                // a bf16 model's decode step (a prefill took `bf16_prefill` above)
                (Some((g, d)), Some(xb)) => {
                    let (gw, dw) = self.expert_weights(g, d, e);
                    self.bf16_expert(xb, rows, gw, dw, Rows::Whole)?
                }
                // bf16 weights under f32 activations
                (Some((g, d)), None) => {
                    let (gw, dw) = self.expert_weights(g, d, e);
                    let mut gu = vec![0f32; r * 2 * i];
                    let mut ye = vec![0f32; r * h];
                    let xe = self.gather(widened(&mut x_wide, xs, xl)?, rows);
                    super::bf16::linear(&xe, r, h, gw, 2 * i, &mut gu)?;
                    let act = swiglu::forward(&gu, None, i);
                    super::bf16::linear(&act, r, i, dw, h, &mut ye)?;
                    ye
                }
                _ => self.f32_expert(widened(&mut x_wide, xs, xl)?, rows, gs, gl, ds, dl, e)?,
            };
            for (k, &row) in rows.iter().enumerate() {
                y[row * h..(row + 1) * h].copy_from_slice(&ye[k * h..(k + 1) * h]);
            }
        }
        Ok((
            storage_from_f32(y, xs.dtype(), OP)?,
            Shape::from_dims(&[self.n, h]),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gate_up: &Tensor,
        down: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (h, i) = (self.h, self.i);
        let xh = host_f32_ref(x)?;
        let dyh = host_f32_ref(dy)?;
        let (want_x, want_gu, want_d) = (x.track_op(), gate_up.track_op(), down.track_op());
        let mut dx = vec![0f32; if want_x { self.n * h } else { 0 }];
        // The weight gradients are written expert by expert without a zero fill first: each
        // block is either a product's output or, for an expert no row reached, zeros.
        let (gu_len, d_len) = (2 * i * h, h * i);
        let mut dgu_w = cpu::uninit_f32(if want_gu { self.e * gu_len } else { 0 });
        let mut dd_w = cpu::uninit_f32(if want_d { self.e * d_len } else { 0 });
        let buckets = self.buckets();
        // The experts no row reached get zeros, all in one parallel fill: a serial fill on
        // the calling thread, expert by expert, left the other cores idle (most of the
        // experts of a randomly initialised router: ~3 MB each at the small config's
        // shapes, 12 MB at the medium one's).
        let mut empty: Vec<&mut [MaybeUninit<f32>]> = Vec::new();
        for (blocks, len) in [(&mut dgu_w, gu_len), (&mut dd_w, d_len)] {
            if len > 0 {
                empty.extend(
                    blocks
                        .chunks_mut(len)
                        .zip(&buckets)
                        .filter(|(_, rows)| rows.is_empty())
                        .map(|(block, _)| block),
                );
            }
        }
        cpu::par_fill_zero(&mut empty);
        for (e, rows) in buckets.iter().enumerate() {
            if rows.is_empty() {
                continue;
            }
            let r = rows.len();
            let xe = self.gather(&xh, rows);
            let dye = self.gather(&dyh, rows);
            with_cpu_storage(gate_up, OP, |gs, gl| {
                with_cpu_storage(down, OP, |ds, dl| {
                    let wgu = f32_range(gs, gl, e * 2 * i * h, 2 * i * h, OP)?;
                    let wd = f32_range(ds, dl, e * h * i, h * i, OP)?;
                    // Recompute the activations of this expert.
                    let gu = self.gate_up(&xe, &wgu, r)?;
                    if want_d {
                        let act = swiglu::forward(&gu, None, i);
                        // dW_down[e] = dyᵀ · act   [H, I]
                        cpu::gemm_fresh(
                            h,
                            i,
                            r,
                            &mut dd_w[e * d_len..(e + 1) * d_len],
                            MatRef::rows(&dye, 0, h).t(),
                            MatRef::rows(&act, 0, i),
                            1.0,
                            true,
                        )?;
                    }
                    // d act = dy · W_down   [R, I]
                    let mut dact = cpu::uninit_f32(r * i);
                    let dact = cpu::gemm_fresh(
                        r,
                        i,
                        h,
                        &mut dact,
                        MatRef::rows(&dye, 0, h),
                        MatRef::rows(&wd, 0, i),
                        1.0,
                        true,
                    )?;
                    let (dgu, _) = swiglu::backward(&gu, None, dact, i);
                    if want_gu {
                        // dW_gu[e] = dguᵀ · xe   [2I, H]
                        cpu::gemm_fresh(
                            2 * i,
                            h,
                            r,
                            &mut dgu_w[e * gu_len..(e + 1) * gu_len],
                            MatRef::rows(&dgu, 0, 2 * i).t(),
                            MatRef::rows(&xe, 0, h),
                            1.0,
                            true,
                        )?;
                    }
                    if want_x {
                        // dxe = dgu · W_gu   [R, H]
                        let mut dxe = cpu::uninit_f32(r * h);
                        let dxe = cpu::gemm_fresh(
                            r,
                            h,
                            2 * i,
                            &mut dxe,
                            MatRef::rows(&dgu, 0, 2 * i),
                            MatRef::rows(&wgu, 0, h),
                            1.0,
                            true,
                        )?;
                        for (k, &row) in rows.iter().enumerate() {
                            dx[row * h..(row + 1) * h].copy_from_slice(&dxe[k * h..(k + 1) * h]);
                        }
                    }
                    Ok(())
                })
            })?;
        }
        let dx = want_x
            .then(|| tensor_from_f32(dx, x.shape(), x.dtype(), x))
            .transpose()?;
        // SAFETY: every expert's block of both buffers was written above (a product or
        // zeros); a buffer not asked for is empty.
        let (dgu_w, dd_w) = unsafe { (dgu_w.assume_init(), dd_w.assume_init()) };
        let dgu = want_gu
            .then(|| tensor_from_f32(dgu_w.into_vec(), gate_up.shape(), gate_up.dtype(), gate_up))
            .transpose()?;
        let dd = want_d
            .then(|| tensor_from_f32(dd_w.into_vec(), down.shape(), down.dtype(), down))
            .transpose()?;
        Ok((dx, dgu, dd))
    }
}

pub(super) fn fused(
    x: &Tensor,
    expert_ids: &[u32],
    weights: &Tensor,
    gate_up: &Tensor,
    down: &Tensor,
    forward_rows: usize,
) -> Result<Tensor> {
    let s = MoeShape::check(x, expert_ids, weights, gate_up, down)?;
    for (name, t) in [("gate_up", gate_up), ("down", down), ("weights", weights)] {
        if t.dtype() != x.dtype() {
            return Err(KernelError::Shape {
                op: OP,
                message: format!(
                    "{name} dtype {:?} differs from x dtype {:?}",
                    t.dtype(),
                    x.dtype()
                ),
            }
            .into());
        }
    }
    let op = MoeExperts {
        ids: expert_ids.to_vec(),
        n: s.n,
        forward_rows: forward_rows.max(s.n),
        h: s.h,
        e: s.e,
        i: s.i,
    };
    // The op reads expert slices of the stacked weights, which must be contiguous (they are
    // as loaded; `contiguous` is free then). bf16 tokens are read in place only when
    // contiguous, and the bf16 semantics (gate/up output and activation rounded to bf16)
    // must not depend on the layout: a strided view (a mesh's narrowed token columns) had
    // taken the f32 branch and skipped those roundings.
    let x = if x.dtype() == candle_core::DType::BF16 {
        x.contiguous()?
    } else {
        x.clone()
    };
    let y = x.apply_op3(&gate_up.contiguous()?, &down.contiguous()?, op)?;
    y.broadcast_mul(&weights.reshape((s.n, 1))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    /// The expert-parallel prefill (bf16, then f32) places every expert's rows where the
    /// expert-by-expert loop does, bit for bit, with rows of every kernel class (a few rows: dot kernel or
    /// GEMV; 8–48: streamed AMX tiles where present; more: packed) and rows routed to no
    /// expert left zero.
    #[test]
    fn prefill_tasks_equal_the_expert_loop() -> Result<()> {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        super::super::amx::available();
        let (h, i, e) = (128, 64, 6);
        // expert sizes 3, 12, 40, 100, 0, and the rest; id 6 is no expert
        let mut ids = Vec::new();
        for (expert, count) in [(0u32, 3), (1, 12), (2, 40), (3, 100), (6, 5), (5, 20)] {
            ids.extend(std::iter::repeat_n(expert, count));
        }
        // interleave the rows so that no expert's rows are contiguous
        let n = ids.len();
        let ids: Vec<u32> = (0..n).map(|t| ids[(t * 37) % n]).collect();
        let bf = |v: Vec<f32>| v.into_iter().map(bf16::from_f32).collect::<Vec<_>>();
        let x = bf(cpu::test_data(n * h, 1));
        let g: Vec<bf16> = bf(cpu::test_data(e * 2 * i * h, 2)
            .iter()
            .map(|v| v * 0.2)
            .collect());
        let d: Vec<bf16> = bf(cpu::test_data(e * h * i, 3)
            .iter()
            .map(|v| v * 0.2)
            .collect());
        let op = MoeExperts {
            ids,
            n,
            forward_rows: n,
            h,
            e,
            i,
        };
        let buckets = op.buckets();
        let tasks = op.bf16_prefill(&x, &g, &d, &buckets)?;
        let mut looped = vec![bf16::ZERO; n * h];
        for (ex, rows) in buckets.iter().enumerate() {
            if rows.is_empty() {
                continue;
            }
            let gw = &g[ex * 2 * i * h..(ex + 1) * 2 * i * h];
            let dw = &d[ex * h * i..(ex + 1) * h * i];
            let ye = op.bf16_expert(&x, rows, gw, dw, Rows::Share)?;
            for (k, &row) in rows.iter().enumerate() {
                for (o, &v) in looped[row * h..(row + 1) * h].iter_mut().zip(&ye[k * h..]) {
                    *o = bf16::from_f32(v);
                }
            }
        }
        let bits = |v: &[bf16]| v.iter().map(|b| b.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&tasks), bits(&looped));

        // the same for f32 weights and rows (sgemm's and the gemm crate's row ranges)
        let widen = |v: &[bf16]| v.iter().map(|b| b.to_f32()).collect::<Vec<_>>();
        let (xf, gf, df) = (widen(&x), widen(&g), widen(&d));
        let gl = Layout::contiguous((e, 2 * i, h));
        let dl = Layout::contiguous((e, h, i));
        let (gs, ds) = (CpuStorage::F32(gf), CpuStorage::F32(df));
        let tasks_f32 = op.f32_prefill(&xf, &gs, &gl, &ds, &dl, &buckets)?;
        let mut looped_f32 = vec![0f32; n * h];
        for (ex, rows) in buckets.iter().enumerate() {
            if rows.is_empty() {
                continue;
            }
            let ye = op.f32_expert(&xf, rows, &gs, &gl, &ds, &dl, ex)?;
            for (k, &row) in rows.iter().enumerate() {
                looped_f32[row * h..(row + 1) * h].copy_from_slice(&ye[k * h..(k + 1) * h]);
            }
        }
        let fbits = |v: &[f32]| v.iter().map(|b| b.to_bits()).collect::<Vec<_>>();
        assert_eq!(fbits(&tasks_f32), fbits(&looped_f32));
        // the skipped rows are zero, the others not all zero, in both outputs
        for (t, &id) in op.ids.iter().enumerate() {
            let rows = t * h..(t + 1) * h;
            let skipped = id as usize >= e;
            assert_eq!(
                tasks[rows.clone()].iter().all(|v| v.to_bits() == 0),
                skipped,
                "row {t}"
            );
            assert_eq!(
                tasks_f32[rows].iter().all(|v| v.to_bits() == 0),
                skipped,
                "row {t}"
            );
        }
        Ok(())
    }
}
