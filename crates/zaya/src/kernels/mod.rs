//! Numerical building blocks of the model. Each function here is the *reference*
//! implementation, built only from differentiable candle ops (candle's fused rms_norm /
//! softmax_last_dim / rope silently drop gradients, so they are never used here). Fast
//! implementations live beside them and are chosen at run time by the kernel registry.

use candle_core::{DType, Result, Tensor, D};

/// `w ⊙ cast_back( x / sqrt(mean(x²) + eps) )` with the statistics in f32, as `ZayaRMSNorm`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = xf.broadcast_mul(&(var + eps)?.sqrt()?.recip()?)?;
    normed.to_dtype(dtype)?.broadcast_mul(weight)
}

/// Softmax over the last axis computed in f32 and cast back to the input dtype.
pub fn softmax_f32(x: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let max = xf.max_keepdim(D::Minus1)?.detach();
    let e = xf.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&s)?.to_dtype(dtype)
}

/// Softmax over the last axis returning the input dtype (the router's softmax). Like torch
/// on reduced-precision inputs, the arithmetic is done in f32 and rounded once.
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    softmax_f32(x)
}

/// Partial rotate-half RoPE: the first `cos.dim(-1)` dims of each head are rotated with
/// pairs `(i, i + rd/2)`, the rest pass through. `x` is `[B, heads, T, D]`, `cos`/`sin` are
/// `[B or 1, T, rd]`.
pub fn rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let rd = cos.dim(D::Minus1)?;
    if rd == 0 {
        return Ok(x.clone());
    }
    let cos = cos.unsqueeze(1)?;
    let sin = sin.unsqueeze(1)?;
    let x_rot = x.narrow(D::Minus1, 0, rd)?;
    let x1 = x_rot.narrow(D::Minus1, 0, rd / 2)?;
    let x2 = x_rot.narrow(D::Minus1, rd / 2, rd / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    let embedded = (x_rot.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?;
    if rd == d {
        return Ok(embedded);
    }
    let x_pass = x.narrow(D::Minus1, rd, d - rd)?;
    Tensor::cat(&[&embedded, &x_pass], D::Minus1)
}

/// SwiGLU on a fused `[.., 2I]` gate/up projection: `silu(gate) ⊙ up`, gate first.
pub fn swiglu(gate_up: &Tensor) -> Result<Tensor> {
    let i = gate_up.dim(D::Minus1)? / 2;
    let gate = gate_up.narrow(D::Minus1, 0, i)?;
    let up = gate_up.narrow(D::Minus1, i, i)?;
    gate.silu()?.mul(&up)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn rotary_rotates_pairs_half_apart_and_keeps_the_tail() {
        let dev = Device::Cpu;
        // one head, one position, D = 6, rd = 4: pairs (0,2), (1,3); dims 4,5 untouched
        let x = Tensor::new(&[[[[1f32, 2., 3., 4., 5., 6.]]]], &dev).unwrap();
        let angle = [0.3f32, 0.7];
        let cos = Tensor::new(
            &[[[
                angle[0].cos(),
                angle[1].cos(),
                angle[0].cos(),
                angle[1].cos(),
            ]]],
            &dev,
        )
        .unwrap();
        let sin = Tensor::new(
            &[[[
                angle[0].sin(),
                angle[1].sin(),
                angle[0].sin(),
                angle[1].sin(),
            ]]],
            &dev,
        )
        .unwrap();
        let y: Vec<f32> = rotary(&x, &cos, &sin)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let want = [
            1. * angle[0].cos() - 3. * angle[0].sin(),
            2. * angle[1].cos() - 4. * angle[1].sin(),
            3. * angle[0].cos() + 1. * angle[0].sin(),
            4. * angle[1].cos() + 2. * angle[1].sin(),
            5.,
            6.,
        ];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{y:?} vs {want:?}");
        }
    }

    #[test]
    fn rms_norm_matches_definition() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[3f32, 4.]], &dev).unwrap();
        let w = Tensor::new(&[2f32, 1.], &dev).unwrap();
        let y: Vec<f32> = rms_norm(&x, &w, 0.0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let rms = (12.5f32).sqrt();
        assert!((y[0] - 6. / rms).abs() < 1e-6 && (y[1] - 4. / rms).abs() < 1e-6);
    }
}
