//! The adapters clients can name, in tiers: each is a folder on disk (any
//! number); its weights are resident in the form the kernels use while
//! recently used, within a byte budget (`--adapter-memory`) and a count
//! (`--max-loaded-adapters`). Least recently used weights that no request
//! holds are evicted past either bound and read again on next use.
//! Requests hold an `Arc` of the weights from the moment they are resolved
//! (before they queue), so unloading or evicting never disturbs a request
//! waiting or running, and the budget is exceeded only by weights in use.
//!
//! With `resolve` on, a name that is not registered is looked up as a
//! sub-folder of the roots on first use (vLLM's LoRA resolver idea).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use super::adapter::{self, BaseShapes};
use super::compositions::Compositions;
use super::files::AdapterFiles;
use super::loads::LoadThreads;
use super::merge::{self, Combination};
use super::{LoraError, MergeOptions};
use crate::model::lora::{AdapterWeights, Part};
use crate::prompt::defaults::Defaults;

#[derive(Debug, Clone)]
pub struct RegistryOptions {
    pub max_rank: usize,
    /// Adapters resident at once (0 = unbounded).
    pub max_loaded: usize,
    /// Bytes of adapter weights resident at once (0 = unbounded).
    pub memory_budget: u64,
    /// Folders runtime loads may read from (canonical paths).
    pub roots: Vec<PathBuf>,
    /// Names registered at once by runtime loads (0 = unbounded); names
    /// resolved from the roots are bounded by the folders there instead.
    pub max_adapters: usize,
    /// A name not registered is looked up under the roots on first use.
    pub resolve: bool,
    /// Adapters one request may compose (`adapters`).
    pub max_per_request: usize,
    /// Where load times are recorded (`tailor_adapter_load_seconds`,
    /// labelled with the served model's id).
    pub load_seconds: Option<prometheus::HistogramVec>,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        Self {
            max_rank: 64,
            max_loaded: 0,
            memory_budget: 0,
            roots: Vec::new(),
            max_adapters: 0,
            resolve: false,
            max_per_request: 8,
            load_seconds: None,
        }
    }
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
    /// Bytes of the resident weights.
    pub resident_bytes: u64,
    pub loads: u64,
    pub evictions: u64,
    /// Compositions merged into a new adapter (`linear`).
    pub merges: u64,
    /// Names looked up under the roots and found nowhere.
    pub resolve_misses: u64,
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
    /// Bytes of `resident` (0 when it is not).
    bytes: u64,
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
    load_seconds: Option<prometheus::Histogram>,
    /// Started on first use (most registries never read a cold adapter).
    load_threads: std::sync::OnceLock<LoadThreads>,
    inner: Mutex<Inner>,
    loads: AtomicU64,
    evictions: AtomicU64,
    resolve_misses: AtomicU64,
    compositions: Compositions,
    merges: AtomicU64,
}

#[derive(Default)]
struct Inner {
    entries: BTreeMap<String, Entry>,
    slots: BTreeMap<PathBuf, Slot>,
    /// Held while a folder is registered, so concurrent first uses of one
    /// adapter read it once.
    registering: BTreeMap<PathBuf, Arc<Mutex<()>>>,
    resident_bytes: u64,
    resident_count: usize,
    /// Merges kept after their last request (by address), with when they
    /// were last used: counted in `resident_bytes`, evicted like adapters.
    merges: BTreeMap<usize, (Arc<AdapterWeights>, u64)>,
    clock: u64,
}

impl Inner {
    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// Makes `weights` the folder's resident weights unless some are there
    /// already; returns the resident ones.
    fn install(&mut self, path: &Path, weights: Arc<AdapterWeights>) -> Arc<AdapterWeights> {
        let Some(slot) = self.slots.get_mut(path) else { return weights };
        if let Some(resident) = &slot.resident {
            return resident.clone();
        }
        slot.bytes = weights.bytes();
        slot.resident = Some(weights.clone());
        self.resident_bytes += slot.bytes;
        self.resident_count += 1;
        weights
    }

