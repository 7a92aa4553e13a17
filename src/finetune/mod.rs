//! The fine-tuning API's back end: uploaded files, and jobs that train a
//! LoRA adapter on the served base in the background, one at a time, on
//! their own threads; a finished job's adapter is served at once under
//! `ft:<base>:<suffix>:<job id>`. Everything lives in the data directory, so
//! jobs, their events and their adapters come back after a restart (a job
//! that was queued or running starts over).
//!
//! - `files`: the uploaded files;
//! - `jobs`: jobs and events, and their folders.

pub mod files;
pub mod jobs;

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use serde_json::json;

use crate::train::run::{AfterStep, TrainArgs, TrainError};
use files::FileStore;
use jobs::{Job, JobDirs, JobError, JobEvent, JobStatus, BASE_LEARNING_RATE};

#[derive(Debug, thiserror::Error)]
pub enum FineTuneError {
    #[error("cannot access {path}: {message}")]
    Io { path: String, message: String },
    #[error("{message}")]
    Invalid { message: String, param: Option<&'static str> },
    #[error("{0}")]
    NotFound(String),
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

pub(crate) use crate::api::unix_now as now;

/// Whether `id` has the shape `crate::api::response_id(prefix)` gives (so it
/// is a plain file name, never a path).
fn is_generated_id(id: &str, prefix: &str) -> bool {
    id.strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix('-'))
        .is_some_and(|hex| !hex.is_empty() && hex.chars().all(|c| c.is_ascii_hexdigit()))
}

/// `dir`, created if missing (the data directory and its folders).
fn created(dir: &Path) -> Result<PathBuf, FineTuneError> {
    std::fs::create_dir_all(dir).map_err(FineTuneError::io(dir))?;
    Ok(dir.to_path_buf())
}

/// Writes JSON through a temporary file, so a crash never leaves half of one.
fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<(), FineTuneError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| FineTuneError::Internal(e.to_string()))?;
    let partial = path.with_extension("json.partial");
    std::fs::write(&partial, text).map_err(FineTuneError::io(&partial))?;
    std::fs::rename(&partial, path).map_err(FineTuneError::io(path))
}

/// Serves a trained adapter folder under a model id.
pub type Publish = Arc<dyn Fn(&str, &Path) -> Result<(), String> + Send + Sync>;

pub struct FineTuningConfig {
    pub data_dir: PathBuf,
    /// The base model's file or folder (training loads it in float32).
    pub model_path: PathBuf,
    /// Threads a training run computes on.
    pub train_threads: usize,
}

