//! `tailor bench`: a load generator for any OpenAI-compatible server, so the
//! same workload can be run against tailor and other servers. Prompts for
//! `/v1/completions` are token-id lists, so their length is exact on any
//! server that shares the model's vocabulary.
//!
//! Two shapes of load: closed (`--concurrency` requests in flight, the next
//! sent when one ends) and open (`--rate`: Poisson arrivals, S-LoRA's
//! set-up), over fixed or drawn lengths and a rotation of model ids or N
//! adapters chosen by a power law (`workload`).

mod server_metrics;
pub mod step;
pub mod workload;

use workload::Planned;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::Semaphore;

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Base URL of the server (its /v1 routes are used).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Model ids, comma-separated: requests rotate over them (e.g. several adapters).
    #[arg(long, value_delimiter = ',', required_unless_present = "adapters")]
    pub model: Vec<String>,
    /// N adapters named PREFIX0..PREFIX{N-1} (`--adapter-prefix`), chosen per
    /// request by a power law of exponent `--alpha` (adapter i with weight
    /// 1/(i+1)^alpha), instead of rotating over `--model`.
    #[arg(long, default_value_t = 0)]
    pub adapters: usize,
    #[arg(long, default_value = "adapter-")]
    pub adapter_prefix: String,
    /// The power law's exponent (S-LoRA: 1).
    #[arg(long, default_value_t = 1.0)]
    pub alpha: f64,
    /// Open loop: requests arrive as a Poisson process of this many per
    /// second, however many are in flight (0 = closed loop at --concurrency).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// With --rate: send arrivals for this many seconds (instead of --requests).
    #[arg(long)]
    pub duration: Option<f64>,
    /// Prompt lengths drawn uniformly from LOW:HIGH (instead of --prompt-tokens).
    #[arg(long, value_parser = workload::parse_range)]
    pub prompt_tokens_range: Option<(usize, usize)>,
    /// Output lengths drawn uniformly from LOW:HIGH (instead of --max-tokens).
    #[arg(long, value_parser = workload::parse_range)]
    pub max_tokens_range: Option<(usize, usize)>,
    /// Seed of the drawn adapters, lengths and arrival times.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// A request meets its service-level objective when its first token
    /// comes within this time (S-LoRA's 6 s) ...
    #[arg(long, default_value_t = 6000.0)]
    pub slo_ttft_ms: f64,
    /// ... and its tokens then come at this mean gap or faster.
    #[arg(long, default_value_t = 200.0)]
    pub slo_itl_ms: f64,
    /// `completions` (token-id prompts, exact length) or `chat`.
    #[arg(long, default_value = "completions")]
    pub endpoint: String,
    /// Requests in flight at once (closed loop; with --rate, a cap if given).
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Requests in total.
    #[arg(long, default_value_t = 8)]
    pub requests: usize,
    /// Prompt length in tokens (completions) or words (chat).
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Stream responses (needed for time to first token and inter-token latency).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub stream: bool,
    /// Generate exactly max_tokens (`ignore_eos`, accepted by tailor, vLLM and llama.cpp).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub ignore_eos: bool,
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Hard limit on the whole run, in seconds.
    #[arg(long, default_value_t = 600)]
    pub time_limit: u64,
    /// Allow a non-loopback server address.
    #[arg(long)]
    pub allow_remote: bool,
    /// First token id of the synthetic prompts (ids start..start+prompt_tokens).
    #[arg(long, default_value_t = 1000)]
    pub prompt_token_start: u32,
    /// Tokens every completions prompt starts with (a template's fixed
    /// preamble) before its distinct part: measures prefix caching.
    #[arg(long, default_value_t = 0)]
    pub shared_prefix_tokens: usize,
    /// Number of the run's first request: its prompts are those of requests
    /// `first_request..`, so a second run (a second wave) sends new ones.
    #[arg(long, default_value_t = 0)]
    pub first_request: usize,
    /// llama.cpp's per-request adapters: request i also sends
    /// `"lora": [{"id": i mod (number of --model), "scale": 1}]` (start
    /// llama-server with the adapters in --model order and --lora-init-without-apply).
    #[arg(long)]
    pub llama_cpp_lora: bool,
    /// Every request composes this many of --compose-adapters (rotating,
    /// each at weight 1/N) on --model: tailor's `adapters`, or with
    /// --llama-cpp-lora llama.cpp's `lora` list (ids in --compose-adapters
    /// order).
    #[arg(long, default_value_t = 0, requires = "compose_adapters")]
    pub compose: usize,
    /// The adapters --compose draws from, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub compose_adapters: Vec<String>,
    /// A JSON file holding a `response_format` object sent with every
    /// request (constrained decoding against free generation).
    #[arg(long, value_parser = json_file)]
    pub response_format: Option<Value>,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct RequestResult {
    pub ok: bool,
    pub error: Option<String>,
    pub model: String,
    pub generated_tokens: usize,
    pub ttft_ms: Option<f64>,
    pub itl_ms: Vec<f64>,
    pub e2e_ms: f64,
}

