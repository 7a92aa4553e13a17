//! The Responses API's output: the response object, and its stream of typed
//! events (each with a `sequence_number` and `output_index`, which the
//! openai SDK's stream helper relies on), made from chat chunks.

use axum::response::sse::Event as SseEvent;
use serde_json::{json, Map, Value as Json};

use super::ResponsesRequest;
use crate::api::dialect::{OneReply, ReplyEvents};
use crate::api::error::ApiError;
use crate::api::types::{ChatCompletionResponse, UsageBody};
use crate::ids::{object_id, unix_now};

/// What every state of one response repeats: its id and the request's
/// settings, echoed as OpenAI echoes them.
#[derive(Debug, Clone)]
pub struct Shell {
    id: String,
    created_at: u64,
    fields: Map<String, Json>,
}

impl Shell {
    pub fn new(req: &ResponsesRequest) -> Self {
        let fields = json!({
            "model": req.model,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "top_logprobs": req.top_logprobs,
            "parallel_tool_calls": req.parallel_tool_calls.unwrap_or(true),
            "tool_choice": req.tool_choice.clone().unwrap_or_else(|| json!("auto")),
            "tools": req.tools.clone().unwrap_or_default(),
            "text": {"format": req.text.as_ref().and_then(|t| t.format.clone()).unwrap_or_else(|| json!({"type": "text"}))},
            "metadata": req.metadata.clone().unwrap_or_default(),
            "user": req.user,
            "previous_response_id": null,
            "reasoning": {"effort": null, "summary": null},
            "store": false,
            "background": false,
            "truncation": "disabled",
        });
        let Json::Object(fields) = fields else { unreachable!("json! of an object is an object") };
        Self { id: object_id("resp"), created_at: unix_now(), fields }
    }

    /// The response object in one state.
    fn object(&self, status: &str, output: Vec<Json>, usage: Option<&UsageBody>, incomplete: bool) -> Json {
        let mut object = json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": null,
            "incomplete_details": incomplete.then(|| json!({"reason": "max_output_tokens"})),
            "output": output,
            "usage": usage.map(usage_json),
        });
        if let Some(fields) = object.as_object_mut() {
            fields.extend(self.fields.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        object
    }

    /// A whole reply as the finished response.
    pub fn finished(&self, whole: &ChatCompletionResponse) -> Json {
        let mut output = Vec::new();
        let mut incomplete = false;
        if let Some(choice) = whole.choices.first() {
            let calls = choice.message.tool_calls.as_deref().unwrap_or_default();
            let text = choice.message.content.clone().unwrap_or_default();
            if !text.is_empty() || calls.is_empty() {
                let logprobs = choice.logprobs.as_ref().map(|l| l["content"].clone());
                output.push(message_item(&object_id("msg"), "completed", Some(text_part(&text, logprobs))));
            }
            for call in calls {
                let function = &call["function"];
                output.push(call_item(
                    &object_id("fc"),
                    &call["id"],
                    &function["name"],
                    &function["arguments"],
                    "completed",
                ));
            }
            incomplete = choice.finish_reason == Some("length");
        }
        let status = if incomplete { "incomplete" } else { "completed" };
        self.object(status, output, Some(&whole.usage), incomplete)
    }
}

fn usage_json(u: &UsageBody) -> Json {
    json!({
        "input_tokens": u.prompt_tokens,
        "input_tokens_details": {"cached_tokens": u.prompt_tokens_details.cached_tokens},
        "output_tokens": u.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": u.total_tokens,
    })
}

fn text_part(text: &str, logprobs: Option<Json>) -> Json {
    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs.unwrap_or_else(|| json!([]))})
}

fn message_item(id: &str, status: &str, part: Option<Json>) -> Json {
    json!({"id": id, "type": "message", "status": status, "role": "assistant", "content": part.into_iter().collect::<Vec<_>>()})
}

fn call_item(id: &str, call_id: &Json, name: &Json, arguments: &Json, status: &str) -> Json {
    json!({"id": id, "type": "function_call", "status": status, "call_id": call_id, "name": name, "arguments": arguments})
}

/// The message item being streamed.
struct OpenText {
    id: String,
    output_index: usize,
    text: String,
    logprobs: Vec<Json>,
}

/// A function call being streamed.
struct OpenCall {
    id: String,
    output_index: usize,
    call_id: Json,
    name: Json,
    arguments: String,
}

/// The Responses API's events for one reply.
pub struct Streamed {
    shell: Shell,
    input_tokens: usize,
    sequence: u64,
    /// Items already done, by output index.
    output: Vec<Json>,
    text: Option<OpenText>,
    calls: Vec<OpenCall>,
    incomplete: bool,
    usage: Option<UsageBody>,
}

impl Streamed {
    pub fn new(shell: Shell, input_tokens: usize) -> OneReply<Self> {
        OneReply::new(Self {
            shell,
            input_tokens,
            sequence: 0,
            output: Vec::new(),
            text: None,
            calls: Vec::new(),
            incomplete: false,
            usage: None,
        })
    }

    fn event(&mut self, kind: &str, body: Json) -> SseEvent {
        let mut event = json!({"type": kind, "sequence_number": self.sequence});
        self.sequence += 1;
        if let (Some(event), Json::Object(body)) = (event.as_object_mut(), body) {
            event.extend(body);
        }
        SseEvent::default().event(kind).data(event.to_string())
    }

