//! PEFT's `modules_to_save`: whole modules an adapter replaces (the token
//! embedding, the output head, RMSNorm weights), chosen per row, so rows of
//! such an adapter share a step with rows of others and of the base.

use std::sync::Arc;

use super::super::kernels::{self, dense::DenseMatrix, half::HalfKind, half::HalfMatrix};
use super::Precision;

/// A replaced `[rows, cols]` matrix (`embed_tokens` or `lm_head`), in the
/// adapter's precision.
#[derive(Debug)]
pub enum SavedMatrix {
    F32(DenseMatrix),
    F16(HalfMatrix),
}

impl SavedMatrix {
    pub fn new(values: Vec<f32>, rows: usize, cols: usize, precision: Precision) -> Option<Self> {
        match precision {
            Precision::F32 => DenseMatrix::new(values, rows, cols).map(Self::F32),
            Precision::F16 => HalfMatrix::from_f32(HalfKind::F16, &values, rows, cols).map(Self::F16),
        }
    }

    pub fn rows(&self) -> usize {
        match self {
            Self::F32(m) => m.rows(),
            Self::F16(m) => m.rows(),
        }
    }

    pub fn bytes(&self) -> usize {
        match self {
            Self::F32(m) => m.bytes(),
            Self::F16(m) => m.bytes(),
        }
    }

    /// Rows `ids`, float32 (an embedding lookup); None for an id outside.
    pub fn gather(&self, ids: &[u32]) -> Option<Vec<f32>> {
        match self {
            Self::F16(m) => m.gather(ids),
            Self::F32(m) => {
                let cols = m.cols();
                let mut out = Vec::with_capacity(ids.len() * cols);
                for &id in ids {
                    out.extend_from_slice(m.values().get(id as usize * cols..(id as usize + 1) * cols)?);
                }
                Some(out)
            }
        }
    }

    /// `x · Wᵀ` for `x` `[tokens, cols]` (the output head), on the same
    /// batch-invariant kernels as the base's dense weights.
    pub fn matmul(&self, x: &[f32]) -> Vec<f32> {
        match self {
            Self::F32(m) => m.matmul(x, kernels::isa()),
            Self::F16(m) => m.matmul(x, kernels::isa()),
        }
    }
}

/// Which RMSNorm of a decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerNorm {
    Input = 0,
    PostAttention = 1,
}

impl LayerNorm {
    pub const ALL: [LayerNorm; 2] = [LayerNorm::Input, LayerNorm::PostAttention];

    /// The module's path under `model.layers.N`.
    pub fn path(self) -> &'static str {
        match self {
            LayerNorm::Input => "input_layernorm",
            LayerNorm::PostAttention => "post_attention_layernorm",
        }
    }
}

/// The modules one adapter (or a composition, from its parts) replaces.
#[derive(Debug, Clone, Default)]
pub struct SavedModules {
    pub embed_tokens: Option<Arc<SavedMatrix>>,
    pub lm_head: Option<Arc<SavedMatrix>>,
    /// The final norm (`model.norm`).
    pub norm: Option<Arc<Vec<f32>>>,
    /// Per layer, by `LayerNorm` index (empty when no layer norm is saved).
    pub layer_norms: Vec<[Option<Arc<Vec<f32>>>; 2]>,
}

impl SavedModules {
    pub fn is_empty(&self) -> bool {
        self.embed_tokens.is_none()
            && self.lm_head.is_none()
            && self.norm.is_none()
            && self.layer_norms.iter().flatten().all(Option::is_none)
    }

    /// The replaced norm weight of `layer`, if any.
    pub fn layer_norm(&self, layer: usize, which: LayerNorm) -> Option<&[f32]> {
        self.layer_norms.get(layer)?[which as usize].as_deref().map(Vec::as_slice)
    }

    /// Bytes held (a tied head shares the embedding's).
    pub fn bytes(&self) -> u64 {
        let vector = |v: &Option<Arc<Vec<f32>>>| v.as_ref().map_or(0, |v| v.len() as u64 * 4);
        let embed = self.embed_tokens.as_ref().map_or(0, |m| m.bytes() as u64);
        let head = match (&self.lm_head, &self.embed_tokens) {
            (Some(h), Some(e)) if Arc::ptr_eq(h, e) => 0,
            (Some(h), _) => h.bytes() as u64,
            (None, _) => 0,
        };
        embed + head + vector(&self.norm) + self.layer_norms.iter().flatten().map(vector).sum::<u64>()
    }

    /// The Hugging Face names of the modules replaced.
    pub fn names(&self) -> Vec<String> {
        let mut names = Vec::new();
        if self.embed_tokens.is_some() {
            names.push("model.embed_tokens".to_string());
        }
        for (layer, norms) in self.layer_norms.iter().enumerate() {
            for which in LayerNorm::ALL {
                if norms[which as usize].is_some() {
                    names.push(format!("model.layers.{layer}.{}", which.path()));
                }
            }
        }
        if self.norm.is_some() {
            names.push("model.norm".to_string());
        }
        if self.lm_head.is_some() {
            names.push("lm_head".to_string());
        }
        names
    }

