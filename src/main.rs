//! The `tailor` command line: parse, then call the library.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use tailor::config::ServeArgs;

#[derive(Parser)]
#[command(
    name = "tailor",
    version,
    about = "OpenAI-compatible LLM server: one base model, per-request LoRA adapters and prompt templates"
)]
struct Cli {
    /// Log lines as text or as JSON objects (one per line).
    #[arg(long, global = true, env = "TAILOR_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once
enum Command {
    /// Serve the model over the OpenAI-compatible HTTP API.
    Serve(ServeArgs),
    /// Train a LoRA adapter on a frozen base (OpenAI fine-tuning JSONL in, PEFT folder out).
    Train(tailor::train::run::TrainArgs),
    /// Load-test any OpenAI-compatible server (tailor, vLLM, llama.cpp, ...).
    Bench(tailor::bench::BenchArgs),
    /// The model's decode step alone, in process: a batch on the base
    /// against the same batch over adapters, in alternating rounds.
    BenchStep(tailor::bench::step::StepArgs),
    /// Time the quantized matmul kernels alone (every ISA vs the scalar path).
    BenchKernels {
        /// Repetitions per measurement (the median is reported).
        #[arg(long, default_value_t = 50)]
        reps: usize,
        /// Compute threads.
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Tokenize text with a model's tokenizer (a vocabulary-only GGUF is
    /// enough): one line per case, each id preceded by a space, as in
    /// llama.cpp's `ggml-vocab-*.gguf.out` files.
    Tokenize {
        /// A GGUF file or a Hugging Face folder.
        #[arg(long)]
        model: PathBuf,
        /// A cases file in llama.cpp's `.inp` format (cases separated by lines `__ggml_vocab_test__`).
        #[arg(long, conflicts_with = "text", required_unless_present = "text")]
        input: Option<PathBuf>,
        /// One text.
        #[arg(long)]
        text: Option<String>,
    },
    /// Work with chat templates offline.
    #[command(subcommand)]
    ChatTemplate(ChatTemplateCommand),
    /// Write random PEFT LoRA adapters for a base model (benchmarks of many adapters).
    RandomAdapters(RandomAdaptersArgs),
    /// A fine-tuning job's training process, started by `tailor serve` (its
    /// run comes on stdin, its reports go to stdout).
    #[command(name = "fine-tune-worker", hide = true)]
    FineTuneWorker {
        /// The job it trains (for `ps`; the run itself comes on stdin).
        #[arg(long)]
        job: Option<String>,
    },
}

#[derive(clap::Args)]
struct RandomAdaptersArgs {
    /// The base model (a GGUF file or a Hugging Face folder): only its shapes are read.
    #[arg(long)]
    model: PathBuf,
    /// The folder to write them into (one sub-folder per adapter).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 20)]
    count: usize,
    /// Sub-folder names are PREFIX0, PREFIX1, ...
    #[arg(long, default_value = "adapter-")]
    prefix: String,
    /// Each adapter's rank is drawn uniformly from LOW-HIGH (or one number).
    #[arg(long, default_value = "8-64", value_parser = tailor::bench::workload::parse_range)]
    ranks: (usize, usize),
    /// Target modules: comma-separated q, k, v, o, gate, up, down, or all.
    #[arg(long, default_value = "all", value_parser = tailor::lora::random::parse_modules)]
    modules: std::vec::Vec<tailor::lora::Module>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Subcommand)]
enum ChatTemplateCommand {
    /// Render a case (cases.json format) exactly as transformers'
    /// apply_chat_template(tokenize=False) would: the text on stdout (exit 0),
    /// or the error on stderr (exit 1).
    Render(RenderArgs),
}

#[derive(clap::Args)]
struct RenderArgs {
    /// The Jinja template file (with --case).
    #[arg(long, requires = "case")]
    template: Option<PathBuf>,
    /// One case object: messages, tools, documents, add_generation_prompt,
    /// continue_final_message, kwargs, bos_token, eos_token, frozen_date.
    #[arg(long, conflicts_with = "cases")]
    case: Option<PathBuf>,
    /// A JSON list of cases; each is rendered with TEMPLATE_DIR/<template>.jinja
    /// and the results are printed as a JSON array.
    #[arg(long, requires = "template_dir")]
    cases: Option<PathBuf>,
    #[arg(long)]
    template_dir: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Logs go to stderr: stdout is for the data commands print.
    use std::io::IsTerminal;
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().with_current_span(true).with_span_list(false).init(),
    }
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Train(args) => train(args),
        Command::ChatTemplate(ChatTemplateCommand::Render(args)) => render(args),
        Command::Bench(args) => bench(args),
        Command::RandomAdapters(args) => random_adapters(args),
        Command::BenchKernels { reps, threads } => bench_kernels(reps, threads),
        Command::BenchStep(args) => bench_step(&args),
        Command::Tokenize { model, input, text } => tokenize(&model, input, text),
        Command::FineTuneWorker { .. } => std::process::exit(tailor::finetune::worker::child_main()),
    }
}

