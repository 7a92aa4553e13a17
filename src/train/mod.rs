//! The fine-tuning half: LoRA trained on a frozen base, saved as a PEFT
//! adapter that tailor serves at once.
//!
//! - `data`: OpenAI's fine-tuning JSONL, rendered and masked;
//! - `model`: the training forward (candle's differentiable ops over dense
//!   weights, the LoRA matrices as variables) and its loss;
//! - `optim`: AdamW and the learning-rate schedule;
//! - `peft`: the adapter folder PEFT, vLLM and tailor load;
//! - `run` and `report`: the `tailor train` loop and what it leaves beside
//!   the adapter (training log, loss curve, model card).

pub mod data;
pub mod model;
pub mod optim;
pub mod peft;
pub mod report;
pub mod run;

pub use model::{Batch, Lora, TrainModel, MODULES};

#[cfg(test)]
mod tests {
    use candle_core::{DType, Tensor};

    use super::*;
    use crate::model::random::RandomSource;

    fn tiny(dtype: DType) -> TrainModel {
        let mut src = RandomSource::new(RandomSource::tiny_config(96), 3)
            .with_projections(candle_core::quantized::GgmlDType::Q8_0, true);
        TrainModel::load(&mut src, dtype).expect("tiny model")
    }

    fn batch() -> Batch {
        Batch {
            ids: vec![vec![1, 5, 9, 33, 2, 70, 11], vec![4, 8, 15, 16, 23]],
            // The first example learns only its last three predictions, the second all but the first.
            weights: vec![vec![0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0], vec![0.0, 1.0, 1.0, 1.0, 0.0]],
        }
    }

    /// A LoRA whose B is not zero, so both A and B have gradients.
    fn lora(model: &TrainModel) -> Lora {
        let targets: Vec<String> = ["q_proj", "v_proj", "o_proj", "down_proj"].iter().map(|s| s.to_string()).collect();
        let lora = Lora::new(model, 4, 8.0, false, &targets, 11).expect("lora");
        for (i, (_, b)) in lora.weights.values().enumerate() {
            let shape = b.as_tensor().shape().clone();
            let values: Vec<f64> =
                (0..shape.elem_count()).map(|j| (((i * 31 + j * 7) % 13) as f64 - 6.0) * 0.01).collect();
            b.set(
                &Tensor::from_vec(values, shape, &candle_core::Device::Cpu)
                    .and_then(|t| t.to_dtype(model.dtype()))
                    .expect("b"),
            )
            .expect("set b");
        }
        lora
    }

    #[test]
    fn lora_gradients_match_finite_differences() {
        let model = tiny(DType::F64);
        let lora = lora(&model);
        let (loss, _) = model.loss(&batch(), Some(&lora)).expect("loss");
        let grads = loss.backward().expect("backward");
        let eps = 1e-6;
        let mut checked = 0;
        for (key, (a, b)) in &lora.weights {
            for var in [a, b] {
                let analytic =
                    grads.get(var.as_tensor()).expect("a gradient").flatten_all().unwrap().to_vec1::<f64>().unwrap();
                let original = var.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap();
                let shape = var.as_tensor().shape().clone();
                for index in [0, original.len() / 3, original.len() - 1] {
                    let at = |delta: f64| {
                        let mut values = original.clone();
                        values[index] += delta;
                        var.set(&Tensor::from_vec(values, shape.clone(), &candle_core::Device::Cpu).unwrap()).unwrap();
                        let (l, _) = model.loss(&batch(), Some(&lora)).unwrap();
                        l.to_scalar::<f64>().unwrap()
                    };
                    let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
                    var.set(&Tensor::from_vec(original.clone(), shape.clone(), &candle_core::Device::Cpu).unwrap())
                        .unwrap();
                    let error = (numeric - analytic[index]).abs() / numeric.abs().max(analytic[index].abs()).max(1e-6);
                    assert!(error < 1e-5, "{key:?} [{index}]: analytic {} vs numeric {numeric}", analytic[index]);
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, 2 * 3 * 2 * 4, "every matrix of every target in both layers");
    }

    #[test]
    fn a_fresh_adapter_is_the_base_and_weights_select_positions() {
        let model = tiny(DType::F32);
        let targets = vec!["q_proj".to_string(), "v_proj".to_string()];
        let fresh = Lora::new(&model, 8, 16.0, false, &targets, 1).expect("lora");
        let (with, total) = model.loss(&batch(), Some(&fresh)).expect("loss");
        let (without, _) = model.loss(&batch(), None).expect("loss");
        assert_eq!(total, 6.0);
        assert_eq!(with.to_scalar::<f32>().unwrap(), without.to_scalar::<f32>().unwrap(), "B starts at zero");
        let nothing = Batch { ids: vec![vec![1, 2, 3]], weights: vec![vec![0.0, 0.0, 0.0]] };
        assert!(model.loss(&nothing, None).is_err(), "nothing to learn is refused");
    }
}
