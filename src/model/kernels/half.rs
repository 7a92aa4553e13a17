//! 16-bit float weights (F16 or BF16) kept as stored, against float32
//! activations: a 7 B F16 model needs 14 GB, not the 28 GB of an upcast.
//! Each weight is widened to f32 in registers (F16C `vcvtph2ps`, or a shift
//! for BF16) and multiplied in f32, so the result is what the float32 path
//! gives up to summation order.

use half::{bf16, f16};

use super::Isa;

/// Which 16-bit format the bits hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HalfKind {
    F16,
    Bf16,
}

impl HalfKind {
    /// The kind of a 16-bit float tensor dtype.
    pub fn of(dtype: candle_core::DType) -> Option<Self> {
        match dtype {
            candle_core::DType::F16 => Some(Self::F16),
            candle_core::DType::BF16 => Some(Self::Bf16),
            _ => None,
        }
    }

    fn to_f32(self, bits: u16) -> f32 {
        match self {
            Self::F16 => f16::from_bits(bits).to_f32(),
            Self::Bf16 => bf16::from_bits(bits).to_f32(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct HalfMatrix {
    rows: usize,
    cols: usize,
    kind: HalfKind,
    bits: Vec<u16>,
}

/// One activation row, float32.
pub struct Row<'a>(pub &'a [f32]);

impl HalfMatrix {
    /// From row-major 16-bit values.
    pub fn new(kind: HalfKind, bits: Vec<u16>, rows: usize, cols: usize) -> Option<Self> {
        (bits.len() == rows * cols).then_some(Self { rows, cols, kind, bits })
    }

    /// From float32 values, rounded to nearest even as `half` does.
    pub fn from_f32(kind: HalfKind, values: &[f32], rows: usize, cols: usize) -> Option<Self> {
        let bits = match kind {
            HalfKind::F16 => values.iter().map(|&v| f16::from_f32(v).to_bits()).collect(),
            HalfKind::Bf16 => values.iter().map(|&v| bf16::from_f32(v).to_bits()).collect(),
        };
        Self::new(kind, bits, rows, cols)
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn bytes(&self) -> usize {
        self.bits.len() * 2
    }

    /// Rows `ids` widened to float32, `[ids.len(), cols]` (an embedding lookup).
    pub fn gather(&self, ids: &[u32]) -> Option<Vec<f32>> {
        let mut out = Vec::with_capacity(ids.len() * self.cols);
        for &id in ids {
            let row = self.bits.get(id as usize * self.cols..(id as usize + 1) * self.cols)?;
            out.extend(row.iter().map(|&b| self.kind.to_f32(b)));
        }
        Some(out)
    }

    pub fn dequantize(&self) -> Vec<f32> {
        self.bits.iter().map(|&b| self.kind.to_f32(b)).collect()
    }

    /// `y[t][o] = Σ_k w[o][k] · x[t][k]` for `x` `[tokens, cols]`, row-major.
    pub fn matmul(&self, x: &[f32], isa: Isa) -> Vec<f32> {
        let rows: Vec<Row> = x.chunks_exact(self.cols).map(Row).collect();
        super::matmul_rows(self.rows, rows.len(), |o, range, out| self.dot_row(o, &rows[range], out, isa))
    }

    fn dot_row(&self, o: usize, xs: &[Row], out: &mut [f32], isa: Isa) {
        let w = &self.bits[o * self.cols..(o + 1) * self.cols];
        match isa {
            // SAFETY: AVX2 + FMA come with the ISA choice; F16C is checked here
            // (a cached flag).
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 | Isa::Avx512Vnni if is_x86_feature_detected!("f16c") => {
                for (x, o) in xs.iter().zip(out.iter_mut()) {
                    *o = unsafe { dot_avx2(self.kind, w, x.0) };
                }
            }
            _ => {
                for (x, o) in xs.iter().zip(out.iter_mut()) {
                    *o = w.iter().zip(x.0).map(|(&b, &v)| self.kind.to_f32(b) * v).sum();
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_avx2(kind: HalfKind, w: &[u16], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = w.len().min(x.len());
    let widen = |p: *const u16| -> __m256 {
        let raw = _mm_loadu_si128(p as *const __m128i);
        match kind {
            HalfKind::F16 => _mm256_cvtph_ps(raw),
            // bf16 is the top half of an f32.
            HalfKind::Bf16 => _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16)),
        }
    };
    let (mut a, mut b) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut k = 0;
    while k + 16 <= n {
        a = _mm256_fmadd_ps(widen(w.as_ptr().add(k)), _mm256_loadu_ps(x.as_ptr().add(k)), a);
        b = _mm256_fmadd_ps(widen(w.as_ptr().add(k + 8)), _mm256_loadu_ps(x.as_ptr().add(k + 8)), b);
        k += 16;
    }
    let mut sum = super::hsum(_mm256_add_ps(a, b));
    while k < n {
        sum += kind.to_f32(w[k]) * x[k];
        k += 1;
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_isa_gives_the_float32_product_and_rows_are_batch_invariant() {
        let (rows, cols) = (24, 200); // 200: a tail after the 16-wide loop
        let w: Vec<f32> = (0..rows * cols).map(|i| ((i as f32) * 0.37).sin()).collect();
        let x: Vec<f32> = (0..5 * cols).map(|i| ((i as f32) * 0.11).cos()).collect();
        for kind in [HalfKind::F16, HalfKind::Bf16] {
            let m = HalfMatrix::from_f32(kind, &w, rows, cols).expect("sizes");
            let dense = m.dequantize();
            for isa in super::super::available() {
                let y = m.matmul(&x, isa);
                for t in 0..5 {
                    for o in 0..rows {
                        let want: f32 = (0..cols).map(|k| dense[o * cols + k] * x[t * cols + k]).sum();
                        let got = y[t * rows + o];
                        assert!((got - want).abs() <= 1e-4 * want.abs().max(1.0), "{kind:?} {isa:?}: {got} vs {want}");
                    }
                    let alone = m.matmul(&x[t * cols..(t + 1) * cols], isa);
                    assert_eq!(&y[t * rows..(t + 1) * rows], alone.as_slice(), "{kind:?} {isa:?} row {t}");
                }
            }
        }
    }
}
