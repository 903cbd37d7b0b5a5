//! Checkpoints of a sharded run written by world rank 0 a bounded piece at a time.
//!
//! A parallel run's checkpoint is the single-process one (`model.safetensors`,
//! `optimizer.safetensors`: the same names, order and bytes), but no rank may hold the
//! whole model: ZAYA1-8B's f32 master weights are 35 GB and its AdamW moments 70 GB, on
//! ranks of 24 GB. So rank 0 writes each file with the streaming writers
//! ([`zaya::weights::save_checkpoint_streamed`], [`zaya::train::optim::AdamW::save_state_streamed`])
//! and fetches the data as the writer reaches it, in the file's order, which every rank
//! computes ([`zaya::safetensors_io::file_order`]):
//!
//! - [`plan_messages`] cuts the file's tensors into messages of at most a configured number
//!   of values, each from the one rank that holds them: consecutive tensors of the same
//!   rank share a message, a tensor larger than the bound is split over several;
//! - a sender sends a message only when rank 0 asks for it (a one-value request), so no
//!   transport (MPI's eager buffers, the in-process channels) queues more than one message
//!   on rank 0: rank 0 holds one message, plus the writer's buffer, never the model.
//!
//! i64 tensors (AdamW's step counts) travel as pairs of f32 ([`split_f64`]: value and
//! rounding error, exact to 2⁴⁸), since the communicators move f32.

use std::ops::Range;

use candle_core::DType;
use zaya::safetensors_io::{PlannedTensor, TensorSink};
use zaya::ZayaError;

use crate::comm::Comm;
use crate::error::{ParallelError, ParallelResult};
use crate::train_driver::{join_f64, split_f64};

/// Default bound on one gather message (and so on what rank 0 holds while writing): 256 MiB
/// of f32 values.
pub const DEFAULT_GATHER_BYTES: usize = 256 << 20;

/// Tags of the streaming exchange (distinct from the drivers' other point-to-point tags).
pub(crate) const TAG_PIECE: u32 = (1 << 30) + 2;
pub(crate) const TAG_READY: u32 = (1 << 30) + 3;

/// f32 values a tensor takes on the wire: one per element, two per i64 element.
pub(crate) fn wire_len(t: &PlannedTensor) -> usize {
    let n: usize = t.shape.iter().product();
    if t.dtype == DType::I64 {
        2 * n
    } else {
        n
    }
}

/// A run of one tensor's wire values.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Piece {
    /// Index into the file-ordered tensor list.
    pub(crate) tensor: usize,
    pub(crate) range: Range<usize>,
}

/// One message of the exchange: pieces, back to back, all held by `owner` (a world rank).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Message {
    pub(crate) owner: usize,
    pub(crate) pieces: Vec<Piece>,
    pub(crate) len: usize,
}

/// The messages that carry tensors of `lens` wire values (in file order), tensor `i` held
/// by world rank `owners[i]`, each of at most `max(bound, 2)` values (rounded down to an
/// even count, so an i64 pair is never cut). Every rank computes the same list.
pub(crate) fn plan_messages(lens: &[usize], owners: &[usize], bound: usize) -> Vec<Message> {
    let bound = (bound.max(2)) & !1;
    let mut out: Vec<Message> = Vec::new();
    for (i, (&n, &owner)) in lens.iter().zip(owners).enumerate() {
        if n == 0 {
            continue;
        }
        if n > bound {
            for at in (0..n).step_by(bound) {
                let end = (at + bound).min(n);
                out.push(Message {
                    owner,
                    pieces: vec![Piece {
                        tensor: i,
                        range: at..end,
                    }],
                    len: end - at,
                });
            }
            continue;
        }
        match out.last_mut() {
            Some(m) if m.owner == owner && m.len + n <= bound => {
                m.pieces.push(Piece {
                    tensor: i,
                    range: 0..n,
                });
                m.len += n;
            }
            _ => out.push(Message {
                owner,
                pieces: vec![Piece {
                    tensor: i,
                    range: 0..n,
                }],
                len: n,
            }),
        }
    }
    out
}

/// This rank's wire values of tensor `i` (file order), elements `range`.
pub(crate) type Local<'a> = dyn Fn(usize, Range<usize>) -> ParallelResult<Vec<f32>> + 'a;

fn build(m: &Message, local: &Local) -> ParallelResult<Vec<f32>> {
    let mut buf = Vec::with_capacity(m.len);
    for p in &m.pieces {
        let v = local(p.tensor, p.range.clone())?;
        if v.len() != p.range.len() {
            return Err(ParallelError::Unsupported(format!(
                "tensor {} of the checkpoint: {} values for the range {:?}",
                p.tensor,
                v.len(),
                p.range
            )));
        }
        buf.extend(v);
    }
    Ok(buf)
}

/// A rank other than 0: sends the messages it owns, each when rank 0 asks for it.
pub(crate) fn serve_messages(
    world: &dyn Comm,
    msgs: &[Message],
    local: &Local,
) -> ParallelResult<()> {
    let me = world.rank();
    for m in msgs.iter().filter(|m| m.owner == me) {
        world.recv(0, TAG_READY)?;
        world.send(0, TAG_PIECE, &build(m, local)?)?;
    }
    Ok(())
}

