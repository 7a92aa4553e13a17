//! The engine loop: admit waiting requests up to the batch limit, run one
//! forward over every running sequence, hand each its logits, repeat. The
//! admission policy is the only part that decides who runs.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};

use super::request::GenerationRequest;
use super::sequence::Sequence;
use super::{EngineConfig, EngineStatus};
use crate::loader::{self, LoadOptions, ModelInfo};
use crate::model::llama::Logits;
use crate::model::{BatchRow, Llama};

/// Who may join the running batch.
#[derive(Debug, Clone)]
pub struct Admission {
    pub max_num_seqs: usize,
}

impl Admission {
    pub fn has_room(&self, running: usize) -> bool {
        running < self.max_num_seqs.max(1)
    }
}

pub(super) fn run(
    model_path: PathBuf,
    load: LoadOptions,
    config: EngineConfig,
    queue: mpsc::Receiver<GenerationRequest>,
    status: watch::Sender<EngineStatus>,
) {
    let started = std::time::Instant::now();
    let loaded = match loader::load(&model_path, &load) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(path = %model_path.display(), error = %e, "cannot load the model");
            let _ = status.send(EngineStatus::Failed(e.to_string()));
            return;
        }
    };
    let info = Arc::new(loaded.info);
    tracing::info!(
        model = %info.id,
        mode = ?info.mode,
        seconds = started.elapsed().as_secs_f32(),
        "model loaded"
    );
    let _ = status.send(EngineStatus::Ready(info.clone()));
    let admission = Admission {
        max_num_seqs: config.max_num_seqs,
    };
    // The engine loop runs as a worker of the compute pool, so it takes part
    // in every parallel kernel instead of sleeping while others run it.
    match rayon::ThreadPoolBuilder::new()
        .num_threads(config.threads)
        .build()
    {
        Ok(pool) => pool.install(|| serve(&loaded.model, &info, &admission, queue)),
        Err(e) => {
            tracing::warn!(error = %e, "no dedicated compute pool; running on the global one");
            serve(&loaded.model, &info, &admission, queue)
        }
    }
    let _ = status.send(EngineStatus::Stopped);
}

/// Runs until every submitting handle is gone and no sequence is left.
pub fn serve(
    model: &Llama,
    info: &ModelInfo,
    admission: &Admission,
    mut queue: mpsc::Receiver<GenerationRequest>,
) {
    let mut running: Vec<Sequence> = Vec::new();
    loop {
        // Admit: block only when there is nothing to run.
        while admission.has_room(running.len()) {
            let next = if running.is_empty() {
                match queue.blocking_recv() {
                    Some(r) => r,
                    None => return,
                }
            } else {
                match queue.try_recv() {
                    Ok(r) => r,
                    Err(_) => break,
                }
            };
            if next.events.is_closed() {
                continue;
            }
            running.push(Sequence::new(next, model.new_cache()));
        }
        running.retain(|s| {
            if s.is_cancelled() {
                tracing::debug!(parent: &s.span, generated = s.generated.len(), "client gone, sequence cancelled");
            }
            !s.is_cancelled()
        });
        if running.is_empty() {
            continue;
        }
        step(model, info, &mut running);
        running.retain(|s| !s.is_finished());
    }
}

/// One forward over all running sequences, then one token for each.
fn step(model: &Llama, info: &ModelInfo, running: &mut [Sequence]) {
    let inputs: Vec<Vec<u32>> = running.iter().map(|s| s.next_input().to_vec()).collect();
    let mut rows: Vec<BatchRow> = running
        .iter_mut()
        .zip(&inputs)
        .map(|(s, tokens)| BatchRow {
            tokens,
            cache: &mut s.cache,
            logits: Logits::Last,
            adapter: s.adapter.as_ref(),
        })
        .collect();
    let logits = match model.forward(&mut rows) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "forward failed");
            for s in running.iter_mut() {
                s.fail(format!("generation failed: {e}"));
            }
            return;
        }
    };
    for (seq, logits) in running.iter_mut().zip(logits) {
        let span = seq.span.clone();
        let _enter = span.enter();
        match logits.squeeze(0).and_then(|l| l.to_vec1::<f32>()) {
            Ok(mut l) => {
                seq.accept(
                    &mut l,
                    &info.tokenizer,
                    &info.eos_token_ids,
                    info.max_model_len,
                );
            }
            Err(e) => seq.fail(format!("generation failed: {e}")),
        }
    }
}
