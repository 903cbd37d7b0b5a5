//! Typed errors of the library. Every variant says what was wrong and where
//! (file, tensor name, shape, field, token position) so a user can fix the input.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ZayaError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    #[error("config {field}: {message}")]
    Config { field: String, message: String },

    #[error("{path}: not a readable safetensors file: {message}")]
    BadWeightsFile { path: PathBuf, message: String },

    #[error("no weights in {dir}: expected model.safetensors or model.safetensors.index.json")]
    NoWeights { dir: PathBuf },

    #[error("missing tensor `{name}` (expected shape {expected:?}) in {location}")]
    MissingTensor {
        name: String,
        expected: Vec<usize>,
        location: PathBuf,
    },

    #[error("unexpected tensor `{name}` with shape {shape:?} in {file}")]
    UnexpectedTensor {
        name: String,
        shape: Vec<usize>,
        file: PathBuf,
    },

    #[error("tensor `{name}` in {file} has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
        file: PathBuf,
    },

    #[error("tensor `{name}` in {file} has unsupported dtype {dtype}")]
    UnsupportedDtype {
        name: String,
        dtype: String,
        file: PathBuf,
    },

    #[error("invalid input: {0}")]
    Input(String),

    #[error("LoRA config {field}: {message}")]
    LoraConfig { field: String, message: String },

    #[error("LoRA adapter {location}: {message}")]
    Adapter { location: PathBuf, message: String },

    #[error(
        "this run needs about {needed_gib:.2} GiB but only {available_gib:.2} GiB is available \
         (MemAvailable in /proc/meminfo): {report}; use checkpointing, a smaller batch or \
         sequence length, or a quantized base"
    )]
    TrainingMemory {
        report: String,
        needed: u64,
        available: u64,
        needed_gib: f64,
        available_gib: f64,
    },

    #[error(
        "the weights of {dir} need {needed_gib:.2} GiB loaded with dtype {dtype} ({needed} \
         bytes, quantized tensors at their block size) but only {available_gib:.2} GiB \
         ({available} bytes) is available (MemAvailable in /proc/meminfo); free memory, or \
         load with a smaller dtype or a smaller quantized format"
    )]
    InsufficientMemory {
        dir: PathBuf,
        dtype: String,
        needed: u64,
        available: u64,
        needed_gib: f64,
        available_gib: f64,
    },

    #[error("token id {id} at batch row {row}, position {position} is out of range (vocab_size {vocab_size})")]
    TokenOutOfRange {
        id: i64,
        row: usize,
        position: usize,
        vocab_size: usize,
    },

    #[error("sequence of {length} tokens (row {row}) exceeds max_position_embeddings {limit}")]
    ContextTooLong {
        row: usize,
        length: usize,
        limit: usize,
    },

    #[error(transparent)]
    Text(#[from] crate::text::TextError),

    #[error(transparent)]
    Gguf(#[from] crate::gguf::GgufError),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, ZayaError>;

impl ZayaError {
    pub(crate) fn config(field: impl Into<String>, message: impl Into<String>) -> Self {
        ZayaError::Config {
            field: field.into(),
            message: message.into(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ZayaError::Io {
            path: path.into(),
            source,
        }
    }
}

/// The message of a caught panic (a third-party parser that panics on bad input is turned
/// into a typed error by its caller).
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown".into())
}
