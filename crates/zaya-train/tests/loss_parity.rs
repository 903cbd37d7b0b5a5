//! GRPO loss parity with TRL 1.16 `GRPOTrainer._compute_loss` (fixtures written by
//! `scripts/make_grpo_fixtures.py`): the loss within 1e-5, the per-token log-probabilities
//! within 1e-4 (as the logits) and the gradient of every parameter within 1e-4 relative (Frobenius) for
//! every loss type, beta 0 and > 0, epsilon_high != epsilon, token and sequence importance
//! sampling, old log-probabilities from other weights (num_iterations 2), on-policy, a tool
//! mask, tied embeddings with sliding windows.

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::{DType, Tensor};
use zaya::train::TrainableModel;
use zaya_train::{grpo_loss_outputs, GrpoInputs, LossConfig};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn norm(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        .sqrt()
}

fn config(flags: &serde_json::Value) -> LossConfig {
    LossConfig {
        loss_type: flags["loss_type"].as_str().unwrap().parse().unwrap(),
        beta: flags["beta"].as_f64().unwrap(),
        epsilon_low: flags["epsilon"].as_f64().unwrap(),
        epsilon_high: flags["epsilon_high"].as_f64().unwrap(),
        importance_sampling: flags["importance_sampling"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap(),
        max_completion_length: flags["max_completion_length"].as_u64().unwrap() as usize,
        temperature: flags["temperature"].as_f64().unwrap(),
        use_bias_correction_kl: flags["use_bias_correction_kl"].as_bool().unwrap(),
        ..Default::default()
    }
}

#[test]
fn every_case_matches_trl() {
    let dir = fixtures().join("grpo");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("meta.json")).unwrap()).unwrap();
    let cases = meta["cases"].as_object().unwrap();
    assert!(cases.len() >= 10, "fixture cases: {}", cases.len());
    let mut models: BTreeMap<String, TrainableModel> = BTreeMap::new();
    for (case, flags) in cases {
        let fixture = flags["model"].as_str().unwrap().to_string();
        let model = models.entry(fixture.clone()).or_insert_with(|| {
            TrainableModel::load(fixtures().join("models").join(&fixture)).unwrap()
        });
        let text = std::fs::read_to_string(dir.join(format!("{case}.json"))).unwrap();
        let inputs = GrpoInputs::from_json(&text, model.config().vocab_size).unwrap();
        let want = candle_core::safetensors::load(
            dir.join(format!("{case}.safetensors")),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let cfg = config(flags);
        let got = grpo_loss_outputs(model, &inputs, &cfg, true).unwrap();
        let scalar = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0] as f64;
        let (l, wl) = (scalar(&got["loss"]), scalar(&want["loss"]));
        assert!((l - wl).abs() <= 1e-5, "{case}: loss {l} vs TRL {wl}");
        let lp = (&got["per_token_logps"] - &want["per_token_logps"])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        // Same bound as the logits parity suite (a log-probability of about −8 carries f32 rounding of the log-sum-exp).
        assert!(lp <= 1e-4, "{case}: per-token logps differ by {lp}");
        let want_grads: BTreeMap<&str, &Tensor> = want
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("grad.").map(|n| (n, v)))
            .collect();
        let got_grads: BTreeMap<&str, &Tensor> = got
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("grad.").map(|n| (n, v)))
            .collect();
        assert_eq!(
            got_grads.keys().collect::<Vec<_>>(),
            want_grads.keys().collect::<Vec<_>>(),
            "{case}: parameter sets differ"
        );
        let mut worst = (0f64, "");
        for (n, g) in &got_grads {
            let w = want_grads[n];
            let e = norm(&(*g - w).unwrap()) / norm(w).max(1e-6);
            assert!(e <= 1e-4, "{case}: grad of {n}: relative error {e}");
            if e > worst.0 {
                worst = (e, n);
            }
        }
        eprintln!(
            "{case}: loss {l:.6} |Δ| {:.1e}, logps max |Δ| {lp:.1e}, worst grad rel err {:.1e} ({})",
            (l - wl).abs(),
            worst.0,
            worst.1
        );
    }
}