struct State {
    jobs: BTreeMap<String, Job>,
    queue: VecDeque<String>,
    /// The running job and its cancel flag.
    running: Option<(String, Arc<AtomicBool>)>,
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
            if !job.status.is_final() {
                job.status = JobStatus::Queued;
                dirs.save(&job)?;
                dirs.append_event(&job.id, &JobEvent::message("warn", "The server restarted; the job starts over"))?;
                state.queue.push_back(job.id.clone());
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

    /// Stops the worker after the current step of a running job (which
    /// starts over on the next start), waits for it, and lets the data
    /// directory go.
    pub fn stop(&self) {
        {
            let mut state = self.lock();
            state.stopping = true;
            if let Some((_, cancel)) = &state.running {
                cancel.store(true, Ordering::Relaxed);
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

    /// Checks a new job's files and queues it.
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
        job.status = JobStatus::Queued;
        self.dirs.save(&job)?;
        self.event(&job.id, JobEvent::message("info", format!("Validating training file: {}", job.training_file)));
        self.event(&job.id, JobEvent::message("info", "Fine-tuning job created and queued"));
        let mut state = self.lock();
        state.queue.push_back(job.id.clone());
        state.jobs.insert(job.id.clone(), job.clone());
        self.wake.notify_all();
        Ok(job)
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

    /// A queued job leaves the queue; a running one stops after its current step.
    pub fn cancel(&self, id: &str) -> Result<Job, FineTuneError> {
        let mut state = self.lock();
        let job = state.jobs.get(id).ok_or_else(|| FineTuneError::NotFound(format!("no fine-tuning job {id}")))?;
        if job.status.is_final() {
            return Err(FineTuneError::invalid(
                format!("job {id} has already ended ({:?})", job.status),
                "fine_tuning_job_id",
            ));
        }
        state.queue.retain(|queued| queued != id);
        if let Some((running, cancel)) = &state.running {
            if running == id {
                cancel.store(true, Ordering::Relaxed);
            }
        }
        let job = state.jobs.get_mut(id).ok_or_else(|| FineTuneError::Internal("job vanished".into()))?;
        job.status = JobStatus::Cancelled;
        job.finished_at = Some(now());
        let job = job.clone();
        drop(state);
        self.dirs.save(&job)?;
        self.event(id, JobEvent::message("info", "The job was cancelled"));
        Ok(job)
    }

    fn event(&self, id: &str, event: JobEvent) {
        if let Err(e) = self.dirs.append_event(id, &event) {
            tracing::warn!(job = %id, error = %e, "cannot record a fine-tuning event");
        }
    }

    /// Changes a job (unless it was cancelled meanwhile) and saves it.
    fn update(&self, id: &str, change: impl FnOnce(&mut Job)) -> Option<Job> {
        let mut state = self.lock();
        let job = state.jobs.get_mut(id)?;
        if job.status == JobStatus::Cancelled {
            return None;
        }
        change(job);
        let job = job.clone();
        drop(state);
        if let Err(e) = self.dirs.save(&job) {
            tracing::warn!(job = %id, error = %e, "cannot save a fine-tuning job");
        }
        Some(job)
    }

    /// The next queued job once the model is loaded; None when stopping.
    fn next(&self) -> Option<(Job, Arc<AtomicBool>, Publish)> {
        let mut state = self.lock();
        loop {
            if state.stopping {
                return None;
            }
            if let Some(publish) = state.publish.clone() {
                if let Some(id) = state.queue.pop_front() {
                    let Some(job) = state.jobs.get(&id).cloned() else { continue };
                    let cancel = Arc::new(AtomicBool::new(false));
                    state.running = Some((id, cancel.clone()));
                    return Some((job, cancel, publish));
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
            out: self.dirs.adapter_dir(&job.id),
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

    /// Trains one job to its end (succeeded, failed or cancelled).
    fn run(&self, job: Job, cancel: &AtomicBool, publish: &Publish) {
        let id = job.id.clone();
        self.update(&id, |j| j.status = JobStatus::Running);
        self.event(&id, JobEvent::message("info", "Fine-tuning job started"));
        let outcome = self.train_args(&job).map_err(|e| e.to_string()).and_then(|args| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(self.train_threads)
                .thread_name(|i| format!("train-{i}"))
                .build()
                .map_err(|e| e.to_string())?;
            let mut tokens = 0u64;
            let mut seconds = 0f64;
            // A panic in training fails the job instead of taking the worker
            // (and every queued job) down with it.
            let summary = pool.install(|| {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    crate::train::run::train(&args, |step, total| {
                        tokens += step.tokens as u64;
                        seconds += step.seconds;
                        let left = seconds / step.step as f64 * total.saturating_sub(step.step) as f64;
                        self.update(&id, |j| j.estimated_finish = Some(now() + left.ceil() as u64));
                        let message = format!("Step {}/{total}: training loss={:.4}", step.step, step.loss);
                        let data = json!({"step": step.step, "total_steps": total, "train_loss": step.loss,
                        "learning_rate": step.lr, "tokens_per_second": step.tokens_per_second});
                        self.event(&id, JobEvent::metrics(message, data));
                        if cancel.load(Ordering::Relaxed) {
                            AfterStep::Stop
                        } else {
                            AfterStep::Continue
                        }
                    })
                }))
            });
            let summary = summary.map_err(|panic| {
                let why = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("unknown");
                format!("training stopped on an internal error ({why})")
            })?;
            summary.map(|s| (s, tokens)).map_err(|e| match e {
                TrainError::Cancelled => "cancelled".to_string(),
                other => other.to_string(),
            })
        });
        match outcome {
            Ok((summary, tokens)) if !cancel.load(Ordering::Relaxed) => {
                let name = job.served_name();
                let results = self.result_file(&job.id);
                match publish(&name, &summary.out) {
                    Ok(()) => {
                        self.update(&id, |j| {
                            j.status = JobStatus::Succeeded;
                            j.fine_tuned_model = Some(name.clone());
                            j.trained_tokens = Some(tokens);
                            j.finished_at = Some(now());
                            j.estimated_finish = None;
                            j.result_files = results.into_iter().collect();
                        });
                        self.event(&id, JobEvent::message("info", format!("New fine-tuned model created: {name}")));
                        self.event(&id, JobEvent::message("info", "The job has successfully completed"));
                    }
                    Err(e) => self.fail(
                        &id,
                        "adapter_not_served",
                        format!("the adapter was trained but cannot be served: {e}"),
                    ),
                }
            }
            Ok(_) => {}
            Err(e) if cancel.load(Ordering::Relaxed) => {
                tracing::info!(job = %id, reason = %e, "fine-tuning job stopped");
            }
            Err(e) => self.fail(&id, "training_failed", e),
        }
        self.lock().running = None;
    }

    fn fail(&self, id: &str, code: &str, message: String) {
        tracing::warn!(job = %id, error = %message, "fine-tuning job failed");
        self.event(id, JobEvent::message("error", format!("The job failed: {message}")));
        self.update(id, |j| {
            j.status = JobStatus::Failed;
            j.finished_at = Some(now());
            j.error = Some(JobError { code: code.into(), message, param: None });
        });
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
    while let Some((job, cancel, publish)) = service.next() {
        let span = tracing::info_span!("fine_tuning", job = %job.id);
        let _enter = span.enter();
        service.run(job, &cancel, &publish);
    }
}
