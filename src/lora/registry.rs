//! The adapters clients can name: each is a folder on disk; its weights are
//! resident while recently used. Least recently used adapters that no
//! sequence holds are evicted past `max_loaded` and reloaded on next use.
//! Requests hold an `Arc` of the weights, so unloading or evicting never
//! disturbs a generation in flight.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::adapter::{self, BaseShapes};
use super::files::AdapterFiles;
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
    /// Names registered at once (0 = unbounded).
    pub max_adapters: usize,
}

/// What `/v1/models` shows of an adapter.
#[derive(Debug, Clone)]
pub struct AdapterInfo {
    pub name: String,
    pub path: PathBuf,
    pub created: u64,
}

/// Totals for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AdapterCounts {
    pub registered: usize,
    pub resident: usize,
    pub loads: u64,
    pub evictions: u64,
}

struct Entry {
    path: PathBuf,
    /// Distinct for every registration (a reload is a new adapter).
    generation: u64,
    /// The adapter's own request defaults (`tailor.toml` beside its config).
    defaults: Defaults,
    created: u64,
}

/// The weights of one folder, however many names point at it.
struct Slot {
    resident: Option<Arc<AdapterWeights>>,
    last_used: u64,
    /// Start-up adapters may follow links anywhere; runtime ones not.
    trusted: bool,
    /// Held while the weights are read, so N requests for an evicted
    /// adapter read it once.
    loading: Arc<Mutex<()>>,
}

pub struct AdapterRegistry {
    base: BaseShapes,
    options: RegistryOptions,
    inner: Mutex<Inner>,
    loads: AtomicU64,
    evictions: AtomicU64,
}

#[derive(Default)]
struct Inner {
    entries: BTreeMap<String, Entry>,
    slots: BTreeMap<PathBuf, Slot>,
    clock: u64,
}

