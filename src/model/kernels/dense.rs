//! Float32 weights against float32 activations, on the same row-parallel
//! driver as the quantized kernels: each output is one dot product whose
//! summation order depends only on the weight row, never on how many rows
//! the batch holds, so a row's logits are the same alone or in any batch
//! (candle's float32 matmul picks its blocking from the batch's size, and
//! its last bits follow). The scalar path keeps the same eight-lane order.

use super::Isa;

#[derive(Debug, Clone)]
pub struct DenseMatrix {
    rows: usize,
    cols: usize,
    values: Vec<f32>,
}

impl DenseMatrix {
    /// From row-major values.
    pub fn new(values: Vec<f32>, rows: usize, cols: usize) -> Option<Self> {
        (values.len() == rows * cols).then_some(Self { rows, cols, values })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn values(&self) -> &[f32] {
        &self.values
    }

    pub fn bytes(&self) -> usize {
        self.values.len() * 4
    }

    /// `y[t][o] = Σ_k w[o][k] · x[t][k]` for `x` `[tokens, cols]`, row-major.
    pub fn matmul(&self, x: &[f32], isa: Isa) -> Vec<f32> {
        let rows: Vec<&[f32]> = x.chunks_exact(self.cols).collect();
        super::matmul_rows(self.rows, rows.len(), |o, range, out| {
            let w = &self.values[o * self.cols..(o + 1) * self.cols];
            let xs = &rows[range];
            match isa {
                // SAFETY: AVX2 and FMA come with the ISA choice.
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 | Isa::Avx512Vnni => {
                    // Four activation rows per pass over the weight row; each
                    // output's own sequence of operations is the one-row one.
                    let mut t = 0;
                    while t + 4 <= xs.len() {
                        let four = unsafe { dots_avx2(w, [xs[t], xs[t + 1], xs[t + 2], xs[t + 3]]) };
                        out[t..t + 4].copy_from_slice(&four);
                        t += 4;
                    }
                    for (x, y) in xs[t..].iter().zip(&mut out[t..]) {
                        *y = unsafe { dots_avx2(w, [x]) }[0];
                    }
                }
                _ => {
                    for (x, y) in xs.iter().zip(out.iter_mut()) {
                        *y = dot_scalar(w, x);
                    }
                }
            }
        })
    }
}

/// Two eight-lane accumulators over sixteen values at a time, then the
/// lanes summed pairwise and the tail in order: the AVX2 path's order.
fn dot_scalar(w: &[f32], x: &[f32]) -> f32 {
    let n = w.len().min(x.len());
    let (mut a, mut b) = ([0f32; 8], [0f32; 8]);
    let mut k = 0;
    while k + 16 <= n {
        for l in 0..8 {
            a[l] = w[k + l].mul_add(x[k + l], a[l]);
            b[l] = w[k + 8 + l].mul_add(x[k + 8 + l], b[l]);
        }
        k += 16;
    }
    let v: Vec<f32> = a.iter().zip(&b).map(|(a, b)| a + b).collect();
    let sum4: Vec<f32> = (0..4).map(|l| v[l + 4] + v[l]).collect();
    let sum2 = [sum4[0] + sum4[2], sum4[1] + sum4[3]];
    let mut sum = sum2[0] + sum2[1];
    while k < n {
        sum += w[k] * x[k];
        k += 1;
    }
    sum
}

/// `w` against `N` activation rows at once (the weight loaded once): two
/// eight-lane accumulators per row over sixteen values at a time, the lanes
/// summed by `hsum`, the tail in order. Each row's operations are the same
/// whatever `N`, so one row alone gives the bits it gives among four.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dots_avx2<const N: usize>(w: &[f32], xs: [&[f32]; N]) -> [f32; N] {
    use std::arch::x86_64::*;
    let n = xs.iter().fold(w.len(), |n, x| n.min(x.len()));
    let mut a = [_mm256_setzero_ps(); N];
    let mut b = [_mm256_setzero_ps(); N];
    let mut k = 0;
    while k + 16 <= n {
        let (w0, w1) = (_mm256_loadu_ps(w.as_ptr().add(k)), _mm256_loadu_ps(w.as_ptr().add(k + 8)));
        for r in 0..N {
            a[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xs[r].as_ptr().add(k)), a[r]);
            b[r] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xs[r].as_ptr().add(k + 8)), b[r]);
        }
        k += 16;
    }
    let mut sums = [0f32; N];
    for r in 0..N {
        let mut sum = super::hsum(_mm256_add_ps(a[r], b[r]));
        for j in k..n {
            sum += w[j] * xs[r][j];
        }
        sums[r] = sum;
    }
    sums
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_isa_gives_the_same_bits_and_rows_are_batch_invariant() {
        let (rows, cols) = (24, 200); // 200: a tail after the 16-wide loop
        let w: Vec<f32> = (0..rows * cols).map(|i| ((i as f32) * 0.37).sin()).collect();
        let x: Vec<f32> = (0..5 * cols).map(|i| ((i as f32) * 0.11).cos()).collect();
        let m = DenseMatrix::new(w.clone(), rows, cols).expect("sizes");
        let reference = m.matmul(&x, Isa::Scalar);
        for t in 0..5 {
            for o in 0..rows {
                let want: f64 = (0..cols).map(|k| w[o * cols + k] as f64 * x[t * cols + k] as f64).sum();
                let got = reference[t * rows + o] as f64;
                assert!((got - want).abs() <= 1e-4 * want.abs().max(1.0), "{got} vs {want}");
            }
        }
        for isa in super::super::available() {
            let y = m.matmul(&x, isa);
            assert_eq!(y, reference, "{isa:?} gives the scalar path's bits");
            for t in 0..5 {
                let alone = m.matmul(&x[t * cols..(t + 1) * cols], isa);
                assert_eq!(&y[t * rows..(t + 1) * rows], alone.as_slice(), "{isa:?} row {t}");
            }
        }
    }
}
