//! Model configuration: HF `config.json` of `model_type: "zaya"` (transformers 5.23) and the
//! legacy 80-layer fork layout, validated like the reference with errors that name the field.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{Result, ZayaError};

/// Attention flavour of one decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LayerType {
    /// Full causal attention + CCA state.
    Hybrid,
    /// Sliding-window causal attention + CCA state.
    HybridSliding,
}

impl LayerType {
    pub fn as_str(self) -> &'static str {
        match self {
            LayerType::Hybrid => "hybrid",
            LayerType::HybridSliding => "hybrid_sliding",
        }
    }

    fn parse(s: &str, field: &str) -> Result<Self> {
        match s {
            "hybrid" => Ok(LayerType::Hybrid),
            "hybrid_sliding" => Ok(LayerType::HybridSliding),
            other => Err(ZayaError::config(
                field,
                format!("unknown layer type `{other}` (expected `hybrid` or `hybrid_sliding`)"),
            )),
        }
    }
}

/// RoPE scaling flavour of one layer type.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    Default,
    /// Positions divided by `factor` (HF `linear`).
    Linear {
        factor: f32,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct RopeParameters {
    pub rope_theta: f64,
    pub partial_rotary_factor: f64,
    pub scaling: RopeScaling,
}

impl RopeParameters {
    fn default_for(layer_type: LayerType) -> Self {
        RopeParameters {
            rope_theta: match layer_type {
                LayerType::Hybrid => 5_000_000.0,
                LayerType::HybridSliding => 10_000.0,
            },
            partial_rotary_factor: 0.5,
            scaling: RopeScaling::Default,
        }
    }

    fn to_json(&self) -> Value {
        let mut m = Map::new();
        match &self.scaling {
            RopeScaling::Default => {
                m.insert("rope_type".into(), "default".into());
            }
            RopeScaling::Linear { factor } => {
                m.insert("rope_type".into(), "linear".into());
                m.insert("factor".into(), (*factor as f64).into());
            }
        }
        m.insert("rope_theta".into(), self.rope_theta.into());
        m.insert(
            "partial_rotary_factor".into(),
            self.partial_rotary_factor.into(),
        );
        Value::Object(m)
    }
}

/// The ZAYA1 configuration in HF-native terms (one layer = CCA attention + MoE).
#[derive(Debug, Clone, PartialEq)]
pub struct ZayaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    pub initializer_range: f64,
    pub rms_norm_eps: f64,
    pub use_cache: bool,
    pub tie_word_embeddings: bool,
    pub rope_parameters: BTreeMap<LayerType, RopeParameters>,
    pub sliding_window: Option<usize>,
    pub attention_dropout: f64,
    pub moe_intermediate_size: usize,
    pub num_experts_per_tok: usize,
    pub num_experts: usize,
    pub layer_types: Vec<LayerType>,
    pub pad_token_id: Option<u32>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Vec<u32>,
    pub attention_bias: bool,
    pub lm_head_bias: bool,
    pub router_hidden_size: usize,
    pub cca_time0: usize,
    pub cca_time1: usize,
    /// zaya extension (the reference dropped it): weight of the router load-balancing loss
    /// during training. 0 switches it off.
    pub router_aux_loss_coef: f64,
}

/// Reads typed fields out of a JSON object; every error names the field.
struct Fields<'a> {
    obj: &'a Map<String, Value>,
}

