//! Named templates and presets over HTTP.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::{start_server, TestResult, MODEL_ID};

struct Fixture {
    base_url: String,
    templates: tempfile::TempDir,
    _presets: tempfile::TempDir,
}

/// A server with its own copy of the shipped templates and presets (so the
/// tests can edit them), plus a template that loops forever and a preset
/// that names things that do not exist.
fn fixture() -> Result<Fixture, Box<dyn std::error::Error>> {
    let templates = tempfile::tempdir()?;
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR"));
    for entry in std::fs::read_dir(shipped.join("templates"))? {
        let entry = entry?;
        std::fs::copy(entry.path(), templates.path().join(entry.file_name()))?;
    }
    std::fs::write(
        templates.path().join("forever.jinja"),
        "{#- description = \"never ends\" -#}{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    )?;
    let presets = tempfile::tempdir()?;
    std::fs::copy(shipped.join("presets/examples.toml"), presets.path().join("examples.toml"))?;
    std::fs::write(
        presets.path().join("broken.toml"),
        "[ghost-adapter]\nadapter = \"no-such-adapter\"\n\n[ghost-template]\ntemplate = \"no-such-template\"\n",
    )?;
    let addr = start_server(&[
        "--templates-dir",
        &templates.path().display().to_string(),
        "--presets",
        &presets.path().display().to_string(),
        "--adapters-dir",
        &shipped.join("adapters").display().to_string(),
    ]);
    Ok(Fixture { base_url: format!("http://{addr}"), templates, _presets: presets })
}

async fn post(url: String, body: Value) -> Result<(u16, Value), Box<dyn std::error::Error>> {
    let resp = reqwest::Client::new().post(url).json(&body).send().await?;
    let status = resp.status().as_u16();
    let text = resp.text().await?;
    Ok((status, serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))?))
}

