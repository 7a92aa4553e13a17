//! The engine's metrics, recorded where they happen: time to first token
//! and inter-token latency as tokens are sampled, queue time at admission,
//! end-to-end latency, tokens and finish reasons as sequences leave, step
//! time and batch size after every step.

use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::{Histogram, IntCounter};

use super::sequence::Sequence;
use crate::metrics::Metrics;

pub(super) struct Telemetry {
    metrics: Arc<Metrics>,
    model: String,
    ttft: Histogram,
    itl: Histogram,
    e2e: Histogram,
    queue: Histogram,
    prompt_tokens: IntCounter,
    prefix_queries: IntCounter,
    prefix_hits: IntCounter,
    generation_tokens: IntCounter,
    step: Histogram,
    batch_size: Histogram,
    batch_tokens: Histogram,
    pub panics: IntCounter,
}

impl Telemetry {
    pub fn new(metrics: Arc<Metrics>, model: &str) -> Self {
        let label = [model];
        Self {
            ttft: metrics.time_to_first_token.with_label_values(&label),
            itl: metrics.inter_token_latency.with_label_values(&label),
            e2e: metrics.e2e_latency.with_label_values(&label),
            queue: metrics.queue_time.with_label_values(&label),
            prompt_tokens: metrics.prompt_tokens.with_label_values(&label),
            prefix_queries: metrics.prefix_cache_queries.with_label_values(&label),
            prefix_hits: metrics.prefix_cache_hits.with_label_values(&label),
            generation_tokens: metrics.generation_tokens.with_label_values(&label),
            step: metrics.step_seconds.with_label_values(&label),
            batch_size: metrics.batch_size.with_label_values(&label),
            batch_tokens: metrics.batch_tokens.with_label_values(&label),
            panics: metrics.engine_panics.with_label_values(&label),
            model: model.to_string(),
            metrics,
        }
    }

    pub fn admitted(&self, seq: &Sequence, prefix_cache: bool) {
        self.queue.observe(seconds(seq.timing.admitted - seq.timing.arrived));
        if prefix_cache {
            self.prefix_queries.inc_by(seq.prompt.len() as u64);
            self.prefix_hits.inc_by(seq.cached as u64);
        }
    }

    /// A token was sampled for `seq` just now.
    pub fn token(&self, seq: &mut Sequence) {
        let now = Instant::now();
        let timing = &mut seq.timing;
        match timing.last_token {
            None => {
                self.ttft.observe(seconds(now - timing.arrived));
                timing.first_token = Some(now);
            }
            Some(last) => self.itl.observe(seconds(now - last)),
        }
        timing.last_token = Some(now);
    }

    /// `seq` leaves the engine (finished, failed or cancelled): its tokens
    /// count; finished ones count as successes by reason.
    pub fn left(&self, seq: &Sequence) {
        self.prompt_tokens.inc_by(seq.prefilled() as u64);
        self.generation_tokens.inc_by(seq.generated.len() as u64);
        let labels = [self.model.as_str(), seq.tags.model.as_str()];
        self.metrics.model_prompt_tokens.with_label_values(&labels).inc_by(seq.prefilled() as u64);
        self.metrics.model_generation_tokens.with_label_values(&labels).inc_by(seq.generated.len() as u64);
        if let Some(reason) = seq.finish_reason() {
            self.e2e.observe(seconds(seq.timing.arrived.elapsed()));
            self.metrics.request_success.with_label_values(&[self.model.as_str(), reason.as_str()]).inc();
        }
    }

    /// A step's batch, recorded before it runs: whoever sees its tokens'
    /// events also sees them counted.
    pub fn batch(&self, sequences: usize, tokens: usize) {
        self.batch_size.observe(sequences as f64);
        self.batch_tokens.observe(tokens as f64);
    }

    pub fn step(&self, elapsed: Duration) {
        self.step.observe(seconds(elapsed));
    }
}

fn seconds(d: Duration) -> f64 {
    d.as_secs_f64()
}
