//! Tool calls. `tools` reach the chat template; what the reply may be
//! depends on `tool_choice` and on whether the template shows the tools:
//! - `auto` with a template that renders tools: the model writes calls in
//!   its own format (`format::ToolFormat`), read back as it streams;
//! - a template that ignores tools (SmolLM2's): they are described in the
//!   system message and the reply is constrained to tailor's generic JSON,
//!   a call or a response (as llama.cpp's generic handler does);
//! - `required` or a named function: the reply is constrained to a call
//!   whose arguments follow the function's parameters schema.
//!
//! Calls come back as `message.tool_calls` with `finish_reason: "tool_calls"`.

pub mod format;
pub mod history;

use serde_json::{json, Value as Json};

use super::error::ApiError;
pub use format::{read_reply, Call, Out, ToolFormat, ToolStream};

/// What `tool_choice` asks for, once `none` (and no tools) are set aside.
#[derive(Debug, Clone, PartialEq)]
enum Choice {
    Auto,
    Required,
    Named(String),
}

/// A request's functions and its `tool_choice`, checked.
#[derive(Debug, Clone)]
pub struct Tools {
    functions: Vec<Json>,
    choice: Choice,
}

/// How a request's reply is made and read.
#[derive(Debug, Clone)]
pub struct Plan {
    /// How the reply is read back into calls.
    pub format: ToolFormat,
    /// A `response_format` the reply is constrained to, if any.
    pub response_format: Option<Json>,
    /// The tools described for a template that does not show them.
    pub instructions: Option<String>,
}

impl Plan {
    /// Whole calls only come from a finished reply: stream it in one piece.
    pub fn buffered(&self) -> bool {
        self.format == ToolFormat::Generic
    }
}

/// `None` when no call can be made: no `tools`, or `tool_choice: "none"`.
pub fn requested(tools: Option<&Json>, choice: Option<&Json>) -> Result<Option<Tools>, ApiError> {
    let functions: Vec<Json> = match tools {
        None | Some(Json::Null) => Vec::new(),
        Some(Json::Array(list)) => list.iter().filter_map(|t| t.get("function")).cloned().collect(),
        Some(_) => return Err(ApiError::invalid("tools", "`tools` must be a list")),
    };
    if functions.iter().any(|f| !f.get("name").is_some_and(Json::is_string)) {
        return Err(ApiError::invalid("tools", "every function needs a string `name`"));
    }
    let invalid = |m: String| ApiError::invalid("tool_choice", m);
    let choice = match choice {
        None | Some(Json::Null) => Choice::Auto,
        Some(Json::String(s)) if s == "auto" => Choice::Auto,
        Some(Json::String(s)) if s == "none" => return Ok(None),
        Some(Json::String(s)) if s == "required" => Choice::Required,
        Some(Json::Object(o)) => match o.get("function").and_then(|f| f.get("name")).and_then(Json::as_str) {
            Some(name) => Choice::Named(name.to_string()),
            None => {
                return Err(invalid(
                    "a named `tool_choice` is {\"type\": \"function\", \"function\": {\"name\": ...}}".into(),
                ))
            }
        },
        Some(other) => {
            return Err(invalid(format!("`tool_choice` must be none, auto, required or a function, got {other}")))
        }
    };
    if functions.is_empty() {
        return match choice {
            Choice::Auto => Ok(None),
            _ => Err(invalid("`tool_choice` forces a call but `tools` lists no function".into())),
        };
    }
    if let Choice::Named(wanted) = &choice {
        if !functions.iter().any(|f| f["name"] == wanted.as_str()) {
            return Err(invalid(format!("`tool_choice` names `{wanted}`, which is not in `tools`")));
        }
    }
    Ok(Some(Tools { functions, choice }))
}

impl Tools {
    /// The plan for a model whose template writes calls in `native` (None:
    /// the template ignores tools).
    pub fn plan(&self, native: Option<ToolFormat>) -> Plan {
        let forced = self.choice != Choice::Auto;
        let format = match native {
            Some(format) if !forced => format,
            _ => ToolFormat::Generic,
        };
        let response_format = (format == ToolFormat::Generic).then(|| self.generic_schema());
        let instructions = native.is_none().then(|| self.instructions());
        Plan { format, response_format, instructions }
    }

    /// `{"tool_call": {"name", "arguments"}}` for the allowed functions, or
    /// (with `auto`) `{"response": "..."}`.
    fn generic_schema(&self) -> Json {
        let calls: Vec<Json> = self
            .functions
            .iter()
            .filter(|f| match &self.choice {
                Choice::Named(wanted) => f["name"] == wanted.as_str(),
                _ => true,
            })
            .map(|f| {
                let parameters = f.get("parameters").cloned().unwrap_or_else(|| json!({"type": "object"}));
                json!({
                    "type": "object",
                    "properties": {"name": {"const": f["name"]}, "arguments": parameters},
                    "required": ["name", "arguments"],
                    "additionalProperties": false
                })
            })
            .collect();
        let call = if calls.len() == 1 { calls[0].clone() } else { json!({"anyOf": calls}) };
        let call = json!({"type": "object", "properties": {"tool_call": call}, "required": ["tool_call"], "additionalProperties": false});
        let schema = if self.choice == Choice::Auto {
            let response = json!({"type": "object", "properties": {"response": {"type": "string"}}, "required": ["response"], "additionalProperties": false});
            json!({"anyOf": [call, response]})
        } else {
            call
        };
        json!({"type": "json_schema", "json_schema": {"name": "tool_call", "schema": schema}})
    }

