//! Q8_0 weights × Q8 activations (the tied output head of SmolLM2, and every
//! projection of a Q8_0 model): per block of 32, `d·dx·Σ q·qx`.

use half::f16;

use super::q8::{Q8Row, BLOCK};
use super::{Isa, QuantMatrix, Rows};

/// Bytes of one GGUF Q8_0 block: d (f16), 32 signed bytes.
pub const BLOCK_BYTES: usize = 34;

#[derive(Debug, Clone)]
pub struct Q8_0Matrix {
    rows: usize,
    cols: usize,
    d: Vec<f32>,
    qs: Vec<i8>,
}

impl Q8_0Matrix {
    pub fn from_gguf_bytes(bytes: &[u8], rows: usize, cols: usize) -> Option<Self> {
        if !cols.is_multiple_of(BLOCK) || bytes.len() != rows * cols / BLOCK * BLOCK_BYTES {
            return None;
        }
        let blocks = rows * cols / BLOCK;
        let mut d = Vec::with_capacity(blocks);
        let mut qs = Vec::with_capacity(blocks * BLOCK);
        for block in bytes.chunks_exact(BLOCK_BYTES) {
            d.push(f16::from_le_bytes([block[0], block[1]]).to_f32());
            qs.extend(block[2..].iter().map(|&b| b as i8));
        }
        Some(Self { rows, cols, d, qs })
    }

    /// `y[t][o] = Σ_k w[o][k] · x[t][k]`, weight rows split over the rayon pool.
    pub fn matmul(&self, x: &[Q8Row], isa: Isa) -> Vec<f32> {
        super::matmul(self, &super::Activations::q8(x), isa)
    }
}

impl QuantMatrix for Q8_0Matrix {
    fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    fn bytes(&self) -> usize {
        self.d.len() * 4 + self.qs.len()
    }

    fn dequantize(&self) -> Vec<f32> {
        self.qs.iter().enumerate().map(|(i, &q)| self.d[i / BLOCK] * q as f32).collect()
    }

    fn dot_row(&self, o: usize, xs: Rows<'_>, out: &mut [f32], isa: Isa) {
        let xs = xs.q8();
        let blocks = self.cols / BLOCK;
        let d = &self.d[o * blocks..(o + 1) * blocks];
        let qs = &self.qs[o * self.cols..(o + 1) * self.cols];
        match isa {
            // SAFETY: each ISA is only chosen when the CPU reports its features.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => super::by_count!(xs.len(), |R| unsafe { dot_avx2::<R>(d, qs, xs, out) }),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => super::by_count!(xs.len(), |R| unsafe { dot_vnni::<R>(d, qs, xs, out) }),
            Isa::Scalar => {
                for (xr, o) in xs.iter().zip(out.iter_mut()) {
                    *o = dot_scalar(d, qs, xr);
                }
            }
        }
    }
}

pub fn dot_scalar(d: &[f32], qs: &[i8], x: &Q8Row) -> f32 {
    let mut sum = 0f32;
    for b in 0..d.len() {
        let isum: i32 = qs[b * BLOCK..(b + 1) * BLOCK]
            .iter()
            .zip(&x.qs[b * BLOCK..(b + 1) * BLOCK])
            .map(|(&w, &v)| w as i32 * v as i32)
            .sum();
        sum += d[b] * x.d[b] * isum as f32;
    }
    sum
}

