//! The default model's tokenizer (read from its GGUF, as the server reads
//! it, and from its tokenizer.json) and the byte tokenizer on arbitrary text and arbitrary ids: what a client sends to
//! `/tokenize`, `/detokenize` or as a prompt.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tailor::tokenizer::Tokenizer;

fn tokenizers() -> &'static [Tokenizer] {
    static TOKENIZERS: OnceLock<Vec<Tokenizer>> = OnceLock::new();
    TOKENIZERS.get_or_init(|| {
        let mut all = vec![Tokenizer::bytes().expect("the byte tokenizer")];
        let model = tailor::loader::default_model_path();
        all.push(tailor::loader::load_tokenizer(&model).expect("the default model (scripts/fetch-model.sh)"));
        // The same vocabulary through Hugging Face's tokenizer.json.
        let json = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/smollm2/tokenizer.json");
        all.push(Tokenizer::from_file(std::path::Path::new(json)).expect("tokenizer.json"));
        all
    })
}

fuzz_target!(|data: &[u8]| {
    for tokenizer in tokenizers() {
        let text = String::from_utf8_lossy(data);
        if let Ok(ids) = tokenizer.encode_prompt(&text) {
            let _ = tokenizer.decode(&ids, false);
        }
        let ids: Vec<u32> = data.chunks(4).map(|c| c.iter().fold(0u32, |v, &b| v << 8 | b as u32)).collect();
        let _ = tokenizer.decode(&ids, true);
        let _ = tokenizer.decode(&ids, false);
    }
});
