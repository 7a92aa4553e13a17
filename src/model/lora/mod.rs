//! Un-merged LoRA deltas, applied per row so that one forward can mix rows
//! without an adapter and rows of different adapters:
//! `y[r] += scale · (x[r]·Aᵀ)·Bᵀ` for the rows `r` of each adapter.
//!
//! The kernel is written for batch invariance: each row's result is computed
//! in the same order whatever else is in the batch, so batched generation
//! equals one-at-a-time generation bit for bit.

use std::ops::Range;
use std::sync::Arc;

use candle_core::Tensor;
use rayon::prelude::*;

use super::kernels::{self as quant, Isa};
use super::Result;

mod kernels;
pub mod saved;
use kernels::{down, up, DOWN_BLOCK};
pub use saved::SavedModules;

/// How adapter weights are kept in memory: float32, or float16 — half the
/// bytes to hold and to stream each step, for a base that is itself
/// quantized or 16-bit (its own rounding is far coarser).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    #[default]
    F32,
    F16,
}

/// Adapter weight values in their `Precision`.
#[derive(Debug, Clone)]
pub enum Values {
    F32(Vec<f32>),
    F16(Vec<half::f16>),
}

impl Values {
    pub fn new(values: Vec<f32>, precision: Precision) -> Self {
        match precision {
            Precision::F32 => Values::F32(values),
            Precision::F16 => {
                use half::slice::HalfFloatSliceExt;
                let mut halves = vec![half::f16::ZERO; values.len()];
                halves.convert_from_f32_slice(&values);
                Values::F16(halves)
            }
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Values::F32(v) => v.len(),
            Values::F16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn bytes(&self) -> usize {
        match self {
            Values::F32(v) => std::mem::size_of_val(v.as_slice()),
            Values::F16(v) => std::mem::size_of_val(v.as_slice()),
        }
    }

    /// The values widened to float32.
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            Values::F32(v) => v.clone(),
            Values::F16(v) => v.iter().map(|h| h.to_f32()).collect(),
        }
    }
}

/// One module's adapter weights, row-major.
#[derive(Debug, Clone)]
pub struct LoraWeights {
    /// `[rank, in_features]` (PEFT's `lora_A`).
    pub a: Values,
    /// `[rank, out_features]`: PEFT's `lora_B` transposed, so the second
    /// product runs along contiguous memory.
    pub b_t: Values,
    pub rank: usize,
    pub in_features: usize,
    pub out_features: usize,
    pub scale: f32,
    /// PEFT's `lora_B.bias` (`lora_bias`), `[out_features]`: part of the
    /// up product, so the delta is `scale · (B·A·x + b)`.
    pub bias: Option<Vec<f32>>,
    /// DoRA's `m / ‖W + scale·B·A‖` per output feature (the norm of each
    /// row of the adapted weight, the base as tailor holds it): the output
    /// becomes `g ⊙ (W·x + scale·B·A·x)`, then the base's bias.
    pub dora: Option<Vec<f32>>,
}

impl LoraWeights {
    /// Bytes held in memory.
    pub fn bytes(&self) -> usize {
        let extra = |v: &Option<Vec<f32>>| v.as_ref().map_or(0, |v| std::mem::size_of_val(v.as_slice()));
        self.a.bytes() + self.b_t.bytes() + extra(&self.bias) + extra(&self.dora)
    }
}

/// Which projection of a decoder layer a `Linear` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub layer: usize,
    /// Index into `Module::ALL` order: q, k, v, o, gate, up, down.
    pub module: usize,
}

