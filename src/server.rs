//! `run(config, listener, shutdown)`: the whole server, so that the binary
//! and the tests start it the same way.

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::api::{self, AppState};
use crate::config::ServeConfig;
use crate::engine::{EngineHandle, EngineStatus};

/// Serves until `shutdown` completes. The model loads on the engine thread
/// while the listener already answers (`/health` is 503 until it is ready).
pub async fn run(
    config: ServeConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let engine = EngineHandle::start(
        config.model.clone(),
        config.load.clone(),
        config.engine.clone(),
    );
    // A model (or start-up adapter) that fails to load ends the server with its error.
    let load_failure = {
        let engine = engine.clone();
        async move {
            match engine.wait_ready().await {
                EngineStatus::Failed(e) => e,
                _ => std::future::pending().await,
            }
        }
    };
    let state = AppState {
        engine,
        created: api::unix_now(),
        default_chat_template_kwargs: Arc::new(config.chat_template_kwargs.clone()),
        enable_lora_loading: config.enable_lora_loading,
    };
    let app = api::router(state);
    tracing::info!(addr = %listener.local_addr()?, model = %config.model.display(), "listening");
    let server = axum::serve(listener, app).with_graceful_shutdown(shutdown);
    tokio::select! {
        result = server => result,
        error = load_failure => Err(std::io::Error::other(error)),
    }
}

/// Sets the compute thread count for candle's kernels (rayon and gemm both
/// read it). Call once, before any model work.
pub fn set_compute_threads(threads: Option<usize>) {
    let n = threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    // SAFETY-free in edition 2021; done before any other thread reads the environment.
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global();
}
