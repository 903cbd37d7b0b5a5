//! Checkpoint loading: safetensors (single file or sharded index), memory-mapped, in either
//! checkpoint layout. The native HF layout (1283 tensors for ZAYA1-8B) is the model's own
//! naming; the legacy 80-layer fork layout (2483 tensors) is renamed and its per-expert
//! tensors stacked on the fly. Everything is validated up front against the tensor list the
//! config implies, so a bad file fails with the tensor name, shapes and file, never a panic.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;

use crate::config::{read_json, ZayaConfig};
use crate::error::{Result, ZayaError};

/// How a parameter is initialised by the reference (`_init_weights`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    Normal,
    Zeros,
    Ones,
    /// Embedding: normal, then the padding row set to zero.
    Embedding,
    /// Balancing biases: 0 for experts, -1 for the skip class.
    BalancingBiases,
}

/// One tensor of the native layout.
#[derive(Debug, Clone)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
    /// Whether the weight belongs to the experts (counted once per token when computing the
    /// active parameter count).
    pub expert: bool,
}

/// Every tensor of the native layout, in module order.
pub fn native_specs(cfg: &ZayaConfig) -> Vec<TensorSpec> {
    let h = cfg.hidden_size;
    let r = cfg.router_hidden_size;
    let e = cfg.num_experts;
    let c = cfg.conv_channels();
    let mut out = Vec::new();
    let mut push = |name: String, shape: Vec<usize>, init: Init| {
        let expert = name.contains(".mlp.experts.");
        out.push(TensorSpec {
            name,
            shape,
            init,
            expert,
        })
    };
    push(
        "model.embed_tokens.weight".into(),
        vec![cfg.vocab_size, h],
        Init::Embedding,
    );
    push(
        "model.input_hidden_states_scale".into(),
        vec![h],
        Init::Ones,
    );
    push(
        "model.input_hidden_states_bias".into(),
        vec![h],
        Init::Zeros,
    );
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}.");
        push(format!("{p}input_layernorm.weight"), vec![h], Init::Ones);
        let a = format!("{p}self_attn.qkv_proj.");
        let projections = [
            ("q_proj", cfg.q_dim()),
            ("k_proj", cfg.kv_dim()),
            ("v_proj_current", cfg.value_half_dim()),
            ("v_proj_delayed", cfg.value_half_dim()),
        ];
        for (name, out_dim) in projections {
            push(format!("{a}{name}.weight"), vec![out_dim, h], Init::Normal);
            if cfg.attention_bias {
                push(format!("{a}{name}.bias"), vec![out_dim], Init::Zeros);
            }
        }
        push(
            format!("{a}conv_qk_depthwise.weight"),
            vec![c, 1, cfg.cca_time0],
            Init::Normal,
        );
        push(format!("{a}conv_qk_depthwise.bias"), vec![c], Init::Zeros);
        push(
            format!("{a}conv_qk_grouped.weight"),
            vec![c, cfg.head_dim, cfg.cca_time1],
            Init::Normal,
        );
        push(format!("{a}conv_qk_grouped.bias"), vec![c], Init::Zeros);
        push(
            format!("{p}self_attn.qk_norm.temp"),
            vec![cfg.num_key_value_heads],
            Init::Zeros,
        );
        push(
            format!("{p}self_attn.o_proj.weight"),
            vec![h, cfg.q_dim()],
            Init::Normal,
        );
        if cfg.attention_bias {
            push(format!("{p}self_attn.o_proj.bias"), vec![h], Init::Zeros);
        }
        for scale in ["post_attention_residual_scale", "post_mlp_residual_scale"] {
            push(
                format!("{p}{scale}.hidden_states_scale"),
                vec![h],
                Init::Ones,
            );
            push(
                format!("{p}{scale}.hidden_states_bias"),
                vec![h],
                Init::Zeros,
            );
            push(format!("{p}{scale}.residual_scale"), vec![h], Init::Ones);
            push(format!("{p}{scale}.residual_bias"), vec![h], Init::Zeros);
        }
        push(
            format!("{p}post_attention_layernorm.weight"),
            vec![h],
            Init::Ones,
        );
        let g = format!("{p}mlp.gate.");
        push(format!("{g}down_proj.weight"), vec![r, h], Init::Normal);
        push(format!("{g}down_proj.bias"), vec![r], Init::Zeros);
        if i > 0 {
            push(format!("{g}router_states_scale"), vec![r], Init::Ones);
        }
        push(format!("{g}router_mlp.norm.weight"), vec![r], Init::Ones);
        push(
            format!("{g}router_mlp.fc1.weight"),
            vec![r, r],
            Init::Normal,
        );
        push(format!("{g}router_mlp.fc1.bias"), vec![r], Init::Zeros);
        push(
            format!("{g}router_mlp.fc2.weight"),
            vec![r, r],
            Init::Normal,
        );
        push(format!("{g}router_mlp.fc2.bias"), vec![r], Init::Zeros);
        push(
            format!("{g}router_mlp.out_proj.weight"),
            vec![e + 1, r],
            Init::Normal,
        );
        push(
            format!("{g}balancing_biases"),
            vec![e + 1],
            Init::BalancingBiases,
        );
        push(
            format!("{p}mlp.experts.gate_up_proj"),
            vec![e, 2 * cfg.moe_intermediate_size, h],
            Init::Normal,
        );
        push(
            format!("{p}mlp.experts.down_proj"),
            vec![e, h, cfg.moe_intermediate_size],
            Init::Normal,
        );
    }
    push("model.norm.weight".into(), vec![h], Init::Ones);
    if !cfg.tie_word_embeddings {
        push(
            "lm_head.weight".into(),
            vec![cfg.vocab_size, h],
            Init::Normal,
        );
    }
    if cfg.lm_head_bias {
        push("lm_head.bias".into(), vec![cfg.vocab_size], Init::Zeros);
    }
    out
}

