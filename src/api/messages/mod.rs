//! `POST /v1/messages`: Anthropic's Messages API. A request is translated
//! into a chat request and runs through the same [`ChatRun`] as chat
//! completions; replies, stream events and errors take Anthropic's shapes.

pub mod errors;
mod output;

use axum::response::{IntoResponse, Response};
use axum::{extract::State, Extension, Json};
use serde::Deserialize;
use serde_json::{json, Map, Value as Json_};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::chat::{ChatPrompt, ChatRun};
use super::error::ApiError;
use super::json::AppJson;
use super::observe::Facts;
use super::types::StreamEvent;
use super::{dialect, AppState};
use output::{Reply, Streamed};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(create)).routes(routes!(count_tokens))
}

/// A message as Anthropic's Messages API returns it.
#[derive(serde::Serialize, utoipa::ToSchema)]
#[allow(dead_code)] // the document's shape only
struct MessageObject {
    id: String,
    /// `message`.
    #[serde(rename = "type")]
    kind: String,
    /// `assistant`.
    role: String,
    model: String,
    /// Text and tool-use blocks.
    content: Vec<Json_>,
    /// `end_turn`, `max_tokens`, `stop_sequence` or `tool_use`.
    stop_reason: Option<String>,
    stop_sequence: Option<String>,
    usage: Json_,
}

/// What `count_tokens` answers.
#[derive(serde::Serialize, utoipa::ToSchema)]
struct TokenCount {
    input_tokens: usize,
}

/// Anthropic's error shape, on the Messages routes.
#[derive(serde::Serialize, utoipa::ToSchema)]
#[allow(dead_code)] // the document's shape only
struct AnthropicError {
    /// `error`.
    #[serde(rename = "type")]
    kind: String,
    /// `{"type": …, "message": …}`.
    error: Json_,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct MessagesRequest {
    #[schema(example = "SmolLM2-135M-Instruct.Q4_1")]
    pub model: String,
    #[schema(example = 8)]
    pub max_tokens: Option<i64>,
    #[schema(example = json!([{"role": "user", "content": "Hi"}]))]
    pub messages: Vec<Json_>,
    pub system: Option<Json_>,
    pub stop_sequences: Option<Vec<String>>,
    #[serde(default)]
    pub stream: bool,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub tools: Option<Vec<Json_>>,
    pub tool_choice: Option<Json_>,
    pub thinking: Option<Json_>,
}

/// Chat fields a Messages body may carry as they are (tailor's extensions).
const PASSED_ON: &[&str] = &[
    "adapters",
    "adapter_merge",
    "merged_adapters",
    "seed",
    "min_p",
    "repetition_penalty",
    "template",
    "template_vars",
    "chat_template_kwargs",
];

/// Chat's names for the fields, as the client named them.
const PARAMS: &[(&str, &str)] = &[("stop", "stop_sequences")];

/// Anthropic's Messages API over the same generation as chat.
#[utoipa::path(post, path = "/v1/messages", tag = "generation", request_body = MessagesRequest,
    responses((status = 200, description = "The message, or with `stream` its events as server-sent events",
        content((MessageObject = "application/json"), (StreamEvent = "text/event-stream"))), (status = 400, description = "Invalid request", body = AnthropicError), (status = 401, description = "Missing or wrong API key", body = AnthropicError), (status = 404, description = "Unknown model", body = AnthropicError), (status = 429, description = "Too many requests waiting", body = AnthropicError), (status = 503, description = "Loading or draining", body = AnthropicError)))]
async fn create(
    State(state): State<AppState>,
    Extension(facts): Extension<Facts>,
    AppJson(body): AppJson<Map<String, Json_>>,
) -> Result<Response, ApiError> {
    let req: MessagesRequest = super::json::from_map(&body)?;
    let chat = to_chat(&req, &body)?;
    let run = ChatRun::start(&state, facts, chat).await.map_err(|e| dialect::renamed(e, PARAMS))?;
    let reply = Reply::new(&req.model, run.prompt_tokens);
    if run.streams() {
        return run.stream(Streamed::new(reply)).await;
    }
    let whole = run.complete().await?;
    Ok(Json(reply.finished(&whole)).into_response())
}

