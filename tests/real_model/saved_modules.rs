//! PEFT's `modules_to_save`: adapters that replace the token embedding, the
//! output head and RMSNorms, against PEFT's outputs for adapters PEFT wrote
//! (`tests/fixtures/smollm2/peft`, `scripts/make-peft-fixtures.py`); alone,
//! composed and merged, then over HTTP in mixed batches.
//!
//! The replaced tables are the base's plus u·vᵀ: the repository keeps u and
//! v (`saved_recipe.safetensors`), and `whole_adapter` rebuilds the tables
//! from the base's embedding, as the fixture script did.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::gguf_file;
use candle_core::Device;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::{json, Value};
use tailor::lora::merge::{self, Combination};
use tailor::lora::{adapter, BaseShapes, MergeOptions};
use tailor::model::lora::{AdapterWeights, Part};
use tailor::model::WeightMode;

use crate::common::{copy_dir, fixture, model_path, post_at, start_server, TestResult, MODEL_ID};
use crate::compose::{batched_equals_alone, chat_body, outcome};
use crate::formats::{mixed_jobs, refused_with};
use crate::reference::{check_f32_parity, loaded};

/// The base's token embedding as float32, `[vocab · hidden]` (read once).
fn base_embedding() -> &'static [f32] {
    static TABLE: std::sync::OnceLock<Vec<f32>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let mut file = std::fs::File::open(model_path()).expect("model file");
        let content = gguf_file::Content::read(&mut file).expect("gguf");
        let table = content.tensor(&mut file, "token_embd.weight", &Device::Cpu).expect("token_embd.weight");
        let table = table.dequantize(&Device::Cpu).expect("dequantized");
        table.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("float32 table")
    })
}

