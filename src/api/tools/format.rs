//! The tool-call formats models write, and how a reply in one of them is
//! read back into calls. Every reader is streaming (`ToolStream`): text is
//! released as content until a call begins, a call is released when it is
//! whole, and whatever does not parse comes back as content (nothing lost).

use serde_json::{json, Value as Json};

pub use crate::prompt::tool_format::ToolFormat;

impl ToolFormat {
    /// Where a call begins, and whether it may begin after other text.
    fn opening(self) -> Opening {
        match self {
            ToolFormat::Hermes => Opening::Marker { open: "<tool_call>", close: Some("</tool_call>") },
            ToolFormat::Mistral => Opening::Marker { open: "[TOOL_CALLS]", close: None },
            ToolFormat::Llama3Json => Opening::AtStart,
            ToolFormat::Generic => Opening::Whole,
        }
    }
}

enum Opening {
    /// Calls start at a marker anywhere; with `close`, each ends at it,
    /// otherwise the rest of the reply is calls.
    Marker { open: &'static str, close: Option<&'static str> },
    /// The reply is calls if it starts like one (`{` or `<|python_tag|>`).
    AtStart,
    /// The whole reply is one JSON object, read at the end.
    Whole,
}

const PYTHON_TAG: &str = "<|python_tag|>";

/// One call as the model wrote it.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub name: String,
    /// The arguments as JSON text.
    pub arguments: String,
}

impl Call {
    /// `{"name": …, "arguments" | "parameters": {…}}`; arguments given as a
    /// JSON string are taken as that text.
    fn from_json(value: &Json) -> Option<Call> {
        let name = value.get("name")?.as_str()?.to_string();
        let arguments = value.get("arguments").or_else(|| value.get("parameters")).cloned().unwrap_or(json!({}));
        let arguments = match arguments {
            Json::String(text) if serde_json::from_str::<Json>(&text).is_ok() => text,
            Json::Object(_) => arguments.to_string(),
            _ => return None,
        };
        Some(Call { name, arguments })
    }

    /// OpenAI's shape; Mistral's templates want nine-character ids.
    pub fn to_openai(&self, format: ToolFormat) -> Json {
        let hex = uuid::Uuid::new_v4().simple().to_string();
        let id = match format {
            ToolFormat::Mistral => hex[..9].to_string(),
            _ => format!("call_{hex}"),
        };
        json!({"id": id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}})
    }
}

/// What a reply yields, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Out {
    Content(String),
    Calls(Vec<Call>),
}

#[derive(Debug, PartialEq)]
enum State {
    /// Nothing but whitespace seen yet (formats whose calls open the reply).
    Start,
    Content,
    /// Inside a call: `buffer` holds its text after the opening marker.
    Call,
}

/// Reads a reply as it streams.
pub struct ToolStream {
    format: ToolFormat,
    state: State,
    buffer: String,
}

impl ToolStream {
    pub fn new(format: ToolFormat) -> Self {
        let state = match format.opening() {
            Opening::Marker { .. } => State::Content,
            Opening::AtStart => State::Start,
            Opening::Whole => State::Call,
        };
        Self { format, state, buffer: String::new() }
    }

