//! LoRA parity with PEFT 0.21.2 over transformers 5.23 (fp32), on the fixtures of
//! `scripts/make_lora_fixtures.py`: adapter keys and shapes, logits with the adapter attached,
//! loss (1e-5) and every adapter gradient (relative Frobenius error 1e-4) with and without
//! checkpointing, merged == unmerged (1e-5), save/load round trip, PEFT initialisation,
//! QLoRA gradients over a quantized base.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use common::{assert_close, batch, fixture_dir, inputs, max_abs_diff, temp_dir};
use zaya::lora::{attach_lora, LoraAdapter, LoraConfig, LoraModel};
use zaya::train::{labelled_outputs_of, Checkpointing};
use zaya::weights::{load_all, Checkpoint};
use zaya::{ForwardOptions, ZayaModel};

/// (fixture, base model)
const ADAPTERS: [(&str, &str); 2] = [("full", "gqa_sliding"), ("rslora", "mha_bias")];

fn lora_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/lora")
        .join(name)
}

fn lora_reference(name: &str) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(lora_dir(name).join("reference.safetensors"), &Device::Cpu)
        .unwrap()
}

fn base(model: &str) -> ZayaModel {
    ZayaModel::load(fixture_dir(model), DType::F32, &Device::Cpu).unwrap()
}

fn ids_and_mask(model: &str, which: &str) -> (Tensor, Option<Tensor>) {
    let inp = inputs(model, which);
    let rows = inp.input_ids.len();
    let cols = inp.input_ids[0].len();
    let flat: Vec<u32> = inp.input_ids.iter().flatten().map(|&x| x as u32).collect();
    let ids = Tensor::from_vec(flat, (rows, cols), &Device::Cpu).unwrap();
    let mask = inp.attention_mask.map(|m| {
        let flat: Vec<u32> = m.iter().flatten().map(|&x| x as u32).collect();
        Tensor::from_vec(flat, (rows, cols), &Device::Cpu).unwrap()
    });
    (ids, mask)
}

