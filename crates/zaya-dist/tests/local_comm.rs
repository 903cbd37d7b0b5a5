//! The collectives on local ranks: results, sub-groups of a mesh, timeouts and dead ranks.

use std::time::{Duration, Instant};

use zaya_dist::{Comm, DistError, LocalWorld, Mesh, MeshShape, RankFailed};

fn world(n: usize) -> LocalWorld {
    LocalWorld::new(n, Duration::from_secs(20)).unwrap()
}

fn ok<T: std::fmt::Debug>(v: Vec<Result<T, RankFailed<DistError>>>) -> Vec<T> {
    v.into_iter().map(|r| r.unwrap()).collect()
}

#[test]
fn collectives_give_the_same_results_on_every_rank() {
    let n = 4;
    let out = ok(world(n).run(|c| {
        let r = c.rank() as f32;
        // all-reduce: Σ_r (r + i)
        let mut buf = vec![r, r + 1.0, r + 2.0];
        c.all_reduce_sum(&mut buf)?;
        // all-gather: ranks in order
        let gathered = c.all_gather(&[r * 10.0, r * 10.0 + 1.0])?;
        // reduce-scatter: chunk k of rank r is [r + k]; member k gets Σ_r (r + k)
        let send: Vec<f32> = (0..n).map(|k| r + k as f32).collect();
        let scattered = c.reduce_scatter_sum(&send)?;
        // all-to-all with uneven sizes: rank r sends r+1 copies of (10r + dst) to dst
        let send: Vec<Vec<f32>> = (0..n)
            .map(|dst| vec![10.0 * r + dst as f32; c.rank() + 1])
            .collect();
        let a2a = c.all_to_all_v(&send)?;
        // broadcast from rank 2
        let mut b = if c.rank() == 2 {
            vec![7.0, 8.0]
        } else {
            vec![0.0, 0.0]
        };
        c.broadcast(2, &mut b)?;
        c.barrier()?;
        // a ring of point-to-point messages, tags keep two rounds apart
        let next = (c.rank() + 1) % n;
        let prev = (c.rank() + n - 1) % n;
        c.send(next, 1, &[r])?;
        c.send(next, 2, &[r + 100.0])?;
        let second = c.recv(prev, 2)?;
        let first = c.recv(prev, 1)?;
        Ok((buf, gathered, scattered, a2a, b, first, second))
    }));
    for (rank, (buf, gathered, scattered, a2a, b, first, second)) in out.into_iter().enumerate() {
        assert_eq!(buf, vec![6.0, 10.0, 14.0]);
        assert_eq!(gathered, vec![0.0, 1.0, 10.0, 11.0, 20.0, 21.0, 30.0, 31.0]);
        assert_eq!(scattered, vec![6.0 + 4.0 * rank as f32]);
        for (src, got) in a2a.iter().enumerate() {
            assert_eq!(got, &vec![10.0 * src as f32 + rank as f32; src + 1]);
        }
        assert_eq!(b, vec![7.0, 8.0]);
        let prev = ((rank + n - 1) % n) as f32;
        assert_eq!(first, vec![prev]);
        assert_eq!(second, vec![prev + 100.0]);
    }
}

#[test]
fn all_reduce_is_bit_identical_on_every_rank() {
    // values whose float sum depends on the order of addition
    let out = ok(world(3).run(|c| {
        let mut buf: Vec<f32> = (0..64)
            .map(|i| ((i * 7 + c.rank() * 13) as f32).sin() * 10f32.powi(c.rank() as i32 * 3))
            .collect();
        c.all_reduce_sum(&mut buf)?;
        Ok(buf.iter().map(|v| v.to_bits()).collect::<Vec<u32>>())
    }));
    assert_eq!(out[0], out[1]);
    assert_eq!(out[1], out[2]);
}

