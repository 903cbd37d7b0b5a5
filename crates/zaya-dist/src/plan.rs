//! Parallel plans as data: a table from parameter-name patterns to a placement (as the
//! reference's `_tp_plan` / `base_model_ep_plan`), and what each rank of a mesh holds of
//! every tensor under it. The loader reads exactly these slices; `zaya plan` prints them.

use std::ops::Range;

use zaya::weights::{native_specs, TensorSpec};
use zaya::ZayaConfig;

use crate::mesh::{Coords, MeshShape};

/// How one tensor is spread over the ranks of a TP group (and, for experts, an EP group).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Placement {
    /// Every rank holds all of it.
    Replicated,
    /// Column-parallel `[out, in]`: output rows (and the bias) split evenly.
    Column,
    /// Row-parallel `[out, in]`: input columns split evenly; outputs are partial sums
    /// (all-reduced), the bias is applied once after the reduction.
    Row,
    /// CCA `q_proj`: the rows of the rank's query heads.
    QueryHeads,
    /// CCA `k_proj` rows and `qk_norm.temp`: the KV heads the rank's query heads use,
    /// replicated on every rank of a group when there are more ranks than KV heads.
    KvHeads,
    /// CCA `v_proj_current` / `v_proj_delayed`: the value heads of the rank's KV heads that
    /// come from this half (the first `Nkv/2` value heads are current, the rest delayed).
    ValueHeads { delayed: bool },
    /// CCA convolution weights and biases `[C, ..]`: the channels of the rank's query heads
    /// followed by those of its KV heads.
    ConvChannels,
    /// `gate_up_proj` `[E, 2I, H]`: experts over EP ranks; the gate rows and the up rows
    /// each split over TP.
    ExpertGateUp,
    /// `down_proj` `[E, H, I]`: experts over EP ranks; the inner axis split over TP.
    ExpertDown,
    /// Embedding / lm_head `[V, H]` (and lm_head bias): vocabulary rows split evenly.
    VocabParallel,
}

/// One row of a plan: a name pattern (`*` matches one dot-separated segment, e.g. a layer
/// index) and its placement.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Rule {
    pub pattern: &'static str,
    pub placement: Placement,
}

const fn rule(pattern: &'static str, placement: Placement) -> Rule {
    Rule { pattern, placement }
}

/// The ZAYA1 plan: what transformers removed (TP beyond the 2 KV heads, PP with the
/// router state) written down as data. The first matching rule wins.
pub const ZAYA_PLAN: &[Rule] = &[
    rule("model.embed_tokens.weight", Placement::VocabParallel),
    rule("lm_head.weight", Placement::VocabParallel),
    rule("lm_head.bias", Placement::VocabParallel),
    rule(
        "model.layers.*.self_attn.qkv_proj.q_proj.*",
        Placement::QueryHeads,
    ),
    rule(
        "model.layers.*.self_attn.qkv_proj.k_proj.*",
        Placement::KvHeads,
    ),
    rule(
        "model.layers.*.self_attn.qkv_proj.v_proj_current.*",
        Placement::ValueHeads { delayed: false },
    ),
    rule(
        "model.layers.*.self_attn.qkv_proj.v_proj_delayed.*",
        Placement::ValueHeads { delayed: true },
    ),
    rule(
        "model.layers.*.self_attn.qkv_proj.conv_qk_*.*",
        Placement::ConvChannels,
    ),
    rule("model.layers.*.self_attn.qk_norm.temp", Placement::KvHeads),
    rule("model.layers.*.self_attn.o_proj.weight", Placement::Row),
    // the o_proj bias is added once, after the all-reduce
    rule(
        "model.layers.*.self_attn.o_proj.bias",
        Placement::Replicated,
    ),
    rule(
        "model.layers.*.mlp.experts.gate_up_proj",
        Placement::ExpertGateUp,
    ),
    rule(
        "model.layers.*.mlp.experts.down_proj",
        Placement::ExpertDown,
    ),
    // the router decides for every rank: replicated (its EDA state travels with the hidden
    // state between pipeline stages)
    rule("model.layers.*.mlp.gate.**", Placement::Replicated),
    rule("**", Placement::Replicated),
];

/// `pattern` against a dot-separated `name`: `*` is one segment or a part of one
/// (`conv_qk_*`), a trailing `**` any rest.
pub fn matches(pattern: &str, name: &str) -> bool {
    fn seg(p: &str, s: &str) -> bool {
        match p.split_once('*') {
            None => p == s,
            Some((pre, post)) => {
                s.len() >= pre.len() + post.len() && s.starts_with(pre) && s.ends_with(post)
            }
        }
    }
    let ps: Vec<&str> = pattern.split('.').collect();
    let ns: Vec<&str> = name.split('.').collect();
    for (i, p) in ps.iter().enumerate() {
        if *p == "**" {
            return i < ns.len() || i == 0;
        }
        match ns.get(i) {
            Some(n) if seg(p, n) => {}
            _ => return false,
        }
    }
    ps.len() == ns.len()
}

