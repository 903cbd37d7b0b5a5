//! Collectives with a backward pass: Megatron-LM's conjugate pairs as candle `CustomOp1`s,
//! so a rank's training graph runs straight through them.
//!
//! | op | forward | backward |
//! |---|---|---|
//! | [`Coll::copy`] ("f") | identity | all-reduce |
//! | [`Coll::reduce`] ("g") | all-reduce | identity |
//! | [`Coll::reduce_both`] | all-reduce | all-reduce |
//! | [`Coll::all_gather_rows`] | all-gather (axis 0) | reduce-scatter, or the own rows |
//! | [`Coll::reduce_scatter_rows`] | reduce-scatter (axis 0) | all-gather |
//! | [`Coll::all_to_all_rows`] | all-to-all (rows by destination) | the inverse all-to-all |
//!
//! Convention (Megatron's): a tensor that every member holds the same value of carries the
//! *whole* gradient on every member. Where such a tensor enters a computation that differs
//! between members (a column-parallel product, a rank's share of the tokens) it passes
//! through `copy`, whose backward sums the members' partial gradients; where partial results
//! become a shared value (row-parallel output) they pass through `reduce`, whose backward
//! hands every member the (whole) gradient as it is. `reduce_both` is for a sum whose result
//! is then used differently on each member (the CCA key mean of a GQA group spread over TP
//! ranks): its gradient is the sum of the members' uses.
//!
//! The ops hold an owned communicator ([`SharedComm`], made once per model by
//! [`shared`]: a duplicate of the group) because candle may run the backward after the
//! forward's borrows are gone. Every member must record the same collectives in the same
//! graph positions: candle visits a graph depth-first in argument order, so members whose
//! graphs have the same structure run the backward collectives in the same order.
//!
//! [`Coll::Host`] runs the same forward on a borrowed communicator without recording
//! anything (inference).

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};

use crate::comm::{Comm, DistError};
use crate::error::ParallelResult;

/// An owned communicator the graph's backward can use after the forward has returned.
pub type SharedComm = Arc<dyn Comm>;

/// A duplicate of `comm` (same members, same ranks) that graphs can own. Collective.
pub fn shared(comm: &dyn Comm) -> ParallelResult<SharedComm> {
    Ok(Arc::from(comm.split(0, comm.rank())?))
}

/// What the backward of [`Coll::all_gather_rows`] does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GatherBackward {
    /// The gathered tensor is then used differently on each member: the gradients are
    /// summed over the members and each gets its rows (reduce-scatter).
    ReduceScatter,
    /// The gathered tensor is used the same way on every member (its gradient is whole on
    /// each): each member takes its own rows.
    OwnRows,
}

#[derive(Debug, Clone)]
enum Kind {
    Copy,
    Reduce,
    ReduceBoth,
    Gather(GatherBackward),
    ReduceScatter,
    /// Rows per destination (forward), rows per source (received); `row` values per row.
    AllToAll {
        send: Vec<usize>,
        recv: Vec<usize>,
        row: usize,
    },
}

fn err(e: DistError) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

