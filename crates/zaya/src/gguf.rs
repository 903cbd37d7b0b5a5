//! GGUF: a ZAYA model (config, tokenizer files, chat template and every tensor, some of
//! them block-quantized) in one file, the format users of quantized CPU inference already
//! have.
//!
//! Writing ([`quantize_to_gguf`]) streams tensor by tensor: the header (metadata and the
//! tensor table, whose sizes follow from shapes and formats) goes first, then each tensor
//! is read from the checkpoint, converted, written and dropped, so an 8B model is written
//! without ever being held in memory. (candle's `gguf_file::write` takes every tensor at
//! once, which is why the writer is ours; the reader is candle's.)
//!
//! Metadata: `general.architecture = "zaya"` and the usual `zaya.*` hyper-parameter keys
//! for tools that list them; `zaya.config` holds the full `config.json` (native schema),
//! which is what zaya reads back; `tokenizer.huggingface.json` and
//! `tokenizer.chat_template` as llama.cpp names them; `zaya.file.<name>` the other files
//! `zaya::text` reads from a model directory (tokenizer_config.json,
//! special_tokens_map.json, generation_config.json, chat_template.jinja). Tensor names are
//! the native (transformers) names.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QStorage, QTensor, QuantizedType};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;

use crate::config::ZayaConfig;
use crate::error::{Result, ZayaError};
use crate::model::QuantizedSource;
use crate::quant::{self, ggml_name, QuantPlan, WeightFormat};
use crate::weights::{native_specs, Checkpoint};

/// Alignment of tensor data (the GGUF default; we write it explicitly too).
const ALIGNMENT: u64 = 32;

/// Tokenizer-side files carried as `zaya.file.<name>`.
pub const TEXT_FILES: &[&str] = &[
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
];

/// What can be wrong with a GGUF file; every variant names the file and the key or tensor.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: not a readable GGUF file: {message}")]
    Header { path: PathBuf, message: String },

    #[error("{path}: metadata key `{key}`: {message}")]
    Metadata {
        path: PathBuf,
        key: String,
        message: String,
    },

    #[error("{path}: missing tensor `{name}` (expected shape {expected:?})")]
    MissingTensor {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
    },

    #[error("{path}: unexpected tensor `{name}` with shape {shape:?}")]
    UnexpectedTensor {
        path: PathBuf,
        name: String,
        shape: Vec<usize>,
    },

    #[error("{path}: tensor `{name}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    #[error(
        "{path}: tensor `{name}` needs bytes {start}..{end}, the file has {file_len} (truncated?)"
    )]
    Truncated {
        path: PathBuf,
        name: String,
        start: u64,
        end: u64,
        file_len: u64,
    },

    #[error(
        "{path}: tensor `{name}` is stored as {format}, which zaya cannot use here: {message}"
    )]
    BadFormat {
        path: PathBuf,
        name: String,
        format: String,
        message: String,
    },

    #[error("quantizing tensor `{name}` to {format}{}: {message}", if *.weighted { " with its importance weights" } else { "" })]
    Quantize {
        name: String,
        format: String,
        weighted: bool,
        message: String,
    },
}

fn header_err(path: &Path, e: impl ToString) -> ZayaError {
    GgufError::Header {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
    .into()
}

fn meta_err(path: &Path, key: &str, message: impl Into<String>) -> ZayaError {
    GgufError::Metadata {
        path: path.to_path_buf(),
        key: key.to_string(),
        message: message.into(),
    }
    .into()
}

/// Whether `path` is a GGUF file (by its magic, so any file name works).
pub fn is_gguf(path: &Path) -> bool {
    if !path.is_file() {
        return false;
    }
    let mut magic = [0u8; 4];
    match File::open(path).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic)) {
        Ok(()) => &magic == b"GGUF",
        Err(_) => false,
    }
}

// ---------------------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------------------

/// An opened GGUF model: parsed header, memory-mapped data.
pub struct GgufCheckpoint {
    path: PathBuf,
    map: memmap2::Mmap,
    content: Content,
    config: ZayaConfig,
}

impl std::fmt::Debug for GgufCheckpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufCheckpoint")
            .field("path", &self.path)
            .field("tensors", &self.content.tensor_infos.len())
            .finish()
    }
}