/// The placement of native tensor `name` under `rules`.
pub fn placement_of(rules: &[Rule], name: &str) -> Placement {
    rules
        .iter()
        .find(|r| matches(r.pattern, name))
        .map_or(Placement::Replicated, |r| r.placement)
}

/// Why a model cannot be split as asked, found before any work.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
#[error("cannot split the model with {mesh}: {message}")]
pub struct PlanError {
    pub mesh: String,
    pub message: String,
}

/// Which part of a tensor a rank holds: per axis, the index ranges to take (concatenated
/// in order); an axis not listed is whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    pub axes: Vec<(usize, Vec<Range<usize>>)>,
}

impl Selection {
    pub fn whole() -> Self {
        Selection { axes: vec![] }
    }

    fn on(axis: usize, ranges: Vec<Range<usize>>) -> Self {
        Selection {
            axes: vec![(axis, ranges)],
        }
    }

    pub fn is_whole(&self) -> bool {
        self.axes.is_empty()
    }

    /// Per axis of `shape`, the ranges taken (the whole axis where not selected).
    pub fn ranges(&self, shape: &[usize]) -> Vec<Vec<Range<usize>>> {
        (0..shape.len())
            .map(|a| {
                self.axes.iter().find(|(ax, _)| *ax == a).map_or_else(
                    || std::iter::once(0..shape[a]).collect(),
                    |(_, r)| r.clone(),
                )
            })
            .collect()
    }

    /// Shape of the selected part.
    pub fn shape(&self, shape: &[usize]) -> Vec<usize> {
        self.ranges(shape)
            .iter()
            .map(|rs| rs.iter().map(|r| r.len()).sum())
            .collect()
    }
}

/// A TP rank's share of the attention heads.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HeadShare {
    /// Query heads `q0..q1`.
    pub query: Range<usize>,
    /// KV heads `k0..k1` the query heads use.
    pub kv: Range<usize>,
    /// KV heads of the whole model.
    pub kv_total: usize,
}

/// A model split over a mesh: the plan's rules plus the model's sizes, checked once.
#[derive(Debug, Clone)]
pub struct ParallelPlan {
    pub cfg: ZayaConfig,
    pub mesh: MeshShape,
    pub rules: Vec<Rule>,
}

fn even(n: usize, parts: usize, i: usize) -> Range<usize> {
    let per = n / parts;
    i * per..(i + 1) * per
}