/// Which naming scheme a checkpoint uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// transformers 5.23 names (current hub ZAYA1-8B).
    Native,
    /// Zyphra fork: 80 alternating attention / MoE layers, one tensor per expert.
    Legacy,
}

impl Layout {
    pub fn as_str(self) -> &'static str {
        match self {
            Layout::Native => "native",
            Layout::Legacy => "legacy",
        }
    }
}

/// Where the data of a native tensor lives in a legacy checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub enum LegacySource {
    One(String),
    /// Per-expert tensors stacked along a new leading axis.
    Stack(Vec<String>),
}

/// Maps a native tensor name to its legacy source (the inverse of the HF converter).
pub fn legacy_source(cfg: &ZayaConfig, native: &str) -> Option<LegacySource> {
    use LegacySource::One;
    let last = cfg.num_hidden_layers - 1;
    match native {
        "model.embed_tokens.weight" => return Some(One(native.into())),
        "model.norm.weight" => return Some(One("model.final_norm.weight".into())),
        "model.input_hidden_states_scale" => {
            return Some(One("model.layers.0.res_scale.hidden_states_scale".into()))
        }
        "model.input_hidden_states_bias" => {
            return Some(One("model.layers.0.res_scale.hidden_states_bias".into()))
        }
        "lm_head.weight" | "lm_head.bias" => return Some(One(native.into())),
        _ => {}
    }
    let rest = native.strip_prefix("model.layers.")?;
    let (idx, rest) = rest.split_once('.')?;
    let i: usize = idx.parse().ok()?;
    let att = 2 * i;
    let moe = 2 * i + 1;
    if let Some(field) = rest.strip_prefix("post_mlp_residual_scale.") {
        return Some(One(if i == last {
            format!("model.res_scale.{field}")
        } else {
            format!("model.layers.{}.res_scale.{field}", 2 * (i + 1))
        }));
    }
    if let Some(field) = rest.strip_prefix("post_attention_residual_scale.") {
        return Some(One(format!("model.layers.{moe}.res_scale.{field}")));
    }
    let mapped = match rest {
        "input_layernorm.weight" => format!("model.layers.{att}.input_norm.weight"),
        "post_attention_layernorm.weight" => format!("model.layers.{moe}.input_norm.weight"),
        "self_attn.qk_norm.temp" => format!("model.layers.{att}.self_attn.qkv.temp"),
        "self_attn.o_proj.weight" | "self_attn.o_proj.bias" => format!("model.layers.{att}.{rest}"),
        "mlp.experts.gate_up_proj" | "mlp.experts.down_proj" => {
            let which = if rest.ends_with("gate_up_proj") {
                "linear_fc1"
            } else {
                "linear_fc2"
            };
            return Some(LegacySource::Stack(
                (0..cfg.num_experts)
                    .map(|e| {
                        format!("model.layers.{moe}.zaya_block.experts.local_experts.{e}.{which}.weight")
                    })
                    .collect(),
            ));
        }
        _ => {
            if let Some(p) = rest.strip_prefix("self_attn.qkv_proj.") {
                let (module, param) = p.split_once('.')?;
                let legacy = match module {
                    "q_proj" => "linear_q",
                    "k_proj" => "linear_k",
                    "v_proj_current" => "val_proj1",
                    "v_proj_delayed" => "val_proj2",
                    "conv_qk_depthwise" => "conv_qk.0",
                    "conv_qk_grouped" => "conv_qk.1",
                    _ => return None,
                };
                format!("model.layers.{att}.self_attn.qkv.{legacy}.{param}")
            } else if let Some(p) = rest.strip_prefix("mlp.gate.") {
                let legacy = match p {
                    "router_mlp.norm.weight" => "rmsnorm_eda.weight".to_string(),
                    "router_mlp.fc1.weight" => "router_mlp.0.weight".into(),
                    "router_mlp.fc1.bias" => "router_mlp.0.bias".into(),
                    "router_mlp.fc2.weight" => "router_mlp.2.weight".into(),
                    "router_mlp.fc2.bias" => "router_mlp.2.bias".into(),
                    "router_mlp.out_proj.weight" => "router_mlp.4.weight".into(),
                    other => other.to_string(),
                };
                format!("model.layers.{moe}.zaya_block.router.{legacy}")
            } else {
                return None;
            }
        }
    };
    Some(One(mapped))
}

