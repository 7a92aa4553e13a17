//! `POST /tokenize` and `POST /detokenize`, in vLLM's shapes.

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::chat::chat_prompt;
use super::error::{ApiError, ErrorEnvelope};
use super::json::AppJson;
use super::prompting::normalize_messages;
use super::types::{DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse};
use super::AppState;
use crate::loader::ModelInfo;
use crate::prompt::ChatRequest;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(tokenize)).routes(routes!(detokenize))
}

/// A prompt's or a conversation's token ids, as generation would use them (vLLM's route).
#[utoipa::path(post, path = "/tokenize", tag = "tokens", request_body = TokenizeRequest,
    responses((status = 200, body = TokenizeResponse), (status = 400, description = "Invalid request", body = ErrorEnvelope), (status = 401, description = "Missing or wrong API key", body = ErrorEnvelope), (status = 404, description = "Unknown model", body = ErrorEnvelope), (status = 429, description = "Too many requests waiting", body = ErrorEnvelope), (status = 503, description = "Loading or draining", body = ErrorEnvelope)))]
async fn tokenize(State(state): State<AppState>, AppJson(req): AppJson<TokenizeRequest>) -> Result<Response, ApiError> {
    let info = match &req.model {
        Some(model) => state.model_named(model)?,
        None => state.model()?,
    };
    let defaults = state.default_chat_template_kwargs.clone();
    let parser = state.tool_call_parser;
    // A big prompt's id list is megabytes of JSON: written off the async workers too.
    let body = state
        .blocking(move || {
            let tokens = tokenize_request(&info, &defaults, parser, &req)?;
            let response = TokenizeResponse { count: tokens.len(), tokens, max_model_len: info.max_model_len };
            serde_json::to_vec(&response).map_err(|e| ApiError::internal(format!("cannot write the response: {e}")))
        })
        .await?;
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

fn tokenize_request(
    info: &ModelInfo,
    default_kwargs: &serde_json::Map<String, serde_json::Value>,
    tool_call_parser: Option<super::tools::ToolFormat>,
    req: &TokenizeRequest,
) -> Result<Vec<u32>, ApiError> {
    Ok(match (&req.prompt, &req.messages) {
        (Some(prompt), None) => {
            let result = if req.add_special_tokens.unwrap_or(true) {
                info.tokenizer.encode_prompt(prompt)
            } else {
                info.tokenizer.encode(prompt)
            };
            result.map_err(|e| ApiError::invalid("prompt", format!("cannot tokenize: {e}")))?
        }
        (None, Some(messages)) => {
            let tools = super::tools::requested(req.tools.as_ref(), req.tool_choice.as_ref())?;
            let chat = ChatRequest {
                messages: normalize_messages(messages)?,
                tools: req.tools.clone(),
                add_generation_prompt: req.add_generation_prompt.unwrap_or(!req.continue_final_message),
                continue_final_message: req.continue_final_message,
                kwargs: {
                    let mut kwargs = default_kwargs.clone();
                    kwargs.extend(req.chat_template_kwargs.clone().unwrap_or_default());
                    kwargs
                },
                ..Default::default()
            };
            chat_prompt(info, chat, tools.as_ref(), tool_call_parser)?.0
        }
        _ => return Err(ApiError::bad_request("give exactly one of `prompt` and `messages`")),
    })
}

/// Token ids back to text (vLLM's route).
#[utoipa::path(post, path = "/detokenize", tag = "tokens", request_body = DetokenizeRequest,
    responses((status = 200, body = DetokenizeResponse), (status = 400, description = "Invalid request", body = ErrorEnvelope), (status = 401, description = "Missing or wrong API key", body = ErrorEnvelope), (status = 404, description = "Unknown model", body = ErrorEnvelope), (status = 429, description = "Too many requests waiting", body = ErrorEnvelope), (status = 503, description = "Loading or draining", body = ErrorEnvelope)))]
async fn detokenize(
    State(state): State<AppState>,
    AppJson(req): AppJson<DetokenizeRequest>,
) -> Result<Json<DetokenizeResponse>, ApiError> {
    let info = match &req.model {
        Some(model) => state.model_named(model)?,
        None => state.model()?,
    };
    let vocab = info.tokenizer.vocab_size() as u32;
    if let Some(bad) = req.tokens.iter().find(|&&t| t >= vocab) {
        return Err(ApiError::invalid("tokens", format!("token id {bad} is outside the vocabulary (size {vocab})")));
    }
    let prompt = state
        .blocking(move || {
            info.tokenizer
                .decode(&req.tokens, false)
                .map_err(|e| ApiError::invalid("tokens", format!("cannot decode: {e}")))
        })
        .await?;
    Ok(Json(DetokenizeResponse { prompt }))
}
