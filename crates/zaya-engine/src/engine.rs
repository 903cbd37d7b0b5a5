//! The engine: a handle that validates and queues requests, and one thread that owns the step
//! loop. Each step decodes one token for every running row and feeds prompt pieces of the
//! requests still prefilling, within a per-step token budget; requests join between steps and
//! a finished or cancelled row frees its state at once.
//!
//! Prompt pieces always end at multiples of `prefix_block` (or at the prompt's end), whatever
//! else is in the batch: a row's prefill is then computed identically alone, batched or
//! resumed from the prefix cache, which is what makes cached runs and batched runs give the
//! same logits as a cold solo run.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;

use zaya::attention::AttnImplementation;
use zaya::sampling::{Sampler, StopChecker};
use zaya::text::ZayaTokenizer;
use zaya::{ZayaConfig, ZayaError};

use crate::choice::{Choice, Outcome};
use crate::prefix_cache::{block_hashes, PrefixCache};
use crate::request::{
    Event, FinishReason, GenerationRequest, RequestHandle, SubmitError, Usage, MAX_TOP_LOGPROBS,
};
use crate::rows::{EngineModel, EngineRow};

#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// Rows decoding at once (a request holds `n` rows).
    pub max_running: usize,
    /// Requests queued beyond the running ones; more is [`SubmitError::QueueFull`].
    pub max_waiting: usize,
    /// Tokens per step: decode rows plus prompt tokens (at least one prompt piece always runs).
    pub step_token_budget: usize,
    /// Most prompt tokens fed for one row in one step (rounded down to whole blocks, at least
    /// one block).
    pub prefill_chunk: usize,
    /// Prefix-cache granularity in tokens; prompt pieces end on these boundaries.
    pub prefix_block: usize,
    /// Bytes the prefix cache may hold (0 turns it off).
    pub prefix_cache_bytes: usize,
    pub attn: AttnImplementation,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_running: 32,
            max_waiting: 256,
            step_token_budget: 512,
            prefill_chunk: 256,
            prefix_block: 64,
            prefix_cache_bytes: 1 << 30,
            attn: AttnImplementation::default(),
        }
    }
}

impl EngineConfig {
    fn validate(&self) -> zaya::Result<()> {
        let bad = |field: &str, message: &str| {
            Err(ZayaError::Config {
                field: format!("engine.{field}"),
                message: message.into(),
            })
        };
        if self.max_running == 0 {
            return bad("max_running", "must be >= 1");
        }
        if self.step_token_budget == 0 {
            return bad("step_token_budget", "must be >= 1");
        }
        if self.prefix_block == 0 {
            return bad("prefix_block", "must be >= 1");
        }
        if self.prefill_chunk == 0 {
            return bad("prefill_chunk", "must be >= 1");
        }
        Ok(())
    }
}

/// A snapshot of the engine's gauges and counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EngineMetrics {
    /// Requests admitted (prefilling or decoding).
    pub running: usize,
    /// Rows (choices) decoding.
    pub running_rows: usize,
    /// Requests queued.
    pub waiting: usize,
    /// Prompt tokens of admitted requests (cached ones included).
    pub prompt_tokens_total: u64,
    pub generation_tokens_total: u64,
    /// Prompt tokens taken from the prefix cache instead of computed.
    pub prefix_cache_hit_tokens_total: u64,
    /// Requests accepted by `submit`.
    pub requests_total: u64,
    pub prefix_cache_bytes: usize,
    pub steps_total: u64,
}

#[derive(Default)]
struct Counters {
    running: AtomicUsize,
    running_rows: AtomicUsize,
    waiting: AtomicUsize,
    prompt_tokens_total: AtomicU64,
    generation_tokens_total: AtomicU64,
    prefix_cache_hit_tokens_total: AtomicU64,
    requests_total: AtomicU64,
    prefix_cache_bytes: AtomicUsize,
    steps_total: AtomicU64,
}

/// A request accepted by `submit`, waiting for the engine thread.
struct Submitted {
    id: u64,
    prompt: Vec<u32>,
    choices: Vec<Choice>,
    events: Sender<Event>,
    cancelled: Arc<AtomicBool>,
    cached: Arc<OnceLock<usize>>,
}

#[derive(Default)]
struct Queue {
    waiting: VecDeque<Submitted>,
    /// `Some(drain)` once shutdown was asked.
    shutdown: Option<bool>,
}

