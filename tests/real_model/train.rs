//! Training's forward is inference's: the loss `tailor::train` minimises on
//! a batch equals the cross-entropy of the served model's own logits with
//! the same adapter (saved as PEFT and loaded back as the server loads it).

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

    let model = TrainModel::<f32>::load(&mut GgufSource::open(&model_path(), WeightMode::F32)?)?;
    let targets: Vec<String> = ["q_proj", "v_proj", "down_proj"].iter().map(|s| s.to_string()).collect();
    let mut lora = Lora::new(&model, 8, 16.0, false, &targets, 5)?;
    // A trained-looking B, so the adapter changes the logits.
    for (i, pair) in lora.weights.values_mut().enumerate() {
        for (j, b) in pair.b.iter_mut().enumerate() {
            *b = (((i * 17 + j * 5) % 11) as f32 - 5.0) * 2e-3;
        }
    }
    let (trained, total) = model.loss(&batch, Some(&lora))?;

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
    let without = model.loss(&batch, None)?.0;
    assert!((trained - without).abs() > 1e-3, "the adapter must matter: {trained} vs base {without}");
    let relative = (trained - served_loss).abs() / served_loss;
    assert!(relative < 1e-5, "training loss {trained} vs served cross-entropy {served_loss} ({relative:e})");
    println!("training loss {trained:.6}, served {served_loss:.6}, relative {relative:.1e}");
    Ok(())
}

fn train_args(argv: &[&str]) -> tailor::train::run::TrainArgs {
    use clap::Parser;
    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: tailor::train::run::TrainArgs,
    }
    Wrapper::parse_from(["train"].iter().chain(argv)).args
}

/// Trains `data` with the shipped adapters' schedule (40 steps of 8, 10
/// warm-up steps, cosine planned over 160 steps to 0.1×, max length 96) and
/// `lora` options, serves the adapter from a running tailor, and returns the
/// summary with the greedy replies to the 10 held-apart eval prompts (as
/// written in the model card, and as served).
async fn trained_and_served(
    data: &str,
    lora: &[&str],
    out: &std::path::Path,
) -> Result<(tailor::train::run::Summary, Vec<String>), Box<dyn std::error::Error>> {
    let fixtures = crate::common::fixture("train");
    let (model, data, out_dir, eval) = (
        model_path().display().to_string(),
        fixtures.join(data).display().to_string(),
        out.display().to_string(),
        fixtures.join("eval.json").display().to_string(),
    );
    let mut argv = vec!["--model", &model, "--data", &data, "--out", &out_dir, "--eval-prompts", &eval];
    argv.extend(["--lr", "2e-3", "--batch-size", "8", "--steps", "40", "--warmup", "10", "--schedule", "cosine"]);
    argv.extend(["--schedule-steps", "160", "--min-lr-ratio", "0.1", "--max-seq-len", "96"]);
    argv.extend(lora);
    let args = train_args(&argv);
    let summary = tokio::task::spawn_blocking(move || {
        tailor::train::run::train(&args, |_, _| tailor::train::run::AfterStep::Continue)
    })
    .await??;
    for file in ["adapter_config.json", "adapter_model.safetensors", "training.jsonl", "loss.svg", "README.md"] {
        assert!(out.join(file).is_file(), "{file} is written");
    }
    // Served by tailor (quantized, as it serves by default), named at start.
    let addr = crate::common::start_server(&["--lora", &format!("trained={out_dir}")]);
    let prompts: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(eval)?)?;
    let client = reqwest::Client::new();
    let mut served = Vec::new();
    for prompt in prompts["prompts"].as_array().ok_or("prompts")? {
        let body = serde_json::json!({"model": "trained", "messages": [{"role": "user", "content": prompt}], "max_tokens": 32, "temperature": 0});
        let reply: serde_json::Value =
            client.post(format!("http://{addr}/v1/chat/completions")).json(&body).send().await?.json().await?;
        served.push(reply["choices"][0]["message"]["content"].as_str().unwrap_or_default().to_string());
    }
    let (first, last) = (summary.steps[0].loss, summary.steps.last().map(|s| s.loss).unwrap_or(f64::NAN));
    println!("loss {first:.3} → {last:.3}; offline {:?}; served {served:?}", summary.replies);
    assert!(last < first / 4.0, "the loss falls: {first} → {last}");
    Ok((summary, served))
}