/// Rank 0's side: hands the file writer each tensor's data in order, fetching one message
/// at a time (its own built locally, others' requested from their owner).
pub(crate) struct Gatherer<'a> {
    world: &'a dyn Comm,
    tensors: &'a [PlannedTensor],
    msgs: Vec<Message>,
    local: &'a Local<'a>,
    /// Next tensor the writer asks for.
    next: usize,
    /// Next message to load.
    next_msg: usize,
    /// The loaded message and the position of its next unread value.
    buf: Vec<f32>,
    at: usize,
    /// The most values held at once (one message), for the bound's tests.
    pub(crate) max_held: usize,
}

impl<'a> Gatherer<'a> {
    pub(crate) fn new(
        world: &'a dyn Comm,
        tensors: &'a [PlannedTensor],
        owners: &[usize],
        bound_values: usize,
        local: &'a Local<'a>,
    ) -> Self {
        let lens: Vec<usize> = tensors.iter().map(wire_len).collect();
        Gatherer {
            world,
            tensors,
            msgs: plan_messages(&lens, owners, bound_values),
            local,
            next: 0,
            next_msg: 0,
            buf: Vec::new(),
            at: 0,
            max_held: 0,
        }
    }

    /// The messages every rank must serve (the same plan on every rank).
    pub(crate) fn messages(&self) -> &[Message] {
        &self.msgs
    }

    fn load(&mut self) -> ParallelResult<()> {
        let m = self.msgs.get(self.next_msg).ok_or_else(|| {
            ParallelError::Unsupported("the checkpoint gather ran out of messages".into())
        })?;
        // drop the old message before the next one arrives
        self.buf = Vec::new();
        self.buf = if m.owner == 0 {
            build(m, self.local)?
        } else {
            self.world.send(m.owner, TAG_READY, &[0.0])?;
            self.world.recv(m.owner, TAG_PIECE)?
        };
        if self.buf.len() != m.len {
            return Err(ParallelError::Unsupported(format!(
                "rank {} sent {} checkpoint values, the plan's message holds {}",
                m.owner,
                self.buf.len(),
                m.len
            )));
        }
        self.max_held = self.max_held.max(self.buf.len());
        self.at = 0;
        self.next_msg += 1;
        Ok(())
    }

    /// The writer's fill callback: the data of `t`, which must be the next tensor.
    pub(crate) fn fill(&mut self, t: &PlannedTensor, sink: &mut TensorSink) -> zaya::Result<()> {
        let want = self.tensors.get(self.next).ok_or_else(|| {
            ZayaError::Input(format!("the writer asked for `{}` past the plan", t.name))
        })?;
        if want.name != t.name {
            return Err(ZayaError::Input(format!(
                "the writer asked for `{}`, the gather's plan has `{}` next",
                t.name, want.name
            )));
        }
        let mut left = wire_len(t);
        while left > 0 {
            if self.at == self.buf.len() {
                self.load().map_err(into_zaya)?;
            }
            let take = left.min(self.buf.len() - self.at);
            let vals = &self.buf[self.at..self.at + take];
            if t.dtype == DType::I64 {
                let v: Vec<i64> = vals.chunks(2).map(|p| join_f64(p) as i64).collect();
                sink.write_i64(&v)?;
            } else {
                sink.write_f32_as(vals, t.dtype)?;
            }
            self.at += take;
            left -= take;
        }
        self.next += 1;
        Ok(())
    }
}

/// `x` (an i64 step count) as its two wire values.
pub(crate) fn i64_wire(x: i64) -> [f32; 2] {
    split_f64(x as f64)
}

pub(crate) fn into_zaya(e: ParallelError) -> ZayaError {
    match e {
        ParallelError::Model(e) => e,
        other => ZayaError::Input(other.to_string()),
    }
}

/// The `write` of [`stream_file`] on ranks other than 0 (never called there).
pub(crate) fn not_root(
    _: &mut dyn FnMut(&PlannedTensor, &mut TensorSink) -> zaya::Result<()>,
) -> zaya::Result<()> {
    Ok(())
}

