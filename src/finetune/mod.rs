//! The fine-tuning API's back end: uploaded files, and jobs that train a
//! LoRA adapter on the served base in the background, one at a time, each in
//! a child process (`worker`); a finished job's adapter is served at once
//! under `ft:<base>:<suffix>:<job id>`. Everything lives in the data
//! directory, written atomically, so jobs, their events and their adapters
//! come back after a restart: a job that was queued or running starts over,
//! a job whose process died (out of memory, an abort) has failed and is
//! never run again, and a job is `succeeded` only once its adapter is whole
//! on disk.
//!
//! - `files`: the uploaded files;
//! - `jobs`: jobs and events, and their folders;
//! - `storage`: the caps on what the data directory holds;
//! - `worker`: the training process and its reports.

pub mod files;
pub mod jobs;
pub mod storage;
pub mod worker;

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use serde_json::json;

use crate::ids::unix_now as now;
use crate::train::run::TrainArgs;
use files::FileStore;
use jobs::{Job, JobDirs, JobError, JobEvent, JobStatus, BASE_LEARNING_RATE};
pub use storage::StorageLimits;
use worker::Outcome;

#[derive(Debug, thiserror::Error)]
pub enum FineTuneError {
    #[error("cannot access {path}: {message}")]
    Io { path: String, message: String },
    #[error("{message}")]
    Invalid { message: String, param: Option<&'static str> },
    #[error("{0}")]
    NotFound(String),
    /// A storage cap or the disk's free space would be passed.
    #[error("{0}")]
    Full(String),
    /// Too many jobs wait already.
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    Internal(String),
}

impl FineTuneError {
    fn io(path: &Path) -> impl Fn(std::io::Error) -> FineTuneError + '_ {
        move |e| FineTuneError::Io { path: path.display().to_string(), message: e.to_string() }
    }

    pub fn invalid(message: impl Into<String>, param: &'static str) -> Self {
        FineTuneError::Invalid { message: message.into(), param: Some(param) }
    }
}

/// `dir`, created if missing (the data directory and its folders).
fn created(dir: &Path) -> Result<PathBuf, FineTuneError> {
    std::fs::create_dir_all(dir).map_err(FineTuneError::io(dir))?;
    Ok(dir.to_path_buf())
}

/// Writes JSON atomically and durably (a crash never leaves half of one).
fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<(), FineTuneError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| FineTuneError::Internal(e.to_string()))?;
    crate::durable::write(path, text.as_bytes()).map_err(FineTuneError::io(path))
}

/// Serves a trained adapter folder under a model id.
pub type Publish = Arc<dyn Fn(&str, &Path) -> Result<(), String> + Send + Sync>;

pub struct FineTuningConfig {
    pub data_dir: PathBuf,
    /// The base model's file or folder (training loads it in float32).
    pub model_path: PathBuf,
    /// Threads a training run computes on.
    pub train_threads: usize,
    /// The program a job trains in (`tailor`, run as `tailor fine-tune-worker`).
    pub worker_exe: PathBuf,
    pub limits: StorageLimits,
    /// Bytes a training run may use; larger runs are refused at creation.
    pub max_train_memory: u64,
}

/// The job in training and its process.
struct Running {
    id: String,
    process: worker::Process,
}

struct State {
    jobs: BTreeMap<String, Job>,
    queue: VecDeque<String>,
    running: Option<Running>,
    publish: Option<Publish>,
    stopping: bool,
}

pub struct FineTuning {
    pub files: FileStore,
    dirs: JobDirs,
    state: Mutex<State>,
    wake: Condvar,
    model_path: PathBuf,
    train_threads: usize,
    worker_exe: PathBuf,
    pub limits: StorageLimits,
    max_train_memory: u64,
    data_dir: PathBuf,
    worker: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// The data directory's lock, held until the service stops.
    dir_lock: Mutex<Option<std::fs::File>>,
}

