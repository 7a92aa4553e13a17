//! Our JSON extractor: malformed bodies and wrong field types get the OpenAI
//! envelope with the field's path as `param`, not axum's plain-text rejection.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use serde::de::DeserializeOwned;

use super::error::ApiError;

/// Largest request body accepted (a long prompt is well under this).
pub const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;

pub struct AppJson<T>(pub T);

impl<S, T> FromRequest<S> for AppJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        parse(&read_body(req, state).await?).map(AppJson)
    }
}

async fn read_body<S: Send + Sync>(req: Request, state: &S) -> Result<Bytes, ApiError> {
    Bytes::from_request(req, state)
        .await
        .map_err(|e| ApiError::bad_request(format!("cannot read the request body: {e}")))
}

pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            ApiError::bad_request(format!("malformed JSON body: {inner}"))
        } else if path == "." || path.is_empty() {
            ApiError::bad_request(format!("invalid request body: {inner}"))
        } else {
            ApiError::invalid(path.clone(), format!("invalid value for `{path}`: {inner}"))
        }
    })?;
    de.end().map_err(|e| ApiError::bad_request(format!("malformed JSON body: {e}")))?;
    Ok(value)
}

/// A request body with the shared sampling fields: parsed twice from the same
/// bytes (serde's `flatten` would lose the path of a mistyped field).
pub struct WithSampling<T>(pub T);

/// The fields both generation endpoints share.
pub trait HasSampling {
    fn sampling_mut(&mut self) -> &mut super::types::SamplingFields;
    /// `model` and the requested named template.
    fn target_names(&self) -> (&str, Option<&str>);
    fn max_tokens_mut(&mut self) -> &mut Option<i64>;
}

impl<S, T> FromRequest<S> for WithSampling<T>
where
    T: DeserializeOwned + HasSampling,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = read_body(req, state).await?;
        let mut value: T = parse(&bytes)?;
        *value.sampling_mut() = parse(&bytes)?;
        Ok(WithSampling(value))
    }
}
