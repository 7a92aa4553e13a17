//! Weights stored as small unsigned integers with a per-block scale and
//! offset, `w = d·q + m`, against Q8 activations: `Σ w·x ≈ d·dx·Σ q·qx +
//! m·sx` per block of 32, an integer dot product plus one multiply-add.
//! One kernel serves four GGML types, differing only in how `q` is packed:
//! Q4_1 (`m` stored), Q4_0 (`q - 8`, so `m = -8d`) in nibbles, and Q5_1,
//! Q5_0 (`m = -16d`) with a fifth bit per value — the types llama.cpp falls
//! back to for matrices whose rows are not a multiple of 256 (SmolLM2,
//! Qwen2.5-0.5B in Q4_K_M files).

use std::marker::PhantomData;

use candle_core::quantized::GgmlDType;
use half::f16;

use super::q8::{Q8Row, BLOCK};
use super::{Isa, QuantMatrix, Rows};

/// How the 32 `q` values of a block are packed.
pub trait Packing: Send + Sync + std::fmt::Debug + 'static {
    /// Packed bytes per block (after the scales).
    const BYTES: usize;
    /// The 32 values of a packed block, in element order.
    fn unpack(packed: &[u8]) -> [u8; BLOCK];
    /// Weight row (`d`, `m`, packed `qs`) against ≤ 8 activation rows.
    fn dot_row(d: &[f32], m: &[f32], qs: &[u8], xs: &[Q8Row], out: &mut [f32], isa: Isa);
}

/// 4-bit values, two per byte: low nibble = element j, high = element j+16.
#[derive(Debug)]
pub struct Nibbles;

/// 4-bit values as in `Nibbles`, then 4 bytes holding the fifth bit of each
/// element (bit j = element j).
#[derive(Debug)]
pub struct FiveBits;

/// An offset-format matrix `[rows, cols]` unpacked for the kernel: scales and
/// offsets as f32, values as packed.
#[derive(Debug, Clone)]
pub struct OffsetMatrix<P: Packing> {
    rows: usize,
    cols: usize,
    d: Vec<f32>,
    m: Vec<f32>,
    qs: Vec<u8>,
    packing: PhantomData<P>,
}

pub type Q4Matrix = OffsetMatrix<Nibbles>;
pub type Q5Matrix = OffsetMatrix<FiveBits>;

/// Bytes of one GGUF Q4_1 block: d (f16), m (f16), 16 bytes of nibbles.
pub const Q4_1_BLOCK_BYTES: usize = 20;

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

impl<P: Packing> OffsetMatrix<P> {
    /// From raw GGUF block bytes of `dtype`, row-major; `None` if the type
    /// is not one this packing reads or the sizes do not fit.
    pub fn from_gguf(dtype: GgmlDType, bytes: &[u8], rows: usize, cols: usize) -> Option<Self> {
        // (block bytes, whether m is stored, the offset in units of d otherwise)
        let (block_bytes, stored_m, offset) = match (P::BYTES, dtype) {
            (16, GgmlDType::Q4_0) => (18, false, -8.0),
            (16, GgmlDType::Q4_1) => (20, true, 0.0),
            (20, GgmlDType::Q5_0) => (22, false, -16.0),
            (20, GgmlDType::Q5_1) => (24, true, 0.0),
            _ => return None,
        };
        if !cols.is_multiple_of(BLOCK) || bytes.len() != rows * cols / BLOCK * block_bytes {
            return None;
        }
        let blocks = rows * cols / BLOCK;
        let mut d = Vec::with_capacity(blocks);
        let mut m = Vec::with_capacity(blocks);
        let mut qs = Vec::with_capacity(blocks * P::BYTES);
        for block in bytes.chunks_exact(block_bytes) {
            let scale = f16_at(block, 0);
            d.push(scale);
            let header = if stored_m { 4 } else { 2 };
            m.push(if stored_m { f16_at(block, 2) } else { offset * scale });
            // GGUF puts Q5's fifth bits before the nibbles; we keep them after.
            match P::BYTES {
                20 => {
                    qs.extend_from_slice(&block[header + 4..header + 20]);
                    qs.extend_from_slice(&block[header..header + 4]);
                }
                _ => qs.extend_from_slice(&block[header..header + 16]),
            }
        }
        Some(Self { rows, cols, d, m, qs, packing: PhantomData })
    }

    /// `y[t][o] = Σ_k w[o][k] · x[t][k]` for every activation row `t`.
    pub fn matmul(&self, x: &[Q8Row], isa: Isa) -> Vec<f32> {
        super::matmul(self, &super::Activations::q8(x), isa)
    }
}

impl<P: Packing> QuantMatrix for OffsetMatrix<P> {
    fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    fn bytes(&self) -> usize {
        (self.d.len() + self.m.len()) * 4 + self.qs.len()
    }

    fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for b in 0..self.d.len() {
            let q = P::unpack(&self.qs[b * P::BYTES..(b + 1) * P::BYTES]);
            out.extend(q.iter().map(|&v| self.d[b] * v as f32 + self.m[b]));
        }
        out
    }

    fn dot_row(&self, o: usize, xs: Rows<'_>, out: &mut [f32], isa: Isa) {
        let xs = xs.q8();
        let blocks = self.cols / BLOCK;
        let first = o * blocks;
        let d = &self.d[first..first + blocks];
        let m = &self.m[first..first + blocks];
        let qs = &self.qs[first * P::BYTES..(first + blocks) * P::BYTES];
        P::dot_row(d, m, qs, xs, out, isa)
    }
}

