//! Several adapters in one request (`adapters`): the composition is PEFT's
//! `cat` combination served un-merged, weight 1 is the adapter itself and
//! weight 0 the base, batches mix compositions with everything else, and
//! bad lists are refused before any generation.

use std::sync::Arc;

use serde_json::{json, Value};
use tailor::model::lora::{AdapterWeights, LoraWeights, Part, Values};
use tailor::model::WeightMode;

use crate::common::{ids, post_at, read_json, start_server, TestResult, MODEL_ID};
use crate::reference::{all_logits, greedy, loaded};

fn weights(name: &str) -> Arc<AdapterWeights> {
    let shapes = tailor::lora::BaseShapes::of(loaded(WeightMode::F32).model.config());
    Arc::new(tailor::lora::adapter::load(&crate::common::project_adapter(name), &shapes, 64).expect("adapter loads"))
}

/// PEFT's `add_weighted_adapter(..., combination_type="cat")` written out:
/// one adapter of the summed rank whose `lora_A` stacks the parts' and whose
/// `lora_B` stacks each part's times its weight and scale, at scale 1.
fn peft_cat(parts: &[(&Arc<AdapterWeights>, f32)]) -> Arc<AdapterWeights> {
    let layers = parts[0].0.layers.len();
    let layers = (0..layers)
        .map(|layer| {
            std::array::from_fn(|module| {
                let targeted: Vec<(&LoraWeights, f32)> =
                    parts.iter().filter_map(|(w, f)| Some((w.layers[layer][module].as_ref()?, *f))).collect();
                let first = targeted.first()?;
                let (mut a, mut b_t) = (Vec::new(), Vec::new());
                for (w, factor) in &targeted {
                    a.extend(w.a.to_f32());
                    b_t.extend(w.b_t.to_f32().iter().map(|v| v * factor * w.scale));
                }
                Some(LoraWeights {
                    a: Values::F32(a),
                    b_t: Values::F32(b_t),
                    rank: targeted.iter().map(|(w, _)| w.rank).sum(),
                    in_features: first.0.in_features,
                    out_features: first.0.out_features,
                    scale: 1.0,
                    bias: None,
                    dora: None,
                })
            })
        })
        .collect();
    Arc::new(AdapterWeights { layers, ..Default::default() })
}

fn composed(parts: &[(&Arc<AdapterWeights>, f32)]) -> Arc<AdapterWeights> {
    Arc::new(
        AdapterWeights::composed(
            parts.iter().map(|(w, factor)| Part { adapter: (*w).clone(), factor: *factor }).collect(),
        )
        .expect("no module saved twice"),
    )
}

#[test]
fn a_composition_equals_peft_cat_and_its_edge_weights_equal_the_adapter_and_the_base() -> TestResult {
    let model = loaded(WeightMode::F32);
    let (pirate, shout) = (weights("pirate"), weights("shout"));
    let reference = read_json("reference/pirate.json");
    let stop = ids(&reference["stop_ids"]);
    let prompts = reference["prompts"].as_array().expect("prompts");
    // Every prompt at one set of weights (greedy on three), two prompts at another.
    for (w_pirate, w_shout, count, greedy_count) in [(0.7, 0.5, prompts.len(), 3), (1.0, -0.4, 2, 0)] {
        let parts = [(&pirate, w_pirate), (&shout, w_shout)];
        let (served, cat) = (composed(&parts), peft_cat(&parts));
        for (i, prompt) in prompts.iter().take(count).enumerate() {
            let tokens = ids(&prompt["prompt_ids"]);
            let max_diff = max_logit_diff(&tokens, &served, &cat);
            println!("cat {w_pirate}/{w_shout} {}: max |Δ| logits = {max_diff:.2e}", prompt["name"]);
            assert!(max_diff < 1e-3, "{}: the composition differs from PEFT's cat by {max_diff}", prompt["name"]);
            if i < greedy_count {
                assert_eq!(
                    greedy(model, &tokens, 12, &stop, Some(&served)),
                    greedy(model, &tokens, 12, &stop, Some(&cat)),
                    "{}: greedy continuation",
                    prompt["name"]
                );
            }
        }
    }
    let tokens = ids(&reference["prompts"][0]["prompt_ids"]);
    assert_eq!(
        all_logits(model, &tokens, Some(&composed(&[(&pirate, 1.0)]))),
        all_logits(model, &tokens, Some(&pirate))
    );
    assert_eq!(all_logits(model, &tokens, Some(&composed(&[(&pirate, 0.0)]))), all_logits(model, &tokens, None));
    Ok(())
}

