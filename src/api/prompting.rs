//! From request to prompt: layered defaults, named templates, system
//! prompts. Generation and the template dry-run (`/v1/templates/{name}/render`)
//! both go through these functions, so the dry-run shows exactly what the
//! model will see.

use serde_json::{Map, Value as Json};

use super::error::ApiError;
use super::observe::Facts;
use super::params::{validate_sampling, Validated};
use super::types::HasSampling;
use super::types::{Prompt, StringOrList};
use super::{AppState, Target};
use crate::loader::ModelInfo;
use crate::prompt::templates::NamedTemplate;
use crate::prompt::PromptError;

/// What both generation endpoints do first: resolve `model` (and template),
/// fill the fields the request left unset from the resolved defaults, and
/// validate the sampling fields.
pub async fn prepare(
    state: &AppState,
    facts: &Facts,
    req: &mut impl HasSampling,
) -> Result<(Target, Validated), ApiError> {
    let sampling = req.sampling_mut();
    let lorax = sampling.merged_adapters.is_some();
    let (adapters, merge) =
        match (sampling.adapters.take(), sampling.adapter_merge.take(), sampling.merged_adapters.take()) {
            (None, None, Some(lorax)) => {
                let (adapters, merge) = lorax.to_adapters()?;
                (Some(adapters), Some(merge))
            }
            (_, _, Some(_)) => {
                return Err(ApiError::invalid(
                    "merged_adapters",
                    "`merged_adapters` (LoRAX's shape) and `adapters`/`adapter_merge` say the same thing: send one",
                ))
            }
            (adapters, merge, None) => (adapters, merge),
        };
    let (model, template) = req.target_names();
    let target = state.resolve(model, template, adapters.as_deref(), merge).await.map_err(|e| match lorax {
        true => super::types::LoraxMerge::rename_param(e),
        false => e,
    })?;
    let d = &target.defaults;
    let max_tokens = req.max_tokens_mut();
    *max_tokens = max_tokens.or(d.max_tokens);
    let sampling = req.sampling_mut();
    sampling.temperature = sampling.temperature.or(d.temperature);
    sampling.top_p = sampling.top_p.or(d.top_p);
    sampling.top_k = sampling.top_k.or(d.top_k);
    sampling.presence_penalty = sampling.presence_penalty.or(d.presence_penalty);
    sampling.frequency_penalty = sampling.frequency_penalty.or(d.frequency_penalty);
    sampling.seed = sampling.seed.or(d.seed);
    if sampling.stop.is_none() {
        sampling.stop = d.stop.clone().map(StringOrList::Many);
    }
    let mut params = validate_sampling(sampling)?;
    params.cache_partition = facts.cache_partition(sampling.cache_salt.as_deref());
    super::params::check_logit_bias(&params, target.info.embedding_rows)?;
    Ok((target, params))
}

