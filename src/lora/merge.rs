//! PEFT's `add_weighted_adapter` combinations that build one new adapter out
//! of several, computed once per composition (off the engine thread) and then
//! served like any adapter. `cat` needs none of this: it is served un-merged
//! (`model::lora::AdapterWeights::composed`).
//!
//! `linear`: per module, `A = Σ cᵢ·Aᵢ` and `B = Σ cᵢ·Bᵢ` with
//! `cᵢ = √(weightᵢ · scaleᵢ)` over the adapters that target it, all of one
//! rank; the merged adapter takes the first adapter's config with
//! `r = lora_alpha = rank`, no rsLoRA and no patterns, so its scale is 1 —
//! exactly what PEFT (0.22) builds, cross terms `cᵢcⱼ·BᵢAⱼ` included.
//! Biases of lora_B (`lora_bias`) sum as `Σ weightᵢ·scaleᵢ·biasᵢ`.

use std::sync::Arc;

use super::adapter::BaseShapes;
use super::LoraError;
use crate::model::lora::{AdapterWeights, LoraWeights, Part, Values};

/// The strategies a composition can take (PEFT's `combination_type`).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Default,
    serde::Deserialize,
    serde::Serialize,
    utoipa::ToSchema,
    clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
pub enum Combination {
    /// Every adapter's delta with its weight, un-merged: exact for any ranks.
    #[default]
    Cat,
    /// A and B summed separately (equal ranks; weight × scale must not be negative).
    Linear,
}

impl Combination {
    pub fn name(self) -> &'static str {
        match self {
            Combination::Cat => "cat",
            Combination::Linear => "linear",
        }
    }
}

/// PEFT's `linear` merge of `parts` (single adapters loaded for `base`).
pub fn linear(parts: &[Part], base: &BaseShapes) -> Result<AdapterWeights, LoraError> {
    let first = parts.first().ok_or_else(|| LoraError::Config("nothing to merge".into()))?;
    let config =
        first.adapter.config.as_deref().ok_or_else(|| LoraError::Config("the first adapter has no config".into()))?;
    let mut ranks = parts.iter().filter_map(|p| p.adapter.config.as_ref().map(|c| c.r));
    if ranks.any(|r| r != config.r) {
        return Err(LoraError::Mismatch(format!(
            "`linear` merges adapters of one rank; these have r = {}",
            parts
                .iter()
                .filter_map(|p| p.adapter.config.as_ref().map(|c| c.r.to_string()))
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let merged = Arc::new(config.merged(config.r));
    let sites = base.sites();
    let site_of = |module: usize| sites.iter().find(|s| s.parts.iter().any(|m| m.index() == module)).map(|s| s.path);
    let layers = (0..base.num_layers)
        .map(|layer| {
            let mut out: [Option<LoraWeights>; 7] = Default::default();
            for (module, slot) in out.iter_mut().enumerate() {
                let present: Vec<(&LoraWeights, f32)> = parts
                    .iter()
                    .filter_map(|p| Some((p.adapter.layers.get(layer)?[module].as_ref()?, p.factor)))
                    .collect();
                let Some(&(shape, _)) = present.first() else { continue };
                let (rank, in_features, out_features) = (shape.rank, shape.in_features, shape.out_features);
                let (mut a, mut b_t) = (vec![0f32; rank * in_features], vec![0f32; rank * out_features]);
                // lora_B's biases add to the output apart from A and B:
                // `Σ weightᵢ · scaleᵢ · biasᵢ`, under the merged scale.
                let mut bias = present.iter().any(|(w, _)| w.bias.is_some()).then(|| vec![0f32; out_features]);
                for (w, factor) in &present {
                    if w.rank != rank {
                        return Err(LoraError::Mismatch(format!(
                            "`linear` merges adapters of one rank; layer {layer} has ranks {rank} and {}",
                            w.rank
                        )));
                    }
                    let product = factor * w.scale;
                    if product < 0.0 {
                        return Err(LoraError::Mismatch(format!(
                            "`linear` takes the square root of weight × scale, which is negative ({factor} × {}); \
                             use `cat` to subtract an adapter",
                            w.scale
                        )));
                    }
                    let c = product.sqrt();
                    for (sum, v) in a.iter_mut().zip(w.a.to_f32()) {
                        *sum += c * v;
                    }
                    for (sum, v) in b_t.iter_mut().zip(w.b_t.to_f32()) {
                        *sum += c * v;
                    }
                    if let (Some(sum), Some(b)) = (bias.as_mut(), &w.bias) {
                        for (sum, v) in sum.iter_mut().zip(b) {
                            *sum += product * v;
                        }
                    }
                }
                let path = site_of(module).ok_or_else(|| LoraError::Config(format!("module {module} has no site")))?;
                *slot = Some(LoraWeights {
                    a: Values::new(a, base.precision),
                    b_t: Values::new(b_t, base.precision),
                    rank,
                    in_features,
                    out_features,
                    scale: merged.scale(layer, path) as f32,
                    bias,
                    dora: None,
                });
            }
            Ok(out)
        })
        .collect::<Result<Vec<_>, LoraError>>()?;
    let merged_from = parts.iter().map(|p| p.adapter.clone()).collect();
    Ok(AdapterWeights { layers, parts: Vec::new(), config: Some(merged), merged_from })
}
