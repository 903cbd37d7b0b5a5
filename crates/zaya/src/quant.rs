//! Quantized weights: the block formats (candle's `quantized` module: Q8_0, Q4_0, the
//! k-quants, …), which tensors of a ZAYA model may be quantized and in which format (a
//! [`QuantPlan`]), and the fallback when a row length does not fit a format's block.
//!
//! What is quantized: the linear projections (attention q/k/v/o), the experts and the
//! embedding / lm_head. What never is: norms, scales, residual scalings, the router (its
//! decisions are discrete: a small error flips experts), the CCA convolutions and `temp`,
//! the balancing biases and every bias vector. Quantized layers are frozen: training
//! keeps dense tensors.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};

use crate::error::{Result, ZayaError};

/// A storage format a quantizable tensor may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightFormat {
    /// Stay a dense tensor in the stored (or requested) float dtype.
    Keep,
    /// Dense, but stored in this float dtype in a GGUF file (f32, f16, bf16).
    Float(GgmlDType),
    /// A block-quantized format.
    Quant(GgmlDType),
}

/// Every format `--format` accepts, with its name.
pub const FORMATS: &[(&str, WeightFormat)] = &[
    ("keep", WeightFormat::Keep),
    ("f32", WeightFormat::Float(GgmlDType::F32)),
    ("f16", WeightFormat::Float(GgmlDType::F16)),
    ("bf16", WeightFormat::Float(GgmlDType::BF16)),
    ("q8_0", WeightFormat::Quant(GgmlDType::Q8_0)),
    ("q6_k", WeightFormat::Quant(GgmlDType::Q6K)),
    ("q5_k", WeightFormat::Quant(GgmlDType::Q5K)),
    ("q5_1", WeightFormat::Quant(GgmlDType::Q5_1)),
    ("q5_0", WeightFormat::Quant(GgmlDType::Q5_0)),
    ("q4_k", WeightFormat::Quant(GgmlDType::Q4K)),
    ("q4_1", WeightFormat::Quant(GgmlDType::Q4_1)),
    ("q4_0", WeightFormat::Quant(GgmlDType::Q4_0)),
    ("q3_k", WeightFormat::Quant(GgmlDType::Q3K)),
    ("q2_k", WeightFormat::Quant(GgmlDType::Q2K)),
];

/// The name of a GGML dtype as `--format` spells it.
pub fn ggml_name(d: GgmlDType) -> &'static str {
    FORMATS
        .iter()
        .find(|(_, f)| matches!(f, WeightFormat::Quant(x) | WeightFormat::Float(x) if *x == d))
        .map(|(n, _)| *n)
        .unwrap_or(match d {
            GgmlDType::Q8_1 => "q8_1",
            GgmlDType::Q8K => "q8_k",
            _ => "?",
        })
}

impl fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WeightFormat::Keep => f.write_str("keep"),
            WeightFormat::Float(d) | WeightFormat::Quant(d) => f.write_str(ggml_name(*d)),
        }
    }
}

impl FromStr for WeightFormat {
    type Err = ZayaError;
    fn from_str(s: &str) -> Result<Self> {
        let key = s.trim().to_ascii_lowercase();
        FORMATS
            .iter()
            .find(|(n, _)| *n == key)
            .map(|(_, f)| *f)
            .ok_or_else(|| {
                let names: Vec<&str> = FORMATS.iter().map(|(n, _)| *n).collect();
                ZayaError::Input(format!(
                    "unknown weight format `{s}` (known: {})",
                    names.join(", ")
                ))
            })
    }
}

/// What a tensor is, for choosing its format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TensorClass {
    Embedding,
    LmHead,
    /// q/k/v (current, delayed) and o projections.
    Attention,
    /// Stacked expert matrices `gate_up_proj` / `down_proj`.
    Expert,
    /// Router linear layers (down_proj, fc1, fc2, out_proj): kept by default.
    Router,
    /// Norms, scales, biases, convolutions, `temp`, balancing biases: never quantized.
    Fixed,
}

/// The native names of the token embedding and the LM head.
pub(crate) const EMBEDDING: &str = "model.embed_tokens.weight";
const LM_HEAD: &str = "lm_head.weight";

impl TensorClass {
    /// The class of native tensor `name`.
    pub fn of(name: &str) -> TensorClass {
        if name == EMBEDDING {
            return TensorClass::Embedding;
        }
        if name == LM_HEAD {
            return TensorClass::LmHead;
        }
        if name.ends_with(".mlp.experts.gate_up_proj") || name.ends_with(".mlp.experts.down_proj") {
            return TensorClass::Expert;
        }
        if name.contains(".mlp.gate.")
            && [
                ".down_proj.weight",
                ".fc1.weight",
                ".fc2.weight",
                ".out_proj.weight",
            ]
            .iter()
            .any(|s| name.ends_with(s))
        {
            return TensorClass::Router;
        }
        if name.contains(".self_attn.")
            && [
                ".q_proj.weight",
                ".k_proj.weight",
                ".v_proj_current.weight",
                ".v_proj_delayed.weight",
                ".o_proj.weight",
            ]
            .iter()
            .any(|s| name.ends_with(s))
        {
            return TensorClass::Attention;
        }
        TensorClass::Fixed
    }
}

/// Which format each tensor gets: per-class formats, then `rules` (glob pattern → format,
/// last match wins) on top. Fixed tensors are never quantized, whatever the rules say.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantPlan {
    pub embedding: WeightFormat,
    pub lm_head: WeightFormat,
    pub attention: WeightFormat,
    pub expert: WeightFormat,
    pub router: WeightFormat,
    pub rules: Vec<(String, WeightFormat)>,
    /// llama.cpp's `_M` mixes, `(base, more)`: the value projections and the experts'
    /// `down_proj` of the layers [`use_more_bits`] picks get `more` where their class is
    /// still at the mix's `base` (a class the user set otherwise keeps that), and a tied
    /// embedding (it is the output) the lm_head's format. It depends on the model, so
    /// [`QuantPlan::for_model`] turns it into rules once the config is known.
    pub more_bits: Option<(WeightFormat, WeightFormat)>,
}

