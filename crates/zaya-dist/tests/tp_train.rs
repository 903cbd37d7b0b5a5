//! Training under tensor and expert parallelism on local ranks: the collectives' backward
//! passes against single-process gradients, and the loss and every gathered gradient of
//! TP / EP / TP × EP ranks against the single-rank trainable model.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use candle_core::{DType, Device, Tensor, Var};
use zaya::train::{
    labelled_outputs, Batch, Checkpointing, LossScale, TrainOptions, TrainableModel,
};
use zaya::weights::Checkpoint;
use zaya_dist::autograd::{shared, Coll, GatherBackward};
use zaya_dist::tp::first_of;
use zaya_dist::tp::train::{labelled_grads_on_local_ranks, TpTrainModel};
use zaya_dist::{Comm, LocalWorld, MeshShape, ParallelError, ParallelPlan};

const TIMEOUT: Duration = Duration::from_secs(120);

fn dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

#[derive(serde::Deserialize)]
struct BatchJson {
    input_ids: Vec<Vec<u32>>,
    labels: Vec<Vec<i64>>,
    attention_mask: Option<Vec<Vec<u32>>>,
}

fn batch(name: &str, which: &str) -> Batch {
    let text = std::fs::read_to_string(dir(name).join(format!("{which}.json"))).unwrap();
    let b: BatchJson = serde_json::from_str(&text).unwrap();
    Batch {
        input_ids: b.input_ids,
        labels: b.labels,
        attention_mask: b.attention_mask,
        document_ids: None,
    }
}

fn host(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// max |a − b| ≤ tol · max(max |b|, 1e-3), elementwise over two tensors of one shape.
#[track_caller]
fn assert_rel(what: &str, a: &Tensor, b: &Tensor, tol: f32) {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes");
    let (a, b) = (host(a), host(b));
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-3);
    let d = a
        .iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(
        d <= tol * scale,
        "{what}: max |Δ| = {d:.3e} > {tol} × {scale:.3e}"
    );
}

fn run_ranks<T: Send>(
    n: usize,
    f: impl Fn(&dyn Comm) -> Result<T, ParallelError> + Sync,
) -> Vec<T> {
    let world = LocalWorld::new(n, TIMEOUT).unwrap();
    world
        .run(|c| f(&c))
        .into_iter()
        .map(|r| r.unwrap_or_else(|e| panic!("{e:?}")))
        .collect()
}

fn t(v: Vec<f32>, shape: &[usize]) -> Tensor {
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Deterministic values.
fn vals(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (((i * 7 + seed * 13) % 17) as f32 - 8.0) / 8.0)
        .collect()
}

/// Column-parallel then row-parallel (Megatron's MLP): `f` before the column shards, `g`
/// after the row shards. Gradients of the input and every shard equal the single process's.
#[test]
fn copy_and_reduce_give_the_single_process_gradients() {
    let (rows, hin, hmid) = (3, 4, 8);
    let x = vals(rows * hin, 1);
    let w1 = vals(hmid * hin, 2); // [hmid, hin]
    let w2 = vals(hin * hmid, 3); // [hin, hmid]
    let c = vals(rows * hin, 4);
    // single process
    let xv = Var::from_tensor(&t(x.clone(), &[rows, hin])).unwrap();
    let w1v = Var::from_tensor(&t(w1.clone(), &[hmid, hin])).unwrap();
    let w2v = Var::from_tensor(&t(w2.clone(), &[hin, hmid])).unwrap();
    let y = xv
        .matmul(&w1v.t().unwrap())
        .unwrap()
        .tanh()
        .unwrap()
        .matmul(&w2v.t().unwrap())
        .unwrap();
    let gs = (y * t(c.clone(), &[rows, hin]))
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let gx = gs.get(&xv).unwrap().clone();
    let gw1 = gs.get(&w1v).unwrap().clone();
    let gw2 = gs.get(&w2v).unwrap().clone();
    for n in [2usize, 4] {
        let per = hmid / n;
        let outs = run_ranks(n, |comm| {
            let coll = Coll::Grad(shared(comm)?);
            let r = comm.rank();
            let xv = Var::from_tensor(&t(x.clone(), &[rows, hin]))?;
            let w1r = Var::from_tensor(&t(w1.clone(), &[hmid, hin]).narrow(0, r * per, per)?)?;
            let w2r = Var::from_tensor(&t(w2.clone(), &[hin, hmid]).narrow(1, r * per, per)?)?;
            let a = coll.copy(&xv)?;
            let partial = a
                .matmul(&w1r.t()?)?
                .tanh()?
                .matmul(&w2r.t()?.contiguous()?)?;
            let y = coll.reduce(&partial)?;
            let gs = (y * t(c.clone(), &[rows, hin]))?.sum_all()?.backward()?;
            Ok((
                gs.get(&xv).unwrap().clone(),
                gs.get(&w1r).unwrap().clone(),
                gs.get(&w2r).unwrap().clone(),
            ))
        });
        for (r, (gxr, gw1r, gw2r)) in outs.iter().enumerate() {
            assert_rel("x", gxr, &gx, 1e-5);
            assert_rel("w1", gw1r, &gw1.narrow(0, r * per, per).unwrap(), 1e-5);
            assert_rel("w2", gw2r, &gw2.narrow(1, r * per, per).unwrap(), 1e-5);
        }
    }
}

