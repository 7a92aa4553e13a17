//! The training forward: the decoder of `model::llama` over a packed batch
//! (examples laid end to end, no padding), keeping what the backward pass
//! needs, and the loss on the learned positions. A test proves its loss
//! equals the cross-entropy of the inference forward with the same adapter.

use rayon::prelude::*;

use super::linalg::{matmul, product, Real, Threads, View, ViewMut};
use super::model::{Batch, Lora, TrainModel, ATTN_IN, ATTN_OUT, MLP_IN, MLP_OUT};
use crate::model::{ModelError, Result};

/// Rows of the logits computed at once (bounds the memory of the head).
const HEAD_ROWS: usize = 64;

/// A batch laid end to end.
pub(crate) struct Packed {
    /// (first row, length) per example.
    pub spans: Vec<(usize, usize)>,
    /// Position of each row within its example.
    pub positions: Vec<usize>,
    pub ids: Vec<u32>,
    /// Rows whose next token is learned, that token, and its weight.
    pub learned: Vec<(usize, u32, f64)>,
    /// The sum of the learned weights.
    pub total: f64,
}

/// The sum of the learned weights of `batch`; an error when it is zero or
/// when a token is outside the model's `vocab` (a tokenizer may know more
/// ids than the model has embedding rows).
pub(crate) fn learned_weight(batch: &Batch, vocab: usize) -> Result<f64> {
    if let Some(&id) = batch.ids.iter().flatten().find(|&&id| id as usize >= vocab) {
        return Err(ModelError::Invalid(format!("token id {id} is outside the model's {vocab}-token vocabulary")));
    }
    let total: f64 = batch
        .ids
        .iter()
        .zip(&batch.weights)
        .flat_map(|(example, weights)| weights.iter().take(example.len().saturating_sub(1)))
        .filter(|&&w| w > 0.0)
        .map(|&w| w as f64)
        .sum();
    if total <= 0.0 {
        return Err(ModelError::Invalid("the batch has no tokens to learn from".into()));
    }
    Ok(total)
}

impl Packed {
    /// `batch` end to end.
    pub fn new(batch: &Batch) -> Self {
        let mut packed =
            Packed { spans: Vec::new(), positions: Vec::new(), ids: Vec::new(), learned: Vec::new(), total: 0.0 };
        for (example, weights) in batch.ids.iter().zip(&batch.weights) {
            let start = packed.ids.len();
            packed.spans.push((start, example.len()));
            for (pos, &id) in example.iter().enumerate() {
                packed.ids.push(id);
                packed.positions.push(pos);
                let weight = weights.get(pos).copied().unwrap_or(0.0) as f64;
                if weight > 0.0 && pos + 1 < example.len() {
                    packed.learned.push((start + pos, example[pos + 1], weight));
                    packed.total += weight;
                }
            }
        }
        packed
    }

    pub fn rows(&self) -> usize {
        self.ids.len()
    }
}

/// What one layer's backward pass reads.
pub(crate) struct LayerTape<T> {
    /// The layer's input (the residual stream) and its input norm.
    pub x: Vec<T>,
    pub inv1: Vec<T>,
    pub h1: Vec<T>,
    /// Queries and keys before their per-head norms, with each head's
    /// `1/rms` (Qwen3).
    pub qk_raw: Option<[(Vec<T>, Vec<T>); 2]>,
    /// Queries and keys after the rotation.
    pub q: Vec<T>,
    pub k: Vec<T>,
    pub v: Vec<T>,
    /// Log of each attention row's softmax denominator, `[rows, heads]`.
    pub lse: Vec<T>,
    pub attn: Vec<T>,
    pub x2: Vec<T>,
    pub inv2: Vec<T>,
    pub h2: Vec<T>,
    /// The MLP's gate and up projections side by side, `[rows, 2 · ff]`.
    pub gate_up: Vec<T>,
    pub act: Vec<T>,
    /// `x Aᵀ` per block and site (`None` where not adapted).
    pub lora_u: [Vec<Option<Vec<T>>>; 4],
}

impl<T> LayerTape<T> {
    /// A block's input, as `project` read it.
    pub fn input(&self, block: usize) -> &[T] {
        match block {
            ATTN_IN => &self.h1,
            ATTN_OUT => &self.attn,
            MLP_IN => &self.h2,
            _ => &self.act,
        }
    }
}

/// Columns `start..start + width` of a row-major matrix `total` wide.
pub(crate) fn columns<T: Copy>(m: &[T], total: usize, start: usize, width: usize) -> Vec<T> {
    m.chunks_exact(total).flat_map(|row| row[start..start + width].iter().copied()).collect()
}

