//! `zaya train --pp N --dp N` and `zaya train --tp N --pp N --ep N --dp N` (local ranks, and MPI
//! processes when built with `--features mpi`) against the single-process run: the same
//! losses step by step, the same weights, checkpoints that resume across layouts; bad setups
//! refused before work; `zaya forward --pp N --grads` against one rank.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Device, Tensor};

fn zaya() -> Command {
    Command::new(env!("CARGO_BIN_EXE_zaya"))
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

mod scratch;
use scratch::scratch as tmp;

/// Six pre-tokenized examples (the fixture's training rows).
fn data(dir: &Path) -> PathBuf {
    let train: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("gqa_sliding").join("train.json")).unwrap(),
    )
    .unwrap();
    let mut text = String::new();
    for k in 0..6 {
        let ids = &train["input_ids"][k % 2];
        text.push_str(&serde_json::json!({ "input_ids": ids }).to_string());
        text.push('\n');
    }
    let p = dir.join("data.jsonl");
    std::fs::write(&p, text).unwrap();
    p
}

/// `zaya [prefix] train ... [extra]` into `out`; (success, stderr).
fn train(prefix: &[&str], data: &Path, out: &Path, extra: &[&str]) -> (bool, String) {
    let mut cmd = zaya();
    cmd.args(prefix)
        .args(["train", "--model"])
        .arg(fixture("gqa_sliding"))
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(out)
        .args([
            "--seq-len",
            "12",
            "--batch-size",
            "1",
            "--grad-accum",
            "2",
            "--epochs",
            "2",
            "--save-every",
            "2",
            "--lr",
            "1e-2",
            "--aux-loss-coef",
            "0.01",
            "--balance-bias-lr",
            "0.001",
            "--checkpointing",
            "every",
            "--no-progress",
        ])
        .args(extra)
        .args(if prefix.contains(&"mpi") {
            mpi_collectives()
        } else {
            Vec::new()
        })
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_rmaps_base_oversubscribe", "1");
    let o = cmd.output().unwrap();
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

/// `--collectives nccl` for the MPI runs when `ZAYA_TEST_COLLECTIVES=nccl`
/// (`scripts/gpu_check.sh` runs these tests so on a GPU machine).
fn mpi_collectives() -> Vec<String> {
    match std::env::var("ZAYA_TEST_COLLECTIVES") {
        Ok(engine) => vec!["--collectives".into(), engine],
        Err(_) => Vec::new(),
    }
}

/// (step, loss, aux_loss, grad_norm) per row of loss.csv.
fn losses(out: &Path) -> Vec<(u64, f64, f64, f64)> {
    std::fs::read_to_string(out.join("loss.csv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (
                f[0].parse().unwrap(),
                f[2].parse().unwrap(),
                f[3].parse().unwrap(),
                f[5].parse().unwrap(),
            )
        })
        .collect()
}

fn assert_same_losses(got: &[(u64, f64, f64, f64)], want: &[(u64, f64, f64, f64)]) {
    assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g.0, w.0);
        assert!((g.1 - w.1).abs() <= 1e-5 * w.1.abs(), "loss {g:?} vs {w:?}");
        assert!((g.2 - w.2).abs() <= 1e-5 * w.2.abs(), "aux {g:?} vs {w:?}");
        assert!((g.3 - w.3).abs() <= 1e-4 * w.3.abs(), "norm {g:?} vs {w:?}");
    }
}

fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let x = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let y = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let scale = y.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    x.iter()
        .zip(&y)
        .fold(0f32, |m, (p, q)| m.max((p - q).abs()))
        / scale
}

fn weights(dir: &Path) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap()
}

fn assert_close_weights(got: &Path, want: &Path) {
    let (g, w) = (weights(got), weights(want));
    assert_eq!(g.len(), w.len());
    for (k, t) in &w {
        let d = max_rel_diff(&g[k], t);
        assert!(d <= 1e-3, "{k}: relative difference {d}");
    }
}