/// A sum used differently on each member (`reduce_both`), all-gather ↔ reduce-scatter and
/// the gather whose use is replicated: each member's input gradient is what one process
/// computes for `L = Σ_r <use_r(op(x_0 .. x_n)), c_r>`.
#[test]
fn reduce_both_gather_and_reduce_scatter_backward() {
    let n = 4usize;
    let k = 6usize; // values per member (2 rows of 3)
    let outs = run_ranks(n, |comm| {
        let coll = Coll::Grad(shared(comm)?);
        let r = comm.rank();
        let cr = |len: usize| t(vals(len, 10 + r), &[len / 3, 3]);
        // reduce_both: s = Σ x_r, L = Σ_r <s, c_r>  ⇒  dL/dx_r = Σ_r c_r
        let x = Var::from_tensor(&t(vals(k, r), &[2, 3]))?;
        let s = coll.reduce_both(&x)?;
        let g1 = (s * cr(k))?.sum_all()?.backward()?.get(&x).unwrap().clone();
        // all-gather, reduce-scatter backward: dL/dx_r = (Σ_r c_r)[rows of r]
        let y = coll.all_gather_rows(&x, GatherBackward::ReduceScatter)?;
        let g2 = (y * cr(n * k))?
            .sum_all()?
            .backward()?
            .get(&x)
            .unwrap()
            .clone();
        // all-gather used the same way everywhere (c = c_0): dL/dx_r = c_0[rows of r]
        let y = coll.all_gather_rows(&x, GatherBackward::OwnRows)?;
        let c0 = t(vals(n * k, 10), &[2 * n, 3]);
        let g3 = (y * c0)?.sum_all()?.backward()?.get(&x).unwrap().clone();
        // reduce-scatter: y_r = Σ_m x_m[rows of r], L = Σ_r <y_r, c_r> ⇒ dL/dx_m = cat_r c_r
        let xl = Var::from_tensor(&t(vals(n * k, 20 + r), &[2 * n, 3]))?;
        let y = coll.reduce_scatter_rows(&xl)?;
        let want_y: Vec<f32> = (0..k)
            .map(|i| (0..n).map(|m| vals(n * k, 20 + m)[r * k + i]).sum())
            .collect();
        assert_eq!(host(&y), want_y);
        let g4 = (y * cr(k))?
            .sum_all()?
            .backward()?
            .get(&xl)
            .unwrap()
            .clone();
        Ok((host(&g1), host(&g2), host(&g3), host(&g4)))
    });
    let sum_c = |len: usize| -> Vec<f32> {
        (0..len)
            .map(|i| (0..n).map(|r| vals(len, 10 + r)[i]).sum())
            .collect()
    };
    let all_c: Vec<f32> = (0..n).flat_map(|r| vals(k, 10 + r)).collect();
    for (r, (g1, g2, g3, g4)) in outs.iter().enumerate() {
        assert_eq!(g1, &sum_c(k), "reduce_both, rank {r}");
        assert_eq!(g2, &sum_c(n * k)[r * k..(r + 1) * k], "gather/rs, rank {r}");
        assert_eq!(
            g3,
            &vals(n * k, 10)[r * k..(r + 1) * k],
            "gather/own, rank {r}"
        );
        assert_eq!(g4, &all_c, "reduce-scatter/gather, rank {r}");
    }
}

