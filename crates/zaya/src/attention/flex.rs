//! The `flex` backend, after PyTorch's FlexAttention: the caller describes the attention
//! pattern with a `mask_mod(b, h, q_idx, kv_idx) -> bool` and optionally modifies scores
//! with a `score_mod(score, b, h, q_idx, kv_idx) -> score`.
//!
//! * [`MaskMod`]: built-ins (causal, sliding window, key padding, packed documents,
//!   prefix-LM), combinators (`and`, `or`, `not`) and closures.
//! * [`ScoreMod`]: soft-capping, ALiBi, closures (with an optional derivative), chains.
//! * [`BlockMask`]: the mask evaluated once per shape on `64 × 64` tiles, classified
//!   empty / full / partial (partial tiles keep their element bits). Build it once and
//!   reuse it for every layer; empty tiles are skipped entirely and full tiles never
//!   consult the mask.
//! * [`flex_attention`] runs the fused tiled engine (the same one as `sdpa`) with that
//!   block mask; it is differentiable (fused backward), so it serves training too.
//!   [`dense_reference`] is the eager definition built from candle ops, for checking.
//!
//! Indices handed to the mods are absolute: query row `t` is `q_offset + t`, key `j` is
//! `kv_offset + j` (both offsets are part of the block mask), so chunked prefill and
//! decode see the same positions as a full pass.

use std::fmt;
use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

use super::tiled::{self, MaskSource, ScoreSource, TileKind, TILE};
use super::MaskSpec;
use crate::kernels::cpu::{self, f32_view, host_f32, storage_from_f32, tensor_from_f32};
use crate::kernels::{reference, KernelError};

/// `mask_mod(b, h, q_idx, kv_idx) -> visible`.
pub type MaskFn = Arc<dyn Fn(usize, usize, usize, usize) -> bool + Send + Sync>;
/// `score_mod(score, b, h, q_idx, kv_idx) -> score` (also the type of its derivative).
pub type ScoreFn = Arc<dyn Fn(f32, usize, usize, usize, usize) -> f32 + Send + Sync>;

/// Which keys a query sees.
#[derive(Clone)]
pub enum MaskMod {
    /// `kv_idx ≤ q_idx`.
    Causal,
    /// Causal window of `W` keys including the query itself: `q − W < kv ≤ q`.
    SlidingWindow(usize),
    /// Per batch row, `true` for real keys (indexed by `kv_idx`; indices past the end count
    /// as real, like [`MaskSpec`]).
    KeyPadding(Arc<Vec<Vec<bool>>>),
    /// Packed sequences: per batch row, the document id of every position (queries and
    /// keys share the index space); no attention across documents. Combine with
    /// [`MaskMod::Causal`] for causal packing.
    Document(Arc<Vec<Vec<u32>>>),
    /// Prefix-LM with a per-row prefix length (one entry = the same for every row): keys
    /// `< n` are visible to every query (a bidirectional prefix), causal after.
    PrefixLm(Arc<Vec<usize>>),
    And(Box<MaskMod>, Box<MaskMod>),
    Or(Box<MaskMod>, Box<MaskMod>),
    Not(Box<MaskMod>),
    /// Any predicate. Set `depends_on_head` if it looks at `h` (block masks built without
    /// heads evaluate it at `h = 0`).
    Custom {
        f: MaskFn,
        depends_on_head: bool,
    },
}

impl fmt::Debug for MaskMod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MaskMod::Causal => write!(f, "Causal"),
            MaskMod::SlidingWindow(w) => write!(f, "SlidingWindow({w})"),
            MaskMod::KeyPadding(p) => write!(f, "KeyPadding({} rows)", p.len()),
            MaskMod::Document(d) => write!(f, "Document({} rows)", d.len()),
            MaskMod::PrefixLm(n) => write!(f, "PrefixLm({n:?})"),
            MaskMod::And(a, b) => write!(f, "And({a:?}, {b:?})"),
            MaskMod::Or(a, b) => write!(f, "Or({a:?}, {b:?})"),
            MaskMod::Not(a) => write!(f, "Not({a:?})"),
            MaskMod::Custom {
                depends_on_head, ..
            } => write!(f, "Custom(depends_on_head: {depends_on_head})"),
        }
    }
}

