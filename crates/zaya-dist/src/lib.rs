//! zaya-dist: splitting a ZAYA1 model over ranks.
//!
//! - [`comm`]: the [`Comm`] collective interface and its backends: [`local`] (threads of one
//!   process), [`mpi`](crate::mpi_backend) (feature `mpi`, rsmpi over the system MPI) and
//!   `nccl` (feature `nccl`, cudarc with NCCL loaded at run time).
//! - [`mesh`]: the `dp × pp × ep × tp` rank mesh and its per-axis groups.
//! - [`plan`]: placements as data (name pattern → column / row / replicated /
//!   expert-sharded / vocab-parallel) and what each rank holds.
//! - [`tp`]: one tensor-parallel rank of the model, loading only its slices; [`tp::train`]:
//!   training it (TP × EP, vocab-parallel cross-entropy, a `Trainable` rank, a stage API).
//! - [`autograd`]: collectives with a backward pass (Megatron's conjugate pairs).
//! - [`pipeline`]: pipeline-parallel training stages (layer ranges of the trainable model,
//!   hidden and router state sent between stages, 1F1B over micro-batches).
//! - [`train_driver`]: the pipeline × data-parallel training step (bucketed gradient
//!   all-reduce, ZeRO-1, checkpoints gathered on rank 0); [`tp_driver`]: the tensor ×
//!   expert × data-parallel step on one pipeline stage.
//! - [`serve`]: the engine's model on a mesh of local ranks (`zaya serve --tp/--pp/--ep`):
//!   rank 0 on the engine thread, the other ranks replaying its commands with their own
//!   per-row caches.

pub mod autograd;
pub mod comm;
pub mod error;
pub mod grad;
pub mod local;
pub mod mesh;
#[cfg(feature = "mpi")]
pub mod mpi_backend;
#[cfg(feature = "nccl")]
pub mod nccl_backend;
pub mod pipeline;
pub mod plan;
pub mod serve;
pub mod stream_save;
pub mod tensor;
pub mod tp;
pub mod tp_driver;
pub mod train_driver;

pub use comm::{Comm, DistError, DistResult, DEFAULT_TIMEOUT};
pub use error::{ParallelError, ParallelResult};
pub use local::{LocalComm, LocalWorld, RankFailed};
pub use mesh::{Coords, Mesh, MeshShape};
pub use plan::{ParallelPlan, Placement, PlanError, Rule, ZAYA_PLAN};
pub use serve::{follow_commands, MeshModel, MeshRow, MeshServeError};
pub use tp::{
    forward_mesh_captured_on_local_ranks, forward_mesh_on_local_ranks, forward_on_local_ranks,
    Groups, MeshCapture, MeshOutput, TpModel,
};
pub use tp_driver::TpParallelTrainer;
pub use train_driver::{DriverOptions, ParallelTrainer};