/// A greedy chat request with log-probabilities, on `adapters` if given.
pub fn chat_body(model: &str, adapters: Option<Value>, question: &str) -> Value {
    let mut body = json!({"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 16,
        "temperature": 0, "logprobs": true, "top_logprobs": 2});
    if let Some(adapters) = adapters {
        body["adapters"] = adapters;
    }
    body
}

/// The reply's text and its tokens' log-probabilities (exact equality of both
/// means the same logits along the way).
pub fn outcome(reply: &Value) -> (Value, Value) {
    let choice = &reply["choices"][0];
    (choice["message"]["content"].clone(), choice["logprobs"]["content"].clone())
}

/// Sends each chat request alone, then all at once (so they share engine
/// steps), and checks each reply is the same both times.
pub async fn batched_equals_alone(addr: std::net::SocketAddr, jobs: &[Value]) -> TestResult {
    let mut alone = Vec::new();
    for body in jobs {
        let (status, reply) = post_at(addr, "/v1/chat/completions", body.clone()).await?;
        assert_eq!(status, 200, "{reply}");
        alone.push(outcome(&reply));
    }
    let together =
        futures::future::join_all(jobs.iter().map(|body| post_at(addr, "/v1/chat/completions", body.clone()))).await;
    for (i, reply) in together.into_iter().enumerate() {
        let (status, reply) = reply.map_err(|e| e.to_string())?;
        assert_eq!(status, 200, "{reply}");
        assert_eq!(outcome(&reply), alone[i], "request {i} differs when batched: {}", jobs[i]);
    }
    Ok(())
}

#[tokio::test]
async fn compositions_over_http_mix_with_single_adapters_and_the_base_in_one_batch() -> TestResult {
    let presets = tempfile::tempdir()?;
    std::fs::write(
        presets.path().join("mixes.toml"),
        "[pirate-shout]\nadapters = [{ name = \"pirate\", weight = 0.7 }, { name = \"shout\", weight = 0.5 }]\n\
         [broken-mix]\nadapters = [{ name = \"pirate\" }, { name = \"nowhere\" }]\n",
    )?;
    let addr = start_server(&["--max-num-seqs", "16", "--presets", &presets.path().display().to_string()]);
    let compositions = [
        None,
        Some(json!([{"name": "pirate", "weight": 0.7}, {"name": "shout", "weight": 0.5}])),
        Some(json!([{"name": "shout", "weight": 0.5}, {"name": "json", "weight": 0.3}, {"name": "pirate"}])),
        Some(json!([{"name": "pirate", "weight": 1.0}])),
        Some(json!([{"name": "pirate", "weight": 0}])),
        Some(json!([{"name": "json", "weight": -0.5}, {"name": "shout", "weight": 1.5}])),
    ];
    let models = [MODEL_ID, "pirate", "shout"];
    let jobs: Vec<Value> = (0..16)
        .map(|i| {
            let question = format!("Tell me about the sea, briefly ({i}).");
            match &compositions[i % compositions.len()] {
                None => chat_body(models[i % 3], None, &question),
                Some(list) => chat_body(MODEL_ID, Some(list.clone()), &question),
            }
        })
        .collect();
    batched_equals_alone(addr, &jobs).await?;
    // Weight 1 is the adapter named as the model; weight 0 the base.
    let question = "What is a ship?";
    let at = |model: &str, adapters: Option<Value>| {
        post_at(addr, "/v1/chat/completions", chat_body(model, adapters, question))
    };
    let (_, pirate) = at("pirate", None).await?;
    let (_, pirate_at_one) = at(MODEL_ID, Some(json!([{"name": "pirate", "weight": 1}]))).await?;
    assert_eq!(outcome(&pirate_at_one), outcome(&pirate));
    let (_, base) = at(MODEL_ID, None).await?;
    let (_, pirate_at_zero) = at(MODEL_ID, Some(json!([{"name": "pirate", "weight": 0}]))).await?;
    assert_eq!(outcome(&pirate_at_zero), outcome(&base));
    assert_ne!(outcome(&pirate), outcome(&base));
    // Responses and Messages carry the list on to the same generation.
    let composition = json!([{"name": "pirate", "weight": 0.7}, {"name": "shout", "weight": 0.5}]);
    let mut chat = chat_body(MODEL_ID, Some(composition.clone()), question);
    chat["logprobs"] = json!(false);
    chat.as_object_mut().map(|c| c.remove("top_logprobs"));
    let (_, chat) = post_at(addr, "/v1/chat/completions", chat).await?;
    let text = chat["choices"][0]["message"]["content"].as_str().expect("content").to_string();
    let (status, responses) = post_at(
        addr,
        "/v1/responses",
        json!({"model": MODEL_ID, "input": question, "max_output_tokens": 16, "temperature": 0, "adapters": composition}),
    )
    .await?;
    assert_eq!(status, 200, "{responses}");
    assert_eq!(responses["output"][0]["content"][0]["text"], text.as_str());
    let (status, messages) = post_at(
        addr,
        "/v1/messages",
        json!({"model": MODEL_ID, "messages": [{"role": "user", "content": question}], "max_tokens": 16,
            "temperature": 0, "adapters": composition}),
    )
    .await?;
    assert_eq!(status, 200, "{messages}");
    assert_eq!(messages["content"][0]["text"], text.as_str());
    // A preset that declares the composition gives it to a stock client.
    let (_, preset) = at("pirate-shout", None).await?;
    let (_, listed) = at(MODEL_ID, Some(composition)).await?;
    assert_eq!(outcome(&preset), outcome(&listed));
    let (status, broken) = at("broken-mix", None).await?;
    assert_eq!(status, 400, "{broken}");
    assert_eq!(broken["error"]["code"], "preset_unavailable");
    assert!(broken["error"]["message"].as_str().is_some_and(|m| m.contains("nowhere")), "{broken}");
    let models = reqwest::get(format!("http://{addr}/v1/models")).await?.json::<Value>().await?;
    let card = models["data"].as_array().into_iter().flatten().find(|m| m["id"] == "pirate-shout");
    assert_eq!(card.map(|c| c["root"].clone()), Some(json!("pirate+shout")), "{models}");
    Ok(())
}

