//! The official `openai` and `anthropic` Python SDKs against the running
//! server: clients that nobody here wrote. `scripts/test.sh` installs them.

use crate::common::{run_python_script, server, start_server, TestResult, MODEL_ID};

const NEEDS: &str = "openai, anthropic and jsonschema";

/// Runs one of the SDK scripts against the shared server.
fn run_script(script: &str, args: &[&str]) -> TestResult {
    run_script_at(&format!("http://{}/v1", server()), script, args)
}

fn run_script_at(base_url: &str, script: &str, args: &[&str]) -> TestResult {
    let mut all = vec![base_url];
    all.extend_from_slice(args);
    run_python_script(script, &all, NEEDS)
}

#[test]
fn official_openai_python_client_works() -> TestResult {
    run_script("openai_sdk.py", &[MODEL_ID])
}

#[test]
fn structured_output_and_tools_through_the_openai_client() -> TestResult {
    run_script("openai_sdk_structured.py", &[MODEL_ID, "pirate", "shout", "json"])
}

#[test]
fn responses_api_through_the_openai_client_equals_chat() -> TestResult {
    run_script("openai_responses.py", &[MODEL_ID, "pirate", "pirate-chat"])
}

#[test]
fn messages_api_through_the_anthropic_client_equals_chat() -> TestResult {
    // With a key: the anthropic SDK sends it as `x-api-key`.
    let addr = start_server(&["--api-key", "sk-anthropic-test"]);
    run_script_at(
        &format!("http://{addr}"),
        "anthropic_messages.py",
        &[MODEL_ID, "pirate", "pirate-chat", "sk-anthropic-test"],
    )
}
