//! Fused CCA convolutions (depthwise over `K0` taps, then grouped over `K1` taps): the
//! depthwise stage is one pass over `[B, T+K1−1, C]`; the grouped stage is, per batch row,
//! group and tap, one gemm reading the intermediate and the weights through strided views
//! (no tap concatenation, no weight permutation copies). Work is spread over (batch,
//! group). The backward is fused the same way. Any float input: accumulation is f32, and
//! below f32 the depthwise output is rounded to the input dtype, as in the reference.
//!
//! Candle custom ops take at most three tensors, so the biases travel one of two ways:
//! when neither bias needs a gradient (inference, frozen convs) they are held by the op
//! and the inputs are `(x, w0, w1)`; otherwise the weights and biases are packed
//! (`[w0 | b0]`, `[w1 | b1]` per channel, a differentiable `cat`) and the op returns the
//! gradients in the packed layout, which the `cat` splits back.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, D};

use super::cpu::{
    self, f32_view, host_f32, host_f32_ref, storage_from_f32, tensor_from_f32, MatMut, MatRef,
};
use super::reference::CcaShape;
use super::KernelError;

const OP: &str = "cca_conv";

#[derive(Clone, Copy)]
struct Geometry {
    b: usize,
    len: usize,
    c: usize,
    groups: usize,
    d: usize,
    k0: usize,
    k1: usize,
    t: usize,
    /// Depthwise output length `T + K1 − 1`.
    m: usize,
    /// Row strides of the (possibly packed) weights: `K0` or `K0 + 1`, `D·K1` or `D·K1 + 1`.
    w0_rs: usize,
    w1_rs: usize,
}

/// Weights as flat f32 rows, and the biases.
struct Params<'a> {
    w0: &'a [f32],
    w1: &'a [f32],
    b0: Vec<f32>,
    b1: Vec<f32>,
}

enum Biases {
    /// Biases without gradients, held by the op.
    Held { b0: Vec<f32>, b1: Vec<f32> },
    /// Biases packed as the last column of each weight row.
    Packed,
}

struct CcaConv {
    groups: usize,
    k0: usize,
    k1: usize,
    biases: Biases,
    /// The input dtype: below f32, the depthwise output is rounded to it between the two
    /// convolutions (accumulation stays f32), as the reference does.
    dtype: DType,
}

impl CcaConv {
    fn geometry(&self, x: &[usize]) -> Result<Geometry> {
        let [b, len, c] = x else {
            return Err(KernelError::Shape {
                op: OP,
                message: format!("x must be [B, S+T, C], got {x:?}"),
            }
            .into());
        };
        let (k0, k1) = (self.k0, self.k1);
        let packed = matches!(self.biases, Biases::Packed) as usize;
        let d = c / self.groups;
        let t = len + 2 - k0 - k1;
        Ok(Geometry {
            b: *b,
            len: *len,
            c: *c,
            groups: self.groups,
            d,
            k0,
            k1,
            t,
            m: t + k1 - 1,
            w0_rs: k0 + packed,
            w1_rs: d * k1 + packed,
        })
    }

    fn params<'a>(&self, g: &Geometry, w0: &'a [f32], w1: &'a [f32]) -> Params<'a> {
        match &self.biases {
            Biases::Held { b0, b1 } => Params {
                w0,
                w1,
                b0: b0.clone(),
                b1: b1.clone(),
            },
            Biases::Packed => Params {
                w0,
                w1,
                b0: (0..g.c).map(|c| w0[c * g.w0_rs + g.k0]).collect(),
                b1: (0..g.c).map(|c| w1[c * g.w1_rs + g.d * g.k1]).collect(),
            },
        }
    }
}