pub(crate) struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    counters: Counters,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // A panic while holding the lock leaves the queue consistent (every change is one
        // push or pop), so a poisoned lock is still usable.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Lets a request handle wake an idle engine (to notice a cancellation).
#[derive(Clone)]
pub struct Waker(Arc<Shared>);

impl Waker {
    pub fn wake(&self) {
        let _q = self.0.lock();
        self.0.wake.notify_all();
    }
}

struct Inner {
    shared: Arc<Shared>,
    /// The config of the engine's model (what requests are checked against).
    model_cfg: ZayaConfig,
    tokenizer: Option<Arc<ZayaTokenizer>>,
    cfg: EngineConfig,
    next_id: AtomicU64,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// [`EngineModel::unavailable`] of the model the worker runs.
    unavailable: Box<dyn Fn() -> Option<String> + Send + Sync>,
}

impl Inner {
    fn shutdown(&self, drain: bool) {
        {
            let mut q = self.shared.lock();
            // a later cancel overrides an earlier drain, never the reverse
            q.shutdown = Some(q.shutdown.map_or(drain, |d| d && drain));
            self.shared.wake.notify_all();
        }
        let handle = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = handle {
            if h.join().is_err() {
                tracing::error!("the engine thread panicked");
            }
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown(false);
    }
}

/// The engine handle: cheap to clone, `Send + Sync`. The last clone dropped shuts the engine
/// down (cancelling what runs).
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl Engine {
    /// Starts the engine thread; the model is shared, never copied. The model is any
    /// [`EngineModel`]: a [`zaya::ZayaModel`] on this process, or a model split over ranks.
    pub fn start<M: EngineModel>(
        model: Arc<M>,
        tokenizer: Option<Arc<ZayaTokenizer>>,
        cfg: EngineConfig,
    ) -> zaya::Result<Engine> {
        cfg.validate()?;
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            counters: Counters::default(),
        });
        let model_cfg = model.model_config().clone();
        let health = Arc::clone(&model);
        let worker = Worker {
            shared: shared.clone(),
            model,
            tokenizer: tokenizer.clone(),
            prefix: PrefixCache::new(cfg.prefix_block, cfg.prefix_cache_bytes),
            cfg: cfg.clone(),
            active: Vec::new(),
        };
        let thread = std::thread::Builder::new()
            .name("zaya-engine".into())
            .spawn(move || worker.run())
            .map_err(|source| ZayaError::Io {
                path: "<spawning the engine thread>".into(),
                source,
            })?;
        Ok(Engine {
            inner: Arc::new(Inner {
                shared,
                model_cfg,
                tokenizer,
                cfg,
                next_id: AtomicU64::new(1),
                thread: Mutex::new(Some(thread)),
                unavailable: Box::new(move || health.unavailable()),
            }),
        })
    }

    /// Why the engine's model can no longer run (e.g. a failed rank of a serving mesh);
    /// `None` while it can. Never waits for a step.
    pub fn unavailable(&self) -> Option<String> {
        (self.inner.unavailable)()
    }

    /// The config of the engine's model.
    pub fn model_config(&self) -> &ZayaConfig {
        &self.inner.model_cfg
    }

    pub fn tokenizer(&self) -> Option<&Arc<ZayaTokenizer>> {
        self.inner.tokenizer.as_ref()
    }

    pub fn config(&self) -> &EngineConfig {
        &self.inner.cfg
    }

    /// Validates and queues a request. Every problem with the request is an
    /// [`SubmitError::InvalidRequest`] saying which field is wrong.
    pub fn submit(&self, req: GenerationRequest) -> Result<RequestHandle, SubmitError> {
        let choices = self.build_choices(&req)?;
        let shared = &self.inner.shared;
        let (tx, rx) = mpsc::channel();
        let cancelled = Arc::new(AtomicBool::new(false));
        let cached = Arc::new(OnceLock::new());
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut q = shared.lock();
            if q.shutdown.is_some() {
                return Err(SubmitError::ShutDown);
            }
            if q.waiting.len() >= self.inner.cfg.max_waiting {
                return Err(SubmitError::QueueFull);
            }
            q.waiting.push_back(Submitted {
                id,
                prompt: req.prompt,
                choices,
                events: tx,
                cancelled: cancelled.clone(),
                cached: cached.clone(),
            });
            shared
                .counters
                .waiting
                .store(q.waiting.len(), Ordering::Relaxed);
            shared
                .counters
                .requests_total
                .fetch_add(1, Ordering::Relaxed);
            shared.wake.notify_all();
        }
        Ok(RequestHandle {
            id,
            cached_prompt_tokens: cached,
            events: rx,
            cancelled,
            waker: Waker(shared.clone()),
        })
    }

    fn build_choices(&self, req: &GenerationRequest) -> Result<Vec<Choice>, SubmitError> {
        let invalid = |m: String| Err(SubmitError::InvalidRequest(m));
        let cfg = &self.inner.model_cfg;
        if req.prompt.is_empty() {
            return invalid("prompt: must hold at least one token".into());
        }
        if let Some((i, &id)) = req
            .prompt
            .iter()
            .enumerate()
            .find(|(_, &id)| id as usize >= cfg.vocab_size)
        {
            return invalid(format!(
                "prompt: token id {id} at position {i} is out of range (vocab_size {})",
                cfg.vocab_size
            ));
        }
        if req.prompt.len() >= cfg.max_position_embeddings {
            return invalid(format!(
                "prompt: {} tokens leave no room to generate within the model's context of {} tokens",
                req.prompt.len(),
                cfg.max_position_embeddings
            ));
        }
        if req.n == 0 {
            return invalid("n: must be >= 1".into());
        }
        if req.max_tokens == 0 {
            return invalid("max_tokens: must be >= 1".into());
        }
        if let Some(k) = req.logprobs {
            if k > MAX_TOP_LOGPROBS {
                return invalid(format!(
                    "logprobs: {k} alternatives asked, at most {MAX_TOP_LOGPROBS}"
                ));
            }
        }
        if !req.stop_strings.is_empty() && self.inner.tokenizer.is_none() {
            return invalid("stop: stop strings need a tokenizer and this engine has none".into());
        }
        let mut choices = Vec::with_capacity(req.n);
        for i in 0..req.n {
            let mut params = req.sampling.clone();
            params.seed = params.seed.wrapping_add(i as u64);
            let sampler =
                Sampler::new(&params).map_err(|e| SubmitError::InvalidRequest(e.to_string()))?;
            let stop = StopChecker::new(req.stop_token_ids.clone(), req.stop_strings.clone())
                .map_err(|e| SubmitError::InvalidRequest(format!("stop: {e}")))?;
            let constraint = match &req.constraint {
                None => None,
                Some(f) => Some(
                    f.start()
                        .map_err(|e| SubmitError::InvalidRequest(format!("constraint: {e}")))?,
                ),
            };
            choices.push(Choice::new(
                i,
                sampler,
                stop,
                self.inner.tokenizer.is_some(),
                req.skip_special_tokens,
                constraint,
                &req.prompt,
                req.max_tokens,
                cfg.max_position_embeddings,
                req.logprobs,
            ));
        }
        Ok(choices)
    }

    pub fn metrics(&self) -> EngineMetrics {
        let c = &self.inner.shared.counters;
        EngineMetrics {
            running: c.running.load(Ordering::Relaxed),
            running_rows: c.running_rows.load(Ordering::Relaxed),
            waiting: c.waiting.load(Ordering::Relaxed),
            prompt_tokens_total: c.prompt_tokens_total.load(Ordering::Relaxed),
            generation_tokens_total: c.generation_tokens_total.load(Ordering::Relaxed),
            prefix_cache_hit_tokens_total: c.prefix_cache_hit_tokens_total.load(Ordering::Relaxed),
            requests_total: c.requests_total.load(Ordering::Relaxed),
            prefix_cache_bytes: c.prefix_cache_bytes.load(Ordering::Relaxed),
            steps_total: c.steps_total.load(Ordering::Relaxed),
        }
    }

    /// Stops the engine and joins its thread. `drain = true` finishes every accepted request
    /// first; `false` cancels them. Later submits get [`SubmitError::ShutDown`].
    pub fn shutdown(&self, drain: bool) {
        self.inner.shutdown(drain);
    }
}

