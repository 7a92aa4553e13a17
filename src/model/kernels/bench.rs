//! `tailor bench kernels`: the quantized matmul kernels alone, every ISA
//! this CPU has against the scalar reference, on SmolLM2's shapes.

use std::time::Instant;

use half::f16;
use serde::Serialize;

use super::offset::{Q4Matrix, Q4_1_BLOCK_BYTES};
use super::q8::{Q8Row, BLOCK};
use super::q8_0::{self, Q8_0Matrix};
use super::{available, Isa};

#[derive(Debug, Serialize)]
pub struct KernelResult {
    pub kernel: &'static str,
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

fn q4_1_matrix(rows: usize, cols: usize) -> Q4Matrix {
    let mut bytes = Vec::with_capacity(rows * cols / BLOCK * Q4_1_BLOCK_BYTES);
    for b in 0..rows * cols / BLOCK {
        bytes.extend_from_slice(&f16::from_f32(0.01).to_le_bytes());
        bytes.extend_from_slice(&f16::from_f32(-0.05).to_le_bytes());
        bytes.extend((0..16).map(|j| ((b * 31 + j * 17) % 256) as u8));
    }
    Q4Matrix::from_gguf(candle_core::quantized::GgmlDType::Q4_1, &bytes, rows, cols)
        .unwrap_or_else(|| unreachable!("sizes are block multiples"))
}

fn q8_0_matrix(rows: usize, cols: usize) -> Q8_0Matrix {
    let mut bytes = Vec::with_capacity(rows * cols / BLOCK * q8_0::BLOCK_BYTES);
    for b in 0..rows * cols / BLOCK {
        bytes.extend_from_slice(&f16::from_f32(0.003).to_le_bytes());
        bytes.extend((0..BLOCK).map(|j| ((b * 37 + j * 11) % 256) as u8));
    }
    Q8_0Matrix::from_gguf_bytes(&bytes, rows, cols).unwrap_or_else(|| unreachable!("sizes are block multiples"))
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
    let shapes: [(&str, usize, usize, f64); 4] = [
        ("q4_1", 576, 576, 0.625),    // q/o projections
        ("q4_1", 1536, 576, 0.625),   // gate/up
        ("q4_1", 576, 1536, 0.625),   // down
        ("q8_0", 49152, 576, 1.0625), // tied output head
    ];
    let mut results = Vec::new();
    for (kernel, rows, cols, bytes_per_weight) in shapes {
        let (w4, w8) = match kernel {
            "q4_1" => (Some(q4_1_matrix(rows, cols)), None),
            _ => (None, Some(q8_0_matrix(rows, cols))),
        };
        for tokens in [1usize, 8, 128] {
            if kernel == "q8_0" && tokens == 128 {
                continue; // the head only sees last positions
            }
            let x: Vec<Q8Row> = (0..tokens)
                .map(|t| Q8Row::quantize(&(0..cols).map(|k| ((t * cols + k) as f32 * 0.37).sin()).collect::<Vec<_>>()))
                .collect();
            let mut scalar_ms = None;
            for isa in available() {
                let (ms, best_ms) = time_ms(
                    || {
                        let y = match (&w4, &w8) {
                            (Some(w), _) => w.matmul(&x, isa),
                            (_, Some(w)) => w.matmul(&x, isa),
                            _ => Vec::new(),
                        };
                        std::hint::black_box(y);
                    },
                    if isa == Isa::Scalar { reps.div_ceil(4).max(3) } else { reps },
                );
                let scalar = *scalar_ms.get_or_insert(ms);
                let macs = (rows * cols * tokens) as f64;
                results.push(KernelResult {
                    kernel,
                    rows,
                    cols,
                    tokens,
                    isa: format!("{isa:?}"),
                    ms,
                    best_ms,
                    gmacs: macs / ms / 1e6,
                    weight_gbs: rows as f64 * cols as f64 * bytes_per_weight / ms / 1e6,
                    speedup_vs_scalar: scalar / ms,
                });
            }
        }
    }
    results
}