/// An adapter's weights for every layer and module it targets, or a
/// weighted composition of adapters (`parts`, applied un-merged).
#[derive(Debug, Default)]
pub struct AdapterWeights {
    /// `layers[layer][module]` (empty for a composition).
    pub layers: Vec<[Option<LoraWeights>; 7]>,
    /// A composition's adapters, each with the factor on its own scale
    /// (PEFT's `cat`: the delta is `Σ factorᵢ · scaleᵢ · BᵢAᵢ`).
    pub parts: Vec<Part>,
    /// The adapter's config, which a merge with others starts from (None
    /// for a composition).
    pub config: Option<Arc<crate::lora::AdapterConfig>>,
    /// The adapters a merge was computed from, held while it lives: the
    /// registry keeps them (they are in use), and their addresses, which
    /// key the merge, stay theirs.
    pub merged_from: Vec<Arc<AdapterWeights>>,
    /// Whole modules it replaces (PEFT's `modules_to_save`); a composition's
    /// or a merge's are its parts', shared.
    pub saved: SavedModules,
}

/// One adapter of a composition and its weight.
#[derive(Debug, Clone)]
pub struct Part {
    pub adapter: Arc<AdapterWeights>,
    pub factor: f32,
}

impl AdapterWeights {
    /// A weighted composition of (single) adapters. Err names a module two
    /// of them replace (`modules_to_save`).
    pub fn composed(parts: Vec<Part>) -> std::result::Result<Self, String> {
        debug_assert!(parts.iter().all(|p| p.adapter.parts.is_empty()), "parts are single adapters");
        let saved = saved_of(&parts)?;
        Ok(Self { layers: Vec::new(), parts, config: None, merged_from: Vec::new(), saved })
    }

    pub fn get(&self, slot: Slot) -> Option<&LoraWeights> {
        self.layers.get(slot.layer)?.get(slot.module)?.as_ref()
    }

    /// Bytes of the weights in memory (a composition holds none of its own,
    /// a merge only its deltas: the modules it replaces are its parts').
    pub fn bytes(&self) -> u64 {
        let own = if self.parts.is_empty() && self.merged_from.is_empty() { self.saved.bytes() } else { 0 };
        own + self.layers.iter().flatten().flatten().map(|w| w.bytes() as u64).sum::<u64>()
    }

    /// Whether any module is DoRA (its delta rescales the base output by
    /// norms of its own delta, so it is served alone, at any weight).
    pub fn is_dora(&self) -> bool {
        self.layers.iter().flatten().flatten().any(|w| w.dora.is_some())
    }
}

/// The modules a composition of `parts` replaces: each from the one part
/// (of weight other than 0) that replaces it. Err names a module two parts
/// replace.
pub fn saved_of(parts: &[Part]) -> std::result::Result<SavedModules, String> {
    SavedModules::union(parts.iter().filter(|p| p.factor != 0.0).map(|p| &p.adapter.saved))
}

/// The single adapters a row of `adapter` applies, in order, each with the
/// factor on its scale: the adapter itself at 1, or a composition's parts.
pub fn terms(adapter: &Arc<AdapterWeights>) -> Vec<(&Arc<AdapterWeights>, f32)> {
    if adapter.parts.is_empty() {
        vec![(adapter, 1.0)]
    } else {
        adapter.parts.iter().map(|p| (&p.adapter, p.factor)).collect()
    }
}

/// The rows of one step that apply one adapter with one factor as the
/// `term`-th delta of their composition (0 for a single adapter).
pub struct LoraGroup {
    pub adapter: Arc<AdapterWeights>,
    pub factor: f32,
    pub term: usize,
    /// Token rows (indices into the step's `[tokens, hidden]` activations).
    pub rows: Vec<usize>,
}

impl LoraGroup {
    /// Rows that apply `adapter` alone, at full strength.
    pub fn single(adapter: Arc<AdapterWeights>, rows: Vec<usize>) -> Self {
        Self { adapter, factor: 1.0, term: 0, rows }
    }
}

