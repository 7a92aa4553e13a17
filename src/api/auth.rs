//! API keys. With `--api-key`, every route but `/health`, `/metrics` and
//! the playground's static files needs `Authorization: Bearer <key>` (or
//! Anthropic's `x-api-key: <key>`). Once any key is configured, the routes
//! that change the server's state, and the fine-tuning API, need an admin
//! key (`--admin-api-key`, which also opens every other route): the plain
//! key gets 403 there, and so does everyone when no admin key is set. Keys
//! are compared in constant time.

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use super::error::ApiError;
use super::AppState;
pub use crate::config::Keys;

/// Routes that change what the server serves, and the fine-tuning API
/// (its files and jobs, read or written).
fn is_admin_route(method: &Method, path: &str) -> bool {
    let changes = method == Method::POST
        && matches!(path, "/v1/load_lora_adapter" | "/v1/unload_lora_adapter" | "/v1/templates/reload");
    let fine_tuning = ["/v1/files", "/v1/fine_tuning"]
        .iter()
        .any(|root| path.strip_prefix(root).is_some_and(|rest| rest.is_empty() || rest.starts_with('/')));
    changes || fine_tuning
}

fn is_open_route(path: &str) -> bool {
    matches!(path, "/health" | "/metrics" | "/openapi.json") || super::playground::PATHS.contains(&path)
}

fn matches_any(given: &str, keys: &[String]) -> bool {
    // Every key is compared, so the time does not tell which one matched.
    keys.iter().fold(false, |found, key| found | bool::from(given.as_bytes().ct_eq(key.as_bytes())))
}

/// Anthropic's clients send their key in this header.
pub const X_API_KEY: &str = "x-api-key";

/// The key presented: the bearer token (scheme matched case-insensitively),
/// else `x-api-key`.
pub(crate) fn presented_key(request: &Request) -> Option<&str> {
    let bearer = || {
        let value = request.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
        let (scheme, token) = value.trim().split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
    };
    bearer().or_else(|| request.headers().get(X_API_KEY)?.to_str().ok().map(str::trim))
}

fn unauthorized(message: &str) -> Response {
    let mut response = ApiError {
        status: StatusCode::UNAUTHORIZED,
        message: message.to_string(),
        kind: "invalid_request_error",
        param: None,
        code: Some("invalid_api_key"),
    }
    .into_response();
    response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

fn forbidden(message: &str) -> Response {
    ApiError {
        status: StatusCode::FORBIDDEN,
        message: message.to_string(),
        kind: "invalid_request_error",
        param: None,
        code: Some("admin_key_required"),
    }
    .into_response()
}

/// With no key configured every route is open (a local server). With any
/// key configured, admin routes take only an admin key (403 with the plain
/// key, or when no admin key exists), and every other route takes either.
pub async fn require_keys(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let keys = &state.keys;
    let path = request.uri().path();
    if is_open_route(path) || request.method() == Method::OPTIONS || (keys.api.is_empty() && keys.admin.is_empty()) {
        return next.run(request).await;
    }
    let admin_route = is_admin_route(request.method(), path);
    if !admin_route && keys.api.is_empty() {
        // Only an admin key is set: it guards the admin routes alone.
        return next.run(request).await;
    }
    if admin_route && keys.admin.is_empty() {
        return forbidden(
            "this route changes the server's state and needs the admin API key; this server has none \
             (start it with --admin-api-key)",
        );
    }
    let Some(token) = presented_key(&request) else {
        return unauthorized("missing API key: send `Authorization: Bearer <key>` (or `x-api-key: <key>`)");
    };
    let is_admin = matches_any(token, &keys.admin);
    let is_user = matches_any(token, &keys.api);
    match (admin_route, is_admin, is_user) {
        (_, true, _) | (false, _, true) => next.run(request).await,
        (true, false, true) => forbidden("this route changes the server's state and needs the admin API key"),
        _ => unauthorized("incorrect API key provided"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_whole_and_only_whole() {
        let keys = vec!["sk-one".to_string(), "sk-two".to_string()];
        assert!(matches_any("sk-two", &keys));
        assert!(!matches_any("sk-tw", &keys));
        assert!(!matches_any("sk-two ", &keys));
        assert!(!matches_any("", &keys));
        assert!(!matches_any("sk-one", &[]));
    }
}
