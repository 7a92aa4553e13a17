//! The HTTP API: OpenAI-compatible routes over the engine.
//!
//! Each submodule owns its routes; `router` merges them. Handlers take
//! `State<AppState>` and return `Result<_, ApiError>`.

pub mod adapters;
pub mod auth;
pub mod chat;
pub mod completions;
pub mod cpu;
pub mod dialect;
pub mod error;
pub mod files;
pub mod fine_tuning;
pub mod generate;
pub mod guard;
pub mod json;
pub mod lifecycle;
pub mod logprobs;
pub mod messages;
pub mod metrics;
pub mod models;
pub mod observe;
pub mod params;
pub mod playground;
pub mod prompting;
pub mod responses;
pub mod stall;
pub mod target;
pub mod templates;
pub mod tokenize;
pub mod tools;
pub mod types;

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::{header, HeaderName, Method};
use axum::middleware::from_fn_with_state;
use axum::response::IntoResponse;
use axum::Router;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use utoipa::OpenApi as _;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::engine::{EngineHandle, EngineStatus};
use crate::loader::ModelInfo;
use crate::metrics::Metrics;
use crate::prompt::presets::PresetStore;
use crate::prompt::templates::TemplateStore;
pub use error::ApiError;
use target::adapter_exists;
pub use target::Target;

/// Shared by every handler.
#[derive(Clone)]
pub struct AppState {
    pub engine: EngineHandle,
    /// Unix seconds when the server started (the models' `created`).
    pub created: u64,
    /// `chat_template_kwargs` applied to every chat request; the request's win.
    pub default_chat_template_kwargs: Arc<serde_json::Map<String, serde_json::Value>>,
    /// `--tool-call-parser`: how replies are read for calls (None: from the template).
    pub tool_call_parser: Option<tools::ToolFormat>,
    /// Whether clients may load and unload adapters at run time.
    pub enable_lora_loading: bool,
    pub templates: Arc<TemplateStore>,
    pub presets: Arc<PresetStore>,
    pub metrics: Arc<Metrics>,
    pub keys: Arc<auth::Keys>,
    pub lifecycle: lifecycle::Lifecycle,
    /// Bounds the CPU-heavy request work (rendering, tokenizing, parsing)
    /// running off the async workers at once.
    pub cpu: cpu::CpuWork,
    /// A streaming client that stops reading this long is cancelled.
    pub stream_write_timeout: Duration,
    /// Whether each API key's prompts share cached prefixes only with its own.
    pub prefix_cache_isolation: observe::CacheIsolation,
    /// Uploaded files and fine-tuning jobs (None: the data directory could not be opened).
    pub fine_tuning: Option<Arc<crate::finetune::FineTuning>>,
}

impl AppState {
    /// The served base model's id, once it is loaded.
    pub fn served_model(&self) -> Option<String> {
        match self.engine.status() {
            EngineStatus::Ready(info) => Some(info.id.clone()),
            _ => None,
        }
    }

    /// Runs CPU-heavy request work on the blocking pool (`cpu::CpuWork`).
    pub async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        self.cpu.run(|_| work()).await
    }

    /// `blocking` for work that can stop early: its flag is set once the
    /// client goes.
    pub async fn blocking_cancellable<T: Send + 'static>(
        &self,
        work: impl FnOnce(&AtomicBool) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        self.cpu.run(work).await
    }

    /// The loaded model, or 503 while it loads.
    pub fn model(&self) -> Result<Arc<ModelInfo>, ApiError> {
        match self.engine.status() {
            EngineStatus::Ready(info) => Ok(info),
            EngineStatus::Loading => Err(ApiError::unavailable("the model is still loading")),
            EngineStatus::Failed(e) => Err(ApiError::unavailable(format!("the model failed to load: {e}"))),
            EngineStatus::Stopped => Err(ApiError::unavailable("the engine has stopped")),
        }
    }

    /// The loaded model, checked against the id the request named (an
    /// adapter that would resolve from the roots counts; nothing is read).
    pub fn model_named(&self, requested: &str) -> Result<Arc<ModelInfo>, ApiError> {
        let info = self.model()?;
        if requested != info.id && self.presets.get(requested).is_none() && !adapter_exists(&info, requested)? {
            return Err(ApiError::model_not_found(requested));
        }
        Ok(info)
    }
}