/// The token rows of a step grouped by what they apply: for each span of
/// rows with an adapter, one group per term of its composition (rows
/// without one are left out).
pub fn groups<'a>(spans: impl IntoIterator<Item = (Option<&'a Arc<AdapterWeights>>, Range<usize>)>) -> Vec<LoraGroup> {
    let mut groups: Vec<LoraGroup> = Vec::new();
    for (adapter, tokens) in spans {
        let Some(adapter) = adapter else { continue };
        for (term, (single, factor)) in terms(adapter).into_iter().enumerate() {
            if factor == 0.0 {
                continue; // weight 0 leaves the adapter out
            }
            let same = |g: &&mut LoraGroup| {
                Arc::ptr_eq(&g.adapter, single) && g.factor.to_bits() == factor.to_bits() && g.term == term
            };
            match groups.iter_mut().find(same) {
                Some(group) => group.rows.extend(tokens.clone()),
                None => {
                    groups.push(LoraGroup { adapter: single.clone(), factor, term, rows: tokens.clone().collect() })
                }
            }
        }
    }
    groups
}

/// Rows per step above which the deltas are split over the rayon pool.
const PARALLEL_ROWS: usize = 4;

/// Multiply-adds of down products below which they run on the calling
/// thread (one small adapter's rows cost less than waking the pool), and
/// the size the work is cut into otherwise.
const PARALLEL_DOWN_WORK: usize = 1 << 18;

/// Where one row's down product lives in `Deltas::xa`: its block's rank-major
/// part (`xa[start + j·count + index]` for rank entry `j`).
#[derive(Clone, Copy)]
struct RowDelta<'a> {
    weights: &'a LoraWeights,
    /// The effective scale (the adapter's times its factor), for the bias.
    scale: f32,
    start: usize,
    count: usize,
    index: usize,
}

/// One projection's LoRA work in a step: each row's deltas (one per term of
/// its composition that targets the projection) and their down products
/// `scale · x·Aᵀ`, from which any output columns' delta is added (`add`) —
/// by the base kernel's own pieces, or by `apply`.
pub struct Deltas<'a> {
    /// Token row `t`'s deltas are `deltas[offsets[t]..offsets[t + 1]]`, in
    /// the order of its composition's terms, so a row's sum is the same
    /// whatever else is in the batch.
    offsets: Vec<usize>,
    deltas: Vec<RowDelta<'a>>,
    /// The down products of blocks of up to `DOWN_BLOCK` rows of one
    /// group, each block rank-major so that it splits by rank entries.
    xa: Vec<f32>,
    isa: Isa,
}

/// A piece of down-product work: rank entries `js` of a block of rows.
struct DownTask<'a, 'b> {
    weights: &'a LoraWeights,
    scale: f32,
    rows: &'a [usize],
    js: std::ops::Range<usize>,
    out: &'b mut [f32],
}

