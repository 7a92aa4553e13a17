//! The training backward: gradients of the loss with respect to the LoRA
//! matrices only (the base is frozen, so no weight gradient of the base is
//! ever formed), through the tapes the forward pass kept.

use std::collections::BTreeMap;

use rayon::prelude::*;

use super::forward::{learned_weight, scores, Forward, LayerTape, Packed, Rotary};
use super::linalg::{matmul, product, Real, Threads, View, ViewMut};
use super::model::{Batch, Lora, Pair, TrainModel, ATTN_IN, ATTN_OUT, MLP_IN, MLP_OUT};
use crate::model::Result;

/// Gradients, shaped as the adapter's matrices.
pub type Grads<T> = BTreeMap<(usize, usize), Pair<T>>;

/// `batch` split into at most `parts` shards of about equal token counts
/// (longest examples first, each to the lightest shard).
fn shards(batch: &Batch, parts: usize) -> Vec<Batch> {
    let mut order: Vec<usize> = (0..batch.ids.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(batch.ids[i].len()));
    let mut shards: Vec<(usize, Batch)> = (0..parts.clamp(1, batch.ids.len().max(1)))
        .map(|_| (0, Batch { ids: Vec::new(), weights: Vec::new() }))
        .collect();
    for i in order {
        let Some((tokens, shard)) = shards.iter_mut().min_by_key(|(tokens, _)| *tokens) else { break };
        *tokens += batch.ids[i].len();
        shard.ids.push(batch.ids[i].clone());
        shard.weights.push(batch.weights[i].clone());
    }
    shards.into_iter().map(|(_, shard)| shard).collect()
}

fn add_into<T: Real>(into: &mut Grads<T>, from: &Grads<T>) {
    for (key, pair) in from {
        if let Some(acc) = into.get_mut(key) {
            for (a, &b) in acc.a.iter_mut().zip(&pair.a).chain(acc.b.iter_mut().zip(&pair.b)) {
                *a += b;
            }
        }
    }
}

impl<T: Real> TrainModel<T> {
    /// The loss on `batch` (and the weight it averages over), adding
    /// `grad_scale · ∂loss/∂(A, B)` into `grads` (gradient accumulation).
    /// With several threads, each runs the whole pass on its own shard of
    /// the batch (no synchronisation inside a step) and the gradients are
    /// summed.
    pub fn loss_and_gradients(
        &self,
        batch: &Batch,
        lora: &Lora<T>,
        grad_scale: f64,
        grads: &mut Grads<T>,
    ) -> Result<(f64, f64)> {
        let total = learned_weight(batch, self.config.vocab_size)?;
        let shards = shards(batch, rayon::current_num_threads());
        if shards.len() == 1 {
            let loss = self.shard_gradients(&Packed::new(batch), total, lora, grad_scale, grads, Threads::Pool);
            return Ok((loss, total));
        }
        let parts: Vec<(f64, Grads<T>)> = shards
            .par_iter()
            .map(|shard| {
                let mut own = lora.zeros_like();
                let loss = self.shard_gradients(&Packed::new(shard), total, lora, grad_scale, &mut own, Threads::One);
                (loss, own)
            })
            .collect();
        let mut loss = 0.0;
        for (part, own) in &parts {
            loss += part;
            add_into(grads, own);
        }
        Ok((loss, total))
    }

    /// Forward and backward over one shard whose loss is averaged over
    /// `normalizer`; returns its share of the loss.
    fn shard_gradients(
        &self,
        packed: &Packed,
        normalizer: f64,
        lora: &Lora<T>,
        grad_scale: f64,
        grads: &mut Grads<T>,
        threads: Threads,
    ) -> f64 {
        let Forward { layers, last, inv, hidden } = self.forward(packed, Some(lora), true, threads);
        let (loss, d_hidden) = self.head_loss(packed, &hidden, normalizer, Some(grad_scale), threads);
        drop(hidden);
        let rotary = Rotary::new(&self.inv_freq, packed.spans.iter().map(|s| s.1).max().unwrap_or(0));
        // d(residual stream) through the final norm.
        let mut dx = vec![T::zero(); last.len()];
        rms_norm_backward(&d_hidden, &last, &inv, &self.norm, &mut dx);
        for (i, tape) in layers.into_iter().enumerate().rev() {
            dx = self.layer_backward(i, tape, dx, packed, &rotary, lora, grads, threads);
        }
        loss
    }

