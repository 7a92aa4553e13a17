//! Tool calls with `tool_choice: auto`: the model's own format read back
//! (Hermes and Llama 3 templates served over SmolLM2, the reply steered by a
//! regex so the call is certain), tailor's generic format for a template that
//! ignores tools, and earlier calls and results rendered into the prompt.

use std::net::SocketAddr;
use std::sync::OnceLock;

use serde_json::{json, Value};

use crate::common::{post_at, server, start_server, stream_at, TestResult, MODEL_ID};

fn template(name: &str) -> String {
    format!("{}/tests/fixtures/chat_templates/templates/{name}.jinja", env!("CARGO_MANIFEST_DIR"))
}

/// SmolLM2 served with Qwen 2.5's chat template (Hermes `<tool_call>` format).
fn qwen_server() -> SocketAddr {
    static SERVER: OnceLock<SocketAddr> = OnceLock::new();
    *SERVER.get_or_init(|| start_server(&["--chat-template", &template("Qwen-Qwen2.5-7B-Instruct")]))
}

fn tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_time", "description": "The time in a zone",
            "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]}}},
        {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                "required": ["city"], "additionalProperties": false}}}
    ])
}

/// The streamed chunks of one choice, assembled as the OpenAI SDK does.
fn assemble(chunks: &[Value]) -> (String, Vec<Value>, Option<String>) {
    let (mut content, mut calls, mut finish) = (String::new(), Vec::<Value>::new(), None);
    for chunk in chunks {
        let choice = &chunk["choices"][0];
        content.push_str(choice["delta"]["content"].as_str().unwrap_or_default());
        for piece in choice["delta"]["tool_calls"].as_array().into_iter().flatten() {
            let index = piece["index"].as_u64().expect("an index") as usize;
            if calls.len() <= index {
                calls.push(json!({"id": piece["id"], "name": "", "arguments": ""}));
            }
            let call = &mut calls[index];
            let name = call["name"].as_str().unwrap_or_default().to_string()
                + piece["function"]["name"].as_str().unwrap_or_default();
            let arguments = call["arguments"].as_str().unwrap_or_default().to_string()
                + piece["function"]["arguments"].as_str().unwrap_or_default();
            call["name"] = json!(name);
            call["arguments"] = json!(arguments);
        }
        if let Some(reason) = choice["finish_reason"].as_str() {
            finish = Some(reason.to_string());
        }
    }
    (content, calls, finish)
}

