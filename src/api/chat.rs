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
use super::tools;
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
    let forced = tools::forced(req.tools.as_ref(), req.tool_choice.as_ref())?;
    let instructions = forced.as_ref().map(|f| f.instructions.clone());
    let kwargs = merged_kwargs(&state, &target, req.chat_template_kwargs.as_ref());
    let (target, req, ids) = state
        .blocking(move || {
            let mut chat = ChatRequest {
                messages: prompting::chat_messages(&target, &req.messages, req.template_vars.as_ref())?,
                tools: req.tools.clone(),
                documents: req.documents.clone(),
                add_generation_prompt: req.add_generation_prompt.unwrap_or(!req.continue_final_message),
                continue_final_message: req.continue_final_message,
                kwargs,
            };
            let mut ids = render_chat(&target.info, &chat)?;
            if let Some(instructions) = instructions {
                // A template that renders the same with and without tools
                // ignores them: describe them in a system message.
                let without = ChatRequest { tools: None, ..chat.clone() };
                if render_chat(&target.info, &without)? == ids {
                    tools::describe_in_system_message(&mut chat.messages, &instructions);
                    ids = render_chat(&target.info, &chat)?;
                }
            }
            Ok((target, req, ids))
        })
        .await?;
    let (param, requested) = match req.max_completion_tokens {
        Some(n) => ("max_completion_tokens", Some(n)),
        None => ("max_tokens", req.max_tokens),
    };
    let max_tokens = params::resolve_max_tokens(param, requested, ids.len(), info.max_model_len)?;
    let response_format = match &forced {
        Some(f) => Some(&f.response_format),
        None => req.response_format.as_ref().or(target.defaults.response_format.as_ref()),
    };
    let constraints = generate::constraints(&state, &info, response_format, params.n).await?;
    let submitted = generate::submit_all(&state, &target, vec![(ids, max_tokens)], &params, constraints)?;
    let id = response_id("chatcmpl");
    let created = unix_now();
    if params.stream && forced.is_none() {
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
                    Delta { role: Some("assistant"), content: Some(String::new()), tool_calls: None },
                    None,
                    Vec::new(),
                )],
                None,
            ),
            Piece::Text(index, text, tokens) => chunk(
                vec![delta_choice(index, Delta { role: None, content: Some(text), tool_calls: None }, None, tokens)],
                None,
            ),
            Piece::Finish(index, reason, tokens) => {
                chunk(vec![delta_choice(index, Delta::default(), Some(reason.as_str()), tokens)], None)
            }
            Piece::Usage(usage) => chunk(Vec::new(), Some(usage)),
        });
        return Ok(sse.into_response());
    }
    let collected = generate::collect(submitted, generate::Delivery::new(&state, facts)).await?;
    let choices: Vec<ChatChoice> = collected
        .choices
        .into_iter()
        .enumerate()
        .map(|(index, choice)| {
            let logprobs = params.sampling.logprobs.map(|_| logprobs::chat(&info.tokenizer, &choice.logprobs));
            let calls = forced.as_ref().and_then(|_| tools::tool_calls(&choice.text));
            match calls {
                Some(calls) => ChatChoice {
                    index,
                    logprobs,
                    message: ChatMessage { role: "assistant", content: None, tool_calls: Some(calls) },
                    finish_reason: Some("tool_calls"),
                },
                None => ChatChoice {
                    index,
                    logprobs,
                    message: ChatMessage { role: "assistant", content: Some(choice.text), tool_calls: None },
                    finish_reason: Some(choice.reason.as_str()),
                },
            }
        })
        .collect();
    if params.stream {
        // A forced call streams whole: the role, then each call in one delta.
        let chunk = |choices: Vec<ChatChunkChoice>, usage: Option<super::types::UsageBody>| {
            serde_json::to_string(&ChatCompletionChunk {
                id: id.clone(),
                object: "chat.completion.chunk",
                created,
                model: req.model.clone(),
                system_fingerprint: target.fingerprint.clone(),
                choices,
                usage,
            })
            .unwrap_or_default()
        };
        let mut events = Vec::new();
        for c in &choices {
            let role = Delta { role: Some("assistant"), content: Some(String::new()), tool_calls: None };
            events.push(chunk(
                vec![ChatChunkChoice { index: c.index, delta: role, logprobs: None, finish_reason: None }],
                None,
            ));
            let calls = c.message.tool_calls.clone().map(|calls| {
                calls
                    .into_iter()
                    .enumerate()
                    .map(|(i, mut call)| {
                        call["index"] = serde_json::json!(i);
                        call
                    })
                    .collect()
            });
            let delta = Delta { role: None, content: c.message.content.clone(), tool_calls: calls };
            events.push(chunk(
                vec![ChatChunkChoice {
                    index: c.index,
                    delta,
                    logprobs: c.logprobs.clone(),
                    finish_reason: c.finish_reason,
                }],
                None,
            ));
        }
        if params.include_usage {
            events.push(chunk(Vec::new(), Some(collected.usage)));
        }
        events.push("[DONE]".to_string());
        let stream = futures::stream::iter(
            events
                .into_iter()
                .map(|data| Ok::<_, std::convert::Infallible>(axum::response::sse::Event::default().data(data))),
        );
        return Ok(axum::response::sse::Sse::new(stream).into_response());
    }
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
    // `tools` reach the chat template (the model sees them); with `auto` a
    // call comes back as text in `content`; `required` / named force one.
    if let Some(tools) = &req.tools {
        if !tools.is_array() && !tools.is_null() {
            return Err(ApiError::invalid("tools", "`tools` must be a list"));
        }
    }
    params::refuse_if_set("functions", req.functions.as_ref())?;
    params::refuse_if_set("function_call", req.function_call.as_ref())?;
    params::refuse_if_set("audio", req.audio.as_ref())?;
    params::refuse_if_set("prediction", req.prediction.as_ref())?;
    Ok(())
}
