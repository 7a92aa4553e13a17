//! vLLM's runtime adapter routes: `POST /v1/load_lora_adapter` and
//! `POST /v1/unload_lora_adapter`, enabled by `--enable-lora-loading`.

use axum::extract::State;
use axum::routing::post;
use axum::Router;
use serde::Deserialize;

use super::error::ApiError;
use super::json::AppJson;
use super::AppState;

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/load_lora_adapter", post(load)).route("/v1/unload_lora_adapter", post(unload))
}

#[derive(Debug, Deserialize)]
struct LoadRequest {
    lora_name: String,
    lora_path: String,
}

#[derive(Debug, Deserialize)]
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

async fn load(State(state): State<AppState>, AppJson(req): AppJson<LoadRequest>) -> Result<String, ApiError> {
    check_enabled(&state)?;
    let info = state.model()?;
    if req.lora_name == info.id {
        return Err(ApiError::invalid("lora_name", "an adapter cannot take the base model's id"));
    }
    let name = req.lora_name.clone();
    let registry_info = info.clone();
    tokio::task::spawn_blocking(move || registry_info.adapters.register(&req.lora_name, req.lora_path.as_ref(), false))
        .await
        .map_err(|e| ApiError::internal(format!("adapter load failed: {e}")))??;
    tracing::info!(adapter = %name, "adapter loaded");
    Ok(format!("Success: LoRA adapter '{name}' added successfully."))
}

async fn unload(State(state): State<AppState>, AppJson(req): AppJson<UnloadRequest>) -> Result<String, ApiError> {
    check_enabled(&state)?;
    state.model()?.adapters.unregister(&req.lora_name)?;
    tracing::info!(adapter = %req.lora_name, "adapter unloaded");
    Ok(format!("Success: LoRA adapter '{}' removed successfully.", req.lora_name))
}