#[tokio::test]
async fn templates_presets_and_reload() -> TestResult {
    let f = fixture()?;
    let url = |path: &str| format!("{}{path}", f.base_url);

    // Listing: description and variables with required/default.
    let list: Value = reqwest::get(url("/v1/templates")).await?.json().await?;
    let names: Vec<&str> = list["data"].as_array().expect("data").iter().filter_map(|t| t["name"].as_str()).collect();
    for shipped in ["classify", "extract_json", "summarize", "translate"] {
        assert!(names.contains(&shipped), "{names:?}");
    }
    let summarize =
        list["data"].as_array().expect("data").iter().find(|t| t["name"] == "summarize").expect("summarize");
    assert_eq!(summarize["variables"]["text"]["required"], true);
    assert_eq!(summarize["variables"]["sentences"]["default"], 2);
    assert!(summarize["description"].as_str().is_some_and(|d| !d.is_empty()));

    // Completions with a template: the dry run gives the very ids generation uses.
    let vars = json!({"text": "Water boils at 100 degrees Celsius at sea level.", "target_language": "French"});
    let (s, dry) = post(url("/v1/templates/translate/render"), json!({"template_vars": vars})).await?;
    assert_eq!(s, 200, "{dry}");
    assert!(dry["prompt"].as_str().expect("prompt").contains("into French"));
    let (s, done) = post(
        url("/v1/completions"),
        json!({"model": MODEL_ID, "template": "translate", "template_vars": vars, "max_tokens": 4, "temperature": 0}),
    )
    .await?;
    assert_eq!(s, 200, "{done}");
    assert_eq!(done["usage"]["prompt_tokens"], dry["count"]);
    let (_, tokenized) = post(url("/tokenize"), json!({"prompt": dry["prompt"]})).await?;
    assert_eq!(tokenized["tokens"], dry["tokens"]);

    // Chat with a template: the rendering is the final user message, the
    // template's system prompt the system message; same ids as the dry run.
    let (_, chat_dry) = post(
        url("/v1/templates/summarize/render"),
        json!({"mode": "chat", "template_vars": {"text": "Cats sleep a lot."}}),
    )
    .await?;
    let chat_prompt = chat_dry["prompt"].as_str().expect("prompt");
    assert!(chat_prompt.starts_with("<|im_start|>system\nYou are a careful editor."), "{chat_prompt}");
    assert!(
        chat_prompt.contains("<|im_start|>user\nSummarize the following text in at most 2 sentences."),
        "{chat_prompt}"
    );
    let (s, chat) = post(
        url("/v1/chat/completions"),
        json!({"model": MODEL_ID, "template": "summarize", "template_vars": {"text": "Cats sleep a lot."}, "max_tokens": 4}),
    )
    .await?;
    assert_eq!(s, 200, "{chat}");
    assert_eq!(chat["usage"]["prompt_tokens"], chat_dry["count"]);

    // Missing and unknown variables are 400s that name them; unknown templates 404.
    let (s, e) = post(
        url("/v1/completions"),
        json!({"model": MODEL_ID, "template": "translate", "template_vars": {"text": "x"}}),
    )
    .await?;
    assert_eq!(s, 400);
    assert!(e["error"]["message"].as_str().expect("message").contains("target_language"), "{e}");
    let (s, e) = post(
        url("/v1/completions"),
        json!({"model": MODEL_ID, "template": "summarize", "template_vars": {"text": "x", "tone": "dry"}}),
    )
    .await?;
    assert_eq!(s, 400);
    assert!(e["error"]["message"].as_str().expect("message").contains("tone"), "{e}");
    let (s, _) = post(url("/v1/completions"), json!({"model": MODEL_ID, "template": "nope"})).await?;
    assert_eq!(s, 404);
    // A template that never ends is stopped with an error, not a hang.
    let (s, e) = tokio::time::timeout(
        Duration::from_secs(30),
        post(url("/v1/completions"), json!({"model": MODEL_ID, "template": "forever", "max_tokens": 2})),
    )
    .await??;
    assert_eq!(s, 400, "{e}");

    // Presets are listed with the base as parent, and selected by model.
    let models: Value = reqwest::get(url("/v1/models")).await?.json().await?;
    let card = |id: &str| models["data"].as_array().expect("data").iter().find(|m| m["id"] == id).cloned();
    assert_eq!(card("json-summary").expect("preset listed")["parent"], MODEL_ID);
    assert!(card("sentiment").is_some() && card("town-crier").is_some());
    // Adapter + template: the json adapter's behaviour on the summarize prompt.
    let text = "The Eiffel Tower was completed in 1889 for the World Fair in Paris. It is 330 metres tall.";
    let (s, reply) = post(
        url("/v1/chat/completions"),
        json!({"model": "json-summary", "messages": [{"role": "user", "content": text}]}),
    )
    .await?;
    assert_eq!(s, 200, "{reply}");
    assert_eq!(reply["model"], "json-summary");
    let content = reply["choices"][0]["message"]["content"].as_str().expect("content");
    assert!(serde_json::from_str::<Value>(content).is_ok_and(|v| v.is_object()), "{content}");
    let (_, preset_dry) = post(
        url("/v1/templates/summarize/render"),
        json!({"model": "json-summary", "mode": "chat", "messages": [{"role": "user", "content": text}]}),
    )
    .await?;
    assert_eq!(reply["usage"]["prompt_tokens"], preset_dry["count"], "the preset's prompt is the template's");
    assert!(
        preset_dry["prompt"].as_str().expect("prompt").contains("at most 1 sentence."),
        "preset template_vars apply"
    );
    // Request fields override preset defaults (max_tokens 96 → 3).
    let (_, short) = post(
        url("/v1/chat/completions"),
        json!({"model": "town-crier", "messages": [{"role": "user", "content": "News?"}], "max_tokens": 3, "ignore_eos": true}),
    )
    .await?;
    assert_eq!(short["usage"]["completion_tokens"], 3);
    // Prompting-only preset through a plain completions call.
    let (s, label) = post(
        url("/v1/completions"),
        json!({"model": "sentiment", "prompt": "This is the worst pizza I have ever eaten."}),
    )
    .await?;
    assert_eq!(s, 200, "{label}");
    assert_eq!(label["choices"][0]["text"].as_str().map(str::trim), Some("negative"));
    // Presets naming what does not exist answer with a clear error.
    for (preset, missing) in [("ghost-adapter", "no-such-adapter"), ("ghost-template", "no-such-template")] {
        let (s, e) = post(
            url("/v1/chat/completions"),
            json!({"model": preset, "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await?;
        assert_eq!(s, 400, "{e}");
        assert!(e["error"]["message"].as_str().expect("message").contains(missing), "{e}");
    }

    // Reload after an edit, then after a broken edit (the last good version stays).
    let path = f.templates.path().join("translate.jinja");
    let original = std::fs::read_to_string(&path)?;
    std::fs::write(&path, original.replace("Translate the following text", "Please translate this text"))?;
    let (s, reloaded) = post(url("/v1/templates/reload"), json!({})).await?;
    assert_eq!(s, 200);
    assert_eq!(reloaded["errors"], json!([]));
    let (_, edited) = post(url("/v1/templates/translate/render"), json!({"template_vars": vars})).await?;
    assert!(edited["prompt"].as_str().expect("prompt").contains("Please translate this text"));
    std::fs::write(&path, "{#- description = \"broken\" -#}{% for x in %}")?;
    let (_, reloaded) = post(url("/v1/templates/reload"), json!({})).await?;
    assert_eq!(reloaded["errors"].as_array().map(Vec::len), Some(1), "{reloaded}");
    let (s, kept) = post(url("/v1/templates/translate/render"), json!({"template_vars": vars})).await?;
    assert_eq!(s, 200, "{kept}");
    assert!(kept["prompt"].as_str().expect("prompt").contains("Please translate this text"));
    // Without the endpoint: file changes are picked up by themselves.
    std::fs::write(&path, original.replace("Translate the following text", "Kindly translate"))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, now) = post(url("/v1/templates/translate/render"), json!({"template_vars": vars})).await?;
        if now["prompt"].as_str().is_some_and(|p| p.contains("Kindly translate")) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the edit was not picked up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}
