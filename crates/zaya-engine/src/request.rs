//! What a caller submits and what it receives back: the request, its events and the handle
//! that reads them (std channels only, so any runtime can wrap it).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use zaya::sampling::SamplingParams;

use crate::engine::Waker;

/// Most alternatives a request may ask log-probabilities for (OpenAI's bound).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// One generation request over already templated and tokenized input.
#[derive(Clone)]
pub struct GenerationRequest {
    /// Prompt token ids (at least one).
    pub prompt: Vec<u32>,
    /// Processors and seed; choice `i` draws with seed `seed + i`.
    pub sampling: SamplingParams,
    /// Most tokens generated per choice (>= 1); generation also ends at the model's context.
    pub max_tokens: usize,
    /// Ids that end a choice (EOS etc.; leave them out to ignore EOS). The stop token is
    /// reported as a [`Event::Token`] with empty text and counts as a completion token.
    pub stop_token_ids: Vec<u32>,
    /// Strings that end a choice, matched on the detokenized text across token boundaries
    /// (needs a tokenizer). The matched string and anything after it are never sent.
    pub stop_strings: Vec<String>,
    /// `Some(k)`: the log-probability of each chosen token and of the `k` (<= 20) most likely
    /// alternatives, from the log-softmax of the processed logits (after penalties,
    /// temperature, top-k/p, min-p and the grammar mask; a token they exclude has `-inf`).
    pub logprobs: Option<usize>,
    /// Choices sharing one prefill (>= 1).
    pub n: usize,
    /// A grammar: one [`TokenConstraint`] per choice masks the tokens before sampling.
    pub constraint: Option<Arc<dyn ConstraintFactory>>,
    /// Leave special tokens out of the text deltas.
    pub skip_special_tokens: bool,
}

impl GenerationRequest {
    /// Greedy, `max_tokens` tokens, one choice, no stop conditions.
    pub fn new(prompt: Vec<u32>, max_tokens: usize) -> Self {
        GenerationRequest {
            prompt,
            sampling: SamplingParams::default(),
            max_tokens,
            stop_token_ids: Vec::new(),
            stop_strings: Vec::new(),
            logprobs: None,
            n: 1,
            constraint: None,
            skip_special_tokens: true,
        }
    }
}

impl std::fmt::Debug for GenerationRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GenerationRequest")
            .field("prompt_tokens", &self.prompt.len())
            .field("sampling", &self.sampling)
            .field("max_tokens", &self.max_tokens)
            .field("stop_token_ids", &self.stop_token_ids)
            .field("stop_strings", &self.stop_strings)
            .field("logprobs", &self.logprobs)
            .field("n", &self.n)
            .field("constraint", &self.constraint.is_some())
            .field("skip_special_tokens", &self.skip_special_tokens)
            .finish()
    }
}

/// Makes a fresh grammar state per choice.
pub trait ConstraintFactory: Send + Sync {
    fn start(&self) -> Result<Box<dyn TokenConstraint>, String>;
}

/// A grammar state advanced token by token.
pub trait TokenConstraint: Send {
    /// Sets `allowed[id] = false` for every token that may not come next (len = model vocab).
    fn mask(&mut self, allowed: &mut [bool]) -> Result<(), String>;
    /// Advances with the sampled token.
    fn commit(&mut self, token: u32) -> Result<(), String>;
    /// The grammar accepts and nothing more may follow: the choice finishes with
    /// [`FinishReason::Stop`].
    fn is_finished(&self) -> bool;
}

/// Log-probabilities of one generated token.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    /// The `k` most likely tokens, most likely first.
    pub top: Vec<(u32, f32)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token, a stop string or the end of the grammar.
    Stop,
    /// `max_tokens` or the model's context length.
    Length,
    /// The caller cancelled (or dropped the handle) or the engine shut down without draining.
    Cancelled,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt_tokens: usize,
    /// Over all choices, stop tokens included.
    pub completion_tokens: usize,
    /// Prompt tokens whose state came from the prefix cache (not computed).
    pub cached_tokens: usize,
}

/// What a request reports, in order: per choice `Token`s then one `Finished`; then `Done`.
/// A failed request sends `Error` instead of `Done`; either is the last event.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Token {
        choice: usize,
        token: u32,
        /// Text released with this token: UTF-8 complete, with anything that may still turn
        /// out to be a stop string held back (empty without a tokenizer).
        text: String,
        logprob: Option<TokenLogprob>,
    },
    Finished {
        choice: usize,
        reason: FinishReason,
        /// Text held back until the end (an incomplete character, a partial stop string that
        /// never completed).
        text: String,
    },
    Done {
        usage: Usage,
    },
    Error {
        message: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("the engine's queue is full")]
    QueueFull,
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("the engine is shut down")]
    ShutDown,
}

/// The caller's side of one request. Dropping it cancels the request.
pub struct RequestHandle {
    pub id: u64,
    /// Prompt tokens reused from the prefix cache; set when the engine admits the request.
    pub cached_prompt_tokens: Arc<OnceLock<usize>>,
    pub(crate) events: Receiver<Event>,
    pub(crate) cancelled: Arc<AtomicBool>,
    pub(crate) waker: Waker,
}

impl RequestHandle {
    /// Blocks for the next event; `None` after the last one.
    pub fn recv(&self) -> Option<Event> {
        self.events.recv().ok()
    }

    /// As [`recv`](Self::recv) with a timeout; `Disconnected` after the last event.
    pub fn recv_timeout(&self, d: Duration) -> Result<Event, RecvTimeoutError> {
        self.events.recv_timeout(d)
    }

    /// The next event if one is ready; `Disconnected` after the last event.
    pub fn try_recv(&self) -> Result<Event, TryRecvError> {
        self.events.try_recv()
    }

    /// Asks the engine to stop this request: its rows leave the batch within a step and
    /// each unfinished choice reports [`FinishReason::Cancelled`].
    pub fn cancel(&self) {
        if !self.cancelled.swap(true, Ordering::SeqCst) {
            self.waker.wake();
        }
    }

    /// A handle that cancels this request from elsewhere (another thread, a drop guard)
    /// while this one is busy receiving.
    pub fn canceller(&self) -> Canceller {
        Canceller {
            cancelled: self.cancelled.clone(),
            waker: self.waker.clone(),
        }
    }

    /// Drains the events until the last one (convenience for tests and simple callers).
    pub fn collect(&self) -> Vec<Event> {
        let mut out = Vec::new();
        while let Some(e) = self.recv() {
            out.push(e);
        }
        out
    }
}

/// Cancels one request, as [`RequestHandle::cancel`] does; cheap to clone and `Send + Sync`.
#[derive(Clone)]
pub struct Canceller {
    cancelled: Arc<AtomicBool>,
    waker: Waker,
}

impl Canceller {
    pub fn cancel(&self) {
        if !self.cancelled.swap(true, Ordering::SeqCst) {
            self.waker.wake();
        }
    }
}

impl std::fmt::Debug for Canceller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Canceller")
            .field("cancelled", &self.cancelled.load(Ordering::SeqCst))
            .finish()
    }
}

impl Drop for RequestHandle {
    fn drop(&mut self) {
        self.cancel();
    }
}

impl std::fmt::Debug for RequestHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestHandle")
            .field("id", &self.id)
            .field("cached_prompt_tokens", &self.cached_prompt_tokens.get())
            .finish()
    }
}
