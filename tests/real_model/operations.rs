//! Running tailor in production: keys, content types, CORS, metrics that a
//! gateway reads, fault containment, a responsive event loop, draining on
//! shutdown, stalled readers, queue accounting, request ids.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};

use crate::common::{scrape, start_server, start_server_with_shutdown, value, Family, Served, TestResult, MODEL_ID};

type Error = Box<dyn std::error::Error>;

async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    auth: Option<&str>,
    body: Option<Value>,
) -> Result<(u16, reqwest::header::HeaderMap, String), Error> {
    let client = reqwest::Client::new();
    let url = format!("http://{addr}{path}");
    let mut request = match method {
        "GET" => client.get(url),
        _ => client.post(url),
    };
    if let Some(auth) = auth {
        request = request.header("authorization", auth);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await?;
    let (status, headers) = (response.status().as_u16(), response.headers().clone());
    Ok((status, headers, response.text().await?))
}

fn error_code(body: &str) -> Option<String> {
    let value: Value = serde_json::from_str(body).ok()?;
    value["error"]["code"].as_str().map(str::to_string)
}

#[tokio::test]
async fn api_keys_guard_every_route_but_health_and_metrics() -> TestResult {
    let addr = start_server(&[
        "--api-key",
        "k-user",
        "--api-key",
        "k-two",
        "--admin-api-key",
        "k-admin",
        "--enable-lora-loading",
    ]);
    let tiny = json!({"model": MODEL_ID, "prompt": "Hi", "max_tokens": 1});
    let routes: Vec<(&str, String, Option<Value>, bool)> = vec![
        ("GET", "/v1/models".into(), None, false),
        ("GET", format!("/v1/models/{MODEL_ID}"), None, false),
        ("POST", "/v1/completions".into(), Some(tiny.clone()), false),
        (
            "POST",
            "/v1/chat/completions".into(),
            Some(json!({"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1})),
            false,
        ),
        (
            "POST",
            "/v1/responses".into(),
            Some(json!({"model": MODEL_ID, "input": "Hi", "max_output_tokens": 1})),
            false,
        ),
        ("POST", "/tokenize".into(), Some(json!({"prompt": "Hi"})), false),
        ("POST", "/detokenize".into(), Some(json!({"tokens": [19556]})), false),
        ("GET", "/v1/templates".into(), None, false),
        ("POST", "/v1/templates/none/render".into(), Some(json!({})), false),
        ("POST", "/v1/templates/reload".into(), None, true),
        ("POST", "/v1/load_lora_adapter".into(), Some(json!({"lora_name": "x", "lora_path": "/nowhere"})), true),
        ("POST", "/v1/unload_lora_adapter".into(), Some(json!({"lora_name": "x"})), true),
        ("GET", "/no/such/route".into(), None, false),
    ];
    for (method, path, body, admin) in &routes {
        let (s, headers, text) = send(addr, method, path, None, body.clone()).await?;
        assert_eq!(s, 401, "{method} {path} without a key: {text}");
        assert_eq!(error_code(&text).as_deref(), Some("invalid_api_key"), "{path}: {text}");
        assert_eq!(headers.get("www-authenticate").and_then(|v| v.to_str().ok()), Some("Bearer"));
        let (s, _, text) = send(addr, method, path, Some("Bearer k-wrong"), body.clone()).await?;
        assert_eq!(s, 401, "{method} {path} with a wrong key: {text}");
        let (s, _, text) = send(addr, method, path, Some("Basic k-user"), body.clone()).await?;
        assert_eq!(s, 401, "{method} {path} with another scheme: {text}");
        // The scheme is case-insensitive; the plain key opens all but admin routes.
        let (s, _, text) = send(addr, method, path, Some("bearer k-two"), body.clone()).await?;
        if *admin {
            assert_eq!(s, 403, "{method} {path} with the plain key: {text}");
            assert_eq!(error_code(&text).as_deref(), Some("admin_key_required"));
        } else {
            assert!(s != 401 && s != 403, "{method} {path} with the plain key: {s} {text}");
        }
        let (s, _, text) = send(addr, method, path, Some("BEARER k-admin"), body.clone()).await?;
        assert!(s != 401 && s != 403, "{method} {path} with the admin key: {s} {text}");
    }
    // The playground's own files are open; the page asks for the key.
    for path in ["/health", "/metrics", "/", "/playground/app.js", "/playground/style.css"] {
        assert_eq!(send(addr, "GET", path, None, None).await?.0, 200, "{path} is open");
    }
    Ok(())
}

#[tokio::test]
async fn admin_routes_need_an_admin_key_once_any_key_is_set() -> TestResult {
    let addr = start_server(&["--api-key", "k-user", "--enable-lora-loading"]);
    let load = json!({"lora_name": "x", "lora_path": "/nowhere"});
    for (method, path, body) in [
        ("POST", "/v1/load_lora_adapter", Some(load)),
        ("POST", "/v1/templates/reload", None),
        ("GET", "/v1/files", None),
        ("GET", "/v1/fine_tuning/jobs", None),
    ] {
        for auth in [Some("Bearer k-user"), None] {
            let (s, _, text) = send(addr, method, path, auth, body.clone()).await?;
            assert_eq!(s, 403, "{method} {path} ({auth:?}) with no admin key configured: {text}");
            assert_eq!(error_code(&text).as_deref(), Some("admin_key_required"));
            assert!(text.contains("--admin-api-key"), "{text}");
        }
    }
    let (s, _, text) = send(addr, "GET", "/v1/models", Some("Bearer k-user"), None).await?;
    assert_eq!(s, 200, "{text}");
    Ok(())
}

#[tokio::test]
async fn requests_for_other_hosts_and_cross_origin_posts_are_refused() -> TestResult {
    let addr = start_server(&[]);
    let client = reqwest::Client::new();
    let models = format!("http://{addr}/v1/models");
    let rebound = client.get(&models).header("host", "rebind.attacker.example").send().await?;
    assert_eq!(rebound.status(), 403);
    assert_eq!(error_code(&rebound.text().await?).as_deref(), Some("host_not_allowed"));
    for host in [format!("localhost:{}", addr.port()), addr.to_string()] {
        assert_eq!(client.get(&models).header("host", &host).send().await?.status(), 200, "{host}");
    }
    // A page elsewhere posting a form (no preflight for multipart) is refused;
    // the server's own pages (the playground) are not.
    let form = "--b\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n--b--\r\n";
    let files = format!("http://{addr}/v1/files");
    let post = |origin: String| {
        client
            .post(&files)
            .header("origin", origin)
            .header("content-type", "multipart/form-data; boundary=b")
            .body(form)
            .send()
    };
    let cross = post("https://evil.example".into()).await?;
    assert_eq!(cross.status(), 403);
    assert_eq!(error_code(&cross.text().await?).as_deref(), Some("origin_not_allowed"));
    let same = post(format!("http://{addr}")).await?;
    assert_eq!(same.status(), 400, "the server's own origin reaches the route (which wants a file)");

    let named = start_server(&["--allowed-hosts", "api.example.com"]);
    let models = format!("http://{named}/v1/models");
    assert_eq!(client.get(&models).header("host", "api.example.com").send().await?.status(), 200);
    assert_eq!(client.get(&models).header("host", "localhost").send().await?.status(), 403);
    Ok(())
}

#[tokio::test]
async fn json_routes_take_only_json_within_the_body_limit_and_cors_is_opt_in() -> TestResult {
    let addr = start_server(&["--max-body-bytes", "4096"]);
    let url = format!("http://{addr}/v1/completions");
    let body = json!({"model": MODEL_ID, "prompt": "Hi", "max_tokens": 1}).to_string();
    let client = reqwest::Client::new();
    for content_type in [Some("text/plain"), Some("application/x-www-form-urlencoded"), None] {
        let mut request = client.post(&url).body(body.clone());
        if let Some(t) = content_type {
            request = request.header("content-type", t);
        }
        let response = request.send().await?;
        assert_eq!(response.status(), 415, "{content_type:?}");
        assert_eq!(error_code(&response.text().await?).as_deref(), Some("unsupported_media_type"));
    }
    let ok = client.post(&url).header("content-type", "application/json; charset=utf-8").body(body).send().await?;
    assert_eq!(ok.status(), 200);
    let big = json!({"model": MODEL_ID, "prompt": "x".repeat(5000)});
    let response = client.post(&url).json(&big).send().await?;
    assert_eq!(response.status(), 413);
    assert_eq!(error_code(&response.text().await?).as_deref(), Some("request_too_large"));

    // No CORS unless origins are listed: a browser page elsewhere gets no grant.
    let preflight = |addr: SocketAddr, origin: &'static str| {
        client
            .request(reqwest::Method::OPTIONS, format!("http://{addr}/v1/completions"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "content-type,authorization")
            .send()
    };
    let response = preflight(addr, "https://app.example").await?;
    assert!(response.headers().get("access-control-allow-origin").is_none());
    let listed = start_server(&["--allowed-origins", "https://app.example"]);
    let response = preflight(listed, "https://app.example").await?;
    assert_eq!(
        response.headers().get("access-control-allow-origin").and_then(|v| v.to_str().ok()),
        Some("https://app.example")
    );
    let response = preflight(listed, "https://evil.example").await?;
    assert!(response.headers().get("access-control-allow-origin").is_none());
    Ok(())
}

fn family<'a>(families: &'a [Family], name: &str) -> &'a Family {
    families.iter().find(|f| f.name == name).unwrap_or_else(|| panic!("no family {name}"))
}

#[tokio::test]
async fn metrics_use_vllm_names_and_count_exactly_what_was_served() -> TestResult {
    let addr = start_server(&[]);
    let model = [("model_name", MODEL_ID)];
    let before = scrape(addr).await?;
    let client = reqwest::Client::new();
    let (mut prompt_tokens, mut completion_tokens, mut requests) = (0.0, 0.0, 0.0);
    for (i, model_id) in [MODEL_ID, MODEL_ID, "pirate"].iter().enumerate() {
        let reply: Value = client
            .post(format!("http://{addr}/v1/completions"))
            .header("x-request-id", format!("metrics-{i}"))
            .json(&json!({"model": model_id, "prompt": format!("Count to {i}:"), "max_tokens": 6 + i, "ignore_eos": true}))
            .send()
            .await?
            .json()
            .await?;
        prompt_tokens += reply["usage"]["prompt_tokens"].as_f64().ok_or("usage")?;
        completion_tokens += reply["usage"]["completion_tokens"].as_f64().ok_or("usage")?;
        requests += 1.0;
    }
    let after = scrape(addr).await?;
    let delta = |sample: &str, labels: &[(&str, &str)]| value(&after, sample, labels) - value(&before, sample, labels);
    assert_eq!(delta("vllm:prompt_tokens_total", &model), prompt_tokens);
    assert_eq!(delta("vllm:generation_tokens_total", &model), completion_tokens);
    assert_eq!(
        delta("vllm:request_success_total", &[("model_name", MODEL_ID), ("finished_reason", "length")]),
        requests
    );
    for histogram in
        ["vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds", "vllm:request_queue_time_seconds"]
    {
        assert_eq!(delta(&format!("{histogram}_count"), &model), requests, "{histogram}");
    }
    assert_eq!(delta("vllm:inter_token_latency_seconds_count", &model), completion_tokens - requests);
    let by_model =
        |m: &str| delta("tailor_requests_total", &[("model", m), ("status", "200"), ("model_name", MODEL_ID)]);
    assert_eq!(by_model(MODEL_ID), 2.0);
    assert_eq!(delta("tailor_requests_total", &[("model", "pirate"), ("adapter", "pirate"), ("status", "200")]), 1.0);
    assert_eq!(delta("tailor_generation_tokens_total", &[("model", "pirate")]), 8.0);

    let kinds = [
        ("vllm:num_requests_running", "gauge"),
        ("vllm:num_requests_waiting", "gauge"),
        ("vllm:kv_cache_usage_perc", "gauge"),
        ("vllm:lora_requests_info", "gauge"),
        ("vllm:prompt_tokens", "counter"),
        ("vllm:generation_tokens", "counter"),
        ("vllm:request_success", "counter"),
        ("vllm:time_to_first_token_seconds", "histogram"),
        ("vllm:inter_token_latency_seconds", "histogram"),
        ("vllm:e2e_request_latency_seconds", "histogram"),
        ("vllm:request_queue_time_seconds", "histogram"),
        ("tailor_requests", "counter"),
        ("tailor_adapters_resident", "gauge"),
        ("tailor_adapter_loads", "counter"),
        ("tailor_engine_step_seconds", "histogram"),
        ("tailor_engine_batch_size", "histogram"),
    ];
    for (name, kind) in kinds {
        let f = family(&after, name);
        assert_eq!(f.kind, kind, "{name}");
        assert!(f.samples.iter().all(|(_, labels, _)| labels.get("model_name").map(String::as_str) == Some(MODEL_ID)));
    }
    // vLLM's TTFT buckets, exactly.
    let ttft_bounds: Vec<&str> = family(&after, "vllm:time_to_first_token_seconds")
        .samples
        .iter()
        .filter_map(|(_, labels, _)| labels.get("le").map(String::as_str))
        .collect();
    assert_eq!(ttft_bounds.first(), Some(&"0.001"));
    assert_eq!(ttft_bounds.len(), 23, "{ttft_bounds:?}");

    // While a stream runs on an adapter, the gateway sees it.
    let response = client
        .post(format!("http://{addr}/v1/completions"))
        .json(&json!({"model": "pirate", "prompt": "Tell me a story", "max_tokens": 400, "ignore_eos": true, "stream": true}))
        .send()
        .await?;
    let mut body = response.bytes_stream();
    body.next().await.ok_or("first chunk")??;
    let during = scrape(addr).await?;
    let info = &family(&during, "vllm:lora_requests_info").samples;
    assert_eq!(info.len(), 1, "{info:?}");
    let (_, labels, updated) = &info[0];
    assert_eq!(labels.get("running_lora_adapters").map(String::as_str), Some("pirate"));
    assert_eq!(labels.get("waiting_lora_adapters").map(String::as_str), Some(""));
    assert_eq!(labels.get("max_lora").map(String::as_str), Some("8"));
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs_f64();
    assert!((now - updated).abs() < 60.0, "value is the update time: {updated}");
    assert_eq!(value(&during, "vllm:num_requests_running", &model), 1.0);
    let usage = value(&during, "vllm:kv_cache_usage_perc", &model);
    assert!(usage > 0.0 && usage <= 1.0, "{usage}");
    while body.next().await.is_some() {}
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let idle = scrape(addr).await?;
        if value(&idle, "vllm:num_requests_running", &model) == 0.0 {
            assert_eq!(value(&idle, "vllm:kv_cache_usage_perc", &model), 0.0);
            break;
        }
        assert!(Instant::now() < deadline, "the stream never left the running set");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// A token id no other test's prompt starts with.
const FAULT_TOKEN: &str = "49000";

#[tokio::test]
async fn a_panicking_step_fails_its_request_and_the_server_serves_on() -> TestResult {
    let addr = start_server(&["--fault-step-panic-token", FAULT_TOKEN]);
    let doomed = json!({"model": MODEL_ID, "prompt": [49000, 28, 29], "max_tokens": 4});
    let (s, _, text) = send(addr, "POST", "/v1/completions", None, Some(doomed.clone())).await?;
    assert_eq!(s, 500, "{text}");
    let error: Value = serde_json::from_str(&text)?;
    assert_eq!(error["error"]["type"], "server_error");
    let mut streamed = doomed;
    streamed["stream"] = json!(true);
    let (s, _, text) = send(addr, "POST", "/v1/completions", None, Some(streamed)).await?;
    assert_eq!(s, 200);
    let events: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{text}");
    let last: Value = serde_json::from_str(events[events.len() - 2])?;
    assert_eq!(last["error"]["type"], "server_error", "an error event before [DONE]: {text}");
    let next = json!({"model": MODEL_ID, "prompt": "Hello", "max_tokens": 4});
    assert_eq!(send(addr, "POST", "/v1/completions", None, Some(next)).await?.0, 200);
    assert_eq!(send(addr, "GET", "/health", None, None).await?.0, 200);
    let metrics = scrape(addr).await?;
    assert_eq!(value(&metrics, "tailor_engine_panics_total", &[]), 2.0);
    let failed = value(&metrics, "tailor_requests_total", &[("status", "500")]);
    assert_eq!(failed, 2.0, "the streamed failure is logged and counted as a 500 too");
    Ok(())
}

#[tokio::test]
async fn shutdown_drains_running_streams_then_ends_the_rest_with_an_error() -> TestResult {
    let (addr, trigger, done) = start_server_with_shutdown(&["--shutdown-timeout", "3"]);
    let client = reqwest::Client::new();
    let short = client
        .post(format!("http://{addr}/v1/completions"))
        .json(&json!({"model": MODEL_ID, "prompt": "One", "max_tokens": 30, "ignore_eos": true, "stream": true}))
        .send()
        .await?;
    let long = client
        .post(format!("http://{addr}/v1/completions"))
        .json(&json!({"model": MODEL_ID, "prompt": "Two", "max_tokens": 4000, "ignore_eos": true, "stream": true}))
        .send()
        .await?;
    let mut short = short.bytes_stream();
    let mut long = long.bytes_stream();
    short.next().await.ok_or("short starts")??;
    long.next().await.ok_or("long starts")??;
    trigger.send(()).map_err(|_| "server gone")?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (s, _, text) = send(addr, "GET", "/health", None, None).await?;
    assert_eq!((s, text.as_str()), (503, r#"{"status":"draining"}"#));
    let (s, _, text) = send(addr, "GET", "/v1/models", None, None).await?;
    assert_eq!((s, error_code(&text).as_deref()), (503, Some("shutting_down")));
    let short = read_all(&mut short).await?;
    assert!(short.trim_end().ends_with("data: [DONE]"), "{short}");
    assert!(!short.contains("\"error\""), "the short stream finished within the timeout: {short}");
    let long = read_all(&mut long).await?;
    let events: Vec<&str> = long.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert_eq!(events.last(), Some(&"[DONE]"));
    assert_eq!(error_code(events[events.len() - 2]).as_deref(), Some("shutting_down"), "{long}");
    let result = done.recv_timeout(Duration::from_secs(20))?;
    assert!(result.is_ok(), "{result:?}");
    Ok(())
}

async fn read_all<B: AsRef<[u8]>>(
    body: &mut (impl futures::Stream<Item = reqwest::Result<B>> + Unpin),
) -> Result<String, Error> {
    let mut text = String::new();
    while let Some(chunk) = body.next().await {
        text.push_str(&String::from_utf8_lossy(chunk?.as_ref()));
    }
    Ok(text)
}

#[tokio::test]
async fn sigterm_finishes_running_streams_then_exits_zero_with_one_log_line_per_request() -> TestResult {
    let mut served = Served::start(&[])?;
    let addr = served.addr;
    let response = reqwest::Client::new()
        .post(format!("http://{addr}/v1/completions"))
        .header("x-request-id", "drain-me-1")
        .json(&json!({"model": MODEL_ID, "prompt": "Once", "max_tokens": 40, "ignore_eos": true, "stream": true}))
        .send()
        .await?;
    let mut body = response.bytes_stream();
    body.next().await.ok_or("stream starts")??;
    served.signal("TERM")?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (s, _, text) = send(addr, "GET", "/health", None, None).await?;
    assert_eq!(s, 503, "{text}");
    let rest = read_all(&mut body).await?;
    assert!(rest.trim_end().ends_with("data: [DONE]") && !rest.contains("\"error\""), "{rest}");
    let status = served.exit(Duration::from_secs(30))?;
    assert!(status.success(), "{status:?}: {}", served.logs());
    let logs = served.logs();
    let line = logs.lines().find(|l| l.contains("request finished") && l.contains("drain-me-1"));
    let line = line.unwrap_or_else(|| panic!("no log line for the request: {logs}"));
    for field in ["completion_tokens=40", "finish_reason=length", "status=200", "ttft_ms="] {
        assert!(line.contains(field), "{field} in {line}");
    }
    Ok(())
}

#[tokio::test]
async fn a_dead_engine_fails_health_and_exits_non_zero() -> TestResult {
    let mut served = Served::start(&["--fault-engine-panic-token", FAULT_TOKEN])?;
    let addr = served.addr;
    let doomed = json!({"model": MODEL_ID, "prompt": [49000, 1], "max_tokens": 2});
    let _ = send(addr, "POST", "/v1/completions", None, Some(doomed)).await;
    let status = served.exit(Duration::from_secs(30))?;
    assert!(!status.success(), "{status:?}");
    assert!(send(addr, "GET", "/health", None, None).await.map(|r| r.0 != 200).unwrap_or(true));
    assert!(served.logs().contains("the engine panicked"), "{}", served.logs());
    Ok(())
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cancelled() -> TestResult {
    use tokio::io::AsyncWriteExt;
    let addr = start_server(&["--stream-write-timeout", "1"]);
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(4096)?;
    let mut stream = socket.connect(addr).await?;
    // Eight sequences in one stream fill the socket's buffers quickly.
    let body = json!({"model": MODEL_ID, "prompt": ["a", "b", "c", "d", "e", "f", "g", "h"], "max_tokens": 7000,
        "ignore_eos": true, "stream": true})
    .to_string();
    let request = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await?;
    // Never read. The server must notice and free the sequences.
    let model = [("model_name", MODEL_ID)];
    let started = Instant::now();
    let mut seen_running = false;
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let metrics = scrape(addr).await?;
        let running = value(&metrics, "vllm:num_requests_running", &model);
        seen_running |= running > 0.0;
        if seen_running && running == 0.0 {
            assert_eq!(value(&metrics, "vllm:request_success_total", &model), 0.0, "they ran to the end instead");
            assert!(value(&metrics, "vllm:generation_tokens_total", &model) < 8.0 * 7000.0);
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(240), "the stalled stream was never cancelled");
    }
    drop(stream);
    Ok(())
}

#[tokio::test]
async fn too_many_prompts_are_a_400_and_leave_the_line_free() -> TestResult {
    let addr = start_server(&["--max-waiting", "64"]);
    let prompts: Vec<String> = (0..65).map(|i| format!("p{i}")).collect();
    let many = json!({"model": MODEL_ID, "prompt": prompts, "max_tokens": 1});
    let (s, headers, text) = send(addr, "POST", "/v1/completions", None, Some(many)).await?;
    assert_eq!(s, 400, "{text}");
    assert!(headers.get("retry-after").is_none());
    let one = json!({"model": MODEL_ID, "prompt": "Hi", "max_tokens": 1});
    let (s, _, text) = send(addr, "POST", "/v1/completions", None, Some(one)).await?;
    assert_eq!(s, 200, "admitted at once: {text}");
    Ok(())
}

#[tokio::test]
async fn request_ids_are_echoed_or_made() -> TestResult {
    let addr = crate::common::server();
    let response = reqwest::Client::new()
        .get(format!("http://{addr}/v1/models"))
        .header("x-request-id", "trace-42")
        .send()
        .await?;
    assert_eq!(response.headers().get("x-request-id").and_then(|v| v.to_str().ok()), Some("trace-42"));
    let response = reqwest::get(format!("http://{addr}/v1/models")).await?;
    let made = response.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("");
    assert_eq!(made.len(), 36, "a UUID: {made}");
    Ok(())
}

#[tokio::test]
async fn concurrent_requests_for_an_evicted_adapter_read_it_once() -> TestResult {
    // Three adapters in the folder, one resident at a time: json and pirate
    // were evicted at start, shout (registered last) stays.
    let addr = start_server(&["--max-loaded-adapters", "1"]);
    let before = scrape(addr).await?;
    assert_eq!(value(&before, "tailor_adapters_resident", &[]), 1.0);
    let loads = value(&before, "tailor_adapter_loads_total", &[]);
    let requests = (0..4).map(|i| {
        let body = json!({"model": "json", "prompt": format!("Item {i}:"), "max_tokens": 2});
        send(addr, "POST", "/v1/completions", None, Some(body))
    });
    for reply in futures::future::join_all(requests).await {
        let (s, _, text) = reply?;
        assert_eq!(s, 200, "{text}");
    }
    let after = scrape(addr).await?;
    assert_eq!(value(&after, "tailor_adapter_loads_total", &[]) - loads, 1.0, "four requests, one read");
    assert_eq!(value(&after, "tailor_adapters_resident", &[]), 1.0);
    Ok(())
}