/// The forward pass's result: per-layer tapes (when kept) and the final
/// residual stream with its norm.
pub(crate) struct Forward<T> {
    pub layers: Vec<LayerTape<T>>,
    pub last: Vec<T>,
    pub inv: Vec<T>,
    pub hidden: Vec<T>,
}

/// Rotary tables for positions `0..n`, float32 as inference computes them.
pub(crate) struct Rotary<T> {
    cos: Vec<T>,
    sin: Vec<T>,
    half: usize,
}

impl<T: Real> Rotary<T> {
    pub fn new(inv_freq: &[f32], positions: usize) -> Self {
        let rope = crate::model::attention::Rope::new(inv_freq, positions);
        let (cos, sin) = rope.tables();
        let convert = |v: &[f32]| v.iter().map(|&x| T::of(x as f64)).collect();
        Self { cos: convert(cos), sin: convert(sin), half: inv_freq.len() }
    }

    /// Rotates `x` `[rows, heads · head_dim]` by each row's position; the
    /// inverse rotation (the backward pass) when `inverse`.
    pub fn apply(&self, x: &mut [T], heads: usize, positions: &[usize], inverse: bool) {
        let (half, d) = (self.half, 2 * self.half);
        for (row, &pos) in x.chunks_exact_mut(heads * d).zip(positions) {
            let (cos, sin) = (&self.cos[pos * half..(pos + 1) * half], &self.sin[pos * half..(pos + 1) * half]);
            for head in row.chunks_exact_mut(d) {
                let (x1, x2) = head.split_at_mut(half);
                for j in 0..half {
                    let (a, b) = (x1[j], x2[j]);
                    let s = if inverse { -sin[j] } else { sin[j] };
                    x1[j] = a * cos[j] - b * s;
                    x2[j] = b * cos[j] + a * s;
                }
            }
        }
    }
}

/// RMS norm of each row of `w.len()` values (a token's hidden state, or
/// one head): `y = x · inv · w`, `inv = 1/√(mean(x²) + eps)`.
pub(crate) fn rms_norm<T: Real>(x: &[T], w: &[T], eps: f64) -> (Vec<T>, Vec<T>) {
    let h = w.len();
    let mut y = vec![T::zero(); x.len()];
    let mut inv = Vec::with_capacity(x.len() / h);
    for (row, out) in x.chunks_exact(h).zip(y.chunks_exact_mut(h)) {
        let mean = row.iter().map(|&v| v * v).sum::<T>() / T::of(h as f64);
        let r = (mean + T::of(eps)).sqrt().recip();
        for ((o, &v), &g) in out.iter_mut().zip(row).zip(w) {
            *o = v * r * g;
        }
        inv.push(r);
    }
    (y, inv)
}

pub(crate) fn silu<T: Real>(x: T) -> T {
    x / (T::one() + (-x).exp())
}

impl<T: Real> TrainModel<T> {
    /// `x Wᵀ + bias` for a block of `layer`, plus `scale · (x Aᵀ) Bᵀ` into
    /// the columns of each adapted site; also `x Aᵀ` per site (`None` where
    /// not adapted).
    pub(crate) fn project(
        &self,
        x: &[T],
        layer: usize,
        block: usize,
        lora: Option<&Lora<T>>,
        threads: Threads,
    ) -> (Vec<T>, Vec<Option<Vec<T>>>) {
        let (out, inp) = self.block_dims(block);
        let n = x.len() / inp;
        let input = View::new(x, n, inp);
        let mut y = product(input, View::new(&self.layers[layer].blocks[block], out, inp).t(), threads);
        if let (ATTN_IN, Some(bias)) = (block, &self.layers[layer].qkv_bias) {
            for row in y.chunks_exact_mut(out) {
                for (v, &b) in row.iter_mut().zip(bias) {
                    *v += b;
                }
            }
        }
        let us = self
            .sites(block)
            .into_iter()
            .map(|site| {
                let lora = lora?;
                let pair = lora.weights.get(&(layer, site.module))?;
                let r = lora.rank;
                let u = product(input, View::new(&pair.a, r, inp).t(), threads);
                matmul(
                    ViewMut::strided(&mut y[site.start..], n, site.width, out),
                    View::new(&u, n, r),
                    View::new(&pair.b, site.width, r).t(),
                    T::of(lora.scale()),
                    true,
                    threads,
                );
                Some(u)
            })
            .collect();
        (y, us)
    }

