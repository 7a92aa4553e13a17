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
    let path = std::env::var_os("TAILOR_MODEL").map(PathBuf::from).unwrap_or_else(tailor::loader::default_model_path);
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

/// One of the project's shipped adapters (`adapters/<name>`).
pub fn project_adapter(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("adapters").join(name)
}

/// Copies a flat folder (an adapter's files).
pub fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        std::fs::copy(entry.path(), to.join(entry.file_name()))?;
    }
    Ok(())
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
    let (done, _) = std::sync::mpsc::channel();
    spawn_server(extra_args, std::future::pending(), done)
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

/// A server whose shutdown the test triggers: (address, trigger, what `run` returned).
pub fn start_server_with_shutdown(
    extra_args: &[&str],
) -> (SocketAddr, tokio::sync::oneshot::Sender<()>, std::sync::mpsc::Receiver<std::io::Result<()>>) {
    let (trigger, shutdown) = tokio::sync::oneshot::channel::<()>();
    let (done_tx, done) = std::sync::mpsc::channel();
    let addr = spawn_server(
        extra_args,
        async move {
            let _ = shutdown.await;
        },
        done_tx,
    );
    (addr, trigger, done)
}

fn spawn_server(
    extra_args: &[&str],
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    done: std::sync::mpsc::Sender<std::io::Result<()>>,
) -> SocketAddr {
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
    if !extra_args.contains(&"--dtype") {
        // The default (`auto`) widens SmolLM2 to float32, ~0.9 GB a server;
        // dozens of test servers live as long as the binary, so they keep
        // the quantized weights (~0.4 GB) unless a test asks otherwise.
        argv.extend(["--dtype".to_string(), "quantized".to_string()]);
    }
    if !extra_args.contains(&"--prefix-cache-tokens") {
        // Test servers live as long as the test binary (dozens at once): a
        // smaller prefix cache than the default 8192 tokens (~380 MB of KV
        // for SmolLM2) keeps the binary well inside the machine's memory.
        argv.extend(["--prefix-cache-tokens".to_string(), "2048".to_string()]);
    }
    // Fine-tuning jobs train in the built `tailor` (the test binary is not it).
    argv.extend(["--fine-tuning-worker".to_string(), env!("CARGO_BIN_EXE_tailor").to_string()]);
    if !extra_args.contains(&"--data-dir") {
        // Each server its own fine-tuning data (one server per data directory).
        let data = tempfile::tempdir().expect("data dir").keep();
        argv.extend(["--data-dir".to_string(), data.display().to_string()]);
    }
    let config = Wrapper::parse_from(argv).args.into_config().expect("valid test config");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind(config.addr).await.expect("bind");
            tx.send(listener.local_addr().expect("addr")).expect("send addr");
            let _ = done.send(tailor::run(config, listener, shutdown).await);
        });
    });
    let addr = rx.recv().expect("server address");
    wait_healthy(addr);
    addr
}

/// `/health`'s status code, or None if nothing answers.
pub fn health_status(addr: SocketAddr) -> Option<u16> {
    reqwest::blocking_get_status(&format!("http://{addr}/health")).ok()
}

fn wait_healthy(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(200) = reqwest::blocking_get_status(&format!("http://{addr}/health")) {
            return;
        }
        assert!(Instant::now() < deadline, "server did not become healthy");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One sample of a scrape: (sample name, labels, value).
pub type Sample = (String, std::collections::BTreeMap<String, String>, f64);

/// A metric family as Prometheus' own parser (`prometheus_client`) reads it.
#[derive(Debug, serde::Deserialize)]
pub struct Family {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub samples: Vec<Sample>,
}

/// `/metrics`, parsed by the reference Python parser (a malformed exposition fails here).
pub async fn scrape(addr: SocketAddr) -> Result<Vec<Family>, Box<dyn std::error::Error>> {
    use std::io::Write;
    let text = ::reqwest::get(format!("http://{addr}/metrics")).await?.text().await?;
    let python = std::env::var("TAILOR_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = "import sys, json\nfrom prometheus_client.parser import text_string_to_metric_families as parse\n\
                  print(json.dumps([{'name': f.name, 'type': f.type, 'samples': [[s.name, s.labels, s.value] for s in f.samples]} for f in parse(sys.stdin.read())]))";
    let mut child = std::process::Command::new(&python)
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {python}: {e}"))?;
    child.stdin.take().ok_or("stdin")?.write_all(text.as_bytes())?;
    let output = child.wait_with_output()?;
    if !output.status.success() {
        return Err(format!(
            "prometheus_client cannot parse /metrics (scripts/test.sh installs it): {}\n{text}",
            String::from_utf8_lossy(&output.stderr)
        )
        .into());
    }
    Ok(serde_json::from_slice(&output.stdout)?)
}

/// The summed value of the samples named `sample` whose labels include `labels`.
pub fn value(families: &[Family], sample: &str, labels: &[(&str, &str)]) -> f64 {
    families
        .iter()
        .flat_map(|f| &f.samples)
        .filter(|(name, l, _)| name == sample && labels.iter().all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v)))
        .map(|(_, _, v)| v)
        .sum()
}