/// Copies checkpoint `step` of `from` into a new run directory `to` (an "interrupted" run).
fn interrupted_copy(from: &Path, to: &Path, step: u64) {
    let name = format!("step-{step:08}");
    std::fs::create_dir_all(to.join(&name)).unwrap();
    for f in std::fs::read_dir(from.join(&name)).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), to.join(&name).join(f.file_name())).unwrap();
    }
    std::fs::write(to.join("latest"), &name).unwrap();
    let log = std::fs::read_to_string(from.join("loss.csv")).unwrap();
    let head: Vec<&str> = log.lines().take(1 + step as usize).collect();
    std::fs::write(to.join("loss.csv"), head.join("\n") + "\n").unwrap();
}

#[test]
fn pp2_dp2_local_ranks_reproduce_the_single_process_run_and_resume_across_layouts() {
    let (_guard, d) = tmp("local");
    let data = data(&d);
    let (ok, err) = train(&[], &data, &d.join("single"), &[]);
    assert!(ok, "{err}");
    let want = losses(&d.join("single"));
    assert!(want.len() >= 3, "{want:?}");

    let (ok, err) = train(&[], &data, &d.join("pp2dp2"), &["--pp", "2", "--dp", "2"]);
    assert!(ok, "{err}");
    assert!(err.contains("ZeRO-1"), "{err}");
    assert_same_losses(&losses(&d.join("pp2dp2")), &want);
    assert_close_weights(&d.join("pp2dp2/final"), &d.join("single/final"));
    let last = want.last().unwrap().0;
    for f in ["loss.svg", "final/config.json", "latest"] {
        assert!(d.join("pp2dp2").join(f).exists(), "{f} missing");
    }
    assert!(d
        .join(format!("pp2dp2/step-{last:08}/optimizer.safetensors"))
        .exists());

    // a single-process checkpoint resumed on pipeline stages
    interrupted_copy(&d.join("single"), &d.join("resume_pp"), 2);
    let (ok, err) = train(&[], &data, &d.join("resume_pp"), &["--pp", "3", "--resume"]);
    assert!(ok, "{err}");
    assert_same_losses(&losses(&d.join("resume_pp")), &want);

    // a parallel checkpoint resumed on one rank
    interrupted_copy(&d.join("pp2dp2"), &d.join("resume_single"), 2);
    let (ok, err) = train(&[], &data, &d.join("resume_single"), &["--resume"]);
    assert!(ok, "{err}");
    assert_same_losses(&losses(&d.join("resume_single")), &want);
}

/// AdamW's epsilon for comparing tensor-parallel runs with one process: TP sums the same
/// products in another order, and at torch's 1e-8 an element whose gradient is rounding
/// noise moves by ±lr (the weights drift by 1e-3 while the gradients agree to 1e-6).
const TP_EPS: &[&str] = &["--adam-eps", "0.1"];

fn with_eps<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    TP_EPS
        .iter()
        .copied()
        .chain(extra.iter().copied())
        .collect()
}