#[tokio::test]
async fn bad_adapter_lists_are_refused_naming_the_field() -> TestResult {
    let addr = start_server(&["--max-adapters-per-request", "3"]);
    let cases = [
        (json!([{"name": "pirate"}, {"name": "nowhere"}]), "adapters[1].name", "nowhere"),
        (json!([{"name": "../pirate"}]), "adapters[0].name", "name"),
        (json!([{"name": "pirate", "weight": 1e39}]), "adapters[0].weight", "finite"),
        (json!([{"name": "pirate", "weight": "high"}]), "adapters", "weight"),
        (json!([{"name": "pirate", "scale": 2}]), "adapters", "scale"),
        (json!([]), "adapters", "between 1 and 3"),
        (
            json!([{"name": "pirate"}, {"name": "shout"}, {"name": "json"}, {"name": "pirate"}]),
            "adapters",
            "between 1 and 3",
        ),
        (json!([{"name": MODEL_ID}]), "adapters[0].name", "no adapter"),
    ];
    for (adapters, param, says) in cases {
        let (status, reply) =
            post_at(addr, "/v1/chat/completions", chat_body(MODEL_ID, Some(adapters.clone()), "Hi")).await?;
        assert_eq!(status, 400, "{adapters}: {reply}");
        let error = &reply["error"];
        assert!(error["param"].as_str().is_some_and(|p| p.starts_with(param)), "{adapters}: {reply}");
        assert!(error["message"].as_str().is_some_and(|m| m.contains(says)), "{adapters}: {reply}");
    }
    let linear = json!({"combination_type": "linear"});
    let merges = [
        (json!([{"name": "pirate"}, {"name": "shout"}]), linear.clone(), "one rank"),
        (json!([{"name": "pirate"}, {"name": "shout"}]), json!({"combination_type": "ties", "density": 0.5}), "ties"),
        (json!([{"name": "pirate"}]), json!({"combination_type": "ties", "density": 1.5}), "density"),
        (json!([{"name": "pirate"}]), json!({"combination_type": "dare_ties", "density": 0}), "density"),
        (json!([{"name": "pirate"}]), json!({"combination_type": "svd_ties"}), "svd_ties"),
        (json!([{"name": "pirate"}]), json!({"combination_type": "svd", "svd_rank": 0}), "svd_rank"),
        (json!([{"name": "pirate"}]), json!({"combination_type": "ties", "majority_sign_method": "most"}), "most"),
    ];
    for (adapters, merge, says) in merges {
        let mut body = chat_body(MODEL_ID, Some(adapters.clone()), "Hi");
        body["adapter_merge"] = merge;
        let (status, reply) = post_at(addr, "/v1/chat/completions", body).await?;
        assert_eq!(status, 400, "{adapters}: {reply}");
        assert!(reply["error"]["param"].as_str().is_some_and(|p| p.starts_with("adapter_merge")), "{reply}");
        assert!(reply["error"]["message"].as_str().is_some_and(|m| m.contains(says)), "{adapters}: {reply}");
    }
    let mut body = chat_body(MODEL_ID, None, "Hi");
    body["adapter_merge"] = linear.clone();
    let (status, reply) = post_at(addr, "/v1/chat/completions", body).await?;
    assert_eq!((status, reply["error"]["param"].clone()), (400, json!("adapter_merge")), "{reply}");
    // A linear merge serves, and is counted.
    let mut body = chat_body(MODEL_ID, Some(json!([{"name": "pirate", "weight": 0.6}])), "Hi");
    body["adapter_merge"] = linear;
    let (status, reply) = post_at(addr, "/v1/chat/completions", body).await?;
    assert_eq!(status, 200, "{reply}");
    let families = crate::common::scrape(addr).await?;
    assert!(crate::common::value(&families, "tailor_adapter_merges_total", &[]) >= 1.0);
    // LoRAX's shape says the same (its default strategy is linear).
    let mut lorax = chat_body(MODEL_ID, None, "Hi");
    lorax["merged_adapters"] = json!({"ids": ["pirate"], "weights": [0.6]});
    let (status, from_lorax) = post_at(addr, "/v1/chat/completions", lorax.clone()).await?;
    assert_eq!(status, 200, "{from_lorax}");
    assert_eq!(outcome(&from_lorax), outcome(&reply));
    for (merged, param) in [
        (json!({"ids": ["pirate"], "merge_strategy": "svd"}), "merged_adapters.merge_strategy"),
        (json!({"ids": ["pirate"], "merge_strategy": "ties", "density": 2}), "merged_adapters.density"),
        (
            json!({"ids": ["pirate"], "merge_strategy": "ties", "majority_sign_method": "x"}),
            "merged_adapters.majority_sign_method",
        ),
        (json!({"ids": ["pirate", "shout"], "weights": [1.0]}), "merged_adapters.weights"),
        (json!({"ids": ["pirate", "nowhere"]}), "merged_adapters.ids[1]"),
    ] {
        lorax["merged_adapters"] = merged;
        let (status, bad) = post_at(addr, "/v1/chat/completions", lorax.clone()).await?;
        assert_eq!((status, bad["error"]["param"].clone()), (400, json!(param)), "{bad}");
    }
    lorax["merged_adapters"] = json!({"ids": ["pirate"]});
    lorax["adapters"] = json!([{"name": "pirate"}]);
    let (status, bad) = post_at(addr, "/v1/chat/completions", lorax).await?;
    assert_eq!((status, bad["error"]["param"].clone()), (400, json!("merged_adapters")), "{bad}");
    // On an adapter id the list is ambiguous: refused, naming the way out.
    let (status, reply) =
        post_at(addr, "/v1/completions", json!({"model": "pirate", "prompt": "Hi", "adapters": [{"name": "shout"}]}))
            .await?;
    assert_eq!(status, 400, "{reply}");
    assert_eq!(reply["error"]["param"], "adapters");
    Ok(())
}

