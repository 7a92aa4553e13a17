//! Prompt prefixes computed once: when a sequence ends, the KV blocks of its
//! tokens (prompt and generated) stay in a tree keyed by its adapter and the
//! exact token ids of each block, under the block before it (a radix tree
//! with a block per edge). A new sequence on the same adapter walks the tree
//! along its prompt and starts from the blocks it finds, shared, not copied;
//! it prefills only the rest. A block may be used in part (the prompt
//! diverges inside it): the sequence copies that one block when it first
//! writes into it, so the cached block never changes.
//!
//! Blocks leave least recently used first, leaves before their parents and
//! never while a running sequence holds them, when the cache is over its own
//! budget or admission needs the room.
//!
//! Entries also carry a partition: a request's `cache_salt`, and with
//! `--prefix-cache-isolation key` its API key, name one, and only requests
//! of the same partition reuse its entries (so `cached_tokens` and the time
//! to first token tell a client nothing about another's prompts).
//!
//! The key holds the adapter's weights as a `Weak`: a reloaded adapter is new
//! weights, so its old entries never match (the `Weak` keeps the old
//! allocation, so no new adapter can take its address), and they are dropped
//! once nobody holds the old weights. A changed template changes the tokens.

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use crate::model::lora::AdapterWeights;
use crate::model::{KvBlock, BLOCK_TOKENS};

type NodeId = u64;
/// The tree's root: the empty prefix, parent of every first block.
const ROOT: NodeId = 0;

/// Where cached KV may be reused: on the weights that computed it, within
/// its partition (0: shared by every request without a salt).
#[derive(Clone, Copy)]
pub struct Scope<'a> {
    pub adapter: Option<&'a Arc<AdapterWeights>>,
    pub partition: u64,
}

struct Node {
    parent: NodeId,
    /// The weights that computed it (None: the base model).
    adapter: Option<Weak<AdapterWeights>>,
    partition: u64,
    /// The tokens whose keys and values `block` holds: a whole block's, or
    /// fewer for the last block of a sequence (then it has no children).
    tokens: Vec<u32>,
    block: Arc<KvBlock>,
    last_used: u64,
}

impl Node {
    fn serves(&self, scope: Scope) -> bool {
        let same_weights = match (&self.adapter, scope.adapter) {
            (None, None) => true,
            (Some(weak), Some(arc)) => std::ptr::eq(weak.as_ptr(), Arc::as_ptr(arc)),
            _ => false,
        };
        same_weights && self.partition == scope.partition
    }

    fn is_whole(&self) -> bool {
        self.tokens.len() == BLOCK_TOKENS
    }
}

/// The cached start of a prompt: its blocks, in order, and how many of
/// their tokens it covers (the last block may be used in part).
pub struct Hit {
    path: Vec<NodeId>,
    pub blocks: Vec<Arc<KvBlock>>,
    pub tokens: usize,
}

