//! PEFT's `add_weighted_adapter` combinations that build one new adapter out
//! of several, computed once per composition (off the engine thread) and then
//! served like any adapter. `cat` needs none of this: it is served un-merged
//! (`model::lora::AdapterWeights::composed`).
//!
//! The others treat the A's and the B's of the adapters that target a module
//! as task tensors, separately (PEFT's `_generalized_task_arithmetic_weighted_adapter`):
//! weight `cᵢ = ±√|wᵢ·sᵢ|` on A (the sign of `wᵢ·sᵢ`) and `√|wᵢ·sᵢ|` on B;
//! `linear` sums `cᵢ·Tᵢ`; `magnitude_prune` first keeps each tensor's
//! `density` largest entries; `ties` prunes so, elects each entry's sign
//! (`total`: of the sum, `frequency`: of the count) and averages the weighted
//! entries that agree; `dare_linear` and `dare_ties` prune at random instead,
//! keeping each entry with probability `density` (rescaled by 1/density),
//! seeded. All need one rank. `svd` instead sums the weighted deltas
//! `Σ wᵢ·sᵢ·Bᵢ·Aᵢ` and keeps their best rank-`svd_rank` approximation
//! (`svd`), any ranks. The merged adapter takes the first adapter's
//! config with `r = lora_alpha = rank`, no rsLoRA and no patterns, so its scale
//! is 1 — what PEFT (0.22) builds, cross terms `cᵢcⱼ·BᵢAⱼ` included. Biases of
//! lora_B (`lora_bias`) sum as `Σ wᵢ·sᵢ·biasᵢ`.

use std::sync::Arc;

use super::adapter::BaseShapes;
use super::{LoraError, MergeOptions};
use crate::model::lora::{AdapterWeights, LoraWeights, Part, Values};
use crate::rng::SplitMix;

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
#[value(rename_all = "snake_case")]
pub enum Combination {
    /// Every adapter's delta with its weight, un-merged: exact for any ranks.
    #[default]
    Cat,
    /// A and B summed separately (one rank).
    Linear,
    /// Trim to `density`, elect signs, average what agrees (one rank).
    Ties,
    /// Trim to `density`, then `linear` (one rank).
    MagnitudePrune,
    /// Drop at random (kept with probability `density`, rescaled), then `linear`.
    DareLinear,
    /// Drop at random, then `ties`' sign election and average.
    DareTies,
    /// The weighted sum of the deltas truncated to a rank (`svd_rank`, default
    /// the largest adapter's): any ranks.
    Svd,
}

impl Combination {
    pub fn name(self) -> &'static str {
        match self {
            Combination::Cat => "cat",
            Combination::Linear => "linear",
            Combination::Ties => "ties",
            Combination::MagnitudePrune => "magnitude_prune",
            Combination::DareLinear => "dare_linear",
            Combination::DareTies => "dare_ties",
            Combination::Svd => "svd",
        }
    }

    /// Whether it keeps only part of each tensor (reads `density`).
    pub fn prunes(self) -> bool {
        !matches!(self, Combination::Cat | Combination::Linear | Combination::Svd)
    }

    /// Whether it drops entries at random (reads `seed`).
    pub fn is_random(self) -> bool {
        matches!(self, Combination::DareLinear | Combination::DareTies)
    }

    /// Whether it elects signs (reads `majority_sign_method`).
    pub fn elects_signs(self) -> bool {
        matches!(self, Combination::Ties | Combination::DareTies)
    }
}

/// How `ties` and `dare_ties` elect each entry's sign (PEFT's `majority_sign_method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Deserialize, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SignMethod {
    /// The sign of the entries' sum.
    #[default]
    Total,
    /// The sign most entries have.
    Frequency,
}

/// PEFT's `linear` merge of `parts` (single adapters loaded for `base`).
pub fn linear(parts: &[Part], base: &BaseShapes) -> Result<AdapterWeights, LoraError> {
    merge(parts, base, &MergeOptions { combination_type: Combination::Linear, ..Default::default() })
}

