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