#[test]
fn tp_ep_dp_local_ranks_reproduce_the_single_process_run_and_resume_across_layouts() {
    let (_guard, d) = tmp("tp");
    let data = data(&d);
    let (ok, err) = train(&[], &data, &d.join("single"), TP_EPS);
    assert!(ok, "{err}");
    let want = losses(&d.join("single"));
    assert!(want.len() >= 3, "{want:?}");
    let last = want.last().unwrap().0;
    for (tag, extra) in [
        ("tp2", &["--tp", "2"][..]),
        ("tp2dp2", &["--tp", "2", "--dp", "2"][..]),
        ("tp2ep2", &["--tp", "2", "--ep", "2"][..]),
        ("tp2pp2", &["--tp", "2", "--pp", "2"][..]),
        ("tp2ep2dp2", &["--tp", "2", "--ep", "2", "--dp", "2"][..]),
        (
            "tp2pp2dp2-nozero",
            &["--tp", "2", "--pp", "2", "--dp", "2", "--no-zero"][..],
        ),
    ] {
        let (ok, err) = train(&[], &data, &d.join(tag), &with_eps(extra));
        assert!(ok, "{tag}: {err}");
        assert!(err.contains("tensor-parallel"), "{tag}: {err}");
        // ZeRO-1 (the default) shards the moments over the replicas
        let zero = extra.contains(&"--dp") && !extra.contains(&"--no-zero");
        assert_eq!(err.contains("ZeRO-1"), zero, "{tag}: {err}");
        assert_same_losses(&losses(&d.join(tag)), &want);
        assert_close_weights(&d.join(tag).join("final"), &d.join("single/final"));
        for f in ["loss.svg", "final/config.json", "latest"] {
            assert!(d.join(tag).join(f).exists(), "{tag}: {f} missing");
        }
        // the single-process checkpoint: every tensor under its HF name, the AdamW state
        let ck = format!("step-{last:08}");
        assert_close_weights(&d.join(tag).join(&ck), &d.join("single").join(&ck));
        let opt = |dir: &Path| {
            candle_core::safetensors::load(
                dir.join(&ck).join("optimizer.safetensors"),
                &Device::Cpu,
            )
            .unwrap()
        };
        let (g, w) = (opt(&d.join(tag)), opt(&d.join("single")));
        assert_eq!(g.len(), w.len(), "{tag}");
        for (k, t) in &w {
            if k.starts_with("step.") {
                let s = |t: &Tensor| t.to_vec1::<i64>().unwrap();
                assert_eq!(s(&g[k]), s(t), "{tag} {k}");
            } else {
                let diff = max_rel_diff(&g[k], t);
                assert!(diff <= 1e-3, "{tag} {k}: relative difference {diff}");
            }
        }
    }

    // a single-process checkpoint resumed on TP × EP ranks
    interrupted_copy(&d.join("single"), &d.join("resume_tp"), 2);
    let (ok, err) = train(
        &[],
        &data,
        &d.join("resume_tp"),
        &with_eps(&["--tp", "2", "--ep", "2", "--resume"]),
    );
    assert!(ok, "{err}");
    assert_same_losses(&losses(&d.join("resume_tp")), &want);

    // a single-process checkpoint resumed on TP × PP ranks (each reads its slices of the
    // weights and of the AdamW state)
    interrupted_copy(&d.join("single"), &d.join("resume_tp_pp"), 2);
    let (ok, err) = train(
        &[],
        &data,
        &d.join("resume_tp_pp"),
        &with_eps(&["--tp", "2", "--pp", "3", "--resume"]),
    );
    assert!(ok, "{err}");
    assert_same_losses(&losses(&d.join("resume_tp_pp")), &want);

    // TP × DP (ZeRO-1) and TP × PP checkpoints resumed on one rank
    for tag in ["tp2dp2", "tp2pp2"] {
        let out = d.join(format!("resume_single_{tag}"));
        interrupted_copy(&d.join(tag), &out, 2);
        let (ok, err) = train(&[], &data, &out, &with_eps(&["--resume"]));
        assert!(ok, "{tag}: {err}");
        assert_same_losses(&losses(&out), &want);
    }
}

#[test]
fn bad_parallel_setups_are_refused_before_work() {
    let (_guard, d) = tmp("bad");
    let data = data(&d);
    for (extra, want) in [
        (&["--pp", "4"][..], "6 decoder layers do not divide into 4"),
        (&["--dp", "3"][..], "--grad-accum 2 < --dp 3"),
        (
            &["--tp", "2", "--pp", "4"][..],
            "num_hidden_layers = 6 is not divisible by --pp 4",
        ),
        (&["--tp", "3"][..], "not divisible by --tp 3"),
        (&["--tp", "2", "--dp", "3"][..], "--grad-accum 2 < --dp 3"),
        (
            &["--pp", "2", "--lora", "r=2"][..],
            "--lora trains on one rank",
        ),
    ] {
        let (ok, err) = train(&[], &data, &d.join("out"), extra);
        assert!(!ok && err.contains(want), "{extra:?}: {err}");
        assert!(!d.join("out/loss.csv").exists(), "{extra:?} started work");
    }
    // the launcher checks the rank count against the mesh
    let (ok, err) = train(
        &["launch", "--nproc", "3", "--"],
        &data,
        &d.join("out"),
        &["--pp", "2", "--dp", "2"],
    );
    assert!(!ok && err.contains("--nproc 3"), "{err}");
}