#[derive(Debug, Serialize)]
pub struct Summary {
    pub requests_ok: usize,
    pub requests_failed: usize,
    /// Requests in flight at most (None: open loop without a cap).
    pub concurrency: Option<usize>,
    pub rate: f64,
    /// Distinct model ids the workload named.
    pub models: usize,
    pub prompt_tokens: usize,
    pub max_tokens: usize,
    pub wall_s: f64,
    pub requests_per_s: f64,
    pub generated_tokens: usize,
    pub generated_tokens_per_s: f64,
    pub ttft_ms_p50: Option<f64>,
    pub ttft_ms_p95: Option<f64>,
    pub ttft_ms_p99: Option<f64>,
    pub itl_ms_p50: Option<f64>,
    pub itl_ms_p95: Option<f64>,
    pub itl_ms_p99: Option<f64>,
    pub e2e_ms_p50: Option<f64>,
    /// Share of all requests that succeeded within --slo-ttft-ms and --slo-itl-ms.
    pub slo_attainment: f64,
    /// The server's adapter counters over the run, from its `/metrics` (None
    /// when it has none of tailor's).
    pub server: Option<server_metrics::AdapterActivity>,
    pub errors: Vec<String>,
}

impl Summary {
    pub fn one_line(&self) -> String {
        let ms = |v: Option<f64>| v.map(|v| format!("{v:.1}")).unwrap_or_else(|| "-".into());
        format!(
            "ok {} failed {} | {:.2} req/s {:.1} tok/s | ttft p50 {} p95 {} ms | itl p50 {} p95 {} ms | e2e p50 {} ms | slo {:.0}%",
            self.requests_ok,
            self.requests_failed,
            self.requests_per_s,
            self.generated_tokens_per_s,
            ms(self.ttft_ms_p50),
            ms(self.ttft_ms_p95),
            ms(self.itl_ms_p50),
            ms(self.itl_ms_p95),
            ms(self.e2e_ms_p50),
            self.slo_attainment * 100.0,
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0} is not a loopback address; pass --allow-remote to benchmark it")]
    Remote(String),
    #[error("invalid --url {0}")]
    Url(String),
    #[error("{0}")]
    Invalid(String),
}

fn check_url(args: &BenchArgs) -> Result<(), BenchError> {
    let rest = args
        .url
        .strip_prefix("http://")
        .ok_or_else(|| BenchError::Url(format!("{} (only http:// is supported)", args.url)))?;
    let authority = rest.split('/').next().unwrap_or_default();
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => authority.rsplit_once(':').map(|(h, _)| h).unwrap_or(authority),
    };
    let loopback = host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if !loopback && !args.allow_remote {
        return Err(BenchError::Remote(host.to_string()));
    }
    Ok(())
}

