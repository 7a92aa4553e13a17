//! A fine-tuning job trains in a child process (`tailor fine-tune-worker`),
//! not in the server: a run that exhausts memory, aborts or is chosen by the
//! out-of-memory killer ends that job (failed, with the reason) while the
//! server keeps serving, and cancelling a job is ending its process.
//!
//! The protocol: the parent writes the run's `TrainArgs` as one JSON line to
//! the child's stdin and keeps stdin open; the child answers on stdout with
//! one JSON line per step (`{"step": …, "total": N}`), then `{"done": …}`
//! or `{"error": "…"}`. When stdin closes (the server is gone) the child
//! exits; on Linux it is also killed with its parent.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::train::run::{train, AfterStep, StepLog, TrainArgs, TrainError};

/// One line the child writes.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Report {
    Step { log: StepLog, total: usize },
    Done { adapter: PathBuf },
    Error { message: String },
}

/// The hidden subcommand the parent starts.
pub const SUBCOMMAND: &str = "fine-tune-worker";

/// A started child: kill it from any thread (cancel, shutdown) while the
/// worker thread reads its reports.
#[derive(Clone)]
pub struct Process(Arc<Mutex<Child>>);

impl Process {
    /// Ends the run at once. Safe after the child has exited (std never
    /// signals a process it has already reaped, so a reused pid is safe).
    pub fn kill(&self) {
        let mut child = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let _ = child.kill();
    }

    fn wait(&self) -> std::io::Result<ExitStatus> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).wait()
    }
}

/// How a run ended, as the parent saw it.
#[derive(Debug)]
pub enum Outcome {
    Trained {
        adapter: PathBuf,
    },
    /// The run reported an error (bad data, a shape it refuses, a write).
    Failed(String),
    /// The process ended without a report: killed, aborted, or crashed.
    Died(String),
}

/// The child's stdout, its reports one per line.
pub type Reports = BufReader<std::process::ChildStdout>;

/// Starts `exe fine-tune-worker --job JOB` on `args`, with `threads`
/// compute threads (rayon's pool in the child reads `RAYON_NUM_THREADS`);
/// the job id is there for `ps`.
pub fn start(exe: &Path, job: &str, args: &TrainArgs, threads: usize) -> std::io::Result<(Process, Reports)> {
    let mut command = Command::new(exe);
    command
        .args([SUBCOMMAND, "--job", job])
        .env("RAYON_NUM_THREADS", threads.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: between fork and exec only async-signal-safe calls are
        // made: prctl and a write to /proc via raw syscalls (no allocation).
        unsafe {
            command.pre_exec(|| {
                // Killed with the thread that started it (the fine-tuning
                // worker, which lives as long as the server).
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The out-of-memory killer takes the training run, never the server.
                let path = b"/proc/self/oom_score_adj\0";
                let fd = libc::open(path.as_ptr().cast(), libc::O_WRONLY);
                if fd >= 0 {
                    let value = b"1000";
                    libc::write(fd, value.as_ptr().cast(), value.len());
                    libc::close(fd);
                }
                Ok(())
            });
        }
    }
    let mut child = command.spawn()?;
    let stdout = child.stdout.take().ok_or_else(|| std::io::Error::other("no stdout"))?;
    let line = serde_json::to_string(args).map_err(std::io::Error::other)?;
    // Stdin stays with the child handle, open for the run (the child exits
    // when it closes); `wait` closes it.
    let sent = match child.stdin.as_mut() {
        Some(stdin) => writeln!(stdin, "{line}").and_then(|_| stdin.flush()),
        None => Err(std::io::Error::other("no stdin")),
    };
    let process = Process(Arc::new(Mutex::new(child)));
    if let Err(e) = sent {
        process.kill();
        let _ = process.wait();
        return Err(e);
    }
    Ok((process, BufReader::new(stdout)))
}

/// Reads the child's reports to its end, calling `step` on each step.
pub fn follow(process: &Process, stdout: Reports, mut step: impl FnMut(&StepLog, usize)) -> Outcome {
    let mut last = None;
    for line in stdout.lines() {
        let Ok(line) = line else { break };
        match serde_json::from_str::<Report>(&line) {
            Ok(Report::Step { log, total }) => step(&log, total),
            Ok(end) => last = Some(end),
            Err(e) => tracing::warn!(error = %e, %line, "unreadable line from the training process"),
        }
    }
    let status = process.wait();
    match (last, status) {
        (Some(Report::Done { adapter }), Ok(status)) if status.success() => Outcome::Trained { adapter },
        (Some(Report::Error { message }), _) => Outcome::Failed(message),
        (_, Ok(status)) => Outcome::Died(died(status)),
        (_, Err(e)) => Outcome::Died(format!("the training process could not be waited for: {e}")),
    }
}

/// Why a process ended without a report, in words.
fn died(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status.signal() {
        Some(libc::SIGKILL) => {
            "the training process was killed (SIGKILL; most often the out-of-memory killer: lower batch_size or max_seq_len)".into()
        }
        Some(libc::SIGABRT) => "the training process aborted (SIGABRT; most often a memory allocation that failed)".into(),
        Some(signal) => format!("the training process was killed by signal {signal}"),
        None => format!("the training process stopped on an internal error (exit status {})", status.code().unwrap_or(-1)),
    }
}

/// The child's side: reads the run from stdin, trains, reports on stdout.
/// Returns the process exit code.
pub fn child_main() -> i32 {
    let mut first = String::new();
    let stdin = std::io::stdin();
    if stdin.lock().read_line(&mut first).is_err() {
        return 2;
    }
    // The parent holds stdin open while it wants the run: its end is ours.
    std::thread::spawn(move || {
        let mut rest = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin().lock(), &mut rest);
        std::process::exit(3);
    });
    let report = |report: &Report| {
        let mut out = std::io::stdout().lock();
        let line = serde_json::to_string(report).unwrap_or_else(|_| "{}".into());
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    };
    let args: TrainArgs = match serde_json::from_str(&first) {
        Ok(args) => args,
        Err(e) => {
            report(&Report::Error { message: format!("the training process got no run: {e}") });
            return 1;
        }
    };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        train(&args, |log, total| {
            report(&Report::Step { log: log.clone(), total });
            AfterStep::Continue
        })
    }));
    match result {
        Ok(Ok(summary)) => {
            report(&Report::Done { adapter: summary.out });
            0
        }
        Ok(Err(e)) => {
            let message = match e {
                TrainError::Cancelled => "cancelled".to_string(),
                other => other.to_string(),
            };
            report(&Report::Error { message });
            1
        }
        Err(panic) => {
            let why = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("unknown");
            report(&Report::Error { message: format!("training stopped on an internal error ({why})") });
            1
        }
    }
}
