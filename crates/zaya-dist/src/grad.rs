//! Data-parallel gradient averaging: gradients packed into buckets of a bounded size (one
//! collective per bucket instead of one per parameter, as DDP does), all-reduced, divided by
//! the number of replicas (or left as sums) and unpacked to their shapes. `zaya train --dp N`
//! sums its replicas' gradients with [`all_reduce_sum`] (each replica's loss is already
//! divided by the step's global target count).

use candle_core::{DType, Tensor};

use crate::comm::Comm;
use crate::error::ParallelResult;

/// The mean over the group of each gradient (`grads` in the same order and shapes on every
/// member), reduced in buckets of at most `bucket_elems` values (a gradient larger than a
/// bucket gets a bucket of its own). Every member returns identical bits, whatever the
/// bucketing: each value is summed in rank order.
pub fn all_reduce_mean(
    comm: &dyn Comm,
    grads: &[Tensor],
    bucket_elems: usize,
) -> ParallelResult<Vec<Tensor>> {
    reduce_in_buckets(comm, grads, bucket_elems, Some(comm.size() as f32))
}

/// The sum over the group of each gradient, in buckets as [`all_reduce_mean`].
pub fn all_reduce_sum(
    comm: &dyn Comm,
    grads: &[Tensor],
    bucket_elems: usize,
) -> ParallelResult<Vec<Tensor>> {
    reduce_in_buckets(comm, grads, bucket_elems, None)
}

fn reduce_in_buckets(
    comm: &dyn Comm,
    grads: &[Tensor],
    bucket_elems: usize,
    divide_by: Option<f32>,
) -> ParallelResult<Vec<Tensor>> {
    let mut out: Vec<Option<Tensor>> = vec![None; grads.len()];
    let mut start = 0;
    while start < grads.len() {
        // grads[start..end] form one bucket
        let mut end = start;
        let mut elems = 0;
        while end < grads.len() && (end == start || elems + grads[end].elem_count() <= bucket_elems)
        {
            elems += grads[end].elem_count();
            end += 1;
        }
        let mut buf = Vec::with_capacity(elems);
        for g in &grads[start..end] {
            buf.extend(g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
        }
        comm.all_reduce_sum(&mut buf)?;
        let mut at = 0;
        for (i, g) in grads[start..end].iter().enumerate() {
            let k = g.elem_count();
            let mean: Vec<f32> = match divide_by {
                Some(n) => buf[at..at + k].iter().map(|v| v / n).collect(),
                None => buf[at..at + k].to_vec(),
            };
            out[start + i] =
                Some(Tensor::from_vec(mean, g.shape(), g.device())?.to_dtype(g.dtype())?);
            at += k;
        }
        start = end;
    }
    Ok(out
        .into_iter()
        .map(|t| t.expect("every gradient is in a bucket"))
        .collect())
}
