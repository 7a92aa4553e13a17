//! `GET /v1/models`, `GET /v1/models/{id}` and `GET /health`.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiError, ErrorEnvelope};
use super::types::{ModelCard, ModelList};
use super::AppState;
use crate::engine::EngineStatus;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list_models)).routes(routes!(get_model)).routes(routes!(health))
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
        root: Some(p.adapter_names().join("+")).filter(|r| !r.is_empty()).unwrap_or_else(|| info.id.clone()),
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

/// The base model, its adapters and the presets.
#[utoipa::path(get, path = "/v1/models", tag = "models",
    responses((status = 200, body = ModelList), (status = 503, body = ErrorEnvelope)))]
async fn list_models(State(state): State<AppState>) -> Result<Json<ModelList>, ApiError> {
    Ok(Json(ModelList { object: "list", data: cards(&state)? }))
}

/// One model id.
#[utoipa::path(get, path = "/v1/models/{id}", tag = "models", params(("id" = String, Path, description = "A model id")),
    responses((status = 200, body = ModelCard), (status = 404, body = ErrorEnvelope), (status = 503, body = ErrorEnvelope)))]
async fn get_model(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<ModelCard>, ApiError> {
    cards(&state)?.into_iter().find(|c| c.id == id).map(Json).ok_or_else(|| ApiError::model_not_found(&id))
}

/// 200 once the model serves; 503 while it loads, after it failed, once
/// the engine stopped, and while the server drains for shutdown.
#[utoipa::path(get, path = "/health", tag = "operations",
    responses((status = 200, body = Health), (status = 503, body = Health)))]
async fn health(State(state): State<AppState>) -> Response {
    if state.lifecycle.is_draining() {
        return (StatusCode::SERVICE_UNAVAILABLE, Json(Health { status: "draining".into() })).into_response();
    }
    let (status, text) = match state.engine.status() {
        EngineStatus::Ready(_) => (StatusCode::OK, "ok".to_string()),
        EngineStatus::Loading => (StatusCode::SERVICE_UNAVAILABLE, "loading".to_string()),
        EngineStatus::Failed(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("failed: {e}")),
        EngineStatus::Stopped => (StatusCode::SERVICE_UNAVAILABLE, "stopped".to_string()),
    };
    (status, Json(Health { status: text })).into_response()
}

/// `ok`, `loading`, `failed: …`, `stopped` or `draining`.
#[derive(serde::Serialize, utoipa::ToSchema)]
struct Health {
    status: String,
}
