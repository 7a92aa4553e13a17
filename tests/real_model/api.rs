//! The OpenAI-compatible API over real HTTP, against the real model.

use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value};

use crate::common::{server, start_server, TestResult, MODEL_ID};

fn url(path: &str) -> String {
    format!("http://{}{path}", server())
}

async fn post(path: &str, body: Value) -> Result<(u16, Value), Box<dyn std::error::Error>> {
    post_to(&url(path), body).await
}

async fn post_to(full_url: &str, body: Value) -> Result<(u16, Value), Box<dyn std::error::Error>> {
    let resp = reqwest::Client::new().post(full_url).json(&body).send().await?;
    let status = resp.status().as_u16();
    let text = resp.text().await?;
    let value = serde_json::from_str(&text).map_err(|e| format!("not JSON ({e}): {text}"))?;
    Ok((status, value))
}

/// The `data:` payloads of an SSE response, in order.
async fn stream(path: &str, body: Value) -> Result<Vec<String>, Box<dyn std::error::Error>> {
    let resp = reqwest::Client::new().post(url(path)).json(&body).send().await?;
    assert_eq!(resp.status(), 200);
    assert!(resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream")));
    let text = resp.text().await?;
    Ok(text
        .lines()
        .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
        .map(|l| l.trim().to_string())
        .collect())
}

/// Parses chunks, checks the framing every stream shares, returns the JSON chunks.
fn chunks(events: &[String]) -> Vec<Value> {
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "stream ends with [DONE]: {events:?}");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap_or_else(|err| panic!("chunk is not JSON ({err}): {e}")))
        .collect();
    let id = &chunks[0]["id"];
    let created = &chunks[0]["created"];
    let fingerprint = &chunks[0]["system_fingerprint"];
    assert!(fingerprint.as_str().is_some_and(|f| f.starts_with("fp_")), "{fingerprint}");
    for c in &chunks {
        assert_eq!(&c["system_fingerprint"], fingerprint, "same fingerprint on every chunk");
        assert_eq!(&c["id"], id, "same id on every chunk");
        assert_eq!(&c["created"], created, "same created on every chunk");
        assert_eq!(c["model"], MODEL_ID);
    }
    chunks
}

fn assert_error(status: u16, body: &Value, want_status: u16, param: Option<&str>) {
    assert_eq!(status, want_status, "{body}");
    let error = &body["error"];
    assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    assert!(error["type"].is_string(), "{body}");
    assert!(error.get("param").is_some() && error.get("code").is_some(), "{body}");
    if let Some(param) = param {
        assert_eq!(error["param"], param, "{body}");
    }
}

fn greedy(extra: Value) -> Value {
    let mut body = json!({"model": MODEL_ID, "temperature": 0});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    body
}

#[tokio::test]
async fn completion_stream_equals_non_stream_with_exact_usage() -> TestResult {
    let body = greedy(json!({"prompt": "The capital of France is", "max_tokens": 12}));
    let (status, full) = post("/v1/completions", body.clone()).await?;
    assert_eq!(status, 200, "{full}");
    assert_eq!(full["object"], "text_completion");
    assert_eq!(full["model"], MODEL_ID);
    assert_eq!(full["choices"][0]["finish_reason"], "length");
    let text = full["choices"][0]["text"].as_str().expect("text").to_string();
    assert!(text.starts_with(" Paris"), "{text}");
    let (_, tokenized) = post("/tokenize", json!({"model": MODEL_ID, "prompt": "The capital of France is"})).await?;
    assert_eq!(full["usage"]["prompt_tokens"], tokenized["count"]);
    assert_eq!(full["usage"]["completion_tokens"], 12);
    assert_eq!(full["usage"]["total_tokens"], tokenized["count"].as_u64().expect("count") + 12);

    let mut streamed = body;
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let chunks = chunks(&stream("/v1/completions", streamed).await?);
    let usage_chunk = chunks.last().expect("usage chunk");
    assert_eq!(usage_chunk["choices"], json!([]));
    // The same counts (the repeat may find its prompt in the prefix cache).
    for key in ["prompt_tokens", "completion_tokens", "total_tokens"] {
        assert_eq!(usage_chunk["usage"][key], full["usage"][key], "{key}");
    }
    assert!(usage_chunk["usage"]["prompt_tokens_details"]["cached_tokens"].is_u64());
    let joined: String = chunks.iter().filter_map(|c| c["choices"][0]["text"].as_str()).collect();
    assert_eq!(joined, text, "stream text equals non-stream text");
    let finish: Vec<&Value> =
        chunks.iter().map(|c| &c["choices"][0]["finish_reason"]).filter(|f| !f.is_null()).collect();
    assert_eq!(finish, [&json!("length")]);
    Ok(())
}

