//! A PEFT adapter from arbitrary bytes: `adapter_config.json` (the input up
//! to its first NUL) and `adapter_model.safetensors` (the rest), checked
//! against a tiny base. Whatever a runtime load reads must be refused with a
//! reason, never crash the server.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tailor::lora::adapter::{from_safetensors, BaseShapes};
use tailor::lora::config::AdapterConfig;
use tailor::model::random::RandomSource;

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    let (config, weights) = (&data[..split], data.get(split + 1..).unwrap_or_default());
    let Ok(text) = std::str::from_utf8(config) else { return };
    let Ok(config) = AdapterConfig::parse(text) else { return };
    let base = BaseShapes::of(&RandomSource::tiny_config(64));
    let _ = from_safetensors(&config, weights, &base, 16);
});
