//! OpenAI's fine-tuning jobs API: `POST /v1/fine_tuning/jobs`, `GET
//! /v1/fine_tuning/jobs`, `GET .../{id}`, `GET .../{id}/events`, `POST
//! .../{id}/cancel`. A job trains a LoRA adapter on the served base; when it
//! succeeds the adapter is served as `ft:<base>:<suffix>:<job id>`.

use axum::extract::{Path, Query, State};
use axum::Json;
use serde::Deserialize;
use serde_json::{Map, Value};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiError, ErrorEnvelope};
use super::files::service;
use super::json::AppJson;
use super::types::ListPage;
use super::AppState;
use crate::finetune::jobs::{Hyperparameters, Job, JobEvent};
use crate::loader::ModelInfo;
use crate::train::limits::{self, Bound};
use crate::train::MODULES;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list, create))
        .routes(routes!(retrieve))
        .routes(routes!(events))
        .routes(routes!(cancel))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
struct CreateJob {
    model: String,
    training_file: String,
    validation_file: Option<String>,
    #[serde(default)]
    hyperparameters: Map<String, Value>,
    method: Option<Value>,
    suffix: Option<String>,
    seed: Option<u64>,
    #[serde(default)]
    integrations: Vec<Value>,
    metadata: Option<Value>,
}

/// A number within `bound`, or `"auto"` (None).
fn number(fields: &Map<String, Value>, bound: &Bound) -> Result<Option<f64>, ApiError> {
    let name = bound.name;
    match fields.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s == "auto" => Ok(None),
        Some(v) => match v.as_f64() {
            Some(n) if bound.contains(n) => Ok(Some(n)),
            _ => Err(ApiError::invalid(
                format!("hyperparameters.{name}"),
                format!("`{name}` must be {} (or \"auto\"), not {v}", bound.describe()),
            )),
        },
    }
}

fn whole(fields: &Map<String, Value>, bound: &Bound) -> Result<Option<usize>, ApiError> {
    Ok(number(fields, bound)?.map(|n| n as usize))
}

/// OpenAI's hyperparameters (`"auto"` picks the shipped adapters' recipe),
/// plus tailor's LoRA and schedule fields, each within its documented range
/// (`train::limits`; a rank also within what this server serves, a length
/// within the model's context).
fn hyperparameters(fields: &Map<String, Value>, max_rank: usize, context: usize) -> Result<Hyperparameters, ApiError> {
    let known = [
        "n_epochs",
        "batch_size",
        "learning_rate_multiplier",
        "n_steps",
        "lora_rank",
        "lora_alpha",
        "target_modules",
        "use_rslora",
        "warmup_steps",
        "lr_schedule",
        "lr_schedule_steps",
        "min_lr_ratio",
        "max_seq_len",
    ];
    if let Some(unknown) = fields.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(ApiError::invalid(
            format!("hyperparameters.{unknown}"),
            format!("unknown hyperparameter `{unknown}` (known: {})", known.join(", ")),
        ));
    }
    let target_modules = match fields.get("target_modules") {
        None => vec!["q_proj".to_string(), "v_proj".to_string()],
        Some(Value::Array(items)) if !items.is_empty() && items.len() <= MODULES.len() => items
            .iter()
            .map(|m| match m.as_str() {
                Some(m) if MODULES.contains(&m) => Ok(m.to_string()),
                _ => Err(ApiError::invalid(
                    "hyperparameters.target_modules",
                    format!("target modules are among {}", MODULES.join(", ")),
                )),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(ApiError::invalid("hyperparameters.target_modules", "a non-empty list of module names")),
    };
    let lr_schedule = match fields.get("lr_schedule") {
        None => "cosine".to_string(),
        Some(Value::String(s)) if ["cosine", "linear", "constant"].contains(&s.as_str()) => s.clone(),
        Some(_) => return Err(ApiError::invalid("hyperparameters.lr_schedule", "one of cosine, linear, constant")),
    };
    let use_rslora = match fields.get("use_rslora") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::invalid("hyperparameters.use_rslora", "true or false")),
    };
    let rank = whole(fields, &limits::RANK.at_most(max_rank as f64))?.unwrap_or(8);
    Ok(Hyperparameters {
        n_epochs: number(fields, &limits::EPOCHS)?.unwrap_or(1.0),
        batch_size: whole(fields, &limits::BATCH_SIZE)?.unwrap_or(8),
        learning_rate_multiplier: number(fields, &limits::LEARNING_RATE_MULTIPLIER)?.unwrap_or(1.0),
        n_steps: whole(fields, &limits::STEPS)?,
        lora_rank: rank,
        lora_alpha: number(fields, &limits::ALPHA)?.unwrap_or(2.0 * rank as f64),
        target_modules,
        use_rslora,
        warmup_steps: whole(fields, &limits::WARMUP)?.unwrap_or(0),
        lr_schedule,
        lr_schedule_steps: whole(fields, &limits::SCHEDULE_STEPS)?,
        min_lr_ratio: number(fields, &limits::MIN_LR_RATIO)?.unwrap_or(0.0),
        max_seq_len: whole(fields, &limits::MAX_SEQ_LEN.at_most(context as f64))?.unwrap_or(512.min(context)),
    })
}