fn host(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

// ---- the data plane, shared by the ops and the host mode -------------------------------

fn all_reduce_vec(comm: &dyn Comm, mut v: Vec<f32>) -> candle_core::Result<Vec<f32>> {
    comm.all_reduce_sum(&mut v).map_err(err)?;
    Ok(v)
}

/// `v` holds rows of `row` values split by destination (`counts[d]` rows for member `d`,
/// in order); returns the rows received, by source, and how many came from each.
fn all_to_all_vec(
    comm: &dyn Comm,
    v: &[f32],
    counts: &[usize],
    row: usize,
) -> candle_core::Result<(Vec<f32>, Vec<usize>)> {
    let mut send = Vec::with_capacity(counts.len());
    let mut at = 0;
    for &c in counts {
        send.push(v[at * row..(at + c) * row].to_vec());
        at += c;
    }
    let got = comm.all_to_all_v(&send).map_err(err)?;
    let mut recv = Vec::with_capacity(got.len());
    let mut out = Vec::with_capacity(got.iter().map(Vec::len).sum());
    for (src, g) in got.into_iter().enumerate() {
        if row > 0 && !g.len().is_multiple_of(row) {
            return Err(err(DistError::Invalid {
                rank: comm.world_rank(),
                op: "all_to_all_rows",
                message: format!(
                    "received {} values from member {src}: not rows of {row}",
                    g.len()
                ),
            }));
        }
        recv.push(g.len().checked_div(row).unwrap_or(0));
        out.extend(g);
    }
    Ok((out, recv))
}

/// Rows of a tensor: `(rows, values per row)` for axis 0.
fn rows_of(shape: &Shape) -> (usize, usize) {
    let dims = shape.dims();
    let rows = dims.first().copied().unwrap_or(1);
    let row = dims.iter().skip(1).product();
    (rows, row)
}

fn with_rows(shape: &Shape, rows: usize) -> Shape {
    let mut dims = shape.dims().to_vec();
    if dims.is_empty() {
        dims.push(rows);
    } else {
        dims[0] = rows;
    }
    Shape::from_dims(&dims)
}

/// The op recorded in the graph.
struct Collective {
    comm: SharedComm,
    kind: Kind,
}

impl Collective {
    /// The forward on host values of shape `shape`: the result and its shape.
    fn run(&self, v: Vec<f32>, shape: &Shape) -> candle_core::Result<(Vec<f32>, Shape)> {
        forward(self.comm.as_ref(), &self.kind, v, shape)
    }
}

fn forward(
    comm: &dyn Comm,
    kind: &Kind,
    v: Vec<f32>,
    shape: &Shape,
) -> candle_core::Result<(Vec<f32>, Shape)> {
    let n = comm.size();
    Ok(match kind {
        Kind::Copy => (v, shape.clone()),
        Kind::Reduce | Kind::ReduceBoth => (all_reduce_vec(comm, v)?, shape.clone()),
        Kind::Gather(_) => {
            let (rows, _) = rows_of(shape);
            (
                comm.all_gather(&v).map_err(err)?,
                with_rows(shape, rows * n),
            )
        }
        Kind::ReduceScatter => {
            let (rows, _) = rows_of(shape);
            if !rows.is_multiple_of(n) {
                return Err(err(DistError::Invalid {
                    rank: comm.world_rank(),
                    op: "reduce_scatter_rows",
                    message: format!("{rows} rows do not split over {n} members"),
                }));
            }
            (
                comm.reduce_scatter_sum(&v).map_err(err)?,
                with_rows(shape, rows / n),
            )
        }
        Kind::AllToAll { send, row, .. } => {
            let (out, got) = all_to_all_vec(comm, &v, send, *row)?;
            (out, with_rows(shape, got.iter().sum()))
        }
    })
}

impl CustomOp1 for Collective {
    fn name(&self) -> &'static str {
        match self.kind {
            Kind::Copy => "tp-copy",
            Kind::Reduce => "tp-reduce",
            Kind::ReduceBoth => "tp-reduce-both",
            Kind::Gather(_) => "all-gather-rows",
            Kind::ReduceScatter => "reduce-scatter-rows",
            Kind::AllToAll { .. } => "all-to-all-rows",
        }
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("{}: f32 only", self.name());
        };
        let Some((a, b)) = layout.contiguous_offsets() else {
            candle_core::bail!("{}: the input must be contiguous", self.name());
        };
        let (out, shape) = self.run(data[a..b].to_vec(), layout.shape())?;
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let comm = self.comm.as_ref();
        let g = host(grad)?;
        let dev = arg.device();
        let out = match &self.kind {
            Kind::Copy | Kind::ReduceBoth => all_reduce_vec(comm, g)?,
            Kind::Reduce => g,
            Kind::Gather(GatherBackward::ReduceScatter) => {
                comm.reduce_scatter_sum(&g).map_err(err)?
            }
            Kind::Gather(GatherBackward::OwnRows) => {
                let k = arg.elem_count();
                let r = comm.rank();
                g[r * k..(r + 1) * k].to_vec()
            }
            Kind::ReduceScatter => comm.all_gather(&g).map_err(err)?,
            Kind::AllToAll { recv, row, .. } => all_to_all_vec(comm, &g, recv, *row)?.0,
        };
        Ok(Some(Tensor::from_vec(out, arg.shape(), dev)?))
    }
}

