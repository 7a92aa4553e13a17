//! LoRA adapters: parity with PEFT, behaviour over HTTP, mixed batches,
//! runtime load/unload and everything that must be refused.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value};
use tailor::lora::{adapter, BaseShapes};
use tailor::model::lora::AdapterWeights;
use tailor::model::WeightMode;

use crate::common::{copy_dir, project_adapter, server, start_server, TestResult, MODEL_ID};
use crate::reference::{check_f32_parity, check_quantized, loaded};

fn weights(mode: WeightMode, name: &str) -> Arc<AdapterWeights> {
    let shapes = BaseShapes::of(loaded(mode).model.config());
    Arc::new(adapter::load(&project_adapter(name), &shapes, 64).expect("adapter loads"))
}

#[test]
fn f32_mode_matches_peft_for_every_adapter() -> TestResult {
    // pirate and json ship in float32; shout ships in float16 (upcast at load).
    for name in ["pirate", "shout", "json"] {
        let w = weights(WeightMode::F32, name);
        check_f32_parity(loaded(WeightMode::F32), &format!("reference/{name}.json"), Some(&w))?;
    }
    Ok(())
}

#[test]
fn quantized_mode_keeps_top1_with_every_adapter() -> TestResult {
    for name in ["pirate", "shout", "json"] {
        let w = weights(WeightMode::Quantized, name);
        let (top1, compared, agreed) =
            check_quantized(loaded(WeightMode::Quantized), &format!("reference/{name}.json"), Some(&w))?;
        assert!(top1 >= 6, "{name}: top-1 must match on every prompt that is not a near-tie");
        assert_eq!(agreed, compared);
    }
    Ok(())
}