/// Refuses a run that would need more memory than training may take here.
fn check_memory(h: &Hyperparameters, info: &ModelInfo, threads: usize, allowed: u64) -> Result<(), ApiError> {
    let shape = limits::RunShape {
        batch_size: h.batch_size,
        max_seq_len: h.max_seq_len,
        rank: h.lora_rank,
        targets: h.target_modules.len(),
        threads,
    };
    let needed = limits::memory_estimate(&info.config, shape);
    if needed <= allowed {
        return Ok(());
    }
    Err(ApiError::invalid(
        "hyperparameters.batch_size",
        format!(
            "a run of batch_size {} × max_seq_len {} on this model needs about {}; this server lets training use {} \
             (--max-train-memory): lower batch_size or max_seq_len",
            h.batch_size,
            h.max_seq_len,
            limits::show_bytes(needed),
            limits::show_bytes(allowed)
        ),
    ))
}

/// Queues a job training a LoRA adapter on the served base (or continuing a fine-tuned model).
#[utoipa::path(post, path = "/v1/fine_tuning/jobs", tag = "fine-tuning", request_body = CreateJob,
    responses((status = 200, body = Job), (status = 429, description = "Too many jobs queued (--max-queued-jobs)", body = ErrorEnvelope),
        (status = 507, description = "A storage cap or the disk's reserve", body = ErrorEnvelope), (status = 400, description = "Invalid request", body = ErrorEnvelope), (status = 401, description = "Missing or wrong API key", body = ErrorEnvelope), (status = 403, description = "Needs the admin key", body = ErrorEnvelope), (status = 404, description = "Not found", body = ErrorEnvelope), (status = 503, description = "Fine-tuning unavailable (no writable data directory) or the model is loading", body = ErrorEnvelope)))]
async fn create(State(state): State<AppState>, AppJson(req): AppJson<CreateJob>) -> Result<Json<Job>, ApiError> {
    let service = service(&state)?;
    let info = state.model()?;
    // The served base, or one of its fine-tuned models (its adapter is continued).
    let parent = if req.model == info.id {
        None
    } else if let Some(parent) = service.fine_tuned(&req.model) {
        Some(parent)
    } else {
        return Err(ApiError::invalid(
            "model",
            format!(
                "this server fine-tunes the model it serves, `{}`, or a model fine-tuned from it, not `{}`",
                info.id, req.model
            ),
        ));
    };
    if !req.integrations.is_empty() {
        return Err(ApiError::unsupported("integrations", "(Weights & Biases and others)"));
    }
    if let Some(suffix) = &req.suffix {
        let ok = !suffix.is_empty()
            && suffix.len() <= 40
            && suffix.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !ok {
            return Err(ApiError::invalid("suffix", "up to 40 letters, digits, `-`, `_` or `.`"));
        }
    }
    // The newer `method` field holds the same hyperparameters; top-level ones win.
    let mut fields = req
        .method
        .as_ref()
        .and_then(|m| m.pointer("/supervised/hyperparameters"))
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    if let Some(kind) = req.method.as_ref().and_then(|m| m.get("type")).and_then(Value::as_str) {
        if kind != "supervised" {
            return Err(ApiError::unsupported("method.type", &format!("`{kind}`")));
        }
    }
    fields.extend(req.hyperparameters);
    if parent.is_some() {
        if let Some(shape) =
            ["lora_rank", "lora_alpha", "target_modules", "use_rslora"].iter().find(|f| fields.contains_key(**f))
        {
            return Err(ApiError::invalid(
                format!("hyperparameters.{shape}"),
                "a fine-tuned model is continued with its adapter's own rank, alpha, target modules and rsLoRA setting",
            ));
        }
    }
    let mut hyperparameters = hyperparameters(&fields, info.adapters.max_rank(), info.max_model_len)?;
    if let Some(parent) = &parent {
        let kept = &parent.hyperparameters;
        hyperparameters.lora_rank = kept.lora_rank;
        hyperparameters.lora_alpha = kept.lora_alpha;
        hyperparameters.target_modules = kept.target_modules.clone();
        hyperparameters.use_rslora = kept.use_rslora;
    }
    check_memory(&hyperparameters, &info, service.train_threads(), service.max_train_memory())?;
    let seed = req.seed.unwrap_or_else(|| uuid::Uuid::new_v4().as_u64_pair().0 % 1_000_000);
    let mut job = Job::new(
        req.model.clone(),
        req.training_file,
        req.validation_file,
        hyperparameters,
        req.suffix,
        seed,
        req.metadata,
    );
    job.base_model = parent.map(|_| info.id.clone());
    let job = state.blocking(move || Ok(service.create(job)?)).await?;
    tracing::info!(job = %job.id, "fine-tuning job queued");
    Ok(Json(job))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
struct Page {
    after: Option<String>,
    limit: Option<usize>,
}

/// One page of a newest-first list: the items after `after`, at most `limit` (20).
fn page<T>(items: Vec<T>, id: impl Fn(&T) -> &str, page: &Page) -> ListPage<T> {
    let start = page.after.as_ref().and_then(|after| items.iter().position(|i| id(i) == after)).map_or(0, |p| p + 1);
    let limit = page.limit.unwrap_or(20).clamp(1, 100);
    let has_more = items.len() > start + limit;
    let data: Vec<T> = items.into_iter().skip(start).take(limit).collect();
    ListPage { object: "list", data, has_more }
}

/// The jobs, newest first.
#[utoipa::path(get, path = "/v1/fine_tuning/jobs", tag = "fine-tuning", params(Page),
    responses((status = 200, body = ListPage<Job>), (status = 400, description = "Invalid request", body = ErrorEnvelope), (status = 401, description = "Missing or wrong API key", body = ErrorEnvelope), (status = 403, description = "Needs the admin key", body = ErrorEnvelope), (status = 404, description = "Not found", body = ErrorEnvelope), (status = 503, description = "Fine-tuning unavailable (no writable data directory) or the model is loading", body = ErrorEnvelope)))]
