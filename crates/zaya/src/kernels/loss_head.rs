//! The training LM head in one piece: for a chunk of counted rows, the logits
//! `y · Wᵀ (+ b)` (scaled by `1 / T`), each row's `log_softmax(..)[target]`, and the backward
//! of `Σ coef_r · logp_r` to the rows, the weight and the bias, without autograd.
//!
//! Why: candle's graph for the same chunk allocates the logits and a zero-filled gradient
//! of them, computes the weight's gradient as `yᵀ · dlogits` (`[H × V]`), whose transpose
//! the gradient store then copies into a contiguous `[V × H]` buffer, adds that to the
//! previous chunks' sum in another pass, and scatters the rows' gradient with an
//! `index_add` into a new tensor. Here the logits live in one buffer reused by every chunk,
//! their gradient overwrites them in place, and the GEMM writes (and sums) the weight's
//! gradient directly in `[V × H]` order. The reference is the autograd path in
//! `train/loss.rs` (`ZAYA_KERNEL_LOSS_HEAD=reference`), with the same per-row formulas
//! (`log_prob`'s statistics and softmax) and the same products in other summation orders.

use super::cpu::{self, MatMut, MatRef};
use super::log_prob::row_stats;
use super::KernelError;

const OP: &str = "loss_head";

/// The head's parameters, f32 and contiguous: `weight` `[V × H]`, `bias` `[V]`.
pub struct HeadParams<'a> {
    pub weight: &'a [f32],
    pub bias: Option<&'a [f32]>,
    pub vocab: usize,
    pub hidden: usize,
}

/// The counted rows: `rows[k]` is a row of the `[N × H]` hidden state, `ids[k]` its target
/// class and `coef[k]` the weight of its log-probability in the differentiated sum.
pub struct HeadRows<'a> {
    pub hidden: &'a [f32],
    pub rows: &'a [u32],
    pub ids: &'a [u32],
    pub coef: &'a [f32],
}

/// What [`backward`] returns.
#[derive(Debug)]
pub struct HeadGradients {
    /// `Σ logp_r` over the chunks that ran, each chunk summed in f32 in row order.
    pub sum_logp: f64,
    /// `[N × H]`: zero except the counted rows.
    pub d_hidden: Vec<f32>,
    /// `[V × H]`, when asked for and a chunk ran.
    pub d_weight: Option<Vec<f32>>,
    /// `[V]`, when asked for, the head has a bias and a chunk ran.
    pub d_bias: Option<Vec<f32>>,
}