pub async fn run(args: BenchArgs) -> Result<Summary, BenchError> {
    check_url(&args)?;
    if args.concurrency == Some(0) || args.requests == 0 {
        return Err(BenchError::Invalid("--concurrency and --requests must be at least 1".into()));
    }
    let plan = workload::plan(&args)?;
    // A fresh connection per request: servers differ in how they close idle
    // keep-alive connections, and a reused, already-closed one would count as
    // that server's failure.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(args.time_limit))
        .build()
        .map_err(|e| BenchError::Invalid(e.to_string()))?;
    let in_flight = match (args.concurrency, args.rate > 0.0) {
        (Some(n), _) => n,
        (None, true) => Semaphore::MAX_PERMITS,
        (None, false) => 1,
    };
    let before = server_metrics::read(&client, &args.url).await;
    let gate = Arc::new(Semaphore::new(in_flight));
    let args = Arc::new(args);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.time_limit);
    let mut tasks = Vec::with_capacity(plan.len());
    for planned in plan.iter().cloned() {
        let (client, gate, args) = (client.clone(), gate.clone(), args.clone());
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until((started + planned.at).into()).await;
            let _permit = gate.acquire_owned().await;
            let model = planned.model.clone();
            match tokio::time::timeout_at(deadline.into(), one_request(&client, &args, &planned)).await {
                Ok(result) => result,
                Err(_) => RequestResult { model, error: Some("time limit reached".into()), ..Default::default() },
            }
        }));
    }
    let mut results = Vec::with_capacity(tasks.len());
    for task in tasks {
        results.push(task.await.unwrap_or_else(|e| RequestResult { error: Some(e.to_string()), ..Default::default() }));
    }
    let wall = started.elapsed();
    let after = server_metrics::read(&client, &args.url).await;
    let server = before.zip(after).map(|(before, after)| after.since(&before));
    Ok(summarize(&args, &plan, &results, wall, server, in_flight))
}

fn json_file(path: &str) -> Result<Value, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    serde_json::from_str(&text).map_err(|e| format!("{path} is not JSON: {e}"))
}

/// The adapters request `index` composes (indices into --compose-adapters)
/// and their weight.
fn compose(args: &BenchArgs, index: usize) -> Vec<(usize, f64)> {
    let n = args.compose_adapters.len();
    (0..args.compose.min(n)).map(|j| ((index + j) % n, 1.0 / args.compose.min(n) as f64)).collect()
}

fn body(args: &BenchArgs, planned: &Planned) -> (String, Value) {
    let (model, index) = (&planned.model, planned.index);
    let number = args.first_request + index;
    let common = json!({
        "model": model,
        "max_tokens": planned.max_tokens,
        "temperature": args.temperature,
        "stream": args.stream,
        "ignore_eos": args.ignore_eos,
    });
    let mut body = common.as_object().cloned().unwrap_or_default();
    if args.stream {
        body.insert("stream_options".into(), json!({"include_usage": true}));
    }
    if let Some(format) = &args.response_format {
        body.insert("response_format".into(), format.clone());
    }
    let composed = compose(args, index);
    if args.llama_cpp_lora {
        let lora = match composed.is_empty() {
            true => json!([{"id": index % args.model.len(), "scale": 1.0}]),
            false => composed.iter().map(|&(id, weight)| json!({"id": id, "scale": weight})).collect(),
        };
        body.insert("lora".into(), lora);
    } else if !composed.is_empty() {
        let adapters =
            composed.iter().map(|&(id, weight)| json!({"name": args.compose_adapters[id], "weight": weight})).collect();
        body.insert("adapters".into(), adapters);
    }
    if args.endpoint == "chat" {
        let words: Vec<String> = (0..planned.prompt_tokens).map(|k| format!("w{}", (k + number) % 97)).collect();
        body.insert("messages".into(), json!([{"role": "user", "content": words.join(" ")}]));
        (format!("{}/v1/chat/completions", args.url), Value::Object(body))
    } else {
        // Distinct per request, so no server can answer from a prefix cache
        // alone, after the shared preamble if one is asked for.
        let shared = (0..args.shared_prefix_tokens as u32).map(|k| args.prompt_token_start + (k * 11) % 5000);
        let ids: Vec<u32> = shared
            .chain(
                (0..planned.prompt_tokens as u32)
                    .map(|k| args.prompt_token_start + (k * 7 + number as u32 * 13) % 5000),
            )
            .collect();
        body.insert("prompt".into(), json!(ids));
        (format!("{}/v1/completions", args.url), Value::Object(body))
    }
}