async fn list(State(state): State<AppState>, Query(query): Query<Page>) -> Result<Json<ListPage<Job>>, ApiError> {
    Ok(Json(page(service(&state)?.jobs(), |j| &j.id, &query)))
}

/// One job.
#[utoipa::path(get, path = "/v1/fine_tuning/jobs/{id}", tag = "fine-tuning", params(("id" = String, Path, description = "A job id")),
    responses((status = 200, body = Job), (status = 400, description = "Invalid request", body = ErrorEnvelope), (status = 401, description = "Missing or wrong API key", body = ErrorEnvelope), (status = 403, description = "Needs the admin key", body = ErrorEnvelope), (status = 404, description = "Not found", body = ErrorEnvelope), (status = 503, description = "Fine-tuning unavailable (no writable data directory) or the model is loading", body = ErrorEnvelope)))]
async fn retrieve(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<Job>, ApiError> {
    Ok(Json(service(&state)?.job(&id)?))
}

/// A job's events, newest first.
#[utoipa::path(get, path = "/v1/fine_tuning/jobs/{id}/events", tag = "fine-tuning",
    params(("id" = String, Path, description = "A job id"), Page),
    responses((status = 200, body = ListPage<JobEvent>), (status = 400, description = "Invalid request", body = ErrorEnvelope), (status = 401, description = "Missing or wrong API key", body = ErrorEnvelope), (status = 403, description = "Needs the admin key", body = ErrorEnvelope), (status = 404, description = "Not found", body = ErrorEnvelope), (status = 503, description = "Fine-tuning unavailable (no writable data directory) or the model is loading", body = ErrorEnvelope)))]
async fn events(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(query): Query<Page>,
) -> Result<Json<ListPage<JobEvent>>, ApiError> {
    let service = service(&state)?;
    let events = state.blocking(move || Ok(service.events(&id)?)).await?;
    Ok(Json(page(events, |e| &e.id, &query)))
}

/// Cancels a queued or running job.
#[utoipa::path(post, path = "/v1/fine_tuning/jobs/{id}/cancel", tag = "fine-tuning", params(("id" = String, Path, description = "A job id")),
    responses((status = 200, body = Job), (status = 400, description = "Invalid request", body = ErrorEnvelope), (status = 401, description = "Missing or wrong API key", body = ErrorEnvelope), (status = 403, description = "Needs the admin key", body = ErrorEnvelope), (status = 404, description = "Not found", body = ErrorEnvelope), (status = 503, description = "Fine-tuning unavailable (no writable data directory) or the model is loading", body = ErrorEnvelope)))]
async fn cancel(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<Job>, ApiError> {
    let service = service(&state)?;
    Ok(Json(state.blocking(move || Ok(service.cancel(&id)?)).await?))
}
