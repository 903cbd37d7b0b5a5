//! Serving on a rank mesh: the continuous-batching engine of `zaya-engine` driving a model
//! split over local ranks or MPI processes (TP × PP × EP), through the engine's model seam
//! ([`zaya_engine::EngineModel`]).
//!
//! Rank 0 lives on the engine thread: its [`MeshModel`] is the engine's model. Every other
//! rank is a follower thread that owns its slices ([`TpModel`]) and one cache per row, keyed
//! by row id. Each forward the engine asks for becomes one [`Command`] sent to every
//! follower — the row operations since the last command (new, fork, free: replayed in the
//! engine's order) and the work (a prompt piece of one row, or one token for each of several
//! rows) — and then every rank runs the same [`TpModel::forward_mesh`] with its own cache of
//! the row, meeting in the mesh's collectives. Rows are freed everywhere when the engine
//! drops them (a finished or cancelled choice, an evicted prefix-cache snapshot): the
//! [`MeshRow`]'s `Drop` queues the free for the next command.
//!
//! Failures: a follower that fails or panics is marked gone in the [`LocalWorld`], so rank 0's
//! next collective fails at once naming it (`rank N has exited (failed: …)`); a rank that
//! never arrives is a timeout naming it. After any failure the mesh is down: every later
//! request fails with the first error (the server answers it), nothing hangs. Dropping the
//! model (the engine shutting down) ends the followers and joins them.
//!
//! Under MPI (`mpirun -n N zaya serve --tp ...`) the followers are the other processes:
//! rank 0 sends each command to them as a tagged message on a world communicator
//! ([`MeshModel::with_remote_followers`]) and they run [`follow_commands`]. A process that
//! dies ends the job (`mpirun` names it); one that stalls makes a collective miss its
//! deadline, which aborts the job naming the operation, so nothing hangs there either.
//! Shutdown sends the followers a stop command.
//!
//! Decode runs the rows of a step together ([`TpModel::decode_rows_mesh`]: projections,
//! router, experts and their collectives once per layer for all rows, attention per row over
//! its own keys), in groups of at most `ZayaModel::INVARIANT_DECODE_ROWS` rows, within which
//! a row's logits do not depend on the rest of the batch, as the engine requires.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use zaya::attention::AttnImplementation;
use zaya::weights::Checkpoint;
use zaya::{ForwardOptions, HybridCache, ZayaConfig};
use zaya_engine::{EngineModel, EngineRow};

use crate::comm::Comm;
use crate::error::ParallelError;
use crate::local::LocalWorld;
use crate::mesh::{Mesh, MeshShape};
use crate::plan::ParallelPlan;
use crate::tp::TpModel;

