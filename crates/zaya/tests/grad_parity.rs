//! Training parity with transformers 5.23 (fp32): loss and the gradient of every parameter
//! for the labelled fixture batches, with and without gradient checkpointing.
//!
//! Gradient tolerance: relative Frobenius error `‖g − g_ref‖ / max(‖g_ref‖, 1e-6) ≤ 1e-4`
//! per parameter tensor.

mod common;

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};
use common::{batch, fixture_dir, reference, FIXTURES};
use zaya::train::{Batch, Checkpointing, LossScale, TrainOptions, TrainableModel};

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

fn grads(
    model: &TrainableModel,
    b: &Batch,
    checkpointing: Checkpointing,
) -> (f64, BTreeMap<String, Tensor>) {
    let opts = TrainOptions {
        checkpointing,
        aux_loss_coef: 0.0,
        ..Default::default()
    };
    let out = model
        .forward_backward(b, &opts, &LossScale::default())
        .unwrap();
    (out.loss, out.grads.named(model.params()))
}

fn check_against_reference(name: &str, which: &str, checkpointing: Checkpointing) {
    let model = TrainableModel::load(fixture_dir(name)).unwrap();
    let reference = reference(name);
    let (loss, got) = grads(&model, &batch(name, which), checkpointing);
    let want_loss = reference[&format!("{which}.loss")]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()[0] as f64;
    assert!(
        (loss - want_loss).abs() <= 1e-5,
        "{name}/{which}: loss {loss} vs reference {want_loss}"
    );
    let prefix = format!("{which}.grad.");
    let want: BTreeMap<&str, &Tensor> = reference
        .iter()
        .filter_map(|(k, v)| k.strip_prefix(&prefix).map(|n| (n, v)))
        .collect();
    assert_eq!(
        got.keys().map(String::as_str).collect::<Vec<_>>(),
        want.keys().copied().collect::<Vec<_>>(),
        "{name}: parameter sets differ"
    );
    let mut worst = (0f64, String::new());
    for (n, g) in &got {
        let e = rel_err(g, want[n.as_str()]);
        assert!(
            e <= 1e-4,
            "{name}/{which} ({checkpointing:?}): grad of {n}: relative error {e}"
        );
        if e > worst.0 {
            worst = (e, n.clone());
        }
    }
    eprintln!(
        "{name}/{which} ({checkpointing:?}): loss |Δ| {:.2e}, worst grad rel err {:.2e} ({})",
        (loss - want_loss).abs(),
        worst.0,
        worst.1
    );
}

#[test]
fn loss_and_gradients_match_reference() {
    for name in FIXTURES {
        check_against_reference(name, "train", Checkpointing::Off);
    }
}

#[test]
fn checkpointed_loss_and_gradients_match_reference() {
    for name in FIXTURES {
        check_against_reference(name, "train", Checkpointing::EveryLayer);
    }
}

#[test]
fn checkpointing_gives_the_same_gradients() {
    for name in FIXTURES {
        let model = TrainableModel::load(fixture_dir(name)).unwrap();
        let b = batch(name, "train");
        let (loss, base) = grads(&model, &b, Checkpointing::Off);
        for cp in [Checkpointing::EveryLayer, Checkpointing::Every(2)] {
            let (l, g) = grads(&model, &b, cp);
            assert_eq!(l.to_bits(), loss.to_bits(), "{name} {cp:?}: loss differs");
            let mut identical = 0;
            for (n, t) in &g {
                let e = rel_err(t, &base[n]);
                assert!(e <= 1e-6, "{name} {cp:?}: {n} differs by {e}");
                let same = t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
                    == base[n].flatten_all().unwrap().to_vec1::<f32>().unwrap();
                identical += usize::from(same);
            }
            eprintln!(
                "{name} {cp:?}: {identical}/{} gradients bit-identical",
                g.len()
            );
        }
    }
}

#[test]
fn padded_batch_with_pad_tokens_matches_reference() {
    // Left padding (attention mask 0, labels -100) and a pad id used as a real token.
    for name in FIXTURES {
        check_against_reference(name, "train_pad", Checkpointing::Off);
        check_against_reference(name, "train_pad", Checkpointing::Every(2));
    }
}

#[test]
fn pad_row_of_the_embedding_gets_no_lookup_gradient() {
    for name in FIXTURES {
        let model = TrainableModel::load(fixture_dir(name)).unwrap();
        let pad = model.config().pad_token_id.unwrap() as usize;
        let (_, got) = grads(&model, &batch(name, "train_pad"), Checkpointing::Off);
        let row = got["model.embed_tokens.weight"].get(pad).unwrap();
        let want = reference(name)["train_pad.grad.model.embed_tokens.weight"]
            .get(pad)
            .unwrap();
        if model.config().tie_word_embeddings {
            // Only the LM-head part reaches the row.
            let e = rel_err(&row, &want);
            assert!(e <= 1e-4, "{name}: pad row relative error {e}");
            assert!(norm(&want) > 0.0);
        } else {
            assert_eq!(norm(&want), 0.0, "{name}: reference pad row");
            assert_eq!(norm(&row), 0.0, "{name}: pad row got a lookup gradient");
        }
    }
}

#[test]
fn every_parameter_gets_a_gradient_and_experts_follow_the_routing() {
    for name in FIXTURES {
        let model = TrainableModel::load(fixture_dir(name)).unwrap();
        let e = model.config().num_experts;
        let opts = TrainOptions {
            aux_loss_coef: 0.01,
            ..Default::default()
        };
        let out = model
            .forward_backward(&batch(name, "train"), &opts, &LossScale::default())
            .unwrap();
        // The batch takes every expert and the skip class somewhere in the model.
        let mut total = vec![0u64; e + 1];
        for r in &out.routing {
            for (t, c) in total.iter_mut().zip(&r.counts) {
                *t += c;
            }
        }
        assert!(total.iter().all(|&c| c > 0), "{name}: counts {total:?}");
        for (p, g) in model.params().iter().zip(&out.grads.grads) {
            let g = g
                .as_ref()
                .unwrap_or_else(|| panic!("{name}: {} has no gradient", p.name));
            assert!(norm(g) > 0.0, "{name}: {} has a zero gradient", p.name);
            // An expert's slice of the stacked weights moves iff some token was sent to it
            // in that layer (skipped tokens contribute exactly nothing).
            if p.name.contains(".mlp.experts.") {
                let layer: usize = p.name.split('.').nth(2).unwrap().parse().unwrap();
                for x in 0..e {
                    let used = out.routing[layer].counts[x] > 0;
                    let n = norm(&g.get(x).unwrap());
                    assert_eq!(n > 0.0, used, "{name}: {} expert {x}: norm {n}", p.name);
                }
            }
        }
    }
}
