//! The engine and its scheduler on a tiny random model (fast, no download):
//! batching and chunked prefill give exactly what one-at-a-time gives,
//! cancellation frees the sequence, the queue bound and the KV budget hold.

use std::time::{Duration, Instant};

use tailor::engine::faults::Faults;
use tailor::engine::{
    EngineConfig, EngineHandle, EngineStatus, Event, EventStream, FinishReason, GenerationRequest, RequestTags,
    SamplingParams, SubmitError,
};
use tailor::loader::{Loaded, ModelInfo};
use tailor::lora::{AdapterRegistry, BaseShapes, RegistryOptions};
use tailor::model::random::RandomSource;
use tailor::model::{Llama, ModelFormat, WeightMode};
use tailor::tokenizer::Tokenizer;

fn tiny_model() -> Result<Loaded, String> {
    let config = RandomSource::tiny_config(257);
    let model = Llama::load(&mut RandomSource::new(config.clone(), 7)).map_err(|e| e.to_string())?;
    let info = ModelInfo {
        id: "tiny".into(),
        tokenizer: Tokenizer::bytes().map_err(|e| e.to_string())?,
        chat_template: None,
        eos_token_ids: vec![256],
        max_model_len: config.max_position_embeddings,
        config: config.clone(),
        embedding_rows: config.vocab_size,
        format: ModelFormat::Gguf,
        mode: WeightMode::Quantized,
        adapters: AdapterRegistry::new(
            BaseShapes::of(&config),
            RegistryOptions { max_rank: 64, ..Default::default() },
            "tiny",
        )
        .into(),
        fingerprint: String::new(),
        grammars: Default::default(),
    };
    Ok(Loaded { model, info })
}

async fn engine(config: EngineConfig) -> EngineHandle {
    let handle = EngineHandle::start_with(tiny_model, config);
    handle.wait_ready().await;
    handle
}

fn request(prompt: Vec<u32>, max_tokens: usize) -> GenerationRequest {
    GenerationRequest {
        prompt,
        adapter: None,
        sampling: SamplingParams { temperature: 0.0, ..Default::default() },
        max_tokens,
        stop: Vec::new(),
        ignore_eos: true,
        prompt_logprobs: None,
        skip_special_tokens: true,
        tags: RequestTags { model: "tiny".into(), adapters: Vec::new() },
        constraint: None,
        span: tracing::Span::none(),
        cache_partition: 0,
    }
}

/// All text of one request, and how it finished.
async fn collect(mut rx: EventStream) -> (String, Option<FinishReason>, usize) {
    let mut text = String::new();
    while let Some(event) = rx.recv().await {
        match event {
            Event::Text(t) => text.push_str(&t),
            Event::Logprob(_) | Event::PromptLogprobs(_) => {}
            Event::Finished { reason, usage, .. } => return (text, Some(reason), usage.completion_tokens),
            Event::Failed(e) => panic!("generation failed: {e}"),
        }
    }
    (text, None, 0)
}

fn prompts() -> Vec<Vec<u32>> {
    [3usize, 40, 7, 90, 1, 25]
        .iter()
        .enumerate()
        .map(|(i, &n)| (0..n as u32).map(|k| (k * 31 + i as u32 * 7) % 256).collect())
        .collect()
}

