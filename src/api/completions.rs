//! `POST /v1/completions`: raw prompts (text or token ids) in, text out.

use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{extract::State, Extension, Json, Router};

use super::error::ApiError;
use super::generate::{self, Piece};
use super::json::WithSampling;
use super::logprobs;
use super::observe::Facts;
use super::params;
use super::types::{ChunkHeader, CompletionChoice, CompletionRequest, CompletionResponse};
use super::{prompting, response_id, unix_now, AppState};
use crate::engine::TokenLogprob;

/// OpenAI's default for `/v1/completions`.
const DEFAULT_MAX_TOKENS: i64 = 16;

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/completions", post(completions))
}

async fn completions(
    State(state): State<AppState>,
    Extension(facts): Extension<Facts>,
    WithSampling(req): WithSampling<CompletionRequest>,
) -> Result<Response, ApiError> {
    let mut req = req;
    let (target, mut params) = prompting::prepare(&state, &mut req).await?;
    facts.resolved(&target);
    let info = target.info.clone();
    params.sampling.logprobs = logprobs::completion_request(req.logprobs.as_ref())?;
    if req.echo == Some(true) {
        return Err(ApiError::unsupported("echo", ""));
    }
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::unsupported("suffix", ""));
    }
    let (prompt, vars) = (req.prompt.take(), req.template_vars.take());
    let (target, prompts) = state
        .blocking(move || {
            let prompts = prompting::completion_prompts(&target, prompt.as_ref(), vars.as_ref())?;
            Ok((target, prompts))
        })
        .await?;
    let max_tokens = req.max_tokens.or(Some(DEFAULT_MAX_TOKENS));
    let prompts = prompts
        .into_iter()
        .map(|ids| {
            let n = params::resolve_max_tokens("max_tokens", max_tokens, ids.len(), info.max_model_len)?;
            Ok((ids, n))
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    let count = prompts.len() * params.n;
    let constraints = generate::constraints(
        &state,
        &info,
        req.response_format.as_ref().or(target.defaults.response_format.as_ref()),
        count,
    )
    .await?;
    let submitted = generate::submit_all(&state, &target, prompts, &params, constraints)?;
    let id = response_id("cmpl");
    let created = unix_now();
    if params.stream {
        let header = ChunkHeader {
            id,
            object: "text_completion",
            created,
            model: req.model.clone(),
            system_fingerprint: target.fingerprint.clone(),
        };
        let chunk = move |choices: Vec<CompletionChoice>, usage| header.chunk(choices, usage);
        // Each choice's `text_offset` continues from its previous chunk.
        let wants_logprobs = params.sampling.logprobs.is_some();
        let offsets = std::sync::Mutex::new(vec![0usize; submitted.len()]);
        let tokenizer = info.clone();
        let stream_logprobs = move |index: usize, tokens: &[TokenLogprob]| {
            if !wants_logprobs {
                return None;
            }
            let mut offsets = offsets.lock().unwrap_or_else(|p| p.into_inner());
            let offset = offsets.get_mut(index)?;
            let (json, end) = logprobs::completion(&tokenizer.tokenizer, tokens, *offset);
            *offset = end;
            Some(json)
        };
        let delivery = generate::Delivery::new(&state, facts);
        let sse = generate::sse(submitted, delivery, params.include_usage, move |piece| match piece {
            Piece::Start(_) => None,
            Piece::Text(index, text, tokens) => {
                let logprobs = stream_logprobs(index, &tokens);
                chunk(vec![choice(index, text, None, logprobs)], None)
            }
            Piece::Finish(index, reason, tokens) => {
                let logprobs = stream_logprobs(index, &tokens);
                chunk(vec![choice(index, String::new(), Some(reason.as_str()), logprobs)], None)
            }
            Piece::Usage(usage) => chunk(Vec::new(), Some(usage)),
        });
        return Ok(sse.into_response());
    }
    let collected = generate::collect(submitted, generate::Delivery::new(&state, facts)).await?;
    let choices = collected
        .choices
        .into_iter()
        .enumerate()
        .map(|(index, c)| {
            let logprobs = params.sampling.logprobs.map(|_| logprobs::completion(&info.tokenizer, &c.logprobs, 0).0);
            choice(index, c.text, Some(c.reason.as_str()), logprobs)
        })
        .collect();
    Ok(Json(CompletionResponse {
        id,
        object: "text_completion",
        created,
        model: req.model,
        system_fingerprint: target.fingerprint.clone(),
        choices,
        usage: Some(collected.usage),
    })
    .into_response())
}

fn choice(
    index: usize,
    text: String,
    finish_reason: Option<&'static str>,
    logprobs: Option<serde_json::Value>,
) -> CompletionChoice {
    CompletionChoice { index, text, logprobs, finish_reason }
}