async fn one_request(client: &reqwest::Client, args: &BenchArgs, planned: &Planned) -> RequestResult {
    let (url, body) = body(args, planned);
    let started = Instant::now();
    let mut result = RequestResult { model: planned.model.clone(), ..Default::default() };
    let response = match client.post(&url).json(&body).send().await {
        Ok(r) => r,
        Err(e) => {
            result.error = Some(e.to_string());
            return result;
        }
    };
    let status = response.status();
    if !status.is_success() {
        result.error = Some(format!("HTTP {status}: {}", response.text().await.unwrap_or_default()));
        return result;
    }
    if !args.stream {
        let value: Value = response.json().await.unwrap_or_default();
        result.generated_tokens = value["usage"]["completion_tokens"].as_u64().unwrap_or(0) as usize;
        result.e2e_ms = started.elapsed().as_secs_f64() * 1e3;
        result.ok = result.generated_tokens > 0;
        return result;
    }
    let mut stream = response.bytes_stream();
    let mut buffer = String::new();
    let mut last_token: Option<Instant> = None;
    let mut chunks = 0;
    let mut usage_tokens = None;
    while let Some(bytes) = stream.next().await {
        let Ok(bytes) = bytes else {
            result.error = Some("stream broken".into());
            return result;
        };
        buffer.push_str(&String::from_utf8_lossy(&bytes));
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            for line in event.lines() {
                let Some(data) = line.strip_prefix("data:").map(str::trim) else {
                    continue;
                };
                if data == "[DONE]" {
                    continue;
                }
                let Ok(chunk) = serde_json::from_str::<Value>(data) else {
                    continue;
                };
                if let Some(n) = chunk["usage"]["completion_tokens"].as_u64() {
                    usage_tokens = Some(n as usize);
                }
                let choice = &chunk["choices"][0];
                let text = choice["text"].as_str().or_else(|| choice["delta"]["content"].as_str()).unwrap_or_default();
                if text.is_empty() {
                    continue;
                }
                let now = Instant::now();
                match last_token {
                    None => result.ttft_ms = Some((now - started).as_secs_f64() * 1e3),
                    Some(prev) => result.itl_ms.push((now - prev).as_secs_f64() * 1e3),
                }
                last_token = Some(now);
                chunks += 1;
            }
        }
    }
    result.generated_tokens = usage_tokens.unwrap_or(chunks);
    result.e2e_ms = started.elapsed().as_secs_f64() * 1e3;
    result.ok = result.generated_tokens > 0;
    if !result.ok {
        result.error = Some("no tokens generated".into());
    }
    result
}

fn percentile(values: &mut [f64], p: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * (values.len() - 1) as f64).round() as usize;
    Some(values[rank.min(values.len() - 1)])
}

