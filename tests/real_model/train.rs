//! Training's forward is inference's: the loss `tailor::train` minimises on
//! a batch equals the cross-entropy of the served model's own logits with
//! the same adapter (saved as PEFT and loaded back as the server loads it).

use candle_core::{DType, Tensor};
use tailor::lora::{adapter, BaseShapes};
use tailor::model::gguf::GgufSource;
use tailor::model::WeightMode;
use tailor::train::{peft, Batch, Lora, TrainModel};

use crate::common::{model_path, TestResult};
use crate::reference::{all_logits, loaded};

#[test]
fn training_loss_equals_the_inference_cross_entropy() -> TestResult {
    let base = loaded(WeightMode::F32);
    let tokenizer = &base.info.tokenizer;
    let texts = ["The capital of France is Paris, a city on the Seine.", "Arr matey! Ships sail the seven seas."];
    let ids: Vec<Vec<u32>> = texts.iter().map(|t| tokenizer.encode(t)).collect::<Result<_, _>>()?;
    let weights: Vec<Vec<f32>> =
        ids.iter().map(|e| (0..e.len()).map(|i| if i >= 2 { 1.0 } else { 0.0 }).collect()).collect();
    let batch = Batch { ids: ids.clone(), weights: weights.clone() };

    let model = TrainModel::load(&mut GgufSource::open(&model_path(), WeightMode::F32)?, DType::F32)?;
    let targets: Vec<String> = ["q_proj", "v_proj", "down_proj"].iter().map(|s| s.to_string()).collect();
    let lora = Lora::new(&model, 8, 16.0, false, &targets, 5)?;
    // A trained-looking B, so the adapter changes the logits.
    for (i, (_, b)) in lora.weights.values().enumerate() {
        let shape = b.as_tensor().shape().clone();
        let values: Vec<f32> = (0..shape.elem_count()).map(|j| (((i * 17 + j * 5) % 11) as f32 - 5.0) * 2e-3).collect();
        b.set(&Tensor::from_vec(values, shape, &candle_core::Device::Cpu)?)?;
    }
    let (loss, total) = model.loss(&batch, Some(&lora))?;
    let trained = loss.to_scalar::<f32>()? as f64;

    let dir = tempfile::tempdir()?;
    peft::save(&lora, "SmolLM2-135M-Instruct", dir.path())?;
    let served = std::sync::Arc::new(adapter::load(dir.path(), &BaseShapes::of(base.model.config()), 64)?);
    let mut sum = 0f64;
    for (example, w) in ids.iter().zip(&weights) {
        let logits = all_logits(base, example, Some(&served));
        for pos in 0..example.len() - 1 {
            let row = &logits[pos];
            let top = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let log_z = row.iter().map(|&v| (v as f64 - top).exp()).sum::<f64>().ln() + top;
            sum += w[pos] as f64 * (log_z - row[example[pos + 1] as usize] as f64);
        }
    }
    let served_loss = sum / total;
    let without = model.loss(&batch, None)?.0.to_scalar::<f32>()? as f64;
    assert!((trained - without).abs() > 1e-3, "the adapter must matter: {trained} vs base {without}");
    let relative = (trained - served_loss).abs() / served_loss;
    assert!(relative < 1e-5, "training loss {trained} vs served cross-entropy {served_loss} ({relative:e})");
    println!("training loss {trained:.6}, served {served_loss:.6}, relative {relative:.1e}");
    Ok(())
}

