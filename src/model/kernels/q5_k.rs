//! Q5_K weights × Q8_K activations. A 256-value super-block holds
//! `d` and `dmin` and, per sub-block of 32, a 6-bit scale `sc` and min `mn`:
//! `w = d·sc·q − dmin·mn`. Against activations with one scale `dx` per
//! super-block the row's dot is, per super-block,
//! `d·dx·Σ_j sc_j·(q_j·x_j) − dmin·dx·Σ_j mn_j·Σx_j`: both sums stay in
//! integers (`maddubs` then a multiply-add by the sub-block's scale) and are
//! converted to float once per super-block, so scales cost nothing per
//! value. The values keep the file's layout (per 64: 32 bytes whose low
//! nibbles are sub-block 2j, high nibbles 2j + 1; the fifth bits in 32
//! bytes, bit 2j / 2j + 1); only the 12 packed scale bytes are spread to 16
//! at load (5.9 bits a weight). Lanes run along a row's values, so each 32
//! values pay a scale multiply; Q4_K and Q6_K, far more common, interleave
//! rows instead (`q4k_tiles.rs`), which this type could follow.

use half::f16;

use super::q4k_tiles::scale_min;
use super::q8k::{Q8KRow, QK_K, SUM_SPAN};
use super::{Format, Isa, QuantMatrix, Rows};

const SUB_BLOCKS: usize = 8;
const SUB: usize = QK_K / SUB_BLOCKS;

/// A Q5_K matrix `[rows, cols]`.
#[derive(Debug, Clone)]
pub struct Q5KMatrix {
    rows: usize,
    cols: usize,
    /// Per super-block.
    d: Vec<f32>,
    dmin: Vec<f32>,
    /// Per super-block: the 8 scales, then the 8 mins.
    scales: Vec<u8>,
    /// Per super-block: 32 bytes of fifth bits.
    qh: Vec<u8>,
    /// Per super-block: 128 bytes of nibbles.
    qs: Vec<u8>,
}

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

impl Q5KMatrix {
    /// From raw GGUF Q5_K bytes, row-major.
    pub fn from_gguf(bytes: &[u8], rows: usize, cols: usize) -> Option<Self> {
        let block_bytes = 176;
        if !cols.is_multiple_of(QK_K) || bytes.len() != rows * cols / QK_K * block_bytes {
            return None;
        }
        let supers = rows * cols / QK_K;
        let mut m = Self {
            rows,
            cols,
            d: Vec::with_capacity(supers),
            dmin: Vec::with_capacity(supers),
            scales: Vec::with_capacity(supers * 16),
            qh: Vec::with_capacity(supers * 32),
            qs: Vec::with_capacity(supers * 128),
        };
        for block in bytes.chunks_exact(block_bytes) {
            m.d.push(f16_at(block, 0));
            m.dmin.push(f16_at(block, 2));
            let packed = &block[4..16];
            let (sc, mn): (Vec<u8>, Vec<u8>) = (0..SUB_BLOCKS).map(|j| scale_min(j, packed)).unzip();
            m.scales.extend(sc);
            m.scales.extend(mn);
            m.qh.extend_from_slice(&block[16..48]);
            m.qs.extend_from_slice(&block[48..176]);
        }
        Some(m)
    }

    /// The 256 unsigned values of super-block `s`, in element order.
    fn values(&self, s: usize) -> [u8; QK_K] {
        let qs = &self.qs[s * 128..(s + 1) * 128];
        std::array::from_fn(|e| {
            let (j, l) = (e / 64, e % 64);
            let byte = qs[j * 32 + l % 32];
            let nibble = if l < 32 { byte & 0xF } else { byte >> 4 };
            let high = (self.qh[s * 32 + l % 32] >> (2 * j + l / 32)) & 1;
            nibble | (high << 4)
        })
    }

    /// Weight row `o` against one activation row: integer sums per
    /// super-block, then scale and min — the reference the vector paths
    /// are held to.
    fn dot_scalar(&self, o: usize, x: &Q8KRow) -> f32 {
        let supers = self.cols / QK_K;
        let mut sum = 0f32;
        for s in 0..supers {
            let g = o * supers + s;
            let q = self.values(g);
            let (sc, mn) = self.scales[g * 16..(g + 1) * 16].split_at(SUB_BLOCKS);
            let xq = &x.qs[s * QK_K..(s + 1) * QK_K];
            let sums = &x.sums[s * QK_K / SUM_SPAN..(s + 1) * QK_K / SUM_SPAN];
            let (mut isum, mut msum) = (0i32, 0i32);
            for j in 0..SUB_BLOCKS {
                let dot: i32 = (j * SUB..(j + 1) * SUB).map(|e| q[e] as i32 * xq[e] as i32).sum();
                isum += sc[j] as i32 * dot;
                msum += mn[j] as i32 * (sums[2 * j] as i32 + sums[2 * j + 1] as i32);
            }
            sum = (isum as f32).mul_add(self.d[g] * x.d[s], sum);
            sum = (msum as f32).mul_add(-self.dmin[g] * x.d[s], sum);
        }
        sum
    }
}

