//! `POST /v1/responses`: OpenAI's Responses API, stateless. A request is
//! translated into a chat request and runs through the same [`ChatRun`] as
//! chat completions (same prompt assembly, presets, validation, engine);
//! only the wire format differs (`output`).

mod output;

use axum::response::{IntoResponse, Response};
use axum::{extract::State, Extension, Json};
use serde::Deserialize;
use serde_json::{json, Map, Value as Json_};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::chat::ChatRun;
use super::error::{ApiError, ErrorEnvelope};
use super::json::AppJson;
use super::observe::Facts;
use super::types::StreamEvent;
use super::{dialect, AppState};
use output::{Shell, Streamed};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(create))
}

/// A response as OpenAI's Responses API returns it (the fields every
/// response carries; the request's settings are echoed beside them).
#[derive(serde::Serialize, utoipa::ToSchema)]
#[allow(dead_code)] // the document's shape only
struct ResponseObject {
    id: String,
    /// `response`.
    object: String,
    created_at: u64,
    /// `completed` or `incomplete` (`in_progress` while streaming).
    status: String,
    model: String,
    #[schema(value_type = Option<Object>)]
    error: Option<Json_>,
    #[schema(value_type = Option<Object>)]
    incomplete_details: Option<Json_>,
    /// Message and function-call items.
    output: Vec<Json_>,
    #[schema(value_type = Option<Object>)]
    usage: Option<Json_>,
}

/// The fields read here; the rest of the body is read as raw JSON so that
/// tailor's extensions (`stop`, `seed`, `top_k`, `template`, ...) pass on to
/// the chat request as they are.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct ResponsesRequest {
    #[schema(example = "SmolLM2-135M-Instruct.Q4_1")]
    pub model: String,
    #[schema(example = "Hi")]
    pub input: Option<Json_>,
    pub instructions: Option<String>,
    #[schema(example = 8)]
    pub max_output_tokens: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_logprobs: Option<i64>,
    #[serde(default)]
    pub stream: bool,
    pub text: Option<TextOptions>,
    pub tools: Option<Vec<Json_>>,
    pub tool_choice: Option<Json_>,
    pub parallel_tool_calls: Option<bool>,
    pub include: Option<Vec<String>>,
    pub metadata: Option<Map<String, Json_>>,
    pub user: Option<String>,
    pub previous_response_id: Option<String>,
    pub store: Option<bool>,
    pub background: Option<bool>,
    pub truncation: Option<String>,
    pub conversation: Option<Json_>,
    pub prompt: Option<Json_>,
}

#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
pub struct TextOptions {
    pub format: Option<Json_>,
}

/// Chat fields a Responses body may carry as they are (tailor's and vLLM's extensions).
const PASSED_ON: &[&str] = &[
    "adapters",
    "adapter_merge",
    "merged_adapters",
    "stop",
    "seed",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "template",
    "template_vars",
    "chat_template_kwargs",
];

/// Chat's names for the fields, as the client named them.
const PARAMS: &[(&str, &str)] =
    &[("max_tokens", "max_output_tokens"), ("response_format", "text.format"), ("messages", "input")];

/// OpenAI's Responses API over the same generation as chat (stateless:
/// `previous_response_id`, `store` and background runs are refused).
#[utoipa::path(post, path = "/v1/responses", tag = "generation", request_body = ResponsesRequest,
    responses((status = 200, description = "The response, or with `stream` its events as server-sent events",
        content((ResponseObject = "application/json"), (StreamEvent = "text/event-stream"))), (status = 400, description = "Invalid request", body = ErrorEnvelope), (status = 401, description = "Missing or wrong API key", body = ErrorEnvelope), (status = 404, description = "Unknown model", body = ErrorEnvelope), (status = 429, description = "Too many requests waiting", body = ErrorEnvelope), (status = 503, description = "Loading or draining", body = ErrorEnvelope)))]
