//! MPI processes through rsmpi (Open MPI or MPICH): `mpirun -n 4 zaya ...`.
//!
//! Every collective is issued as a non-blocking MPI operation and polled against the
//! deadline. MPI cannot cancel a collective another rank never joined, so on a timeout this
//! rank prints the [`DistError::Timeout`] naming itself and the operation and calls
//! `MPI_Abort`, which makes `mpirun` stop every rank (none hangs). A rank that dies is
//! handled by the MPI runtime the same way: `mpirun` reports it and ends the job.
//!
//! Sums are computed in rank order from gathered buffers (not `MPI_Allreduce`, whose
//! reduction order may differ between ranks), so every rank holds identical bits.

use std::time::{Duration, Instant};

use mpi::datatype::{Partition, PartitionMut};
use mpi::point_to_point::MatchedReceiveVec;
use mpi::request::{Request, Scope};
use mpi::topology::{Color, SimpleCommunicator};
use mpi::traits::*;

use crate::comm::{check_chunks, check_peer, Comm, DistError, DistResult};

/// The MPI environment of this process (finalised when dropped).
pub struct MpiWorld {
    universe: mpi::environment::Universe,
}

pub use crate::comm::launched_by_mpi;

impl MpiWorld {
    /// Initialises MPI (once per process).
    pub fn init() -> DistResult<Self> {
        let universe = mpi::initialize().ok_or_else(|| DistError::Backend {
            backend: "mpi",
            message: "MPI was already initialised in this process".into(),
        })?;
        Ok(MpiWorld { universe })
    }

    /// Initialises MPI (once per process) for a process where one thread other than the
    /// main thread may make the MPI calls, one call at a time (`MPI_THREAD_SERIALIZED`):
    /// `zaya serve` on MPI ranks, whose rank 0 computes on the engine thread.
    pub fn init_serialized() -> DistResult<Self> {
        let (universe, got) = mpi::initialize_with_threading(mpi::Threading::Serialized)
            .ok_or_else(|| DistError::Backend {
                backend: "mpi",
                message: "MPI was already initialised in this process".into(),
            })?;
        if got < mpi::Threading::Serialized {
            return Err(DistError::Backend {
                backend: "mpi",
                message: format!(
                    "this MPI library provides thread level {got:?}; serving needs Serialized"
                ),
            });
        }
        Ok(MpiWorld { universe })
    }

    /// The world communicator; collectives give up after `timeout`.
    pub fn comm(&self, timeout: Duration) -> MpiComm {
        let world = self.universe.world();
        let world_rank = world.rank() as usize;
        MpiComm {
            comm: world,
            world_rank,
            timeout,
            max_poll: POLL,
        }
    }
}

/// One process's handle on an MPI communicator.
pub struct MpiComm {
    comm: SimpleCommunicator,
    world_rank: usize,
    timeout: Duration,
    /// Longest pause between two probes of a `recv` (the pause doubles from [`POLL`] up to
    /// this while nothing arrives).
    max_poll: Duration,
}

/// Pause between two tests of a pending operation.
const POLL: Duration = Duration::from_micros(20);

// SAFETY: an `MpiComm` is used by the one thread that drives its rank (MPI is initialised
// with the default threading level and no other thread of the process calls MPI, or with
// `MpiWorld::init_serialized` when that thread is not the main thread); the handle itself is
// an integer/pointer owned by the MPI library.
unsafe impl Send for MpiComm {}
unsafe impl Sync for MpiComm {}

impl MpiComm {
    /// Lets a `recv` that keeps waiting probe less often: the pause between probes doubles
    /// from 20 µs up to `max` (a server's follower waiting for its next command uses a
    /// millisecond, so an idle rank costs no CPU; a message that arrives soon after the
    /// previous one is still seen within microseconds).
    pub fn with_idle_poll(mut self, max: Duration) -> Self {
        self.max_poll = max.max(POLL);
        self
    }