/// What serving on a mesh fails with.
#[derive(Debug, thiserror::Error)]
pub enum MeshServeError {
    #[error(transparent)]
    Parallel(#[from] ParallelError),
    #[error(transparent)]
    Model(#[from] zaya::ZayaError),
    /// A follower rank stopped (at start-up, or between commands).
    #[error("rank {rank} of the serving mesh has exited: {why}")]
    RankExited { rank: usize, why: String },
    /// An earlier failure stopped the mesh; every later forward reports it.
    #[error("the serving mesh {mesh} is down after an earlier failure: {why}")]
    Down { mesh: String, why: String },
    #[error("serving on a mesh: {0}")]
    Unsupported(String),
    /// A command a follower cannot apply (the engine and the follower disagree on a row).
    #[error("rank {rank}: {message}")]
    Protocol { rank: usize, message: String },
}

type Result<T> = std::result::Result<T, MeshServeError>;

/// A change of the rows, replayed by every follower in the engine's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RowOp {
    New(u64),
    Fork { src: u64, dst: u64 },
    Free(u64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Work {
    Prefill {
        row: u64,
        tokens: Vec<u32>,
    },
    Decode {
        rows: Vec<u64>,
        tokens: Vec<u32>,
    },
    /// The end (remote followers; local ones see their channel close).
    Stop,
}

/// One step's message from rank 0 to a follower.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Command {
    ops: Vec<RowOp>,
    work: Work,
    attn: AttnImplementation,
}

/// A byte count as two f32 values exact up to 2^48 (24-bit halves).
fn bytes_message(bytes: usize) -> [f32; 2] {
    [(bytes >> 24) as f32, (bytes & 0xFF_FFFF) as f32]
}

/// Message tag of commands to remote followers.
const TAG_COMMAND: u32 = 0x5E2F;

impl Command {
    /// The command as `f32` values for a [`Comm`] message: every 32-bit word is sent as two
    /// 16-bit halves (each exact in f32), a row id as two words.
    fn encode(&self) -> Vec<f32> {
        let mut w: Vec<u32> = Vec::new();
        let id = |w: &mut Vec<u32>, id: u64| {
            w.push((id >> 32) as u32);
            w.push(id as u32);
        };
        w.push(match self.attn {
            AttnImplementation::Eager => 0,
            AttnImplementation::Sdpa => 1,
            AttnImplementation::Flex => 2,
        });
        w.push(self.ops.len() as u32);
        for op in &self.ops {
            match *op {
                RowOp::New(r) => {
                    w.push(0);
                    id(&mut w, r);
                }
                RowOp::Fork { src, dst } => {
                    w.push(1);
                    id(&mut w, src);
                    id(&mut w, dst);
                }
                RowOp::Free(r) => {
                    w.push(2);
                    id(&mut w, r);
                }
            }
        }
        match &self.work {
            Work::Prefill { row, tokens } => {
                w.push(0);
                id(&mut w, *row);
                w.push(tokens.len() as u32);
                w.extend(tokens);
            }
            Work::Decode { rows, tokens } => {
                w.push(1);
                w.push(rows.len() as u32);
                for (&r, &t) in rows.iter().zip(tokens) {
                    id(&mut w, r);
                    w.push(t);
                }
            }
            Work::Stop => w.push(2),
        }
        w.iter()
            .flat_map(|&x| [(x >> 16) as f32, (x & 0xFFFF) as f32])
            .collect()
    }

    /// The inverse of [`Command::encode`]; a malformed message is an error naming `rank`.
    fn decode(rank: usize, buf: &[f32]) -> Result<Command> {
        let bad = |what: &str| MeshServeError::Protocol {
            rank,
            message: format!("malformed command from rank 0 ({what})"),
        };
        if !buf.len().is_multiple_of(2) {
            return Err(bad("odd length"));
        }
        let mut words = Vec::with_capacity(buf.len() / 2);
        for h in buf.chunks_exact(2) {
            let ok = |v: f32| (0.0..65536.0).contains(&v) && v.fract() == 0.0;
            if !ok(h[0]) || !ok(h[1]) {
                return Err(bad("a value that is not a 16-bit half"));
            }
            words.push(((h[0] as u32) << 16) | h[1] as u32);
        }
        let mut it = words.into_iter();
        let mut next = || it.next().ok_or_else(|| bad("truncated"));
        let id = |next: &mut dyn FnMut() -> Result<u32>| -> Result<u64> {
            Ok(((next()? as u64) << 32) | next()? as u64)
        };
        let attn = match next()? {
            0 => AttnImplementation::Eager,
            1 => AttnImplementation::Sdpa,
            2 => AttnImplementation::Flex,
            _ => return Err(bad("attention backend")),
        };
        let n_ops = next()? as usize;
        let mut ops = Vec::with_capacity(n_ops.min(1 << 16));
        for _ in 0..n_ops {
            ops.push(match next()? {
                0 => RowOp::New(id(&mut next)?),
                1 => RowOp::Fork {
                    src: id(&mut next)?,
                    dst: id(&mut next)?,
                },
                2 => RowOp::Free(id(&mut next)?),
                _ => return Err(bad("row operation")),
            });
        }
        let work = match next()? {
            0 => {
                let row = id(&mut next)?;
                let n = next()? as usize;
                let tokens = (0..n).map(|_| next()).collect::<Result<Vec<u32>>>()?;
                Work::Prefill { row, tokens }
            }
            1 => {
                let n = next()? as usize;
                let (mut rows, mut tokens) = (Vec::new(), Vec::new());
                for _ in 0..n {
                    rows.push(id(&mut next)?);
                    tokens.push(next()?);
                }
                Work::Decode { rows, tokens }
            }
            2 => Work::Stop,
            _ => return Err(bad("work kind")),
        };
        if next().is_ok() {
            return Err(bad("trailing values"));
        }
        Ok(Command { ops, work, attn })
    }
}

/// Row ids and the row operations not yet sent (shared by rank 0's rows, whose `Drop`
/// queues their free).
#[derive(Debug, Default)]
struct RowOps {
    next: AtomicU64,
    queue: Mutex<Vec<RowOp>>,
}

impl RowOps {
    fn push(&self, op: RowOp) {
        self.queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(op);
    }

    fn take(&self) -> Vec<RowOp> {
        std::mem::take(&mut *self.queue.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn new_id(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }
}

/// One row on the mesh, as the engine holds it: its id (the followers' key) and rank 0's own
/// cache of it (rank 0's layers and heads).
#[derive(Debug)]
pub struct MeshRow {
    id: u64,
    cache: HybridCache,
    ops: Arc<RowOps>,
}

impl Drop for MeshRow {
    fn drop(&mut self) {
        self.ops.push(RowOp::Free(self.id));
    }
}

impl EngineRow for MeshRow {
    type Error = MeshServeError;

    fn fork(&self) -> Result<Self> {
        let cache = self.cache.fork().map_err(zaya::ZayaError::from)?;
        let id = self.ops.new_id();
        self.ops.push(RowOp::Fork {
            src: self.id,
            dst: id,
        });
        Ok(MeshRow {
            id,
            cache,
            ops: self.ops.clone(),
        })
    }

    fn len(&self) -> usize {
        self.cache.seq_len()
    }

    /// Rank 0's share (the other ranks hold their own shares of the row).
    fn bytes(&self) -> usize {
        self.cache.bytes()
    }
}

/// One rank's forward of a prompt piece or of one decode token of a row: `[1, T]` ids after
/// the row's cache; the full logits of the last position (the same on every rank).
fn forward_row(
    mesh: &Mesh,
    model: &TpModel,
    cache: &mut HybridCache,
    tokens: &[u32],
    attn: AttnImplementation,
) -> std::result::Result<Tensor, ParallelError> {
    let ids = Tensor::new(tokens, &Device::Cpu)?.unsqueeze(0)?;
    let opts = ForwardOptions {
        logits_to_keep: 1,
        attn,
        ..Default::default()
    };
    let (logits, _) = model.forward_mesh(mesh.groups(), &ids, Some(cache), &opts)?;
    Ok(logits)
}

/// One decode token for each row, batched over the rows in groups of at most
/// [`ZayaModel::INVARIANT_DECODE_ROWS`](zaya::ZayaModel::INVARIANT_DECODE_ROWS) (within a
/// group a row's logits do not depend on the others, as the engine requires); every rank
/// groups the rows the same way, so their collectives meet. Each row's f32 logits.
fn decode_rows(
    mesh: &Mesh,
    model: &TpModel,
    caches: &mut [&mut HybridCache],
    tokens: &[u32],
    attn: AttnImplementation,
) -> Result<Vec<Vec<f32>>> {
    let group = zaya::ZayaModel::INVARIANT_DECODE_ROWS.max(1);
    let mut out = Vec::with_capacity(tokens.len());
    for (rows, toks) in caches.chunks_mut(group).zip(tokens.chunks(group)) {
        let logits = model.decode_rows_mesh(mesh.groups(), toks, rows, attn)?;
        let rows: Vec<Vec<f32>> = logits
            .to_dtype(DType::F32)
            .and_then(|l| l.to_vec2())
            .map_err(ParallelError::from)?;
        out.extend(rows);
    }
    Ok(out)
}

fn row_logits(logits: &Tensor) -> Result<Vec<f32>> {
    Ok(zaya_engine::last_logits(Some(logits.clone()))?)
}

struct FollowerHandle {
    rank: usize,
    commands: Option<Sender<Command>>,
    thread: Option<JoinHandle<()>>,
    /// Why the follower stopped (set when its loop ends).
    exit: Arc<Mutex<Option<String>>>,
    /// Rows the follower holds after its last command.
    held: Arc<AtomicUsize>,
}

/// A local follower's ends of its links with rank 0.
struct FollowerLink {
    commands: Receiver<Command>,
    ready: Sender<(usize, std::result::Result<usize, String>)>,
    held: Arc<AtomicUsize>,
}

impl FollowerHandle {
    fn exit_reason(&self) -> String {
        self.exit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_else(|| "stopped".into())
    }
}

/// The ranks following rank 0.
enum Followers {
    /// Threads of this process, one command channel each.
    Local {
        world: LocalWorld,
        ranks: Vec<FollowerHandle>,
    },
    /// Processes (MPI): commands are tagged messages on `comm` (a world communicator, this
    /// process rank 0).
    Remote { comm: Box<dyn Comm> },
}

/// Rank 0's side, used only from the engine thread (behind a mutex for `Sync`).
struct Rank0 {
    mesh: Mesh,
    model: TpModel,
    followers: Followers,
    /// The first failure; the mesh is down from then on (shared with [`MeshModel`], which
    /// reports it without waiting for the engine thread's lock).
    down: Arc<OnceLock<String>>,
}

impl Rank0 {
    fn check(&self, label: &str) -> Result<()> {
        match self.down.get() {
            Some(why) => Err(MeshServeError::Down {
                mesh: label.into(),
                why: why.clone(),
            }),
            None => Ok(()),
        }
    }

    fn dispatch(&mut self, cmd: Command) -> Result<()> {
        match &self.followers {
            Followers::Local { ranks, .. } => {
                for f in ranks {
                    let sent = f
                        .commands
                        .as_ref()
                        .is_some_and(|tx| tx.send(cmd.clone()).is_ok());
                    if !sent {
                        return Err(MeshServeError::RankExited {
                            rank: f.rank,
                            why: f.exit_reason(),
                        });
                    }
                }
            }
            Followers::Remote { comm } => {
                let buf = cmd.encode();
                for r in 1..comm.size() {
                    comm.send(r, TAG_COMMAND, &buf)
                        .map_err(ParallelError::from)?;
                }
            }
        }
        Ok(())
    }

    /// Marks the mesh down after `r` failed, and tells the followers (rank 0 gone: a
    /// follower inside a collective with it stops at once).
    fn settle<T>(&mut self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            tracing::error!("serving mesh failed: {e}");
            let _ = self.down.set(e.to_string());
            if let Followers::Local { world, .. } = &self.followers {
                world.mark_gone(0, format!("failed: {e}"));
            }
        }
        r
    }

    fn stop(&mut self) {
        match &mut self.followers {
            Followers::Local { world, ranks } => {
                world.mark_gone(0, "shut down");
                stop_followers(ranks);
            }
            Followers::Remote { comm } => {
                let stop = Command {
                    ops: Vec::new(),
                    work: Work::Stop,
                    attn: AttnImplementation::default(),
                }
                .encode();
                for r in 1..comm.size() {
                    if let Err(e) = comm.send(r, TAG_COMMAND, &stop) {
                        tracing::error!("stopping serving rank {r}: {e}");
                    }
                }
            }
        }
    }
}

/// A model split over local ranks (threads of this process) on a TP × PP × EP mesh, for
/// the engine: rank 0 computes on the engine thread, the other ranks follow its commands.
pub struct MeshModel {
    cfg: ZayaConfig,
    shape: MeshShape,
    ops: Arc<RowOps>,
    rank0: Mutex<Rank0>,
    weight_bytes: Vec<usize>,
    down: Arc<OnceLock<String>>,
}

impl std::fmt::Debug for MeshModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshModel")
            .field("mesh", &self.shape.label())
            .finish_non_exhaustive()
    }
}

impl MeshModel {
    /// Starts the ranks of `shape` on local threads, each reading only its slices of the
    /// checkpoint in `dir` in `dtype` (f32 or bf16); every collective gives up after
    /// `timeout`. Data-parallel replicas are refused (run several servers).
    pub fn local(
        dir: &Path,
        shape: MeshShape,
        dtype: DType,
        timeout: Duration,
    ) -> Result<MeshModel> {
        if shape.dp != 1 {
            return Err(MeshServeError::Unsupported(format!(
                "--dp {} (data-parallel replicas are for training; run one server per replica)",
                shape.dp
            )));
        }
        let ckpt = Arc::new(Checkpoint::open(dir)?);
        let cfg = ckpt.config()?;
        ckpt.validate(&cfg)?;
        let plan = ParallelPlan::new(&cfg, shape).map_err(ParallelError::from)?;
        let world = LocalWorld::new(shape.world(), timeout).map_err(ParallelError::from)?;
        let (ready_tx, ready_rx) = mpsc::channel::<(usize, std::result::Result<usize, String>)>();
        let mut followers = Vec::with_capacity(shape.world() - 1);
        for rank in 1..shape.world() {
            let (tx, rx) = mpsc::channel::<Command>();
            let exit = Arc::new(Mutex::new(None));
            let held = Arc::new(AtomicUsize::new(0));
            let link = FollowerLink {
                commands: rx,
                ready: ready_tx.clone(),
                held: held.clone(),
            };
            let (world, ckpt, plan, exit2) =
                (world.clone(), ckpt.clone(), plan.clone(), exit.clone());
            let thread = std::thread::Builder::new()
                .name(format!("zaya-rank-{rank}"))
                .spawn(move || {
                    let why = follow(rank, &world, &ckpt, &plan, shape, dtype, link);
                    exit2
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get_or_insert_with(|| why.clone());
                    world.mark_gone(rank, why);
                })
                .map_err(|e| MeshServeError::RankExited {
                    rank,
                    why: format!("its thread could not start: {e}"),
                })?;
            followers.push(FollowerHandle {
                rank,
                commands: Some(tx),
                thread: Some(thread),
                exit,
                held,
            });
        }
        drop(ready_tx);
        let own = Mesh::new(Box::new(world.comm(0)), shape)
            .map_err(ParallelError::from)
            .and_then(|mesh| {
                let model = TpModel::at(&ckpt, &plan, mesh.coords, dtype, &Device::Cpu)?;
                Ok((mesh, model))
            });
        let (mesh, model) = match own {
            Ok(v) => v,
            Err(e) => {
                world.mark_gone(0, format!("failed: {e}"));
                stop_followers(&mut followers);
                return Err(e.into());
            }
        };
        let mut weight_bytes = vec![0; shape.world()];
        weight_bytes[0] = model.weight_bytes();
        let down = Arc::new(OnceLock::new());
        let mut rank0 = Rank0 {
            mesh,
            model,
            followers: Followers::Local {
                world,
                ranks: followers,
            },
            down: Arc::clone(&down),
        };
        for _ in 1..shape.world() {
            let failure = match ready_rx.recv() {
                Ok((rank, Ok(bytes))) => {
                    weight_bytes[rank] = bytes;
                    None
                }
                Ok((rank, Err(why))) => Some(MeshServeError::RankExited { rank, why }),
                Err(_) => Some(MeshServeError::Unsupported(
                    "a rank stopped before saying whether it loaded".into(),
                )),
            };
            if let Some(e) = failure {
                rank0.stop();
                return Err(e);
            }
        }
        tracing::info!(
            mesh = %shape.label(),
            ranks = shape.world(),
            "serving mesh ready"
        );
        Ok(MeshModel {
            cfg,
            shape,
            ops: Arc::new(RowOps::default()),
            rank0: Mutex::new(rank0),
            weight_bytes,
            down,
        })
    }

