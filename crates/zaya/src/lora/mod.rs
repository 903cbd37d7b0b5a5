//! LoRA adapters, PEFT-compatible.
//!
//! An adapter adds `scale · B A x` to chosen linear layers (PEFT's `target_modules`: the
//! attention projections, the router's linear layers) and `scale · B_e A_e x` to each expert
//! of the stacked expert tensors (PEFT's `target_parameters`, `ParamWrapper` layout). The
//! base weights are never touched: they stay in their stored form (memory-mapped bf16, f32,
//! or quantized) and get no gradient; the adapter rides on the weight seam
//! ([`Linear::adapter`](crate::model::Linear), [`ExpertAdapters`](crate::model::moe::ExpertAdapters)).
//!
//! - [`LoraConfig`]: rank, alpha, dropout, rsLoRA, targets (command line and PEFT JSON).
//! - [`plan`]: the adapted sites of a model and their PEFT keys and shapes.
//! - [`LoraAdapter`]: adapter weights by PEFT key; load / save PEFT's directory format,
//!   attach to a model for inference, merge into a checkpoint.
//! - [`LoraModel`]: the trainable form (adapter `Var`s over a frozen base) for SFT and GRPO:
//!   [`attach_lora`] makes one, [`LoraModel::params`] lists what the optimizer updates.
//! - [`memory`]: the memory a LoRA run needs, checked before it starts.

pub mod adapter;
pub mod config;
pub mod memory;
pub mod train;

pub use adapter::LoraAdapter;
pub use config::{LoraConfig, LoraInit, ModuleSelector};
pub use train::{attach_lora, LoraModel};

use crate::config::ZayaConfig;
use crate::error::{Result, ZayaError};
use crate::model::moe::ExpertLowRank;
use crate::model::{Dropout, LowRank, ZayaModel};

/// A module or parameter of a decoder layer that an adapter can adapt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    QProj,
    KProj,
    VProjCurrent,
    VProjDelayed,
    OProj,
    RouterDownProj,
    RouterFc1,
    RouterFc2,
    RouterOutProj,
    /// `mlp.experts.gate_up_proj` `[E, 2I, H]` (a parameter).
    ExpertsGateUp,
    /// `mlp.experts.down_proj` `[E, H, I]` (a parameter).
    ExpertsDown,
}

/// Every linear module of a layer, in module order.
pub const LINEAR_TARGETS: [Target; 9] = [
    Target::QProj,
    Target::KProj,
    Target::VProjCurrent,
    Target::VProjDelayed,
    Target::OProj,
    Target::RouterDownProj,
    Target::RouterFc1,
    Target::RouterFc2,
    Target::RouterOutProj,
];

impl Target {
    /// The module path under `model.layers.{i}` (for the expert stacks: the experts module).
    pub fn module_path(self) -> &'static str {
        match self {
            Target::QProj => "self_attn.qkv_proj.q_proj",
            Target::KProj => "self_attn.qkv_proj.k_proj",
            Target::VProjCurrent => "self_attn.qkv_proj.v_proj_current",
            Target::VProjDelayed => "self_attn.qkv_proj.v_proj_delayed",
            Target::OProj => "self_attn.o_proj",
            Target::RouterDownProj => "mlp.gate.down_proj",
            Target::RouterFc1 => "mlp.gate.router_mlp.fc1",
            Target::RouterFc2 => "mlp.gate.router_mlp.fc2",
            Target::RouterOutProj => "mlp.gate.router_mlp.out_proj",
            Target::ExpertsGateUp | Target::ExpertsDown => "mlp.experts",
        }
    }

    /// The adapted parameter of an expert stack.
    pub fn parameter(self) -> Option<&'static str> {
        match self {
            Target::ExpertsGateUp => Some("gate_up_proj"),
            Target::ExpertsDown => Some("down_proj"),
            _ => None,
        }
    }

    pub fn is_expert(self) -> bool {
        self.parameter().is_some()
    }

    /// `(in, out)` features of the adapted matrix (per expert for the stacks).
    pub fn dims(self, cfg: &ZayaConfig) -> (usize, usize) {
        let (h, r) = (cfg.hidden_size, cfg.router_hidden_size);
        match self {
            Target::QProj => (h, cfg.q_dim()),
            Target::KProj => (h, cfg.kv_dim()),
            Target::VProjCurrent | Target::VProjDelayed => (h, cfg.value_half_dim()),
            Target::OProj => (cfg.q_dim(), h),
            Target::RouterDownProj => (h, r),
            Target::RouterFc1 | Target::RouterFc2 => (r, r),
            Target::RouterOutProj => (r, cfg.num_experts + 1),
            Target::ExpertsGateUp => (h, 2 * cfg.moe_intermediate_size),
            Target::ExpertsDown => (cfg.moe_intermediate_size, h),
        }
    }
}

