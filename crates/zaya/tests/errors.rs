//! Bad configs, bad weight files and bad inputs give typed errors that name what and where.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::*;
use zaya::weights::{self, Layout};
use zaya::{ForwardOptions, HybridCache, ZayaConfig, ZayaError, ZayaModel};

/// A scratch copy of a fixture (see `temp_dir` for the guard).
fn copy_fixture(name: &str, tag: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let (guard, dir) = temp_dir(tag);
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture_dir(name).join(f), dir.join(f)).unwrap();
    }
    (guard, dir)
}

fn rewrite_weights(dir: &Path, edit: impl FnOnce(&mut BTreeMap<String, Tensor>)) {
    let path = dir.join("model.safetensors");
    let mut t: BTreeMap<String, Tensor> = candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect();
    edit(&mut t);
    candle_core::safetensors::save(&t.into_iter().collect(), &path).unwrap();
}

fn load_err(dir: &Path) -> ZayaError {
    ZayaModel::load(dir, DType::F32, &Device::Cpu).expect_err("loading must fail")
}

#[test]
fn missing_tensor_is_named() {
    let (_guard, dir) = copy_fixture("gqa_sliding", "missing");
    rewrite_weights(&dir, |t| {
        t.remove("model.layers.3.mlp.gate.router_states_scale");
    });
    match load_err(&dir) {
        ZayaError::MissingTensor { name, expected, .. } => {
            assert_eq!(name, "model.layers.3.mlp.gate.router_states_scale");
            assert_eq!(expected, vec![12]);
        }
        e => panic!("unexpected error {e}"),
    }
}

#[test]
fn unexpected_tensor_is_named_with_its_file() {
    let (_guard, dir) = copy_fixture("gqa_sliding", "unexpected");
    rewrite_weights(&dir, |t| {
        t.insert(
            "model.layers.0.mlp.gate.router_states_scale".into(),
            Tensor::ones(12, DType::F32, &Device::Cpu).unwrap(),
        );
    });
    match load_err(&dir) {
        ZayaError::UnexpectedTensor { name, file, .. } => {
            assert_eq!(name, "model.layers.0.mlp.gate.router_states_scale");
            assert!(file.ends_with("model.safetensors"));
        }
        e => panic!("unexpected error {e}"),
    }
}

