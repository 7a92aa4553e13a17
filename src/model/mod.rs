//! The model layer: weights in, logits out. Knows candle and nothing of
//! tokio, HTTP or requests.
//!
//! Layout:
//! - `config`: the architecture numbers (from GGUF metadata or config.json);
//! - `source`: where weights come from (GGUF file or Hugging Face folder),
//!   behind one `WeightSource` so the model code is written once;
//! - `linear`: the single projection type (quantized or dense base weight);
//! - `kv_cache`: a sequence's keys and values in shared, copy-on-write blocks;
//! - `attention`: rotary embedding and causal attention over a sequence's cache;
//! - `ops`: the element-wise steps (residual add, gated activation);
//! - `lora`: un-merged per-row adapter deltas;
//! - `kernels`: our quantized matmuls (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) and
//!   activation quantization;
//! - `llama`: the Llama-family transformer, forward over a batch of sequences.

pub mod attention;
pub mod config;
pub mod gguf;
pub mod kernels;
pub mod kv_cache;
pub mod linear;
pub mod llama;
pub mod lora;
pub mod ops;
pub mod random;
pub mod safetensors;
pub mod source;

pub use config::ModelConfig;
pub use kv_cache::{KvBlock, KvCache, BLOCK_TOKENS};
pub use linear::{Linear, Projections};
pub use llama::{BatchRow, Llama};
pub use source::{ModelFormat, QuantType, WeightMode};

/// Failures while loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{0}")]
    Candle(#[from] candle_core::Error),
    #[error("cannot read {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("model metadata is missing `{0}`")]
    MissingMetadata(String),
    #[error("model has no tensor `{0}`")]
    MissingTensor(String),
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("invalid model: {0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, ModelError>;
