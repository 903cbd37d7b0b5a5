//! Pipeline- and data-parallel training on local ranks against the single-device step:
//! gradients (every parameter, 1e-4 of the tensor's largest magnitude), loss (1e-5), the
//! optimizer steps (AdamW, ZeRO-1 or not, clipping, bias balancing), and the checkpoints
//! rank 0 writes.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use candle_core::Tensor;
use zaya::train::trainer::{Trainer, TrainerConfig};
use zaya::train::{Batch, Checkpointing, Gradients, LossScale, TrainOptions, TrainableModel};
use zaya_dist::train_driver::{DriverOptions, ParallelTrainer};
use zaya_dist::{LocalWorld, Mesh, MeshShape, ParallelError};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

/// `n` micro-batches of `rows × len` tokens; the second has padding in its first row.
fn micro_batches(vocab: usize, n: usize, rows: usize, len: usize) -> Vec<Batch> {
    (0..n)
        .map(|m| {
            let ids: Vec<Vec<u32>> = (0..rows)
                .map(|r| {
                    (0..len)
                        .map(|t| ((m * 131 + r * 37 + t * 11 + t * t * 3) % vocab) as u32)
                        .collect()
                })
                .collect();
            let mut b = Batch::language_modelling(ids);
            if m == 1 {
                let mut mask = vec![vec![1u32; len]; rows];
                mask[0][len - 2..].fill(0);
                b.labels[0][len - 2..].fill(-100);
                b.attention_mask = Some(mask);
            }
            b
        })
        .collect()
}

/// The single-device accumulation over `micro` (as `Trainer::step`): loss, aux, grads.
fn reference(
    model: &TrainableModel,
    micro: &[Batch],
    opts: &TrainOptions,
) -> (f64, f64, BTreeMap<String, Tensor>) {
    let total: usize = micro.iter().map(Batch::num_targets).sum();
    let scale = LossScale {
        normalizer: Some(total as f64),
        aux_weight: 1.0 / micro.len() as f64,
    };
    let mut grads = Gradients::default();
    let (mut loss, mut aux) = (0.0, 0.0);
    for mb in micro {
        let out = model.forward_backward(mb, opts, &scale).unwrap();
        grads.accumulate(&out.grads).unwrap();
        loss += out.loss;
        aux += out.aux_loss * scale.aux_weight;
    }
    (loss, aux, grads.named(model.params()))
}

fn parts(
    model: TrainableModel,
    cfg: TrainerConfig,
) -> zaya::train::trainer::TrainerParts<TrainableModel> {
    Trainer::new(model, cfg).unwrap().into_parts()
}

fn copy(model: &TrainableModel) -> TrainableModel {
    TrainableModel::from_tensors(model.config(), &model.tensors().unwrap()).unwrap()
}

/// Runs `f` on every rank of a `pp × dp` mesh of copies of `model`; rank 0's value.
fn on_ranks<T: Send>(
    model: &TrainableModel,
    cfg: &TrainerConfig,
    shape: MeshShape,
    opts: DriverOptions,
    f: impl Fn(&mut ParallelTrainer) -> Result<T, ParallelError> + Sync,
) -> T {
    let world = LocalWorld::new(shape.world(), Duration::from_secs(120)).unwrap();
    let outs = world.run(|comm| {
        let mesh = Mesh::new(Box::new(comm), shape)?;
        let mut t = ParallelTrainer::from_parts(mesh, parts(copy(model), cfg.clone()), opts)?;
        f(&mut t)
    });
    zaya_dist::tp::first_of(outs).unwrap()
}

fn assert_close(name: &str, got: &Tensor, want: &Tensor, rel: f32) {
    let g = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let w = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(g.len(), w.len(), "{name}");
    let scale = w.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    let diff = g
        .iter()
        .zip(&w)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        diff <= rel * scale,
        "{name}: max diff {diff} vs max |want| {scale}"
    );
}