/// The reference: block by block, integer dot then scale and offset.
pub fn dot_scalar<P: Packing>(d: &[f32], m: &[f32], qs: &[u8], x: &Q8Row) -> f32 {
    let mut sum = 0f32;
    for b in 0..d.len() {
        let q = P::unpack(&qs[b * P::BYTES..(b + 1) * P::BYTES]);
        let xq = &x.qs[b * BLOCK..(b + 1) * BLOCK];
        let isum: i32 = q.iter().zip(xq).map(|(&w, &v)| w as i32 * v as i32).sum();
        sum = (isum as f32).mul_add(d[b] * x.d[b], sum);
        sum = m[b].mul_add(x.s[b], sum);
    }
    sum
}

/// Dispatches a packing's row to its kernel for the ISA in use.
macro_rules! dispatch {
    ($d:expr, $m:expr, $qs:expr, $xs:expr, $out:expr, $isa:expr, $packing:ty, $avx2:ident, $vnni:ident) => {
        match $isa {
            // SAFETY: each ISA is only chosen when the CPU reports its features.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => super::by_count!($xs.len(), |R| unsafe { $avx2::<R>($d, $m, $qs, $xs, $out) }),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => super::by_count!($xs.len(), |R| unsafe { $vnni::<R>($d, $m, $qs, $xs, $out) }),
            Isa::Scalar => {
                for (xr, o) in $xs.iter().zip($out.iter_mut()) {
                    *o = dot_scalar::<$packing>($d, $m, $qs, xr);
                }
            }
        }
    };
}

impl Packing for Nibbles {
    const BYTES: usize = 16;

    fn unpack(packed: &[u8]) -> [u8; BLOCK] {
        std::array::from_fn(|e| if e < 16 { packed[e] & 0xF } else { packed[e - 16] >> 4 })
    }

    fn dot_row(d: &[f32], m: &[f32], qs: &[u8], xs: &[Q8Row], out: &mut [f32], isa: Isa) {
        dispatch!(d, m, qs, xs, out, isa, Nibbles, dot_q4_avx2, dot_q4_vnni)
    }
}

impl Packing for FiveBits {
    const BYTES: usize = 20;

    fn unpack(packed: &[u8]) -> [u8; BLOCK] {
        let high = u32::from_le_bytes([packed[16], packed[17], packed[18], packed[19]]);
        let low = Nibbles::unpack(&packed[..16]);
        std::array::from_fn(|e| low[e] | (((high >> e) & 1) as u8) << 4)
    }

    fn dot_row(d: &[f32], m: &[f32], qs: &[u8], xs: &[Q8Row], out: &mut [f32], isa: Isa) {
        dispatch!(d, m, qs, xs, out, isa, FiveBits, dot_q5_avx2, dot_q5_vnni)
    }
}

// 16 bytes of nibbles → 32 unsigned values: low nibbles, then high.
macro_rules! unpack_q4 {
    ($p:expr) => {{
        let packed = _mm_loadu_si128($p as *const __m128i);
        _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), _mm256_set1_epi8(0x0F))
    }};
}
// Nibbles, then each element's fifth bit from the u32 after them: every
// byte lane picks its source byte of the u32, keeps its own bit, and turns
// it into 0x10.
macro_rules! unpack_q5 {
    ($p:expr) => {{
        let low = unpack_q4!($p);
        let bits = _mm256_set1_epi32(std::ptr::read_unaligned($p.add(16) as *const i32));
        let spread = _mm256_shuffle_epi8(
            bits,
            _mm256_setr_epi64x(0, 0x0101_0101_0101_0101, 0x0202_0202_0202_0202, 0x0303_0303_0303_0303),
        );
        let lane_bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
        let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, lane_bit), lane_bit);
        _mm256_or_si256(low, _mm256_and_si256(set, _mm256_set1_epi8(0x10)))
    }};
}
super::row_kernel!(dot_q4_avx2, "avx2,fma", u8, 16, |p| unpack_q4!(p), |w, v| super::udot_avx2(w, v));
super::row_kernel!(dot_q4_vnni, "avx2,fma,avx512vnni,avx512vl", u8, 16, |p| unpack_q4!(p), |w, v| super::udot_vnni(
    w, v
));
super::row_kernel!(dot_q5_avx2, "avx2,fma", u8, 20, |p| unpack_q5!(p), |w, v| super::udot_avx2(w, v));
super::row_kernel!(dot_q5_vnni, "avx2,fma,avx512vnni,avx512vl", u8, 20, |p| unpack_q5!(p), |w, v| super::udot_vnni(
    w, v
));

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifth_bits_unpack_as_scalar_and_simd_agree() {
        // Every bit pattern position: the scalar unpacking is the reference
        // for the shuffle/compare trick of the vector path.
        let mut packed = [0u8; 20];
        for (j, b) in packed.iter_mut().enumerate() {
            *b = (j as u8).wrapping_mul(37).wrapping_add(11);
        }
        let q = FiveBits::unpack(&packed);
        let high = u32::from_le_bytes([packed[16], packed[17], packed[18], packed[19]]);
        for (e, &v) in q.iter().enumerate() {
            let nibble = if e < 16 { packed[e] & 0xF } else { packed[e - 16] >> 4 };
            assert_eq!(v, nibble | (((high >> e) & 1) as u8) << 4, "element {e}");
        }
        #[cfg(target_arch = "x86_64")]
        if super::super::available().contains(&Isa::Avx2) {
            #[target_feature(enable = "avx2")]
            unsafe fn simd(p: *const u8) -> [u8; BLOCK] {
                use std::arch::x86_64::*;
                let v = unpack_q5!(p);
                std::mem::transmute::<__m256i, [u8; BLOCK]>(v)
            }
            // SAFETY: AVX2 is present (checked above); 20 readable bytes.
            assert_eq!(unsafe { simd(packed.as_ptr()) }, q);
        }
    }
}
