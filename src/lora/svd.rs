//! PEFT's `svd` merge needs the best rank-r approximation of
//! `ΔW = Σ wᵢ·sᵢ·Bᵢ·Aᵢ`. ΔW is itself a product `B·A` of rank at most
//! R = Σ rᵢ, so it is never formed: with thin QRs `B = Q_b·R_b` and
//! `Aᵀ = Q_a·R_a`, `ΔW = Q_b·(R_b·R_aᵀ)·Q_aᵀ`, and the SVD of the small
//! R×R middle (one-sided Jacobi, in f64) gives ΔW's: `U = Q_b·U_m`,
//! `V = Q_a·V_m`, the same singular values.

/// A matrix as its columns.
type Columns = Vec<Vec<f64>>;

/// The rank-`rank` truncation of `B·A` (`b`: its R columns of length out;
/// `a`: its R rows of length in), as PEFT stores it: `(U·S, Vᵀ)` — new B
/// columns (each of length out) and new A rows (each of length in), at most
/// `rank` of each (fewer when B·A has fewer).
pub(crate) fn truncate(b: &Columns, a: &Columns, rank: usize) -> (Columns, Columns) {
    let (q_b, r_b) = thin_qr(b);
    let (q_a, r_a) = thin_qr(a);
    let n = b.len();
    // middle = R_b · R_aᵀ, by columns: column j = Σ_k R_b[:, k] · R_a[j, k].
    let middle: Columns =
        (0..n).map(|j| (0..n).map(|i| (0..n).map(|k| r_b[k][i] * r_a[k][j]).sum()).collect()).collect();
    let (u_m, s, v_m) = jacobi_svd(middle);
    let combine = |q: &Columns, c: &[f64]| -> Vec<f64> {
        let len = q.first().map_or(0, Vec::len);
        let mut out = vec![0f64; len];
        for (column, &factor) in q.iter().zip(c) {
            for (o, v) in out.iter_mut().zip(column) {
                *o += factor * v;
            }
        }
        out
    };
    let kept = s.iter().take(rank).take_while(|&&v| v > 0.0).count();
    let new_b = (0..kept).map(|k| combine(&q_b, &u_m[k]).into_iter().map(|v| v * s[k]).collect()).collect();
    let new_a = (0..kept).map(|k| combine(&q_a, &v_m[k])).collect();
    (new_b, new_a)
}

/// Thin QR by modified Gram–Schmidt, twice over for orthogonality: `Q`'s
/// columns, and `R` by columns (`r[j][i]` = R[i, j]). A column in the span
/// of the earlier ones gets a zero Q column and a zero diagonal.
fn thin_qr(m: &Columns) -> (Columns, Columns) {
    let n = m.len();
    let mut q: Columns = Vec::with_capacity(n);
    let mut r: Columns = vec![vec![0f64; n]; n];
    let scale = m.iter().flatten().fold(0f64, |acc, v| acc.max(v.abs()));
    for (j, column) in m.iter().enumerate() {
        let mut v = column.clone();
        for _ in 0..2 {
            for (i, qi) in q.iter().enumerate() {
                let dot: f64 = qi.iter().zip(&v).map(|(a, b)| a * b).sum();
                r[j][i] += dot;
                for (x, y) in v.iter_mut().zip(qi) {
                    *x -= dot * y;
                }
            }
        }
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm > scale * 1e-12 {
            r[j][j] = norm;
            v.iter_mut().for_each(|x| *x /= norm);
        } else {
            v.iter_mut().for_each(|x| *x = 0.0);
        }
        q.push(v);
    }
    (q, r)
}