impl GgufCheckpoint {
    /// Parses the header and the ZAYA config; see [`GgufCheckpoint::validate`] for the tensors.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let mut file = File::open(&path).map_err(|e| ZayaError::io(&path, e))?;
        // candle's reader panics on some malformed headers (a zero `general.alignment`
        // divides by zero): such a file is a header error like any other.
        let content =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Content::read(&mut file)))
                .map_err(|panic| {
                    let why = crate::error::panic_message(panic.as_ref());
                    header_err(&path, format!("candle's GGUF reader failed on it: {why}"))
                })?
                .map_err(|e| header_err(&path, e))?;
        // SAFETY: mapped read-only; changing a model file while it is loaded is unsupported.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ZayaError::io(&path, e))?;
        let arch = content
            .metadata
            .get("general.architecture")
            .ok_or_else(|| meta_err(&path, "general.architecture", "missing"))?;
        match arch.to_string() {
            Ok(a) if a == "zaya" => {}
            Ok(a) => {
                return Err(meta_err(
                    &path,
                    "general.architecture",
                    format!("`{a}` is not a ZAYA model (expected `zaya`)"),
                ))
            }
            Err(_) => return Err(meta_err(&path, "general.architecture", "not a string")),
        }
        let text = meta_string(&content, &path, "zaya.config")?
            .ok_or_else(|| meta_err(&path, "zaya.config", "missing (the config.json text)"))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| meta_err(&path, "zaya.config", format!("invalid JSON: {e}")))?;
        let config = ZayaConfig::from_json(&json).map_err(|e| match e {
            ZayaError::Config { field, message } => {
                meta_err(&path, "zaya.config", format!("{field}: {message}"))
            }
            other => other,
        })?;
        Ok(GgufCheckpoint {
            path,
            map,
            content,
            config,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn config(&self) -> &ZayaConfig {
        &self.config
    }

    /// The stored format of every tensor.
    pub fn formats(&self) -> BTreeMap<String, GgmlDType> {
        self.content
            .tensor_infos
            .iter()
            .map(|(n, i)| (n.clone(), i.ggml_dtype))
            .collect()
    }

    /// A string metadata value.
    pub fn metadata_string(&self, key: &str) -> Result<Option<String>> {
        meta_string(&self.content, &self.path, key)
    }

    /// The tokenizer-side files (`tokenizer.json` and [`TEXT_FILES`]) the file carries.
    pub fn text_files(&self) -> Result<BTreeMap<String, String>> {
        let mut out = BTreeMap::new();
        if let Some(t) = self.metadata_string("tokenizer.huggingface.json")? {
            out.insert("tokenizer.json".to_string(), t);
        }
        for name in TEXT_FILES {
            if let Some(t) = self.metadata_string(&format!("zaya.file.{name}"))? {
                out.insert(name.to_string(), t);
            }
        }
        Ok(out)
    }

    /// Checks that the file holds exactly the tensors the config implies, with their
    /// shapes, formats that fit their rows, and data inside the file.
    pub fn validate(&self) -> Result<()> {
        let specs = native_specs(&self.config);
        let file_len = self.map.len() as u64;
        // GGUF requires tensor data offsets aligned to `general.alignment` (a multiple of 8);
        // candle reads blocks in place and needs at least the block type's alignment.
        let alignment = match self.content.metadata.get("general.alignment") {
            None => 32,
            Some(v) => v.to_u32().map(u64::from).unwrap_or(0),
        };
        if alignment == 0 || alignment % 8 != 0 {
            return Err(GgufError::Metadata {
                path: self.path.clone(),
                key: "general.alignment".into(),
                message: format!("must be a positive multiple of 8, found {alignment}"),
            }
            .into());
        }
        for spec in &specs {
            let Some(info) = self.content.tensor_infos.get(&spec.name) else {
                return Err(GgufError::MissingTensor {
                    path: self.path.clone(),
                    name: spec.name.clone(),
                    expected: spec.shape.clone(),
                }
                .into());
            };
            if info.shape.dims() != spec.shape.as_slice() {
                return Err(GgufError::ShapeMismatch {
                    path: self.path.clone(),
                    name: spec.name.clone(),
                    expected: spec.shape.clone(),
                    found: info.shape.dims().to_vec(),
                }
                .into());
            }
            let d = info.ggml_dtype;
            let row = spec.shape.last().copied().unwrap_or(1);
            if row % d.block_size() != 0 {
                return Err(GgufError::BadFormat {
                    path: self.path.clone(),
                    name: spec.name.clone(),
                    format: ggml_name(d).to_string(),
                    message: format!(
                        "rows of {row} are not a multiple of its block size {}",
                        d.block_size()
                    ),
                }
                .into());
            }
            let is_float = matches!(d, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
            if !is_float && quant::TensorClass::of(&spec.name) == quant::TensorClass::Fixed {
                return Err(GgufError::BadFormat {
                    path: self.path.clone(),
                    name: spec.name.clone(),
                    format: ggml_name(d).to_string(),
                    message:
                        "norms, scales, biases, convolutions and the router state stay f32/f16/bf16"
                            .into(),
                }
                .into());
            }
            if info.offset % alignment != 0 {
                return Err(GgufError::BadFormat {
                    path: self.path.clone(),
                    name: spec.name.clone(),
                    format: ggml_name(d).to_string(),
                    message: format!(
                        "data offset {} is not a multiple of the file's alignment {alignment}",
                        info.offset
                    ),
                }
                .into());
            }
            let start = self.content.tensor_data_offset.saturating_add(info.offset);
            let end =
                start.saturating_add(quant::storage_bytes(d, spec.shape.iter().product()) as u64);
            if end > file_len {
                return Err(GgufError::Truncated {
                    path: self.path.clone(),
                    name: spec.name.clone(),
                    start,
                    end,
                    file_len,
                }
                .into());
            }
        }
        let known: std::collections::BTreeSet<&str> =
            specs.iter().map(|s| s.name.as_str()).collect();
        let mut names: Vec<&String> = self.content.tensor_infos.keys().collect();
        names.sort();
        for name in names {
            if !known.contains(name.as_str()) {
                return Err(GgufError::UnexpectedTensor {
                    path: self.path.clone(),
                    name: name.clone(),
                    shape: self.content.tensor_infos[name].shape.dims().to_vec(),
                }
                .into());
            }
        }
        Ok(())
    }

    /// The raw bytes and format of tensor `name` (call [`GgufCheckpoint::validate`] first).
    fn raw(&self, name: &str) -> candle_core::Result<(&[u8], GgmlDType, Shape)> {
        let info = self.content.tensor_infos.get(name).ok_or_else(|| {
            candle_core::Error::Msg(format!("{}: no tensor `{name}`", self.path.display()))
        })?;
        let start = (self.content.tensor_data_offset + info.offset) as usize;
        let len = quant::storage_bytes(info.ggml_dtype, info.shape.elem_count());
        let bytes = self
            .map
            .get(start..start.saturating_add(len))
            .ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "{}: tensor `{name}` runs past the end of the file",
                    self.path.display()
                ))
            })?;
        Ok((bytes, info.ggml_dtype, info.shape.clone()))
    }

    /// Tensor `name` as a dense tensor in `dtype` (float formats exactly, quantized ones
    /// dequantized).
    pub fn dense(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let (bytes, d, shape) = self.raw(name)?;
        let t = match float_dtype(d) {
            Some(stored) => {
                let t = crate::safetensors_io::tensor_from_bytes(stored, shape.dims(), |b| {
                    crate::safetensors_io::copy_parallel(bytes, b)
                })
                .map_err(|e| candle_core::Error::Msg(format!("tensor `{name}`: {e}")))?;
                t.to_device(dev)?
            }
            None => self.qtensor(name)?.dequantize(dev)?,
        };
        self.release(bytes);
        t.to_dtype(dtype)
    }

    fn qtensor(&self, name: &str) -> candle_core::Result<QTensor> {
        let (bytes, d, shape) = self.raw(name)?;
        // Copied once out of the map into the block storage the matmul reads.
        let storage = QStorage::Cpu(blocks_copied(bytes, d)?);
        self.release(bytes);
        QTensor::new(storage, shape)
    }

    /// Drops the mapped pages of `bytes` (a range of the map, already copied) from this
    /// process's resident memory, so that loading holds each tensor once, not the file's
    /// pages beside the copies (peak RSS of an 8B q4_k load: weights + 4.9 GB before). The
    /// pages stay in the page cache; a later read of the range faults them back in.
    fn release(&self, bytes: &[u8]) {
        #[cfg(unix)]
        {
            let offset = bytes.as_ptr() as usize - self.map.as_ptr() as usize;
            // SAFETY: the map is a read-only file mapping: MADV_DONTNEED only unmaps our
            // copies of its pages, and any later read of the range sees the same file
            // contents again. `bytes` lies within the map (it came from `raw`).
            let dropped = unsafe {
                self.map.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    offset,
                    bytes.len(),
                )
            };
            // only a hint: a failure costs memory, not correctness
            if let Err(e) = dropped {
                tracing::debug!("{}: madvise(DONTNEED): {e}", self.path.display());
            }
        }
    }

    /// Bytes the model in this file holds once loaded in `dtype`, with the dense tensors
    /// that `plan` selects quantized while loading: block-quantized tensors as stored,
    /// dense ones in `dtype` (the balancing biases in f32; an upper bound where a table is
    /// kept in its stored bf16), a tied head the plan stores apart counted too.
    pub fn loaded_bytes(&self, dtype: DType, plan: Option<&QuantPlan>) -> u64 {
        self.sizes(dtype, plan).0
    }

    /// [`GgufCheckpoint::loaded_bytes`] and the largest tensor quantized while loading
    /// (read whole in f32 first), against the memory available now: a clear error instead
    /// of an OOM kill; passes where `MemAvailable` cannot be read.
    pub fn check_fits(&self, dtype: DType, plan: Option<&QuantPlan>) -> Result<()> {
        let (held, rounding) = self.sizes(dtype, plan);
        match crate::weights::available_memory_bytes() {
            Some(available) => {
                crate::weights::check_fits_in(&self.path, dtype, held + rounding, available)
            }
            None => Ok(()),
        }
    }

    /// (bytes held once loaded, the largest f32 read of a tensor quantized while loading).
    fn sizes(&self, dtype: DType, plan: Option<&QuantPlan>) -> (u64, u64) {
        let plan = plan.map(|p| p.for_model(&self.config));
        let cfg = plan
            .as_ref()
            .map_or_else(|| self.config.clone(), |p| p.stored_config(&self.config));
        let (mut held, mut rounding) = (0u64, 0u64);
        let format = |name: &str| self.content.tensor_infos.get(name).map(|i| i.ggml_dtype);
        for s in native_specs(&cfg) {
            let elems = s.shape.iter().product::<usize>();
            let at_load = plan.as_ref().map(|p| p.format_for(&s.name, &s.shape));
            // a tensor the file holds quantized is taken as it is; any other is read from
            // its source (a split head: the tied embedding), dequantized if need be
            held += match (format(&s.name), at_load) {
                (Some(d), _) if float_dtype(d).is_none() => quant::held_bytes(d, elems),
                (_, Some(WeightFormat::Quant(d))) => {
                    let source = plan
                        .as_ref()
                        .map_or(s.name.as_str(), |p| p.source_of(&self.config, &s.name));
                    let stored = format(source)
                        .and_then(float_dtype)
                        .map_or(4, |t| t.size_in_bytes());
                    rounding = rounding.max(quant::rounding_transient_bytes(d, elems, stored));
                    quant::held_bytes(d, elems)
                }
                _ => crate::weights::dense_bytes(&s.name, &s.shape, dtype),
            };
        }
        (held, rounding)
    }

    /// A `VarBuilder` over the file's tensors in native names (dense forms).
    pub fn var_builder(self: &Arc<Self>, dtype: DType, dev: &Device) -> VarBuilder<'static> {
        let backend: Box<dyn candle_nn::var_builder::SimpleBackend> =
            Box::new(GgufBackend(Arc::clone(self)));
        VarBuilder::from_backend(backend, dtype, dev.clone())
    }
}

