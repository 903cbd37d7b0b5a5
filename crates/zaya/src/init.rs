//! Random models with the reference's init scheme (`_init_weights`): normal(0, σ) for linear,
//! conv, embedding and expert weights (embedding padding row zeroed), zeros for biases, ones
//! for norms and scales, `temp` = 0, EDA scales 1, balancing biases 0 with the skip class −1.
//!
//! [`write_random_checkpoint`] streams the same values tensor by tensor (in chunks) into
//! sharded safetensors, so an 8B model is created without ever being held in memory;
//! [`random_weights`] builds them in memory for small models. Both draw from one generator
//! in the same order, so they give identical weights for a seed.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rand::{rngs::StdRng, SeedableRng};
use rand_distr::{Distribution, Normal};

use crate::config::ZayaConfig;
use crate::error::{Result, ZayaError};
use crate::safetensors_io::{write_sharded, PlannedTensor};
use crate::weights::{native_specs, Init, TensorSpec};

/// Draws the values of the native tensors in [`native_specs`] order.
struct Sampler {
    rng: StdRng,
    normal: Normal<f32>,
    hidden: usize,
    pad: Option<usize>,
}

impl Sampler {
    fn new(cfg: &ZayaConfig, seed: u64) -> Result<Self> {
        Ok(Sampler {
            rng: StdRng::seed_from_u64(seed),
            normal: Normal::new(0f32, cfg.initializer_range as f32)
                .map_err(|e| ZayaError::config("initializer_range", e.to_string()))?,
            hidden: cfg.hidden_size,
            pad: cfg.pad_token_id.map(|p| p as usize),
        })
    }

    /// Fills `out` with elements `[start, start + out.len())` of `spec`; chunks of one tensor
    /// must be requested in order (the normal draws are sequential).
    fn fill(&mut self, spec: &TensorSpec, start: usize, out: &mut [f32]) {
        let n: usize = spec.shape.iter().product();
        match spec.init {
            Init::Normal | Init::Embedding => {
                out.iter_mut()
                    .for_each(|x| *x = self.normal.sample(&mut self.rng));
                if let (Init::Embedding, Some(pad)) = (spec.init, self.pad) {
                    let (lo, hi) = (pad * self.hidden, (pad + 1) * self.hidden);
                    for (i, x) in out.iter_mut().enumerate() {
                        if (lo..hi).contains(&(start + i)) {
                            *x = 0.0;
                        }
                    }
                }
            }
            Init::Zeros => out.fill(0.0),
            Init::Ones => out.fill(1.0),
            Init::BalancingBiases => {
                for (i, x) in out.iter_mut().enumerate() {
                    *x = if start + i == n - 1 { -1.0 } else { 0.0 };
                }
            }
        }
    }
}

/// Every native tensor of a freshly initialised model, in f32 (balancing biases f32 too).
pub fn random_weights(cfg: &ZayaConfig, seed: u64) -> Result<BTreeMap<String, Tensor>> {
    let mut sampler = Sampler::new(cfg, seed)?;
    let dev = Device::Cpu;
    let mut out = BTreeMap::new();
    for spec in native_specs(cfg) {
        let mut data = vec![0f32; spec.shape.iter().product()];
        sampler.fill(&spec, 0, &mut data);
        out.insert(
            spec.name.clone(),
            Tensor::from_vec(data, spec.shape.clone(), &dev)?,
        );
    }
    Ok(out)
}

/// The stored dtype of a native tensor when weights are stored in `dtype`: the balancing
/// biases stay f32 (the reference keeps them as f32 buffers).
pub fn stored_dtype(name: &str, dtype: DType) -> DType {
    if name.ends_with("balancing_biases") {
        DType::F32
    } else {
        dtype
    }
}

/// Casts every tensor except the f32 balancing-bias buffers to `dtype`.
pub fn cast_weights(
    tensors: &BTreeMap<String, Tensor>,
    dtype: DType,
) -> Result<BTreeMap<String, Tensor>> {
    tensors
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.to_dtype(stored_dtype(k, dtype))?)))
        .collect()
}

/// Writes a random model (the values of [`random_weights`] for `seed`, stored in `dtype`)
/// as a native checkpoint in `dir`: `config.json` and safetensors shards of at most
/// `max_shard_bytes`, generated and written a chunk at a time (memory stays at a few MB
/// whatever the model size). Returns the number of tensors written.
pub fn write_random_checkpoint(
    dir: &Path,
    cfg: &ZayaConfig,
    seed: u64,
    dtype: DType,
    max_shard_bytes: u64,
) -> Result<usize> {
    const CHUNK: usize = 1 << 20;
    std::fs::create_dir_all(dir).map_err(|e| ZayaError::io(dir, e))?;
    let text = serde_json::to_string_pretty(&cfg.to_json()).expect("config serialises");
    crate::weights::write_atomic(&dir.join("config.json"), text.as_bytes())?;
    let specs = native_specs(cfg);
    let planned: Vec<PlannedTensor> = specs
        .iter()
        .map(|s| PlannedTensor {
            name: s.name.clone(),
            dtype: stored_dtype(&s.name, dtype),
            shape: s.shape.clone(),
        })
        .collect();
    let mut sampler = Sampler::new(cfg, seed)?;
    let mut buf = vec![0f32; CHUNK];
    write_sharded(dir, &planned, max_shard_bytes, |i, p, sink| {
        let n: usize = p.shape.iter().product();
        let mut start = 0;
        while start < n {
            let len = CHUNK.min(n - start);
            sampler.fill(&specs[i], start, &mut buf[..len]);
            sink.write_f32_as(&buf[..len], p.dtype)?;
            start += len;
        }
        Ok(())
    })?;
    Ok(planned.len())
}
