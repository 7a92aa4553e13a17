//! A trained adapter as a PEFT folder: `adapter_config.json` and
//! `adapter_model.safetensors` with PEFT's tensor names, which tailor, PEFT
//! and vLLM load.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;
use serde_json::json;

use super::model::{module_path, Lora, TrainModel, MODULES};
use crate::model::{ModelError, Result};

/// PEFT's name of a LoRA matrix (`which`: `lora_A` or `lora_B`).
pub fn tensor_name(layer: usize, module: &str, which: &str) -> String {
    format!("base_model.model.model.layers.{layer}.{}.{module}.{which}.weight", module_path(module))
}

/// Reads a PEFT LoRA folder to continue training it: every layer's matrices
/// for each of its target modules, shaped for `model`.
pub fn load(dir: &Path, model: &TrainModel<f32>) -> Result<Lora<f32>> {
    let invalid = |why: String| ModelError::Invalid(format!("--init-from {}: {why}", dir.display()));
    let config_path = dir.join("adapter_config.json");
    let text =
        std::fs::read_to_string(&config_path).map_err(|e| invalid(format!("cannot read adapter_config.json: {e}")))?;
    let config: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| invalid(format!("adapter_config.json: {e}")))?;
    if config["peft_type"].as_str() != Some("LORA") {
        return Err(invalid("not a LoRA adapter (peft_type)".into()));
    }
    let rank = config["r"].as_u64().filter(|&r| r > 0).ok_or_else(|| invalid("no rank `r`".into()))? as usize;
    let alpha = config["lora_alpha"].as_f64().ok_or_else(|| invalid("no `lora_alpha`".into()))?;
    let use_rslora = config["use_rslora"].as_bool().unwrap_or(false);
    for per_module in ["rank_pattern", "alpha_pattern"] {
        if config[per_module].as_object().is_some_and(|m| !m.is_empty()) {
            return Err(invalid(format!("`{per_module}` (ranks or alphas per module) is not supported")));
        }
    }
    if config["use_dora"].as_bool() == Some(true) || !config["layers_to_transform"].is_null() {
        return Err(invalid("DoRA and `layers_to_transform` are not supported".into()));
    }
    let targets: Vec<String> = match &config["target_modules"] {
        serde_json::Value::Array(list) => list.iter().filter_map(|m| m.as_str().map(str::to_string)).collect(),
        serde_json::Value::String(one) => vec![one.clone()],
        _ => Vec::new(),
    };
    if targets.is_empty() || targets.iter().any(|t| !MODULES.contains(&t.as_str())) {
        return Err(invalid(format!("target_modules must name some of {}", MODULES.join(", "))));
    }
    let path = dir.join("adapter_model.safetensors");
    let tensors = candle_core::safetensors::load(&path, &candle_core::Device::Cpu)
        .map_err(|e| invalid(format!("cannot read adapter_model.safetensors: {e}")))?;
    let mut lora = Lora::new(model, rank, alpha, use_rslora, &targets, 0)?;
    for (&(layer, module), pair) in lora.weights.iter_mut() {
        let (out, inp) =
            model.dims(module).ok_or_else(|| invalid(format!("{} is not in this base", MODULES[module])))?;
        for (which, into, shape) in [("lora_A", &mut pair.a, (rank, inp)), ("lora_B", &mut pair.b, (out, rank))] {
            let name = tensor_name(layer, MODULES[module], which);
            let tensor = tensors.get(&name).ok_or_else(|| invalid(format!("no tensor `{name}`")))?;
            if tensor.dims() != [shape.0, shape.1] {
                return Err(invalid(format!("`{name}` is {:?}, the base needs {shape:?}", tensor.dims())));
            }
            *into = tensor.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        }
    }
    Ok(lora)
}

/// Writes `lora` into `dir` (created if missing), in float32.
pub fn save(lora: &Lora<f32>, base_model: &str, dir: &Path) -> Result<()> {
    let io = |e: std::io::Error| ModelError::Invalid(format!("cannot write {}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(io)?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let cpu = &candle_core::Device::Cpu;
    let r = lora.rank;
    for (&(layer, module), pair) in &lora.weights {
        let name = MODULES[module];
        let (inp, out) = (pair.a.len() / r, pair.b.len() / r);
        tensors.insert(tensor_name(layer, name, "lora_A"), Tensor::from_vec(pair.a.clone(), (r, inp), cpu)?);
        tensors.insert(tensor_name(layer, name, "lora_B"), Tensor::from_vec(pair.b.clone(), (out, r), cpu)?);
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
