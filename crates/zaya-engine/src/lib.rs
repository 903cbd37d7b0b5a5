//! A continuous-batching generation engine for ZAYA1 models.
//!
//! One thread owns the step loop ([`Engine::start`]); callers [`Engine::submit`] tokenized
//! requests from any thread and read [`Event`]s from the returned [`RequestHandle`]. Each step
//! decodes one token for every running row and feeds prompt pieces of newly admitted requests
//! within a token budget; a prefix cache keeps the model state at block boundaries of prompts
//! so a later prompt starting with the same tokens skips them. Only std threads and channels:
//! an async server wraps the blocking `recv` itself.

mod choice;
mod engine;
mod prefix_cache;
mod request;
mod rows;

pub use choice::logprobs as log_softmax_top;
pub use engine::{Engine, EngineConfig, EngineMetrics};
pub use prefix_cache::block_hashes;
pub use request::{
    Canceller, ConstraintFactory, Event, FinishReason, GenerationRequest, RequestHandle,
    SubmitError, TokenConstraint, TokenLogprob, Usage, MAX_TOP_LOGPROBS,
};
pub use rows::{last_logits, EngineModel, EngineRow, RowState};