impl FineTuning {
    /// Opens the data directory and starts the worker; jobs left queued or
    /// running by an earlier process are queued again.
    pub fn start(config: FineTuningConfig) -> Result<Arc<Self>, FineTuneError> {
        created(&config.data_dir)?;
        // One server per data directory: two would run each other's jobs.
        let lock_path = config.data_dir.join("lock");
        let lock = std::fs::File::create(&lock_path).map_err(FineTuneError::io(&lock_path))?;
        lock.try_lock().map_err(|_| {
            FineTuneError::Internal(format!("{} is in use by another tailor server", config.data_dir.display()))
        })?;
        let files = FileStore::open(&config.data_dir.join("files"))?;
        let dirs = JobDirs::open(&config.data_dir.join("fine_tuning"))?;
        let mut state =
            State { jobs: BTreeMap::new(), queue: VecDeque::new(), running: None, publish: None, stopping: false };
        for mut job in dirs.load_all() {
            dirs.discard_partial(&job.id);
            if !job.status.is_final() {
                job.status = JobStatus::Queued;
                job.estimated_finish = None;
                dirs.save(&job)?;
                dirs.append_event(&job.id, &JobEvent::message("warn", "The server restarted; the job starts over"))?;
                state.queue.push_back(job.id.clone());
            } else if job.status == JobStatus::Succeeded && !dirs.has_adapter(&job.id) {
                tracing::error!(job = %job.id, "a succeeded job's adapter is missing");
                job.status = JobStatus::Failed;
                job.fine_tuned_model = None;
                job.error = Some(JobError {
                    code: "adapter_missing".into(),
                    message: "the job's adapter files are missing from the data directory".into(),
                    param: None,
                });
                dirs.save(&job)?;
            }
            state.jobs.insert(job.id.clone(), job);
        }
        let service = Arc::new(FineTuning {
            files,
            dirs,
            state: Mutex::new(state),
            wake: Condvar::new(),
            model_path: config.model_path,
            train_threads: config.train_threads.max(1),
            worker_exe: config.worker_exe,
            limits: config.limits,
            max_train_memory: config.max_train_memory,
            data_dir: config.data_dir,
            worker: Mutex::new(None),
            dir_lock: Mutex::new(Some(lock)),
        });
        let worker = service.clone();
        let handle = std::thread::Builder::new()
            .name("fine-tuning".into())
            .spawn(move || work(worker))
            .map_err(|e| FineTuneError::Internal(format!("cannot start the fine-tuning worker: {e}")))?;
        *service.worker.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
        Ok(service)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The model is loaded: serve every trained adapter, and let jobs run.
    pub fn set_publisher(&self, publish: Publish) {
        let mut state = self.lock();
        for job in state.jobs.values().filter(|j| j.status == JobStatus::Succeeded) {
            let adapter = self.dirs.adapter_dir(&job.id);
            if let Err(e) = publish(&job.served_name(), &adapter) {
                tracing::warn!(job = %job.id, error = %e, "cannot serve a fine-tuned adapter");
            }
        }
        state.publish = Some(publish);
        self.wake.notify_all();
    }

    /// Stops the worker: a running job's process ends at once and the job
    /// is queued again (it starts over on the next start). Waits for the
    /// worker and lets the data directory go.
    pub fn stop(&self) {
        {
            let mut state = self.lock();
            state.stopping = true;
            if let Some(running) = &state.running {
                running.process.kill();
            }
            self.wake.notify_all();
        }
        if let Some(worker) = self.worker.lock().unwrap_or_else(|p| p.into_inner()).take() {
            if worker.join().is_err() {
                tracing::error!("the fine-tuning worker panicked");
            }
        }
        self.dir_lock.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// Checks a new job's files and the queue's room, and queues it.
    pub fn create(&self, mut job: Job) -> Result<Job, FineTuneError> {
        for (id, param) in std::iter::once((&job.training_file, "training_file"))
            .chain(job.validation_file.iter().map(|v| (v, "validation_file")))
        {
            match self.files.get(id) {
                Some(file) if file.purpose == "fine-tune" => {}
                Some(file) => {
                    return Err(FineTuneError::invalid(
                        format!("file {id} has purpose `{}`, not `fine-tune`", file.purpose),
                        param,
                    ))
                }
                None => return Err(FineTuneError::invalid(format!("no file {id}"), param)),
            }
        }
        let mut state = self.lock();
        let waiting = state.jobs.values().filter(|j| !j.status.is_final()).count();
        if waiting >= self.limits.max_queued_jobs {
            return Err(FineTuneError::Busy(format!(
                "{waiting} fine-tuning jobs are queued or running, the most this server keeps (--max-queued-jobs); \
                 try again when one ends"
            )));
        }
        self.limits.check_room(&self.data_dir, storage::JOB_BYTES)?;
        job.status = JobStatus::Queued;
        self.dirs.save(&job)?;
        self.event(&job.id, JobEvent::message("info", format!("Validating training file: {}", job.training_file)));
        self.event(&job.id, JobEvent::message("info", "Fine-tuning job created and queued"));
        state.queue.push_back(job.id.clone());
        state.jobs.insert(job.id.clone(), job.clone());
        self.wake.notify_all();
        Ok(job)
    }

    /// Threads a run computes on.
    pub fn train_threads(&self) -> usize {
        self.train_threads
    }

    /// Bytes a training run may use (`--max-train-memory`).
    pub fn max_train_memory(&self) -> u64 {
        self.max_train_memory
    }

    /// Stores an uploaded file, within the caps.
    pub fn store_file(
        &self,
        filename: &str,
        purpose: &str,
        content: &[u8],
    ) -> Result<files::FileObject, FineTuneError> {
        let count = self.files.count();
        if count >= self.limits.max_files {
            return Err(FineTuneError::Full(format!(
                "the data directory holds {count} files, the most this server keeps (--max-files); delete some first"
            )));
        }
        self.limits.check_room(&self.data_dir, content.len() as u64)?;
        self.files.create(filename, purpose, content)
    }

    /// The succeeded job whose adapter is served as `model`, if any.
    pub fn fine_tuned(&self, model: &str) -> Option<Job> {
        let state = self.lock();
        state
            .jobs
            .values()
            .find(|j| j.status == JobStatus::Succeeded && j.fine_tuned_model.as_deref() == Some(model))
            .cloned()
    }

    pub fn job(&self, id: &str) -> Result<Job, FineTuneError> {
        self.lock().jobs.get(id).cloned().ok_or_else(|| FineTuneError::NotFound(format!("no fine-tuning job {id}")))
    }

    /// Newest first.
    pub fn jobs(&self) -> Vec<Job> {
        let mut jobs: Vec<Job> = self.lock().jobs.values().cloned().collect();
        jobs.sort_by(|a, b| b.created_at.cmp(&a.created_at).then_with(|| b.id.cmp(&a.id)));
        jobs
    }

    /// Newest first.
    pub fn events(&self, id: &str) -> Result<Vec<JobEvent>, FineTuneError> {
        self.job(id)?;
        let mut events = self.dirs.events(id);
        events.reverse();
        Ok(events)
    }

    /// A queued job leaves the queue; a running one's process ends at once.
    /// A job that has ended (its adapter published, say) cannot be cancelled:
    /// the end and the cancel take the same lock, so exactly one of them wins.
    pub fn cancel(&self, id: &str) -> Result<Job, FineTuneError> {
        let mut state = self.lock();
        let job = state.jobs.get(id).ok_or_else(|| FineTuneError::NotFound(format!("no fine-tuning job {id}")))?;
        if job.status.is_final() {
            return Err(FineTuneError::invalid(
                format!("job {id} has already ended ({})", job.status.name()),
                "fine_tuning_job_id",
            ));
        }
        state.queue.retain(|queued| queued != id);
        if let Some(running) = state.running.as_ref().filter(|r| r.id == id) {
            running.process.kill();
        }
        let job = state.jobs.get_mut(id).ok_or_else(|| FineTuneError::Internal("job vanished".into()))?;
        job.status = JobStatus::Cancelled;
        job.finished_at = Some(now());
        job.estimated_finish = None;
        let job = job.clone();
        self.dirs.save(&job)?;
        drop(state);
        self.event(id, JobEvent::message("info", "The job was cancelled"));
        Ok(job)
    }

    fn event(&self, id: &str, event: JobEvent) {
        if let Err(e) = self.dirs.append_event(id, &event) {
            tracing::warn!(job = %id, error = %e, "cannot record a fine-tuning event");
        }
    }

    /// Changes a job that is still live (not ended, by a cancel say) under
    /// the lock, and saves it when `persist`.
    fn update_live(&self, state: &mut State, id: &str, persist: bool, change: impl FnOnce(&mut Job)) {
        let Some(job) = state.jobs.get_mut(id).filter(|j| !j.status.is_final()) else { return };
        change(job);
        if persist {
            if let Err(e) = self.dirs.save(job) {
                tracing::warn!(job = %id, error = %e, "cannot save a fine-tuning job");
            }
        }
    }

    /// The next queued job once the model is loaded; None when stopping.
    fn next(&self) -> Option<(Job, Publish)> {
        let mut state = self.lock();
        loop {
            if state.stopping {
                return None;
            }
            if let Some(publish) = state.publish.clone() {
                if let Some(id) = state.queue.pop_front() {
                    let Some(job) = state.jobs.get(&id).cloned() else { continue };
                    return Some((job, publish));
                }
            }
            state = self.wake.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn train_args(&self, job: &Job) -> Result<TrainArgs, FineTuneError> {
        let h = &job.hyperparameters;
        let file = |id: &str| self.files.path(id).ok_or_else(|| FineTuneError::NotFound(format!("file {id} is gone")));
        // A job on a fine-tuned model continues that job's adapter.
        let init_from = match &job.base_model {
            Some(_) => {
                let parent = self
                    .fine_tuned(&job.model)
                    .ok_or_else(|| FineTuneError::NotFound(format!("the fine-tuned model {} is gone", job.model)))?;
                Some(self.dirs.adapter_dir(&parent.id))
            }
            None => None,
        };
        let schedule = match h.lr_schedule.as_str() {
            "cosine" => crate::train::optim::Schedule::Cosine,
            "linear" => crate::train::optim::Schedule::Linear,
            _ => crate::train::optim::Schedule::Constant,
        };
        Ok(TrainArgs {
            model: Some(self.model_path.clone()),
            data: file(&job.training_file)?,
            validation: job.validation_file.as_deref().map(file).transpose()?,
            out: self.dirs.partial_adapter_dir(&job.id),
            rank: h.lora_rank,
            alpha: h.lora_alpha,
            target_modules: h.target_modules.clone(),
            use_rslora: h.use_rslora,
            steps: h.n_steps,
            epochs: h.n_steps.is_none().then_some(h.n_epochs),
            batch_size: h.batch_size,
            lr: BASE_LEARNING_RATE * h.learning_rate_multiplier,
            warmup: h.warmup_steps,
            schedule,
            schedule_steps: h.lr_schedule_steps,
            min_lr_ratio: h.min_lr_ratio,
            max_seq_len: h.max_seq_len,
            grad_accum: 1,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            seed: job.seed,
            threads: None,
            template: None,
            eval_prompts: None,
            init_from,
        })
    }

    /// Trains one job to its end: succeeded, failed, cancelled, or queued
    /// again when the server stops under it.
    fn run(&self, job: Job, publish: &Publish) {
        let id = job.id.clone();
        let started = self.train_args(&job).and_then(|args| {
            self.dirs.discard_partial(&id);
            worker::start(&self.worker_exe, &id, &args, self.train_threads)
                .map_err(|e| FineTuneError::Internal(format!("cannot start the training process: {e}")))
        });
        let (process, reports) = match started {
            Ok(started) => started,
            Err(e) => return self.fail(&id, "training_failed", e.to_string()),
        };
        {
            let mut state = self.lock();
            // Cancelled, or the server stopping, between the queue and here.
            if state.stopping || state.jobs.get(&id).is_none_or(|j| j.status.is_final()) {
                process.kill();
            }
            self.update_live(&mut state, &id, true, |j| j.status = JobStatus::Running);
            state.running = Some(Running { id: id.clone(), process: process.clone() });
        }
        self.event(&id, JobEvent::message("info", "Fine-tuning job started"));
        let (mut tokens, mut seconds) = (0u64, 0f64);
        let outcome = worker::follow(&process, reports, |step, total| {
            tokens += step.tokens as u64;
            seconds += step.seconds;
            let left = seconds / step.step as f64 * total.saturating_sub(step.step) as f64;
            // Kept in memory: a restart starts the job over anyway.
            self.update_live(&mut self.lock(), &id, false, |j| j.estimated_finish = Some(now() + left.ceil() as u64));
            if jobs::records_step(step.step, total) {
                let message = format!("Step {}/{total}: training loss={:.4}", step.step, step.loss);
                let data = json!({"step": step.step, "total_steps": total, "train_loss": step.loss,
                    "learning_rate": step.lr, "tokens_per_second": step.tokens_per_second});
                self.event(&id, JobEvent::metrics(message, data));
            }
        });
        let mut state = self.lock();
        state.running = None;
        let live = state.jobs.get(&id).is_some_and(|j| !j.status.is_final());
        match outcome {
            _ if !live => {
                drop(state);
                self.dirs.discard_partial(&id);
                tracing::info!(job = %id, "fine-tuning job stopped");
            }
            _ if state.stopping => {
                self.update_live(&mut state, &id, true, |j| {
                    j.status = JobStatus::Queued;
                    j.estimated_finish = None;
                });
                drop(state);
                self.dirs.discard_partial(&id);
                self.event(
                    &id,
                    JobEvent::message("warn", "The server is stopping; the job starts over when it restarts"),
                );
            }
            Outcome::Trained { .. } => self.succeed(state, &job, tokens, publish),
            Outcome::Failed(message) => {
                drop(state);
                self.fail(&id, "training_failed", message)
            }
            Outcome::Died(reason) => {
                drop(state);
                self.fail(&id, "training_process_died", reason)
            }
        }
    }

    /// Moves the trained adapter into place, serves it and marks the job
    /// succeeded, all under the lock (so a cancel comes before or after,
    /// never between): the job is `succeeded` only once its adapter is whole.
    fn succeed(&self, mut state: MutexGuard<'_, State>, job: &Job, tokens: u64, publish: &Publish) {
        let id = &job.id;
        let adapter = match self.dirs.commit_adapter(id) {
            Ok(adapter) => adapter,
            Err(e) => {
                drop(state);
                return self.fail(id, "adapter_not_saved", format!("the trained adapter cannot be saved: {e}"));
            }
        };
        let name = job.served_name();
        if let Err(e) = publish(&name, &adapter) {
            drop(state);
            return self.fail(id, "adapter_not_served", format!("the adapter was trained but cannot be served: {e}"));
        }
        let results = self.result_file(id);
        self.update_live(&mut state, id, true, |j| {
            j.status = JobStatus::Succeeded;
            j.fine_tuned_model = Some(name.clone());
            j.trained_tokens = Some(tokens);
            j.finished_at = Some(now());
            j.estimated_finish = None;
            j.result_files = results.into_iter().collect();
        });
        drop(state);
        self.event(id, JobEvent::message("info", format!("New fine-tuned model created: {name}")));
        self.event(id, JobEvent::message("info", "The job has successfully completed"));
    }

    fn fail(&self, id: &str, code: &str, message: String) {
        tracing::warn!(job = %id, error = %message, "fine-tuning job failed");
        self.dirs.discard_partial(id);
        let mut state = self.lock();
        self.update_live(&mut state, id, true, |j| {
            j.status = JobStatus::Failed;
            j.finished_at = Some(now());
            j.estimated_finish = None;
            j.error = Some(JobError { code: code.into(), message: message.clone(), param: None });
        });
        drop(state);
        self.event(id, JobEvent::message("error", format!("The job failed: {message}")));
    }

    /// The run's training log as a file (OpenAI's `result_files`).
    fn result_file(&self, id: &str) -> Option<String> {
        let log = std::fs::read(self.dirs.adapter_dir(id).join("training.jsonl")).ok()?;
        let file = self.files.create(&format!("{id}-training.jsonl"), "fine-tune-results", &log).ok()?;
        Some(file.id)
    }
}

/// The worker: one job at a time until the service stops.
fn work(service: Arc<FineTuning>) {
    while let Some((job, publish)) = service.next() {
        let span = tracing::info_span!("fine_tuning", job = %job.id);
        let _enter = span.enter();
        service.run(job, &publish);
    }
}
