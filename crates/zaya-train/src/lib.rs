//! Reinforcement fine-tuning of ZAYA1 models with GRPO, in one process: rollouts on the
//! engine over the same weights that are trained, rewards (built-in functions and external
//! processes), multi-turn tool environments, and TRL 1.16's `GRPOTrainer` loss exactly.
//!
//! - [`loss`]: TRL's `_compute_loss` as a function of per-token log-probabilities.
//! - [`batch`]: scored completions → the model's labelled batch, the GRPO backward, and
//!   `zaya grpo-loss`.
//! - [`rollout`]: groups of completions on the engine, tool environments.
//! - [`rewards`], [`process`]: built-in rewards and JSON-lines reward / environment processes.
//! - [`grpo`]: the loop (advantages, iterations, logging, checkpoints).

pub mod batch;
pub mod error;
pub mod grpo;
pub mod loss;
pub mod process;
pub mod rewards;
pub mod rollout;

pub use batch::{
    completion_logps, grpo_backward, grpo_loss_outputs, reference_logps, GrpoBackward, GrpoInputs,
};
pub use error::{GrpoError, Result};
pub use loss::{policy_loss, Accumulation, ImportanceSampling, LossConfig, LossType};