/// All-to-all of rows with uneven (and empty) counts: the forward delivers every row, the
/// backward returns every row's gradient to where the row came from.
#[test]
fn all_to_all_backward_is_the_inverse_all_to_all() {
    let n = 3usize;
    // member r sends (r + d) % 3 rows to d (some empty)
    let counts = |r: usize| -> Vec<usize> { (0..n).map(|d| (r + d) % 3).collect() };
    let outs = run_ranks(n, |comm| {
        let coll = Coll::Grad(shared(comm)?);
        let r = comm.rank();
        let send = counts(r);
        let rows: usize = send.iter().sum();
        // row j of member r holds (100 r + j) in both columns
        let data: Vec<f32> = (0..rows).flat_map(|j| [(100 * r + j) as f32; 2]).collect();
        let x = Var::from_tensor(&t(data, &[rows, 2]))?;
        let (y, recv) = coll.all_to_all_rows(&x, &send)?;
        // the use: weight each received row by (its value + 1), column 0 only
        let yv = host(&y);
        let c: Vec<f32> = yv.chunks(2).flat_map(|row| [row[0] + 1.0, 0.0]).collect();
        let g = (y * t(c, &[yv.len() / 2, 2]))?
            .sum_all()?
            .backward()?
            .get(&x)
            .unwrap()
            .clone();
        Ok((recv, yv, host(&g), rows))
    });
    for (r, (recv, y, g, rows)) in outs.iter().enumerate() {
        let want_recv: Vec<usize> = (0..n).map(|s| counts(s)[r]).collect();
        assert_eq!(recv, &want_recv);
        // by source, in order: the rows source s sent to r
        let mut want_y = Vec::new();
        for s in 0..n {
            let first: usize = counts(s)[..r].iter().sum();
            for j in first..first + counts(s)[r] {
                want_y.extend([(100 * s + j) as f32; 2]);
            }
        }
        assert_eq!(y, &want_y);
        let want_g: Vec<f32> = (0..*rows)
            .flat_map(|j| [(100 * r + j) as f32 + 1.0, 0.0])
            .collect();
        assert_eq!(g, &want_g, "rank {r}");
    }
}

/// The single-rank outputs (`loss`, `aux_loss`, `grad.*`) of `which` on fixture `name`.
fn single(name: &str, which: &str, ckpt: Checkpointing) -> BTreeMap<String, Tensor> {
    let m = TrainableModel::load(dir(name)).unwrap();
    labelled_outputs(&m, &batch(name, which), true, ckpt).unwrap()
}

/// The same names, loss and balance loss within 1e-5 and every gradient within 1e-4
/// (relative) as one rank.
fn assert_same_outputs(
    label: &str,
    got: &BTreeMap<String, Tensor>,
    want: &BTreeMap<String, Tensor>,
) {
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "{label}: names"
    );
    assert_rel(&format!("{label} loss"), &got["loss"], &want["loss"], 1e-5);
    assert_rel(
        &format!("{label} aux"),
        &got["aux_loss"],
        &want["aux_loss"],
        1e-5,
    );
    for (k, w) in want {
        assert_rel(&format!("{label} {k}"), &got[k], w, 1e-4);
    }
}

fn check_grads(name: &str, which: &str, shape: MeshShape, ckpt: Checkpointing) {
    let want = single(name, which, ckpt);
    let got = labelled_grads_on_local_ranks(&dir(name), shape, &batch(name, which), ckpt, TIMEOUT)
        .unwrap_or_else(|e| panic!("{name} {which} {}: {e}", shape.label()));
    let label = format!("{name} {which} {}", shape.label());
    assert_same_outputs(&label, &got, &want);
    eprintln!(
        "{label}: loss and {} gradients equal one rank",
        want.len() - 2
    );
}

#[test]
fn tp_2_4_8_gradients_equal_one_rank() {
    // 8 query heads over 2 KV heads: tp 4 and 8 share each KV head between 2 and 4 ranks
    for tp in [2, 4, 8] {
        let shape = MeshShape::new(tp, 1, 1, 1).unwrap();
        check_grads("gqa_sliding", "train", shape, Checkpointing::Off);
    }
    // left padding (pad id 0 gets no lookup gradient) and per-layer checkpointing
    let shape = MeshShape::new(4, 1, 1, 1).unwrap();
    check_grads("gqa_sliding", "train_pad", shape, Checkpointing::EveryLayer);
}

#[test]
fn tp_gradients_on_the_other_fixtures() {
    // attention biases, an untied lm_head with a bias
    check_grads(
        "mha_bias",
        "train",
        MeshShape::new(2, 1, 1, 1).unwrap(),
        Checkpointing::Off,
    );
    check_grads(
        "mha_bias",
        "train_pad",
        MeshShape::new(4, 1, 1, 1).unwrap(),
        Checkpointing::Every(2),
    );
    // grouped kernel 3
    check_grads(
        "conv_k3",
        "train",
        MeshShape::new(2, 1, 1, 1).unwrap(),
        Checkpointing::EveryLayer,
    );
}

#[test]
fn ep_and_tp_by_ep_gradients_equal_one_rank() {
    for (tp, ep) in [(1, 2), (1, 4), (2, 2), (4, 2)] {
        let shape = MeshShape::new(tp, 1, ep, 1).unwrap();
        check_grads("gqa_sliding", "train", shape, Checkpointing::Off);
    }
    let shape = MeshShape::new(2, 1, 2, 1).unwrap();
    check_grads("gqa_sliding", "train_pad", shape, Checkpointing::EveryLayer);
}