/// Runs the head over `rows` in chunks of `chunk` rows; the weight's and the bias's
/// gradients only where `want_weight` / `want_bias` (a frozen head has none). A chunk whose
/// coefficients are all zero is skipped, as the reference skips it for GRPO's weighted head
/// (its log-probabilities are not summed either; cross-entropy's `−1 / normalizer` is never
/// zero). Where no chunk runs there is no weight or bias gradient at all (`None`), as in the
/// reference: the optimizer then leaves the head alone instead of applying a zero gradient.
/// `inv_temp` is `1 / T`.
pub fn backward(
    p: &HeadParams<'_>,
    r: &HeadRows<'_>,
    inv_temp: f32,
    chunk: usize,
    want_weight: bool,
    want_bias: bool,
) -> Result<HeadGradients, KernelError> {
    check(p, r, chunk)?;
    let (v, h) = (p.vocab, p.hidden);
    let gemm_error = |e: candle_core::Error| KernelError::Internal(format!("{OP}: {e}"));
    let chunk = chunk.min(r.rows.len()).max(1);
    // The logits and the weight's gradient are written whole by their first product (no
    // zero fill: ~130 MB a step on the calling thread at the small model's shapes).
    let mut logits = cpu::uninit_f32(chunk * v);
    let mut y = vec![0f32; chunk * h];
    let mut dy = vec![0f32; chunk * h];
    let mut logp = vec![0f32; chunk];
    let mut d_hidden = vec![0f32; r.hidden.len()];
    let mut d_weight = want_weight.then(|| cpu::uninit_f32(v * h));
    let mut d_bias = (want_bias && p.bias.is_some()).then(|| vec![0f32; v]);
    let mut sum_logp = 0f64;
    let mut first = true;
    for start in (0..r.rows.len()).step_by(chunk) {
        let n = chunk.min(r.rows.len() - start);
        let rows = &r.rows[start..start + n];
        let (ids, coef) = (&r.ids[start..start + n], &r.coef[start..start + n]);
        if coef.iter().all(|&c| c == 0.0) {
            continue;
        }
        for (k, &row) in rows.iter().enumerate() {
            let row = row as usize;
            y[k * h..(k + 1) * h].copy_from_slice(&r.hidden[row * h..(row + 1) * h]);
        }
        let (y, dy, logp) = (&y[..n * h], &mut dy[..n * h], &mut logp[..n]);
        // logits = y · Wᵀ
        let logits = cpu::gemm_fresh(
            n,
            v,
            h,
            &mut logits[..n * v],
            MatRef::rows(y, 0, h),
            MatRef::rows(p.weight, 0, h).t(),
            1.0,
            true,
        )
        .map_err(gemm_error)?;
        // Per row, as the reference's ops in turn: the bias, the temperature, the target's
        // log-probability, then `coef · (onehot − softmax)`, times `1 / T` for the raw
        // logits, written over them.
        let logp_out = cpu::RowsOut::new(logp);
        cpu::par_chunks_mut(logits, v, |k, row| {
            if let Some(b) = p.bias {
                for (x, b) in row.iter_mut().zip(b) {
                    *x += b;
                }
            }
            if inv_temp != 1.0 {
                row.iter_mut().for_each(|x| *x *= inv_temp);
            }
            let (id, g) = (ids[k] as usize, coef[k]);
            let lp = match row_stats(row) {
                Some((m, lse)) => {
                    let lp = (row[id] - m) - lse;
                    cpu::neg_softmax_scaled_in_place(row, m + lse, g);
                    row[id] += g;
                    if inv_temp != 1.0 {
                        row.iter_mut().for_each(|x| *x *= inv_temp);
                    }
                    lp
                }
                None => {
                    row.fill(f32::NAN);
                    f32::NAN
                }
            };
            // SAFETY: entry `k` belongs to this row's task alone.
            unsafe { logp_out.row(k, 1)[0] = lp };
        });
        sum_logp += f64::from(logp.iter().sum::<f32>());
        let dlogits = &*logits;
        // d y = dlogits · W, added to the counted rows.
        cpu::gemm(
            n,
            h,
            v,
            MatMut::new(dy, 0, h),
            false,
            MatRef::rows(dlogits, 0, v),
            MatRef::rows(p.weight, 0, h),
            1.0,
            true,
        )
        .map_err(gemm_error)?;
        for (k, &row) in rows.iter().enumerate() {
            let row = row as usize;
            for (d, g) in d_hidden[row * h..(row + 1) * h]
                .iter_mut()
                .zip(&dy[k * h..(k + 1) * h])
            {
                *d += g;
            }
        }
        // d W (+)= dlogitsᵀ · y, written in the weight's own [V × H] order.
        if let Some(dw) = d_weight.as_mut() {
            let (lhs, rhs) = (MatRef::rows(dlogits, 0, v).t(), MatRef::rows(y, 0, h));
            if first {
                cpu::gemm_fresh(v, h, n, dw, lhs, rhs, 1.0, true).map_err(gemm_error)?;
            } else {
                // SAFETY: the first chunk's product initialised every value.
                let dw = unsafe { cpu::assume_init_mut(dw) };
                cpu::gemm(v, h, n, MatMut::new(dw, 0, h), true, lhs, rhs, 1.0, true)
                    .map_err(gemm_error)?;
            }
        }
        if let Some(db) = d_bias.as_mut() {
            for row in dlogits.chunks_exact(v) {
                for (d, g) in db.iter_mut().zip(row) {
                    *d += g;
                }
            }
        }
        first = false;
    }
    let ran = !first;
    // SAFETY: when a chunk ran, its product wrote every value.
    let d_weight = d_weight
        .filter(|_| ran)
        .map(|dw| unsafe { dw.assume_init() }.into_vec());
    Ok(HeadGradients {
        sum_logp,
        d_hidden,
        d_weight,
        d_bias: d_bias.filter(|_| ran),
    })
}

