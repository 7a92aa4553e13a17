//! Many adapters: names resolved from the roots on first use, weights held
//! within a byte budget, cold loads that never stall running streams.

use std::path::Path;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};
use tailor::lora::random::{self, RandomAdapters};
use tailor::lora::{BaseShapes, Module};

use crate::common::{copy_dir, model_path, project_adapter, scrape, server, start_server, value, TestResult, MODEL_ID};

/// `count` random adapters `{prefix}0..` of `rank` over `modules` in `root`.
fn random_adapters(root: &Path, prefix: &str, count: usize, rank: usize, modules: Vec<Module>) -> TestResult {
    let source = tailor::loader::open_weights(&model_path(), tailor::model::WeightMode::Quantized)?;
    let spec = RandomAdapters { prefix: prefix.into(), count, ranks: (rank, rank), modules, seed: 11 };
    random::write(root, &BaseShapes::of(source.config()), &spec)?;
    Ok(())
}

async fn complete(
    addr: std::net::SocketAddr,
    model: &str,
    prompt: &str,
    max_tokens: u32,
) -> Result<(u16, Value), String> {
    let body = json!({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0});
    let response = completions(addr, body).await?;
    let status = response.status().as_u16();
    Ok((status, response.json().await.map_err(|e| e.to_string())?))
}

async fn completions(addr: std::net::SocketAddr, body: Value) -> Result<reqwest::Response, String> {
    let request = reqwest::Client::new().post(format!("http://{addr}/v1/completions")).json(&body);
    request.send().await.map_err(|e| e.to_string())
}

fn text(reply: &Value) -> String {
    reply["choices"][0]["text"].as_str().unwrap_or_default().to_string()
}

