//! `POST /v1/completions`: raw prompts (text or token ids) in, text out.

use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{extract::State, Json, Router};

use super::error::ApiError;
use super::generate::{self, Piece};
use super::json::WithSampling;
use super::params::{self, validate_sampling};
use super::types::{CompletionChoice, CompletionRequest, CompletionResponse, Prompt};
use super::{response_id, unix_now, AppState};
use crate::loader::ModelInfo;

/// OpenAI's default for `/v1/completions`.
const DEFAULT_MAX_TOKENS: i64 = 16;

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/completions", post(completions))
}

async fn completions(
    State(state): State<AppState>,
    WithSampling(req): WithSampling<CompletionRequest>,
) -> Result<Response, ApiError> {
    let target = state.resolve(&req.model).await?;
    let info = target.info.clone();
    let params = validate_sampling(&req.sampling)?;
    params::refuse_if_set("logprobs", req.logprobs.as_ref())?;
    if req.echo == Some(true) {
        return Err(ApiError::unsupported("echo", ""));
    }
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::unsupported("suffix", ""));
    }
    let prompts = prompt_ids(&info, &req.prompt)?;
    let max_tokens = req.max_tokens.or(Some(DEFAULT_MAX_TOKENS));
    let prompts = prompts
        .into_iter()
        .map(|ids| {
            let n = params::resolve_max_tokens(
                "max_tokens",
                max_tokens,
                ids.len(),
                info.max_model_len,
            )?;
            Ok((ids, n))
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    let submitted = generate::submit_all(&state, &target, prompts, &params)?;
    let id = response_id("cmpl");
    let created = unix_now();
    let model = req.model.clone();
    if params.stream {
        let chunk = move |choices: Vec<CompletionChoice>, usage| {
            serde_json::to_string(&CompletionResponse {
                id: id.clone(),
                object: "text_completion",
                created,
                model: model.clone(),
                choices,
                usage,
            })
            .ok()
        };
        let sse = generate::sse(submitted, params.include_usage, move |piece| match piece {
            Piece::Start(_) => None,
            Piece::Text(index, text) => chunk(vec![choice(index, text, None)], None),
            Piece::Finish(index, reason) => chunk(
                vec![choice(index, String::new(), Some(reason.as_str()))],
                None,
            ),
            Piece::Usage(usage) => chunk(Vec::new(), Some(usage)),
        });
        return Ok(sse.into_response());
    }
    let collected = generate::collect(submitted).await?;
    let choices = collected
        .choices
        .into_iter()
        .enumerate()
        .map(|(index, (text, reason))| choice(index, text, Some(reason.as_str())))
        .collect();
    Ok(Json(CompletionResponse {
        id,
        object: "text_completion",
        created,
        model: req.model,
        choices,
        usage: Some(collected.usage),
    })
    .into_response())
}

fn choice(index: usize, text: String, finish_reason: Option<&'static str>) -> CompletionChoice {
    CompletionChoice {
        index,
        text,
        logprobs: None,
        finish_reason,
    }
}

/// Every prompt as token ids, checked non-empty and inside the vocabulary.
fn prompt_ids(info: &ModelInfo, prompt: &Prompt) -> Result<Vec<Vec<u32>>, ApiError> {
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
        return Err(ApiError::invalid(
            "prompt",
            "`prompt` must not be an empty list",
        ));
    }
    let vocab = info.tokenizer.vocab_size().max(1) as u32;
    for ids in &prompts {
        if ids.is_empty() {
            return Err(ApiError::invalid(
                "prompt",
                "`prompt` must contain at least one token",
            ));
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