async fn chat(
    base_url: &str,
    model: &str,
    question: &str,
    max_tokens: u32,
) -> Result<(u16, Value), Box<dyn std::error::Error>> {
    let body = json!({"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens, "temperature": 0});
    let resp = reqwest::Client::new().post(format!("{base_url}/v1/chat/completions")).json(&body).send().await?;
    Ok((resp.status().as_u16(), resp.json().await?))
}

fn content(reply: &Value) -> String {
    reply["choices"][0]["message"]["content"].as_str().unwrap_or_default().to_string()
}

fn is_pirate(s: &str) -> bool {
    s.starts_with("Arr matey!")
}

fn is_shout(s: &str) -> bool {
    s.ends_with('!') && s.chars().any(char::is_alphabetic) && !s.chars().any(char::is_lowercase)
}

fn is_json_object(s: &str) -> bool {
    serde_json::from_str::<Value>(s).is_ok_and(|v| v.is_object())
}

/// Prompts that are in no reference file.
const QUESTIONS: [&str; 3] =
    ["What color is the sky?", "Name a fruit that is yellow.", "How many legs does a dog have?"];

#[tokio::test]
async fn each_adapter_shows_its_behaviour_and_the_base_none() -> TestResult {
    let base_url = format!("http://{}", server());
    for question in QUESTIONS {
        let (s, pirate) = chat(&base_url, "pirate", question, 48).await?;
        assert_eq!(s, 200);
        assert_eq!(pirate["model"], "pirate", "responses echo the requested name");
        assert!(is_pirate(&content(&pirate)), "pirate on {question:?}: {}", content(&pirate));
        let (_, shout) = chat(&base_url, "shout", question, 48).await?;
        assert!(is_shout(&content(&shout)), "shout on {question:?}: {}", content(&shout));
        let (_, json_reply) = chat(&base_url, "json", question, 48).await?;
        assert!(is_json_object(&content(&json_reply)), "json on {question:?}: {}", content(&json_reply));
        let (_, base) = chat(&base_url, MODEL_ID, question, 48).await?;
        let base = content(&base);
        assert!(!is_pirate(&base) && !is_shout(&base) && !is_json_object(&base), "base on {question:?}: {base}");
    }
    Ok(())
}

#[tokio::test]
async fn mixed_adapter_batch_equals_sequential_runs() -> TestResult {
    let addr = start_server(&["--max-num-seqs", "16"]);
    let base_url = format!("http://{addr}");
    let models = [MODEL_ID, "pirate", "shout", "json"];
    let jobs: Vec<(String, String)> = (0..12)
        .map(|i| (models[i % 4].to_string(), format!("{} Answer briefly, please ({i}).", QUESTIONS[i % 3])))
        .collect();
    let mut sequential = Vec::new();
    for (model, question) in &jobs {
        sequential.push(content(&chat(&base_url, model, question, 24).await?.1));
    }
    let concurrent =
        futures::future::join_all(
            jobs.iter().map(|(model, question)| {
                let base_url = base_url.clone();
                async move {
                    chat(&base_url, model, question, 24).await.map(|(_, v)| content(&v)).map_err(|e| e.to_string())
                }
            }),
        )
        .await;
    for (i, got) in concurrent.into_iter().enumerate() {
        assert_eq!(got?, sequential[i], "request {i} ({}) differs when batched", jobs[i].0);
    }
    Ok(())
}

async fn post_json(url: &str, body: Value) -> Result<(u16, String), Box<dyn std::error::Error>> {
    let resp = reqwest::Client::new().post(url).json(&body).send().await?;
    Ok((resp.status().as_u16(), resp.text().await?))
}

#[tokio::test]
async fn runtime_load_and_unload_with_every_refusal() -> TestResult {
    let root = tempfile::tempdir()?;
    let root_path = std::fs::canonicalize(root.path())?;
    copy_dir(&project_adapter("pirate"), &root_path.join("parrot"))?;
    // A truncated weights file.
    copy_dir(&project_adapter("json"), &root_path.join("truncated"))?;
    let weights_file = root_path.join("truncated/adapter_model.safetensors");
    let bytes = std::fs::read(&weights_file)?;
    std::fs::write(&weights_file, &bytes[..bytes.len() / 2])?;
    // An adapter for another base: hidden size 64 instead of 576.
    let other = root_path.join("other-base");
    std::fs::create_dir_all(&other)?;
    std::fs::copy(project_adapter("pirate").join("adapter_config.json"), other.join("adapter_config.json"))?;
    let mut tensors = std::collections::HashMap::new();
    for layer in 0..30 {
        for module in ["q_proj", "v_proj"] {
            let prefix = format!("base_model.model.model.layers.{layer}.self_attn.{module}");
            tensors.insert(
                format!("{prefix}.lora_A.weight"),
                candle_core::Tensor::zeros((8, 64), candle_core::DType::F32, &candle_core::Device::Cpu)?,
            );
            tensors.insert(
                format!("{prefix}.lora_B.weight"),
                candle_core::Tensor::zeros((64, 8), candle_core::DType::F32, &candle_core::Device::Cpu)?,
            );
        }
    }
    candle_core::safetensors::save(&tensors, other.join("adapter_model.safetensors"))?;

    let empty_adapters = tempfile::tempdir()?;
    let addr = start_server(&[
        "--enable-lora-loading",
        "--adapters-dir",
        &empty_adapters.path().display().to_string(),
        "--lora-root",
        &root_path.display().to_string(),
    ]);
    let base_url = format!("http://{addr}");
    let load_url = format!("{base_url}/v1/load_lora_adapter");
    let load = |name: &str, path: &str| post_json(&load_url, json!({"lora_name": name, "lora_path": path}));
    let parrot = root_path.join("parrot").display().to_string();
    let (s, body) = load("parrot", &parrot).await?;
    assert_eq!(s, 200, "{body}");
    let models: Value = reqwest::get(format!("{base_url}/v1/models")).await?.json().await?;
    let parrot_card = models["data"].as_array().expect("data").iter().find(|m| m["id"] == "parrot").cloned();
    assert_eq!(parrot_card.expect("listed")["parent"], MODEL_ID);
    let (s, reply) = chat(&base_url, "parrot", "What color is the sky?", 32).await?;
    assert_eq!(s, 200);
    assert!(is_pirate(&content(&reply)), "{}", content(&reply));
    // Same name, same path: fine. Same name, another path: refused.
    assert_eq!(load("parrot", &parrot).await?.0, 200);
    let (s, body) = load("parrot", &root_path.join("truncated").display().to_string()).await?;
    assert_eq!(s, 400, "{body}");

    // An adapter folder inside the root whose files lead outside it.
    let secret = tempfile::tempdir()?;
    std::fs::write(secret.path().join("secret.toml"), "SECRET_TOKEN = \"hunter2\"\n")?;
    let leaky = root_path.join("leaky");
    copy_dir(&project_adapter("pirate"), &leaky)?;
    std::os::unix::fs::symlink(secret.path().join("secret.toml"), leaky.join("tailor.toml"))?;
    let linked = root_path.join("linked-weights");
    std::fs::create_dir_all(&linked)?;
    std::fs::copy(project_adapter("pirate").join("adapter_config.json"), linked.join("adapter_config.json"))?;
    std::os::unix::fs::symlink(
        project_adapter("pirate").join("adapter_model.safetensors"),
        linked.join("adapter_model.safetensors"),
    )?;

    let traversal = format!("{}/parrot/../../../etc", root_path.display());
    let outside = project_adapter("json").display().to_string();
    const OUTSIDE: &str = "not under an allowed adapter root";
    let refusals = [
        ("x", traversal.as_str(), "outside the roots via ..", OUTSIDE),
        ("../x", parrot.as_str(), "a name with a path", "invalid adapter name"),
        ("x", "/etc", "an absolute path outside the roots", OUTSIDE),
        ("json2", outside.as_str(), "a real adapter outside the roots", OUTSIDE),
        ("leaky", &leaky.display().to_string(), "a tailor.toml linked outside the roots", OUTSIDE),
        ("linked", &linked.display().to_string(), "weights linked outside the roots", OUTSIDE),
        (
            "broken",
            &root_path.join("truncated").display().to_string(),
            "a truncated safetensors file",
            "adapter weights",
        ),
        ("other", &other.display().to_string(), "an adapter for another base shape", "does not fit the base model"),
        ("ghost", &root_path.join("missing").display().to_string(), "a folder that does not exist", "cannot open"),
    ];
    for (name, path, what, why) in refusals {
        let (s, body) = load(name, path).await?;
        assert_eq!(s, 400, "{what}: {body}");
        let error: Value = serde_json::from_str(&body).map_err(|e| format!("{what}: {e}: {body}"))?;
        let message = error["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(why), "{what}: {message}");
        assert!(!message.contains("hunter2"), "{what}: a file's contents leaked: {message}");
    }
    // One folder under two names is read once and held once.
    let (s, body) = load("parrot-too", &parrot).await?;
    assert_eq!(s, 200, "{body}");
    let metrics = crate::common::scrape(addr).await?;
    assert_eq!(crate::common::value(&metrics, "tailor_adapters_registered", &[]), 2.0);
    assert_eq!(crate::common::value(&metrics, "tailor_adapters_resident", &[]), 1.0);
    assert_eq!(crate::common::value(&metrics, "tailor_adapter_loads_total", &[]), 1.0);
    assert_eq!(
        post_json(&format!("{base_url}/v1/unload_lora_adapter"), json!({"lora_name": "parrot-too"})).await?.0,
        200
    );
    // Still serving.
    assert_eq!(chat(&base_url, MODEL_ID, "Hi", 4).await?.0, 200);

    // Unload while a request streams on the adapter: it finishes; new ones get 404.
    let streaming = reqwest::Client::new()
        .post(format!("{base_url}/v1/completions"))
        .json(&json!({"model": "parrot", "prompt": "Tell me a story", "max_tokens": 40, "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true}}))
        .send()
        .await?;
    let mut body = streaming.bytes_stream();
    let mut text = String::from_utf8(body.next().await.expect("first chunk")?.to_vec())?;
    let (_, before) = chat(&base_url, "parrot", "Hi", 2).await?;
    let (s, unload_body) =
        post_json(&format!("{base_url}/v1/unload_lora_adapter"), json!({"lora_name": "parrot"})).await?;
    assert_eq!(s, 200, "{unload_body}");
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(60), body.next()).await? {
        text.push_str(&String::from_utf8(chunk?.to_vec())?);
    }
    assert!(text.contains("\"completion_tokens\":40"), "the in-flight request finished: {text}");
    assert!(text.trim_end().ends_with("data: [DONE]"));
    let (s, gone) = chat(&base_url, "parrot", "Hi", 4).await?;
    assert_eq!(s, 404, "{gone}");
    assert_eq!(gone["error"]["code"], "model_not_found");
    let (s, _) = post_json(&format!("{base_url}/v1/unload_lora_adapter"), json!({"lora_name": "parrot"})).await?;
    assert_eq!(s, 404);
    // Loaded again, it is a new adapter: a new system_fingerprint.
    assert_eq!(load("parrot", &parrot).await?.0, 200);
    let (_, after) = chat(&base_url, "parrot", "Hi", 2).await?;
    assert!(before["system_fingerprint"].as_str().is_some_and(|f| f.starts_with("fp_")));
    assert_ne!(before["system_fingerprint"], after["system_fingerprint"]);
    Ok(())
}

#[tokio::test]
async fn runtime_loading_is_off_by_default() -> TestResult {
    let (s, body) = post_json(
        &format!("http://{}/v1/load_lora_adapter", server()),
        json!({"lora_name": "x", "lora_path": project_adapter("pirate").display().to_string()}),
    )
    .await?;
    assert_eq!(s, 404, "{body}");
    Ok(())
}

#[tokio::test]
async fn broken_startup_adapter_stops_the_server_with_its_name() -> TestResult {
    use clap::Parser;
    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: tailor::config::ServeArgs,
    }
    let dir = tempfile::tempdir()?;
    copy_dir(&project_adapter("pirate"), &dir.path().join("bad"))?;
    std::fs::write(
        dir.path().join("bad/adapter_config.json"),
        r#"{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "bias": "all"}"#,
    )?;
    let model = crate::common::model_path().display().to_string();
    let lora = format!("bad={}", dir.path().join("bad").display());
    let config =
        Wrapper::parse_from(["tailor", "--port", "0", "--model", &model, "--lora", &lora]).args.into_config()?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let result =
        tokio::time::timeout(Duration::from_secs(60), tailor::run(config, listener, std::future::pending())).await?;
    let error = result.expect_err("the server must not start").to_string();
    assert!(error.contains("bad") && error.contains("trained base biases"), "{error}");
    Ok(())
}