impl QuantizedSource for GgufCheckpoint {
    fn quantized(&self, name: &str) -> candle_core::Result<Option<Arc<QTensor>>> {
        match self.content.tensor_infos.get(name).map(|i| i.ggml_dtype) {
            Some(d) if float_dtype(d).is_none() => Ok(Some(Arc::new(self.qtensor(name)?))),
            _ => Ok(None),
        }
    }

    fn stored_dtype(&self, name: &str) -> Option<DType> {
        float_dtype(self.content.tensor_infos.get(name)?.ggml_dtype)
    }
}

/// The candle dtype of a dense GGML format (`None` for the block-quantized ones).
fn float_dtype(d: GgmlDType) -> Option<DType> {
    match d {
        GgmlDType::F32 => Some(DType::F32),
        GgmlDType::F16 => Some(DType::F16),
        GgmlDType::BF16 => Some(DType::BF16),
        _ => None,
    }
}

struct GgufBackend(Arc<GgufCheckpoint>);

impl candle_nn::var_builder::SimpleBackend for GgufBackend {
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
                "{}: tensor `{name}` has shape {:?}, expected {:?}",
                self.0.path.display(),
                t.dims(),
                s.dims()
            );
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0.dense(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.content.tensor_infos.contains_key(name)
    }
}

