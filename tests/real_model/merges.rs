//! PEFT's `add_weighted_adapter` strategies that build one adapter from
//! several (`linear`, `ties`, `magnitude_prune`, `dare_*`), against PEFT's
//! own outputs (`tests/fixtures/smollm2/peft`, `scripts/make-peft-fixtures.py`)
//! and over HTTP, in tailor's shape and LoRAX's.

use std::sync::Arc;

use serde_json::json;
use tailor::lora::merge::{self, Combination, SignMethod};
use tailor::lora::{adapter, BaseShapes, MergeOptions};
use tailor::model::lora::{AdapterWeights, Part};
use tailor::model::WeightMode;

use crate::common::{fixture, post_at, start_server, TestResult, MODEL_ID};
use crate::compose::{chat_body, outcome};
use crate::reference::{check_f32_parity, loaded};

fn options(combination_type: Combination, density: Option<f64>, method: Option<SignMethod>) -> MergeOptions {
    MergeOptions { combination_type, density, majority_sign_method: method, seed: None, svd_rank: None }
}

#[test]
fn deterministic_strategies_match_add_weighted_adapter() -> TestResult {
    let model = loaded(WeightMode::F32);
    let shapes = BaseShapes::of_model(&model.model);
    let load = |dir: &std::path::Path| adapter::load(dir, &shapes, 64).map(Arc::new);
    let bias = load(&fixture("peft/adapters/bias"))?;
    let pirate = load(&crate::common::project_adapter("pirate"))?;
    let cases = [
        ("bias_pirate_cat", 0.8, options(Combination::Cat, None, None)),
        ("bias_pirate_linear", 0.8, options(Combination::Linear, None, None)),
        // PEFT 0.22 puts the sign of a negative weight × scale on A.
        ("bias_pirate_linear_negative", -0.8, options(Combination::Linear, None, None)),
        ("bias_pirate_ties", 0.8, options(Combination::Ties, Some(0.5), None)),
        ("bias_pirate_ties_frequency", 0.7, options(Combination::Ties, Some(0.5), Some(SignMethod::Frequency))),
        ("bias_pirate_magnitude_prune", 0.8, options(Combination::MagnitudePrune, Some(0.5), None)),
        ("bias_pirate_svd", 0.8, options(Combination::Svd, None, None)),
        ("bias_pirate_svd_rank4", 0.8, MergeOptions { svd_rank: Some(4), ..options(Combination::Svd, None, None) }),
    ];
    for (file, pirate_weight, merge) in cases {
        let parts =
            vec![Part { adapter: bias.clone(), factor: 0.6 }, Part { adapter: pirate.clone(), factor: pirate_weight }];
        let weights: Arc<AdapterWeights> = match merge.combination_type {
            Combination::Cat => Arc::new(AdapterWeights::composed(parts).expect("no module saved twice")),
            _ => Arc::new(merge::merge(&parts, &shapes, &merge)?),
        };
        check_f32_parity(model, &format!("peft/{file}.json"), Some(&weights))?;
    }
    Ok(())
}

#[tokio::test]
async fn every_strategy_serves_over_http_and_dare_repeats_with_its_seed() -> TestResult {
    let bias = fixture("peft/adapters/bias");
    let addr = start_server(&["--lora", &format!("bias={}", bias.display())]);
    let adapters = json!([{"name": "bias", "weight": 0.6}, {"name": "pirate", "weight": 0.8}]);
    let ask = |merge: serde_json::Value| {
        let mut body = chat_body(MODEL_ID, Some(adapters.clone()), "Where do ships sail?");
        body["adapter_merge"] = merge;
        post_at(addr, "/v1/chat/completions", body)
    };
    let mut seen = Vec::new();
    for merge in [
        json!({"combination_type": "linear"}),
        json!({"combination_type": "ties", "density": 0.5}),
        json!({"combination_type": "magnitude_prune", "density": 0.5}),
        json!({"combination_type": "dare_linear", "density": 0.5, "seed": 1}),
        json!({"combination_type": "dare_ties", "density": 0.5, "seed": 1, "majority_sign_method": "frequency"}),
    ] {
        let (status, reply) = ask(merge.clone()).await?;
        assert_eq!(status, 200, "{merge}: {reply}");
        seen.push(outcome(&reply));
    }
    let (_, again) = ask(json!({"combination_type": "dare_linear", "density": 0.5, "seed": 1})).await?;
    assert_eq!(outcome(&again), seen[3], "the same seed drops the same entries");
    let (_, other) = ask(json!({"combination_type": "dare_linear", "density": 0.5, "seed": 2})).await?;
    assert_ne!(outcome(&other), seen[3], "another seed drops others");
    // DARE keeping everything is linear.
    let (_, full) = ask(json!({"combination_type": "dare_linear", "density": 1.0, "seed": 5})).await?;
    assert_eq!(outcome(&full), seen[0]);
    // svd takes any ranks: pirate (8) with shout (16), truncated to 16.
    let mut body = chat_body(MODEL_ID, Some(json!([{"name": "pirate"}, {"name": "shout", "weight": 0.5}])), "Hi");
    body["adapter_merge"] = json!({"combination_type": "svd"});
    let (status, reply) = post_at(addr, "/v1/chat/completions", body).await?;
    assert_eq!(status, 200, "{reply}");
    // One adapter alone is merged linear, whatever is asked (as PEFT does).
    let alone = |merge: serde_json::Value| {
        let mut body = chat_body(MODEL_ID, Some(json!([{"name": "pirate", "weight": 0.8}])), "Where do ships sail?");
        body["adapter_merge"] = merge;
        post_at(addr, "/v1/chat/completions", body)
    };
    let (_, linear) = alone(json!({"combination_type": "linear"})).await?;
    let (_, ties) = alone(json!({"combination_type": "ties", "density": 0.3})).await?;
    assert_eq!(outcome(&ties), outcome(&linear));
    // LoRAX's merged_adapters names the same strategies.
    let mut lorax = chat_body(MODEL_ID, None, "Where do ships sail?");
    lorax["merged_adapters"] =
        json!({"ids": ["bias", "pirate"], "weights": [0.6, 0.8], "merge_strategy": "ties", "density": 0.5});
    let (status, from_lorax) = post_at(addr, "/v1/chat/completions", lorax).await?;
    assert_eq!(status, 200, "{from_lorax}");
    assert_eq!(outcome(&from_lorax), seen[1]);
    Ok(())
}
