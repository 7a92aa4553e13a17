//! Q6_K weights × Q8 activations. A 256-value super-block holds `d` (f16)
//! and a signed 8-bit scale per 16 values; values are 6-bit, `w = d·sc·(q −
//! 32)`. Two scales fall in each 32-value activation block, so the integer
//! dot applies them itself: `Σ sc·(q − 32)·qx` per block in i32 lanes, then
//! one multiply by `d·dx`. Values are repacked at load per 32: 16 bytes of
//! low nibbles (as `offset::Nibbles`) and 8 bytes of the high two bits
//! (element e at byte e mod 8, bits 2·(e div 8)), 6.6 bits a weight as in
//! the file.

use candle_core::quantized::GgmlDType;
use half::f16;

use super::q8::{Q8Row, BLOCK};
use super::{Isa, QuantMatrix};

const QK_K: usize = 256;
/// Packed bytes per 32 values.
const PACKED: usize = 24;
const GGUF_BLOCK_BYTES: usize = 210;

#[derive(Debug, Clone)]
pub struct Q6KMatrix {
    rows: usize,
    cols: usize,
    /// Per super-block.
    d: Vec<f32>,
    /// Per 16 values.
    scales: Vec<i8>,
    /// Per 32 values, `PACKED` bytes.
    qs: Vec<u8>,
}

/// The 32 values (0..63) of a packed block.
fn unpack(p: &[u8]) -> [u8; BLOCK] {
    std::array::from_fn(|e| {
        let low = if e < 16 { p[e] & 0xF } else { p[e - 16] >> 4 };
        let high = (p[16 + e % 8] >> (2 * (e / 8))) & 3;
        low | (high << 4)
    })
}

fn pack(v: &[u8; BLOCK], out: &mut Vec<u8>) {
    out.extend((0..16).map(|e| (v[e] & 0xF) | ((v[e + 16] & 0xF) << 4)));
    let mut high = [0u8; 8];
    for (e, &x) in v.iter().enumerate() {
        high[e % 8] |= (x >> 4) << (2 * (e / 8));
    }
    out.extend_from_slice(&high);
}

impl Q6KMatrix {
    pub fn from_gguf(dtype: GgmlDType, bytes: &[u8], rows: usize, cols: usize) -> Option<Self> {
        if dtype != GgmlDType::Q6K || !cols.is_multiple_of(QK_K) || bytes.len() != rows * cols / QK_K * GGUF_BLOCK_BYTES
        {
            return None;
        }
        let supers = rows * cols / QK_K;
        let mut m = Self {
            rows,
            cols,
            d: Vec::with_capacity(supers),
            scales: Vec::with_capacity(supers * 16),
            qs: Vec::with_capacity(supers * 8 * PACKED),
        };
        for block in bytes.chunks_exact(GGUF_BLOCK_BYTES) {
            let (ql, qh, sc) = (&block[..128], &block[128..192], &block[192..208]);
            m.d.push(f16::from_le_bytes([block[208], block[209]]).to_f32());
            m.scales.extend(sc.iter().map(|&s| s as i8));
            // ggml's order: per 128 values, element n·128 + k·32 + l takes its
            // low nibble from ql (byte l or l + 32, low or high half) and its
            // high bits from qh[l] at bits 2k (ggml's dequantize_row_q6_K).
            let mut values = [0u8; QK_K];
            for n in 0..2 {
                let (ql, qh) = (&ql[n * 64..n * 64 + 64], &qh[n * 32..n * 32 + 32]);
                for l in 0..32 {
                    let high = |k: usize| (qh[l] >> (2 * k)) & 3;
                    values[n * 128 + l] = (ql[l] & 0xF) | (high(0) << 4);
                    values[n * 128 + 32 + l] = (ql[l + 32] & 0xF) | (high(1) << 4);
                    values[n * 128 + 64 + l] = (ql[l] >> 4) | (high(2) << 4);
                    values[n * 128 + 96 + l] = (ql[l + 32] >> 4) | (high(3) << 4);
                }
            }
            for chunk in values.chunks_exact(BLOCK) {
                pack(&std::array::from_fn(|e| chunk[e]), &mut m.qs);
            }
        }
        Some(m)
    }
}

impl QuantMatrix for Q6KMatrix {
    fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    fn bytes(&self) -> usize {
        self.d.len() * 4 + self.scales.len() + self.qs.len()
    }

    fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for b in 0..self.qs.len() / PACKED {
            let q = unpack(&self.qs[b * PACKED..(b + 1) * PACKED]);
            let d = self.d[b * BLOCK / QK_K];
            for (e, &v) in q.iter().enumerate() {
                // ggml: d · sc (f32), then times the signed value.
                out.push(d * self.scales[2 * b + e / 16] as f32 * (v as i32 - 32) as f32);
            }
        }
        out
    }

    fn dot_row(&self, o: usize, xs: &[Q8Row], out: &mut [f32], isa: Isa) {
        let blocks = self.cols / BLOCK;
        let first = o * blocks;
        let d = &self.d[first * BLOCK / QK_K..(first + blocks) * BLOCK / QK_K];
        let scales = &self.scales[2 * first..2 * (first + blocks)];
        let qs = &self.qs[first * PACKED..(first + blocks) * PACKED];
        match isa {
            // SAFETY: each ISA is only chosen when the CPU reports its features
            // (VNNI implies AVX2; the scaled dot has no VNNI form).
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 | Isa::Avx512Vnni => {
                super::by_count!(xs.len(), |R| unsafe { dot_avx2::<R>(d, scales, qs, xs, out) })
            }
            Isa::Scalar => {
                for (x, o) in xs.iter().zip(out.iter_mut()) {
                    *o = dot_scalar(d, scales, qs, x);
                }
            }
        }
    }
}

/// The reference: per 32 values, `Σ sc·(q − 32)·qx` in integers, then `d·dx`.
fn dot_scalar(d: &[f32], scales: &[i8], qs: &[u8], x: &Q8Row) -> f32 {
    let mut sum = 0f32;
    for b in 0..qs.len() / PACKED {
        let q = unpack(&qs[b * PACKED..(b + 1) * PACKED]);
        let xq = &x.qs[b * BLOCK..(b + 1) * BLOCK];
        let isum: i32 = (0..BLOCK).map(|e| scales[2 * b + e / 16] as i32 * (q[e] as i32 - 32) * xq[e] as i32).sum();
        sum = (isum as f32).mul_add(d[b * BLOCK / QK_K] * x.d[b], sum);
    }
    sum
}

/// One weight row against `R` activation rows; each row's accumulation is
/// the same whatever `R` is (batch invariance), as in `row_kernel!`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2<const R: usize>(d: &[f32], scales: &[i8], qs: &[u8], xs: &[Q8Row], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let blocks = qs.len() / PACKED;
    debug_assert!(xs.len() == R && scales.len() == 2 * blocks);
    let mut acc = [_mm256_setzero_ps(); R];
    let low_mask = _mm256_set1_epi8(0x0F);
    let two_bits = _mm256_set1_epi8(0x03);
    let shifts = _mm256_setr_epi64x(0, 2, 4, 6);
    let thirty_two = _mm256_set1_epi8(32);
    for b in 0..blocks {
        let p = qs.as_ptr().add(b * PACKED);
        let packed = _mm_loadu_si128(p as *const __m128i);
        let low = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), low_mask);
        // Byte lane e holds byte e mod 8 of the high bits; shifting its 64-bit
        // lane by 2·(e div 8) brings element e's pair to the bottom.
        let high = _mm256_srlv_epi64(_mm256_set1_epi64x(std::ptr::read_unaligned(p.add(16) as *const i64)), shifts);
        let w = _mm256_or_si256(low, _mm256_slli_epi16(_mm256_and_si256(high, two_bits), 4));
        let sc = _mm256_set_m128i(_mm_set1_epi16(scales[2 * b + 1] as i16), _mm_set1_epi16(scales[2 * b] as i16));
        let db = _mm256_set1_ps(d[b * BLOCK / QK_K]);
        for t in 0..R {
            let v = _mm256_loadu_si256(xs[t].qs.as_ptr().add(b * BLOCK) as *const __m256i);
            // Pairs of q·x and 32·x in i16 (|63·127·2| and |32·127·2| fit), their
            // difference times the half-block's scale summed into i32 lanes.
            let centered = _mm256_sub_epi16(_mm256_maddubs_epi16(w, v), _mm256_maddubs_epi16(thirty_two, v));
            let dot = _mm256_madd_epi16(centered, sc);
            let scaled = _mm256_mul_ps(_mm256_cvtepi32_ps(dot), db);
            acc[t] = _mm256_fmadd_ps(scaled, _mm256_broadcast_ss(&xs[t].d[b]), acc[t]);
        }
    }
    for t in 0..R {
        out[t] = super::hsum(acc[t]);
    }
}
