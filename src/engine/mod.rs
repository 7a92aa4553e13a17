//! The engine: one OS thread owns the model and every KV cache. HTTP handlers
//! submit validated requests through a bounded queue and read events from a
//! per-request channel; a closed channel cancels its sequence.
//!
//! Layout:
//! - `request`: what crosses into the engine, and the events that come back;
//! - `sequence`: one generation in flight (cache, sampler, detokenizer, stops);
//! - `scheduler`: the admission policy and the step loop;
//! - `sampling`, `stop`, `detokenizer`: per-token logic.

pub mod detokenizer;
pub mod request;
pub mod sampling;
pub mod scheduler;
pub mod sequence;
pub mod stop;

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};

pub use request::{Event, FinishReason, GenerationRequest, Usage};
pub use sampling::SamplingParams;

use crate::loader::{self, LoadOptions, Loaded, ModelInfo};

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
}

/// What the engine holds right now, published after every step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub running: usize,
    /// Tokens in the KV caches of running sequences.
    pub kv_tokens: usize,
    /// Tokens reserved for them (prompt + max_tokens each).
    pub reserved_tokens: usize,
    pub steps: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_num_seqs: 8,
            max_waiting: 64,
            threads: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            max_kv_tokens: 65_536,
            max_batch_tokens: 512,
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

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubmitError {
    #[error("the server is overloaded: {0} requests are already waiting")]
    Overloaded(usize),
    #[error("the engine has stopped")]
    Stopped,
}

/// A cheap, clonable handle to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    submit: mpsc::Sender<GenerationRequest>,
    status: watch::Receiver<EngineStatus>,
    stats: watch::Receiver<EngineStats>,
    max_waiting: usize,
}

impl EngineHandle {
    /// Starts the engine thread, which loads the model and then serves.
    pub fn start(model_path: PathBuf, load: LoadOptions, config: EngineConfig) -> Self {
        Self::start_with(move || loader::load(&model_path, &load).map_err(|e| e.to_string()), config)
    }

    /// Starts the engine thread with any way of producing the model (tests
    /// use a tiny random one).
    pub fn start_with(load: impl FnOnce() -> Result<Loaded, String> + Send + 'static, config: EngineConfig) -> Self {
        let (submit, queue) = mpsc::channel(config.max_waiting.max(1));
        let (status_tx, status) = watch::channel(EngineStatus::Loading);
        let (stats_tx, stats) = watch::channel(EngineStats::default());
        let max_waiting = config.max_waiting;
        let spawned = std::thread::Builder::new()
            .name("tailor-engine".into())
            .spawn(move || scheduler::run(load, config, queue, status_tx, stats_tx));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the engine thread");
        }
        Self { submit, status, stats, max_waiting }
    }

    pub fn stats(&self) -> EngineStats {
        *self.stats.borrow()
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

    /// Queues a request without waiting: a full queue is refused at once.
    pub fn submit(&self, request: GenerationRequest) -> Result<(), SubmitError> {
        self.submit.try_send(request).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => SubmitError::Overloaded(self.max_waiting),
            mpsc::error::TrySendError::Closed(_) => SubmitError::Stopped,
        })
    }
}
