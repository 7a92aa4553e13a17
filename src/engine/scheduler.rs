//! The engine loop (iteration-level scheduling): between steps, admit
//! waiting requests in arrival order while the admission policy allows; each
//! step is one forward over every running sequence — one token for each
//! decoding sequence, and a chunk of prompt for prefilling ones within a
//! token budget, so a long prompt never stalls running streams.

use std::sync::Arc;

use tokio::sync::{mpsc, watch};

use super::request::GenerationRequest;
use super::sequence::Sequence;
use super::{EngineConfig, EngineStats, EngineStatus};
use crate::loader::{Loaded, ModelInfo};
use crate::model::llama::Logits;
use crate::model::{BatchRow, Llama};

/// Who may join the running batch, and how much prompt a step may prefill.
#[derive(Debug, Clone)]
pub struct Admission {
    pub max_num_seqs: usize,
    /// Tokens of KV cache all running sequences may reserve together
    /// (each reserves prompt + max_tokens, so nothing is ever preempted).
    pub max_kv_tokens: usize,
    /// Tokens one step may process (decode tokens count one each).
    pub max_batch_tokens: usize,
}

impl Admission {
    pub fn from_config(config: &EngineConfig) -> Self {
        Self {
            max_num_seqs: config.max_num_seqs.max(1),
            max_kv_tokens: config.max_kv_tokens,
            max_batch_tokens: config.max_batch_tokens.max(1),
        }
    }

    /// FIFO: the head of the queue joins when a slot and its KV reservation
    /// fit; nobody behind it may overtake (no starvation of long requests).
    pub fn admits(&self, running: usize, reserved: usize, need: usize) -> bool {
        running < self.max_num_seqs && (running == 0 || reserved + need <= self.max_kv_tokens)
    }
}

pub(super) fn run(
    load: impl FnOnce() -> Result<Loaded, String>,
    config: EngineConfig,
    queue: mpsc::Receiver<GenerationRequest>,
    status: watch::Sender<EngineStatus>,
    stats: watch::Sender<EngineStats>,
) {
    let started = std::time::Instant::now();
    let loaded = match load() {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot load the model");
            let _ = status.send(EngineStatus::Failed(e));
            return;
        }
    };
    let info = Arc::new(loaded.info);
    tracing::info!(
        model = %info.id,
        mode = ?info.mode,
        projection_mb = loaded.model.projection_bytes() / (1 << 20),
        seconds = started.elapsed().as_secs_f32(),
        "model loaded"
    );
    let admission = Admission::from_config(&config);
    let start = || {
        warm_up(&loaded.model);
        let _ = status.send(EngineStatus::Ready(info.clone()));
        serve(&loaded.model, &info, &admission, queue, &stats)
    };
    // The engine loop runs as a worker of the compute pool, so it takes part
    // in every parallel kernel instead of sleeping while others run it.
    match rayon::ThreadPoolBuilder::new().num_threads(config.threads.max(1)).build() {
        Ok(pool) => pool.install(start),
        Err(e) => {
            tracing::warn!(error = %e, "no dedicated compute pool; running on the global one");
            start()
        }
    }
    let _ = status.send(EngineStatus::Stopped);
}

/// One short prefill and one decode step before the server reports ready,
/// so the first request does not pay for first-touch page faults and the
/// pool's start-up (llama-server warms up the same way).
fn warm_up(model: &Llama) {
    let started = std::time::Instant::now();
    let mut cache = model.new_cache(16);
    let prompt = [0u32; 8];
    for tokens in [&prompt[..], &prompt[..1]] {
        let row = BatchRow { tokens, cache: &mut cache, logits: crate::model::llama::Logits::Last, adapter: None };
        if let Err(e) = model.forward(&mut [row]) {
            tracing::warn!(error = %e, "warm-up step failed");
            return;
        }
    }
    tracing::info!(ms = started.elapsed().as_millis() as u64, "warmed up");
}