/// A group's collectives on tensors: recorded with their backward ([`Coll::Grad`]) or run
/// on a borrowed communicator without a graph ([`Coll::Host`]).
#[derive(Clone)]
pub enum Coll<'a> {
    Host(&'a dyn Comm),
    Grad(SharedComm),
}

impl Coll<'_> {
    pub fn comm(&self) -> &dyn Comm {
        match self {
            Coll::Host(c) => *c,
            Coll::Grad(c) => c.as_ref(),
        }
    }

    pub fn size(&self) -> usize {
        self.comm().size()
    }

    pub fn rank(&self) -> usize {
        self.comm().rank()
    }

    fn apply(&self, x: &Tensor, kind: Kind) -> ParallelResult<Tensor> {
        let dtype = x.dtype();
        let x32 = x.to_dtype(DType::F32)?.contiguous()?;
        let y = match self {
            Coll::Host(comm) => {
                let (v, shape) = forward(*comm, &kind, host(&x32)?, x32.shape())?;
                Tensor::from_vec(v, shape, x.device())?
            }
            Coll::Grad(comm) => x32.apply_op1(Collective {
                comm: Arc::clone(comm),
                kind,
            })?,
        };
        Ok(y.to_dtype(dtype)?)
    }

    /// "f": identity forward, all-reduce backward.
    pub fn copy(&self, x: &Tensor) -> ParallelResult<Tensor> {
        if self.size() == 1 || matches!(self, Coll::Host(_)) {
            return Ok(x.clone());
        }
        self.apply(x, Kind::Copy)
    }

    /// "g": all-reduce forward, identity backward.
    pub fn reduce(&self, x: &Tensor) -> ParallelResult<Tensor> {
        if self.size() == 1 {
            return Ok(x.clone());
        }
        self.apply(x, Kind::Reduce)
    }

    /// All-reduce forward and backward.
    pub fn reduce_both(&self, x: &Tensor) -> ParallelResult<Tensor> {
        if self.size() == 1 {
            return Ok(x.clone());
        }
        self.apply(x, Kind::ReduceBoth)
    }

    /// Every member's `x` (same shape) stacked along axis 0 in member order.
    pub fn all_gather_rows(&self, x: &Tensor, bwd: GatherBackward) -> ParallelResult<Tensor> {
        if self.size() == 1 {
            return Ok(x.clone());
        }
        self.apply(x, Kind::Gather(bwd))
    }

    /// Axis 0 of `x` cut in `size` equal blocks; member `r` gets the sum of block `r`.
    pub fn reduce_scatter_rows(&self, x: &Tensor) -> ParallelResult<Tensor> {
        if self.size() == 1 {
            return Ok(x.clone());
        }
        self.apply(x, Kind::ReduceScatter)
    }

    /// `x`'s rows grouped by destination (`send[d]` rows for member `d`, in order) sent
    /// there; returns the rows received (by source, in order) and how many came from each.
    /// The backward returns each row's gradient to where it came from.
    pub fn all_to_all_rows(
        &self,
        x: &Tensor,
        send: &[usize],
    ) -> ParallelResult<(Tensor, Vec<usize>)> {
        let comm = self.comm();
        let n = comm.size();
        let (rows, row) = rows_of(x.shape());
        if send.len() != n || send.iter().sum::<usize>() != rows {
            return Err(DistError::Invalid {
                rank: comm.world_rank(),
                op: "all_to_all_rows",
                message: format!("{rows} rows cannot be sent as {send:?} to {n} members"),
            }
            .into());
        }
        let counts: Vec<Vec<f32>> = send.iter().map(|&c| vec![c as f32]).collect();
        let recv: Vec<usize> = comm
            .all_to_all_v(&counts)?
            .into_iter()
            .map(|v| v.first().copied().unwrap_or(0.0) as usize)
            .collect();
        let kind = Kind::AllToAll {
            send: send.to_vec(),
            recv: recv.clone(),
            row,
        };
        Ok((self.apply(x, kind)?, recv))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_of_rows() {
        let s = Shape::from_dims(&[6, 2, 3]);
        assert_eq!(rows_of(&s), (6, 6));
        assert_eq!(with_rows(&s, 2).dims(), &[2, 2, 3]);
    }
}
