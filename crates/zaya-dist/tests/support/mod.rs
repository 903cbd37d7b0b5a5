//! Checks shared by the tests of the process backends (MPI, NCCL): every member of a group
//! of any size runs them and asserts its own results.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use zaya::{ForwardOptions, ZayaModel};
use zaya_dist::{Comm, Mesh, MeshShape, ParallelPlan, TpModel};

/// Every collective of [`Comm`] on `c`, with results known in closed form for any size.
pub fn check_collectives(c: &dyn Comm) {
    let (r, n) = (c.rank(), c.size());
    let tri = (n * (n - 1) / 2) as f32;
    let mut buf = vec![r as f32, 1.0];
    c.all_reduce_sum(&mut buf).unwrap();
    assert_eq!(buf, vec![tri, n as f32]);
    let all: Vec<f32> = (0..n).map(|k| k as f32).collect();
    assert_eq!(c.all_gather(&[r as f32]).unwrap(), all);
    // member k of every rank's send is r + k: the sum over ranks of chunk r
    let send: Vec<f32> = (0..n).map(|k| (r + k) as f32).collect();
    assert_eq!(
        c.reduce_scatter_sum(&send).unwrap(),
        vec![tri + (n * r) as f32]
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
    let root = 1 % n;
    let mut b = if r == root {
        vec![5.0, 6.0]
    } else {
        vec![0.0; 2]
    };
    c.broadcast(root, &mut b).unwrap();
    assert_eq!(b, vec![5.0, 6.0]);
    let (next, prev) = ((r + 1) % n, (r + n - 1) % n);
    if n > 1 {
        // even members send first, odd ones receive first: a backend whose sends wait for
        // their receiver (NCCL) never has the whole ring sending at once
        if r % 2 == 0 {
            c.send(next, 7, &[r as f32]).unwrap();
        }
        assert_eq!(c.recv(prev, 7).unwrap(), vec![prev as f32]);
        if r % 2 == 1 {
            c.send(next, 7, &[r as f32]).unwrap();
        }
    }
    // every rank sends first: 8 MiB messages go by rendezvous, where blocking sends in a
    // ring would deadlock; send_recv posts the send and receives before waiting on it
    let big = vec![r as f32; 1 << 21];
    let got = c.send_recv(next, 8, &big, prev, 8).unwrap();
    assert_eq!(got.len(), 1 << 21);
    assert!(got.iter().all(|&v| v == prev as f32));
    // the pipeline's pairing: member 0 fuses its send with the receive of the answer,
    // member 1 needs that send's payload before it can answer (a PP × DP training step
    // hung on this once, with NCCL's sends waiting for their receives)
    if n > 1 && r < 2 {
        let hidden = vec![r as f32 + 0.5; 4096];
        if r == 0 {
            let back = c.send_recv(1, 20, &hidden, 1, 21).unwrap();
            assert_eq!(back, vec![3.0; 4096]);
        } else {
            assert_eq!(c.recv(0, 20).unwrap(), vec![0.5; 4096]);
            c.send(0, 21, &[3.0; 4096]).unwrap();
        }
    }
    c.barrier().unwrap();
}

/// The fixture model every forward check uses.
pub fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/gqa_sliding")
}

/// `world`'s members form `world.size() / 2` TP-2 pairs (tp 2 × dp n/2); each pair runs the
/// fixture's forward, which must equal one rank to a few ulp and equal the same split on
/// local ranks (bit for bit where `same_bits_as_local`).
pub fn check_tp2_forward(world: Box<dyn Comm>, same_bits_as_local: bool) {
    let r = world.rank();
    let dp = world.size() / 2;
    let mesh = Mesh::new(world, MeshShape::new(2, 1, 1, dp).unwrap()).unwrap();
    let dir = fixture();
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
    let d = max_abs_diff(&logits, &want);
    // reassociated sums of the row-parallel layers: a few ulp of logits up to 35
    assert!(d <= 2e-5, "rank {r}: {d}");
    let (local, _) =
        zaya_dist::forward_on_local_ranks(&dir, 2, &ids, &opts, Duration::from_secs(60)).unwrap();
    if same_bits_as_local {
        // both sum in rank order
        assert_eq!(
            max_abs_diff(&logits, &local),
            0.0,
            "rank {r}: differs from local TP 2"
        );
    } else {
        assert!(max_abs_diff(&logits, &local) <= 2e-5, "rank {r}");
    }
}

/// Largest absolute difference of two tensors of one shape (any float dtype).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    max_abs(&(a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap()).unwrap())
}

/// Largest absolute value of a tensor (any float dtype; 0 when empty).
pub fn max_abs(t: &Tensor) -> f32 {
    if t.elem_count() == 0 {
        return 0.0;
    }
    t.to_dtype(DType::F32)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
