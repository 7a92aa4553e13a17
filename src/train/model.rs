//! The frozen base and the LoRA matrices training updates. The base is read
//! dense (float32 to train, float64 for the gradient check); the forward and
//! backward passes over it are in `forward` and `backward`.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};

use super::linalg::Real;
use crate::model::source::WeightSource;
use crate::model::{ModelConfig, ModelError, Result};

/// The projections LoRA may adapt, in PEFT's names: the seven of the Llama
/// and Qwen layouts, then Phi-3's two fused ones.
pub const MODULES: [&str; 9] =
    ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj"];
pub(crate) const Q: usize = 0;
pub(crate) const K: usize = 1;
pub(crate) const V: usize = 2;
pub(crate) const O: usize = 3;
pub(crate) const GATE: usize = 4;
pub(crate) const UP: usize = 5;
pub(crate) const DOWN: usize = 6;
pub(crate) const QKV: usize = 7;
pub(crate) const GATE_UP: usize = 8;

/// Where a module sits in a decoder layer (`self_attn` or `mlp`).
pub fn module_path(module: &str) -> &'static str {
    if ["gate_proj", "up_proj", "down_proj", "gate_up_proj"].contains(&module) {
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

/// A layer's four matrix products: the attention's input (q, k and v in one
/// matrix), its output, the MLP's input (gate and up in one) and its output.
pub(crate) const ATTN_IN: usize = 0;
pub(crate) const ATTN_OUT: usize = 1;
pub(crate) const MLP_IN: usize = 2;
pub(crate) const MLP_OUT: usize = 3;

/// A LoRA site: a module and the output columns of its block it adds to.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Site {
    pub module: usize,
    pub start: usize,
    pub width: usize,
}

