//! Where weights come from. The model code asks for tensors by their Hugging
//! Face names (`model.layers.0.self_attn.q_proj`), and each format maps them
//! to its own storage, so the transformer is written once.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::Tensor;

use super::kernels;
use super::kernels::half::{HalfKind, HalfMatrix};
use super::linear::Weight;
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
    /// Every projection (re)quantized at load to this type, so a Hugging
    /// Face folder runs at GGUF speed (`--quantize`).
    QuantizeTo(QuantType),
    /// Dense projections kept in (or converted to) this 16-bit type
    /// (`--dtype f16|bf16`); quantized GGUF blocks stay as they are.
    Half(HalfKind),
}

/// A dense weight as the mode wants it: 16-bit formats stay 16-bit unless
/// float32 was asked for (`stored`: the checkpoint's own 16-bit kind, if any).
pub fn dense_weight(w: &Tensor, stored: Option<HalfKind>, mode: WeightMode) -> Result<Weight> {
    let kind = match mode {
        WeightMode::F32 => None,
        WeightMode::QuantizeTo(to) => return quantize_dense(w, to),
        WeightMode::Half(kind) => Some(kind),
        WeightMode::Quantized => stored,
    };
    let Some(kind) = kind else {
        return Weight::dense(w);
    };
    Ok(Weight::Half(std::sync::Arc::new(half_matrix(w, kind)?)))
}

/// A `[rows, cols]` tensor as a 16-bit matrix of `kind`.
pub fn half_matrix(w: &Tensor, kind: HalfKind) -> Result<HalfMatrix> {
    let (rows, cols) = w.dims2()?;
    let bits: Vec<u16> = match kind {
        HalfKind::F16 => w
            .to_dtype(candle_core::DType::F16)?
            .flatten_all()?
            .to_vec1::<half::f16>()?
            .into_iter()
            .map(|v| v.to_bits())
            .collect(),
        HalfKind::Bf16 => w
            .to_dtype(candle_core::DType::BF16)?
            .flatten_all()?
            .to_vec1::<half::bf16>()?
            .into_iter()
            .map(|v| v.to_bits())
            .collect(),
    };
    HalfMatrix::new(kind, bits, rows, cols).ok_or_else(|| super::ModelError::Invalid("16-bit weight".into()))
}

/// Types `--quantize` can produce (each has our own kernel).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum QuantType {
    #[value(name = "q4_0")]
    Q4_0,
    #[value(name = "q4_1")]
    Q4_1,
    #[value(name = "q5_0")]
    Q5_0,
    #[value(name = "q5_1")]
    Q5_1,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_k")]
    Q4K,
    #[value(name = "q5_k")]
    Q5K,
    #[value(name = "q6_k")]
    Q6K,
}

impl QuantType {
    pub fn ggml(self) -> GgmlDType {
        match self {
            Self::Q4_0 => GgmlDType::Q4_0,
            Self::Q4_1 => GgmlDType::Q4_1,
            Self::Q5_0 => GgmlDType::Q5_0,
            Self::Q5_1 => GgmlDType::Q5_1,
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q4K => GgmlDType::Q4K,
            Self::Q5K => GgmlDType::Q5K,
            Self::Q6K => GgmlDType::Q6K,
        }
    }

    /// Values per block.
    fn block(self) -> usize {
        match self {
            Self::Q4K | Self::Q5K | Self::Q6K => 256,
            _ => 32,
        }
    }

    /// What llama.cpp uses for rows too narrow for a K-quant super-block.
    fn fallback(self) -> Option<Self> {
        match self {
            Self::Q4K => Some(Self::Q5_0),
            Self::Q5K => Some(Self::Q5_1),
            Self::Q6K => Some(Self::Q8_0),
            _ => None,
        }
    }
}

/// A dense `[out, in]` weight quantized to `to` on our kernels; rows too
/// narrow for a K-quant super-block take llama.cpp's fallback type, rows
/// that are not whole blocks of 32 stay dense.
pub fn quantize_dense(w: &Tensor, to: QuantType) -> Result<Weight> {
    let (rows, cols) = w.dims2()?;
    if !cols.is_multiple_of(to.block()) {
        return match to.fallback() {
            Some(narrower) => quantize_dense(w, narrower),
            None => Weight::dense(w),
        };
    }
    let q = QTensor::quantize(&w.to_dtype(candle_core::DType::F32)?, to.ggml())?;
    Ok(match kernels::from_gguf(to.ggml(), &q.data()?, rows, cols) {
        Some(matrix) => Weight::Kernel(matrix),
        None => Weight::Quantized(QMatMul::from_qtensor(q)?),
    })
}

/// A token embedding table: candle's lookup for quantized or float32
/// tables, or a 16-bit matrix that a tied output head can share (one copy:
/// 525 MB for a Llama-3.2-1B-sized vocabulary).
pub enum TokenTable {
    Table(QMatMul),
    Half(std::sync::Arc<HalfMatrix>),
}

impl TokenTable {
    /// `[ids.len(), hidden]`, float32.
    pub fn lookup(&self, ids: &[u32]) -> Result<Tensor> {
        let cpu = &candle_core::Device::Cpu;
        match self {
            Self::Table(table) => {
                let ids = Tensor::new(ids, cpu)?;
                Ok(table.embedding(&ids)?.to_dtype(candle_core::DType::F32)?)
            }
            Self::Half(m) => {
                let rows =
                    m.gather(ids).ok_or_else(|| super::ModelError::Invalid("token id outside the embedding".into()))?;
                Ok(Tensor::from_vec(rows, (ids.len(), m.cols()), cpu)?)
            }
        }
    }
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
    /// The token embedding table (`model.embed_tokens`).
    fn embedding(&mut self, name: &str) -> Result<TokenTable>;
    fn contains(&self, name: &str) -> bool;
    /// A fused projection (`qkv_proj`, `gate_up_proj`) split by output rows
    /// into `parts` projections of the given widths, in order.
    fn linear_split(&mut self, name: &str, parts: &[usize]) -> Result<Vec<Linear>>;
    /// Tensors of the file that nothing has read, by their name in the file.
    /// A model that leaves one unread would silently compute something else.
    fn unused(&self) -> Vec<String>;
}
