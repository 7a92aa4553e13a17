//! `tailor bench kernels`: the quantized matmul kernels alone, every ISA
//! this CPU has against the scalar reference, on SmolLM2's shapes.

use std::time::Instant;

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use serde::Serialize;

use super::q8::Q8Row;
use super::q8k::Q8KRow;
use super::{available, Activations, Isa, QuantMatrix};

#[derive(Debug, Serialize)]
pub struct KernelResult {
    pub kernel: String,
    pub rows: usize,
    pub cols: usize,
    pub tokens: usize,
    pub isa: String,
    /// Median over the repetitions.
    pub ms: f64,
    /// Fastest repetition: on a noisy machine the steadiest figure for
    /// comparing two kernels (noise only ever adds time).
    pub best_ms: f64,
    /// Multiply-adds per second, billions.
    pub gmacs: f64,
    /// Weight bytes streamed per second (what bounds decode), GB/s.
    pub weight_gbs: f64,
    pub speedup_vs_scalar: f64,
}

/// A `rows × cols` matrix of `dtype` as ggml quantizes it.
fn matrix(dtype: GgmlDType, rows: usize, cols: usize) -> Option<Arc<dyn QuantMatrix>> {
    let dense: Vec<f32> = (0..rows * cols).map(|i| ((i as f32) * 0.731).sin() * 0.05).collect();
    let t = Tensor::from_vec(dense, (rows, cols), &Device::Cpu).ok()?;
    let q = QTensor::quantize(&t, dtype).ok()?;
    super::from_gguf(dtype, &q.data().ok()?, rows, cols)
}

/// (median, best) milliseconds over `reps` runs after one warm-up.
fn time_ms(mut run: impl FnMut(), reps: usize) -> (f64, f64) {
    run(); // warm up
    let mut times: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            run();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    (times[times.len() / 2], times[0])
}

pub fn run(reps: usize) -> Vec<KernelResult> {
    use GgmlDType::*;
    let shapes: [(GgmlDType, usize, usize); 9] = [
        // SmolLM2-135M: q/o, gate/up, down (Q4_1; Q5_0 in Q4_K_M files), the tied head.
        (Q4_1, 576, 576),
        (Q4_1, 1536, 576),
        (Q5_0, 576, 1536),
        (Q8_0, 49152, 576),
        // Llama-3.2-1B shapes in Q4_K_M: q/o and gate/up (Q4_K), down (Q6_K), Q5_K_M.
        (Q4K, 2048, 2048),
        (Q4K, 8192, 2048),
        (Q6K, 2048, 8192),
        (Q5K, 8192, 2048),
        (Q8_0, 8192, 2048),
    ];
    let mut results = Vec::new();
    for (dtype, rows, cols) in shapes {
        let Some(w) = matrix(dtype, rows, cols) else { continue };
        let bytes_per_weight = w.bytes() as f64 / (rows * cols) as f64;
        for tokens in [1usize, 8, 128] {
            if rows == 49152 && tokens == 128 {
                continue; // the head only sees last positions
            }
            let x: Vec<f32> = (0..tokens * cols).map(|i| (i as f32 * 0.37).sin()).collect();
            let q8 = Q8Row::quantize_rows(&x, cols);
            let q8k = if cols % 256 == 0 { Q8KRow::quantize_rows(&x, cols) } else { Vec::new() };
            let acts = Activations { q8: &q8, q8k: &q8k };
            let mut scalar_ms = None;
            for isa in available() {
                if isa == Isa::Scalar && tokens == 128 && rows * cols > 1 << 22 {
                    continue; // minutes of scalar work say nothing new
                }
                let (ms, best_ms) = time_ms(
                    || {
                        std::hint::black_box(super::matmul(w.as_ref(), &acts, isa));
                    },
                    if isa == Isa::Scalar { reps.div_ceil(4).max(3) } else { reps },
                );
                let macs = (rows * cols * tokens) as f64;
                results.push(KernelResult {
                    kernel: format!("{dtype:?}").to_lowercase(),
                    rows,
                    cols,
                    tokens,
                    isa: format!("{isa:?}"),
                    ms,
                    best_ms,
                    gmacs: macs / ms / 1e6,
                    weight_gbs: rows as f64 * cols as f64 * bytes_per_weight / ms / 1e6,
                    speedup_vs_scalar: scalar_ms.map_or(f64::NAN, |s: f64| s / ms),
                });
                if isa == Isa::Scalar {
                    scalar_ms = Some(ms);
                }
            }
        }
    }
    results
}
