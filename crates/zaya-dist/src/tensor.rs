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

/// Every member's `t` (all the same shape) concatenated along `axis`, in rank order (the
/// attention probabilities of each rank's query heads to all heads).
pub fn all_gather_axis(comm: &dyn Comm, t: &Tensor, axis: usize) -> ParallelResult<Tensor> {
    let n = comm.size();
    if n == 1 {
        return Ok(t.clone());
    }
    let dims = t.dims().to_vec();
    let outer: usize = dims[..axis].iter().product();
    let inner: usize = dims[axis..].iter().product();
    let all = comm.all_gather(&host(t)?)?;
    // [n, outer, inner] → [outer, n, inner]: each member's block stays whole inside a row
    let g = Tensor::from_vec(all, (n, outer, inner), t.device())?
        .transpose(0, 1)?
        .contiguous()?;
    let mut out_dims = dims;
    out_dims[axis] *= n;
    Ok(g.reshape(out_dims)?.to_dtype(t.dtype())?)
}

/// Tensors as one f32 message that names their shapes: the count, then per tensor its rank
/// and dims, then all the values in order (captures sent between pipeline stages).
pub fn pack_tensors(ts: &[Tensor]) -> ParallelResult<Vec<f32>> {
    let mut head = vec![ts.len() as f32];
    let mut body = Vec::new();
    for t in ts {
        head.push(t.rank() as f32);
        head.extend(t.dims().iter().map(|&d| d as f32));
        body.extend(host(t)?);
    }
    head.extend(body);
    Ok(head)
}

/// The tensors of a [`pack_tensors`] message (f32); a message that does not describe
/// itself consistently is an error.
pub fn unpack_tensors(msg: &[f32], device: &candle_core::Device) -> ParallelResult<Vec<Tensor>> {
    let bad = |why: &str| {
        crate::error::ParallelError::Unsupported(format!(
            "a message of {} values does not hold packed tensors: {why}",
            msg.len()
        ))
    };
    let mut at = 0usize;
    let mut next = |what: &str| -> ParallelResult<usize> {
        let v = *msg.get(at).ok_or_else(|| bad(what))?;
        at += 1;
        if v < 0.0 || v.fract() != 0.0 || v > 16_777_216.0 {
            return Err(bad(what));
        }
        Ok(v as usize)
    };
    let count = next("count")?;
    let mut shapes = Vec::with_capacity(count.min(1024));
    for _ in 0..count {
        let rank = next("rank")?;
        if rank > 8 {
            return Err(bad("rank"));
        }
        let dims = (0..rank)
            .map(|_| next("dims"))
            .collect::<ParallelResult<Vec<_>>>()?;
        shapes.push(dims);
    }
    let mut out = Vec::with_capacity(shapes.len());
    for dims in shapes {
        let len = dims
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| bad("size"))?;
        let end = at.checked_add(len).ok_or_else(|| bad("size"))?;
        let vals = msg.get(at..end).ok_or_else(|| bad("values"))?;
        out.push(Tensor::from_vec(vals.to_vec(), dims, device)?);
        at = end;
    }
    if at != msg.len() {
        return Err(bad("trailing values"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn packed_tensors_round_trip_and_malformed_messages_are_errors() {
        let dev = Device::Cpu;
        let a = Tensor::arange(0f32, 6.0, &dev)
            .unwrap()
            .reshape((2, 3))
            .unwrap();
        let b = Tensor::new(&[7f32], &dev).unwrap();
        let empty = Tensor::zeros((0, 4), DType::F32, &dev).unwrap();
        let msg = pack_tensors(&[a.clone(), b.clone(), empty]).unwrap();
        let got = unpack_tensors(&msg, &dev).unwrap();
        assert_eq!(got.len(), 3);
        assert_eq!(
            got[0].to_vec2::<f32>().unwrap(),
            a.to_vec2::<f32>().unwrap()
        );
        assert_eq!(got[1].to_vec1::<f32>().unwrap(), vec![7.0]);
        assert_eq!(got[2].dims(), &[0, 4]);
        // truncated, trailing, negative and fractional headers: errors, never panics
        assert!(unpack_tensors(&msg[..msg.len() - 1], &dev).is_err());
        assert!(unpack_tensors(&[msg.as_slice(), &[1.0]].concat(), &dev).is_err());
        assert!(unpack_tensors(&[-1.0], &dev).is_err());
        assert!(unpack_tensors(&[1.5], &dev).is_err());
        assert!(unpack_tensors(&[1.0, 2.0, 1e7, 1e7], &dev).is_err());
        assert!(unpack_tensors(&[], &dev).is_err());
    }
}
