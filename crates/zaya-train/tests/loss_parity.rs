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
