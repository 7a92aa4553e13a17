//! What a training run is asked to do (`TrainArgs`, the flags of `tailor
//! train` and what the fine-tuning API fills in), what it reports as it goes
//! and at its end, and how it fails: shared by the run and its report.

use std::path::PathBuf;

use super::data::DataError;
use super::optim::Schedule;
use crate::loader::LoadError;
use crate::model::ModelError;

#[derive(clap::Args, Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TrainArgs {
    /// Base model: a GGUF file or a Hugging Face folder (default: the cached SmolLM2).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Training data: OpenAI fine-tuning JSONL (`messages`, or `prompt` + `completion`).
    #[arg(long)]
    pub data: PathBuf,
    /// Held-out data in the same format: its loss is reported.
    #[arg(long)]
    pub validation: Option<PathBuf>,
    /// Folder the adapter is written to.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    #[arg(long, default_value_t = 16.0)]
    pub alpha: f64,
    /// Projections to adapt (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj).
    #[arg(long, value_delimiter = ',', default_value = "q_proj,v_proj")]
    pub target_modules: Vec<String>,
    /// Scale by alpha / √r instead of alpha / r.
    #[arg(long)]
    pub use_rslora: bool,
    /// Optimizer steps (default: one epoch).
    #[arg(long, conflicts_with = "epochs")]
    pub steps: Option<usize>,
    /// Passes over the data, instead of --steps.
    #[arg(long)]
    pub epochs: Option<f64>,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 2e-3)]
    pub lr: f64,
    /// Linear warm-up steps.
    #[arg(long, default_value_t = 0)]
    pub warmup: usize,
    #[arg(long, value_enum, default_value = "cosine")]
    pub schedule: Schedule,
    /// Steps the decay is planned over (default: the steps run).
    #[arg(long)]
    pub schedule_steps: Option<usize>,
    /// The learning rate's floor, as a fraction of --lr.
    #[arg(long, default_value_t = 0.0)]
    pub min_lr_ratio: f64,
    /// Longer examples are left out (and counted).
    #[arg(long, default_value_t = 512)]
    pub max_seq_len: usize,
    /// Batches whose gradients are summed per step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Gradients are clipped to this global norm (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Compute threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// A chat template file to render conversations with, instead of the model's.
    #[arg(long)]
    pub template: Option<PathBuf>,
    /// A JSON file {"prompts": [...]}: replies to them go in the model card.
    #[arg(long)]
    pub eval_prompts: Option<PathBuf>,
    /// Continue training a PEFT LoRA adapter folder: its rank, alpha, target
    /// modules and rsLoRA setting are kept (so those options are refused).
    #[arg(long, conflicts_with_all = ["rank", "alpha", "target_modules", "use_rslora"])]
    pub init_from: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error("{0}")]
    Invalid(String),
    #[error("cannot write {path}: {message}")]
    Write { path: String, message: String },
    #[error("training was cancelled")]
    Cancelled,
}

impl From<candle_core::Error> for TrainError {
    fn from(e: candle_core::Error) -> Self {
        TrainError::Model(e.into())
    }
}

/// One optimizer step, as logged in `training.jsonl`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StepLog {
    pub step: usize,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    /// Tokens of the step's examples (no padding).
    pub tokens: usize,
    /// Those tokens per second.
    pub tokens_per_second: f64,
    pub seconds: f64,
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct Summary {
    pub steps: Vec<StepLog>,
    /// Steps the run was to take (more than `steps` when it was stopped at a checkpoint).
    pub planned_steps: usize,
    pub validation_loss: Option<f64>,
    pub examples: usize,
    pub too_long: usize,
    pub out: PathBuf,
    /// (prompt, greedy reply of the trained adapter), for `--eval-prompts`.
    pub replies: Vec<(String, String)>,
}

/// What a run does after a step, as its progress callback says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterStep {
    Continue,
    /// End now, saving nothing (a cancelled job).
    Stop,
    /// End now and save the adapter as trained so far, with its log and
    /// model card (Ctrl-C on `tailor train`).
    Checkpoint,
}