/// One weight row against `R` activation rows (1 ≤ R ≤ 8), each weight block
/// loaded (`|p| unpack`, `p` = the block's first byte) once for all of them
/// and multiplied into i32 lanes by `|w, v| dot`. Every activation row gets
/// exactly the same operations in the same order whatever `R` is: its own
/// two vector accumulators (even and odd blocks, so consecutive fused
/// multiply-adds do not wait on each other) and one final horizontal sum —
/// so a row gives the same bits alone or in any batch.
macro_rules! row_kernel {
    ($name:ident, $features:literal, $elem:ty, $block_bytes:expr, |$p:ident| $unpack:expr, |$w:ident, $v:ident| $dot:expr) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $name<const R: usize>(d: &[f32], qs: &[$elem], xs: &[Q8Row], out: &mut [f32]) {
            use std::arch::x86_64::*;
            debug_assert!(xs.len() == R && out.len() >= R && qs.len() >= d.len() * $block_bytes);
            let blocks = d.len();
            let q8: [*const i8; R] = std::array::from_fn(|t| xs[t].qs.as_ptr());
            let dx: [*const f32; R] = std::array::from_fn(|t| xs[t].d.as_ptr());
            let mut even = [_mm256_setzero_ps(); R];
            let mut odd = [_mm256_setzero_ps(); R];
            let mut b = 0;
            while b < blocks {
                let pair = b + 1 < blocks;
                let w0: __m256i = {
                    let $p = qs.as_ptr().add(b * $block_bytes);
                    $unpack
                };
                let w1: __m256i = if pair {
                    let $p = qs.as_ptr().add((b + 1) * $block_bytes);
                    $unpack
                } else {
                    _mm256_setzero_si256()
                };
                // The weight scales, once per block for every activation row.
                let d0 = _mm256_set1_ps(d[b]);
                let d1 = if pair { _mm256_set1_ps(d[b + 1]) } else { _mm256_setzero_ps() };
                for t in 0..R {
                    let v = _mm256_loadu_si256(q8[t].add(b * super::q8::BLOCK) as *const __m256i);
                    let dot: __m256i = {
                        let ($w, $v) = (w0, v);
                        $dot
                    };
                    let scaled = _mm256_mul_ps(_mm256_cvtepi32_ps(dot), d0);
                    even[t] = _mm256_fmadd_ps(scaled, _mm256_broadcast_ss(&*dx[t].add(b)), even[t]);
                    if pair {
                        let v = _mm256_loadu_si256(q8[t].add((b + 1) * super::q8::BLOCK) as *const __m256i);
                        let dot: __m256i = {
                            let ($w, $v) = (w1, v);
                            $dot
                        };
                        let scaled = _mm256_mul_ps(_mm256_cvtepi32_ps(dot), d1);
                        odd[t] = _mm256_fmadd_ps(scaled, _mm256_broadcast_ss(&*dx[t].add(b + 1)), odd[t]);
                    }
                }
                b += 2;
            }
            for t in 0..R {
                out[t] = super::hsum(_mm256_add_ps(even[t], odd[t]));
            }
        }
    };
}

// Signed × signed through the unsigned × signed instructions: |w| times x
// carrying w's sign (activations stay within ±127, so negation is exact).
macro_rules! load_q8 {
    ($p:expr) => {
        _mm256_loadu_si256($p as *const __m256i)
    };
}
row_kernel!(dot_avx2, "avx2,fma", i8, BLOCK, |p| load_q8!(p), |w, v| super::udot_avx2(
    _mm256_sign_epi8(w, w),
    _mm256_sign_epi8(v, w)
));
row_kernel!(dot_vnni, "avx2,fma,avx512vnni,avx512vl", i8, BLOCK, |p| load_q8!(p), |w, v| super::udot_vnni(
    _mm256_sign_epi8(w, w),
    _mm256_sign_epi8(v, w)
));

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix(rows: usize, cols: usize) -> Q8_0Matrix {
        let mut bytes = Vec::new();
        for b in 0..rows * cols / BLOCK {
            bytes.extend_from_slice(&f16::from_f32(0.002 + (b % 5) as f32 * 0.001).to_le_bytes());
            bytes.extend((0..BLOCK).map(|j| ((b * 37 + j * 11) % 256) as u8));
        }
        Q8_0Matrix::from_gguf_bytes(&bytes, rows, cols).expect("valid")
    }

    #[test]
    fn every_isa_matches_dequantized_math() {
        let (rows, cols) = (70, 192);
        let w = matrix(rows, cols);
        let dense = w.dequantize();
        let x: Vec<Vec<f32>> =
            (0..10).map(|t| (0..cols).map(|k| ((t * cols + k) as f32 * 0.21).cos()).collect()).collect();
        let q: Vec<Q8Row> = x.iter().map(|r| Q8Row::quantize(r)).collect();
        let scalar = w.matmul(&q, Isa::Scalar);
        for t in 0..10 {
            for o in 0..rows {
                let exact: f32 = (0..cols).map(|k| dense[o * cols + k] * x[t][k]).sum();
                // Rounding each activation moves it by at most half a step (d/2, d ≤ 1/127).
                let bound: f32 = (0..cols).map(|k| dense[o * cols + k].abs() * 0.5 / 127.0).sum();
                assert!((scalar[t * rows + o] - exact).abs() <= bound, "{} vs {exact}", scalar[t * rows + o]);
            }
        }
        for isa in super::super::available() {
            let fast = w.matmul(&q, isa);
            for (a, b) in scalar.iter().zip(&fast) {
                assert!((a - b).abs() <= 1e-4 * a.abs().max(1.0), "{a} vs {b} ({isa:?})");
            }
        }
    }
}
