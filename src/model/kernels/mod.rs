//! Our own CPU kernels for the hot quantized matmuls. candle 0.11's dot
//! products are scalar; these read each weight block once for every row of
//! a step (batched decode costs little more than one row) and use AVX2 where
//! the CPU has it, chosen at run time, with a scalar path that tests hold
//! them to. Every weight format is a `QuantMatrix`; `from_gguf` is the one
//! table from GGML type to kernel.

use std::sync::Arc;

use candle_core::quantized::GgmlDType;

pub mod bench;
pub mod half;
pub mod offset;
pub mod q8;
pub mod q8_0;

/// A weight matrix our kernels multiply against Q8 activations.
pub trait QuantMatrix: Send + Sync + std::fmt::Debug {
    /// `(rows, cols)`.
    fn shape(&self) -> (usize, usize);
    fn rows(&self) -> usize {
        self.shape().0
    }
    fn cols(&self) -> usize {
        self.shape().1
    }
    /// Weight row `o` against at most eight activation rows, into `out[..xs.len()]`.
    fn dot_row(&self, o: usize, xs: &[q8::Q8Row], out: &mut [f32], isa: Isa);
    /// The weights as float32, row-major (tests and tools).
    fn dequantize(&self) -> Vec<f32>;
    /// Bytes held in memory.
    fn bytes(&self) -> usize;
}

/// The kernel for a GGML block type, from its raw GGUF bytes; `None` for a
/// type without one (it then runs through candle) or malformed sizes.
pub fn from_gguf(dtype: GgmlDType, bytes: &[u8], rows: usize, cols: usize) -> Option<Arc<dyn QuantMatrix>> {
    Some(match dtype {
        GgmlDType::Q4_0 | GgmlDType::Q4_1 => Arc::new(offset::Q4Matrix::from_gguf(dtype, bytes, rows, cols)?),
        GgmlDType::Q5_0 | GgmlDType::Q5_1 => Arc::new(offset::Q5Matrix::from_gguf(dtype, bytes, rows, cols)?),
        GgmlDType::Q8_0 => Arc::new(q8_0::Q8_0Matrix::from_gguf_bytes(bytes, rows, cols)?),
        _ => return None,
    })
}

/// The GGML types `from_gguf` has kernels for.
pub const KERNEL_TYPES: [GgmlDType; 5] =
    [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q5_1, GgmlDType::Q8_0];

/// `y[t][o] = Σ_k w[o][k] · x[t][k]` (`[tokens, rows]`): each weight row is
/// read once for up to eight activation rows; rows are split over the pool.
pub fn matmul(w: &dyn QuantMatrix, x: &[q8::Q8Row], isa: Isa) -> Vec<f32> {
    matmul_rows(w.rows(), x, |o, xs, out| w.dot_row(o, xs, out, isa))
}

/// `matmul` of several matrices over the same activations (q/k/v,
/// gate/up) in one parallel region; each result as `matmul` gives it.
pub fn matmul_many(matrices: &[&dyn QuantMatrix], x: &[q8::Q8Row], isa: Isa) -> Vec<Vec<f32>> {
    let rows: Vec<usize> = matrices.iter().map(|w| w.rows()).collect();
    matmul_rows_many(&rows, x, |m, o, xs, out| matrices[m].dot_row(o, xs, out, isa))
}

/// Which implementation runs: decided once per process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// AVX2 plus AVX-512 VNNI (`vpdpbusd`: u8×i8 dot products in one instruction).
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
}

pub fn detect() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        let forced = std::env::var("TAILOR_KERNELS").unwrap_or_default();
        let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        let vnni = avx2 && is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl");
        match forced.as_str() {
            "scalar" => return Isa::Scalar,
            "avx2" if avx2 => return Isa::Avx2,
            _ if vnni => return Isa::Avx512Vnni,
            _ if avx2 => return Isa::Avx2,
            _ => {}
        }
    }
    Isa::Scalar
}

/// Every ISA this CPU can run (for tests and `tailor bench-kernels`).
pub fn available() -> Vec<Isa> {
    let mut all = vec![Isa::Scalar];
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            all.push(Isa::Avx2);
            if is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl") {
                all.push(Isa::Avx512Vnni);
            }
        }
    }
    all
}

/// The ISA in use (`TAILOR_KERNELS=scalar|avx2` forces one), detected on first call.
pub fn isa() -> Isa {
    static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *ISA.get_or_init(detect)
}

/// Activation rows that share one unpacking of each weight block.
const TOKEN_CHUNK: usize = 8;

