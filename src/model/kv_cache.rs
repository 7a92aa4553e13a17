//! One sequence's attention keys and values, layer by layer.

use candle_core::Tensor;

use super::Result;

/// Keys and values of every layer for one sequence, each `[kv_heads, tokens, head_dim]`.
#[derive(Debug, Default, Clone)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self { layers: vec![None; num_layers], len: 0 }
    }

    /// Tokens already cached: the position of the next token.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `k`, `v` (`[kv_heads, new, head_dim]`) to `layer` and returns the
    /// whole history including them.
    pub(crate) fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (k, v) = match &self.layers[layer] {
            None => (k.clone(), v.clone()),
            Some((pk, pv)) => (Tensor::cat(&[pk, k], 1)?, Tensor::cat(&[pv, v], 1)?),
        };
        self.layers[layer] = Some((k.clone(), v.clone()));
        Ok((k, v))
    }

    /// Called once per forward after every layer appended `new` tokens.
    pub(crate) fn advance(&mut self, new: usize) {
        self.len += new;
    }
}