/// Depthwise stage for one batch row: `mid[j, c] = b0[c] + Σ_i w0[c, i]·x[j+i, c]`,
/// rounded to `dtype`. Output positions are split over the pool (a prefill's batch row was
/// one thread's work while the other waited); each tap's weights are gathered into one
/// contiguous row first so the inner loop runs over channels. Same additions in the same
/// order as the loop over taps per element.
fn depthwise(g: &Geometry, p: &Params, x: &[f32], dtype: DType) -> Vec<f32> {
    // every element of a row is written through the zip with `b0` (`collect_rows`' contract)
    assert_eq!(p.b0.len(), g.c, "depthwise bias");
    let taps: Vec<Vec<f32>> = (0..g.k0)
        .map(|i| (0..g.c).map(|c| p.w0[c * g.w0_rs + i]).collect())
        .collect();
    cpu::collect_rows(g.m * g.c, g.c, |j, row| {
        for (o, &b) in row.iter_mut().zip(&p.b0) {
            o.write(b);
        }
        // SAFETY: every element of `row` was written just above.
        let row = unsafe { &mut *(row as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]) };
        for (i, w) in taps.iter().enumerate() {
            let xr = &x[(j + i) * g.c..(j + i + 1) * g.c];
            for ((o, &xv), &wv) in row.iter_mut().zip(xr).zip(w) {
                *o += wv * xv;
            }
        }
        if dtype != DType::F32 {
            for v in row.iter_mut() {
                *v = cpu::round_to(dtype, *v);
            }
        }
    })
}

/// The view of `w1[g·D + o, c', tap]` as a `[c', o]` matrix (`transpose` gives `[o, c']`).
fn w1_view<'a>(
    g: &Geometry,
    p: &Params<'a>,
    group: usize,
    tap: usize,
    transpose: bool,
) -> MatRef<'a> {
    let v = MatRef::new(p.w1, group * g.d * g.w1_rs + tap, g.k1, g.w1_rs);
    if transpose {
        v.t()
    } else {
        v
    }
}

/// The grouped stage for a few output positions per row (decode): one gemm call per (row,
/// group, tap) costs far more than its `D × D` products there (a 32-row decode step spent
/// 13 % of its time in them). Per group, every (row, position)'s inputs are interleaved the
/// way a weight row is stored (`[c'][tap]`, contiguous), and all of them are dotted with the
/// group's `D` weight rows in one register-tiled block ([`cpu::dots_block`]): the weight is
/// read in place, once per call, whatever the batch (laying it out anew on every call cost
/// 4–6 % of an 8B decode step; one dot per output, as before, ran on one thread at one
/// accumulator chain: ~5 % of an 8B batch-8 decode step). Groups are spread over the
/// spinning team (or the pool).
/// Each output is its own 16-lane chain in a fixed order (see `cpu::dots_tile`), so it
/// does not depend on the batch or the tile, and a bf16 weight (a bf16 model's, read in
/// place) gives the sums of its widened f32 copy.
fn grouped_few_positions<W: cpu::DotsBlock>(
    g: &Geometry,
    b1: &[f32],
    w1: &[W],
    mids: &[Vec<f32>],
) -> Vec<f32> {
    let (d, k1, c) = (g.d, g.k1, g.c);
    let (rows, kk) = (g.b * g.t, d * k1);
    // each group's outputs, column-major: `[o · rows + r]`
    let by_group = cpu::par_map_short(g.groups, rows * c * kk, |grp| {
        let mut xi = vec![0f32; rows * kk];
        for (r, xr) in xi.chunks_mut(kk).enumerate() {
            let (b, t) = (r / g.t, r % g.t);
            for tap in 0..k1 {
                let x = &mids[b][(t + tap) * c + grp * d..][..d];
                for (ci, &v) in x.iter().enumerate() {
                    xr[ci * k1 + tap] = v;
                }
            }
        }
        let mut z = vec![0f32; d * rows];
        let ws = &w1[grp * d * g.w1_rs..];
        cpu::dots_block(&xi, kk, rows, ws, g.w1_rs, d, kk, &mut z);
        z
    });
    let mut out = vec![0f32; rows * c];
    for (grp, z) in by_group.iter().enumerate() {
        for (o, zo) in z.chunks(rows).enumerate() {
            let ch = grp * d + o;
            for (r, &v) in zo.iter().enumerate() {
                out[r * c + ch] = b1[ch] + v;
            }
        }
    }
    out
}

