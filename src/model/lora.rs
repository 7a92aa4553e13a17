//! Un-merged LoRA deltas, applied per row so that one forward can mix rows
//! without an adapter and rows of different adapters:
//! `y[r] += scale · (x[r]·Aᵀ)·Bᵀ` for the rows `r` of each adapter.
//!
//! The kernel is written for batch invariance: each row's result is computed
//! in the same order whatever else is in the batch, so batched generation
//! equals one-at-a-time generation bit for bit.

use std::sync::Arc;

use candle_core::{Device, Tensor};

use super::Result;

/// One module's adapter weights, float32, row-major.
#[derive(Debug, Clone)]
pub struct LoraWeights {
    /// `[rank, in_features]` (PEFT's `lora_A`).
    pub a: Vec<f32>,
    /// `[rank, out_features]`: PEFT's `lora_B` transposed, so the second
    /// product runs along contiguous memory.
    pub b_t: Vec<f32>,
    pub rank: usize,
    pub in_features: usize,
    pub out_features: usize,
    pub scale: f32,
}

/// Which projection of a decoder layer a `Linear` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub layer: usize,
    /// Index into `Module::ALL` order: q, k, v, o, gate, up, down.
    pub module: usize,
}

/// An adapter's weights for every layer and module it targets.
#[derive(Debug, Default)]
pub struct AdapterWeights {
    /// `layers[layer][module]`.
    pub layers: Vec<[Option<LoraWeights>; 7]>,
}

impl AdapterWeights {
    pub fn get(&self, slot: Slot) -> Option<&LoraWeights> {
        self.layers.get(slot.layer)?.get(slot.module)?.as_ref()
    }
}

/// The rows of one step that use one adapter.
pub struct LoraGroup {
    pub adapter: Arc<AdapterWeights>,
    /// Token rows (indices into the step's `[tokens, hidden]` activations).
    pub rows: Vec<usize>,
}

/// Adds every group's delta to `y` (`[tokens, out]`), given the input `x` (`[tokens, in]`).
pub fn apply(x: &Tensor, y: Tensor, groups: &[LoraGroup], slot: Slot) -> Result<Tensor> {
    let active: Vec<(&LoraWeights, &[usize])> =
        groups.iter().filter_map(|g| g.adapter.get(slot).map(|w| (w, g.rows.as_slice()))).collect();
    if active.is_empty() {
        return Ok(y);
    }
    let (tokens, out_features) = y.dims2()?;
    let in_features = x.dim(1)?;
    let x = x.flatten_all()?.to_vec1::<f32>()?;
    let mut y = y.flatten_all()?.to_vec1::<f32>()?;
    let mut xa = Vec::new();
    for (w, rows) in active {
        debug_assert_eq!((w.in_features, w.out_features), (in_features, out_features));
        xa.resize(w.rank, 0.0);
        for &row in rows {
            let x_row = &x[row * in_features..(row + 1) * in_features];
            for (j, v) in xa.iter_mut().enumerate() {
                *v = w.scale * dot(x_row, &w.a[j * in_features..(j + 1) * in_features]);
            }
            let y_row = &mut y[row * out_features..(row + 1) * out_features];
            for (j, &c) in xa.iter().enumerate() {
                axpy(c, &w.b_t[j * out_features..(j + 1) * out_features], y_row);
            }
        }
    }
    Ok(Tensor::from_vec(y, (tokens, out_features), &Device::Cpu)?)
}

/// A dot product in a fixed order (eight lanes, then the tail), which the
/// compiler vectorizes.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let chunks = a.len() / 8;
    for (ca, cb) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        for k in 0..8 {
            lanes[k] += ca[k] * cb[k];
        }
    }
    let mut sum = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
    for i in chunks * 8..a.len() {
        sum += a[i] * b[i];
    }
    sum
}

fn axpy(c: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += c * xi;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weights(rank: usize, inf: usize, outf: usize, scale: f32, seed: f32) -> LoraWeights {
        LoraWeights {
            a: (0..rank * inf).map(|i| ((i as f32 + seed) * 0.37).sin()).collect(),
            b_t: (0..rank * outf).map(|i| ((i as f32 + seed) * 0.11).cos()).collect(),
            rank,
            in_features: inf,
            out_features: outf,
            scale,
        }
    }

    /// The plain reference: scale · (x·Aᵀ)·Bᵀ with candle matmuls.
    fn reference(x: &Tensor, w: &LoraWeights) -> Result<Tensor> {
        let a = Tensor::from_vec(w.a.clone(), (w.rank, w.in_features), &Device::Cpu)?;
        let b_t = Tensor::from_vec(w.b_t.clone(), (w.rank, w.out_features), &Device::Cpu)?;
        Ok((x.matmul(&a.t()?)?.matmul(&b_t)? * w.scale as f64)?)
    }

    #[test]
    fn mixed_rows_match_reference_math() -> Result<()> {
        let (inf, outf) = (19, 13);
        let x = Tensor::from_vec((0..4 * inf).map(|i| (i as f32 * 0.05).cos()).collect(), (4, inf), &Device::Cpu)?;
        let base = Tensor::from_vec((0..4 * outf).map(|i| i as f32 * 0.01).collect(), (4, outf), &Device::Cpu)?;
        let slot = Slot { layer: 0, module: 0 };
        let mk = |w: LoraWeights| {
            let mut layer: [Option<LoraWeights>; 7] = Default::default();
            layer[0] = Some(w);
            Arc::new(AdapterWeights { layers: vec![layer] })
        };
        let (wa, wb) = (weights(3, inf, outf, 2.0, 1.0), weights(5, inf, outf, 0.5, 7.0));
        // Row 0: no adapter; rows 1, 3: adapter A; row 2: adapter B.
        let groups = vec![
            LoraGroup { adapter: mk(wa.clone()), rows: vec![1, 3] },
            LoraGroup { adapter: mk(wb.clone()), rows: vec![2] },
        ];
        let got = apply(&x, base.clone(), &groups, slot)?.to_vec2::<f32>()?;
        let base_rows = base.to_vec2::<f32>()?;
        let ra = reference(&x, &wa)?.to_vec2::<f32>()?;
        let rb = reference(&x, &wb)?.to_vec2::<f32>()?;
        for o in 0..outf {
            assert_eq!(got[0][o], base_rows[0][o]);
            for (row, delta) in [(1, &ra), (3, &ra), (2, &rb)] {
                let want = base_rows[row][o] + delta[row][o];
                assert!((got[row][o] - want).abs() < 1e-5, "row {row} col {o}: {} vs {want}", got[row][o]);
            }
        }
        // Batch invariance: a row alone gives the same bits as in the batch.
        let alone =
            apply(&x.narrow(0, 2, 1)?, base.narrow(0, 2, 1)?, &[LoraGroup { adapter: mk(wb), rows: vec![0] }], slot)?;
        assert_eq!(alone.to_vec2::<f32>()?[0], got[2]);
        Ok(())
    }
}
