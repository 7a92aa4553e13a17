//! `POST /v1/completions`: raw prompts (text or token ids) in, text out.

use axum::response::{IntoResponse, Response};
use axum::{extract::State, Extension, Json};

use super::error::{ApiError, ErrorEnvelope};
use super::generate::{self, Ending, Piece};
use super::json::WithSampling;
use super::logprobs;
use super::observe::Facts;
use super::params;
use super::types::CompletionBody;
use super::types::StreamEvent;
use super::types::{ChunkHeader, CompletionChoice, CompletionRequest, CompletionResponse, Prompt};
use super::{prompting, AppState};
use crate::engine::TokenLogprob;
use crate::ids::{response_id, unix_now};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// OpenAI's default for `/v1/completions`.
const DEFAULT_MAX_TOKENS: i64 = 16;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(completions))
}

/// A completion of a prompt (text, texts or token ids), or of a named template.
#[utoipa::path(post, path = "/v1/completions", tag = "generation", request_body = CompletionBody,
    responses((status = 200, description = "The completion, or with `stream` its chunks as server-sent events",
        content((CompletionResponse = "application/json"), (StreamEvent = "text/event-stream"))), (status = 400, description = "Invalid request", body = ErrorEnvelope), (status = 401, description = "Missing or wrong API key", body = ErrorEnvelope), (status = 404, description = "Unknown model", body = ErrorEnvelope), (status = 429, description = "Too many requests waiting", body = ErrorEnvelope), (status = 503, description = "Loading or draining", body = ErrorEnvelope)))]
async fn completions(
    State(state): State<AppState>,
    Extension(facts): Extension<Facts>,
    WithSampling(req): WithSampling<CompletionRequest>,
) -> Result<Response, ApiError> {
    let mut req = req;
    let (target, mut params) = prompting::prepare(&state, &facts, &mut req).await?;
    facts.resolved(&target);
    let info = target.info.clone();
    params.sampling.logprobs = logprobs::completion_request(req.logprobs.as_ref())?;
    let echo = req.echo == Some(true);
    if echo {
        params.prompt_logprobs = params.sampling.logprobs;
    }
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::unsupported("suffix", ""));
    }
    let (prompt, vars) = (req.prompt.take(), req.template_vars.take());
    let (target, prompts, echoes) = state
        .blocking(move || {
            let prompts = prompting::completion_prompts(&target, prompt.as_ref(), vars.as_ref())?;
            let echoes = if echo { echo_texts(&target, prompt.as_ref(), &prompts) } else { Vec::new() };
            Ok((target, prompts, echoes))
        })
        .await?;
    // Per choice (prompt-major): the echoed text and the prompt's first token.
    let n = params.n;
    let firsts: Vec<u32> = prompts.iter().flat_map(|ids| std::iter::repeat_n(ids[0], n)).collect();
    let echoes: Vec<String> = echoes.iter().flat_map(|t| std::iter::repeat_n(t.clone(), n)).collect();
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
        let mut offsets = vec![0usize; submitted.len()];
        let tokenizer = info.clone();
        let mut stream_logprobs = move |index: usize, tokens: &[TokenLogprob], prompt: Option<u32>| {
            let offset = offsets.get_mut(index)?;
            let (json, end) = match prompt {
                Some(first) => logprobs::echoed_prompt(&tokenizer.tokenizer, first, tokens),
                None if wants_logprobs => logprobs::completion(&tokenizer.tokenizer, tokens, *offset),
                None => return None,
            };
            *offset = end;
            Some(json)
        };
        let delivery = generate::Delivery::new(&state, facts);
        let wire = generate::DataLines(move |piece| match piece {
            // The echoed prompt comes first: with its log-probabilities
            // once the prefill sends them, else at once.
            Piece::Start(index) if echo && !wants_logprobs => {
                chunk(vec![choice(index, echoes[index].clone(), None, None)], None)
            }
            Piece::Start(_) => None,
            Piece::Prompt(index, entries) => {
                let logprobs = stream_logprobs(index, &entries, Some(firsts[index]));
                chunk(vec![choice(index, echoes.get(index).cloned().unwrap_or_default(), None, logprobs)], None)
            }
            Piece::Text(index, text, tokens) => {
                let logprobs = stream_logprobs(index, &tokens, None);
                chunk(vec![choice(index, text, None, logprobs)], None)
            }
            Piece::Finish(index, ending, tokens) => {
                let logprobs = stream_logprobs(index, &tokens, None);
                chunk(vec![choice(index, String::new(), Some(ending), logprobs)], None)
            }
            Piece::Usage(usage) => chunk(Vec::new(), Some(usage)),
        });
        return Ok(generate::sse(submitted, delivery, params.include_usage, wire).into_response());
    }
    let collected = generate::collect(submitted, generate::Delivery::new(&state, facts)).await?;
    let choices = collected
        .choices
        .into_iter()
        .enumerate()
        .map(|(index, c)| {
            let logprobs = params.sampling.logprobs.map(|_| {
                if !echo {
                    return logprobs::completion(&info.tokenizer, &c.logprobs, 0).0;
                }
                let (prompt, end) = logprobs::echoed_prompt(&info.tokenizer, firsts[index], &c.prompt_logprobs);
                logprobs::concat(prompt, logprobs::completion(&info.tokenizer, &c.logprobs, end).0)
            });
            let text = if echo { echoes[index].clone() + &c.text } else { c.text };
            choice(index, text, Some(c.ending), logprobs)
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

/// The text `echo` repeats for each prompt: the prompt as sent, or (token
/// ids, a template's rendering) its decoding.
fn echo_texts(target: &super::Target, prompt: Option<&Prompt>, prompts: &[Vec<u32>]) -> Vec<String> {
    match (prompt, &target.template) {
        (Some(Prompt::Text(text)), None) => vec![text.clone()],
        (Some(Prompt::Texts(texts)), None) => texts.clone(),
        _ => prompts.iter().map(|ids| target.info.tokenizer.decode(ids, false).unwrap_or_default()).collect(),
    }
}

fn choice(index: usize, text: String, ending: Option<Ending>, logprobs: Option<serde_json::Value>) -> CompletionChoice {
    let (finish_reason, stop_reason) = match ending {
        Some(e) => (Some(e.reason.as_str()), e.stop),
        None => (None, None),
    };
    CompletionChoice { index, text, logprobs, finish_reason, stop_reason }
}