async fn create(
    State(state): State<AppState>,
    Extension(facts): Extension<Facts>,
    AppJson(body): AppJson<Map<String, Json_>>,
) -> Result<Response, ApiError> {
    let req: ResponsesRequest = super::json::from_map(&body)?;
    refuse_stateful(&req)?;
    let chat = to_chat(&req, &body)?;
    let shell = Shell::new(&req);
    let run = ChatRun::start(&state, facts, chat).await.map_err(|e| dialect::renamed(e, PARAMS))?;
    let input_tokens = run.prompt_tokens;
    if run.streams() {
        return run.stream(Streamed::new(shell, input_tokens)).await;
    }
    let whole = run.complete().await?;
    Ok(Json(shell.finished(&whole)).into_response())
}

/// What needs server-side state, which this server does not keep.
fn refuse_stateful(req: &ResponsesRequest) -> Result<(), ApiError> {
    let stateless = |param: &str, what: &str| ApiError {
        code: Some("unsupported_parameter"),
        ..ApiError::invalid(
            param,
            format!("{what}: this server's Responses API is stateless; send the whole conversation in `input`"),
        )
    };
    if req.previous_response_id.is_some() {
        return Err(stateless("previous_response_id", "`previous_response_id` is not supported"));
    }
    if req.store == Some(true) {
        return Err(stateless("store", "`store: true` is not supported (responses are not kept)"));
    }
    if req.conversation.is_some() {
        return Err(stateless("conversation", "`conversation` is not supported"));
    }
    if req.background == Some(true) {
        return Err(ApiError::unsupported("background", "(background responses)"));
    }
    if req.prompt.is_some() {
        return Err(ApiError::unsupported("prompt", "(stored prompt ids; name a tailor `template` instead)"));
    }
    if req.truncation.as_deref().is_some_and(|t| t != "disabled") {
        return Err(ApiError::invalid(
            "truncation",
            "only `truncation: \"disabled\"` is supported: a conversation longer than the context is a 400",
        ));
    }
    Ok(())
}

/// The chat request this Responses request means.
fn to_chat(req: &ResponsesRequest, body: &Map<String, Json_>) -> Result<super::types::ChatCompletionRequest, ApiError> {
    let mut chat = dialect::passed_on(body, PASSED_ON);
    chat.insert("model".into(), json!(req.model));
    chat.insert("messages".into(), Json_::Array(messages(req)?));
    let copy = |chat: &mut Map<String, Json_>, key: &str, value: Option<Json_>| {
        if let Some(value) = value {
            chat.insert(key.into(), value);
        }
    };
    copy(&mut chat, "max_tokens", req.max_output_tokens.map(Json_::from));
    copy(&mut chat, "temperature", req.temperature.map(Json_::from));
    copy(&mut chat, "top_p", req.top_p.map(Json_::from));
    let wants_logprobs = req.include.iter().flatten().any(|i| i == "message.output_text.logprobs");
    if wants_logprobs || req.top_logprobs.is_some() {
        chat.insert("logprobs".into(), json!(true));
        copy(&mut chat, "top_logprobs", req.top_logprobs.map(Json_::from));
    }
    if req.stream {
        chat.insert("stream".into(), json!(true));
        chat.insert("stream_options".into(), json!({"include_usage": true}));
    }
    copy(&mut chat, "response_format", response_format(req.text.as_ref())?);
    if let Some(tools) = &req.tools {
        chat.insert("tools".into(), Json_::Array(tools.iter().enumerate().map(tool).collect::<Result<_, _>>()?));
    }
    copy(&mut chat, "tool_choice", req.tool_choice.as_ref().map(tool_choice).transpose()?);
    dialect::chat_request(chat)
}

/// `instructions` as the system message, then `input` (a string or items).
fn messages(req: &ResponsesRequest) -> Result<Vec<Json_>, ApiError> {
    let mut messages = Vec::new();
    if let Some(instructions) = &req.instructions {
        messages.push(json!({"role": "system", "content": instructions}));
    }
    match &req.input {
        None | Some(Json_::Null) => {}
        Some(Json_::String(text)) => messages.push(json!({"role": "user", "content": text})),
        Some(Json_::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                input_item(&mut messages, item, &format!("input[{i}]"))?;
            }
        }
        Some(_) => return Err(ApiError::invalid("input", "`input` must be a string or a list of items")),
    }
    Ok(messages)
}