#[test]
fn wrong_shape_names_tensor_shapes_and_file() {
    let (_guard, dir) = copy_fixture("gqa_sliding", "shape");
    rewrite_weights(&dir, |t| {
        t.insert(
            "model.layers.2.self_attn.qkv_proj.k_proj.weight".into(),
            Tensor::zeros((16, 48), DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let e = load_err(&dir);
    let msg = e.to_string();
    match e {
        ZayaError::ShapeMismatch {
            name,
            expected,
            found,
            file,
        } => {
            assert_eq!(name, "model.layers.2.self_attn.qkv_proj.k_proj.weight");
            assert_eq!(expected, vec![32, 48]);
            assert_eq!(found, vec![16, 48]);
            assert!(file.ends_with("model.safetensors"));
            assert!(
                msg.contains("[16, 48]") && msg.contains("[32, 48]"),
                "{msg}"
            );
        }
        e => panic!("unexpected error {e}"),
    }
}

#[test]
fn truncated_file_is_reported_with_its_path() {
    let (_guard, dir) = copy_fixture("mha_bias", "truncated");
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    match load_err(&dir) {
        ZayaError::BadWeightsFile { path: p, .. } => assert_eq!(p, path),
        e => panic!("unexpected error {e}"),
    }
    std::fs::write(&path, b"garbage").unwrap();
    assert!(matches!(load_err(&dir), ZayaError::BadWeightsFile { .. }));
}

#[test]
fn missing_weights_and_bad_config_are_reported() {
    let (_guard, dir) = temp_dir("empty");
    std::fs::copy(
        fixture_dir("gqa_sliding").join("config.json"),
        dir.join("config.json"),
    )
    .unwrap();
    assert!(matches!(load_err(&dir), ZayaError::NoWeights { .. }));

    let (_guard, dir) = copy_fixture("gqa_sliding", "badcfg");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    cfg["num_experts_per_tok"] = 2.into();
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    match load_err(&dir) {
        ZayaError::Config { field, .. } => {
            assert!(field.ends_with("(num_experts_per_tok)"), "{field}")
        }
        e => panic!("unexpected error {e}"),
    }
    std::fs::write(dir.join("config.json"), "{ not json").unwrap();
    assert!(matches!(load_err(&dir), ZayaError::Json { .. }));
}

#[test]
fn sharded_checkpoints_load_and_a_missing_shard_is_reported() {
    let src = fixture_dir("gqa_sliding");
    let (_guard, dir) = temp_dir("sharded");
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let all = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut shards: [std::collections::HashMap<String, Tensor>; 2] = Default::default();
    let mut map = serde_json::Map::new();
    for (i, (k, v)) in all.into_iter().enumerate() {
        let s = i % 2;
        map.insert(
            k.clone(),
            format!("model-0000{}-of-00002.safetensors", s + 1).into(),
        );
        shards[s].insert(k, v);
    }
    for (s, shard) in shards.iter().enumerate() {
        candle_core::safetensors::save(
            shard,
            dir.join(format!("model-0000{}-of-00002.safetensors", s + 1)),
        )
        .unwrap();
    }
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::json!({"weight_map": map}).to_string(),
    )
    .unwrap();
    let sharded = ZayaModel::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let single = ZayaModel::load(&src, DType::F32, &Device::Cpu).unwrap();
    let ids = Tensor::new(&[[5u32, 6, 7]], &Device::Cpu).unwrap();
    let a = sharded
        .forward(&ids, None, &ForwardOptions::default())
        .unwrap()
        .logits
        .unwrap();
    let b = single
        .forward(&ids, None, &ForwardOptions::default())
        .unwrap()
        .logits
        .unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    match load_err(&dir) {
        ZayaError::Io { path, .. } => assert!(path.ends_with("model-00002-of-00002.safetensors")),
        e => panic!("unexpected error {e}"),
    }
}

#[test]
fn bad_inputs_are_rejected_with_position() {
    let model = ZayaModel::load(fixture_dir("gqa_sliding"), DType::F32, &Device::Cpu).unwrap();
    let ids = Tensor::new(&[[5i64, 6, 7], [8, 96, 1]], &Device::Cpu).unwrap();
    match model.forward(&ids, None, &ForwardOptions::default()) {
        Err(ZayaError::TokenOutOfRange {
            id,
            row,
            position,
            vocab_size,
        }) => {
            assert_eq!((id, row, position, vocab_size), (96, 1, 1, 96));
        }
        other => panic!("expected TokenOutOfRange, got {other:?}"),
    }
    let ids = Tensor::new(&[[5i64, -1]], &Device::Cpu).unwrap();
    assert!(matches!(
        model.forward(&ids, None, &ForwardOptions::default()),
        Err(ZayaError::TokenOutOfRange { id: -1, .. })
    ));

    // past the context length (512), also when continuing from a cache
    let long = Tensor::zeros((1, 513), DType::U32, &Device::Cpu).unwrap();
    assert!(matches!(
        model.forward(&long, None, &ForwardOptions::default()),
        Err(ZayaError::ContextTooLong {
            length: 513,
            limit: 512,
            ..
        })
    ));
    let mut cache = HybridCache::new(model.config());
    let first = Tensor::zeros((1, 510), DType::U32, &Device::Cpu).unwrap();
    model
        .forward(&first, Some(&mut cache), &ForwardOptions::default())
        .unwrap();
    let more = Tensor::zeros((1, 3), DType::U32, &Device::Cpu).unwrap();
    assert!(matches!(
        model.forward(&more, Some(&mut cache), &ForwardOptions::default()),
        Err(ZayaError::ContextTooLong { .. })
    ));

    // a mask of the wrong shape
    let ids = Tensor::new(&[[5u32, 6, 7]], &Device::Cpu).unwrap();
    let opts = ForwardOptions {
        attention_mask: Some(Tensor::new(&[[1u32, 1]], &Device::Cpu).unwrap()),
        ..Default::default()
    };
    assert!(matches!(
        model.forward(&ids, None, &opts),
        Err(ZayaError::Input(_))
    ));
}

#[test]
fn init_writes_a_loadable_model_with_the_reference_init() {
    let cfg = ZayaConfig::from_file(fixture_dir("mha_bias").join("config.json")).unwrap();
    let (_guard, dir) = temp_dir("init");
    let t = zaya::init::random_weights(&cfg, 7).unwrap();
    weights::save_checkpoint(&dir, &cfg, &t, Layout::Native).unwrap();
    let model = ZayaModel::load(&dir, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(model.config(), &cfg);
    let temp = t["model.layers.1.self_attn.qk_norm.temp"]
        .to_vec1::<f32>()
        .unwrap();
    assert!(temp.iter().all(|&x| x == 0.0));
    let bb = t["model.layers.0.mlp.gate.balancing_biases"]
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(bb, vec![0.0, 0.0, 0.0, -1.0]);
    let emb = t["model.embed_tokens.weight"].to_vec2::<f32>().unwrap();
    assert!(emb[0].iter().all(|&x| x == 0.0), "padding row must be zero");
    let w = t["model.layers.0.mlp.experts.gate_up_proj"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let mean = w.iter().sum::<f32>() / w.len() as f32;
    let std = (w.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / w.len() as f32).sqrt();
    assert!((std - 0.02).abs() < 0.002, "std {std}");
    // same seed, same weights
    let again = zaya::init::random_weights(&cfg, 7).unwrap();
    assert_eq!(
        max_abs_diff(&again["lm_head.weight"], &t["lm_head.weight"]),
        0.0
    );
}
