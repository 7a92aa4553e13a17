//! One generation in flight: its KV cache and the per-token state that turns
//! sampled ids into released text.

use super::detokenizer::IncrementalDecoder;
use super::request::{Event, FinishReason, GenerationRequest, Usage};
use super::sampling::Sampler;
use super::stop::StopMatcher;
use crate::model::KvCache;
use crate::tokenizer::Tokenizer;

pub struct Sequence {
    pub prompt: Vec<u32>,
    pub adapter: Option<std::sync::Arc<crate::model::lora::AdapterWeights>>,
    pub generated: Vec<u32>,
    pub cache: KvCache,
    sampler: Sampler,
    decoder: IncrementalDecoder,
    stops: StopMatcher,
    max_tokens: usize,
    ignore_eos: bool,
    events: tokio::sync::mpsc::UnboundedSender<Event>,
    pub span: tracing::Span,
    finished: bool,
}

impl Sequence {
    pub fn new(request: GenerationRequest, cache: KvCache) -> Self {
        Self {
            prompt: request.prompt,
            adapter: request.adapter,
            generated: Vec::new(),
            cache,
            sampler: Sampler::new(request.sampling),
            decoder: IncrementalDecoder::new(),
            stops: StopMatcher::new(request.stop),
            max_tokens: request.max_tokens,
            ignore_eos: request.ignore_eos,
            events: request.events,
            span: request.span,
            finished: false,
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

    /// The client went away: nobody reads the events any more.
    pub fn is_cancelled(&self) -> bool {
        self.events.is_closed()
    }

    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Samples from this step's logits and releases text. Returns true when
    /// the sequence is finished.
    pub fn accept(&mut self, logits: &mut [f32], tokenizer: &Tokenizer, eos: &[u32], max_model_len: usize) -> bool {
        let token = self.sampler.sample(logits);
        self.generated.push(token);
        if !self.ignore_eos && eos.contains(&token) {
            let rest = self.decoder.finish(tokenizer);
            let text = rest + &self.stops.finish();
            self.finish(text, FinishReason::Stop);
            return true;
        }
        let at_limit = self.generated.len() >= self.max_tokens || self.cache.len() + 1 >= max_model_len;
        let mut piece = self.decoder.push(tokenizer, token);
        if at_limit {
            piece.push_str(&self.decoder.finish(tokenizer));
        }
        let released = self.stops.push(&piece);
        if released.stopped {
            self.finish(released.text, FinishReason::Stop);
            return true;
        }
        if at_limit {
            let text = released.text + &self.stops.finish();
            self.finish(text, FinishReason::Length);
            return true;
        }
        self.send_text(released.text);
        false
    }

    pub fn fail(&mut self, message: String) {
        self.finished = true;
        let _ = self.events.send(Event::Failed(message));
    }

    fn send_text(&self, text: String) {
        if !text.is_empty() {
            // A closed channel is noticed as cancellation before the next step.
            let _ = self.events.send(Event::Text(text));
        }
    }

    fn finish(&mut self, text: String, reason: FinishReason) {
        self.send_text(text);
        self.finished = true;
        let usage = Usage { prompt_tokens: self.prompt.len(), completion_tokens: self.generated.len() };
        let _ = self.events.send(Event::Finished { reason, usage });
    }
}
