//! OpenAI's fine-tuning API end to end with the official `openai` client
//! (`tests/openai_fine_tuning.py`): upload, a job training the pirate recipe,
//! the adapter served at once as `ft:…`, cancels, a malformed upload; then a
//! restart on the same data directory keeps the job and serves its adapter,
//! and a job on that fine-tuned model continues it.

use serde_json::{json, Value};

use crate::common::{fixture, python_script_output, start_server, start_server_with_shutdown, TestResult, MODEL_ID};

const ADMIN: &str = "sk-admin-fine-tuning";

#[tokio::test]
async fn a_job_trains_an_adapter_served_at_once_and_after_a_restart() -> TestResult {
    let data = tempfile::tempdir()?;
    let data_dir = data.path().display().to_string();
    let keys = ["--api-key", "sk-not-admin", "--admin-api-key", ADMIN, "--data-dir", &data_dir];
    let mut args = keys.to_vec();
    args.extend(["--train-threads", "2"]);
    let (addr, stop, stopped) = start_server_with_shutdown(&args);
    let train = fixture("train").display().to_string();
    let base = format!("http://{addr}/v1");
    let out = tokio::task::spawn_blocking(move || {
        python_script_output("openai_fine_tuning.py", &[&base, MODEL_ID, &train, ADMIN], "openai")
            .map_err(|e| e.to_string())
    })
    .await??;
    let fine_tuned = out.lines().last().ok_or("the script printed no model id")?.trim().to_string();
    let _ = stop.send(());
    stopped.recv()??;

    // The next server on the same data directory: the job and its adapter are back.
    let again = start_server(&keys);
    let client = reqwest::Client::new();
    let jobs: Value =
        client.get(format!("http://{again}/v1/fine_tuning/jobs")).bearer_auth(ADMIN).send().await?.json().await?;
    let kept = jobs["data"].as_array().ok_or("data")?.iter().find(|j| j["fine_tuned_model"] == fine_tuned.as_str());
    assert_eq!(kept.ok_or("the job is gone")?["status"], "succeeded");
    let eval: Value = serde_json::from_str(&std::fs::read_to_string(fixture("train").join("eval.json"))?)?;
    let prompt = eval["prompts"][0].as_str().ok_or("an eval prompt")?;
    let reply = greedy_reply(&client, &again, &fine_tuned, prompt).await?;
    let text = reply["choices"][0]["message"]["content"].as_str().unwrap_or_default();
    assert!(text.starts_with("Arr matey!"), "{reply}");

    // Fine-tuning the fine-tuned model continues its adapter (its shape is
    // its own: a rank is refused); the new model is named after the base.
    let kept = kept.ok_or("the job is gone")?;
    let jobs_url = format!("http://{again}/v1/fine_tuning/jobs");
    let reshaped =
        json!({"model": fine_tuned, "training_file": kept["training_file"], "hyperparameters": {"lora_rank": 4}});
    let refused = client.post(&jobs_url).bearer_auth(ADMIN).json(&reshaped).send().await?;
    assert_eq!(refused.status(), 400);
    let refused: Value = refused.json().await?;
    assert_eq!(refused["error"]["param"], "hyperparameters.lora_rank", "{refused}");
    let more = json!({"model": fine_tuned, "training_file": kept["training_file"], "suffix": "more",
        "hyperparameters": {"n_steps": 2, "learning_rate_multiplier": 0.05, "max_seq_len": 96}});
    let job: Value = client.post(&jobs_url).bearer_auth(ADMIN).json(&more).send().await?.json().await?;
    assert_eq!(job["model"], fine_tuned.as_str(), "{job}");
    assert_eq!(job["hyperparameters"]["lora_rank"], kept["hyperparameters"]["lora_rank"], "{job}");
    let id = job["id"].as_str().ok_or("a job id")?;
    let mut done = Value::Null;
    for _ in 0..600 {
        done = client.get(format!("{jobs_url}/{id}")).bearer_auth(ADMIN).send().await?.json().await?;
        if done["status"] != "queued" && done["status"] != "running" && done["status"] != "validating_files" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(done["status"], "succeeded", "{done}");
    let continued = done["fine_tuned_model"].as_str().ok_or("a model")?;
    assert!(continued.starts_with(&format!("ft:{MODEL_ID}:more:")), "{continued}");
    let reply = greedy_reply(&client, &again, continued, prompt).await?;
    let text = reply["choices"][0]["message"]["content"].as_str().unwrap_or_default();
    assert!(text.starts_with("Arr matey!"), "the continued adapter keeps its style: {reply}");
    Ok(())
}

/// A short greedy chat reply from `model`, with the user key.
async fn greedy_reply(
    client: &reqwest::Client,
    addr: &std::net::SocketAddr,
    model: &str,
    prompt: &str,
) -> Result<Value, reqwest::Error> {
    let body = json!({"model": model, "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 16, "temperature": 0});
    let url = format!("http://{addr}/v1/chat/completions");
    client.post(url).bearer_auth("sk-not-admin").json(&body).send().await?.json().await
}