fn tokenize(model: &std::path::Path, input: Option<PathBuf>, text: Option<String>) -> anyhow::Result<()> {
    use std::io::Write;
    use tailor::tokenizer::{ids_line, vocab_test_cases};
    let tokenizer = tailor::loader::load_tokenizer(model)?;
    let file;
    let cases: Vec<&str> = match (&input, &text) {
        (Some(path), _) => {
            file = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
            vocab_test_cases(&file)
        }
        (None, Some(text)) => vec![text.as_str()],
        (None, None) => anyhow::bail!("give --input FILE or --text TEXT"),
    };
    let mut stdout = std::io::stdout().lock();
    for case in cases {
        writeln!(stdout, "{}", ids_line(&tokenizer.encode(case)?))?;
    }
    Ok(())
}

fn bench(args: tailor::bench::BenchArgs) -> anyhow::Result<()> {
    use std::io::Write;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let summary = runtime.block_on(tailor::bench::run(args))?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{}", serde_json::to_string_pretty(&summary)?)?;
    writeln!(stdout, "{}", summary.one_line())?;
    Ok(())
}

fn random_adapters(args: RandomAdaptersArgs) -> anyhow::Result<()> {
    use std::io::Write;
    let source = tailor::loader::open_weights(&args.model, tailor::model::WeightMode::Quantized)?;
    let base = tailor::lora::BaseShapes::of(source.config());
    let spec = tailor::lora::random::RandomAdapters {
        prefix: args.prefix,
        count: args.count,
        ranks: args.ranks,
        modules: args.modules,
        seed: args.seed,
    };
    let folders = tailor::lora::random::write(&args.out, &base, &spec)?;
    writeln!(std::io::stdout(), "wrote {} adapters under {}", folders.len(), args.out.display())?;
    Ok(())
}

fn train(args: tailor::train::run::TrainArgs) -> anyhow::Result<()> {
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tailor::train::run::AfterStep;
    tailor::server::set_compute_threads(args.threads);
    let interrupted = std::sync::Arc::new(AtomicBool::new(false));
    checkpoint_on_ctrl_c(interrupted.clone());
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("step {pos}/{len} [{bar:30}] {msg} ETA {eta}")?.progress_chars("=> "),
    );
    let mut smoothed: Option<f64> = None;
    let summary = tailor::train::run::train(&args, |step, total| {
        let s = smoothed.map_or(step.loss, |m| 0.9 * m + 0.1 * step.loss);
        smoothed = Some(s);
        let line =
            format!("loss {:.4} (smoothed {s:.4})  lr {:.2e}  {:.0} tok/s", step.loss, step.lr, step.tokens_per_second);
        if bar.is_hidden() {
            // Not a terminal (a log file): one line per step.
            eprintln!("step {}/{total}  {line}", step.step);
        }
        bar.set_length(total as u64);
        bar.set_position(step.step as u64);
        bar.set_message(line);
        if interrupted.load(Ordering::Relaxed) {
            bar.println("interrupted: saving the adapter trained so far");
            AfterStep::Checkpoint
        } else {
            AfterStep::Continue
        }
    })?;
    bar.finish();
    writeln!(std::io::stdout(), "{}", tailor::train::run::describe(&summary))?;
    Ok(())
}