/// Named mixes `--format` / `--quant` accept besides the single formats, as llama.cpp's
/// `Q4_K_M` / `Q5_K_M` (`llama_tensor_get_type`): the base k-quant everywhere, the output
/// (lm_head, or the embedding where it is tied) in Q6_K, and Q6_K for the value projections
/// and the experts' `down_proj` in the first and last eighth of the layers and every third
/// one between.
pub const PRESETS: &[(&str, GgmlDType)] = &[("q4_k_m", GgmlDType::Q4K), ("q5_k_m", GgmlDType::Q5K)];

/// llama.cpp's choice of the layers that get more bits in its `_M` mixes: the first and
/// last eighth, and every third layer in between.
pub fn use_more_bits(layer: usize, layers: usize) -> bool {
    let eighth = layers / 8;
    layer < eighth || layer >= 7 * layers / 8 || (layer - eighth) % 3 == 2
}

impl QuantPlan {
    /// Every quantizable class (router excepted) in `format`.
    pub fn uniform(format: WeightFormat) -> QuantPlan {
        QuantPlan {
            embedding: format,
            lm_head: format,
            attention: format,
            expert: format,
            router: WeightFormat::Keep,
            rules: Vec::new(),
            more_bits: None,
        }
    }

    /// A single format (`q4_k`: [`QuantPlan::uniform`]) or a named mix of [`PRESETS`]
    /// (`q4_k_m`), as `--format` and `--quant` take them.
    pub fn named(s: &str) -> Result<QuantPlan> {
        let key = s.trim().to_ascii_lowercase();
        if let Some(&(_, base)) = PRESETS.iter().find(|(n, _)| *n == key) {
            let (base, q6) = (
                WeightFormat::Quant(base),
                WeightFormat::Quant(GgmlDType::Q6K),
            );
            return Ok(QuantPlan {
                lm_head: q6,
                more_bits: Some((base, q6)),
                ..QuantPlan::uniform(base)
            });
        }
        s.parse().map(QuantPlan::uniform).map_err(|e| match e {
            ZayaError::Input(m) => {
                let presets: Vec<&str> = PRESETS.iter().map(|(n, _)| *n).collect();
                ZayaError::Input(format!("{m}, or a mix: {}", presets.join(", ")))
            }
            other => other,
        })
    }

    /// The plan for a model of `cfg`: [`QuantPlan::more_bits`] written out as rules for the
    /// layers it picks, before the plan's own rules (which still win), and a tied embedding
    /// at the lm_head's format unless its own was set.
    pub fn for_model(&self, cfg: &crate::config::ZayaConfig) -> QuantPlan {
        let Some((base, more)) = self.more_bits else {
            return self.clone();
        };
        let layers = cfg.num_hidden_layers;
        let mut rules = Vec::new();
        for i in (0..layers).filter(|&i| use_more_bits(i, layers)) {
            if self.attention == base {
                rules.push((
                    format!("model.layers.{i}.self_attn.qkv_proj.v_proj_*"),
                    more,
                ));
            }
            if self.expert == base {
                rules.push((format!("model.layers.{i}.mlp.experts.down_proj"), more));
            }
        }
        rules.extend(self.rules.iter().cloned());
        let embedding = if cfg.tie_word_embeddings && self.embedding == base {
            self.lm_head
        } else {
            self.embedding
        };
        QuantPlan {
            embedding,
            rules,
            more_bits: None,
            ..self.clone()
        }
    }

    /// Whether a tied model of `cfg` is stored with its head apart: the lookup table
    /// (`--embed-format`) and the head (`--head-format`, or the mix's output format) were
    /// given different formats. The file then holds `model.embed_tokens.weight` for the
    /// lookup and `lm_head.weight` for the product, both rounded from the one tied weight,
    /// and its config is untied ([`QuantPlan::stored_config`]). Why: a looked-up row's
    /// rounding error enters the residual stream of every token unweighted (q8_0's lookup
    /// alone costs the default model KL ~1.5e-3), while the product's can be compensated
    /// by GPTQ and read in a cheaper format, and the lookup reads one row per token
    /// however wide its format.
    pub fn splits_tied_head(&self, cfg: &crate::config::ZayaConfig) -> bool {
        let plan = self.for_model(cfg);
        cfg.tie_word_embeddings && plan.requested(EMBEDDING) != plan.requested(LM_HEAD)
    }

    /// The config a file quantized under this plan describes: `cfg`, untied where the plan
    /// [splits the tied head](QuantPlan::splits_tied_head).
    pub fn stored_config(&self, cfg: &crate::config::ZayaConfig) -> crate::config::ZayaConfig {
        let mut out = cfg.clone();
        if self.splits_tied_head(cfg) {
            out.tie_word_embeddings = false;
        }
        out
    }