    /// What a composition of adapters replaces: each module from the one
    /// part that replaces it. Err names a module two parts replace (a whole
    /// module cannot be weighted or merged; PEFT refuses the pair too).
    pub fn union<'a>(all: impl IntoIterator<Item = &'a SavedModules>) -> Result<SavedModules, String> {
        fn take<T: Clone>(into: &mut Option<T>, from: &Option<T>, name: impl FnOnce() -> String) -> Result<(), String> {
            match (into.is_some(), from) {
                (true, Some(_)) => Err(name()),
                (false, Some(v)) => {
                    *into = Some(v.clone());
                    Ok(())
                }
                _ => Ok(()),
            }
        }
        let mut out = SavedModules::default();
        for saved in all {
            take(&mut out.embed_tokens, &saved.embed_tokens, || "model.embed_tokens".into())?;
            take(&mut out.lm_head, &saved.lm_head, || "lm_head".into())?;
            take(&mut out.norm, &saved.norm, || "model.norm".into())?;
            if out.layer_norms.len() < saved.layer_norms.len() {
                out.layer_norms.resize(saved.layer_norms.len(), Default::default());
            }
            for (layer, (into, from)) in out.layer_norms.iter_mut().zip(&saved.layer_norms).enumerate() {
                for which in LayerNorm::ALL {
                    let i = which as usize;
                    take(&mut into[i], &from[i], || format!("model.layers.{layer}.{}", which.path()))?;
                }
            }
        }
        Ok(out)
    }
}

/// RMSNorm of one activation row in place, as transformers computes it:
/// `x / sqrt(mean(x²) + eps) · weight` (a replaced norm, or one of Qwen3's
/// per-head norms).
pub fn rms_norm_in_place(x: &mut [f32], weight: &[f32], eps: f32) {
    let mean = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (mean + eps).sqrt();
    for (v, w) in x.iter_mut().zip(weight) {
        *v = *v * inv * w;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vector(v: &[f32]) -> Option<Arc<Vec<f32>>> {
        Some(Arc::new(v.to_vec()))
    }

    #[test]
    fn a_composition_takes_each_module_from_the_one_part_that_saves_it() {
        let head = Arc::new(SavedMatrix::new(vec![1.0; 6], 3, 2, Precision::F32).expect("shape"));
        let a = SavedModules { lm_head: Some(head.clone()), ..Default::default() };
        let b = SavedModules {
            norm: vector(&[2.0, 3.0]),
            layer_norms: vec![[None, None], [vector(&[1.0, 1.0]), None]],
            ..Default::default()
        };
        let both = SavedModules::union([&a, &b]).expect("no module twice");
        assert!(both.lm_head.as_ref().is_some_and(|h| Arc::ptr_eq(h, &head)));
        assert_eq!(both.layer_norm(1, LayerNorm::Input), Some(&[1.0, 1.0][..]));
        assert_eq!(both.layer_norm(1, LayerNorm::PostAttention), None);
        assert_eq!(both.names(), ["model.layers.1.input_layernorm", "model.norm", "lm_head"]);
        assert_eq!(both.bytes(), 6 * 4 + 2 * 4 + 2 * 4);
        let c = SavedModules { layer_norms: vec![[None, None], [vector(&[5.0, 5.0]), None]], ..Default::default() };
        assert_eq!(SavedModules::union([&a, &b, &c]).err().as_deref(), Some("model.layers.1.input_layernorm"));
        assert_eq!(SavedModules::union([&a, &a]).err().as_deref(), Some("lm_head"));
    }

    #[test]
    fn gather_and_matmul_read_the_same_rows_in_both_precisions() {
        let values: Vec<f32> = (0..12).map(|v| v as f32 * 0.5).collect();
        for precision in [Precision::F32, Precision::F16] {
            let m = SavedMatrix::new(values.clone(), 4, 3, precision).expect("shape");
            assert_eq!(m.gather(&[2, 0]), Some(vec![3.0, 3.5, 4.0, 0.0, 0.5, 1.0]));
            assert_eq!(m.gather(&[4]), None);
            // [1, 0, 0] picks column 0 of every row.
            assert_eq!(m.matmul(&[1.0, 0.0, 0.0]), vec![0.0, 1.5, 3.0, 4.5]);
        }
    }

    #[test]
    fn rms_norm_scales_by_the_root_mean_square() {
        let mut out = [3.0, 4.0];
        rms_norm_in_place(&mut out, &[1.0, 2.0], 0.0);
        let inv = 1.0 / (12.5f32).sqrt();
        assert_eq!(out, [3.0 * inv, 4.0 * inv * 2.0]);
    }
}
