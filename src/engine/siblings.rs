//! Prompts that start alike, running together, compute the shared part once:
//! a sequence that has not started waits for an earlier one on the same
//! adapter whose prompt shares at least `MIN_SHARED` leading tokens with its
//! own, then starts from that much of its cache, sharing its blocks (never its own
//! last prompt token, which it feeds itself for its own first logits). The
//! `n` choices of one request are the plainest case: the whole prompt.

use super::prefix_cache::common_prefix;
use super::sequence::Sequence;

/// Shorter common prefixes are computed again rather than waited for (every
/// chat prompt starts with the same few template tokens).
pub const MIN_SHARED: usize = 16;

/// Gives sequences that have not started the blocks of an earlier sequence's
/// shared prefix once it is computed; returns, per running sequence, whether
/// it must sit this step out waiting for one.
pub fn share_prefills(running: &mut [Sequence]) -> Vec<bool> {
    let mut wait = vec![false; running.len()];
    for i in 0..running.len() {
        if !running[i].cache.is_empty() || running[i].wants_prompt_logprobs() {
            continue;
        }
        let limit = running[i].prompt.len().saturating_sub(1);
        let best = (0..i)
            .filter(|&j| running[j].shares_scope(&running[i]))
            .map(|j| (j, common_prefix(&running[j].prompt, &running[i].prompt).min(limit)))
            .filter(|&(_, shared)| shared >= MIN_SHARED)
            .max_by_key(|&(j, shared)| (shared, std::cmp::Reverse(j)));
        let Some((source, shared)) = best else { continue };
        if running[source].cache.len() < shared {
            wait[i] = true;
            continue;
        }
        running[i].cache = running[source].cache.share(shared);
        running[i].cached = shared;
    }
    wait
}
