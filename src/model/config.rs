//! Architecture numbers of a decoder model, whatever file they came from,
//! and the families tailor knows. Every family is the Llama skeleton plus a
//! few switches; anything else is refused by name.

use serde::Deserialize;

use super::{ModelError, Result};

/// The decoder families, named once: a file naming anything else is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Llama 1/2/3.x, Mistral, TinyLlama, SmolLM, DeepSeek-LLM.
    Llama,
    /// Qwen 2 / 2.5: q/k/v bias.
    Qwen2,
    /// Qwen 3: per-head RMSNorm on q and k, explicit head_dim.
    Qwen3,
    /// Phi-3: fused qkv and gate/up projections.
    Phi3,
}

impl Architecture {
    /// From a GGUF `general.architecture`.
    pub fn from_gguf(name: &str) -> Result<Self> {
        Ok(match name {
            "llama" => Self::Llama,
            "qwen2" => Self::Qwen2,
            "qwen3" => Self::Qwen3,
            "phi3" => Self::Phi3,
            other => {
                return Err(ModelError::Unsupported(format!(
                    "GGUF architecture `{other}` (supported: llama, qwen2, qwen3, phi3)"
                )))
            }
        })
    }

    /// From a Hugging Face `model_type`.
    pub fn from_hf(model_type: &str) -> Result<Self> {
        Ok(match model_type {
            "llama" | "mistral" => Self::Llama,
            "qwen2" => Self::Qwen2,
            "qwen3" => Self::Qwen3,
            "phi3" => Self::Phi3,
            other => {
                return Err(ModelError::Unsupported(format!(
                    "model_type `{other}` (supported: llama, mistral, qwen2, qwen3, phi3)"
                )))
            }
        })
    }

    /// llama.cpp stores q/k rows of these permuted for adjacent-pair rotary.
    pub fn gguf_permutes_qk(self) -> bool {
        self == Self::Llama
    }

    /// q/k/v and gate/up are stored as one matrix each.
    pub fn fused_projections(self) -> bool {
        self == Self::Phi3
    }
}

/// How rotary frequencies are derived from `rope_theta`.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// `θ^(-2i/d)`.
    Default,
    /// Llama 3.1+: low frequencies divided by `factor`, a smooth ramp between.
    Llama3 { factor: f32, low_freq_factor: f32, high_freq_factor: f32, original_max_position_embeddings: f32 },
    /// Per-frequency divisors as a GGUF stores them (`rope_freqs.weight`).
    FreqFactors(Vec<f32>),
}

impl RopeScaling {
    /// The inverse frequencies of a head of `head_dim`, float32 as
    /// transformers computes them.
    pub fn inv_freq(&self, head_dim: usize, theta: f32) -> Vec<f32> {
        let base: Vec<f32> = (0..head_dim / 2).map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32)).collect();
        match self {
            Self::Default => base,
            Self::FreqFactors(factors) => base.iter().zip(factors).map(|(f, s)| f / s).collect(),
            &Self::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings: old } => {
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f32,
    pub rope_scaling: RopeScaling,
    /// Longest sequence (prompt + generated) served: the trained context, or
    /// a sliding window if that is shorter (so the window never applies).
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry a bias (Qwen2).
    pub attention_bias: bool,
    /// Per-head RMSNorm of queries and keys before rotary (Qwen3).
    pub qk_norm: bool,
}

impl ModelConfig {
    /// Weights of the dense model: embedding, head (unless tied), every
    /// layer's projections and norms, the final norm.
    pub fn parameter_count(&self) -> u64 {
        let (h, ff, layers) = (self.hidden_size as u64, self.intermediate_size as u64, self.num_layers as u64);
        let (qw, kw) = ((self.num_heads * self.head_dim) as u64, (self.num_kv_heads * self.head_dim) as u64);
        let vocab = self.vocab_size as u64;
        let per_layer = h * (qw + 2 * kw) + qw * h + 3 * h * ff + 2 * h;
        let head = if self.tie_word_embeddings { 0 } else { vocab * h };
        vocab * h + head + layers * per_layer + h
    }

    pub fn validate(&self) -> Result<()> {
        if self.num_heads == 0 || self.num_kv_heads == 0 || !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(ModelError::Invalid(format!(
                "{} attention heads cannot be grouped over {} key/value heads",
                self.num_heads, self.num_kv_heads
            )));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(ModelError::Invalid(format!("rotary embeddings need an even head_dim, got {}", self.head_dim)));
        }
        if let RopeScaling::FreqFactors(f) = &self.rope_scaling {
            if f.len() != self.head_dim / 2 {
                return Err(ModelError::Invalid(format!(
                    "rope_freqs has {} factors, a head of {} needs {}",
                    f.len(),
                    self.head_dim,
                    self.head_dim / 2
                )));
            }
        }
        Ok(())
    }
}