impl<'a> Fields<'a> {
    fn present(&self, key: &str) -> Option<&'a Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    fn usize(&self, key: &str, default: Option<usize>) -> Result<usize> {
        match self.present(key) {
            None => default.ok_or_else(|| ZayaError::config(key, "is required")),
            Some(v) => match v.as_u64() {
                // far above any real model; keeps products of sizes and allocations sane
                Some(x) if x <= MAX_CONFIG_INT => Ok(x as usize),
                Some(x) => Err(ZayaError::config(
                    key,
                    format!("{x} is larger than the supported maximum {MAX_CONFIG_INT}"),
                )),
                None => Err(ZayaError::config(
                    key,
                    format!("expected a non-negative integer, found {v}"),
                )),
            },
        }
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.present(key) {
            None => Ok(None),
            Some(_) => self.usize(key, None).map(Some),
        }
    }

    fn f64(&self, key: &str, default: f64) -> Result<f64> {
        match self.present(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| ZayaError::config(key, format!("expected a number, found {v}"))),
        }
    }

    fn bool(&self, key: &str, default: bool) -> Result<bool> {
        match self.present(key) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| {
                ZayaError::config(key, format!("expected true or false, found {v}"))
            }),
        }
    }

    fn string(&self, key: &str, default: &str) -> Result<String> {
        match self.present(key) {
            None => Ok(default.to_string()),
            Some(v) => v
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| ZayaError::config(key, format!("expected a string, found {v}"))),
        }
    }

    fn token_id(&self, key: &str, default: Option<u32>) -> Result<Option<u32>> {
        match self.obj.get(key) {
            None => Ok(default),
            Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .filter(|x| *x <= u32::MAX as u64)
                .map(|x| Some(x as u32))
                .ok_or_else(|| ZayaError::config(key, format!("expected a token id, found {v}"))),
        }
    }

    fn token_ids(&self, key: &str, default: &[u32]) -> Result<Vec<u32>> {
        match self.obj.get(key) {
            None => Ok(default.to_vec()),
            Some(Value::Null) => Ok(vec![]),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_u64()
                        .filter(|x| *x <= u32::MAX as u64)
                        .map(|x| x as u32)
                        .ok_or_else(|| {
                            ZayaError::config(key, format!("expected token ids, found {v}"))
                        })
                })
                .collect(),
            Some(v) => self
                .token_id(key, None)
                .map(|x| x.into_iter().collect())
                .map_err(|_| {
                    ZayaError::config(
                        key,
                        format!("expected a token id or a list of them, found {v}"),
                    )
                }),
        }
    }
}

fn parse_rope_entry(v: &Value, field: &str) -> Result<RopeParameters> {
    let obj = v
        .as_object()
        .ok_or_else(|| ZayaError::config(field, format!("expected an object, found {v}")))?;
    let f = Fields { obj };
    let rope_type = f
        .string("rope_type", "default")
        .map_err(|_| ZayaError::config(format!("{field}.rope_type"), "expected a string"))?;
    let scaling = match rope_type.as_str() {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear {
            factor: f
                .f64("factor", 1.0)
                .map_err(|_| ZayaError::config(format!("{field}.factor"), "expected a number"))?
                as f32,
        },
        other => {
            return Err(ZayaError::config(
                format!("{field}.rope_type"),
                format!("rope type `{other}` is not supported (supported: default, linear)"),
            ))
        }
    };
    let rope_theta = f
        .f64("rope_theta", f64::NAN)
        .map_err(|_| ZayaError::config(format!("{field}.rope_theta"), "expected a number"))?;
    if rope_theta.is_nan() || rope_theta <= 0.0 {
        return Err(ZayaError::config(
            format!("{field}.rope_theta"),
            "is required and must be positive",
        ));
    }
    let partial_rotary_factor = f.f64("partial_rotary_factor", 1.0).map_err(|_| {
        ZayaError::config(
            format!("{field}.partial_rotary_factor"),
            "expected a number",
        )
    })?;
    Ok(RopeParameters {
        rope_theta,
        partial_rotary_factor,
        scaling,
    })
}

/// Largest integer a config field may hold (2^31 − 1): real sizes are far smaller, and the
/// bound keeps products of sizes from overflowing.
pub const MAX_CONFIG_INT: u64 = (1 << 31) - 1;

/// Most decoder layers a config may declare (per-layer state is allocated up front; a fuzzed
/// `num_hidden_layers` of 2^32 asked for 144 GiB).
pub const MAX_LAYERS: usize = 4096;

fn check_layer_count(n: usize) -> Result<()> {
    if n > MAX_LAYERS {
        return Err(ZayaError::config(
            "num_hidden_layers",
            format!("{n} is more than the supported {MAX_LAYERS} layers"),
        ));
    }
    Ok(())
}

