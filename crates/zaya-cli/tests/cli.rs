//! The stable command-line interface, driven as external checks drive it.

use std::path::PathBuf;
use std::process::Command;

use candle_core::{DType, Device, IndexOp};

fn zaya() -> Command {
    Command::new(env!("CARGO_BIN_EXE_zaya"))
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

fn temp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("zaya-cli-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn max_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn forward_writes_logits_and_captures() {
    let dir = fixture("gqa_sliding");
    let out = temp("forward").join("out.safetensors");
    let status = zaya()
        .args(["forward", "--model"])
        .arg(&dir)
        .arg("--inputs")
        .arg(dir.join("batch.json"))
        .arg("--out")
        .arg(&out)
        .args(["--hidden-states", "--attentions", "--router-logits"])
        .status()
        .unwrap();
    assert!(status.success());
    let got = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    let want =
        candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(got["logits"].dims(), &[3, 12, 96]);
    assert!(max_diff(&got["logits"], &want["batch.logits"]) < 1e-4);
    for i in 0..=6 {
        assert!(
            max_diff(
                &got[&format!("hidden_states.{i}")],
                &want[&format!("batch.hidden_states.{i}")]
            ) < 1e-4
        );
    }
    for l in 0..6 {
        assert!(
            max_diff(
                &got[&format!("attentions.{l}")],
                &want[&format!("batch.attentions.{l}")]
            ) < 1e-4
        );
        assert_eq!(got[&format!("router_logits.{l}")].dims(), &[36, 5]);
        assert!(
            max_diff(
                &got[&format!("router_logits.{l}")],
                &want[&format!("batch.router_logits.{l}")]
            ) < 1e-4
        );
    }
}

#[test]
fn generate_prints_new_tokens_as_json() {
    let dir = fixture("conv_k3");
    let output = zaya()
        .args(["generate", "--model"])
        .arg(&dir)
        .arg("--inputs")
        .arg(dir.join("batch.json"))
        .args(["--max-new-tokens", "10", "--ignore-eos"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let want =
        candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    let want = &want["gen_batch_ignore_eos.sequences"];
    for row in 0..3 {
        let w: Vec<i64> = want.i(row).unwrap().to_vec1().unwrap();
        let g: Vec<i64> = v["sequences"][row]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap())
            .collect();
        assert_eq!(g, w, "row {row}");
    }
}

#[test]
fn init_inspect_and_convert_round_trip() {
    let dir = temp("init");
    let model = dir.join("model");
    let status = zaya()
        .args(["init", "--config"])
        .arg(fixture("gqa_sliding").join("config.json"))
        .args(["--seed", "3", "--out"])
        .arg(&model)
        .status()
        .unwrap();
    assert!(status.success());
    let out = zaya().arg("inspect").arg(&model).output().unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["layout"], "native");
    let total = v["parameters"]["total"].as_u64().unwrap();
    let active = v["parameters"]["active_per_token"].as_u64().unwrap();
    // 4 experts of 3·48·24 weights per layer, 6 layers: active keeps one of them per layer
    assert_eq!(total - active, 6 * 3 * (3 * 48 * 24));

    let legacy = dir.join("legacy");
    let status = zaya()
        .args(["convert", "--from"])
        .arg(&model)
        .arg("--to")
        .arg(&legacy)
        .args(["--layout", "legacy"])
        .status()
        .unwrap();
    assert!(status.success());
    let out = zaya().arg("inspect").arg(&legacy).output().unwrap();
    let w: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(w["layout"], "legacy");
    assert_eq!(w["parameters"], v["parameters"]);
}

#[test]
fn bad_input_fails_with_a_message() {
    let dir = temp("bad");
    std::fs::write(dir.join("in.json"), r#"{"input_ids": [[1, 2, 999]]}"#).unwrap();
    let out = zaya()
        .args(["forward", "--model"])
        .arg(fixture("mha_bias"))
        .arg("--inputs")
        .arg(dir.join("in.json"))
        .arg("--out")
        .arg(dir.join("o.safetensors"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("999") && err.contains("position 2"), "{err}");
}