impl Inner {
    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave the maps half-written.
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl AdapterRegistry {
    pub fn new(base: BaseShapes, options: RegistryOptions) -> Self {
        Self {
            base,
            options,
            inner: Mutex::new(Inner::default()),
            loads: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
        }
    }

    /// Registers an adapter folder under `name`. Runtime loads (`trusted`
    /// false) must lie under the roots, every file of them; start-up
    /// adapters may live anywhere. A folder already resident under another
    /// name is shared, not read again.
    pub fn register(&self, name: &str, path: &Path, trusted: bool) -> Result<(), LoraError> {
        validate_name(name)?;
        let path = std::fs::canonicalize(path)
            .map_err(|e| LoraError::Io(format!("cannot open adapter folder {}: {}", path.display(), e.kind())))?;
        if !trusted && !self.options.roots.iter().any(|root| path.starts_with(root)) {
            return Err(LoraError::OutsideRoots(path.display().to_string()));
        }
        {
            let inner = lock(&self.inner);
            if let Some(existing) = inner.entries.get(name) {
                return if existing.path == path { Ok(()) } else { Err(LoraError::NameTaken(name.to_string())) };
            }
            self.check_room(&inner)?;
        }
        let files = self.files(&path, trusted);
        let defaults = match files.read_text("tailor.toml")? {
            Some(text) => {
                crate::prompt::defaults::adapter_defaults(&text).map_err(|e| LoraError::Config(e.to_string()))?
            }
            None => Defaults::default(),
        };
        // Validate (and load) the weights unless this folder is resident.
        let shared = lock(&self.inner).slots.get(&path).and_then(|s| s.resident.clone());
        let weights = match shared {
            Some(w) => w,
            None => Arc::new(self.read(&files)?),
        };
        let mut inner = lock(&self.inner);
        if inner.entries.contains_key(name) {
            return Err(LoraError::NameTaken(name.to_string()));
        }
        self.check_room(&inner)?;
        let clock = inner.tick();
        let slot = inner.slots.entry(path.clone()).or_insert_with(|| Slot {
            resident: None,
            last_used: clock,
            trusted,
            loading: Arc::new(Mutex::new(())),
        });
        slot.trusted |= trusted;
        slot.last_used = clock;
        slot.resident.get_or_insert(weights);
        let generation = clock;
        inner.entries.insert(name.to_string(), Entry { path, generation, defaults, created: crate::ids::unix_now() });
        self.evict(&mut inner);
        Ok(())
    }

    fn check_room(&self, inner: &Inner) -> Result<(), LoraError> {
        let max = self.options.max_adapters;
        if max > 0 && inner.entries.len() >= max {
            return Err(LoraError::Full(max));
        }
        Ok(())
    }

    fn files<'a>(&'a self, path: &'a Path, trusted: bool) -> AdapterFiles<'a> {
        if trusted {
            AdapterFiles::trusted(path)
        } else {
            AdapterFiles::under_roots(path, &self.options.roots)
        }
    }

    fn read(&self, files: &AdapterFiles) -> Result<AdapterWeights, LoraError> {
        let weights = adapter::load_files(files, &self.base, self.options.max_rank)?;
        self.loads.fetch_add(1, Ordering::Relaxed);
        Ok(weights)
    }

    pub fn unregister(&self, name: &str) -> Result<(), LoraError> {
        let mut inner = lock(&self.inner);
        let entry = inner.entries.remove(name).ok_or_else(|| LoraError::NotFound(name.to_string()))?;
        if !inner.entries.values().any(|e| e.path == entry.path) {
            inner.slots.remove(&entry.path);
        }
        Ok(())
    }

    /// The adapter's `tailor.toml` defaults (empty when it has none).
    pub fn defaults(&self, name: &str) -> Option<Defaults> {
        lock(&self.inner).entries.get(name).map(|e| e.defaults.clone())
    }

    /// Changes whenever `name` is registered anew.
    pub fn generation(&self, name: &str) -> Option<u64> {
        lock(&self.inner).entries.get(name).map(|e| e.generation)
    }

    pub fn contains(&self, name: &str) -> bool {
        lock(&self.inner).entries.contains_key(name)
    }

    /// The largest rank this server loads (`--max-lora-rank`).
    pub fn max_rank(&self) -> usize {
        self.options.max_rank
    }

    /// Adapters resident at once (0 = unbounded).
    pub fn max_loaded(&self) -> usize {
        self.options.max_loaded
    }

    pub fn counts(&self) -> AdapterCounts {
        let inner = lock(&self.inner);
        AdapterCounts {
            registered: inner.entries.len(),
            resident: inner.slots.values().filter(|s| s.resident.is_some()).count(),
            loads: self.loads.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
        }
    }

    /// The weights of `name`, read from disk again if they were evicted (by
    /// one caller; concurrent ones wait for its result). `None` when no
    /// adapter has that name.
    pub fn get(&self, name: &str) -> Result<Option<Arc<AdapterWeights>>, LoraError> {
        let Some((path, loading)) = self.resident_or_lock(name) else { return Ok(None) };
        let loading = match loading {
            Ok(weights) => return Ok(Some(weights)),
            Err(loading) => loading,
        };
        let _reading = lock(&loading);
        // Someone may have read it while we waited for the lock.
        let trusted = match self.resident_or_lock(name) {
            None => return Ok(None),
            Some((_, Ok(weights))) => return Ok(Some(weights)),
            Some((p, Err(_))) if p != path => return self.get(name), // re-registered meanwhile
            Some(_) => lock(&self.inner).slots.get(&path).is_some_and(|s| s.trusted),
        };
        let weights = Arc::new(self.read(&self.files(&path, trusted))?);
        let mut inner = lock(&self.inner);
        let clock = inner.tick();
        match inner.slots.get_mut(&path) {
            Some(slot) => {
                slot.last_used = clock;
                let weights = slot.resident.get_or_insert(weights).clone();
                self.evict(&mut inner);
                Ok(Some(weights))
            }
            // Unloaded while we read: the request gets what it asked for.
            None => Ok(Some(weights)),
        }
    }

    /// For a registered name: its folder, and its resident weights or the
    /// lock to hold while reading them.
    #[allow(clippy::type_complexity)]
    fn resident_or_lock(&self, name: &str) -> Option<(PathBuf, Result<Arc<AdapterWeights>, Arc<Mutex<()>>>)> {
        let mut inner = lock(&self.inner);
        let clock = inner.tick();
        let path = inner.entries.get(name)?.path.clone();
        let slot = inner.slots.get_mut(&path)?;
        slot.last_used = clock;
        let found = match &slot.resident {
            Some(weights) => Ok(weights.clone()),
            None => Err(slot.loading.clone()),
        };
        Some((path, found))
    }

    pub fn list(&self) -> Vec<AdapterInfo> {
        lock(&self.inner)
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
            let resident = inner.slots.values().filter(|s| s.resident.is_some()).count();
            if resident <= max {
                return;
            }
            // Only weights no sequence holds (strong count 1: ours) may go.
            let victim = inner
                .slots
                .iter_mut()
                .filter(|(_, s)| s.resident.as_ref().is_some_and(|w| Arc::strong_count(w) == 1))
                .min_by_key(|(_, s)| s.last_used);
            match victim {
                Some((path, slot)) => {
                    tracing::info!(adapter = %path.display(), "evicting adapter weights (least recently used)");
                    slot.resident = None;
                    self.evictions.fetch_add(1, Ordering::Relaxed);
                }
                None => return,
            }
        }
    }
}

/// Adapter names are model ids: a safe, path-free character set (`:` for
/// fine-tuned ids, `ft:<base>:<suffix>:<job>`).
pub fn validate_name(name: &str) -> Result<(), LoraError> {
    if crate::ids::is_model_name(name) {
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
        for good in ["pirate", "support-bot_v2", "a.b", "X9", "ft:SmolLM2-135M-Instruct.Q4_1:pirate:ftjob-0a1b"] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in ["", "../x", "a/b", ".hidden", "-x", ":x", "a..b", "naïve", &"x".repeat(129)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }
}