fn check_gradients(
    fixture_name: &str,
    pp: usize,
    dp: usize,
    micro: usize,
    checkpointing: Checkpointing,
) {
    let model = TrainableModel::load(fixture(fixture_name)).unwrap();
    let vocab = model.config().vocab_size;
    let batches = micro_batches(vocab, micro, 2, 7);
    let opts = TrainOptions {
        checkpointing,
        // large enough that a wrong balance-loss weighting shows in every router gradient
        aux_loss_coef: 0.05,
        loss_chunk: 5,
        ..Default::default()
    };
    let (loss, aux, want) = reference(&model, &batches, &opts);
    let cfg = TrainerConfig::new(&model, 1e-3);
    let shape = MeshShape::new(1, pp, 1, dp).unwrap();
    let got = on_ranks(&model, &cfg, shape, DriverOptions::default(), |t| {
        t.gathered_gradients(&batches, &opts)
    })
    .expect("rank 0 gathers");
    let got_loss = got["loss"].to_vec1::<f32>().unwrap()[0] as f64;
    let got_aux = got["aux_loss"].to_vec1::<f32>().unwrap()[0] as f64;
    assert!(
        (got_loss - loss).abs() <= 1e-5 * loss.abs(),
        "loss {got_loss} vs {loss}"
    );
    assert!(
        (got_aux - aux).abs() <= 1e-5 * aux.abs().max(1e-6),
        "aux {got_aux} vs {aux}"
    );
    let n = got.keys().filter(|k| k.starts_with("grad.")).count();
    assert_eq!(n, want.len(), "every parameter has its gradient");
    for (name, w) in &want {
        assert_close(name, &got[&format!("grad.{name}")], w, 1e-4);
    }
}

#[test]
fn pp2_gradients_equal_the_single_device_step() {
    check_gradients("conv_k3", 2, 1, 3, Checkpointing::Off);
}

#[test]
fn pp4_with_checkpointing_gradients_equal_the_single_device_step() {
    check_gradients("conv_k3", 4, 1, 5, Checkpointing::EveryLayer);
}

#[test]
fn pp3_untied_head_gradients_equal_the_single_device_step() {
    check_gradients("mha_bias", 3, 1, 4, Checkpointing::Every(1));
}

#[test]
fn dp2_gradients_equal_the_single_device_step() {
    check_gradients("gqa_sliding", 1, 2, 3, Checkpointing::Off);
}

#[test]
fn a_replica_without_a_micro_batch_contributes_nothing() {
    check_gradients("conv_k3", 2, 2, 1, Checkpointing::Off);
}

#[test]
fn pp2_dp2_gradients_equal_the_single_device_step() {
    check_gradients("gqa_sliding", 2, 2, 4, Checkpointing::Every(2));
}

/// Three optimizer steps: losses, norms and final weights against `Trainer::step`.
fn check_steps(
    pp: usize,
    dp: usize,
    zero1: bool,
    root: Option<&Path>,
) -> (Vec<f64>, TrainableModel) {
    let model = TrainableModel::load(fixture("conv_k3")).unwrap();
    let vocab = model.config().vocab_size;
    let mut cfg = TrainerConfig::new(&model, 5e-3);
    cfg.aux_loss_coef = 0.01;
    cfg.balance_bias_lr = 1e-3;
    cfg.max_grad_norm = Some(0.5);
    cfg.checkpointing = Checkpointing::EveryLayer;
    let steps: Vec<Vec<Batch>> = (0..3)
        .map(|s| {
            let mut b = micro_batches(vocab, 4, 2, 6);
            for mb in &mut b {
                for row in &mut mb.input_ids {
                    for x in row.iter_mut() {
                        *x = (*x + 7 * s as u32) % vocab as u32;
                    }
                }
                mb.labels = mb
                    .input_ids
                    .iter()
                    .zip(&mb.labels)
                    .map(|(ids, l)| {
                        ids.iter()
                            .zip(l)
                            .map(|(&i, &l)| if l == -100 { -100 } else { i64::from(i) })
                            .collect()
                    })
                    .collect();
            }
            b
        })
        .collect();
    let mut single = Trainer::new(copy(&model), cfg.clone()).unwrap();
    let want: Vec<_> = steps.iter().map(|mb| single.step(mb).unwrap()).collect();
    let shape = MeshShape::new(1, pp, 1, dp).unwrap();
    let opts = DriverOptions {
        zero1,
        bucket_elems: 1000,
        // small gather messages: the checkpoint streams many, some tensors in pieces
        gather_bytes: 4096,
    };
    let (got, tensors) = on_ranks(&model, &cfg, shape, opts, |t| {
        let mut reports = Vec::new();
        for mb in &steps {
            reports.push(t.step(mb)?);
        }
        if let Some(root) = root {
            t.save(root)?;
            // the in-memory gathers, written by the single-process writers beside the
            // streamed checkpoint (compared byte for byte below)
            let (w, o) = (t.gather_weights()?, t.gather_optimizer()?);
            if let (Some(w), Some(o)) = (w, o) {
                let dir = root.join("in-memory");
                zaya::weights::save_checkpoint(
                    &dir,
                    t.model().config(),
                    &w,
                    zaya::weights::Layout::Native,
                )?;
                zaya::train::optim::AdamW::save_state(&o, &dir.join("optimizer.safetensors"))?;
            }
        }
        Ok((reports, t.gather_weights()?))
    });
    if let Some(root) = root {
        // streamed, a message of at most 4096 bytes at a time, and in memory: the same bytes
        for f in ["model.safetensors", "config.json", "optimizer.safetensors"] {
            let a = std::fs::read(root.join("step-00000003").join(f)).unwrap();
            let b = std::fs::read(root.join("in-memory").join(f)).unwrap();
            assert!(
                a == b,
                "{f}: the streamed checkpoint differs from the in-memory write"
            );
        }
    }
    let tensors = tensors.expect("rank 0 gathers the weights");
    let mut losses = Vec::new();
    for (g, w) in got.iter().zip(&want) {
        assert!(
            (g.loss - w.loss).abs() <= 1e-5 * w.loss,
            "loss {} vs {}",
            g.loss,
            w.loss
        );
        assert!(
            (g.aux_loss - w.aux_loss).abs() <= 1e-5 * w.aux_loss,
            "aux {} vs {}",
            g.aux_loss,
            w.aux_loss
        );
        assert!(
            (g.grad_norm - w.grad_norm).abs() <= 1e-4 * w.grad_norm,
            "norm {} vs {}",
            g.grad_norm,
            w.grad_norm
        );
        assert_eq!(g.routing, w.routing);
        assert_eq!(g.targets, w.targets);
        losses.push(g.loss);
    }
    let want_t = single.model().tensors().unwrap();
    for (name, w) in &want_t {
        // AdamW normalises the update: weights agree to a small fraction of lr·steps
        let g = &tensors[name];
        let d = support::max_abs_diff(g, w);
        assert!(d <= 2e-4, "{name}: weights differ by {d} after 3 steps");
    }
    (
        losses,
        TrainableModel::from_tensors(model.config(), &tensors).unwrap(),
    )
}

