//! `tailor train`: data in, PEFT adapter out. Loads the base (dense, frozen),
//! reads and checks the data, runs AdamW on the LoRA matrices for the steps
//! asked, and writes the adapter with its training log, loss curve and
//! model card.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use serde_json::json;

pub use super::args::{AfterStep, StepLog, Summary, TrainArgs, TrainError};
use super::data::{self, Encoder, Example};
use super::model::{Batch, Lora, SplitMix, TrainModel, MODULES};
use super::optim::{AdamW, LearningRate};
use super::{limits, peft, report};
use crate::loader::{self, LoadOptions};
use crate::model::WeightMode;

fn write_err(path: &Path) -> impl Fn(std::io::Error) -> TrainError + '_ {
    move |e| TrainError::Write { path: path.display().to_string(), message: e.to_string() }
}

/// Runs the training; `progress` sees each step as it ends (and the
/// planned total), and may end the run there.
pub fn train(args: &TrainArgs, mut progress: impl FnMut(&StepLog, usize) -> AfterStep) -> Result<Summary, TrainError> {
    check(args)?;
    let model_path = args.model.clone().unwrap_or_else(crate::loader::default_model_path);
    let mut options = LoadOptions { mode: WeightMode::F32, ..Default::default() };
    if let Some(file) = &args.template {
        let source = std::fs::read_to_string(file)
            .map_err(|e| TrainError::Invalid(format!("cannot read {}: {e}", file.display())))?;
        options.chat_template_override = Some(source);
    }
    let loaded = loader::load(&model_path, &options)?;
    let info = &loaded.info;
    let encoder = Encoder {
        tokenizer: &info.tokenizer,
        template: info.chat_template.as_ref(),
        eos: info.eos_token_ids.first().copied(),
    };
    let dataset = data::load(&args.data, &encoder, args.max_seq_len)?;
    let validation = args.validation.as_ref().map(|p| data::load(p, &encoder, args.max_seq_len)).transpose()?;
    let model = TrainModel::<f32>::load(loader::open_weights(&model_path, WeightMode::F32)?.as_mut())?;
    let (lora, args) = match &args.init_from {
        Some(dir) => {
            let lora = peft::load(dir, &model)?;
            // The model card and the saved config describe the adapter as it is.
            let args = TrainArgs {
                rank: lora.rank,
                alpha: lora.alpha,
                use_rslora: lora.use_rslora,
                target_modules: lora.targets.clone(),
                ..args.clone()
            };
            (lora, std::borrow::Cow::Owned(args))
        }
        None => (
            Lora::new(&model, args.rank, args.alpha, args.use_rslora, &args.target_modules, args.seed)?,
            std::borrow::Cow::Borrowed(args),
        ),
    };
    let args = args.as_ref();
    let mut lora = lora;
    let batches_per_epoch = dataset.examples.len().div_ceil(args.batch_size * args.grad_accum);
    let total = match (args.steps, args.epochs) {
        (Some(steps), _) => steps,
        (None, Some(epochs)) => ((epochs * batches_per_epoch as f64).ceil() as usize).max(1),
        (None, None) => batches_per_epoch,
    };
    if total > limits::MAX_STEPS {
        return Err(TrainError::Invalid(format!(
            "{total} steps ({} examples in batches of {} over the epochs asked), more than the {} a run may take",
            dataset.examples.len(),
            args.batch_size * args.grad_accum,
            limits::MAX_STEPS
        )));
    }
    let lr = LearningRate {
        peak: args.lr,
        warmup: args.warmup,
        planned: args.schedule_steps.unwrap_or(total),
        schedule: args.schedule,
        min_ratio: args.min_lr_ratio,
    };
    std::fs::create_dir_all(&args.out).map_err(write_err(&args.out))?;
    let log_path = args.out.join("training.jsonl");
    let mut log = std::fs::File::create(&log_path).map_err(write_err(&log_path))?;
    let mut optimizer = AdamW::new(&lora, args.weight_decay);
    let mut order = Order::new(dataset.examples.len(), args.seed);
    let mut steps = Vec::with_capacity(total);
    for step in 0..total {
        let started = Instant::now();
        let mut loss_sum = 0f64;
        let mut tokens = 0usize;
        // The step's loss and gradients are the means over its batches.
        let mut grads = lora.zeros_like();
        for _ in 0..args.grad_accum {
            let picked: Vec<&Example> = order.take(args.batch_size).into_iter().map(|i| &dataset.examples[i]).collect();
            tokens += picked.iter().map(|e| e.ids.len()).sum::<usize>();
            let batch = Batch {
                ids: picked.iter().map(|e| e.ids.clone()).collect(),
                weights: picked.iter().map(|e| e.weights.clone()).collect(),
            };
            let (loss, _) = model.loss_and_gradients(&batch, &lora, 1.0 / args.grad_accum as f64, &mut grads)?;
            loss_sum += loss;
        }
        let norm = AdamW::grad_norm(&grads);
        let clip = if args.max_grad_norm > 0.0 && norm > args.max_grad_norm { args.max_grad_norm / norm } else { 1.0 };
        let rate = lr.at(step);
        optimizer.step(&mut lora, &grads, rate, clip);
        let seconds = started.elapsed().as_secs_f64();
        let entry = StepLog {
            step: step + 1,
            loss: loss_sum / args.grad_accum as f64,
            lr: rate,
            grad_norm: norm,
            tokens,
            tokens_per_second: tokens as f64 / seconds,
            seconds,
        };
        let line = serde_json::to_string(&entry).map_err(|e| TrainError::Invalid(e.to_string()))?;
        writeln!(log, "{line}").map_err(write_err(&log_path))?;
        let next = progress(&entry, total);
        steps.push(entry);
        match next {
            AfterStep::Continue => {}
            AfterStep::Stop => return Err(TrainError::Cancelled),
            AfterStep::Checkpoint => break,
        }
    }
    let validation_loss =
        validation.as_ref().map(|v| mean_loss(&model, &lora, &v.examples, args.batch_size)).transpose()?;
    peft::save(&lora, &model_path.display().to_string(), &args.out)?;
    let replies = match &args.eval_prompts {
        Some(path) => report::eval_replies(&loaded, &args.out, path)?,
        None => Vec::new(),
    };
    let summary = Summary {
        planned_steps: total,
        steps,
        validation_loss,
        examples: dataset.examples.len(),
        too_long: dataset.too_long,
        out: args.out.clone(),
        replies,
    };
    report::write(args, &summary, &dataset.sha256)?;
    Ok(summary)
}