/// `POST /v1/messages/count_tokens`: the prompt's length as the model will
/// see it (same rendering as `/v1/messages`; `max_tokens` is not needed).
#[utoipa::path(post, path = "/v1/messages/count_tokens", tag = "tokens", request_body = MessagesRequest,
    responses((status = 200, body = TokenCount), (status = 400, description = "Invalid request", body = AnthropicError), (status = 401, description = "Missing or wrong API key", body = AnthropicError), (status = 404, description = "Unknown model", body = AnthropicError), (status = 429, description = "Too many requests waiting", body = AnthropicError), (status = 503, description = "Loading or draining", body = AnthropicError)))]
async fn count_tokens(
    State(state): State<AppState>,
    Extension(facts): Extension<Facts>,
    AppJson(mut body): AppJson<Map<String, Json_>>,
) -> Result<Response, ApiError> {
    body.entry("max_tokens").or_insert(json!(1));
    body.remove("stream");
    let req: MessagesRequest = super::json::from_map(&body)?;
    let chat = to_chat(&req, &body)?;
    let prompt = ChatPrompt::render(&state, &facts, chat).await.map_err(|e| dialect::renamed(e, PARAMS))?;
    Ok(Json(TokenCount { input_tokens: prompt.ids.len() }).into_response())
}

/// The chat request this Messages request means.
fn to_chat(req: &MessagesRequest, body: &Map<String, Json_>) -> Result<super::types::ChatCompletionRequest, ApiError> {
    let max_tokens = req.max_tokens.ok_or_else(|| ApiError::invalid("max_tokens", "max_tokens: Field required"))?;
    if req.thinking.as_ref().is_some_and(|t| t.get("type").and_then(Json_::as_str) == Some("enabled")) {
        return Err(ApiError::unsupported("thinking", "(extended thinking)"));
    }
    let mut chat = dialect::passed_on(body, PASSED_ON);
    let messages = messages(req)?;
    // A final assistant turn is a prefill: the reply continues it.
    if messages.last().is_some_and(|m| m["role"] == "assistant") {
        chat.insert("continue_final_message".into(), json!(true));
        chat.insert("add_generation_prompt".into(), json!(false));
    }
    chat.insert("model".into(), json!(req.model));
    chat.insert("messages".into(), Json_::Array(messages));
    chat.insert("max_tokens".into(), json!(max_tokens));
    let fields = [
        ("temperature", req.temperature.map(Json_::from)),
        ("top_p", req.top_p.map(Json_::from)),
        ("top_k", req.top_k.map(Json_::from)),
        ("stop", req.stop_sequences.clone().map(Json_::from)),
    ];
    for (key, value) in fields {
        if let Some(value) = value {
            chat.insert(key.into(), value);
        }
    }
    if req.stream {
        chat.insert("stream".into(), json!(true));
        chat.insert("stream_options".into(), json!({"include_usage": true}));
    }
    if let Some(tools) = &req.tools {
        chat.insert("tools".into(), Json_::Array(tools.iter().enumerate().map(tool).collect::<Result<_, _>>()?));
    }
    if let Some(choice) = &req.tool_choice {
        chat.insert("tool_choice".into(), tool_choice(choice)?);
    }
    dialect::chat_request(chat)
}

