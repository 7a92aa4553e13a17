//! GGUF files of the supported families (`llama`, which also covers
//! Mistral, `qwen2`, `qwen3`, `phi3`): config from metadata, weights kept
//! quantized or dequantized.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{Device, Tensor};

use super::config::{Architecture, RopeScaling};
use super::kernels;
use super::kernels::half::{HalfKind, HalfMatrix};
use super::linear::Weight;
use super::source::TokenTable;
use super::source::WeightSource;
use super::{Linear, ModelConfig, ModelError, Result, WeightMode};

pub struct GgufSource {
    path: PathBuf,
    reader: BufReader<File>,
    content: Content,
    mode: WeightMode,
    config: ModelConfig,
    /// llama.cpp's converter reorders q/k rows per head for its adjacent-pair
    /// rotary layout; we undo it at load so every format shares the
    /// half-split (Hugging Face) layout and LoRA deltas need no special case.
    unpermute_qk: bool,
    /// GGUF names of the tensors read so far.
    used: HashSet<String>,
}

impl GgufSource {
    pub fn open(path: &Path, mode: WeightMode) -> Result<Self> {
        let io_err = |source| ModelError::Io { path: path.display().to_string(), source };
        let mut reader = BufReader::new(File::open(path).map_err(io_err)?);
        let content = Content::read(&mut reader)
            .map_err(|e| ModelError::Invalid(format!("{}: not a readable GGUF file: {e}", path.display())))?;
        let arch = string(&content.metadata, "general.architecture")?;
        let architecture = Architecture::from_gguf(&arch)?;
        let config = config_from_metadata(&content, &arch, architecture)?;
        let mut source = Self {
            path: path.to_path_buf(),
            reader,
            content,
            mode,
            config,
            unpermute_qk: architecture.gguf_permutes_qk(),
            used: HashSet::new(),
        };
        if source.content.tensor_infos.contains_key("rope_factors_long.weight") {
            return Err(ModelError::Unsupported("longrope rope scaling (Phi-3 128k, Phi-3.5)".into()));
        }
        // Llama 3.1+: the converter stores the llama3 ramp as per-frequency divisors.
        if source.content.tensor_infos.contains_key(ROPE_FREQS) {
            let factors = source.qtensor(ROPE_FREQS)?.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
            source.config.rope_scaling = RopeScaling::FreqFactors(factors);
            source.config.validate()?;
        }
        Ok(source)
    }

    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every tensor under its Hugging Face name, float32, in Hugging Face
    /// layout (q/k rows un-permuted): what a safetensors export holds.
    pub fn export_hf(&mut self) -> Result<Vec<(String, Tensor)>> {
        let config = self.config.clone();
        let mut names = vec!["model.embed_tokens.weight".to_string(), "model.norm.weight".to_string()];
        if !config.tie_word_embeddings {
            names.push("lm_head.weight".into());
        }
        for i in 0..config.num_layers {
            for module in ["input_layernorm", "post_attention_layernorm"] {
                names.push(format!("model.layers.{i}.{module}.weight"));
            }
            for module in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"] {
                names.push(format!("model.layers.{i}.{module}.weight"));
            }
            for module in ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"] {
                names.push(format!("model.layers.{i}.{module}.weight"));
            }
        }
        names
            .into_iter()
            .map(|name| {
                let tensor = match name.strip_suffix(".weight").filter(|n| n.ends_with("_proj")) {
                    Some(linear) => self.load_linear_weight(linear)?.dequantize(&Device::Cpu)?,
                    None => self.dense(&name)?,
                };
                Ok((name, tensor))
            })
            .collect()
    }

    fn qtensor(&mut self, gguf_name: &str) -> Result<QTensor> {
        if !self.content.tensor_infos.contains_key(gguf_name) {
            return Err(ModelError::MissingTensor(gguf_name.to_string()));
        }
        self.used.insert(gguf_name.to_string());
        Ok(self.content.tensor(&mut self.reader, gguf_name, &Device::Cpu)?)
    }

    /// The kernel-ready form of a projection's weight.
    fn weight(&self, name: &str, q: QTensor) -> Result<Weight> {
        let (out_features, in_features) = q.shape().dims2()?;
        let stored = match q.dtype() {
            GgmlDType::F16 => Some(HalfKind::F16),
            GgmlDType::BF16 => Some(HalfKind::Bf16),
            _ => None,
        };
        // (Widening 16 bits to float32 is exact, so a 16-bit weight comes
        // back to its own bits below.)
        Ok(match (self.mode, q.dtype()) {
            (WeightMode::QuantizeTo(to), dtype) if dtype != to.ggml() => {
                super::source::quantize_dense(&q.dequantize(&Device::Cpu)?, to)?
            }
            (WeightMode::F32, _) | (_, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) => {
                // 16-bit tensors are widened exactly, then kept 16-bit unless
                // float32 was asked for.
                super::source::dense_weight(&q.dequantize(&Device::Cpu)?, stored, self.mode)?
            }
            (_, dtype) if kernels::KERNEL_TYPES.contains(&dtype) => {
                let matrix = kernels::from_gguf(dtype, &q.data()?, out_features, in_features)
                    .ok_or_else(|| ModelError::Invalid(format!("{name}: malformed {dtype:?} data")))?;
                Weight::Kernel(matrix)
            }
            (_, dtype) => {
                tracing::info!(tensor = name, ?dtype, "no tailor kernel for this type: runs through candle");
                Weight::Quantized(QMatMul::from_qtensor(q)?)
            }
        })
    }

    fn load_linear_weight(&mut self, name: &str) -> Result<QTensor> {
        let gguf = gguf_name(&format!("{name}.weight"))?;
        let mut q = self.qtensor(&gguf)?;
        if self.unpermute_qk {
            if name.ends_with("q_proj") {
                q = unpermute_rows(&q, self.config.num_heads)?;
            } else if name.ends_with("k_proj") {
                q = unpermute_rows(&q, self.config.num_kv_heads)?;
            }
        }
        Ok(q)
    }
}

