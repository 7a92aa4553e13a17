//! What the Responses and Messages APIs share: both become a chat request
//! (one generation path), errors name the client's own fields, and both
//! stream one reply made from chat chunks.

use axum::response::sse::Event as SseEvent;
use serde_json::{Map, Value as Json};

use super::error::ApiError;
use super::generate::Wire;
use super::json::from_map;
use super::types::{ChatCompletionChunk, ChatCompletionRequest, UsageBody};

/// A chat request built from another dialect's body, read exactly as a chat
/// body is (its sampling fields in their own pass).
pub fn chat_request(body: Map<String, Json>) -> Result<ChatCompletionRequest, ApiError> {
    let mut chat: ChatCompletionRequest = from_map(&body)?;
    chat.sampling = from_map(&body)?;
    Ok(chat)
}

/// A chat body holding the `keys` of `body` that it has (the extensions
/// a dialect passes on to chat as they are).
pub fn passed_on(body: &Map<String, Json>, keys: &[&str]) -> Map<String, Json> {
    keys.iter().filter_map(|key| Some((key.to_string(), body.get(*key)?.clone()))).collect()
}

/// An error about a chat field, renamed to the field the client sent
/// (`renames` maps chat's name to the dialect's).
pub fn renamed(mut error: ApiError, renames: &[(&str, &'static str)]) -> ApiError {
    if let Some(param) = &error.param {
        if let Some((chat, own)) = renames.iter().find(|(chat, _)| param == chat) {
            error.message = error.message.replace(&format!("`{chat}`"), &format!("`{own}`"));
            error.param = Some(own.to_string());
        }
    }
    error
}

/// A dialect's stream of one reply (the Responses and Messages APIs have no
/// `n`): what it sends for each part of the chat chunks.
pub trait ReplyEvents: Send + 'static {
    /// Before anything else (sent once).
    fn start(&mut self, events: &mut Vec<SseEvent>);
    /// Text, with its tokens' log-probabilities (chat's `logprobs.content` entries).
    fn text(&mut self, text: &str, logprobs: Vec<Json>, events: &mut Vec<SseEvent>);
    /// A chat tool-call delta: one with an `id` opens a call, `arguments` extend it.
    fn call(&mut self, delta: &Json, events: &mut Vec<SseEvent>);
    /// Chat's `finish_reason`, and the stop string that ended the reply.
    fn finish(&mut self, reason: &'static str, stop: Option<&str>, events: &mut Vec<SseEvent>);
    fn usage(&mut self, usage: UsageBody);
    fn failed(&mut self, error: &ApiError, events: &mut Vec<SseEvent>);
    fn done(&mut self, events: &mut Vec<SseEvent>);
}

/// Chat chunks in, a one-reply dialect's events out.
pub struct OneReply<D> {
    dialect: D,
    started: bool,
}

impl<D: ReplyEvents> OneReply<D> {
    pub fn new(dialect: D) -> Self {
        Self { dialect, started: false }
    }

    fn started(&mut self) -> Vec<SseEvent> {
        let mut events = Vec::new();
        if !self.started {
            self.started = true;
            self.dialect.start(&mut events);
        }
        events
    }
}

impl<D: ReplyEvents> Wire<ChatCompletionChunk> for OneReply<D> {
    fn piece(&mut self, chunk: ChatCompletionChunk) -> Vec<SseEvent> {
        let mut events = self.started();
        if let Some(usage) = chunk.usage {
            self.dialect.usage(usage);
        }
        for choice in chunk.choices.into_iter().filter(|c| c.index == 0) {
            if let Some(text) = choice.delta.content.filter(|t| !t.is_empty()) {
                let logprobs = choice.logprobs.and_then(|l| l["content"].as_array().cloned()).unwrap_or_default();
                self.dialect.text(&text, logprobs, &mut events);
            }
            for call in choice.delta.tool_calls.iter().flatten() {
                self.dialect.call(call, &mut events);
            }
            if let Some(reason) = choice.finish_reason {
                self.dialect.finish(reason, choice.stop_reason.as_deref(), &mut events);
            }
        }
        events
    }

    fn failed(&mut self, error: &ApiError) -> Vec<SseEvent> {
        let mut events = self.started();
        self.dialect.failed(error, &mut events);
        events
    }

    fn done(&mut self) -> Vec<SseEvent> {
        let mut events = self.started();
        self.dialect.done(&mut events);
        events
    }
}
