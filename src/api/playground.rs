//! The playground page at `/`: static files built into the binary (no CDN,
//! no separate server). The page itself is open; it asks for the API key
//! when the server wants one and sends it like any other client.

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use super::AppState;

const INDEX: &str = include_str!("../../web/index.html");
const SCRIPT: &str = include_str!("../../web/app.js");
const STYLE: &str = include_str!("../../web/style.css");

/// The page's paths: served without a key.
pub const PATHS: [&str; 3] = ["/", "/playground/app.js", "/playground/style.css"];

pub fn router() -> Router<AppState> {
    Router::new()
        .route(PATHS[0], get(|| async { asset(INDEX, "text/html; charset=utf-8") }))
        .route(PATHS[1], get(|| async { asset(SCRIPT, "text/javascript; charset=utf-8") }))
        .route(PATHS[2], get(|| async { asset(STYLE, "text/css; charset=utf-8") }))
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Only this server's own scripts, styles and API.
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'self'; img-src 'self' data:; frame-ancestors 'none'"),
    );
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    response
}