fn meta_string(content: &Content, path: &Path, key: &str) -> Result<Option<String>> {
    match content.metadata.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(meta_err(
            path,
            key,
            format!("expected a string, found {:?}", other.value_type()),
        )),
    }
}

/// Writes the tokenizer-side files of a GGUF into a directory of the system temp dir named
/// by their content (written once, atomically) and returns it, so that everything that
/// reads a model directory's text files reads them unchanged.
pub fn unpack_text_files(path: &Path) -> Result<PathBuf> {
    let g = GgufCheckpoint::open(path)?;
    let files = g.text_files()?;
    let mut h: u64 = 0xcbf29ce484222325;
    for (name, text) in &files {
        for b in name.bytes().chain([0u8]).chain(text.bytes()) {
            h ^= b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
    }
    let dir = std::env::temp_dir().join(format!("zaya-gguf-text-{h:016x}"));
    if dir.is_dir() {
        return Ok(dir);
    }
    let tmp = std::env::temp_dir().join(format!("zaya-gguf-text-{h:016x}.{}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(|e| ZayaError::io(&tmp, e))?;
    for (name, text) in &files {
        let p = tmp.join(name);
        std::fs::write(&p, text).map_err(|e| ZayaError::io(&p, e))?;
    }
    if std::fs::rename(&tmp, &dir).is_err() {
        // Another process won the race: its copy has the same content.
        let _ = std::fs::remove_dir_all(&tmp);
    }
    Ok(dir)
}

// ---------------------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------------------

/// How a GGUF was written: per tensor, the format it got.
#[derive(Debug, Clone, Default)]
pub struct QuantizeReport {
    /// (native name, shape, requested format, stored format)
    pub tensors: Vec<(String, Vec<usize>, WeightFormat, GgmlDType)>,
    pub bytes: u64,
    /// Tensors GPTQ had input moments for, with how many of their matrices it rounded (0:
    /// none had enough calibration rows).
    pub gptq: Vec<(String, usize)>,
}

impl QuantizeReport {
    /// Stored format → (tensor count, bytes).
    pub fn summary(&self) -> BTreeMap<String, (usize, u64)> {
        let mut out: BTreeMap<String, (usize, u64)> = BTreeMap::new();
        for (_, shape, _, d) in &self.tensors {
            let e = out.entry(ggml_name(*d).to_string()).or_default();
            e.0 += 1;
            e.1 += quant::storage_bytes(*d, shape.iter().product()) as u64;
        }
        out
    }

    /// Tensors stored in another format than requested (rows that do not fit a block).
    pub fn fallbacks(&self) -> Vec<(String, WeightFormat, GgmlDType)> {
        self.tensors
            .iter()
            .filter(|(_, _, req, got)| matches!(req, WeightFormat::Quant(d) | WeightFormat::Float(d) if d != got))
            .map(|(n, _, r, g)| (n.clone(), *r, *g))
            .collect()
    }
}

pub use crate::imatrix::ImportanceMatrix;

/// The requested and the stored format of native tensor `name`, stored in `source` (its
/// dtype in the checkpoint being quantized).
fn stored_format(
    plan: &QuantPlan,
    name: &str,
    shape: &[usize],
    source: DType,
) -> (WeightFormat, GgmlDType) {
    let requested = plan.requested(name);
    let d = match plan.format_for(name, shape) {
        WeightFormat::Quant(d) | WeightFormat::Float(d) => d,
        // Kept tensors stay in their source dtype (exact, and a bf16 router or CCA
        // weight then reads half the bytes per token); other dtypes go to f32.
        WeightFormat::Keep => match source {
            DType::BF16 => GgmlDType::BF16,
            DType::F16 => GgmlDType::F16,
            _ => GgmlDType::F32,
        },
    };
    (requested, d)
}

/// Quantizes a checkpoint directory (either layout) into one GGUF file at `out`, tensor
/// by tensor. `imatrix` (optional) weights the quantization error of each input feature;
/// with `moments` (optional: GPTQ's input moments from a calibration text) GPTQ then
/// re-chooses the levels of every tensor it has moments for, in the formats it handles, on
/// the grid the plain quantizer chose ([`crate::gptq`]), and without `imatrix` the
/// moments' diagonals weigh the block scales.
pub fn quantize_to_gguf(
    src: &Path,
    out: &Path,
    plan: &QuantPlan,
    imatrix: Option<&ImportanceMatrix>,
    mut moments: Option<&mut crate::gptq::Moments>,
) -> Result<QuantizeReport> {
    let ckpt = Checkpoint::open(src)?;
    let cfg = ckpt.config()?;
    ckpt.validate(&cfg)?;
    let plan = &plan.for_model(&cfg);
    if let Some(m) = imatrix {
        crate::imatrix::check(m, &native_specs(&cfg))?;
    }
    // A tied embedding whose lookup and head formats differ is stored twice, as an untied
    // model's two tensors (`QuantPlan::splits_tied_head`).
    let stored_cfg = plan.stored_config(&cfg);
    let specs = native_specs(&stored_cfg);

    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String("zaya".into())),
        (
            "general.name".into(),
            Value::String(
                src.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "zaya".into()),
            ),
        ),
        ("general.alignment".into(), Value::U32(ALIGNMENT as u32)),
        ("general.quantization_version".into(), Value::U32(2)),
        (
            "zaya.config".into(),
            Value::String(serde_json::to_string(&stored_cfg.to_json()).expect("config serialises")),
        ),
        (
            "zaya.context_length".into(),
            Value::U64(cfg.max_position_embeddings as u64),
        ),
        (
            "zaya.embedding_length".into(),
            Value::U64(cfg.hidden_size as u64),
        ),
        (
            "zaya.block_count".into(),
            Value::U64(cfg.num_hidden_layers as u64),
        ),
        (
            "zaya.expert_feed_forward_length".into(),
            Value::U64(cfg.moe_intermediate_size as u64),
        ),
        (
            "zaya.attention.head_count".into(),
            Value::U64(cfg.num_attention_heads as u64),
        ),
        (
            "zaya.attention.head_count_kv".into(),
            Value::U64(cfg.num_key_value_heads as u64),
        ),
        (
            "zaya.attention.key_length".into(),
            Value::U64(cfg.head_dim as u64),
        ),
        (
            "zaya.attention.layer_norm_rms_epsilon".into(),
            Value::F32(cfg.rms_norm_eps as f32),
        ),
        (
            "zaya.expert_count".into(),
            Value::U64(cfg.num_experts as u64),
        ),
        ("zaya.expert_used_count".into(), Value::U64(1)),
        ("zaya.vocab_size".into(), Value::U64(cfg.vocab_size as u64)),
    ];
    if stored_cfg.tie_word_embeddings != cfg.tie_word_embeddings {
        // for readers of the file: its config is untied, the checkpoint's was not
        meta.push(("zaya.split_tied_embedding".into(), Value::Bool(true)));
    }
    let read = |name: &str| -> Result<Option<String>> {
        let p = src.join(name);
        match std::fs::read_to_string(&p) {
            Ok(t) => Ok(Some(t)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ZayaError::io(&p, e)),
        }
    };
    if let Some(t) = read("tokenizer.json")? {
        meta.push(("tokenizer.huggingface.json".into(), Value::String(t)));
    }
    let mut template = read("chat_template.jinja")?;
    for name in TEXT_FILES {
        if let Some(t) = read(name)? {
            if *name == "tokenizer_config.json" && template.is_none() {
                template = serde_json::from_str::<serde_json::Value>(&t)
                    .ok()
                    .and_then(|v| v.get("chat_template")?.as_str().map(String::from));
            }
            meta.push((format!("zaya.file.{name}"), Value::String(t)));
        }
    }
    if let Some(t) = template {
        meta.push(("tokenizer.chat_template".into(), Value::String(t)));
    }
    for (key, id) in [
        ("tokenizer.ggml.bos_token_id", cfg.bos_token_id),
        ("tokenizer.ggml.padding_token_id", cfg.pad_token_id),
        (
            "tokenizer.ggml.eos_token_id",
            cfg.eos_token_id.first().copied(),
        ),
    ] {
        if let Some(id) = id {
            meta.push((key.into(), Value::U32(id)));
        }
    }

    // The tensor table: offsets follow from the stored sizes.
    let mut report = QuantizeReport::default();
    let mut table = Vec::with_capacity(specs.len());
    let mut offset = 0u64;
    for spec in &specs {
        let source = ckpt.stored_dtype(&cfg, plan.source_of(&cfg, &spec.name))?;
        let (requested, d) = stored_format(plan, &spec.name, &spec.shape, source);
        let size = quant::storage_bytes(d, spec.shape.iter().product()) as u64;
        table.push((spec.name.clone(), spec.shape.clone(), d, offset));
        report
            .tensors
            .push((spec.name.clone(), spec.shape.clone(), requested, d));
        offset += size.div_ceil(ALIGNMENT) * ALIGNMENT;
    }

    let tmp = out.with_extension("gguf.partial");
    let file = File::create(&tmp).map_err(|e| ZayaError::io(&tmp, e))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let io = |e: std::io::Error| ZayaError::io(&tmp, e);
    w.write_all(b"GGUF").map_err(io)?;
    w.write_all(&3u32.to_le_bytes()).map_err(io)?;
    w.write_all(&(table.len() as u64).to_le_bytes())
        .map_err(io)?;
    w.write_all(&(meta.len() as u64).to_le_bytes())
        .map_err(io)?;
    for (k, v) in &meta {
        write_str(&mut w, k).map_err(io)?;
        write_value(&mut w, v).map_err(io)?;
    }
    for (name, shape, d, off) in &table {
        write_str(&mut w, name).map_err(io)?;
        w.write_all(&(shape.len() as u32).to_le_bytes())
            .map_err(io)?;
        // GGUF lists dimensions innermost first.
        for &dim in shape.iter().rev() {
            w.write_all(&(dim as u64).to_le_bytes()).map_err(io)?;
        }
        w.write_all(&ggml_type_id(*d).to_le_bytes()).map_err(io)?;
        w.write_all(&off.to_le_bytes()).map_err(io)?;
    }
    pad(&mut w, ALIGNMENT).map_err(io)?;
    let data_start = w.stream_position().map_err(io)?;

    for (name, shape, d, off) in &table {
        // a dense format is read in its own dtype (no f32 copy of a bf16 table beside it)
        let dtype = float_dtype(*d).unwrap_or(DType::F32);
        let t = ckpt.load(&cfg, plan.source_of(&cfg, name), dtype, &Device::Cpu)?;
        // the calibration observed the product's input under this name (none: a split
        // lookup table, rounded plainly)
        let observed = plan.observed_as(&cfg, name);
        let h = match (moments.as_deref_mut(), observed) {
            (Some(m), Some(o)) => m.of(o)?,
            _ => None,
        };
        let derived = match (imatrix, h) {
            (None, Some(h)) => crate::imatrix::importance_from_moments(name, shape, h)?,
            _ => None,
        };
        let importance = imatrix
            .zip(observed)
            .and_then(|(m, o)| m.get(o))
            .or(derived.as_ref());
        let mut bytes = tensor_bytes(&t, *d, importance, name)?;
        if let Some(h) = h {
            if crate::gptq::supports(*d) && crate::gptq::applies_to(name) {
                let n = crate::gptq::requantize(&t, *d, &mut bytes, h).map_err(|e| {
                    GgufError::Quantize {
                        name: name.to_string(),
                        format: quant::ggml_name(*d).to_string(),
                        weighted: false,
                        message: format!("GPTQ: {e}"),
                    }
                })?;
                report.gptq.push((name.clone(), n));
            }
        }
        debug_assert_eq!(
            bytes.len(),
            quant::storage_bytes(*d, shape.iter().product())
        );
        let pos = w.stream_position().map_err(io)?;
        if pos != data_start + off {
            return Err(ZayaError::Input(format!(
                "internal: tensor `{name}` at {pos}, expected {}",
                data_start + off
            )));
        }
        w.write_all(&bytes).map_err(io)?;
        pad(&mut w, ALIGNMENT).map_err(io)?;
    }
    w.flush().map_err(io)?;
    let file = w.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    report.bytes = file.metadata().map_err(io)?.len();
    drop(file);
    std::fs::rename(&tmp, out).map_err(|e| ZayaError::io(out, e))?;
    Ok(report)
}