impl<'a> Deltas<'a> {
    /// The down products of every slot in `slots` over the same input `x`
    /// (`[tokens, in_features]`), in one parallel region when there is
    /// enough work; `None` where no row's adapter targets the slot.
    pub fn compute(
        x: &[f32],
        in_features: usize,
        groups: &'a [LoraGroup],
        slots: &[Option<Slot>],
    ) -> Vec<Option<Deltas<'a>>> {
        let tokens = x.len() / in_features.max(1);
        let isa = quant::isa();
        let blocks = |slot: Slot| {
            groups.iter().filter_map(move |g| Some((g.adapter.get(slot)?, g))).flat_map(|(w, g)| {
                debug_assert_eq!(w.in_features, in_features);
                g.rows.chunks(DOWN_BLOCK).map(move |block| (w, g, block))
            })
        };
        let mut all: Vec<Option<Deltas<'a>>> = slots
            .iter()
            .map(|slot| {
                let slot = (*slot)?;
                let mut placed: Vec<(usize, usize, RowDelta<'a>)> = Vec::new();
                let mut len = 0;
                for (weights, group, block) in blocks(slot) {
                    for (index, &row) in block.iter().enumerate() {
                        let scale = weights.scale * group.factor;
                        let delta = RowDelta { weights, scale, start: len, count: block.len(), index };
                        placed.push((row, group.term, delta));
                    }
                    len += block.len() * weights.rank;
                }
                if len == 0 {
                    return None;
                }
                placed.sort_unstable_by_key(|&(row, term, _)| (row, term));
                let mut offsets = vec![0; tokens + 1];
                for &(row, _, _) in &placed {
                    offsets[row + 1] += 1;
                }
                for t in 0..tokens {
                    offsets[t + 1] += offsets[t];
                }
                let deltas = placed.into_iter().map(|(_, _, delta)| delta).collect();
                Some(Deltas { offsets, deltas, xa: vec![0f32; len], isa })
            })
            .collect();
        // Each block cut by rank entries into tasks of about
        // PARALLEL_DOWN_WORK multiply-adds, each owning its part of `xa`.
        let mut tasks: Vec<DownTask<'a, '_>> = Vec::new();
        let mut work = 0;
        for (deltas, slot) in all.iter_mut().zip(slots) {
            let (Some(deltas), Some(slot)) = (deltas, slot) else { continue };
            let mut rest: &mut [f32] = &mut deltas.xa;
            for (weights, group, rows) in blocks(*slot) {
                let per_entry = rows.len() * in_features;
                let step = PARALLEL_DOWN_WORK.div_ceil(per_entry).clamp(1, weights.rank);
                let scale = weights.scale * group.factor;
                for first in (0..weights.rank).step_by(step) {
                    let js = first..(first + step).min(weights.rank);
                    let (out, tail) = std::mem::take(&mut rest).split_at_mut(js.len() * rows.len());
                    rest = tail;
                    tasks.push(DownTask { weights, scale, rows, js, out });
                }
                work += per_entry * weights.rank;
            }
        }
        let run = |t: DownTask| down(isa, t.weights, t.scale, x, t.rows, t.js, t.out);
        if work >= PARALLEL_DOWN_WORK && tasks.len() > 1 {
            tasks.into_par_iter().for_each(run);
        } else {
            tasks.into_iter().for_each(run);
        }
        all
    }

    fn row(&self, t: usize) -> &[RowDelta<'a>] {
        &self.deltas[self.offsets[t]..self.offsets[t + 1]]
    }

    /// Finishes token row `t`'s base output on columns `first..first +
    /// cols.len()`: the projection's `bias` (all its columns) and the row's
    /// delta, its terms in order, each column summed over the rank in order,
    /// so the bits do not depend on how the columns are split nor on the
    /// other rows. A DoRA term rescales what is there before the bias.
    pub fn add(&self, t: usize, first: usize, cols: &mut [f32], bias: Option<&[f32]>) {
        let terms = self.row(t);
        let dora = terms.iter().any(|r| r.weights.dora.is_some());
        if !dora {
            add_bias(cols, bias, first);
        }
        for row in terms {
            let xa = &self.xa[row.start + row.index..row.start + row.count * row.weights.rank];
            up(self.isa, row.weights, xa, row.count, first, cols);
            if let Some(b) = &row.weights.bias {
                for (y, b) in cols.iter_mut().zip(&b[first..]) {
                    *y += row.scale * b;
                }
            }
            if let Some(g) = &row.weights.dora {
                for (y, g) in cols.iter_mut().zip(&g[first..]) {
                    *y *= g;
                }
            }
        }
        if dora {
            add_bias(cols, bias, first);
        }
    }

    /// The up-product work of row `t` per output column (its ranks' sum).
    fn rank(&self, t: usize) -> usize {
        self.row(t).iter().map(|r| r.weights.rank).sum()
    }
}

/// Adds `bias` (a projection's, all its columns), from column `first` on,
/// to `cols`.
pub fn add_bias(cols: &mut [f32], bias: Option<&[f32]>, first: usize) {
    if let Some(bias) = bias {
        for (v, b) in cols.iter_mut().zip(&bias[first..]) {
            *v += b;
        }
    }
}

