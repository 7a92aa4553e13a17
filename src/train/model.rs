//! The training forward: the decoder of `model::llama` written in candle's
//! differentiable ops over dense weights (float32 to train, float64 for the
//! gradient check), with the LoRA matrices as variables. The base is frozen:
//! its weights are plain tensors, so backward only reaches A and B. A test
//! proves its loss equals the cross-entropy of the inference forward with
//! the same adapter.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var, D};

use crate::model::source::WeightSource;
use crate::model::{ModelConfig, ModelError, Result};

/// The seven projections LoRA may adapt, in PEFT's names.
pub const MODULES: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// Where a module sits in a decoder layer (`self_attn` or `mlp`).
pub fn module_path(module: &str) -> &'static str {
    if MODULES[4..].contains(&module) {
        "mlp"
    } else {
        "self_attn"
    }
}

struct Layer {
    input_norm: Tensor,
    post_norm: Tensor,
    /// `[in, out]` per module (transposed once, contiguous), in `MODULES` order.
    proj_t: Vec<Tensor>,
}

/// The frozen base, dense.
pub struct TrainModel {
    config: ModelConfig,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    /// `[hidden, vocab]`, contiguous.
    lm_head_t: Tensor,
    inv_freq: Vec<f32>,
    dtype: DType,
}

/// LoRA on some projections: `y += scale · (x Aᵀ) Bᵀ`, A `[r, in]`, B `[out, r]`.
pub struct Lora {
    pub rank: usize,
    pub alpha: f64,
    pub use_rslora: bool,
    pub targets: Vec<String>,
    /// (layer, module) → (A, B).
    pub weights: BTreeMap<(usize, String), (Var, Var)>,
}

impl Lora {
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }

    /// Every variable, A then B per (layer, module).
    pub fn vars(&self) -> Vec<Var> {
        self.weights.values().flat_map(|(a, b)| [a.clone(), b.clone()]).collect()
    }

    /// PEFT's initialisation: A Kaiming-uniform (a = √5, so bound 1/√in),
    /// B zero: the adapter starts as the base.
    pub fn new(
        model: &TrainModel,
        rank: usize,
        alpha: f64,
        use_rslora: bool,
        targets: &[String],
        seed: u64,
    ) -> Result<Self> {
        let mut rng = SplitMix(seed);
        let mut weights = BTreeMap::new();
        for layer in 0..model.layers.len() {
            for target in targets {
                let index = module_index(target)?;
                let (inp, out) = model.layers[layer].proj_t[index].dims2()?;
                let bound = 1.0 / (inp as f64).sqrt();
                let a: Vec<f64> = (0..rank * inp).map(|_| (rng.next_f64() * 2.0 - 1.0) * bound).collect();
                let a = Tensor::from_vec(a, (rank, inp), &Device::Cpu)?.to_dtype(model.dtype)?;
                let b = Tensor::zeros((out, rank), model.dtype, &Device::Cpu)?;
                weights.insert((layer, target.clone()), (Var::from_tensor(&a)?, Var::from_tensor(&b)?));
            }
        }
        Ok(Self { rank, alpha, use_rslora, targets: targets.to_vec(), weights })
    }
}

fn module_index(module: &str) -> Result<usize> {
    MODULES
        .iter()
        .position(|m| *m == module)
        .ok_or_else(|| ModelError::Invalid(format!("unknown target module `{module}` (one of {})", MODULES.join(", "))))
}

/// The seeded generator of training (initialisation, example order), so a
/// run repeats exactly with the same `--seed`.
pub(crate) struct SplitMix(pub(crate) u64);

