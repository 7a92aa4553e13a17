//! Shared set-up of the real-model tests: where the model and fixtures are,
//! one server per configuration for the whole binary, HTTP helpers.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;
use tailor::config::ServeArgs;

pub type TestResult = Result<(), Box<dyn std::error::Error>>;

/// The SmolLM2 GGUF: `$TAILOR_MODEL`, else the default cache location.
pub fn model_path() -> PathBuf {
    let path = std::env::var_os("TAILOR_MODEL").map(PathBuf::from).unwrap_or_else(tailor::config::default_model_path);
    assert!(
        path.is_file(),
        "the real-model tests need SmolLM2-135M-Instruct.Q4_1.gguf at {} — run scripts/fetch-model.sh",
        path.display()
    );
    path
}

pub fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2").join(rel)
}

pub fn read_json(rel: &str) -> Value {
    let path = fixture(rel);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array().expect("an id list").iter().map(|x| x.as_u64().expect("an id") as u32).collect()
}

/// Starts a server on an ephemeral port in its own thread and runtime (so it
/// outlives any one test's runtime) and waits until it is healthy.
pub fn start_server(extra_args: &[&str]) -> SocketAddr {
    use clap::Parser;
    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: ServeArgs,
    }
    let model = model_path();
    let mut argv =
        vec!["tailor".to_string(), "--port".into(), "0".into(), "--model".into(), model.display().to_string()];
    argv.extend(extra_args.iter().map(|s| s.to_string()));
    let config = Wrapper::parse_from(argv).args.into_config().expect("valid test config");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind(config.addr).await.expect("bind");
            tx.send(listener.local_addr().expect("addr")).expect("send addr");
            tailor::run(config, listener, std::future::pending()).await.expect("server");
        });
    });
    let addr = rx.recv().expect("server address");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(resp) = reqwest::blocking_get_status(&format!("http://{addr}/health")) {
            if resp == 200 {
                return addr;
            }
        }
        assert!(Instant::now() < deadline, "server did not become healthy");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The default quantized server shared by the API tests.
pub fn server() -> SocketAddr {
    static SERVER: OnceLock<SocketAddr> = OnceLock::new();
    *SERVER.get_or_init(|| start_server(&[]))
}

pub const MODEL_ID: &str = "SmolLM2-135M-Instruct.Q4_1";

/// A tiny blocking health probe, so start-up needs no runtime of its own.
mod reqwest {
    use std::io::{Read, Write};
    use std::net::TcpStream;

    pub fn blocking_get_status(url: &str) -> std::io::Result<u16> {
        let rest = url.trim_start_matches("http://");
        let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
        let mut stream = TcpStream::connect(host)?;
        write!(stream, "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let code = response.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        Ok(code)
    }
}