impl QuantMatrix for Q5KMatrix {
    fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    fn format(&self) -> Format {
        Format::Q8K
    }

    fn bytes(&self) -> usize {
        (self.d.len() + self.dmin.len()) * 4 + self.scales.len() + self.qh.len() + self.qs.len()
    }

    /// As ggml dequantizes: `(d·sc)·q − dmin·mn`.
    fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for g in 0..self.d.len() {
            let q = self.values(g);
            let (sc, mn) = self.scales[g * 16..(g + 1) * 16].split_at(SUB_BLOCKS);
            for (e, &v) in q.iter().enumerate() {
                let j = e / SUB;
                out.push(self.d[g] * sc[j] as f32 * v as f32 - self.dmin[g] * mn[j] as f32);
            }
        }
        out
    }

    fn dot_row(&self, o: usize, xs: Rows<'_>, out: &mut [f32], isa: Isa) {
        let xs = xs.q8k();
        let supers = self.cols / QK_K;
        let range = o * supers..(o + 1) * supers;
        let d = &self.d[range.clone()];
        let dmin = &self.dmin[range.clone()];
        let scales = &self.scales[range.start * 16..range.end * 16];
        let qs = &self.qs[range.start * 128..range.end * 128];
        let qh = &self.qh[range.start * 32..range.end * 32];
        match isa {
            // SAFETY: each ISA is only chosen when the CPU reports its features.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => super::by_count!(xs.len(), |R| unsafe { dot_avx2::<R>(d, dmin, scales, qh, qs, xs, out) }),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => {
                super::by_count!(xs.len(), |R| unsafe { dot_vnni::<R>(d, dmin, scales, qh, qs, xs, out) })
            }
            Isa::Scalar => {
                for (x, v) in xs.iter().zip(out.iter_mut()) {
                    *v = self.dot_scalar(o, x);
                }
            }
        }
    }
}

/// One weight row against `R` activation rows: each super-block's values
/// and scales are unpacked once for all of them, and every activation row
/// gets the same operations in the same order whatever `R` is (so a row
/// gives the same bits alone or batched); each 32 values' pair sums are
/// multiplied by their sub-block scale into i32 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2<const R: usize>(
    d: &[f32],
    dmin: &[f32],
    scales: &[u8],
    qh: &[u8],
    qs: &[u8],
    xs: &[Q8KRow],
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let supers = d.len();
    debug_assert!(xs.len() == R && scales.len() == supers * 16 && qs.len() == supers * 128);
    debug_assert!(qh.len() == supers * 32);
    let low = _mm256_set1_epi8(0x0F);
    let one = _mm256_set1_epi8(1);
    let mut acc = [_mm256_setzero_ps(); R];
    for s in 0..supers {
        let sc = scales.as_ptr().add(s * 16);
        // Lane k of the mins = mn[k / 2]: the sums come per 16 values.
        let mn = _mm_cvtepu8_epi16(_mm_loadl_epi64(sc.add(SUB_BLOCKS) as *const __m128i));
        let mins = _mm256_set_m128i(_mm_unpackhi_epi16(mn, mn), _mm_unpacklo_epi16(mn, mn));
        let high = _mm256_loadu_si256(qh.as_ptr().add(s * 32) as *const __m256i);
        let mut w = [_mm256_setzero_si256(); SUB_BLOCKS];
        for j in 0..SUB_BLOCKS / 2 {
            let packed = _mm256_loadu_si256(qs.as_ptr().add(s * 128 + j * 32) as *const __m256i);
            let lo = _mm256_and_si256(packed, low);
            let hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low);
            let bit = |k: usize| {
                let shifted = _mm256_srl_epi16(high, _mm_cvtsi32_si128(k as i32));
                _mm256_slli_epi16(_mm256_and_si256(shifted, one), 4)
            };
            let lo = _mm256_or_si256(lo, bit(2 * j));
            let hi = _mm256_or_si256(hi, bit(2 * j + 1));
            w[2 * j] = lo;
            w[2 * j + 1] = hi;
        }
        let scale: [__m256i; SUB_BLOCKS] = std::array::from_fn(|j| _mm256_set1_epi16(*sc.add(j) as i16));
        for t in 0..R {
            let x = xs[t].qs.as_ptr().add(s * QK_K);
            let mut isum = _mm256_setzero_si256();
            for j in 0..SUB_BLOCKS {
                let v = _mm256_loadu_si256(x.add(j * SUB) as *const __m256i);
                isum = _mm256_add_epi32(isum, _mm256_madd_epi16(_mm256_maddubs_epi16(w[j], v), scale[j]));
            }
            let sums = _mm256_loadu_si256(xs[t].sums.as_ptr().add(s * QK_K / SUM_SPAN) as *const __m256i);
            let msum = _mm256_madd_epi16(sums, mins);
            let dx = *xs[t].d.get_unchecked(s);
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(d[s] * dx), acc[t]);
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(msum), _mm256_set1_ps(-dmin[s] * dx), acc[t]);
        }
    }
    for t in 0..R {
        out[t] = super::hsum(acc[t]);
    }
}