/// The first Ctrl-C asks the run to stop after its step and save what it
/// trained; a second one quits at once.
fn checkpoint_on_ctrl_c(interrupted: std::sync::Arc<std::sync::atomic::AtomicBool>) {
    std::thread::spawn(move || {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
        runtime.block_on(async {
            if tokio::signal::ctrl_c().await.is_ok() {
                interrupted.store(true, std::sync::atomic::Ordering::Relaxed);
                eprintln!("\nCtrl-C: stopping after this step and saving a checkpoint (Ctrl-C again quits at once)");
                if tokio::signal::ctrl_c().await.is_ok() {
                    std::process::exit(130);
                }
            }
        });
    });
}

fn bench_step(args: &tailor::bench::step::StepArgs) -> anyhow::Result<()> {
    use std::io::Write;
    let report = tailor::bench::step::run(args)?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{}", serde_json::to_string_pretty(&report)?)?;
    writeln!(
        stdout,
        "{} rows over {} adapters ({} to a row): {:.2} ms a step against {:.2} ms on the base ({:.3}x)",
        report.rows, report.adapters, report.compose, report.adapters_ms_median, report.base_ms_median, report.ratio
    )?;
    Ok(())
}

fn bench_kernels(reps: usize, threads: Option<usize>) -> anyhow::Result<()> {
    use std::io::Write;
    tailor::server::set_compute_threads(threads);
    let results = tailor::model::kernels::bench::run(reps.max(1));
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{}", serde_json::to_string_pretty(&results)?)?;
    for r in &results {
        writeln!(
            stdout,
            "{:5} {:5}x{:<5} tokens {:3} {:10} {:8.3} ms (best {:7.3}) {:7.1} GMAC/s {:6.1} GB/s x{:.1} vs scalar",
            r.kernel, r.rows, r.cols, r.tokens, r.isa, r.ms, r.best_ms, r.gmacs, r.weight_gbs, r.speedup_vs_scalar
        )?;
    }
    Ok(())
}

fn render(args: RenderArgs) -> anyhow::Result<()> {
    use std::io::Write;
    use tailor::prompt::case::{render_all, RenderCase};
    let read =
        |path: &PathBuf| std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()));
    if let (Some(cases), Some(dir)) = (&args.cases, &args.template_dir) {
        let cases: Vec<RenderCase> =
            serde_json::from_str(&read(cases)?).context("--cases must be a JSON list of cases")?;
        let results = render_all(&cases, dir);
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "{}", serde_json::to_string_pretty(&results)?)?;
        return Ok(());
    }
    let (Some(template), Some(case)) = (&args.template, &args.case) else {
        anyhow::bail!("give --template FILE --case CASE.json, or --cases FILE --template-dir DIR");
    };
    let source = read(template)?;
    let case: RenderCase = serde_json::from_str(&read(case)?).context("--case must be one case object")?;
    match case.render(&source) {
        Ok(text) => {
            let mut stdout = std::io::stdout().lock();
            stdout.write_all(text.as_bytes())?;
            stdout.flush()?;
            Ok(())
        }
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = args.into_config()?;
    tailor::server::set_compute_threads(config.threads);
    match tailor::connections::raise_fd_limit() {
        Ok(files) if (files as usize) < config.connections.max_connections + 256 => tracing::warn!(
            files,
            max_connections = config.connections.max_connections,
            "the open-file limit is below --max-connections: connections beyond it wait"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read or raise the open-file limit"),
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.addr)
            .await
            .with_context(|| format!("cannot listen on {}", config.addr))?;
        tailor::run(config, listener, shutdown_signal()).await.context("server failed")
    })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
    tracing::info!("shutting down");
}
