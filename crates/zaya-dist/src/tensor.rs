//! Collectives on candle tensors (f32 on the wire, the tensor's dtype kept).

use candle_core::{DType, Tensor};

use crate::comm::Comm;
use crate::error::ParallelResult;

fn host(t: &Tensor) -> ParallelResult<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// Element-wise sum of `t` over the group (the partial outputs of a row-parallel layer).
pub fn all_reduce(comm: &dyn Comm, t: &Tensor) -> ParallelResult<Tensor> {
    if comm.size() == 1 {
        return Ok(t.clone());
    }
    let mut buf = host(t)?;
    comm.all_reduce_sum(&mut buf)?;
    Ok(Tensor::from_vec(buf, t.shape(), t.device())?.to_dtype(t.dtype())?)
}

/// Every member's `t` (all the same shape) concatenated along the last axis, in rank order
/// (vocab-parallel logits to full logits).
pub fn all_gather_last(comm: &dyn Comm, t: &Tensor) -> ParallelResult<Tensor> {
    let n = comm.size();
    if n == 1 {
        return Ok(t.clone());
    }
    let dims = t.dims().to_vec();
    let last = *dims.last().unwrap_or(&1);
    let rows: usize = dims[..dims.len().saturating_sub(1)].iter().product();
    let all = comm.all_gather(&host(t)?)?;
    // [n, rows, last] → [rows, n, last] → [.., n·last]
    let g = Tensor::from_vec(all, (n, rows, last), t.device())?
        .transpose(0, 1)?
        .contiguous()?;
    let mut out_dims = dims;
    *out_dims.last_mut().unwrap() = n * last;
    Ok(g.reshape(out_dims)?.to_dtype(t.dtype())?)
}
