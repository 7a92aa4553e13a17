//! A PEFT adapter folder (`adapter_config.json` + `adapter_model.safetensors`)
//! turned into float32 weights, validated against the base model's shapes.

use std::path::Path;

use candle_core::{DType, Device};

use super::config::{AdapterConfig, Module};
use super::LoraError;
use crate::model::lora::{AdapterWeights, LoraWeights};
use crate::model::ModelConfig;

/// Largest adapter file read (a rank-64 adapter on every module of an 8B model is ~650 MB).
const MAX_WEIGHTS_BYTES: u64 = 2 << 30;

/// `(out_features, in_features)` of every projection of the base.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseShapes {
    pub num_layers: usize,
    pub dims: [(usize, usize); 7],
}

impl BaseShapes {
    pub fn of(cfg: &ModelConfig) -> Self {
        let (h, q, kv, ff) =
            (cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size);
        Self { num_layers: cfg.num_layers, dims: [(q, h), (kv, h), (kv, h), (h, q), (ff, h), (ff, h), (h, ff)] }
    }
}

/// Reads and checks an adapter folder. Every failure names what is wrong.
pub fn load(dir: &Path, base: &BaseShapes, max_rank: usize) -> Result<AdapterWeights, LoraError> {
    let config_path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&config_path)
        .map_err(|e| LoraError::Io(format!("cannot read {}: {e}", config_path.display())))?;
    let config = AdapterConfig::parse(&text)?;
    let weights_path = dir.join("adapter_model.safetensors");
    if !weights_path.is_file() {
        if dir.join("adapter_model.bin").is_file() {
            return Err(LoraError::Unsupported(
                "pickled adapter_model.bin (never unpickled); convert it to adapter_model.safetensors".into(),
            ));
        }
        return Err(LoraError::Io(format!("{} is missing", weights_path.display())));
    }
    let size = std::fs::metadata(&weights_path).map_err(|e| LoraError::Io(e.to_string()))?.len();
    if size > MAX_WEIGHTS_BYTES {
        return Err(LoraError::Weights(format!(
            "{} is {size} bytes, over the {MAX_WEIGHTS_BYTES} limit",
            weights_path.display()
        )));
    }
    let bytes = std::fs::read(&weights_path)
        .map_err(|e| LoraError::Io(format!("cannot read {}: {e}", weights_path.display())))?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .map_err(|e| LoraError::Weights(format!("{}: {e}", weights_path.display())))?;
    from_tensors(&config, tensors, base, max_rank)
}

/// `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` → (3, Q, A).
fn parse_name(name: &str) -> Option<(usize, Module, bool)> {
    let rest = name.strip_prefix("base_model.model.")?;
    let rest = rest.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) =
        rest.strip_suffix(".weight")?.rsplit_once(".lora_").map(|(m, k)| (m, k.trim_end_matches(".default")))?;
    let is_a = match kind {
        "A" => true,
        "B" => false,
        _ => return None,
    };
    Some((layer, Module::from_path(module)?, is_a))
}

pub fn from_tensors(
    config: &AdapterConfig,
    tensors: std::collections::HashMap<String, candle_core::Tensor>,
    base: &BaseShapes,
    max_rank: usize,
) -> Result<AdapterWeights, LoraError> {
    let mut a_parts: Vec<[Option<Vec<Vec<f32>>>; 7]> = vec![Default::default(); base.num_layers];
    let mut b_parts: Vec<[Option<Vec<Vec<f32>>>; 7]> = vec![Default::default(); base.num_layers];
    if tensors.is_empty() {
        return Err(LoraError::Weights("the safetensors file holds no tensors".into()));
    }
    for (name, tensor) in tensors {
        let (layer, module, is_a) = parse_name(&name).ok_or_else(|| {
            LoraError::Unsupported(format!(
                "tensor `{name}`: only lora_A/lora_B of q/k/v/o/gate/up/down projections are supported"
            ))
        })?;
        if layer >= base.num_layers {
            return Err(LoraError::Mismatch(format!(
                "`{name}` is for layer {layer}, the base has {} layers",
                base.num_layers
            )));
        }
        if !config.targets(layer, module) {
            return Err(LoraError::Mismatch(format!("`{name}` is not a target of adapter_config.json")));
        }
        let rows = tensor
            .to_dtype(DType::F32)
            .and_then(|t| t.to_vec2::<f32>())
            .map_err(|e| LoraError::Weights(format!("`{name}` is not a 2-D float tensor: {e}")))?;
        let slot = if is_a { &mut a_parts[layer][module.index()] } else { &mut b_parts[layer][module.index()] };
        *slot = Some(rows);
    }
    let mut layers: Vec<[Option<LoraWeights>; 7]> = vec![Default::default(); base.num_layers];
    for (layer, weights) in layers.iter_mut().enumerate() {
        for module in Module::ALL {
            let i = module.index();
            let name = super::config::module_name(layer, module);
            let (a, b) = match (a_parts[layer][i].take(), b_parts[layer][i].take()) {
                (None, None) if config.targets(layer, module) => {
                    return Err(LoraError::Weights(format!("{name}: lora_A and lora_B are missing")))
                }
                (None, None) => continue,
                (Some(a), Some(b)) => (a, b),
                (Some(_), None) => return Err(LoraError::Weights(format!("{name}: lora_B is missing"))),
                (None, Some(_)) => return Err(LoraError::Weights(format!("{name}: lora_A is missing"))),
            };
            let (out_features, in_features) = base.dims[i];
            let rank = a.len();
            if rank == 0 || a.iter().any(|row| row.len() != in_features) {
                return Err(LoraError::Mismatch(format!(
                    "{name}: lora_A must be [rank, {in_features}], got [{rank}, {}]",
                    a.first().map_or(0, Vec::len)
                )));
            }
            if b.len() != out_features || b.iter().any(|row| row.len() != rank) {
                return Err(LoraError::Mismatch(format!(
                    "{name}: lora_B must be [{out_features}, {rank}], got [{}, {}]",
                    b.len(),
                    b.first().map_or(0, Vec::len)
                )));
            }
            let configured = config.rank(layer, module);
            if rank != configured {
                return Err(LoraError::Mismatch(format!(
                    "{name}: weights have rank {rank}, adapter_config.json says {configured}"
                )));
            }
            if rank > max_rank {
                return Err(LoraError::Mismatch(format!("{name}: rank {rank} is above --max-lora-rank {max_rank}")));
            }
            // B is stored transposed: [rank, out].
            let mut b_t = vec![0f32; rank * out_features];
            for (o, row) in b.iter().enumerate() {
                for (j, v) in row.iter().enumerate() {
                    b_t[j * out_features + o] = *v;
                }
            }
            weights[i] = Some(LoraWeights {
                a: a.concat(),
                b_t,
                rank,
                in_features,
                out_features,
                scale: config.scale(layer, module) as f32,
            });
        }
    }
    Ok(AdapterWeights { layers })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peft_tensor_names_parse() {
        assert_eq!(
            parse_name("base_model.model.model.layers.12.mlp.down_proj.lora_B.weight"),
            Some((12, Module::Down, false))
        );
        assert_eq!(
            parse_name("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"),
            Some((0, Module::Q, true))
        );
        assert_eq!(parse_name("base_model.model.model.embed_tokens.lora_embedding_A"), None);
        assert_eq!(parse_name("base_model.model.lm_head.lora_A.weight"), None);
    }
}