/// The AVX-512 form of `dot_avx2`: two sub-blocks (64 values, contiguous in
/// the activations) per instruction, `vpdpwssd` applying both scales.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn dot_vnni<const R: usize>(
    d: &[f32],
    dmin: &[f32],
    scales: &[u8],
    qh: &[u8],
    qs: &[u8],
    xs: &[Q8KRow],
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let supers = d.len();
    debug_assert!(xs.len() == R && scales.len() == supers * 16 && qs.len() == supers * 128);
    debug_assert!(qh.len() == supers * 32);
    let low = _mm256_set1_epi8(0x0F);
    let one = _mm256_set1_epi8(1);
    let mut acc = [_mm512_setzero_ps(); R];
    let q8: [*const i8; R] = std::array::from_fn(|t| xs[t].qs.as_ptr());
    let sums: [*const i16; R] = std::array::from_fn(|t| xs[t].sums.as_ptr());
    let dx: [*const f32; R] = std::array::from_fn(|t| xs[t].d.as_ptr());
    for s in 0..supers {
        let sc = scales.as_ptr().add(s * 16);
        let mn = _mm_cvtepu8_epi16(_mm_loadl_epi64(sc.add(SUB_BLOCKS) as *const __m128i));
        let mins = _mm256_set_m128i(_mm_unpackhi_epi16(mn, mn), _mm_unpacklo_epi16(mn, mn));
        let high = _mm256_loadu_si256(qh.as_ptr().add(s * 32) as *const __m256i);
        let mut w = [_mm512_setzero_si512(); SUB_BLOCKS / 2];
        let mut scale = [_mm512_setzero_si512(); SUB_BLOCKS / 2];
        for j in 0..SUB_BLOCKS / 2 {
            let packed = _mm256_loadu_si256(qs.as_ptr().add(s * 128 + j * 32) as *const __m256i);
            let lo = _mm256_and_si256(packed, low);
            let hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low);
            let bit = |k: usize| {
                let shifted = _mm256_srl_epi16(high, _mm_cvtsi32_si128(k as i32));
                _mm256_slli_epi16(_mm256_and_si256(shifted, one), 4)
            };
            let lo = _mm256_or_si256(lo, bit(2 * j));
            let hi = _mm256_or_si256(hi, bit(2 * j + 1));
            w[j] = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
            scale[j] = _mm512_inserti64x4(
                _mm512_castsi256_si512(_mm256_set1_epi16(*sc.add(2 * j) as i16)),
                _mm256_set1_epi16(*sc.add(2 * j + 1) as i16),
                1,
            );
        }
        let (ds, dmins) = (_mm512_set1_ps(d[s]), _mm512_set1_ps(-dmin[s]));
        for t in 0..R {
            let x = q8[t].add(s * QK_K);
            let mut isum = _mm512_setzero_si512();
            for j in 0..SUB_BLOCKS / 2 {
                let v = _mm512_loadu_si512(x.add(j * 2 * SUB) as *const __m512i);
                isum = _mm512_dpwssd_epi32(isum, _mm512_maddubs_epi16(w[j], v), scale[j]);
            }
            let sum16 = _mm256_loadu_si256(sums[t].add(s * QK_K / SUM_SPAN) as *const __m256i);
            let msum = _mm512_zextsi256_si512(_mm256_madd_epi16(sum16, mins));
            let dxs = _mm512_set1_ps(*dx[t].add(s));
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(ds, dxs), acc[t]);
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(msum), _mm512_mul_ps(dmins, dxs), acc[t]);
        }
    }
    for t in 0..R {
        out[t] = _mm512_reduce_add_ps(acc[t]);
    }
}
