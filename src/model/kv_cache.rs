//! One sequence's attention keys and values, layer by layer, in buffers that
//! grow by doubling: a decode step writes one token in place instead of
//! copying the whole history.

/// Keys the attention scores at once: the cache's capacity is a multiple.
pub(crate) const KEY_BLOCK: usize = 32;

/// Keys and values of every layer for one sequence.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    len: usize,
    kv_heads: usize,
    head_dim: usize,
    /// The most tokens this sequence may hold (its KV reservation): growth
    /// by doubling stops there, so memory follows the admission budget.
    max_tokens: usize,
}

/// One layer's keys, `[kv_heads, head_dim, capacity]` (transposed, so the
/// scores of many keys are one vector loop), and values,
/// `[kv_heads, capacity, head_dim]`.
#[derive(Debug, Clone, Default)]
struct LayerCache {
    k: Vec<f32>,
    v: Vec<f32>,
    capacity: usize,
}

/// A layer's cached keys and values as the attention reads them: element `e`
/// of token `j`'s key in head `h` is `k_t[(h · head_dim + e) · capacity + j]`;
/// its value starts at `v[(h · capacity + j) · head_dim]`. `capacity` is a
/// multiple of `KEY_BLOCK`, so a block of keys can always be read whole.
pub(crate) struct LayerView<'a> {
    pub k_t: &'a [f32],
    pub v: &'a [f32],
    pub capacity: usize,
}

impl KvCache {
    pub fn new(num_layers: usize, kv_heads: usize, head_dim: usize, max_tokens: usize) -> Self {
        Self { layers: vec![LayerCache::default(); num_layers], len: 0, kv_heads, head_dim, max_tokens }
    }

    /// Tokens already cached: the position of the next token.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The first `len` tokens in a new cache that may grow to `max_tokens`
    /// (a sequence starting from a shared prefix).
    pub fn prefix(&self, len: usize, max_tokens: usize) -> KvCache {
        let len = len.min(self.len);
        let (heads, d) = (self.kv_heads, self.head_dim);
        let capacity = len.next_multiple_of(KEY_BLOCK);
        let layers = self
            .layers
            .iter()
            .map(|layer| LayerCache {
                k: regrow(&layer.k, heads * d, layer.capacity, capacity, len),
                v: regrow(&layer.v, heads, layer.capacity * d, capacity * d, len * d),
                capacity,
            })
            .collect();
        KvCache { layers, len, kv_heads: heads, head_dim: d, max_tokens }
    }

    /// Tokens the buffers have room for (what the cache costs in memory).
    pub fn capacity_tokens(&self) -> usize {
        self.layers.first().map_or(0, |l| l.capacity)
    }

    /// Writes the keys and values of `new` tokens (`[new, kv_heads · head_dim]`,
    /// token-major, as the projections produce them) to `layer` after the
    /// cached ones.
    pub(crate) fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) {
        let (heads, d) = (self.kv_heads, self.head_dim);
        let new = k.len() / (heads * d);
        debug_assert_eq!(k.len(), v.len());
        let start = self.len;
        let cache = &mut self.layers[layer];
        if start + new > cache.capacity {
            let doubled = (cache.capacity * 2).min(self.max_tokens);
            let capacity = (start + new).max(doubled).next_multiple_of(KEY_BLOCK);
            // Keys: heads·d rows of `capacity`; values: heads rows of `capacity · d`.
            cache.k = regrow(&cache.k, heads * d, cache.capacity, capacity, start);
            cache.v = regrow(&cache.v, heads, cache.capacity * d, capacity * d, start * d);
            cache.capacity = capacity;
        }
        let capacity = cache.capacity;
        for i in 0..new {
            for h in 0..heads {
                let src = (i * heads + h) * d;
                for e in 0..d {
                    cache.k[(h * d + e) * capacity + start + i] = k[src + e];
                }
                let dst = (h * capacity + start + i) * d;
                cache.v[dst..dst + d].copy_from_slice(&v[src..src + d]);
            }
        }
    }

    pub(crate) fn layer(&self, layer: usize) -> LayerView<'_> {
        let cache = &self.layers[layer];
        LayerView { k_t: &cache.k, v: &cache.v, capacity: cache.capacity }
    }

    /// Called once per forward after every layer appended `new` tokens.
    pub(crate) fn advance(&mut self, new: usize) {
        self.len += new;
    }
}

/// `rows` rows of `old_row` values, the first `used` of each kept, in rows of `new_row`.
fn regrow(old: &[f32], rows: usize, old_row: usize, new_row: usize, used: usize) -> Vec<f32> {
    let mut buf = vec![0f32; rows * new_row];
    for r in 0..rows {
        buf[r * new_row..][..used].copy_from_slice(&old[r * old_row..][..used]);
    }
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn growing_keeps_every_token_in_place() {
        let (heads, d) = (3, 4);
        let mut cache = KvCache::new(1, heads, d, 1000);
        // Token t, head h, element e = 100·t + 10·h + e; appended in uneven chunks
        // so the buffer grows (16 → 32 → 64) with tokens already in it.
        let token = |t: usize| -> Vec<f32> {
            (0..heads).flat_map(|h| (0..d).map(move |e| (100 * t + 10 * h + e) as f32)).collect()
        };
        let mut t = 0;
        for chunk in [5usize, 1, 20, 1, 30] {
            let k: Vec<f32> = (t..t + chunk).flat_map(token).collect();
            let v: Vec<f32> = k.iter().map(|x| -x).collect();
            cache.append(0, &k, &v);
            cache.advance(chunk);
            t += chunk;
        }
        let view = cache.layer(0);
        assert!(view.capacity >= t);
        for j in 0..t {
            for h in 0..heads {
                let at = (h * view.capacity + j) * d;
                let want: Vec<f32> = (0..d).map(|e| (100 * j + 10 * h + e) as f32).collect();
                let key: Vec<f32> = (0..d).map(|e| view.k_t[(h * d + e) * view.capacity + j]).collect();
                assert_eq!(key, want, "token {j} head {h}");
                let negated: Vec<f32> = want.iter().map(|x| -x).collect();
                assert_eq!(&view.v[at..at + d], negated.as_slice(), "token {j} head {h}");
            }
        }
    }

    #[test]
    fn growth_stops_at_the_reservation() {
        let mut cache = KvCache::new(1, 1, 2, 40);
        for _ in 0..40 {
            cache.append(0, &[1.0, 2.0], &[3.0, 4.0]);
            cache.advance(1);
        }
        // 32, then 40 rounded up to whole key blocks (not 2 × 32 and onwards).
        assert_eq!(cache.layer(0).capacity, 64);
        for _ in 0..30 {
            cache.append(0, &[1.0, 2.0], &[3.0, 4.0]);
            cache.advance(1);
        }
        // Past the reservation it still grows to fit, never panics.
        assert!(cache.layer(0).capacity >= 70);
    }
}
