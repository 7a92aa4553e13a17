//! The HTTP API: OpenAI-compatible routes over the engine.
//!
//! Each submodule owns its routes; `router` merges them. Handlers take
//! `State<AppState>` and return `Result<_, ApiError>`.

pub mod chat;
pub mod completions;
pub mod error;
pub mod generate;
pub mod json;
pub mod models;
pub mod params;
pub mod tokenize;
pub mod types;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::Router;
use tower_http::trace::TraceLayer;

use crate::engine::{EngineHandle, EngineStatus};
use crate::loader::ModelInfo;
pub use error::ApiError;

/// Shared by every handler.
#[derive(Clone)]
pub struct AppState {
    pub engine: EngineHandle,
    /// Unix seconds when the server started (the models' `created`).
    pub created: u64,
    /// `chat_template_kwargs` applied to every chat request; the request's win.
    pub default_chat_template_kwargs: Arc<serde_json::Map<String, serde_json::Value>>,
}

impl AppState {
    /// The loaded model, or 503 while it loads.
    pub fn model(&self) -> Result<Arc<ModelInfo>, ApiError> {
        match self.engine.status() {
            EngineStatus::Ready(info) => Ok(info),
            EngineStatus::Loading => Err(ApiError::unavailable("the model is still loading")),
            EngineStatus::Failed(e) => Err(ApiError::unavailable(format!(
                "the model failed to load: {e}"
            ))),
            EngineStatus::Stopped => Err(ApiError::unavailable("the engine has stopped")),
        }
    }

    /// The loaded model, checked against the id the request named.
    pub fn model_named(&self, requested: &str) -> Result<Arc<ModelInfo>, ApiError> {
        let info = self.model()?;
        if requested != info.id {
            return Err(ApiError::model_not_found(requested));
        }
        Ok(info)
    }
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .merge(completions::router())
        .merge(chat::router())
        .merge(models::router())
        .merge(tokenize::router())
        .fallback(|| async { ApiError::not_found("no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError {
                status: axum::http::StatusCode::METHOD_NOT_ALLOWED,
                ..ApiError::not_found("method not allowed on this route")
            }
        })
        .layer(DefaultBodyLimit::max(json::MAX_BODY_BYTES))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A fresh response id with OpenAI's prefixes (`cmpl-`, `chatcmpl-`).
pub fn response_id(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}
