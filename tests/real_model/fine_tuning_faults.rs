//! The fine-tuning API under the faults an operator meets: settings out of
//! range, runs too large for memory, a training process killed, a server
//! killed at any moment, SIGTERM mid-run, cancel racing the end, full caps.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::{fixture, start_server, start_server_with_shutdown, Served, TestResult};

type Error = Box<dyn std::error::Error>;

const ADMIN: &str = "sk-admin-faults";

/// A small, quick run: a few steps of two short examples.
fn quick(steps: u64) -> Value {
    json!({"n_steps": steps, "batch_size": 2, "max_seq_len": 64, "lora_rank": 4})
}

async fn upload(addr: SocketAddr) -> Result<(u16, Value), Error> {
    let data = std::fs::read(fixture("train/pirate.jsonl"))?;
    let boundary = "tailor-test-boundary";
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n--{boundary}\r\n\
         Content-Disposition: form-data; name=\"file\"; filename=\"pirate.jsonl\"\r\n\
         Content-Type: application/jsonl\r\n\r\n"
    )
    .into_bytes();
    body.extend(data);
    body.extend(format!("\r\n--{boundary}--\r\n").into_bytes());
    let response = reqwest::Client::new()
        .post(format!("http://{addr}/v1/files"))
        .bearer_auth(ADMIN)
        .header("content-type", format!("multipart/form-data; boundary={boundary}"))
        .body(body)
        .send()
        .await?;
    Ok((response.status().as_u16(), response.json().await?))
}

async fn file_id(addr: SocketAddr) -> Result<String, Error> {
    let (status, file) = upload(addr).await?;
    assert_eq!(status, 200, "{file}");
    Ok(file["id"].as_str().ok_or("a file id")?.to_string())
}

async fn create(addr: SocketAddr, file: &str, hyperparameters: Value) -> Result<(u16, Value), Error> {
    let body = json!({"model": crate::common::MODEL_ID, "training_file": file, "hyperparameters": hyperparameters});
    let response = reqwest::Client::new()
        .post(format!("http://{addr}/v1/fine_tuning/jobs"))
        .bearer_auth(ADMIN)
        .json(&body)
        .send()
        .await?;
    Ok((response.status().as_u16(), response.json().await?))
}

async fn created(addr: SocketAddr, file: &str, hyperparameters: Value) -> Result<String, Error> {
    let (status, job) = create(addr, file, hyperparameters).await?;
    assert_eq!(status, 200, "{job}");
    Ok(job["id"].as_str().ok_or("a job id")?.to_string())
}

async fn get(addr: SocketAddr, path: &str) -> Result<Value, Error> {
    let response = reqwest::Client::new().get(format!("http://{addr}{path}")).bearer_auth(ADMIN).send().await?;
    Ok(response.json().await?)
}

async fn cancel(addr: SocketAddr, id: &str) -> Result<u16, Error> {
    let url = format!("http://{addr}/v1/fine_tuning/jobs/{id}/cancel");
    Ok(reqwest::Client::new().post(url).bearer_auth(ADMIN).send().await?.status().as_u16())
}

/// Polls a job until `done` says so (or a minute passes).
async fn wait_job(addr: SocketAddr, id: &str, done: impl Fn(&Value) -> bool) -> Result<Value, Error> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let job = get(addr, &format!("/v1/fine_tuning/jobs/{id}")).await?;
        if done(&job) {
            return Ok(job);
        }
        if Instant::now() > deadline {
            return Err(format!("job never got there: {job}").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn is_final(job: &Value) -> bool {
    ["succeeded", "failed", "cancelled"].contains(&job["status"].as_str().unwrap_or_default())
}

/// Waits until the job's process reports a step.
async fn wait_training(addr: SocketAddr, id: &str) -> Result<(), Error> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let events = get(addr, &format!("/v1/fine_tuning/jobs/{id}/events?limit=100")).await?;
        let list = events["data"].as_array().cloned().unwrap_or_default();
        if list.iter().any(|e| e["type"] == "metrics") {
            return Ok(());
        }
        assert!(Instant::now() < deadline, "the job never trained: {events}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn served_models(addr: SocketAddr) -> Result<Vec<String>, Error> {
    let models = get(addr, "/v1/models").await?;
    Ok(models["data"].as_array().ok_or("data")?.iter().filter_map(|m| m["id"].as_str().map(String::from)).collect())
}

/// The pids of `parent`'s children training `job` (any job: "").
fn training_processes(parent: u32, job: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let status = std::fs::read_to_string(entry.path().join("status")).unwrap_or_default();
        let ppid = status.lines().find_map(|l| l.strip_prefix("PPid:")).and_then(|p| p.trim().parse::<u32>().ok());
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        if ppid == Some(parent) && cmdline.contains("fine-tune-worker") && cmdline.contains(job) {
            found.push(pid);
        }
    }
    found
}

fn alive(pid: u32) -> bool {
    // A zombie has been killed; it only waits to be reaped.
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .is_ok_and(|s| !s.lines().any(|l| l.starts_with("State:") && l.contains('Z')))
}

/// Every job folder in the data directory: (status, whether its adapter is whole).
fn jobs_on_disk(data: &Path) -> Result<Vec<(String, String, bool)>, Error> {
    let mut jobs = Vec::new();
    for entry in std::fs::read_dir(data.join("fine_tuning"))? {
        let dir = entry?.path();
        let job: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("job.json"))?)?;
        let adapter = dir.join("adapter");
        let whole =
            adapter.join("adapter_config.json").is_file() && adapter.join("adapter_model.safetensors").is_file();
        jobs.push((
            job["id"].as_str().unwrap_or_default().to_string(),
            job["status"].as_str().unwrap_or_default().to_string(),
            whole,
        ));
    }
    Ok(jobs)
}

