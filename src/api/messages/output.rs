//! The Messages API's output: the message object, and Anthropic's stream of
//! events (`message_start`, content blocks, `message_delta`, `message_stop`),
//! made from chat chunks.

use axum::response::sse::Event as SseEvent;
use serde_json::{json, Value as Json};

use super::errors;
use crate::api::dialect::{OneReply, ReplyEvents};
use crate::api::error::ApiError;
use crate::api::types::{ChatCompletionResponse, UsageBody};
use crate::ids::object_id;

/// The message being made: its id, model and prompt size.
#[derive(Debug, Clone)]
pub struct Reply {
    id: String,
    model: String,
    input_tokens: usize,
}

impl Reply {
    pub fn new(model: &str, input_tokens: usize) -> Self {
        Self { id: object_id("msg"), model: model.to_string(), input_tokens }
    }

    fn message(&self, content: Vec<Json>, stop: (Option<&str>, Option<&str>), usage: Json) -> Json {
        json!({
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": stop.0,
            "stop_sequence": stop.1,
            "usage": usage,
        })
    }

    /// A whole reply as one message.
    pub fn finished(&self, whole: &ChatCompletionResponse) -> Json {
        let mut content = Vec::new();
        let mut stop = (None, None);
        if let Some(choice) = whole.choices.first() {
            let text = choice.message.content.as_deref().unwrap_or_default();
            let calls = choice.message.tool_calls.as_deref().unwrap_or_default();
            if !text.is_empty() || calls.is_empty() {
                content.push(json!({"type": "text", "text": text}));
            }
            content.extend(calls.iter().map(|call| {
                let function = &call["function"];
                json!({"type": "tool_use", "id": call["id"], "name": function["name"], "input": input_of(&function["arguments"])})
            }));
            stop = stop_reason(choice.finish_reason, choice.stop_reason.as_deref());
        }
        self.message(content, stop, usage_json(&whole.usage))
    }
}

/// Anthropic's `stop_reason` and `stop_sequence` for chat's finish.
fn stop_reason<'a>(finish: Option<&str>, stop: Option<&'a str>) -> (Option<&'static str>, Option<&'a str>) {
    match (finish, stop) {
        (Some("tool_calls"), _) => (Some("tool_use"), None),
        (Some("length"), _) => (Some("max_tokens"), None),
        (Some(_), Some(stop)) => (Some("stop_sequence"), Some(stop)),
        (Some(_), None) => (Some("end_turn"), None),
        (None, _) => (None, None),
    }
}

/// Anthropic counts cached prompt tokens apart from `input_tokens`.
fn usage_json(u: &UsageBody) -> Json {
    let cached = u.prompt_tokens_details.cached_tokens;
    json!({
        "input_tokens": u.prompt_tokens - cached.min(u.prompt_tokens),
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
        "output_tokens": u.completion_tokens,
    })
}

/// A call's arguments as the tool's input object.
fn input_of(arguments: &Json) -> Json {
    arguments.as_str().and_then(|a| serde_json::from_str(a).ok()).unwrap_or_else(|| json!({}))
}

/// The content block being streamed.
enum Block {
    Text,
    ToolUse,
}

/// Anthropic's events for one reply.
pub struct Streamed {
    reply: Reply,
    /// The open block and how many blocks came before it.
    open: Option<Block>,
    blocks: usize,
    stop: (Option<&'static str>, Option<String>),
    usage: Option<UsageBody>,
}

fn event(kind: &str, body: Json) -> SseEvent {
    let mut event = json!({"type": kind});
    if let (Some(event), Json::Object(body)) = (event.as_object_mut(), body) {
        event.extend(body);
    }
    SseEvent::default().event(kind).data(event.to_string())
}

impl Streamed {
    pub fn new(reply: Reply) -> OneReply<Self> {
        OneReply::new(Self { reply, open: None, blocks: 0, stop: (None, None), usage: None })
    }

    fn close(&mut self, events: &mut Vec<SseEvent>) {
        if self.open.take().is_some() {
            events.push(event("content_block_stop", json!({"index": self.blocks})));
            self.blocks += 1;
        }
    }

    fn open(&mut self, block: Block, content_block: Json, events: &mut Vec<SseEvent>) {
        self.close(events);
        self.open = Some(block);
        events.push(event("content_block_start", json!({"index": self.blocks, "content_block": content_block})));
    }
}

impl ReplyEvents for Streamed {
    fn start(&mut self, events: &mut Vec<SseEvent>) {
        let usage = json!({"input_tokens": self.reply.input_tokens, "output_tokens": 0});
        let message = self.reply.message(Vec::new(), (None, None), usage);
        events.push(event("message_start", json!({"message": message})));
    }

    fn text(&mut self, text: &str, _logprobs: Vec<Json>, events: &mut Vec<SseEvent>) {
        if !matches!(self.open, Some(Block::Text)) {
            self.open(Block::Text, json!({"type": "text", "text": ""}), events);
        }
        let delta = json!({"type": "text_delta", "text": text});
        events.push(event("content_block_delta", json!({"index": self.blocks, "delta": delta})));
    }

    fn call(&mut self, delta: &Json, events: &mut Vec<SseEvent>) {
        let function = &delta["function"];
        if let Some(id) = delta.get("id").filter(|id| id.is_string()) {
            let block = json!({"type": "tool_use", "id": id, "name": function["name"], "input": {}});
            self.open(Block::ToolUse, block, events);
        }
        let Some(arguments) = function["arguments"].as_str().filter(|a| !a.is_empty()) else { return };
        if matches!(self.open, Some(Block::ToolUse)) {
            let delta = json!({"type": "input_json_delta", "partial_json": arguments});
            events.push(event("content_block_delta", json!({"index": self.blocks, "delta": delta})));
        }
    }

    fn finish(&mut self, reason: &'static str, stop: Option<&str>, _events: &mut Vec<SseEvent>) {
        let (reason, stop) = stop_reason(Some(reason), stop);
        self.stop = (reason, stop.map(String::from));
    }

    fn usage(&mut self, usage: UsageBody) {
        self.usage = Some(usage);
    }

    fn failed(&mut self, error: &ApiError, events: &mut Vec<SseEvent>) {
        events.push(event("error", errors::body(error, None)));
    }

    fn done(&mut self, events: &mut Vec<SseEvent>) {
        if self.blocks == 0 && self.open.is_none() {
            self.open(Block::Text, json!({"type": "text", "text": ""}), events);
        }
        self.close(events);
        let usage = self.usage.map(|u| usage_json(&u)).unwrap_or_else(|| json!({"output_tokens": 0}));
        let delta = json!({"stop_reason": self.stop.0, "stop_sequence": self.stop.1});
        events.push(event("message_delta", json!({"delta": delta, "usage": usage})));
        events.push(event("message_stop", json!({})));
    }
}
