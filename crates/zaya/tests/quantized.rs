//! Quantized weights and GGUF: every format loads and runs, quantized logits stay within a
//! stated distance of f32 (parity fixtures and a model whose rows fit the k-quant blocks),
//! a GGUF written by zaya reloads to identical outputs, `--quant` at load equals loading
//! the quantized file, and broken files get errors naming the tensor or key.

mod common;

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

use common::{fixture_dir, inputs, reference, temp_dir, FIXTURES};
use zaya::gguf::{quantize_to_gguf, GgufError};
use zaya::quant::{QuantPlan, WeightFormat};
use zaya::{ForwardOptions, ZayaConfig, ZayaError, ZayaModel};

fn plan(f: &str) -> QuantPlan {
    QuantPlan::uniform(f.parse().unwrap())
}

fn logits(model: &ZayaModel, ids: &[Vec<i64>]) -> Tensor {
    let ids: Vec<Vec<u32>> = ids
        .iter()
        .map(|r| r.iter().map(|&i| i as u32).collect())
        .collect();
    let t = Tensor::new(ids, &Device::Cpu).unwrap();
    model
        .forward(&t, None, &ForwardOptions::default())
        .unwrap()
        .logits
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

/// ‖a − b‖ / ‖b‖.
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a - b).unwrap().sqr().unwrap().sum_all().unwrap();
    let n = b.sqr().unwrap().sum_all().unwrap();
    (d.to_scalar::<f32>().unwrap() / n.to_scalar::<f32>().unwrap()).sqrt()
}

/// A random model (native layout, f32) whose rows fit every block size (256).
fn blocky_model(tag: &str) -> (tempfile::TempDir, PathBuf) {
    blocky_model_tied(tag, false)
}

fn blocky_model_tied(tag: &str, tied: bool) -> (tempfile::TempDir, PathBuf) {
    let cfg = ZayaConfig::from_json(&serde_json::json!({
        "vocab_size": 512, "hidden_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
        "moe_intermediate_size": 256, "num_experts": 4, "router_hidden_size": 32,
        "layer_types": ["hybrid", "hybrid_sliding"], "sliding_window": 16,
        "tie_word_embeddings": tied, "max_position_embeddings": 256
    }))
    .unwrap();
    let weights = zaya::init::random_weights(&cfg, 7).unwrap();
    let (guard, dir) = temp_dir(tag);
    zaya::weights::save_checkpoint(&dir, &cfg, &weights, zaya::weights::Layout::Native).unwrap();
    (guard, dir)
}

const PROMPT: [i64; 12] = [5, 100, 31, 7, 400, 2, 9, 256, 17, 88, 3, 60];

#[test]
fn every_format_loads_and_runs_within_its_tolerance() {
    let (_guard, dir) = blocky_model("qfmt");
    let dense = ZayaModel::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let want = logits(&dense, &[PROMPT.to_vec()]);
    let mut errs: Vec<(&str, f32, f32)> = Vec::new();
    // Relative L2 error of the logits. Random weights (std 0.02) give near-uniform logits,
    // so the relative error is large next to a trained model's (see `zaya eval`); the
    // bounds are ~1.5x the measured error (seeded, deterministic) and ordered by precision.
    for (f, tol) in [
        ("q8_0", 0.03),
        ("q6_k", 0.07),
        ("q5_k", 0.13),
        ("q5_1", 0.13),
        ("q5_0", 0.17),
        ("q4_k", 0.27),
        ("q4_0", 0.28),
        ("q4_1", 0.30),
        ("q3_k", 0.60),
        ("q2_k", 0.90),
    ] {
        let m = ZayaModel::load_quantized(&dir, DType::F32, &Device::Cpu, Some(&plan(f))).unwrap();
        assert!(
            m.weight_bytes() < dense.weight_bytes() / 3,
            "{f}: {} bytes vs dense {}",
            m.weight_bytes(),
            dense.weight_bytes()
        );
        let got = logits(&m, &[PROMPT.to_vec()]);
        let e = rel_err(&got, &want);
        eprintln!("{f}: relative logit error {e}");
        errs.push((f, e, tol));
    }
    for (f, e, tol) in errs {
        assert!(
            e.is_finite() && e <= tol,
            "{f}: relative logit error {e} > {tol}"
        );
        assert!(
            e > 0.0,
            "{f}: no quantization error at all: were the weights quantized?"
        );
    }
}

