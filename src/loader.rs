//! Turns a path into everything needed to serve a model: weights, tokenizer,
//! chat template, stop tokens and the id clients name it by.

use std::path::{Path, PathBuf};

use serde_json::Value as Json;

use crate::lora::{AdapterRegistry, BaseShapes, LoraError, RegistryOptions};
use crate::model::gguf::{self, GgufSource};
use crate::model::safetensors::SafetensorsSource;
use crate::model::source::WeightSource as _;
use crate::model::{Llama, ModelError, ModelFormat, WeightMode};
use crate::prompt::jinja::Clock;
use crate::prompt::{ChatTemplate, PromptError};
use crate::tokenizer::{Tokenizer, TokenizerError};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("{0}")]
    ChatTemplate(#[from] PromptError),
    #[error("{path}: {message}")]
    Path { path: String, message: String },
    #[error("adapter `{name}` ({path}): {source}")]
    Adapter { name: String, path: String, source: LoraError },
    #[error("{0}")]
    Context(String),
}

/// File name of the default model inside the model cache.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// Where fetched models live: `$TAILOR_CACHE`, else `$XDG_CACHE_HOME/tailor`, else `~/.cache/tailor`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TAILOR_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("tailor");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("tailor")
}

pub fn default_model_path() -> PathBuf {
    cache_dir().join("models").join(DEFAULT_MODEL_FILE)
}

/// Everything about the base model except its weights: shared with the HTTP side.
pub struct ModelInfo {
    /// The id clients name the base model by.
    pub id: String,
    pub tokenizer: Tokenizer,
    pub chat_template: Option<ChatTemplate>,
    /// Generation ends when one of these is produced.
    pub eos_token_ids: Vec<u32>,
    pub max_model_len: usize,
    /// The architecture's sizes (what a training run's memory depends on).
    pub config: crate::model::ModelConfig,
    /// Rows of the model's embedding table: a prompt id must be below both
    /// this and the tokenizer's size (the two can differ, e.g. padded tables).
    pub embedding_rows: usize,
    pub format: ModelFormat,
    pub mode: WeightMode,
    /// LoRA adapters clients can select by name.
    pub adapters: std::sync::Arc<AdapterRegistry>,
    /// Identifies the weights and chat template served (`system_fingerprint`).
    pub fingerprint: String,
    /// Constrained decoding over this vocabulary, built on first use.
    pub grammars: std::sync::OnceLock<Result<std::sync::Arc<crate::grammar::Grammars>, String>>,
}

impl ModelInfo {
    /// The matcher factory for this model's vocabulary (built once; slow-ish).
    pub fn grammars(&self) -> Result<std::sync::Arc<crate::grammar::Grammars>, String> {
        self.grammars
            .get_or_init(|| {
                let eos = self.eos_token_ids.first().copied().unwrap_or(0);
                crate::grammar::Grammars::new(&self.tokenizer, self.embedding_rows, eos)
                    .map(std::sync::Arc::new)
                    .map_err(|e| e.to_string())
            })
            .clone()
    }
}

pub struct Loaded {
    pub model: Llama,
    pub info: ModelInfo,
}

#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub mode: WeightMode,
    /// `--chat-template FILE`, replacing the model's own.
    pub chat_template_override: Option<String>,
    pub served_model_name: Option<String>,
    /// Adapters named at start (`--lora`): (name, folder); any failure stops the load.
    pub adapters: Vec<(String, PathBuf)>,
    /// Adapters found in the adapters folder: one made for another base
    /// model (its shapes do not fit) is skipped with a warning, so serving
    /// your own model from a checkout does not trip over the shipped demos;
    /// any other failure stops the load.
    pub found_adapters: Vec<(String, PathBuf)>,
    pub registry: RegistryOptions,
    /// `--dtype auto`: a model of at most `DENSE_BELOW_PARAMETERS` weights is
    /// served in float32 even when its file is quantized (`mode` applies otherwise).
    pub dense_small_models: bool,
    /// The longest prompt + completion served: `--max-model-len` (an error if
    /// the model's context is shorter), else the KV budget, within the context.
    pub max_model_len: ContextCap,
}

/// What caps the served context below the model's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContextCap {
    /// `--max-model-len`: must fit the model's context.
    Asked(usize),
    /// The KV budget (`--max-kv-tokens`): a request beyond it could never run.
    Budget(usize),
}

