//! Server configuration: flags (with `TAILOR_*` environment fallbacks) parsed
//! raw by clap, then checked into one `ServeConfig`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, ValueEnum};

use crate::engine::EngineConfig;
use crate::loader::{cache_dir, default_model_path, LoadOptions};
use crate::model::WeightMode;

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum DTypeArg {
    /// Float32 for models of at most 200 M parameters (quantized activations
    /// cost them their answers; their float32 weights are small), as stored otherwise.
    Auto,
    /// Keep weights as stored: GGUF blocks quantized, F16/BF16 in 16 bits (fast, small).
    Quantized,
    /// Dequantize every weight to float32 (exact parity with the reference).
    F32,
    /// Dense weights in float16 (quantized GGUF blocks stay quantized).
    F16,
    /// Dense weights in bfloat16 (quantized GGUF blocks stay quantized).
    Bf16,
}

impl DTypeArg {
    /// The weight mode this precision loads in (`Auto` as `Quantized`; the
    /// loader turns small models to float32 when `dense_small_models` is set).
    pub fn weight_mode(self) -> WeightMode {
        use crate::model::kernels::half::HalfKind;
        match self {
            DTypeArg::Quantized | DTypeArg::Auto => WeightMode::Quantized,
            DTypeArg::F32 => WeightMode::F32,
            DTypeArg::F16 => WeightMode::Half(HalfKind::F16),
            DTypeArg::Bf16 => WeightMode::Half(HalfKind::Bf16),
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "TAILOR_HOST", default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0 picks a free one).
    #[arg(long, env = "TAILOR_PORT", default_value_t = 8080)]
    pub port: u16,
    /// A GGUF file, a folder holding one, or a Hugging Face folder
    /// (config.json + *.safetensors + tokenizer.json). Default: SmolLM2-135M-Instruct
    /// Q4_1 in the model cache (fetch it with scripts/fetch-model.sh).
    #[arg(long, env = "TAILOR_MODEL")]
    pub model: Option<PathBuf>,
    /// Weight precision.
    #[arg(long, env = "TAILOR_DTYPE", value_enum, default_value = "auto")]
    pub dtype: DTypeArg,
    /// Quantize every projection at load to this type (a Hugging Face
    /// folder then runs at GGUF speed; a GGUF is requantized).
    #[arg(long, env = "TAILOR_QUANTIZE", value_enum, conflicts_with = "dtype")]
    pub quantize: Option<crate::model::QuantType>,
    /// The id clients use for the base model (default: the file or folder name).
    #[arg(long, env = "TAILOR_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    /// Compute threads (default: all cores).
    #[arg(long, env = "TAILOR_THREADS")]
    pub threads: Option<usize>,
    /// A Jinja chat template file that replaces the model's own.
    #[arg(long, env = "TAILOR_CHAT_TEMPLATE")]
    pub chat_template: Option<PathBuf>,
    /// JSON object of variables passed to every chat template render
    /// (e.g. '{"enable_thinking": false}'); a request's `chat_template_kwargs` win.
    #[arg(long, env = "TAILOR_CHAT_TEMPLATE_KWARGS")]
    pub chat_template_kwargs: Option<String>,
    /// How models write tool calls with `tool_choice: auto`: hermes (`<tool_call>`), llama3_json,
    /// mistral (`[TOOL_CALLS]`) or generic (tools described, replies constrained to JSON).
    /// Default: read from the chat template; generic when it ignores tools.
    #[arg(long, env = "TAILOR_TOOL_CALL_PARSER", value_enum)]
    pub tool_call_parser: Option<crate::prompt::tool_format::ToolFormat>,
    /// Tokens of KV the prefix cache keeps from finished requests, so a prompt
    /// that starts like an earlier one (a template's preamble, a chat's history)
    /// prefills only the rest; within --max-kv-tokens, given up first. 0 turns it off.
    #[arg(long, env = "TAILOR_PREFIX_CACHE_TOKENS", default_value_t = 8192)]
    pub prefix_cache_tokens: usize,
    /// Sequences decoded together in one engine step.
    #[arg(long, env = "TAILOR_MAX_NUM_SEQS", default_value_t = 8)]
    pub max_num_seqs: usize,
    /// Requests allowed to wait for a slot; more get 429 at once.
    #[arg(long, env = "TAILOR_MAX_WAITING", default_value_t = 64)]
    pub max_waiting: usize,
    /// KV-cache tokens all running sequences may reserve together (each
    /// reserves prompt + max_tokens); requests wait for room beyond it.
    #[arg(long, env = "TAILOR_MAX_KV_TOKENS", default_value_t = 65_536)]
    pub max_kv_tokens: usize,
    /// The longest prompt + completion a request may ask for (vLLM's name):
    /// beyond it a 400 at once. Default: the model's context, within
    /// --max-kv-tokens (a request larger than the KV budget could never run).
    #[arg(long, env = "TAILOR_MAX_MODEL_LEN")]
    pub max_model_len: Option<usize>,
    /// `key`: each API key's requests reuse only their own cached prompt
    /// prefixes (so timing and `cached_tokens` tell one tenant nothing of
    /// another's prompts), at the cost of shared preambles being computed
    /// once per key; `none`: one cache (a request's `cache_salt` still
    /// partitions it).
    #[arg(long, env = "TAILOR_PREFIX_CACHE_ISOLATION", value_enum, default_value = "none")]
    pub prefix_cache_isolation: CacheIsolation,
    /// Tokens one engine step may process; longer prompts are prefilled in
    /// chunks so running streams keep flowing.
    #[arg(long, env = "TAILOR_MAX_BATCH_TOKENS", default_value_t = 512)]
    pub max_batch_tokens: usize,
    /// Every sub-folder of this folder holding an adapter_config.json is a LoRA
    /// adapter named after the folder.
    #[arg(long, env = "TAILOR_ADAPTERS_DIR", default_value = "adapters")]
    pub adapters_dir: PathBuf,
    /// An extra adapter, NAME=PATH (repeatable, or comma-separated in the environment).
    #[arg(long = "lora", value_name = "NAME=PATH", env = "TAILOR_LORA", value_delimiter = ',')]
    pub lora: Vec<String>,
    /// Allow POST /v1/load_lora_adapter and /v1/unload_lora_adapter.
    #[arg(long, env = "TAILOR_ENABLE_LORA_LOADING")]
    pub enable_lora_loading: bool,
    /// Folders runtime loads may read adapters from (repeatable, or
    /// comma-separated in the environment; default: the adapters dir).
    #[arg(long = "lora-root", value_name = "DIR", env = "TAILOR_LORA_ROOTS", value_delimiter = ',')]
    pub lora_roots: Vec<PathBuf>,
    /// Largest LoRA rank accepted.
    #[arg(long, env = "TAILOR_MAX_LORA_RANK", default_value_t = 64)]
    pub max_lora_rank: usize,
    /// Folder of named prompt templates (*.jinja with TOML metadata).
    #[arg(long, env = "TAILOR_TEMPLATES_DIR", default_value = "templates")]
    pub templates_dir: PathBuf,
    /// Presets: a TOML file, or a folder of them.
    #[arg(long, env = "TAILOR_PRESETS", default_value = "presets")]
    pub presets: PathBuf,
    /// Adapters kept in memory at once (least recently used ones not in use are
    /// evicted and reloaded on demand); 0 keeps all.
    #[arg(long, env = "TAILOR_MAX_LOADED_ADAPTERS", default_value_t = 0)]
    pub max_loaded_adapters: usize,
    /// Bytes of adapter weights kept in memory (e.g. 512MiB): least recently
    /// used adapters no request holds are evicted past it; 0 = no limit.
    #[arg(long, env = "TAILOR_ADAPTER_MEMORY", value_parser = parse_bytes, default_value = "1GiB")]
    pub adapter_memory: u64,
    /// Adapters one request may compose in its `adapters` list.
    #[arg(long, env = "TAILOR_MAX_ADAPTERS_PER_REQUEST", default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub max_adapters_per_request: u16,
    /// A model id that is not registered is looked up as a sub-folder of the
    /// adapter roots and loaded on first use; the adapters folder is then
    /// registered at start without reading any weights.
    #[arg(long, env = "TAILOR_RESOLVE_ADAPTERS")]
    pub resolve_adapters: bool,
    /// Adapter names registered at once (runtime loads beyond it are refused); 0 = no limit.
    #[arg(long, env = "TAILOR_MAX_ADAPTERS", default_value_t = 1024)]
    pub max_adapters: usize,
    /// API key clients must send as `Authorization: Bearer KEY` (repeatable,
    /// or comma-separated in the environment). `/health` and `/metrics` stay open.
    #[arg(long = "api-key", env = "TAILOR_API_KEY", value_delimiter = ',', hide_env_values = true)]
    pub api_keys: Vec<String>,
    /// Key for the routes that change the server (adapter load/unload,
    /// templates reload); the plain API key is refused there (403).
    #[arg(long = "admin-api-key", env = "TAILOR_ADMIN_API_KEY", value_delimiter = ',', hide_env_values = true)]
    pub admin_api_keys: Vec<String>,
    /// Host names requests may be addressed to (the `Host` header), e.g.
    /// api.example.com, .example.com (and its sub-domains) or *; others get
    /// 403 (a DNS-rebinding page cannot reach a local server). Default:
    /// loopback names and the bound address when bound to loopback, any otherwise.
    #[arg(long = "allowed-hosts", env = "TAILOR_ALLOWED_HOSTS", value_delimiter = ',')]
    pub allowed_hosts: Vec<String>,
    /// Connections served at once; more wait in the kernel's backlog.
    #[arg(long, env = "TAILOR_MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,
    /// Seconds a connection has to send a request's headers, from its start
    /// or its previous response (slow senders are cut off).
    #[arg(long, env = "TAILOR_HEADER_TIMEOUT", default_value_t = 10.0)]
    pub header_timeout: f64,
    /// Seconds an idle connection is kept open between requests.
    #[arg(long, env = "TAILOR_KEEP_ALIVE_TIMEOUT", default_value_t = 5.0)]
    pub keep_alive_timeout: f64,
    /// Origins browsers may call from (CORS), e.g. https://app.example.com, or *. Default: none.
    #[arg(long = "allowed-origins", env = "TAILOR_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,
    /// Largest request body in bytes (413 beyond it).
    #[arg(long, env = "TAILOR_MAX_BODY_BYTES", default_value_t = 8 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Largest file `POST /v1/files` takes, in bytes.
    #[arg(long, env = "TAILOR_MAX_FILE_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub max_file_bytes: usize,
    /// Where uploaded files, fine-tuning jobs and their adapters are kept
    /// (default: `data` in tailor's cache folder).
    #[arg(long, env = "TAILOR_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Threads a fine-tuning job trains on (the rest keep serving).
    #[arg(long, env = "TAILOR_TRAIN_THREADS", default_value_t = 1)]
    pub train_threads: usize,
    /// Memory a fine-tuning run may use (bytes, or e.g. 8GiB); jobs whose
    /// estimate is larger are refused. Default: 3/4 of the machine's (or
    /// the container's) memory.
    #[arg(long, env = "TAILOR_MAX_TRAIN_MEMORY", value_parser = parse_bytes)]
    pub max_train_memory: Option<u64>,
    /// Uploaded files kept at once; more uploads are refused (507).
    #[arg(long, env = "TAILOR_MAX_FILES", default_value_t = 10_000)]
    pub max_files: usize,
    /// Fine-tuning jobs queued or running at once; more are refused (429).
    #[arg(long, env = "TAILOR_MAX_QUEUED_JOBS", default_value_t = 100)]
    pub max_queued_jobs: usize,
    /// Bytes the data directory may hold (e.g. 20GiB; 0: no cap but the disk's reserve).
    #[arg(long, env = "TAILOR_MAX_STORED_BYTES", value_parser = parse_bytes, default_value = "0")]
    pub max_stored_bytes: u64,
    /// Free space kept on the data directory's disk: uploads and jobs that
    /// would go below it are refused (507).
    #[arg(long, env = "TAILOR_MIN_FREE_DISK", value_parser = parse_bytes, default_value = "1GiB")]
    pub min_free_disk: u64,
    /// The program fine-tuning jobs train in (default: this one); tests point it at the built binary.
    #[arg(long, hide = true)]
    pub fine_tuning_worker: Option<PathBuf>,
    /// Seconds a streaming client may stop reading before its request is cancelled.
    #[arg(long, env = "TAILOR_STREAM_WRITE_TIMEOUT", default_value_t = 60.0)]
    pub stream_write_timeout: f64,
    /// Seconds requests in flight may run on after SIGTERM/SIGINT.
    #[arg(long, env = "TAILOR_SHUTDOWN_TIMEOUT", default_value_t = 30.0)]
    pub shutdown_timeout: f64,
    /// Test builds only: a step running a prompt that starts with this token id panics.
    #[cfg(feature = "fault-injection")]
    #[arg(long, hide = true)]
    pub fault_step_panic_token: Option<u32>,
    /// Test builds only: admitting a prompt that starts with this token id panics the engine.
    #[cfg(feature = "fault-injection")]
    #[arg(long, hide = true)]
    pub fault_engine_panic_token: Option<u32>,
}

/// API keys: the plain ones, and the admin ones that also open the routes
/// that change the server.
#[derive(Clone, Default)]
pub struct Keys {
    pub api: Vec<String>,
    pub admin: Vec<String>,
}

impl std::fmt::Debug for Keys {
    /// Counts, never the keys (configs are logged).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keys {{ api: {} key(s), admin: {} key(s) }}", self.api.len(), self.admin.len())
    }
}