    /// Polls `req` until it completes; past the deadline, reports and aborts the job.
    fn wait<'a, D: ?Sized, S: Scope<'a>>(&self, mut req: Request<'a, D, S>, op: &'static str) {
        let deadline = Instant::now() + self.timeout;
        loop {
            match req.test() {
                Ok(_) => return,
                Err(r) => req = r,
            }
            if Instant::now() >= deadline {
                let e = DistError::Timeout {
                    rank: self.world_rank,
                    op,
                    // MPI does not say which rank is missing: name ourselves.
                    peer: self.world_rank,
                    after: self.timeout,
                };
                eprintln!(
                    "error: {e} (some rank of this collective never joined); aborting the MPI job"
                );
                self.comm.abort(3);
            }
            std::thread::sleep(POLL);
        }
    }

    /// Receives the next message from `src` with `tag`; past the deadline, reports and
    /// aborts the job.
    fn probe_recv(&self, src: usize, tag: u32) -> Vec<f32> {
        let deadline = Instant::now() + self.timeout;
        let mut pause = POLL;
        let process = self.comm.process_at_rank(src as i32);
        loop {
            if let Some(probed) = process.immediate_matched_probe_with_tag(tag as i32) {
                let (v, _) = probed.matched_receive_vec::<f32>();
                return v;
            }
            if Instant::now() >= deadline {
                let e = DistError::Timeout {
                    rank: self.world_rank,
                    op: "recv",
                    peer: src,
                    after: self.timeout,
                };
                eprintln!("error: {e}; aborting the MPI job");
                self.comm.abort(3);
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(self.max_poll);
        }
    }

    fn gather_parts(&self, data: &[f32], op: &'static str) -> Vec<f32> {
        let mut out = vec![0f32; data.len() * self.size()];
        mpi::request::scope(|scope| {
            let req = self
                .comm
                .immediate_all_gather_into(scope, data, &mut out[..]);
            self.wait(req, op);
        });
        out
    }

    /// Checks that every rank passed the same length (gathered lengths agree).
    fn same_lengths(&self, op: &'static str, len: usize) -> DistResult<()> {
        let lens = self.gather_parts(&[len as f32], op);
        if let Some((r, l)) = lens.iter().enumerate().find(|(_, &l)| l as usize != len) {
            return Err(DistError::Invalid {
                rank: self.world_rank,
                op,
                message: format!("rank {r} passed {} values, this rank {len}", *l as usize),
            });
        }
        Ok(())
    }
}

impl Comm for MpiComm {
    fn rank(&self) -> usize {
        self.comm.rank() as usize
    }

    fn size(&self) -> usize {
        self.comm.size() as usize
    }

    fn world_rank(&self) -> usize {
        self.world_rank
    }

    fn backend(&self) -> &'static str {
        "mpi"
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> DistResult<()> {
        self.same_lengths("all_reduce", buf.len())?;
        let all = self.gather_parts(buf, "all_reduce");
        let n = buf.len();
        for (i, out) in buf.iter_mut().enumerate() {
            let mut acc = all[i];
            for r in 1..self.size() {
                acc += all[r * n + i];
            }
            *out = acc;
        }
        Ok(())
    }

    fn all_gather(&self, send: &[f32]) -> DistResult<Vec<f32>> {
        self.same_lengths("all_gather", send.len())?;
        Ok(self.gather_parts(send, "all_gather"))
    }

    fn reduce_scatter_sum(&self, send: &[f32]) -> DistResult<Vec<f32>> {
        let chunk = check_chunks(self, "reduce_scatter", send.len())?;
        self.same_lengths("reduce_scatter", send.len())?;
        let mut recv = vec![0f32; send.len()];
        mpi::request::scope(|scope| {
            let req = self
                .comm
                .immediate_all_to_all_into(scope, send, &mut recv[..]);
            self.wait(req, "reduce_scatter");
        });
        let mut out = recv[..chunk].to_vec();
        for r in 1..self.size() {
            for (o, v) in out.iter_mut().zip(&recv[r * chunk..(r + 1) * chunk]) {
                *o += v;
            }
        }
        Ok(out)
    }