/// Alternative native names accepted for a tensor (one conversion-script revision wrote the
/// router norm as `router_mlp.rmsnorm_eda`).
fn native_aliases(name: &str) -> Vec<String> {
    match name.strip_suffix("mlp.gate.router_mlp.norm.weight") {
        Some(prefix) => vec![format!("{prefix}mlp.gate.router_mlp.rmsnorm_eda.weight")],
        None => vec![],
    }
}

#[derive(Debug, Clone)]
struct Entry {
    file: usize,
    shape: Vec<usize>,
    dtype: DType,
}

/// An opened, memory-mapped checkpoint directory.
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<PathBuf>,
    shards: Vec<MmapedSafetensors>,
    entries: BTreeMap<String, Entry>,
    layout: Layout,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .field("files", &self.files)
            .field("tensors", &self.entries.len())
            .field("layout", &self.layout)
            .finish()
    }
}

fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let v = read_json(&index)?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| ZayaError::BadWeightsFile {
                path: index.clone(),
                message: "no `weight_map` object".into(),
            })?;
        let mut files = BTreeSet::new();
        for (name, f) in map {
            let f = f.as_str().ok_or_else(|| ZayaError::BadWeightsFile {
                path: index.clone(),
                message: format!("weight_map entry `{name}` is not a file name"),
            })?;
            files.insert(dir.join(f));
        }
        return Ok(files.into_iter().collect());
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    Err(ZayaError::NoWeights {
        dir: dir.to_path_buf(),
    })
}