/// With the router balance loss in the objective (coefficient 0.01): the TP × EP ranks'
/// loss, balance loss and gradients equal the single-rank `forward_backward`.
#[test]
fn balance_loss_gradients_equal_one_rank() {
    let name = "gqa_sliding";
    let b = batch(name, "train_pad");
    let opts = TrainOptions {
        aux_loss_coef: 0.01,
        checkpointing: Checkpointing::Every(2),
        ..Default::default()
    };
    let m = TrainableModel::load(dir(name)).unwrap();
    let want = m
        .forward_backward(&b, &opts, &LossScale::default())
        .unwrap();
    let want_grads = want.grads.named(m.params());
    let shape = MeshShape::new(2, 1, 2, 1).unwrap();
    let ckpt = Arc::new(Checkpoint::open(dir(name)).unwrap());
    let plan = ParallelPlan::new(&ckpt.config().unwrap(), shape).unwrap();
    let world = LocalWorld::new(shape.world(), TIMEOUT).unwrap();
    let (loss, aux, grads) = first_of(world.run(|comm| {
        let mesh = zaya_dist::Mesh::new(Box::new(comm), shape)?;
        let model = TpTrainModel::at(&ckpt, &plan, mesh.coords, mesh.groups())?;
        let r = model.forward_backward(&b, &opts, &LossScale::default())?;
        let full = model.gather(mesh.world.as_ref(), &r.grads)?;
        Ok((r.loss, r.aux_loss, full))
    }))
    .unwrap();
    assert!(
        (loss - want.loss).abs() <= 1e-5 * want.loss.abs(),
        "{loss} vs {}",
        want.loss
    );
    assert!(
        (aux - want.aux_loss).abs() <= 1e-6,
        "{aux} vs {}",
        want.aux_loss
    );
    let grads = grads.unwrap();
    for (k, w) in &want_grads {
        assert_rel(k, &grads[k], w, 1e-4);
    }
}

#[test]
fn training_meshes_that_cannot_run_fail_before_work() {
    let name = "gqa_sliding";
    let b = batch(name, "train");
    // 3 does not divide 8 query heads nor 4 experts, 4 stages do not divide 6 layers
    for (tp, pp, ep) in [(3, 1, 1), (1, 1, 3), (2, 4, 1)] {
        let shape = MeshShape::new(tp, pp, ep, 1).unwrap();
        let e = labelled_grads_on_local_ranks(&dir(name), shape, &b, Checkpointing::Off, TIMEOUT)
            .unwrap_err()
            .to_string();
        assert!(e.contains("divisible"), "{}: {e}", shape.label());
    }
}

/// `Trainer` on TP (and TP × EP) ranks, one trainer per rank: with gradient clipping (the
/// norm over the mesh), bias balancing, checkpointing and gradient accumulation, every
/// step's loss and gradient norm and the final weights equal the single-process trainer's.
#[test]
fn trainer_on_tp_ranks_reproduces_the_single_process_steps() {
    use zaya::train::trainer::{Trainer, TrainerConfig};
    use zaya::train::Trainable;
    let name = "gqa_sliding";
    let steps: Vec<Vec<Batch>> = vec![
        vec![batch(name, "train")],
        vec![batch(name, "train_pad"), batch(name, "train")],
        vec![batch(name, "train_pad")],
        vec![batch(name, "train")],
    ];
    fn config<M: Trainable>(m: &M) -> TrainerConfig {
        let mut c = TrainerConfig::new(m, 2e-2);
        c.max_grad_norm = Some(0.5);
        c.balance_bias_lr = 1e-2;
        c.aux_loss_coef = 0.01;
        c.checkpointing = Checkpointing::Every(2);
        // AdamW divides by the gradient's running RMS: with torch's eps (1e-8) an element
        // whose gradient is rounding noise moves by ±lr, so sharded and single-process
        // weights drift apart by far more than their gradients differ (measured: 5e-3 after
        // four steps, with losses still equal to 1e-6). An eps well above the gradients'
        // rounding differences keeps the update proportional to them: the weights stay
        // comparable at 1e-4, and a slice left out or updated twice would still show.
        c.adamw.eps = 0.1;
        c
    }
    let model = TrainableModel::load(dir(name)).unwrap();
    let cfg = config(&model);
    let mut single = Trainer::new(model, cfg).unwrap();
    let want: Vec<(f64, f64)> = steps
        .iter()
        .map(|mb| {
            let r = single.step(mb).unwrap();
            (r.total_loss, r.grad_norm)
        })
        .collect();
    let want_weights = single.model().tensors().unwrap();
    let ckpt = Arc::new(Checkpoint::open(dir(name)).unwrap());
    for (tp, ep) in [(4, 1), (2, 2)] {
        let shape = MeshShape::new(tp, 1, ep, 1).unwrap();
        let plan = ParallelPlan::new(&ckpt.config().unwrap(), shape).unwrap();
        let world = LocalWorld::new(shape.world(), TIMEOUT).unwrap();
        let (got, weights) = first_of(world.run(|comm| {
            let mesh = zaya_dist::Mesh::new(Box::new(comm), shape)?;
            let model = TpTrainModel::on_mesh(&ckpt, &plan, &mesh)?;
            let cfg = config(&model);
            let mut trainer = Trainer::new(model, cfg)?;
            let mut got = Vec::new();
            for mb in &steps {
                let r = trainer.step(mb)?;
                got.push((r.total_loss, r.grad_norm));
            }
            Ok((got, trainer.model().gather_weights()?))
        }))
        .unwrap();
        for (s, ((l, n), (wl, wn))) in got.iter().zip(&want).enumerate() {
            eprintln!(
                "{} step {s}: loss {l} vs {wl}, norm {n} vs {wn}",
                shape.label()
            );
            assert!(
                (l - wl).abs() <= 1e-5 * wl.abs(),
                "{} step {s}: loss {l} vs {wl}",
                shape.label()
            );
            assert!(
                (n - wn).abs() <= 1e-4 * wn.abs(),
                "{} step {s}: norm {n} vs {wn}",
                shape.label()
            );
        }
        let weights = weights.unwrap();
        assert_eq!(weights.len(), want_weights.len());
        for (k, w) in &want_weights {
            assert_rel(&format!("{} {k}", shape.label()), &weights[k], w, 1e-4);
        }
    }
}