/// Finishes the base output `y` (`[tokens, out]`, row-major, in place) of
/// the input `x` (`[tokens, in]`): the projection's `bias` and every
/// group's delta on its rows, for projections whose base kernel does not
/// add them itself.
pub fn apply(x: &Tensor, y: &mut [f32], groups: &[LoraGroup], slot: Slot, bias: Option<&[f32]>) -> Result<()> {
    let (tokens, in_features) = x.dims2()?;
    let out_features = y.len() / tokens.max(1);
    super::ops::with_f32(x, |x| {
        let Some(Some(deltas)) = Deltas::compute(x, in_features, groups, &[Some(slot)]).pop() else {
            y.chunks_mut(out_features.max(1)).for_each(|row| add_bias(row, bias, 0));
            return;
        };
        let row_delta = |(row, y_row): (usize, &mut [f32])| match deltas.rank(row) {
            0 => add_bias(y_row, bias, 0),
            rank if tokens < PARALLEL_ROWS && rank * out_features >= PARALLEL_COLUMN_WORK => {
                // A lone row (a single stream): its output columns are split
                // over the pool instead, so the second core is not idle.
                y_row
                    .par_chunks_mut(COLUMN_CHUNK)
                    .enumerate()
                    .for_each(|(c, cols)| deltas.add(row, c * COLUMN_CHUNK, cols, bias));
            }
            _ => deltas.add(row, 0, y_row, bias),
        };
        if tokens >= PARALLEL_ROWS {
            y.par_chunks_mut(out_features).enumerate().for_each(row_delta);
        } else {
            y.chunks_mut(out_features).enumerate().for_each(row_delta);
        }
    })
}

