//! `tailor bench-step`: the model's decode step alone, in process — a batch
//! of rows decoding together on the base and then with adapters, timed in
//! alternating rounds. No HTTP and no scheduler: the figure to read LoRA's
//! cost from, which a server-level run on a noisy machine blurs.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use serde::Serialize;

use crate::lora::merge::{self, Combination};
use crate::lora::{adapter, BaseShapes, MergeOptions};
use crate::model::llama::Logits;
use crate::model::lora::{AdapterWeights, Part};
use crate::model::BatchRow;

#[derive(Debug, clap::Args)]
pub struct StepArgs {
    /// GGUF file or Hugging Face folder (default: the cached SmolLM2).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// PEFT adapter folders; the rows cycle over them (row i takes adapter
    /// i mod N). Repeatable.
    #[arg(long = "adapter")]
    pub adapters: Vec<PathBuf>,
    /// Adapters each row composes (`adapters` at weight 1/K each): row i
    /// applies adapters i, i+1, … i+K-1 (mod N), as `--combination` says.
    #[arg(long, default_value_t = 1)]
    pub compose: usize,
    /// How composed adapters combine: `cat` (un-merged) or a merge made once
    /// into one adapter (`linear`, `ties`, … ; equal ranks).
    #[arg(long, value_enum, default_value = "cat")]
    pub combination: Combination,
    /// The fraction the pruning combinations keep (`--combination ties` …).
    #[arg(long)]
    pub density: Option<f64>,
    /// Rows decoding together.
    #[arg(long, default_value_t = 8)]
    pub rows: usize,
    /// Prompt tokens each row holds before the timed steps.
    #[arg(long, default_value_t = 16)]
    pub prompt_tokens: usize,
    /// Decode steps per measurement.
    #[arg(long, default_value_t = 64)]
    pub steps: usize,
    /// Alternating rounds (base, then adapters); medians are reported.
    #[arg(long, default_value_t = 7)]
    pub rounds: usize,
    /// Compute threads.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Weight precision, as `tailor serve --dtype`.
    #[arg(long, value_enum, default_value = "quantized")]
    pub dtype: crate::config::DTypeArg,
}

#[derive(Debug, Serialize)]
pub struct StepReport {
    pub rows: usize,
    pub adapters: usize,
    /// Adapters each row composes.
    pub compose: usize,
    /// Milliseconds per decode step, one figure per round.
    pub base_ms: Vec<f64>,
    pub adapters_ms: Vec<f64>,
    pub base_ms_median: f64,
    pub adapters_ms_median: f64,
    /// Base step time over the adapters' step time (1.0 = adapters cost nothing).
    pub ratio: f64,
}

pub fn run(args: &StepArgs) -> anyhow::Result<StepReport> {
    crate::server::set_compute_threads(args.threads);
    let path = args.model.clone().unwrap_or_else(crate::loader::default_model_path);
    let loaded = crate::loader::load(
        &path,
        &crate::loader::LoadOptions {
            mode: args.dtype.weight_mode(),
            dense_small_models: args.dtype == crate::config::DTypeArg::Auto,
            ..Default::default()
        },
    )
    .with_context(|| format!("cannot load {}", path.display()))?;
    let model = &loaded.model;
    let shapes = BaseShapes::of_model(model);
    let adapters: Vec<Arc<AdapterWeights>> = args
        .adapters
        .iter()
        .map(|dir| {
            adapter::load(dir, &shapes, usize::MAX)
                .map(Arc::new)
                .with_context(|| format!("cannot load the adapter {}", dir.display()))
        })
        .collect::<anyhow::Result<_>>()?;
    anyhow::ensure!(!adapters.is_empty(), "give at least one --adapter");
    anyhow::ensure!((1..=adapters.len()).contains(&args.compose), "--compose must be between 1 and the adapters given");
    let adapters: Vec<Arc<AdapterWeights>> = match args.compose {
        1 => adapters,
        k => (0..adapters.len())
            .map(|i| {
                let parts = (0..k)
                    .map(|j| Part { adapter: adapters[(i + j) % adapters.len()].clone(), factor: 1.0 / k as f32 })
                    .collect();
                Ok(Arc::new(match args.combination {
                    Combination::Cat => {
                        AdapterWeights::composed(parts).map_err(|m| anyhow::anyhow!("two adapters replace `{m}`"))?
                    }
                    combination_type => merge::merge(
                        &parts,
                        &shapes,
                        &MergeOptions { combination_type, density: args.density, ..Default::default() },
                    )?,
                }))
            })
            .collect::<anyhow::Result<_>>()?,
    };
    anyhow::ensure!(
        args.rows > 0 && args.steps > 0 && args.prompt_tokens > 0,
        "rows, steps and prompt tokens must be positive"
    );
    let (mut base_ms, mut adapters_ms) = (Vec::new(), Vec::new());
    for round in 0..args.rounds.max(1) {
        base_ms.push(time_steps(model, args, round, &[])?);
        adapters_ms.push(time_steps(model, args, round, &adapters)?);
    }
    let median = |v: &[f64]| crate::train::report::median(v).unwrap_or(f64::NAN);
    let (base, with) = (median(&base_ms), median(&adapters_ms));
    Ok(StepReport {
        rows: args.rows,
        adapters: args.adapters.len(),
        compose: args.compose,
        base_ms,
        adapters_ms,
        base_ms_median: base,
        adapters_ms_median: with,
        ratio: base / with,
    })
}

/// Milliseconds per step over `args.steps` decode steps of `args.rows` rows
/// (row i on `adapters[i mod N]`, none when empty), after a prefill.
fn time_steps(
    model: &crate::model::Llama,
    args: &StepArgs,
    round: usize,
    adapters: &[Arc<AdapterWeights>],
) -> anyhow::Result<f64> {
    let mut caches: Vec<_> = (0..args.rows).map(|_| model.new_cache()).collect();
    let adapter_of = |i: usize| (!adapters.is_empty()).then(|| &adapters[i % adapters.len()]);
    // Distinct prompts per row and round, so nothing is shared.
    let prompts: Vec<Vec<u32>> = (0..args.rows)
        .map(|i| {
            (0..args.prompt_tokens).map(|t| (1000 + (round * args.rows + i) * args.prompt_tokens + t) as u32).collect()
        })
        .collect();
    let mut rows: Vec<BatchRow> = caches
        .iter_mut()
        .zip(&prompts)
        .enumerate()
        .map(|(i, (cache, tokens))| BatchRow { tokens, cache, logits: Logits::Last, adapter: adapter_of(i) })
        .collect();
    model.forward(&mut rows)?;
    drop(rows);
    let token = [1234u32];
    let start = Instant::now();
    for _ in 0..args.steps {
        let mut rows: Vec<BatchRow> = caches
            .iter_mut()
            .enumerate()
            .map(|(i, cache)| BatchRow { tokens: &token, cache, logits: Logits::Last, adapter: adapter_of(i) })
            .collect();
        model.forward(&mut rows)?;
    }
    Ok(start.elapsed().as_secs_f64() * 1000.0 / args.steps as f64)
}
