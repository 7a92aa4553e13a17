//! Earlier calls and their results, as the chat template will see them.

use std::collections::HashMap;

use serde_json::{json, Map, Value as Json};

/// Assistant `tool_calls` arrive with `arguments` as JSON text; templates
/// index and `tojson` them, so they get the object (as vLLM does).
pub fn arguments_as_objects(message: &mut Map<String, Json>) {
    let Some(Json::Array(calls)) = message.get_mut("tool_calls") else { return };
    for call in calls {
        if let Some(arguments) = call.get_mut("function").and_then(|f| f.get_mut("arguments")) {
            if let Some(parsed) = arguments.as_str().and_then(|t| serde_json::from_str::<Json>(t).ok()) {
                if parsed.is_object() {
                    *arguments = parsed;
                }
            }
        }
    }
}

/// Whether a conversation holds calls or their results.
pub fn has_tool_turns(messages: &[Json]) -> bool {
    messages.iter().any(|m| {
        m["role"] == "tool" || m.get("tool_calls").is_some_and(|c| c.as_array().is_some_and(|a| !a.is_empty()))
    })
}

/// For a template that ignores tools: an assistant's calls become its text
/// in the generic format, and a tool's result a user message holding
/// `{"tool_response": …}`, so the model reads them as plain turns.
pub fn in_generic_format(messages: &mut [Json]) {
    let mut names: HashMap<String, String> = HashMap::new();
    for message in messages.iter_mut() {
        let Json::Object(fields) = message else { continue };
        match fields.get("role").and_then(Json::as_str) {
            Some("assistant") => {
                let Some(Json::Array(calls)) = fields.remove("tool_calls") else { continue };
                let calls: Vec<Json> = calls
                    .iter()
                    .map(|call| {
                        let function = call.get("function").cloned().unwrap_or_default();
                        if let (Some(id), Some(name)) = (call["id"].as_str(), function["name"].as_str()) {
                            names.insert(id.to_string(), name.to_string());
                        }
                        json!({"name": function["name"], "arguments": function.get("arguments").cloned().unwrap_or(json!({}))})
                    })
                    .collect();
                let text = match calls.as_slice() {
                    [] => continue,
                    [one] => json!({"tool_call": one}),
                    _ => json!({"tool_calls": calls}),
                };
                fields.insert("content".into(), Json::String(text.to_string()));
            }
            Some("tool") => {
                let mut response = Map::new();
                if let Some(id) = fields.get("tool_call_id").and_then(Json::as_str) {
                    if let Some(name) = fields.get("name").and_then(Json::as_str).or(names.get(id).map(String::as_str))
                    {
                        response.insert("name".into(), json!(name));
                    }
                    response.insert("tool_call_id".into(), json!(id));
                }
                response.insert("content".into(), fields.get("content").cloned().unwrap_or(Json::Null));
                fields.insert("role".into(), json!("user"));
                fields.insert("content".into(), Json::String(json!({"tool_response": response}).to_string()));
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_text_becomes_an_object() {
        let mut message = json!({"role": "assistant", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "time", "arguments": "{\"tz\": \"UTC\"}"}},
            {"id": "call_2", "type": "function", "function": {"name": "time", "arguments": "not json"}}
        ]});
        arguments_as_objects(message.as_object_mut().expect("object"));
        assert_eq!(message["tool_calls"][0]["function"]["arguments"], json!({"tz": "UTC"}));
        assert_eq!(message["tool_calls"][1]["function"]["arguments"], "not json");
    }

    #[test]
    fn calls_and_results_become_plain_turns() {
        let mut messages = vec![
            json!({"role": "user", "content": "Time?"}),
            json!({"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "time", "arguments": {"tz": "UTC"}}}]}),
            json!({"role": "tool", "tool_call_id": "call_1", "content": "12:00"}),
        ];
        in_generic_format(&mut messages);
        assert_eq!(messages[1]["content"], r#"{"tool_call":{"name":"time","arguments":{"tz":"UTC"}}}"#);
        assert!(messages[1].get("tool_calls").is_none());
        assert_eq!(messages[2]["role"], "user");
        let response: Json = serde_json::from_str(messages[2]["content"].as_str().expect("text")).expect("json");
        assert_eq!(response, json!({"tool_response": {"name": "time", "tool_call_id": "call_1", "content": "12:00"}}));
    }
}
