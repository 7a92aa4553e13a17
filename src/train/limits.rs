//! The bounds of a training run, one table for `tailor train` and the
//! fine-tuning API (which names the same values `hyperparameters.*`), and
//! the memory a run needs, so a run that cannot fit is refused before it
//! starts instead of aborting on an allocation.

use crate::model::ModelConfig;

/// A numeric setting's accepted range, under its API and CLI names.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    /// The fine-tuning API's hyperparameter name.
    pub name: &'static str,
    /// `tailor train`'s flag.
    pub flag: &'static str,
    pub min: f64,
    pub max: f64,
    /// The lower end is excluded (a positive real, say).
    pub above_min: bool,
    pub whole: bool,
}

impl Bound {
    pub fn contains(&self, value: f64) -> bool {
        value.is_finite()
            && (if self.above_min { value > self.min } else { value >= self.min })
            && value <= self.max
            && (!self.whole || value.fract() == 0.0)
    }

    /// "a whole number from 1 to 256", "a number above 0 and at most 100".
    pub fn describe(&self) -> String {
        let kind = if self.whole { "a whole number" } else { "a number" };
        if self.above_min {
            format!("{kind} above {} and at most {}", self.min, self.max)
        } else {
            format!("{kind} from {} to {}", self.min, self.max)
        }
    }

    /// The same range with a lower ceiling (the model's context, the server's largest rank).
    pub fn at_most(self, max: f64) -> Bound {
        Bound { max: self.max.min(max), ..self }
    }
}

const fn whole(name: &'static str, flag: &'static str, min: f64, max: f64) -> Bound {
    Bound { name, flag, min, max, above_min: false, whole: true }
}

const fn positive(name: &'static str, flag: &'static str, max: f64) -> Bound {
    Bound { name, flag, min: 0.0, max, above_min: true, whole: false }
}

/// Optimizer steps a run may take, however they are asked for.
pub const MAX_STEPS: usize = 100_000;

pub const STEPS: Bound = whole("n_steps", "--steps", 1.0, MAX_STEPS as f64);
pub const EPOCHS: Bound = positive("n_epochs", "--epochs", 1_000.0);
pub const BATCH_SIZE: Bound = whole("batch_size", "--batch-size", 1.0, 256.0);
pub const GRAD_ACCUM: Bound = whole("grad_accum", "--grad-accum", 1.0, 1_024.0);
pub const MAX_SEQ_LEN: Bound = whole("max_seq_len", "--max-seq-len", 2.0, 32_768.0);
pub const RANK: Bound = whole("lora_rank", "--rank", 1.0, 256.0);
pub const ALPHA: Bound = positive("lora_alpha", "--alpha", 65_536.0);
pub const WARMUP: Bound = whole("warmup_steps", "--warmup", 0.0, MAX_STEPS as f64);
pub const SCHEDULE_STEPS: Bound = whole("lr_schedule_steps", "--schedule-steps", 1.0, MAX_STEPS as f64);
pub const MIN_LR_RATIO: Bound = Bound { min: 0.0, above_min: false, ..positive("min_lr_ratio", "--min-lr-ratio", 1.0) };
pub const LEARNING_RATE: Bound = positive("learning_rate", "--lr", 1.0);
pub const LEARNING_RATE_MULTIPLIER: Bound = positive("learning_rate_multiplier", "--lr", 500.0);
pub const WEIGHT_DECAY: Bound =
    Bound { min: 0.0, above_min: false, ..positive("weight_decay", "--weight-decay", 10.0) };
pub const MAX_GRAD_NORM: Bound =
    Bound { min: 0.0, above_min: false, ..positive("max_grad_norm", "--max-grad-norm", 1e6) };

/// What a run is shaped like, for its memory estimate.
#[derive(Debug, Clone, Copy)]
pub struct RunShape {
    pub batch_size: usize,
    pub max_seq_len: usize,
    pub rank: usize,
    /// LoRA sites per layer (target modules).
    pub targets: usize,
    pub threads: usize,
}

/// Bytes a run needs at its peak: the frozen base in float32 (read twice: the
/// dense copy the passes run over and the serving copy the run loads for its
/// tokenizer, template and replies), each layer's tape for a whole batch at
/// its longest, the backward pass's working buffers, every thread's
/// attention scores and head logits, and a fixed allowance for the rest.
pub fn memory_estimate(c: &ModelConfig, run: RunShape) -> u64 {
    let (h, ff, layers) = (c.hidden_size as u64, c.intermediate_size as u64, c.num_layers as u64);
    let (qw, kw) = ((c.num_heads * c.head_dim) as u64, (c.num_kv_heads * c.head_dim) as u64);
    let vocab = c.vocab_size as u64;
    let base = c.parameter_count();
    let tokens = (run.batch_size * run.max_seq_len) as u64;
    let per_token = 4 * h + 2 * qw + 2 * kw + 3 * ff + c.num_heads as u64 + (run.rank * run.targets) as u64;
    let tapes = tokens * (layers + 3) * per_token;
    let longest = run.max_seq_len as u64;
    let threads = run.threads.max(1) as u64;
    let scratch = threads * (2 * longest * longest + 2 * 64 * vocab);
    let adapter = 4 * layers * (run.rank * run.targets) as u64 * (h + ff.max(qw + 2 * kw));
    const FIXED: u64 = 256 << 20;
    4 * (2 * base + tapes + scratch + adapter) + FIXED
}

/// The memory this machine (or the container's cgroup) has, in bytes.
pub fn machine_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let total_kib: u64 =
        meminfo.lines().find_map(|l| l.strip_prefix("MemTotal:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    let total = total_kib * 1024;
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max").ok().and_then(|s| s.trim().parse::<u64>().ok());
    Some(cgroup.map_or(total, |limit| limit.min(total)))
}

/// Human-readable bytes, for error messages.
pub fn show_bytes(bytes: u64) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    const MIB: f64 = (1u64 << 20) as f64;
    if bytes as f64 >= GIB {
        format!("{:.1} GiB", bytes as f64 / GIB)
    } else {
        format!("{:.0} MiB", bytes as f64 / MIB)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_accept_their_range_and_name_it() {
        assert!(BATCH_SIZE.contains(1.0) && BATCH_SIZE.contains(256.0));
        for bad in [0.0, 257.0, 1.5, f64::NAN, f64::INFINITY, 1e15] {
            assert!(!BATCH_SIZE.contains(bad), "{bad}");
        }
        assert!(!EPOCHS.contains(0.0) && EPOCHS.contains(0.5));
        assert!(MIN_LR_RATIO.contains(0.0) && MIN_LR_RATIO.contains(1.0) && !MIN_LR_RATIO.contains(1.1));
        assert_eq!(BATCH_SIZE.describe(), "a whole number from 1 to 256");
        assert_eq!(MAX_SEQ_LEN.at_most(8192.0).max, 8192.0);
    }

    #[test]
    fn the_estimate_grows_with_the_batch_and_its_length() {
        let c = crate::model::random::RandomSource::tiny_config(96);
        let shape = RunShape { batch_size: 8, max_seq_len: 96, rank: 8, targets: 2, threads: 1 };
        let small = memory_estimate(&c, shape);
        let wide = memory_estimate(&c, RunShape { batch_size: 64, ..shape });
        let long = memory_estimate(&c, RunShape { max_seq_len: 4096, ..shape });
        assert!(small < wide && small < long, "{small} {wide} {long}");
        let huge = memory_estimate(&c, RunShape { batch_size: 256, max_seq_len: 32_768, ..shape });
        assert!(huge > 1 << 34, "{huge}");
    }
}