    /// Rank 0 of a mesh whose other ranks are processes running [`follow_commands`]:
    /// `mesh` and `model` are this process's (rank 0 of the mesh), `commands` a communicator
    /// over the same ranks on which this process is rank 0.
    pub fn with_remote_followers(
        mesh: Mesh,
        model: TpModel,
        commands: Box<dyn Comm>,
    ) -> Result<MeshModel> {
        let shape = mesh.shape;
        if shape.dp != 1 {
            return Err(MeshServeError::Unsupported(format!(
                "--dp {} (data-parallel replicas are for training; run one server per replica)",
                shape.dp
            )));
        }
        if commands.rank() != 0 || mesh.world.rank() != 0 || commands.size() != shape.world() {
            return Err(MeshServeError::Unsupported(format!(
                "rank 0 of the serving mesh must drive it (this process is rank {} of {}, mesh rank {}, mesh {})",
                commands.rank(),
                commands.size(),
                mesh.world.rank(),
                shape.label()
            )));
        }
        let weight_bytes = commands
            .all_gather(&bytes_message(model.weight_bytes()))
            .map_err(ParallelError::from)?
            .chunks_exact(2)
            .map(|h| ((h[0] as usize) << 24) | h[1] as usize)
            .collect();
        let down = Arc::new(OnceLock::new());
        Ok(MeshModel {
            cfg: model.config().clone(),
            shape,
            ops: Arc::new(RowOps::default()),
            rank0: Mutex::new(Rank0 {
                mesh,
                model,
                followers: Followers::Remote { comm: commands },
                down: Arc::clone(&down),
            }),
            weight_bytes,
            down,
        })
    }

