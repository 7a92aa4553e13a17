//! What the data directory may hold: caps on files, queued jobs and stored
//! bytes, and the free space kept on its disk, checked before anything is
//! written so uploads and jobs stop with a clear error, not a full disk.

use std::path::Path;

use super::FineTuneError;
use crate::train::limits::show_bytes;

#[derive(Debug, Clone)]
pub struct StorageLimits {
    /// Uploaded files kept at once (`--max-files`).
    pub max_files: usize,
    /// Jobs queued or running at once (`--max-queued-jobs`).
    pub max_queued_jobs: usize,
    /// Bytes the data directory may hold (`--max-stored-bytes`; 0: no cap).
    pub max_stored_bytes: u64,
    /// Bytes left free on its disk (`--min-free-disk`).
    pub min_free_bytes: u64,
}

impl Default for StorageLimits {
    fn default() -> Self {
        Self { max_files: 10_000, max_queued_jobs: 100, max_stored_bytes: 0, min_free_bytes: 1 << 30 }
    }
}

/// Room a new job is assumed to need before its run says more (its folder,
/// events and a small adapter).
pub const JOB_BYTES: u64 = 16 << 20;

impl StorageLimits {
    /// Whether `bytes` more fit in `data_dir` under the cap and the disk's reserve.
    pub fn check_room(&self, data_dir: &Path, bytes: u64) -> Result<(), FineTuneError> {
        if self.max_stored_bytes > 0 {
            let used = crate::durable::tree_bytes(data_dir);
            if used.saturating_add(bytes) > self.max_stored_bytes {
                return Err(FineTuneError::Full(format!(
                    "the data directory holds {} of the {} it may (--max-stored-bytes); {} more do not fit: \
                     delete files first",
                    show_bytes(used),
                    show_bytes(self.max_stored_bytes),
                    show_bytes(bytes)
                )));
            }
        }
        let free = crate::durable::free_bytes(data_dir).map_err(FineTuneError::io(data_dir))?;
        if free < bytes.saturating_add(self.min_free_bytes) {
            return Err(FineTuneError::Full(format!(
                "the data directory's disk has {} free and keeps {} free (--min-free-disk); {} more do not fit",
                show_bytes(free),
                show_bytes(self.min_free_bytes),
                show_bytes(bytes)
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_is_refused_past_the_cap_and_the_disk_reserve() {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(dir.path().join("a"), vec![0u8; 1000]).expect("write");
        let capped = StorageLimits { max_stored_bytes: 1500, min_free_bytes: 0, ..Default::default() };
        assert!(capped.check_room(dir.path(), 400).is_ok());
        let full = capped.check_room(dir.path(), 600).expect_err("over the cap").to_string();
        assert!(full.contains("--max-stored-bytes"), "{full}");
        let reserve = StorageLimits { min_free_bytes: u64::MAX / 2, ..Default::default() };
        let full = reserve.check_room(dir.path(), 1).expect_err("over the reserve").to_string();
        assert!(full.contains("--min-free-disk"), "{full}");
    }
}