/// Runs until every submitting handle is gone and no sequence is left.
pub fn serve(
    model: &Llama,
    info: &ModelInfo,
    admission: &Admission,
    mut queue: mpsc::Receiver<GenerationRequest>,
    stats: &watch::Sender<EngineStats>,
) {
    let mut running: Vec<Sequence> = Vec::new();
    // The head of the queue, taken out but not admitted yet (FIFO).
    let mut head: Option<GenerationRequest> = None;
    let mut steps = 0u64;
    loop {
        loop {
            // A full batch takes nothing from the queue, so the queue's bound
            // is what decides 429s; only a request that waits for KV room is
            // held at the head.
            if head.is_none() && running.len() >= admission.max_num_seqs {
                break;
            }
            if head.is_none() {
                head = if running.is_empty() {
                    // Nothing to run: block until a request (or the end).
                    match queue.blocking_recv() {
                        Some(r) => Some(r),
                        None => return,
                    }
                } else {
                    queue.try_recv().ok()
                };
            }
            let Some(next) = head.take() else { break };
            if next.events.is_closed() {
                continue;
            }
            let reserved: usize = running.iter().map(Sequence::reservation).sum();
            let need = next.prompt.len() + next.max_tokens;
            if !admission.admits(running.len(), reserved, need) {
                head = Some(next);
                break;
            }
            running.push(Sequence::new(next, model.new_cache(need)));
        }
        running.retain(|s| {
            if s.is_cancelled() {
                tracing::debug!(parent: &s.span, generated = s.generated.len(), "client gone, sequence cancelled");
            }
            !s.is_cancelled()
        });
        if !running.is_empty() {
            step(model, info, admission, &mut running);
            running.retain(|s| !s.is_finished());
            steps += 1;
        }
        let _ = stats.send(EngineStats {
            running: running.len(),
            kv_tokens: running.iter().map(|s| s.cache.len()).sum(),
            reserved_tokens: running.iter().map(Sequence::reservation).sum(),
            steps,
        });
    }
}

/// One forward over all running sequences: decoding ones first (one token
/// each), then prompt chunks in arrival order within the token budget.
fn step(model: &Llama, info: &ModelInfo, admission: &Admission, running: &mut [Sequence]) {
    let mut budget = admission.max_batch_tokens;
    let mut inputs: Vec<Option<Vec<u32>>> = vec![None; running.len()];
    for (i, s) in running.iter().enumerate() {
        if !s.is_prefilling() {
            inputs[i] = Some(s.next_input(1).to_vec());
            budget = budget.saturating_sub(1);
        }
    }
    for (i, s) in running.iter().enumerate() {
        if s.is_prefilling() && budget > 0 {
            let chunk = s.next_input(budget).to_vec();
            budget -= chunk.len();
            inputs[i] = Some(chunk);
        }
    }
    let mut rows: Vec<BatchRow> = Vec::new();
    let mut members: Vec<usize> = Vec::new();
    for (i, (s, input)) in running.iter_mut().zip(&inputs).enumerate() {
        let Some(tokens) = input else { continue };
        let completes_prompt = !s.is_prefilling() || s.prefilled() + tokens.len() == s.prompt.len();
        rows.push(BatchRow {
            tokens,
            cache: &mut s.cache,
            logits: if completes_prompt { Logits::Last } else { Logits::None },
            adapter: s.adapter.as_ref(),
        });
        members.push(i);
    }
    let logits = match model.forward(&mut rows) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "forward failed");
            for i in members {
                running[i].fail(format!("generation failed: {e}"));
            }
            return;
        }
    };
    for (i, logits) in members.into_iter().zip(logits) {
        let seq = &mut running[i];
        if seq.is_prefilling() {
            continue; // a prompt chunk: no token yet
        }
        let span = seq.span.clone();
        let _enter = span.enter();
        match logits.squeeze(0).and_then(|l| l.to_vec1::<f32>()) {
            Ok(mut l) => {
                seq.accept(&mut l, &info.tokenizer, &info.eos_token_ids, info.max_model_len);
            }
            Err(e) => seq.fail(format!("generation failed: {e}")),
        }
    }
}