fn check(p: &HeadParams<'_>, r: &HeadRows<'_>, chunk: usize) -> Result<(), KernelError> {
    let bad = |message: String| KernelError::Shape { op: OP, message };
    let (v, h) = (p.vocab, p.hidden);
    if chunk == 0 {
        return Err(bad("chunk of zero rows".into()));
    }
    if v == 0 || h == 0 || p.weight.len() != v * h {
        return Err(bad(format!(
            "weight holds {} values for [{v} × {h}]",
            p.weight.len()
        )));
    }
    if p.bias.is_some_and(|b| b.len() != v) {
        return Err(bad(format!(
            "bias holds {} values for {v} classes",
            p.bias.map_or(0, <[f32]>::len)
        )));
    }
    if !r.hidden.len().is_multiple_of(h) {
        return Err(bad(format!(
            "hidden holds {} values, not a multiple of {h}",
            r.hidden.len()
        )));
    }
    let n_total = r.hidden.len() / h;
    if r.ids.len() != r.rows.len() || r.coef.len() != r.rows.len() {
        return Err(bad(format!(
            "{} rows, {} targets, {} coefficients",
            r.rows.len(),
            r.ids.len(),
            r.coef.len()
        )));
    }
    if let Some(k) = r.rows.iter().position(|&row| row as usize >= n_total) {
        return Err(bad(format!(
            "counted row {} (entry {k}) outside the {n_total} hidden rows",
            r.rows[k]
        )));
    }
    if let Some(k) = r.ids.iter().position(|&id| id as usize >= v) {
        return Err(bad(format!(
            "target {} of entry {k} is outside the {v} classes",
            r.ids[k]
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The in-place softmax-gradient body equals the out-of-place one the log-prob kernel
    /// uses, bit for bit (vector body and tail).
    #[test]
    fn softmax_gradient_in_place_equals_the_out_of_place_one() {
        let row: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let mut want = vec![0f32; row.len()];
        cpu::neg_softmax_scaled(&row, 1.25, -0.5, &mut want);
        let mut got = row.clone();
        cpu::neg_softmax_scaled_in_place(&mut got, 1.25, -0.5);
        assert_eq!(got, want);
    }

    #[test]
    fn bad_rows_targets_and_shapes_are_typed_errors() {
        let (v, h) = (5usize, 3usize);
        let w = vec![0.1f32; v * h];
        let x = vec![0.2f32; 4 * h];
        let p = HeadParams {
            weight: &w,
            bias: None,
            vocab: v,
            hidden: h,
        };
        let run = |rows: &[u32], ids: &[u32], coef: &[f32], chunk| {
            let r = HeadRows {
                hidden: &x,
                rows,
                ids,
                coef,
            };
            backward(&p, &r, 1.0, chunk, true, false).map(|_| ())
        };
        let message = |e: Result<(), KernelError>| e.unwrap_err().to_string();
        assert!(message(run(&[4], &[0], &[1.0], 2)).contains("counted row 4"));
        assert!(message(run(&[1], &[5], &[1.0], 2)).contains("target 5"));
        assert!(message(run(&[1, 2], &[0], &[1.0], 2)).contains("2 rows, 1 targets"));
        assert!(message(run(&[1], &[0], &[1.0], 0)).contains("chunk"));
        let short = HeadParams {
            weight: &w[1..],
            ..p
        };
        let r = HeadRows {
            hidden: &x,
            rows: &[0],
            ids: &[0],
            coef: &[1.0],
        };
        assert!(backward(&short, &r, 1.0, 1, true, false)
            .unwrap_err()
            .to_string()
            .contains("weight holds 14"));
        // A row whose logits hold a NaN gives NaN, as the reference's `x − max` does.
        let mut wn = w.clone();
        wn[2 * h] = f32::NAN;
        let nan = HeadParams { weight: &wn, ..p };
        let out = backward(&nan, &r, 1.0, 1, true, false).unwrap();
        assert!(out.sum_logp.is_nan() && out.d_hidden[..h].iter().all(|g| g.is_nan()));
        // Rows share nothing: a counted row twice gets both terms.
        let r2 = HeadRows {
            hidden: &x,
            rows: &[2, 2],
            ids: &[1, 1],
            coef: &[1.0, 1.0],
        };
        let r1 = HeadRows {
            hidden: &x,
            rows: &[2],
            ids: &[1],
            coef: &[2.0],
        };
        let (a, b) = (
            backward(&p, &r2, 1.0, 1, true, false).unwrap(),
            backward(&p, &r1, 1.0, 1, true, false).unwrap(),
        );
        for (x, y) in a.d_hidden.iter().zip(&b.d_hidden) {
            assert!((x - y).abs() < 1e-6);
        }
    }

    /// GFLOP/s of the head's three products at the small model's shapes, and of the weight
    /// gradient written through a transposed destination (candle's operand order).
    #[test]
    #[ignore = "timing; run with --ignored --nocapture"]
    fn product_speeds() {
        let (n, v, h) = (524usize, 32000usize, 512usize);
        let fill = |len: usize, s: u32| -> Vec<f32> {
            (0..len)
                .map(|i| {
                    ((i as u32).wrapping_mul(2654435761).wrapping_add(s) >> 9) as f32 / 8.4e6 - 1.0
                })
                .collect()
        };
        let (w, y, dl) = (fill(v * h, 1), fill(n * h, 2), fill(n * v, 3));
        let mut out = vec![0f32; n * v];
        let mut dy = vec![0f32; n * h];
        let mut dw = vec![0f32; v * h];
        let time = |name: &str, f: &mut dyn FnMut()| {
            f();
            let mut best = f64::MAX;
            for _ in 0..5 {
                let t = std::time::Instant::now();
                f();
                best = best.min(t.elapsed().as_secs_f64());
            }
            println!(
                "{name}: {:.1} ms, {:.0} GFLOP/s",
                best * 1e3,
                2.0 * (n * v * h) as f64 / best / 1e9
            );
        };
        time("logits = y Wt", &mut || {
            cpu::gemm(
                n,
                v,
                h,
                MatMut::new(&mut out, 0, v),
                false,
                MatRef::rows(&y, 0, h),
                MatRef::rows(&w, 0, h).t(),
                1.0,
                true,
            )
            .unwrap()
        });
        time("dy = dl W", &mut || {
            cpu::gemm(
                n,
                h,
                v,
                MatMut::new(&mut dy, 0, h),
                false,
                MatRef::rows(&dl, 0, v),
                MatRef::rows(&w, 0, h),
                1.0,
                true,
            )
            .unwrap()
        });
        time("dW += dlT y", &mut || {
            cpu::gemm(
                v,
                h,
                n,
                MatMut::new(&mut dw, 0, h),
                true,
                MatRef::rows(&dl, 0, v).t(),
                MatRef::rows(&y, 0, h),
                1.0,
                true,
            )
            .unwrap()
        });
        time("dW = dlT y", &mut || {
            cpu::gemm(
                v,
                h,
                n,
                MatMut::new(&mut dw, 0, h),
                false,
                MatRef::rows(&dl, 0, v).t(),
                MatRef::rows(&y, 0, h),
                1.0,
                true,
            )
            .unwrap()
        });
    }
}