    /// Adds generated text; returns what became certain.
    pub fn push(&mut self, text: &str) -> Vec<Out> {
        self.buffer.push_str(text);
        let mut out = Vec::new();
        loop {
            match (&self.state, self.format.opening()) {
                (State::Start, _) => {
                    let trimmed = self.buffer.trim_start();
                    if trimmed.is_empty() || PYTHON_TAG.starts_with(trimmed) && trimmed.len() < PYTHON_TAG.len() {
                        return out;
                    }
                    self.state = if trimmed.starts_with('{') || trimmed.starts_with(PYTHON_TAG) {
                        State::Call
                    } else {
                        State::Content
                    };
                }
                (State::Content, Opening::Marker { open, .. }) => match self.buffer.find(open) {
                    Some(at) => {
                        push_content(&mut out, &self.buffer[..at]);
                        self.buffer.drain(..at + open.len());
                        self.state = State::Call;
                    }
                    None => {
                        let keep = partial_suffix(&self.buffer, open);
                        let release = self.buffer.len() - keep;
                        push_content(&mut out, &self.buffer[..release]);
                        self.buffer.drain(..release);
                        return out;
                    }
                },
                (State::Content, _) => {
                    push_content(&mut out, &std::mem::take(&mut self.buffer));
                    return out;
                }
                (State::Call, Opening::Marker { open, close: Some(close) }) => {
                    let Some(at) = self.buffer.find(close) else { return out };
                    let body: String = self.buffer.drain(..at + close.len()).collect();
                    let body = &body[..at];
                    match serde_json::from_str::<Json>(body.trim()).ok().as_ref().and_then(Call::from_json) {
                        Some(call) => out.push(Out::Calls(vec![call])),
                        None => push_content(&mut out, &format!("{open}{body}{close}")),
                    }
                    self.state = State::Content;
                }
                (State::Call, _) => return out,
            }
        }
    }

    /// The end of the reply: a call still open is read as it stands.
    pub fn finish(&mut self) -> Vec<Out> {
        let rest = std::mem::take(&mut self.buffer);
        let mut out = Vec::new();
        match (&self.state, self.format.opening()) {
            (State::Call, Opening::Marker { open, .. }) => match self.read_calls(&rest) {
                Some(found) => out.extend(found),
                None => push_content(&mut out, &format!("{open}{rest}")),
            },
            (State::Call, _) => match self.read_calls(&rest) {
                Some(found) => out.extend(found),
                None => push_content(&mut out, &rest),
            },
            _ => push_content(&mut out, &rest),
        }
        self.state = State::Content;
        out
    }

    /// The calls in a reply's tail, or None when it is not (all) calls.
    fn read_calls(&self, text: &str) -> Option<Vec<Out>> {
        match self.format {
            ToolFormat::Hermes => {
                Some(vec![Out::Calls(vec![Call::from_json(&serde_json::from_str(text.trim()).ok()?)?])])
            }
            ToolFormat::Llama3Json => {
                let text = text.trim_start();
                json_sequence(text.strip_prefix(PYTHON_TAG).unwrap_or(text), ';').map(|c| vec![Out::Calls(c)])
            }
            ToolFormat::Mistral => mistral_calls(text).map(|c| vec![Out::Calls(c)]),
            ToolFormat::Generic => {
                let value: Json = serde_json::from_str(text.trim()).ok()?;
                if let Some(call) = value.get("tool_call") {
                    return Some(vec![Out::Calls(vec![Call::from_json(call)?])]);
                }
                if let Some(calls) = value.get("tool_calls").and_then(Json::as_array) {
                    return Some(vec![Out::Calls(calls.iter().map(Call::from_json).collect::<Option<_>>()?)]);
                }
                Some(vec![Out::Content(value.get("response")?.as_str()?.to_string())])
            }
        }
    }
}

fn push_content(out: &mut Vec<Out>, text: &str) {
    if !text.is_empty() {
        out.push(Out::Content(text.to_string()));
    }
}

/// Length of the longest end of `text` that could begin `marker`.
fn partial_suffix(text: &str, marker: &str) -> usize {
    (1..marker.len().min(text.len() + 1))
        .rev()
        .find(|&n| text.is_char_boundary(text.len() - n) && marker.starts_with(&text[text.len() - n..]))
        .unwrap_or(0)
}

/// JSON call objects separated by `separator` (and whitespace), nothing else.
fn json_sequence(text: &str, separator: char) -> Option<Vec<Call>> {
    let mut calls = Vec::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        let mut values = serde_json::Deserializer::from_str(rest).into_iter::<Json>();
        let value = values.next()?.ok()?;
        calls.push(Call::from_json(&value)?);
        rest = rest[values.byte_offset()..].trim_start();
        rest = rest.strip_prefix(separator).unwrap_or(rest).trim_start();
    }
    (!calls.is_empty()).then_some(calls)
}

