//! Request defaults that a named template, an adapter's `tailor.toml` or a
//! preset can carry. Layers merge field by field: the request wins, then the
//! preset, then the adapter, then the template.

use serde::Deserialize;
use serde_json::{Map, Value as Json};

#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Defaults {
    /// System prompt for chat requests that bring none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    /// A named template (presets and adapters only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub template_vars: Map<String, Json>,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub chat_template_kwargs: Map<String, Json>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_k: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub presence_penalty: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frequency_penalty: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop: Option<Vec<String>>,
    /// Constrained output, as the request's `response_format` (a JSON schema...).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub response_format: Option<Json>,
}

impl Defaults {
    /// `self` over `lower`: every field `self` leaves unset comes from `lower`;
    /// maps merge key by key.
    pub fn over(&self, lower: &Defaults) -> Defaults {
        let merge = |high: &Map<String, Json>, low: &Map<String, Json>| {
            let mut out = low.clone();
            out.extend(high.iter().map(|(k, v)| (k.clone(), v.clone())));
            out
        };
        Defaults {
            system: self.system.clone().or_else(|| lower.system.clone()),
            template: self.template.clone().or_else(|| lower.template.clone()),
            template_vars: merge(&self.template_vars, &lower.template_vars),
            chat_template_kwargs: merge(&self.chat_template_kwargs, &lower.chat_template_kwargs),
            temperature: self.temperature.or(lower.temperature),
            top_p: self.top_p.or(lower.top_p),
            top_k: self.top_k.or(lower.top_k),
            max_tokens: self.max_tokens.or(lower.max_tokens),
            presence_penalty: self.presence_penalty.or(lower.presence_penalty),
            frequency_penalty: self.frequency_penalty.or(lower.frequency_penalty),
            seed: self.seed.or(lower.seed),
            stop: self.stop.clone().or_else(|| lower.stop.clone()),
            response_format: self.response_format.clone().or_else(|| lower.response_format.clone()),
        }
    }
}

/// Adapter defaults: an optional `tailor.toml` beside `adapter_config.json`,
/// with the same fields as a preset (no `adapter`).
pub fn adapter_defaults(text: &str) -> Result<Defaults, super::PromptError> {
    // toml's messages quote the offending line: say where, not what.
    toml::from_str(text).map_err(|e| {
        let line = e.span().map(|span| text[..span.start.min(text.len())].lines().count().max(1));
        super::PromptError::Invalid(match line {
            Some(line) => format!("tailor.toml is invalid at line {line}"),
            None => "tailor.toml is invalid".to_string(),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn higher_layer_wins_field_by_field() {
        let preset = Defaults {
            temperature: Some(0.2),
            chat_template_kwargs: serde_json::from_str(r#"{"a": 1}"#).unwrap_or_default(),
            ..Default::default()
        };
        let adapter = Defaults {
            temperature: Some(0.9),
            max_tokens: Some(64),
            chat_template_kwargs: serde_json::from_str(r#"{"a": 0, "b": 2}"#).unwrap_or_default(),
            ..Default::default()
        };
        let merged = preset.over(&adapter);
        assert_eq!(merged.temperature, Some(0.2));
        assert_eq!(merged.max_tokens, Some(64));
        assert_eq!(Json::Object(merged.chat_template_kwargs), serde_json::json!({"a": 1, "b": 2}));
    }
}
