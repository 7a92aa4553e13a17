//! `run(config, listener, shutdown)`: the whole server, so that the binary
//! and the tests start it the same way.

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::api::lifecycle::Lifecycle;
use crate::api::{self, AppState, HttpOptions};
use crate::config::ServeConfig;
use crate::engine::{EngineHandle, EngineStatus};
use crate::finetune::{FineTuning, FineTuningConfig, Publish};
use crate::prompt::presets::PresetStore;
use crate::prompt::templates::TemplateStore;

/// Serves until `shutdown` completes, then drains: new requests are refused
/// and those in flight get `config.shutdown_timeout` to finish. Returns an
/// error if the model fails to load or the engine stops (the process should
/// then exit non-zero so an orchestrator restarts it).
pub async fn run(
    config: ServeConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let engine = EngineHandle::start(config.model.clone(), config.load.clone(), config.engine.clone());
    let engine_stopped = {
        let engine = engine.clone();
        async move { engine.wait_stopped().await }
    };
    let lifecycle = Lifecycle::default();
    let state = AppState {
        engine,
        created: crate::ids::unix_now(),
        default_chat_template_kwargs: Arc::new(config.chat_template_kwargs.clone()),
        tool_call_parser: config.tool_call_parser,
        enable_lora_loading: config.enable_lora_loading,
        templates: Arc::new(TemplateStore::open(&config.templates_dir)),
        presets: Arc::new(PresetStore::open(&config.presets)),
        metrics: config.engine.metrics.clone(),
        keys: Arc::new(config.keys.clone()),
        lifecycle: lifecycle.clone(),
        cpu: crate::api::cpu::CpuWork::new(config.engine.threads.max(2)),
        stream_write_timeout: config.stream_write_timeout,
        prefix_cache_isolation: config.prefix_cache_isolation,
        fine_tuning: start_fine_tuning(&config),
    };
    spawn_reloader(state.templates.clone(), state.presets.clone());
    report_broken_presets(state.clone());
    publish_fine_tuned(state.clone());
    let fine_tuning = state.fine_tuning.clone();
    let options = HttpOptions {
        max_body_bytes: config.max_body_bytes,
        max_file_bytes: config.max_file_bytes,
        allowed_origins: config.allowed_origins.clone(),
        allowed_hosts: config.allowed_hosts.clone(),
    };
    let app = api::router(state, &options);
    tracing::info!(addr = %listener.local_addr()?, model = %config.model.display(), "listening");
    let (drained_tx, drained) = tokio::sync::oneshot::channel();
    let timeout = config.shutdown_timeout;
    let drain = async move {
        shutdown.await;
        lifecycle.drain(timeout, ABORT_GRACE).await;
        let _ = drained_tx.send(());
    };
    // A client that stops reading keeps its connection open: after the
    // drain, connections get a short grace and then the process goes.
    let give_up = async move {
        if drained.await.is_err() {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(ABORT_GRACE).await;
    };
    let server = crate::connections::serve(listener, app, config.connections.clone(), limit_unsent, drain);
    let outcome = tokio::select! {
        result = server => result,
        reason = engine_stopped => Err(std::io::Error::other(reason)),
        _ = give_up => {
            tracing::warn!("connections still open after the drain; closing them");
            Ok(())
        }
    };
    // A job still training stops after its step; it starts over on the next start.
    if let Some(service) = fine_tuning {
        let _ = tokio::task::spawn_blocking(move || service.stop()).await;
    }
    outcome
}

/// Unsent bytes a connection may queue in the kernel. Without a bound the
/// send buffer autotunes to megabytes, so a client that stops reading a
/// stream would go unnoticed for minutes; with it, writes wait once 16 KiB
/// are queued, which the stalled-reader timeout sees (and streams reach
/// the client sooner).
const UNSENT_LIMIT_BYTES: u32 = 16 * 1024;

fn limit_unsent(stream: &mut tokio::net::TcpStream) {
    let socket = socket2::SockRef::from(&*stream);
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Err(e) = socket.set_tcp_notsent_lowat(UNSENT_LIMIT_BYTES) {
        tracing::debug!(error = %e, "cannot bound the unsent bytes of a connection");
    }
    if let Err(e) = socket.set_tcp_nodelay(true) {
        tracing::debug!(error = %e, "cannot disable Nagle's algorithm");
    }
}

/// How long aborted requests get to send their last event.
const ABORT_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

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
/// The fine-tuning service over the data directory; without one (it cannot
/// be opened) the server still serves, and its fine-tuning routes answer 503.
fn start_fine_tuning(config: &ServeConfig) -> Option<Arc<FineTuning>> {
    let settings = FineTuningConfig {
        data_dir: config.data_dir.clone(),
        model_path: config.model.clone(),
        train_threads: config.train_threads,
        worker_exe: config.fine_tuning_worker.clone(),
        limits: config.storage.clone(),
        max_train_memory: config.max_train_memory,
    };
    match FineTuning::start(settings) {
        Ok(service) => Some(service),
        Err(e) => {
            tracing::error!(error = %e, dir = %config.data_dir.display(), "fine-tuning is unavailable");
            None
        }
    }
}

/// Once the model is loaded, fine-tuned adapters are served (those trained
/// before a restart at once, new ones as their jobs succeed).
fn publish_fine_tuned(state: AppState) {
    let Some(service) = state.fine_tuning.clone() else { return };
    tokio::spawn(async move {
        let EngineStatus::Ready(info) = state.engine.wait_ready().await else {
            return;
        };
        let publish: Publish = Arc::new(move |name: &str, path: &std::path::Path| {
            info.adapters.register(name, path, true).map_err(|e| e.to_string())
        });
        tokio::task::spawn_blocking(move || service.set_publisher(publish));
    });
}

fn report_broken_presets(state: AppState) {
    tokio::spawn(async move {
        let EngineStatus::Ready(info) = state.engine.wait_ready().await else {
            return;
        };
        for preset in state.presets.list() {
            for adapter in preset.adapter_names().iter().filter(|a| !info.adapters.exists(a).unwrap_or(false)) {
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
