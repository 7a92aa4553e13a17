//! One sequence's attention keys and values, layer by layer, in buffers that
//! grow by doubling: a decode step writes one token in place instead of
//! copying the whole history.

/// Keys and values of every layer for one sequence.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    len: usize,
    kv_heads: usize,
    head_dim: usize,
}

/// One layer's keys and values, each `[kv_heads, capacity, head_dim]`.
#[derive(Debug, Clone, Default)]
struct LayerCache {
    k: Vec<f32>,
    v: Vec<f32>,
    capacity: usize,
}

/// A layer's cached keys and values as the attention reads them: head `h`,
/// token `j` starts at `(h · capacity + j) · head_dim`.
pub(crate) struct LayerView<'a> {
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub capacity: usize,
}

impl KvCache {
    pub fn new(num_layers: usize, kv_heads: usize, head_dim: usize) -> Self {
        Self { layers: vec![LayerCache::default(); num_layers], len: 0, kv_heads, head_dim }
    }

    /// Tokens already cached: the position of the next token.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
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
            let capacity = (start + new).max(cache.capacity * 2).max(16);
            let grow = |old: &[f32]| {
                let mut buf = vec![0f32; heads * capacity * d];
                for h in 0..heads {
                    let from = h * cache.capacity * d;
                    buf[h * capacity * d..][..start * d].copy_from_slice(&old[from..from + start * d]);
                }
                buf
            };
            cache.k = grow(&cache.k);
            cache.v = grow(&cache.v);
            cache.capacity = capacity;
        }
        for i in 0..new {
            for h in 0..heads {
                let src = (i * heads + h) * d;
                let dst = (h * cache.capacity + start + i) * d;
                cache.k[dst..dst + d].copy_from_slice(&k[src..src + d]);
                cache.v[dst..dst + d].copy_from_slice(&v[src..src + d]);
            }
        }
    }

    pub(crate) fn layer(&self, layer: usize) -> LayerView<'_> {
        let cache = &self.layers[layer];
        LayerView { k: &cache.k, v: &cache.v, capacity: cache.capacity }
    }

    /// Called once per forward after every layer appended `new` tokens.
    pub(crate) fn advance(&mut self, new: usize) {
        self.len += new;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn growing_keeps_every_token_in_place() {
        let (heads, d) = (3, 4);
        let mut cache = KvCache::new(1, heads, d);
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
                assert_eq!(&view.k[at..at + d], want.as_slice(), "token {j} head {h}");
                assert_eq!(view.v[at], -want[0]);
            }
        }
    }
}