#[test]
fn quantized_fixture_logits_stay_near_the_reference() {
    // The fixtures' rows (32, 40, 48 features) fit 32-blocks at most: Q8_0 quantizes the
    // tensors whose rows are a multiple of 32 (mha_bias has none: it stays dense), the
    // rest stays dense.
    for name in FIXTURES {
        let r = reference(name);
        let want = &r["single.logits"];
        let ids = inputs(name, "single").input_ids;
        let m = ZayaModel::load_quantized(
            fixture_dir(name),
            DType::F32,
            &Device::Cpu,
            Some(&plan("q8_0")),
        )
        .unwrap();
        let got = logits(&m, &ids);
        // Relative L2 distance to the transformers f32 logits (|logit| reaches 35 here).
        let e = rel_err(&got, want);
        assert!(e <= 0.02, "{name}: q8_0 logits differ by {e} (relative)");
        assert!(
            e > 0.0 || name == "mha_bias",
            "{name}: nothing was quantized"
        );
    }
}

fn write_gguf(src: &Path, out: &Path, p: &QuantPlan) {
    quantize_to_gguf(src, out, p, None, None).unwrap();
}

#[test]
fn gguf_round_trip_is_identical_and_equals_quant_at_load() {
    let (_guard, dir) = blocky_model("qrt");
    for f in ["q8_0", "q4_k", "q6_k"] {
        let out = dir.join(format!("m-{f}.gguf"));
        write_gguf(&dir, &out, &plan(f));
        let from_file = ZayaModel::load(&out, DType::F32, &Device::Cpu).unwrap();
        let at_load =
            ZayaModel::load_quantized(&dir, DType::F32, &Device::Cpu, Some(&plan(f))).unwrap();
        let a = logits(
            &from_file,
            &[PROMPT.to_vec(), PROMPT.iter().rev().copied().collect()],
        );
        let b = logits(
            &at_load,
            &[PROMPT.to_vec(), PROMPT.iter().rev().copied().collect()],
        );
        assert_eq!(
            common::max_abs_diff(&a, &b),
            0.0,
            "{f}: GGUF vs --quant at load"
        );
        assert_eq!(from_file.weight_bytes(), at_load.weight_bytes());
        // the memory estimates (fit checks, LoRA's base) size what is held
        let held = at_load.weight_bytes() as u64;
        let cfg = at_load.config();
        assert_eq!(plan(f).loaded_bytes(cfg, DType::F32), held, "{f}");
        let g = zaya::gguf::GgufCheckpoint::open(&out).unwrap();
        assert_eq!(g.loaded_bytes(DType::F32, None), held, "{f}");
    }
    // Nothing quantized: the GGUF holds the f32 tensors and reloads bit for bit.
    for name in FIXTURES {
        let (_guard, out) = temp_dir(&format!("qrt-{name}"));
        let out = out.join("m.gguf");
        write_gguf(&fixture_dir(name), &out, &plan("keep"));
        let a = ZayaModel::load(&out, DType::F32, &Device::Cpu).unwrap();
        let b = ZayaModel::load(fixture_dir(name), DType::F32, &Device::Cpu).unwrap();
        let ids = inputs(name, "single").input_ids;
        assert_eq!(
            common::max_abs_diff(&logits(&a, &ids), &logits(&b, &ids)),
            0.0,
            "{name}"
        );
    }
}

#[test]
fn gguf_carries_the_tokenizer_and_template() {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/default");
    let (_guard, out) = temp_dir("qtok");
    let out = out.join("default-q8.gguf");
    write_gguf(&src, &out, &plan("q8_0"));
    let a = zaya::text::ZayaTokenizer::from_dir(&out).unwrap();
    let b = zaya::text::ZayaTokenizer::from_dir(&src).unwrap();
    let text = "And God said, Let there be light: and there was light.";
    assert_eq!(a.encode(text, true).unwrap(), b.encode(text, true).unwrap());
    assert_eq!(a.eos_token_ids(), b.eos_token_ids());
    let conv = zaya::text::ChatRequest::new(vec![serde_json::json!(
        {"role": "user", "content": "hi"}
    )]);
    assert_eq!(
        a.apply_chat_template(&conv).unwrap(),
        b.apply_chat_template(&conv).unwrap()
    );
    let g = zaya::gguf::GgufCheckpoint::open(&out).unwrap();
    assert!(g
        .metadata_string("tokenizer.chat_template")
        .unwrap()
        .is_some());
    assert_eq!(
        g.metadata_string("general.architecture")
            .unwrap()
            .as_deref(),
        Some("zaya")
    );
    // Norms, biases, the router and the balancing biases stay in their stored dtype.
    let ckpt = zaya::weights::Checkpoint::open(&src).unwrap();
    let cfg = ckpt.config().unwrap();
    for (name, d) in g.formats() {
        let class = zaya::quant::TensorClass::of(&name);
        if matches!(
            class,
            zaya::quant::TensorClass::Fixed | zaya::quant::TensorClass::Router
        ) {
            let want = match ckpt.stored_dtype(&cfg, &name).unwrap() {
                DType::BF16 => GgmlDType::BF16,
                DType::F16 => GgmlDType::F16,
                _ => GgmlDType::F32,
            };
            assert_eq!(d, want, "{name}");
        }
    }
}

