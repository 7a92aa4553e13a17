//! OpenAI wire types: what clients send and what they get back. Validation
//! into engine types lives in `params`; these only describe the JSON.

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

/// A string or a list of strings (`stop`).
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum StringOrList {
    One(String),
    Many(Vec<String>),
}

/// The four prompt shapes of `/v1/completions`.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

pub use crate::lora::{AdapterChoice, MergeOptions};

/// Sampling and stopping fields shared by completions and chat.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
pub struct SamplingFields {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// vLLM's extension; 0 or -1 disables it.
    pub top_k: Option<i64>,
    pub seed: Option<i64>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub stop: Option<StringOrList>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    /// Keep generating past end-of-sequence tokens (benchmarks); vLLM and llama.cpp accept it too.
    #[serde(default)]
    pub ignore_eos: bool,
    pub n: Option<i64>,
    pub logit_bias: Option<Json>,
    pub best_of: Option<i64>,
    /// vLLM's extensions.
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    /// Leave special tokens out of the text (vLLM's extension; default true).
    pub skip_special_tokens: Option<bool>,
    /// vLLM's extension: only requests with the same salt share cached
    /// prompt prefixes (so timing and `cached_tokens` reveal nothing to others).
    pub cache_salt: Option<String>,
    /// Adapters applied together, each delta with its weight (PEFT's `cat`
    /// combination), on the base model or a preset (in place of its adapter).
    pub adapters: Option<Vec<AdapterChoice>>,
    /// How `adapters` combine (`{"combination_type": "cat" | "linear" | "ties" | …, "density", …}`).
    pub adapter_merge: Option<MergeOptions>,
    /// LoRAX's shape for the same (`ids`, `weights`, `merge_strategy`).
    pub merged_adapters: Option<LoraxMerge>,
}

/// LoRAX's `merged_adapters`, taken so its clients work unchanged; the
/// strategies compute what PEFT's `add_weighted_adapter` does.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoraxMerge {
    pub ids: Vec<String>,
    /// One per id (default 1 each).
    pub weights: Option<Vec<f64>>,
    /// `linear` (LoRAX's default), `ties`, `dare_linear` or `dare_ties`.
    pub merge_strategy: Option<String>,
    /// Read by strategies that prune (not `linear`), in (0, 1].
    pub density: Option<f64>,
    /// `total` (default) or `frequency`.
    pub majority_sign_method: Option<String>,
}

impl LoraxMerge {
    /// An error about the `adapters` this became, naming LoRAX's field
    /// instead (`adapters[1].name` → `merged_adapters.ids[1]`).
    pub fn rename_param(mut e: super::ApiError) -> super::ApiError {
        if let Some(param) = e.param.as_deref().and_then(|p| p.strip_prefix("adapters")) {
            let renamed = match param.split_once(']') {
                Some((index, ".name")) => format!("merged_adapters.ids{index}]"),
                Some((index, ".weight")) => format!("merged_adapters.weights{index}]"),
                _ => "merged_adapters".to_string(),
            };
            e.param = Some(renamed);
        } else if matches!(e.param.as_deref(), Some("adapter_merge" | "adapter_merge.combination_type")) {
            e.param = Some("merged_adapters.merge_strategy".into());
        } else if let Some(field) = e.param.as_deref().and_then(|p| p.strip_prefix("adapter_merge.")) {
            e.param = Some(format!("merged_adapters.{field}"));
        }
        e
    }

    /// The same request in tailor's fields (`adapters`, `adapter_merge`).
    pub fn to_adapters(&self) -> Result<(Vec<AdapterChoice>, MergeOptions), super::ApiError> {
        use super::ApiError;
        use crate::lora::merge::{Combination, SignMethod};
        // LoRAX's strategy names, computed as PEFT's combinations of the same
        // names (LoRAX's own merge weighs A and B by wᵢ each and leaves the
        // adapters' scales out; tailor follows PEFT).
        let combination_type = match self.merge_strategy.as_deref().unwrap_or("linear") {
            "linear" => Combination::Linear,
            "ties" => Combination::Ties,
            "dare_linear" => Combination::DareLinear,
            "dare_ties" => Combination::DareTies,
            other => {
                return Err(ApiError::invalid(
                    "merged_adapters.merge_strategy",
                    format!(
                        "merge_strategy `{other}` is not one of `linear`, `ties`, `dare_linear`, `dare_ties` \
                         (tailor's `adapter_merge` has `cat` and `magnitude_prune` too)"
                    ),
                ))
            }
        };
        let majority_sign_method = match self.majority_sign_method.as_deref() {
            None | Some("total") => SignMethod::Total,
            Some("frequency") => SignMethod::Frequency,
            Some(other) => {
                return Err(ApiError::invalid(
                    "merged_adapters.majority_sign_method",
                    format!("majority_sign_method `{other}` is not `total` or `frequency`"),
                ))
            }
        };
        let weights = match &self.weights {
            Some(w) if w.len() != self.ids.len() => {
                return Err(ApiError::invalid(
                    "merged_adapters.weights",
                    format!("`weights` has {} entries for {} ids", w.len(), self.ids.len()),
                ))
            }
            Some(w) => w.iter().map(|&w| Some(w)).collect(),
            None => vec![None; self.ids.len()],
        };
        let adapters =
            self.ids.iter().zip(weights).map(|(name, weight)| AdapterChoice { name: name.clone(), weight }).collect();
        let merge = MergeOptions {
            combination_type,
            density: self.density,
            majority_sign_method: Some(majority_sign_method),
            seed: None,
            svd_rank: None,
        };
        Ok((adapters, merge))
    }
}

