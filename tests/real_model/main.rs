//! Tests against the real SmolLM2-135M-Instruct model and the transformers
//! reference data. One binary, so the model is loaded as few times as possible.

mod api;
mod common;
mod compose;
mod fine_tuning;
mod fine_tuning_faults;
mod formats;
mod lora;
mod many_adapters;
mod merges;
mod openai_sdk;
mod openapi;
mod operations;
mod playground;
mod prefix_cache;
mod reference;
mod saved_modules;
mod structured;
mod templates;
mod tools;
mod train;
mod zoo;