impl MaskMod {
    pub fn causal() -> Self {
        MaskMod::Causal
    }
    pub fn sliding_window(window: usize) -> Self {
        MaskMod::SlidingWindow(window)
    }
    pub fn key_padding(rows: Vec<Vec<bool>>) -> Self {
        MaskMod::KeyPadding(Arc::new(rows))
    }
    pub fn document(doc_ids: Vec<Vec<u32>>) -> Self {
        MaskMod::Document(Arc::new(doc_ids))
    }
    pub fn prefix_lm(prefix_lens: Vec<usize>) -> Self {
        MaskMod::PrefixLm(Arc::new(prefix_lens))
    }
    /// A closure that ignores the head index.
    pub fn custom(f: impl Fn(usize, usize, usize, usize) -> bool + Send + Sync + 'static) -> Self {
        MaskMod::Custom {
            f: Arc::new(f),
            depends_on_head: false,
        }
    }
    /// A closure whose result depends on the head index.
    pub fn custom_per_head(
        f: impl Fn(usize, usize, usize, usize) -> bool + Send + Sync + 'static,
    ) -> Self {
        MaskMod::Custom {
            f: Arc::new(f),
            depends_on_head: true,
        }
    }
    /// Both masks allow.
    pub fn and(self, other: MaskMod) -> Self {
        MaskMod::And(Box::new(self), Box::new(other))
    }
    /// Either mask allows.
    pub fn or(self, other: MaskMod) -> Self {
        MaskMod::Or(Box::new(self), Box::new(other))
    }
    /// The complement.
    #[allow(clippy::should_implement_trait)]
    pub fn not(self) -> Self {
        MaskMod::Not(Box::new(self))
    }

    /// Whether query `q` of batch row `b`, head `h` sees key `k` (absolute indices).
    pub fn eval(&self, b: usize, h: usize, q: usize, k: usize) -> bool {
        match self {
            MaskMod::Causal => k <= q,
            MaskMod::SlidingWindow(w) => k <= q && k + w > q,
            MaskMod::KeyPadding(p) => p.get(b).and_then(|r| r.get(k)).copied().unwrap_or(true),
            MaskMod::Document(d) => match d.get(b) {
                Some(row) => matches!((row.get(q), row.get(k)), (Some(a), Some(c)) if a == c),
                None => false,
            },
            MaskMod::PrefixLm(n) => {
                let n = if n.len() == 1 {
                    n[0]
                } else {
                    n.get(b).copied().unwrap_or(0)
                };
                k < n || k <= q
            }
            MaskMod::And(a, c) => a.eval(b, h, q, k) && c.eval(b, h, q, k),
            MaskMod::Or(a, c) => a.eval(b, h, q, k) || c.eval(b, h, q, k),
            MaskMod::Not(a) => !a.eval(b, h, q, k),
            MaskMod::Custom { f, .. } => f(b, h, q, k),
        }
    }

    pub fn depends_on_head(&self) -> bool {
        match self {
            MaskMod::And(a, b) | MaskMod::Or(a, b) => a.depends_on_head() || b.depends_on_head(),
            MaskMod::Not(a) => a.depends_on_head(),
            MaskMod::Custom {
                depends_on_head, ..
            } => *depends_on_head,
            _ => false,
        }
    }

    /// Checks the data of the built-ins covers `batch` rows and indices `< q_end`/`< kv_end`.
    pub fn validate(&self, batch: usize, q_end: usize, kv_end: usize) -> Result<()> {
        let bad = |message: String| -> candle_core::Error {
            KernelError::Shape {
                op: "flex mask_mod",
                message,
            }
            .into()
        };
        match self {
            MaskMod::KeyPadding(p) if p.len() < batch => Err(bad(format!(
                "key padding has {} rows for batch {batch}",
                p.len()
            ))),
            MaskMod::Document(d) => {
                let need = q_end.max(kv_end);
                if d.len() < batch || d.iter().take(batch).any(|r| r.len() < need) {
                    return Err(bad(format!("document ids must be [{batch}][{need}]")));
                }
                Ok(())
            }
            MaskMod::PrefixLm(n) if n.len() != 1 && n.len() < batch => {
                Err(bad(format!("{} prefix lengths for batch {batch}", n.len())))
            }
            MaskMod::And(a, b) | MaskMod::Or(a, b) => {
                a.validate(batch, q_end, kv_end)?;
                b.validate(batch, q_end, kv_end)
            }
            MaskMod::Not(a) => a.validate(batch, q_end, kv_end),
            _ => Ok(()),
        }
    }
}

