//! The `sdpa` backend: fused memory-efficient attention (the tiled engine in `tiled.rs`)
//! driven directly by a [`MaskSpec`]. Tiles are classified analytically from the causal
//! bound, the sliding window and the key padding, so masked-out key tiles (beyond the
//! diagonal, behind the window, all padding) cost nothing and fully visible tiles need no
//! mask evaluation. Works for prefill, chunked prefill (`q_start > 0`, `kv_start > 0` for
//! trimmed sliding caches) and decode (`T = 1`).
//!
//! Training: the op has a fused backward (FlashAttention-2 recomputation from the saved
//! log-sum-exp), checked against the eager reference's gradients, so the training path may
//! use `sdpa` as well as `eager` or `flex`.

use std::sync::Arc;

use candle_core::{Result, Tensor};

use super::tiled::{self, MaskSource, TileKind, TILE};
use super::MaskSpec;
use crate::kernels::KernelError;

/// [`MaskSpec`] as a tile mask, with the key padding per tile precomputed.
pub(crate) struct SpecMask {
    spec: MaskSpec,
    nkt: usize,
    /// Per (batch row, key tile): (some key is padding, every key is padding).
    pad: Vec<(bool, bool)>,
}

impl SpecMask {
    pub(crate) fn new(spec: &MaskSpec) -> Result<SpecMask> {
        // Exhaustive on purpose: a new MaskSpec field (another way to hide keys) must be
        // taught to `tile` below, or full tiles would wrongly skip the element mask. The
        // compiler points here when one is added.
        let MaskSpec {
            batch,
            q_start: _,
            q_len: _,
            kv_start,
            kv_len,
            window: _,
            key_padding,
            documents: _,
        } = spec;
        if let Some(p) = key_padding {
            if p.len() < *batch {
                return Err(KernelError::Shape {
                    op: "sdpa",
                    message: format!("key_padding has {} rows for batch {batch}", p.len()),
                }
                .into());
            }
        }
        let nkt = kv_len.div_ceil(TILE);
        let mut pad = vec![(false, false); batch * nkt];
        if let Some(p) = key_padding {
            for (b, row) in p.iter().take(*batch).enumerate() {
                for kt in 0..nkt {
                    let keys = kt * TILE..(kt * TILE + TILE).min(*kv_len);
                    let masked = keys
                        .clone()
                        .filter(|&j| !row.get(kv_start + j).copied().unwrap_or(true))
                        .count();
                    pad[b * nkt + kt] = (masked > 0, masked == keys.len());
                }
            }
        }
        Ok(SpecMask {
            spec: spec.clone(),
            nkt,
            pad,
        })
    }
}

impl MaskSource for SpecMask {
    fn tile(&self, b: usize, _h: usize, qt: usize, kt: usize) -> TileKind {
        let s = &self.spec;
        let q_lo = s.q_start + qt * TILE;
        let q_hi = s.q_start + ((qt + 1) * TILE).min(s.q_len) - 1;
        let k_lo = s.kv_start + kt * TILE;
        let k_hi = s.kv_start + ((kt + 1) * TILE).min(s.kv_len) - 1;
        let (some_pad, all_pad) = self.pad[b * self.nkt + kt];
        // Hidden for every query of the tile: after the newest query, behind the window of
        // the oldest one, or all padding.
        let behind_window = s.window.is_some_and(|w| k_hi + w <= q_lo);
        if k_lo > q_hi || behind_window || all_pad {
            return TileKind::Empty;
        }
        let within_window = s.window.is_none_or(|w| k_lo + w > q_hi);
        // With packed documents a tile is only fully visible when every query and key of it
        // lies in one document; otherwise the element mask decides (`allowed` checks them).
        let one_document = match &s.documents {
            None => true,
            Some(d) => {
                let row = &d[b];
                let first = row[k_lo];
                (k_lo..=k_hi).chain(q_lo..=q_hi).all(|i| row[i] == first)
            }
        };
        if k_hi <= q_lo && within_window && !some_pad && one_document {
            TileKind::Full
        } else {
            TileKind::Partial
        }
    }

