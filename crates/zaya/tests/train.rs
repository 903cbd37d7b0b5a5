//! Training pieces on the fixture models: the router balance loss (value and gradient),
//! the bias rule, chunked loss, gradient accumulation, the trainer and exact resume.

mod common;

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};
use common::{batch, fixture_dir, temp_dir, FIXTURES};
use zaya::train::optim::AdamWConfig;
use zaya::train::schedule::CosineSchedule;
use zaya::train::trainer::{Trainer, TrainerConfig};
use zaya::train::{
    labelled_outputs, Batch, Checkpointing, LossScale, TrainOptions, TrainableModel,
};
use zaya::ForwardOptions;

fn dot(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_dtype(DType::F64).unwrap() * b.to_dtype(DType::F64).unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap();
    (dot(&d, &d) / dot(b, b).max(1e-24)).sqrt()
}

/// The balance loss written out from the model's own routing outputs, in f64 on the host.
fn direct_aux(model: &TrainableModel, b: &Batch) -> f64 {
    let dev = model.device();
    let ids = Tensor::new(b.input_ids.clone(), dev).unwrap();
    let mask = b.attention_mask.clone();
    let opts = ForwardOptions {
        attention_mask: mask.as_ref().map(|m| Tensor::new(m.clone(), dev).unwrap()),
        skip_lm_head: true,
        ..Default::default()
    };
    let out = model.model().forward(&ids, None, &opts).unwrap();
    let real: Vec<bool> = match &mask {
        Some(m) => m.iter().flatten().map(|&x| x != 0).collect(),
        None => vec![true; ids.elem_count()],
    };
    let e = model.config().num_experts;
    let mut total = 0.0;
    for r in &out.routing {
        let probs: Vec<Vec<f32>> = r.probs.to_vec2().unwrap();
        let n = real.iter().filter(|&&x| x).count() as f64;
        let mut value = 0.0;
        for x in 0..e {
            let count = r
                .choice
                .iter()
                .zip(&real)
                .filter(|(&c, &ok)| ok && c as usize == x)
                .count() as f64;
            let mean_p: f64 = probs
                .iter()
                .zip(&real)
                .filter(|(_, &ok)| ok)
                .map(|(p, _)| p[x] as f64)
                .sum::<f64>()
                / n;
            value += (count / n) * mean_p;
        }
        total += e as f64 * value;
    }
    total / out.routing.len() as f64
}

#[test]
fn balance_loss_value_matches_a_direct_computation() {
    for name in FIXTURES {
        let model = TrainableModel::load(fixture_dir(name)).unwrap();
        for which in ["train", "train_pad"] {
            let b = batch(name, which);
            let out = model
                .forward_backward(&b, &TrainOptions::default(), &LossScale::default())
                .unwrap();
            let want = direct_aux(&model, &b);
            assert!(
                (out.aux_loss - want).abs() < 1e-6 * want.max(1.0),
                "{name}/{which}: aux {} vs direct {want}",
                out.aux_loss
            );
            // The skip share is reported separately and is part of no f_e.
            let skip: u64 = out
                .routing
                .iter()
                .map(|r| r.counts[r.counts.len() - 1])
                .sum();
            assert!(skip > 0, "{name}/{which}");
        }
    }
}

#[test]
fn balance_loss_gradient_matches_finite_differences() {
    let name = "gqa_sliding";
    let b = batch(name, "train_pad");
    let mut model = TrainableModel::load(fixture_dir(name)).unwrap();
    let coef = 0.5;
    let with = |m: &TrainableModel, c: f64| {
        let opts = TrainOptions {
            aux_loss_coef: c,
            ..Default::default()
        };
        m.forward_backward(&b, &opts, &LossScale::default())
            .unwrap()
    };
    // The aux part of the gradient: (grad with coef c − grad with coef 0) / c.
    let on = with(&model, coef);
    let off = with(&model, 0.0);
    let pname = "model.layers.2.mlp.gate.router_mlp.out_proj.weight";
    let i = model.param_index(pname).unwrap();
    let g_on = on.grads.grads[i].as_ref().unwrap();
    let g_off = off.grads.grads[i].as_ref().unwrap();
    let g_aux = ((g_on - g_off).unwrap() / coef).unwrap();
    let g_norm = dot(&g_aux, &g_aux).sqrt();
    assert!(
        g_norm > 0.0,
        "the balance loss sends no gradient to {pname}"
    );
    // Central difference of the reported aux value along the unit gradient direction.
    let dir = (&g_aux / g_norm).unwrap();
    let w0 = model.params()[i].var.as_tensor().detach().copy().unwrap();
    let eps = 2e-3;
    let mut at = |sign: f64| {
        let w = (&w0 + (&dir * (sign * eps)).unwrap()).unwrap();
        model
            .load_tensors(&BTreeMap::from([(pname.to_string(), w)]))
            .unwrap();
        let out = model.evaluate(&b, &TrainOptions::default()).unwrap();
        (out.aux_loss, out.routing)
    };
    let (plus, r_plus) = at(1.0);
    let (minus, r_minus) = at(-1.0);
    assert_eq!(
        r_plus, r_minus,
        "the perturbation changed the top-1 choices; pick a smaller eps"
    );
    let fd = (plus - minus) / (2.0 * eps);
    // Along the unit gradient the directional derivative is the gradient norm.
    let rel = (fd - g_norm).abs() / g_norm;
    eprintln!("finite difference {fd}, analytic {g_norm}, relative {rel:.2e}");
    assert!(rel < 1e-3, "finite difference {fd} vs analytic {g_norm}");
}

