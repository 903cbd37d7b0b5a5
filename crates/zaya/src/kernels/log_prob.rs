//! Fused log-probability of the target class, `log_softmax(logits)[n, ids[n]]`, for the
//! loss head's `[rows × vocab]` chunks: one pass per row forward (maximum, then the
//! log-sum-exp) and one pass per row backward, `d logits = g · (onehot(id) − softmax)`,
//! instead of the reference's half-dozen full-size element-wise ops (each of which also
//! costs candle's backward a zero-filled gradient buffer and an add).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

use super::cpu::{self, f32_view, storage_from_f32, tensor_from_f32, with_cpu_storage};
use super::KernelError;

const OP: &str = "log_prob_gather";

struct LogProbGather {
    ids: Vec<u32>,
}

/// `(max, ln Σ exp(x − max))` of one row; `None` when the maximum is not finite or a value
/// is NaN (the reference's `x − max` gives NaN there).
pub(super) fn row_stats(row: &[f32]) -> Option<(f32, f32)> {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !m.is_finite() || row.iter().any(|v| v.is_nan()) {
        return None;
    }
    Some((m, cpu::sum_exp_sub(row, m).ln()))
}

impl CustomOp1 for LogProbGather {
    fn name(&self) -> &'static str {
        "zaya-log-prob-gather"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, v) = l.shape().dims2()?;
        let x = f32_view(s, l, OP)?;
        let out: Vec<f32> = cpu::par_map(n, n * v, |r| {
            let row = &x[r * v..(r + 1) * v];
            match row_stats(row) {
                Some((m, lse)) => (row[self.ids[r] as usize] - m) - lse,
                None => f32::NAN,
            }
        });
        Ok((
            storage_from_f32(out, s.dtype(), OP)?,
            Shape::from_dims(&[n, 1]),
        ))
    }

    fn bwd(&self, logits: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (n, v) = logits.dims2()?;
        let g: Vec<f32> = grad.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let mut dx = vec![0f32; n * v];
        with_cpu_storage(logits, OP, |s, l| {
            let x = f32_view(s, l, OP)?;
            cpu::par_chunks_mut(&mut dx, v, |r, d| {
                let row = &x[r * v..(r + 1) * v];
                match row_stats(row) {
                    Some((m, lse)) => {
                        let gr = g[r];
                        cpu::neg_softmax_scaled(row, m + lse, gr, d);
                        d[self.ids[r] as usize] += gr;
                    }
                    None => d.fill(f32::NAN),
                }
            });
            Ok(())
        })?;
        Ok(Some(tensor_from_f32(
            dx,
            logits.shape(),
            logits.dtype(),
            logits,
        )?))
    }
}

/// See [`super::log_prob_gather`].
pub(super) fn fused(logits: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let (n, v) = check(logits, ids)?;
    let ids: Vec<u32> = ids.flatten_all()?.to_vec1()?;
    if let Some((r, &id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= v) {
        return Err(KernelError::Shape {
            op: OP,
            message: format!("target {id} of row {r} is outside the {v} classes"),
        }
        .into());
    }
    debug_assert_eq!(ids.len(), n);
    logits.apply_op1(LogProbGather { ids })
}

/// `logits` `[N, V]` and `ids` `[N, 1]` u32: returns `(N, V)`.
pub(super) fn check(logits: &Tensor, ids: &Tensor) -> Result<(usize, usize)> {
    let bad =
        |message: String| -> candle_core::Error { KernelError::Shape { op: OP, message }.into() };
    let (n, v) = logits.dims2().map_err(|_| {
        bad(format!(
            "logits must be [rows, classes], got {:?}",
            logits.dims()
        ))
    })?;
    if ids.dims() != [n, 1] || ids.dtype() != DType::U32 {
        return Err(bad(format!(
            "ids must be [{n}, 1] u32, got {:?} {:?}",
            ids.dims(),
            ids.dtype()
        )));
    }
    if v == 0 {
        return Err(bad("no classes".to_string()));
    }
    Ok((n, v))
}
