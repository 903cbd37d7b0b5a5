//! Prefix cache: the model state of a row at block boundaries of prompts (K/V of the prefix,
//! CCA conv history and delayed value), keyed by a chain hash over blocks of tokens as vLLM's
//! `kv_cache_manager` does, bounded in bytes with least-recently-used eviction.
//!
//! A boundary `k·B` is keyed by `h_k = hash(h_{k−1}, tokens[(k−1)·B .. k·B])`; an entry also
//! keeps its prefix tokens so that a hash collision can never hand out a wrong state.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};

use crate::rows::EngineRow;

/// Chain hashes of the full blocks of `tokens`: element `k − 1` keys the prefix of `k·block`
/// tokens.
pub fn block_hashes(tokens: &[u32], block: usize) -> Vec<u64> {
    let mut out = Vec::with_capacity(tokens.len() / block.max(1));
    let mut parent = 0u64;
    for chunk in tokens.chunks_exact(block.max(1)) {
        // DefaultHasher::new() uses fixed keys: the same tokens hash the same in every run.
        let mut h = DefaultHasher::new();
        parent.hash(&mut h);
        chunk.hash(&mut h);
        parent = h.finish();
        out.push(parent);
    }
    out
}

struct Entry<R> {
    tokens: Vec<u32>,
    state: R,
    bytes: usize,
    last_used: u64,
}

/// Row states of type `R` (the engine model's [`EngineRow`]); an evicted entry's state is
/// dropped, which frees it wherever it lives.
pub struct PrefixCache<R> {
    block: usize,
    capacity: usize,
    entries: HashMap<u64, Entry<R>>,
    bytes: usize,
    clock: u64,
}

impl<R: EngineRow> PrefixCache<R> {
    /// `capacity` bytes (0 disables the cache), `block` tokens per block (> 0).
    pub fn new(block: usize, capacity: usize) -> Self {
        PrefixCache {
            block,
            capacity,
            entries: HashMap::new(),
            bytes: 0,
            clock: 0,
        }
    }

    pub fn enabled(&self) -> bool {
        self.capacity > 0
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The longest cached prefix of `prompt` that leaves at least one prompt token to compute
    /// (the logits of the last prompt token are needed): its length and a copy of its state.
    pub fn lookup(&mut self, prompt: &[u32]) -> Option<(usize, R)> {
        if !self.enabled() || prompt.len() < 2 {
            return None;
        }
        let usable = &prompt[..prompt.len() - 1];
        let hashes = block_hashes(usable, self.block);
        for (k, h) in hashes.iter().enumerate().rev() {
            let len = (k + 1) * self.block;
            if let Some(e) = self.entries.get_mut(h) {
                if e.tokens[..] == prompt[..len] {
                    self.clock += 1;
                    e.last_used = self.clock;
                    // a copy that fails (out of memory) is a miss, not an error
                    if let Ok(state) = e.state.fork() {
                        return Some((len, state));
                    }
                }
            }
        }
        None
    }

    /// Whether the prefix keyed by `hash` is held (so a row need not snapshot it again).
    pub fn contains(&self, hash: u64) -> bool {
        self.entries.contains_key(&hash)
    }

    /// Keeps `state`, the row state after `prefix` (a whole number of blocks), then evicts the
    /// least recently used entries until the bytes fit. A state larger than the whole
    /// capacity is not kept.
    pub fn insert(&mut self, hash: u64, prefix: &[u32], state: R) {
        if !self.enabled() || self.entries.contains_key(&hash) {
            return;
        }
        let bytes = state.bytes() + std::mem::size_of_val(prefix);
        if bytes > self.capacity {
            return;
        }
        self.clock += 1;
        self.entries.insert(
            hash,
            Entry {
                tokens: prefix.to_vec(),
                state,
                bytes,
                last_used: self.clock,
            },
        );
        self.bytes += bytes;
        while self.bytes > self.capacity {
            let Some((&victim, _)) = self.entries.iter().min_by_key(|(_, e)| e.last_used) else {
                break;
            };
            if let Some(e) = self.entries.remove(&victim) {
                self.bytes -= e.bytes;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::block_hashes;

    #[test]
    fn chain_hash_depends_on_every_earlier_block() {
        let a = block_hashes(&[1, 2, 3, 4, 5, 6, 7], 2);
        let b = block_hashes(&[9, 2, 3, 4, 5, 6], 2);
        assert_eq!(a.len(), 3);
        assert_eq!(b.len(), 3);
        // same second block, different first block: different keys all along
        assert!(a.iter().zip(&b).all(|(x, y)| x != y));
        let c = block_hashes(&[1, 2, 3, 4, 0, 0], 2);
        assert_eq!(a[..2], c[..2]);
        assert_ne!(a[2], c[2]);
    }
}