impl ZayaConfig {
    /// Reads `config.json` written by transformers for the native layout.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let value = read_json(path.as_ref())?;
        Self::from_json(&value)
    }

    /// Parses the native (HF 5.23) schema.
    pub fn from_json(value: &Value) -> Result<Self> {
        let obj = value
            .as_object()
            .ok_or_else(|| ZayaError::config("<root>", "config must be a JSON object"))?;
        let f = Fields { obj };
        if let Some(mt) = f.present("model_type") {
            if mt.as_str() != Some("zaya") {
                return Err(ZayaError::config(
                    "model_type",
                    format!("expected \"zaya\", found {mt}"),
                ));
            }
        }
        let num_hidden_layers = f.usize("num_hidden_layers", Some(40))?;
        check_layer_count(num_hidden_layers)?;
        let layer_types = match f.present("layer_types") {
            None => vec![LayerType::Hybrid; num_hidden_layers],
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    let field = format!("layer_types[{i}]");
                    let s = v.as_str().ok_or_else(|| {
                        ZayaError::config(&field, format!("expected a string, found {v}"))
                    })?;
                    LayerType::parse(s, &field)
                })
                .collect::<Result<Vec<_>>>()?,
            Some(v) => {
                return Err(ZayaError::config(
                    "layer_types",
                    format!("expected a list of layer types, found {v}"),
                ))
            }
        };
        let rope_parameters = parse_rope_parameters(f.present("rope_parameters"), &layer_types)?;
        let cfg = ZayaConfig {
            vocab_size: f.usize("vocab_size", Some(262_272))?,
            hidden_size: f.usize("hidden_size", Some(2048))?,
            num_hidden_layers,
            num_attention_heads: f.usize("num_attention_heads", Some(8))?,
            num_key_value_heads: f.usize("num_key_value_heads", Some(2))?,
            head_dim: f.usize("head_dim", Some(128))?,
            hidden_act: f.string("hidden_act", "silu")?,
            max_position_embeddings: f.usize("max_position_embeddings", Some(131_072))?,
            initializer_range: f.f64("initializer_range", 0.02)?,
            rms_norm_eps: f.f64("rms_norm_eps", 1e-5)?,
            use_cache: f.bool("use_cache", true)?,
            tie_word_embeddings: f.bool("tie_word_embeddings", true)?,
            rope_parameters,
            sliding_window: f.opt_usize("sliding_window")?,
            attention_dropout: f.f64("attention_dropout", 0.0)?,
            moe_intermediate_size: f.usize("moe_intermediate_size", Some(2048))?,
            num_experts_per_tok: f.usize("num_experts_per_tok", Some(1))?,
            num_experts: f.usize("num_experts", Some(16))?,
            layer_types,
            pad_token_id: f.token_id("pad_token_id", Some(0))?,
            bos_token_id: f.token_id("bos_token_id", Some(2))?,
            eos_token_id: f.token_ids("eos_token_id", &[106])?,
            attention_bias: f.bool("attention_bias", false)?,
            lm_head_bias: f.bool("lm_head_bias", false)?,
            router_hidden_size: f.usize("router_hidden_size", Some(256))?,
            cca_time0: f.usize("cca_time0", Some(2))?,
            cca_time1: f.usize("cca_time1", Some(2))?,
            router_aux_loss_coef: f.f64("router_aux_loss_coef", 0.001)?,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses the legacy (Zyphra fork, 80-layer) schema: its keys are translated into the
    /// native schema, which is then parsed and validated as usual.
    pub fn from_legacy_json(value: &Value) -> Result<Self> {
        let obj = value
            .as_object()
            .ok_or_else(|| ZayaError::config("<root>", "config must be a JSON object"))?;
        let f = Fields { obj };
        let legacy_layers = f.usize("num_hidden_layers", Some(80))?;
        check_layer_count(legacy_layers)?;
        if !legacy_layers.is_multiple_of(2) {
            return Err(ZayaError::config(
                "num_hidden_layers",
                format!("legacy layout alternates attention and MoE layers, so it must be even (found {legacy_layers})"),
            ));
        }
        let num_hidden_layers = legacy_layers / 2;
        let head_dim = match f.opt_usize("head_dim")? {
            Some(d) => d,
            None => f.usize("kv_channels", Some(128))?,
        };
        let num_key_value_heads = match (
            f.opt_usize("num_key_value_heads")?,
            f.opt_usize("num_query_groups")?,
        ) {
            (Some(a), Some(b)) if a != b => {
                return Err(ZayaError::config(
                    "num_query_groups",
                    format!("disagrees with num_key_value_heads ({b} vs {a})"),
                ))
            }
            (Some(a), _) | (None, Some(a)) => a,
            (None, None) => 2,
        };
        let ffn = f.usize("ffn_hidden_size", Some(4096))?;
        if !ffn.is_multiple_of(2) {
            return Err(ZayaError::config(
                "ffn_hidden_size",
                format!("is the fused gate+up width and must be even (found {ffn})"),
            ));
        }
        // `swa_layers` holds, per legacy layer, the number of previous tokens a sliding
        // attention layer sees (W − 1), 0 elsewhere.
        let (layer_types, sliding_window) = match f.present("swa_layers") {
            None => (vec![LayerType::Hybrid; num_hidden_layers], None),
            Some(Value::Array(items)) => {
                if items.len() != legacy_layers {
                    return Err(ZayaError::config(
                        "swa_layers",
                        format!(
                            "has {} entries, expected one per legacy layer ({legacy_layers})",
                            items.len()
                        ),
                    ));
                }
                let mut types = Vec::with_capacity(num_hidden_layers);
                let mut window = None;
                for i in 0..num_hidden_layers {
                    let field = format!("swa_layers[{}]", 2 * i);
                    let v = &items[2 * i];
                    let prev = v.as_u64().filter(|&x| x < MAX_CONFIG_INT).ok_or_else(|| {
                        ZayaError::config(
                            &field,
                            format!("expected an integer below {MAX_CONFIG_INT}, found {v}"),
                        )
                    })? as usize;
                    if prev == 0 {
                        types.push(LayerType::Hybrid);
                        continue;
                    }
                    if window.is_some_and(|w| w != prev + 1) {
                        return Err(ZayaError::config(
                            field,
                            "sliding layers with different windows are not supported",
                        ));
                    }
                    window = Some(prev + 1);
                    types.push(LayerType::HybridSliding);
                }
                (types, window)
            }
            Some(v) => {
                return Err(ZayaError::config(
                    "swa_layers",
                    format!("expected a list, found {v}"),
                ))
            }
        };
        let prf = f.f64("partial_rotary_factor", 0.5)?;
        let rope = |theta: f64| serde_json::json!({"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": prf});
        let mut native = Map::new();
        // keys shared by both schemas
        for key in [
            "vocab_size",
            "hidden_size",
            "max_position_embeddings",
            "initializer_range",
            "use_cache",
            "tie_word_embeddings",
            "attention_dropout",
            "num_experts",
            "pad_token_id",
            "bos_token_id",
            "eos_token_id",
            "attention_bias",
            "lm_head_bias",
            "cca_time0",
            "cca_time1",
            "router_aux_loss_coef",
        ] {
            if let Some(v) = obj.get(key) {
                native.insert(key.into(), v.clone());
            }
        }
        let renamed = [
            (
                "num_attention_heads",
                f.present("cca_num_q_heads")
                    .or(f.present("num_attention_heads")),
            ),
            ("num_experts_per_tok", f.present("moe_router_topk")),
            ("router_hidden_size", f.present("zaya_mlp_expansion")),
            (
                "rms_norm_eps",
                f.present("norm_epsilon").or(f.present("rms_norm_eps")),
            ),
        ];
        for (key, v) in renamed {
            if let Some(v) = v {
                native.insert(key.into(), v.clone());
            }
        }
        native.insert("num_hidden_layers".into(), num_hidden_layers.into());
        native.insert("head_dim".into(), head_dim.into());
        native.insert("num_key_value_heads".into(), num_key_value_heads.into());
        native.insert("moe_intermediate_size".into(), (ffn / 2).into());
        native.insert(
            "layer_types".into(),
            layer_types
                .iter()
                .map(|t| Value::from(t.as_str()))
                .collect(),
        );
        native.insert(
            "sliding_window".into(),
            sliding_window.map_or(Value::Null, Value::from),
        );
        let mut rope_parameters = Map::new();
        if layer_types.contains(&LayerType::Hybrid) {
            rope_parameters.insert("hybrid".into(), rope(f.f64("rope_theta", 10_000.0)?));
        }
        if layer_types.contains(&LayerType::HybridSliding) {
            rope_parameters.insert(
                "hybrid_sliding".into(),
                rope(f.f64("swa_rotary_base", 10_000.0)?),
            );
        }
        native.insert("rope_parameters".into(), Value::Object(rope_parameters));
        Self::from_json(&Value::Object(native))
    }

    /// The checks of the reference (`validate_architecture`) plus the ones it forgets.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("moe_intermediate_size", self.moe_intermediate_size),
            ("num_experts", self.num_experts),
            ("router_hidden_size", self.router_hidden_size),
            ("cca_time0", self.cca_time0),
            ("cca_time1", self.cca_time1),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err(ZayaError::config(field, "must be at least 1"));
            }
        }
        if self.num_experts_per_tok != 1 {
            return Err(ZayaError::config(
                "num_experts_per_tok",
                format!(
                    "ZAYA1 routes each token to exactly one expert (top-1); found {}",
                    self.num_experts_per_tok
                ),
            ));
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(ZayaError::config(
                "num_key_value_heads",
                format!(
                    "num_attention_heads ({}) must be divisible by num_key_value_heads ({})",
                    self.num_attention_heads, self.num_key_value_heads
                ),
            ));
        }
        if !(self.num_key_value_heads * self.head_dim).is_multiple_of(2) {
            return Err(ZayaError::config(
                "head_dim",
                "num_key_value_heads * head_dim must be even (the values are split into current and delayed halves)",
            ));
        }
        if self.layer_types.len() != self.num_hidden_layers {
            return Err(ZayaError::config(
                "layer_types",
                format!(
                    "has {} entries but num_hidden_layers is {}",
                    self.layer_types.len(),
                    self.num_hidden_layers
                ),
            ));
        }
        if self.layer_types.contains(&LayerType::HybridSliding) {
            match self.sliding_window {
                None => {
                    return Err(ZayaError::config(
                        "sliding_window",
                        "is required when layer_types contains `hybrid_sliding`",
                    ))
                }
                Some(0) => return Err(ZayaError::config("sliding_window", "must be at least 1")),
                Some(_) => {}
            }
        }
        if !matches!(self.hidden_act.as_str(), "silu" | "swish") {
            return Err(ZayaError::config(
                "hidden_act",
                format!(
                    "ZAYA1 experts are SwiGLU; `{}` is not supported",
                    self.hidden_act
                ),
            ));
        }
        if self.rms_norm_eps.is_nan() || self.rms_norm_eps <= 0.0 {
            return Err(ZayaError::config("rms_norm_eps", "must be positive"));
        }
        for t in &self.layer_types {
            let rp = self.rope_parameters.get(t).ok_or_else(|| {
                ZayaError::config(
                    "rope_parameters",
                    format!("no entry for layer type `{}`", t.as_str()),
                )
            })?;
            let rd = self.rotary_dim(*t);
            if !(0.0..=1.0).contains(&rp.partial_rotary_factor) || !rd.is_multiple_of(2) {
                return Err(ZayaError::config(
                    format!("rope_parameters.{}.partial_rotary_factor", t.as_str()),
                    format!("gives {rd} rotary dims of head_dim {}; must be an even number within the head", self.head_dim),
                ));
            }
        }
        for (field, id) in [
            ("pad_token_id", self.pad_token_id),
            ("bos_token_id", self.bos_token_id),
        ] {
            if let Some(id) = id {
                if id as usize >= self.vocab_size {
                    return Err(ZayaError::config(
                        field,
                        format!("{id} is not below vocab_size {}", self.vocab_size),
                    ));
                }
            }
        }
        Ok(())
    }

    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }
    /// Width of each value half (current / delayed).
    pub fn value_half_dim(&self) -> usize {
        self.kv_dim() / 2
    }
    /// Channels of the CCA convolutions (queries then keys).
    pub fn conv_channels(&self) -> usize {
        self.q_dim() + self.kv_dim()
    }
    /// Columns of conv history kept between calls.
    pub fn conv_state_len(&self) -> usize {
        self.cca_time0 + self.cca_time1 - 2
    }
    pub fn gqa_groups(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }
    pub fn rotary_dim(&self, t: LayerType) -> usize {
        let prf = self
            .rope_parameters
            .get(&t)
            .map_or(0.5, |r| r.partial_rotary_factor);
        (self.head_dim as f64 * prf).floor() as usize
    }

    /// Serialises in the HF 5.23 native schema (loadable by transformers).
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert(
            "architectures".into(),
            serde_json::json!(["ZayaForCausalLM"]),
        );
        m.insert("model_type".into(), "zaya".into());
        m.insert("vocab_size".into(), self.vocab_size.into());
        m.insert("hidden_size".into(), self.hidden_size.into());
        m.insert("num_hidden_layers".into(), self.num_hidden_layers.into());
        m.insert(
            "num_attention_heads".into(),
            self.num_attention_heads.into(),
        );
        m.insert(
            "num_key_value_heads".into(),
            self.num_key_value_heads.into(),
        );
        m.insert("head_dim".into(), self.head_dim.into());
        m.insert("hidden_act".into(), self.hidden_act.clone().into());
        m.insert(
            "max_position_embeddings".into(),
            self.max_position_embeddings.into(),
        );
        m.insert("initializer_range".into(), self.initializer_range.into());
        m.insert("rms_norm_eps".into(), self.rms_norm_eps.into());
        m.insert("use_cache".into(), self.use_cache.into());
        m.insert(
            "tie_word_embeddings".into(),
            self.tie_word_embeddings.into(),
        );
        let mut rope = Map::new();
        for (t, rp) in &self.rope_parameters {
            rope.insert(t.as_str().into(), rp.to_json());
        }
        m.insert("rope_parameters".into(), Value::Object(rope));
        m.insert(
            "sliding_window".into(),
            self.sliding_window.map_or(Value::Null, Value::from),
        );
        m.insert("attention_dropout".into(), self.attention_dropout.into());
        m.insert(
            "moe_intermediate_size".into(),
            self.moe_intermediate_size.into(),
        );
        m.insert(
            "num_experts_per_tok".into(),
            self.num_experts_per_tok.into(),
        );
        m.insert("num_experts".into(), self.num_experts.into());
        m.insert(
            "layer_types".into(),
            Value::Array(self.layer_types.iter().map(|t| t.as_str().into()).collect()),
        );
        m.insert(
            "pad_token_id".into(),
            self.pad_token_id.map_or(Value::Null, Value::from),
        );
        m.insert(
            "bos_token_id".into(),
            self.bos_token_id.map_or(Value::Null, Value::from),
        );
        m.insert(
            "eos_token_id".into(),
            match self.eos_token_id.as_slice() {
                [] => Value::Null,
                [one] => (*one).into(),
                many => many.iter().map(|x| Value::from(*x)).collect(),
            },
        );
        m.insert("attention_bias".into(), self.attention_bias.into());
        m.insert("lm_head_bias".into(), self.lm_head_bias.into());
        m.insert("router_hidden_size".into(), self.router_hidden_size.into());
        m.insert("cca_time0".into(), self.cca_time0.into());
        m.insert("cca_time1".into(), self.cca_time1.into());
        Value::Object(m)
    }

    /// Serialises in the legacy fork schema (80 alternating layers).
    pub fn to_legacy_json(&self) -> Value {
        let hybrid = self.rope_parameters.get(&LayerType::Hybrid);
        let sliding = self.rope_parameters.get(&LayerType::HybridSliding);
        let prf = hybrid.or(sliding).map_or(0.5, |r| r.partial_rotary_factor);
        let mut m = Map::new();
        m.insert(
            "architectures".into(),
            serde_json::json!(["ZayaForCausalLM"]),
        );
        m.insert("model_type".into(), "zaya".into());
        m.insert("vocab_size".into(), self.vocab_size.into());
        m.insert("hidden_size".into(), self.hidden_size.into());
        m.insert(
            "num_hidden_layers".into(),
            (2 * self.num_hidden_layers).into(),
        );
        m.insert(
            "num_attention_heads".into(),
            self.num_attention_heads.into(),
        );
        m.insert(
            "num_key_value_heads".into(),
            self.num_key_value_heads.into(),
        );
        m.insert("num_query_groups".into(), self.num_key_value_heads.into());
        m.insert("head_dim".into(), self.head_dim.into());
        m.insert("kv_channels".into(), self.head_dim.into());
        m.insert(
            "ffn_hidden_size".into(),
            (2 * self.moe_intermediate_size).into(),
        );
        m.insert("num_experts".into(), self.num_experts.into());
        m.insert("moe_router_topk".into(), self.num_experts_per_tok.into());
        m.insert("zaya_mlp_expansion".into(), self.router_hidden_size.into());
        m.insert("norm_epsilon".into(), self.rms_norm_eps.into());
        m.insert(
            "rope_theta".into(),
            hybrid.map_or(5_000_000.0, |r| r.rope_theta).into(),
        );
        m.insert("partial_rotary_factor".into(), prf.into());
        if let (Some(w), Some(s)) = (self.sliding_window, sliding) {
            let swa: Vec<Value> = self
                .layer_types
                .iter()
                .flat_map(|t| {
                    let prev = if *t == LayerType::HybridSliding {
                        w - 1
                    } else {
                        0
                    };
                    [Value::from(prev), Value::from(0)]
                })
                .collect();
            m.insert("swa_layers".into(), Value::Array(swa));
            m.insert("swa_rotary_base".into(), s.rope_theta.into());
        } else {
            m.insert("swa_layers".into(), Value::Null);
        }
        m.insert("sliding_window".into(), Value::Null);
        m.insert("cca_time0".into(), self.cca_time0.into());
        m.insert("cca_time1".into(), self.cca_time1.into());
        m.insert("attention_bias".into(), self.attention_bias.into());
        m.insert("lm_head_bias".into(), self.lm_head_bias.into());
        m.insert(
            "tie_word_embeddings".into(),
            self.tie_word_embeddings.into(),
        );
        m.insert(
            "max_position_embeddings".into(),
            self.max_position_embeddings.into(),
        );
        m.insert(
            "pad_token_id".into(),
            self.pad_token_id.map_or(Value::Null, Value::from),
        );
        m.insert(
            "bos_token_id".into(),
            self.bos_token_id.map_or(Value::Null, Value::from),
        );
        m.insert(
            "eos_token_id".into(),
            match self.eos_token_id.as_slice() {
                [] => Value::Null,
                [one] => (*one).into(),
                many => many.iter().map(|x| Value::from(*x)).collect(),
            },
        );
        for switch in [
            "cca",
            "zaya_use_mod",
            "zaya_use_eda",
            "scale_residual_merge",
            "residual_in_fp32",
        ] {
            m.insert(switch.into(), true.into());
        }
        m.insert("add_bias_linear".into(), false.into());
        Value::Object(m)
    }
}

