//! A sequence's attention keys and values, in blocks of `BLOCK_TOKENS`
//! tokens (every layer's keys and values for those tokens in one buffer).
//! Blocks are shared, not copied: sequences whose prompts start alike, and
//! the prefix cache, hold the same `Arc`s; a sequence writes only into its
//! last block, and copies that one first if someone else holds it too
//! (copy-on-write of at most one block).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Tokens per block. The attention scores this many keys in one vector
/// loop, so a block of keys is always read whole.
pub const BLOCK_TOKENS: usize = 32;
pub(crate) const KEY_BLOCK: usize = BLOCK_TOKENS;

/// Counts the blocks alive among the caches made with one counter (one
/// engine's): what its KV costs in memory, however the blocks are shared.
#[derive(Debug, Clone, Default)]
pub struct BlockCount(Arc<AtomicUsize>);

impl BlockCount {
    pub fn blocks(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

/// Keys and values of `BLOCK_TOKENS` tokens in every layer. Layer `l`
/// takes `2 · layer_width` floats from `l · 2 · layer_width`: first its keys,
/// `[kv_heads, head_dim, BLOCK_TOKENS]` (transposed, so the scores of a
/// block of keys are one vector loop), then its values,
/// `[kv_heads, BLOCK_TOKENS, head_dim]`.
#[derive(Debug)]
pub struct KvBlock {
    data: Vec<f32>,
    count: BlockCount,
}

impl KvBlock {
    fn new(floats: usize, count: &BlockCount) -> Self {
        count.0.fetch_add(1, Ordering::Relaxed);
        Self { data: vec![0f32; floats], count: count.clone() }
    }
}

impl Clone for KvBlock {
    fn clone(&self) -> Self {
        self.count.0.fetch_add(1, Ordering::Relaxed);
        Self { data: self.data.clone(), count: self.count.clone() }
    }
}

impl Drop for KvBlock {
    fn drop(&mut self) {
        self.count.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Keys and values of every layer for one sequence.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    blocks: Vec<Arc<KvBlock>>,
    len: usize,
    layers: usize,
    kv_heads: usize,
    head_dim: usize,
    count: BlockCount,
}

/// A layer's cached keys and values as the attention reads them, block by
/// block: `keys(b)` holds token `b · BLOCK_TOKENS + j`'s element `e` in head
/// `h` at `(h · head_dim + e) · BLOCK_TOKENS + j`; `values(b)` its value at
/// `(h · BLOCK_TOKENS + j) · head_dim`.
pub(crate) struct LayerView<'a> {
    blocks: &'a [Arc<KvBlock>],
    offset: usize,
    width: usize,
}

impl LayerView<'_> {
    pub fn keys(&self, block: usize) -> &[f32] {
        &self.blocks[block].data[self.offset..][..self.width]
    }

    pub fn values(&self, block: usize) -> &[f32] {
        &self.blocks[block].data[self.offset + self.width..][..self.width]
    }
}

impl KvCache {
    /// An empty cache counting its blocks in `count`.
    pub fn new(layers: usize, kv_heads: usize, head_dim: usize, count: BlockCount) -> Self {
        Self { blocks: Vec::new(), len: 0, layers, kv_heads, head_dim, count }
    }

    /// Tokens already cached: the position of the next token.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The first `len` tokens as a new cache sharing this one's blocks.
    pub fn share(&self, len: usize) -> KvCache {
        let len = len.min(self.len);
        KvCache { blocks: self.blocks[..len.div_ceil(BLOCK_TOKENS)].to_vec(), len, ..self.clone_empty() }
    }

    /// This empty cache starting from the first `len` tokens that `blocks`
    /// hold (a prefix cache hit).
    pub fn with_prefix(mut self, blocks: Vec<Arc<KvBlock>>, len: usize) -> KvCache {
        debug_assert!(self.is_empty() && blocks.len() == len.div_ceil(BLOCK_TOKENS));
        self.blocks = blocks;
        self.len = len;
        self
    }

    fn clone_empty(&self) -> KvCache {
        KvCache::new(self.layers, self.kv_heads, self.head_dim, self.count.clone())
    }

    /// The blocks holding its tokens, in order (the last one may be partly filled).
    pub fn blocks(&self) -> &[Arc<KvBlock>] {
        &self.blocks
    }

    /// Blocks this cache will take beyond those it holds to reach
    /// `tokens`: the ones after its last, and a copy of its last if that is
    /// partly filled and shared (its next token is written into it).
    pub fn blocks_to_grow(&self, tokens: usize) -> usize {
        let partial_shared =
            !self.len.is_multiple_of(BLOCK_TOKENS) && self.blocks.last().is_some_and(|b| Arc::strong_count(b) > 1);
        tokens.div_ceil(BLOCK_TOKENS).saturating_sub(self.len.div_ceil(BLOCK_TOKENS)) + usize::from(partial_shared)
    }

    fn layer_width(&self) -> usize {
        self.kv_heads * self.head_dim * BLOCK_TOKENS
    }