/// `system` as the system message, then each turn; tool results become
/// chat's tool messages, tool uses the assistant's calls.
fn messages(req: &MessagesRequest) -> Result<Vec<Json_>, ApiError> {
    let mut messages = Vec::new();
    match &req.system {
        None | Some(Json_::Null) => {}
        Some(system) => messages.push(json!({"role": "system", "content": text_of(system, "system")?})),
    }
    if req.messages.is_empty() {
        return Err(ApiError::invalid("messages", "messages: at least one message is required"));
    }
    for (i, message) in req.messages.iter().enumerate() {
        let param = format!("messages.{i}");
        let role = message.get("role").and_then(Json_::as_str);
        let blocks = match message.get("content") {
            Some(Json_::String(text)) => vec![json!({"type": "text", "text": text})],
            Some(Json_::Array(blocks)) => blocks.clone(),
            _ => {
                return Err(ApiError::invalid(
                    format!("{param}.content"),
                    "content must be a string or a list of blocks",
                ))
            }
        };
        match role {
            Some("user") => user_turn(&mut messages, &blocks, &param)?,
            Some("assistant") => messages.push(assistant_turn(&blocks, &param)?),
            _ => return Err(ApiError::invalid(format!("{param}.role"), "role must be `user` or `assistant`")),
        }
    }
    Ok(messages)
}

fn block_kind(block: &Json_) -> &str {
    block.get("type").and_then(Json_::as_str).unwrap_or("unknown")
}

fn unsupported_block(param: &str, kind: &str) -> ApiError {
    ApiError::unsupported(param, &format!("a content block of type `{kind}` (text, tool_use and tool_result only)"))
}

/// A user turn: its tool results (as chat tool messages), then its text.
fn user_turn(messages: &mut Vec<Json_>, blocks: &[Json_], param: &str) -> Result<(), ApiError> {
    let mut parts = Vec::new();
    for (j, block) in blocks.iter().enumerate() {
        let at = format!("{param}.content.{j}");
        match block_kind(block) {
            "text" => parts.push(json!({"type": "text", "text": text_of(block, &at)?})),
            "tool_result" => {
                let id = block
                    .get("tool_use_id")
                    .and_then(Json_::as_str)
                    .ok_or_else(|| ApiError::invalid(format!("{at}.tool_use_id"), "tool_use_id must be a string"))?;
                let content = match block.get("content") {
                    None | Some(Json_::Null) => String::new(),
                    Some(content) => text_of(content, &format!("{at}.content"))?,
                };
                messages.push(json!({"role": "tool", "tool_call_id": id, "content": content}));
            }
            kind => return Err(unsupported_block(&at, kind)),
        }
    }
    if !parts.is_empty() {
        messages.push(json!({"role": "user", "content": parts}));
    }
    Ok(())
}

/// An assistant turn: its text, and its tool uses as chat's calls.
fn assistant_turn(blocks: &[Json_], param: &str) -> Result<Json_, ApiError> {
    let mut text = String::new();
    let mut calls = Vec::new();
    for (j, block) in blocks.iter().enumerate() {
        let at = format!("{param}.content.{j}");
        match block_kind(block) {
            "text" => text.push_str(&text_of(block, &at)?),
            "tool_use" => {
                let field = |name: &str| {
                    block
                        .get(name)
                        .and_then(Json_::as_str)
                        .ok_or_else(|| ApiError::invalid(format!("{at}.{name}"), format!("{name} must be a string")))
                };
                let input = block.get("input").cloned().unwrap_or_else(|| json!({}));
                calls.push(json!({
                    "id": field("id")?,
                    "type": "function",
                    "function": {"name": field("name")?, "arguments": input.to_string()},
                }));
            }
            kind => return Err(unsupported_block(&at, kind)),
        }
    }
    let mut message = json!({"role": "assistant", "content": text});
    if !calls.is_empty() {
        message["tool_calls"] = Json_::Array(calls);
    }
    Ok(message)
}

