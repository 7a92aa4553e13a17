//! Q6_K weights interleaved sixteen rows at a time, × Q8 activations: the
//! layout of `q4k_tiles.rs` for 6-bit values with a signed scale per 16
//! values, `w = d·sc·(q − 32)`. Per sub-block of 16 and 4 values, one load
//! of low nibbles and one of high bits give those values of all sixteen
//! rows, and one `vpdpbusd` per activation row multiplies them; per
//! activation block of 32 (two sub-blocks) the scales apply in integers with
//! the `−32` through the activations' sums per 16, and `d·dx` once in float:
//! `d·dx·Σ_k sc_k·(Σ q·x − 32·Σx)`.
//!
//! Layout per group of 16 rows and super-block: `d` (16), scales (16
//! sub-blocks × 16 rows), then per pair of sub-blocks and 4 values, 16 rows ×
//! 4 bytes of low nibbles (even sub-block low, odd high), then per four
//! sub-blocks and 4 values, 16 rows × 4 bytes of high bits (two bits each,
//! sub-block 4q + u at bits 2u) — 6.6 bits a weight as in the file.

use half::f16;

use super::q8::{Q8Row, BLOCK};
use super::q8k::{pair, QK_K, SUM_SPAN};
use super::{Format, Isa, QuantMatrix, Rows, TOKEN_CHUNK};

/// Weight rows per interleaved group.
pub const GROUP: usize = 16;
/// Sub-blocks (one scale each) per super-block.
const SUBS: usize = QK_K / SUM_SPAN;
const STEPS: usize = SUM_SPAN / 4;
/// Low-nibble and high-bit bytes per group and super-block.
const LOW: usize = GROUP * QK_K / 2;
const HIGH: usize = GROUP * QK_K / 4;
const FILE_BLOCK_BYTES: usize = 210;

#[derive(Debug, Clone)]
pub struct Q6KTiles {
    rows: usize,
    cols: usize,
    /// Per (group, super-block): 16 rows.
    d: Vec<f32>,
    /// Per (group, super-block): `[sub-block][row]`.
    scales: Vec<i8>,
    /// Per (group, super-block): `[pair][step][row][4]`.
    low: Vec<u8>,
    /// Per (group, super-block): `[quad][step][row][4]`.
    high: Vec<u8>,
}

/// Value `e` (0..63) of a file super-block (ggml's `dequantize_row_q6_K`).
fn file_value(block: &[u8], e: usize) -> u8 {
    let (n, k, l) = (e / 128, (e % 128) / 32, e % 32);
    let ql = block[n * 64 + l + 32 * (k % 2)];
    let low = if k < 2 { ql & 0xF } else { ql >> 4 };
    let high = (block[128 + n * 32 + l] >> (2 * k)) & 3;
    low | (high << 4)
}

impl Q6KTiles {
    pub fn from_gguf(bytes: &[u8], rows: usize, cols: usize) -> Option<Self> {
        if !cols.is_multiple_of(QK_K) || bytes.len() != rows * cols / QK_K * FILE_BLOCK_BYTES {
            return None;
        }
        let supers = cols / QK_K;
        let blocks = rows.div_ceil(GROUP) * supers;
        let mut m = Self {
            rows,
            cols,
            d: vec![0.0; blocks * GROUP],
            scales: vec![0; blocks * SUBS * GROUP],
            low: vec![0; blocks * LOW],
            high: vec![0; blocks * HIGH],
        };
        // Padding rows stay zero: scale 0, so they add nothing.
        for (o, row) in bytes.chunks_exact(supers * FILE_BLOCK_BYTES).enumerate() {
            let (g, r) = (o / GROUP, o % GROUP);
            for (s, file) in row.chunks_exact(FILE_BLOCK_BYTES).enumerate() {
                let b = g * supers + s;
                m.d[b * GROUP + r] = f16::from_le_bytes([file[208], file[209]]).to_f32();
                for k in 0..SUBS {
                    m.scales[(b * SUBS + k) * GROUP + r] = file[192 + k] as i8;
                }
                for e in 0..QK_K {
                    let v = file_value(file, e);
                    let (k, step, i) = (e / SUM_SPAN, (e % SUM_SPAN) / 4, e % 4);
                    let low = b * LOW + (((k / 2) * STEPS + step) * GROUP + r) * 4 + i;
                    m.low[low] |= (v & 0xF) << (4 * (k % 2));
                    let high = b * HIGH + (((k / 4) * STEPS + step) * GROUP + r) * 4 + i;
                    m.high[high] |= (v >> 4) << (2 * (k % 4));
                }
            }
        }
        Some(m)
    }

