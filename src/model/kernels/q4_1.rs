//! Q4_1 weights × Q8 activations. A Q4_1 block holds 32 weights as 4-bit
//! values `q` with a scale `d` and an offset `m` (weight = d·q + m), so
//! `Σ w·x ≈ d·dx·Σ q·qx + m·sx` per block: an integer dot product plus one
//! multiply-add.

use half::f16;

use super::q8::{Q8Row, BLOCK};
use super::Isa;

/// Bytes of one GGUF Q4_1 block: d (f16), m (f16), 16 bytes of nibbles.
pub const BLOCK_BYTES: usize = 20;

/// A Q4_1 matrix `[rows, cols]` unpacked for the kernel: scales and offsets
/// as f32, nibbles as stored (low nibble = element j, high = element j+16).
#[derive(Debug, Clone)]
pub struct Q4_1Matrix {
    rows: usize,
    cols: usize,
    d: Vec<f32>,
    m: Vec<f32>,
    qs: Vec<u8>,
}

impl Q4_1Matrix {
    /// From raw GGUF block bytes, row-major.
    pub fn from_gguf_bytes(bytes: &[u8], rows: usize, cols: usize) -> Option<Self> {
        if !cols.is_multiple_of(BLOCK) || bytes.len() != rows * cols / BLOCK * BLOCK_BYTES {
            return None;
        }
        let blocks = rows * cols / BLOCK;
        let mut d = Vec::with_capacity(blocks);
        let mut m = Vec::with_capacity(blocks);
        let mut qs = Vec::with_capacity(blocks * 16);
        for block in bytes.chunks_exact(BLOCK_BYTES) {
            d.push(f16::from_le_bytes([block[0], block[1]]).to_f32());
            m.push(f16::from_le_bytes([block[2], block[3]]).to_f32());
            qs.extend_from_slice(&block[4..20]);
        }
        Some(Self { rows, cols, d, m, qs })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Dequantized weights (tests and tools).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for b in 0..self.d.len() {
            let q = &self.qs[b * 16..(b + 1) * 16];
            let (d, m) = (self.d[b], self.m[b]);
            out.extend(q.iter().map(|v| d * (v & 0xF) as f32 + m));
            out.extend(q.iter().map(|v| d * (v >> 4) as f32 + m));
        }
        out
    }

    /// `y[t][o] = Σ_k w[o][k] · x[t][k]` for every activation row `t`.
    /// Each weight row is read once for up to eight activation rows; rows of
    /// the output are split over the rayon pool.
    pub fn matmul(&self, x: &[Q8Row], isa: Isa) -> Vec<f32> {
        super::matmul_rows(self.rows, x, |o, xs, out| self.dot_row(o, xs, out, isa))
    }

    /// `matmul` of several matrices over the same activations, in one
    /// parallel region; each result as `matmul` gives it.
    pub fn matmul_many(matrices: &[&Q4_1Matrix], x: &[Q8Row], isa: Isa) -> Vec<Vec<f32>> {
        let rows: Vec<usize> = matrices.iter().map(|w| w.rows).collect();
        super::matmul_rows_many(&rows, x, |m, o, xs, out| matrices[m].dot_row(o, xs, out, isa))
    }

    /// Weight row `o` against at most eight activation rows.
    fn dot_row(&self, o: usize, xs: &[Q8Row], out: &mut [f32], isa: Isa) {
        let blocks = self.cols / BLOCK;
        let first = o * blocks;
        let d = &self.d[first..first + blocks];
        let m = &self.m[first..first + blocks];
        let qs = &self.qs[first * 16..(first + blocks) * 16];
        match isa {
            // SAFETY: each ISA is only chosen when the CPU reports its features.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => super::by_count!(xs.len(), |R| unsafe { dot_avx2::<R>(d, m, qs, xs, out) }),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => super::by_count!(xs.len(), |R| unsafe { dot_vnni::<R>(d, m, qs, xs, out) }),
            Isa::Scalar => {
                for (xr, o) in xs.iter().zip(out.iter_mut()) {
                    *o = dot_scalar(d, m, qs, xr);
                }
            }
        }
    }
}

/// The reference: block by block, integer dot then scale.
pub fn dot_scalar(d: &[f32], m: &[f32], qs: &[u8], x: &Q8Row) -> f32 {
    let mut sum = 0f32;
    for b in 0..d.len() {
        let q = &qs[b * 16..(b + 1) * 16];
        let xq = &x.qs[b * BLOCK..(b + 1) * BLOCK];
        let mut isum = 0i32;
        for j in 0..16 {
            isum += (q[j] & 0xF) as i32 * xq[j] as i32;
            isum += (q[j] >> 4) as i32 * xq[j + 16] as i32;
        }
        sum = (isum as f32).mul_add(d[b] * x.d[b], sum);
        sum = m[b].mul_add(x.s[b], sum);
    }
    sum
}