/// The stage API a pipeline schedule drives: TP 2 × PP 2, stage 0 embeds and runs its
/// layers, hands (hidden, router state) to stage 1, which runs the rest, the vocab-parallel
/// head and the backward, and hands the boundary's gradients back. Loss and every gathered
/// gradient (the tied embedding's lookup and head parts summed) equal one rank.
#[test]
fn tp_stages_of_a_pipeline_equal_one_rank() {
    use candle_core::backprop::GradStore;
    use zaya_dist::tp::train::{TpStageInput, TpStageUpstream};
    let name = "gqa_sliding";
    let which = "train_pad";
    let want = single(name, which, Checkpointing::Off);
    let b = batch(name, which);
    let shape = MeshShape::new(2, 2, 1, 1).unwrap();
    let ckpt = Arc::new(Checkpoint::open(dir(name)).unwrap());
    let cfg = ckpt.config().unwrap();
    let plan = ParallelPlan::new(&cfg, shape).unwrap();
    let world = LocalWorld::new(shape.world(), TIMEOUT).unwrap();
    let (bs, ts) = (b.input_ids.len(), b.input_ids[0].len());
    let (hd, rd) = (cfg.hidden_size, cfg.router_hidden_size);
    let (loss, grads) = first_of(world.run(|comm| {
        let mesh = zaya_dist::Mesh::new(Box::new(comm), shape)?;
        let model = TpTrainModel::at(&ckpt, &plan, mesh.coords, mesh.groups())?;
        let opts = TrainOptions {
            aux_loss_coef: 0.0,
            checkpointing: Checkpointing::EveryLayer,
            ..Default::default()
        };
        let sb = model.stage_batch(&b, &opts, &LossScale::default())?;
        let n = sb.targets().len() as f64;
        let pp = mesh.pp.as_ref();
        let (grads, loss) = if mesh.coords.pp == 0 {
            let fwd = sb.forward(TpStageInput::Embed, opts.checkpointing)?;
            let (h, s) = fwd.output();
            pp.send(1, 1, &host(&h))?;
            pp.send(1, 2, &host(s.as_ref().unwrap()))?;
            let gh = t(pp.recv(1, 3)?, &[bs, ts, hd]);
            let gs = t(pp.recv(1, 4)?, &[bs, ts, rd]);
            let up = TpStageUpstream::Boundary {
                hidden: gh,
                state: Some(gs),
            };
            (sb.backward(fwd, up, GradStore::default())?.0, 0.0)
        } else {
            let input = TpStageInput::Boundary {
                hidden: t(pp.recv(0, 1)?, &[bs, ts, hd]),
                state: Some(t(pp.recv(0, 2)?, &[bs, ts, rd])),
            };
            let fwd = sb.forward(input, opts.checkpointing)?;
            let head = sb.head(&fwd, n, opts.loss_chunk)?;
            let nll = head.nll_sum;
            let (g, up) =
                sb.backward(fwd, TpStageUpstream::Normed(head.grad_hidden), head.grads)?;
            let (gh, gs) = up.unwrap();
            pp.send(0, 3, &host(&gh))?;
            pp.send(0, 4, &host(&gs.unwrap()))?;
            (g, nll / n)
        };
        let mut l = [loss as f32];
        pp.broadcast(1, &mut l)?;
        Ok((l[0], model.gather(mesh.world.as_ref(), &grads)?))
    }))
    .unwrap();
    assert_rel(
        "loss",
        &Tensor::new(&[loss], &Device::Cpu).unwrap(),
        &want["loss"],
        1e-5,
    );
    let grads = grads.unwrap();
    for (k, w) in &want {
        if let Some(name) = k.strip_prefix("grad.") {
            assert_rel(k, &grads[name], w, 1e-4);
        }
    }
}

