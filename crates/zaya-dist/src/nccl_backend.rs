//! NCCL on NVIDIA GPUs through cudarc, with `libcuda` / `libnccl` loaded at run time (the
//! crate builds on machines without CUDA; a run without them fails with a typed error,
//! never a panic).
//!
//! A bootstrap communicator (MPI processes, one per GPU) carries NCCL's unique id to every
//! member and the lengths of all-to-all parts, builds sub-groups, and carries the
//! point-to-point messages (see [`Comm::send`] below: tagged, and never fused with a
//! receive they would deadlock on). The buffers of the [`Comm`] interface live on the host, so each call stages
//! them through the rank's GPU: copy in, NCCL collective on the rank's stream, copy out.
//! Completion is polled against the deadline through a CUDA event; a call that misses it
//! returns [`DistError::Timeout`], and the NCCL communicator is aborted when the comm is
//! dropped (`ncclCommAbort`, cudarc's `Drop`), so no rank waits on it forever.
//!
//! Every collective first checks over the bootstrap group that all members passed the same
//! length: NCCL trusts the count it is given and would read or write past a shorter buffer.
//!
//! Reductions use `ncclAllReduce` / `ncclReduceScatter`, whose ring and tree algorithms
//! give every rank the same bits (each chunk is reduced once and then copied), but not in
//! rank order: results may differ from the host backends in the last bit.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use cudarc::nccl::safe::{Comm as NcclRaw, Id, ReduceOp};

use crate::comm::{check_chunks, check_peer, len_from_f32s, len_to_f32s};
use crate::comm::{Comm, DistError, DistResult};

fn invalid(rank: usize, op: &'static str, message: String) -> DistError {
    DistError::Invalid { rank, op, message }
}

fn backend_err(e: impl std::fmt::Debug) -> DistError {
    let message = format!("{e:?}");
    let hint = if message.contains("InvalidUsage") {
        " (two ranks on one GPU? NCCL needs a GPU of its own for every rank of a node; \
         NCCL_DEBUG=WARN says more)"
    } else {
        ""
    };
    DistError::Backend {
        backend: "nccl",
        message: format!("{message}{hint}"),
    }
}

/// Loads `libcuda` and `libnccl` once. cudarc panics when a library or one of the symbols it
/// binds is missing; that becomes an error saying where it looked.
pub fn load_libraries() -> DistResult<()> {
    static LOADED: OnceLock<Result<(), String>> = OnceLock::new();
    let got = LOADED.get_or_init(|| {
        // SAFETY: as below. Asked first so that a machine without the libraries gets the
        // error without a caught panic's message on stderr.
        let present = unsafe {
            std::panic::catch_unwind(|| {
                [
                    ("libcuda", cudarc::driver::sys::is_culib_present()),
                    ("libnccl", cudarc::nccl::sys::is_culib_present()),
                ]
            })
        };
        if let Ok(present) = present {
            let missing: Vec<&str> = present.iter().filter(|p| !p.1).map(|p| p.0).collect();
            if !missing.is_empty() {
                return Err(format!("{} not found", missing.join(" and ")));
            }
        }
        std::panic::catch_unwind(|| {
            // SAFETY: loading the libraries runs their initialisers only.
            unsafe {
                cudarc::driver::sys::culib();
                cudarc::nccl::sys::culib();
            }
        })
        .map_err(|p| {
            p.downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "loading libcuda / libnccl failed".into())
        })
    });
    got.clone().map_err(|m| {
        let mut hints = Vec::new();
        if m.contains("libcuda") {
            hints
                .push("the NVIDIA driver's libcuda.so / libcuda.so.1 must be on the loader's path");
        }
        if m.contains("libnccl") {
            hints.push(
                "cudarc looks for libnccl.so (or libnccl.so.12/.11/.10/.1) on the loader's \
                 path; where only libnccl.so.2 is installed (the libnccl2 package, the \
                 nvidia-nccl pip wheel), put a link named libnccl.so to it in a folder on \
                 LD_LIBRARY_PATH",
            );
        }
        let hint = if hints.is_empty() {
            String::new()
        } else {
            format!(": {}", hints.join("; "))
        };
        DistError::Backend {
            backend: "nccl",
            message: format!("{m}{hint}"),
        }
    })
}

/// Number of CUDA devices this process sees.
pub fn gpu_count() -> DistResult<usize> {
    load_libraries()?;
    let n = CudaContext::device_count().map_err(backend_err)?;
    Ok(n.max(0) as usize)
}

