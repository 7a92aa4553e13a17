//! `adapter_config.json` as PEFT writes it: the subset that changes inference,
//! with every unsupported feature refused by name. Unknown keys are ignored
//! (new PEFT versions add many).

use std::collections::BTreeMap;

use regex::Regex;
use serde::Deserialize;
use serde_json::Value as Json;

use super::LoraError;

/// The projections an adapter can target, in the order the model runs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Module {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Module {
    pub const ALL: [Module; 7] = [Module::Q, Module::K, Module::V, Module::O, Module::Gate, Module::Up, Module::Down];

    /// The Hugging Face module path under `model.layers.N`.
    pub fn path(self) -> &'static str {
        match self {
            Module::Q => "self_attn.q_proj",
            Module::K => "self_attn.k_proj",
            Module::V => "self_attn.v_proj",
            Module::O => "self_attn.o_proj",
            Module::Gate => "mlp.gate_proj",
            Module::Up => "mlp.up_proj",
            Module::Down => "mlp.down_proj",
        }
    }

    pub fn from_path(path: &str) -> Option<Module> {
        Module::ALL.into_iter().find(|m| m.path() == path)
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    List(Vec<String>),
    /// A regex that must match the whole module name (`re.fullmatch`).
    Regex(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Layers {
    One(usize),
    Many(Vec<usize>),
}

/// The raw file.
#[derive(Debug, Clone, Deserialize)]
pub struct AdapterConfigFile {
    pub peft_type: Option<String>,
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub use_rslora: bool,
    pub target_modules: Option<TargetModules>,
    pub exclude_modules: Option<TargetModules>,
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, usize>,
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, f64>,
    pub layers_to_transform: Option<Layers>,
    pub layers_pattern: Option<Json>,
    pub bias: Option<String>,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub use_dora: bool,
    pub modules_to_save: Option<Vec<String>>,
    /// With `modules_to_save` on a base whose head shares the embedding:
    /// the saved embedding serves as the head too.
    #[serde(default)]
    pub ensure_weight_tying: bool,
    #[serde(default)]
    pub lora_bias: bool,
    pub layer_replication: Option<Json>,
    pub target_parameters: Option<Json>,
    pub trainable_token_indices: Option<Json>,
    pub alora_invocation_tokens: Option<Json>,
    #[serde(default)]
    pub use_qalora: bool,
    pub use_bdlora: Option<Json>,
}

/// A checked adapter config: answers "does module X get a delta, with which
/// rank and scale?".
#[derive(Debug, Clone)]
pub struct AdapterConfig {
    pub r: usize,
    pub alpha: f64,
    pub use_rslora: bool,
    /// DoRA: each targeted module has a magnitude vector.
    pub use_dora: bool,
    /// Each targeted module's lora_B has a bias.
    pub lora_bias: bool,
    /// Whole modules the adapter replaces (PEFT's `modules_to_save`).
    pub modules_to_save: Vec<String>,
    pub ensure_weight_tying: bool,
    targets: Targets,
    exclude: Option<Targets>,
    rank_pattern: Vec<(Regex, String, usize)>,
    alpha_pattern: Vec<(Regex, String, f64)>,
    layers: Option<Vec<usize>>,
}

#[derive(Debug, Clone)]
enum Targets {
    Names(Vec<String>),
    Regex(Regex),
}

impl Targets {
    fn parse(t: &TargetModules, field: &str) -> Result<Self, LoraError> {
        Ok(match t {
            TargetModules::List(names) => Targets::Names(names.clone()),
            TargetModules::Regex(pattern) => Targets::Regex(
                Regex::new(&format!("^(?:{pattern})$"))
                    .map_err(|e| LoraError::Config(format!("`{field}` is not a valid regex: {e}")))?,
            ),
        })
    }

    /// PEFT: a list entry matches the full name or its last components; a
    /// regex must match the whole name.
    fn matches(&self, name: &str) -> bool {
        match self {
            Targets::Names(names) => names.iter().any(|t| name == t || name.ends_with(&format!(".{t}"))),
            Targets::Regex(re) => re.is_match(name),
        }
    }
}

/// A `rank_pattern` / `alpha_pattern` key matches a module name when it
/// matches a dot-separated suffix of it (PEFT's `get_pattern_key`).
fn pattern_regex(key: &str) -> Result<Regex, LoraError> {
    Regex::new(&format!("^(?:.*\\.)?(?:{key})$"))
        .map_err(|e| LoraError::Config(format!("pattern `{key}` is not a valid regex: {e}")))
}

impl AdapterConfig {
    pub fn parse(text: &str) -> Result<Self, LoraError> {
        let raw: AdapterConfigFile = serde_json::from_str(text).map_err(|e| {
            // serde quotes offending values; only a missing field (a name
            // from our schema) is safe to repeat.
            let what = match e.to_string() {
                m if m.starts_with("missing field") => m.split(" at line").next().unwrap_or("").to_string(),
                _ => format!("{:?} error", e.classify()).to_lowercase(),
            };
            LoraError::Config(format!(
                "adapter_config.json is not a valid adapter config ({what} at line {}, column {})",
                e.line(),
                e.column()
            ))
        })?;
        Self::from_file(raw)
    }

    pub fn from_file(raw: AdapterConfigFile) -> Result<Self, LoraError> {
        let unsupported = |feature: &str| Err(LoraError::Unsupported(feature.to_string()));
        if let Some(kind) = raw.peft_type.as_deref().filter(|t| *t != "LORA") {
            return unsupported(&format!("peft_type {kind} (only LORA)"));
        }
        // `bias` trains the base's own biases (saved beside the adapter's
        // tensors); `lora_bias` is lora_B's bias, part of the delta.
        if raw.bias.as_deref().is_some_and(|b| b != "none") {
            return unsupported("trained base biases (`bias` other than \"none\"; `lora_bias` is supported)");
        }
        if raw.use_dora && raw.lora_bias {
            return unsupported("`lora_bias` with DoRA (PEFT refuses the pair too)");
        }
        // `fan_in_fan_out` describes Conv1D bases (GPT-2); every base tailor
        // serves is made of nn.Linear, where PEFT turns the flag off and
        // reads the weights as usual — so does tailor.
        for (name, value) in [
            ("layer_replication", &raw.layer_replication),
            ("target_parameters", &raw.target_parameters),
            ("trainable_token_indices", &raw.trainable_token_indices),
            ("alora_invocation_tokens (aLoRA)", &raw.alora_invocation_tokens),
            ("use_bdlora", &raw.use_bdlora),
        ] {
            if value.as_ref().is_some_and(is_set) {
                return unsupported(name);
            }
        }
        if raw.use_qalora {
            return unsupported("QA-LoRA (use_qalora)");
        }
        if raw.r == 0 {
            return Err(LoraError::Config("`r` must be at least 1".into()));
        }
        let targets = match &raw.target_modules {
            Some(t) => Targets::parse(t, "target_modules")?,
            None => return Err(LoraError::Config("`target_modules` is missing".into())),
        };
        let exclude = raw.exclude_modules.as_ref().map(|t| Targets::parse(t, "exclude_modules")).transpose()?;
        let rank_pattern = raw
            .rank_pattern
            .iter()
            .map(|(k, &v)| Ok((pattern_regex(k)?, k.clone(), v)))
            .collect::<Result<Vec<_>, LoraError>>()?;
        let alpha_pattern = raw
            .alpha_pattern
            .iter()
            .map(|(k, &v)| Ok((pattern_regex(k)?, k.clone(), v)))
            .collect::<Result<Vec<_>, LoraError>>()?;
        let layers = raw.layers_to_transform.map(|l| match l {
            Layers::One(i) => vec![i],
            Layers::Many(v) => v,
        });
        Ok(Self {
            r: raw.r,
            alpha: raw.lora_alpha,
            use_rslora: raw.use_rslora,
            use_dora: raw.use_dora,
            lora_bias: raw.lora_bias,
            modules_to_save: raw.modules_to_save.unwrap_or_default(),
            ensure_weight_tying: raw.ensure_weight_tying,
            targets,
            exclude,
            rank_pattern,
            alpha_pattern,
            layers,
        })
    }

    /// Whether `model.layers.{layer}.{path}` carries a delta (`path` as in
    /// the base checkpoint: `self_attn.q_proj`, or Phi-3's `self_attn.qkv_proj`).
    pub fn targets(&self, layer: usize, path: &str) -> bool {
        let name = module_name(layer, path);
        if self.layers.as_ref().is_some_and(|l| !l.contains(&layer)) {
            return false;
        }
        if self.exclude.as_ref().is_some_and(|e| e.matches(&name)) {
            return false;
        }
        self.targets.matches(&name)
    }

    /// Whether `modules_to_save` names module `name` (PEFT's match: the
    /// whole name or a dot-separated suffix of it).
    pub fn saves(&self, name: &str) -> bool {
        self.modules_to_save.iter().any(|m| name == m || name.ends_with(&format!(".{m}")))
    }

    /// The config of a merge of this adapter with others: PEFT's
    /// `replace(peft_config[adapters[0]], r=rank, lora_alpha=rank,
    /// use_rslora=False, alpha_pattern={}, rank_pattern={})` — scale 1
    /// everywhere, each part's scale being folded into the merged weights.
    pub fn merged(&self, rank: usize) -> AdapterConfig {
        AdapterConfig {
            r: rank,
            alpha: rank as f64,
            use_rslora: false,
            use_dora: false,
            rank_pattern: Vec::new(),
            alpha_pattern: Vec::new(),
            // A merge's replaced modules are its parts' (`AdapterWeights::saved`).
            modules_to_save: Vec::new(),
            ..self.clone()
        }
    }

    /// Rank of a module: the first matching `rank_pattern` key, else `r`.
    pub fn rank(&self, layer: usize, path: &str) -> usize {
        let name = module_name(layer, path);
        self.rank_pattern.iter().find(|(re, _, _)| re.is_match(&name)).map(|(_, _, r)| *r).unwrap_or(self.r)
    }

    /// `alpha / r`, or `alpha / sqrt(r)` with rsLoRA, with per-module overrides.
    pub fn scale(&self, layer: usize, path: &str) -> f64 {
        let name = module_name(layer, path);
        let alpha =
            self.alpha_pattern.iter().find(|(re, _, _)| re.is_match(&name)).map(|(_, _, a)| *a).unwrap_or(self.alpha);
        let r = self.rank(layer, path) as f64;
        if self.use_rslora {
            alpha / r.sqrt()
        } else {
            alpha / r
        }
    }
}

/// The module name PEFT matches against (`model.layers.3.self_attn.q_proj`).
pub fn module_name(layer: usize, path: &str) -> String {
    format!("model.layers.{layer}.{path}")
}

fn is_set(v: &Json) -> bool {
    match v {
        Json::Null => false,
        Json::Array(a) => !a.is_empty(),
        Json::Object(o) => !o.is_empty(),
        Json::Bool(b) => *b,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Result<AdapterConfig, LoraError> {
        AdapterConfig::parse(&format!(
            r#"{{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "some_new_peft_key": {{"x": 1}}{extra}}}"#
        ))
    }

    #[test]
    fn scale_is_alpha_over_r_or_sqrt_r() -> Result<(), LoraError> {
        let plain = config("")?;
        assert_eq!(plain.scale(0, Module::Q.path()), 2.0);
        let rs =
            AdapterConfig::parse(r#"{"r": 4, "lora_alpha": 8, "use_rslora": true, "target_modules": ["q_proj"]}"#)?;
        assert_eq!(rs.scale(0, Module::Q.path()), 4.0);
        let rs16 =
            AdapterConfig::parse(r#"{"r": 16, "lora_alpha": 8, "use_rslora": true, "target_modules": ["q_proj"]}"#)?;
        assert_eq!(rs16.scale(3, Module::Q.path()), 2.0);
        Ok(())
    }

    #[test]
    fn list_targets_match_name_suffixes() -> Result<(), LoraError> {
        let c = config("")?;
        assert!(c.targets(0, Module::Q.path()) && c.targets(29, Module::V.path()));
        assert!(!c.targets(0, Module::K.path()) && !c.targets(0, Module::Down.path()));
        Ok(())
    }

    #[test]
    fn regex_targets_must_match_the_whole_name() -> Result<(), LoraError> {
        let c = AdapterConfig::parse(
            r#"{"r": 8, "lora_alpha": 8, "target_modules": ".*\\.(1|2)\\.self_attn\\.(q|k)_proj"}"#,
        )?;
        assert!(c.targets(1, Module::Q.path()) && c.targets(2, Module::K.path()));
        assert!(!c.targets(0, Module::Q.path()) && !c.targets(12, Module::Q.path()) && !c.targets(1, Module::V.path()));
        // Not a full match: "q_proj" alone does not match "model.layers.0.self_attn.q_proj".
        let partial = AdapterConfig::parse(r#"{"r": 8, "lora_alpha": 8, "target_modules": "q_proj"}"#)?;
        assert!(!partial.targets(0, Module::Q.path()));
        Ok(())
    }

    #[test]
    fn rank_and_alpha_patterns_override_per_module() -> Result<(), LoraError> {
        let c = config(
            r#", "rank_pattern": {"v_proj": 4, "layers\\.3\\.self_attn\\.q_proj": 2}, "alpha_pattern": {"v_proj": 32}"#,
        )?;
        assert_eq!((c.rank(0, Module::Q.path()), c.scale(0, Module::Q.path())), (8, 2.0));
        assert_eq!((c.rank(0, Module::V.path()), c.scale(0, Module::V.path())), (4, 8.0)); // 32 / 4
        assert_eq!((c.rank(3, Module::Q.path()), c.scale(3, Module::Q.path())), (2, 8.0)); // 16 / 2
        assert_eq!(c.rank(13, Module::Q.path()), 8, "layers.13 must not match the layers.3 pattern");
        Ok(())
    }

    #[test]
    fn layers_to_transform_limits_layers() -> Result<(), LoraError> {
        let c = config(r#", "layers_to_transform": [0, 2]"#)?;
        assert!(c.targets(0, Module::Q.path()) && c.targets(2, Module::Q.path()) && !c.targets(1, Module::Q.path()));
        let one = config(r#", "layers_to_transform": 5"#)?;
        assert!(one.targets(5, Module::V.path()) && !one.targets(4, Module::V.path()));
        Ok(())
    }

    #[test]
    fn unsupported_features_are_named() {
        for (extra, feature) in
            [(r#", "use_dora": true, "lora_bias": true"#, "lora_bias` with DoRA"), (r#", "bias": "all""#, "bias")]
        {
            let err = config(extra).expect_err(feature).to_string();
            assert!(err.contains(feature), "{err}");
        }
    }

    #[test]
    fn dora_and_lora_bias_are_read() -> Result<(), LoraError> {
        let plain = config("")?;
        assert!(!plain.use_dora && !plain.lora_bias);
        assert!(config(r#", "use_dora": true"#)?.use_dora);
        assert!(config(r#", "lora_bias": true"#)?.lora_bias);
        Ok(())
    }

    #[test]
    fn modules_to_save_match_whole_names_or_dotted_suffixes_as_peft_matches() -> Result<(), LoraError> {
        let c = config(r#", "modules_to_save": ["lm_head", "norm", "layers.1.input_layernorm"]"#)?;
        assert!(c.saves("lm_head") && c.saves("model.norm") && c.saves("model.layers.1.input_layernorm"));
        // `norm` is not a suffix of `input_layernorm` at a dot.
        assert!(!c.saves("model.layers.0.input_layernorm") && !c.saves("model.layers.0.post_attention_layernorm"));
        assert!(!c.saves("model.layers.11.input_layernorm"));
        assert!(config(r#", "modules_to_save": null"#)?.modules_to_save.is_empty());
        Ok(())
    }

    #[test]
    fn fan_in_fan_out_is_off_on_linear_bases_as_peft_makes_it() -> Result<(), LoraError> {
        let plain = config("")?;
        let flagged = config(r#", "fan_in_fan_out": true"#)?;
        for layer in 0..3 {
            for m in Module::ALL {
                let (path, p) = (m.path(), &plain);
                assert_eq!(
                    (flagged.targets(layer, path), flagged.rank(layer, path), flagged.scale(layer, path)),
                    (p.targets(layer, path), p.rank(layer, path), p.scale(layer, path))
                );
            }
        }
        Ok(())
    }
}
