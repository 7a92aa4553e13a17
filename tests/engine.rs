//! The engine and its scheduler on a tiny random model (fast, no download):
//! batching and chunked prefill give exactly what one-at-a-time gives,
//! cancellation frees the sequence, the queue bound and the KV budget hold.

use std::time::{Duration, Instant};

use tailor::engine::{EngineConfig, EngineHandle, Event, FinishReason, GenerationRequest, SamplingParams, SubmitError};
use tailor::loader::{Loaded, ModelInfo};
use tailor::lora::{AdapterRegistry, BaseShapes, RegistryOptions};
use tailor::model::random::RandomSource;
use tailor::model::{Llama, ModelFormat, WeightMode};
use tailor::tokenizer::Tokenizer;
use tokio::sync::mpsc;

fn tiny_model() -> Result<Loaded, String> {
    let config = RandomSource::tiny_config(257);
    let model = Llama::load(&mut RandomSource::new(config.clone(), 7)).map_err(|e| e.to_string())?;
    let info = ModelInfo {
        id: "tiny".into(),
        tokenizer: Tokenizer::bytes().map_err(|e| e.to_string())?,
        chat_template: None,
        eos_token_ids: vec![256],
        max_model_len: config.max_position_embeddings,
        embedding_rows: config.vocab_size,
        format: ModelFormat::Gguf,
        mode: WeightMode::Quantized,
        adapters: AdapterRegistry::new(
            BaseShapes::of(&config),
            RegistryOptions { max_rank: 64, max_loaded: 0, roots: Vec::new() },
        ),
    };
    Ok(Loaded { model, info })
}

async fn engine(config: EngineConfig) -> EngineHandle {
    let handle = EngineHandle::start_with(tiny_model, config);
    handle.wait_ready().await;
    handle
}

fn request(prompt: Vec<u32>, max_tokens: usize) -> (GenerationRequest, mpsc::UnboundedReceiver<Event>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let request = GenerationRequest {
        prompt,
        adapter: None,
        sampling: SamplingParams { temperature: 0.0, ..Default::default() },
        max_tokens,
        stop: Vec::new(),
        ignore_eos: true,
        events: tx,
        span: tracing::Span::none(),
    };
    (request, rx)
}

/// All text of one request, and how it finished.
async fn collect(mut rx: mpsc::UnboundedReceiver<Event>) -> (String, Option<FinishReason>, usize) {
    let mut text = String::new();
    while let Some(event) = rx.recv().await {
        match event {
            Event::Text(t) => text.push_str(&t),
            Event::Finished { reason, usage } => return (text, Some(reason), usage.completion_tokens),
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
        let (req, rx) = request(prompt, 24);
        single.submit(req).expect("queued");
        alone.push(collect(rx).await);
    }
    // All at once, with a step budget of 7 tokens: prompts are prefilled in
    // chunks while the others decode.
    let batched = engine(EngineConfig { max_num_seqs: 8, max_batch_tokens: 7, ..Default::default() }).await;
    let receivers: Vec<_> = prompts()
        .into_iter()
        .map(|p| {
            let (req, rx) = request(p, 24);
            batched.submit(req).expect("queued");
            rx
        })
        .collect();
    let together = futures::future::join_all(receivers.into_iter().map(collect)).await;
    assert_eq!(together, alone);
    assert!(alone.iter().all(|(_, reason, n)| *reason == Some(FinishReason::Length) && *n == 24));
    let distinct: std::collections::HashSet<&String> = alone.iter().map(|(text, ..)| text).collect();
    assert!(distinct.len() > 1 && alone.iter().all(|(text, ..)| !text.is_empty()), "{alone:?}");
}

#[tokio::test]
async fn a_dropped_client_frees_its_sequence() {
    let handle = engine(EngineConfig::default()).await;
    let (req, mut rx) = request(vec![1, 2, 3], 900);
    handle.submit(req).expect("queued");
    rx.recv().await.expect("first event");
    wait_for(&handle, "the sequence to run", |s| s.running == 1 && s.kv_tokens > 0).await;
    drop(rx);
    wait_for(&handle, "the sequence to be freed", |s| s.running == 0 && s.kv_tokens == 0).await;
}

#[tokio::test]
async fn the_waiting_queue_is_bounded() {
    let handle = engine(EngineConfig { max_num_seqs: 1, max_waiting: 2, ..Default::default() }).await;
    let (a, _a_rx) = request(vec![5; 4], 900);
    handle.submit(a).expect("runs");
    wait_for(&handle, "A to run", |s| s.running == 1).await;
    let (b, _b_rx) = request(vec![6; 4], 4);
    let (c, _c_rx) = request(vec![7; 4], 4);
    handle.submit(b).expect("waits");
    handle.submit(c).expect("waits");
    // Let the engine run steps meanwhile: it must not take waiting requests
    // off the queue while its batch is full.
    let steps = handle.stats().steps;
    wait_for(&handle, "a few more steps", |s| s.steps > steps + 3).await;
    let (d, _d_rx) = request(vec![8; 4], 4);
    assert_eq!(handle.submit(d).err(), Some(SubmitError::Overloaded(2)));
}

#[tokio::test]
async fn the_kv_budget_makes_requests_wait_their_turn() {
    // Each request reserves 10 + 100 tokens; 150 fit one at a time.
    let handle = engine(EngineConfig { max_num_seqs: 8, max_kv_tokens: 150, ..Default::default() }).await;
    let (a, a_rx) = request(vec![1; 10], 100);
    let (b, b_rx) = request(vec![2; 10], 100);
    handle.submit(a).expect("queued");
    handle.submit(b).expect("queued");
    let mut stats = Vec::new();
    let watcher = {
        let handle = handle.clone();
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(20);
            let mut seen = Vec::new();
            while Instant::now() < deadline {
                let s = handle.stats();
                seen.push(s);
                if s.steps > 0 && s.running == 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            seen
        })
    };
    let (a_out, b_out) = tokio::join!(collect(a_rx), collect(b_rx));
    stats.extend(watcher.await.expect("watcher"));
    assert_eq!(a_out.2, 100);
    assert_eq!(b_out.2, 100);
    assert!(
        stats.iter().all(|s| s.running <= 1 && s.reserved_tokens <= 150),
        "budget exceeded: {:?}",
        stats.iter().max_by_key(|s| s.reserved_tokens)
    );
}
