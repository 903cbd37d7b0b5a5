//! `zaya forward --tp N [--ep N] --grads`: loss and every gradient (gathered to its full
//! tensor under its HF name) equal the single-rank `zaya forward --grads`, on local ranks
//! and (built with `--features mpi`) as MPI processes under `zaya launch --backend mpi`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};

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

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `zaya forward --grads` on gqa_sliding's padded training batch with `extra` flags.
fn forward(cmd: &mut Command, extra: &[&str], out: &Path) {
    let m = fixture("gqa_sliding");
    let (ok, text) = run(cmd
        .args(["forward", "--grads", "--model"])
        .arg(&m)
        .arg("--inputs")
        .arg(m.join("train_pad.json"))
        .arg("--out")
        .arg(out)
        .args(extra));
    assert!(ok, "{extra:?}: {text}");
}

fn load(p: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(p, &Device::Cpu).unwrap()
}

/// Same names; gradients and loss within 1e-4 of the largest value of each tensor; logits
/// within max(1e-5, 1e-6 · max |logit|) (TP sums reassociate).
fn assert_same(got: &HashMap<String, Tensor>, want: &HashMap<String, Tensor>, label: &str) {
    let mut a: Vec<_> = got.keys().collect();
    let mut b: Vec<_> = want.keys().collect();
    a.sort();
    b.sort();
    assert_eq!(a, b, "{label}: names");
    assert!(want.keys().filter(|k| k.starts_with("grad.")).count() > 100);
    for (k, w) in want {
        let g = &got[k];
        assert_eq!(g.dims(), w.dims(), "{label} {k}");
        let v = |t: &Tensor| -> Vec<f32> {
            t.to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let (g, w) = (v(g), v(w));
        let scale = w.iter().fold(0f32, |m, x| m.max(x.abs()));
        let d = g
            .iter()
            .zip(&w)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        let tol = if k == "logits" {
            1e-5f32.max(1e-6 * scale)
        } else {
            1e-4 * scale.max(1e-3)
        };
        assert!(d <= tol, "{label} {k}: max |Δ| = {d:.3e} > {tol:.3e}");
    }
}

#[test]
fn forward_grads_on_local_tp_and_ep_ranks_equal_one_rank() {
    let (_guard, d) = tmp("local");
    forward(&mut zaya(), &[], &d.join("one.safetensors"));
    let want = load(&d.join("one.safetensors"));
    for (flags, tag) in [
        (&["--tp", "2"][..], "tp2"),
        (&["--tp", "4", "--ep", "2", "--checkpointing"][..], "tp4ep2"),
        // pipeline stages of TP ranks (1F1B, the tied embedding's halves summed)
        (&["--tp", "2", "--pp", "2", "--checkpointing"][..], "tp2pp2"),
    ] {
        let out = d.join(format!("{tag}.safetensors"));
        forward(&mut zaya(), flags, &out);
        assert_same(&load(&out), &want, tag);
    }
}

#[test]
fn forward_grads_on_parallel_ranks_needs_labels() {
    let m = fixture("gqa_sliding");
    let (_guard, d) = tmp("nolabels");
    let (ok, text) = run(zaya()
        .args(["forward", "--grads", "--tp", "2", "--model"])
        .arg(&m)
        .arg("--inputs")
        .arg(m.join("batch.json"))
        .arg("--out")
        .arg(d.join("x.safetensors")));
    assert!(!ok && text.contains("labels"), "{text}");
}

/// `zaya launch --backend mpi -- forward --tp 2 --grads` (= `mpirun -n 2 zaya forward ...`):
/// two processes, rank 0 writes; equal to one rank.
#[cfg(feature = "mpi")]
#[test]
fn forward_grads_on_mpi_processes_equal_one_rank() {
    let (_guard, d) = tmp("mpi");
    forward(&mut zaya(), &[], &d.join("one.safetensors"));
    let want = load(&d.join("one.safetensors"));
    let out = d.join("mpi.safetensors");
    let mut cmd = zaya();
    cmd.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_rmaps_base_oversubscribe", "1")
        .args(["launch", "--nproc", "2", "--backend", "mpi", "--"]);
    forward(&mut cmd, &["--tp", "2"], &out);
    assert_same(&load(&out), &want, "mpi tp2");
}
