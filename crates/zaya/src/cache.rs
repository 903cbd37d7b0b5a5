//! The hybrid cache: per layer, the attention K/V (trimmed to the window on sliding layers),
//! the CCA conv history and the delayed-value state. It is a plain value owned by the caller
//! and passed into each forward call; the model itself stays immutable. Rows (sequences) are
//! separable so a scheduler can batch, split and reorder them.

use candle_core::{Result, Tensor};

use crate::config::{LayerType, ZayaConfig};

/// Keys and values of one layer in preallocated buffers `[B, Nkv, cap, D]`: the held keys
/// are `buf[.., start .. start + len, ..]`. Appending writes into the free tail (growing the
/// buffer by doubling when full), so a decode step copies only its own token; a sliding layer
/// moves its window forward by advancing `start` and compacts when the tail runs out (every
/// ~window tokens), so both cost amortised O(1) copies per token.
#[derive(Debug)]
struct KvBuffer {
    keys: Tensor,
    values: Tensor,
    start: usize,
    len: usize,
}

impl KvBuffer {
    fn cap(&self) -> usize {
        self.keys.dim(2).unwrap_or(0)
    }

    fn held(&self) -> Result<(Tensor, Tensor)> {
        Ok((
            self.keys.narrow(2, self.start, self.len)?,
            self.values.narrow(2, self.start, self.len)?,
        ))
    }

    /// A buffer of capacity `cap` holding `keys`/`values` (contiguous copies) at the front.
    fn with_capacity(keys: &Tensor, values: &Tensor, cap: usize) -> Result<Self> {
        let (b, h, n, d) = keys.dims4()?;
        let alloc = |src: &Tensor| -> Result<Tensor> {
            let buf = Tensor::zeros((b, h, cap, d), src.dtype(), src.device())?;
            if n > 0 {
                buf.slice_set(&src.contiguous()?, 2, 0)?;
            }
            Ok(buf)
        };
        Ok(KvBuffer {
            keys: alloc(keys)?,
            values: alloc(values)?,
            start: 0,
            len: n,
        })
    }

    /// An independent copy holding just the held keys (what a fork or snapshot keeps).
    fn deep_copy(&self) -> Result<Self> {
        let (k, v) = self.held()?;
        KvBuffer::with_capacity(&k, &v, self.len)
    }
}

/// One layer's part of the hybrid cache. The fields are private so that what is held always
/// agrees with `seen` (held ≤ seen, at most `W − 1` keys on sliding layers).
#[derive(Debug)]
pub struct LayerCache {
    kv: Option<KvBuffer>,
    /// `[B, S, C]`: raw q|k projections of the last `S` tokens, oldest first (time-major).
    conv_state: Option<Tensor>,
    /// `[B, Nkv·D/2]`: delayed-value projection of the last token.
    recurrent_state: Option<Tensor>,
    /// Tokens processed so far (sequence index of the next token).
    seen: usize,
    /// Sliding layers keep `W − 1` keys after each update.
    window: Option<usize>,
}

impl LayerCache {
    /// An independent copy: the buffers are copied (appends write in place), the CCA
    /// tensors shared (they are replaced, never written).
    fn fork(&self) -> Result<Self> {
        Ok(LayerCache {
            kv: self.kv.as_ref().map(KvBuffer::deep_copy).transpose()?,
            conv_state: self.conv_state.clone(),
            recurrent_state: self.recurrent_state.clone(),
            seen: self.seen,
            window: self.window,
        })
    }

    fn new(window: Option<usize>) -> Self {
        LayerCache {
            kv: None,
            conv_state: None,
            recurrent_state: None,
            seen: 0,
            window,
        }
    }

    pub fn has_previous_state(&self) -> bool {
        self.conv_state.is_some()
    }

    /// Tokens processed so far.
    pub fn seen(&self) -> usize {
        self.seen
    }

    /// `[B, Nkv, N, D]`: QK-normed, temp-scaled, RoPE-rotated keys held (a view).
    pub fn keys(&self) -> Option<Tensor> {
        self.kv
            .as_ref()
            .and_then(|kv| kv.held().ok())
            .map(|(k, _)| k)
    }