    /// The checkpoint tensor stored tensor `name` is rounded from (a split head: the tied
    /// embedding).
    pub fn source_of<'a>(&self, cfg: &crate::config::ZayaConfig, name: &'a str) -> &'a str {
        if name == LM_HEAD && self.splits_tied_head(cfg) {
            EMBEDDING
        } else {
            name
        }
    }

    /// The tensor under which the (tied) calibrating model observes the input of stored
    /// tensor `name`'s product, for its importance and GPTQ moments: a split head's input
    /// is observed as the tied embedding's, and a split lookup table has no product
    /// (`None`: plain rounding).
    pub fn observed_as<'a>(
        &self,
        cfg: &crate::config::ZayaConfig,
        name: &'a str,
    ) -> Option<&'a str> {
        match name {
            EMBEDDING if self.splits_tied_head(cfg) => None,
            _ => Some(self.source_of(cfg, name)),
        }
    }

    /// Parses a `PATTERN=FORMAT` rule (`*` matches any run of characters).
    pub fn parse_rule(s: &str) -> Result<(String, WeightFormat)> {
        let (pat, fmt) = s
            .rsplit_once('=')
            .ok_or_else(|| ZayaError::Input(format!("rule `{s}`: expected PATTERN=FORMAT")))?;
        Ok((pat.trim().to_string(), fmt.parse()?))
    }

    /// The requested format of native tensor `name` (before the block-size fallback).
    pub fn requested(&self, name: &str) -> WeightFormat {
        let class = TensorClass::of(name);
        let mut f = match class {
            TensorClass::Embedding => self.embedding,
            TensorClass::LmHead => self.lm_head,
            TensorClass::Attention => self.attention,
            TensorClass::Expert => self.expert,
            TensorClass::Router => self.router,
            TensorClass::Fixed => return WeightFormat::Keep,
        };
        for (pat, fmt) in &self.rules {
            if glob(pat, name) {
                f = *fmt;
            }
        }
        f
    }

    /// The format native tensor `name` of `shape` is stored in: the requested one, or the
    /// nearest format whose block divides the row length (see [`fallback`]).
    pub fn format_for(&self, name: &str, shape: &[usize]) -> WeightFormat {
        match self.requested(name) {
            WeightFormat::Quant(d) => fallback(d, shape),
            other => other,
        }
    }

    /// Bytes the weights of `cfg` hold once loaded in `dtype` under this plan: each stored
    /// tensor ([`QuantPlan::stored_config`]: a split head counts) quantized at its block
    /// size ([`held_bytes`]: zaya's kernels read the blocks in place) or dense in `dtype`
    /// (the balancing biases in f32).
    pub fn loaded_bytes(&self, cfg: &crate::config::ZayaConfig, dtype: DType) -> u64 {
        let plan = self.for_model(cfg);
        crate::weights::native_specs(&self.stored_config(cfg))
            .iter()
            .map(|s| match plan.format_for(&s.name, &s.shape) {
                WeightFormat::Quant(d) => held_bytes(d, s.shape.iter().product::<usize>()),
                _ => crate::weights::dense_bytes(&s.name, &s.shape, dtype),
            })
            .sum()
    }

    /// The peak of quantizing a dense checkpoint of `cfg` while loading it in `dtype`:
    /// [`QuantPlan::loaded_bytes`] and the transient of the largest tensor being quantized
    /// ([`rounding_transient_bytes`], its source stored with `stored_elem_bytes` per value).
    pub fn loading_bytes(
        &self,
        cfg: &crate::config::ZayaConfig,
        dtype: DType,
        stored_elem_bytes: usize,
    ) -> u64 {
        let plan = self.for_model(cfg);
        let rounding = crate::weights::native_specs(&self.stored_config(cfg))
            .iter()
            .filter_map(|s| match plan.format_for(&s.name, &s.shape) {
                WeightFormat::Quant(d) => Some(rounding_transient_bytes(
                    d,
                    s.shape.iter().product(),
                    stored_elem_bytes,
                )),
                _ => None,
            })
            .max()
            .unwrap_or(0);
        self.loaded_bytes(cfg, dtype) + rounding
    }

    /// Whether any tensor would be quantized.
    pub fn quantizes(&self) -> bool {
        let q = |f: &WeightFormat| matches!(f, WeightFormat::Quant(_));
        self.more_bits.as_ref().is_some_and(|(_, m)| q(m))
            || q(&self.embedding)
            || q(&self.lm_head)
            || q(&self.attention)
            || q(&self.expert)
            || q(&self.router)
            || self.rules.iter().any(|(_, f)| q(f))
    }
}

/// `*` matches any run of characters, everything else itself.
fn glob(pattern: &str, s: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == s;
    }
    let mut rest = s;
    for (i, part) in parts.iter().enumerate() {
        if i == 0 {
            match rest.strip_prefix(part) {
                Some(r) => rest = r,
                None => return false,
            }
        } else if i == parts.len() - 1 {
            return rest.ends_with(part);
        } else {
            match rest.find(part) {
                Some(p) => rest = &rest[p + part.len()..],
                None => return false,
            }
        }
    }
    true
}

/// Blocks run along the last axis (a row of `in` features). A k-quant needs rows of a
/// multiple of 256; when the row is shorter we do what llama.cpp does: take the nearest
/// 32-block format of at least the same precision (Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0,
/// Q2_K / Q3_K → Q4_0), and keep the tensor dense when not even 32 divides the row.
pub fn fallback(d: GgmlDType, shape: &[usize]) -> WeightFormat {
    let row = shape.last().copied().unwrap_or(0);
    let fits = |d: GgmlDType| row > 0 && row % d.block_size() == 0;
    if fits(d) {
        return WeightFormat::Quant(d);
    }
    let alt = match d {
        GgmlDType::Q4K => GgmlDType::Q5_0,
        GgmlDType::Q5K => GgmlDType::Q5_1,
        GgmlDType::Q6K => GgmlDType::Q8_0,
        GgmlDType::Q2K | GgmlDType::Q3K => GgmlDType::Q4_0,
        _ => return WeightFormat::Keep,
    };
    if fits(alt) {
        WeightFormat::Quant(alt)
    } else {
        WeightFormat::Keep
    }
}

/// Quantizes `t` (any float dtype) row by row into `d`.
pub fn quantize(t: &Tensor, d: GgmlDType) -> Result<QTensor> {
    quantize_rows(t, d, |x| QTensor::quantize(x, d))
}