/// How far prompt prefixes are shared (`--prefix-cache-isolation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum CacheIsolation {
    /// Every request without a `cache_salt` shares one cache.
    #[default]
    None,
    /// Each API key's requests share only with themselves.
    Key,
}

/// A checked configuration that knows how to build the server's parts.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub addr: SocketAddr,
    pub model: PathBuf,
    pub load: LoadOptions,
    pub engine: EngineConfig,
    pub threads: Option<usize>,
    pub chat_template_kwargs: serde_json::Map<String, serde_json::Value>,
    pub tool_call_parser: Option<crate::prompt::tool_format::ToolFormat>,
    pub enable_lora_loading: bool,
    pub templates_dir: PathBuf,
    pub presets: PathBuf,
    pub keys: Keys,
    pub prefix_cache_isolation: CacheIsolation,
    pub allowed_origins: Vec<String>,
    /// Lower-case host names (`*` any, `.example.com` a domain and its sub-domains).
    pub allowed_hosts: Vec<String>,
    pub connections: crate::connections::ConnectionLimits,
    pub max_body_bytes: usize,
    pub max_file_bytes: usize,
    pub data_dir: PathBuf,
    pub train_threads: usize,
    pub max_train_memory: u64,
    pub storage: crate::finetune::StorageLimits,
    pub fine_tuning_worker: PathBuf,
    pub stream_write_timeout: std::time::Duration,
    pub shutdown_timeout: std::time::Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid --host/--port: {0}")]
    Address(String),
    #[error(
        "the default model is not in the cache ({0}).\nFetch it with:\n    scripts/fetch-model.sh\nor pass --model PATH"
    )]
    DefaultModelMissing(String),
    #[error("--model {0}: no such file or folder")]
    ModelMissing(String),
    #[error("cannot read --chat-template {path}: {message}")]
    ChatTemplate { path: String, message: String },
    #[error("--chat-template-kwargs must be a JSON object: {0}")]
    Kwargs(String),
    #[error("{0}")]
    Invalid(String),
    #[error("--lora {0}: expected NAME=PATH")]
    Lora(String),
    #[error("cannot read the adapters folder {path}: {message}")]
    AdaptersDir { path: String, message: String },
}

