//! The output folder as krea-batch's own: which state file it belongs to (its marker), one run
//! writing into it at a time (its lock), and what in it the state does not know.
//!
//! Results are paid for, so the folder that holds them is guarded like the state file:
//!
//! - **The marker**, `.krea-batch-output.json`, names the state file that owns the folder (by
//!   a random id stored in that state, and by path for people) and the batch inside it. A job's
//!   identity comes from its model and body, and its batch from this marker: renaming the job
//!   file or moving the project folder resumes the same batch instead of buying it again.
//! - **The lock**, `.krea-batch-output.lock`, is held by the run writing into the folder: two
//!   runs with different state files on one folder cannot both submit the same jobs.
//! - **Evidence**: a manifest or sidecars naming Krea jobs that the state does not know mean the
//!   state file was lost, emptied or rolled back. Such a folder is never written into until
//!   `krea-batch recover` has rebuilt the state (see `recover.rs`).
//! - **Foreign files**: a folder that is neither empty nor marked is someone else's (a web root,
//!   say); krea-batch refuses it unless `--force`, and even then never replaces the files that
//!   were there before it (the marker lists them).
//!
//! This module only reads and writes those two files and looks at the folder; `setup.rs`
//! decides what a run does with the verdict (`setup::claim_output`).

use crate::files::{PARTIAL_PREFIX, write_atomically};
use crate::report::MANIFEST;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::fs::File;
use std::hash::BuildHasher;
use std::path::{Path, PathBuf};

/// The marker's file name in an output folder.
pub(crate) const MARKER: &str = ".krea-batch-output.json";
/// The lock's file name in an output folder.
pub(crate) const LOCK: &str = ".krea-batch-output.lock";
/// The files krea-batch keeps in an output folder start with this (state, marker, lock, cache).
const OWN_PREFIX: &str = ".krea-batch";
/// How many foreign or unknown entries an error names.
const NAMED: usize = 5;

/// What can be wrong with an output folder. All but [`OutputError::Io`] are the user's to
/// settle (exit 2), and none of them has sent or written anything.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OutputError {
    /// Another process holds the folder's lock.
    #[error(
        "another krea-batch process is writing into the output folder {dir}; wait for it to \
         finish or stop it (the lock is {})",
        dir.join(LOCK).display()
    )]
    Locked {
        /// The folder.
        dir: PathBuf,
    },
    /// The folder belongs to another state file, which exists.
    #[error(
        "the output folder {dir} belongs to the state file {owner}, not to {state}; run with \
         `--state {owner}`, or write into another output folder (nothing was sent)"
    )]
    OwnedByOther {
        /// The folder.
        dir: PathBuf,
        /// The state file named by the marker.
        owner: String,
        /// The state file of this run.
        state: String,
    },
    /// The folder holds results that the state does not know: the state was lost.
    #[error(
        "the output folder {dir} holds results that the state file {state} does not know \
         ({evidence}); its state file was lost, emptied or rolled back. Nothing was sent: \
         running now could pay again for jobs already paid. Rebuild the state first with \
         `krea-batch recover {job_file}` (to start over on purpose, move the folder's contents \
         away)"
    )]
    LostState {
        /// The folder.
        dir: PathBuf,
        /// The state file of this run.
        state: String,
        /// The job file, as the user named it.
        job_file: String,
        /// What was found.
        evidence: String,
    },
    /// The folder holds files krea-batch did not write.
    #[error(
        "the output folder {dir} already holds files that krea-batch did not write ({listed}); \
         choose an empty or new folder (`output:` in the job file), or pass --force to write \
         into it anyway (krea-batch still never replaces a file it did not write)"
    )]
    Foreign {
        /// The folder.
        dir: PathBuf,
        /// Some of the files.
        listed: String,
    },
    /// The marker cannot be read.
    #[error(
        "{} is not a krea-batch output marker ({detail}); if you did not write it, restore it \
         from a backup or run `krea-batch recover`",
        path.display()
    )]
    BadMarker {
        /// The marker.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// The file system failed.
    #[error("output folder {path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

impl OutputError {
    /// Whether the user must act (exit 2), as opposed to a failing disk.
    #[must_use]
    pub(crate) fn is_input(&self) -> bool {
        !matches!(self, Self::Io { .. })
    }
}

/// What an output folder's marker says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Marker {
    /// For a person who opens the file.
    #[serde(default)]
    pub about: String,
    /// The random id of the state file that owns the folder.
    pub state_id: String,
    /// That state file's path when the marker was written (for messages; it may have moved).
    pub state_file: String,
    /// The batch of that state whose results are here.
    pub batch: String,
    /// Files that were in the folder before krea-batch used it (`--force`): never replaced.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub foreign: Vec<String>,
    /// The file name of the job file last run into the folder: the gallery's title (absent in
    /// markers from before it, and for folders `recover` rebuilt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_file: Option<String>,
}