    fn drop_weights(&mut self, path: &Path) {
        let Some(slot) = self.slots.get_mut(path) else { return };
        if slot.resident.take().is_some() {
            self.resident_bytes -= slot.bytes;
            self.resident_count -= 1;
            slot.bytes = 0;
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave the maps half-written.
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl AdapterRegistry {
    /// The registry of the base model served as `model_id`.
    pub fn new(base: BaseShapes, options: RegistryOptions, model_id: &str) -> Self {
        Self {
            base,
            load_seconds: options.load_seconds.as_ref().map(|h| h.with_label_values(&[model_id])),
            load_threads: std::sync::OnceLock::new(),
            options,
            inner: Mutex::new(Inner::default()),
            loads: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            resolve_misses: AtomicU64::new(0),
            compositions: Compositions::default(),
            merges: AtomicU64::new(0),
        }
    }

    /// Registers an adapter folder under `name`, reading and checking its
    /// weights now. Runtime loads (`trusted` false) must lie under the
    /// roots, every file of them; start-up adapters may live anywhere. A
    /// folder already resident under another name is shared, not read again.
    pub fn register(&self, name: &str, path: &Path, trusted: bool) -> Result<(), LoraError> {
        self.add(name, path, trusted, Weights::ReadNow, !trusted)
    }

    /// Registers a folder whose weights are read (and checked) on first use:
    /// thousands of adapters are named at start in milliseconds.
    pub fn register_lazily(&self, name: &str, path: &Path, trusted: bool) -> Result<(), LoraError> {
        self.add(name, path, trusted, Weights::OnFirstUse, !trusted)
    }

    fn add(&self, name: &str, path: &Path, trusted: bool, weights: Weights, capped: bool) -> Result<(), LoraError> {
        validate_name(name)?;
        let path = std::fs::canonicalize(path)
            .map_err(|e| LoraError::Io(format!("cannot open adapter folder {}: {}", path.display(), e.kind())))?;
        if !trusted && !self.options.roots.iter().any(|root| path.starts_with(root)) {
            return Err(LoraError::OutsideRoots(path.display().to_string()));
        }
        let gate = {
            let mut inner = lock(&self.inner);
            if already(&inner, name, &path)? {
                return Ok(());
            }
            if capped {
                self.check_room(&inner)?;
            }
            inner.registering.entry(path.clone()).or_default().clone()
        };
        let result = {
            let _registering = lock(&gate);
            self.add_alone(name, &path, trusted, weights, capped)
        };
        let mut inner = lock(&self.inner);
        // The last one through removes the gate (the map's reference and ours).
        if Arc::strong_count(&gate) == 2 {
            inner.registering.remove(&path);
        }
        result
    }

    /// `add` while no one else registers the same folder.
    fn add_alone(
        &self,
        name: &str,
        path: &Path,
        trusted: bool,
        weights: Weights,
        capped: bool,
    ) -> Result<(), LoraError> {
        if already(&lock(&self.inner), name, path)? {
            return Ok(());
        }
        let files = self.files(path, trusted);
        let defaults = match files.read_text("tailor.toml")? {
            Some(text) => {
                crate::prompt::defaults::adapter_defaults(&text).map_err(|e| LoraError::Config(e.to_string()))?
            }
            None => Defaults::default(),
        };
        // Validate (and load) the weights unless this folder is resident.
        let shared = lock(&self.inner).slots.get(path).and_then(|s| s.resident.clone());
        let weights = match (shared, weights) {
            (Some(w), _) => Some(w),
            (None, Weights::ReadNow) => Some(Arc::new(self.read(&files)?)),
            (None, Weights::OnFirstUse) => None,
        };
        let mut inner = lock(&self.inner);
        if already(&inner, name, path)? {
            return Ok(());
        }
        if capped {
            self.check_room(&inner)?;
        }
        let clock = inner.tick();
        let slot = inner.slots.entry(path.to_path_buf()).or_insert_with(|| Slot {
            resident: None,
            bytes: 0,
            last_used: clock,
            trusted,
            loading: Arc::new(Mutex::new(())),
        });
        slot.trusted |= trusted;
        slot.last_used = clock;
        if let Some(weights) = weights {
            inner.install(path, weights);
        }
        let entry = Entry { path: path.to_path_buf(), generation: clock, defaults, created: crate::ids::unix_now() };
        inner.entries.insert(name.to_string(), entry);
        self.evict(&mut inner);
        Ok(())
    }

    /// Whether `name` is registered, or (with `resolve` on) names a folder
    /// under the roots holding an adapter. Checks the name before touching
    /// any file; reads nothing.
    pub fn exists(&self, name: &str) -> Result<bool, LoraError> {
        Ok(!matches!(self.locate(name)?, Located::Nowhere))
    }

    /// Registers `name` from the roots if it is not registered (its weights
    /// are read by `get`). `Ok(false)` when it is found nowhere.
    fn resolve(&self, name: &str) -> Result<bool, LoraError> {
        match self.locate(name)? {
            Located::Registered => Ok(true),
            Located::Folder(dir) => self.add(name, &dir, false, Weights::OnFirstUse, false).map(|()| true),
            Located::Nowhere => Ok(false),
        }
    }

    /// Where `name` is: registered, a folder under the roots (resolution
    /// on, the name checked first), or nowhere (a miss, counted).
    fn locate(&self, name: &str) -> Result<Located, LoraError> {
        if self.contains(name) {
            return Ok(Located::Registered);
        }
        if !self.options.resolve {
            return Ok(Located::Nowhere);
        }
        validate_name(name)?;
        let found =
            self.options.roots.iter().map(|root| root.join(name)).find(|dir| dir.join("adapter_config.json").is_file());
        Ok(match found {
            Some(dir) => Located::Folder(dir),
            None => {
                self.resolve_misses.fetch_add(1, Ordering::Relaxed);
                Located::Nowhere
            }
        })
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
        let started = Instant::now();
        let weights = adapter::load_files(files, &self.base, self.options.max_rank)?;
        self.loads.fetch_add(1, Ordering::Relaxed);
        if let Some(histogram) = &self.load_seconds {
            histogram.observe(started.elapsed().as_secs_f64());
        }
        Ok(weights)
    }

    pub fn unregister(&self, name: &str) -> Result<(), LoraError> {
        let mut inner = lock(&self.inner);
        let entry = inner.entries.remove(name).ok_or_else(|| LoraError::NotFound(name.to_string()))?;
        if !inner.entries.values().any(|e| e.path == entry.path) {
            // Kept merges of its weights go with it (requests holding one keep theirs).
            if let Some(weights) = inner.slots.get(&entry.path).and_then(|s| s.resident.clone()) {
                let made_of = |m: &AdapterWeights| m.merged_from.iter().any(|p| Arc::ptr_eq(p, &weights));
                let stale: Vec<usize> = inner.merges.iter().filter(|(_, (m, _))| made_of(m)).map(|(a, _)| *a).collect();
                for address in stale {
                    if let Some((merged, _)) = inner.merges.remove(&address) {
                        inner.resident_bytes -= merged.bytes();
                    }
                }
            }
            inner.drop_weights(&entry.path);
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

    /// The composition of `parts` (loaded single adapters, each with its
    /// weight): the one requests in flight already share, or a new one —
    /// un-merged for `cat`, merged here (call it off the async workers) for
    /// the others.
    pub fn compose(&self, parts: Vec<Part>, options: &MergeOptions) -> Result<Arc<AdapterWeights>, LoraError> {
        let combination = options.combination_type;
        let dora = parts.iter().any(|p| p.adapter.is_dora());
        if dora && (parts.len() > 1 || combination != Combination::Cat) {
            return Err(LoraError::Unsupported(
                "DoRA in a composition (a DoRA adapter is served alone, at any weight, un-merged)".into(),
            ));
        }
        // DoRA at a weight other than 1 (or 0, which leaves it out) has
        // norms of its own, computed like a merge.
        let dora_weighted = dora && ![0.0, 1.0].contains(&parts[0].factor);
        if combination == Combination::Cat && !dora_weighted {
            return self.compositions.get_or_make(parts).map_err(|module| {
                LoraError::Unsupported(format!("two of these adapters replace `{module}` (modules_to_save)"))
            });
        }
        let key = super::compositions::key(options, &parts);
        if let Some(shared) = self.compositions.get(&key) {
            self.keep(&shared);
            return Ok(shared);
        }
        let made = match dora_weighted {
            true => super::dora::at_weight(&parts[0].adapter, parts[0].factor, &self.base)?,
            false => merge::merge(&parts, &self.base, options)?,
        };
        // Two first requests at once may both merge (milliseconds); the
        // first stored is shared, and only it is counted.
        let (merged, stored) = self.compositions.share(key, Arc::new(made));
        if stored {
            self.merges.fetch_add(1, Ordering::Relaxed);
        }
        self.keep(&merged);
        Ok(merged)
    }

    /// Keeps a merge after its requests end, within the memory budget (it
    /// holds its parts, so they stay too until it goes).
    fn keep(&self, merged: &Arc<AdapterWeights>) {
        let mut inner = lock(&self.inner);
        let clock = inner.tick();
        let address = Arc::as_ptr(merged) as usize;
        if let Some(kept) = inner.merges.get_mut(&address) {
            kept.1 = clock;
            return;
        }
        inner.resident_bytes += merged.bytes();
        inner.merges.insert(address, (merged.clone(), clock));
        self.evict(&mut inner);
    }

    /// Adapters one request may compose.
    pub fn max_per_request(&self) -> usize {
        self.options.max_per_request
    }

    /// Adapters resident at once (0 = unbounded).
    pub fn max_loaded(&self) -> usize {
        self.options.max_loaded
    }

    /// Bytes of weights kept resident when no request holds them (0 = unbounded).
    pub fn memory_budget(&self) -> u64 {
        self.options.memory_budget
    }

    pub fn counts(&self) -> AdapterCounts {
        let mut inner = lock(&self.inner);
        // Weights released since the last load go now, so an idle server
        // is within its budget whenever it is looked at.
        self.evict(&mut inner);
        AdapterCounts {
            registered: inner.entries.len(),
            resident: inner.resident_count,
            resident_bytes: inner.resident_bytes,
            loads: self.loads.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            merges: self.merges.load(Ordering::Relaxed),
            resolve_misses: self.resolve_misses.load(Ordering::Relaxed),
        }
    }

    /// The weights of `name`, read from disk if they are not resident (by
    /// one caller; concurrent ones wait for its result); a name not
    /// registered is resolved from the roots first when that is on. `None`
    /// when no adapter has that name.
    pub fn get(&self, name: &str) -> Result<Option<Arc<AdapterWeights>>, LoraError> {
        if !self.resolve(name)? {
            return Ok(None);
        }
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
                let weights = inner.install(&path, weights);
                self.evict(&mut inner);
                Ok(Some(weights))
            }
            // Unloaded while we read: the request gets what it asked for.
            None => Ok(Some(weights)),
        }
    }

    /// `register` on the adapter load threads (below the engine's priority).
    pub async fn register_off_engine(
        self: &Arc<Self>,
        name: &str,
        path: &Path,
        trusted: bool,
    ) -> Result<(), LoraError> {
        let (name, path) = (name.to_string(), path.to_path_buf());
        self.off_engine(move |registry| registry.register(&name, &path, trusted)).await
    }

    /// Runs `work` on the load threads (started on first use).
    async fn off_engine<T: Send + 'static>(
        self: &Arc<Self>,
        work: impl FnOnce(&Self) -> Result<T, LoraError> + Send + 'static,
    ) -> Result<T, LoraError> {
        let registry = self.clone();
        self.load_threads
            .get_or_init(|| LoadThreads::new(LOAD_THREADS))
            .run(move || work(&registry))
            .await
            .map_err(|_| LoraError::Io("the adapter load failed unexpectedly".into()))?
    }

    /// `get` on the adapter load threads (below the engine's priority).
    pub async fn get_off_engine(self: &Arc<Self>, name: &str) -> Result<Option<Arc<AdapterWeights>>, LoraError> {
        // Resident weights are handed over at once, never queued behind a cold load.
        if let Some((_, Ok(weights))) = self.resident_or_lock(name) {
            return Ok(Some(weights));
        }
        let name = name.to_string();
        self.off_engine(move |registry| registry.get(&name)).await
    }

    /// For a registered name: its folder, and its resident weights or the
    /// lock to hold while reading them.
    #[allow(clippy::type_complexity)]
    fn resident_or_lock(&self, name: &str) -> Option<(PathBuf, Result<Arc<AdapterWeights>, Arc<Mutex<()>>>)> {
        let mut inner = lock(&self.inner);
        // Weights released since the last load may now go (cheap when within bounds).
        self.evict(&mut inner);
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

    /// Drops least recently used weights (an adapter's or a kept merge's)
    /// that no request holds until both bounds hold (or only weights in use
    /// are left).
    fn evict(&self, inner: &mut Inner) {
        let (max, budget) = (self.options.max_loaded, self.options.memory_budget);
        while (max > 0 && inner.resident_count > max) || (budget > 0 && inner.resident_bytes > budget) {
            // Only weights no request holds (strong count 1: ours) may go; a
            // kept merge holds its parts, so they go after it.
            let adapter = inner
                .slots
                .iter()
                .filter(|(_, s)| s.resident.as_ref().is_some_and(|w| Arc::strong_count(w) == 1))
                .min_by_key(|(_, s)| s.last_used)
                .map(|(path, s)| (s.last_used, path.clone()));
            let merge = inner
                .merges
                .iter()
                .filter(|(_, (w, _))| Arc::strong_count(w) == 1)
                .min_by_key(|(_, (_, used))| *used)
                .map(|(address, (_, used))| (*used, *address));
            match (adapter, merge) {
                (Some((used, path)), merge) if merge.is_none_or(|(m, _)| used < m) => {
                    tracing::debug!(adapter = %path.display(), "evicting adapter weights (least recently used)");
                    inner.drop_weights(&path);
                }
                (_, Some((_, address))) => {
                    if let Some((merged, _)) = inner.merges.remove(&address) {
                        tracing::debug!(bytes = merged.bytes(), "evicting a merge (least recently used)");
                        inner.resident_bytes -= merged.bytes();
                    }
                }
                _ => return,
            }
            self.evictions.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Threads reading adapters at once: two keep a slow disk from
/// serializing loads without taking more than the engine's spare time.
const LOAD_THREADS: usize = 2;

/// Where a name was found by `locate`.
enum Located {
    Registered,
    Folder(PathBuf),
    Nowhere,
}

/// How `add` treats the weights of a folder not resident yet.
#[derive(Clone, Copy)]
enum Weights {
    ReadNow,
    OnFirstUse,
}

/// Whether `name` is registered for `path` already (an error if for another).
fn already(inner: &Inner, name: &str, path: &Path) -> Result<bool, LoraError> {
    match inner.entries.get(name) {
        Some(existing) if existing.path == path => Ok(true),
        Some(_) => Err(LoraError::NameTaken(name.to_string())),
        None => Ok(false),
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

#[cfg(test)]
mod tiers {
    use super::*;
    use crate::lora::config::Module;
    use crate::lora::random::{self, RandomAdapters};
    use crate::model::random::RandomSource;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    /// `count` rank-4 adapters `a0..` under a fresh root, and the base they fit.
    fn root(count: usize) -> Result<(tempfile::TempDir, PathBuf, BaseShapes), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = std::fs::canonicalize(dir.path())?;
        let base = BaseShapes::of(&RandomSource::tiny_config(64));
        let spec =
            RandomAdapters { prefix: "a".into(), count, ranks: (4, 4), modules: vec![Module::Q, Module::V], seed: 1 };
        random::write(&path, &base, &spec)?;
        Ok((dir, path, base))
    }

    fn registry(base: &BaseShapes, root: &Path, budget: u64) -> AdapterRegistry {
        let options = RegistryOptions {
            memory_budget: budget,
            roots: vec![root.to_path_buf()],
            resolve: true,
            ..Default::default()
        };
        AdapterRegistry::new(base.clone(), options, "tiny")
    }

    #[test]
    fn names_resolve_from_the_roots_on_first_use_and_nothing_else_does() -> TestResult {
        let (_dir, path, base) = root(2)?;
        let reg = registry(&base, &path, 0);
        assert!(reg.list().is_empty());
        assert!(reg.exists("a1")?);
        assert_eq!(reg.counts().loads, 0, "exists reads nothing");
        let weights = reg.get("a1")?.ok_or("a1 resolves")?;
        assert_eq!(reg.list().iter().map(|a| a.name.as_str()).collect::<Vec<_>>(), ["a1"]);
        assert_eq!(reg.counts().loads, 1);
        assert_eq!(reg.counts().resident_bytes, weights.bytes());
        assert!(reg.get("missing")?.is_none());
        assert!(!reg.exists("missing")?);
        assert_eq!((reg.counts().loads, reg.counts().resolve_misses, reg.counts().registered), (1, 2, 1));
        for bad in ["../a1", "a/b", "..", "x/../a1"] {
            assert!(matches!(reg.get(bad), Err(LoraError::BadName(_))), "{bad}");
            assert!(matches!(reg.exists(bad), Err(LoraError::BadName(_))), "{bad}");
        }
        // Off by default.
        let off = AdapterRegistry::new(base, RegistryOptions { roots: vec![path], ..Default::default() }, "tiny");
        assert!(off.get("a1")?.is_none());
        assert!(!off.exists("../x")?, "without resolution a name is only looked up, never checked as a path");
        Ok(())
    }

    #[test]
    fn the_byte_budget_holds_and_weights_in_use_are_never_evicted() -> TestResult {
        let (_dir, path, base) = root(20)?;
        let one = registry(&base, &path, 0).get("a0")?.ok_or("a0")?.bytes();
        let reg = registry(&base, &path, 3 * one);
        let held = reg.get("a0")?.ok_or("a0")?;
        for round in 0..2 {
            for i in 1..20 {
                let w = reg.get(&format!("a{i}"))?.ok_or("resolves")?;
                let counts = reg.counts();
                // In use: a0 and w; the rest within the budget.
                assert!(counts.resident_bytes <= 3 * one + 2 * one, "round {round} a{i}: {counts:?}");
                drop(w);
                assert!(reg.counts().resident_bytes <= 3 * one.max(1), "{:?}", reg.counts());
            }
        }
        // a0 was held throughout: still resident, the very same weights, never read again.
        let again = reg.get("a0")?.ok_or("a0")?;
        assert!(Arc::ptr_eq(&held, &again));
        let counts = reg.counts();
        assert_eq!(counts.loads, 1 + 2 * 19, "{counts:?}");
        assert!(counts.evictions >= 2 * 19 - 3, "{counts:?}");
        assert_eq!(counts.registered, 20);
        Ok(())
    }

    #[test]
    fn a_merge_outlives_its_requests_within_the_budget_and_is_evicted_past_it() -> TestResult {
        let (_dir, path, base) = root(12)?;
        let one = registry(&base, &path, 0).get("a0")?.ok_or("a0")?.bytes();
        // Room for the two parts and their merge, not for much more.
        let reg = registry(&base, &path, 3 * one + one / 2);
        let linear = MergeOptions { combination_type: Combination::Linear, ..Default::default() };
        let parts = |reg: &AdapterRegistry| -> Result<Vec<Part>, Box<dyn std::error::Error>> {
            let part = |name: &str| -> Result<Part, Box<dyn std::error::Error>> {
                Ok(Part { adapter: reg.get(name)?.ok_or("resolves")?, factor: 0.5 })
            };
            Ok(vec![part("a0")?, part("a1")?])
        };
        let first = Arc::as_ptr(&reg.compose(parts(&reg)?, &linear)?) as usize;
        // No request holds it now: kept, so the next request finds it.
        let again = reg.compose(parts(&reg)?, &linear)?;
        assert_eq!(Arc::as_ptr(&again) as usize, first);
        assert_eq!(reg.counts().merges, 1);
        assert_eq!(reg.counts().resident_bytes, 2 * one + again.bytes());
        drop(again);
        // Other adapters' use pushes it out (and then its parts).
        for i in 2..12 {
            reg.get(&format!("a{i}"))?.ok_or("resolves")?;
        }
        assert!(reg.counts().resident_bytes <= 3 * one + one / 2, "{:?}", reg.counts());
        reg.compose(parts(&reg)?, &linear)?;
        assert_eq!(reg.counts().merges, 2, "merged again once evicted");
        // Unloading a part takes its kept merges with it.
        let before = reg.counts().resident_bytes;
        reg.unregister("a1")?;
        // a1's weights and the merge (rank 4 on q and v like each part: one adapter's bytes).
        assert_eq!(reg.counts().resident_bytes, before - 2 * one, "{:?}", reg.counts());
        Ok(())
    }

    #[test]
    fn concurrent_first_uses_of_one_adapter_read_it_once() -> TestResult {
        let (_dir, path, base) = root(1)?;
        let reg = Arc::new(registry(&base, &path, 0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let reg = reg.clone();
                std::thread::spawn(move || reg.get("a0").map(|w| w.map(|w| Arc::as_ptr(&w) as usize)))
            })
            .collect();
        let mut seen = Vec::new();
        for t in threads {
            seen.push(t.join().map_err(|_| "thread panicked")??.ok_or("a0")?);
        }
        seen.dedup();
        assert_eq!(seen.len(), 1, "every caller got the same weights");
        assert_eq!(reg.counts().loads, 1);
        assert_eq!(reg.counts().registered, 1);
        Ok(())
    }

    #[test]
    fn lazily_registered_adapters_are_read_on_first_use() -> TestResult {
        let (_dir, path, base) = root(2)?;
        let reg = registry(&base, &path, 0);
        reg.register_lazily("first", &path.join("a0"), true)?;
        reg.register_lazily("second", &path.join("a1"), true)?;
        assert_eq!((reg.counts().registered, reg.counts().loads), (2, 0));
        assert!(reg.get("second")?.is_some());
        assert_eq!((reg.counts().loads, reg.counts().resident), (1, 1));
        Ok(())
    }
}
