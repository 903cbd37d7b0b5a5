use candle_core::{DType, Device, Result, Tensor};

use crate::config::{RopeParameters, RopeScaling};

/// Partial RoPE tables of one layer type, computed in f32 exactly as the reference:
/// `inv_freq_i = 1 / θ^(2i/rd)` and angle `= f32(p) · inv_freq_i` (an f64 angle would not
/// reproduce the reference at long contexts).
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    inv_freq: Vec<f32>,
    rotary_dim: usize,
}

impl RotaryEmbedding {
    pub fn new(params: &RopeParameters, head_dim: usize) -> Self {
        let rotary_dim = (head_dim as f64 * params.partial_rotary_factor).floor() as usize;
        let base = params.rope_theta as f32;
        let factor = match params.scaling {
            RopeScaling::Default => 1.0,
            RopeScaling::Linear { factor } => factor,
        };
        let inv_freq = (0..rotary_dim / 2)
            .map(|i| {
                let exponent = (2 * i) as f32 / rotary_dim as f32;
                (1.0f32 / base.powf(exponent)) / factor
            })
            .collect();
        RotaryEmbedding {
            inv_freq,
            rotary_dim,
        }
    }

    pub fn rotary_dim(&self) -> usize {
        self.rotary_dim
    }

    /// `cos`, `sin` of shape `[rows, T, rd]` for `positions` (one row per batch row, or a
    /// single shared row), cast to `dtype`.
    pub fn cos_sin(
        &self,
        positions: &[Vec<i64>],
        dtype: DType,
        dev: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let rows = positions.len();
        let t = positions.first().map_or(0, |p| p.len());
        let rd = self.rotary_dim;
        let mut cos = Vec::with_capacity(rows * t * rd);
        let mut sin = Vec::with_capacity(rows * t * rd);
        for row in positions {
            for &p in row {
                let p = p as f32;
                let angles: Vec<f32> = self.inv_freq.iter().map(|f| p * f).collect();
                for _ in 0..2 {
                    cos.extend(angles.iter().map(|a| a.cos()));
                    sin.extend(angles.iter().map(|a| a.sin()));
                }
            }
        }
        let cos = Tensor::from_vec(cos, (rows, t, rd), dev)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (rows, t, rd), dev)?.to_dtype(dtype)?;
        Ok((cos, sin))
    }
}
