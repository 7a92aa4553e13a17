//! Weights stored as small unsigned integers with a per-block scale and
//! offset, `w = d·q + m`, against Q8 activations: `Σ w·x ≈ d·dx·Σ q·qx +
//! m·sx` per block of 32, an integer dot product plus one multiply-add.
//! One kernel serves four GGML types, differing only in how `q` is packed:
//! Q4_1 (`m` stored), Q4_0 (`q - 8`, so `m = -8d`) in nibbles, and Q5_1,
//! Q5_0 (`m = -16d`) with a fifth bit per value — the types llama.cpp falls
//! back to for matrices whose rows are not a multiple of 256 (SmolLM2,
//! Qwen2.5-0.5B in Q4_K_M files).
//!
//! Rows are interleaved sixteen at a time as in `q4k_tiles.rs`: for four
//! values of each half of a block, one 64-byte load holds them for all
//! sixteen rows (low nibbles: values 4s..4s+3, high nibbles: 16+4s..), and
//! one `vpdpbusd` per activation row multiplies them by the same four
//! activations; scale and offset apply once per row and block in float.
//! Q5's fifth bits are regrouped to one byte per row and 4-value step (bit
//! i: value 4s+i, bit 4+i: value 16+4s+i). Memory stays the file's (4.5–6
//! bits a weight; rows padded to a multiple of 16).

use candle_core::quantized::GgmlDType;
use half::f16;

use super::q8::{Q8Row, BLOCK};
use super::{Isa, QuantMatrix, Rows, TOKEN_CHUNK};

/// Weight rows per interleaved group.
pub const GROUP: usize = 16;
const STEPS: usize = BLOCK / 8;
/// Nibble bytes per group and block.
const PACKED: usize = GROUP * BLOCK / 2;
/// Fifth-bit bytes per group and block (Q5 types).
const HIGH: usize = GROUP * STEPS;

/// A Q4_0 / Q4_1 (`FIVE = false`) or Q5_0 / Q5_1 matrix, interleaved.
#[derive(Debug, Clone)]
pub struct OffsetTiles<const FIVE: bool> {
    rows: usize,
    cols: usize,
    /// Per (group, block): 16 rows.
    d: Vec<f32>,
    m: Vec<f32>,
    /// Per (group, block): `[step][row][4]`.
    qs: Vec<u8>,
    /// Per (group, block), Q5 only: `[step][row]`.
    qh: Vec<u8>,
}

pub type Q4Matrix = OffsetTiles<false>;
pub type Q5Matrix = OffsetTiles<true>;

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

impl<const FIVE: bool> OffsetTiles<FIVE> {
    /// From raw GGUF block bytes of `dtype`, row-major; `None` if the type
    /// is not one this packing reads or the sizes do not fit.
    pub fn from_gguf(dtype: GgmlDType, bytes: &[u8], rows: usize, cols: usize) -> Option<Self> {
        // (block bytes, whether m is stored, the offset in units of d otherwise)
        let (block_bytes, stored_m, offset) = match (FIVE, dtype) {
            (false, GgmlDType::Q4_0) => (18, false, -8.0),
            (false, GgmlDType::Q4_1) => (20, true, 0.0),
            (true, GgmlDType::Q5_0) => (22, false, -16.0),
            (true, GgmlDType::Q5_1) => (24, true, 0.0),
            _ => return None,
        };
        if !cols.is_multiple_of(BLOCK) || bytes.len() != rows * cols / BLOCK * block_bytes {
            return None;
        }
        let blocks_per_row = cols / BLOCK;
        let tiles = rows.div_ceil(GROUP) * blocks_per_row;
        let mut t = Self {
            rows,
            cols,
            d: vec![0.0; tiles * GROUP],
            m: vec![0.0; tiles * GROUP],
            qs: vec![0; tiles * PACKED],
            qh: vec![0; if FIVE { tiles * HIGH } else { 0 }],
        };
        // Padding rows stay zero: scale and offset 0, so they add nothing.
        for (o, row) in bytes.chunks_exact(blocks_per_row * block_bytes).enumerate() {
            let (g, r) = (o / GROUP, o % GROUP);
            for (b, block) in row.chunks_exact(block_bytes).enumerate() {
                let tile = g * blocks_per_row + b;
                let scale = f16_at(block, 0);
                t.d[tile * GROUP + r] = scale;
                t.m[tile * GROUP + r] = if stored_m { f16_at(block, 2) } else { offset * scale };
                let header = if stored_m { 4 } else { 2 };
                // GGUF puts Q5's fifth bits (a u32, bit j = value j) before the nibbles.
                let (high, nibbles) = if FIVE {
                    let h = &block[header..header + 4];
                    (u32::from_le_bytes([h[0], h[1], h[2], h[3]]), &block[header + 4..header + 20])
                } else {
                    (0, &block[header..header + 16])
                };
                for step in 0..STEPS {
                    let at = tile * PACKED + (step * GROUP + r) * 4;
                    t.qs[at..at + 4].copy_from_slice(&nibbles[step * 4..step * 4 + 4]);
                    if FIVE {
                        let low = (high >> (step * 4)) & 0xF;
                        let upper = (high >> (16 + step * 4)) & 0xF;
                        t.qh[tile * HIGH + step * GROUP + r] = (low | upper << 4) as u8;
                    }
                }
            }
        }
        Some(t)
    }