    /// Row `o`'s value `e` of super-block `s` (0..63).
    fn value(&self, o: usize, s: usize, e: usize) -> u8 {
        let b = (o / GROUP) * (self.cols / QK_K) + s;
        let (k, step, i, r) = (e / SUM_SPAN, (e % SUM_SPAN) / 4, e % 4, o % GROUP);
        let low = self.low[b * LOW + (((k / 2) * STEPS + step) * GROUP + r) * 4 + i] >> (4 * (k % 2)) & 0xF;
        let high = self.high[b * HIGH + (((k / 4) * STEPS + step) * GROUP + r) * 4 + i] >> (2 * (k % 4)) & 3;
        low | (high << 4)
    }

    fn scale(&self, o: usize, s: usize, k: usize) -> i8 {
        let b = (o / GROUP) * (self.cols / QK_K) + s;
        self.scales[(b * SUBS + k) * GROUP + o % GROUP]
    }

    /// The reference the vector paths are held to.
    fn dot_scalar(&self, o: usize, x: &Q8Row) -> f32 {
        let supers = self.cols / QK_K;
        let mut sum = 0f32;
        for s in 0..supers {
            let d = self.d[((o / GROUP) * supers + s) * GROUP + o % GROUP];
            for j in 0..QK_K / BLOCK {
                let block = s * QK_K / BLOCK + j;
                let mut isum = 0i32;
                for k in [2 * j, 2 * j + 1] {
                    let dot: i32 = (k * SUM_SPAN..(k + 1) * SUM_SPAN)
                        .map(|e| self.value(o, s, e) as i32 * x.qs[s * QK_K + e] as i32)
                        .sum();
                    isum += self.scale(o, s, k) as i32 * (dot - 32 * x.sums[s * SUBS + k] as i32);
                }
                sum = (isum as f32).mul_add(d * x.d[block], sum);
            }
        }
        sum
    }