/// One choice's place in the batch (`R`: the model's row state).
struct Slot<R> {
    choice: Choice,
    /// The row's model state; dropped the moment the choice ends.
    row: Option<R>,
    /// Token to feed next step.
    pending: Option<u32>,
    done: bool,
}

/// A request on the engine thread.
struct Active<R> {
    id: u64,
    prompt: Vec<u32>,
    events: Sender<Event>,
    cancelled: Arc<AtomicBool>,
    /// While prefilling: the shared state of all choices.
    prefill: Option<R>,
    /// Chain hashes of the prompt's blocks (for the prefix cache).
    hashes: Vec<u64>,
    slots: Vec<Slot<R>>,
    usage: Usage,
    failed: bool,
}

impl<R: EngineRow> Active<R> {
    fn send(&self, e: Event) {
        if self.events.send(e).is_err() {
            // nobody listens any more: same as a cancel
            self.cancelled.store(true, Ordering::SeqCst);
        }
    }

    fn rows_reserved(&self) -> usize {
        if self.prefill.is_some() {
            self.slots.len()
        } else {
            self.slots.iter().filter(|s| !s.done).count()
        }
    }

    fn finished(&self) -> bool {
        self.failed || (self.prefill.is_none() && self.slots.iter().all(|s| s.done))
    }

