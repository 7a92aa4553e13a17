//! The engine loop (iteration-level scheduling): between steps, admit
//! waiting requests in arrival order while the admission policy allows; each
//! step is one forward over every running sequence — one token for each
//! decoding sequence, and a chunk of prompt for prefilling ones within a
//! token budget, so a long prompt never stalls running streams.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, watch};

use super::prefix_cache::PrefixCache;
use super::queue::{Line, Queued};
use super::sequence::Sequence;
use super::telemetry::Telemetry;
use super::{EngineConfig, EngineStats, EngineStatus};
use crate::loader::{Loaded, ModelInfo};
use crate::model::llama::Logits;
use crate::model::{BatchRow, Llama, BLOCK_TOKENS};

/// Who may join the running batch, and how much prompt a step may prefill.
#[derive(Debug, Clone)]
pub struct Admission {
    pub max_num_seqs: usize,
    /// Tokens of KV cache all running sequences may reserve together
    /// (each reserves prompt + max_tokens, so nothing is ever preempted),
    /// rounded up to whole blocks.
    pub max_kv_tokens: usize,
    /// Tokens one step may process (decode tokens count one each).
    pub max_batch_tokens: usize,
    /// Tokens of KV the prefix cache may keep (0: off).
    pub prefix_cache_tokens: usize,
}

impl Admission {
    pub fn from_config(config: &EngineConfig) -> Self {
        Self {
            max_num_seqs: config.max_num_seqs.max(1),
            max_kv_tokens: config.max_kv_tokens,
            max_batch_tokens: config.max_batch_tokens.max(1),
            prefix_cache_tokens: config.prefix_cache_tokens,
        }
    }

    /// FIFO: the head of the queue joins when a slot and its KV reservation
    /// fit; nobody behind it may overtake (no starvation of long requests).
    pub fn admits(&self, running: usize, reserved: usize, need: usize) -> bool {
        running < self.max_num_seqs && (running == 0 || reserved + need <= self.kv_room())
    }

    /// The KV budget in whole blocks' tokens.
    pub fn kv_room(&self) -> usize {
        self.max_kv_tokens.next_multiple_of(BLOCK_TOKENS)
    }
}

pub(super) fn run(
    load: impl FnOnce() -> Result<Loaded, String>,
    config: EngineConfig,
    queue: mpsc::UnboundedReceiver<Queued>,
    line: Line,
    status: watch::Sender<EngineStatus>,
    stats: watch::Sender<EngineStats>,
) {
    let started = Instant::now();
    let loaded = match catch_unwind(AssertUnwindSafe(load)) {
        Ok(Ok(l)) => l,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "cannot load the model");
            let _ = status.send(EngineStatus::Failed(e));
            return;
        }
        Err(panic) => {
            let e = format!("loading the model panicked: {}", panic_message(&*panic));
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
    let engine = Engine {
        model: &loaded.model,
        info: &info,
        admission: Admission::from_config(&config),
        telemetry: Telemetry::new(config.metrics.clone(), &info.id),
        line,
        stats: &stats,
        prefixes: std::sync::Mutex::new(PrefixCache::new(config.prefix_cache_tokens)),
        #[cfg(feature = "fault-injection")]
        faults: config.faults.clone(),
    };
    let start = || {
        warm_up(&loaded.model);
        let _ = status.send(EngineStatus::Ready(info.clone()));
        // A panic outside a step leaves the engine's state unknown: the
        // engine stops, and the server with it.
        catch_unwind(AssertUnwindSafe(|| engine.serve(queue)))
    };
    // The engine loop runs as a worker of the compute pool, so it takes part
    // in every parallel kernel instead of sleeping while others run it.
    let outcome = match rayon::ThreadPoolBuilder::new().num_threads(config.threads.max(1)).build() {
        Ok(pool) => pool.install(start),
        Err(e) => {
            tracing::warn!(error = %e, "no dedicated compute pool; running on the global one");
            start()
        }
    };
    match outcome {
        Ok(()) => {
            let _ = status.send(EngineStatus::Stopped);
        }
        Err(panic) => {
            let e = format!("the engine panicked: {}", panic_message(&*panic));
            tracing::error!(error = %e, "the engine cannot go on");
            let _ = status.send(EngineStatus::Failed(e));
        }
    }
}

