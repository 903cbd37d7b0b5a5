//! Checkpoint loading: safetensors (single file or sharded index), in either checkpoint
//! layout. Only the headers are read when a checkpoint is opened; each tensor is then read
//! once, straight into the buffer of its candle tensor (see [`crate::safetensors_io`]), so a
//! loaded model occupies its weight bytes and nothing more, and no memory map outlives the
//! load. The native HF layout (1283 tensors for ZAYA1-8B) is the model's own
//! naming; the legacy 80-layer fork layout (2483 tensors) is renamed and its per-expert
//! tensors stacked on the fly. Everything is validated up front against the tensor list the
//! config implies, so a bad file fails with the tensor name, shapes and file, never a panic.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use std::fs::File;

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
    /// Absolute byte offset of the data in its file.
    offset: u64,
}

/// An opened checkpoint directory: the tensor directory of every shard, and the open files.
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<PathBuf>,
    shards: Vec<File>,
    entries: BTreeMap<String, Entry>,
    layout: Layout,
    /// Tensor bytes read from the files so far (headers not counted): what a rank of a
    /// parallel run reads is its share, not the whole model.
    bytes_read: std::sync::atomic::AtomicU64,
    /// Whether reads drop what they read from the page cache: twice the files' bytes (the
    /// cached file and the loaded copy) are more than the memory available when opened
    /// ([`crate::safetensors_io::release_cached`]). Smaller models stay cached for the
    /// next load.
    release_cache: bool,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .field("files", &self.files)
            .field("tensors", &self.entries.len())
            .field("layout", &self.layout)
            .field("bytes_read", &self.bytes_read())
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
        Self::open_files(dir, files, None)
    }

    /// One safetensors file of tensors under native names, such as a training checkpoint's
    /// `optimizer.safetensors` (`exp_avg.<name>`, ...): read by name or by selection like
    /// the weights, never whole unless asked.
    pub fn open_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let dir = path
            .parent()
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        Self::open_files(dir, vec![path], Some(Layout::Native))
    }

    fn open_files(dir: PathBuf, files: Vec<PathBuf>, layout: Option<Layout>) -> Result<Self> {
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
            for t in crate::safetensors_io::read_header(path)? {
                // weights are floats; integer tensors are state files' (step counts)
                if layout.is_none() && t.dtype == DType::I64 {
                    return Err(ZayaError::UnsupportedDtype {
                        name: t.name,
                        dtype: "I64".into(),
                        file: path.clone(),
                    });
                }
                entries.insert(
                    t.name,
                    Entry {
                        file: fi,
                        shape: t.shape,
                        dtype: t.dtype,
                        offset: t.offset,
                    },
                );
            }
            shards.push(File::open(path).map_err(|e| ZayaError::io(path, e))?);
        }
        let file_bytes = shards
            .iter()
            .map(|f| f.metadata().map_or(0, |m| m.len()))
            .sum::<u64>();
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
            layout: layout.unwrap_or(if legacy {
                Layout::Legacy
            } else {
                Layout::Native
            }),
            bytes_read: std::sync::atomic::AtomicU64::new(0),
            release_cache: releases_cache(file_bytes, available_memory_bytes()),
        })
    }

    /// Tensor bytes read from the files since this checkpoint was opened.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The stored shape of the tensor stored under `name`.
    pub fn stored_shape(&self, name: &str) -> Option<&[usize]> {
        self.entries.get(name).map(|e| e.shape.as_slice())
    }

    fn count_read(&self, bytes: usize) {
        self.bytes_read
            .fetch_add(bytes as u64, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The safetensors files read.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
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

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.entries
            .get(name)
            .ok_or_else(|| ZayaError::MissingTensor {
                name: name.to_string(),
                expected: vec![],
                location: self.dir.clone(),
            })
    }

    /// Reads the stored tensors `names` (same dtype and shape) back to back into one new
    /// buffer: one tensor as it is stored, or several stacked along a new leading axis
    /// (legacy per-expert tensors), each byte read once into its final place.
    fn read_stored(&self, names: &[String], stack: bool) -> Result<Tensor> {
        let first = self.entry(&names[0])?;
        let mut shape = first.shape.clone();
        if stack {
            shape.insert(0, names.len());
        }
        let part = first.shape.iter().product::<usize>() * first.dtype.size_in_bytes();
        let parts = names
            .iter()
            .map(|n| {
                let e = self.entry(n)?;
                if e.dtype != first.dtype || e.shape != first.shape {
                    return Err(ZayaError::BadWeightsFile {
                        path: self.file_of(n),
                        message: format!(
                            "tensor `{n}` is {:?} {:?}, but `{}` stacked with it is {:?} {:?}",
                            e.dtype, e.shape, names[0], first.dtype, first.shape
                        ),
                    });
                }
                Ok(e)
            })
            .collect::<Result<Vec<_>>>()?;
        crate::safetensors_io::tensor_from_bytes(first.dtype, &shape, |bytes| {
            for (k, e) in parts.iter().enumerate() {
                let path = &self.files[e.file];
                crate::safetensors_io::read_exact_at_parallel(
                    &self.shards[e.file],
                    path,
                    e.offset,
                    &mut bytes[k * part..(k + 1) * part],
                    self.release_cache,
                )
                .map_err(|err| ZayaError::BadWeightsFile {
                    path: path.clone(),
                    message: format!("tensor `{}`: {err}", names[k]),
                })?;
                self.count_read(part);
            }
            Ok(())
        })
    }

    /// The stored dtype of native tensor `name` (any layout).
    pub fn stored_dtype(&self, cfg: &ZayaConfig, name: &str) -> Result<DType> {
        let first = match self.sources(cfg, &Self::spec_named(name))? {
            LegacySource::One(n) => n,
            LegacySource::Stack(ns) => ns[0].clone(),
        };
        Ok(self.entry(&first)?.dtype)
    }

    fn spec_named(name: &str) -> TensorSpec {
        TensorSpec {
            name: name.to_string(),
            shape: vec![],
            init: Init::Zeros,
            expert: false,
        }
    }

    /// Loads native tensor `name` (any layout) in `dtype` (no conversion, hence no second
    /// buffer, when it is stored in `dtype`).
    pub fn load(&self, cfg: &ZayaConfig, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        let t = match self.sources(cfg, &Self::spec_named(name))? {
            LegacySource::One(src) => self.read_stored(&[src], false)?,
            LegacySource::Stack(srcs) => self.read_stored(&srcs, true)?,
        };
        let t = t.to_dtype(dtype)?;
        Ok(if dev.is_cpu() { t } else { t.to_device(dev)? })
    }

    /// Loads part of native tensor `name`: per axis, the index ranges to take (concatenated
    /// in order; `ranges[a]` covers axis `a`). A rank of a parallel run reads its slice this
    /// way: in the native layout only the selected bytes are read, one positioned read per
    /// contiguous run; legacy checkpoints are read whole and then sliced.
    pub fn load_selection(
        &self,
        cfg: &ZayaConfig,
        name: &str,
        ranges: &[Vec<std::ops::Range<usize>>],
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        let src = match self.sources(cfg, &Self::spec_named(name))? {
            LegacySource::One(src) => src,
            LegacySource::Stack(_) => {
                let whole = self.load(cfg, name, dtype, dev)?;
                return Ok(select_ranges(&whole, ranges)?);
            }
        };
        let e = self.entry(&src)?;
        let bad = |message: String| ZayaError::BadWeightsFile {
            path: self.files[e.file].clone(),
            message: format!("tensor `{src}` {:?}: {message}", e.shape),
        };
        if ranges.len() != e.shape.len() {
            return Err(bad(format!("a selection over {} axes", ranges.len())));
        }
        for (a, rs) in ranges.iter().enumerate() {
            if let Some(r) = rs.iter().find(|r| r.start > r.end || r.end > e.shape[a]) {
                return Err(bad(format!("range {r:?} outside axis {a}")));
            }
        }
        let out_shape: Vec<usize> = ranges
            .iter()
            .map(|rs| rs.iter().map(|r| r.len()).sum())
            .collect();
        // Contiguous runs in element units: (source offset, length), in output order.
        let mut strides = vec![1usize; e.shape.len()];
        for a in (0..e.shape.len().saturating_sub(1)).rev() {
            strides[a] = strides[a + 1] * e.shape[a + 1];
        }
        let mut runs: Vec<(usize, usize)> = Vec::new();
        fn walk(
            a: usize,
            base: usize,
            ranges: &[Vec<std::ops::Range<usize>>],
            strides: &[usize],
            runs: &mut Vec<(usize, usize)>,
        ) {
            if a + 1 == ranges.len() {
                for r in &ranges[a] {
                    let (off, len) = (base + r.start, r.len());
                    match runs.last_mut() {
                        Some(last) if last.0 + last.1 == off => last.1 += len,
                        _ => runs.push((off, len)),
                    }
                }
                return;
            }
            for r in &ranges[a] {
                for i in r.clone() {
                    walk(a + 1, base + i * strides[a], ranges, strides, runs);
                }
            }
        }
        if !e.shape.is_empty() {
            walk(0, 0, ranges, &strides, &mut runs);
        }
        let elem = e.dtype.size_in_bytes();
        let path = &self.files[e.file];
        let t = crate::safetensors_io::tensor_from_bytes(e.dtype, &out_shape, |bytes| {
            let mut at = 0usize;
            for (off, len) in &runs {
                let n = len * elem;
                crate::safetensors_io::read_exact_at(
                    &self.shards[e.file],
                    path,
                    e.offset + (off * elem) as u64,
                    &mut bytes[at..at + n],
                )
                .map_err(|err| ZayaError::BadWeightsFile {
                    path: path.clone(),
                    message: format!("tensor `{src}`: {err}"),
                })?;
                self.count_read(n);
                at += n;
            }
            Ok(())
        })?;
        let t = t.to_dtype(dtype)?;
        Ok(if dev.is_cpu() { t } else { t.to_device(dev)? })
    }

    /// Bytes the weights of `cfg` take once loaded with `dtype` (the balancing biases stay
    /// f32), from the tensor list alone.
    pub fn required_bytes(cfg: &ZayaConfig, dtype: DType) -> u64 {
        native_specs(cfg)
            .iter()
            .map(|s| dense_bytes(&s.name, &s.shape, dtype))
            .sum()
    }

    /// Fails with [`ZayaError::InsufficientMemory`] when the weights of `cfg` in `dtype` —
    /// quantized while loading where `plan` says so ([`QuantPlan::loading_bytes`]) — need
    /// more than the memory available now (`MemAvailable` of /proc/meminfo); passes where
    /// that figure cannot be read.
    ///
    /// [`QuantPlan::loading_bytes`]: crate::quant::QuantPlan::loading_bytes
    pub fn check_fits(
        &self,
        cfg: &ZayaConfig,
        dtype: DType,
        plan: Option<&crate::quant::QuantPlan>,
    ) -> Result<()> {
        let needed = match plan {
            Some(plan) => {
                // the widest stored dtype stands for the tensor being rounded
                let mut stored = 0;
                for spec in native_specs(cfg) {
                    stored = stored.max(self.stored_dtype(cfg, &spec.name)?.size_in_bytes());
                }
                plan.loading_bytes(cfg, dtype, stored)
            }
            None => Self::required_bytes(cfg, dtype),
        };
        match available_memory_bytes() {
            Some(available) => check_fits_in(&self.dir, dtype, needed, available),
            None => Ok(()),
        }
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
        match self.ckpt.sources(&self.cfg, &Checkpoint::spec_named(name)) {
            Ok(LegacySource::One(n)) => self.ckpt.entries.contains_key(&n),
            Ok(LegacySource::Stack(ns)) => ns.iter().all(|n| self.ckpt.entries.contains_key(n)),
            Err(_) => false,
        }
    }
}

