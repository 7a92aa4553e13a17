//! Anthropic's error shape, `{"type": "error", "error": {"type", "message"}}`,
//! for every error a Messages route returns: the handler's own, and those of
//! the layers in front of it (keys, draining, body limit, unknown routes).

use axum::body::{to_bytes, Body};
use axum::extract::Request;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use serde_json::{json, Value as Json};

use crate::api::error::ApiError;
use crate::api::observe::REQUEST_ID;

/// Errors larger than this are not rewritten (ours are a few hundred bytes).
const MAX_ERROR_BYTES: usize = 64 * 1024;

/// Anthropic's error type for a status.
fn kind(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 | 405 | 415 | 422 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        _ => "api_error",
    }
}

/// The error body, with the request id when there is one.
pub fn body(error: &ApiError, request_id: Option<&str>) -> Json {
    let message = match error.param.as_deref().filter(|p| !p.is_empty()) {
        Some(param) if !error.message.contains(param) => format!("{param}: {}", error.message),
        _ => error.message.clone(),
    };
    let mut body = json!({"type": "error", "error": {"type": kind(error.status), "message": message}});
    if let Some(id) = request_id {
        body["request_id"] = json!(id);
    }
    body
}

/// Rewrites OpenAI-shaped errors on `/v1/messages` routes into Anthropic's shape.
pub async fn anthropic_shape(request: Request, next: Next) -> Response {
    if !request.uri().path().starts_with("/v1/messages") {
        return next.run(request).await;
    }
    let request_id = request.headers().get(REQUEST_ID).and_then(|v| v.to_str().ok()).map(String::from);
    let response = next.run(request).await;
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let (mut parts, body_in) = response.into_parts();
    let Ok(bytes) = to_bytes(body_in, MAX_ERROR_BYTES).await else {
        return Response::from_parts(parts, Body::empty());
    };
    let Some(error) = openai_error(status, &bytes) else { return Response::from_parts(parts, Body::from(bytes)) };
    let rewritten = body(&error, request_id.as_deref()).to_string();
    parts.headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(rewritten))
}

/// The error an OpenAI envelope carries.
fn openai_error(status: StatusCode, bytes: &[u8]) -> Option<ApiError> {
    let envelope: Json = serde_json::from_slice(bytes).ok()?;
    let error = envelope.get("error")?;
    Some(ApiError {
        status,
        message: error.get("message")?.as_str()?.to_string(),
        kind: "invalid_request_error",
        param: error.get("param").and_then(Json::as_str).map(String::from),
        code: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_anthropic_error_types() {
        let error = |status| ApiError { status, ..ApiError::invalid("max_tokens", "Field required") };
        assert_eq!(
            body(&error(StatusCode::BAD_REQUEST), Some("req_1")),
            json!({"type": "error", "error": {"type": "invalid_request_error", "message": "max_tokens: Field required"}, "request_id": "req_1"})
        );
        assert_eq!(body(&error(StatusCode::UNAUTHORIZED), None)["error"]["type"], "authentication_error");
        assert_eq!(body(&error(StatusCode::NOT_FOUND), None)["error"]["type"], "not_found_error");
        assert_eq!(body(&error(StatusCode::TOO_MANY_REQUESTS), None)["error"]["type"], "rate_limit_error");
        assert_eq!(body(&error(StatusCode::INTERNAL_SERVER_ERROR), None)["error"]["type"], "api_error");
    }
}
