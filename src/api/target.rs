//! What a request's `model`, `template` and `adapters` resolve to: the base,
//! the adapters it applies (one, or a weighted composition), the named
//! template, and the request defaults of every layer.

use std::sync::Arc;

use super::types::{AdapterChoice, MergeOptions};
use super::{ApiError, AppState};
use crate::loader::ModelInfo;
use crate::lora::merge::Combination;
use crate::lora::LoraError;
use crate::model::lora::{AdapterWeights, Part};
use crate::prompt::defaults::Defaults;
use crate::prompt::templates::NamedTemplate;

pub struct Target {
    pub info: Arc<ModelInfo>,
    /// The id the client named.
    pub requested: String,
    /// What the rows apply: one adapter, or a composition of several.
    pub adapter: Option<Arc<AdapterWeights>>,
    /// The adapters it applies, in order (one for a single adapter).
    pub adapter_names: Vec<String>,
    /// The preset the id named, if it named one.
    pub preset: Option<String>,
    /// `system_fingerprint`: the base's, and the adapters' generations and weights.
    pub fingerprint: String,
    pub template: Option<Arc<NamedTemplate>>,
    /// Preset over adapter over template; the request still wins over these.
    pub defaults: Defaults,
}

impl Target {
    /// The adapters as one label (`pirate`, `pirate+shout`): for logs and
    /// metrics, sorted and without the weights so that labels stay few.
    pub fn adapter_label(&self) -> Option<String> {
        let mut names = self.adapter_names.clone();
        names.sort();
        names.dedup();
        (!names.is_empty()).then(|| names.join("+"))
    }
}

/// Whether `name` is a registered adapter or one the roots would resolve
/// (a few `stat`s, no reads); a name that could not be a folder is a 400.
pub(super) fn adapter_exists(info: &ModelInfo, name: &str) -> Result<bool, ApiError> {
    info.adapters.exists(name).map_err(|e| ApiError::invalid("model", e.to_string()))
}

/// What the request's adapters resolved to.
struct Adapters {
    weights: Arc<AdapterWeights>,
    names: Vec<String>,
    defaults: Defaults,
    /// Each adapter's name, generation and weight, for the fingerprint.
    identity: Vec<String>,
}