    /// Rows each local follower (ranks 1..) holds after its last command; `None` on a mesh
    /// of processes. Frees reach the followers with the next command, so rows the engine
    /// dropped since then still count.
    pub fn follower_rows(&self) -> Option<Vec<usize>> {
        match &self.lock().followers {
            Followers::Local { ranks, .. } => Some(
                ranks
                    .iter()
                    .map(|f| f.held.load(Ordering::SeqCst))
                    .collect(),
            ),
            Followers::Remote { .. } => None,
        }
    }

    pub fn shape(&self) -> MeshShape {
        self.shape
    }

    /// Bytes of weights each rank holds, by rank.
    pub fn weight_bytes(&self) -> &[usize] {
        &self.weight_bytes
    }

    /// Stops follower `rank` as if it had crashed: it is marked gone (peers waiting on it
    /// fail at once naming it) and gets no more commands. For tests of failure handling;
    /// rank 0 cannot be stopped this way.
    pub fn stop_rank(&self, rank: usize) -> Result<()> {
        let mut r = self.lock();
        let Followers::Local { world, ranks } = &mut r.followers else {
            return Err(MeshServeError::Unsupported(
                "stop_rank on a mesh of processes".into(),
            ));
        };
        let world = world.clone();
        let f = ranks.iter_mut().find(|f| f.rank == rank).ok_or_else(|| {
            MeshServeError::Unsupported(format!("rank {rank} is not a follower of this mesh"))
        })?;
        let why = "stopped by stop_rank";
        world.mark_gone(rank, why);
        *f.exit.lock().unwrap_or_else(|e| e.into_inner()) = Some(why.into());
        f.commands = None;
        if let Some(t) = f.thread.take() {
            let _ = t.join();
        }
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, Rank0> {
        // Rank 0's state stays consistent across a panic (the mesh is marked down by the
        // error path; a panic leaves at worst an unsent command, which `down` catches).
        self.rank0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn run(
        &self,
        work: Work,
        attn: AttnImplementation,
        rows: &mut [&mut MeshRow],
    ) -> Result<Vec<Vec<f32>>> {
        let mut r = self.lock();
        r.check(&self.shape.label())?;
        let cmd = Command {
            ops: self.ops.take(),
            work,
            attn,
        };
        let out = r.dispatch(cmd.clone()).and_then(|()| {
            let Rank0 { mesh, model, .. } = &*r;
            match &cmd.work {
                Work::Prefill { tokens, .. } => {
                    let l = forward_row(mesh, model, &mut rows[0].cache, tokens, attn)?;
                    Ok(vec![row_logits(&l)?])
                }
                Work::Decode { tokens, .. } => {
                    let mut caches: Vec<&mut HybridCache> =
                        rows.iter_mut().map(|r| &mut r.cache).collect();
                    decode_rows(mesh, model, &mut caches, tokens, attn)
                }
                Work::Stop => Ok(Vec::new()),
            }
        });
        r.settle(out)
    }
}

impl Drop for MeshModel {
    fn drop(&mut self) {
        self.rank0
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .stop();
    }
}

fn stop_followers(followers: &mut [FollowerHandle]) {
    for f in followers.iter_mut() {
        f.commands = None;
    }
    for f in followers.iter_mut() {
        if let Some(t) = f.thread.take() {
            if t.join().is_err() {
                tracing::error!("serving rank {} panicked", f.rank);
            }
        }
    }
}

/// A follower rank's life: build its mesh groups and slices, report, then apply commands
/// until rank 0 hangs up. Returns why it stopped (for the peers' errors).
fn follow(
    rank: usize,
    world: &LocalWorld,
    ckpt: &Arc<Checkpoint>,
    plan: &ParallelPlan,
    shape: MeshShape,
    dtype: DType,
    link: FollowerLink,
) -> String {
    let FollowerLink {
        commands,
        ready,
        held,
    } = link;
    let built = Mesh::new(Box::new(world.comm(rank)), shape)
        .map_err(ParallelError::from)
        .and_then(|mesh| {
            let model = TpModel::at(ckpt, plan, mesh.coords, dtype, &Device::Cpu)?;
            Ok((mesh, model))
        });
    let (mesh, model) = match built {
        Ok(v) => v,
        Err(e) => {
            let why = format!("failed: {e}");
            let _ = ready.send((rank, Err(e.to_string())));
            return why;
        }
    };
    let _ = ready.send((rank, Ok(model.weight_bytes())));
    drop(ready);
    // `recv` fails once rank 0 dropped its sender: the server is shutting down.
    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        follower_loop(rank, &mesh, &model, &held, || Ok(commands.recv().ok()))
    }));
    match run {
        Ok(Ok(())) => "finished".into(),
        Ok(Err(e)) => {
            tracing::error!("serving rank {rank} failed: {e}");
            format!("failed: {e}")
        }
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(no message)".into());
            format!("panicked: {msg}")
        }
    }
}