impl WeightSource for GgufSource {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn linear(&mut self, name: &str) -> Result<Linear> {
        let q = self.load_linear_weight(name)?;
        let (out_features, in_features) = q.shape().dims2()?;
        let weight = self.weight(name, q)?;
        let bias_name = format!("{name}.bias");
        let bias = if self.contains(&bias_name) {
            if self.unpermute_qk && (name.ends_with("q_proj") || name.ends_with("k_proj")) {
                return Err(ModelError::Unsupported("q/k projection bias in a llama GGUF".into()));
            }
            Some(self.dense(&bias_name)?)
        } else {
            None
        };
        Ok(Linear::new(weight, bias, out_features, in_features))
    }

    fn dense(&mut self, name: &str) -> Result<Tensor> {
        let gguf = gguf_name(name)?;
        Ok(self.qtensor(&gguf)?.dequantize(&Device::Cpu)?)
    }

    fn embedding(&mut self, name: &str) -> Result<TokenTable> {
        let q = self.qtensor(&gguf_name(&format!("{name}.weight"))?)?;
        let kind = match q.dtype() {
            GgmlDType::F16 => Some(HalfKind::F16),
            GgmlDType::BF16 => Some(HalfKind::Bf16),
            _ => None,
        };
        Ok(match (self.mode, kind) {
            (WeightMode::F32, _) => TokenTable::Table(QMatMul::Tensor(q.dequantize(&Device::Cpu)?)),
            // candle would widen a 16-bit table to float32; keep its bits.
            (_, Some(kind)) => {
                let (rows, cols) = q.shape().dims2()?;
                let bits = q.data()?.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect();
                let matrix = HalfMatrix::new(kind, bits, rows, cols)
                    .ok_or_else(|| ModelError::Invalid(format!("{name}: malformed 16-bit table")))?;
                TokenTable::Half(std::sync::Arc::new(matrix))
            }
            _ => TokenTable::Table(QMatMul::from_qtensor(q)?),
        })
    }

    fn contains(&self, name: &str) -> bool {
        gguf_name(name).map(|g| self.content.tensor_infos.contains_key(&g)).unwrap_or(false)
    }

    fn linear_split(&mut self, name: &str, parts: &[usize]) -> Result<Vec<Linear>> {
        if self.contains(&format!("{name}.bias")) {
            return Err(ModelError::Unsupported(format!("bias on the fused projection {name}")));
        }
        let fused = self.qtensor(&gguf_name(&format!("{name}.weight"))?)?;
        split_rows(&fused, parts, name)?
            .into_iter()
            .map(|q| {
                let (out_features, in_features) = q.shape().dims2()?;
                Ok(Linear::new(self.weight(name, q)?, None, out_features, in_features))
            })
            .collect()
    }

    fn unused(&self) -> Vec<String> {
        let mut names: Vec<String> =
            self.content.tensor_infos.keys().filter(|n| !self.used.contains(*n)).cloned().collect();
        names.sort();
        names
    }
}

const ROPE_FREQS: &str = "rope_freqs.weight";

