//! `zaya` with LoRA adapters: `forward --adapter [--grads]` against the PEFT fixtures,
//! `merge`, `generate --adapter`, `train --lora` (loss falls, PEFT-format output that loads
//! back, exact resume), and the memory refusal.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};

fn zaya() -> Command {
    Command::new(env!("CARGO_BIN_EXE_zaya"))
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

fn lora_fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/lora")
        .join(name)
}

mod scratch;
use scratch::scratch as temp;

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
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

fn rel_err(got: &Tensor, want: &Tensor) -> f64 {
    let n = |t: &Tensor| {
        t.to_dtype(DType::F64)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
            .sqrt()
    };
    let d = (got.to_dtype(DType::F64).unwrap() - want.to_dtype(DType::F64).unwrap()).unwrap();
    n(&d) / n(want).max(1e-6)
}

fn run_ok(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn forward(model: &Path, adapter: Option<&Path>, inputs: &Path, out: &Path, grads: bool) {
    let mut cmd = zaya();
    cmd.args(["forward", "--model"])
        .arg(model)
        .arg("--inputs")
        .arg(inputs)
        .arg("--out")
        .arg(out);
    if let Some(a) = adapter {
        cmd.arg("--adapter").arg(a);
    }
    if grads {
        cmd.args(["--grads", "--checkpointing"]);
    }
    run_ok(&mut cmd);
}

#[test]
fn forward_with_a_peft_adapter_gives_peft_logits_loss_and_adapter_gradients() {
    let (_guard, dir) = temp("forward");
    let model = fixture("gqa_sliding");
    let adapter = lora_fixture("full").join("adapter");
    let reference = candle_core::safetensors::load(
        lora_fixture("full").join("reference.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let out = dir.join("single.safetensors");
    forward(
        &model,
        Some(&adapter),
        &model.join("single.json"),
        &out,
        false,
    );
    let got = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    assert!(max_diff(&got["logits"], &reference["single.logits"]) < 1e-4);

    let out = dir.join("train.safetensors");
    forward(
        &model,
        Some(&adapter),
        &model.join("train.json"),
        &out,
        true,
    );
    let got = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    let loss = got["loss"].to_vec1::<f32>().unwrap()[0];
    let want = reference["train.loss"].to_vec1::<f32>().unwrap()[0];
    assert!((loss - want).abs() <= 1e-5 * want.abs(), "{loss} vs {want}");
    let grads: Vec<&String> = got.keys().filter(|k| k.starts_with("grad.")).collect();
    assert_eq!(
        grads.len(),
        reference
            .keys()
            .filter(|k| k.starts_with("train.grad."))
            .count()
    );
    for k in grads {
        // named by their keys in adapter_model.safetensors
        assert!(k.starts_with("grad.base_model.model.model.layers."), "{k}");
        let want = &reference[&format!("train.{k}")];
        let e = rel_err(&got[k], want);
        assert!(e <= 1e-4, "{k}: {e}");
    }
}

#[test]
fn merge_equals_the_unmerged_adapter_and_generate_runs_it() {
    let (_guard, dir) = temp("merge");
    let model = fixture("mha_bias");
    let adapter = lora_fixture("rslora").join("adapter");
    let merged = dir.join("merged");
    run_ok(
        zaya()
            .args(["merge", "--model"])
            .arg(&model)
            .arg("--adapter")
            .arg(&adapter)
            .arg("--out")
            .arg(&merged),
    );
    let a = dir.join("a.safetensors");
    let b = dir.join("b.safetensors");
    forward(&model, Some(&adapter), &model.join("batch.json"), &a, false);
    forward(&merged, None, &model.join("batch.json"), &b, false);
    let la = &candle_core::safetensors::load(&a, &Device::Cpu).unwrap()["logits"];
    let lb = &candle_core::safetensors::load(&b, &Device::Cpu).unwrap()["logits"];
    let d = max_diff(la, lb);
    assert!(d <= 1e-5, "merged vs unmerged: {d}");
    // greedy generation over the adapter equals generation from the merged model
    let gen = |m: &Path, ad: Option<&Path>| {
        let mut cmd = zaya();
        cmd.args(["generate", "--model"])
            .arg(m)
            .arg("--inputs")
            .arg(model.join("single.json"))
            .args(["--max-new-tokens", "6", "--ignore-eos"]);
        if let Some(ad) = ad {
            cmd.arg("--adapter").arg(ad);
        }
        run_ok(&mut cmd)
    };
    assert_eq!(gen(&model, Some(&adapter)), gen(&merged, None));
    assert_ne!(gen(&model, Some(&adapter)), gen(&model, None));
    // a bad adapter directory is an error naming it
    let o = zaya()
        .args(["generate", "--model"])
        .arg(&model)
        .arg("--inputs")
        .arg(model.join("single.json"))
        .arg("--adapter")
        .arg(dir.join("nope"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("adapter_config.json"));
}

fn train_data(dir: &Path, model: &Path) -> PathBuf {
    let train: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("train.json")).unwrap()).unwrap();
    let mut data = String::new();
    for k in 0..8 {
        let ids = &train["input_ids"][k % 2];
        data.push_str(&serde_json::json!({ "input_ids": ids }).to_string());
        data.push('\n');
    }
    let path = dir.join("data.jsonl");
    std::fs::write(&path, data).unwrap();
    path
}

fn train(model: &Path, data: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    zaya()
        .args(["train", "--model"])
        .arg(model)
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(out)
        .args([
            "--seq-len",
            "12",
            "--batch-size",
            "2",
            "--epochs",
            "3",
            "--save-every",
            "2",
            "--lr",
            "1e-2",
            "--warmup-steps",
            "0",
            "--checkpointing",
            "every",
            "--no-progress",
        ])
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn train_lora_lowers_the_loss_writes_peft_adapters_and_resumes_exactly() {
    let (_guard, dir) = temp("train");
    let model = fixture("gqa_sliding");
    let data = train_data(&dir, &model);
    let spec = ["--lora", "r=4,alpha=8,targets=q_proj,o_proj,fc1,experts"];
    let o = train(&model, &data, &dir.join("a"), &spec);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("memory (LoRA r=4") && err.contains("AdamW"),
        "{err}"
    );
    let a = dir.join("a");
    for f in [
        "final/adapter_config.json",
        "final/adapter_model.safetensors",
        "step-00000002/adapter_model.safetensors",
        "step-00000002/optimizer.safetensors",
        "loss.csv",
        "loss.svg",
    ] {
        assert!(a.join(f).exists(), "{f} missing");
    }
    // only adapter weights are saved, under PEFT keys, and the base is untouched
    let w = candle_core::safetensors::load(a.join("final/adapter_model.safetensors"), &Device::Cpu)
        .unwrap();
    assert!(w
        .keys()
        .all(|k| k.contains(".lora_A.") || k.contains(".lora_B.")));
    assert!(w
        .keys()
        .any(|k| k.ends_with("mlp.experts.base_layer.lora_A.weight")));
    let losses: Vec<f64> = std::fs::read_to_string(a.join("loss.csv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(2).unwrap().parse().unwrap())
        .collect();
    assert_eq!(losses.len(), 12);
    assert!(
        losses[losses.len() - 1] < losses[0] * 0.9,
        "loss did not fall: {losses:?}"
    );
    // the trained adapter runs on the base with --adapter
    let out = dir.join("fwd.safetensors");
    forward(
        &model,
        Some(&a.join("final")),
        &model.join("single.json"),
        &out,
        false,
    );

    // exact resume from step 2
    let b = dir.join("b");
    std::fs::create_dir_all(b.join("step-00000002")).unwrap();
    for f in std::fs::read_dir(a.join("step-00000002")).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), b.join("step-00000002").join(f.file_name())).unwrap();
    }
    std::fs::write(b.join("latest"), "step-00000002").unwrap();
    let log = std::fs::read_to_string(a.join("loss.csv")).unwrap();
    let head: Vec<&str> = log.lines().take(3).collect();
    std::fs::write(b.join("loss.csv"), head.join("\n") + "\n").unwrap();
    let mut extra = spec.to_vec();
    extra.push("--resume");
    let o = train(&model, &data, &b, &extra);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let wb =
        candle_core::safetensors::load(b.join("final/adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    for (k, t) in &w {
        assert_eq!(max_diff(t, &wb[k]), 0.0, "{k} differs after resume");
    }
    // a resume with another adapter spec is refused
    let o = train(
        &model,
        &data,
        &b,
        &["--lora", "r=2,targets=q_proj", "--resume"],
    );
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--lora"));
}

#[test]
fn qlora_trains_and_a_run_that_cannot_fit_is_refused() {
    let (_guard, dir) = temp("qlora");
    let model = fixture("gqa_sliding");
    let data = train_data(&dir, &model);
    let o = train(
        &model,
        &data,
        &dir.join("q"),
        &[
            "--lora",
            "r=4,targets=all-linear,experts",
            "--quant",
            "q8_0",
            "--max-steps",
            "3",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(dir.join("q/final/adapter_model.safetensors").exists());
    let o = train(
        &model,
        &data,
        &dir.join("r"),
        &[
            "--lora",
            "r=4,targets=q_proj",
            "--memory-budget-gib",
            "0.01",
        ],
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("needs about") && err.contains("activations") && err.contains("base"),
        "{err}"
    );
    assert!(!dir.join("r/step-00000002").exists());
}
