//! Turning logits into the next token: logit bias and penalties first, then
//! greedy at temperature 0, otherwise temperature, min-p, top-k and top-p
//! over a per-sequence seeded RNG.

use std::collections::{HashMap, HashSet};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Validated sampling settings of one request.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 1.0 disables nucleus sampling.
    pub top_p: f32,
    /// 0 disables top-k.
    pub top_k: usize,
    pub seed: Option<u64>,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// Added to the logits of these ids before anything else (-100 bans, 100 forces).
    pub logit_bias: Vec<(u32, f32)>,
    /// Tokens less likely than `min_p` × the most likely one are dropped (0 disables).
    pub min_p: f32,
    /// Hugging Face's repetition penalty over prompt and generated tokens (1 disables).
    pub repetition_penalty: f32,
    /// Report each sampled token's log-probability and this many alternatives.
    pub logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            min_p: 0.0,
            repetition_penalty: 1.0,
            logprobs: None,
        }
    }
}

/// A sampled token's log-probability and the most likely alternatives, in
/// the distribution it was drawn from (after bias, penalties and temperature,
/// before top-k / top-p / min-p truncation), as vLLM reports them.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: f32,
    /// Most likely first (ties by id).
    pub top: Vec<(u32, f32)>,
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// How often each token was generated so far (for the penalties).
    counts: HashMap<u32, u32>,
    /// Prompt tokens (the repetition penalty covers them too).
    prompt: HashSet<u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        let prompt = if params.repetition_penalty != 1.0 { prompt.iter().copied().collect() } else { HashSet::new() };
        Self { params, rng, counts: HashMap::new(), prompt }
    }

    pub fn sample(&mut self, logits: &mut [f32]) -> u32 {
        let p = &self.params;
        for &(id, bias) in &p.logit_bias {
            if let Some(l) = logits.get_mut(id as usize) {
                *l += bias;
            }
        }
        if p.repetition_penalty != 1.0 {
            let seen = self.prompt.iter().chain(self.counts.keys().filter(|id| !self.prompt.contains(id)));
            for &id in seen {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = repetition_penalized(*l, p.repetition_penalty);
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&id, &n) in &self.counts {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * n as f32;
                }
            }
        }
        let id = if p.temperature < GREEDY_BELOW { argmax(logits) } else { self.sample_random(logits) };
        *self.counts.entry(id).or_default() += 1;
        id
    }

    /// The log-probabilities of the step `sample` just took (`logits` as it
    /// left them), if this request asked for them.
    pub fn logprobs(&self, logits: &[f32], id: u32) -> Option<TokenLogprob> {
        let k = self.params.logprobs?;
        // Greedy requests report the unscaled distribution (temperature 1).
        let t = if self.params.temperature < GREEDY_BELOW { 1.0 } else { self.params.temperature };
        Some(token_logprob(logits, id, k, t))
    }

    /// Temperature, then top-k, then top-p, then a draw — walking the
    /// candidates from the most likely down. Only as much of that order is
    /// sorted as the walk reaches (usually a few dozen of a vocabulary of
    /// tens of thousands), so a step does not sort the whole vocabulary.
    fn sample_random(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        // (id, scaled logit, unnormalized probability)
        let mut candidates: Vec<(u32, f32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, l / p.temperature, 0.0))
            .collect();
        if candidates.is_empty() {
            return argmax(logits);
        }
        if p.top_k > 0 && p.top_k < candidates.len() {
            candidates.select_nth_unstable_by(p.top_k - 1, descending);
            candidates.truncate(p.top_k);
        }
        let max = candidates.iter().fold(f32::NEG_INFINITY, |m, c| m.max(c.1));
        let mut total = 0f32;
        for c in candidates.iter_mut() {
            c.2 = (c.1 - max).exp();
            total += c.2;
        }
        if p.min_p > 0.0 {
            // The most likely candidate weighs exp(0) = 1.
            candidates.retain(|c| c.2 >= p.min_p);
            total = candidates.iter().map(|c| c.2).sum();
        }
        let mut order = SortedPrefix::new(candidates);
        let mut keep = order.len();
        if p.top_p < 1.0 {
            let target = p.top_p * total;
            let mut cumulative = 0.0;
            let mut i = 0;
            while i < keep {
                cumulative += order.get(i).2;
                i += 1;
                if cumulative >= target {
                    keep = i;
                }
            }
            total = cumulative;
        }
        let mut x = self.rng.random::<f32>() * total;
        for i in 0..keep {
            let (id, _, weight) = order.get(i);
            if x < weight {
                return id;
            }
            x -= weight;
        }
        order.get(keep - 1).0
    }
}