#[test]
fn forward_pp_grads_equal_one_rank() {
    let (_guard, d) = tmp("grads");
    let m = fixture("gqa_sliding");
    let run = |extra: &[&str], out: &Path| {
        let o = zaya()
            .args(["forward", "--model"])
            .arg(&m)
            .arg("--inputs")
            .arg(m.join("train_pad.json"))
            .arg("--out")
            .arg(out)
            .arg("--grads")
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        candle_core::safetensors::load(out, &Device::Cpu).unwrap()
    };
    let one = run(&[], &d.join("one.safetensors"));
    for extra in [&["--pp", "2"][..], &["--pp", "3", "--checkpointing"][..]] {
        let pp = run(extra, &d.join("pp.safetensors"));
        assert_eq!(pp.len(), one.len(), "{extra:?}: {:?}", pp.keys());
        for (k, t) in &one {
            let tol = if k.starts_with("grad.") { 1e-4 } else { 1e-5 };
            let diff = max_rel_diff(&pp[k], t);
            assert!(diff <= tol, "{extra:?} {k}: relative difference {diff}");
        }
    }
}

/// `zaya launch --nproc 4 --backend mpi -- zaya train --pp 2 --dp 2` (= `mpirun -n 4`): four
/// processes reproduce the single-process losses step by step; rank 0 alone writes.
#[cfg(feature = "mpi")]
#[test]
fn pp2_dp2_mpi_processes_reproduce_the_single_process_run() {
    let (_guard, d) = tmp("mpi");
    let data = data(&d);
    let (ok, err) = train(&[], &data, &d.join("single"), &[]);
    assert!(ok, "{err}");
    let (ok, err) = train(
        &["launch", "--nproc", "4", "--backend", "mpi", "--"],
        &data,
        &d.join("mpi"),
        &["--pp", "2", "--dp", "2"],
    );
    assert!(ok, "{err}");
    assert_same_losses(&losses(&d.join("mpi")), &losses(&d.join("single")));
    assert_close_weights(&d.join("mpi/final"), &d.join("single/final"));
    // a world that is not the mesh is refused by every process
    let mut cmd = Command::new("mpirun");
    cmd.args(["-n", "2", "--oversubscribe"])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .arg(env!("CARGO_BIN_EXE_zaya"))
        .args(["train", "--model"])
        .arg(fixture("gqa_sliding"))
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(d.join("bad"))
        .args([
            "--pp",
            "2",
            "--dp",
            "2",
            "--grad-accum",
            "2",
            "--no-progress",
        ]);
    let o = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && text.contains("2 processes were started"),
        "{text}"
    );
}

/// `zaya launch --nproc 2 --backend mpi -- zaya train --tp 2` (= `mpirun -n 2`): two
/// processes reproduce the single-process losses; rank 0 writes the single-process
/// checkpoint.
#[cfg(feature = "mpi")]
#[test]
fn tp2_mpi_processes_reproduce_the_single_process_run() {
    let (_guard, d) = tmp("mpi-tp");
    let data = data(&d);
    let (ok, err) = train(&[], &data, &d.join("single"), TP_EPS);
    assert!(ok, "{err}");
    let (ok, err) = train(
        &["launch", "--nproc", "2", "--backend", "mpi", "--"],
        &data,
        &d.join("mpi"),
        &with_eps(&["--tp", "2"]),
    );
    assert!(ok, "{err}");
    assert_same_losses(&losses(&d.join("mpi")), &losses(&d.join("single")));
    assert_close_weights(&d.join("mpi/final"), &d.join("single/final"));
    let last = losses(&d.join("single")).last().unwrap().0;
    let ck = format!("step-{last:08}");
    assert_close_weights(&d.join("mpi").join(&ck), &d.join("single").join(&ck));
    assert!(d
        .join("mpi")
        .join(&ck)
        .join("optimizer.safetensors")
        .exists());
}

