//! Where weights come from. The model code asks for tensors by their Hugging
//! Face names (`model.layers.0.self_attn.q_proj`), and each format maps them
//! to its own storage, so the transformer is written once.

use candle_core::quantized::QMatMul;
use candle_core::Tensor;

use super::{Linear, ModelConfig, Result};

/// How projection weights are kept in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightMode {
    /// GGUF blocks stay quantized (the default: smallest and fastest).
    #[default]
    Quantized,
    /// Every weight dequantized to float32 at load: exact parity with the
    /// float32 reference, at four to eight times the memory.
    F32,
}

/// The file layout a model came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFormat {
    Gguf,
    HuggingFace,
}

pub trait WeightSource {
    fn config(&self) -> &ModelConfig;
    /// A projection, `name` without the `.weight` suffix; a `.bias` is used if present.
    fn linear(&mut self, name: &str) -> Result<Linear>;
    /// A float32 tensor (norm weights), full name.
    fn dense(&mut self, name: &str) -> Result<Tensor>;
    /// The token embedding table (`model.embed_tokens`), as a lookup table.
    fn embedding(&mut self, name: &str) -> Result<QMatMul>;
    fn contains(&self, name: &str) -> bool;
    /// A fused projection (`qkv_proj`, `gate_up_proj`) split by output rows
    /// into `parts` projections of the given widths, in order.
    fn linear_split(&mut self, name: &str, parts: &[usize]) -> Result<Vec<Linear>>;
    /// Tensors of the file that nothing has read, by their name in the file.
    /// A model that leaves one unread would silently compute something else.
    fn unused(&self) -> Vec<String>;
}