/// The text of a panic payload (`panic!` gives a `&str` or a `String`).
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_string())
}

/// One short prefill and one decode step before the server reports ready,
/// so the first request does not pay for first-touch page faults and the
/// pool's start-up (llama-server warms up the same way).
fn warm_up(model: &Llama) {
    let started = std::time::Instant::now();
    let mut cache = model.new_cache();
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

/// Everything the loop reads, borrowed from `run`.
struct Engine<'a> {
    model: &'a Llama,
    info: &'a ModelInfo,
    admission: Admission,
    telemetry: Telemetry,
    line: Line,
    stats: &'a watch::Sender<EngineStats>,
    /// KV of finished sequences, for prompts that start the same way (the
    /// engine thread alone uses it; the lock is for the pool's `Sync`).
    prefixes: std::sync::Mutex<PrefixCache>,
    #[cfg(feature = "fault-injection")]
    faults: super::faults::Faults,
}

impl Engine<'_> {
    /// Runs until every submitting handle is gone and no sequence is left.
    fn serve(&self, mut queue: mpsc::UnboundedReceiver<Queued>) {
        let mut running: Vec<Sequence> = Vec::new();
        let mut waiting: VecDeque<Queued> = VecDeque::new();
        let mut steps = 0u64;
        loop {
            if running.is_empty() && waiting.is_empty() {
                // Nothing to run: block until a request (or the end).
                match queue.blocking_recv() {
                    Some(q) => waiting.push_back(q),
                    None => return,
                }
            }
            while let Ok(q) = queue.try_recv() {
                waiting.push_back(q);
            }
            waiting.retain(|q| !q.is_abandoned());
            let before = running.len();
            let admitted = self.admit(&mut waiting, &mut running);
            self.retire(&mut running, |s| {
                let gone = s.is_cancelled();
                if gone {
                    tracing::debug!(parent: &s.span, generated = s.generated.len(), "client gone, sequence cancelled");
                }
                gone
            });
            // Published before the step too when the running set changed: a
            // client that sees its first token also sees itself running.
            if admitted > 0 || running.len() < before {
                self.publish(&running, &waiting, steps);
            }
            if !running.is_empty() {
                let started = Instant::now();
                self.step(&mut running);
                self.telemetry.step(started.elapsed());
                self.retire(&mut running, Sequence::is_finished);
                steps += 1;
            }
            self.publish(&running, &waiting, steps);
        }
    }

    /// FIFO admission: the head joins while a slot and its KV fit; nobody
    /// behind it overtakes. Returns how many joined.
    ///
    /// KV is counted in blocks: those alive (running sequences' and the
    /// prefix cache's, each once however shared) plus those the running
    /// sequences may still take to reach their reservations; the prefix
    /// cache gives way first.
    fn admit(&self, waiting: &mut VecDeque<Queued>, running: &mut Vec<Sequence>) -> usize {
        let before = running.len();
        let mut prefixes = self.prefixes.lock().unwrap_or_else(|p| p.into_inner());
        let committed = |running: &[Sequence]| {
            let growth: usize = running.iter().map(|s| s.cache.blocks_to_grow(s.reservation())).sum();
            (self.model.kv_blocks() + growth) * BLOCK_TOKENS
        };
        while running.len() < self.admission.max_num_seqs {
            let Some(head) = waiting.front() else { break };
            let need = head.request.prompt.len() + head.request.max_tokens;
            // Prompt log-probabilities need every position computed.
            let hit = match self.prefix_caching() && head.request.prompt_logprobs.is_none() {
                true => prefixes.lookup(head.request.scope(), &head.request.prompt),
                false => None,
            };
            let cache = match &hit {
                Some(hit) => self.model.new_cache().with_prefix(hit.blocks.clone(), hit.tokens),
                None => self.model.new_cache(),
            };
            let growth = cache.blocks_to_grow(need) * BLOCK_TOKENS;
            if !self.admission.admits(running.len(), committed(running), growth) {
                if prefixes.evict_one() {
                    continue;
                }
                break;
            }
            let Some(next) = waiting.pop_front() else { break };
            #[cfg(feature = "fault-injection")]
            inject(self.faults.engine_panic_token, &next.request.prompt, "engine loop");
            if !next.ticket.admit() {
                continue; // its client left meanwhile
            }
            let mut seq = Sequence::new(next, cache);
            if let Some(hit) = hit {
                prefixes.touch(&hit);
                seq.cached = hit.tokens;
            }
            self.telemetry.admitted(&seq, self.prefix_caching());
            running.push(seq);
            while committed(running) > self.admission.kv_room() && prefixes.evict_one() {}
        }
        running.len() - before
    }

    fn prefix_caching(&self) -> bool {
        self.admission.prefix_cache_tokens > 0
    }

    /// Takes the sequences `gone` picks out of `running`; a cache that
    /// ended whole goes to the prefix cache.
    fn retire(&self, running: &mut Vec<Sequence>, gone: impl Fn(&Sequence) -> bool) {
        let mut i = 0;
        while i < running.len() {
            if !gone(&running[i]) {
                i += 1;
                continue;
            }
            let seq = running.remove(i);
            self.telemetry.left(&seq);
            if self.prefix_caching() && seq.cache_is_whole() {
                let mut prefixes = self.prefixes.lock().unwrap_or_else(|p| p.into_inner());
                prefixes.keep(seq.scope(), &seq.tokens(), seq.cache.blocks(), seq.cache.len());
            }
        }
    }

    fn publish(&self, running: &[Sequence], waiting: &VecDeque<Queued>, steps: u64) {
        let names = |tags: &mut dyn Iterator<Item = &Vec<String>>| {
            let mut names: Vec<String> = tags.flatten().cloned().collect();
            names.sort();
            names.dedup();
            names
        };
        let _ = self.stats.send(EngineStats {
            running: running.len(),
            waiting: self.line.waiting(),
            kv_tokens: running.iter().map(|s| s.cache.len()).sum(),
            reserved_tokens: running.iter().map(Sequence::reservation).sum(),
            steps,
            running_adapters: names(&mut running.iter().map(|s| &s.tags.adapters)),
            waiting_adapters: names(&mut waiting.iter().map(|q| &q.request.tags.adapters)),
        });
    }

    /// One forward over all running sequences. A panic inside it ends the
    /// sequences of this step with an error; the engine goes on (the model
    /// is read-only, and their KV caches leave with them).
    fn step(&self, running: &mut [Sequence]) {
        // The step's sequences (all running ones if planning itself failed).
        let mut planned: Option<Vec<usize>> = None;
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            let wait = super::siblings::share_prefills(running);
            let plan = plan(&self.admission, running, &wait);
            planned = Some(plan.iter().map(|(i, _)| *i).collect());
            self.telemetry.batch(plan.len(), plan.iter().map(|(_, t)| t.len()).sum());
            self.execute(&plan, running);
        }));
        if let Err(panic) = outcome {
            self.telemetry.panics.inc();
            tracing::error!(panic = %panic_message(&*panic), "an engine step panicked; its sequences end with an error");
            for i in planned.unwrap_or_else(|| (0..running.len()).collect()) {
                if !running[i].is_finished() {
                    running[i].fail("internal error: the engine step running this request failed".into());
                }
            }
        }
    }

    fn execute(&self, plan: &[(usize, Vec<u32>)], running: &mut [Sequence]) {
        #[cfg(feature = "fault-injection")]
        for (i, _) in plan {
            inject(self.faults.step_panic_token, &running[*i].prompt, "engine step");
        }
        // Where each row's tokens start: prompt log-probabilities need it.
        let starts: Vec<usize> = plan.iter().map(|(i, _)| running[*i].cache.len()).collect();
        let mut rows: Vec<BatchRow> = Vec::with_capacity(plan.len());
        let mut in_plan = plan.iter().peekable();
        for (i, s) in running.iter_mut().enumerate() {
            let Some((_, tokens)) = in_plan.next_if(|(j, _)| *j == i) else { continue };
            let completes_prompt = !s.is_prefilling() || s.prefilled() + tokens.len() == s.prompt.len();
            let logits = match (s.is_prefilling() && s.wants_prompt_logprobs(), completes_prompt) {
                (true, _) => Logits::All,
                (false, true) => Logits::Last,
                (false, false) => Logits::None,
            };
            rows.push(BatchRow { tokens, cache: &mut s.cache, logits, adapter: s.adapter.as_ref() });
        }
        let logits = match self.model.forward(&mut rows) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "forward failed");
                for (i, _) in plan {
                    running[*i].fail(format!("generation failed: {e}"));
                }
                return;
            }
        };
        for (((i, tokens), logits), start) in plan.iter().zip(logits).zip(starts) {
            let seq = &mut running[*i];
            let logits = if start < seq.prompt.len() && seq.wants_prompt_logprobs() {
                // Every position of a prompt chunk: the prompt's
                // log-probabilities, then the last row samples.
                let vocab = logits.dim(1).unwrap_or(1).max(1);
                match logits.flatten_all().and_then(|l| l.to_vec1::<f32>()) {
                    Ok(all) => seq.record_prompt_logprobs(start, &all, vocab),
                    Err(e) => {
                        seq.fail(format!("generation failed: {e}"));
                        continue;
                    }
                }
                match logits.narrow(0, tokens.len() - 1, 1) {
                    Ok(last) => last,
                    Err(e) => {
                        seq.fail(format!("generation failed: {e}"));
                        continue;
                    }
                }
            } else {
                logits
            };
            if seq.is_prefilling() {
                continue; // a prompt chunk: no token yet
            }
            let span = seq.span.clone();
            let _enter = span.enter();
            match logits.squeeze(0).and_then(|l| l.to_vec1::<f32>()) {
                Ok(mut l) => {
                    seq.accept(&mut l, &self.info.tokenizer, &self.info.eos_token_ids, self.info.max_model_len);
                    self.telemetry.token(seq);
                }
                Err(e) => seq.fail(format!("generation failed: {e}")),
            }
        }
    }
}

/// What each sequence feeds this step, in `running` order: decoding ones
/// one token each, then prompt chunks in arrival order within the budget.
fn plan(admission: &Admission, running: &[Sequence], wait: &[bool]) -> Vec<(usize, Vec<u32>)> {
    let mut budget = admission.max_batch_tokens;
    let mut inputs: Vec<Option<Vec<u32>>> = vec![None; running.len()];
    for (i, s) in running.iter().enumerate() {
        if !s.is_prefilling() {
            inputs[i] = Some(s.next_input(1).to_vec());
            budget = budget.saturating_sub(1);
        }
    }
    for (i, s) in running.iter().enumerate() {
        if s.is_prefilling() && budget > 0 && !wait[i] {
            let chunk = s.next_input(budget).to_vec();
            budget -= chunk.len();
            inputs[i] = Some(chunk);
        }
    }
    inputs.into_iter().enumerate().filter_map(|(i, input)| input.map(|t| (i, t))).collect()
}

#[cfg(feature = "fault-injection")]
fn inject(token: Option<u32>, prompt: &[u32], place: &str) {
    if token.is_some() && prompt.first() == token.as_ref() {
        panic!("injected fault in the {place}");
    }
}
