//! Prometheus metrics in one registry: vLLM's names and buckets (what the
//! Gateway API Inference Extension's endpoint picker and vLLM dashboards
//! read), then tailor's own. Every series carries `model_name`, the served
//! base model id.
//!
//! Per-request histograms and counters are recorded where the event happens
//! (the engine); gauges of state (running, waiting, KV, adapters) are read
//! from their owners when `/metrics` is scraped, so they cannot drift.

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// vLLM's `time_to_first_token_seconds` buckets.
const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
    160.0, 640.0, 2560.0,
];
/// vLLM's `inter_token_latency_seconds` buckets.
const ITL_BUCKETS: &[f64] =
    &[0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0];
/// vLLM's request latency buckets (end-to-end and queue time).
const REQUEST_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0,
    1920.0, 7680.0,
];
/// Engine step wall time: a decode step of a small model takes milliseconds,
/// a long prefill chunk of a big one seconds.
const STEP_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0];
/// Adapter loads: a small adapter in a millisecond, a big one in seconds.
const LOAD_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0, 64.0, 128.0, 256.0];

pub struct Metrics {
    registry: Registry,
    // vLLM's names.
    pub running: IntGaugeVec,
    pub waiting: IntGaugeVec,
    pub kv_cache_usage: GaugeVec,
    pub lora_info: GaugeVec,
    pub prompt_tokens: IntCounterVec,
    pub prefix_cache_queries: IntCounterVec,
    pub prefix_cache_hits: IntCounterVec,
    pub generation_tokens: IntCounterVec,
    pub request_success: IntCounterVec,
    pub time_to_first_token: HistogramVec,
    pub inter_token_latency: HistogramVec,
    pub e2e_latency: HistogramVec,
    pub queue_time: HistogramVec,
    // tailor's own.
    pub requests: IntCounterVec,
    pub model_prompt_tokens: IntCounterVec,
    pub model_generation_tokens: IntCounterVec,
    pub adapter_loads: IntCounterVec,
    pub adapter_evictions: IntCounterVec,
    pub adapter_merges: IntCounterVec,
    pub adapters_resident: IntGaugeVec,
    pub adapters_registered: IntGaugeVec,
    pub adapter_bytes_resident: IntGaugeVec,
    pub adapter_memory_budget: IntGaugeVec,
    pub adapter_resolve_misses: IntCounterVec,
    pub adapter_load_seconds: HistogramVec,
    pub step_seconds: HistogramVec,
    pub batch_size: HistogramVec,
    pub batch_tokens: HistogramVec,
    pub engine_panics: IntCounterVec,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

const MODEL: &[&str] = &["model_name"];

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let gauge = |name: &str, help: &str| register(&registry, IntGaugeVec::new(Opts::new(name, help), MODEL));
        let counter = |name: &str, help: &str, labels: &[&str]| {
            register(&registry, IntCounterVec::new(Opts::new(name, help), labels))
        };
        let histogram = |name: &str, help: &str, buckets: &[f64]| {
            register(&registry, HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets.to_vec()), MODEL))
        };
        Self {
            running: gauge("vllm:num_requests_running", "Number of requests in model execution batches."),
            waiting: gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed."),
            kv_cache_usage: register(
                &registry,
                GaugeVec::new(
                    Opts::new("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage."),
                    MODEL,
                ),
            ),
            lora_info: register(
                &registry,
                GaugeVec::new(
                    Opts::new(
                        "vllm:lora_requests_info",
                        "Running stats on LoRA requests (value: Unix time of the update).",
                    ),
                    &["model_name", "max_lora", "running_lora_adapters", "waiting_lora_adapters"],
                ),
            ),
            prompt_tokens: counter("vllm:prompt_tokens_total", "Number of prefill tokens processed.", MODEL),
            prefix_cache_queries: counter(
                "vllm:prefix_cache_queries_total",
                "Prefix cache queries, in terms of number of queried tokens.",
                MODEL,
            ),
            prefix_cache_hits: counter(
                "vllm:prefix_cache_hits_total",
                "Prefix cache hits, in terms of number of cached tokens.",
                MODEL,
            ),
            generation_tokens: counter("vllm:generation_tokens_total", "Number of generation tokens processed.", MODEL),
            request_success: counter(
                "vllm:request_success_total",
                "Count of successfully processed requests.",
                &["model_name", "finished_reason"],
            ),
            time_to_first_token: histogram(
                "vllm:time_to_first_token_seconds",
                "Histogram of time to first token in seconds.",
                TTFT_BUCKETS,
            ),
            inter_token_latency: histogram(
                "vllm:inter_token_latency_seconds",
                "Histogram of inter-token latency in seconds.",
                ITL_BUCKETS,
            ),
            e2e_latency: histogram(
                "vllm:e2e_request_latency_seconds",
                "Histogram of e2e request latency in seconds.",
                REQUEST_BUCKETS,
            ),
            queue_time: histogram(
                "vllm:request_queue_time_seconds",
                "Histogram of time spent in WAITING phase for request.",
                REQUEST_BUCKETS,
            ),
            requests: counter(
                "tailor_requests_total",
                "HTTP requests by requested model id, adapter, preset, template and status code.",
                &["model_name", "model", "adapter", "preset", "template", "status"],
            ),
            model_prompt_tokens: counter(
                "tailor_prompt_tokens_total",
                "Prompt tokens of finished requests, by requested model id.",
                &["model_name", "model"],
            ),
            model_generation_tokens: counter(
                "tailor_generation_tokens_total",
                "Generated tokens of finished requests, by requested model id.",
                &["model_name", "model"],
            ),
            adapter_loads: counter("tailor_adapter_loads_total", "Adapter weights read from disk.", MODEL),
            adapter_merges: counter(
                "tailor_adapter_merges_total",
                "Adapter compositions merged into a new adapter (adapter_merge linear).",
                MODEL,
            ),
            adapter_evictions: counter(
                "tailor_adapter_evictions_total",
                "Adapter weights dropped from memory (least recently used).",
                MODEL,
            ),
            adapters_resident: gauge("tailor_adapters_resident", "Adapters whose weights are in memory."),
            adapters_registered: gauge("tailor_adapters_registered", "Adapters clients can name."),
            adapter_bytes_resident: gauge("tailor_adapter_bytes_resident", "Bytes of adapter weights in memory."),
            adapter_memory_budget: gauge(
                "tailor_adapter_memory_budget_bytes",
                "--adapter-memory: bytes of adapter weights kept in memory when no request holds them (0: no limit).",
            ),
            adapter_resolve_misses: counter(
                "tailor_adapter_resolve_misses_total",
                "Model ids looked up under the adapter roots and found nowhere.",
                MODEL,
            ),
            adapter_load_seconds: histogram(
                "tailor_adapter_load_seconds",
                "Time to read and check one adapter's weights from disk.",
                LOAD_BUCKETS,
            ),
            step_seconds: histogram("tailor_engine_step_seconds", "Wall time of one engine step.", STEP_BUCKETS),
            batch_size: histogram("tailor_engine_batch_size", "Sequences in one engine step.", BATCH_BUCKETS),
            batch_tokens: histogram(
                "tailor_engine_batch_tokens",
                "Tokens (prompt chunks and decodes) in one engine step.",
                &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0],
            ),
            engine_panics: counter(
                "tailor_engine_panics_total",
                "Engine steps that panicked (their sequences ended with an error).",
                MODEL,
            ),
            registry: registry.clone(),
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buffer) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        String::from_utf8(buffer).unwrap_or_default()
    }
}

