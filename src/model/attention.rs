//! Rotary embedding and causal attention for one sequence, on plain slices:
//! no per-step tensor allocations, and each query is computed the same way
//! whether it comes in a prompt chunk or a decode step, so chunked prefill
//! and batching cannot change a sequence's numbers.

use rayon::prelude::*;

use super::kernels::{self, Isa};
use super::kv_cache::{LayerView, KEY_BLOCK};

/// Head counts and width.
#[derive(Debug, Clone, Copy)]
pub struct HeadShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub dim: usize,
}

/// Half-split (NeoX / Hugging Face) rotary tables, `[max_positions, head_dim / 2]`.
pub struct Rope {
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
}

impl Rope {
    /// Tables for `inv_freq` (`head_dim / 2` frequencies), float32
    /// throughout as transformers computes them.
    pub fn new(inv_freq: &[f32], max_positions: usize) -> Self {
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for pos in 0..max_positions {
            for f in inv_freq {
                let angle = pos as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Self { cos, sin, half }
    }

    /// The cosine and sine tables, `[position, head_dim / 2]` each.
    pub fn tables(&self) -> (&[f32], &[f32]) {
        (&self.cos, &self.sin)
    }

    /// Rotates `x` (`[n, heads · head_dim]`, positions `start..start + n`) in place.
    pub fn apply(&self, x: &mut [f32], heads: usize, start: usize) {
        let (half, d) = (self.half, 2 * self.half);
        for (i, token) in x.chunks_exact_mut(heads * d).enumerate() {
            let at = (start + i) * half;
            let (cos, sin) = (&self.cos[at..at + half], &self.sin[at..at + half]);
            for head in token.chunks_exact_mut(d) {
                let (x1, x2) = head.split_at_mut(half);
                for j in 0..half {
                    let (a, b) = (x1[j], x2[j]);
                    x1[j] = a * cos[j] - b * sin[j];
                    x2[j] = b * cos[j] + a * sin[j];
                }
            }
        }
    }
}

/// Work (query-head · key pairs) above which one call is split over the
/// rayon pool: a prompt chunk, or one decode query over a long enough
/// history (a single stream otherwise leaves the second core idle here).
const PARALLEL_PAIRS: usize = 1024;
/// Queries per unit of parallel work in a prompt chunk.
const QUERY_BLOCK: usize = 16;

/// A unit of attention work: kv head `kv` and the query heads that share
/// it, over queries `first..first + len`.
#[derive(Debug, Clone, Copy)]
struct Unit {
    kv: usize,
    first: usize,
    len: usize,
}

/// Causal attention of `q` (`[n, heads · d]`, positions `start..start + n`,
/// rotated) over the first `start + n` cached tokens; returns `[n, heads · d]`.
pub(crate) fn attend(q: &[f32], start: usize, cache: &LayerView, shape: HeadShape) -> Vec<f32> {
    let (d, width) = (shape.dim, shape.heads * shape.dim);
    let group = shape.heads / shape.kv_heads;
    let n = q.len() / width;
    let isa = kernels::isa();
    let units: Vec<Unit> = (0..shape.kv_heads)
        .flat_map(|kv| {
            (0..n).step_by(QUERY_BLOCK).map(move |first| Unit { kv, first, len: QUERY_BLOCK.min(n - first) })
        })
        .collect();
    let run = |&unit: &Unit| -> Vec<f32> {
        match isa {
            // SAFETY: the AVX2 ISAs are only chosen when the CPU has AVX2 and FMA.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 | Isa::Avx512Vnni => unsafe { attend_group_avx2(q, start, cache, shape, unit) },
            Isa::Scalar => attend_group(q, start, cache, shape, unit),
        }
    };
    let results: Vec<Vec<f32>> = if n * (start + n) * shape.heads >= PARALLEL_PAIRS {
        units.par_iter().map(run).collect()
    } else {
        units.iter().map(run).collect()
    };
    let mut out = vec![0f32; n * width];
    for (&Unit { kv, first, .. }, values) in units.iter().zip(&results) {
        // values: [len, group, d] → out[first + i][(kv · group + head) · d ..]
        for (i, heads) in values.chunks_exact(group * d).enumerate() {
            out[(first + i) * width + kv * group * d..][..group * d].copy_from_slice(heads);
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_group_avx2(q: &[f32], start: usize, cache: &LayerView, shape: HeadShape, unit: Unit) -> Vec<f32> {
    attend_group(q, start, cache, shape, unit)
}

/// One unit's outputs, `[len, group, d]`. Each key and value is read once for the whole group.
/// Every query's numbers are computed the same way whatever block it is in.
/// Inlined into each ISA's wrapper so the lane loops compile to that ISA's
/// vectors; plain loops, no closures (a closure would not inherit the
/// wrapper's target features).
#[inline(always)]
fn attend_group(q: &[f32], start: usize, cache: &LayerView, shape: HeadShape, unit: Unit) -> Vec<f32> {
    let Unit { kv, first, len } = unit;
    let d = shape.dim;
    let width = shape.heads * d;
    let group = shape.heads / shape.kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    let stride = start + first + len;
    let mut scores = vec![0f32; group * stride];
    let mut maxes = vec![f32::NEG_INFINITY; group];
    let mut sums = vec![0f32; group];
    let mut out = vec![0f32; len * group * d];
    for i in 0..len {
        let query = first + i;
        // Query at position start + query sees keys 0..=start + query.
        let total = start + query + 1;
        let queries = &q[query * width + kv * group * d..][..group * d];
        for (h, qh) in queries.chunks_exact(d).enumerate() {
            let row = &mut scores[h * stride..h * stride + total];
            for (b, j) in (0..total).step_by(KEY_BLOCK).enumerate() {
                let block = score_block(qh, &cache.keys(b)[kv * d * KEY_BLOCK..]);
                let take = KEY_BLOCK.min(total - j);
                for (s, &b) in row[j..j + take].iter_mut().zip(&block[..take]) {
                    *s = b * scale;
                }
            }
            maxes[h] = f32::NEG_INFINITY;
            for &s in row.iter() {
                maxes[h] = maxes[h].max(s);
            }
        }
        for h in 0..group {
            let mut sum = 0f32;
            for w in scores[h * stride..h * stride + total].iter_mut() {
                *w = (*w - maxes[h]).exp();
                sum += *w;
            }
            sums[h] = sum;
        }
        let out_heads = &mut out[i * group * d..(i + 1) * group * d];
        for (b, first_key) in (0..total).step_by(KEY_BLOCK).enumerate() {
            let values = &cache.values(b)[kv * KEY_BLOCK * d..][..KEY_BLOCK * d];
            for (value, j) in values.chunks_exact(d).zip(first_key..total) {
                for (h, out_h) in out_heads.chunks_exact_mut(d).enumerate() {
                    let p = scores[h * stride + j] / sums[h];
                    for (o, &v) in out_h.iter_mut().zip(value) {
                        *o += p * v;
                    }
                }
            }
        }
    }
    out
}

/// `q · k_j` for the `KEY_BLOCK` keys of a block whose transposed elements
/// start at `k_t[e · KEY_BLOCK]`: one vector accumulator per eight keys,
/// summed over the head's elements in order (no horizontal sums).
#[inline(always)]
fn score_block(q: &[f32], k_t: &[f32]) -> [f32; KEY_BLOCK] {
    let mut acc = [0f32; KEY_BLOCK];
    for (e, &qe) in q.iter().enumerate() {
        let keys = &k_t[e * KEY_BLOCK..][..KEY_BLOCK];
        for l in 0..KEY_BLOCK {
            acc[l] += qe * keys[l];
        }
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::KvCache;

    /// Plain softmax attention in f64, query by query.
    fn reference(q: &[f32], keys: &[Vec<f32>], values: &[Vec<f32>], shape: HeadShape, n: usize) -> Vec<f32> {
        let (d, width) = (shape.dim, shape.heads * shape.dim);
        let group = shape.heads / shape.kv_heads;
        let total = keys.len();
        let mut out = vec![0f32; n * width];
        for i in 0..n {
            let visible = total - n + i + 1;
            for h in 0..shape.heads {
                let kv = h / group;
                let qh = &q[i * width + h * d..][..d];
                let scores: Vec<f64> = (0..visible)
                    .map(|j| {
                        let k = &keys[j][kv * d..][..d];
                        qh.iter().zip(k).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() / (d as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f64 = exps.iter().sum();
                for e in 0..d {
                    let v: f64 = (0..visible).map(|j| exps[j] / sum * values[j][kv * d + e] as f64).sum();
                    out[i * width + h * d + e] = v as f32;
                }
            }
        }
        out
    }

    #[test]
    fn grouped_causal_attention_matches_the_plain_formula_in_any_chunking() {
        let shape = HeadShape { heads: 6, kv_heads: 2, dim: 16 };
        let kv_width = shape.kv_heads * shape.dim;
        let width = shape.heads * shape.dim;
        let tokens = 40;
        let val = |seed: usize, i: usize| ((seed * 7919 + i * 104_729) % 1000) as f32 / 500.0 - 1.0;
        let keys: Vec<Vec<f32>> = (0..tokens).map(|t| (0..kv_width).map(|e| val(t, e)).collect()).collect();
        let values: Vec<Vec<f32>> = (0..tokens).map(|t| (0..kv_width).map(|e| val(t + 1000, e)).collect()).collect();
        let queries: Vec<f32> = (0..tokens * width).map(|i| val(2000, i)).collect();
        // 40 tokens as chunks of 23 (parallel, two query blocks) + 1 + 16.
        let mut cache = KvCache::new(1, shape.kv_heads, shape.dim, Default::default());
        let mut got = Vec::new();
        let mut at = 0;
        for chunk in [23, 1, 16] {
            let k: Vec<f32> = keys[at..at + chunk].concat();
            let v: Vec<f32> = values[at..at + chunk].concat();
            cache.append(0, &k, &v);
            got.extend(attend(&queries[at * width..(at + chunk) * width], at, &cache.layer(0), shape));
            cache.advance(chunk);
            at += chunk;
        }
        let want = reference(&queries, &keys, &values, shape, tokens);
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!((a - b).abs() < 1e-5, "element {i}: {a} vs {b}");
        }
        // Query 30 alone over the same history gives the same bits.
        let mut short = KvCache::new(1, shape.kv_heads, shape.dim, Default::default());
        short.append(0, &keys[..31].concat(), &values[..31].concat());
        let alone = attend(&queries[30 * width..31 * width], 30, &short.layer(0), shape);
        assert_eq!(alone.as_slice(), &got[30 * width..31 * width]);
    }
}