/// [`quantize`] with per-feature importance weights (the last axis: `importance` has one
/// weight per column, or, for a stacked `[E, R, C]` tensor, `E · C`: one row of weights per
/// matrix). The k-quants (Q2_K to Q6_K) use candle's weighted search; Q4_0 and Q5_0 use
/// [`weighted_legacy`] (candle has none for them); the other formats have no weighted
/// quantizer (llama.cpp's Q8_0 ignores an importance matrix too) and are quantized as by
/// [`quantize`].
pub fn quantize_weighted(t: &Tensor, d: GgmlDType, importance: &[f32]) -> Result<QTensor> {
    if !takes_importance(d) {
        return quantize(t, d);
    }
    let cols = t.dims().last().copied().unwrap_or(0);
    importance_fits(t.dims(), importance.len()).map_err(ZayaError::Input)?;
    if importance.len() == cols {
        return quantize_rows(t, d, |x| weighted_rows(x, d, importance));
    }
    // one matrix at a time with its own weights; blocks never cross a row, so the bytes
    // join into the stacked tensor's
    let mut bytes = Vec::with_capacity(storage_bytes(d, t.elem_count()));
    for (e, w) in importance.chunks(cols).enumerate() {
        let m = t.get(e)?;
        bytes.extend_from_slice(&quantize_rows(&m, d, |x| weighted_rows(x, d, w))?.data()?);
    }
    let storage = QStorage::from_data(std::borrow::Cow::Owned(bytes), &Device::Cpu, d)?;
    Ok(QTensor::new(storage, t.shape().clone())?)
}

/// Whether `len` importance weights fit a tensor of `shape`: one per column, or for a
/// stacked `[E, R, C]` tensor one row of `C` per matrix; the error says what would.
pub fn importance_fits(shape: &[usize], len: usize) -> std::result::Result<(), String> {
    let cols = shape.last().copied().unwrap_or(0);
    if len == cols || (shape.len() == 3 && len == shape[0] * cols) {
        return Ok(());
    }
    Err(format!(
        "{len} importance weights for a tensor of shape {shape:?} (need {cols}{})",
        if shape.len() == 3 {
            format!(" or {}", shape[0] * cols)
        } else {
            String::new()
        }
    ))
}

/// Rows of `x` (f32, `[rows, cols]`) quantized into `d` with importance weights per column.
fn weighted_rows(x: &Tensor, d: GgmlDType, importance: &[f32]) -> candle_core::Result<QTensor> {
    match d {
        GgmlDType::Q4_0 | GgmlDType::Q5_0 => {
            let cols = x.dim(candle_core::D::Minus1)?;
            if cols == 0 || cols % 32 != 0 || importance.len() != cols {
                candle_core::bail!(
                    "{d:?} needs rows of a positive multiple of 32 values and one weight per \
                     value: rows of {cols}, {} weights",
                    importance.len()
                );
            }
            let data = x.flatten_all()?.to_vec1::<f32>()?;
            let mut bytes = Vec::with_capacity(storage_bytes(d, data.len()));
            for row in data.chunks(cols) {
                weighted_legacy(row, d, importance, &mut bytes);
            }
            let storage = QStorage::from_data(std::borrow::Cow::Owned(bytes), &Device::Cpu, d)?;
            QTensor::new(storage, x.shape().clone())
        }
        _ => QTensor::quantize_imatrix(x, importance, d),
    }
}

/// Whether [`quantize_weighted`] uses importance weights for `d`.
pub fn takes_importance(d: GgmlDType) -> bool {
    matches!(
        d,
        GgmlDType::Q2K
            | GgmlDType::Q3K
            | GgmlDType::Q4K
            | GgmlDType::Q5K
            | GgmlDType::Q6K
            | GgmlDType::Q4_0
            | GgmlDType::Q5_0
    )
}

/// One row quantized into Q4_0 (`d`: f16, 16 bytes of nibbles) or Q5_0 (`d`: f16, 32 high
/// bits, 16 bytes of nibbles) blocks of 32, appended to `out`, choosing each block's scale
/// to minimise the weighted squared error as llama.cpp's `quantize_row_q{4,5}_0_impl` do:
/// weight `w_j = importance_j · sqrt(σ² + x_j²)` (σ² the row's mean square), levels from
/// the max-magnitude scale, then 18 nearby scales tried ([`weighted_levels`]). A block
/// whose importance is all zero (features the calibration never saw active) gets uniform
/// importance here, where llama.cpp's weights would be all zero and its search degenerate.
fn weighted_legacy(row: &[f32], d: GgmlDType, importance: &[f32], out: &mut Vec<u8>) {
    let nmax = if d == GgmlDType::Q4_0 { 8 } else { 16 };
    let sigma2 = row.iter().map(|x| x * x).sum::<f32>() / row.len().max(1) as f32;
    for (xb, qw) in row.chunks(32).zip(importance.chunks(32)) {
        let mut w = [0f32; 32];
        // a block of features the calibration never saw active weighs them all alike
        let seen = qw.iter().any(|&q| q > 0.0);
        for j in 0..32 {
            w[j] = if seen { qw[j] } else { 1.0 } * (sigma2 + xb[j] * xb[j]).sqrt();
        }
        let mut l = [0u8; 32];
        let scale = weighted_levels(xb, nmax, &w, &mut l);
        out.extend_from_slice(&half::f16::from_f32(scale).to_bits().to_le_bytes());
        if nmax == 16 {
            let mut qh = 0u32;
            for (j, &q) in l.iter().enumerate() {
                qh |= u32::from(q >> 4) << j;
            }
            out.extend_from_slice(&qh.to_le_bytes());
        }
        for j in 0..16 {
            out.push((l[j] & 0x0f) | ((l[j + 16] & 0x0f) << 4));
        }
    }
}

