//! The two LoRA products on the CPU: `down` (`scale · x·Aᵀ`, into the rank
//! space) and `up` (`+= xa·Bᵀ` on some output columns).
//!
//! Every output element is summed in one fixed order whatever the batch and
//! however the work is split (batch invariance): a dot product runs in eight
//! lanes, reduced as `((l0+l4)+(l1+l5))+((l2+l6)+(l3+l7))`, then its tail;
//! an output column adds the rank's terms in order. The AVX2 kernels use
//! fused multiply-adds in exactly that order, so they give the bits of the
//! portable loops with `FUSED` (tested), only faster.

use super::LoraWeights;
use crate::model::kernels::Isa;

/// Rows of one adapter whose down products share each load of `A`.
pub const DOWN_BLOCK: usize = 4;

/// `out[i·rank + j] = scale · x_{rows[i]}·A_j`, for the (at most
/// `DOWN_BLOCK`) `rows` of `x` (`[tokens, in]`).
pub fn down(isa: Isa, w: &LoraWeights, x: &[f32], rows: &[usize], out: &mut [f32]) {
    let n = w.in_features;
    let mut xs = [&x[..0]; DOWN_BLOCK];
    for (slot, &row) in xs.iter_mut().zip(rows) {
        *slot = &x[row * n..(row + 1) * n];
    }
    let xs = &xs[..rows.len()];
    match isa {
        // SAFETY: the AVX2 ISAs are only chosen when the CPU has AVX2 and FMA.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512Vnni => unsafe { avx2::down(w, xs, out) },
        Isa::Scalar => portable::down::<false>(w, xs, out),
    }
}

/// `cols += (xa·Bᵀ)[first..]`: output columns `first..first + cols.len()`,
/// each summed over the rank in order — the same bits however the columns
/// are split.
pub fn up(isa: Isa, w: &LoraWeights, xa: &[f32], first: usize, cols: &mut [f32]) {
    debug_assert!(first + cols.len() <= w.out_features && xa.len() == w.rank);
    match isa {
        // SAFETY: as in `down`.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512Vnni => unsafe { avx2::up(w, xa, first, cols) },
        Isa::Scalar => portable::up::<false>(w, xa, first, cols),
    }
}

/// Plain loops: the reference order, and the kernels of CPUs without AVX2
/// (`FUSED` = false there: a fused multiply-add would be a library call).
mod portable {
    use super::LoraWeights;

    pub fn down<const FUSED: bool>(w: &LoraWeights, xs: &[&[f32]], out: &mut [f32]) {
        let n = w.in_features;
        for (x_row, xa) in xs.iter().zip(out.chunks_exact_mut(w.rank)) {
            for (j, v) in xa.iter_mut().enumerate() {
                *v = w.scale * dot::<FUSED>(x_row, &w.a[j * n..(j + 1) * n]);
            }
        }
    }