/// SVD of a square matrix (by columns) by one-sided Jacobi rotations: `(U
/// columns, singular values, V columns)`, largest first.
fn jacobi_svd(mut w: Columns) -> (Columns, Vec<f64>, Columns) {
    let n = w.len();
    let mut v: Columns = (0..n).map(|j| (0..n).map(|i| f64::from(u8::from(i == j))).collect()).collect();
    for _sweep in 0..60 {
        let mut rotated = false;
        for p in 0..n {
            for q in p + 1..n {
                let alpha: f64 = w[p].iter().map(|x| x * x).sum();
                let beta: f64 = w[q].iter().map(|x| x * x).sum();
                let gamma: f64 = w[p].iter().zip(&w[q]).map(|(x, y)| x * y).sum();
                if gamma == 0.0 || gamma.abs() <= 1e-15 * (alpha * beta).sqrt() {
                    continue;
                }
                rotated = true;
                let zeta = (beta - alpha) / (2.0 * gamma);
                let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
                let c = 1.0 / (1.0 + t * t).sqrt();
                let s = c * t;
                for m in [&mut w, &mut v] {
                    let (left, right) = m.split_at_mut(q);
                    for (x, y) in left[p].iter_mut().zip(right[0].iter_mut()) {
                        let (xp, yq) = (*x, *y);
                        *x = c * xp - s * yq;
                        *y = s * xp + c * yq;
                    }
                }
            }
        }
        if !rotated {
            break;
        }
    }
    let sigma: Vec<f64> = w.iter().map(|c| c.iter().map(|x| x * x).sum::<f64>().sqrt()).collect();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| sigma[j].total_cmp(&sigma[i]));
    let u =
        order.iter().map(|&j| w[j].iter().map(|x| if sigma[j] > 0.0 { x / sigma[j] } else { 0.0 }).collect()).collect();
    (u, order.iter().map(|&j| sigma[j]).collect(), order.iter().map(|&j| v[j].clone()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `B·A` as rows.
    fn product(b: &Columns, a: &Columns) -> Vec<Vec<f64>> {
        let (out, inn) = (b[0].len(), a[0].len());
        (0..out).map(|o| (0..inn).map(|i| b.iter().zip(a).map(|(bc, ar)| bc[o] * ar[i]).sum()).collect()).collect()
    }

    fn matrix(rows: usize, cols: usize, seed: f64) -> Columns {
        (0..cols).map(|c| (0..rows).map(|r| ((r * 7 + c * 13) as f64 * 0.37 + seed).sin()).collect()).collect()
    }

    #[test]
    fn a_full_rank_truncation_rebuilds_the_product() {
        let (b, a) = (matrix(9, 3, 0.1), matrix(11, 3, 0.7));
        let (nb, na) = truncate(&b, &a, 3);
        let (want, got) = (product(&b, &a), product(&nb, &na));
        for (w, g) in want.iter().flatten().zip(got.iter().flatten()) {
            assert!((w - g).abs() < 1e-10, "{w} vs {g}");
        }
    }

    #[test]
    fn truncation_keeps_the_largest_singular_directions() {
        // B·A = 10·e₀f₀ᵀ + 3·e₁f₁ᵀ + 1·e₂f₂ᵀ written as a rank-4 product with
        // a redundant term: the rank-2 truncation is the first two terms.
        let e = |k: usize, n: usize| (0..n).map(|i| f64::from(u8::from(i == k))).collect::<Vec<_>>();
        let b = vec![e(0, 5).iter().map(|v| v * 10.0).collect(), e(1, 5), e(2, 5), e(1, 5)];
        let a = vec![
            e(0, 4),
            e(1, 4).iter().map(|v| v * 1.5).collect(),
            e(2, 4),
            e(1, 4).iter().map(|v| v * 1.5).collect(),
        ];
        let (nb, na) = truncate(&b, &a, 2);
        assert_eq!(nb.len(), 2);
        let got = product(&nb, &na);
        for (o, row) in got.iter().enumerate() {
            for (i, v) in row.iter().enumerate() {
                let want = match (o, i) {
                    (0, 0) => 10.0,
                    (1, 1) => 3.0,
                    _ => 0.0,
                };
                assert!((v - want).abs() < 1e-10, "({o}, {i}): {v}");
            }
        }
        // A product of rank 3 truncated to 8 keeps 3.
        assert_eq!(truncate(&b, &a, 8).0.len(), 3);
    }
}
