//! From the engine's blocking event channel to the async handlers, with the per-request
//! bookkeeping: latency histograms, the request's log line, and cancellation when the
//! consumer goes away (a disconnected client drops the receiver; the forwarding thread
//! notices within its poll interval and cancels the request, whose rows leave the batch at
//! the next step).

use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use zaya_engine::{Event, RequestHandle, Usage};

use crate::AppState;

/// How often a forwarding thread with nothing to forward checks that its consumer is alive.
const POLL: Duration = Duration::from_millis(50);

/// One engine event, tagged with the engine request it came from (a completion request with
/// several prompts submits several).
pub type Tagged = (usize, Event);

/// Moves each handle's events onto one async channel (a blocking thread per handle, so the
/// engine's std channel never blocks the runtime).
pub fn forward(handles: Vec<RequestHandle>) -> mpsc::UnboundedReceiver<Tagged> {
    let (tx, rx) = mpsc::unbounded_channel();
    for (i, handle) in handles.into_iter().enumerate() {
        let tx = tx.clone();
        tokio::task::spawn_blocking(move || loop {
            match handle.recv_timeout(POLL) {
                Ok(ev) => {
                    let last = matches!(ev, Event::Done { .. } | Event::Error { .. });
                    if tx.send((i, ev)).is_err() {
                        handle.cancel();
                        return;
                    }
                    if last {
                        return;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    if tx.is_closed() {
                        handle.cancel();
                        return;
                    }
                }
                // The engine dropped the request (shut down).
                Err(RecvTimeoutError::Disconnected) => return,
            }
        });
    }
    rx
}

/// Timing and totals of one HTTP request (possibly several engine requests); logs one line
/// when it ends, however it ends.
pub struct Tracker {
    state: Arc<AppState>,
    pub id: String,
    start: Instant,
    first_token: Option<Instant>,
    last_token: Vec<Option<Instant>>,
    pub usage: Usage,
    finish: Vec<Option<&'static str>>,
    remaining: usize,
    logged: bool,
}

impl Tracker {
    pub fn new(
        state: Arc<AppState>,
        id: String,
        start: Instant,
        choices: usize,
        engine_requests: usize,
    ) -> Self {
        Tracker {
            state,
            id,
            start,
            first_token: None,
            last_token: vec![None; choices],
            usage: Usage {
                prompt_tokens: 0,
                completion_tokens: 0,
                cached_tokens: 0,
            },
            finish: vec![None; choices],
            remaining: engine_requests,
            logged: false,
        }
    }

    pub fn on_token(&mut self, choice: usize) {
        let now = Instant::now();
        if self.first_token.is_none() {
            self.first_token = Some(now);
            self.state
                .metrics
                .ttft
                .observe((now - self.start).as_secs_f64());
        }
        if let Some(slot) = self.last_token.get_mut(choice) {
            if let Some(prev) = *slot {
                self.state
                    .metrics
                    .inter_token
                    .observe((now - prev).as_secs_f64());
            }
            *slot = Some(now);
        }
    }

    pub fn on_finish(&mut self, choice: usize, reason: &'static str) {
        if let Some(f) = self.finish.get_mut(choice) {
            *f = Some(reason);
        }
    }

    /// One engine request is done; returns true when all are.
    pub fn on_done(&mut self, usage: &Usage) -> bool {
        self.usage.prompt_tokens += usage.prompt_tokens;
        self.usage.completion_tokens += usage.completion_tokens;
        self.usage.cached_tokens += usage.cached_tokens;
        self.remaining = self.remaining.saturating_sub(1);
        self.remaining == 0
    }

    /// The answer is complete (finish reasons recorded): write the request's log line.
    pub fn complete(&mut self) {
        self.log("done");
    }

    pub fn on_error(&mut self) {
        self.log("error");
    }

    fn log(&mut self, outcome: &str) {
        if self.logged {
            return;
        }
        self.logged = true;
        let duration = self.start.elapsed();
        self.state.metrics.duration.observe(duration.as_secs_f64());
        let ttft_ms = self
            .first_token
            .map(|t| (t - self.start).as_secs_f64() * 1e3);
        let finish: Vec<&str> = self.finish.iter().map(|f| f.unwrap_or("none")).collect();
        tracing::info!(
            target: "zaya_server::request",
            id = %self.id,
            outcome,
            prompt_tokens = self.usage.prompt_tokens,
            completion_tokens = self.usage.completion_tokens,
            cached_tokens = self.usage.cached_tokens,
            ttft_ms = ttft_ms.map(|t| format!("{t:.1}")).unwrap_or_else(|| "-".into()),
            duration_ms = format!("{:.1}", duration.as_secs_f64() * 1e3),
            finish = %finish.join(","),
            "request"
        );
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        // The client went away before the end: the forwarding threads cancel the requests.
        self.log("client disconnected");
    }
}
