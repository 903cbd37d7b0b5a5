//! Shared helpers for the fixture-based tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

pub const FIXTURES: [&str; 3] = ["gqa_sliding", "mha_bias", "conv_k3"];

pub fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

pub fn reference(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixture_dir(name).join("reference.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

#[derive(serde::Deserialize)]
pub struct Inputs {
    pub input_ids: Vec<Vec<i64>>,
    pub attention_mask: Option<Vec<Vec<i64>>>,
    pub labels: Option<Vec<Vec<i64>>>,
}

pub fn inputs(name: &str, which: &str) -> Inputs {
    let text = std::fs::read_to_string(fixture_dir(name).join(format!("{which}.json"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    (a - b)
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

#[track_caller]
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, atol: f32) {
    let d = max_abs_diff(got, want);
    assert!(d <= atol, "{what}: max abs diff {d} > {atol}");
}

/// A fresh scratch directory, removed with everything in it when the guard drops: keep the guard
/// bound (`let (_guard, dir) = temp_dir("x")`) for as long as the test uses the path.
pub fn temp_dir(tag: &str) -> (tempfile::TempDir, PathBuf) {
    let guard = tempfile::Builder::new()
        .prefix(&format!("zaya-test-{tag}-"))
        .tempdir()
        .unwrap();
    let path = guard.path().to_path_buf();
    (guard, path)
}

/// New tokens of a reference generation, cut after the first EOS (the reference pads after it).
pub fn reference_sequences(t: &Tensor, eos: &[u32]) -> Vec<Vec<u32>> {
    t.to_dtype(DType::I64)
        .unwrap()
        .to_vec2::<i64>()
        .unwrap()
        .into_iter()
        .map(|row| {
            let mut out = Vec::new();
            for x in row {
                out.push(x as u32);
                if eos.contains(&(x as u32)) {
                    break;
                }
            }
            out
        })
        .collect()
}

/// A labelled fixture batch (`train.json`, `train_pad.json`) for the trainer.
pub fn batch(name: &str, which: &str) -> zaya::train::Batch {
    let inp = inputs(name, which);
    let to_u32 = |rows: Vec<Vec<i64>>| -> Vec<Vec<u32>> {
        rows.into_iter()
            .map(|r| r.into_iter().map(|x| x as u32).collect())
            .collect()
    };
    zaya::train::Batch {
        labels: inp.labels.expect("labelled batch"),
        input_ids: to_u32(inp.input_ids),
        attention_mask: inp.attention_mask.map(to_u32),
        document_ids: None,
    }
}