#[tokio::test]
async fn chat_stream_equals_non_stream_and_starts_with_role() -> TestResult {
    let body = greedy(
        json!({"messages": [{"role": "user", "content": "Write one sentence about the ocean."}], "max_tokens": 20}),
    );
    let (status, full) = post("/v1/chat/completions", body.clone()).await?;
    assert_eq!(status, 200, "{full}");
    assert_eq!(full["object"], "chat.completion");
    assert_eq!(full["choices"][0]["message"]["role"], "assistant");
    let content = full["choices"][0]["message"]["content"].as_str().expect("content").to_string();
    assert!(!content.is_empty());

    let mut streamed = body;
    streamed["stream"] = json!(true);
    let events = stream("/v1/chat/completions", streamed).await?;
    let chunks = chunks(&events);
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let joined: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(joined, content);
    let last = chunks.last().expect("final chunk");
    assert_eq!(last["choices"][0]["finish_reason"], full["choices"][0]["finish_reason"]);
    assert!(chunks.iter().all(|c| c.get("usage").is_none()), "no usage without include_usage");
    Ok(())
}

#[tokio::test]
async fn chat_reply_matches_reference_and_stops_on_eos() -> TestResult {
    // Greedy reply of the reference (float32); quantized keeps it on this prompt.
    let body = greedy(
        json!({"messages": [{"role": "user", "content": "Write one sentence about the ocean."}], "max_tokens": 48}),
    );
    let (_, full) = post("/v1/chat/completions", body).await?;
    assert_eq!(full["choices"][0]["finish_reason"], "stop");
    let content = full["choices"][0]["message"]["content"].as_str().expect("content");
    assert!(content.starts_with("The ocean is a vast"), "{content}");
    assert!(!content.contains("<|im_end|>"));
    Ok(())
}

#[tokio::test]
async fn max_completion_tokens_wins_over_max_tokens() -> TestResult {
    let body = greedy(json!({
        "messages": [{"role": "user", "content": "Count from one to twenty in words."}],
        "max_tokens": 30, "max_completion_tokens": 3, "ignore_eos": true
    }));
    let (status, full) = post("/v1/chat/completions", body).await?;
    assert_eq!(status, 200, "{full}");
    assert_eq!(full["usage"]["completion_tokens"], 3);
    assert_eq!(full["choices"][0]["finish_reason"], "length");
    Ok(())
}

