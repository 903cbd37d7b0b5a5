//! Streaming checkpoint writing (`zaya init`, `zaya convert`) into sharded safetensors, and
//! loading them: the values equal the in-memory paths, bf16 stays bf16 once loaded, and a
//! truncated shard is a clear error naming the tensor.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{fixture_dir, max_abs_diff, temp_dir};
use zaya::weights::{self, native_specs, Checkpoint, Layout};
use zaya::{ForwardOptions, ZayaConfig, ZayaError, ZayaModel};

fn cfg() -> ZayaConfig {
    ZayaConfig::from_file(fixture_dir("mha_bias").join("config.json")).unwrap()
}

fn shards(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            let n = e.as_ref().unwrap().file_name().into_string().unwrap();
            n.starts_with("model-") && n.ends_with(".safetensors")
        })
        .count()
}

#[test]
fn streamed_init_equals_the_in_memory_init_across_shards() {
    let cfg = cfg();
    let (_guard, dir) = temp_dir("stream-init");
    // small shards: the tiny model spreads over several files and an index
    zaya::init::write_random_checkpoint(&dir, &cfg, 7, DType::BF16, 20_000).unwrap();
    assert!(shards(&dir) > 2, "expected several shards");
    assert!(dir.join("model.safetensors.index.json").exists());
    let ckpt = Checkpoint::open(&dir).unwrap();
    assert_eq!(ckpt.config().unwrap(), cfg);
    ckpt.validate(&cfg).unwrap();
    let want = zaya::init::cast_weights(&zaya::init::random_weights(&cfg, 7).unwrap(), DType::BF16)
        .unwrap();
    for spec in native_specs(&cfg) {
        let w = &want[&spec.name];
        let got = ckpt
            .load(&cfg, &spec.name, w.dtype(), &Device::Cpu)
            .unwrap();
        assert_eq!(got.dtype(), w.dtype(), "{}", spec.name);
        assert_eq!(max_abs_diff(&got, w), 0.0, "{}", spec.name);
    }
    // the balancing biases stay f32
    assert_eq!(ckpt.dtypes().get("f32"), Some(&cfg.num_hidden_layers));
}

#[test]
fn bf16_loads_without_an_f32_copy_and_runs_like_the_in_memory_model() {
    let cfg = cfg();
    let (_guard, dir) = temp_dir("stream-bf16");
    zaya::init::write_random_checkpoint(&dir, &cfg, 3, DType::BF16, 50_000).unwrap();
    let model = ZayaModel::load(&dir, DType::BF16, &Device::Cpu).unwrap();
    assert_eq!(model.lm_head_weight().unwrap().dtype(), DType::BF16);
    // the same weights saved in one file the old way
    let (_guard, single) = temp_dir("stream-bf16-single");
    let t = zaya::init::cast_weights(&zaya::init::random_weights(&cfg, 3).unwrap(), DType::BF16)
        .unwrap();
    weights::save_checkpoint(&single, &cfg, &t, Layout::Native).unwrap();
    let other = ZayaModel::load(&single, DType::BF16, &Device::Cpu).unwrap();
    let ids = Tensor::new(&[[5u32, 9, 2, 7]], &Device::Cpu).unwrap();
    let opts = ForwardOptions::default();
    let a = model.forward(&ids, None, &opts).unwrap().logits.unwrap();
    let b = other.forward(&ids, None, &opts).unwrap().logits.unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    // bytes a decode step reads: bf16 weights are 2 bytes each
    let f32_model = ZayaModel::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let (b16, b32) = (model.bytes_per_token(), f32_model.bytes_per_token());
    assert!(b16 < b32 && b32 < 2 * b16 + 1000, "{b16} vs {b32}");
}

#[test]
fn streamed_convert_round_trips_through_the_legacy_layout_in_shards() {
    let cfg = cfg();
    let (_guard, src) = temp_dir("conv-src");
    zaya::init::write_random_checkpoint(&src, &cfg, 5, DType::F32, u64::MAX).unwrap();
    assert!(src.join("model.safetensors").exists());
    let (_guard, legacy) = temp_dir("conv-legacy");
    weights::convert_sharded(&src, &legacy, Layout::Legacy, Some(DType::BF16), 30_000).unwrap();
    assert!(shards(&legacy) > 1);
    let lc = Checkpoint::open(&legacy).unwrap();
    assert_eq!(lc.layout(), Layout::Legacy);
    let (_guard, back) = temp_dir("conv-back");
    weights::convert_sharded(&legacy, &back, Layout::Native, None, u64::MAX).unwrap();
    let a = Checkpoint::open(&src).unwrap();
    let b = Checkpoint::open(&back).unwrap();
    for spec in native_specs(&cfg) {
        let x = a.load(&cfg, &spec.name, DType::F32, &Device::Cpu).unwrap();
        let want = x
            .to_dtype(zaya::init::stored_dtype(&spec.name, DType::BF16))
            .unwrap();
        let got = b
            .load(&cfg, &spec.name, want.dtype(), &Device::Cpu)
            .unwrap();
        assert_eq!(got.dtype(), want.dtype(), "{}", spec.name);
        assert_eq!(max_abs_diff(&got, &want), 0.0, "{}", spec.name);
    }
}

