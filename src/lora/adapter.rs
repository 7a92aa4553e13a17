//! A PEFT adapter folder (`adapter_config.json` + `adapter_model.safetensors`)
//! turned into the weights the kernels read (float32, or float16 beside a
//! quantized base), validated against the base model's shapes.

use std::path::Path;

use safetensors::SafeTensors;

use super::config::{AdapterConfig, Module};
use super::files::{AdapterFiles, MAX_WEIGHTS_BYTES};
use super::stored::Stored;
use super::LoraError;
use crate::model::lora::{AdapterWeights, LoraWeights, Precision, Slot, Values};
use crate::model::{ModelConfig, Projections};

/// `(out_features, in_features)` of every projection of the base, and
/// whether its checkpoint fuses q/k/v and gate/up (Phi-3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseShapes {
    pub num_layers: usize,
    pub dims: [(usize, usize); 7],
    pub fused: bool,
    pub vocab_size: usize,
    /// The output head is the token embedding (`tie_word_embeddings`).
    pub tied_embeddings: bool,
    /// Per-head q/k norms (Qwen3).
    pub qk_norm: bool,
    /// How loaded adapters keep their weights (`WeightMode::lora_precision`).
    pub precision: Precision,
    /// The base's weights, which DoRA's norms are computed from (None where
    /// only the shapes are known: DoRA adapters are refused there).
    pub weights: Option<Projections>,
}

/// A module an adapter can name (its path under `model.layers.N`) and the
/// projections it feeds: a fused module's `lora_B` rows split between them.
pub(crate) struct Site {
    pub(crate) path: &'static str,
    pub(crate) parts: Vec<Module>,
}

impl BaseShapes {
    pub fn of(cfg: &ModelConfig) -> Self {
        let (h, q, kv, ff) =
            (cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size);
        Self {
            num_layers: cfg.num_layers,
            dims: [(q, h), (kv, h), (kv, h), (h, q), (ff, h), (ff, h), (h, ff)],
            fused: cfg.architecture.fused_projections(),
            vocab_size: cfg.vocab_size,
            tied_embeddings: cfg.tie_word_embeddings,
            qk_norm: cfg.qk_norm,
            precision: Precision::F32,
            weights: None,
        }
    }

    /// The shapes of a loaded model, its adapters' precision and its weights.
    pub fn of_model(model: &crate::model::llama::Llama) -> Self {
        Self { precision: model.adapter_precision(), weights: Some(model.projections()), ..Self::of(model.config()) }
    }

    pub(crate) fn sites(&self) -> Vec<Site> {
        let one = |m: Module| Site { path: m.path(), parts: vec![m] };
        if self.fused {
            vec![
                Site { path: "self_attn.qkv_proj", parts: vec![Module::Q, Module::K, Module::V] },
                one(Module::O),
                Site { path: "mlp.gate_up_proj", parts: vec![Module::Gate, Module::Up] },
                one(Module::Down),
            ]
        } else {
            Module::ALL.into_iter().map(one).collect()
        }
    }
}

/// Reads and checks an adapter folder. Every failure names what is wrong.
pub fn load(dir: &Path, base: &BaseShapes, max_rank: usize) -> Result<AdapterWeights, LoraError> {
    load_files(&AdapterFiles::trusted(dir), base, max_rank)
}

/// Loads an adapter whose files are read through `files` (which checks each).
pub fn load_files(files: &AdapterFiles, base: &BaseShapes, max_rank: usize) -> Result<AdapterWeights, LoraError> {
    let text = files
        .read_text("adapter_config.json")?
        .ok_or_else(|| LoraError::Io(format!("{} has no adapter_config.json", files.dir().display())))?;
    let config = AdapterConfig::parse(&text)?;
    let Some(bytes) = files.read("adapter_model.safetensors", MAX_WEIGHTS_BYTES)? else {
        if std::fs::symlink_metadata(files.dir().join("adapter_model.bin")).is_ok() {
            return Err(LoraError::Unsupported(
                "pickled adapter_model.bin (never unpickled); convert it to adapter_model.safetensors".into(),
            ));
        }
        return Err(LoraError::Io(format!("{} has no adapter_model.safetensors", files.dir().display())));
    };
    from_safetensors(&config, &bytes, base, max_rank)
}

/// What an adapter tensor of a module is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    A,
    B,
    /// `lora_B.bias` (`lora_bias`).
    BBias,
    /// DoRA's `lora_magnitude_vector`.
    Magnitude,
}