/// Rewrites a GGUF through candle's writer after `edit` changed its metadata or tensors.
fn rewrite(
    src: &Path,
    dst: &Path,
    edit: impl FnOnce(&mut Vec<(String, Value)>, &mut Vec<(String, QTensor)>),
) {
    let mut f = std::fs::File::open(src).unwrap();
    let c = Content::read(&mut f).unwrap();
    let mut meta: Vec<(String, Value)> = c.metadata.into_iter().collect();
    let mut names: Vec<String> = c.tensor_infos.keys().cloned().collect();
    names.sort();
    let mut tensors: Vec<(String, QTensor)> = names
        .into_iter()
        .map(|n| {
            let t = c.tensor_infos[&n]
                .read(&mut f, c.tensor_data_offset, &Device::Cpu)
                .unwrap();
            (n, t)
        })
        .collect();
    edit(&mut meta, &mut tensors);
    let mut out = std::fs::File::create(dst).unwrap();
    let m: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut out, &m, &t).unwrap();
}

fn load_err(p: &Path) -> ZayaError {
    ZayaModel::load(p, DType::F32, &Device::Cpu).unwrap_err()
}

#[test]
fn broken_gguf_files_get_errors_naming_the_tensor_or_key() {
    let (_guard, dir) = temp_dir("qbad");
    let good = dir.join("good.gguf");
    write_gguf(&fixture_dir("gqa_sliding"), &good, &plan("q8_0"));
    ZayaModel::load(&good, DType::F32, &Device::Cpu).unwrap();

    // Truncated: the last tensor's data runs past the end.
    let bytes = std::fs::read(&good).unwrap();
    let cut = dir.join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    match load_err(&cut) {
        ZayaError::Gguf(GgufError::Truncated { name, .. }) => assert!(!name.is_empty()),
        e => panic!("truncated: {e}"),
    }
    // Header cut: not readable.
    let head = dir.join("head.gguf");
    std::fs::write(&head, &bytes[..64]).unwrap();
    assert!(matches!(
        load_err(&head),
        ZayaError::Gguf(GgufError::Header { .. })
    ));

    // Missing tensor.
    let missing = dir.join("missing.gguf");
    let gone = "model.layers.2.self_attn.o_proj.weight";
    rewrite(&good, &missing, |_, t| t.retain(|(n, _)| n != gone));
    match load_err(&missing) {
        ZayaError::Gguf(GgufError::MissingTensor { name, .. }) => assert_eq!(name, gone),
        e => panic!("missing: {e}"),
    }
    // Wrong shape.
    let shaped = dir.join("shape.gguf");
    let norm = "model.layers.1.input_layernorm.weight";
    rewrite(&good, &shaped, |_, t| {
        let slot = t.iter_mut().find(|(n, _)| n == norm).unwrap();
        let short = Tensor::ones(47, DType::F32, &Device::Cpu).unwrap();
        slot.1 = QTensor::quantize(&short, GgmlDType::F32).unwrap();
    });
    match load_err(&shaped) {
        ZayaError::Gguf(GgufError::ShapeMismatch { name, found, .. }) => {
            assert_eq!(name, norm);
            assert_eq!(found, vec![47]);
        }
        e => panic!("shape: {e}"),
    }
    // Unexpected tensor.
    let extra = dir.join("extra.gguf");
    rewrite(&good, &extra, |_, t| {
        let x = Tensor::ones(4, DType::F32, &Device::Cpu).unwrap();
        t.push((
            "model.extra".into(),
            QTensor::quantize(&x, GgmlDType::F32).unwrap(),
        ));
    });
    assert!(matches!(
        load_err(&extra),
        ZayaError::Gguf(GgufError::UnexpectedTensor { name, .. }) if name == "model.extra"
    ));
    // Another architecture, a config that is not JSON, no config.
    for (key, value, tag) in [
        ("general.architecture", Some("llama"), "arch"),
        ("zaya.config", Some("{not json"), "json"),
        ("zaya.config", None, "noconfig"),
    ] {
        let p = dir.join(format!("{tag}.gguf"));
        rewrite(&good, &p, |m, _| {
            m.retain(|(k, _)| k != key);
            if let Some(v) = value {
                m.push((key.to_string(), Value::String(v.to_string())));
            }
        });
        match load_err(&p) {
            ZayaError::Gguf(GgufError::Metadata { key: k, .. }) => assert_eq!(k, key, "{tag}"),
            e => panic!("{tag}: {e}"),
        }
    }
    // A convolution bias stored quantized is refused (it must stay dense).
    let qnorm = dir.join("qnorm.gguf");
    let conv = "model.layers.0.self_attn.qkv_proj.conv_qk_depthwise.bias";
    rewrite(&good, &qnorm, |_, t| {
        let slot = t.iter_mut().find(|(n, _)| n == conv).unwrap();
        let w = Tensor::ones(160, DType::F32, &Device::Cpu).unwrap();
        slot.1 = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
    });
    assert!(matches!(
        load_err(&qnorm),
        ZayaError::Gguf(GgufError::BadFormat { name, .. }) if name == conv
    ));
}