    fn all_to_all_v(&self, send: &[Vec<f32>]) -> DistResult<Vec<Vec<f32>>> {
        let n = self.size();
        if send.len() != n {
            return Err(DistError::Invalid {
                rank: self.world_rank,
                op: "all_to_all",
                message: format!("{} send buffers for a group of {n}", send.len()),
            });
        }
        let send_counts: Vec<i32> = send.iter().map(|s| s.len() as i32).collect();
        let mut recv_counts = vec![0i32; n];
        mpi::request::scope(|scope| {
            let req =
                self.comm
                    .immediate_all_to_all_into(scope, &send_counts[..], &mut recv_counts[..]);
            self.wait(req, "all_to_all");
        });
        let displs = |c: &[i32]| -> Vec<i32> {
            c.iter()
                .scan(0i32, |acc, &x| {
                    let d = *acc;
                    *acc += x;
                    Some(d)
                })
                .collect()
        };
        // Every block carries one leading pad value: Open MPI's non-blocking all-to-all-v
        // on a member whose counts are all zero (a gather to one member, where the others
        // send and receive nothing) leaves the communicator's next collective unmatched
        // (it hung until the deadline; tests/mpi_comm.rs).
        let send_counts: Vec<i32> = send_counts.iter().map(|&c| c + 1).collect();
        let recv_counts: Vec<i32> = recv_counts.iter().map(|&c| c + 1).collect();
        let (sd, rd) = (displs(&send_counts), displs(&recv_counts));
        let mut flat: Vec<f32> = Vec::with_capacity(send_counts.iter().sum::<i32>() as usize);
        for s in send {
            flat.push(0.0);
            flat.extend_from_slice(s);
        }
        let mut recv = vec![0f32; recv_counts.iter().map(|&c| c as usize).sum()];
        {
            let sp = Partition::new(&flat[..], &send_counts[..], &sd[..]);
            let mut rp = PartitionMut::new(&mut recv[..], &recv_counts[..], &rd[..]);
            mpi::request::scope(|scope| {
                let req = self
                    .comm
                    .immediate_all_to_all_varcount_into(scope, &sp, &mut rp);
                self.wait(req, "all_to_all");
            });
        }
        Ok((0..n)
            .map(|r| recv[rd[r] as usize + 1..(rd[r] + recv_counts[r]) as usize].to_vec())
            .collect())
    }

    fn broadcast(&self, root: usize, buf: &mut [f32]) -> DistResult<()> {
        check_peer(self, "broadcast", root)?;
        self.same_lengths("broadcast", buf.len())?;
        mpi::request::scope(|scope| {
            let req = self
                .comm
                .process_at_rank(root as i32)
                .immediate_broadcast_into(scope, buf);
            self.wait(req, "broadcast");
        });
        Ok(())
    }

    fn barrier(&self) -> DistResult<()> {
        let req = self.comm.immediate_barrier();
        self.wait(req, "barrier");
        Ok(())
    }

    fn send(&self, dst: usize, tag: u32, data: &[f32]) -> DistResult<()> {
        check_peer(self, "send", dst)?;
        mpi::request::scope(|scope| {
            let req = self
                .comm
                .process_at_rank(dst as i32)
                .immediate_send_with_tag(scope, data, tag as i32);
            self.wait(req, "send");
        });
        Ok(())
    }

    fn recv(&self, src: usize, tag: u32) -> DistResult<Vec<f32>> {
        check_peer(self, "recv", src)?;
        Ok(self.probe_recv(src, tag))
    }

    fn send_recv(
        &self,
        dst: usize,
        send_tag: u32,
        data: &[f32],
        src: usize,
        recv_tag: u32,
    ) -> DistResult<Vec<f32>> {
        check_peer(self, "send_recv", dst)?;
        check_peer(self, "send_recv", src)?;
        // The send is posted first and completed last: the receive progresses meanwhile.
        Ok(mpi::request::scope(|scope| {
            let req = self
                .comm
                .process_at_rank(dst as i32)
                .immediate_send_with_tag(scope, data, send_tag as i32);
            let got = self.probe_recv(src, recv_tag);
            self.wait(req, "send_recv");
            got
        }))
    }

    fn split(&self, color: usize, key: usize) -> DistResult<Box<dyn Comm>> {
        let comm = self
            .comm
            .split_by_color_with_key(Color::with_value(color as i32), key as i32)
            .ok_or_else(|| DistError::Backend {
                backend: "mpi",
                message: format!(
                    "rank {}: MPI_Comm_split gave no communicator",
                    self.world_rank
                ),
            })?;
        Ok(Box::new(MpiComm {
            comm,
            world_rank: self.world_rank,
            timeout: self.timeout,
            max_poll: self.max_poll,
        }))
    }
}