    /// `[B, Nkv, N, D]` values held (a view).
    pub fn values(&self) -> Option<Tensor> {
        self.kv
            .as_ref()
            .and_then(|kv| kv.held().ok())
            .map(|(_, v)| v)
    }

    /// `[B, S, C]` conv history.
    pub fn conv_state(&self) -> Option<&Tensor> {
        self.conv_state.as_ref()
    }

    /// `[B, Nkv·D/2]` delayed value of the last token.
    pub fn recurrent_state(&self) -> Option<&Tensor> {
        self.recurrent_state.as_ref()
    }

    /// Stores the CCA state after a call (the projection owns its layout; a tensor-parallel
    /// rank stores the channels and delayed values of its own heads).
    pub fn set_cca_state(&mut self, conv: Tensor, recurrent: Tensor) {
        self.conv_state = Some(conv);
        self.recurrent_state = Some(recurrent);
    }

    /// Number of keys held (≤ `seen`; smaller on sliding layers).
    pub fn kv_len(&self) -> usize {
        self.kv.as_ref().map_or(0, |kv| kv.len)
    }

    /// Rows of the batch this cache holds (0 before the first update).
    pub fn batch(&self) -> usize {
        self.kv.as_ref().map_or(0, |kv| kv.keys.dim(0).unwrap_or(0))
    }

    /// Bytes of the held state (keys, values, conv history, delayed value).
    pub fn bytes(&self) -> usize {
        let t = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let kv = self.kv.as_ref().map_or(0, |kv| {
            let per = kv.keys.elem_count() / kv.cap().max(1) * kv.keys.dtype().size_in_bytes();
            2 * per * kv.len
        });
        kv + self.conv_state.as_ref().map_or(0, t) + self.recurrent_state.as_ref().map_or(0, t)
    }

    /// Appends this call's keys/values and returns the keys/values the call attends over
    /// (`[kept cache ; new]`); then trims what is held to the window.
    pub fn update_kv(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let t = k.dim(2)?;
        if k.track_op() || v.track_op() {
            // Recording gradients: keep the graph through a concatenation (no in-place writes).
            let (k_all, v_all) = match self.kv.as_ref() {
                Some(kv) => {
                    let (pk, pv) = kv.held()?;
                    (Tensor::cat(&[&pk, k], 2)?, Tensor::cat(&[&pv, v], 2)?)
                }
                None => (k.clone(), v.clone()),
            };
            let n = k_all.dim(2)?;
            self.kv = Some(KvBuffer {
                keys: k_all.clone(),
                values: v_all.clone(),
                start: 0,
                len: n,
            });
            self.trim();
            self.seen += t;
            return Ok((k_all, v_all));
        }
        let kv = match self.kv.take() {
            Some(kv) if kv.start + kv.len + t <= kv.cap() => kv,
            Some(kv) => {
                // Out of tail room: move what is held to the front of a buffer with room for
                // as much again (doubling for full layers; ~2 windows for sliding ones).
                let (hk, hv) = kv.held()?;
                let cap = (2 * (kv.len + t)).max(16);
                KvBuffer::with_capacity(&hk, &hv, cap)?
            }
            None => {
                let (b, h, _, d) = k.dims4()?;
                let empty = Tensor::zeros((b, h, 0, d), k.dtype(), k.device())?;
                KvBuffer::with_capacity(&empty, &empty, (2 * t).max(16))?
            }
        };
        let at = kv.start + kv.len;
        kv.keys.slice_set(&k.contiguous()?, 2, at)?;
        kv.values.slice_set(&v.contiguous()?, 2, at)?;
        let mut kv = kv;
        kv.len += t;
        let out = kv.held()?;
        self.kv = Some(kv);
        self.trim();
        self.seen += t;
        Ok(out)
    }

    fn trim(&mut self) {
        if let (Some(w), Some(kv)) = (self.window, self.kv.as_mut()) {
            let keep = kv.len.min(w.saturating_sub(1));
            kv.start += kv.len - keep;
            kv.len = keep;
        }
    }