    fn fail(&mut self, message: String) {
        tracing::warn!(request = self.id, "request failed: {message}");
        self.send(Event::Error { message });
        self.failed = true;
        self.prefill = None;
        for s in &mut self.slots {
            s.row = None;
            s.pending = None;
            s.done = true;
        }
    }

    fn cancel(&mut self, tokenizer: Option<&ZayaTokenizer>) {
        self.prefill = None;
        let mut events = Vec::new();
        for s in &mut self.slots {
            if !s.done {
                // cancelling sends only the event; no text to flush
                let _ = s
                    .choice
                    .finish(FinishReason::Cancelled, tokenizer, &mut events);
                s.done = true;
                s.row = None;
                s.pending = None;
            }
        }
        for e in events {
            self.send(e);
        }
    }
}

struct Worker<M: EngineModel> {
    shared: Arc<Shared>,
    model: Arc<M>,
    tokenizer: Option<Arc<ZayaTokenizer>>,
    cfg: EngineConfig,
    prefix: PrefixCache<M::Row>,
    active: Vec<Active<M::Row>>,
}

impl<M: EngineModel> Worker<M> {
    fn run(mut self) {
        let shared = self.shared.clone();
        loop {
            let drain_now = {
                let mut q = shared.lock();
                loop {
                    if q.shutdown == Some(false) {
                        break false;
                    }
                    // drop cancelled requests still in the queue
                    let mut i = 0;
                    while i < q.waiting.len() {
                        if q.waiting[i].cancelled.load(Ordering::SeqCst) {
                            let s = q.waiting.remove(i).expect("index in range");
                            Self::reject_cancelled(s, self.tokenizer.as_deref());
                        } else {
                            i += 1;
                        }
                    }
                    self.admit(&mut q);
                    if !self.active.is_empty() {
                        break false;
                    }
                    if q.waiting.is_empty() && q.shutdown.is_some() {
                        break true;
                    }
                    q = shared.wake.wait(q).unwrap_or_else(|e| e.into_inner());
                }
            };
            let cancel_all = self.shared.lock().shutdown == Some(false);
            if cancel_all {
                let mut q = self.shared.lock();
                while let Some(s) = q.waiting.pop_front() {
                    Self::reject_cancelled(s, self.tokenizer.as_deref());
                }
                drop(q);
                let tok = self.tokenizer.clone();
                for a in &mut self.active {
                    a.cancel(tok.as_deref());
                }
                self.retire();
                self.publish();
                return;
            }
            if drain_now {
                self.publish();
                return;
            }
            // One hand-off to the kernel pool per step (its kernels then split their work
            // with the pool's other threads from inside it) instead of one per kernel: a
            // 32-row decode step spent a quarter of its time switching threads.
            if self.model.steps_in_kernel_pool() {
                zaya::kernels::run_in_pool(|| self.step());
            } else {
                self.step();
            }
        }
    }

    /// A request cancelled before it ran: each choice reports `Cancelled`, then `Done`.
    fn reject_cancelled(mut s: Submitted, tokenizer: Option<&ZayaTokenizer>) {
        let mut events = Vec::new();
        for c in &mut s.choices {
            let _ = c.finish(FinishReason::Cancelled, tokenizer, &mut events);
        }
        let _ = s.cached.set(0);
        for e in events {
            let _ = s.events.send(e);
        }
        let _ = s.events.send(Event::Done {
            usage: Usage {
                prompt_tokens: s.prompt.len(),
                ..Usage::default()
            },
        });
    }

    fn rows_in_use(&self) -> usize {
        self.active.iter().map(Active::rows_reserved).sum()
    }

