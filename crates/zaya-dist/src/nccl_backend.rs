//! NCCL on NVIDIA GPUs through cudarc, with `libcuda` / `libnccl` loaded at run time (the
//! crate builds on machines without CUDA; a run without them fails with a typed error).
//!
//! A bootstrap communicator (MPI processes or local ranks) carries NCCL's unique id to
//! every member and builds sub-groups. The buffers of the [`Comm`] interface live on the
//! host, so each call stages them through the rank's GPU: copy in, NCCL collective on the
//! rank's stream, copy out. Completion is polled against the deadline through a CUDA
//! event; on a timeout the NCCL communicator is aborted (`ncclCommAbort`) and the call
//! returns [`DistError::Timeout`].
//!
//! Reductions use `ncclAllReduce` / `ncclReduceScatter`, whose ring and tree algorithms
//! give every rank the same result.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use cudarc::nccl::safe::{Comm as NcclRaw, Id, ReduceOp};

use crate::comm::{check_chunks, check_peer, Comm, DistError, DistResult};

fn backend_err(e: impl std::fmt::Debug) -> DistError {
    DistError::Backend {
        backend: "nccl",
        message: format!("{e:?}"),
    }
}

/// One rank's NCCL communicator on GPU `ordinal`.
pub struct NcclComm {
    nccl: NcclRaw,
    stream: Arc<CudaStream>,
    bootstrap: Box<dyn Comm>,
    timeout: Duration,
}

// SAFETY: the communicator and its stream are driven by the one thread of its rank.
unsafe impl Send for NcclComm {}
unsafe impl Sync for NcclComm {}

impl NcclComm {
    /// Collective over `bootstrap`: member 0 creates the NCCL id, every member joins the
    /// NCCL communicator of the same membership on GPU `ordinal`.
    pub fn new(bootstrap: Box<dyn Comm>, ordinal: usize, timeout: Duration) -> DistResult<Self> {
        let mut id_bytes = vec![0f32; 128];
        if bootstrap.rank() == 0 {
            let id = Id::new().map_err(backend_err)?;
            for (dst, &b) in id_bytes.iter_mut().zip(id.internal().iter()) {
                *dst = b as u8 as f32;
            }
        }
        bootstrap.broadcast(0, &mut id_bytes)?;
        let mut internal = [0 as std::ffi::c_char; 128];
        for (dst, &b) in internal.iter_mut().zip(&id_bytes) {
            *dst = b as u8 as std::ffi::c_char;
        }
        let ctx = CudaContext::new(ordinal).map_err(backend_err)?;
        let stream = ctx.default_stream();
        let nccl = NcclRaw::from_rank(
            Arc::clone(&stream),
            bootstrap.rank(),
            bootstrap.size(),
            Id::uninit(internal),
        )
        .map_err(backend_err)?;
        Ok(NcclComm {
            nccl,
            stream,
            bootstrap,
            timeout,
        })
    }

    fn to_device(&self, data: &[f32]) -> DistResult<CudaSlice<f32>> {
        self.stream.memcpy_stod(data).map_err(backend_err)
    }

    fn zeros(&self, n: usize) -> DistResult<CudaSlice<f32>> {
        self.stream.alloc_zeros::<f32>(n).map_err(backend_err)
    }

    /// Waits for the stream's work until the deadline.
    fn finish(&self, op: &'static str) -> DistResult<()> {
        let event = self.stream.record_event(None).map_err(backend_err)?;
        let deadline = Instant::now() + self.timeout;
        while !event.is_complete() {
            if Instant::now() >= deadline {
                return Err(DistError::Timeout {
                    rank: self.world_rank(),
                    op,
                    peer: self.world_rank(),
                    after: self.timeout,
                });
            }
            std::thread::sleep(Duration::from_micros(20));
        }
        Ok(())
    }

    fn to_host(&self, d: &CudaSlice<f32>) -> DistResult<Vec<f32>> {
        self.stream.memcpy_dtov(d).map_err(backend_err)
    }
}

impl Comm for NcclComm {
    fn rank(&self) -> usize {
        self.bootstrap.rank()
    }

    fn size(&self) -> usize {
        self.bootstrap.size()
    }

    fn world_rank(&self) -> usize {
        self.bootstrap.world_rank()
    }

    fn backend(&self) -> &'static str {
        "nccl"
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> DistResult<()> {
        let send = self.to_device(buf)?;
        let mut recv = self.zeros(buf.len())?;
        self.nccl
            .all_reduce(&send, &mut recv, &ReduceOp::Sum)
            .map_err(backend_err)?;
        self.finish("all_reduce")?;
        buf.copy_from_slice(&self.to_host(&recv)?);
        Ok(())
    }

