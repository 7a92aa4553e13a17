//! Constrained decoding (`response_format`) on the real model, with the base
//! and every shipped adapter: outputs always parse and follow the schema.

use serde_json::{json, Value};

use crate::common::{post_at, server, stream_at, TestResult, MODEL_ID};

async fn post(path: &str, body: Value) -> Result<(u16, Value), Box<dyn std::error::Error>> {
    post_at(server(), path, body).await
}

/// A streamed chat reply: the raw SSE text and its JSON chunks.
async fn stream_chat(body: Value) -> Result<(String, Vec<Value>), Box<dyn std::error::Error>> {
    stream_at(server(), "/v1/chat/completions", body).await
}

fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "mood": {"enum": ["happy", "sad"]}
        },
        "required": ["name", "age", "mood"],
        "additionalProperties": false
    })
}

/// The schema's rules, checked by hand (what a JSON Schema validator would).
fn follows_person_schema(text: &str) -> Result<(), String> {
    let value: Value = serde_json::from_str(text).map_err(|e| format!("not JSON ({e}): {text}"))?;
    let object = value.as_object().ok_or_else(|| format!("not an object: {text}"))?;
    let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
    keys.sort();
    if keys != ["age", "mood", "name"] {
        return Err(format!("keys {keys:?}: {text}"));
    }
    let name = object["name"].as_str().ok_or_else(|| format!("name: {text}"))?;
    if name.chars().count() > 20 {
        return Err(format!("name too long: {text}"));
    }
    if !object["age"].as_i64().is_some_and(|a| (0..=120).contains(&a)) {
        return Err(format!("age: {text}"));
    }
    if !matches!(object["mood"].as_str(), Some("happy" | "sad")) {
        return Err(format!("mood: {text}"));
    }
    Ok(())
}

#[tokio::test]
async fn json_schema_outputs_always_follow_the_schema_for_base_and_adapters() -> TestResult {
    let format =
        json!({"type": "json_schema", "json_schema": {"name": "person", "schema": person_schema(), "strict": true}});
    let mut checked = 0;
    for model in [MODEL_ID, "pirate", "shout", "json"] {
        for (temperature, seed) in [(0.0, 0), (1.0, 1), (1.0, 2), (1.0, 3)] {
            let body = json!({"model": model, "messages": [{"role": "user", "content": "Describe a person."}],
                "max_tokens": 100, "temperature": temperature, "seed": seed, "response_format": format});
            let (s, reply) = post("/v1/chat/completions", body).await?;
            assert_eq!(s, 200, "{reply}");
            let choice = &reply["choices"][0];
            assert_eq!(choice["finish_reason"], "stop", "the grammar ends the output: {reply}");
            follows_person_schema(choice["message"]["content"].as_str().unwrap_or_default())?;
            checked += 1;
        }
    }
    assert_eq!(checked, 16);
    Ok(())
}

