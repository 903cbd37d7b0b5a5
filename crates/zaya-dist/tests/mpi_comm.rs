//! The MPI backend across real processes: this test binary re-runs itself under
//! `mpirun -n 4`; each process runs the collectives and a tensor-parallel forward pass on
//! an MPI sub-group and checks the results. Needs Open MPI (`mpirun`), built with
//! `--features mpi`.
#![cfg(feature = "mpi")]

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use zaya::{ForwardOptions, ZayaModel};
use zaya_dist::mpi_backend::{launched_by_mpi, MpiWorld};
use zaya_dist::{Comm, Mesh, MeshShape, ParallelPlan, TpModel};

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
    let (r, n) = (c.rank(), c.size());
    assert_eq!(n, 4);
    let mut buf = vec![r as f32, 1.0];
    c.all_reduce_sum(&mut buf).unwrap();
    assert_eq!(buf, vec![6.0, 4.0]);
    assert_eq!(c.all_gather(&[r as f32]).unwrap(), vec![0.0, 1.0, 2.0, 3.0]);
    let send: Vec<f32> = (0..n).map(|k| (r + k) as f32).collect();
    assert_eq!(
        c.reduce_scatter_sum(&send).unwrap(),
        vec![(6 + 4 * r) as f32]
    );
    let a2a: Vec<Vec<f32>> = (0..n).map(|d| vec![(10 * r + d) as f32; r + 1]).collect();
    let got = c.all_to_all_v(&a2a).unwrap();
    for (src, g) in got.iter().enumerate() {
        assert_eq!(g, &vec![(10 * src + r) as f32; src + 1]);
    }
    // a gather to member 0 where the others neither send nor receive anything (member 1
    // sends nothing at all), then the next all-to-all still pairs up
    let mut to0 = vec![Vec::new(); n];
    if r != 1 {
        to0[0] = vec![r as f32; 2];
    }
    let got = c.all_to_all_v(&to0).unwrap();
    if r == 0 {
        for (src, g) in got.iter().enumerate() {
            let want = if src == 1 {
                vec![]
            } else {
                vec![src as f32; 2]
            };
            assert_eq!(g, &want);
        }
    } else {
        assert!(got.iter().all(Vec::is_empty), "{got:?}");
    }
    let got = c.all_to_all_v(&a2a).unwrap();
    for (src, g) in got.iter().enumerate() {
        assert_eq!(g, &vec![(10 * src + r) as f32; src + 1]);
    }
    let mut b = if r == 1 { vec![5.0, 6.0] } else { vec![0.0; 2] };
    c.broadcast(1, &mut b).unwrap();
    assert_eq!(b, vec![5.0, 6.0]);
    c.send((r + 1) % n, 7, &[r as f32]).unwrap();
    assert_eq!(
        c.recv((r + n - 1) % n, 7).unwrap(),
        vec![((r + n - 1) % n) as f32]
    );
    // every rank sends first: 8 MiB messages go by rendezvous, where blocking sends in a
    // ring would deadlock; send_recv posts the send and receives before waiting on it
    let big = vec![r as f32; 1 << 21];
    let got = c
        .send_recv((r + 1) % n, 8, &big, (r + n - 1) % n, 8)
        .unwrap();
    assert_eq!(got.len(), 1 << 21);
    assert!(got.iter().all(|&v| v == ((r + n - 1) % n) as f32));
    c.barrier().unwrap();

    // tp 2 × dp 2: each TP pair runs the fixture's forward; both equal one rank
    let mesh = Mesh::new(Box::new(c), MeshShape::new(2, 1, 1, 2).unwrap()).unwrap();
    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/gqa_sliding");
    let single = ZayaModel::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let cfg = single.config().clone();
    let plan = ParallelPlan::new(&cfg, MeshShape::new(2, 1, 1, 1).unwrap()).unwrap();
    let tp = TpModel::load(&dir, &plan, mesh.tp.rank(), DType::F32, &Device::Cpu).unwrap();
    let ids = Tensor::new(
        &[[36u32, 20, 30, 27, 27, 6, 93, 86, 87, 56, 44, 92]],
        &Device::Cpu,
    )
    .unwrap();
    let opts = ForwardOptions::default();
    let (logits, _) = tp.forward(mesh.tp.as_ref(), &ids, None, &opts).unwrap();
    let want = single.forward(&ids, None, &opts).unwrap().logits.unwrap();
    let d = (&logits - want)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    // reassociated sums of the row-parallel layers: a few ulp of logits up to 35
    assert!(d <= 2e-5, "rank {r}: {d}");
    // the same bits as the same split on local ranks (both sum in rank order)
    let (local, _) =
        zaya_dist::forward_on_local_ranks(&dir, 2, &ids, &opts, Duration::from_secs(60)).unwrap();
    let same = (logits.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        == (local.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    assert!(same, "rank {r}: MPI and local TP 2 differ");
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