#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
pub struct CompletionRequest {
    #[schema(example = "SmolLM2-135M-Instruct.Q4_1")]
    pub model: String,
    /// Optional when a named template (from the request or a preset) builds the prompt.
    #[schema(example = "Once upon a time")]
    pub prompt: Option<Prompt>,
    pub template: Option<String>,
    pub template_vars: Option<serde_json::Map<String, Json>>,
    #[schema(example = 8)]
    pub max_tokens: Option<i64>,
    /// Parsed in a second pass (`json::WithSampling`), so errors keep their field path.
    #[serde(skip)]
    pub sampling: SamplingFields,
    pub logprobs: Option<Json>,
    pub echo: Option<bool>,
    pub suffix: Option<String>,
    /// Constrained output, as on chat (vLLM accepts it here too).
    pub response_format: Option<Json>,
}

#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
pub struct ChatCompletionRequest {
    #[schema(example = "SmolLM2-135M-Instruct.Q4_1")]
    pub model: String,
    #[serde(default)]
    #[schema(example = json!([{"role": "user", "content": "Hi"}]))]
    pub messages: Vec<Json>,
    pub template: Option<String>,
    pub template_vars: Option<serde_json::Map<String, Json>>,
    #[schema(example = 8)]
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    /// Parsed in a second pass (`json::WithSampling`), so errors keep their field path.
    #[serde(skip)]
    pub sampling: SamplingFields,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<Json>,
    pub tools: Option<Json>,
    pub tool_choice: Option<Json>,
    pub functions: Option<Json>,
    pub function_call: Option<Json>,
    pub response_format: Option<Json>,
    pub audio: Option<Json>,
    pub prediction: Option<Json>,
    /// Extra variables for the chat template; they win over server defaults.
    pub chat_template_kwargs: Option<serde_json::Map<String, Json>>,
    pub add_generation_prompt: Option<bool>,
    #[serde(default)]
    pub continue_final_message: bool,
    pub documents: Option<Json>,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq, Default, utoipa::ToSchema)]
pub struct UsageBody {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptTokensDetails,
}

/// OpenAI's breakdown of the prompt tokens.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq, Default, utoipa::ToSchema)]
pub struct PromptTokensDetails {
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: usize,
}

impl From<crate::engine::Usage> for UsageBody {
    fn from(u: crate::engine::Usage) -> Self {
        Self {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.prompt_tokens + u.completion_tokens,
            prompt_tokens_details: PromptTokensDetails { cached_tokens: u.cached_tokens },
        }
    }
}

impl std::ops::AddAssign for UsageBody {
    fn add_assign(&mut self, other: Self) {
        self.prompt_tokens += other.prompt_tokens;
        self.completion_tokens += other.completion_tokens;
        self.total_tokens += other.total_tokens;
        self.prompt_tokens_details.cached_tokens += other.prompt_tokens_details.cached_tokens;
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    #[schema(value_type = Option<Object>)]
    pub logprobs: Option<Json>,
    pub finish_reason: Option<&'static str>,
    /// The stop string that ended the choice (vLLM's field), when one did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<String>,
}

/// A completions response, or a streamed chunk of either endpoint.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Envelope<C> {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: String,
    pub choices: Vec<C>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageBody>,
}

pub type CompletionResponse = Envelope<CompletionChoice>;

/// A completions request as sent: its own fields and the sampling fields
/// (parsed apart, so a mistyped field keeps its path; see `json::WithSampling`).
#[derive(Deserialize, utoipa::ToSchema)]
#[allow(dead_code)] // the document's shape only
pub struct CompletionBody {
    #[serde(flatten)]
    request: CompletionRequest,
    #[serde(flatten)]
    sampling: SamplingFields,
}

