//! A PEFT adapter from arbitrary bytes: `adapter_config.json` (the input up
//! to its first NUL) and `adapter_model.safetensors` (the rest), checked
//! against a tiny base. Whatever a runtime load reads must be refused with a
//! reason, never crash the server.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tailor::lora::adapter::{from_tensors, BaseShapes};
use tailor::lora::config::AdapterConfig;
use tailor::model::random::RandomSource;

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    let (config, weights) = (&data[..split], data.get(split + 1..).unwrap_or_default());
    let Ok(text) = std::str::from_utf8(config) else { return };
    let Ok(config) = AdapterConfig::parse(text) else { return };
    let Ok(tensors) = candle_core::safetensors::load_buffer(weights, &candle_core::Device::Cpu) else { return };
    let base = BaseShapes::of(&RandomSource::tiny_config(64));
    let _ = from_tensors(&config, tensors, &base, 16);
});
