//! `POST /v1/chat/completions`: messages rendered through the chat template.

use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{extract::State, Extension, Json, Router};
use serde_json::Value as Json_;

use super::error::ApiError;
use super::generate::{self, Piece};
use super::json::WithSampling;
use super::logprobs;
use super::observe::Facts;
use super::params;
use super::types::{
    ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, ChatMessage, Delta,
};
use super::{prompting, response_id, unix_now, AppState, Target};
use crate::engine::TokenLogprob;
use crate::loader::ModelInfo;
use crate::prompt::ChatRequest;

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/chat/completions", post(chat_completions))
}

async fn chat_completions(
    State(state): State<AppState>,
    Extension(facts): Extension<Facts>,
    WithSampling(req): WithSampling<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    let mut req = req;
    let (target, mut params) = prompting::prepare(&state, &mut req).await?;
    facts.resolved(&target);
    let info = target.info.clone();
    refuse_unsupported(&req)?;
    params.sampling.logprobs = logprobs::chat_request(req.logprobs, req.top_logprobs.as_ref())?;
    let kwargs = merged_kwargs(&state, &target, req.chat_template_kwargs.as_ref());
    let (target, req, ids) = state
        .blocking(move || {
            let chat = ChatRequest {
                messages: prompting::chat_messages(&target, &req.messages, req.template_vars.as_ref())?,
                tools: req.tools.clone(),
                documents: req.documents.clone(),
                add_generation_prompt: req.add_generation_prompt.unwrap_or(!req.continue_final_message),
                continue_final_message: req.continue_final_message,
                kwargs,
            };
            let ids = render_chat(&target.info, &chat)?;
            Ok((target, req, ids))
        })
        .await?;
    let (param, requested) = match req.max_completion_tokens {
        Some(n) => ("max_completion_tokens", Some(n)),
        None => ("max_tokens", req.max_tokens),
    };
    let max_tokens = params::resolve_max_tokens(param, requested, ids.len(), info.max_model_len)?;
    let constraints = generate::constraints(
        &state,
        &info,
        req.response_format.as_ref().or(target.defaults.response_format.as_ref()),
        params.n,
    )
    .await?;
    let submitted = generate::submit_all(&state, &target, vec![(ids, max_tokens)], &params, constraints)?;
    let id = response_id("chatcmpl");
    let created = unix_now();
    if params.stream {
        let model = req.model.clone();
        let fingerprint = target.fingerprint.clone();
        let chunk = move |choices: Vec<ChatChunkChoice>, usage| {
            serde_json::to_string(&ChatCompletionChunk {
                id: id.clone(),
                object: "chat.completion.chunk",
                created,
                model: model.clone(),
                system_fingerprint: fingerprint.clone(),
                choices,
                usage,
            })
            .ok()
        };
        let tokenizer = info.clone();
        let wants_logprobs = params.sampling.logprobs.is_some();
        let delta_choice = move |index, delta, finish_reason, tokens: Vec<TokenLogprob>| ChatChunkChoice {
            index,
            delta,
            logprobs: wants_logprobs.then(|| logprobs::chat(&tokenizer.tokenizer, &tokens)),
            finish_reason,
        };
        let delivery = generate::Delivery::new(&state, facts);
        let sse = generate::sse(submitted, delivery, params.include_usage, move |piece| match piece {
            Piece::Start(index) => chunk(
                vec![delta_choice(
                    index,
                    Delta { role: Some("assistant"), content: Some(String::new()) },
                    None,
                    Vec::new(),
                )],
                None,
            ),
            Piece::Text(index, text, tokens) => {
                chunk(vec![delta_choice(index, Delta { role: None, content: Some(text) }, None, tokens)], None)
            }
            Piece::Finish(index, reason, tokens) => {
                chunk(vec![delta_choice(index, Delta::default(), Some(reason.as_str()), tokens)], None)
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
        .map(|(index, choice)| ChatChoice {
            index,
            logprobs: params.sampling.logprobs.map(|_| logprobs::chat(&info.tokenizer, &choice.logprobs)),
            message: ChatMessage { role: "assistant", content: choice.text },
            finish_reason: Some(choice.reason.as_str()),
        })
        .collect();
    Ok(Json(ChatCompletionResponse {
        id,
        object: "chat.completion",
        created,
        model: req.model,
        system_fingerprint: target.fingerprint.clone(),
        choices,
        usage: collected.usage,
    })
    .into_response())
}

/// Renders the conversation and tokenizes it (the template writes every
/// special token itself, so nothing is added).
pub fn render_chat(info: &ModelInfo, chat: &ChatRequest) -> Result<Vec<u32>, ApiError> {
    let template = info.chat_template.as_ref().ok_or_else(|| {
        ApiError::bad_request("this model has no chat template; start the server with --chat-template FILE")
    })?;
    let text = template.render(chat)?;
    let ids = info
        .tokenizer
        .encode(&text)
        .map_err(|e| ApiError::invalid("messages", format!("cannot tokenize the conversation: {e}")))?;
    if ids.is_empty() {
        return Err(ApiError::invalid("messages", "the rendered conversation is empty"));
    }
    Ok(ids)
}

/// Server defaults, then the preset/adapter layers, then the request, key by key.
pub fn merged_kwargs(
    state: &AppState,
    target: &Target,
    request: Option<&serde_json::Map<String, Json_>>,
) -> serde_json::Map<String, Json_> {
    let mut kwargs = (*state.default_chat_template_kwargs).clone();
    kwargs.extend(target.defaults.chat_template_kwargs.iter().map(|(k, v)| (k.clone(), v.clone())));
    if let Some(request) = request {
        kwargs.extend(request.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    kwargs
}

fn refuse_unsupported(req: &ChatCompletionRequest) -> Result<(), ApiError> {
    // `tools` reach the chat template (the model sees them); tool calls come
    // back as text in `content`. Forcing a call needs constrained decoding.
    if let Some(tools) = &req.tools {
        if !tools.is_array() && !tools.is_null() {
            return Err(ApiError::invalid("tools", "`tools` must be a list"));
        }
    }
    if let Some(choice) = &req.tool_choice {
        if !matches!(choice.as_str(), Some("none") | Some("auto")) && !choice.is_null() {
            return Err(ApiError::unsupported("tool_choice", "other than \"none\" or \"auto\""));
        }
    }
    params::refuse_if_set("functions", req.functions.as_ref())?;
    params::refuse_if_set("function_call", req.function_call.as_ref())?;
    params::refuse_if_set("audio", req.audio.as_ref())?;
    params::refuse_if_set("prediction", req.prediction.as_ref())?;
    Ok(())
}
