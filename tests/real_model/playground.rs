//! The playground page in real headless Chromium (tests/playground.py):
//! compare, prompt view, chat, adapters, live view, the key prompt, a
//! phone-width window. `scripts/test.sh` installs Chromium and selenium.

use crate::common::{run_python_script, server, start_server, TestResult};

#[test]
fn playground_page_works_in_a_real_browser() -> TestResult {
    let keyed = start_server(&["--api-key", "sk-browser-test"]);
    let screenshot = format!("{}/playground-compare.png", env!("CARGO_TARGET_TMPDIR"));
    let (root, keyed) = (format!("http://{}", server()), format!("http://{keyed}"));
    run_python_script(
        "playground.py",
        &[&root, &keyed, "sk-browser-test", &screenshot],
        "chromium, chromium-driver and selenium",
    )?;
    println!("screenshot: {screenshot}");
    Ok(())
}
