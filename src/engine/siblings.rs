//! The `n` choices of one prompt prefill it once: the group's first member
//! prefills, the others wait for it, then start from a copy of its cache
//! holding all but the prompt's last token, which each feeds itself to get
//! its own first logits (one token instead of the whole prompt).

use super::sequence::Sequence;

/// Gives waiting siblings a copy of a finished prefill; returns, per running
/// sequence, whether it must sit this step out for its group's first member.
pub fn share_prefills(running: &mut [Sequence]) -> Vec<bool> {
    let mut wait = vec![false; running.len()];
    for i in 0..running.len() {
        let (Some(group), true) = (running[i].prefill_group, running[i].cache.is_empty()) else { continue };
        let keep = running[i].prompt.len().saturating_sub(1);
        let Some(first) = (0..i).find(|&j| running[j].prefill_group == Some(group)) else { continue };
        if keep == 0 {
            continue;
        }
        if running[first].is_prefilling() {
            wait[i] = true;
            continue;
        }
        let max_tokens = running[i].reservation();
        running[i].cache = running[first].cache.prefix(keep, max_tokens);
    }
    wait
}
