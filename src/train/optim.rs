//! AdamW on the LoRA matrices (float32 moments, PyTorch's update and
//! defaults) and the learning-rate schedule: linear warm-up, then cosine,
//! linear or constant down to a floor.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::model::Result;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
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

pub struct AdamW {
    vars: Vec<Var>,
    first: Vec<Tensor>,
    second: Vec<Tensor>,
    steps: i32,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl AdamW {
    pub fn new(vars: Vec<Var>, weight_decay: f64) -> Result<Self> {
        let zeros = |v: &Var| v.as_tensor().zeros_like();
        let first = vars.iter().map(zeros).collect::<candle_core::Result<Vec<_>>>()?;
        let second = vars.iter().map(zeros).collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self { vars, first, second, steps: 0, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay })
    }

    /// The global L2 norm of the gradients.
    pub fn grad_norm(&self, grads: &GradStore) -> Result<f64> {
        let mut sum = 0f64;
        for var in &self.vars {
            if let Some(g) = grads.get(var.as_tensor()) {
                sum += g.sqr()?.sum_all()?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
            }
        }
        Ok(sum.sqrt())
    }

    /// One update with `lr`, the gradients first scaled by `grad_scale`
    /// (clipping, accumulation).
    pub fn step(&mut self, grads: &GradStore, lr: f64, grad_scale: f64) -> Result<()> {
        self.steps += 1;
        let (b1, b2) = (self.beta1, self.beta2);
        let correction1 = 1.0 - b1.powi(self.steps);
        let correction2 = 1.0 - b2.powi(self.steps);
        for ((var, m), v) in self.vars.iter().zip(&mut self.first).zip(&mut self.second) {
            let Some(g) = grads.get(var.as_tensor()) else { continue };
            let g = (g * grad_scale)?;
            *m = ((&*m * b1)? + (&g * (1.0 - b1))?)?;
            *v = ((&*v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let update = ((&*m / correction1)? / ((&*v / correction2)?.sqrt()? + self.eps)?)?;
            let decayed = (var.as_tensor() * (1.0 - lr * self.weight_decay))?;
            var.set(&(decayed - (update * lr)?)?)?;
        }
        Ok(())
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
        let x = Var::new(&[3.0f32, -2.0], &candle_core::Device::Cpu).unwrap();
        let mut opt = AdamW::new(vec![x.clone()], 0.0).unwrap();
        for _ in 0..500 {
            let loss = x.as_tensor().sqr().unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            opt.step(&grads, 0.05, 1.0).unwrap();
        }
        let v = x.as_tensor().to_vec1::<f32>().unwrap();
        assert!(v.iter().all(|x| x.abs() < 1e-2), "{v:?}");
    }
}
