//! Reading an adapter folder's files safely. A runtime load names a folder a
//! client chose: each file in it (not just the folder) must resolve under an
//! allowed root, so a symlink cannot lead elsewhere; each must be a regular
//! file (no FIFO, device or /proc entry), and is read with a size bound.
//! Errors name the file, never its contents.

use std::io::Read;
use std::path::{Path, PathBuf};

use super::LoraError;

/// Largest `adapter_config.json` / `tailor.toml` read.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// Largest `adapter_model.safetensors` read (rank 64 on a 70B model is ~1.7 GB).
pub const MAX_WEIGHTS_BYTES: u64 = 2 << 30;

/// One adapter folder, with the roots its files must lie under (none for
/// adapters the operator named at start-up, which may live anywhere, e.g.
/// behind a Hugging Face cache's symlinks).
pub struct AdapterFiles<'a> {
    dir: &'a Path,
    roots: Option<&'a [PathBuf]>,
}

impl<'a> AdapterFiles<'a> {
    pub fn trusted(dir: &'a Path) -> Self {
        Self { dir, roots: None }
    }

    pub fn under_roots(dir: &'a Path, roots: &'a [PathBuf]) -> Self {
        Self { dir, roots: Some(roots) }
    }

    pub fn dir(&self) -> &Path {
        self.dir
    }

    /// The file's bytes, or `None` when the folder has no such entry.
    pub fn read(&self, name: &str, max_bytes: u64) -> Result<Option<Vec<u8>>, LoraError> {
        let path = self.dir.join(name);
        match std::fs::symlink_metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(LoraError::Io(format!("cannot read {name}: {}", e.kind()))),
            Ok(_) => {}
        }
        let real =
            std::fs::canonicalize(&path).map_err(|e| LoraError::Io(format!("cannot resolve {name}: {}", e.kind())))?;
        if let Some(roots) = self.roots {
            if !roots.iter().any(|root| real.starts_with(root)) {
                return Err(LoraError::OutsideRoots(format!("{} (its file {name})", self.dir.display())));
            }
        }
        let meta = std::fs::metadata(&real).map_err(|e| LoraError::Io(format!("cannot read {name}: {}", e.kind())))?;
        if !meta.is_file() {
            return Err(LoraError::Io(format!("{name} is not a regular file")));
        }
        if meta.len() > max_bytes {
            return Err(LoraError::Io(format!("{name} is {} bytes, over the {max_bytes}-byte limit", meta.len())));
        }
        let file =
            std::fs::File::open(&real).map_err(|e| LoraError::Io(format!("cannot open {name}: {}", e.kind())))?;
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        // The bound holds even if the file grows between the check and the read.
        file.take(max_bytes + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| LoraError::Io(format!("cannot read {name}: {}", e.kind())))?;
        if bytes.len() as u64 > max_bytes {
            return Err(LoraError::Io(format!("{name} is over the {max_bytes}-byte limit")));
        }
        Ok(Some(bytes))
    }

    /// A text file: UTF-8 or an error that does not quote it.
    pub fn read_text(&self, name: &str) -> Result<Option<String>, LoraError> {
        match self.read(name, MAX_CONFIG_BYTES)? {
            None => Ok(None),
            Some(bytes) => {
                String::from_utf8(bytes).map(Some).map_err(|_| LoraError::Config(format!("{name} is not UTF-8 text")))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_symlinked_file_must_resolve_under_a_root() -> Result<(), Box<dyn std::error::Error>> {
        let root = tempfile::tempdir()?;
        let outside = tempfile::tempdir()?;
        let secret = outside.path().join("secret.txt");
        std::fs::write(&secret, "SECRET=hunter2")?;
        let adapter = root.path().join("a");
        std::fs::create_dir(&adapter)?;
        std::fs::write(adapter.join("adapter_config.json"), "{}")?;
        std::os::unix::fs::symlink(&secret, adapter.join("tailor.toml"))?;
        let roots = [std::fs::canonicalize(root.path())?];
        let files = AdapterFiles::under_roots(&adapter, &roots);
        assert_eq!(files.read("adapter_config.json", 10)?, Some(b"{}".to_vec()));
        assert_eq!(files.read("missing.json", 10)?, None);
        let refused = files.read("tailor.toml", 100).expect_err("outside the roots");
        assert!(matches!(refused, LoraError::OutsideRoots(_)), "{refused}");
        assert!(!refused.to_string().contains("hunter2"));
        // Trusted (start-up) adapters may follow links anywhere.
        assert!(AdapterFiles::trusted(&adapter).read("tailor.toml", 100)?.is_some());
        Ok(())
    }

    #[test]
    fn only_regular_files_within_the_bound_are_read() -> Result<(), Box<dyn std::error::Error>> {
        let root = tempfile::tempdir()?;
        std::fs::write(root.path().join("big"), vec![b'x'; 11])?;
        std::fs::create_dir(root.path().join("dir"))?;
        std::os::unix::fs::symlink("/dev/zero", root.path().join("zero"))?;
        let files = AdapterFiles::trusted(root.path());
        assert!(files.read("big", 10).is_err());
        assert_eq!(files.read("big", 11)?.map(|b| b.len()), Some(11));
        assert!(files.read("dir", 10).is_err());
        let zero = files.read("zero", 10).expect_err("a device is not a regular file");
        assert!(zero.to_string().contains("not a regular file"), "{zero}");
        Ok(())
    }
}
