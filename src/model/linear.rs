//! The one projection type: every q/k/v/o/gate/up/down projection and the
//! output head is a `Linear`, whatever the weight format.

use candle_core::quantized::QMatMul;
use std::sync::OnceLock;

use candle_core::{Device, Module, Tensor};

use super::kernels::{self, q8::Q8Row, q8k::Q8KRow, Activations, Format, QuantMatrix};
use super::lora::{self, LoraGroup, Slot};
use super::Result;

/// The base weight, `[out_features, in_features]`.
#[derive(Debug, Clone)]
pub enum Weight {
    /// Kept in its GGUF block format; activations are quantized on the fly.
    Quantized(QMatMul),
    /// Dense float32, on our batch-invariant float32 kernel.
    Dense(std::sync::Arc<kernels::dense::DenseMatrix>),
    /// GGUF blocks run by our own kernels (`kernels::from_gguf`).
    Kernel(std::sync::Arc<dyn QuantMatrix>),
    /// F16 / BF16 kept in 16 bits, float32 activations.
    Half(std::sync::Arc<kernels::half::HalfMatrix>),
}

impl Weight {
    /// A float32 weight from a `[out, in]` tensor of any float type.
    pub fn dense(w: &Tensor) -> Result<Weight> {
        let (rows, cols) = w.dims2()?;
        let values = w.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let matrix = kernels::dense::DenseMatrix::new(values, rows, cols)
            .ok_or_else(|| super::ModelError::Invalid("dense weight of the wrong size".into()))?;
        Ok(Weight::Dense(std::sync::Arc::new(matrix)))
    }
}

#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
    in_features: usize,
    out_features: usize,
    /// Where adapters find their weights for this projection (none for the head).
    slot: Option<Slot>,
    span: tracing::Span,
}

impl Linear {
    pub fn new(weight: Weight, bias: Option<Tensor>, out_features: usize, in_features: usize) -> Self {
        Self {
            weight,
            bias,
            in_features,
            out_features,
            slot: None,
            span: tracing::trace_span!("linear", out_features, in_features),
        }
    }

    /// Marks this projection as `module` of decoder layer `layer`, so LoRA
    /// adapters can target it.
    pub fn with_slot(mut self, layer: usize, module: usize) -> Self {
        self.slot = Some(Slot { layer, module });
        self
    }

