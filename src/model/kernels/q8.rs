//! Activations quantized to 8 bits in blocks of 32 (ggml's Q8_1 layout, with
//! the scale and the scaled sum kept in f32): what the integer dot products
//! of the weight kernels consume.

use super::Isa;

pub const BLOCK: usize = 32;

/// One row of activations, `in_features / 32` blocks.
#[derive(Debug, Clone, Default)]
pub struct Q8Row {
    pub qs: Vec<i8>,
    /// Per block: the scale `d` (amax / 127).
    pub d: Vec<f32>,
    /// Per block: `d · Σ qs`, what a weight block's offset `m` multiplies.
    pub s: Vec<f32>,
    /// Per 16 values: `Σ qs`, for weights whose offsets change every 16
    /// values (Q6_K's `−32·sc`).
    pub sums: Vec<i16>,
}

impl Q8Row {
    /// Rounds to nearest, ties to even; the SIMD and scalar paths give the same bits.
    pub fn quantize(x: &[f32]) -> Self {
        debug_assert_eq!(x.len() % BLOCK, 0);
        let blocks = x.len() / BLOCK;
        let mut row =
            Q8Row { qs: vec![0; x.len()], d: vec![0.0; blocks], s: vec![0.0; blocks], sums: vec![0; x.len() / 16] };
        let isa = super::isa();
        for b in 0..blocks {
            let src = &x[b * BLOCK..(b + 1) * BLOCK];
            let amax = match isa {
                // SAFETY: each ISA is only chosen when the CPU reports its features.
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 | Isa::Avx512Vnni => unsafe { abs_max_avx2(src) },
                Isa::Scalar => src.iter().fold(0f32, |m, v| m.max(v.abs())),
            };
            let d = amax / 127.0;
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            let dst = &mut row.qs[b * BLOCK..(b + 1) * BLOCK];
            let sum = match isa {
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 | Isa::Avx512Vnni => unsafe { round_block_avx2(src, id, dst) },
                Isa::Scalar => round_block(src, id, dst),
            };
            row.d[b] = d;
            row.s[b] = d * sum as f32;
        }
        for (sum, span) in row.sums.iter_mut().zip(row.qs.chunks_exact(16)) {
            *sum = span.iter().map(|&q| q as i16).sum();
        }
        row
    }

    /// Every row of a row-major `[rows, cols]` matrix.
    pub fn quantize_rows(x: &[f32], cols: usize) -> Vec<Q8Row> {
        x.chunks_exact(cols).map(Q8Row::quantize).collect()
    }

    /// The values this row stands for (tests).
    pub fn dequantize(&self) -> Vec<f32> {
        self.qs.iter().enumerate().map(|(i, &q)| q as f32 * self.d[i / BLOCK]).collect()
    }
}

/// `q = round_ties_even(x · id)`; returns `Σ q`.
pub(super) fn round_block(src: &[f32], id: f32, dst: &mut [i8]) -> i32 {
    let mut sum = 0i32;
    for (q, v) in dst.iter_mut().zip(src) {
        let r = (v * id).round_ties_even() as i32;
        *q = r as i8;
        sum += r;
    }
    sum
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn abs_max_avx2(src: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    debug_assert_eq!(src.len(), BLOCK);
    let sign = _mm256_set1_ps(-0.0);
    let p = src.as_ptr();
    let abs = |i: usize| _mm256_andnot_ps(sign, _mm256_loadu_ps(p.add(i * 8)));
    let m = _mm256_max_ps(_mm256_max_ps(abs(0), abs(1)), _mm256_max_ps(abs(2), abs(3)));
    let m4 = _mm_max_ps(_mm256_extractf128_ps(m, 1), _mm256_castps256_ps128(m));
    let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    _mm_cvtss_f32(_mm_max_ss(m2, _mm_shuffle_ps(m2, m2, 1)))
}

/// The vector form of `round_block`: `cvtps2dq` rounds to nearest even under
/// the default rounding mode, as `round_ties_even` does.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn round_block_avx2(src: &[f32], id: f32, dst: &mut [i8]) -> i32 {
    use std::arch::x86_64::*;
    debug_assert!(src.len() == BLOCK && dst.len() == BLOCK);
    let scale = _mm256_set1_ps(id);
    let p = src.as_ptr();
    let q = |i: usize| _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(p.add(i * 8)), scale));
    let (q0, q1, q2, q3) = (q(0), q(1), q(2), q(3));
    let total = _mm256_add_epi32(_mm256_add_epi32(q0, q1), _mm256_add_epi32(q2, q3));
    let t4 = _mm_add_epi32(_mm256_extracti128_si256(total, 1), _mm256_castsi256_si128(total));
    let t2 = _mm_add_epi32(t4, _mm_unpackhi_epi64(t4, t4));
    let sum = _mm_cvtsi128_si32(_mm_add_epi32(t2, _mm_shuffle_epi32(t2, 1)));
    // Packing works within 128-bit halves; the permute restores element order.
    let packed = _mm256_packs_epi16(_mm256_packs_epi32(q0, q1), _mm256_packs_epi32(q2, q3));
    let ordered = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(dst.as_mut_ptr() as *mut __m256i, ordered);
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simd_and_scalar_quantization_agree_bit_for_bit() {
        // Includes exact ties (x·id = k + 0.5) and zeros.
        let x: Vec<f32> = (0..256)
            .map(|i| match i % 9 {
                0 => 0.0,
                1 => 127.0,
                2 => -63.5,
                3 => 2.5,
                _ => ((i as f32) * 0.73).sin() * 40.0,
            })
            .collect();
        for b in 0..x.len() / BLOCK {
            let src = &x[b * BLOCK..(b + 1) * BLOCK];
            let amax = src.iter().fold(0f32, |m, v| m.max(v.abs()));
            let id = 127.0 / amax;
            let mut scalar = [0i8; BLOCK];
            let scalar_sum = round_block(src, id, &mut scalar);
            #[cfg(target_arch = "x86_64")]
            if super::super::available().contains(&Isa::Avx2) {
                let mut simd = [0i8; BLOCK];
                // SAFETY: AVX2 is present (checked above).
                let simd_sum = unsafe { round_block_avx2(src, id, &mut simd) };
                assert_eq!(scalar, simd, "block {b}");
                assert_eq!(scalar_sum, simd_sum, "block {b}");
                assert_eq!(amax, unsafe { abs_max_avx2(src) }, "block {b}");
            }
        }
    }
}