impl Marker {
    /// A marker for `batch` of the state `state_id` at `state_file`.
    #[must_use]
    pub(crate) fn new(
        state_id: &str,
        state_file: &Path,
        batch: &str,
        foreign: Vec<String>,
    ) -> Self {
        Self {
            about: "This folder holds krea-batch results; this file names the state file that \
                    owns them. Keep it: without it a rerun cannot tell its results from \
                    someone else's."
                .into(),
            state_id: state_id.to_owned(),
            state_file: state_file.display().to_string(),
            batch: batch.to_owned(),
            foreign,
            job_file: None,
        }
    }

    /// The marker naming `job_file` (by its file name) as the one run into the folder.
    #[must_use]
    pub(crate) fn with_job_file(mut self, job_file: &Path) -> Self {
        self.job_file = job_file.file_name().map(|name| name.to_string_lossy().into_owned());
        self
    }
}

/// The held lock of an output folder; released when dropped.
#[derive(Debug)]
pub(crate) struct OutputLock {
    _file: File,
}

/// Takes the output folder's lock, or says who holds it.
pub(crate) fn lock(dir: &Path) -> Result<OutputLock, OutputError> {
    let path = dir.join(LOCK);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|source| OutputError::Io { path: path.clone(), source })?;
    if file.try_lock().is_err() {
        return Err(OutputError::Locked { dir: dir.to_owned() });
    }
    Ok(OutputLock { _file: file })
}

/// Reads the folder's marker, if it has one.
pub(crate) fn read_marker(dir: &Path) -> Result<Option<Marker>, OutputError> {
    let path = dir.join(MARKER);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(OutputError::Io { path, source }),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|err| OutputError::BadMarker { path, detail: err.to_string() })
}

/// Writes the folder's marker (synced: it decides whether a later run may write here).
pub(crate) fn write_marker(dir: &Path, marker: &Marker) -> Result<(), OutputError> {
    let path = dir.join(MARKER);
    let mut text = serde_json::to_vec_pretty(marker).unwrap_or_default();
    text.push(b'\n');
    write_atomically(&path, &text, true).map_err(|err| OutputError::Io { path, source: err.source })
}

/// The entries of `dir` that krea-batch did not put there: everything but its own files (the
/// marker, the lock, a state file and its companions, temporary files), sorted by name.
pub(crate) fn foreign_entries(dir: &Path, state: &Path) -> Result<Vec<String>, OutputError> {
    let io = |source| OutputError::Io { path: dir.to_owned(), source };
    let same_folder = state.parent().and_then(|parent| std::fs::canonicalize(parent).ok())
        == std::fs::canonicalize(dir).ok();
    let state_name = same_folder
        .then(|| state.file_name().map(|name| name.to_string_lossy().into_owned()))
        .flatten();
    let mut foreign = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let name = entry.map_err(io)?.file_name().to_string_lossy().into_owned();
        let own = name.starts_with(OWN_PREFIX)
            || name.starts_with(PARTIAL_PREFIX)
            || state_name.as_deref().is_some_and(|state| name.starts_with(state));
        if !own {
            foreign.push(name);
        }
    }
    foreign.sort();
    Ok(foreign)
}

/// Names the first few of `names` for a message.
#[must_use]
pub(crate) fn listed(names: &[String]) -> String {
    use std::fmt::Write as _;
    let mut text = names.iter().take(NAMED).cloned().collect::<Vec<_>>().join(", ");
    if names.len() > NAMED {
        let _ = write!(text, " and {} more", names.len() - NAMED);
    }
    text
}

/// A Krea job that the folder's manifest or a sidecar names.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub(crate) struct Recorded {
    /// The job's name.
    #[serde(default)]
    pub name: String,
    /// Krea's job id (absent for a job that was never sent).
    #[serde(default)]
    pub job_id: Option<String>,
}

/// The Krea jobs named in `dir` (its manifest and the sidecars of its results, one folder
/// deep) that are not in `known`, at most `limit` of them; files whose path is in `recorded`
/// are the state's own and are not opened.
#[must_use]
pub(crate) fn unknown_jobs<K: BuildHasher, R: BuildHasher>(
    dir: &Path,
    known: &HashSet<String, K>,
    recorded: &HashSet<String, R>,
    limit: usize,
) -> Vec<Recorded> {
    let mut found = Vec::new();
    let mut seen = HashSet::new();
    let mut consider = |record: Recorded, found: &mut Vec<Recorded>| {
        if let Some(id) = record.job_id.as_deref().filter(|id| !id.is_empty())
            && !known.contains(id)
            && seen.insert(id.to_owned())
        {
            found.push(record);
        }
    };
    if let Ok(text) = std::fs::read_to_string(dir.join(MANIFEST)) {
        for line in text.lines() {
            if let Ok(record) = serde_json::from_str::<Recorded>(line) {
                consider(record, &mut found);
            }
            if found.len() >= limit {
                return found;
            }
        }
    }
    for sidecar in sidecars(dir) {
        if found.len() >= limit {
            break;
        }
        if recorded.contains(&sidecar.result) {
            continue;
        }
        if let Some(record) = read_sidecar(&dir.join(&sidecar.path)) {
            consider(record, &mut found);
        }
    }
    found
}