    /// Moves queued requests into the batch while rows are free (a request wider than
    /// `max_running` runs alone).
    fn admit(&mut self, q: &mut Queue) {
        while let Some(front) = q.waiting.front() {
            let n = front.choices.len();
            let used = self.rows_in_use();
            if used > 0 && used + n > self.cfg.max_running {
                break;
            }
            let s = q.waiting.pop_front().expect("front exists");
            let (cached, state) = match self.prefix.lookup(&s.prompt) {
                Some((len, state)) => (len, state),
                None => (0, self.model.new_row()),
            };
            let _ = s.cached.set(cached);
            let c = &self.shared.counters;
            c.prompt_tokens_total
                .fetch_add(s.prompt.len() as u64, Ordering::Relaxed);
            c.prefix_cache_hit_tokens_total
                .fetch_add(cached as u64, Ordering::Relaxed);
            let hashes = if self.prefix.enabled() {
                block_hashes(&s.prompt, self.cfg.prefix_block)
            } else {
                Vec::new()
            };
            self.active.push(Active {
                id: s.id,
                usage: Usage {
                    prompt_tokens: s.prompt.len(),
                    completion_tokens: 0,
                    cached_tokens: cached,
                },
                prompt: s.prompt,
                events: s.events,
                cancelled: s.cancelled,
                prefill: Some(state),
                hashes,
                slots: s
                    .choices
                    .into_iter()
                    .map(|choice| Slot {
                        choice,
                        row: None,
                        pending: None,
                        done: false,
                    })
                    .collect(),
                failed: false,
            });
        }
        self.shared
            .counters
            .waiting
            .store(q.waiting.len(), Ordering::Relaxed);
    }

    /// End of the prompt piece that starts at `fed`: the next block boundary or the prompt's
    /// end.
    fn piece_end(&self, fed: usize, prompt_len: usize) -> usize {
        let b = self.cfg.prefix_block;
        ((fed / b + 1) * b).min(prompt_len)
    }

    fn step(&mut self) {
        let tok = self.tokenizer.clone();
        // Cancelled requests leave before any compute.
        for a in &mut self.active {
            if a.cancelled.load(Ordering::SeqCst) && !a.finished() {
                a.cancel(tok.as_deref());
            }
        }
        self.retire();

        // Decode rows: every choice with a token to feed.
        let mut decode: Vec<(usize, usize)> = Vec::new();
        for (ai, a) in self.active.iter().enumerate() {
            for (si, s) in a.slots.iter().enumerate() {
                if s.pending.is_some() && s.row.is_some() {
                    decode.push((ai, si));
                }
            }
        }
        // Prompt pieces within the remaining budget; at least one piece per step so a
        // prefill always advances.
        let mut budget = self.cfg.step_token_budget.saturating_sub(decode.len());
        let per_row =
            (self.cfg.prefill_chunk / self.cfg.prefix_block).max(1) * self.cfg.prefix_block;
        let mut pieces: Vec<(usize, usize, usize)> = Vec::new(); // (active, start, end)
        'requests: for (ai, a) in self.active.iter().enumerate() {
            let Some(state) = a.prefill.as_ref() else {
                continue;
            };
            let mut fed = state.len();
            let mut taken = 0;
            while fed < a.prompt.len() {
                let end = self.piece_end(fed, a.prompt.len());
                let len = end - fed;
                if !pieces.is_empty() && len > budget {
                    break 'requests;
                }
                if taken > 0 && taken + len > per_row {
                    break;
                }
                budget = budget.saturating_sub(len);
                taken += len;
                pieces.push((ai, fed, end));
                fed = end;
            }
        }

