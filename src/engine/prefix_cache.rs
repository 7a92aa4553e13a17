//! Prompt prefixes computed once: when a sequence ends, its KV cache (the
//! prompt and what it generated) is kept, keyed by its adapter and its exact
//! token ids; a new sequence on the same adapter starts from a copy of the
//! longest cached prefix of its prompt and prefills only the rest. Entries
//! are dropped least recently used first, when the cache is over its own
//! budget or when admission needs the room.
//!
//! The key holds the adapter's weights themselves (`Arc` identity): a
//! reloaded adapter is new weights, so its old entries can never match, and
//! a changed template changes the token ids.

use std::sync::Arc;

use crate::model::lora::AdapterWeights;
use crate::model::KvCache;

struct Entry {
    adapter: Option<Arc<AdapterWeights>>,
    /// The tokens whose keys and values `cache` holds, in order.
    tokens: Vec<u32>,
    cache: KvCache,
    last_used: u64,
}

/// A hit: the copied prefix and how many prompt tokens it covers.
pub struct Reused {
    pub cache: KvCache,
    pub tokens: usize,
}

pub struct PrefixCache {
    entries: Vec<Entry>,
    /// Tokens of KV the entries may hold (their buffers' room); 0 turns it off.
    budget: usize,
    clock: u64,
}

/// Whether two sequences' adapters are the same weights (or both the base).
pub(super) fn same_adapter(a: Option<&Arc<AdapterWeights>>, b: Option<&Arc<AdapterWeights>>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        _ => false,
    }
}

pub(super) fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl PrefixCache {
    pub fn new(budget: usize) -> Self {
        Self { entries: Vec::new(), budget, clock: 0 }
    }

    /// Tokens of KV held (what the entries cost in memory).
    pub fn held(&self) -> usize {
        self.entries.iter().map(|e| e.cache.capacity_tokens()).sum()
    }

    /// The longest cached prefix of `prompt` on this adapter, copied into a
    /// cache that may grow to `max_tokens`. At most all but the prompt's
    /// last token: that one is fed to get the first logits.
    pub fn reuse(
        &mut self,
        adapter: Option<&Arc<AdapterWeights>>,
        prompt: &[u32],
        max_tokens: usize,
    ) -> Option<Reused> {
        let limit = prompt.len().saturating_sub(1);
        let (best, tokens) = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| same_adapter(e.adapter.as_ref(), adapter))
            .map(|(i, e)| (i, common_prefix(&e.tokens, prompt).min(limit).min(e.cache.len())))
            .max_by_key(|&(i, n)| (n, std::cmp::Reverse(i)))?;
        if tokens == 0 {
            return None;
        }
        self.clock += 1;
        let entry = &mut self.entries[best];
        entry.last_used = self.clock;
        Some(Reused { cache: entry.cache.prefix(tokens, max_tokens), tokens })
    }

    /// Keeps a finished sequence's cache; `tokens` are what it holds.
    pub fn keep(&mut self, adapter: Option<Arc<AdapterWeights>>, mut tokens: Vec<u32>, cache: KvCache) {
        tokens.truncate(cache.len());
        if self.budget == 0 || tokens.is_empty() || cache.capacity_tokens() > self.budget {
            return;
        }
        self.clock += 1;
        // An entry that this one extends is redundant; one that extends this
        // one already covers it.
        if let Some(longer) = self
            .entries
            .iter_mut()
            .find(|e| same_adapter(e.adapter.as_ref(), adapter.as_ref()) && e.tokens.starts_with(&tokens))
        {
            longer.last_used = self.clock;
            return;
        }
        self.entries.retain(|e| !(same_adapter(e.adapter.as_ref(), adapter.as_ref()) && tokens.starts_with(&e.tokens)));
        // Entries of adapters nobody holds any more (unloaded, reloaded) can never match again.
        self.entries.retain(|e| e.adapter.as_ref().is_none_or(|a| Arc::strong_count(a) > 1));
        self.entries.push(Entry { adapter, tokens, cache, last_used: self.clock });
        while self.held() > self.budget && self.evict_one() {}
    }

    /// Drops the least recently used entry; false when there is none.
    pub fn evict_one(&mut self) -> bool {
        let Some(oldest) = self.entries.iter().enumerate().min_by_key(|(_, e)| e.last_used).map(|(i, _)| i) else {
            return false;
        };
        self.entries.swap_remove(oldest);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(tokens: usize) -> KvCache {
        let mut cache = KvCache::new(1, 1, 2, 1024);
        let values: Vec<f32> = (0..tokens * 2).map(|x| x as f32).collect();
        cache.append(0, &values, &values);
        cache.advance(tokens);
        cache
    }

    #[test]
    fn the_longest_prefix_on_the_same_adapter_is_reused() {
        let mut prefixes = PrefixCache::new(10_000);
        let adapter = Arc::new(AdapterWeights { layers: Vec::new() });
        prefixes.keep(None, (0..40).collect(), cache(40));
        prefixes.keep(None, (0..10).chain(100..130).collect(), cache(40));
        let prompt: Vec<u32> = (0..50).collect();
        let hit = prefixes.reuse(None, &prompt, 100).expect("a hit");
        assert_eq!((hit.tokens, hit.cache.len()), (40, 40));
        // The whole prompt cached: all but its last token come from the cache.
        let hit = prefixes.reuse(None, &prompt[..40], 100).expect("a hit");
        assert_eq!(hit.tokens, 39);
        // Another adapter never sees the base's entries, and the other way round.
        assert!(prefixes.reuse(Some(&adapter), &prompt, 100).is_none());
        prefixes.keep(Some(adapter.clone()), (0..20).collect(), cache(20));
        assert_eq!(prefixes.reuse(Some(&adapter), &prompt, 100).map(|h| h.tokens), Some(20));
        let reloaded = Arc::new(AdapterWeights { layers: Vec::new() });
        assert!(prefixes.reuse(Some(&reloaded), &prompt, 100).is_none());
    }

    #[test]
    fn the_budget_evicts_least_recently_used_first() {
        let mut prefixes = PrefixCache::new(64);
        prefixes.keep(None, (0..20).collect(), cache(20));
        prefixes.keep(None, (100..120).collect(), cache(20));
        // Touch the first; the third entry pushes the held room over 64.
        assert!(prefixes.reuse(None, &(0..30).collect::<Vec<_>>(), 100).is_some());
        prefixes.keep(None, (200..220).collect(), cache(20));
        assert!(prefixes.held() <= 64);
        assert!(prefixes.reuse(None, &(100..130).collect::<Vec<_>>(), 100).is_none(), "the oldest went");
        assert!(prefixes.reuse(None, &(0..30).collect::<Vec<_>>(), 100).is_some());
        // An entry the new one extends is replaced, not kept twice.
        prefixes.keep(None, (0..25).collect(), cache(25));
        assert_eq!(prefixes.entries.iter().filter(|e| e.tokens.starts_with(&[0, 1])).count(), 1);
        assert!(PrefixCache::new(0).reuse(None, &[1, 2, 3], 10).is_none());
    }
}
