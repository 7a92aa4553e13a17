//! Activations for the K-quants (ggml's Q8_K layout, scale in f32): one
//! scale per 256 values, so a weight super-block's sub-block dots can be
//! summed in integers with their own small scales and converted once, and
//! sums per 16 values, which the weights' mins and offsets multiply.

use super::q8::{self, BLOCK};
use super::Isa;

/// Values per super-block.
pub const QK_K: usize = 256;
/// Values per partial sum.
pub const SUM_SPAN: usize = 16;

/// One row of activations, `in_features / 256` super-blocks.
#[derive(Debug, Clone, Default)]
pub struct Q8KRow {
    pub qs: Vec<i8>,
    /// Per super-block: the scale (amax / 127).
    pub d: Vec<f32>,
    /// Per 16 values: `Σ qs` (at most 16·127 in magnitude).
    pub sums: Vec<i16>,
}

impl Q8KRow {
    /// Rounds to nearest, ties to even, as `Q8Row::quantize` does (the same
    /// SIMD helpers, so every ISA gives the same bits).
    pub fn quantize(x: &[f32]) -> Self {
        debug_assert_eq!(x.len() % QK_K, 0);
        let supers = x.len() / QK_K;
        let mut row = Q8KRow { qs: vec![0; x.len()], d: vec![0.0; supers], sums: vec![0; x.len() / SUM_SPAN] };
        let isa = super::isa();
        for s in 0..supers {
            let src = &x[s * QK_K..(s + 1) * QK_K];
            let amax = src.chunks_exact(BLOCK).fold(0f32, |m, block| {
                m.max(match isa {
                    // SAFETY: each ISA is only chosen when the CPU reports its features.
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx2 | Isa::Avx512Vnni => unsafe { q8::abs_max_avx2(block) },
                    Isa::Scalar => block.iter().fold(0f32, |m, v| m.max(v.abs())),
                })
            });
            let d = amax / 127.0;
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            let dst = &mut row.qs[s * QK_K..(s + 1) * QK_K];
            for (src, dst) in src.chunks_exact(BLOCK).zip(dst.chunks_exact_mut(BLOCK)) {
                match isa {
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx2 | Isa::Avx512Vnni => unsafe { q8::round_block_avx2(src, id, dst) },
                    Isa::Scalar => q8::round_block(src, id, dst),
                };
            }
            row.d[s] = d;
        }
        for (sum, span) in row.sums.iter_mut().zip(row.qs.chunks_exact(SUM_SPAN)) {
            *sum = span.iter().map(|&q| q as i16).sum();
        }
        row
    }

    /// Every row of a row-major `[rows, cols]` matrix.
    pub fn quantize_rows(x: &[f32], cols: usize) -> Vec<Q8KRow> {
        x.chunks_exact(cols).map(Q8KRow::quantize).collect()
    }

    /// The values this row stands for (tests).
    pub fn dequantize(&self) -> Vec<f32> {
        self.qs.iter().enumerate().map(|(i, &q)| q as f32 * self.d[i / QK_K]).collect()
    }
}

/// The i16 values `(a, b)` paired in one i32 lane: what `pmaddwd` /
/// `vpdpwssd` multiply pairwise against a row's paired mins or scales.
#[inline]
pub fn pair(a: i16, b: i16) -> i32 {
    (a as u16 as u32 | (b as u16 as u32) << 16) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_scale_per_256_and_sums_per_16() {
        let x: Vec<f32> = (0..512).map(|i| ((i as f32) * 0.61).sin() * if i < 256 { 3.0 } else { 0.2 }).collect();
        let row = Q8KRow::quantize(&x);
        assert_eq!(row.d.len(), 2);
        assert!(row.qs.iter().any(|&q| q.unsigned_abs() == 127));
        for (i, (&v, w)) in x.iter().zip(row.dequantize()).enumerate() {
            assert!((v - w).abs() <= row.d[i / QK_K] * 0.5 + 1e-6, "{i}: {v} vs {w}");
        }
        for (k, &sum) in row.sums.iter().enumerate() {
            let want: i16 = row.qs[k * 16..(k + 1) * 16].iter().map(|&q| q as i16).sum();
            assert_eq!(sum, want);
        }
    }
}
