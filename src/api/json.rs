//! Our JSON extractor: malformed bodies and wrong field types get the OpenAI
//! envelope with the field's path as `param`, not axum's plain-text rejection.
//! Only JSON content types are read (415 otherwise: a web page cannot post a
//! `text/plain` body cross-origin), within the body limit (413), and large
//! bodies are parsed off the async workers.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{header, StatusCode};
use serde::de::DeserializeOwned;

use super::error::ApiError;
use super::types::HasSampling;

/// Bodies larger than this are parsed on the blocking pool.
const PARSE_INLINE_BYTES: usize = 64 * 1024;

pub struct AppJson<T>(pub T);

impl<S, T> FromRequest<S> for AppJson<T>
where
    T: DeserializeOwned + Send + 'static,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = read_body(req, state).await?;
        off_workers(bytes, |bytes| parse(bytes)).await.map(AppJson)
    }
}

fn is_json(req: &Request) -> bool {
    let Some(value) = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let mime = value.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
}

async fn read_body<S: Send + Sync>(req: Request, state: &S) -> Result<Bytes, ApiError> {
    if !is_json(&req) {
        return Err(ApiError {
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            code: Some("unsupported_media_type"),
            ..ApiError::bad_request("the request body must be JSON, sent with `Content-Type: application/json`")
        });
    }
    Bytes::from_request(req, state).await.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError {
                status: StatusCode::PAYLOAD_TOO_LARGE,
                code: Some("request_too_large"),
                ..ApiError::bad_request("the request body is larger than this server accepts (--max-body-bytes)")
            }
        } else {
            ApiError::bad_request(format!("cannot read the request body: {e}"))
        }
    })
}

/// Runs `parse` inline for small bodies, on the blocking pool for large ones.
async fn off_workers<T: Send + 'static>(
    bytes: Bytes,
    parse: impl FnOnce(&[u8]) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    if bytes.len() <= PARSE_INLINE_BYTES {
        return parse(&bytes);
    }
    tokio::task::spawn_blocking(move || parse(&bytes))
        .await
        .map_err(|_| ApiError::internal("internal error while reading the request body"))?
}

pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(path_error)?;
    de.end().map_err(|e| ApiError::bad_request(format!("malformed JSON body: {e}")))?;
    Ok(value)
}

/// A request type read from a body already parsed as a JSON object.
pub fn from_map<T: DeserializeOwned>(body: &serde_json::Map<String, serde_json::Value>) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(serde_json::Value::Object(body.clone())).map_err(path_error)
}

/// A body that does not fit its type, with the offending field as `param`.
fn path_error(e: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    let path = e.path().to_string();
    let inner = e.into_inner();
    if inner.is_syntax() || inner.is_eof() {
        ApiError::bad_request(format!("malformed JSON body: {inner}"))
    } else if path == "." || path.is_empty() {
        ApiError::bad_request(format!("invalid request body: {inner}"))
    } else {
        ApiError::invalid(path.clone(), format!("invalid value for `{path}`: {inner}"))
    }
}

/// A request body with the shared sampling fields: parsed twice from the same
/// bytes (serde's `flatten` would lose the path of a mistyped field).
pub struct WithSampling<T>(pub T);

impl<S, T> FromRequest<S> for WithSampling<T>
where
    T: DeserializeOwned + HasSampling + Send + 'static,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = read_body(req, state).await?;
        off_workers(bytes, |bytes| {
            let mut value: T = parse(bytes)?;
            *value.sampling_mut() = parse(bytes)?;
            Ok(WithSampling(value))
        })
        .await
    }
}