    fn next_index(&self) -> usize {
        self.output.len() + usize::from(self.text.is_some()) + self.calls.len()
    }

    fn open_text(&mut self, events: &mut Vec<SseEvent>) {
        if self.text.is_some() {
            return;
        }
        // One item is open at a time, so items end in output-index order.
        self.close_calls(events);
        let text = OpenText {
            id: object_id("msg"),
            output_index: self.next_index(),
            text: String::new(),
            logprobs: Vec::new(),
        };
        let item = message_item(&text.id, "in_progress", None);
        let (id, output_index) = (text.id.clone(), text.output_index);
        self.text = Some(text);
        events.push(self.event("response.output_item.added", json!({"output_index": output_index, "item": item})));
        events.push(self.event(
            "response.content_part.added",
            json!({"item_id": id, "output_index": output_index, "content_index": 0, "part": text_part("", None)}),
        ));
    }

    fn close_text(&mut self, events: &mut Vec<SseEvent>) {
        let Some(text) = self.text.take() else { return };
        let part = text_part(&text.text, Some(Json::Array(text.logprobs.clone())));
        let at = json!({"item_id": text.id, "output_index": text.output_index, "content_index": 0});
        let mut done = at.clone();
        done["text"] = json!(text.text);
        done["logprobs"] = Json::Array(text.logprobs);
        events.push(self.event("response.output_text.done", done));
        let mut part_done = at;
        part_done["part"] = part.clone();
        events.push(self.event("response.content_part.done", part_done));
        let item = message_item(&text.id, "completed", Some(part));
        events.push(self.event("response.output_item.done", json!({"output_index": text.output_index, "item": item})));
        self.output.push(item);
    }

    fn close_calls(&mut self, events: &mut Vec<SseEvent>) {
        for call in std::mem::take(&mut self.calls) {
            let at = json!({"item_id": call.id, "output_index": call.output_index, "arguments": call.arguments});
            events.push(self.event("response.function_call_arguments.done", at));
            let item = call_item(&call.id, &call.call_id, &call.name, &json!(call.arguments), "completed");
            events.push(
                self.event("response.output_item.done", json!({"output_index": call.output_index, "item": item})),
            );
            self.output.push(item);
        }
    }
}

impl ReplyEvents for Streamed {
    fn start(&mut self, events: &mut Vec<SseEvent>) {
        let response = self.shell.object("in_progress", Vec::new(), None, false);
        events.push(self.event("response.created", json!({"response": response})));
        events.push(self.event("response.in_progress", json!({"response": response})));
    }

    fn text(&mut self, delta: &str, logprobs: Vec<Json>, events: &mut Vec<SseEvent>) {
        self.open_text(events);
        let Some(text) = self.text.as_mut() else { return };
        text.text.push_str(delta);
        text.logprobs.extend(logprobs.iter().cloned());
        let body = json!({"item_id": text.id, "output_index": text.output_index, "content_index": 0, "delta": delta, "logprobs": logprobs});
        events.push(self.event("response.output_text.delta", body));
    }

    fn call(&mut self, delta: &Json, events: &mut Vec<SseEvent>) {
        let function = &delta["function"];
        if let Some(call_id) = delta.get("id").filter(|id| id.is_string()) {
            self.close_text(events);
            let call = OpenCall {
                id: object_id("fc"),
                output_index: self.next_index(),
                call_id: call_id.clone(),
                name: function["name"].clone(),
                arguments: String::new(),
            };
            let item = call_item(&call.id, &call.call_id, &call.name, &json!(""), "in_progress");
            let output_index = call.output_index;
            self.calls.push(call);
            events.push(self.event("response.output_item.added", json!({"output_index": output_index, "item": item})));
        }
        let Some(arguments) = function["arguments"].as_str().filter(|a| !a.is_empty()) else { return };
        let Some(call) = self.calls.last_mut() else { return };
        call.arguments.push_str(arguments);
        let body = json!({"item_id": call.id, "output_index": call.output_index, "delta": arguments});
        events.push(self.event("response.function_call_arguments.delta", body));
    }

    fn finish(&mut self, reason: &'static str, _stop: Option<&str>, events: &mut Vec<SseEvent>) {
        self.incomplete = reason == "length";
        if self.output.is_empty() && self.text.is_none() && self.calls.is_empty() {
            self.open_text(events);
        }
        self.close_text(events);
        self.close_calls(events);
    }

    fn usage(&mut self, usage: UsageBody) {
        self.usage = Some(usage);
    }

    fn failed(&mut self, error: &ApiError, events: &mut Vec<SseEvent>) {
        let mut response = self.shell.object("failed", std::mem::take(&mut self.output), None, false);
        response["error"] = json!({"code": error.code.unwrap_or("server_error"), "message": error.message});
        events.push(self.event("response.failed", json!({"response": response})));
    }

    fn done(&mut self, events: &mut Vec<SseEvent>) {
        let usage = self.usage.unwrap_or(UsageBody {
            prompt_tokens: self.input_tokens,
            total_tokens: self.input_tokens,
            ..UsageBody::default()
        });
        let (status, kind) =
            if self.incomplete { ("incomplete", "response.incomplete") } else { ("completed", "response.completed") };
        let response = self.shell.object(status, std::mem::take(&mut self.output), Some(&usage), self.incomplete);
        events.push(self.event(kind, json!({"response": response})));
    }
}