#[tokio::test]
async fn hermes_calls_are_read_back_whole_and_streamed() -> TestResult {
    let addr = qwen_server();
    // The regex makes the model write text, then two calls in Qwen's format.
    let reply_regex = r#"Checking\. <tool_call>\n\{"name": "get_time", "arguments": \{"tz": "UTC"\}\}\n</tool_call>\n<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "Oslo"\}\}\n</tool_call>"#;
    let body = json!({"model": MODEL_ID, "tools": tools(), "max_tokens": 80, "temperature": 0,
        "messages": [{"role": "user", "content": "Time in UTC and weather in Oslo?"}],
        "response_format": {"type": "regex", "regex": reply_regex}});
    let (s, reply) = post_at(addr, "/v1/chat/completions", body.clone()).await?;
    assert_eq!(s, 200, "{reply}");
    let choice = &reply["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{reply}");
    assert_eq!(choice["message"]["content"], "Checking.", "{reply}");
    let calls = choice["message"]["tool_calls"].as_array().ok_or("tool_calls")?;
    assert_eq!(calls.len(), 2, "{reply}");
    assert_eq!(calls[0]["function"]["name"], "get_time");
    assert_eq!(
        serde_json::from_str::<Value>(calls[0]["function"]["arguments"].as_str().unwrap_or_default())?,
        json!({"tz": "UTC"})
    );
    assert_eq!(calls[1]["function"]["name"], "get_weather");
    assert!(calls
        .iter()
        .all(|c| c["id"].as_str().is_some_and(|id| id.starts_with("call_")) && c["type"] == "function"));

    let mut streamed = body;
    streamed["stream"] = json!(true);
    let (text, chunks) = stream_at(addr, "/v1/chat/completions", streamed).await?;
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    let (content, calls, finish) = assemble(&chunks);
    assert_eq!(content.trim(), "Checking.", "{text}");
    assert_eq!(finish.as_deref(), Some("tool_calls"));
    assert_eq!(calls.len(), 2, "{text}");
    assert_eq!(calls[0]["name"], "get_time");
    assert_eq!(
        serde_json::from_str::<Value>(calls[1]["arguments"].as_str().unwrap_or_default())?,
        json!({"city": "Oslo"})
    );
    // The text came before the calls were whole: content streams as it is made.
    let first_call =
        chunks.iter().position(|c| !c["choices"][0]["delta"]["tool_calls"].is_null()).ok_or("a call chunk")?;
    let first_text =
        chunks.iter().position(|c| c["choices"][0]["delta"]["content"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(first_text.is_some_and(|t| t < first_call), "{text}");
    Ok(())
}

#[tokio::test]
async fn llama3_json_replies_are_calls_and_plain_text_stays_content() -> TestResult {
    let addr = start_server(&[
        "--chat-template",
        &template("meta-llama-Llama-3.2-3B-Instruct"),
        "--tool-call-parser",
        "llama3_json",
    ]);
    let messages = json!([{"role": "user", "content": "Time in UTC?"}]);
    let call_regex = r#"\{"name": "get_time", "parameters": \{"tz": "UTC"\}\}"#;
    let (s, reply) = post_at(
        addr,
        "/v1/chat/completions",
        json!({"model": MODEL_ID, "tools": tools(), "messages": messages,
        "max_tokens": 40, "temperature": 0, "response_format": {"type": "regex", "regex": call_regex}}),
    )
    .await?;
    assert_eq!(s, 200, "{reply}");
    let choice = &reply["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{reply}");
    assert!(choice["message"]["content"].is_null(), "{reply}");
    assert_eq!(choice["message"]["tool_calls"][0]["function"]["arguments"], r#"{"tz":"UTC"}"#);
    // A reply that is not a call is content, streamed or not.
    let plain = json!({"model": MODEL_ID, "tools": tools(), "messages": messages, "max_tokens": 8, "temperature": 0,
        "response_format": {"type": "regex", "regex": "It is noon\\."}});
    let (_, reply) = post_at(addr, "/v1/chat/completions", plain.clone()).await?;
    assert_eq!(reply["choices"][0]["message"]["content"], "It is noon.", "{reply}");
    assert_eq!(reply["choices"][0]["finish_reason"], "stop");
    assert!(reply["choices"][0]["message"]["tool_calls"].is_null());
    let mut streamed = plain;
    streamed["stream"] = json!(true);
    let (text, chunks) = stream_at(addr, "/v1/chat/completions", streamed).await?;
    let (content, calls, finish) = assemble(&chunks);
    assert_eq!((content.as_str(), calls.len(), finish.as_deref()), ("It is noon.", 0, Some("stop")), "{text}");
    Ok(())
}

/// The prompt a chat request would send, as text.
async fn prompt_text(addr: SocketAddr, body: Value) -> Result<String, Box<dyn std::error::Error>> {
    let (s, tokens) = post_at(addr, "/tokenize", body).await?;
    assert_eq!(s, 200, "{tokens}");
    let (s, text) = post_at(addr, "/detokenize", json!({"model": MODEL_ID, "tokens": tokens["tokens"]})).await?;
    assert_eq!(s, 200, "{text}");
    Ok(text["prompt"].as_str().unwrap_or_default().to_string())
}

fn conversation_with_a_result() -> Value {
    json!([
        {"role": "user", "content": "Time in UTC?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_abc", "type": "function",
            "function": {"name": "get_time", "arguments": "{\"tz\": \"UTC\"}"}}]},
        {"role": "tool", "tool_call_id": "call_abc", "content": "12:00"}
    ])
}

#[tokio::test]
async fn calls_and_results_render_back_into_the_prompt() -> TestResult {
    // Qwen's template shows them in its own format, arguments as an object.
    let text = prompt_text(
        qwen_server(),
        json!({"model": MODEL_ID, "messages": conversation_with_a_result(), "tools": tools()}),
    )
    .await?;
    assert!(
        text.contains("<tool_call>\n{\"name\": \"get_time\", \"arguments\": {\"tz\": \"UTC\"}}\n</tool_call>"),
        "{text}"
    );
    assert!(text.contains("<tool_response>\n12:00\n</tool_response>"), "{text}");
    assert!(text.contains("\"name\": \"get_weather\""), "the tools are listed: {text}");
    // SmolLM2's template ignores tools: the generic format describes them,
    // and the call and its result become plain turns.
    let text =
        prompt_text(server(), json!({"model": MODEL_ID, "messages": conversation_with_a_result(), "tools": tools()}))
            .await?;
    assert!(text.contains("You can call these functions") && text.contains("get_weather"), "{text}");
    assert!(
        text.contains(
            r#"<|im_start|>assistant
{"tool_call":{"name":"get_time","arguments":{"tz":"UTC"}}}<|im_end|>"#
        ),
        "{text}"
    );
    assert!(
        text.contains(
            r#"<|im_start|>user
{"tool_response":{"name":"get_time","tool_call_id":"call_abc","content":"12:00"}}<|im_end|>"#
        ),
        "{text}"
    );
    // And the reply after a result is read in the same format.
    let (s, reply) = post_at(
        server(),
        "/v1/chat/completions",
        json!({"model": MODEL_ID, "messages": conversation_with_a_result(),
        "tools": tools(), "max_tokens": 60, "temperature": 0}),
    )
    .await?;
    assert_eq!(s, 200, "{reply}");
    let message = &reply["choices"][0]["message"];
    match message["tool_calls"].as_array() {
        Some(calls) => {
            assert_eq!(reply["choices"][0]["finish_reason"], "tool_calls", "{reply}");
            assert!(calls
                .iter()
                .all(|c| ["get_time", "get_weather"].contains(&c["function"]["name"].as_str().unwrap_or_default())));
        }
        None => {
            let content = message["content"].as_str().ok_or("content")?;
            assert!(!content.trim_start().starts_with('{'), "the generic JSON is unwrapped: {reply}");
        }
    }
    Ok(())
}

#[tokio::test]
async fn a_tool_round_trip_with_tool_choice_none_works_on_a_template_that_ignores_tools() -> TestResult {
    // The history as the openai SDK sends it after a forced call: the
    // assistant's `content: null` with `tool_calls`, then the `tool` result.
    for choice in [json!("none"), Value::Null] {
        let mut body = json!({"model": MODEL_ID, "messages": conversation_with_a_result(), "max_tokens": 24,
            "temperature": 0, "tool_choice": choice});
        if choice.is_null() {
            body.as_object_mut().ok_or("object")?.remove("tool_choice");
        } else {
            body["tools"] = tools();
        }
        let (s, reply) = post_at(server(), "/v1/chat/completions", body.clone()).await?;
        assert_eq!(s, 200, "{body}: {reply}");
        assert!(reply["choices"][0]["message"]["tool_calls"].is_null(), "no call with tool_choice none: {reply}");
        assert!(reply["choices"][0]["message"]["content"].is_string(), "{reply}");
        let text = prompt_text(server(), body).await?;
        assert!(text.contains(r#"{"tool_call":{"name":"get_time","arguments":{"tz":"UTC"}}}"#), "{text}");
        assert!(!text.contains("You can call these functions"), "no call can be made: {text}");
    }
    Ok(())
}

#[tokio::test]
async fn auto_on_a_template_that_ignores_tools_answers_or_calls_in_json() -> TestResult {
    for (question, seed) in [("What is the weather in Paris?", 0), ("Say hello.", 1), ("What time is it in Tokyo?", 2)]
    {
        let body = json!({"model": MODEL_ID, "tools": tools(), "max_tokens": 60, "temperature": 1.0, "seed": seed,
            "messages": [{"role": "user", "content": question}]});
        let (s, reply) = post_at(server(), "/v1/chat/completions", body.clone()).await?;
        assert_eq!(s, 200, "{reply}");
        let choice = &reply["choices"][0];
        if choice["finish_reason"] == "length" {
            continue; // cut short: the raw JSON comes back as content
        }
        match choice["message"]["tool_calls"].as_array() {
            Some(calls) => {
                assert_eq!(choice["finish_reason"], "tool_calls", "{reply}");
                let arguments: Value =
                    serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap_or_default())?;
                assert!(arguments.is_object(), "{reply}");
            }
            None => assert!(choice["message"]["content"].is_string() && choice["finish_reason"] == "stop", "{reply}"),
        }
        // Streamed: the same reply in one piece.
        let mut streamed = body;
        streamed["stream"] = json!(true);
        let (text, chunks) = stream_at(server(), "/v1/chat/completions", streamed).await?;
        let (content, calls, finish) = assemble(&chunks);
        assert_eq!(finish.as_deref(), choice["finish_reason"].as_str(), "{text}");
        assert_eq!(content, choice["message"]["content"].as_str().unwrap_or_default(), "{text}");
        assert_eq!(calls.len(), choice["message"]["tool_calls"].as_array().map_or(0, Vec::len), "{text}");
    }
    Ok(())
}
