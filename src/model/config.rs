//! Architecture numbers of a Llama-family model, whatever file they came from.

use serde::Deserialize;

use super::{ModelError, Result};

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f32,
    /// Longest sequence (prompt + generated) the model was trained for.
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry a bias (Qwen2).
    pub attention_bias: bool,
}

impl ModelConfig {
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
        Ok(())
    }
}

/// The fields of a Hugging Face `config.json` that the Llama family uses.
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
    /// transformers 5 moved rope_theta here.
    pub rope_parameters: Option<RopeParameters>,
    pub rope_scaling: Option<serde_json::Value>,
    pub max_position_embeddings: Option<usize>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: Option<bool>,
    pub model_type: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct RopeParameters {
    pub rope_theta: Option<f32>,
    pub rope_type: Option<String>,
}

impl HfConfig {
    pub fn to_model_config(&self) -> Result<ModelConfig> {
        let rope_type = self.rope_parameters.as_ref().and_then(|r| r.rope_type.clone()).or_else(|| {
            self.rope_scaling
                .as_ref()
                .and_then(|s| s.get("rope_type").or_else(|| s.get("type")).and_then(|t| t.as_str().map(String::from)))
        });
        if let Some(kind) = rope_type.filter(|t| t != "default") {
            return Err(ModelError::Unsupported(format!("rope scaling `{kind}`")));
        }
        let model_type = self.model_type.as_deref().unwrap_or("llama");
        let attention_bias = self.attention_bias.unwrap_or(model_type == "qwen2");
        let config = ModelConfig {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim: self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads),
            rms_norm_eps: self.rms_norm_eps,
            rope_theta: self
                .rope_parameters
                .as_ref()
                .and_then(|r| r.rope_theta)
                .or(self.rope_theta)
                .unwrap_or(10_000.0),
            max_position_embeddings: self.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: self.tie_word_embeddings,
            attention_bias,
        };
        config.validate()?;
        Ok(config)
    }
}