#[tokio::test]
async fn settings_out_of_range_and_runs_too_large_for_memory_are_refused_at_creation() -> TestResult {
    let addr = start_server(&["--admin-api-key", ADMIN, "--max-train-memory", "3GiB"]);
    let file = file_id(addr).await?;
    for (field, value) in [
        ("n_steps", json!(1e15)),
        ("batch_size", json!(100_000)),
        ("lora_rank", json!(1_000)),
        ("max_seq_len", json!(1e9)),
        ("n_epochs", json!(-1)),
        ("learning_rate_multiplier", json!(0)),
        ("warmup_steps", json!(1.5)),
    ] {
        let (status, body) = create(addr, &file, json!({ field: value })).await?;
        assert_eq!(status, 400, "{field}: {body}");
        assert_eq!(body["error"]["param"], format!("hyperparameters.{field}"), "{body}");
    }
    // 8 × 2048 tokens needs ~10 GiB here; 8 × 96 fits in 3 GiB.
    let (status, body) = create(addr, &file, json!({"batch_size": 8, "max_seq_len": 2048})).await?;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "hyperparameters.batch_size");
    assert!(body["error"]["message"].as_str().unwrap_or_default().contains("--max-train-memory"), "{body}");
    let jobs = get(addr, "/v1/fine_tuning/jobs").await?;
    assert_eq!(jobs["data"], json!([]), "nothing refused was created");
    let id = created(addr, &file, json!({"batch_size": 8, "max_seq_len": 96, "n_steps": 1000})).await?;
    assert_eq!(cancel(addr, &id).await?, 200);
    Ok(())
}

#[tokio::test]
async fn a_job_whose_training_process_dies_fails_with_the_reason_and_is_never_run_again() -> TestResult {
    let data = tempfile::tempdir()?;
    let data_dir = data.path().display().to_string();
    let args = ["--admin-api-key", ADMIN, "--data-dir", &data_dir];
    let (addr, stop, stopped) = start_server_with_shutdown(&args);
    let file = file_id(addr).await?;
    let id = created(addr, &file, quick(5_000)).await?;
    wait_training(addr, &id).await?;
    // The out-of-memory killer's way: SIGKILL to the training process.
    let killed = training_processes(std::process::id(), &id);
    for &pid in &killed {
        kill(pid)?;
    }
    let job = wait_job(addr, &id, is_final).await?;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["error"]["code"], "training_process_died", "{job}");
    assert!(job["error"]["message"].as_str().unwrap_or_default().contains("SIGKILL"), "{job}");
    let _ = stop.send(());
    stopped.recv()??;
    let again = start_server(&args);
    let job = get(again, &format!("/v1/fine_tuning/jobs/{id}")).await?;
    assert_eq!(job["status"], "failed", "a failed job stays failed: {job}");
    let events = get(again, &format!("/v1/fine_tuning/jobs/{id}/events?limit=100")).await?;
    assert!(!events.to_string().contains("starts over"), "{events}");
    assert!(!killed.is_empty());
    Ok(())
}

/// SIGKILL to a process (through the `kill` program: no unsafe in tests).
fn kill(pid: u32) -> Result<(), Error> {
    let status = std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status()?;
    assert!(status.success(), "kill {pid}");
    Ok(())
}

