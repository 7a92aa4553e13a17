//! PEFT formats beyond plain LoRA: DoRA (`use_dora`) and lora_B biases
//! (`lora_bias`), against PEFT's own outputs for adapters PEFT wrote
//! (`tests/fixtures/smollm2/peft`, made by `scripts/make-peft-fixtures.py`;
//! their compositions are in `merges`); then over HTTP,
//! batched with everything else, and refused where PEFT refuses them.

use std::path::PathBuf;
use std::sync::Arc;

use serde_json::{json, Value};
use tailor::lora::{adapter, BaseShapes};
use tailor::model::lora::AdapterWeights;
use tailor::model::WeightMode;

use crate::common::{copy_dir, fixture, post_at, start_server, TestResult, MODEL_ID};
use crate::compose::{batched_equals_alone, chat_body, outcome};
use crate::reference::{check_f32_parity, loaded};

fn peft_adapter(name: &str) -> PathBuf {
    fixture(&format!("peft/adapters/{name}"))
}

fn load(mode: WeightMode, dir: &std::path::Path) -> Result<Arc<AdapterWeights>, tailor::lora::LoraError> {
    Ok(Arc::new(adapter::load(dir, &BaseShapes::of_model(&loaded(mode).model), 64)?))
}

#[test]
fn dora_and_lora_bias_adapters_match_peft() -> TestResult {
    for name in ["dora", "bias"] {
        let weights = load(WeightMode::F32, &peft_adapter(name))?;
        assert_eq!(weights.is_dora(), name == "dora");
        check_f32_parity(loaded(WeightMode::F32), &format!("peft/{name}.json"), Some(&weights))?;
    }
    Ok(())
}

#[test]
fn dora_at_another_weight_matches_peft_set_scale() -> TestResult {
    let model = loaded(WeightMode::F32);
    let dora = load(WeightMode::F32, &peft_adapter("dora"))?;
    let shapes = BaseShapes::of_model(&model.model);
    for (file, weight) in [("dora_weight_half", 0.5), ("dora_weight_negative", -0.5)] {
        let weighted = Arc::new(tailor::lora::dora::at_weight(&dora, weight, &shapes)?);
        check_f32_parity(model, &format!("peft/{file}.json"), Some(&weighted))?;
    }
    Ok(())
}

#[test]
fn dora_over_the_quantized_base_stays_within_quantization_noise_of_peft() -> TestResult {
    // The norms come from the Q4_1 weights as served; PEFT's from the same
    // weights dequantized. What moves is the activations' 8-bit
    // quantization (up to ~1.5 in a logit, `../reference` calibrates it),
    // which this random DoRA adapter's flatter logits feel more than the
    // base does, so confident top-1s are compared, not every greedy step;
    // a wrong norm moves logits by far more (scale 4 for 1 moved them by 12).
    let model = loaded(WeightMode::Quantized);
    let weights = load(WeightMode::Quantized, &peft_adapter("dora"))?;
    let reference = crate::common::read_json("peft/dora.json");
    for prompt in reference["prompts"].as_array().expect("prompts") {
        let logits = crate::reference::all_logits(model, &crate::common::ids(&prompt["prompt_ids"]), Some(&weights));
        let last = logits.last().expect("a position");
        let top = prompt["last"]["top"].as_array().expect("top");
        let logit = |t: &Value| t["logit"].as_f64().expect("logit") as f32;
        let id = |t: &Value| t["id"].as_u64().expect("id") as usize;
        let drift = top.iter().map(|t| (last[id(t)] - logit(t)).abs()).fold(0f32, f32::max);
        println!("quantized DoRA {}: max |Δ| top-20 logits = {drift:.3}", prompt["name"]);
        assert!(drift < 2.0, "{}: top-20 logits moved by {drift}", prompt["name"]);
        if logit(&top[0]) - logit(&top[1]) > 0.5 {
            let got = tailor::engine::sampling::argmax(last) as usize;
            assert_eq!(got, id(&top[0]), "{}: top-1 at the last prompt position", prompt["name"]);
        }
    }
    Ok(())
}

#[test]
fn tensors_the_config_does_not_declare_and_missing_ones_are_named() -> TestResult {
    let pirate = crate::common::project_adapter("pirate");
    let cases = [
        (
            peft_adapter("dora"),
            "use_dora",
            false,
            "DoRA magnitude (`use_dora`), which adapter_config.json does not declare",
        ),
        (
            peft_adapter("bias"),
            "lora_bias",
            false,
            "lora_B bias (`lora_bias`), which adapter_config.json does not declare",
        ),
        (peft_adapter("dora"), "lora_bias", true, "`lora_bias` with DoRA"),
        // Declared but absent: plain LoRA weights under either flag.
        (pirate.clone(), "lora_bias", true, "lora_B.bias is missing"),
        (pirate, "use_dora", true, "lora_magnitude_vector is missing"),
    ];
    for (from, key, value, want) in cases {
        let dir = tempfile::tempdir()?;
        copy_dir(&from, dir.path())?;
        refused_with(dir.path(), key, json!(value), want)?;
    }
    Ok(())
}

