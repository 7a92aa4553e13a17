//! Our own CPU kernels for the hot quantized matmuls. candle 0.11's dot
//! products are scalar; these read each weight block once for every row of
//! a step (batched decode costs little more than one row) and use AVX2 where
//! the CPU has it, chosen at run time, with a scalar path that tests hold
//! them to. Every weight format is a `QuantMatrix`; `from_gguf` is the one
//! table from GGML type to kernel.

use std::sync::Arc;

use candle_core::quantized::GgmlDType;

pub mod bench;
pub mod dense;
pub mod half;
pub mod offset;
pub mod q4k_tiles;
pub mod q5_k;
pub mod q6k_tiles;
pub mod q8;
pub mod q8_0;
pub mod q8k;

use q8::Q8Row;
use q8k::Q8KRow;

/// The 8-bit activation layout a weight format multiplies against: each
/// quant type names its own, and an `Input` quantizes once per format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One scale per 32 values (`q8::Q8Row`): the 32-value block types.
    Q8,
    /// One scale per 256 values with sums per 16 (`q8k::Q8KRow`): K-quants,
    /// whose sub-block scales then stay inside the integer dot product.
    Q8K,
}

/// At most eight activation rows in the format a matrix asked for.
#[derive(Debug, Clone, Copy)]
pub enum Rows<'a> {
    Q8(&'a [Q8Row]),
    Q8K(&'a [Q8KRow]),
}

impl<'a> Rows<'a> {
    pub fn len(&self) -> usize {
        match self {
            Rows::Q8(rows) => rows.len(),
            Rows::Q8K(rows) => rows.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The rows of a 32-block format (what its matrix asked for).
    fn q8(self) -> &'a [Q8Row] {
        match self {
            Rows::Q8(rows) => rows,
            Rows::Q8K(_) => unreachable!("a Q8 matrix was given Q8K rows"),
        }
    }

    /// The rows of a K-quant format.
    fn q8k(self) -> &'a [Q8KRow] {
        match self {
            Rows::Q8K(rows) => rows,
            Rows::Q8(_) => unreachable!("a K-quant matrix was given Q8 rows"),
        }
    }
}

/// The activation rows of one step in every format its matrices need
/// (a format nobody asked for is empty).
#[derive(Debug, Clone, Copy, Default)]
pub struct Activations<'a> {
    pub q8: &'a [Q8Row],
    pub q8k: &'a [Q8KRow],
}

impl<'a> Activations<'a> {
    pub fn q8(rows: &'a [Q8Row]) -> Self {
        Self { q8: rows, q8k: &[] }
    }

    pub fn q8k(rows: &'a [Q8KRow]) -> Self {
        Self { q8: &[], q8k: rows }
    }

    fn tokens(&self) -> usize {
        self.q8.len().max(self.q8k.len())
    }

    /// Rows `tokens` in `format`.
    fn rows(&self, format: Format, tokens: std::ops::Range<usize>) -> Rows<'a> {
        match format {
            Format::Q8 => Rows::Q8(&self.q8[tokens]),
            Format::Q8K => Rows::Q8K(&self.q8k[tokens]),
        }
    }
}

