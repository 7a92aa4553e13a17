//! Hugging Face folders: `config.json` + `*.safetensors`, dense weights.

use std::cell::RefCell;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

use candle_core::quantized::QMatMul;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use super::config::HfConfig;
use super::kernels::half::HalfKind;
use super::linear::Weight;
use super::source::TokenTable;
use super::source::WeightSource;
use super::{Linear, ModelConfig, ModelError, Result, WeightMode};

pub struct SafetensorsSource {
    tensors: MmapedSafetensors,
    config: ModelConfig,
    mode: WeightMode,
    /// Names of the tensors read so far.
    used: RefCell<HashSet<String>>,
}

impl SafetensorsSource {
    pub fn open(dir: &Path, mode: WeightMode) -> Result<Self> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path)
            .map_err(|source| ModelError::Io { path: config_path.display().to_string(), source })?;
        let hf: HfConfig =
            serde_json::from_str(&text).map_err(|e| ModelError::Invalid(format!("{}: {e}", config_path.display())))?;
        let config = hf.to_model_config()?;
        let files = safetensors_files(dir)?;
        // SAFETY: the files are mapped read-only; like every mmap user we rely
        // on nobody truncating them while the server runs.
        let tensors = unsafe { MmapedSafetensors::multi(&files)? };
        Ok(Self { tensors, config, mode, used: RefCell::default() })
    }

    fn load(&self, name: &str) -> Result<Tensor> {
        Ok(self.load_stored(name)?.to_dtype(DType::F32)?)
    }

    /// A tensor in the checkpoint's own dtype.
    fn load_stored(&self, name: &str) -> Result<Tensor> {
        if !self.contains(name) {
            return Err(ModelError::MissingTensor(name.to_string()));
        }
        self.used.borrow_mut().insert(name.to_string());
        Ok(self.tensors.load(name, &Device::Cpu)?)
    }
}

impl SafetensorsSource {
    /// As the mode wants it: 16-bit checkpoints stay 16-bit by default,
    /// float32 with `--dtype f32`, quantized with `--quantize`.
    fn weight(&self, w: Tensor) -> Result<Weight> {
        super::source::dense_weight(&w, HalfKind::of(w.dtype()), self.mode)
    }
}

fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries =
        std::fs::read_dir(dir).map_err(|source| ModelError::Io { path: dir.display().to_string(), source })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(ModelError::Invalid(format!("no *.safetensors file in {}", dir.display())));
    }
    Ok(files)
}

impl WeightSource for SafetensorsSource {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn linear(&mut self, name: &str) -> Result<Linear> {
        let w = self.load_stored(&format!("{name}.weight"))?;
        let (out_features, in_features) = w.dims2()?;
        let bias_name = format!("{name}.bias");
        let bias = if self.contains(&bias_name) { Some(self.load(&bias_name)?) } else { None };
        Ok(Linear::new(self.weight(w)?, bias, out_features, in_features))
    }

    fn dense(&mut self, name: &str) -> Result<Tensor> {
        self.load(name)
    }

    fn embedding(&mut self, name: &str) -> Result<TokenTable> {
        let table = self.load_stored(&format!("{name}.weight"))?;
        // A 16-bit table stays 16-bit unless float32 was asked for.
        Ok(match (HalfKind::of(table.dtype()), self.mode) {
            (Some(kind), WeightMode::Quantized | WeightMode::Half(_)) => {
                TokenTable::Half(std::sync::Arc::new(super::source::half_matrix(&table, kind)?))
            }
            _ => TokenTable::Table(QMatMul::Tensor(table.to_dtype(DType::F32)?)),
        })
    }

    fn contains(&self, name: &str) -> bool {
        self.tensors.get(name).is_ok()
    }

    fn linear_split(&mut self, name: &str, parts: &[usize]) -> Result<Vec<Linear>> {
        if self.contains(&format!("{name}.bias")) {
            return Err(ModelError::Unsupported(format!("bias on the fused projection {name}")));
        }
        let fused = self.load_stored(&format!("{name}.weight"))?;
        let (rows, cols) = fused.dims2()?;
        if parts.iter().sum::<usize>() != rows {
            return Err(ModelError::Invalid(format!("{name} has {rows} rows, expected {parts:?} stacked")));
        }
        let mut first = 0;
        parts
            .iter()
            .map(|&n| {
                let part = fused.narrow(0, first, n)?.contiguous()?;
                first += n;
                Ok(Linear::new(self.weight(part)?, None, n, cols))
            })
            .collect()
    }

    fn unused(&self) -> Vec<String> {
        let used = self.used.borrow();
        let mut names: Vec<String> =
            self.tensors.tensors().into_iter().map(|(n, _)| n).filter(|n| !used.contains(n)).collect();
        names.sort();
        names
    }
}