/// One adapted module (or expert parameter) of a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Site {
    pub layer: usize,
    pub target: Target,
    /// PEFT key of `lora_A` / `lora_B` in `adapter_model.safetensors`.
    pub key_a: String,
    pub key_b: String,
    /// `[r·E, in]` and `[out, r·E]` (`E` = 1 for a linear module).
    pub shape_a: [usize; 2],
    pub shape_b: [usize; 2],
    /// Experts sharing the factors (1 for a linear module).
    pub experts: usize,
}

/// PEFT's module-name match: the whole name, or a suffix after a dot.
fn name_matches(key: &str, target: &str) -> bool {
    key == target || key.ends_with(&format!(".{target}"))
}

/// Names that a `target_modules` entry may match but zaya cannot adapt.
const UNSUPPORTED_MODULES: [&str; 4] = [
    "lm_head",
    "embed_tokens",
    "conv_qk_depthwise",
    "conv_qk_grouped",
];

/// The sites `lora` adapts in a model of config `cfg`, in module order, with PEFT's key
/// names. Every listed target must match something (PEFT refuses a config that adapts
/// nothing it names); targets zaya cannot adapt (lm_head, embeddings, convolutions) are
/// errors.
pub fn plan(cfg: &ZayaConfig, lora: &LoraConfig) -> Result<Vec<Site>> {
    lora.validate()?;
    let bad = |m: String| ZayaError::LoraConfig {
        field: "target_modules".into(),
        message: m,
    };
    let regex = match &lora.target_modules {
        ModuleSelector::Regex(re) => Some(
            regex::Regex::new(&format!("^(?:{re})$")).map_err(|e| bad(format!("`{re}`: {e}")))?,
        ),
        _ => None,
    };
    let module_selected = |key: &str| -> bool {
        if lora.exclude_modules.iter().any(|x| name_matches(key, x)) {
            return false;
        }
        match &lora.target_modules {
            ModuleSelector::AllLinear => true,
            ModuleSelector::Names(n) => n.iter().any(|t| name_matches(key, t)),
            ModuleSelector::Regex(_) => regex.as_ref().is_some_and(|r| r.is_match(key)),
        }
    };
    if let ModuleSelector::Names(names) = &lora.target_modules {
        for n in names {
            let short = n.rsplit('.').next().unwrap_or(n);
            if UNSUPPORTED_MODULES.contains(&short) {
                return Err(bad(format!(
                    "`{n}`: zaya adapts linear layers of the decoder layers only (not lm_head, embeddings or the CCA convolutions)"
                )));
            }
        }
    }
    let mut used_modules = vec![false; module_name_count(&lora.target_modules)];
    let mut used_params = vec![false; lora.target_parameters.len()];
    let r = lora.r;
    let mut sites = Vec::new();
    for layer in 0..cfg.num_hidden_layers {
        for t in LINEAR_TARGETS {
            let key = format!("model.layers.{layer}.{}", t.module_path());
            if !module_selected(&key) {
                continue;
            }
            if let ModuleSelector::Names(n) = &lora.target_modules {
                for (i, name) in n.iter().enumerate() {
                    if name_matches(&key, name) {
                        used_modules[i] = true;
                    }
                }
            }
            let (inp, out) = t.dims(cfg);
            let prefix = format!("base_model.model.{key}");
            sites.push(Site {
                layer,
                target: t,
                key_a: format!("{prefix}.lora_A.weight"),
                key_b: format!("{prefix}.lora_B.weight"),
                shape_a: [r, inp],
                shape_b: [out, r],
                experts: 1,
            });
        }
        // Expert stacks: PEFT wraps the targeted parameters of one module in parameter order
        // (gate_up_proj, then down_proj), each wrapper around the previous one, so the first
        // of two sits under `base_layer.` and the last is the outermost.
        let module = format!("model.layers.{layer}.mlp.experts");
        let chosen: Vec<Target> = [Target::ExpertsGateUp, Target::ExpertsDown]
            .into_iter()
            .filter(|t| {
                let key = format!("{module}.{}", t.parameter().unwrap_or_default());
                let mut hit = false;
                for (i, p) in lora.target_parameters.iter().enumerate() {
                    if name_matches(&key, p) {
                        used_params[i] = true;
                        hit = true;
                    }
                }
                hit
            })
            .collect();
        let e = cfg.num_experts;
        for (i, t) in chosen.iter().enumerate() {
            let depth = chosen.len() - 1 - i;
            let prefix = format!("base_model.model.{module}{}", ".base_layer".repeat(depth));
            let (inp, out) = t.dims(cfg);
            let re = r
                .checked_mul(e)
                .ok_or_else(|| bad(format!("rank {r} times {e} experts overflows")))?;
            sites.push(Site {
                layer,
                target: *t,
                key_a: format!("{prefix}.lora_A.weight"),
                key_b: format!("{prefix}.lora_B.weight"),
                shape_a: [re, inp],
                shape_b: [out, re],
                experts: e,
            });
        }
    }
    if let ModuleSelector::Names(n) = &lora.target_modules {
        let missing: Vec<&str> = n
            .iter()
            .zip(&used_modules)
            .filter(|(_, u)| !**u)
            .map(|(s, _)| s.as_str())
            .collect();
        if !missing.is_empty() {
            return Err(bad(format!(
                "{missing:?} match no module; the adaptable modules are q_proj, k_proj, v_proj_current, v_proj_delayed, o_proj, down_proj (router), fc1, fc2, out_proj, and the parameters mlp.experts.gate_up_proj / mlp.experts.down_proj (target_parameters)"
            )));
        }
    }
    let missing: Vec<&str> = lora
        .target_parameters
        .iter()
        .zip(&used_params)
        .filter(|(_, u)| !**u)
        .map(|(s, _)| s.as_str())
        .collect();
    if !missing.is_empty() {
        return Err(ZayaError::LoraConfig {
            field: "target_parameters".into(),
            message: format!(
                "{missing:?} match no parameter; the adaptable parameters are mlp.experts.gate_up_proj and mlp.experts.down_proj"
            ),
        });
    }
    if sites.is_empty() {
        return Err(bad(
            "the configuration selects no module of this model".into()
        ));
    }
    Ok(sites)
}

