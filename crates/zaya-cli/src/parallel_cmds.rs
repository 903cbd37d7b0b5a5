//! `zaya plan` and the parallel flags of `zaya forward` (`--tp N` on local ranks).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use serde::Serialize;

use zaya::weights::Checkpoint;
use zaya::{ForwardOptions, ZayaConfig};
use zaya_dist::plan::{bytes_per_param, placement_of, Placement};
use zaya_dist::{MeshShape, ParallelPlan};

/// `--tp N --pp N --ep N --dp N`: the rank mesh of a run.
#[derive(clap::Args, Clone, Debug)]
pub struct ParallelArgs {
    /// Tensor-parallel ranks (query heads, experts' inner axis, vocabulary).
    #[arg(long, default_value_t = 1)]
    pub tp: usize,
    /// Pipeline stages (decoder layers).
    #[arg(long, default_value_t = 1)]
    pub pp: usize,
    /// Expert-parallel ranks (experts).
    #[arg(long, default_value_t = 1)]
    pub ep: usize,
    /// Data-parallel replicas (training).
    #[arg(long, default_value_t = 1)]
    pub dp: usize,
    /// The engine that moves the ranks' buffers: `host` (MPI between processes, shared
    /// memory between local ranks) or `nccl` (NCCL on each process's GPU, MPI carrying
    /// its bootstrap: one MPI process per GPU, a zaya built with `--features mpi,nccl`).
    #[arg(long, value_enum, default_value_t = Collectives::Host)]
    pub collectives: Collectives,
}

/// Which engine carries the collectives of a parallel run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Collectives {
    Host,
    Nccl,
}

impl ParallelArgs {
    /// The mesh asked for, refused before any work where the collective engine cannot run
    /// it (NCCL needs MPI processes and a build with NCCL).
    pub fn mesh(&self) -> Result<MeshShape> {
        if self.collectives == Collectives::Nccl {
            if !cfg!(feature = "nccl") {
                bail!("--collectives nccl: this zaya was built without NCCL: rebuild with `--features mpi,nccl`");
            }
            if !zaya_dist::comm::launched_by_mpi() {
                bail!("--collectives nccl runs one process per GPU: start the ranks with `mpirun -n N zaya ...` (or `zaya launch --backend mpi`)");
            }
        }
        Ok(MeshShape::new(self.tp, self.pp, self.ep, self.dp)?)
    }

    pub fn is_parallel(&self) -> bool {
        self.tp * self.pp * self.ep * self.dp > 1
    }
}

/// This MPI process's world communicator on the engine `collectives` names.
#[cfg(feature = "mpi")]
pub fn mpi_world_comm(
    world: &zaya_dist::mpi_backend::MpiWorld,
    collectives: Collectives,
    timeout: std::time::Duration,
) -> Result<Box<dyn zaya_dist::Comm>> {
    let host = Box::new(world.comm(timeout));
    match collectives {
        Collectives::Host => Ok(host),
        #[cfg(feature = "nccl")]
        Collectives::Nccl => {
            let comm = zaya_dist::nccl_backend::NcclComm::on_node_gpu(host, timeout)?;
            tracing::info!("rank {}: NCCL on GPU {}", zaya_dist::Comm::world_rank(&comm), comm.ordinal());
            Ok(Box::new(comm))
        }
        #[cfg(not(feature = "nccl"))]
        Collectives::Nccl => bail!("--collectives nccl: this zaya was built without NCCL: rebuild with `--features mpi,nccl`"),
    }
}