async fn wait_for(handle: &EngineHandle, what: &str, check: impl Fn(&tailor::engine::EngineStats) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check(&handle.stats()) {
        assert!(Instant::now() < deadline, "timed out waiting for {what}: {:?}", handle.stats());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn batched_and_chunked_equal_one_at_a_time() {
    let single = engine(EngineConfig { max_num_seqs: 1, max_batch_tokens: 4096, ..Default::default() }).await;
    let mut alone = Vec::new();
    for prompt in prompts() {
        let rx = single.submit(request(prompt, 24)).expect("queued");
        alone.push(collect(rx).await);
    }
    // All at once, with a step budget of 7 tokens: prompts are prefilled in
    // chunks while the others decode.
    let batched = engine(EngineConfig { max_num_seqs: 8, max_batch_tokens: 7, ..Default::default() }).await;
    let receivers: Vec<_> = prompts().into_iter().map(|p| batched.submit(request(p, 24)).expect("queued")).collect();
    let together = futures::future::join_all(receivers.into_iter().map(collect)).await;
    assert_eq!(together, alone);
    assert!(alone.iter().all(|(_, reason, n)| *reason == Some(FinishReason::Length) && *n == 24));
    let distinct: std::collections::HashSet<&String> = alone.iter().map(|(text, ..)| text).collect();
    assert!(distinct.len() > 1 && alone.iter().all(|(text, ..)| !text.is_empty()), "{alone:?}");
}

/// A counter's value in the engine's metrics (0 when never touched).
fn counter(config: &EngineConfig, family: &str, labels: &[&str]) -> u64 {
    let metrics = &config.metrics;
    let vec = match family {
        "generation_tokens" => &metrics.generation_tokens,
        "request_success" => &metrics.request_success,
        "engine_panics" => &metrics.engine_panics,
        other => panic!("unknown family {other}"),
    };
    vec.get_metric_with_label_values(labels).map(|c| c.get()).unwrap_or(0)
}

#[tokio::test]
async fn a_dropped_client_frees_its_sequence() {
    let config = EngineConfig::default();
    let handle = engine(config.clone()).await;
    // 1000 tokens take the tiny model far longer than noticing the drop does.
    let mut rx = handle.submit(request(vec![1, 2, 3], 1000)).expect("queued");
    rx.recv().await.expect("first event");
    wait_for(&handle, "the sequence to run", |s| s.running == 1 && s.kv_tokens > 0).await;
    drop(rx);
    wait_for(&handle, "the sequence to be freed", |s| s.running == 0 && s.kv_tokens == 0).await;
    let generated = counter(&config, "generation_tokens", &["tiny"]);
    assert!(generated < 200, "the sequence ran on after its client left: {generated} tokens");
    assert_eq!(counter(&config, "request_success", &["tiny", "length"]), 0, "it finished instead of being cancelled");
}

#[tokio::test]
async fn a_client_leaving_the_line_frees_its_place_at_once() {
    let handle = engine(EngineConfig { max_num_seqs: 1, max_waiting: 1, ..Default::default() }).await;
    let _running = handle.submit(request(vec![5; 4], 1000)).expect("runs");
    wait_for(&handle, "A to run", |s| s.running == 1).await;
    let waiting = handle.submit(request(vec![6; 4], 4)).expect("waits");
    assert_eq!(handle.submit(request(vec![7; 4], 4)).err(), Some(SubmitError::Overloaded(1)));
    drop(waiting);
    // No engine step in between: the place is free the moment B leaves.
    let _next = handle.submit(request(vec![7; 4], 4)).expect("the freed place is taken at once");
}

#[tokio::test]
async fn more_prompts_than_may_wait_are_refused_whole_and_leave_no_trace() {
    let handle = engine(EngineConfig { max_num_seqs: 1, max_waiting: 64, ..Default::default() }).await;
    let occupant = handle.submit(request(vec![9; 4], 1000)).expect("runs");
    wait_for(&handle, "the occupant to run", |s| s.running == 1).await;
    let many: Vec<_> = (0..65).map(|i| request(vec![i as u32 % 256; 3], 4)).collect();
    assert_eq!(handle.submit_all(many).err(), Some(SubmitError::TooMany { asked: 65, max: 64 }));
    let full: Vec<_> = (0..64).map(|i| request(vec![i as u32 % 256; 3], 2)).collect();
    let streams = handle.submit_all(full).expect("64 fit right after the refusal");
    assert_eq!(handle.submit(request(vec![1], 1)).err(), Some(SubmitError::Overloaded(64)));
    drop(occupant);
    let outputs = futures::future::join_all(streams.into_iter().map(collect)).await;
    assert!(outputs.iter().all(|(_, reason, n)| *reason == Some(FinishReason::Length) && *n == 2));
}

#[tokio::test]
async fn a_panicking_step_ends_its_sequences_and_the_engine_serves_on() {
    let config =
        EngineConfig { faults: Faults { step_panic_token: Some(255), ..Default::default() }, ..Default::default() };
    let handle = engine(config.clone()).await;
    let mut doomed = handle.submit(request(vec![255, 1, 2], 50)).expect("queued");
    let failure = loop {
        match doomed.recv().await {
            Some(Event::Failed(message)) => break message,
            Some(Event::Text(_)) => continue,
            other => panic!("expected a failure, got {other:?}"),
        }
    };
    assert!(failure.contains("internal error"), "{failure}");
    assert_eq!(counter(&config, "engine_panics", &["tiny"]), 1);
    let next = handle.submit(request(vec![1, 2, 3], 8)).expect("the engine takes the next request");
    assert_eq!(collect(next).await.1, Some(FinishReason::Length));
    assert!(matches!(handle.status(), EngineStatus::Ready(_)));
}

#[tokio::test]
async fn a_panic_outside_a_step_stops_the_engine_for_good() {
    let config =
        EngineConfig { faults: Faults { engine_panic_token: Some(254), ..Default::default() }, ..Default::default() };
    let handle = engine(config).await;
    let doomed = handle.submit(request(vec![254, 1], 4)).expect("queued");
    let reason = tokio::time::timeout(Duration::from_secs(20), handle.wait_stopped()).await.expect("engine stops");
    assert!(reason.contains("injected fault"), "{reason}");
    assert!(matches!(handle.status(), EngineStatus::Failed(_)));
    assert_eq!(collect(doomed).await.1, None, "its stream ends without a finish");
    assert_eq!(handle.submit(request(vec![1], 1)).err(), Some(SubmitError::Stopped));
}

#[tokio::test]
async fn the_waiting_queue_is_bounded() {
    let handle = engine(EngineConfig { max_num_seqs: 1, max_waiting: 2, ..Default::default() }).await;
    let _a = handle.submit(request(vec![5; 4], 900)).expect("runs");
    wait_for(&handle, "A to run", |s| s.running == 1).await;
    let _b = handle.submit(request(vec![6; 4], 4)).expect("waits");
    let _c = handle.submit(request(vec![7; 4], 4)).expect("waits");
    // Let the engine run steps meanwhile: waiting requests keep their places.
    let steps = handle.stats().steps;
    wait_for(&handle, "a few more steps", |s| s.steps > steps + 3).await;
    assert_eq!(handle.stats().waiting, 2);
    assert_eq!(handle.submit(request(vec![8; 4], 4)).err(), Some(SubmitError::Overloaded(2)));
}

#[tokio::test]
async fn the_kv_budget_makes_requests_wait_their_turn() {
    // Each request reserves 10 + 400 tokens; 600 fit one at a time.
    const BUDGET: usize = 600;
    let handle = engine(EngineConfig { max_num_seqs: 8, max_kv_tokens: BUDGET, ..Default::default() }).await;
    // The watcher samples continuously (yielding, not sleeping: tokio's
    // timer has a 1 ms resolution, about what 100 steps of the tiny model
    // take) from before the first submission until both are done.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (handle, done) = (handle.clone(), done.clone());
        tokio::spawn(async move {
            let mut seen = Vec::new();
            while !done.load(std::sync::atomic::Ordering::Acquire) {
                seen.push(handle.stats());
                tokio::task::yield_now().await;
            }
            seen
        })
    };
    let a_rx = handle.submit(request(vec![1; 10], 400)).expect("queued");
    let b_rx = handle.submit(request(vec![2; 10], 400)).expect("queued");
    let (a_out, b_out) = tokio::join!(collect(a_rx), collect(b_rx));
    done.store(true, std::sync::atomic::Ordering::Release);
    let stats = watcher.await.expect("watcher");
    assert_eq!(a_out.2, 400);
    assert_eq!(b_out.2, 400);
    assert!(stats.iter().any(|s| s.running == 1 && s.waiting == 1), "never saw one running while one waited");
    assert!(
        stats.iter().all(|s| s.running <= 1 && s.reserved_tokens <= BUDGET),
        "budget exceeded: {:?}",
        stats.iter().max_by_key(|s| s.reserved_tokens)
    );
}

#[tokio::test]
async fn choices_of_one_prompt_prefill_it_once_and_match_a_lone_run() {
    // No prefix cache: the lone run would leave the prompt cached.
    let config = EngineConfig { max_num_seqs: 8, max_batch_tokens: 16, prefix_cache_tokens: 0, ..Default::default() };
    let handle = engine(config.clone()).await;
    let processed = || {
        config.metrics.batch_tokens.get_metric_with_label_values(&["tiny"]).map(|h| h.get_sample_sum()).unwrap_or(0.0)
    };
    let prompt: Vec<u32> = (0..60u32).map(|k| k * 13 % 256).collect();
    let alone = collect(handle.submit(request(prompt.clone(), 12)).expect("queued")).await;
    let before = processed();
    let siblings: Vec<GenerationRequest> = (0..3).map(|_| request(prompt.clone(), 12)).collect();
    let streams = handle.submit_all(siblings).expect("queued");
    let outputs = futures::future::join_all(streams.into_iter().map(collect)).await;
    assert!(outputs.iter().all(|o| *o == alone), "{outputs:?} vs {alone:?}");
    // The prompt once (60), each other choice its last prompt token (2),
    // then 11 decode steps each: not three prefills (213).
    assert_eq!(processed() - before, (60 + 2 + 3 * 11) as f64, "a step's tokens are counted before its events go out");
}

/// Tokens the engine has run through the model so far.
fn processed(config: &EngineConfig) -> f64 {
    config.metrics.batch_tokens.get_metric_with_label_values(&["tiny"]).map(|h| h.get_sample_sum()).unwrap_or(0.0)
}

async fn usage_of(mut rx: EventStream) -> (String, tailor::engine::Usage) {
    let mut text = String::new();
    while let Some(event) = rx.recv().await {
        match event {
            Event::Text(t) => text.push_str(&t),
            Event::Finished { usage, .. } => return (text, usage),
            Event::Failed(e) => panic!("generation failed: {e}"),
            _ => {}
        }
    }
    panic!("no end")
}

#[tokio::test]
async fn a_cached_prefix_is_reused_exactly_and_gives_way_to_running_requests() {
    let cold = engine(EngineConfig { prefix_cache_tokens: 0, max_batch_tokens: 16, ..Default::default() }).await;
    let config = EngineConfig { max_batch_tokens: 16, ..Default::default() };
    let warm = engine(config.clone()).await;
    let preamble: Vec<u32> = (0..48u32).map(|k| k * 7 % 256).collect();
    let prompt =
        |suffix: u32| -> Vec<u32> { preamble.iter().copied().chain((0..12).map(|k| (k + suffix) % 256)).collect() };

    let first = usage_of(warm.submit(request(prompt(1), 10)).expect("queued")).await;
    assert_eq!(first.1.cached_tokens, 0);
    // The same prompt again: all but its last token from the cache.
    let before = processed(&config);
    let again = usage_of(warm.submit(request(prompt(1), 10)).expect("queued")).await;
    assert_eq!(again.0, first.0);
    assert_eq!(again.1.cached_tokens, 59);
    assert_eq!(processed(&config) - before, (1 + 9) as f64, "a step's tokens are counted before its events go out");
    // Another suffix: the preamble (and as much of the old suffix as matches) is reused.
    let before = processed(&config);
    let other = usage_of(warm.submit(request(prompt(5), 10)).expect("queued")).await;
    assert_eq!(other.1.cached_tokens, 48);
    assert_eq!(processed(&config) - before, (12 + 9) as f64, "a step's tokens are counted before its events go out");
    // Exact: what an engine without the cache generates.
    for (suffix, text) in [(1, &again.0), (5, &other.0)] {
        let fresh = usage_of(cold.submit(request(prompt(suffix), 10)).expect("queued")).await;
        assert_eq!(&fresh.0, text, "suffix {suffix}");
    }
    // A sequence generated past its prompt: its continuation is cached too.
    let mut continued = prompt(1);
    continued.extend(first.0.bytes().map(u32::from).take(5));
    let hit = usage_of(warm.submit(request(continued.clone(), 4)).expect("queued")).await;
    assert_eq!(hit.1.cached_tokens, continued.len() - 1);

    // Within the KV budget: a request that needs the room evicts the cache.
    let tight = EngineConfig { max_kv_tokens: 100, max_batch_tokens: 16, ..Default::default() };
    let small = engine(tight.clone()).await;
    usage_of(small.submit(request(prompt(1), 10)).expect("queued")).await;
    let evicted = usage_of(small.submit(request(prompt(1), 40)).expect("queued")).await;
    assert_eq!(evicted.1.cached_tokens, 59, "reused, then the cache made room");
    let after = usage_of(small.submit(request(prompt(1), 10)).expect("queued")).await;
    assert!(after.1.cached_tokens > 0, "the last finished request is cached again");
}

#[tokio::test]
async fn prompts_running_together_compute_a_shared_preamble_once() {
    let config = EngineConfig { max_batch_tokens: 16, prefix_cache_tokens: 0, ..Default::default() };
    let handle = engine(config.clone()).await;
    let preamble: Vec<u32> = (0..48u32).map(|k| k * 5 % 256).collect();
    let prompt =
        |tail: u32| -> Vec<u32> { preamble.iter().copied().chain((0..12).map(|k| (k * 3 + tail) % 256)).collect() };
    let mut alone = Vec::new();
    for tail in [1, 2] {
        alone.push(usage_of(handle.submit(request(prompt(tail), 10)).expect("queued")).await);
    }
    let before = processed(&config);
    let streams = handle.submit_all(vec![request(prompt(1), 10), request(prompt(2), 10)]).expect("queued");
    let together = futures::future::join_all(streams.into_iter().map(usage_of)).await;
    assert_eq!(together[0].0, alone[0].0);
    assert_eq!(together[1].0, alone[1].0);
    assert_eq!((together[0].1.cached_tokens, together[1].1.cached_tokens), (0, 48));
    // The first computes its 60 prompt tokens, the second only its 12-token
    // tail; then 9 decode steps each.
    assert_eq!(
        processed(&config) - before,
        (60 + 12 + 2 * 9) as f64,
        "a step's tokens are counted before its events go out"
    );
}

/// Every weight type's kernels in a whole forward pass: a random model whose
/// projections run on the kernel against its twin holding the same quantized
/// weights as float32 (so only the kernels and their 8-bit activations
/// differ). Widths are multiples of 256, so the K-quants apply.
#[test]
fn each_kernel_in_a_forward_pass_agrees_with_its_weights_in_float32() -> Result<(), String> {
    use tailor::model::llama::Logits;
    use tailor::model::BatchRow;
    let mut config = RandomSource::tiny_config(300);
    config.hidden_size = 256;
    config.intermediate_size = 512;
    config.head_dim = 64;
    let prompt: Vec<u32> = (0..40).map(|i| (i * 37 % 300) as u32).collect();
    let logits = |dtype, dequantized| -> Result<Vec<Vec<f32>>, String> {
        let source = RandomSource::new(config.clone(), 11).with_projections(dtype, dequantized);
        let model = Llama::load(&mut { source }).map_err(|e| e.to_string())?;
        let mut cache = model.new_cache();
        let out = model
            .forward(&mut [BatchRow { tokens: &prompt, cache: &mut cache, logits: Logits::All, adapter: None }])
            .map_err(|e| e.to_string())?;
        out[0].to_vec2::<f32>().map_err(|e| e.to_string())
    };
    let top2 = |row: &[f32]| {
        let mut sorted: Vec<(usize, f32)> = row.iter().copied().enumerate().collect();
        sorted.sort_by(|a, b| b.1.total_cmp(&a.1));
        (sorted[0].0, sorted[0].1 - sorted[1].1)
    };
    for dtype in tailor::model::kernels::KERNEL_TYPES {
        let (kernel, float) = (logits(dtype, false)?, logits(dtype, true)?);
        let (mut compared, mut drift) = (0, 0f32);
        for (k, f) in kernel.iter().zip(&float) {
            drift = k.iter().zip(f).map(|(a, b)| (a - b).abs()).fold(drift, f32::max);
            let (want, margin) = top2(f);
            if margin > 0.5 {
                compared += 1;
                assert_eq!(top2(k).0, want, "{dtype:?}: top-1 where the float32 margin is {margin}");
            }
        }
        println!("{dtype:?}: max |Δ| logit {drift:.4}, top-1 kept at {compared} of {} positions", prompt.len());
        assert!(compared >= prompt.len() / 4, "{dtype:?}: too few clear positions ({compared})");
        assert!(drift < 0.5, "{dtype:?}: logits drift by {drift}");
    }
    Ok(())
}
