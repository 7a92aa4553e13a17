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
use super::tools::{self, ToolFormat};
use super::types::{
    ChatChoice, ChatChunkChoice, ChatCompletionRequest, ChatCompletionResponse, ChatMessage, ChunkHeader, Delta,
};
use super::{prompting, response_id, unix_now, AppState, Target};
use crate::engine::{FinishReason, TokenLogprob};
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
    let tools = tools::requested(req.tools.as_ref(), req.tool_choice.as_ref())?;
    let kwargs = merged_kwargs(&state, &target, req.chat_template_kwargs.as_ref());
    let parser = state.tool_call_parser;
    let (target, req, ids, plan) = state
        .blocking(move || {
            let chat = ChatRequest {
                messages: prompting::chat_messages(&target, &req.messages, req.template_vars.as_ref())?,
                tools: req.tools.clone(),
                documents: req.documents.clone(),
                add_generation_prompt: req.add_generation_prompt.unwrap_or(!req.continue_final_message),
                continue_final_message: req.continue_final_message,
                kwargs,
            };
            let (ids, plan) = chat_prompt(&target.info, chat, tools.as_ref(), parser)?;
            Ok((target, req, ids, plan))
        })
        .await?;
    let (param, requested) = match req.max_completion_tokens {
        Some(n) => ("max_completion_tokens", Some(n)),
        None => ("max_tokens", req.max_tokens),
    };
    let max_tokens = params::resolve_max_tokens(param, requested, ids.len(), info.max_model_len)?;
    if plan.as_ref().is_some_and(|p| p.format.needs_special_tokens()) {
        params.skip_special_tokens = false;
    }
    let response_format = match plan.as_ref().and_then(|p| p.response_format.as_ref()) {
        Some(tool_format) => Some(tool_format),
        None => req.response_format.as_ref().or(target.defaults.response_format.as_ref()),
    };
    let constraints = generate::constraints(&state, &info, response_format, params.n).await?;
    let submitted = generate::submit_all(&state, &target, vec![(ids, max_tokens)], &params, constraints)?;
    let id = response_id("chatcmpl");
    let created = unix_now();
    let header = ChunkHeader {
        id: id.clone(),
        object: "chat.completion.chunk",
        created,
        model: req.model.clone(),
        system_fingerprint: target.fingerprint.clone(),
    };
    let chunk = move |choices: Vec<ChatChunkChoice>, usage| header.chunk(choices, usage);
    if params.stream && !plan.as_ref().is_some_and(tools::Plan::buffered) {
        let choices = submitted.len();
        let tokenizer = info.clone();
        let wants_logprobs = params.sampling.logprobs.is_some();
        let delta_choice = move |index, delta, finish_reason, tokens: Vec<TokenLogprob>| ChatChunkChoice {
            index,
            delta,
            logprobs: wants_logprobs.then(|| logprobs::chat(&tokenizer.tokenizer, &tokens)),
            finish_reason,
        };
        let mut calls = plan.map(|p| tools::StreamedCalls::new(p.format, choices));
        // Log-probabilities of tokens whose text a tool parser holds back.
        let mut held: Vec<Vec<TokenLogprob>> = vec![Vec::new(); choices];
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
            Piece::Text(index, text, mut tokens) => {
                let (content, tool_calls) = match &mut calls {
                    Some(calls) => calls.push(index, &text),
                    None => (Some(text), None),
                };
                if content.is_none() && tool_calls.is_none() {
                    held[index].append(&mut tokens);
                    return None;
                }
                let mut all = std::mem::take(&mut held[index]);
                all.append(&mut tokens);
                let delta = Delta { role: None, content, tool_calls };
                chunk(vec![delta_choice(index, delta, None, all)], None)
            }
            Piece::Finish(index, reason, mut tokens) => {
                let (content, tool_calls) = match &mut calls {
                    Some(calls) => calls.finish(index),
                    None => (None, None),
                };
                let called = calls.as_ref().is_some_and(|c| c.called(index));
                let mut all = std::mem::take(&mut held[index]);
                all.append(&mut tokens);
                let delta = Delta { role: None, content, tool_calls };
                chunk(vec![delta_choice(index, delta, Some(finish_reason(reason, called)), all)], None)
            }
            Piece::Usage(usage) => chunk(Vec::new(), Some(usage)),
            Piece::Prompt(..) => None,
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
            let (content, calls) = match &plan {
                Some(plan) => {
                    let (content, calls) = tools::read_reply(plan.format, &choice.text);
                    let calls: Vec<_> = calls.iter().map(|c| c.to_openai(plan.format)).collect();
                    (content, Some(calls).filter(|c| !c.is_empty()))
                }
                None => (Some(choice.text), None),
            };
            let finish = finish_reason(choice.reason, calls.is_some());
            ChatChoice {
                index,
                logprobs,
                message: ChatMessage { role: "assistant", content, tool_calls: calls },
                finish_reason: Some(finish),
            }
        })
        .collect();
    if params.stream {
        // A reply read whole (tailor's JSON) streams whole: the role, then
        // its content or calls in one delta.
        let mut events = Vec::new();
        for c in &choices {
            let role = Delta { role: Some("assistant"), content: Some(String::new()), tool_calls: None };
            events.extend(chunk(
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
            events.extend(chunk(
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
            events.extend(chunk(Vec::new(), Some(collected.usage)));
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

/// `tool_calls` when the reply ended on its own after making calls.
fn finish_reason(reason: FinishReason, called: bool) -> &'static str {
    match reason {
        FinishReason::Stop if called => "tool_calls",
        other => other.as_str(),
    }
}

/// The conversation as the model will see it, and how its reply is read
/// for calls (None without tools). Chat and `/tokenize` share it.
pub fn chat_prompt(
    info: &ModelInfo,
    mut chat: ChatRequest,
    tools: Option<&tools::Tools>,
    parser: Option<ToolFormat>,
) -> Result<(Vec<u32>, Option<tools::Plan>), ApiError> {
    let Some(tools) = tools else { return Ok((render_chat(info, &chat)?, None)) };
    let shows_tools = shows_tools(info, &chat)?;
    let source = info.chat_template.as_ref().map(|t| t.source()).unwrap_or_default();
    let native = match parser {
        Some(ToolFormat::Generic) => None,
        Some(format) => shows_tools.then_some(format),
        None => shows_tools.then(|| ToolFormat::detect(source)),
    };
    let plan = tools.plan(native);
    let Some(instructions) = &plan.instructions else { return Ok((render_chat(info, &chat)?, Some(plan))) };
    tools::history::in_generic_format(&mut chat.messages);
    tools::describe_in_system_message(&mut chat.messages, instructions);
    Ok((render_chat(info, &chat)?, Some(plan)))
}

/// Whether the template shows `tools` to the model: a one-message
/// conversation renders differently with them (the request's own messages
/// may hold calls that only a tool-aware template can render).
fn shows_tools(info: &ModelInfo, chat: &ChatRequest) -> Result<bool, ApiError> {
    let probe = ChatRequest {
        messages: vec![serde_json::json!({"role": "user", "content": "Hello"})],
        add_generation_prompt: true,
        continue_final_message: false,
        ..chat.clone()
    };
    let without = ChatRequest { tools: None, ..probe.clone() };
    Ok(render_chat(info, &probe)? != render_chat(info, &without)?)
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
    params::refuse_if_set("functions", req.functions.as_ref())?;
    params::refuse_if_set("function_call", req.function_call.as_ref())?;
    params::refuse_if_set("audio", req.audio.as_ref())?;
    params::refuse_if_set("prediction", req.prediction.as_ref())?;
    Ok(())
}
