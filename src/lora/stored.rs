//! One 2-D (or 1-D) float tensor of an adapter's safetensors file, read in place from
//! the file's bytes and converted once into the layout and precision the
//! kernels read (no intermediate tensors: a cold load is on a request's path).

use std::borrow::Cow;

use half::slice::HalfBitsSliceExt;
use safetensors::tensor::TensorView;
use safetensors::Dtype;

use super::LoraError;
use crate::model::lora::{Precision, Values};

/// A row-major `[rows, cols]` float tensor, its little-endian bytes as stored.
#[derive(Clone, Copy)]
pub(crate) struct Stored<'a> {
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    dtype: Dtype,
    bytes: &'a [u8],
}

impl<'a> Stored<'a> {
    /// The tensor `name`, if it is 2-D and of a float type.
    pub(crate) fn of(name: &str, view: &TensorView<'a>) -> Result<Self, LoraError> {
        let &[rows, cols] = view.shape() else {
            return Err(LoraError::Weights(format!("`{name}` is not a 2-D tensor (shape {:?})", view.shape())));
        };
        match view.dtype() {
            Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64 => {}
            other => return Err(LoraError::Weights(format!("`{name}` is {other}, not a float tensor"))),
        }
        Ok(Self { rows, cols, dtype: view.dtype(), bytes: view.data() })
    }

    /// The 1-D tensor `name` (a bias or a magnitude), as `[len, 1]`.
    pub(crate) fn vector(name: &str, view: &TensorView<'a>) -> Result<Self, LoraError> {
        let &[len] = view.shape() else {
            return Err(LoraError::Weights(format!("`{name}` is not a 1-D tensor (shape {:?})", view.shape())));
        };
        let bytes = view.data();
        let column = TensorView::new(view.dtype(), vec![len, 1], bytes)
            .map_err(|e| LoraError::Weights(format!("`{name}`: {e}")))?;
        Self::of(name, &column)
    }

    /// Elements `first..first + count` (row-major) as float32, owned.
    pub(crate) fn part(&self, first: usize, count: usize) -> Vec<f32> {
        self.f32s(first, count).into_owned()
    }