/// After `[TOOL_CALLS]`: a JSON list of calls (v0.3), or `name[ARGS]{…}`
/// pieces, each after its own `[TOOL_CALLS]` (v11+).
fn mistral_calls(text: &str) -> Option<Vec<Call>> {
    let text = text.trim();
    if text.starts_with('[') {
        let list: Vec<Json> = serde_json::from_str(text).ok()?;
        let calls: Vec<Call> = list.iter().map(Call::from_json).collect::<Option<_>>()?;
        return (!calls.is_empty()).then_some(calls);
    }
    text.split("[TOOL_CALLS]")
        .map(|piece| {
            let (name, arguments) = piece.split_once("[ARGS]")?;
            let arguments: Json = serde_json::from_str(arguments.trim()).ok()?;
            arguments.is_object().then(|| Call { name: name.trim().to_string(), arguments: arguments.to_string() })
        })
        .collect()
}

/// The content and the calls of a run of outputs, each in order.
pub fn joined(outs: Vec<Out>) -> (String, Vec<Call>) {
    let (mut content, mut calls) = (String::new(), Vec::new());
    for out in outs {
        match out {
            Out::Content(text) => content.push_str(&text),
            Out::Calls(found) => calls.extend(found),
        }
    }
    (content, calls)
}

/// A whole reply read at once.
pub fn read_reply(format: ToolFormat, text: &str) -> (Option<String>, Vec<Call>) {
    let mut stream = ToolStream::new(format);
    let mut outs = stream.push(text);
    outs.extend(stream.finish());
    let (content, calls) = joined(outs);
    let content =
        if calls.is_empty() { Some(content) } else { Some(content.trim().to_string()).filter(|c| !c.is_empty()) };
    (content, calls)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(name: &str, arguments: &str) -> Call {
        Call { name: name.into(), arguments: arguments.into() }
    }

    #[test]
    fn templates_name_their_format() {
        let template = |name: &str| {
            let path = format!("{}/tests/fixtures/chat_templates/templates/{name}.jinja", env!("CARGO_MANIFEST_DIR"));
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
        };
        assert_eq!(ToolFormat::detect(&template("Qwen-Qwen2.5-7B-Instruct")), ToolFormat::Hermes);
        assert_eq!(ToolFormat::detect(&template("Qwen-Qwen3-0.6B")), ToolFormat::Hermes);
        assert_eq!(ToolFormat::detect(&template("NousResearch-Hermes-3-Llama-3.1-8B-tool_use")), ToolFormat::Hermes);
        assert_eq!(ToolFormat::detect(&template("mistralai-Mistral-Nemo-Instruct-2407")), ToolFormat::Mistral);
        assert_eq!(ToolFormat::detect(&template("meta-llama-Llama-3.2-3B-Instruct")), ToolFormat::Llama3Json);
        assert_eq!(ToolFormat::detect(&template("meta-llama-Llama-3.3-70B-Instruct")), ToolFormat::Llama3Json);
    }

    #[test]
    fn hermes_calls_among_text() {
        let text = "Let me look.\n<tool_call>\n{\"name\": \"weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"time\", \"arguments\": {}}\n</tool_call>";
        let (content, calls) = read_reply(ToolFormat::Hermes, text);
        assert_eq!(content.as_deref(), Some("Let me look."));
        assert_eq!(calls, vec![call("weather", r#"{"city":"Paris"}"#), call("time", "{}")]);
    }

    #[test]
    fn a_reply_without_calls_is_content_unchanged() {
        for format in [ToolFormat::Hermes, ToolFormat::Llama3Json, ToolFormat::Mistral] {
            let text = "  The answer is {not a call} <tool and [TOOL nothing.";
            assert_eq!(read_reply(format, text), (Some(text.to_string()), vec![]), "{format:?}");
        }
    }

    #[test]
    fn a_broken_call_comes_back_as_text() {
        let text = "<tool_call>{\"name\": \"weather\", \"argu</tool_call> and more";
        assert_eq!(read_reply(ToolFormat::Hermes, text), (Some(text.to_string()), vec![]));
        let cut = "[TOOL_CALLS][{\"name\": \"weather\"";
        assert_eq!(read_reply(ToolFormat::Mistral, cut), (Some(cut.to_string()), vec![]));
        let cut = "{\"name\": \"weather\", \"parameters\": {";
        assert_eq!(read_reply(ToolFormat::Llama3Json, cut), (Some(cut.to_string()), vec![]));
    }

    #[test]
    fn llama3_mistral_and_generic_calls() {
        let (content, calls) = read_reply(
            ToolFormat::Llama3Json,
            "<|python_tag|>{\"name\": \"weather\", \"parameters\": {\"city\": \"Oslo\"}}; {\"name\": \"time\", \"parameters\": {}}",
        );
        assert_eq!(content, None);
        assert_eq!(calls, vec![call("weather", r#"{"city":"Oslo"}"#), call("time", "{}")]);
        let (_, calls) =
            read_reply(ToolFormat::Mistral, "[TOOL_CALLS] [{\"name\": \"time\", \"arguments\": {\"tz\": \"UTC\"}}]");
        assert_eq!(calls, vec![call("time", r#"{"tz":"UTC"}"#)]);
        let (_, calls) =
            read_reply(ToolFormat::Mistral, "[TOOL_CALLS]time[ARGS]{\"tz\": \"UTC\"}[TOOL_CALLS]weather[ARGS]{}");
        assert_eq!(calls, vec![call("time", r#"{"tz":"UTC"}"#), call("weather", "{}")]);
        let (content, calls) = read_reply(ToolFormat::Generic, r#"{"tool_call": {"name": "time", "arguments": {}}}"#);
        assert_eq!((content, calls), (None, vec![call("time", "{}")]));
        assert_eq!(read_reply(ToolFormat::Generic, r#"{"response": "Hi!"}"#), (Some("Hi!".into()), vec![]));
    }

    #[test]
    fn streaming_releases_text_at_once_and_calls_when_whole() {
        let reply = "Sure <tool_call>{\"name\": \"time\", \"arguments\": {}}</tool_call>";
        let mut stream = ToolStream::new(ToolFormat::Hermes);
        let mut outs = Vec::new();
        for piece in ["Sure ", "<tool", "_call>{\"name\": \"ti", "me\", \"arguments\": {}}</tool_", "call>"] {
            outs.push(stream.push(piece));
        }
        outs.push(stream.finish());
        assert_eq!(outs[0], vec![Out::Content("Sure ".into())]);
        assert!(outs[1].is_empty() && outs[2].is_empty() && outs[3].is_empty(), "{outs:?}");
        assert_eq!(outs[4], vec![Out::Calls(vec![call("time", "{}")])]);
        assert!(outs[5].is_empty());
        // The same text read whole gives the same.
        assert_eq!(read_reply(ToolFormat::Hermes, reply).1, vec![call("time", "{}")]);
        // A held-back marker prefix that turns out to be text is released.
        let mut stream = ToolStream::new(ToolFormat::Hermes);
        assert_eq!(stream.push("a <to"), vec![Out::Content("a ".into())]);
        assert_eq!(stream.push("ast"), vec![Out::Content("<toast".into())]);
        // Llama 3: text that does not open with a call streams as it comes.
        let mut stream = ToolStream::new(ToolFormat::Llama3Json);
        assert!(stream.push("  ").is_empty());
        assert_eq!(stream.push("Hello"), vec![Out::Content("  Hello".into())]);
    }

    #[test]
    fn mistral_ids_have_nine_characters() {
        let id = call("time", "{}").to_openai(ToolFormat::Mistral)["id"].as_str().map(str::len);
        assert_eq!(id, Some(9));
        let id = call("time", "{}").to_openai(ToolFormat::Hermes)["id"].as_str().map(String::from);
        assert!(id.is_some_and(|id| id.starts_with("call_")));
    }
}
