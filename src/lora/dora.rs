//! DoRA (`use_dora`): the adapted weight `W + s·B·A` is split into a
//! direction and a learned magnitude `m` per output feature. PEFT serves it
//! un-merged as `y = base + (g - 1)·(W·x) + g·s·B·A·x` with
//! `g = m / ‖W + s·B·A‖` (the norm of each output row, the base weight as
//! the server holds it), that is `g ⊙ (W·x + s·B·A·x)` before the bias.
//! `g` depends on the weights only, so it is computed once, at load — and
//! once more for each other weight a request gives the adapter (PEFT's
//! `scale_layer`: the norm is of `W + weight·s·B·A`).

use std::sync::Arc;

use rayon::prelude::*;

use super::{BaseShapes, LoraError};
use crate::model::lora::{AdapterWeights, LoraWeights, Slot};

/// `‖W + scale·B·A‖` of output row `o`, in float64.
fn adapted_row_norm(w: &LoraWeights, a: &[f32], b_t: &[f32], base: &[f32], o: usize, scale: f32) -> f64 {
    let (n, out) = (w.in_features, w.out_features);
    let mut row: Vec<f32> = base[o * n..(o + 1) * n].to_vec();
    for j in 0..w.rank {
        let c = scale * b_t[j * out + o];
        for (v, a) in row.iter_mut().zip(&a[j * n..(j + 1) * n]) {
            *v += c * a;
        }
    }
    row.iter().map(|v| f64::from(*v) * f64::from(*v)).sum::<f64>().sqrt()
}

/// `g = m / ‖W + scale·B·A‖` per output row, for the module `w` over the
/// base weight `base` (`[out, in]`, row-major) and its `magnitude`.
pub(crate) fn norm_scale(w: &LoraWeights, base: &[f32], magnitude: &[f32]) -> Vec<f32> {
    debug_assert_eq!(base.len(), w.in_features * w.out_features);
    let (a, b_t) = (w.a.to_f32(), w.b_t.to_f32());
    (0..w.out_features)
        .into_par_iter()
        .map(|o| (f64::from(magnitude[o]) / adapted_row_norm(w, &a, &b_t, base, o, w.scale)) as f32)
        .collect()
}

/// A DoRA adapter at `factor` times its scale, as PEFT's `scale_layer`
/// serves it: scale `factor·s` and `g = m / ‖W + factor·s·B·A‖`, the
/// magnitude `m` read back as `g·‖W + s·B·A‖`. Held beside its adapter
/// (`merged_from`), as a merge is.
pub fn at_weight(adapter: &Arc<AdapterWeights>, factor: f32, base: &BaseShapes) -> Result<AdapterWeights, LoraError> {
    let projections = base
        .weights
        .as_ref()
        .ok_or_else(|| LoraError::Unsupported("DoRA at a weight here: it needs the base model's weights".into()))?;
    let mut layers = adapter.layers.clone();
    for (layer, modules) in layers.iter_mut().enumerate() {
        for (module, w) in modules.iter_mut().enumerate() {
            let Some(w) = w else { continue };
            let scale = w.scale * factor;
            if let Some(g) = &w.dora {
                let weight = projections
                    .dense(Slot { layer, module })
                    .map_err(|e| LoraError::Weights(format!("the base weight for DoRA: {e}")))?;
                let (a, b_t) = (w.a.to_f32(), w.b_t.to_f32());
                let rescaled = (0..w.out_features)
                    .into_par_iter()
                    .map(|o| {
                        let magnitude = f64::from(g[o]) * adapted_row_norm(w, &a, &b_t, &weight, o, w.scale);
                        (magnitude / adapted_row_norm(w, &a, &b_t, &weight, o, scale)) as f32
                    })
                    .collect();
                w.dora = Some(rescaled);
            }
            w.scale = scale;
        }
    }
    Ok(AdapterWeights {
        layers,
        parts: Vec::new(),
        config: adapter.config.clone(),
        merged_from: vec![adapter.clone()],
        saved: adapter.saved.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::lora::Values;

    #[test]
    fn the_scale_is_the_magnitude_over_each_adapted_row_norm() {
        // W = [[3, 0], [0, 1]], B·A = [[0, 4], [1, 0]] at scale 1: rows
        // [3, 4] and [1, 1], norms 5 and √2.
        let w = LoraWeights {
            a: Values::F32(vec![0.0, 1.0, 1.0, 0.0]),
            b_t: Values::F32(vec![4.0, 0.0, 0.0, 1.0]),
            rank: 2,
            in_features: 2,
            out_features: 2,
            scale: 1.0,
            bias: None,
            dora: None,
        };
        let g = norm_scale(&w, &[3.0, 0.0, 0.0, 1.0], &[10.0, 2.0]);
        assert!((g[0] - 2.0).abs() < 1e-6, "{g:?}");
        assert!((g[1] - 2f32.sqrt()).abs() < 1e-6, "{g:?}");
        // A magnitude equal to the norm leaves the direction's length: g = 1.
        assert!(norm_scale(&w, &[3.0, 0.0, 0.0, 1.0], &[5.0, 2f32.sqrt()]).iter().all(|g| (g - 1.0).abs() < 1e-6));
    }
}