/// Levels `l_j ∈ [0, 2·nmax)` (stored offset by `nmax`) and the scale `s` minimising
/// `Σ w_j (x_j − s·(l_j − nmax))²` over the candidate scales `−(nmax + 0.1·k) / max`,
/// `k = −9..=9` (`max` the entry of largest magnitude), each with its least-squares `s`
/// (llama.cpp's `make_qx_quants`, `rmse_type = 1`, with weights).
fn weighted_levels(x: &[f32], nmax: i32, w: &[f32], l: &mut [u8]) -> f32 {
    let (mut max, mut amax) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < 1e-15 {
        l.fill(0);
        return 0.0;
    }
    let level =
        |iscale: f32, v: f32| ((iscale * v).round_ties_even() as i32).clamp(-nmax, nmax - 1);
    let sums = |iscale: f32| {
        x.iter().zip(w).fold((0f32, 0f32), |(lx, l2), (&v, &wj)| {
            let q = level(iscale, v) as f32;
            (lx + wj * v * q, l2 + wj * q * q)
        })
    };
    let fill = |iscale: f32, l: &mut [u8]| {
        for (q, &v) in l.iter_mut().zip(x) {
            *q = (level(iscale, v) + nmax) as u8;
        }
    };
    let iscale = -(nmax as f32) / max;
    fill(iscale, l);
    let (sumlx, suml2) = sums(iscale);
    let mut scale = if suml2 > 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for k in (-9..=9).filter(|&k| k != 0) {
        let iscale = -(nmax as f32 + 0.1 * k as f32) / max;
        let (sumlx, suml2) = sums(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            fill(iscale, l);
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// `q` over blocks of whole rows of `t` on the kernel pool, the bytes joined in row order.
/// A quantization block never crosses a row (and the importance weights are per column), so
/// the bytes equal one call over the whole tensor; candle's quantizers are single-threaded,
/// and an 8B q4_k took 10–15 minutes on one core.
///
/// Each block is handed to `q` in f32 storage of its own: candle 0.11's `QTensor::quantize`
/// reads the whole storage buffer and ignores the layout's offset, so a view (`t.get(e)`, a
/// narrow) would quantize its parent's first rows instead (a debug assertion catches it, a
/// release build does not).
fn quantize_rows(
    t: &Tensor,
    d: GgmlDType,
    q: impl Fn(&Tensor) -> candle_core::Result<QTensor> + Sync + Send,
) -> Result<QTensor> {
    let shape = t.shape().clone();
    let cols = shape.dims().last().copied().unwrap_or(1).max(1);
    let rows = t.elem_count() / cols;
    let flat = t.reshape((rows, cols))?;
    // Rows `r0..r1` in f32, as a fresh buffer: one part at a time, never the whole tensor
    // (ZAYA1-8B's embedding is 2.1 GB in f32; `Tensor::copy` would clone the whole parent
    // buffer too, a Vec does not).
    let part = |r0: usize, r1: usize| -> candle_core::Result<Tensor> {
        let v = flat
            .narrow(0, r0, r1 - r0)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Tensor::from_vec(v, (r1 - r0, cols), &Device::Cpu)
    };
    // a few blocks per thread, each at least 64 rows (not worth a task below), and at most
    // 16 Mi values each
    let blocks = (4 * crate::kernels::cpu::num_threads())
        .max(rows * cols / (1 << 24))
        .min(rows / 64)
        .max(1);
    if blocks == 1 {
        return Ok(q(&part(0, rows)?.reshape(shape)?)?);
    }
    let per = rows.div_ceil(blocks);
    let parts = crate::kernels::cpu::par_map(rows.div_ceil(per), rows * cols, |b| {
        let (r0, r1) = (b * per, ((b + 1) * per).min(rows));
        Ok::<_, candle_core::Error>(q(&part(r0, r1)?)?.data()?.into_owned())
    });
    let mut bytes = Vec::with_capacity(rows * cols / d.block_size() * d.type_size());
    for p in parts {
        bytes.extend_from_slice(&p?);
    }
    let storage = QStorage::from_data(std::borrow::Cow::Owned(bytes), &Device::Cpu, d)?;
    Ok(QTensor::new(storage, shape)?)
}

/// Splits a stacked `[E, R, C]` quantized tensor into `E` quantized `[R, C]` matrices (the
/// rows of each expert are contiguous, and blocks never cross a row).
pub fn split_experts(q: &QTensor) -> Result<Vec<Arc<QTensor>>> {
    let (e, r, c) = q.shape().dims3()?;
    let data = q.data()?;
    let per = data.len() / e.max(1);
    (0..e)
        .map(|i| {
            let bytes = &data[i * per..(i + 1) * per];
            let storage =
                QStorage::from_data(std::borrow::Cow::Borrowed(bytes), &Device::Cpu, q.dtype())?;
            Ok(Arc::new(QTensor::new(storage, (r, c))?))
        })
        .collect()
}

/// Bytes a quantized matrix of `elems` values in `d` holds once used: its blocks, and the
/// repacked copy candle's matmul keeps beside them for the formats it repacks on this
/// target that zaya's own kernels do not run (the k-quants and Q8_0 run on zaya's, in
/// place; on x86 candle repacks no other format, on aarch64 it repacks Q4_0).
pub fn held_bytes(d: GgmlDType, elems: usize) -> u64 {
    let repacked = cfg!(target_arch = "aarch64") && d == GgmlDType::Q4_0;
    storage_bytes(d, elems) as u64 * if repacked { 2 } else { 1 }
}

/// Memory held for a moment while one tensor of `elems` values, stored with
/// `stored_elem_bytes` per value, is quantized to `d` at load: its stored copy and its f32
/// form, and the quantized blocks twice (the row blocks' parts and the joined tensor).
pub fn rounding_transient_bytes(d: GgmlDType, elems: usize, stored_elem_bytes: usize) -> u64 {
    ((4 + stored_elem_bytes) * elems + 2 * storage_bytes(d, elems)) as u64
}

/// Bytes a tensor of `elems` elements takes in `d`.
pub fn storage_bytes(d: GgmlDType, elems: usize) -> usize {
    elems / d.block_size() * d.type_size()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Quantizing blocks of rows on the pool gives the bytes of one call over the whole
    /// tensor (and of a stacked expert tensor), with and without importance weights.
    #[test]
    fn row_blocks_on_the_pool_give_the_bytes_of_one_call() {
        let dev = Device::Cpu;
        for (d, shape) in [
            (GgmlDType::Q4K, vec![1000, 512]),
            (GgmlDType::Q6K, vec![3, 300, 256]),
            (GgmlDType::Q8_0, vec![777, 96]),
            (GgmlDType::Q5_0, vec![64, 64]),
        ] {
            let t = Tensor::randn(0f32, 1.0, shape.as_slice(), &dev).unwrap();
            let cols = *shape.last().unwrap();
            let imp: Vec<f32> = (0..cols).map(|c| 1.0 + (c % 7) as f32).collect();
            let want = QTensor::quantize(&t, d).unwrap();
            let got = quantize(&t, d).unwrap();
            assert_eq!(got.shape(), want.shape());
            assert!(
                got.data().unwrap() == want.data().unwrap(),
                "{d:?} {shape:?}"
            );
            // Q8_0 has no weighted quantizer: the plain bytes
            let want = if takes_importance(d) {
                weighted_rows(&t, d, &imp).unwrap()
            } else {
                want
            };
            let got = quantize_weighted(&t, d, &imp).unwrap();
            assert!(
                got.data().unwrap() == want.data().unwrap(),
                "{d:?} {shape:?} imatrix"
            );
        }
    }

    /// `Σ_cols w · Σ_rows (x − deq(q(x)))²`.
    fn weighted_error(t: &Tensor, q: &QTensor, w: &[f32]) -> f64 {
        let x = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let y = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap();
        let y = y.to_vec1::<f32>().unwrap();
        x.iter()
            .zip(&y)
            .enumerate()
            .map(|(i, (a, b))| w[i % w.len()] as f64 * ((a - b) as f64).powi(2))
            .sum()
    }

    /// The weighted Q4_0 / Q5_0 blocks decode (through candle) to what they should: values
    /// on the format's grid come back exactly, and with importance weights the weighted
    /// error is well below the unweighted quantizer's (what the weights are for).
    #[test]
    fn weighted_legacy_blocks_decode_exactly_and_cut_the_weighted_error() {
        let dev = Device::Cpu;
        for (d, nmax) in [(GgmlDType::Q4_0, 8i32), (GgmlDType::Q5_0, 16)] {
            // a row on the grid: scale 0.25 (exact in f16), levels −nmax..nmax−1, −nmax
            // first so the largest magnitude is negative as the format expects
            let row: Vec<f32> = (0..64)
                .map(|j| 0.25 * ((-nmax + (j * 7) % (2 * nmax)) as f32))
                .collect();
            let t = Tensor::from_vec(row.clone(), (1, 64), &dev).unwrap();
            let q = quantize_weighted(&t, d, &[1.0; 64]).unwrap();
            let back = q.dequantize(&dev).unwrap().flatten_all().unwrap();
            assert_eq!(back.to_vec1::<f32>().unwrap(), row, "{d:?}");

            // features 0..8 of every block matter 100× more
            let t = Tensor::randn(0f32, 1.0, (64, 256), &dev).unwrap();
            let imp: Vec<f32> = (0..256)
                .map(|c| if c % 32 < 8 { 100.0 } else { 1.0 })
                .collect();
            let plain = weighted_error(&t, &quantize(&t, d).unwrap(), &imp);
            let weighted = weighted_error(&t, &quantize_weighted(&t, d, &imp).unwrap(), &imp);
            assert!(
                weighted < 0.8 * plain,
                "{d:?}: {weighted} vs unweighted {plain}"
            );
        }
    }

    /// A stacked `[E, R, C]` tensor with `E · C` weights: each matrix quantized with its
    /// own row of weights, the bytes those of quantizing the matrices one by one.
    #[test]
    fn per_matrix_importance_quantizes_each_matrix_with_its_weights() {
        let dev = Device::Cpu;
        let t = Tensor::randn(0f32, 1.0, (3, 70, 256), &dev).unwrap();
        let imp: Vec<f32> = (0..3 * 256).map(|i| 1.0 + ((i * 13) % 17) as f32).collect();
        for d in [GgmlDType::Q4K, GgmlDType::Q5_0] {
            let got = quantize_weighted(&t, d, &imp).unwrap();
            assert_eq!(got.shape().dims(), &[3, 70, 256]);
            let mut want = Vec::new();
            for e in 0..3 {
                let m = Tensor::from_vec(
                    t.get(e)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap(),
                    (70, 256),
                    &dev,
                )
                .unwrap();
                let w = &imp[e * 256..(e + 1) * 256];
                want.extend_from_slice(&quantize_weighted(&m, d, w).unwrap().data().unwrap());
            }
            assert!(got.data().unwrap().as_ref() == want.as_slice(), "{d:?}");
        }
        let err = quantize_weighted(&t, GgmlDType::Q4K, &imp[..100]).unwrap_err();
        assert!(err.to_string().contains("[3, 70, 256]"), "{err}");
        // rows that are no whole number of blocks: an error, not a panic
        let short = Tensor::randn(0f32, 1.0, (4, 40), &dev).unwrap();
        assert!(quantize_weighted(&short, GgmlDType::Q4_0, &[1.0; 40]).is_err());
    }

    #[test]
    fn classes_of_native_names() {
        let c = TensorClass::of;
        assert_eq!(c("model.embed_tokens.weight"), TensorClass::Embedding);
        assert_eq!(c("lm_head.weight"), TensorClass::LmHead);
        assert_eq!(
            c("model.layers.3.self_attn.qkv_proj.v_proj_delayed.weight"),
            TensorClass::Attention
        );
        assert_eq!(
            c("model.layers.3.self_attn.o_proj.weight"),
            TensorClass::Attention
        );
        assert_eq!(
            c("model.layers.3.self_attn.o_proj.bias"),
            TensorClass::Fixed
        );
        assert_eq!(
            c("model.layers.0.mlp.gate.router_mlp.fc1.weight"),
            TensorClass::Router
        );
        assert_eq!(
            c("model.layers.0.mlp.gate.down_proj.weight"),
            TensorClass::Router
        );
        assert_eq!(
            c("model.layers.0.mlp.experts.down_proj"),
            TensorClass::Expert
        );
        assert_eq!(
            c("model.layers.0.self_attn.qkv_proj.conv_qk_grouped.weight"),
            TensorClass::Fixed
        );
        assert_eq!(
            c("model.layers.0.mlp.gate.balancing_biases"),
            TensorClass::Fixed
        );
    }

    #[test]
    fn plan_rules_and_fallback() {
        let mut plan = QuantPlan::uniform("q4_k".parse().unwrap());
        plan.rules
            .push(QuantPlan::parse_rule("model.layers.0.*=q8_0").unwrap());
        let expert = "model.layers.1.mlp.experts.down_proj";
        assert_eq!(
            plan.format_for(expert, &[4, 512, 256]),
            WeightFormat::Quant(GgmlDType::Q4K)
        );
        // 128-wide rows do not fit a k-quant block: Q4_K falls back to Q5_0.
        assert_eq!(
            plan.format_for(expert, &[4, 512, 128]),
            WeightFormat::Quant(GgmlDType::Q5_0)
        );
        // 40-wide rows fit no block: dense.
        assert_eq!(plan.format_for(expert, &[4, 512, 40]), WeightFormat::Keep);
        let first = "model.layers.0.mlp.experts.down_proj";
        assert_eq!(
            plan.format_for(first, &[4, 512, 256]),
            WeightFormat::Quant(GgmlDType::Q8_0)
        );
        // Fixed tensors ignore rules.
        assert_eq!(
            plan.format_for("model.layers.0.input_layernorm.weight", &[256]),
            WeightFormat::Keep
        );
        assert!("q9_9".parse::<WeightFormat>().is_err());
        assert!(QuantPlan::parse_rule("nope").is_err());
    }

    /// llama.cpp's layer choice (`use_more_bits`) on ZAYA1-8B's 40 layers and the default
    /// model's 4, and what `q4_k_m` gives each tensor class once resolved for a model.
    #[test]
    fn k_m_mixes_follow_llama_cpp() {
        let more: Vec<usize> = (0..40).filter(|&i| use_more_bits(i, 40)).collect();
        let mut want: Vec<usize> = (0..5).chain(35..40).collect();
        want.extend((7..35).step_by(3));
        want.sort();
        assert_eq!(more, want);
        assert_eq!(
            (0..4).filter(|&i| use_more_bits(i, 4)).collect::<Vec<_>>(),
            [2, 3]
        );
        let (q4, q6, q8) = (
            WeightFormat::Quant(GgmlDType::Q4K),
            WeightFormat::Quant(GgmlDType::Q6K),
            WeightFormat::Quant(GgmlDType::Q8_0),
        );
        let mut cfg = crate::config::ZayaConfig::from_json(&serde_json::json!({
            "model_type": "zaya", "vocab_size": 64, "hidden_size": 256, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
            "moe_intermediate_size": 256, "num_experts": 4, "router_hidden_size": 8
        }))
        .unwrap();
        let named = QuantPlan::named("Q4_K_M").unwrap();
        assert!(named.quantizes());
        let mut user = named.clone();
        user.rules
            .push(QuantPlan::parse_rule("model.layers.3.mlp.experts.down_proj=q8_0").unwrap());
        let plan = user.for_model(&cfg);
        assert_eq!(plan.more_bits, None);
        let at = |plan: &QuantPlan, name: &str| plan.format_for(name, &[4, 512, 256]);
        // tied: the embedding is the output
        assert!(cfg.tie_word_embeddings);
        assert_eq!(at(&plan, "model.embed_tokens.weight"), q6);
        assert_eq!(at(&plan, "lm_head.weight"), q6);
        for (layer, want) in [(0, q4), (1, q4), (2, q6), (3, q6)] {
            for v in ["v_proj_current", "v_proj_delayed"] {
                let name = format!("model.layers.{layer}.self_attn.qkv_proj.{v}.weight");
                assert_eq!(at(&plan, &name), want, "{name}");
            }
            let q = format!("model.layers.{layer}.self_attn.qkv_proj.q_proj.weight");
            assert_eq!(at(&plan, &q), q4);
            let o = format!("model.layers.{layer}.self_attn.o_proj.weight");
            assert_eq!(at(&plan, &o), q4);
            let gu = format!("model.layers.{layer}.mlp.experts.gate_up_proj");
            assert_eq!(at(&plan, &gu), q4);
        }
        assert_eq!(at(&plan, "model.layers.1.mlp.experts.down_proj"), q4);
        assert_eq!(at(&plan, "model.layers.2.mlp.experts.down_proj"), q6);
        // the user's own rules still win over the mix
        assert_eq!(at(&plan, "model.layers.3.mlp.experts.down_proj"), q8);
        // a class the user set keeps its format (no lower one on the picked layers)
        let mut classes = named.clone();
        classes.expert = q8;
        classes.attention = WeightFormat::Keep;
        classes.embedding = q8;
        let plan = classes.for_model(&cfg);
        assert_eq!(at(&plan, "model.layers.2.mlp.experts.down_proj"), q8);
        let v = "model.layers.2.self_attn.qkv_proj.v_proj_current.weight";
        assert_eq!(at(&plan, v), WeightFormat::Keep);
        assert_eq!(at(&plan, "model.embed_tokens.weight"), q8);
        // untied: the embedding stays at the base, the lm_head gets q6_k
        cfg.tie_word_embeddings = false;
        let plan = named.for_model(&cfg);
        assert_eq!(at(&plan, "model.embed_tokens.weight"), q4);
        assert_eq!(at(&plan, "lm_head.weight"), q6);
        // q5_k_m: the same mix over q5_k; single formats are uniform plans
        let q5 = QuantPlan::named("q5_k_m").unwrap().for_model(&cfg);
        assert_eq!(
            at(&q5, "model.layers.0.mlp.experts.down_proj"),
            WeightFormat::Quant(GgmlDType::Q5K)
        );
        assert_eq!(
            QuantPlan::named("q8_0").unwrap(),
            QuantPlan::uniform("q8_0".parse().unwrap())
        );
        let err = QuantPlan::named("q4_k_x").unwrap_err().to_string();
        assert!(err.contains("q4_k_m"), "{err}");
    }

    /// What a quantized model holds: each stored tensor once at its block size (no
    /// repacked copy), a tied head stored apart counted too; loading adds the largest
    /// tensor's rounding transient.
    #[test]
    fn loaded_bytes_count_blocks_in_place_and_a_split_head() {
        let cfg = crate::config::ZayaConfig::from_json(&serde_json::json!({
            "model_type": "zaya", "vocab_size": 512, "hidden_size": 256, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
            "moe_intermediate_size": 256, "num_experts": 4, "router_hidden_size": 8
        }))
        .unwrap();
        let specs = crate::weights::native_specs(&cfg);
        let dense = crate::weights::Checkpoint::required_bytes(&cfg, DType::F32);
        let q8 = WeightFormat::Quant(GgmlDType::Q8_0);
        let plan = QuantPlan::uniform(q8);
        // every quantized tensor at its block size (34 bytes per 32 values), once
        let by_hand: u64 = specs
            .iter()
            .map(|s| {
                let elems = s.shape.iter().product::<usize>() as u64;
                match plan.format_for(&s.name, &s.shape) {
                    WeightFormat::Quant(_) => elems / 32 * 34,
                    _ => crate::weights::dense_bytes(&s.name, &s.shape, DType::F32),
                }
            })
            .sum();
        assert_eq!(plan.loaded_bytes(&cfg, DType::F32), by_hand);
        assert!(by_hand < dense / 3, "{by_hand} vs {dense}");
        // the lookup kept while the tied head is q8_0: the head is stored apart too
        let split = QuantPlan {
            embedding: WeightFormat::Keep,
            ..plan.clone()
        };
        assert!(split.splits_tied_head(&cfg));
        let table = 512 * 256;
        assert_eq!(
            split.loaded_bytes(&cfg, DType::F32),
            by_hand - table / 32 * 34 + 4 * table + table / 32 * 34
        );
        // quantizing while loading reads the largest quantized tensor whole in f32
        let largest = specs
            .iter()
            .filter(|s| matches!(plan.format_for(&s.name, &s.shape), WeightFormat::Quant(_)))
            .map(|s| {
                let elems = s.shape.iter().product::<usize>() as u64;
                8 * elems + 2 * elems / 32 * 34
            })
            .max()
            .unwrap();
        assert_eq!(plan.loading_bytes(&cfg, DType::F32, 4), by_hand + largest);
        // no plan that quantizes: the dense bytes
        assert_eq!(
            QuantPlan::uniform(WeightFormat::Keep).loaded_bytes(&cfg, DType::F32),
            dense
        );
    }

    /// A tied embedding is stored apart from its head exactly when the lookup's and the
    /// head's formats differ; the head is then read from the embedding and observed as it,
    /// the lookup is observed as nothing, and the stored config is untied.
    #[test]
    fn a_tied_head_is_stored_apart_when_its_format_differs_from_the_lookup() {
        let (emb, head) = ("model.embed_tokens.weight", "lm_head.weight");
        let mut cfg = crate::config::ZayaConfig::from_json(&serde_json::json!({
            "model_type": "zaya", "vocab_size": 64, "hidden_size": 256, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
            "moe_intermediate_size": 256, "num_experts": 4, "router_hidden_size": 8
        }))
        .unwrap();
        assert!(cfg.tie_word_embeddings);
        let q8 = WeightFormat::Quant(GgmlDType::Q8_0);
        let mix = QuantPlan::named("q4_k_m").unwrap();
        let lookup_kept = QuantPlan {
            embedding: WeightFormat::Keep,
            ..mix.clone()
        };
        let uniform_kept = QuantPlan {
            embedding: WeightFormat::Keep,
            ..QuantPlan::uniform(q8)
        };
        let both_kept = QuantPlan {
            lm_head: WeightFormat::Keep,
            ..uniform_kept.clone()
        };
        let mut head_rule = mix.clone();
        head_rule.rules.push((head.into(), q8));
        for (plan, split) in [
            (&mix, false), // the embedding follows the mix's head format
            (&QuantPlan::uniform(q8), false),
            (&both_kept, false),
            (&lookup_kept, true),
            (&uniform_kept, true),
            (&head_rule, true), // a rule on the head's name alone
        ] {
            assert_eq!(plan.splits_tied_head(&cfg), split, "{plan:?}");
            assert_eq!(plan.stored_config(&cfg).tie_word_embeddings, !split);
            assert_eq!(plan.source_of(&cfg, head), if split { emb } else { head });
            assert_eq!(plan.observed_as(&cfg, emb), (!split).then_some(emb));
            let observed = if split { emb } else { head };
            assert_eq!(plan.observed_as(&cfg, head), Some(observed));
            let layer = "model.layers.0.mlp.experts.down_proj";
            assert_eq!(plan.source_of(&cfg, layer), layer);
            assert_eq!(plan.observed_as(&cfg, layer), Some(layer));
        }
        let resolved = lookup_kept.for_model(&cfg);
        assert_eq!(resolved.requested(emb), WeightFormat::Keep);
        assert_eq!(
            resolved.requested(head),
            WeightFormat::Quant(GgmlDType::Q6K)
        );
        // an untied model stores its own two tensors whatever the formats
        cfg.tie_word_embeddings = false;
        assert!(!lookup_kept.splits_tied_head(&cfg));
        assert_eq!(lookup_kept.source_of(&cfg, head), head);
        assert_eq!(lookup_kept.observed_as(&cfg, emb), Some(emb));
    }

    #[test]
    fn glob_matches() {
        assert!(glob("a*c", "abbbc"));
        assert!(glob("*.weight", "x.weight"));
        assert!(!glob("a*c", "abd"));
        assert!(glob("exact", "exact"));
        assert!(glob("*", ""));
    }

    #[test]
    fn split_experts_equals_per_expert_quantization() {
        let t = Tensor::randn(0f32, 1., (3, 4, 64), &Device::Cpu).unwrap();
        let whole = quantize(&t, GgmlDType::Q8_0).unwrap();
        let parts = split_experts(&whole).unwrap();
        for (e, p) in parts.iter().enumerate() {
            let own = quantize(&t.get(e).unwrap(), GgmlDType::Q8_0).unwrap();
            assert_eq!(p.data().unwrap(), own.data().unwrap());
            assert_eq!(p.shape().dims(), &[4, 64]);
        }
    }
}
