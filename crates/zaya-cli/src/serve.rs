//! `zaya serve`: loads the model, starts the engine thread and runs the OpenAI-compatible
//! HTTP server until SIGTERM / ctrl-c. With `--tp/--pp/--ep` the engine's model is a mesh of
//! local ranks (`zaya_dist::MeshModel`): rank 0 on the engine thread, the others following.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use zaya::text::ZayaTokenizer;
use zaya::ZayaModel;
use zaya_engine::{Engine, EngineConfig};
use zaya_server::{AppState, ServerConfig};

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Model directory (weights, config and tokenizer files); default: the embedded model.
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// 0 picks a free port (printed on stderr).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` (also read from ZAYA_API_KEY).
    #[arg(long)]
    pub api_key: Option<String>,
    /// The model name clients use; default: the model directory's name.
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Rows decoding at once.
    #[arg(long, default_value_t = 32)]
    pub max_running: usize,
    /// Queued requests beyond which the server answers 429.
    #[arg(long, default_value_t = 256)]
    pub max_waiting: usize,
    /// Weight dtype: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Attention backend: sdpa (fused, the fastest), flex or eager (the reference,
    /// used wherever attention probabilities are asked for).
    #[arg(long, default_value = "sdpa")]
    pub attn: String,
    /// A LoRA adapter directory (PEFT format), served on top of the model without merging.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Prefix cache bound in MiB (0 turns it off).
    #[arg(long)]
    pub prefix_cache_mib: Option<usize>,
    /// Seconds in-flight requests may run after SIGTERM before they are cancelled.
    #[arg(long, default_value_t = 30)]
    pub drain_timeout: u64,
    /// `--tp/--pp/--ep N`: serve on a mesh of local ranks (threads of this process; f32,
    /// no adapter). `--dp` is refused: run one server per replica.
    #[command(flatten)]
    pub parallel: crate::parallel_cmds::ParallelArgs,
    /// With a mesh: seconds a rank waits for a peer before the request fails naming it.
    #[arg(long, default_value_t = 300)]
    pub dist_timeout: u64,
}

pub fn run_serve(args: ServeArgs) -> Result<()> {
    let dtype = crate::parse_dtype(&args.dtype)?;
    let attn = crate::parse_attn(&args.attn)?;
    let dir = match &args.model {
        Some(d) => d.clone(),
        None => crate::default_model::dir()?,
    };
    let name = args
        .served_model_name
        .clone()
        .unwrap_or_else(|| match &args.model {
            Some(d) => d
                .canonicalize()
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_else(|| "zaya".into()),
            None => "zaya-default".into(),
        });
    let tokenizer = Arc::new(ZayaTokenizer::from_dir(&dir).with_context(|| {
        format!(
            "loading the tokenizer of {} (the server needs tokenizer files)",
            dir.display()
        )
    })?);
    let mut cfg = EngineConfig {
        max_running: args.max_running,
        max_waiting: args.max_waiting,
        attn,
        ..Default::default()
    };
    if let Some(mib) = args.prefix_cache_mib {
        cfg.prefix_cache_bytes = mib << 20;
    }
    // Under MPI: keeps MPI initialised until the server is done (dropped last).
    let mut _mpi: Option<Box<dyn std::any::Any>> = None;
    let engine = if args.parallel.is_parallel() {
        let (engine, keep) = start_mesh(&args, &dir, dtype, tokenizer.clone(), cfg)?;
        _mpi = keep;
        match engine {
            Some(e) => e,
            // a follower process: it served until rank 0 stopped the mesh
            None => return Ok(()),
        }
    } else {
        let model = Arc::new(crate::lora_cmds::with_adapter(
            ZayaModel::load(&dir, dtype, &Device::Cpu)?,
            args.adapter.as_deref(),
        )?);
        Engine::start(model, Some(tokenizer.clone()), cfg)?
    };
    let config = ServerConfig {
        host: args.host,
        port: args.port,
        api_key: args
            .api_key
            .or_else(|| std::env::var("ZAYA_API_KEY").ok().filter(|k| !k.is_empty())),
        served_model_name: name,
        drain_timeout: Duration::from_secs(args.drain_timeout),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let state = Arc::new(AppState::new(engine, tokenizer, config));
        zaya_server::serve(state, zaya_server::shutdown_signal()).await
    })
}