/// One input item onto the chat messages: a message, a function call the
/// model made (joined to the assistant turn it belongs to), or its output.
fn input_item(messages: &mut Vec<Json_>, item: &Json_, param: &str) -> Result<(), ApiError> {
    let field = |name: &str| item.get(name).and_then(Json_::as_str);
    let needs = |name: &str| {
        field(name).ok_or_else(|| ApiError::invalid(format!("{param}.{name}"), format!("`{name}` must be a string")))
    };
    match field("type").unwrap_or("message") {
        "message" => {
            let role = match needs("role")? {
                "developer" | "system" => "system",
                role @ ("user" | "assistant") => role,
                other => {
                    return Err(ApiError::invalid(
                        format!("{param}.role"),
                        format!("unknown role `{other}` (user, assistant, system or developer)"),
                    ))
                }
            };
            let content = content(item.get("content"), &format!("{param}.content"))?;
            messages.push(json!({"role": role, "content": content}));
        }
        "function_call" => {
            let call = json!({
                "id": needs("call_id")?,
                "type": "function",
                "function": {"name": needs("name")?, "arguments": needs("arguments")?},
            });
            match messages.last_mut() {
                Some(last) if last["role"] == "assistant" => match last.get_mut("tool_calls") {
                    Some(Json_::Array(calls)) => calls.push(call),
                    _ => last["tool_calls"] = json!([call]),
                },
                _ => messages.push(json!({"role": "assistant", "content": null, "tool_calls": [call]})),
            }
        }
        "function_call_output" => {
            let output = content(item.get("output"), &format!("{param}.output"))?;
            messages.push(json!({"role": "tool", "tool_call_id": needs("call_id")?, "content": output}));
        }
        other => {
            return Err(ApiError::unsupported(
                &format!("{param}.type"),
                &format!("`{other}` (input items may be messages, function calls and their outputs)"),
            ))
        }
    }
    Ok(())
}

/// A message's content as chat content: a string, or its text parts.
fn content(content: Option<&Json_>, param: &str) -> Result<Json_, ApiError> {
    match content {
        Some(Json_::String(text)) => Ok(json!(text)),
        Some(Json_::Array(parts)) => parts
            .iter()
            .enumerate()
            .map(|(i, part)| {
                let kind = part.get("type").and_then(Json_::as_str).unwrap_or("unknown");
                match (kind, part.get("text").and_then(Json_::as_str)) {
                    ("input_text" | "output_text" | "text", Some(text)) => Ok(json!({"type": "text", "text": text})),
                    _ => Err(ApiError::unsupported(
                        &format!("{param}[{i}]"),
                        &format!("a content part of type `{kind}` (only text parts)"),
                    )),
                }
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Json_::Array),
        _ => Err(ApiError::invalid(param, "content must be a string or a list of text parts")),
    }
}

/// `text.format` as chat's `response_format`.
fn response_format(text: Option<&TextOptions>) -> Result<Option<Json_>, ApiError> {
    let Some(format) = text.and_then(|t| t.format.as_ref()) else { return Ok(None) };
    match format.get("type").and_then(Json_::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(json!({"type": "json_object"}))),
        Some("json_schema") => {
            let mut schema = format.clone();
            if let Some(fields) = schema.as_object_mut() {
                fields.remove("type");
            }
            Ok(Some(json!({"type": "json_schema", "json_schema": schema})))
        }
        _ => Err(ApiError::invalid("text.format", "`text.format.type` must be text, json_object or json_schema")),
    }
}

/// A Responses function tool (flat) as a chat tool (nested under `function`).
fn tool((i, tool): (usize, &Json_)) -> Result<Json_, ApiError> {
    match tool.get("type").and_then(Json_::as_str) {
        Some("function") => {
            let mut function = tool.clone();
            if let Some(fields) = function.as_object_mut() {
                fields.remove("type");
            }
            Ok(json!({"type": "function", "function": function}))
        }
        other => Err(ApiError::unsupported(
            &format!("tools[{i}]"),
            &format!("a tool of type `{}` (only function tools)", other.unwrap_or("unknown")),
        )),
    }
}

