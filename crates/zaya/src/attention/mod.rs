//! The attention core (scores, mask, softmax, weighted values) behind one interface, so that
//! backends can be swapped without touching the model. `eager` is the reference: it
//! materialises the probabilities (the only backend that can return them). `sdpa` and
//! `flex` run the fused tiled engine (`tiled.rs`): same function, memory `O(tile)` instead
//! of `O(T·N)`, fully masked key tiles skipped, and a fused backward for training.

use candle_core::{DType, Device, Result, Tensor};

use crate::kernels;

pub mod flex;
pub mod sdpa;
mod tiled;

pub use flex::{
    dense_reference, flex_attention, flex_attention_with, BlockMask, MaskMod, ScoreMod,
};
pub use sdpa::sdpa;
pub use tiled::{TileKind, TILE};

/// Which attention backend computes the core (`attn_implementation`). All compute the same
/// function; only `eager` returns the probabilities (asking another backend for them runs
/// `eager` for that call). The default is `sdpa`, the fastest: 5–6× eager's forward and
/// backward at 256–512 tokens, within a few microseconds of it at one token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttnImplementation {
    /// Reference: materialises scores and probabilities.
    Eager,
    /// Fused, memory-efficient (tiled online softmax).
    #[default]
    Sdpa,
    /// FlexAttention-style block-sparse backend.
    Flex,
}

impl AttnImplementation {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "eager" => Some(Self::Eager),
            "sdpa" => Some(Self::Sdpa),
            "flex" | "flex_attention" => Some(Self::Flex),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Eager => "eager",
            Self::Sdpa => "sdpa",
            Self::Flex => "flex",
        }
    }
}

/// Computes attention with `backend`. Probabilities are only available from `eager`;
/// asking another backend for them falls back to `eager` for that call. All three are
/// differentiable.
pub fn attend(
    backend: AttnImplementation,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &MaskSpec,
    scale: f64,
    want_probs: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    match backend {
        AttnImplementation::Eager => eager(q, k, v, mask, scale, want_probs),
        _ if want_probs => eager(q, k, v, mask, scale, want_probs),
        AttnImplementation::Sdpa => Ok((sdpa::sdpa(q, k, v, mask, scale)?, None)),
        AttnImplementation::Flex => Ok((flex::attend_spec(q, k, v, mask, scale)?, None)),
    }
}

/// Which keys each query may see. Indices are *sequence* indices (cache slots), not
/// `position_ids` values: query `t` of the call sits at `q_start + t`, key `j` of the
/// concatenated `[cache ; new]` keys at `kv_start + j`.
#[derive(Debug, Clone)]
pub struct MaskSpec {
    pub batch: usize,
    pub q_start: usize,
    pub q_len: usize,
    pub kv_start: usize,
    pub kv_len: usize,
    /// Total window `W` including the query itself (`q − W < k ≤ q`), for sliding layers.
    pub window: Option<usize>,
    /// Per row, `true` for real tokens, indexed by sequence index `0..q_start + q_len`.
    pub key_padding: Option<Vec<Vec<bool>>>,
    /// Packed sequences: per row, the document of each sequence index; no attention across
    /// documents.
    pub documents: Option<Vec<Vec<u32>>>,
}

impl MaskSpec {
    #[inline]
    pub fn allowed(&self, b: usize, q: usize, k: usize) -> bool {
        let qi = self.q_start + q;
        let ki = self.kv_start + k;
        if ki > qi {
            return false;
        }
        if let Some(w) = self.window {
            if ki + w <= qi {
                return false;
            }
        }
        if let Some(d) = &self.documents {
            if d[b][ki] != d[b][qi] {
                return false;
            }
        }
        match &self.key_padding {
            Some(p) => p[b].get(ki).copied().unwrap_or(true),
            None => true,
        }
    }

    /// The additive mask of the reference: 0 where allowed, `f32::MIN` elsewhere
    /// (`[B, 1, q_len, kv_len]`, f32). A fully masked row then becomes a uniform average,
    /// exactly as the reference's eager attention does.
    pub fn additive(&self, dev: &Device) -> Result<Tensor> {
        let mut data = Vec::with_capacity(self.batch * self.q_len * self.kv_len);
        for b in 0..self.batch {
            for q in 0..self.q_len {
                for k in 0..self.kv_len {
                    data.push(if self.allowed(b, q, k) {
                        0f32
                    } else {
                        f32::MIN
                    });
                }
            }
        }
        Tensor::from_vec(data, (self.batch, 1, self.q_len, self.kv_len), dev)
    }
}

/// Repeats each KV head `n_rep` times: `[B, Nkv, N, D]` → `[B, Nkv·n_rep, N, D]`.
pub fn repeat_kv(x: &Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x.clone());
    }
    let (b, h, n, d) = x.dims4()?;
    x.unsqueeze(2)?
        .broadcast_as((b, h, n_rep, n, d))?
        .reshape((b, h * n_rep, n, d))
}

/// Reference attention. `q` `[B, Nq, T, D]`, `k`/`v` `[B, Nkv, N, D]`. Returns the output
/// `[B, Nq, T, D]` and, if asked, the probabilities `[B, Nq, T, N]`.
///
/// GQA without copying K/V per query head: the `G` query heads of a KV head are stacked
/// along the time axis (`[B, Nkv, G·T, D]`), so each KV head is read once per matmul.
pub fn eager(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &MaskSpec,
    scale: f64,
    want_probs: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let (b, nq, t, d) = q.dims4()?;
    let (_, nkv, n, _) = k.dims4()?;
    let g = nq / nkv;
    let qg = q.contiguous()?.reshape((b, nkv, g * t, d))?;
    let scores = (qg.matmul(&k.contiguous()?.transpose(2, 3)?)? * scale)?;
    let scores = scores
        .to_dtype(DType::F32)?
        .reshape((b, nkv, g, t, n))?
        .broadcast_add(&mask.additive(q.device())?.unsqueeze(1)?)?;
    let probs = kernels::softmax_f32(&scores)?.to_dtype(q.dtype())?;
    let out = probs
        .reshape((b, nkv, g * t, n))?
        .matmul(&v.contiguous()?)?
        .reshape((b, nq, t, d))?;
    let probs = if want_probs {
        Some(probs.reshape((b, nq, t, n))?)
    } else {
        None
    };
    Ok((out, probs))
}

/// Number of keys a query row may see (used by tests and by backends to skip work).
pub fn visible_keys(mask: &MaskSpec, b: usize, q: usize) -> usize {
    (0..mask.kv_len).filter(|&k| mask.allowed(b, q, k)).count()
}