impl SplitMix {
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A batch: token ids per example and, per position, the weight of
/// predicting the next token there (0 for prompt tokens and padding).
pub struct Batch {
    pub ids: Vec<Vec<u32>>,
    pub weights: Vec<Vec<f32>>,
}

impl TrainModel {
    /// Reads every weight dense, in `dtype`. The families with q/k biases or
    /// per-head q/k norms are not trained yet (refused by name).
    pub fn load(src: &mut dyn WeightSource, dtype: DType) -> Result<Self> {
        let config = src.config().clone();
        if config.attention_bias || config.qk_norm || config.architecture.fused_projections() {
            return Err(ModelError::Invalid(format!(
                "training supports Llama-layout models (SmolLM, Llama, Mistral); {:?} is not supported yet",
                config.architecture
            )));
        }
        let table = src.embedding("model.embed_tokens")?;
        let all: Vec<u32> = (0..config.vocab_size as u32).collect();
        let embed = table.lookup(&all)?.to_dtype(dtype)?;
        let linear = |src: &mut dyn WeightSource, name: &str| -> Result<Tensor> {
            Ok(src.linear(name)?.dense_weight()?.0.to_dtype(dtype)?.t()?.contiguous()?)
        };
        let mut layers = Vec::with_capacity(config.num_layers);
        for i in 0..config.num_layers {
            let p = format!("model.layers.{i}");
            let proj_t = MODULES
                .iter()
                .map(|m| linear(src, &format!("{p}.{}.{m}", module_path(m))))
                .collect::<Result<Vec<_>>>()?;
            layers.push(Layer {
                input_norm: src.dense(&format!("{p}.input_layernorm.weight"))?.to_dtype(dtype)?,
                post_norm: src.dense(&format!("{p}.post_attention_layernorm.weight"))?.to_dtype(dtype)?,
                proj_t,
            });
        }
        let norm = src.dense("model.norm.weight")?.to_dtype(dtype)?;
        let lm_head_t = if config.tie_word_embeddings || !src.contains("lm_head.weight") {
            embed.t()?.contiguous()?
        } else {
            linear(src, "lm_head")?
        };
        let inv_freq = config.rope_scaling.inv_freq(config.head_dim, config.rope_theta);
        Ok(Self { config, embed, layers, norm, lm_head_t, inv_freq, dtype })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    fn rms_norm(&self, x: &Tensor, weight: &Tensor) -> Result<Tensor> {
        let mean = x.sqr()?.mean_keepdim(D::Minus1)?;
        let inv = (mean + self.config.rms_norm_eps)?.sqrt()?.recip()?;
        Ok(x.broadcast_mul(&inv)?.broadcast_mul(weight)?)
    }

    fn linear(&self, x: &Tensor, layer: usize, module: usize, lora: Option<&Lora>) -> Result<Tensor> {
        let mut y = x.matmul(&self.layers[layer].proj_t[module])?;
        if let Some(lora) = lora {
            if let Some((a, b)) = lora.weights.get(&(layer, MODULES[module].to_string())) {
                let delta = x.matmul(&a.as_tensor().t()?)?.matmul(&b.as_tensor().t()?)?;
                y = (y + (delta * lora.scale())?)?;
            }
        }
        Ok(y)
    }

    /// Half-split rotary embedding of `x` `[b, heads, t, d]`, as `attention::Rope`.
    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let half = self.config.head_dim / 2;
        let x1 = x.narrow(D::Minus1, 0, half)?;
        let x2 = x.narrow(D::Minus1, half, half)?;
        let first = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
        let second = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
        Ok(Tensor::cat(&[first, second], D::Minus1)?)
    }

    /// Logits `[b, t, vocab]` of right-padded `ids` `[b, t]` (causal
    /// attention: a real token never sees the padding after it).
    pub fn logits(&self, ids: &Tensor, lora: Option<&Lora>) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        Ok(self.hidden(ids, lora)?.matmul(&self.lm_head_t)?.reshape((b, t, self.config.vocab_size))?)
    }

