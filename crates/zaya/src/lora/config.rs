//! What a LoRA adapter is: rank, alpha, dropout, rsLoRA, which modules and parameters it
//! adapts. Read from the command line (`r=16,alpha=32,targets=q_proj,k_proj,experts`) and
//! from / to PEFT's `adapter_config.json` (the fields zaya supports; a config using a PEFT
//! feature zaya does not implement is refused by name rather than silently misread).

use serde_json::{json, Map, Value};

use crate::error::{Result, ZayaError};

/// How the `A` factor starts (B always starts at zero, so a new adapter changes nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoraInit {
    /// PEFT's default (`init_lora_weights: true`): Kaiming-uniform with `a = √5`, i.e.
    /// uniform in `±1/√in`, as `nn.Linear`.
    #[default]
    Kaiming,
    /// `init_lora_weights: "gaussian"`: normal with std `1/r`.
    Gaussian,
    /// `init_lora_weights: false`: A random as Kaiming **and B random too** is PEFT's
    /// meaning of false (a non-identity start, for tests); kept only to round-trip.
    NoInit,
}

/// Which modules an adapter targets, as PEFT's `target_modules`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModuleSelector {
    /// Module names matched as suffixes (`key == t` or `key` ends with `.t`).
    Names(Vec<String>),
    /// A regular expression that must match the whole module name (PEFT's string form).
    Regex(String),
    /// Every linear layer except the output head (`"all-linear"`).
    AllLinear,
}

/// A LoRA configuration (PEFT's `LoraConfig`, the subset zaya implements).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub use_rslora: bool,
    pub target_modules: ModuleSelector,
    /// Parameters adapted directly (PEFT's `target_parameters`): the stacked expert tensors
    /// `mlp.experts.gate_up_proj` / `mlp.experts.down_proj`, matched as suffixes.
    pub target_parameters: Vec<String>,
    /// Module names never adapted (suffix match).
    pub exclude_modules: Vec<String>,
    pub init: LoraInit,
    /// `base_model_name_or_path` (informational; written on save).
    pub base_model: Option<String>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            r: 8,
            alpha: 8.0,
            dropout: 0.0,
            use_rslora: false,
            target_modules: ModuleSelector::Names(
                DEFAULT_TARGETS.iter().map(|s| s.to_string()).collect(),
            ),
            target_parameters: Vec::new(),
            exclude_modules: Vec::new(),
            init: LoraInit::Kaiming,
            base_model: None,
        }
    }
}

/// Largest rank accepted.
pub const MAX_RANK: usize = 1 << 16;

/// Targets when the spec names none: every attention projection.
pub const DEFAULT_TARGETS: [&str; 5] = [
    "q_proj",
    "k_proj",
    "v_proj_current",
    "v_proj_delayed",
    "o_proj",
];

fn err(field: &str, message: impl Into<String>) -> ZayaError {
    ZayaError::LoraConfig {
        field: field.to_string(),
        message: message.into(),
    }
}

