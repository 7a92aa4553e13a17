//! The `tailor chat-template render` command, run as a user runs it.

use std::process::Command;

use serde_json::Value;

const TEMPLATES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/chat_templates/templates");

fn corpus_case(id: &str) -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/chat_templates/cases.json");
    let cases: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(path).expect("cases.json")).expect("JSON");
    cases.into_iter().find(|c| c["case_id"] == id).expect("case exists")
}

fn tailor(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tailor")).args(args).output().expect("tailor runs")
}

#[test]
fn render_prints_exactly_the_expected_string() -> Result<(), Box<dyn std::error::Error>> {
    let case = corpus_case("meta-llama-Llama-3.2-3B-Instruct::fixed_date");
    let dir = tempfile::tempdir()?;
    let case_path = dir.path().join("case.json");
    std::fs::write(&case_path, case.to_string())?;
    let template = format!("{TEMPLATES}/meta-llama-Llama-3.2-3B-Instruct.jinja");
    let out = tailor(&["chat-template", "render", "--template", &template, "--case", &case_path.to_string_lossy()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8(out.stdout)?, case["expected"].as_str().expect("expected"));
    Ok(())
}

#[test]
fn raise_exception_goes_to_stderr_with_exit_1() -> Result<(), Box<dyn std::error::Error>> {
    let case = corpus_case("Apertus-8B-Instruct::content_parts");
    let dir = tempfile::tempdir()?;
    let case_path = dir.path().join("case.json");
    std::fs::write(&case_path, case.to_string())?;
    let template = format!("{TEMPLATES}/Apertus-8B-Instruct.jinja");
    let out = tailor(&["chat-template", "render", "--template", &template, "--case", &case_path.to_string_lossy()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert_eq!(String::from_utf8(out.stderr)?.trim_end(), case["expected_error"]["message"].as_str().expect("message"));
    Ok(())
}

#[test]
fn cases_mode_prints_one_result_per_case_in_order() -> Result<(), Box<dyn std::error::Error>> {
    let cases =
        vec![corpus_case("Qwen-Qwen2.5-7B-Instruct::single_user"), corpus_case("Apertus-8B-Instruct::content_parts")];
    let dir = tempfile::tempdir()?;
    let cases_path = dir.path().join("cases.json");
    std::fs::write(&cases_path, serde_json::to_string(&cases)?)?;
    let out =
        tailor(&["chat-template", "render", "--cases", &cases_path.to_string_lossy(), "--template-dir", TEMPLATES]);
    assert!(out.status.success());
    let results: Vec<Value> = serde_json::from_slice(&out.stdout)?;
    assert_eq!(results.len(), 2);
    assert_eq!(results[0]["case_id"], cases[0]["case_id"]);
    assert_eq!(results[0]["output"], cases[0]["expected"]);
    assert_eq!(results[1]["case_id"], cases[1]["case_id"]);
    assert_eq!(results[1]["error"], cases[1]["expected_error"]["message"]);
    Ok(())
}

/// llama.cpp's tokenizer test vectors: `$TAILOR_VOCABS` (scripts/test.sh
/// fetches them; then a missing folder fails), else the default cache folder.
fn vocab_dir() -> Option<std::path::PathBuf> {
    if let Some(dir) = std::env::var_os("TAILOR_VOCABS") {
        let dir = std::path::PathBuf::from(dir);
        assert!(dir.is_dir(), "TAILOR_VOCABS={} is not a folder", dir.display());
        return Some(dir);
    }
    let home = std::env::var_os("HOME")?;
    let dir = std::path::PathBuf::from(home).join(".cache/tailor/llama-vocabs");
    if dir.is_dir() {
        return Some(dir);
    }
    eprintln!("tokenizer vectors skipped: run scripts/fetch-vocabs.sh (scripts/test.sh does)");
    None
}

#[test]
fn tokenize_matches_llama_cpp_test_vectors_for_every_vocabulary() -> Result<(), Box<dyn std::error::Error>> {
    let Some(dir) = vocab_dir() else { return Ok(()) };
    let vocabs = [
        "llama-spm",
        "llama-bpe",
        "phi-3",
        "qwen2",
        "deepseek-llm",
        "deepseek-coder",
        "command-r",
        "gpt-2",
        "starcoder",
        "falcon",
        "mpt",
        "refact",
    ];
    for vocab in vocabs {
        let model = dir.join(format!("ggml-vocab-{vocab}.gguf"));
        let input = dir.join(format!("ggml-vocab-{vocab}.gguf.inp"));
        let out = tailor(&["tokenize", "--model", &model.to_string_lossy(), "--input", &input.to_string_lossy()]);
        assert!(out.status.success(), "{vocab}: {}", String::from_utf8_lossy(&out.stderr));
        let got = String::from_utf8(out.stdout)?;
        let want = std::fs::read_to_string(dir.join(format!("ggml-vocab-{vocab}.gguf.out")))?;
        assert_eq!(got.lines().count(), want.lines().count(), "{vocab}: one line per case");
        for (i, (g, w)) in got.lines().zip(want.lines()).enumerate() {
            assert_eq!(g.trim(), w.trim(), "{vocab}: case {i}");
        }
    }
    Ok(())
}

#[test]
fn tokenize_one_text() {
    let Some(dir) = vocab_dir() else { return };
    let model = dir.join("ggml-vocab-llama-spm.gguf");
    let out = tailor(&["tokenize", "--model", &model.to_string_lossy(), "--text", "Hello world"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The same ids llama.cpp's vectors give for "Hello world".
    assert_eq!(String::from_utf8_lossy(&out.stdout), " 15043 3186\n");
}

/// The image built without a registry is the users' image: docker/Dockerfile
/// and docker/Dockerfile.runtime share their runtime stage word for word.
#[test]
fn both_dockerfiles_share_one_runtime_stage() -> Result<(), Box<dyn std::error::Error>> {
    let marker = "# ---- runtime stage";
    let runtime = |file: &str| -> Result<String, Box<dyn std::error::Error>> {
        let text = std::fs::read_to_string(format!("{}/docker/{file}", env!("CARGO_MANIFEST_DIR")))?;
        let at = text.find(marker).ok_or(format!("{file} has no `{marker}` line"))?;
        Ok(text[at..].to_string())
    };
    let (users, local) = (runtime("Dockerfile")?, runtime("Dockerfile.runtime")?);
    assert!(users.contains("USER 10001") && users.contains("HEALTHCHECK"), "{users}");
    assert_eq!(users, local, "the runtime stages differ");
    Ok(())
}