/// POSTs JSON to the server at `addr`: the status and the JSON body.
pub async fn post_at(addr: SocketAddr, path: &str, body: Value) -> Result<(u16, Value), Box<dyn std::error::Error>> {
    let response = ::reqwest::Client::new().post(format!("http://{addr}{path}")).json(&body).send().await?;
    let status = response.status().as_u16();
    Ok((status, response.json().await?))
}

/// POSTs JSON to the server at `addr`: the status and the body as text.
pub async fn post_text(addr: SocketAddr, path: &str, body: Value) -> Result<(u16, String), ::reqwest::Error> {
    let response = ::reqwest::Client::new().post(format!("http://{addr}{path}")).json(&body).send().await?;
    let status = response.status().as_u16();
    Ok((status, response.text().await?))
}

/// A streamed reply from the server at `addr`: the raw SSE text and its JSON chunks.
pub async fn stream_at(
    addr: SocketAddr,
    path: &str,
    body: Value,
) -> Result<(String, Vec<Value>), Box<dyn std::error::Error>> {
    let text = ::reqwest::Client::new().post(format!("http://{addr}{path}")).json(&body).send().await?.text().await?;
    let chunks = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|l| *l != "[DONE]")
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    Ok((text, chunks))
}

/// Runs `tests/<script>` with `args` under the test Python; its output on
/// failure, naming the packages it `needs` (scripts/test.sh installs them).
pub fn run_python_script(script: &str, args: &[&str], needs: &str) -> TestResult {
    python_script_output(script, args, needs).map(|_| ())
}

/// Runs `tests/<script>` like `run_python_script`; what it printed to stdout.
pub fn python_script_output(script: &str, args: &[&str], needs: &str) -> Result<String, Box<dyn std::error::Error>> {
    let python = std::env::var("TAILOR_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let path = format!("{}/tests/{script}", env!("CARGO_MANIFEST_DIR"));
    let output = std::process::Command::new(&python)
        .arg(&path)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {python}: {e}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{script} failed (are {needs} installed? scripts/test.sh installs them)\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    println!("{stdout}{stderr}");
    Ok(stdout.into_owned())
}

/// The `tailor` binary serving the test model, its stderr collected.
pub struct Served {
    child: std::process::Child,
    pub addr: SocketAddr,
    logs: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Served {
    pub fn start(extra: &[&str]) -> Result<Self, Box<dyn std::error::Error>> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let model = model_path();
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tailor"))
            .args(["serve", "--port", &port.to_string(), "--model", &model.display().to_string()])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        let logs = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let stderr = child.stderr.take().ok_or("stderr")?;
        let sink = logs.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap_or_else(|p| p.into_inner()).push_str(&(line + "\n"));
            }
        });
        let served = Self { child, addr: SocketAddr::from(([127, 0, 0, 1], port)), logs };
        let deadline = Instant::now() + Duration::from_secs(120);
        while !served.healthy() {
            assert!(Instant::now() < deadline, "the server never became healthy: {}", served.logs());
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(served)
    }

    pub fn child_id(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, and waits for the process to go.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn healthy(&self) -> bool {
        health_status(self.addr) == Some(200)
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn signal(&self, name: &str) -> Result<(), Box<dyn std::error::Error>> {
        let status =
            std::process::Command::new("kill").args([&format!("-{name}"), &self.child.id().to_string()]).status()?;
        assert!(status.success());
        Ok(())
    }

    /// Waits for the process to exit.
    pub fn exit(&mut self, limit: Duration) -> Result<std::process::ExitStatus, Box<dyn std::error::Error>> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                return Err(format!("still running after {limit:?}: {}", self.logs()).into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
