//! The event loop stays responsive under CPU-heavy requests. A binary of its
//! own: cargo runs test binaries one after another, so no other test's
//! server competes for the two cores while latency is measured.

#[allow(dead_code)]
#[path = "real_model/common.rs"]
mod common;

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::{start_server, TestResult};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_answers_fast_while_four_big_prompts_tokenize() -> TestResult {
    let addr = start_server(&[]);
    let prompt = "All work and no play makes Jack a dull boy. ".repeat(4 * 1024 * 1024 / 44);
    // Bodies made before the clock starts: the client's own work is not the server's.
    let bodies: Vec<String> = (0..4).map(|i| json!({"prompt": format!("{i} {prompt}")}).to_string()).collect();
    let client = reqwest::Client::new();
    let started = Instant::now();
    let tokenizing: Vec<_> = bodies
        .into_iter()
        .map(|body| {
            let client = client.clone();
            tokio::spawn(async move {
                let response = client
                    .post(format!("http://{addr}/tokenize"))
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await?;
                let status = response.status();
                let bytes = response.bytes().await?;
                // Parsing ~7 MB of token ids would hold one of this client's
                // two workers, and so delay its own probes: off the workers.
                let body: Value =
                    tokio::task::spawn_blocking(move || serde_json::from_slice(&bytes).unwrap_or_default())
                        .await
                        .unwrap_or_default();
                Ok::<_, reqwest::Error>((status, body))
            })
        })
        .collect();
    let mut latencies = Vec::new();
    tokio::time::sleep(Duration::from_millis(100)).await;
    while tokenizing.iter().any(|t| !t.is_finished()) {
        let probe = Instant::now();
        let status = reqwest::Client::new().get(format!("http://{addr}/health")).send().await?.status();
        assert_eq!(status, 200);
        latencies.push(probe.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let busy = started.elapsed();
    for t in tokenizing {
        let (status, body) = t.await??;
        assert_eq!(status, 200);
        assert!(body["count"].as_u64().is_some_and(|n| n > 500_000), "{}", body["count"]);
    }
    assert!(latencies.len() >= 5, "tokenizing took {busy:?}: too short to probe");
    // Work on the event loop would hold /health for the seconds a 4 MB prompt
    // takes to tokenize, so most probes would be slow; a single stall of the
    // machine (the kernel reclaiming memory after an earlier test binary:
    // seen at 200 ms once in a few runs) is not the server's, so the bound is
    // on the 95th percentile, with a ceiling on the worst.
    latencies.sort();
    let p95 = latencies[latencies.len() * 95 / 100];
    let worst = latencies[latencies.len() - 1];
    let probes = latencies.len();
    assert!(p95 < Duration::from_millis(100), "/health p95 {p95:?} (worst {worst:?}) over {probes} probes");
    assert!(worst < Duration::from_secs(1), "slowest /health {worst:?} over {probes} probes");
    Ok(())
}