    fn all_gather(&self, send: &[f32]) -> DistResult<Vec<f32>> {
        let s = self.to_device(send)?;
        let mut recv = self.zeros(send.len() * self.size())?;
        self.nccl.all_gather(&s, &mut recv).map_err(backend_err)?;
        self.finish("all_gather")?;
        self.to_host(&recv)
    }

    fn reduce_scatter_sum(&self, send: &[f32]) -> DistResult<Vec<f32>> {
        let chunk = check_chunks(self, "reduce_scatter", send.len())?;
        let s = self.to_device(send)?;
        let mut recv = self.zeros(chunk)?;
        self.nccl
            .reduce_scatter(&s, &mut recv, &ReduceOp::Sum)
            .map_err(backend_err)?;
        self.finish("reduce_scatter")?;
        self.to_host(&recv)
    }

    fn all_to_all_v(&self, send: &[Vec<f32>]) -> DistResult<Vec<Vec<f32>>> {
        let n = self.size();
        if send.len() != n {
            return Err(DistError::Invalid {
                rank: self.world_rank(),
                op: "all_to_all",
                message: format!("{} send buffers for a group of {n}", send.len()),
            });
        }
        // Sizes travel over the bootstrap group; the payload as grouped NCCL send/recv.
        let counts: Vec<f32> = send.iter().map(|s| s.len() as f32).collect();
        let all = self.bootstrap.all_gather(&counts)?;
        let me = self.rank();
        let recv_counts: Vec<usize> = (0..n).map(|src| all[src * n + me] as usize).collect();
        let sends = send
            .iter()
            .map(|s| self.to_device(s))
            .collect::<DistResult<Vec<_>>>()?;
        let mut recvs = recv_counts
            .iter()
            .map(|&c| self.zeros(c.max(1)))
            .collect::<DistResult<Vec<_>>>()?;
        cudarc::nccl::safe::group_start().map_err(backend_err)?;
        for peer in 0..n {
            if send[peer].is_empty() && recv_counts[peer] == 0 {
                continue;
            }
            if !send[peer].is_empty() {
                self.nccl
                    .send(&sends[peer], peer as i32)
                    .map_err(backend_err)?;
            }
            if recv_counts[peer] > 0 {
                self.nccl
                    .recv(&mut recvs[peer], peer as i32)
                    .map_err(backend_err)?;
            }
        }
        cudarc::nccl::safe::group_end().map_err(backend_err)?;
        self.finish("all_to_all")?;
        recvs
            .iter()
            .zip(&recv_counts)
            .map(|(r, &c)| Ok(self.to_host(r)?[..c].to_vec()))
            .collect()
    }

    fn broadcast(&self, root: usize, buf: &mut [f32]) -> DistResult<()> {
        check_peer(self, "broadcast", root)?;
        let mut d = self.to_device(buf)?;
        self.nccl
            .broadcast_in_place(&mut d, root as i32)
            .map_err(backend_err)?;
        self.finish("broadcast")?;
        buf.copy_from_slice(&self.to_host(&d)?);
        Ok(())
    }

    fn barrier(&self) -> DistResult<()> {
        let mut one = [0f32];
        self.all_reduce_sum(&mut one)
    }

    fn send(&self, dst: usize, tag: u32, data: &[f32]) -> DistResult<()> {
        check_peer(self, "send", dst)?;
        // NCCL has no tags: the length goes first over the bootstrap group, tagged.
        self.bootstrap.send(dst, tag, &[data.len() as f32])?;
        let d = self.to_device(data)?;
        self.nccl.send(&d, dst as i32).map_err(backend_err)?;
        self.finish("send")
    }

    fn recv(&self, src: usize, tag: u32) -> DistResult<Vec<f32>> {
        check_peer(self, "recv", src)?;
        let len = self.bootstrap.recv(src, tag)?[0] as usize;
        let mut d = self.zeros(len.max(1))?;
        self.nccl.recv(&mut d, src as i32).map_err(backend_err)?;
        self.finish("recv")?;
        Ok(self.to_host(&d)?[..len].to_vec())
    }

    fn split(&self, color: usize, key: usize) -> DistResult<Box<dyn Comm>> {
        let sub = self.bootstrap.split(color, key)?;
        let ordinal = self.nccl.ordinal();
        Ok(Box::new(NcclComm::new(sub, ordinal, self.timeout)?))
    }
}