/// Registers a collector built from constant, valid options: a failure is a
/// programming error caught by every test that builds `Metrics`.
fn register<C: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    collector: prometheus::Result<C>,
) -> C {
    let collector = collector.expect("metric options are valid");
    registry.register(Box::new(collector.clone())).expect("metric names are unique");
    collector
}

/// Raises a counter to `total` (for totals another component keeps).
pub fn raise_to(counter: &prometheus::IntCounter, total: u64) {
    let now = counter.get();
    if total > now {
        counter.inc_by(total - now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_renders_with_its_type() {
        let m = Metrics::new();
        m.running.with_label_values(&["m"]).set(2);
        m.request_success.with_label_values(&["m", "stop"]).inc();
        m.time_to_first_token.with_label_values(&["m"]).observe(0.03);
        let text = m.render();
        assert!(text.contains("# TYPE vllm:num_requests_running gauge"), "{text}");
        assert!(text.contains("vllm:num_requests_running{model_name=\"m\"} 2"), "{text}");
        assert!(text.contains("# TYPE vllm:request_success_total counter"), "{text}");
        assert!(text.contains("vllm:time_to_first_token_seconds_bucket{model_name=\"m\",le=\"0.04\"} 1"), "{text}");
        assert!(text.contains("vllm:time_to_first_token_seconds_bucket{model_name=\"m\",le=\"0.02\"} 0"), "{text}");
    }

    #[test]
    fn raise_to_never_lowers() {
        let m = Metrics::new();
        let c = m.adapter_loads.with_label_values(&["m"]);
        raise_to(&c, 3);
        raise_to(&c, 2);
        assert_eq!(c.get(), 3);
    }
}