/// A follower's work: applies each command from `next` (`None`: the end) with its own
/// per-row caches.
fn follower_loop(
    rank: usize,
    mesh: &Mesh,
    model: &TpModel,
    held: &AtomicUsize,
    mut next: impl FnMut() -> Result<Option<Command>>,
) -> Result<()> {
    let mut rows: HashMap<u64, HybridCache> = HashMap::new();
    let missing = |id: u64| MeshServeError::Protocol {
        rank,
        message: format!("no row {id} on this rank"),
    };
    while let Some(cmd) = next()? {
        for op in cmd.ops {
            match op {
                RowOp::New(id) => {
                    rows.insert(id, model.new_cache());
                }
                RowOp::Fork { src, dst } => {
                    let c = rows
                        .get(&src)
                        .ok_or_else(|| missing(src))?
                        .fork()
                        .map_err(zaya::ZayaError::from)?;
                    rows.insert(dst, c);
                }
                RowOp::Free(id) => {
                    rows.remove(&id);
                }
            }
        }
        // before the forward: rank 0 sees it once the forward's collectives have met
        held.store(rows.len(), Ordering::SeqCst);
        match cmd.work {
            Work::Prefill { row, tokens } => {
                let cache = rows.get_mut(&row).ok_or_else(|| missing(row))?;
                forward_row(mesh, model, cache, &tokens, cmd.attn)?;
            }
            Work::Decode { rows: ids, tokens } => {
                // the rows' caches leave the map for the step and go back after it
                let mut taken = Vec::with_capacity(ids.len());
                for &id in &ids {
                    match rows.remove(&id) {
                        Some(c) => taken.push((id, c)),
                        None => {
                            rows.extend(taken);
                            return Err(missing(id));
                        }
                    }
                }
                let mut caches: Vec<&mut HybridCache> = taken.iter_mut().map(|(_, c)| c).collect();
                let out = decode_rows(mesh, model, &mut caches, &tokens, cmd.attn);
                rows.extend(taken);
                out?;
            }
            Work::Stop => return Ok(()),
        }
    }
    Ok(())
}

