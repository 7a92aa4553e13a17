//! What a training run leaves beside the adapter: the loss curve as SVG and
//! a README model card (data hash, hyperparameters, losses, eval replies).

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;

use serde_json::Value as Json;

use super::args::{Summary, TrainArgs, TrainError};
use crate::loader::Loaded;
use crate::lora::{adapter, BaseShapes};
use crate::model::llama::{BatchRow, Logits};
use crate::prompt::chat::ChatRequest;

/// Longest eval reply, in tokens.
const EVAL_TOKENS: usize = 48;

pub fn median(values: &[f64]) -> Option<f64> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.is_empty() {
        return None;
    }
    sorted.sort_by(f64::total_cmp);
    Some(sorted[sorted.len() / 2])
}

/// Greedy replies of the trained adapter to each prompt of `prompts_file`
/// (`{"prompts": [...]}`), rendered with the chat template.
pub fn eval_replies(
    loaded: &Loaded,
    adapter_dir: &Path,
    prompts_file: &Path,
) -> Result<Vec<(String, String)>, TrainError> {
    let invalid = |m: String| TrainError::Invalid(format!("{}: {m}", prompts_file.display()));
    let text = std::fs::read_to_string(prompts_file).map_err(|e| invalid(e.to_string()))?;
    let value: Json = serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
    let prompts: Vec<String> = value["prompts"]
        .as_array()
        .ok_or_else(|| invalid("expected {\"prompts\": [...]}".into()))?
        .iter()
        .map(|p| p.as_str().map(String::from).ok_or_else(|| invalid("prompts must be strings".into())))
        .collect::<Result<_, _>>()?;
    let info = &loaded.info;
    let template = info.chat_template.as_ref().ok_or_else(|| invalid("the model has no chat template".into()))?;
    let weights = Arc::new(
        adapter::load(
            adapter_dir,
            &BaseShapes { weights: Some(loaded.model.projections()), ..BaseShapes::of(loaded.model.config()) },
            usize::MAX,
        )
        .map_err(|e| TrainError::Invalid(format!("the adapter just written does not load: {e}")))?,
    );
    let mut replies = Vec::with_capacity(prompts.len());
    for prompt in prompts {
        let request = ChatRequest {
            messages: vec![serde_json::json!({"role": "user", "content": prompt})],
            tools: None,
            documents: None,
            add_generation_prompt: true,
            continue_final_message: false,
            kwargs: Default::default(),
        };
        let rendered = template.render(&request).map_err(|e| invalid(e.to_string()))?;
        let mut input = info.tokenizer.encode(&rendered).map_err(|e| invalid(e.to_string()))?;
        let mut cache = loaded.model.new_cache();
        let mut out = Vec::new();
        for _ in 0..EVAL_TOKENS {
            let row = BatchRow { tokens: &input, cache: &mut cache, logits: Logits::Last, adapter: Some(&weights) };
            let logits = loaded.model.forward(&mut [row])?;
            let last = logits[0].flatten_all()?.to_vec1::<f32>()?;
            let next = crate::engine::sampling::argmax(&last);
            if info.eos_token_ids.contains(&next) {
                break;
            }
            out.push(next);
            input = vec![next];
        }
        replies.push((prompt, info.tokenizer.decode(&out, true).map_err(|e| invalid(e.to_string()))?));
    }
    Ok(replies)
}