    /// Group `g` (16 rows) against `R` activation rows into `out[t][16]`.
    fn dot_group(&self, g: usize, xs: &[Q8Row], out: &mut [[f32; GROUP]; TOKEN_CHUNK], isa: Isa) {
        let supers = self.cols / QK_K;
        let blocks = g * supers..(g + 1) * supers;
        let d = &self.d[blocks.start * GROUP..blocks.end * GROUP];
        let scales = &self.scales[blocks.start * SUBS * GROUP..blocks.end * SUBS * GROUP];
        let low = &self.low[blocks.start * LOW..blocks.end * LOW];
        let high = &self.high[blocks.start * HIGH..blocks.end * HIGH];
        match isa {
            // SAFETY: each ISA is only chosen when the CPU reports its features.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => {
                super::by_count!(xs.len(), |R| unsafe { group_vnni::<R>(d, scales, low, high, xs, out) })
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                for half in 0..2 {
                    super::by_count!(xs.len(), |R| unsafe { group_avx2::<R>(half, d, scales, low, high, xs, out) })
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
}

impl QuantMatrix for Q6KTiles {
    fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    fn format(&self) -> Format {
        Format::Q8
    }

    fn row_group(&self) -> usize {
        GROUP
    }

    fn bytes(&self) -> usize {
        self.d.len() * 4 + self.scales.len() + self.low.len() + self.high.len()
    }

    /// As ggml dequantizes: `(d·sc)·(q − 32)`.
    fn dequantize(&self) -> Vec<f32> {
        let supers = self.cols / QK_K;
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for o in 0..self.rows {
            for s in 0..supers {
                let d = self.d[((o / GROUP) * supers + s) * GROUP + o % GROUP];
                for e in 0..QK_K {
                    let sc = self.scale(o, s, e / SUM_SPAN) as f32;
                    out.push(d * sc * (self.value(o, s, e) as i32 - 32) as f32);
                }
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

/// 16 rows × `R` activation rows (see the module comment).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn group_vnni<const R: usize>(
    d: &[f32],
    scales: &[i8],
    low: &[u8],
    high: &[u8],
    xs: &[Q8Row],
    out: &mut [[f32; GROUP]; TOKEN_CHUNK],
) {
    use std::arch::x86_64::*;
    let supers = d.len() / GROUP;
    debug_assert!(xs.len() == R && low.len() == supers * LOW && high.len() == supers * HIGH);
    let nibble = _mm512_set1_epi8(0x0F);
    let two = _mm512_set1_epi8(3);
    let mut acc = [_mm512_setzero_ps(); R];
    for s in 0..supers {
        let ds = _mm512_loadu_ps(d.as_ptr().add(s * GROUP));
        let scale = |k: usize| {
            _mm512_cvtepi8_epi32(_mm_loadu_si128(scales.as_ptr().add((s * SUBS + k) * GROUP) as *const __m128i))
        };
        for j in 0..QK_K / BLOCK {
            let block = s * QK_K / BLOCK + j;
            let mut isum = [_mm512_setzero_si512(); R];
            for k in [2 * j, 2 * j + 1] {
                let mut dot = [_mm512_setzero_si512(); R];
                let low_shift = _mm_cvtsi32_si128(4 * (k % 2) as i32);
                let high_shift = _mm_cvtsi32_si128(2 * (k % 4) as i32);
                for step in 0..STEPS {
                    let l = _mm512_loadu_si512(
                        low.as_ptr().add(s * LOW + ((k / 2) * STEPS + step) * GROUP * 4) as *const __m512i
                    );
                    let h = _mm512_loadu_si512(
                        high.as_ptr().add(s * HIGH + ((k / 4) * STEPS + step) * GROUP * 4) as *const __m512i
                    );
                    let v = _mm512_or_si512(
                        _mm512_and_si512(_mm512_srl_epi16(l, low_shift), nibble),
                        _mm512_slli_epi16(_mm512_and_si512(_mm512_srl_epi16(h, high_shift), two), 4),
                    );
                    for t in 0..R {
                        let at = s * QK_K + k * SUM_SPAN + step * 4;
                        let x = std::ptr::read_unaligned(xs[t].qs.as_ptr().add(at) as *const i32);
                        dot[t] = _mm512_dpbusd_epi32(dot[t], v, _mm512_set1_epi32(x));
                    }
                }
                let sc = scale(k);
                for t in 0..R {
                    isum[t] = _mm512_add_epi32(isum[t], _mm512_mullo_epi32(dot[t], sc));
                }
            }
            // Σ sc·Σx for the block's two sub-blocks (i16 halves), then the −32.
            let even = _mm512_and_si512(scale(2 * j), _mm512_set1_epi32(0xFFFF));
            let scale_pair = _mm512_or_si512(even, _mm512_slli_epi32(scale(2 * j + 1), 16));
            for t in 0..R {
                let sums = xs[t].sums.as_ptr().add(s * SUBS + 2 * j);
                let offset = _mm512_madd_epi16(scale_pair, _mm512_set1_epi32(pair(*sums, *sums.add(1))));
                let total = _mm512_sub_epi32(isum[t], _mm512_slli_epi32(offset, 5));
                let dx = _mm512_set1_ps(*xs[t].d.get_unchecked(block));
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(total), _mm512_mul_ps(ds, dx), acc[t]);
            }
        }
    }
    for t in 0..R {
        _mm512_storeu_ps(out[t].as_mut_ptr(), acc[t]);
    }
}

/// `group_vnni` for AVX2 over rows `8·half .. 8·half + 8` of the group.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn group_avx2<const R: usize>(
    half: usize,
    d: &[f32],
    scales: &[i8],
    low: &[u8],
    high: &[u8],
    xs: &[Q8Row],
    out: &mut [[f32; GROUP]; TOKEN_CHUNK],
) {
    use std::arch::x86_64::*;
    let supers = d.len() / GROUP;
    debug_assert!(xs.len() == R && low.len() == supers * LOW && high.len() == supers * HIGH);
    let nibble = _mm256_set1_epi8(0x0F);
    let two = _mm256_set1_epi8(3);
    let ones = _mm256_set1_epi16(1);
    let rows = 8 * half;
    let mut acc = [_mm256_setzero_ps(); R];
    for s in 0..supers {
        let ds = _mm256_loadu_ps(d.as_ptr().add(s * GROUP + rows));
        let scale = |k: usize| {
            _mm256_cvtepi8_epi32(_mm_loadl_epi64(scales.as_ptr().add((s * SUBS + k) * GROUP + rows) as *const __m128i))
        };
        for j in 0..QK_K / BLOCK {
            let block = s * QK_K / BLOCK + j;
            let mut isum = [_mm256_setzero_si256(); R];
            for k in [2 * j, 2 * j + 1] {
                let mut dot = [_mm256_setzero_si256(); R];
                let low_shift = _mm_cvtsi32_si128(4 * (k % 2) as i32);
                let high_shift = _mm_cvtsi32_si128(2 * (k % 4) as i32);
                for step in 0..STEPS {
                    let l =
                        _mm256_loadu_si256(low.as_ptr().add(s * LOW + ((k / 2) * STEPS + step) * GROUP * 4 + rows * 4)
                            as *const __m256i);
                    let h = _mm256_loadu_si256(
                        high.as_ptr().add(s * HIGH + ((k / 4) * STEPS + step) * GROUP * 4 + rows * 4) as *const __m256i,
                    );
                    let v = _mm256_or_si256(
                        _mm256_and_si256(_mm256_srl_epi16(l, low_shift), nibble),
                        _mm256_slli_epi16(_mm256_and_si256(_mm256_srl_epi16(h, high_shift), two), 4),
                    );
                    for t in 0..R {
                        let at = s * QK_K + k * SUM_SPAN + step * 4;
                        let x = std::ptr::read_unaligned(xs[t].qs.as_ptr().add(at) as *const i32);
                        let products = _mm256_madd_epi16(_mm256_maddubs_epi16(v, _mm256_set1_epi32(x)), ones);
                        dot[t] = _mm256_add_epi32(dot[t], products);
                    }
                }
                let sc = scale(k);
                for t in 0..R {
                    isum[t] = _mm256_add_epi32(isum[t], _mm256_mullo_epi32(dot[t], sc));
                }
            }
            let even = _mm256_and_si256(scale(2 * j), _mm256_set1_epi32(0xFFFF));
            let scale_pair = _mm256_or_si256(even, _mm256_slli_epi32(scale(2 * j + 1), 16));
            for t in 0..R {
                let sums = xs[t].sums.as_ptr().add(s * SUBS + 2 * j);
                let offset = _mm256_madd_epi16(scale_pair, _mm256_set1_epi32(pair(*sums, *sums.add(1))));
                let total = _mm256_sub_epi32(isum[t], _mm256_slli_epi32(offset, 5));
                let dx = _mm256_set1_ps(*xs[t].d.get_unchecked(block));
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(total), _mm256_mul_ps(ds, dx), acc[t]);
            }
        }
    }
    for t in 0..R {
        _mm256_storeu_ps(out[t].as_mut_ptr().add(rows), acc[t]);
    }
}