/// `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` →
/// (3, "self_attn.q_proj", A).
fn parse_name(name: &str) -> Option<(usize, &str, Kind)> {
    let rest = name.strip_prefix("base_model.model.")?;
    let rest = rest.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    // PEFT drops the adapter name (and, for DoRA, the layer's `.weight`) on save.
    let rest = rest.strip_suffix(".weight").unwrap_or(rest);
    let rest = rest.strip_suffix(".default").unwrap_or(rest);
    if let Some(module) = rest.strip_suffix(".lora_magnitude_vector") {
        return Some((layer, module, Kind::Magnitude));
    }
    let (module, kind) = match rest.strip_suffix(".bias") {
        Some(rest) => (rest.strip_suffix(".lora_B").or_else(|| rest.strip_suffix(".lora_B.default"))?, Kind::BBias),
        None => {
            let (module, kind) = rest.rsplit_once(".lora_")?;
            (
                module,
                match kind {
                    "A" => Kind::A,
                    "B" => Kind::B,
                    _ => return None,
                },
            )
        }
    };
    Some((layer, module, kind))
}

/// The tensors one module of an adapter has in the file.
#[derive(Clone, Copy, Default)]
struct Found<'a> {
    a: Option<Stored<'a>>,
    b: Option<Stored<'a>>,
    bias: Option<Stored<'a>>,
    magnitude: Option<Stored<'a>>,
}

