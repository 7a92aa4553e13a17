//! A tiny Llama with seeded random weights, built in-process: fast engine
//! and scheduler tests without the real model. Projections are Q4_1 (or any
//! type with a kernel) and the tied head Q8_0, so the tests run the
//! production kernels; a twin with the same weights dequantized to float32
//! is the reference for each kernel in a whole forward pass.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Tensor};

use super::linear::{Linear, Weight};
use super::source::WeightSource;
use super::{ModelConfig, Result};

pub struct RandomSource {
    config: ModelConfig,
    seed: u64,
    /// The projections' weight type.
    dtype: GgmlDType,
    /// Whether projections are those quantized weights widened to float32.
    dequantized: bool,
}

impl RandomSource {
    pub fn new(config: ModelConfig, seed: u64) -> Self {
        Self { config, seed, dtype: GgmlDType::Q4_1, dequantized: false }
    }

    /// Projections of `dtype` (on our kernels), or, with `dequantized`, the
    /// same quantized values as dense float32 weights.
    pub fn with_projections(mut self, dtype: GgmlDType, dequantized: bool) -> Self {
        self.dtype = dtype;
        self.dequantized = dequantized;
        self
    }

    /// A small config: every width a multiple of the 32-wide quant blocks.
    pub fn tiny_config(vocab_size: usize) -> ModelConfig {
        ModelConfig {
            architecture: super::config::Architecture::Llama,
            vocab_size,
            hidden_size: 64,
            intermediate_size: 128,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 16,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling: super::config::RopeScaling::Default,
            max_position_embeddings: 1024,
            tie_word_embeddings: true,
            attention_bias: false,
            qk_norm: false,
        }
    }

    /// Deterministic pseudo-random values per tensor name (no RNG state shared
    /// between tensors, so load order does not matter).
    fn values(&self, name: &str, n: usize, scale: f32) -> Vec<f32> {
        let mut state =
            name.bytes().fold(self.seed ^ 0x9E37_79B9_7F4A_7C15, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01B3));
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ((state >> 11) as f32 / (1u64 << 53) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    }

    fn dims(&self, name: &str) -> (usize, usize) {
        let c = &self.config;
        let (q, kv) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let module = name.rsplit('.').next().unwrap_or_default();
        match module {
            "q_proj" => (q, c.hidden_size),
            "k_proj" | "v_proj" => (kv, c.hidden_size),
            "o_proj" => (c.hidden_size, q),
            "qkv_proj" => (q + 2 * kv, c.hidden_size),
            "gate_up_proj" => (2 * c.intermediate_size, c.hidden_size),
            "gate_proj" | "up_proj" => (c.intermediate_size, c.hidden_size),
            _ => (c.hidden_size, c.intermediate_size), // down_proj
        }
    }
}

impl WeightSource for RandomSource {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn linear(&mut self, name: &str) -> Result<Linear> {
        let (out_features, in_features) = self.dims(name);
        let scale = 1.0 / (in_features as f32).sqrt();
        let dense = Tensor::from_vec(
            self.values(name, out_features * in_features, scale),
            (out_features, in_features),
            &Device::Cpu,
        )?;
        let q = QTensor::quantize(&dense, self.dtype)?;
        // Qwen2's q/k/v biases when the config asks for them.
        let biased = self.config.attention_bias && ["q_proj", "k_proj", "v_proj"].iter().any(|m| name.ends_with(m));
        let bias = if biased {
            Some(Tensor::from_vec(self.values(&format!("{name}.bias"), out_features, 0.5), out_features, &Device::Cpu)?)
        } else {
            None
        };
        if self.dequantized {
            return Ok(Linear::new(Weight::dense(&q.dequantize(&Device::Cpu)?)?, bias, out_features, in_features));
        }
        let matrix = super::kernels::from_gguf(self.dtype, &q.data()?, out_features, in_features)
            .ok_or_else(|| super::ModelError::Invalid(format!("random {:?}", self.dtype)))?;
        Ok(Linear::new(Weight::Kernel(matrix), bias, out_features, in_features))
    }

    fn dense(&mut self, name: &str) -> Result<Tensor> {
        // Norm weights near one (Qwen3's per-head q/k norms are head-sized).
        let per_head = name.contains("q_norm") || name.contains("k_norm");
        let n = if per_head { self.config.head_dim } else { self.config.hidden_size };
        let v: Vec<f32> = self.values(name, n, 0.1).into_iter().map(|x| 1.0 + x).collect();
        Ok(Tensor::from_vec(v, n, &Device::Cpu)?)
    }

    fn embedding(&mut self, name: &str) -> Result<super::source::TokenTable> {
        let (vocab, hidden) = (self.config.vocab_size, self.config.hidden_size);
        let dense = Tensor::from_vec(self.values(name, vocab * hidden, 1.0), (vocab, hidden), &Device::Cpu)?;
        Ok(super::source::TokenTable::Table(QMatMul::from_qtensor(QTensor::quantize(&dense, GgmlDType::Q8_0)?)?))
    }

    fn contains(&self, _name: &str) -> bool {
        false
    }

    /// Phi-3's fused projections: one random matrix, split by rows.
    fn linear_split(&mut self, name: &str, parts: &[usize]) -> Result<Vec<Linear>> {
        let fused = self.linear(name)?;
        let (weight, _) = fused.dense_weight()?;
        let mut start = 0;
        let mut split = Vec::with_capacity(parts.len());
        for &rows in parts {
            let part = weight.narrow(0, start, rows)?.contiguous()?;
            split.push(Linear::new(Weight::dense(&part)?, None, rows, fused.in_features()));
            start += rows;
        }
        Ok(split)
    }

    fn unused(&self) -> Vec<String> {
        Vec::new()
    }
}