/// The fields of a Hugging Face `config.json` that these families use.
#[derive(Debug, Deserialize)]
pub struct HfConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub rms_norm_eps: f64,
    pub rope_theta: Option<f32>,
    /// transformers 5 moved rope_theta and the scaling here.
    pub rope_parameters: Option<serde_json::Value>,
    pub rope_scaling: Option<serde_json::Value>,
    pub partial_rotary_factor: Option<f64>,
    pub max_position_embeddings: Option<usize>,
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub use_sliding_window: Option<bool>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: Option<bool>,
    #[serde(default)]
    pub mlp_bias: Option<bool>,
    pub hidden_act: Option<String>,
    pub model_type: Option<String>,
}

impl HfConfig {
    pub fn to_model_config(&self) -> Result<ModelConfig> {
        let architecture = Architecture::from_hf(self.model_type.as_deref().unwrap_or("llama"))?;
        if let Some(act) = self.hidden_act.as_deref().filter(|a| *a != "silu") {
            return Err(ModelError::Unsupported(format!("hidden_act `{act}` (supported: silu)")));
        }
        if self.mlp_bias == Some(true) {
            return Err(ModelError::Unsupported("mlp_bias".into()));
        }
        let rope = self.rope_parameters.as_ref().or(self.rope_scaling.as_ref());
        let num = |key: &str| rope.and_then(|r| r.get(key)).and_then(serde_json::Value::as_f64);
        let partial = self.partial_rotary_factor.or_else(|| num("partial_rotary_factor")).unwrap_or(1.0);
        if partial != 1.0 {
            return Err(ModelError::Unsupported(format!(
                "partial rotary embeddings (partial_rotary_factor {partial})"
            )));
        }
        let rope_type = rope
            .and_then(|r| r.get("rope_type").or_else(|| r.get("type")))
            .and_then(serde_json::Value::as_str)
            .unwrap_or("default");
        let rope_scaling = match rope_type {
            "default" => RopeScaling::Default,
            "llama3" => {
                let need = |key: &str| {
                    num(key)
                        .map(|v| v as f32)
                        .ok_or_else(|| ModelError::Invalid(format!("llama3 rope scaling needs `{key}`")))
                };
                RopeScaling::Llama3 {
                    factor: need("factor")?,
                    low_freq_factor: need("low_freq_factor")?,
                    high_freq_factor: need("high_freq_factor")?,
                    original_max_position_embeddings: need("original_max_position_embeddings")?,
                }
            }
            other => {
                return Err(ModelError::Unsupported(format!(
                    "rope scaling `{other}` (supported: default, llama3; yarn, longrope/su, dynamic and linear are not)"
                )))
            }
        };
        let head_dim = self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads);
        let mut max_position_embeddings = self.max_position_embeddings.unwrap_or(4096);
        if let Some(window) = self.sliding_window.filter(|_| self.use_sliding_window != Some(false)) {
            if window > 0 && window < max_position_embeddings {
                tracing::warn!(window, "sliding-window attention: the context is capped at the window");
                max_position_embeddings = window;
            }
        }
        let config = ModelConfig {
            architecture,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim,
            rms_norm_eps: self.rms_norm_eps,
            rope_theta: num("rope_theta").map(|t| t as f32).or(self.rope_theta).unwrap_or(10_000.0),
            rope_scaling,
            max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings,
            attention_bias: self.attention_bias.unwrap_or(architecture == Architecture::Qwen2),
            qk_norm: architecture == Architecture::Qwen3,
        };
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_matches_the_gguf_factors_form() {
        // The converter's rope_freqs are 1 / ramp, so both forms give one frequency set.
        let scaling = RopeScaling::Llama3 {
            factor: 32.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64.0,
        };
        let scaled = scaling.inv_freq(8, 500_000.0);
        let base = RopeScaling::Default.inv_freq(8, 500_000.0);
        // Highest frequency (wavelength 2π < 16) untouched; lowest divided by the factor.
        assert_eq!(scaled[0], base[0]);
        assert!((scaled[3] - base[3] / 32.0).abs() <= 1e-12);
        let factors: Vec<f32> = base.iter().zip(&scaled).map(|(b, s)| b / s).collect();
        let from_factors = RopeScaling::FreqFactors(factors).inv_freq(8, 500_000.0);
        for (a, b) in scaled.iter().zip(&from_factors) {
            assert!((a - b).abs() <= 1e-6 * a.abs(), "{a} vs {b}");
        }
    }

    #[test]
    fn unknown_families_and_rope_types_are_refused_by_name() {
        let err = Architecture::from_hf("gemma2").unwrap_err().to_string();
        assert!(err.contains("gemma2"), "{err}");
        let err = Architecture::from_gguf("falcon").unwrap_err().to_string();
        assert!(err.contains("falcon"), "{err}");
        let config = |rope: &str| -> HfConfig {
            serde_json::from_str(&format!(
                r#"{{"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
                    "num_attention_heads": 2, "rms_norm_eps": 1e-6, "rope_scaling": {rope}}}"#
            ))
            .expect("config")
        };
        for kind in ["yarn", "longrope", "su", "dynamic", "linear"] {
            let err = config(&format!(r#"{{"rope_type": "{kind}", "factor": 2.0}}"#)).to_model_config().unwrap_err();
            assert!(err.to_string().contains(&format!("`{kind}`")), "{err}");
        }
        assert!(config("null").to_model_config().is_ok());
    }
}