/// Hugging Face's rule: positive logits are divided by the penalty, negative
/// ones multiplied, so a penalty above 1 always makes the token less likely.
fn repetition_penalized(logit: f32, penalty: f32) -> f32 {
    if logit > 0.0 {
        logit / penalty
    } else {
        logit * penalty
    }
}

/// Descending by logit; ties broken by id so a seed fully determines the result.
fn descending(a: &(u32, f32, f32), b: &(u32, f32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// Candidates whose sorted order is extended on demand: the first `sorted`
/// are in `descending` order and no later one precedes them.
struct SortedPrefix {
    candidates: Vec<(u32, f32, f32)>,
    sorted: usize,
}

impl SortedPrefix {
    fn new(candidates: Vec<(u32, f32, f32)>) -> Self {
        Self { candidates, sorted: 0 }
    }

    fn len(&self) -> usize {
        self.candidates.len()
    }

    /// The i-th most likely candidate.
    fn get(&mut self, i: usize) -> (u32, f32, f32) {
        if i >= self.sorted {
            let end = (i + 1).max(self.sorted * 4).max(64).min(self.candidates.len());
            let tail = &mut self.candidates[self.sorted..];
            let count = end - self.sorted;
            if count < tail.len() {
                tail.select_nth_unstable_by(count, descending);
            }
            tail[..count].sort_by(descending);
            self.sorted = end;
        }
        self.candidates[i]
    }
}

/// Index of the largest logit (the first one on ties, as torch.argmax).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Temperatures below this are greedy: dividing logits by a tinier one
/// overflows to ±inf and the draw picks nonsense (vLLM uses the same bound).
pub const GREEDY_BELOW: f32 = 1e-5;

/// `id`'s log-probability and the `k` most likely tokens' under
/// softmax(logits / t).
pub fn token_logprob(logits: &[f32], id: u32, k: usize, t: f32) -> TokenLogprob {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &l| m.max(l / t));
    let sum: f64 = logits.iter().map(|&l| ((l / t - max) as f64).exp()).sum();
    let log_norm = max + sum.ln() as f32;
    let logprob = |i: u32| logits.get(i as usize).map_or(f32::NEG_INFINITY, |&l| l / t - log_norm);
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    let k = k.min(order.len());
    let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
    if k > 0 && k < order.len() {
        order.select_nth_unstable_by(k - 1, by_logit);
    }
    order.truncate(k);
    order.sort_by(by_logit);
    TokenLogprob { id, logprob: logprob(id), top: order.into_iter().map(|i| (i, logprob(i))).collect() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tiny_temperature_is_greedy_not_overflow() {
        let logits: Vec<f32> = (0..1000).map(|i| ((i * 37) % 101) as f32 * 0.1).collect();
        let best = argmax(&logits);
        for t in [1e-45f32, 1e-30, 9.9e-6] {
            let mut s = Sampler::new(SamplingParams { temperature: t, seed: Some(1), ..Default::default() }, &[]);
            assert_eq!(s.sample(&mut logits.clone()), best, "temperature {t}");
        }
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(SamplingParams { temperature: 0.0, ..Default::default() }, &[]);
        assert_eq!(s.sample(&mut [0.1, 3.0, 3.0, -1.0]), 1);
    }

    #[test]
    fn same_seed_same_tokens_and_top_k_one_is_greedy() {
        let params = SamplingParams { seed: Some(7), ..Default::default() };
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let draw = |p: &SamplingParams| {
            let mut s = Sampler::new(p.clone(), &[]);
            (0..20).map(|_| s.sample(&mut logits.clone())).collect::<Vec<_>>()
        };
        assert_eq!(draw(&params), draw(&params));
        let top1 = SamplingParams { top_k: 1, ..params.clone() };
        assert!(draw(&top1).iter().all(|&t| t == 6));
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        let mut s = Sampler::new(SamplingParams { top_p: 0.5, seed: Some(1), ..Default::default() }, &[]);
        // token 2 holds ~0.84 of the mass: with top_p 0.5 it is the only candidate.
        for _ in 0..50 {
            assert_eq!(s.sample(&mut [0.0, 1.0, 3.0, 0.5]), 2);
        }
    }

    #[test]
    fn a_large_vocabulary_respects_top_k_and_top_p() {
        // 50 000 logits: token 40 000 is far ahead, then ten near-ties.
        let mut logits = vec![-10.0f32; 50_000];
        logits[40_000] = 10.0;
        for i in 0..10 {
            logits[100 + i] = 8.0;
        }
        let mut nucleus = Sampler::new(SamplingParams { top_p: 0.3, seed: Some(3), ..Default::default() }, &[]);
        let mut top3 = Sampler::new(SamplingParams { top_k: 3, seed: Some(3), ..Default::default() }, &[]);
        let mut free = Sampler::new(SamplingParams { seed: Some(3), ..Default::default() }, &[]);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..300 {
            assert_eq!(nucleus.sample(&mut logits.clone()), 40_000);
            // top-3 = token 40 000 and the two lowest ids among the ties.
            assert!([40_000, 100, 101].contains(&top3.sample(&mut logits.clone())));
            seen.insert(free.sample(&mut logits.clone()));
        }
        // Without limits the ties (~0.5 of the mass together) are drawn too.
        assert!(seen.contains(&40_000) && seen.iter().any(|&t| (100..110).contains(&t)), "{seen:?}");
    }

    #[test]
    fn penalties_push_repeated_tokens_down() {
        let mut s =
            Sampler::new(SamplingParams { temperature: 0.0, frequency_penalty: 2.0, ..Default::default() }, &[]);
        assert_eq!(s.sample(&mut [1.0, 0.0]), 0);
        assert_eq!(s.sample(&mut [1.0, 0.0]), 1);
    }

    #[test]
    fn logit_bias_bans_and_forces() {
        let logits = vec![3.0f32, 1.0, 0.5, -1.0];
        let greedy = |bias: Vec<(u32, f32)>| {
            let mut s = Sampler::new(SamplingParams { temperature: 0.0, logit_bias: bias, ..Default::default() }, &[]);
            s.sample(&mut logits.clone())
        };
        assert_eq!(greedy(vec![]), 0);
        assert_eq!(greedy(vec![(0, -100.0)]), 1);
        assert_eq!(greedy(vec![(3, 100.0)]), 3);
        assert_eq!(greedy(vec![(99, 100.0)]), 0, "an id past the logits is ignored, not a panic");
    }

    #[test]
    fn repetition_penalty_covers_prompt_and_output_the_hugging_face_way() {
        let params = SamplingParams { temperature: 0.0, repetition_penalty: 2.0, ..Default::default() };
        let mut s = Sampler::new(params, &[0, 2]);
        let mut logits = vec![3.0f32, 2.0, -1.0, 1.0];
        assert_eq!(s.sample(&mut logits), 1, "token 0 is in the prompt: 3 / 2 < 2");
        assert_eq!(logits, [1.5, 2.0, -2.0, 1.0]);
        // Token 1 was generated: penalized on the next step too.
        let mut logits = vec![2.0f32, 2.0, -1.0, 1.2];
        assert_eq!(s.sample(&mut logits), 3);
        assert_eq!(logits, [1.0, 1.0, -2.0, 1.2]);
    }

    #[test]
    fn min_p_one_keeps_only_the_most_likely() {
        let logits = vec![0.5f32, 2.0, 1.9, -3.0];
        for seed in 0..50 {
            let params = SamplingParams { temperature: 1.5, min_p: 1.0, seed: Some(seed), ..Default::default() };
            assert_eq!(Sampler::new(params, &[]).sample(&mut logits.clone()), 1);
        }
        let mut seen = std::collections::HashSet::new();
        for seed in 0..200 {
            let params = SamplingParams { temperature: 1.5, min_p: 0.5, seed: Some(seed), ..Default::default() };
            seen.insert(Sampler::new(params, &[]).sample(&mut logits.clone()));
        }
        assert_eq!(seen, [1, 2].into_iter().collect(), "0.5 keeps the two near the top, drops the rest");
    }

    #[test]
    fn logprobs_are_of_the_tempered_distribution_most_likely_first() {
        let params = SamplingParams { temperature: 0.0, logprobs: Some(2), ..Default::default() };
        let mut s = Sampler::new(params, &[]);
        let mut logits = vec![1.0f32, 3.0, 2.0];
        let id = s.sample(&mut logits);
        let lp = s.logprobs(&logits, id).expect("asked for");
        let norm = (1f32.exp() + 3f32.exp() + 2f32.exp()).ln();
        assert_eq!(lp.id, 1);
        assert!((lp.logprob - (3.0 - norm)).abs() < 1e-5);
        assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), [1, 2]);
        assert!((lp.top[1].1 - (2.0 - norm)).abs() < 1e-5);
        let tempered = Sampler::new(
            SamplingParams { temperature: 2.0, logprobs: Some(0), seed: Some(1), ..Default::default() },
            &[],
        );
        let lp = tempered.logprobs(&logits, 0).expect("asked for");
        let norm = (0.5f32.exp() + 1.5f32.exp() + 1f32.exp()).ln();
        assert!((lp.logprob - (0.5 - norm)).abs() < 1e-5 && lp.top.is_empty());
        assert!(Sampler::new(SamplingParams::default(), &[]).logprobs(&logits, 0).is_none());
    }
}
