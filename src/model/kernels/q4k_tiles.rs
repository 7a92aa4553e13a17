//! Q4_K weights interleaved sixteen rows at a time, × Q8 activations.
//!
//! `kquant.rs` lays a row's values along the vector lanes, so every 32
//! values need their own scale multiply (two instructions per 64
//! products). Here the lanes are sixteen weight rows instead: for four
//! consecutive values of a sub-block, one 64-byte load holds those four
//! values of all sixteen rows, and one `vpdpbusd` multiplies them by the
//! same four activations (broadcast) — 64 products per instruction, summed
//! per row over the whole sub-block. A sub-block of 32 is exactly one
//! activation block, so its scale, the activations' scale and the min apply
//! once per row and 32 values in float (`d·sc·dx·Σq·x − dmin·mn·Σx`), with
//! activations kept as exact as the 32-value formats' (one scale per 32
//! values, not ggml's one per 256), and sixteen outputs come out of one
//! register. This is llama.cpp's repacked
//! layout idea, written for our batch-invariant kernels: each activation row
//! gets the same operations whatever the batch.
//!
//! Layout per group of 16 rows and super-block: `d`, `dmin` (16 each),
//! scales and mins (8 sub-blocks × 16 rows, u8), then for each pair of
//! sub-blocks and each 4 values, 16 rows × 4 bytes whose low nibbles are the
//! even sub-block and high nibbles the odd one — the file's own packing of a
//! row, regrouped (4.6 bits a weight; rows padded to a multiple of 16).

use candle_core::quantized::GgmlDType;
use half::f16;

use super::q8::{Q8Row, BLOCK};
use super::q8k::QK_K;
use super::{Format, Isa, QuantMatrix, Rows, TOKEN_CHUNK};

/// Weight rows per interleaved group.
pub const GROUP: usize = 16;
const SUB_BLOCKS: usize = 8;
const SUB: usize = 32;
/// Value bytes per group and super-block.
const PACKED: usize = GROUP * QK_K / 2;
const FILE_BLOCK_BYTES: usize = 144;

#[derive(Debug, Clone)]
pub struct Q4KTiles {
    rows: usize,
    cols: usize,
    /// Per (group, super-block): 16 rows.
    d: Vec<f32>,
    dmin: Vec<f32>,
    /// Per (group, super-block): `[sub-block][row]`.
    scales: Vec<u8>,
    mins: Vec<u8>,
    /// Per (group, super-block): `[pair][4-value step][row][4 bytes]`.
    qs: Vec<u8>,
}

/// Sub-block `j`'s (scale, min) from the 12 packed bytes of a Q4_K / Q5_K
/// super-block (ggml's `get_scale_min_k4`).
pub(super) fn scale_min(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        ((s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4))
    }
}

impl Q4KTiles {
    pub fn from_gguf(dtype: GgmlDType, bytes: &[u8], rows: usize, cols: usize) -> Option<Self> {
        if dtype != GgmlDType::Q4K || !cols.is_multiple_of(QK_K) || bytes.len() != rows * cols / QK_K * FILE_BLOCK_BYTES
        {
            return None;
        }
        let supers = cols / QK_K;
        let blocks = rows.div_ceil(GROUP) * supers;
        let mut m = Self {
            rows,
            cols,
            d: vec![0.0; blocks * GROUP],
            dmin: vec![0.0; blocks * GROUP],
            scales: vec![0; blocks * SUB_BLOCKS * GROUP],
            mins: vec![0; blocks * SUB_BLOCKS * GROUP],
            qs: vec![0; blocks * PACKED],
        };
        // Padding rows stay zero: scale 0, min 0, so they add nothing.
        for (o, row) in bytes.chunks_exact(supers * FILE_BLOCK_BYTES).enumerate() {
            let (g, r) = (o / GROUP, o % GROUP);
            for (s, file) in row.chunks_exact(FILE_BLOCK_BYTES).enumerate() {
                let b = g * supers + s;
                m.d[b * GROUP + r] = f16::from_le_bytes([file[0], file[1]]).to_f32();
                m.dmin[b * GROUP + r] = f16::from_le_bytes([file[2], file[3]]).to_f32();
                for j in 0..SUB_BLOCKS {
                    let (sc, mn) = scale_min(j, &file[4..16]);
                    m.scales[(b * SUB_BLOCKS + j) * GROUP + r] = sc;
                    m.mins[(b * SUB_BLOCKS + j) * GROUP + r] = mn;
                }
                let values = &file[16..FILE_BLOCK_BYTES];
                for pair in 0..SUB_BLOCKS / 2 {
                    for step in 0..SUB / 4 {
                        let at = b * PACKED + ((pair * SUB / 4 + step) * GROUP + r) * 4;
                        let from = pair * 32 + step * 4;
                        m.qs[at..at + 4].copy_from_slice(&values[from..from + 4]);
                    }
                }
            }
        }
        Some(m)
    }

