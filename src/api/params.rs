//! Validation of request fields into engine types: every limit is checked
//! here, once, with a message that names the field, the limit and the value.

use serde_json::Value as Json;

use super::error::ApiError;
use super::types::{SamplingFields, StringOrList};
use crate::engine::SamplingParams;

/// At most this many stop strings, each at most this long (bytes).
pub const MAX_STOP_STRINGS: usize = 16;
pub const MAX_STOP_LEN: usize = 256;
/// Choices per prompt at most (`n`).
pub const MAX_N: usize = 16;
/// Entries of `logit_bias` at most (OpenAI's limit).
pub const MAX_LOGIT_BIAS: usize = 300;

/// Validated settings shared by both endpoints.
#[derive(Debug, Clone)]
pub struct Validated {
    pub sampling: SamplingParams,
    /// Choices per prompt.
    pub n: usize,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    pub ignore_eos: bool,
    /// Leave special tokens out of the generated text.
    pub skip_special_tokens: bool,
    /// Log-probabilities of the prompt's tokens, with this many alternatives (`echo`).
    pub prompt_logprobs: Option<usize>,
    /// The prefix-cache partition (`cache_salt`, and the API key when
    /// isolated by key); 0 is the shared one.
    pub cache_partition: u64,
}

/// The longest `cache_salt` taken.
const MAX_CACHE_SALT: usize = 256;

pub fn validate_sampling(f: &SamplingFields) -> Result<Validated, ApiError> {
    if f.cache_salt.as_ref().is_some_and(|s| s.is_empty() || s.len() > MAX_CACHE_SALT) {
        return Err(ApiError::invalid(
            "cache_salt",
            format!("`cache_salt` must be a non-empty string of at most {MAX_CACHE_SALT} bytes"),
        ));
    }
    let temperature = f.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            "temperature",
            format!("`temperature` must be between 0 and 2, got {temperature}"),
        ));
    }
    let top_p = f.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid("top_p", format!("`top_p` must be in (0, 1], got {top_p}")));
    }
    let top_k = match f.top_k.unwrap_or(0) {
        -1 | 0 => 0,
        k if k > 0 => k as usize,
        k => return Err(ApiError::invalid("top_k", format!("`top_k` must be -1, 0 or positive, got {k}"))),
    };
    let seed = match f.seed {
        Some(s) if s < 0 => return Err(ApiError::invalid("seed", format!("`seed` must not be negative, got {s}"))),
        s => s.map(|s| s as u64),
    };
    let penalty = |name: &str, v: Option<f32>| -> Result<f32, ApiError> {
        let v = v.unwrap_or(0.0);
        if !(-2.0..=2.0).contains(&v) {
            return Err(ApiError::invalid(name, format!("`{name}` must be between -2 and 2, got {v}")));
        }
        Ok(v)
    };
    let presence_penalty = penalty("presence_penalty", f.presence_penalty)?;
    let frequency_penalty = penalty("frequency_penalty", f.frequency_penalty)?;
    let n = match f.n.unwrap_or(1) {
        n if (1..=MAX_N as i64).contains(&n) => n as usize,
        n => return Err(ApiError::invalid("n", format!("`n` must be between 1 and {MAX_N}, got {n}"))),
    };
    match f.best_of {
        None | Some(1) => {}
        Some(b) => return Err(ApiError::unsupported("best_of", &format!("other than 1 (got {b})"))),
    }
    let logit_bias = match &f.logit_bias {
        Some(bias) if !is_empty_json(bias) => parse_logit_bias(bias)?,
        _ => Vec::new(),
    };
    let min_p = f.min_p.unwrap_or(0.0);
    if !(0.0..=1.0).contains(&min_p) {
        return Err(ApiError::invalid("min_p", format!("`min_p` must be between 0 and 1, got {min_p}")));
    }
    let repetition_penalty = f.repetition_penalty.unwrap_or(1.0);
    if !(repetition_penalty > 0.0 && repetition_penalty <= 2.0) {
        return Err(ApiError::invalid(
            "repetition_penalty",
            format!("`repetition_penalty` must be in (0, 2], got {repetition_penalty}"),
        ));
    }
    let stop = match &f.stop {
        None => Vec::new(),
        Some(StringOrList::One(s)) => vec![s.clone()],
        Some(StringOrList::Many(list)) => list.clone(),
    };
    if stop.len() > MAX_STOP_STRINGS {
        return Err(ApiError::invalid("stop", format!("at most {MAX_STOP_STRINGS} stop strings, got {}", stop.len())));
    }
    if let Some(long) = stop.iter().find(|s| s.len() > MAX_STOP_LEN) {
        return Err(ApiError::invalid(
            "stop",
            format!("stop strings are limited to {MAX_STOP_LEN} bytes, got {}", long.len()),
        ));
    }
    let include_usage = f.stream_options.as_ref().is_some_and(|o| o.include_usage);
    if f.stream_options.is_some() && !f.stream {
        return Err(ApiError::invalid("stream_options", "`stream_options` is only allowed when `stream` is true"));
    }
    Ok(Validated {
        sampling: SamplingParams {
            temperature,
            top_p,
            top_k,
            seed,
            presence_penalty,
            frequency_penalty,
            logit_bias,
            min_p,
            repetition_penalty,
            // Set by each endpoint, whose fields differ.
            logprobs: None,
        },
        n,
        stop,
        stream: f.stream,
        include_usage,
        ignore_eos: f.ignore_eos,
        skip_special_tokens: f.skip_special_tokens.unwrap_or(true),
        // Set by completions with `echo`.
        prompt_logprobs: None,
        // Set once the caller (its key) is known.
        cache_partition: 0,
    })
}

