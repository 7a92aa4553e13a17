//! `GET /metrics`: the Prometheus text format. State gauges are read from
//! their owners (engine, adapter registry) at scrape time.

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use crate::engine::EngineStatus;
use crate::metrics::raise_to;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(metrics))
}

/// Prometheus' text format: vLLM's metric names and tailor's own.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "The metrics", content_type = "text/plain", body = String)))]
async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    if let EngineStatus::Ready(info) = state.engine.status() {
        refresh(&state, &info);
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], state.metrics.render())
}

fn refresh(state: &AppState, info: &crate::loader::ModelInfo) {
    let m = &state.metrics;
    let model = [info.id.as_str()];
    let stats = state.engine.stats();
    m.running.with_label_values(&model).set(stats.running as i64);
    m.waiting.with_label_values(&model).set(stats.waiting as i64);
    let capacity = state.engine.max_kv_tokens().max(1) as f64;
    m.kv_cache_usage.with_label_values(&model).set((stats.reserved_tokens as f64 / capacity).min(1.0));
    // One series, replaced at each scrape; its value says when (as vLLM's).
    let adapters = info.adapters.counts();
    let max_lora = match info.adapters.max_loaded() {
        0 => state.engine.max_num_seqs(),
        n => n.min(state.engine.max_num_seqs()),
    };
    m.lora_info.reset();
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
    m.lora_info
        .with_label_values(&[
            info.id.as_str(),
            &max_lora.to_string(),
            &stats.running_adapters.join(","),
            &stats.waiting_adapters.join(","),
        ])
        .set(now);
    raise_to(&m.adapter_loads.with_label_values(&model), adapters.loads);
    raise_to(&m.adapter_evictions.with_label_values(&model), adapters.evictions);
    raise_to(&m.adapter_merges.with_label_values(&model), adapters.merges);
    m.adapters_resident.with_label_values(&model).set(adapters.resident as i64);
    m.adapters_registered.with_label_values(&model).set(adapters.registered as i64);
    m.adapter_bytes_resident.with_label_values(&model).set(adapters.resident_bytes as i64);
    m.adapter_memory_budget.with_label_values(&model).set(info.adapters.memory_budget() as i64);
    raise_to(&m.adapter_resolve_misses.with_label_values(&model), adapters.resolve_misses);
}
