//! The engine: one OS thread owns the model and every KV cache. HTTP handlers
//! submit validated requests through a bounded queue and read events from a
//! per-request channel; a closed channel cancels its sequence.
//!
//! Layout:
//! - `request`: what crosses into the engine, and the events that come back;
//! - `queue`: the waiting line's places (freed at once by a client that leaves);
//! - `telemetry`: per-request and per-step metrics, recorded where they happen;
//! - `sequence`: one generation in flight (cache, sampler, detokenizer, stops);
//! - `scheduler`: the admission policy and the step loop;
//! - `sampling`, `stop`, `detokenizer`: per-token logic.

pub mod detokenizer;
#[cfg(feature = "fault-injection")]
pub mod faults;
mod prefix_cache;
pub mod queue;
pub mod request;
pub mod sampling;
pub mod scheduler;
pub mod sequence;
mod siblings;
pub mod stop;
mod telemetry;

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};

use queue::{Line, Queued};

pub use queue::{EventStream, SubmitError, Ticket};
pub use request::{Event, FinishReason, GenerationRequest, RequestTags, Usage};
pub use sampling::{SamplingParams, TokenLogprob};

use crate::loader::{self, LoadOptions, Loaded, ModelInfo};
use crate::metrics::Metrics;

/// Limits of the engine's queue and batch.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Sequences decoded together in one step.
    pub max_num_seqs: usize,
    /// Requests waiting for a batch slot; beyond this, submissions are refused.
    pub max_waiting: usize,
    /// Compute threads of the engine's pool (the engine thread is one of them).
    pub threads: usize,
    /// KV-cache tokens the running sequences may reserve together.
    pub max_kv_tokens: usize,
    /// Tokens one step may process: bounds how much prompt a step prefills.
    pub max_batch_tokens: usize,
    /// Tokens of KV the prefix cache may keep from finished sequences (0: off).
    pub prefix_cache_tokens: usize,
    /// Where the engine records per-request and per-step metrics.
    pub metrics: Arc<Metrics>,
    /// Test-only: panics on cue.
    #[cfg(feature = "fault-injection")]
    pub faults: faults::Faults,
}

/// What the engine holds right now, published after every step.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub running: usize,
    /// Requests in line (as the line counts them: leavers are gone at once).
    pub waiting: usize,
    /// Tokens in the KV caches of running sequences.
    pub kv_tokens: usize,
    /// Tokens reserved for them (prompt + max_tokens each).
    pub reserved_tokens: usize,
    pub steps: u64,
    /// Adapter names of running and of waiting requests (distinct, sorted).
    pub running_adapters: Vec<String>,
    pub waiting_adapters: Vec<String>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_num_seqs: 8,
            max_waiting: 64,
            threads: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            max_kv_tokens: 65_536,
            max_batch_tokens: 512,
            prefix_cache_tokens: 8192,
            metrics: Arc::new(Metrics::new()),
            #[cfg(feature = "fault-injection")]
            faults: faults::Faults::default(),
        }
    }
}

/// What the engine is doing, published over `watch`.
#[derive(Clone)]
pub enum EngineStatus {
    Loading,
    Ready(Arc<ModelInfo>),
    Failed(String),
    Stopped,
}

/// A cheap, clonable handle to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    submit: mpsc::UnboundedSender<Queued>,
    status: watch::Receiver<EngineStatus>,
    stats: watch::Receiver<EngineStats>,
    line: Line,
    max_num_seqs: usize,
    max_kv_tokens: usize,
}

impl EngineHandle {
    /// Starts the engine thread, which loads the model and then serves.
    pub fn start(model_path: PathBuf, load: LoadOptions, config: EngineConfig) -> Self {
        Self::start_with(move || loader::load(&model_path, &load).map_err(|e| e.to_string()), config)
    }

    /// Starts the engine thread with any way of producing the model (tests
    /// use a tiny random one).
    pub fn start_with(load: impl FnOnce() -> Result<Loaded, String> + Send + 'static, config: EngineConfig) -> Self {
        let (submit, queue) = mpsc::unbounded_channel();
        let (status_tx, status) = watch::channel(EngineStatus::Loading);
        let (stats_tx, stats) = watch::channel(EngineStats::default());
        let line = Line::new(config.max_waiting);
        let (max_num_seqs, max_kv_tokens) = (config.max_num_seqs, config.max_kv_tokens);
        let engine_line = line.clone();
        let spawned = std::thread::Builder::new()
            .name("tailor-engine".into())
            .spawn(move || scheduler::run(load, config, queue, engine_line, status_tx, stats_tx));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the engine thread");
        }
        Self { submit, status, stats, line, max_num_seqs, max_kv_tokens }
    }

    pub fn stats(&self) -> EngineStats {
        let mut stats = self.stats.borrow().clone();
        stats.waiting = self.line.waiting();
        stats
    }

    /// Sequences one step may run together.
    pub fn max_num_seqs(&self) -> usize {
        self.max_num_seqs
    }

    /// KV tokens the running sequences may reserve together.
    pub fn max_kv_tokens(&self) -> usize {
        self.max_kv_tokens
    }

    pub fn status(&self) -> EngineStatus {
        self.status.borrow().clone()
    }

    /// Waits until the model is loaded (or failed to load).
    pub async fn wait_ready(&self) -> EngineStatus {
        let mut status = self.status.clone();
        let result = status.wait_for(|s| !matches!(s, EngineStatus::Loading)).await.map(|s| s.clone());
        result.unwrap_or(EngineStatus::Stopped)
    }

    /// Waits until the engine can no longer serve: the reason it stopped.
    pub async fn wait_stopped(&self) -> String {
        let mut status = self.status.clone();
        let stopped = status.wait_for(|s| matches!(s, EngineStatus::Failed(_) | EngineStatus::Stopped)).await;
        match stopped.as_deref() {
            Ok(EngineStatus::Failed(e)) => e.clone(),
            _ => "the engine stopped".to_string(),
        }
    }

    /// Queues one request without waiting: a full line is refused at once.
    pub fn submit(&self, request: GenerationRequest) -> Result<EventStream, SubmitError> {
        let mut streams = self.submit_all(vec![request])?;
        streams.pop().ok_or(SubmitError::Stopped)
    }

    /// Queues several requests (the prompts of one HTTP request) all or none.
    pub fn submit_all(&self, requests: Vec<GenerationRequest>) -> Result<Vec<EventStream>, SubmitError> {
        if !matches!(*self.status.borrow(), EngineStatus::Ready(_) | EngineStatus::Loading) {
            return Err(SubmitError::Stopped);
        }
        let tickets = self.line.take(requests.len())?;
        let arrived = std::time::Instant::now();
        let mut streams = Vec::with_capacity(requests.len());
        for (request, ticket) in requests.into_iter().zip(&tickets) {
            let (events, rx) = mpsc::unbounded_channel();
            let queued = Queued { request, events, ticket: ticket.clone(), arrived };
            if self.submit.send(queued).is_err() {
                tickets.iter().for_each(|t| t.cancel());
                return Err(SubmitError::Stopped);
            }
            streams.push(EventStream::new(rx, ticket.clone()));
        }
        Ok(streams)
    }
}
