//! One generation in flight: its KV cache and the per-token state that turns
//! sampled ids into released text.

use std::sync::Arc;
use std::time::Instant;

use super::detokenizer::IncrementalDecoder;
use super::queue::{Queued, Ticket};
use super::request::{Event, FinishReason, RequestTags, Usage};
use super::sampling::Sampler;
use super::stop::StopMatcher;
use crate::model::KvCache;
use crate::tokenizer::Tokenizer;

pub struct Sequence {
    pub prompt: Vec<u32>,
    pub adapter: Option<std::sync::Arc<crate::model::lora::AdapterWeights>>,
    /// The prefix-cache partition its KV may be shared within.
    pub partition: u64,
    pub generated: Vec<u32>,
    pub cache: KvCache,
    sampler: Sampler,
    decoder: IncrementalDecoder,
    stops: StopMatcher,
    constraint: Option<crate::grammar::Constraint>,
    max_tokens: usize,
    ignore_eos: bool,
    /// Alternatives per prompt token when the request wants prompt log-probabilities.
    prompt_logprobs: Option<usize>,
    /// Prompt log-probabilities gathered over the prefill's chunks.
    prompt_entries: Vec<super::sampling::TokenLogprob>,
    events: tokio::sync::mpsc::UnboundedSender<Event>,
    ticket: Arc<Ticket>,
    pub tags: RequestTags,
    pub span: tracing::Span,
    pub timing: Timing,
    /// Prompt tokens whose KV was copied rather than computed (the prefix
    /// cache, or a running sequence whose prompt starts alike).
    pub cached: usize,
    /// Set once the sequence ends: how (None when it failed).
    outcome: Option<Option<FinishReason>>,
}

/// When things happened to a sequence (for the latency metrics).
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub arrived: Instant,
    pub admitted: Instant,
    pub first_token: Option<Instant>,
    pub last_token: Option<Instant>,
}

impl Sequence {
    pub(super) fn new(queued: Queued, cache: KvCache) -> Self {
        let Queued { request, events, ticket, arrived } = queued;
        let sampler = Sampler::new(request.sampling, &request.prompt);
        Self {
            prompt: request.prompt,
            adapter: request.adapter,
            partition: request.cache_partition,
            generated: Vec::new(),
            cache,
            sampler,
            decoder: IncrementalDecoder::new(request.skip_special_tokens),
            stops: StopMatcher::new(request.stop),
            constraint: request.constraint,
            max_tokens: request.max_tokens,
            ignore_eos: request.ignore_eos,
            prompt_logprobs: request.prompt_logprobs,
            prompt_entries: Vec::new(),
            events,
            ticket,
            tags: request.tags,
            span: request.span,
            timing: Timing { arrived, admitted: Instant::now(), first_token: None, last_token: None },
            cached: 0,
            outcome: None,
        }
    }

    /// Prompt tokens already in the KV cache.
    pub fn prefilled(&self) -> usize {
        self.cache.len().min(self.prompt.len())
    }

    /// Still feeding the prompt (in chunks).
    pub fn is_prefilling(&self) -> bool {
        self.prefilled() < self.prompt.len()
    }

    /// The tokens this step feeds: up to `budget` more prompt tokens while
    /// prefilling, then the last generated token.
    pub fn next_input(&self, budget: usize) -> &[u32] {
        if self.is_prefilling() {
            let start = self.prefilled();
            return &self.prompt[start..(start + budget.max(1)).min(self.prompt.len())];
        }
        match self.generated.last() {
            Some(last) => std::slice::from_ref(last),
            None => &self.prompt[self.prompt.len() - 1..],
        }
    }

    /// KV tokens this sequence may come to hold: admission reserves them up front.
    pub fn reservation(&self) -> usize {
        self.prompt.len() + self.max_tokens
    }

    /// The client went away (nobody reads the events any more) or a
    /// watchdog ended the request.
    pub fn is_cancelled(&self) -> bool {
        self.events.is_closed() || self.ticket.is_cancelled()
    }

    /// Every token fed or generated so far, in order (what the cache holds, and one more).
    pub fn tokens(&self) -> Vec<u32> {
        self.prompt.iter().chain(&self.generated).copied().collect()
    }

    /// Whether it ended well (finished or left), so its cache is whole.
    pub fn cache_is_whole(&self) -> bool {
        !matches!(self.outcome, Some(None))
    }