/// How scores are modified before the softmax (after the scale).
#[derive(Clone)]
pub enum ScoreMod {
    /// `cap · tanh(s / cap)`.
    SoftCap(f32),
    /// ALiBi: `s + slope[h] · (kv_idx − q_idx)`, one slope per query head.
    Alibi(Arc<Vec<f32>>),
    /// Any function; without `grad` (its derivative in `s`) it cannot be trained through
    /// (the backward reports an error rather than a wrong gradient).
    Custom { f: ScoreFn, grad: Option<ScoreFn> },
    /// Applies the mods in order.
    Chain(Vec<ScoreMod>),
}

impl fmt::Debug for ScoreMod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScoreMod::SoftCap(c) => write!(f, "SoftCap({c})"),
            ScoreMod::Alibi(s) => write!(f, "Alibi({s:?})"),
            ScoreMod::Custom { grad, .. } => write!(f, "Custom(grad: {})", grad.is_some()),
            ScoreMod::Chain(v) => write!(f, "Chain({v:?})"),
        }
    }
}

impl ScoreMod {
    pub fn soft_cap(cap: f32) -> Self {
        ScoreMod::SoftCap(cap)
    }
    pub fn alibi(slopes: Vec<f32>) -> Self {
        ScoreMod::Alibi(Arc::new(slopes))
    }
    /// The standard ALiBi slopes for `heads` heads: `2^(−8(h+1)/heads)`.
    pub fn alibi_slopes(heads: usize) -> Vec<f32> {
        (0..heads)
            .map(|h| 2f32.powf(-8.0 * (h + 1) as f32 / heads as f32))
            .collect()
    }
    pub fn custom(
        f: impl Fn(f32, usize, usize, usize, usize) -> f32 + Send + Sync + 'static,
        grad: Option<ScoreFn>,
    ) -> Self {
        ScoreMod::Custom {
            f: Arc::new(f),
            grad,
        }
    }
    /// `self`, then `next`.
    pub fn then(self, next: ScoreMod) -> Self {
        match self {
            ScoreMod::Chain(mut v) => {
                v.push(next);
                ScoreMod::Chain(v)
            }
            first => ScoreMod::Chain(vec![first, next]),
        }
    }

    pub fn apply(&self, s: f32, b: usize, h: usize, q: usize, k: usize) -> f32 {
        match self {
            ScoreMod::SoftCap(cap) => cap * (s / cap).tanh(),
            ScoreMod::Alibi(slopes) => {
                s + slopes.get(h).copied().unwrap_or(0.0) * (k as f32 - q as f32)
            }
            ScoreMod::Custom { f, .. } => f(s, b, h, q, k),
            ScoreMod::Chain(v) => v.iter().fold(s, |s, m| m.apply(s, b, h, q, k)),
        }
    }

    /// `∂ apply / ∂ s` (1 where a custom mod has no derivative; see [`ScoreMod::has_grad`]).
    pub fn grad(&self, s: f32, b: usize, h: usize, q: usize, k: usize) -> f32 {
        match self {
            ScoreMod::SoftCap(cap) => {
                let th = (s / cap).tanh();
                1.0 - th * th
            }
            ScoreMod::Alibi(_) => 1.0,
            ScoreMod::Custom { grad, .. } => grad.as_ref().map_or(1.0, |g| g(s, b, h, q, k)),
            ScoreMod::Chain(v) => {
                let mut x = s;
                let mut d = 1.0;
                for m in v {
                    d *= m.grad(x, b, h, q, k);
                    x = m.apply(x, b, h, q, k);
                }
                d
            }
        }
    }

    pub fn has_grad(&self) -> bool {
        match self {
            ScoreMod::Custom { grad, .. } => grad.is_some(),
            ScoreMod::Chain(v) => v.iter().all(|m| m.has_grad()),
            _ => true,
        }
    }

    fn validate(&self, heads: usize) -> Result<()> {
        match self {
            ScoreMod::Alibi(s) if s.len() < heads => Err(KernelError::Shape {
                op: "flex score_mod",
                message: format!("{} ALiBi slopes for {heads} heads", s.len()),
            }
            .into()),
            ScoreMod::SoftCap(c) if !(c.is_finite() && *c > 0.0) => Err(KernelError::Shape {
                op: "flex score_mod",
                message: format!("soft cap must be positive and finite, got {c}"),
            }
            .into()),
            ScoreMod::Chain(v) => v.iter().try_for_each(|m| m.validate(heads)),
            _ => Ok(()),
        }
    }
}

