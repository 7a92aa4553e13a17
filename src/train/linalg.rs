//! Dense matrix products for training: the `gemm` crate (AVX-512 kernels
//! where the CPU has them) over row-major slices, with transposed views so
//! no operand is ever copied to be transposed.

use num_traits::{Float, FromPrimitive};

/// The float types training runs in: float32 to train, float64 for the
/// gradient check.
pub trait Real:
    Float
    + FromPrimitive
    + std::ops::AddAssign
    + std::ops::SubAssign
    + std::ops::MulAssign
    + std::iter::Sum
    + Default
    + Send
    + Sync
    + std::fmt::Debug
    + 'static
{
    fn of(value: f64) -> Self {
        Self::from_f64(value).unwrap_or_else(Self::nan)
    }

    fn f64(self) -> f64 {
        self.to_f64().unwrap_or(f64::NAN)
    }
}

impl Real for f32 {}
impl Real for f64 {}

/// A read-only matrix: `rows × cols` at `data[r · row_stride + c · col_stride]`.
#[derive(Clone, Copy)]
pub struct View<'a, T> {
    data: &'a [T],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a, T> View<'a, T> {
    /// A row-major `rows × cols` matrix.
    pub fn new(data: &'a [T], rows: usize, cols: usize) -> Self {
        Self::strided(data, rows, cols, cols)
    }

    /// Row-major rows `row_stride` apart (a column block of a wider matrix).
    pub fn strided(data: &'a [T], rows: usize, cols: usize, row_stride: usize) -> Self {
        let view = Self { data, rows, cols, row_stride, col_stride: 1 };
        view.check();
        view
    }

    /// The transpose, without moving data.
    pub fn t(self) -> Self {
        Self { rows: self.cols, cols: self.rows, row_stride: self.col_stride, col_stride: self.row_stride, ..self }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    fn check(&self) {
        if self.rows > 0 && self.cols > 0 {
            let last = (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride;
            assert!(last < self.data.len(), "a {}×{} view past its {} values", self.rows, self.cols, self.data.len());
        }
    }
}

/// A row-major output block, rows `row_stride` apart.
pub struct ViewMut<'a, T> {
    data: &'a mut [T],
    rows: usize,
    cols: usize,
    row_stride: usize,
}

impl<'a, T> ViewMut<'a, T> {
    pub fn new(data: &'a mut [T], rows: usize, cols: usize) -> Self {
        Self::strided(data, rows, cols, cols)
    }

    pub fn strided(data: &'a mut [T], rows: usize, cols: usize, row_stride: usize) -> Self {
        if rows > 0 && cols > 0 {
            assert!((rows - 1) * row_stride + cols <= data.len(), "a {rows}×{cols} output past its end");
        }
        Self { data, rows, cols, row_stride }
    }
}

/// How a product spreads over threads: the whole rayon pool for the large
/// projections, one thread inside work that is already parallel.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Threads {
    Pool,
    One,
}

/// `out = scale · a · b`, or `out += scale · a · b` when `accumulate`.
pub fn matmul<T: Real>(out: ViewMut<T>, a: View<T>, b: View<T>, scale: T, accumulate: bool, threads: Threads) {
    assert_eq!(a.cols, b.rows, "inner dimensions");
    assert_eq!((out.rows, out.cols), (a.rows, b.cols), "output shape");
    let (m, n, k) = (a.rows, b.cols, a.cols);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                out.data[r * out.row_stride..r * out.row_stride + n].fill(T::zero());
            }
        }
        return;
    }
    let parallelism = match threads {
        Threads::Pool if rayon::current_num_threads() > 1 => gemm::Parallelism::Rayon(rayon::current_num_threads()),
        _ => gemm::Parallelism::None,
    };
    // SAFETY: every view was checked to lie inside its slice (`check`,
    // `ViewMut::strided`), the shapes agree (asserted above), and `out`
    // borrows its slice mutably, so it aliases neither operand.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.data.as_mut_ptr(),
            1,
            out.row_stride as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            T::one(),
            scale,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// `a · b` as a new row-major matrix.
pub fn product<T: Real>(a: View<T>, b: View<T>, threads: Threads) -> Vec<T> {
    let mut out = vec![T::zero(); a.rows * b.cols];
    matmul(ViewMut::new(&mut out, a.rows, b.cols), a, b, T::one(), false, threads);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
        (0..m * n).map(|i| (0..k).map(|j| a[i / n * k + j] * b[j * n + i % n]).sum()).collect()
    }

    #[test]
    fn products_of_views_and_transposes_match_the_definition() {
        let (m, k, n) = (5, 7, 3);
        let a: Vec<f64> = (0..m * k).map(|i| (i as f64 * 0.37).sin()).collect();
        let b: Vec<f64> = (0..k * n).map(|i| (i as f64 * 0.11).cos()).collect();
        let expected = naive(&a, &b, m, k, n);
        let got = product(View::new(&a, m, k), View::new(&b, k, n), Threads::Pool);
        assert!(got.iter().zip(&expected).all(|(x, y)| (x - y).abs() < 1e-12));
        // bᵀ stored row-major, read through a transposed view.
        let b_t: Vec<f64> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
        let got = product(View::new(&a, m, k), View::new(&b_t, n, k).t(), Threads::One);
        assert!(got.iter().zip(&expected).all(|(x, y)| (x - y).abs() < 1e-12));
        // Accumulating a scaled product into a column block of a wider output.
        let mut wide = vec![1.0; m * (n + 2)];
        matmul(
            ViewMut::strided(&mut wide[1..], m, n, n + 2),
            View::new(&a, m, k),
            View::new(&b, k, n),
            2.0,
            true,
            Threads::Pool,
        );
        for r in 0..m {
            assert_eq!(wide[r * (n + 2)], 1.0);
            for c in 0..n {
                assert!((wide[r * (n + 2) + 1 + c] - (1.0 + 2.0 * expected[r * n + c])).abs() < 1e-12);
            }
        }
    }
}