/// The engine on a mesh of local ranks, each loading only its slices of `dir`; under
/// `mpirun` (MPI build) the ranks are the processes: rank 0 gets the engine, the others
/// follow it and return `None` once it stopped the mesh. The second value keeps MPI
/// initialised while the server runs.
#[allow(clippy::type_complexity)]
fn start_mesh(
    args: &ServeArgs,
    dir: &std::path::Path,
    dtype: candle_core::DType,
    tokenizer: Arc<ZayaTokenizer>,
    cfg: EngineConfig,
) -> Result<(Option<Engine>, Option<Box<dyn std::any::Any>>)> {
    if !matches!(dtype, candle_core::DType::F32 | candle_core::DType::BF16) {
        bail!("serving on a mesh runs in f32 or bf16 (asked --dtype {dtype:?})");
    }
    if args.adapter.is_some() {
        bail!("--adapter cannot be combined with --tp/--pp/--ep in this version");
    }
    if args.dist_timeout == 0 {
        bail!("--dist-timeout must be at least 1 second");
    }
    let shape = args.parallel.mesh()?;
    let timeout = Duration::from_secs(args.dist_timeout);
    #[cfg(feature = "mpi")]
    if zaya_dist::mpi_backend::launched_by_mpi() {
        let collectives = args.parallel.collectives;
        return start_mesh_mpi(dir, shape, collectives, dtype, timeout, tokenizer, cfg);
    }
    if zaya_dist::comm::launched_by_mpi() {
        bail!("started by an MPI launcher, but this zaya was built without MPI: rebuild with `--features mpi` (needs libopenmpi-dev, libclang-dev), or drop mpirun (`zaya serve --tp/--pp/--ep N` starts the ranks as threads)");
    }
    let mesh = zaya_dist::MeshModel::local(dir, shape, dtype, timeout)
        .with_context(|| format!("starting the {} serving mesh", shape.label()))?;
    print_ranks(&mesh, "local ranks");
    let engine = Engine::start(Arc::new(mesh), Some(tokenizer), cfg)?;
    Ok((Some(engine), None))
}

fn print_ranks(mesh: &zaya_dist::MeshModel, what: &str) {
    let shape = mesh.shape();
    let per_rank: Vec<String> = mesh
        .weight_bytes()
        .iter()
        .map(|b| format!("{:.1}", *b as f64 / (1u64 << 20) as f64))
        .collect();
    eprintln!(
        "serving on {} {what} ({}); weights per rank (MiB): {}",
        shape.world(),
        shape.label(),
        per_rank.join(" / ")
    );
}

/// `mpirun -n N zaya serve --tp ...`: this process is one rank of the mesh.
#[cfg(feature = "mpi")]
#[allow(clippy::type_complexity)]
fn start_mesh_mpi(
    dir: &std::path::Path,
    shape: zaya_dist::MeshShape,
    collectives: crate::parallel_cmds::Collectives,
    dtype: candle_core::DType,
    timeout: Duration,
    tokenizer: Arc<ZayaTokenizer>,
    cfg: EngineConfig,
) -> Result<(Option<Engine>, Option<Box<dyn std::any::Any>>)> {
    let (mesh, world) = mesh_on_mpi(dir, shape, collectives, dtype, timeout, true)?;
    let Some(mesh) = mesh else {
        return Ok((None, Some(world)));
    };
    print_ranks(&mesh, "MPI ranks");
    let engine = Engine::start(Arc::new(mesh), Some(tokenizer), cfg)?;
    Ok((Some(engine), Some(world)))
}

/// This process's rank of a mesh of MPI processes driven by rank 0's engine: rank 0 gets
/// the [`zaya_dist::MeshModel`]; every other rank follows rank 0's commands (ignoring
/// SIGTERM / SIGINT while it does when `followers_outlive_signals`, so a server can drain)
/// and gets `None` once rank 0 stopped the mesh. The second value keeps MPI initialised:
/// drop it after the mesh model.
#[cfg(feature = "mpi")]
pub(crate) fn mesh_on_mpi(
    dir: &std::path::Path,
    shape: zaya_dist::MeshShape,
    collectives: crate::parallel_cmds::Collectives,
    dtype: candle_core::DType,
    timeout: Duration,
    followers_outlive_signals: bool,
) -> Result<(Option<zaya_dist::MeshModel>, Box<dyn std::any::Any>)> {
    if shape.dp != 1 {
        bail!("--dp {} cannot serve (data-parallel replicas are for training; run one server per replica)", shape.dp);
    }
    // rank 0 makes its MPI calls on the engine thread
    let world = zaya_dist::mpi_backend::MpiWorld::init_serialized()?;
    let comm = crate::parallel_cmds::mpi_world_comm(&world, collectives, timeout)?;
    let mesh = zaya_dist::Mesh::new(comm, shape)?;
    let ckpt = Arc::new(zaya::weights::Checkpoint::open(dir)?);
    let model_cfg = ckpt.config()?;
    ckpt.validate(&model_cfg)?;
    let plan = zaya_dist::ParallelPlan::new(&model_cfg, shape)?;
    let model = zaya_dist::TpModel::at(&ckpt, &plan, mesh.coords, dtype, &Device::Cpu)?;
    // A follower waits for rank 0's next command without a practical deadline: a server may
    // be idle for as long as it likes (the forwards' collectives keep `timeout`).
    let commands = world
        .comm(Duration::from_secs(100 * 365 * 24 * 3600))
        .with_idle_poll(Duration::from_millis(1));
    if mesh.world.rank() != 0 {
        if followers_outlive_signals {
            // SIGTERM / ctrl-c reach every process of the job: rank 0 drains and then stops
            // the followers, which must live until then.
            // SAFETY: setting a signal disposition to SIG_IGN has no handler to run.
            unsafe {
                libc::signal(libc::SIGTERM, libc::SIG_IGN);
                libc::signal(libc::SIGINT, libc::SIG_IGN);
            }
        }
        zaya_dist::follow_commands(&mesh, &model, &commands)?;
        return Ok((None, Box::new(world)));
    }
    let mesh = zaya_dist::MeshModel::with_remote_followers(mesh, model, Box::new(commands))?;
    Ok((Some(mesh), Box::new(world)))
}