impl AppState {
    /// Resolves `model` (the base id, a preset, or an adapter name, in that
    /// order), `adapters` (a weighted composition on the base or a preset,
    /// in place of the preset's adapter) and the template
    /// (`requested_template`, else the preset's or adapter's). Unknown
    /// models are 404; unknown or invalid adapters in `adapters` are a 400
    /// naming the entry; a preset whose adapter or template is missing is a
    /// 400 that says which.
    pub async fn resolve(
        &self,
        requested: &str,
        requested_template: Option<&str>,
        adapters: Option<&[AdapterChoice]>,
        merge: Option<MergeOptions>,
    ) -> Result<Target, ApiError> {
        let info = self.model()?;
        let preset = self.presets.get(requested);
        let (adapter_name, preset_defaults) = if requested == info.id {
            (None, Defaults::default())
        } else if let Some(preset) = &preset {
            (preset.adapter.clone(), preset.defaults.clone())
        } else if adapter_exists(&info, requested)? {
            (Some(requested.to_string()), Defaults::default())
        } else {
            return Err(ApiError::model_not_found(requested));
        };
        // A template the request names is found before any adapter is read.
        let requested_template = requested_template
            .map(|name| {
                self.templates.get(name).ok_or_else(|| ApiError {
                    code: Some("template_not_found"),
                    ..ApiError::not_found(format!("no template named `{name}`"))
                })
            })
            .transpose()?;
        let preset_error = |what: String| ApiError {
            code: Some("preset_unavailable"),
            ..ApiError::invalid("model", format!("preset `{requested}` {what}"))
        };
        // The request's list, else the preset's; errors in the preset's own
        // list are the preset's, not the request's.
        let from_preset = adapters.is_none().then(|| preset.as_ref().and_then(|p| p.adapters.clone())).flatten();
        let preset_list = from_preset.is_some();
        // The request's `adapter_merge` wins, over its own list or the preset's.
        let merge = match (merge, &from_preset) {
            (Some(_), None) if adapters.is_none() => {
                return Err(ApiError::invalid(
                    "adapter_merge",
                    "`adapter_merge` combines the adapters of `adapters`, which is missing",
                ))
            }
            (Some(merge), _) => merge,
            (None, Some(_)) => preset.as_ref().and_then(|p| p.adapter_merge).unwrap_or_default(),
            (None, None) => MergeOptions::default(),
        };
        let adapters = adapters.or(from_preset.as_deref());
        let resolved = match (adapters, &adapter_name) {
            (Some(_), Some(name)) if preset.is_none() => {
                return Err(ApiError::invalid(
                    "adapters",
                    format!(
                        "`adapters` composes adapters on the base model or a preset, and `model` names the adapter \
                         `{name}`: name the base model and list `{name}` in `adapters`"
                    ),
                ))
            }
            (Some(choices), _) => Some(self.compose(&info, choices, merge).await.map_err(|e| match preset_list {
                true if e.status.is_client_error() => {
                    preset_error(format!("lists adapters that cannot apply: {}", e.message))
                }
                _ => e,
            })?),
            (None, None) => None,
            (None, Some(name)) => match load(&info, name, "model").await? {
                Some((weights, defaults)) => {
                    let generation = info.adapters.generation(name).unwrap_or(0).to_string();
                    Some(Adapters {
                        weights,
                        names: vec![name.clone()],
                        defaults,
                        identity: vec![name.clone(), generation],
                    })
                }
                None if preset.is_some() => {
                    return Err(preset_error(format!("names adapter `{name}`, which is not loaded")))
                }
                None => return Err(ApiError::model_not_found(requested)),
            },
        };
        let adapter_defaults = resolved.as_ref().map(|r| r.defaults.clone()).unwrap_or_default();
        let layered = preset_defaults.over(&adapter_defaults);
        let template = match (requested_template, layered.template.as_deref()) {
            (Some(template), _) => Some(template),
            (None, Some(name)) => Some(
                self.templates
                    .get(name)
                    .ok_or_else(|| preset_error(format!("names template `{name}`, which does not exist")))?,
            ),
            (None, None) => None,
        };
        let defaults = match &template {
            Some(t) => layered.over(&t.defaults),
            None => layered,
        };
        let fingerprint = match &resolved {
            None => info.fingerprint.clone(),
            Some(r) => {
                let mut parts: Vec<&str> = vec![&info.fingerprint];
                parts.extend(r.identity.iter().map(String::as_str));
                crate::loader::fingerprint(&parts)
            }
        };
        let (adapter, adapter_names) = match resolved {
            Some(r) => (Some(r.weights), r.names),
            None => (None, Vec::new()),
        };
        Ok(Target {
            fingerprint,
            info,
            requested: requested.to_string(),
            adapter,
            adapter_names,
            preset: preset.map(|p| p.name),
            template,
            defaults,
        })
    }
}

/// Loads adapter `name` (named by the request's `param`), off the async
/// workers and below the engine's priority: a cold adapter delays only the
/// requests that need it. `None` when no such adapter exists.
async fn load(info: &ModelInfo, name: &str, param: &str) -> Result<Option<(Arc<AdapterWeights>, Defaults)>, ApiError> {
    let weights = info.adapters.get_off_engine(name).await.map_err(|e| match e {
        LoraError::BadName(_) => ApiError::invalid(param, e.to_string()),
        e => {
            tracing::error!(adapter = %name, error = %e, "cannot load adapter");
            ApiError::internal(format!("adapter `{name}` cannot be read: {e}"))
        }
    })?;
    Ok(weights.map(|w| (w, info.adapters.defaults(name).unwrap_or_default())))
}