#[derive(clap::Args)]
pub struct PlanArgs {
    /// Model directory, or a config.json (nothing is loaded: sizes come from the config).
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    pub parallel: ParallelArgs,
    /// Bytes per weight element: f32, bf16 or f16.
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    /// Count training state too: f32 gradients, f32 master weights (unless f32) and AdamW's
    /// two f32 moments per parameter.
    #[arg(long)]
    pub training: bool,
    /// Memory of one device in GiB: each rank is checked against it.
    #[arg(long)]
    pub device_gib: Option<f64>,
    /// Print every tensor each rank holds (name, placement, shape held).
    #[arg(long)]
    pub tensors: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct RankRow {
    rank: usize,
    tp: usize,
    pp: usize,
    ep: usize,
    dp: usize,
    layers: String,
    query_heads: String,
    kv_heads: String,
    experts: String,
    params: u64,
    bytes: u64,
    fits: Option<bool>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tensors: Vec<TensorRow>,
}

#[derive(Serialize)]
struct TensorRow {
    name: String,
    placement: Placement,
    full: Vec<usize>,
    held: Vec<usize>,
}

fn read_config(path: &Path) -> Result<ZayaConfig> {
    if path.is_dir()
        && (path.join("model.safetensors").exists()
            || path.join("model.safetensors.index.json").exists())
    {
        return Ok(Checkpoint::open(path)?.config()?);
    }
    let file = if path.is_dir() {
        path.join("config.json")
    } else {
        path.to_path_buf()
    };
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", file.display()))?;
    ZayaConfig::from_json(&v)
        .or_else(|_| ZayaConfig::from_legacy_json(&v))
        .with_context(|| format!("reading {}", file.display()))
}

fn dtype_bytes(s: &str) -> Result<usize> {
    Ok(match s {
        "f32" | "float32" => 4,
        "bf16" | "bfloat16" | "f16" | "float16" => 2,
        other => bail!("unknown dtype `{other}` (expected f32, bf16 or f16)"),
    })
}

fn range_text(r: std::ops::Range<usize>) -> String {
    if r.len() == 1 {
        r.start.to_string()
    } else {
        format!("{}-{}", r.start, r.end - 1)
    }
}

pub fn run_plan(args: PlanArgs) -> Result<()> {
    let cfg = read_config(&args.model)?;
    let mesh = args.parallel.mesh()?;
    let plan = ParallelPlan::new(&cfg, mesh)?;
    let per_param = bytes_per_param(dtype_bytes(&args.dtype)?, args.training);
    let limit = args.device_gib.map(|g| (g * (1u64 << 30) as f64) as u64);
    let mut rows = Vec::new();
    for rank in 0..mesh.world() {
        let c = mesh.coords(rank);
        let heads = plan.heads(c.tp);
        let params = plan.rank_params(rank);
        let bytes = params * per_param;
        let tensors = if args.tensors {
            plan.holdings(rank)
                .into_iter()
                .map(|(spec, _, held)| TensorRow {
                    placement: placement_of(&plan.rules, &spec.name),
                    name: spec.name,
                    full: spec.shape,
                    held,
                })
                .collect()
        } else {
            vec![]
        };
        rows.push(RankRow {
            rank,
            tp: c.tp,
            pp: c.pp,
            ep: c.ep,
            dp: c.dp,
            layers: range_text(plan.stage_layers(c.pp)),
            query_heads: range_text(heads.query),
            kv_heads: range_text(heads.kv),
            experts: range_text(plan.experts(c.ep)),
            params,
            bytes,
            fits: limit.map(|l| bytes <= l),
            tensors,
        });
    }
    let total: u64 = zaya::weights::native_specs(&cfg)
        .iter()
        .map(|s| s.shape.iter().product::<usize>() as u64)
        .sum();
    if args.json {
        let v = serde_json::json!({
            "mesh": mesh,
            "world": mesh.world(),
            "model_params": total,
            "bytes_per_param": per_param,
            "training": args.training,
            "rules": plan.rules,
            "ranks": rows,
        });
        return crate::out::print(&serde_json::to_string_pretty(&v)?).map_err(Into::into);
    }
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let mut text = format!(
        "plan {} ({} ranks): {} parameters, {} bytes each ({})\n",
        mesh.label(),
        mesh.world(),
        total,
        per_param,
        if args.training {
            "weights + f32 grads + f32 master + AdamW moments; activations not counted"
        } else {
            "weights only"
        }
    );
    text.push_str("rank  tp pp ep dp  layers  q-heads kv-heads experts      params     GiB");
    if limit.is_some() {
        text.push_str("  fits");
    }
    text.push('\n');
    for r in &rows {
        text.push_str(&format!(
            "{:>4} {:>3} {:>2} {:>2} {:>2} {:>7} {:>8} {:>8} {:>7} {:>11} {:>7.2}",
            r.rank,
            r.tp,
            r.pp,
            r.ep,
            r.dp,
            r.layers,
            r.query_heads,
            r.kv_heads,
            r.experts,
            r.params,
            gib(r.bytes)
        ));
        if let Some(f) = r.fits {
            text.push_str(if f { "   yes" } else { "    NO" });
        }
        text.push('\n');
        for t in &r.tensors {
            text.push_str(&format!(
                "        {:<60} {:<16} {:?} of {:?}\n",
                t.name,
                format!("{:?}", t.placement),
                t.held,
                t.full
            ));
        }
    }
    let max = rows.iter().map(|r| r.bytes).max().unwrap_or(0);
    text.push_str(&format!("largest rank: {:.2} GiB", gib(max)));
    if let Some(l) = limit {
        text.push_str(&format!(
            " of {:.2} GiB per device: {}",
            gib(l),
            if max <= l { "fits" } else { "does NOT fit" }
        ));
    }
    text.push('\n');
    crate::out::print(&text).map_err(Into::into)
}

/// A labelled batch for `zaya forward --tp N` (writes `loss`, `aux_loss` and, with
/// `grads`, `grad.<HF name>` of every parameter gathered to its full tensor).
pub struct Labelled {
    pub batch: zaya::train::Batch,
    pub grads: bool,
    pub checkpointing: zaya::train::Checkpointing,
}

/// Keeps the gradients only when they were asked for.
fn labelled_entries(
    mut t: std::collections::BTreeMap<String, Tensor>,
    l: &Labelled,
) -> std::collections::BTreeMap<String, Tensor> {
    if !l.grads {
        t.retain(|k, _| !k.starts_with("grad."));
    }
    t
}

/// The logits and captures of a mesh forward under the names a single-rank `zaya forward`
/// writes (`hidden_states.{i}`, `attentions.{i}`, `router_logits.{i}`, `expert_choice.{i}`).
fn mesh_entries(out: &zaya_dist::MeshOutput) -> Result<std::collections::HashMap<String, Tensor>> {
    let mut t =
        std::collections::HashMap::from([("logits".to_string(), out.logits.to_dtype(DType::F32)?)]);
    for (i, h) in out.hidden_states.iter().enumerate() {
        t.insert(format!("hidden_states.{i}"), h.to_dtype(DType::F32)?);
    }
    for (i, a) in out.attentions.iter().enumerate() {
        t.insert(format!("attentions.{i}"), a.to_dtype(DType::F32)?);
    }
    for (i, r) in out.router_logits.iter().enumerate() {
        t.insert(format!("router_logits.{i}"), r.to_dtype(DType::F32)?);
    }
    for (i, c) in out.expert_choices.iter().enumerate() {
        let choice: Vec<i64> = c.iter().map(|&c| i64::from(c)).collect();
        t.insert(
            format!("expert_choice.{i}"),
            Tensor::new(choice, out.logits.device())?,
        );
    }
    Ok(t)
}

/// `zaya forward --tp N`: local ranks in this process, rank 0's outputs written.
#[allow(clippy::too_many_arguments)]
pub fn forward_parallel(
    dir: &Path,
    parallel: &ParallelArgs,
    dtype: DType,
    ids: &Tensor,
    opts: &ForwardOptions,
    extra: zaya_dist::MeshCapture,
    labels: Option<&Labelled>,
    out: &Path,
) -> Result<()> {
    let mesh = parallel.mesh()?;
    #[cfg(not(feature = "mpi"))]
    if zaya_dist::comm::launched_by_mpi() {
        // every copy would run all the ranks itself and write the same file
        bail!("started by an MPI launcher, but this zaya was built without MPI: rebuild with `--features mpi` (needs libopenmpi-dev, libclang-dev)");
    }
    if !matches!(dtype, DType::F32 | DType::BF16) {
        bail!("zaya forward with parallel ranks runs in f32 or bf16 (asked --dtype {dtype:?})");
    }
    #[cfg(feature = "mpi")]
    if zaya_dist::mpi_backend::launched_by_mpi() {
        return forward_mpi(dir, parallel, dtype, ids, opts, extra, labels, out);
    }
    let got = zaya_dist::forward_mesh_captured_on_local_ranks(
        dir,
        mesh,
        ids,
        opts,
        extra,
        dtype,
        zaya_dist::DEFAULT_TIMEOUT,
    )?;
    let mut tensors = mesh_entries(&got)?;
    if let Some(l) = labels {
        let got = zaya_dist::tp::train::labelled_grads_on_local_ranks(
            dir,
            mesh,
            &l.batch,
            l.checkpointing,
            zaya_dist::DEFAULT_TIMEOUT,
        )?;
        tensors.extend(labelled_entries(got, l));
    }
    candle_core::safetensors::save(&tensors, out)
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

/// `zaya forward --tp N` as one of `N` MPI processes (`mpirun -n N zaya forward ...`):
/// this process loads its slices; rank 0 writes the outputs.
#[cfg(feature = "mpi")]
#[allow(clippy::too_many_arguments)]
pub fn forward_mpi(
    dir: &Path,
    parallel: &ParallelArgs,
    dtype: DType,
    ids: &Tensor,
    opts: &ForwardOptions,
    extra: zaya_dist::MeshCapture,
    labels: Option<&Labelled>,
    out: &Path,
) -> Result<()> {
    let shape = parallel.mesh()?;
    let world = zaya_dist::mpi_backend::MpiWorld::init()?;
    let comm = mpi_world_comm(&world, parallel.collectives, zaya_dist::DEFAULT_TIMEOUT)?;
    let mesh = zaya_dist::Mesh::new(comm, shape)?;
    let ckpt = std::sync::Arc::new(Checkpoint::open(dir)?);
    let cfg = ckpt.config()?;
    ckpt.validate(&cfg)?;
    let plan = ParallelPlan::new(&cfg, shape)?;
    let model =
        zaya_dist::TpModel::at(&ckpt, &plan, mesh.coords, dtype, &candle_core::Device::Cpu)?;
    let got = model.forward_mesh_captured(mesh.groups(), ids, None, opts, extra)?;
    let grads = match labels {
        Some(l) => zaya_dist::tp::train::labelled_grads_on_mesh(
            &ckpt,
            &plan,
            &mesh,
            &l.batch,
            l.checkpointing,
        )?
        .map(|g| labelled_entries(g, l)),
        None => None,
    };
    if mesh.world.rank() == 0 {
        let mut tensors = mesh_entries(&got)?;
        tensors.extend(grads.into_iter().flatten());
        candle_core::safetensors::save(&tensors, out)
            .with_context(|| format!("writing {}", out.display()))?;
    }
    mesh.world.barrier()?;
    Ok(())
}

#[derive(clap::Args)]
pub struct LaunchArgs {
    /// Number of ranks.
    #[arg(long)]
    pub nproc: usize,
    /// `mpi`: `nproc` processes under `mpirun`; `local`: one process whose command runs
    /// `nproc` local ranks (threads).
    #[arg(long, default_value = "local")]
    pub backend: String,
    /// The zaya command and its arguments (after `--`).
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

/// The mesh size a command line asks for (`--tp/--pp/--ep/--dp`, default 1).
fn mesh_world(args: &[String]) -> Result<usize> {
    let mut world = 1usize;
    for flag in ["--tp", "--pp", "--ep", "--dp"] {
        let mut v = None;
        for (i, a) in args.iter().enumerate() {
            if a == flag {
                v = args.get(i + 1).cloned();
            } else if let Some(x) = a.strip_prefix(&format!("{flag}=")) {
                v = Some(x.to_string());
            }
        }
        if let Some(v) = v {
            world *= v
                .parse::<usize>()
                .with_context(|| format!("{flag} {v}: not a number"))?;
        }
    }
    Ok(world)
}

/// `zaya launch --nproc N [--backend mpi|local] -- <zaya command>`.
pub fn run_launch(args: LaunchArgs) -> Result<()> {
    let world = mesh_world(&args.command)?;
    if world != args.nproc {
        bail!(
            "--nproc {} but the command's --tp × --pp × --ep × --dp is {world}",
            args.nproc
        );
    }
    let exe = std::env::current_exe().context("finding the zaya executable")?;
    let status = match args.backend.as_str() {
        "local" => std::process::Command::new(&exe).args(&args.command).status(),
        "mpi" => {
            if !cfg!(feature = "mpi") {
                bail!("this zaya was built without MPI: rebuild with `--features mpi` (needs libopenmpi-dev, libclang-dev)");
            }
            std::process::Command::new("mpirun")
                .args(["-n", &args.nproc.to_string()])
                .arg(&exe)
                .args(&args.command)
                .status()
        }
        other => bail!("unknown backend `{other}` (expected mpi or local)"),
    }
    .with_context(|| format!("starting the {} ranks", args.backend))?;
    if !status.success() {
        bail!("the ranks failed ({status})");
    }
    Ok(())
}

/// `zaya generate --inputs IN.json --tp/--pp/--ep N`: greedy decoding on local ranks, each
/// prompt (padding removed) on its own with caches split by stage and head; prints
/// `{"sequences": [[new ids], ...]}` like the single-rank command.
#[allow(clippy::too_many_arguments)]
pub fn generate_parallel(
    dir: &Path,
    parallel: &ParallelArgs,
    dtype: DType,
    input_ids: &[Vec<i64>],
    attention_mask: Option<&[Vec<i64>]>,
    max_new_tokens: usize,
    ignore_eos: bool,
    attn: zaya::attention::AttnImplementation,
) -> Result<()> {
    if !matches!(dtype, DType::F32 | DType::BF16) {
        bail!("generation with parallel ranks runs in f32 or bf16 (asked --dtype {dtype:?})");
    }
    let shape = parallel.mesh()?;
    let ckpt = std::sync::Arc::new(Checkpoint::open(dir)?);
    let cfg = ckpt.config()?;
    ckpt.validate(&cfg)?;
    let plan = ParallelPlan::new(&cfg, shape)?;
    let mut prompts = Vec::with_capacity(input_ids.len());
    for (row, ids) in input_ids.iter().enumerate() {
        let mut p = Vec::with_capacity(ids.len());
        for (pos, &id) in ids.iter().enumerate() {
            if attention_mask.is_some_and(|m| m[row][pos] == 0) {
                continue;
            }
            if id < 0 || id as usize >= cfg.vocab_size {
                return Err(zaya::ZayaError::TokenOutOfRange {
                    id,
                    row,
                    position: pos,
                    vocab_size: cfg.vocab_size,
                }
                .into());
            }
            p.push(id as u32);
        }
        if p.is_empty() {
            bail!("row {row} of input_ids has no token to continue");
        }
        prompts.push(p);
    }
    let eos: Vec<u32> = if ignore_eos {
        vec![]
    } else {
        cfg.eos_token_id.clone()
    };
    // One rank's work: its slices, then every prompt greedily (all ranks in step).
    let on_rank = |mesh: &zaya_dist::Mesh| -> zaya_dist::ParallelResult<Vec<Vec<u32>>> {
        let model =
            zaya_dist::TpModel::at(&ckpt, &plan, mesh.coords, dtype, &candle_core::Device::Cpu)?;
        prompts
            .iter()
            .map(|p| {
                let prompt = Tensor::new(p.as_slice(), &candle_core::Device::Cpu)?.unsqueeze(0)?;
                model.generate_greedy_mesh(mesh.groups(), &prompt, max_new_tokens, &eos, attn)
            })
            .collect()
    };
    let print = |sequences: Vec<Vec<u32>>| {
        crate::out::println(&serde_json::json!({ "sequences": sequences }).to_string())
    };
    // `mpirun -n N zaya generate --inputs ...`: this process is one rank; rank 0 prints
    #[cfg(feature = "mpi")]
    if zaya_dist::mpi_backend::launched_by_mpi() {
        let world = zaya_dist::mpi_backend::MpiWorld::init()?;
        let comm = mpi_world_comm(&world, parallel.collectives, zaya_dist::DEFAULT_TIMEOUT)?;
        let mesh = zaya_dist::Mesh::new(comm, shape)?;
        let sequences = on_rank(&mesh)?;
        if mesh.world.rank() == 0 {
            print(sequences)?;
        }
        mesh.world.barrier()?;
        return Ok(());
    }
    #[cfg(not(feature = "mpi"))]
    if zaya_dist::comm::launched_by_mpi() {
        // every copy would run all the ranks itself and print the same answer
        bail!("started by an MPI launcher, but this zaya was built without MPI: rebuild with `--features mpi` (needs libopenmpi-dev, libclang-dev)");
    }
    let world = zaya_dist::LocalWorld::new(shape.world(), zaya_dist::DEFAULT_TIMEOUT)?;
    let outs = world.run(|comm| on_rank(&zaya_dist::Mesh::new(Box::new(comm), shape)?));
    print(zaya_dist::tp::first_of(outs)?)?;
    Ok(())
}

#[derive(clap::Args)]
pub struct BenchParallelArgs {
    /// Model directory (f32 is used).
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    pub parallel: ParallelArgs,
    /// Prompt length of the prefill.
    #[arg(long, default_value_t = 128)]
    pub prompt_len: usize,
    /// Decoded tokens (greedy, cached).
    #[arg(long, default_value_t = 16)]
    pub new_tokens: usize,
    /// Weights and activations: f32 or bf16 (the single rank runs the same dtype).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `zaya bench-parallel`: one rank and the mesh in the same run (local ranks, or MPI
/// processes under `mpirun`): prefill and cached decode throughput, and each rank's weight
/// bytes (and, on processes, its peak RSS).
pub fn run_bench_parallel(args: BenchParallelArgs) -> Result<()> {
    let Some((v, text)) = measure_bench_parallel(&args)? else {
        return Ok(()); // an MPI rank other than 0: rank 0 reports
    };
    if args.json {
        return crate::out::println(&v.to_string()).map_err(Into::into);
    }
    crate::out::print(&text).map_err(Into::into)
}

/// What one mesh rank measured in [`bench_on_mesh`] (the per-rank lists are gathered, in
/// rank order, on every rank).
struct MeshRun {
    prefill_s: f64,
    decode_s: f64,
    tokens: Vec<u32>,
    rank_weight_mib: Vec<f32>,
    rank_peak_rss_mib: Vec<f32>,
}

const MIB: f64 = (1u64 << 20) as f64;

/// One rank's part of the benchmark: loads only its slices, then (all ranks starting
/// together) prefill of `prompt` and `new_tokens - 1` cached greedy decode steps.
fn bench_on_mesh(
    mesh: &zaya_dist::Mesh,
    ckpt: &std::sync::Arc<Checkpoint>,
    plan: &ParallelPlan,
    prompt: &Tensor,
    new_tokens: usize,
    dtype: DType,
    opts: &ForwardOptions,
) -> Result<MeshRun, zaya_dist::ParallelError> {
    use std::time::Instant;
    let dev = candle_core::Device::Cpu;
    let model = zaya_dist::TpModel::at(ckpt, plan, mesh.coords, dtype, &dev)?;
    let bytes = model.weight_bytes();
    let mut cache = model.new_cache();
    mesh.world.barrier()?;
    let t0 = Instant::now();
    let (logits, _) = model.forward_mesh(mesh.groups(), prompt, Some(&mut cache), opts)?;
    let prefill_s = t0.elapsed().as_secs_f64();
    let mut next =
        zaya::generation::argmax(&logits.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?);
    let mut tokens = vec![next];
    let t1 = Instant::now();
    for _ in 1..new_tokens {
        let step = Tensor::new(&[[next]], &dev)?;
        let (logits, _) = model.forward_mesh(mesh.groups(), &step, Some(&mut cache), opts)?;
        next = zaya::generation::argmax(&logits.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?);
        tokens.push(next);
    }
    let decode_s = t1.elapsed().as_secs_f64();
    let rss = crate::bench::peak_rss_bytes() as f64 / MIB;
    // before the gathers, so that every rank has let go of its slices once rank 0 goes on
    // to load the whole model for the baseline (processes on one machine)
    drop((cache, model));
    release_freed_memory();
    let rank_weight_mib = mesh.world.all_gather(&[(bytes as f64 / MIB) as f32])?;
    let rank_peak_rss_mib = mesh.world.all_gather(&[rss as f32])?;
    Ok(MeshRun {
        prefill_s,
        decode_s,
        tokens,
        rank_weight_mib,
        rank_peak_rss_mib,
    })
}

/// Hands the heap's free pages back to the system. `zaya` keeps freed blocks for reuse
/// (`keep_freed_memory_for_reuse` in main.rs), so a dropped model would otherwise stay
/// resident and the next load on the same machine could be refused for lack of memory.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap memory to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The single-rank baseline: `(prefill s, decode s, greedy tokens, weight bytes)`.
fn bench_single(
    dir: &Path,
    cfg: &ZayaConfig,
    prompt: &Tensor,
    new_tokens: usize,
    dtype: DType,
    opts: &ForwardOptions,
) -> Result<(f64, f64, Vec<u32>, usize)> {
    use std::time::Instant;
    let dev = candle_core::Device::Cpu;
    let single = zaya::ZayaModel::load(dir, dtype, &dev)?;
    let t0 = Instant::now();
    let mut cache = zaya::HybridCache::new(cfg);
    let first = single.forward(prompt, Some(&mut cache), opts)?;
    let prefill = t0.elapsed().as_secs_f64();
    let logits = first.logits.context("the forward returned no logits")?;
    let mut next =
        zaya::generation::argmax(&logits.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?);
    let mut tokens = vec![next];
    let t1 = Instant::now();
    for _ in 1..new_tokens {
        let out = single.forward(&Tensor::new(&[[next]], &dev)?, Some(&mut cache), opts)?;
        let logits = out.logits.context("the forward returned no logits")?;
        next = zaya::generation::argmax(&logits.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?);
        tokens.push(next);
    }
    let (decode, bytes) = (t1.elapsed().as_secs_f64(), single.weight_bytes());
    drop((cache, single));
    release_freed_memory();
    Ok((prefill, decode, tokens, bytes))
}

/// The measurement of `zaya bench-parallel` (also `zaya bench --tp/--pp/--ep`): the JSON
/// value and the text report. On local ranks the mesh runs as threads of this process
/// (whose peak RSS is the whole mesh's); under `mpirun` each process is one rank (its
/// own peak RSS is reported), the mesh runs first and rank 0 then measures one rank alone
/// (the other ranks wait) and returns the report; the other ranks return `None`.
pub fn measure_bench_parallel(
    args: &BenchParallelArgs,
) -> Result<Option<(serde_json::Value, String)>> {
    let shape = args.parallel.mesh()?;
    let dev = candle_core::Device::Cpu;
    let ckpt = std::sync::Arc::new(Checkpoint::open(&args.model)?);
    let cfg = ckpt.config()?;
    ckpt.validate(&cfg)?;
    let plan = ParallelPlan::new(&cfg, shape)?;
    let dtype = crate::parse_dtype(&args.dtype)?;
    if !matches!(dtype, DType::F32 | DType::BF16) {
        bail!(
            "parallel ranks run in f32 or bf16 (asked --dtype {})",
            args.dtype
        );
    }
    if args.prompt_len == 0 || args.prompt_len + args.new_tokens > cfg.max_position_embeddings {
        bail!(
            "--prompt-len {} + --new-tokens {} must be between 1 and max_position_embeddings = {}",
            args.prompt_len,
            args.new_tokens,
            cfg.max_position_embeddings
        );
    }
    let ids: Vec<u32> = (0..args.prompt_len)
        .map(|i| (i * 7919 % cfg.vocab_size) as u32)
        .collect();
    let prompt = Tensor::new(ids.as_slice(), &dev)?.unsqueeze(0)?;
    let opts = ForwardOptions {
        attn: zaya::attention::AttnImplementation::Sdpa,
        logits_to_keep: 1,
        ..Default::default()
    };

    #[cfg(feature = "mpi")]
    if zaya_dist::mpi_backend::launched_by_mpi() {
        let world = zaya_dist::mpi_backend::MpiWorld::init()?;
        let comm = mpi_world_comm(
            &world,
            args.parallel.collectives,
            zaya_dist::DEFAULT_TIMEOUT,
        )?;
        let mesh = zaya_dist::Mesh::new(comm, shape)?;
        let run = bench_on_mesh(&mesh, &ckpt, &plan, &prompt, args.new_tokens, dtype, &opts)?;
        // the baseline on rank 0 alone, after every rank has freed its slices
        let single = if mesh.world.rank() == 0 {
            Some(bench_single(
                &args.model,
                &cfg,
                &prompt,
                args.new_tokens,
                dtype,
                &opts,
            ))
        } else {
            None
        };
        mesh.world.barrier()?;
        return match single {
            Some(single) => Ok(Some(bench_report(args, shape, "mpi", &run, single?))),
            None => Ok(None),
        };
    }
    #[cfg(not(feature = "mpi"))]
    if zaya_dist::comm::launched_by_mpi() {
        bail!("started by an MPI launcher, but this zaya was built without MPI: rebuild with `--features mpi` (needs libopenmpi-dev, libclang-dev)");
    }

    let single = bench_single(&args.model, &cfg, &prompt, args.new_tokens, dtype, &opts)?;
    let world = zaya_dist::LocalWorld::new(shape.world(), zaya_dist::DEFAULT_TIMEOUT)?;
    let outs = world.run(|comm| {
        let mesh = zaya_dist::Mesh::new(Box::new(comm), shape)?;
        bench_on_mesh(&mesh, &ckpt, &plan, &prompt, args.new_tokens, dtype, &opts)
    });
    let run = zaya_dist::tp::first_of(outs)?;
    Ok(Some(bench_report(args, shape, "local", &run, single)))
}

/// The JSON value and text of the parallel benchmark.
fn bench_report(
    args: &BenchParallelArgs,
    shape: zaya_dist::MeshShape,
    backend: &str,
    run: &MeshRun,
    (single_prefill, single_decode, single_tokens, single_bytes): (f64, f64, Vec<u32>, usize),
) -> (serde_json::Value, String) {
    let steps = args.new_tokens.saturating_sub(1).max(1) as f64;
    let same = run.tokens == single_tokens;
    let processes = backend == "mpi";
    let v = serde_json::json!({
        "mesh": shape,
        "backend": backend,
        "dtype": args.dtype,
        "threads": zaya::kernels::num_threads(),
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "single": {
            "prefill_tok_s": args.prompt_len as f64 / single_prefill,
            "decode_tok_s": steps / single_decode,
            "weight_mib": single_bytes as f64 / MIB,
        },
        "parallel": {
            "prefill_tok_s": args.prompt_len as f64 / run.prefill_s,
            "decode_tok_s": steps / run.decode_s,
            "rank_weight_mib": run.rank_weight_mib,
            // threads of one process share one peak: only processes have their own
            "rank_peak_rss_mib": if processes { Some(&run.rank_peak_rss_mib) } else { None },
        },
        "same_tokens": same,
    });
    let list = |v: &[f32]| {
        v.iter()
            .map(|b| format!("{b:.1}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut text = format!(
        "{} on {} vs one rank ({}, prompt {}, {} new tokens, same greedy tokens: {same})\n\
         prefill tok/s: {:.1} vs {:.1} ({:.2}x)\n\
         decode tok/s:  {:.2} vs {:.2} ({:.2}x)\n\
         weights per rank (MiB): {} vs {:.1}\n",
        shape.label(),
        if processes {
            "MPI processes"
        } else {
            "local ranks"
        },
        args.dtype,
        args.prompt_len,
        args.new_tokens,
        args.prompt_len as f64 / run.prefill_s,
        args.prompt_len as f64 / single_prefill,
        single_prefill / run.prefill_s,
        steps / run.decode_s,
        steps / single_decode,
        single_decode / run.decode_s,
        list(&run.rank_weight_mib),
        single_bytes as f64 / MIB,
    );
    if processes {
        text.push_str(&format!(
            "peak RSS per rank (MiB): {}\n",
            list(&run.rank_peak_rss_mib)
        ));
    }
    (v, text)
}

/// `zaya generate --prompt TEXT --tp/--pp/--ep N`: text prompts on a mesh of local ranks,
/// through the engine `zaya serve --tp ...` runs (each rank loads only its slices), with
/// the single-rank command's sampling (prompt `i` draws with seed `seed + i`, as a batch of
/// rows does there), stop strings, streaming and output. Greedy output equals the
/// single-rank command's.
#[allow(clippy::too_many_arguments)]
pub fn generate_text_on_mesh(
    dir: &Path,
    parallel: &ParallelArgs,
    dtype: DType,
    attn: zaya::attention::AttnImplementation,
    prompts: &[String],
    max_new_tokens: usize,
    ignore_eos: bool,
    sampling: &crate::chat::SamplingArgs,
    as_json: bool,
) -> Result<()> {
    use zaya_engine::{Engine, EngineConfig, EngineModel, Event, FinishReason, GenerationRequest};
    if !matches!(dtype, DType::F32 | DType::BF16) {
        bail!("generation with parallel ranks runs in f32 or bf16 (asked --dtype {dtype:?})");
    }
    let shape = parallel.mesh()?;
    // Under MPI (`mpirun -n N zaya generate --prompt ...`): every process loads its rank;
    // rank 0 tokenizes, drives the engine and prints, the others follow its commands and
    // print nothing. Declared before the engine: MPI stays initialised until it is dropped.
    #[cfg(feature = "mpi")]
    let (mesh, _mpi) = if zaya_dist::mpi_backend::launched_by_mpi() {
        match crate::serve::mesh_on_mpi(
            dir,
            shape,
            parallel.collectives,
            dtype,
            zaya_dist::DEFAULT_TIMEOUT,
            false,
        )? {
            (Some(mesh), world) => (Some(mesh), Some(world)),
            // a follower: rank 0 stopped the mesh after the last prompt
            (None, _) => return Ok(()),
        }
    } else {
        (None, None)
    };
    #[cfg(not(feature = "mpi"))]
    let mesh: Option<zaya_dist::MeshModel> = if zaya_dist::comm::launched_by_mpi() {
        bail!("started by an MPI launcher, but this zaya was built without MPI: rebuild with `--features mpi` (needs libopenmpi-dev, libclang-dev), or drop mpirun (`zaya generate --prompt ... --tp N` starts the ranks as threads)");
    } else {
        None
    };
    crate::chat::check_prompts(prompts)?;
    let tok = std::sync::Arc::new(
        zaya::text::ZayaTokenizer::from_dir(dir)
            .with_context(|| format!("loading the tokenizer of {}", dir.display()))?,
    );
    let ids = prompts
        .iter()
        .map(|p| tok.encode_prompt(p).map_err(Into::into))
        .collect::<Result<Vec<Vec<u32>>>>()?;
    let mesh = match mesh {
        Some(m) => m,
        None => zaya_dist::MeshModel::local(dir, shape, dtype, zaya_dist::DEFAULT_TIMEOUT)
            .with_context(|| format!("starting the {} mesh", shape.label()))?,
    };
    let eos = tok.stop_token_ids(&mesh.model_config().eos_token_id);
    let cfg = EngineConfig {
        max_running: prompts.len().max(1),
        attn,
        ..Default::default()
    };
    let engine = Engine::start(std::sync::Arc::new(mesh), Some(tok.clone()), cfg)?;
    let stream = prompts.len() == 1 && !as_json;
    let start = std::time::Instant::now();
    let base = sampling.params();
    let handles = ids
        .into_iter()
        .enumerate()
        .map(|(i, prompt)| {
            let mut params = base.clone();
            params.seed = base.seed.wrapping_add(i as u64);
            let request = GenerationRequest {
                sampling: params,
                stop_token_ids: if ignore_eos { Vec::new() } else { eos.clone() },
                stop_strings: sampling.stop.clone(),
                ..GenerationRequest::new(prompt, max_new_tokens)
            };
            engine.submit(request).map_err(|e| anyhow::anyhow!("{e}"))
        })
        .collect::<Result<Vec<_>>>()?;
    if stream {
        crate::out::print(&prompts[0])?;
    }
    let (mut texts, mut sequences, mut reasons) = (Vec::new(), Vec::new(), Vec::new());
    for (i, handle) in handles.into_iter().enumerate() {
        let (mut text, mut seq, mut reason) = (String::new(), Vec::new(), None);
        while let Some(event) = handle.recv() {
            match event {
                Event::Token { token, text: t, .. } => {
                    seq.push(token);
                    if stream {
                        crate::out::print(&t)?;
                    }
                    text.push_str(&t);
                }
                Event::Finished {
                    reason: r, text: t, ..
                } => {
                    if stream {
                        crate::out::print(&t)?;
                    }
                    text.push_str(&t);
                    reason = Some(r);
                }
                Event::Done { .. } => break,
                Event::Error { message } => bail!("prompt {i}: {message}"),
            }
        }
        // the engine's `stop` covers EOS and stop strings; the single-rank command tells
        // them apart
        let reason = match reason {
            Some(FinishReason::Stop) if seq.last().is_some_and(|t| eos.contains(t)) => "eos",
            Some(FinishReason::Stop) => "stop",
            Some(FinishReason::Length) => "length",
            Some(FinishReason::Cancelled) | None => bail!("prompt {i}: generation was cancelled"),
        };
        texts.push(text);
        sequences.push(seq);
        reasons.push(reason);
    }
    engine.shutdown(true);
    crate::chat::print_generation(
        prompts,
        &texts,
        &sequences,
        &reasons,
        as_json,
        start.elapsed().as_secs_f64(),
        &format!(", {} ranks", shape.world()),
    )
}