/// The pirate recipe of the shipped adapter (PEFT reached 10/10 with it):
/// the adapter answers at least 9 of the 10 held-apart prompts in its style,
/// offline and served; `--init-from` then continues it where it stopped.
#[tokio::test]
async fn the_pirate_recipe_trains_an_adapter_the_server_serves() -> TestResult {
    let out = tempfile::tempdir()?;
    let lora = ["--rank", "8", "--alpha", "16", "--target-modules", "q_proj,v_proj"];
    let (summary, served) = trained_and_served("pirate.jsonl", &lora, out.path()).await?;
    let card = std::fs::read_to_string(out.path().join("README.md"))?;
    assert!(card.contains("sha256") && card.contains("final train loss"), "{card}");
    let pirate = |r: &str| r.starts_with("Arr matey!");
    let offline: Vec<&str> = summary.replies.iter().map(|(_, r)| r.as_str()).collect();
    assert!(served.iter().filter(|r| pirate(r)).count() >= 9, "served replies: {served:?}");
    assert!(offline.iter().filter(|r| pirate(r)).count() >= 9, "eval replies: {offline:?}");

    // Continued: the first step starts from the trained adapter's loss, not
    // the base's, and the adapter keeps its shape.
    let more = tempfile::tempdir()?;
    let (model, data, from, to) = (
        model_path().display().to_string(),
        crate::common::fixture("train").join("pirate.jsonl").display().to_string(),
        out.path().display().to_string(),
        more.path().display().to_string(),
    );
    let args = train_args(&[
        "--model",
        &model,
        "--data",
        &data,
        "--out",
        &to,
        "--init-from",
        &from,
        "--steps",
        "2",
        "--lr",
        "1e-4",
        "--max-seq-len",
        "96",
    ]);
    let continued = tailor::train::run::train(&args, |_, _| tailor::train::run::AfterStep::Continue)?;
    let (base_first, trained_last) = (summary.steps[0].loss, summary.steps.last().map(|s| s.loss).unwrap_or(0.0));
    let resumed = continued.steps[0].loss;
    assert!(
        resumed < base_first / 3.0 && resumed < trained_last * 3.0,
        "{base_first} → {trained_last}, resumed at {resumed}"
    );
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(more.path().join("adapter_config.json"))?)?;
    assert_eq!((config["r"].as_u64(), config["lora_alpha"].as_f64()), (Some(8), Some(16.0)));
    Ok(())
}

/// The json recipe of the shipped adapter (r=4, alpha 8, rsLoRA, q/k/v/o):
/// at least 9 of 10 served replies are a JSON object with a string `answer`.
#[tokio::test]
async fn the_json_recipe_trains_an_adapter_the_server_serves() -> TestResult {
    let out = tempfile::tempdir()?;
    let lora = ["--rank", "4", "--alpha", "8", "--use-rslora", "--target-modules", "q_proj,k_proj,v_proj,o_proj"];
    let (summary, served) = trained_and_served("json.jsonl", &lora, out.path()).await?;
    let json_answer = |r: &str| {
        serde_json::from_str::<serde_json::Value>(r.trim())
            .is_ok_and(|v| v.get("answer").is_some_and(|a| a.is_string()))
    };
    assert!(served.iter().filter(|r| json_answer(r)).count() >= 9, "served replies: {served:?}");
    assert!(summary.replies.iter().filter(|(_, r)| json_answer(r)).count() >= 9, "eval replies: {:?}", summary.replies);
    Ok(())
}

/// Ctrl-C's checkpoint: a run stopped after its first step still leaves a
/// loadable adapter, its log and a card that says where it stopped.
#[test]
fn a_run_stopped_at_a_checkpoint_saves_what_it_trained() -> TestResult {
    use tailor::train::run::AfterStep;
    let out = tempfile::tempdir()?;
    let data = crate::common::fixture("train").join("json.jsonl");
    let (model, data, out_dir) =
        (model_path().display().to_string(), data.display().to_string(), out.path().display().to_string());
    let args =
        train_args(&["--model", &model, "--data", &data, "--out", &out_dir, "--steps", "5", "--batch-size", "2"]);
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