/// The text of a string, a text block, or a list of text blocks.
fn text_of(value: &Json_, param: &str) -> Result<String, ApiError> {
    match value {
        Json_::String(text) => Ok(text.clone()),
        Json_::Object(_) if block_kind(value) == "text" => value
            .get("text")
            .and_then(Json_::as_str)
            .map(String::from)
            .ok_or_else(|| ApiError::invalid(format!("{param}.text"), "text must be a string")),
        Json_::Array(blocks) => blocks
            .iter()
            .enumerate()
            .map(|(j, block)| match block_kind(block) {
                "text" => text_of(block, &format!("{param}.{j}")),
                kind => Err(unsupported_block(&format!("{param}.{j}"), kind)),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|texts| texts.join("\n")),
        _ => Err(ApiError::invalid(param, "expected a string or text blocks")),
    }
}

/// An Anthropic tool (`name`, `description`, `input_schema`) as a chat tool.
fn tool((i, tool): (usize, &Json_)) -> Result<Json_, ApiError> {
    if tool.get("type").and_then(Json_::as_str).is_some_and(|t| t != "custom") {
        return Err(ApiError::unsupported(
            &format!("tools.{i}"),
            "(server tools; only client tools with an input_schema)",
        ));
    }
    let Some(name) = tool.get("name").and_then(Json_::as_str) else {
        return Err(ApiError::invalid(format!("tools.{i}.name"), "name must be a string"));
    };
    let mut function = json!({"name": name, "parameters": tool.get("input_schema").cloned().unwrap_or_else(|| json!({"type": "object"}))});
    if let Some(description) = tool.get("description") {
        function["description"] = description.clone();
    }
    Ok(json!({"type": "function", "function": function}))
}

fn tool_choice(choice: &Json_) -> Result<Json_, ApiError> {
    match choice.get("type").and_then(Json_::as_str) {
        Some("auto") => Ok(json!("auto")),
        Some("any") => Ok(json!("required")),
        Some("none") => Ok(json!("none")),
        Some("tool") => match choice.get("name").and_then(Json_::as_str) {
            Some(name) => Ok(json!({"type": "function", "function": {"name": name}})),
            None => Err(ApiError::invalid("tool_choice.name", "name must be a string")),
        },
        _ => Err(ApiError::invalid("tool_choice", "tool_choice.type must be auto, any, tool or none")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat_of(body: Json_) -> Result<super::super::types::ChatCompletionRequest, ApiError> {
        let body = body.as_object().cloned().expect("an object");
        let req: MessagesRequest = super::super::json::from_map(&body)?;
        to_chat(&req, &body)
    }

    #[test]
    fn turns_and_tool_blocks_become_the_chat_conversation() {
        let chat = chat_of(json!({
            "model": "m", "max_tokens": 10, "system": [{"type": "text", "text": "Be brief."}],
            "stop_sequences": ["END"], "top_k": 5,
            "messages": [
                {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "t1", "name": "weather", "input": {"city": "Paris"}},
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "sunny"}]},
                    {"type": "text", "text": "And tomorrow?"},
                ]},
            ],
        }))
        .expect("translates");
        let roles: Vec<_> = chat.messages.iter().map(|m| m["role"].as_str().unwrap_or("")).collect();
        assert_eq!(roles, ["system", "user", "assistant", "tool", "user"]);
        assert_eq!(chat.messages[2]["tool_calls"][0]["function"]["arguments"], r#"{"city":"Paris"}"#);
        assert_eq!(chat.messages[3]["content"], "sunny");
        assert_eq!(chat.max_tokens, Some(10));
        assert_eq!(chat.sampling.top_k, Some(5));
        assert!(!chat.continue_final_message);
    }

    #[test]
    fn a_final_assistant_turn_is_continued() {
        let chat = chat_of(json!({"model": "m", "max_tokens": 5, "messages": [
            {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Arr"}]}))
        .expect("translates");
        assert!(chat.continue_final_message);
        assert_eq!(chat.add_generation_prompt, Some(false));
    }

    #[test]
    fn bad_requests_name_their_field() {
        for (body, param) in [
            (json!({"model": "m", "messages": [{"role": "user", "content": "Hi"}]}), "max_tokens"),
            (json!({"model": "m", "max_tokens": 5, "messages": []}), "messages"),
            (
                json!({"model": "m", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}),
                "messages.0.role",
            ),
            (
                json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image"}]}]}),
                "messages.0.content.0",
            ),
            (json!({"model": "m", "max_tokens": "x", "messages": []}), "max_tokens"),
        ] {
            let err = chat_of(body.clone()).expect_err("refused");
            assert_eq!(err.status, axum::http::StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(err.param.as_deref(), Some(param), "{body}: {err:?}");
        }
    }
}
