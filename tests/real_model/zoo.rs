//! The model zoo (`../shared/fixtures/zoo`): one small random model per
//! family, as llama.cpp's converter writes it (GGUF) and as transformers
//! saves it (Hugging Face folder), with a PEFT adapter each and
//! transformers' float32 outputs. Read in place from `$TAILOR_ZOO`.

use std::path::PathBuf;
use std::sync::Arc;

use serde_json::Value;
use tailor::loader::{self, LoadOptions, Loaded};
use tailor::lora::{adapter, BaseShapes};
use tailor::model::WeightMode;

use crate::common::{ids, TestResult};
use crate::reference::{all_logits, greedy};

const FAMILIES: [&str; 5] = ["llama3", "llama2", "qwen2", "qwen3", "phi3"];
/// The zoo's contract: top-20 logits within 1e-3 of transformers' float32.
const F32_LOGIT_TOLERANCE: f32 = 1e-3;

/// The zoo folder: `$TAILOR_ZOO` (CI sets it; then a missing folder fails
/// the test), else `../shared/fixtures/zoo` beside the checkout if present.
fn zoo() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("TAILOR_ZOO") {
        let dir = PathBuf::from(dir);
        assert!(dir.is_dir(), "TAILOR_ZOO={} is not a folder", dir.display());
        return Some(dir);
    }
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/zoo");
    if dir.is_dir() {
        Some(dir)
    } else {
        eprintln!("zoo tests skipped: TAILOR_ZOO is not set and {} does not exist", dir.display());
        None
    }
}