/// PEFT's `linear` written out: per module `A = Σ √(wᵢsᵢ)·Aᵢ`,
/// `B = Σ √(wᵢsᵢ)·Bᵢ`, at the merged config's `scale`.
fn peft_linear(parts: &[(&Arc<AdapterWeights>, f32)], scale: f32) -> Arc<AdapterWeights> {
    let layers = (0..parts[0].0.layers.len())
        .map(|layer| {
            std::array::from_fn(|module| {
                let targeted: Vec<(&LoraWeights, f32)> =
                    parts.iter().filter_map(|(w, f)| Some((w.layers[layer][module].as_ref()?, *f))).collect();
                let first = targeted.first()?.0;
                let (mut a, mut b_t) = (vec![0f32; first.a.len()], vec![0f32; first.b_t.len()]);
                for (w, factor) in &targeted {
                    let c = (factor * w.scale).sqrt();
                    a.iter_mut().zip(w.a.to_f32()).for_each(|(s, v)| *s += c * v);
                    b_t.iter_mut().zip(w.b_t.to_f32()).for_each(|(s, v)| *s += c * v);
                }
                Some(LoraWeights { a: Values::F32(a), b_t: Values::F32(b_t), scale, ..first.clone() })
            })
        })
        .collect();
    Arc::new(AdapterWeights { layers, ..Default::default() })
}

