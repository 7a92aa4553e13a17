//! Fine-tuning jobs as OpenAI describes them, and their events; each job is
//! a folder in the data directory (`job.json`, `events.jsonl`, `adapter/`).

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::FineTuneError;
use crate::ids::{response_id, unix_now as now};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    ValidatingFiles,
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub fn is_final(self) -> bool {
        matches!(self, JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled)
    }

    /// The wire name (`succeeded`).
    pub fn name(self) -> &'static str {
        match self {
            JobStatus::ValidatingFiles => "validating_files",
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }
}

/// Metrics events a job records at most, about: the first steps one by one,
/// then one in every `total / STEP_EVENTS`, and the last (a long run's log
/// stays small).
pub const STEP_EVENTS: usize = 1_000;

/// Whether step `step` of `total` gets a metrics event.
pub fn records_step(step: usize, total: usize) -> bool {
    step <= 100 || step == total || step.is_multiple_of(total.div_ceil(STEP_EVENTS).max(1))
}

/// What the run trains with: OpenAI's three hyperparameters, then tailor's
/// LoRA and schedule settings (all echoed back on the job).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Hyperparameters {
    pub n_epochs: f64,
    pub batch_size: usize,
    pub learning_rate_multiplier: f64,
    /// Optimizer steps instead of epochs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_steps: Option<usize>,
    pub lora_rank: usize,
    pub lora_alpha: f64,
    pub target_modules: Vec<String>,
    pub use_rslora: bool,
    pub warmup_steps: usize,
    pub lr_schedule: String,
    /// Steps the decay is planned over (default: the steps run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr_schedule_steps: Option<usize>,
    pub min_lr_ratio: f64,
    pub max_seq_len: usize,
}

/// The learning rate a multiplier of 1 means (the shipped adapters' recipe).
pub const BASE_LEARNING_RATE: f64 = 2e-3;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct JobError {
    pub code: String,
    pub message: String,
    pub param: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Job {
    pub id: String,
    pub object: String,
    pub created_at: u64,
    pub finished_at: Option<u64>,
    pub model: String,
    pub fine_tuned_model: Option<String>,
    pub organization_id: String,
    pub status: JobStatus,
    pub training_file: String,
    pub validation_file: Option<String>,
    pub hyperparameters: Hyperparameters,
    pub method: Value,
    pub result_files: Vec<String>,
    pub trained_tokens: Option<u64>,
    pub error: Option<JobError>,
    pub seed: u64,
    pub suffix: Option<String>,
    pub user_provided_suffix: Option<String>,
    pub estimated_finish: Option<u64>,
    pub integrations: Vec<Value>,
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Value>,
    /// The served base, when `model` is a fine-tuned model this job
    /// continues (tailor's own field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_model: Option<String>,
}

impl Job {
    pub fn new(
        model: String,
        training_file: String,
        validation_file: Option<String>,
        hyperparameters: Hyperparameters,
        suffix: Option<String>,
        seed: u64,
        metadata: Option<Value>,
    ) -> Self {
        let method = json!({"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": hyperparameters.n_epochs,
            "batch_size": hyperparameters.batch_size,
            "learning_rate_multiplier": hyperparameters.learning_rate_multiplier,
        }}});
        Job {
            id: response_id("ftjob"),
            object: "fine_tuning.job".into(),
            created_at: now(),
            finished_at: None,
            model,
            fine_tuned_model: None,
            organization_id: "tailor".into(),
            status: JobStatus::ValidatingFiles,
            training_file,
            validation_file,
            hyperparameters,
            method,
            result_files: Vec::new(),
            trained_tokens: None,
            error: None,
            seed,
            user_provided_suffix: suffix.clone(),
            suffix,
            estimated_finish: None,
            integrations: Vec::new(),
            metadata,
            base_model: None,
        }
    }

    /// The model id its adapter is served under: `ft:<base>:<suffix>:<job id>`.
    pub fn served_name(&self) -> String {
        let base = self.base_model.as_deref().unwrap_or(&self.model);
        format!("ft:{base}:{}:{}", self.suffix.as_deref().unwrap_or(""), self.id)
    }
}

/// One line of a job's log, as OpenAI lists them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct JobEvent {
    pub object: String,
    pub id: String,
    pub created_at: u64,
    pub level: String,
    pub message: String,
    pub data: Value,
    #[serde(rename = "type")]
    pub kind: String,
}