/// Rows `[0, parts[0])`, `[parts[0], parts[0] + parts[1])`, … of a matrix
/// as separate tensors. Rows are whole quantization blocks: bytes move,
/// numbers do not change.
fn split_rows(q: &QTensor, parts: &[usize], name: &str) -> Result<Vec<QTensor>> {
    let (rows, cols) = q.shape().dims2()?;
    if parts.iter().sum::<usize>() != rows {
        return Err(ModelError::Invalid(format!("{name} has {rows} rows, expected {parts:?} stacked")));
    }
    let data = q.data()?;
    let row_bytes = data.len() / rows;
    let mut first = 0;
    parts
        .iter()
        .map(|&n| {
            let bytes = data[first * row_bytes..(first + n) * row_bytes].to_vec();
            first += n;
            let storage = QStorage::from_data(Cow::Owned(bytes), &Device::Cpu, q.dtype())?;
            Ok(QTensor::new(storage, (n, cols))?)
        })
        .collect()
}

/// Maps a Hugging Face tensor name to its GGUF name.
fn gguf_name(hf: &str) -> Result<String> {
    let unknown = || ModelError::Invalid(format!("no GGUF name for tensor `{hf}`"));
    let (stem, suffix) = hf.rsplit_once('.').ok_or_else(unknown)?;
    let mapped = match stem {
        "model.embed_tokens" => "token_embd".to_string(),
        "model.norm" => "output_norm".to_string(),
        "lm_head" => "output".to_string(),
        _ => {
            let rest = stem.strip_prefix("model.layers.").ok_or_else(unknown)?;
            let (layer, module) = rest.split_once('.').ok_or_else(unknown)?;
            let module = match module {
                "input_layernorm" => "attn_norm",
                "post_attention_layernorm" => "ffn_norm",
                "self_attn.q_proj" => "attn_q",
                "self_attn.k_proj" => "attn_k",
                "self_attn.v_proj" => "attn_v",
                "self_attn.o_proj" => "attn_output",
                "self_attn.qkv_proj" => "attn_qkv",
                "self_attn.q_norm" => "attn_q_norm",
                "self_attn.k_norm" => "attn_k_norm",
                // Phi-3 keeps gate and up stacked in one `ffn_up`.
                "mlp.gate_up_proj" => "ffn_up",
                "mlp.gate_proj" => "ffn_gate",
                "mlp.up_proj" => "ffn_up",
                "mlp.down_proj" => "ffn_down",
                _ => return Err(unknown()),
            };
            format!("blk.{layer}.{module}")
        }
    };
    Ok(format!("{mapped}.{suffix}"))
}

/// Undoes llama.cpp's `permute(w, n_head)`: GGUF row `h·d + 2j + i` holds
/// Hugging Face row `h·d + i·d/2 + j`. Rows are whole quantization blocks, so
/// this moves bytes and never touches the numbers.
fn unpermute_rows(q: &QTensor, n_head: usize) -> Result<QTensor> {
    let (rows, cols) = q.shape().dims2()?;
    let data = q.data()?;
    if !rows.is_multiple_of(n_head) || !(rows / n_head).is_multiple_of(2) || !data.len().is_multiple_of(rows) {
        return Err(ModelError::Invalid(format!("cannot split {rows} rows into {n_head} rotary heads")));
    }
    let row_bytes = data.len() / rows;
    let head_dim = rows / n_head;
    let half = head_dim / 2;
    let mut out = vec![0u8; data.len()];
    for h in 0..n_head {
        for i in 0..2 {
            for j in 0..half {
                let hf = h * head_dim + i * half + j;
                let gguf = h * head_dim + 2 * j + i;
                out[hf * row_bytes..(hf + 1) * row_bytes]
                    .copy_from_slice(&data[gguf * row_bytes..(gguf + 1) * row_bytes]);
            }
        }
    }
    let storage = QStorage::from_data(Cow::Owned(out), &Device::Cpu, q.dtype())?;
    Ok(QTensor::new(storage, (rows, cols))?)
}

