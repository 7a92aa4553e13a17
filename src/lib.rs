//! tailor: an OpenAI-compatible inference server for one base model, tailored
//! per request by LoRA adapters and prompt templates.
//!
//! Layout (data flows top to bottom):
//! - `api`: axum router, OpenAI wire types, errors, SSE;
//! - `prompt`: Jinja environment and chat templates;
//! - `engine`: the thread that owns the model, its queue and scheduler;
//! - `loader`: a path → weights, tokenizer and template;
//! - `model`: the transformer itself (candle);
//! - `tokenizer`: text ↔ ids, from tokenizer.json or GGUF metadata;
//! - `grammar`: constrained decoding (llguidance) from `response_format`;
//! - `metrics`: the Prometheus registry (vLLM's names and tailor's own);
//! - `train`: LoRA training (`tailor train`); `finetune`: the fine-tuning
//!   API's files and background jobs.

pub mod api;
pub mod bench;
pub mod config;
pub mod connections;
pub mod durable;
pub mod engine;
pub mod finetune;
pub mod grammar;
pub mod ids;
pub mod loader;
pub mod lora;
pub mod metrics;
pub mod model;
pub mod prompt;
pub mod rng;
pub mod server;
pub mod tokenizer;
pub mod train;

pub use config::ServeConfig;
pub use server::run;
