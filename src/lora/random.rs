//! Random PEFT adapters for a base model, for benchmarks and tests of many
//! adapters (`tailor random-adapters`): each a folder with
//! `adapter_config.json` and `adapter_model.safetensors`, as PEFT writes
//! them, that tailor, PEFT and vLLM load.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde_json::json;

use super::adapter::BaseShapes;
use super::config::Module;
use super::LoraError;
use crate::rng::SplitMix;

#[derive(Debug, Clone)]
pub struct RandomAdapters {
    /// Folder names are `{prefix}{index}`.
    pub prefix: String,
    pub count: usize,
    /// Each adapter's rank is drawn from `ranks.0..=ranks.1`.
    pub ranks: (usize, usize),
    pub modules: Vec<Module>,
    pub seed: u64,
}

/// Writes the adapters under `dir`; returns their folders. Each adapter's
/// delta is large enough to change greedy replies (B is not PEFT's zeros).
pub fn write(dir: &Path, base: &BaseShapes, spec: &RandomAdapters) -> Result<Vec<PathBuf>, LoraError> {
    if spec.modules.is_empty() || spec.ranks.0 == 0 {
        return Err(LoraError::Config("random adapters need a module and a rank of at least 1".into()));
    }
    let io = |e: std::io::Error| LoraError::Io(format!("cannot write under {}: {e}", dir.display()));
    let weights = |e: candle_core::Error| LoraError::Weights(e.to_string());
    // The sites (PEFT modules) that hold any chosen projection.
    let sites: Vec<_> =
        base.sites().into_iter().filter(|site| site.parts.iter().any(|m| spec.modules.contains(m))).collect();
    let mut rng = SplitMix(spec.seed);
    let mut folders = Vec::with_capacity(spec.count);
    for index in 0..spec.count {
        let rank = rng.between(spec.ranks.0, spec.ranks.1);
        let folder = dir.join(format!("{}{index}", spec.prefix));
        std::fs::create_dir_all(&folder).map_err(io)?;
        let mut tensors = HashMap::new();
        for layer in 0..base.num_layers {
            for site in &sites {
                let in_features = base.dims[site.parts[0].index()].1;
                let out_features: usize = site.parts.iter().map(|m| base.dims[m.index()].0).sum();
                // A as PEFT initialises it (Kaiming-uniform, bound 1/√in), B
                // the same over its rank: a trained adapter's order of size.
                let a = uniform(&mut rng, rank * in_features, 1.0 / (in_features as f64).sqrt());
                let b = uniform(&mut rng, out_features * rank, 1.0 / (rank as f64).sqrt());
                let name = |which: &str| format!("base_model.model.model.layers.{layer}.{}.{which}.weight", site.path);
                let cpu = &Device::Cpu;
                tensors.insert(name("lora_A"), Tensor::from_vec(a, (rank, in_features), cpu).map_err(weights)?);
                tensors.insert(name("lora_B"), Tensor::from_vec(b, (out_features, rank), cpu).map_err(weights)?);
            }
        }
        candle_core::safetensors::save(&tensors, folder.join("adapter_model.safetensors")).map_err(weights)?;
        let targets: Vec<&str> = sites.iter().map(|s| s.path.rsplit('.').next().unwrap_or(s.path)).collect();
        let config = json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": rank,
            "lora_alpha": 2 * rank,
            "lora_dropout": 0.0,
            "target_modules": targets,
            "bias": "none",
            "fan_in_fan_out": false,
            "use_rslora": false,
            "inference_mode": true,
        });
        let text = serde_json::to_string_pretty(&config).map_err(|e| LoraError::Config(e.to_string()))?;
        std::fs::write(folder.join("adapter_config.json"), text).map_err(io)?;
        folders.push(folder);
    }
    Ok(folders)
}

fn uniform(rng: &mut SplitMix, n: usize, bound: f64) -> Vec<f32> {
    (0..n).map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32).collect()
}

/// `q,v` or `all` → modules (PEFT's short names: q_proj or q).
pub fn parse_modules(text: &str) -> Result<Vec<Module>, String> {
    if text == "all" {
        return Ok(Module::ALL.to_vec());
    }
    text.split(',')
        .map(|name| {
            let short = name.trim().trim_end_matches("_proj");
            Module::ALL
                .into_iter()
                .find(|m| m.path().rsplit('.').next().is_some_and(|p| p.trim_end_matches("_proj") == short))
                .ok_or_else(|| format!("unknown module `{name}` (use q, k, v, o, gate, up, down or all)"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::random::RandomSource;

    #[test]
    fn written_adapters_load_with_their_drawn_ranks() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let base = BaseShapes::of(&RandomSource::tiny_config(64));
        let spec = RandomAdapters {
            prefix: "t".into(),
            count: 3,
            ranks: (2, 5),
            modules: parse_modules("q,v,down")?,
            seed: 7,
        };
        let folders = write(dir.path(), &base, &spec)?;
        assert_eq!(folders.len(), 3);
        for folder in &folders {
            let weights = super::super::adapter::load(folder, &base, 8)?;
            let q = weights.layers[0][Module::Q.index()].as_ref().ok_or("q is targeted")?;
            assert!((2..=5).contains(&q.rank));
            assert!(weights.layers[0][Module::K.index()].is_none());
            assert!(weights.layers[0][Module::Down.index()].is_some());
            assert!(q.b_t.to_f32().iter().any(|&v| v != 0.0));
        }
        // The same seed writes the same adapters.
        let again = tempfile::tempdir()?;
        write(again.path(), &base, &spec)?;
        let bytes = |d: &Path| std::fs::read(d.join("t1/adapter_model.safetensors"));
        assert_eq!(bytes(dir.path())?, bytes(again.path())?);
        assert!(parse_modules("q,x").is_err());
        assert_eq!(parse_modules("all")?.len(), 7);
        Ok(())
    }
}