fn config_from_metadata(content: &Content, arch: &str, architecture: Architecture) -> Result<ModelConfig> {
    let md = &content.metadata;
    let get = |key: &str| -> Result<&Value> {
        let full = format!("{arch}.{key}");
        md.get(&full).ok_or(ModelError::MissingMetadata(full))
    };
    let usize_of = |key: &str| -> Result<usize> { Ok(get(key)?.to_u64()? as usize) };
    let num_heads = usize_of("attention.head_count")?;
    let hidden_size = usize_of("embedding_length")?;
    let vocab_size = match usize_of("vocab_size") {
        Ok(v) => v,
        Err(_) => match md.get("tokenizer.ggml.tokens") {
            Some(v) => v.to_vec()?.len(),
            None => return Err(ModelError::MissingMetadata(format!("{arch}.vocab_size"))),
        },
    };
    let head_dim = usize_of("attention.key_length")
        .or_else(|_| usize_of("rope.dimension_count"))
        .unwrap_or(hidden_size / num_heads);
    if let Ok(rotary) = usize_of("rope.dimension_count") {
        if rotary != head_dim {
            return Err(ModelError::Unsupported(format!(
                "partial rotary embeddings ({rotary} of {head_dim} dimensions)"
            )));
        }
    }
    if let Ok(kind) = get("rope.scaling.type").and_then(|v| Ok(v.to_string()?.clone())) {
        if kind != "none" {
            return Err(ModelError::Unsupported(format!("rope scaling `{kind}` (supported: default, llama3)")));
        }
    }
    let mut max_position_embeddings = usize_of("context_length").unwrap_or(4096);
    if let Ok(window) = usize_of("attention.sliding_window") {
        if window > 0 && window < max_position_embeddings {
            tracing::warn!(window, "sliding-window attention: the context is capped at the window");
            max_position_embeddings = window;
        }
    }
    let config = ModelConfig {
        architecture,
        vocab_size,
        hidden_size,
        intermediate_size: usize_of("feed_forward_length")?,
        num_layers: usize_of("block_count")?,
        num_heads,
        num_kv_heads: usize_of("attention.head_count_kv").unwrap_or(num_heads),
        head_dim,
        rms_norm_eps: get("attention.layer_norm_rms_epsilon")?.to_f32()? as f64,
        rope_theta: get("rope.freq_base").and_then(|v| Ok(v.to_f32()?)).unwrap_or(10_000.0),
        rope_scaling: RopeScaling::Default,
        max_position_embeddings,
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        attention_bias: content.tensor_infos.contains_key("blk.0.attn_q.bias"),
        qk_norm: architecture == Architecture::Qwen3,
    };
    config.validate()?;
    Ok(config)
}

/// The metadata of a GGUF file, without reading any tensor.
pub fn read_metadata(path: &Path) -> Result<HashMap<String, Value>> {
    let io_err = |source| ModelError::Io { path: path.display().to_string(), source };
    let mut reader = BufReader::new(File::open(path).map_err(io_err)?);
    let content = Content::read(&mut reader)
        .map_err(|e| ModelError::Invalid(format!("{}: not a readable GGUF file: {e}", path.display())))?;
    Ok(content.metadata)
}

/// A string metadata value.
pub fn string(md: &HashMap<String, Value>, key: &str) -> Result<String> {
    md.get(key)
        .ok_or_else(|| ModelError::MissingMetadata(key.to_string()))?
        .to_string()
        .cloned()
        .map_err(|_| ModelError::Invalid(format!("metadata `{key}` is not a string")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_hf_names_to_gguf() -> Result<()> {
        assert_eq!(gguf_name("model.layers.3.self_attn.k_proj.weight")?, "blk.3.attn_k.weight");
        assert_eq!(gguf_name("model.layers.12.mlp.down_proj.weight")?, "blk.12.ffn_down.weight");
        assert_eq!(gguf_name("model.layers.0.post_attention_layernorm.weight")?, "blk.0.ffn_norm.weight");
        assert_eq!(gguf_name("model.norm.weight")?, "output_norm.weight");
        assert!(gguf_name("model.layers.0.self_attn.rotary").is_err());
        Ok(())
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() -> Result<()> {
        // 2 heads of dim 4, 32 columns (one F32 "block" row each is 32 values).
        let (rows, cols, n_head) = (8usize, 32usize, 2usize);
        let hf: Vec<f32> = (0..rows * cols).map(|i| (i / cols) as f32).collect();
        // llama.cpp: reshape(n_head, 2, d/2, cols).swapaxes(1, 2).
        let hf_t = Tensor::from_vec(hf.clone(), (rows, cols), &Device::Cpu)?;
        let permuted =
            hf_t.reshape((n_head, 2, rows / n_head / 2, cols))?.transpose(1, 2)?.contiguous()?.reshape((rows, cols))?;
        let q = QTensor::quantize(&permuted, GgmlDType::F32)?;
        let back = unpermute_rows(&q, n_head)?.dequantize(&Device::Cpu)?;
        assert_eq!(back.flatten_all()?.to_vec1::<f32>()?, hf);
        Ok(())
    }
}
