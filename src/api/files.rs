//! OpenAI's files API, for fine-tuning data: `POST /v1/files` (multipart,
//! `purpose=fine-tune`, every line checked the way training reads it),
//! `GET /v1/files`, `GET`/`DELETE /v1/files/{id}`, `GET /v1/files/{id}/content`.

use std::sync::Arc;

use axum::extract::multipart::MultipartRejection;
use axum::extract::{DefaultBodyLimit, Multipart, Path, State};
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiError, ErrorEnvelope};
use super::types::ListPage;
use super::AppState;
use crate::finetune::files::FileObject;
use crate::finetune::{FineTuneError, FineTuning};
use crate::train::data::{self, Encoder};

pub fn router(max_file_bytes: usize) -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list, upload))
        .layer(DefaultBodyLimit::max(max_file_bytes))
        .routes(routes!(retrieve, remove))
        .routes(routes!(content))
}

/// `POST /v1/files`'s multipart form.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // the document's shape only
struct UploadForm {
    /// `fine-tune`.
    purpose: String,
    /// OpenAI fine-tuning JSONL.
    #[schema(value_type = String, format = Binary)]
    file: Vec<u8>,
}

/// What `DELETE /v1/files/{id}` answers.
#[derive(serde::Serialize, utoipa::ToSchema)]
struct FileDeleted {
    id: String,
    object: &'static str,
    deleted: bool,
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

/// Stores a fine-tuning data file, every line checked as training reads it.
#[utoipa::path(post, path = "/v1/files", tag = "fine-tuning",
    request_body(content = UploadForm, content_type = "multipart/form-data"),
    responses((status = 200, body = FileObject), (status = 413, description = "Larger than --max-file-bytes", body = ErrorEnvelope),
        (status = 507, description = "A storage cap or the disk's reserve", body = ErrorEnvelope), (status = 400, description = "Invalid request", body = ErrorEnvelope), (status = 401, description = "Missing or wrong API key", body = ErrorEnvelope), (status = 403, description = "Needs the admin key", body = ErrorEnvelope), (status = 404, description = "Not found", body = ErrorEnvelope), (status = 503, description = "Fine-tuning unavailable (no writable data directory) or the model is loading", body = ErrorEnvelope)))]
async fn upload(
    State(state): State<AppState>,
    form: Result<Multipart, MultipartRejection>,
) -> Result<Json<FileObject>, ApiError> {
    // axum's own rejection is plain text: give it the error envelope.
    let mut form =
        form.map_err(|e| ApiError::bad_request(format!("the body must be multipart/form-data: {}", e.body_text())))?;
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

/// The stored files, newest first.
#[utoipa::path(get, path = "/v1/files", tag = "fine-tuning", responses((status = 200, body = ListPage<FileObject>), (status = 400, description = "Invalid request", body = ErrorEnvelope), (status = 401, description = "Missing or wrong API key", body = ErrorEnvelope), (status = 403, description = "Needs the admin key", body = ErrorEnvelope), (status = 404, description = "Not found", body = ErrorEnvelope), (status = 503, description = "Fine-tuning unavailable (no writable data directory) or the model is loading", body = ErrorEnvelope)))]
async fn list(State(state): State<AppState>) -> Result<Json<ListPage<FileObject>>, ApiError> {
    let files = service(&state)?.files.list();
    Ok(Json(ListPage { object: "list", data: files, has_more: false }))
}

fn find(state: &AppState, id: &str) -> Result<FileObject, ApiError> {
    service(state)?.files.get(id).ok_or_else(|| ApiError::not_found(format!("no file {id}")))
}

/// One file's description.
#[utoipa::path(get, path = "/v1/files/{id}", tag = "fine-tuning", params(("id" = String, Path, description = "A file id")),
    responses((status = 200, body = FileObject), (status = 400, description = "Invalid request", body = ErrorEnvelope), (status = 401, description = "Missing or wrong API key", body = ErrorEnvelope), (status = 403, description = "Needs the admin key", body = ErrorEnvelope), (status = 404, description = "Not found", body = ErrorEnvelope), (status = 503, description = "Fine-tuning unavailable (no writable data directory) or the model is loading", body = ErrorEnvelope)))]
async fn retrieve(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<FileObject>, ApiError> {
    Ok(Json(find(&state, &id)?))
}

/// Deletes a file.
#[utoipa::path(delete, path = "/v1/files/{id}", tag = "fine-tuning", params(("id" = String, Path, description = "A file id")),
    responses((status = 200, body = FileDeleted), (status = 400, description = "Invalid request", body = ErrorEnvelope), (status = 401, description = "Missing or wrong API key", body = ErrorEnvelope), (status = 403, description = "Needs the admin key", body = ErrorEnvelope), (status = 404, description = "Not found", body = ErrorEnvelope), (status = 503, description = "Fine-tuning unavailable (no writable data directory) or the model is loading", body = ErrorEnvelope)))]
async fn remove(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<FileDeleted>, ApiError> {
    if !service(&state)?.files.delete(&id)? {
        return Err(ApiError::not_found(format!("no file {id}")));
    }
    Ok(Json(FileDeleted { id, object: "file", deleted: true }))
}

/// A file's bytes.
#[utoipa::path(get, path = "/v1/files/{id}/content", tag = "fine-tuning", params(("id" = String, Path, description = "A file id")),
    responses((status = 200, description = "The file", content_type = "application/jsonl", body = String), (status = 400, description = "Invalid request", body = ErrorEnvelope), (status = 401, description = "Missing or wrong API key", body = ErrorEnvelope), (status = 403, description = "Needs the admin key", body = ErrorEnvelope), (status = 404, description = "Not found", body = ErrorEnvelope), (status = 503, description = "Fine-tuning unavailable (no writable data directory) or the model is loading", body = ErrorEnvelope)))]
async fn content(State(state): State<AppState>, Path(id): Path<String>) -> Result<impl IntoResponse, ApiError> {
    let bytes = service(&state)?.files.content(&id).ok_or_else(|| ApiError::not_found(format!("no file {id}")))?;
    Ok(([(header::CONTENT_TYPE, "application/jsonl")], bytes))
}