/// Bound to loopback: only loopback names and the bound address (a page
/// that rebinds its own name to 127.0.0.1 sends that name); bound elsewhere:
/// any, as the server is meant to be reached by other names.
fn default_allowed_hosts(addr: &SocketAddr) -> Vec<String> {
    if !addr.ip().is_loopback() {
        return vec!["*".into()];
    }
    let mut hosts: Vec<String> = ["localhost", ".localhost", "127.0.0.1", "[::1]"].map(String::from).to_vec();
    let bound = match addr.ip() {
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        ip => ip.to_string(),
    };
    if !hosts.contains(&bound) {
        hosts.push(bound);
    }
    hosts
}

/// A size in bytes: a whole number, optionally with a unit (`KB`, `MB`,
/// `GB`, `TB` in powers of 1000; `KiB`, `MiB`, `GiB`, `TiB` in powers of 1024).
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().map_err(|_| format!("`{text}` is not a size (e.g. 512MiB, 8GB or 1048576)"))?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        other => return Err(format!("unknown size unit `{other}` (B, KB, MB, GB, TB, KiB, MiB, GiB or TiB)")),
    };
    number.checked_mul(scale).ok_or_else(|| format!("`{text}` is too large"))
}

impl ServeArgs {
    pub fn into_config(self) -> Result<ServeConfig, ConfigError> {
        let addr: SocketAddr = format!("{}:{}", self.host, self.port)
            .parse()
            .or_else(|_| {
                use std::net::ToSocketAddrs;
                (self.host.as_str(), self.port).to_socket_addrs().ok().and_then(|mut a| a.next()).ok_or(())
            })
            .map_err(|_| ConfigError::Address(format!("{}:{}", self.host, self.port)))?;
        let model = match self.model {
            Some(path) if path.exists() => path,
            Some(path) => return Err(ConfigError::ModelMissing(path.display().to_string())),
            None => {
                let path = default_model_path();
                if !path.exists() {
                    return Err(ConfigError::DefaultModelMissing(path.display().to_string()));
                }
                path
            }
        };
        let chat_template_override =
            match &self.chat_template {
                Some(path) => Some(std::fs::read_to_string(path).map_err(|e| ConfigError::ChatTemplate {
                    path: path.display().to_string(),
                    message: e.to_string(),
                })?),
                None => None,
            };
        let chat_template_kwargs = match &self.chat_template_kwargs {
            Some(text) => match serde_json::from_str(text) {
                Ok(serde_json::Value::Object(map)) => map,
                Ok(_) => return Err(ConfigError::Kwargs("not an object".into())),
                Err(e) => return Err(ConfigError::Kwargs(e.to_string())),
            },
            None => serde_json::Map::new(),
        };
        let (found_adapters, adapters) = startup_adapters(&self.adapters_dir, &self.lora)?;
        let metrics = std::sync::Arc::new(crate::metrics::Metrics::new());
        let mut roots =
            if self.lora_roots.is_empty() { vec![self.adapters_dir.clone()] } else { self.lora_roots.clone() };
        // Canonical roots, so a symlink cannot lead a runtime load elsewhere.
        roots = roots.iter().filter_map(|r| std::fs::canonicalize(r).ok()).collect();
        if let Some(len) = self.max_model_len {
            if len < 2 || len > self.max_kv_tokens {
                return Err(ConfigError::Invalid(format!(
                    "--max-model-len {len} must be at least 2 and within --max-kv-tokens {} (a longer request could never run)",
                    self.max_kv_tokens
                )));
            }
        }
        if self.max_num_seqs == 0 {
            return Err(ConfigError::Invalid("--max-num-seqs must be at least 1".into()));
        }
        let seconds = |flag: &str, value: f64| {
            if value.is_finite() && value > 0.0 {
                Ok(std::time::Duration::from_secs_f64(value))
            } else {
                Err(ConfigError::Invalid(format!("{flag} must be a positive number of seconds")))
            }
        };
        let stream_write_timeout = seconds("--stream-write-timeout", self.stream_write_timeout)?;
        let shutdown_timeout = seconds("--shutdown-timeout", self.shutdown_timeout)?;
        let connections = crate::connections::ConnectionLimits {
            max_connections: self.max_connections.max(1),
            header_timeout: seconds("--header-timeout", self.header_timeout)?,
            keep_alive_timeout: seconds("--keep-alive-timeout", self.keep_alive_timeout)?,
        };
        let allowed_hosts = if self.allowed_hosts.is_empty() {
            default_allowed_hosts(&addr)
        } else {
            self.allowed_hosts.iter().map(|h| h.trim().to_ascii_lowercase()).filter(|h| !h.is_empty()).collect()
        };
        let nonempty = |keys: Vec<String>, flag: &str| {
            let keys: Vec<String> = keys.into_iter().map(|k| k.trim().to_string()).collect();
            if keys.iter().any(|k| k.is_empty()) {
                return Err(ConfigError::Invalid(format!("{flag}: a key cannot be empty")));
            }
            Ok(keys)
        };
        let keys = Keys {
            api: nonempty(self.api_keys, "--api-key")?,
            admin: nonempty(self.admin_api_keys, "--admin-api-key")?,
        };
        if self.threads == Some(0) {
            return Err(ConfigError::Invalid("--threads must be at least 1".into()));
        }
        Ok(ServeConfig {
            addr,
            model,
            load: LoadOptions {
                mode: match self.quantize {
                    Some(to) => WeightMode::QuantizeTo(to),
                    None => self.dtype.weight_mode(),
                },
                dense_small_models: self.quantize.is_none() && self.dtype == DTypeArg::Auto,
                chat_template_override,
                served_model_name: self.served_model_name,
                adapters,
                found_adapters,
                max_model_len: match self.max_model_len {
                    Some(len) => crate::loader::ContextCap::Asked(len),
                    None => crate::loader::ContextCap::Budget(self.max_kv_tokens),
                },
                registry: crate::lora::RegistryOptions {
                    max_rank: self.max_lora_rank,
                    max_loaded: self.max_loaded_adapters,
                    memory_budget: self.adapter_memory,
                    roots,
                    max_adapters: self.max_adapters,
                    resolve: self.resolve_adapters,
                    max_per_request: self.max_adapters_per_request.into(),
                    load_seconds: Some(metrics.adapter_load_seconds.clone()),
                },
            },
            engine: EngineConfig {
                max_num_seqs: self.max_num_seqs,
                max_waiting: self.max_waiting,
                threads: self
                    .threads
                    .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)),
                max_kv_tokens: self.max_kv_tokens,
                max_batch_tokens: self.max_batch_tokens,
                prefix_cache_tokens: self.prefix_cache_tokens,
                metrics,
                #[cfg(feature = "fault-injection")]
                faults: crate::engine::faults::Faults {
                    step_panic_token: self.fault_step_panic_token,
                    engine_panic_token: self.fault_engine_panic_token,
                },
            },
            threads: self.threads,
            chat_template_kwargs,
            tool_call_parser: self.tool_call_parser,
            enable_lora_loading: self.enable_lora_loading,
            templates_dir: self.templates_dir,
            presets: self.presets,
            keys,
            prefix_cache_isolation: self.prefix_cache_isolation,
            allowed_origins: self.allowed_origins,
            allowed_hosts,
            connections,
            max_body_bytes: self.max_body_bytes,
            max_file_bytes: self.max_file_bytes,
            data_dir: self.data_dir.unwrap_or_else(|| cache_dir().join("data")),
            train_threads: self.train_threads.max(1),
            max_train_memory: self
                .max_train_memory
                .unwrap_or_else(|| crate::train::limits::machine_memory().map_or(u64::MAX, |total| total / 4 * 3)),
            storage: crate::finetune::StorageLimits {
                max_files: self.max_files,
                max_queued_jobs: self.max_queued_jobs,
                max_stored_bytes: self.max_stored_bytes,
                min_free_bytes: self.min_free_disk,
            },
            fine_tuning_worker: match self.fine_tuning_worker {
                Some(path) => path,
                None => std::env::current_exe()
                    .map_err(|e| ConfigError::Invalid(format!("cannot find this program's path: {e}")))?,
            },
            stream_write_timeout,
            shutdown_timeout,
        })
    }
}

