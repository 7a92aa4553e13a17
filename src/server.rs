//! `run(config, listener, shutdown)`: the whole server, so that the binary
//! and the tests start it the same way.

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::api::{self, AppState};
use crate::config::ServeConfig;
use crate::engine::{EngineHandle, EngineStatus};
use crate::prompt::presets::PresetStore;
use crate::prompt::templates::TemplateStore;

/// Serves until `shutdown` completes. The model loads on the engine thread
/// while the listener already answers (`/health` is 503 until it is ready).
pub async fn run(
    config: ServeConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let engine = EngineHandle::start(config.model.clone(), config.load.clone(), config.engine.clone());
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
        templates: Arc::new(TemplateStore::open(&config.templates_dir)),
        presets: Arc::new(PresetStore::open(&config.presets)),
    };
    spawn_reloader(state.templates.clone(), state.presets.clone());
    report_broken_presets(state.clone());
    let app = api::router(state);
    tracing::info!(addr = %listener.local_addr()?, model = %config.model.display(), "listening");
    let server = axum::serve(listener, app).with_graceful_shutdown(shutdown);
    tokio::select! {
        result = server => result,
        error = load_failure => Err(std::io::Error::other(error)),
    }
}

/// Templates and presets reload when their files change: a cheap mtime scan
/// every second, no watcher thread per file.
fn spawn_reloader(templates: Arc<TemplateStore>, presets: Arc<PresetStore>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tick.tick().await;
            let (t, p) = (templates.clone(), presets.clone());
            let _ = tokio::task::spawn_blocking(move || {
                t.reload_if_changed();
                p.reload_if_changed();
            })
            .await;
        }
    });
}

/// Once the model (and its adapters) are loaded, says which presets name an
/// adapter or template that does not exist; they answer with an error until fixed.
fn report_broken_presets(state: AppState) {
    tokio::spawn(async move {
        let EngineStatus::Ready(info) = state.engine.wait_ready().await else {
            return;
        };
        for preset in state.presets.list() {
            if let Some(adapter) = preset.adapter.as_ref().filter(|a| !info.adapters.contains(a)) {
                tracing::error!(preset = %preset.name, %adapter, "preset names an adapter that is not loaded");
            }
            if let Some(template) = preset.defaults.template.as_ref().filter(|t| state.templates.get(t).is_none()) {
                tracing::error!(preset = %preset.name, %template, "preset names a template that does not exist");
            }
        }
    });
}

/// Sets the compute thread count for candle's kernels (rayon and gemm both
/// read it). Call once, before any model work.
pub fn set_compute_threads(threads: Option<usize>) {
    let n = threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    // SAFETY-free in edition 2021; done before any other thread reads the environment.
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    let _ = rayon::ThreadPoolBuilder::new().num_threads(n).build_global();
}
