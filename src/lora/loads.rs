//! Where adapter weights are read: a few threads of their own in the idle
//! scheduling class, so reading cold adapters delays only the
//! requests that need them, not the next token of the streams running (on a
//! machine whose cores the engine keeps busy, a load takes the time the
//! engine leaves).

use std::sync::mpsc::{channel, Sender};
use std::sync::Mutex;

type Job = Box<dyn FnOnce() + Send>;

/// The queue is unbounded: each job is a request already admitted within
/// the server's limits.
pub struct LoadThreads {
    jobs: Sender<Job>,
}

impl LoadThreads {
    pub fn new(threads: usize) -> Self {
        let (tx, rx) = channel::<Job>();
        let rx = std::sync::Arc::new(Mutex::new(rx));
        for index in 0..threads.max(1) {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new().name(format!("adapter-load-{index}")).spawn(move || {
                lower_priority();
                loop {
                    // The lock is held only to take the next job.
                    let job = match rx.lock() {
                        Ok(rx) => rx.recv(),
                        Err(poisoned) => poisoned.into_inner().recv(),
                    };
                    match job {
                        Ok(job) => job(),
                        Err(_) => return,
                    }
                }
            });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start an adapter load thread");
            }
        }
        Self { jobs: tx }
    }

    /// Runs `work` on a load thread; its result arrives on the receiver
    /// (closed without a value if the work panicked).
    pub fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> tokio::sync::oneshot::Receiver<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(work());
        });
        if let Err(std::sync::mpsc::SendError(job)) = self.jobs.send(job) {
            // No thread could start: do the work here rather than never.
            job();
        }
        rx
    }
}

/// Puts the calling thread in Linux's idle scheduling class: it runs on
/// time no other thread wants, and any waking thread of the engine takes
/// its core at once (a niceness alone leaves the engine's threads waiting
/// out the loader's time slice at each wake-up). Best effort: where it
/// fails, loads run at normal priority.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: a plain system call on the calling thread (pid 0), with a valid parameter.
        let result = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
        if result != 0 {
            tracing::debug!("cannot move the adapter load thread to the idle scheduling class");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn work_runs_on_a_load_thread_and_returns() {
        let threads = LoadThreads::new(2);
        let name = threads.run(|| std::thread::current().name().map(str::to_string)).await;
        assert!(name.ok().flatten().is_some_and(|n| n.starts_with("adapter-load-")));
        let results = futures::future::join_all((0..8).map(|i| threads.run(move || i * 2))).await;
        assert_eq!(
            results.into_iter().map(Result::ok).collect::<Vec<_>>(),
            (0..8).map(|i| Some(i * 2)).collect::<Vec<_>>()
        );
    }
}
