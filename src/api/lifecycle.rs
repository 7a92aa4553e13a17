//! Graceful shutdown: on SIGTERM/SIGINT the server drains. `/health` turns
//! 503 at once and new requests are refused with 503, while requests in
//! flight (streams included) run on until they finish or the shutdown
//! timeout passes; then the remaining streams end with an error event.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::watch;

use super::error::ApiError;
use super::AppState;

#[derive(Clone)]
pub struct Lifecycle(Arc<Inner>);

struct Inner {
    draining: AtomicBool,
    in_flight: AtomicUsize,
    /// Set when in-flight work must end now.
    aborted: watch::Sender<bool>,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self(Arc::new(Inner {
            draining: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            aborted: watch::channel(false).0,
        }))
    }
}

/// Counts one request in flight until dropped.
pub struct InFlight(Lifecycle);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0 .0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Lifecycle {
    pub fn enter(&self) -> InFlight {
        self.0.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    pub fn is_draining(&self) -> bool {
        self.0.draining.load(Ordering::Acquire)
    }

    pub fn in_flight(&self) -> usize {
        self.0.in_flight.load(Ordering::Acquire)
    }

    /// Completes when in-flight work must stop (the shutdown timeout passed).
    pub async fn aborted(&self) {
        let mut aborted = self.0.aborted.subscribe();
        let _ = aborted.wait_for(|a| *a).await;
    }

    /// Stops taking requests, lets those in flight finish for up to
    /// `timeout`, then aborts the rest and gives them `grace` to send their
    /// last event.
    pub async fn drain(&self, timeout: Duration, grace: Duration) {
        self.0.draining.store(true, Ordering::Release);
        tracing::info!(in_flight = self.in_flight(), timeout_s = timeout.as_secs_f32(), "draining");
        if !self.wait_idle(timeout).await {
            tracing::warn!(in_flight = self.in_flight(), "shutdown timeout: ending the requests still running");
            self.0.aborted.send_replace(true);
            self.wait_idle(grace).await;
        }
    }

    async fn wait_idle(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while self.in_flight() > 0 {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }
}

/// While draining, everything but `/health` and `/metrics` is refused.
pub async fn refuse_while_draining(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let path = request.uri().path();
    if state.lifecycle.is_draining() && path != "/health" && path != "/metrics" {
        return ApiError { code: Some("shutting_down"), ..ApiError::unavailable("the server is shutting down") }
            .into_response();
    }
    next.run(request).await
}
