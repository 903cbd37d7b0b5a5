//! Adapter weights by PEFT key, in PEFT's directory format: `adapter_config.json` +
//! `adapter_model.safetensors` (keys `base_model.model.<module>.lora_A.weight`, as
//! `get_peft_model_state_dict` writes them). Load one trained anywhere, attach it to a model
//! for inference (no merge), merge it into a checkpoint, save one.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::{attach, plan, LoraConfig, Site, SiteWeights, Target};
use crate::config::ZayaConfig;
use crate::error::{Result, ZayaError};
use crate::model::ZayaModel;

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// A LoRA adapter: its configuration, the sites it adapts in a model of a given config, and
/// the factors of each site (f32).
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    pub config: LoraConfig,
    pub sites: Vec<Site>,
    /// `weights[i]` belongs to `sites[i]`.
    pub weights: Vec<SiteWeights>,
}

fn adapter_err(location: &Path, message: impl Into<String>) -> ZayaError {
    ZayaError::Adapter {
        location: location.to_path_buf(),
        message: message.into(),
    }
}

impl LoraAdapter {
    /// Builds an adapter from PEFT-keyed tensors (any float dtype; kept as f32), checking
    /// that every key of the plan is present with its shape and nothing else is.
    pub fn from_tensors(
        model_cfg: &ZayaConfig,
        config: LoraConfig,
        mut tensors: BTreeMap<String, Tensor>,
        location: &Path,
    ) -> Result<Self> {
        let sites = plan(model_cfg, &config)?;
        let mut weights = Vec::with_capacity(sites.len());
        for s in &sites {
            let mut take = |key: &str, shape: [usize; 2]| -> Result<Tensor> {
                let t = tensors
                    .remove(key)
                    .ok_or_else(|| ZayaError::MissingTensor {
                        name: key.to_string(),
                        expected: shape.to_vec(),
                        location: location.to_path_buf(),
                    })?;
                if t.dims() != shape {
                    return Err(ZayaError::ShapeMismatch {
                        name: key.to_string(),
                        expected: shape.to_vec(),
                        found: t.dims().to_vec(),
                        file: location.to_path_buf(),
                    });
                }
                Ok(t.to_dtype(DType::F32)?)
            };
            let a = take(&s.key_a, s.shape_a)?;
            let b = take(&s.key_b, s.shape_b)?;
            weights.push(SiteWeights { a, b });
        }
        if let Some((name, t)) = tensors.into_iter().next() {
            return Err(ZayaError::UnexpectedTensor {
                name,
                shape: t.dims().to_vec(),
                file: location.to_path_buf(),
            });
        }
        Ok(LoraAdapter {
            config,
            sites,
            weights,
        })
    }

