//! The collective interface every parallel layer talks to, whatever moves the bytes: local
//! ranks (threads of one process), MPI processes, or NCCL on GPUs.
//!
//! Buffers are `f32` (activations, gradients and the residual stream are f32 in every
//! parallel path; token ids below 2^24 are exact in f32). Every call has a deadline: a
//! peer that never arrives is a [`DistError::Timeout`] naming the rank that waited and the
//! one it waited for, and a peer that is known to have exited is a
//! [`DistError::PeerGone`] at once, so a dead rank never hangs the others.

use std::time::Duration;

/// What a collective can fail with. Every variant names the rank that saw the failure.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum DistError {
    #[error("rank {rank}: {op} timed out after {after:?} waiting for rank {peer}")]
    Timeout {
        rank: usize,
        op: &'static str,
        /// The rank (in the world) whose message never came.
        peer: usize,
        after: Duration,
    },
    #[error("rank {rank}: {op}: rank {peer} has exited ({why})")]
    PeerGone {
        rank: usize,
        op: &'static str,
        peer: usize,
        why: String,
    },
    #[error("rank {rank}: {op}: {message}")]
    Invalid {
        rank: usize,
        op: &'static str,
        message: String,
    },
    #[error("{backend} backend: {message}")]
    Backend {
        backend: &'static str,
        message: String,
    },
}

pub type DistResult<T> = std::result::Result<T, DistError>;

/// Default deadline of one collective: long enough for a 8B-layer all-reduce on a loaded
/// machine, short enough that a lost rank is reported in minutes.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// A group of ranks and the collectives among them. Every member must call the same
/// collectives in the same order (as in MPI); point-to-point calls are matched by
/// `(source, tag)`.
///
/// Sums are computed in rank order on every member, so all members hold bit-identical
/// results (replicated decisions such as the router's top-1 never diverge between ranks).
pub trait Comm: Send + Sync {
    /// This member's index in the group, `0..size`.
    fn rank(&self) -> usize;
    /// Number of members.
    fn size(&self) -> usize;
    /// This member's rank in the whole world (for error messages).
    fn world_rank(&self) -> usize;
    /// Name of the backend (`local`, `mpi`, `nccl`).
    fn backend(&self) -> &'static str;

    /// Element-wise sum over all members, in place.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> DistResult<()>;
    /// Concatenation of every member's `send` (all the same length), in rank order.
    fn all_gather(&self, send: &[f32]) -> DistResult<Vec<f32>>;
    /// `send` is `size` equal chunks; member `r` gets the sum over members of chunk `r`.
    fn reduce_scatter_sum(&self, send: &[f32]) -> DistResult<Vec<f32>>;
    /// `send[r]` goes to member `r`; returns what each member sent here, by source.
    fn all_to_all_v(&self, send: &[Vec<f32>]) -> DistResult<Vec<Vec<f32>>>;
    /// `root`'s buffer copied into every member's `buf` (same length everywhere).
    fn broadcast(&self, root: usize, buf: &mut [f32]) -> DistResult<()>;
    fn barrier(&self) -> DistResult<()>;
    fn send(&self, dst: usize, tag: u32, data: &[f32]) -> DistResult<()>;
    fn recv(&self, src: usize, tag: u32) -> DistResult<Vec<f32>>;
    /// Sends `data` to `dst` and receives from `src` as one exchange, neither waiting for
    /// the other to finish first: two neighbours that both send before they receive (the
    /// pipeline's send-forward / receive-backward pairs) would deadlock on sends that wait
    /// for their receiver. The default suits backends whose sends never wait (local ranks).
    fn send_recv(
        &self,
        dst: usize,
        send_tag: u32,
        data: &[f32],
        src: usize,
        recv_tag: u32,
    ) -> DistResult<Vec<f32>> {
        self.send(dst, send_tag, data)?;
        self.recv(src, recv_tag)
    }
    /// Collective over this group: members with the same `color` form a new group, ordered
    /// by `(key, rank)` (MPI's `Comm_split`).
    fn split(&self, color: usize, key: usize) -> DistResult<Box<dyn Comm>>;
}

/// Checks shared by the backends: a peer index inside the group.
pub(crate) fn check_peer(comm: &dyn Comm, op: &'static str, peer: usize) -> DistResult<()> {
    if peer >= comm.size() {
        return Err(DistError::Invalid {
            rank: comm.world_rank(),
            op,
            message: format!("peer {peer} is outside a group of {}", comm.size()),
        });
    }
    Ok(())
}

/// `send.len()` must be a multiple of the group size for a reduce-scatter.
pub(crate) fn check_chunks(comm: &dyn Comm, op: &'static str, len: usize) -> DistResult<usize> {
    if !len.is_multiple_of(comm.size()) {
        return Err(DistError::Invalid {
            rank: comm.world_rank(),
            op,
            message: format!(
                "buffer of {len} values does not split into {} equal chunks",
                comm.size()
            ),
        });
    }
    Ok(len / comm.size())
}

/// A length as two f32 values, each exact (below 2^24): the high and low 24 bits. Counts
/// travel through the f32 collectives of [`Comm`]; one f32 would round lengths above 2^24
/// (an expert's rows of an 8B layer can exceed that).
#[cfg_attr(not(feature = "nccl"), allow(dead_code))]
pub(crate) fn len_to_f32s(n: usize) -> [f32; 2] {
    [(n >> 24) as f32, (n & 0xff_ffff) as f32]
}

/// Inverse of [`len_to_f32s`].
#[cfg_attr(not(feature = "nccl"), allow(dead_code))]
pub(crate) fn len_from_f32s(v: [f32; 2]) -> usize {
    ((v[0] as usize) << 24) | v[1] as usize
}

/// Members of the new group of `color` from every member's `(color, key)`, as indices in
/// the parent group ordered by `(key, parent rank)`.
pub(crate) fn split_members(colors_keys: &[(usize, usize)], color: usize) -> Vec<usize> {
    let mut m: Vec<(usize, usize)> = colors_keys
        .iter()
        .enumerate()
        .filter(|(_, (c, _))| *c == color)
        .map(|(r, (_, k))| (*k, r))
        .collect();
    m.sort();
    m.into_iter().map(|(_, r)| r).collect()
}

/// True when this process was started by an MPI launcher (`mpirun`, `mpiexec`, `srun`):
/// known in every build, so a build without MPI can refuse to run as one of many copies.
pub fn launched_by_mpi() -> bool {
    [
        "OMPI_COMM_WORLD_SIZE",
        "PMI_SIZE",
        "PMIX_RANK",
        "MPI_LOCALNRANKS",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_survive_the_f32_encoding_beyond_2_pow_24() {
        for n in [
            0,
            1,
            (1 << 24) - 1,
            1 << 24,
            (1 << 24) + 1,
            537_133_056,
            (1 << 40) + 77,
        ] {
            assert_eq!(len_from_f32s(len_to_f32s(n)), n, "{n}");
        }
        // the single-f32 encoding it replaces would not
        assert_ne!(((1usize << 24) + 1) as f32 as usize, (1 << 24) + 1);
    }
}
