//! `GET /v1/models`, `GET /v1/models/{id}` and `GET /health`.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use super::error::ApiError;
use super::types::{ModelCard, ModelList};
use super::AppState;
use crate::engine::EngineStatus;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
        .route("/health", get(health))
}

fn cards(state: &AppState) -> Result<Vec<ModelCard>, ApiError> {
    let info = state.model()?;
    let mut cards = vec![ModelCard {
        id: info.id.clone(),
        object: "model",
        created: state.created,
        owned_by: "tailor",
        root: info.id.clone(),
        parent: None,
        max_model_len: info.max_model_len,
        kind: "base",
    }];
    cards.extend(info.adapters.list().into_iter().map(|a| ModelCard {
        id: a.name,
        object: "model",
        created: a.created,
        owned_by: "tailor",
        root: a.path.display().to_string(),
        parent: Some(info.id.clone()),
        max_model_len: info.max_model_len,
        kind: "adapter",
    }));
    cards.extend(state.presets.list().into_iter().map(|p| ModelCard {
        root: p.adapter.clone().unwrap_or_else(|| info.id.clone()),
        id: p.name,
        object: "model",
        created: state.created,
        owned_by: "tailor",
        parent: Some(info.id.clone()),
        max_model_len: info.max_model_len,
        kind: "preset",
    }));
    Ok(cards)
}

async fn list_models(State(state): State<AppState>) -> Result<Json<ModelList>, ApiError> {
    Ok(Json(ModelList { object: "list", data: cards(&state)? }))
}

async fn get_model(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<ModelCard>, ApiError> {
    cards(&state)?.into_iter().find(|c| c.id == id).map(Json).ok_or_else(|| ApiError::model_not_found(&id))
}

/// 200 once the model serves; 503 while it loads, after it failed, once
/// the engine stopped, and while the server drains for shutdown.
async fn health(State(state): State<AppState>) -> Response {
    if state.lifecycle.is_draining() {
        return (StatusCode::SERVICE_UNAVAILABLE, Json(serde_json::json!({ "status": "draining" }))).into_response();
    }
    let (status, text) = match state.engine.status() {
        EngineStatus::Ready(_) => (StatusCode::OK, "ok".to_string()),
        EngineStatus::Loading => (StatusCode::SERVICE_UNAVAILABLE, "loading".to_string()),
        EngineStatus::Failed(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("failed: {e}")),
        EngineStatus::Stopped => (StatusCode::SERVICE_UNAVAILABLE, "stopped".to_string()),
    };
    (status, Json(serde_json::json!({ "status": text }))).into_response()
}