impl Checkpoint {
    /// Memory-maps the weight files of `dir` and detects the layout from the tensor names.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let files = weight_files(&dir)?;
        let mut shards = Vec::with_capacity(files.len());
        let mut entries = BTreeMap::new();
        for (fi, path) in files.iter().enumerate() {
            if !path.exists() {
                return Err(ZayaError::io(
                    path,
                    std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "shard listed in the index is missing",
                    ),
                ));
            }
            // SAFETY: the file is mapped read-only; modifying a checkpoint while it is loaded
            // is not supported (as with every mmap-based loader).
            let st =
                unsafe { MmapedSafetensors::new(path) }.map_err(|e| ZayaError::BadWeightsFile {
                    path: path.clone(),
                    message: e.to_string(),
                })?;
            for (name, view) in st.tensors() {
                let dtype = match view.dtype() {
                    safetensors::Dtype::F32 => DType::F32,
                    safetensors::Dtype::BF16 => DType::BF16,
                    safetensors::Dtype::F16 => DType::F16,
                    safetensors::Dtype::F64 => DType::F64,
                    other => {
                        return Err(ZayaError::UnsupportedDtype {
                            name,
                            dtype: format!("{other:?}"),
                            file: path.clone(),
                        })
                    }
                };
                entries.insert(
                    name,
                    Entry {
                        file: fi,
                        shape: view.shape().to_vec(),
                        dtype,
                    },
                );
            }
            shards.push(st);
        }
        let legacy = entries.keys().any(|k| {
            k.contains(".self_attn.qkv.")
                || k.contains(".zaya_block.")
                || k == "model.final_norm.weight"
        });
        Ok(Checkpoint {
            dir,
            files,
            shards,
            entries,
            layout: if legacy {
                Layout::Legacy
            } else {
                Layout::Native
            },
        })
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stored dtypes and how many tensors use each.
    pub fn dtypes(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for e in self.entries.values() {
            *out.entry(format!("{:?}", e.dtype).to_lowercase())
                .or_default() += 1;
        }
        out
    }

    pub fn num_tensors(&self) -> usize {
        self.entries.len()
    }

    /// Reads `config.json` in the schema of the detected layout.
    pub fn config(&self) -> Result<ZayaConfig> {
        let path = self.dir.join("config.json");
        let v = read_json(&path)?;
        let parsed = match self.layout {
            Layout::Native => ZayaConfig::from_json(&v),
            Layout::Legacy => ZayaConfig::from_legacy_json(&v),
        };
        parsed.map_err(|e| match e {
            ZayaError::Config { field, message } => ZayaError::Config {
                field: format!("{} ({field})", path.display()),
                message,
            },
            other => other,
        })
    }

    fn file_of(&self, name: &str) -> PathBuf {
        self.entries
            .get(name)
            .map_or_else(|| self.dir.clone(), |e| self.files[e.file].clone())
    }

    /// Stored names that hold the data of native tensor `spec` (after alias and layout mapping).
    fn sources(&self, cfg: &ZayaConfig, spec: &TensorSpec) -> Result<LegacySource> {
        match self.layout {
            Layout::Native => {
                if self.entries.contains_key(&spec.name) {
                    return Ok(LegacySource::One(spec.name.clone()));
                }
                for alias in native_aliases(&spec.name) {
                    if self.entries.contains_key(&alias) {
                        return Ok(LegacySource::One(alias));
                    }
                }
                Ok(LegacySource::One(spec.name.clone()))
            }
            Layout::Legacy => legacy_source(cfg, &spec.name).ok_or_else(|| {
                ZayaError::Input(format!("tensor `{}` has no legacy equivalent", spec.name))
            }),
        }
    }

    /// Checks that the files hold exactly the tensors `cfg` implies, with the right shapes.
    pub fn validate(&self, cfg: &ZayaConfig) -> Result<()> {
        let mut used = BTreeSet::new();
        for spec in native_specs(cfg) {
            match self.sources(cfg, &spec)? {
                LegacySource::One(name) => {
                    self.check(&name, &spec.shape)?;
                    used.insert(name);
                }
                LegacySource::Stack(names) => {
                    for name in names {
                        self.check(&name, &spec.shape[1..])?;
                        used.insert(name);
                    }
                }
            }
        }
        for (name, e) in &self.entries {
            if used.contains(name) {
                continue;
            }
            // A tied lm_head stored anyway is ignored, as the reference's tying does.
            if name == "lm_head.weight" && cfg.tie_word_embeddings {
                tracing::warn!("ignoring lm_head.weight: tie_word_embeddings is true");
                continue;
            }
            return Err(ZayaError::UnexpectedTensor {
                name: name.clone(),
                shape: e.shape.clone(),
                file: self.files[e.file].clone(),
            });
        }
        Ok(())
    }

    fn check(&self, name: &str, expected: &[usize]) -> Result<()> {
        match self.entries.get(name) {
            None => Err(ZayaError::MissingTensor {
                name: name.to_string(),
                expected: expected.to_vec(),
                location: self.dir.clone(),
            }),
            Some(e) if e.shape != expected => Err(ZayaError::ShapeMismatch {
                name: name.to_string(),
                expected: expected.to_vec(),
                found: e.shape.clone(),
                file: self.files[e.file].clone(),
            }),
            Some(_) => Ok(()),
        }
    }

    fn load_stored(&self, name: &str, dev: &Device) -> Result<Tensor> {
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| ZayaError::MissingTensor {
                name: name.to_string(),
                expected: vec![],
                location: self.dir.clone(),
            })?;
        self.shards[e.file]
            .load(name, dev)
            .map_err(|err| ZayaError::BadWeightsFile {
                path: self.file_of(name),
                message: format!("tensor `{name}`: {err}"),
            })
    }

    /// Loads native tensor `name` (any layout) in `dtype`.
    pub fn load(&self, cfg: &ZayaConfig, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        let spec = TensorSpec {
            name: name.to_string(),
            shape: vec![],
            init: Init::Zeros,
            expert: false,
        };
        let t = match self.sources(cfg, &spec)? {
            LegacySource::One(src) => self.load_stored(&src, dev)?,
            LegacySource::Stack(srcs) => {
                let parts = srcs
                    .iter()
                    .map(|s| self.load_stored(s, dev))
                    .collect::<Result<Vec<_>>>()?;
                Tensor::stack(&parts, 0)?
            }
        };
        Ok(t.to_dtype(dtype)?)
    }

    /// A `VarBuilder` over this checkpoint in native names. Call [`Checkpoint::validate`] first.
    pub fn var_builder(
        self: &Arc<Self>,
        cfg: &ZayaConfig,
        dtype: DType,
        dev: &Device,
    ) -> VarBuilder<'static> {
        let backend: Box<dyn candle_nn::var_builder::SimpleBackend> = Box::new(CheckpointBackend {
            ckpt: Arc::clone(self),
            cfg: cfg.clone(),
        });
        VarBuilder::from_backend(backend, dtype, dev.clone())
    }
}