/// Calls `$call` with the const `R` equal to `$n` (1..=8): a kernel
/// instantiated per row count keeps each row's accumulators in registers.
macro_rules! by_count {
    ($n:expr, |$r:ident| $call:expr) => {
        match $n {
            1 => {
                const $r: usize = 1;
                $call
            }
            2 => {
                const $r: usize = 2;
                $call
            }
            3 => {
                const $r: usize = 3;
                $call
            }
            4 => {
                const $r: usize = 4;
                $call
            }
            5 => {
                const $r: usize = 5;
                $call
            }
            6 => {
                const $r: usize = 6;
                $call
            }
            7 => {
                const $r: usize = 7;
                $call
            }
            8 => {
                const $r: usize = 8;
                $call
            }
            n => unreachable!("{n} activation rows in one kernel call"),
        }
    };
}
pub(crate) use by_count;

/// `y[t][o]` (`[tokens, rows]`) for `rows` outputs and every activation row
/// `t`: `dot(o, xs, out)` fills `out[i]` for weight row `o` and the (at most
/// eight) activation rows `xs`.
fn matmul_rows<X: Sync>(rows: usize, x: &[X], dot: impl Fn(usize, &[X], &mut [f32]) + Sync) -> Vec<f32> {
    matmul_rows_many(&[rows], x, |_, o, xs, out| dot(o, xs, out)).pop().unwrap_or_default()
}

/// Several matrices that read the same activations (q/k/v, gate/up) in one
/// parallel region: `dot(m, o, xs, out)` is row `o` of matrix `m`; returns
/// each matrix's `[tokens, rows[m]]`. Weight rows are split over the rayon
/// pool in a few contiguous pieces per thread (one task per piece, one region
/// for all the matrices: a decode step's matmuls are tiny and waking the pool
/// is a large share of them). A piece walks eight activation rows at a time
/// (they stay in L1) across its weight rows and writes each activation row's
/// run of outputs contiguously.
fn matmul_rows_many<X: Sync>(
    rows: &[usize],
    x: &[X],
    dot: impl Fn(usize, usize, &[X], &mut [f32]) + Sync,
) -> Vec<Vec<f32>> {
    use rayon::prelude::*;
    /// An output buffer shared by pieces that write disjoint columns.
    struct Columns(*mut f32);
    // SAFETY: pieces write disjoint elements and the buffers outlive them.
    unsafe impl Sync for Columns {}
    let tokens = x.len();
    let mut ys: Vec<Vec<f32>> = rows.iter().map(|&r| vec![0f32; tokens * r]).collect();
    let total: usize = rows.iter().sum();
    if tokens == 0 || total == 0 {
        return ys;
    }
    let chunk = total.div_ceil(rayon::current_num_threads() * 4).max(8);
    // (matrix, first row, width) of every piece.
    let pieces: Vec<(usize, usize, usize)> = rows
        .iter()
        .enumerate()
        .flat_map(|(m, &r)| (0..r).step_by(chunk).map(move |first| (m, first, chunk.min(r - first))))
        .collect();
    let columns: Vec<Columns> = ys.iter_mut().map(|y| Columns(y.as_mut_ptr())).collect();
    let columns = &columns;
    pieces.into_par_iter().for_each(|(m, first, width)| {
        // tile[i][o - first] for the current eight activation rows.
        let mut tile = vec![0f32; TOKEN_CHUNK * width];
        let mut out = [0f32; TOKEN_CHUNK];
        for (c, xs) in x.chunks(TOKEN_CHUNK).enumerate() {
            for o in 0..width {
                dot(m, first + o, xs, &mut out[..xs.len()]);
                for (i, &v) in out[..xs.len()].iter().enumerate() {
                    tile[i * width + o] = v;
                }
            }
            for (i, run) in tile.chunks_exact(width).take(xs.len()).enumerate() {
                let t = c * TOKEN_CHUNK + i;
                // SAFETY: t < tokens and first + width ≤ rows[m]; these
                // columns of matrix m belong to this piece alone.
                unsafe { std::ptr::copy_nonoverlapping(run.as_ptr(), columns[m].0.add(t * rows[m] + first), width) };
            }
        }
    });
    ys
}