impl JobEvent {
    pub fn message(level: &str, message: impl Into<String>) -> Self {
        Self::new(level, message.into(), json!({}), "message")
    }

    pub fn metrics(message: String, data: Value) -> Self {
        Self::new("info", message, data, "metrics")
    }

    fn new(level: &str, message: String, data: Value, kind: &str) -> Self {
        JobEvent {
            object: "fine_tuning.job.event".into(),
            id: response_id("ftevent"),
            created_at: now(),
            level: level.into(),
            message,
            data,
            kind: kind.into(),
        }
    }
}

/// The folders of the jobs.
pub struct JobDirs {
    root: PathBuf,
}

impl JobDirs {
    pub fn open(root: &Path) -> Result<Self, FineTuneError> {
        Ok(Self { root: super::created(root)? })
    }

    pub fn dir(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    pub fn adapter_dir(&self, id: &str) -> PathBuf {
        self.dir(id).join("adapter")
    }

    /// Where a run writes its adapter; renamed to `adapter_dir` once whole.
    pub fn partial_adapter_dir(&self, id: &str) -> PathBuf {
        self.dir(id).join("adapter.partial")
    }

    /// Removes what an unfinished run wrote.
    pub fn discard_partial(&self, id: &str) {
        let partial = self.partial_adapter_dir(id);
        if partial.exists() {
            if let Err(e) = std::fs::remove_dir_all(&partial) {
                tracing::warn!(path = %partial.display(), error = %e, "cannot remove an unfinished adapter");
            }
        }
    }

    pub fn has_adapter(&self, id: &str) -> bool {
        let dir = self.adapter_dir(id);
        dir.join("adapter_config.json").is_file() && dir.join("adapter_model.safetensors").is_file()
    }

    /// Makes a run's finished adapter durable and moves it into place.
    pub fn commit_adapter(&self, id: &str) -> std::io::Result<PathBuf> {
        let (partial, adapter) = (self.partial_adapter_dir(id), self.adapter_dir(id));
        crate::durable::sync_tree(&partial)?;
        if adapter.exists() {
            std::fs::remove_dir_all(&adapter)?;
        }
        std::fs::rename(&partial, &adapter)?;
        crate::durable::sync_dir(&self.dir(id))?;
        Ok(adapter)
    }

    pub fn save(&self, job: &Job) -> Result<(), FineTuneError> {
        let dir = self.dir(&job.id);
        std::fs::create_dir_all(&dir).map_err(FineTuneError::io(&dir))?;
        super::write_json(&dir.join("job.json"), job)
    }

    /// Every job kept, oldest first (jobs whose file cannot be read are skipped, with a warning).
    pub fn load_all(&self) -> Vec<Job> {
        let mut jobs: Vec<Job> = std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|entry| entry.file_name().to_str().is_some_and(|name| crate::ids::is_response_id(name, "ftjob")))
            .filter_map(|entry| {
                let path = entry.path().join("job.json");
                match std::fs::read_to_string(&path)
                    .map_err(|e| e.to_string())
                    .and_then(|text| serde_json::from_str::<Job>(&text).map_err(|e| e.to_string()))
                {
                    Ok(job) => Some(job),
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "cannot read a fine-tuning job");
                        None
                    }
                }
            })
            .collect();
        jobs.sort_by(|a, b| a.created_at.cmp(&b.created_at).then_with(|| a.id.cmp(&b.id)));
        jobs
    }

    pub fn append_event(&self, id: &str, event: &JobEvent) -> Result<(), FineTuneError> {
        let path = self.dir(id).join("events.jsonl");
        let line = serde_json::to_string(event).map_err(|e| FineTuneError::Internal(e.to_string()))?;
        let mut file =
            std::fs::OpenOptions::new().create(true).append(true).open(&path).map_err(FineTuneError::io(&path))?;
        writeln!(file, "{line}").map_err(FineTuneError::io(&path))
    }

    /// A job's events, oldest first.
    pub fn events(&self, id: &str) -> Vec<JobEvent> {
        let text = std::fs::read_to_string(self.dir(id).join("events.jsonl")).unwrap_or_default();
        text.lines().filter_map(|line| serde_json::from_str(line).ok()).collect()
    }
}