/// A sidecar found in an output folder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SidecarPath {
    /// The sidecar, relative to the folder.
    pub path: String,
    /// Its result file, relative to the folder.
    pub result: String,
}

/// The sidecars in `dir` and its sub-folders one level deep (a job with several results has a
/// folder), sorted by path. Links are not followed.
#[must_use]
pub(crate) fn sidecars(dir: &Path) -> Vec<SidecarPath> {
    let mut found = Vec::new();
    let visit = |folder: &Path, prefix: &str, found: &mut Vec<SidecarPath>, deeper: bool| {
        let Ok(entries) = std::fs::read_dir(folder) else { return Vec::new() };
        let mut folders = Vec::new();
        for entry in entries.flatten() {
            let Ok(kind) = entry.file_type() else { continue };
            let name = entry.file_name().to_string_lossy().into_owned();
            if kind.is_dir() && deeper && !name.starts_with('.') {
                folders.push(name);
            } else if kind.is_file()
                && !name.starts_with('.')
                && let Some(result) = name.strip_suffix(".json")
                && result.contains('.')
            {
                found.push(SidecarPath {
                    path: format!("{prefix}{name}"),
                    result: format!("{prefix}{result}"),
                });
            }
        }
        folders
    };
    for folder in visit(dir, "", &mut found, true) {
        visit(&dir.join(&folder), &format!("{folder}/"), &mut found, false);
    }
    found.sort_by(|a, b| a.path.cmp(&b.path));
    found
}

/// The name and job id a sidecar records, if it is one (at most 1 MiB is read).
#[must_use]
pub(crate) fn read_sidecar(path: &Path) -> Option<Recorded> {
    crate::files::read_small_json(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_marker_round_trips_and_a_garbled_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_marker(dir.path()).unwrap(), None);
        let marker = Marker::new("abc", Path::new("/x/state.sqlite"), "batch:1", Vec::new());
        write_marker(dir.path(), &marker).unwrap();
        assert_eq!(read_marker(dir.path()).unwrap(), Some(marker));
        std::fs::write(dir.path().join(MARKER), b"{not json").unwrap();
        let err = read_marker(dir.path()).unwrap_err();
        assert!(matches!(err, OutputError::BadMarker { .. }), "{err}");
    }

    #[test]
    fn a_second_lock_on_the_same_folder_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let first = lock(dir.path()).unwrap();
        assert!(matches!(lock(dir.path()), Err(OutputError::Locked { .. })));
        drop(first);
        assert!(lock(dir.path()).is_ok());
    }

    #[test]
    fn own_files_are_not_foreign() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("custom.sqlite");
        for name in [MARKER, LOCK, ".krea-batch.sqlite", "custom.sqlite-wal", ".krea-part-x"] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        assert!(foreign_entries(dir.path(), &state).unwrap().is_empty());
        std::fs::write(dir.path().join("index.html"), b"<p>mine</p>").unwrap();
        std::fs::create_dir(dir.path().join("assets")).unwrap();
        assert_eq!(foreign_entries(dir.path(), &state).unwrap(), ["assets", "index.html"]);
    }

    #[test]
    fn jobs_named_by_the_manifest_or_sidecars_but_not_known_are_found() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(MANIFEST),
            "{\"name\":\"a\",\"job_id\":\"id-a\"}\n{\"name\":\"b\",\"job_id\":null}\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("c.png"), b"png").unwrap();
        std::fs::write(dir.path().join("c.png.json"), "{\"name\":\"c\",\"job_id\":\"id-c\"}")
            .unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        std::fs::write(dir.path().join("d/1.png.json"), "{\"name\":\"d\",\"job_id\":\"id-d\"}")
            .unwrap();
        let none = HashSet::new();
        let ids = |found: Vec<Recorded>| -> Vec<String> {
            found.into_iter().filter_map(|record| record.job_id).collect()
        };
        assert_eq!(ids(unknown_jobs(dir.path(), &none, &none, 10)), ["id-a", "id-c", "id-d"]);
        let known: HashSet<String> = ["id-a".to_owned(), "id-c".to_owned()].into();
        assert_eq!(ids(unknown_jobs(dir.path(), &known, &none, 10)), ["id-d"]);
        // A file the state records is its own: its sidecar is not even read.
        let recorded: HashSet<String> = ["d/1.png".to_owned()].into();
        assert!(unknown_jobs(dir.path(), &known, &recorded, 10).is_empty());
    }
}