#[test]
fn bias_balancing_follows_the_rule_and_changes_routing() {
    let name = "conv_k3";
    let mut model = TrainableModel::load(fixture_dir(name)).unwrap();
    let b = batch(name, "train");
    let before = model.balancing_biases().unwrap();
    let out = model.evaluate(&b, &TrainOptions::default()).unwrap();
    let lr = 0.05;
    model.apply_bias_balancing(&out.routing, lr).unwrap();
    let after = model.balancing_biases().unwrap();
    let e = model.config().num_experts;
    for (l, stats) in out.routing.iter().enumerate() {
        let mean = stats.counts[..e].iter().sum::<u64>() as f64 / e as f64;
        for x in 0..e {
            let c = stats.counts[x] as f64;
            let step = if c < mean {
                lr
            } else if c > mean {
                -lr
            } else {
                0.0
            };
            let want = (before[l][x] as f64 + step) as f32;
            assert_eq!(after[l][x], want, "layer {l} expert {x}");
        }
        assert_eq!(after[l][e], before[l][e], "skip bias moved");
    }
    // The model reads the new biases: a large bias on expert 1 of layer 0 takes every token.
    let mut big = after[0].clone();
    big[1] = 10.0;
    model.set_balancing_biases(0, &big).unwrap();
    let out = model.evaluate(&b, &TrainOptions::default()).unwrap();
    let n = out.routing[0].tokens;
    assert_eq!(out.routing[0].counts[1], n);
}

#[test]
fn chunk_size_does_not_change_loss_or_gradients() {
    let name = "mha_bias";
    let model = TrainableModel::load(fixture_dir(name)).unwrap();
    let b = batch(name, "train_pad");
    let run = |chunk| {
        let opts = TrainOptions {
            loss_chunk: chunk,
            ..Default::default()
        };
        model
            .forward_backward(&b, &opts, &LossScale::default())
            .unwrap()
    };
    let whole = run(4096);
    for chunk in [1, 5] {
        let part = run(chunk);
        assert!((part.loss - whole.loss).abs() < 1e-6);
        for (a, w) in part.grads.grads.iter().zip(&whole.grads.grads) {
            let e = rel_err(a.as_ref().unwrap(), w.as_ref().unwrap());
            assert!(e < 1e-5, "chunk {chunk}: relative error {e}");
        }
    }
}

#[test]
fn accumulation_over_micro_batches_equals_the_whole_batch() {
    let name = "gqa_sliding";
    let model = TrainableModel::load(fixture_dir(name)).unwrap();
    let whole = batch(name, "train_pad");
    let rows = |r: usize| Batch {
        input_ids: vec![whole.input_ids[r].clone()],
        labels: vec![whole.labels[r].clone()],
        attention_mask: whole.attention_mask.as_ref().map(|m| vec![m[r].clone()]),
        document_ids: None,
    };
    // Cross-entropy only: the balance loss is averaged per micro-batch by design.
    let opts = TrainOptions {
        aux_loss_coef: 0.0,
        ..Default::default()
    };
    let full = model
        .forward_backward(&whole, &opts, &LossScale::default())
        .unwrap();
    let scale = LossScale {
        normalizer: Some(whole.num_targets() as f64),
        aux_weight: 0.5,
    };
    let mut acc = zaya::train::Gradients::default();
    let mut loss = 0.0;
    for r in 0..2 {
        let out = model.forward_backward(&rows(r), &opts, &scale).unwrap();
        loss += out.loss;
        acc.accumulate(&out.grads).unwrap();
    }
    assert!((loss - full.loss).abs() < 1e-5, "{loss} vs {}", full.loss);
    for (p, (a, w)) in model
        .params()
        .iter()
        .zip(acc.grads.iter().zip(&full.grads.grads))
    {
        let e = rel_err(a.as_ref().unwrap(), w.as_ref().unwrap());
        assert!(e < 1e-4, "{}: relative error {e}", p.name);
    }
}

fn trainer_config(model: &TrainableModel) -> TrainerConfig {
    TrainerConfig {
        schedule: CosineSchedule {
            peak_lr: 3e-3,
            warmup_steps: 1,
            total_steps: 6,
            min_lr_ratio: 0.1,
        },
        adamw: AdamWConfig::default(),
        max_grad_norm: Some(1.0),
        checkpointing: Checkpointing::EveryLayer,
        balance_bias_lr: 1e-3,
        ..TrainerConfig::new(model, 1e-3)
    }
}

