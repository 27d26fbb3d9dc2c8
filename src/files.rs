//! General file helpers shared by everything that writes into the output folder, the inbox and
//! the caches: an atomic write (a reader never sees half a file), a real folder (never a link
//! planted where a folder belongs), and the temporary files a killed process leaves behind.
//!
//! They know nothing of downloads, jobs or the state file; `download.rs`, `output.rs`,
//! `report.rs`, `gallery.rs`, `inbox.rs`, `openapi.rs` and `reuse.rs` build on them.

use std::path::{Path, PathBuf};

/// Temporary files start with this, so a restart can find and remove those of a killed run.
pub(crate) const PARTIAL_PREFIX: &str = ".krea-part-";

/// Writing a file or making a folder failed (a full disk, permissions, a symlink where a folder
/// belongs).
#[derive(Debug, thiserror::Error)]
#[error("cannot write {}: {source}", path.display())]
pub(crate) struct FileError {
    /// The file or folder.
    pub path: PathBuf,
    /// The error.
    #[source]
    pub source: std::io::Error,
}

impl FileError {
    /// The error of writing `path`.
    pub(crate) fn at(path: &Path) -> impl Fn(std::io::Error) -> Self + use<> {
        let path = path.to_owned();
        move |source| Self { path: path.clone(), source }
    }
}

/// Results, sidecars and the manifest are ordinary files (0644 before the umask); only the
/// state file is private.
#[must_use]
pub(crate) fn public_file() -> std::fs::Permissions {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::Permissions::from_mode(0o644)
}

/// Creates `dir` (and its parents) if needed, refusing a symlink where a folder belongs so that a
/// link planted in the output directory cannot redirect writes elsewhere.
pub(crate) fn ensure_real_dir(dir: &Path) -> Result<(), FileError> {
    let disk = FileError::at(dir);
    match std::fs::symlink_metadata(dir) {
        Ok(meta) if meta.file_type().is_symlink() => Err(disk(std::io::Error::other(
            "it is a symbolic link; krea-batch writes only into real folders",
        ))),
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(disk(std::io::Error::other("it is a file, not a folder"))),
        Err(_) => std::fs::create_dir_all(dir).map_err(disk),
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename, so a reader never sees a
/// partial file; with `synced`, the data is on disk before the rename.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8], synced: bool) -> Result<(), FileError> {
    use std::io::Write as _;
    let folder = path.parent().unwrap_or_else(|| Path::new("."));
    let disk = FileError::at(path);
    let mut temp = tempfile::Builder::new()
        .prefix(PARTIAL_PREFIX)
        .permissions(public_file())
        .tempfile_in(folder)
        .map_err(&disk)?;
    temp.write_all(bytes).map_err(&disk)?;
    if synced {
        temp.as_file().sync_all().map_err(&disk)?;
    }
    temp.persist(path).map_err(|err| disk(err.error))?;
    Ok(())
}

/// Removes the temporary files a killed run left in `dir` and its immediate sub-folders. Returns
/// how many were removed.
#[must_use]
pub(crate) fn remove_partials(dir: &Path) -> usize {
    let mut removed = 0;
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Ok(kind) = entry.file_type() else { continue };
        if kind.is_file() && name.to_string_lossy().starts_with(PARTIAL_PREFIX) {
            removed += usize::from(std::fs::remove_file(entry.path()).is_ok());
        } else if kind.is_dir() && !kind.is_symlink() {
            let Ok(inner) = std::fs::read_dir(entry.path()) else { continue };
            for file in inner.flatten() {
                let is_partial = file.file_name().to_string_lossy().starts_with(PARTIAL_PREFIX);
                if is_partial && file.file_type().is_ok_and(|kind| kind.is_file()) {
                    removed += usize::from(std::fs::remove_file(file.path()).is_ok());
                }
            }
        }
    }
    removed
}

/// The largest JSON file [`read_small_json`] reads: sidecars and markers are far smaller.
const SMALL_JSON: u64 = 1 << 20;

/// Parses a small JSON file krea-batch wrote (a sidecar): `None` when it is missing, not a
/// regular file (a link is not followed), larger than 1 MiB, or not that JSON.
#[must_use]
pub(crate) fn read_small_json<T: serde::de::DeserializeOwned>(path: &Path) -> Option<T> {
    let meta = std::fs::symlink_metadata(path).ok()?;
    if !meta.file_type().is_file() || meta.len() > SMALL_JSON {
        return None;
    }
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_symlink_is_not_a_folder_to_write_into() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = tempfile::tempdir().expect("tempdir");
        let link = dir.path().join("job");
        std::os::unix::fs::symlink(target.path(), &link).expect("symlink");
        assert!(ensure_real_dir(&link).is_err());
        assert!(ensure_real_dir(&dir.path().join("fresh/deeper")).is_ok());
    }

    #[test]
    fn partials_are_cleaned_and_nothing_else() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(".krea-part-abc"), b"half").expect("write");
        std::fs::create_dir(dir.path().join("multi")).expect("mkdir");
        std::fs::write(dir.path().join("multi/.krea-part-x"), b"half").expect("write");
        std::fs::write(dir.path().join("keep.png"), b"whole").expect("write");
        assert_eq!(remove_partials(dir.path()), 2);
        assert!(dir.path().join("keep.png").exists());
    }

    #[test]
    fn atomic_writes_replace_links_without_following_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outside = dir.path().join("outside.txt");
        std::fs::write(&outside, b"precious").expect("write");
        let inside = dir.path().join("file.json");
        std::os::unix::fs::symlink(&outside, &inside).expect("symlink");
        write_atomically(&inside, b"new", true).expect("written");
        assert_eq!(std::fs::read(&outside).expect("read"), b"precious");
        assert_eq!(std::fs::read(&inside).expect("read"), b"new");
        assert!(!std::fs::symlink_metadata(&inside).expect("meta").file_type().is_symlink());
    }
}
