//! Named templates over HTTP: list them, dry-run one (the exact prompt and
//! token ids generation would use), reload templates and presets.

use axum::extract::{Path, State};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json_};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::chat::{merged_kwargs, render_chat};
use super::error::{ApiError, ErrorEnvelope};
use super::json::AppJson;
use super::prompting;
use super::types::{AdapterChoice, MergeOptions, Prompt};
use super::{AppState, Target};
use crate::prompt::templates::TemplateCard;
use crate::prompt::ChatRequest;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list)).routes(routes!(reload)).routes(routes!(render))
}

#[derive(Serialize, utoipa::ToSchema)]
struct TemplateList {
    object: &'static str,
    data: Vec<TemplateCard>,
}

/// The named templates, their variables and defaults.
#[utoipa::path(get, path = "/v1/templates", tag = "templates",
    responses((status = 200, body = TemplateList), (status = 401, description = "Missing or wrong API key", body = ErrorEnvelope)))]
async fn list(State(state): State<AppState>) -> Json<TemplateList> {
    Json(TemplateList { object: "list", data: state.templates.list() })
}

#[derive(Deserialize, Default, Clone, Copy, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
enum Mode {
    /// As `/v1/completions` uses it: the rendered text is the prompt.
    #[default]
    Completion,
    /// As `/v1/chat/completions` uses it: the rendered text is the final user
    /// message, then the model's chat template applies.
    Chat,
}

#[derive(Deserialize, utoipa::ToSchema)]
struct RenderRequest {
    /// Base id, adapter or preset (its defaults and system prompt apply); default: the base.
    model: Option<String>,
    #[serde(default)]
    template_vars: Map<String, Json_>,
    #[serde(default)]
    mode: Mode,
    /// Chat mode: the conversation before the templated message.
    #[serde(default)]
    messages: Vec<Json_>,
    /// Completion mode: text for the template's input variable.
    prompt: Option<String>,
    chat_template_kwargs: Option<Map<String, Json_>>,
    /// A weighted composition of adapters (as on generation requests): their defaults apply.
    adapters: Option<Vec<AdapterChoice>>,
    adapter_merge: Option<MergeOptions>,
}

#[derive(Serialize, utoipa::ToSchema)]
struct RenderResponse {
    prompt: String,
    tokens: Vec<u32>,
    count: usize,
    max_model_len: usize,
}

/// A dry run: the exact prompt and token ids a request with this template would use.
#[utoipa::path(post, path = "/v1/templates/{name}/render", tag = "templates", request_body = RenderRequest,
    params(("name" = String, Path, description = "A named template")),
    responses((status = 200, body = RenderResponse), (status = 400, description = "Invalid request", body = ErrorEnvelope), (status = 401, description = "Missing or wrong API key", body = ErrorEnvelope), (status = 404, description = "Not found", body = ErrorEnvelope), (status = 503, description = "Loading or draining", body = ErrorEnvelope)))]
async fn render(
    State(state): State<AppState>,
    Path(name): Path<String>,
    AppJson(req): AppJson<RenderRequest>,
) -> Result<Json<RenderResponse>, ApiError> {
    let model = match &req.model {
        Some(m) => m.clone(),
        None => state.model()?.id.clone(),
    };
    let target = state.resolve(&model, Some(&name), req.adapters.as_deref(), req.adapter_merge).await?;
    let info = target.info.clone();
    let kwargs = merged_kwargs(&state, &target, req.chat_template_kwargs.as_ref());
    let (tokens, prompt) = state.blocking(move || render_request(&target, req, kwargs)).await?;
    Ok(Json(RenderResponse { prompt, count: tokens.len(), tokens, max_model_len: info.max_model_len }))
}

fn render_request(
    target: &Target,
    req: RenderRequest,
    kwargs: Map<String, Json_>,
) -> Result<(Vec<u32>, String), ApiError> {
    let info = &target.info;
    let tokens = match req.mode {
        Mode::Completion => {
            let prompt = req.prompt.map(Prompt::Text);
            prompting::completion_prompts(target, prompt.as_ref(), Some(&req.template_vars))?.pop().unwrap_or_default()
        }
        Mode::Chat => {
            let chat = ChatRequest {
                messages: prompting::chat_messages(target, &req.messages, Some(&req.template_vars))?,
                add_generation_prompt: true,
                kwargs,
                ..Default::default()
            };
            render_chat(info, &chat)?
        }
    };
    let prompt = info
        .tokenizer
        .decode(&tokens, false)
        .map_err(|e| ApiError::internal(format!("cannot decode the prompt: {e}")))?;
    Ok((tokens, prompt))
}

#[derive(Serialize, utoipa::ToSchema)]
struct ReloadResponse {
    templates: usize,
    presets: usize,
    errors: Vec<String>,
}

/// Reads the templates and presets again now (they also reload when their files change).
#[utoipa::path(post, path = "/v1/templates/reload", tag = "templates",
    responses((status = 200, body = ReloadResponse), (status = 401, description = "Missing or wrong API key", body = ErrorEnvelope), (status = 403, description = "Needs the admin key", body = ErrorEnvelope)))]
async fn reload(State(state): State<AppState>) -> Result<Json<ReloadResponse>, ApiError> {
    let (templates, presets) = (state.templates.clone(), state.presets.clone());
    let response = state
        .blocking(move || {
            let mut errors = templates.reload();
            errors.extend(presets.reload());
            Ok(ReloadResponse { templates: templates.list().len(), presets: presets.list().len(), errors })
        })
        .await?;
    Ok(Json(response))
}