/// The depthwise stage of every batch row (cheap: K0 MACs per element).
fn depthwise_rows(op: &CcaConv, g: &Geometry, p: &Params, x: &[f32]) -> Vec<Vec<f32>> {
    let row_len = g.len * g.c;
    cpu::par_map(g.b, g.b * g.m * g.c * g.k0, |b| {
        depthwise(g, p, &x[b * row_len..(b + 1) * row_len], op.dtype)
    })
}

fn forward(op: &CcaConv, g: &Geometry, x: &[f32], w0: &[f32], w1: &[f32]) -> Result<Vec<f32>> {
    forward_as(op, g, x, w0, w1, |v| v)
}

/// [`forward`] with each output converted by `store` (bf16 rounding for a bf16 model) as
/// the groups' blocks are gathered into rows, on the pool.
fn forward_as<T: Send>(
    op: &CcaConv,
    g: &Geometry,
    x: &[f32],
    w0: &[f32],
    w1: &[f32],
    store: impl Fn(f32) -> T + Sync + Send,
) -> Result<Vec<T>> {
    let p = op.params(g, w0, w1);
    let mids = depthwise_rows(op, g, &p, x);
    if g.t <= cpu::DECODE_POSITIONS {
        let out = grouped_few_positions(g, &p.b1, p.w1, &mids);
        return Ok(out.into_iter().map(store).collect());
    }
    // Grouped stage: item (b, group) → its [T, D] output block.
    let blocks = cpu::par_map(
        g.b * g.groups,
        g.b * g.t * g.c * g.d * g.k1,
        |item| -> Result<Vec<f32>> {
            let (b, grp) = (item / g.groups, item % g.groups);
            let mut z = vec![0f32; g.t * g.d];
            for zr in z.chunks_mut(g.d) {
                zr.copy_from_slice(&p.b1[grp * g.d..(grp + 1) * g.d]);
            }
            for tap in 0..g.k1 {
                cpu::gemm(
                    g.t,
                    g.d,
                    g.d,
                    MatMut::new(&mut z, 0, g.d),
                    true,
                    MatRef::new(&mids[b], tap * g.c + grp * g.d, g.c, 1),
                    w1_view(g, &p, grp, tap, false),
                    1.0,
                    false,
                )?;
            }
            Ok(z)
        },
    );
    let blocks = blocks.into_iter().collect::<Result<Vec<_>>>()?;
    // output row (b, t) holds row t of every group's block of batch row b
    Ok(cpu::collect_rows(g.b * g.t * g.c, g.c, |row, o| {
        let (b, t) = (row / g.t, row % g.t);
        for (grp, o) in o.chunks_mut(g.d).enumerate() {
            let blk = &blocks[b * g.groups + grp][t * g.d..(t + 1) * g.d];
            for (o, &v) in o.iter_mut().zip(blk) {
                o.write(store(v));
            }
        }
    }))
}

/// Gradients of one (batch row, group) item.
struct ItemGrads {
    dx: Vec<f32>,  // [len, D]
    dw0: Vec<f32>, // [D, K0]
    db0: Vec<f32>, // [D]
    dw1: Vec<f32>, // [D(out), D(in), K1]
    db1: Vec<f32>, // [D]
}

struct Grads {
    dx: Vec<f32>,
    dw0: Vec<f32>, // [C, K0]
    db0: Vec<f32>,
    dw1: Vec<f32>, // [C, D, K1]
    db1: Vec<f32>,
}