/// `zaya launch --nproc 4 --backend mpi -- zaya train --tp 2 --pp 2` (= `mpirun -n 4`): four
/// processes, each reading only its slices, reproduce the single-process losses step by
/// step, and resume a single-process checkpoint (its AdamW state read by selection).
#[cfg(feature = "mpi")]
#[test]
fn tp2_pp2_mpi_processes_reproduce_the_single_process_run_and_resume() {
    let (_guard, d) = tmp("mpi-tp-pp");
    let data = data(&d);
    let (ok, err) = train(&[], &data, &d.join("single"), TP_EPS);
    assert!(ok, "{err}");
    let want = losses(&d.join("single"));
    let launch = ["launch", "--nproc", "4", "--backend", "mpi", "--"];
    let (ok, err) = train(
        &launch,
        &data,
        &d.join("mpi"),
        &with_eps(&["--tp", "2", "--pp", "2"]),
    );
    assert!(ok, "{err}");
    assert_same_losses(&losses(&d.join("mpi")), &want);
    assert_close_weights(&d.join("mpi/final"), &d.join("single/final"));
    interrupted_copy(&d.join("single"), &d.join("resume"), 2);
    let (ok, err) = train(
        &launch,
        &data,
        &d.join("resume"),
        &with_eps(&["--tp", "2", "--pp", "2", "--resume"]),
    );
    assert!(ok, "{err}");
    assert!(err.contains("resuming at step 2"), "{err}");
    assert_same_losses(&losses(&d.join("resume")), &want);
}

/// `zaya bench --pp/--dp --train` and `zaya bench --tp/--pp` (the `bench-parallel`
/// measurement) write their JSON: tokens/s beside one rank, bytes per rank, same results.
#[test]
fn bench_with_parallel_degrees_reports_throughput_and_bytes_per_rank() {
    let (_guard, d) = tmp("bench");
    let m = fixture("gqa_sliding");
    let o = zaya()
        .args(["bench", "--train", "--pp", "2", "--dp", "2", "--model"])
        .arg(&m)
        .args([
            "--train-batch",
            "4",
            "--train-seq-len",
            "8",
            "--repeats",
            "1",
        ])
        .args(["--checkpointing", "every", "--json"])
        .arg(d.join("train.json"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("train.json")).unwrap()).unwrap();
    assert_eq!(v["same_losses"], true, "{v}");
    assert_eq!(v["parallel"]["rank_state_mib"].as_array().unwrap().len(), 4);
    assert!(v["parallel"]["train_tokens_per_s"].as_f64().unwrap() > 0.0);
    let o = zaya()
        .args(["bench", "--pp", "2", "--tp", "2", "--model"])
        .arg(&m)
        .args(["--prefill-len", "8", "--new-tokens", "3", "--json"])
        .arg(d.join("infer.json"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("infer.json")).unwrap()).unwrap();
    assert_eq!(v["same_tokens"], true, "{v}");
    assert_eq!(
        v["parallel"]["rank_weight_mib"].as_array().unwrap().len(),
        4
    );
}

