//! End to end on a tiny random model: the fused kernels and the sdpa/flex attention
//! backends give the same logits and the same parameter gradients as the reference kernels
//! with eager attention (left padding, a sliding layer, prefill + cached decode).

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use zaya::attention::AttnImplementation;
use zaya::kernels::registry::{self, Choice};
use zaya::{ForwardOptions, HybridCache, ZayaConfig, ZayaModel};

fn tiny_model(seed: u64) -> Result<(ZayaModel, VarMap)> {
    let cfg = ZayaConfig::from_json(&serde_json::json!({
        "model_type": "zaya", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 8,
        "moe_intermediate_size": 16, "num_experts": 4, "router_hidden_size": 8,
        "layer_types": ["hybrid", "hybrid_sliding"], "sliding_window": 5,
        "rope_parameters": {"rope_type": "default",
            "hybrid": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
            "hybrid_sliding": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}}
    }))?;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let model = ZayaModel::new(&cfg, vb)?;
    // The var builder initialises to zeros; give every parameter seeded random values.
    let mut rng = StdRng::seed_from_u64(seed);
    let data = varmap.data().lock().expect("varmap lock");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let var = &data[name];
        let n = var.elem_count();
        let v: Vec<f32> = (0..n).map(|_| rng.random::<f32>() - 0.5).collect();
        var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu)?)?;
    }
    drop(data);
    Ok((model, varmap))
}

fn max_rel_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    let a: Vec<f32> = a.flatten_all()?.to_vec1()?;
    let b: Vec<f32> = b.flatten_all()?.to_vec1()?;
    let scale = b.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
    Ok(a.iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
        / scale)
}

/// Logits, per-layer routing choices, and (name, gradient) of every parameter.
type RunOutput = (Tensor, Vec<Vec<u32>>, Vec<(String, Tensor)>);

/// Logits, routing choices and gradients of every parameter under `choice` and `attn`.
/// Two rows of 9 tokens, or (`long`) of 24: 48 rows, so that the dense layers' products
/// take the many-row kernel (above `GEMV_ROWS` = 32 rows) rather than the GEMV.
fn inputs(long: bool) -> Result<(Tensor, Tensor)> {
    if !long {
        let ids = Tensor::new(
            &[
                [5u32, 9, 33, 2, 7, 61, 14, 40, 3],
                [1, 1, 1, 8, 22, 19, 50, 6, 11],
            ],
            &Device::Cpu,
        )?;
        let mask = Tensor::new(&[[1u32; 9], [0, 0, 0, 1, 1, 1, 1, 1, 1]], &Device::Cpu)?;
        return Ok((ids, mask));
    }
    let t = 24;
    let ids: Vec<u32> = (0..2 * t as u32).map(|i| (i * 37 + 11) % 61 + 2).collect();
    let mask: Vec<u32> = (0..2 * t).map(|i| u32::from(i < t || i >= t + 3)).collect();
    Ok((
        Tensor::from_vec(ids, (2, t), &Device::Cpu)?,
        Tensor::from_vec(mask, (2, t), &Device::Cpu)?,
    ))
}

fn run(
    model: &ZayaModel,
    varmap: &VarMap,
    choice: Choice,
    attn: AttnImplementation,
    long: bool,
) -> Result<RunOutput> {
    registry::with_choice(None, choice, || -> Result<_> {
        let (ids, mask) = inputs(long)?;
        let opts = ForwardOptions {
            attention_mask: Some(mask),
            attn,
            ..Default::default()
        };
        let out = model.forward(&ids, None, &opts)?;
        let logits = out.logits.expect("logits");
        // A fixed probe (not random per run) so both runs differentiate the same loss.
        let n = logits.elem_count();
        let probe: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 13) as f32 / 13.0 - 0.5)
            .collect();
        let probe = Tensor::from_vec(probe, logits.shape(), &Device::Cpu)?;
        let grads = logits.mul(&probe)?.sum_all()?.backward()?;
        let data = varmap.data().lock().expect("varmap lock");
        let mut g: Vec<(String, Tensor)> = data
            .iter()
            .filter_map(|(name, var)| {
                grads
                    .get(var.as_tensor())
                    .map(|t| (name.clone(), t.clone()))
            })
            .collect();
        g.sort_by(|a, b| a.0.cmp(&b.0));
        Ok((
            logits.detach(),
            out.routing.iter().map(|r| r.choice.clone()).collect(),
            g,
        ))
    })?
}

#[test]
fn fused_kernels_and_backends_match_the_reference_model() -> Result<()> {
    let (model, varmap) = tiny_model(3)?;
    for long in [false, true] {
        check_against_the_reference(&model, &varmap, long)?;
    }
    Ok(())
}

fn check_against_the_reference(model: &ZayaModel, varmap: &VarMap, long: bool) -> Result<()> {
    let (want, want_routes, want_grads) = run(
        model,
        varmap,
        Choice::Reference,
        AttnImplementation::Eager,
        long,
    )?;
    assert!(!want_grads.is_empty());
    for attn in [
        AttnImplementation::Eager,
        AttnImplementation::Sdpa,
        AttnImplementation::Flex,
    ] {
        let (got, routes, grads) = run(model, varmap, Choice::Auto, attn, long)?;
        assert_eq!(
            routes, want_routes,
            "{attn:?} (long: {long}): routing differs (ill-conditioned seed?)"
        );
        let d = max_rel_diff(&got, &want)?;
        assert!(d < 1e-4, "{attn:?} (long: {long}): logits differ by {d}");
        assert_eq!(
            grads.len(),
            want_grads.len(),
            "{attn:?} (long: {long}): parameters with gradients"
        );
        for ((name, g), (wname, w)) in grads.iter().zip(&want_grads) {
            assert_eq!(name, wname);
            let d = max_rel_diff(g, w)?;
            assert!(
                d < 1e-3,
                "{attn:?} (long: {long}): gradient of {name} differs by {d}"
            );
        }
    }
    Ok(())
}

#[test]
fn cached_decode_matches_across_backends() -> Result<()> {
    let (model, _) = tiny_model(4)?;
    let ids = Tensor::new(&[[5u32, 9, 33, 2, 7, 61, 14, 40]], &Device::Cpu)?;
    let mut outs = Vec::new();
    for (choice, attn) in [
        (Choice::Reference, AttnImplementation::Eager),
        (Choice::Auto, AttnImplementation::Sdpa),
        (Choice::Auto, AttnImplementation::Flex),
    ] {
        let logits = registry::with_choice(None, choice, || -> Result<Tensor> {
            let mut cache = HybridCache::new(model.config());
            let opts = ForwardOptions {
                attn,
                ..Default::default()
            };
            // Prefill 6 tokens, then decode one at a time (the sliding layer trims its cache).
            model.forward(&ids.narrow(1, 0, 6)?, Some(&mut cache), &opts)?;
            model.forward(&ids.narrow(1, 6, 1)?, Some(&mut cache), &opts)?;
            Ok(model
                .forward(&ids.narrow(1, 7, 1)?, Some(&mut cache), &opts)?
                .logits
                .expect("logits"))
        })??;
        outs.push(logits);
    }
    for o in &outs[1..] {
        let d = max_rel_diff(o, &outs[0])?;
        assert!(d < 1e-4, "decode logits differ by {d}");
    }
    Ok(())
}