pub(crate) struct Layer<T> {
    pub input_norm: Vec<T>,
    pub post_norm: Vec<T>,
    /// `[out, in]` row-major per block (`ATTN_IN` … `MLP_OUT`).
    pub blocks: [Vec<T>; 4],
    /// The attention input's bias (Qwen2's q/k/v), `[q + k + v]`.
    pub qkv_bias: Option<Vec<T>>,
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
        let mut indices = Vec::with_capacity(targets.len());
        for target in targets {
            let module = module_index(target)?;
            if model.site(module).is_none() {
                let layout: Vec<&str> = MODULES
                    .iter()
                    .filter(|m| module_index(m).is_ok_and(|i| model.site(i).is_some()))
                    .copied()
                    .collect();
                return Err(ModelError::Invalid(format!(
                    "target module `{target}` is not in {:?}'s layout (it has {})",
                    model.config.architecture,
                    layout.join(", ")
                )));
            }
            indices.push(module);
        }
        for layer in 0..model.layers.len() {
            for &module in &indices {
                let Some((out, inp)) = model.dims(module) else { continue };
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
pub(crate) use crate::rng::SplitMix;

/// A batch: token ids per example and, per position, the weight of
/// predicting the next token there (0 for prompt tokens).
pub struct Batch {
    pub ids: Vec<Vec<u32>>,
    pub weights: Vec<Vec<f32>>,
}

/// Projections with the same input, their `[out, in]` weights stacked into
/// one matrix, and their biases into one (zeros where a part has none).
fn stacked<T: Real>(parts: Vec<crate::model::linear::Linear>) -> Result<(Vec<T>, Option<Vec<T>>)> {
    let mut weight = Vec::new();
    let mut biases = Vec::new();
    for part in &parts {
        let (w, b) = part.dense_weight()?;
        weight.extend(values::<T>(&w)?);
        biases.push((part.out_features(), b.as_ref().map(values::<T>).transpose()?));
    }
    let bias = biases
        .iter()
        .any(|(_, b)| b.is_some())
        .then(|| biases.into_iter().flat_map(|(n, b)| b.unwrap_or_else(|| vec![T::zero(); n])).collect());
    Ok((weight, bias))
}

fn values<T: Real>(tensor: &Tensor) -> Result<Vec<T>> {
    let flat = tensor.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(flat.into_iter().map(|v| T::of(v as f64)).collect())
}

impl<T: Real> TrainModel<T> {
    /// Reads every weight dense: q, k and v as one matrix, gate and up as
    /// one (Phi-3 stores them so; the other layouts are stacked here).
    pub fn load(src: &mut dyn WeightSource) -> Result<Self> {
        let config = src.config().clone();
        let all: Vec<u32> = (0..config.vocab_size as u32).collect();
        let embed = values(&src.embedding("model.embed_tokens")?.lookup(&all)?)?;
        let (q, kv, ff) =
            (config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim, config.intermediate_size);
        let mut layers = Vec::with_capacity(config.num_layers);
        for i in 0..config.num_layers {
            let p = format!("model.layers.{i}");
            let (attn_in, qkv_bias) = if config.architecture.fused_projections() {
                stacked(src.linear_split(&format!("{p}.self_attn.qkv_proj"), &[q, kv, kv])?)?
            } else {
                let parts = ["q_proj", "k_proj", "v_proj"].map(|m| src.linear(&format!("{p}.self_attn.{m}")));
                stacked(parts.into_iter().collect::<Result<Vec<_>>>()?)?
            };
            let (mlp_in, _) = if config.architecture.fused_projections() {
                stacked(src.linear_split(&format!("{p}.mlp.gate_up_proj"), &[ff, ff])?)?
            } else {
                let parts = ["gate_proj", "up_proj"].map(|m| src.linear(&format!("{p}.mlp.{m}")));
                stacked(parts.into_iter().collect::<Result<Vec<_>>>()?)?
            };
            let attn_out = stacked(vec![src.linear(&format!("{p}.self_attn.o_proj"))?])?.0;
            let mlp_out = stacked(vec![src.linear(&format!("{p}.mlp.down_proj"))?])?.0;
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
                blocks: [attn_in, attn_out, mlp_in, mlp_out],
                qkv_bias,
                qk_norm,
            });
        }
        let norm = values(&src.dense("model.norm.weight")?)?;
        let head = if config.tie_word_embeddings || !src.contains("lm_head.weight") {
            None
        } else {
            Some(stacked(vec![src.linear("lm_head")?])?.0)
        };
        let inv_freq = config.rope_scaling.inv_freq(config.head_dim, config.rope_theta);
        Ok(Self { config, embed, layers, norm, head, inv_freq })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// `(out, in)` of a block.
    pub(crate) fn block_dims(&self, block: usize) -> (usize, usize) {
        let c = &self.config;
        let (hidden, attn, kv) = (c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        match block {
            ATTN_IN => (attn + 2 * kv, hidden),
            ATTN_OUT => (hidden, attn),
            MLP_IN => (2 * c.intermediate_size, hidden),
            _ => (hidden, c.intermediate_size),
        }
    }

    /// The LoRA sites of a block in this model's layout.
    pub(crate) fn sites(&self, block: usize) -> Vec<Site> {
        let c = &self.config;
        let (attn, kv, ff) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size);
        let site = |module, start, width| Site { module, start, width };
        let (out, _) = self.block_dims(block);
        match (block, c.architecture.fused_projections()) {
            (ATTN_IN, false) => vec![site(Q, 0, attn), site(K, attn, kv), site(V, attn + kv, kv)],
            (ATTN_IN, true) => vec![site(QKV, 0, out)],
            (ATTN_OUT, _) => vec![site(O, 0, out)],
            (MLP_IN, false) => vec![site(GATE, 0, ff), site(UP, ff, ff)],
            (MLP_IN, true) => vec![site(GATE_UP, 0, out)],
            _ => vec![site(DOWN, 0, out)],
        }
    }

    /// A module's block and site, if this layout has it.
    pub(crate) fn site(&self, module: usize) -> Option<(usize, Site)> {
        (0..4).find_map(|block| self.sites(block).into_iter().find(|s| s.module == module).map(|s| (block, s)))
    }

    /// `(out, in)` of a module (its site's columns of its block).
    pub(crate) fn dims(&self, module: usize) -> Option<(usize, usize)> {
        self.site(module).map(|(block, site)| (site.width, self.block_dims(block).1))
    }

    pub(crate) fn head(&self) -> &[T] {
        self.head.as_deref().unwrap_or(&self.embed)
    }
}