/// A mask evaluated on `64 × 64` tiles for one shape: each tile empty, full or partial, and
/// the element bits of the partial ones. `batch`/`heads` of 1 broadcast.
pub struct BlockMask {
    batch: usize,
    heads: usize,
    q_len: usize,
    kv_len: usize,
    q_offset: usize,
    kv_offset: usize,
    nqt: usize,
    nkt: usize,
    kinds: Vec<TileKind>,
    /// Per tile, the slot of its bits in `bits` (`u32::MAX` when not partial).
    slot: Vec<u32>,
    /// `TILE` words per partial tile: word `r` holds the visible keys of row `r`.
    bits: Vec<u64>,
}

impl fmt::Debug for BlockMask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (e, full, p) = self.counts();
        write!(
            f,
            "BlockMask(batch {}, heads {}, q {}+{}, kv {}+{}, tiles: {e} empty, {full} full, {p} partial)",
            self.batch, self.heads, self.q_offset, self.q_len, self.kv_offset, self.kv_len
        )
    }
}

impl BlockMask {
    /// Evaluates `mask` for `batch` rows (`None`: the same for every row, evaluated at
    /// `b = 0`) and `heads` query heads (`None`: the same for every head, at `h = 0`), over
    /// `q_len` queries at `q_offset..` and `kv_len` keys at `kv_offset..`.
    pub fn new(
        mask: &MaskMod,
        batch: Option<usize>,
        heads: Option<usize>,
        q_len: usize,
        kv_len: usize,
        q_offset: usize,
        kv_offset: usize,
    ) -> Result<BlockMask> {
        let (nb, nh) = (batch.unwrap_or(1).max(1), heads.unwrap_or(1).max(1));
        mask.validate(nb, q_offset + q_len, kv_offset + kv_len)?;
        let (nqt, nkt) = (q_len.div_ceil(TILE), kv_len.div_ceil(TILE));
        let rows = nb * nh * nqt;
        // One work item per (b, h, query tile): its row of tile kinds and partial bits.
        let per_row = cpu::par_map(rows, rows * nkt * TILE * TILE * 4, |row| {
            let qt = row % nqt;
            let h = (row / nqt) % nh;
            let b = row / (nqt * nh);
            let tq = TILE.min(q_len - qt * TILE);
            let mut kinds = Vec::with_capacity(nkt);
            let mut partial = Vec::new();
            for kt in 0..nkt {
                let tk = TILE.min(kv_len - kt * TILE);
                let mut words = [0u64; TILE];
                let mut visible = 0usize;
                for (r, word) in words.iter_mut().enumerate().take(tq) {
                    let qi = q_offset + qt * TILE + r;
                    for c in 0..tk {
                        if mask.eval(b, h, qi, kv_offset + kt * TILE + c) {
                            *word |= 1 << c;
                            visible += 1;
                        }
                    }
                }
                kinds.push(match visible {
                    0 => TileKind::Empty,
                    v if v == tq * tk => TileKind::Full,
                    _ => {
                        partial.push((kt, words));
                        TileKind::Partial
                    }
                });
            }
            (kinds, partial)
        });
        let mut bm = BlockMask {
            batch: nb,
            heads: nh,
            q_len,
            kv_len,
            q_offset,
            kv_offset,
            nqt,
            nkt,
            kinds: Vec::with_capacity(rows * nkt),
            slot: vec![u32::MAX; rows * nkt],
            bits: Vec::new(),
        };
        for (row, (kinds, partial)) in per_row.into_iter().enumerate() {
            bm.kinds.extend(kinds);
            for (kt, words) in partial {
                let slot = u32::try_from(bm.bits.len() / TILE).map_err(|_| {
                    KernelError::Internal("block mask has too many partial tiles".into())
                })?;
                bm.slot[row * nkt + kt] = slot;
                bm.bits.extend_from_slice(&words);
            }
        }
        Ok(bm)
    }