impl ContextCap {
    fn apply(self, context: usize) -> Result<usize, LoadError> {
        match self {
            ContextCap::Asked(asked) if asked > context => Err(LoadError::Context(format!(
                "--max-model-len {asked} is longer than the model's context of {context} tokens"
            ))),
            ContextCap::Asked(cap) | ContextCap::Budget(cap) => Ok(cap.min(context)),
        }
    }
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            mode: WeightMode::default(),
            chat_template_override: None,
            served_model_name: None,
            adapters: Vec::new(),
            found_adapters: Vec::new(),
            registry: RegistryOptions { max_rank: 64, ..Default::default() },
            max_model_len: ContextCap::Budget(usize::MAX),
            dense_small_models: false,
        }
    }
}

/// `fp_` and 16 hex digits of a hash of what decides the outputs: the
/// weights' file (path, size, modification time), the weight mode, the chat
/// template, and (for an adapter) its name and load generation.
pub fn fingerprint(parts: &[&str]) -> String {
    use std::hash::{Hash, Hasher};
    // SipHash with fixed keys: the same inputs give the same id across restarts.
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    parts.hash(&mut hasher);
    format!("fp_{:016x}", hasher.finish())
}

fn base_fingerprint(path: &Path, opts: &LoadOptions, template: Option<&str>) -> String {
    let meta = std::fs::metadata(path).ok();
    let modified =
        meta.as_ref().and_then(|m| m.modified().ok()).and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
    let stamp = format!("{:?} {:?}", meta.map(|m| m.len()), modified);
    fingerprint(&[&path.display().to_string(), &stamp, &format!("{:?}", opts.mode), template.unwrap_or("")])
}

/// Models this small are served in float32 by `--dtype auto`: their 8-bit
/// activations in quantized products cost them their answers (SmolLM2-135M
/// at Q4_1 answers "What is the capital of France?" with nonsense, as under
/// llama.cpp; in float32 with "Paris"), and their float32 weights are small.
pub const DENSE_BELOW_PARAMETERS: u64 = 200_000_000;

/// The mode a model is read in: `opts.mode`, or float32 for a small model
/// under `--dtype auto`.
fn effective_mode(resolved: &Resolved, opts: &LoadOptions) -> Result<WeightMode, LoadError> {
    if !opts.dense_small_models || opts.mode != WeightMode::Quantized {
        return Ok(opts.mode);
    }
    let parameters = match resolved {
        Resolved::Gguf(file) => GgufSource::open(file, opts.mode)?.config().parameter_count(),
        Resolved::HuggingFace(dir) => SafetensorsSource::open(dir, opts.mode)?.config().parameter_count(),
    };
    let dense = parameters <= DENSE_BELOW_PARAMETERS;
    tracing::info!(parameters, dense, "--dtype auto: float32 weights for a model this small, else as stored");
    Ok(if dense { WeightMode::F32 } else { WeightMode::Quantized })
}

pub fn load(path: &Path, opts: &LoadOptions) -> Result<Loaded, LoadError> {
    let path_err = |message: String| LoadError::Path { path: path.display().to_string(), message };
    let resolved = resolve(path).map_err(path_err)?;
    let opts = &LoadOptions { mode: effective_mode(&resolved, opts)?, dense_small_models: false, ..opts.clone() };
    let (model, mut info) = match &resolved {
        Resolved::Gguf(file) => load_gguf(file, opts)?,
        Resolved::HuggingFace(dir) => load_hf(dir, opts)?,
    };
    if let Some(source) = &opts.chat_template_override {
        let (bos, eos) = match &info.chat_template {
            Some(t) => t.special_tokens(),
            None => (None, None),
        };
        info.chat_template = Some(ChatTemplate::new(source, bos, eos, Clock::Local)?);
    }
    info.fingerprint = base_fingerprint(path, opts, info.chat_template.as_ref().map(ChatTemplate::source));
    let found = opts.found_adapters.iter().map(|a| (a, true));
    for ((name, path), found) in found.chain(opts.adapters.iter().map(|a| (a, false))) {
        let adapter_err = |source| LoadError::Adapter { name: name.clone(), path: path.display().to_string(), source };
        if *name == info.id {
            return Err(adapter_err(LoraError::NameTaken(name.clone())));
        }
        // With resolution on, the folder's adapters are named at once and
        // read on first use (thousands start in milliseconds).
        let registered = if found && opts.registry.resolve {
            info.adapters.register_lazily(name, path, true)
        } else {
            info.adapters.register(name, path, true)
        };
        match registered {
            Err(LoraError::Mismatch(why)) if found => {
                tracing::warn!(adapter = %name, path = %path.display(), reason = %why, "skipped: made for another base model");
            }
            result => result.map_err(adapter_err)?,
        }
    }
    Ok(Loaded { model, info })
}

