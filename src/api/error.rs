//! The one error type of the HTTP boundary, rendered as OpenAI's envelope
//! `{"error": {"message", "type", "param", "code"}}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::engine::SubmitError;
use crate::prompt::PromptError;

#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

/// OpenAI's error envelope: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = ErrorEnvelope)]
pub struct Envelope<'a> {
    error: Body<'a>,
}

/// An error: what went wrong, its kind, the request field it concerns, a code.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = ErrorBody)]
pub struct Body<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

/// The envelope's schema under its documented name.
pub type ErrorEnvelope = Envelope<'static>;

impl ApiError {
    /// 400 about one request field.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param.into()),
            code: None,
        }
    }

    /// 400 about the request as a whole.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self { param: None, ..Self::invalid("", message) }
    }

    /// 400 for a known OpenAI field that tailor does not implement yet.
    pub fn unsupported(param: &str, what: &str) -> Self {
        Self {
            code: Some("unsupported_parameter"),
            ..Self::invalid(param, format!("`{param}` {what} is not supported by this server"))
        }
    }

    pub fn model_not_found(model: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!("The model `{model}` does not exist."),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("not_found"),
        }
    }

    pub fn overloaded(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: message.into(),
            kind: "rate_limit_error",
            param: None,
            code: Some("server_overloaded"),
        }
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: Some("model_not_ready"),
        }
    }

    /// 5xx: the cause is logged by the caller; the client gets a plain message.
    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }

    /// The envelope as JSON text (also used for errors inside an SSE stream).
    pub fn to_json(&self) -> String {
        let envelope = Envelope {
            error: Body {
                message: &self.message,
                kind: self.kind,
                param: self.param.as_deref().filter(|p| !p.is_empty()),
                code: self.code,
            },
        };
        serde_json::to_string(&envelope).unwrap_or_else(|_| {
            r#"{"error":{"message":"internal error","type":"server_error","param":null,"code":null}}"#.into()
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, self.to_json()).into_response();
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::Overloaded(_) => ApiError::overloaded(e.to_string()),
            // Retrying cannot help: 400, not 429.
            SubmitError::TooMany { .. } => ApiError::invalid("prompt", e.to_string()),
            SubmitError::Stopped => ApiError::unavailable(e.to_string()),
        }
    }
}

impl From<crate::lora::LoraError> for ApiError {
    fn from(e: crate::lora::LoraError) -> Self {
        use crate::lora::LoraError;
        match e {
            LoraError::NotFound(name) => ApiError {
                code: Some("adapter_not_found"),
                ..ApiError::not_found(format!("no adapter named `{name}` is loaded"))
            },
            LoraError::BadName(_) | LoraError::NameTaken(_) => ApiError::invalid("lora_name", e.to_string()),
            other => ApiError::invalid("lora_path", other.to_string()),
        }
    }
}

impl From<PromptError> for ApiError {
    fn from(e: PromptError) -> Self {
        match e {
            PromptError::Raised(message) => ApiError::invalid("messages", message),
            PromptError::Template(message) => ApiError::invalid("messages", format!("chat template error: {message}")),
            PromptError::Invalid(message) => ApiError::bad_request(message),
        }
    }
}