/// Collective over `world`: `tensors` (the file's tensors, in [`zaya::safetensors_io::file_order`],
/// tensor `i` held by world rank `owners[i]`) streamed to rank 0, where `write(fill)` writes
/// the file with the streaming writer; messages of at most `bound_bytes`. Returns the most
/// values rank 0 held at once (on rank 0; 0 elsewhere).
pub(crate) fn stream_file(
    world: &dyn Comm,
    tensors: &[PlannedTensor],
    owners: &[usize],
    bound_bytes: usize,
    local: &Local,
    write: impl FnOnce(
        &mut dyn FnMut(&PlannedTensor, &mut TensorSink) -> zaya::Result<()>,
    ) -> zaya::Result<()>,
) -> ParallelResult<usize> {
    let bound = bound_bytes / std::mem::size_of::<f32>();
    let mut g = Gatherer::new(world, tensors, owners, bound, local);
    if world.rank() != 0 {
        serve_messages(world, g.messages(), local)?;
        return Ok(0);
    }
    write(&mut |t, sink| g.fill(t, sink))?;
    if g.next != tensors.len() || g.next_msg != g.msgs.len() {
        return Err(ParallelError::Unsupported(format!(
            "the checkpoint writer took {} of {} tensors ({} of {} messages)",
            g.next,
            tensors.len(),
            g.next_msg,
            g.msgs.len()
        )));
    }
    Ok(g.max_held)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local::LocalWorld;
    use std::collections::HashMap;
    use std::time::Duration;

    #[test]
    fn messages_cover_every_value_once_within_the_bound() {
        let lens = [3, 5, 0, 2, 40, 1, 1, 7];
        let owners = [0, 0, 1, 1, 1, 2, 2, 2];
        for bound in [2, 3, 8, 16, 100] {
            let msgs = plan_messages(&lens, &owners, bound);
            let even = (bound.max(2)) & !1;
            let mut next = vec![0usize; lens.len()];
            let mut last = (0, 0);
            for m in &msgs {
                assert!(m.len <= even, "bound {bound}: a message of {}", m.len);
                assert_eq!(m.len, m.pieces.iter().map(|p| p.range.len()).sum::<usize>());
                for p in &m.pieces {
                    assert_eq!(owners[p.tensor], m.owner);
                    // in file order, contiguous, no value twice
                    assert!((p.tensor, p.range.start) >= last);
                    assert_eq!(p.range.start, next[p.tensor]);
                    next[p.tensor] = p.range.end;
                    last = (p.tensor, p.range.end);
                }
            }
            assert_eq!(next, lens.to_vec(), "bound {bound}");
        }
        // small tensors of one owner share a message; a change of owner starts a new one
        let msgs = plan_messages(&lens, &owners, 100);
        assert_eq!(msgs.iter().map(|m| m.owner).collect::<Vec<_>>(), [0, 1, 2]);
    }

    /// Three ranks, tensors spread over them (one larger than the bound, an i64 count): the
    /// streamed file equals the in-memory writer's, and rank 0 never held more than the
    /// bound.
    #[test]
    fn a_streamed_file_equals_the_in_memory_one_and_rank_0_holds_one_message() {
        let dir = std::env::temp_dir().join(format!("zaya-stream-save-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let dev = candle_core::Device::Cpu;
        let mut all: HashMap<String, candle_core::Tensor> = HashMap::new();
        let mut owner_of: HashMap<String, usize> = HashMap::new();
        for (k, (name, n, owner)) in [
            ("a.weight", 10, 0),
            ("b.weight", 300, 1),
            ("c.weight", 7, 2),
            ("d.weight", 5, 1),
            ("e.weight", 64, 2),
        ]
        .into_iter()
        .enumerate()
        {
            let v: Vec<f32> = (0..n)
                .map(|j| (k * 1000 + j) as f32 * 0.37 - 11.0)
                .collect();
            all.insert(
                name.into(),
                candle_core::Tensor::from_vec(v, n, &dev).unwrap(),
            );
            owner_of.insert(name.into(), owner);
        }
        all.insert(
            "step.x".into(),
            candle_core::Tensor::new(&[123_456_789i64], &dev).unwrap(),
        );
        owner_of.insert("step.x".into(), 2);
        let reference = dir.join("reference.safetensors");
        candle_core::safetensors::save(&all, &reference).unwrap();
        let planned: Vec<PlannedTensor> = all
            .iter()
            .map(|(n, t)| PlannedTensor {
                name: n.clone(),
                dtype: t.dtype(),
                shape: t.dims().to_vec(),
            })
            .collect();
        let ordered = zaya::safetensors_io::file_order(&planned).unwrap();
        let owners: Vec<usize> = ordered.iter().map(|t| owner_of[&t.name]).collect();
        let bound_bytes = 32 * 4;
        let out = dir.join("streamed.safetensors");
        let world = LocalWorld::new(3, Duration::from_secs(30)).unwrap();
        let held = world.run(|comm| -> ParallelResult<usize> {
            let me = comm.rank();
            let local = |i: usize, r: Range<usize>| -> ParallelResult<Vec<f32>> {
                let t = &all[&ordered[i].name];
                assert_eq!(
                    owners[i], me,
                    "rank {me} asked for a tensor it does not hold"
                );
                if t.dtype() == DType::I64 {
                    let v = t.to_vec1::<i64>()?;
                    let w: Vec<f32> = v.iter().flat_map(|&x| i64_wire(x)).collect();
                    return Ok(w[r].to_vec());
                }
                Ok(t.to_vec1::<f32>()?[r].to_vec())
            };
            stream_file(&comm, &ordered, &owners, bound_bytes, &local, |fill| {
                zaya::train::optim::AdamW::save_state_streamed(&out, &planned, fill)
            })
        });
        let held: Vec<usize> = held.into_iter().map(|r| r.unwrap()).collect();
        assert!(
            held[0] > 0 && held[0] <= 32,
            "rank 0 held {} values",
            held[0]
        );
        assert_eq!(
            std::fs::read(&reference).unwrap(),
            std::fs::read(&out).unwrap()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
