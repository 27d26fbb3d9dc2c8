//! Opening a file that someone else named, relative to a folder, without ever leaving the
//! folder: [`open_beside`]; listing such a folder: [`list_folder_beside`]. Job files name their data files this way (`from: data/rows.csv`),
//! and the service runs job files written by others, so a name must not reach a file the
//! service can read but its author cannot (`inbox/data -> /private/`).
//!
//! The rules, in one place for every such path: relative, no `..`, no symbolic link in any
//! component (not only the last), every folder a real folder and the file a regular file.
//!
//! How: the walk goes one component at a time from an open handle of the folder, like
//! `openat(2)`. Each component is looked at with `lstat` (which does not follow it) and then
//! opened, and the opened handle must be the very file that was looked at (same device and
//! inode); a link swapped in between the two is refused, not followed. On Linux each step is
//! taken relative to the previous handle through `/proc/self/fd/N/`, so renaming or swapping a
//! folder higher up during the walk changes nothing. Without `/proc` (other systems), each step
//! uses the path from the folder, which a writer racing the walk could still redirect; the
//! identity checks still refuse a link in the last component. One race is left everywhere: a
//! named pipe swapped in for the file between the look and the open makes the open wait for a
//! writer (std opens without `O_NONBLOCK`); it reads nothing from elsewhere.

use std::fs::{File, Metadata};
use std::io;
use std::os::unix::fs::MetadataExt as _;
use std::os::unix::io::AsRawFd as _;
use std::path::{Component, Path, PathBuf};

/// Why a path was not opened. Messages name the path as written, never the folder it is in.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PathError {
    /// Empty, absolute, or with `..`.
    #[error("{} is not inside the folder; write a path relative to it, without `..`", .path.display())]
    Outside {
        /// The path as written.
        path: PathBuf,
    },
    /// A component is a symbolic link.
    #[error(
        "{}: `{}` is a symbolic link, and links are not followed here (they could reach files \
         elsewhere); put the file itself in the folder",
        .path.display(),
        .component.display()
    )]
    Link {
        /// The path as written.
        path: PathBuf,
        /// The components up to and including the link.
        component: PathBuf,
    },
    /// A component before the last is not a folder.
    #[error("{}: `{}` is not a folder", .path.display(), .component.display())]
    NotAFolder {
        /// The path as written.
        path: PathBuf,
        /// The components up to and including the one that is not a folder.
        component: PathBuf,
    },
    /// The last component is a folder, a device, a pipe or a socket.
    #[error("{} is not a regular file", .path.display())]
    NotAFile {
        /// The path as written.
        path: PathBuf,
    },
    /// A component changed between being looked at and being opened (a link swapped in).
    #[error("{} changed while it was being opened (was a link swapped in?); try again", .path.display())]
    Changed {
        /// The path as written.
        path: PathBuf,
    },
    /// The operating system refused (missing file, permissions).
    #[error("cannot read {}: {source}", .path.display())]
    Io {
        /// The path as written.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
}

/// Opens `relative` inside `base` for reading, refusing an absolute path, `..`, and a symbolic
/// link in any component. `base` itself is trusted (it is the folder the caller chose), links
/// in it included. Returns the open file and its metadata.
pub(crate) fn open_beside(base: &Path, relative: &Path) -> Result<(File, Metadata), PathError> {
    walk(base, relative, Last::File)
}

/// Opens the folder `relative` inside `base` under the rules of [`open_beside`], and lists it:
/// each entry's name and type, as the entry itself (a link is listed as a link, not followed).
/// Job files name folders of images this way (`from: photos/`).
pub(crate) fn list_folder_beside(
    base: &Path,
    relative: &Path,
) -> Result<Vec<(std::ffi::OsString, std::fs::FileType)>, PathError> {
    let (folder, _) = walk(base, relative, Last::Folder)?;
    let io = |source| PathError::Io { path: relative.to_owned(), source };
    // Listed through the open handle where `/proc` allows: the folder looked at is the one read.
    let listed = match proc_path(&folder, Path::new(".")).filter(|path| path.exists()) {
        Some(path) => std::fs::read_dir(path),
        None => std::fs::read_dir(base.join(relative)),
    };
    let mut entries = Vec::new();
    for entry in listed.map_err(io)? {
        let entry = entry.map_err(io)?;
        entries.push((entry.file_name(), entry.file_type().map_err(io)?));
    }
    Ok(entries)
}

/// What the last component of a path must be.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Last {
    File,
    Folder,
}