impl LoraConfig {
    /// `alpha / r`, or `alpha / √r` with rsLoRA.
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    /// Rejects values PEFT would reject, and dropout on expert parameters (PEFT's
    /// `ParamWrapper` refuses it too: the input cannot be factored out).
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(err("r", "must be a positive integer"));
        }
        // Far above any useful rank (ranks are below the layer widths); bounds the shapes a
        // config can ask for before anything is allocated.
        if self.r > MAX_RANK {
            return Err(err(
                "r",
                format!(
                    "{} is above the largest rank zaya accepts, {MAX_RANK}",
                    self.r
                ),
            ));
        }
        if !(self.alpha.is_finite()) {
            return Err(err(
                "lora_alpha",
                format!("must be finite, got {}", self.alpha),
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(err(
                "lora_dropout",
                format!("must be in [0, 1), got {}", self.dropout),
            ));
        }
        if self.dropout > 0.0 && !self.target_parameters.is_empty() {
            return Err(err(
                "lora_dropout",
                "dropout does not work with target_parameters (expert stacks), as in PEFT",
            ));
        }
        if let ModuleSelector::Regex(re) = &self.target_modules {
            regex::Regex::new(&format!("^(?:{re})$"))
                .map_err(|e| err("target_modules", format!("invalid regex `{re}`: {e}")))?;
        }
        if matches!(&self.target_modules, ModuleSelector::Names(n) if n.is_empty())
            && self.target_parameters.is_empty()
        {
            return Err(err(
                "target_modules",
                "no target_modules and no target_parameters: nothing to adapt",
            ));
        }
        Ok(())
    }

    /// Parses the command-line form: comma-separated `key=value` items and flags.
    /// `r=16,alpha=32,dropout=0.05,targets=q_proj,k_proj,experts,rslora`. The names after
    /// `targets=` run until the next `key=` item or flag; `experts` stands for both expert
    /// stacks, `experts.gate_up_proj` / `experts.down_proj` for one, `all-linear` for every
    /// linear layer. Unknown keys are errors.
    pub fn parse_spec(spec: &str) -> Result<Self> {
        let mut cfg = LoraConfig::default();
        let mut alpha: Option<f64> = None;
        let mut targets: Option<Vec<String>> = None;
        let mut in_targets = false;
        for item in spec.split(',').map(str::trim) {
            if item.is_empty() {
                return Err(err("--lora", format!("empty item in `{spec}`")));
            }
            let Some((key, value)) = item.split_once('=') else {
                match item {
                    "rslora" | "use_rslora" => {
                        cfg.use_rslora = true;
                        in_targets = false;
                    }
                    "gaussian" => {
                        cfg.init = LoraInit::Gaussian;
                        in_targets = false;
                    }
                    name if in_targets => targets.get_or_insert_with(Vec::new).push(name.into()),
                    other => {
                        return Err(err(
                            "--lora",
                            format!(
                                "`{other}` is neither key=value (r, alpha, dropout, targets, init) nor a flag (rslora)"
                            ),
                        ))
                    }
                }
                continue;
            };
            in_targets = false;
            let num = |v: &str| -> Result<f64> {
                v.parse::<f64>()
                    .map_err(|_| err(key, format!("`{v}` is not a number")))
            };
            match key.trim() {
                "r" | "rank" => {
                    cfg.r = value
                        .parse()
                        .map_err(|_| err("r", format!("`{value}` is not a positive integer")))?
                }
                "alpha" | "lora_alpha" => alpha = Some(num(value)?),
                "dropout" | "lora_dropout" => cfg.dropout = num(value)?,
                "init" => {
                    cfg.init = match value {
                        "kaiming" | "true" => LoraInit::Kaiming,
                        "gaussian" => LoraInit::Gaussian,
                        v => return Err(err("init", format!("`{v}`: kaiming or gaussian"))),
                    }
                }
                "targets" | "target_modules" => {
                    in_targets = true;
                    let t = targets.get_or_insert_with(Vec::new);
                    if !value.is_empty() {
                        t.push(value.into());
                    }
                }
                other => {
                    return Err(err(
                        "--lora",
                        format!("unknown key `{other}` (r, alpha, dropout, targets, init, rslora)"),
                    ))
                }
            }
        }
        // PEFT's default alpha is 8; with a rank given and no alpha, alpha = r (scaling 1) is
        // the less surprising choice on the command line.
        cfg.alpha = alpha.unwrap_or(cfg.r as f64);
        if let Some(t) = targets {
            let (modules, params) = split_targets(&t)?;
            cfg.target_modules = modules;
            cfg.target_parameters = params;
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads PEFT's `adapter_config.json`.
    pub fn from_peft_json(text: &str, location: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(text).map_err(|e| {
            err(
                "adapter_config.json",
                format!("{location}: invalid JSON: {e}"),
            )
        })?;
        let obj = v.as_object().ok_or_else(|| {
            err(
                "adapter_config.json",
                format!("{location}: not a JSON object"),
            )
        })?;
        Self::from_peft_map(obj, location)
    }

    fn from_peft_map(obj: &Map<String, Value>, location: &str) -> Result<Self> {
        let get = |k: &str| obj.get(k).filter(|v| !v.is_null());
        let field_err = |k: &str, m: String| err(k, format!("{location}: {m}"));
        if let Some(t) = get("peft_type") {
            if t.as_str() != Some("LORA") {
                return Err(field_err("peft_type", format!("{t} is not LORA")));
            }
        }
        let r = match get("r") {
            None => 8,
            Some(v) => v
                .as_u64()
                .filter(|&r| r > 0)
                .ok_or_else(|| field_err("r", format!("{v} is not a positive integer")))?
                as usize,
        };
        let alpha = match get("lora_alpha") {
            None => 8.0,
            Some(v) => v
                .as_f64()
                .ok_or_else(|| field_err("lora_alpha", format!("{v} is not a number")))?,
        };
        let dropout = match get("lora_dropout") {
            None => 0.0,
            Some(v) => v
                .as_f64()
                .ok_or_else(|| field_err("lora_dropout", format!("{v} is not a number")))?,
        };
        let use_rslora = match get("use_rslora") {
            None => false,
            Some(v) => v
                .as_bool()
                .ok_or_else(|| field_err("use_rslora", format!("{v} is not a boolean")))?,
        };
        let strings = |k: &str, v: &Value| -> Result<Vec<String>> {
            v.as_array()
                .ok_or_else(|| field_err(k, format!("{v} is not a list of names")))?
                .iter()
                .map(|s| {
                    s.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| field_err(k, format!("{s} is not a string")))
                })
                .collect()
        };
        let target_modules = match get("target_modules") {
            None => ModuleSelector::Names(Vec::new()),
            Some(Value::String(s)) if s == "all-linear" => ModuleSelector::AllLinear,
            Some(Value::String(s)) => ModuleSelector::Regex(s.clone()),
            Some(v) => ModuleSelector::Names(strings("target_modules", v)?),
        };
        let target_parameters = match get("target_parameters") {
            None => Vec::new(),
            Some(v) => strings("target_parameters", v)?,
        };
        let exclude_modules = match get("exclude_modules") {
            None => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(v) => strings("exclude_modules", v)?,
        };
        let init = match get("init_lora_weights") {
            None | Some(Value::Bool(true)) => LoraInit::Kaiming,
            Some(Value::Bool(false)) => LoraInit::NoInit,
            Some(Value::String(s)) if s == "gaussian" => LoraInit::Gaussian,
            // Other inits (pissa, olora, loftq, ...) only change how training starts; a saved
            // adapter's weights mean the same thing whatever the init was.
            Some(_) => LoraInit::Kaiming,
        };
        // Features that change what the saved weights mean: refused by name.
        type Refuses = fn(&Value) -> bool;
        let unsupported: [(&str, Refuses); 10] = [
            ("use_dora", |v| v.as_bool() == Some(true)),
            ("lora_bias", |v| v.as_bool() == Some(true)),
            ("fan_in_fan_out", |v| v.as_bool() == Some(true)),
            ("bias", |v| v.as_str().is_some_and(|s| s != "none")),
            ("modules_to_save", |v| {
                v.as_array().is_some_and(|a| !a.is_empty())
            }),
            ("layers_to_transform", |_| true),
            ("layers_pattern", |_| true),
            ("rank_pattern", |v| {
                v.as_object().is_some_and(|o| !o.is_empty())
            }),
            ("alpha_pattern", |v| {
                v.as_object().is_some_and(|o| !o.is_empty())
            }),
            ("layer_replication", |_| true),
        ];
        for (k, bad) in unsupported {
            if let Some(v) = get(k) {
                if bad(v) {
                    return Err(field_err(k, format!("{v}: not supported by zaya")));
                }
            }
        }
        for k in ["use_qalora", "use_bdlora"] {
            if get(k).is_some_and(|v| v.as_bool() == Some(true) || v.is_object()) {
                return Err(field_err(k, "not supported by zaya".into()));
            }
        }
        for k in [
            "velora_config",
            "kasa_config",
            "arrow_config",
            "monteclora_config",
        ] {
            if get(k).is_some() {
                return Err(field_err(k, "not supported by zaya".into()));
            }
        }
        let cfg = LoraConfig {
            r,
            alpha,
            dropout,
            use_rslora,
            target_modules,
            target_parameters,
            exclude_modules,
            init,
            base_model: get("base_model_name_or_path")
                .and_then(|v| v.as_str())
                .map(str::to_string),
        };
        cfg.validate().map_err(|e| match e {
            ZayaError::LoraConfig { field, message } => {
                err(&field, format!("{location}: {message}"))
            }
            other => other,
        })?;
        Ok(cfg)
    }

    /// PEFT's `adapter_config.json` for this config (what `PeftModel.from_pretrained` reads;
    /// fields left out take PEFT's defaults).
    pub fn to_peft_json(&self) -> Value {
        let modules = match &self.target_modules {
            ModuleSelector::Names(n) => json!(n),
            ModuleSelector::Regex(r) => json!(r),
            ModuleSelector::AllLinear => json!("all-linear"),
        };
        let init = match self.init {
            LoraInit::Kaiming => json!(true),
            LoraInit::Gaussian => json!("gaussian"),
            LoraInit::NoInit => json!(false),
        };
        json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": self.base_model,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "use_rslora": self.use_rslora,
            "target_modules": modules,
            "target_parameters": if self.target_parameters.is_empty() { Value::Null } else { json!(self.target_parameters) },
            "exclude_modules": if self.exclude_modules.is_empty() { Value::Null } else { json!(self.exclude_modules) },
            "init_lora_weights": init,
            "bias": "none",
            "fan_in_fan_out": false,
            "use_dora": false,
            "lora_bias": false,
            "modules_to_save": null,
            "layers_to_transform": null,
            "layers_pattern": null,
            "rank_pattern": {},
            "alpha_pattern": {},
            "inference_mode": true,
            "revision": null,
        })
    }
}