/// The weights of a model alone, read in `mode` (training reads the frozen
/// base through it, dense).
pub fn open_weights(path: &Path, mode: WeightMode) -> Result<Box<dyn crate::model::source::WeightSource>, LoadError> {
    let path_err = |message: String| LoadError::Path { path: path.display().to_string(), message };
    Ok(match resolve(path).map_err(path_err)? {
        Resolved::Gguf(file) => Box::new(GgufSource::open(&file, mode)?),
        Resolved::HuggingFace(dir) => Box::new(SafetensorsSource::open(&dir, mode)?),
    })
}

/// The tokenizer of a model alone (`tailor tokenize`): a GGUF's metadata is
/// read without its tensors (a vocabulary-only GGUF is enough), a folder
/// needs its tokenizer.json.
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer, LoadError> {
    let path_err = |message: String| LoadError::Path { path: path.display().to_string(), message };
    match resolve(path).map_err(path_err)? {
        Resolved::Gguf(file) => {
            let dir = file.parent().unwrap_or(Path::new("."));
            if let Some(t) = SideFiles::read(dir).tokenizer(dir)? {
                return Ok(t);
            }
            let md = gguf::read_metadata(&file)?;
            Ok(Tokenizer::from_gguf(&md)?)
        }
        Resolved::HuggingFace(dir) => SideFiles::read(&dir).tokenizer(&dir)?.ok_or_else(|| LoadError::Path {
            path: dir.display().to_string(),
            message: "a Hugging Face model folder needs tokenizer.json".into(),
        }),
    }
}

enum Resolved {
    Gguf(PathBuf),
    HuggingFace(PathBuf),
}

fn resolve(path: &Path) -> Result<Resolved, String> {
    if path.is_file() {
        return Ok(Resolved::Gguf(path.to_path_buf()));
    }
    if !path.is_dir() {
        return Err("no such file or folder".into());
    }
    if path.join("config.json").is_file() {
        return Ok(Resolved::HuggingFace(path.to_path_buf()));
    }
    let ggufs: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
        .collect();
    match ggufs.as_slice() {
        [one] => Ok(Resolved::Gguf(one.clone())),
        [] => Err("folder has neither config.json nor a .gguf file".into()),
        _ => Err("folder has several .gguf files; name one".into()),
    }
}

fn file_stem(path: &Path) -> String {
    path.file_stem()
        .or_else(|| path.file_name())
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into())
}

fn load_gguf(file: &Path, opts: &LoadOptions) -> Result<(Llama, ModelInfo), LoadError> {
    let mut source = GgufSource::open(file, opts.mode)?;
    let md = source.metadata();
    let dir = file.parent().unwrap_or(Path::new("."));
    let side = SideFiles::read(dir);
    let tokenizer = match side.tokenizer(dir)? {
        Some(t) => t,
        None => Tokenizer::from_gguf(md)?,
    };
    let token_text = |key: &str| -> Option<String> {
        let id = md.get(key)?.to_u32().ok()?;
        tokenizer.id_to_token(id)
    };
    let bos = side.special("bos_token").or_else(|| token_text("tokenizer.ggml.bos_token_id"));
    let eos = side.special("eos_token").or_else(|| token_text("tokenizer.ggml.eos_token_id"));
    let template_source = side.chat_template().or_else(|| gguf::string(md, "tokenizer.chat_template").ok());
    let mut eos_ids: Vec<u32> =
        ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"]
            .iter()
            .filter_map(|k| md.get(*k).and_then(|v| v.to_u32().ok()))
            .collect();
    eos_ids.extend(side.generation_eos_ids());
    let model = Llama::load(&mut source)?;
    let info =
        build_info(file_stem(file), tokenizer, template_source, bos, eos, eos_ids, &model, ModelFormat::Gguf, opts)?;
    Ok((model, info))
}

fn load_hf(dir: &Path, opts: &LoadOptions) -> Result<(Llama, ModelInfo), LoadError> {
    let mut source = SafetensorsSource::open(dir, opts.mode)?;
    let side = SideFiles::read(dir);
    let tokenizer = side.tokenizer(dir)?.ok_or_else(|| LoadError::Path {
        path: dir.display().to_string(),
        message: "a Hugging Face model folder needs tokenizer.json".into(),
    })?;
    let mut eos_ids = side.generation_eos_ids();
    if let Some(id) = side.special("eos_token").and_then(|t| tokenizer.token_to_id(&t)) {
        eos_ids.push(id);
    }
    let model = Llama::load(&mut source)?;
    let name = dir.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    let info = build_info(
        name,
        tokenizer,
        side.chat_template(),
        side.special("bos_token"),
        side.special("eos_token"),
        eos_ids,
        &model,
        ModelFormat::HuggingFace,
        opts,
    )?;
    Ok((model, info))
}