#[test]
fn training_lowers_the_loss_and_resumes_exactly() {
    let name = "conv_k3";
    let b1 = batch(name, "train");
    let b2 = batch(name, "train_pad");
    let model = TrainableModel::load(fixture_dir(name)).unwrap();
    let cfg = trainer_config(&model);
    let (_guard, dir) = temp_dir("trainer");
    let mut t = Trainer::new(model, cfg)
        .unwrap()
        .with_log(dir.join("log.csv"))
        .unwrap();
    let first = t.step(&[b1.clone(), b2.clone()]).unwrap();
    assert_eq!(first.lr, 0.0); // warm-up starts at 0, as the HF schedule
    let second = t.step(&[b1.clone(), b2.clone()]).unwrap();
    assert!((second.lr - 3e-3).abs() < 1e-15);
    let ckpt = t.save(&dir.join("ckpt")).unwrap();
    assert!(ckpt.ends_with("step-00000002"));
    let mut losses = vec![first.loss, second.loss];
    for _ in 0..3 {
        losses.push(t.step(&[b1.clone(), b2.clone()]).unwrap().loss);
    }
    assert!(
        losses[4] < losses[0] - 0.1,
        "loss did not go down: {losses:?}"
    );
    let log = std::fs::read_to_string(dir.join("log.csv")).unwrap();
    assert_eq!(log.lines().count(), 6, "{log}");
    assert!(log.starts_with("step,lr,loss"));

    // Resume from step 2 and take the same 3 steps: every tensor is bit-identical.
    let mut r = Trainer::resume(&dir.join("ckpt")).unwrap();
    assert_eq!(r.steps(), 2);
    for (i, want) in losses[2..].iter().enumerate() {
        let rep = r.step(&[b1.clone(), b2.clone()]).unwrap();
        assert_eq!(rep.loss.to_bits(), want.to_bits(), "step {}", i + 3);
    }
    let a = t.model().tensors().unwrap();
    let b = r.model().tensors().unwrap();
    assert_eq!(a.len(), b.len());
    for (k, v) in &a {
        assert_eq!(
            v.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b[k].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            "{k} differs after resume"
        );
    }
    // The bias rule ran: biases moved away from the stored fixture values.
    let start = TrainableModel::load(fixture_dir(name))
        .unwrap()
        .balancing_biases()
        .unwrap();
    assert_ne!(start, r.model().balancing_biases().unwrap());
}