fn max_logit_diff(tokens: &[u32], a: &Arc<AdapterWeights>, b: &Arc<AdapterWeights>) -> f32 {
    let model = loaded(WeightMode::F32);
    let (a, b) = (all_logits(model, tokens, Some(a)), all_logits(model, tokens, Some(b)));
    a.iter().flatten().zip(b.iter().flatten()).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
}

#[test]
fn linear_merges_a_and_b_separately_as_peft_does() -> TestResult {
    use tailor::lora::merge;
    let shapes = tailor::lora::BaseShapes::of(loaded(WeightMode::F32).model.config());
    // A second rank-8 adapter on q and v, like pirate (linear needs one rank).
    let dir = tempfile::tempdir()?;
    let spec = tailor::lora::random::RandomAdapters {
        prefix: "other".into(),
        count: 1,
        ranks: (8, 8),
        modules: vec![tailor::lora::Module::Q, tailor::lora::Module::V],
        seed: 7,
    };
    let folder = tailor::lora::random::write(dir.path(), &shapes, &spec)?.remove(0);
    let other = Arc::new(tailor::lora::adapter::load(&folder, &shapes, 64)?);
    let pirate = weights("pirate");
    let part = |w: &Arc<AdapterWeights>, factor| Part { adapter: w.clone(), factor };
    let merged = Arc::new(merge::linear(&[part(&pirate, 0.7), part(&other, 0.5)], &shapes)?);
    assert_eq!(merged.layers[0][0].as_ref().map(|w| (w.rank, w.scale)), Some((8, 1.0)), "r = lora_alpha = 8");
    // It holds what it was made from (so the registry keeps them while it is used).
    assert!(Arc::ptr_eq(&merged.merged_from[0], &pirate) && Arc::ptr_eq(&merged.merged_from[1], &other));
    let reference = read_json("reference/pirate.json");
    let formula = peft_linear(&[(&pirate, 0.7), (&other, 0.5)], 1.0);
    // The cross terms make it another adapter than cat's weighted sum.
    let cat = composed(&[(&pirate, 0.7), (&other, 0.5)]);
    for prompt in reference["prompts"].as_array().expect("prompts").iter().take(3) {
        let tokens = ids(&prompt["prompt_ids"]);
        let diff = max_logit_diff(&tokens, &merged, &formula);
        assert!(diff < 1e-4, "{}: linear differs from PEFT's formula by {diff}", prompt["name"]);
        assert!(max_logit_diff(&tokens, &merged, &cat) > 1e-2, "{}: linear equals cat", prompt["name"]);
    }
    // json is rsLoRA at r = 4 (scale 8/√4 = 4): PEFT's merged config drops
    // rsLoRA and sets lora_alpha = r, so the merge's scale is 1 and json's
    // own is folded into A and B: linear at weight 1 is json itself.
    let json = weights("json");
    let alone = Arc::new(merge::linear(&[part(&json, 1.0)], &shapes)?);
    let tokens = ids(&reference["prompts"][0]["prompt_ids"]);
    let diff = max_logit_diff(&tokens, &alone, &json);
    assert!(diff < 1e-4, "json linear at 1 vs json: {diff}");
    // Refused: ranks that differ.
    let shout = weights("shout");
    let err = merge::linear(&[part(&pirate, 1.0), part(&shout, 1.0)], &shapes).expect_err("ranks 8 and 16");
    assert!(err.to_string().contains("one rank"), "{err}");
    Ok(())
}
