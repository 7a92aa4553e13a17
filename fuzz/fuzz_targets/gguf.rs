//! The GGUF reader on arbitrary bytes: a file that is not a model must be an
//! error naming why, never a panic, an abort or an allocation the size of a
//! forged length field.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tailor::model::gguf::GgufSource;
use tailor::model::{Llama, WeightMode};

fuzz_target!(|data: &[u8]| {
    let Ok(dir) = tempfile::tempdir() else { return };
    let path = dir.path().join("model.gguf");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    for mode in [WeightMode::Quantized, WeightMode::F32] {
        if let Ok(mut source) = GgufSource::open(&path, mode) {
            let _ = Llama::load(&mut source);
        }
    }
    let _ = tailor::model::gguf::read_metadata(&path);
});
