//! `POST /v1/chat/completions`: messages rendered through the chat template.
//! The Responses and Messages APIs run through the same [`ChatRun`].

use std::sync::Arc;

use axum::response::sse::Event as SseEvent;
use axum::response::{IntoResponse, Response};
use axum::{extract::State, Extension, Json};
use serde_json::Value as Json_;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiError, ErrorEnvelope};
use super::generate::{self, Piece, Submitted, Wire};
use super::json::WithSampling;
use super::logprobs;
use super::observe::Facts;
use super::params::{self, Validated};
use super::tools::{self, ToolFormat};
use super::types::ChatCompletionBody;
use super::types::StreamEvent;
use super::types::{
    ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, ChatMessage,
    ChunkHeader, Delta,
};
use super::{prompting, AppState, Target};
use crate::engine::{FinishReason, TokenLogprob};
use crate::ids::{response_id, unix_now};
use crate::loader::ModelInfo;
use crate::prompt::ChatRequest;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(chat_completions))
}

/// A reply to a conversation (with tools, structured output, an adapter, a
/// template or a preset as `model` names).
#[utoipa::path(post, path = "/v1/chat/completions", tag = "generation", request_body = ChatCompletionBody,
    responses((status = 200, description = "The reply, or with `stream` its chunks as server-sent events",
        content((ChatCompletionResponse = "application/json"), (StreamEvent = "text/event-stream"))), (status = 400, description = "Invalid request", body = ErrorEnvelope), (status = 401, description = "Missing or wrong API key", body = ErrorEnvelope), (status = 404, description = "Unknown model", body = ErrorEnvelope), (status = 429, description = "Too many requests waiting", body = ErrorEnvelope), (status = 503, description = "Loading or draining", body = ErrorEnvelope)))]
async fn chat_completions(
    State(state): State<AppState>,
    Extension(facts): Extension<Facts>,
    WithSampling(req): WithSampling<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    let run = ChatRun::start(&state, facts, req).await?;
    if run.streams() {
        return run.stream(OpenAiChunks).await;
    }
    Ok(Json(run.complete().await?).into_response())
}

/// A chat request submitted to the engine. Chat completions, the Responses
/// API and the Messages API all run through it; only their wire formats differ.
pub struct ChatRun {
    state: AppState,
    facts: Facts,
    info: Arc<ModelInfo>,
    params: Validated,
    plan: Option<tools::Plan>,
    submitted: Vec<Submitted>,
    header: ChunkHeader,
    /// The rendered conversation's length.
    pub prompt_tokens: usize,
}

impl ChatRun {
    /// Resolves the target, renders and tokenizes the conversation, validates
    /// everything, and queues the generation.
    pub async fn start(state: &AppState, facts: Facts, req: ChatCompletionRequest) -> Result<Self, ApiError> {
        let ChatPrompt { target, mut params, req, ids, plan } = ChatPrompt::render(state, &facts, req).await?;
        let info = target.info.clone();
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
        let constraints = generate::constraints(state, &info, response_format, params.n).await?;
        let prompt_tokens = ids.len();
        let submitted = generate::submit_all(state, &target, vec![(ids, max_tokens)], &params, constraints)?;
        let header = ChunkHeader {
            id: response_id("chatcmpl"),
            object: "chat.completion.chunk",
            created: unix_now(),
            model: req.model,
            system_fingerprint: target.fingerprint.clone(),
        };
        Ok(Self { state: state.clone(), facts, info, params, plan, submitted, header, prompt_tokens })
    }

    /// Whether the client asked for a stream.
    pub fn streams(&self) -> bool {
        self.params.stream
    }

