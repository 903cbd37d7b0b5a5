//! Errors of parallel runs: collectives, plans, the model underneath.

use crate::comm::DistError;
use crate::plan::PlanError;

#[derive(Debug, thiserror::Error)]
pub enum ParallelError {
    #[error(transparent)]
    Dist(#[from] DistError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Model(#[from] zaya::ZayaError),
    #[error("tensor op on a parallel rank: {0}")]
    Candle(#[from] candle_core::Error),
    /// A request this version cannot serve yet (named, never silently ignored).
    #[error("not supported by the parallel model: {0}")]
    Unsupported(String),
}

pub type ParallelResult<T> = std::result::Result<T, ParallelError>;