/// The stored bytes of `t` in format `d`.
fn tensor_bytes(
    t: &Tensor,
    d: GgmlDType,
    imatrix: Option<&Vec<f32>>,
    name: &str,
) -> Result<Vec<u8>> {
    if let Some(dtype) = float_dtype(d) {
        // safetensors' little-endian element bytes, which GGUF's dense formats share: one
        // copy of the values (the 8B's bf16 embedding is 1 GiB)
        use safetensors::View;
        return Ok(t.to_dtype(dtype)?.data().into_owned());
    }
    let q = match imatrix {
        Some(w) => quant::quantize_weighted(t, d, w),
        None => quant::quantize(t, d),
    }
    .map_err(|e| GgufError::Quantize {
        name: name.to_string(),
        format: quant::ggml_name(d).to_string(),
        weighted: imatrix.is_some() && quant::takes_importance(d),
        message: e.to_string(),
    })?;
    Ok(q.data()?.into_owned())
}

fn ggml_type_id(d: GgmlDType) -> u32 {
    match d {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

fn pad<W: Write + Seek>(w: &mut W, align: u64) -> std::io::Result<()> {
    let pos = w.stream_position()?;
    let n = pos.div_ceil(align) * align - pos;
    w.write_all(&vec![0u8; n as usize])
}

fn write_str<W: Write>(w: &mut W, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

/// Writes a metadata value: its type id, then the value (GGUF v3).
fn write_value<W: Write>(w: &mut W, v: &Value) -> std::io::Result<()> {
    w.write_all(&value_type_id(v).to_le_bytes())?;
    write_payload(w, v)
}

fn value_type_id(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn write_payload<W: Write>(w: &mut W, v: &Value) -> std::io::Result<()> {
    match v {
        Value::U8(x) => w.write_all(&x.to_le_bytes()),
        Value::I8(x) => w.write_all(&x.to_le_bytes()),
        Value::U16(x) => w.write_all(&x.to_le_bytes()),
        Value::I16(x) => w.write_all(&x.to_le_bytes()),
        Value::U32(x) => w.write_all(&x.to_le_bytes()),
        Value::I32(x) => w.write_all(&x.to_le_bytes()),
        Value::U64(x) => w.write_all(&x.to_le_bytes()),
        Value::I64(x) => w.write_all(&x.to_le_bytes()),
        Value::F32(x) => w.write_all(&x.to_le_bytes()),
        Value::F64(x) => w.write_all(&x.to_le_bytes()),
        Value::Bool(x) => w.write_all(&[*x as u8]),
        Value::String(s) => write_str(w, s),
        Value::Array(items) => {
            let ty = items.first().map_or(4, value_type_id);
            w.write_all(&ty.to_le_bytes())?;
            w.write_all(&(items.len() as u64).to_le_bytes())?;
            items.iter().try_for_each(|x| write_payload(w, x))
        }
    }
}

// ---------------------------------------------------------------------------------------
// Quantizing while loading (`--quant`)
// ---------------------------------------------------------------------------------------

/// Quantizes the tensors a plan selects as the model is built (a one-off run without
/// writing a file). Tensors that a wrapped source already holds quantized are taken as
/// they are.
pub struct QuantizeOnLoad {
    dense: VarBuilder<'static>,
    plan: QuantPlan,
    shapes: BTreeMap<String, Vec<usize>>,
    inner: Option<Arc<dyn QuantizedSource>>,
    /// Stored dtypes of a dense source's tensors (see [`QuantizeOnLoad::with_stored_dtypes`]).
    stored: BTreeMap<String, DType>,
}

impl QuantizeOnLoad {
    pub fn new(
        dense: VarBuilder<'static>,
        cfg: &ZayaConfig,
        plan: QuantPlan,
        inner: Option<Arc<dyn QuantizedSource>>,
    ) -> Self {
        let shapes = native_specs(cfg)
            .into_iter()
            .map(|s| (s.name, s.shape))
            .collect();
        QuantizeOnLoad {
            dense,
            plan: plan.for_model(cfg),
            shapes,
            inner,
            stored: BTreeMap::new(),
        }
    }

    /// Reports the dense checkpoint's stored dtype of every tensor, so that the model built
    /// over it keeps what a GGUF written from the same checkpoint would keep in bf16 (the
    /// two load to the same model).
    /// `cfg` is the checkpoint's config (tied, where the plan stores the head apart).
    pub fn with_stored_dtypes(mut self, ckpt: &Checkpoint, cfg: &ZayaConfig) -> Result<Self> {
        for name in self.shapes.keys() {
            let source = self.plan.source_of(cfg, name);
            self.stored
                .insert(name.clone(), ckpt.stored_dtype(cfg, source)?);
        }
        Ok(self)
    }
}

impl QuantizedSource for QuantizeOnLoad {
    fn quantized(&self, name: &str) -> candle_core::Result<Option<Arc<QTensor>>> {
        if let Some(inner) = &self.inner {
            if let Some(q) = inner.quantized(name)? {
                return Ok(Some(q));
            }
        }
        let Some(shape) = self.shapes.get(name) else {
            return Ok(None);
        };
        match self.plan.format_for(name, shape) {
            WeightFormat::Quant(d) => {
                let t = self.dense.get_unchecked_dtype(name, DType::F32)?;
                let q = quant::quantize(&t, d)
                    .map_err(|e| candle_core::Error::Msg(format!("quantizing `{name}`: {e}")))?;
                Ok(Some(Arc::new(q)))
            }
            _ => Ok(None),
        }
    }

    fn stored_dtype(&self, name: &str) -> Option<DType> {
        match &self.inner {
            Some(inner) => inner.stored_dtype(name),
            None => self.stored.get(name).copied(),
        }
    }
}

/// A quantized tensor's stored blocks copied out of the map into the storage the matmul
/// reads, as `QStorage::from_data` builds it, but on the rayon pool
/// ([`crate::safetensors_io::copy_parallel`]: the copy's first writes to fresh pages were
/// most of a GGUF load).
fn blocks_copied(bytes: &[u8], d: GgmlDType) -> candle_core::Result<Box<dyn QuantizedType>> {
    use candle_core::quantized::k_quants::*;
    fn copied<T: GgmlType + 'static>(bytes: &[u8]) -> candle_core::Result<Box<dyn QuantizedType>> {
        let size = std::mem::size_of::<T>();
        // the block is exactly its stored bytes (no padding that a copy could leave
        // undefined), as the format's block size says
        if size != T::DTYPE.type_size() {
            candle_core::bail!(
                "{:?} blocks are {size} bytes in memory and {} in a file",
                T::DTYPE,
                T::DTYPE.type_size()
            );
        }
        if !bytes.len().is_multiple_of(size) {
            candle_core::bail!("{} bytes are not whole {size}-byte blocks", bytes.len());
        }
        // SAFETY (both): GGML blocks are plain data (f16 / bf16 / f32 scales, byte arrays,
        // no padding), valid for every bit pattern, zeros included.
        let mut v: Vec<T> = unsafe { crate::safetensors_io::zeroed(bytes.len() / size) }
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        crate::safetensors_io::copy_parallel(bytes, unsafe {
            crate::safetensors_io::bytes_mut(&mut v)
        })
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        Ok(Box::new(v))
    }
    match d {
        GgmlDType::F32 => copied::<f32>(bytes),
        GgmlDType::F16 => copied::<half::f16>(bytes),
        GgmlDType::BF16 => copied::<half::bf16>(bytes),
        GgmlDType::Q4_0 => copied::<BlockQ4_0>(bytes),
        GgmlDType::Q4_1 => copied::<BlockQ4_1>(bytes),
        GgmlDType::Q5_0 => copied::<BlockQ5_0>(bytes),
        GgmlDType::Q5_1 => copied::<BlockQ5_1>(bytes),
        GgmlDType::Q8_0 => copied::<BlockQ8_0>(bytes),
        GgmlDType::Q8_1 => copied::<BlockQ8_1>(bytes),
        GgmlDType::Q2K => copied::<BlockQ2K>(bytes),
        GgmlDType::Q3K => copied::<BlockQ3K>(bytes),
        GgmlDType::Q4K => copied::<BlockQ4K>(bytes),
        GgmlDType::Q5K => copied::<BlockQ5K>(bytes),
        GgmlDType::Q6K => copied::<BlockQ6K>(bytes),
        GgmlDType::Q8K => copied::<BlockQ8K>(bytes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every GGML format's blocks copy into the storage candle's own `from_data` builds:
    /// the same values back, and a byte count that is not whole blocks is an error.
    #[test]
    fn copied_blocks_equal_candles_own_copy() {
        use GgmlDType::*;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        for d in [
            F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2K, Q3K, Q4K, Q5K, Q6K, Q8K,
        ] {
            // two blocks of a row of 512 values (every format's block divides 512)
            let elems = 512;
            let n = elems / d.block_size() * d.type_size();
            // valid f16 scales: small positive halves; the rest any bytes
            let bytes: Vec<u8> = (0..n)
                .map(|i| {
                    if i % 2 == 1 {
                        0x2c
                    } else {
                        (i * 37 % 251) as u8
                    }
                })
                .collect();
            let ours = pool.install(|| blocks_copied(&bytes, d)).unwrap();
            let theirs = d.from_data(std::borrow::Cow::Borrowed(&bytes));
            let shape = Shape::from_dims(&[1, elems]);
            let deq = |q: Box<dyn QuantizedType>| {
                QTensor::new(QStorage::Cpu(q), shape.clone())
                    .unwrap()
                    .dequantize(&Device::Cpu)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            };
            let (a, b) = (deq(ours), deq(theirs));
            assert!(
                a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{d:?}: the copied blocks dequantize differently"
            );
            assert!(blocks_copied(&bytes[..n - 1], d).is_err(), "{d:?}");
        }
    }
}
