//! The two LoRA products on the CPU: `down` (`scale · x·Aᵀ`, into the rank
//! space) and `up` (`+= xa·Bᵀ` on some output columns), over weights kept
//! in float32 or float16 (`Values`).
//!
//! Every output element is summed in one fixed order whatever the batch and
//! however the work is split (batch invariance): a dot product runs in eight
//! lanes, reduced as `((l0+l4)+(l1+l5))+((l2+l6)+(l3+l7))`, then its tail;
//! an output column adds the rank's terms in order. Float16 weights are
//! widened exactly to float32 before use. The AVX2 kernels use fused
//! multiply-adds in exactly that order, so they give the bits of the portable
//! loops with `FUSED` (tested), only faster.

use std::ops::Range;

use super::{LoraWeights, Values};
use crate::model::kernels::Isa;

/// Rows of one adapter whose down products share each load of `A`.
pub const DOWN_BLOCK: usize = 4;

/// A stored weight value, widened exactly to float32.
pub trait Element: Copy + Send + Sync {
    fn widen(self) -> f32;
}

impl Element for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl Element for half::f16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

/// Whether this CPU converts float16 in hardware (every AVX2 CPU we know
/// does; checked all the same).
#[cfg(target_arch = "x86_64")]
fn f16c() -> bool {
    static F16C: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *F16C.get_or_init(|| is_x86_feature_detected!("f16c"))
}

/// `out[(j - js.start)·rows.len() + i] = scale · x_{rows[i]}·A_j` for the
/// rank entries `js` and the (at most `DOWN_BLOCK`) `rows` of `x`
/// (`[tokens, in]`): rank-major, so a block's entries split into pieces.
/// `scale` is the adapter's own (`w.scale`) times the rows' weight in a composition.
pub fn down(isa: Isa, w: &LoraWeights, scale: f32, x: &[f32], rows: &[usize], js: Range<usize>, out: &mut [f32]) {
    assert!(!rows.is_empty() && rows.len() <= DOWN_BLOCK && js.end <= w.rank && out.len() == js.len() * rows.len());
    let n = w.in_features;
    let mut xs = [&x[..0]; DOWN_BLOCK];
    for (slot, &row) in xs.iter_mut().zip(rows) {
        *slot = &x[row * n..(row + 1) * n];
    }
    let xs = &xs[..rows.len()];
    match (isa, &w.a) {
        // SAFETY: the AVX2 ISAs are only chosen when the CPU has AVX2 and FMA;
        // the float16 kernels only run where it converts float16 as well.
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2 | Isa::Avx512Vnni, Values::F32(a)) => unsafe { avx2_f32::down(w, scale, a, xs, js, out) },
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2 | Isa::Avx512Vnni, Values::F16(a)) if f16c() => unsafe { avx2_f16::down(w, scale, a, xs, js, out) },
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2 | Isa::Avx512Vnni, Values::F16(a)) => portable::down::<true, _>(w, scale, a, xs, js, out),
        (Isa::Scalar, Values::F32(a)) => portable::down::<false, _>(w, scale, a, xs, js.clone(), out),
        (Isa::Scalar, Values::F16(a)) => portable::down::<false, _>(w, scale, a, xs, js.clone(), out),
    }
}

/// `cols += (xa·Bᵀ)[first..]`: output columns `first..first + cols.len()`,
/// each summed over the rank in order — the same bits however the columns
/// are split. The row's rank entries are `xa[0]`, `xa[stride]`, … (a
/// block's down products are rank-major).
pub fn up(isa: Isa, w: &LoraWeights, xa: &[f32], stride: usize, first: usize, cols: &mut [f32]) {
    assert!(first + cols.len() <= w.out_features && stride > 0 && xa.len() > (w.rank - 1) * stride);
    match (isa, &w.b_t) {
        // SAFETY: as in `down`.
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2 | Isa::Avx512Vnni, Values::F32(b)) => unsafe { avx2_f32::up(w, b, xa, stride, first, cols) },
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2 | Isa::Avx512Vnni, Values::F16(b)) if f16c() => unsafe {
            avx2_f16::up(w, b, xa, stride, first, cols)
        },
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2 | Isa::Avx512Vnni, Values::F16(b)) => portable::up::<true, _>(w, b, xa, stride, first, cols),
        (Isa::Scalar, Values::F32(b)) => portable::up::<false, _>(w, b, xa, stride, first, cols),
        (Isa::Scalar, Values::F16(b)) => portable::up::<false, _>(w, b, xa, stride, first, cols),
    }
}

/// Plain loops: the reference order, and the kernels of CPUs without AVX2
/// (`FUSED` = false there: a fused multiply-add would be a library call).
mod portable {
    use super::{Element, LoraWeights};