#[test]
fn mesh_groups_hold_the_right_ranks() {
    // tp 2 × pp 2 × dp 2: rank = (dp·2 + pp)·2 + tp
    let shape = MeshShape::new(2, 2, 1, 2).unwrap();
    let out = ok(world(8).run(move |c| {
        let me = c.rank() as f32;
        let mesh = Mesh::new(Box::new(c), shape)?;
        let tp = mesh.tp.all_gather(&[me])?;
        let pp = mesh.pp.all_gather(&[me])?;
        let dp = mesh.dp.all_gather(&[me])?;
        let ep = mesh.ep.all_gather(&[me])?;
        // a collective inside one group does not see the other groups' messages
        let mut s = [me];
        mesh.tp.all_reduce_sum(&mut s)?;
        Ok((mesh.coords, tp, pp, dp, ep, s[0]))
    }));
    for (rank, (coords, tp, pp, dp, ep, s)) in out.into_iter().enumerate() {
        assert_eq!(shape.rank_of(coords), rank);
        let base_tp = rank - coords.tp;
        assert_eq!(tp, vec![base_tp as f32, base_tp as f32 + 1.0]);
        assert_eq!(s, 2.0 * base_tp as f32 + 1.0);
        let base_pp = rank - 2 * coords.pp;
        assert_eq!(pp, vec![base_pp as f32, base_pp as f32 + 2.0]);
        let base_dp = rank - 4 * coords.dp;
        assert_eq!(dp, vec![base_dp as f32, base_dp as f32 + 4.0]);
        assert_eq!(ep, vec![rank as f32]);
    }
}

#[test]
fn a_world_that_does_not_match_the_mesh_is_refused() {
    let shape = MeshShape::new(2, 2, 1, 1).unwrap();
    let out = world(2).run(move |c| Mesh::new(Box::new(c), shape).map(|_| ()));
    for r in out {
        let e = r.unwrap_err().to_string();
        assert!(
            e.contains("2 ranks were started but --tp 2 --pp 2 --ep 1 --dp 1 needs 4"),
            "{e}"
        );
    }
    assert!(MeshShape::new(0, 1, 1, 1).is_err());
}

#[test]
fn a_rank_that_fails_makes_the_others_stop_with_its_name() {
    let start = Instant::now();
    let out = LocalWorld::new(3, Duration::from_secs(60))
        .unwrap()
        .run(|c| {
            if c.rank() == 1 {
                return Err(DistError::Invalid {
                    rank: 1,
                    op: "test",
                    message: "bad shard".into(),
                });
            }
            let mut buf = [1.0f32];
            c.all_reduce_sum(&mut buf)?;
            Ok(())
        });
    // long before the 60 s deadline
    assert!(start.elapsed() < Duration::from_secs(10));
    match &out[1] {
        Err(RankFailed::Error { rank: 1, error }) => {
            assert!(error.to_string().contains("bad shard"))
        }
        other => panic!("{other:?}"),
    }
    for r in [0, 2] {
        match &out[r] {
            Err(RankFailed::Error {
                error: DistError::PeerGone { peer: 1, why, .. },
                ..
            }) => assert!(why.contains("bad shard"), "{why}"),
            other => panic!("rank {r}: {other:?}"),
        }
    }
}

#[test]
fn a_rank_that_panics_is_reported_and_does_not_hang_the_others() {
    let out = world(2).run(|c| {
        if c.rank() == 0 {
            panic!("rank zero exploded");
        }
        c.barrier()?;
        Ok::<(), DistError>(())
    });
    assert!(
        matches!(&out[0], Err(RankFailed::Panicked { rank: 0, message }) if message.contains("exploded"))
    );
    let e = out[1].as_ref().unwrap_err().to_string();
    assert!(
        e.contains("rank 0 has exited (panicked: rank zero exploded)"),
        "{e}"
    );
}

