//! The official `openai` Python SDK against the running server: a client that
//! nobody here wrote. `scripts/test.sh` installs it.

use std::process::Command;

use crate::common::{server, TestResult, MODEL_ID};

#[test]
fn official_openai_python_client_works() -> TestResult {
    let python = std::env::var("TAILOR_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_sdk.py");
    let output = Command::new(&python)
        .arg(script)
        .arg(format!("http://{}/v1", server()))
        .arg(MODEL_ID)
        .output()
        .map_err(|e| format!("cannot run {python}: {e}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "openai SDK script failed (is `openai` installed? scripts/test.sh installs it)\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    println!("{stdout}");
    Ok(())
}

#[test]
fn structured_output_and_tools_through_the_openai_client() -> TestResult {
    let python = std::env::var("TAILOR_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_sdk_structured.py");
    let output = Command::new(&python)
        .arg(script)
        .arg(format!("http://{}/v1", server()))
        .args([MODEL_ID, "pirate", "shout", "json"])
        .output()
        .map_err(|e| format!("cannot run {python}: {e}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "structured SDK script failed (are `openai` and `jsonschema` installed? scripts/test.sh installs them)\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    println!("{stdout}");
    Ok(())
}