    /// Row `o`'s value `e` (0..31) of block `b`.
    fn value(&self, o: usize, b: usize, e: usize) -> u8 {
        let tile = (o / GROUP) * (self.cols / BLOCK) + b;
        let (upper, l) = (e / 16, e % 16);
        let (step, i, r) = (l / 4, l % 4, o % GROUP);
        let byte = self.qs[tile * PACKED + (step * GROUP + r) * 4 + i];
        let nibble = if upper == 0 { byte & 0xF } else { byte >> 4 };
        let fifth = if FIVE { (self.qh[tile * HIGH + step * GROUP + r] >> (4 * upper + i)) & 1 } else { 0 };
        nibble | fifth << 4
    }

    /// The reference: block by block, integer dot then scale and offset.
    fn dot_scalar(&self, o: usize, x: &Q8Row) -> f32 {
        let blocks = self.cols / BLOCK;
        let mut sum = 0f32;
        for b in 0..blocks {
            let tile = (o / GROUP) * blocks + b;
            let xq = &x.qs[b * BLOCK..(b + 1) * BLOCK];
            let isum: i32 = (0..BLOCK).map(|e| self.value(o, b, e) as i32 * xq[e] as i32).sum();
            let (d, m) = (self.d[tile * GROUP + o % GROUP], self.m[tile * GROUP + o % GROUP]);
            sum = (isum as f32).mul_add(d * x.d[b], sum);
            sum = m.mul_add(x.s[b], sum);
        }
        sum
    }

    /// Group `g` (16 rows) against `R` activation rows into `out[t][16]`.
    fn dot_group(&self, g: usize, xs: &[Q8Row], out: &mut [[f32; GROUP]; TOKEN_CHUNK], isa: Isa) {
        let blocks = self.cols / BLOCK;
        let tiles = g * blocks..(g + 1) * blocks;
        let d = &self.d[tiles.start * GROUP..tiles.end * GROUP];
        let m = &self.m[tiles.start * GROUP..tiles.end * GROUP];
        let qs = &self.qs[tiles.start * PACKED..tiles.end * PACKED];
        let qh = if FIVE { &self.qh[tiles.start * HIGH..tiles.end * HIGH] } else { &[][..] };
        match isa {
            // SAFETY: each ISA is only chosen when the CPU reports its features.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => {
                super::by_count!(xs.len(), |R| unsafe { group_vnni::<R, FIVE>(d, m, qs, qh, xs, out) })
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                for half in 0..2 {
                    super::by_count!(xs.len(), |R| unsafe { group_avx2::<R, FIVE>(half, d, m, qs, qh, xs, out) })
                }
            }
            Isa::Scalar => {
                let rows = GROUP.min(self.rows - g * GROUP);
                for (x, tile) in xs.iter().zip(out.iter_mut()) {
                    for (r, v) in tile[..rows].iter_mut().enumerate() {
                        *v = self.dot_scalar(g * GROUP + r, x);
                    }
                }
            }
        }
    }

    /// `y[t][o] = Σ_k w[o][k] · x[t][k]` for every activation row `t`.
    pub fn matmul(&self, x: &[Q8Row], isa: Isa) -> Vec<f32> {
        super::matmul(self, &super::Activations::q8(x), isa)
    }
}