/// HTTP settings the router's layers need.
#[derive(Debug, Clone, Default)]
pub struct HttpOptions {
    pub max_body_bytes: usize,
    /// `POST /v1/files` takes bodies up to this size.
    pub max_file_bytes: usize,
    pub allowed_origins: Vec<String>,
    /// Host names requests may be addressed to.
    pub allowed_hosts: Vec<String>,
}

pub fn router(state: AppState, options: &HttpOptions) -> Router {
    let guard = guard::Guard { hosts: options.allowed_hosts.clone(), origins: options.allowed_origins.clone() };
    let request_id = HeaderName::from_static(observe::REQUEST_ID);
    let (api, _) = documented(options.max_file_bytes).split_for_parts();
    let app = api
        .merge(playground::router())
        .fallback(|| async { ApiError::not_found("no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError {
                status: axum::http::StatusCode::METHOD_NOT_ALLOWED,
                ..ApiError::not_found("method not allowed on this route")
            }
        })
        // Layers run outermost last: CORS, request id, logging, Anthropic's
        // error shape, host and origin, draining, keys, body limit.
        .layer(DefaultBodyLimit::max(options.max_body_bytes))
        .layer(from_fn_with_state(state.clone(), auth::require_keys))
        .layer(from_fn_with_state(state.clone(), lifecycle::refuse_while_draining))
        .layer(from_fn_with_state(Arc::new(guard), guard::check))
        .layer(axum::middleware::from_fn(messages::errors::anthropic_shape))
        .layer(from_fn_with_state(state.clone(), observe::observe))
        .layer(PropagateRequestIdLayer::new(request_id.clone()))
        .layer(SetRequestIdLayer::new(request_id, MakeRequestUuid))
        .with_state(state);
    match cors(&options.allowed_origins) {
        Some(cors) => app.layer(cors),
        None => app,
    }
}

/// Every API route with its OpenAPI description: each handler carries its
/// path and types (`#[utoipa::path]`), so the router and the document are
/// made from the same list and cannot drift apart. (The playground's static
/// files are the only routes outside it.)
fn documented(max_file_bytes: usize) -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(completions::router())
        .merge(chat::router())
        .merge(responses::router())
        .merge(messages::router())
        .merge(models::router())
        .merge(tokenize::router())
        .merge(adapters::router())
        .merge(templates::router())
        .merge(files::router(max_file_bytes))
        .merge(fine_tuning::router())
        .merge(metrics::router())
        .routes(routes!(openapi_json))
}

#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "tailor",
        description = "OpenAI-compatible LLM server: one base model, per-request LoRA adapters, prompt templates and presets."
    ),
    modifiers(&KeySecurity),
    // A generic response's argument is not collected through it.
    components(schemas(types::CompletionChoice)),
    tags(
        (name = "generation", description = "Completions, chat, OpenAI's Responses API and Anthropic's Messages API"),
        (name = "models", description = "The base model, its adapters and presets"),
        (name = "tokens", description = "Token ids as generation uses them"),
        (name = "templates", description = "Named prompt templates"),
        (name = "adapters", description = "Runtime adapter loading (admin key)"),
        (name = "fine-tuning", description = "OpenAI's files and fine-tuning jobs (admin key)"),
        (name = "operations", description = "Health, metrics and this document")
    )
)]
struct ApiDoc;

/// API keys go as `Authorization: Bearer <key>` (or Anthropic's `x-api-key`).
struct KeySecurity;

impl utoipa::Modify for KeySecurity {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        components.add_security_scheme(
            "x-api-key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new(auth::X_API_KEY))),
        );
    }
}

/// The OpenAPI 3.1 document of the whole API, as `/openapi.json` serves it.
pub fn openapi() -> utoipa::openapi::OpenApi {
    documented(0).split_for_parts().1
}

/// This server's OpenAPI 3.1 document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "The OpenAPI document of this API", body = Object)))]
async fn openapi_json() -> impl IntoResponse {
    static DOCUMENT: OnceLock<String> = OnceLock::new();
    let text = DOCUMENT.get_or_init(|| openapi().to_json().unwrap_or_else(|_| "{}".into()));
    ([(header::CONTENT_TYPE, "application/json")], text.as_str())
}

/// CORS only for the origins the operator listed (`*` for any).
fn cors(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| o.parse().ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                HeaderName::from_static(observe::REQUEST_ID),
                HeaderName::from_static(auth::X_API_KEY),
                HeaderName::from_static("anthropic-version"),
            ])
            .expose_headers([HeaderName::from_static(observe::REQUEST_ID)]),
    )
}
