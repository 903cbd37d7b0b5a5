//! From the engine's blocking event channel to the async handlers, with the per-request
//! bookkeeping: latency histograms, the request's log line, and cancellation when the
//! consumer goes away.
//!
//! Cancellation: the consumer of a request's events holds an [`Events`]; dropping it before
//! the last event cancels the engine requests at once (their rows leave the batch at the
//! engine's next step). A non-streamed answer's `Events` lives in the handler future, which
//! hyper drops when the client closes the connection: while a handler is pending, hyper's
//! HTTP/1 dispatcher keeps reading the socket and treats EOF or a reset as the end of the
//! connection (half-close is off, axum's default). A streamed answer's `Events` lives in the
//! task feeding the SSE body, which ends when the body (dropped with the connection) stops
//! taking chunks. The forwarding threads also cancel when their channel closes (checked
//! every [`POLL`]), a second line of defence.

use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use zaya_engine::{Canceller, Event, RequestHandle, Usage};

use crate::AppState;

/// How often a forwarding thread with nothing to forward checks that its consumer is alive.
const POLL: Duration = Duration::from_millis(50);

/// One engine event, tagged with the engine request it came from (a completion request with
/// several prompts submits several).
pub type Tagged = (usize, Event);

/// The events of one HTTP request's engine requests, in arrival order. Dropping it before
/// each engine request's last event (`Done` or `Error`) cancels the unfinished ones.
pub struct Events {
    rx: mpsc::UnboundedReceiver<Tagged>,
    /// `None` once that engine request has sent its last event.
    running: Vec<Option<Canceller>>,
}

impl Events {
    pub async fn recv(&mut self) -> Option<Tagged> {
        let ev = self.rx.recv().await?;
        if matches!(ev.1, Event::Done { .. } | Event::Error { .. }) {
            if let Some(slot) = self.running.get_mut(ev.0) {
                *slot = None;
            }
        }
        Some(ev)
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        for c in self.running.iter().flatten() {
            c.cancel();
        }
    }
}

/// Moves each handle's events onto one async channel (a blocking thread per handle, so the
/// engine's std channel never blocks the runtime).
pub fn forward(handles: Vec<RequestHandle>) -> Events {
    let (tx, rx) = mpsc::unbounded_channel();
    let running = handles.iter().map(|h| Some(h.canceller())).collect();
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
    Events { rx, running }
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
        if self.logged {
            return;
        }
        // The client went away before the end (dropping `Events` cancelled the engine
        // requests): the unfinished choices are aborted.
        for f in self.finish.iter_mut().filter(|f| f.is_none()) {
            *f = Some("abort");
        }
        self.log("client disconnected");
    }
}
