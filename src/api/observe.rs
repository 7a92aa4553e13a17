//! What happened to each request, told once: a span carrying the request id
//! (the engine's log lines inherit it), and when the response body is done
//! — after the last SSE event for a stream — one INFO line and one count in
//! `tailor_requests_total`. Handlers add what they learn (the resolved
//! adapter, preset and template, tokens, first-token time, finish reason) to
//! the request's `Facts`.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tracing::Instrument;

use super::lifecycle::InFlight;
use super::{AppState, Target};

/// The request header carrying the request id (echoed on the response).
pub const REQUEST_ID: &str = "x-request-id";

/// What a handler learned about its request; shared with the logger.
#[derive(Clone, Default)]
pub struct Facts(Arc<Mutex<Known>>);

#[derive(Default)]
struct Known {
    /// The caller's own prefix-cache partition (`--prefix-cache-isolation
    /// key`: a hash of its API key), else 0.
    tenant: u64,
    model: Option<String>,
    adapter: Option<String>,
    preset: Option<String>,
    template: Option<String>,
    prompt_tokens: usize,
    completion_tokens: usize,
    first_token: Option<Instant>,
    finish_reasons: Vec<&'static str>,
    error: Option<String>,
}

impl Facts {
    fn known(&self) -> MutexGuard<'_, Known> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The model id resolved to this target.
    pub fn resolved(&self, target: &Target) {
        let mut k = self.known();
        k.model = Some(target.requested.clone());
        k.adapter = target.adapter_label();
        k.preset = target.preset.clone();
        k.template = target.template.as_ref().map(|t| t.name.clone());
    }

    /// The prefix-cache partition of a request with this `cache_salt`: 0
    /// (shared) without salt or isolation, else a hash of both.
    pub fn cache_partition(&self, salt: Option<&str>) -> u64 {
        let tenant = self.known().tenant;
        if tenant == 0 && salt.is_none() {
            return 0;
        }
        partition_hash(&[&tenant.to_le_bytes(), salt.unwrap_or("").as_bytes()])
    }

    pub fn text_arrived(&self) {
        let mut k = self.known();
        k.first_token.get_or_insert_with(Instant::now);
    }

    pub fn finished(&self, reason: &'static str, prompt_tokens: usize, completion_tokens: usize) {
        let mut k = self.known();
        k.finish_reasons.push(reason);
        k.prompt_tokens += prompt_tokens;
        k.completion_tokens += completion_tokens;
    }

    /// A failure told inside a 200 stream (the status cannot say it).
    pub fn failed(&self, message: &str) {
        self.known().error = Some(message.to_string());
    }
}

pub use crate::config::CacheIsolation;

/// A nonzero 64-bit digest of `parts` (length-prefixed, so they cannot run together).
fn partition_hash(parts: &[&[u8]]) -> u64 {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    let digest = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(first).max(1)
}

/// Routes polled by orchestrators: logged at DEBUG, not counted.
fn is_probe(path: &str) -> bool {
    matches!(path, "/health" | "/metrics")
}

pub async fn observe(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let id = request.headers().get(REQUEST_ID).and_then(|v| v.to_str().ok()).unwrap_or("-").to_string();
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let facts = Facts::default();
    if state.prefix_cache_isolation == CacheIsolation::Key {
        let key = super::auth::presented_key(&request).unwrap_or("");
        facts.known().tenant = partition_hash(&[b"key", key.as_bytes()]);
    }
    request.extensions_mut().insert(facts.clone());
    let span = tracing::info_span!("request", id = %id);
    let in_flight = (!is_probe(&path)).then(|| state.lifecycle.enter());
    let started = Instant::now();
    let response = next.run(request).instrument(span.clone()).await;
    let done = Done { state, facts, span, id, method, path, status: response.status(), started, _in_flight: in_flight };
    response.map(|body| Body::new(Logged { body, _done: done }))
}

/// Logs and counts the request when dropped, i.e. when the body is done.
struct Done {
    state: AppState,
    facts: Facts,
    span: tracing::Span,
    id: String,
    method: axum::http::Method,
    path: String,
    status: StatusCode,
    started: Instant,
    _in_flight: Option<InFlight>,
}

impl Drop for Done {
    fn drop(&mut self) {
        let k = self.facts.known();
        let duration_ms = self.started.elapsed().as_secs_f64() * 1e3;
        let ttft_ms = k.first_token.map(|t| (t - self.started).as_secs_f64() * 1e3);
        let finish = k.finish_reasons.join(",");
        let status = if k.error.is_some() { StatusCode::INTERNAL_SERVER_ERROR } else { self.status };
        let none = || "-".to_string();
        let _enter = self.span.enter();
        if is_probe(&self.path) {
            tracing::debug!(method = %self.method, path = %self.path, status = status.as_u16(), "request");
            return;
        }
        tracing::info!(
            request_id = %self.id,
            method = %self.method,
            path = %self.path,
            status = status.as_u16(),
            model = %k.model.clone().unwrap_or_else(none),
            adapter = %k.adapter.clone().unwrap_or_else(none),
            preset = %k.preset.clone().unwrap_or_else(none),
            template = %k.template.clone().unwrap_or_else(none),
            prompt_tokens = k.prompt_tokens,
            completion_tokens = k.completion_tokens,
            ttft_ms = %ttft_ms.map(|t| format!("{t:.1}")).unwrap_or_else(none),
            duration_ms = %format!("{duration_ms:.1}"),
            finish_reason = %if finish.is_empty() { "-" } else { finish.as_str() },
            error = k.error.as_deref().unwrap_or("-"),
            "request finished"
        );
        if let Some(base) = self.state.served_model() {
            let labels = [
                base.as_str(),
                k.model.as_deref().unwrap_or(""),
                k.adapter.as_deref().unwrap_or(""),
                k.preset.as_deref().unwrap_or(""),
                k.template.as_deref().unwrap_or(""),
                status.as_str(),
            ];
            self.state.metrics.requests.with_label_values(&labels).inc();
        }
    }
}

/// A response body that carries the request's `Done` until it ends.
struct Logged {
    body: Body,
    _done: Done,
}

impl HttpBody for Logged {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
