//! Uploaded files (OpenAI's `/v1/files`): each one's bytes and its
//! description, side by side in the data directory, so they outlive the
//! process. Ids are generated here; a client's id never names a path
//! unchecked.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::FineTuneError;
use crate::ids::unix_now as now;

/// A file as OpenAI describes it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct FileObject {
    pub id: String,
    pub object: String,
    pub bytes: u64,
    pub created_at: u64,
    pub filename: String,
    pub purpose: String,
    pub status: String,
}

pub struct FileStore {
    dir: PathBuf,
}

impl FileStore {
    /// Opens the folder, removing what a crash left half-written: temporary
    /// files, and contents whose description was never written.
    pub fn open(dir: &Path) -> Result<Self, FineTuneError> {
        let store = Self { dir: super::created(dir)? };
        for entry in std::fs::read_dir(&store.dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let orphan = match name.strip_suffix(".jsonl") {
                Some(id) => !store.meta_path(id).exists(),
                None => name.ends_with(".partial"),
            };
            if orphan {
                tracing::warn!(file = %name, "removing a half-written upload");
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(store)
    }

    fn content_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.jsonl"))
    }

    fn meta_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Stores checked content under a new id.
    pub fn create(&self, filename: &str, purpose: &str, content: &[u8]) -> Result<FileObject, FineTuneError> {
        let file = FileObject {
            id: crate::ids::response_id("file"),
            object: "file".into(),
            bytes: content.len() as u64,
            created_at: now(),
            filename: filename.chars().filter(|c| !c.is_control()).take(256).collect(),
            purpose: purpose.into(),
            status: "processed".into(),
        };
        let content_path = self.content_path(&file.id);
        // The content first: a file exists once its description does.
        crate::durable::write(&content_path, content).map_err(FineTuneError::io(&content_path))?;
        super::write_json(&self.meta_path(&file.id), &file)?;
        Ok(file)
    }

    pub fn get(&self, id: &str) -> Option<FileObject> {
        if !crate::ids::is_response_id(id, "file") {
            return None;
        }
        let text = std::fs::read_to_string(self.meta_path(id)).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Files kept (their descriptions).
    pub fn count(&self) -> usize {
        std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_str().is_some_and(|n| n.ends_with(".json") && n.starts_with("file-")))
            .count()
    }

    /// Newest first.
    pub fn list(&self) -> Vec<FileObject> {
        let mut files: Vec<FileObject> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name().into_string().ok()?;
                self.get(name.strip_suffix(".json")?)
            })
            .collect();
        files.sort_by(|a, b| b.created_at.cmp(&a.created_at).then_with(|| a.id.cmp(&b.id)));
        files
    }

    /// The stored bytes' path, for a file that exists.
    pub fn path(&self, id: &str) -> Option<PathBuf> {
        self.get(id).map(|_| self.content_path(id))
    }

    pub fn content(&self, id: &str) -> Option<Vec<u8>> {
        std::fs::read(self.path(id)?).ok()
    }

    /// False when there is no such file.
    pub fn delete(&self, id: &str) -> Result<bool, FineTuneError> {
        if self.get(id).is_none() {
            return Ok(false);
        }
        for path in [self.meta_path(id), self.content_path(id)] {
            std::fs::remove_file(&path).map_err(FineTuneError::io(&path))?;
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_kept_listed_and_deleted_by_id_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = FileStore::open(dir.path()).expect("store");
        let file = store.create("train\n.jsonl", "fine-tune", b"{}\n").expect("create");
        assert_eq!((file.bytes, file.filename.as_str()), (3, "train.jsonl"));
        let reopened = FileStore::open(dir.path()).expect("store");
        assert_eq!(reopened.get(&file.id), Some(file.clone()));
        assert_eq!(reopened.list(), vec![file.clone()]);
        assert_eq!(reopened.content(&file.id).as_deref(), Some(&b"{}\n"[..]));
        for hostile in ["../file-00", "file-../../etc/passwd", "file-", "x"] {
            assert!(reopened.get(hostile).is_none(), "{hostile}");
        }
        assert!(reopened.delete(&file.id).expect("delete"));
        assert!(!reopened.delete(&file.id).expect("delete"));
        assert!(reopened.list().is_empty());
    }
}
