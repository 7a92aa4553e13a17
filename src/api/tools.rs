//! Forced tool calls: `tool_choice: "required"` or a named function makes the
//! reply a call, by constrained decoding to `{"name": ..., "arguments": ...}`
//! whose arguments follow the function's parameters schema. The call comes
//! back as `message.tool_calls` with `finish_reason: "tool_calls"`. Templates
//! that ignore `tools` get them described in a system message (the generic
//! format, as llama.cpp's generic handler does).

use serde_json::{json, Value as Json};

use super::error::ApiError;

/// A call the reply must make: the grammar, and the tools' description.
pub struct Forced {
    /// A `response_format` (json_schema) that admits exactly the allowed calls.
    pub response_format: Json,
    /// The system text describing the tools, for templates that ignore them.
    pub instructions: String,
}

/// `None` unless `tool_choice` forces a call (`none`, `auto` or absent).
pub fn forced(tools: Option<&Json>, choice: Option<&Json>) -> Result<Option<Forced>, ApiError> {
    let invalid = |m: String| ApiError::invalid("tool_choice", m);
    let wanted: Option<&str> = match choice {
        None | Some(Json::Null) => return Ok(None),
        Some(Json::String(s)) if s == "none" || s == "auto" => return Ok(None),
        Some(Json::String(s)) if s == "required" => None,
        Some(Json::Object(o)) => match o.get("function").and_then(|f| f.get("name")).and_then(Json::as_str) {
            Some(name) => Some(name),
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
    let functions: Vec<&Json> = tools
        .and_then(Json::as_array)
        .map(|list| list.iter().filter_map(|t| t.get("function")).collect())
        .unwrap_or_default();
    if functions.is_empty() {
        return Err(invalid("`tool_choice` forces a call but `tools` lists no function".into()));
    }
    let mut calls = Vec::new();
    for f in &functions {
        let Some(name) = f.get("name").and_then(Json::as_str) else {
            return Err(ApiError::invalid("tools", "every function needs a `name`"));
        };
        if wanted.is_some_and(|w| w != name) {
            continue;
        }
        let parameters = f.get("parameters").cloned().unwrap_or_else(|| json!({"type": "object"}));
        calls.push(json!({
            "type": "object",
            "properties": {"name": {"const": name}, "arguments": parameters},
            "required": ["name", "arguments"],
            "additionalProperties": false
        }));
    }
    if calls.is_empty() {
        return Err(invalid(format!("`tool_choice` names `{}`, which is not in `tools`", wanted.unwrap_or(""))));
    }
    let schema = if calls.len() == 1 { calls.remove(0) } else { json!({"anyOf": calls}) };
    let described: Vec<Json> = functions.iter().map(|f| (*f).clone()).collect();
    let instructions = format!(
        "You can call these functions:\n{}\nReply with one JSON object {{\"name\": <function name>, \"arguments\": <its arguments>}} and nothing else.",
        serde_json::to_string_pretty(&described).unwrap_or_default()
    );
    Ok(Some(Forced {
        response_format: json!({"type": "json_schema", "json_schema": {"name": "tool_call", "schema": schema}}),
        instructions,
    }))
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

/// The reply as OpenAI's `tool_calls`, or `None` if it is not a whole call
/// (cut short by `max_tokens`).
pub fn tool_calls(text: &str) -> Option<Vec<Json>> {
    let call: Json = serde_json::from_str(text).ok()?;
    let name = call.get("name")?.as_str()?;
    let arguments = call.get("arguments")?;
    Some(vec![json!({
        "id": format!("call_{}", uuid::Uuid::new_v4().simple()),
        "type": "function",
        "function": {"name": name, "arguments": arguments.to_string()}
    })])
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
    fn only_required_and_named_choices_force_a_call() {
        assert!(forced(Some(&tools()), None).expect("ok").is_none());
        assert!(forced(Some(&tools()), Some(&json!("auto"))).expect("ok").is_none());
        let all = forced(Some(&tools()), Some(&json!("required"))).expect("ok").expect("forced");
        assert_eq!(all.response_format["json_schema"]["schema"]["anyOf"].as_array().map(Vec::len), Some(2));
        let named = forced(Some(&tools()), Some(&json!({"type": "function", "function": {"name": "time"}})))
            .expect("ok")
            .expect("forced");
        assert_eq!(named.response_format["json_schema"]["schema"]["properties"]["name"]["const"], "time");
        for bad in [json!({"type": "function", "function": {"name": "nope"}}), json!("sometimes"), json!(3)] {
            let err = forced(Some(&tools()), Some(&bad)).err().expect("refused");
            assert_eq!(err.param.as_deref(), Some("tool_choice"));
        }
        assert!(forced(None, Some(&json!("required"))).is_err());
    }

    #[test]
    fn a_whole_call_becomes_tool_calls() {
        let calls = tool_calls(r#"{"name": "weather", "arguments": {"city": "Paris"}}"#).expect("a call");
        assert_eq!(calls[0]["function"]["name"], "weather");
        assert_eq!(calls[0]["function"]["arguments"], r#"{"city":"Paris"}"#);
        assert!(calls[0]["id"].as_str().is_some_and(|id| id.starts_with("call_")));
        assert!(tool_calls(r#"{"name": "weather", "argu"#).is_none());
    }
}