    fn select_rows(&self, rows: &Tensor) -> Result<Self> {
        let pick = |t: &Option<Tensor>| -> Result<Option<Tensor>> {
            t.as_ref().map(|t| t.index_select(rows, 0)).transpose()
        };
        let kv = match self.kv.as_ref() {
            Some(kv) => {
                let (k, v) = kv.held()?;
                let (k, v) = (k.index_select(rows, 0)?, v.index_select(rows, 0)?);
                Some(KvBuffer::with_capacity(&k, &v, kv.len)?)
            }
            None => None,
        };
        Ok(LayerCache {
            kv,
            conv_state: pick(&self.conv_state)?,
            recurrent_state: pick(&self.recurrent_state)?,
            seen: self.seen,
            window: self.window,
        })
    }
}

/// One [`LayerCache`] per decoder layer. Not `Clone`: [`fork`](Self::fork) makes an
/// independent copy (the key/value buffers are written in place).
#[derive(Debug)]
pub struct HybridCache {
    layers: Vec<LayerCache>,
}

impl HybridCache {
    pub fn new(cfg: &ZayaConfig) -> Self {
        let layers = cfg
            .layer_types
            .iter()
            .map(|t| {
                LayerCache::new(match t {
                    LayerType::Hybrid => None,
                    LayerType::HybridSliding => cfg.sliding_window,
                })
            })
            .collect();
        HybridCache { layers }
    }

    /// Checks that this cache was made for a model of `cfg`'s layout (layer count and
    /// windows), so a cache of another model is an error instead of an out-of-bounds index.
    pub fn check(&self, cfg: &ZayaConfig) -> crate::Result<()> {
        let fresh = HybridCache::new(cfg);
        if self.layers.len() != fresh.layers.len() {
            return Err(crate::ZayaError::Input(format!(
                "cache has {} layers but the model has {}: it was made for another config",
                self.layers.len(),
                fresh.layers.len()
            )));
        }
        for (i, (a, b)) in self.layers.iter().zip(&fresh.layers).enumerate() {
            if a.window != b.window {
                return Err(crate::ZayaError::Input(format!(
                    "cache layer {i} has window {:?} but the model's layer {i} has {:?}: it was made for another config",
                    a.window, b.window
                )));
            }
            if a.seen != self.layers[0].seen {
                return Err(crate::ZayaError::Input(format!(
                    "cache layer {i} has seen {} tokens but layer 0 {}: the cache is inconsistent (an earlier call failed midway?)",
                    a.seen, self.layers[0].seen
                )));
            }
        }
        Ok(())
    }

    pub fn layers(&self) -> &[LayerCache] {
        &self.layers
    }

    /// Layer `idx`'s cache (rank-sharded layers drive their caches themselves).
    pub fn layer_mut(&mut self, idx: usize) -> Option<&mut LayerCache> {
        self.layers.get_mut(idx)
    }

    /// An independent copy (a snapshot for prefix reuse, or a row forked for `n > 1`).
    pub fn fork(&self) -> Result<Self> {
        Ok(HybridCache {
            layers: self
                .layers
                .iter()
                .map(LayerCache::fork)
                .collect::<Result<_>>()?,
        })
    }

    /// Bytes of the held state over all layers.
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(LayerCache::bytes).sum()
    }

    /// Tokens already processed (the reference's `get_seq_length`, from layer 0).
    pub fn seq_len(&self) -> usize {
        self.layers.first().map_or(0, |l| l.seen)
    }

    /// Keys held by the first layer of `layer_type` (what that type's mask must cover).
    pub fn kv_len_of(&self, cfg: &ZayaConfig, layer_type: LayerType) -> usize {
        cfg.layer_types
            .iter()
            .position(|t| *t == layer_type)
            .and_then(|i| self.layers.get(i))
            .map_or(0, LayerCache::kv_len)
    }

    pub fn reset(&mut self) {
        for l in &mut self.layers {
            *l = LayerCache::new(l.window);
        }
    }

    /// A cache holding only the given batch rows, in that order (beam reordering, dropping
    /// finished sequences).
    pub fn select_rows(&self, rows: &[u32]) -> Result<Self> {
        let dev = self
            .layers
            .iter()
            .find_map(|l| l.kv.as_ref().map(|kv| kv.keys.device().clone()))
            .unwrap_or(candle_core::Device::Cpu);
        let idx = Tensor::new(rows, &dev)?;
        Ok(HybridCache {
            layers: self
                .layers
                .iter()
                .map(|l| l.select_rows(&idx))
                .collect::<Result<_>>()?,
        })
    }
}
