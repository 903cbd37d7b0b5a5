//! `zaya serve`: an OpenAI-compatible HTTP server (axum + tokio) in front of the
//! continuous-batching engine of `zaya-engine`. The engine runs on its own thread; handlers
//! only validate, template, submit and translate events, so the async runtime never runs
//! the model.
//!
//! Routes: `GET /health`, `GET /v1/models`, `POST /v1/chat/completions`,
//! `POST /v1/completions`, `GET /metrics` (Prometheus), `POST /tokenize`, `POST /detokenize`.

pub mod error;
mod events;
pub mod grammar;
mod handlers;
pub mod metrics;
pub mod protocol;
pub mod tool_stream;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use zaya::text::ZayaTokenizer;
use zaya_engine::Engine;

pub use error::ApiError;

/// What `zaya serve` was asked for, apart from the engine.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub host: String,
    pub port: u16,
    /// Clients must send `Authorization: Bearer KEY` (all routes but /health and /metrics).
    pub api_key: Option<String>,
    pub served_model_name: String,
    /// After SIGTERM / ctrl-c, in-flight requests may finish for this long; then they are
    /// cancelled.
    pub drain_timeout: Duration,
}

/// Shared by every handler.
pub struct AppState {
    pub engine: Engine,
    pub tokenizer: Arc<ZayaTokenizer>,
    /// `None` when llguidance cannot read the tokenizer (constrained requests then get a 400
    /// saying why).
    pub grammars: Result<grammar::GrammarCompiler, String>,
    pub config: ServerConfig,
    pub metrics: metrics::ServerMetrics,
    /// End-of-answer ids (tokenizer files + model config).
    pub stop_ids: Vec<u32>,
    /// The model's context (max_position_embeddings).
    pub context: usize,
    pub vocab_size: usize,
    pub created: u64,
    next_id: AtomicU64,
    shutting_down: AtomicBool,
}

impl AppState {
    pub fn new(engine: Engine, tokenizer: Arc<ZayaTokenizer>, config: ServerConfig) -> Self {
        let cfg = engine.model_config().clone();
        let stop_ids = tokenizer.stop_token_ids(&cfg.eos_token_id);
        let eos = tokenizer
            .eos_token_id()
            .or_else(|| stop_ids.first().copied())
            .unwrap_or(0);
        let grammars = grammar::GrammarCompiler::new(&tokenizer, cfg.vocab_size, eos);
        if let Err(e) = &grammars {
            tracing::warn!("constrained decoding unavailable: {e}");
        }
        AppState {
            stop_ids,
            context: cfg.max_position_embeddings,
            vocab_size: cfg.vocab_size,
            engine,
            tokenizer,
            grammars,
            config,
            metrics: metrics::ServerMetrics::default(),
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            next_id: AtomicU64::new(1),
            shutting_down: AtomicBool::new(false),
        }
    }

    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    handlers::router(state)
}

/// Serves until `shutdown` resolves, then stops accepting, lets in-flight requests finish for
/// `drain_timeout`, cancels the rest and stops the engine.
pub async fn serve(
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let addr: SocketAddr = format!("{}:{}", state.config.host, state.config.port)
        .parse()
        .map_err(|e| {
            anyhow::anyhow!(
                "bad --host/--port {}:{}: {e}",
                state.config.host,
                state.config.port
            )
        })?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
    let local = listener.local_addr()?;
    // The test harness and scripts wait for this line.
    eprintln!(
        "zaya serve: listening on http://{local} (model `{}`)",
        state.config.served_model_name
    );
    tracing::info!("listening on http://{local}");

    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let st = state.clone();
    tokio::spawn(async move {
        shutdown.await;
        st.shutting_down.store(true, Ordering::SeqCst);
        eprintln!("zaya serve: shutting down (draining in-flight requests)");
        let _ = stop_tx.send(true);
    });
    let mut graceful_rx = stop_rx.clone();
    let server = axum::serve(listener, router(state.clone())).with_graceful_shutdown(async move {
        let _ = graceful_rx.wait_for(|s| *s).await;
    });
    let server = tokio::spawn(async move { server.await });
    let _ = stop_rx.wait_for(|s| *s).await;
    let drained = tokio::time::timeout(state.config.drain_timeout, async {
        loop {
            let m = state.engine.metrics();
            if m.running == 0 && m.waiting == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .is_ok();
    // Cancels what is left (their streams end) and joins the engine thread.
    let engine = state.engine.clone();
    tokio::task::spawn_blocking(move || engine.shutdown(drained)).await?;
    match tokio::time::timeout(Duration::from_secs(5), server).await {
        Ok(r) => r??,
        Err(_) => tracing::warn!("connections still open after shutdown; exiting anyway"),
    }
    eprintln!("zaya serve: stopped");
    Ok(())
}

/// Resolves on ctrl-c or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
