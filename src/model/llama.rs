//! The Llama-family decoder (SmolLM2, Llama 2/3, Mistral, Qwen 2/3, Phi-3),
//! run over a batch of sequences: every row has its own tokens, position and
//! KV cache, and the projections see all rows of the step at once. Families
//! differ by switches of `ModelConfig`: q/k bias (a bias tensor beside the
//! weight), per-head q/k RMSNorm (Qwen3), fused projections (Phi-3, split at
//! load so the rest of the code sees one layout).

use std::ops::Range;
use std::sync::Arc;

use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Tensor};

use rayon::prelude::*;

use super::attention::{self, HeadShape, Rope};
use super::kv_cache::BlockCount;
use super::linear::Input;
use super::linear::Weight;
use super::lora::saved::{rms_norm_in_place, LayerNorm, SavedMatrix, SavedModules};
use super::lora::{AdapterWeights, LoraGroup};
use super::ops;
use super::source::{TokenTable, WeightSource};
use super::{KvCache, Linear, ModelConfig, ModelError, Result};

/// Which positions of a row need logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only the last position (generation).
    Last,
    /// Every position of the row (prefill checks, scoring).
    All,
    /// None: a prompt chunk that does not end the prompt.
    None,
}

/// One sequence's share of a forward step.
pub struct BatchRow<'a> {
    /// New tokens, placed after what `cache` already holds.
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
    pub logits: Logits,
    /// The LoRA adapter of this row, if any.
    pub adapter: Option<&'a Arc<AdapterWeights>>,
}

struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn load(src: &mut dyn WeightSource, name: &str) -> Result<Self> {
        Ok(Self { weight: src.dense(&format!("{name}.weight"))?, eps: src.config().rms_norm_eps as f32 })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(x, &self.weight, self.eps)?)
    }

    /// `forward`, but the token rows of each `replaced` range use that
    /// weight instead (an adapter's saved norm).
    fn forward_rows(&self, x: &Tensor, replaced: &[(Range<usize>, &[f32])]) -> Result<Tensor> {
        let y = self.forward(x)?;
        if replaced.is_empty() {
            return Ok(y);
        }
        let (tokens, hidden) = x.dims2()?;
        let mut out = y.flatten_all()?.to_vec1::<f32>()?;
        ops::with_f32(x, |x| {
            for (range, weight) in replaced {
                for t in range.clone() {
                    let row = &mut out[t * hidden..(t + 1) * hidden];
                    row.copy_from_slice(&x[t * hidden..(t + 1) * hidden]);
                    rms_norm_in_place(row, weight, self.eps);
                }
            }
        })?;
        Ok(Tensor::from_vec(out, (tokens, hidden), &Device::Cpu)?)
    }
}

