//! The one projection type: every q/k/v/o/gate/up/down projection and the
//! output head is a `Linear`, whatever the weight format.

use candle_core::quantized::QMatMul;
use candle_core::{Device, Module, Tensor};

use super::kernels::{self, q4_1::Q4_1Matrix, q8::Q8Row, q8_0::Q8_0Matrix};
use super::lora::{self, LoraGroup, Slot};
use super::Result;

/// The base weight, `[out_features, in_features]`.
#[derive(Debug, Clone)]
pub enum Weight {
    /// Kept in its GGUF block format; activations are quantized on the fly.
    Quantized(QMatMul),
    /// Dense float32.
    Dense(Tensor),
    /// Q4_1 blocks run by our own kernel (`kernels::q4_1`).
    Q4_1(std::sync::Arc<Q4_1Matrix>),
    /// Q8_0 blocks run by our own kernel (`kernels::q8_0`).
    Q8_0(std::sync::Arc<Q8_0Matrix>),
}

#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
    in_features: usize,
    out_features: usize,
    /// Where adapters find their weights for this projection (none for the head).
    slot: Option<Slot>,
    span: tracing::Span,
}

impl Linear {
    pub fn new(weight: Weight, bias: Option<Tensor>, out_features: usize, in_features: usize) -> Self {
        Self {
            weight,
            bias,
            in_features,
            out_features,
            slot: None,
            span: tracing::trace_span!("linear", out_features, in_features),
        }
    }

    /// Marks this projection as `module` of decoder layer `layer`, so LoRA
    /// adapters can target it.
    pub fn with_slot(mut self, layer: usize, module: usize) -> Self {
        self.slot = Some(Slot { layer, module });
        self
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// `x`: `[rows, in_features]` → `[rows, out_features]`, plus the delta of
    /// each adapter group on its rows.
    pub fn forward(&self, x: &Tensor, adapters: &[LoraGroup]) -> Result<Tensor> {
        let _enter = self.span.enter();
        let y = match &self.weight {
            Weight::Quantized(w) => w.forward(x)?,
            Weight::Dense(w) => x.matmul(&w.t()?)?,
            Weight::Q4_1(w) => {
                let (tokens, rows) = quantize_rows(x)?;
                Tensor::from_vec(w.matmul(&rows, kernels::isa()), (tokens, w.rows()), &Device::Cpu)?
            }
            Weight::Q8_0(w) => {
                let (tokens, rows) = quantize_rows(x)?;
                Tensor::from_vec(w.matmul(&rows, kernels::isa()), (tokens, w.rows()), &Device::Cpu)?
            }
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        match self.slot {
            Some(slot) if !adapters.is_empty() => lora::apply(x, y, adapters, slot),
            _ => Ok(y),
        }
    }
}

/// `[tokens, in]` activations as Q8 rows, what the integer kernels consume.
fn quantize_rows(x: &Tensor) -> Result<(usize, Vec<Q8Row>)> {
    let (tokens, _) = x.dims2()?;
    let rows = x.to_vec2::<f32>()?.iter().map(|r| Q8Row::quantize(r)).collect();
    Ok((tokens, rows))
}