#[test]
fn plan_keeps_what_must_stay_dense() {
    let p = plan("q4_k");
    assert_eq!(
        p.format_for(
            "model.layers.0.mlp.gate.router_mlp.out_proj.weight",
            &[5, 256]
        ),
        WeightFormat::Keep
    );
    assert_eq!(
        p.format_for("model.layers.0.mlp.experts.gate_up_proj", &[4, 512, 256]),
        WeightFormat::Quant(GgmlDType::Q4K)
    );
}

/// A GGUF written from a bf16 checkpoint stores its kept tensors (norms, router, CCA
/// convolutions, …) in bf16, and a model loaded from it in f32 keeps the router's and the
/// CCA's grouped weights bf16, read in place with f32 activations: it loads to the same model
/// as `--quant` at load from the same checkpoint (bit for bit), reads fewer bytes per token
/// than the same values stored in f32, and computes what those do up to summation order
/// (logits within 1e-4, prefill and decode steps; the same greedy tokens).
#[test]
fn a_bf16_source_keeps_its_kept_tensors_bf16_read_in_place() {
    use zaya::generation::{generate_greedy, GenerateOptions};
    use zaya::quant::TensorClass;
    use zaya::weights::{convert_with_dtype, Layout};
    let (_guard, f32_dir) = blocky_model("qbf");
    let (_guard, bf16_dir) = temp_dir("qbf-bf16");
    convert_with_dtype(&f32_dir, &bf16_dir, Layout::Native, Some(DType::BF16)).unwrap();
    // the same bf16 values, stored in f32
    let (_guard, wide_dir) = temp_dir("qbf-wide");
    convert_with_dtype(&bf16_dir, &wide_dir, Layout::Native, Some(DType::F32)).unwrap();
    let prompts: Vec<Vec<u32>> = vec![
        PROMPT.iter().map(|&i| i as u32).collect(),
        PROMPT.iter().rev().map(|&i| i as u32).collect(),
    ];
    let opts = GenerateOptions {
        max_new_tokens: 6,
        ignore_eos: true,
        keep_step_logits: true,
        ..Default::default()
    };
    // (the third: the embedding, only looked up in this untied model, kept: it stays bf16
    // too, widened per looked-up row)
    let lookup_kept = QuantPlan {
        embedding: WeightFormat::Keep,
        ..plan("q4_k")
    };
    for (f, p) in [
        ("q8_0", plan("q8_0")),
        ("q4_k", plan("q4_k")),
        ("q4_k-lookup-kept", lookup_kept),
    ] {
        let out = bf16_dir.join(format!("m-{f}.gguf"));
        write_gguf(&bf16_dir, &out, &p);
        let g = zaya::gguf::GgufCheckpoint::open(&out).unwrap();
        let src = zaya::weights::Checkpoint::open(&bf16_dir).unwrap();
        let src_cfg = src.config().unwrap();
        let mut kept_bf16 = 0;
        for (name, d) in g.formats() {
            if matches!(
                TensorClass::of(&name),
                TensorClass::Fixed | TensorClass::Router
            ) {
                // (the balancing biases are f32 in a bf16 checkpoint too, as in the reference)
                let want = match src.stored_dtype(&src_cfg, &name).unwrap() {
                    DType::BF16 => GgmlDType::BF16,
                    _ => GgmlDType::F32,
                };
                assert_eq!(d, want, "{f}: {name}");
                if name.contains(".mlp.gate.down_proj.weight")
                    || name.contains(".conv_qk_grouped.weight")
                {
                    assert_eq!(d, GgmlDType::BF16, "{f}: {name}");
                    kept_bf16 += 1;
                }
            }
        }
        assert_eq!(kept_bf16, 4, "{f}");
        let from_file = ZayaModel::load(&out, DType::F32, &Device::Cpu).unwrap();
        let at_load =
            ZayaModel::load_quantized(&bf16_dir, DType::F32, &Device::Cpu, Some(&p)).unwrap();
        let wide_out = wide_dir.join(format!("m-{f}.gguf"));
        write_gguf(&wide_dir, &wide_out, &p);
        let wide = ZayaModel::load(&wide_out, DType::F32, &Device::Cpu).unwrap();

        let ids = [PROMPT.to_vec(), PROMPT.iter().rev().copied().collect()];
        let (a, b, w) = (
            logits(&from_file, &ids),
            logits(&at_load, &ids),
            logits(&wide, &ids),
        );
        assert_eq!(
            common::max_abs_diff(&a, &b),
            0.0,
            "{f}: GGUF vs --quant at load"
        );
        assert_eq!(from_file.weight_bytes(), at_load.weight_bytes());
        // Per layer: the router's four weights and the grouped conv weight, 2 bytes fewer
        // per element than in f32.
        let cfg = from_file.config();
        let (h, r, e) = (cfg.hidden_size, cfg.router_hidden_size, cfg.num_experts);
        let c = cfg.conv_channels();
        let per_layer = h * r + 2 * r * r + r * (e + 1) + c * cfg.head_dim * cfg.cca_time1;
        let lookup = if p.embedding == WeightFormat::Keep {
            cfg.vocab_size * h
        } else {
            0
        };
        assert_eq!(
            wide.weight_bytes() - from_file.weight_bytes(),
            2 * (per_layer * cfg.num_hidden_layers + lookup),
            "{f}: bytes saved"
        );
        let d = common::max_abs_diff(&a, &w);
        assert!(d < 1e-4, "{f}: prefill logits differ by {d}");

        let got = generate_greedy(&from_file, &prompts, &opts).unwrap();
        let want = generate_greedy(&wide, &prompts, &opts).unwrap();
        assert_eq!(got.sequences, want.sequences, "{f}: greedy tokens");
        for (s, (x, y)) in got.step_logits.iter().zip(&want.step_logits).enumerate() {
            let d = common::max_abs_diff(x, y);
            assert!(d < 1e-4, "{f}: step {s} logits differ by {d}");
        }
    }
}

