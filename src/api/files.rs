//! OpenAI's files API, for fine-tuning data: `POST /v1/files` (multipart,
//! `purpose=fine-tune`, every line checked the way training reads it),
//! `GET /v1/files`, `GET`/`DELETE /v1/files/{id}`, `GET /v1/files/{id}/content`.

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Multipart, Path, State};
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::error::ApiError;
use super::AppState;
use crate::finetune::files::FileObject;
use crate::finetune::{FineTuneError, FineTuning};
use crate::train::data::{self, Encoder};

pub fn router(max_file_bytes: usize) -> Router<AppState> {
    Router::new()
        .route("/v1/files", get(list).post(upload).layer(DefaultBodyLimit::max(max_file_bytes)))
        .route("/v1/files/{id}", get(retrieve).delete(remove))
        .route("/v1/files/{id}/content", get(content))
}

impl From<FineTuneError> for ApiError {
    fn from(e: FineTuneError) -> Self {
        match e {
            FineTuneError::Invalid { message, param } => match param {
                Some(param) => ApiError::invalid(param, message),
                None => ApiError::bad_request(message),
            },
            FineTuneError::NotFound(message) => ApiError::not_found(message),
            FineTuneError::Full(message) => ApiError {
                status: axum::http::StatusCode::INSUFFICIENT_STORAGE,
                code: Some("storage_full"),
                ..ApiError::internal(message)
            },
            FineTuneError::Busy(message) => ApiError { code: Some("too_many_jobs"), ..ApiError::overloaded(message) },
            other => {
                tracing::error!(error = %other, "fine-tuning storage failed");
                ApiError::internal(other.to_string())
            }
        }
    }
}

/// The fine-tuning service, or 503 when it could not start.
pub fn service(state: &AppState) -> Result<Arc<FineTuning>, ApiError> {
    state.fine_tuning.clone().ok_or_else(|| ApiError::unavailable("fine-tuning is not available on this server"))
}

async fn upload(State(state): State<AppState>, mut form: Multipart) -> Result<Json<FileObject>, ApiError> {
    let service = service(&state)?;
    let (mut purpose, mut file) = (None, None);
    loop {
        let field = form.next_field().await.map_err(|e| ApiError::bad_request(format!("bad multipart body: {e}")))?;
        let Some(field) = field else { break };
        match field.name() {
            Some("purpose") => {
                purpose = Some(field.text().await.map_err(|e| ApiError::invalid("purpose", e.to_string()))?);
            }
            Some("file") => {
                let name = field.file_name().unwrap_or("upload.jsonl").to_string();
                let bytes = field.bytes().await.map_err(|e| ApiError::invalid("file", e.to_string()))?;
                file = Some((name, bytes));
            }
            _ => {}
        }
    }
    let purpose = purpose.ok_or_else(|| ApiError::invalid("purpose", "`purpose` is required"))?;
    if purpose != "fine-tune" {
        return Err(ApiError::invalid("purpose", format!("purpose `{purpose}` is not supported; use `fine-tune`")));
    }
    let (name, bytes) = file.ok_or_else(|| ApiError::invalid("file", "`file` is required"))?;
    let info = state.model()?;
    state
        .blocking_cancellable(move |stop| {
            let encoder = Encoder {
                tokenizer: &info.tokenizer,
                template: info.chat_template.as_ref(),
                eos: info.eos_token_ids.first().copied(),
            };
            data::parse(bytes.to_vec(), &name, &encoder, usize::MAX, stop)
                .map_err(|e| ApiError::invalid("file", e.to_string()))?;
            Ok(Json(service.store_file(&name, &purpose, &bytes)?))
        })
        .await
}

async fn list(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let files = service(&state)?.files.list();
    Ok(Json(json!({"object": "list", "data": files, "has_more": false})))
}

fn find(state: &AppState, id: &str) -> Result<FileObject, ApiError> {
    service(state)?.files.get(id).ok_or_else(|| ApiError::not_found(format!("no file {id}")))
}

async fn retrieve(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<FileObject>, ApiError> {
    Ok(Json(find(&state, &id)?))
}

async fn remove(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    if !service(&state)?.files.delete(&id)? {
        return Err(ApiError::not_found(format!("no file {id}")));
    }
    Ok(Json(json!({"id": id, "object": "file", "deleted": true})))
}

async fn content(State(state): State<AppState>, Path(id): Path<String>) -> Result<impl IntoResponse, ApiError> {
    let bytes = service(&state)?.files.content(&id).ok_or_else(|| ApiError::not_found(format!("no file {id}")))?;
    Ok(([(header::CONTENT_TYPE, "application/jsonl")], bytes))
}