/// The token ranges of the rows whose adapter replaces a module, with what
/// `pick` reads of it.
fn replaced<'a, T: ?Sized>(
    saved: &[Option<&'a SavedModules>],
    ranges: impl IntoIterator<Item = Range<usize>>,
    pick: impl Fn(&'a SavedModules) -> Option<&'a T>,
) -> Vec<(Range<usize>, &'a T)> {
    saved.iter().zip(ranges).filter_map(|(s, range)| Some((range, pick((*s)?)?))).collect()
}

/// Per-head RMSNorm of queries or keys (Qwen3), on plain slices.
struct HeadNorm {
    weight: Vec<f32>,
    eps: f32,
}

impl HeadNorm {
    fn load(src: &mut dyn WeightSource, name: &str) -> Result<Self> {
        let weight = src.dense(&format!("{name}.weight"))?.flatten_all()?.to_vec1::<f32>()?;
        if weight.len() != src.config().head_dim {
            return Err(ModelError::Invalid(format!(
                "{name} has {} values, head_dim is {}",
                weight.len(),
                src.config().head_dim
            )));
        }
        Ok(Self { weight, eps: src.config().rms_norm_eps as f32 })
    }

    /// Normalizes every head of `x` (`[n, heads · head_dim]`) in place.
    fn apply(&self, x: &mut [f32]) {
        for head in x.chunks_exact_mut(self.weight.len()) {
            rms_norm_in_place(head, &self.weight, self.eps);
        }
    }
}

struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    /// Qwen3's per-head norms of q and k, before rotary.
    qk_norm: Option<(HeadNorm, HeadNorm)>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn load(src: &mut dyn WeightSource, prefix: &str, layer: usize) -> Result<Self> {
        let cfg = src.config().clone();
        let (q_width, kv_width) = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim);
        let [q_proj, k_proj, v_proj]: [Linear; 3] = if cfg.architecture.fused_projections() {
            src.linear_split(&format!("{prefix}.qkv_proj"), &[q_width, kv_width, kv_width])?
                .try_into()
                .map_err(|_| ModelError::Invalid("qkv_proj split".into()))?
        } else {
            [
                src.linear(&format!("{prefix}.q_proj"))?,
                src.linear(&format!("{prefix}.k_proj"))?,
                src.linear(&format!("{prefix}.v_proj"))?,
            ]
        };
        let qk_norm = if cfg.qk_norm {
            Some((HeadNorm::load(src, &format!("{prefix}.q_norm"))?, HeadNorm::load(src, &format!("{prefix}.k_norm"))?))
        } else {
            None
        };
        Ok(Self {
            q_proj: q_proj.with_slot(layer, 0),
            k_proj: k_proj.with_slot(layer, 1),
            v_proj: v_proj.with_slot(layer, 2),
            o_proj: src.linear(&format!("{prefix}.o_proj"))?.with_slot(layer, 3),
            qk_norm,
            num_heads: cfg.num_heads,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
        })
    }

    /// `x`: `[total_tokens, hidden]` for all rows; `spans[i]` = (offset, len) of row i.
    fn forward(
        &self,
        x: &Tensor,
        rows: &mut [BatchRow],
        spans: &[(usize, usize)],
        layer: usize,
        rope: &Rope,
        adapters: &[LoraGroup],
    ) -> Result<Tensor> {
        let x = Input::new(x.clone());
        let [q, k, v]: [Tensor; 3] = Linear::forward_many(&[&self.q_proj, &self.k_proj, &self.v_proj], &x, adapters)?
            .try_into()
            .map_err(|_| ModelError::Invalid("q/k/v projections".into()))?;
        let shape = HeadShape { heads: self.num_heads, kv_heads: self.num_kv_heads, dim: self.head_dim };
        let (q_width, kv_width) = (shape.heads * shape.dim, shape.kv_heads * shape.dim);
        let tokens = q.dim(0)?;
        let mut out = vec![0f32; tokens * q_width];
        ops::with_f32(&q, |q| {
            ops::with_f32(&k, |k| {
                ops::with_f32(&v, |v| {
                    // Each sequence: rotate its new queries and keys, cache its
                    // keys and values, attend over its own history.
                    let sequence = |(row, &(offset, len)): (&mut BatchRow, &(usize, usize))| -> Vec<f32> {
                        let start = row.cache.len();
                        let mut queries = q[offset * q_width..(offset + len) * q_width].to_vec();
                        let mut keys = k[offset * kv_width..(offset + len) * kv_width].to_vec();
                        if let Some((q_norm, k_norm)) = &self.qk_norm {
                            q_norm.apply(&mut queries);
                            k_norm.apply(&mut keys);
                        }
                        rope.apply(&mut queries, shape.heads, start);
                        rope.apply(&mut keys, shape.kv_heads, start);
                        row.cache.append(layer, &keys, &v[offset * kv_width..(offset + len) * kv_width]);
                        attention::attend(&queries, start, &row.cache.layer(layer), shape)
                    };
                    let per_row: Vec<Vec<f32>> = if rows.len() > 1 {
                        rows.par_iter_mut().zip(spans.par_iter()).map(sequence).collect()
                    } else {
                        rows.iter_mut().zip(spans).map(sequence).collect()
                    };
                    for (values, &(offset, len)) in per_row.iter().zip(spans) {
                        out[offset * q_width..(offset + len) * q_width].copy_from_slice(values);
                    }
                })
            })
        })???;
        let out = Tensor::from_vec(out, (tokens, q_width), &Device::Cpu)?;
        self.o_proj.forward(&Input::new(out), adapters)
    }
}

struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn load(src: &mut dyn WeightSource, prefix: &str, layer: usize) -> Result<Self> {
        let width = src.config().intermediate_size;
        let [gate_proj, up_proj]: [Linear; 2] = if src.config().architecture.fused_projections() {
            src.linear_split(&format!("{prefix}.gate_up_proj"), &[width, width])?
                .try_into()
                .map_err(|_| ModelError::Invalid("gate_up_proj split".into()))?
        } else {
            [src.linear(&format!("{prefix}.gate_proj"))?, src.linear(&format!("{prefix}.up_proj"))?]
        };
        Ok(Self {
            gate_proj: gate_proj.with_slot(layer, 4),
            up_proj: up_proj.with_slot(layer, 5),
            down_proj: src.linear(&format!("{prefix}.down_proj"))?.with_slot(layer, 6),
        })
    }

    fn forward(&self, x: &Tensor, adapters: &[LoraGroup]) -> Result<Tensor> {
        let x = Input::new(x.clone());
        let [gate, up]: [Tensor; 2] = Linear::forward_many(&[&self.gate_proj, &self.up_proj], &x, adapters)?
            .try_into()
            .map_err(|_| ModelError::Invalid("gate/up projections".into()))?;
        let hidden = ops::silu_mul(&gate, &up)?;
        self.down_proj.forward(&Input::new(hidden), adapters)
    }
}

struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
    span: tracing::Span,
}

impl DecoderLayer {
    fn load(src: &mut dyn WeightSource, prefix: &str, index: usize) -> Result<Self> {
        Ok(Self {
            input_layernorm: RmsNorm::load(src, &format!("{prefix}.input_layernorm"))?,
            self_attn: Attention::load(src, &format!("{prefix}.self_attn"), index)?,
            post_attention_layernorm: RmsNorm::load(src, &format!("{prefix}.post_attention_layernorm"))?,
            mlp: Mlp::load(src, &format!("{prefix}.mlp"), index)?,
            span: tracing::trace_span!("layer", index),
        })
    }
}

pub struct Llama {
    embed_tokens: TokenTable,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: Rope,
    config: ModelConfig,
    /// The KV blocks alive in every cache this model made.
    kv_blocks: BlockCount,
}

