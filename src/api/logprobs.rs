//! Log-probabilities in OpenAI's two shapes: chat's `logprobs.content`
//! (one object per token, with its bytes and alternatives) and the legacy
//! completions object (`tokens`, `token_logprobs`, `top_logprobs`,
//! `text_offset`). Token strings are each token decoded alone.

use serde_json::{json, Map, Value as Json};

use super::error::ApiError;
use crate::engine::TokenLogprob;
use crate::tokenizer::Tokenizer;

/// Alternatives per token at most: chat (`top_logprobs`), completions (`logprobs`).
pub const MAX_CHAT_TOP: usize = 20;
pub const MAX_COMPLETION_TOP: usize = 5;

fn token_text(tokenizer: &Tokenizer, id: u32) -> String {
    tokenizer.decode(&[id], false).unwrap_or_default()
}

/// Chat: `logprobs: true` and `top_logprobs` (0-20, only with `logprobs`).
pub fn chat_request(logprobs: Option<bool>, top_logprobs: Option<&Json>) -> Result<Option<usize>, ApiError> {
    let top = match top_logprobs {
        None | Some(Json::Null) => None,
        Some(v) => match v.as_u64() {
            Some(n) if n as usize <= MAX_CHAT_TOP => Some(n as usize),
            _ => {
                return Err(ApiError::invalid(
                    "top_logprobs",
                    format!("`top_logprobs` must be an integer from 0 to {MAX_CHAT_TOP}, got {v}"),
                ))
            }
        },
    };
    match (logprobs.unwrap_or(false), top) {
        (true, top) => Ok(Some(top.unwrap_or(0))),
        (false, Some(_)) => Err(ApiError::invalid("top_logprobs", "`top_logprobs` needs `logprobs: true`")),
        (false, None) => Ok(None),
    }
}

/// Completions: `logprobs` is the number of alternatives (0-5).
pub fn completion_request(logprobs: Option<&Json>) -> Result<Option<usize>, ApiError> {
    match logprobs {
        None | Some(Json::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if n as usize <= MAX_COMPLETION_TOP => Ok(Some(n as usize)),
            _ => Err(ApiError::invalid(
                "logprobs",
                format!("`logprobs` must be an integer from 0 to {MAX_COMPLETION_TOP}, got {v}"),
            )),
        },
    }
}

/// `{"content": [{token, logprob, bytes, top_logprobs}]}`.
pub fn chat(tokenizer: &Tokenizer, tokens: &[TokenLogprob]) -> Json {
    let entry = |id: u32, logprob: f32| {
        let token = token_text(tokenizer, id);
        let bytes: Vec<u8> = token.as_bytes().to_vec();
        json!({"token": token, "logprob": logprob, "bytes": bytes})
    };
    let content: Vec<Json> = tokens
        .iter()
        .map(|t| {
            let mut e = entry(t.id, t.logprob);
            e["top_logprobs"] = t.top.iter().map(|&(id, lp)| entry(id, lp)).collect();
            e
        })
        .collect();
    json!({ "content": content })
}

/// The legacy shape; `offset` is where these tokens start in the choice's
/// text. Also returns where they end (the next chunk's start).
pub fn completion(tokenizer: &Tokenizer, tokens: &[TokenLogprob], mut offset: usize) -> (Json, usize) {
    let (mut texts, mut logprobs, mut tops, mut offsets) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for t in tokens {
        let text = token_text(tokenizer, t.id);
        offsets.push(offset);
        offset += text.len();
        texts.push(text);
        logprobs.push(t.logprob);
        let top: Map<String, Json> = t.top.iter().map(|&(id, lp)| (token_text(tokenizer, id), json!(lp))).collect();
        tops.push(Json::Object(top));
    }
    (json!({"tokens": texts, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}), offset)
}

/// The legacy shape for an echoed prompt: its first token (no
/// log-probability: nothing predicts it), then `entries` for the rest.
/// Returns where the prompt's text ends.
pub fn echoed_prompt(tokenizer: &Tokenizer, first: u32, entries: &[TokenLogprob]) -> (Json, usize) {
    let head = token_text(tokenizer, first);
    let (mut rest, end) = completion(tokenizer, entries, head.len());
    for (key, value) in [
        ("tokens", json!(head)),
        ("token_logprobs", Json::Null),
        ("top_logprobs", Json::Null),
        ("text_offset", json!(0)),
    ] {
        if let Some(list) = rest[key].as_array_mut() {
            list.insert(0, value);
        }
    }
    (rest, end)
}

/// Two runs of the legacy shape, one after the other.
pub fn concat(mut first: Json, second: Json) -> Json {
    for key in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
        if let (Some(a), Some(b)) = (first[key].as_array_mut(), second[key].as_array()) {
            a.extend(b.iter().cloned());
        }
    }
    first
}