fn parse_rope_parameters(
    value: Option<&Value>,
    layer_types: &[LayerType],
) -> Result<BTreeMap<LayerType, RopeParameters>> {
    let mut out = BTreeMap::new();
    match value {
        None => {
            for t in layer_types {
                out.insert(*t, RopeParameters::default_for(*t));
            }
        }
        Some(Value::Object(obj)) => {
            let nested = obj.keys().any(|k| k == "hybrid" || k == "hybrid_sliding");
            if nested {
                // Per-layer-type dictionaries. Non-dict entries (the hub's stray top-level
                // `rope_type`) are ignored, as the reference does.
                for (k, v) in obj {
                    if !v.is_object() {
                        continue;
                    }
                    let t = LayerType::parse(k, &format!("rope_parameters.{k}"))?;
                    out.insert(t, parse_rope_entry(v, &format!("rope_parameters.{k}"))?);
                }
                for t in layer_types {
                    out.entry(*t)
                        .or_insert_with(|| RopeParameters::default_for(*t));
                }
            } else {
                // A flat dictionary applies to every layer type.
                let rp = parse_rope_entry(&Value::Object(obj.clone()), "rope_parameters")?;
                for t in layer_types {
                    out.insert(*t, rp.clone());
                }
            }
        }
        Some(v) => {
            return Err(ZayaError::config(
                "rope_parameters",
                format!("expected an object, found {v}"),
            ))
        }
    }
    Ok(out)
}

