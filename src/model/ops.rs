//! Element-wise steps of the forward pass, written as single loops over the
//! activations: one allocation per result and no trip through candle's
//! generic element-wise machinery (whose own worker pool would compete with
//! ours for the same two cores).

use candle_core::{CpuStorage, Device, Storage, Tensor};
use rayon::prelude::*;

use super::{ModelError, Result};

/// Below this many elements one thread is faster than splitting the work.
const PARALLEL_MIN: usize = 32 * 1024;
const PARALLEL_CHUNK: usize = 8 * 1024;

/// Runs `f` on the f32 elements of `t` in row-major order, without copying
/// when `t` is already contiguous.
pub fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(CpuStorage::F32(data)) => {
            let start = layout.start_offset();
            Ok(f(&data[start..start + t.elem_count()]))
        }
        _ => Err(ModelError::Invalid(format!("expected float32 activations on the CPU, got {:?}", t.dtype()))),
    }
}

/// `out[i] = f(a[i], b[i])` for two tensors of the same shape.
fn zip_map(a: &Tensor, b: &Tensor, f: impl Fn(f32, f32) -> f32 + Sync) -> Result<Tensor> {
    if a.dims() != b.dims() {
        return Err(ModelError::Invalid(format!("shape mismatch: {:?} vs {:?}", a.dims(), b.dims())));
    }
    let out = with_f32(a, |a| {
        with_f32(b, |b| {
            let mut out = vec![0f32; a.len()];
            let run = |(out, (a, b)): (&mut [f32], (&[f32], &[f32]))| {
                for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
                    *o = f(x, y);
                }
            };
            if a.len() >= PARALLEL_MIN {
                out.par_chunks_mut(PARALLEL_CHUNK)
                    .zip(a.par_chunks(PARALLEL_CHUNK).zip(b.par_chunks(PARALLEL_CHUNK)))
                    .for_each(run);
            } else {
                run((&mut out, (a, b)));
            }
            out
        })
    })??;
    Ok(Tensor::from_vec(out, a.dims(), &Device::Cpu)?)
}

/// `a + b` (residual connections).
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    zip_map(a, b, |x, y| x + y)
}

/// `silu(gate) · up`, the gated MLP's activation.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    zip_map(gate, up, |g, u| g / (1.0 + (-g).exp()) * u)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn element_wise_ops_match_candle() {
        // Large enough to take the parallel path, plus a small one.
        for n in [7usize, 40_000] {
            let a =
                Tensor::from_vec((0..n).map(|i| (i as f32 * 0.013).sin() * 5.0).collect(), n, &Device::Cpu).unwrap();
            let b = Tensor::from_vec((0..n).map(|i| (i as f32 * 0.007).cos()).collect(), n, &Device::Cpu).unwrap();
            let sum = add(&a, &b).unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(sum, (&a + &b).unwrap().to_vec1::<f32>().unwrap());
            let ours = silu_mul(&a, &b).unwrap().to_vec1::<f32>().unwrap();
            let theirs = (candle_nn::ops::silu(&a).unwrap() * &b).unwrap().to_vec1::<f32>().unwrap();
            for (x, y) in ours.iter().zip(&theirs) {
                assert!((x - y).abs() <= 1e-6 * y.abs().max(1.0), "{x} vs {y}");
            }
        }
    }

    #[test]
    fn a_strided_view_is_read_in_row_major_order() {
        let t = Tensor::arange(0f32, 6.0, &Device::Cpu).unwrap().reshape((2, 3)).unwrap().t().unwrap();
        let seen = with_f32(&t, |v| v.to_vec()).unwrap();
        assert_eq!(seen, vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
    }
}