/// A follower process of a serving mesh (MPI): applies rank 0's commands, received on
/// `commands` (a world communicator; rank 0 is [`MeshModel::with_remote_followers`]), until
/// rank 0 stops the mesh. `commands` should wait without a practical deadline: a server may
/// stay idle for as long as it likes. Collectives of the forwards use `mesh`.
pub fn follow_commands(mesh: &Mesh, model: &TpModel, commands: &dyn Comm) -> Result<()> {
    let rank = commands.rank();
    // rank 0 learns what each rank holds
    commands
        .all_gather(&bytes_message(model.weight_bytes()))
        .map_err(ParallelError::from)?;
    follower_loop(rank, mesh, model, &AtomicUsize::new(0), || {
        let buf = commands.recv(0, TAG_COMMAND).map_err(ParallelError::from)?;
        let cmd = Command::decode(rank, &buf)?;
        Ok((cmd.work != Work::Stop).then_some(cmd))
    })
}

impl EngineModel for MeshModel {
    type Row = MeshRow;

    fn model_config(&self) -> &ZayaConfig {
        &self.cfg
    }

    fn steps_in_kernel_pool(&self) -> bool {
        // rank 0's forward waits for the other ranks, whose kernels run on the same pool
        false
    }

    fn unavailable(&self) -> Option<String> {
        self.down
            .get()
            .map(|why| format!("the serving mesh {} is down: {why}", self.shape.label()))
    }

