//! A trained adapter as a PEFT folder: `adapter_config.json` and
//! `adapter_model.safetensors` with PEFT's tensor names, which tailor, PEFT
//! and vLLM load.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor};
use serde_json::json;

use super::model::{module_path, Lora};
use crate::model::{ModelError, Result};

/// PEFT's name of a LoRA matrix (`which`: `lora_A` or `lora_B`).
pub fn tensor_name(layer: usize, module: &str, which: &str) -> String {
    format!("base_model.model.model.layers.{layer}.{}.{module}.{which}.weight", module_path(module))
}

/// Writes `lora` into `dir` (created if missing), in float32.
pub fn save(lora: &Lora, base_model: &str, dir: &Path) -> Result<()> {
    let io = |e: std::io::Error| ModelError::Invalid(format!("cannot write {}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(io)?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for ((layer, module), (a, b)) in &lora.weights {
        tensors.insert(tensor_name(*layer, module, "lora_A"), a.as_tensor().to_dtype(DType::F32)?);
        tensors.insert(tensor_name(*layer, module, "lora_B"), b.as_tensor().to_dtype(DType::F32)?);
    }
    candle_core::safetensors::save(&tensors, dir.join("adapter_model.safetensors"))?;
    let config = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "target_modules": lora.targets,
        "use_rslora": lora.use_rslora,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": null,
        "layers_to_transform": null,
        "use_dora": false,
        "rank_pattern": {},
        "alpha_pattern": {},
    });
    let text = serde_json::to_string_pretty(&config).map_err(|e| ModelError::Invalid(e.to_string()))?;
    std::fs::write(dir.join("adapter_config.json"), text).map_err(io)?;
    Ok(())
}
