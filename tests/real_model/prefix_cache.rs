//! The prefix cache on the real model: a reused prefix gives the same
//! tokens and the same top-20 log-probabilities as a fresh prefill, for the
//! base and an adapter; adapters never share entries; a reloaded adapter
//! starts cold; usage and metrics report the hits.

use serde_json::{json, Value};

use crate::common::{post_at, scrape, start_server, value, TestResult, MODEL_ID};

const PREAMBLE: &str = "You are a careful assistant for a shipping company. Answer in one short sentence. \
    Be polite, be precise, never invent facts, and when you do not know something, say so plainly. \
    Examples of good answers: 'The parcel left Rotterdam on Monday.' 'I do not know the customs fee.'";

fn ask(model: &str, question: &str) -> Value {
    json!({"model": model, "max_tokens": 10, "temperature": 0, "logprobs": true, "top_logprobs": 20,
        "messages": [{"role": "system", "content": PREAMBLE}, {"role": "user", "content": question}]})
}

fn cached(reply: &Value) -> u64 {
    reply["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap_or(u64::MAX)
}

#[tokio::test]
async fn cached_prefixes_give_the_same_tokens_and_logits_per_adapter() -> TestResult {
    let cold = start_server(&["--prefix-cache-tokens", "0"]);
    let warm = start_server(&["--enable-lora-loading"]);
    let (mut queried, mut hits) = (0u64, 0u64);
    for model in [MODEL_ID, "pirate"] {
        for question in ["Where is my parcel?", "How much is the customs fee?"] {
            let (_, fresh) = post_at(cold, "/v1/chat/completions", ask(model, question)).await?;
            for round in 0..2 {
                let (s, reply) = post_at(warm, "/v1/chat/completions", ask(model, question)).await?;
                assert_eq!(s, 200, "{reply}");
                queried += reply["usage"]["prompt_tokens"].as_u64().ok_or("prompt_tokens")?;
                hits += cached(&reply);
                // Same tokens, same top-20 log-probabilities, bit for bit.
                assert_eq!(reply["choices"][0]["message"], fresh["choices"][0]["message"], "{model} round {round}");
                assert_eq!(reply["choices"][0]["logprobs"], fresh["choices"][0]["logprobs"], "{model} round {round}");
                if round == 1 {
                    // The whole conversation was cached by round 0.
                    assert_eq!(cached(&reply), reply["usage"]["prompt_tokens"].as_u64().ok_or("prompt")? - 1);
                }
            }
        }
        // The second question reused the first one's system preamble.
    }
    let families = scrape(warm).await?;
    assert_eq!(value(&families, "vllm:prefix_cache_queries_total", &[]), queried as f64);
    assert_eq!(value(&families, "vllm:prefix_cache_hits_total", &[]), hits as f64);

    // Two adapters, one prompt: never each other's entries.
    let nonce = "Is parcel 7731 insured?";
    let (_, pirate) = post_at(warm, "/v1/chat/completions", ask("pirate", nonce)).await?;
    let (_, shout) = post_at(warm, "/v1/chat/completions", ask("shout", nonce)).await?;
    assert!(cached(&pirate) > 0, "the preamble, cached by pirate's earlier requests: {pirate}");
    assert_eq!(cached(&shout), 0, "shout never ran this prompt: {shout}");
    // A reloaded adapter is new weights: its old entries are never served.
    let path = format!("{}/adapters/pirate", env!("CARGO_MANIFEST_DIR"));
    let client = reqwest::Client::new();
    for (route, body) in [
        ("unload_lora_adapter", json!({"lora_name": "pirate"})),
        ("load_lora_adapter", json!({"lora_name": "pirate", "lora_path": path})),
    ] {
        let response = client.post(format!("http://{warm}/v1/{route}")).json(&body).send().await?;
        assert_eq!(response.status().as_u16(), 200, "{route}: {}", response.text().await?);
    }
    let (_, reloaded) = post_at(warm, "/v1/chat/completions", ask("pirate", nonce)).await?;
    assert_eq!(cached(&reloaded), 0, "{reloaded}");
    assert_eq!(reloaded["choices"][0]["logprobs"], pirate["choices"][0]["logprobs"]);
    Ok(())
}

/// Requests running together share the preamble's blocks (with the prefix
/// cache off, only a running request can supply them); a prefix evicted from
/// a small cache is computed again; all give what a cold server gives.
#[tokio::test]
async fn shared_by_running_requests_and_after_eviction_the_outputs_stay_exact() -> TestResult {
    let cold = start_server(&["--prefix-cache-tokens", "0"]);
    let together = start_server(&["--prefix-cache-tokens", "0"]);
    let questions = ["Where is my parcel?", "Is the depot open on Sunday?", "Can I change the address?"];
    let mut fresh = Vec::new();
    for question in questions {
        fresh.push(post_at(cold, "/v1/chat/completions", ask(MODEL_ID, question)).await?.1);
    }
    let replies = futures::future::join_all(
        questions.iter().map(|question| post_at(together, "/v1/chat/completions", ask(MODEL_ID, question))),
    )
    .await;
    let mut shared = 0;
    for (reply, fresh) in replies.into_iter().zip(&fresh) {
        let (status, reply) = reply?;
        assert_eq!(status, 200, "{reply}");
        assert_eq!(reply["choices"][0]["logprobs"], fresh["choices"][0]["logprobs"]);
        shared += cached(&reply);
    }
    assert!(shared > 0, "no request started from another's preamble");

    // Three blocks of cache: another system prompt pushes the first one out.
    let small = start_server(&["--prefix-cache-tokens", "96"]);
    let first = post_at(small, "/v1/chat/completions", ask(MODEL_ID, questions[0])).await?.1;
    let again = post_at(small, "/v1/chat/completions", ask(MODEL_ID, questions[0])).await?.1;
    let prompt_tokens = again["usage"]["prompt_tokens"].as_u64().ok_or("prompt_tokens")?;
    assert_eq!(cached(&again), prompt_tokens - 1, "{again}");
    let mut other = ask(MODEL_ID, "Hello?");
    other["messages"][0]["content"] =
        json!("You write haiku about the sea, the wind and the gulls, and nothing else at all.");
    post_at(small, "/v1/chat/completions", other).await?;
    let evicted = post_at(small, "/v1/chat/completions", ask(MODEL_ID, questions[0])).await?.1;
    assert!(cached(&evicted) < prompt_tokens - 1, "nothing was evicted: {evicted}");
    for reply in [&first, &again, &evicted] {
        assert_eq!(reply["choices"][0]["logprobs"], fresh[0]["choices"][0]["logprobs"]);
    }
    Ok(())
}

/// A template edited and reloaded renders other tokens: only the part of the
/// old rendering they still start with comes from the cache, and the reply
/// is what a server that only ever saw the new template gives.
#[tokio::test]
async fn an_edited_template_reuses_only_the_tokens_it_still_renders() -> TestResult {
    let dir = tempfile::tempdir()?;
    let template = |word: &str| {
        format!(
            "{{#-\n[variables.text]\nrequired = true\n-#}}\n{PREAMBLE}\nThe shipping company is called {word} Freight and it ships parcels across the whole of Europe.\n\
             Question: {{{{ text }}}}\nAnswer:"
        )
    };
    let path = dir.path().join("probe.jinja");
    std::fs::write(&path, template("Northwind"))?;
    let templates = dir.path().to_str().ok_or("path")?;
    let warm = start_server(&["--templates-dir", templates]);
    let body = json!({"model": MODEL_ID, "template": "probe", "template_vars": {"text": "Where is my parcel?"},
        "max_tokens": 10, "temperature": 0, "logprobs": 5});
    let render =
        || post_at(warm, "/v1/templates/probe/render", json!({"template_vars": {"text": "Where is my parcel?"}}));
    let (status, before) = render().await?;
    assert_eq!(status, 200, "{before}");
    let (status, first) = post_at(warm, "/v1/completions", body.clone()).await?;
    assert_eq!(status, 200, "{first}");
    std::fs::write(&path, template("Southwind"))?;
    let (status, reloaded) = post_at(warm, "/v1/templates/reload", json!({})).await?;
    assert_eq!(status, 200, "{reloaded}");
    let after = render().await?.1;
    let ids =
        |v: &Value| -> Vec<u64> { v["tokens"].as_array().into_iter().flatten().filter_map(Value::as_u64).collect() };
    let (old, new) = (ids(&before), ids(&after));
    let common = old.iter().zip(&new).take_while(|(a, b)| a == b).count() as u64;
    assert!(common > 0 && common < new.len() as u64 - 1, "the edit should be inside the template");
    let (status, edited) = post_at(warm, "/v1/completions", body.clone()).await?;
    assert_eq!(status, 200, "{edited}");
    assert_eq!(cached(&edited), common);
    let cold = start_server(&["--templates-dir", templates, "--prefix-cache-tokens", "0"]);
    let (_, fresh) = post_at(cold, "/v1/completions", body).await?;
    assert_eq!(edited["choices"][0]["text"], fresh["choices"][0]["text"]);
    assert_eq!(edited["choices"][0]["logprobs"], fresh["choices"][0]["logprobs"]);
    Ok(())
}

#[tokio::test]
async fn salts_and_keys_partition_the_cache() -> TestResult {
    let salted = |salt: Option<&str>, question: &str| {
        let mut body = ask(MODEL_ID, question);
        if let Some(salt) = salt {
            body["cache_salt"] = json!(salt);
        }
        body
    };
    let addr = start_server(&[]);
    let (_, first) = post_at(addr, "/v1/chat/completions", salted(Some("tenant-a"), "Where is parcel 1?")).await?;
    assert_eq!(cached(&first), 0, "{first}");
    let (_, same) = post_at(addr, "/v1/chat/completions", salted(Some("tenant-a"), "Where is parcel 2?")).await?;
    assert!(cached(&same) > 0, "the same salt shares its preamble: {same}");
    let (_, other) = post_at(addr, "/v1/chat/completions", salted(Some("tenant-b"), "Where is parcel 3?")).await?;
    let (_, unsalted) = post_at(addr, "/v1/chat/completions", salted(None, "Where is parcel 4?")).await?;
    assert_eq!((cached(&other), cached(&unsalted)), (0, 0), "{other} {unsalted}");
    let (status, bad) = post_at(addr, "/v1/chat/completions", salted(Some(""), "Hi")).await?;
    assert_eq!((status, bad["error"]["param"].as_str()), (400, Some("cache_salt")), "{bad}");

    // Isolated by key: one tenant's prefixes are its own.
    let isolated = start_server(&["--api-key", "sk-alice,sk-bob", "--prefix-cache-isolation", "key"]);
    let client = reqwest::Client::new();
    let as_key = |key: &'static str, question: &'static str| {
        client
            .post(format!("http://{isolated}/v1/chat/completions"))
            .bearer_auth(key)
            .json(&ask(MODEL_ID, question))
            .send()
    };
    let _: Value = as_key("sk-alice", "Where is parcel 5?").await?.json().await?;
    let alice: Value = as_key("sk-alice", "Where is parcel 6?").await?.json().await?;
    let bob: Value = as_key("sk-bob", "Where is parcel 6?").await?.json().await?;
    assert!(cached(&alice) > 0, "alice reuses her own preamble: {alice}");
    assert_eq!(cached(&bob), 0, "bob sees nothing of alice's: {bob}");
    assert_eq!(bob["choices"][0]["message"], alice["choices"][0]["message"], "the same reply either way");
    Ok(())
}