    fn new_row(&self) -> MeshRow {
        let id = self.ops.new_id();
        self.ops.push(RowOp::New(id));
        let cache = self.lock().model.new_cache();
        MeshRow {
            id,
            cache,
            ops: self.ops.clone(),
        }
    }

    fn prefill(
        &self,
        row: &mut MeshRow,
        tokens: &[u32],
        attn: AttnImplementation,
    ) -> Result<Vec<f32>> {
        let work = Work::Prefill {
            row: row.id,
            tokens: tokens.to_vec(),
        };
        let mut out = self.run(work, attn, &mut [row])?;
        out.pop()
            .ok_or_else(|| MeshServeError::Unsupported("the prefill returned no logits".into()))
    }

    fn decode(
        &self,
        rows: &mut [&mut MeshRow],
        tokens: &[u32],
        attn: AttnImplementation,
    ) -> Result<Vec<Vec<f32>>> {
        if rows.len() != tokens.len() {
            return Err(MeshServeError::Unsupported(format!(
                "decode of {} rows with {} tokens",
                rows.len(),
                tokens.len()
            )));
        }
        let work = Work::Decode {
            rows: rows.iter().map(|r| r.id).collect(),
            tokens: tokens.to_vec(),
        };
        self.run(work, attn, rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_survive_their_f32_encoding_and_bad_messages_are_errors() {
        let big = (1u64 << 40) + 12345;
        let cmds = [
            Command {
                ops: vec![
                    RowOp::New(0),
                    RowOp::Fork { src: 0, dst: big },
                    RowOp::Free(u64::MAX),
                ],
                work: Work::Prefill {
                    row: big,
                    tokens: vec![0, 1, 65535, 65536, 262_143, u32::MAX],
                },
                attn: AttnImplementation::Eager,
            },
            Command {
                ops: Vec::new(),
                work: Work::Decode {
                    rows: vec![3, big, 7],
                    tokens: vec![5, 70_000, 0],
                },
                attn: AttnImplementation::Flex,
            },
            Command {
                ops: vec![RowOp::Free(9)],
                work: Work::Stop,
                attn: AttnImplementation::Sdpa,
            },
        ];
        for c in &cmds {
            let buf = c.encode();
            assert!(buf.iter().all(|v| v.fract() == 0.0 && *v < 65536.0));
            assert_eq!(&Command::decode(1, &buf).unwrap(), c);
        }
        let buf = cmds[0].encode();
        for bad in [
            &buf[..buf.len() - 2],
            &buf[..buf.len() - 1],
            &[buf.as_slice(), &[0.0, 0.0]].concat(),
            &[1.5, 0.0],
            &[0.0, 70000.0],
            &[0.0, 7.0],
        ] {
            let e = Command::decode(3, bad).unwrap_err();
            assert!(
                e.to_string().starts_with("rank 3: malformed command"),
                "{e}"
            );
        }
    }
}