/// A tied embedding given its own lookup format (`--embed-format keep` under q4_k_m) is
/// stored apart from its head: the file holds an untied model whose lookup is the exact
/// table and whose head is the q6_k rounding of the same weight; it looks up what the dense
/// model does bit for bit, its logits stay near f32's, quantizing at load with the same
/// plan (from the checkpoint or from a dense tied GGUF) builds the same model, an
/// importance matrix weighs the head with the tied weight's entry and the lookup with
/// nothing, and a plan whose two formats agree stores one tensor.
#[test]
fn a_tied_embedding_with_its_own_lookup_format_is_stored_apart_from_its_head() {
    let (_guard, dir) = blocky_model_tied("qsplit", true);
    let dense = ZayaModel::load(&dir, DType::F32, &Device::Cpu).unwrap();
    assert!(dense.config().tie_word_embeddings);
    let split = QuantPlan {
        embedding: WeightFormat::Keep,
        ..QuantPlan::named("q4_k_m").unwrap()
    };
    let out = dir.join("split.gguf");
    let report = quantize_to_gguf(&dir, &out, &split, None, None).unwrap();
    assert!(report.tensors.iter().any(|(n, ..)| n == "lm_head.weight"));
    let g = zaya::gguf::GgufCheckpoint::open(&out).unwrap();
    assert!(!g.config().tie_word_embeddings);
    let formats = g.formats();
    assert_eq!(formats["model.embed_tokens.weight"], GgmlDType::F32);
    assert_eq!(formats["lm_head.weight"], GgmlDType::Q6K);
    let mut f = std::fs::File::open(&out).unwrap();
    let meta = Content::read(&mut f).unwrap().metadata;
    assert!(matches!(
        meta.get("zaya.split_tied_embedding"),
        Some(Value::Bool(true))
    ));

    let model = ZayaModel::load(&out, DType::F32, &Device::Cpu).unwrap();
    let ids = Tensor::new(&[[5u32, 100, 31, 7, 400, 2]], &Device::Cpu).unwrap();
    let looked_up = (model.embed(&ids).unwrap(), dense.embed(&ids).unwrap());
    assert_eq!(common::max_abs_diff(&looked_up.0, &looked_up.1), 0.0);
    let rows = [PROMPT.to_vec()];
    let (q, want) = (logits(&model, &rows), logits(&dense, &rows));
    let err = rel_err(&q, &want);
    // (q4_k's bound in `every_format_loads_and_runs_within_its_tolerance`)
    assert!(err > 0.0 && err < 0.27, "relative logit error {err}");
    let dense_gguf = dir.join("dense.gguf");
    write_gguf(&dir, &dense_gguf, &plan("keep"));
    for source in [&dir, &dense_gguf] {
        let at_load =
            ZayaModel::load_quantized(source, DType::F32, &Device::Cpu, Some(&split)).unwrap();
        assert!(!at_load.config().tie_word_embeddings);
        assert_eq!(common::max_abs_diff(&logits(&at_load, &rows), &q), 0.0);
        assert_eq!(at_load.weight_bytes(), model.weight_bytes());
    }
    // the memory estimates size what is held: the file, the split at load from the
    // checkpoint and from the dense tied GGUF
    let held = model.weight_bytes() as u64;
    assert_eq!(g.loaded_bytes(DType::F32, None), held);
    assert_eq!(split.loaded_bytes(dense.config(), DType::F32), held);
    let dense_file = zaya::gguf::GgufCheckpoint::open(&dense_gguf).unwrap();
    assert_eq!(dense_file.loaded_bytes(DType::F32, Some(&split)), held);

    // A saved importance matrix (entries under the tied weight's name): the head takes the
    // embedding's entry, the lookup none (the same bytes as without the matrix).
    let stored = |path: &Path, name: &str| {
        let mut f = std::fs::File::open(path).unwrap();
        let c = Content::read(&mut f).unwrap();
        let t = c.tensor(&mut f, name, &Device::Cpu).unwrap();
        t.data().unwrap().to_vec()
    };
    let h = dense.config().hidden_size;
    let importance: zaya::imatrix::ImportanceMatrix = [(
        "model.embed_tokens.weight".to_string(),
        (0..h).map(|i| 1.0 + (i % 7) as f32 * 3.0).collect(),
    )]
    .into();
    let both = QuantPlan {
        embedding: WeightFormat::Quant(GgmlDType::Q4K),
        lm_head: WeightFormat::Quant(GgmlDType::Q5K),
        ..plan("q8_0")
    };
    let (weighed, plain) = (dir.join("weighed.gguf"), dir.join("plain.gguf"));
    quantize_to_gguf(&dir, &weighed, &both, Some(&importance), None).unwrap();
    write_gguf(&dir, &plain, &both);
    let emb = "model.embed_tokens.weight";
    assert_eq!(stored(&weighed, emb), stored(&plain, emb));
    assert_ne!(
        stored(&weighed, "lm_head.weight"),
        stored(&plain, "lm_head.weight")
    );

    // the mix alone: one tied tensor in q6_k, as llama.cpp's q4_k_m
    let tied = dir.join("tied.gguf");
    write_gguf(&dir, &tied, &QuantPlan::named("q4_k_m").unwrap());
    let g = zaya::gguf::GgufCheckpoint::open(&tied).unwrap();
    assert!(g.config().tie_word_embeddings);
    assert!(!g.formats().contains_key("lm_head.weight"));
    assert_eq!(g.formats()["model.embed_tokens.weight"], GgmlDType::Q6K);
    // whose lookup is rounded too: further from f32 than the exact lookup
    let tied = ZayaModel::load(&tied, DType::F32, &Device::Cpu).unwrap();
    let tied_err = rel_err(&logits(&tied, &rows), &want);
    assert!(err < tied_err, "split {err}, tied {tied_err}");
}