impl Llama {
    pub fn load(src: &mut dyn WeightSource) -> Result<Self> {
        let config = src.config().clone();
        let table = src.embedding("model.embed_tokens")?;
        let layers = (0..config.num_layers)
            .map(|i| DecoderLayer::load(src, &format!("model.layers.{i}"), i))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(src, "model.norm")?;
        let (embed_tokens, lm_head) = if config.tie_word_embeddings || !src.contains("lm_head.weight") {
            let head = match &table {
                TokenTable::Half(shared) => {
                    Linear::new(Weight::Half(shared.clone()), None, config.vocab_size, config.hidden_size)
                }
                TokenTable::Table(table) => tied_head(table, &config)?,
            };
            (table, head)
        } else {
            (table, src.linear("lm_head")?)
        };
        // A tensor nobody read is part of a computation this code does not do.
        let unused: Vec<String> = src
            .unused()
            .into_iter()
            .filter(|n| !(n.ends_with("rotary_emb.inv_freq") || config.tie_word_embeddings && n == "lm_head.weight"))
            .collect();
        if !unused.is_empty() {
            let shown = unused.iter().take(5).map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ");
            let more = if unused.len() > 5 { format!(" and {} more", unused.len() - 5) } else { String::new() };
            return Err(ModelError::Unsupported(format!(
                "tensors this {:?} model does not use: {shown}{more}",
                config.architecture
            )));
        }
        let inv_freq = config.rope_scaling.inv_freq(config.head_dim, config.rope_theta);
        let rope = Rope::new(&inv_freq, config.max_position_embeddings);
        Ok(Self { embed_tokens, layers, norm, lm_head, rope, config, kv_blocks: BlockCount::default() })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The projections adapters target (shared with this model).
    pub fn projections(&self) -> super::Projections {
        super::Projections::new(
            self.layers
                .iter()
                .map(|l| {
                    let (a, m) = (&l.self_attn, &l.mlp);
                    [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &m.gate_proj, &m.up_proj, &m.down_proj]
                        .map(Clone::clone)
                })
                .collect(),
        )
    }

    /// How adapters on this model keep their weights: float32 beside float32
    /// projections (exact parity with PEFT), float16 beside quantized or
    /// 16-bit ones, whose own rounding is far coarser.
    pub fn adapter_precision(&self) -> super::lora::Precision {
        let dense = self.layers.first().is_some_and(|l| l.self_attn.q_proj.is_float32());
        if dense {
            super::lora::Precision::F32
        } else {
            super::lora::Precision::F16
        }
    }

    /// Bytes the projection and head weights hold in memory (embeddings,
    /// norms and adapters aside).
    pub fn projection_bytes(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                let a = &l.self_attn;
                let m = &l.mlp;
                [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &m.gate_proj, &m.up_proj, &m.down_proj]
                    .iter()
                    .map(|p| p.weight_bytes())
                    .sum::<usize>()
            })
            .sum();
        layers + self.lm_head.weight_bytes()
    }

    /// An empty cache for one sequence.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.config.num_layers, self.config.num_kv_heads, self.config.head_dim, self.kv_blocks.clone())
    }

    /// How many KV blocks this model's caches hold between them.
    pub fn kv_blocks(&self) -> usize {
        self.kv_blocks.blocks()
    }

    /// One step over every row. Returns, per row, logits `[positions, vocab]`
    /// (one position for `Logits::Last`).
    pub fn forward(&self, rows: &mut [BatchRow]) -> Result<Vec<Tensor>> {
        let mut ids = Vec::new();
        let mut spans = Vec::with_capacity(rows.len());
        for row in rows.iter() {
            if row.tokens.is_empty() {
                return Err(ModelError::Invalid("a batch row has no tokens".into()));
            }
            let end = row.cache.len() + row.tokens.len();
            if end > self.config.max_position_embeddings {
                return Err(ModelError::Invalid(format!(
                    "sequence of {end} tokens exceeds the context length {}",
                    self.config.max_position_embeddings
                )));
            }
            if let Some(&bad) = row.tokens.iter().find(|&&t| t as usize >= self.config.vocab_size) {
                return Err(ModelError::Invalid(format!("token id {bad} is outside the vocabulary")));
            }
            spans.push((ids.len(), row.tokens.len()));
            ids.extend_from_slice(row.tokens);
        }
        let adapters =
            super::lora::groups(rows.iter().zip(&spans).map(|(row, &(at, len))| (row.adapter, at..at + len)));
        // Modules the rows' adapters replace (`modules_to_save`).
        let saved: Vec<Option<&SavedModules>> =
            rows.iter().map(|r| r.adapter.map(|a| &a.saved).filter(|s| !s.is_empty())).collect();
        let token_ranges = || spans.iter().map(|&(at, len)| at..at + len);
        // [total_tokens, hidden]
        let mut x = self.embed_tokens.lookup(&ids)?;
        let tables = replaced(&saved, token_ranges(), |s| s.embed_tokens.as_deref());
        if !tables.is_empty() {
            x = replace_rows(&x, &tables, |table, range| table.gather(&ids[range]))?;
        }
        for (index, layer) in self.layers.iter().enumerate() {
            let _enter = layer.span.enter();
            let norm = |which| replaced(&saved, token_ranges(), move |s| s.layer_norm(index, which));
            let residual = x.clone();
            let h = layer.input_layernorm.forward_rows(&x, &norm(LayerNorm::Input))?;
            let h = layer.self_attn.forward(&h, rows, &spans, index, &self.rope, &adapters)?;
            x = ops::add(&h, &residual)?;
            let residual = x.clone();
            let h = layer.post_attention_layernorm.forward_rows(&x, &norm(LayerNorm::PostAttention))?;
            x = ops::add(&layer.mlp.forward(&h, &adapters)?, &residual)?;
        }
        for (row, &(_, len)) in rows.iter_mut().zip(&spans) {
            row.cache.advance(len);
        }
        // Only the positions that need logits go through the (large) head.
        let mut wanted = Vec::new();
        let mut counts = Vec::with_capacity(rows.len());
        for (row, &(offset, len)) in rows.iter().zip(&spans) {
            let first = match row.logits {
                Logits::Last => offset + len - 1,
                Logits::All => offset,
                Logits::None => offset + len,
            };
            wanted.extend((first..offset + len).map(|i| i as u32));
            counts.push(offset + len - first);
        }
        if wanted.is_empty() {
            let none = Tensor::zeros((0, self.config.vocab_size), DType::F32, &Device::Cpu)?;
            return Ok(vec![none; rows.len()]);
        }
        // Each row's positions among the wanted ones.
        let mut logit_ranges = Vec::with_capacity(rows.len());
        let mut at = 0;
        for &n in &counts {
            logit_ranges.push(at..at + n);
            at += n;
        }
        let wanted = Tensor::new(wanted.as_slice(), &Device::Cpu)?;
        let final_norms = replaced(&saved, logit_ranges.iter().cloned(), |s| s.norm.as_deref().map(Vec::as_slice));
        let h = self.norm.forward_rows(&x.index_select(&wanted, 0)?, &final_norms)?;
        let heads: Vec<_> = saved.iter().map(|s| s.and_then(|s| s.lm_head.as_deref())).collect();
        if heads.iter().all(Option::is_none) {
            let logits = self.lm_head.forward(&Input::new(h), &[])?;
            return logit_ranges.into_iter().map(|r| Ok(logits.narrow(0, r.start, r.len())?)).collect();
        }
        // One pass per distinct head (the base's, or a saved one shared by
        // every row of its adapter), over the positions of its rows; the
        // head kernels are batch invariant, so a row's logits do not depend
        // on which rows share its pass.
        let same = |a: Option<&SavedMatrix>, b: Option<&SavedMatrix>| match (a, b) {
            (Some(a), Some(b)) => std::ptr::eq(a, b),
            (a, b) => a.is_none() && b.is_none(),
        };
        let mut out: Vec<Option<Tensor>> = vec![None; rows.len()];
        for first in 0..rows.len() {
            if out[first].is_some() {
                continue;
            }
            let head = heads[first];
            let members: Vec<usize> = (first..rows.len()).filter(|&r| same(heads[r], head)).collect();
            let positions: Vec<u32> = members.iter().flat_map(|&r| logit_ranges[r].clone().map(|i| i as u32)).collect();
            let x = h.index_select(&Tensor::new(positions.as_slice(), &Device::Cpu)?, 0)?;
            let logits = match head {
                _ if positions.is_empty() => Tensor::zeros((0, self.config.vocab_size), DType::F32, &Device::Cpu)?,
                None => self.lm_head.forward(&Input::new(x), &[])?,
                Some(head) => {
                    let values = ops::with_f32(&x, |x| head.matmul(x))?;
                    Tensor::from_vec(values, (positions.len(), head.rows()), &Device::Cpu)?
                }
            };
            let mut at = 0;
            for &r in &members {
                let n = logit_ranges[r].len();
                out[r] = Some(logits.narrow(0, at, n)?);
                at += n;
            }
        }
        out.into_iter().map(|l| l.ok_or_else(|| ModelError::Invalid("a row without logits".into()))).collect()
    }
}

