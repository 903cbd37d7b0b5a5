//! Errors of the GRPO crate: each says what was wrong and where (input field, row, token,
//! reward function, process and line).

use thiserror::Error;

#[derive(Debug, Error)]
pub enum GrpoError {
    /// A user-given value or input document is invalid; the message names the field / row.
    #[error("{0}")]
    Input(String),
    /// A reward function failed on a completion.
    #[error("reward `{name}`: {message}")]
    Reward { name: String, message: String },
    /// An external reward or environment process misbehaved (crashed, hung, wrote garbage).
    #[error("{role} process `{command}`: {message}")]
    Process {
        role: &'static str,
        command: String,
        message: String,
    },
    /// A line of a JSON-lines data file is invalid.
    #[error("{path}:{line}: {message}")]
    Data {
        path: String,
        line: usize,
        message: String,
    },
    #[error(transparent)]
    Model(#[from] zaya::ZayaError),
    #[error(transparent)]
    Text(#[from] zaya::text::TextError),
    #[error("tensor error: {0}")]
    Tensor(#[from] candle_core::Error),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, GrpoError>;

impl GrpoError {
    pub fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        GrpoError::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }
}