    /// Row `o`'s value `e` of super-block `s` (0..15).
    fn value(&self, o: usize, s: usize, e: usize) -> u8 {
        let b = (o / GROUP) * (self.cols / QK_K) + s;
        let (j, l) = (e / SUB, e % SUB);
        let at = b * PACKED + (((j / 2) * SUB / 4 + l / 4) * GROUP + o % GROUP) * 4 + l % 4;
        if j % 2 == 0 {
            self.qs[at] & 0xF
        } else {
            self.qs[at] >> 4
        }
    }

    /// The reference the vector paths are held to (the same operations in
    /// the same order as each lane of theirs).
    fn dot_scalar(&self, o: usize, x: &Q8Row) -> f32 {
        let supers = self.cols / QK_K;
        let (g, r) = (o / GROUP, o % GROUP);
        let mut sum = 0f32;
        for s in 0..supers {
            let b = g * supers + s;
            let (d, dmin) = (self.d[b * GROUP + r], self.dmin[b * GROUP + r]);
            for j in 0..SUB_BLOCKS {
                let block = s * SUB_BLOCKS + j;
                let xq = &x.qs[block * BLOCK..(block + 1) * BLOCK];
                let dot: i32 = (0..SUB).map(|l| self.value(o, s, j * SUB + l) as i32 * xq[l] as i32).sum();
                let sc = self.scales[(b * SUB_BLOCKS + j) * GROUP + r] as f32;
                let mn = self.mins[(b * SUB_BLOCKS + j) * GROUP + r] as f32;
                sum = (dot as f32).mul_add(d * sc * x.d[block], sum);
                sum = (-(dmin * mn)).mul_add(x.s[block], sum);
            }
        }
        sum
    }