    pub fn up<const FUSED: bool>(w: &LoraWeights, xa: &[f32], first: usize, cols: &mut [f32]) {
        let n = w.out_features;
        for (j, &c) in xa.iter().enumerate() {
            let b = &w.b_t[j * n + first..j * n + first + cols.len()];
            for (y, &v) in cols.iter_mut().zip(b) {
                *y = madd::<FUSED>(c, v, *y);
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

    pub fn dot<const FUSED: bool>(a: &[f32], b: &[f32]) -> f32 {
        let mut lanes = [0f32; 8];
        for (ca, cb) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
            for k in 0..8 {
                lanes[k] = madd::<FUSED>(ca[k], cb[k], lanes[k]);
            }
        }
        let mut sum = super::reduce(&lanes);
        for i in a.len() / 8 * 8..a.len() {
            sum = madd::<FUSED>(a[i], b[i], sum);
        }
        sum
    }
}

/// The eight lanes of a dot product summed in the kernels' one order.
fn reduce(l: &[f32; 8]) -> f32 {
    ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7]))
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{reduce, LoraWeights, DOWN_BLOCK};

    /// Each 8-float run of `x` and of `A` is loaded once for a tile of rows ×
    /// rank entries; each entry keeps its own accumulator, so its sums are
    /// those it would have alone.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn down(w: &LoraWeights, xs: &[&[f32]], out: &mut [f32]) {
        match xs.len() {
            1 => down_tiles::<1, 4>(w, xs, out),
            2 => down_tiles::<2, 4>(w, xs, out),
            3 => down_tiles::<3, 2>(w, xs, out),
            _ => {
                for (chunk, out) in xs.chunks(DOWN_BLOCK).zip(out.chunks_mut(DOWN_BLOCK * w.rank)) {
                    match chunk.len() {
                        DOWN_BLOCK => down_tiles::<DOWN_BLOCK, 2>(w, chunk, out),
                        _ => down(w, chunk, out),
                    }
                }
            }
        }
    }

    /// `R` rows (all of `xs`) × the rank in steps of `J` (then one by one).
    #[target_feature(enable = "avx2,fma")]
    unsafe fn down_tiles<const R: usize, const J: usize>(w: &LoraWeights, xs: &[&[f32]], out: &mut [f32]) {
        let n = w.in_features;
        let xs: [&[f32]; R] = std::array::from_fn(|r| &xs[r][..n]);
        let mut j = 0;
        while j < w.rank {
            if j + J <= w.rank {
                let sums = dots::<R, J>(&xs, &w.a[j * n..(j + J) * n], n);
                for (r, row) in sums.iter().enumerate() {
                    for (jj, sum) in row.iter().enumerate() {
                        out[r * w.rank + j + jj] = w.scale * sum;
                    }
                }
                j += J;
            } else {
                let sums = dots::<R, 1>(&xs, &w.a[j * n..(j + 1) * n], n);
                for (r, row) in sums.iter().enumerate() {
                    out[r * w.rank + j] = w.scale * row[0];
                }
                j += 1;
            }
        }
    }

    /// `xs[r] · a_j` for `R` rows and the `J` rows of `a` (`[J, n]`).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn dots<const R: usize, const J: usize>(xs: &[&[f32]; R], a: &[f32], n: usize) -> [[f32; J]; R] {
        assert!(a.len() == J * n && xs.iter().all(|x| x.len() == n));
        let mut acc = [[_mm256_setzero_ps(); J]; R];
        let body = n / 8 * 8;
        let mut k = 0;
        while k < body {
            let va: [__m256; J] = std::array::from_fn(|j| _mm256_loadu_ps(a.as_ptr().add(j * n + k)));
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
                    sum = xs[r][k].mul_add(a[j * n + k], sum);
                }
                sum
            })
        })
    }

    /// Output columns in runs of 32 held in registers across the rank: each
    /// column still adds the rank's terms in order, one fused multiply-add
    /// each, as the plain loop does.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn up(w: &LoraWeights, xa: &[f32], first: usize, cols: &mut [f32]) {
        let n = w.out_features;
        let width = cols.len();
        let b = w.b_t.as_ptr().add(first);
        let y = cols.as_mut_ptr();
        let mut c = 0;
        while c + 32 <= width {
            let mut acc: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(y.add(c + 8 * i)));
            for (j, &v) in xa.iter().enumerate() {
                let vc = _mm256_set1_ps(v);
                let row = b.add(j * n + c);
                for (i, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm256_fmadd_ps(vc, _mm256_loadu_ps(row.add(8 * i)), *acc);
                }
            }
            for (i, acc) in acc.iter().enumerate() {
                _mm256_storeu_ps(y.add(c + 8 * i), *acc);
            }
            c += 32;
        }
        while c + 8 <= width {
            let mut acc = _mm256_loadu_ps(y.add(c));
            for (j, &v) in xa.iter().enumerate() {
                acc = _mm256_fmadd_ps(_mm256_set1_ps(v), _mm256_loadu_ps(b.add(j * n + c)), acc);
            }
            _mm256_storeu_ps(y.add(c), acc);
            c += 8;
        }
        for (c, v) in cols.iter_mut().enumerate().skip(c) {
            for (j, &s) in xa.iter().enumerate() {
                *v = s.mul_add(w.b_t[j * n + first + c], *v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weights(rank: usize, inf: usize, outf: usize) -> LoraWeights {
        LoraWeights {
            a: (0..rank * inf).map(|i| ((i as f32) * 0.37).sin()).collect(),
            b_t: (0..rank * outf).map(|i| ((i as f32) * 0.11).cos()).collect(),
            rank,
            in_features: inf,
            out_features: outf,
            scale: 0.75,
        }
    }

    /// The AVX2 kernels give the portable fused loops' bits, for row counts
    /// on and off the block and widths on and off the register runs.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx2_kernels_equal_the_portable_fused_loops_bit_for_bit() {
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
            return;
        }
        for (rank, inf, outf) in [(8, 576, 192), (5, 37, 75), (16, 1536, 41), (7, 64, 40)] {
            let w = weights(rank, inf, outf);
            for rows in [1, 2, 3, 4, 7, 9] {
                let x: Vec<f32> = (0..rows * inf).map(|i| (i as f32 * 0.013).cos()).collect();
                let xs: Vec<&[f32]> = x.chunks(inf).collect();
                let (mut fast, mut plain) = (vec![0f32; rows * rank], vec![0f32; rows * rank]);
                unsafe { avx2::down(&w, &xs, &mut fast) };
                portable::down::<true>(&w, &xs, &mut plain);
                assert_eq!(fast, plain, "down rank {rank} in {inf} rows {rows}");
                let dot = portable::dot::<true>(&x[..inf], &w.a[..inf]);
                assert_eq!(plain[0], w.scale * dot);
            }
            let xa: Vec<f32> = (0..rank).map(|j| (j as f32 * 0.7).sin()).collect();
            for (first, width) in [(0, outf), (3, outf - 3), (outf / 2, outf - outf / 2)] {
                let base: Vec<f32> = (0..width).map(|i| i as f32 * 0.01).collect();
                let (mut fast, mut plain) = (base.clone(), base);
                unsafe { avx2::up(&w, &xa, first, &mut fast) };
                portable::up::<true>(&w, &xa, first, &mut plain);
                assert_eq!(fast, plain, "up rank {rank} out {outf} from {first}");
            }
        }
    }
}
