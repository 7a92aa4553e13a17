//! vLLM's runtime adapter routes: `POST /v1/load_lora_adapter` and
//! `POST /v1/unload_lora_adapter`, enabled by `--enable-lora-loading`.

use axum::extract::State;
use serde::Deserialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiError, ErrorEnvelope};
use super::json::AppJson;
use super::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(load)).routes(routes!(unload))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
struct LoadRequest {
    lora_name: String,
    lora_path: String,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
struct UnloadRequest {
    lora_name: String,
}

fn check_enabled(state: &AppState) -> Result<(), ApiError> {
    if state.enable_lora_loading {
        Ok(())
    } else {
        Err(ApiError::not_found("runtime adapter loading is disabled; start the server with --enable-lora-loading"))
    }
}

/// Registers an adapter folder under a name (vLLM's route; `--enable-lora-loading`, admin key).
#[utoipa::path(post, path = "/v1/load_lora_adapter", tag = "adapters", request_body = LoadRequest,
    responses((status = 200, description = "Loaded", content_type = "text/plain", body = String), (status = 400, description = "Invalid request", body = ErrorEnvelope), (status = 401, description = "Missing or wrong API key", body = ErrorEnvelope), (status = 403, description = "Needs the admin key", body = ErrorEnvelope), (status = 404, description = "Not found, or runtime loading disabled", body = ErrorEnvelope), (status = 503, description = "Loading or draining", body = ErrorEnvelope)))]
async fn load(State(state): State<AppState>, AppJson(req): AppJson<LoadRequest>) -> Result<String, ApiError> {
    check_enabled(&state)?;
    let info = state.model()?;
    if req.lora_name == info.id {
        return Err(ApiError::invalid("lora_name", "an adapter cannot take the base model's id"));
    }
    let name = req.lora_name.clone();
    // Read below the engine's priority, like a request's cold adapter.
    info.adapters.register_off_engine(&req.lora_name, req.lora_path.as_ref(), false).await?;
    tracing::info!(adapter = %name, "adapter loaded");
    Ok(format!("Success: LoRA adapter '{name}' added successfully."))
}

/// Forgets an adapter (vLLM's route; `--enable-lora-loading`, admin key).
#[utoipa::path(post, path = "/v1/unload_lora_adapter", tag = "adapters", request_body = UnloadRequest,
    responses((status = 200, description = "Unloaded", content_type = "text/plain", body = String), (status = 400, description = "Invalid request", body = ErrorEnvelope), (status = 401, description = "Missing or wrong API key", body = ErrorEnvelope), (status = 403, description = "Needs the admin key", body = ErrorEnvelope), (status = 404, description = "Not found, or runtime loading disabled", body = ErrorEnvelope), (status = 503, description = "Loading or draining", body = ErrorEnvelope)))]
async fn unload(State(state): State<AppState>, AppJson(req): AppJson<UnloadRequest>) -> Result<String, ApiError> {
    check_enabled(&state)?;
    state.model()?.adapters.unregister(&req.lora_name)?;
    tracing::info!(adapter = %req.lora_name, "adapter unloaded");
    Ok(format!("Success: LoRA adapter '{}' removed successfully.", req.lora_name))
}