#[tokio::test]
async fn storage_caps_stop_uploads_and_jobs_with_clear_errors() -> TestResult {
    let addr = start_server(&["--admin-api-key", ADMIN, "--max-files", "1", "--max-queued-jobs", "1"]);
    let file = file_id(addr).await?;
    let (status, body) = upload(addr).await?;
    assert_eq!(status, 507, "{body}");
    assert_eq!(body["error"]["code"], "storage_full");
    assert!(body.to_string().contains("--max-files"), "{body}");
    let id = created(addr, &file, quick(5_000)).await?;
    let (status, body) = create(addr, &file, quick(2)).await?;
    assert_eq!(status, 429, "{body}");
    assert!(body.to_string().contains("--max-queued-jobs"), "{body}");
    assert_eq!(cancel(addr, &id).await?, 200);

    let full = start_server(&["--admin-api-key", ADMIN, "--min-free-disk", "1000000TiB"]);
    let (status, body) = upload(full).await?;
    assert_eq!(status, 507, "{body}");
    assert!(body.to_string().contains("--min-free-disk"), "{body}");
    Ok(())
}

#[tokio::test]
async fn a_server_killed_at_any_moment_leaves_every_job_whole_or_starting_over() -> TestResult {
    let data = tempfile::tempdir()?;
    let data_dir = data.path().display().to_string();
    let args = ["--admin-api-key", ADMIN, "--data-dir", &data_dir];
    let start = || Served::start(&args);
    let mut served = start()?;
    let file = file_id(served.addr).await?;
    let mut ids = Vec::new();
    // Kills land while loading, training, saving and publishing.
    for delay_ms in [200u64, 2_600, 900, 4_100, 1_700, 3_300] {
        ids.push(created(served.addr, &file, quick(3)).await?);
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        let workers = training_processes(served.child_id(), "");
        served.kill();
        for (id, status, whole) in jobs_on_disk(data.path())? {
            assert!(status != "succeeded" || whole, "{id} succeeded without its adapter");
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while workers.iter().any(|&pid| alive(pid)) {
            assert!(Instant::now() < deadline, "a training process outlived its server");
            std::thread::sleep(Duration::from_millis(20));
        }
        served = start()?;
        let models = served_models(served.addr).await?;
        for id in &ids {
            let job = get(served.addr, &format!("/v1/fine_tuning/jobs/{id}")).await?;
            match job["status"].as_str().unwrap_or_default() {
                "succeeded" => {
                    let model = job["fine_tuned_model"].as_str().unwrap_or_default().to_string();
                    assert!(models.contains(&model), "{model} is not served: {models:?}");
                }
                "queued" | "running" => {}
                other => panic!("{id} ended {other}: {job}"),
            }
        }
    }
    for id in &ids {
        let job = wait_job(served.addr, id, is_final).await?;
        assert_eq!(job["status"], "succeeded", "{job}");
    }
    Ok(())
}

#[tokio::test]
async fn sigterm_while_training_stops_within_the_shutdown_timeout_and_the_job_starts_over() -> TestResult {
    let data = tempfile::tempdir()?;
    let data_dir = data.path().display().to_string();
    let args = ["--admin-api-key", ADMIN, "--data-dir", &data_dir, "--shutdown-timeout", "5"];
    let (addr, stop, stopped) = start_server_with_shutdown(&args);
    let file = file_id(addr).await?;
    let id = created(addr, &file, quick(5_000)).await?;
    wait_training(addr, &id).await?;
    let asked = Instant::now();
    let _ = stop.send(());
    tokio::task::spawn_blocking(move || stopped.recv()).await???;
    assert!(asked.elapsed() < Duration::from_secs(5), "shutdown took {:?}", asked.elapsed());
    let on_disk = jobs_on_disk(data.path())?;
    assert_eq!(on_disk.iter().map(|(_, s, _)| s.as_str()).collect::<Vec<_>>(), vec!["queued"], "{on_disk:?}");
    let again = start_server(&args);
    wait_training(again, &id).await?;
    let events = get(again, &format!("/v1/fine_tuning/jobs/{id}/events?limit=100")).await?;
    assert!(events.to_string().contains("starts over"), "{events}");
    assert_eq!(cancel(again, &id).await?, 200);
    Ok(())
}

#[tokio::test]
async fn cancel_and_the_end_of_a_run_race_to_exactly_one_outcome() -> TestResult {
    let addr = start_server(&["--admin-api-key", ADMIN]);
    let file = file_id(addr).await?;
    for delay_ms in [0u64, 700, 1_400, 2_100, 2_800] {
        let id = created(addr, &file, quick(2)).await?;
        wait_job(addr, &id, |j| j["status"] == "running" || is_final(j)).await?;
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        let answer = cancel(addr, &id).await?;
        let job = wait_job(addr, &id, is_final).await?;
        let models = served_models(addr).await?;
        let served = models.iter().any(|m| m.ends_with(&format!(":{id}")));
        match answer {
            200 => assert!(job["status"] == "cancelled" && !served, "{job} served={served}"),
            400 => assert!(job["status"] == "succeeded" && served, "{job} served={served}"),
            other => panic!("cancel answered {other}"),
        }
    }
    Ok(())
}