    /// Writes the keys and values of `new` tokens (`[new, kv_heads · head_dim]`,
    /// token-major, as the projections produce them) to `layer` after the
    /// cached ones.
    pub(crate) fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) {
        let (heads, d) = (self.kv_heads, self.head_dim);
        let new = k.len() / (heads * d);
        debug_assert_eq!(k.len(), v.len());
        let width = self.layer_width();
        let floats = 2 * width * self.layers;
        let offset = 2 * width * layer;
        for i in 0..new {
            let position = self.len + i;
            let (b, j) = (position / BLOCK_TOKENS, position % BLOCK_TOKENS);
            if b == self.blocks.len() {
                self.blocks.push(Arc::new(KvBlock::new(floats, &self.count)));
            }
            // Copy-on-write: a block someone else holds is copied before the
            // first write (only ever the last, partly filled one).
            let block = &mut Arc::make_mut(&mut self.blocks[b]).data[offset..offset + 2 * width];
            let (keys, values) = block.split_at_mut(width);
            for h in 0..heads {
                let src = (i * heads + h) * d;
                for e in 0..d {
                    keys[(h * d + e) * BLOCK_TOKENS + j] = k[src + e];
                }
                let dst = (h * BLOCK_TOKENS + j) * d;
                values[dst..dst + d].copy_from_slice(&v[src..src + d]);
            }
        }
    }

    pub(crate) fn layer(&self, layer: usize) -> LayerView<'_> {
        let width = self.layer_width();
        LayerView { blocks: &self.blocks, offset: 2 * width * layer, width }
    }

    /// Called once per forward after every layer appended `new` tokens.
    pub(crate) fn advance(&mut self, new: usize) {
        self.len += new;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Token t, head h, element e = 100·t + 10·h + e (negated for values).
    fn token(t: usize, heads: usize, d: usize) -> Vec<f32> {
        (0..heads).flat_map(|h| (0..d).map(move |e| (100 * t + 10 * h + e) as f32)).collect()
    }

    fn append(cache: &mut KvCache, tokens: std::ops::Range<usize>) {
        let (heads, d) = (cache.kv_heads, cache.head_dim);
        let k: Vec<f32> = tokens.clone().flat_map(|t| token(t, heads, d)).collect();
        let v: Vec<f32> = k.iter().map(|x| -x).collect();
        for layer in 0..cache.layers {
            cache.append(layer, &k, &v);
        }
        cache.advance(tokens.len());
    }

    /// Every cached token reads back as `token(t)` in every layer.
    fn assert_holds(cache: &KvCache, tokens: usize) {
        let (heads, d) = (cache.kv_heads, cache.head_dim);
        assert_eq!(cache.len(), tokens);
        for layer in 0..cache.layers {
            let view = cache.layer(layer);
            for t in 0..tokens {
                let (b, j) = (t / BLOCK_TOKENS, t % BLOCK_TOKENS);
                for h in 0..heads {
                    let want: Vec<f32> = (0..d).map(|e| (100 * t + 10 * h + e) as f32).collect();
                    let key: Vec<f32> = (0..d).map(|e| view.keys(b)[(h * d + e) * BLOCK_TOKENS + j]).collect();
                    assert_eq!(key, want, "layer {layer} token {t} head {h}");
                    let value = &view.values(b)[(h * BLOCK_TOKENS + j) * d..][..d];
                    let negated: Vec<f32> = want.iter().map(|x| -x).collect();
                    assert_eq!(value, negated.as_slice(), "layer {layer} token {t} head {h}");
                }
            }
        }
    }

    #[test]
    fn tokens_appended_in_any_chunks_read_back_in_place() {
        let count = BlockCount::default();
        let mut cache = KvCache::new(2, 3, 4, count.clone());
        let mut t = 0;
        for chunk in [5usize, 1, 40, 1, 30] {
            append(&mut cache, t..t + chunk);
            t += chunk;
        }
        assert_holds(&cache, t);
        assert_eq!(count.blocks(), t.div_ceil(BLOCK_TOKENS));
        drop(cache);
        assert_eq!(count.blocks(), 0, "dropped blocks are counted out");
    }

    #[test]
    fn shared_blocks_are_copied_only_when_written() {
        let count = BlockCount::default();
        let mut first = KvCache::new(2, 2, 4, count.clone());
        append(&mut first, 0..40);
        // 40 tokens: one full block and one partly filled, both shared.
        let mut second = first.share(40);
        assert_eq!(count.blocks(), 2);
        assert_eq!(second.blocks_to_grow(70), 2, "a copy of the shared last block and one more");
        assert_eq!(first.blocks_to_grow(64), 1);
        append(&mut second, 40..70);
        assert_eq!(count.blocks(), 4, "the full block stays shared; the last one was copied");
        assert!(Arc::ptr_eq(&first.blocks()[0], &second.blocks()[0]));
        append(&mut first, 40..50);
        assert_holds(&first, 50);
        assert_holds(&second, 70);
        // A prefix that ends inside a block: the rest of that block is overwritten.
        let mut third = first.share(35);
        append(&mut third, 35..64);
        assert_holds(&third, 64);
        assert_holds(&first, 50);
    }
}