    fn instructions(&self) -> String {
        let listed = serde_json::to_string_pretty(&self.functions).unwrap_or_default();
        let call = "{\"tool_call\": {\"name\": <function name>, \"arguments\": <its arguments>}}";
        match &self.choice {
            Choice::Auto => format!(
                "You can call these functions:\n{listed}\nTo call one, reply with {call}. Otherwise reply with {{\"response\": <your reply>}}."
            ),
            _ => format!("You can call these functions:\n{listed}\nReply with {call} and nothing else."),
        }
    }
}

/// Adds the tools' description to the conversation's system message (a new
/// one first if it has none).
pub fn describe_in_system_message(messages: &mut Vec<Json>, instructions: &str) {
    match messages.first_mut() {
        Some(first) if first["role"] == "system" && first["content"].is_string() => {
            let content = format!("{}\n\n{instructions}", first["content"].as_str().unwrap_or_default());
            first["content"] = Json::String(content);
        }
        _ => messages.insert(0, json!({"role": "system", "content": instructions})),
    }
}

/// Calls in OpenAI's streamed shape, numbered from `first`.
pub fn indexed(calls: &[Call], format: ToolFormat, first: usize) -> Vec<Json> {
    calls
        .iter()
        .enumerate()
        .map(|(i, call)| {
            let mut call = call.to_openai(format);
            call["index"] = json!(first + i);
            call
        })
        .collect()
}

/// Reads each streamed choice for calls: content passes on at once, a call
/// when it is whole.
pub struct StreamedCalls {
    format: ToolFormat,
    streams: Vec<ToolStream>,
    /// Calls sent per choice (the next call's `index`).
    sent: Vec<usize>,
}

/// What one chunk of a choice carries: content, calls, or both.
pub type DeltaParts = (Option<String>, Option<Vec<Json>>);

impl StreamedCalls {
    pub fn new(format: ToolFormat, choices: usize) -> Self {
        Self { format, streams: (0..choices).map(|_| ToolStream::new(format)).collect(), sent: vec![0; choices] }
    }

    pub fn push(&mut self, index: usize, text: &str) -> DeltaParts {
        let outs = self.streams[index].push(text);
        self.parts(index, outs)
    }

    pub fn finish(&mut self, index: usize) -> DeltaParts {
        let outs = self.streams[index].finish();
        self.parts(index, outs)
    }

    /// Whether choice `index` made a call.
    pub fn called(&self, index: usize) -> bool {
        self.sent[index] > 0
    }

    fn parts(&mut self, index: usize, outs: Vec<Out>) -> DeltaParts {
        let (mut content, calls) = format::joined(outs);
        let first = self.sent[index];
        self.sent[index] += calls.len();
        if self.sent[index] > 0 && content.trim().is_empty() {
            // Whitespace around calls is not a reply (the whole reply trims it too).
            content.clear();
        }
        let calls = (!calls.is_empty()).then(|| indexed(&calls, self.format, first));
        ((!content.is_empty()).then_some(content), calls)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tools() -> Json {
        json!([
            {"type": "function", "function": {"name": "weather", "parameters": {"type": "object",
                "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
            {"type": "function", "function": {"name": "time"}}
        ])
    }

    #[test]
    fn tool_choice_is_checked() {
        assert!(requested(Some(&tools()), Some(&json!("none"))).expect("ok").is_none());
        assert!(requested(None, None).expect("ok").is_none());
        assert!(requested(Some(&tools()), None).expect("ok").is_some());
        for bad in [json!({"type": "function", "function": {"name": "nope"}}), json!("sometimes"), json!(3)] {
            let err = requested(Some(&tools()), Some(&bad)).expect_err("refused");
            assert_eq!(err.param.as_deref(), Some("tool_choice"));
        }
        assert!(requested(None, Some(&json!("required"))).is_err());
        let err = requested(Some(&json!([{"type": "function", "function": {}}])), None).expect_err("refused");
        assert_eq!(err.param.as_deref(), Some("tools"));
    }

    #[test]
    fn plans_follow_the_choice_and_the_template() {
        let auto = requested(Some(&tools()), None).expect("ok").expect("tools");
        let native = auto.plan(Some(ToolFormat::Hermes));
        assert_eq!(native.format, ToolFormat::Hermes);
        assert!(native.response_format.is_none() && native.instructions.is_none());
        let generic = auto.plan(None);
        assert_eq!(generic.format, ToolFormat::Generic);
        let schema = &generic.response_format.expect("constrained")["json_schema"]["schema"];
        assert_eq!(schema["anyOf"].as_array().map(Vec::len), Some(2), "a call or a response");
        assert!(generic.instructions.is_some_and(|t| t.contains("weather") && t.contains("response")));

        let named = requested(Some(&tools()), Some(&json!({"type": "function", "function": {"name": "time"}})))
            .expect("ok")
            .expect("tools")
            .plan(Some(ToolFormat::Hermes));
        assert_eq!(named.format, ToolFormat::Generic, "a forced call is constrained whatever the template");
        let schema = &named.response_format.expect("constrained")["json_schema"]["schema"];
        assert_eq!(schema["properties"]["tool_call"]["properties"]["name"]["const"], "time");
        let required = requested(Some(&tools()), Some(&json!("required"))).expect("ok").expect("tools").plan(None);
        let schema = &required.response_format.expect("constrained")["json_schema"]["schema"];
        assert_eq!(schema["properties"]["tool_call"]["anyOf"].as_array().map(Vec::len), Some(2));
    }
}
