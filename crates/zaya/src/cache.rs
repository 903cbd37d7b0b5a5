//! The hybrid cache: per layer, the attention K/V (trimmed to the window on sliding layers),
//! the CCA conv history and the delayed-value state. It is a plain value owned by the caller
//! and passed into each forward call; the model itself stays immutable. Rows (sequences) are
//! separable so a scheduler can batch, split and reorder them.

use candle_core::{Result, Tensor};

use crate::config::{LayerType, ZayaConfig};

#[derive(Debug, Clone)]
pub struct LayerCache {
    /// `[B, Nkv, N, D]`: QK-normed, temp-scaled, RoPE-rotated keys.
    pub keys: Option<Tensor>,
    /// `[B, Nkv, N, D]`.
    pub values: Option<Tensor>,
    /// `[B, S, C]`: raw q|k projections of the last `S` tokens, oldest first (time-major).
    pub conv_state: Option<Tensor>,
    /// `[B, Nkv·D/2]`: delayed-value projection of the last token.
    pub recurrent_state: Option<Tensor>,
    /// Tokens processed so far (sequence index of the next token).
    pub seen: usize,
    /// Sliding layers keep `W − 1` keys after each update.
    window: Option<usize>,
}

impl LayerCache {
    fn new(window: Option<usize>) -> Self {
        LayerCache {
            keys: None,
            values: None,
            conv_state: None,
            recurrent_state: None,
            seen: 0,
            window,
        }
    }

    pub fn has_previous_state(&self) -> bool {
        self.conv_state.is_some()
    }

    /// Number of keys held (≤ `seen`; smaller on sliding layers).
    pub fn kv_len(&self) -> usize {
        self.keys.as_ref().map_or(0, |k| k.dim(2).unwrap_or(0))
    }

    /// Appends this call's keys/values and returns the keys/values the call attends over
    /// (`[kept cache ; new]`); then trims what is stored to the window.
    pub fn update_kv(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let t = k.dim(2)?;
        let (k_all, v_all) = match (&self.keys, &self.values) {
            (Some(pk), Some(pv)) => (Tensor::cat(&[pk, k], 2)?, Tensor::cat(&[pv, v], 2)?),
            _ => (k.clone(), v.clone()),
        };
        let n = k_all.dim(2)?;
        let keep = match self.window {
            Some(w) => n.min(w.saturating_sub(1)),
            None => n,
        };
        if keep < n {
            self.keys = Some(k_all.narrow(2, n - keep, keep)?.contiguous()?);
            self.values = Some(v_all.narrow(2, n - keep, keep)?.contiguous()?);
        } else {
            self.keys = Some(k_all.clone());
            self.values = Some(v_all.clone());
        }
        self.seen += t;
        Ok((k_all, v_all))
    }

    fn select_rows(&self, rows: &Tensor) -> Result<Self> {
        let pick = |t: &Option<Tensor>| -> Result<Option<Tensor>> {
            t.as_ref().map(|t| t.index_select(rows, 0)).transpose()
        };
        Ok(LayerCache {
            keys: pick(&self.keys)?,
            values: pick(&self.values)?,
            conv_state: pick(&self.conv_state)?,
            recurrent_state: pick(&self.recurrent_state)?,
            seen: self.seen,
            window: self.window,
        })
    }
}

/// One [`LayerCache`] per decoder layer.
#[derive(Debug, Clone)]
pub struct HybridCache {
    pub layers: Vec<LayerCache>,
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

    /// Tokens already processed (the reference's `get_seq_length`, from layer 0).
    pub fn seq_len(&self) -> usize {
        self.layers.first().map_or(0, |l| l.seen)
    }

    /// Keys held by the first layer of `layer_type` (what that type's mask must cover).
    pub fn kv_len_of(&self, cfg: &ZayaConfig, layer_type: LayerType) -> usize {
        cfg.layer_types
            .iter()
            .position(|t| *t == layer_type)
            .map_or(0, |i| self.layers[i].kv_len())
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
            .find_map(|l| l.keys.as_ref().map(|k| k.device().clone()))
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