/// Records every input an observed model reports, by (weight, expert).
#[derive(Debug, Default)]
struct Recorder(std::sync::Mutex<Vec<(String, Option<usize>, Tensor)>>);

impl zaya::model::InputObserver for Recorder {
    fn observe(&self, name: &str, expert: Option<usize>, x: &Tensor) -> candle_core::Result<()> {
        self.0
            .lock()
            .unwrap()
            .push((name.to_string(), expert, x.copy()?));
        Ok(())
    }
}

fn observed_model(dir: &Path, observer: std::sync::Arc<Recorder>) -> ZayaModel {
    let ckpt = std::sync::Arc::new(zaya::weights::Checkpoint::open(dir).unwrap());
    let cfg = ckpt.config().unwrap();
    let w = zaya::model::Weights::from(ckpt.var_builder(&cfg, DType::F32, &Device::Cpu))
        .observed_by(observer);
    ZayaModel::from_weights(&cfg, w).unwrap()
}

/// The observer sees the input of every product with a stored weight — the LM head's is
/// the final hidden state, each expert's the rows the router sent it — and the forward
/// computes exactly what it computes unobserved.
#[test]
fn an_observed_model_computes_the_same_and_reports_every_product_input() {
    let (_guard, dir) = blocky_model("qobs");
    let plain = ZayaModel::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let rec = std::sync::Arc::new(Recorder::default());
    let observed = observed_model(&dir, rec.clone());
    let ids: Vec<u32> = PROMPT.iter().map(|&i| i as u32).collect();
    let input = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let want = plain
        .forward(&input, None, &ForwardOptions::default())
        .unwrap();
    let got = observed
        .forward(&input, None, &ForwardOptions::default())
        .unwrap();
    assert_eq!(
        common::max_abs_diff(got.logits.as_ref().unwrap(), want.logits.as_ref().unwrap()),
        0.0
    );
    let seen = rec.0.lock().unwrap();
    let find = |name: &str, expert: Option<usize>| -> Option<Tensor> {
        seen.iter()
            .find(|(n, e, _)| n == name && *e == expert)
            .map(|(_, _, t)| t.clone())
    };
    let last = want.last_hidden.reshape((PROMPT.len(), 256)).unwrap();
    assert_eq!(
        common::max_abs_diff(&find("lm_head.weight", None).unwrap(), &last),
        0.0
    );
    let cfg = plain.config().clone();
    let quantizable = QuantPlan::uniform(WeightFormat::Quant(GgmlDType::Q8_0));
    for spec in zaya::weights::native_specs(&cfg) {
        let is_product = matches!(
            quantizable.format_for(&spec.name, &spec.shape),
            WeightFormat::Quant(_)
        ) && spec.name != "model.embed_tokens.weight";
        if is_product && spec.shape.len() == 2 {
            let x = find(&spec.name, None).unwrap_or_else(|| panic!("{} not observed", spec.name));
            assert_eq!(x.dims(), &[PROMPT.len(), spec.shape[1]], "{}", spec.name);
        }
    }
    // Each expert saw exactly the MoE input rows routed to it (the router's first
    // product reads the same MoE input, every token).
    let mut experts_seen = 0;
    for (layer, routing) in want.routing.iter().enumerate() {
        let moe_in = find(
            &format!("model.layers.{layer}.mlp.gate.down_proj.weight"),
            None,
        )
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
        for e in 0..cfg.num_experts {
            let rows: Vec<Vec<f32>> = routing
                .choice
                .iter()
                .enumerate()
                .filter(|(_, &c)| c as usize == e)
                .map(|(t, _)| moe_in[t].clone())
                .collect();
            let gate_up = find(
                &format!("model.layers.{layer}.mlp.experts.gate_up_proj"),
                Some(e),
            );
            let down = find(
                &format!("model.layers.{layer}.mlp.experts.down_proj"),
                Some(e),
            );
            match gate_up {
                None => assert!(
                    rows.is_empty() && down.is_none(),
                    "layer {layer} expert {e}"
                ),
                Some(x) => {
                    experts_seen += 1;
                    assert_eq!(
                        x.to_vec2::<f32>().unwrap(),
                        rows,
                        "layer {layer} expert {e}"
                    );
                    let down = down.unwrap();
                    assert_eq!(down.dims(), &[rows.len(), cfg.moe_intermediate_size]);
                }
            }
        }
    }
    assert!(
        experts_seen >= 2,
        "the prompt reached {experts_seen} experts"
    );
}

