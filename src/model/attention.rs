//! Rotary embedding and causal attention for one sequence, on plain slices:
//! no per-step tensor allocations, and each query is computed the same way
//! whether it comes in a prompt chunk or a decode step, so chunked prefill
//! and batching cannot change a sequence's numbers.

use rayon::prelude::*;

use super::kernels::{self, Isa};
use super::kv_cache::LayerView;

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
    pub fn new(head_dim: usize, theta: f32, max_positions: usize) -> Self {
        let half = head_dim / 2;
        // float32 throughout, as transformers computes it.
        let inv_freq: Vec<f32> = (0..half).map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32)).collect();
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for pos in 0..max_positions {
            for f in &inv_freq {
                let angle = pos as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Self { cos, sin, half }
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

/// Work (query · key pairs) above which the heads of one call are split over
/// the rayon pool; a decode step's single query stays on one thread.
const PARALLEL_PAIRS: usize = 4096;

/// Causal attention of `q` (`[n, heads · d]`, positions `start..start + n`,
/// rotated) over the first `start + n` cached tokens; returns `[n, heads · d]`.
pub(crate) fn attend(q: &[f32], start: usize, cache: &LayerView, shape: HeadShape) -> Vec<f32> {
    let width = shape.heads * shape.dim;
    let n = q.len() / width;
    let isa = kernels::isa();
    let head = |h: usize| -> Vec<f32> {
        match isa {
            // SAFETY: the AVX2 ISAs are only chosen when the CPU has AVX2 and FMA.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 | Isa::Avx512Vnni => unsafe { attend_head_avx2(q, start, cache, shape, h) },
            Isa::Scalar => attend_head(q, start, cache, shape, h),
        }
    };
    let per_head: Vec<Vec<f32>> = if n * (start + n) >= PARALLEL_PAIRS {
        (0..shape.heads).into_par_iter().map(head).collect()
    } else {
        (0..shape.heads).map(head).collect()
    };
    let mut out = vec![0f32; n * width];
    for (h, values) in per_head.iter().enumerate() {
        for (i, row) in values.chunks_exact(shape.dim).enumerate() {
            out[i * width + h * shape.dim..][..shape.dim].copy_from_slice(row);
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_head_avx2(q: &[f32], start: usize, cache: &LayerView, shape: HeadShape, h: usize) -> Vec<f32> {
    attend_head(q, start, cache, shape, h)
}

/// Head `h` for every query: `[n, d]`. Inlined into each ISA's wrapper so the
/// lane loops compile to that ISA's vectors.
#[inline(always)]
fn attend_head(q: &[f32], start: usize, cache: &LayerView, shape: HeadShape, h: usize) -> Vec<f32> {
    let d = shape.dim;
    let width = shape.heads * d;
    let n = q.len() / width;
    let kv = h / (shape.heads / shape.kv_heads);
    let base = kv * cache.capacity * d;
    let scale = 1.0 / (d as f32).sqrt();
    let mut out = vec![0f32; n * d];
    let mut weights = Vec::with_capacity(start + n);
    for (i, out_row) in out.chunks_exact_mut(d).enumerate() {
        let query = &q[i * width + h * d..][..d];
        // Query i (position start + i) sees keys 0..=start + i.
        let total = start + i + 1;
        // Plain loops, no closures: a closure would not inherit the
        // wrapper's target features and would run on baseline SSE.
        weights.clear();
        let mut max = f32::NEG_INFINITY;
        for j in 0..total {
            let score = dot(query, &cache.k[base + j * d..][..d]) * scale;
            max = max.max(score);
            weights.push(score);
        }
        let mut sum = 0f32;
        for w in weights.iter_mut() {
            *w = (*w - max).exp();
            sum += *w;
        }
        for (j, &w) in weights.iter().enumerate() {
            let p = w / sum;
            let v = &cache.v[base + j * d..][..d];
            for e in 0..d {
                out_row[e] += p * v[e];
            }
        }
    }
    out
}

/// Eight independent lanes (so the loop vectorizes), then a fixed-order sum.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let full = a.len() / 8 * 8;
    for i in (0..full).step_by(8) {
        for l in 0..8 {
            lanes[l] += a[i + l] * b[i + l];
        }
    }
    let mut tail = 0f32;
    for i in full..a.len() {
        tail += a[i] * b[i];
    }
    ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7])) + tail
}