/// A weight matrix our kernels multiply against 8-bit activations.
pub trait QuantMatrix: Send + Sync + std::fmt::Debug {
    /// `(rows, cols)`.
    fn shape(&self) -> (usize, usize);
    fn rows(&self) -> usize {
        self.shape().0
    }
    fn cols(&self) -> usize {
        self.shape().1
    }
    /// The activation layout `dot_row` reads.
    fn format(&self) -> Format {
        Format::Q8
    }
    /// Weight row `o` against at most eight activation rows (in `format()`),
    /// into `out[..xs.len()]`.
    fn dot_row(&self, o: usize, xs: Rows<'_>, out: &mut [f32], isa: Isa);
    /// Weight rows a kernel computes together (interleaved layouts): the
    /// caller's runs of rows start at multiples of it.
    fn row_group(&self) -> usize {
        1
    }
    /// Weight rows `first..first + count` against at most eight activation
    /// rows, into `out[t * count + (o - first)]`.
    fn dot_rows(&self, first: usize, count: usize, xs: Rows<'_>, out: &mut [f32], isa: Isa) {
        let mut column = [0f32; TOKEN_CHUNK];
        for o in 0..count {
            self.dot_row(first + o, xs, &mut column[..xs.len()], isa);
            for (t, &v) in column[..xs.len()].iter().enumerate() {
                out[t * count + o] = v;
            }
        }
    }
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
        GgmlDType::Q4K => Arc::new(q4k_tiles::Q4KTiles::from_gguf(dtype, bytes, rows, cols)?),
        GgmlDType::Q5K => Arc::new(q5_k::Q5KMatrix::from_gguf(bytes, rows, cols)?),
        GgmlDType::Q6K => Arc::new(q6k_tiles::Q6KTiles::from_gguf(bytes, rows, cols)?),
        _ => return None,
    })
}

/// The GGML types `from_gguf` has kernels for.
pub const KERNEL_TYPES: [GgmlDType; 8] = [
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q8_0,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
];

/// `y[t][o] = Σ_k w[o][k] · x[t][k]` (`[tokens, rows]`): each weight row is
/// read once for up to eight activation rows; rows are split over the pool.
pub fn matmul(w: &dyn QuantMatrix, x: &Activations<'_>, isa: Isa) -> Vec<f32> {
    matmul_many(&[w], x, isa).pop().unwrap_or_default()
}

/// `matmul` of several matrices over the same activations (q/k/v,
/// gate/up) in one parallel region; each result as `matmul` gives it.
pub fn matmul_many(matrices: &[&dyn QuantMatrix], x: &Activations<'_>, isa: Isa) -> Vec<Vec<f32>> {
    matmul_many_then(matrices, x, isa, &|_, _, _, _| {})
}

/// What a piece of a matmul does to its output before storing it: called
/// with (matrix, token row, first column, the columns' values) — a bias or
/// LoRA deltas added inside the matmul's own parallel region.
pub type Finish<'a> = &'a (dyn Fn(usize, usize, usize, &mut [f32]) + Sync);

/// `matmul_many`, each piece of output passed through `finish` first.
pub fn matmul_many_then(
    matrices: &[&dyn QuantMatrix],
    x: &Activations<'_>,
    isa: Isa,
    finish: Finish<'_>,
) -> Vec<Vec<f32>> {
    let rows: Vec<usize> = matrices.iter().map(|w| w.rows()).collect();
    let group = matrices.iter().map(|w| w.row_group()).max().unwrap_or(1);
    let dot = |m: usize, first, count, tokens, tile: &mut [f32]| {
        matrices[m].dot_rows(first, count, x.rows(matrices[m].format(), tokens), tile, isa)
    };
    matmul_rows_many(&rows, group, x.tokens(), dot, finish)
}

/// `dot_row` of a matrix whose kernel computes `group` rows at once: the
/// row's group, one column kept.
fn tiled_dot_row(w: &dyn QuantMatrix, o: usize, group: usize, xs: Rows<'_>, out: &mut [f32], isa: Isa) {
    let mut tile = vec![0f32; TOKEN_CHUNK * group];
    let first = o - o % group;
    let count = group.min(w.rows() - first);
    w.dot_rows(first, count, xs, &mut tile, isa);
    for (t, v) in out[..xs.len()].iter_mut().enumerate() {
        *v = tile[t * count + o - first];
    }
}