    /// The final (normed) hidden states `[b · t, hidden]` of `ids` `[b, t]`.
    fn hidden(&self, ids: &Tensor, lora: Option<&Lora>) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let c = &self.config;
        let (heads, kv_heads, d) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let half = d / 2;
        let angles: Vec<f32> = (0..t).flat_map(|pos| self.inv_freq.iter().map(move |f| pos as f32 * f)).collect();
        let cos: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
        let sin: Vec<f32> = angles.iter().map(|a| a.sin()).collect();
        let cos = Tensor::from_vec(cos, (1, 1, t, half), &Device::Cpu)?.to_dtype(self.dtype)?;
        let sin = Tensor::from_vec(sin, (1, 1, t, half), &Device::Cpu)?.to_dtype(self.dtype)?;
        let mask: Vec<f32> =
            (0..t).flat_map(|i| (0..t).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY })).collect();
        let mask = Tensor::from_vec(mask, (1, 1, t, t), &Device::Cpu)?.to_dtype(self.dtype)?;
        let scale = 1.0 / (d as f64).sqrt();
        let mut x = self.embed.index_select(&ids.flatten_all()?, 0)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let h = self.rms_norm(&x, &layer.input_norm)?;
            let split =
                |y: Tensor, n: usize| -> Result<Tensor> { Ok(y.reshape((b, t, n, d))?.transpose(1, 2)?.contiguous()?) };
            let q = self.rope(&split(self.linear(&h, i, 0, lora)?, heads)?, &cos, &sin)?;
            let k = self.rope(&split(self.linear(&h, i, 1, lora)?, kv_heads)?, &cos, &sin)?;
            let v = split(self.linear(&h, i, 2, lora)?, kv_heads)?;
            // Grouped queries: query head h reads key/value head h / groups.
            let groups = heads / kv_heads;
            let widen = |y: Tensor| -> Result<Tensor> {
                Ok(y.unsqueeze(2)?.expand((b, kv_heads, groups, t, d))?.reshape((b, heads, t, d))?)
            };
            let (k, v) = (widen(k)?, widen(v)?);
            let scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?.broadcast_add(&mask)?;
            let top = scores.max_keepdim(D::Minus1)?.detach();
            let exp = scores.broadcast_sub(&top)?.exp()?;
            let probs = exp.broadcast_div(&exp.sum_keepdim(D::Minus1)?)?;
            let attended = probs.matmul(&v)?.transpose(1, 2)?.reshape((b * t, heads * d))?;
            x = (x + self.linear(&attended, i, 3, lora)?)?;
            let h = self.rms_norm(&x, &layer.post_norm)?;
            let gate = self.linear(&h, i, 4, lora)?;
            let up = self.linear(&h, i, 5, lora)?;
            x = (x + self.linear(&(gate.silu()? * up)?, i, 6, lora)?)?;
        }
        self.rms_norm(&x, &self.norm)
    }

    /// The weighted mean cross-entropy of predicting each next token, and
    /// the weight it was averaged over.
    pub fn loss(&self, batch: &Batch, lora: Option<&Lora>) -> Result<(Tensor, f64)> {
        let t = batch.ids.iter().map(Vec::len).max().unwrap_or(0);
        let b = batch.ids.len();
        if t < 2 {
            return Err(ModelError::Invalid("a batch needs examples of at least two tokens".into()));
        }
        // Only positions that are learned reach the head (the largest
        // matmul and the vocabulary-wide softmax).
        let mut ids = Vec::with_capacity(b * t);
        let mut rows = Vec::new();
        let mut targets = Vec::new();
        let mut weights = Vec::new();
        for (e, (example, w)) in batch.ids.iter().zip(&batch.weights).enumerate() {
            for pos in 0..t {
                ids.push(example.get(pos).copied().unwrap_or(0));
                let weight = if pos + 1 < example.len() { w.get(pos).copied().unwrap_or(0.0) } else { 0.0 };
                if weight > 0.0 {
                    rows.push((e * t + pos) as u32);
                    targets.push(example[pos + 1]);
                    weights.push(weight);
                }
            }
        }
        let total: f64 = weights.iter().map(|&w| w as f64).sum();
        if total <= 0.0 {
            return Err(ModelError::Invalid("the batch has no tokens to learn from".into()));
        }
        let ids = Tensor::from_vec(ids, (b, t), &Device::Cpu)?;
        let n = rows.len();
        let rows = Tensor::from_vec(rows, n, &Device::Cpu)?;
        let logits = self.hidden(&ids, lora)?.index_select(&rows, 0)?.matmul(&self.lm_head_t)?;
        let top = logits.max_keepdim(D::Minus1)?.detach();
        let shifted = logits.broadcast_sub(&top)?;
        let log_z = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
        let targets = Tensor::from_vec(targets, (n, 1), &Device::Cpu)?;
        let picked = shifted.gather(&targets, D::Minus1)?;
        let nll = (log_z - picked)?.squeeze(D::Minus1)?;
        let weights = Tensor::from_vec(weights, n, &Device::Cpu)?.to_dtype(self.dtype)?;
        let loss = ((nll * weights)?.sum_all()? / total)?;
        Ok((loss, total))
    }
}
