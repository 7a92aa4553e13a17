//! AdamW on the LoRA matrices (float32 moments, PyTorch's update and
//! defaults) and the learning-rate schedule: linear warm-up, then cosine,
//! linear or constant down to a floor.

use super::backward::Grads;
use super::linalg::Real;
use super::model::Lora;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    Cosine,
    Linear,
    Constant,
}

/// The learning rate of each step.
#[derive(Debug, Clone, Copy)]
pub struct LearningRate {
    pub peak: f64,
    pub warmup: usize,
    /// Steps the decay is planned over (may exceed the steps run).
    pub planned: usize,
    pub schedule: Schedule,
    /// The floor, as a fraction of the peak.
    pub min_ratio: f64,
}

impl LearningRate {
    /// The rate at `step` (0-based), as transformers' schedulers give it.
    pub fn at(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.peak * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.planned.saturating_sub(self.warmup).max(1);
        let progress = ((step - self.warmup) as f64 / span as f64).min(1.0);
        let decay = match self.schedule {
            Schedule::Constant => 1.0,
            Schedule::Linear => 1.0 - progress,
            Schedule::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        };
        self.peak * (self.min_ratio + (1.0 - self.min_ratio) * decay)
    }
}

/// AdamW (PyTorch's update: decoupled weight decay, bias-corrected moments).
pub struct AdamW<T> {
    first: Grads<T>,
    second: Grads<T>,
    steps: i32,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl<T: Real> AdamW<T> {
    pub fn new(lora: &Lora<T>, weight_decay: f64) -> Self {
        Self {
            first: lora.zeros_like(),
            second: lora.zeros_like(),
            steps: 0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
        }
    }

    /// The global L2 norm of the gradients.
    pub fn grad_norm(grads: &Grads<T>) -> f64 {
        let sum: f64 = grads.values().flat_map(|p| p.a.iter().chain(&p.b)).map(|g| g.f64() * g.f64()).sum();
        sum.sqrt()
    }

    /// One update of `lora` with `lr`, the gradients first scaled by
    /// `grad_scale` (clipping).
    pub fn step(&mut self, lora: &mut Lora<T>, grads: &Grads<T>, lr: f64, grad_scale: f64) {
        self.steps += 1;
        let (b1, b2) = (self.beta1, self.beta2);
        let correction1 = 1.0 - b1.powi(self.steps);
        let correction2 = 1.0 - b2.powi(self.steps);
        let decay = 1.0 - lr * self.weight_decay;
        for (key, pair) in lora.weights.iter_mut() {
            let (Some(g), Some(m), Some(v)) = (grads.get(key), self.first.get_mut(key), self.second.get_mut(key))
            else {
                continue;
            };
            for (w, g, m, v) in [(&mut pair.a, &g.a, &mut m.a, &mut v.a), (&mut pair.b, &g.b, &mut m.b, &mut v.b)] {
                for (((w, &g), m), v) in w.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                    let g = g.f64() * grad_scale;
                    let m1 = b1 * m.f64() + (1.0 - b1) * g;
                    let v1 = b2 * v.f64() + (1.0 - b2) * g * g;
                    *m = T::of(m1);
                    *v = T::of(v1);
                    let update = (m1 / correction1) / ((v1 / correction2).sqrt() + self.eps);
                    *w = T::of(w.f64() * decay - lr * update);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine_to_the_floor() {
        let lr = LearningRate { peak: 2e-3, warmup: 10, planned: 160, schedule: Schedule::Cosine, min_ratio: 0.1 };
        assert!((lr.at(0) - 2e-4).abs() < 1e-12);
        assert!((lr.at(9) - 2e-3).abs() < 1e-12);
        assert!((lr.at(10) - 2e-3).abs() < 1e-12);
        assert!((lr.at(85) - 2e-3 * (0.1 + 0.9 * 0.5)).abs() < 1e-12, "{}", lr.at(85));
        assert!((lr.at(160) - 2e-4).abs() < 1e-12);
        assert!((lr.at(500) - 2e-4).abs() < 1e-12);
    }

    #[test]
    fn adamw_minimises_a_quadratic() {
        use super::super::model::Pair;
        let mut lora = Lora::<f32> {
            rank: 1,
            alpha: 1.0,
            use_rslora: false,
            targets: vec!["q_proj".into()],
            weights: [((0, 0), Pair { a: vec![3.0, -2.0], b: vec![0.5] })].into_iter().collect(),
        };
        let mut opt = AdamW::new(&lora, 0.0);
        for _ in 0..500 {
            // The gradient of Σ w² is 2w.
            let grads: Grads<f32> = lora
                .weights
                .iter()
                .map(|(k, p)| {
                    (*k, Pair { a: p.a.iter().map(|w| 2.0 * w).collect(), b: p.b.iter().map(|w| 2.0 * w).collect() })
                })
                .collect();
            opt.step(&mut lora, &grads, 0.05, 1.0);
        }
        let pair = &lora.weights[&(0, 0)];
        assert!(pair.a.iter().chain(&pair.b).all(|x| x.abs() < 1e-2), "{pair:?}");
    }
}