async fn chat(addr: std::net::SocketAddr, model: &str, question: &str) -> Result<String, Box<dyn std::error::Error>> {
    let body = json!({"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 24, "temperature": 0});
    let response = reqwest::Client::new().post(format!("http://{addr}/v1/chat/completions")).json(&body).send().await?;
    assert_eq!(response.status().as_u16(), 200);
    let reply: Value = response.json().await?;
    Ok(reply["choices"][0]["message"]["content"].as_str().unwrap_or_default().to_string())
}

async fn model_ids(addr: std::net::SocketAddr) -> Result<Vec<String>, Box<dyn std::error::Error>> {
    let models: Value = reqwest::get(format!("http://{addr}/v1/models")).await?.json().await?;
    Ok(models["data"].as_array().ok_or("data")?.iter().filter_map(|m| m["id"].as_str().map(str::to_string)).collect())
}

#[tokio::test]
async fn a_name_not_registered_loads_from_the_root_on_first_use() -> TestResult {
    let root = tempfile::tempdir()?;
    let root_path = std::fs::canonicalize(root.path())?;
    copy_dir(&project_adapter("pirate"), &root_path.join("parrot"))?;
    copy_dir(&project_adapter("pirate"), &root_path.join("crowd"))?;
    let addr = start_server(&["--resolve-adapters", "--lora-root", root_path.to_str().ok_or("utf-8")?]);
    let ids = model_ids(addr).await?;
    assert!(ids.iter().any(|id| id == "pirate"), "the adapters folder is registered at start: {ids:?}");
    assert!(!ids.iter().any(|id| id == "parrot"), "{ids:?}");
    let loads = |m: &[crate::common::Family]| value(m, "tailor_adapter_loads_total", &[]);
    let before = scrape(addr).await?;

    // A name found nowhere: 404 at once, nothing read.
    let (status, body) = complete(addr, "nobody-here", "Hello", 4).await?;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "model_not_found", "{body}");
    // Names that could leave the roots: 400 before any file is touched.
    for bad in ["../parrot", "parrot/../parrot", "a/b", "..", ".parrot"] {
        let (status, body) = complete(addr, bad, "Hello", 4).await?;
        assert_eq!(status, 400, "{bad}: {body}");
        assert_eq!(body["error"]["param"], "model", "{bad}: {body}");
    }
    let after_misses = scrape(addr).await?;
    assert_eq!(loads(&after_misses), loads(&before), "nothing was loaded");
    assert_eq!(value(&after_misses, "tailor_adapter_resolve_misses_total", &[]), 1.0);

    // The same greedy tokens as the same weights loaded at start (another server).
    let prompt = "Tell me about the sea in one sentence.";
    let resolved = chat(addr, "parrot", prompt).await?;
    assert_eq!(resolved, chat(server(), "pirate", prompt).await?);
    assert_ne!(resolved, chat(server(), MODEL_ID, prompt).await?);
    assert!(model_ids(addr).await?.iter().any(|id| id == "parrot"), "listed once resolved");

    // Concurrent first uses of one cold adapter read it once.
    let loaded = loads(&scrape(addr).await?);
    let replies =
        futures::future::join_all((0..4).map(|i| complete(addr, "crowd", if i % 2 == 0 { prompt } else { "Ahoy" }, 8)))
            .await;
    for reply in replies {
        assert_eq!(reply?.0, 200);
    }
    assert_eq!(loads(&scrape(addr).await?), loaded + 1.0);
    Ok(())
}

#[tokio::test]
async fn a_budget_of_three_holds_with_twenty_adapters_in_rotation() -> TestResult {
    let root = tempfile::tempdir()?;
    let root_path = std::fs::canonicalize(root.path())?;
    random_adapters(&root_path, "r", 20, 8, vec![Module::Q, Module::V])?;
    let lora_root = root_path.to_str().ok_or("utf-8")?;
    // rank 8 over q (576 → 576) and v (576 → 192), 30 layers, float16
    // (adapter weights beside the quantized base the test servers run).
    let one = 8 * ((576 + 576) + (576 + 192)) * 30 * 2;
    let budget = (3 * one + one / 2).to_string();
    let unbounded = start_server(&["--resolve-adapters", "--lora-root", lora_root, "--adapter-memory", "0"]);
    let bounded = start_server(&[
        "--resolve-adapters",
        "--lora-root",
        lora_root,
        "--adapter-memory",
        &budget,
        "--max-num-seqs",
        "4",
    ]);
    let job = |i: usize| (format!("r{}", i % 20), format!("Write a short line about the number {i}."));
    let mut expected = Vec::new();
    for i in 0..40 {
        let (model, prompt) = job(i);
        let (status, reply) = complete(unbounded, &model, &prompt, 8).await?;
        assert_eq!(status, 200, "{reply}");
        expected.push(text(&reply));
    }
    let distinct = expected[..20].iter().collect::<std::collections::BTreeSet<_>>().len();
    assert!(distinct > 10, "adapters differ: {distinct} distinct replies {expected:?}");
    // Four at a time in rotation: adapters in use are held while others are evicted.
    let results = futures::stream::iter(0..40)
        .map(|i| async move {
            let (model, prompt) = job(i);
            (i, complete(bounded, &model, &prompt, 8).await)
        })
        .buffer_unordered(4)
        .collect::<Vec<_>>()
        .await;
    for (i, result) in results {
        let (status, reply) = result?;
        assert_eq!(status, 200, "{reply}");
        assert_eq!(text(&reply), expected[i], "request {i} ({})", job(i).0);
    }
    let metrics = scrape(bounded).await?;
    let resident = value(&metrics, "tailor_adapter_bytes_resident", &[]);
    assert!(resident > 0.0 && resident <= (3 * one + one / 2) as f64, "resident {resident} bytes");
    assert_eq!(value(&metrics, "tailor_adapter_memory_budget_bytes", &[]), (3 * one + one / 2) as f64);
    assert!(value(&metrics, "tailor_adapter_evictions_total", &[]) >= 20.0);
    assert!(value(&metrics, "tailor_adapter_loads_total", &[]) >= 40.0);
    assert_eq!(
        value(&metrics, "tailor_adapter_load_seconds_count", &[]),
        value(&metrics, "tailor_adapter_loads_total", &[])
    );
    assert_eq!(value(&metrics, "tailor_adapters_registered", &[]), 23.0, "20 resolved + the 3 of the adapters folder");
    Ok(())
}

/// A stream's inter-token gaps (ms), each with the time it arrived.
async fn stream_gaps(addr: std::net::SocketAddr, max_tokens: u32) -> Result<Vec<(Instant, f64)>, String> {
    let body = json!({"model": MODEL_ID, "prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0,
                      "stream": true, "ignore_eos": true});
    let mut chunks = completions(addr, body).await?.bytes_stream();
    let (mut gaps, mut last) = (Vec::new(), None::<Instant>);
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(|e| e.to_string())?;
        let now = Instant::now();
        for _ in String::from_utf8_lossy(&chunk).matches("data: {") {
            if let Some(last) = last {
                gaps.push((now, (now - last).as_secs_f64() * 1e3));
            }
            last = Some(now);
        }
    }
    Ok(gaps)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

#[tokio::test]
async fn cold_loads_do_not_stall_a_running_stream() -> TestResult {
    let root = tempfile::tempdir()?;
    let root_path = std::fs::canonicalize(root.path())?;
    // Twenty rank-16 adapters over all seven modules (~19.5 MB each).
    random_adapters(&root_path, "cold", 20, 16, Module::ALL.to_vec())?;
    let root_arg = root_path.to_str().ok_or("utf-8")?;
    let addr = start_server(&["--resolve-adapters", "--lora-root", root_arg, "--enable-lora-loading"]);
    let alone = median(stream_gaps(addr, 120).await?.into_iter().map(|(_, gap)| gap).collect());
    // Twenty loads (the admin route reads on the same load threads as a
    // request's cold adapter) while a stream runs.
    let stream = tokio::spawn(stream_gaps(addr, 240));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let loads = futures::future::join_all((0..20).map(|i| {
        let body = json!({"lora_name": format!("cold{i}"), "lora_path": root_path.join(format!("cold{i}"))});
        async move { crate::common::post_text(addr, "/v1/load_lora_adapter", body).await }
    }))
    .await;
    let ended = Instant::now();
    for load in loads {
        assert_eq!(load?.0, 200);
    }
    let gaps = stream.await??;
    let during: Vec<f64> =
        gaps.into_iter().filter(|(at, _)| *at >= started && *at <= ended).map(|(_, gap)| gap).collect();
    assert!(during.len() >= 5, "the stream ran through the loads ({} gaps in {:?})", during.len(), ended - started);
    let loading = median(during);
    assert!(loading < 2.0 * alone, "median inter-token gap {loading:.1} ms while 20 adapters load vs {alone:.1} ms");
    assert_eq!(value(&scrape(addr).await?, "tailor_adapter_loads_total", &[]), 20.0);
    // Requests naming cold adapters load them on first use (and answer).
    let names: Vec<String> = (0..20).map(|i| format!("late{i}")).collect();
    random_adapters(&root_path, "late", 20, 16, Module::ALL.to_vec())?;
    let replies = futures::future::join_all(names.iter().map(|name| complete(addr, name, "Hi", 1))).await;
    for reply in replies {
        assert_eq!(reply?.0, 200);
    }
    assert_eq!(value(&scrape(addr).await?, "tailor_adapter_loads_total", &[]), 40.0);
    Ok(())
}

#[tokio::test]
async fn the_workload_generator_reports_every_figure_at_small_scale() -> TestResult {
    let root = tempfile::tempdir()?;
    let root_path = std::fs::canonicalize(root.path())?;
    // Twenty adapters (ranks 8-16 over q and v, tailor random-adapters' defaults otherwise).
    let made = std::process::Command::new(env!("CARGO_BIN_EXE_tailor"))
        .args(["random-adapters", "--count", "20", "--ranks", "8-16", "--modules", "q,v", "--prefix", "s", "--model"])
        .arg(model_path())
        .arg("--out")
        .arg(&root_path)
        .output()?;
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    // A budget of about five of them.
    let addr = start_server(&[
        "--resolve-adapters",
        "--lora-root",
        root_path.to_str().ok_or("utf-8")?,
        "--adapter-memory",
        "12MB",
    ]);
    let url = format!("http://{addr}");
    let bench = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_tailor"))
            .args(["bench", "--url", &url, "--adapters", "20", "--adapter-prefix", "s", "--alpha", "1"])
            .args(["--rate", "2", "--duration", "30", "--prompt-tokens-range", "8:64", "--max-tokens-range", "8:32"])
            .args(["--seed", "5", "--time-limit", "120"])
            .output()
    })
    .await??;
    let stdout = String::from_utf8(bench.stdout)?;
    assert!(bench.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&bench.stderr));
    let summary: Value =
        serde_json::Deserializer::from_str(&stdout).into_iter::<Value>().next().ok_or("a JSON summary")??;
    for field in [
        "requests_ok",
        "requests_failed",
        "rate",
        "models",
        "prompt_tokens",
        "max_tokens",
        "wall_s",
        "requests_per_s",
        "generated_tokens",
        "generated_tokens_per_s",
        "ttft_ms_p50",
        "ttft_ms_p95",
        "ttft_ms_p99",
        "itl_ms_p50",
        "itl_ms_p95",
        "itl_ms_p99",
        "e2e_ms_p50",
        "slo_attainment",
    ] {
        assert!(summary[field].is_number(), "{field}: {summary}");
    }
    assert_eq!(summary["requests_failed"], 0, "{summary}");
    assert!(summary["requests_ok"].as_u64().is_some_and(|n| (40..=80).contains(&n)), "~2/s for 30 s: {summary}");
    assert!(summary["models"].as_u64().is_some_and(|n| n > 5), "{summary}");
    let server = &summary["server"];
    for field in ["adapter_loads", "adapter_evictions", "adapter_resolve_misses", "adapter_bytes_resident"] {
        assert!(server[field].is_number(), "{field}: {summary}");
    }
    assert!(server["adapter_loads"].as_f64() >= summary["models"].as_f64(), "each adapter named was read: {summary}");
    assert_eq!(server["adapter_resolve_misses"], 0.0);
    assert!(server["adapter_bytes_resident"].as_f64().is_some_and(|b| b <= 12e6), "{summary}");
    Ok(())
}
