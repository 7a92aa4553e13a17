//! Weighted compositions of adapters, shared while in use: requests that
//! compose the same loaded adapters with the same weights and combination
//! get one `AdapterWeights` (un-merged, or merged once), so the engine
//! batches their deltas together and their prompts share cached prefixes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use super::{MergeKey, MergeOptions};
use crate::model::lora::{AdapterWeights, Part};

/// A composition's identity: its combination and the options it reads, and
/// each part's weights (by address: a live composition or merge holds its
/// parts, so a live entry's addresses are its parts') and its factor's bits.
type Key = (MergeKey, Vec<(usize, u32)>);

pub(crate) fn key(options: &MergeOptions, parts: &[Part]) -> Key {
    (options.key(), parts.iter().map(|p| (Arc::as_ptr(&p.adapter) as usize, p.factor.to_bits())).collect())
}

#[derive(Default)]
pub(crate) struct Compositions {
    /// Compositions some request still holds; dead entries are swept as
    /// new ones are made.
    live: Mutex<HashMap<Key, Weak<AdapterWeights>>>,
}

impl Compositions {
    /// The un-merged composition of `parts` (Err: a module two replace).
    pub(crate) fn get_or_make(&self, parts: Vec<Part>) -> Result<Arc<AdapterWeights>, String> {
        let key = key(&MergeOptions::default(), &parts);
        Ok(self.share(key, Arc::new(AdapterWeights::composed(parts)?)).0)
    }

    /// The composition under `key` that some request holds.
    pub(crate) fn get(&self, key: &Key) -> Option<Arc<AdapterWeights>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).get(key).and_then(Weak::upgrade)
    }

    /// `made` under `key`, unless another is there already (then that one,
    /// and false: `made` was not needed).
    pub(crate) fn share(&self, key: Key, made: Arc<AdapterWeights>) -> (Arc<AdapterWeights>, bool) {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(shared) = live.get(&key).and_then(Weak::upgrade) {
            return (shared, false);
        }
        live.retain(|_, c| c.strong_count() > 0);
        live.insert(key, Arc::downgrade(&made));
        (made, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_parts_and_weights_share_one_composition_while_it_lives() {
        let (a, b) = (Arc::new(AdapterWeights::default()), Arc::new(AdapterWeights::default()));
        let part = |w: &Arc<AdapterWeights>, factor| Part { adapter: w.clone(), factor };
        let made = Compositions::default();
        let first = made.get_or_make(vec![part(&a, 0.5), part(&b, 1.0)]).expect("no saved modules");
        assert!(Arc::ptr_eq(&first, &made.get_or_make(vec![part(&a, 0.5), part(&b, 1.0)]).expect("no saved modules")));
        assert!(!Arc::ptr_eq(
            &first,
            &made.get_or_make(vec![part(&a, 0.25), part(&b, 1.0)]).expect("no saved modules")
        ));
        assert!(!Arc::ptr_eq(&first, &made.get_or_make(vec![part(&b, 1.0), part(&a, 0.5)]).expect("no saved modules")));
        // Held only by its holders: once they are gone, the parts are free.
        let weak = Arc::downgrade(&first);
        drop(first);
        assert!(weak.upgrade().is_none());
        assert_eq!(Arc::strong_count(&a), 1);
    }
}