pub struct PrefixCache {
    nodes: HashMap<NodeId, Node>,
    children: HashMap<NodeId, Vec<NodeId>>,
    next_id: NodeId,
    /// Tokens of KV the cache may hold (whole blocks); 0 turns it off.
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
        Self { nodes: HashMap::new(), children: HashMap::new(), next_id: ROOT + 1, budget, clock: 0 }
    }

    /// Tokens of KV held (whole blocks: what the entries cost in memory).
    pub fn held(&self) -> usize {
        self.nodes.len() * BLOCK_TOKENS
    }

    fn children_of<'a>(&'a self, parent: NodeId, scope: Scope<'a>) -> impl Iterator<Item = (NodeId, &'a Node)> + 'a {
        self.children
            .get(&parent)
            .into_iter()
            .flatten()
            .filter_map(|id| self.nodes.get(id).map(|node| (*id, node)))
            .filter(move |(_, node)| node.serves(scope))
    }

    /// The longest cached start of `prompt` in this scope: at most all but
    /// the prompt's last token, which is fed to get the first logits.
    pub fn lookup(&self, scope: Scope, prompt: &[u32]) -> Option<Hit> {
        let limit = prompt.len().saturating_sub(1);
        let (mut parent, mut matched, mut path) = (ROOT, 0, Vec::new());
        while matched < limit {
            let rest = &prompt[matched..limit];
            let best = self
                .children_of(parent, scope)
                .map(|(id, node)| (id, common_prefix(&node.tokens, rest)))
                .max_by_key(|&(id, shared)| (shared, std::cmp::Reverse(id)));
            let Some((id, shared)) = best.filter(|&(_, shared)| shared > 0) else { break };
            path.push(id);
            matched += shared;
            if shared < BLOCK_TOKENS {
                break; // used in part, or a sequence's last block: nothing below
            }
            parent = id;
        }
        if matched == 0 {
            return None;
        }
        let blocks = path.iter().filter_map(|id| self.nodes.get(id)).map(|node| node.block.clone()).collect();
        Some(Hit { path, blocks, tokens: matched })
    }

    /// Marks a hit's blocks used now (a sequence started from them).
    pub fn touch(&mut self, hit: &Hit) {
        self.clock += 1;
        for id in &hit.path {
            if let Some(node) = self.nodes.get_mut(id) {
                node.last_used = self.clock;
            }
        }
    }

    /// Keeps the blocks of a finished sequence's cache; `tokens` are the
    /// ones it fed, in order (its cache holds the first `cached` of them).
    pub fn keep(&mut self, scope: Scope, tokens: &[u32], blocks: &[Arc<KvBlock>], cached: usize) {
        if self.budget == 0 {
            return;
        }
        self.drop_stale();
        self.clock += 1;
        let tokens = &tokens[..cached.min(tokens.len())];
        let mut parent = ROOT;
        for (chunk, block) in tokens.chunks(BLOCK_TOKENS).zip(blocks) {
            // The same tokens, or a longer entry starting with them: already cached.
            let known =
                self.children_of(parent, scope).find(|(_, node)| node.tokens.starts_with(chunk)).map(|(id, _)| id);
            if let Some(id) = known {
                let node = self.nodes.get_mut(&id).expect("a listed child exists");
                node.last_used = self.clock;
                if chunk.len() < BLOCK_TOKENS || !node.is_whole() {
                    break;
                }
                parent = id;
                continue;
            }
            // Shorter last blocks that this one extends are superseded.
            let superseded: Vec<NodeId> = self
                .children_of(parent, scope)
                .filter(|(_, node)| !node.is_whole() && chunk.starts_with(&node.tokens))
                .map(|(id, _)| id)
                .collect();
            for id in superseded {
                self.remove(id);
            }
            let id = self.next_id;
            self.next_id += 1;
            let node = Node {
                parent,
                adapter: scope.adapter.map(Arc::downgrade),
                partition: scope.partition,
                tokens: chunk.to_vec(),
                block: block.clone(),
                last_used: self.clock,
            };
            self.nodes.insert(id, node);
            self.children.entry(parent).or_default().push(id);
            parent = id;
        }
        while self.held() > self.budget && self.evict_one() {}
    }

    /// Drops the least recently used block that no sequence holds and no
    /// cached block continues; false when there is none.
    pub fn evict_one(&mut self) -> bool {
        let oldest = self
            .nodes
            .iter()
            .filter(|(id, node)| {
                Arc::strong_count(&node.block) == 1 && self.children.get(id).is_none_or(|c| c.is_empty())
            })
            .min_by_key(|(id, node)| (node.last_used, **id))
            .map(|(id, _)| *id);
        match oldest {
            Some(id) => {
                self.remove(id);
                true
            }
            None => false,
        }
    }

    /// Removes a node that has no children.
    fn remove(&mut self, id: NodeId) {
        let Some(node) = self.nodes.remove(&id) else { return };
        self.children.remove(&id);
        if let Some(siblings) = self.children.get_mut(&node.parent) {
            siblings.retain(|&s| s != id);
        }
    }

    /// Entries of adapters nobody holds any more (unloaded, reloaded) can
    /// never match again: whole subtrees, as a chain has one adapter.
    fn drop_stale(&mut self) {
        let stale: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|(_, node)| node.adapter.as_ref().is_some_and(|w| w.strong_count() == 0))
            .map(|(id, _)| *id)
            .collect();
        for id in stale {
            self.remove(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kv_cache::BlockCount;
    use crate::model::KvCache;

    /// A cache of `tokens` tokens (one layer, one head of width 2).
    fn cache(count: &BlockCount, tokens: usize) -> KvCache {
        let mut cache = KvCache::new(1, 1, 2, count.clone());
        let values: Vec<f32> = (0..tokens * 2).map(|x| x as f32).collect();
        cache.append(0, &values, &values);
        cache.advance(tokens);
        cache
    }

    const BASE: Scope<'static> = Scope { adapter: None, partition: 0 };

    fn on(adapter: Option<&Arc<AdapterWeights>>) -> Scope<'_> {
        Scope { adapter, partition: 0 }
    }

    fn keep_in(prefixes: &mut PrefixCache, count: &BlockCount, scope: Scope, tokens: Vec<u32>) {
        let cache = cache(count, tokens.len());
        prefixes.keep(scope, &tokens, cache.blocks(), cache.len());
    }

    fn keep(prefixes: &mut PrefixCache, count: &BlockCount, adapter: Option<&Arc<AdapterWeights>>, tokens: Vec<u32>) {
        keep_in(prefixes, count, on(adapter), tokens);
    }

    fn hit_in(prefixes: &PrefixCache, scope: Scope, prompt: &[u32]) -> Option<usize> {
        prefixes.lookup(scope, prompt).map(|h| h.tokens)
    }

    fn hit(prefixes: &PrefixCache, adapter: Option<&Arc<AdapterWeights>>, prompt: &[u32]) -> Option<usize> {
        hit_in(prefixes, on(adapter), prompt)
    }

    #[test]
    fn the_longest_prefix_on_the_same_adapter_is_reused() {
        let count = BlockCount::default();
        let mut prefixes = PrefixCache::new(10_000);
        let adapter = Arc::new(AdapterWeights::default());
        keep(&mut prefixes, &count, None, (0..40).collect());
        keep(&mut prefixes, &count, None, (0..10).chain(100..130).collect());
        let prompt: Vec<u32> = (0..50).collect();
        let found = prefixes.lookup(BASE, &prompt).expect("a hit");
        assert_eq!((found.tokens, found.blocks.len()), (40, 2));
        // The whole prompt cached: all but its last token come from the cache.
        assert_eq!(hit(&prefixes, None, &prompt[..40]), Some(39));
        // Diverging inside the first block: that block, in part.
        assert_eq!(hit(&prefixes, None, &(0..10).chain(100..105).chain(7..9).collect::<Vec<_>>()), Some(15));
        // Another adapter never sees the base's entries, and the other way round.
        assert_eq!(hit(&prefixes, Some(&adapter), &prompt), None);
        keep(&mut prefixes, &count, Some(&adapter), (0..20).collect());
        assert_eq!(hit(&prefixes, Some(&adapter), &prompt), Some(20));
        assert_eq!(hit(&prefixes, None, &prompt), Some(40));
        let reloaded = Arc::new(AdapterWeights::default());
        assert_eq!(hit(&prefixes, Some(&reloaded), &prompt), None);
        // Unloaded: nobody holds the weights, so their entries go.
        drop(adapter);
        let held = prefixes.held();
        keep(&mut prefixes, &count, None, (0..40).collect());
        assert_eq!(prefixes.held(), held - BLOCK_TOKENS);
    }

    #[test]
    fn blocks_are_shared_and_the_budget_evicts_least_recently_used_unheld_leaves() {
        let count = BlockCount::default();
        let mut prefixes = PrefixCache::new(4 * BLOCK_TOKENS);
        keep(&mut prefixes, &count, None, (0..64).collect());
        keep(&mut prefixes, &count, None, (0..32).chain(500..520).collect());
        // The shared first block is kept once: 3 blocks.
        assert_eq!((prefixes.held(), count.blocks()), (3 * BLOCK_TOKENS, 3));
        // A longer last block supersedes a shorter one it extends.
        keep(&mut prefixes, &count, None, (0..32).chain(500..530).collect());
        assert_eq!(prefixes.held(), 3 * BLOCK_TOKENS);
        assert_eq!(hit(&prefixes, None, &(0..32).chain(500..540).collect::<Vec<_>>()), Some(62));
        // A sequence holds the (0..64) chain; the next entry pushes the cache
        // over budget, and the unheld leaf goes, never a parent or a held block.
        let prompt: Vec<u32> = (0..70).collect();
        let held = prefixes.lookup(BASE, &prompt).expect("a hit");
        prefixes.touch(&held);
        keep(&mut prefixes, &count, None, (1000..1064).collect());
        assert!(prefixes.held() <= 4 * BLOCK_TOKENS);
        assert_eq!(hit(&prefixes, None, &prompt), Some(64), "held blocks stay");
        assert_eq!(
            hit(&prefixes, None, &(0..32).chain(500..540).collect::<Vec<_>>()),
            Some(32),
            "the unheld leaf went"
        );
        assert_eq!(hit(&prefixes, None, &(1000..1100).collect::<Vec<_>>()), Some(64));
        drop(held);
        while prefixes.evict_one() {}
        assert_eq!((prefixes.held(), count.blocks()), (0, 0));
        assert!(PrefixCache::new(0).lookup(BASE, &[1, 2, 3]).is_none());
    }

    #[test]
    fn partitions_never_see_each_others_entries() {
        let count = BlockCount::default();
        let mut prefixes = PrefixCache::new(10_000);
        let (alice, bob) = (Scope { adapter: None, partition: 11 }, Scope { adapter: None, partition: 22 });
        let prompt: Vec<u32> = (0..50).collect();
        keep_in(&mut prefixes, &count, alice, (0..40).collect());
        assert_eq!(hit_in(&prefixes, alice, &prompt), Some(40));
        assert_eq!(hit_in(&prefixes, bob, &prompt), None);
        assert_eq!(hit_in(&prefixes, BASE, &prompt), None);
        keep_in(&mut prefixes, &count, BASE, (0..20).collect());
        assert_eq!(hit_in(&prefixes, alice, &prompt), Some(40), "the shared entry is not alice's");
        assert_eq!(hit_in(&prefixes, BASE, &prompt), Some(20));
    }
}