/// `dot_rows` from a kernel that fills `[token][row]` for the `group` rows
/// of group `g` (`dot_group(g, tile)`); a last, partial group's padding rows
/// are dropped.
fn tiled_dot_rows<const G: usize>(
    first: usize,
    count: usize,
    tokens: usize,
    out: &mut [f32],
    mut dot_group: impl FnMut(usize, &mut [[f32; G]; TOKEN_CHUNK]),
) {
    debug_assert_eq!(first % G, 0);
    let mut tile = [[0f32; G]; TOKEN_CHUNK];
    for g in first / G..(first + count).div_ceil(G) {
        dot_group(g, &mut tile);
        let (from, to) = (g * G, ((g + 1) * G).min(first + count));
        for (t, row) in tile.iter().take(tokens).enumerate() {
            out[t * count + from - first..t * count + to - first].copy_from_slice(&row[..to - from]);
        }
    }
}

/// Which implementation runs: decided once per process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// AVX2 plus AVX-512 (F, BW, VL) with VNNI (`vpdpbusd`: u8×i8 dot products
    /// in one instruction).
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
}

pub fn detect() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        let forced = std::env::var("TAILOR_KERNELS").unwrap_or_default();
        let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        let vnni = avx2 && avx512_vnni();
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

/// The AVX-512 features the `Avx512Vnni` kernels use (the 512-bit K-quant
/// kernels need byte/word operations too).
#[cfg(target_arch = "x86_64")]
fn avx512_vnni() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
}