/// The weights of `adapter_model.safetensors` (its bytes), checked against
/// `config` and the base and converted straight from the file's bytes.
pub fn from_safetensors(
    config: &AdapterConfig,
    bytes: &[u8],
    base: &BaseShapes,
    max_rank: usize,
) -> Result<AdapterWeights, LoraError> {
    let file =
        SafeTensors::deserialize(bytes).map_err(|e| LoraError::Weights(format!("adapter_model.safetensors: {e}")))?;
    let sites = base.sites();
    // The tensors of each layer and site, read in place.
    let mut found: Vec<Vec<Found>> = vec![vec![Found::default(); sites.len()]; base.num_layers];
    let mut saved = super::saved::Reader::new(config, base)?;
    if file.is_empty() {
        return Err(LoraError::Weights("the safetensors file holds no tensors".into()));
    }
    for (name, view) in file.iter() {
        let known = || sites.iter().map(|s| s.path).collect::<Vec<_>>().join(", ");
        let unsupported = || {
            LoraError::Unsupported(format!(
                "tensor `{name}`: only lora_A/lora_B (and DoRA's magnitude, lora_B's bias) of the base's \
                 projections ({}), and whole embedding, head and norm modules (`modules_to_save`) are supported",
                known()
            ))
        };
        if let Some(slot) = super::saved::Slot::of_tensor(name) {
            saved.add(name, slot, &view)?;
            continue;
        }
        let (layer, path, kind) = parse_name(name).ok_or_else(unsupported)?;
        let site = sites.iter().position(|s| s.path == path).ok_or_else(unsupported)?;
        if layer >= base.num_layers {
            return Err(LoraError::Mismatch(format!(
                "`{name}` is for layer {layer}, the base has {} layers",
                base.num_layers
            )));
        }
        if !config.targets(layer, path) {
            return Err(LoraError::Mismatch(format!("`{name}` is not a target of adapter_config.json")));
        }
        let declared = |flag: bool, what: &str| {
            if flag {
                Ok(())
            } else {
                Err(LoraError::Mismatch(format!("`{name}` is {what}, which adapter_config.json does not declare")))
            }
        };
        let entry = &mut found[layer][site];
        match kind {
            Kind::A => entry.a = Some(Stored::of(name, &view)?),
            Kind::B => entry.b = Some(Stored::of(name, &view)?),
            Kind::BBias => {
                declared(config.lora_bias, "a lora_B bias (`lora_bias`)")?;
                entry.bias = Some(Stored::vector(name, &view)?);
            }
            Kind::Magnitude => {
                declared(config.use_dora, "a DoRA magnitude (`use_dora`)")?;
                entry.magnitude = Some(Stored::vector(name, &view)?);
            }
        }
    }
    let mut layers: Vec<[Option<LoraWeights>; 7]> = vec![Default::default(); base.num_layers];
    for (layer, weights) in layers.iter_mut().enumerate() {
        for (site, found) in sites.iter().zip(&mut found[layer]) {
            let name = super::config::module_name(layer, site.path);
            let (a, b) = match (found.a.take(), found.b.take()) {
                (None, None) if config.targets(layer, site.path) => {
                    return Err(LoraError::Weights(format!("{name}: lora_A and lora_B are missing")))
                }
                (None, None) => continue,
                (Some(a), Some(b)) => (a, b),
                (Some(_), None) => return Err(LoraError::Weights(format!("{name}: lora_B is missing"))),
                (None, Some(_)) => return Err(LoraError::Weights(format!("{name}: lora_A is missing"))),
            };
            let in_features = base.dims[site.parts[0].index()].1;
            let out_features: usize = site.parts.iter().map(|m| base.dims[m.index()].0).sum();
            let (rank, a_cols, b_rows, b_cols) = (a.rows, a.cols, b.rows, b.cols);
            if rank == 0 || a_cols != in_features {
                return Err(LoraError::Mismatch(format!(
                    "{name}: lora_A must be [rank, {in_features}], got [{rank}, {a_cols}]"
                )));
            }
            if b_rows != out_features || b_cols != rank {
                return Err(LoraError::Mismatch(format!(
                    "{name}: lora_B must be [{out_features}, {rank}], got [{b_rows}, {b_cols}]"
                )));
            }
            let configured = config.rank(layer, site.path);
            if rank != configured {
                return Err(LoraError::Mismatch(format!(
                    "{name}: weights have rank {rank}, adapter_config.json says {configured}"
                )));
            }
            if rank > max_rank {
                return Err(LoraError::Mismatch(format!("{name}: rank {rank} is above --max-lora-rank {max_rank}")));
            }
            let vector = |stored: &Option<Stored>, declared: bool, what: &str| match stored {
                Some(v) if v.rows != out_features => {
                    Err(LoraError::Mismatch(format!("{name}: {what} must have {out_features} values, got {}", v.rows)))
                }
                None if declared => Err(LoraError::Weights(format!("{name}: {what} is missing"))),
                _ => Ok(()),
            };
            vector(&found.bias, config.lora_bias, "lora_B.bias")?;
            vector(&found.magnitude, config.use_dora, "lora_magnitude_vector")?;
            let (bias, magnitude) = (found.bias.take(), found.magnitude.take());
            let scale = config.scale(layer, site.path) as f32;
            // A fused module's delta is x·Aᵀ·Bᵀ with B's rows stacked like the
            // base's: each projection gets its rows of B (and of the bias and
            // magnitude) and the same A.
            let mut a = a.values(base.precision);
            let mut first = 0;
            for (index, &module) in site.parts.iter().enumerate() {
                let part_out = base.dims[module.index()].0;
                // B is kept transposed: [rank, out].
                let b_t = b.transposed(first, part_out, base.precision);
                let bias = bias.map(|v| v.part(first, part_out));
                let magnitude = magnitude.map(|v| v.part(first, part_out));
                first += part_out;
                // The last projection takes A, the others a copy.
                let a = if index + 1 < site.parts.len() {
                    a.clone()
                } else {
                    std::mem::replace(&mut a, Values::F32(Vec::new()))
                };
                let mut w = LoraWeights { a, b_t, rank, in_features, out_features: part_out, scale, bias, dora: None };
                if let Some(magnitude) = magnitude {
                    let projections = base.weights.as_ref().ok_or_else(|| {
                        LoraError::Unsupported("DoRA here: it needs the base model's weights, not loaded".into())
                    })?;
                    let base_weight = projections
                        .dense(Slot { layer, module: module.index() })
                        .map_err(|e| LoraError::Weights(format!("{name}: the base weight for DoRA: {e}")))?;
                    w.dora = Some(super::dora::norm_scale(&w, &base_weight, &magnitude));
                }
                weights[module.index()] = Some(w);
            }
        }
    }
    let saved = saved.finish(base)?;
    Ok(AdapterWeights { layers, config: Some(std::sync::Arc::new(config.clone())), saved, ..Default::default() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peft_tensor_names_parse() {
        assert_eq!(
            parse_name("base_model.model.model.layers.12.mlp.down_proj.lora_B.weight"),
            Some((12, "mlp.down_proj", Kind::B))
        );
        assert_eq!(
            parse_name("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"),
            Some((0, "self_attn.q_proj", Kind::A))
        );
        assert_eq!(
            parse_name("base_model.model.model.layers.1.self_attn.v_proj.lora_B.bias"),
            Some((1, "self_attn.v_proj", Kind::BBias))
        );
        for saved in ["lora_magnitude_vector", "lora_magnitude_vector.weight", "lora_magnitude_vector.default.weight"] {
            assert_eq!(
                parse_name(&format!("base_model.model.model.layers.2.mlp.up_proj.{saved}")),
                Some((2, "mlp.up_proj", Kind::Magnitude)),
                "{saved}"
            );
        }
        assert_eq!(parse_name("base_model.model.model.layers.2.mlp.up_proj.lora_C.weight"), None);
        assert_eq!(parse_name("base_model.model.model.embed_tokens.lora_embedding_A"), None);
        assert_eq!(parse_name("base_model.model.lm_head.lora_A.weight"), None);
    }
}
