//! The frozen base and the LoRA matrices training updates. The base is read
//! dense (float32 to train, float64 for the gradient check); the forward and
//! backward passes over it are in `forward` and `backward`.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};

use super::linalg::Real;
use crate::model::source::WeightSource;
use crate::model::{ModelConfig, ModelError, Result};

/// The seven projections LoRA may adapt, in PEFT's names.
pub const MODULES: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
pub(crate) const Q: usize = 0;
pub(crate) const K: usize = 1;
pub(crate) const V: usize = 2;
pub(crate) const O: usize = 3;
pub(crate) const GATE: usize = 4;
pub(crate) const UP: usize = 5;
pub(crate) const DOWN: usize = 6;

/// Where a module sits in a decoder layer (`self_attn` or `mlp`).
pub fn module_path(module: &str) -> &'static str {
    if MODULES[GATE..].contains(&module) {
        "mlp"
    } else {
        "self_attn"
    }
}

pub(crate) fn module_index(module: &str) -> Result<usize> {
    MODULES
        .iter()
        .position(|m| *m == module)
        .ok_or_else(|| ModelError::Invalid(format!("unknown target module `{module}` (one of {})", MODULES.join(", "))))
}

pub(crate) struct Layer<T> {
    pub input_norm: Vec<T>,
    pub post_norm: Vec<T>,
    /// `[out, in]` row-major per module, in `MODULES` order.
    pub proj: Vec<Vec<T>>,
    /// Each module's bias, if it has one (Qwen2's q/k/v).
    pub bias: Vec<Option<Vec<T>>>,
    /// Qwen3's per-head RMSNorm weights of queries and keys (`head_dim` each).
    pub qk_norm: Option<(Vec<T>, Vec<T>)>,
}

/// The frozen base, dense.
pub struct TrainModel<T> {
    pub(crate) config: ModelConfig,
    /// `[vocab, hidden]`.
    pub(crate) embed: Vec<T>,
    pub(crate) layers: Vec<Layer<T>>,
    pub(crate) norm: Vec<T>,
    /// `[vocab, hidden]`; `None` when tied to the embedding.
    pub(crate) head: Option<Vec<T>>,
    /// The rotary frequencies (`head_dim / 2`).
    pub(crate) inv_freq: Vec<f32>,
}

/// One adapted projection: A `[r, in]`, B `[out, r]`, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Pair<T> {
    pub a: Vec<T>,
    pub b: Vec<T>,
}

/// LoRA on some projections: `y += scale · (x Aᵀ) Bᵀ`.
#[derive(Clone, Debug)]
pub struct Lora<T> {
    pub rank: usize,
    pub alpha: f64,
    pub use_rslora: bool,
    pub targets: Vec<String>,
    /// (layer, module index) → its matrices.
    pub weights: BTreeMap<(usize, usize), Pair<T>>,
}

impl<T: Real> Lora<T> {
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }

    /// PEFT's initialisation: A Kaiming-uniform (a = √5, so bound 1/√in),
    /// B zero: the adapter starts as the base.
    pub fn new(
        model: &TrainModel<T>,
        rank: usize,
        alpha: f64,
        use_rslora: bool,
        targets: &[String],
        seed: u64,
    ) -> Result<Self> {
        let mut rng = SplitMix(seed);
        let mut weights = BTreeMap::new();
        let indices = targets.iter().map(|t| module_index(t)).collect::<Result<Vec<_>>>()?;
        for layer in 0..model.layers.len() {
            for &module in &indices {
                let (out, inp) = model.dims(module);
                let bound = 1.0 / (inp as f64).sqrt();
                let a = (0..rank * inp).map(|_| T::of((rng.next_f64() * 2.0 - 1.0) * bound)).collect();
                weights.insert((layer, module), Pair { a, b: vec![T::zero(); out * rank] });
            }
        }
        Ok(Self { rank, alpha, use_rslora, targets: targets.to_vec(), weights })
    }

    /// Zeros shaped like every matrix (for gradients).
    pub fn zeros_like(&self) -> BTreeMap<(usize, usize), Pair<T>> {
        self.weights
            .iter()
            .map(|(key, p)| (*key, Pair { a: vec![T::zero(); p.a.len()], b: vec![T::zero(); p.b.len()] }))
            .collect()
    }
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
/// predicting the next token there (0 for prompt tokens).
pub struct Batch {
    pub ids: Vec<Vec<u32>>,
    pub weights: Vec<Vec<f32>>,
}

fn values<T: Real>(tensor: &Tensor) -> Result<Vec<T>> {
    let flat = tensor.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(flat.into_iter().map(|v| T::of(v as f64)).collect())
}

impl<T: Real> TrainModel<T> {
    /// Reads every weight dense. Families with fused projections (Phi-3)
    /// are not trained yet (refused by name).
    pub fn load(src: &mut dyn WeightSource) -> Result<Self> {
        let config = src.config().clone();
        if config.architecture.fused_projections() {
            return Err(ModelError::Invalid(format!(
                "training supports the Llama and Qwen layouts (SmolLM, Llama, Mistral, Qwen 2 and 3); \
                 {:?}'s fused projections are not supported yet",
                config.architecture
            )));
        }
        let all: Vec<u32> = (0..config.vocab_size as u32).collect();
        let embed = values(&src.embedding("model.embed_tokens")?.lookup(&all)?)?;
        let linear = |src: &mut dyn WeightSource, name: &str| -> Result<(Vec<T>, Option<Vec<T>>)> {
            let (weight, bias) = src.linear(name)?.dense_weight()?;
            Ok((values(&weight)?, bias.as_ref().map(values).transpose()?))
        };
        let mut layers = Vec::with_capacity(config.num_layers);
        for i in 0..config.num_layers {
            let p = format!("model.layers.{i}");
            let (proj, bias) = MODULES
                .iter()
                .map(|m| linear(src, &format!("{p}.{}.{m}", module_path(m))))
                .collect::<Result<Vec<_>>>()?
                .into_iter()
                .unzip();
            let qk_norm = if config.qk_norm {
                let norm = |src: &mut dyn WeightSource, which: &str| -> Result<Vec<T>> {
                    values(&src.dense(&format!("{p}.self_attn.{which}.weight"))?)
                };
                Some((norm(src, "q_norm")?, norm(src, "k_norm")?))
            } else {
                None
            };
            layers.push(Layer {
                input_norm: values(&src.dense(&format!("{p}.input_layernorm.weight"))?)?,
                post_norm: values(&src.dense(&format!("{p}.post_attention_layernorm.weight"))?)?,
                proj,
                bias,
                qk_norm,
            });
        }
        let norm = values(&src.dense("model.norm.weight")?)?;
        let head = if config.tie_word_embeddings || !src.contains("lm_head.weight") {
            None
        } else {
            Some(linear(src, "lm_head")?.0)
        };
        let inv_freq = config.rope_scaling.inv_freq(config.head_dim, config.rope_theta);
        Ok(Self { config, embed, layers, norm, head, inv_freq })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// `(out, in)` of a module.
    pub(crate) fn dims(&self, module: usize) -> (usize, usize) {
        let c = &self.config;
        let (hidden, attn, kv) = (c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        match module {
            Q => (attn, hidden),
            K | V => (kv, hidden),
            O => (hidden, attn),
            GATE | UP => (c.intermediate_size, hidden),
            _ => (hidden, c.intermediate_size),
        }
    }

    pub(crate) fn head(&self) -> &[T] {
        self.head.as_deref().unwrap_or(&self.embed)
    }
}
