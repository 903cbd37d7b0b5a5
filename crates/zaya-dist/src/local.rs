//! Local ranks: each rank is a thread of this process and messages are moved through one
//! shared mailbox. Used by unit tests and by single-machine runs (`zaya forward --tp 2`).
//!
//! A rank that returns (with a result, an error or a panic) is marked gone; a peer waiting
//! for a message from it gets [`DistError::PeerGone`] naming it instead of waiting for ever,
//! and every wait has the world's deadline.

use std::collections::{HashMap, VecDeque};
use std::fmt::Display;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::comm::{check_chunks, check_peer, split_members, Comm, DistError, DistResult};

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
enum Tag {
    /// The `n`-th collective of a group.
    Collective(u64),
    User(u32),
}

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
struct Key {
    group: u64,
    /// World ranks.
    src: usize,
    dst: usize,
    tag: Tag,
}

#[derive(Default)]
struct State {
    boxes: HashMap<Key, VecDeque<Vec<f32>>>,
    /// Why each world rank is gone (`None` while it runs).
    gone: Vec<Option<String>>,
}

struct Shared {
    size: usize,
    timeout: Duration,
    state: Mutex<State>,
    arrived: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A rank that panicked while holding the lock leaves consistent data (every update
        // is a single push or pop), so the poison flag is ignored.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// `size` ranks sharing one mailbox.
#[derive(Clone)]
pub struct LocalWorld {
    shared: Arc<Shared>,
}

/// Why a local rank did not return a value.
#[derive(Debug, thiserror::Error)]
pub enum RankFailed<E> {
    #[error("rank {rank} failed: {error}")]
    Error { rank: usize, error: E },
    #[error("rank {rank} panicked: {message}")]
    Panicked { rank: usize, message: String },
}

impl LocalWorld {
    /// A world of `size` ranks whose collectives give up after `timeout`.
    pub fn new(size: usize, timeout: Duration) -> DistResult<Self> {
        if size == 0 {
            return Err(DistError::Backend {
                backend: "local",
                message: "a world needs at least one rank".into(),
            });
        }
        Ok(LocalWorld {
            shared: Arc::new(Shared {
                size,
                timeout,
                state: Mutex::new(State {
                    boxes: HashMap::new(),
                    gone: vec![None; size],
                }),
                arrived: Condvar::new(),
            }),
        })
    }

    pub fn size(&self) -> usize {
        self.shared.size
    }

    /// The world communicator of `rank`. Each rank must use its own (one thread per rank).
    pub fn comm(&self, rank: usize) -> LocalComm {
        LocalComm {
            shared: Arc::clone(&self.shared),
            group: 0,
            members: Arc::new((0..self.shared.size).collect()),
            rank,
            seq: AtomicU64::new(0),
            splits: AtomicU64::new(0),
        }
    }

    /// Marks `rank` gone: peers waiting on it fail at once with `why`.
    pub fn mark_gone(&self, rank: usize, why: impl Into<String>) {
        let mut st = self.shared.lock();
        if st.gone[rank].is_none() {
            st.gone[rank] = Some(why.into());
        }
        drop(st);
        self.shared.arrived.notify_all();
    }

    /// Runs `f` on every rank, one thread each, and returns each rank's outcome in rank
    /// order. A rank that fails or panics is marked gone, so the others stop at their next
    /// collective with an error naming it.
    pub fn run<T, E, F>(&self, f: F) -> Vec<Result<T, RankFailed<E>>>
    where
        T: Send,
        E: Send + Display,
        F: Fn(LocalComm) -> Result<T, E> + Sync,
    {
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..self.size())
                .map(|rank| {
                    let comm = self.comm(rank);
                    let f = &f;
                    let world = self.clone();
                    std::thread::Builder::new()
                        .name(format!("rank-{rank}"))
                        .spawn_scoped(s, move || {
                            let out =
                                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(comm)));
                            let why = match &out {
                                Ok(Ok(_)) => "finished".to_string(),
                                Ok(Err(e)) => format!("failed: {e}"),
                                Err(p) => format!("panicked: {}", panic_text(p.as_ref())),
                            };
                            world.mark_gone(rank, why);
                            match out {
                                Ok(Ok(v)) => Ok(v),
                                Ok(Err(error)) => Err(RankFailed::Error { rank, error }),
                                Err(p) => Err(RankFailed::Panicked {
                                    rank,
                                    message: panic_text(p.as_ref()),
                                }),
                            }
                        })
                        .expect("spawning a rank thread")
                })
                .collect();
            handles
                .into_iter()
                .enumerate()
                .map(|(rank, h)| {
                    h.join().unwrap_or_else(|p| {
                        Err(RankFailed::Panicked {
                            rank,
                            message: panic_text(p.as_ref()),
                        })
                    })
                })
                .collect()
        })
    }
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".into()
    }
}