/// Every ISA this CPU can run (for tests and `tailor bench-kernels`).
pub fn available() -> Vec<Isa> {
    let mut all = vec![Isa::Scalar];
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            all.push(Isa::Avx2);
            if avx512_vnni() {
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
/// `t`: `dot(o, range, out)` fills `out[i]` for weight row `o` and the (at
/// most eight) activation rows `range`.
fn matmul_rows(rows: usize, tokens: usize, dot: impl Fn(usize, std::ops::Range<usize>, &mut [f32]) + Sync) -> Vec<f32> {
    let dot = |_, first, count, range: std::ops::Range<usize>, tile: &mut [f32]| {
        let mut column = [0f32; TOKEN_CHUNK];
        let n = range.len();
        for o in 0..count {
            dot(first + o, range.clone(), &mut column[..n]);
            for (t, &v) in column[..n].iter().enumerate() {
                tile[t * count + o] = v;
            }
        }
    };
    matmul_rows_many(&[rows], 1, tokens, dot, &|_, _, _, _| {}).pop().unwrap_or_default()
}

/// Several matrices that read the same activations (q/k/v, gate/up) in one
/// parallel region: `dot(m, first, count, range, tile)` fills
/// `tile[t * count + i]` with row `first + i` of matrix `m` against activation
/// row `range.start + t` (at most eight); pieces start at multiples of
/// `group`; returns
/// each matrix's `[tokens, rows[m]]`. Weight rows are split over the rayon
/// pool in a few contiguous pieces per thread (one task per piece, one region
/// for all the matrices: a decode step's matmuls are tiny and waking the pool
/// is a large share of them). A piece walks eight activation rows at a time
/// (they stay in L1) across its weight rows and writes each activation row's
/// run of outputs contiguously.
fn matmul_rows_many(
    rows: &[usize],
    group: usize,
    tokens: usize,
    dot: impl Fn(usize, usize, usize, std::ops::Range<usize>, &mut [f32]) + Sync,
    finish: Finish<'_>,
) -> Vec<Vec<f32>> {
    use rayon::prelude::*;
    /// An output buffer shared by pieces that write disjoint columns.
    struct Columns(*mut f32);
    // SAFETY: pieces write disjoint elements and the buffers outlive them.
    unsafe impl Sync for Columns {}
    let mut ys: Vec<Vec<f32>> = rows.iter().map(|&r| vec![0f32; tokens * r]).collect();
    let total: usize = rows.iter().sum();
    if tokens == 0 || total == 0 {
        return ys;
    }
    let chunk = total.div_ceil(rayon::current_num_threads() * 4).max(8).next_multiple_of(group);
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
        for start in (0..tokens).step_by(TOKEN_CHUNK) {
            let count = TOKEN_CHUNK.min(tokens - start);
            dot(m, first, width, start..start + count, &mut tile[..count * width]);
            for (i, run) in tile.chunks_exact_mut(width).take(count).enumerate() {
                let t = start + i;
                finish(m, t, first, run);
                // SAFETY: t < tokens and first + width ≤ rows[m]; these
                // columns of matrix m belong to this piece alone.
                unsafe { std::ptr::copy_nonoverlapping(run.as_ptr(), columns[m].0.add(t * rows[m] + first), width) };
            }
        }
    });
    ys
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

    /// Activation rows in both formats.
    struct Both {
        q8: Vec<Q8Row>,
        q8k: Vec<Q8KRow>,
    }

    impl Both {
        fn new(tokens: usize, cols: usize) -> Self {
            let x: Vec<f32> = (0..tokens * cols).map(|i| (i as f32 * 0.37).sin() * 2.0).collect();
            Self { q8: Q8Row::quantize_rows(&x, cols), q8k: Q8KRow::quantize_rows(&x, cols) }
        }

        fn all(&self) -> Activations<'_> {
            Activations { q8: &self.q8, q8k: &self.q8k }
        }

        fn row(&self, t: usize) -> Activations<'_> {
            Activations { q8: &self.q8[t..t + 1], q8k: &self.q8k[t..t + 1] }
        }

        /// Row `t` as the values `format` stands for.
        fn dequantized(&self, format: Format, t: usize) -> Vec<f32> {
            match format {
                Format::Q8 => self.q8[t].dequantize(),
                Format::Q8K => self.q8k[t].dequantize(),
            }
        }
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
        let x = Both::new(11, cols);
        for dtype in KERNEL_TYPES {
            let (w, reference) = matrix(dtype, rows, cols);
            // Our unpacking is ggml's layout: the same weights as ggml's dequantizer.
            assert_eq!(w.dequantize(), reference, "{dtype:?} dequantize");
            let scalar = matmul(w.as_ref(), &x.all(), Isa::Scalar);
            for t in 0..11 {
                let exact = x.dequantized(w.format(), t);
                for o in 0..rows {
                    let want: f32 = (0..cols).map(|k| reference[o * cols + k] * exact[k]).sum();
                    let got = scalar[t * rows + o];
                    assert!((got - want).abs() <= 1e-4 * want.abs().max(1.0), "{dtype:?} t{t} o{o}: {got} vs {want}");
                }
            }
            for isa in available() {
                let fast = matmul(w.as_ref(), &x.all(), isa);
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
        let x = Both::new(13, 256);
        for dtype in KERNEL_TYPES {
            let (w, _) = matrix(dtype, 32, 256);
            for isa in available() {
                let batch = matmul(w.as_ref(), &x.all(), isa);
                for t in [0, 2, 7, 9, 12] {
                    let alone = matmul(w.as_ref(), &x.row(t), isa);
                    assert_eq!(&batch[t * 32..(t + 1) * 32], alone.as_slice(), "{dtype:?} row {t} ({isa:?})");
                }
            }
        }
    }

    #[test]
    fn matrices_sharing_a_region_give_what_each_gives_alone() {
        // Different activation formats in one region too (Q4_K_M files mix them).
        let (a, _) = matrix(GgmlDType::Q5_0, 24, 256);
        let (b, _) = matrix(GgmlDType::Q8_0, 72, 256);
        let (c, _) = matrix(GgmlDType::Q4K, 40, 256);
        let (e, _) = matrix(GgmlDType::Q6K, 16, 256);
        let x = Both::new(9, 256);
        for isa in available() {
            let all = matmul_many(&[a.as_ref(), b.as_ref(), c.as_ref(), e.as_ref()], &x.all(), isa);
            let alone: Vec<Vec<f32>> = [&a, &b, &c, &e].iter().map(|m| matmul(m.as_ref(), &x.all(), isa)).collect();
            assert_eq!(all, alone, "{isa:?}");
        }
    }
}