    fn index(&self, b: usize, h: usize, qt: usize, kt: usize) -> usize {
        let b = if self.batch == 1 { 0 } else { b };
        let h = if self.heads == 1 { 0 } else { h };
        ((b * self.heads + h) * self.nqt + qt) * self.nkt + kt
    }

    /// The kind of tile `(qt, kt)` for batch row `b`, head `h`.
    pub fn tile_kind(&self, b: usize, h: usize, qt: usize, kt: usize) -> TileKind {
        self.kinds[self.index(b, h, qt, kt)]
    }

    /// Numbers of (empty, full, partial) tiles.
    pub fn counts(&self) -> (usize, usize, usize) {
        self.kinds.iter().fold((0, 0, 0), |(e, f, p), k| match k {
            TileKind::Empty => (e + 1, f, p),
            TileKind::Full => (e, f + 1, p),
            TileKind::Partial => (e, f, p + 1),
        })
    }

    /// Fraction of tiles skipped.
    pub fn sparsity(&self) -> f64 {
        let (e, _, _) = self.counts();
        e as f64 / self.kinds.len().max(1) as f64
    }

    pub fn q_len(&self) -> usize {
        self.q_len
    }
    pub fn kv_len(&self) -> usize {
        self.kv_len
    }
    pub fn offsets(&self) -> (usize, usize) {
        (self.q_offset, self.kv_offset)
    }

    fn check(&self, b: usize, nq: usize, t: usize, n: usize) -> Result<()> {
        if (self.batch != 1 && self.batch != b)
            || (self.heads != 1 && self.heads != nq)
            || self.q_len != t
            || self.kv_len != n
        {
            return Err(KernelError::Shape {
                op: "flex_attention",
                message: format!(
                    "block mask is for batch {}, heads {}, {} queries, {} keys; tensors have {b}, {nq}, {t}, {n}",
                    self.batch, self.heads, self.q_len, self.kv_len
                ),
            }
            .into());
        }
        Ok(())
    }
}

impl MaskSource for BlockMask {
    fn tile(&self, b: usize, h: usize, qt: usize, kt: usize) -> TileKind {
        self.tile_kind(b, h, qt, kt)
    }

    fn fill(
        &self,
        b: usize,
        h: usize,
        qt: usize,
        kt: usize,
        rows: usize,
        cols: usize,
        out: &mut [bool],
    ) {
        let slot = self.slot[self.index(b, h, qt, kt)];
        if slot == u32::MAX {
            // Not partial: the engine only asks for partial tiles, but stay total.
            let v = self.tile_kind(b, h, qt, kt) == TileKind::Full;
            out[..rows * cols].fill(v);
            return;
        }
        let words = &self.bits[slot as usize * TILE..(slot as usize + 1) * TILE];
        for r in 0..rows {
            for c in 0..cols {
                out[r * cols + c] = words[r] >> c & 1 == 1;
            }
        }
    }

    fn per_head(&self) -> bool {
        self.heads > 1
    }
}

/// A [`ScoreMod`] seen through the block mask's offsets (the engine passes local indices).
struct OffsetScore {
    m: ScoreMod,
    q_off: usize,
    kv_off: usize,
}

impl ScoreSource for OffsetScore {
    fn apply(&self, s: f32, b: usize, h: usize, q: usize, k: usize) -> f32 {
        self.m.apply(s, b, h, q + self.q_off, k + self.kv_off)
    }
    fn grad(&self, s: f32, b: usize, h: usize, q: usize, k: usize) -> f32 {
        self.m.grad(s, b, h, q + self.q_off, k + self.kv_off)
    }
    fn has_grad(&self) -> bool {
        self.m.has_grad()
    }
}

/// Fused flex attention: `q` `[B, Nq, T, D]`, `k`/`v` `[B, Nkv, N, D]` (GQA by head
/// groups), visibility from `block_mask` (shared `Arc`, built once per shape), scores
/// `scale · q·k` modified by `score_mod`. Differentiable; returns `[B, Nq, T, D]`.
pub fn flex_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    block_mask: &Arc<BlockMask>,
    score_mod: Option<&ScoreMod>,
    scale: f64,
) -> Result<Tensor> {
    let (b, nq, t, _) = q.dims4()?;
    block_mask.check(b, nq, t, k.dim(2)?)?;
    let score: Option<Arc<dyn ScoreSource>> = match score_mod {
        Some(m) => {
            m.validate(nq)?;
            let (q_off, kv_off) = block_mask.offsets();
            Some(Arc::new(OffsetScore {
                m: m.clone(),
                q_off,
                kv_off,
            }))
        }
        None => None,
    };
    let mask: Arc<dyn MaskSource> = block_mask.clone();
    tiled::attend("flex_attention", q, k, v, mask, score, scale)
}

