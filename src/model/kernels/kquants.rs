//! K-quants with 32-value sub-blocks (Q4_K, Q5_K): a 256-value super-block
//! holds `d` and `dmin` (f16) and, per sub-block of 32, a 6-bit scale `sc`
//! and min `mn`, so `w = d·sc·q − dmin·mn`. That is the offset form of
//! `offset.rs` once each sub-block's `d·sc` and `−dmin·mn` are known, so a
//! row's scales are expanded (one multiply each, amortized over up to eight
//! activation rows) and the Q4/Q5 kernels run unchanged. The values are
//! repacked at load into those kernels' 32-value layout (bytes move, numbers
//! do not), and memory stays near the file's: 4.75 / 5.75 bits a weight.

use std::marker::PhantomData;

use candle_core::quantized::GgmlDType;
use half::f16;

use super::offset::{FiveBits, Nibbles, Packing};
use super::q8::{Q8Row, BLOCK};
use super::{Isa, QuantMatrix};

/// Values per super-block.
pub const QK_K: usize = 256;
const SUB_BLOCKS: usize = QK_K / BLOCK;

/// A Q4_K or Q5_K matrix `[rows, cols]`.
#[derive(Debug, Clone)]
pub struct KMatrix<P: Packing> {
    rows: usize,
    cols: usize,
    /// Per super-block.
    d: Vec<f32>,
    dmin: Vec<f32>,
    /// Per sub-block of 32: the 6-bit scale and min.
    sc: Vec<u8>,
    mn: Vec<u8>,
    /// Per sub-block, `P::BYTES` packed values.
    qs: Vec<u8>,
    packing: PhantomData<P>,
}

pub type Q4KMatrix = KMatrix<Nibbles>;
pub type Q5KMatrix = KMatrix<FiveBits>;

/// Sub-block `j`'s (scale, min) from the 12 packed bytes (ggml's `get_scale_min_k4`).
fn scale_min(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        ((s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4))
    }
}

/// 32 values (0..15) as `Nibbles` packs them: byte e = v[e] | v[e+16] << 4.
fn pack_nibbles(v: &[u8; BLOCK], out: &mut Vec<u8>) {
    out.extend((0..16).map(|e| v[e] | (v[e + 16] << 4)));
}

impl<P: Packing> KMatrix<P> {
    /// From raw GGUF Q4_K (nibble packing) or Q5_K (five-bit packing) bytes.
    pub fn from_gguf(dtype: GgmlDType, bytes: &[u8], rows: usize, cols: usize) -> Option<Self> {
        let block_bytes = match (P::BYTES, dtype) {
            (16, GgmlDType::Q4K) => 144,
            (20, GgmlDType::Q5K) => 176,
            _ => return None,
        };
        if !cols.is_multiple_of(QK_K) || bytes.len() != rows * cols / QK_K * block_bytes {
            return None;
        }
        let supers = rows * cols / QK_K;
        let mut m = Self {
            rows,
            cols,
            d: Vec::with_capacity(supers),
            dmin: Vec::with_capacity(supers),
            sc: Vec::with_capacity(supers * SUB_BLOCKS),
            mn: Vec::with_capacity(supers * SUB_BLOCKS),
            qs: Vec::with_capacity(supers * SUB_BLOCKS * P::BYTES),
            packing: PhantomData,
        };
        for block in bytes.chunks_exact(block_bytes) {
            m.d.push(f16::from_le_bytes([block[0], block[1]]).to_f32());
            m.dmin.push(f16::from_le_bytes([block[2], block[3]]).to_f32());
            let scales = &block[4..16];
            for j in 0..SUB_BLOCKS {
                let (sc, mn) = scale_min(j, scales);
                m.sc.push(sc);
                m.mn.push(mn);
            }
            // Q5_K: 32 bytes of fifth bits, then the nibbles; Q4_K: nibbles only.
            let (qh, ql) = if P::BYTES == 20 { (&block[16..48], &block[48..176]) } else { (&[][..], &block[16..144]) };
            // Each 64 values: 32 bytes whose low nibbles are sub-block 2j and
            // high nibbles sub-block 2j + 1; Q5_K's fifth bits are bits 2j and
            // 2j + 1 of the 32 qh bytes.
            for chunk in 0..QK_K / 64 {
                let q = &ql[chunk * 32..chunk * 32 + 32];
                for half in 0..2 {
                    let v: [u8; BLOCK] = std::array::from_fn(|l| {
                        let nibble = if half == 0 { q[l] & 0xF } else { q[l] >> 4 };
                        let high = qh.get(l).map_or(0, |h| (h >> (2 * chunk + half)) & 1);
                        nibble | (high << 4)
                    });
                    pack_nibbles(&std::array::from_fn(|e| v[e] & 0xF), &mut m.qs);
                    if P::BYTES == 20 {
                        let bits = v.iter().enumerate().fold(0u32, |acc, (e, &x)| acc | (u32::from(x >> 4) << e));
                        m.qs.extend_from_slice(&bits.to_le_bytes());
                    }
                }
            }
        }
        Some(m)
    }

    /// Sub-block `b`'s scale `d·sc` and offset `−dmin·mn`, as ggml's dequantizer computes them.
    fn scale_offset(&self, b: usize) -> (f32, f32) {
        let s = b / SUB_BLOCKS;
        (self.d[s] * self.sc[b] as f32, -(self.dmin[s] * self.mn[b] as f32))
    }
}

/// Sub-blocks of a row expanded on the stack up to this width (32,768 columns).
const STACK_BLOCKS: usize = 1024;

impl<P: Packing> QuantMatrix for KMatrix<P> {
    fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    fn bytes(&self) -> usize {
        (self.d.len() + self.dmin.len()) * 4 + self.sc.len() + self.mn.len() + self.qs.len()
    }

    fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for b in 0..self.sc.len() {
            let (d, m) = self.scale_offset(b);
            let q = P::unpack(&self.qs[b * P::BYTES..(b + 1) * P::BYTES]);
            out.extend(q.iter().map(|&v| d * v as f32 + m));
        }
        out
    }

    fn dot_row(&self, o: usize, xs: &[Q8Row], out: &mut [f32], isa: Isa) {
        let blocks = self.cols / BLOCK;
        let first = o * blocks;
        let qs = &self.qs[first * P::BYTES..(first + blocks) * P::BYTES];
        let expand = |d: &mut [f32], m: &mut [f32]| {
            for b in 0..blocks {
                (d[b], m[b]) = self.scale_offset(first + b);
            }
        };
        if blocks <= STACK_BLOCKS {
            let (mut d, mut m) = ([0f32; STACK_BLOCKS], [0f32; STACK_BLOCKS]);
            expand(&mut d[..blocks], &mut m[..blocks]);
            P::dot_row(&d[..blocks], &m[..blocks], qs, xs, out, isa);
        } else {
            let (mut d, mut m) = (vec![0f32; blocks], vec![0f32; blocks]);
            expand(&mut d, &mut m);
            P::dot_row(&d, &m, qs, xs, out, isa);
        }
    }
}