fn walk(base: &Path, relative: &Path, want: Last) -> Result<(File, Metadata), PathError> {
    let names = check_relative(relative)?;
    let io = |source| PathError::Io { path: relative.to_owned(), source };
    let mut dir = File::open(base).map_err(io)?;
    let proc_works = proc_path(&dir, Path::new("."))
        .and_then(|path| std::fs::metadata(path).ok())
        .zip(dir.metadata().ok())
        .is_some_and(|(seen, real)| same_file(&seen, &real));
    let mut walked = PathBuf::new();
    for (index, name) in names.iter().enumerate() {
        walked.push(name);
        let last = index + 1 == names.len();
        let at = match proc_works.then(|| proc_path(&dir, Path::new(name))).flatten() {
            Some(at) => at,
            None => base.join(&walked),
        };
        let seen = std::fs::symlink_metadata(&at).map_err(io)?;
        if seen.file_type().is_symlink() {
            return Err(PathError::Link { path: relative.to_owned(), component: walked });
        }
        if (!last || want == Last::Folder) && !seen.is_dir() {
            return Err(PathError::NotAFolder { path: relative.to_owned(), component: walked });
        }
        if last && want == Last::File && !seen.is_file() {
            return Err(PathError::NotAFile { path: relative.to_owned() });
        }
        // Opening follows a link swapped in since the look; the identity check catches it.
        let opened = File::open(&at).map_err(io)?;
        let meta = opened.metadata().map_err(io)?;
        if !same_file(&seen, &meta) {
            return Err(PathError::Changed { path: relative.to_owned() });
        }
        if last {
            return Ok((opened, meta));
        }
        dir = opened;
    }
    unreachable!("`check_relative` returns at least one name")
}

/// The names `relative` is made of; an error unless it has at least one and nothing else but
/// `.` (no root, no `..`). [`open_beside`] checks this first; callers may check it early too.
pub(crate) fn check_relative(relative: &Path) -> Result<Vec<&std::ffi::OsStr>, PathError> {
    let mut names = Vec::new();
    for part in relative.components() {
        match part {
            Component::Normal(name) => names.push(name),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(PathError::Outside { path: relative.to_owned() });
            }
        }
    }
    if names.is_empty() {
        return Err(PathError::Outside { path: relative.to_owned() });
    }
    Ok(names)
}

/// `/proc/self/fd/N/name`: `name` inside the folder `dir` is open on, wherever that folder is
/// now. `None` off Linux.
fn proc_path(dir: &File, name: &Path) -> Option<PathBuf> {
    cfg!(target_os = "linux")
        .then(|| Path::new("/proc/self/fd").join(dir.as_raw_fd().to_string()).join(name))
}

fn same_file(a: &Metadata, b: &Metadata) -> bool {
    (a.dev(), a.ino()) == (b.dev(), b.ino())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read as _;
    use std::os::unix::fs::symlink;

    fn read(base: &Path, relative: &str) -> Result<String, PathError> {
        let (mut file, _) = open_beside(base, Path::new(relative))?;
        let mut text = String::new();
        file.read_to_string(&mut text).expect("read");
        Ok(text)
    }

    #[test]
    fn files_inside_open_and_links_anywhere_on_the_path_are_refused() {
        let root = tempfile::tempdir().expect("temp dir");
        let base = root.path().join("inbox");
        let private = root.path().join("private");
        for dir in [base.join("data/deeper"), private.clone()] {
            std::fs::create_dir_all(dir).expect("folders");
        }
        std::fs::write(base.join("data/deeper/rows.csv"), "mine").expect("file");
        std::fs::write(base.join("rows.csv"), "top").expect("file");
        std::fs::write(private.join("customers.csv"), "secret").expect("file");
        std::fs::create_dir(private.join("deeper")).expect("folder");
        std::fs::write(private.join("deeper/rows.csv"), "secret").expect("file");
        symlink(&private, base.join("linked")).expect("folder link");
        symlink(private.join("customers.csv"), base.join("file-link.csv")).expect("file link");
        symlink(&private, base.join("data/inner")).expect("inner link");

        assert_eq!(read(&base, "data/deeper/rows.csv").expect("inside"), "mine");
        assert_eq!(read(&base, "./rows.csv").expect("inside"), "top");
        for (path, component) in [
            ("linked/customers.csv", "linked"),
            ("linked/deeper/rows.csv", "linked"),
            ("data/inner/customers.csv", "data/inner"),
            ("file-link.csv", "file-link.csv"),
        ] {
            let err = read(&base, path).expect_err(path);
            assert!(
                matches!(&err, PathError::Link { component: found, .. } if found == Path::new(component)),
                "{path}: {err:?}"
            );
            let message = err.to_string();
            assert!(message.contains(path) && message.contains("symbolic link"), "{message}");
            assert!(!message.contains(&*root.path().to_string_lossy()), "{message}");
        }
        for path in ["/etc/passwd", "../private/customers.csv", "data/../../x.csv", "", "."] {
            assert!(matches!(read(&base, path), Err(PathError::Outside { .. })), "{path}");
        }
        assert!(matches!(read(&base, "data"), Err(PathError::NotAFile { .. })));
        assert!(matches!(read(&base, "rows.csv/x"), Err(PathError::NotAFolder { .. })));
        assert!(matches!(read(&base, "missing.csv"), Err(PathError::Io { .. })));
    }

    #[test]
    fn a_linked_base_folder_is_the_callers_choice() {
        let root = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir(root.path().join("real")).expect("folder");
        std::fs::write(root.path().join("real/rows.csv"), "rows").expect("file");
        symlink(root.path().join("real"), root.path().join("base")).expect("link");
        assert_eq!(read(&root.path().join("base"), "rows.csv").expect("opened"), "rows");
    }
}