/// `mpirun -n 2 zaya bench --train --tp 2 | --pp 2 | --dp 2`: two processes run the
/// training steps (one rank each); rank 0 alone writes the report, with the step time,
/// tokens/s, and each rank's training state and peak RSS.
#[cfg(feature = "mpi")]
#[test]
fn bench_train_on_mpi_processes_reports_every_rank() {
    let (_guard, d) = tmp("bench-mpi");
    let weights = candle_core::safetensors::load(
        fixture("gqa_sliding").join("model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let params: usize = weights
        .iter()
        .filter(|(k, _)| !k.ends_with("balancing_biases"))
        .map(|(_, t)| t.elem_count())
        .sum();
    for (tag, degree) in [("tp2", "--tp"), ("pp2", "--pp"), ("dp2", "--dp")] {
        let json = d.join(format!("{tag}.json"));
        let o = Command::new("mpirun")
            .args(["-n", "2", "--oversubscribe"])
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
            .arg(env!("CARGO_BIN_EXE_zaya"))
            .args(["bench", "--train", degree, "2", "--model"])
            .arg(fixture("gqa_sliding"))
            .args([
                "--train-batch",
                "2",
                "--train-seq-len",
                "8",
                "--repeats",
                "1",
            ])
            .arg("--json")
            .arg(&json)
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success(),
            "{tag}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        // rank 0 alone reports
        assert_eq!(out.matches("on 2 MPI processes").count(), 1, "{tag}: {out}");
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        assert_eq!(v["launcher"], "mpi", "{tag}: {v}");
        let p = &v["parallel"];
        assert!(p["train_step_s"].as_f64().unwrap() > 0.0, "{tag}: {v}");
        assert!(
            p["train_tokens_per_s"].as_f64().unwrap() > 0.0,
            "{tag}: {v}"
        );
        // repeats + 1 steps, finite losses
        let losses = p["losses"].as_array().unwrap();
        assert_eq!(losses.len(), 2, "{tag}: {v}");
        assert!(
            losses.iter().all(|l| l.as_f64().unwrap().is_finite()),
            "{tag}: {v}"
        );
        // both ranks' memory: a training state each (split: less than the whole model's
        // 16 bytes per parameter under TP / PP) and a peak RSS each
        let state: Vec<f64> = p["rank_state_mib"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        let rss: Vec<f64> = p["rank_peak_rss_mib"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(state.len(), 2, "{tag}: {v}");
        assert_eq!(rss.len(), 2, "{tag}: {v}");
        assert!(state.iter().chain(&rss).all(|&x| x > 0.0), "{tag}: {v}");
        // one process holds 16 bytes per parameter (weights, gradients, two moments)
        let whole = 16.0 * params as f64 / (1u64 << 20) as f64;
        assert!(
            state.iter().all(|&x| x < whole),
            "{tag}: {state:?} vs {whole}"
        );
        if tag == "dp2" {
            // ZeRO-1: weights and gradients on both replicas, each moment on one
            let sum = state[0] + state[1];
            assert!(
                (sum - 1.5 * whole).abs() <= 1e-3 * whole,
                "{tag}: {state:?}"
            );
        }
    }
}

/// Examples of 5 tokens in rows of 12: every row packs two documents and padding. `--tp 2`
/// and `--tp 2 --pp 2` on local ranks reproduce the single process's losses step by step.
#[test]
fn tp_local_ranks_on_packed_rows_reproduce_the_single_process_run() {
    let (_guard, d) = tmp("packed");
    let rows: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("gqa_sliding").join("train.json")).unwrap(),
    )
    .unwrap();
    let mut text = String::new();
    for k in 0..6 {
        let ids: Vec<u64> = rows["input_ids"][k % 2].as_array().unwrap()[k..k + 5]
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        text.push_str(&serde_json::json!({ "input_ids": ids }).to_string());
        text.push('\n');
    }
    let data = d.join("data.jsonl");
    std::fs::write(&data, text).unwrap();
    let (ok, err) = train(&[], &data, &d.join("single"), TP_EPS);
    assert!(ok, "{err}");
    assert!(err.contains("6 examples -> 3 packed rows"), "{err}");
    let want = losses(&d.join("single"));
    assert!(!want.is_empty());
    for (tag, extra) in [
        ("tp2", &["--tp", "2"][..]),
        ("tp2pp2", &["--tp", "2", "--pp", "2"][..]),
    ] {
        let (ok, err) = train(&[], &data, &d.join(tag), &with_eps(extra));
        assert!(ok, "{tag}: {err}");
        assert_same_losses(&losses(&d.join(tag)), &want);
    }
}