/// Token texts that end a turn in the families' chat templates.
const END_OF_TURN: [&str; 9] = [
    "<|eot_id|>",
    "<|eom_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<end_of_turn>",
    "<EOT>",
    "<｜end▁of▁sentence｜>",
];

#[allow(clippy::too_many_arguments)]
fn build_info(
    id: String,
    tokenizer: Tokenizer,
    template_source: Option<String>,
    bos: Option<String>,
    eos: Option<String>,
    mut eos_token_ids: Vec<u32>,
    model: &Llama,
    format: ModelFormat,
    opts: &LoadOptions,
) -> Result<ModelInfo, LoadError> {
    // Chat templates end a turn with these whether or not the file lists
    // them as EOS (llama.cpp keeps the same list of end-of-generation texts).
    eos_token_ids.extend(END_OF_TURN.iter().filter_map(|t| tokenizer.token_to_id(t)));
    eos_token_ids.sort_unstable();
    eos_token_ids.dedup();
    let chat_template = template_source.map(|s| ChatTemplate::new(&s, bos, eos, Clock::Local)).transpose()?;
    let id = opts.served_model_name.clone().unwrap_or(id);
    Ok(ModelInfo {
        adapters: std::sync::Arc::new(AdapterRegistry::new(BaseShapes::of_model(model), opts.registry.clone(), &id)),
        id,
        tokenizer,
        chat_template,
        eos_token_ids,
        max_model_len: opts.max_model_len.apply(model.config().max_position_embeddings)?,
        config: model.config().clone(),
        embedding_rows: model.config().vocab_size,
        format,
        mode: opts.mode,
        fingerprint: String::new(),
        grammars: Default::default(),
    })
}

/// tokenizer.json, tokenizer_config.json and generation_config.json beside the weights.
struct SideFiles {
    tokenizer_config: Option<Json>,
    generation_config: Option<Json>,
    config: Option<Json>,
}

impl SideFiles {
    fn read(dir: &Path) -> Self {
        let json = |name: &str| -> Option<Json> {
            let text = std::fs::read_to_string(dir.join(name)).ok()?;
            serde_json::from_str(&text).ok()
        };
        Self {
            tokenizer_config: json("tokenizer_config.json"),
            generation_config: json("generation_config.json"),
            config: json("config.json"),
        }
    }

    fn tokenizer(&self, dir: &Path) -> Result<Option<Tokenizer>, LoadError> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Ok(None);
        }
        let mut tokenizer = Tokenizer::from_file(&path)?;
        let add_bos = self
            .tokenizer_config
            .as_ref()
            .and_then(|c| c.get("add_bos_token"))
            .and_then(Json::as_bool)
            .unwrap_or(false);
        let bos_id = self.special("bos_token").and_then(|t| tokenizer.token_to_id(&t));
        tokenizer.set_add_bos(add_bos, bos_id);
        Ok(Some(tokenizer))
    }

    /// A special token's text; tokenizer_config.json writes it as a string or
    /// as `{"content": ...}`.
    fn special(&self, key: &str) -> Option<String> {
        let v = self.tokenizer_config.as_ref()?.get(key)?;
        v.as_str().or_else(|| v.get("content").and_then(Json::as_str)).map(String::from)
    }

    fn chat_template(&self) -> Option<String> {
        match self.tokenizer_config.as_ref()?.get("chat_template")? {
            Json::String(s) => Some(s.clone()),
            // Several named templates: the one called "default".
            Json::Array(list) => list
                .iter()
                .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(Json::as_str)
                .map(String::from),
            _ => None,
        }
    }

    fn generation_eos_ids(&self) -> Vec<u32> {
        let from = |c: &Option<Json>| -> Vec<u32> {
            match c.as_ref().and_then(|c| c.get("eos_token_id")) {
                Some(Json::Number(n)) => n.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
                Some(Json::Array(a)) => a.iter().filter_map(|n| n.as_u64().map(|n| n as u32)).collect(),
                _ => Vec::new(),
            }
        };
        let mut ids = from(&self.generation_config);
        ids.extend(from(&self.config));
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::ContextCap;

    #[test]
    fn the_served_context_is_the_cap_within_the_model() {
        assert_eq!(ContextCap::Budget(65_536).apply(8192).ok(), Some(8192));
        assert_eq!(ContextCap::Budget(600).apply(8192).ok(), Some(600));
        assert_eq!(ContextCap::Asked(100).apply(8192).ok(), Some(100));
        let error = ContextCap::Asked(10_000).apply(8192).expect_err("longer than the model");
        assert!(error.to_string().contains("--max-model-len 10000"), "{error}");
    }
}