#[test]
fn a_truncated_shard_names_the_tensor_and_the_file() {
    let cfg = cfg();
    let (_guard, dir) = temp_dir("truncated");
    zaya::init::write_random_checkpoint(&dir, &cfg, 1, DType::BF16, 50_000).unwrap();
    let last = {
        let mut v: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        v.sort();
        v.pop().unwrap()
    };
    let len = std::fs::metadata(&last).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&last).unwrap();
    f.set_len(len - 10).unwrap();
    let err = ZayaModel::load(&dir, DType::BF16, &Device::Cpu).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ZayaError::BadWeightsFile { .. }), "{msg}");
    assert!(
        msg.contains("truncated")
            && msg.contains("tensor `")
            && msg.contains(&*last.to_string_lossy()),
        "{msg}"
    );
}

/// The streamed single-file writers are byte-identical to the in-memory ones for the same
/// tensors: `save_checkpoint_streamed` to `save_checkpoint` (native), `save_state_streamed`
/// to `AdamW::save_state` (f32 moments and i64 step counts, whose dtypes the file orders
/// before the f32 data), with the data fed a tensor at a time.
#[test]
fn streamed_single_file_writers_equal_the_in_memory_writers_byte_for_byte() {
    use std::collections::{BTreeMap, HashMap};
    use zaya::safetensors_io::{file_order, tensor_bytes, PlannedTensor};
    use zaya::train::optim::AdamW;

    let cfg = cfg();
    let (_guard, dir) = temp_dir("stream-single");
    let weights = zaya::init::random_weights(&cfg, 7).unwrap();
    let planned = |m: &mut dyn Iterator<Item = (&String, &Tensor)>| -> Vec<PlannedTensor> {
        m.map(|(n, t)| PlannedTensor {
            name: n.clone(),
            dtype: t.dtype(),
            shape: t.dims().to_vec(),
        })
        .collect()
    };
    weights::save_checkpoint(&dir.join("mem"), &cfg, &weights, Layout::Native).unwrap();
    let mut order = vec![];
    weights::save_checkpoint_streamed(
        &dir.join("streamed"),
        &cfg,
        &planned(&mut weights.iter()),
        |t, sink| {
            order.push(t.name.clone());
            sink.write_bytes(&tensor_bytes(&weights[&t.name])?)
        },
    )
    .unwrap();
    // one tensor at a time, in name order (all f32)
    assert_eq!(order, weights.keys().cloned().collect::<Vec<_>>());
    for f in ["config.json", "model.safetensors"] {
        let a = std::fs::read(dir.join("mem").join(f)).unwrap();
        let b = std::fs::read(dir.join("streamed").join(f)).unwrap();
        assert!(a == b, "{f} differs ({} vs {} bytes)", a.len(), b.len());
    }
    assert!(!dir.join("streamed/.model.safetensors.tmp").exists());

    let dev = Device::Cpu;
    let mut state: HashMap<String, Tensor> = HashMap::new();
    for (i, (n, t)) in weights.iter().take(5).enumerate() {
        state.insert(format!("exp_avg.{n}"), (t * 0.5).unwrap());
        state.insert(format!("exp_avg_sq.{n}"), t.sqr().unwrap());
        state.insert(
            format!("step.{n}"),
            Tensor::new(&[3i64 + i as i64], &dev).unwrap(),
        );
    }
    let sorted: BTreeMap<&String, &Tensor> = state.iter().collect();
    let plan = planned(&mut sorted.into_iter());
    let ordered = file_order(&plan).unwrap();
    // the i64 step counts lead the file
    assert!(ordered[..5].iter().all(|t| t.name.starts_with("step.")));
    AdamW::save_state(&state, &dir.join("mem/optimizer.safetensors")).unwrap();
    AdamW::save_state_streamed(
        &dir.join("streamed/optimizer.safetensors"),
        &plan,
        |t, sink| {
            if t.dtype == DType::I64 {
                sink.write_i64(&state[&t.name].to_vec1::<i64>()?)
            } else {
                sink.write_f32_as(&state[&t.name].flatten_all()?.to_vec1::<f32>()?, DType::F32)
            }
        },
    )
    .unwrap();
    let a = std::fs::read(dir.join("mem/optimizer.safetensors")).unwrap();
    let b = std::fs::read(dir.join("streamed/optimizer.safetensors")).unwrap();
    assert!(a == b, "optimizer.safetensors differs");

    // a fill that writes too little is an error naming the tensor; the old file stays
    let err = AdamW::save_state_streamed(
        &dir.join("streamed/optimizer.safetensors"),
        &plan,
        |_, sink| sink.write_bytes(&[0u8; 4]),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("step."), "{err}");
    let c = std::fs::read(dir.join("streamed/optimizer.safetensors")).unwrap();
    assert!(c == a);
}