struct CheckpointBackend {
    ckpt: Arc<Checkpoint>,
    cfg: ZayaConfig,
}

impl candle_nn::var_builder::SimpleBackend for CheckpointBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        if t.dims() != s.dims() {
            candle_core::bail!(
                "tensor `{name}` has shape {:?}, expected {:?}",
                t.dims(),
                s.dims()
            );
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.ckpt
            .load(&self.cfg, name, dtype, dev)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))
    }

    fn contains_tensor(&self, name: &str) -> bool {
        let spec = TensorSpec {
            name: name.to_string(),
            shape: vec![],
            init: Init::Zeros,
            expert: false,
        };
        match self.ckpt.sources(&self.cfg, &spec) {
            Ok(LegacySource::One(n)) => self.ckpt.entries.contains_key(&n),
            Ok(LegacySource::Stack(ns)) => ns.iter().all(|n| self.ckpt.entries.contains_key(n)),
            Err(_) => false,
        }
    }
}

/// Writes `tensors` (native names) as a checkpoint directory in `layout`, with its config.
pub fn save_checkpoint(
    dir: &Path,
    cfg: &ZayaConfig,
    tensors: &BTreeMap<String, Tensor>,
    layout: Layout,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| ZayaError::io(dir, e))?;
    let mut out: BTreeMap<String, Tensor> = BTreeMap::new();
    match layout {
        Layout::Native => out.extend(tensors.iter().map(|(k, v)| (k.clone(), v.clone()))),
        Layout::Legacy => {
            for (name, t) in tensors {
                match legacy_source(cfg, name) {
                    Some(LegacySource::One(n)) => {
                        out.insert(n, t.clone());
                    }
                    Some(LegacySource::Stack(ns)) => {
                        for (e, n) in ns.into_iter().enumerate() {
                            out.insert(n, t.get(e)?.contiguous()?);
                        }
                    }
                    None => {
                        return Err(ZayaError::Input(format!(
                            "tensor `{name}` has no legacy equivalent"
                        )))
                    }
                }
            }
        }
    }
    let config = match layout {
        Layout::Native => cfg.to_json(),
        Layout::Legacy => cfg.to_legacy_json(),
    };
    let config_path = dir.join("config.json");
    let text = serde_json::to_string_pretty(&config).expect("config serialises");
    write_atomic(&config_path, text.as_bytes())?;
    let weights_path = dir.join("model.safetensors");
    let tmp = dir.join(".model.safetensors.tmp");
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    safetensors::serialize_to_file(
        out.iter().map(|(k, v)| (k.as_str(), v)).collect::<Vec<_>>(),
        Some(meta),
        &tmp,
    )
    .map_err(|e| ZayaError::BadWeightsFile {
        path: tmp.clone(),
        message: e.to_string(),
    })?;
    crate::durable::rename_synced(&tmp, &weights_path)
}