/// `zaya train --tp 2 --pp 2 --dp 2` resuming a single-process checkpoint, rank by rank:
/// every rank reads from the weights exactly the bytes of the slices its plan gives it
/// (never the whole model) and from `optimizer.safetensors` exactly the moments and step
/// counts of the slices it keeps (ZeRO-1: the two replicas keep disjoint shares covering
/// every slice once); the resumed steps (1F1B over the TP stages, the tied embedding summed
/// between the first and last stage, clipping, bias balancing) give the single-process
/// losses and norms.
#[test]
fn tp_pp_dp_ranks_read_only_their_slices_and_resume_the_single_process_steps() {
    use zaya::train::trainer::{Trainer, TrainerConfig};
    use zaya_dist::tp_driver::{RunState, TpParallelTrainer};
    use zaya_dist::DriverOptions;
    let name = "gqa_sliding";
    let steps: Vec<Vec<Batch>> = vec![
        vec![batch(name, "train"), batch(name, "train_pad")],
        vec![batch(name, "train_pad"), batch(name, "train")],
        vec![batch(name, "train"), batch(name, "train")],
    ];
    let model = TrainableModel::load(dir(name)).unwrap();
    let mut cfg = TrainerConfig::new(&model, 2e-2);
    cfg.max_grad_norm = Some(0.5);
    cfg.balance_bias_lr = 1e-2;
    cfg.aux_loss_coef = 0.01;
    cfg.checkpointing = Checkpointing::EveryLayer;
    cfg.adamw.eps = 0.1; // see trainer_on_tp_ranks_reproduces_the_single_process_steps
    let mut single = Trainer::new(model, cfg.clone()).unwrap();
    single.step(&steps[0]).unwrap();
    let root = std::env::temp_dir().join(format!("zaya-tp-slices-{}", std::process::id()));
    let ck = single.save(&root).unwrap();
    let want: Vec<(f64, f64)> = steps[1..]
        .iter()
        .map(|mb| {
            let r = single.step(mb).unwrap();
            (r.total_loss, r.grad_norm)
        })
        .collect();

    let shape = MeshShape::new(2, 2, 1, 2).unwrap();
    let mcfg = Checkpoint::open(&ck).unwrap().config().unwrap();
    let plan = ParallelPlan::new(&mcfg, shape).unwrap();
    let specs = zaya::weights::native_specs(&mcfg);
    let whole: usize = specs
        .iter()
        .map(|s| s.shape.iter().product::<usize>())
        .sum();
    let world = LocalWorld::new(shape.world(), TIMEOUT).unwrap();
    let outs = world.run(|comm| -> Result<_, ParallelError> {
        let mesh = zaya_dist::Mesh::new(Box::new(comm), shape)?;
        let c = mesh.coords;
        let weights = Arc::new(Checkpoint::open(&ck)?);
        let state = Checkpoint::open_file(ck.join("optimizer.safetensors"))?;
        let at = RunState {
            cfg: cfg.clone(),
            step: 1,
            run: None,
        };
        let mut t =
            TpParallelTrainer::open(mesh, &weights, Some(&state), at, DriverOptions::default())?;
        let read = (weights.bytes_read(), state.bytes_read());
        let params = t.model().params();
        let owned: Vec<(String, usize)> = t
            .owned()
            .iter()
            .map(|&k| {
                let p = &params[k].param;
                (p.name.clone(), p.var.elem_count())
            })
            .collect();
        let all: Vec<String> = params.iter().map(|p| p.param.name.clone()).collect();
        let mut got = Vec::new();
        for mb in &steps[1..] {
            let r = t.step(mb)?;
            got.push((r.total_loss, r.grad_norm));
        }
        Ok((c, read, owned, all, got))
    });
    let mut shares: BTreeMap<(usize, usize), Vec<Vec<String>>> = BTreeMap::new();
    let mut alls: BTreeMap<(usize, usize), Vec<String>> = BTreeMap::new();
    for out in outs {
        let (c, (w_read, s_read), owned, all, got) = out.unwrap_or_else(|e| panic!("{e:?}"));
        // the weights: the rank's selections of the tensors its stage holds, f32
        let share: usize = specs
            .iter()
            .filter(|s| plan.holds(c, &s.name))
            .map(|s| {
                plan.selection(c, s)
                    .shape(&s.shape)
                    .iter()
                    .product::<usize>()
            })
            .sum();
        assert_eq!(w_read, 4 * share as u64, "{c:?}: weight bytes read");
        assert!(
            2 * share < whole,
            "{c:?}: a share of {share} of {whole} elements"
        );
        // the optimizer: exp_avg and exp_avg_sq (f32) and step (i64) of the kept slices
        let kept: usize = owned.iter().map(|(_, n)| n).sum();
        assert_eq!(
            s_read,
            (8 * kept + 8 * owned.len()) as u64,
            "{c:?}: optimizer bytes read"
        );
        shares
            .entry((c.tp, c.pp))
            .or_default()
            .push(owned.into_iter().map(|(n, _)| n).collect());
        alls.insert((c.tp, c.pp), all);
        for (s, ((l, n), (wl, wn))) in got.iter().zip(&want).enumerate() {
            assert!(
                (l - wl).abs() <= 1e-5 * wl.abs(),
                "{c:?} step {s}: loss {l} vs {wl}"
            );
            assert!(
                (n - wn).abs() <= 1e-4 * wn.abs(),
                "{c:?} step {s}: norm {n} vs {wn}"
            );
        }
    }
    // ZeRO-1: the replicas of a mesh position keep disjoint shares covering every slice
    for (pos, reps) in &shares {
        assert_eq!(reps.len(), 2, "{pos:?}");
        assert!(reps.iter().all(|r| !r.is_empty()), "{pos:?}: {reps:?}");
        let mut both: Vec<String> = reps.concat();
        both.sort();
        let mut all = alls[pos].clone();
        all.sort();
        assert_eq!(both, all, "{pos:?}");
    }
    std::fs::remove_dir_all(&root).unwrap();
}