    fn fill(
        &self,
        b: usize,
        _h: usize,
        qt: usize,
        kt: usize,
        rows: usize,
        cols: usize,
        out: &mut [bool],
    ) {
        for r in 0..rows {
            for c in 0..cols {
                out[r * cols + c] = self.spec.allowed(b, qt * TILE + r, kt * TILE + c);
            }
        }
    }

    fn per_head(&self) -> bool {
        false
    }
}

/// Fused attention: `q` `[B, Nq, T, D]`, `k`/`v` `[B, Nkv, N, D]` (GQA: query head `h` uses
/// KV head `h / (Nq/Nkv)`), masked by `mask`, scores scaled by `scale`. Returns
/// `[B, Nq, T, D]` in `q`'s dtype (computed in f32). Differentiable.
pub fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor, mask: &MaskSpec, scale: f64) -> Result<Tensor> {
    let (b, _, t, _) = q.dims4()?;
    let n = k.dim(2)?;
    if mask.batch != b || mask.q_len != t || mask.kv_len != n {
        return Err(KernelError::Shape {
            op: "sdpa",
            message: format!(
                "mask is for batch {}, {} queries, {} keys; tensors have {b}, {t}, {n}",
                mask.batch, mask.q_len, mask.kv_len
            ),
        }
        .into());
    }
    let source: Arc<dyn MaskSource> = Arc::new(SpecMask::new(mask)?);
    tiled::attend("sdpa", q, k, v, source, None, scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The analytic tile classes must agree with the element mask everywhere.
    #[test]
    fn tile_classes_agree_with_the_element_mask() {
        let mut seed = 7u64;
        let mut next = |m: usize| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) as usize) % m
        };
        for _ in 0..40 {
            let batch = 1 + next(2);
            let q_len = 1 + next(150);
            let held = next(140);
            let q_start = held + next(20);
            let kv_start = q_start - held;
            let kv_len = held + q_len;
            let window = if next(2) == 0 {
                None
            } else {
                Some(1 + next(90))
            };
            let key_padding = (next(2) == 0).then(|| {
                (0..batch)
                    .map(|_| {
                        let pads = next(q_start + q_len + 1);
                        (0..q_start + q_len).map(|i| i >= pads).collect()
                    })
                    .collect()
            });
            // packed documents: contiguous runs of random length
            let documents = (next(2) == 0).then(|| {
                (0..batch)
                    .map(|_| {
                        let mut doc = 0u32;
                        (0..q_start + q_len)
                            .map(|i| {
                                if i > 0 && next(40) == 0 {
                                    doc += 1;
                                }
                                doc
                            })
                            .collect()
                    })
                    .collect()
            });
            let spec = MaskSpec {
                batch,
                q_start,
                q_len,
                kv_start,
                kv_len,
                window,
                key_padding,
                documents,
            };
            let sm = SpecMask::new(&spec).unwrap();
            for b in 0..batch {
                for qt in 0..q_len.div_ceil(TILE) {
                    for kt in 0..kv_len.div_ceil(TILE) {
                        let rows = (qt * TILE..((qt + 1) * TILE).min(q_len)).collect::<Vec<_>>();
                        let cols = (kt * TILE..((kt + 1) * TILE).min(kv_len)).collect::<Vec<_>>();
                        let seen: Vec<bool> = rows
                            .iter()
                            .flat_map(|&q| cols.iter().map(move |&k| (q, k)))
                            .map(|(q, k)| spec.allowed(b, q, k))
                            .collect();
                        match sm.tile(b, 0, qt, kt) {
                            TileKind::Empty => {
                                assert!(seen.iter().all(|v| !v), "{spec:?} tile {qt},{kt}")
                            }
                            TileKind::Full => {
                                assert!(seen.iter().all(|v| *v), "{spec:?} tile {qt},{kt}")
                            }
                            TileKind::Partial => {
                                let mut bits = vec![false; rows.len() * cols.len()];
                                sm.fill(b, 0, qt, kt, rows.len(), cols.len(), &mut bits);
                                assert_eq!(bits, seen);
                            }
                        }
                    }
                }
            }
        }
    }
}
