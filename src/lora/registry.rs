//! The adapters clients can name: each is a folder on disk; its weights are
//! resident while recently used. Least recently used adapters that no
//! sequence holds are evicted past `max_loaded` and reloaded on next use.
//! Requests hold an `Arc` of the weights, so unloading or evicting never
//! disturbs a generation in flight.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use super::adapter::{self, BaseShapes};
use super::LoraError;
use crate::model::lora::AdapterWeights;
use crate::prompt::defaults::Defaults;

#[derive(Debug, Clone)]
pub struct RegistryOptions {
    pub max_rank: usize,
    /// Adapters resident at once (0 = unbounded).
    pub max_loaded: usize,
    /// Folders runtime loads may read from (canonical paths).
    pub roots: Vec<PathBuf>,
}

/// What `/v1/models` shows of an adapter.
#[derive(Debug, Clone)]
pub struct AdapterInfo {
    pub name: String,
    pub path: PathBuf,
    pub created: u64,
}

struct Entry {
    path: PathBuf,
    /// The adapter's own request defaults (`tailor.toml` beside its config).
    defaults: Defaults,
    created: u64,
    resident: Option<Arc<AdapterWeights>>,
    last_used: u64,
}

pub struct AdapterRegistry {
    base: BaseShapes,
    options: RegistryOptions,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    entries: BTreeMap<String, Entry>,
    clock: u64,
}

impl AdapterRegistry {
    pub fn new(base: BaseShapes, options: RegistryOptions) -> Self {
        Self { base, options, inner: Mutex::new(Inner::default()) }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the map half-written.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Loads and registers an adapter. `checked_path` runtime loads must lie
    /// under the roots; start-up adapters (`trusted`) may live anywhere.
    pub fn register(&self, name: &str, path: &Path, trusted: bool) -> Result<(), LoraError> {
        validate_name(name)?;
        let path = std::fs::canonicalize(path).map_err(|e| LoraError::Io(format!("{}: {e}", path.display())))?;
        if !trusted && !self.options.roots.iter().any(|root| path.starts_with(root)) {
            return Err(LoraError::OutsideRoots(path.display().to_string()));
        }
        if let Some(existing) = self.lock().entries.get(name) {
            if existing.path == path {
                return Ok(());
            }
            return Err(LoraError::NameTaken(name.to_string()));
        }
        let weights = Arc::new(adapter::load(&path, &self.base, self.options.max_rank)?);
        let defaults = crate::prompt::presets::adapter_defaults(&path).map_err(|e| LoraError::Config(e.to_string()))?;
        let mut inner = self.lock();
        if inner.entries.contains_key(name) {
            return Err(LoraError::NameTaken(name.to_string()));
        }
        inner.clock += 1;
        let clock = inner.clock;
        inner.entries.insert(
            name.to_string(),
            Entry { path, defaults, created: crate::api::unix_now(), resident: Some(weights), last_used: clock },
        );
        self.evict(&mut inner);
        Ok(())
    }

    pub fn unregister(&self, name: &str) -> Result<(), LoraError> {
        self.lock().entries.remove(name).map(|_| ()).ok_or_else(|| LoraError::NotFound(name.to_string()))
    }

    /// The adapter's `tailor.toml` defaults (empty when it has none).
    pub fn defaults(&self, name: &str) -> Option<Defaults> {
        self.lock().entries.get(name).map(|e| e.defaults.clone())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.lock().entries.contains_key(name)
    }

    /// The weights of `name`, read from disk again if they were evicted.
    /// `None` when no adapter has that name.
    pub fn get(&self, name: &str) -> Result<Option<Arc<AdapterWeights>>, LoraError> {
        let path = {
            let mut inner = self.lock();
            inner.clock += 1;
            let clock = inner.clock;
            let Some(entry) = inner.entries.get_mut(name) else {
                return Ok(None);
            };
            entry.last_used = clock;
            if let Some(weights) = &entry.resident {
                return Ok(Some(weights.clone()));
            }
            entry.path.clone()
        };
        // Read outside the lock: other requests keep resolving meanwhile.
        let weights = Arc::new(adapter::load(&path, &self.base, self.options.max_rank)?);
        let mut inner = self.lock();
        match inner.entries.get_mut(name) {
            Some(entry) if entry.path == path => {
                let weights = entry.resident.get_or_insert(weights).clone();
                self.evict(&mut inner);
                Ok(Some(weights))
            }
            // Unloaded (or replaced) while we read: the request gets what it asked for.
            _ => Ok(Some(weights)),
        }
    }

    pub fn list(&self) -> Vec<AdapterInfo> {
        self.lock()
            .entries
            .iter()
            .map(|(name, e)| AdapterInfo { name: name.clone(), path: e.path.clone(), created: e.created })
            .collect()
    }

    fn evict(&self, inner: &mut Inner) {
        let max = self.options.max_loaded;
        if max == 0 {
            return;
        }
        loop {
            let resident = inner.entries.values().filter(|e| e.resident.is_some()).count();
            if resident <= max {
                return;
            }
            // Only weights no sequence holds (strong count 1: ours) may go.
            let victim = inner
                .entries
                .iter_mut()
                .filter(|(_, e)| e.resident.as_ref().is_some_and(|w| Arc::strong_count(w) == 1))
                .min_by_key(|(_, e)| e.last_used);
            match victim {
                Some((name, entry)) => {
                    tracing::info!(adapter = %name, "evicting adapter weights (least recently used)");
                    entry.resident = None;
                }
                None => return,
            }
        }
    }
}

/// Adapter names are model ids: a safe, path-free character set.
pub fn validate_name(name: &str) -> Result<(), LoraError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        && !name.contains("..");
    if ok {
        Ok(())
    } else {
        Err(LoraError::BadName(name.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_restricted() {
        for good in ["pirate", "support-bot_v2", "a.b", "X9"] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in ["", "../x", "a/b", ".hidden", "-x", "a..b", "naïve", &"x".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }
}