/// Writes a file so that a crash or power loss leaves either the old or the new content.
pub use crate::durable::write_atomic;

/// Loads every native tensor of a checkpoint (for conversion and export).
pub fn load_all(
    ckpt: &Checkpoint,
    cfg: &ZayaConfig,
    dev: &Device,
) -> Result<BTreeMap<String, Tensor>> {
    let mut out = BTreeMap::new();
    for spec in native_specs(cfg) {
        let stored = match ckpt.sources(cfg, &spec)? {
            LegacySource::One(n) => ckpt.entries[&n].dtype,
            LegacySource::Stack(ns) => ckpt.entries[&ns[0]].dtype,
        };
        let t = ckpt.load(cfg, &spec.name, stored, dev)?;
        out.insert(spec.name, t);
    }
    Ok(out)
}

/// Converts a checkpoint directory into `layout` (either direction), optionally storing the
/// weights in `dtype` (the balancing-bias buffers stay f32).
pub fn convert(src: &Path, dst: &Path, layout: Layout) -> Result<()> {
    convert_with_dtype(src, dst, layout, None)
}

/// [`convert`] with a storage dtype.
pub fn convert_with_dtype(
    src: &Path,
    dst: &Path,
    layout: Layout,
    dtype: Option<DType>,
) -> Result<()> {
    let ckpt = Checkpoint::open(src)?;
    let cfg = ckpt.config()?;
    ckpt.validate(&cfg)?;
    let mut tensors = load_all(&ckpt, &cfg, &Device::Cpu)?;
    if let Some(dtype) = dtype {
        tensors = crate::init::cast_weights(&tensors, dtype)?;
    }
    save_checkpoint(dst, &cfg, &tensors, layout)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ZayaConfig {
        ZayaConfig::from_json(&serde_json::json!({
            "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 40,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
            "moe_intermediate_size": 16, "num_experts": 16, "router_hidden_size": 8
        }))
        .unwrap()
    }

    #[test]
    fn native_and_legacy_counts_match_the_8b_checkpoints() {
        let cfg = cfg();
        let specs = native_specs(&cfg);
        assert_eq!(specs.len(), 1283);
        let mut legacy = BTreeSet::new();
        for s in &specs {
            match legacy_source(&cfg, &s.name).unwrap() {
                LegacySource::One(n) => assert!(legacy.insert(n)),
                LegacySource::Stack(ns) => ns.into_iter().for_each(|n| assert!(legacy.insert(n))),
            }
        }
        assert_eq!(legacy.len(), 2483);
        assert!(legacy.contains("model.res_scale.residual_bias"));
        assert!(legacy.contains("model.layers.2.res_scale.residual_scale"));
        assert!(!legacy.contains("model.layers.0.res_scale.residual_scale"));
        assert!(!legacy.contains("model.layers.1.zaya_block.router.router_states_scale"));
    }
}