#[test]
fn a_rank_that_never_arrives_times_out_with_both_names() {
    let w = LocalWorld::new(2, Duration::from_millis(300)).unwrap();
    let out = w.run(|c| {
        if c.rank() == 0 {
            // rank 0 sits in a collective that rank 1 joins too late
            c.barrier()?;
        } else {
            std::thread::sleep(Duration::from_secs(2));
        }
        Ok::<(), DistError>(())
    });
    let e = out[0].as_ref().unwrap_err().to_string();
    assert!(
        e.contains("rank 0: barrier timed out after 300ms waiting for rank 1"),
        "{e}"
    );
}

#[test]
fn bad_arguments_are_typed_errors() {
    let out = world(2).run(|c| {
        let e1 = c.reduce_scatter_sum(&[1.0, 2.0, 3.0]).unwrap_err();
        let e2 = c.send(5, 0, &[1.0]).unwrap_err();
        let e3 = c.all_to_all_v(&[vec![]]).unwrap_err();
        // lengths that differ between ranks
        let mut buf = vec![0.0; c.rank() + 1];
        let e4 = c.all_reduce_sum(&mut buf).unwrap_err();
        Ok::<_, DistError>((
            e1.to_string(),
            e2.to_string(),
            e3.to_string(),
            e4.to_string(),
        ))
    });
    let (e1, e2, e3, e4) = out.into_iter().next().unwrap().unwrap();
    assert!(e1.contains("does not split into 2 equal chunks"), "{e1}");
    assert!(e2.contains("peer 5 is outside a group of 2"), "{e2}");
    assert!(e3.contains("1 send buffers for a group of 2"), "{e3}");
    assert!(e4.contains("rank 1 sent 2 values, this rank 1"), "{e4}");
}

#[test]
fn meshes_whose_size_overflows_are_refused() {
    let e = MeshShape::new(1 << 40, 1 << 40, 1, 1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("is more than 1048576 ranks"), "{e}");
    assert!(MeshShape::new(1 << 20, 2, 1, 1).is_err());
    assert_eq!(
        MeshShape::new(1 << 10, 1 << 10, 1, 1).unwrap().world(),
        1 << 20
    );
}

#[test]
fn bucketed_gradient_averaging_equals_the_mean_whatever_the_buckets() {
    use candle_core::{Device, Tensor};
    let shapes: [&[usize]; 4] = [&[3, 4], &[5], &[2, 2, 2], &[7]];
    let grads_of = |rank: usize| -> Vec<Tensor> {
        shapes
            .iter()
            .enumerate()
            .map(|(k, s)| {
                let n: usize = s.iter().product();
                let v: Vec<f32> = (0..n)
                    .map(|i| ((i * 31 + k * 7 + rank * 13) as f32).sin() * (rank + 1) as f32)
                    .collect();
                Tensor::from_vec(v, *s, &Device::Cpu).unwrap()
            })
            .collect()
    };
    let results = ok(world(3).run(|c| {
        let mine = grads_of(c.rank());
        let mut per_bucket = Vec::new();
        for bucket in [1, 8, 13, 1000] {
            let g = zaya_dist::grad::all_reduce_mean(&c, &mine, bucket).map_err(|e| {
                DistError::Invalid {
                    rank: c.rank(),
                    op: "test",
                    message: e.to_string(),
                }
            })?;
            per_bucket.push(
                g.iter()
                    .map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
                    .collect::<Vec<_>>(),
            );
        }
        Ok(per_bucket)
    }));
    for (k, s) in shapes.iter().enumerate() {
        let n: usize = s.iter().product();
        let all: Vec<Vec<f32>> = (0..3)
            .map(|r| grads_of(r)[k].flatten_all().unwrap().to_vec1().unwrap())
            .collect();
        for i in 0..n {
            let want = (all[0][i] + all[1][i] + all[2][i]) / 3.0;
            for rank in &results {
                for bucketing in rank {
                    assert_eq!(bucketing[k][i], want, "grad {k} value {i}");
                }
            }
        }
    }
}