fn tool_choice(choice: &Json_) -> Result<Json_, ApiError> {
    match choice {
        Json_::String(_) => Ok(choice.clone()),
        Json_::Object(o) if o.get("type").and_then(Json_::as_str) == Some("function") => {
            let name = o.get("name").and_then(Json_::as_str).ok_or_else(|| {
                ApiError::invalid("tool_choice", "a named `tool_choice` is {\"type\": \"function\", \"name\": ...}")
            })?;
            Ok(json!({"type": "function", "function": {"name": name}}))
        }
        _ => Err(ApiError::invalid("tool_choice", "`tool_choice` must be none, auto, required or a function")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat_of(body: Json_) -> Result<super::super::types::ChatCompletionRequest, ApiError> {
        let body = body.as_object().cloned().expect("an object");
        let req: ResponsesRequest = super::super::json::from_map(&body)?;
        refuse_stateful(&req)?;
        to_chat(&req, &body)
    }

    #[test]
    fn items_become_the_chat_conversation() {
        let chat = chat_of(json!({
            "model": "m",
            "instructions": "Be brief.",
            "input": [
                {"role": "developer", "content": "Use tools."},
                {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
                {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": "{}"},
                {"type": "function_call", "call_id": "c2", "name": "time", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
            ],
            "max_output_tokens": 9,
            "stop": ["\n"],
        }))
        .expect("translates");
        let roles: Vec<_> = chat.messages.iter().map(|m| m["role"].as_str().unwrap_or("")).collect();
        assert_eq!(roles, ["system", "system", "user", "assistant", "tool"]);
        assert_eq!(chat.messages[0]["content"], "Be brief.");
        assert_eq!(chat.messages[2]["content"], json!([{"type": "text", "text": "Weather?"}]));
        assert_eq!(chat.messages[3]["tool_calls"].as_array().map(Vec::len), Some(2));
        assert_eq!(chat.messages[4]["tool_call_id"], "c1");
        assert_eq!(chat.max_tokens, Some(9));
        assert!(matches!(chat.sampling.stop, Some(super::super::types::StringOrList::Many(_))));
    }

    #[test]
    fn formats_and_tools_map_onto_chat() {
        let chat = chat_of(json!({
            "model": "m", "input": "hi",
            "text": {"format": {"type": "json_schema", "name": "a", "schema": {"type": "object"}, "strict": true}},
            "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
            "tool_choice": {"type": "function", "name": "f"},
        }))
        .expect("translates");
        assert_eq!(
            chat.response_format,
            Some(
                json!({"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}, "strict": true}})
            )
        );
        assert_eq!(
            chat.tools,
            Some(json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]))
        );
        assert_eq!(chat.tool_choice, Some(json!({"type": "function", "function": {"name": "f"}})));
    }

    #[test]
    fn state_and_other_input_kinds_are_refused_by_name() {
        for (body, param) in [
            (json!({"model": "m", "input": "hi", "previous_response_id": "resp_1"}), "previous_response_id"),
            (json!({"model": "m", "input": "hi", "store": true}), "store"),
            (
                json!({"model": "m", "input": [{"role": "user", "content": [{"type": "input_image"}]}]}),
                "input[0].content[0]",
            ),
            (json!({"model": "m", "input": [{"type": "reasoning"}]}), "input[0].type"),
            (json!({"model": "m", "input": "hi", "tools": [{"type": "web_search"}]}), "tools[0]"),
            (json!({"model": "m", "input": 3}), "input"),
            (json!({"model": "m", "input": "hi", "max_output_tokens": "x"}), "max_output_tokens"),
        ] {
            let err = chat_of(body.clone()).expect_err("refused");
            assert_eq!(err.status, axum::http::StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(err.param.as_deref(), Some(param), "{body}: {err:?}");
        }
        assert!(chat_of(json!({"model": "m", "input": "hi", "store": false})).is_ok());
    }
}