/// `zaya quantize --imatrix`: the importance matrix of a text is each product input's mean
/// square, and a GGUF quantized with it loads and runs within the format's tolerance, with
/// other bytes than without it.
#[test]
fn an_importance_matrix_from_text_weighs_the_quantization() {
    let (_guard, dir) = blocky_model("qimx");
    let ids: Vec<u32> = (0..40u32).map(|i| (i * 37 + 11) % 512).collect();
    let calibration = zaya::imatrix::Calibration {
        context: 16,
        max_tokens: 0,
        bos: Some(2),
    };
    let (m, seen) = zaya::imatrix::importance_matrix(&dir, &ids, calibration).unwrap();
    assert_eq!(seen, ids.len());
    // the same windows through a recording model
    let rec = std::sync::Arc::new(Recorder::default());
    let observed = observed_model(&dir, rec.clone());
    for chunk in ids.chunks(15) {
        let w: Vec<u32> = std::iter::once(2).chain(chunk.iter().copied()).collect();
        let input = Tensor::new(w.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        observed
            .forward(&input, None, &ForwardOptions::default())
            .unwrap();
    }
    let seen = rec.0.lock().unwrap();
    let mean_square = |name: &str| -> Vec<f32> {
        let xs: Vec<Tensor> = seen
            .iter()
            .filter(|(n, _, _)| n == name)
            .map(|(_, _, t)| t.clone())
            .collect();
        let x = Tensor::cat(&xs, 0).unwrap();
        x.sqr().unwrap().mean(0).unwrap().to_vec1().unwrap()
    };
    for name in [
        "lm_head.weight",
        "model.layers.1.self_attn.o_proj.weight",
        "model.layers.0.mlp.gate.down_proj.weight",
    ] {
        let (got, want) = (&m[name], mean_square(name));
        assert_eq!(got.len(), want.len(), "{name}");
        for (g, w) in got.iter().zip(&want) {
            assert!(
                (g - w).abs() <= 1e-5 * w.abs().max(1e-6),
                "{name}: {g} vs {w}"
            );
        }
    }
    let experts = &m["model.layers.0.mlp.experts.down_proj"];
    assert_eq!(experts.len(), 4 * 256);
    assert!(experts.iter().all(|v| v.is_finite() && *v > 0.0));

    let (with, without) = (dir.join("im.gguf"), dir.join("plain.gguf"));
    let dense = ZayaModel::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let want = logits(&dense, &[PROMPT.to_vec()]);
    for f in ["q4_k", "q4_0"] {
        quantize_to_gguf(&dir, &with, &plan(f), Some(&m), None).unwrap();
        write_gguf(&dir, &without, &plan(f));
        assert_ne!(
            std::fs::read(&with).unwrap(),
            std::fs::read(&without).unwrap(),
            "{f}: the importance matrix changed nothing"
        );
        let got = logits(
            &ZayaModel::load(&with, DType::F32, &Device::Cpu).unwrap(),
            &[PROMPT.to_vec()],
        );
        let e = rel_err(&got, &want);
        // the bounds of `every_format_loads_and_runs_within_its_tolerance`
        assert!(e > 0.0 && e <= 0.28, "{f} with an importance matrix: {e}");
    }
    // an importance matrix of the wrong width is an error naming the tensor
    let mut bad = m.clone();
    bad.insert("lm_head.weight".into(), vec![1.0; 7]);
    let err = quantize_to_gguf(&dir, &with, &plan("q4_k"), Some(&bad), None).unwrap_err();
    assert!(err.to_string().contains("lm_head.weight"), "{err}");
}

/// The calibration pass one layer at a time (what per-layer GPTQ moments run on) hands
/// every observed product the very rows the whole forwards do — in any layer order (a
/// layer before the windows' position runs them again from the embedding), the LM head's
/// input after the last layer — and refuses a layer the model does not have.
#[test]
fn layer_by_layer_calibration_observes_what_whole_forwards_do() {
    use std::sync::Arc;
    use zaya::gptq::{HessianCollector, Hessians};
    use zaya::model::InputObserver;
    let (_guard, dir) = blocky_model("qlayerwise");
    let ids: Vec<u32> = (0..70u32).map(|i| (i * 37 + 11) % 512).collect();
    let calibration = zaya::imatrix::Calibration {
        context: 16,
        max_tokens: 55, // windows of 15 text tokens, the last of 10
        bos: Some(2),
    };
    let whole = Arc::new(HessianCollector::new(|_| true));
    let seen = zaya::imatrix::calibrate(
        &dir,
        &ids,
        calibration,
        whole.clone() as Arc<dyn InputObserver>,
        0,
    )
    .unwrap();
    assert_eq!(seen, 55);
    let whole = Arc::try_unwrap(whole).unwrap().finish();

    let layers = 2; // blocky_model's
    let mut stream = zaya::imatrix::LayerwiseCalibration::open(&dir, &ids, calibration, 0).unwrap();
    assert_eq!(stream.tokens(), 55);
    let mut got = Hessians::new();
    let mut run = |stream: &mut zaya::imatrix::LayerwiseCalibration, layer: Option<usize>| {
        let c = Arc::new(HessianCollector::new(|_| true));
        let o = c.clone() as Arc<dyn InputObserver>;
        match layer {
            Some(l) => stream.layer(l, o).unwrap(),
            None => stream.head(o).unwrap(),
        }
        let sums = Arc::try_unwrap(c).unwrap().finish();
        for name in sums.keys() {
            let prefix = match layer {
                Some(l) => format!("model.layers.{l}."),
                None => "lm_head.".to_string(),
            };
            assert!(
                name.starts_with(&prefix),
                "{name} observed in run {layer:?}"
            );
        }
        got.extend(sums);
    };
    // the last layer first, then the others from the embedding again, the head last
    run(&mut stream, Some(layers - 1));
    for l in 0..layers - 1 {
        run(&mut stream, Some(l));
    }
    run(&mut stream, None);
    assert_eq!(
        whole.keys().collect::<Vec<_>>(),
        got.keys().collect::<Vec<_>>()
    );
    for (name, want) in &whole {
        assert_eq!(want, &got[name], "{name}");
    }
    let err = stream
        .layer(layers, Arc::new(HessianCollector::new(|_| true)))
        .unwrap_err()
        .to_string();
    assert!(err.contains(&format!("layer {layers}")), "{err}");
}
