//! LoRA adapters in PEFT format: parse and validate them against the base
//! model, and keep the registry of adapters clients can select by name.
//!
//! Layout:
//! - `config`: `adapter_config.json` (targets, rank, scale, unsupported features);
//! - `adapter`: a PEFT folder → `model::lora::AdapterWeights`, checked against the base;
//! - `stored`: one tensor read in place from the safetensors bytes, converted once;
//! - `files`: each file of a folder checked (root, regular file, size) before it is read;
//! - `registry`: names → folders (resolved from the roots on first use),
//!   runtime load/unload, resident weights within a byte budget;
//! - `compositions`: weighted compositions shared while requests hold them;
//! - `dora`: DoRA's per-output scale, computed at load from the base;
//! - `saved`: `modules_to_save`, whole modules (embedding, head, norms) an adapter replaces;
//! - `svd`: the rank truncation of a low-rank product, for the `svd` merge;
//! - `merge`: PEFT's combinations that build one adapter from several (`linear`);
//! - `random`: random PEFT adapters for benchmarks and tests.

pub mod adapter;
mod compositions;
pub mod config;
pub mod dora;
pub mod files;
pub mod loads;
pub mod merge;
pub mod random;
pub mod registry;
mod saved;
mod stored;
mod svd;

pub use adapter::BaseShapes;
pub use config::{AdapterConfig, Module};
pub use registry::{AdapterRegistry, RegistryOptions};

/// One adapter of a weighted composition (a request's or a preset's `adapters`).
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AdapterChoice {
    /// A registered adapter (or one the adapter roots resolve).
    #[schema(example = "pirate")]
    pub name: String,
    /// Its delta's weight (default 1); 0 leaves it out, negative subtracts it.
    #[schema(example = 0.7)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight: Option<f64>,
}

/// What tells merges apart: combination, density bits, sign method, seed, rank.
pub type MergeKey = (merge::Combination, u64, Option<merge::SignMethod>, u64, Option<usize>);

/// How a composition combines its adapters (PEFT's `add_weighted_adapter`
/// options; a request's or a preset's `adapter_merge`).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Deserialize, serde::Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MergeOptions {
    /// `cat` (default): every delta with its weight, un-merged; the others
    /// merge the A's and the B's once (`linear`, `ties`, `magnitude_prune`,
    /// `dare_linear`, `dare_ties`; see `merge`).
    #[serde(default)]
    pub combination_type: merge::Combination,
    /// The fraction of each tensor the pruning strategies keep, in (0, 1]
    /// (default 1: nothing pruned).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub density: Option<f64>,
    /// `ties` and `dare_ties`: `total` (default) or `frequency`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub majority_sign_method: Option<merge::SignMethod>,
    /// `dare_*`: the seed of the random drop (default 0), so a composition is
    /// the same every time it is made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// `svd`: the merged adapter's rank (default the largest of its parts').
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub svd_rank: Option<usize>,
}

impl MergeOptions {
    /// What tells two merges apart: the fields the combination reads.
    pub fn key(&self) -> MergeKey {
        let c = self.combination_type;
        let density = if c.prunes() { self.density.unwrap_or(1.0).to_bits() } else { 0 };
        let method = if c.elects_signs() { Some(self.majority_sign_method.unwrap_or_default()) } else { None };
        let seed = if c.is_random() { self.seed.unwrap_or(0) } else { 0 };
        let rank = if c == merge::Combination::Svd { self.svd_rank } else { None };
        (c, density, method, seed, rank)
    }

    /// The field that is out of range, and why. `density` is read only by
    /// the strategies that prune (LoRAX clients send one with `linear`):
    /// in [0, 1] for the magnitude ones, (0, 1] for DARE, which divides by it.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        let c = self.combination_type;
        match self.density {
            Some(d) if c.is_random() && !(d > 0.0 && d <= 1.0) => {
                Err(("density", format!("`{}` needs a `density` above 0 and at most 1, got {d}", c.name())))
            }
            Some(d) if c.prunes() && !(0.0..=1.0).contains(&d) => {
                Err(("density", format!("`{}` needs a `density` from 0 to 1, got {d}", c.name())))
            }
            _ if self.svd_rank == Some(0) => Err(("svd_rank", "`svd_rank` must be at least 1".to_string())),
            _ => Ok(()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error("{0}")]
    Config(String),
    #[error("unsupported adapter feature: {0}")]
    Unsupported(String),
    #[error("adapter weights: {0}")]
    Weights(String),
    #[error("adapter does not fit the base model: {0}")]
    Mismatch(String),
    #[error("{0}")]
    Io(String),
    #[error("invalid adapter name `{0}`: use 1-64 letters, digits, '.', '_' or '-', not starting with '.' or '-'")]
    BadName(String),
    #[error("adapter path {0} is not under an allowed adapter root")]
    OutsideRoots(String),
    #[error("an adapter named `{0}` is already loaded from another path")]
    NameTaken(String),
    #[error("no adapter named `{0}`")]
    NotFound(String),
    #[error("{0} adapters are registered, the most --max-adapters allows; unload one first")]
    Full(usize),
}