    pub fn down<const FUSED: bool, E: Element>(
        w: &LoraWeights,
        scale: f32,
        a: &[E],
        xs: &[&[f32]],
        js: std::ops::Range<usize>,
        out: &mut [f32],
    ) {
        let n = w.in_features;
        for (i, x_row) in xs.iter().enumerate() {
            for j in js.clone() {
                out[(j - js.start) * xs.len() + i] = scale * dot::<FUSED, E>(x_row, &a[j * n..(j + 1) * n]);
            }
        }
    }

    pub fn up<const FUSED: bool, E: Element>(
        w: &LoraWeights,
        b_t: &[E],
        xa: &[f32],
        stride: usize,
        first: usize,
        cols: &mut [f32],
    ) {
        let n = w.out_features;
        for (j, &c) in xa.iter().step_by(stride).take(w.rank).enumerate() {
            let b = &b_t[j * n + first..j * n + first + cols.len()];
            for (y, &v) in cols.iter_mut().zip(b) {
                *y = madd::<FUSED>(c, v.widen(), *y);
            }
        }
    }

    pub fn madd<const FUSED: bool>(a: f32, b: f32, c: f32) -> f32 {
        if FUSED {
            a.mul_add(b, c)
        } else {
            a * b + c
        }
    }

    pub fn dot<const FUSED: bool, E: Element>(a: &[f32], b: &[E]) -> f32 {
        let mut lanes = [0f32; 8];
        for (ca, cb) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
            for k in 0..8 {
                lanes[k] = madd::<FUSED>(ca[k], cb[k].widen(), lanes[k]);
            }
        }
        let mut sum = super::reduce(&lanes);
        for i in a.len() / 8 * 8..a.len() {
            sum = madd::<FUSED>(a[i], b[i].widen(), sum);
        }
        sum
    }
}

/// The eight lanes of a dot product summed in the kernels' one order.
fn reduce(l: &[f32; 8]) -> f32 {
    ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7]))
}

/// Eight float32 weights from memory.
#[cfg(target_arch = "x86_64")]
macro_rules! load_f32 {
    ($p:expr) => {
        _mm256_loadu_ps($p)
    };
}

/// Eight float16 weights from memory, widened (exactly) to float32.
#[cfg(target_arch = "x86_64")]
macro_rules! load_f16 {
    ($p:expr) => {
        _mm256_cvtph_ps(_mm_loadu_si128($p as *const __m128i))
    };
}