    /// Reads a PEFT adapter directory for a model of config `model_cfg`.
    pub fn load(dir: impl AsRef<Path>, model_cfg: &ZayaConfig) -> Result<Self> {
        let dir = dir.as_ref();
        let cfg_path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| ZayaError::io(&cfg_path, e))?;
        let config = LoraConfig::from_peft_json(&text, &cfg_path.display().to_string())?;
        let wpath = dir.join(WEIGHTS_FILE);
        if !wpath.is_file() {
            if dir.join("adapter_model.bin").is_file() {
                return Err(adapter_err(
                    dir,
                    "has adapter_model.bin (pickle); zaya reads adapter_model.safetensors only (save with safe_serialization=True)",
                ));
            }
            return Err(adapter_err(dir, format!("no {WEIGHTS_FILE}")));
        }
        let tensors = read_safetensors(&wpath)?;
        Self::from_tensors(model_cfg, config, tensors, &wpath)
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` (f32) into `dir`, each
    /// atomically.
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| ZayaError::io(dir, e))?;
        let tensors = self.named_tensors()?;
        let tmp = dir.join(format!(".{WEIGHTS_FILE}.tmp"));
        let mut meta = std::collections::HashMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        safetensors::serialize_to_file(
            tensors
                .iter()
                .map(|(k, v)| (k.as_str(), v))
                .collect::<Vec<_>>(),
            Some(meta),
            &tmp,
        )
        .map_err(|e| ZayaError::BadWeightsFile {
            path: tmp.clone(),
            message: e.to_string(),
        })?;
        crate::durable::rename_synced(&tmp, &dir.join(WEIGHTS_FILE))?;
        let text = serde_json::to_string_pretty(&self.config.to_peft_json())
            .expect("adapter config serialises");
        crate::durable::write_atomic(&dir.join(CONFIG_FILE), text.as_bytes())
    }

    /// Every factor by PEFT key (contiguous f32 copies).
    pub fn named_tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        for (s, w) in self.sites.iter().zip(&self.weights) {
            out.insert(
                s.key_a.clone(),
                w.a.detach().to_dtype(DType::F32)?.contiguous()?,
            );
            out.insert(
                s.key_b.clone(),
                w.b.detach().to_dtype(DType::F32)?.contiguous()?,
            );
        }
        Ok(out)
    }

    /// Number of adapter weights.
    pub fn num_parameters(&self) -> usize {
        self.sites
            .iter()
            .map(|s| s.shape_a[0] * s.shape_a[1] + s.shape_b[0] * s.shape_b[1])
            .sum()
    }

    /// `base` with this adapter attached (base tensors shared, not copied; nothing merged).
    pub fn apply(&self, base: &ZayaModel) -> Result<ZayaModel> {
        if base.config().num_hidden_layers <= self.sites.iter().map(|s| s.layer).max().unwrap_or(0)
        {
            return Err(ZayaError::Input(
                "the adapter has more layers than the model".into(),
            ));
        }
        let weights = self
            .weights
            .iter()
            .map(|w| -> Result<SiteWeights> {
                Ok(SiteWeights {
                    a: w.a.to_device(base.device())?,
                    b: w.b.to_device(base.device())?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        attach(base, &self.config, &self.sites, &weights, None)
    }

    /// The native tensor each site changes and the delta `scale · B A` it adds (`[out, in]`,
    /// or `[E, out, in]` for an expert stack), f32.
    pub fn deltas(&self) -> Result<Vec<(String, Tensor)>> {
        let scale = self.config.scaling();
        self.sites
            .iter()
            .zip(&self.weights)
            .map(|(s, w)| {
                let name = match s.target.parameter() {
                    Some(p) => format!("model.layers.{}.{}.{p}", s.layer, s.target.module_path()),
                    None => format!("model.layers.{}.{}.weight", s.layer, s.target.module_path()),
                };
                let delta = if s.target.is_expert() {
                    crate::model::moe::ExpertLowRank {
                        a: w.a.clone(),
                        b: w.b.clone(),
                        scale,
                    }
                    .delta_weight(s.experts)?
                } else {
                    (w.b.matmul(&w.a)? * scale)?
                };
                Ok((name, delta))
            })
            .collect()
    }

    /// Adds every delta to the matching tensor of `tensors` (native names), in f32, and
    /// rounds the sum back to the tensor's dtype (PEFT's merge into the parameter).
    pub fn merge_into(&self, tensors: &mut BTreeMap<String, Tensor>) -> Result<()> {
        for (name, delta) in self.deltas()? {
            let w = tensors.get_mut(&name).ok_or_else(|| {
                ZayaError::Input(format!("merge: the model has no tensor `{name}`"))
            })?;
            if w.dims() != delta.dims() {
                return Err(ZayaError::ShapeMismatch {
                    name,
                    expected: w.dims().to_vec(),
                    found: delta.dims().to_vec(),
                    file: PathBuf::from("<adapter>"),
                });
            }
            let dtype = w.dtype();
            *w = (w.to_dtype(DType::F32)? + delta)?.to_dtype(dtype)?;
        }
        Ok(())
    }

    /// The sites of one target kind (tests and reports).
    pub fn sites_of(&self, target: Target) -> impl Iterator<Item = &Site> {
        self.sites.iter().filter(move |s| s.target == target)
    }
}

/// Every tensor of a safetensors file, read through the checked header parser (a
/// truncated or malformed file is an error naming the file, never a panic).
pub fn read_safetensors(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let header = crate::safetensors_io::read_header(path)?;
    let file = File::open(path).map_err(|e| ZayaError::io(path, e))?;
    let mut out = BTreeMap::new();
    for st in header {
        let t = crate::safetensors_io::tensor_from_bytes(st.dtype, &st.shape, |buf| {
            crate::safetensors_io::read_exact_at(&file, path, st.offset, buf)
        })?;
        out.insert(st.name, t.to_device(&Device::Cpu)?);
    }
    Ok(out)
}