#[test]
fn labelled_outputs_hold_loss_and_every_gradient() {
    let name = "mha_bias";
    let model = TrainableModel::load(fixture_dir(name)).unwrap();
    let b = batch(name, "train");
    let reference = common::reference(name);
    let want = reference["train.loss"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()[0];
    for (grads, cp) in [
        (false, Checkpointing::Off),
        (true, Checkpointing::EveryLayer),
    ] {
        let out = labelled_outputs(&model, &b, grads, cp).unwrap();
        let loss = out["loss"].to_vec1::<f32>().unwrap()[0];
        assert!((loss - want).abs() < 1e-5, "{loss} vs {want}");
        let n_grads = out.keys().filter(|k| k.starts_with("grad.")).count();
        assert_eq!(n_grads, if grads { model.params().len() } else { 0 });
        if grads {
            for p in model.params() {
                let g = &out[&format!("grad.{}", p.name)];
                let r = &reference[&format!("train.grad.{}", p.name)];
                assert!(rel_err(g, r) < 1e-4, "{}", p.name);
            }
        }
    }
}

#[test]
fn bad_batches_are_typed_errors() {
    let model = TrainableModel::load(fixture_dir("conv_k3")).unwrap();
    let good = batch("conv_k3", "train");
    let opts = TrainOptions::default();
    let s = LossScale::default();
    let mut b = good.clone();
    b.labels[0].pop();
    assert!(model.forward_backward(&b, &opts, &s).is_err());
    let mut b = good.clone();
    b.labels[1][3] = 10_000;
    assert!(model.forward_backward(&b, &opts, &s).is_err());
    let mut b = good.clone();
    b.input_ids[0][0] = 10_000;
    assert!(matches!(
        model.forward_backward(&b, &opts, &s),
        Err(zaya::ZayaError::TokenOutOfRange { .. })
    ));
    let mut b = good.clone();
    b.labels = vec![vec![-100; 12]; 2];
    assert!(model.forward_backward(&b, &opts, &s).is_err());
    let mut b = good.clone();
    b.attention_mask = Some(vec![vec![2; 12]; 2]);
    assert!(model.forward_backward(&b, &opts, &s).is_err());
    let bad = TrainOptions {
        checkpointing: Checkpointing::Every(0),
        ..Default::default()
    };
    assert!(model.forward_backward(&good, &bad, &s).is_err());
    let bad = TrainOptions {
        loss_chunk: 0,
        ..Default::default()
    };
    assert!(model.forward_backward(&good, &bad, &s).is_err());
    assert!(model
        .forward_backward(&Batch::default(), &opts, &s)
        .is_err());
}

/// A freshly initialised model has a zero embedding row for the pad token, so a padding
/// token's q/k heads are exactly zero: their L2 norm must not make the gradient NaN.
#[test]
fn gradients_stay_finite_for_all_zero_heads() {
    let cfg = zaya::ZayaConfig::from_file(common::fixture_dir("gqa_sliding").join("config.json"))
        .unwrap();
    let weights = zaya::init::random_weights(&cfg, 1).unwrap();
    let model = TrainableModel::from_tensors(&cfg, &weights).unwrap();
    let b = Batch {
        input_ids: vec![vec![5, 9, 0, 0, 17, 3, 0, 8]],
        labels: vec![vec![5, 9, -100, -100, 17, 3, -100, 8]],
        attention_mask: None,
        document_ids: None,
    };
    let out = model
        .forward_backward(
            &b,
            &TrainOptions::for_config(&cfg),
            &zaya::train::LossScale::default(),
        )
        .unwrap();
    let norm = out.grads.global_norm().unwrap();
    assert!(norm.is_finite() && norm > 0.0, "gradient norm {norm}");
}

/// A part of the model (a pipeline stage) reads from the checkpoint only the tensors it
/// holds, its parameters are exactly those (in the whole model's order), its layers give
/// the whole model's outputs bit for bit, and what it does not hold is a typed error.
#[test]
fn a_model_part_reads_only_its_tensors_and_runs_its_layers_as_the_whole_model() {
    use zaya::weights::Checkpoint;
    use zaya::ModelPart;
    let dir = fixture_dir("gqa_sliding");
    let whole_ck = Checkpoint::open(&dir).unwrap();
    let cfg = whole_ck.config().unwrap();
    let whole = TrainableModel::load_part(&whole_ck, &cfg, &ModelPart::whole(&cfg)).unwrap();
    let part = ModelPart {
        layers: 2..4,
        input: false,
        output: true,
    };
    let ck = Checkpoint::open(&dir).unwrap();
    let model = TrainableModel::load_part(&ck, &cfg, &part).unwrap();
    assert!(
        0 < ck.bytes_read() && ck.bytes_read() < whole_ck.bytes_read(),
        "part read {} bytes, the whole model {}",
        ck.bytes_read(),
        whole_ck.bytes_read()
    );
    let want: Vec<&str> = whole
        .params()
        .iter()
        .map(|p| p.name.as_str())
        .filter(|n| part.holds(&cfg, n))
        .collect();
    let got: Vec<&str> = model.params().iter().map(|p| p.name.as_str()).collect();
    assert_eq!(got, want);
    assert!(got.contains(&"model.layers.2.self_attn.o_proj.weight"));
    assert!(!got.iter().any(|n| n.starts_with("model.layers.1.")));
    assert_eq!(model.model().layer_range(), 2..4);
    assert_eq!(model.balancing_biases().unwrap().len(), 2);

    // layers 2 and 3 on the whole model's boundary after layer 1: the same bits
    let b = batch("gqa_sliding", "train");
    let ids = Tensor::new(b.input_ids.clone(), whole.device()).unwrap();
    let (rows, t) = ids.dims2().unwrap();
    let fopts = ForwardOptions::default();
    let wm = whole.model();
    let ctx = wm.context(rows, t, None, &fopts).unwrap();
    let mut h = wm.embed(&ids).unwrap();
    let mut state = None;
    for idx in 0..2 {
        let out = wm
            .layer_forward(idx, &h, state.as_ref(), &ctx, None, false)
            .unwrap();
        h = out.hidden;
        state = Some(out.routing.state);
    }
    let (mut hw, mut hp) = (h.clone(), h);
    let (mut sw, mut sp) = (state.clone(), state);
    let pm = model.model();
    let pctx = pm.context(rows, t, None, &fopts).unwrap();
    for idx in 2..4 {
        let a = wm
            .layer_forward(idx, &hw, sw.as_ref(), &ctx, None, false)
            .unwrap();
        let p = pm
            .layer_forward(idx, &hp, sp.as_ref(), &pctx, None, false)
            .unwrap();
        (hw, sw) = (a.hidden, Some(a.routing.state));
        (hp, sp) = (p.hidden, Some(p.routing.state));
    }
    let lw = wm.lm_head(&wm.final_norm(&hw).unwrap()).unwrap();
    let lp = pm.lm_head(&pm.final_norm(&hp).unwrap()).unwrap();
    let bits = |x: &Tensor| x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(
        bits(&lp),
        bits(&lw),
        "logits of the part vs the whole model"
    );

    // what the part does not hold
    for e in [
        pm.embed(&ids).map(|_| ()).unwrap_err(),
        pm.layer_forward(1, &hp, None, &pctx, None, false)
            .map(|_| ())
            .unwrap_err(),
        pm.forward(&ids, None, &fopts).map(|_| ()).unwrap_err(),
    ] {
        let e = e.to_string();
        assert!(e.contains("layers 2..4"), "{e}");
    }
    let (_guard, dir) = temp_dir("part-save");
    let e = model.save(&dir).unwrap_err().to_string();
    assert!(e.contains("not a checkpoint"), "{e}");
    let bad = ModelPart {
        layers: 3..9,
        input: true,
        output: false,
    };
    let e = TrainableModel::load_part(&ck, &cfg, &bad)
        .unwrap_err()
        .to_string();
    assert!(e.contains("3..9"), "{e}");
}

/// The optimizer in the backward pass (`optimizer_in_backward`) takes the steps AdamW takes
/// after the pass, without clipping: the same losses and bit-identical parameters after
/// three steps, with and without checkpointing, on tied (the head's gradient joins the
/// embedding's during the pass) and untied fixtures; the reported norm equals up to the
/// order of the sum.
#[test]
fn optimizer_in_backward_takes_the_same_steps() {
    for name in FIXTURES {
        for checkpointing in [Checkpointing::Off, Checkpointing::EveryLayer] {
            let b = batch(name, "train");
            let trainer = |in_backward: bool| {
                let model = TrainableModel::load(fixture_dir(name)).unwrap();
                let cfg = TrainerConfig {
                    max_grad_norm: None,
                    checkpointing,
                    optimizer_in_backward: in_backward,
                    ..trainer_config(&model)
                };
                Trainer::new(model, cfg).unwrap()
            };
            let (mut after, mut during) = (trainer(false), trainer(true));
            for step in 1..=3 {
                let a = after.step(std::slice::from_ref(&b)).unwrap();
                let d = during.step(std::slice::from_ref(&b)).unwrap();
                let at = format!("{name}, {checkpointing:?}, step {step}");
                assert_eq!(a.loss.to_bits(), d.loss.to_bits(), "{at}");
                assert!(
                    (a.grad_norm - d.grad_norm).abs() <= 1e-6 * a.grad_norm,
                    "{at}: gradient norm {} vs {}",
                    a.grad_norm,
                    d.grad_norm
                );
                assert_eq!(d.step, step);
            }
            let (x, y) = (
                after.model().tensors().unwrap(),
                during.model().tensors().unwrap(),
            );
            assert_eq!(x.len(), y.len());
            for (k, v) in &x {
                assert_eq!(
                    v.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    y[k].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    "{name}, {checkpointing:?}: {k} differs"
                );
            }
        }
    }
}

#[test]
fn optimizer_in_backward_refuses_clipping_and_accumulation() {
    let name = "mha_bias";
    let model = TrainableModel::load(fixture_dir(name)).unwrap();
    let cfg = TrainerConfig {
        optimizer_in_backward: true,
        ..trainer_config(&model)
    };
    let Err(err) = Trainer::new(model, cfg.clone()) else {
        panic!("clipping with the optimizer in backward was accepted");
    };
    assert!(err.to_string().contains("max_grad_norm"), "{err}");
    let model = TrainableModel::load(fixture_dir(name)).unwrap();
    let cfg = TrainerConfig {
        max_grad_norm: None,
        ..cfg
    };
    let mut t = Trainer::new(model, cfg).unwrap();
    let b = batch(name, "train");
    let err = t.step(&[b.clone(), b]).unwrap_err();
    assert!(err.to_string().contains("one micro-batch"), "{err}");
    assert_eq!(t.steps(), 0);
}

/// candle's releasing backward (vendored patch): each variable's gradient is handed over
/// once, final (equal to `backward`'s), and one the callback keeps stays in the store.
#[test]
fn releasing_backward_hands_each_variable_its_final_gradient_once() {
    use candle_core::{Device, Var};
    let w = Var::new(&[1f32, 2., 3.], &Device::Cpu).unwrap();
    let x = Var::new(&[0.5f32, -1., 2.], &Device::Cpu).unwrap();
    let (wt, xt) = (w.as_tensor(), x.as_tensor());
    // w is read by three nodes, x by two, through shared intermediates
    let wx = (wt * xt).unwrap();
    let y = (wx.sum_all().unwrap()
        + wt.sqr().unwrap().sum_all().unwrap()
        + xt.exp()
            .unwrap()
            .mul(&wx)
            .unwrap()
            .mul(wt)
            .unwrap()
            .sum_all()
            .unwrap())
    .unwrap();
    let full = y.backward().unwrap();
    drop(wx);
    let mut seen = Vec::new();
    let kept = y
        .backward_releasing_with(&mut |v, g| {
            seen.push((v.id(), g.to_vec1::<f32>()?));
            Ok((v.id() == xt.id()).then_some(g))
        })
        .unwrap();
    assert_eq!(seen.len(), 2, "each variable once");
    for (id, g) in &seen {
        let t = if *id == wt.id() { wt } else { xt };
        assert_eq!(g, &full.get(t).unwrap().to_vec1::<f32>().unwrap());
    }
    assert!(kept.get(wt).is_none());
    assert_eq!(
        kept.get(xt).unwrap().to_vec1::<f32>().unwrap(),
        full.get(xt).unwrap().to_vec1::<f32>().unwrap()
    );
}

/// Gradient sums written in place (vendored patch): a sum is updated in its own buffer only
/// where nothing else can read that buffer, so a gradient stored for two inputs of an `add`
/// (one buffer, two owners) is never changed through one of them.
#[test]
fn in_place_gradient_sums_never_change_a_shared_buffer() {
    use candle_core::{Device, Var};
    let dev = Device::Cpu;
    let a = Var::new(&[1f32, 2., 3.], &dev).unwrap();
    let b = Var::new(&[4f32, 5., 6.], &dev).unwrap();
    let k1 = Tensor::new(&[1f32, 10., 100.], &dev).unwrap();
    let k2 = Tensor::new(&[0.5f32, 0.25, 0.125], &dev).unwrap();
    let (at, bt) = (a.as_tensor(), b.as_tensor());
    // `a + b` gives a and b one gradient buffer; `a · k2` adds a second term to a's only,
    // reached before or after the shared buffer is stored (both orders of the two terms)
    let shared = || (((at + bt).unwrap() * &k1).unwrap()).sum_all().unwrap();
    let own = || {
        (at * &k2)
            .unwrap()
            .exp()
            .unwrap()
            .log()
            .unwrap()
            .sum_all()
            .unwrap()
    };
    let ys = [(shared() + own()).unwrap(), (own() + shared()).unwrap()];
    for gs in ys.iter().flat_map(|y| {
        [
            y.backward().unwrap(),
            y.clone().backward_releasing().unwrap(),
        ]
    }) {
        assert_eq!(
            gs.get(bt).unwrap().to_vec1::<f32>().unwrap(),
            [1., 10., 100.]
        );
        let ga = gs.get(at).unwrap().to_vec1::<f32>().unwrap();
        for (g, want) in ga.iter().zip([1.5f32, 10.25, 100.125]) {
            assert!((g - want).abs() < 1e-5, "{ga:?}");
        }
    }
}

/// `add_reusing` gives `a + b` and writes into `a`'s buffer only when `a` is its sole
/// owner: a clone kept elsewhere keeps its values.
#[test]
fn add_reusing_leaves_a_shared_tensor_alone() {
    use candle_core::Device;
    let dev = Device::Cpu;
    let a = Tensor::new(&[1f32, 2., 3.], &dev).unwrap();
    let b = Tensor::new(&[0.5f32, 0.5, 0.5], &dev).unwrap();
    let kept = a.clone();
    let sum = a.add_reusing(&b).unwrap();
    assert_eq!(sum.to_vec1::<f32>().unwrap(), [1.5, 2.5, 3.5]);
    assert_eq!(kept.to_vec1::<f32>().unwrap(), [1., 2., 3.]);
    let view = kept.narrow(0, 1, 2).unwrap();
    let sum = kept.add_reusing(&b).unwrap();
    assert_eq!(sum.to_vec1::<f32>().unwrap(), [1.5, 2.5, 3.5]);
    assert_eq!(view.to_vec1::<f32>().unwrap(), [2., 3.]);
    // sole owner: the same values, in place
    let c = Tensor::new(&[1f32, 2., 3.], &dev).unwrap();
    assert_eq!(
        c.add_reusing(&b).unwrap().to_vec1::<f32>().unwrap(),
        [1.5, 2.5, 3.5]
    );
    // a variable on the right keeps the sum in the graph
    let v = candle_core::Var::new(&[1f32, 1., 1.], &dev).unwrap();
    let c = Tensor::new(&[1f32, 2., 3.], &dev).unwrap();
    let y = c.add_reusing(v.as_tensor()).unwrap();
    let gs = y.sum_all().unwrap().backward().unwrap();
    assert_eq!(
        gs.get(v.as_tensor()).unwrap().to_vec1::<f32>().unwrap(),
        [1., 1., 1.]
    );
}

/// The first f32 of a CPU tensor's buffer: where its values live.
fn buffer_address(t: &Tensor) -> *const f32 {
    let (storage, _) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) => v.as_ptr(),
        _ => panic!("expected an f32 CPU tensor"),
    }
}