/// This process's index among the ranks of its node, from the launcher's environment
/// (Open MPI, MPICH / Hydra, Slurm, torchrun), else `world_rank` (one node).
pub fn node_local_rank(world_rank: usize) -> usize {
    [
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "MPI_LOCALRANKID",
        "SLURM_LOCALID",
        "LOCAL_RANK",
    ]
    .iter()
    .find_map(|v| std::env::var(v).ok()?.parse().ok())
    .unwrap_or(world_rank)
}

/// One rank's NCCL communicator on GPU `ordinal`.
pub struct NcclComm {
    nccl: NcclRaw,
    stream: Arc<CudaStream>,
    bootstrap: Box<dyn Comm>,
    timeout: Duration,
}

// SAFETY: every call binds the communicator's context to the calling thread first, and the
// [`Comm`] contract has one call at a time per member (as MPI's serialized threading).
unsafe impl Send for NcclComm {}
unsafe impl Sync for NcclComm {}

impl NcclComm {
    /// Collective over `bootstrap`: member 0 creates the NCCL id, every member joins the
    /// NCCL communicator of the same membership on GPU `ordinal`.
    pub fn new(bootstrap: Box<dyn Comm>, ordinal: usize, timeout: Duration) -> DistResult<Self> {
        load_libraries()?;
        // the id's 128 bytes travel as f32 values 0..=255 (exact)
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
        ctx.bind_to_thread().map_err(backend_err)?;
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

    /// [`NcclComm::new`] on this process's GPU: its node-local rank modulo the GPUs it sees.
    pub fn on_node_gpu(bootstrap: Box<dyn Comm>, timeout: Duration) -> DistResult<Self> {
        let gpus = gpu_count()?;
        if gpus == 0 {
            return Err(DistError::Backend {
                backend: "nccl",
                message: format!(
                    "rank {}: no CUDA device is visible (CUDA_VISIBLE_DEVICES={:?})",
                    bootstrap.world_rank(),
                    std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_default()
                ),
            });
        }
        let ordinal = node_local_rank(bootstrap.world_rank()) % gpus;
        Self::new(bootstrap, ordinal, timeout)
    }

    /// The GPU this communicator runs on.
    pub fn ordinal(&self) -> usize {
        self.nccl.ordinal()
    }

    /// Makes this rank's context current on the calling thread (a server's engine thread
    /// is not the one that built the comm).
    fn bind(&self) -> DistResult<()> {
        self.stream.context().bind_to_thread().map_err(backend_err)
    }

    fn to_device(&self, data: &[f32]) -> DistResult<CudaSlice<f32>> {
        // a zero-length device allocation is refused: keep one element
        if data.is_empty() {
            return self.zeros(0);
        }
        self.stream.memcpy_stod(data).map_err(backend_err)
    }

    fn zeros(&self, n: usize) -> DistResult<CudaSlice<f32>> {
        self.stream
            .alloc_zeros::<f32>(n.max(1))
            .map_err(backend_err)
    }

    /// Waits for the stream's work until the deadline.
    fn finish(&self, op: &'static str) -> DistResult<()> {
        let event = self.stream.record_event(None).map_err(backend_err)?;
        let deadline = Instant::now() + self.timeout;
        let mut pause = Duration::from_micros(5);
        while !event.is_complete() {
            if Instant::now() >= deadline {
                return Err(DistError::Timeout {
                    rank: self.world_rank(),
                    op,
                    peer: self.world_rank(),
                    after: self.timeout,
                });
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(1));
        }
        Ok(())
    }

    fn to_host(&self, d: &CudaSlice<f32>, len: usize) -> DistResult<Vec<f32>> {
        let mut v = self.stream.memcpy_dtov(d).map_err(backend_err)?;
        v.truncate(len);
        Ok(v)
    }

    /// Every member passed `len` values (over the bootstrap group).
    fn check_same_len(&self, op: &'static str, len: usize) -> DistResult<()> {
        let all = self.bootstrap.all_gather(&len_to_f32s(len))?;
        for (r, l) in all.chunks_exact(2).enumerate() {
            let l = len_from_f32s([l[0], l[1]]);
            if l != len {
                return Err(invalid(
                    self.world_rank(),
                    op,
                    format!("member {r} passed {l} values, this member {len}"),
                ));
            }
        }
        Ok(())
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
        self.check_same_len("all_reduce", buf.len())?;
        if buf.is_empty() {
            return Ok(());
        }
        self.bind()?;
        let send = self.to_device(buf)?;
        let mut recv = self.zeros(buf.len())?;
        self.nccl
            .all_reduce(&send, &mut recv, &ReduceOp::Sum)
            .map_err(backend_err)?;
        self.finish("all_reduce")?;
        buf.copy_from_slice(&self.to_host(&recv, buf.len())?);
        Ok(())
    }

    fn all_gather(&self, send: &[f32]) -> DistResult<Vec<f32>> {
        self.check_same_len("all_gather", send.len())?;
        if send.is_empty() {
            return Ok(Vec::new());
        }
        self.bind()?;
        let s = self.to_device(send)?;
        let mut recv = self.zeros(send.len() * self.size())?;
        self.nccl.all_gather(&s, &mut recv).map_err(backend_err)?;
        self.finish("all_gather")?;
        self.to_host(&recv, send.len() * self.size())
    }

    fn reduce_scatter_sum(&self, send: &[f32]) -> DistResult<Vec<f32>> {
        let chunk = check_chunks(self, "reduce_scatter", send.len())?;
        self.check_same_len("reduce_scatter", send.len())?;
        if chunk == 0 {
            return Ok(Vec::new());
        }
        self.bind()?;
        let s = self.to_device(send)?;
        let mut recv = self.zeros(chunk)?;
        self.nccl
            .reduce_scatter(&s, &mut recv, &ReduceOp::Sum)
            .map_err(backend_err)?;
        self.finish("reduce_scatter")?;
        self.to_host(&recv, chunk)
    }

    fn all_to_all_v(&self, send: &[Vec<f32>]) -> DistResult<Vec<Vec<f32>>> {
        let n = self.size();
        if send.len() != n {
            return Err(invalid(
                self.world_rank(),
                "all_to_all",
                format!("{} send buffers for a group of {n}", send.len()),
            ));
        }
        // sizes travel over the bootstrap group; the payload as grouped NCCL send/recv
        let counts: Vec<f32> = send.iter().flat_map(|s| len_to_f32s(s.len())).collect();
        let all = self.bootstrap.all_gather(&counts)?;
        let me = self.rank();
        let recv_counts: Vec<usize> = (0..n)
            .map(|src| len_from_f32s([all[2 * (src * n + me)], all[2 * (src * n + me) + 1]]))
            .collect();
        self.bind()?;
        let sends = send
            .iter()
            .map(|s| self.to_device(s))
            .collect::<DistResult<Vec<_>>>()?;
        let mut recvs = recv_counts
            .iter()
            .map(|&c| self.zeros(c))
            .collect::<DistResult<Vec<_>>>()?;
        cudarc::nccl::safe::group_start().map_err(backend_err)?;
        for peer in 0..n {
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
            .map(|(r, &c)| {
                if c == 0 {
                    Ok(Vec::new())
                } else {
                    self.to_host(r, c)
                }
            })
            .collect()
    }

    fn broadcast(&self, root: usize, buf: &mut [f32]) -> DistResult<()> {
        check_peer(self, "broadcast", root)?;
        self.check_same_len("broadcast", buf.len())?;
        if buf.is_empty() {
            return Ok(());
        }
        self.bind()?;
        let mut d = self.to_device(buf)?;
        self.nccl
            .broadcast_in_place(&mut d, root as i32)
            .map_err(backend_err)?;
        self.finish("broadcast")?;
        buf.copy_from_slice(&self.to_host(&d, buf.len())?);
        Ok(())
    }

    fn barrier(&self) -> DistResult<()> {
        let mut one = [0f32];
        self.all_reduce_sum(&mut one)
    }

    // Point-to-point messages travel over the bootstrap group (MPI). They carry tags and
    // lengths NCCL has no notion of, and NCCL's sends wait for their receive: the
    // pipeline's fused send-forward / receive-backward (`send_recv`) would then wait on a
    // neighbour that is itself waiting for the payload of that send (seen on a GPU, a
    // PP 2 × DP 2 training step hung). The bulk collectives stay on NCCL.
    fn send(&self, dst: usize, tag: u32, data: &[f32]) -> DistResult<()> {
        self.bootstrap.send(dst, tag, data)
    }

    fn recv(&self, src: usize, tag: u32) -> DistResult<Vec<f32>> {
        self.bootstrap.recv(src, tag)
    }

    fn send_recv(
        &self,
        dst: usize,
        send_tag: u32,
        data: &[f32],
        src: usize,
        recv_tag: u32,
    ) -> DistResult<Vec<f32>> {
        self.bootstrap.send_recv(dst, send_tag, data, src, recv_tag)
    }

    fn split(&self, color: usize, key: usize) -> DistResult<Box<dyn Comm>> {
        let sub = self.bootstrap.split(color, key)?;
        Ok(Box::new(NcclComm::new(sub, self.ordinal(), self.timeout)?))
    }
}