fn module_name_count(sel: &ModuleSelector) -> usize {
    match sel {
        ModuleSelector::Names(n) => n.len(),
        _ => 0,
    }
}

/// The factors of one site, as the model reads them.
#[derive(Debug, Clone)]
pub struct SiteWeights {
    /// `lora_A.weight` `[r·E, in]`.
    pub a: candle_core::Tensor,
    /// `lora_B.weight` `[out, r·E]`.
    pub b: candle_core::Tensor,
}

/// A copy of `base` (sharing every base tensor: nothing is copied) with the adapters of
/// `sites` attached, `weights[i]` for `sites[i]`. `dropout_key`: training draws dropout
/// masks from it (`None`: no dropout, inference).
pub(crate) fn attach(
    base: &ZayaModel,
    lora: &LoraConfig,
    sites: &[Site],
    weights: &[SiteWeights],
    dropout_key: Option<u64>,
) -> Result<ZayaModel> {
    let mut model = base.clone();
    let scale = lora.scaling();
    for (site, w) in sites.iter().zip(weights) {
        let layer = model.layer_mut(site.layer).ok_or_else(|| {
            ZayaError::Input(format!(
                "adapter site in layer {}, the model has {} layers",
                site.layer,
                base.layers().len()
            ))
        })?;
        if site.target.is_expert() {
            let lr = ExpertLowRank {
                a: w.a.clone(),
                b: w.b.clone(),
                scale,
            };
            let ad = &mut layer.mlp.experts.adapters;
            match site.target {
                Target::ExpertsGateUp => ad.gate_up = Some(lr),
                _ => ad.down = Some(lr),
            }
        } else {
            let dropout = match dropout_key {
                Some(key) if lora.dropout > 0.0 => Some(Dropout {
                    p: lora.dropout,
                    key: crate::model::linear::splitmix64(
                        key ^ ((site.layer as u64) << 32) ^ (site.target as u64),
                    ),
                }),
                _ => None,
            };
            let linear = layer.linear_mut(site.target).ok_or_else(|| {
                ZayaError::Input(format!("{:?} is not a linear module", site.target))
            })?;
            linear.adapter = Some(LowRank {
                a: w.a.clone(),
                b: w.b.clone(),
                scale,
                dropout,
            });
        }
    }
    Ok(model)
}
