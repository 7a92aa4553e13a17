//! The fine-tuning half: LoRA trained on a frozen base, saved as a PEFT
//! adapter that tailor serves at once.
//!
//! - `data`: OpenAI's fine-tuning JSONL, rendered and masked;
//! - `model`: the frozen base read dense and the LoRA matrices;
//! - `forward` and `backward`: the decoder over a packed batch and the
//!   gradients of its loss with respect to the LoRA matrices, written out
//!   by hand over `linalg`'s matrix products (no autograd graph);
//! - `optim`: AdamW and the learning-rate schedule;
//! - `limits`: the ranges of a run's settings and the memory it needs;
//! - `peft`: the adapter folder PEFT, vLLM and tailor load;
//! - `args`: what a run is asked, what it reports, how it fails;
//! - `run` and `report`: the `tailor train` loop and what it leaves beside
//!   the adapter (training log, loss curve, model card).

pub mod args;
pub mod backward;
pub mod data;
pub mod forward;
pub mod limits;
pub mod linalg;
pub mod model;
pub mod optim;
pub mod peft;
pub mod report;
pub mod run;

pub use backward::Grads;
pub use model::{Batch, Lora, Pair, TrainModel, MODULES};

#[cfg(test)]
mod tests {
    use super::linalg::Real;
    use super::*;
    use crate::model::random::RandomSource;

    fn tiny<T: Real>() -> TrainModel<T> {
        tiny_with(|_| {})
    }

    /// A tiny random model, its config changed by `shape` first.
    fn tiny_with<T: Real>(shape: impl FnOnce(&mut crate::model::ModelConfig)) -> TrainModel<T> {
        let mut config = RandomSource::tiny_config(96);
        shape(&mut config);
        let mut src = RandomSource::new(config, 3).with_projections(candle_core::quantized::GgmlDType::Q8_0, true);
        TrainModel::load(&mut src).expect("tiny model")
    }

    fn batch() -> Batch {
        Batch {
            ids: vec![vec![1, 5, 9, 33, 2, 70, 11], vec![4, 8, 15, 16, 23]],
            weights: vec![vec![0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0], vec![0.0, 1.0, 1.0, 1.0, 0.0]],
        }
    }

    fn lora<T: Real>(model: &TrainModel<T>) -> Lora<T> {
        let targets: Vec<String> = ["q_proj", "v_proj", "o_proj", "down_proj"].iter().map(|s| s.to_string()).collect();
        with_trained_b(Lora::new(model, 4, 8.0, false, &targets, 11).expect("lora"))
    }

    fn with_trained_b<T: Real>(mut lora: Lora<T>) -> Lora<T> {
        // A trained-looking B, so every path through the adapter matters.
        for (i, pair) in lora.weights.values_mut().enumerate() {
            for (j, b) in pair.b.iter_mut().enumerate() {
                *b = T::of((((i * 31 + j * 7) % 13) as f64 - 6.0) * 0.01);
            }
        }
        lora
    }

    #[test]
    fn lora_gradients_match_finite_differences() {
        gradient_check(tiny::<f64>());
    }

    /// Qwen's layout: q/k/v biases (Qwen2) and per-head q/k norms (Qwen3).
    #[test]
    fn lora_gradients_match_finite_differences_with_biases_and_head_norms() {
        let model = tiny_with::<f64>(|c| {
            c.attention_bias = true;
            c.qk_norm = true;
        });
        assert!(model.layers[0].qkv_bias.is_some() && model.layers[0].qk_norm.is_some());
        gradient_check(model);
    }

    /// Phi-3's layout: q/k/v and gate/up fused, LoRA on the fused modules.
    #[test]
    fn lora_gradients_match_finite_differences_on_fused_projections() {
        let model = tiny_with::<f64>(|c| c.architecture = crate::model::config::Architecture::Phi3);
        let targets: Vec<String> = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"].map(String::from).to_vec();
        gradient_check_of(&model, with_trained_b(Lora::new(&model, 4, 8.0, false, &targets, 11).expect("lora")));
        let error = Lora::new(&model, 4, 8.0, false, &["q_proj".to_string()], 1).expect_err("q_proj on Phi-3");
        assert!(error.to_string().contains("qkv_proj"), "{error}");
    }

    fn gradient_check(model: TrainModel<f64>) {
        let lora = lora(&model);
        gradient_check_of(&model, lora);
    }