fn logits(model: &ZayaModel, base_name: &str, which: &str) -> Tensor {
    let (ids, mask) = ids_and_mask(base_name, which);
    let opts = ForwardOptions {
        attention_mask: mask,
        ..Default::default()
    };
    model.forward(&ids, None, &opts).unwrap().logits.unwrap()
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

fn rel_err(got: &Tensor, want: &Tensor) -> f64 {
    assert_eq!(got.dims(), want.dims());
    let d = (got.to_dtype(DType::F64).unwrap() - want.to_dtype(DType::F64).unwrap()).unwrap();
    norm(&d) / norm(want).max(1e-6)
}

#[test]
fn planned_keys_and_shapes_are_peft_s() {
    for (name, model) in ADAPTERS {
        let cfg = base(model).config().clone();
        let text =
            std::fs::read_to_string(lora_dir(name).join("adapter/adapter_config.json")).unwrap();
        let lora = LoraConfig::from_peft_json(&text, "fixture").unwrap();
        let sites = zaya::lora::plan(&cfg, &lora).unwrap();
        let mut got = BTreeMap::new();
        for s in &sites {
            got.insert(s.key_a.clone(), s.shape_a.to_vec());
            got.insert(s.key_b.clone(), s.shape_b.to_vec());
        }
        let want: BTreeMap<String, Vec<usize>> = serde_json::from_str(
            &std::fs::read_to_string(lora_dir(name).join("keys.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(got, want, "{name}");
    }
}

#[test]
fn peft_adapter_gives_the_reference_logits() {
    for (name, model) in ADAPTERS {
        let base = base(model);
        let adapter = LoraAdapter::load(lora_dir(name).join("adapter"), base.config()).unwrap();
        let adapted = adapter.apply(&base).unwrap();
        let r = lora_reference(name);
        for which in ["single", "batch"] {
            let got = logits(&adapted, model, which);
            assert_close(
                &format!("{name}/{which} logits"),
                &got,
                &r[&format!("{which}.logits")],
                1e-4,
            );
        }
        // the adapter matters: the base alone is far from these logits
        let plain = logits(&base, model, "single");
        assert!(max_abs_diff(&plain, &r["single.logits"]) > 0.1, "{name}");
    }
}

#[test]
fn loss_and_every_adapter_gradient_match_peft() {
    for (name, model) in ADAPTERS {
        let base = base(model);
        let adapter = LoraAdapter::load(lora_dir(name).join("adapter"), base.config()).unwrap();
        let lm = LoraModel::from_adapter(&base, &adapter, 0).unwrap();
        let r = lora_reference(name);
        for which in ["train", "train_pad"] {
            let b = batch(model, which);
            let mut previous: Option<BTreeMap<String, Tensor>> = None;
            for ckpt in [
                Checkpointing::Off,
                Checkpointing::EveryLayer,
                Checkpointing::Every(2),
            ] {
                let out = labelled_outputs_of(lm.model(), lm.params(), &b, true, ckpt).unwrap();
                let loss = out["loss"].to_vec1::<f32>().unwrap()[0] as f64;
                let want = r[&format!("{which}.loss")].to_vec1::<f32>().unwrap()[0] as f64;
                assert!(
                    (loss - want).abs() <= 1e-5 * want.abs().max(1.0),
                    "{name}/{which}/{ckpt:?}: loss {loss} vs {want}"
                );
                let mut n = 0;
                for p in lm.params() {
                    let got = &out[&format!("grad.{}", p.name)];
                    let want = &r[&format!("{which}.grad.{}", p.name)];
                    let e = rel_err(got, want);
                    assert!(e <= 1e-4, "{name}/{which}/{ckpt:?} {}: rel err {e}", p.name);
                    n += 1;
                }
                assert_eq!(n, adapter.sites.len() * 2);
                // only adapter gradients are produced
                assert_eq!(out.len(), n + 2);
                if let Some(prev) = &previous {
                    for (k, g) in prev {
                        let e = rel_err(&out[k], g);
                        assert!(
                            e <= 1e-6,
                            "{name}/{which}/{ckpt:?} {k}: {e} vs no checkpointing"
                        );
                    }
                }
                previous = Some(
                    out.into_iter()
                        .filter(|(k, _)| k.starts_with("grad."))
                        .collect(),
                );
            }
        }
    }
}

#[test]
fn merged_weights_equal_unmerged_inference() {
    for (name, model) in ADAPTERS {
        let dir = fixture_dir(model);
        let base = base(model);
        let adapter = LoraAdapter::load(lora_dir(name).join("adapter"), base.config()).unwrap();
        let ckpt = Checkpoint::open(&dir).unwrap();
        let cfg = ckpt.config().unwrap();
        let mut tensors = load_all(&ckpt, &cfg, &Device::Cpu).unwrap();
        adapter.merge_into(&mut tensors).unwrap();
        let map: std::collections::HashMap<String, Tensor> = tensors.into_iter().collect();
        let merged = ZayaModel::new(
            &cfg,
            VarBuilder::from_tensors(map, DType::F32, &Device::Cpu),
        )
        .unwrap();
        let unmerged = adapter.apply(&base).unwrap();
        for which in ["single", "batch"] {
            let a = logits(&merged, model, which);
            let b = logits(&unmerged, model, which);
            let scale = norm(&b) / (b.elem_count() as f64).sqrt();
            let d = max_abs_diff(&a, &b) as f64;
            assert!(
                d <= 1e-5 * scale.max(1.0) * 10.0 && d <= 1e-4,
                "{name}/{which}: merged vs unmerged max diff {d} (rms logit {scale})"
            );
        }
    }
}

#[test]
fn saved_adapter_round_trips_and_new_adapters_start_as_the_base() {
    let base = base("gqa_sliding");
    let adapter = LoraAdapter::load(lora_dir("full").join("adapter"), base.config()).unwrap();
    let (_guard, dir) = temp_dir("lora-save");
    adapter.save(&dir).unwrap();
    let back = LoraAdapter::load(&dir, base.config()).unwrap();
    assert_eq!(back.config, adapter.config);
    let (a, b) = (
        adapter.named_tensors().unwrap(),
        back.named_tensors().unwrap(),
    );
    assert_eq!(a.len(), b.len());
    for (k, t) in &a {
        assert_eq!(max_abs_diff(t, &b[k]), 0.0, "{k}");
    }

    // A fresh adapter (B = 0) leaves the model unchanged (up to summation order: adapted
    // experts run the grouped differentiable path, not the fused kernel; exactly equal on
    // linear modules only); A is Kaiming-uniform (±1/√in).
    let plain = logits(&base, "gqa_sliding", "single");
    let cfg = LoraConfig::parse_spec("r=4,alpha=8,targets=all-linear").unwrap();
    let lm = attach_lora(&base, &cfg, 3).unwrap();
    assert_eq!(
        max_abs_diff(&plain, &logits(lm.model(), "gqa_sliding", "single")),
        0.0
    );
    let cfg = LoraConfig::parse_spec("r=4,alpha=8,targets=all-linear,experts").unwrap();
    let lm = attach_lora(&base, &cfg, 3).unwrap();
    let fresh = logits(lm.model(), "gqa_sliding", "single");
    assert!(max_abs_diff(&plain, &fresh) < 1e-4);
    for p in lm.params() {
        let v: Vec<f32> = p.var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        if p.name.contains("lora_B") {
            assert!(v.iter().all(|&x| x == 0.0), "{}", p.name);
        } else {
            let fan_in = p.var.dims()[1] as f32;
            let bound = 1.0 / fan_in.sqrt();
            assert!(v.iter().all(|x| x.abs() <= bound), "{}", p.name);
            assert!(v.iter().any(|x| x.abs() > bound / 2.0), "{}", p.name);
        }
    }
    // every adapter parameter of a fresh adapter gets a gradient (B's are nonzero)
    let out = labelled_outputs_of(
        lm.model(),
        lm.params(),
        &batch("gqa_sliding", "train"),
        true,
        Checkpointing::Off,
    )
    .unwrap();
    for p in lm.params() {
        let g = &out[&format!("grad.{}", p.name)];
        if p.name.contains("lora_B") {
            assert!(norm(g) > 0.0, "{}", p.name);
        }
    }
}

#[test]
fn bad_adapters_are_refused_by_name() {
    let base = base("gqa_sliding");
    let src = lora_dir("full").join("adapter");
    // a missing tensor
    let (_guard, dir) = temp_dir("lora-bad");
    let cfg_text = std::fs::read_to_string(src.join("adapter_config.json")).unwrap();
    std::fs::write(dir.join("adapter_config.json"), &cfg_text).unwrap();
    let mut t =
        zaya::lora::adapter::read_safetensors(&src.join("adapter_model.safetensors")).unwrap();
    let key = t.keys().next().unwrap().clone();
    t.remove(&key);
    let v: Vec<(String, Tensor)> = t.into_iter().collect();
    safetensors::serialize_to_file(
        v.iter().map(|(k, t)| (k.as_str(), t)).collect::<Vec<_>>(),
        None,
        &dir.join("adapter_model.safetensors"),
    )
    .unwrap();
    let e = LoraAdapter::load(&dir, base.config())
        .unwrap_err()
        .to_string();
    assert!(e.contains(&key), "{e}");
    // adapter for another model: shapes differ
    let other = ZayaModel::load(fixture_dir("conv_k3"), DType::F32, &Device::Cpu).unwrap();
    let e = LoraAdapter::load(&src, other.config())
        .unwrap_err()
        .to_string();
    assert!(e.contains("lora_"), "{e}");
    // a target that matches nothing, an unsupported one
    for (targets, needle) in [
        ("targets=q_prj", "match no module"),
        ("targets=lm_head", "lm_head"),
    ] {
        let c = LoraConfig::parse_spec(targets).unwrap();
        let e = attach_lora(&base, &c, 0).unwrap_err().to_string();
        assert!(e.contains(needle), "{targets}: {e}");
    }
    // truncated weights file
    let bytes = std::fs::read(src.join("adapter_model.safetensors")).unwrap();
    std::fs::write(
        dir.join("adapter_model.safetensors"),
        &bytes[..bytes.len() / 2],
    )
    .unwrap();
    let e = LoraAdapter::load(&dir, base.config())
        .unwrap_err()
        .to_string();
    assert!(e.contains("adapter_model.safetensors"), "{e}");
}

/// QLoRA: adapters over a quantized base get gradients through candle's quantized matmul
/// (dequantized in the backward). Against the same adapter over the dequantized base in f32
/// they differ only by the activation rounding of the quantized matmul.
#[test]
fn qlora_gradients_follow_the_dequantized_base() {
    use zaya::quant::QuantPlan;
    let dir = fixture_dir("gqa_sliding");
    let plan = QuantPlan::uniform("q8_0".parse().unwrap());
    let qbase = ZayaModel::load_quantized(&dir, DType::F32, &Device::Cpu, Some(&plan)).unwrap();
    assert!(qbase.weight_bytes() < base("gqa_sliding").weight_bytes());
    let adapter = LoraAdapter::load(lora_dir("full").join("adapter"), qbase.config()).unwrap();
    let lm = LoraModel::from_adapter(&qbase, &adapter, 0).unwrap();
    let b = batch("gqa_sliding", "train");
    let out =
        labelled_outputs_of(lm.model(), lm.params(), &b, true, Checkpointing::EveryLayer).unwrap();
    let r = lora_reference("full");
    let loss = out["loss"].to_vec1::<f32>().unwrap()[0];
    let want = r["train.loss"].to_vec1::<f32>().unwrap()[0];
    assert!(
        (loss - want).abs() / want < 0.02,
        "loss {loss} vs f32 {want}"
    );
    let mut worst = 0f64;
    for p in lm.params() {
        let e = rel_err(
            &out[&format!("grad.{}", p.name)],
            &r[&format!("train.grad.{}", p.name)],
        );
        worst = worst.max(e);
    }
    eprintln!("QLoRA q8_0: worst relative gradient error against the f32 base {worst}");
    assert!(worst < 0.15, "{worst}");
}

/// Adapters over a bf16 base (read in place, the frozen bf16 linear op): the training path
/// runs in bf16 with f32 adapters and stays near the f32 result (bf16 rounding only).
#[test]
fn bf16_base_gradients_follow_the_f32_base() {
    let dir = fixture_dir("gqa_sliding");
    let base16 = ZayaModel::load(&dir, DType::BF16, &Device::Cpu).unwrap();
    let adapter = LoraAdapter::load(lora_dir("full").join("adapter"), base16.config()).unwrap();
    let lm = LoraModel::from_adapter(&base16, &adapter, 0).unwrap();
    let b = batch("gqa_sliding", "train_pad");
    let r = lora_reference("full");
    let want = r["train_pad.loss"].to_vec1::<f32>().unwrap()[0];
    for ckpt in [Checkpointing::Off, Checkpointing::EveryLayer] {
        let out = labelled_outputs_of(lm.model(), lm.params(), &b, true, ckpt).unwrap();
        let loss = out["loss"].to_vec1::<f32>().unwrap()[0];
        assert!(
            (loss - want).abs() / want < 0.05,
            "{ckpt:?}: loss {loss} vs f32 {want}"
        );
        let mut worst = 0f64;
        for p in lm.params() {
            let g = &out[&format!("grad.{}", p.name)];
            assert_eq!(g.dtype(), DType::F32, "{}", p.name);
            let e = rel_err(g, &r[&format!("train_pad.grad.{}", p.name)]);
            worst = worst.max(e);
        }
        eprintln!("bf16 base, {ckpt:?}: worst relative gradient error against f32 {worst}");
        assert!(worst < 0.25, "{ckpt:?}: {worst}");
    }
}

/// GRPO's view of a LoRA model: the inference view is the base with the live adapter attached
/// (PEFT's logits), reads the adapter vars' storage (an in-place update, as AdamW writes,
/// shows at once, without rebuilding the view), has no dropout and records no graph; the
/// frozen reference is the base without the adapter.
#[test]
fn inference_view_follows_the_adapter_vars_and_reference_is_the_base() {
    use zaya::train::Trainable;
    let (name, model) = ("full", "gqa_sliding");
    let base = base(model);
    let mut adapter = LoraAdapter::load(lora_dir(name).join("adapter"), base.config()).unwrap();
    adapter.config.dropout = 0.3;
    let mut lm = LoraModel::from_adapter(&base, &adapter, 0).unwrap();
    lm.set_dropout_key(1, 0).unwrap();
    let view = Trainable::inference_view(&lm).unwrap();
    let r = lora_reference(name);
    let got = logits(&view, model, "single");
    assert_close("view logits", &got, &r["single.logits"], 1e-4);
    assert!(!got.track_op(), "the view records no graph");
    // AdamW writes the vars in place: the same view sees the new factors
    let p = &lm.params()[1];
    assert!(p.name.ends_with("lora_B.weight"), "{}", p.name);
    let moved = (p.var.as_tensor().detach() * 3.0).unwrap();
    p.var.set(&moved).unwrap();
    let after = logits(&view, model, "single");
    let want = logits(&lm.eval_model().unwrap(), model, "single");
    assert!(
        max_abs_diff(&after, &got) > 1e-4,
        "the view did not follow the update"
    );
    // (the vars record a graph, so that model runs the differentiable reference kernels)
    let d = max_abs_diff(&after, &want);
    assert!(d <= 1e-4, "view vs adapted model after the update: {d}");
    // the KL reference: the base, adapters disabled
    let reference = lm.frozen_reference().unwrap();
    assert!(
        max_abs_diff(
            &logits(&reference, model, "single"),
            &logits(&base, model, "single")
        ) == 0.0
    );
}
