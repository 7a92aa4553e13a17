//! Q4_1 weights × Q8 activations. A Q4_1 block holds 32 weights as 4-bit
//! values `q` with a scale `d` and an offset `m` (weight = d·q + m), so
//! `Σ w·x ≈ d·dx·Σ q·qx + m·sx` per block: an integer dot product plus one
//! multiply-add.

use half::f16;
use rayon::prelude::*;

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
    /// Each weight row is read once for all activation rows; rows of the
    /// output are split over the rayon pool.
    pub fn matmul(&self, x: &[Q8Row], isa: Isa) -> Vec<f32> {
        let tokens = x.len();
        if tokens == 0 {
            return Vec::new();
        }
        let mut y_t = vec![0f32; self.rows * tokens]; // [rows, tokens]
        const CHUNK: usize = 16;
        y_t.par_chunks_mut(CHUNK * tokens).enumerate().for_each(|(chunk, out)| {
            for (i, out_row) in out.chunks_mut(tokens).enumerate() {
                let o = chunk * CHUNK + i;
                self.dot_row(o, x, out_row, isa);
            }
        });
        // → [tokens, rows]
        let mut y = vec![0f32; tokens * self.rows];
        for o in 0..self.rows {
            for t in 0..tokens {
                y[t * self.rows + o] = y_t[o * tokens + t];
            }
        }
        y
    }

    fn dot_row(&self, o: usize, x: &[Q8Row], out: &mut [f32], isa: Isa) {
        let blocks = self.cols / BLOCK;
        let first = o * blocks;
        let d = &self.d[first..first + blocks];
        let m = &self.m[first..first + blocks];
        let qs = &self.qs[first * 16..(first + blocks) * 16];
        for (xs, out) in x.chunks(TOKEN_CHUNK).zip(out.chunks_mut(TOKEN_CHUNK)) {
            match isa {
                // SAFETY: each ISA is only chosen when the CPU reports its features.
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 if xs.len() == TOKEN_CHUNK => unsafe { dot8_avx2(d, m, qs, xs, out) },
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512Vnni if xs.len() == TOKEN_CHUNK => unsafe { dot8_vnni(d, m, qs, xs, out) },
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => unsafe { dot_avx2(d, m, qs, xs, out) },
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512Vnni => unsafe { dot_vnni(d, m, qs, xs, out) },
                Isa::Scalar => {
                    for (xr, o) in xs.iter().zip(out.iter_mut()) {
                        *o = dot_scalar(d, m, qs, xr);
                    }
                }
            }
        }
    }
}

/// Activation rows that share one unpacking of each weight block.
const TOKEN_CHUNK: usize = 8;

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

/// One weight row against fewer than eight activation rows (decode): the
/// integer block sum is reduced to a scalar, then scaled with the very same
/// fused multiply-adds, in the same order, as each lane of `dot8_rows` — so a
/// row gives the same bits whatever batch it is in.
macro_rules! dot_rows {
    ($name:ident, $features:literal, $idot:expr) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $name(d: &[f32], m: &[f32], qs: &[u8], xs: &[Q8Row], out: &mut [f32]) {
            use std::arch::x86_64::*;
            let low_mask = _mm256_set1_epi8(0x0F);
            let mut acc = [0f32; TOKEN_CHUNK];
            for b in 0..d.len() {
                // 16 bytes of nibbles → 32 unsigned values: low nibbles, then high.
                let packed = _mm_loadu_si128(qs.as_ptr().add(b * 16) as *const __m128i);
                let q4 = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), low_mask);
                for (i, x) in xs.iter().enumerate() {
                    let q8 = _mm256_loadu_si256(x.qs.as_ptr().add(b * BLOCK) as *const __m256i);
                    let isum = hsum_i32($idot(q4, q8));
                    acc[i] = (isum as f32).mul_add(d[b] * x.d[b], acc[i]);
                    acc[i] = m[b].mul_add(x.s[b], acc[i]);
                }
            }
            out[..xs.len()].copy_from_slice(&acc[..xs.len()]);
        }
    };
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn hsum_i32(v: std::arch::x86_64::__m256i) -> i32 {
    use std::arch::x86_64::*;
    let sum4 = _mm_add_epi32(_mm256_extracti128_si256(v, 1), _mm256_castsi256_si128(v));
    let sum2 = _mm_add_epi32(sum4, _mm_unpackhi_epi64(sum4, sum4));
    _mm_cvtsi128_si32(_mm_add_epi32(sum2, _mm_shuffle_epi32(sum2, 1)))
}

