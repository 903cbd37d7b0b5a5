//! Text side of zaya: the tokenizer, streaming detokenization, chat templates and the parser of
//! ZAYA1's generated tool calls / thinking blocks. Everything here matches Hugging Face
//! `transformers` 5.23 (`AutoTokenizer`, `apply_chat_template`) byte for byte on the fixtures
//! made by `scripts/make_text_fixtures.py`.

pub mod chat_template;
mod pyfmt;
pub mod stream;
pub mod tokenizer;
pub mod tool_calls;

use std::path::PathBuf;

pub use chat_template::{ChatRequest, ChatTemplate, ChatTemplates};
pub use pyfmt::{json_dumps, py_str, JsonDumpsOptions};
pub use stream::StreamDecoder;
pub use tokenizer::{SpecialToken, ZayaTokenizer};
pub use tool_calls::{parse_output, OutputParser, ParsedOutput, ToolCall};

/// Errors of the text layer. Each says what was wrong and where (file, field, message index,
/// template line) so the input can be fixed.
#[derive(Debug, thiserror::Error)]
pub enum TextError {
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

    #[error("{path}: field `{field}`: {message}")]
    Config {
        path: PathBuf,
        field: String,
        message: String,
    },

    #[error("{dir}: no {file} (a tokenizer directory needs tokenizer.json)")]
    MissingFile { dir: PathBuf, file: String },

    #[error("{path}: cannot load the tokenizer: {message}")]
    TokenizerLoad { path: PathBuf, message: String },

    #[error("tokenizer failed to {action}: {message}")]
    Tokenizer { action: String, message: String },

    #[error(
        "token id {id} at position {position} is not in the vocabulary ({vocab_size} entries)"
    )]
    UnknownTokenId {
        id: u32,
        position: usize,
        vocab_size: usize,
    },

    #[error("{dir}: no chat template (neither `chat_template` in tokenizer_config.json nor chat_template.jinja)")]
    NoChatTemplate { dir: PathBuf },

    #[error("chat template `{name}` not found; available: {available:?}")]
    UnknownChatTemplate {
        name: String,
        available: Vec<String>,
    },

    #[error("chat template `{name}` does not compile: {message}")]
    TemplateSyntax { name: String, message: String },

    #[error("chat template `{name}` failed to render: {message}")]
    TemplateRender { name: String, message: String },

    /// `raise_exception(message)` called by the template: the conversation is not one the
    /// template accepts. `message` is exactly what the template passed.
    #[error("chat template rejected the conversation: {message}")]
    TemplateRaised { message: String },

    #[error("invalid conversation: {0}")]
    Conversation(String),
}

pub type Result<T> = std::result::Result<T, TextError>;

impl TextError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        TextError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn config(
        path: impl Into<PathBuf>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        TextError::Config {
            path: path.into(),
            field: field.into(),
            message: message.into(),
        }
    }
}
