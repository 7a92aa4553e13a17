//! The requests of a benchmark run, drawn before it starts (so a seed
//! repeats a run exactly): which model each names, its prompt and output
//! lengths, and when it is sent.

use std::time::Duration;

use super::{BenchArgs, BenchError};
use crate::rng::SplitMix;

#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    pub index: usize,
    pub model: String,
    pub prompt_tokens: usize,
    pub max_tokens: usize,
    /// When it is sent, from the start of the run.
    pub at: Duration,
}

/// Most requests one run plans (a --rate × --duration beyond it is refused).
const MAX_REQUESTS: usize = 1_000_000;

pub fn plan(args: &BenchArgs) -> Result<Vec<Planned>, BenchError> {
    let invalid = |why: &str| Err(BenchError::Invalid(why.into()));
    if args.adapters > 0 && args.llama_cpp_lora {
        return invalid("--llama-cpp-lora selects adapters by --model order; it cannot be used with --adapters");
    }
    let usable = |x: f64| x >= 0.0 && x.is_finite();
    if !usable(args.rate) || !usable(args.alpha) {
        return invalid("--rate and --alpha must be finite and at least 0");
    }
    if args.duration.is_some() && args.rate == 0.0 {
        return invalid("--duration needs --rate (an open-loop run)");
    }
    if let Some(range) = args.prompt_tokens_range.or(args.max_tokens_range) {
        if range.0 == 0 {
            return invalid("length ranges start at 1");
        }
    }
    let mut rng = SplitMix(args.seed);
    let popularity = Popularity::new(args.adapters, args.alpha);
    let mut plan = Vec::new();
    let mut at = 0.0f64;
    for index in 0..MAX_REQUESTS {
        if args.rate > 0.0 {
            // Exponential gaps: a Poisson process of `rate` per second.
            at += -(1.0 - rng.next_f64()).ln() / args.rate;
        }
        let done = match args.duration {
            Some(limit) => at > limit,
            None => index >= args.requests,
        };
        if done {
            break;
        }
        let model = match &popularity {
            Some(p) => format!("{}{}", args.adapter_prefix, p.draw(&mut rng)),
            None => args.model[index % args.model.len()].clone(),
        };
        let draw = |rng: &mut SplitMix, range: Option<(usize, usize)>, fixed: usize| match range {
            Some((lo, hi)) => rng.between(lo, hi),
            None => fixed,
        };
        let prompt_tokens = draw(&mut rng, args.prompt_tokens_range, args.prompt_tokens);
        let max_tokens = draw(&mut rng, args.max_tokens_range, args.max_tokens);
        plan.push(Planned { index, model, prompt_tokens, max_tokens, at: Duration::from_secs_f64(at) });
    }
    if plan.is_empty() {
        return invalid("the workload has no requests (raise --requests or --duration)");
    }
    Ok(plan)
}

/// Adapter i drawn with weight 1/(i+1)^alpha (a Zipf law; alpha 0 is uniform).
struct Popularity {
    cumulative: Vec<f64>,
}

impl Popularity {
    fn new(n: usize, alpha: f64) -> Option<Self> {
        if n == 0 {
            return None;
        }
        let mut total = 0.0;
        let cumulative = (0..n)
            .map(|i| {
                total += 1.0 / ((i + 1) as f64).powf(alpha);
                total
            })
            .collect();
        Some(Self { cumulative })
    }

    fn draw(&self, rng: &mut SplitMix) -> usize {
        let total = self.cumulative.last().copied().unwrap_or(1.0);
        let target = rng.next_f64() * total;
        self.cumulative.partition_point(|&c| c <= target).min(self.cumulative.len() - 1)
    }
}

/// `LOW:HIGH` or `LOW-HIGH` (or one number) → an inclusive range.
pub fn parse_range(text: &str) -> Result<(usize, usize), String> {
    let parse = |t: &str| t.trim().parse::<usize>().map_err(|_| format!("`{text}` is not N or LOW:HIGH"));
    let (lo, hi) = match text.split_once([':', '-']) {
        Some((lo, hi)) => (parse(lo)?, parse(hi)?),
        None => (parse(text)?, parse(text)?),
    };
    if lo > hi {
        return Err(format!("`{text}`: LOW is above HIGH"));
    }
    Ok((lo, hi))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::tests::parse as args;

    #[test]
    fn a_seeded_open_loop_workload_has_the_asked_shape() -> Result<(), BenchError> {
        let a = args(&[
            "--adapters",
            "50",
            "--alpha",
            "1",
            "--rate",
            "20",
            "--duration",
            "100",
            "--prompt-tokens-range",
            "8:512",
            "--max-tokens-range",
            "8:64",
            "--seed",
            "3",
        ]);
        let plan = plan(&a)?;
        assert_eq!(plan, super::plan(&a)?, "the same seed, the same run");
        // About rate × duration arrivals, in order, within the duration.
        assert!((1800..2200).contains(&plan.len()), "{}", plan.len());
        assert!(plan.windows(2).all(|w| w[0].at <= w[1].at));
        assert!(plan.last().is_some_and(|p| p.at <= Duration::from_secs(100)));
        assert!(plan.iter().all(|p| (8..=512).contains(&p.prompt_tokens) && (8..=64).contains(&p.max_tokens)));
        // Zipf with alpha 1 over 50: adapter-0 about 22 % of requests, adapter-1 half as many.
        let share = |name: &str| plan.iter().filter(|p| p.model == name).count() as f64 / plan.len() as f64;
        assert!((0.18..0.27).contains(&share("adapter-0")), "{}", share("adapter-0"));
        assert!((0.08..0.14).contains(&share("adapter-1")), "{}", share("adapter-1"));
        assert!(plan.iter().all(|p| p.model.starts_with("adapter-")));
        Ok(())
    }

    #[test]
    fn a_closed_loop_rotates_over_the_models() -> Result<(), BenchError> {
        let plan = plan(&args(&["--model", "a,b", "--requests", "4"]))?;
        assert_eq!(plan.iter().map(|p| p.model.as_str()).collect::<Vec<_>>(), ["a", "b", "a", "b"]);
        assert!(plan.iter().all(|p| p.at == Duration::ZERO && p.prompt_tokens == 128 && p.max_tokens == 64));
        assert!(super::plan(&args(&["--model", "a", "--duration", "5"])).is_err());
        assert!(parse_range("9:3").is_err());
        assert_eq!(parse_range("7"), Ok((7, 7)));
        assert_eq!(parse_range("8-64"), Ok((8, 64)));
        Ok(())
    }
}