#[tokio::test]
async fn json_object_regex_streaming_and_bad_formats() -> TestResult {
    // Any JSON object, on completions too.
    let (s, reply) = post(
        "/v1/completions",
        json!({"model": MODEL_ID, "prompt": "A JSON object about the sea:", "max_tokens": 60, "temperature": 0,
            "response_format": {"type": "json_object"}}),
    )
    .await?;
    assert_eq!(s, 200, "{reply}");
    let text = reply["choices"][0]["text"].as_str().unwrap_or_default();
    if reply["choices"][0]["finish_reason"] == "stop" {
        assert!(serde_json::from_str::<Value>(text).is_ok_and(|v| v.is_object()), "{text}");
    } else {
        assert!(text.starts_with('{'), "{text}");
    }
    // tailor's regex extension.
    let (s, reply) = post(
        "/v1/chat/completions",
        json!({"model": MODEL_ID, "messages": [{"role": "user", "content": "Is the sky blue?"}], "max_tokens": 5,
            "temperature": 0, "response_format": {"type": "regex", "regex": "(yes|no)"}}),
    )
    .await?;
    assert_eq!(s, 200, "{reply}");
    let answer = reply["choices"][0]["message"]["content"].as_str().unwrap_or_default();
    assert!(answer == "yes" || answer == "no", "{answer}");
    // Streamed content equals the whole response.
    let body = json!({"model": "json", "messages": [{"role": "user", "content": "Describe a person."}], "max_tokens": 100,
        "temperature": 0, "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": person_schema()}}});
    let (_, whole) = post("/v1/chat/completions", body.clone()).await?;
    let mut streamed = body;
    streamed["stream"] = json!(true);
    let (_, chunks) = stream_chat(streamed).await?;
    let content: String =
        chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str().map(str::to_string)).collect();
    assert_eq!(content, whole["choices"][0]["message"]["content"].as_str().unwrap_or_default());
    // Bad formats are 400s naming the field, before any generation.
    for bad in [
        json!({"type": "xml"}),
        json!({"type": "json_schema"}),
        json!({"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}),
        json!({"type": "regex", "regex": "(unclosed"}),
    ] {
        let (s, reply) = post(
            "/v1/chat/completions",
            json!({"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "response_format": bad}),
        )
        .await?;
        assert_eq!(s, 400, "{bad}: {reply}");
        assert_eq!(reply["error"]["param"], "response_format", "{reply}");
    }
    Ok(())
}

#[tokio::test]
async fn a_preset_binds_an_adapter_a_schema_and_defaults_under_one_id() -> TestResult {
    let dir = tempfile::tempdir()?;
    let preset = json!({"extract-person": {
        "adapter": "json",
        "temperature": 0.0,
        "max_tokens": 100,
        "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": person_schema()}},
    }});
    std::fs::write(dir.path().join("presets.toml"), toml::to_string(&preset)?)?;
    let addr = crate::common::start_server(&["--presets", &dir.path().display().to_string()]);
    let ask = |body: Value| async move {
        let response =
            reqwest::Client::new().post(format!("http://{addr}/v1/chat/completions")).json(&body).send().await?;
        Ok::<Value, Box<dyn std::error::Error>>(response.json().await?)
    };
    let messages = json!([{"role": "user", "content": "Ann is 31 and cheerful."}]);
    let reply = ask(json!({"model": "extract-person", "messages": messages})).await?;
    follows_person_schema(reply["choices"][0]["message"]["content"].as_str().unwrap_or_default())?;
    // The request's own response_format wins over the preset's.
    let reply = ask(json!({"model": "extract-person", "messages": messages,
        "response_format": {"type": "regex", "regex": "(yes|no)"}}))
    .await?;
    let answer = reply["choices"][0]["message"]["content"].as_str().unwrap_or_default();
    assert!(answer == "yes" || answer == "no", "{reply}");
    Ok(())
}

#[tokio::test]
async fn forced_tool_calls_follow_the_functions_schema() -> TestResult {
    let tools = json!([
        {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                "required": ["city"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "get_time", "description": "The current time",
            "parameters": {"type": "object", "properties": {}, "additionalProperties": false}}}
    ]);
    let messages = json!([{"role": "user", "content": "What is the weather in Paris?"}]);
    for (choice, expect) in [
        (json!("required"), None),
        (json!({"type": "function", "function": {"name": "get_weather"}}), Some("get_weather")),
        (json!({"type": "function", "function": {"name": "get_time"}}), Some("get_time")),
    ] {
        let (s, reply) = post(
            "/v1/chat/completions",
            json!({"model": MODEL_ID, "messages": messages, "tools": tools, "tool_choice": choice, "max_tokens": 60, "temperature": 0}),
        )
        .await?;
        assert_eq!(s, 200, "{reply}");
        let c = &reply["choices"][0];
        assert_eq!(c["finish_reason"], "tool_calls", "{reply}");
        assert!(c["message"]["content"].is_null(), "{reply}");
        let call = &c["message"]["tool_calls"][0];
        assert_eq!(call["type"], "function");
        assert!(call["id"].as_str().is_some_and(|id| id.starts_with("call_")));
        let name = call["function"]["name"].as_str().unwrap_or_default();
        if let Some(expect) = expect {
            assert_eq!(name, expect);
        }
        let arguments: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap_or_default())?;
        match name {
            "get_weather" => {
                let city = arguments["city"].as_str().ok_or_else(|| format!("city: {arguments}"))?;
                assert!(city.chars().count() <= 20 && arguments.as_object().map(|o| o.len()) == Some(1));
            }
            "get_time" => assert_eq!(arguments, json!({})),
            other => panic!("not a listed function: {other}"),
        }
    }
    // Streamed: the role, then the call in one delta with finish_reason tool_calls.
    let body = json!({"model": MODEL_ID, "messages": messages, "tools": tools, "stream": true, "max_tokens": 60,
        "temperature": 0, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}});
    let (text, chunks) = stream_chat(body).await?;
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    let last = chunks.last().ok_or("chunks")?;
    assert_eq!(last["choices"][0]["finish_reason"], "tool_calls", "{text}");
    let call = &last["choices"][0]["delta"]["tool_calls"][0];
    assert_eq!(call["index"], 0);
    assert_eq!(call["function"]["name"], "get_weather");
    assert!(
        serde_json::from_str::<Value>(call["function"]["arguments"].as_str().unwrap_or_default())?["city"].is_string()
    );
    Ok(())
}