/// Adapters to register at start: (sub-folders of `dir` that hold an
/// adapter_config.json, `--lora NAME=PATH`); a `--lora` name replaces a
/// folder of the same name.
#[allow(clippy::type_complexity)]
fn startup_adapters(
    dir: &std::path::Path,
    extra: &[String],
) -> Result<(Vec<(String, PathBuf)>, Vec<(String, PathBuf)>), ConfigError> {
    let mut found = Vec::new();
    let mut named = Vec::new();
    if dir.is_dir() {
        let entries = std::fs::read_dir(dir)
            .map_err(|e| ConfigError::AdaptersDir { path: dir.display().to_string(), message: e.to_string() })?;
        let mut folders: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.join("adapter_config.json").is_file())
            .collect();
        folders.sort();
        for folder in folders {
            if let Some(name) = folder.file_name().and_then(|n| n.to_str()) {
                found.push((name.to_string(), folder.clone()));
            }
        }
    }
    for spec in extra {
        let (name, path) = spec.split_once('=').ok_or_else(|| ConfigError::Lora(spec.clone()))?;
        found.retain(|(n, _)| n != name);
        named.push((name.to_string(), PathBuf::from(path)));
    }
    Ok((found, named))
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::ServeArgs;

    #[derive(clap::Parser)]
    struct Serve {
        #[command(flatten)]
        args: ServeArgs,
    }

    #[test]
    fn sizes_read_with_their_units() {
        assert_eq!(super::parse_bytes("1048576"), Ok(1 << 20));
        assert_eq!(super::parse_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(super::parse_bytes("8GB"), Ok(8_000_000_000));
        assert_eq!(super::parse_bytes(" 1 gib "), Ok(1 << 30));
        assert!(super::parse_bytes("1.5GiB").is_err());
        assert!(super::parse_bytes("12 parsecs").is_err());
        assert!(super::parse_bytes("99999999999TiB").is_err());
    }

    /// The reference names every flag an operator can set.
    #[test]
    fn every_serve_flag_is_in_the_configuration_reference() {
        let reference = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/configuration.md"))
            .expect("docs/configuration.md");
        let command = Serve::command();
        for arg in command.get_arguments().filter(|a| !a.is_hide_set()) {
            let Some(long) = arg.get_long() else { continue };
            assert!(reference.contains(&format!("`--{long}")), "--{long} is not in docs/configuration.md");
            if let Some(env) = arg.get_env().and_then(|e| e.to_str()) {
                assert!(reference.contains(&format!("`{env}`")), "{env} is not in docs/configuration.md");
            }
        }
    }

    /// Containers and Kubernetes configure through the environment.
    #[test]
    fn every_serve_flag_has_a_tailor_environment_variable() {
        let command = Serve::command();
        let mut flags = 0;
        for arg in command.get_arguments().filter(|a| !a.is_hide_set()) {
            let Some(long) = arg.get_long() else { continue };
            let env = arg.get_env().and_then(|e| e.to_str());
            assert!(env.is_some_and(|e| e.starts_with("TAILOR_")), "--{long} has no TAILOR_* variable");
            flags += 1;
        }
        assert!(flags > 25, "only {flags} flags seen");
    }
}
