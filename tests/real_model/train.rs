//! Training's forward is inference's: the loss `tailor::train` minimises on
//! a batch equals the cross-entropy of the served model's own logits with
//! the same adapter (saved as PEFT and loaded back as the server loads it).

use candle_core::{DType, Tensor};
use tailor::lora::{adapter, BaseShapes};
use tailor::model::gguf::GgufSource;
use tailor::model::WeightMode;
use tailor::train::{peft, Batch, Lora, TrainModel};

use crate::common::{model_path, TestResult};
use crate::reference::{all_logits, loaded};

#[test]
fn training_loss_equals_the_inference_cross_entropy() -> TestResult {
    let base = loaded(WeightMode::F32);
    let tokenizer = &base.info.tokenizer;
    let texts = ["The capital of France is Paris, a city on the Seine.", "Arr matey! Ships sail the seven seas."];
    let ids: Vec<Vec<u32>> = texts.iter().map(|t| tokenizer.encode(t)).collect::<Result<_, _>>()?;
    let weights: Vec<Vec<f32>> =
        ids.iter().map(|e| (0..e.len()).map(|i| if i >= 2 { 1.0 } else { 0.0 }).collect()).collect();
    let batch = Batch { ids: ids.clone(), weights: weights.clone() };

    let model = TrainModel::load(&mut GgufSource::open(&model_path(), WeightMode::F32)?, DType::F32)?;
    let targets: Vec<String> = ["q_proj", "v_proj", "down_proj"].iter().map(|s| s.to_string()).collect();
    let lora = Lora::new(&model, 8, 16.0, false, &targets, 5)?;
    // A trained-looking B, so the adapter changes the logits.
    for (i, (_, b)) in lora.weights.values().enumerate() {
        let shape = b.as_tensor().shape().clone();
        let values: Vec<f32> = (0..shape.elem_count()).map(|j| (((i * 17 + j * 5) % 11) as f32 - 5.0) * 2e-3).collect();
        b.set(&Tensor::from_vec(values, shape, &candle_core::Device::Cpu)?)?;
    }
    let (loss, total) = model.loss(&batch, Some(&lora))?;
    let trained = loss.to_scalar::<f32>()? as f64;

    let dir = tempfile::tempdir()?;
    peft::save(&lora, "SmolLM2-135M-Instruct", dir.path())?;
    let served = std::sync::Arc::new(adapter::load(dir.path(), &BaseShapes::of(base.model.config()), 64)?);
    let mut sum = 0f64;
    for (example, w) in ids.iter().zip(&weights) {
        let logits = all_logits(base, example, Some(&served));
        for pos in 0..example.len() - 1 {
            let row = &logits[pos];
            let top = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let log_z = row.iter().map(|&v| (v as f64 - top).exp()).sum::<f64>().ln() + top;
            sum += w[pos] as f64 * (log_z - row[example[pos + 1] as usize] as f64);
        }
    }
    let served_loss = sum / total;
    let without = model.loss(&batch, None)?.0.to_scalar::<f32>()? as f64;
    assert!((trained - without).abs() > 1e-3, "the adapter must matter: {trained} vs base {without}");
    let relative = (trained - served_loss).abs() / served_loss;
    assert!(relative < 1e-5, "training loss {trained} vs served cross-entropy {served_loss} ({relative:e})");
    println!("training loss {trained:.6}, served {served_loss:.6}, relative {relative:.1e}");
    Ok(())
}