    fn gradient_check_of(model: &TrainModel<f64>, mut lora: Lora<f64>) {
        let mut grads = lora.zeros_like();
        let (loss, _) = model.loss_and_gradients(&batch(), &lora, 1.0, &mut grads).expect("gradients");
        let forward_only = model.loss(&batch(), Some(&lora)).expect("loss").0;
        assert!((loss - forward_only).abs() < 1e-12 * loss, "one forward for both: {loss} vs {forward_only}");
        let eps = 1e-6;
        let mut checked = 0;
        let keys: Vec<(usize, usize)> = lora.weights.keys().copied().collect();
        for key in keys {
            for which in 0..2 {
                let analytic = if which == 0 { grads[&key].a.clone() } else { grads[&key].b.clone() };
                for index in [0, analytic.len() / 3, analytic.len() - 1] {
                    let mut at = |delta: f64| {
                        let pair = lora.weights.get_mut(&key).expect("pair");
                        let values = if which == 0 { &mut pair.a } else { &mut pair.b };
                        values[index] += delta;
                        let (l, _) = model.loss(&batch(), Some(&lora)).expect("loss");
                        let pair = lora.weights.get_mut(&key).expect("pair");
                        let values = if which == 0 { &mut pair.a } else { &mut pair.b };
                        values[index] -= delta;
                        l
                    };
                    let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
                    let error = (numeric - analytic[index]).abs() / numeric.abs().max(analytic[index].abs()).max(1e-6);
                    assert!(error < 1e-5, "{key:?} [{index}]: analytic {} vs numeric {numeric}", analytic[index]);
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, 2 * 3 * 2 * 4, "every matrix of every target in both layers");
    }

    #[test]
    fn a_packed_batch_is_each_example_on_its_own() {
        let model = tiny::<f64>();
        let lora = lora(&model);
        let whole = batch();
        let (loss, total) = model.loss(&whole, Some(&lora)).expect("loss");
        let mut sum = 0.0;
        for (ids, weights) in whole.ids.iter().zip(&whole.weights) {
            let alone = Batch { ids: vec![ids.clone()], weights: vec![weights.clone()] };
            let (l, t) = model.loss(&alone, Some(&lora)).expect("loss");
            sum += l * t;
        }
        assert!((loss - sum / total).abs() < 1e-12, "{loss} vs {}", sum / total);
        // Gradients accumulate: two half-scaled passes give one full one.
        let (mut once, mut twice) = (lora.zeros_like(), lora.zeros_like());
        model.loss_and_gradients(&whole, &lora, 1.0, &mut once).expect("gradients");
        for _ in 0..2 {
            model.loss_and_gradients(&whole, &lora, 0.5, &mut twice).expect("gradients");
        }
        for (a, b) in once.values().zip(twice.values()) {
            assert!(a.a.iter().chain(&a.b).zip(b.a.iter().chain(&b.b)).all(|(x, y)| (x - y).abs() < 1e-12));
        }
    }

    #[test]
    fn threads_split_the_batch_without_changing_the_gradients() {
        let model = tiny::<f64>();
        let lora = lora(&model);
        let on = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("pool");
            pool.install(|| {
                let mut grads = lora.zeros_like();
                let (loss, _) = model.loss_and_gradients(&batch(), &lora, 1.0, &mut grads).expect("gradients");
                (loss, grads)
            })
        };
        let (one_loss, one) = on(1);
        for threads in [2, 3] {
            let (loss, split) = on(threads);
            assert!((loss - one_loss).abs() < 1e-12, "{threads} threads: {loss} vs {one_loss}");
            for (a, b) in one.values().zip(split.values()) {
                assert!(a.a.iter().chain(&a.b).zip(b.a.iter().chain(&b.b)).all(|(x, y)| (x - y).abs() < 1e-12));
            }
        }
    }

    #[test]
    fn a_saved_adapter_loads_back_to_continue_training() {
        let model = tiny::<f32>();
        let lora = lora(&model);
        let dir = tempfile::tempdir().expect("temp dir");
        peft::save(&lora, "tiny", dir.path()).expect("save");
        let back = peft::load(dir.path(), &model).expect("load");
        assert_eq!((back.rank, back.alpha, back.use_rslora), (lora.rank, lora.alpha, lora.use_rslora));
        assert_eq!(back.targets, lora.targets);
        assert_eq!(back.weights, lora.weights);
        // A config that disagrees with its tensors is refused, naming one.
        let path = dir.path().join("adapter_config.json");
        let text = std::fs::read_to_string(&path).expect("config").replace("\"r\": 4", "\"r\": 2");
        std::fs::write(&path, text).expect("write");
        let error = peft::load(dir.path(), &model).expect_err("wrong rank").to_string();
        assert!(error.contains("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"), "{error}");
    }

    #[test]
    fn a_fresh_adapter_is_the_base_and_weights_select_positions() {
        let model = tiny::<f32>();
        let targets = vec!["q_proj".to_string(), "v_proj".to_string()];
        let fresh = Lora::new(&model, 8, 16.0, false, &targets, 1).expect("lora");
        let (with, total) = model.loss(&batch(), Some(&fresh)).expect("loss");
        let (without, _) = model.loss(&batch(), None).expect("loss");
        assert_eq!(total, 6.0);
        assert_eq!(with, without, "B starts at zero");
        let nothing = Batch { ids: vec![vec![1, 2, 3]], weights: vec![vec![0.0, 0.0, 0.0]] };
        assert!(model.loss(&nothing, None).is_err(), "nothing to learn is refused");
        // An id past the embedding is an error, not a panic, in both passes.
        let outside = Batch { ids: vec![vec![1, 96, 3]], weights: vec![vec![1.0, 1.0, 1.0]] };
        let error = model.loss(&outside, Some(&fresh)).expect_err("id 96 of 96").to_string();
        assert!(error.contains("token id 96"), "{error}");
        let mut grads = fresh.zeros_like();
        assert!(model.loss_and_gradients(&outside, &fresh, 1.0, &mut grads).is_err());
    }
}