/// `affine_reusing` (gradient clipping's scale) writes into the buffer only where nothing
/// else can see it, and gives `affine`'s values either way (-0.0 included: `v·m + 0`).
#[test]
fn affine_reusing_scales_in_place_only_a_sole_owner() {
    use candle_core::Device;
    let dev = Device::Cpu;
    let values = [1.5f32, -2.25, 3.0, -0.0, 1e-30];
    let want = Tensor::new(&values, &dev)
        .unwrap()
        .affine(0.3, 0.0)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
    // sole owner: the same buffer, affine's bits
    let a = Tensor::new(&values, &dev).unwrap();
    let before = buffer_address(&a);
    let scaled = a.affine_reusing(0.3, 0.0).unwrap();
    assert_eq!(buffer_address(&scaled), before);
    assert_eq!(bits(scaled.to_vec1().unwrap()), bits(want.clone()));
    // a clone, a view, or a variable keeps its values and gets a new buffer
    let a = Tensor::new(&values, &dev).unwrap();
    let kept = a.clone();
    let scaled = a.affine_reusing(0.3, 0.0).unwrap();
    assert_ne!(buffer_address(&scaled), buffer_address(&kept));
    assert_eq!(bits(scaled.to_vec1().unwrap()), bits(want.clone()));
    assert_eq!(kept.to_vec1::<f32>().unwrap(), values);
    let view = kept.narrow(0, 1, 2).unwrap();
    let scaled = kept.affine_reusing(0.3, 0.0).unwrap();
    assert_eq!(bits(scaled.to_vec1().unwrap()), bits(want));
    assert_eq!(view.to_vec1::<f32>().unwrap(), [-2.25, 3.0]);
    let v = candle_core::Var::new(&values, &dev).unwrap();
    let _ = v.as_tensor().clone().affine_reusing(0.3, 0.0).unwrap();
    assert_eq!(v.as_tensor().to_vec1::<f32>().unwrap(), values);
}