impl<const FIVE: bool> QuantMatrix for OffsetTiles<FIVE> {
    fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    fn row_group(&self) -> usize {
        GROUP
    }

    fn bytes(&self) -> usize {
        (self.d.len() + self.m.len()) * 4 + self.qs.len() + self.qh.len()
    }

    fn dequantize(&self) -> Vec<f32> {
        let blocks = self.cols / BLOCK;
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for o in 0..self.rows {
            for b in 0..blocks {
                let tile = (o / GROUP) * blocks + b;
                let (d, m) = (self.d[tile * GROUP + o % GROUP], self.m[tile * GROUP + o % GROUP]);
                out.extend((0..BLOCK).map(|e| d * self.value(o, b, e) as f32 + m));
            }
        }
        out
    }

    fn dot_row(&self, o: usize, xs: Rows<'_>, out: &mut [f32], isa: Isa) {
        super::tiled_dot_row(self, o, GROUP, xs, out, isa)
    }

    fn dot_rows(&self, first: usize, count: usize, xs: Rows<'_>, out: &mut [f32], isa: Isa) {
        let xs = xs.q8();
        super::tiled_dot_rows::<GROUP>(first, count, xs.len(), out, |g, tile| self.dot_group(g, xs, tile, isa))
    }
}

/// 16 rows × `R` activation rows: per block and 4-value step, one load of
/// the 16 rows' nibbles (and fifth bits) and two `vpdpbusd` per activation
/// row (values 4s.. and 16+4s..); per block, scale and offset in float.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn group_vnni<const R: usize, const FIVE: bool>(
    d: &[f32],
    m: &[f32],
    qs: &[u8],
    qh: &[u8],
    xs: &[Q8Row],
    out: &mut [[f32; GROUP]; TOKEN_CHUNK],
) {
    use std::arch::x86_64::*;
    let blocks = d.len() / GROUP;
    debug_assert!(xs.len() == R && qs.len() == blocks * PACKED && (!FIVE || qh.len() == blocks * HIGH));
    let nibble = _mm512_set1_epi8(0x0F);
    let fifth = _mm512_set1_epi8(0x10);
    // Byte i of a row's four takes bit i (low values) or 4 + i (high values).
    let low_bits = _mm512_set1_epi32(0x0804_0201);
    let high_bits = _mm512_set1_epi32(0x8040_2010_u32 as i32);
    let mut acc = [_mm512_setzero_ps(); R];
    for b in 0..blocks {
        let mut dot = [_mm512_setzero_si512(); R];
        for step in 0..STEPS {
            let packed = _mm512_loadu_si512(qs.as_ptr().add(b * PACKED + step * GROUP * 4) as *const __m512i);
            let mut lo = _mm512_and_si512(packed, nibble);
            let mut hi = _mm512_and_si512(_mm512_srli_epi16(packed, 4), nibble);
            if FIVE {
                let bytes = _mm_loadu_si128(qh.as_ptr().add(b * HIGH + step * GROUP) as *const __m128i);
                let spread = _mm512_mullo_epi32(_mm512_cvtepu8_epi32(bytes), _mm512_set1_epi32(0x0101_0101));
                lo = _mm512_or_si512(lo, _mm512_maskz_mov_epi8(_mm512_test_epi8_mask(spread, low_bits), fifth));
                hi = _mm512_or_si512(hi, _mm512_maskz_mov_epi8(_mm512_test_epi8_mask(spread, high_bits), fifth));
            }
            for t in 0..R {
                let x = xs[t].qs.as_ptr().add(b * BLOCK + step * 4);
                let x_lo = _mm512_set1_epi32(std::ptr::read_unaligned(x as *const i32));
                let x_hi = _mm512_set1_epi32(std::ptr::read_unaligned(x.add(16) as *const i32));
                dot[t] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(dot[t], lo, x_lo), hi, x_hi);
            }
        }
        let ds = _mm512_loadu_ps(d.as_ptr().add(b * GROUP));
        let ms = _mm512_loadu_ps(m.as_ptr().add(b * GROUP));
        for t in 0..R {
            let scale = _mm512_mul_ps(ds, _mm512_set1_ps(*xs[t].d.get_unchecked(b)));
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[t]), scale, acc[t]);
            acc[t] = _mm512_fmadd_ps(ms, _mm512_set1_ps(*xs[t].s.get_unchecked(b)), acc[t]);
        }
    }
    for t in 0..R {
        _mm512_storeu_ps(out[t].as_mut_ptr(), acc[t]);
    }
}

