//! Activations quantized to 8 bits in blocks of 32 (ggml's Q8_1 layout, with
//! the scale and the scaled sum kept in f32): what the integer dot products
//! of the weight kernels consume.

pub const BLOCK: usize = 32;

/// One row of activations, `in_features / 32` blocks.
#[derive(Debug, Clone, Default)]
pub struct Q8Row {
    pub qs: Vec<i8>,
    /// Per block: the scale `d` (amax / 127).
    pub d: Vec<f32>,
    /// Per block: `d · Σ qs`, what a weight block's offset `m` multiplies.
    pub s: Vec<f32>,
}

impl Q8Row {
    pub fn quantize(x: &[f32]) -> Self {
        debug_assert_eq!(x.len() % BLOCK, 0);
        let blocks = x.len() / BLOCK;
        let mut row = Q8Row { qs: vec![0; x.len()], d: vec![0.0; blocks], s: vec![0.0; blocks] };
        for b in 0..blocks {
            let src = &x[b * BLOCK..(b + 1) * BLOCK];
            let amax = src.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            let mut sum = 0i32;
            for (q, v) in row.qs[b * BLOCK..(b + 1) * BLOCK].iter_mut().zip(src) {
                let r = (v * id).round() as i32;
                *q = r as i8;
                sum += r;
            }
            row.d[b] = d;
            row.s[b] = d * sum as f32;
        }
        row
    }
}