fn f32s(view: &TensorView) -> Vec<f32> {
    assert_eq!(view.dtype(), Dtype::F32);
    view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

/// The fixture adapter `name` with its tables rebuilt, in `into`.
fn whole_adapter(name: &str, into: &Path) -> TestResult {
    let committed = fixture(&format!("peft/adapters/{name}"));
    copy_dir(&committed, into)?;
    let recipe_bytes = std::fs::read(committed.join("saved_recipe.safetensors"))?;
    let (_, metadata) = SafeTensors::read_metadata(&recipe_bytes)?;
    let recipe = SafeTensors::deserialize(&recipe_bytes)?;
    let weights_bytes = std::fs::read(committed.join("adapter_model.safetensors"))?;
    let weights = SafeTensors::deserialize(&weights_bytes)?;
    let base = base_embedding();
    let mut tables: Vec<(String, Vec<u8>, Vec<usize>)> = Vec::new();
    let names = metadata.metadata().as_ref().and_then(|m| m.get("tables").cloned()).expect("recipe names its tables");
    // `table=pair`: the u and v a table is made with.
    for entry in names.split(',') {
        let (table, key) = entry.split_once('=').expect("table=pair");
        let (u, v) = (f32s(&recipe.tensor(&format!("{key}.u"))?), f32s(&recipe.tensor(&format!("{key}.v"))?));
        assert_eq!(u.len() * v.len(), base.len(), "{table}: u·vᵀ is the table's shape");
        // As torch computes `weight + outer(u, v)`: one product, one sum.
        let values: Vec<u8> = base
            .chunks_exact(v.len())
            .zip(&u)
            .flat_map(|(row, &ui)| row.iter().zip(&v).map(move |(&w, &vj)| w + ui * vj))
            .flat_map(f32::to_le_bytes)
            .collect();
        tables.push((table.to_string(), values, vec![u.len(), v.len()]));
    }
    let mut all: HashMap<String, TensorView> = weights.tensors().into_iter().collect();
    for (table, values, shape) in &tables {
        all.insert(table.clone(), TensorView::new(Dtype::F32, shape.clone(), values)?);
    }
    safetensors::serialize_to_file(all, None, &into.join("adapter_model.safetensors"))?;
    Ok(())
}

fn load(mode: WeightMode, dir: &Path) -> Result<Arc<AdapterWeights>, tailor::lora::LoraError> {
    Ok(Arc::new(adapter::load(dir, &BaseShapes::of_model(&loaded(mode).model), 64)?))
}

#[test]
fn adapters_replacing_the_embedding_head_and_norms_match_peft_alone_composed_and_merged() -> TestResult {
    let model = loaded(WeightMode::F32);
    let dirs = tempfile::tempdir()?;
    let mut adapters = HashMap::new();
    for name in ["saved", "tied"] {
        let dir = dirs.path().join(name);
        whole_adapter(name, &dir)?;
        let weights = load(WeightMode::F32, &dir)?;
        check_f32_parity(model, &format!("peft/{name}.json"), Some(&weights))?;
        adapters.insert(name, weights);
    }
    let saved = &adapters["saved"];
    assert_eq!(
        saved.saved.names().len(),
        1 + 30 + 2,
        "embed_tokens, 30 input_layernorms, model.norm, lm_head: {:?}",
        saved.saved.names()
    );
    // `ensure_weight_tying`: the head is the saved embedding, one table.
    let tied = &adapters["tied"].saved;
    assert!(tied.lm_head.as_ref().zip(tied.embed_tokens.as_ref()).is_some_and(|(h, e)| Arc::ptr_eq(h, e)));
    // With pirate (which replaces nothing): each module from `saved`.
    let pirate = load(WeightMode::F32, &crate::common::project_adapter("pirate"))?;
    let parts = || vec![Part { adapter: saved.clone(), factor: 0.6 }, Part { adapter: pirate.clone(), factor: 0.8 }];
    let cat = Arc::new(AdapterWeights::composed(parts()).map_err(|m| format!("{m} twice"))?);
    check_f32_parity(model, "peft/saved_pirate_cat.json", Some(&cat))?;
    let shapes = BaseShapes::of_model(&model.model);
    let options = MergeOptions { combination_type: Combination::Linear, ..Default::default() };
    let linear = Arc::new(merge::merge(&parts(), &shapes, &options)?);
    assert_eq!(linear.bytes(), linear.layers.iter().flatten().flatten().map(|w| w.bytes() as u64).sum::<u64>());
    check_f32_parity(model, "peft/saved_pirate_linear.json", Some(&linear))?;
    Ok(())
}

#[test]
fn modules_to_save_that_are_undeclared_missing_or_not_replaceable_are_named() -> TestResult {
    // The committed folder lacks its tables (the recipe rebuilds them).
    let err = load(WeightMode::F32, &fixture("peft/adapters/saved")).expect_err("tables missing").to_string();
    assert!(err.contains("`model.embed_tokens` is in modules_to_save, but its weight is missing"), "{err}");
    let cases = [
        (
            json!(["embed_tokens", "lm_head", "input_layernorm"]),
            "`base_model.model.model.norm.weight` is a whole module",
        ),
        (
            json!(["embed_tokens", "lm_head", "input_layernorm", "norm", "post_attention_layernorm"]),
            "`model.layers.0.post_attention_layernorm` is in modules_to_save, but its weight is missing",
        ),
        (
            json!(["embed_tokens", "lm_head", "input_layernorm", "norm", "v_proj"]),
            "modules_to_save names `model.layers.0.self_attn.v_proj`",
        ),
    ];
    let dir = tempfile::tempdir()?;
    whole_adapter("saved", dir.path())?;
    for (modules, want) in cases {
        refused_with(dir.path(), "modules_to_save", modules, want)?;
    }
    Ok(())
}

#[tokio::test]
async fn saved_modules_serve_per_row_in_mixed_batches_and_two_adapters_cannot_replace_one_module() -> TestResult {
    let dirs = tempfile::tempdir()?;
    let (saved, tied) = (dirs.path().join("saved"), dirs.path().join("tied"));
    whole_adapter("saved", &saved)?;
    whole_adapter("tied", &tied)?;
    let adapters = format!("saved={},tied={}", saved.display(), tied.display());
    let addr = start_server(&["--max-num-seqs", "12", "--lora", &adapters]);
    let mix = json!([{"name": "saved", "weight": 0.6}, {"name": "pirate", "weight": 0.8}]);
    let jobs = mixed_jobs(&|_, question| chat_body("saved", None, question), "tied", mix);
    batched_equals_alone(addr, &jobs).await?;
    let ask =
        |model: &str, adapters: Option<Value>| post_at(addr, "/v1/chat/completions", chat_body(model, adapters, "Hi?"));
    let (_, base) = ask(MODEL_ID, None).await?;
    let (_, alone) = ask("saved", None).await?;
    assert_ne!(outcome(&alone), outcome(&base), "the replaced modules change what the base says");
    // Weight 0 leaves the adapter out, its whole modules too.
    let (_, at_zero) = ask(MODEL_ID, Some(json!([{"name": "saved", "weight": 0.0}]))).await?;
    assert_eq!(outcome(&at_zero), outcome(&base));
    let (status, reply) = ask(MODEL_ID, Some(json!([{"name": "saved"}, {"name": "tied", "weight": 0.5}]))).await?;
    assert_eq!(status, 400, "{reply}");
    assert_eq!(reply["error"]["param"], "adapters[1].name", "{reply}");
    let message = reply["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("`saved` and `tied` both replace `model.embed_tokens`"), "{reply}");
    Ok(())
}