fn backward(
    op: &CcaConv,
    g: &Geometry,
    x: &[f32],
    w0: &[f32],
    w1: &[f32],
    dz: &[f32],
) -> Result<Grads> {
    let p = op.params(g, w0, w1);
    let row_len = g.len * g.c;
    let mids = cpu::par_map(g.b, g.b * g.m * g.c * g.k0, |b| {
        depthwise(g, &p, &x[b * row_len..(b + 1) * row_len], op.dtype)
    });
    let (d, c) = (g.d, g.c);
    let items = cpu::par_map(
        g.b * g.groups,
        3 * g.b * g.t * g.c * g.d * g.k1,
        |item| -> Result<ItemGrads> {
            let (b, grp) = (item / g.groups, item % g.groups);
            let dz_view = MatRef::new(dz, b * g.t * c + grp * d, c, 1); // [T, D(o)]
            let mid_b = &mids[b];
            let mut dw1 = vec![0f32; d * d * g.k1];
            let mut dmid = vec![0f32; g.m * d];
            let mut tmp = vec![0f32; d * d];
            for tap in 0..g.k1 {
                // dW_tap[o, c'] = Σ_t dz[t, o]·mid[t + tap, c']
                cpu::gemm(
                    d,
                    d,
                    g.t,
                    MatMut::new(&mut tmp, 0, d),
                    false,
                    dz_view.t(),
                    MatRef::new(mid_b, tap * c + grp * d, c, 1),
                    1.0,
                    false,
                )?;
                for o in 0..d {
                    for ci in 0..d {
                        dw1[(o * d + ci) * g.k1 + tap] = tmp[o * d + ci];
                    }
                }
                // dmid[t + tap, c'] += Σ_o dz[t, o]·w1[o, c', tap]
                cpu::gemm(
                    g.t,
                    d,
                    d,
                    MatMut::new(&mut dmid, tap * d, d),
                    true,
                    dz_view,
                    w1_view(g, &p, grp, tap, true),
                    1.0,
                    false,
                )?;
            }
            let mut db1 = vec![0f32; d];
            for t in 0..g.t {
                for (a, v) in db1
                    .iter_mut()
                    .zip(&dz[b * g.t * c + t * c + grp * d..][..d])
                {
                    *a += v;
                }
            }
            // Depthwise backward for this group's channels.
            let xb = &x[b * row_len..(b + 1) * row_len];
            let mut dx = vec![0f32; g.len * d];
            let mut dw0 = vec![0f32; d * g.k0];
            let mut db0 = vec![0f32; d];
            for j in 0..g.m {
                let dm = &dmid[j * d..(j + 1) * d];
                for (a, v) in db0.iter_mut().zip(dm) {
                    *a += v;
                }
                for tap in 0..g.k0 {
                    let xr = &xb[(j + tap) * c + grp * d..][..d];
                    let dxr = &mut dx[(j + tap) * d..(j + tap + 1) * d];
                    for ci in 0..d {
                        let ch = grp * d + ci;
                        dw0[ci * g.k0 + tap] += dm[ci] * xr[ci];
                        dxr[ci] += p.w0[ch * g.w0_rs + tap] * dm[ci];
                    }
                }
            }
            Ok(ItemGrads {
                dx,
                dw0,
                db0,
                dw1,
                db1,
            })
        },
    );
    let mut out = Grads {
        dx: vec![0f32; g.b * row_len],
        dw0: vec![0f32; c * g.k0],
        db0: vec![0f32; c],
        dw1: vec![0f32; c * d * g.k1],
        db1: vec![0f32; c],
    };
    let add = |dst: &mut [f32], src: &[f32]| {
        for (a, v) in dst.iter_mut().zip(src) {
            *a += v;
        }
    };
    for (item, ig) in items.into_iter().enumerate() {
        let ig = ig?;
        let (b, grp) = (item / g.groups, item % g.groups);
        for j in 0..g.len {
            let o = b * row_len + j * c + grp * d;
            out.dx[o..o + d].copy_from_slice(&ig.dx[j * d..(j + 1) * d]);
        }
        add(&mut out.dw0[grp * d * g.k0..(grp + 1) * d * g.k0], &ig.dw0);
        add(&mut out.db0[grp * d..(grp + 1) * d], &ig.db0);
        add(
            &mut out.dw1[grp * d * d * g.k1..(grp + 1) * d * d * g.k1],
            &ig.dw1,
        );
        add(&mut out.db1[grp * d..(grp + 1) * d], &ig.db1);
    }
    Ok(out)
}

