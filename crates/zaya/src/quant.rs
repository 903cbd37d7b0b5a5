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

impl TensorClass {
    /// The class of native tensor `name`.
    pub fn of(name: &str) -> TensorClass {
        if name == "model.embed_tokens.weight" {
            return TensorClass::Embedding;
        }
        if name == "lm_head.weight" {
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

    /// Whether any tensor would be quantized.
    pub fn quantizes(&self) -> bool {
        let q = |f: &WeightFormat| matches!(f, WeightFormat::Quant(_));
        q(&self.embedding)
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

/// [`quantize`] with per-feature importance weights (the last axis). candle weighs the
/// error in the k-quants (Q2_K to Q6_K) only; the 32-block formats have no weighted search
/// (candle panics when asked), so they are quantized as by [`quantize`], as llama.cpp's
/// legacy formats ignore an importance matrix.
pub fn quantize_weighted(t: &Tensor, d: GgmlDType, importance: &[f32]) -> Result<QTensor> {
    if !takes_importance(d) {
        return quantize(t, d);
    }
    quantize_rows(t, d, |x| QTensor::quantize_imatrix(x, importance, d))
}

/// Whether candle's quantizer for `d` uses importance weights.
pub fn takes_importance(d: GgmlDType) -> bool {
    matches!(
        d,
        GgmlDType::Q2K | GgmlDType::Q3K | GgmlDType::Q4K | GgmlDType::Q5K | GgmlDType::Q6K
    )
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
    // (`Tensor::copy` clones the whole parent buffer too; going through a Vec does not.)
    let data = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let shape = t.shape().clone();
    let cols = shape.dims().last().copied().unwrap_or(1).max(1);
    let rows = data.len() / cols;
    // a few blocks per thread, each at least 64 rows (not worth a task below)
    let blocks = (4 * crate::kernels::cpu::num_threads())
        .min(rows / 64)
        .max(1);
    if blocks == 1 {
        return Ok(q(&Tensor::from_vec(data, shape, &Device::Cpu)?)?);
    }
    let per = rows.div_ceil(blocks);
    let parts = crate::kernels::cpu::par_map(rows.div_ceil(per), data.len(), |b| {
        let (r0, r1) = (b * per, ((b + 1) * per).min(rows));
        let x = Tensor::from_slice(&data[r0 * cols..r1 * cols], (r1 - r0, cols), &Device::Cpu)?;
        Ok::<_, candle_core::Error>(q(&x)?.data()?.into_owned())
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
            // the 32-block formats have no weighted quantizer: the plain bytes
            let want = if takes_importance(d) {
                QTensor::quantize_imatrix(&t, &imp, d).unwrap()
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