    /// Bytes the base weight holds in memory.
    pub fn weight_bytes(&self) -> usize {
        match &self.weight {
            Weight::Quantized(QMatMul::QTensor(q)) => q.storage_size_in_bytes(),
            Weight::Quantized(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => t.elem_count() * t.dtype().size_in_bytes(),
            Weight::Dense(w) => w.bytes(),
            Weight::Kernel(w) => w.bytes(),
            Weight::Half(w) => w.bytes(),
        }
    }

    /// Whether the weight is dense float32.
    pub fn is_float32(&self) -> bool {
        matches!(&self.weight, Weight::Dense(_) | Weight::Quantized(QMatMul::Tensor(_)))
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// The weight as a dense float32 `[out, in]` tensor (training reads the
    /// frozen base this way), and the bias if there is one.
    pub fn dense_weight(&self) -> Result<(Tensor, Option<Tensor>)> {
        let cpu = &candle_core::Device::Cpu;
        let shape = (self.out_features, self.in_features);
        let dense = match &self.weight {
            Weight::Quantized(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => t.to_dtype(candle_core::DType::F32)?,
            Weight::Dense(w) => Tensor::from_vec(w.values().to_vec(), shape, cpu)?,
            Weight::Quantized(QMatMul::QTensor(q)) => q.dequantize(cpu)?,
            Weight::Kernel(w) => Tensor::from_vec(w.dequantize(), shape, cpu)?,
            Weight::Half(w) => Tensor::from_vec(w.dequantize(), shape, cpu)?,
        };
        Ok((dense.reshape(shape)?, self.bias.clone()))
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// `x`: `[rows, in_features]` → `[rows, out_features]`, plus the delta of
    /// each adapter group on its rows.
    pub fn forward(&self, input: &Input, adapters: &[LoraGroup]) -> Result<Tensor> {
        let _enter = self.span.enter();
        let x = &input.x;
        let y = match &self.weight {
            Weight::Quantized(w) => w.forward(x)?.flatten_all()?.to_vec1::<f32>()?,
            Weight::Dense(w) => super::ops::with_f32(x, |x| w.matmul(x, kernels::isa()))?,
            Weight::Kernel(w) => {
                return Self::forward_kernels(&[self], &[w.as_ref()], input, adapters)?
                    .pop()
                    .ok_or_else(|| super::ModelError::Invalid("no output".into()))
            }
            Weight::Half(w) => super::ops::with_f32(x, |x| w.matmul(x, kernels::isa()))?,
        };
        self.finish(y, input, adapters)
    }

    /// `forward` of several projections over the same input (q/k/v,
    /// gate/up): when all run our kernels (of any types) their matmuls share
    /// one parallel region.
    pub fn forward_many(linears: &[&Linear], input: &Input, adapters: &[LoraGroup]) -> Result<Vec<Tensor>> {
        let kernels: Option<Vec<&dyn QuantMatrix>> = linears
            .iter()
            .map(|l| match &l.weight {
                Weight::Kernel(w) => Some(w.as_ref()),
                _ => None,
            })
            .collect();
        match kernels {
            Some(matrices) => Self::forward_kernels(linears, &matrices, input, adapters),
            None => linears.iter().map(|l| l.forward(input, adapters)).collect(),
        }
    }

    /// Projections on our kernels: the bias and each row's LoRA delta are
    /// added by the matmul's own pieces as they finish, so adapters cost no
    /// parallel region of their own (only the down products, when a step
    /// has many rows).
    fn forward_kernels(
        linears: &[&Linear],
        matrices: &[&dyn QuantMatrix],
        input: &Input,
        adapters: &[LoraGroup],
    ) -> Result<Vec<Tensor>> {
        let (tokens, in_features) = input.x.dims2()?;
        let biases = linears
            .iter()
            .map(|l| l.bias.as_ref().map(|b| b.flatten_all()?.to_vec1::<f32>()).transpose())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let slots: Vec<Option<Slot>> = linears.iter().map(|l| l.slot.filter(|_| !adapters.is_empty())).collect();
        let activations = input.activations(matrices)?;
        let outputs = super::ops::with_f32(&input.x, |x| {
            let deltas = lora::Deltas::compute(x, in_features, adapters, &slots);
            let finish = |m: usize, t: usize, first: usize, cols: &mut [f32]| match &deltas[m] {
                Some(deltas) => deltas.add(t, first, cols, biases[m].as_deref()),
                None => lora::add_bias(cols, biases[m].as_deref(), first),
            };
            kernels::matmul_many_then(matrices, &activations, kernels::isa(), &finish)
        })?;
        linears
            .iter()
            .zip(outputs)
            .map(|(l, y)| Ok(Tensor::from_vec(y, (tokens, l.out_features), &Device::Cpu)?))
            .collect()
    }

    /// The base output `y` (`[tokens, out_features]`, row-major) finished in
    /// place: the bias and each adapter group's delta on its rows.
    fn finish(&self, mut y: Vec<f32>, input: &Input, adapters: &[LoraGroup]) -> Result<Tensor> {
        let tokens = input.x.dim(0)?;
        let bias = self
            .bias
            .as_ref()
            .map(|b| b.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>())
            .transpose()?;
        match self.slot.filter(|_| !adapters.is_empty()) {
            Some(slot) => lora::apply(&input.x, &mut y, adapters, slot, bias.as_deref())?,
            None => y.chunks_exact_mut(self.out_features).for_each(|row| lora::add_bias(row, bias.as_deref(), 0)),
        }
        Ok(Tensor::from_vec(y, (tokens, self.out_features), &Device::Cpu)?)
    }
}

/// The base's projections that adapters can target, `[layer][module]`
/// (cheap clones: the weights are shared): what DoRA reads at adapter load.
#[derive(Clone)]
pub struct Projections(std::sync::Arc<Vec<[Linear; 7]>>);

impl Projections {
    pub fn new(layers: Vec<[Linear; 7]>) -> Self {
        Self(std::sync::Arc::new(layers))
    }

    /// The weight of `slot` as dense float32, `[out, in]` row-major.
    pub fn dense(&self, slot: Slot) -> Result<Vec<f32>> {
        let linear = self
            .0
            .get(slot.layer)
            .and_then(|l| l.get(slot.module))
            .ok_or_else(|| super::ModelError::Invalid(format!("no projection at {slot:?}")))?;
        Ok(linear.dense_weight()?.0.flatten_all()?.to_vec1::<f32>()?)
    }
}

impl std::fmt::Debug for Projections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Projections({} layers)", self.0.len())
    }
}

/// The same loaded projections (one model's).
impl PartialEq for Projections {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Projections {}

/// A projection's input, `[tokens, in_features]`: projections that read the
/// same activations (q/k/v, gate/up) share one 8-bit quantization of them
/// per activation format.
pub struct Input {
    x: Tensor,
    q8: OnceLock<Vec<Q8Row>>,
    q8k: OnceLock<Vec<Q8KRow>>,
}

impl Input {
    pub fn new(x: Tensor) -> Self {
        Self { x, q8: OnceLock::new(), q8k: OnceLock::new() }
    }

    /// The rows in every format `matrices` read (each made once).
    fn activations(&self, matrices: &[&dyn QuantMatrix]) -> Result<Activations<'_>> {
        let needs = |format| matrices.iter().any(|m| m.format() == format);
        let mut acts = Activations::default();
        if needs(Format::Q8) {
            acts.q8 = quantized(&self.q8, &self.x, Q8Row::quantize_rows)?;
        }
        if needs(Format::Q8K) {
            acts.q8k = quantized(&self.q8k, &self.x, Q8KRow::quantize_rows)?;
        }
        Ok(acts)
    }
}

/// `x` quantized by `quantize` (rows, cols), kept in `cell` after the first call.
fn quantized<'a, T>(cell: &'a OnceLock<Vec<T>>, x: &Tensor, quantize: fn(&[f32], usize) -> Vec<T>) -> Result<&'a [T]> {
    if let Some(rows) = cell.get() {
        return Ok(rows);
    }
    let cols = x.dim(1)?;
    let rows = super::ops::with_f32(x, |x| quantize(x, cols))?;
    Ok(cell.get_or_init(|| rows))
}