    /// Where its KV may be shared: its adapter's weights, within its partition.
    pub fn scope(&self) -> super::prefix_cache::Scope<'_> {
        super::prefix_cache::Scope { adapter: self.adapter.as_ref(), partition: self.partition }
    }

    /// Whether another sequence's KV could be this one's (same weights, same partition).
    pub fn shares_scope(&self, other: &Sequence) -> bool {
        self.partition == other.partition
            && super::prefix_cache::same_adapter(self.adapter.as_ref(), other.adapter.as_ref())
    }

    /// Whether a prefill step must return logits for every position.
    pub fn wants_prompt_logprobs(&self) -> bool {
        self.prompt_logprobs.is_some()
    }

    /// Records the prompt log-probabilities of a prefill chunk that started
    /// at position `start`: row r of `logits` (one row per chunk position)
    /// predicts prompt token start + r + 1. Sends them all once the prompt
    /// is done.
    pub fn record_prompt_logprobs(&mut self, start: usize, logits: &[f32], vocab: usize) {
        let Some(k) = self.prompt_logprobs else { return };
        for (r, row) in logits.chunks_exact(vocab).enumerate() {
            if let Some(&next) = self.prompt.get(start + r + 1) {
                self.prompt_entries.push(super::sampling::token_logprob(row, next, k, 1.0));
            }
        }
        if !self.is_prefilling() {
            let _ = self.events.send(Event::PromptLogprobs(std::mem::take(&mut self.prompt_entries)));
        }
    }

    pub fn is_finished(&self) -> bool {
        self.outcome.is_some()
    }

    /// How it finished: `Some(reason)`, or `None` if it failed or still runs.
    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.outcome.flatten()
    }

    /// Samples from this step's logits and releases text. Returns true when
    /// the sequence is finished.
    pub fn accept(&mut self, logits: &mut [f32], tokenizer: &Tokenizer, eos: &[u32], max_model_len: usize) -> bool {
        if let Some(constraint) = &mut self.constraint {
            if let Err(e) = constraint.mask(logits, eos) {
                self.fail(format!("constrained decoding failed: {e}"));
                return true;
            }
        }
        let token = self.sampler.sample(logits);
        self.generated.push(token);
        let ends = !self.ignore_eos && eos.contains(&token);
        // The grammar ends the output once it is complete.
        let grammar_done = match (&mut self.constraint, ends) {
            (Some(constraint), false) => match constraint.advance(token) {
                Ok(done) => done,
                Err(e) => {
                    self.fail(format!("constrained decoding failed: {e}"));
                    return true;
                }
            },
            _ => false,
        };
        if !ends {
            if let Some(logprob) = self.sampler.logprobs(logits, token) {
                let _ = self.events.send(Event::Logprob(logprob));
            }
        }
        if ends {
            // The decoder's tail still passes the stop matcher, after the
            // text it holds back.
            let tail = self.decoder.finish(tokenizer);
            let released = self.stops.push(&tail);
            let text = if released.stopped() { released.text } else { released.text + &self.stops.finish() };
            self.finish(text, FinishReason::Stop, released.stop);
            return true;
        }
        let at_limit = grammar_done || self.generated.len() >= self.max_tokens || self.cache.len() + 1 >= max_model_len;
        let mut piece = self.decoder.push(tokenizer, token);
        if at_limit {
            piece.push_str(&self.decoder.finish(tokenizer));
        }
        let released = self.stops.push(&piece);
        if released.stopped() {
            self.finish(released.text, FinishReason::Stop, released.stop);
            return true;
        }
        if at_limit {
            let text = released.text + &self.stops.finish();
            self.finish(text, if grammar_done { FinishReason::Stop } else { FinishReason::Length }, None);
            return true;
        }
        self.send_text(released.text);
        false
    }

    pub fn fail(&mut self, message: String) {
        self.outcome = Some(None);
        let _ = self.events.send(Event::Failed(message));
    }

    fn send_text(&self, text: String) {
        if !text.is_empty() {
            // A closed channel is noticed as cancellation before the next step.
            let _ = self.events.send(Event::Text(text));
        }
    }

    fn finish(&mut self, text: String, reason: FinishReason, stop: Option<String>) {
        self.send_text(text);
        self.outcome = Some(Some(reason));
        let usage = Usage {
            prompt_tokens: self.prompt.len(),
            cached_tokens: self.cached,
            completion_tokens: self.generated.len(),
        };
        let _ = self.events.send(Event::Finished { reason, stop, usage });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::queue::Line;
    use crate::engine::{GenerationRequest, SamplingParams};

    /// Feeds `tokens` as if the model had chosen them (greedy on one-hot
    /// logits) and returns the released text and how it ended.
    fn run(tokens: &[u32], stop: &[&str]) -> (String, Option<FinishReason>) {
        let tokenizer = Tokenizer::bytes().expect("byte tokenizer");
        let ticket = Line::new(1).take(1).expect("a place").remove(0);
        let (events, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let request = GenerationRequest {
            prompt: vec![1],
            adapter: None,
            sampling: SamplingParams { temperature: 0.0, ..Default::default() },
            max_tokens: 100,
            stop: stop.iter().map(|s| s.to_string()).collect(),
            ignore_eos: false,
            prompt_logprobs: None,
            skip_special_tokens: true,
            tags: RequestTags::default(),
            constraint: None,
            span: tracing::Span::none(),
            cache_partition: 0,
        };
        let queued = Queued { request, events, ticket, arrived: Instant::now() };
        let mut seq = Sequence::new(queued, KvCache::default());
        for &token in tokens {
            let mut logits = vec![0.0f32; 257];
            logits[token as usize] = 10.0;
            if seq.accept(&mut logits, &tokenizer, &[256], 1000) {
                break;
            }
        }
        let mut text = String::new();
        while let Ok(event) = rx.try_recv() {
            if let Event::Text(t) = event {
                text.push_str(&t);
            }
        }
        (text, seq.finish_reason())
    }

    #[test]
    fn text_held_for_a_stop_string_comes_before_the_decoders_tail_at_eos() {
        // "x" may begin "xy" and is held; 0xE2 begins a character that never
        // completes; EOS releases both, in order.
        assert_eq!(run(&[b'x' as u32, 0xE2, 256], &["xy"]), ("x\u{FFFD}".to_string(), Some(FinishReason::Stop)));
    }

    #[test]
    fn the_decoders_tail_at_eos_can_complete_a_stop_string() {
        assert_eq!(
            run(&[b'a' as u32, b'x' as u32, 0xE2, 256], &["x\u{FFFD}"]),
            ("a".to_string(), Some(FinishReason::Stop))
        );
    }
}