/// One rank's handle on a group of local ranks.
pub struct LocalComm {
    shared: Arc<Shared>,
    /// Group id (0 = world); ids of split groups are derived from the parent's id, the
    /// split's sequence number and the color, so every member computes the same one.
    group: u64,
    /// World rank of each member.
    members: Arc<Vec<usize>>,
    rank: usize,
    /// Collectives issued so far (every member issues the same sequence).
    seq: AtomicU64,
    splits: AtomicU64,
}

fn mix(a: u64, b: u64) -> u64 {
    // splitmix64 finaliser over a combination: distinct inputs give distinct ids in practice.
    let mut z = a
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(b)
        .wrapping_add(0x632B_E59B_D9B4_E019);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl LocalComm {
    fn me(&self) -> usize {
        self.members[self.rank]
    }

    fn post(&self, dst: usize, tag: Tag, data: Vec<f32>) {
        let key = Key {
            group: self.group,
            src: self.me(),
            dst: self.members[dst],
            tag,
        };
        self.shared
            .lock()
            .boxes
            .entry(key)
            .or_default()
            .push_back(data);
        self.shared.arrived.notify_all();
    }

    fn take(&self, src: usize, tag: Tag, op: &'static str) -> DistResult<Vec<f32>> {
        let src_world = self.members[src];
        let key = Key {
            group: self.group,
            src: src_world,
            dst: self.me(),
            tag,
        };
        let deadline = Instant::now() + self.shared.timeout;
        let mut st = self.shared.lock();
        loop {
            if let Some(q) = st.boxes.get_mut(&key) {
                if let Some(v) = q.pop_front() {
                    if q.is_empty() {
                        st.boxes.remove(&key);
                    }
                    return Ok(v);
                }
            }
            if let Some(why) = &st.gone[src_world] {
                return Err(DistError::PeerGone {
                    rank: self.me(),
                    op,
                    peer: src_world,
                    why: why.clone(),
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(DistError::Timeout {
                    rank: self.me(),
                    op,
                    peer: src_world,
                    after: self.shared.timeout,
                });
            }
            st = self
                .shared
                .arrived
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn next_tag(&self) -> Tag {
        Tag::Collective(self.seq.fetch_add(1, Ordering::SeqCst))
    }

    /// Every member's `data`, by rank (this member's own included).
    fn exchange_all(&self, data: &[f32], op: &'static str) -> DistResult<Vec<Vec<f32>>> {
        let tag = self.next_tag();
        for dst in 0..self.size() {
            if dst != self.rank {
                self.post(dst, tag, data.to_vec());
            }
        }
        (0..self.size())
            .map(|src| {
                if src == self.rank {
                    Ok(data.to_vec())
                } else {
                    self.take(src, tag, op)
                }
            })
            .collect()
    }

    fn check_len(&self, op: &'static str, src: usize, got: usize, want: usize) -> DistResult<()> {
        if got != want {
            return Err(DistError::Invalid {
                rank: self.me(),
                op,
                message: format!(
                    "rank {} sent {got} values, this rank {want}",
                    self.members[src]
                ),
            });
        }
        Ok(())
    }
}

impl Comm for LocalComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.members.len()
    }

    fn world_rank(&self) -> usize {
        self.me()
    }

    fn backend(&self) -> &'static str {
        "local"
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> DistResult<()> {
        let parts = self.exchange_all(buf, "all_reduce")?;
        for (src, p) in parts.iter().enumerate() {
            self.check_len("all_reduce", src, p.len(), buf.len())?;
        }
        // Summed in rank order on every member: identical bits everywhere.
        for (i, out) in buf.iter_mut().enumerate() {
            let mut acc = parts[0][i];
            for p in &parts[1..] {
                acc += p[i];
            }
            *out = acc;
        }
        Ok(())
    }

    fn all_gather(&self, send: &[f32]) -> DistResult<Vec<f32>> {
        let parts = self.exchange_all(send, "all_gather")?;
        for (src, p) in parts.iter().enumerate() {
            self.check_len("all_gather", src, p.len(), send.len())?;
        }
        Ok(parts.concat())
    }

    fn reduce_scatter_sum(&self, send: &[f32]) -> DistResult<Vec<f32>> {
        let chunk = check_chunks(self, "reduce_scatter", send.len())?;
        let tag = self.next_tag();
        for dst in 0..self.size() {
            if dst != self.rank {
                self.post(dst, tag, send[dst * chunk..(dst + 1) * chunk].to_vec());
            }
        }
        let mine = &send[self.rank * chunk..(self.rank + 1) * chunk];
        let mut parts = Vec::with_capacity(self.size());
        for src in 0..self.size() {
            if src == self.rank {
                parts.push(mine.to_vec());
            } else {
                let p = self.take(src, tag, "reduce_scatter")?;
                self.check_len("reduce_scatter", src, p.len(), chunk)?;
                parts.push(p);
            }
        }
        let mut out = parts[0].clone();
        for p in &parts[1..] {
            for (o, v) in out.iter_mut().zip(p) {
                *o += v;
            }
        }
        Ok(out)
    }

    fn all_to_all_v(&self, send: &[Vec<f32>]) -> DistResult<Vec<Vec<f32>>> {
        if send.len() != self.size() {
            return Err(DistError::Invalid {
                rank: self.me(),
                op: "all_to_all",
                message: format!("{} send buffers for a group of {}", send.len(), self.size()),
            });
        }
        let tag = self.next_tag();
        for (dst, data) in send.iter().enumerate() {
            if dst != self.rank {
                self.post(dst, tag, data.clone());
            }
        }
        (0..self.size())
            .map(|src| {
                if src == self.rank {
                    Ok(send[src].clone())
                } else {
                    self.take(src, tag, "all_to_all")
                }
            })
            .collect()
    }

    fn broadcast(&self, root: usize, buf: &mut [f32]) -> DistResult<()> {
        check_peer(self, "broadcast", root)?;
        let tag = self.next_tag();
        if self.rank == root {
            for dst in 0..self.size() {
                if dst != root {
                    self.post(dst, tag, buf.to_vec());
                }
            }
        } else {
            let v = self.take(root, tag, "broadcast")?;
            self.check_len("broadcast", root, v.len(), buf.len())?;
            buf.copy_from_slice(&v);
        }
        Ok(())
    }

    fn barrier(&self) -> DistResult<()> {
        self.exchange_all(&[], "barrier").map(|_| ())
    }

    fn send(&self, dst: usize, tag: u32, data: &[f32]) -> DistResult<()> {
        check_peer(self, "send", dst)?;
        self.post(dst, Tag::User(tag), data.to_vec());
        Ok(())
    }

    fn recv(&self, src: usize, tag: u32) -> DistResult<Vec<f32>> {
        check_peer(self, "recv", src)?;
        self.take(src, Tag::User(tag), "recv")
    }

    fn split(&self, color: usize, key: usize) -> DistResult<Box<dyn Comm>> {
        let n = self.splits.fetch_add(1, Ordering::SeqCst);
        let all = self.all_gather(&[color as f32, key as f32])?;
        let pairs: Vec<(usize, usize)> = all
            .chunks(2)
            .map(|c| (c[0] as usize, c[1] as usize))
            .collect();
        let parent_members = split_members(&pairs, color);
        let members: Vec<usize> = parent_members.iter().map(|&p| self.members[p]).collect();
        let rank = parent_members
            .iter()
            .position(|&p| p == self.rank)
            .expect("a member belongs to its own color");
        Ok(Box::new(LocalComm {
            shared: Arc::clone(&self.shared),
            group: mix(mix(self.group, n), color as u64 + 1),
            members: Arc::new(members),
            rank,
            seq: AtomicU64::new(0),
            splits: AtomicU64::new(0),
        }))
    }
}