/// An embedding read twice (two `index_select`s, one repeated id) and once densely: the
/// gradient adds each row's terms in place and equals the one written out by hand.
#[test]
fn embedding_gradient_accumulates_rows_in_place_exactly() {
    use candle_core::{Device, Var};
    let dev = Device::Cpu;
    let w = Var::new(&[[1f32, 2.], [3., 4.], [5., 6.]], &dev).unwrap();
    let wt = w.as_tensor();
    let ids1 = Tensor::new(&[0u32, 2, 0], &dev).unwrap();
    let ids2 = Tensor::new(&[1u32], &dev).unwrap();
    let c1 = Tensor::new(&[[1f32, 2.], [3., 4.], [5., 6.]], &dev).unwrap();
    let c2 = Tensor::new(&[[7f32, 8.]], &dev).unwrap();
    let d = Tensor::new(&[[0.5f32, 0.5], [0.5, 0.5], [0.5, 0.5]], &dev).unwrap();
    let y = ((wt.index_select(&ids1, 0).unwrap() * &c1)
        .unwrap()
        .sum_all()
        .unwrap()
        + (wt.index_select(&ids2, 0).unwrap() * &c2)
            .unwrap()
            .sum_all()
            .unwrap()
        + (wt * &d).unwrap().sum_all().unwrap())
    .unwrap();
    let want = [[6.5f32, 8.5], [7.5, 8.5], [3.5, 4.5]];
    for gs in [
        y.backward().unwrap(),
        y.clone().backward_releasing().unwrap(),
    ] {
        assert_eq!(gs.get(wt).unwrap().to_vec2::<f32>().unwrap(), want);
    }
    // an id past the table is an error, not a write outside it
    let bad = Tensor::new(&[3u32], &dev).unwrap();
    let y = wt.index_select(&bad, 0);
    assert!(y.is_err() || y.unwrap().sum_all().unwrap().backward().is_err());
}