fn check(args: &TrainArgs) -> Result<(), TrainError> {
    use limits::*;
    let mut numbers = vec![
        (BATCH_SIZE, args.batch_size as f64),
        (GRAD_ACCUM, args.grad_accum as f64),
        (MAX_SEQ_LEN, args.max_seq_len as f64),
        (LEARNING_RATE, args.lr),
        (WARMUP, args.warmup as f64),
        (MIN_LR_RATIO, args.min_lr_ratio),
        (WEIGHT_DECAY, args.weight_decay),
        (MAX_GRAD_NORM, args.max_grad_norm),
    ];
    if args.init_from.is_none() {
        numbers.extend([(RANK, args.rank as f64), (ALPHA, args.alpha)]);
    }
    numbers.extend(args.steps.map(|s| (STEPS, s as f64)));
    numbers.extend(args.epochs.map(|e| (EPOCHS, e)));
    numbers.extend(args.schedule_steps.map(|s| (SCHEDULE_STEPS, s as f64)));
    if let Some((bound, value)) = numbers.iter().find(|(bound, value)| !bound.contains(*value)) {
        return Err(TrainError::Invalid(format!("{} must be {}, not {value}", bound.flag, bound.describe())));
    }
    if let Some(bad) = args.target_modules.iter().find(|m| !MODULES.contains(&m.as_str())) {
        return Err(TrainError::Invalid(format!("unknown target module `{bad}` (one of {})", MODULES.join(", "))));
    }
    Ok(())
}

/// The mean loss over `examples` (no gradients kept).
fn mean_loss(
    model: &TrainModel<f32>,
    lora: &Lora<f32>,
    examples: &[Example],
    batch_size: usize,
) -> Result<f64, TrainError> {
    let (mut sum, mut weight) = (0f64, 0f64);
    for chunk in examples.chunks(batch_size) {
        let batch = Batch {
            ids: chunk.iter().map(|e| e.ids.clone()).collect(),
            weights: chunk.iter().map(|e| e.weights.clone()).collect(),
        };
        let (loss, total) = model.loss(&batch, Some(lora))?;
        sum += loss * total;
        weight += total;
    }
    Ok(sum / weight.max(1.0))
}

/// The examples in a seeded random order, reshuffled at each pass.
struct Order {
    indices: Vec<usize>,
    at: usize,
    rng: SplitMix,
}

impl Order {
    fn new(n: usize, seed: u64) -> Self {
        let mut order = Self { indices: (0..n).collect(), at: 0, rng: SplitMix(seed ^ 0x5DEE_CE66_D1CE_4E5B) };
        order.shuffle();
        order
    }

    fn shuffle(&mut self) {
        for i in (1..self.indices.len()).rev() {
            let j = (self.rng.next_u64() % (i as u64 + 1)) as usize;
            self.indices.swap(i, j);
        }
    }

    fn take(&mut self, count: usize) -> Vec<usize> {
        (0..count.min(self.indices.len()))
            .map(|_| {
                if self.at == self.indices.len() {
                    self.shuffle();
                    self.at = 0;
                }
                self.at += 1;
                self.indices[self.at - 1]
            })
            .collect()
    }
}

/// What `tailor train` prints at the end.
pub fn describe(summary: &Summary) -> String {
    let last = summary.steps.last();
    let tps: Vec<f64> = summary.steps.iter().skip(1).map(|s| s.tokens_per_second).collect();
    let median = report::median(&tps).unwrap_or(0.0);
    json!({
        "adapter": summary.out.display().to_string(),
        "steps": summary.steps.len(),
        "planned_steps": summary.planned_steps,
        "examples": summary.examples,
        "too_long": summary.too_long,
        "final_train_loss": last.map(|s| s.loss),
        "validation_loss": summary.validation_loss,
        "median_tokens_per_second": median,
    })
    .to_string()
}