// 16 bytes of nibbles → 32 unsigned values: low nibbles, then high.
macro_rules! unpack_q4 {
    ($p:expr) => {{
        let packed = _mm_loadu_si128($p as *const __m128i);
        _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), _mm256_set1_epi8(0x0F))
    }};
}
super::row_kernel!(dot_avx2, "avx2,fma", u8, 16, |p| unpack_q4!(p), |w, v| super::udot_avx2(w, v));
super::row_kernel!(dot_vnni, "avx2,fma,avx512vnni,avx512vl", u8, 16, |p| unpack_q4!(p), |w, v| super::udot_vnni(w, v));

#[cfg(test)]
mod tests {
    use super::*;

    /// A random-looking Q4_1 matrix, as GGUF bytes.
    fn matrix(rows: usize, cols: usize) -> Q4_1Matrix {
        let mut bytes = Vec::new();
        for b in 0..rows * cols / BLOCK {
            let d = f16::from_f32(0.01 + (b % 7) as f32 * 0.003);
            let m = f16::from_f32(-0.05 + (b % 5) as f32 * 0.01);
            bytes.extend_from_slice(&d.to_le_bytes());
            bytes.extend_from_slice(&m.to_le_bytes());
            bytes.extend((0..16).map(|j| ((b * 31 + j * 17) % 256) as u8));
        }
        Q4_1Matrix::from_gguf_bytes(&bytes, rows, cols).expect("valid matrix")
    }

    fn activations(tokens: usize, cols: usize) -> Vec<Vec<f32>> {
        (0..tokens).map(|t| (0..cols).map(|k| ((t * cols + k) as f32 * 0.37).sin() * 2.0).collect()).collect()
    }

    #[test]
    fn kernel_matches_dequantized_math() {
        let (rows, cols) = (48, 128);
        let w = matrix(rows, cols);
        let dense = w.dequantize();
        let x = activations(3, cols);
        let q: Vec<Q8Row> = x.iter().map(|r| Q8Row::quantize(r)).collect();
        let y = w.matmul(&q, Isa::Scalar);
        for t in 0..3 {
            for o in 0..rows {
                let exact: f32 = (0..cols).map(|k| dense[o * cols + k] * x[t][k]).sum();
                // Activation quantization error only: |x| ≤ 2, 8-bit blocks.
                assert!((y[t * rows + o] - exact).abs() < 0.05, "t{t} o{o}: {} vs {exact}", y[t * rows + o]);
            }
        }
    }

    #[test]
    fn simd_equals_scalar() {
        let (rows, cols) = (40, 576);
        let w = matrix(rows, cols);
        // 11 rows: one full chunk of 8 and a partial one.
        let q: Vec<Q8Row> = activations(11, cols).iter().map(|r| Q8Row::quantize(r)).collect();
        let scalar = w.matmul(&q, Isa::Scalar);
        for isa in super::super::available() {
            let fast = w.matmul(&q, isa);
            for (a, b) in scalar.iter().zip(&fast) {
                // Same integer sums; only the f32 accumulation order differs.
                assert!((a - b).abs() <= 1e-4 * a.abs().max(1.0), "{a} vs {b} ({isa:?})");
            }
        }
    }

    #[test]
    fn a_row_gives_the_same_bits_alone_and_in_a_batch() {
        // Decode (fewer than 8 rows) and prefill (chunks of 8) paths agree bit for bit.
        let w = matrix(32, 256);
        let q: Vec<Q8Row> = activations(13, 256).iter().map(|r| Q8Row::quantize(r)).collect();
        for isa in super::super::available() {
            let batch = w.matmul(&q, isa);
            for t in [0, 2, 7, 9, 12] {
                let alone = w.matmul(&q[t..t + 1], isa);
                assert_eq!(&batch[t * 32..(t + 1) * 32], alone.as_slice(), "row {t} ({isa:?})");
            }
        }
    }

    #[test]
    fn matrices_sharing_a_region_give_what_each_gives_alone() {
        let (a, b) = (matrix(24, 256), matrix(72, 256));
        let q: Vec<Q8Row> = activations(9, 256).iter().map(|r| Q8Row::quantize(r)).collect();
        for isa in super::super::available() {
            let both = Q4_1Matrix::matmul_many(&[&a, &b], &q, isa);
            assert_eq!(both, vec![a.matmul(&q, isa), b.matmul(&q, isa)], "{isa:?}");
        }
    }
}