fn summarize(
    args: &BenchArgs,
    plan: &[Planned],
    results: &[RequestResult],
    wall: Duration,
    server: Option<server_metrics::AdapterActivity>,
    in_flight: usize,
) -> Summary {
    let ok: Vec<&RequestResult> = results.iter().filter(|r| r.ok).collect();
    let generated: usize = ok.iter().map(|r| r.generated_tokens).sum();
    let mut ttft: Vec<f64> = ok.iter().filter_map(|r| r.ttft_ms).collect();
    let mut itl: Vec<f64> = ok.iter().flat_map(|r| r.itl_ms.iter().copied()).collect();
    let mut e2e: Vec<f64> = ok.iter().map(|r| r.e2e_ms).collect();
    let mut errors: Vec<String> = results.iter().filter_map(|r| r.error.clone()).collect();
    errors.dedup();
    let within_slo = ok.iter().filter(|r| meets_slo(args, r)).count();
    let wall_s = wall.as_secs_f64().max(1e-9);
    Summary {
        requests_ok: ok.len(),
        requests_failed: results.len() - ok.len(),
        concurrency: (in_flight != Semaphore::MAX_PERMITS).then_some(in_flight),
        rate: args.rate,
        models: plan.iter().map(|p| &p.model).collect::<std::collections::BTreeSet<_>>().len(),
        prompt_tokens: plan.iter().map(|p| p.prompt_tokens).sum::<usize>() / plan.len().max(1),
        max_tokens: plan.iter().map(|p| p.max_tokens).sum::<usize>() / plan.len().max(1),
        wall_s,
        requests_per_s: ok.len() as f64 / wall_s,
        generated_tokens: generated,
        generated_tokens_per_s: generated as f64 / wall_s,
        ttft_ms_p50: percentile(&mut ttft, 50.0),
        ttft_ms_p95: percentile(&mut ttft, 95.0),
        ttft_ms_p99: percentile(&mut ttft, 99.0),
        itl_ms_p50: percentile(&mut itl, 50.0),
        itl_ms_p95: percentile(&mut itl, 95.0),
        itl_ms_p99: percentile(&mut itl, 99.0),
        e2e_ms_p50: percentile(&mut e2e, 50.0),
        slo_attainment: within_slo as f64 / results.len().max(1) as f64,
        server,
        errors,
    }
}

/// First token within --slo-ttft-ms (or, unstreamed, the whole reply), then
/// a mean gap within --slo-itl-ms.
fn meets_slo(args: &BenchArgs, r: &RequestResult) -> bool {
    let first = r.ttft_ms.unwrap_or(r.e2e_ms);
    let mean_gap = if r.itl_ms.is_empty() { 0.0 } else { r.itl_ms.iter().sum::<f64>() / r.itl_ms.len() as f64 };
    first <= args.slo_ttft_ms && mean_gap <= args.slo_itl_ms
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: BenchArgs,
    }

    /// `tailor bench` arguments as clap parses them.
    pub(super) fn parse(extra: &[&str]) -> BenchArgs {
        Wrapper::parse_from(["bench"].iter().chain(extra)).args
    }

    fn args(url: &str, remote: bool) -> BenchArgs {
        let mut argv = vec!["--url", url, "--model", "m"];
        if remote {
            argv.push("--allow-remote");
        }
        parse(&argv)
    }

    #[test]
    fn composed_requests_name_rotating_adapters_in_either_dialect() {
        let planned = |index| Planned {
            index,
            model: "base".into(),
            prompt_tokens: 4,
            max_tokens: 2,
            at: std::time::Duration::ZERO,
        };
        let tailor = parse(&["--model", "base", "--compose", "2", "--compose-adapters", "a,b,c"]);
        let (_, sent) = body(&tailor, &planned(2));
        assert_eq!(sent["model"], "base");
        assert_eq!(sent["adapters"], json!([{"name": "c", "weight": 0.5}, {"name": "a", "weight": 0.5}]));
        assert!(sent.get("lora").is_none());
        let llama = parse(&["--model", "base", "--compose", "2", "--compose-adapters", "a,b,c", "--llama-cpp-lora"]);
        let (_, sent) = body(&llama, &planned(1));
        assert_eq!(sent["lora"], json!([{"id": 1, "scale": 0.5}, {"id": 2, "scale": 0.5}]));
        assert!(sent.get("adapters").is_none());
    }

    #[test]
    fn only_loopback_unless_told() {
        assert!(check_url(&args("http://127.0.0.1:8080", false)).is_ok());
        assert!(check_url(&args("http://localhost:9000/", false)).is_ok());
        assert!(check_url(&args("http://[::1]:8080", false)).is_ok());
        assert!(check_url(&args("http://10.0.0.5:8080", false)).is_err());
        assert!(check_url(&args("http://example.com", false)).is_err());
        assert!(check_url(&args("http://10.0.0.5:8080", true)).is_ok());
    }

    #[test]
    fn percentiles_pick_ranks() {
        let mut v = vec![5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(percentile(&mut v, 50.0), Some(3.0));
        assert_eq!(percentile(&mut v, 95.0), Some(5.0));
        assert_eq!(percentile(&mut [], 50.0), None);
    }
}