/// One weight row against `R` activation rows (1 ≤ R ≤ 8), each weight block
/// loaded (`|p| unpack`, `p` = the block's first byte) once for all of them
/// and multiplied into i32 lanes by `|w, v| dot`. Every activation row gets
/// exactly the same operations in the same order whatever `R` is: its own
/// two vector accumulators (even and odd blocks, so consecutive fused
/// multiply-adds do not wait on each other), the second starting from the
/// lanes of the offset term `Σ m·s` (Q4_1; `m` is empty for formats without
/// offsets), and one final horizontal sum — so a row gives the same bits
/// alone or in any batch.
macro_rules! row_kernel {
    ($name:ident, $features:literal, $elem:ty, $block_bytes:expr, |$p:ident| $unpack:expr, |$w:ident, $v:ident| $dot:expr) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $name<const R: usize>(d: &[f32], m: &[f32], qs: &[$elem], xs: &[Q8Row], out: &mut [f32]) {
            use std::arch::x86_64::*;
            debug_assert!(xs.len() == R && out.len() >= R && qs.len() >= d.len() * $block_bytes);
            let blocks = d.len();
            let q8: [*const i8; R] = std::array::from_fn(|t| xs[t].qs.as_ptr());
            let dx: [*const f32; R] = std::array::from_fn(|t| xs[t].d.as_ptr());
            let mut even = [_mm256_setzero_ps(); R];
            let mut odd: [__m256; R] = std::array::from_fn(|t| super::offset_lanes(m, &xs[t].s));
            let mut b = 0;
            while b < blocks {
                let pair = b + 1 < blocks;
                let w0: __m256i = {
                    let $p = qs.as_ptr().add(b * $block_bytes);
                    $unpack
                };
                let w1: __m256i = if pair {
                    let $p = qs.as_ptr().add((b + 1) * $block_bytes);
                    $unpack
                } else {
                    _mm256_setzero_si256()
                };
                // The weight scales, once per block for every activation row.
                let d0 = _mm256_set1_ps(d[b]);
                let d1 = if pair { _mm256_set1_ps(d[b + 1]) } else { _mm256_setzero_ps() };
                for t in 0..R {
                    let v = _mm256_loadu_si256(q8[t].add(b * super::q8::BLOCK) as *const __m256i);
                    let dot: __m256i = {
                        let ($w, $v) = (w0, v);
                        $dot
                    };
                    let scaled = _mm256_mul_ps(_mm256_cvtepi32_ps(dot), d0);
                    even[t] = _mm256_fmadd_ps(scaled, _mm256_broadcast_ss(&*dx[t].add(b)), even[t]);
                    if pair {
                        let v = _mm256_loadu_si256(q8[t].add((b + 1) * super::q8::BLOCK) as *const __m256i);
                        let dot: __m256i = {
                            let ($w, $v) = (w1, v);
                            $dot
                        };
                        let scaled = _mm256_mul_ps(_mm256_cvtepi32_ps(dot), d1);
                        odd[t] = _mm256_fmadd_ps(scaled, _mm256_broadcast_ss(&*dx[t].add(b + 1)), odd[t]);
                    }
                }
                b += 2;
            }
            for t in 0..R {
                out[t] = super::hsum(_mm256_add_ps(even[t], odd[t]));
            }
        }
    };
}
pub(crate) use row_kernel;

/// Lane j = `Σ m[i]·s[i]` over i ≡ j (mod 8); zeros for an empty `m`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn offset_lanes(m: &[f32], s: &[f32]) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let n = m.len().min(s.len());
    let mut acc = _mm256_setzero_ps();
    let mut i = 0;
    while i + 8 <= n {
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(m.as_ptr().add(i)), _mm256_loadu_ps(s.as_ptr().add(i)), acc);
        i += 8;
    }
    if i < n {
        // Lanes past the end are masked off: no read, zero value.
        let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32((n - i) as i32), lane);
        let tail_m = _mm256_maskload_ps(m.as_ptr().add(i), mask);
        let tail_s = _mm256_maskload_ps(s.as_ptr().add(i), mask);
        acc = _mm256_fmadd_ps(tail_m, tail_s, acc);
    }
    acc
}

/// u8 × i8 products summed four by four into i32 lanes, in pairs to i16 first
/// (no overflow for the value ranges the kernels feed it: 15·127·2 < 2^15).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn udot_avx2(a: std::arch::x86_64::__m256i, b: std::arch::x86_64::__m256i) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1))
}

/// The same four-way u8 × i8 sums in one instruction.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,avx512vnni,avx512vl")]
#[inline]
unsafe fn udot_vnni(a: std::arch::x86_64::__m256i, b: std::arch::x86_64::__m256i) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    _mm256_dpbusd_epi32(_mm256_setzero_si256(), a, b)
}