/// A backward started from a seeded store (`backward_releasing_from`: the LM head's part of
/// a tied embedding's gradient) adds the embedding lookup's rows into the seed's own buffer,
/// reports the sum to `ready`, and returns an entry its graph never reaches as it was.
#[test]
fn a_seeded_backward_adds_an_embedding_gradient_into_the_seed() {
    use candle_core::backprop::GradStore;
    use candle_core::{Device, Var};
    let dev = Device::Cpu;
    let w = Var::new(&[[1f32, 2.], [3., 4.], [5., 6.]], &dev).unwrap();
    let other = Var::new(&[1f32, 1.], &dev).unwrap();
    let (wt, ot) = (w.as_tensor(), other.as_tensor());
    let ids = Tensor::new(&[0u32, 2, 0], &dev).unwrap();
    let c = Tensor::new(&[[1f32, 2.], [3., 4.], [5., 6.]], &dev).unwrap();
    let y = || {
        (wt.index_select(&ids, 0).unwrap() * &c)
            .unwrap()
            .sum_all()
            .unwrap()
    };
    let head = [[0.25f32, 0.5], [1., 1.], [-1., 2.]];
    let mut start = GradStore::default();
    let seed = Tensor::new(&head, &dev).unwrap();
    let seed_buffer = buffer_address(&seed);
    start.insert(wt, seed);
    start.insert(ot, Tensor::new(&[7f32, 8.], &dev).unwrap());
    let mut reported = None;
    let gs = y()
        .backward_releasing_from(start, &mut |v, g| {
            if v.id() == wt.id() {
                reported = Some(g.to_vec2::<f32>()?);
            }
            Ok(Some(g))
        })
        .unwrap();
    // rows 0 (twice) and 2 of `c` added to the head's part
    let want = [[6.25f32, 8.5], [1., 1.], [2., 6.]];
    let got = gs.get(wt).unwrap();
    assert_eq!(got.to_vec2::<f32>().unwrap(), want);
    assert_eq!(buffer_address(got), seed_buffer, "not added in place");
    assert_eq!(reported.unwrap(), want);
    assert_eq!(gs.get(ot).unwrap().to_vec1::<f32>().unwrap(), [7., 8.]);
    // the same as the plain backward plus the head's part
    let plain = y().backward_releasing().unwrap();
    let sum = (plain.get(wt).unwrap() + Tensor::new(&head, &dev).unwrap()).unwrap();
    assert_eq!(sum.to_vec2::<f32>().unwrap(), want);
}