impl CustomOp3 for CcaConv {
    fn name(&self) -> &'static str {
        "zaya-cca-conv"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        s0: &CpuStorage,
        l0: &Layout,
        s1: &CpuStorage,
        l1: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.geometry(xl.dims())?;
        let x = f32_view(xs, xl, OP)?;
        let w0 = f32_view(s0, l0, OP)?;
        // Decode on a bf16 model: the grouped weight is dotted where it is. Widening it to
        // an f32 copy on every call wrote and read back 52 MB per token of the 8B (2 % of
        // its decode samples in that copy alone).
        if let (true, Biases::Held { b0, b1 }, CpuStorage::BF16(w1), Some((a, b))) = (
            g.t <= cpu::DECODE_POSITIONS,
            &self.biases,
            s1,
            l1.contiguous_offsets(),
        ) {
            let p = Params {
                w0: &w0,
                w1: &[],
                b0: b0.clone(),
                b1: b1.clone(),
            };
            let mids = depthwise_rows(self, &g, &p, &x);
            let out = grouped_few_positions(&g, b1, &w1[a..b], &mids);
            return Ok((
                storage_from_f32(out, xs.dtype(), OP)?,
                Shape::from_dims(&[g.b, g.t, g.c]),
            ));
        }
        let w1 = f32_view(s1, l1, OP)?;
        let storage = match xs.dtype() {
            DType::BF16 => CpuStorage::BF16(forward_as(self, &g, &x, &w0, &w1, cpu::narrow_bf16)?),
            dtype => storage_from_f32(forward(self, &g, &x, &w0, &w1)?, dtype, OP)?,
        };
        Ok((storage, Shape::from_dims(&[g.b, g.t, g.c])))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w0: &Tensor,
        w1: &Tensor,
        _z: &Tensor,
        dz: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = self.geometry(x.dims())?;
        let (xh, w0h, w1h, dzh) = (
            host_f32_ref(x)?,
            host_f32_ref(w0)?,
            host_f32_ref(w1)?,
            host_f32_ref(dz)?,
        );
        let gr = backward(self, &g, &xh, &w0h, &w1h, &dzh)?;
        let (dw0, dw1) = match self.biases {
            Biases::Held { .. } => (gr.dw0, gr.dw1),
            Biases::Packed => {
                // Interleave the bias gradients as the last column of each packed row.
                let pack = |w: &[f32], bias: &[f32], k: usize| -> Vec<f32> {
                    let mut out = Vec::with_capacity(w.len() + bias.len());
                    for (row, b) in w.chunks(k).zip(bias) {
                        out.extend_from_slice(row);
                        out.push(*b);
                    }
                    out
                };
                (
                    pack(&gr.dw0, &gr.db0, g.k0),
                    pack(&gr.dw1, &gr.db1, g.d * g.k1),
                )
            }
        };
        let dx = x
            .track_op()
            .then(|| tensor_from_f32(gr.dx, x.shape(), x.dtype(), x))
            .transpose()?;
        let dw0 = w0
            .track_op()
            .then(|| tensor_from_f32(dw0, w0.shape(), w0.dtype(), w0))
            .transpose()?;
        let dw1 = w1
            .track_op()
            .then(|| tensor_from_f32(dw1, w1.shape(), w1.dtype(), w1))
            .transpose()?;
        Ok((dx, dw0, dw1))
    }
}