/// Template variables: the defaults' first, the request's over them.
fn template_vars(target: &Target, request: Option<&Map<String, Json>>) -> Map<String, Json> {
    let mut vars = target.defaults.template_vars.clone();
    if let Some(request) = request {
        vars.extend(request.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    vars
}

fn render_template(template: &NamedTemplate, vars: &Map<String, Json>) -> Result<String, ApiError> {
    template.render(vars).map_err(|e| match e {
        PromptError::Invalid(message) => ApiError::invalid("template_vars", message),
        other => ApiError::invalid("template", other.to_string()),
    })
}

/// The completion prompts as token ids: the named template's rendering (the
/// request's prompt filling its `input` variable), or the prompt itself.
pub fn completion_prompts(
    target: &Target,
    prompt: Option<&Prompt>,
    request_vars: Option<&Map<String, Json>>,
) -> Result<Vec<Vec<u32>>, ApiError> {
    let Some(template) = &target.template else {
        let prompt =
            prompt.ok_or_else(|| ApiError::invalid("prompt", "`prompt` is required (or name a `template`)"))?;
        return prompt_ids(&target.info, prompt);
    };
    let mut vars = template_vars(target, request_vars);
    match (prompt, template.input.as_ref()) {
        (None, _) => {}
        (Some(Prompt::Text(text)), Some(input)) if !vars.contains_key(input) => {
            vars.insert(input.clone(), Json::String(text.clone()));
        }
        (Some(_), _) => {
            return Err(ApiError::invalid(
                "prompt",
                format!(
                    "template `{}` builds the prompt; pass its variables in `template_vars` (a text `prompt` fills its input variable, if it declares one)",
                    template.name
                ),
            ))
        }
    }
    let text = render_template(template, &vars)?;
    prompt_ids(&target.info, &Prompt::Text(text))
}

/// The chat messages as the chat template will see them: a named template's
/// rendering becomes the final user message, and the layered system prompt
/// is added when the request has none.
pub fn chat_messages(
    target: &Target,
    messages: &[Json],
    request_vars: Option<&Map<String, Json>>,
) -> Result<Vec<Json>, ApiError> {
    let mut messages =
        if messages.is_empty() && target.template.is_some() { Vec::new() } else { normalize_messages(messages)? };
    if let Some(template) = &target.template {
        let mut vars = template_vars(target, request_vars);
        let last_user =
            messages.last().filter(|m| m["role"] == "user").and_then(|m| m["content"].as_str()).map(String::from);
        if let (Some(input), Some(text)) = (template.input.as_ref(), last_user.as_ref()) {
            vars.entry(input.clone()).or_insert_with(|| Json::String(text.clone()));
        }
        let rendered = render_template(template, &vars)?;
        match messages.last_mut() {
            Some(last) if last["role"] == "user" => last["content"] = Json::String(rendered),
            _ => messages.push(serde_json::json!({"role": "user", "content": rendered})),
        }
    }
    if let Some(system) = &target.defaults.system {
        if !messages.iter().any(|m| m["role"] == "system") {
            messages.insert(0, serde_json::json!({"role": "system", "content": system}));
        }
    }
    Ok(messages)
}

/// Every prompt as token ids, checked non-empty and inside the vocabulary.
pub fn prompt_ids(info: &ModelInfo, prompt: &Prompt) -> Result<Vec<Vec<u32>>, ApiError> {
    let encode = |text: &str| {
        info.tokenizer
            .encode_prompt(text)
            .map_err(|e| ApiError::invalid("prompt", format!("cannot tokenize the prompt: {e}")))
    };
    let prompts = match prompt {
        Prompt::Text(text) => vec![encode(text)?],
        Prompt::Texts(texts) => texts.iter().map(|t| encode(t)).collect::<Result<_, _>>()?,
        Prompt::Tokens(ids) => vec![ids.clone()],
        Prompt::TokenLists(lists) => lists.clone(),
    };
    if prompts.is_empty() {
        return Err(ApiError::invalid("prompt", "`prompt` must not be an empty list"));
    }
    // An id the tokenizer knows but the embedding lacks would fail the whole
    // engine step it lands in, so it is refused here.
    let vocab = info.tokenizer.vocab_size().min(info.embedding_rows).max(1) as u32;
    for ids in &prompts {
        if ids.is_empty() {
            return Err(ApiError::invalid("prompt", "`prompt` must contain at least one token"));
        }
        if let Some(bad) = ids.iter().find(|&&id| id >= vocab) {
            return Err(ApiError::invalid(
                "prompt",
                format!("token id {bad} is outside the vocabulary (size {vocab})"),
            ));
        }
    }
    Ok(prompts)
}

/// Checks each message's shape and turns text-only content parts into one
/// string, which is what most chat templates expect.
pub fn normalize_messages(messages: &[Json]) -> Result<Vec<Json>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid("messages", "`messages` must not be empty"));
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, message)| {
            let param = format!("messages[{i}]");
            let Json::Object(fields) = message else {
                return Err(ApiError::invalid(param, "each message must be an object"));
            };
            if !fields.get("role").is_some_and(Json::is_string) {
                return Err(ApiError::invalid(format!("{param}.role"), "each message needs a string `role`"));
            }
            let mut fields = fields.clone();
            super::tools::history::arguments_as_objects(&mut fields);
            if let Some(Json::Array(parts)) = fields.get("content") {
                let mut texts = Vec::with_capacity(parts.len());
                for part in parts {
                    match (part.get("type").and_then(Json::as_str), part.get("text").and_then(Json::as_str)) {
                        (Some("text"), Some(text)) => texts.push(text.to_string()),
                        (kind, _) => {
                            return Err(ApiError::unsupported(
                                &format!("{param}.content"),
                                &format!("with a part of type {}", kind.unwrap_or("unknown")),
                            ))
                        }
                    }
                }
                fields.insert("content".into(), Json::String(texts.join("\n")));
            }
            match fields.get("content") {
                None | Some(Json::Null) | Some(Json::String(_)) => Ok(Json::Object(fields)),
                Some(_) => Err(ApiError::invalid(
                    format!("{param}.content"),
                    "`content` must be a string, a list of text parts or null",
                )),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::types::Prompt;
    use crate::lora::{AdapterRegistry, BaseShapes, RegistryOptions};
    use crate::model::random::RandomSource;
    use crate::model::{ModelFormat, WeightMode};

    #[test]
    fn ids_beyond_the_embedding_are_refused_even_if_the_tokenizer_knows_them() {
        // A byte tokenizer (257 ids) over a 200-row embedding table.
        let config = RandomSource::tiny_config(200);
        let info = ModelInfo {
            id: "tiny".into(),
            tokenizer: crate::tokenizer::Tokenizer::bytes().expect("tokenizer"),
            chat_template: None,
            eos_token_ids: vec![],
            max_model_len: 64,
            config: config.clone(),
            embedding_rows: config.vocab_size,
            format: ModelFormat::Gguf,
            mode: WeightMode::Quantized,
            adapters: AdapterRegistry::new(
                BaseShapes::of(&config),
                RegistryOptions { max_rank: 8, ..Default::default() },
                "tiny",
            )
            .into(),
            fingerprint: String::new(),
            grammars: Default::default(),
        };
        assert!(prompt_ids(&info, &Prompt::Tokens(vec![1, 199])).is_ok());
        let err = prompt_ids(&info, &Prompt::Tokens(vec![1, 220])).expect_err("220 has no embedding row");
        assert!(format!("{err:?}").contains("220"), "{err:?}");
    }
}