/// The fused training head (`kernels::loss_head`) against its reference, the chunked
/// autograd path: the loss and every parameter's gradient (tied heads, an untied head with
/// a bias) for several chunk sizes; then GRPO's head (temperature, per-token weights, a
/// chunk of zero weights, which both skip) on the same model.
#[test]
fn fused_loss_head_matches_the_autograd_head() {
    use zaya::kernels::registry::{with_choice, Choice, ImplId, Kernel};
    use zaya::train::loss::{weighted_logp_backward, Targets};
    let choose = |choice, f: &mut dyn FnMut()| {
        with_choice(Some(Kernel::LossHead), choice, f).unwrap();
    };
    let fused = Choice::Impl(ImplId::Fused);
    for name in FIXTURES {
        let model = TrainableModel::load(fixture_dir(name)).unwrap();
        let zm = model.model();
        let (w, bias) = zm.plain_dense_head().expect("a dense head");
        // The fused kernel really runs under the fused choice, and not under the reference.
        let hidden =
            Tensor::randn(0f32, 1.0, (2, 7, zm.config().hidden_size), model.device()).unwrap();
        let flat = hidden.reshape((14, zm.config().hidden_size)).unwrap();
        let (rows, ids, coef) = ([0u32, 3, 13], [1u32, 0, 2], [0.5f32, -1.0, 2.0]);
        let call = || {
            zaya::kernels::loss_head_backward(&flat, w, bias, &rows, &ids, &coef, 1.0, 2).unwrap()
        };
        let mut ran = (false, true);
        choose(fused, &mut || ran.0 = call().is_some());
        choose(Choice::Reference, &mut || ran.1 = call().is_some());
        assert_eq!(ran, (true, false), "{name}: fused kernel selection");

        let b = batch(name, "train_pad");
        for chunk in [1, 5, 4096] {
            let opts = TrainOptions {
                loss_chunk: chunk,
                ..Default::default()
            };
            let run = |choice| {
                let mut out = None;
                choose(choice, &mut || {
                    out = Some(
                        model
                            .forward_backward(&b, &opts, &LossScale::default())
                            .unwrap(),
                    )
                });
                out.unwrap()
            };
            let (got, want) = (run(fused), run(Choice::Reference));
            assert!(
                (got.loss - want.loss).abs() < 1e-6,
                "{name} chunk {chunk}: loss {} vs {}",
                got.loss,
                want.loss
            );
            for (p, (a, r)) in model
                .params()
                .iter()
                .zip(got.grads.grads.iter().zip(&want.grads.grads))
            {
                let e = rel_err(a.as_ref().unwrap(), r.as_ref().unwrap());
                assert!(
                    e < 1e-5,
                    "{name} chunk {chunk} {}: relative error {e}",
                    p.name
                );
            }
        }

        let labels = vec![
            vec![1i64, 2, -100, 0, 3, 1, 2],
            vec![-100i64, 0, 1, 2, 3, 0, 1],
        ];
        let targets = Targets::from_labels(&labels, zm.config().vocab_size).unwrap();
        let mut weights: Vec<f32> = (0..targets.len()).map(|k| 0.3 - 0.2 * k as f32).collect();
        weights[..3].fill(0.0); // the first chunk of three: skipped by both
        let grpo = |choice, weights: &[f32]| {
            let mut out = None;
            choose(choice, &mut || {
                out = Some(weighted_logp_backward(zm, &hidden, &targets, 0.7, weights, 3).unwrap())
            });
            out.unwrap()
        };
        let (got, want) = (grpo(fused, &weights), grpo(Choice::Reference, &weights));
        let e = rel_err(
            got.grad_hidden.as_ref().unwrap(),
            want.grad_hidden.as_ref().unwrap(),
        );
        assert!(
            e < 1e-5,
            "{name} GRPO head: hidden gradient relative error {e}"
        );
        for p in std::iter::once(w).chain(bias) {
            let e = rel_err(got.grads.get(p).unwrap(), want.grads.get(p).unwrap());
            assert!(
                e < 1e-5,
                "{name} GRPO head: parameter gradient relative error {e}"
            );
        }
        // Every weight zero: no chunk runs, and neither path gives the head a gradient (the
        // optimizer must leave it alone rather than step it with zeros).
        weights.fill(0.0);
        let (got, want) = (grpo(fused, &weights), grpo(Choice::Reference, &weights));
        for p in std::iter::once(w).chain(bias) {
            assert!(
                got.grads.get(p).is_none() && want.grads.get(p).is_none(),
                "{name}"
            );
        }
        let largest = |t: &Tensor| {
            t.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert_eq!(largest(got.grad_hidden.as_ref().unwrap()), 0.0);

        // A frozen head (not a variable): the rows' gradient alone, the same as with the
        // variable's.
        let frozen_w = w.detach();
        let mut frozen = None;
        choose(fused, &mut || {
            frozen = zaya::kernels::loss_head_backward(
                &flat, &frozen_w, bias, &rows, &ids, &coef, 1.0, 2,
            )
            .unwrap()
        });
        let mut live = None;
        choose(fused, &mut || live = call());
        let (frozen, live) = (frozen.unwrap(), live.unwrap());
        assert!(frozen.d_weight.is_none() && live.d_weight.is_some());
        assert_eq!(frozen.d_hidden, live.d_hidden);
        // Hidden rows of another width are refused, even where the lengths happen to divide.
        let wide =
            Tensor::zeros((7, 2 * zm.config().hidden_size), DType::F32, model.device()).unwrap();
        let mut err = None;
        choose(fused, &mut || {
            err =
                zaya::kernels::loss_head_backward(&wide, w, bias, &rows, &ids, &coef, 1.0, 2).err()
        });
        let err = err.expect("a width mismatch is an error").to_string();
        assert!(
            err.contains("does not match the head weight"),
            "{name}: {err}"
        );
    }
}