/// A chat completions request as sent: its own fields and the sampling fields.
#[derive(Deserialize, utoipa::ToSchema)]
#[allow(dead_code)] // the document's shape only
pub struct ChatCompletionBody {
    #[serde(flatten)]
    request: ChatCompletionRequest,
    #[serde(flatten)]
    sampling: SamplingFields,
}

/// One server-sent event of a stream (`text/event-stream`): its `data` is
/// a chunk of the route's stream as JSON text, or `[DONE]` at the end of
/// OpenAI's streams; Responses and Messages streams name their `event`.
#[derive(Serialize, utoipa::ToSchema)]
#[allow(dead_code)] // the document's shape only
pub struct StreamEvent {
    data: String,
    event: Option<String>,
    id: Option<String>,
}

/// A list in OpenAI's shape: one page of items, and whether more follow.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ListPage<T> {
    pub object: &'static str,
    pub data: Vec<T>,
    pub has_more: bool,
}
pub type ChatCompletionChunk = Envelope<ChatChunkChoice>;

/// The fields every chunk of one response repeats.
#[derive(Debug, Clone)]
pub struct ChunkHeader {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: String,
}

impl ChunkHeader {
    /// One chunk.
    pub fn envelope<C>(&self, choices: Vec<C>, usage: Option<UsageBody>) -> Envelope<C> {
        let h = self.clone();
        Envelope {
            id: h.id,
            object: h.object,
            created: h.created,
            model: h.model,
            system_fingerprint: h.system_fingerprint,
            choices,
            usage,
        }
    }

    /// One SSE `data:` payload.
    pub fn chunk<C: Serialize>(&self, choices: Vec<C>, usage: Option<UsageBody>) -> Option<String> {
        serde_json::to_string(&self.envelope(choices, usage)).ok()
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ChatMessage {
    pub role: &'static str,
    /// `null` when the reply is a tool call.
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<Json>>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ChatChoice {
    pub index: usize,
    pub message: ChatMessage,
    #[schema(value_type = Option<Object>)]
    pub logprobs: Option<Json>,
    pub finish_reason: Option<&'static str>,
    /// The stop string that ended the choice (vLLM's field), when one did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ChatCompletionResponse {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: String,
    pub choices: Vec<ChatChoice>,
    pub usage: UsageBody,
}

#[derive(Debug, Serialize, Default, utoipa::ToSchema)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<Json>>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ChatChunkChoice {
    pub index: usize,
    pub delta: Delta,
    #[schema(value_type = Option<Object>)]
    pub logprobs: Option<Json>,
    pub finish_reason: Option<&'static str>,
    /// The stop string that ended the choice (vLLM's field), when one did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    pub root: String,
    pub parent: Option<String>,
    pub max_model_len: usize,
    /// tailor's: `base`, `adapter` or `preset`.
    pub kind: &'static str,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct TokenizeRequest {
    pub model: Option<String>,
    pub prompt: Option<String>,
    pub messages: Option<Vec<Json>>,
    pub add_generation_prompt: Option<bool>,
    #[serde(default)]
    pub continue_final_message: bool,
    pub add_special_tokens: Option<bool>,
    pub chat_template_kwargs: Option<serde_json::Map<String, Json>>,
    /// The tools a chat request would send: the count is then what the model sees.
    pub tools: Option<Json>,
    pub tool_choice: Option<Json>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TokenizeResponse {
    pub tokens: Vec<u32>,
    pub count: usize,
    pub max_model_len: usize,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct DetokenizeRequest {
    pub model: Option<String>,
    pub tokens: Vec<u32>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DetokenizeResponse {
    pub prompt: String,
}

/// The fields both generation endpoints share.
pub trait HasSampling {
    fn sampling_mut(&mut self) -> &mut SamplingFields;
    /// `model` and the requested named template.
    fn target_names(&self) -> (&str, Option<&str>);
    fn max_tokens_mut(&mut self) -> &mut Option<i64>;
}

impl HasSampling for CompletionRequest {
    fn sampling_mut(&mut self) -> &mut SamplingFields {
        &mut self.sampling
    }

    fn target_names(&self) -> (&str, Option<&str>) {
        (&self.model, self.template.as_deref())
    }

    fn max_tokens_mut(&mut self) -> &mut Option<i64> {
        &mut self.max_tokens
    }
}

impl HasSampling for ChatCompletionRequest {
    fn sampling_mut(&mut self) -> &mut SamplingFields {
        &mut self.sampling
    }

    fn target_names(&self) -> (&str, Option<&str>) {
        (&self.model, self.template.as_deref())
    }

    fn max_tokens_mut(&mut self) -> &mut Option<i64> {
        &mut self.max_tokens
    }
}