/// The loss per step as an SVG line chart.
pub fn loss_svg(summary: &Summary) -> String {
    let (width, height, pad) = (640.0, 320.0, 48.0);
    let losses: Vec<f64> = summary.steps.iter().map(|s| s.loss).collect();
    let max = losses.iter().copied().fold(f64::MIN, f64::max).max(1e-9);
    let n = losses.len().max(2) as f64 - 1.0;
    let x = |i: usize| pad + i as f64 / n * (width - 2.0 * pad);
    let y = |v: f64| height - pad - v / max * (height - 2.0 * pad);
    let points: Vec<String> = losses.iter().enumerate().map(|(i, &v)| format!("{:.1},{:.1}", x(i), y(v))).collect();
    let mut svg = String::new();
    let _ = write!(
        svg,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<line x1="{pad}" y1="{b}" x2="{r}" y2="{b}" stroke="#888"/>
<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{b}" stroke="#888"/>
<text x="4" y="{top}">{max:.2}</text><text x="4" y="{b}">0</text>
<text x="{pad}" y="{below}">step 1</text><text x="{last_x}" y="{below}">step {steps}</text>
<text x="{title_x}" y="20" text-anchor="middle">training loss</text>
<polyline fill="none" stroke="#2563eb" stroke-width="2" points="{points}"/>
</svg>
"##,
        b = height - pad,
        r = width - pad,
        top = pad + 4.0,
        below = height - pad + 18.0,
        last_x = width - pad - 50.0,
        steps = losses.len(),
        title_x = width / 2.0,
        points = points.join(" "),
    );
    svg
}

/// Writes `loss.svg` and `README.md` into the adapter folder.
pub fn write(args: &TrainArgs, summary: &Summary, data_sha256: &str) -> Result<(), TrainError> {
    let out = &summary.out;
    let replies = &summary.replies;
    let put = |name: &str, text: &str| {
        let path = out.join(name);
        std::fs::write(&path, text)
            .map_err(|e| TrainError::Write { path: path.display().to_string(), message: e.to_string() })
    };
    put("loss.svg", &loss_svg(summary))?;
    let last = summary.steps.last().map(|s| s.loss).unwrap_or(f64::NAN);
    let tps: Vec<f64> = summary.steps.iter().skip(1).map(|s| s.tokens_per_second).collect();
    let mut card = String::new();
    let _ = writeln!(card, "# LoRA adapter trained with `tailor train`\n");
    let _ = writeln!(
        card,
        "- base model: `{}`",
        args.model
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| crate::loader::default_model_path().display().to_string())
    );
    let _ = writeln!(
        card,
        "- data: `{}` (sha256 `{data_sha256}`), {} examples used, {} longer than {} tokens left out",
        args.data.display(),
        summary.examples,
        summary.too_long,
        args.max_seq_len
    );
    let _ = writeln!(
        card,
        "- LoRA: r={}, alpha={}, rsLoRA {}, target modules {}",
        args.rank,
        args.alpha,
        args.use_rslora,
        args.target_modules.join(", ")
    );
    if let Some(dir) = &args.init_from {
        let _ = writeln!(card, "- continued from the adapter in `{}`", dir.display());
    }
    let _ = writeln!(
        card,
        "- training: {} steps, batch {} × {} accumulated, lr {} ({:?}, {} warm-up steps, planned over {} steps, floor {}×), weight decay {}, max grad norm {}, max length {}, seed {}",
        summary.steps.len(),
        args.batch_size,
        args.grad_accum,
        args.lr,
        args.schedule,
        args.warmup,
        args.schedule_steps.unwrap_or(summary.planned_steps),
        args.min_lr_ratio,
        args.weight_decay,
        args.max_grad_norm,
        args.max_seq_len,
        args.seed
    );
    if summary.steps.len() < summary.planned_steps {
        let _ = writeln!(
            card,
            "- stopped at a checkpoint after {} of {} steps",
            summary.steps.len(),
            summary.planned_steps
        );
    }
    let _ = writeln!(card, "- final train loss: {last:.4}");
    if let Some(v) = summary.validation_loss {
        let _ = writeln!(card, "- validation loss: {v:.4}");
    }
    let _ = writeln!(card, "- median speed: {:.0} tokens/s\n", median(&tps).unwrap_or(0.0));
    let _ = writeln!(card, "![training loss](loss.svg)\n");
    if !replies.is_empty() {
        let _ = writeln!(card, "## Eval replies (greedy, {EVAL_TOKENS} tokens at most)\n");
        for (prompt, reply) in replies {
            let _ = writeln!(card, "- **{prompt}** → {}", reply.replace('\n', " "));
        }
    }
    put("README.md", &card)
}
