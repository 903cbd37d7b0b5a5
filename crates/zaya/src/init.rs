//! Random models with the reference's init scheme (`_init_weights`): normal(0, σ) for linear,
//! conv, embedding and expert weights (embedding padding row zeroed), zeros for biases, ones
//! for norms and scales, `temp` = 0, EDA scales 1, balancing biases 0 with the skip class −1.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use rand::{rngs::StdRng, SeedableRng};
use rand_distr::{Distribution, Normal};

use crate::config::ZayaConfig;
use crate::error::Result;
use crate::weights::{native_specs, Init};

/// Every native tensor of a freshly initialised model, in f32 (balancing biases f32 too).
pub fn random_weights(cfg: &ZayaConfig, seed: u64) -> Result<BTreeMap<String, Tensor>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let std = cfg.initializer_range as f32;
    let normal = Normal::new(0f32, std)
        .map_err(|e| crate::ZayaError::config("initializer_range", e.to_string()))?;
    let dev = Device::Cpu;
    let mut out = BTreeMap::new();
    for spec in native_specs(cfg) {
        let n: usize = spec.shape.iter().product();
        let data: Vec<f32> = match spec.init {
            Init::Normal => (0..n).map(|_| normal.sample(&mut rng)).collect(),
            Init::Embedding => {
                let mut d: Vec<f32> = (0..n).map(|_| normal.sample(&mut rng)).collect();
                if let Some(pad) = cfg.pad_token_id {
                    let h = cfg.hidden_size;
                    let row = pad as usize;
                    d[row * h..(row + 1) * h].iter_mut().for_each(|x| *x = 0.0);
                }
                d
            }
            Init::Zeros => vec![0.0; n],
            Init::Ones => vec![1.0; n],
            Init::BalancingBiases => {
                let mut d = vec![0.0; n];
                d[n - 1] = -1.0;
                d
            }
        };
        out.insert(
            spec.name.clone(),
            Tensor::from_vec(data, spec.shape.clone(), &dev)?,
        );
    }
    Ok(out)
}

/// Casts every tensor except the f32 balancing-bias buffers to `dtype`.
pub fn cast_weights(
    tensors: &BTreeMap<String, Tensor>,
    dtype: DType,
) -> Result<BTreeMap<String, Tensor>> {
    tensors
        .iter()
        .map(|(k, v)| {
            let t = if k.ends_with("balancing_biases") {
                v.clone()
            } else {
                v.to_dtype(dtype)?
            };
            Ok((k.clone(), t))
        })
        .collect()
}