#[test]
fn pp2_steps_equal_the_single_device_trainer() {
    check_steps(2, 1, false, None);
}

#[test]
fn dp2_zero1_steps_equal_the_single_device_trainer() {
    check_steps(1, 2, true, None);
}

#[test]
fn pp2_dp2_zero1_steps_and_checkpoint_equal_the_single_device_trainer() {
    let root = std::env::temp_dir().join(format!("zaya-pp-train-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    check_steps(2, 2, true, Some(&root));
    // the checkpoint is the single-process one: it resumes on one rank
    let t = Trainer::resume(&root).unwrap();
    assert_eq!(t.steps(), 3);
    assert!(root.join("step-00000003/optimizer.safetensors").is_file());
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn bad_setups_fail_before_work() {
    let model = TrainableModel::load(fixture("gqa_sliding")).unwrap();
    let cfg = TrainerConfig::new(&model, 1e-3);
    // 6 layers do not split into 4 stages
    let world = LocalWorld::new(4, Duration::from_secs(30)).unwrap();
    let outs = world.run(|comm| {
        let mesh = Mesh::new(Box::new(comm), MeshShape::new(1, 4, 1, 1).unwrap())?;
        ParallelTrainer::from_parts(
            mesh,
            parts(copy(&model), cfg.clone()),
            DriverOptions::default(),
        )
        .map(|_| ())
    });
    let e = zaya_dist::tp::first_of(outs).unwrap_err().to_string();
    assert!(e.contains("6 decoder layers") && e.contains("4"), "{e}");
    // a rank that fails mid-run: the others stop naming it
    let batches = micro_batches(model.config().vocab_size, 2, 1, 5);
    let world = LocalWorld::new(2, Duration::from_secs(30)).unwrap();
    let outs = world.run(|comm| {
        let mesh = Mesh::new(Box::new(comm), MeshShape::new(1, 2, 1, 1).unwrap())?;
        if mesh.coords.pp == 1 {
            return Err(ParallelError::Unsupported("stage 1 crashed".into()));
        }
        let mut t = ParallelTrainer::from_parts(
            mesh,
            parts(copy(&model), cfg.clone()),
            DriverOptions::default(),
        )?;
        t.step(&batches).map(|_| ())
    });
    let e = match &outs[0] {
        Err(e) => e.to_string(),
        Ok(_) => panic!("rank 0 cannot finish without stage 1"),
    };
    assert!(e.contains("rank 1"), "{e}");
}

/// `--pp 2 --dp 2` resumed from a single-process checkpoint: each rank reads from the files
/// only its stage's tensors (the bytes the checkpoint reader counts are exactly those of
/// the tensors the stage holds, f32, less than the whole model) and, from
/// `optimizer.safetensors`, only `exp_avg` / `exp_avg_sq` / `step` of the parameters whose
/// state its replica keeps (ZeRO-1: the two replicas keep disjoint shares covering the
/// stage); the resumed steps give the single-process losses, norms and routing counts.
#[test]
fn pp_dp_ranks_read_only_their_stage_and_resume_the_single_process_steps() {
    use zaya::weights::Checkpoint;
    use zaya_dist::pipeline::stage_holds;
    use zaya_dist::tp_driver::RunState;
    let model = TrainableModel::load(fixture("conv_k3")).unwrap();
    let vocab = model.config().vocab_size;
    let mut cfg = TrainerConfig::new(&model, 5e-3);
    cfg.aux_loss_coef = 0.01;
    cfg.balance_bias_lr = 1e-3;
    cfg.max_grad_norm = Some(0.5);
    let steps: Vec<Vec<Batch>> = (0..3).map(|s| micro_batches(vocab, 2 + s, 2, 6)).collect();
    let mut single = Trainer::new(model, cfg.clone()).unwrap();
    single.step(&steps[0]).unwrap();
    let root = std::env::temp_dir().join(format!("zaya-pp-stage-read-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let ck = single.save(&root).unwrap();
    let want: Vec<_> = steps[1..]
        .iter()
        .map(|mb| single.step(mb).unwrap())
        .collect();

    let shape = MeshShape::new(1, 2, 1, 2).unwrap();
    let mcfg = Checkpoint::open(&ck).unwrap().config().unwrap();
    let specs = zaya::weights::native_specs(&mcfg);
    let whole: usize = specs
        .iter()
        .map(|s| s.shape.iter().product::<usize>())
        .sum();
    let world = LocalWorld::new(shape.world(), Duration::from_secs(120)).unwrap();
    let outs = world.run(|comm| -> Result<_, ParallelError> {
        let mesh = Mesh::new(Box::new(comm), shape)?;
        let c = mesh.coords;
        let weights = Checkpoint::open(&ck)?;
        let state = Checkpoint::open_file(ck.join("optimizer.safetensors"))?;
        let at = RunState {
            cfg: cfg.clone(),
            step: 1,
            run: None,
        };
        let mut t =
            ParallelTrainer::open(mesh, &weights, Some(&state), at, DriverOptions::default())?;
        let read = (weights.bytes_read(), state.bytes_read());
        let params = t.model().params();
        let owned: Vec<(String, usize)> = t
            .layout()
            .owned_by(c.dp)
            .into_iter()
            .map(|k| (params[k].name.clone(), params[k].var.elem_count()))
            .collect();
        let all: Vec<String> = params.iter().map(|p| p.name.clone()).collect();
        let mut got = Vec::new();
        for mb in &steps[1..] {
            got.push(t.step(mb)?);
        }
        Ok((c, read, owned, all, got))
    });
    let mut shares: BTreeMap<usize, Vec<Vec<String>>> = BTreeMap::new();
    let mut alls: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for out in outs {
        let (c, (w_read, s_read), owned, all, got) = out.unwrap_or_else(|e| panic!("{e:?}"));
        let share: usize = specs
            .iter()
            .filter(|s| stage_holds(&mcfg, shape.pp, c.pp, &s.name))
            .map(|s| s.shape.iter().product::<usize>())
            .sum();
        assert_eq!(w_read, 4 * share as u64, "{c:?}: weight bytes read");
        assert!(
            share < whole,
            "{c:?}: a share of {share} of {whole} elements"
        );
        let kept: usize = owned.iter().map(|(_, n)| n).sum();
        assert_eq!(
            s_read,
            (8 * kept + 8 * owned.len()) as u64,
            "{c:?}: optimizer bytes read"
        );
        shares
            .entry(c.pp)
            .or_default()
            .push(owned.into_iter().map(|(n, _)| n).collect());
        alls.insert(c.pp, all);
        for (s, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g.loss - w.loss).abs() <= 1e-5 * w.loss,
                "{c:?} step {s}: loss {} vs {}",
                g.loss,
                w.loss
            );
            assert!(
                (g.grad_norm - w.grad_norm).abs() <= 1e-4 * w.grad_norm,
                "{c:?} step {s}: norm {} vs {}",
                g.grad_norm,
                w.grad_norm
            );
            assert_eq!(g.routing, w.routing, "{c:?} step {s}");
        }
    }
    for (pp, reps) in &shares {
        assert_eq!(reps.len(), 2, "stage {pp}");
        assert!(reps.iter().all(|r| !r.is_empty()), "stage {pp}: {reps:?}");
        let mut both: Vec<String> = reps.concat();
        both.sort();
        let mut all = alls[pp].clone();
        all.sort();
        assert_eq!(both, all, "stage {pp}");
    }
    std::fs::remove_dir_all(&root).unwrap();
}
