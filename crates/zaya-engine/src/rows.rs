//! The model side of the engine: what the step loop needs from a model ([`EngineModel`]: a
//! row's state and the forwards over rows, prompt pieces and one-token decodes), and its
//! implementation for one [`ZayaModel`] on this process. A model split over ranks
//! (`zaya_dist::serve::MeshModel`) implements the same trait, so the engine, its scheduler and
//! its prefix cache do not know how many ranks compute a row.

use candle_core::{DType, Tensor};
use zaya::attention::AttnImplementation;
use zaya::{ForwardOptions, HybridCache, ZayaConfig, ZayaModel};

/// The model state of one sequence (one row of the running batch), as the engine holds it:
/// the engine forks it (prefix-cache snapshots, `n > 1` choices) and drops it when the row
/// ends or a snapshot is evicted; an implementation that keeps state elsewhere (other ranks)
/// frees it there when the row is dropped.
#[allow(clippy::len_without_is_empty)]
pub trait EngineRow: Send + Sized + 'static {
    type Error: std::error::Error + Send + Sync + 'static;
    /// An independent copy: later updates of either never show in the other.
    fn fork(&self) -> Result<Self, Self::Error>;
    /// Tokens processed.
    fn len(&self) -> usize;
    /// Bytes of tensor data held (on this process).
    fn bytes(&self) -> usize;
}

/// What the engine's step loop runs a model with. `prefill` and `decode` must be
/// deterministic per row: a row's logits may not depend on the other rows of a `decode` call
/// (the engine's batch invariance and prefix-cache exactness rest on it).
pub trait EngineModel: Send + Sync + 'static {
    type Row: EngineRow;
    /// The model's config (vocabulary and context bound the requests).
    fn model_config(&self) -> &ZayaConfig;
    /// Why the model can no longer run (a failed rank of a split model), if so: what a
    /// health check reports. Must not wait for a running step.
    fn unavailable(&self) -> Option<String> {
        None
    }
    /// Whether the engine may run its steps on the kernel pool
    /// ([`zaya::kernels::run_in_pool`]). `false` for a model whose forward waits on other
    /// threads that use the pool too (ranks of a local mesh in collectives): a step started
    /// by a pool thread in the middle of another rank's kernel sits on top of that kernel,
    /// which then cannot finish while the step waits for its rank — a deadlock.
    fn steps_in_kernel_pool(&self) -> bool {
        true
    }
    /// An empty row.
    fn new_row(&self) -> Self::Row;
    /// Feeds `tokens` after the row's state; returns the logits of the last one.
    fn prefill(
        &self,
        row: &mut Self::Row,
        tokens: &[u32],
        attn: AttnImplementation,
    ) -> Result<Vec<f32>, <Self::Row as EngineRow>::Error>;
    /// One token for each row; returns each row's logits.
    fn decode(
        &self,
        rows: &mut [&mut Self::Row],
        tokens: &[u32],
        attn: AttnImplementation,
    ) -> Result<Vec<Vec<f32>>, <Self::Row as EngineRow>::Error>;
}

/// The model state of one sequence on a single [`ZayaModel`].
#[derive(Debug)]
pub struct RowState {
    cache: HybridCache,
}

impl EngineRow for RowState {
    type Error = zaya::ZayaError;

    fn fork(&self) -> zaya::Result<Self> {
        Ok(RowState {
            cache: self.cache.fork()?,
        })
    }

    fn len(&self) -> usize {
        self.cache.seq_len()
    }

    fn bytes(&self) -> usize {
        self.cache.bytes()
    }
}

/// The logits of the last position of `[B, T, V]` logits, as f32.
pub fn last_logits(logits: Option<Tensor>) -> zaya::Result<Vec<f32>> {
    let l =
        logits.ok_or_else(|| zaya::ZayaError::Input("the forward returned no logits".into()))?;
    let (_, t, _) = l.dims3()?;
    Ok(l.narrow(1, t - 1, 1)?
        .flatten_all()?
        .to_dtype(DType::F32)?
        .to_vec1()?)
}

impl EngineModel for ZayaModel {
    type Row = RowState;

    fn model_config(&self) -> &ZayaConfig {
        self.config()
    }

    fn new_row(&self) -> RowState {
        RowState {
            cache: HybridCache::new(self.config()),
        }
    }

    fn prefill(
        &self,
        row: &mut RowState,
        tokens: &[u32],
        attn: AttnImplementation,
    ) -> zaya::Result<Vec<f32>> {
        let ids = Tensor::new(tokens, self.device())?.unsqueeze(0)?;
        let opts = ForwardOptions {
            logits_to_keep: 1,
            attn,
            ..Default::default()
        };
        let out = self.forward(&ids, Some(&mut row.cache), &opts)?;
        last_logits(out.logits)
    }

    /// Rows run batched in groups of [`ZayaModel::INVARIANT_DECODE_ROWS`], the size up to
    /// which a row's result is bit-identical to running it alone (so what else is in the
    /// batch never changes a request's tokens).
    fn decode(
        &self,
        rows: &mut [&mut RowState],
        tokens: &[u32],
        attn: AttnImplementation,
    ) -> zaya::Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(tokens.len());
        let group = ZayaModel::INVARIANT_DECODE_ROWS.max(1);
        for (rows, toks) in rows.chunks_mut(group).zip(tokens.chunks(group)) {
            let mut caches: Vec<&mut HybridCache> = rows.iter_mut().map(|r| &mut r.cache).collect();
            let logits = self.decode_rows(toks, &mut caches, attn)?;
            out.extend(logits.to_dtype(DType::F32)?.to_vec2::<f32>()?);
        }
        Ok(out)
    }
}