#[tokio::test]
async fn prompt_shapes_are_equivalent() -> TestResult {
    let text = "The capital of France is";
    let (_, tokenized) = post("/tokenize", json!({"prompt": text})).await?;
    let ids = tokenized["tokens"].clone();
    let run = |prompt: Value| post("/v1/completions", greedy(json!({"prompt": prompt, "max_tokens": 5})));
    let (_, from_text) = run(json!(text)).await?;
    let (_, from_ids) = run(ids.clone()).await?;
    assert_eq!(from_text["choices"][0]["text"], from_ids["choices"][0]["text"]);
    let (_, two_texts) = run(json!([text, "Water is made of"])).await?;
    let choices = two_texts["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 2);
    assert_eq!(choices[0]["index"], 0);
    assert_eq!(choices[1]["index"], 1);
    assert_eq!(choices[0]["text"], from_text["choices"][0]["text"]);
    assert_eq!(two_texts["usage"]["completion_tokens"], 10);
    let (_, two_lists) = run(json!([ids, ids])).await?;
    assert_eq!(two_lists["choices"][1]["text"], from_text["choices"][0]["text"]);
    Ok(())
}

#[tokio::test]
async fn stop_strings_cut_exactly_across_token_boundaries() -> TestResult {
    let base = greedy(json!({"prompt": "The capital of France is", "max_tokens": 16}));
    let (_, full) = post("/v1/completions", base.clone()).await?;
    let full_text = full["choices"][0]["text"].as_str().expect("text").to_string();
    // " Paris" is one token and "." the next: "is." spans the boundary; the
    // third stop is cut from the middle of whatever the model generated.
    let middle: String = full_text.chars().skip(full_text.chars().count() / 2).take(6).collect();
    for stop in ["is.", "\n\nThe", middle.as_str()] {
        let at = full_text.find(stop).unwrap_or_else(|| panic!("{stop:?} not in {full_text:?}"));
        let mut body = base.clone();
        body["stop"] = json!([stop, "never-generated-stop"]);
        let (_, cut) = post("/v1/completions", body.clone()).await?;
        assert_eq!(cut["choices"][0]["text"], full_text[..at], "stop {stop:?}");
        assert_eq!(cut["choices"][0]["finish_reason"], "stop");
        body["stream"] = json!(true);
        let chunks = chunks(&stream("/v1/completions", body).await?);
        let joined: String = chunks.iter().filter_map(|c| c["choices"][0]["text"].as_str()).collect();
        assert_eq!(joined, full_text[..at], "streamed stop {stop:?}");
    }
    Ok(())
}

#[tokio::test]
async fn same_seed_same_sample() -> TestResult {
    let body = |seed: u64| json!({"model": MODEL_ID, "prompt": "Once upon a time", "max_tokens": 16, "temperature": 1.0, "seed": seed});
    let mut texts = Vec::new();
    for seed in [7, 7, 8, 9] {
        let (status, resp) = post("/v1/completions", body(seed)).await?;
        assert_eq!(status, 200);
        texts.push(resp["choices"][0]["text"].as_str().expect("text").to_string());
    }
    assert_eq!(texts[0], texts[1], "same seed, same text");
    assert!(texts[2] != texts[0] || texts[3] != texts[0], "other seeds sample differently: {texts:?}");
    Ok(())
}

#[tokio::test]
async fn bad_requests_get_openai_errors() -> TestResult {
    let client = reqwest::Client::new();
    let resp = client
        .post(url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body("{\"model\": ")
        .send()
        .await?;
    let status = resp.status().as_u16();
    assert_error(status, &resp.json().await?, 400, None);

    let chat = |extra: Value| {
        let mut body = json!({"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}]});
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            b.extend(e.clone());
        }
        body
    };
    let (s, b) = post("/v1/chat/completions", chat(json!({"model": "gpt-17"}))).await?;
    assert_error(s, &b, 404, Some("model"));
    assert_eq!(b["error"]["code"], "model_not_found");
    let cases = [
        (json!({"temperature": 3}), "temperature"),
        (json!({"top_p": 1.5}), "top_p"),
        (json!({"max_tokens": 0}), "max_tokens"),
        (json!({"max_tokens": 9000}), "max_tokens"),
        (json!({"max_completion_tokens": -1}), "max_completion_tokens"),
        (json!({"n": 0}), "n"),
        (json!({"n": 17}), "n"),
        (json!({"logit_bias": {"50000": 5}}), "logit_bias"),
        (json!({"logit_bias": {"12": 101}}), "logit_bias"),
        (json!({"logit_bias": {"twelve": 1}}), "logit_bias"),
        (json!({"min_p": 1.5}), "min_p"),
        (json!({"repetition_penalty": 0}), "repetition_penalty"),
        (json!({"logprobs": true, "top_logprobs": 21}), "top_logprobs"),
        (json!({"top_logprobs": 2}), "top_logprobs"),
        (
            json!({"tool_choice": {"type": "function", "function": {"name": "g"}}, "tools": [{"type": "function", "function": {"name": "f"}}]}),
            "tool_choice",
        ),
        (json!({"tool_choice": "required"}), "tool_choice"),
        (json!({"tools": "not a list"}), "tools"),
        (json!({"response_format": {"type": "json_thing"}}), "response_format"),
        (json!({"temperature": "hot"}), "temperature"),
        (json!({"messages": []}), "messages"),
        (json!({"messages": [{"content": "no role"}]}), "messages[0].role"),
    ];
    for (extra, param) in cases {
        let (s, b) = post("/v1/chat/completions", chat(extra.clone())).await?;
        assert_error(s, &b, 400, Some(param));
    }
    // Unknown extra fields are ignored.
    let (s, b) = post("/v1/chat/completions", chat(json!({"max_tokens": 2, "some_future_field": {"x": 1}}))).await?;
    assert_eq!(s, 200, "{b}");

    let completion = |extra: Value| {
        let mut body = json!({"model": MODEL_ID, "prompt": "hi"});
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            b.extend(e.clone());
        }
        body
    };
    for (extra, param) in [
        (json!({"prompt": ""}), "prompt"),
        (json!({"prompt": []}), "prompt"),
        (json!({"prompt": [999999]}), "prompt"),
        (json!({"prompt": [-1]}), "prompt"),
        (json!({"logprobs": 6}), "logprobs"),
        (json!({"best_of": 3}), "best_of"),
        (json!({"stop": vec!["a"; 17]}), "stop"),
        (json!({"stream_options": {"include_usage": true}}), "stream_options"),
    ] {
        let (s, b) = post("/v1/completions", completion(extra.clone())).await?;
        assert_error(s, &b, 400, Some(param));
    }
    let (s, b) = post("/v1/completions", json!({"prompt": "no model"})).await?;
    assert_error(s, &b, 400, None);

    let resp = client.get(url("/v1/nothing-here")).send().await?;
    let status = resp.status().as_u16();
    assert_error(status, &resp.json().await?, 404, None);
    let resp = client.get(url("/v1/completions")).send().await?;
    let status = resp.status().as_u16();
    assert_error(status, &resp.json().await?, 405, None);
    Ok(())
}

#[tokio::test]
async fn models_health_tokenize_detokenize() -> TestResult {
    let client = reqwest::Client::new();
    let health = client.get(url("/health")).send().await?;
    assert_eq!(health.status(), 200);
    let models: Value = client.get(url("/v1/models")).send().await?.json().await?;
    assert_eq!(models["object"], "list");
    let card = &models["data"][0];
    assert_eq!(card["id"], MODEL_ID);
    assert_eq!(card["object"], "model");
    assert_eq!(card["owned_by"], "tailor");
    assert!(card["created"].is_u64());
    let one = client.get(url(&format!("/v1/models/{MODEL_ID}"))).send().await?;
    assert_eq!(one.status(), 200);

    let (s, t) = post("/tokenize", json!({"model": MODEL_ID, "prompt": "Hello world"})).await?;
    assert_eq!(s, 200);
    assert_eq!(t["tokens"], json!([19556, 905]));
    assert_eq!(t["count"], 2);
    assert_eq!(t["max_model_len"], 8192);
    let (_, chat) = post(
        "/tokenize",
        json!({"model": MODEL_ID, "messages": [{"role": "user", "content": "Hello!"}], "add_generation_prompt": true}),
    )
    .await?;
    let reference = crate::common::read_json("reference/chat_template.json");
    assert_eq!(chat["tokens"], reference["cases"][0]["ids"]);
    let (s, d) = post("/detokenize", json!({"model": MODEL_ID, "tokens": [19556, 905]})).await?;
    assert_eq!(s, 200);
    assert_eq!(d["prompt"], "Hello world");
    let (s, b) = post("/detokenize", json!({"model": MODEL_ID, "tokens": [4000000]})).await?;
    assert_error(s, &b, 400, Some("tokens"));
    Ok(())
}

/// The README's first request, on the default configuration: a small model
/// is served in float32, where it knows the answer (quantized, it does not).
#[tokio::test]
async fn the_readme_first_request_gets_the_right_answer() -> TestResult {
    let body = json!({"model": MODEL_ID, "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 32, "temperature": 0});
    let addr = start_server(&["--dtype", "auto"]);
    let (status, reply) = post_to(&format!("http://{addr}/v1/chat/completions"), body.clone()).await?;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["choices"][0]["message"]["content"], "The capital of France is Paris.", "{reply}");
    // The quantized path, one flag away, is the one that misses it.
    let (_, quantized) = post("/v1/chat/completions", body).await?;
    assert_ne!(quantized["choices"][0]["message"]["content"], reply["choices"][0]["message"]["content"]);
    Ok(())
}

#[tokio::test]
async fn the_context_is_capped_by_max_model_len_and_the_kv_budget() -> TestResult {
    let client = reqwest::Client::new();
    let ids = |n: usize| json!((0..n).map(|i| 1000 + i as u32).collect::<Vec<_>>());
    for (args, cap) in [(vec!["--max-model-len", "64"], 64), (vec!["--max-kv-tokens", "256"], 256)] {
        let addr = start_server(&args);
        let models: Value = client.get(format!("http://{addr}/v1/models")).send().await?.json().await?;
        assert_eq!(models["data"][0]["max_model_len"], cap, "{args:?}");
        let completions = format!("http://{addr}/v1/completions");
        let (status, body) =
            post_to(&completions, json!({"model": MODEL_ID, "prompt": ids(cap + 6), "max_tokens": 1})).await?;
        assert_error(status, &body, 400, None);
        assert!(body.to_string().contains(&format!("{cap} tokens")), "{body}");
        let (status, body) =
            post_to(&completions, json!({"model": MODEL_ID, "prompt": ids(cap - 24), "max_tokens": 30})).await?;
        assert_error(status, &body, 400, Some("max_tokens"));
        let (status, body) = post_to(
            &completions,
            json!({"model": MODEL_ID, "prompt": ids(cap - 4), "max_tokens": 4, "temperature": 0, "ignore_eos": true}),
        )
        .await?;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["usage"]["completion_tokens"], 4, "the context filled exactly: {body}");
    }
    Ok(())
}

#[tokio::test]
async fn full_queue_is_refused_at_once_and_disconnect_cancels() -> TestResult {
    let addr = start_server(&["--max-num-seqs", "1", "--max-waiting", "1"]);
    let endpoint = format!("http://{addr}/v1/completions");
    let long = json!({"model": MODEL_ID, "prompt": "Tell me a story.", "max_tokens": 4000, "ignore_eos": true, "stream": true});
    let client = reqwest::Client::new();
    // A occupies the only batch slot; wait until it is producing tokens.
    let a = client.post(&endpoint).json(&long).send().await?;
    let mut a_body = a.bytes_stream();
    a_body.next().await.expect("A streams")?;
    // B fills the one waiting place...
    let b = tokio::spawn({
        let client = client.clone();
        let endpoint = endpoint.clone();
        let body = json!({"model": MODEL_ID, "prompt": "Hi", "max_tokens": 2});
        async move { client.post(&endpoint).json(&body).send().await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // ...so C is refused at once with 429 and the OpenAI envelope.
    let c = client.post(&endpoint).json(&json!({"model": MODEL_ID, "prompt": "Hi", "max_tokens": 2})).send().await?;
    assert_eq!(c.status(), 429);
    assert!(c.headers().contains_key("retry-after"));
    let body: Value = c.json().await?;
    assert_error(429, &body, 429, None);
    // Dropping A (client gone) frees the slot: A is cancelled, not run to
    // its 4000 tokens, and B runs.
    drop(a_body);
    let b = tokio::time::timeout(Duration::from_secs(120), b).await???;
    assert_eq!(b.status(), 200);
    let metrics = crate::common::scrape(addr).await?;
    let model = [("model_name", MODEL_ID)];
    let finished = crate::common::value(&metrics, "vllm:request_success_total", &model);
    assert_eq!(finished, 1.0, "only B finished; A was cancelled");
    let generated = crate::common::value(&metrics, "vllm:generation_tokens_total", &model);
    assert!(generated < 1000.0, "A ran on after its client left: {generated} tokens");
    Ok(())
}

#[test]
fn incremental_detokenizer_never_splits_characters() -> TestResult {
    use tailor::engine::detokenizer::IncrementalDecoder;
    use tailor::loader::{load, LoadOptions};
    let loaded = load(&crate::common::model_path(), &LoadOptions::default())?;
    let tokenizer = &loaded.info.tokenizer;
    for text in ["你好，世界！今天天气很好。", "emoji 🌍🚀 and 👩‍👩‍👧 family", "café naïve — ½ “quotes”"]
    {
        let ids = tokenizer.encode(text)?;
        let mut decoder = IncrementalDecoder::new(true);
        let mut out = String::new();
        for &id in &ids {
            let piece = decoder.push(tokenizer, id);
            assert!(!piece.contains('\u{FFFD}'), "half a character emitted for {text:?}: {piece:?}");
            out.push_str(&piece);
        }
        out.push_str(&decoder.finish(tokenizer));
        assert_eq!(out, text);
    }
    Ok(())
}

#[tokio::test]
async fn logit_bias_min_p_and_n_shape_the_sample() -> TestResult {
    let prompt = "The capital of France is";
    let first = |reply: &Value| reply["choices"][0]["text"].as_str().unwrap_or_default().to_string();
    let (s, plain) = post("/v1/completions", greedy(json!({"prompt": prompt, "max_tokens": 1}))).await?;
    assert_eq!(s, 200, "{plain}");
    let top = first(&plain);
    let (_, ids) = post("/tokenize", json!({"prompt": top, "add_special_tokens": false})).await?;
    let top_id = ids["tokens"][0].as_u64().ok_or("an id")?;
    // -100 bans the greedy token; +100 forces another one.
    let (s, banned) = post(
        "/v1/completions",
        greedy(json!({"prompt": prompt, "max_tokens": 1, "logit_bias": {top_id.to_string(): -100}})),
    )
    .await?;
    assert_eq!(s, 200, "{banned}");
    assert_ne!(first(&banned), top);
    let (_, banana) = post("/tokenize", json!({"prompt": " banana", "add_special_tokens": false})).await?;
    let banana_id = banana["tokens"][0].as_u64().ok_or("an id")?;
    let (_, forced) = post(
        "/v1/completions",
        json!({"model": MODEL_ID, "prompt": prompt, "max_tokens": 1, "seed": 3, "logit_bias": {banana_id.to_string(): 100}}),
    )
    .await?;
    assert_eq!(first(&forced), " banana", "{forced}");
    // system_fingerprint: stable for the base, another for an adapter.
    let (_, pirate) = post("/v1/completions", json!({"model": "pirate", "prompt": prompt, "max_tokens": 1})).await?;
    assert_eq!(plain["system_fingerprint"], banned["system_fingerprint"]);
    assert!(plain["system_fingerprint"].as_str().is_some_and(|f| f.starts_with("fp_")));
    assert_ne!(plain["system_fingerprint"], pirate["system_fingerprint"]);
    // min_p = 1 keeps only the most likely token: any temperature is greedy.
    let (_, greedy_text) = post("/v1/completions", greedy(json!({"prompt": prompt, "max_tokens": 12}))).await?;
    for seed in 0..3 {
        let (_, sampled) = post(
            "/v1/completions",
            json!({"model": MODEL_ID, "prompt": prompt, "max_tokens": 12, "temperature": 1.5, "min_p": 1.0, "seed": seed}),
        )
        .await?;
        assert_eq!(first(&sampled), first(&greedy_text));
    }
    // n choices: indices 0..n, the prompt counted once, every choice's tokens counted.
    let body = json!({"model": MODEL_ID, "messages": [{"role": "user", "content": "Name a color."}], "n": 3,
        "max_tokens": 8, "temperature": 1.0, "seed": 11, "ignore_eos": true});
    let (s, reply) = post("/v1/chat/completions", body.clone()).await?;
    assert_eq!(s, 200, "{reply}");
    let choices = reply["choices"].as_array().ok_or("choices")?;
    let indices: Vec<u64> = choices.iter().filter_map(|c| c["index"].as_u64()).collect();
    assert_eq!(indices, [0, 1, 2]);
    let (_, one) = post(
        "/v1/chat/completions",
        json!({"model": MODEL_ID, "messages": body["messages"], "max_tokens": 8, "ignore_eos": true}),
    )
    .await?;
    assert_eq!(reply["usage"]["prompt_tokens"], one["usage"]["prompt_tokens"]);
    assert_eq!(reply["usage"]["completion_tokens"], 24);
    let texts: std::collections::HashSet<&str> =
        choices.iter().filter_map(|c| c["message"]["content"].as_str()).collect();
    assert!(texts.len() > 1, "three seeded samples were all equal: {texts:?}");
    // Streamed: every index starts (with the role) and finishes.
    let mut streamed = body;
    streamed["stream"] = json!(true);
    let events = stream("/v1/chat/completions", streamed).await?;
    let parsed = chunks(&events);
    for index in 0..3 {
        let of = |c: &&Value| c["choices"][0]["index"] == index;
        assert_eq!(parsed.iter().filter(of).filter(|c| c["choices"][0]["delta"]["role"] == "assistant").count(), 1);
        assert_eq!(parsed.iter().filter(of).filter(|c| c["choices"][0]["finish_reason"] == "length").count(), 1);
    }
    Ok(())
}

#[tokio::test]
async fn logprobs_describe_each_generated_token() -> TestResult {
    let messages = json!([{"role": "user", "content": "Describe the sea in one sentence."}]);
    let body = greedy(
        json!({"messages": messages, "max_tokens": 12, "ignore_eos": true, "logprobs": true, "top_logprobs": 3}),
    );
    let (s, reply) = post("/v1/chat/completions", body.clone()).await?;
    assert_eq!(s, 200, "{reply}");
    let content = reply["choices"][0]["message"]["content"].as_str().ok_or("content")?;
    let entries = reply["choices"][0]["logprobs"]["content"].as_array().ok_or("logprobs.content")?;
    assert_eq!(entries.len(), 12);
    let mut joined = String::new();
    for e in entries {
        let top = e["top_logprobs"].as_array().ok_or("top_logprobs")?;
        assert_eq!(top.len(), 3);
        // Greedy: the chosen token is the most likely one.
        assert_eq!(e["token"], top[0]["token"]);
        assert_eq!(e["logprob"], top[0]["logprob"]);
        let lp = e["logprob"].as_f64().ok_or("logprob")?;
        assert!(lp <= 0.0 && top[1]["logprob"].as_f64().is_some_and(|l| l <= lp));
        assert_eq!(e["bytes"].as_array().map(|b| b.len()), e["token"].as_str().map(str::len));
        joined.push_str(e["token"].as_str().ok_or("token")?);
    }
    assert_eq!(joined, content);
    // Streamed: the same entries, spread over the chunks.
    let mut streamed = body;
    streamed["stream"] = json!(true);
    let events = stream("/v1/chat/completions", streamed).await?;
    let streamed_entries: Vec<Value> = chunks(&events)
        .iter()
        .filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array().cloned())
        .flatten()
        .collect();
    assert_eq!(&streamed_entries, entries);

    let (s, reply) = post(
        "/v1/completions",
        greedy(json!({"prompt": "The sea is", "max_tokens": 6, "ignore_eos": true, "logprobs": 2})),
    )
    .await?;
    assert_eq!(s, 200, "{reply}");
    let text = reply["choices"][0]["text"].as_str().ok_or("text")?;
    let lp = &reply["choices"][0]["logprobs"];
    let tokens: Vec<&str> = lp["tokens"].as_array().ok_or("tokens")?.iter().filter_map(Value::as_str).collect();
    assert_eq!(tokens.len(), 6);
    assert_eq!(tokens.concat(), text);
    assert_eq!(lp["token_logprobs"].as_array().map(Vec::len), Some(6));
    let offsets: Vec<u64> =
        lp["text_offset"].as_array().ok_or("text_offset")?.iter().filter_map(Value::as_u64).collect();
    let expected: Vec<u64> = tokens
        .iter()
        .scan(0u64, |o, t| {
            let here = *o;
            *o += t.len() as u64;
            Some(here)
        })
        .collect();
    assert_eq!(offsets, expected);
    for top in lp["top_logprobs"].as_array().ok_or("top_logprobs")? {
        let n = top.as_object().map(|m| m.len()).unwrap_or(0);
        assert!((1..=2).contains(&n), "{top}");
    }
    Ok(())
}

#[tokio::test]
async fn echo_repeats_the_prompt_with_its_log_probabilities() -> TestResult {
    let plain = greedy(json!({"prompt": "The sea is", "max_tokens": 5, "ignore_eos": true, "logprobs": 2}));
    let (_, reply) = post("/v1/completions", plain.clone()).await?;
    let generated = reply["choices"][0]["text"].as_str().ok_or("text")?.to_string();
    let generated_lp = reply["choices"][0]["logprobs"].clone();

    // Without logprobs: the prompt, then the same continuation.
    let mut echo = plain.clone();
    echo["echo"] = json!(true);
    echo.as_object_mut().ok_or("body")?.remove("logprobs");
    let (s, reply) = post("/v1/completions", echo).await?;
    assert_eq!(s, 200, "{reply}");
    assert_eq!(reply["choices"][0]["text"], format!("The sea is{generated}"));

    // With logprobs: the prompt's tokens first, the first without a value.
    let mut echo = plain;
    echo["echo"] = json!(true);
    let (s, reply) = post("/v1/completions", echo.clone()).await?;
    assert_eq!(s, 200, "{reply}");
    let (_, ids) = post("/tokenize", json!({"model": MODEL_ID, "prompt": "The sea is"})).await?;
    let prompt_len = ids["count"].as_u64().ok_or("count")? as usize;
    let lp = &reply["choices"][0]["logprobs"];
    let tokens: Vec<&str> = lp["tokens"].as_array().ok_or("tokens")?.iter().filter_map(Value::as_str).collect();
    assert_eq!(tokens.len(), prompt_len + 5, "{lp}");
    assert_eq!(tokens.concat(), reply["choices"][0]["text"].as_str().unwrap_or_default());
    let values = lp["token_logprobs"].as_array().ok_or("token_logprobs")?;
    assert!(values[0].is_null() && lp["top_logprobs"][0].is_null(), "{lp}");
    assert!(values[1..].iter().all(|v| v.as_f64().is_some_and(|v| v <= 0.0)), "{lp}");
    assert_eq!(lp["text_offset"][0], 0);
    // The generated part is what the same request without echo reports.
    for key in ["tokens", "token_logprobs", "top_logprobs"] {
        assert_eq!(
            lp[key].as_array().map(|a| a[prompt_len..].to_vec()),
            generated_lp[key].as_array().cloned(),
            "{key}"
        );
    }

    // A prompt token's log-probability is the model's: append the greedy
    // next token to the prompt and it is scored as the generation saw it.
    let first = &generated_lp["top_logprobs"][0];
    let (top_token, top_value) = first.as_object().and_then(|m| m.iter().next()).ok_or("a top entry")?;
    let (_, longer) = post("/tokenize", json!({"model": MODEL_ID, "prompt": format!("The sea is{top_token}")})).await?;
    assert_eq!(longer["count"].as_u64(), Some(prompt_len as u64 + 1), "the prompt and its greedy next token: {longer}");
    let (_, scored) = post(
        "/v1/completions",
        greedy(json!({"prompt": longer["tokens"], "max_tokens": 1, "echo": true, "logprobs": 1})),
    )
    .await?;
    let value = scored["choices"][0]["logprobs"]["token_logprobs"][prompt_len].as_f64().ok_or("value")?;
    let expected = top_value.as_f64().ok_or("top value")?;
    assert!((value - expected).abs() < 1e-3, "scored {value}, generated {expected}");

    // Streamed: the echoed chunk first, then the rest; the same in sum.
    echo["stream"] = json!(true);
    let events = stream("/v1/completions", echo).await?;
    let chunks = chunks(&events);
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["text"].as_str()).collect();
    assert_eq!(text, reply["choices"][0]["text"].as_str().unwrap_or_default());
    assert!(chunks[0]["choices"][0]["text"].as_str().is_some_and(|t| t.starts_with("The sea is")), "{events:?}");
    let streamed: Vec<Value> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["logprobs"]["token_logprobs"].as_array().cloned())
        .flatten()
        .collect();
    assert_eq!(&streamed, values);
    Ok(())
}