/// `group_vnni` for AVX2 over rows `8·half .. 8·half + 8` of the group.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn group_avx2<const R: usize, const FIVE: bool>(
    half: usize,
    d: &[f32],
    m: &[f32],
    qs: &[u8],
    qh: &[u8],
    xs: &[Q8Row],
    out: &mut [[f32; GROUP]; TOKEN_CHUNK],
) {
    use std::arch::x86_64::*;
    let blocks = d.len() / GROUP;
    debug_assert!(xs.len() == R && qs.len() == blocks * PACKED && (!FIVE || qh.len() == blocks * HIGH));
    let nibble = _mm256_set1_epi8(0x0F);
    let fifth = _mm256_set1_epi8(0x10);
    let ones = _mm256_set1_epi16(1);
    let low_bits = _mm256_set1_epi32(0x0804_0201);
    let high_bits = _mm256_set1_epi32(0x8040_2010_u32 as i32);
    let rows = 8 * half;
    let mut acc = [_mm256_setzero_ps(); R];
    for b in 0..blocks {
        let mut dot = [_mm256_setzero_si256(); R];
        for step in 0..STEPS {
            let packed = _mm256_loadu_si256(qs.as_ptr().add(b * PACKED + (step * GROUP + rows) * 4) as *const __m256i);
            let mut lo = _mm256_and_si256(packed, nibble);
            let mut hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), nibble);
            if FIVE {
                let bytes = _mm_loadl_epi64(qh.as_ptr().add(b * HIGH + step * GROUP + rows) as *const __m128i);
                let spread = _mm256_mullo_epi32(_mm256_cvtepu8_epi32(bytes), _mm256_set1_epi32(0x0101_0101));
                let set = |bits: __m256i| {
                    let picked = _mm256_and_si256(spread, bits);
                    _mm256_and_si256(_mm256_cmpeq_epi8(picked, bits), fifth)
                };
                lo = _mm256_or_si256(lo, set(low_bits));
                hi = _mm256_or_si256(hi, set(high_bits));
            }
            for t in 0..R {
                let x = xs[t].qs.as_ptr().add(b * BLOCK + step * 4);
                let x_lo = _mm256_set1_epi32(std::ptr::read_unaligned(x as *const i32));
                let x_hi = _mm256_set1_epi32(std::ptr::read_unaligned(x.add(16) as *const i32));
                let products = _mm256_add_epi16(_mm256_maddubs_epi16(lo, x_lo), _mm256_maddubs_epi16(hi, x_hi));
                dot[t] = _mm256_add_epi32(dot[t], _mm256_madd_epi16(products, ones));
            }
        }
        let ds = _mm256_loadu_ps(d.as_ptr().add(b * GROUP + rows));
        let ms = _mm256_loadu_ps(m.as_ptr().add(b * GROUP + rows));
        for t in 0..R {
            let scale = _mm256_mul_ps(ds, _mm256_set1_ps(*xs[t].d.get_unchecked(b)));
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[t]), scale, acc[t]);
            acc[t] = _mm256_fmadd_ps(ms, _mm256_set1_ps(*xs[t].s.get_unchecked(b)), acc[t]);
        }
    }
    for t in 0..R {
        _mm256_storeu_ps(out[t].as_mut_ptr().add(rows), acc[t]);
    }
}
