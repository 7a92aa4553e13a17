//! The one projection type: every q/k/v/o/gate/up/down projection and the
//! output head is a `Linear`, whatever the weight format.

use candle_core::quantized::QMatMul;
use candle_core::{Module, Tensor};

use super::Result;

/// The base weight, `[out_features, in_features]`.
#[derive(Debug, Clone)]
pub enum Weight {
    /// Kept in its GGUF block format; activations are quantized on the fly.
    Quantized(QMatMul),
    /// Dense float32.
    Dense(Tensor),
}

#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
    in_features: usize,
    out_features: usize,
    span: tracing::Span,
}

impl Linear {
    pub fn new(
        weight: Weight,
        bias: Option<Tensor>,
        out_features: usize,
        in_features: usize,
    ) -> Self {
        Self {
            weight,
            bias,
            in_features,
            out_features,
            span: tracing::trace_span!("linear", out_features, in_features),
        }
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// `x`: `[rows, in_features]` → `[rows, out_features]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let _enter = self.span.enter();
        let y = match &self.weight {
            Weight::Quantized(w) => w.forward(x)?,
            Weight::Dense(w) => x.matmul(&w.t()?)?,
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}