/// [`flex_attention`] from a [`MaskMod`] directly (builds the block mask; prefer building
/// it once with [`BlockMask::new`] when calling repeatedly with the same shape).
#[allow(clippy::too_many_arguments)]
pub fn flex_attention_with(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask_mod: &MaskMod,
    score_mod: Option<&ScoreMod>,
    scale: f64,
    q_offset: usize,
    kv_offset: usize,
) -> Result<Tensor> {
    let (b, nq, t, _) = q.dims4()?;
    let heads = mask_mod.depends_on_head().then_some(nq);
    let bm = Arc::new(BlockMask::new(
        mask_mod,
        Some(b),
        heads,
        t,
        k.dim(2)?,
        q_offset,
        kv_offset,
    )?);
    flex_attention(q, k, v, &bm, score_mod, scale)
}

/// Element-wise custom score mod as a candle op (for [`dense_reference`]): indices come from
/// the position in the `[B, Nq, T, N]` score tensor plus the offsets.
struct DenseScoreOp {
    m: ScoreMod,
    q_off: usize,
    kv_off: usize,
}

impl DenseScoreOp {
    fn map(
        &self,
        s: &[f32],
        dims: &[usize],
        f: impl Fn(&ScoreMod, f32, usize, usize, usize, usize) -> f32,
    ) -> Vec<f32> {
        let (nh, t, n) = (dims[1], dims[2], dims[3]);
        s.iter()
            .enumerate()
            .map(|(i, &x)| {
                let k = i % n;
                let q = (i / n) % t;
                let h = (i / (n * t)) % nh;
                let b = i / (n * t * nh);
                f(&self.m, x, b, h, q + self.q_off, k + self.kv_off)
            })
            .collect()
    }
}

impl CustomOp1 for DenseScoreOp {
    fn name(&self) -> &'static str {
        "zaya-flex-dense-score-mod"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_view(s, l, "flex score_mod")?;
        let out = self.map(&x, l.dims(), |m, x, b, h, q, k| m.apply(x, b, h, q, k));
        Ok((
            storage_from_f32(out, s.dtype(), "flex score_mod")?,
            l.shape().clone(),
        ))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        if !self.m.has_grad() {
            return Err(KernelError::Backward {
                op: "flex score_mod",
                message: "the score_mod has no derivative".into(),
            }
            .into());
        }
        let x = host_f32(arg)?;
        let d = self.map(&x, arg.dims(), |m, x, b, h, q, k| m.grad(x, b, h, q, k));
        let g: Vec<f32> = host_f32(grad)?.iter().zip(&d).map(|(g, d)| g * d).collect();
        Ok(Some(tensor_from_f32(g, arg.shape(), arg.dtype(), arg)?))
    }
}

/// The eager definition of flex attention from differentiable candle ops: scores
/// `scale · q·kᵀ` (GQA by repeating K/V), cast to f32, `score_mod`, additive `f32::MIN`
/// mask from `mask_mod` evaluated densely, f32 softmax, cast back, times `v`.
#[allow(clippy::too_many_arguments)]
pub fn dense_reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask_mod: &MaskMod,
    score_mod: Option<&ScoreMod>,
    scale: f64,
    q_offset: usize,
    kv_offset: usize,
) -> Result<Tensor> {
    let (b, nq, t, _) = q.dims4()?;
    let (_, nkv, n, _) = k.dims4()?;
    if nkv == 0 || !nq.is_multiple_of(nkv) {
        return Err(KernelError::Shape {
            op: "flex dense_reference",
            message: format!("{nq} query heads are not a multiple of {nkv} KV heads"),
        }
        .into());
    }
    mask_mod.validate(b, q_offset + t, kv_offset + n)?;
    let k = super::repeat_kv(k, nq / nkv)?;
    let v = super::repeat_kv(v, nq / nkv)?;
    let scores = (q.contiguous()?.matmul(&k.transpose(2, 3)?.contiguous()?)? * scale)?
        .to_dtype(DType::F32)?;
    let scores = match score_mod {
        None => scores,
        Some(m) => {
            m.validate(nq)?;
            apply_dense_score(&scores, m, q_offset, kv_offset)?
        }
    };
    let mut mask = Vec::with_capacity(b * nq * t * n);
    for bi in 0..b {
        for h in 0..nq {
            for qi in 0..t {
                for kj in 0..n {
                    let ok = mask_mod.eval(bi, h, q_offset + qi, kv_offset + kj);
                    mask.push(if ok { 0f32 } else { f32::MIN });
                }
            }
        }
    }
    let mask = Tensor::from_vec(mask, (b, nq, t, n), q.device())?;
    let probs = reference::softmax_f32(&scores.broadcast_add(&mask)?)?.to_dtype(q.dtype())?;
    probs.matmul(&v.contiguous()?)
}