/// The training driver's gradients (1F1B over TP stages, shared KV heads completed, the
/// tied embedding's halves summed between the first and last stage) gathered to full
/// tensors: loss and every gradient equal one rank on the parity fixture under TP × PP,
/// with per-layer gradient checkpointing, left padding and KV heads shared by TP ranks.
#[test]
fn tp_pp_driver_gradients_equal_one_rank() {
    use zaya::train::trainer::TrainerConfig;
    use zaya_dist::tp_driver::{RunState, TpParallelTrainer};
    use zaya_dist::DriverOptions;
    let name = "gqa_sliding";
    let which = "train_pad";
    let b = batch(name, which);
    let ckpt = Arc::new(Checkpoint::open(dir(name)).unwrap());
    let mcfg = ckpt.config().unwrap();
    for (tp, pp, cp) in [
        (2, 2, Checkpointing::EveryLayer),
        (2, 3, Checkpointing::Off),
        (4, 2, Checkpointing::Every(2)),
    ] {
        let want = single(name, which, cp);
        let shape = MeshShape::new(tp, pp, 1, 1).unwrap();
        let label = format!("{which} {}", shape.label());
        let world = LocalWorld::new(shape.world(), TIMEOUT).unwrap();
        let got = first_of(world.run(|comm| {
            let mesh = zaya_dist::Mesh::new(Box::new(comm), shape)?;
            let at = RunState {
                cfg: TrainerConfig::for_config(&mcfg, 1e-3),
                step: 0,
                run: None,
            };
            let t = TpParallelTrainer::open(mesh, &ckpt, None, at, DriverOptions::default())?;
            let opts = TrainOptions {
                checkpointing: cp,
                aux_loss_coef: 0.0,
                ..Default::default()
            };
            t.gathered_gradients(std::slice::from_ref(&b), &opts)
        }))
        .unwrap()
        .unwrap();
        assert_same_outputs(&label, &got, &want);
    }
}