    /// One layer backward: the gradient of its input from that of its output.
    #[allow(clippy::too_many_arguments)]
    fn layer_backward(
        &self,
        i: usize,
        tape: LayerTape<T>,
        d_out: Vec<T>,
        packed: &Packed,
        rotary: &Rotary<T>,
        lora: &Lora<T>,
        grads: &mut Grads<T>,
        threads: Threads,
    ) -> Vec<T> {
        let c = &self.config;
        let layer = &self.layers[i];
        // MLP: out = x2 + down(silu(gate) · up).
        let ff = c.intermediate_size;
        let mut d_x2 = d_out.clone();
        let mut d_act = vec![T::zero(); tape.act.len()];
        self.project_backward(&d_out, &tape, i, MLP_OUT, lora, grads, Some(&mut d_act), threads);
        drop(d_out);
        let mut d_gate_up = vec![T::zero(); tape.gate_up.len()];
        for ((d_row, row), da) in
            d_gate_up.chunks_exact_mut(2 * ff).zip(tape.gate_up.chunks_exact(2 * ff)).zip(d_act.chunks_exact(ff))
        {
            let (d_gate, d_up) = d_row.split_at_mut(ff);
            let (gate, up) = row.split_at(ff);
            for j in 0..ff {
                let (g, u, da) = (gate[j], up[j], da[j]);
                let sigmoid = T::one() / (T::one() + (-g).exp());
                d_up[j] = da * g * sigmoid;
                d_gate[j] = da * u * sigmoid * (T::one() + g * (T::one() - sigmoid));
            }
        }
        drop(d_act);
        let mut d_h2 = vec![T::zero(); tape.h2.len()];
        self.project_backward(&d_gate_up, &tape, i, MLP_IN, lora, grads, Some(&mut d_h2), threads);
        drop(d_gate_up);
        rms_norm_backward(&d_h2, &tape.x2, &tape.inv2, &layer.post_norm, &mut d_x2);
        // Attention: x2 = x + o(attend(rope(q), rope(k), v)).
        let mut d_attn = vec![T::zero(); tape.attn.len()];
        self.project_backward(&d_x2, &tape, i, ATTN_OUT, lora, grads, Some(&mut d_attn), threads);
        let (mut dq, mut dk, dv) = self.attend_backward(packed, &tape, &d_attn, threads);
        rotary.apply(&mut dq, c.num_heads, &packed.positions, true);
        rotary.apply(&mut dk, c.num_kv_heads, &packed.positions, true);
        if let (Some([(q_raw, q_inv), (k_raw, k_inv)]), Some((q_norm, k_norm))) = (&tape.qk_raw, &layer.qk_norm) {
            let mut d_q_raw = vec![T::zero(); dq.len()];
            rms_norm_backward(&dq, q_raw, q_inv, q_norm, &mut d_q_raw);
            let mut d_k_raw = vec![T::zero(); dk.len()];
            rms_norm_backward(&dk, k_raw, k_inv, k_norm, &mut d_k_raw);
            (dq, dk) = (d_q_raw, d_k_raw);
        }
        // q, k and v side by side, as the attention input block made them.
        let (qw, kw) = (dq.len() / packed.rows(), dk.len() / packed.rows());
        let mut d_qkv = Vec::with_capacity(dq.len() + 2 * dk.len());
        for ((q, k), v) in dq.chunks_exact(qw).zip(dk.chunks_exact(kw)).zip(dv.chunks_exact(kw)) {
            d_qkv.extend_from_slice(q);
            d_qkv.extend_from_slice(k);
            d_qkv.extend_from_slice(v);
        }
        drop((dq, dk, dv));
        // The first layer's input is the embedding, which is frozen.
        let mut d_h1 = (i > 0).then(|| vec![T::zero(); tape.h1.len()]);
        self.project_backward(&d_qkv, &tape, i, ATTN_IN, lora, grads, d_h1.as_deref_mut(), threads);
        let mut d_x = d_x2;
        if let Some(d_h1) = d_h1 {
            rms_norm_backward(&d_h1, &tape.x, &tape.inv1, &layer.input_norm, &mut d_x);
        }
        d_x
    }

    /// Backward of `project`: each adapted site's LoRA gradients into
    /// `grads`, and `∂/∂x` added into `d_x` when asked for.
    #[allow(clippy::too_many_arguments)]
    fn project_backward(
        &self,
        dy: &[T],
        tape: &LayerTape<T>,
        layer: usize,
        block: usize,
        lora: &Lora<T>,
        grads: &mut Grads<T>,
        d_x: Option<&mut [T]>,
        threads: Threads,
    ) {
        let (x, us) = (tape.input(block), &tape.lora_u[block]);
        let (out, inp) = self.block_dims(block);
        let n = x.len() / inp;
        let mut d_x = d_x;
        if let Some(d_x) = d_x.as_deref_mut() {
            let w = View::new(&self.layers[layer].blocks[block], out, inp);
            matmul(ViewMut::new(d_x, n, inp), View::new(dy, n, out), w, T::one(), true, threads);
        }
        let (r, scale) = (lora.rank, T::of(lora.scale()));
        for (site, u) in self.sites(block).into_iter().zip(us) {
            let (Some(u), Some(pair), Some(grad)) =
                (u, lora.weights.get(&(layer, site.module)), grads.get_mut(&(layer, site.module)))
            else {
                continue;
            };
            // The site's columns of dy; y += s · u Bᵀ there, with u = x Aᵀ.
            let d_y = View::strided(&dy[site.start..], n, site.width, out);
            let u = View::new(u, n, r);
            matmul(ViewMut::new(&mut grad.b, site.width, r), d_y.t(), u, scale, true, threads);
            let mut d_u = vec![T::zero(); n * r];
            matmul(ViewMut::new(&mut d_u, n, r), d_y, View::new(&pair.b, site.width, r), scale, false, threads);
            let d_u = View::new(&d_u, n, r);
            matmul(ViewMut::new(&mut grad.a, r, inp), d_u.t(), View::new(x, n, inp), T::one(), true, threads);
            if let Some(d_x) = d_x.as_deref_mut() {
                matmul(ViewMut::new(d_x, n, inp), d_u, View::new(&pair.a, r, inp), T::one(), true, threads);
            }
        }
    }