    /// The forward pass over `packed`; the tapes are kept when `record`.
    pub(crate) fn forward(
        &self,
        packed: &Packed,
        lora: Option<&Lora<T>>,
        record: bool,
        threads: Threads,
    ) -> Forward<T> {
        let c = &self.config;
        let (hidden, heads, kv_heads, d) = (c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim);
        let (qw, kw, ff) = (heads * d, kv_heads * d, c.intermediate_size);
        let longest = packed.spans.iter().map(|s| s.1).max().unwrap_or(0);
        let rotary = Rotary::new(&self.inv_freq, longest);
        let mut x: Vec<T> = Vec::with_capacity(packed.rows() * hidden);
        for &id in &packed.ids {
            x.extend_from_slice(&self.embed[id as usize * hidden..(id as usize + 1) * hidden]);
        }
        let mut layers = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            let (h1, inv1) = rms_norm(&x, &layer.input_norm, c.rms_norm_eps);
            let (qkv, u_attn_in) = self.project(&h1, i, ATTN_IN, lora, threads);
            let width = qw + 2 * kw;
            let (mut q, mut k, v) =
                (columns(&qkv, width, 0, qw), columns(&qkv, width, qw, kw), columns(&qkv, width, qw + kw, kw));
            drop(qkv);
            let qk_raw = layer.qk_norm.as_ref().map(|(q_norm, k_norm)| {
                let (q_normed, q_inv) = rms_norm(&q, q_norm, c.rms_norm_eps);
                let (k_normed, k_inv) = rms_norm(&k, k_norm, c.rms_norm_eps);
                [(std::mem::replace(&mut q, q_normed), q_inv), (std::mem::replace(&mut k, k_normed), k_inv)]
            });
            rotary.apply(&mut q, heads, &packed.positions, false);
            rotary.apply(&mut k, kv_heads, &packed.positions, false);
            let (attn, lse) = self.attend(packed, &q, &k, &v, threads);
            let (o, u_attn_out) = self.project(&attn, i, ATTN_OUT, lora, threads);
            let x2: Vec<T> = x.iter().zip(&o).map(|(&a, &b)| a + b).collect();
            let (h2, inv2) = rms_norm(&x2, &layer.post_norm, c.rms_norm_eps);
            let (gate_up, u_mlp_in) = self.project(&h2, i, MLP_IN, lora, threads);
            let act: Vec<T> = gate_up
                .chunks_exact(2 * ff)
                .flat_map(|row| row[..ff].iter().zip(&row[ff..]).map(|(&g, &u)| silu(g) * u))
                .collect();
            let (down, u_mlp_out) = self.project(&act, i, MLP_OUT, lora, threads);
            let next: Vec<T> = x2.iter().zip(&down).map(|(&a, &b)| a + b).collect();
            if record {
                let lora_u = [u_attn_in, u_attn_out, u_mlp_in, u_mlp_out];
                layers.push(LayerTape { x, inv1, h1, qk_raw, q, k, v, lse, attn, x2, inv2, h2, gate_up, act, lora_u });
            }
            x = next;
        }
        let (hidden_out, inv) = rms_norm(&x, &self.norm, c.rms_norm_eps);
        Forward { layers, last: x, inv, hidden: hidden_out }
    }

    /// Causal attention per example (grouped queries: query head h reads
    /// key/value head h / groups): the output `[rows, heads · d]` and each
    /// row's log-sum-exp `[rows, heads]`.
    fn attend(&self, packed: &Packed, q: &[T], k: &[T], v: &[T], threads: Threads) -> (Vec<T>, Vec<T>) {
        let c = &self.config;
        let (heads, kv_heads, d) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let (qw, kw) = (heads * d, kv_heads * d);
        let scale = T::of(1.0 / (d as f64).sqrt());
        let one = |&(start, t): &(usize, usize)| {
            let q = &q[start * qw..(start + t) * qw];
            let k = &k[start * kw..(start + t) * kw];
            let v = &v[start * kw..(start + t) * kw];
            let mut out = vec![T::zero(); t * qw];
            let mut lse = vec![T::zero(); t * heads];
            for h in 0..heads {
                let g = h / (heads / kv_heads);
                let mut p = scores(q, k, t, h, g, heads, kv_heads, d, scale);
                for (i, row) in p.chunks_exact_mut(t).enumerate() {
                    let top = row[..=i].iter().copied().fold(T::neg_infinity(), T::max);
                    let mut sum = T::zero();
                    for s in &mut row[..=i] {
                        *s = (*s - top).exp();
                        sum += *s;
                    }
                    for s in &mut row[..=i] {
                        *s = *s / sum;
                    }
                    row[i + 1..].fill(T::zero());
                    lse[i * heads + h] = top + sum.ln();
                }
                matmul(
                    ViewMut::strided(&mut out[h * d..], t, d, qw),
                    View::new(&p, t, t),
                    View::strided(&v[g * d..], t, d, kw),
                    T::one(),
                    false,
                    Threads::One,
                );
            }
            (out, lse)
        };
        let per_example: Vec<(Vec<T>, Vec<T>)> = match threads {
            Threads::Pool => packed.spans.par_iter().map(one).collect(),
            Threads::One => packed.spans.iter().map(one).collect(),
        };
        let mut attn = Vec::with_capacity(packed.rows() * qw);
        let mut lse = Vec::with_capacity(packed.rows() * heads);
        for (o, l) in per_example {
            attn.extend(o);
            lse.extend(l);
        }
        (attn, lse)
    }

    /// The weighted mean cross-entropy of the learned next tokens and the
    /// weight it averages over (no gradient).
    pub fn loss(&self, batch: &Batch, lora: Option<&Lora<T>>) -> Result<(f64, f64)> {
        let total = learned_weight(batch, self.config.vocab_size)?;
        let packed = Packed::new(batch);
        let forward = self.forward(&packed, lora, false, Threads::Pool);
        let loss = self.head_loss(&packed, &forward.hidden, total, None, Threads::Pool).0;
        Ok((loss, total))
    }

    /// The loss over the learned rows of `hidden` (the final normed states),
    /// their weights averaged over `normalizer`; with `grad_scale`, also
    /// `grad_scale · ∂loss/∂hidden`.
    pub(crate) fn head_loss(
        &self,
        packed: &Packed,
        hidden: &[T],
        normalizer: f64,
        grad_scale: Option<f64>,
        threads: Threads,
    ) -> (f64, Vec<T>) {
        let h = self.config.hidden_size;
        let vocab = self.config.vocab_size;
        let head = View::new(self.head(), vocab, h);
        let mut d_hidden = vec![T::zero(); if grad_scale.is_some() { hidden.len() } else { 0 }];
        let mut loss = 0f64;
        for chunk in packed.learned.chunks(HEAD_ROWS) {
            let mut rows = Vec::with_capacity(chunk.len() * h);
            for &(row, _, _) in chunk {
                rows.extend_from_slice(&hidden[row * h..(row + 1) * h]);
            }
            let mut logits = product(View::new(&rows, chunk.len(), h), head.t(), threads);
            for (z, &(_, target, weight)) in logits.chunks_exact_mut(vocab).zip(chunk) {
                // The vocabulary-wide sum in float64: a float32 running sum
                // over ~50k terms drifts by ~1e-5.
                let top = z.iter().copied().fold(T::neg_infinity(), T::max);
                let sum: f64 = z.iter().map(|&v| (v - top).exp().f64()).sum();
                let log_z = top.f64() + sum.ln();
                loss += weight * (log_z - z[target as usize].f64());
                if let Some(scale) = grad_scale {
                    // ∂/∂z of weight · (log Σ exp z − z[target]) / total.
                    let factor = scale * weight / normalizer;
                    for v in z.iter_mut() {
                        *v = T::of((*v - top).exp().f64() / sum * factor);
                    }
                    z[target as usize] -= T::of(factor);
                }
            }
            if grad_scale.is_some() {
                let d_rows = product(View::new(&logits, chunk.len(), vocab), head, threads);
                for (&(row, _, _), d) in chunk.iter().zip(d_rows.chunks_exact(h)) {
                    for (acc, &g) in d_hidden[row * h..(row + 1) * h].iter_mut().zip(d) {
                        *acc += g;
                    }
                }
            }
        }
        (loss / normalizer, d_hidden)
    }
}

/// `scale · Q_h K_gᵀ` of one example `[t, t]`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn scores<T: Real>(
    q: &[T],
    k: &[T],
    t: usize,
    h: usize,
    g: usize,
    heads: usize,
    kv_heads: usize,
    d: usize,
    scale: T,
) -> Vec<T> {
    let mut s = vec![T::zero(); t * t];
    matmul(
        ViewMut::new(&mut s, t, t),
        View::strided(&q[h * d..], t, d, heads * d),
        View::strided(&k[g * d..], t, d, kv_heads * d).t(),
        scale,
        false,
        Threads::One,
    );
    s
}