/// `x` with the token rows of each range replaced by what `rows` gives for
/// it (an adapter's saved embedding).
fn replace_rows<T: ?Sized>(
    x: &Tensor,
    replaced: &[(Range<usize>, &T)],
    rows: impl Fn(&T, Range<usize>) -> Option<Vec<f32>>,
) -> Result<Tensor> {
    let (tokens, hidden) = x.dims2()?;
    let mut data = x.flatten_all()?.to_vec1::<f32>()?;
    for (range, source) in replaced {
        let values = rows(source, range.clone())
            .ok_or_else(|| ModelError::Invalid("a token id outside an adapter's embedding".into()))?;
        data[range.start * hidden..range.end * hidden].copy_from_slice(&values);
    }
    Ok(Tensor::from_vec(data, (tokens, hidden), &Device::Cpu)?)
}

/// The output head shares the embedding table (SmolLM2, Llama 3.2 small).
fn tied_head(embed: &QMatMul, cfg: &ModelConfig) -> Result<Linear> {
    let weight = match embed {
        QMatMul::QTensor(q) if super::kernels::KERNEL_TYPES.contains(&q.dtype()) => {
            let (rows, cols) = q.shape().dims2()?;
            let matrix = super::kernels::from_gguf(q.dtype(), &q.data()?, rows, cols)
                .ok_or_else(|| ModelError::Invalid(format!("malformed {:?} embedding", q.dtype())))?;
            Weight::Kernel(matrix)
        }
        QMatMul::QTensor(q) => Weight::Quantized(QMatMul::QTensor(q.clone())),
        QMatMul::Tensor(t) | QMatMul::TensorF16(t) => Weight::dense(t)?,
    };
    Ok(Linear::new(weight, None, cfg.vocab_size, cfg.hidden_size))
}