    /// The values in place, when they are float16 aligned for it.
    fn as_f16(&self) -> Option<&'a [half::f16]> {
        let ordered = cfg!(target_endian = "little") && self.dtype == Dtype::F16;
        ordered
            .then(|| bytemuck::try_cast_slice::<u8, u16>(self.bytes).ok().map(|bits| bits.reinterpret_cast()))
            .flatten()
    }

    /// Elements `first..first + out.len()` (row-major) as float32.
    fn decode(&self, first: usize, out: &mut [f32]) {
        let size = self.dtype.bitsize() / 8;
        let bytes = &self.bytes[first * size..(first + out.len()) * size];
        let pairs = out.iter_mut().zip(bytes.chunks_exact(size));
        match self.dtype {
            Dtype::F32 => pairs.for_each(|(o, b)| *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            Dtype::F16 => pairs.for_each(|(o, b)| *o = half::f16::from_le_bytes([b[0], b[1]]).to_f32()),
            Dtype::BF16 => pairs.for_each(|(o, b)| *o = half::bf16::from_le_bytes([b[0], b[1]]).to_f32()),
            // `of` admits only the four float types.
            _ => pairs
                .for_each(|(o, b)| *o = f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32),
        }
    }

    /// Elements `first..first + count` (row-major) as float32: in place when
    /// they are float32 aligned for it (as safetensors' writers align them),
    /// decoded otherwise.
    fn f32s(&self, first: usize, count: usize) -> Cow<'a, [f32]> {
        let ordered = cfg!(target_endian = "little") && self.dtype == Dtype::F32;
        if let Some(all) = ordered.then(|| bytemuck::try_cast_slice::<u8, f32>(self.bytes).ok()).flatten() {
            return Cow::Borrowed(&all[first..first + count]);
        }
        let mut out = vec![0f32; count];
        self.decode(first, &mut out);
        Cow::Owned(out)
    }

    /// The whole tensor, as stored (row-major), in `precision`.
    pub(crate) fn values(&self, precision: Precision) -> Values {
        match (precision, self.as_f16()) {
            (Precision::F16, Some(halves)) => Values::F16(halves.to_vec()),
            _ => Values::new(self.f32s(0, self.rows * self.cols).into_owned(), precision),
        }
    }

    /// Rows `first..first + count` transposed (`[cols, count]`, row-major), in
    /// `precision`: a `lora_B` part as the up kernels read it.
    pub(crate) fn transposed(&self, first: usize, count: usize, precision: Precision) -> Values {
        let cols = self.cols;
        let rows = self.f32s(first * cols, count * cols);
        let mut out = vec![0f32; cols * count];
        for (o, row) in rows.chunks_exact(cols.max(1)).enumerate() {
            for (j, value) in row.iter().enumerate() {
                out[j * count + o] = *value;
            }
        }
        Values::new(out, precision)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view<'a>(dtype: Dtype, shape: &[usize], bytes: &'a [u8]) -> TensorView<'a> {
        TensorView::new(dtype, shape.to_vec(), bytes).expect("a consistent view")
    }

    #[test]
    fn every_float_type_reads_the_same_values_and_transposes() {
        let values = [0.5f32, -1.25, 2.0, 3.5, -0.75, 8.0];
        let f32s: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let f16s: Vec<u8> = values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect();
        let bf16s: Vec<u8> = values.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect();
        let f64s: Vec<u8> = values.iter().flat_map(|v| (*v as f64).to_le_bytes()).collect();
        // Each type both aligned for its values (read in place) and one byte
        // off (decoded element by element).
        let shifted = |bytes: &[u8]| [&[0u8][..], bytes].concat();
        let (f32s_off, f16s_off) = (shifted(&f32s), shifted(&f16s));
        for (dtype, bytes) in [
            (Dtype::F32, &f32s[..]),
            (Dtype::F32, &f32s_off[1..]),
            (Dtype::F16, &f16s[..]),
            (Dtype::F16, &f16s_off[1..]),
            (Dtype::BF16, &bf16s[..]),
            (Dtype::F64, &f64s[..]),
        ] {
            let view = view(dtype, &[3, 2], bytes);
            let stored = Stored::of("t", &view).expect("a float tensor");
            let in_place = matches!(stored.f32s(0, 6), Cow::Borrowed(_)) || stored.as_f16().is_some();
            let aligned = bytes.as_ptr().align_offset(dtype.bitsize() / 8) == 0;
            assert_eq!(in_place, matches!(dtype, Dtype::F32 | Dtype::F16) && aligned, "{dtype:?}");
            let Values::F32(all) = stored.values(Precision::F32) else { panic!("float32 asked for") };
            assert_eq!(all, values, "{dtype:?}");
            let Values::F16(halves) = stored.values(Precision::F16) else { panic!("float16 asked for") };
            assert_eq!(halves.iter().map(|h| h.to_f32()).collect::<Vec<_>>(), values, "{dtype:?}");
            // Rows 1..3 of [[0.5, -1.25], [2, 3.5], [-0.75, 8]], transposed.
            let Values::F32(t) = stored.transposed(1, 2, Precision::F32) else { panic!("float32 asked for") };
            assert_eq!(t, [2.0, -0.75, 3.5, 8.0], "{dtype:?}");
            let Values::F16(t) = stored.transposed(1, 2, Precision::F16) else { panic!("float16 asked for") };
            assert_eq!(t.iter().map(|h| h.to_f32()).collect::<Vec<_>>(), [2.0, -0.75, 3.5, 8.0], "{dtype:?}");
        }
    }

    #[test]
    fn float16_conversion_of_a_long_tensor_rounds_each_value() {
        let values: Vec<f32> = (0..2055).map(|i| i as f32 * 0.25).collect();
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let view = view(Dtype::F32, &[values.len(), 1], &bytes);
        let Values::F16(halves) = Stored::of("t", &view).expect("float").values(Precision::F16) else {
            panic!("float16 asked for")
        };
        let expected: Vec<half::f16> = values.iter().map(|v| half::f16::from_f32(*v)).collect();
        assert_eq!(halves, expected);
    }

    #[test]
    fn integer_and_higher_rank_tensors_are_refused() {
        let bytes = [0u8; 8];
        let ints = view(Dtype::I32, &[1, 2], &bytes);
        assert!(Stored::of("t", &ints).is_err_and(|e| e.to_string().contains("not a float tensor")));
        let cube = view(Dtype::F32, &[1, 1, 2], &bytes);
        assert!(Stored::of("t", &cube).is_err_and(|e| e.to_string().contains("not a 2-D tensor")));
    }
}