impl AppState {
    /// The composition `choices` asks for, every entry checked before any
    /// is loaded: `cat` applies each delta un-merged with its weight;
    /// `linear` merges them once, off the async workers. Defaults layer as
    /// listed, the first adapter's on top.
    async fn compose(
        &self,
        info: &Arc<ModelInfo>,
        choices: &[AdapterChoice],
        merge: MergeOptions,
    ) -> Result<Adapters, ApiError> {
        merge.check().map_err(|(field, message)| ApiError::invalid(format!("adapter_merge.{field}"), message))?;
        let max = info.adapters.max_per_request();
        if choices.is_empty() || choices.len() > max {
            return Err(ApiError::invalid(
                "adapters",
                format!("`adapters` must list between 1 and {max} adapters, got {}", choices.len()),
            ));
        }
        for (i, choice) in choices.iter().enumerate() {
            let weight = choice.weight.unwrap_or(1.0);
            if !weight.is_finite() || !(weight as f32).is_finite() {
                return Err(ApiError::invalid(
                    format!("adapters[{i}].weight"),
                    format!("`adapters[{i}].weight` must be a finite number, got {weight}"),
                ));
            }
            let param = format!("adapters[{i}].name");
            let exists = info.adapters.exists(&choice.name).map_err(|e| ApiError::invalid(&param, e.to_string()))?;
            if !exists || choice.name == info.id {
                return Err(unknown_adapter(&param, &choice.name));
            }
        }
        let (mut parts, mut names, mut identity) = (Vec::new(), Vec::new(), Vec::new());
        let mut defaults = Defaults::default();
        // Which listed adapter replaces each whole module (`modules_to_save`).
        let mut replaced: std::collections::HashMap<String, &str> = Default::default();
        let mut dora_weighted = false;
        for (i, choice) in choices.iter().enumerate() {
            let param = format!("adapters[{i}].name");
            let (weights, own) =
                load(info, &choice.name, &param).await?.ok_or_else(|| unknown_adapter(&param, &choice.name))?;
            let factor = choice.weight.unwrap_or(1.0) as f32;
            if weights.is_dora() && (choices.len() > 1 || merge.combination_type != Combination::Cat) {
                let field = match choices.len() > 1 {
                    true => param.clone(),
                    false => "adapter_merge.combination_type".to_string(),
                };
                return Err(ApiError::invalid(
                    field,
                    format!(
                        "`{}` is a DoRA adapter, served alone (at any weight): its norms belong to its own delta \
                         (PEFT's add_weighted_adapter refuses DoRA too)",
                        choice.name
                    ),
                ));
            }
            dora_weighted |= weights.is_dora() && ![0.0, 1.0].contains(&factor);
            for module in weights.saved.names().into_iter().filter(|_| factor != 0.0) {
                if let Some(other) = replaced.insert(module.clone(), &choice.name) {
                    return Err(ApiError::invalid(
                        param,
                        format!(
                            "`{other}` and `{}` both replace `{module}` (modules_to_save): a whole module cannot be \
                             weighted or merged (PEFT's add_weighted_adapter refuses the pair too)",
                            choice.name
                        ),
                    ));
                }
            }
            parts.push(Part { adapter: weights, factor });
            let generation = info.adapters.generation(&choice.name).unwrap_or(0);
            identity.push(format!("{}@{generation}*{factor}", choice.name));
            names.push(choice.name.clone());
            defaults = defaults.over(&own);
        }
        let combination = merge.combination_type;
        identity.push(format!("{:?}", merge.key()));
        let registry = info.adapters.clone();
        let compose = move || {
            registry.compose(parts, &merge).map_err(|e| {
                ApiError::invalid(
                    "adapter_merge",
                    format!("cannot combine these adapters with `{}`: {e}", combination.name()),
                )
            })
        };
        // Only a merge (or DoRA's norms at a new weight) computes anything
        // worth moving off the async workers.
        let weights = match combination {
            Combination::Cat if !dora_weighted => compose()?,
            _ => self.blocking(compose).await?,
        };
        Ok(Adapters { weights, names, defaults, identity })
    }
}

fn unknown_adapter(param: &str, name: &str) -> ApiError {
    ApiError { code: Some("adapter_not_found"), ..ApiError::invalid(param, format!("no adapter named `{name}`")) }
}