        if !decode.is_empty() {
            self.run_decode(&decode, tok.as_deref());
        }
        for (ai, start, end) in pieces {
            self.run_piece(ai, start, end, tok.as_deref());
        }
        self.retire();
        self.publish();
    }

    fn run_decode(&mut self, decode: &[(usize, usize)], tok: Option<&ZayaTokenizer>) {
        let tokens: Vec<u32> = decode
            .iter()
            .map(|&(ai, si)| {
                self.active[ai].slots[si]
                    .pending
                    .expect("decode row has a token")
            })
            .collect();
        // Take the rows out so the forward can borrow them together.
        let mut states: Vec<M::Row> = decode
            .iter()
            .map(|&(ai, si)| {
                self.active[ai].slots[si]
                    .row
                    .take()
                    .expect("decode row has state")
            })
            .collect();
        let result = {
            let mut refs: Vec<&mut M::Row> = states.iter_mut().collect();
            self.model.decode(&mut refs, &tokens, self.cfg.attn)
        };
        match result {
            Err(e) => {
                for &(ai, _) in decode {
                    if !self.active[ai].failed {
                        self.active[ai].fail(format!("decode step failed: {e}"));
                    }
                }
            }
            Ok(logits) => {
                for ((&(ai, si), state), l) in decode.iter().zip(states).zip(logits) {
                    let a = &mut self.active[ai];
                    if a.failed {
                        continue;
                    }
                    a.slots[si].row = Some(state);
                    Self::advance(a, si, l, tok, &self.shared.counters.generation_tokens_total);
                }
            }
        }
    }

    /// Runs one prompt piece of request `ai`; at the prompt's end forks the state into the
    /// choices and samples their first tokens.
    fn run_piece(&mut self, ai: usize, start: usize, end: usize, tok: Option<&ZayaTokenizer>) {
        let a = &mut self.active[ai];
        let Some(state) = a.prefill.as_mut() else {
            return;
        };
        debug_assert_eq!(state.len(), start);
        let logits = match self
            .model
            .prefill(state, &a.prompt[start..end], self.cfg.attn)
        {
            Ok(l) => l,
            Err(e) => {
                a.fail(format!(
                    "prefill of prompt tokens {start}..{end} failed: {e}"
                ));
                return;
            }
        };
        let b = self.cfg.prefix_block;
        if self.prefix.enabled() && end.is_multiple_of(b) && end / b >= 1 {
            let h = a.hashes[end / b - 1];
            if !self.prefix.contains(h) {
                // a snapshot that cannot be copied is simply not cached
                if let Ok(snapshot) = state.fork() {
                    self.prefix.insert(h, &a.prompt[..end], snapshot);
                }
            }
        }
        if end < a.prompt.len() {
            return;
        }
        // Prompt done: each choice gets its own copy of the state.
        let state = a.prefill.take().expect("prefilling");
        let n = a.slots.len();
        for i in 0..n - 1 {
            match state.fork() {
                Ok(row) => a.slots[i].row = Some(row),
                Err(e) => {
                    a.fail(format!(
                        "copying the prompt state for choice {i} failed: {e}"
                    ));
                    return;
                }
            }
        }
        a.slots[n - 1].row = Some(state);
        for si in 0..n {
            if a.failed {
                break;
            }
            Self::advance(
                a,
                si,
                logits.clone(),
                tok,
                &self.shared.counters.generation_tokens_total,
            );
        }
    }

    /// Samples choice `si` of `a` from `logits`, counts the token in `generated_total` and
    /// sends its events.
    fn advance(
        a: &mut Active<M::Row>,
        si: usize,
        logits: Vec<f32>,
        tok: Option<&ZayaTokenizer>,
        generated_total: &AtomicU64,
    ) {
        let mut events = Vec::new();
        let slot = &mut a.slots[si];
        match slot.choice.step(logits, tok, &mut events) {
            Err(message) => {
                for e in events {
                    a.send(e);
                }
                a.fail(message);
            }
            Ok(outcome) => {
                match outcome {
                    Outcome::Continue(t) => slot.pending = Some(t),
                    Outcome::Finished => {
                        slot.pending = None;
                        slot.row = None;
                        slot.done = true;
                    }
                }
                a.usage.completion_tokens += 1;
                // Counted before the events go out: a client that has its answer sees it
                // in the metrics.
                generated_total.fetch_add(1, Ordering::Relaxed);
                for e in events {
                    a.send(e);
                }
            }
        }
    }

    /// Sends `Done` for finished requests and drops them.
    fn retire(&mut self) {
        let mut i = 0;
        while i < self.active.len() {
            if self.active[i].finished() || self.active[i].slots.iter().all(|s| s.done) {
                let a = self.active.swap_remove(i);
                if !a.failed {
                    a.send(Event::Done { usage: a.usage });
                }
                tracing::debug!(request = a.id, ?a.usage, "request finished");
            } else {
                i += 1;
            }
        }
        // keep admission order (swap_remove disturbed it)
        self.active.sort_by_key(|a| a.id);
    }

    fn publish(&self) {
        let c = &self.shared.counters;
        c.running.store(self.active.len(), Ordering::Relaxed);
        c.running_rows.store(
            self.active
                .iter()
                .flat_map(|a| &a.slots)
                .filter(|s| s.row.is_some())
                .count(),
            Ordering::Relaxed,
        );
        c.prefix_cache_bytes
            .store(self.prefix.bytes(), Ordering::Relaxed);
        c.steps_total.fetch_add(1, Ordering::Relaxed);
    }
}