fn reference(family_dir: &std::path::Path) -> Value {
    let path = family_dir.join("reference.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn load(path: &std::path::Path, mode: WeightMode) -> Loaded {
    loader::load(path, &LoadOptions { mode, ..Default::default() })
        .unwrap_or_else(|e| panic!("{} loads: {e}", path.display()))
}

fn argmax(v: &[f32]) -> u32 {
    tailor::engine::sampling::argmax(v)
}

/// The zoo contract for one loaded file, base and adapter.
fn check_family(label: &str, model: &Loaded, adapter_dir: &std::path::Path, reference: &Value) -> TestResult {
    let shapes = BaseShapes::of(model.model.config());
    let weights = Arc::new(adapter::load(adapter_dir, &shapes, 64)?);
    for (kind, adapter) in [("base", None), ("adapter", Some(&weights))] {
        for (i, case) in reference[kind].as_array().expect("cases").iter().enumerate() {
            let tokens = ids(&case["ids"]);
            let logits = all_logits(model, &tokens, adapter);
            let last = logits.last().expect("a position");
            let max_diff = ids(&case["top20_ids"])
                .iter()
                .zip(case["top20_logits"].as_array().expect("logits"))
                .map(|(&id, want)| (last[id as usize] - want.as_f64().expect("logit") as f32).abs())
                .fold(0f32, f32::max);
            println!("zoo {label} {kind} prompt {i}: max |Δ| top-20 logits = {max_diff:.2e}");
            assert!(max_diff < F32_LOGIT_TOLERANCE, "{label} {kind} prompt {i}: top-20 logits differ by {max_diff}");
            let got: Vec<u32> = logits.iter().map(|l| argmax(l)).collect();
            assert_eq!(got, ids(&case["argmax_all"]), "{label} {kind} prompt {i}: argmax at every position");
            let want = ids(&case["greedy12"]);
            // The reference treats EOS as an ordinary token: no stop ids.
            assert_eq!(greedy(model, &tokens, want.len(), &[], adapter), want, "{label} {kind} prompt {i}: greedy");
        }
    }
    Ok(())
}

#[test]
fn every_family_matches_transformers_from_gguf_and_hf_folder() -> TestResult {
    let Some(zoo) = zoo() else { return Ok(()) };
    for family in FAMILIES {
        let dir = zoo.join(family);
        let reference = reference(&dir);
        for (format, path) in [("gguf", dir.join("model.f16.gguf")), ("hf", dir.join("hf"))] {
            // Float32, and the default: F16 weights kept in 16 bits (the zoo's
            // weights are exact in float16, so both meet the float32 contract).
            let mut bytes = Vec::new();
            for mode in [WeightMode::F32, WeightMode::Quantized] {
                let model = load(&path, mode);
                bytes.push(model.model.projection_bytes());
                check_family(&format!("{family}/{format}/{mode:?}"), &model, &dir.join("adapter"), &reference)?;
            }
            // The default keeps the file's 16-bit weights: half the float32 bytes.
            assert_eq!(bytes[1] * 2, bytes[0], "{family}/{format}: 16-bit weights stay 16-bit");
        }
    }
    Ok(())
}

#[test]
fn gguf_tokenizers_give_transformers_ids_and_end_of_turn_stops() -> TestResult {
    let Some(zoo) = zoo() else { return Ok(()) };
    // Token texts that end a chat turn in each family's template.
    let turn_end = [
        ("llama3", "<|eot_id|>"),
        ("llama2", "</s>"),
        ("qwen2", "<|im_end|>"),
        ("qwen3", "<|im_end|>"),
        ("phi3", "<|end|>"),
    ];
    // The SentencePiece GGUFs here were converted from tokenizer.json alone,
    // which carries no piece scores (every score is -1000), so llama.cpp and
    // tailor merge them differently from transformers ("▁jump" + "s" vs
    // "▁j" + "umps"): their text-level proof is llama.cpp's vocabulary test
    // vectors (tests/tokenizer_vectors.rs), not these ids.
    let sentencepiece = ["llama2", "phi3"];
    for (family, end) in turn_end {
        let dir = zoo.join(family);
        let reference = reference(&dir);
        let model = load(&dir.join("model.f16.gguf"), WeightMode::F32);
        let tokenizer = &model.info.tokenizer;
        let prompts = reference["prompts"].as_array().expect("prompts");
        let cases = reference["base"].as_array().expect("cases");
        for (i, (text, case)) in prompts.iter().zip(cases).enumerate().filter(|_| !sentencepiece.contains(&family)) {
            let text = text.as_str().expect("text");
            // The raw prompts get BOS where the model asks for it; the chat
            // rendering carries its own.
            let got = if i < 3 { tokenizer.encode_prompt(text)? } else { tokenizer.encode(text)? };
            assert_eq!(got, ids(&case["ids"]), "{family} prompt {i} {text:?}");
        }
        let end_id = tokenizer.token_to_id(end).unwrap_or_else(|| panic!("{family} has {end}"));
        assert!(model.info.eos_token_ids.contains(&end_id), "{family}: {end} ends generation");
    }
    Ok(())
}

#[test]
fn tensors_the_model_code_would_ignore_are_refused() -> TestResult {
    // A Qwen3 checkpoint declared as Qwen2: its q_norm/k_norm would be
    // silently skipped (a wrong model), so loading must fail naming them.
    let Some(zoo) = zoo() else { return Ok(()) };
    let source = zoo.join("qwen3/hf");
    let dir = tempfile::tempdir()?;
    for entry in std::fs::read_dir(&source)? {
        let path = entry?.path();
        std::fs::copy(&path, dir.path().join(path.file_name().expect("name")))?;
    }
    let config_path = dir.path().join("config.json");
    let config = std::fs::read_to_string(&config_path)?.replace("\"qwen3\"", "\"qwen2\"");
    std::fs::write(&config_path, config)?;
    let err = loader::load(dir.path(), &LoadOptions { mode: WeightMode::F32, ..Default::default() })
        .err()
        .expect("a qwen3 checkpoint read as qwen2 is refused")
        .to_string();
    assert!(err.contains("q_norm") && err.contains("does not use"), "{err}");
    // An architecture tailor does not know is refused by name.
    let config = std::fs::read_to_string(&config_path)?.replace("\"qwen2\"", "\"gemma3\"");
    std::fs::write(&config_path, config)?;
    let err = loader::load(dir.path(), &LoadOptions::default()).err().expect("gemma3 is refused").to_string();
    assert!(err.contains("model_type `gemma3`"), "{err}");
    Ok(())
}

/// Top-1 − top-2 of a logit row.
fn margin(logits: &[f32]) -> f32 {
    let (mut first, mut second) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for &v in logits {
        if v > first {
            (first, second) = (v, first);
        } else if v > second {
            second = v;
        }
    }
    first - second
}

#[test]
fn every_kernel_type_and_bf16_keep_the_f32_top1_where_the_f32_margin_is_clear() -> TestResult {
    use tailor::model::kernels::half::HalfKind;
    use tailor::model::QuantType;
    let Some(zoo) = zoo() else { return Ok(()) };
    for family in FAMILIES {
        let dir = zoo.join(family);
        let reference = reference(&dir);
        let path = dir.join("model.f16.gguf");
        let exact = load(&path, WeightMode::F32);
        let cases = reference["base"].as_array().expect("cases");
        let f32_logits: Vec<Vec<Vec<f32>>> = cases.iter().map(|c| all_logits(&exact, &ids(&c["ids"]), None)).collect();
        // Our kernel types. (The K-quants need 256-wide rows: the zoo's
        // 32-wide models would fall back to these.)
        let kinds = [QuantType::Q4_0, QuantType::Q4_1, QuantType::Q5_0, QuantType::Q5_1, QuantType::Q8_0];
        let modes = kinds.map(WeightMode::QuantizeTo).into_iter().chain([WeightMode::Half(HalfKind::Bf16)]);
        for mode in modes {
            let quantized = load(&path, mode);
            let (mut compared, mut agreed, mut max_delta) = (0, 0, 0f32);
            for (case, want) in cases.iter().zip(&f32_logits) {
                let got = all_logits(&quantized, &ids(&case["ids"]), None);
                for (g, w) in got.iter().zip(want) {
                    max_delta = g.iter().zip(w).map(|(a, b)| (a - b).abs()).fold(max_delta, f32::max);
                    if margin(w) > 0.5 {
                        compared += 1;
                        agreed += usize::from(argmax(g) == argmax(w));
                    }
                }
            }
            println!("zoo {family} {mode:?}: top-1 kept at {agreed}/{compared} positions with f32 margin > 0.5; max |Δ| logit {max_delta:.3}");
            assert_eq!(agreed, compared, "{family} {mode:?}: top-1 where the f32 margin is > 0.5");
            // Random 32-wide models rarely have a margin above 0.5, so the
            // size of the error is checked too: 8-bit weights move these
            // logits (|l| ≲ 2) by under a tenth, 4- and 5-bit ones by more.
            let bound = match mode {
                WeightMode::QuantizeTo(QuantType::Q8_0) | WeightMode::Half(_) => 0.1,
                _ => 1.0,
            };
            assert!(max_delta < bound, "{family} {mode:?}: logits moved by {max_delta}");
        }
    }
    Ok(())
}

#[test]
fn demo_adapters_for_another_base_are_skipped_but_named_ones_must_fit() -> TestResult {
    // Serving your own model from a checkout: the shipped SmolLM2 adapters in
    // the adapters folder do not fit it and are skipped; the model's own
    // adapter there is served; the same misfit named with --lora stops the load.
    let Some(zoo) = zoo() else { return Ok(()) };
    let dir = zoo.join("llama3");
    let pirate = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("adapters/pirate");
    let found = vec![("pirate".to_string(), pirate.clone()), ("own".to_string(), dir.join("adapter"))];
    let opts = LoadOptions { mode: WeightMode::F32, found_adapters: found, ..Default::default() };
    let loaded = loader::load(&dir.join("model.f16.gguf"), &opts)?;
    assert!(!loaded.info.adapters.contains("pirate"), "the SmolLM2 adapter is skipped");
    assert!(loaded.info.adapters.contains("own"), "the model's own adapter is served");
    let named = LoadOptions { adapters: vec![("pirate".into(), pirate)], ..opts };
    let err = loader::load(&dir.join("model.f16.gguf"), &named).err().expect("a named misfit stops the load");
    assert!(err.to_string().contains("pirate"), "{err}");
    Ok(())
}

/// Training reaches every family the server serves: with the zoo's PEFT
/// adapter loaded to continue it (`--init-from`; Phi-3's on its fused
/// `qkv_proj` and `gate_up_proj`), the training loss over a reference prompt
/// equals the cross-entropy of the served model's logits with that adapter,
/// from the GGUF file and from the Hugging Face folder.
#[test]
fn training_matches_inference_in_every_family() -> TestResult {
    use tailor::train::{peft, Batch, TrainModel};
    let Some(zoo) = zoo() else { return Ok(()) };
    for family in FAMILIES {
        let dir = zoo.join(family);
        for path in [dir.join("model.f16.gguf"), dir.join("hf")] {
            let label = format!("{family}/{}", path.file_name().unwrap_or_default().to_string_lossy());
            let trained = TrainModel::<f32>::load(loader::open_weights(&path, WeightMode::F32)?.as_mut())?;
            let lora = peft::load(&dir.join("adapter"), &trained)?;
            let model = load(&path, WeightMode::F32);
            let served = Arc::new(adapter::load(&dir.join("adapter"), &BaseShapes::of(model.model.config()), 64)?);
            let reference = reference(&dir);
            for case in reference["adapter"].as_array().ok_or("cases")? {
                let tokens = ids(&case["ids"]);
                let batch = Batch { ids: vec![tokens.clone()], weights: vec![vec![1.0; tokens.len()]] };
                let (loss, _) = trained.loss(&batch, Some(&lora))?;
                let logits = all_logits(&model, &tokens, Some(&served));
                let mut sum = 0f64;
                for (pos, row) in logits.iter().enumerate().take(tokens.len() - 1) {
                    let top = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
                    let log_z = row.iter().map(|&v| (v as f64 - top).exp()).sum::<f64>().ln() + top;
                    sum += log_z - row[tokens[pos + 1] as usize] as f64;
                }
                let served_loss = sum / (tokens.len() - 1) as f64;
                let relative = (loss - served_loss).abs() / served_loss;
                println!("zoo {label}: training loss {loss:.6}, served {served_loss:.6} ({relative:.1e})");
                assert!(relative < 1e-5, "{label}: training loss {loss} vs served cross-entropy {served_loss}");
            }
        }
    }
    Ok(())
}
