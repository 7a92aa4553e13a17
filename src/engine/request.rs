//! What crosses into the engine (validated only) and what comes back.

use std::sync::Arc;

use crate::model::lora::AdapterWeights;

use super::SamplingParams;

/// Names the engine reports a request under (metrics, `lora_requests_info`).
#[derive(Debug, Clone, Default)]
pub struct RequestTags {
    /// The model id the client named (base, adapter or preset).
    pub model: String,
    /// The adapters it applies, by name (one, or a composition's).
    pub adapters: Vec<String>,
}

/// A validated generation request: token ids in; events come back through
/// the `EventStream` that submitting returns.
pub struct GenerationRequest {
    pub prompt: Vec<u32>,
    /// The LoRA adapter to apply; held for the whole generation, so an unload
    /// meanwhile does not disturb it.
    pub adapter: Option<Arc<AdapterWeights>>,
    pub sampling: SamplingParams,
    /// Generated tokens at most (already checked against the context length).
    pub max_tokens: usize,
    pub stop: Vec<String>,
    /// Keep going past end-of-sequence tokens (fixed-length benchmarks).
    pub ignore_eos: bool,
    /// Report each prompt token's log-probability (after the first) and this
    /// many alternatives, under the model's own distribution (`echo`).
    pub prompt_logprobs: Option<usize>,
    /// Leave special tokens out of the text (false when a tool parser reads them).
    pub skip_special_tokens: bool,
    pub tags: RequestTags,
    /// Constrained decoding (`response_format`), one per sequence.
    pub constraint: Option<crate::grammar::Constraint>,
    /// The request's span: engine logs line up with the HTTP request.
    pub span: tracing::Span,
    /// The prefix-cache partition (0: shared): its `cache_salt` and, with
    /// `--prefix-cache-isolation key`, its API key.
    pub cache_partition: u64,
}

impl GenerationRequest {
    /// Where its prompt may find cached KV.
    pub fn scope(&self) -> super::prefix_cache::Scope<'_> {
        super::prefix_cache::Scope { adapter: self.adapter.as_ref(), partition: self.cache_partition }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` (or the context length) reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt_tokens: usize,
    /// Prompt tokens whose KV came from the prefix cache.
    pub cached_tokens: usize,
    pub completion_tokens: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A sampled token's log-probabilities (requests that asked), sent
    /// before the text that token releases; end-of-sequence tokens have none.
    Logprob(super::sampling::TokenLogprob),
    /// The prompt's tokens after the first, with their log-probabilities
    /// (requests that asked), sent once the prompt is prefilled.
    PromptLogprobs(Vec<super::sampling::TokenLogprob>),
    /// Newly released text (never half a character, never part of a stop string).
    Text(String),
    Finished {
        reason: FinishReason,
        /// The stop string that ended it, if one did (vLLM's `stop_reason`).
        stop: Option<String>,
        usage: Usage,
    },
    Failed(String),
}