/// `TpParallelTrainer::save` under `--tp 2 --pp 2 --dp 2` (ZeRO-1) streams the checkpoint
/// to rank 0 in chunks of rows (512 bytes here), each assembled from its slices: the files
/// are byte for byte what the single-process writers make of the same tensors gathered in
/// memory.
#[test]
fn tp_pp_dp_streamed_checkpoint_equals_the_in_memory_gather_byte_for_byte() {
    use zaya::train::optim::AdamW;
    use zaya::train::trainer::TrainerConfig;
    use zaya::train::Trainable;
    use zaya_dist::tp_driver::{RunState, TpParallelTrainer};
    use zaya_dist::DriverOptions;
    let name = "gqa_sliding";
    let model = TrainableModel::load(dir(name)).unwrap();
    let mut cfg = TrainerConfig::new(&model, 2e-2);
    cfg.balance_bias_lr = 1e-2;
    drop(model);
    let root = std::env::temp_dir().join(format!("zaya-tp-stream-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let shape = MeshShape::new(2, 2, 1, 2).unwrap();
    let world = LocalWorld::new(shape.world(), TIMEOUT).unwrap();
    let outs = world.run(|comm| -> Result<_, ParallelError> {
        let mesh = zaya_dist::Mesh::new(Box::new(comm), shape)?;
        let weights = Arc::new(Checkpoint::open(dir(name))?);
        let at = RunState {
            cfg: cfg.clone(),
            step: 0,
            run: None,
        };
        // 512-byte chunks: most tensors cross several, each assembled from several ranks
        let opts = DriverOptions {
            gather_bytes: 512,
            ..DriverOptions::default()
        };
        let mut t = TpParallelTrainer::open(mesh, &weights, None, at, opts)?;
        t.step(&[batch(name, "train"), batch(name, "train_pad")])?;
        let saved = t.save(&root)?;
        let w = t.model().gather_weights()?;
        let o = t.gather_optimizer()?;
        if let (Some(saved), Some(w), Some(o)) = (saved, w, o) {
            let mem = root.join("in-memory");
            zaya::weights::save_checkpoint(
                &mem,
                t.model().config(),
                &w,
                zaya::weights::Layout::Native,
            )?;
            AdamW::save_state(&o, &mem.join("optimizer.safetensors"))?;
            return Ok(Some(saved));
        }
        Ok(None)
    });
    let mut saved = None;
    for o in outs {
        if let Some(s) = o.unwrap_or_else(|e| panic!("{e:?}")) {
            saved = Some(s);
        }
    }
    let saved = saved.expect("rank 0 saved");
    for f in ["model.safetensors", "config.json", "optimizer.safetensors"] {
        let a = std::fs::read(saved.join(f)).unwrap();
        let b = std::fs::read(root.join("in-memory").join(f)).unwrap();
        assert!(
            a == b,
            "{f}: the streamed checkpoint differs from the in-memory gather"
        );
    }
    std::fs::remove_dir_all(&root).unwrap();
}

/// Packed rows: the left-padded batch with every row split into three documents (the
/// padding inside the first). Loss and every gradient on TP, EP and TP × EP ranks equal one
/// rank's, which runs each document as a separate sequence (block-diagonal attention, no
/// CCA convolution or delayed value across a boundary).
#[test]
fn packed_documents_gradients_equal_one_rank() {
    let name = "gqa_sliding";
    let mut b = batch(name, "train_pad");
    let docs: Vec<Vec<u32>> = b
        .input_ids
        .iter()
        .map(|r| {
            let n = r.len();
            (0..n).map(|i| (3 * i / n) as u32).collect()
        })
        .collect();
    assert!(docs.iter().all(|r| r.first() != r.last()));
    b.document_ids = Some(docs);
    let m = TrainableModel::load(dir(name)).unwrap();
    let want = labelled_outputs(&m, &b, true, Checkpointing::Off).unwrap();
    // the documents change the single-rank result, so the comparison can fail
    let plain = labelled_outputs(&m, &batch(name, "train_pad"), true, Checkpointing::Off).unwrap();
    assert!(host(&(&want["loss"] - &plain["loss"]).unwrap().abs().unwrap())[0] > 1e-6);
    for (tp, ep) in [(2, 1), (1, 2), (2, 2)] {
        let shape = MeshShape::new(tp, 1, ep, 1).unwrap();
        let got = labelled_grads_on_local_ranks(&dir(name), shape, &b, Checkpointing::Off, TIMEOUT)
            .unwrap_or_else(|e| panic!("packed {}: {e}", shape.label()));
        assert_same_outputs(&format!("packed {}", shape.label()), &got, &want);
    }
    // TP × PP (2 × 2) through the driver: each pipeline stage builds the same document masks
    {
        use zaya::train::trainer::TrainerConfig;
        use zaya_dist::tp_driver::{RunState, TpParallelTrainer};
        use zaya_dist::DriverOptions;
        let ckpt = Arc::new(Checkpoint::open(dir(name)).unwrap());
        let mcfg = ckpt.config().unwrap();
        let shape = MeshShape::new(2, 2, 1, 1).unwrap();
        let world = LocalWorld::new(shape.world(), TIMEOUT).unwrap();
        let got = first_of(world.run(|comm| {
            let mesh = zaya_dist::Mesh::new(Box::new(comm), shape)?;
            let at = RunState {
                cfg: TrainerConfig::for_config(&mcfg, 1e-3),
                step: 0,
                run: None,
            };
            let t = TpParallelTrainer::open(mesh, &ckpt, None, at, DriverOptions::default())?;
            let opts = TrainOptions {
                checkpointing: Checkpointing::Off,
                aux_loss_coef: 0.0,
                ..Default::default()
            };
            t.gathered_gradients(std::slice::from_ref(&b), &opts)
        }))
        .unwrap()
        .unwrap();
        assert_same_outputs(&format!("packed {}", shape.label()), &got, &want);
    }
}
