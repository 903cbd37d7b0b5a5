//! zaya: a Rust engine for the ZAYA1 family of mixture-of-experts language models
//! (Zyphra's ZAYA1-8B and relatives), numerically identical to the Hugging Face
//! `transformers` 5.23 reference (`ZayaForCausalLM`).
//!
//! ```no_run
//! use zaya::{ZayaModel, HybridCache, ForwardOptions};
//! # fn main() -> zaya::Result<()> {
//! let dev = candle_core::Device::Cpu;
//! let model = ZayaModel::load("path/to/ZAYA1-8B", candle_core::DType::BF16, &dev)?;
//! let ids = candle_core::Tensor::new(&[[2u32, 9259, 236888]], &dev)?;
//! let mut cache = HybridCache::new(model.config());
//! let out = model.forward(&ids, Some(&mut cache), &ForwardOptions::default())?;
//! # Ok(()) }
//! ```

pub mod attention;
pub mod cache;
pub mod config;
pub mod data;
pub mod durable;
pub mod error;
pub mod generation;
pub mod gguf;
pub mod gptq;
pub mod imatrix;
pub mod init;
pub mod kernels;
pub mod lora;
pub mod model;
pub mod quant;
pub mod safetensors_io;
pub mod sampling;
pub mod text;
pub mod train;
pub mod weights;

pub use cache::HybridCache;
pub use config::{LayerType, ZayaConfig};
pub use error::{Result, ZayaError};
pub use model::{Capture, ForwardOptions, ModelOutput, ModelPart, ZayaModel};