/// `{"token id": bias}` with biases in [-100, 100], as OpenAI takes it.
fn parse_logit_bias(bias: &Json) -> Result<Vec<(u32, f32)>, ApiError> {
    let invalid = |message: String| ApiError::invalid("logit_bias", message);
    let map = bias.as_object().ok_or_else(|| invalid("`logit_bias` must map token ids to biases".into()))?;
    if map.len() > MAX_LOGIT_BIAS {
        return Err(invalid(format!("`logit_bias` takes at most {MAX_LOGIT_BIAS} tokens, got {}", map.len())));
    }
    map.iter()
        .map(|(id, value)| {
            let id: u32 = id.parse().map_err(|_| invalid(format!("`logit_bias` key {id:?} is not a token id")))?;
            match value.as_f64() {
                Some(b) if (-100.0..=100.0).contains(&b) => Ok((id, b as f32)),
                _ => Err(invalid(format!("`logit_bias` for token {id} must be between -100 and 100, got {value}"))),
            }
        })
        .collect()
}

/// Token ids in `logit_bias` must exist in the model's vocabulary.
pub fn check_logit_bias(params: &Validated, vocab: usize) -> Result<(), ApiError> {
    match params.sampling.logit_bias.iter().find(|(id, _)| *id as usize >= vocab) {
        Some((id, _)) => Err(ApiError::invalid(
            "logit_bias",
            format!("token id {id} in `logit_bias` is outside the vocabulary (size {vocab})"),
        )),
        None => Ok(()),
    }
}

/// `max_tokens`: positive, and the prompt plus it must fit the context.
/// `None` means "as many as fit".
pub fn resolve_max_tokens(
    param: &str,
    requested: Option<i64>,
    prompt_len: usize,
    max_model_len: usize,
) -> Result<usize, ApiError> {
    if prompt_len >= max_model_len {
        return Err(ApiError::bad_request(format!(
            "This model's maximum context length is {max_model_len} tokens, and the prompt alone has {prompt_len} tokens. Please shorten the prompt."
        )));
    }
    match requested {
        None => Ok(max_model_len - prompt_len),
        Some(n) if n < 1 => Err(ApiError::invalid(param, format!("`{param}` must be at least 1, got {n}"))),
        Some(n) => {
            let n = n as usize;
            if prompt_len + n > max_model_len {
                return Err(ApiError::invalid(
                    param,
                    format!(
                        "This model's maximum context length is {max_model_len} tokens. However, you requested {} tokens ({prompt_len} in the prompt, {n} in the completion). Please reduce the prompt or `{param}`.",
                        prompt_len + n
                    ),
                ));
            }
            Ok(n)
        }
    }
}

/// null, false, 0, "" , [] and {} all mean "not used".
pub fn is_empty_json(v: &Json) -> bool {
    match v {
        Json::Null => true,
        Json::Bool(b) => !b,
        Json::Number(n) => n.as_f64() == Some(0.0),
        Json::String(s) => s.is_empty(),
        Json::Array(a) => a.is_empty(),
        Json::Object(o) => o.is_empty(),
    }
}

/// Refuses a known OpenAI field that is set to something tailor does not do.
pub fn refuse_if_set(name: &str, value: Option<&Json>) -> Result<(), ApiError> {
    match value {
        Some(v) if !is_empty_json(v) => Err(ApiError::unsupported(name, "")),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_range_values_name_their_field() {
        let bad = |f: SamplingFields, param: &str| {
            let err = validate_sampling(&f).expect_err("must be refused");
            assert_eq!(err.param.as_deref(), Some(param), "{err:?}");
        };
        bad(SamplingFields { temperature: Some(2.5), ..Default::default() }, "temperature");
        bad(SamplingFields { top_p: Some(0.0), ..Default::default() }, "top_p");
        bad(SamplingFields { top_k: Some(-3), ..Default::default() }, "top_k");
        bad(SamplingFields { n: Some(17), ..Default::default() }, "n");
        bad(SamplingFields { min_p: Some(-0.1), ..Default::default() }, "min_p");
        bad(SamplingFields { presence_penalty: Some(3.0), ..Default::default() }, "presence_penalty");
    }

    #[test]
    fn max_tokens_must_fit_the_context() {
        assert_eq!(resolve_max_tokens("max_tokens", None, 10, 100).ok(), Some(90));
        assert_eq!(resolve_max_tokens("max_tokens", Some(90), 10, 100).ok(), Some(90));
        assert!(resolve_max_tokens("max_tokens", Some(91), 10, 100).is_err());
        assert!(resolve_max_tokens("max_tokens", Some(0), 10, 100).is_err());
        assert!(resolve_max_tokens("max_tokens", None, 100, 100).is_err());
    }
}