/// `t` restricted to `ranges` (per axis, ranges concatenated in order).
pub fn select_ranges(
    t: &Tensor,
    ranges: &[Vec<std::ops::Range<usize>>],
) -> candle_core::Result<Tensor> {
    let mut out = t.clone();
    for (a, rs) in ranges.iter().enumerate() {
        if rs.len() == 1 && rs[0].start == 0 && rs[0].end == out.dim(a)? {
            continue;
        }
        let parts = rs
            .iter()
            .map(|r| out.narrow(a, r.start, r.len()))
            .collect::<candle_core::Result<Vec<_>>>()?;
        out = Tensor::cat(&parts, a)?;
    }
    out.contiguous()
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

/// [`save_checkpoint`] in the native layout without the tensors in memory: the same
/// `config.json` and `model.safetensors` (byte for byte), the tensors' data streamed by
/// `fill(tensor, sink)` in the file's order ([`crate::safetensors_io::file_order`]).
/// A sharded trainer's rank 0 writes the weights it receives a piece at a time with it.
pub fn save_checkpoint_streamed(
    dir: &Path,
    cfg: &ZayaConfig,
    tensors: &[crate::safetensors_io::PlannedTensor],
    fill: impl FnMut(
        &crate::safetensors_io::PlannedTensor,
        &mut crate::safetensors_io::TensorSink,
    ) -> Result<()>,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| ZayaError::io(dir, e))?;
    let text = serde_json::to_string_pretty(&cfg.to_json()).expect("config serialises");
    write_atomic(&dir.join("config.json"), text.as_bytes())?;
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    crate::safetensors_io::write_file_streamed(
        &dir.join("model.safetensors"),
        &dir.join(".model.safetensors.tmp"),
        tensors,
        Some(meta),
        fill,
    )
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
        let stored = ckpt.stored_dtype(cfg, &spec.name)?;
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

/// [`convert`] with a storage dtype. Streams: one native tensor at a time is read, cast and
/// written, into shards of [`crate::safetensors_io::DEFAULT_SHARD_BYTES`] (with the index
/// json), so an 8B checkpoint converts in a few hundred MB of memory.
pub fn convert_with_dtype(
    src: &Path,
    dst: &Path,
    layout: Layout,
    dtype: Option<DType>,
) -> Result<()> {
    convert_sharded(
        src,
        dst,
        layout,
        dtype,
        crate::safetensors_io::DEFAULT_SHARD_BYTES,
    )
}

/// [`convert_with_dtype`] with a shard size.
pub fn convert_sharded(
    src: &Path,
    dst: &Path,
    layout: Layout,
    dtype: Option<DType>,
    max_shard_bytes: u64,
) -> Result<()> {
    use crate::safetensors_io::{tensor_bytes, write_sharded, PlannedTensor};
    let ckpt = Checkpoint::open(src)?;
    let cfg = ckpt.config()?;
    ckpt.validate(&cfg)?;
    // Each output tensor: its name, the native tensor it comes from, and which expert of a
    // stacked native tensor it is (legacy output).
    let mut planned = vec![];
    let mut origin: Vec<(String, Option<usize>)> = vec![];
    for spec in native_specs(&cfg) {
        let stored = ckpt.stored_dtype(&cfg, &spec.name)?;
        let out_dtype = match dtype {
            Some(d) => crate::init::stored_dtype(&spec.name, d),
            None => stored,
        };
        let one = match layout {
            Layout::Native => Some(LegacySource::One(spec.name.clone())),
            Layout::Legacy => legacy_source(&cfg, &spec.name),
        };
        match one {
            Some(LegacySource::One(n)) => {
                planned.push(PlannedTensor {
                    name: n,
                    dtype: out_dtype,
                    shape: spec.shape.clone(),
                });
                origin.push((spec.name.clone(), None));
            }
            Some(LegacySource::Stack(ns)) => {
                for (e, n) in ns.into_iter().enumerate() {
                    planned.push(PlannedTensor {
                        name: n,
                        dtype: out_dtype,
                        shape: spec.shape[1..].to_vec(),
                    });
                    origin.push((spec.name.clone(), Some(e)));
                }
            }
            None => {
                return Err(ZayaError::Input(format!(
                    "tensor `{}` has no legacy equivalent",
                    spec.name
                )))
            }
        }
    }
    std::fs::create_dir_all(dst).map_err(|e| ZayaError::io(dst, e))?;
    let config = match layout {
        Layout::Native => cfg.to_json(),
        Layout::Legacy => cfg.to_legacy_json(),
    };
    let text = serde_json::to_string_pretty(&config).expect("config serialises");
    write_atomic(&dst.join("config.json"), text.as_bytes())?;
    // The native tensor last read: the experts of one stacked tensor are written one after
    // another, so it is read once.
    let mut current: Option<(String, Tensor)> = None;
    write_sharded(dst, &planned, max_shard_bytes, |i, p, sink| {
        let (native, expert) = &origin[i];
        if current.as_ref().is_none_or(|(n, _)| n != native) {
            current = None; // free the previous tensor before reading the next
            let t = ckpt.load(&cfg, native, p.dtype, &Device::Cpu)?;
            current = Some((native.clone(), t));
        }
        let t = &current.as_ref().expect("just loaded").1;
        let t = match expert {
            Some(e) => t.get(*e)?,
            None => t.clone(),
        };
        sink.write_bytes(&tensor_bytes(&t)?)
    })?;
    Ok(())
}

/// Bytes native tensor `name` of `shape` takes loaded dense in `dtype` (the balancing
/// biases stay f32).
pub(crate) fn dense_bytes(name: &str, shape: &[usize], dtype: DType) -> u64 {
    let d = if name.ends_with("balancing_biases") {
        DType::F32
    } else {
        dtype
    };
    shape.iter().product::<usize>() as u64 * d.size_in_bytes() as u64
}

/// Whether a checkpoint of `file_bytes` drops its reads from the page cache: when the
/// cached files and their loaded copy would not both fit in `available` bytes (unknown
/// memory: keep the cache).
fn releases_cache(file_bytes: u64, available: Option<u64>) -> bool {
    available.is_some_and(|a| file_bytes.saturating_mul(2) > a)
}

/// `MemAvailable` of /proc/meminfo in bytes (None where there is no such file).
pub fn available_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The fit check of [`Checkpoint::check_fits`] on given numbers.
pub fn check_fits_in(dir: &Path, dtype: DType, needed: u64, available: u64) -> Result<()> {
    if needed <= available {
        return Ok(());
    }
    const GIB: f64 = (1u64 << 30) as f64;
    Err(ZayaError::InsufficientMemory {
        dir: dir.to_path_buf(),
        dtype: format!("{dtype:?}").to_lowercase(),
        needed,
        available,
        needed_gib: needed as f64 / GIB,
        available_gib: available as f64 / GIB,
    })
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
    fn only_files_that_cannot_stay_cached_beside_their_copy_release_the_cache() {
        const GB: u64 = 1_000_000_000;
        // the 8B in bf16 on a 24 GB machine: released; the medium model in f32: kept
        assert!(releases_cache(17_700_000_000, Some(23 * GB)));
        assert!(!releases_cache(3_400_000_000, Some(23 * GB)));
        // exactly half the available memory still fits twice
        assert!(!releases_cache(5 * GB, Some(10 * GB)));
        assert!(releases_cache(5 * GB + 1, Some(10 * GB)));
        // unknown memory: the cache is kept
        assert!(!releases_cache(u64::MAX, None));
    }

    #[test]
    fn the_fit_check_names_needed_and_available_memory() {
        let dir = Path::new("/models/x");
        assert!(check_fits_in(dir, DType::BF16, 10, 10).is_ok());
        let err = check_fits_in(dir, DType::BF16, 17_700_000_000, 6 << 30)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/models/x")
                && err.contains("16.48 GiB loaded with dtype bf16")
                && err.contains("6.00 GiB")
                && err.contains("MemAvailable"),
            "{err}"
        );
        let cfg: ZayaConfig = ZayaConfig::from_file(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../bench/configs/zaya1-8b.json"
        ))
        .unwrap();
        let bytes = Checkpoint::required_bytes(&cfg, DType::BF16);
        // 8.84 B parameters of 2 bytes (the 17.7 GB)
        assert!((17.5e9..17.9e9).contains(&(bytes as f64)), "{bytes}");
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
