//! File modification stamps: how template and preset stores notice edits.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Each file with its modification time when last scanned.
pub type FileStamps = BTreeMap<PathBuf, Option<SystemTime>>;

/// `location` itself if it is a file, else its files ending in `.{extension}`.
pub fn scan(location: &Path, extension: &str) -> FileStamps {
    let files: Vec<PathBuf> = if location.is_file() {
        vec![location.to_path_buf()]
    } else {
        std::fs::read_dir(location)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == extension))
                    .collect()
            })
            .unwrap_or_default()
    };
    files
        .into_iter()
        .map(|p| {
            let modified = std::fs::metadata(&p).and_then(|m| m.modified()).ok();
            (p, modified)
        })
        .collect()
}
