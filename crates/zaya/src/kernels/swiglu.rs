//! Fused SwiGLU (`silu(gate) ⊙ up` on a `[.., 2I]` projection, gate first) and its variant
//! with a bias added before the activation. One pass per row with the vectorised exp;
//! fused backward (the gradient of silu is `σ(g)·(1 + g·(1 − σ(g)))`).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, D};

use super::cpu::{self, f32_view, host_f32, storage_from_f32, tensor_from_f32};
use super::KernelError;

fn halve(dims: &[usize], op: &'static str) -> Result<(usize, Shape)> {
    let two_i = dims.last().copied().unwrap_or(0);
    if two_i == 0 || !two_i.is_multiple_of(2) {
        return Err(KernelError::Shape {
            op,
            message: format!("last axis must be a non-empty even [.., 2I], got {dims:?}"),
        }
        .into());
    }
    let mut out = dims.to_vec();
    *out.last_mut().unwrap_or(&mut 0) = two_i / 2;
    Ok((two_i / 2, Shape::from_dims(&out)))
}

pub(super) fn forward(gu: &[f32], bias: Option<&[f32]>, i: usize) -> Vec<f32> {
    let rows = gu.len() / (2 * i);
    // `silu_mul` writes every element of a row: gate and up are `i` long each
    cpu::collect_rows(rows * i, i, |r, o| {
        let row = &gu[r * 2 * i..(r + 1) * 2 * i];
        match bias {
            None => cpu::silu_mul(&row[..i], &row[i..], o),
            Some(b) => {
                let biased: Vec<f32> = row.iter().zip(b).map(|(x, b)| x + b).collect();
                cpu::silu_mul(&biased[..i], &biased[i..], o)
            }
        }
    })
}

/// d(gate_up) for upstream `dy`, and the bias gradient (row sum) when asked.
pub(super) fn backward(
    gu: &[f32],
    bias: Option<&[f32]>,
    dy: &[f32],
    i: usize,
) -> (Vec<f32>, Vec<f32>) {
    let mut dgu = vec![0f32; gu.len()];
    cpu::par_chunks_mut(&mut dgu, 2 * i, |r, d| {
        let row = &gu[r * 2 * i..(r + 1) * 2 * i];
        let dyr = &dy[r * i..(r + 1) * i];
        let (dg, du) = d.split_at_mut(i);
        match bias {
            None => cpu::silu_mul_grad(&row[..i], &row[i..], dyr, dg, du),
            Some(b) => {
                let biased: Vec<f32> = row.iter().zip(b).map(|(x, b)| x + b).collect();
                cpu::silu_mul_grad(&biased[..i], &biased[i..], dyr, dg, du)
            }
        }
    });
    let db = if bias.is_some() {
        let mut db = vec![0f32; 2 * i];
        for row in dgu.chunks(2 * i) {
            for (a, b) in db.iter_mut().zip(row) {
                *a += b;
            }
        }
        db
    } else {
        Vec::new()
    };
    (dgu, db)
}

struct Swiglu;

impl CustomOp1 for Swiglu {
    fn name(&self) -> &'static str {
        "zaya-swiglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (i, shape) = halve(l.dims(), "swiglu")?;
        let gu = f32_view(s, l, "swiglu")?;
        Ok((
            storage_from_f32(forward(&gu, None, i), s.dtype(), "swiglu")?,
            shape,
        ))
    }

    fn bwd(&self, gate_up: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let i = gate_up.dim(D::Minus1)? / 2;
        let (dgu, _) = backward(&host_f32(gate_up)?, None, &host_f32(grad)?, i);
        Ok(Some(tensor_from_f32(
            dgu,
            gate_up.shape(),
            gate_up.dtype(),
            gate_up,
        )?))
    }
}

struct BiasSwiglu;

impl CustomOp2 for BiasSwiglu {
    fn name(&self) -> &'static str {
        "zaya-bias-swiglu"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (i, shape) = halve(l.dims(), "bias_swiglu")?;
        let gu = f32_view(s, l, "bias_swiglu")?;
        let b = f32_view(bs, bl, "bias_swiglu")?;
        Ok((
            storage_from_f32(forward(&gu, Some(&b), i), s.dtype(), "bias_swiglu")?,
            shape,
        ))
    }

    fn bwd(
        &self,
        gate_up: &Tensor,
        bias: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let i = gate_up.dim(D::Minus1)? / 2;
        let b = host_f32(bias)?;
        let (dgu, db) = backward(&host_f32(gate_up)?, Some(&b), &host_f32(grad)?, i);
        let dgu = gate_up
            .track_op()
            .then(|| tensor_from_f32(dgu, gate_up.shape(), gate_up.dtype(), gate_up))
            .transpose()?;
        let db = bias
            .track_op()
            .then(|| tensor_from_f32(db, bias.shape(), bias.dtype(), bias))
            .transpose()?;
        Ok((dgu, db))
    }
}

pub(super) fn fused(gate_up: &Tensor) -> Result<Tensor> {
    gate_up.apply_op1(Swiglu)
}

pub(super) fn fused_bias(gate_up: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let two_i = gate_up.dim(D::Minus1)?;
    if bias.dims() != [two_i] || bias.dtype() != gate_up.dtype() {
        return Err(KernelError::Shape {
            op: "bias_swiglu",
            message: format!(
                "bias must be [{two_i}] of {:?}, got {:?} of {:?}",
                gate_up.dtype(),
                bias.dims(),
                bias.dtype()
            ),
        }
        .into());
    }
    gate_up.apply_op2(bias, BiasSwiglu)
}