/// Work (rank × output columns) above which a lone row's columns are split.
const PARALLEL_COLUMN_WORK: usize = 4096;
const COLUMN_CHUNK: usize = 256;

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn weights(rank: usize, inf: usize, outf: usize, scale: f32, seed: f32) -> LoraWeights {
        LoraWeights {
            a: Values::F32((0..rank * inf).map(|i| ((i as f32 + seed) * 0.37).sin()).collect()),
            b_t: Values::F32((0..rank * outf).map(|i| ((i as f32 + seed) * 0.11).cos()).collect()),
            rank,
            in_features: inf,
            out_features: outf,
            scale,
            bias: None,
            dora: None,
        }
    }

    /// An adapter of layer 0 with weights `w` on `module` only.
    fn on_module(module: usize, w: LoraWeights) -> Arc<AdapterWeights> {
        let mut layer: [Option<LoraWeights>; 7] = Default::default();
        layer[module] = Some(w);
        Arc::new(AdapterWeights { layers: vec![layer], ..Default::default() })
    }

    /// The plain reference: scale · (x·Aᵀ)·Bᵀ with candle matmuls.
    fn reference(x: &Tensor, w: &LoraWeights) -> Result<Tensor> {
        let a = Tensor::from_vec(w.a.to_f32(), (w.rank, w.in_features), &Device::Cpu)?;
        let b_t = Tensor::from_vec(w.b_t.to_f32(), (w.rank, w.out_features), &Device::Cpu)?;
        Ok((x.matmul(&a.t()?)?.matmul(&b_t)? * w.scale as f64)?)
    }

    #[test]
    fn mixed_rows_match_reference_math() -> Result<()> {
        let (inf, outf) = (19, 13);
        let x = Tensor::from_vec((0..4 * inf).map(|i| (i as f32 * 0.05).cos()).collect(), (4, inf), &Device::Cpu)?;
        let base = Tensor::from_vec((0..4 * outf).map(|i| i as f32 * 0.01).collect(), (4, outf), &Device::Cpu)?;
        let slot = Slot { layer: 0, module: 0 };
        let mk = |w: LoraWeights| on_module(0, w);
        let (wa, wb) = (weights(3, inf, outf, 2.0, 1.0), weights(5, inf, outf, 0.5, 7.0));
        // Row 0: no adapter; rows 1, 3: adapter A; row 2: adapter B.
        let groups = vec![LoraGroup::single(mk(wa.clone()), vec![1, 3]), LoraGroup::single(mk(wb.clone()), vec![2])];
        let base_rows = base.to_vec2::<f32>()?;
        let mut flat = base_rows.concat();
        apply(&x, &mut flat, &groups, slot, None)?;
        let got: Vec<Vec<f32>> = flat.chunks(outf).map(|r| r.to_vec()).collect();
        let ra = reference(&x, &wa)?.to_vec2::<f32>()?;
        let rb = reference(&x, &wb)?.to_vec2::<f32>()?;
        for o in 0..outf {
            assert_eq!(got[0][o], base_rows[0][o]);
            for (row, delta) in [(1, &ra), (3, &ra), (2, &rb)] {
                let want = base_rows[row][o] + delta[row][o];
                assert!((got[row][o] - want).abs() < 1e-5, "row {row} col {o}: {} vs {want}", got[row][o]);
            }
        }
        // Batch invariance: a row alone gives the same bits as in the batch.
        let mut alone = base_rows[2].clone();
        apply(&x.narrow(0, 2, 1)?, &mut alone, &[LoraGroup::single(mk(wb), vec![0])], slot, None)?;
        assert_eq!(alone, got[2]);
        Ok(())
    }

    #[test]
    fn a_lone_row_split_by_columns_equals_the_row_in_a_batch() -> Result<()> {
        // rank 8 × 1024 outputs: one row takes the column-split path, five rows the row path.
        let (inf, outf) = (64, 1024);
        let adapter = on_module(2, weights(8, inf, outf, 1.5, 3.0));
        let slot = Slot { layer: 0, module: 2 };
        let x = Tensor::from_vec((0..5 * inf).map(|i| (i as f32 * 0.03).sin()).collect(), (5, inf), &Device::Cpu)?;
        let mut batch: Vec<f32> = (0..5 * outf).map(|i| i as f32 * 1e-3).collect();
        apply(&x, &mut batch, &[LoraGroup::single(adapter.clone(), (0..5).collect())], slot, None)?;
        let mut alone: Vec<f32> = (3 * outf..4 * outf).map(|i| i as f32 * 1e-3).collect();
        apply(&x.narrow(0, 3, 1)?, &mut alone, &[LoraGroup::single(adapter, vec![0])], slot, None)?;
        assert_eq!(alone.as_slice(), &batch[3 * outf..4 * outf]);
        Ok(())
    }

    #[test]
    fn many_rows_of_several_adapters_equal_each_row_alone_bit_for_bit() -> Result<()> {
        // Enough work for the parallel path, groups beyond one block of rows,
        // an output width that is not a multiple of the column chunk.
        let (inf, outf, tokens) = (300, 700, 23);
        let mk = |w: LoraWeights| on_module(4, w);
        let adapters = [
            mk(weights(5, inf, outf, 2.0, 1.0)),
            mk(weights(12, inf, outf, 0.5, 2.0)),
            mk(weights(3, inf, outf, 1.0, 3.0)),
        ];
        let slot = Slot { layer: 0, module: 4 };
        // Rows 0 and 11 have no adapter; the rest cycle over the three.
        let owner = |row: usize| (!row.is_multiple_of(11)).then_some(row % 3);
        let groups: Vec<LoraGroup> = (0..3)
            .map(|a| LoraGroup::single(adapters[a].clone(), (0..tokens).filter(|&r| owner(r) == Some(a)).collect()))
            .collect();
        let x = Tensor::from_vec(
            (0..tokens * inf).map(|i| (i as f32 * 0.013).sin()).collect(),
            (tokens, inf),
            &Device::Cpu,
        )?;
        let base: Vec<f32> = (0..tokens * outf).map(|i| (i as f32 * 0.007).cos()).collect();
        let mut batch = base.clone();
        apply(&x, &mut batch, &groups, slot, None)?;
        for row in 0..tokens {
            let mut alone = base[row * outf..(row + 1) * outf].to_vec();
            if let Some(a) = owner(row) {
                let group = [LoraGroup::single(adapters[a].clone(), vec![0])];
                apply(&x.narrow(0, row, 1)?, &mut alone, &group, slot, None)?;
                let w = adapters[a].get(slot).expect("targeted");
                let want = reference(&x.narrow(0, row, 1)?, w)?.to_vec2::<f32>()?;
                for o in 0..outf {
                    assert!((alone[o] - base[row * outf + o] - want[0][o]).abs() < 1e-4, "row {row} col {o}");
                }
            }
            assert_eq!(alone.as_slice(), &batch[row * outf..(row + 1) * outf], "row {row}");
        }
        Ok(())
    }

    #[test]
    fn composed_rows_add_each_weighted_delta_in_order_whatever_the_batch() -> Result<()> {
        let (inf, outf, tokens) = (40, 300, 8);
        let mk = |w: LoraWeights| on_module(1, w);
        let (a, b) = (mk(weights(4, inf, outf, 2.0, 1.0)), mk(weights(9, inf, outf, 0.5, 5.0)));
        let part = |w: &Arc<AdapterWeights>, factor| Part { adapter: w.clone(), factor };
        let ab = Arc::new(AdapterWeights::composed(vec![part(&a, 0.7), part(&b, -0.5)]).expect("no saved modules"));
        let ba = Arc::new(AdapterWeights::composed(vec![part(&b, -0.5), part(&a, 0.7)]).expect("no saved modules"));
        let at_one = Arc::new(AdapterWeights::composed(vec![part(&a, 1.0)]).expect("no saved modules"));
        let at_zero = Arc::new(AdapterWeights::composed(vec![part(&a, 0.0)]).expect("no saved modules"));
        // c then a: its second term's group (a at 0.7, term 1) is made, by
        // `ba`, before its first term's, so only the term order puts c first.
        let c = on_module(1, weights(3, inf, outf, 1.5, 9.0));
        let ca = Arc::new(AdapterWeights::composed(vec![part(&c, 0.3), part(&a, 0.7)]).expect("no saved modules"));
        // One row each: a composition, the base, b alone (term 0 where the
        // composition has it as term 1), the reverse composition, a at
        // weight 1 and 0, a alone, and c with a.
        let owners = [Some(&ab), None, Some(&b), Some(&ba), Some(&at_one), Some(&at_zero), Some(&a), Some(&ca)];
        let slot = Slot { layer: 0, module: 1 };
        let x = Tensor::from_vec(
            (0..tokens * inf).map(|i| (i as f32 * 0.021).sin()).collect(),
            (tokens, inf),
            &Device::Cpu,
        )?;
        let base: Vec<f32> = (0..tokens * outf).map(|i| (i as f32 * 0.003).cos()).collect();
        let mut batch = base.clone();
        apply(&x, &mut batch, &groups(owners.iter().enumerate().map(|(t, o)| (*o, t..t + 1))), slot, None)?;
        let delta = |w: &Arc<AdapterWeights>, row: usize| -> Result<Vec<f32>> {
            Ok(reference(&x.narrow(0, row, 1)?, w.get(slot).expect("targeted"))?.flatten_all()?.to_vec1()?)
        };
        let row = |t: usize| &batch[t * outf..(t + 1) * outf];
        let base_row = |t: usize| &base[t * outf..(t + 1) * outf];
        for t in [0, 3] {
            let (da, db) = (delta(&a, t)?, delta(&b, t)?);
            for o in 0..outf {
                let want = base_row(t)[o] + 0.7 * da[o] - 0.5 * db[o];
                assert!((row(t)[o] - want).abs() < 1e-4, "row {t} col {o}: {} vs {want}", row(t)[o]);
            }
        }
        assert_eq!(row(1), base_row(1));
        assert_eq!(row(5), base_row(5), "weight 0 adds nothing");
        let mut single = base_row(4).to_vec();
        apply(&x.narrow(0, 4, 1)?, &mut single, &[LoraGroup::single(a.clone(), vec![0])], slot, None)?;
        assert_eq!(row(4), single.as_slice(), "weight 1 is the adapter itself");
        for (t, owner) in owners.iter().enumerate() {
            let mut alone = base_row(t).to_vec();
            apply(&x.narrow(0, t, 1)?, &mut alone, &groups([(*owner, 0..1)]), slot, None)?;
            assert_eq!(alone.as_slice(), row(t), "row {t} alone");
        }
        Ok(())
    }

    #[test]
    fn dora_rescales_and_lora_bias_adds_per_row_whatever_the_batch() -> Result<()> {
        let (inf, outf, tokens) = (24, 90, 5);
        let slot = Slot { layer: 0, module: 3 };
        let mut with_bias = weights(3, inf, outf, 1.5, 2.0);
        with_bias.bias = Some((0..outf).map(|i| (i as f32 * 0.3).sin()).collect());
        let mut dora = weights(4, inf, outf, 0.5, 4.0);
        dora.dora = Some((0..outf).map(|i| 0.8 + (i as f32 * 0.05).cos() * 0.3).collect());
        let (biased, dora_w) = (on_module(3, with_bias.clone()), on_module(3, dora.clone()));
        let half = Arc::new(
            AdapterWeights::composed(vec![Part { adapter: biased.clone(), factor: 0.5 }]).expect("no saved modules"),
        );
        // Rows: DoRA, the bias adapter, it at weight 0.5, the base, DoRA.
        let owners = [Some(&dora_w), Some(&biased), Some(&half), None, Some(&dora_w)];
        let x = Tensor::from_vec(
            (0..tokens * inf).map(|i| (i as f32 * 0.017).cos()).collect(),
            (tokens, inf),
            &Device::Cpu,
        )?;
        let projection_bias: Vec<f32> = (0..outf).map(|i| i as f32 * 0.02 - 0.5).collect();
        let base: Vec<f32> = (0..tokens * outf).map(|i| (i as f32 * 0.005).sin()).collect();
        let mut batch = base.clone();
        let spans = owners.iter().enumerate().map(|(t, o)| (*o, t..t + 1));
        apply(&x, &mut batch, &groups(spans), slot, Some(&projection_bias))?;
        for (t, owner) in owners.iter().enumerate() {
            let row = &batch[t * outf..(t + 1) * outf];
            let base_row = &base[t * outf..(t + 1) * outf];
            let delta = |w: &LoraWeights| -> Result<Vec<f32>> {
                Ok(reference(&x.narrow(0, t, 1)?, w)?.flatten_all()?.to_vec1()?)
            };
            let want: Vec<f32> = match t {
                0 | 4 => {
                    let (d, g) = (delta(&dora)?, dora.dora.as_ref().expect("dora"));
                    (0..outf).map(|o| g[o] * (base_row[o] + d[o]) + projection_bias[o]).collect()
                }
                1 | 2 => {
                    let factor = if t == 1 { 1.0 } else { 0.5 };
                    let (d, b) = (delta(&with_bias)?, with_bias.bias.as_ref().expect("bias"));
                    (0..outf)
                        .map(|o| base_row[o] + projection_bias[o] + factor * (d[o] + with_bias.scale * b[o]))
                        .collect()
                }
                _ => (0..outf).map(|o| base_row[o] + projection_bias[o]).collect(),
            };
            for o in 0..outf {
                assert!((row[o] - want[o]).abs() < 1e-4, "row {t} col {o}: {} vs {}", row[o], want[o]);
            }
            let mut alone = base_row.to_vec();
            apply(&x.narrow(0, t, 1)?, &mut alone, &groups([(*owner, 0..1)]), slot, Some(&projection_bias))?;
            assert_eq!(alone.as_slice(), row, "row {t} alone");
        }
        Ok(())
    }
}