fn apply_dense_score(s: &Tensor, m: &ScoreMod, q_off: usize, kv_off: usize) -> Result<Tensor> {
    match m {
        ScoreMod::SoftCap(cap) => (s / *cap as f64)?.tanh()? * *cap as f64,
        ScoreMod::Alibi(slopes) => {
            let (_, nh, t, n) = s.dims4()?;
            let mut bias = Vec::with_capacity(nh * t * n);
            for h in 0..nh {
                for qi in 0..t {
                    for kj in 0..n {
                        bias.push(slopes[h] * ((kv_off + kj) as f32 - (q_off + qi) as f32));
                    }
                }
            }
            s.broadcast_add(&Tensor::from_vec(bias, (1, nh, t, n), s.device())?)
        }
        ScoreMod::Custom { .. } => s.apply_op1(DenseScoreOp {
            m: m.clone(),
            q_off,
            kv_off,
        }),
        ScoreMod::Chain(v) => v
            .iter()
            .try_fold(s.clone(), |s, m| apply_dense_score(&s, m, q_off, kv_off)),
    }
}

/// A [`MaskSpec`] as a block mask, cached: every layer of a forward call (and the next
/// calls with the same shape and padding) reuses it.
fn spec_block_mask(spec: &MaskSpec) -> Result<Arc<BlockMask>> {
    const CACHE: usize = 8;
    static SPECS: Mutex<Vec<(MaskSpec, Arc<BlockMask>)>> = Mutex::new(Vec::new());
    let mut cache = SPECS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(pos) = cache.iter().position(|(s, _)| same_spec(s, spec)) {
        let hit = cache.remove(pos);
        let bm = hit.1.clone();
        cache.push(hit);
        return Ok(bm);
    }
    if let Some(p) = &spec.key_padding {
        if p.len() < spec.batch {
            return Err(KernelError::Shape {
                op: "flex",
                message: format!("key_padding has {} rows for batch {}", p.len(), spec.batch),
            }
            .into());
        }
    }
    let owned = spec.clone();
    let (q_start, kv_start) = (spec.q_start, spec.kv_start);
    let mask = MaskMod::custom(move |b, _h, q, k| owned.allowed(b, q - q_start, k - kv_start));
    let bm = Arc::new(BlockMask::new(
        &mask,
        Some(spec.batch),
        None,
        spec.q_len,
        spec.kv_len,
        q_start,
        kv_start,
    )?);
    if cache.len() >= CACHE {
        cache.remove(0);
    }
    cache.push((spec.clone(), bm.clone()));
    Ok(bm)
}

fn same_spec(a: &MaskSpec, b: &MaskSpec) -> bool {
    // Exhaustive on purpose: a new MaskSpec field must take part in the cache key.
    let MaskSpec {
        batch,
        q_start,
        q_len,
        kv_start,
        kv_len,
        window,
        key_padding,
        documents,
    } = a;
    *batch == b.batch
        && *q_start == b.q_start
        && *q_len == b.q_len
        && *kv_start == b.kv_start
        && *kv_len == b.kv_len
        && *window == b.window
        && *key_padding == b.key_padding
        && *documents == b.documents
}

/// The `flex` backend of [`super::attend`]: the MaskSpec as mask_mod, no score_mod.
pub(crate) fn attend_spec(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    spec: &MaskSpec,
    scale: f64,
) -> Result<Tensor> {
    let bm = spec_block_mask(spec)?;
    flex_attention(q, k, v, &bm, None, scale)
}