pub(super) fn fused(
    x: &Tensor,
    w0: &Tensor,
    b0: &Tensor,
    w1: &Tensor,
    b1: &Tensor,
    groups: usize,
) -> Result<Tensor> {
    let (_, len, c) = x.dims3()?;
    let shape = CcaShape::check(len, c, w0, b0, w1, b1, groups)?;
    let dtype = x.dtype();
    // A frozen bf16 grouped weight with f32 activations (a quantized model loaded in f32
    // keeps it as stored, see `Weights::get_stored`) is read as it is: its f32 widening is
    // exact, so the op computes what it would on the widened weight. Where the weights
    // must be packed with their biases (bias gradients), it is widened first.
    let mixed = dtype == DType::F32 && w1.dtype() == DType::BF16 && !w1.track_op();
    let widened;
    let w1 = if mixed && (b0.track_op() || b1.track_op()) {
        widened = w1.to_dtype(DType::F32)?;
        &widened
    } else {
        w1
    };
    for (name, t) in [("w0", w0), ("b0", b0), ("w1", w1), ("b1", b1)] {
        if t.dtype() != dtype && !(mixed && name == "w1") {
            return Err(KernelError::Shape {
                op: OP,
                message: format!(
                    "{name} dtype {:?} differs from x dtype {dtype:?}",
                    t.dtype()
                ),
            }
            .into());
        }
    }
    let (k0, k1) = (shape.k0, shape.k1);
    if b0.track_op() || b1.track_op() {
        let p0 = Tensor::cat(&[&w0.reshape((c, k0))?, &b0.reshape((c, 1))?], D::Minus1)?;
        let p1 = Tensor::cat(
            &[&w1.reshape((c, shape.d * k1))?, &b1.reshape((c, 1))?],
            D::Minus1,
        )?;
        let op = CcaConv {
            groups,
            k0,
            k1,
            biases: Biases::Packed,
            dtype,
        };
        x.apply_op3(&p0, &p1, op)
    } else {
        let op = CcaConv {
            groups,
            k0,
            k1,
            biases: Biases::Held {
                b0: host_f32(b0)?,
                b1: host_f32(b1)?,
            },
            dtype,
        };
        x.apply_op3(w0, w1, op)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// `n` deterministic test values of `shape` in `dtype`.
    fn test_tensor(n: usize, seed: u32, shape: &[usize], dtype: DType) -> Result<Tensor> {
        Tensor::from_vec(cpu::test_data(n, seed), shape, &Device::Cpu)?.to_dtype(dtype)
    }

    /// A bf16 model's decode step dots the grouped weight in place; the result equals the
    /// widening path's (the same op on f32 copies of the weights) bit for bit.
    #[test]
    fn bf16_decode_reads_the_grouped_weight_in_place_bit_for_bit() -> Result<()> {
        // D·K1 = 74: not a multiple of the 16-lane tiles, so the tails run too
        let (b, groups, d, k0, k1) = (3, 4, 37, 2, 2);
        let c = groups * d;
        let bf16_tensor =
            |n: usize, seed: u32, shape: &[usize]| test_tensor(n, seed, shape, DType::BF16);
        for t in 1..=cpu::DECODE_POSITIONS {
            let len = t + k0 + k1 - 2;
            let x = bf16_tensor(b * len * c, 1, &[b, len, c])?;
            let w0 = bf16_tensor(c * k0, 2, &[c, 1, k0])?;
            let b0 = bf16_tensor(c, 3, &[c])?;
            let w1 = bf16_tensor(c * d * k1, 4, &[c, d, k1])?;
            let b1 = bf16_tensor(c, 5, &[c])?;
            let got = fused(&x, &w0, &b0, &w1, &b1, groups)?;
            let op = CcaConv {
                groups,
                k0,
                k1,
                biases: Biases::Held {
                    b0: host_f32(&b0)?,
                    b1: host_f32(&b1)?,
                },
                dtype: DType::BF16,
            };
            let g = op.geometry(x.dims())?;
            let want = forward(&op, &g, &host_f32(&x)?, &host_f32(&w0)?, &host_f32(&w1)?)?;
            let CpuStorage::BF16(want) = storage_from_f32(want, DType::BF16, OP)? else {
                unreachable!("asked for bf16")
            };
            let got = got.flatten_all()?.to_vec1::<half::bf16>()?;
            let bits = |v: &[half::bf16]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "t = {t}");
        }
        Ok(())
    }

    /// The decode path's grouped stage gives every output the single dot of its weight row
    /// and its interleaved inputs, plus the bias, bit for bit, whatever the batch (one row
    /// alone or with others) and for f32 and bf16 weights alike.
    #[test]
    fn grouped_few_positions_is_one_dot_per_output_whatever_the_batch() {
        let (groups, d, k0, k1) = (3, 37, 2, 2);
        let c = groups * d;
        let w1 = cpu::test_data(c * d * k1, 4);
        let w1_bf16: Vec<half::bf16> = w1.iter().map(|&v| half::bf16::from_f32(v)).collect();
        let b1 = cpu::test_data(c, 5);
        for (b, t) in [(1, 1), (3, 1), (8, 1), (2, cpu::DECODE_POSITIONS)] {
            let len = t + k0 + k1 - 2;
            let g = CcaConv {
                groups,
                k0,
                k1,
                biases: Biases::Packed,
                dtype: DType::F32,
            }
            .geometry(&[b, len, c])
            .expect("a valid shape");
            let g = Geometry { w1_rs: d * k1, ..g };
            let mids: Vec<Vec<f32>> = (0..b)
                .map(|r| cpu::test_data(g.m * c, 10 + r as u32))
                .collect();
            let one = |mids: &[Vec<f32>], bb: usize, wide: bool| {
                let g = Geometry { b: bb, ..g };
                if wide {
                    grouped_few_positions(&g, &b1, &w1, mids)
                } else {
                    grouped_few_positions(&g, &b1, &w1_bf16, mids)
                }
            };
            for wide in [true, false] {
                let got = one(&mids, b, wide);
                for r in 0..b {
                    for tt in 0..t {
                        for ch in 0..c {
                            let grp = ch / d;
                            let mut xi = vec![0f32; d * k1];
                            for tap in 0..k1 {
                                for ci in 0..d {
                                    xi[ci * k1 + tap] = mids[r][(tt + tap) * c + grp * d + ci];
                                }
                            }
                            let w = &w1[ch * d * k1..(ch + 1) * d * k1];
                            let dot = if wide {
                                cpu::dot(&xi, w)
                            } else {
                                cpu::dot_bf16(&xi, &w1_bf16[ch * d * k1..(ch + 1) * d * k1])
                            };
                            let want = b1[ch] + dot;
                            let at = (r * t + tt) * c + ch;
                            assert_eq!(
                                got[at].to_bits(),
                                want.to_bits(),
                                "b {b} row {r} t {tt} ch {ch}"
                            );
                        }
                    }
                    // the row alone gives the same bits
                    let alone = one(&mids[r..r + 1], 1, wide);
                    assert_eq!(
                        alone,
                        got[r * t * c..(r + 1) * t * c],
                        "b {b} row {r} alone"
                    );
                }
            }
        }
    }

    /// A quantized model loaded in f32 keeps a bf16-stored grouped weight as it is: with
    /// f32 activations the op gives bit for bit what it gives on the widened weight, for
    /// decode (in-place dots) and longer inputs (widened view), with held or packed biases.
    #[test]
    fn f32_activations_with_a_bf16_grouped_weight_equal_the_widened_weight() -> Result<()> {
        let (b, groups, d, k0, k1) = (2, 4, 37, 2, 2);
        let c = groups * d;
        let f32_tensor =
            |n: usize, seed: u32, shape: &[usize]| test_tensor(n, seed, shape, DType::F32);
        let w1 = f32_tensor(c * d * k1, 4, &[c, d, k1])?.to_dtype(DType::BF16)?;
        let w1_wide = w1.to_dtype(DType::F32)?;
        for t in [1, 2, cpu::DECODE_POSITIONS, 9] {
            let len = t + k0 + k1 - 2;
            let x = f32_tensor(b * len * c, 1, &[b, len, c])?;
            let w0 = f32_tensor(c * k0, 2, &[c, 1, k0])?;
            let b0 = f32_tensor(c, 3, &[c])?;
            let b1 = f32_tensor(c, 5, &[c])?;
            let got = fused(&x, &w0, &b0, &w1, &b1, groups)?;
            assert_eq!(got.dtype(), DType::F32);
            let want = fused(&x, &w0, &b0, &w1_wide, &b1, groups)?;
            assert_eq!(
                got.flatten_all()?.to_vec1::<f32>()?,
                want.flatten_all()?.to_vec1::<f32>()?,
                "held biases, t = {t}"
            );
            // trainable biases: the packed path widens the weight first
            let b1v = candle_core::Var::from_tensor(&b1)?;
            let got = fused(&x, &w0, &b0, &w1, b1v.as_tensor(), groups)?;
            assert_eq!(
                got.flatten_all()?.to_vec1::<f32>()?,
                want.flatten_all()?.to_vec1::<f32>()?,
                "packed biases, t = {t}"
            );
        }
        Ok(())
    }
}