impl ParallelPlan {
    /// Checks every divisibility the plan needs and names the first that fails.
    pub fn new(cfg: &ZayaConfig, mesh: MeshShape) -> Result<Self, PlanError> {
        let fail = |message: String| PlanError {
            mesh: format!(
                "--tp {} --pp {} --ep {} --dp {}",
                mesh.tp, mesh.pp, mesh.ep, mesh.dp
            ),
            message,
        };
        let (nq, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let tp = mesh.tp;
        if !nq.is_multiple_of(tp) {
            return Err(fail(format!(
                "num_attention_heads = {nq} is not divisible by --tp {tp}"
            )));
        }
        let per = nq / tp;
        let group = nq / nkv;
        if !per.is_multiple_of(group) && !group.is_multiple_of(per) {
            return Err(fail(format!(
                "each TP rank would hold {per} query heads, which split the GQA groups of {group} query heads per KV head"
            )));
        }
        if !nkv.is_multiple_of(2) && tp > 1 {
            return Err(fail(format!(
                "num_key_value_heads = {nkv} is odd: the current/delayed value halves cannot be assigned to heads"
            )));
        }
        if !cfg.moe_intermediate_size.is_multiple_of(tp) {
            return Err(fail(format!(
                "moe_intermediate_size = {} is not divisible by --tp {tp}",
                cfg.moe_intermediate_size
            )));
        }
        if !cfg.vocab_size.is_multiple_of(tp) {
            return Err(fail(format!(
                "vocab_size = {} is not divisible by --tp {tp} (vocab-parallel embedding and lm_head)",
                cfg.vocab_size
            )));
        }
        if !cfg.num_experts.is_multiple_of(mesh.ep) {
            return Err(fail(format!(
                "num_experts = {} is not divisible by --ep {}",
                cfg.num_experts, mesh.ep
            )));
        }
        if !cfg.num_hidden_layers.is_multiple_of(mesh.pp) {
            return Err(fail(format!(
                "num_hidden_layers = {} is not divisible by --pp {} (equal pipeline stages)",
                cfg.num_hidden_layers, mesh.pp
            )));
        }
        Ok(ParallelPlan {
            cfg: cfg.clone(),
            mesh,
            rules: ZAYA_PLAN.to_vec(),
        })
    }

    /// The heads of TP rank `t`.
    pub fn heads(&self, t: usize) -> HeadShare {
        let (nq, nkv) = (self.cfg.num_attention_heads, self.cfg.num_key_value_heads);
        let group = nq / nkv;
        let query = even(nq, self.mesh.tp, t);
        let kv = query.start / group..(query.end - 1) / group + 1;
        HeadShare {
            query,
            kv,
            kv_total: nkv,
        }
    }

    /// Decoder layers of pipeline stage `p`.
    pub fn stage_layers(&self, p: usize) -> Range<usize> {
        even(self.cfg.num_hidden_layers, self.mesh.pp, p)
    }

    /// Experts of EP rank `e`.
    pub fn experts(&self, e: usize) -> Range<usize> {
        even(self.cfg.num_experts, self.mesh.ep, e)
    }

    /// Whether the rank at `c` holds `name` at all (pipeline stages hold their layers; the
    /// embedding lives on the first stage, the final norm and head on the last, and a tied
    /// embedding on both).
    pub fn holds(&self, c: Coords, name: &str) -> bool {
        let last = self.mesh.pp - 1;
        if let Some(rest) = name.strip_prefix("model.layers.") {
            let idx: usize = rest
                .split('.')
                .next()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            return self.stage_layers(c.pp).contains(&idx);
        }
        match name {
            "model.embed_tokens.weight" => {
                c.pp == 0 || (c.pp == last && self.cfg.tie_word_embeddings)
            }
            "model.input_hidden_states_scale" | "model.input_hidden_states_bias" => c.pp == 0,
            _ => c.pp == last,
        }
    }

    /// The part of tensor `spec` that the rank at `c` holds (ignoring pipeline stages).
    pub fn selection(&self, c: Coords, spec: &TensorSpec) -> Selection {
        let d = self.cfg.head_dim;
        let nq = self.cfg.num_attention_heads;
        let nkv = self.cfg.num_key_value_heads;
        let heads = self.heads(c.tp);
        let tp = self.mesh.tp;
        let name = spec.name.as_str();
        let placement = placement_of(&self.rules, name);
        let rows = |r: Range<usize>| r.start * d..r.end * d;
        match placement {
            Placement::Replicated => Selection::whole(),
            _ if tp == 1
                && !matches!(placement, Placement::ExpertGateUp | Placement::ExpertDown) =>
            {
                Selection::whole()
            }
            Placement::Column | Placement::VocabParallel => {
                Selection::on(0, vec![even(spec.shape[0], tp, c.tp)])
            }
            Placement::Row => Selection::on(1, vec![even(spec.shape[1], tp, c.tp)]),
            Placement::QueryHeads => Selection::on(0, vec![rows(heads.query)]),
            Placement::KvHeads => {
                if name.ends_with("temp") {
                    Selection::on(0, vec![heads.kv])
                } else {
                    Selection::on(0, vec![rows(heads.kv)])
                }
            }
            Placement::ValueHeads { delayed } => {
                let half = nkv / 2;
                let (lo, hi) = if delayed {
                    (
                        heads.kv.start.max(half) - half,
                        heads.kv.end.max(half) - half,
                    )
                } else {
                    (heads.kv.start.min(half), heads.kv.end.min(half))
                };
                Selection::on(0, vec![rows(lo..hi)])
            }
            Placement::ConvChannels => {
                let q = rows(heads.query);
                let k = rows(heads.kv);
                Selection::on(0, vec![q, nq * d + k.start..nq * d + k.end])
            }
            Placement::ExpertGateUp => {
                let i = self.cfg.moe_intermediate_size;
                let part = even(i, tp, c.tp);
                Selection {
                    axes: vec![
                        (0, vec![self.experts(c.ep)]),
                        (1, vec![part.clone(), i + part.start..i + part.end]),
                    ],
                }
            }
            Placement::ExpertDown => Selection {
                axes: vec![
                    (0, vec![self.experts(c.ep)]),
                    (2, vec![even(self.cfg.moe_intermediate_size, tp, c.tp)]),
                ],
            },
        }
    }

    /// Everything rank `rank` holds: `(spec, selection, selected shape)`, in module order.
    pub fn holdings(&self, rank: usize) -> Vec<(TensorSpec, Selection, Vec<usize>)> {
        let c = self.mesh.coords(rank);
        native_specs(&self.cfg)
            .into_iter()
            .filter(|s| self.holds(c, &s.name))
            .map(|s| {
                let sel = self.selection(c, &s);
                let shape = sel.shape(&s.shape);
                (s, sel, shape)
            })
            .collect()
    }

    /// Parameters (elements) rank `rank` holds.
    pub fn rank_params(&self, rank: usize) -> u64 {
        self.holdings(rank)
            .iter()
            .map(|(_, _, shape)| shape.iter().product::<usize>() as u64)
            .sum()
    }
}

/// Bytes per parameter of a run: inference holds the weights; training (AdamW with f32
/// master weights) holds the weights, an f32 gradient, f32 master copy (when the weights
/// are not f32) and the two f32 moments.
pub fn bytes_per_param(weight_bytes: usize, training: bool) -> u64 {
    let w = weight_bytes as u64;
    if !training {
        return w;
    }
    let master = if w == 4 { 0 } else { 4 };
    w + 4 + master + 8
}
