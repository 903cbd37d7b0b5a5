//! The NCCL backend across real processes on this machine's GPUs: the test re-runs its
//! binary under `mpirun -n 2` and `-n 4`; each process joins NCCL on its GPU (MPI carries
//! the bootstrap) and checks every collective, lengths beyond 2^24 values, a refused
//! mismatched call, and a tensor-parallel forward on NCCL sub-groups against one rank.
//!
//! Needs an NVIDIA GPU, libnccl (a `libnccl.so` on the loader's path), Open MPI and
//! `--features mpi,nccl`; ignored by default since CI has no GPU:
//! `cargo test -p zaya-dist --features mpi,nccl --test nccl_comm -- --ignored`
//! (`scripts/gpu_check.sh` runs it on a lent GPU machine). With fewer GPUs than ranks each
//! process names itself a host of its own (`NCCL_HOSTID`), so NCCL accepts several ranks
//! on one GPU and connects them over sockets, as it would between machines.
#![cfg(all(feature = "mpi", feature = "nccl"))]

mod support;

use std::process::Command;
use std::time::Duration;

use zaya_dist::mpi_backend::{launched_by_mpi, MpiWorld};
use zaya_dist::nccl_backend::{gpu_count, NcclComm};
use zaya_dist::{Comm, DistError};

const WORKER: &str = "nccl_worker";

#[test]
#[ignore = "needs an NVIDIA GPU, libnccl and Open MPI"]
fn nccl_collectives_and_tp_forward_across_processes() {
    if launched_by_mpi() {
        return;
    }
    for n in [2, 4] {
        let out = Command::new("mpirun")
            .args(["-n", &n.to_string(), "--oversubscribe"])
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
            .env("ZAYA_NCCL_WORKER", WORKER)
            .arg(std::env::current_exe().unwrap())
            .args([WORKER, "--exact", "--nocapture", "--ignored"])
            .args(["--test-threads", "1"])
            .output()
            .expect("running mpirun");
        let text = format!(
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{n} ranks: {text}");
        assert_eq!(text.matches("NCCL-WORKER-OK").count(), n, "{text}");
        println!("{n} ranks:\n{text}");
    }
}

#[test]
#[ignore = "a worker of nccl_collectives_and_tp_forward_across_processes"]
fn nccl_worker() {
    if !(launched_by_mpi() && std::env::var("ZAYA_NCCL_WORKER").as_deref() == Ok(WORKER)) {
        return;
    }
    let world = MpiWorld::init().unwrap();
    let host = world.comm(Duration::from_secs(60));
    let (r, n) = (host.rank(), host.size());
    let gpus = gpu_count().unwrap();
    assert!(gpus > 0, "no CUDA device visible");
    if gpus < n {
        // read by NCCL at its initialisation below, in this process only
        std::env::set_var("NCCL_HOSTID", format!("zaya-nccl-test-{r}"));
    }
    let c = NcclComm::on_node_gpu(Box::new(host), Duration::from_secs(60)).unwrap();
    assert_eq!(c.backend(), "nccl");
    println!("rank {r}: NCCL on GPU {} of {gpus}", c.ordinal());
    support::check_collectives(&c);

    // lengths beyond 2^24 values, which one f32 cannot carry exactly
    let long = (1usize << 24) + 3;
    let (next, prev) = ((r + 1) % n, (r + n - 1) % n);
    let payload =
        |from: usize| -> Vec<f32> { (0..long).map(|i| ((i * 31 + from) % 1000) as f32).collect() };
    let mut parts = vec![Vec::new(); n];
    parts[next] = payload(r);
    let got = c.all_to_all_v(&parts).unwrap();
    for (src, g) in got.iter().enumerate() {
        if src == prev {
            assert!(
                g == &payload(prev),
                "all_to_all from {src}: {} values",
                g.len()
            );
        } else {
            assert!(g.is_empty());
        }
    }
    let got = c.send_recv(next, 3, &payload(r), prev, 3).unwrap();
    assert!(got == payload(prev), "send_recv: {} values", got.len());
    let mut sum = payload(0);
    c.all_reduce_sum(&mut sum).unwrap();
    assert!(sum
        .iter()
        .enumerate()
        .all(|(i, &v)| v == (n * ((i * 31) % 1000)) as f32));

    // a call whose lengths differ between members is refused on every member, not run
    match c.all_gather(&vec![1.0; 1 + r]) {
        Err(DistError::Invalid { op, message, .. }) => {
            assert_eq!(op, "all_gather");
            assert!(message.contains("passed"), "{message}");
        }
        other => panic!("rank {r}: {other:?}"),
    }
    c.barrier().unwrap();

    // tp 2 × dp n/2 on NCCL sub-groups (split builds a communicator per group)
    support::check_tp2_forward(Box::new(c), false);
    println!("NCCL-WORKER-OK rank {r}");
}
