//! Template sources from arbitrary text: a chat template rendered over a
//! small conversation, and a named template (TOML metadata + Jinja) rendered
//! with its defaults. Parsing and rendering must end (fuel bounds the work)
//! with text or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::json;
use tailor::prompt::templates::NamedTemplate;
use tailor::prompt::{ChatRequest, ChatTemplate};

fuzz_target!(|data: &[u8]| {
    let source = String::from_utf8_lossy(data);
    if let Ok(template) =
        ChatTemplate::new(&source, Some("<s>".into()), Some("</s>".into()), tailor::prompt::jinja::Clock::Local)
    {
        let request = ChatRequest {
            messages: vec![
                json!({"role": "system", "content": "Be brief."}),
                json!({"role": "user", "content": "Hi"}),
                json!({"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function",
                    "function": {"name": "f", "arguments": {"x": 1}}}]}),
                json!({"role": "tool", "tool_call_id": "c1", "content": "2"}),
            ],
            tools: Some(json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])),
            add_generation_prompt: true,
            ..Default::default()
        };
        let _ = template.render(&request);
    }
    if let Ok(named) = NamedTemplate::parse("fuzzed", &source) {
        let _ = named.render(&serde_json::Map::new());
    }
});
