//! The MPI backend across real processes: this test binary re-runs itself under
//! `mpirun -n 4`; each process runs the collectives and a tensor-parallel forward pass on
//! an MPI sub-group and checks the results. Needs Open MPI (`mpirun`), built with
//! `--features mpi`.
#![cfg(feature = "mpi")]

mod support;

use std::process::Command;
use std::time::Duration;

use zaya_dist::mpi_backend::{launched_by_mpi, MpiWorld};
use zaya_dist::Comm;

fn mpirun(n: usize, test: &str, extra_env: &[(&str, &str)]) -> std::process::Output {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new("mpirun");
    cmd.args(["-n", &n.to_string(), "--oversubscribe"])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("ZAYA_MPI_WORKER", test)
        .arg(exe)
        .args([test, "--exact", "--nocapture", "--test-threads", "1"]);
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    cmd.output().expect("running mpirun")
}

fn worker(test: &str) -> bool {
    launched_by_mpi() && std::env::var("ZAYA_MPI_WORKER").as_deref() == Ok(test)
}

#[test]
fn collectives_and_tp_forward_across_four_processes() {
    if launched_by_mpi() {
        return;
    }
    let out = mpirun(4, "mpi_worker_collectives", &[]);
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert_eq!(text.matches("MPI-WORKER-OK").count(), 4, "{text}");
}

#[test]
fn mpi_worker_collectives() {
    if !worker("mpi_worker_collectives") {
        return;
    }
    let world = MpiWorld::init().unwrap();
    let c = world.comm(Duration::from_secs(30));
    let r = c.rank();
    assert_eq!(c.size(), 4);
    support::check_collectives(&c);
    support::check_tp2_forward(Box::new(c), true);
    println!("MPI-WORKER-OK rank {r}");
}

#[test]
fn a_rank_that_dies_ends_the_job_with_an_error() {
    if launched_by_mpi() {
        return;
    }
    let out = mpirun(3, "mpi_worker_dies", &[]);
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert!(!text.contains("MPI-WORKER-OK"), "{text}");
    // mpirun names the process that died (rank 2 of the job) and its status
    assert!(
        text.contains(",2]") && text.contains("Exit code:    9"),
        "{text}"
    );
}

#[test]
fn mpi_worker_dies() {
    if !worker("mpi_worker_dies") {
        return;
    }
    let world = MpiWorld::init().unwrap();
    let c = world.comm(Duration::from_secs(20));
    if c.rank() == 2 {
        std::process::exit(9);
    }
    let mut buf = [1.0f32];
    c.all_reduce_sum(&mut buf).unwrap();
    c.barrier().unwrap();
    println!("MPI-WORKER-OK");
}