/// Eight activation rows at once (prefill): the eight integer block sums are
/// reduced into one vector (lane t = row t), so scales and offsets are
/// applied with two vector FMAs per block instead of per row.
macro_rules! dot8_rows {
    ($name:ident, $features:literal, $idot:expr) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $name(d: &[f32], m: &[f32], qs: &[u8], xs: &[Q8Row], out: &mut [f32]) {
            use std::arch::x86_64::*;
            debug_assert_eq!(xs.len(), 8);
            let low_mask = _mm256_set1_epi8(0x0F);
            let q8: [*const i8; 8] = std::array::from_fn(|t| xs[t].qs.as_ptr());
            let dx: [*const f32; 8] = std::array::from_fn(|t| xs[t].d.as_ptr());
            let sx: [*const f32; 8] = std::array::from_fn(|t| xs[t].s.as_ptr());
            let mut acc = _mm256_setzero_ps();
            for b in 0..d.len() {
                let packed = _mm_loadu_si128(qs.as_ptr().add(b * 16) as *const __m128i);
                let q4 = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), low_mask);
                let dot = |t: usize| -> __m256i {
                    let v = _mm256_loadu_si256(q8[t].add(b * BLOCK) as *const __m256i);
                    $idot(q4, v)
                };
                let (v0, v1, v2, v3) = (dot(0), dot(1), dot(2), dot(3));
                let (v4, v5, v6, v7) = (dot(4), dot(5), dot(6), dot(7));
                // Lane t of `sums` = Σ of row t's eight partial sums.
                let s0123 = _mm256_hadd_epi32(_mm256_hadd_epi32(v0, v1), _mm256_hadd_epi32(v2, v3));
                let s4567 = _mm256_hadd_epi32(_mm256_hadd_epi32(v4, v5), _mm256_hadd_epi32(v6, v7));
                let sums = _mm256_add_epi32(
                    _mm256_permute2x128_si256(s0123, s4567, 0x20),
                    _mm256_permute2x128_si256(s0123, s4567, 0x31),
                );
                let scales = _mm256_mul_ps(
                    _mm256_set1_ps(d[b]),
                    _mm256_setr_ps(
                        *dx[0].add(b),
                        *dx[1].add(b),
                        *dx[2].add(b),
                        *dx[3].add(b),
                        *dx[4].add(b),
                        *dx[5].add(b),
                        *dx[6].add(b),
                        *dx[7].add(b),
                    ),
                );
                let offsets = _mm256_setr_ps(
                    *sx[0].add(b),
                    *sx[1].add(b),
                    *sx[2].add(b),
                    *sx[3].add(b),
                    *sx[4].add(b),
                    *sx[5].add(b),
                    *sx[6].add(b),
                    *sx[7].add(b),
                );
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scales, acc);
                acc = _mm256_fmadd_ps(_mm256_set1_ps(m[b]), offsets, acc);
            }
            _mm256_storeu_ps(out.as_mut_ptr(), acc);
        }
    };
}

dot8_rows!(dot8_avx2, "avx2,fma", |q4, q8| {
    use std::arch::x86_64::*;
    _mm256_madd_epi16(_mm256_maddubs_epi16(q4, q8), _mm256_set1_epi16(1))
});
dot8_rows!(dot8_vnni, "avx2,fma,avx512vnni,avx512vl", |q4, q8| {
    use std::arch::x86_64::*;
    _mm256_dpbusd_epi32(_mm256_setzero_si256(), q4, q8)
});

// u8 × i8 in pairs to i16, then to i32 (no overflow: 15·127·2 < 2^15).
dot_rows!(dot_avx2, "avx2,fma", |q4, q8| {
    use std::arch::x86_64::*;
    _mm256_madd_epi16(_mm256_maddubs_epi16(q4, q8), _mm256_set1_epi16(1))
});
// One instruction for the same four-way u8 × i8 sums.
dot_rows!(dot_vnni, "avx2,fma,avx512vnni,avx512vl", |q4, q8| {
    use std::arch::x86_64::*;
    _mm256_dpbusd_epi32(_mm256_setzero_si256(), q4, q8)
});

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn hsum(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let sum4 = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
    let sum2 = _mm_add_ps(sum4, _mm_movehl_ps(sum4, sum4));
    _mm_cvtss_f32(_mm_add_ss(sum2, _mm_shuffle_ps(sum2, sum2, 1)))
}

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
}
