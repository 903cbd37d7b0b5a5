//! Serving on a rank mesh: the continuous-batching engine of `zaya-engine` driving a model
//! split over local ranks (TP × PP × EP), through the engine's model seam
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
//! Decode runs each row's token as its own forward (rows at different positions; the mesh
//! forward takes rows of one length), so a row's logits never depend on the rest of the
//! batch, as the engine requires.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use zaya::attention::AttnImplementation;
use zaya::weights::Checkpoint;
use zaya::{ForwardOptions, HybridCache, ZayaConfig};
use zaya_engine::{EngineModel, EngineRow};

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

#[derive(Debug, Clone)]
enum Work {
    Prefill { row: u64, tokens: Vec<u32> },
    Decode { rows: Vec<u64>, tokens: Vec<u32> },
}

/// One step's message from rank 0 to a follower.
#[derive(Debug, Clone)]
struct Command {
    ops: Vec<RowOp>,
    work: Work,
    attn: AttnImplementation,
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

fn row_logits(logits: &Tensor) -> Result<Vec<f32>> {
    Ok(zaya_engine::last_logits(Some(logits.clone()))?)
}

struct FollowerHandle {
    rank: usize,
    commands: Option<Sender<Command>>,
    thread: Option<JoinHandle<()>>,
    /// Why the follower stopped (set when its loop ends).
    exit: Arc<Mutex<Option<String>>>,
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

/// Rank 0's side, used only from the engine thread (behind a mutex for `Sync`).
struct Rank0 {
    mesh: Mesh,
    model: TpModel,
    world: LocalWorld,
    followers: Vec<FollowerHandle>,
    /// The first failure; the mesh is down from then on.
    down: Option<String>,
}

impl Rank0 {
    fn check(&self, label: &str) -> Result<()> {
        match &self.down {
            Some(why) => Err(MeshServeError::Down {
                mesh: label.into(),
                why: why.clone(),
            }),
            None => Ok(()),
        }
    }

    fn dispatch(&mut self, cmd: Command) -> Result<()> {
        for f in &self.followers {
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
        Ok(())
    }

    /// Marks the mesh down after `r` failed, and tells the followers (rank 0 gone: a
    /// follower inside a collective with it stops at once).
    fn settle<T>(&mut self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            tracing::error!("serving mesh failed: {e}");
            self.down = Some(e.to_string());
            self.world.mark_gone(0, format!("failed: {e}"));
        }
        r
    }

    fn stop(&mut self) {
        for f in &mut self.followers {
            f.commands = None;
        }
        self.world.mark_gone(0, "shut down");
        for f in &mut self.followers {
            if let Some(t) = f.thread.take() {
                if t.join().is_err() {
                    tracing::error!("serving rank {} panicked", f.rank);
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
    /// checkpoint in `dir` (f32); every collective gives up after `timeout`. Data-parallel
    /// replicas are refused (run several servers).
    pub fn local(dir: &Path, shape: MeshShape, timeout: Duration) -> Result<MeshModel> {
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
            let (world, ckpt, plan, ready, exit2) = (
                world.clone(),
                ckpt.clone(),
                plan.clone(),
                ready_tx.clone(),
                exit.clone(),
            );
            let thread = std::thread::Builder::new()
                .name(format!("zaya-rank-{rank}"))
                .spawn(move || {
                    let why = follow(rank, &world, &ckpt, &plan, shape, rx, ready);
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
            });
        }
        drop(ready_tx);
        let own = Mesh::new(Box::new(world.comm(0)), shape)
            .map_err(ParallelError::from)
            .and_then(|mesh| {
                let model = TpModel::at(&ckpt, &plan, mesh.coords, DType::F32, &Device::Cpu)?;
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
        let mut rank0 = Rank0 {
            mesh,
            model,
            world,
            followers,
            down: None,
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
        })
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
        let world = r.world.clone();
        let f = r
            .followers
            .iter_mut()
            .find(|f| f.rank == rank)
            .ok_or_else(|| {
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
                Work::Decode { tokens, .. } => rows
                    .iter_mut()
                    .zip(tokens)
                    .map(|(row, &t)| {
                        let l = forward_row(mesh, model, &mut row.cache, &[t], attn)?;
                        row_logits(&l)
                    })
                    .collect(),
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
            let _ = t.join();
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
    commands: Receiver<Command>,
    ready: Sender<(usize, std::result::Result<usize, String>)>,
) -> String {
    let built = Mesh::new(Box::new(world.comm(rank)), shape)
        .map_err(ParallelError::from)
        .and_then(|mesh| {
            let model = TpModel::at(ckpt, plan, mesh.coords, DType::F32, &Device::Cpu)?;
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
    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        follower_loop(rank, &mesh, &model, &commands)
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

fn follower_loop(
    rank: usize,
    mesh: &Mesh,
    model: &TpModel,
    commands: &Receiver<Command>,
) -> Result<()> {
    let mut rows: HashMap<u64, HybridCache> = HashMap::new();
    let missing = |id: u64| MeshServeError::Protocol {
        rank,
        message: format!("no row {id} on this rank"),
    };
    // `recv` fails once rank 0 dropped its sender: the server is shutting down.
    while let Ok(cmd) = commands.recv() {
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
        match cmd.work {
            Work::Prefill { row, tokens } => {
                let cache = rows.get_mut(&row).ok_or_else(|| missing(row))?;
                forward_row(mesh, model, cache, &tokens, cmd.attn)?;
            }
            Work::Decode { rows: ids, tokens } => {
                for (id, t) in ids.into_iter().zip(tokens) {
                    let cache = rows.get_mut(&id).ok_or_else(|| missing(id))?;
                    forward_row(mesh, model, cache, &[t], cmd.attn)?;
                }
            }
        }
    }
    Ok(())
}

impl EngineModel for MeshModel {
    type Row = MeshRow;

    fn model_config(&self) -> &ZayaConfig {
        &self.cfg
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