/// Sets `key` of the adapter config in `dir` to `value` and checks that the
/// adapter is then refused with an error containing `want`.
pub fn refused_with(dir: &std::path::Path, key: &str, value: Value, want: &str) -> TestResult {
    let path = dir.join("adapter_config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    config[key] = value;
    std::fs::write(&path, config.to_string())?;
    let err = load(WeightMode::F32, dir).expect_err(want).to_string();
    assert!(err.contains(want), "{err}");
    Ok(())
}

/// Twelve chat requests mixing two adapters' own rows (`first`, `second`,
/// given the request's index), a composition, pirate and the base.
pub fn mixed_jobs(first: &dyn Fn(usize, &str) -> Value, second: &str, mix: Value) -> Vec<Value> {
    (0..12)
        .map(|i| {
            let question = format!("Name a colour of the sea ({i}).");
            match i % 4 {
                0 => first(i, &question),
                1 => chat_body(second, None, &question),
                2 => chat_body(MODEL_ID, Some(mix.clone()), &question),
                _ => chat_body(if i % 8 == 3 { "pirate" } else { MODEL_ID }, None, &question),
            }
        })
        .collect()
}

#[tokio::test]
async fn dora_and_bias_adapters_serve_in_mixed_batches_and_dora_is_served_alone_at_any_weight() -> TestResult {
    let (dora, bias) = (peft_adapter("dora"), peft_adapter("bias"));
    let adapters = format!("dora={},bias={}", dora.display(), bias.display());
    let addr = start_server(&["--max-num-seqs", "12", "--lora", &adapters]);
    let mix = json!([{"name": "bias", "weight": 0.6}, {"name": "pirate", "weight": 0.8}]);
    let dora_rows = |i: usize, question: &str| match i % 8 {
        0 => chat_body("dora", None, question),
        _ => chat_body(MODEL_ID, Some(json!([{"name": "dora", "weight": 0.5}])), question),
    };
    let jobs = mixed_jobs(&dora_rows, "bias", mix);
    batched_equals_alone(addr, &jobs).await?;
    // DoRA alone at weight 1 is the adapter; at another weight, its norms
    // are recomputed (once, then shared); 0 is the base.
    let ask = |adapters: Value| post_at(addr, "/v1/chat/completions", chat_body(MODEL_ID, Some(adapters), "Hi?"));
    let (_, at_one) = ask(json!([{"name": "dora"}])).await?;
    let (_, named) = post_at(addr, "/v1/chat/completions", chat_body("dora", None, "Hi?")).await?;
    assert_eq!(outcome(&at_one), outcome(&named));
    let (_, base) = post_at(addr, "/v1/chat/completions", chat_body(MODEL_ID, None, "Hi?")).await?;
    assert_ne!(outcome(&named), outcome(&base), "DoRA changes what the base says");
    let (_, at_zero) = ask(json!([{"name": "dora", "weight": 0.0}])).await?;
    assert_eq!(outcome(&at_zero), outcome(&base), "weight 0 leaves the adapter out");
    let (status, half) = ask(json!([{"name": "dora", "weight": 0.5}])).await?;
    assert_eq!(status, 200, "{half}");
    let (_, again) = ask(json!([{"name": "dora", "weight": 0.5}])).await?;
    assert_eq!(outcome(&half), outcome(&again));
    // With others, or merged, it is refused by name.
    for (adapters, merge, param) in [
        (json!([{"name": "pirate"}, {"name": "dora"}]), None, "adapters[1].name"),
        (json!([{"name": "dora"}]), Some(json!({"combination_type": "linear"})), "adapter_merge.combination_type"),
    ] {
        let mut body = chat_body(MODEL_ID, Some(adapters), "Hi?");
        if let Some(merge) = merge {
            body["adapter_merge"] = merge;
        }
        let (status, reply) = post_at(addr, "/v1/chat/completions", body).await?;
        assert_eq!(status, 400, "{reply}");
        assert_eq!(reply["error"]["param"], param, "{reply}");
        assert!(reply["error"]["message"].as_str().is_some_and(|m| m.contains("DoRA")), "{reply}");
    }
    Ok(())
}
