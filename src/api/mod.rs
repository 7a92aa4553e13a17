//! The HTTP API: OpenAI-compatible routes over the engine.
//!
//! Each submodule owns its routes; `router` merges them. Handlers take
//! `State<AppState>` and return `Result<_, ApiError>`.

pub mod adapters;
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
use crate::model::lora::AdapterWeights;
pub use error::ApiError;

/// Shared by every handler.
#[derive(Clone)]
pub struct AppState {
    pub engine: EngineHandle,
    /// Unix seconds when the server started (the models' `created`).
    pub created: u64,
    /// `chat_template_kwargs` applied to every chat request; the request's win.
    pub default_chat_template_kwargs: Arc<serde_json::Map<String, serde_json::Value>>,
    /// Whether clients may load and unload adapters at run time.
    pub enable_lora_loading: bool,
}

/// What a request's `model` names: the base, or the base with an adapter.
pub struct Target {
    pub info: Arc<ModelInfo>,
    pub adapter: Option<Arc<AdapterWeights>>,
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
        if requested != info.id && !info.adapters.contains(requested) {
            return Err(ApiError::model_not_found(requested));
        }
        Ok(info)
    }

    /// Resolves `model`: the base id, or an adapter name (its weights are read
    /// from disk again if they were evicted). Unknown names are 404.
    pub async fn resolve(&self, requested: &str) -> Result<Target, ApiError> {
        let info = self.model()?;
        if requested == info.id {
            return Ok(Target {
                info,
                adapter: None,
            });
        }
        let lookup = info.clone();
        let name = requested.to_string();
        let adapter = tokio::task::spawn_blocking(move || lookup.adapters.get(&name))
            .await
            .map_err(|e| ApiError::internal(format!("adapter lookup failed: {e}")))?
            .map_err(|e| {
                tracing::error!(adapter = requested, error = %e, "cannot reload adapter");
                ApiError::internal(format!("adapter `{requested}` cannot be read: {e}"))
            })?
            .ok_or_else(|| ApiError::model_not_found(requested))?;
        Ok(Target {
            info,
            adapter: Some(adapter),
        })
    }
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .merge(completions::router())
        .merge(chat::router())
        .merge(models::router())
        .merge(tokenize::router())
        .merge(adapters::router())
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