/// The pirate recipe of the shipped adapter (PEFT reached 10/10 with it):
/// trained by `tailor train`, then served by a running tailor, the adapter
/// answers at least 9 of the 10 held-apart prompts in its style.
#[tokio::test]
async fn the_pirate_recipe_trains_an_adapter_the_server_serves() -> TestResult {
    use clap::Parser;
    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: tailor::train::run::TrainArgs,
    }
    let fixtures = crate::common::fixture("train");
    let out = tempfile::tempdir()?;
    let argv = [
        "train",
        "--model",
        &model_path().display().to_string(),
        "--data",
        &fixtures.join("pirate.jsonl").display().to_string(),
        "--out",
        &out.path().display().to_string(),
        "--rank",
        "8",
        "--alpha",
        "16",
        "--target-modules",
        "q_proj,v_proj",
        "--lr",
        "2e-3",
        "--batch-size",
        "8",
        "--steps",
        "40",
        "--warmup",
        "10",
        "--schedule",
        "cosine",
        "--schedule-steps",
        "160",
        "--min-lr-ratio",
        "0.1",
        "--max-seq-len",
        "96",
        "--eval-prompts",
        &fixtures.join("eval.json").display().to_string(),
    ]
    .map(String::from);
    let args = Wrapper::parse_from(argv).args;
    let summary = tokio::task::spawn_blocking(move || {
        tailor::train::run::train(&args, |_, _| tailor::train::run::AfterStep::Continue)
    })
    .await??;
    let (first, last) = (summary.steps[0].loss, summary.steps.last().map(|s| s.loss).unwrap_or(f64::NAN));
    assert!(last < first / 4.0, "the loss falls: {first} → {last}");
    for file in ["adapter_config.json", "adapter_model.safetensors", "training.jsonl", "loss.svg", "README.md"] {
        assert!(out.path().join(file).is_file(), "{file} is written");
    }
    let card = std::fs::read_to_string(out.path().join("README.md"))?;
    assert!(card.contains("sha256") && card.contains("final train loss"), "{card}");
    let offline = summary.replies.iter().filter(|(_, r)| r.starts_with("Arr matey!")).count();

    // Served by tailor (quantized, as it serves by default), named at start.
    let lora = format!("pirate-ft={}", out.path().display());
    let addr = crate::common::start_server(&["--lora", &lora]);
    let prompts: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixtures.join("eval.json"))?)?;
    let client = reqwest::Client::new();
    let mut served = Vec::new();
    for prompt in prompts["prompts"].as_array().ok_or("prompts")? {
        let body = serde_json::json!({"model": "pirate-ft", "messages": [{"role": "user", "content": prompt}], "max_tokens": 32, "temperature": 0});
        let reply: serde_json::Value =
            client.post(format!("http://{addr}/v1/chat/completions")).json(&body).send().await?.json().await?;
        served.push(reply["choices"][0]["message"]["content"].as_str().unwrap_or_default().to_string());
    }
    let passed = served.iter().filter(|r| r.starts_with("Arr matey!")).count();
    println!("loss {first:.3} → {last:.3}; eval {offline}/10 offline, {passed}/10 served: {served:?}");
    assert!(passed >= 9, "served replies: {served:?}");
    assert!(offline >= 9, "eval replies: {:?}", summary.replies);
    Ok(())
}

/// Ctrl-C's checkpoint: a run stopped after its first step still leaves a
/// loadable adapter, its log and a card that says where it stopped.
#[test]
fn a_run_stopped_at_a_checkpoint_saves_what_it_trained() -> TestResult {
    use clap::Parser;
    use tailor::train::run::AfterStep;
    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: tailor::train::run::TrainArgs,
    }
    let out = tempfile::tempdir()?;
    let data = crate::common::fixture("train").join("json.jsonl");
    let (model, data, out_dir) =
        (model_path().display().to_string(), data.display().to_string(), out.path().display().to_string());
    let argv = ["train", "--model", &model, "--data", &data, "--out", &out_dir, "--steps", "5", "--batch-size", "2"];
    let args = Wrapper::parse_from(argv).args;
    let summary = tailor::train::run::train(&args, |_, _| AfterStep::Checkpoint)?;
    assert_eq!((summary.steps.len(), summary.planned_steps), (1, 5));
    let card = std::fs::read_to_string(out.path().join("README.md"))?;
    assert!(card.contains("stopped at a checkpoint after 1 of 5 steps"), "{card}");
    let log = std::fs::read_to_string(out.path().join("training.jsonl"))?;
    assert_eq!(log.lines().count(), 1);
    let base = loaded(WeightMode::F32);
    adapter::load(out.path(), &BaseShapes::of(base.model.config()), 64)?;
    // Stopped (a cancelled job): nothing is saved.
    let gone = tempfile::tempdir()?;
    let mut args = args;
    args.out = gone.path().join("adapter");
    assert!(matches!(
        tailor::train::run::train(&args, |_, _| AfterStep::Stop),
        Err(tailor::train::run::TrainError::Cancelled)
    ));
    assert!(!args.out.join("adapter_model.safetensors").exists());
    Ok(())
}