/// The merge of `parts` that `options` asks for (any combination but `cat`).
pub fn merge(parts: &[Part], base: &BaseShapes, options: &MergeOptions) -> Result<AdapterWeights, LoraError> {
    let combination = options.combination_type;
    let first = parts.first().ok_or_else(|| LoraError::Config("nothing to merge".into()))?;
    let config =
        first.adapter.config.as_deref().ok_or_else(|| LoraError::Config("the first adapter has no config".into()))?;
    let mut ranks = parts.iter().filter_map(|p| p.adapter.config.as_ref().map(|c| c.r));
    let one_rank = combination != Combination::Svd || parts.len() == 1;
    if one_rank && ranks.any(|r| r != config.r) {
        return Err(LoraError::Mismatch(format!(
            "`{}` merges adapters of one rank; these have r = {}",
            combination.name(),
            parts
                .iter()
                .filter_map(|p| p.adapter.config.as_ref().map(|c| c.r.to_string()))
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    // `svd`'s rank: asked, or the largest of the adapters' (rank patterns included).
    let largest = parts.iter().flat_map(|p| p.adapter.layers.iter().flatten().flatten().map(|w| w.rank)).max();
    let svd_rank = options.svd_rank.or(largest).unwrap_or(config.r);
    let merged = Arc::new(config.merged(if combination == Combination::Svd { svd_rank } else { config.r }));
    // PEFT merges one adapter `linear`, whatever was asked.
    let options =
        if parts.len() == 1 { &MergeOptions { combination_type: Combination::Linear, ..*options } } else { options };
    let sites = base.sites();
    let layers = (0..base.num_layers)
        .map(|layer| {
            let mut out: [Option<LoraWeights>; 7] = Default::default();
            // Per checkpoint module: a fused one (Phi-3's qkv_proj) is one
            // task tensor, its projections' B side by side, as PEFT sees it.
            for (index, site) in sites.iter().enumerate() {
                let modules: Vec<usize> = site.parts.iter().map(|m| m.index()).collect();
                let present: Vec<(Vec<&LoraWeights>, f32)> = parts
                    .iter()
                    .filter_map(|p| {
                        let layer = p.adapter.layers.get(layer)?;
                        Some((modules.iter().map(|&m| layer[m].as_ref()).collect::<Option<Vec<_>>>()?, p.factor))
                    })
                    .collect();
                let Some((shape, _)) = present.first() else { continue };
                if options.combination_type == Combination::Svd {
                    let scale = merged.scale(layer, site.path) as f32;
                    for (module, w) in modules.iter().zip(svd_site(&present, svd_rank, scale, base)) {
                        out[*module] = Some(w);
                    }
                    continue;
                }
                let (rank, in_features) = (shape[0].rank, shape[0].in_features);
                if let Some((w, _)) = present.iter().find(|(w, _)| w[0].rank != rank) {
                    return Err(LoraError::Mismatch(format!(
                        "`{}` merges adapters of one rank; layer {layer} has ranks {rank} and {}",
                        combination.name(),
                        w[0].rank
                    )));
                }
                // The sign of weight × scale goes on A only (on both it would cancel).
                let products: Vec<f32> = present.iter().map(|(w, factor)| factor * w[0].scale).collect();
                let on_a: Vec<f32> = products.iter().map(|p| p.abs().sqrt() * p.signum()).collect();
                let on_b: Vec<f32> = products.iter().map(|p| p.abs().sqrt()).collect();
                let seed = |side: u64| (layer as u64) << 8 | (index as u64) << 1 | side;
                let a: Vec<Vec<f32>> = present.iter().map(|(w, _)| w[0].a.to_f32()).collect();
                let b_t: Vec<Vec<f32>> =
                    present.iter().map(|(w, _)| w.iter().flat_map(|w| w.b_t.to_f32()).collect()).collect();
                let a = combine(&a, &on_a, options, seed(0));
                let mut b_t = combine(&b_t, &on_b, options, seed(1)).into_iter();
                for (j, &module) in modules.iter().enumerate() {
                    let out_features = shape[j].out_features;
                    let bias = merged_bias(&present, j);
                    out[module] = Some(LoraWeights {
                        a: Values::new(a.clone(), base.precision),
                        b_t: Values::new(b_t.by_ref().take(rank * out_features).collect(), base.precision),
                        rank,
                        in_features,
                        out_features,
                        scale: merged.scale(layer, site.path) as f32,
                        bias,
                        dora: None,
                    });
                }
            }
            Ok(out)
        })
        .collect::<Result<Vec<_>, LoraError>>()?;
    let merged_from = parts.iter().map(|p| p.adapter.clone()).collect();
    let saved = crate::model::lora::saved_of(parts).map_err(|module| {
        LoraError::Unsupported(format!("two of these adapters replace `{module}` (modules_to_save)"))
    })?;
    Ok(AdapterWeights { layers, parts: Vec::new(), config: Some(merged), merged_from, saved })
}

/// PEFT's `svd` for one checkpoint module (its projections' weights per
/// adapter, with the adapter's weight): `Σ wᵢ·sᵢ·Bᵢ·Aᵢ` (a fused module's
/// rows stacked) truncated to `rank`, as `B = U·S`, `A = Vᵀ`, at `scale`.
fn svd_site(present: &[(Vec<&LoraWeights>, f32)], rank: usize, scale: f32, base: &BaseShapes) -> Vec<LoraWeights> {
    let shape = &present[0].0;
    let outs: Vec<usize> = shape.iter().map(|w| w.out_features).collect();
    let mut b_columns = Vec::new();
    let mut a_rows = Vec::new();
    for (weights, factor) in present {
        let (a, w0) = (weights[0].a.to_f32(), weights[0]);
        let b_t: Vec<Vec<f32>> = weights.iter().map(|w| w.b_t.to_f32()).collect();
        let product = f64::from(factor * w0.scale);
        for k in 0..w0.rank {
            a_rows.push(a[k * w0.in_features..(k + 1) * w0.in_features].iter().map(|&v| f64::from(v)).collect());
            let column = b_t
                .iter()
                .zip(&outs)
                .flat_map(|(b, &out)| b[k * out..(k + 1) * out].iter().map(|&v| product * f64::from(v)))
                .collect();
            b_columns.push(column);
        }
    }
    let (new_b, new_a) = super::svd::truncate(&b_columns, &a_rows, rank);
    let kept = new_b.len().max(1);
    let in_features = shape[0].in_features;
    let a: Vec<f32> = match new_a.is_empty() {
        true => vec![0.0; in_features],
        false => new_a.iter().flatten().map(|&v| v as f32).collect(),
    };
    let mut first = 0;
    shape
        .iter()
        .enumerate()
        .map(|(j, w)| {
            let out = w.out_features;
            // b_t is [rank, out]: row k is B's column k, this projection's rows.
            let b_t: Vec<f32> = match new_b.is_empty() {
                true => vec![0.0; out],
                false => new_b.iter().flat_map(|column| column[first..first + out].iter().map(|&v| v as f32)).collect(),
            };
            first += out;
            let bias = merged_bias(present, j);
            LoraWeights {
                a: Values::new(a.clone(), base.precision),
                b_t: Values::new(b_t, base.precision),
                rank: kept,
                in_features,
                out_features: out,
                scale,
                bias,
                dora: None,
            }
        })
        .collect()
}

/// The merged lora_B bias of a module's `j`-th projection: `Σ wᵢ·sᵢ·biasᵢ`
/// over the adapters that have one (biases add to the output apart from A
/// and B, whatever the combination); None when none has.
fn merged_bias(present: &[(Vec<&LoraWeights>, f32)], j: usize) -> Option<Vec<f32>> {
    let mut sum = present.iter().any(|(w, _)| w[j].bias.is_some()).then(|| vec![0f32; present[0].0[j].out_features])?;
    for (weights, factor) in present {
        if let Some(b) = &weights[j].bias {
            for (s, v) in sum.iter_mut().zip(b) {
                *s += factor * weights[j].scale * v;
            }
        }
    }
    Some(sum)
}

/// One side's task tensors (all of one length) combined with `weights`.
fn combine(tensors: &[Vec<f32>], weights: &[f32], options: &MergeOptions, stream: u64) -> Vec<f32> {
    let combination = options.combination_type;
    let density = options.density.unwrap_or(1.0);
    let pruned: Vec<Vec<f32>> = if !combination.prunes() || density >= 1.0 {
        tensors.to_vec()
    } else if combination.is_random() {
        let seed = options.seed.unwrap_or(0);
        tensors
            .iter()
            .enumerate()
            .map(|(i, t)| {
                random_prune(t, density, SplitMix(seed ^ (stream << 16 | i as u64).wrapping_mul(0x9E37_79B9)))
            })
            .collect()
    } else {
        tensors.iter().map(|t| magnitude_prune(t, density)).collect()
    };
    let len = tensors.first().map_or(0, Vec::len);
    if !combination.elects_signs() {
        let mut sum = vec![0f32; len];
        for (t, w) in pruned.iter().zip(weights) {
            for (s, v) in sum.iter_mut().zip(t) {
                *s += w * v;
            }
        }
        return sum;
    }
    let method = options.majority_sign_method.unwrap_or_default();
    (0..len)
        .map(|e| {
            let elected: f32 = match method {
                SignMethod::Total => pruned.iter().map(|t| t[e]).sum(),
                SignMethod::Frequency => pruned.iter().map(|t| sign(t[e])).sum(),
            };
            let majority = if elected >= 0.0 { 1.0 } else { -1.0 };
            let (mut sum, mut kept) = (0f32, 0f32);
            for (t, w) in pruned.iter().zip(weights) {
                if sign(t[e]) == majority {
                    sum += w * t[e];
                    kept += 1.0;
                }
            }
            sum / kept.max(1.0)
        })
        .collect()
}

/// torch's `sign`: 0 for 0.
fn sign(v: f32) -> f32 {
    if v > 0.0 {
        1.0
    } else if v < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// The `int(density · len)` entries of largest magnitude, the rest zero.
fn magnitude_prune(t: &[f32], density: f64) -> Vec<f32> {
    let keep = (density * t.len() as f64) as usize;
    if keep == 0 {
        return vec![0.0; t.len()];
    }
    let mut magnitudes: Vec<f32> = t.iter().map(|v| v.abs()).collect();
    let cut = t.len() - keep;
    let (_, &mut threshold, _) = magnitudes.select_nth_unstable_by(cut, f32::total_cmp);
    // Above the threshold all stay; at it, as many as fill `keep`.
    let mut at_threshold = keep - t.iter().filter(|v| v.abs() > threshold).count();
    t.iter()
        .map(|&v| {
            if v.abs() > threshold {
                v
            } else if v.abs() == threshold && at_threshold > 0 {
                at_threshold -= 1;
                v
            } else {
                0.0
            }
        })
        .collect()
}

/// Each entry kept with probability `density` and divided by it (DARE).
fn random_prune(t: &[f32], density: f64, mut rng: SplitMix) -> Vec<f32> {
    let divisor = density as f32;
    t.iter().map(|&v| if rng.next_f64() < density { v / divisor } else { 0.0 }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(combination_type: Combination, density: f64, method: SignMethod) -> MergeOptions {
        MergeOptions {
            combination_type,
            density: Some(density),
            majority_sign_method: Some(method),
            seed: Some(7),
            svd_rank: None,
        }
    }

    #[test]
    fn magnitude_pruning_keeps_the_largest_entries() {
        assert_eq!(magnitude_prune(&[0.1, -3.0, 2.0, -0.5, 1.0], 0.6), [0.0, -3.0, 2.0, 0.0, 1.0]); // 3 of 5
                                                                                                    // int(0.5 · 5) = 2; ties at the threshold fill what is left.
        assert_eq!(magnitude_prune(&[1.0, -1.0, 1.0, 0.5, 0.2], 0.5), [1.0, -1.0, 0.0, 0.0, 0.0]);
        assert_eq!(magnitude_prune(&[1.0, 2.0], 0.2), [0.0, 0.0]);
    }

    #[test]
    fn ties_averages_the_weighted_entries_that_agree_with_the_elected_sign() {
        let tensors = vec![vec![1.0, -2.0, 0.5], vec![-3.0, -1.0, 0.25]];
        let weights = [2.0, 1.0];
        // total: sums -2, -3, 0.75 → signs -, -, +.
        let total = combine(&tensors, &weights, &options(Combination::Ties, 1.0, SignMethod::Total), 0);
        assert_eq!(total, [-3.0, (-4.0 - 1.0) / 2.0, (1.0 + 0.25) / 2.0]);
        // frequency: counts 0 (→ +), -2, +2.
        let frequency = combine(&tensors, &weights, &options(Combination::Ties, 1.0, SignMethod::Frequency), 0);
        assert_eq!(frequency, [2.0, -2.5, 0.625]);
        let linear = combine(&tensors, &weights, &options(Combination::Linear, 0.5, SignMethod::Total), 0);
        assert_eq!(linear, [-1.0, -5.0, 1.25], "linear ignores density");
    }

    #[test]
    fn dare_drops_one_minus_density_rescales_and_repeats_with_its_seed() {
        let tensor: Vec<f32> = (0..100_000).map(|i| 1.0 + (i % 7) as f32).collect();
        let (tensors, weights) = (vec![tensor.clone()], [1.0]);
        let dare = |seed| {
            let o = MergeOptions { seed: Some(seed), ..options(Combination::DareLinear, 0.3, SignMethod::Total) };
            combine(&tensors, &weights, &o, 3)
        };
        let once = dare(7);
        assert_eq!(once, dare(7), "same seed, same drop");
        assert_ne!(once, dare(8), "another seed, another drop");
        let dropped = once.iter().filter(|v| **v == 0.0).count() as f64 / tensor.len() as f64;
        assert!((dropped - 0.7).abs() < 0.02, "dropped {dropped}");
        for (kept, v) in once.iter().zip(&tensor).filter(|(k, _)| **k != 0.0) {
            assert!((kept - v / 0.3).abs() < 1e-4);
        }
        // Density 1 drops nothing: dare_linear is linear.
        let full = options(Combination::DareLinear, 1.0, SignMethod::Total);
        assert_eq!(combine(&tensors, &weights, &full, 3), tensor);
    }
}