/// The AVX2 kernels for one stored element type (`$load` reads eight).
#[cfg(target_arch = "x86_64")]
macro_rules! avx2_kernels {
    ($module:ident, $elem:ty, $features:literal, $load:ident) => {
        mod $module {
            use std::arch::x86_64::*;
            use std::ops::Range;

            use super::{reduce, Element, LoraWeights, DOWN_BLOCK};

            /// Each 8-value run of `x` and of `A` is loaded once for a tile of
            /// rows × rank entries; each entry keeps its own accumulator, so
            /// its sums are those it would have alone.
            #[target_feature(enable = $features)]
            pub unsafe fn down(
                w: &LoraWeights,
                scale: f32,
                a: &[$elem],
                xs: &[&[f32]],
                js: Range<usize>,
                out: &mut [f32],
            ) {
                match xs.len() {
                    1 => down_tiles::<1, 4>(w, scale, a, xs, js, out),
                    2 => down_tiles::<2, 4>(w, scale, a, xs, js, out),
                    3 => down_tiles::<3, 2>(w, scale, a, xs, js, out),
                    _ => down_tiles::<DOWN_BLOCK, 2>(w, scale, a, xs, js, out),
                }
            }

            /// `R` rows (all of `xs`) × the entries `js` in steps of `J` (then one by one).
            #[target_feature(enable = $features)]
            unsafe fn down_tiles<const R: usize, const J: usize>(
                w: &LoraWeights,
                scale: f32,
                a: &[$elem],
                xs: &[&[f32]],
                js: Range<usize>,
                out: &mut [f32],
            ) {
                let n = w.in_features;
                let xs: [&[f32]; R] = std::array::from_fn(|r| &xs[r][..n]);
                let mut j = js.start;
                while j < js.end {
                    let step = if j + J <= js.end { J } else { 1 };
                    let mut put = |r: usize, jj: usize, sum: f32| out[(j + jj - js.start) * R + r] = scale * sum;
                    if step == J {
                        for (r, row) in dots::<R, J>(&xs, &a[j * n..(j + J) * n], n).iter().enumerate() {
                            for (jj, &sum) in row.iter().enumerate() {
                                put(r, jj, sum);
                            }
                        }
                    } else {
                        for (r, row) in dots::<R, 1>(&xs, &a[j * n..(j + 1) * n], n).iter().enumerate() {
                            put(r, 0, row[0]);
                        }
                    }
                    j += step;
                }
            }

            /// `xs[r] · a_j` for `R` rows and the `J` rows of `a` (`[J, n]`).
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn dots<const R: usize, const J: usize>(xs: &[&[f32]; R], a: &[$elem], n: usize) -> [[f32; J]; R] {
                assert!(a.len() == J * n && xs.iter().all(|x| x.len() == n));
                let mut acc = [[_mm256_setzero_ps(); J]; R];
                let body = n / 8 * 8;
                let mut k = 0;
                while k < body {
                    let va: [__m256; J] = std::array::from_fn(|j| $load!(a.as_ptr().add(j * n + k)));
                    for (x, acc) in xs.iter().zip(acc.iter_mut()) {
                        let vx = _mm256_loadu_ps(x.as_ptr().add(k));
                        for (acc, va) in acc.iter_mut().zip(&va) {
                            *acc = _mm256_fmadd_ps(vx, *va, *acc);
                        }
                    }
                    k += 8;
                }
                std::array::from_fn(|r| {
                    std::array::from_fn(|j| {
                        let mut lanes = [0f32; 8];
                        _mm256_storeu_ps(lanes.as_mut_ptr(), acc[r][j]);
                        let mut sum = reduce(&lanes);
                        for k in body..n {
                            sum = xs[r][k].mul_add(a[j * n + k].widen(), sum);
                        }
                        sum
                    })
                })
            }

            /// Output columns in runs of 32 held in registers across the
            /// rank: each column still adds the rank's terms in order, one
            /// fused multiply-add each, as the plain loop does.
            #[target_feature(enable = $features)]
            pub unsafe fn up(
                w: &LoraWeights,
                b_t: &[$elem],
                xa: &[f32],
                stride: usize,
                first: usize,
                cols: &mut [f32],
            ) {
                let n = w.out_features;
                let width = cols.len();
                assert!(b_t.len() >= (w.rank - 1) * n + first + width);
                let xa = || xa.iter().step_by(stride).take(w.rank);
                let b = b_t.as_ptr().add(first);
                let y = cols.as_mut_ptr();
                let mut c = 0;
                while c + 32 <= width {
                    let mut acc: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(y.add(c + 8 * i)));
                    for (j, &v) in xa().enumerate() {
                        let vc = _mm256_set1_ps(v);
                        let row = b.add(j * n + c);
                        for (i, acc) in acc.iter_mut().enumerate() {
                            *acc = _mm256_fmadd_ps(vc, $load!(row.add(8 * i)), *acc);
                        }
                    }
                    for (i, acc) in acc.iter().enumerate() {
                        _mm256_storeu_ps(y.add(c + 8 * i), *acc);
                    }
                    c += 32;
                }
                while c + 8 <= width {
                    let mut acc = _mm256_loadu_ps(y.add(c));
                    for (j, &v) in xa().enumerate() {
                        acc = _mm256_fmadd_ps(_mm256_set1_ps(v), $load!(b.add(j * n + c)), acc);
                    }
                    _mm256_storeu_ps(y.add(c), acc);
                    c += 8;
                }
                for (c, v) in cols.iter_mut().enumerate().skip(c) {
                    for (j, &s) in xa().enumerate() {
                        *v = s.mul_add(b_t[j * n + first + c].widen(), *v);
                    }
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
avx2_kernels!(avx2_f32, f32, "avx2,fma", load_f32);
#[cfg(target_arch = "x86_64")]
avx2_kernels!(avx2_f16, half::f16, "avx2,fma,f16c", load_f16);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::lora::Precision;

    fn weights(rank: usize, inf: usize, outf: usize, precision: Precision) -> LoraWeights {
        LoraWeights {
            a: Values::new((0..rank * inf).map(|i| ((i as f32) * 0.37).sin()).collect(), precision),
            b_t: Values::new((0..rank * outf).map(|i| ((i as f32) * 0.11).cos()).collect(), precision),
            rank,
            in_features: inf,
            out_features: outf,
            scale: 0.75,
            bias: None,
            dora: None,
        }
    }

    /// The AVX2 kernels give the portable fused loops' bits, for both
    /// storage types, row counts on and off the tiles and widths on and off
    /// the register runs.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx2_kernels_equal_the_portable_fused_loops_bit_for_bit() {
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && f16c()) {
            return;
        }
        for precision in [Precision::F32, Precision::F16] {
            for (rank, inf, outf) in [(8, 576, 192), (5, 37, 75), (16, 1536, 41), (7, 64, 40)] {
                let w = weights(rank, inf, outf, precision);
                for (rows, js) in [(1, 0..rank), (2, 0..rank), (3, 1..rank), (4, 0..rank), (4, 2..rank - 1), (2, 3..4)]
                {
                    let x: Vec<f32> = (0..rows * inf).map(|i| (i as f32 * 0.013).cos()).collect();
                    let xs: Vec<&[f32]> = x.chunks(inf).collect();
                    let size = rows * js.len();
                    let (mut fast, mut plain) = (vec![0f32; size], vec![0f32; size]);
                    match &w.a {
                        Values::F32(a) => {
                            unsafe { avx2_f32::down(&w, w.scale, a, &xs, js.clone(), &mut fast) };
                            portable::down::<true, _>(&w, w.scale, a, &xs, js.clone(), &mut plain);
                        }
                        Values::F16(a) => {
                            unsafe { avx2_f16::down(&w, w.scale, a, &xs, js.clone(), &mut fast) };
                            portable::down::<true, _>(&w, w.scale, a, &xs, js.clone(), &mut plain);
                        }
                    }
                    assert_eq!(fast, plain, "down {precision:?} rank {rank} in {inf} rows {rows} entries {js:?}");
                }
                let xa: Vec<f32> = (0..rank).map(|j| (j as f32 * 0.7).sin()).collect();
                // The same row's entries as the second of a three-row block (rank-major).
                let block: Vec<f32> = (0..3 * rank).map(|i| if i % 3 == 1 { xa[i / 3] } else { 1e3 }).collect();
                let strided = &block[1..];
                for (first, width) in [(0, outf), (3, outf - 3), (outf / 2, outf - outf / 2)] {
                    let base: Vec<f32> = (0..width).map(|i| i as f32 * 0.01).collect();
                    let (mut fast, mut plain, mut in_block) = (base.clone(), base.clone(), base);
                    match &w.b_t {
                        Values::F32(b) => {
                            unsafe { avx2_f32::up(&w, b, &xa, 1, first, &mut fast) };
                            portable::up::<true, _>(&w, b, &xa, 1, first, &mut plain);
                            unsafe { avx2_f32::up(&w, b, strided, 3, first, &mut in_block) };
                        }
                        Values::F16(b) => {
                            unsafe { avx2_f16::up(&w, b, &xa, 1, first, &mut fast) };
                            portable::up::<true, _>(&w, b, &xa, 1, first, &mut plain);
                            unsafe { avx2_f16::up(&w, b, strided, 3, first, &mut in_block) };
                        }
                    }
                    assert_eq!(in_block, fast, "strided up {precision:?} rank {rank} out {outf} from {first}");
                    assert_eq!(fast, plain, "up {precision:?} rank {rank} out {outf} from {first}");
                }
            }
        }
    }

    /// Float16 storage computes the delta of the float16-rounded weights
    /// (checked in float64), which differs from the float32 delta.
    #[test]
    fn float16_deltas_are_the_deltas_of_the_rounded_weights() {
        let (rank, inf, outf) = (16, 576, 192);
        let (w32, w16) = (weights(rank, inf, outf, Precision::F32), weights(rank, inf, outf, Precision::F16));
        let x: Vec<f32> = (0..inf).map(|i| (i as f32 * 0.013).cos()).collect();
        let isa = crate::model::kernels::isa();
        let delta = |w: &LoraWeights| {
            let (mut xa, mut y) = (vec![0f32; rank], vec![0f32; outf]);
            down(isa, w, w.scale, &x, &[0], 0..rank, &mut xa);
            up(isa, w, &xa, 1, 0, &mut y);
            y
        };
        let (y32, y16) = (delta(&w32), delta(&w16));
        let rounded =
            |v: &Values| -> Vec<f64> { v.to_f32().iter().map(|&f| half::f16::from_f32(f).to_f64()).collect() };
        let (a, b) = (rounded(&w16.a), rounded(&w16.b_t));
        let xa: Vec<f64> =
            (0..rank).map(|j| 0.75 * (0..inf).map(|k| x[k] as f64 * a[j * inf + k]).sum::<f64>()).collect();
        for o in 0..outf {
            let want: f64 = (0..rank).map(|j| xa[j] * b[j * outf + o]).sum();
            let size: f64 = (0..rank).map(|j| (xa[j] * b[j * outf + o]).abs()).sum();
            assert!((y16[o] as f64 - want).abs() <= 1e-4 * size + 1e-6, "col {o}: {} vs {want}", y16[o]);
        }
        assert_ne!(y32, y16);
    }
}