/// Splits command-line target names into module names and expert parameters.
fn split_targets(names: &[String]) -> Result<(ModuleSelector, Vec<String>)> {
    let mut modules = Vec::new();
    let mut params = Vec::new();
    for n in names {
        match n.as_str() {
            "all-linear" => {
                if names.len() == 1 {
                    return Ok((ModuleSelector::AllLinear, params));
                }
                // all-linear plus expert stacks
                modules.push("all-linear".to_string());
            }
            "experts" | "mlp.experts" => {
                params.push("mlp.experts.gate_up_proj".into());
                params.push("mlp.experts.down_proj".into());
            }
            "gate_up_proj" => params.push("mlp.experts.gate_up_proj".into()),
            s if s.starts_with("experts.") || s.starts_with("mlp.experts.") => {
                let short = s.rsplit('.').next().unwrap_or(s);
                if short != "gate_up_proj" && short != "down_proj" {
                    return Err(err(
                        "targets",
                        format!("`{s}`: the experts have gate_up_proj and down_proj"),
                    ));
                }
                params.push(format!("mlp.experts.{short}"));
            }
            s => modules.push(s.to_string()),
        }
    }
    params.dedup();
    if modules.iter().any(|m| m == "all-linear") {
        if modules.len() > 1 {
            return Err(err(
                "targets",
                "all-linear already names every linear layer; list other modules without it",
            ));
        }
        return Ok((ModuleSelector::AllLinear, params));
    }
    Ok((ModuleSelector::Names(modules), params))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_with_targets_flags_and_experts() {
        let c = LoraConfig::parse_spec("r=16,alpha=32,dropout=0.05,targets=q_proj,k_proj,rslora")
            .unwrap();
        assert_eq!(
            (c.r, c.alpha, c.dropout, c.use_rslora),
            (16, 32.0, 0.05, true)
        );
        assert_eq!(
            c.target_modules,
            ModuleSelector::Names(vec!["q_proj".into(), "k_proj".into()])
        );
        assert!((c.scaling() - 8.0).abs() < 1e-12);
        let c = LoraConfig::parse_spec("r=4,targets=o_proj,experts").unwrap();
        assert_eq!(c.alpha, 4.0);
        assert_eq!(
            c.target_parameters,
            vec!["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
        );
        let c = LoraConfig::parse_spec("targets=all-linear,r=2").unwrap();
        assert_eq!(c.target_modules, ModuleSelector::AllLinear);
        assert_eq!(c.r, 2);
    }

    #[test]
    fn bad_specs_name_the_problem() {
        for (spec, needle) in [
            ("r=0", "positive"),
            ("r=x", "positive"),
            ("alpha=abc", "not a number"),
            ("dropout=1.5", "[0, 1)"),
            ("dropout=0.1,targets=experts", "target_parameters"),
            ("bogus=1", "unknown key"),
            ("q_proj", "neither"),
            ("r=4,,alpha=2", "empty item"),
            ("targets=experts.up", "gate_up_proj and down_proj"),
        ] {
            let e = LoraConfig::parse_spec(spec).unwrap_err().to_string();
            assert!(e.contains(needle), "{spec}: {e}");
        }
    }

    #[test]
    fn peft_json_round_trip_and_refusals() {
        let c =
            LoraConfig::parse_spec("r=4,alpha=8,targets=q_proj,experts.down_proj,rslora").unwrap();
        let text = c.to_peft_json().to_string();
        let back = LoraConfig::from_peft_json(&text, "x").unwrap();
        assert_eq!(back, c);
        for (k, v) in [
            ("use_dora", json!(true)),
            ("bias", json!("all")),
            ("rank_pattern", json!({"q_proj": 2})),
            ("peft_type", json!("IA3")),
            ("modules_to_save", json!(["lm_head"])),
        ] {
            let mut o = c.to_peft_json();
            o[k] = v;
            let e = LoraConfig::from_peft_json(&o.to_string(), "dir")
                .unwrap_err()
                .to_string();
            assert!(e.contains(k), "{k}: {e}");
        }
        assert!(LoraConfig::from_peft_json("[1]", "d").is_err());
        assert!(LoraConfig::from_peft_json("{", "d").is_err());
    }
}