/// GRPO on a LoRA adapter against TRL 1.16 + PEFT 0.21.2 (fixtures of
/// `scripts/make_grpo_lora_fixtures.py`: `GRPOTrainer(peft_config=...)` over a tiny ZAYA,
/// adapters on attention, the router MLP and both expert stacks; rsLoRA on a subset): the
/// loss within 1e-5, the per-token log-probabilities within 1e-4 and every adapter gradient
/// (PEFT key) within 1e-4 relative, with and without gradient checkpointing; and the KL
/// reference — the base with the adapters disabled — gives TRL's reference log-probabilities.
#[test]
fn lora_cases_match_trl_with_peft() {
    use zaya::lora::{LoraAdapter, LoraModel};
    use zaya::train::{Checkpointing, Trainable};
    use zaya_train::{grpo_backward, reference_logps, Accumulation};

    let dir = fixtures().join("grpo_lora");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("meta.json")).unwrap()).unwrap();
    let cases = meta["cases"].as_object().unwrap();
    assert!(cases.len() >= 2, "fixture cases: {}", cases.len());
    for (case, flags) in cases {
        let fixture = flags["model"].as_str().unwrap();
        let base = zaya::ZayaModel::load(
            fixtures().join("models").join(fixture),
            DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let adapter = LoraAdapter::load(dir.join(case).join("adapter"), base.config()).unwrap();
        let lm = LoraModel::from_adapter(&base, &adapter, 0).unwrap();
        let text = std::fs::read_to_string(dir.join(format!("{case}.json"))).unwrap();
        let inputs = GrpoInputs::from_json(&text, base.config().vocab_size).unwrap();
        let want = candle_core::safetensors::load(
            dir.join(format!("{case}.safetensors")),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let cfg = config(flags);
        let got = grpo_loss_outputs(&lm, &inputs, &cfg, true).unwrap();
        let scalar = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0] as f64;
        let (l, wl) = (scalar(&got["loss"]), scalar(&want["loss"]));
        assert!((l - wl).abs() <= 1e-5, "{case}: loss {l} vs TRL {wl}");
        // padding positions hold whatever each side computed there: compare the masked grid
        let mask: Vec<f32> = inputs
            .completion_mask
            .iter()
            .flatten()
            .map(|&m| m as f32)
            .collect();
        let masked_diff = |a: &Tensor, b: &Tensor| {
            let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            a.iter()
                .zip(&b)
                .zip(&mask)
                .map(|((x, y), m)| (x - y).abs() * m)
                .fold(0f32, f32::max)
        };
        let lp = masked_diff(&got["per_token_logps"], &want["per_token_logps"]);
        assert!(lp <= 1e-4, "{case}: per-token logps differ by {lp}");
        let grads = |m: &std::collections::HashMap<String, Tensor>| -> BTreeMap<String, Tensor> {
            m.iter()
                .filter_map(|(k, v)| k.strip_prefix("grad.").map(|n| (n.to_string(), v.clone())))
                .collect()
        };
        let want_grads = grads(&want);
        let check = |got_grads: &BTreeMap<String, Tensor>, tag: &str| -> f64 {
            assert_eq!(
                got_grads.keys().collect::<Vec<_>>(),
                want_grads.keys().collect::<Vec<_>>(),
                "{case} ({tag}): adapter parameter sets differ"
            );
            let mut worst = 0f64;
            for (n, g) in got_grads {
                let w = &want_grads[n];
                let e = norm(&(g - w).unwrap()) / norm(w).max(1e-6);
                assert!(e <= 1e-4, "{case} ({tag}): grad of {n}: relative error {e}");
                worst = worst.max(e);
            }
            worst
        };
        let got_map: std::collections::HashMap<String, Tensor> = got.into_iter().collect();
        let worst = check(&grads(&got_map), "no checkpointing");
        // the same backward with every layer recomputed
        let acc = Accumulation {
            grad_accum: 1,
            steps_per_generation: 1,
            num_items_in_batch: inputs.num_loss_tokens() as f64,
        };
        let opts = zaya::train::TrainOptions {
            aux_loss_coef: 0.0,
            checkpointing: Checkpointing::EveryLayer,
            ..zaya::train::TrainOptions::for_config(base.config())
        };
        let r = grpo_backward(&lm, &inputs, &cfg, &acc, &opts, 0.0).unwrap();
        assert!(
            (r.loss.loss - wl).abs() <= 1e-5,
            "{case}: checkpointed loss"
        );
        let worst_cp = check(&r.grads.named(lm.params()), "checkpointing every layer");
        // TRL's reference for a new adapter: the base with the adapters disabled
        if let Some(want_ref) = &inputs.ref_logps {
            let reference = lm.frozen_reference().expect("LoRA has a frozen reference");
            let (got_ref, _) =
                reference_logps(&reference, &inputs, &opts, cfg.temperature).unwrap();
            let mut d = 0f32;
            for (r, (g, w)) in got_ref.iter().zip(want_ref).enumerate() {
                for (t, (x, y)) in g.iter().zip(w).enumerate() {
                    if inputs.completion_mask[r][t] == 1 {
                        d = d.max((x - y).abs());
                    }
                }
            }
            assert!(
                d <= 1e-4,
                "{case}: reference log-probs differ from TRL's by {d}"
            );
        }
        eprintln!(
            "{case}: loss {l:.6} |Δ| {:.1e}, logps max |Δ| {lp:.1e}, worst adapter grad rel err {worst:.1e} ({worst_cp:.1e} checkpointed), {} adapter weights",
            (l - wl).abs(),
            want_grads.len()
        );
    }
}