    /// Streams the reply as chat chunks, each written by `wire`. A reply that
    /// is read whole (tailor's JSON tool calls) streams whole: the role, then
    /// its content or calls in one delta.
    pub async fn stream(self, mut wire: impl Wire<ChatCompletionChunk>) -> Result<Response, ApiError> {
        if !self.plan.as_ref().is_some_and(tools::Plan::buffered) {
            let choices = self.submitted.len();
            let chunks = ChatChunks {
                header: self.header,
                info: self.info,
                wants_logprobs: self.params.sampling.logprobs.is_some(),
                calls: self.plan.map(|p| tools::StreamedCalls::new(p.format, choices)),
                held: vec![Vec::new(); choices],
                wire,
            };
            let delivery = generate::Delivery::new(&self.state, self.facts);
            return Ok(generate::sse(self.submitted, delivery, self.params.include_usage, chunks).into_response());
        }
        let include_usage = self.params.include_usage;
        let header = self.header.clone();
        let whole = self.complete().await?;
        let mut events = Vec::new();
        for c in whole.choices {
            let role = Delta { role: Some("assistant"), content: Some(String::new()), tool_calls: None };
            let start =
                ChatChunkChoice { index: c.index, delta: role, logprobs: None, finish_reason: None, stop_reason: None };
            events.extend(wire.piece(header.envelope(vec![start], None)));
            let calls = c.message.tool_calls.map(|calls| {
                calls
                    .into_iter()
                    .enumerate()
                    .map(|(i, mut call)| {
                        call["index"] = serde_json::json!(i);
                        call
                    })
                    .collect()
            });
            let delta = Delta { role: None, content: c.message.content, tool_calls: calls };
            let body = ChatChunkChoice {
                index: c.index,
                delta,
                logprobs: c.logprobs,
                finish_reason: c.finish_reason,
                stop_reason: c.stop_reason,
            };
            events.extend(wire.piece(header.envelope(vec![body], None)));
        }
        if include_usage {
            events.extend(wire.piece(header.envelope(Vec::new(), Some(whole.usage))));
        }
        events.extend(wire.done());
        Ok(generate::sse_of(events).into_response())
    }

    /// Waits for the whole reply.
    pub async fn complete(self) -> Result<ChatCompletionResponse, ApiError> {
        let collected = generate::collect(self.submitted, generate::Delivery::new(&self.state, self.facts)).await?;
        let info = &self.info;
        let plan = &self.plan;
        let wants_logprobs = self.params.sampling.logprobs.is_some();
        let choices: Vec<ChatChoice> = collected
            .choices
            .into_iter()
            .enumerate()
            .map(|(index, choice)| {
                let logprobs = wants_logprobs.then(|| logprobs::chat(&info.tokenizer, &choice.logprobs));
                let (content, calls) = match plan {
                    Some(plan) => {
                        let (content, calls) = tools::read_reply(plan.format, &choice.text);
                        let calls: Vec<_> = calls.iter().map(|c| c.to_openai(plan.format)).collect();
                        (content, Some(calls).filter(|c| !c.is_empty()))
                    }
                    None => (Some(choice.text), None),
                };
                let finish = finish_reason(choice.ending.reason, calls.is_some());
                ChatChoice {
                    index,
                    logprobs,
                    message: ChatMessage { role: "assistant", content, tool_calls: calls },
                    finish_reason: Some(finish),
                    stop_reason: choice.ending.stop,
                }
            })
            .collect();
        let h = self.header;
        Ok(ChatCompletionResponse {
            id: h.id,
            object: "chat.completion",
            created: h.created,
            model: h.model,
            system_fingerprint: h.system_fingerprint,
            choices,
            usage: collected.usage,
        })
    }
}

/// A chat request resolved, validated and rendered: what the model will
/// see, before anything is queued (`/v1/messages/count_tokens` stops here).
pub struct ChatPrompt {
    pub target: Target,
    pub params: Validated,
    pub req: ChatCompletionRequest,
    pub ids: Vec<u32>,
    pub plan: Option<tools::Plan>,
}

impl ChatPrompt {
    pub async fn render(state: &AppState, facts: &Facts, req: ChatCompletionRequest) -> Result<Self, ApiError> {
        let mut req = req;
        let (target, mut params) = prompting::prepare(state, facts, &mut req).await?;
        facts.resolved(&target);
        refuse_unsupported(&req)?;
        params.sampling.logprobs = logprobs::chat_request(req.logprobs, req.top_logprobs.as_ref())?;
        let tools = tools::requested(req.tools.as_ref(), req.tool_choice.as_ref())?;
        let kwargs = merged_kwargs(state, &target, req.chat_template_kwargs.as_ref());
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
        Ok(Self { target, params, req, ids, plan })
    }
}

/// Turns a generation's pieces into chat chunks, read for tool calls when
/// the request has tools, and hands them to a wire format.
struct ChatChunks<W> {
    header: ChunkHeader,
    info: Arc<ModelInfo>,
    wants_logprobs: bool,
    calls: Option<tools::StreamedCalls>,
    /// Log-probabilities of tokens whose text a tool parser holds back.
    held: Vec<Vec<TokenLogprob>>,
    wire: W,
}