/// Horizontal sum of eight f32 lanes, in a fixed order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn hsum(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let sum4 = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
    let sum2 = _mm_add_ps(sum4, _mm_movehl_ps(sum4, sum4));
    _mm_cvtss_f32(_mm_add_ss(sum2, _mm_shuffle_ps(sum2, sum2, 1)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};
    use q8::Q8Row;

    fn activations(tokens: usize, cols: usize) -> Vec<Q8Row> {
        (0..tokens)
            .map(|t| {
                Q8Row::quantize(&(0..cols).map(|k| ((t * cols + k) as f32 * 0.37).sin() * 2.0).collect::<Vec<_>>())
            })
            .collect()
    }

    /// A matrix of `dtype` as ggml quantizes it (candle's port of ggml's quantizers).
    fn matrix(dtype: GgmlDType, rows: usize, cols: usize) -> (Arc<dyn QuantMatrix>, Vec<f32>) {
        let dense: Vec<f32> =
            (0..rows * cols).map(|i| ((i as f32) * 0.731).sin() * 0.1 + ((i % 7) as f32 - 3.0) * 0.01).collect();
        let t = Tensor::from_vec(dense, (rows, cols), &Device::Cpu).expect("tensor");
        let q = QTensor::quantize(&t, dtype).expect("quantize");
        let reference =
            q.dequantize(&Device::Cpu).expect("dequantize").flatten_all().expect("flat").to_vec1().expect("vec");
        let matrix = from_gguf(dtype, &q.data().expect("bytes"), rows, cols).expect("a kernel for the type");
        (matrix, reference)
    }

    #[test]
    fn every_type_reads_ggml_blocks_and_every_isa_gives_the_scalar_result() {
        let (rows, cols) = (40, 512);
        // 11 activation rows: one full chunk of 8 and a partial one.
        let x = activations(11, cols);
        for dtype in KERNEL_TYPES {
            let (w, reference) = matrix(dtype, rows, cols);
            // Our unpacking is ggml's layout: the same weights as ggml's dequantizer.
            assert_eq!(w.dequantize(), reference, "{dtype:?} dequantize");
            let scalar = matmul(w.as_ref(), &x, Isa::Scalar);
            for t in 0..x.len() {
                let exact: Vec<f32> = x[t]
                    .qs
                    .iter()
                    .zip(x[t].d.iter().flat_map(|d| std::iter::repeat_n(*d, q8::BLOCK)))
                    .map(|(&q, d)| q as f32 * d)
                    .collect();
                for o in 0..rows {
                    let want: f32 = (0..cols).map(|k| reference[o * cols + k] * exact[k]).sum();
                    let got = scalar[t * rows + o];
                    assert!((got - want).abs() <= 1e-4 * want.abs().max(1.0), "{dtype:?} t{t} o{o}: {got} vs {want}");
                }
            }
            for isa in available() {
                let fast = matmul(w.as_ref(), &x, isa);
                for (a, b) in scalar.iter().zip(&fast) {
                    // Same integer sums; only the f32 accumulation order differs.
                    assert!((a - b).abs() <= 1e-4 * a.abs().max(1.0), "{dtype:?} {isa:?}: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn a_row_gives_the_same_bits_alone_and_in_a_batch() {
        // Decode (fewer than 8 rows) and prefill (chunks of 8) paths agree bit for bit.
        let x = activations(13, 256);
        for dtype in KERNEL_TYPES {
            let (w, _) = matrix(dtype, 32, 256);
            for isa in available() {
                let batch = matmul(w.as_ref(), &x, isa);
                for t in [0, 2, 7, 9, 12] {
                    let alone = matmul(w.as_ref(), &x[t..t + 1], isa);
                    assert_eq!(&batch[t * 32..(t + 1) * 32], alone.as_slice(), "{dtype:?} row {t} ({isa:?})");
                }
            }
        }
    }

    #[test]
    fn matrices_sharing_a_region_give_what_each_gives_alone() {
        let (a, _) = matrix(GgmlDType::Q5_0, 24, 256);
        let (b, _) = matrix(GgmlDType::Q8_0, 72, 256);
        let x = activations(9, 256);
        for isa in available() {
            let both = matmul_many(&[a.as_ref(), b.as_ref()], &x, isa);
            assert_eq!(both, vec![matmul(a.as_ref(), &x, isa), matmul(b.as_ref(), &x, isa)], "{isa:?}");
        }
    }
}