    /// Group `g` (16 rows) against `R` activation rows into `out[t][16]`.
    fn dot_group(&self, g: usize, xs: &[Q8Row], out: &mut [[f32; GROUP]; TOKEN_CHUNK], isa: Isa) {
        let supers = self.cols / QK_K;
        let blocks = g * supers..(g + 1) * supers;
        let d = &self.d[blocks.start * GROUP..blocks.end * GROUP];
        let dmin = &self.dmin[blocks.start * GROUP..blocks.end * GROUP];
        let scales = &self.scales[blocks.start * SUB_BLOCKS * GROUP..blocks.end * SUB_BLOCKS * GROUP];
        let mins = &self.mins[blocks.start * SUB_BLOCKS * GROUP..blocks.end * SUB_BLOCKS * GROUP];
        let qs = &self.qs[blocks.start * PACKED..blocks.end * PACKED];
        match isa {
            // SAFETY: each ISA is only chosen when the CPU reports its features.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => {
                super::by_count!(xs.len(), |R| unsafe { group_vnni::<R>(d, dmin, scales, mins, qs, xs, out) })
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                for half in 0..2 {
                    super::by_count!(xs.len(), |R| unsafe { group_avx2::<R>(half, d, dmin, scales, mins, qs, xs, out) })
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

impl QuantMatrix for Q4KTiles {
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
        (self.d.len() + self.dmin.len()) * 4 + self.scales.len() + self.mins.len() + self.qs.len()
    }

    /// As ggml dequantizes: `(d·sc)·q − dmin·mn`.
    fn dequantize(&self) -> Vec<f32> {
        let supers = self.cols / QK_K;
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for o in 0..self.rows {
            let (g, r) = (o / GROUP, o % GROUP);
            for s in 0..supers {
                let b = g * supers + s;
                for e in 0..QK_K {
                    let j = e / SUB;
                    let sc = self.scales[(b * SUB_BLOCKS + j) * GROUP + r] as f32;
                    let mn = self.mins[(b * SUB_BLOCKS + j) * GROUP + r] as f32;
                    let v = self.value(o, s, e) as f32;
                    out.push(self.d[b * GROUP + r] * sc * v - self.dmin[b * GROUP + r] * mn);
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

/// 16 rows × `R` activation rows: per sub-block and 4 values, one load of
/// the 16 rows' values and one `vpdpbusd` per activation row; per sub-block,
/// one scale-and-min step per activation row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn group_vnni<const R: usize>(
    d: &[f32],
    dmin: &[f32],
    scales: &[u8],
    mins: &[u8],
    qs: &[u8],
    xs: &[Q8Row],
    out: &mut [[f32; GROUP]; TOKEN_CHUNK],
) {
    use std::arch::x86_64::*;
    let supers = d.len() / GROUP;
    debug_assert!(xs.len() == R && qs.len() == supers * PACKED);
    let low = _mm512_set1_epi8(0x0F);
    let mut acc = [_mm512_setzero_ps(); R];
    for s in 0..supers {
        let ds = _mm512_loadu_ps(d.as_ptr().add(s * GROUP));
        let dmins = _mm512_loadu_ps(dmin.as_ptr().add(s * GROUP));
        for j in 0..SUB_BLOCKS {
            let mut dot = [_mm512_setzero_si512(); R];
            let shift = _mm_cvtsi32_si128(4 * (j % 2) as i32);
            let block = s * SUB_BLOCKS + j;
            for step in 0..SUB / 4 {
                let at = s * PACKED + ((j / 2) * SUB / 4 + step) * GROUP * 4;
                let packed = _mm512_loadu_si512(qs.as_ptr().add(at) as *const __m512i);
                let v = _mm512_and_si512(_mm512_srl_epi16(packed, shift), low);
                for t in 0..R {
                    let x = std::ptr::read_unaligned(xs[t].qs.as_ptr().add(block * BLOCK + step * 4) as *const i32);
                    dot[t] = _mm512_dpbusd_epi32(dot[t], v, _mm512_set1_epi32(x));
                }
            }
            let bytes = |from: &[u8]| {
                let lanes = _mm512_cvtepu8_epi32(_mm_loadu_si128(
                    from.as_ptr().add((s * SUB_BLOCKS + j) * GROUP) as *const __m128i
                ));
                _mm512_cvtepi32_ps(lanes)
            };
            let dsc = _mm512_mul_ps(ds, bytes(scales));
            let dmn = _mm512_mul_ps(dmins, bytes(mins));
            for t in 0..R {
                let scale = _mm512_mul_ps(dsc, _mm512_set1_ps(*xs[t].d.get_unchecked(block)));
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[t]), scale, acc[t]);
                acc[t] = _mm512_fnmadd_ps(dmn, _mm512_set1_ps(*xs[t].s.get_unchecked(block)), acc[t]);
            }
        }
    }
    for t in 0..R {
        _mm512_storeu_ps(out[t].as_mut_ptr(), acc[t]);
    }
}

/// `group_vnni` for AVX2: rows `8·half .. 8·half + 8` of the group (the
/// first or second 32 bytes of each 64), u8×i8 products through
/// `maddubs` + `madd`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn group_avx2<const R: usize>(
    half: usize,
    d: &[f32],
    dmin: &[f32],
    scales: &[u8],
    mins: &[u8],
    qs: &[u8],
    xs: &[Q8Row],
    out: &mut [[f32; GROUP]; TOKEN_CHUNK],
) {
    use std::arch::x86_64::*;
    let supers = d.len() / GROUP;
    debug_assert!(xs.len() == R && qs.len() == supers * PACKED);
    let low = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let rows = 8 * half;
    let mut acc = [_mm256_setzero_ps(); R];
    for s in 0..supers {
        let ds = _mm256_loadu_ps(d.as_ptr().add(s * GROUP + rows));
        let dmins = _mm256_loadu_ps(dmin.as_ptr().add(s * GROUP + rows));
        for j in 0..SUB_BLOCKS {
            let mut dot = [_mm256_setzero_si256(); R];
            let shift = _mm_cvtsi32_si128(4 * (j % 2) as i32);
            let block = s * SUB_BLOCKS + j;
            for step in 0..SUB / 4 {
                let at = s * PACKED + ((j / 2) * SUB / 4 + step) * GROUP * 4 + rows * 4;
                let packed = _mm256_loadu_si256(qs.as_ptr().add(at) as *const __m256i);
                let v = _mm256_and_si256(_mm256_srl_epi16(packed, shift), low);
                for t in 0..R {
                    let x = std::ptr::read_unaligned(xs[t].qs.as_ptr().add(block * BLOCK + step * 4) as *const i32);
                    let products = _mm256_madd_epi16(_mm256_maddubs_epi16(v, _mm256_set1_epi32(x)), ones);
                    dot[t] = _mm256_add_epi32(dot[t], products);
                }
            }
            let bytes = |from: &[u8]| {
                let lanes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(
                    from.as_ptr().add((s * SUB_BLOCKS + j) * GROUP + rows) as *const __m128i,
                ));
                _mm256_cvtepi32_ps(lanes)
            };
            let dsc = _mm256_mul_ps(ds, bytes(scales));
            let dmn = _mm256_mul_ps(dmins, bytes(mins));
            for t in 0..R {
                let scale = _mm256_mul_ps(dsc, _mm256_set1_ps(*xs[t].d.get_unchecked(block)));
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[t]), scale, acc[t]);
                acc[t] = _mm256_fnmadd_ps(dmn, _mm256_set1_ps(*xs[t].s.get_unchecked(block)), acc[t]);
            }
        }
    }
    for t in 0..R {
        _mm256_storeu_ps(out[t].as_mut_ptr().add(rows), acc[t]);
    }
}