    /// Backward of `attend`, recomputing each head's probabilities from the
    /// kept log-sum-exp: the gradients of the (rotated) queries and keys
    /// and of the values.
    fn attend_backward(
        &self,
        packed: &Packed,
        tape: &LayerTape<T>,
        d_attn: &[T],
        threads: Threads,
    ) -> (Vec<T>, Vec<T>, Vec<T>) {
        let c = &self.config;
        let (heads, kv_heads, d) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let (qw, kw) = (heads * d, kv_heads * d);
        let scale = T::of(1.0 / (d as f64).sqrt());
        let one = |&(start, t): &(usize, usize)| {
            let q = &tape.q[start * qw..(start + t) * qw];
            let k = &tape.k[start * kw..(start + t) * kw];
            let v = &tape.v[start * kw..(start + t) * kw];
            let lse = &tape.lse[start * heads..(start + t) * heads];
            let d_o = &d_attn[start * qw..(start + t) * qw];
            let (mut dq, mut dk, mut dv) = (vec![T::zero(); t * qw], vec![T::zero(); t * kw], vec![T::zero(); t * kw]);
            for h in 0..heads {
                let g = h / (heads / kv_heads);
                let mut p = scores(q, k, t, h, g, heads, kv_heads, d, scale);
                for (i, row) in p.chunks_exact_mut(t).enumerate() {
                    let l = lse[i * heads + h];
                    for s in &mut row[..=i] {
                        *s = (*s - l).exp();
                    }
                    row[i + 1..].fill(T::zero());
                }
                let d_oh = View::strided(&d_o[h * d..], t, d, qw);
                let v_g = View::strided(&v[g * d..], t, d, kw);
                let mut dp = product(d_oh, v_g.t(), Threads::One);
                matmul(
                    ViewMut::strided(&mut dv[g * d..], t, d, kw),
                    View::new(&p, t, t).t(),
                    d_oh,
                    T::one(),
                    true,
                    Threads::One,
                );
                // dS = P ⊙ (dP − rowsum(P ⊙ dP)), times the score scale.
                for (row_p, row_dp) in p.chunks_exact(t).zip(dp.chunks_exact_mut(t)) {
                    let dot: T = row_p.iter().zip(row_dp.iter()).map(|(&a, &b)| a * b).sum();
                    for (ds, &pv) in row_dp.iter_mut().zip(row_p) {
                        *ds = pv * (*ds - dot) * scale;
                    }
                }
                let ds = View::new(&dp, t, t);
                let k_g = View::strided(&k[g * d..], t, d, kw);
                let q_h = View::strided(&q[h * d..], t, d, qw);
                matmul(ViewMut::strided(&mut dq[h * d..], t, d, qw), ds, k_g, T::one(), false, Threads::One);
                matmul(ViewMut::strided(&mut dk[g * d..], t, d, kw), ds.t(), q_h, T::one(), true, Threads::One);
            }
            (dq, dk, dv)
        };
        let per_example: Vec<(Vec<T>, Vec<T>, Vec<T>)> = match threads {
            Threads::Pool => packed.spans.par_iter().map(one).collect(),
            Threads::One => packed.spans.iter().map(one).collect(),
        };
        let rows = packed.rows();
        let (mut dq, mut dk, mut dv) =
            (Vec::with_capacity(rows * qw), Vec::with_capacity(rows * kw), Vec::with_capacity(rows * kw));
        for (q, k, v) in per_example {
            dq.extend(q);
            dk.extend(k);
            dv.extend(v);
        }
        (dq, dk, dv)
    }
}

/// Backward of `rms_norm`, added into `d_x`: with `g = dy ⊙ w`,
/// `dx = inv · g − x · inv³ · (g · x) / h`.
pub(crate) fn rms_norm_backward<T: Real>(dy: &[T], x: &[T], inv: &[T], w: &[T], d_x: &mut [T]) {
    let h = w.len();
    for (((dy, x), &r), d_x) in dy.chunks_exact(h).zip(x.chunks_exact(h)).zip(inv).zip(d_x.chunks_exact_mut(h)) {
        let dot: T = dy.iter().zip(w).zip(x).map(|((&a, &b), &c)| a * b * c).sum();
        let coef = r * r * r * dot / T::of(h as f64);
        for (((o, &a), &b), &c) in d_x.iter_mut().zip(dy).zip(w).zip(x) {
            *o += r * a * b - c * coef;
        }
    }
}