pub(crate) fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| ZayaError::io(path, e))?;
    serde_json::from_str(&text).map_err(|source| ZayaError::Json {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tiny() -> Value {
        json!({
            "model_type": "zaya", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
            "moe_intermediate_size": 16, "num_experts": 4, "router_hidden_size": 8,
            "layer_types": ["hybrid", "hybrid_sliding"], "sliding_window": 4,
            "rope_parameters": {"rope_type": "default",
                "hybrid": {"rope_type": "default", "rope_theta": 5000000.0, "partial_rotary_factor": 0.5},
                "hybrid_sliding": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}}
        })
    }

    fn err_field(v: Value) -> String {
        match ZayaConfig::from_json(&v) {
            Err(ZayaError::Config { field, .. }) => field,
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn parses_nested_rope_and_ignores_stray_key() {
        let cfg = ZayaConfig::from_json(&tiny()).unwrap();
        assert_eq!(cfg.rope_parameters[&LayerType::Hybrid].rope_theta, 5e6);
        assert_eq!(
            cfg.rope_parameters[&LayerType::HybridSliding].rope_theta,
            1e4
        );
        assert_eq!(
            cfg.layer_types,
            vec![LayerType::Hybrid, LayerType::HybridSliding]
        );
        assert_eq!(cfg.conv_state_len(), 2);
        assert_eq!(cfg.rotary_dim(LayerType::Hybrid), 4);
    }

    #[test]
    fn round_trips_through_json() {
        let cfg = ZayaConfig::from_json(&tiny()).unwrap();
        assert_eq!(ZayaConfig::from_json(&cfg.to_json()).unwrap(), cfg);
        assert_eq!(
            ZayaConfig::from_legacy_json(&cfg.to_legacy_json())
                .unwrap()
                .layer_types,
            cfg.layer_types
        );
    }

    #[test]
    fn legacy_8b_config_translates_to_native_terms() {
        let legacy = json!({
            "model_type": "zaya", "num_hidden_layers": 80, "hidden_size": 2048, "num_attention_heads": 8,
            "num_query_groups": 2, "kv_channels": 128, "ffn_hidden_size": 4096, "num_experts": 16,
            "moe_router_topk": 1, "zaya_mlp_expansion": 256, "norm_epsilon": 1e-5, "rope_theta": 5000000,
            "partial_rotary_factor": 0.5, "swa_layers": null, "cca_time0": 2, "cca_time1": 2,
            "vocab_size": 262272, "tie_word_embeddings": true, "residual_in_fp32": true, "zaya_use_mod": true
        });
        let cfg = ZayaConfig::from_legacy_json(&legacy).unwrap();
        assert_eq!(cfg.num_hidden_layers, 40);
        assert_eq!(
            (
                cfg.num_attention_heads,
                cfg.num_key_value_heads,
                cfg.head_dim
            ),
            (8, 2, 128)
        );
        assert_eq!(cfg.moe_intermediate_size, 2048);
        assert_eq!(cfg.router_hidden_size, 256);
        assert_eq!(cfg.rope_parameters[&LayerType::Hybrid].rope_theta, 5e6);
        assert_eq!(cfg.layer_types, vec![LayerType::Hybrid; 40]);
        let mut swa = legacy.clone();
        swa["swa_layers"] = json!((0..80)
            .map(|i| if i % 4 == 2 { 4095 } else { 0 })
            .collect::<Vec<_>>());
        let cfg = ZayaConfig::from_legacy_json(&swa).unwrap();
        assert_eq!(cfg.sliding_window, Some(4096));
        assert_eq!(cfg.layer_types[1], LayerType::HybridSliding);
        assert_eq!(cfg.layer_types[0], LayerType::Hybrid);
        let mut bad = legacy;
        bad["num_key_value_heads"] = json!(4);
        assert!(
            matches!(ZayaConfig::from_legacy_json(&bad), Err(ZayaError::Config { field, .. }) if field == "num_query_groups")
        );
    }

    #[test]
    fn validation_names_the_field() {
        let mut v = tiny();
        v["num_experts_per_tok"] = json!(2);
        assert_eq!(err_field(v), "num_experts_per_tok");
        let mut v = tiny();
        v["num_key_value_heads"] = json!(3);
        assert_eq!(err_field(v), "num_key_value_heads");
        let mut v = tiny();
        v["sliding_window"] = Value::Null;
        assert_eq!(err_field(v), "sliding_window");
        let mut v = tiny();
        v["layer_types"] = json!(["hybrid"]);
        assert_eq!(err_field(v), "layer_types");
        let mut v = tiny();
        v["layer_types"] = json!(["hybrid", "mamba"]);
        assert_eq!(err_field(v), "layer_types[1]");
        let mut v = tiny();
        v["hidden_size"] = json!("big");
        assert_eq!(err_field(v), "hidden_size");
        let mut v = tiny();
        v["rope_parameters"]["hybrid"]["rope_type"] = json!("yarn");
        assert_eq!(err_field(v), "rope_parameters.hybrid.rope_type");
        let mut v = tiny();
        v["model_type"] = json!("llama");
        assert_eq!(err_field(v), "model_type");
    }
}
