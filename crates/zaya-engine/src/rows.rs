//! The model side of the engine: a row's state and the forwards the step loop runs over
//! rows (prompt pieces and one-token decodes).

use candle_core::{DType, Tensor};
use zaya::attention::AttnImplementation;
use zaya::{ForwardOptions, HybridCache, ZayaModel};

/// The model state of one sequence (one row of the running batch).
#[derive(Debug)]
#[allow(clippy::len_without_is_empty)]
pub struct RowState {
    cache: HybridCache,
}

impl RowState {
    pub fn new(model: &ZayaModel) -> Self {
        RowState {
            cache: HybridCache::new(model.config()),
        }
    }

    /// An independent copy (what a snapshot or an `n > 1` fork needs): later updates of
    /// either never show in the other.
    pub fn fork(&self) -> zaya::Result<Self> {
        Ok(RowState {
            cache: self.cache.fork()?,
        })
    }

    /// Tokens processed.
    pub fn len(&self) -> usize {
        self.cache.seq_len()
    }

    /// Bytes of tensor data held.
    pub fn bytes(&self) -> usize {
        self.cache.bytes()
    }
}

fn last_logits(logits: Option<Tensor>) -> zaya::Result<Vec<f32>> {
    let l =
        logits.ok_or_else(|| zaya::ZayaError::Input("the forward returned no logits".into()))?;
    let (_, t, _) = l.dims3()?;
    Ok(l.narrow(1, t - 1, 1)?
        .flatten_all()?
        .to_dtype(DType::F32)?
        .to_vec1()?)
}

/// Feeds `tokens` after the row's state; returns the logits of the last one.
pub fn prefill(
    model: &ZayaModel,
    state: &mut RowState,
    tokens: &[u32],
    attn: AttnImplementation,
) -> zaya::Result<Vec<f32>> {
    let ids = Tensor::new(tokens, model.device())?.unsqueeze(0)?;
    let opts = ForwardOptions {
        logits_to_keep: 1,
        attn,
        ..Default::default()
    };
    let out = model.forward(&ids, Some(&mut state.cache), &opts)?;
    last_logits(out.logits)
}

/// One token for each row; returns each row's logits. Rows run batched in groups of
/// [`ZayaModel::INVARIANT_DECODE_ROWS`], the size up to which a row's result is bit-identical
/// to running it alone (so what else is in the batch never changes a request's tokens).
pub fn decode(
    model: &ZayaModel,
    states: &mut [&mut RowState],
    tokens: &[u32],
    attn: AttnImplementation,
) -> zaya::Result<Vec<Vec<f32>>> {
    let mut out = Vec::with_capacity(tokens.len());
    let group = ZayaModel::INVARIANT_DECODE_ROWS.max(1);
    for (rows, toks) in states.chunks_mut(group).zip(tokens.chunks(group)) {
        let mut caches: Vec<&mut HybridCache> = rows.iter_mut().map(|r| &mut r.cache).collect();
        let logits = model.decode_rows(toks, &mut caches, attn)?;
        out.extend(logits.to_dtype(DType::F32)?.to_vec2::<f32>()?);
    }
    Ok(out)
}