impl<W> ChatChunks<W> {
    fn choice(
        &self,
        index: usize,
        delta: Delta,
        ending: Option<(&'static str, Option<String>)>,
        tokens: Vec<TokenLogprob>,
    ) -> ChatCompletionChunk {
        let (finish_reason, stop_reason) = match ending {
            Some((reason, stop)) => (Some(reason), stop),
            None => (None, None),
        };
        let logprobs = self.wants_logprobs.then(|| logprobs::chat(&self.info.tokenizer, &tokens));
        self.header.envelope(vec![ChatChunkChoice { index, delta, logprobs, finish_reason, stop_reason }], None)
    }

    fn chunk(&mut self, piece: Piece) -> Option<ChatCompletionChunk> {
        match piece {
            Piece::Start(index) => {
                let role = Delta { role: Some("assistant"), content: Some(String::new()), tool_calls: None };
                Some(self.choice(index, role, None, Vec::new()))
            }
            Piece::Text(index, text, mut tokens) => {
                let (content, tool_calls) = match &mut self.calls {
                    Some(calls) => calls.push(index, &text),
                    None => (Some(text), None),
                };
                if content.is_none() && tool_calls.is_none() {
                    self.held[index].append(&mut tokens);
                    return None;
                }
                let mut all = std::mem::take(&mut self.held[index]);
                all.append(&mut tokens);
                Some(self.choice(index, Delta { role: None, content, tool_calls }, None, all))
            }
            Piece::Finish(index, ending, mut tokens) => {
                let (content, tool_calls) = match &mut self.calls {
                    Some(calls) => calls.finish(index),
                    None => (None, None),
                };
                let called = self.calls.as_ref().is_some_and(|c| c.called(index));
                let mut all = std::mem::take(&mut self.held[index]);
                all.append(&mut tokens);
                let finish = (finish_reason(ending.reason, called), ending.stop);
                Some(self.choice(index, Delta { role: None, content, tool_calls }, Some(finish), all))
            }
            Piece::Usage(usage) => Some(self.header.envelope(Vec::new(), Some(usage))),
            Piece::Prompt(..) => None,
        }
    }
}

impl<W: Wire<ChatCompletionChunk>> Wire<Piece> for ChatChunks<W> {
    fn piece(&mut self, piece: Piece) -> Vec<SseEvent> {
        match self.chunk(piece) {
            Some(chunk) => self.wire.piece(chunk),
            None => Vec::new(),
        }
    }

    fn failed(&mut self, error: &ApiError) -> Vec<SseEvent> {
        self.wire.failed(error)
    }

    fn done(&mut self) -> Vec<SseEvent> {
        self.wire.done()
    }
}

/// OpenAI's chat stream: each chunk as a `data:` line, then `[DONE]`.
struct OpenAiChunks;

impl Wire<ChatCompletionChunk> for OpenAiChunks {
    fn piece(&mut self, chunk: ChatCompletionChunk) -> Vec<SseEvent> {
        serde_json::to_string(&chunk).map(|data| SseEvent::default().data(data)).into_iter().collect()
    }

    fn failed(&mut self, error: &ApiError) -> Vec<SseEvent> {
        generate::openai_failed(error)
    }

    fn done(&mut self) -> Vec<SseEvent> {
        generate::openai_done()
    }
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
    let Some(tools) = tools else {
        // No call can be made now (`tool_choice: "none"`, or no tools), but
        // the history may hold earlier calls and results: a template that
        // cannot show them gets them as plain turns in the generic format.
        if tools::history::has_tool_turns(&chat.messages) && !shows_tools(info, &chat)? {
            tools::history::in_generic_format(&mut chat.messages);
        }
        return Ok((render_chat(info, &chat)?, None));
    };
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

/// Whether the template shows tools to the model: a one-message
/// conversation renders differently with them (the request's own messages
/// may hold calls that only a tool-aware template can render). Probed with
/// the request's tools, or one made up when it lists none.
fn shows_tools(info: &ModelInfo, chat: &ChatRequest) -> Result<bool, ApiError> {
    let probe_tools = chat.tools.clone().filter(|t| t.as_array().is_some_and(|a| !a.is_empty())).unwrap_or_else(|| {
        serde_json::json!([{"type": "function", "function": {"name": "probe", "description": "A probe.",
            "parameters": {"type": "object", "properties": {}}}}])
    });
    let probe = ChatRequest {
        messages: vec![serde_json::json!({"role": "user", "content": "Hello"})],
        tools: Some(probe_tools),
        documents: chat.documents.clone(),
        add_generation_prompt: true,
        continue_final_message: false,
        kwargs: chat.kwargs.clone(),
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
